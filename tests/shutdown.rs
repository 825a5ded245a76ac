//! SIGTERM under load: the server stops accepting, finishes what it took on,
//! flushes its records and exits 0; nothing it processed goes unanswered.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ServerProcess, neu_image};
use serde_json::Value;

const CLIENTS: usize = 16;

/// How one request ended, from the client's side.
#[derive(Debug, Clone)]
enum Outcome {
    /// An HTTP answer: status, inspection id (2xx), and whether it came after the SIGTERM.
    Answered { status: u16, id: Option<String>, after_term: bool },
    /// The connection was refused: the server had stopped accepting.
    Refused,
    /// Anything else: the request may have reached the server and got no answer.
    Broken(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_load_answers_everything_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let mut server = ServerProcess::start(&["--data-dir", &data]).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let image = Arc::new(neu_image("pitted_surface_1.jpg"));
    let outcomes = Arc::new(Mutex::new(HashMap::<usize, Outcome>::new()));
    let (next, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let termed = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, base, image) = (client.clone(), server.base.clone(), image.clone());
            let (outcomes, next, answered, termed) = (outcomes.clone(), next.clone(), answered.clone(), termed.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let sent = client
                        .post(format!("{base}/v1/inspect"))
                        .header("content-type", "image/jpeg")
                        .header("idempotency-key", format!("term-{i}"))
                        .body(image.to_vec())
                        .send()
                        .await;
                    let outcome = match sent {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let v: Value = r.json().await.unwrap_or_default();
                            answered.fetch_add(1, Ordering::Relaxed);
                            let id = v["id"].as_str().map(str::to_string);
                            Outcome::Answered { status, id, after_term: termed.load(Ordering::Relaxed) }
                        }
                        Err(e) if e.is_connect() => Outcome::Refused,
                        Err(e) => Outcome::Broken(format!("{e:?}")),
                    };
                    let stop = !matches!(outcome, Outcome::Answered { .. });
                    outcomes.lock().unwrap().insert(i, outcome);
                    if stop {
                        return;
                    }
                }
            })
        })
        .collect();
    while answered.load(Ordering::Relaxed) < 60 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = server.child.id().to_string();
    termed.store(true, Ordering::Relaxed);
    let term_at = Instant::now();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exit = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(term_at.elapsed() < Duration::from_secs(45), "the server did not exit within its grace period");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let drained_in = term_at.elapsed();
    for c in clients {
        c.await.unwrap();
    }
    assert!(exit.success(), "exit status after SIGTERM: {exit:?}");

    let outcomes = outcomes.lock().unwrap().clone();
    let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.values().filter(|o| f(o)).count();
    let ok = count(&|o| matches!(o, Outcome::Answered { status: 200, .. }));
    let after = count(&|o| matches!(o, Outcome::Answered { status: 200, after_term: true, .. }));
    let other = count(&|o| matches!(o, Outcome::Answered { status, .. } if *status != 200));
    let refused = count(&|o| matches!(o, Outcome::Refused));
    let broken: Vec<(usize, &str)> = outcomes
        .iter()
        .filter_map(|(i, o)| match o {
            Outcome::Broken(e) => Some((*i, e.as_str())),
            _ => None,
        })
        .collect();
    eprintln!(
        "SIGTERM after {} answers; exited 0 after {drained_in:?}: {ok} answered 200 ({after} of them finished after the \
         SIGTERM), {other} other statuses, {refused} refused at connect, {} broken",
        ok - after,
        broken.len()
    );
    assert_eq!(other, 0, "no request was refused or failed while draining");

    // What the server processed is exactly what it answered: every stored
    // record was answered 200 with its id, and every 200 is stored.
    let backend = lineside_store::Backend::Sqlite { data_dir: dir.path().to_path_buf() };
    let store = lineside_store::Store::open(backend).await.unwrap();
    store.check().await.expect("the store is intact after a graceful exit");
    let records = store.scan(&Default::default(), 0, 100_000).await.unwrap();
    let stored: HashMap<String, String> =
        records.iter().map(|r| (r.data.idempotency_key.clone().unwrap(), r.data.id.clone())).collect();
    let mut unanswered = Vec::new();
    for (key, id) in &stored {
        let i: usize = key.trim_start_matches("term-").parse().unwrap();
        match outcomes.get(&i) {
            Some(Outcome::Answered { status: 200, id: Some(answered), .. }) if answered == id => {}
            other => unanswered.push(format!("{key}: stored as {id}, client saw {other:?}")),
        }
    }
    assert!(unanswered.is_empty(), "processed but not answered:\n{}", unanswered.join("\n"));
    assert_eq!(stored.len(), ok, "every 200 is stored");
    assert!(after > 0, "some requests were in flight at the SIGTERM and finished during the drain");
    // A broken connection is only acceptable for a request the server never took on.
    for (i, b) in &broken {
        assert!(!stored.contains_key(&format!("term-{i}")), "request {i} broke after being processed: {b}");
    }
}
