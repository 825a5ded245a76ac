//! Prometheus metrics: the recorder, and the HTTP middleware that counts
//! requests by route and status and times them.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// The process-wide recorder (installed on first use; one per process).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("lineside_batch_size".into()), BATCH_BUCKETS))
                .expect("static buckets are valid")
                .install_recorder()
                .expect("metrics recorder installs once")
        })
        .clone()
}

/// Counts and times every request: `lineside_http_requests_total{route,status}`
/// and `lineside_http_request_duration_seconds{route}`.
pub async fn track(req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("lineside_http_requests_total", "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("lineside_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}
