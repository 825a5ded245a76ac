//! A local server speaking the Hugging Face hub's file protocol, so tests run
//! the real hf-hub client code with no network.
//!
//! What hf-hub 1.0 needs (see shared/TOOLCHAIN-NOTES.md):
//! - `HEAD /{owner}/{name}/resolve/{revision}/{file}` answers with `ETag` or
//!   `X-Linked-Etag` (the blob name), `X-Repo-Commit` (the snapshot folder)
//!   and the size (`X-Linked-Size` or `Content-Length`), and never
//!   `X-Xet-Hash`, which would switch the client to the Xet protocol;
//! - `GET` on the same URL, following redirects.
//!
//! Like the real hub, weights (LFS files) answer with a 302 to a CDN path
//! carrying the `X-Linked-*` headers, and small files come back directly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use axum::routing::get;
use sha2::{Digest, Sha256};

/// Files of one commit, by path in the repo.
type Files = BTreeMap<String, Bytes>;

#[derive(Default)]
struct Repo {
    /// Branch and tag names → commit.
    refs: HashMap<String, String>,
    commits: HashMap<String, Files>,
}

#[derive(Default)]
struct HubState {
    repos: RwLock<HashMap<String, Repo>>,
    /// Blobs by sha256, for the CDN path.
    blobs: RwLock<HashMap<String, Bytes>>,
    requests: AtomicUsize,
    endpoint: RwLock<String>,
}

/// A running local hub.
pub struct LocalHub {
    pub endpoint: String,
    state: Arc<HubState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LocalHub {
    pub async fn start() -> Self {
        let state = Arc::new(HubState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        *state.endpoint.write().unwrap() = endpoint.clone();
        let app = Router::new()
            .route("/{owner}/{name}/resolve/{revision}/{*file}", get(resolve))
            .route("/cdn/{sha}", get(cdn))
            .with_state(state.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self { endpoint, state, stop: Some(stop), task: Some(task) }
    }

    /// Publishes `files` as a new commit of `repo` and points `revision` at it; returns the commit.
    pub fn publish(&self, repo: &str, revision: &str, files: Vec<(&str, Vec<u8>)>) -> String {
        let mut h = Sha256::new();
        h.update(repo);
        h.update(revision);
        let mut commit_files = Files::new();
        for (name, bytes) in files {
            h.update(name);
            h.update(&bytes);
            let bytes = Bytes::from(bytes);
            self.state.blobs.write().unwrap().insert(sha256(&bytes), bytes.clone());
            commit_files.insert(name.to_string(), bytes);
        }
        let commit = hex(&h.finalize())[..40].to_string();
        let mut repos = self.state.repos.write().unwrap();
        let r = repos.entry(repo.to_string()).or_default();
        r.commits.insert(commit.clone(), commit_files);
        r.refs.insert(revision.to_string(), commit.clone());
        commit
    }

    /// Publishes the files of a folder (those not in `skip`).
    pub fn publish_folder(&self, repo: &str, revision: &str, dir: &Path, skip: &[&str]) -> String {
        let mut files = Vec::new();
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !skip.contains(&n.as_str()))
            .collect();
        names.sort();
        for n in &names {
            files.push((n.as_str(), std::fs::read(dir.join(n)).unwrap()));
        }
        self.publish(repo, revision, files)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Stops listening; later requests get "connection refused".
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn not_found(code: &str, commit: Option<&str>) -> Response<Body> {
    let mut r = Response::builder().status(StatusCode::NOT_FOUND).header("x-error-code", code);
    if let Some(c) = commit {
        r = r.header("x-repo-commit", c);
    }
    r.body(Body::from(code.to_string())).unwrap()
}

async fn resolve(
    State(st): State<Arc<HubState>>,
    UrlPath((owner, name, revision, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response<Body> {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let repos = st.repos.read().unwrap();
    let Some(repo) = repos.get(&format!("{owner}/{name}")) else { return not_found("RepoNotFound", None) };
    let commit = if repo.commits.contains_key(&revision) { Some(&revision) } else { repo.refs.get(&revision) };
    let Some(commit) = commit else { return not_found("RevisionNotFound", None) };
    let Some(bytes) = repo.commits[commit].get(&file) else { return not_found("EntryNotFound", Some(commit)) };
    let sha = sha256(bytes);
    let etag = format!("\"{sha}\"");
    let lfs = file.ends_with(".safetensors");
    let mut r = Response::builder().header("x-repo-commit", commit.as_str()).header(header::ETAG, &etag);
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
        return r.status(StatusCode::NOT_MODIFIED).body(Body::empty()).unwrap();
    }
    if lfs {
        let cdn = format!("{}/cdn/{sha}", st.endpoint.read().unwrap());
        r = r
            .status(StatusCode::FOUND)
            .header(header::LOCATION, HeaderValue::from_str(&cdn).unwrap())
            .header("x-linked-etag", &etag)
            .header("x-linked-size", bytes.len().to_string());
        return r.body(Body::empty()).unwrap();
    }
    r.header(header::CONTENT_LENGTH, bytes.len()).body(Body::from(bytes.clone())).unwrap()
}

async fn cdn(State(st): State<Arc<HubState>>, UrlPath(sha): UrlPath<String>) -> Response<Body> {
    st.requests.fetch_add(1, Ordering::SeqCst);
    match st.blobs.read().unwrap().get(&sha) {
        Some(b) => Response::builder().header(header::CONTENT_LENGTH, b.len()).body(Body::from(b.clone())).unwrap(),
        None => not_found("EntryNotFound", None),
    }
}
