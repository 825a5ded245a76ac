//! `/openapi.json` describes the `/v1` API as it is served: every route, and
//! no route that does not exist; answers match their schemas' fields.

mod common;

use std::collections::BTreeSet;

use common::TestServer;
use serde_json::Value;

/// Every `/v1` route (and health) the router serves.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/v1/models"),
    ("post", "/v1/inspect"),
    ("get", "/v1/models/{name}"),
    ("put", "/v1/models/{name}"),
    ("post", "/v1/models/{name}/rollback"),
    ("post", "/v1/models/{name}/fit"),
    ("get", "/v1/factories"),
    ("post", "/v1/factories/{factory}/inspect"),
    ("post", "/v1/factories/{factory}/reload"),
    ("get", "/v1/inspections"),
    ("get", "/v1/inspections/{id}"),
    ("get", "/v1/inspections/{id}/image"),
    ("get", "/v1/inspections/{id}/heatmap"),
    ("post", "/v1/inspections/{id}/review"),
    ("get", "/v1/stats"),
];

/// The properties a schema declares (its own, or those of an `allOf`).
fn properties(doc: &Value, name: &str) -> BTreeSet<String> {
    let s = &doc["components"]["schemas"][name];
    let mut out: BTreeSet<String> =
        s["properties"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    for part in s["allOf"].as_array().into_iter().flatten() {
        out.extend(part["properties"].as_object().into_iter().flat_map(|o| o.keys().cloned()));
    }
    out
}

fn required(doc: &Value, name: &str) -> Vec<String> {
    let s = &doc["components"]["schemas"][name];
    s["required"].as_array().into_iter().flatten().map(|r| r.as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_matches_the_served_api() {
    let s = TestServer::ready("[server]\nadmin_token = \"t\"\n").await;
    let doc: Value = s.client.get(s.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone())))
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, served, "documented operations = served routes");

    // Each documented operation reaches a handler: no `not_found` route miss, no 405.
    for (method, path) in &documented {
        let url = s.url(&path.replace("{name}", "steel-surface").replace("{factory}", "none").replace("{id}", "none"));
        let r = s.client.request(method.to_uppercase().parse().unwrap(), url).send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status != 405 && body["error"]["code"] != "not_found", "{method} {path}: {status} {body}");
    }

    // A real answer has exactly the fields its schema lists (plus none undocumented).
    let r = s.inspect("", "image/jpeg", common::neu_image("scratches_1.jpg")).await;
    let answer: Value = r.json().await.unwrap();
    let keys: BTreeSet<String> = answer.as_object().unwrap().keys().cloned().collect();
    let declared = properties(&doc, "Inspection");
    assert!(keys.is_subset(&declared), "undocumented fields: {:?}", keys.difference(&declared).collect::<Vec<_>>());
    for field in required(&doc, "Inspection") {
        assert!(keys.contains(&field), "required `{field}` missing from a real answer");
    }
    let timings: BTreeSet<String> = answer["timings_ms"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(timings, properties(&doc, "Timings"));

    // Errors have the documented shape.
    let r = s.inspect("?model=nope", "image/jpeg", vec![1, 2, 3]).await;
    let e: Value = r.json().await.unwrap();
    assert_eq!(e.as_object().unwrap().keys().collect::<Vec<_>>(), ["error"]);
    assert_eq!(properties(&doc, "ErrorDetail"), ["code", "factory", "message", "plugin"].map(String::from).into());

    // The reading page works offline: our own script, no CDN.
    let page = s.client.get(s.url("/docs")).send().await.unwrap();
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    let html = page.text().await.unwrap();
    assert!(html.contains("/docs/api.js") && !html.contains("https://"));
    assert_eq!(s.client.get(s.url("/docs/api.js")).send().await.unwrap().status(), 200);
}
