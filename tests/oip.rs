//! The Open Inference Protocol (KServe v2): raw protocol checks, anomaly
//! outputs, and NVIDIA's own Python client against the real server.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::TestServer;
use serde_json::{Value, json};

/// A binary-data request: the JSON header, then each input's bytes.
fn binary_request(head: &Value, tail: &[u8]) -> (String, Vec<u8>) {
    let head = head.to_string();
    let mut body = head.as_bytes().to_vec();
    body.extend_from_slice(tail);
    (head.len().to_string(), body)
}

/// BYTES elements as the binary extension frames them.
fn bytes_elements(items: &[&[u8]]) -> Vec<u8> {
    items.iter().flat_map(|b| (b.len() as u32).to_le_bytes().into_iter().chain(b.iter().copied())).collect()
}

/// The JSON header and binary tail of a response.
async fn split_response(r: reqwest::Response) -> (Value, Vec<u8>) {
    let len: usize = r.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let body = r.bytes().await.unwrap();
    (serde_json::from_slice(&body[..len]).unwrap(), body[len..].to_vec())
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

async fn v1(s: &TestServer, query: &str, image: Vec<u8>) -> Value {
    let r = s.inspect(query, "application/octet-stream", image).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_json_tensors_match_v1() {
    let s = TestServer::ready("[server]\ntop_k = 6\n").await;
    let (a, b) = (common::neu_image("scratches_3.jpg"), common::neu_image("inclusion_7.jpg"));

    // Two images in one binary request, all outputs binary (tritonclient's default when none are named).
    let tail = bytes_elements(&[&a, &b]);
    let head = json!({"id": "req-1", "parameters": {"binary_data_output": true},
        "inputs": [{"name": "IMAGE", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": tail.len()}}]});
    let (len, body) = binary_request(&head, &tail);
    let r = s
        .client
        .post(s.url("/v2/models/steel-surface/infer"))
        .header("inference-header-content-length", len)
        .body(body);
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (head, tail) = split_response(r).await;
    assert_eq!(head["id"], "req-1");
    assert_eq!(head["outputs"][0]["name"], "scores");
    assert_eq!(head["outputs"][0]["shape"], json!([2, 6]));
    let n = head["outputs"][0]["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
    let scores = f32s(&tail[..n]);
    let labels: Vec<String> = {
        let v: Value = s.client.get(s.url("/v1/models/steel-surface")).send().await.unwrap().json().await.unwrap();
        v["model"]["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect()
    };
    for (row, image) in [a.clone(), b.clone()].into_iter().enumerate() {
        let answer = v1(&s, "", image).await;
        for p in answer["predictions"].as_array().unwrap() {
            let i = labels.iter().position(|l| l == p["label"].as_str().unwrap()).unwrap();
            let (got, want) = (scores[row * 6 + i], p["score"].as_f64().unwrap() as f32);
            assert!((got - want).abs() < 1e-6, "row {row} {}: v2 {got} vs v1 {want}", p["label"]);
        }
    }

    // JSON in and out: base64 image, selected outputs.
    use base64::Engine as _;
    let req = json!({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
        "parameters": {"content_type": "base64"}, "data": [base64::engine::general_purpose::STANDARD.encode(&a)]}],
        "outputs": [{"name": "label"}, {"name": "inspection"}]});
    let r = s.client.post(s.url("/v2/models/steel-surface/infer")).json(&req).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("inference-header-content-length").is_none());
    let v: Value = r.json().await.unwrap();
    let names: Vec<&str> = v["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["label", "inspection"]);
    let inspection: Value = serde_json::from_str(v["outputs"][1]["data"][0].as_str().unwrap()).unwrap();
    assert_eq!(v["outputs"][0]["data"][0], inspection["label"]);
    assert_eq!(inspection["record"]["stored"], true, "v2 inspections are recorded like /v1: {inspection}");
    let stored = s.client.get(s.url(&format!("/v1/inspections/{}", inspection["id"].as_str().unwrap())));
    assert_eq!(stored.send().await.unwrap().status(), 200);

    // Versions: the served one answers, another is not found.
    let meta: Value = s.client.get(s.url("/v2/models/steel-surface")).send().await.unwrap().json().await.unwrap();
    let version = meta["versions"][0].as_str().unwrap();
    let ok = s.client.get(s.url(&format!("/v2/models/steel-surface/versions/{version}/ready"))).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let gone = s.client.get(s.url("/v2/models/steel-surface/versions/0000/ready")).send().await.unwrap();
    assert_eq!(gone.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_protocol_error() {
    let s = TestServer::ready("").await;
    let post = |body: Vec<u8>, header: Option<&str>| {
        let mut r = s.client.post(s.url("/v2/models/steel-surface/infer")).body(body);
        if let Some(h) = header {
            r = r.header("inference-header-content-length", h);
        }
        r.send()
    };
    let cases: Vec<(Vec<u8>, Option<&str>, u16)> = vec![
        (b"{not json".to_vec(), None, 400),
        (
            br#"{"inputs":[{"name":"IMAGE","shape":[1],"datatype":"BYTES","data":["not an image"]}]}"#.to_vec(),
            None,
            400,
        ),
        (
            br#"{"inputs":[{"name":"INPUT","shape":[1,3,2,2],"datatype":"FP32","data":[0,0,0,0,0,0,0,0,0,0,0,0]}]}"#
                .to_vec(),
            None,
            400,
        ),
        (br#"{"inputs":[{"name":"PIXELS","shape":[1],"datatype":"FP32","data":[0]}]}"#.to_vec(), None, 400),
        (br#"{"inputs":[]}"#.to_vec(), None, 400),
        (br#"{"inputs":[]}"#.to_vec(), Some("4096"), 400),
        (
            br#"{"inputs":[{"name":"IMAGE","shape":[1],"datatype":"BYTES","data":["x"]}],"outputs":[{"name":"nope"}]}"#
                .to_vec(),
            None,
            400,
        ),
    ];
    for (body, header, status) in cases {
        let text = String::from_utf8_lossy(&body).to_string();
        let r = post(body, header).await.unwrap();
        assert_eq!(r.status(), status, "{text}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "the protocol's error shape: {v}");
    }
    let r = s.client.get(s.url("/v2/models/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = s.client.post(s.url("/v2/models/nope/infer")).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomaly_models_give_scores_and_maps() {
    let models = tempfile::tempdir().unwrap();
    let s = TestServer::ready(&common::fitting_toml(models.path())).await;
    common::fit_bottle(&s, "bottle").await;
    let bottle = common::bottle;

    let meta: Value = s.client.get(s.url("/v2/models/bottle")).send().await.unwrap().json().await.unwrap();
    assert_eq!(meta["platform"], "lineside_anomaly");
    let broken = bottle("test/broken_large/000.png");
    let tail = bytes_elements(&[&broken]);
    let head = json!({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": tail.len()}}],
        "outputs": [{"name": "anomaly_score", "parameters": {"binary_data": true}}, {"name": "anomaly_map", "parameters": {"binary_data": true}}, {"name": "verdict"}]});
    let (len, body) = binary_request(&head, &tail);
    let r = s.client.post(s.url("/v2/models/bottle/infer")).header("inference-header-content-length", len).body(body);
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (head, tail) = split_response(r).await;
    let score = f32s(&tail[..4])[0];
    let shape = head["outputs"][1]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect::<Vec<_>>();
    assert_eq!(shape[0], 1);
    let map = f32s(&tail[4..]);
    assert_eq!(map.len(), shape[1] * shape[2], "the map's shape matches its data");
    assert_eq!(head["outputs"][2]["data"][0], "fail");
    let answer = v1(&s, "?model=bottle", broken).await;
    let want = answer["anomaly_score"].as_f64().unwrap() as f32;
    assert!((score - want).abs() < 1e-6, "v2 score {score} vs v1 {want}");
    assert!(map.iter().copied().fold(f32::MIN, f32::max) > 0.5, "the broken part's map crosses the threshold");
}

/// A Python interpreter from `var`, which must be set.
fn python(var: &str, install: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run the tests with `bash .ci/test`, or make a venv with `pip install {install}` and point {var} at its python")
    })
}

/// Runs `script` (a Python client) against a real server and checks that
/// what it got through v2, from an encoded image and from an FP32 tensor it
/// preprocessed itself, matches `/v1`. Returns what the client printed.
async fn client_matches_v1(python: PathBuf, script: &str) -> Value {
    let s = TestServer::ready("[server]\ntop_k = 6\n").await;
    // A 256×256 part: the model resizes to 256 and crops 224, so at this size
    // preprocessing is a crop and the Python side can compute the FP32 input itself.
    let dir = tempfile::tempdir().unwrap();
    let img = image::load_from_memory(&common::neu_image("patches_12.jpg")).unwrap();
    let img = img.resize_exact(256, 256, image::imageops::FilterType::Triangle).to_rgb8();
    let png = dir.path().join("part.png");
    img.save(&png).unwrap();
    let pixels = dir.path().join("part.rgb");
    std::fs::write(&pixels, img.as_raw()).unwrap();

    let out = Command::new(python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script))
        .args([s.base.trim_start_matches("http://"), "steel-surface"])
        .args([png.as_os_str(), pixels.as_os_str()])
        .args(["256", "0.485,0.456,0.406", "0.229,0.224,0.225", "224"])
        .output()
        .expect("run the Python client");
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{script} saw: {}", serde_json::to_string_pretty(&seen).unwrap());
    assert_eq!(seen["live"], true);
    assert_eq!(seen["ready"], true);
    assert_eq!(seen["model_ready"], true);

    let answer = v1(&s, "", std::fs::read(&png).unwrap()).await;
    let meta: Value = s.client.get(s.url("/v2/models/steel-surface")).send().await.unwrap().json().await.unwrap();
    let labels: Vec<&str> =
        meta["parameters"]["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    let v1_score = |label: &str| {
        let p = answer["predictions"].as_array().unwrap().iter().find(|p| p["label"] == label).unwrap();
        p["score"].as_f64().unwrap()
    };
    for (path, tol) in [("bytes", 1e-6), ("fp32", 1e-4)] {
        assert_eq!(seen[path]["label"], answer["label"], "{path}: same top label as /v1");
        let scores = seen[path]["scores"].as_array().unwrap();
        let worst =
            labels.iter().zip(scores).map(|(l, s)| (s.as_f64().unwrap() - v1_score(l)).abs()).fold(0.0, f64::max);
        eprintln!("{script} {path}: largest |v2 - v1| probability difference {worst:.2e}");
        assert!(worst < tol, "{path}: scores differ from /v1 by {worst}");
    }
    assert_eq!(seen["bytes"]["verdict"], answer["verdict"]);
    assert_eq!(seen["bytes"]["inspection"]["model"], answer["model"]);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvidia_tritonclient_works_unchanged() {
    // `.ci/test` makes this venv in target/ci-python (about 170 MB).
    let python = python("LINESIDE_TEST_PYTHON", "'tritonclient[http]'");
    let seen = client_matches_v1(python, "triton_client.py").await;
    assert_eq!(seen["server"]["name"], "lineside");
    assert_eq!(seen["metadata"]["inputs"][0]["name"], "IMAGE");
    assert_eq!(seen["fp32"]["outputs"], json!(["scores", "label"]));
    assert!(seen["unknown_model_error"].as_str().is_some_and(|e| e.contains("no-such-model")), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the kserve package (about 450 MB): LINESIDE_TEST_KSERVE_PYTHON=… cargo test --test oip -- --ignored"]
async fn kserve_client_works_unchanged() {
    let python = python("LINESIDE_TEST_KSERVE_PYTHON", "kserve");
    client_matches_v1(python, "kserve_client.py").await;
}
