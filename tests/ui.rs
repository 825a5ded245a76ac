//! The review UI in a real browser: headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`; `.ci/test` installs them).
//! A failed part — a broken bottle under an anomaly model fitted through the
//! API — shows up in the feed, its page shows the image with the defect
//! overlay and heatmap, a reviewer overrides the verdict, and the override is
//! still there after a reload and in the API. Screenshots are written to
//! `target/test-artifacts/ui/`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, free_port};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// chromedriver for the test's lifetime.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver() -> Driver {
    let bin = std::env::var("LINESIDE_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let port = free_port();
    let child = Command::new(&bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{bin}: {e}; install Chromium and its driver (apt-get install chromium chromium-driver) or run `bash .ci/test`")
        });
    let driver = Driver { child, url: format!("http://127.0.0.1:{port}") };
    let until = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{}/status", driver.url)).await.is_err() {
        assert!(Instant::now() < until, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    driver
}

async fn browser(driver: &Driver) -> Client {
    let chromium = std::env::var("LINESIDE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"],
        }),
    );
    ClientBuilder::rustls().unwrap().capabilities(caps).connect(&driver.url).await.expect("a WebDriver session")
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/ui");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let path = artifacts().join(name);
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

/// Waits until the element's text contains `want`.
async fn wait_text(c: &Client, css: &str, want: &str) -> String {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
            && t.contains(want)
        {
            return t;
        }
        assert!(Instant::now() < until, "`{css}` never showed `{want}`");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fits an anomaly model on a few good bottles and inspects a broken one; the record id.
async fn failed_bottle(s: &TestServer) -> String {
    common::fit_bottle(s, "bottle").await;
    let r = s
        .client
        .post(s.url("/v1/inspect?model=bottle"))
        .header("content-type", "image/png")
        .header("x-line-id", "bottling-2")
        .header("x-part-id", "BTL-0042")
        .body(common::bottle("test/broken_large/000.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["verdict"], "fail", "a broken bottle fails");
    assert!(!v["regions"].as_array().unwrap().is_empty());
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_ui_shows_a_failed_part_and_persists_an_override() {
    let models = tempfile::tempdir().unwrap();
    let s = TestServer::ready(&common::fitting_toml(models.path())).await;
    let id = failed_bottle(&s).await;
    // A passing steel part on another line, so the feed has more than one line.
    let r = s
        .client
        .post(s.url("/v1/inspect"))
        .header("content-type", "image/jpeg")
        .header("x-line-id", "rolling-1")
        .body(common::neu_image("crazing_1.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let driver = start_driver().await;
    let c = browser(&driver).await;
    c.goto(&s.url("/ui")).await.unwrap();
    let row = c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css(&format!("tr[data-id='{id}']"))).await;
    let row = row.expect("the failed part is in the feed");
    assert_eq!(row.attr("data-verdict").await.unwrap().as_deref(), Some("fail"));
    wait_text(&c, "#lines", "bottling-2").await;
    screenshot(&c, "1-feed.png").await;

    row.click().await.unwrap();
    c.wait().for_element(Locator::Css("#overlay rect")).await.expect("the defect overlay is drawn");
    let loaded = |sel: &'static str| {
        let c = &c;
        async move {
            let js =
                format!("const i = document.querySelector('{sel}'); return !!i && i.complete && i.naturalWidth > 0;");
            let until = Instant::now() + Duration::from_secs(20);
            while c.execute(&js, vec![]).await.unwrap() != json!(true) {
                assert!(Instant::now() < until, "{sel} never loaded");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    loaded("#part-image").await;
    loaded("#heatmap").await;
    assert_eq!(wait_text(&c, "#verdict", "FAIL").await, "FAIL");
    wait_text(&c, "#model-verdict", "model verdict").await;
    let boxes = c.find_all(Locator::Css("#overlay rect")).await.unwrap().len();
    eprintln!("part view: {boxes} defect box(es) over the image, heatmap shown");
    screenshot(&c, "2-failed-part.png").await;

    // Override: a reviewer calls it a pass.
    c.find(Locator::Css("#review-form select[name=verdict]")).await.unwrap().select_by_value("pass").await.unwrap();
    c.find(Locator::Css("#review-form input[name=reviewer]")).await.unwrap().send_keys("qa-alice").await.unwrap();
    c.find(Locator::Css("#review-form input[name=note]"))
        .await
        .unwrap()
        .send_keys("reflection, not a crack")
        .await
        .unwrap();
    c.find(Locator::Css("#review-form button[type=submit]")).await.unwrap().click().await.unwrap();
    wait_text(&c, "#review-status", "Saved: pass by qa-alice").await;
    screenshot(&c, "3-override-saved.png").await;

    // Persisted: a fresh load of the page shows it, and so does the API.
    c.refresh().await.unwrap();
    assert_eq!(wait_text(&c, "#verdict", "PASS").await, "PASS");
    wait_text(&c, "#model-verdict", "overridden by qa-alice").await;
    wait_text(&c, "#reviews", "reflection, not a crack").await;
    screenshot(&c, "4-after-reload.png").await;
    let v: Value = s.client.get(s.url(&format!("/v1/inspections/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["review"]["reviewer"], "qa-alice");
    assert_eq!(v["effective_verdict"], "pass");
    assert_eq!(v["verdict"], "fail", "the model's own verdict is kept");
    c.close().await.unwrap();
}
