//! One inspection: decode → preprocess (blocking pool) → batched inference
//! (the model's batcher thread) → predictions and verdict. Used by the HTTP
//! API and by `lineside inspect`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use lineside_inference::preprocess::{DecodeLimits, decode};
use serde::Serialize;

use crate::config::VerdictRule;
use crate::error::ApiError;
use crate::registry::ModelEntry;

/// The answer to one inspection.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub id: String,
    pub model: ModelRef,
    /// Top-1 label and its probability.
    pub label: String,
    pub score: f32,
    /// Top-k labels, highest first.
    pub predictions: Vec<Prediction>,
    pub verdict: Verdict,
    pub image: ImageInfo,
    pub timings_ms: Timings,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub label: String,
    pub score: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub decode: f64,
    pub preprocess: f64,
    pub queue: f64,
    pub inference: f64,
    pub batch_size: usize,
    pub total: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl VerdictRule {
    /// Pass only for a pass label with enough confidence.
    pub fn judge(&self, label: &str, score: f32) -> Verdict {
        if score >= self.min_score && self.pass_labels.iter().any(|l| l == label) {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }
}

/// Runs one encoded image through `model`.
pub async fn inspect(
    model: &ModelEntry,
    body: Bytes,
    deadline: Instant,
    limits: DecodeLimits,
    top_k: usize,
) -> Result<Inspection, ApiError> {
    let started = Instant::now();
    if body.is_empty() {
        return Err(ApiError::InvalidImage("the request body is empty; send the image bytes".into()));
    }
    let pre = model.preprocessor.clone();
    // Decoding and resizing are CPU work: off the async workers, and in parallel with the batcher.
    let (input, (width, height), decode_t, pre_t) = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let img = decode(&body, limits).map_err(ApiError::from_image)?;
        let t1 = Instant::now();
        let input = pre.run(&img).map_err(ApiError::from_image)?;
        Ok::<_, ApiError>((input, (img.width(), img.height()), t1 - t0, t1.elapsed()))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("preprocessing task: {e}")))??;

    if Instant::now() >= deadline {
        metrics::counter!("lineside_dropped_total", "model" => model.name.clone(), "reason" => "deadline").increment(1);
        return Err(ApiError::DeadlineExceeded(format!("model `{}`: deadline passed before queueing", model.name)));
    }
    let reply = model.batcher.submit(input, deadline).map_err(|e| ApiError::from_submit(&model.name, e))?;
    let served = tokio::time::timeout_at(deadline.into(), reply)
        .await
        .map_err(|_| ApiError::DeadlineExceeded(format!("model `{}`: no result within the deadline", model.name)))?
        .map_err(|_| ApiError::Internal("the batcher dropped the request".into()))?
        .map_err(|e| ApiError::from_job(&model.name, e))?;

    let mut ranked: Vec<(usize, f32)> = served.output.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let predictions: Vec<Prediction> = ranked
        .iter()
        .take(top_k.max(1))
        .map(|&(i, score)| Prediction { label: model.labels[i].clone(), score })
        .collect();
    let top = predictions[0].clone();
    Ok(Inspection {
        id: uuid::Uuid::new_v4().to_string(),
        model: ModelRef { name: model.name.clone(), version: model.version.clone() },
        verdict: model.config.verdict.judge(&top.label, top.score),
        label: top.label,
        score: top.score,
        predictions,
        image: ImageInfo { width, height },
        timings_ms: Timings {
            decode: ms(decode_t),
            preprocess: ms(pre_t),
            queue: ms(served.queue),
            inference: ms(served.inference),
            batch_size: served.batch_size,
            total: ms(started.elapsed()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_fails_unless_confident_pass_label() {
        let rule = VerdictRule { pass_labels: vec!["good".into()], min_score: 0.6 };
        assert_eq!(rule.judge("good", 0.9), Verdict::Pass);
        assert_eq!(rule.judge("good", 0.5), Verdict::Fail);
        assert_eq!(rule.judge("scratches", 0.99), Verdict::Fail);
    }
}
