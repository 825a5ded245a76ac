//! PatchCore: a memory bank of locally aware patch features from good
//! images; a patch is as anomalous as it is far from its nearest neighbour
//! in the bank.
//!
//! Deviations from anomalib, on purpose:
//! - Images are resized to `image_size`² without a center crop, so that a
//!   defect at the border of the part is never cropped away; the map covers
//!   the whole image.
//! - Coreset distances use a dense Gaussian projection, not a sparse one.
//! - Scores are normalised so that 0.5 is the decision threshold:
//!   `0.5 · raw / threshold`, clipped to [0, 1] (anomalib: min-max around the
//!   threshold). Thresholds come from held-out good images (a quantile of
//!   their scores), as there may be no defect images to tune on.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::blur::gaussian_blur;
use super::coreset::greedy_k_center;
use crate::hub_config::{Interpolation, PretrainedCfg};
use crate::models::{ImageModel, LoadedModel, ModelFiles};
use crate::preprocess::{DecodeLimits, Preprocessor, decode};
use crate::{Error, Result};

/// The manifest file of a fitted model folder.
pub const MANIFEST: &str = "patchcore.json";
/// The memory bank file of a fitted model folder.
pub const MEMORY_BANK: &str = "memory_bank.safetensors";

/// How to fit a PatchCore model.
#[derive(Debug, Clone)]
pub struct FitSettings {
    /// Indices into the backbone's feature maps: a mid-level one and a deeper one.
    pub layers: [usize; 2],
    /// Images are resized to this square size.
    pub image_size: usize,
    /// Share of all patches kept in the memory bank.
    pub coreset_ratio: f32,
    /// Dimension of the random projection that guides coreset selection (0 = none).
    pub projection_dim: usize,
    /// Neighbours used to reweight the image score (anomalib: 9).
    pub num_neighbors: usize,
    /// σ of the Gaussian blur of the anomaly map.
    pub blur_sigma: f32,
    /// Share of good images kept out of the bank to set the thresholds.
    pub held_out: f32,
    /// Quantile of held-out good scores used as the threshold (1.0 = their maximum).
    pub threshold_quantile: f32,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for FitSettings {
    fn default() -> Self {
        Self {
            layers: [2, 3],
            image_size: 224,
            coreset_ratio: 0.1,
            projection_dim: 64,
            num_neighbors: 9,
            blur_sigma: 4.0,
            held_out: 0.1,
            threshold_quantile: 1.0,
            batch_size: 8,
            seed: 42,
        }
    }
}

/// What a fitted model folder says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `patchcore`.
    pub kind: String,
    pub format_version: u32,
    /// The backbone architecture (its weights are in the same folder).
    pub backbone: String,
    pub layers: [usize; 2],
    pub image_size: usize,
    pub feature_dim: usize,
    /// Patch grid `[height, width]`.
    pub feature_size: [usize; 2],
    pub memory_bank_size: usize,
    pub coreset_ratio: f32,
    pub num_neighbors: usize,
    pub blur_sigma: f32,
    /// Raw image score normalised to 0.5.
    pub image_threshold: f32,
    /// Raw anomaly-map value normalised to 0.5.
    pub pixel_threshold: f32,
    /// Where the thresholds came from: `held_out_good` or `f1_adaptive`.
    #[serde(default = "held_out_good")]
    pub threshold_source: String,
    pub fit: FitReport,
}

fn held_out_good() -> String {
    "held_out_good".into()
}

/// How a model was fitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitReport {
    pub good_images: usize,
    pub bank_images: usize,
    pub held_out_images: usize,
    pub patches: usize,
    pub threshold_quantile: f32,
    pub seconds: f64,
}

/// A fitted PatchCore model.
pub struct PatchCore {
    pub manifest: Manifest,
    backbone: Box<dyn ImageModel>,
    pub preprocessor: Preprocessor,
    /// `[M, D]` memory bank and its squared row norms, read once per model.
    bank: Tensor,
    bank_sq: Vec<f32>,
    /// `[D, M]`, contiguous: the right-hand side of the distance GEMM.
    bank_t: Tensor,
    /// The backbone's files, kept to save the model as one folder.
    backbone_files: ModelFiles,
}

/// One image's result.
#[derive(Debug, Clone)]
pub struct AnomalyMap {
    /// Raw image score (reweighted nearest-neighbour distance).
    pub raw_score: f32,
    /// Normalised image score: ≥ 0.5 is anomalous.
    pub score: f32,
    /// Normalised, blurred per-pixel map, `size × size`, row-major.
    pub map: Vec<f32>,
    /// The same map before normalisation (for evaluation and thresholds).
    pub raw_map: Vec<f32>,
    pub size: usize,
}

impl AnomalyMap {
    pub fn is_anomalous(&self) -> bool {
        self.score >= 0.5
    }
}

/// Progress of a fit, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum FitStage {
    /// Images embedded so far, of a total.
    Embedding(usize, usize),
    /// Coreset centers chosen so far, of a total.
    Coreset(usize, usize),
    /// Held-out images scored so far, of a total.
    Threshold(usize, usize),
}

/// Stretch-resize to `size`² with the backbone's normalisation.
pub fn input_transform(cfg: &PretrainedCfg, size: usize) -> Preprocessor {
    let cfg = PretrainedCfg {
        input_size: [3, size, size],
        interpolation: Interpolation::Bilinear,
        crop_pct: 1.0,
        ..cfg.clone()
    };
    Preprocessor::stretch(&cfg)
}

/// Zero-padded 3×3 mean, like `torch.nn.AvgPool2d(3, 1, 1)`.
fn local_average(t: &Tensor) -> Result<Tensor> {
    Ok(t.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.avg_pool2d_with_stride(3, 1)?)
}

/// Patch embeddings `[N, D, h, w]`: the two feature maps, locally averaged,
/// the deeper one upsampled (bilinear) to the other's grid, concatenated.
fn embed(backbone: &dyn ImageModel, layers: [usize; 2], x: &Tensor) -> Result<Tensor> {
    let feats = backbone.forward_features_until(x, layers[0].max(layers[1]))?;
    let pick = |i: usize| {
        feats
            .get(i)
            .ok_or_else(|| Error::config("layers", format!("backbone has {} feature maps, not {}", feats.len(), i + 1)))
    };
    let a = local_average(pick(layers[0])?)?;
    let b = local_average(pick(layers[1])?)?;
    let (_, _, h, w) = a.dims4()?;
    let b = b.upsample_bilinear2d(h, w, false)?;
    Ok(Tensor::cat(&[a, b], 1)?)
}

/// `[N, D, h, w]` → `[N·h·w, D]`.
fn patches(emb: &Tensor) -> Result<Tensor> {
    let (n, d, h, w) = emb.dims4()?;
    Ok(emb.permute((0, 2, 3, 1))?.contiguous()?.reshape((n * h * w, d))?)
}

fn load_inputs(paths: &[PathBuf], pre: &Preprocessor, device: &Device) -> Result<Tensor> {
    let (c, h, w) = pre.input_shape();
    let mut data = Vec::with_capacity(paths.len() * c * h * w);
    for p in paths {
        let bytes = std::fs::read(p).map_err(|source| Error::Io { path: p.clone(), source })?;
        let img = decode(&bytes, DecodeLimits::default())?;
        data.extend(pre.run(&img)?);
    }
    Ok(Tensor::from_vec(data, (paths.len(), c, h, w), device)?)
}

fn quantile(values: &mut [f32], q: f32) -> f32 {
    values.sort_by(f32::total_cmp);
    values[((values.len() - 1) as f32 * q.clamp(0.0, 1.0)).round() as usize]
}

impl PatchCore {
    /// Fits a model on good images with `backbone_files` as the feature extractor.
    pub fn fit(
        backbone_files: &ModelFiles,
        good: &[PathBuf],
        s: &FitSettings,
        mut progress: impl FnMut(FitStage),
    ) -> Result<Self> {
        let started = Instant::now();
        let device = Device::Cpu;
        let backbone = LoadedModel::load(backbone_files, &device)?;
        let pre = input_transform(&backbone.config.pretrained_cfg, s.image_size);
        let mut images = good.to_vec();
        if images.len() < 5 {
            return Err(Error::config("good", format!("need at least 5 good images, got {}", images.len())));
        }
        images.shuffle(&mut StdRng::seed_from_u64(s.seed));
        let held = ((images.len() as f32 * s.held_out).round() as usize).clamp(1, images.len() - 1);
        let (held_out, bank_images) = images.split_at(held);

        let mut features: Vec<f32> = Vec::new();
        let mut dims = (0, 0, 0);
        for (i, chunk) in bank_images.chunks(s.batch_size.max(1)).enumerate() {
            let x = load_inputs(chunk, &pre, &device)?;
            let emb = embed(backbone.network.as_ref(), s.layers, &x)?;
            let (_, d, h, w) = emb.dims4()?;
            dims = (d, h, w);
            features.extend(patches(&emb)?.flatten_all()?.to_vec1::<f32>()?);
            progress(FitStage::Embedding((i * s.batch_size + chunk.len()).min(bank_images.len()), bank_images.len()));
        }
        let (d, h, w) = dims;
        let n = features.len() / d;
        let k = ((n as f32 * s.coreset_ratio).ceil() as usize).clamp(1, n);
        let chosen = greedy_k_center(&features, d, k, s.projection_dim, s.seed, |i| progress(FitStage::Coreset(i, k)));
        let bank: Vec<f32> = chosen.iter().flat_map(|&i| features[i * d..(i + 1) * d].iter().copied()).collect();
        drop(features);
        let bank = Tensor::from_vec(bank, (k, d), &device)?;

        let manifest = Manifest {
            kind: "patchcore".into(),
            format_version: 1,
            backbone: backbone.config.architecture.clone(),
            layers: s.layers,
            image_size: s.image_size,
            feature_dim: d,
            feature_size: [h, w],
            memory_bank_size: k,
            coreset_ratio: s.coreset_ratio,
            num_neighbors: s.num_neighbors,
            blur_sigma: s.blur_sigma,
            image_threshold: 1.0,
            pixel_threshold: 1.0,
            threshold_source: held_out_good(),
            fit: FitReport {
                good_images: good.len(),
                bank_images: bank_images.len(),
                held_out_images: held_out.len(),
                patches: n,
                threshold_quantile: s.threshold_quantile,
                seconds: 0.0,
            },
        };
        let mut model = Self::assemble(manifest, backbone.network, pre, bank, backbone_files.clone())?;

        // Thresholds: a quantile of what good images the bank never saw score.
        let (mut image_scores, mut pixel_maxima) = (Vec::new(), Vec::new());
        for (i, chunk) in held_out.chunks(s.batch_size.max(1)).enumerate() {
            let x = load_inputs(chunk, &model.preprocessor, &device)?;
            for (raw, map) in model.raw_maps(&x)? {
                image_scores.push(raw);
                pixel_maxima.push(map.iter().copied().fold(f32::MIN, f32::max));
            }
            progress(FitStage::Threshold((i * s.batch_size + chunk.len()).min(held_out.len()), held_out.len()));
        }
        model.manifest.image_threshold = quantile(&mut image_scores, s.threshold_quantile).max(f32::EPSILON);
        model.manifest.pixel_threshold = quantile(&mut pixel_maxima, s.threshold_quantile).max(f32::EPSILON);
        model.manifest.fit.seconds = started.elapsed().as_secs_f64();
        Ok(model)
    }

    fn assemble(
        manifest: Manifest,
        backbone: Box<dyn ImageModel>,
        preprocessor: Preprocessor,
        bank: Tensor,
        backbone_files: ModelFiles,
    ) -> Result<Self> {
        let bank_sq = bank.sqr()?.sum(1)?.to_vec1::<f32>()?;
        let bank_t = bank.t()?.contiguous()?;
        Ok(Self { manifest, backbone, preprocessor, bank, bank_sq, bank_t, backbone_files })
    }

    /// Scores an `[N, 3, S, S]` batch.
    pub fn score(&self, x: &Tensor) -> Result<Vec<AnomalyMap>> {
        let m = &self.manifest;
        let norm = |v: f32, t: f32| (0.5 * v / t).clamp(0.0, 1.0);
        Ok(self
            .raw_maps(x)?
            .into_iter()
            .map(|(raw, map)| AnomalyMap {
                raw_score: raw,
                score: norm(raw, m.image_threshold),
                map: map.iter().map(|&v| norm(v, m.pixel_threshold)).collect(),
                raw_map: map,
                size: m.image_size,
            })
            .collect())
    }

    /// Raw image scores and blurred raw maps.
    fn raw_maps(&self, x: &Tensor) -> Result<Vec<(f32, Vec<f32>)>> {
        let m = &self.manifest;
        let emb = embed(self.backbone.as_ref(), m.layers, x)?;
        let (n, _, h, w) = emb.dims4()?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let p = patches(&emb.narrow(0, i, 1)?)?;
            let (scores, nearest) = self.nearest(&p)?;
            let raw = self.reweighted_score(&p, &scores, &nearest)?;
            let grid = Tensor::from_vec(scores, (1, 1, h, w), &Device::Cpu)?;
            let up = grid.upsample_nearest2d(m.image_size, m.image_size)?.flatten_all()?.to_vec1::<f32>()?;
            out.push((raw, gaussian_blur(&up, m.image_size, m.image_size, m.blur_sigma)));
        }
        Ok(out)
    }

    /// Euclidean distance of each patch `[P, D]` to its nearest bank row, and that row.
    fn nearest(&self, p: &Tensor) -> Result<(Vec<f32>, Vec<u32>)> {
        // |p - m|² = |p|² - 2 p·m + |m|²: one matrix product, then a single
        // pass over it that finds each row's minimum (no [P, M] temporaries).
        let dot = p.matmul(&self.bank_t)?;
        let pp = p.sqr()?.sum(1)?.to_vec1::<f32>()?;
        let mm = &self.bank_sq;
        let m = mm.len();
        let (storage, layout) = dot.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(Error::config("device", "PatchCore scoring runs on the CPU"));
        };
        let dot = &cpu.as_slice::<f32>()?[layout.start_offset()..];
        let best: Vec<(f32, u32)> = dot
            .par_chunks(m)
            .zip(&pp)
            .map(|(row, &pp)| {
                let (mut min, mut arg) = (f32::INFINITY, 0u32);
                for (j, (&d, &mm)) in row.iter().zip(mm).enumerate() {
                    let v = mm - 2.0 * d;
                    if v < min {
                        (min, arg) = (v, j as u32);
                    }
                }
                ((min + pp).max(0.0).sqrt(), arg)
            })
            .collect();
        Ok(best.into_iter().unzip())
    }

    /// anomalib's image score: the largest patch score, scaled down when the
    /// bank is dense around that patch's nearest neighbour.
    fn reweighted_score(&self, p: &Tensor, scores: &[f32], nearest: &[u32]) -> Result<f32> {
        let (j, &top) = scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("patches");
        let k = self.manifest.num_neighbors.min(self.manifest.memory_bank_size);
        if k <= 1 {
            return Ok(top);
        }
        let nn = self.bank.narrow(0, nearest[j] as usize, 1)?;
        let to_nn = self.bank.broadcast_sub(&nn)?.sqr()?.sum(1)?.to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..to_nn.len()).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| to_nn[a].total_cmp(&to_nn[b]));
        let mut support = order[..k].to_vec();
        support.sort_by(|&a, &b| to_nn[a].total_cmp(&to_nn[b]));
        let feature = p.narrow(0, j, 1)?;
        let dists: Vec<f32> = support
            .iter()
            .map(|&s| Ok(self.bank.narrow(0, s, 1)?.sub(&feature)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt()))
            .collect::<Result<_>>()?;
        // 1 − softmax(distances)[nearest]
        let max = dists.iter().copied().fold(f32::MIN, f32::max);
        let exps: Vec<f32> = dists.iter().map(|d| (d - max).exp()).collect();
        let weight = 1.0 - exps[0] / exps.iter().sum::<f32>();
        Ok(weight * top)
    }

    /// Sets raw thresholds chosen on labelled data and rewrites the manifest in `dir`.
    pub fn set_thresholds(&mut self, dir: &Path, image: f32, pixel: f32, source: &str) -> Result<()> {
        self.manifest.image_threshold = image.max(f32::EPSILON);
        self.manifest.pixel_threshold = pixel.max(f32::EPSILON);
        self.manifest.threshold_source = source.into();
        let manifest = serde_json::to_string_pretty(&self.manifest).expect("manifest serializes");
        std::fs::write(dir.join(MANIFEST), manifest).map_err(|source| Error::Io { path: dir.join(MANIFEST), source })
    }

    /// Writes the model as a folder: manifest, memory bank, backbone.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |source: std::io::Error| Error::Io { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let manifest = serde_json::to_string_pretty(&self.manifest).expect("manifest serializes");
        std::fs::write(dir.join(MANIFEST), manifest).map_err(io)?;
        self.bank.save_safetensors("memory_bank", dir.join(MEMORY_BANK))?;
        std::fs::write(dir.join("config.json"), self.backbone_files.config_json.as_bytes()).map_err(io)?;
        std::fs::write(dir.join("model.safetensors"), &self.backbone_files.weights).map_err(io)?;
        Ok(())
    }

    /// Loads a folder written by [`PatchCore::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let manifest = Self::read_manifest(dir)?;
        if manifest.kind != "patchcore" || manifest.format_version != 1 {
            return Err(Error::config(
                MANIFEST,
                format!("not a patchcore v1 model: {} v{}", manifest.kind, manifest.format_version),
            ));
        }
        let files = ModelFiles::from_dir(dir)?;
        let backbone = LoadedModel::load(&files, &Device::Cpu)?;
        let bank = candle_core::safetensors::load(dir.join(MEMORY_BANK), &Device::Cpu)?
            .remove("memory_bank")
            .ok_or_else(|| Error::config(MEMORY_BANK, "no `memory_bank` tensor"))?;
        let pre = input_transform(&backbone.config.pretrained_cfg, manifest.image_size);
        Self::assemble(manifest, backbone.network, pre, bank, files)
    }

    /// Whether `dir` holds a PatchCore model.
    pub fn is_model_dir(dir: &Path) -> bool {
        dir.join(MANIFEST).is_file()
    }

    /// The manifest of a model folder, without loading the model.
    pub fn read_manifest(dir: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(dir.join(MANIFEST))
            .map_err(|source| Error::Io { path: dir.join(MANIFEST), source })?;
        serde_json::from_str(&text).map_err(|e| Error::config(MANIFEST, e.to_string()))
    }

    /// Content hash of the manifest and memory bank: the model's version.
    pub fn content_version(dir: &Path) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for f in [MANIFEST, MEMORY_BANK, "model.safetensors"] {
            let bytes = std::fs::read(dir.join(f)).map_err(|source| Error::Io { path: dir.join(f), source })?;
            h.update(&bytes);
        }
        Ok(h.finalize()[..6].iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl crate::batcher::BatchModel for PatchCore {
    type Output = crate::models::Output;

    fn input_shape(&self) -> (usize, usize, usize) {
        self.preprocessor.input_shape()
    }

    fn device(&self) -> &Device {
        self.bank.device()
    }

    fn infer(&self, batch: &Tensor) -> Result<Vec<Self::Output>> {
        Ok(self.score(batch)?.into_iter().map(crate::models::Output::Anomaly).collect())
    }
}
