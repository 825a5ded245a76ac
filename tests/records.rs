//! Durable records over real HTTP, on SQLite and on PostgreSQL: the kill test
//! (SIGKILL mid-load, restart, every acknowledged inspection is there), the
//! idempotency test, the query API and export.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ServerProcess, TestServer, neu_image, postgres_database};
use serde_json::Value;

const IMAGES: [&str; 4] = ["crazing_1.jpg", "inclusion_2.jpg", "patches_3.jpg", "scratches_4.jpg"];

/// Requests in one kill run, and how many must be acknowledged before the kill.
const REQUESTS: usize = 400;
const KILL_AFTER: usize = 120;
const CLIENTS: usize = 8;

async fn post(client: &reqwest::Client, base: &str, i: usize, image: Vec<u8>) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!("{base}/v1/inspect"))
        .header("content-type", "image/jpeg")
        .header("idempotency-key", format!("kill-{i}"))
        .header("x-part-id", format!("part-{i}"))
        .header("x-line-id", format!("L{}", i % 3))
        .body(image)
        .send()
        .await
}

/// Every record in the store, by idempotency key, read through the query API.
async fn all_records(client: &reqwest::Client, base: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/inspections?limit=500");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let v: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        for r in v["items"].as_array().unwrap() {
            let key = r["idempotency_key"].as_str().unwrap_or_default().to_string();
            assert!(out.insert(key.clone(), r["id"].as_str().unwrap().to_string()).is_none(), "{key} stored twice");
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

async fn kill_mid_load_loses_no_acknowledged_record(store_args: &[String], backend: lineside_store::Backend) {
    let args: Vec<&str> = store_args.iter().map(String::as_str).collect();
    let mut server = ServerProcess::start(&args).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let images: Arc<Vec<Vec<u8>>> = Arc::new(IMAGES.iter().map(|f| neu_image(f)).collect());
    let acked = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, base, images) = (client.clone(), server.base.clone(), images.clone());
            let (acked, next, failed) = (acked.clone(), next.clone(), failed.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= REQUESTS {
                        return;
                    }
                    match post(&client, &base, i, images[i % images.len()].clone()).await {
                        Ok(r) if r.status().is_success() => {
                            let v: Value = r.json().await.unwrap();
                            acked.lock().unwrap().push((i, v["id"].as_str().unwrap().to_string()));
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    while acked.lock().unwrap().len() < KILL_AFTER {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.kill();
    let killed_at = started.elapsed();
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let failed = failed.load(Ordering::Relaxed);
    eprintln!(
        "SIGKILL after {killed_at:?}: {} acknowledged (2xx), {failed} without an answer, of {REQUESTS} sent",
        acked.len()
    );
    assert!(acked.len() < REQUESTS, "the kill came mid-run");

    // The store opens cleanly (SQLite: integrity_check) before the server is back.
    let store = lineside_store::Store::open(backend).await.expect("the store opens after SIGKILL");
    store.check().await.expect("the store is intact after SIGKILL");
    store.close().await;

    let server = ServerProcess::start(&args).await;
    let stored = all_records(&client, &server.base).await;
    let missing: Vec<_> = acked.iter().filter(|(i, id)| stored.get(&format!("kill-{i}")) != Some(id)).collect();
    eprintln!("after restart: {} records stored, {} acknowledged ones missing", stored.len(), missing.len());
    assert!(missing.is_empty(), "acknowledged inspections lost or changed: {missing:?}");

    // Retrying every request: acknowledged ones get their stored answer back,
    // the rest run now, and each key ends up with exactly one record.
    let acked_ids: HashMap<usize, String> = acked.into_iter().collect();
    for i in 0..REQUESTS {
        let r = post(&client, &server.base, i, images[i % images.len()].clone()).await.unwrap();
        assert_eq!(r.status(), 200);
        let replayed = r.headers().get("idempotent-replayed").is_some();
        let v: Value = r.json().await.unwrap();
        if let Some(id) = acked_ids.get(&i) {
            assert!(replayed, "request {i} was acknowledged, so its retry is a replay");
            assert_eq!(v["id"].as_str().unwrap(), id);
        }
    }
    let stored = all_records(&client, &server.base).await;
    assert_eq!(stored.len(), REQUESTS, "one record per idempotency key");
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("lineside-test-records").tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_kill_test() {
    let dir = temp_dir();
    let args = vec!["--data-dir".to_string(), dir.path().display().to_string()];
    let backend = lineside_store::Backend::Sqlite { data_dir: dir.path().to_path_buf() };
    kill_mid_load_loses_no_acknowledged_record(&args, backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_kill_test() {
    let dir = temp_dir();
    let url = postgres_database().await;
    let args =
        vec!["--data-dir".to_string(), dir.path().display().to_string(), "--database-url".to_string(), url.clone()];
    let backend = lineside_store::Backend::Postgres { url, data_dir: dir.path().to_path_buf() };
    kill_mid_load_loses_no_acknowledged_record(&args, backend).await;
}

async fn inspect(s: &TestServer, headers: &[(&str, &str)], image: &str) -> reqwest::Response {
    let mut req = s.client.post(s.url("/v1/inspect")).header("content-type", "image/jpeg").body(neu_image(image));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn idempotency_and_queries(toml: &str) {
    let s = TestServer::ready(toml).await;
    let count = |q: &'static str| {
        let s = &s;
        async move {
            let v: Value =
                s.client.get(s.url(&format!("/v1/inspections?{q}"))).send().await.unwrap().json().await.unwrap();
            v["items"].as_array().unwrap().len()
        }
    };

    // The same key twice: the same answer, one record, and the model ran once.
    let key = [("idempotency-key", "retry-1"), ("x-part-id", "P-1"), ("x-line-id", "L1")];
    let first = inspect(&s, &key, "scratches_1.jpg").await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["record"]["stored"], true);
    let retry = inspect(&s, &key, "scratches_1.jpg").await;
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry, first, "a retry gets the stored answer verbatim");
    assert_eq!(count("part_id=P-1").await, 1, "one record for the key");

    // Part id + capture id work as a key when no Idempotency-Key is sent.
    let capture = [("x-part-id", "P-2"), ("x-capture-id", "cam1-0001"), ("x-line-id", "L2")];
    let a: Value = inspect(&s, &capture, "inclusion_1.jpg").await.json().await.unwrap();
    let b: Value = inspect(&s, &capture, "inclusion_1.jpg").await.json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    assert_eq!(count("part_id=P-2").await, 1);
    // Without any key every request is its own record.
    inspect(&s, &[("x-part-id", "P-3")], "patches_1.jpg").await;
    inspect(&s, &[("x-part-id", "P-3")], "patches_1.jpg").await;
    assert_eq!(count("part_id=P-3").await, 2);
    // Bad keys are refused before anything runs.
    let r = inspect(&s, &[("idempotency-key", &"k".repeat(300))], "patches_1.jpg").await;
    assert_eq!(r.status(), 400);

    // The record and its image.
    let id = first["id"].as_str().unwrap();
    let rec: Value = s.client.get(s.url(&format!("/v1/inspections/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(rec["verdict"], first["verdict"]);
    assert_eq!(rec["model_version"], first["model"]["version"]);
    assert_eq!(rec["line"], "L1");
    assert_eq!(rec["response"], first);
    let img = s.client.get(s.url(&format!("/v1/inspections/{id}/image"))).send().await.unwrap();
    assert_eq!(img.status(), 200, "a failed part's image is retained");
    assert_eq!(img.headers()["content-type"], "image/jpeg");
    assert_eq!(img.bytes().await.unwrap().as_ref(), neu_image("scratches_1.jpg").as_slice());
    let heat = s.client.get(s.url(&format!("/v1/inspections/{id}/heatmap"))).send().await.unwrap();
    assert_eq!(heat.status(), 410, "a classifier has no heatmap");
    let r = s.client.get(s.url("/v1/inspections/no-such-id")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(common::error_code(r).await, "inspection_not_found");

    // Filters, cursors and bad parameters.
    assert_eq!(count("line=L1").await, 1);
    assert_eq!(count("verdict=fail&since=1h").await, 4);
    assert_eq!(count("until=2000-01-01T00:00:00Z").await, 0);
    for bad in ["verdict=maybe", "since=yesterday", "cursor=abc", "colour=red"] {
        let r = s.client.get(s.url(&format!("/v1/inspections?{bad}"))).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let page: Value = s.client.get(s.url("/v1/inspections?limit=2")).send().await.unwrap().json().await.unwrap();
    let cursor = page["next_cursor"].as_str().expect("more pages");
    let rest: Value =
        s.client.get(s.url(&format!("/v1/inspections?cursor={cursor}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len() + rest["items"].as_array().unwrap().len(), 4);

    // A review overrides the verdict, with who and when; statistics follow it.
    let review = serde_json::json!({"verdict": "pass", "reviewer": "qa-bob", "note": "polishing mark"});
    let r = s.client.post(s.url(&format!("/v1/inspections/{id}/review"))).json(&review).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let reviewed: Value = r.json().await.unwrap();
    assert_eq!(reviewed["effective_verdict"], "pass");
    assert_eq!(reviewed["review"]["reviewer"], "qa-bob");
    assert_eq!(reviewed["reviews"][0]["note"], "polishing mark");
    let stats: Value = s.client.get(s.url("/v1/stats")).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["total"]["count"], 4);
    assert_eq!(stats["total"]["pass"], 1);
    assert_eq!(stats["total"]["fail"], 3);
    assert!(stats["rows"].as_array().unwrap().iter().all(|r| r["hour"].as_str().unwrap().ends_with(":00:00.000Z")));
    let bad = serde_json::json!({"verdict": "ok", "reviewer": "x"});
    let r = s.client.post(s.url(&format!("/v1/inspections/{id}/review"))).json(&bad).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_idempotency_and_queries() {
    idempotency_and_queries("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_idempotency_and_queries() {
    let url = postgres_database().await;
    idempotency_and_queries(&format!("[records]\ndatabase_url = \"{url}\"\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_off_answers_without_storing() {
    let s = TestServer::ready("[records]\nenabled = false\n").await;
    let r = inspect(&s, &[("idempotency-key", "k")], "crazing_1.jpg").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v.get("record").is_none());
    let r = s.client.get(s.url("/v1/inspections")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(common::error_code(r).await, "records_disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_csv_and_jsonl() {
    let dir = temp_dir();
    let s = TestServer::ready(&format!("[records]\ndata_dir = \"{}\"\n", dir.path().display())).await;
    for (i, f) in IMAGES.iter().enumerate() {
        let part = format!("E-{i}");
        assert_eq!(inspect(&s, &[("x-part-id", &part), ("x-line-id", "L9")], f).await.status(), 200);
    }
    let export = |format: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lineside"))
            .args(["export", "--since", "1h", "--format", format, "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let csv = export("csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("id,time,factory,line,part_id"));
    assert_eq!(lines.len(), 1 + IMAGES.len());
    assert!(lines[1].contains(",L9,E-0,"));
    let jsonl = export("jsonl");
    let parts: Vec<String> = jsonl
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["part_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(parts, ["E-0", "E-1", "E-2", "E-3"], "oldest first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_image_store_flags_the_answer_but_keeps_the_record() {
    use sha2::Digest;
    let dir = temp_dir();
    let s = TestServer::ready(&format!("[records]\ndata_dir = \"{}\"\n", dir.path().display())).await;
    // A plain file where the image's folder must go: the write fails as a full
    // or broken disk would, even for root.
    let image = neu_image("scratches_2.jpg");
    let sha: String = sha2::Sha256::digest(&image).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.path().join("images").join(&sha[..2]), b"in the way").unwrap();

    let r = inspect(&s, &[("x-part-id", "broken-disk")], "scratches_2.jpg").await;
    assert_eq!(r.status(), 200, "the inspection still answers");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["record"]["stored"], true);
    assert_eq!(v["record"]["image_retained"], false);
    assert!(v["record"]["warning"].as_str().unwrap().contains("image not retained"), "{v}");
    let id = v["id"].as_str().unwrap();
    let rec: Value = s.client.get(s.url(&format!("/v1/inspections/{id}"))).send().await.unwrap().json().await.unwrap();
    assert!(rec["storage_warning"].as_str().unwrap().contains("image not retained"));
    let img = s.client.get(s.url(&format!("/v1/inspections/{id}/image"))).send().await.unwrap();
    assert_eq!(img.status(), 410);
    // Other images are unaffected.
    let r = inspect(&s, &[("x-part-id", "fine")], "crazing_2.jpg").await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["record"]["image_retained"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_task_expires_old_images() {
    // 0.00002 days = 1.7 s; the task runs every second.
    let s = TestServer::ready("[records]\nmax_image_age_days = 0.00002\nretention_interval_s = 1\n").await;
    let v: Value = inspect(&s, &[], "pitted_surface_1.jpg").await.json().await.unwrap();
    let url = s.url(&format!("/v1/inspections/{}/image", v["id"].as_str().unwrap()));
    assert_eq!(s.client.get(&url).send().await.unwrap().status(), 200);
    let until = Instant::now() + Duration::from_secs(20);
    while s.client.get(&url).send().await.unwrap().status() != 410 {
        assert!(Instant::now() < until, "the image was never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rec: Value = s
        .client
        .get(s.url(&format!("/v1/inspections/{}", v["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rec["verdict"], v["verdict"], "the record outlives its image");
}
