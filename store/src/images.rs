//! Retained images: content-addressed files under `DATA_DIR/images`, one row
//! each in the `images` table, and retention by age and total size.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::query::Sql;
use crate::{Store, StoreError};

/// A file in the image store.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRef {
    /// Hex sha256 of the bytes: the file's name.
    pub sha256: String,
    pub bytes: u64,
    pub content_type: String,
}

/// The content-addressed file store.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    pub(crate) fn open(root: PathBuf) -> Result<ImageStore, StoreError> {
        std::fs::create_dir_all(&root).map_err(|e| StoreError::io(&root, e))?;
        Ok(ImageStore { root })
    }

    /// Writes `bytes` (synced, then renamed into place, so a crash never leaves
    /// a torn file under a valid name) unless the same content is already there.
    pub fn put(&self, bytes: &[u8], content_type: &str) -> Result<ImageRef, StoreError> {
        let sha256 = hex(&Sha256::digest(bytes));
        let path = self.path_of(&sha256);
        let image = ImageRef { sha256, bytes: bytes.len() as u64, content_type: content_type.to_string() };
        if path.exists() {
            return Ok(image);
        }
        let dir = path.parent().expect("images have a parent folder");
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        // Unique per writer: two requests may retain the same picture at once.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{}.{}.{n}.tmp", image.sha256, std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            StoreError::io(&path, e)
        })?;
        Ok(image)
    }

    /// The bytes of a retained image; `None` once retention removed it.
    pub fn read(&self, sha256: &str) -> Option<Vec<u8>> {
        valid_hash(sha256).then(|| std::fs::read(self.path_of(sha256)).ok()).flatten()
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join(&sha256[..2]).join(sha256)
    }

    /// The folder holding the files.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Only 64 lowercase hex digits name a file: no path can be smuggled in.
fn valid_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long and how much is kept.
#[derive(Debug, Clone, Copy)]
pub struct RetentionPolicy {
    /// Images not used by a record for this long are removed.
    pub max_age: Duration,
    /// Past this total, the least recently used images are removed.
    pub max_bytes: u64,
}

/// What one retention pass removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RetentionReport {
    pub removed: u64,
    pub removed_bytes: u64,
    pub kept: u64,
    pub kept_bytes: u64,
}

/// Images used this recently are never removed for size, so a record being
/// written does not lose the image it was just given.
const GRACE_MS: i64 = 60_000;

impl Store {
    /// The content type of a retained image, if its row is still there.
    pub async fn image_type(&self, sha256: &str) -> Result<Option<String>, StoreError> {
        let mut sql = Sql::new("SELECT content_type FROM images WHERE sha256 = ");
        sql.text_arg(sha256);
        Ok(sql.query().fetch_optional(&self.pool).await?.map(|r| r.try_get(0)).transpose()?)
    }

    /// Removes images older than the policy's age, then the least recently used
    /// ones until the total fits. Rows go first: a crash in between leaves an
    /// unreferenced file, never a row without its file.
    pub async fn enforce_retention(&self, policy: RetentionPolicy) -> Result<RetentionReport, StoreError> {
        let now = crate::now_ms();
        let mut report = RetentionReport::default();
        let cutoff = now - policy.max_age.as_millis() as i64;
        let mut sql = Sql::new("SELECT sha256, bytes FROM images WHERE last_used_ms < ");
        sql.int(cutoff);
        for row in sql.query().fetch_all(&self.pool).await? {
            self.remove_image(row.try_get(0)?, row.try_get(1)?, &mut report).await?;
        }
        let rows = Sql::new("SELECT sha256, bytes, last_used_ms FROM images ORDER BY last_used_ms ASC")
            .query()
            .fetch_all(&self.pool)
            .await?;
        let mut total: u64 = rows.iter().map(|r| r.try_get::<i64, _>(1).unwrap_or(0) as u64).sum();
        for row in &rows {
            let (sha, bytes, used): (String, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            if total <= policy.max_bytes || used > now - GRACE_MS {
                report.kept += 1;
                report.kept_bytes += bytes as u64;
                continue;
            }
            total -= bytes as u64;
            self.remove_image(sha, bytes, &mut report).await?;
        }
        Ok(report)
    }

    async fn remove_image(&self, sha: String, bytes: i64, report: &mut RetentionReport) -> Result<(), StoreError> {
        let mut sql = Sql::new("DELETE FROM images WHERE sha256 = ");
        sql.text_arg(&sha);
        sql.query().execute(&self.pool).await?;
        if valid_hash(&sha) {
            let path = self.images.path_of(&sha);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a retained image");
            }
        }
        report.removed += 1;
        report.removed_bytes += bytes as u64;
        Ok(())
    }
}
