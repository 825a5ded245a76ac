//! `lineside train`: fine-tunes a classifier head on a pretrained timm
//! backbone from a folder of labelled images.
//!
//! The backbone's convolutional blocks stay frozen; their last feature map is
//! computed once per augmented view and cached ([`features`]). The trainable
//! part is timm's head — `conv_head` (1×1 conv), `bn2` (affine, running
//! statistics frozen) and a new `classifier` — trained with AdamW and a cosine
//! schedule ([`head`]). The result is written as a timm hub-format folder
//! (`config.json` with `label_names`, `model.safetensors`) that lineside, timm
//! and PyTorch all load, and evaluated again from disk through lineside's own
//! serving preprocessing on the held-out split.

pub mod dataset;
pub mod features;
pub mod head;

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use lineside_inference::models::{Classifier, LoadedModel, ModelFiles};
use serde::Serialize;

use crate::dataset::{Dataset, Sample};

/// Options of one training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    pub data: PathBuf,
    pub backbone: PathBuf,
    pub out: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Augmented views per training image (the first is the plain image).
    pub views: usize,
    pub val_fraction: f64,
    pub seed: u64,
    /// Store weights as fp16.
    pub fp16: bool,
}

/// What a run measured, also written to `training.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub config: TrainConfig,
    pub labels: Vec<String>,
    pub train_images: usize,
    pub val_images: usize,
    /// Top-1 on the held-out split, from the saved folder through the serving preprocessing.
    pub val_accuracy: f64,
    /// `confusion[true][predicted]` on the held-out split.
    pub confusion: Vec<Vec<usize>>,
    pub val_files: Vec<String>,
    pub seconds: f64,
}

/// Runs training end to end and writes the model folder.
pub fn train(cfg: TrainConfig) -> anyhow::Result<TrainReport> {
    let started = std::time::Instant::now();
    let device = Device::Cpu;
    let data = Dataset::scan(&cfg.data)?;
    let (train_set, val_set) = data.split(cfg.val_fraction, cfg.seed);
    anyhow::ensure!(!val_set.is_empty(), "validation split is empty; raise --val-fraction");
    tracing::info!(classes = ?data.labels, train = train_set.len(), val = val_set.len(), "dataset");

    let files = ModelFiles::from_dir(&cfg.backbone).context("loading backbone")?;
    let backbone = LoadedModel::load(&files, &device).context("building backbone")?;
    let eps = lineside_inference::models::efficientnet::bn_eps(&backbone.config.architecture)
        .with_context(|| format!("training supports the EfficientNet family, not {}", backbone.config.architecture))?;

    let train_feats = features::extract(&backbone, &train_set, cfg.views, cfg.seed, "train features")?;
    let val_feats = features::extract(&backbone, &val_set, 1, cfg.seed, "val features")?;

    let raw = candle_core::safetensors::load_buffer(&files.weights, &device)?;
    let mut head = head::Head::from_pretrained(&raw, data.labels.len(), eps, cfg.seed)?;
    head.fit(&train_feats, &val_feats, &cfg)?;

    write_model(&cfg, &backbone, &raw, &head, &data.labels)?;
    let (val_accuracy, confusion) = evaluate_saved(&cfg.out, &val_set, data.labels.len())?;
    let report = TrainReport {
        labels: data.labels.clone(),
        train_images: train_set.len(),
        val_images: val_set.len(),
        val_accuracy,
        confusion,
        val_files: val_set.iter().map(|s| file_name(&s.path)).collect(),
        seconds: started.elapsed().as_secs_f64(),
        config: cfg.clone(),
    };
    std::fs::write(cfg.out.join("training.json"), serde_json::to_string_pretty(&report)?)?;
    Ok(report)
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Writes `config.json` and `model.safetensors`: the backbone's tensors with the trained head in place.
fn write_model(
    cfg: &TrainConfig,
    backbone: &LoadedModel,
    raw: &std::collections::HashMap<String, Tensor>,
    head: &head::Head,
    labels: &[String],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.out)?;
    let mut tensors = raw.clone();
    for (name, t) in head.tensors()? {
        tensors.insert(name, t);
    }
    let dtype = if cfg.fp16 { DType::F16 } else { DType::F32 };
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t };
            Ok((k, t))
        })
        .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()?;
    candle_core::safetensors::save(&tensors, cfg.out.join("model.safetensors"))?;

    let mut config = backbone.config.clone();
    config.num_classes = labels.len();
    config.label_names = Some(labels.to_vec());
    if let Some(args) = config.extra.get_mut("model_args").and_then(|v| v.as_object_mut()) {
        args.insert("num_classes".into(), labels.len().into());
    }
    config.pretrained_cfg.extra.insert("num_classes".into(), labels.len().into());
    config.pretrained_cfg.extra.insert("tag".into(), "lineside".into());
    std::fs::write(cfg.out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}

/// Loads the written folder like the server does and measures top-1 on `val`.
fn evaluate_saved(dir: &Path, val: &[Sample], classes: usize) -> anyhow::Result<(f64, Vec<Vec<usize>>)> {
    let device = Device::Cpu;
    let classifier = Classifier { model: LoadedModel::load(&ModelFiles::from_dir(dir)?, &device)? };
    let mut confusion = vec![vec![0usize; classes]; classes];
    let (c, h, w) = classifier.model.preprocessor.input_shape();
    for chunk in val.chunks(32) {
        let inputs = features::preprocess_views(&classifier.model, chunk, 1, 0)?;
        let x = Tensor::from_vec(inputs, (chunk.len(), c, h, w), &device)?;
        for (s, p) in chunk.iter().zip(classifier.classify(&x)?) {
            let pred = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
            confusion[s.label][pred] += 1;
        }
    }
    let correct: usize = (0..classes).map(|i| confusion[i][i]).sum();
    Ok((correct as f64 / val.len() as f64, confusion))
}
