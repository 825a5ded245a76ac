//! A real lineside server on a loopback port, and NEU test images.
#![allow(dead_code)]

pub mod hub;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lineside::config::Config;

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
    /// The records' data directory, unless the config named one.
    pub data: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server with `toml` over the defaults; does not wait for readiness.
    pub async fn start(toml: &str) -> Self {
        let mut cfg = Config::from_toml(toml).expect("test config");
        // Records go to a fresh temporary store unless the test names one.
        let data = (cfg.records.data_dir == lineside::config::RecordsConfig::default().data_dir).then(|| {
            let d = tempfile::Builder::new().prefix("lineside-test-data").tempdir().unwrap();
            cfg.records.data_dir = d.path().to_path_buf();
            d
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            lineside::server::serve(cfg, listener, async move {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
        Self { base, client: reqwest::Client::new(), _stop: stop, data }
    }

    /// Starts a server and waits until `/ready` says 200.
    pub async fn ready(toml: &str) -> Self {
        let s = Self::start(toml).await;
        s.wait_ready(Duration::from_secs(120)).await;
        s
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            let r = self.client.get(self.url("/ready")).send().await.unwrap();
            if r.status() == 200 {
                return;
            }
            assert!(Instant::now() < until, "server not ready after {timeout:?}: {}", r.text().await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs a raw body to `/v1/inspect{query}`.
    pub async fn inspect(&self, query: &str, content_type: &str, body: Vec<u8>) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/inspect{query}")))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }
}

pub fn shared() -> PathBuf {
    std::env::var_os("LINESIDE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// An MVTec AD bottle image, by its path under `data/mvtec-ad/bottle`.
pub fn bottle(rel: &str) -> Vec<u8> {
    std::fs::read(shared().join("data/mvtec-ad/bottle").join(rel)).unwrap()
}

/// The config of a server that fits anomaly models: admin token `t0ken`,
/// fitted models in `model_dir`, the ImageNet MobileNetV2 as backbone.
pub fn fitting_toml(model_dir: &std::path::Path) -> String {
    format!(
        "[server]\nmodel_dir = \"{}\"\nfit_backbone = \"{}\"\nadmin_token = \"t0ken\"\n",
        model_dir.display(),
        shared().join("models/mobilenetv2_100.imagenet").display()
    )
}

/// Fits anomaly model `name` on the first 10 good bottles and waits until it serves.
pub async fn fit_bottle(s: &TestServer, name: &str) {
    let form = (0..10).fold(reqwest::multipart::Form::new(), |f, i| {
        f.part("image", reqwest::multipart::Part::bytes(bottle(&format!("train/good/{i:03}.png"))).file_name("g.png"))
    });
    let url = s.url(&format!("/v1/models/{name}/fit"));
    let r = s.client.post(url).bearer_auth("t0ken").multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    wait_for(s, &format!("/v1/models/{name}"), "fitted model ready", |v| v["model"]["status"] == "ready").await;
}

pub fn neu_image(name: &str) -> Vec<u8> {
    let p = shared().join("data/neu-det/NEU-DET/IMAGES").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Images the shipped model never trained on, from its training.json.
pub fn held_out_files() -> Vec<String> {
    let text =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/steel-surface/training.json"))
            .expect("models/steel-surface/training.json");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["val_files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect()
}

/// The NEU class a file name encodes (`rolled-in_scale_12.jpg` → `rolled-in_scale`).
pub fn neu_class(file: &str) -> String {
    file.rsplit_once('_').unwrap().0.to_string()
}

/// The error code of a JSON error body.
pub async fn error_code(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.expect("JSON error body");
    assert!(v["error"]["message"].is_string(), "error has a message: {v}");
    v["error"]["code"].as_str().expect("error code").to_string()
}

/// Builds the guest plugins (once per test binary) and returns the path of
/// `name`'s component. Needs the wasm32-wasip2 target (`rustup target add wasm32-wasip2`).
pub fn guest_wasm(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let guest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/guest");
        let target = guest.join("target");
        let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
            .current_dir(&guest)
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .expect("running cargo for the guest plugins");
        assert!(status.success(), "building plugins/guest for wasm32-wasip2 failed");
        target.join("wasm32-wasip2/release")
    });
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// Starts `clients` loops that inspect a NEU image until `stop` is set; each
/// returns the (status, model version) of every answer it got.
pub fn spawn_load(
    s: &Arc<TestServer>,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<(u16, String)>>> {
    (0..clients)
        .map(|_| {
            let (s, stop) = (s.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = s.inspect("", "image/jpeg", neu_image("crazing_1.jpg")).await;
                    let status = r.status().as_u16();
                    let v: serde_json::Value = r.json().await.unwrap();
                    seen.push((status, v["model"]["version"].as_str().unwrap_or_default().to_string()));
                }
                seen
            })
        })
        .collect()
}

/// Stops the load and gathers every answer.
pub async fn stop_load(
    stop: &AtomicBool,
    clients: Vec<tokio::task::JoinHandle<Vec<(u16, String)>>>,
) -> Vec<(u16, String)> {
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    answers
}

/// Polls `GET path` until its JSON satisfies `done` (60 s at most).
pub async fn wait_for(
    s: &TestServer,
    path: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let v: serde_json::Value = s.client.get(s.url(path)).send().await.unwrap().json().await.unwrap();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < until, "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh, empty database on the test PostgreSQL server; its URL. The server
/// comes from `LINESIDE_TEST_POSTGRES_URL` (`.ci/test` starts one with
/// `.ci/postgres.sh`).
pub async fn postgres_database() -> String {
    use sqlx::Connection;
    let url = std::env::var("LINESIDE_TEST_POSTGRES_URL").expect(
        "LINESIDE_TEST_POSTGRES_URL is not set: run the tests with `bash .ci/test`, \
         or start a server with `bash .ci/postgres.sh` and export the URL it prints",
    );
    let name = format!("lineside_it_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect to the test PostgreSQL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&url);
    format!("{base}/{name}")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `lineside serve` process; killed (SIGKILL) when dropped.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub base: String,
}

impl ServerProcess {
    /// Starts the real binary with `args` on a free port and waits for `/ready`.
    pub async fn start(args: &[&str]) -> ServerProcess {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_lineside"))
            .arg("serve")
            .args(["--addr", &addr])
            .args(args)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start lineside");
        let p = ServerProcess { child, base: format!("http://{addr}") };
        let client = reqwest::Client::new();
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = client.get(format!("{}/ready", p.base)).send().await
                && r.status() == 200
            {
                return p;
            }
            assert!(Instant::now() < until, "lineside did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
