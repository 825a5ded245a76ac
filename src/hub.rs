//! Fetching models from the Hugging Face hub with the `hf-hub` crate, into
//! the standard hub cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), which Python tools share.
//!
//! A fetch resolves the revision once, on `config.json`, and takes every
//! other file at the commit that came back, so a branch moving mid-download
//! never mixes two versions. Offline (`HF_HUB_OFFLINE=1` or `[hub] offline`)
//! reads only the cache; when the hub is unreachable, hf-hub falls back to
//! the cache by itself, and an uncached revision fails after one retry.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::progress::Progress;
use hf_hub::{HFClient, HFError};
use lineside_inference::anomaly::patchcore::{MANIFEST, MEMORY_BANK};
use serde::{Deserialize, Serialize};

use crate::source::HubRef;

/// `[hub]` in the config. Each setting falls back to the hub's own
/// environment variable, so one environment serves lineside and Python alike.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubSettings {
    /// Hub URL (default: `HF_ENDPOINT`, else https://huggingface.co).
    pub endpoint: Option<String>,
    /// Cache folder (default: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub).
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network (default: `HF_HUB_OFFLINE`).
    pub offline: Option<bool>,
    /// Retries of a failed request before falling back to the cache (default 1).
    pub retries: Option<usize>,
}

/// What a fetch brings besides `config.json` and `model.safetensors`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Want {
    /// What serving needs: the model, and a PatchCore model's memory bank.
    #[default]
    Serve,
    /// Also `ref.safetensors` when the repo has one (`lineside models verify`/`pull`).
    WithReference,
}

/// A revision's files in the local cache.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `…/models--owner--name/snapshots/{commit}`.
    pub dir: PathBuf,
    pub commit: String,
}

/// Why a fetch failed. Every message names the repo, revision and file.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{model}: `{file}` is not there (no such repo, revision or file, or no access)")]
    NotFound { model: HubRef, file: String },
    #[error("{model}: `{file}` is not in the local cache at {}, and {why}", cache.display())]
    NotCached { model: HubRef, file: String, cache: PathBuf, why: &'static str },
    #[error("{model}: the hub refused access to `{file}` ({status}); set HF_TOKEN to a token that can read it")]
    Denied { model: HubRef, file: String, status: u16 },
    #[error("{model}: fetching `{file}` failed: {message}")]
    Failed { model: HubRef, file: String, message: String },
}

impl HubError {
    /// True when the hub could not be reached or failed, as opposed to
    /// answering that something does not exist.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::NotCached { .. } | Self::Failed { .. })
    }
}

/// A hub client shared by the server and the CLI; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    client: HFClient,
    offline: bool,
    progress: Option<Progress>,
}

impl Hub {
    /// A client from the settings, with environment fallbacks.
    pub fn new(s: &HubSettings) -> anyhow::Result<Self> {
        let mut b = HFClient::builder()
            .retry_max_attempts(s.retries.unwrap_or(1))
            .retry_base_delay(Duration::from_millis(200))
            .user_agent(concat!("lineside/", env!("CARGO_PKG_VERSION")));
        if let Some(e) = &s.endpoint {
            b = b.endpoint(e);
        }
        if let Some(d) = &s.cache_dir {
            b = b.cache_dir(d);
        }
        let offline = s.offline.unwrap_or_else(offline_from_env);
        Ok(Self { client: b.build()?, offline, progress: None })
    }

    /// A client configured by the environment alone.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::new(&HubSettings::default())
    }

    /// Reports download progress to `progress` (the CLI's progress bars).
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    pub fn endpoint(&self) -> &str {
        self.client.endpoint()
    }

    pub fn cache_dir(&self) -> &Path {
        self.client.cache_dir()
    }

    /// Fetches (or finds in the cache) what `want` needs of `source`.
    pub async fn fetch(&self, source: &HubRef, want: Want) -> Result<Snapshot, HubError> {
        let config = self
            .file(source, source.revision_or_main(), "config.json")
            .await?
            .ok_or_else(|| HubError::NotFound { model: source.clone(), file: "config.json".into() })?;
        let dir = config.parent().expect("a cached file lies in its snapshot folder").to_path_buf();
        let commit = dir.file_name().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        let mut required = vec!["model.safetensors"];
        if self.file(source, &commit, MANIFEST).await?.is_some() {
            required.push(MEMORY_BANK);
        }
        for file in required {
            self.file(source, &commit, file)
                .await?
                .ok_or_else(|| HubError::NotFound { model: source.clone(), file: file.into() })?;
        }
        if want == Want::WithReference {
            self.file(source, &commit, "ref.safetensors").await?;
        }
        tracing::info!(%source, %commit, dir = %dir.display(), "hub snapshot ready");
        Ok(Snapshot { dir, commit })
    }

    /// One file at `revision`; `None` when the repo has no such file.
    async fn file(&self, source: &HubRef, revision: &str, file: &str) -> Result<Option<PathBuf>, HubError> {
        match self.download(source, revision, file, self.offline).await {
            // hf-hub falls back to the cache when the hub is unreachable, but
            // not to its record of files that do not exist (`.no_exist`), so a
            // cached model without an optional file would fail; ask the cache.
            Err(HFError::Request { .. }) if !self.offline => match self.download(source, revision, file, true).await {
                Err(HFError::LocalEntryNotFound { .. }) => Err(HubError::NotCached {
                    model: source.clone(),
                    file: file.to_string(),
                    cache: self.cache_dir().to_path_buf(),
                    why: "the hub is unreachable",
                }),
                other => self.found(source, file, other),
            },
            other => self.found(source, file, other),
        }
    }

    async fn download(
        &self,
        source: &HubRef,
        revision: &str,
        file: &str,
        cache_only: bool,
    ) -> hf_hub::HFResult<PathBuf> {
        let (owner, name) = hf_hub::split_id(&source.repo);
        let repo = self.client.model(owner, name);
        repo.download_file()
            .filename(file)
            .revision(revision.to_string())
            .local_files_only(cache_only)
            .maybe_progress(self.progress.clone())
            .send()
            .await
    }

    fn found(&self, source: &HubRef, file: &str, r: hf_hub::HFResult<PathBuf>) -> Result<Option<PathBuf>, HubError> {
        match r {
            Ok(path) => Ok(Some(path)),
            Err(HFError::EntryNotFound { .. }) => Ok(None),
            Err(e) => Err(self.describe(source, file, e)),
        }
    }

    fn describe(&self, source: &HubRef, file: &str, e: HFError) -> HubError {
        let (model, file) = (source.clone(), file.to_string());
        match e {
            HFError::LocalEntryNotFound { .. } => HubError::NotCached {
                model,
                file,
                cache: self.cache_dir().to_path_buf(),
                why: if self.offline { "lineside is offline (HF_HUB_OFFLINE)" } else { "the hub is unreachable" },
            },
            HFError::RepoNotFound { .. } | HFError::RevisionNotFound { .. } => HubError::NotFound { model, file },
            HFError::AuthRequired { context } | HFError::Forbidden { context } => {
                HubError::Denied { model, file, status: context.status.as_u16() }
            }
            // Only when the cache had nothing to fall back on.
            HFError::Request { .. } => HubError::NotCached {
                model,
                file,
                cache: self.cache_dir().to_path_buf(),
                why: "the hub is unreachable",
            },
            e => HubError::Failed { model, file, message: error_chain(&e) },
        }
    }
}

fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Every revision of every model in the cache, for `lineside models list`.
pub fn cached_models(cache: &Path) -> Vec<CachedRevision> {
    let mut out = Vec::new();
    let Ok(repos) = std::fs::read_dir(cache) else { return out };
    for repo in repos.flatten() {
        let folder = repo.file_name().to_string_lossy().into_owned();
        let Some(id) = folder.strip_prefix("models--").map(|r| r.replacen("--", "/", 1)) else { continue };
        let refs = read_refs(&repo.path().join("refs"));
        let Ok(snaps) = std::fs::read_dir(repo.path().join("snapshots")) else { continue };
        for snap in snaps.flatten() {
            let commit = snap.file_name().to_string_lossy().into_owned();
            let names = refs.iter().filter(|(_, c)| *c == commit).map(|(r, _)| r.clone()).collect();
            out.push(CachedRevision { repo: id.clone(), commit, refs: names, bytes: snapshot_bytes(&snap.path()) });
        }
    }
    out.sort_by(|a, b| (&a.repo, &a.commit).cmp(&(&b.repo, &b.commit)));
    out
}

/// One cached snapshot.
#[derive(Debug, Serialize)]
pub struct CachedRevision {
    pub repo: String,
    pub commit: String,
    /// Branches and tags that pointed here when last fetched.
    pub refs: Vec<String>,
    pub bytes: u64,
}

fn read_refs(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let (Ok(name), Ok(commit)) = (p.strip_prefix(dir), std::fs::read_to_string(&p)) {
                out.push((name.to_string_lossy().into_owned(), commit.trim().to_string()));
            }
        }
    }
    out
}

fn snapshot_bytes(dir: &Path) -> u64 {
    // Snapshot entries are symlinks into blobs/; metadata() follows them.
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.len())
        .sum()
}
