//! Artifact integrity: models and plugins pinned by digest, Ed25519
//! signatures from trusted keys, refusal on mismatch at start, on a model
//! swap and on a plugin hot reload.

mod common;

use std::path::Path;

use common::{TestServer, guest_wasm, shared};
use lineside::config::Config;
use lineside::integrity::{MODEL_SIGNATURE, generate_key, model_digest, plugin_signature_path, sha256_hex, sign};
use serde_json::json;

/// A copy of a reference model folder (config.json + model.safetensors).
fn model_copy(dir: &Path) -> std::path::PathBuf {
    let src = shared().join("models/test_resnet.random6");
    let dst = dir.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

/// Starts a server and returns the error it stops with, if it does not start.
async fn start_error(toml: &str) -> Option<String> {
    let cfg = Config::from_toml(toml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = lineside::server::serve(cfg, listener, std::future::pending());
    match tokio::time::timeout(std::time::Duration::from_secs(5), run).await {
        Ok(Err(e)) => Some(format!("{e:#}")),
        _ => None,
    }
}

fn model_toml(dir: &Path, data: &Path, extra: &str) -> String {
    format!(
        "[server]\ndefault_model = \"m\"\n[records]\ndata_dir = \"{}\"\n[[models]]\nname = \"m\"\nsource = \"{}\"\n{extra}",
        data.display(),
        dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_model_loads_only_with_its_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_copy(tmp.path());
    let digest = model_digest(&dir).unwrap();

    // The digest `lineside models digest` prints is the one that is checked.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lineside"))
        .args(["models", "digest", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);

    let ok = model_toml(&dir, tmp.path(), &format!("sha256 = \"{digest}\"\n"));
    let s = TestServer::ready(&ok).await;
    let v: serde_json::Value = s.client.get(s.url("/v1/models/m")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["model"]["status"], "ready");

    let wrong = model_toml(&dir, tmp.path(), &format!("sha256 = \"{}\"\n", "0".repeat(64)));
    let err = start_error(&wrong).await.expect("a wrong pin stops the start");
    assert!(err.contains("the config pins"), "{err}");

    // Relabelling the classes is a change like any other.
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), config.replacen("\"num_classes\"", "\"num_classes\" ", 1)).unwrap();
    let err = start_error(&ok).await.expect("an edited config.json no longer matches the pin");
    assert!(err.contains(&digest), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_models_are_required_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_copy(tmp.path());
    let (private, public) = generate_key();
    let (stranger, _) = generate_key();
    let trusted = format!("[integrity]\ntrusted_keys = [\"{public}\"]\nrequire_signatures = true\n");
    let toml = model_toml(&dir, tmp.path(), "").replacen("[server]\n", "[server]\nadmin_token = \"t\"\n", 1) + &trusted;

    let err = start_error(&toml).await.expect("an unsigned model is refused");
    assert!(err.contains("no signature"), "{err}");

    std::fs::write(dir.join(MODEL_SIGNATURE), sign(&stranger, &model_digest(&dir).unwrap()).unwrap()).unwrap();
    let err = start_error(&toml).await.expect("a signature by an untrusted key is refused");
    assert!(err.contains("not valid"), "{err}");

    std::fs::write(dir.join(MODEL_SIGNATURE), sign(&private, &model_digest(&dir).unwrap()).unwrap()).unwrap();
    let s = TestServer::ready(&toml).await;

    // A swap to another folder must be signed too: unsigned, it is refused and the served version stays.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), other.join(f)).unwrap();
    }
    std::fs::write(other.join("config.json"), std::fs::read_to_string(dir.join("config.json")).unwrap() + "\n")
        .unwrap();
    let r = s
        .client
        .put(s.url("/v1/models/m"))
        .bearer_auth("t")
        .json(&json!({"source": other.display().to_string()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("no signature"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_plugin_refuses_a_different_file_on_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = tmp.path().join("rule.wasm");
    let codes = std::fs::read(guest_wasm("defect-codes")).unwrap();
    std::fs::write(&plugin, &codes).unwrap();
    let (private, public) = generate_key();
    std::fs::write(plugin_signature_path(&plugin), sign(&private, &sha256_hex(&codes)).unwrap()).unwrap();
    let toml = format!(
        "[server]\nadmin_token = \"t\"\n[plugins]\nwatch_interval_ms = 0\n[integrity]\ntrusted_keys = [\"{public}\"]\n\
         [[factories]]\nname = \"f\"\npostprocess = {{ path = \"{}\", sha256 = \"{}\" }}\n",
        plugin.display(),
        sha256_hex(&codes)
    );
    let s = TestServer::ready(&toml).await;

    // Another valid component, dropped in place of the pinned one.
    std::fs::write(&plugin, std::fs::read(guest_wasm("review-all")).unwrap()).unwrap();
    let r = s.client.post(s.url("/v1/factories/f/reload")).bearer_auth("t").send().await.unwrap();
    assert_eq!(r.status(), 422);
    let text = r.text().await.unwrap();
    assert!(text.contains("the config pins"), "{text}");
    let v: serde_json::Value = s.client.get(s.url("/v1/factories")).send().await.unwrap().json().await.unwrap();
    let slot = &v["factories"][0]["postprocess"];
    assert_eq!(slot["sha256"], sha256_hex(&codes), "the pinned version keeps serving");
    assert!(slot["last_error"].as_str().unwrap().contains("refused"));
    let r = s.inspect("", "image/jpeg", common::neu_image("crazing_1.jpg")).await;
    assert_eq!(r.status(), 200);

    // A signature that does not match the file is refused at start.
    let bad = toml.replace(&format!(", sha256 = \"{}\"", sha256_hex(&codes)), "");
    let err = start_error(&bad).await.expect("a file the signature does not cover is refused");
    assert!(err.contains("not valid"), "{err}");
}
