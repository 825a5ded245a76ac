//! CPU kernels for the layers where candle's generic path is slow, and the
//! fused convolution layer the models are built from.
//!
//! BatchNorm is folded into every convolution at load time, so a layer is
//! `act(conv(x) + bias)`. On CPU:
//! - depthwise convolutions run a direct kernel ([`DepthwiseConv`]); candle
//!   would split them into one convolution per channel;
//! - every other groups=1 convolution is a GEMM writing straight into the
//!   NCHW output, bias fused ([`GemmConv`]); 1×1 ones need no im2col copy;
//! - elsewhere, bias and activation are applied in one pass ([`BiasAct`]).
//!
//! On other devices the same layer falls back to candle's own ops.

use candle_core::{CpuStorage, CustomOp1, InplaceOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

mod gemm_conv;
pub use gemm_conv::GemmConv;

/// Activation following a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Relu6,
    Silu,
}

impl Activation {
    #[inline]
    fn apply_slice(self, s: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::Relu => s.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Relu6 => s.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)),
            Activation::Silu => s.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp()),
        }
    }

    /// Applies the activation with candle ops (any device, differentiable).
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Identity => x.clone(),
            Activation::Relu => x.relu()?,
            Activation::Relu6 => x.clamp(0f32, 6f32)?,
            Activation::Silu => x.silu()?,
        })
    }
}

/// Zero padding on each side of a feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding {
    pub top: usize,
    pub left: usize,
    pub bottom: usize,
    pub right: usize,
}

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadMode {
    /// PyTorch style: the same fixed amount on every side.
    Symmetric(usize),
    /// TensorFlow "SAME": computed from the input size, extra pixel at the bottom/right.
    TfSame,
}

impl PadMode {
    /// PyTorch's default for timm models: `((stride - 1) + (kernel - 1)) / 2`.
    pub fn timm_default(kernel: usize, stride: usize) -> Self {
        PadMode::Symmetric(((stride - 1) + (kernel - 1)) / 2)
    }

    /// The concrete padding for an `h`×`w` input.
    pub fn resolve(self, h: usize, w: usize, kernel: usize, stride: usize) -> Padding {
        match self {
            PadMode::Symmetric(p) => Padding { top: p, left: p, bottom: p, right: p },
            PadMode::TfSame => {
                let total = |i: usize| {
                    let out = i.div_ceil(stride);
                    ((out - 1) * stride + kernel).saturating_sub(i)
                };
                let (ph, pw) = (total(h), total(w));
                Padding { top: ph / 2, left: pw / 2, bottom: ph - ph / 2, right: pw - pw / 2 }
            }
        }
    }
}

fn out_size(i: usize, k: usize, s: usize, before: usize, after: usize) -> usize {
    (i + before + after - k) / s + 1
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("lineside kernels take f32 tensors"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("lineside kernels take contiguous tensors"),
    }
}

/// Input height and width, output width and padding of one depthwise plane.
#[derive(Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    ow: usize,
    pad: Padding,
}

/// Direct depthwise convolution with fused bias and activation (NCHW, f32, CPU).
#[derive(Debug, Clone)]
pub struct DepthwiseConv {
    /// `[channels * k * k]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    kernel: usize,
    stride: usize,
    pad: PadMode,
    act: Activation,
}

impl DepthwiseConv {
    /// One channel's plane. The input is first copied, zero-padded, into
    /// `scratch`, split by column phase (`x mod stride`), so that every tap of
    /// every output row reads a contiguous, in-bounds run; a row's taps are
    /// then summed in one pass per kernel row ([`fma_rows`]).
    ///
    /// Tried and measured slower on mobilenetv2 (2 cores, AVX-512): the same
    /// code compiled for AVX-512 behind runtime detection, fixed 16-lane
    /// blocks, and whole-plane passes over row-and-column phase planes.
    fn plane(&self, ch: usize, inp: &[f32], g: Geometry, scratch: &mut Vec<f32>, out: &mut [f32]) {
        let Geometry { h, w, ow, pad } = g;
        let (k, s) = (self.kernel, self.stride);
        let ph = h + pad.top + pad.bottom;
        let cw = (w + pad.left + pad.right).div_ceil(s);
        scratch.clear();
        scratch.resize(s * ph * cw, 0.0);
        for p in 0..s {
            // Input columns `x` with `(x + left) mod s == p` land at `(x + left) / s`.
            let x0 = (p + s - pad.left % s) % s;
            let d0 = (x0 + pad.left) / s;
            for y in 0..h {
                let dst = &mut scratch[p * ph * cw + (y + pad.top) * cw..][..cw];
                for (d, v) in dst[d0..].iter_mut().zip(inp[y * w..(y + 1) * w].iter().skip(x0).step_by(s)) {
                    *d = *v;
                }
            }
        }
        let wt = &self.weight[ch * k * k..(ch + 1) * k * k];
        let tap = |py: usize, kx: usize| &scratch[(kx % s) * ph * cw + py * cw + kx / s..][..ow];
        for (oy, row) in out.chunks_mut(ow).enumerate() {
            row.fill(self.bias[ch]);
            for ky in 0..k {
                let py = oy * s + ky;
                let w_row = &wt[ky * k..(ky + 1) * k];
                match k {
                    3 => fma_rows::<3>(row, [tap(py, 0), tap(py, 1), tap(py, 2)], w_row),
                    5 => fma_rows::<5>(row, [tap(py, 0), tap(py, 1), tap(py, 2), tap(py, 3), tap(py, 4)], w_row),
                    _ => (0..k).for_each(|kx| fma_rows::<1>(row, [tap(py, kx)], &w_row[kx..kx + 1])),
                }
            }
            self.act.apply_slice(row);
        }
    }
}

/// `out[j] += Σ_t w[t] · src[t][j]`: one pass over `out` for `K` taps.
#[inline(always)]
fn fma_rows<const K: usize>(out: &mut [f32], src: [&[f32]; K], w: &[f32]) {
    let n = out.len();
    let src = src.map(|s| &s[..n]);
    let w: [f32; K] = std::array::from_fn(|t| w[t]);
    for j in 0..n {
        let mut v = out[j];
        for t in 0..K {
            v += w[t] * src[t][j];
        }
        out[j] = v;
    }
}

impl CustomOp1 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "lineside-depthwise-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let inp = contiguous_f32(storage, layout)?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let pad = self.pad.resolve(h, w, self.kernel, self.stride);
        let oh = out_size(h, self.kernel, self.stride, pad.top, pad.bottom);
        let ow = out_size(w, self.kernel, self.stride, pad.left, pad.right);
        let mut out = vec![0f32; n * c * oh * ow];
        let g = Geometry { h, w, ow, pad };
        out.par_chunks_mut(oh * ow).enumerate().for_each_init(Vec::new, |scratch, (plane, o)| {
            self.plane(plane % c, &inp[plane * h * w..(plane + 1) * h * w], g, scratch, o);
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// `act(x + bias[c])` over an `[N, C, ...]` tensor in one pass (f32, CPU).
#[derive(Debug, Clone)]
pub struct BiasAct {
    bias: Vec<f32>,
    act: Activation,
}

/// In place: the convolution's fresh output is the only holder of its storage,
/// so this saves a copy (and the page faults of a new buffer) per layer.
impl InplaceOp1 for BiasAct {
    fn name(&self) -> &'static str {
        "lineside-bias-act"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("lineside kernels take f32 tensors") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("lineside kernels take contiguous tensors")
        };
        let dims = layout.shape().dims();
        let c = dims[1];
        let plane: usize = dims[2..].iter().product();
        data[start..end].par_chunks_mut(plane.max(1)).enumerate().for_each(|(i, p)| {
            let b = self.bias[i % c];
            p.iter_mut().for_each(|v| *v += b);
            self.act.apply_slice(p);
        });
        Ok(())
    }
}

/// The kind of convolution, which decides the kernel it runs on (on CPU).
#[derive(Debug, Clone)]
enum ConvKind {
    /// groups = 1: im2col (none for 1×1) and a GEMM.
    Gemm(GemmConv),
    /// One filter per channel.
    Depthwise(DepthwiseConv),
    /// Other grouped convolutions: candle's convolution.
    Grouped,
}

/// A convolution with BatchNorm folded in, followed by an activation.
#[derive(Debug, Clone)]
pub struct ConvBnAct {
    /// `[out, in/groups, k, k]` (kept for the non-CPU path and for export).
    weight: Tensor,
    bias: Tensor,
    bias_act: BiasAct,
    kernel: usize,
    stride: usize,
    groups: usize,
    pad: PadMode,
    act: Activation,
    kind: ConvKind,
}

impl ConvBnAct {
    /// Builds the layer from a folded weight `[out, in/groups, k, k]` and bias `[out]`.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        stride: usize,
        groups: usize,
        pad: PadMode,
        act: Activation,
    ) -> Result<Self> {
        let (out_ch, in_per_group, kh, kw) = weight.dims4()?;
        if kh != kw {
            return Err(crate::Error::config("conv", format!("non-square kernel {kh}x{kw}")));
        }
        let bias_vec = bias.to_vec1::<f32>()?;
        let kind = if groups == out_ch && in_per_group == 1 && groups > 1 {
            ConvKind::Depthwise(DepthwiseConv {
                weight: weight.flatten_all()?.to_vec1::<f32>()?,
                bias: bias_vec.clone(),
                kernel: kh,
                stride,
                pad,
                act,
            })
        } else if groups == 1 {
            let flat = weight.flatten_all()?.to_vec1::<f32>()?;
            ConvKind::Gemm(GemmConv::new(flat, bias_vec.clone(), in_per_group, kh, stride, pad, act))
        } else {
            ConvKind::Grouped
        };
        debug_assert_eq!(out_ch, bias_vec.len());
        Ok(Self { weight, bias, bias_act: BiasAct { bias: bias_vec, act }, kernel: kh, stride, groups, pad, act, kind })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Runs the layer on an `[N, C, H, W]` batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let cpu = x.device().is_cpu();
        let (_n, _c, h, w) = x.dims4()?;
        match (&self.kind, cpu) {
            (ConvKind::Depthwise(op), true) => Ok(x.apply_op1_no_bwd(op)?),
            (ConvKind::Gemm(op), true) => Ok(x.apply_op1_no_bwd(op)?),
            _ => {
                let p = self.pad.resolve(h, w, self.kernel, self.stride);
                let x = if p.top == p.bottom && p.left == p.right && p.top == p.left {
                    x.conv2d(&self.weight, p.top, self.stride, 1, self.groups)?
                } else {
                    x.pad_with_zeros(2, p.top, p.bottom)?.pad_with_zeros(3, p.left, p.right)?.conv2d(
                        &self.weight,
                        0,
                        self.stride,
                        1,
                        self.groups,
                    )?
                };
                self.add_bias_act(&x, cpu)
            }
        }
    }

    fn add_bias_act(&self, y: &Tensor, cpu: bool) -> Result<Tensor> {
        if cpu {
            let y = y.contiguous()?;
            y.inplace_op1(&self.bias_act)?;
            Ok(y)
        } else {
            let mut shape = vec![1usize; y.rank()];
            shape[1] = self.bias.dim(0)?;
            self.act.apply(&y.broadcast_add(&self.bias.reshape(shape)?)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, pad: Padding, act: Activation) -> Tensor {
        let c = x.dim(1).unwrap();
        let x = x.pad_with_zeros(2, pad.top, pad.bottom).unwrap().pad_with_zeros(3, pad.left, pad.right).unwrap();
        let y = x.conv2d(w, 0, stride, 1, c).unwrap();
        act.apply(&y.broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn depthwise_matches_candle_grouped_conv() {
        let dev = Device::Cpu;
        for &(k, s, h, w, mode) in &[
            (3, 1, 9, 7, PadMode::Symmetric(1)),
            (3, 2, 10, 9, PadMode::Symmetric(1)),
            (5, 2, 12, 12, PadMode::TfSame),
            (3, 2, 8, 8, PadMode::TfSame),
            (5, 1, 7, 11, PadMode::Symmetric(2)),
        ] {
            let c = 5;
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
            let layer = ConvBnAct::new(wt.clone(), b.clone(), s, c, mode, Activation::Relu6).unwrap();
            let got = layer.forward(&x).unwrap();
            let want = reference(&x, &wt, &b, s, mode.resolve(h, w, k, s), Activation::Relu6);
            assert_eq!(got.dims(), want.dims(), "k{k} s{s} {h}x{w}");
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "k{k} s{s} {h}x{w} {mode:?}: max err {err}");
        }
    }

    #[test]
    fn pointwise_matches_candle_conv() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 8, 5, 6), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (4, 8, 1, 1), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let layer = ConvBnAct::new(wt.clone(), b.clone(), 1, 1, PadMode::Symmetric(0), Activation::Silu).unwrap();
        let got = layer.forward(&x).unwrap();
        let want = Activation::Silu
            .apply(&x.conv2d(&wt, 0, 1, 1, 1).unwrap().broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap()).unwrap())
            .unwrap();
        let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-4, "max err {err}");
    }

    /// Per-image (large maps) and whole-batch (small maps) GEMM paths, with
    /// symmetric and TF-style asymmetric padding, against candle's convolution.
    #[test]
    fn dense_conv_matches_candle_conv() {
        let dev = Device::Cpu;
        for &(n, k, s, h, w, mode) in &[
            (2, 3, 1, 40, 36, PadMode::Symmetric(1)),
            (2, 3, 2, 41, 37, PadMode::Symmetric(1)),
            (3, 3, 2, 9, 8, PadMode::TfSame),
            (1, 7, 2, 30, 30, PadMode::Symmetric(3)),
            (4, 1, 2, 10, 10, PadMode::Symmetric(0)),
            (4, 1, 1, 6, 5, PadMode::Symmetric(0)),
            (2, 1, 1, 40, 40, PadMode::Symmetric(0)),
        ] {
            let (cin, cout) = (5, 7);
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let layer = ConvBnAct::new(wt.clone(), b.clone(), s, 1, mode, Activation::Relu).unwrap();
            let got = layer.forward(&x).unwrap();
            let p = mode.resolve(h, w, k, s);
            let padded = x.pad_with_zeros(2, p.top, p.bottom).unwrap().pad_with_zeros(3, p.left, p.right).unwrap();
            let y = padded.conv2d(&wt, 0, s, 1, 1).unwrap();
            let want = y.broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap()).unwrap().relu().unwrap();
            assert_eq!(got.dims(), want.dims(), "n{n} k{k} s{s} {h}x{w}");
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-4, "n{n} k{k} s{s} {h}x{w} {mode:?}: max err {err}");
        }
    }

    #[test]
    fn tf_same_padding_matches_tensorflow() {
        // 224 input, k3 s2: TF pads 0 before and 1 after.
        assert_eq!(PadMode::TfSame.resolve(224, 224, 3, 2), Padding { top: 0, left: 0, bottom: 1, right: 1 });
        // k5 s2 on 28: pad total 3 -> 1 before, 2 after.
        assert_eq!(PadMode::TfSame.resolve(28, 28, 5, 2), Padding { top: 1, left: 1, bottom: 2, right: 2 });
    }
}
