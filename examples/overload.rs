//! Open-loop overload: POSTs one image at a fixed rate, whatever the server
//! does, and reports how it answered. Used by `bench/overload.sh`.
//!
//! ```text
//! cargo run --release --example overload -- --url http://127.0.0.1:8080 \
//!     --image part.jpg --rate 800 --duration 60 [--pid SERVER_PID] [--deadline-ms 5000]
//! ```
//!
//! Latency is counted from when a request was due, not when it was sent, so
//! a client that falls behind shows up as latency (no coordinated omission);
//! `send_lag` says how far behind it fell. With `--pid`, the server's RSS is
//! sampled every 250 ms. After the load, readiness and one inspection are
//! timed to show recovery. Prints one JSON object.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Args {
    url: String,
    image: Vec<u8>,
    rate: f64,
    duration: Duration,
    pid: Option<u32>,
    deadline_ms: u64,
}

fn args() -> Args {
    let mut a = Args {
        url: "http://127.0.0.1:8080".into(),
        image: Vec::new(),
        rate: 100.0,
        duration: Duration::from_secs(60),
        pid: None,
        deadline_ms: 5000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value,
            "--image" => a.image = std::fs::read(&value).unwrap_or_else(|e| panic!("{value}: {e}")),
            "--rate" => a.rate = value.parse().expect("--rate: requests per second"),
            "--duration" => a.duration = Duration::from_secs_f64(value.parse().expect("--duration: seconds")),
            "--pid" => a.pid = Some(value.parse().expect("--pid")),
            "--deadline-ms" => a.deadline_ms = value.parse().expect("--deadline-ms"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!a.image.is_empty(), "--image is required");
    a
}

/// Latencies in ms per outcome (an HTTP status, or `error`).
type Samples = BTreeMap<String, Vec<f64>>;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({
        "count": v.len(),
        "p50_ms": percentile(&v, 0.5),
        "p99_ms": percentile(&v, 0.99),
        "p999_ms": percentile(&v, 0.999),
        "max_ms": v[v.len() - 1],
        "over_10ms": v.iter().filter(|&&x| x > 10.0).count(),
    })
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[tokio::main]
async fn main() {
    let a = args();
    let client = reqwest::Client::builder().pool_max_idle_per_host(512).build().unwrap();
    let url = format!("{}/v1/inspect", a.url);
    let image = bytes::Bytes::from(a.image.clone());
    let samples: Arc<Mutex<Samples>> = Arc::default();
    let errors: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let rss = Arc::new(Mutex::new(Vec::<f64>::new()));
    if let Some(pid) = a.pid {
        let rss = rss.clone();
        tokio::spawn(async move {
            loop {
                if let Some(m) = rss_mib(pid) {
                    rss.lock().unwrap().push(m);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }
    let rss_before = a.pid.and_then(rss_mib);
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / a.rate);
    let total = (a.rate * a.duration.as_secs_f64()) as usize;
    let mut lag = Vec::with_capacity(total);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        lag.push(due.elapsed().as_secs_f64() * 1e3);
        let (client, url, image, samples, errors) =
            (client.clone(), url.clone(), image.clone(), samples.clone(), errors.clone());
        let deadline = a.deadline_ms.to_string();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(&url)
                .header("content-type", "image/jpeg")
                .header("x-request-timeout-ms", deadline)
                .body(image)
                .send()
                .await;
            let key = match r {
                Ok(r) => {
                    let status = r.status().as_u16().to_string();
                    let _ = r.bytes().await;
                    status
                }
                Err(e) => {
                    let kind = if e.is_connect() {
                        "connect"
                    } else if e.is_timeout() {
                        "timeout"
                    } else {
                        "other"
                    };
                    *errors.lock().unwrap().entry(format!("{kind}: {e}")).or_default() += 1;
                    "error".to_string()
                }
            };
            samples.lock().unwrap().entry(key).or_default().push(due.elapsed().as_secs_f64() * 1e3);
        }));
    }
    let sent_in = start.elapsed();
    for t in tasks {
        let _ = t.await;
    }
    let loaded_for = start.elapsed();

    // Recovery: readiness and one inspection right after the load.
    let t = Instant::now();
    let ready = client.get(format!("{}/ready", a.url)).send().await.map(|r| r.status().as_u16()).unwrap_or(0);
    let ready_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let one = client.post(&url).header("content-type", "image/jpeg").body(image.clone()).send().await;
    let one = one.map(|r| r.status().as_u16()).unwrap_or(0);
    let one_ms = t.elapsed().as_secs_f64() * 1e3;

    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let by_status: BTreeMap<String, Value> = samples.into_iter().map(|(k, v)| (k, summary(v))).collect();
    let rss = rss.lock().unwrap().clone();
    let out = json!({
        "offered_rate": a.rate,
        "requests": total,
        "sent_in_s": sent_in.as_secs_f64(),
        "finished_in_s": loaded_for.as_secs_f64(),
        "send_lag": summary(lag),
        "deadline_ms": a.deadline_ms,
        "by_status": by_status,
        "errors": *errors.lock().unwrap(),
        "rss_mib": {
            "before": rss_before,
            "max": rss.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
            "after": a.pid.and_then(rss_mib),
        },
        "after_load": { "ready_status": ready, "ready_ms": ready_ms, "inspect_status": one, "inspect_ms": one_ms },
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
