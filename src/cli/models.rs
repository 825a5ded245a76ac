//! `lineside models`: check model folders before serving them.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::{Args, Subcommand};
use lineside_inference::models::{LoadedModel, supported_architectures};
use lineside_inference::parity;

/// Check model folders and list what lineside can load.
#[derive(Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Subcommand)]
enum ModelsCommand {
    Verify(VerifyArgs),
    Architectures,
}

/// Load a model source; when the folder has a ref.safetensors (input, logits, features.i from
/// PyTorch/timm), compare every output and exit non-zero above the tolerance.
#[derive(Args)]
struct VerifyArgs {
    /// A timm hub-format folder or `builtin:NAME`.
    source: String,
    /// Largest max-abs error allowed, relative to each reference tensor's max abs value.
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
}

pub fn run(a: ModelsArgs) -> anyhow::Result<()> {
    match a.command {
        ModelsCommand::Verify(v) => verify(v),
        ModelsCommand::Architectures => {
            supported_architectures().iter().for_each(|a| println!("{a}"));
            Ok(())
        }
    }
}

fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let files = lineside::registry::read_source(&a.source)?;
    let model = LoadedModel::load(&files, &Device::Cpu).with_context(|| format!("loading {}", a.source))?;
    let (c, h, w) = model.preprocessor.input_shape();
    println!(
        "{}: {} loads ({} classes, input {c}x{h}x{w}, version {})",
        a.source, model.config.architecture, model.config.num_classes, model.version
    );
    let dir = PathBuf::from(&a.source);
    if !dir.join("ref.safetensors").is_file() {
        println!("no ref.safetensors: loading is all that was checked");
        return Ok(());
    }
    let refs = parity::load_refs(&dir, &Device::Cpu)?;
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
