//! Anomaly models over real HTTP: fit from a handful of good bottles through
//! the API, then inspect good and broken ones. The fitted model lives in a
//! temporary folder: nothing fit on MVTec AD is kept.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{TestServer, error_code, shared};
use serde_json::Value;

fn bottle(rel: &str) -> Vec<u8> {
    let p = shared().join("data/mvtec-ad/bottle").join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn png(b64: &Value) -> image::DynamicImage {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.as_str().expect("base64 PNG")).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    image::load_from_memory(&bytes).expect("decodable PNG")
}

async fn wait_model_ready(s: &TestServer, name: &str) {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let v: Value = s.client.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
        let m = v["models"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned();
        if m.as_ref().is_some_and(|m| m["status"] == "ready") {
            return;
        }
        assert!(Instant::now() < until, "model {name} not ready: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn inspect(s: &TestServer, query: &str, img: Vec<u8>) -> Value {
    let r = s.inspect(query, "image/png", img).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fit_over_the_api_then_inspect_with_heatmaps() {
    let scratch = tempfile::Builder::new().prefix("lineside-test-anomaly").tempdir().unwrap();
    let dir = scratch.path();
    let backbone = shared().join("models/mobilenetv2_100.imagenet");
    let s = TestServer::ready(&format!(
        "[server]\nmodel_dir = \"{}\"\nfit_backbone = \"{}\"\nadmin_token = \"t0ken\"\n",
        dir.display(),
        backbone.display()
    ))
    .await;

    // Refusals first: too few images, a classifier's name, a bad name.
    let form = |n: usize| {
        (0..n).fold(reqwest::multipart::Form::new(), |f, i| {
            let part = reqwest::multipart::Part::bytes(bottle(&format!("train/good/{i:03}.png"))).file_name("g.png");
            f.part("image", part)
        })
    };
    let fit = |name: &str| s.url(&format!("/v1/models/{name}/fit"));
    let r = s.client.post(fit("bottle")).multipart(form(6)).send().await.unwrap();
    assert_eq!(r.status(), 401, "fitting is an admin call");
    let post = |name: &str| s.client.post(fit(name)).bearer_auth("t0ken");
    let r = post("bottle").multipart(form(2)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = post("steel-surface").multipart(form(6)).send().await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(error_code(r).await, "conflict");
    let r = post("bad.name").multipart(form(6)).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // Fit from 20 good bottles.
    let r = post("bottle").multipart(form(20)).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"]["kind"], "anomaly");
    assert_eq!(v["fit"]["fit"]["good_images"], 20);
    assert!(v["fit"]["memory_bank_size"].as_u64().unwrap() > 100);
    assert!(dir.join("bottle/patchcore.json").is_file() && dir.join("bottle/memory_bank.safetensors").is_file());
    wait_model_ready(&s, "bottle").await;

    let broken = inspect(&s, "?model=bottle&heatmap=png", bottle("test/broken_large/000.png")).await;
    let good = inspect(&s, "?model=bottle&heatmap=png", bottle("test/good/000.png")).await;
    eprintln!("broken: score {} regions {}", broken["anomaly_score"], broken["regions"]);
    eprintln!("good:   score {} regions {}", good["anomaly_score"], good["regions"]);
    assert!(broken["anomaly_score"].as_f64().unwrap() > good["anomaly_score"].as_f64().unwrap());
    assert_eq!(broken["is_anomalous"], true);
    assert_eq!(broken["verdict"], "fail");
    assert_eq!(broken["label"], "anomalous");
    let regions = broken["regions"].as_array().unwrap();
    assert!(!regions.is_empty(), "a broken bottle has a defect region");
    let r0 = &regions[0];
    let (w, h) = (broken["image"]["width"].as_u64().unwrap(), broken["image"]["height"].as_u64().unwrap());
    assert!(r0["x"].as_u64().unwrap() + r0["width"].as_u64().unwrap() <= w, "regions are in image pixels");
    assert!(r0["y"].as_u64().unwrap() + r0["height"].as_u64().unwrap() <= h);
    assert!(r0["area_percent"].as_f64().unwrap() > 0.0 && r0["peak"].as_f64().unwrap() >= 0.5);
    // The top region covers the ground-truth defect.
    let truth = image::load_from_memory(&bottle("ground_truth/broken_large/000_mask.png")).unwrap().to_luma8();
    let (rx, ry) = (r0["x"].as_u64().unwrap() as u32, r0["y"].as_u64().unwrap() as u32);
    let (rw, rh) = (r0["width"].as_u64().unwrap() as u32, r0["height"].as_u64().unwrap() as u32);
    let inside = truth
        .enumerate_pixels()
        .filter(|(x, y, p)| p.0[0] > 127 && (rx..rx + rw).contains(x) && (ry..ry + rh).contains(y))
        .count();
    let total = truth.pixels().filter(|p| p.0[0] > 127).count();
    eprintln!("top region holds {inside} of {total} ground-truth defect pixels");
    assert!(inside * 2 > total, "the top region covers most of the defect: {inside}/{total}");
    let heat = png(&broken["heatmap_png"]);
    assert_eq!((heat.width() as u64, heat.height() as u64), (w, h), "the overlay is at the image's size");
    let mask = png(&broken["mask_png"]).to_luma8();
    assert!(mask.pixels().any(|p| p.0[0] == 255), "the mask marks the defect");
    // Kept as test output for people to look at: target/test-artifacts/anomaly/.
    let artifacts = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/anomaly");
    std::fs::create_dir_all(&artifacts).unwrap();
    heat.save(artifacts.join("broken_large_000_heatmap.png")).unwrap();
    png(&good["heatmap_png"]).save(artifacts.join("good_000_heatmap.png")).unwrap();
    mask.save(artifacts.join("broken_large_000_mask.png")).unwrap();
    eprintln!("heatmaps written to {}", artifacts.display());

    let plain = inspect(&s, "?model=bottle", bottle("test/good/001.png")).await;
    assert!(plain.get("heatmap_png").is_none(), "heatmaps only on request");
    assert!(plain["anomaly_score"].is_number());

    let r = s.inspect("?model=bottle&heatmap=jpeg", "image/png", bottle("test/good/001.png")).await;
    assert_eq!(r.status(), 400);
}
