//! The Open Inference Protocol (KServe v2, as Triton speaks it over HTTP),
//! beside `/v1`, so Triton and KServe clients work unchanged.
//!
//! A v2 model is a served model or a factory (a factory's name wins). Its
//! inputs are `IMAGE` (BYTES: encoded images, run through the whole
//! pipeline, plugins included, and recorded like `/v1` inspections) or
//! `INPUT` (FP32 `[N, 3, H, W]`, already resized and normalised: straight to
//! the batcher; served models only). Outputs: `scores` (class probabilities
//! in label order) or `anomaly_score` and `anomaly_map`, plus `label`,
//! `verdict` and `inspection` (the `/v1` answer as JSON), each with one row
//! per batch element.

pub mod protocol;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::factories::Factory;
use crate::pipeline::{self, Inspection, RawOutput};
use crate::records::PartContext;
use crate::registry::{ModelEntry, ModelKind};
use crate::server::AppState;
use protocol::{Data, InferRequest, OutData, Output};

/// Name of the encoded-image input.
pub const IMAGE_INPUT: &str = "IMAGE";
/// Name of the preprocessed-tensor input.
pub const TENSOR_INPUT: &str = "INPUT";

/// Routes anyone may call: server metadata and health.
pub fn public_routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(server_ready))
}

/// Model routes: the caller must be allowed the model or factory.
pub fn model_routes() -> Router<AppState> {
    Router::new()
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(model_ready))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
}

/// An error in the protocol's shape: `{"error": "..."}`, with our code beside it.
pub struct OipError(ApiError);

impl From<ApiError> for OipError {
    fn from(e: ApiError) -> Self {
        OipError(e)
    }
}

impl IntoResponse for OipError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.0.to_string(), "code": self.0.code() }).to_string();
        // The usual response keeps the status, the log line and Retry-After.
        let mut resp = self.0.into_response();
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        *resp.body_mut() = Body::from(body);
        resp
    }
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "lineside",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
    .into_response()
}

async fn live() -> Response {
    axum::Json(json!({ "live": true })).into_response()
}

async fn server_ready(State(st): State<AppState>) -> Response {
    let ready = st.registry.all_ready() && !st.draining();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({ "ready": ready }))).into_response()
}

#[derive(Deserialize)]
struct ModelPath {
    model: String,
    version: Option<String>,
}

/// What a v2 model name stands for.
enum Target {
    Factory(Arc<Factory>),
    Model(Arc<ModelEntry>),
}

impl Target {
    fn model(&self) -> &Arc<ModelEntry> {
        match self {
            Target::Factory(f) => &f.model,
            Target::Model(m) => m,
        }
    }
}

/// The model or factory `p` names, if `who` may use it and the version is served.
fn resolve(st: &AppState, who: &Principal, p: &ModelPath) -> Result<Target, ApiError> {
    let target = match st.factories.get(&p.model) {
        Some(f) => {
            who.may_use_factory(&p.model)?;
            Target::Factory(f)
        }
        None => {
            who.may_use_model(&p.model)?;
            Target::Model(st.registry.get(&p.model).ok_or_else(|| ApiError::ModelNotFound(p.model.clone()))?)
        }
    };
    match &p.version {
        Some(v) if *v != target.model().version => Err(ApiError::ModelNotFound(format!(
            "{} version {v} (the served version is {})",
            p.model,
            target.model().version
        ))),
        _ => Ok(target),
    }
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> Value {
    json!({ "name": name, "datatype": datatype, "shape": shape })
}

async fn model_metadata(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(p): Path<ModelPath>,
) -> Result<Response, OipError> {
    let target = resolve(&st, &who, &p)?;
    let m = target.model();
    let (c, h, w) = m.preprocessor.input_shape();
    let mut inputs = vec![tensor(IMAGE_INPUT, "BYTES", &[-1])];
    if let Target::Model(_) = target {
        inputs.push(tensor(TENSOR_INPUT, "FP32", &[-1, c as i64, h as i64, w as i64]));
    }
    let outputs: Vec<Value> = output_names(m.kind)
        .iter()
        .map(|&n| match n {
            "scores" => tensor(n, "FP32", &[-1, m.labels.len() as i64]),
            "anomaly_score" => tensor(n, "FP32", &[-1]),
            "anomaly_map" => tensor(n, "FP32", &[-1, -1, -1]),
            _ => tensor(n, "BYTES", &[-1]),
        })
        .collect();
    let platform = match (&target, m.kind) {
        (Target::Factory(_), _) => "lineside_factory",
        (_, ModelKind::Classifier) => "lineside_classifier",
        (_, ModelKind::Anomaly) => "lineside_anomaly",
    };
    Ok(axum::Json(json!({
        "name": p.model,
        "versions": [m.version],
        "platform": platform,
        "inputs": inputs,
        "outputs": outputs,
        "parameters": { "labels": m.labels, "model": m.name, "max_batch_size": max_elements(m) },
    }))
    .into_response())
}

async fn model_ready(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(p): Path<ModelPath>,
) -> Result<Response, OipError> {
    let target = resolve(&st, &who, &p)?;
    let ready = target.model().info().status == "ready" && !st.draining();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((status, axum::Json(json!({ "name": p.model, "ready": ready }))).into_response())
}

/// The outputs a kind of model gives, in order.
fn output_names(kind: ModelKind) -> &'static [&'static str] {
    match kind {
        ModelKind::Classifier => &["scores", "label", "verdict", "inspection"],
        ModelKind::Anomaly => &["anomaly_score", "anomaly_map", "label", "verdict", "inspection"],
    }
}

/// Most batch elements in one request: what the model admits at once.
fn max_elements(m: &ModelEntry) -> usize {
    m.config.queue_capacity + m.config.max_batch_size
}

/// The batch of one request.
enum Batch {
    Images(Vec<Bytes>),
    Tensors(Vec<Vec<f32>>),
}

impl Batch {
    fn len(&self) -> usize {
        match self {
            Batch::Images(v) => v.len(),
            Batch::Tensors(v) => v.len(),
        }
    }
}

/// Checks the request's one input against what `target` takes.
fn batch(req: InferRequest, target: &Target) -> Result<Batch, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let [input] = <[_; 1]>::try_from(req.inputs)
        .map_err(|v| bad(format!("send exactly one input (`{IMAGE_INPUT}` or `{TENSOR_INPUT}`), not {}", v.len())))?;
    let m = target.model();
    let batch = match (input.name.as_str(), input.data) {
        (IMAGE_INPUT, Data::Bytes(images)) => {
            if !(input.shape.len() == 1 || input.shape.len() == 2 && input.shape[1] == 1) {
                return Err(bad(format!("input `{IMAGE_INPUT}`: shape [N] or [N, 1], not {:?}", input.shape)));
            }
            Batch::Images(images)
        }
        (TENSOR_INPUT, Data::Fp32(values)) => {
            if let Target::Factory(f) = target {
                return Err(bad(format!(
                    "factory `{}` takes images (`{IMAGE_INPUT}`): its plugins work on pixels",
                    f.name
                )));
            }
            let (c, h, w) = m.preprocessor.input_shape();
            let ok = matches!(input.shape.as_slice(), [_, cc, hh, ww] if (*cc, *hh, *ww) == (c, h, w));
            if !ok {
                return Err(bad(format!("input `{TENSOR_INPUT}`: shape [N, {c}, {h}, {w}], not {:?}", input.shape)));
            }
            Batch::Tensors(values.chunks_exact(c * h * w).map(<[f32]>::to_vec).collect())
        }
        (name, data) => {
            let got = if matches!(data, Data::Bytes(_)) { "BYTES" } else { "FP32" };
            return Err(bad(format!(
                "input `{name}` ({got}): this model takes `{IMAGE_INPUT}` (BYTES) or `{TENSOR_INPUT}` (FP32)"
            )));
        }
    };
    if batch.len() == 0 || batch.len() > max_elements(m) {
        return Err(bad(format!("send 1 to {} batch elements, not {}", max_elements(m), batch.len())));
    }
    Ok(batch)
}

/// One batch element's answer.
struct Element {
    /// The model's whole output.
    raw: RawOutput,
    /// The `/v1` answer, as stored when records are on.
    answer: Value,
}

async fn infer(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, OipError> {
    let arrived = Instant::now();
    let target = match resolve(&st, &who, &p) {
        Ok(t) => t,
        Err(e) => return Err(crate::server::refuse_after_body(req, e).await.into()),
    };
    let body = crate::server::whole_body(req, st.server.body_limit_bytes).await?;
    let header_len = match headers.get(protocol::HEADER_LENGTH) {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
            ApiError::BadRequest(format!("{} must be a whole number of bytes", protocol::HEADER_LENGTH))
        })?),
    };
    // Parsing a large JSON tensor is CPU work: off the async workers.
    let request = tokio::task::spawn_blocking(move || protocol::parse_request(&body, header_len))
        .await
        .map_err(|e| ApiError::Internal(format!("parse task: {e}")))?
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let timeout = match request.timeout_us {
        Some(us) => Duration::from_micros(us.min(600_000_000)),
        None => crate::server::request_timeout(&headers, st.server.default_timeout_ms)?,
    };
    let (id, wanted, binary_output) = (request.id.clone(), request.outputs.clone(), request.binary_output);
    let model = target.model().clone();
    let names = output_names(model.kind);
    if let Some(unknown) = wanted.iter().flatten().find(|r| !names.contains(&r.name.as_str())) {
        let msg = format!("output `{}` is not produced here; outputs: {}", unknown.name, names.join(", "));
        return Err(ApiError::BadRequest(msg).into());
    }
    let batch = batch(request, &target)?;
    // Admission for every element before any work, as `/v1` does for one.
    let permits = (0..batch.len()).map(|_| model.try_admit()).collect::<Result<Vec<_>, _>>()?;
    let part = PartContext::from_headers(
        &headers,
        match &target {
            Target::Factory(f) => Some(f.name.as_str()),
            Target::Model(_) => who.factory(),
        },
    )
    .map(|p| PartContext { key: None, ..p })?;
    let elements = run_batch(&st, &target, batch, &headers, part, arrived + timeout).await?;
    drop(permits);
    let outputs = outputs(&model, &elements)?;
    let selected: Vec<Output> = match &wanted {
        None => outputs,
        // In the order they were asked for; moved, not copied (a batch of maps can be large).
        Some(w) => {
            let mut all: Vec<Option<Output>> = outputs.into_iter().map(Some).collect();
            w.iter()
                .filter_map(|r| all.iter_mut().find(|o| o.as_ref().is_some_and(|o| o.name == r.name))?.take())
                .collect()
        }
    };
    let binary = |name: &str| match &wanted {
        None => binary_output,
        Some(w) => w.iter().any(|r| r.name == name && r.binary),
    };
    let encoded = protocol::encode_response(&p.model, &model.version, id.as_deref(), &selected, binary);
    let mut resp = (StatusCode::OK, encoded.body).into_response();
    let content_type = if encoded.header_len.is_some() { "application/octet-stream" } else { "application/json" };
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(n) = encoded.header_len {
        resp.headers_mut().insert(protocol::HEADER_LENGTH, HeaderValue::from(n));
    }
    Ok(resp)
}

/// Runs every element concurrently (the batcher groups them), recording each
/// as `/v1` does. The request fails with the first element that fails.
async fn run_batch(
    st: &AppState,
    target: &Target,
    batch: Batch,
    headers: &HeaderMap,
    part: PartContext,
    deadline: Instant,
) -> Result<Vec<Element>, ApiError> {
    let model = target.model().clone();
    let opts = pipeline::Options {
        limits: st.server.decode_limits(),
        jpeg_decode: st.server.jpeg_decode,
        top_k: model.labels.len(),
        heatmap: false,
        retain_heatmap: st.records.is_some(),
        raw_outputs: true,
    };
    let mut tasks = Vec::with_capacity(batch.len());
    let mut spawn = |image: Bytes, run: std::pin::Pin<Box<dyn Future<Output = _> + Send>>| {
        let (records, part) = (st.records.clone(), part.clone());
        tasks.push(tokio::spawn(async move {
            let mut inspection: Inspection = run.await?;
            // The raw output is not part of the answer: taken out, the inspection moves into the record.
            let raw = inspection.raw.take().ok_or_else(|| ApiError::Internal("no raw model output".into()))?;
            let answer = match records {
                Some(r) => r.commit_answer(part, inspection, image).await?.into_value(),
                None => serde_json::to_value(&inspection).map_err(|e| ApiError::Internal(e.to_string()))?,
            };
            Ok::<_, ApiError>(Element { raw, answer })
        }));
    };
    match batch {
        Batch::Images(images) => {
            for image in images {
                let run: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match target {
                    Target::Factory(f) => {
                        let call =
                            pipeline::FactoryCall { factory: f.clone(), meta: crate::server::metadata(f, headers) };
                        Box::pin(pipeline::inspect_factory(call, image.clone(), deadline, opts))
                    }
                    Target::Model(m) => {
                        let (m, image) = (m.clone(), image.clone());
                        Box::pin(async move { pipeline::inspect(&m, image, deadline, opts).await })
                    }
                };
                spawn(image, run);
            }
        }
        Batch::Tensors(inputs) => {
            // All announced before any is queued, so that the batcher waits for
            // the rest of the request's tensors instead of running the first alone.
            let announced: Vec<_> = inputs.iter().map(|_| model.batcher.incoming()).collect();
            for (input, incoming) in inputs.into_iter().zip(announced) {
                let m = model.clone();
                spawn(
                    Bytes::new(),
                    Box::pin(async move { pipeline::infer_tensor(&m, incoming, input, deadline, opts).await }),
                );
            }
        }
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.map_err(|e| ApiError::Internal(format!("inference task: {e}")))??);
    }
    Ok(out)
}

/// Every output tensor, one row per element.
fn outputs(model: &ModelEntry, elements: &[Element]) -> Result<Vec<Output>, ApiError> {
    let n = elements.len();
    let text = |f: &dyn Fn(&Element) -> String| OutData::Bytes(elements.iter().map(|e| f(e).into_bytes()).collect());
    let mut outs = match model.kind {
        ModelKind::Classifier => {
            let mut scores = Vec::with_capacity(n * model.labels.len());
            for e in elements {
                match &e.raw {
                    RawOutput::Probabilities(p) => scores.extend_from_slice(p),
                    _ => return Err(ApiError::Internal("a classifier gave no probabilities".into())),
                }
            }
            vec![Output { name: "scores".into(), shape: vec![n, model.labels.len()], data: OutData::Fp32(scores) }]
        }
        ModelKind::Anomaly => {
            let (mut scores, mut maps, mut side) = (Vec::with_capacity(n), Vec::new(), 0);
            for e in elements {
                match (&e.raw, e.answer["anomaly_score"].as_f64()) {
                    (RawOutput::AnomalyMap { size, values }, Some(score)) => {
                        scores.push(score as f32);
                        maps.extend_from_slice(values);
                        side = *size;
                    }
                    _ => return Err(ApiError::Internal("an anomaly model gave no map".into())),
                }
            }
            vec![
                Output { name: "anomaly_score".into(), shape: vec![n], data: OutData::Fp32(scores) },
                Output { name: "anomaly_map".into(), shape: vec![n, side, side], data: OutData::Fp32(maps) },
            ]
        }
    };
    outs.push(Output {
        name: "label".into(),
        shape: vec![n],
        data: text(&|e| e.answer["label"].as_str().unwrap_or_default().to_string()),
    });
    outs.push(Output {
        name: "verdict".into(),
        shape: vec![n],
        data: text(&|e| e.answer["verdict"].as_str().unwrap_or_default().to_string()),
    });
    outs.push(Output { name: "inspection".into(), shape: vec![n], data: text(&|e| e.answer.to_string()) });
    Ok(outs)
}
