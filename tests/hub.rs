//! Models from a hub: the real hf-hub client against a local server that
//! speaks the hub's protocol (tests/common/hub.rs). Swapping by revision
//! under load, broken revisions, the offline cache, and parity of every
//! reference model fetched through the hub path.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::hub::LocalHub;
use common::{TestServer, shared, spawn_load, stop_load, wait_for};
use serde_json::{Value, json};

const TOKEN: &str = "hub-t0ken";
const REPO: &str = "acme/line-classifier";

fn model_dir(name: &str) -> PathBuf {
    shared().join("models").join(name)
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap()
}

/// A fresh temporary directory, removed when dropped.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("lineside-hub-{tag}")).tempdir().unwrap()
}

/// v1 is ResNet, v2 ConvNeXt, v3 EfficientNet; the rest are broken on purpose.
fn publish_line_repo(hub: &LocalHub) -> [String; 3] {
    let (resnet, convnext) = (model_dir("test_resnet.random6"), model_dir("test_convnext.random6"));
    let v1 = hub.publish_folder(REPO, "v1", &resnet, &["ref.json", "ref.safetensors"]);
    let v2 = hub.publish_folder(REPO, "v2", &convnext, &["ref.json", "ref.safetensors"]);
    let v3 = hub.publish_folder(REPO, "v3", &model_dir("test_efficientnet.random6"), &["ref.json", "ref.safetensors"]);
    hub.publish(REPO, "no-weights", vec![("config.json", read(&resnet, "config.json"))]);
    hub.publish(
        REPO,
        "wrong-shapes",
        vec![
            ("config.json", read(&resnet, "config.json")),
            ("model.safetensors", read(&convnext, "model.safetensors")),
        ],
    );
    let mut cfg: Value = serde_json::from_slice(&read(&resnet, "config.json")).unwrap();
    cfg["architecture"] = json!("vit_base_patch16_224");
    hub.publish(
        REPO,
        "unsupported",
        vec![("config.json", cfg.to_string().into_bytes()), ("model.safetensors", read(&resnet, "model.safetensors"))],
    );
    [v1, v2, v3]
}

async fn put(s: &TestServer, revision: &str) -> reqwest::Response {
    let body = json!({ "source": format!("hf://{REPO}"), "revision": revision });
    s.client.put(s.url("/v1/models/line")).bearer_auth(TOKEN).json(&body).send().await.unwrap()
}

async fn status(s: &TestServer) -> Value {
    s.client.get(s.url("/v1/models/line")).send().await.unwrap().json().await.unwrap()
}

/// The load error reported for a broken revision, after checking that the served version stayed.
async fn refused(s: &TestServer, revision: &str, served: &str) -> String {
    let r = put(s, revision).await;
    let code = r.status().as_u16();
    let error = if code == 202 {
        let v = wait_for(s, "/v1/models/line", revision, |v| v["versions"]["last_error"].is_string()).await;
        v["versions"]["last_error"].as_str().unwrap().to_string()
    } else {
        assert_eq!(code, 422, "{revision}");
        let v = status(s).await;
        v["versions"]["last_error"].as_str().expect("status shows the error").to_string()
    };
    eprintln!("{revision}: HTTP {code}: {error}");
    assert_eq!(status(s).await["model"]["version"], served, "{revision}: the served version stays");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_revision_under_load_refuse_broken_revisions_and_serve_from_cache() {
    let mut hub = LocalHub::start().await;
    let [c1, c2, c3] = publish_line_repo(&hub);
    let cache_dir = temp_dir("server-cache");
    let cache = cache_dir.path().to_path_buf();
    let toml = format!(
        "[server]\ndefault_model = \"line\"\nadmin_token = \"{TOKEN}\"\n\n[hub]\nendpoint = \"{}\"\ncache_dir = \"{}\"\n\n[[models]]\nname = \"line\"\nsource = \"hf://{REPO}@v1\"\nmax_batch_size = 4\n",
        hub.endpoint,
        cache.display()
    );
    let s = Arc::new(TestServer::ready(&toml).await);
    let a = status(&s).await;
    assert_eq!(a["model"]["commit"], c1.as_str(), "{a}");
    assert_eq!(a["model"]["architecture"], "test_resnet");
    let v_a = a["model"]["version"].as_str().unwrap().to_string();
    assert!(cache.join("models--acme--line-classifier/snapshots").join(&c1).join("model.safetensors").exists());

    // 4 clients until told to stop, recording who answered.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = spawn_load(&s, 4, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Pull B by revision while the load runs.
    let r = put(&s, "v2").await;
    assert_eq!(r.status(), 202);
    let v_b = r.json::<Value>().await.unwrap()["pending_version"].as_str().unwrap().to_string();
    let b = wait_for(&s, "/v1/models/line", "B swapped in", |v| v["model"]["version"] == v_b.as_str()).await;
    assert_eq!(b["model"]["commit"], c2.as_str());
    assert_eq!(b["model"]["source"], format!("hf://{REPO}@v2"));
    assert_eq!(b["model"]["architecture"], "test_convnext");
    assert_eq!(b["versions"]["previous_version"], v_a.as_str());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Broken revisions: B keeps serving and the status says why.
    let e = refused(&s, "no-weights", &v_b).await;
    assert!(e.contains("model.safetensors") && e.contains(REPO) && e.contains("no-weights"), "{e}");
    let e = refused(&s, "no-such-revision", &v_b).await;
    assert!(e.contains("config.json") && e.contains("no-such-revision"), "{e}");
    let e = refused(&s, "wrong-shapes", &v_b).await;
    assert!(e.contains("lack tensor") || e.contains("shape"), "{e}");
    let e = refused(&s, "unsupported", &v_b).await;
    assert!(e.contains("vit_base_patch16_224") && e.contains("supported:") && e.contains("resnet50"), "{e}");

    let answers = stop_load(&stop, clients).await;
    let on_b = answers.iter().filter(|(_, v)| *v == v_b).count();
    eprintln!(
        "{} requests during the pull and the broken revisions: {} by A, {} by B",
        answers.len(),
        answers.len() - on_b,
        on_b
    );
    assert!(answers.iter().all(|(status, _)| *status == 200), "no failed requests");
    assert!(answers.iter().all(|(_, v)| *v == v_a || *v == v_b), "only A and B answered");
    assert!(on_b > 0 && answers.last().unwrap().1 == v_b, "responses switched to B");

    // Hub gone: the cached v1 still loads; the never-fetched v3 fails fast and clearly.
    hub.stop().await;
    let t = Instant::now();
    let r = put(&s, "v1").await;
    let (code, body) = (r.status(), r.text().await.unwrap());
    eprintln!("hub down, cached v1: HTTP {code} in {:?}: {body}", t.elapsed());
    assert_eq!(code, 202);
    let back = wait_for(&s, "/v1/models/line", "cached A swapped in", |v| v["model"]["version"] == v_a.as_str()).await;
    assert_eq!(back["model"]["commit"], c1.as_str());
    let t = Instant::now();
    let r = put(&s, "v3").await;
    let elapsed = t.elapsed();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    eprintln!("hub down, uncached v3: HTTP 502 in {elapsed:?}: {message}");
    assert_eq!(v["error"]["code"], "hub_unavailable");
    assert!(message.contains("v3") && message.contains("not in the local cache"), "{message}");
    assert!(elapsed < Duration::from_secs(10), "fails fast, not after a long hang: {elapsed:?}");
    assert!(!cache.join("models--acme--line-classifier/snapshots").join(&c3).exists(), "v3 was never fetched");
    assert_eq!(status(&s).await["model"]["version"], v_a.as_str(), "A still serves");
}

/// Runs the lineside binary with the hub environment.
async fn lineside(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_lineside"));
    cmd.args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reference_model_matches_pytorch_through_the_hub_and_offline() {
    let mut hub = LocalHub::start().await;
    let names = [
        "mobilenetv2_100.imagenet",
        "tf_efficientnet_lite0.imagenet",
        "test_resnet.random6",
        "test_efficientnet.random6",
        "test_convnext.random6",
    ];
    let mut commits = Vec::new();
    for n in names {
        let repo = format!("timm-ref/{n}");
        commits.push(if n == "test_convnext.random6" {
            // The shared reference's feature maps came from a network whose weights never
            // loaded; publish the one regenerated with them (inference/tests/fixtures).
            let dir = model_dir(n);
            let fixed = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("inference/tests/fixtures/test_convnext_ref.safetensors");
            let files = vec![
                ("config.json", read(&dir, "config.json")),
                ("model.safetensors", read(&dir, "model.safetensors")),
                ("ref.safetensors", std::fs::read(fixed).unwrap()),
            ];
            hub.publish(&repo, "main", files)
        } else {
            hub.publish_folder(&repo, "main", &model_dir(n), &[])
        });
    }
    let cache_dir = temp_dir("cli-cache");
    let cache = cache_dir.path().to_path_buf();
    let (cache_s, endpoint) = (cache.display().to_string(), hub.endpoint.clone());
    let online = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", cache_s.as_str())];

    for (n, commit) in names.iter().zip(&commits) {
        let source = format!("hf://timm-ref/{n}");
        let o = lineside(&["models", "pull", &source], &online).await;
        assert!(o.status.success(), "pull {n}: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains(&format!("commit   {commit}")), "{out}");
        let snapshot = cache.join(format!("models--timm-ref--{n}/snapshots/{commit}"));
        assert!(out.contains(&snapshot.display().to_string()), "{out}");
        assert!(snapshot.join("ref.safetensors").exists());

        let o = lineside(&["models", "verify", &source], &online).await;
        eprintln!("{}", text(&o).trim_end());
        assert!(o.status.success(), "verify {n} through the hub path: {}", text(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("top-1 matches"));
    }

    let o = lineside(&["models", "list"], &online).await;
    let listed = String::from_utf8_lossy(&o.stdout).to_string();
    for (n, commit) in names.iter().zip(&commits) {
        assert!(listed.contains(&format!("hf://timm-ref/{n}@{commit} (main)")), "{listed}");
    }

    // Offline, with the hub still up: no request reaches it, cached revisions load, others fail at once.
    let before = hub.requests();
    let offline = [online[0], online[1], ("HF_HUB_OFFLINE", "1")];
    let o = lineside(&["models", "verify", "hf://timm-ref/test_resnet.random6"], &offline).await;
    assert!(o.status.success(), "cached, offline: {}", text(&o));
    let pinned = format!("hf://timm-ref/test_convnext.random6@{}", commits[4]);
    let o = lineside(&["models", "verify", &pinned], &offline).await;
    assert!(o.status.success(), "pinned commit, offline: {}", text(&o));
    let t = Instant::now();
    let o = lineside(&["models", "verify", "hf://timm-ref/never-pulled"], &offline).await;
    let elapsed = t.elapsed();
    let message = text(&o);
    eprintln!("offline, uncached: exit {:?} in {elapsed:?}: {}", o.status.code(), message.trim_end());
    assert!(!o.status.success());
    assert!(message.contains("hf://timm-ref/never-pulled") && message.contains("config.json"), "{message}");
    assert!(message.contains("not in the local cache") && message.contains("HF_HUB_OFFLINE"), "{message}");
    assert_eq!(hub.requests(), before, "offline touched no server");

    // Hub down without HF_HUB_OFFLINE: the cache answers after the failed request.
    hub.stop().await;
    let o = lineside(&["models", "verify", "hf://timm-ref/test_efficientnet.random6"], &online).await;
    assert!(o.status.success(), "cached, hub down: {}", text(&o));
    let o = lineside(&["models", "pull", "hf://timm-ref/never-pulled"], &online).await;
    assert!(!o.status.success() && text(&o).contains("the hub is unreachable"), "{}", text(&o));
}
