//! `lineside models`: fetch models from the hub, list the cache, and check
//! a model against its PyTorch reference before serving it.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Context;
use clap::{Args, Subcommand};
use hf_hub::progress::{DownloadEvent, Progress, ProgressEvent, ProgressHandler};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lineside::hub::{Hub, Want, cached_models};
use lineside::source::{LocalModel, ModelSource};
use lineside_inference::models::{LoadedModel, supported_architectures};
use lineside_inference::{ComputeDevice, Kernels, parity};

/// Fetch, list and check models
///
/// Hub sources are `hf://owner/name[@revision]` (a branch, tag or commit; default main).
/// The hub client honours HF_ENDPOINT, HF_TOKEN, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE,
/// and shares its cache with Python's huggingface_hub.
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ModelsArgs {
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Subcommand)]
enum ModelsCommand {
    Pull(PullArgs),
    List(ListArgs),
    Verify(VerifyArgs),
    Digest(DigestArgs),
    /// List the architectures lineside can load.
    Architectures,
}

/// Print a model's digest: what `[[models]] sha256` pins and `lineside sign model` signs.
///
/// It covers config.json, model.safetensors and, for PatchCore folders,
/// patchcore.json and memory_bank.safetensors.
#[derive(Args)]
struct DigestArgs {
    /// A folder, `builtin:NAME` or `hf://owner/name[@revision]`.
    source: String,
}

/// Download a hub model into the cache; print the resolved commit and the snapshot folder.
#[derive(Args)]
struct PullArgs {
    /// `hf://owner/name[@revision]`.
    source: String,
}

/// List the models in the hub cache.
#[derive(Args)]
struct ListArgs {
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// Load a model; when it has a ref.safetensors (input, logits, features.i from PyTorch/timm),
/// compare every output and exit non-zero above the tolerance.
#[derive(Args)]
struct VerifyArgs {
    /// A folder, `builtin:NAME` or `hf://owner/name[@revision]`.
    source: String,
    /// Largest max-abs error allowed, relative to each reference tensor's max abs value.
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
    /// `cpu`, `cuda` or `cuda:N`: check the model where it will run (a GPU
    /// needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: ComputeDevice,
    /// `lineside` (the default on a CPU) or `candle`: candle's own ops
    /// only, the path a GPU runs, checked on this CPU.
    #[arg(long, default_value = "lineside")]
    kernels: Kernels,
}

pub fn run(a: ModelsArgs) -> anyhow::Result<()> {
    match a.command {
        ModelsCommand::Pull(p) => pull(p),
        ModelsCommand::List(l) => list(l),
        ModelsCommand::Verify(v) => verify(v),
        ModelsCommand::Digest(d) => digest(d),
        ModelsCommand::Architectures => {
            supported_architectures().iter().for_each(|a| println!("{a}"));
            Ok(())
        }
    }
}

fn digest(a: DigestArgs) -> anyhow::Result<()> {
    let local = LocalModel::resolve_blocking(&a.source, &Hub::from_env()?, Want::Serve)?;
    let digest = match local.dir() {
        Some(dir) => lineside::integrity::model_digest(dir).with_context(|| format!("reading {}", dir.display()))?,
        None => {
            let files = local.files()?;
            lineside::integrity::files_digest([
                ("config.json", files.config_json.as_bytes()),
                ("model.safetensors", &files.weights[..]),
            ])
        }
    };
    println!("{digest}");
    Ok(())
}

fn pull(a: PullArgs) -> anyhow::Result<()> {
    let source = ModelSource::parse(&a.source)?;
    anyhow::ensure!(
        matches!(source, ModelSource::Hub(_)),
        "`{}` is not a hub source (hf://owner/name[@revision])",
        a.source
    );
    let hub = Hub::from_env()?.with_progress(Progress::new(Bars::default()));
    eprintln!("fetching {source} from {} into {}", hub.endpoint(), hub.cache_dir().display());
    let local = LocalModel::resolve_blocking(&a.source, &hub, Want::WithReference)?;
    let dir = local.dir().context("a hub model has a folder")?;
    println!("commit   {}", local.commit.as_deref().unwrap_or("?"));
    println!("snapshot {}", dir.display());
    Ok(())
}

fn list(a: ListArgs) -> anyhow::Result<()> {
    let hub = Hub::from_env()?;
    let revisions = cached_models(hub.cache_dir());
    if a.json {
        for r in &revisions {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!("cache {}", hub.cache_dir().display());
    if revisions.is_empty() {
        println!("(no models)");
    }
    for r in &revisions {
        let refs = if r.refs.is_empty() { String::new() } else { format!(" ({})", r.refs.join(", ")) };
        println!("hf://{}@{}{refs}  {:.1} MB", r.repo, r.commit, r.bytes as f64 / 1e6);
    }
    Ok(())
}

fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    // Before any download: a CPU-only build cannot check on a GPU.
    a.device.check_supported()?;
    let local = LocalModel::resolve_blocking(&a.source, &Hub::from_env()?, Want::WithReference)?;
    let files = local.files()?;
    let device = a.device.open()?;
    let model = LoadedModel::load_on(&files, &device, a.kernels).with_context(|| format!("loading {}", a.source))?;
    let (c, h, w) = model.preprocessor.input_shape();
    let commit = local.commit.as_deref().map(|c| format!(", commit {c}")).unwrap_or_default();
    println!(
        "{}: {} loads ({} classes, input {c}x{h}x{w}, version {}{commit}) on {}, {} kernels",
        a.source, model.config.architecture, model.config.num_classes, model.version, a.device, model.kernels
    );
    let Some(dir) = local.dir().filter(|d| d.join("ref.safetensors").is_file()) else {
        println!("no ref.safetensors: loading is all that was checked");
        return Ok(());
    };
    let refs = parity::load_refs(dir, &device)?;
    let report = parity::check_loaded(&model, &refs, &a.source)?;
    for t in &report.tensors {
        let flag = if t.relative <= a.tolerance { "ok" } else { "MISMATCH" };
        println!("  {:<11} max abs {:.3e}  relative {:.3e}  {flag}", t.name, t.max_abs, t.relative);
    }
    println!("  top-1 {}", if report.top1_match { "matches" } else { "DIFFERS" });
    anyhow::ensure!(
        report.top1_match && report.worst() <= a.tolerance,
        "{} does not match its reference: worst relative error {:.3e} (tolerance {:.1e})",
        a.source,
        report.worst(),
        a.tolerance
    );
    Ok(())
}

/// One progress bar per downloaded file. hf-hub reports each file's size at
/// its start and then byte deltas by file name.
#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl ProgressHandler for Bars {
    fn on_progress(&self, event: &ProgressEvent) {
        let ProgressEvent::Download(DownloadEvent::Progress { files }) = event else { return };
        let mut bars = self.bars.lock().expect("progress bars");
        for f in files {
            let bar = bars.entry(f.filename.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(f.total_bytes));
                bar.set_style(
                    ProgressStyle::with_template("{msg:24} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec}")
                        .expect("progress template"),
                );
                bar.set_message(f.filename.clone());
                bar
            });
            bar.set_length(f.total_bytes.max(f.bytes_completed));
            bar.set_position(f.bytes_completed);
        }
    }
}
