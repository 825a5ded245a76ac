//! Per-factory pipelines: which model and which plugins each factory uses,
//! and the watcher that hot-reloads plugin files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use lineside_plugins::{ContentCheck, EngineOptions, Kind, Limits, PluginEngine, PluginSlot};
use serde::Serialize;

use crate::config::{Config, FactoryConfig, OnPluginError, PluginConfig};
use crate::registry::{ModelEntry, Registry};

/// One factory's pipeline.
pub struct Factory {
    pub name: String,
    pub model: Arc<ModelEntry>,
    pub preprocess: Option<PluginSlot>,
    pub postprocess: Option<PluginSlot>,
    pub on_plugin_error: OnPluginError,
    /// Lower-cased request headers passed to plugins.
    pub allowed_headers: Vec<String>,
}

/// What `GET /v1/factories` shows of a factory.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FactoryInfo {
    pub name: String,
    pub model: String,
    pub on_plugin_error: OnPluginError,
    pub preprocess: Option<SlotInfo>,
    pub postprocess: Option<SlotInfo>,
}

/// A plugin slot as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SlotInfo {
    pub name: String,
    pub path: String,
    pub sha256: String,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
    pub reloads: u64,
    /// Why the file on disk is not the version being served.
    pub last_error: Option<String>,
}

impl Factory {
    pub fn info(&self) -> FactoryInfo {
        FactoryInfo {
            name: self.name.clone(),
            model: self.model.name.clone(),
            on_plugin_error: self.on_plugin_error,
            preprocess: self.preprocess.as_ref().map(slot_info),
            postprocess: self.postprocess.as_ref().map(slot_info),
        }
    }

    pub fn slots(&self) -> impl Iterator<Item = &PluginSlot> {
        self.preprocess.iter().chain(&self.postprocess)
    }
}

fn slot_info(s: &PluginSlot) -> SlotInfo {
    let st = s.status();
    SlotInfo {
        name: s.current().info().name.clone(),
        path: s.path().display().to_string(),
        sha256: st.sha256,
        loaded_at: st.loaded_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        reloads: st.reloads,
        last_error: st.last_error,
    }
}

/// All factories by name.
pub struct Factories {
    map: BTreeMap<String, Arc<Factory>>,
}

impl Factories {
    /// Loads every factory's plugins; a plugin that cannot be loaded at start is an error.
    pub fn load(cfg: &Config, registry: &Registry) -> anyhow::Result<Self> {
        let mut map = BTreeMap::new();
        if cfg.factories.is_empty() {
            return Ok(Self { map });
        }
        let mut opts = EngineOptions::default();
        if let Some(dir) = &cfg.plugins.cache_dir {
            opts.cache_dir = Some(dir.clone());
        }
        let max_mib =
            cfg.factories.iter().flat_map(|f| f.preprocess.iter().chain(&f.postprocess)).map(|p| p.memory_mib);
        opts.max_memory_bytes = max_mib.max().unwrap_or(64) << 20;
        let engine = PluginEngine::new(&opts).context("starting the plugin engine")?;
        let integrity = crate::integrity::Integrity::from_config(&cfg.integrity)?;
        for f in &cfg.factories {
            let factory =
                load_factory(&engine, &integrity, f, cfg, registry).with_context(|| format!("factory `{}`", f.name))?;
            map.insert(f.name.clone(), Arc::new(factory));
        }
        Ok(Self { map })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Factory>> {
        self.map.get(name).cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Factory>> {
        self.map.values()
    }

    /// Polls plugin files and reloads the changed ones, until the runtime stops.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        if every.is_zero() || self.map.is_empty() {
            return;
        }
        let factories = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let f = factories.clone();
                // Compiling a component is CPU work: keep it off the async workers.
                let _ = tokio::task::spawn_blocking(move || f.reload_changed()).await;
            }
        });
    }

    fn reload_changed(&self) {
        for slot in self.map.values().flat_map(|f| f.slots()) {
            if slot.changed_on_disk() {
                let _ = slot.reload();
            }
        }
    }
}

/// The pin and signature check a plugin file must pass, at start and on every reload.
fn check(integrity: &crate::integrity::Integrity, p: &PluginConfig) -> ContentCheck {
    let (integrity, pin) = (integrity.clone(), p.sha256.clone());
    let what = format!("plugin {}", p.path.display());
    let sig = crate::integrity::plugin_signature_path(&p.path);
    Arc::new(move |bytes: &[u8]| {
        let digest = crate::integrity::sha256_hex(bytes);
        integrity.check(&what, &digest, pin.as_deref(), &sig).map_err(|e| e.to_string())
    })
}

fn load_factory(
    engine: &PluginEngine,
    integrity: &crate::integrity::Integrity,
    f: &FactoryConfig,
    cfg: &Config,
    registry: &Registry,
) -> anyhow::Result<Factory> {
    let model_name = f.model.as_ref().unwrap_or(&cfg.server.default_model);
    let model = registry.get(model_name).with_context(|| format!("model `{model_name}` is not configured"))?;
    let slot = |p: &PluginConfig, kind: Kind| -> anyhow::Result<PluginSlot> {
        let limits = Limits {
            timeout: Duration::from_millis(p.timeout_ms),
            memory_bytes: p.memory_mib << 20,
            max_image_bytes: p.max_output_mib << 20,
            ..Limits::default()
        };
        let slot =
            PluginSlot::load_checked(engine, &p.name(), kind, &p.path, p.pairs(), limits, Some(check(integrity, p)))
                .with_context(|| format!("{} plugin {}", kind.world(), p.path.display()))?;
        tracing::info!(factory = %f.name, plugin = %p.name(), sha256 = %slot.status().sha256, "plugin loaded");
        Ok(slot)
    };
    Ok(Factory {
        name: f.name.clone(),
        model,
        preprocess: f.preprocess.as_ref().map(|p| slot(p, Kind::Preprocessor)).transpose()?,
        postprocess: f.postprocess.as_ref().map(|p| slot(p, Kind::Postprocessor)).transpose()?,
        on_plugin_error: f.on_plugin_error,
        allowed_headers: f.allowed_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
    })
}
