//! CPU kernels for the layers where candle's generic path is slow, and the
//! fused convolution layer the models are built from.
//!
//! BatchNorm is folded into every convolution at load time, so a layer is
//! `act(conv(x) + bias)`. On CPU:
//! - depthwise convolutions run a direct kernel ([`DepthwiseConv`]); candle
//!   would split them into one convolution per channel;
//! - every other groups=1 convolution is a GEMM writing straight into the
//!   NCHW output, bias fused ([`GemmConv`]); 1×1 ones need no im2col copy;
//! - elsewhere, bias and activation are applied in one pass ([`BiasAct`]);
//! - on CPUs with AVX-512F or AVX2, whole networks (ResNet, MobileNetV2,
//!   EfficientNet-Lite) run channels-last instead: [`nhwc_conv`] (an
//!   indirect GEMM) and [`nhwc_depthwise`], each written once over
//!   [`simd::Simd`] and compiled for both; there, ResNet's 3×3 stride-1
//!   convolutions switch to Winograd's F(4×4, 3×3) or F(2×2, 3×3) on
//!   large maps ([`winograd`]).
//!
//! On other devices the same layer falls back to candle's own ops.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};
use rayon::prelude::*;

use crate::{Kernels, Result};

mod depthwise;
mod gemm_conv;
#[cfg(target_arch = "x86_64")]
pub mod inverted_residual;
mod max_pool;
#[cfg(target_arch = "x86_64")]
pub mod nhwc_conv;
#[cfg(target_arch = "x86_64")]
pub mod nhwc_depthwise;
pub mod sgemm;
pub mod simd;
#[cfg(target_arch = "x86_64")]
pub mod winograd;
pub use depthwise::DepthwiseConv;
use gemm_conv::ConvAddAct;
pub use gemm_conv::{GemmConv, GemmPath};
pub use max_pool::MaxPool;

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

    /// The part of the activation the packed GEMM applies in registers.
    fn fused(self) -> sgemm::Fused {
        match self {
            Activation::Relu => sgemm::Fused::Relu,
            Activation::Relu6 => sgemm::Fused::Relu6,
            Activation::Identity | Activation::Silu => sgemm::Fused::None,
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

/// A layer's output before its kernel has written it. Not zeroing it
/// matters: glibc's calloc on reused heap memory is a memset the size of the
/// tensor, 9% of mobilenetv2's time at batch 8.
type Uninit = [MaybeUninit<f32>];

fn uninit_output(len: usize) -> Box<Uninit> {
    Box::new_uninit_slice(len)
}

/// The buffer as floats, once written.
///
/// # Safety
/// Every element of `s` has been written.
unsafe fn assume_init(s: &mut Uninit) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the caller
    // guarantees every element is initialized.
    unsafe { &mut *(s as *mut Uninit as *mut [f32]) }
}

/// The buffer zeroed, for kernels that accumulate into their output.
fn zeroed(s: &mut Uninit) -> &mut [f32] {
    s.fill(MaybeUninit::new(0.0));
    // SAFETY: just written.
    unsafe { assume_init(s) }
}

/// A finished output as the Vec candle's storage takes.
///
/// # Safety
/// Every element has been written.
unsafe fn finish(out: Box<Uninit>) -> Vec<f32> {
    // SAFETY: forwarded.
    unsafe { out.assume_init() }.into_vec()
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

/// Runs `f` on a 4-d f32 CPU tensor's values (NCHW) and its dims, borrowed
/// where the tensor is contiguous: a channels-last network's input is
/// transposed straight from candle's storage, not from a copy of it.
pub(crate) fn with_nchw_f32<R>(
    x: &Tensor,
    f: impl FnOnce(&[f32], (usize, usize, usize, usize)) -> R,
) -> candle_core::Result<R> {
    let dims = x.dims4()?;
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("lineside kernels take CPU tensors") };
    Ok(f(contiguous_f32(cpu, layout)?, dims))
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
    Gemm(Box<GemmConv>),
    /// One filter per channel.
    Depthwise(DepthwiseConv),
    /// candle's own convolution: other grouped ones, every layer on
    /// [`Kernels::Candle`], and layers that run on another CPU path (see
    /// [`ConvBnAct::drop_cpu_kernel`]).
    Candle,
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
    /// [`Kernels::Candle`]: candle's ops only, whatever the device.
    kernels: Kernels,
}

impl ConvBnAct {
    /// Builds the layer from a folded weight `[out, in/groups, k, k]` and
    /// bias `[out]`. With [`Kernels::Candle`], or off the CPU whatever is
    /// asked, it runs candle's convolution and tensor ops only.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        stride: usize,
        groups: usize,
        pad: PadMode,
        act: Activation,
        kernels: Kernels,
    ) -> Result<Self> {
        let (out_ch, in_per_group, kh, kw) = weight.dims4()?;
        if kh != kw {
            return Err(crate::Error::config("conv", format!("non-square kernel {kh}x{kw}")));
        }
        // A GPU has no lineside kernels: packing them would copy its weights
        // to the host for nothing.
        let kernels = if weight.device().is_cpu() { kernels } else { Kernels::Candle };
        let bias_vec = bias.to_vec1::<f32>()?;
        let kind = if kernels == Kernels::Candle {
            ConvKind::Candle
        } else if groups == out_ch && in_per_group == 1 && groups > 1 {
            ConvKind::Depthwise(DepthwiseConv::new(
                weight.flatten_all()?.to_vec1::<f32>()?,
                bias_vec.clone(),
                kh,
                stride,
                pad,
                act,
            ))
        } else if groups == 1 {
            let flat = weight.flatten_all()?.to_vec1::<f32>()?;
            ConvKind::Gemm(Box::new(GemmConv::new(
                flat,
                bias_vec.clone(),
                in_per_group,
                kh,
                stride,
                pad,
                act,
                GemmPath::Fastest,
            )))
        } else {
            ConvKind::Candle
        };
        debug_assert_eq!(out_ch, bias_vec.len());
        Ok(Self {
            weight,
            bias,
            bias_act: BiasAct { bias: bias_vec, act },
            kernel: kh,
            stride,
            groups,
            pad,
            act,
            kind,
            kernels,
        })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The layer's own activation.
    pub fn activation(&self) -> Activation {
        self.act
    }

    /// Runs the layer on an `[N, C, H, W]` batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let lineside = self.on_lineside(&x);
        let (_n, _c, h, w) = x.dims4()?;
        match (&self.kind, lineside) {
            (ConvKind::Depthwise(op), true) => Ok(x.apply_op1_no_bwd(op)?),
            (ConvKind::Gemm(op), true) => Ok(x.apply_op1_no_bwd(op.as_ref())?),
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
                self.add_bias_act(&x, lineside)
            }
        }
    }

    /// `act(self(x) + residual)`, the end of a residual block. On
    /// lineside's kernels, for a groups=1 layer without an activation of its own, the residual is
    /// added inside the GEMM's store: one pass over the output instead of
    /// three (convolution, add, activation).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor, act: Activation) -> Result<Tensor> {
        match &self.kind {
            ConvKind::Gemm(op) if self.on_lineside(x) && self.act == Activation::Identity => {
                let op = ConvAddAct { conv: op, act };
                Ok(x.contiguous()?.apply_op2_no_bwd(&residual.contiguous()?, &op)?)
            }
            _ => act.apply(&(self.forward(x)? + residual)?),
        }
    }

    /// The same layer on channels-last maps, fused with activation `act`:
    /// the layer's own, or the one that follows a residual added in the
    /// store. `None` where the CPU lacks the kernel, the layer is grouped or
    /// `act` is not one the kernel fuses.
    #[cfg(target_arch = "x86_64")]
    pub fn channels_last(&self, act: Activation) -> Result<Option<nhwc_conv::NhwcConv>> {
        if self.groups != 1 || act == Activation::Silu {
            return Ok(None);
        }
        let weight = self.weight.flatten_all()?.to_vec1::<f32>()?;
        let (_, cin, _, _) = self.weight.dims4()?;
        Ok(nhwc_conv::NhwcConv::new(&weight, &self.bias_act.bias, cin, self.kernel, self.stride, self.pad, act.fused()))
    }

    /// [`Self::channels_last`], switching to Winograd's F(2×2, 3×3) or
    /// F(4×4, 3×3) on the maps where that pays, for a 3×3, stride-1, padding-1 layer
    /// ([`winograd`]); the direct kernel only for any other.
    #[cfg(target_arch = "x86_64")]
    pub fn channels_last_switching(&self, act: Activation) -> Result<Option<winograd::Switching>> {
        let Some(direct) = self.channels_last(act)? else { return Ok(None) };
        let fits = self.kernel == 3 && self.stride == 1 && self.pad == PadMode::Symmetric(1);
        let build = fits.then(|| {
            // The folded weight stays in this layer's tensor until a map
            // needs the Winograd form.
            let (weight, bias) = (self.weight.clone(), self.bias_act.bias.clone());
            let cin = direct.in_channels();
            let fused = act.fused();
            Box::new(move |tile| {
                let weight = weight
                    .flatten_all()
                    .and_then(|w| w.to_vec1::<f32>())
                    .inspect_err(|e| tracing::warn!("3×3 layer stays on the direct kernel: {e}"))
                    .ok()?;
                winograd::Winograd::new(&weight, &bias, cin, fused, tile)
            }) as winograd::Build
        });
        Ok(Some(winograd::Switching::new(direct, build)))
    }

    /// The same depthwise layer on channels-last maps, with its own
    /// activation. `None` where the CPU lacks the kernel, the layer is not
    /// depthwise, its kernel is not 3×3 or 5×5, or its activation is not one
    /// the kernel fuses.
    #[cfg(target_arch = "x86_64")]
    pub fn channels_last_depthwise(&self) -> Result<Option<nhwc_depthwise::NhwcDepthwise>> {
        if !matches!(self.kind, ConvKind::Depthwise(_)) || self.act == Activation::Silu {
            return Ok(None);
        }
        let weight = self.weight.flatten_all()?.to_vec1::<f32>()?;
        Ok(nhwc_depthwise::NhwcDepthwise::new(
            &weight,
            &self.bias_act.bias,
            self.kernel,
            self.stride,
            self.pad,
            self.act.fused(),
        ))
    }

    /// Frees the NCHW GEMM's packed weights of a layer whose network runs
    /// it through [`ConvBnAct::channels_last`] on CPU; the layer itself then
    /// runs as candle's convolution (other devices, and tests).
    pub fn drop_cpu_kernel(&mut self) {
        if matches!(self.kind, ConvKind::Gemm(_)) {
            self.kind = ConvKind::Candle;
        }
    }

    /// Whether `x` runs on lineside's kernels, not candle's ops (a GPU, or
    /// [`Kernels::Candle`]).
    fn on_lineside(&self, x: &Tensor) -> bool {
        x.device().is_cpu() && self.kernels == Kernels::Lineside
    }

    fn add_bias_act(&self, y: &Tensor, lineside: bool) -> Result<Tensor> {
        if lineside {
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

/// Helpers shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod test_util {
    /// Deterministic values in [-1, 1].
    pub fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// GFLOP/s of `f`, which does `flops`: the best of 5 timed rounds of
    /// about `budget` flops each, after a warm-up call.
    pub fn gflops(flops: f64, budget: f64, f: &mut dyn FnMut()) -> f64 {
        f();
        let reps = ((budget / flops) as usize).clamp(3, 2000);
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                f();
            }
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        flops / best / 1e9
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
            let layer =
                ConvBnAct::new(wt.clone(), b.clone(), s, c, mode, Activation::Relu6, Kernels::Lineside).unwrap();
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
        let layer =
            ConvBnAct::new(wt.clone(), b.clone(), 1, 1, PadMode::Symmetric(0), Activation::Silu, Kernels::Lineside)
                .unwrap();
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
            (2, 3, 3, 20, 17, PadMode::Symmetric(1)),
        ] {
            let (cin, cout) = (5, 7);
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let layer = ConvBnAct::new(wt.clone(), b.clone(), s, 1, mode, Activation::Relu, Kernels::Lineside).unwrap();
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

    /// The residual fused into the convolution's store gives what the
    /// three separate ops give, on the per-image and whole-batch paths and
    /// for both the packed kernel and the portable GEMMs.
    #[test]
    fn residual_in_the_store_matches_separate_ops() {
        let dev = Device::Cpu;
        for &(n, k, s, h, w) in
            &[(2, 3, 1, 40, 36), (3, 3, 1, 9, 8), (2, 1, 1, 40, 40), (4, 1, 1, 6, 5), (2, 3, 2, 30, 33)]
        {
            let (cin, cout) = (6, 9);
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let mode = PadMode::timm_default(k, s);
            let layer =
                ConvBnAct::new(wt.clone(), b.clone(), s, 1, mode, Activation::Identity, Kernels::Lineside).unwrap();
            let y = layer.forward(&x).unwrap();
            let res = Tensor::randn(0f32, 1.0, y.dims(), &dev).unwrap();
            for act in [Activation::Identity, Activation::Relu, Activation::Relu6, Activation::Silu] {
                let want = act.apply(&(&y + &res).unwrap()).unwrap();
                let flat = wt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let bias = b.to_vec1::<f32>().unwrap();
                for path in [GemmPath::Fastest, GemmPath::Portable] {
                    let conv = GemmConv::new(flat.clone(), bias.clone(), cin, k, s, mode, Activation::Identity, path);
                    let got = x.apply_op2_no_bwd(&res, &ConvAddAct { conv: &conv, act }).unwrap();
                    let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(err < 1e-4, "n{n} k{k} s{s} {h}x{w} {act:?} {path:?}: max err {err}");
                }
                let got = layer.forward_residual(&x, &res, act).unwrap();
                let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < 1e-4, "forward_residual n{n} k{k} s{s} {h}x{w} {act:?}: max err {err}");
            }
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
