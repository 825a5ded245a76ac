//! The review UI at `/ui`: a small page and script compiled into the binary
//! (the line network is offline, so nothing comes from a CDN). It reads the
//! record API (`/v1/inspections`, `/v1/stats`) and posts reviews to it.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::server::AppState;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// Only our own files run: no inline script, no other origin.
const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// `/ui` and its assets.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route("/ui/", get(|| async { Redirect::permanent("/ui") }))
        .route("/ui/app.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/ui/style.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
}

/// A compiled-in file with the UI's security headers.
pub(crate) fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
