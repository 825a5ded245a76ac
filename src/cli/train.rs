//! `lineside train`.

use std::path::PathBuf;

use clap::Args;
use lineside_training::TrainConfig;

/// Fine-tune a classifier on a folder of labelled images.
///
/// Fine-tunes the head of a pretrained timm backbone on labelled images and
/// writes a timm hub-format folder (config.json with label_names,
/// model.safetensors) plus training.json with the held-out accuracy.
#[derive(Args)]
pub struct TrainArgs {
    /// Folder of images: one sub-folder per class, or files named CLASS_<n>.ext.
    #[arg(long)]
    data: PathBuf,
    /// timm hub-format backbone folder (config.json + model.safetensors).
    #[arg(long)]
    backbone: PathBuf,
    /// Output model folder.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: u32,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Augmented views per training image (flips/rotations plus brightness and contrast jitter).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=8))]
    views: u32,
    /// Share of each class held out for validation.
    #[arg(long, default_value_t = 0.2, value_parser = fraction)]
    val_fraction: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Store the weights as fp16 (half the size; compute stays f32).
    #[arg(long)]
    fp16: bool,
}

pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let report = lineside_training::train(TrainConfig {
        data: a.data,
        backbone: a.backbone,
        out: a.out.clone(),
        epochs: a.epochs as usize,
        batch_size: a.batch_size as usize,
        learning_rate: a.lr,
        weight_decay: a.weight_decay,
        views: a.views as usize,
        val_fraction: a.val_fraction,
        seed: a.seed,
        fp16: a.fp16,
    })?;
    println!(
        "held-out top-1 {:.2}% ({} of {} images, never trained on); model written to {}",
        report.val_accuracy * 100.0,
        (report.val_accuracy * report.val_images as f64).round(),
        report.val_images,
        a.out.display()
    );
    for (label, row) in report.labels.iter().zip(&report.confusion) {
        println!("  {label:>16}: {row:?}");
    }
    Ok(())
}

fn fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v > 0.0 && v < 1.0 { Ok(v) } else { Err("must be between 0 and 1".into()) }
}
