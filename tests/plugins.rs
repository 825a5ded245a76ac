//! Factory pipelines with real wasm plugins, over real HTTP: the example
//! plugins end to end, hostile plugins contained, and hot reload under load.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestServer, error_code, guest_wasm, held_out_files, neu_class, neu_image};
use serde_json::Value;

/// The factory's defect-code table for NEU classes.
const CODES: [(&str, &str); 6] = [
    ("crazing", "SS-01"),
    ("inclusion", "SS-02"),
    ("patches", "SS-03"),
    ("pitted_surface", "SS-04"),
    ("rolled-in_scale", "SS-05"),
    ("scratches", "SS-06"),
];

fn codes_toml() -> String {
    let pairs: Vec<String> = CODES.iter().map(|(l, c)| format!("\"{l}\" = \"{c}\"")).collect();
    format!("{{ {} }}", pairs.join(", "))
}

fn model_toml(cache: &Path) -> String {
    format!(
        r#"
[[models]]
name = "steel-surface"
source = "builtin:steel-surface"
max_batch_size = 4
max_queue_delay_ms = 2

[server]
admin_token = "t0ken"

[plugins]
cache_dir = "{}"
watch_interval_ms = 100
"#,
        cache.display()
    )
}

fn acme_toml(name: &str) -> String {
    format!(
        r#"
[[factories]]
name = "{name}"
allowed_headers = ["x-shift"]
preprocess = {{ path = "{roi}", config = {{ x = 10, y = 10, width = 180, height = 180, grayscale = true }} }}
postprocess = {{ path = "{codes}", config = {{ threshold = 0.5, codes = {table} }} }}
"#,
        roi = guest_wasm("roi-crop").display(),
        codes = guest_wasm("defect-codes").display(),
        table = codes_toml(),
    )
}

fn hostile_toml(mode: &str, policy: &str) -> String {
    // Filling 64 MiB or building a 16 MB image can take longer than the default
    // 50 ms on a busy machine; a long deadline makes the limit under test the one that stops them.
    let timeout = if matches!(mode, "memory" | "huge") { 5000 } else { 50 };
    format!(
        r#"
[[factories]]
name = "hostile-{mode}-{policy}"
on_plugin_error = "{policy}"
preprocess = {{ path = "{}", max_output_mib = 4, timeout_ms = {timeout}, config = {{ mode = "{mode}" }} }}
"#,
        guest_wasm("hostile").display(),
    )
}

async fn post(s: &TestServer, factory: &str, img: Vec<u8>) -> reqwest::Response {
    s.client
        .post(s.url(&format!("/v1/factories/{factory}/inspect")))
        .header("content-type", "image/jpeg")
        .header("x-part-id", "P-0001")
        .body(img)
        .send()
        .await
        .unwrap()
}

/// One held-out image of each NEU class.
fn one_per_class() -> Vec<String> {
    let files = held_out_files();
    CODES.iter().map(|(class, _)| files.iter().find(|f| neu_class(f) == *class).unwrap().clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roi_crop_and_defect_codes_return_the_factory_code() {
    let cache_dir = tempdir("e2e");
    let cache = cache_dir.path().to_path_buf();
    let s = TestServer::ready(&(model_toml(&cache) + &acme_toml("acme"))).await;
    for file in one_per_class() {
        let r = post(&s, "acme", neu_image(&file)).await;
        assert_eq!(r.status(), 200, "{file}");
        let v: Value = r.json().await.unwrap();
        let class = neu_class(&file);
        let code = CODES.iter().find(|(l, _)| *l == class).unwrap().1;
        assert_eq!(v["factory"], "acme");
        assert_eq!(v["label"], class.as_str(), "{file}: {v}");
        assert_eq!(v["verdict"], "fail", "NEU has only defect classes: {v}");
        assert_eq!(v["defects"][0]["code"], code, "{file}: {v}");
        assert_eq!(v["defects"][0]["label"], class.as_str());
        assert_eq!(v["extra"]["rule"], "defect-codes/0.1");
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins[0]["name"], "roi_crop");
        assert_eq!(plugins[0]["output_size"], serde_json::json!([180, 180]), "the model saw the ROI");
        assert_eq!(plugins[1]["name"], "defect_codes");
    }
    // Compiled once, then served from the on-disk cache.
    let cached = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "cwasm"));
    assert_eq!(cached.count(), 2);

    let r = post(&s, "nowhere", neu_image("crazing_1.jpg")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "factory_not_found");
    let v: Value = s.client.get(s.url("/v1/factories")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["factories"][0]["preprocess"]["name"], "roi_crop");
    assert_eq!(v["factories"][0]["postprocess"]["sha256"].as_str().unwrap().len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_fail_alone_with_specific_errors() {
    let modes = [
        ("loop", 504, "plugin_timeout", "deadline"),
        ("memory", 502, "plugin_memory_limit", "MiB"),
        ("panic", 502, "plugin_trap", "panicked on purpose"),
        ("recurse", 502, "plugin_stack_overflow", "stack overflow"),
        ("huge", 502, "plugin_output_too_large", "limit"),
        ("bad-shape", 502, "plugin_invalid_output", "needs 30000"),
        ("read-file", 422, "plugin_error", "/etc/hostname"),
        ("socket", 422, "plugin_error", "connect"),
        ("env", 422, "plugin_error", "no environment variables visible"),
    ];
    let cache_dir = tempdir("hostile");
    let cache = cache_dir.path().to_path_buf();
    let mut toml = model_toml(&cache) + &acme_toml("acme");
    for (mode, ..) in modes {
        toml += &hostile_toml(mode, "fail");
    }
    toml += &hostile_toml("panic", "pass_through");
    let s = TestServer::ready(&toml).await;
    let img = neu_image("scratches_1.jpg");

    for (mode, status, code, needle) in modes {
        // A well-behaved factory runs alongside each attack.
        let factory = format!("hostile-{mode}-fail");
        let (bad, good) = tokio::join!(post(&s, &factory, img.clone()), post(&s, "acme", img.clone()));
        assert_eq!(good.status(), 200, "acme while {mode} runs");
        assert_eq!(bad.status(), status, "{mode}");
        let v: Value = bad.json().await.unwrap();
        let e = &v["error"];
        assert_eq!(e["code"], code, "{mode}: {v}");
        assert_eq!(e["plugin"], "hostile", "{mode}: {v}");
        assert_eq!(e["factory"], format!("hostile-{mode}-fail"));
        let message = e["message"].as_str().unwrap();
        eprintln!("{mode:>10}: {status} {code}: {message}");
        assert!(message.contains(needle), "{mode}: `{message}` lacks `{needle}`");
        assert!(!message.contains("SANDBOX BREACH"), "{mode}: {message}");
    }

    // pass_through: the request goes on without the plugin and says why.
    let r = post(&s, "hostile-panic-pass_through", img.clone()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["plugin_errors"][0]["reason"], "trap", "{v}");
    assert_eq!(v["label"], "scratches");

    // The server is still healthy and serving.
    assert_eq!(s.client.get(s.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(post(&s, "acme", img).await.status(), 200);
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("lineside_plugin_failures_total"), "plugin failures are counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_file_swaps_under_load_without_failures() {
    let cache_dir = tempdir("reload");
    let cache = cache_dir.path().to_path_buf();
    let plugin_dir = tempdir("reload-plugins");
    let dir = plugin_dir.path().to_path_buf();
    let rule = dir.join("rule.wasm");
    replace(&rule, &std::fs::read(guest_wasm("defect-codes")).unwrap());
    let toml = model_toml(&cache)
        + &format!(
            r#"
[[factories]]
name = "swap"
postprocess = {{ path = "{}", config = {{ codes = {} }} }}
"#,
            rule.display(),
            codes_toml()
        );
    let s = Arc::new(TestServer::ready(&toml).await);
    let img = neu_image("inclusion_1.jpg");

    // Load: 4 clients in a loop, recording when each answer came and what it said.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (s, stop, img) = (s.clone(), stop.clone(), img.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = post(&s, "swap", img.clone()).await;
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.unwrap();
                    seen.push((t0.elapsed(), status, v["verdict"].as_str().unwrap_or_default().to_string()));
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let swapped_at = t0.elapsed();
    replace(&rule, &std::fs::read(guest_wasm("review-all")).unwrap());
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);

    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    assert!(answers.len() >= 20, "the load ran: {} requests", answers.len());
    assert!(answers.iter().all(|(_, status, _)| *status == 200), "no failed requests during the swap");
    assert!(answers.iter().filter(|(t, ..)| *t < swapped_at).all(|(.., v)| v == "fail"), "old rule before the swap");
    let first_new = answers.iter().filter(|(_, _, v)| v == "review").map(|(t, ..)| *t).min();
    eprintln!(
        "{} requests, all 200; first answer from the new plugin {:?} after the file was replaced",
        answers.len(),
        first_new.map(|t| t.saturating_sub(swapped_at))
    );
    let late: Vec<_> = answers.iter().filter(|(t, ..)| *t > swapped_at + Duration::from_secs(1)).collect();
    assert!(!late.is_empty() && late.iter().all(|(.., v)| v == "review"), "new rule within a second: {late:?}");

    // A broken file is refused: the working version keeps serving and the failure is reported.
    replace(&rule, b"\0asm not really");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = post(&s, "swap", img.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["verdict"], "review");
    let v: Value = s.client.get(s.url("/v1/factories")).send().await.unwrap().json().await.unwrap();
    let slot = &v["factories"][0]["postprocess"];
    assert!(slot["last_error"].as_str().unwrap().contains("component"), "{slot}");
    assert_eq!(slot["reloads"], 1);
    let r = s.client.post(s.url("/v1/factories/swap/reload")).send().await.unwrap();
    assert_eq!(r.status(), 401, "reloading is an admin call");
    let r = s.client.post(s.url("/v1/factories/swap/reload")).bearer_auth("t0ken").send().await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(error_code(r).await, "plugin_load_failed");

    // The admin API swaps a fixed file in at once.
    replace(&rule, &std::fs::read(guest_wasm("defect-codes")).unwrap());
    let r = s.client.post(s.url("/v1/factories/swap/reload")).bearer_auth("t0ken").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(post(&s, "swap", img).await.json::<Value>().await.unwrap()["verdict"], "fail");
}

#[test]
fn plugin_check_names_the_world() {
    let bin = env!("CARGO_BIN_EXE_lineside");
    let out = std::process::Command::new(bin).args(["plugin", "check"]).arg(guest_wasm("roi-crop")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("lineside:plugin@0.1.0 preprocessor"), "{text}");
    assert!(text.contains("lineside:plugin/preprocess@0.1.0"), "{text}");
    assert!(text.contains("wasi:cli/stderr@0.2.6"), "{text}");

    let out =
        std::process::Command::new(bin).args(["plugin", "check"]).arg(guest_wasm("defect-codes")).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("postprocessor"));

    let junk_dir = tempdir("check");
    let junk = junk_dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    let out = std::process::Command::new(bin).args(["plugin", "check"]).arg(&junk).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid WebAssembly component"));
}

/// Replaces `path` atomically, as a deploy would (write beside it, then rename).
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A fresh temporary directory, removed when dropped.
fn tempdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("lineside-test-{name}")).tempdir().unwrap()
}
