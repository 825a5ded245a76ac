//! The inspection API over real HTTP on loopback, with the built-in model.

mod common;

use std::time::Duration;

use common::*;

const DEFAULT: &str = "";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classifies_held_out_neu_images() {
    let s = TestServer::ready(DEFAULT).await;
    let files = held_out_files();
    // Four held-out images of every class.
    let mut picked: Vec<&String> = Vec::new();
    for class in ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"] {
        picked.extend(files.iter().filter(|f| neu_class(f) == class).take(4));
    }
    assert_eq!(picked.len(), 24);
    for f in picked {
        let r = s.inspect("", "image/jpeg", neu_image(f)).await;
        assert_eq!(r.status(), 200, "{f}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["label"], neu_class(f), "{f}: {v}");
        assert_eq!(v["model"]["name"], "steel-surface");
        assert_eq!(v["model"]["version"].as_str().unwrap().len(), 12);
        assert_eq!(v["predictions"].as_array().unwrap().len(), 5);
        assert_eq!(v["verdict"], "fail", "every NEU class is a defect");
        assert!(v["score"].as_f64().unwrap() > 0.5);
        for k in ["decode", "preprocess", "queue", "inference", "total"] {
            assert!(v["timings_ms"][k].as_f64().unwrap() >= 0.0, "timing {k}");
        }
        assert!(v["id"].as_str().unwrap().len() >= 32);
    }
}

/// A held-out NEU image as a 1920×1080 camera frame: the part scaled to
/// 1080×1080 on a grey background, as a quality-90 JPEG.
fn neu_frame_1080p(file: &str) -> Vec<u8> {
    use image::{GenericImage, RgbImage, imageops};
    let part = image::load_from_memory(&neu_image(file)).unwrap().to_rgb8();
    let part = imageops::resize(&part, 1080, 1080, imageops::FilterType::Triangle);
    let mut frame = RgbImage::from_pixel(1920, 1080, image::Rgb([128, 128, 128]));
    frame.copy_from(&part, 420, 0).unwrap();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&frame).unwrap();
    jpeg
}

/// `jpeg_decode = "scaled"` against the exact transform on held-out images
/// as 1080p frames: its answers must be as right as the exact ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_jpeg_decode_keeps_held_out_accuracy() {
    let full = TestServer::ready(DEFAULT).await;
    let scaled = TestServer::ready("[server]\njpeg_decode = \"scaled\"\n").await;
    // Every third held-out image (16 per class) keeps this under a minute;
    // docs/performance.md gives the run over all 288.
    let files: Vec<String> = held_out_files().into_iter().step_by(3).collect();
    let (mut right_full, mut right_scaled, mut agree, mut decode_ms) = (0, 0, 0, [0.0f64; 2]);
    for f in &files {
        let frame = tokio::task::spawn_blocking({
            let f = f.clone();
            move || neu_frame_1080p(&f)
        })
        .await
        .unwrap();
        let mut labels = Vec::new();
        for (i, s) in [&full, &scaled].into_iter().enumerate() {
            let r = s.inspect("", "image/jpeg", frame.clone()).await;
            assert_eq!(r.status(), 200, "{f}");
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!((v["image"]["width"].as_u64(), v["image"]["height"].as_u64()), (Some(1920), Some(1080)));
            decode_ms[i] += v["timings_ms"]["decode"].as_f64().unwrap();
            labels.push(v["label"].as_str().unwrap().to_string());
        }
        let truth = neu_class(f);
        right_full += usize::from(labels[0] == truth);
        right_scaled += usize::from(labels[1] == truth);
        agree += usize::from(labels[0] == labels[1]);
    }
    let n = files.len();
    println!(
        "held-out NEU as 1080p JPEG, {n} images: top-1 full {right_full}, scaled {right_scaled}, \
         same label {agree}; mean decode {:.2} ms full, {:.2} ms scaled",
        decode_ms[0] / n as f64,
        decode_ms[1] / n as f64
    );
    // The scaled server did decode at a quarter scale (the metrics are per process).
    let metrics = scaled.client.get(scaled.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let quarter = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lineside_decode_seconds_count{scale=\"1/4\"} "))
        .and_then(|v| v.trim().parse::<usize>().ok());
    assert!(quarter.is_some_and(|q| q >= n), "1/4-scale decodes {quarter:?} of {n}:\n{metrics}");
    assert!(right_full * 100 >= n * 95, "the exact transform itself: {right_full}/{n}");
    assert!(right_scaled + 1 >= right_full, "scaled {right_scaled}/{n} against full {right_full}/{n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_multipart_and_named_model() {
    let s = TestServer::ready(DEFAULT).await;
    let part = reqwest::multipart::Part::bytes(neu_image("scratches_1.jpg")).file_name("scratches_1.jpg");
    let form = reqwest::multipart::Form::new().text("line", "3").part("image", part);
    let r = s.client.post(s.url("/v1/inspect?model=steel-surface")).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["label"], "scratches");

    let form = reqwest::multipart::Form::new().text("other", "x");
    let r = s.client.post(s.url("/v1/inspect")).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "bad_request");
}

fn bomb_png() -> Vec<u8> {
    // A valid PNG signature and IHDR declaring 100000 x 100000 RGBA (40 GB decoded), then nothing.
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    let mut crc = 0xffff_ffffu32;
    for &b in &ihdr {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&(!crc).to_be_bytes());
    png.extend_from_slice(&[0, 0, 0, 0]);
    png
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_specific_json_errors() {
    let s = TestServer::ready(DEFAULT).await;

    // Corrupt JPEG: a JPEG start-of-image marker followed by garbage.
    let mut corrupt = vec![0xff, 0xd8, 0xff, 0xe0];
    corrupt.extend((0..2000u32).map(|i| (i * 7919 % 251) as u8));
    let r = s.inspect("", "image/jpeg", corrupt).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "invalid_image");

    // Truncated PNG: the first 300 bytes of a real PNG.
    let png = std::fs::read(shared().join("models/_images/chelsea.png")).unwrap();
    let r = s.inspect("", "image/png", png[..300].to_vec()).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "invalid_image");

    // Text body.
    let r = s.inspect("", "text/plain", b"this is not an image".to_vec()).await;
    assert_eq!(r.status(), 415);
    assert_eq!(error_code(r).await, "unsupported_media_type");

    // Text sent as an image.
    let r = s.inspect("", "image/jpeg", b"this is not an image".to_vec()).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "invalid_image");

    // Decompression bomb: refused from the header, before allocating 40 GB.
    let r = s.inspect("", "image/png", bomb_png()).await;
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "image_too_large");

    // Unknown model.
    let r = s.inspect("?model=nope", "image/jpeg", neu_image("scratches_1.jpg")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "model_not_found");

    // Bad deadline header.
    let r = s
        .client
        .post(s.url("/v1/inspect"))
        .header("x-request-timeout-ms", "soon")
        .body(neu_image("scratches_1.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Wrong method.
    let r = s.client.get(s.url("/v1/inspect")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "method_not_allowed");

    // Unknown route.
    let r = s.client.get(s.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "not_found");

    // The server is unharmed.
    let r = s.inspect("", "image/jpeg", neu_image("scratches_1.jpg")).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_limit_is_413() {
    let s = TestServer::ready(DEFAULT).await;
    let big = vec![0u8; 64 * 1024 * 1024];
    let r = s.inspect("", "image/jpeg", big).await;
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "payload_too_large");

    // Without Content-Length (chunked), the limit holds while streaming. The
    // server may close before the client has sent everything, so a send error
    // is acceptable here; a success other than 413 is not.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..64).map(|_| Ok(vec![0u8; 1024 * 1024])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = s.client.post(s.url("/v1/inspect")).header("content-type", "image/png").body(body).send().await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
    }
    let r = s.inspect("", "image/jpeg", neu_image("scratches_1.jpg")).await;
    assert_eq!(r.status(), 200);
}

/// The built-in model one image per batch, with no batching delay, so a
/// backlog takes a predictable number of forward passes.
/// One builtin model under its own name: the metrics recorder is
/// process-wide, so each test's model label keeps its counts apart from the
/// tests running beside it.
fn single_image_batches(model: &str, queue_capacity: usize) -> String {
    format!(
        "[server]\ndefault_model = \"{model}\"\n[[models]]\nname = \"{model}\"\nsource = \"builtin:steel-surface\"\n\
         max_batch_size = 1\nmax_queue_delay_ms = 0\nqueue_capacity = {queue_capacity}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_at_once() {
    let s = TestServer::ready(&single_image_batches("queue-of-one", 1)).await;
    let img = neu_image("inclusion_1.jpg");
    let sends = (0..24).map(|_| {
        let (c, url, img) = (s.client.clone(), s.url("/v1/inspect"), img.clone());
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            let r = c.post(url).header("content-type", "image/jpeg").body(img).send().await.unwrap();
            (r.status().as_u16(), r.headers().get("retry-after").cloned(), t.elapsed(), r.text().await.unwrap())
        })
    });
    let results = futures_util::future::join_all(sends).await;
    let mut ok = 0;
    let mut overloaded = 0;
    for r in results {
        let (status, retry_after, _elapsed, body) = r.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                overloaded += 1;
                assert!(retry_after.is_some(), "429 carries Retry-After");
                assert!(body.contains("\"overloaded\""), "{body}");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(ok >= 1, "some requests are served");
    assert!(overloaded >= 1, "a one-slot queue overflows under 24 concurrent requests");
}

/// `n` concurrent inspections of `img`; each task yields the HTTP status.
fn spawn_backlog(s: &TestServer, n: usize, img: &[u8]) -> Vec<tokio::task::JoinHandle<u16>> {
    (0..n)
        .map(|_| {
            let (c, url, img) = (s.client.clone(), s.url("/v1/inspect"), img.to_vec());
            tokio::spawn(async move { c.post(url).body(img).send().await.unwrap().status().as_u16() })
        })
        .collect()
}

async fn dropped(s: &TestServer, model: &str, reason: &str) -> f64 {
    metric_sum(s, "lineside_dropped_total", &[("model", model), ("reason", reason)]).await
}

/// Sum of the samples of one metric that carry all of `labels`.
async fn metric_sum(s: &TestServer, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends a POST over a raw TCP connection and returns the connection unread.
async fn post_and_hold(s: &TestServer, path: &str, body: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = s.base.trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n\r\n", body.len());
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    conn
}

/// Polls one model's `name` metric until it reaches `at_least`, failing after 30 s.
async fn wait_for_metric(s: &TestServer, name: &str, model: &str, at_least: f64, what: &str) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while metric_sum(s, name, &[("model", model)]).await < at_least {
        assert!(std::time::Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_requests_are_dropped_before_compute() {
    let s = TestServer::ready(&single_image_batches("deadlines", 64)).await;
    let before = dropped(&s, "deadlines", "deadline").await;
    let img = neu_image("patches_1.jpg");

    // A deadline that has passed by the time the request reaches the batcher.
    let r =
        s.client.post(s.url("/v1/inspect")).header("x-request-timeout-ms", "0").body(img.clone()).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(error_code(r).await, "deadline_exceeded");

    // A 20 ms deadline behind a backlog of 12 single-image batches.
    let backlog = spawn_backlog(&s, 12, &img);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let r = s
        .client
        .post(s.url("/v1/inspect"))
        .header("x-request-timeout-ms", "20")
        .body(img.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    for b in backlog {
        assert_eq!(b.await.unwrap(), 200);
    }
    // The batcher pops the expired request on its own thread, possibly after the backlog's last reply went out.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while dropped(&s, "deadlines", "deadline").await < before + 2.0 {
        assert!(std::time::Instant::now() < until, "the batcher counted both drops");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_after_warm_up() {
    // A 64-image warm-up batch takes long enough to observe the loading state.
    let s = TestServer::start(
        r#"
[[models]]
name = "steel-surface"
source = "builtin:steel-surface"
max_batch_size = 64
"#,
    )
    .await;
    let r = s.client.get(s.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["models"][0]["status"], "loading");
    let r = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200, "live while loading");
    let r = s.inspect("", "image/jpeg", neu_image("crazing_1.jpg")).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_code(r).await, "not_ready");

    s.wait_ready(Duration::from_secs(120)).await;
    let r = s.inspect("", "image/jpeg", neu_image("crazing_1.jpg")).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_metrics_endpoints() {
    let s = TestServer::ready(DEFAULT).await;
    let v: serde_json::Value = s.client.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["default"], "steel-surface");
    let m = &v["models"][0];
    assert_eq!(m["status"], "ready");
    assert_eq!(m["architecture"], "mobilenetv2_100");
    assert_eq!(m["labels"].as_array().unwrap().len(), 6);
    assert_eq!(m["input_size"], serde_json::json!([3, 224, 224]));

    let r = s.inspect("", "image/jpeg", neu_image("scratches_2.jpg")).await;
    assert_eq!(r.status(), 200);
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "lineside_http_requests_total",
        "lineside_queue_depth",
        "lineside_batch_size_bucket",
        "lineside_inference_seconds_bucket",
        "lineside_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }
    assert!(text.contains("status=\"200\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_departed_clients_are_not_computed() {
    let s = TestServer::ready(&single_image_batches("departures", 64)).await;
    let before = dropped(&s, "departures", "client_gone").await;
    let queued_before = metric_sum(&s, "lineside_queued_total", &[("model", "departures")]).await;
    let img = neu_image("pitted_surface_1.jpg");
    // A queue of single-image batches, so the leavers below wait behind it.
    let backlog = spawn_backlog(&s, 56, &img);
    wait_for_metric(&s, "lineside_queue_depth", "departures", 8.0, "the backlog to queue").await;
    // Raw sockets, so that leaving is one deterministic close of the
    // connection, not whatever an HTTP client does with a dropped future.
    let mut leavers = Vec::new();
    for _ in 0..3 {
        leavers.push(post_and_hold(&s, "/v1/inspect", &img).await);
    }
    // Leave only once the leavers are queued (at the tail, behind the
    // backlog): leaving earlier drops them before the batcher ever sees them.
    // Waiting on evidence, not a timeout, keeps this independent of load.
    wait_for_metric(&s, "lineside_queued_total", "departures", queued_before + 59.0, "the leavers to be queued").await;
    let depth = metric_sum(&s, "lineside_queue_depth", &[("model", "departures")]).await;
    assert!(depth >= 3.0, "the backlog drained before the leavers left (queue depth {depth}): the premise failed");
    drop(leavers);
    for b in backlog {
        assert_eq!(b.await.unwrap(), 200);
    }
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while dropped(&s, "departures", "client_gone").await < before + 3.0 {
        assert!(std::time::Instant::now() < until, "batcher skipped the departed clients' requests");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
