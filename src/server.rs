//! The HTTP API (axum): routes, request limits and body handling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Access, Principal};
use crate::config::{Config, ServerConfig};
use crate::error::ApiError;
use crate::factories::{Factories, Factory};
use crate::inspections;
use crate::pipeline;
use crate::records::{PartContext, Records};
use crate::registry::{ModelEntry, ModelInfo, ModelKind, Registry};
use crate::source::{LocalModel, ModelSource};
use lineside_inference::ComputeDevice;
use lineside_plugins::Metadata;
use tokio::sync::OwnedSemaphorePermit;

/// Header carrying a per-request deadline in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// Content types accepted as a raw image body (the format is sniffed from the bytes).
const IMAGE_TYPES: &[&str] = &[
    "image/jpeg",
    "image/jpg",
    "image/png",
    "image/bmp",
    "image/x-ms-bmp",
    "image/tiff",
    "image/webp",
    "application/octet-stream",
];

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    /// Held while an anomaly model is being fitted: one fit at a time.
    pub fitting: Arc<tokio::sync::Mutex<()>>,
    pub factories: Arc<Factories>,
    pub server: Arc<ServerConfig>,
    pub metrics: PrometheusHandle,
    /// The record store; `None` when `records.enabled = false`.
    pub records: Option<Arc<Records>>,
    /// API keys and the admin token.
    pub access: Arc<Access>,
    /// Set once shutdown has begun: readiness answers 503 so balancers move away.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

impl AppState {
    /// Whether shutdown has begun.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// All routes.
pub fn router(state: AppState) -> Router {
    let limit = state.server.body_limit_bytes;
    // Everything but health, readiness and the static UI needs to know its caller.
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/inspect", post(inspect))
        .route("/v1/models/{name}", get(get_model).put(put_model))
        .route("/v1/models/{name}/rollback", post(rollback_model))
        .route("/v1/models/{name}/fit", post(fit_model))
        .route("/v1/factories", get(list_factories))
        .route("/v1/factories/{factory}/inspect", post(inspect_factory))
        .route("/v1/factories/{factory}/reload", post(reload_factory))
        .route("/v1/inspections", get(inspections::list))
        .route("/v1/inspections/{id}", get(inspections::get))
        .route("/v1/inspections/{id}/image", get(inspections::image))
        .route("/v1/inspections/{id}/heatmap", get(inspections::heatmap))
        .route("/v1/inspections/{id}/review", post(inspections::review))
        .route("/v1/stats", get(inspections::stats))
        .merge(crate::oip::model_routes())
        .route_layer(axum::middleware::from_fn_with_state(state.access.clone(), crate::auth::authenticate));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(crate::oip::public_routes())
        .merge(crate::openapi::routes())
        .merge(api)
        .merge(crate::ui::routes())
        .route_layer(axum::middleware::from_fn(crate::metrics::track))
        .fallback(|uri: Uri| async move { ApiError::RouteNotFound(uri.path().to_string()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::Internal("handler panicked".into()).into_response()
        }))
        .with_state(state)
}

/// Starts the models and serves until `shutdown` resolves.
pub async fn serve(
    cfg: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = crate::metrics::handle();
    crate::preprocess_pool::configure(cfg.server.preprocess_pool())?;
    let hub = crate::hub::Hub::new(&cfg.hub)?;
    let integrity = crate::integrity::Integrity::from_config(&cfg.integrity)?;
    let registry = Arc::new(Registry::start(&cfg.models, hub, integrity).await?);
    let access = Arc::new(Access::from_config(&cfg)?);
    let factories = Arc::new(Factories::load(&cfg, &registry)?);
    factories.watch(Duration::from_millis(cfg.plugins.watch_interval_ms));
    let records = match cfg.records.enabled {
        true => Some(Records::open(&cfg.records).await?),
        false => {
            tracing::warn!("inspection records are off (records.enabled = false): answers are not stored");
            None
        }
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        models = cfg.models.len(),
        factories = cfg.factories.len(),
        cpu_kernels = cpu_kernels(),
        jpeg_simd = lineside_inference::preprocess::jpeg_simd(),
        "listening; models loading"
    );
    if !lineside_inference::preprocess::jpeg_simd() {
        tracing::warn!(
            "libjpeg-turbo runs without its SIMD code (built without nasm): JPEG decoding is slower; \
             install nasm, then `cargo clean -p mozjpeg-sys` and rebuild"
        );
    }
    let grace = Duration::from_secs(cfg.server.shutdown_grace_s);
    let tls = cfg.tls.clone();
    let state = AppState {
        registry,
        fitting: Default::default(),
        factories,
        server: Arc::new(cfg.server),
        metrics,
        records: records.clone(),
        access,
        draining: Default::default(),
    };
    let draining = state.draining.clone();
    let signalled = Arc::new(tokio::sync::Notify::new());
    let stop_accepting = {
        let signalled = signalled.clone();
        async move {
            shutdown.await;
            draining.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                grace_s = grace.as_secs(),
                "shutting down: no new connections; finishing in-flight requests"
            );
            signalled.notify_one();
        }
    };
    // In-flight requests get `grace` to finish once the signal comes; past it they are cut off.
    let deadline = async move {
        signalled.notified().await;
        tokio::time::sleep(grace).await;
    };
    let app = router(state);
    match &tls {
        Some(t) => serve_until(crate::tls::TlsListener::new(listener, t)?, app, stop_accepting, deadline).await?,
        None => serve_until(listener, app, stop_accepting, deadline).await?,
    }
    if let Some(r) = records {
        // Commits already acknowledged are durable; this lets the writer finish its last group.
        r.store().close().await;
        tracing::info!("record store closed");
    }
    Ok(())
}

/// Serves `app` on `listener` until `stop_accepting` resolves and the
/// requests in flight are done, or until `deadline`.
async fn serve_until<L>(
    listener: L,
    app: Router,
    stop_accepting: impl std::future::Future<Output = ()> + Send + 'static,
    deadline: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let serving = axum::serve(listener, app).with_graceful_shutdown(stop_accepting);
    tokio::select! {
        r = serving => r,
        _ = deadline => {
            tracing::warn!("requests still running after the shutdown grace period were cut off");
            Ok(())
        }
    }
}

/// The instruction set the channels-last convolution kernels run on, for
/// the start-up log: a slow server on an unexpected CPU shows why at once.
fn cpu_kernels() -> &'static str {
    use lineside_inference::ops::simd::Isa;
    match Isa::detect() {
        Some(Isa::Avx512) => "avx512",
        Some(Isa::Avx2) => "avx2",
        None => "none",
    }
}

#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, description = "the process is up")))]
async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/ready", tag = "health", responses((status = 200, description = "every model is loaded and warm"), (status = 503, description = "loading, failed or draining")))]
async fn ready(State(st): State<AppState>) -> Response {
    let models: Vec<ModelInfo> = st.registry.all().iter().map(|m| m.info()).collect();
    let ready = st.registry.all_ready() && !st.draining();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let state = match (ready, st.draining()) {
        (true, _) => "ready",
        (false, true) => "draining",
        (false, false) => "not_ready",
    };
    let models: Vec<_> = models.iter().map(|m| json!({"name": m.name, "status": m.status, "error": m.error})).collect();
    (status, Json(json!({"status": state, "models": models}))).into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "health", security((), ("bearer" = []), ("api_key" = [])), responses((status = 200, description = "Prometheus text format", content_type = "text/plain"), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
async fn metrics(State(st): State<AppState>, Extension(who): Extension<Principal>) -> Result<Response, ApiError> {
    who.may_read_metrics(&st.access)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response())
}

#[utoipa::path(get, path = "/v1/models", tag = "models", security((), ("bearer" = []), ("api_key" = [])), responses((status = 200, description = "`{default, models: [ModelInfo]}`: the models this caller may use"), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
async fn list_models(State(st): State<AppState>, Extension(who): Extension<Principal>) -> Json<serde_json::Value> {
    let models: Vec<ModelInfo> =
        st.registry.all().iter().filter(|m| who.sees_model(&m.name)).map(|m| m.info()).collect();
    Json(json!({"default": st.server.default_model, "models": models}))
}

#[derive(Deserialize)]
struct InspectQuery {
    model: Option<String>,
    /// `png`: attach heatmap and mask PNGs (anomaly models).
    heatmap: Option<String>,
}

#[derive(Deserialize)]
struct FactoryQuery {
    heatmap: Option<String>,
}

fn options(st: &AppState, heatmap: Option<&str>) -> Result<pipeline::Options, ApiError> {
    let server = &st.server;
    let heatmap = match heatmap {
        None | Some("none") => false,
        Some("png") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!("heatmap=`{other}`: the accepted values are `png` and `none`")));
        }
    };
    Ok(pipeline::Options {
        limits: server.decode_limits(),
        jpeg_decode: server.jpeg_decode,
        top_k: server.top_k,
        heatmap,
        retain_heatmap: st.records.is_some(),
        raw_outputs: false,
    })
}

#[utoipa::path(post, path = "/v1/inspect", tag = "inspect", security((), ("bearer" = []), ("api_key" = [])),
    params(
        ("model" = Option<String>, Query, description = "a configured model (default: server.default_model)"),
        ("heatmap" = Option<String>, Query, description = "`png`: attach heatmap and mask PNGs (anomaly models)"),
        ("X-Request-Timeout-Ms" = Option<u64>, Header, description = "deadline for this request"),
        ("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key gets the stored answer"),
        ("X-Line-Id" = Option<String>, Header, description = "recorded with the inspection"),
        ("X-Part-Id" = Option<String>, Header, description = "recorded; with X-Capture-Id also an idempotency key"),
        ("X-Capture-Id" = Option<String>, Header, description = "recorded"),
    ),
    request_body(content = Vec<u8>, description = "an encoded image (JPEG, PNG, BMP, TIFF, WebP), raw or as the `image` field of multipart/form-data", content_type = "image/jpeg"),
    responses(
        (status = 200, description = "the inspection, as recorded", body = crate::pipeline::Inspection),
        (status = 400, description = "undecodable image or bad parameters", body = crate::error::Body),
        (status = 409, description = "the same idempotency key is still running", body = crate::error::Body),
        (status = 413, description = "body or image dimensions over the limits", body = crate::error::Body),
        (status = 415, description = "not an image", body = crate::error::Body),
        (status = 429, description = "the model is full; retry after `Retry-After`", body = crate::error::Body),
        (status = 503, description = "loading, or the record could not be stored", body = crate::error::Body),
        (status = 504, description = "deadline passed", body = crate::error::Body),
        (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body),
    ))]
async fn inspect(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    query: Result<Query<InspectQuery>, QueryRejection>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let opts = options(&st, q.heatmap.as_deref())?;
    let name = q.model.unwrap_or_else(|| st.server.default_model.clone());
    if let Err(e) = who.may_use_model(&name) {
        return Err(refuse_after_body(req, e).await);
    }
    let model = st.registry.get(&name).ok_or(ApiError::ModelNotFound(name))?;
    // A factory key's inspections are its factory's records.
    let part = PartContext::from_headers(&headers, who.factory())?;
    // The body is read first even for a replay: answering over unread data can reset the connection.
    let (_permit, body, deadline) = admit(&st, &model, &headers, arrived, req).await?;
    let (_claim, replay) = idempotency(&st, &part).await?;
    if let Some(r) = replay {
        return Ok(r);
    }
    let result = pipeline::inspect(&model, body.clone(), deadline, opts).await?;
    let response = answer(&st, part, result, body).await?;
    observe(&model, arrived);
    Ok(response)
}

/// A stored answer for a retried idempotency key, or a claim on the key for
/// this request (409 while another request holds it).
async fn idempotency(
    st: &AppState,
    part: &PartContext,
) -> Result<(Option<crate::records::Claim>, Option<Response>), ApiError> {
    let Some(records) = &st.records else { return Ok((None, None)) };
    if let Some(r) = records.replay(part).await? {
        return Ok((None, Some(r)));
    }
    let claim = records.claim(part)?;
    // The first request may have committed between the lookup and the claim.
    if claim.is_some()
        && let Some(r) = records.replay(part).await?
    {
        return Ok((None, Some(r)));
    }
    Ok((claim, None))
}

/// Records the inspection (when records are on) and builds the answer.
async fn answer(
    st: &AppState,
    part: PartContext,
    result: pipeline::Inspection,
    body: Bytes,
) -> Result<Response, ApiError> {
    match &st.records {
        Some(records) => records.commit(part, result, body).await,
        None => Ok(Json(result).into_response()),
    }
}

/// Answers `err` once the request body is read: refusing mid-upload resets
/// the connection and the client never sees why.
pub(crate) async fn refuse_after_body(req: Request, err: ApiError) -> ApiError {
    drain(req.into_body()).await;
    err
}

#[utoipa::path(get, path = "/v1/models/{name}", tag = "models", security((), ("bearer" = []), ("api_key" = [])), params(("name" = String, Path)), responses((status = 200, description = "`{model: ModelInfo, versions: VersionInfo}`"), (status = 404, body = crate::error::Body), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
/// A model and the versions around it.
async fn get_model(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    who.may_use_model(&name)?;
    let model = st.registry.get(&name).ok_or_else(|| ApiError::ModelNotFound(name.clone()))?;
    Ok(Json(json!({ "model": model.info(), "versions": st.registry.versions(&name) })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutModel {
    /// `hf://owner/name[@revision]`, a timm hub-format folder, a PatchCore folder or `builtin:NAME`.
    source: String,
    /// A branch, tag or commit of a hub source (or give it as `@revision` in `source`).
    revision: Option<String>,
    /// The new version's digest (`lineside models digest`); replaces the configured pin.
    sha256: Option<String>,
    /// `cpu`, `cuda` or `cuda:N` (a `--features cuda` build); default: the
    /// served version's device, or the CPU for a new model.
    #[schema(value_type = Option<String>)]
    device: Option<ComputeDevice>,
}

#[utoipa::path(put, path = "/v1/models/{name}", tag = "admin", security(("bearer" = [])), params(("name" = String, Path)), request_body = PutModel,
    responses((status = 202, description = "`{model, pending_version, source}`: loading beside the served version"), (status = 400, body = crate::error::Body), (status = 422, description = "the files cannot be loaded or fail their pin or signature", body = crate::error::Body), (status = 502, description = "hub unreachable and not cached", body = crate::error::Body), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
/// Loads a new version of `name` next to the served one and swaps it in when
/// it is warm (202 at once; `GET /v1/models/{name}` shows progress).
async fn put_model(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Json<PutModel>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    who.require_admin(&st.access, &format!("PUT model {name}"))?;
    let Json(put) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if !crate::fit::valid_name(&name) {
        return Err(ApiError::BadRequest(format!("model name `{name}`: use 1-64 letters, digits, `-` and `_`")));
    }
    let mut source = ModelSource::parse(&put.source).map_err(|e| ApiError::BadRequest(format!("{e:#}")))?;
    if let Some(rev) = &put.revision {
        source = source.at_revision(rev).map_err(|e| ApiError::BadRequest(format!("{e:#}")))?;
    }
    let source = source.to_string();
    let mut cfg = match st.registry.get(&name) {
        Some(m) => crate::config::ModelConfig { source: source.clone(), ..m.config.clone() },
        None => crate::config::ModelConfig::new(&name, &source),
    };
    if put.sha256.is_some() {
        cfg.sha256 = put.sha256.clone();
    }
    if let Some(device) = put.device {
        device.check_supported().map_err(|e| ApiError::BadRequest(e.to_string()))?;
        cfg.device = device;
    }
    tracing::info!(model = %name, %source, "fetching a new version");
    // A task of its own, so a client hanging up mid-download does not cancel it.
    let registry = st.registry.clone();
    let version = tokio::spawn(async move { registry.stage(cfg).await })
        .await
        .map_err(|e| ApiError::Internal(format!("load task: {e}")))?
        .map_err(|e| ApiError::from_load(&e))?;
    tracing::info!(model = %name, %version, %source, "loading a new version");
    Ok((StatusCode::ACCEPTED, Json(json!({ "model": name, "pending_version": version, "source": source })))
        .into_response())
}

#[utoipa::path(post, path = "/v1/models/{name}/rollback", tag = "admin", security(("bearer" = [])), params(("name" = String, Path)), responses((status = 200, description = "`{model, versions}`"), (status = 409, description = "no previous version", body = crate::error::Body), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
/// Serves the previous version again.
async fn rollback_model(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    who.require_admin(&st.access, &format!("rollback model {name}"))?;
    let entry = st
        .registry
        .rollback(&name)
        .ok_or_else(|| ApiError::Conflict(format!("model `{name}` has no previous version to roll back to")))?;
    tracing::info!(model = %name, version = %entry.version, "rolled back");
    Ok(Json(json!({ "model": entry.info(), "versions": st.registry.versions(&name) })))
}

#[derive(Deserialize)]
struct FitQuery {
    backbone: Option<String>,
    coreset_ratio: Option<f32>,
    image_size: Option<usize>,
}

#[utoipa::path(post, path = "/v1/models/{name}/fit", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path), ("backbone" = Option<String>, Query), ("coreset_ratio" = Option<f32>, Query), ("image_size" = Option<usize>, Query)),
    request_body(content = Vec<u8>, description = "multipart/form-data with at least 5 `image` fields of good parts", content_type = "multipart/form-data"),
    responses((status = 201, description = "`{model: ModelInfo, fit}`"), (status = 400, body = crate::error::Body), (status = 409, description = "another fit is running", body = crate::error::Body), (status = 422, body = crate::error::Body), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
/// Fits an anomaly model from the good images in a multipart body (`image`
/// fields), saves it under `server.model_dir` and serves it as `name`.
async fn fit_model(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    query: Result<Query<FitQuery>, QueryRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let authorized = who.require_admin(&st.access, &format!("fit model {name}"));
    // Read the body before refusing anything: answering mid-upload resets the
    // connection and the client never sees the error.
    let images = multipart_images(req).await;
    authorized?;
    let images = images?;
    if !crate::fit::valid_name(&name) {
        return Err(ApiError::BadRequest(format!("model name `{name}`: use 1-64 letters, digits, `-` and `_`")));
    }
    if st.registry.get(&name).is_some_and(|m| m.kind != ModelKind::Anomaly) {
        return Err(ApiError::Conflict(format!("model `{name}` is a configured classifier; fit under another name")));
    }
    let coreset_ratio = q.coreset_ratio.unwrap_or(0.1);
    let image_size = q.image_size.unwrap_or(224);
    let valid = coreset_ratio > 0.0 && coreset_ratio <= 1.0 && (32..=1024).contains(&image_size);
    if !valid {
        return Err(ApiError::BadRequest("coreset_ratio must be in (0, 1] and image_size in 32..=1024".into()));
    }
    let Ok(_guard) = st.fitting.clone().try_lock_owned() else {
        return Err(ApiError::Conflict("another fit is running; retry when it is done".into()));
    };
    if images.len() < 5 {
        return Err(ApiError::BadRequest(format!(
            "send at least 5 good images as `image` fields, got {}",
            images.len()
        )));
    }
    let backbone = q.backbone.unwrap_or_else(|| st.server.fit_backbone.clone());
    let backbone = ModelSource::parse(&backbone).map_err(|e| ApiError::BadRequest(format!("{e:#}")))?;
    let backbone = LocalModel::resolve(backbone, st.registry.hub(), crate::hub::Want::Serve)
        .await
        .map_err(|e| ApiError::FitFailed(format!("{e:#}")))?;
    let fit = crate::fit::FitRequest { name: name.clone(), backbone, coreset_ratio, image_size, images };
    let dir = st.server.model_dir.clone();
    let (path, manifest) = tokio::task::spawn_blocking(move || crate::fit::fit_and_save(&fit, &dir))
        .await
        .map_err(|e| ApiError::Internal(format!("fit task: {e}")))?
        .map_err(|e| ApiError::FitFailed(format!("{e:#}")))?;
    let source = ModelSource::Folder(path.clone());
    let local = LocalModel::resolve(source, st.registry.hub(), crate::hub::Want::Serve)
        .await
        .map_err(|e| ApiError::FitFailed(format!("{e:#}")))?;
    let entry = st
        .registry
        .add(&crate::config::ModelConfig::new(&name, &path.display().to_string()), &local)
        .map_err(|e| ApiError::FitFailed(format!("{e:#}")))?;
    tracing::info!(model = %name, path = %path.display(), bank = manifest.memory_bank_size, "anomaly model fitted");
    Ok((StatusCode::CREATED, Json(json!({ "model": entry.info(), "fit": manifest }))).into_response())
}

/// Every `image` field of a multipart body.
async fn multipart_images(req: Request) -> Result<Vec<Bytes>, ApiError> {
    let mut mp = Multipart::from_request(req, &()).await.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let mut images = Vec::new();
    while let Some(field) = mp.next_field().await.map_err(|e| ApiError::BadRequest(e.body_text()))? {
        if field.name() == Some("image") {
            images.push(field.bytes().await.map_err(|e| ApiError::BadRequest(e.body_text()))?);
        }
    }
    Ok(images)
}

#[utoipa::path(get, path = "/v1/factories", tag = "factories", security((), ("bearer" = []), ("api_key" = [])), responses((status = 200, description = "`{factories: [FactoryInfo]}`: the factories this caller may use"), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
async fn list_factories(State(st): State<AppState>, Extension(who): Extension<Principal>) -> Json<serde_json::Value> {
    let factories: Vec<_> = st.factories.all().filter(|f| who.sees_factory(&f.name)).map(|f| f.info()).collect();
    Json(json!({ "factories": factories }))
}

#[utoipa::path(post, path = "/v1/factories/{factory}/inspect", tag = "inspect", security((), ("bearer" = []), ("api_key" = [])),
    params(("factory" = String, Path), ("heatmap" = Option<String>, Query), ("X-Request-Timeout-Ms" = Option<u64>, Header), ("Idempotency-Key" = Option<String>, Header), ("X-Line-Id" = Option<String>, Header), ("X-Part-Id" = Option<String>, Header), ("X-Capture-Id" = Option<String>, Header)),
    request_body(content = Vec<u8>, description = "an encoded image, raw or multipart `image`", content_type = "image/jpeg"),
    responses((status = 200, description = "the inspection with the factory's defects and plugin runs", body = crate::pipeline::Inspection), (status = 404, body = crate::error::Body), (status = 422, description = "a plugin rejected the input", body = crate::error::Body), (status = 502, description = "a plugin failed", body = crate::error::Body), (status = 504, description = "a plugin or the model ran out of time", body = crate::error::Body), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
async fn inspect_factory(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    query: Result<Query<FactoryQuery>, QueryRejection>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    if let Err(e) = who.may_use_factory(&name) {
        return Err(refuse_after_body(req, e).await);
    }
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let opts = options(&st, q.heatmap.as_deref())?;
    let factory = st.factories.get(&name).ok_or(ApiError::FactoryNotFound(name))?;
    let part = PartContext::from_headers(&headers, Some(&factory.name))?;
    let (_permit, body, deadline) = admit(&st, &factory.model, &headers, arrived, req).await?;
    let (_claim, replay) = idempotency(&st, &part).await?;
    if let Some(r) = replay {
        return Ok(r);
    }
    let meta = metadata(&factory, &headers);
    let call = pipeline::FactoryCall { factory: factory.clone(), meta };
    let result = pipeline::inspect_factory(call, body.clone(), deadline, opts).await?;
    let response = answer(&st, part, result, body).await?;
    observe(&factory.model, arrived);
    Ok(response)
}

/// What plugins may see of a request: the factory, line and part ids, and allowed headers.
pub(crate) fn metadata(factory: &Factory, headers: &HeaderMap) -> Metadata {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let allowed = factory.allowed_headers.iter().filter_map(|h| Some((h.clone(), text(h)?))).collect();
    Metadata { factory: factory.name.clone(), line: text("x-line-id"), part_id: text("x-part-id"), headers: allowed }
}

#[utoipa::path(post, path = "/v1/factories/{factory}/reload", tag = "admin", security(("bearer" = [])), params(("factory" = String, Path)), responses((status = 200, description = "`{factory: FactoryInfo}`"), (status = 422, description = "a plugin file failed to load; the previous version keeps serving", body = crate::error::Body), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
/// Reloads a factory's plugin files now (the watcher does the same on change).
async fn reload_factory(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    who.require_admin(&st.access, &format!("reload factory {name}"))?;
    let factory = st.factories.get(&name).ok_or_else(|| ApiError::FactoryNotFound(name.clone()))?;
    let f = factory.clone();
    let errors = tokio::task::spawn_blocking(move || {
        f.slots().filter_map(|s| s.reload().err().map(|e| format!("{}: {e}", s.path().display()))).collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("reload task: {e}")))?;
    if !errors.is_empty() {
        return Err(ApiError::PluginLoad { factory: name, message: errors.join("; ") });
    }
    Ok(Json(json!({ "factory": factory.info() })).into_response())
}

/// The steps every inspection route shares: its deadline, admission (overload
/// is refused before anything is read or decoded; the permit lives until the
/// answer) and the image body.
async fn admit(
    st: &AppState,
    model: &ModelEntry,
    headers: &HeaderMap,
    arrived: Instant,
    req: Request,
) -> Result<(OwnedSemaphorePermit, Bytes, Instant), ApiError> {
    let deadline = arrived + request_timeout(headers, st.server.default_timeout_ms)?;
    let permit = model.try_admit()?;
    let body = read_image(req, st.server.body_limit_bytes).await?;
    Ok((permit, body, deadline))
}

fn observe(model: &ModelEntry, arrived: Instant) {
    metrics::histogram!("lineside_inspection_seconds", "model" => model.name.clone())
        .record(arrived.elapsed().as_secs_f64());
}

pub(crate) fn request_timeout(headers: &HeaderMap, default_ms: u64) -> Result<Duration, ApiError> {
    let Some(v) = headers.get(TIMEOUT_HEADER) else { return Ok(Duration::from_millis(default_ms)) };
    let ms: u64 = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| ApiError::BadRequest(format!("{TIMEOUT_HEADER} must be a whole number of milliseconds")))?;
    Ok(Duration::from_millis(ms.min(600_000)))
}

/// Bodies up to this multiple of the limit are read and discarded before a 413.
const DRAIN_FACTOR: usize = 4;

/// Reads and discards a body (for at most 10 s), so an early answer is not lost to a reset.
pub(crate) async fn drain(body: axum::body::Body) {
    use http_body_util::BodyExt;
    let mut body = body;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, body.frame()).await {}
}

/// Refuses a body whose declared length is over `limit` (413).
pub(crate) async fn refuse_oversize(req: Request, limit: usize) -> Result<Request, ApiError> {
    let declared_len = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if let Some(n) = declared_len.filter(|&n| n > limit) {
        // Reading the body before answering lets the client see the 413: closing
        // a socket with unread data sends a reset that can destroy the response.
        // Past a cap the connection is simply dropped.
        if n <= limit.saturating_mul(DRAIN_FACTOR) {
            drain(req.into_body()).await;
        }
        return Err(ApiError::PayloadTooLarge { limit });
    }
    Ok(req)
}

/// A whole body of at most `limit` bytes.
pub(crate) async fn whole_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let req = refuse_oversize(req, limit).await?;
    Bytes::from_request(req, &()).await.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
        _ => ApiError::BadRequest(e.body_text()),
    })
}

/// The image bytes of a raw image body or of the `image` field of a
/// multipart body: 413 over `limit`, 415 for other content types, 400 for a
/// malformed multipart body.
pub async fn read_image(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let req = refuse_oversize(req, limit).await?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
    let too_large = |status: StatusCode, text: String| {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::BadRequest(text)
        }
    };
    match content_type.as_deref() {
        Some("multipart/form-data") => {
            let mut mp = Multipart::from_request(req, &()).await.map_err(|e| too_large(e.status(), e.body_text()))?;
            while let Some(field) = mp.next_field().await.map_err(|e| too_large(e.status(), e.body_text()))? {
                if field.name() == Some("image") {
                    return field.bytes().await.map_err(|e| too_large(e.status(), e.body_text()));
                }
            }
            Err(ApiError::BadRequest("multipart body has no `image` field".into()))
        }
        None => Bytes::from_request(req, &()).await.map_err(|e| too_large(e.status(), e.body_text())),
        Some(ct) if IMAGE_TYPES.contains(&ct) => {
            Bytes::from_request(req, &()).await.map_err(|e| too_large(e.status(), e.body_text()))
        }
        Some(other) => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type `{other}` is not accepted; send an image (image/jpeg, image/png, image/bmp, image/tiff, \
             image/webp or application/octet-stream) or multipart/form-data with an `image` field"
        ))),
    }
}
