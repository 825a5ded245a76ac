//! One inspection: decode → [preprocess plugin] → resize and normalise
//! (preprocessing pool) → batched inference (the model's batcher thread) →
//! predictions → [postprocess plugin] → verdict. Used by the HTTP API and by
//! `lineside inspect`; the plugin steps run for factory pipelines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use image::DynamicImage;
use lineside_inference::anomaly::{AnomalyMap, Region, regions as anomaly_regions, render};
use lineside_inference::batcher::Incoming;
use lineside_inference::models::Output;
use lineside_inference::preprocess::{DecodeLimits, Decoded, JpegDecode, decode};
use lineside_plugins::{
    AnomalyMap as WitAnomalyMap, Decision, Failure, Image as PluginImage, LabelScore, Metadata, ModelOutput,
    PixelFormat, Plugin, PluginError,
};
use serde::Serialize;

use crate::config::{OnPluginError, VerdictRule};
use crate::error::ApiError;
use crate::factories::Factory;
use crate::registry::{ModelEntry, ModelKind};

/// The answer to one inspection. Anomaly models add the fields of
/// `AnomalyResult`; factory pipelines add those of `FactoryResult`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    /// Anomaly models only: score, regions and, on request, heatmap PNGs.
    // OpenAPI cannot say "these fields, sometimes" of a flattened struct: the
    // schema's description names them instead.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub anomaly: Option<AnomalyResult>,
    /// Factory pipelines only: the factory, its defects and plugin details.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub factory: Option<FactoryResult>,
    /// How the inspection was recorded (absent with records off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordStatus>,
    /// The model's whole output, with `Options::raw_outputs` (for tensor protocols).
    #[serde(skip)]
    pub raw: Option<RawOutput>,
}

/// What the record store did with an inspection.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RecordStatus {
    /// Committed before this answer was sent.
    pub stored: bool,
    /// Whether the original image was kept (failed and review parts, and sampled passes).
    pub image_retained: bool,
    /// Why an image could not be kept; the record itself was stored.
    pub warning: Option<String>,
}

/// A model's output before it becomes labels and verdicts.
#[derive(Debug, Clone)]
pub enum RawOutput {
    /// Class probabilities in label order.
    Probabilities(Vec<f32>),
    /// The anomaly map, `size`×`size`, row-major.
    AnomalyMap { size: usize, values: Vec<f32> },
}

/// What an anomaly model adds to an inspection.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AnomalyResult {
    /// Normalised score: 0.5 is the model's threshold.
    pub anomaly_score: f32,
    pub is_anomalous: bool,
    /// Connected regions of the thresholded map, in the pixels of the image the model saw:
    /// `x`, `y`, `width`, `height`, `area`, `area_percent`, `peak`.
    #[schema(value_type = Vec<Object>)]
    pub regions: Vec<Region>,
    /// Base64 PNG: the heatmap over the part (with `?heatmap=png`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap_png: Option<String>,
    /// Base64 PNG: the thresholded map as a binary mask (with `?heatmap=png`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_png: Option<String>,
    /// The heatmap PNG's bytes, kept for the record of an anomalous part.
    #[serde(skip)]
    pub heatmap_for_record: Option<Vec<u8>>,
}

/// What a factory pipeline adds to an inspection.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FactoryResult {
    pub factory: String,
    /// Defects with the factory's codes, from the postprocess plugin.
    pub defects: Vec<DefectOut>,
    /// Extra fields from the postprocess plugin.
    pub extra: std::collections::BTreeMap<String, String>,
    /// Each plugin that ran: name, version and time.
    pub plugins: Vec<PluginRun>,
    /// Plugins that failed under `on_plugin_error = "pass_through"`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugin_errors: Vec<PluginFailure>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DefectOut {
    pub code: String,
    pub label: String,
    pub severity: f32,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<[u32; 4]>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PluginRun {
    pub stage: &'static str,
    pub name: String,
    pub sha256: String,
    pub ms: f64,
    /// Width and height of the image a preprocessor returned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_size: Option<[u32; 2]>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PluginFailure {
    pub plugin: String,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Prediction {
    pub label: String,
    pub score: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    /// Send the part to a human (plugins may decide this).
    Review,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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

/// What a caller asks of one inspection.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub limits: DecodeLimits,
    /// How JPEGs are decoded where nothing needs the full image.
    pub jpeg_decode: JpegDecode,
    /// Predictions returned (classifiers).
    pub top_k: usize,
    /// Attach heatmap and mask PNGs (anomaly models).
    pub heatmap: bool,
    /// Render the heatmap of anomalous parts for their record.
    pub retain_heatmap: bool,
    /// Keep the model's whole output in `Inspection::raw`.
    pub raw_outputs: bool,
}

/// Runs one encoded image through `model` (`/v1/inspect`).
pub async fn inspect(
    model: &ModelEntry,
    body: Bytes,
    deadline: Instant,
    opts: Options,
) -> Result<Inspection, ApiError> {
    run(model, None, body, deadline, opts).await
}

/// A factory pipeline's plugins, and what the request said about the part.
pub struct FactoryCall {
    pub factory: Arc<Factory>,
    pub meta: Metadata,
}

/// Runs one encoded image through a factory's plugins and model.
pub async fn inspect_factory(
    call: FactoryCall,
    body: Bytes,
    deadline: Instant,
    opts: Options,
) -> Result<Inspection, ApiError> {
    let model = call.factory.model.clone();
    run(&model, Some(call), body, deadline, opts).await
}

/// Plugin runs and failures of one request.
#[derive(Default)]
struct Trace {
    runs: Vec<PluginRun>,
    failures: Vec<PluginFailure>,
}

/// Runs one preprocessed CHW tensor (the model's input shape) through
/// `model`, announced to its batcher as `incoming`: no decoding and no plugins.
pub async fn infer_tensor(
    model: &ModelEntry,
    incoming: Incoming<Output>,
    input: Vec<f32>,
    deadline: Instant,
    opts: Options,
) -> Result<Inspection, ApiError> {
    let (_, h, w) = model.preprocessor.input_shape();
    let seen = Seen { width: w as u32, height: h as u32, image: None };
    let prepared = Prepared {
        input,
        size: (w as u32, h as u32),
        seen,
        decode: Duration::ZERO,
        preprocess: Duration::ZERO,
        trace: Trace::default(),
        call: None,
    };
    infer(model, incoming, prepared, Instant::now(), deadline, opts).await
}

/// An image made ready for the model.
struct Prepared {
    input: Vec<f32>,
    /// The decoded image's width and height.
    size: (u32, u32),
    seen: Seen,
    decode: Duration,
    preprocess: Duration,
    trace: Trace,
    call: Option<FactoryCall>,
}

async fn run(
    model: &ModelEntry,
    call: Option<FactoryCall>,
    body: Bytes,
    deadline: Instant,
    opts: Options,
) -> Result<Inspection, ApiError> {
    let started = Instant::now();
    // Announced before decoding, so that a partial batch waits for it.
    let incoming = model.batcher.incoming();
    if body.is_empty() {
        return Err(ApiError::InvalidImage("the request body is empty; send the image bytes".into()));
    }
    let pre = model.preprocessor.clone();
    let (limits, jpeg) = (opts.limits, opts.jpeg_decode);
    // Only an anomaly heatmap needs the picture again after inference.
    let keep_image = (opts.heatmap || opts.retain_heatmap) && model.kind == ModelKind::Anomaly;
    // A preprocess plugin crops in the coordinates of the image as sent, and
    // a heatmap is drawn over it: both need every pixel.
    let plugin_first = call.as_ref().is_some_and(|c| c.factory.preprocess.is_some());
    let whole = plugin_first || keep_image;
    // Decoding, plugins and resizing are CPU work: off the async workers, on
    // the preprocessing threads, overlapped with the batcher.
    let prepared = crate::preprocess_pool::run(deadline, move || {
        let t0 = Instant::now();
        let decoded = if whole { decode(&body, limits).map(Decoded::whole) } else { pre.decode(&body, limits, jpeg) };
        let Decoded { image: mut img, source_size: size, window } = decoded.map_err(ApiError::from_image)?;
        let t1 = Instant::now();
        let decoded_width = window.map_or(img.width(), |w| w.frame().0);
        metrics::histogram!("lineside_decode_seconds", "scale" => decode_scale(size.0, decoded_width))
            .record((t1 - t0).as_secs_f64());
        let mut trace = Trace::default();
        if let Some(c) = &call {
            // A plugin gets every pixel: `plugin_first` decoded whole, without a window.
            debug_assert!(window.is_none() || c.factory.preprocess.is_none(), "a preprocess plugin on part of a frame");
            img = run_preprocess(c, img, &mut trace)?;
        }
        let input = pre.run_window(&img, window).map_err(ApiError::from_image)?;
        // Regions are reported in the coordinates of what the model was shown:
        // the plugin's output, else the image as sent (not a scaled decode's).
        let (width, height) = if plugin_first { (img.width(), img.height()) } else { size };
        let seen = Seen { width, height, image: keep_image.then(|| img.to_rgb8()) };
        Ok(Prepared { input, size, seen, decode: t1 - t0, preprocess: t1.elapsed(), trace, call })
    })
    .await
    .map_err(|e| match e {
        ApiError::DeadlineExceeded(_) => deadline_drop(model, "deadline passed while waiting for preprocessing"),
        other => other,
    })?;
    infer(model, incoming, prepared, started, deadline, opts).await
}

/// The DCT scale a JPEG was decoded at, as a metric label: `1` (every pixel),
/// `1/2`, `1/4` or `1/8`.
fn decode_scale(source_width: u32, decoded_width: u32) -> &'static str {
    // libjpeg rounds scaled sides up, so 1001 px at 1/2 is 501: round the ratio.
    match (source_width as f64 / decoded_width.max(1) as f64).round() as u32 {
        0 | 1 => "1",
        2 => "1/2",
        3..=5 => "1/4",
        _ => "1/8",
    }
}

/// A request dropped for its deadline before it reached the model: counted, and its 504.
fn deadline_drop(model: &ModelEntry, what: &str) -> ApiError {
    metrics::counter!("lineside_dropped_total", "model" => model.name.clone(), "reason" => "deadline").increment(1);
    ApiError::DeadlineExceeded(format!("model `{}`: {what}", model.name))
}

/// Batched inference and everything after it.
async fn infer(
    model: &ModelEntry,
    incoming: Incoming<Output>,
    prepared: Prepared,
    started: Instant,
    deadline: Instant,
    opts: Options,
) -> Result<Inspection, ApiError> {
    let Prepared { input, size: (width, height), seen, decode: decode_t, preprocess: pre_t, mut trace, call } =
        prepared;

    if Instant::now() >= deadline {
        return Err(deadline_drop(model, "deadline passed before queueing"));
    }
    let reply = incoming.submit(input, deadline).map_err(|e| ApiError::from_submit(&model.name, e))?;
    let served = tokio::time::timeout_at(deadline.into(), reply)
        .await
        .map_err(|_| ApiError::DeadlineExceeded(format!("model `{}`: no result within the deadline", model.name)))?
        .map_err(|_| ApiError::Internal("the batcher dropped the request".into()))?
        .map_err(|e| ApiError::from_job(&model.name, e))?;

    let raw = opts.raw_outputs.then(|| match &served.output {
        Output::Classes(probs) => RawOutput::Probabilities(probs.clone()),
        Output::Anomaly(map) => RawOutput::AnomalyMap { size: map.size, values: map.map.clone() },
    });
    let outcome = match served.output {
        Output::Classes(probs) => classification(model, probs, opts.top_k),
        Output::Anomaly(map) => anomaly(model, map, seen, opts).await?,
    };
    let Outcome { label, score, predictions, mut verdict, anomaly, plugin_input } = outcome;
    let factory = match call {
        Some(c) => {
            // A plugin may spin until its deadline: never on an async worker.
            let (decision, trace, c) = tokio::task::spawn_blocking(move || {
                let d = run_postprocess(&c, plugin_input, &mut trace);
                d.map(|d| (d, trace, c))
            })
            .await
            .map_err(|e| ApiError::Internal(format!("postprocessing task: {e}")))??;
            if let Some(d) = &decision {
                verdict = from_wit_verdict(d.verdict);
            }
            Some(factory_result(&c.factory.name, decision, trace))
        }
        None => None,
    };
    Ok(Inspection {
        id: uuid::Uuid::new_v4().to_string(),
        model: ModelRef { name: model.name.clone(), version: model.version.clone() },
        verdict,
        label,
        score,
        predictions,
        image: ImageInfo { width, height },
        anomaly,
        timings_ms: Timings {
            decode: ms(decode_t),
            preprocess: ms(pre_t),
            queue: ms(served.queue),
            inference: ms(served.inference),
            batch_size: served.batch_size,
            total: ms(started.elapsed()),
        },
        factory,
        record: None,
        raw,
    })
}

/// Applies the factory's preprocess plugin, if it has one.
fn run_preprocess(c: &FactoryCall, img: DynamicImage, trace: &mut Trace) -> Result<DynamicImage, ApiError> {
    let Some(slot) = &c.factory.preprocess else { return Ok(img) };
    let plugin = slot.current();
    let t = Instant::now();
    let pass_through = c.factory.on_plugin_error == OnPluginError::PassThrough;
    // Under `fail` the original is not needed again: hand its buffer over instead of copying it.
    let (input, original) =
        if pass_through { (to_plugin_image(&img), Some(img)) } else { (into_plugin_image(img), None) };
    let result = plugin.preprocess(&input, &c.meta).and_then(|out| from_plugin_image(out, &plugin));
    match result {
        Ok(out) => {
            trace.ran(&c.factory.name, "preprocess", &plugin, t, Some([out.width(), out.height()]));
            Ok(out)
        }
        Err(e) => match original {
            Some(img) => {
                trace.failed(&c.factory.name, e);
                Ok(img)
            }
            None => Err(plugin_error(&c.factory.name, e)),
        },
    }
}

/// Applies the factory's postprocess plugin, if it has one. `None` means the
/// model's own verdict stands.
fn run_postprocess(c: &FactoryCall, output: ModelOutput, trace: &mut Trace) -> Result<Option<Decision>, ApiError> {
    let Some(slot) = &c.factory.postprocess else { return Ok(None) };
    let plugin = slot.current();
    let t = Instant::now();
    match plugin.postprocess(&output, &c.meta) {
        Ok(d) => {
            trace.ran(&c.factory.name, "postprocess", &plugin, t, None);
            Ok(Some(d))
        }
        Err(e) if c.factory.on_plugin_error == OnPluginError::PassThrough => {
            trace.failed(&c.factory.name, e);
            Ok(None)
        }
        Err(e) => Err(plugin_error(&c.factory.name, e)),
    }
}

fn plugin_error(factory: &str, e: PluginError) -> ApiError {
    metrics::counter!("lineside_plugin_failures_total", "factory" => factory.to_string(), "plugin" => e.plugin.clone(), "reason" => e.failure.as_str())
        .increment(1);
    ApiError::Plugin { factory: factory.to_string(), error: e }
}

impl Trace {
    fn ran(&mut self, factory: &str, stage: &'static str, plugin: &Plugin, t: Instant, output_size: Option<[u32; 2]>) {
        let elapsed = t.elapsed();
        metrics::histogram!("lineside_plugin_seconds", "factory" => factory.to_string(), "plugin" => plugin.info().name.clone(), "stage" => stage)
            .record(elapsed.as_secs_f64());
        self.runs.push(PluginRun {
            stage,
            name: plugin.info().name.clone(),
            sha256: plugin.info().sha256.clone(),
            ms: ms(elapsed),
            output_size,
        });
    }

    fn failed(&mut self, factory: &str, e: PluginError) {
        tracing::warn!(factory, error = %e, "plugin failed; passing through");
        let _ = plugin_error(factory, e.clone());
        self.failures.push(PluginFailure { plugin: e.plugin, reason: e.failure.as_str(), message: e.message });
    }
}

fn factory_result(factory: &str, decision: Option<Decision>, trace: Trace) -> FactoryResult {
    let (defects, extra) = match decision {
        Some(d) => (
            d.defects
                .into_iter()
                .map(|x| DefectOut {
                    code: x.code,
                    label: x.label,
                    severity: x.severity,
                    score: x.score,
                    region: x.region.map(|r| [r.x, r.y, r.width, r.height]),
                })
                .collect(),
            d.extra.into_iter().collect(),
        ),
        None => (Vec::new(), Default::default()),
    };
    FactoryResult { factory: factory.to_string(), defects, extra, plugins: trace.runs, plugin_errors: trace.failures }
}

/// The image the model saw (after any preprocess plugin).
struct Seen {
    width: u32,
    height: u32,
    /// Kept only when a heatmap was asked for.
    image: Option<image::RgbImage>,
}

/// A model's answer in response terms, and what a postprocess plugin gets.
struct Outcome {
    label: String,
    score: f32,
    predictions: Vec<Prediction>,
    verdict: Verdict,
    anomaly: Option<AnomalyResult>,
    plugin_input: ModelOutput,
}

fn classification(model: &ModelEntry, probs: Vec<f32>, top_k: usize) -> Outcome {
    let mut ranked: Vec<(usize, f32)> = probs.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let predictions: Vec<Prediction> = ranked
        .iter()
        .take(top_k.max(1))
        .map(|&(i, score)| Prediction { label: model.labels[i].clone(), score })
        .collect();
    let top = predictions[0].clone();
    let scores =
        probs.iter().zip(&model.labels).map(|(&score, label)| LabelScore { label: label.clone(), score }).collect();
    Outcome {
        verdict: model.config.verdict.judge(&top.label, top.score),
        label: top.label,
        score: top.score,
        predictions,
        anomaly: None,
        plugin_input: ModelOutput::Classification(scores),
    }
}

async fn anomaly(model: &ModelEntry, map: AnomalyMap, seen: Seen, opts: Options) -> Result<Outcome, ApiError> {
    let size = map.size;
    let (w, h) = (seen.width, seen.height);
    let found = anomaly_regions(&map.map, size, size, 0.5);
    let scale = |v: u32, to: u32| (v as u64 * to as u64 / size as u64) as u32;
    let regions = found
        .iter()
        .map(|r| Region {
            x: scale(r.x, w),
            y: scale(r.y, h),
            width: scale(r.width, w).max(1),
            height: scale(r.height, h).max(1),
            area: (r.area as f64 * w as f64 * h as f64 / (size * size) as f64).round() as u32,
            area_percent: r.area_percent,
            peak: r.peak,
        })
        .collect();
    let anomalous = map.is_anomalous();
    let (heatmap_png, mask_png, heatmap_for_record) = match seen.image {
        Some(img) if opts.heatmap || anomalous => {
            let m = map.map.clone();
            let (respond, retain) = (opts.heatmap, opts.retain_heatmap && anomalous);
            tokio::task::spawn_blocking(move || {
                let heat = render::png(&render::overlay(&img, &m, size, &found));
                let mask =
                    respond.then(|| BASE64.encode(render::png(&render::mask(&m, size, img.width(), img.height()))));
                (respond.then(|| BASE64.encode(&heat)), mask, retain.then_some(heat))
            })
            .await
            .map_err(|e| ApiError::Internal(format!("heatmap task: {e}")))?
        }
        _ => (None, None, None),
    };
    let label = if anomalous { "anomalous" } else { "good" };
    let top = if anomalous { map.score } else { 1.0 - map.score };
    let mut predictions = vec![
        Prediction { label: "anomalous".into(), score: map.score },
        Prediction { label: "good".into(), score: 1.0 - map.score },
    ];
    predictions.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(Outcome {
        verdict: model.config.verdict.judge(label, top),
        label: label.into(),
        score: top,
        predictions,
        anomaly: Some(AnomalyResult {
            anomaly_score: map.score,
            is_anomalous: anomalous,
            regions,
            heatmap_png,
            mask_png,
            heatmap_for_record,
        }),
        plugin_input: ModelOutput::Anomaly(WitAnomalyMap {
            width: size as u32,
            height: size as u32,
            image_score: map.score,
            scores: map.map,
        }),
    })
}

fn from_wit_verdict(v: lineside_plugins::Verdict) -> Verdict {
    match v {
        lineside_plugins::Verdict::Pass => Verdict::Pass,
        lineside_plugins::Verdict::Fail => Verdict::Fail,
        lineside_plugins::Verdict::Review => Verdict::Review,
    }
}

fn to_plugin_image(img: &DynamicImage) -> PluginImage {
    match img {
        DynamicImage::ImageLuma8(b) => plugin_image(b.width(), b.height(), PixelFormat::Gray8, b.as_raw().clone()),
        DynamicImage::ImageRgba8(b) => plugin_image(b.width(), b.height(), PixelFormat::Rgba8, b.as_raw().clone()),
        DynamicImage::ImageRgb8(b) => plugin_image(b.width(), b.height(), PixelFormat::Rgb8, b.as_raw().clone()),
        other => into_plugin_image(DynamicImage::ImageRgb8(other.to_rgb8())),
    }
}

fn into_plugin_image(img: DynamicImage) -> PluginImage {
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageLuma8(b) => plugin_image(w, h, PixelFormat::Gray8, b.into_raw()),
        DynamicImage::ImageRgba8(b) => plugin_image(w, h, PixelFormat::Rgba8, b.into_raw()),
        other => plugin_image(w, h, PixelFormat::Rgb8, other.into_rgb8().into_raw()),
    }
}

fn plugin_image(width: u32, height: u32, format: PixelFormat, pixels: Vec<u8>) -> PluginImage {
    PluginImage { width, height, format, pixels }
}

fn from_plugin_image(img: PluginImage, plugin: &Plugin) -> Result<DynamicImage, PluginError> {
    let (w, h) = (img.width, img.height);
    let out = match img.format {
        PixelFormat::Gray8 => image::GrayImage::from_raw(w, h, img.pixels).map(DynamicImage::ImageLuma8),
        PixelFormat::Rgb8 => image::RgbImage::from_raw(w, h, img.pixels).map(DynamicImage::ImageRgb8),
        PixelFormat::Rgba8 => image::RgbaImage::from_raw(w, h, img.pixels).map(DynamicImage::ImageRgba8),
    };
    // Sizes were validated by the host; this only guards the conversion itself.
    out.ok_or_else(|| PluginError {
        plugin: plugin.info().name.clone(),
        failure: Failure::InvalidOutput,
        message: "image buffer does not match its size".into(),
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
