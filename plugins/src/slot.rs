//! A plugin that can be replaced while requests use it.
//!
//! Callers take an `Arc<Plugin>` for the length of one call; a reload builds
//! the new plugin completely, then swaps the pointer. In-flight calls finish
//! on the old version, new calls get the new one, and a file that fails to
//! load leaves the old version serving, with the error reported.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::engine::PluginEngine;
use crate::error::LoadError;
use crate::plugin::{Kind, Limits, Plugin};

/// The file's identity as the watcher sees it: a change means "try to reload".
type Fingerprint = Option<(SystemTime, u64)>;

/// A check of a plugin file's bytes before it is loaded, at start and on
/// every reload (a pinned digest, a signature): `Err` says why it is refused.
pub type ContentCheck = Arc<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// A hot-swappable plugin loaded from a file.
pub struct PluginSlot {
    engine: PluginEngine,
    name: String,
    kind: Kind,
    path: PathBuf,
    config: Vec<(String, String)>,
    limits: Limits,
    check: Option<ContentCheck>,
    current: ArcSwap<Plugin>,
    state: Mutex<State>,
}

struct State {
    fingerprint: Fingerprint,
    status: SlotStatus,
}

/// What a slot serves and how its last reload went.
#[derive(Debug, Clone)]
pub struct SlotStatus {
    /// SHA-256 of the version being served.
    pub sha256: String,
    pub loaded_at: SystemTime,
    /// Successful swaps since start.
    pub reloads: u64,
    /// Why the newest file on disk is not being served, if it is not.
    pub last_error: Option<String>,
}

impl PluginSlot {
    /// Loads the plugin at `path`; fails if it cannot be served.
    pub fn load(
        engine: &PluginEngine,
        name: &str,
        kind: Kind,
        path: &Path,
        config: Vec<(String, String)>,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        Self::load_checked(engine, name, kind, path, config, limits, None)
    }

    /// [`PluginSlot::load`], with `check` run on the file's bytes before this
    /// and every later load.
    pub fn load_checked(
        engine: &PluginEngine,
        name: &str,
        kind: Kind,
        path: &Path,
        config: Vec<(String, String)>,
        limits: Limits,
        check: Option<ContentCheck>,
    ) -> Result<Self, LoadError> {
        let fingerprint = fingerprint(path);
        let bytes = read_checked(path, check.as_ref())?;
        let plugin = Plugin::load(engine, name, kind, &bytes, config.clone(), limits)?;
        let status = SlotStatus {
            sha256: plugin.info().sha256.clone(),
            loaded_at: SystemTime::now(),
            reloads: 0,
            last_error: None,
        };
        Ok(Self {
            engine: engine.clone(),
            name: name.to_string(),
            kind,
            path: path.to_path_buf(),
            config,
            limits,
            check,
            current: ArcSwap::from_pointee(plugin),
            state: Mutex::new(State { fingerprint, status }),
        })
    }

    /// The version to use for one call.
    pub fn current(&self) -> Arc<Plugin> {
        self.current.load_full()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn status(&self) -> SlotStatus {
        self.state.lock().expect("slot state").status.clone()
    }

    /// Whether the file changed since it was last looked at (cheap: one `stat`).
    pub fn changed_on_disk(&self) -> bool {
        fingerprint(&self.path) != self.state.lock().expect("slot state").fingerprint
    }

    /// Loads the file again and swaps it in if its content changed. On
    /// failure the current version keeps serving and the error is recorded.
    /// Returns whether a new version is now served.
    pub fn reload(&self) -> Result<bool, LoadError> {
        let seen = fingerprint(&self.path);
        let result = self.try_reload();
        let mut state = self.state.lock().expect("slot state");
        state.fingerprint = seen;
        match &result {
            Ok(Some(plugin)) => {
                state.status = SlotStatus {
                    sha256: plugin.info().sha256.clone(),
                    loaded_at: SystemTime::now(),
                    reloads: state.status.reloads + 1,
                    last_error: None,
                };
                self.current.store(plugin.clone());
                tracing::info!(plugin = %self.name, sha256 = %plugin.info().sha256, "plugin reloaded");
            }
            Ok(None) => state.status.last_error = None,
            Err(e) => {
                state.status.last_error = Some(e.to_string());
                tracing::error!(plugin = %self.name, path = %self.path.display(), error = %e, "plugin reload failed; the previous version keeps serving");
            }
        }
        result.map(|p| p.is_some())
    }

    fn try_reload(&self) -> Result<Option<Arc<Plugin>>, LoadError> {
        let bytes = read_checked(&self.path, self.check.as_ref())?;
        if crate::cache::digest(&bytes) == self.current.load().info().sha256 {
            return Ok(None);
        }
        let plugin = Plugin::load(&self.engine, &self.name, self.kind, &bytes, self.config.clone(), self.limits)?;
        Ok(Some(Arc::new(plugin)))
    }
}

fn read_checked(path: &Path, check: Option<&ContentCheck>) -> Result<Vec<u8>, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.display().to_string(), source })?;
    if let Some(check) = check {
        check(&bytes).map_err(LoadError::Refused)?;
    }
    Ok(bytes)
}

fn fingerprint(path: &Path) -> Fingerprint {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}
