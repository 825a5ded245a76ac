//! The `/v1` API described as OpenAPI 3.1, generated from the handlers'
//! annotations (utoipa), served at `/openapi.json` with a reading page at
//! `/docs` that works offline (no CDN: plant networks often have none).

use axum::Json;
use axum::Router;
use axum::routing::get;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::server::AppState;

/// The whole document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "lineside",
        description = "Edge inspection API: POST a part image, get a verdict. Errors are `{\"error\": {\"code\", \"message\"}}`. \
                       The Open Inference Protocol (KServe v2) is served beside it under /v2 (docs/oip.md).",
    ),
    paths(
        crate::server::health,
        crate::server::ready,
        crate::server::metrics,
        crate::server::list_models,
        crate::server::inspect,
        crate::server::get_model,
        crate::server::put_model,
        crate::server::rollback_model,
        crate::server::fit_model,
        crate::server::list_factories,
        crate::server::inspect_factory,
        crate::server::reload_factory,
        crate::inspections::list,
        crate::inspections::get,
        crate::inspections::image,
        crate::inspections::heatmap,
        crate::inspections::review,
        crate::inspections::stats,
    ),
    components(schemas(
        crate::registry::ModelInfo,
        crate::registry::VersionInfo,
        crate::factories::FactoryInfo,
        crate::pipeline::AnomalyResult,
        crate::pipeline::FactoryResult,
    )),
    modifiers(&Security),
    tags(
        (name = "inspect", description = "inspect a part"),
        (name = "models", description = "served models"),
        (name = "factories", description = "per-factory pipelines with plugins"),
        (name = "records", description = "stored inspections, reviews and statistics"),
        (name = "admin", description = "model swaps, fits and plugin reloads: the admin token"),
        (name = "health", description = "liveness, readiness, metrics"),
    )
)]
pub struct ApiDoc;

/// The two ways to send a credential (docs/access.md).
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("a factory key or the admin token"))
                    .build(),
            ),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Api-Key"))));
    }
}

/// `/openapi.json` and `/docs`: public, like the UI.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .route("/docs", get(|| async { crate::ui::asset(PAGE, "text/html; charset=utf-8") }))
        .route("/docs/api.js", get(|| async { crate::ui::asset(SCRIPT, "text/javascript; charset=utf-8") }))
}

const PAGE: &str = include_str!("ui/api.html");
const SCRIPT: &str = include_str!("ui/api.js");
