//! Configuration: built-in defaults, then a TOML file, then `LINESIDE_*`
//! environment variables, then command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use lineside_inference::ComputeDevice;
use lineside_inference::batcher::BatcherConfig;
use lineside_inference::preprocess::{DecodeLimits, JpegDecode};
use serde::{Deserialize, Serialize};

/// Everything `lineside serve` and `lineside inspect` read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default = "default_models")]
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub plugins: PluginSettings,
    /// Where `hf://` model sources come from and are cached.
    #[serde(default)]
    pub hub: crate::hub::HubSettings,
    /// Per-factory pipelines served at `/v1/factories/{name}/inspect`.
    #[serde(default)]
    pub factories: Vec<FactoryConfig>,
    /// Durable inspection records and retained images.
    #[serde(default)]
    pub records: RecordsConfig,
    /// API keys per factory and the admin token's digest.
    #[serde(default)]
    pub auth: crate::auth::AuthConfig,
    /// HTTPS instead of HTTP, optionally with client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::TlsConfig>,
    /// Keys whose signatures on models and plugins are trusted.
    #[serde(default)]
    pub integrity: crate::integrity::IntegrityConfig,
}

/// Where inspection records and retained images are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordsConfig {
    /// Off: nothing is stored, idempotency keys are ignored and `/v1/inspections` answers 404.
    pub enabled: bool,
    /// SQLite database (`lineside.db`) and the image store (`images/`).
    pub data_dir: PathBuf,
    /// `postgres://user:pass@host/db`: records go to PostgreSQL (shared by
    /// replicas) instead of SQLite. Best set as `LINESIDE_RECORDS__DATABASE_URL`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Share of passing parts whose image is kept (failed and review parts always are).
    pub pass_sample_rate: f64,
    /// Retained images unused for longer are removed.
    pub max_image_age_days: f64,
    /// Retained images past this total are removed, least recently used first.
    pub max_image_bytes: u64,
    /// How often retention runs.
    pub retention_interval_s: u64,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            data_dir: PathBuf::from("lineside-data"),
            database_url: None,
            pass_sample_rate: 0.01,
            max_image_age_days: 90.0,
            max_image_bytes: 20 * 1024 * 1024 * 1024,
            retention_interval_s: 600,
        }
    }
}

impl RecordsConfig {
    /// The store these settings name.
    pub fn backend(&self) -> lineside_store::Backend {
        let data_dir = self.data_dir.clone();
        match &self.database_url {
            Some(url) => lineside_store::Backend::Postgres { url: url.clone(), data_dir },
            None => lineside_store::Backend::Sqlite { data_dir },
        }
    }

    /// Retention limits as the store takes them.
    pub fn retention(&self) -> lineside_store::RetentionPolicy {
        lineside_store::RetentionPolicy {
            max_age: Duration::from_secs_f64(self.max_image_age_days * 86_400.0),
            max_bytes: self.max_image_bytes,
        }
    }
}

/// Settings shared by every plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginSettings {
    /// Where compiled plugins are cached (default: a `lineside-plugin-cache` folder in the OS temp dir).
    pub cache_dir: Option<PathBuf>,
    /// How often plugin files are checked for changes; 0 turns hot reload off.
    pub watch_interval_ms: u64,
}

impl Default for PluginSettings {
    fn default() -> Self {
        Self { cache_dir: None, watch_interval_ms: 250 }
    }
}

/// One factory's pipeline: decode → preprocess plugin → model → postprocess plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactoryConfig {
    /// Name in the URL.
    pub name: String,
    /// The model to run (default: `server.default_model`).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub preprocess: Option<PluginConfig>,
    #[serde(default)]
    pub postprocess: Option<PluginConfig>,
    /// What a failing plugin does to the request.
    #[serde(default)]
    pub on_plugin_error: OnPluginError,
    /// Request headers passed to plugins (besides `x-line-id` and `x-part-id`).
    #[serde(default)]
    pub allowed_headers: Vec<String>,
}

/// One plugin of a factory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The component file (`.wasm`); watched for changes.
    pub path: PathBuf,
    /// Settings passed to the plugin's `init`: nested tables become dotted
    /// keys, lists become comma-separated values.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Deadline of one call.
    #[serde(default = "d_plugin_timeout")]
    pub timeout_ms: u64,
    /// Linear memory cap.
    #[serde(default = "d_plugin_memory")]
    pub memory_mib: usize,
    /// Largest image a preprocessor may return.
    #[serde(default = "d_plugin_output")]
    pub max_output_mib: usize,
    /// SHA-256 of the `.wasm` file: any other file is refused, at start and on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

fn d_plugin_timeout() -> u64 {
    50
}
fn d_plugin_memory() -> usize {
    64
}
fn d_plugin_output() -> usize {
    32
}

impl PluginConfig {
    /// The plugin's name in logs and errors: its file name without extension.
    pub fn name(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin".into())
    }

    /// `config` as the key/value list the WIT `init` takes.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (k, v) in &self.config {
            flatten(k, v, &mut out);
        }
        out
    }
}

fn flatten(key: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value;
    match v {
        Value::Object(m) => m.iter().for_each(|(k, v)| flatten(&format!("{key}.{k}"), v, out)),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(scalar).collect();
            out.push((key.to_string(), parts.join(",")));
        }
        other => out.push((key.to_string(), scalar(other))),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What happens to a request when one of its factory's plugins fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnPluginError {
    /// Answer with the plugin's error.
    #[default]
    Fail,
    /// Carry on without the plugin (original image; the model's own verdict)
    /// and list the failure in the response.
    PassThrough,
}

/// HTTP and request handling.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// Largest request body, in bytes (413 above it).
    pub body_limit_bytes: usize,
    /// Deadline for requests without `X-Request-Timeout-Ms`.
    pub default_timeout_ms: u64,
    /// Model used when `/v1/inspect` has no `model` parameter.
    pub default_model: String,
    /// Predictions returned per inspection.
    pub top_k: usize,
    /// Largest accepted image width and height, checked from the header before decoding.
    pub max_image_side: u32,
    /// Largest decoder allocation, in bytes.
    pub max_decode_bytes: u64,
    /// Where `POST /v1/models/{name}/fit` writes the models it fits.
    pub model_dir: PathBuf,
    /// Backbone for fits that name none: a timm hub-format folder or `builtin:steel-surface`.
    pub fit_backbone: String,
    /// Bearer token for the admin API (model swaps, rollbacks, fits, plugin
    /// reloads); unset disables it. Best set as `LINESIDE_SERVER__ADMIN_TOKEN`,
    /// or store only its digest as `auth.admin_token_sha256`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// On SIGTERM or Ctrl-C: how long in-flight requests may take to finish
    /// before the server exits anyway.
    pub shutdown_grace_s: u64,
    /// Threads that decode and resize images; 0 means one per core.
    pub preprocess_threads: usize,
    /// Niceness of those threads (Linux), 0–19, so that inference goes
    /// first when both want the cores; 0 keeps the process's priority.
    pub preprocess_nice: i32,
    /// `scaled`: decode JPEGs at the smallest DCT scale that still covers
    /// the model's resize (PIL's draft mode), except where a preprocess
    /// plugin or a heatmap needs the full image. `full` (the default) is
    /// exactly timm's eval transform.
    pub jpeg_decode: JpegDecode,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:8080".parse().expect("valid address"),
            body_limit_bytes: 32 * 1024 * 1024,
            default_timeout_ms: 10_000,
            default_model: "steel-surface".into(),
            top_k: 5,
            max_image_side: 16_384,
            max_decode_bytes: 512 * 1024 * 1024,
            model_dir: PathBuf::from("lineside-data/models"),
            fit_backbone: "builtin:steel-surface".into(),
            admin_token: None,
            shutdown_grace_s: 30,
            preprocess_threads: 0,
            preprocess_nice: 10,
            jpeg_decode: JpegDecode::Full,
        }
    }
}

impl ServerConfig {
    /// The preprocessing threads this asks for.
    pub fn preprocess_pool(&self) -> crate::preprocess_pool::PoolConfig {
        crate::preprocess_pool::PoolConfig { threads: self.preprocess_threads, nice: self.preprocess_nice }
    }

    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_width: self.max_image_side,
            max_height: self.max_image_side,
            max_alloc: self.max_decode_bytes,
        }
    }
}

/// One served model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name used in `?model=` and in responses.
    pub name: String,
    /// `builtin:NAME`, a timm hub-format or lineside model folder, or `hf://owner/name[@revision]`.
    pub source: String,
    #[serde(default = "d_batch")]
    pub max_batch_size: usize,
    /// The most a partial batch waits, after its oldest request was queued,
    /// for requests still being decoded; with none on the way it runs at once.
    #[serde(default = "d_delay")]
    pub max_queue_delay_ms: u64,
    #[serde(default = "d_queue")]
    pub queue_capacity: usize,
    /// Threads of this model's own compute pool (default: all cores). Wide convolution
    /// GEMMs run on `matrixmultiply`'s process-wide pool instead, sized by
    /// MATMUL_NUM_THREADS (default: the physical cores, at most 4).
    #[serde(default)]
    pub threads: Option<usize>,
    /// `cpu` (the default), `cuda` or `cuda:N`: a GPU needs a build with the
    /// `cuda` feature, and classifiers only (PatchCore models run on the CPU).
    #[serde(default)]
    pub device: ComputeDevice,
    #[serde(default)]
    pub verdict: VerdictRule,
    /// The model's digest (`lineside models digest SOURCE`): other files are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

fn d_batch() -> usize {
    8
}
fn d_delay() -> u64 {
    5
}
fn d_queue() -> usize {
    64
}

impl ModelConfig {
    /// A model with the default batching and verdict settings.
    pub fn new(name: &str, source: &str) -> Self {
        Self {
            name: name.into(),
            source: source.into(),
            max_batch_size: d_batch(),
            max_queue_delay_ms: d_delay(),
            queue_capacity: d_queue(),
            threads: None,
            device: ComputeDevice::Cpu,
            verdict: VerdictRule::default(),
            sha256: None,
        }
    }

    pub fn batcher(&self) -> BatcherConfig {
        BatcherConfig {
            max_batch_size: self.max_batch_size,
            max_queue_delay: Duration::from_millis(self.max_queue_delay_ms),
            queue_capacity: self.queue_capacity,
            threads: self.threads,
        }
    }
}

/// How a classification becomes pass/fail.
///
/// An image passes only when the top label is one of `pass_labels` with a
/// score of at least `min_score`; anything else fails. Unsure means fail: a
/// line would rather re-inspect a good part than ship a bad one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerdictRule {
    pub pass_labels: Vec<String>,
    pub min_score: f32,
}

impl Default for VerdictRule {
    fn default() -> Self {
        Self { pass_labels: ["good", "ok", "pass", "normal"].map(String::from).to_vec(), min_score: 0.5 }
    }
}

fn default_models() -> Vec<ModelConfig> {
    vec![ModelConfig::new("steel-surface", "builtin:steel-surface")]
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            models: default_models(),
            plugins: PluginSettings::default(),
            hub: Default::default(),
            factories: Vec::new(),
            records: RecordsConfig::default(),
            auth: Default::default(),
            tls: None,
            integrity: Default::default(),
        }
    }
}

impl Config {
    /// Defaults, then `file` (if any), then `LINESIDE_SECTION__KEY` variables
    /// (`LINESIDE_SERVER__ADDR=127.0.0.1:9000`).
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            anyhow::ensure!(f.is_file(), "config file {} not found", f.display());
            fig = fig.merge(Toml::file(f));
        }
        // A name with a double underscore is a setting, whatever its section, so that a misspelt one is
        // refused (`deny_unknown_fields`) rather than ignored; LINESIDE_CONFIG, LINESIDE_DATABASE_URL (flags'
        // variables) and LINESIDE_SHARED have none.
        let env = Env::prefixed("LINESIDE_").filter(|k| k.as_str().contains("__")).split("__");
        let cfg: Config = fig.merge(env).extract()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a TOML document over the defaults (no environment), for tests and tools.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let cfg: Config = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)).extract()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.models.is_empty(), "no models configured");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.records.pass_sample_rate),
            "records.pass_sample_rate must be in 0..=1"
        );
        anyhow::ensure!(self.records.max_image_age_days > 0.0, "records.max_image_age_days must be positive");
        anyhow::ensure!(
            (0..=19).contains(&self.server.preprocess_nice),
            "server.preprocess_nice must be 0-19 (a lower niceness than the model's threads would make decoding preempt inference)"
        );
        anyhow::ensure!(
            self.server.preprocess_threads <= 1024,
            "server.preprocess_threads must be at most 1024 (0: one per core)"
        );
        anyhow::ensure!(self.records.retention_interval_s >= 1, "records.retention_interval_s must be at least 1");
        anyhow::ensure!(
            (1..=600_000).contains(&self.server.default_timeout_ms),
            "server.default_timeout_ms must be 1..=600000"
        );
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            anyhow::ensure!(names.insert(&m.name), "model `{}` is configured twice", m.name);
            anyhow::ensure!(m.max_batch_size >= 1, "model `{}`: max_batch_size must be at least 1", m.name);
            anyhow::ensure!(m.queue_capacity >= 1, "model `{}`: queue_capacity must be at least 1", m.name);
            anyhow::ensure!(
                m.max_queue_delay_ms <= 10_000,
                "model `{}`: max_queue_delay_ms must be at most 10000",
                m.name
            );
            m.device.check_supported().with_context(|| format!("model `{}`", m.name))?;
        }
        anyhow::ensure!(
            names.contains(&self.server.default_model),
            "default_model `{}` is not among the configured models",
            self.server.default_model
        );
        let mut factories = std::collections::HashSet::new();
        for f in &self.factories {
            anyhow::ensure!(factories.insert(&f.name), "factory `{}` is configured twice", f.name);
            let model = f.model.as_ref().unwrap_or(&self.server.default_model);
            anyhow::ensure!(names.contains(model), "factory `{}`: model `{model}` is not configured", f.name);
            for p in f.preprocess.iter().chain(&f.postprocess) {
                anyhow::ensure!(
                    (1..=60_000).contains(&p.timeout_ms),
                    "factory `{}`: plugin timeout_ms must be 1..=60000",
                    f.name
                );
                anyhow::ensure!(
                    (1..=4096).contains(&p.memory_mib),
                    "factory `{}`: plugin memory_mib must be 1..=4096",
                    f.name
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serve_the_builtin_model() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.models[0].source, "builtin:steel-surface");
        assert_eq!(c.server.addr.port(), 8080);
    }

    #[test]
    fn toml_overrides_defaults() {
        let c = Config::from_toml(
            r#"
            [server]
            default_model = "a"
            [[models]]
            name = "a"
            source = "/m"
            max_batch_size = 2
            "#,
        )
        .unwrap();
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].max_batch_size, 2);
        assert_eq!(c.models[0].queue_capacity, 64);
        assert!(Config::from_toml("[server]\nbogus = 1").is_err());
        assert!(Config::from_toml("[server]\ndefault_model = \"nope\"").is_err());
    }

    #[test]
    fn model_device_parses_and_needs_a_cuda_build() {
        let model = |device: &str| {
            format!("[server]\ndefault_model = \"a\"\n[[models]]\nname = \"a\"\nsource = \"/m\"\n{device}")
        };
        assert_eq!(Config::from_toml(&model("")).unwrap().models[0].device, ComputeDevice::Cpu);
        assert_eq!(Config::from_toml(&model("device = \"cpu\"")).unwrap().models[0].device, ComputeDevice::Cpu);
        let bad = format!("{:#}", Config::from_toml(&model("device = \"tpu:0\"")).unwrap_err());
        assert!(bad.contains("expected `cpu`, `cuda` or `cuda:N`"), "{bad}");
        let gpu = Config::from_toml(&model("device = \"cuda:1\""));
        if ComputeDevice::cuda_built() {
            assert_eq!(gpu.unwrap().models[0].device, ComputeDevice::Cuda(1));
        } else {
            let err = format!("{:#}", gpu.unwrap_err());
            assert!(err.contains("model `a`") && err.contains("--features cuda"), "{err}");
        }
    }

    #[test]
    fn factory_plugin_config_flattens_to_pairs() {
        let c = Config::from_toml(
            r#"
            [[factories]]
            name = "acme"
            postprocess = { path = "/p/defect-codes.wasm", config = { threshold = 0.4, codes = { crazing = "SS-01" }, pass_labels = ["good", "ok"] } }
            "#,
        )
        .unwrap();
        let post = c.factories[0].postprocess.as_ref().unwrap();
        assert_eq!(post.name(), "defect-codes");
        let mut pairs = post.pairs();
        pairs.sort();
        let expect = [("codes.crazing", "SS-01"), ("pass_labels", "good,ok"), ("threshold", "0.4")];
        assert_eq!(pairs, expect.map(|(k, v)| (k.to_string(), v.to_string())));
        assert!(Config::from_toml("[[factories]]\nname = \"a\"\nmodel = \"nope\"").is_err());
    }

    #[test]
    fn env_overrides_settings_and_refuses_unknown_sections() {
        let vars = [
            ("LINESIDE_SERVER__TOP_K", "3"),
            ("LINESIDE_HUB__OFFLINE", "true"),
            ("LINESIDE_PLUGINS__WATCH_INTERVAL_MS", "1234"),
            ("LINESIDE_INTEGRITY__REQUIRE_SIGNATURES", "true"),
            ("LINESIDE_CONFIG", "/nonexistent.toml"),
            ("LINESIDE_DATABASE_URL", "postgres://nowhere/x"),
        ];
        // SAFETY: no other test in this crate sets environment variables, and none reads these.
        unsafe { vars.iter().for_each(|(k, v)| std::env::set_var(k, v)) };
        let c = Config::load(None);
        unsafe { vars.iter().for_each(|(k, _)| std::env::remove_var(k)) };
        let c = c.unwrap();
        assert_eq!(c.server.top_k, 3);
        assert_eq!(c.hub.offline, Some(true));
        assert_eq!(c.plugins.watch_interval_ms, 1234);
        assert!(c.integrity.require_signatures);
        assert_eq!(c.records.database_url, None);

        unsafe { std::env::set_var("LINESIDE_SERVR__ADDR", "127.0.0.1:9000") };
        let misspelt = Config::load(None);
        unsafe { std::env::remove_var("LINESIDE_SERVR__ADDR") };
        let err = format!("{:#}", misspelt.expect_err("an unknown section is refused"));
        assert!(err.contains("servr"), "{err}");
    }
}
