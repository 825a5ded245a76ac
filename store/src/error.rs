use std::path::Path;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("integrity check failed: {0}")]
    Corrupt(String),
    #[error("the record writer has stopped")]
    WriterGone,
    #[error("stored field `{field}` is not valid JSON: {source}")]
    BadJson { field: &'static str, source: serde_json::Error },
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io { path: path.display().to_string(), source }
    }
}
