//! The record query API: `GET /v1/inspections` (filters, cursor pages),
//! `GET /v1/inspections/{id}` (with its review history), its image and
//! heatmap, `POST /v1/inspections/{id}/review`, and `GET /v1/stats`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use lineside_store::{Filter, StatRow};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::records::Records;
use crate::server::AppState;

/// Largest page of `GET /v1/inspections`.
const MAX_LIMIT: u32 = 500;

fn records(st: &AppState) -> Result<&Arc<Records>, ApiError> {
    st.records.as_ref().ok_or(ApiError::RecordsDisabled)
}

fn store_error(e: lineside_store::StoreError) -> ApiError {
    ApiError::Store(e.to_string())
}

/// Filters shared by listings, statistics and exports.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterQuery {
    factory: Option<String>,
    line: Option<String>,
    verdict: Option<String>,
    label: Option<String>,
    model: Option<String>,
    model_version: Option<String>,
    part_id: Option<String>,
    /// RFC 3339, milliseconds since the epoch, or a span back from now (`24h`, `7d`).
    since: Option<String>,
    until: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

impl FilterQuery {
    /// The store filter, limited to what `who` may read.
    fn filter_for(&self, who: &Principal) -> Result<Filter, ApiError> {
        Ok(Filter { factory: who.records_scope(self.factory.clone())?, ..self.filter()? })
    }

    fn filter(&self) -> Result<Filter, ApiError> {
        if let Some(v) = &self.verdict
            && !["pass", "fail", "review"].contains(&v.as_str())
        {
            return Err(ApiError::BadRequest(format!("verdict=`{v}`: use pass, fail or review")));
        }
        let time = |name: &str, v: &Option<String>| {
            v.as_deref()
                .map(|s| parse_time(s).map_err(|e| ApiError::BadRequest(format!("{name}=`{s}`: {e}"))))
                .transpose()
        };
        Ok(Filter {
            factory: self.factory.clone(),
            line: self.line.clone(),
            verdict: self.verdict.clone(),
            label: self.label.clone(),
            model: self.model.clone(),
            model_version: self.model_version.clone(),
            part_id: self.part_id.clone(),
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
        })
    }
}

/// A point in time: RFC 3339, integer milliseconds since the epoch, or a span
/// back from now such as `90m`, `24h` or `7d`.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_millis() as i64);
    }
    let back = humantime::parse_duration(s)
        .map_err(|_| "use RFC 3339, milliseconds since the epoch, or a span back from now like 24h".to_string())?;
    Ok(SystemTime::now()
        .checked_sub(back)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64)
}

/// RFC 3339 (UTC, milliseconds) for `ms` since the epoch.
pub fn format_time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A record as the API shows it: times as RFC 3339, links to its images.
pub fn record_json(r: &lineside_store::Record) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    v["time"] = json!(format_time(r.data.created_ms));
    v["effective_verdict"] = json!(r.effective_verdict());
    v["image_url"] = json!(r.image_sha256.as_ref().map(|_| format!("/v1/inspections/{}/image", r.data.id)));
    v["heatmap_url"] = json!(r.heatmap_sha256.as_ref().map(|_| format!("/v1/inspections/{}/heatmap", r.data.id)));
    v
}

#[utoipa::path(get, path = "/v1/inspections", tag = "records", security((), ("bearer" = []), ("api_key" = [])), params(("factory" = Option<String>, Query), ("line" = Option<String>, Query), ("verdict" = Option<String>, Query, description = "pass, fail or review"), ("label" = Option<String>, Query), ("model" = Option<String>, Query), ("model_version" = Option<String>, Query), ("part_id" = Option<String>, Query), ("since" = Option<String>, Query, description = "RFC 3339, epoch ms, or a span back such as 24h"), ("until" = Option<String>, Query), ("limit" = Option<u32>, Query, description = "1-500, default 50"), ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page")), responses((status = 200, description = "`{items: [record], next_cursor}`, newest first"), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
pub async fn list(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    query: Result<Query<FilterQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let filter = q.filter_for(&who)?;
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_LIMIT);
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>().map_err(|_| ApiError::BadRequest(format!("cursor=`{c}` is not a cursor from this API")))
        })
        .transpose()?;
    let page = records(&st)?.store().list(&filter, limit, cursor).await.map_err(store_error)?;
    let items: Vec<Value> = page.items.iter().map(record_json).collect();
    Ok(Json(json!({ "items": items, "next_cursor": page.next_cursor })))
}

/// The record `id`, if `who` may read it.
async fn readable(st: &AppState, who: &Principal, id: &str) -> Result<lineside_store::Record, ApiError> {
    let store = records(st)?.store();
    let r = store.get(id).await.map_err(store_error)?.ok_or_else(|| ApiError::InspectionNotFound(id.into()))?;
    who.may_read_record(id, r.data.factory.as_deref())?;
    Ok(r)
}

#[utoipa::path(get, path = "/v1/inspections/{id}", tag = "records", security((), ("bearer" = []), ("api_key" = [])), params(("id" = String, Path)), responses((status = 200, description = "the record, its review history and the answer sent"), (status = 404, body = crate::error::Body), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
pub async fn get(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let r = readable(&st, &who, &id).await?;
    let store = records(&st)?.store();
    let mut v = record_json(&r);
    v["reviews"] = json!(store.reviews(&id).await.map_err(store_error)?);
    v["response"] = r.data.response.clone();
    Ok(Json(v))
}

#[utoipa::path(get, path = "/v1/inspections/{id}/image", tag = "records", security((), ("bearer" = []), ("api_key" = [])), params(("id" = String, Path)), responses((status = 200, description = "the retained original", content_type = "image/*"), (status = 404, body = crate::error::Body), (status = 410, description = "not retained, or removed by retention", body = crate::error::Body), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
pub async fn image(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    file(&st, &who, &id, |r| r.image_sha256.clone(), "image").await
}

#[utoipa::path(get, path = "/v1/inspections/{id}/heatmap", tag = "records", security((), ("bearer" = []), ("api_key" = [])), params(("id" = String, Path)), responses((status = 200, description = "the anomaly heatmap", content_type = "image/png"), (status = 404, body = crate::error::Body), (status = 410, body = crate::error::Body), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
pub async fn heatmap(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    file(&st, &who, &id, |r| r.heatmap_sha256.clone(), "heatmap").await
}

async fn file(
    st: &AppState,
    who: &Principal,
    id: &str,
    pick: impl Fn(&lineside_store::Record) -> Option<String>,
    what: &str,
) -> Result<Response, ApiError> {
    let r = readable(st, who, id).await?;
    let store = records(st)?.store();
    let Some(sha) = pick(&r) else {
        return Err(ApiError::Gone(format!("inspection `{id}` has no retained {what} (retention did not keep it)")));
    };
    let gone = || ApiError::Gone(format!("the {what} of inspection `{id}` was removed by retention"));
    let content_type = store.image_type(&sha).await.map_err(store_error)?.ok_or_else(gone)?;
    let images = store.images().clone();
    let bytes = tokio::task::spawn_blocking(move || images.read(&sha))
        .await
        .map_err(|e| ApiError::Internal(format!("image read task: {e}")))?
        .ok_or_else(gone)?;
    Ok(([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "private, max-age=3600".into())], bytes)
        .into_response())
}

/// A reviewer's verdict on a record.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewBody {
    verdict: String,
    reviewer: String,
    note: Option<String>,
}

#[utoipa::path(post, path = "/v1/inspections/{id}/review", tag = "records", security((), ("bearer" = []), ("api_key" = [])), params(("id" = String, Path)), request_body = ReviewBody, responses((status = 200, description = "the record with the new review"), (status = 400, body = crate::error::Body), (status = 404, body = crate::error::Body), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
pub async fn review(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<ReviewBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    readable(&st, &who, &id).await?;
    let Json(b) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if !["pass", "fail", "review"].contains(&b.verdict.as_str()) {
        return Err(ApiError::BadRequest(format!("verdict `{}`: use pass, fail or review", b.verdict)));
    }
    let reviewer = b.reviewer.trim();
    if reviewer.is_empty() || reviewer.len() > 100 {
        return Err(ApiError::BadRequest("reviewer: give a name of 1-100 characters".into()));
    }
    if b.note.as_ref().is_some_and(|n| n.len() > 2000) {
        return Err(ApiError::BadRequest("note: at most 2000 characters".into()));
    }
    let store = records(&st)?.store();
    let r = store
        .review(&id, &b.verdict, reviewer, b.note.as_deref())
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::InspectionNotFound(id.clone()))?;
    tracing::info!(inspection = %id, verdict = %b.verdict, reviewer, by = %who, "verdict reviewed");
    let mut v = record_json(&r);
    v["reviews"] = json!(store.reviews(&id).await.map_err(store_error)?);
    Ok(Json(v))
}

#[utoipa::path(get, path = "/v1/stats", tag = "records", security((), ("bearer" = []), ("api_key" = [])), params(("factory" = Option<String>, Query), ("line" = Option<String>, Query), ("verdict" = Option<String>, Query, description = "pass, fail or review"), ("label" = Option<String>, Query), ("model" = Option<String>, Query), ("model_version" = Option<String>, Query), ("part_id" = Option<String>, Query), ("since" = Option<String>, Query, description = "RFC 3339, epoch ms, or a span back such as 24h"), ("until" = Option<String>, Query)), responses((status = 200, description = "`{total, rows}`: counts and defect rates per factory, line, label and hour"), (status = 401, description = "no key, or an unknown one", body = crate::error::Body), (status = 403, description = "not this caller's", body = crate::error::Body)))]
pub async fn stats(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    query: Result<Query<FilterQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let rows = records(&st)?.store().stats(&q.filter_for(&who)?).await.map_err(store_error)?;
    let total = rows.iter().fold((0, 0, 0, 0), |t, r| (t.0 + r.count, t.1 + r.pass, t.2 + r.fail, t.3 + r.review));
    let rows: Vec<Value> = rows.iter().map(stat_json).collect();
    Ok(Json(json!({
        "total": { "count": total.0, "pass": total.1, "fail": total.2, "review": total.3, "defect_rate": rate(total.2, total.0) },
        "rows": rows,
    })))
}

fn rate(fail: i64, count: i64) -> f64 {
    if count == 0 { 0.0 } else { fail as f64 / count as f64 }
}

fn stat_json(r: &StatRow) -> Value {
    json!({
        "factory": r.factory, "line": r.line, "label": r.label, "hour": format_time(r.hour_ms),
        "count": r.count, "pass": r.pass, "fail": r.fail, "review": r.review, "defect_rate": rate(r.fail, r.count),
    })
}
