//! `lineside fit`: fit a PatchCore anomaly model from images of good parts.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lineside_inference::anomaly::patchcore::{FitSettings, FitStage, PatchCore};

/// Fit an anomaly model (PatchCore) from a folder of good images.
///
/// Writes a model folder: patchcore.json (manifest, thresholds), memory_bank.safetensors and the
/// backbone's config.json + model.safetensors. A share of the images (--held-out) stays out of the
/// memory bank and sets the thresholds.
#[derive(Args)]
pub struct FitArgs {
    /// Folder of good images (searched recursively).
    #[arg(long)]
    good: PathBuf,
    /// Backbone: a timm hub-format folder (mobilenetv2_100, tf_efficientnet_lite0, …) or builtin:steel-surface.
    #[arg(long)]
    backbone: String,
    /// Output model folder.
    #[arg(long)]
    out: PathBuf,
    /// Share of patches kept in the memory bank.
    #[arg(long, default_value_t = 0.1)]
    coreset_ratio: f32,
    /// Images are resized to this square size.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// The two backbone feature maps used (indices into timm's features_only outputs).
    #[arg(long, value_delimiter = ',', default_value = "2,3", num_args = 2)]
    layers: Vec<usize>,
    /// Share of good images held out to set the thresholds.
    #[arg(long, default_value_t = 0.1)]
    held_out: f32,
    /// Quantile of held-out good scores used as the threshold (1 = their maximum).
    #[arg(long, default_value_t = 1.0)]
    threshold_quantile: f32,
    /// Random projection size guiding the coreset selection (0 = none).
    #[arg(long, default_value_t = 64)]
    projection_dim: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub fn run(a: FitArgs) -> anyhow::Result<()> {
    let files = lineside::source::LocalModel::read_files(&a.backbone)?;
    let good = image_files(&a.good)?;
    anyhow::ensure!(!good.is_empty(), "no images in {}", a.good.display());
    let settings = FitSettings {
        layers: [a.layers[0], a.layers[1]],
        image_size: a.image_size,
        coreset_ratio: a.coreset_ratio,
        projection_dim: a.projection_dim,
        held_out: a.held_out,
        threshold_quantile: a.threshold_quantile,
        batch_size: a.batch_size,
        seed: a.seed,
        ..FitSettings::default()
    };
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {elapsed}").expect("template"));
    let model = PatchCore::fit(&files, &good, &settings, |stage| {
        let (msg, done, total) = match stage {
            FitStage::Embedding(d, t) => ("embedding", d, t),
            FitStage::Coreset(d, t) => ("coreset", d, t),
            FitStage::Threshold(d, t) => ("threshold", d, t),
        };
        bar.set_message(msg);
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish();
    model.save(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let m = &model.manifest;
    println!(
        "fitted {} on {} good images ({} in the bank, {} held out): {} of {} patches kept, dim {}, \
         thresholds image {:.4} pixel {:.4}, {:.1} s; peak RSS {:.0} MiB → {}",
        m.backbone,
        m.fit.good_images,
        m.fit.bank_images,
        m.fit.held_out_images,
        m.memory_bank_size,
        m.fit.patches,
        m.feature_dim,
        m.image_threshold,
        m.pixel_threshold,
        m.fit.seconds,
        super::bench::peak_rss_mib(),
        a.out.display()
    );
    Ok(())
}

/// Image files under `dir`, sorted.
pub fn image_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if is_image(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_image(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg" | "bmp" | "tif" | "tiff" | "webp"))
}
