//! Durable inspection records for lineside.
//!
//! Every inspection the server acknowledges is a quality record. [`Store`]
//! keeps them in SQLite (WAL, the embedded default, in a data directory) or in
//! PostgreSQL (many replicas, one database), through one sqlx `Any` pool and the
//! same SQL: times are integer milliseconds and structured fields are JSON text,
//! so only the migrations differ between the two.
//!
//! Writes go through one group-commit writer ([`writer`]): a request's record is
//! committed (and, on SQLite, synced to the WAL) before its answer is sent, and
//! requests arriving together share one transaction and one sync.
//!
//! Images (originals of failed and review parts, a sample of passes, and
//! heatmaps) live content-addressed on disk ([`images`]), with retention by age
//! and total size enforced by a background task.

mod error;
pub mod images;
mod migrations;
mod query;
mod record;
mod writer;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use error::StoreError;
pub use images::{ImageRef, ImageStore, RetentionPolicy, RetentionReport};
pub use query::{Filter, Page, StatRow};
pub use record::{Inserted, NewRecord, Record, RecordData, Review, ReviewRecord, now_ms};

/// Where records are kept.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `DIR/lineside.db` (WAL, synchronous=FULL).
    Sqlite { data_dir: PathBuf },
    /// A `postgres://` URL; images stay under `data_dir`.
    Postgres { url: String, data_dir: PathBuf },
}

impl Backend {
    /// The data directory: the SQLite file (if any) and the image store live there.
    pub fn data_dir(&self) -> &std::path::Path {
        match self {
            Backend::Sqlite { data_dir } | Backend::Postgres { data_dir, .. } => data_dir,
        }
    }

    fn url(&self) -> String {
        match self {
            Backend::Sqlite { data_dir } => format!("sqlite://{}?mode=rwc", data_dir.join("lineside.db").display()),
            Backend::Postgres { url, .. } => url.clone(),
        }
    }

    fn is_sqlite(&self) -> bool {
        matches!(self, Backend::Sqlite { .. })
    }

    /// Names the store in logs without leaking a password.
    pub fn describe(&self) -> String {
        match self {
            Backend::Sqlite { data_dir } => format!("sqlite:{}", data_dir.join("lineside.db").display()),
            Backend::Postgres { url, .. } => {
                let host = url.rsplit('@').next().unwrap_or(url);
                format!("postgres://…@{}", host.trim_start_matches("postgres://").trim_start_matches("postgresql://"))
            }
        }
    }
}

/// The record store: a connection pool, the group-commit writer and the image store.
pub struct Store {
    pool: AnyPool,
    writer: writer::Writer,
    images: ImageStore,
    backend: Backend,
}

impl Store {
    /// Opens (creating if needed) the store and brings its schema up to date.
    pub async fn open(backend: Backend) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let data_dir = backend.data_dir().to_path_buf();
        std::fs::create_dir_all(&data_dir).map_err(|e| StoreError::io(&data_dir, e))?;
        let sqlite = backend.is_sqlite();
        let options = AnyConnectOptions::from_str(&backend.url()).map_err(StoreError::Db)?;
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // WAL lets readers run beside the writer; FULL syncs the WAL at
                        // every commit, so an acknowledged record survives a power cut,
                        // not only a crash of the process.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(StoreError::Db)?;
        migrations::run(&pool, sqlite).await?;
        let images = ImageStore::open(data_dir.join("images"))?;
        let writer = writer::Writer::start(pool.clone());
        tracing::info!(store = %backend.describe(), "record store open");
        Ok(Store { pool, writer, images, backend })
    }

    /// Commits `record` (durably) and returns it as stored, or the record that
    /// already holds its idempotency key.
    pub async fn insert(&self, record: NewRecord) -> Result<Inserted, StoreError> {
        self.writer.insert(record).await
    }

    /// Content-addressed files of retained images and heatmaps.
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// Where the records live.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Checks the database's integrity (`PRAGMA integrity_check` on SQLite, a
    /// catalogue query on PostgreSQL); `Ok` means it opened and reads cleanly.
    pub async fn check(&self) -> Result<(), StoreError> {
        if self.backend.is_sqlite() {
            let verdict: String =
                sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&self.pool).await.map_err(StoreError::Db)?;
            if verdict != "ok" {
                return Err(StoreError::Corrupt(verdict));
            }
        }
        sqlx::query("SELECT COUNT(*) FROM inspections").fetch_one(&self.pool).await.map_err(StoreError::Db)?;
        Ok(())
    }

    /// Closes the pool after the writer has committed everything queued.
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}
