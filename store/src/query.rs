//! Reading records: by id, by idempotency key, filtered pages, statistics and
//! reviews. The SQL is shared by SQLite and PostgreSQL (`$n` placeholders, which
//! both accept).

use serde::Serialize;
use serde_json::Value;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyExecutor, AssertSqlSafe, Row};

use crate::{Record, RecordData, Review, ReviewRecord, Store, StoreError};

const COLUMNS: &str = "seq, id, created_ms, factory, line, part_id, capture_id, idempotency_key, model, \
     model_version, plugins, verdict, label, score, anomaly_score, defects, timings, image_sha256, heatmap_sha256, \
     storage_warning, response, review_verdict, reviewed_by, reviewed_ms";

/// SQL text with numbered placeholders and the values bound to them, in order.
pub(crate) struct Sql {
    text: String,
    args: Vec<Arg>,
}

enum Arg {
    Text(Option<String>),
    Int(i64),
    Float(Option<f64>),
}

impl Sql {
    pub(crate) fn new(text: &str) -> Sql {
        Sql { text: text.to_string(), args: Vec::new() }
    }

    pub(crate) fn push(&mut self, text: &str) -> &mut Sql {
        self.text.push_str(text);
        self
    }

    fn bind(&mut self, arg: Arg) -> &mut Sql {
        self.args.push(arg);
        self.text.push_str(&format!("${}", self.args.len()));
        self
    }

    pub(crate) fn text_arg(&mut self, v: &str) -> &mut Sql {
        self.bind(Arg::Text(Some(v.to_string())))
    }

    pub(crate) fn opt_text(&mut self, v: Option<&str>) -> &mut Sql {
        self.bind(Arg::Text(v.map(str::to_string)))
    }

    pub(crate) fn int(&mut self, v: i64) -> &mut Sql {
        self.bind(Arg::Int(v))
    }

    pub(crate) fn float(&mut self, v: f64) -> &mut Sql {
        self.bind(Arg::Float(Some(v)))
    }

    pub(crate) fn opt_float(&mut self, v: Option<f64>) -> &mut Sql {
        self.bind(Arg::Float(v))
    }

    pub(crate) fn query(&self) -> Query<'static, Any, AnyArguments> {
        let mut q = sqlx::query(AssertSqlSafe(self.text.clone()));
        for a in &self.args {
            q = match a {
                Arg::Text(v) => q.bind(v.clone()),
                Arg::Int(v) => q.bind(*v),
                Arg::Float(v) => q.bind(*v),
            };
        }
        q
    }
}

/// Which records a listing, a statistic or an export covers. Unset fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub factory: Option<String>,
    pub line: Option<String>,
    /// The verdict that stands (a review overrides the model's).
    pub verdict: Option<String>,
    pub label: Option<String>,
    pub model: Option<String>,
    pub model_version: Option<String>,
    pub part_id: Option<String>,
    /// Inclusive lower bound, ms since the epoch.
    pub since_ms: Option<i64>,
    /// Exclusive upper bound, ms since the epoch.
    pub until_ms: Option<i64>,
}

impl Filter {
    fn push_where(&self, sql: &mut Sql) {
        sql.push(" WHERE 1 = 1");
        let eq = [
            ("factory", &self.factory),
            ("line", &self.line),
            ("COALESCE(review_verdict, verdict)", &self.verdict),
            ("label", &self.label),
            ("model", &self.model),
            ("model_version", &self.model_version),
            ("part_id", &self.part_id),
        ];
        for (column, value) in eq {
            if let Some(v) = value {
                sql.push(&format!(" AND {column} = ")).text_arg(v);
            }
        }
        if let Some(t) = self.since_ms {
            sql.push(" AND created_ms >= ").int(t);
        }
        if let Some(t) = self.until_ms {
            sql.push(" AND created_ms < ").int(t);
        }
    }
}

/// One page of records, newest first.
#[derive(Debug, Serialize)]
pub struct Page {
    pub items: Vec<Record>,
    /// Pass as `cursor` for the next (older) page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// Counts for one factory, line, label and hour.
#[derive(Debug, Clone, Serialize)]
pub struct StatRow {
    pub factory: Option<String>,
    pub line: Option<String>,
    pub label: String,
    /// Start of the hour, ms since the epoch.
    pub hour_ms: i64,
    pub count: i64,
    pub pass: i64,
    pub fail: i64,
    pub review: i64,
}

impl Store {
    /// The record with `id`.
    pub async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let mut sql = Sql::new(&format!("SELECT {COLUMNS} FROM inspections WHERE id = "));
        sql.text_arg(id);
        sql.query().fetch_optional(&self.pool).await?.map(|r| from_row(&r)).transpose()
    }

    /// The record stored under an idempotency key.
    pub async fn by_key(&self, scope: &str, key: &str) -> Result<Option<Record>, StoreError> {
        by_key_in(&self.pool, scope, key).await
    }

    /// Records matching `filter`, newest first, `limit` at most, older than `cursor`.
    pub async fn list(&self, filter: &Filter, limit: u32, cursor: Option<i64>) -> Result<Page, StoreError> {
        let mut sql = Sql::new(&format!("SELECT {COLUMNS} FROM inspections"));
        filter.push_where(&mut sql);
        if let Some(c) = cursor {
            sql.push(" AND seq < ").int(c);
        }
        sql.push(" ORDER BY seq DESC LIMIT ").int(i64::from(limit));
        let rows = sql.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        let next_cursor = (items.len() == limit as usize).then(|| items.last().map(|r| r.seq.to_string())).flatten();
        Ok(Page { items, next_cursor })
    }

    /// Records matching `filter`, oldest first, after position `after` (for exports).
    pub async fn scan(&self, filter: &Filter, after: i64, limit: u32) -> Result<Vec<Record>, StoreError> {
        let mut sql = Sql::new(&format!("SELECT {COLUMNS} FROM inspections"));
        filter.push_where(&mut sql);
        sql.push(" AND seq > ").int(after).push(" ORDER BY seq ASC LIMIT ").int(i64::from(limit));
        let rows = sql.query().fetch_all(&self.pool).await?;
        rows.iter().map(from_row).collect()
    }

    /// Number of records matching `filter`.
    pub async fn count(&self, filter: &Filter) -> Result<i64, StoreError> {
        let mut sql = Sql::new("SELECT COUNT(*) FROM inspections");
        filter.push_where(&mut sql);
        Ok(sql.query().fetch_one(&self.pool).await?.try_get(0)?)
    }

    /// Counts per factory, line, label and hour, by the verdict that stands.
    pub async fn stats(&self, filter: &Filter) -> Result<Vec<StatRow>, StoreError> {
        let v = "COALESCE(review_verdict, verdict)";
        let mut sql = Sql::new(&format!(
            "SELECT factory, line, label, created_ms / 3600000 AS hour, COUNT(*) AS n, \
             SUM(CASE WHEN {v} = 'pass' THEN 1 ELSE 0 END) AS pass, \
             SUM(CASE WHEN {v} = 'fail' THEN 1 ELSE 0 END) AS fail, \
             SUM(CASE WHEN {v} = 'review' THEN 1 ELSE 0 END) AS review FROM inspections"
        ));
        filter.push_where(&mut sql);
        sql.push(" GROUP BY factory, line, label, created_ms / 3600000 ORDER BY hour, factory, line, label");
        let rows = sql.query().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(StatRow {
                    factory: r.try_get(0)?,
                    line: r.try_get(1)?,
                    label: r.try_get(2)?,
                    hour_ms: r.try_get::<i64, _>(3)? * 3_600_000,
                    count: r.try_get(4)?,
                    pass: r.try_get(5)?,
                    fail: r.try_get(6)?,
                    review: r.try_get(7)?,
                })
            })
            .collect()
    }

    /// Stores a reviewer's verdict on `id` (history kept) and returns the record.
    pub async fn review(
        &self,
        id: &str,
        verdict: &str,
        reviewer: &str,
        note: Option<&str>,
    ) -> Result<Option<Record>, StoreError> {
        let now = crate::now_ms();
        let mut tx = self.pool.begin().await?;
        let mut update = Sql::new("UPDATE inspections SET review_verdict = ");
        update.text_arg(verdict).push(", reviewed_by = ").text_arg(reviewer).push(", reviewed_ms = ").int(now);
        update.push(" WHERE id = ").text_arg(id);
        if update.query().execute(&mut *tx).await?.rows_affected() == 0 {
            return Ok(None);
        }
        let mut insert = Sql::new("INSERT INTO reviews (inspection_id, verdict, reviewer, note, created_ms) VALUES (");
        insert.text_arg(id).push(", ").text_arg(verdict).push(", ").text_arg(reviewer).push(", ");
        insert.opt_text(note).push(", ").int(now).push(")");
        insert.query().execute(&mut *tx).await?;
        tx.commit().await?;
        self.get(id).await
    }

    /// Every review of `id`, oldest first.
    pub async fn reviews(&self, id: &str) -> Result<Vec<ReviewRecord>, StoreError> {
        let mut sql = Sql::new("SELECT verdict, reviewer, note, created_ms FROM reviews WHERE inspection_id = ");
        sql.text_arg(id).push(" ORDER BY seq");
        let rows = sql.query().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(ReviewRecord {
                    verdict: r.try_get(0)?,
                    reviewer: r.try_get(1)?,
                    note: r.try_get(2)?,
                    created_ms: r.try_get(3)?,
                })
            })
            .collect()
    }
}

pub(crate) async fn by_key_in<'e>(
    executor: impl AnyExecutor<'e>,
    scope: &str,
    key: &str,
) -> Result<Option<Record>, StoreError> {
    let mut sql = Sql::new(&format!("SELECT {COLUMNS} FROM inspections WHERE scope = "));
    sql.text_arg(scope).push(" AND idempotency_key = ").text_arg(key);
    sql.query().fetch_optional(executor).await?.map(|r| from_row(&r)).transpose()
}

fn json(row: &AnyRow, field: &'static str) -> Result<Value, StoreError> {
    let text: String = row.try_get(field)?;
    serde_json::from_str(&text).map_err(|source| StoreError::BadJson { field, source })
}

fn from_row(row: &AnyRow) -> Result<Record, StoreError> {
    let review_verdict: Option<String> = row.try_get("review_verdict")?;
    let review = match review_verdict {
        Some(verdict) => Some(Review {
            verdict,
            reviewer: row.try_get::<Option<String>, _>("reviewed_by")?.unwrap_or_default(),
            reviewed_ms: row.try_get::<Option<i64>, _>("reviewed_ms")?.unwrap_or_default(),
        }),
        None => None,
    };
    let data = RecordData {
        id: row.try_get("id")?,
        created_ms: row.try_get("created_ms")?,
        factory: row.try_get("factory")?,
        line: row.try_get("line")?,
        part_id: row.try_get("part_id")?,
        capture_id: row.try_get("capture_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        model: row.try_get("model")?,
        model_version: row.try_get("model_version")?,
        plugins: json(row, "plugins")?,
        verdict: row.try_get("verdict")?,
        label: row.try_get("label")?,
        score: row.try_get("score")?,
        anomaly_score: row.try_get("anomaly_score")?,
        defects: json(row, "defects")?,
        timings: json(row, "timings")?,
        storage_warning: row.try_get("storage_warning")?,
        response: json(row, "response")?,
    };
    Ok(Record {
        seq: row.try_get("seq")?,
        data,
        image_sha256: row.try_get("image_sha256")?,
        heatmap_sha256: row.try_get("heatmap_sha256")?,
        review,
    })
}
