//! Inspection records on the serving path: every inspection is written to the
//! store before its answer is sent, idempotent retries get the stored answer,
//! and images of failed and review parts (and a sample of passes) are kept.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use lineside_store::{ImageRef, Inserted, NewRecord, RecordData, Store};
use serde_json::{Value, json};

use crate::config::RecordsConfig;
use crate::error::ApiError;
use crate::pipeline::{Inspection, Verdict};

/// Set on an answer replayed from the store for a retried idempotency key.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The record store as the server uses it.
pub struct Records {
    store: Store,
    cfg: RecordsConfig,
    /// Idempotency keys whose first request is still running.
    in_flight: Mutex<HashSet<String>>,
}

/// What a request says about the part, read from its headers.
#[derive(Debug, Clone, Default)]
pub struct PartContext {
    pub factory: Option<String>,
    pub line: Option<String>,
    pub part_id: Option<String>,
    pub capture_id: Option<String>,
    /// `Idempotency-Key`, else `part:{part id}|capture:{capture id}` when both are sent.
    pub key: Option<String>,
}

/// Longest accepted identifier header.
const MAX_ID_LEN: usize = 200;

impl PartContext {
    /// Reads `Idempotency-Key`, `X-Line-Id`, `X-Part-Id` and `X-Capture-Id`.
    pub fn from_headers(headers: &HeaderMap, factory: Option<&str>) -> Result<PartContext, ApiError> {
        let text = |name: &str| -> Result<Option<String>, ApiError> {
            let Some(v) = headers.get(name) else { return Ok(None) };
            let s = v.to_str().ok().map(str::trim).filter(|s| !s.is_empty() && s.len() <= MAX_ID_LEN);
            let s = s.ok_or_else(|| {
                ApiError::BadRequest(format!("header `{name}` must be 1-{MAX_ID_LEN} characters of visible ASCII"))
            })?;
            Ok(Some(s.to_string()))
        };
        let (line, part_id, capture_id) = (text("x-line-id")?, text("x-part-id")?, text("x-capture-id")?);
        let key = match (text("idempotency-key")?, &part_id, &capture_id) {
            (Some(k), _, _) => Some(k),
            (None, Some(p), Some(c)) => Some(format!("part:{p}|capture:{c}")),
            _ => None,
        };
        Ok(PartContext { factory: factory.map(str::to_string), line, part_id, capture_id, key })
    }

    /// Idempotency keys are unique within this: the factory, or `""` for `/v1/inspect`.
    fn scope(&self) -> &str {
        self.factory.as_deref().unwrap_or_default()
    }
}

/// Holds an idempotency key while its first request runs.
pub struct Claim {
    records: Arc<Records>,
    slot: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.records.in_flight.lock().expect("in-flight lock").remove(&self.slot);
    }
}

impl Records {
    /// Opens the configured store and starts its retention task.
    pub async fn open(cfg: &RecordsConfig) -> anyhow::Result<Arc<Records>> {
        let store = Store::open(cfg.backend())
            .await
            .map_err(|e| anyhow::anyhow!("record store {}: {e}", cfg.backend().describe()))?;
        let records = Arc::new(Records { store, cfg: cfg.clone(), in_flight: Mutex::default() });
        records.spawn_retention();
        Ok(records)
    }

    /// The store itself, for the query API.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn spawn_retention(self: &Arc<Self>) {
        let records = Arc::downgrade(self);
        let every = Duration::from_secs(self.cfg.retention_interval_s);
        let policy = self.cfg.retention();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(records) = records.upgrade() else { return };
                match records.store.enforce_retention(policy).await {
                    Ok(r) if r.removed > 0 => {
                        tracing::info!(
                            removed = r.removed,
                            freed_bytes = r.removed_bytes,
                            kept = r.kept,
                            "image retention"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "image retention failed; retrying next round"),
                }
            }
        });
    }

    /// The stored answer for a retried idempotency key, if there is one.
    pub async fn replay(&self, ctx: &PartContext) -> Result<Option<Response>, ApiError> {
        let Some(key) = &ctx.key else { return Ok(None) };
        let found = self.store.by_key(ctx.scope(), key).await.map_err(|e| ApiError::Store(e.to_string()))?;
        Ok(found.map(|r| replayed(r.data.response)))
    }

    /// Claims `ctx`'s idempotency key for this request; a second request with
    /// the same key while the first runs gets 409.
    pub fn claim(self: &Arc<Self>, ctx: &PartContext) -> Result<Option<Claim>, ApiError> {
        let Some(key) = &ctx.key else { return Ok(None) };
        let slot = format!("{}\n{key}", ctx.scope());
        if !self.in_flight.lock().expect("in-flight lock").insert(slot.clone()) {
            return Err(ApiError::Conflict(
                "a request with this idempotency key is still running; retry when it has answered".into(),
            ));
        }
        Ok(Some(Claim { records: self.clone(), slot }))
    }

    /// Stores the inspection (and the images retention keeps) and returns the
    /// answer to send. Nothing is acknowledged that is not committed.
    pub async fn commit(&self, ctx: PartContext, inspection: Inspection, image: Bytes) -> Result<Response, ApiError> {
        Ok(match self.commit_answer(ctx, inspection, image).await? {
            Committed::New(v) => Json(v).into_response(),
            Committed::Replayed(v) => replayed(v),
        })
    }

    /// [`Records::commit`], giving the stored answer as JSON. An empty `image`
    /// (a tensor request) keeps no image.
    pub async fn commit_answer(
        &self,
        ctx: PartContext,
        mut inspection: Inspection,
        image: Bytes,
    ) -> Result<Committed, ApiError> {
        let started = Instant::now();
        let keep_image = !image.is_empty()
            && (inspection.verdict != Verdict::Pass || rand::random::<f64>() < self.cfg.pass_sample_rate);
        let heatmap = inspection.anomaly.as_mut().and_then(|a| a.heatmap_for_record.take());
        let images = self.store.images().clone();
        let kept = tokio::task::spawn_blocking(move || retain(&images, keep_image.then_some(image), heatmap))
            .await
            .map_err(|e| ApiError::Internal(format!("image store task: {e}")))?;
        inspection.record = Some(crate::pipeline::RecordStatus {
            stored: true,
            image_retained: kept.image.is_some(),
            warning: kept.warning.clone(),
        });
        let response = serde_json::to_value(&inspection).map_err(|e| ApiError::Internal(e.to_string()))?;
        let record = new_record(&ctx, &inspection, kept, response);
        let inserted = self.store.insert(record).await.map_err(|e| ApiError::RecordFailed(e.to_string()))?;
        metrics::histogram!("lineside_record_seconds").record(started.elapsed().as_secs_f64());
        Ok(match inserted {
            Inserted::New(r) => Committed::New(r.data.response),
            // Two requests raced under one key and the other committed first.
            Inserted::Existing(r) => Committed::Replayed(r.data.response),
        })
    }
}

/// The answer a commit stored.
pub enum Committed {
    /// This request's answer.
    New(Value),
    /// The answer of an earlier request under the same idempotency key.
    Replayed(Value),
}

impl Committed {
    /// The stored answer.
    pub fn into_value(self) -> Value {
        match self {
            Committed::New(v) | Committed::Replayed(v) => v,
        }
    }
}

fn replayed(response: Value) -> Response {
    let mut resp = (StatusCode::OK, Json(response)).into_response();
    resp.headers_mut().insert(HeaderName::from_static(REPLAYED_HEADER), HeaderValue::from_static("true"));
    resp
}

/// The images written for one record, or why not.
struct Kept {
    image: Option<ImageRef>,
    heatmap: Option<ImageRef>,
    warning: Option<String>,
}

/// Writes what retention keeps. A storage failure is reported, not raised:
/// the inspection is still recorded and answered, flagged.
fn retain(images: &lineside_store::ImageStore, image: Option<Bytes>, heatmap: Option<Vec<u8>>) -> Kept {
    let mut warnings = Vec::new();
    let mut put = |bytes: &[u8], content_type: &str, what: &str| match images.put(bytes, content_type) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "could not retain the {what}");
            metrics::counter!("lineside_image_store_errors_total").increment(1);
            warnings.push(format!("{what} not retained: {e}"));
            None
        }
    };
    let image = image.and_then(|b| put(&b, content_type(&b), "image"));
    let heatmap = heatmap.and_then(|b| put(&b, "image/png", "heatmap"));
    Kept { image, heatmap, warning: (!warnings.is_empty()).then(|| warnings.join("; ")) }
}

fn content_type(bytes: &[u8]) -> &'static str {
    image::guess_format(bytes).map(|f| f.to_mime_type()).unwrap_or("application/octet-stream")
}

fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
        Verdict::Review => "review",
    }
}

fn new_record(ctx: &PartContext, i: &Inspection, kept: Kept, response: Value) -> NewRecord {
    // Defects in one shape for both kinds of model: a factory's coded defects,
    // or an anomaly model's regions.
    let defects = match (&i.factory, &i.anomaly) {
        (Some(f), _) if !f.defects.is_empty() => json!(f.defects),
        (_, Some(a)) => Value::Array(
            a.regions
                .iter()
                .map(|r| json!({"label": "anomaly", "score": r.peak, "region": [r.x, r.y, r.width, r.height]}))
                .collect(),
        ),
        _ => json!([]),
    };
    NewRecord {
        data: RecordData {
            id: i.id.clone(),
            created_ms: lineside_store::now_ms(),
            factory: ctx.factory.clone(),
            line: ctx.line.clone(),
            part_id: ctx.part_id.clone(),
            capture_id: ctx.capture_id.clone(),
            idempotency_key: ctx.key.clone(),
            model: i.model.name.clone(),
            model_version: i.model.version.clone(),
            plugins: i.factory.as_ref().map(|f| json!(f.plugins)).unwrap_or_else(|| json!([])),
            verdict: verdict_str(i.verdict).into(),
            label: i.label.clone(),
            score: f64::from(i.score),
            anomaly_score: i.anomaly.as_ref().map(|a| f64::from(a.anomaly_score)),
            defects,
            timings: json!(i.timings_ms),
            storage_warning: kept.warning,
            response,
        },
        image: kept.image,
        heatmap: kept.heatmap,
    }
}
