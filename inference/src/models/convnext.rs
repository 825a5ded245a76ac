//! timm's ConvNeXt (`timm/models/convnext.py`): convnext_tiny/small/base and
//! `test_convnext`, the members with `conv_mlp=False` blocks (atto … nano use
//! 1×1-conv MLPs and are refused with a clear error).
//!
//! Depths and widths come from the weights (`stages.{i}.blocks.{j}`), so one
//! loader covers every size. Norms are channel LayerNorms; the MLP runs
//! channels-last as two matrix products. timm's `test_convnext` differs from
//! the real models in two settings: LayerNorm eps 1e-5 (not 1e-6) and tanh
//! GELU (not erf).

use candle_core::Tensor;

use crate::models::{FeatureInfo, ImageModel};
use crate::ops::{Activation, ConvBnAct, PadMode};
use crate::weights::Weights;
use crate::{Error, Result};

/// Architectures this module builds.
pub const SUPPORTED: &[&str] = &["test_convnext", "convnext_tiny", "convnext_small", "convnext_base"];

/// The settings that vary between family members.
#[derive(Debug, Clone, Copy)]
struct Variant {
    norm_eps: f32,
    gelu_tanh: bool,
}

impl Variant {
    fn of(architecture: &str) -> Self {
        match architecture {
            "test_convnext" => Variant { norm_eps: 1e-5, gelu_tanh: true },
            _ => Variant { norm_eps: 1e-6, gelu_tanh: false },
        }
    }
}

/// LayerNorm over the last dimension.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(w: &Weights, p: &str, v: Variant) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{p}.weight"))?.clone(),
            bias: w.get(&format!("{p}.bias"))?.clone(),
            eps: v.norm_eps,
        })
    }

    fn forward_last(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)?)
    }

    /// `LayerNorm2d`: normalises the channels of an NCHW map.
    fn forward_2d(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_last(&x.permute((0, 2, 3, 1))?)?.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

/// A linear layer stored as `[in, out]` for `x · W`.
struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn load(w: &Weights, p: &str) -> Result<Self> {
        Ok(Self { w: w.get(&format!("{p}.weight"))?.t()?.contiguous()?, b: w.get(&format!("{p}.bias"))?.clone() })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.w)?.broadcast_add(&self.b)?)
    }
}

struct Block {
    conv_dw: ConvBnAct,
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// Layer scale, when the model has one.
    gamma: Option<Tensor>,
    gelu_tanh: bool,
}

impl Block {
    fn load(w: &Weights, p: &str, v: Variant) -> Result<Self> {
        let weight = w.get(&format!("{p}.conv_dw.weight"))?.clone();
        let (c, _, k, _) = weight.dims4()?;
        let bias = w.get(&format!("{p}.conv_dw.bias"))?.clone();
        let conv_dw = ConvBnAct::new(weight, bias, 1, c, PadMode::Symmetric(k / 2), Activation::Identity, w.kernels())?;
        let gamma = if w.contains(&format!("{p}.gamma")) { Some(w.get(&format!("{p}.gamma"))?.clone()) } else { None };
        Ok(Self {
            conv_dw,
            norm: LayerNorm::load(w, &format!("{p}.norm"), v)?,
            fc1: Linear::load(w, &format!("{p}.mlp.fc1"))?,
            fc2: Linear::load(w, &format!("{p}.mlp.fc2"))?,
            gamma,
            gelu_tanh: v.gelu_tanh,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, wd) = x.dims4()?;
        let y = self.conv_dw.forward(x)?.permute((0, 2, 3, 1))?.contiguous()?.reshape((n * h * wd, c))?;
        let y = self.norm.forward_last(&y)?;
        let hidden = self.fc1.forward(&y)?;
        let hidden = if self.gelu_tanh { hidden.gelu()? } else { hidden.gelu_erf()? };
        let y = self.fc2.forward(&hidden)?;
        let y = match &self.gamma {
            Some(g) => y.broadcast_mul(g)?,
            None => y,
        };
        let y = y.reshape((n, h, wd, c))?.permute((0, 3, 1, 2))?;
        Ok((y + x)?)
    }
}

struct Stage {
    /// LayerNorm2d then a 2×2 stride-2 conv (all stages but the first).
    downsample: Option<(LayerNorm, ConvBnAct)>,
    blocks: Vec<Block>,
}

/// A loaded ConvNeXt.
pub struct ConvNeXt {
    stem_conv: ConvBnAct,
    stem_norm: LayerNorm,
    stages: Vec<Stage>,
    head_norm: LayerNorm,
    head_fc: Linear,
    num_classes: usize,
    feature_info: Vec<FeatureInfo>,
}

impl ConvNeXt {
    pub fn supports(architecture: &str) -> bool {
        SUPPORTED.contains(&architecture)
    }

    /// Builds the network from timm-named weights.
    pub fn load(architecture: &str, w: &Weights) -> Result<Self> {
        if !Self::supports(architecture) {
            return Err(Error::UnsupportedArchitecture { found: architecture.into(), supported: SUPPORTED.join(", ") });
        }
        if w.contains("stages.0.blocks.0.mlp.fc1.weight") && w.get("stages.0.blocks.0.mlp.fc1.weight")?.rank() != 2 {
            return Err(Error::config(architecture, "conv_mlp ConvNeXt variants are not supported"));
        }
        let conv = |p: &str, stride: usize| -> Result<ConvBnAct> {
            let weight = w.get(&format!("{p}.weight"))?.clone();
            let bias = w.get(&format!("{p}.bias"))?.clone();
            ConvBnAct::new(weight, bias, stride, 1, PadMode::Symmetric(0), Activation::Identity, w.kernels())
        };
        let stem_conv = conv("stem.0", 4)?;
        let v = Variant::of(architecture);
        let stem_norm = LayerNorm::load(w, "stem.1", v)?;
        let mut stages = Vec::new();
        let mut feature_info = Vec::new();
        let mut i = 0;
        while w.contains(&format!("stages.{i}.blocks.0.conv_dw.weight")) {
            let downsample = if w.contains(&format!("stages.{i}.downsample.1.weight")) {
                Some((
                    LayerNorm::load(w, &format!("stages.{i}.downsample.0"), v)?,
                    conv(&format!("stages.{i}.downsample.1"), 2)?,
                ))
            } else {
                None
            };
            let mut blocks = Vec::new();
            let mut j = 0;
            while w.contains(&format!("stages.{i}.blocks.{j}.conv_dw.weight")) {
                blocks.push(Block::load(w, &format!("stages.{i}.blocks.{j}"), v)?);
                j += 1;
            }
            let channels = blocks[0].conv_dw.out_channels();
            feature_info.push(FeatureInfo { module: format!("stages.{i}"), channels, reduction: 4 << i });
            stages.push(Stage { downsample, blocks });
            i += 1;
        }
        if stages.is_empty() {
            return Err(Error::config(architecture, "weights have no stages"));
        }
        let head_fc = Linear::load(w, "head.fc")?;
        let num_classes = head_fc.b.dims()[0];
        Ok(Self {
            stem_conv,
            stem_norm,
            stages,
            head_norm: LayerNorm::load(w, "head.norm", v)?,
            head_fc,
            num_classes,
            feature_info,
        })
    }

    fn run(&self, x: &Tensor, last: Option<usize>, logits: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let last = if logits { usize::MAX } else { last.unwrap_or(usize::MAX) };
        let mut x = self.stem_norm.forward_2d(&self.stem_conv.forward(x)?)?;
        let mut features = Vec::new();
        for stage in &self.stages {
            if features.len() > last {
                break;
            }
            if let Some((norm, conv)) = &stage.downsample {
                x = conv.forward(&norm.forward_2d(&x)?)?;
            }
            for b in &stage.blocks {
                x = b.forward(&x)?;
            }
            features.push(x.clone());
        }
        if !logits {
            return Ok((features, None));
        }
        let pooled = self.head_norm.forward_last(&x.mean((2, 3))?)?;
        Ok((features, Some(self.head_fc.forward(&pooled)?)))
    }
}

impl ImageModel for ConvNeXt {
    fn forward_maps(&self, x: &Tensor, last: Option<usize>, logits: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        self.run(x, last, logits)
    }

    fn feature_info(&self) -> &[FeatureInfo] {
        &self.feature_info
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn supported_names_are_unique() {
        let mut v = super::SUPPORTED.to_vec();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), super::SUPPORTED.len());
    }
}
