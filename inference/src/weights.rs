//! Named tensors loaded from safetensors, with BatchNorm folding.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Kernels, Result};

/// A bag of named f32 tensors read from one safetensors file.
///
/// Half-precision files are widened to f32 at load, so shipped weights may be
/// stored as fp16 while compute stays in f32.
pub struct Weights {
    file: String,
    tensors: HashMap<String, Tensor>,
    /// What the layers built from these weights run on.
    kernels: Kernels,
}

impl Weights {
    /// Reads a safetensors buffer; `file` names it in errors.
    pub fn from_buffer(file: impl Into<String>, bytes: &[u8], device: &Device) -> Result<Self> {
        let raw = candle_core::safetensors::load_buffer(bytes, device)?;
        let mut tensors = HashMap::with_capacity(raw.len());
        for (name, t) in raw {
            let t = match t.dtype() {
                DType::F32 => t,
                DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
                // Integer tensors are BatchNorm's `num_batches_tracked`; inference ignores them.
                _ => continue,
            };
            tensors.insert(name, t);
        }
        Ok(Self { file: file.into(), tensors, kernels: Kernels::for_device(device) })
    }

    /// Builds layers on candle's ops only with [`Kernels::Candle`], even on
    /// the CPU. [`Kernels::Lineside`] changes nothing: it is the CPU's
    /// default, and a GPU has no lineside kernels to run.
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        if kernels == Kernels::Candle {
            self.kernels = Kernels::Candle;
        }
        self
    }

    /// What the layers built from these weights run on.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor by name, or an error naming the file and the tensor.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor { file: self.file.clone(), name: name.to_string() })
    }

    /// A tensor by name whose shape must equal `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&Tensor> {
        let t = self.get(name)?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                found: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }

    /// Folds the eval-mode BatchNorm `bn` into the preceding convolution `conv_weight`
    /// (shape `[out, in/groups, kh, kw]`), returning the new weight and bias.
    ///
    /// `y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta` becomes
    /// `conv'(x) + b'` with `conv' = conv * s`, `b' = beta - mean * s`, `s = gamma / sqrt(var + eps)`.
    pub fn fold_bn(&self, conv_weight: &str, bn: &str, eps: f64) -> Result<(Tensor, Tensor)> {
        let w = self.get(conv_weight)?;
        let out = w.dim(0)?;
        let gamma = self.get_shaped(&format!("{bn}.weight"), &[out])?;
        let beta = self.get_shaped(&format!("{bn}.bias"), &[out])?;
        let mean = self.get_shaped(&format!("{bn}.running_mean"), &[out])?;
        let var = self.get_shaped(&format!("{bn}.running_var"), &[out])?;
        let scale = gamma.div(&(var + eps)?.sqrt()?)?;
        let w = w.broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?;
        let b = (beta - mean.mul(&scale)?)?;
        Ok((w.contiguous()?, b.contiguous()?))
    }
}
