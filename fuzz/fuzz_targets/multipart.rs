//! Any body under any Content-Type through the server's image-body reader
//! (raw bodies and multipart/form-data with an `image` field).
#![no_main]

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: &[&str] = &[
    "multipart/form-data; boundary=X",
    "multipart/form-data; boundary=\"a b\"",
    "multipart/form-data",
    "image/jpeg",
    "text/plain",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let content_type = CONTENT_TYPES[pick as usize % CONTENT_TYPES.len()];
    let req = Request::post("/v1/inspect")
        .header("content-type", content_type)
        .body(Body::from(body.to_vec()))
        .expect("a valid request");
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let _ = rt.block_on(lineside::server::read_image(req, 1 << 20));
});
