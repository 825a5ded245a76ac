//! Depthwise convolution (one filter per channel) with fused bias and
//! activation, NCHW, f32, CPU.
//!
//! candle would split a depthwise convolution into one convolution per
//! channel. Here each channel plane is convolved directly through a
//! zero-padded scratch copy: on AVX-512F CPUs sixteen outputs at a time from
//! a copy split by row and column phase, so that no tap needs a mask or a
//! permute ([`avx512::plane`]); elsewhere from a copy split by column phase.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::assume_init;
use super::{Activation, PadMode, Padding, Uninit, contiguous_f32, finish, out_size, sgemm, uninit_output, zeroed};

/// Input height and width, output width and padding of one depthwise plane.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub h: usize,
    pub w: usize,
    pub ow: usize,
    pub pad: Padding,
}

/// Direct depthwise convolution with fused bias and activation (NCHW, f32, CPU).
#[derive(Debug, Clone)]
pub struct DepthwiseConv {
    /// `[channels * k * k]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    pub(super) kernel: usize,
    pub(super) stride: usize,
    pub(super) pad: PadMode,
    pub(super) act: Activation,
    /// Whether the AVX-512 plane kernel runs (detected at construction).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) simd: bool,
}

impl DepthwiseConv {
    /// A layer from `[channels·k·k]` weights and one bias per channel.
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, kernel: usize, stride: usize, pad: PadMode, act: Activation) -> Self {
        assert_eq!(weight.len(), bias.len() * kernel * kernel, "depthwise weights are not [channels·k·k]");
        // The AVX-512 plane kernel is built for the sizes the models use.
        let simd = sgemm::available() && matches!(kernel, 3 | 5) && matches!(stride, 1 | 2);
        Self { weight, bias, kernel, stride, pad, act, simd }
    }

    /// One channel's plane on the portable path (no AVX-512F, or a kernel
    /// size or stride the AVX-512 kernel lacks). The input is first copied,
    /// zero-padded, into `scratch`, split by column phase (`x mod stride`),
    /// so that every tap of every output row reads a contiguous, in-bounds
    /// run; a row's taps are then summed in one pass per kernel row
    /// ([`fma_rows`]).
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

#[cfg(target_arch = "x86_64")]
impl DepthwiseConv {
    fn simd_plane(&self, ch: usize, g: Geometry) -> avx512::Plane<'_> {
        let k = self.kernel;
        avx512::Plane {
            h: g.h,
            w: g.w,
            ow: g.ow,
            pad: g.pad,
            kernel: k,
            stride: self.stride,
            weight: &self.weight[ch * k * k..(ch + 1) * k * k],
            bias: self.bias[ch],
            act: self.act.fused(),
        }
    }

    fn plane_simd(&self, ch: usize, x: &[f32], g: Geometry, scratch: &mut Vec<f32>, out: &mut Uninit) {
        let p = self.simd_plane(ch, g);
        let len = p.phases().len();
        if scratch.len() < len {
            scratch.resize(len, 0.0);
        }
        // SAFETY: `simd` is set only where AVX-512F was detected, with the
        // kernel size and stride the plane kernel supports; `scratch` holds
        // the phases.
        unsafe {
            p.phases().write(x, 0..p.phases().body(), scratch);
            avx512::plane(&p, scratch, out);
        }
        self.finish_simd(out);
    }

    fn finish_simd(&self, out: &mut Uninit) {
        if self.act == Activation::Silu {
            // SAFETY: the plane kernel wrote every element.
            self.act.apply_slice(unsafe { assume_init(out) });
        }
    }
}

impl DepthwiseConv {
    /// Channel `ch`'s output plane from its input plane `x`, on the AVX-512
    /// kernel where it runs; `scratch` is reused between calls.
    pub(super) fn plane_into(&self, ch: usize, x: &[f32], g: Geometry, scratch: &mut Vec<f32>, out: &mut Uninit) {
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            return self.plane_simd(ch, x, g, scratch, out);
        }
        self.plane(ch, x, g, scratch, zeroed(out));
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
        let mut out = uninit_output(n * c * oh * ow);
        let g = Geometry { h, w, ow, pad };
        out.par_chunks_mut(oh * ow).enumerate().for_each_init(Vec::new, |scratch, (plane, o)| {
            self.plane_into(plane % c, &inp[plane * h * w..(plane + 1) * h * w], g, scratch, o);
        });
        // SAFETY: both plane kernels write every element of their plane.
        Ok((CpuStorage::F32(unsafe { finish(out) }), Shape::from((n, c, oh, ow))))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use std::mem::MaybeUninit;
    use std::ops::Range;

    use super::{Geometry, Padding};
    use crate::ops::sgemm::Fused;
    use crate::ops::sgemm::avx512::{shifted_copy, stride2_copy};

    /// One channel plane's geometry and its filter.
    #[derive(Debug)]
    pub struct Plane<'a> {
        pub h: usize,
        pub w: usize,
        pub ow: usize,
        pub pad: Padding,
        pub kernel: usize,
        pub stride: usize,
        pub weight: &'a [f32],
        pub bias: f32,
        pub act: Fused,
    }

    /// The zero-padded plane split into `stride²` phases (row and column
    /// parity at stride 2), each `rows × pitch`, followed by slack. At stride
    /// `S`, output `(oy, ox)`'s tap `(ky, kx)` then reads phase
    /// `(ky mod S, kx mod S)` at `(oy + ky/S)·pitch + ox + kx/S`: every tap
    /// of sixteen neighbouring outputs is one plain unaligned load, with no
    /// masks, bounds checks or permutes in the inner loop.
    #[derive(Debug, Clone, Copy)]
    pub struct Phases {
        /// The convolution's stride: `stride²` phases.
        pub stride: usize,
        /// Rows of one phase.
        pub rows: usize,
        /// Floats per row of a phase.
        pub pitch: usize,
        kernel: usize,
        pad: Padding,
        h: usize,
        w: usize,
    }

    impl Plane<'_> {
        /// The phase layout this plane's kernel reads.
        pub fn phases(&self) -> Phases {
            Phases::new(Geometry { h: self.h, w: self.w, ow: self.ow, pad: self.pad }, self.stride, self.kernel)
        }
    }

    impl Phases {
        /// The layout for a plane of `g` under a `kernel`×`kernel`, `stride` filter.
        pub fn new(g: Geometry, stride: usize, kernel: usize) -> Self {
            Self {
                stride,
                rows: (g.h + g.pad.top + g.pad.bottom).div_ceil(stride),
                pitch: (g.w + g.pad.left + g.pad.right).div_ceil(stride),
                kernel,
                pad: g.pad,
                h: g.h,
                w: g.w,
            }
        }

        /// Floats of the phases themselves.
        pub fn body(&self) -> usize {
            self.stride * self.stride * self.rows * self.pitch
        }

        /// Floats the kernel may read: the body, then slack for the last
        /// chunk of a row, which loads up to 15 lanes past the row.
        pub fn len(&self) -> usize {
            self.body() + 16 + self.kernel
        }

        /// Writes one phase row of column phase `qx` from column `cx0` on
        /// into `dst`: from `src`, the plane's row under it, or zeros where
        /// that is a padding row (`None`).
        ///
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn phase_row(&self, src: Option<&[f32]>, qx: usize, cx0: usize, dst: &mut [f32]) {
            debug_assert!(self.stride <= 2, "phases exist for strides 1 and 2");
            let Some(src) = src else { return dst.fill(0.0) };
            let start = (cx0 * self.stride + qx) as isize - self.pad.left as isize;
            // SAFETY: the caller has AVX-512F.
            unsafe { if self.stride == 1 { shifted_copy(dst, src, start) } else { stride2_copy(dst, src, start) } }
        }

        /// The input row under phase row `r` of phase `(qy, ·)`, if any.
        pub fn input_row(&self, qy: usize, r: usize) -> Option<usize> {
            (r * self.stride + qy).checked_sub(self.pad.top).filter(|&y| y < self.h)
        }

        /// Writes body positions `cols` into `dst` (as long as `cols`) from
        /// the plane `x`, one phase row at a time.
        ///
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn write(&self, x: &[f32], cols: Range<usize>, dst: &mut [f32]) {
            let (s, size) = (self.stride, self.rows * self.pitch);
            let mut j = cols.start;
            while j < cols.end {
                let (phase, at) = (j / size, j % size);
                let (row, cx) = (at / self.pitch, at % self.pitch);
                let n = (self.pitch - cx).min(cols.end - j);
                let src = self.input_row(phase / s, row).map(|y| &x[y * self.w..][..self.w]);
                // SAFETY: the caller has AVX-512F.
                unsafe { self.phase_row(src, phase % s, cx, &mut dst[j - cols.start..][..n]) };
                j += n;
            }
        }
    }

    /// Sixteen outputs of a row at a time, from the phase-split copy of the
    /// plane ([`Phases`], filled): each of the k·k taps is one load and one
    /// FMA into one of `k` accumulators (one per kernel row, so the FMA
    /// latency overlaps). The last chunk of a row computes sixteen lanes and
    /// stores only the row's.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `kernel` is 3 or 5 and `stride` 1 or 2;
    /// `phases` holds at least `p.phases().len()` floats.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn plane(p: &Plane, phases: &[f32], out: &mut [MaybeUninit<f32>]) {
        match (p.kernel, p.stride) {
            (3, 1) => plane_k::<3, 1>(p, phases, out),
            (3, 2) => plane_k::<3, 2>(p, phases, out),
            (5, 1) => plane_k::<5, 1>(p, phases, out),
            (5, 2) => plane_k::<5, 2>(p, phases, out),
            (k, s) => unreachable!("no AVX-512 depthwise kernel for k{k} s{s}"),
        }
    }

    #[target_feature(enable = "avx512f")]
    fn plane_k<const K: usize, const S: usize>(p: &Plane, phases: &[f32], out: &mut [MaybeUninit<f32>]) {
        debug_assert_eq!(p.weight.len(), K * K);
        let ph = p.phases();
        assert!(phases.len() >= ph.len(), "the phases are too short");
        // The loads below are unchecked: the output must be the plane's.
        let oh = (p.h + p.pad.top + p.pad.bottom - K) / S + 1;
        assert!(p.ow == (p.w + p.pad.left + p.pad.right - K) / S + 1 && out.len() == oh * p.ow, "bad output size");
        let size = ph.rows * ph.pitch;
        let offset: [[usize; K]; K] = std::array::from_fn(|ky| {
            std::array::from_fn(|kx| ((ky % S) * S + kx % S) * size + (ky / S) * ph.pitch + kx / S)
        });
        let taps: [[__m512; K]; K] =
            std::array::from_fn(|ky| std::array::from_fn(|kx| _mm512_set1_ps(p.weight[ky * K + kx])));
        let (zero, six, bias) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0), _mm512_set1_ps(p.bias));
        let base = phases.as_ptr();
        for (oy, orow) in out.chunks_mut(p.ow).enumerate() {
            for (c, chunk) in orow.chunks_mut(16).enumerate() {
                let at = oy * ph.pitch + c * 16;
                let mut acc = [_mm512_setzero_ps(); K];
                // Constant indices and no closures (which would not inherit
                // AVX-512), so the loops unroll and `acc` stays in registers.
                #[allow(clippy::needless_range_loop)]
                for ky in 0..K {
                    for kx in 0..K {
                        // SAFETY: `at + offset + 16` is at most `len`: the
                        // output row's taps lie inside the phases, and a
                        // chunk reads at most 15 lanes past the row.
                        let v = unsafe { _mm512_loadu_ps(base.add(at + offset[ky][kx])) };
                        acc[ky] = _mm512_fmadd_ps(v, taps[ky][kx], acc[ky]);
                    }
                }
                let mut sum = bias;
                for a in acc {
                    sum = _mm512_add_ps(sum, a);
                }
                sum = match p.act {
                    Fused::None => sum,
                    Fused::Relu => _mm512_max_ps(sum, zero),
                    Fused::Relu6 => _mm512_min_ps(_mm512_max_ps(sum, zero), six),
                };
                let store = if chunk.len() >= 16 { 0xffff } else { ((1u32 << chunk.len()) - 1) as u16 };
                // SAFETY: only the lanes in `store` are written, inside `chunk`.
                unsafe { _mm512_mask_storeu_ps(chunk.as_mut_ptr().cast(), store, sum) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The AVX-512 plane kernel and the portable one agree on every kernel
    /// size, stride and padding the models use, and on planes narrower and
    /// wider than sixteen lanes.
    #[test]
    fn simd_and_portable_planes_agree() {
        let dev = Device::Cpu;
        for &(k, s, h, w, pad) in &[
            (3, 1, 7, 7, PadMode::Symmetric(1)),
            (3, 2, 41, 37, PadMode::Symmetric(1)),
            (3, 2, 40, 40, PadMode::TfSame),
            (5, 1, 19, 33, PadMode::Symmetric(2)),
            (5, 2, 28, 28, PadMode::TfSame),
            (3, 1, 4, 3, PadMode::Symmetric(1)),
        ] {
            let c = 5;
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev).unwrap();
            let wt: Vec<f32> = Tensor::randn(0f32, 1.0, c * k * k, &dev).unwrap().to_vec1().unwrap();
            let b: Vec<f32> = Tensor::randn(0f32, 1.0, c, &dev).unwrap().to_vec1().unwrap();
            for act in [Activation::Relu6, Activation::Silu, Activation::Identity] {
                let fast = DepthwiseConv::new(wt.clone(), b.clone(), k, s, pad, act);
                let portable = DepthwiseConv { simd: false, ..fast.clone() };
                let (y1, y2) = (x.apply_op1_no_bwd(&fast).unwrap(), x.apply_op1_no_bwd(&portable).unwrap());
                let err = (y1 - y2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < 1e-5, "k{k} s{s} {h}×{w} {pad:?} {act:?}: max err {err}");
            }
        }
    }
}
