//! The store's behaviour on both backends: SQLite in a temp dir, and a fresh
//! database on the PostgreSQL server named by `LINESIDE_TEST_POSTGRES_URL`
//! (`.ci/test` starts one; see `.ci/postgres.sh`).

use std::time::Duration;

use lineside_store::{Backend, Filter, Inserted, NewRecord, RecordData, RetentionPolicy, Store};
use serde_json::json;
use sqlx::Connection;

/// A fresh empty database on the test PostgreSQL server; its URL.
async fn fresh_postgres() -> String {
    let url = std::env::var("LINESIDE_TEST_POSTGRES_URL").expect(
        "LINESIDE_TEST_POSTGRES_URL is not set: run the tests with `bash .ci/test`, \
         or start a server with `bash .ci/postgres.sh` and export the URL it prints",
    );
    let name = format!("lineside_test_{}", std::process::id() as u64 * 1000 + rand_suffix());
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect to the test PostgreSQL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&url);
    format!("{base}/{name}")
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn open(kind: &str, dir: &tempfile::TempDir) -> Store {
    let data_dir = dir.path().to_path_buf();
    let backend = match kind {
        "sqlite" => Backend::Sqlite { data_dir },
        _ => Backend::Postgres { url: fresh_postgres().await, data_dir },
    };
    Store::open(backend).await.expect("store opens")
}

fn record(id: &str, factory: &str, line: &str, verdict: &str, label: &str, key: Option<&str>) -> NewRecord {
    NewRecord {
        data: RecordData {
            id: id.into(),
            created_ms: lineside_store::now_ms(),
            factory: Some(factory.into()),
            line: Some(line.into()),
            part_id: Some(format!("part-{id}")),
            capture_id: None,
            idempotency_key: key.map(str::to_string),
            model: "steel-surface".into(),
            model_version: "v1".into(),
            plugins: json!([]),
            verdict: verdict.into(),
            label: label.into(),
            score: 0.9,
            anomaly_score: None,
            defects: json!([{"code": "S1", "region": [1, 2, 3, 4]}]),
            timings: json!({"total": 1.0}),
            storage_warning: None,
            response: json!({"id": id, "verdict": verdict}),
        },
        image: None,
        heatmap: None,
    }
}

async fn records_round_trip(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, &dir).await;
    let inserted = store.insert(record("a", "acme", "L1", "fail", "scratches", None)).await.unwrap();
    assert!(matches!(inserted, Inserted::New(_)));
    store.insert(record("b", "acme", "L2", "pass", "good", None)).await.unwrap();
    store.insert(record("c", "other", "L1", "fail", "inclusion", None)).await.unwrap();

    let got = store.get("a").await.unwrap().expect("a is stored");
    assert_eq!((got.data.verdict.as_str(), got.data.label.as_str()), ("fail", "scratches"));
    assert_eq!(got.data.defects, json!([{"code": "S1", "region": [1, 2, 3, 4]}]));
    assert_eq!(got.data.response, json!({"id": "a", "verdict": "fail"}));
    assert!(store.get("missing").await.unwrap().is_none());

    let acme = Filter { factory: Some("acme".into()), ..Default::default() };
    let page = store.list(&acme, 10, None).await.unwrap();
    assert_eq!(page.items.iter().map(|r| r.data.id.as_str()).collect::<Vec<_>>(), ["b", "a"]);
    assert!(page.next_cursor.is_none());
    let fails = Filter { verdict: Some("fail".into()), ..Default::default() };
    assert_eq!(store.count(&fails).await.unwrap(), 2);

    // Cursor pagination walks every record once, newest first.
    let first = store.list(&Filter::default(), 2, None).await.unwrap();
    let cursor: i64 = first.next_cursor.as_deref().expect("a second page").parse().unwrap();
    let second = store.list(&Filter::default(), 2, Some(cursor)).await.unwrap();
    let ids: Vec<_> = first.items.iter().chain(&second.items).map(|r| r.data.id.clone()).collect();
    assert_eq!(ids, ["c", "b", "a"]);

    // A review overrides the verdict that filters and statistics see.
    let reviewed = store.review("a", "pass", "alice", Some("false call")).await.unwrap().unwrap();
    assert_eq!(reviewed.effective_verdict(), "pass");
    assert_eq!(reviewed.review.as_ref().unwrap().reviewer, "alice");
    assert_eq!(store.count(&fails).await.unwrap(), 1);
    assert_eq!(store.reviews("a").await.unwrap().len(), 1);
    assert!(store.review("missing", "pass", "alice", None).await.unwrap().is_none());

    let stats = store.stats(&acme).await.unwrap();
    assert_eq!(stats.iter().map(|s| s.count).sum::<i64>(), 2);
    assert_eq!(stats.iter().map(|s| s.pass).sum::<i64>(), 2);
    let exported = store.scan(&Filter::default(), 0, 100).await.unwrap();
    assert_eq!(exported.iter().map(|r| r.data.id.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    store.check().await.unwrap();
    store.close().await;
}

async fn idempotency_keeps_one_record(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, &dir).await;
    let first = store.insert(record("first", "acme", "L1", "fail", "scratches", Some("k1"))).await.unwrap();
    let Inserted::New(first) = first else { panic!("the first insert is new") };
    // The retry (a new id, the same key) gets the first record back.
    match store.insert(record("retry", "acme", "L1", "pass", "good", Some("k1"))).await.unwrap() {
        Inserted::Existing(r) => assert_eq!(r.data.id, first.data.id),
        Inserted::New(_) => panic!("a retry with the same key was stored twice"),
    }
    // Keys are scoped per factory.
    assert!(matches!(
        store.insert(record("elsewhere", "other", "L1", "pass", "good", Some("k1"))).await.unwrap(),
        Inserted::New(_)
    ));
    // Concurrent inserts under one key: exactly one is new.
    let store = std::sync::Arc::new(store);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store.insert(record(&format!("c{i}"), "acme", "L1", "fail", "x", Some("k2"))).await.unwrap()
            })
        })
        .collect();
    let mut new = 0;
    for t in tasks {
        new += usize::from(matches!(t.await.unwrap(), Inserted::New(_)));
    }
    assert_eq!(new, 1);
    assert_eq!(store.count(&Filter::default()).await.unwrap(), 3);
    store.close().await;
}

async fn retention_removes_old_and_excess_images(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(kind, &dir).await;
    let images = store.images().clone();
    let mut refs = Vec::new();
    for i in 0..4u8 {
        let img = images.put(&vec![i; 1000], "image/png").unwrap();
        let mut r = record(&format!("r{i}"), "acme", "L1", "fail", "x", None);
        // Old enough to be outside the grace period.
        r.data.created_ms = lineside_store::now_ms() - 3_600_000 + i64::from(i);
        r.image = Some(img.clone());
        store.insert(r).await.unwrap();
        refs.push(img);
    }
    assert!(images.read(&refs[0].sha256).is_some());
    // Size: 4000 bytes stored, 2500 allowed → the two least recently used go.
    let report = store
        .enforce_retention(RetentionPolicy { max_age: Duration::from_secs(86_400), max_bytes: 2500 })
        .await
        .unwrap();
    assert_eq!((report.removed, report.kept), (2, 2));
    assert!(images.read(&refs[0].sha256).is_none() && images.read(&refs[1].sha256).is_none());
    assert!(images.read(&refs[3].sha256).is_some());
    assert!(store.image_type(&refs[0].sha256).await.unwrap().is_none());
    // Age: everything is older than 30 minutes.
    let report = store
        .enforce_retention(RetentionPolicy { max_age: Duration::from_secs(1800), max_bytes: u64::MAX })
        .await
        .unwrap();
    assert_eq!(report.removed, 2);
    assert!(images.read(&refs[3].sha256).is_none());
    // The records stay; only their images expire.
    assert_eq!(store.count(&Filter::default()).await.unwrap(), 4);
    // Hostile names never reach the file system.
    assert!(images.read("../../etc/passwd").is_none());
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_records_round_trip() {
    records_round_trip("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_records_round_trip() {
    records_round_trip("postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_idempotency_keeps_one_record() {
    idempotency_keeps_one_record("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_idempotency_keeps_one_record() {
    idempotency_keeps_one_record("postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_retention() {
    retention_removes_old_and_excess_images("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention() {
    retention_removes_old_and_excess_images("postgres").await;
}

#[test]
fn concurrent_puts_of_one_image_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(open("sqlite", &dir));
    let images = store.images().clone();
    let bytes = vec![7u8; 256 * 1024];
    let refs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| images.put(&bytes, "image/png"))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(refs.iter().all(|r| r.is_ok()), "{refs:?}");
    assert_eq!(images.read(&refs[0].as_ref().unwrap().sha256).unwrap(), bytes);
}
