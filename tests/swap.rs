//! Replacing a served model while it serves: a new version loads and warms up
//! beside the old one and is swapped in atomically; a broken one is refused
//! with the old version still serving; a rollback brings the old one back.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::{TestServer, error_code, neu_image, shared, spawn_load, stop_load, wait_for};
use serde_json::{Value, json};

const TOKEN: &str = "swap-t0ken";

fn model_dir(name: &str) -> String {
    shared().join("models").join(name).display().to_string()
}

async fn put(s: &TestServer, source: &str) -> reqwest::Response {
    s.client.put(s.url("/v1/models/line")).bearer_auth(TOKEN).json(&json!({ "source": source })).send().await.unwrap()
}

async fn versions(s: &TestServer) -> Value {
    s.client.get(s.url("/v1/models/line")).send().await.unwrap().json().await.unwrap()
}

/// A copy of `from` with its config edited, or its weights taken from `weights_of`.
/// Removed when the returned guard drops.
fn broken_folder(
    tag: &str,
    from: &str,
    edit: impl Fn(&mut Value),
    weights_of: Option<&str>,
) -> (tempfile::TempDir, String) {
    let guard = tempfile::Builder::new().prefix(&format!("lineside-test-{tag}")).tempdir().unwrap();
    let dir = guard.path();
    let src = shared().join("models").join(from);
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    if let Some(w) = weights_of {
        std::fs::copy(shared().join("models").join(w).join("model.safetensors"), dir.join("model.safetensors"))
            .unwrap();
    }
    let path = dir.display().to_string();
    (guard, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_under_load_refuse_broken_versions_and_roll_back() {
    let toml = format!(
        "[server]\ndefault_model = \"line\"\nadmin_token = \"{TOKEN}\"\n\n[[models]]\nname = \"line\"\nsource = \"{}\"\nmax_batch_size = 4\n",
        model_dir("test_resnet.random6")
    );
    let s = Arc::new(TestServer::ready(&toml).await);
    let v_a = versions(&s).await["model"]["version"].as_str().unwrap().to_string();

    // Admin calls need the token.
    let r = s.client.put(s.url("/v1/models/line")).json(&json!({"source": "x"})).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // Load: 4 clients until told to stop, recording which version answered.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = spawn_load(&s, 4, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Swap to ConvNeXt under load.
    let r = put(&s, &model_dir("test_convnext.random6")).await;
    assert_eq!(r.status(), 202);
    let v_b = r.json::<Value>().await.unwrap()["pending_version"].as_str().unwrap().to_string();
    assert_ne!(v_a, v_b);
    let v = wait_for(&s, "/v1/models/line", "B swapped in", |v| v["model"]["version"] == v_b.as_str()).await;
    assert_eq!(v["model"]["architecture"], "test_convnext");
    assert_eq!(v["versions"]["previous_version"], v_a.as_str());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A device this build cannot use, or one that does not parse: refused at once.
    let with_device = |device: &str| json!({ "source": model_dir("test_resnet.random6"), "device": device });
    for (device, needle) in [("cuda:0", "--features cuda"), ("tpu", "expected `cpu`, `cuda` or `cuda:N`")] {
        if device.starts_with("cuda") && lineside_inference::ComputeDevice::cuda_built() {
            continue; // a CUDA build would try the GPU instead
        }
        let body = with_device(device);
        let r = s.client.put(s.url("/v1/models/line")).bearer_auth(TOKEN).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400, "device {device}");
        let text = r.text().await.unwrap();
        assert!(text.contains(needle), "device {device}: {text}");
    }

    // Broken versions, each refused while B keeps serving.
    let (_missing, missing_weights) = broken_folder("no-weights", "test_resnet.random6", |_| {}, None);
    let r = put(&s, &missing_weights).await;
    assert_eq!(r.status(), 422);
    assert!(error_code(r).await == "load_failed");
    let (_wrong, wrong_shapes) =
        broken_folder("wrong-shapes", "test_resnet.random6", |_| {}, Some("test_convnext.random6"));
    assert_eq!(put(&s, &wrong_shapes).await.status(), 202, "reading works; loading fails in the background");
    let v = wait_for(&s, "/v1/models/line", "wrong shapes reported", |v| v["versions"]["last_error"].is_string()).await;
    let error = v["versions"]["last_error"].as_str().unwrap();
    eprintln!("wrong shapes: {error}");
    assert!(error.contains("lack tensor") || error.contains("shape"), "{error}");
    assert_eq!(v["model"]["version"], v_b.as_str(), "B still serves");
    let (_unsupported, unsupported) = broken_folder(
        "unsupported",
        "test_resnet.random6",
        |c| c["architecture"] = json!("vit_base_patch16_224"),
        Some("test_resnet.random6"),
    );
    assert_eq!(put(&s, &unsupported).await.status(), 202);
    let v = wait_for(&s, "/v1/models/line", "unsupported architecture reported", |v| {
        v["versions"]["last_error"].as_str().is_some_and(|e| e.contains("vit_base_patch16_224"))
    })
    .await;
    let error = v["versions"]["last_error"].as_str().unwrap();
    eprintln!("unsupported: {error}");
    assert!(error.contains("supported:") && error.contains("resnet50"), "lists what is supported: {error}");
    assert_eq!(v["model"]["version"], v_b.as_str(), "B still serves");

    let answers = stop_load(&stop, clients).await;
    let on_b = answers.iter().filter(|(_, v)| *v == v_b).count();
    eprintln!("{} requests during the swaps: {} by A, {} by B", answers.len(), answers.len() - on_b, on_b);
    assert!(answers.iter().all(|(status, _)| *status == 200), "no failed requests");
    assert!(answers.iter().all(|(_, v)| *v == v_a || *v == v_b), "only A and B answered");
    assert!(on_b > 0 && answers.last().unwrap().1 == v_b, "responses switched to B");

    // Rollback to A, then there is nothing further back.
    let r = s.client.post(s.url("/v1/models/line/rollback")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = s.inspect("", "image/jpeg", neu_image("crazing_1.jpg")).await;
    assert_eq!(r.json::<Value>().await.unwrap()["model"]["version"], v_a.as_str());
}
