//! timm's EfficientNet / MobileNetV2 family (`timm/models/efficientnet.py`).
//!
//! The architecture comes from timm's block-string notation
//! (`ir_r2_k3_s2_e6_c24`: inverted residual, 2 repeats, 3×3, stride 2,
//! expansion 6, 24 channels), decoded exactly as timm's `_decode_block_str`
//! does, so adding a family member is adding its arch table. Tensor names
//! follow timm (`conv_stem`, `blocks.{stage}.{block}.conv_pw`, ...).

use candle_core::{DType, Tensor};

use crate::models::{FeatureInfo, GlobalPoolNet, LinearHead};
use crate::ops::{Activation, ConvBnAct, PadMode};
use crate::weights::Weights;
use crate::{Error, Result};

/// Block types of the family that lineside implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    /// `ds`: depthwise conv → pointwise conv.
    DepthwiseSeparable,
    /// `ir`: pointwise expand → depthwise → pointwise project.
    InvertedResidual,
    /// `cn`: one conv + BatchNorm + activation.
    ConvBnAct,
    /// `er`: full conv expand → pointwise project (EfficientNet-EdgeTPU).
    EdgeResidual,
}

/// One decoded block string.
#[derive(Debug, Clone, PartialEq)]
struct BlockArgs {
    kind: BlockKind,
    repeats: usize,
    kernel: usize,
    stride: usize,
    expansion: f32,
    out_chs: usize,
    noskip: bool,
    /// `skip`: a `cn` block with a residual.
    skip: bool,
    /// Squeeze-and-excitation ratio (`se0.25`), relative to the block's input channels.
    se: Option<f32>,
}

fn decode_block(s: &str) -> Result<BlockArgs> {
    let bad = |m: String| Error::config(format!("block string `{s}`"), m);
    let mut parts = s.split('_');
    let kind = match parts.next() {
        Some("ds") => BlockKind::DepthwiseSeparable,
        Some("ir") => BlockKind::InvertedResidual,
        Some("cn") => BlockKind::ConvBnAct,
        Some("er") => BlockKind::EdgeResidual,
        other => return Err(bad(format!("unsupported block type {other:?}"))),
    };
    let mut args = BlockArgs {
        kind,
        repeats: 1,
        kernel: 3,
        stride: 1,
        expansion: 1.0,
        out_chs: 0,
        noskip: false,
        skip: false,
        se: None,
    };
    for p in parts {
        let num = |v: &str| v.parse::<usize>().map_err(|e| bad(format!("`{p}`: {e}")));
        if p == "noskip" {
            args.noskip = true;
        } else if p == "skip" {
            args.skip = true;
        } else if let Some(v) = p.strip_prefix("se") {
            args.se = Some(v.parse().map_err(|e| bad(format!("`{p}`: {e}")))?);
        } else if let Some(v) = p.strip_prefix('r') {
            args.repeats = num(v)?;
        } else if let Some(v) = p.strip_prefix('k') {
            args.kernel = num(v)?;
        } else if let Some(v) = p.strip_prefix('s') {
            args.stride = num(v)?;
        } else if let Some(v) = p.strip_prefix('e') {
            args.expansion = v.parse().map_err(|e| bad(format!("`{p}`: {e}")))?;
        } else if let Some(v) = p.strip_prefix('c') {
            args.out_chs = num(v)?;
        } else {
            return Err(bad(format!("unsupported option `{p}`")));
        }
    }
    Ok(args)
}

/// A member of the family: its block strings and global settings.
struct ArchSpec {
    stages: &'static [&'static str],
    stem_chs: usize,
    num_features: usize,
    act: Activation,
    bn_eps: f64,
    tf_same_padding: bool,
}

const MOBILENETV2_STAGES: &[&str] = &[
    "ds_r1_k3_s1_c16",
    "ir_r2_k3_s2_e6_c24",
    "ir_r3_k3_s2_e6_c32",
    "ir_r4_k3_s2_e6_c64",
    "ir_r3_k3_s1_e6_c96",
    "ir_r3_k3_s2_e6_c160",
    "ir_r1_k3_s1_e6_c320",
];

const EFFICIENTNET_LITE_STAGES: &[&str] = &[
    "ds_r1_k3_s1_e1_c16",
    "ir_r2_k3_s2_e6_c24",
    "ir_r2_k5_s2_e6_c40",
    "ir_r3_k3_s2_e6_c80",
    "ir_r3_k5_s1_e6_c112",
    "ir_r4_k5_s2_e6_c192",
    "ir_r1_k3_s1_e6_c320",
];

/// timm's `test_efficientnet`: one block of each kind, SiLU, squeeze-excitation.
const TEST_EFFICIENTNET_STAGES: &[&str] = &[
    "cn_r1_k3_s1_e1_c16_skip",
    "er_r1_k3_s2_e4_c24",
    "er_r1_k3_s2_e4_c32",
    "ir_r1_k3_s2_e4_c48_se0.25",
    "ir_r1_k3_s2_e4_c64_se0.25",
];

/// Architecture names this module builds.
pub const SUPPORTED: &[&str] =
    &["mobilenetv2_100", "tf_efficientnet_lite0", "efficientnet_lite0", "efficientnet_b0", "test_efficientnet"];

fn arch_spec(name: &str) -> Option<ArchSpec> {
    let base = |stages, eps, tf| ArchSpec {
        stages,
        stem_chs: 32,
        num_features: 1280,
        act: Activation::Relu6,
        bn_eps: eps,
        tf_same_padding: tf,
    };
    match name {
        "mobilenetv2_100" => Some(base(MOBILENETV2_STAGES, 1e-5, false)),
        // tf_ ports keep TensorFlow's BatchNorm epsilon and "SAME" padding.
        "tf_efficientnet_lite0" => Some(base(EFFICIENTNET_LITE_STAGES, 1e-3, true)),
        "efficientnet_lite0" => Some(base(EFFICIENTNET_LITE_STAGES, 1e-5, false)),
        "efficientnet_b0" => Some(ArchSpec { act: Activation::Silu, ..base(EFFICIENTNET_B0_STAGES, 1e-5, false) }),
        "test_efficientnet" => Some(ArchSpec {
            stem_chs: 24,
            num_features: 256,
            act: Activation::Silu,
            ..base(TEST_EFFICIENTNET_STAGES, 1e-5, false)
        }),
        _ => None,
    }
}

/// BatchNorm epsilon of `architecture`, for code that trains its head.
pub fn bn_eps(architecture: &str) -> Option<f64> {
    arch_spec(architecture).map(|s| s.bn_eps)
}

/// Squeeze-and-excitation: channel gates from the globally pooled map.
struct SqueezeExcite {
    /// `[C, rd]` and `[rd, C]`, for `pooled · W`.
    reduce_w: Tensor,
    reduce_b: Tensor,
    expand_w: Tensor,
    expand_b: Tensor,
    act: Activation,
}

impl SqueezeExcite {
    fn load(w: &Weights, p: &str, act: Activation) -> Result<Self> {
        let mat = |name: &str| -> Result<Tensor> {
            let t = w.get(&format!("{p}.{name}.weight"))?;
            let (o, i, _, _) = t.dims4()?;
            Ok(t.reshape((o, i))?.t()?.contiguous()?)
        };
        Ok(Self {
            reduce_w: mat("conv_reduce")?,
            reduce_b: w.get(&format!("{p}.conv_reduce.bias"))?.clone(),
            expand_w: mat("conv_expand")?,
            expand_b: w.get(&format!("{p}.conv_expand.bias"))?.clone(),
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let s = x.mean((2, 3))?.matmul(&self.reduce_w)?.broadcast_add(&self.reduce_b)?;
        let s = self.act.apply(&s)?.matmul(&self.expand_w)?.broadcast_add(&self.expand_b)?;
        let gate = candle_nn::ops::sigmoid(&s)?.reshape((n, c, 1, 1))?;
        Ok(x.broadcast_mul(&gate)?)
    }
}

// Built once per model and kept in a Vec: variant size does not matter here.
#[allow(clippy::large_enum_variant)]
enum Block {
    DepthwiseSeparable { dw: ConvBnAct, se: Option<SqueezeExcite>, pw: ConvBnAct, skip: bool },
    InvertedResidual { pw: ConvBnAct, dw: ConvBnAct, se: Option<SqueezeExcite>, pwl: ConvBnAct, skip: bool },
    Conv { conv: ConvBnAct, skip: bool },
    EdgeResidual { exp: ConvBnAct, pwl: ConvBnAct, skip: bool },
}

impl Block {
    fn convs_mut(&mut self) -> Vec<&mut ConvBnAct> {
        match self {
            Block::DepthwiseSeparable { dw, pw, .. } => vec![dw, pw],
            Block::InvertedResidual { pw, dw, pwl, .. } => vec![pw, dw, pwl],
            Block::Conv { conv, .. } => vec![conv],
            Block::EdgeResidual { exp, pwl, .. } => vec![exp, pwl],
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Each block ends in one convolution (`last`) applied to `inner`.
        let (inner, last, skip) = match self {
            Block::DepthwiseSeparable { dw, se, pw, skip } => {
                let mut y = dw.forward(x)?;
                if let Some(se) = se {
                    y = se.forward(&y)?;
                }
                (y, pw, *skip)
            }
            Block::InvertedResidual { pw, dw, se, pwl, skip } => {
                let mut y = dw.forward(&pw.forward(x)?)?;
                if let Some(se) = se {
                    y = se.forward(&y)?;
                }
                (y, pwl, *skip)
            }
            Block::Conv { conv, skip } => (x.clone(), conv, *skip),
            Block::EdgeResidual { exp, pwl, skip } => (exp.forward(x)?, pwl, *skip),
        };
        if skip { last.forward_residual(&inner, x, Activation::Identity) } else { last.forward(&inner) }
    }
}

/// An EfficientNet-family network with BatchNorm folded into its convolutions.
const EFFICIENTNET_B0_STAGES: &[&str] = &[
    "ds_r1_k3_s1_e1_c16_se0.25",
    "ir_r2_k3_s2_e6_c24_se0.25",
    "ir_r2_k5_s2_e6_c40_se0.25",
    "ir_r3_k3_s2_e6_c80_se0.25",
    "ir_r3_k5_s1_e6_c112_se0.25",
    "ir_r4_k5_s2_e6_c192_se0.25",
    "ir_r1_k3_s1_e6_c320_se0.25",
];

pub struct EfficientNet {
    stem: ConvBnAct,
    stages: Vec<Vec<Block>>,
    head: ConvBnAct,
    classifier: LinearHead,
    /// Indices of the stages whose output timm's `features_only` returns.
    feature_stages: Vec<usize>,
    feature_info: Vec<FeatureInfo>,
    /// The same network channels-last, where every layer has a kernel for
    /// it (AVX-512F or AVX2; no squeeze-excite, no SiLU): f32 on CPU runs this.
    #[cfg(target_arch = "x86_64")]
    channels_last: Option<channels_last::Network>,
}

impl EfficientNet {
    /// Whether `architecture` is built by this module.
    pub fn supports(architecture: &str) -> bool {
        arch_spec(architecture).is_some()
    }

    /// Builds `architecture` from timm-named weights.
    pub fn load(architecture: &str, w: &Weights) -> Result<Self> {
        let spec = arch_spec(architecture).ok_or_else(|| Error::UnsupportedArchitecture {
            found: architecture.to_string(),
            supported: SUPPORTED.join(", "),
        })?;
        let pad = |k: usize, s: usize| {
            if spec.tf_same_padding { PadMode::TfSame } else { PadMode::timm_default(k, s) }
        };
        let conv = |name: &str, bn: &str, stride: usize, groups: usize, act: Activation| -> Result<ConvBnAct> {
            let (wt, b) = w.fold_bn(&format!("{name}.weight"), bn, spec.bn_eps)?;
            let k = wt.dim(2)?;
            ConvBnAct::new(wt, b, stride, groups, pad(k, stride), act, w.kernels())
        };
        let act = spec.act;
        let stem = conv("conv_stem", "bn1", 2, 1, act)?;
        check_channels(&stem, spec.stem_chs, "conv_stem")?;

        let mut in_chs = spec.stem_chs;
        let mut stride_total = 2;
        let mut stages = Vec::new();
        let mut stage_strides = Vec::new();
        let mut stage_channels = Vec::new();
        for (si, s) in spec.stages.iter().enumerate() {
            let args = decode_block(s)?;
            let mut blocks = Vec::new();
            for bi in 0..args.repeats {
                let p = format!("blocks.{si}.{bi}");
                let stride = if bi == 0 { args.stride } else { 1 };
                let residual_ok = stride == 1 && in_chs == args.out_chs;
                let skip = residual_ok && !args.noskip;
                let mid = (in_chs as f32 * args.expansion).round() as usize;
                let se = match args.se {
                    Some(_) => Some(SqueezeExcite::load(w, &format!("{p}.se"), act)?),
                    None => None,
                };
                let block = match args.kind {
                    BlockKind::DepthwiseSeparable => Block::DepthwiseSeparable {
                        dw: conv(&format!("{p}.conv_dw"), &format!("{p}.bn1"), stride, in_chs, act)?,
                        se,
                        pw: conv(&format!("{p}.conv_pw"), &format!("{p}.bn2"), 1, 1, Activation::Identity)?,
                        skip,
                    },
                    BlockKind::InvertedResidual => Block::InvertedResidual {
                        pw: conv(&format!("{p}.conv_pw"), &format!("{p}.bn1"), 1, 1, act)?,
                        dw: conv(&format!("{p}.conv_dw"), &format!("{p}.bn2"), stride, mid, act)?,
                        se,
                        pwl: conv(&format!("{p}.conv_pwl"), &format!("{p}.bn3"), 1, 1, Activation::Identity)?,
                        skip,
                    },
                    // timm's ConvBnAct block has a residual only when asked (`skip`).
                    BlockKind::ConvBnAct => Block::Conv {
                        conv: conv(&format!("{p}.conv"), &format!("{p}.bn1"), stride, 1, act)?,
                        skip: residual_ok && args.skip,
                    },
                    BlockKind::EdgeResidual => Block::EdgeResidual {
                        exp: conv(&format!("{p}.conv_exp"), &format!("{p}.bn1"), stride, 1, act)?,
                        pwl: conv(&format!("{p}.conv_pwl"), &format!("{p}.bn2"), 1, 1, Activation::Identity)?,
                        skip,
                    },
                };
                blocks.push(block);
                in_chs = args.out_chs;
            }
            // Extra blocks in the file mean the weights are for a different architecture.
            if w.contains(&format!("blocks.{si}.{}.conv_dw.weight", args.repeats)) {
                return Err(Error::config(
                    architecture,
                    format!("weights have more than {} blocks in stage {si}", args.repeats),
                ));
            }
            stride_total *= args.stride;
            stage_strides.push(stride_total);
            stage_channels.push(args.out_chs);
            stages.push(blocks);
        }
        let head = conv("conv_head", "bn2", 1, 1, act)?;
        check_channels(&head, spec.num_features, "conv_head")?;
        let classifier = LinearHead::new(w.get("classifier.weight")?, w.get("classifier.bias")?)?;

        // timm's feature_info: the last block of every stage followed by a stride change, and the last stage.
        let n = stages.len();
        let feature_stages: Vec<usize> = (0..n)
            .filter(|&i| i + 1 == n || decode_block(spec.stages[i + 1]).map(|a| a.stride > 1).unwrap_or(false))
            .collect();
        let feature_info = feature_stages
            .iter()
            .map(|&i| FeatureInfo {
                module: format!("blocks.{i}"),
                channels: stage_channels[i],
                reduction: stage_strides[i],
            })
            .collect();
        #[cfg(target_arch = "x86_64")]
        // Only a CPU model on lineside's kernels (`Weights::kernels`).
        let channels_last = if w.kernels() == crate::Kernels::Lineside {
            channels_last::Network::new(&stem, &stages, &head)?
        } else {
            None
        };
        #[cfg(target_arch = "x86_64")]
        let (mut stem, mut stages, mut head) = (stem, stages, head);
        #[cfg(target_arch = "x86_64")]
        if channels_last.is_some() {
            // On CPU the NCHW GEMMs would now serve only non-f32 input,
            // which candle's own convolution handles as well; the depthwise
            // kernels keep their (small) weights.
            let blocks = stages.iter_mut().flatten().flat_map(Block::convs_mut);
            for conv in [&mut stem, &mut head].into_iter().chain(blocks) {
                conv.drop_cpu_kernel();
            }
        }
        Ok(Self {
            stem,
            stages,
            head,
            classifier,
            feature_stages,
            feature_info,
            #[cfg(target_arch = "x86_64")]
            channels_last,
        })
    }

    /// The channels-last network, where it serves `x`.
    #[cfg(target_arch = "x86_64")]
    fn channels_last_for(&self, x: &Tensor) -> Option<&channels_last::Network> {
        self.channels_last.as_ref().filter(|_| x.device().is_cpu() && x.dtype() == DType::F32)
    }
}

impl GlobalPoolNet for EfficientNet {
    /// The maps of `feature_stages` (up to the `last`-th; none when `last`
    /// is `None`) and, with `pooled`, the head's globally pooled output
    /// `[N, C]`.
    fn run(&self, x: &Tensor, last: Option<usize>, pooled: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        #[cfg(target_arch = "x86_64")]
        if let Some(net) = self.channels_last_for(x) {
            return net.run(x, &self.feature_stages, last, pooled);
        }
        let mut x = self.stem.forward(x)?;
        let mut features = Vec::with_capacity(self.feature_stages.len());
        for (i, stage) in self.stages.iter().enumerate() {
            if !pooled && last.is_none_or(|l| features.len() > l) {
                break;
            }
            for b in stage {
                x = b.forward(&x)?;
            }
            if self.feature_stages.contains(&i) && last.is_some_and(|l| features.len() <= l) {
                features.push(x.clone());
            }
        }
        if !pooled {
            return Ok((features, None));
        }
        Ok((features, Some(self.head.forward(&x)?.mean((2, 3))?)))
    }

    fn classifier(&self) -> &LinearHead {
        &self.classifier
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

fn check_channels(layer: &ConvBnAct, want: usize, name: &str) -> Result<()> {
    if layer.out_channels() != want {
        return Err(Error::config(name, format!("has {} channels, architecture expects {want}", layer.out_channels())));
    }
    Ok(())
}

/// MobileNetV2 and EfficientNet-Lite on the channels-last kernels
/// ([`crate::ops::nhwc_conv`], [`crate::ops::nhwc_depthwise`]): the input is
/// transposed once, every layer reads and writes NHWC, the 1×1 convolutions
/// read their input in place (no packing per call) and the depthwise ones
/// need no padded copy. Feature maps go back to NCHW only when asked for.
#[cfg(target_arch = "x86_64")]
mod channels_last {
    use candle_core::Tensor;

    use super::Block;
    use crate::Result;
    use crate::models::micro_batch::threads_here;
    use crate::ops::inverted_residual::InvertedResidual;
    use crate::ops::nhwc_conv::NhwcConv;
    use crate::ops::{ConvBnAct, with_nchw_f32};

    /// A block on the channels-last kernels: `[expand →] depthwise →
    /// project [+ input]`, fused by bands of rows where its expanded map is
    /// large. `None` for a block kind or layer without a channels-last
    /// kernel, and for layers that do not chain into one
    /// ([`InvertedResidual::chains`], which no timm network has), which
    /// leaves the network on candle's ops.
    fn block(b: &Block) -> Result<Option<InvertedResidual>> {
        let (expand, dw, project, skip) = match b {
            Block::DepthwiseSeparable { dw, se: None, pw, skip } => (None, dw, pw, *skip),
            Block::InvertedResidual { pw, dw, se: None, pwl, skip } => (Some(pw), dw, pwl, *skip),
            _ => return Ok(None),
        };
        // The skip is added after the projection's activation on the
        // NCHW path and before it here: the same only for Identity.
        if skip && project.activation() != crate::ops::Activation::Identity {
            return Ok(None);
        }
        let expand = match expand {
            Some(conv) => match with_own_act(conv)? {
                Some(e) => Some(e),
                None => return Ok(None),
            },
            None => None,
        };
        let (Some(dw), Some(project)) = (dw.channels_last_depthwise()?, with_own_act(project)?) else {
            return Ok(None);
        };
        Ok(InvertedResidual::chains(expand.as_ref(), &dw, &project, skip)
            .then(|| InvertedResidual::new(expand, dw, project, skip)))
    }

    /// A groups=1 layer (1×1, or the stem) with its own activation, channels-last.
    fn with_own_act(conv: &ConvBnAct) -> Result<Option<NhwcConv>> {
        conv.channels_last(conv.activation())
    }

    /// The whole network but its classifier, channels-last.
    pub struct Network {
        stem: NhwcConv,
        stages: Vec<Vec<InvertedResidual>>,
        head: NhwcConv,
    }

    impl Network {
        /// `None` where a layer has no channels-last kernel or a block's
        /// layers do not chain (`block`).
        pub fn new(stem: &ConvBnAct, stages: &[Vec<Block>], head: &ConvBnAct) -> Result<Option<Self>> {
            let (Some(stem), Some(head)) = (with_own_act(stem)?, with_own_act(head)?) else { return Ok(None) };
            let stages = stages.iter().map(|s| s.iter().map(block).collect::<Result<Option<Vec<_>>>>());
            let Some(stages) = stages.collect::<Result<Option<Vec<_>>>>()? else { return Ok(None) };
            Ok(Some(Self { stem, stages, head }))
        }

        /// The maps of `feature_stages` (NCHW, up to the `last`-th; none
        /// when `last` is `None`) and, with `pooled`, the head's globally
        /// pooled output `[N, C]`.
        pub fn run(
            &self,
            x: &Tensor,
            feature_stages: &[usize],
            last: Option<usize>,
            pooled: bool,
        ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
            let dev = x.device();
            let mut x = with_nchw_f32(x, |src, (n, c, h, w)| self.stem.forward_nchw(src, n, c, h, w))?;
            let mut features = Vec::new();
            for (i, stage) in self.stages.iter().enumerate() {
                if !pooled && last.is_none_or(|l| features.len() > l) {
                    break;
                }
                for b in stage {
                    x = b.forward(&x, threads_here());
                }
                if feature_stages.contains(&i) && last.is_some_and(|l| features.len() <= l) {
                    features.push(Tensor::from_vec(x.to_nchw(), (x.n, x.c, x.h, x.w), dev)?);
                }
            }
            if !pooled {
                return Ok((features, None));
            }
            let head = self.head.forward(&x, None);
            Ok((features, Some(Tensor::from_vec(head.mean(), (head.n, head.c), dev)?)))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::EfficientNet;
        use super::super::tests::imagenet_weights;
        use crate::models::micro_batch::threads_here;
        use crate::ops::nhwc_conv::Nhwc;
        use crate::ops::test_util::values;

        /// Milliseconds per layer for one 224² image on one thread (as each
        /// share of a batch runs) and on two (as a batch-1 pass runs, under
        /// the warm workers), median of alternating rounds, and what the
        /// second thread gains per layer:
        /// `cargo test --release -p lineside-inference --lib
        /// channels_last::tests::layer_times -- --ignored --nocapture`.
        #[test]
        #[ignore]
        fn layer_times() {
            use crate::models::keep_warm::with_warm_workers;
            for (arch, dir) in [
                ("mobilenetv2_100", "mobilenetv2_100.imagenet"),
                ("tf_efficientnet_lite0", "tf_efficientnet_lite0.imagenet"),
            ] {
                let Some(w) = imagenet_weights(arch, dir) else { continue };
                let model = EfficientNet::load(arch, &w).unwrap();
                let net = model.channels_last.as_ref().unwrap();
                let pools: Vec<_> =
                    [1, 2].map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()).into();
                // Each layer's input, then its timings. The stem's counts
                // the network's transpose from NCHW, as a pass runs it.
                let image = values(3 * 224 * 224, 1);
                let mut inputs = vec![Nhwc::from_nchw(&image, 1, 3, 224, 224)];
                type Layer<'a> = (&'static str, Box<dyn Fn(&Nhwc) -> Nhwc + Sync + 'a>);
                let mut layers: Vec<Layer> =
                    vec![("stem", Box::new(|_: &Nhwc| net.stem.forward_nchw(&image, 1, 3, 224, 224)))];
                for b in net.stages.iter().flatten() {
                    layers.push(("block", Box::new(move |x: &Nhwc| b.forward(x, threads_here()))));
                }
                layers.push(("head", Box::new(|x: &Nhwc| net.head.forward(x, None))));
                for (_, f) in &layers {
                    let y = f(inputs.last().unwrap());
                    inputs.push(y);
                }
                // times[threads - 1][layer]
                let mut times = vec![vec![Vec::new(); layers.len()]; pools.len()];
                for _ in 0..9 {
                    for (pool, times) in pools.iter().zip(&mut times) {
                        pool.install(|| {
                            with_warm_workers(|| {
                                for ((_, f), (x, t)) in layers.iter().zip(inputs.iter().zip(times.iter_mut())) {
                                    let start = std::time::Instant::now();
                                    for _ in 0..10 {
                                        drop(f(x));
                                    }
                                    t.push(start.elapsed().as_secs_f64() * 100.0);
                                }
                            })
                        });
                    }
                }
                let medians: Vec<Vec<f64>> = times
                    .into_iter()
                    .map(|per_layer| {
                        per_layer
                            .into_iter()
                            .map(|mut t| {
                                t.sort_by(f64::total_cmp);
                                t[t.len() / 2]
                            })
                            .collect()
                    })
                    .collect();
                let (one, two) = (&medians[0], &medians[1]);
                let (total1, total2): (f64, f64) = (one.iter().sum(), two.iter().sum());
                println!(
                    "{arch}: {total1:.2} ms per image on one thread, {total2:.2} on two ({:.2}x)",
                    total1 / total2
                );
                for (i, ((name, _), (ms1, ms2))) in layers.iter().zip(one.iter().zip(two)).enumerate() {
                    let (x, y) = (&inputs[i], &inputs[i + 1]);
                    println!(
                        "  {i:2} {name:5} {:3}²x{:<4} -> {:3}²x{:<4} {ms1:6.3} ms {:4.1}% | two threads {ms2:6.3} ms {:4.2}x, {:5.3} ms over half",
                        x.h,
                        x.c,
                        y.h,
                        y.c,
                        100.0 * ms1 / total1,
                        ms1 / ms2,
                        ms2 - ms1 / 2.0,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ImageNet weights of `../shared/models/DIR`, or `None` (with a
    /// note) where that folder is missing or the CPU has neither AVX-512F
    /// nor AVX2.
    pub(super) fn imagenet_weights(arch: &str, dir: &str) -> Option<Weights> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../../shared/models/{dir}/model.safetensors"));
        if !path.exists() || crate::ops::simd::Isa::detect().is_none() {
            eprintln!("no ../shared/models or no AVX-512F/AVX2: skipped");
            return None;
        }
        Some(Weights::from_buffer(arch, &std::fs::read(&path).unwrap(), &candle_core::Device::Cpu).unwrap())
    }

    /// The channels-last path gives the NCHW path's feature maps and logits
    /// (candle's convolutions where the NCHW GEMMs are dropped), on odd
    /// map sizes: MobileNetV2 (3×3, PyTorch padding) and
    /// tf_efficientnet_lite0 (5×5, TF "SAME" padding), two images and one
    /// on two threads. `forward` gives the same logits without the maps.
    #[test]
    fn channels_last_matches_nchw() {
        use candle_core::Device;
        for (arch, dir) in [
            ("mobilenetv2_100", "mobilenetv2_100.imagenet"),
            ("tf_efficientnet_lite0", "tf_efficientnet_lite0.imagenet"),
        ] {
            let Some(w) = imagenet_weights(arch, dir) else { return };
            let fast = EfficientNet::load(arch, &w).unwrap();
            let mut slow = EfficientNet::load(arch, &w).unwrap();
            assert!(fast.channels_last.is_some(), "{arch}");
            slow.channels_last = None;
            let x = Tensor::randn(0f32, 1.0, (2, 3, 83, 71), &Device::Cpu).unwrap();
            crate::models::test_util::assert_same_outputs(&fast, &slow, &x, 1, arch);
            // One image on two threads: its small maps' blocks split by channels.
            let x = Tensor::randn(0f32, 1.0, (1, 3, 83, 71), &Device::Cpu).unwrap();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            pool.install(|| crate::models::test_util::assert_same_outputs(&fast, &slow, &x, 1, arch));
        }
    }

    #[test]
    fn decodes_timm_block_strings() {
        let a = decode_block("ir_r3_k5_s2_e6_c40").unwrap();
        assert_eq!(
            a,
            BlockArgs {
                kind: BlockKind::InvertedResidual,
                repeats: 3,
                kernel: 5,
                stride: 2,
                expansion: 6.0,
                out_chs: 40,
                noskip: false,
                skip: false,
                se: None,
            }
        );
        assert!(decode_block("ds_r1_k3_s1_c16_noskip").unwrap().noskip);
        let cn = decode_block("cn_r1_k3_s1_e1_c16_skip").unwrap();
        assert!(cn.kind == BlockKind::ConvBnAct && cn.skip);
        assert_eq!(decode_block("ir_r1_k3_s2_e4_c48_se0.25").unwrap().se, Some(0.25));
        assert!(decode_block("xx_r1").is_err());
        assert!(decode_block("ir_r1_q4").is_err());
    }
}
