//! Access control: every endpoint under every kind of caller.

mod common;

use common::TestServer;
use lineside::auth::{digest, hex, new_key};
use reqwest::Method;
use serde_json::{Value, json};

const ADMIN: &str = "admin-t0ken-for-tests";

/// The callers of the matrix.
#[derive(Clone, Copy, Debug)]
enum Who {
    NoKey,
    /// Factory `b`'s key, used on factory `a`'s things.
    OtherFactory,
    /// Factory `a`'s key.
    OwnFactory,
    Admin,
}

const ALL: [Who; 4] = [Who::NoKey, Who::OtherFactory, Who::OwnFactory, Who::Admin];

struct Fixture {
    s: TestServer,
    key_a: String,
    key_b: String,
}

impl Fixture {
    fn credential(&self, who: Who) -> Option<&str> {
        match who {
            Who::NoKey => None,
            Who::OtherFactory => Some(&self.key_b),
            Who::OwnFactory => Some(&self.key_a),
            Who::Admin => Some(ADMIN),
        }
    }

    async fn call(&self, who: Who, method: Method, path: &str, body: Body) -> (u16, Value) {
        let mut req = self.s.client.request(method, self.s.url(path));
        if let Some(k) = self.credential(who) {
            // Both header forms are accepted; the matrix uses both.
            req = match who {
                Who::OtherFactory => req.header("x-api-key", k),
                _ => req.bearer_auth(k),
            };
        }
        req = match body {
            Body::None => req,
            Body::Image => req.header("content-type", "image/jpeg").body(common::neu_image("scratches_1.jpg")),
            Body::Json(v) => req.json(&v),
            Body::Oip => {
                let image = common::neu_image("scratches_1.jpg");
                let head = json!({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": image.len() + 4}}]})
                .to_string();
                let mut b = head.as_bytes().to_vec();
                b.extend((image.len() as u32).to_le_bytes());
                b.extend(image);
                req.header("inference-header-content-length", head.len()).body(b)
            }
        };
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

#[derive(Clone)]
enum Body {
    None,
    Image,
    Json(Value),
    Oip,
}

async fn fixture(required: bool) -> Fixture {
    let (key_a, key_b) = (new_key(), new_key());
    let toml = format!(
        r#"
[server]
admin_token = "{ADMIN}"
[records]
pass_sample_rate = 1.0
[auth]
required = {required}
[[auth.keys]]
name = "line-a1"
factory = "a"
sha256 = "{}"
[[auth.keys]]
name = "line-b1"
factory = "b"
sha256 = "{}"
[[models]]
name = "steel-surface"
source = "builtin:steel-surface"
max_batch_size = 4
[[models]]
name = "steel-b"
source = "builtin:steel-surface"
max_batch_size = 4
[[factories]]
name = "a"
[[factories]]
name = "b"
model = "steel-b"
"#,
        hex(&digest(&key_a)),
        hex(&digest(&key_b)),
    );
    Fixture { s: TestServer::ready(&toml).await, key_a, key_b }
}

/// `(method, path, body, expected statuses for [no key, other factory, own factory, admin])`.
type Row = (Method, String, Body, [u16; 4]);

fn matrix(id: &str) -> Vec<Row> {
    use Method as M;
    let j = |v: Value| Body::Json(v);
    vec![
        (M::GET, "/health".into(), Body::None, [200, 200, 200, 200]),
        (M::GET, "/ready".into(), Body::None, [200, 200, 200, 200]),
        (M::GET, "/v2".into(), Body::None, [200, 200, 200, 200]),
        (M::GET, "/v2/health/live".into(), Body::None, [200, 200, 200, 200]),
        (M::GET, "/v2/health/ready".into(), Body::None, [200, 200, 200, 200]),
        (M::GET, "/ui".into(), Body::None, [200, 200, 200, 200]),
        (M::GET, "/openapi.json".into(), Body::None, [200, 200, 200, 200]),
        (M::GET, "/docs".into(), Body::None, [200, 200, 200, 200]),
        (M::GET, "/metrics".into(), Body::None, [401, 403, 403, 200]),
        (M::GET, "/v1/models".into(), Body::None, [401, 200, 200, 200]),
        (M::GET, "/v1/models/steel-surface".into(), Body::None, [401, 403, 200, 200]),
        (M::POST, "/v1/inspect?model=steel-surface".into(), Body::Image, [401, 403, 200, 200]),
        (M::POST, "/v1/inspect".into(), Body::Image, [401, 403, 200, 200]),
        // Admin routes: a bad source (400) proves the admin got past the check without swapping anything.
        (M::PUT, "/v1/models/steel-surface".into(), j(json!({"source": ""})), [401, 403, 403, 400]),
        (M::POST, "/v1/models/steel-surface/rollback".into(), Body::None, [401, 403, 403, 409]),
        (M::POST, "/v1/models/fitted/fit".into(), Body::Image, [401, 403, 403, 400]),
        (M::POST, "/v1/factories/a/reload".into(), Body::None, [401, 403, 403, 200]),
        (M::GET, "/v1/factories".into(), Body::None, [401, 200, 200, 200]),
        (M::POST, "/v1/factories/a/inspect".into(), Body::Image, [401, 403, 200, 200]),
        (M::GET, "/v1/inspections?factory=a".into(), Body::None, [401, 403, 200, 200]),
        (M::GET, "/v1/stats?factory=a".into(), Body::None, [401, 403, 200, 200]),
        (M::GET, format!("/v1/inspections/{id}"), Body::None, [401, 404, 200, 200]),
        (M::GET, format!("/v1/inspections/{id}/image"), Body::None, [401, 404, 200, 200]),
        // A classifier's record has no heatmap: 410 once the caller may see the record.
        (M::GET, format!("/v1/inspections/{id}/heatmap"), Body::None, [401, 404, 410, 410]),
        (
            M::POST,
            format!("/v1/inspections/{id}/review"),
            j(json!({"verdict": "pass", "reviewer": "qa"})),
            [401, 404, 200, 200],
        ),
        (M::GET, "/v2/models/a".into(), Body::None, [401, 403, 200, 200]),
        (M::GET, "/v2/models/a/ready".into(), Body::None, [401, 403, 200, 200]),
        (M::POST, "/v2/models/a/infer".into(), Body::Oip, [401, 403, 200, 200]),
        (M::GET, "/v2/models/steel-surface".into(), Body::None, [401, 403, 200, 200]),
        (M::POST, "/v2/models/steel-surface/infer".into(), Body::Oip, [401, 403, 200, 200]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_under_every_caller_with_keys_required() {
    let f = fixture(true).await;
    // A record of factory `a`, made with a's key.
    let (status, v) = f.call(Who::OwnFactory, Method::POST, "/v1/factories/a/inspect", Body::Image).await;
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();

    let mut failures = Vec::new();
    let mut table =
        String::from("| endpoint | no key | factory b's key | factory a's key | admin |\n|---|---|---|---|---|\n");
    for (method, path, body, expected) in matrix(&id) {
        let mut got = [0u16; 4];
        for (i, who) in ALL.into_iter().enumerate() {
            got[i] = f.call(who, method.clone(), &path, body.clone()).await.0;
        }
        let shown = path.replace(&id, "{id}");
        table += &format!("| {method} {shown} | {} | {} | {} | {} |\n", got[0], got[1], got[2], got[3]);
        if got != expected {
            failures.push(format!("{method} {shown}: expected {expected:?}, got {got:?}"));
        }
    }
    eprintln!("{table}");
    assert!(failures.is_empty(), "access matrix mismatches:\n{}", failures.join("\n"));

    // A wrong key is refused everywhere a key is read, even on a route it could not use anyway.
    let r = f.s.client.get(f.s.url("/v1/models")).bearer_auth("lsk_not-a-key").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(common::error_code(r).await, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_factory_key_sees_and_writes_only_its_own_factory() {
    let f = fixture(true).await;
    for who in [Who::OwnFactory, Who::OtherFactory] {
        let factory = if matches!(who, Who::OwnFactory) { "a" } else { "b" };
        let (s, _) = f.call(who, Method::POST, &format!("/v1/factories/{factory}/inspect"), Body::Image).await;
        assert_eq!(s, 200);
    }
    // `/v1/inspect` with a key is recorded as the key's factory.
    let (s, v) = f.call(Who::OwnFactory, Method::POST, "/v1/inspect", Body::Image).await;
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap();
    let (_, rec) = f.call(Who::Admin, Method::GET, &format!("/v1/inspections/{id}"), Body::None).await;
    assert_eq!(rec["factory"], "a");

    // Listings and statistics are scoped to the key's factory without asking.
    let (_, list) = f.call(Who::OtherFactory, Method::GET, "/v1/inspections", Body::None).await;
    let factories: Vec<&str> =
        list["items"].as_array().unwrap().iter().map(|i| i["factory"].as_str().unwrap()).collect();
    assert_eq!(factories, ["b"], "b sees only its own record");
    let (_, all) = f.call(Who::Admin, Method::GET, "/v1/inspections", Body::None).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    let (_, stats) = f.call(Who::OwnFactory, Method::GET, "/v1/stats", Body::None).await;
    assert_eq!(stats["total"]["count"], 2);

    let names = |v: &Value, key: &str| -> Vec<String> {
        v[key].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect()
    };
    let (_, models) = f.call(Who::OwnFactory, Method::GET, "/v1/models", Body::None).await;
    assert_eq!(names(&models, "models"), ["steel-surface"]);
    let (_, models) = f.call(Who::OtherFactory, Method::GET, "/v1/models", Body::None).await;
    assert_eq!(names(&models, "models"), ["steel-b"]);
    let (_, factories) = f.call(Who::OtherFactory, Method::GET, "/v1/factories", Body::None).await;
    assert_eq!(names(&factories, "factories"), ["b"]);

    // Denials are counted for the metrics (and logged on target lineside::access).
    let (_, _) = f.call(Who::OtherFactory, Method::POST, "/v1/factories/a/inspect", Body::Image).await;
    let metrics = f.s.client.get(f.s.url("/metrics")).bearer_auth(ADMIN).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("lineside_access_denied_total{status=\"403\"}")), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_required_keys_anonymous_calls_work_but_a_bad_key_does_not() {
    let f = fixture(false).await;
    let (s, _) = f.call(Who::NoKey, Method::POST, "/v1/factories/b/inspect", Body::Image).await;
    assert_eq!(s, 200, "anonymous callers are served when keys are not required");
    let (s, _) = f.call(Who::NoKey, Method::GET, "/v1/inspections", Body::None).await;
    assert_eq!(s, 200);
    let (s, _) = f.call(Who::NoKey, Method::POST, "/v1/factories/a/reload", Body::None).await;
    assert_eq!(s, 401, "admin routes still need the admin token");
    // A key that is sent still binds its caller to its factory.
    let (s, _) = f.call(Who::OtherFactory, Method::POST, "/v1/factories/a/inspect", Body::Image).await;
    assert_eq!(s, 403);
    let r = f.s.client.get(f.s.url("/v1/models")).header("x-api-key", "wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
}
