//! timm's ResNet family (`timm/models/resnet.py`): resnet18/34/50/101/152,
//! their `d` variants (deep stem, average-pool downsampling), wide_resnet and
//! `test_resnet`.
//!
//! The structure is read from the weights rather than from a table: the stem
//! type from `conv1.weight` vs `conv1.{0,3,6}.weight`, each block's type from
//! whether it has a `conv3`, the downsampling style from where its conv sits
//! (`downsample.0` plain, `downsample.1` after an average pool). So every
//! member, including mixed-block test models, loads through one path.

use candle_core::Tensor;

use crate::models::{FeatureInfo, ImageModel};
use crate::ops::{Activation, ConvBnAct, MaxPool, PadMode};
use crate::weights::Weights;
use crate::{Error, Result};

/// Architectures this module builds.
pub const SUPPORTED: &[&str] = &[
    "test_resnet",
    "resnet18",
    "resnet26",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet18d",
    "resnet34d",
    "resnet50d",
    "resnet101d",
    "wide_resnet50_2",
    "wide_resnet101_2",
];

/// timm's BatchNorm epsilon for ResNets.
const BN_EPS: f64 = 1e-5;

/// A shortcut that changes resolution or width.
struct Downsample {
    /// `AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)` before the conv.
    avg_pool: bool,
    conv: ConvBnAct,
}

impl Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.avg_pool { avg_pool_2x2_ceil(x)? } else { x.clone() };
        self.conv.forward(&x)
    }
}

/// `AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`: on an odd size the
/// last window holds one row or column; repeating the edge makes the plain 2×2
/// mean give exactly that average.
fn avg_pool_2x2_ceil(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut x = x.clone();
    if h % 2 == 1 {
        x = Tensor::cat(&[&x, &x.narrow(2, h - 1, 1)?], 2)?;
    }
    if w % 2 == 1 {
        x = Tensor::cat(&[&x, &x.narrow(3, w - 1, 1)?], 3)?;
    }
    Ok(x.avg_pool2d(2)?)
}

enum Block {
    /// 3×3 → 3×3.
    Basic { conv1: ConvBnAct, conv2: ConvBnAct, down: Option<Downsample> },
    /// 1×1 → 3×3 → 1×1 (×4 channels).
    Bottleneck { conv1: ConvBnAct, conv2: ConvBnAct, conv3: ConvBnAct, down: Option<Downsample> },
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (inner, last, down) = match self {
            Block::Basic { conv1, conv2, down } => (conv1.forward(x)?, conv2, down),
            Block::Bottleneck { conv1, conv2, conv3, down } => (conv2.forward(&conv1.forward(x)?)?, conv3, down),
        };
        let shortcut = match down {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        last.forward_residual(&inner, &shortcut, Activation::Relu)
    }
}

/// A loaded ResNet.
pub struct ResNet {
    stem: Vec<ConvBnAct>,
    stages: Vec<Vec<Block>>,
    /// `[features, classes]`.
    fc_w: Tensor,
    fc_b: Tensor,
    feature_info: Vec<FeatureInfo>,
}

fn conv_bn(w: &Weights, conv: &str, bn: &str, stride: usize, act: Activation) -> Result<ConvBnAct> {
    let (weight, bias) = w.fold_bn(&format!("{conv}.weight"), bn, BN_EPS)?;
    let k = weight.dim(2)?;
    ConvBnAct::new(weight, bias, stride, 1, PadMode::Symmetric(k / 2), act)
}

impl ResNet {
    pub fn supports(architecture: &str) -> bool {
        SUPPORTED.contains(&architecture)
    }

    /// Builds the network from timm-named weights.
    pub fn load(architecture: &str, w: &Weights) -> Result<Self> {
        if !Self::supports(architecture) {
            return Err(Error::UnsupportedArchitecture { found: architecture.into(), supported: SUPPORTED.join(", ") });
        }
        let stem = if w.contains("conv1.weight") {
            vec![conv_bn(w, "conv1", "bn1", 2, Activation::Relu)?]
        } else {
            // Deep stem: three 3×3 convs, the last one's BatchNorm is `bn1`.
            vec![
                conv_bn(w, "conv1.0", "conv1.1", 2, Activation::Relu)?,
                conv_bn(w, "conv1.3", "conv1.4", 1, Activation::Relu)?,
                conv_bn(w, "conv1.6", "bn1", 1, Activation::Relu)?,
            ]
        };
        let stem_channels = stem.last().expect("stem").out_channels();
        let mut feature_info = vec![FeatureInfo { module: "act1".into(), channels: stem_channels, reduction: 2 }];
        let mut stages = Vec::new();
        for s in 1..=4 {
            let stride = if s == 1 { 1 } else { 2 };
            let mut blocks = Vec::new();
            let mut b = 0;
            while w.contains(&format!("layer{s}.{b}.conv1.weight")) {
                blocks.push(load_block(w, &format!("layer{s}.{b}"), if b == 0 { stride } else { 1 })?);
                b += 1;
            }
            if blocks.is_empty() {
                return Err(Error::config(architecture, format!("weights have no layer{s}")));
            }
            let channels = match blocks.last().expect("blocks") {
                Block::Basic { conv2, .. } => conv2.out_channels(),
                Block::Bottleneck { conv3, .. } => conv3.out_channels(),
            };
            feature_info.push(FeatureInfo { module: format!("layer{s}"), channels, reduction: 4 << (s - 1) });
            stages.push(blocks);
        }
        let fc_w = w.get("fc.weight")?.t()?.contiguous()?;
        let fc_b = w.get("fc.bias")?.clone();
        Ok(Self { stem, stages, fc_w, fc_b, feature_info })
    }
}

fn load_block(w: &Weights, p: &str, stride: usize) -> Result<Block> {
    let down = if w.contains(&format!("{p}.downsample.0.weight")) {
        Some(Downsample {
            avg_pool: false,
            conv: conv_bn(w, &format!("{p}.downsample.0"), &format!("{p}.downsample.1"), stride, Activation::Identity)?,
        })
    } else if w.contains(&format!("{p}.downsample.1.weight")) {
        Some(Downsample {
            avg_pool: stride > 1,
            conv: conv_bn(w, &format!("{p}.downsample.1"), &format!("{p}.downsample.2"), 1, Activation::Identity)?,
        })
    } else {
        None
    };
    let c = |conv: &str, bn: &str, stride: usize, act: Activation| {
        conv_bn(w, &format!("{p}.{conv}"), &format!("{p}.{bn}"), stride, act)
    };
    Ok(if w.contains(&format!("{p}.conv3.weight")) {
        Block::Bottleneck {
            conv1: c("conv1", "bn1", 1, Activation::Relu)?,
            conv2: c("conv2", "bn2", stride, Activation::Relu)?,
            conv3: c("conv3", "bn3", 1, Activation::Identity)?,
            down,
        }
    } else {
        Block::Basic {
            conv1: c("conv1", "bn1", stride, Activation::Relu)?,
            conv2: c("conv2", "bn2", 1, Activation::Identity)?,
            down,
        }
    })
}

impl ResNet {
    fn run(&self, x: &Tensor, last: Option<usize>, logits: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let last = if logits { usize::MAX } else { last.unwrap_or(usize::MAX) };
        let mut x = x.clone();
        for conv in &self.stem {
            x = conv.forward(&x)?;
        }
        let mut features = vec![x.clone()];
        x = MaxPool { kernel: 3, stride: 2, padding: 1 }.forward(&x)?;
        for stage in &self.stages {
            if features.len() > last {
                break;
            }
            for b in stage {
                x = b.forward(&x)?;
            }
            features.push(x.clone());
        }
        if !logits {
            return Ok((features, None));
        }
        let pooled = x.mean((2, 3))?;
        let out = pooled.matmul(&self.fc_w)?.broadcast_add(&self.fc_b)?;
        Ok((features, Some(out)))
    }
}

impl ImageModel for ResNet {
    fn forward_maps(&self, x: &Tensor, last: Option<usize>, logits: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        self.run(x, last, logits)
    }

    fn feature_info(&self) -> &[FeatureInfo] {
        &self.feature_info
    }

    fn num_classes(&self) -> usize {
        self.fc_b.dims()[0]
    }
}
