//! The loaded models: one batcher each, started in the background so the
//! server answers `/health` (and 503 on `/ready`) while weights load and warm up.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use lineside_inference::anomaly::PatchCore;
use lineside_inference::anomaly::patchcore::input_transform;
use lineside_inference::batcher::{Batcher, ModelStatus};
use lineside_inference::models::{Classifier, LoadedModel, Output};
use lineside_inference::{ComputeDevice, HubConfig, ModelFiles, Preprocessor};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ModelConfig;
use crate::error::ApiError;
use crate::hub::{Hub, Want};
use crate::integrity::{self, Integrity};
use crate::source::{LocalModel, ModelSource};

/// One served model.
pub struct ModelEntry {
    pub name: String,
    /// Content hash of the model files.
    pub version: String,
    pub architecture: String,
    pub labels: Vec<String>,
    pub preprocessor: Preprocessor,
    pub kind: ModelKind,
    pub batcher: Batcher<Output>,
    pub config: ModelConfig,
    /// The hub commit the files came from, for hub sources.
    pub commit: Option<String>,
    /// Requests admitted and not yet answered (decoding, queued or computing).
    /// Bounded so that overload is refused before any decoding work is done.
    admission: Arc<Semaphore>,
}

/// What a model computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Class probabilities (a timm classifier).
    Classifier,
    /// An anomaly score and map (PatchCore).
    Anomaly,
}

/// What `GET /v1/models` shows of a model.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelInfo {
    pub name: String,
    pub kind: ModelKind,
    pub version: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub architecture: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub labels: Vec<String>,
    pub input_size: [usize; 3],
    pub max_batch_size: usize,
    pub max_queue_delay_ms: u64,
    pub queue_capacity: usize,
    pub queue_depth: usize,
}

impl ModelEntry {
    /// Admits one request, or refuses at once: 429 when the model already holds
    /// as many requests as its queue and one batch can take, 503 when it is not serving.
    pub fn try_admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.check_serving()?;
        self.admission.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded {
            model: self.name.clone(),
            reason: format!("{} requests in flight", self.admission_capacity()),
        })
    }

    /// Waits for admission (offline batch mode).
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.admission.clone().acquire_owned().await.map_err(|_| ApiError::Internal("admission closed".into()))
    }

    fn admission_capacity(&self) -> usize {
        self.config.queue_capacity + self.config.max_batch_size
    }

    fn check_serving(&self) -> Result<(), ApiError> {
        match self.batcher.status() {
            ModelStatus::Ready => Ok(()),
            ModelStatus::Loading => Err(ApiError::NotReady(format!("model `{}` is loading", self.name))),
            ModelStatus::Failed(e) => {
                Err(ApiError::ModelUnavailable(format!("model `{}` failed to load: {e}", self.name)))
            }
            ModelStatus::Stopped => Err(ApiError::ModelUnavailable(format!("model `{}` has stopped", self.name))),
        }
    }

    pub fn info(&self) -> ModelInfo {
        let (status, error) = match self.batcher.status() {
            ModelStatus::Loading => ("loading", None),
            ModelStatus::Ready => ("ready", None),
            ModelStatus::Failed(e) => ("failed", Some(e)),
            ModelStatus::Stopped => ("stopped", None),
        };
        let (c, h, w) = self.preprocessor.input_shape();
        ModelInfo {
            name: self.name.clone(),
            kind: self.kind,
            version: self.version.clone(),
            source: self.config.source.clone(),
            commit: self.commit.clone(),
            architecture: self.architecture.clone(),
            status: status.into(),
            error,
            labels: self.labels.clone(),
            input_size: [c, h, w],
            max_batch_size: self.config.max_batch_size,
            max_queue_delay_ms: self.config.max_queue_delay_ms,
            queue_capacity: self.config.queue_capacity,
            queue_depth: self.batcher.queue_depth(),
        }
    }
}

/// All served models by name. A model can be replaced while serving (a new
/// version, a fitted anomaly model): requests hold the entry they were
/// admitted to, so the old version finishes what it has taken on.
pub struct Registry {
    models: RwLock<BTreeMap<String, Arc<ModelEntry>>>,
    history: Mutex<BTreeMap<String, History>>,
    hub: Hub,
    integrity: Integrity,
}

/// What a model's name has been through besides its current version.
#[derive(Default)]
struct History {
    /// The version served before the last swap, kept warm for a rollback.
    previous: Option<Arc<ModelEntry>>,
    /// A source being fetched from the hub.
    fetching: Option<String>,
    /// A version loading in the background.
    pending: Option<String>,
    /// Why the last load failed, if it did.
    last_error: Option<String>,
}

/// What `GET /v1/models/{name}` adds to [`ModelInfo`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionInfo {
    pub previous_version: Option<String>,
    /// A hub source being downloaded for the next version.
    pub fetching: Option<String>,
    pub pending_version: Option<String>,
    pub last_error: Option<String>,
}

impl Registry {
    /// Fetches hub sources, reads every model's files and starts its batcher;
    /// loading and warm-up continue on the batcher threads.
    /// Every model's files are checked against its pin and signature first.
    pub async fn start(models: &[ModelConfig], hub: Hub, integrity: Integrity) -> anyhow::Result<Self> {
        let mut map = BTreeMap::new();
        for m in models {
            let entry = async {
                let local = LocalModel::resolve(ModelSource::parse(&m.source)?, &hub, Want::Serve).await?;
                verify(&integrity, m, &local)?;
                start_model(m, &local)
            }
            .await
            .with_context(|| format!("model `{}`", m.name))?;
            map.insert(m.name.clone(), Arc::new(entry));
        }
        Ok(Self { models: RwLock::new(map), history: Mutex::new(BTreeMap::new()), hub, integrity })
    }

    /// The hub client models are fetched with.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn get(&self, name: &str) -> Option<Arc<ModelEntry>> {
        self.read().get(name).cloned()
    }

    /// Every model, by name.
    pub fn all(&self) -> Vec<Arc<ModelEntry>> {
        self.read().values().cloned().collect()
    }

    /// Starts `m` from `local` and serves it under its name at once, replacing
    /// (and keeping for a rollback) a model of that name.
    pub fn add(&self, m: &ModelConfig, local: &LocalModel) -> anyhow::Result<Arc<ModelEntry>> {
        let started = verify(&self.integrity, m, local).and_then(|_| start_model(m, local));
        let entry = Arc::new(started.with_context(|| format!("model `{}`", m.name))?);
        self.swap_in(entry.clone());
        Ok(entry)
    }

    /// Starts loading `m` next to the version being served and swaps it in
    /// once it has loaded and warmed up; a failed load leaves the served
    /// version alone and is recorded. Returns the new version. Fetching hub
    /// files and reading them happen here; loading continues in the background.
    pub async fn stage(self: &Arc<Self>, m: ModelConfig) -> anyhow::Result<String> {
        self.with_history(&m.name, |h| h.fetching = Some(m.source.clone()));
        let name = m.name.clone();
        let started = async {
            let local = LocalModel::resolve(ModelSource::parse(&m.source)?, &self.hub, Want::Serve).await?;
            let integrity = self.integrity.clone();
            tokio::task::spawn_blocking(move || {
                verify(&integrity, &m, &local)?;
                start_model(&m, &local)
            })
            .await?
        }
        .await;
        self.with_history(&name, |h| h.fetching = None);
        let entry = match started {
            Ok(e) => Arc::new(e),
            Err(e) => {
                let message = format!("{e:#}");
                self.with_history(&name, |h| h.last_error = Some(message));
                return Err(e);
            }
        };
        let version = entry.version.clone();
        self.with_history(&name, |h| {
            h.pending = Some(version.clone());
            h.last_error = None;
        });
        let registry = self.clone();
        tokio::spawn(async move {
            loop {
                match entry.batcher.status() {
                    ModelStatus::Loading => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                    ModelStatus::Ready => {
                        tracing::info!(model = %entry.name, version = %entry.version, "new version ready; swapping it in");
                        registry.swap_in(entry);
                        return;
                    }
                    ModelStatus::Failed(e) => {
                        tracing::error!(model = %entry.name, version = %entry.version, error = %e, "new version failed to load; the served version stays");
                        registry.with_history(&entry.name, |h| {
                            h.pending = None;
                            h.last_error = Some(format!("version {}: {e}", entry.version));
                        });
                        return;
                    }
                    ModelStatus::Stopped => return,
                }
            }
        });
        Ok(version)
    }

    /// Serves the previous version of `name` again; the current one becomes the previous.
    pub fn rollback(&self, name: &str) -> Option<Arc<ModelEntry>> {
        let previous = self.with_history(name, |h| h.previous.take())?;
        self.swap_in(previous.clone());
        Some(previous)
    }

    /// Versions around the served one.
    pub fn versions(&self, name: &str) -> VersionInfo {
        let h = self.history.lock().expect("registry history");
        let h = h.get(name);
        VersionInfo {
            previous_version: h.and_then(|h| h.previous.as_ref().map(|p| p.version.clone())),
            fetching: h.and_then(|h| h.fetching.clone()),
            pending_version: h.and_then(|h| h.pending.clone()),
            last_error: h.and_then(|h| h.last_error.clone()),
        }
    }

    fn swap_in(&self, entry: Arc<ModelEntry>) {
        let name = entry.name.clone();
        let old = self.models.write().expect("registry lock").insert(name.clone(), entry);
        self.with_history(&name, |h| {
            h.previous = old;
            h.pending = None;
            h.last_error = None;
        });
    }

    fn with_history<R>(&self, name: &str, f: impl FnOnce(&mut History) -> R) -> R {
        f(self.history.lock().expect("registry history").entry(name.to_string()).or_default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<ModelEntry>>> {
        self.models.read().expect("registry lock")
    }

    /// True when every model has loaded and run its warm-up batch.
    pub fn all_ready(&self) -> bool {
        self.read().values().all(|m| m.batcher.status() == ModelStatus::Ready)
    }

    /// Blocks until every model is ready or one failed (for the offline CLI).
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        loop {
            for m in self.all() {
                match m.batcher.status() {
                    ModelStatus::Failed(e) => anyhow::bail!("model `{}` failed to load: {e}", m.name),
                    ModelStatus::Stopped => anyhow::bail!("model `{}` stopped", m.name),
                    ModelStatus::Loading | ModelStatus::Ready => {}
                }
            }
            if self.all_ready() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Checks a model's files against its pin and, for folders, its signature.
/// Built-in models are part of the binary: only a pin applies to them.
fn verify(integrity: &Integrity, m: &ModelConfig, local: &LocalModel) -> anyhow::Result<()> {
    // Hashing every file costs a full read of the weights: only when something is to be checked.
    if m.sha256.is_none() && !integrity.checks_signatures() {
        return Ok(());
    }
    let what = format!("model `{}` ({})", m.name, local.source);
    match local.dir() {
        Some(dir) => {
            let digest = integrity::model_digest(dir).with_context(|| format!("reading {}", dir.display()))?;
            integrity.check(&what, &digest, m.sha256.as_deref(), &dir.join(integrity::MODEL_SIGNATURE))?;
        }
        None => {
            if let Some(pin) = &m.sha256 {
                let files = local.files()?;
                let digest = integrity::files_digest([
                    ("config.json", files.config_json.as_bytes()),
                    ("model.safetensors", &files.weights[..]),
                ]);
                integrity.check(&what, &digest, Some(pin), std::path::Path::new(""))?;
            }
        }
    }
    Ok(())
}

pub(crate) fn start_model(m: &ModelConfig, local: &LocalModel) -> anyhow::Result<ModelEntry> {
    if let Some(dir) = local.anomaly_dir() {
        return start_anomaly_model(m, dir, local.commit.clone());
    }
    let files = local.files()?;
    let hub = HubConfig::from_json(&files.config_json)?;
    let version = files.content_version();
    let device = m.device;
    let batcher = Batcher::spawn(&m.name, m.batcher(), move || {
        LoadedModel::load(&files, &device.open()?).map(|model| Classifier { model })
    })?;
    Ok(ModelEntry {
        name: m.name.clone(),
        kind: ModelKind::Classifier,
        version,
        architecture: hub.architecture.clone(),
        labels: hub.labels(),
        preprocessor: Preprocessor::new(&hub.pretrained_cfg),
        batcher,
        admission: Arc::new(Semaphore::new(m.queue_capacity + m.max_batch_size)),
        config: m.clone(),
        commit: local.commit.clone(),
    })
}

fn start_anomaly_model(m: &ModelConfig, dir: &Path, commit: Option<String>) -> anyhow::Result<ModelEntry> {
    anyhow::ensure!(
        m.device == ComputeDevice::Cpu,
        "model `{}`: {} is a PatchCore model, which runs on the CPU only, not on {}",
        m.name,
        dir.display(),
        m.device
    );
    let manifest = PatchCore::read_manifest(dir)?;
    let files = ModelFiles::from_dir(dir)?;
    let hub = HubConfig::from_json(&files.config_json)?;
    let version = PatchCore::content_version(dir)?;
    let owned = dir.to_path_buf();
    let batcher = Batcher::spawn(&m.name, m.batcher(), move || PatchCore::load(&owned))?;
    Ok(ModelEntry {
        name: m.name.clone(),
        kind: ModelKind::Anomaly,
        version,
        architecture: format!("patchcore/{}", manifest.backbone),
        labels: vec!["good".into(), "anomalous".into()],
        preprocessor: input_transform(&hub.pretrained_cfg, manifest.image_size),
        batcher,
        admission: Arc::new(Semaphore::new(m.queue_capacity + m.max_batch_size)),
        config: m.clone(),
        commit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Location;

    #[test]
    fn a_patchcore_model_on_a_gpu_is_refused_before_loading() {
        // Only the manifest's presence matters: the device is checked before anything is read.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(lineside_inference::anomaly::patchcore::MANIFEST), "{}").unwrap();
        let local = LocalModel {
            source: ModelSource::Folder(dir.path().to_path_buf()),
            location: Location::Folder(dir.path().to_path_buf()),
            commit: None,
        };
        let m = ModelConfig { device: ComputeDevice::Cuda(0), ..ModelConfig::new("bottle", "/m") };
        let err = format!("{:#}", start_model(&m, &local).err().expect("refused"));
        assert!(err.contains("model `bottle`") && err.contains("CPU only") && err.contains("cuda:0"), "{err}");
    }
}
