//! Augmented views of training images, and the frozen backbone's last
//! feature map for each, computed once.

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use lineside_inference::models::LoadedModel;
use lineside_inference::preprocess::{DecodeLimits, decode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::dataset::Sample;

/// Cached features `[N, C, H, W]` with their class indices.
pub struct FeatureSet {
    pub features: Tensor,
    pub labels: Vec<u32>,
}

/// View `v` of an image: one of the 8 flips/rotations of the square (surface
/// texture has no canonical orientation), and for `v > 0` a random
/// brightness/contrast change, as lighting drifts on a line.
fn augment(img: &DynamicImage, view: usize, rng: &mut StdRng) -> RgbImage {
    let img = match view % 4 {
        1 => img.rotate90(),
        2 => img.rotate180(),
        3 => img.rotate270(),
        _ => img.clone(),
    };
    let img = if (view / 4) % 2 == 1 { img.fliph() } else { img };
    let mut rgb = img.to_rgb8();
    if view > 0 {
        let contrast: f32 = rng.random_range(0.8..1.2);
        let brightness: f32 = rng.random_range(-20.0..20.0);
        for p in rgb.iter_mut() {
            *p = ((*p as f32 - 128.0) * contrast + 128.0 + brightness).round().clamp(0.0, 255.0) as u8;
        }
    }
    rgb
}

/// Preprocessed CHW inputs for `views` views of each sample, in sample-major order.
pub fn preprocess_views(model: &LoadedModel, samples: &[Sample], views: usize, seed: u64) -> anyhow::Result<Vec<f32>> {
    let per: Vec<anyhow::Result<Vec<f32>>> = samples
        .par_iter()
        .enumerate()
        .map(|(i, s)| {
            let bytes = std::fs::read(&s.path)?;
            let img =
                decode(&bytes, DecodeLimits::default()).map_err(|e| anyhow::anyhow!("{}: {e}", s.path.display()))?;
            let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut out = Vec::new();
            for v in 0..views {
                let view = DynamicImage::ImageRgb8(augment(&img, v, &mut rng));
                out.extend(model.preprocessor.run(&view)?);
            }
            Ok(out)
        })
        .collect();
    let mut all = Vec::new();
    for p in per {
        all.extend(p?);
    }
    Ok(all)
}

/// Runs the frozen backbone over every view of every sample.
pub fn extract(
    model: &LoadedModel,
    samples: &[Sample],
    views: usize,
    seed: u64,
    what: &str,
) -> anyhow::Result<FeatureSet> {
    let bar = ProgressBar::new((samples.len() * views) as u64).with_style(
        ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} images ({per_sec}, eta {eta})")?
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    let started = std::time::Instant::now();
    let (c, h, w) = model.preprocessor.input_shape();
    let mut chunks = Vec::new();
    let mut labels = Vec::new();
    let per_batch = (32 / views).max(1);
    for (bi, batch) in samples.chunks(per_batch).enumerate() {
        let inputs = preprocess_views(model, batch, views, seed.wrapping_add(bi as u64))?;
        let x = Tensor::from_vec(inputs, (batch.len() * views, c, h, w), &Device::Cpu)?;
        let last =
            model.network.forward_features(&x)?.pop().ok_or_else(|| anyhow::anyhow!("backbone has no features"))?;
        chunks.push(last);
        for s in batch {
            labels.extend(std::iter::repeat_n(s.label as u32, views));
        }
        bar.inc((batch.len() * views) as u64);
    }
    bar.finish();
    let n = samples.len() * views;
    tracing::info!(
        what,
        images = n,
        per_second = format!("{:.1}", n as f64 / started.elapsed().as_secs_f64()),
        "features cached"
    );
    Ok(FeatureSet { features: Tensor::cat(&chunks, 0)?, labels })
}
