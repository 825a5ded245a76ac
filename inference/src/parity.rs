//! Checking a model against the PyTorch reference outputs stored beside it
//! (`ref.safetensors`: `input`, `logits`, `features.i`).

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::models::{LoadedModel, ModelFiles};
use crate::{Error, Kernels, Result};

/// Max abs error of one tensor, absolute and relative to the reference's max abs value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorError {
    pub name: String,
    pub max_abs: f32,
    pub relative: f32,
}

/// The errors of every output of one model against its reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParityReport {
    pub model: String,
    pub tensors: Vec<TensorError>,
    /// Whether our top-1 class equals the reference's for every image.
    pub top1_match: bool,
}

impl ParityReport {
    /// The largest relative error over all tensors.
    pub fn worst(&self) -> f32 {
        self.tensors.iter().map(|t| t.relative).fold(0.0, f32::max)
    }
}

/// Max abs difference, absolute and relative to `reference`'s max abs value.
pub fn compare(name: &str, ours: &Tensor, reference: &Tensor) -> Result<TensorError> {
    if ours.dims() != reference.dims() {
        return Err(Error::ShapeMismatch {
            name: name.to_string(),
            found: ours.dims().to_vec(),
            expected: reference.dims().to_vec(),
        });
    }
    let max_abs = (ours - reference)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(f32::MIN_POSITIVE);
    Ok(TensorError { name: name.to_string(), max_abs, relative: max_abs / scale })
}

/// Argmax of each row of a `[N, C]` tensor.
pub fn top1(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(1)?.to_vec1::<u32>()?)
}

/// Loads the model in `dir` on the CPU and compares its logits and feature
/// maps on the stored `input` tensor against `dir/ref.safetensors`.
pub fn check_dir(dir: &Path) -> Result<ParityReport> {
    check_dir_on(dir, &Device::Cpu, Kernels::Lineside)
}

/// [`check_dir`] with the model on `device` and `kernels`
/// ([`LoadedModel::load_on`]).
pub fn check_dir_on(dir: &Path, device: &Device, kernels: Kernels) -> Result<ParityReport> {
    let model = LoadedModel::load_on(&ModelFiles::from_dir(dir)?, device, kernels)?;
    let refs = load_refs(dir, device)?;
    check_loaded(&model, &refs, &dir.display().to_string())
}

/// Reads `ref.safetensors` from a model folder.
pub fn load_refs(dir: &Path, device: &Device) -> Result<std::collections::HashMap<String, Tensor>> {
    let path = dir.join("ref.safetensors");
    let bytes = std::fs::read(&path).map_err(|source| Error::Io { path, source })?;
    Ok(candle_core::safetensors::load_buffer(&bytes, device)?)
}

/// Compares a loaded model with reference tensors.
pub fn check_loaded(
    model: &LoadedModel,
    refs: &std::collections::HashMap<String, Tensor>,
    name: &str,
) -> Result<ParityReport> {
    let get =
        |k: &str| refs.get(k).ok_or_else(|| Error::MissingTensor { file: "ref.safetensors".into(), name: k.into() });
    let (features, logits) = model.network.forward_all(get("input")?, true)?;
    let logits = logits.expect("asked for logits");
    let ref_logits = get("logits")?;
    let mut tensors = vec![compare("logits", &logits, ref_logits)?];
    for (i, f) in features.iter().enumerate() {
        let key = format!("features.{i}");
        tensors.push(compare(&key, f, get(&key)?)?);
    }
    if refs.contains_key(&format!("features.{}", features.len())) {
        return Err(Error::config(name, format!("reference has more than {} feature maps", features.len())));
    }
    Ok(ParityReport { model: name.to_string(), tensors, top1_match: top1(&logits)? == top1(ref_logits)? })
}
