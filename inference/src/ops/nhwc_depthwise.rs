//! Depthwise convolutions on channels-last (NHWC) maps.
//!
//! In NHWC one tap of a depthwise kernel is a run of consecutive channels,
//! so a 16-lane vector holds 16 channels of one pixel: the kernel needs no
//! padded copy and no split of the input by stride phase, as the NCHW
//! kernel ([`super::DepthwiseConv`]) does. A tap outside the image reads a
//! zeroed row. For each block of 16 channels the `K×K` weight vectors stay
//! in registers (K = 3 or 5) while the kernel walks the output row, so each
//! tap is one load and one FMA.
//!
//! Built on x86-64 only; [`NhwcDepthwise::new`] returns `None` on CPUs
//! without AVX-512F.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::nhwc_conv::Nhwc;
use super::sgemm::{self, Fused};
use super::{PadMode, Padding, out_size};

/// A depthwise convolution with folded BatchNorm, on NHWC maps.
#[derive(Debug, Clone)]
pub struct NhwcDepthwise {
    /// `[k·k][c]`: one tap's channels contiguous, like the input's.
    weights: Vec<f32>,
    bias: Vec<f32>,
    kernel: usize,
    stride: usize,
    pad: PadMode,
    act: Fused,
}

impl NhwcDepthwise {
    /// From a folded weight `[c, 1, k, k]` (flattened) and bias, or `None`
    /// where the CPU has no AVX-512F or `k` is not 3 or 5.
    pub fn new(weight: &[f32], bias: &[f32], kernel: usize, stride: usize, pad: PadMode, act: Fused) -> Option<Self> {
        if !sgemm::available() || !matches!(kernel, 3 | 5) {
            return None;
        }
        let (c, taps) = (bias.len(), kernel * kernel);
        assert_eq!(weight.len(), c * taps, "depthwise weight shape");
        let mut weights = vec![0f32; taps * c];
        for ch in 0..c {
            for t in 0..taps {
                weights[t * c + ch] = weight[ch * taps + t];
            }
        }
        Some(Self { weights, bias: bias.to_vec(), kernel, stride, pad, act })
    }

    /// Channels in and out.
    pub fn channels(&self) -> usize {
        self.bias.len()
    }

    /// `act(depthwise(x) + bias)`, NHWC in and out.
    pub fn forward(&self, x: &Nhwc) -> Nhwc {
        let c = self.channels();
        assert_eq!(x.c, c, "input channels");
        let (k, s) = (self.kernel, self.stride);
        let p = self.pad.resolve(x.h, x.w, k, s);
        let (oh, ow) = (out_size(x.h, k, s, p.top, p.bottom), out_size(x.w, k, s, p.left, p.right));
        let mut data: Box<[MaybeUninit<f32>]> = Box::new_uninit_slice(x.n * oh * ow * c);
        let zeros = vec![0f32; c];
        let geometry = Geometry { x, p, oh, ow, zeros: &zeros };
        if ow * c > 0 {
            data.par_chunks_mut(ow * c).enumerate().for_each(|(r, row)| {
                // SAFETY: `new` checked AVX-512F and set `kernel`; `x.c == c`
                // (asserted above) and `zeros` holds `c`; `row` is output row
                // `r < n·oh` of `ow × c` floats, written whole.
                unsafe {
                    match k {
                        3 => avx512::row::<3>(self, &geometry, r, row.as_mut_ptr().cast()),
                        _ => avx512::row::<5>(self, &geometry, r, row.as_mut_ptr().cast()),
                    }
                }
            });
        }
        // SAFETY: every output row was written whole above.
        let data = unsafe { data.assume_init() }.into_vec();
        Nhwc { data, n: x.n, h: oh, w: ow, c }
    }
}

/// One call's shapes.
struct Geometry<'a> {
    x: &'a Nhwc,
    p: Padding,
    oh: usize,
    ow: usize,
    /// `c` zeros: what a tap outside the image reads.
    zeros: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Fused, Geometry, NhwcDepthwise};

    /// Output row `r` (image `r / oh`, row `r % oh`) into `out`.
    ///
    /// # Safety
    /// AVX-512F; `op.kernel == K`; `x.c == op.channels()`; `g.zeros` holds
    /// `c` floats; `r < n · oh`; `out` holds `ow × c` floats.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn row<const K: usize>(op: &NhwcDepthwise, g: &Geometry, r: usize, out: *mut f32) {
        let x = g.x;
        let (c, s) = (x.c, op.stride);
        let (img, oy) = (r / g.oh, r % g.oh);
        // The input row under each kernel row, or `None` in the padding.
        let rows: [Option<&[f32]>; K] = std::array::from_fn(|ky| {
            let iy = (oy * s + ky).checked_sub(g.p.top).filter(|&iy| iy < x.h)?;
            Some(&x.data[(img * x.h + iy) * x.w * c..][..x.w * c])
        });
        let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
        for cb in (0..c).step_by(16) {
            let n = (c - cb).min(16);
            let m: __mmask16 = if n == 16 { 0xffff } else { ((1u32 << n) - 1) as u16 };
            // SAFETY (all loads and stores below): masked to the `n` lanes
            // from `cb`, inside a pixel's `c` channels of the input row, of
            // `zeros`, of the weights' tap row, or of the output pixel.
            unsafe {
                let w: [[__m512; K]; K] = std::array::from_fn(|ky| {
                    std::array::from_fn(|kx| _mm512_maskz_loadu_ps(m, op.weights.as_ptr().add((ky * K + kx) * c + cb)))
                });
                let bias = _mm512_maskz_loadu_ps(m, op.bias.as_ptr().add(cb));
                for ox in 0..g.ow {
                    let mut acc = bias;
                    for (row, w) in rows.iter().zip(&w) {
                        for (kx, &w) in w.iter().enumerate() {
                            let ix = (ox * s + kx).wrapping_sub(g.p.left);
                            let tap = match row {
                                Some(row) if ix < x.w => row.as_ptr().add(ix * c + cb),
                                _ => g.zeros.as_ptr().add(cb),
                            };
                            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, tap), w, acc);
                        }
                    }
                    acc = match op.act {
                        Fused::None => acc,
                        Fused::Relu => _mm512_max_ps(acc, zero),
                        Fused::Relu6 => _mm512_min_ps(_mm512_max_ps(acc, zero), six),
                    };
                    _mm512_mask_storeu_ps(out.add(ox * c + cb), m, acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::ops::test_util::values;

    /// Against candle's grouped convolution: 3×3 and 5×5, strides 1 and 2,
    /// symmetric and TF "SAME" padding, channel counts off the 16 lanes,
    /// odd map sizes, each fused activation.
    #[test]
    fn matches_candle_conv() {
        if !sgemm::available() {
            eprintln!("no AVX-512F: skipped");
            return;
        }
        let cases = [
            (2, 24, 9, 7, 3, 1, PadMode::Symmetric(1), Fused::Relu6),
            (1, 35, 8, 11, 3, 2, PadMode::Symmetric(1), Fused::None),
            (3, 16, 10, 10, 5, 2, PadMode::TfSame, Fused::Relu),
            (1, 40, 7, 9, 5, 1, PadMode::Symmetric(2), Fused::Relu6),
            (1, 7, 4, 5, 3, 2, PadMode::TfSame, Fused::None),
        ];
        for (i, &(n, c, h, w, k, s, pad, act)) in cases.iter().enumerate() {
            let x = values(n * c * h * w, 3 + i as u32);
            let wt = values(c * k * k, 7 + i as u32);
            let bias = values(c, 11 + i as u32);
            let op = NhwcDepthwise::new(&wt, &bias, k, s, pad, act).unwrap();
            let got = op.forward(&Nhwc::from_nchw(&x, n, c, h, w));

            let dev = Device::Cpu;
            let p = pad.resolve(h, w, k, s);
            let xt = Tensor::from_vec(x, (n, c, h, w), &dev).unwrap();
            let xt = xt.pad_with_zeros(2, p.top, p.bottom).unwrap().pad_with_zeros(3, p.left, p.right).unwrap();
            let wt = Tensor::from_vec(wt, (c, 1, k, k), &dev).unwrap();
            let y = xt.conv2d(&wt, 0, s, 1, c).unwrap();
            let y = y.broadcast_add(&Tensor::from_vec(bias, (1, c, 1, 1), &dev).unwrap()).unwrap();
            let y = match act {
                Fused::None => y,
                Fused::Relu => y.relu().unwrap(),
                Fused::Relu6 => y.clamp(0f32, 6f32).unwrap(),
            };
            assert_eq!((got.n, got.c, got.h, got.w), y.dims4().unwrap(), "case {i}");
            let want = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = got.to_nchw().iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "case {i}: max err {err}");
        }
    }
}
