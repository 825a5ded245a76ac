//! What one inspection record holds.

use serde::Serialize;
use serde_json::Value;

use crate::images::ImageRef;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Everything the server knew when it answered: written once, read back as is.
#[derive(Debug, Clone, Serialize)]
pub struct RecordData {
    /// The inspection id the client got.
    pub id: String,
    pub created_ms: i64,
    pub factory: Option<String>,
    pub line: Option<String>,
    pub part_id: Option<String>,
    pub capture_id: Option<String>,
    /// `Idempotency-Key`, or one derived from part and capture ids.
    pub idempotency_key: Option<String>,
    pub model: String,
    pub model_version: String,
    /// Plugins that ran: names, versions (sha256) and times.
    pub plugins: Value,
    /// `pass`, `fail` or `review`: the verdict the line got.
    pub verdict: String,
    pub label: String,
    pub score: f64,
    pub anomaly_score: Option<f64>,
    /// Defects (factory codes) and anomaly regions.
    pub defects: Value,
    pub timings: Value,
    /// Set when retaining the image failed: the record is kept without it.
    pub storage_warning: Option<String>,
    /// The JSON body the client got, replayed verbatim on an idempotent retry.
    #[serde(skip)]
    pub response: Value,
}

/// A record to write.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub data: RecordData,
    pub image: Option<ImageRef>,
    pub heatmap: Option<ImageRef>,
}

/// The outcome of [`crate::Store::insert`].
#[derive(Debug)]
pub enum Inserted {
    /// Stored now.
    New(Box<Record>),
    /// The idempotency key was already taken: this is the earlier record.
    Existing(Box<Record>),
}

/// A stored inspection.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Position in the store; cursors page on it.
    pub seq: i64,
    #[serde(flatten)]
    pub data: RecordData,
    /// sha256 of the retained original, if it was kept.
    pub image_sha256: Option<String>,
    pub heatmap_sha256: Option<String>,
    /// The latest reviewer's decision, if any.
    pub review: Option<Review>,
}

impl RecordData {
    /// Idempotency keys are unique within this: the factory, or `""` for `/v1/inspect`.
    pub fn scope(&self) -> &str {
        self.factory.as_deref().unwrap_or_default()
    }
}

impl Record {
    /// The verdict that stands: a reviewer's override, else the model's.
    pub fn effective_verdict(&self) -> &str {
        self.review.as_ref().map(|r| r.verdict.as_str()).unwrap_or(&self.data.verdict)
    }
}

/// A reviewer's decision on a record.
#[derive(Debug, Clone, Serialize)]
pub struct Review {
    pub verdict: String,
    pub reviewer: String,
    pub reviewed_ms: i64,
}

/// One entry of a record's review history.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewRecord {
    pub verdict: String,
    pub reviewer: String,
    pub note: Option<String>,
    pub created_ms: i64,
}
