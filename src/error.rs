//! API errors: each has an HTTP status, a stable machine-readable code and
//! a message, sent as `{"error":{"code","message"}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lineside_inference::batcher::{JobError, ModelStatus, SubmitError};
use lineside_plugins::{Failure, PluginError};
use serde::Serialize;

/// An error answered to an API client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("the image could not be decoded: {0}")]
    InvalidImage(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("image dimensions exceed the limits: {0}")]
    ImageTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("model `{0}` is not served here")]
    ModelNotFound(String),
    #[error("model `{model}` is overloaded: {reason}")]
    Overloaded { model: String, reason: String },
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("unavailable: {0}")]
    ModelUnavailable(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    /// The admin API is turned off.
    #[error("{0}")]
    Forbidden(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    Denied(String),
    #[error("fit failed: {0}")]
    FitFailed(String),
    #[error("the new version cannot be loaded; the served version stays: {0}")]
    LoadFailed(String),
    #[error("the model hub cannot be reached and the files are not cached; the served version stays: {0}")]
    HubUnavailable(String),
    #[error("factory `{0}` is not configured here")]
    FactoryNotFound(String),
    #[error("factory `{factory}`: {error}")]
    Plugin { factory: String, error: PluginError },
    #[error("factory `{factory}`: plugin reload failed, the previous version keeps serving: {message}")]
    PluginLoad { factory: String, message: String },
    #[error(
        "the inspection ran but its record could not be stored, so it is not acknowledged; retry (with the same Idempotency-Key): {0}"
    )]
    RecordFailed(String),
    #[error("inspection `{0}` is not in the record store")]
    InspectionNotFound(String),
    #[error("inspection records are turned off (records.enabled = false)")]
    RecordsDisabled,
    #[error("{0}")]
    Gone(String),
    #[error("the record store failed: {0}")]
    Store(String),
}

/// Every `/v1` error: `{"error": {"code", "message"}}`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct Body<'a> {
    error: Detail<'a>,
}

/// An error's stable code (branch on it) and message (show it).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorDetail)]
pub struct Detail<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    factory: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plugin: Option<&'a str>,
}

impl ApiError {
    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidImage(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } | ApiError::ImageTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady(_) | ApiError::ModelUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::FactoryNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::Denied(_) => StatusCode::FORBIDDEN,
            ApiError::FitFailed(_) | ApiError::LoadFailed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::HubUnavailable(_) => StatusCode::BAD_GATEWAY,
            // The plugin judged the input unusable (an ROI outside the image, say).
            ApiError::Plugin { error, .. } if error.failure == Failure::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Plugin { error, .. } if error.failure == Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            // The factory's code misbehaved: the server is fine, its plugin is not.
            ApiError::Plugin { .. } => StatusCode::BAD_GATEWAY,
            ApiError::PluginLoad { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RecordFailed(_) | ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::InspectionNotFound(_) | ApiError::RecordsDisabled => StatusCode::NOT_FOUND,
            ApiError::Gone(_) => StatusCode::GONE,
        }
    }

    /// Stable code for clients to branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidImage(_) => "invalid_image",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::ImageTooLarge(_) => "image_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::RouteNotFound(_) => "not_found",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::NotReady(_) => "not_ready",
            ApiError::ModelUnavailable(_) => "model_unavailable",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::DeadlineExceeded(_) => "deadline_exceeded",
            ApiError::Internal(_) => "internal",
            ApiError::FactoryNotFound(_) => "factory_not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "admin_disabled",
            ApiError::Denied(_) => "forbidden",
            ApiError::FitFailed(_) => "fit_failed",
            ApiError::LoadFailed(_) => "load_failed",
            ApiError::HubUnavailable(_) => "hub_unavailable",
            ApiError::Plugin { error, .. } => match error.failure {
                Failure::Timeout => "plugin_timeout",
                Failure::MemoryLimit => "plugin_memory_limit",
                Failure::StackOverflow => "plugin_stack_overflow",
                Failure::Trap => "plugin_trap",
                Failure::InvalidOutput => "plugin_invalid_output",
                Failure::OutputTooLarge => "plugin_output_too_large",
                Failure::Rejected => "plugin_error",
                Failure::Unavailable => "plugin_unavailable",
            },
            ApiError::PluginLoad { .. } => "plugin_load_failed",
            ApiError::RecordFailed(_) => "record_failed",
            ApiError::Store(_) => "store_unavailable",
            ApiError::InspectionNotFound(_) => "inspection_not_found",
            ApiError::RecordsDisabled => "records_disabled",
            ApiError::Gone(_) => "gone",
        }
    }

    /// Maps a batcher refusal for `model`.
    pub fn from_submit(model: &str, e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded { .. } => ApiError::Overloaded { model: model.into(), reason: e.to_string() },
            SubmitError::NotReady(ModelStatus::Loading) => ApiError::NotReady(format!("model `{model}` is loading")),
            SubmitError::NotReady(status) => ApiError::ModelUnavailable(format!("model `{model}`: {status:?}")),
            SubmitError::BadInput { .. } => ApiError::Internal(e.to_string()),
        }
    }

    /// Maps a failure of a queued request.
    pub fn from_job(model: &str, e: JobError) -> Self {
        match e {
            JobError::DeadlineExceeded { .. } => ApiError::DeadlineExceeded(format!("model `{model}`: {e}")),
            JobError::Inference(m) => ApiError::Internal(m),
        }
    }

    /// Maps a failure to fetch or read a new model version.
    pub fn from_load(e: &anyhow::Error) -> Self {
        let message = format!("{e:#}");
        match e.downcast_ref::<crate::hub::HubError>() {
            Some(h) if h.is_unavailable() => ApiError::HubUnavailable(message),
            _ => ApiError::LoadFailed(message),
        }
    }

    /// Maps an error from decoding or preprocessing.
    pub fn from_image(e: lineside_inference::Error) -> Self {
        use lineside_inference::Error as E;
        match e {
            E::ImageTooLarge(m) => ApiError::ImageTooLarge(m),
            E::UnsupportedFormat(m) => ApiError::UnsupportedMediaType(format!("image format {m} is not accepted")),
            E::Decode(m) => ApiError::InvalidImage(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error()
            && (status != StatusCode::SERVICE_UNAVAILABLE
                || matches!(self, ApiError::RecordFailed(_) | ApiError::Store(_)))
        {
            tracing::error!(code = self.code(), error = %self, "request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "request refused");
        }
        let (factory, plugin) = match &self {
            ApiError::Plugin { factory, error } => (Some(factory.as_str()), Some(error.plugin.as_str())),
            ApiError::PluginLoad { factory, .. } | ApiError::FactoryNotFound(factory) => (Some(factory.as_str()), None),
            _ => (None, None),
        };
        let body = Body { error: Detail { code: self.code(), message: self.to_string(), factory, plugin } };
        let mut resp = (status, Json(body)).into_response();
        if matches!(self, ApiError::Overloaded { .. } | ApiError::NotReady(_)) {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
