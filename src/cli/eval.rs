//! `lineside eval`: evaluate an anomaly model on an MVTec-layout dataset.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use image::imageops::FilterType;
use lineside_inference::anomaly::{PatchCore, metrics, regions, render};
use lineside_inference::preprocess::{DecodeLimits, decode};
use serde::Serialize;

use super::fit::image_files;

/// Evaluate an anomaly model on an MVTec AD-layout folder (test/<type>/*, ground_truth/<type>/*_mask.png).
///
/// Prints image AUROC, pixel AUROC, image F1 at the model's threshold (and the best F1 any
/// threshold reaches), how often a predicted region touches the ground-truth defect, and img/s.
#[derive(Args)]
pub struct EvalArgs {
    /// A model folder written by `lineside fit`.
    #[arg(long)]
    model: PathBuf,
    /// The dataset folder (the one holding `test/` and `ground_truth/`).
    #[arg(long)]
    dataset: PathBuf,
    /// Write a heatmap overlay PNG per test image into this folder.
    #[arg(long)]
    heatmaps: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Set the model's image and pixel thresholds to the F1-best ones on this
    /// (labelled) dataset, as anomalib's F1-adaptive threshold, and save them.
    #[arg(long)]
    adapt_thresholds: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    backbone: String,
    coreset_ratio: f32,
    memory_bank_size: usize,
    test_images: usize,
    image_auroc: f64,
    pixel_auroc: f64,
    image_f1: f64,
    image_f1_best: f64,
    /// Where the thresholds the F1 figure uses came from.
    threshold_source: String,
    defects_with_region_on_ground_truth: f64,
    good_flagged: usize,
    images_per_second: f64,
}

struct Sample {
    path: PathBuf,
    kind: String,
    mask: Option<PathBuf>,
}

fn samples(dataset: &Path) -> anyhow::Result<Vec<Sample>> {
    let mut out = Vec::new();
    for path in image_files(&dataset.join("test"))? {
        let kind = path.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap_or("").to_string();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let mask = dataset.join("ground_truth").join(&kind).join(format!("{stem}_mask.png"));
        out.push(Sample { mask: mask.is_file().then_some(mask), path, kind });
    }
    anyhow::ensure!(!out.is_empty(), "no test images under {}", dataset.join("test").display());
    Ok(out)
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let mut model = PatchCore::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let size = model.manifest.image_size;
    let samples = samples(&a.dataset)?;
    if let Some(dir) = &a.heatmaps {
        std::fs::create_dir_all(dir)?;
    }
    let (c, h, w) = model.preprocessor.input_shape();
    let (mut image_scores, mut labels) = (Vec::new(), Vec::new());
    let (mut pixel_scores, mut pixel_labels) = (Vec::new(), Vec::new());
    let (mut hits, mut defects) = (0usize, 0usize);
    let mut compute = 0f64;
    for chunk in samples.chunks(a.batch_size.max(1)) {
        let images = chunk
            .iter()
            .map(|s| Ok(decode(&std::fs::read(&s.path)?, DecodeLimits::default())?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut data = Vec::with_capacity(chunk.len() * c * h * w);
        for img in &images {
            data.extend(model.preprocessor.run(img)?);
        }
        let t = Instant::now();
        let results = model.score(&Tensor::from_vec(data, (chunk.len(), c, h, w), &Device::Cpu)?)?;
        compute += t.elapsed().as_secs_f64();
        for ((s, img), r) in chunk.iter().zip(&images).zip(results) {
            let anomalous = s.kind != "good";
            // Raw scores: the normalised ones are clipped at 1 and would tie.
            image_scores.push(r.raw_score);
            labels.push(anomalous);
            let truth = ground_truth(s.mask.as_deref(), size)?;
            pixel_scores.extend_from_slice(&r.raw_map);
            pixel_labels.extend(truth.iter().copied());
            let found = regions(&r.map, size, size, 0.5);
            if anomalous {
                defects += 1;
                let on_truth = found.iter().any(|g| region_touches(g, &truth, size));
                hits += usize::from(on_truth);
            }
            if let Some(dir) = &a.heatmaps {
                let name = format!("{}_{}.png", s.kind, s.path.file_stem().and_then(|n| n.to_str()).unwrap_or("image"));
                render::overlay(&img.to_rgb8(), &r.map, size, &found).save(dir.join(name))?;
            }
        }
    }
    let (image_best_t, image_best_f1) = metrics::best_f1(&image_scores, &labels);
    if a.adapt_thresholds {
        let (pixel_t, _) = metrics::best_f1(&pixel_scores, &pixel_labels);
        model.set_thresholds(&a.model, image_best_t, pixel_t, "f1_adaptive")?;
        eprintln!("thresholds set from {}: image {image_best_t:.4}, pixel {pixel_t:.4}", a.dataset.display());
    }
    let image_threshold = model.manifest.image_threshold;
    let good_flagged = image_scores.iter().zip(&labels).filter(|&(&s, &l)| !l && s >= image_threshold).count();
    let report = Report {
        model: a.model.display().to_string(),
        backbone: model.manifest.backbone.clone(),
        coreset_ratio: model.manifest.coreset_ratio,
        memory_bank_size: model.manifest.memory_bank_size,
        test_images: samples.len(),
        image_auroc: metrics::auroc(&image_scores, &labels).context("image AUROC needs good and defective images")?,
        pixel_auroc: metrics::auroc(&pixel_scores, &pixel_labels).context("pixel AUROC needs ground-truth masks")?,
        image_f1: metrics::f1_at(&image_scores, &labels, image_threshold),
        image_f1_best: image_best_f1,
        threshold_source: model.manifest.threshold_source.clone(),
        defects_with_region_on_ground_truth: hits as f64 / defects.max(1) as f64,
        good_flagged,
        images_per_second: samples.len() as f64 / compute,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} ({}, coreset {}, bank {}), {} test images",
            report.model, report.backbone, report.coreset_ratio, report.memory_bank_size, report.test_images
        );
        println!("image AUROC {:.4}  pixel AUROC {:.4}", report.image_auroc, report.pixel_auroc);
        println!(
            "image F1 {:.4} at the model's threshold ({}; best over thresholds {:.4}); good images flagged: {}",
            report.image_f1, report.threshold_source, report.image_f1_best, report.good_flagged
        );
        println!(
            "defective images with a region on the ground truth: {:.1}%",
            100.0 * report.defects_with_region_on_ground_truth
        );
        println!("inference {:.1} img/s (batch {}, model only)", report.images_per_second, a.batch_size);
    }
    Ok(())
}

/// The ground-truth mask at the map's size (all false without a mask).
fn ground_truth(mask: Option<&Path>, size: usize) -> anyhow::Result<Vec<bool>> {
    let Some(p) = mask else { return Ok(vec![false; size * size]) };
    let m = image::open(p).with_context(|| format!("{}", p.display()))?.to_luma8();
    let m = image::imageops::resize(&m, size as u32, size as u32, FilterType::Nearest);
    Ok(m.pixels().map(|p| p.0[0] > 127).collect())
}

fn region_touches(r: &lineside_inference::anomaly::Region, truth: &[bool], size: usize) -> bool {
    (r.y..r.y + r.height).any(|y| (r.x..r.x + r.width).any(|x| truth[y as usize * size + x as usize]))
}
