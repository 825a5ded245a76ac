//! timm's ResNet family (`timm/models/resnet.py`): resnet18/34/50/101/152,
//! their `d` variants (deep stem, average-pool downsampling), wide_resnet and
//! `test_resnet`.
//!
//! The structure is read from the weights rather than from a table: the stem
//! type from `conv1.weight` vs `conv1.{0,3,6}.weight`, each block's type from
//! whether it has a `conv3`, the downsampling style from where its conv sits
//! (`downsample.0` plain, `downsample.1` after an average pool). So every
//! member, including mixed-block test models, loads through one path.

use candle_core::{DType, Tensor};

use crate::models::{FeatureInfo, GlobalPoolNet, LinearHead};
use crate::ops::{Activation, ConvBnAct, MaxPool, PadMode};
use crate::weights::Weights;
use crate::{Error, Kernels, Result};

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
    #[cfg(target_arch = "x86_64")]
    fn convs_mut(&mut self) -> Vec<&mut ConvBnAct> {
        let (mut convs, down) = match self {
            Block::Basic { conv1, conv2, down } => (vec![conv1, conv2], down),
            Block::Bottleneck { conv1, conv2, conv3, down } => (vec![conv1, conv2, conv3], down),
        };
        convs.extend(down.as_mut().map(|d| &mut d.conv));
        convs
    }

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
    fc: LinearHead,
    feature_info: Vec<FeatureInfo>,
    /// What the layers run on; the max pool follows it too.
    kernels: Kernels,
    /// The same network on channels-last kernels, where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    channels_last: Option<channels_last::Network>,
}

fn conv_bn(w: &Weights, conv: &str, bn: &str, stride: usize, act: Activation) -> Result<ConvBnAct> {
    let (weight, bias) = w.fold_bn(&format!("{conv}.weight"), bn, BN_EPS)?;
    let k = weight.dim(2)?;
    ConvBnAct::new(weight, bias, stride, 1, PadMode::Symmetric(k / 2), act, w.kernels())
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
        let fc = LinearHead::new(w.get("fc.weight")?, w.get("fc.bias")?)?;
        #[cfg(target_arch = "x86_64")]
        // Only a CPU model on lineside's kernels (`Weights::kernels`).
        let channels_last =
            if w.kernels() == Kernels::Lineside { channels_last::Network::new(&stem, &stages)? } else { None };
        #[cfg(target_arch = "x86_64")]
        let (mut stem, mut stages) = (stem, stages);
        #[cfg(target_arch = "x86_64")]
        if channels_last.is_some() {
            // On CPU the NCHW kernels would now serve only non-f32 input,
            // which candle's own convolution handles as well.
            for conv in stem.iter_mut().chain(stages.iter_mut().flatten().flat_map(Block::convs_mut)) {
                conv.drop_cpu_kernel();
            }
        }
        Ok(Self {
            stem,
            stages,
            fc,
            feature_info,
            kernels: w.kernels(),
            #[cfg(target_arch = "x86_64")]
            channels_last,
        })
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

impl GlobalPoolNet for ResNet {
    /// The feature maps (up to the `last`-th; none when `last` is `None`)
    /// and, with `pooled`, the globally pooled output `[N, C]`.
    fn run(&self, x: &Tensor, last: Option<usize>, pooled: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        #[cfg(target_arch = "x86_64")]
        if let Some(net) = self.channels_last.as_ref().filter(|_| x.device().is_cpu() && x.dtype() == DType::F32) {
            return net.run(x, last, pooled);
        }
        // The maps it passes are clones of tensors it holds anyway; with no
        // `last` they are dropped at the end.
        let (keep, last) = (last.is_some(), last.unwrap_or(usize::MAX));
        let mut x = x.clone();
        for conv in &self.stem {
            x = conv.forward(&x)?;
        }
        let mut features = vec![x.clone()];
        x = MaxPool { kernel: 3, stride: 2, padding: 1 }.forward(&x, self.kernels)?;
        for stage in &self.stages {
            if features.len() > last {
                break;
            }
            for b in stage {
                x = b.forward(&x)?;
            }
            features.push(x.clone());
        }
        if !keep {
            features.clear();
        }
        Ok((features, pooled.then(|| x.mean((2, 3))).transpose()?))
    }

    fn classifier(&self) -> &LinearHead {
        &self.fc
    }

    fn maps_info(&self) -> &[FeatureInfo] {
        &self.feature_info
    }

    fn on_channels_last(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self.channels_last.is_some();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// ResNet on the channels-last kernels ([`crate::ops::nhwc_conv`]): the
/// input is transposed once, every layer reads and writes NHWC, and feature
/// maps go back to NCHW only when asked for.
#[cfg(target_arch = "x86_64")]
mod channels_last {
    use candle_core::Tensor;

    use super::{Block, Downsample};
    use crate::Result;
    use crate::ops::nhwc_conv::{Nhwc, NhwcConv};
    use crate::ops::winograd::Switching;
    use crate::ops::{Activation, ConvBnAct, with_nchw_f32};

    /// A residual block: its convolutions in order, the last of which adds
    /// the shortcut before its ReLU. The 3×3 stride-1 ones switch to
    /// Winograd's F(4×4, 3×3) or F(2×2, 3×3) on large maps.
    struct ClBlock {
        convs: Vec<Switching>,
        /// The shortcut's convolution, after a 2×2 average pool where set.
        down: Option<(bool, NhwcConv)>,
    }

    impl ClBlock {
        /// `None` where a layer has no channels-last kernel.
        fn new(b: &Block) -> Result<Option<Self>> {
            let (inner, last, down) = match b {
                Block::Basic { conv1, conv2, down } => (vec![conv1], conv2, down),
                Block::Bottleneck { conv1, conv2, conv3, down } => (vec![conv1, conv2], conv3, down),
            };
            let down = match down {
                None => None,
                Some(Downsample { avg_pool, conv }) => match conv.channels_last(Activation::Identity)? {
                    Some(c) => Some((*avg_pool, c)),
                    None => return Ok(None),
                },
            };
            // The last layer's own activation is Identity: ReLU follows the
            // shortcut's addition, which its kernel does in registers.
            let convs = inner.into_iter().chain([last]).map(|c| c.channels_last_switching(Activation::Relu));
            let Some(convs) = convs.collect::<Result<Option<Vec<_>>>>()? else { return Ok(None) };
            Ok(Some(Self { convs, down }))
        }

        fn forward(&self, x: &Nhwc) -> Nhwc {
            let shortcut = self.down.as_ref().map(|(avg_pool, conv)| {
                if *avg_pool { conv.forward(&x.avg_pool_2x2_ceil(), None) } else { conv.forward(x, None) }
            });
            let (tail, inner) = self.convs.split_last().expect("a block has convolutions");
            let y = inner.iter().fold(None, |y: Option<Nhwc>, conv| Some(conv.forward(y.as_ref().unwrap_or(x), None)));
            let y = y.expect("a block has two or more convolutions");
            tail.forward(&y, Some(shortcut.as_ref().unwrap_or(x)))
        }
    }

    /// The whole network but its head, channels-last.
    pub struct Network {
        stem: Vec<NhwcConv>,
        stages: Vec<Vec<ClBlock>>,
    }

    impl Network {
        /// `None` where a layer has no channels-last kernel (neither AVX-512F nor AVX2).
        pub fn new(stem: &[ConvBnAct], stages: &[Vec<Block>]) -> Result<Option<Self>> {
            let stem = stem.iter().map(|c| c.channels_last(Activation::Relu));
            let Some(stem) = stem.collect::<Result<Option<Vec<_>>>>()? else { return Ok(None) };
            let stages = stages.iter().map(|s| s.iter().map(ClBlock::new).collect::<Result<Option<Vec<_>>>>());
            let Some(stages) = stages.collect::<Result<Option<Vec<_>>>>()? else { return Ok(None) };
            Ok(Some(Self { stem, stages }))
        }

        /// Feature maps (NCHW, up to stage `last`; none when `last` is
        /// `None`) and, with `pooled`, the globally pooled last map `[N, C]`.
        pub fn run(&self, x: &Tensor, last: Option<usize>, pooled: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
            let dev = x.device();
            let (first, rest) = self.stem.split_first().expect("a stem has convolutions");
            let mut x = with_nchw_f32(x, |src, (n, c, h, w)| first.forward_nchw(src, n, c, h, w))?;
            let mut features = Vec::new();
            let keep = |m: &Nhwc, features: &mut Vec<Tensor>| -> Result<()> {
                if last.is_some_and(|l| features.len() <= l) {
                    features.push(Tensor::from_vec(m.to_nchw(), (m.n, m.c, m.h, m.w), dev)?);
                }
                Ok(())
            };
            for conv in rest {
                x = conv.forward(&x, None);
            }
            keep(&x, &mut features)?;
            x = x.max_pool(3, 2, 1);
            for stage in &self.stages {
                if !pooled && last.is_none_or(|l| features.len() > l) {
                    break;
                }
                for b in stage {
                    x = b.forward(&x);
                }
                keep(&x, &mut features)?;
            }
            let pooled = if pooled { Some(Tensor::from_vec(x.mean(), (x.n, x.c), dev)?) } else { None };
            Ok((features, pooled))
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use candle_core::{Device, Tensor};

    use crate::Kernels;
    use crate::weights::Weights;

    /// The channels-last path gives the NCHW path's feature maps and logits
    /// (candle's convolution, once the NCHW kernels are dropped): deep stem,
    /// basic and bottleneck blocks, average-pool shortcuts, odd map sizes.
    /// `forward` gives the same logits without the maps.
    #[test]
    fn channels_last_matches_nchw() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/models/test_resnet.random6/model.safetensors");
        if !path.exists() || crate::ops::simd::Isa::detect().is_none() {
            eprintln!("no ../shared/models or no AVX-512F/AVX2: skipped");
            return;
        }
        let w = Weights::from_buffer("test_resnet", &std::fs::read(&path).unwrap(), &Device::Cpu).unwrap();
        let fast = super::ResNet::load("test_resnet", &w).unwrap();
        let mut slow = super::ResNet::load("test_resnet", &w).unwrap();
        assert!(fast.channels_last.is_some());
        slow.channels_last = None;
        let x = Tensor::randn(0f32, 1.0, (3, 3, 97, 83), &Device::Cpu).unwrap();
        crate::models::test_util::assert_same_outputs(&fast, &slow, &x, 2, "test_resnet");
        // And the path a GPU runs: candle's ops only, no kernel of ours.
        let candle = super::ResNet::load("test_resnet", &w.with_kernels(Kernels::Candle)).unwrap();
        assert!(candle.channels_last.is_none() && candle.kernels == Kernels::Candle);
        crate::models::test_util::assert_same_outputs(&fast, &candle, &x, 2, "test_resnet on candle's ops");
    }
}
