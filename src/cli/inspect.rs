//! `lineside inspect`: the serving pipeline without a server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use lineside::config::Config;
use lineside::registry::Registry;

/// Inspect image files offline and print one JSON line per image.
///
/// Runs the same pipeline as the server (decode, preprocess, batched
/// inference, verdict) without HTTP. Exits non-zero if any image failed.
#[derive(Args)]
pub struct InspectArgs {
    /// Image files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// TOML configuration file (models and limits, as for `serve`).
    #[arg(long, env = "LINESIDE_CONFIG")]
    config: Option<PathBuf>,
    /// Model name from the config (default: the config's default model).
    #[arg(long)]
    model: Option<String>,
    /// Or: a timm hub-format model folder to use instead of the config's models.
    #[arg(long, conflicts_with = "model")]
    model_dir: Option<PathBuf>,
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(a.config.as_deref())?;
    if let Some(dir) = &a.model_dir {
        let mut m = cfg.models[0].clone();
        m.name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        m.source = dir.display().to_string();
        cfg.server.default_model = m.name.clone();
        cfg.models = vec![m];
    }
    let name = a.model.unwrap_or_else(|| cfg.server.default_model.clone());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    lineside::preprocess_pool::configure(cfg.server.preprocess_pool())?;
    let registry = rt.block_on(Registry::start(
        &cfg.models,
        lineside::hub::Hub::new(&cfg.hub)?,
        lineside::integrity::Integrity::from_config(&cfg.integrity)?,
    ))?;
    let model = registry.get(&name).ok_or_else(|| anyhow::anyhow!("model `{name}` is not configured"))?;
    registry.wait_ready()?;

    let failures = rt.block_on(async {
        // All images are submitted at once so the batcher can batch them.
        let tasks: Vec<_> = a
            .images
            .iter()
            .map(|path| {
                let (model, path, server) = (model.clone(), path.clone(), cfg.server.clone());
                tokio::spawn(async move {
                    // Waiting for admission keeps the queue from overflowing on long file lists.
                    let _permit = model.admit().await.map_err(|e| e.to_string())?;
                    let bytes = tokio::fs::read(&path).await.map_err(|e| e.to_string())?;
                    let deadline = Instant::now() + Duration::from_secs(3600);
                    lineside::pipeline::inspect(
                        &model,
                        bytes.into(),
                        deadline,
                        lineside::pipeline::Options {
                            limits: server.decode_limits(),
                            jpeg_decode: server.jpeg_decode,
                            top_k: server.top_k,
                            heatmap: false,
                            retain_heatmap: false,
                            raw_outputs: false,
                        },
                    )
                    .await
                    .map_err(|e| e.to_string())
                })
            })
            .collect();
        let mut failures = 0;
        for (path, task) in a.images.iter().zip(tasks) {
            let line = match task.await {
                Ok(Ok(r)) => serde_json::json!({"file": path, "result": r}),
                Ok(Err(e)) => {
                    failures += 1;
                    serde_json::json!({"file": path, "error": e})
                }
                Err(e) => {
                    failures += 1;
                    serde_json::json!({"file": path, "error": e.to_string()})
                }
            };
            println!("{line}");
        }
        failures
    });
    anyhow::ensure!(failures == 0, "{failures} of {} images failed", a.images.len());
    Ok(())
}
