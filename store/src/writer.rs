//! Group commit: one task owns all record writes. Requests that arrive while a
//! transaction commits are written together in the next one, so under load many
//! records share one sync instead of each paying for its own.

use sqlx::any::AnyRow;
use sqlx::{Any, AnyPool, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::query::{self, Sql};
use crate::{Inserted, NewRecord, Record, StoreError};

/// Records written in one transaction at most.
const MAX_GROUP: usize = 128;

struct Job {
    record: NewRecord,
    reply: oneshot::Sender<Result<Inserted, StoreError>>,
}

pub(crate) struct Writer {
    tx: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Writer {
    pub(crate) fn start(pool: AnyPool) -> Writer {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        let task = tokio::spawn(run(pool, rx));
        Writer { tx: std::sync::Mutex::new(Some(tx)), task: tokio::sync::Mutex::new(Some(task)) }
    }

    pub(crate) async fn insert(&self, record: NewRecord) -> Result<Inserted, StoreError> {
        let tx = self.tx.lock().expect("writer lock").clone().ok_or(StoreError::WriterGone)?;
        let (reply, answer) = oneshot::channel();
        tx.send(Job { record, reply }).await.map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Stops taking records and waits until every queued one is committed.
    pub(crate) async fn close(&self) {
        self.tx.lock().expect("writer lock").take();
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

async fn run(pool: AnyPool, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let records: Vec<&NewRecord> = jobs.iter().map(|j| &j.record).collect();
        match commit(&pool, &records).await {
            Ok(done) => {
                for (job, result) in jobs.into_iter().zip(done) {
                    let _ = job.reply.send(Ok(result));
                }
            }
            Err(e) if jobs.len() > 1 => {
                // One bad record must not sink its neighbours: retry each alone.
                tracing::warn!(error = %e, records = jobs.len(), "group commit failed; retrying one by one");
                for job in jobs {
                    let result = commit(&pool, &[&job.record]).await.map(|mut v| v.remove(0));
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "record commit failed");
                let _ = jobs.remove(0).reply.send(Err(e));
            }
        }
    }
}

async fn commit(pool: &AnyPool, records: &[&NewRecord]) -> Result<Vec<Inserted>, StoreError> {
    let mut tx = pool.begin().await?;
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        out.push(insert_one(&mut tx, r).await?);
    }
    tx.commit().await?;
    Ok(out)
}

async fn insert_one(tx: &mut Transaction<'static, Any>, r: &NewRecord) -> Result<Inserted, StoreError> {
    let d = &r.data;
    for image in [&r.image, &r.heatmap].into_iter().flatten() {
        let mut sql = Sql::new("INSERT INTO images (sha256, bytes, content_type, created_ms, last_used_ms) VALUES (");
        sql.text_arg(&image.sha256).push(", ").int(image.bytes as i64).push(", ").text_arg(&image.content_type);
        sql.push(", ").int(d.created_ms).push(", ").int(d.created_ms);
        sql.push(") ON CONFLICT (sha256) DO UPDATE SET last_used_ms = excluded.last_used_ms");
        sql.query().execute(&mut **tx).await?;
    }
    let mut sql = Sql::new(
        "INSERT INTO inspections (id, created_ms, scope, factory, line, part_id, capture_id, idempotency_key, \
         model, model_version, plugins, verdict, label, score, anomaly_score, defects, timings, image_sha256, \
         heatmap_sha256, storage_warning, response) VALUES (",
    );
    sql.text_arg(&d.id).push(", ").int(d.created_ms).push(", ").text_arg(d.scope()).push(", ");
    sql.opt_text(d.factory.as_deref()).push(", ").opt_text(d.line.as_deref()).push(", ");
    sql.opt_text(d.part_id.as_deref()).push(", ").opt_text(d.capture_id.as_deref()).push(", ");
    sql.opt_text(d.idempotency_key.as_deref()).push(", ").text_arg(&d.model).push(", ");
    sql.text_arg(&d.model_version).push(", ").text_arg(&d.plugins.to_string()).push(", ");
    sql.text_arg(&d.verdict).push(", ").text_arg(&d.label).push(", ").float(d.score).push(", ");
    sql.opt_float(d.anomaly_score).push(", ").text_arg(&d.defects.to_string()).push(", ");
    sql.text_arg(&d.timings.to_string()).push(", ");
    sql.opt_text(r.image.as_ref().map(|i| i.sha256.as_str())).push(", ");
    sql.opt_text(r.heatmap.as_ref().map(|i| i.sha256.as_str())).push(", ");
    sql.opt_text(d.storage_warning.as_deref()).push(", ").text_arg(&d.response.to_string());
    sql.push(") ON CONFLICT (scope, idempotency_key) DO NOTHING RETURNING seq");
    let inserted: Option<AnyRow> = sql.query().fetch_optional(&mut **tx).await?;
    match inserted {
        Some(row) => {
            let seq: i64 = sqlx::Row::try_get(&row, 0)?;
            Ok(Inserted::New(Box::new(Record {
                seq,
                data: d.clone(),
                image_sha256: r.image.as_ref().map(|i| i.sha256.clone()),
                heatmap_sha256: r.heatmap.as_ref().map(|i| i.sha256.clone()),
                review: None,
            })))
        }
        None => {
            let key = d.idempotency_key.as_deref().unwrap_or_default();
            let existing = query::by_key_in(&mut **tx, d.scope(), key).await?;
            // Only an idempotency key can collide; a missing row would be a bug in the SQL above.
            existing
                .map(|e| Inserted::Existing(Box::new(e)))
                .ok_or(StoreError::Corrupt(format!("insert of `{}` conflicted but no record holds its key", d.id)))
        }
    }
}
