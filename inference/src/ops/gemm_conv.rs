//! Dense convolutions as GEMMs that write straight into the NCHW output.
//!
//! `out[img] = W · cols(x[img]) + bias`, with `W` as `[out, in·k·k]` and
//! `cols` the im2col matrix `[in·k·k, oh·ow]`. The bias is written into the
//! output first and the GEMM accumulates onto it (`read_dst`), so bias costs
//! no extra pass; the activation runs in place afterwards. A 1×1 stride-1
//! convolution needs no im2col: the image already is the right-hand matrix.
//!
//! Small feature maps (deep layers) make thin GEMMs that the microkernel
//! handles poorly one image at a time, so below [`BATCHED_BELOW`] pixels the
//! whole batch is one GEMM over `[in·k·k, n·oh·ow]`, scattered back to NCHW.
//! Two GEMM crates serve, each for the shapes it is faster on ([`WIDE`]).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{Activation, PadMode, Padding, contiguous_f32, out_size};

/// Output planes smaller than this run as one GEMM for the whole batch.
const BATCHED_BELOW: usize = 1024;

/// GEMMs with at least this many columns run on `matrixmultiply`, narrower
/// ones on `gemm`. Measured here (2 threads, AVX-512 machine, GFLOP/s,
/// `matrixmultiply` vs `gemm`): 64×576×3136 66 vs 51, 128×1152×784 102 vs 65,
/// 256×2304×196 86 vs 59, 512³ 159 vs 71, but 512×4608×49 29 vs 50.
const WIDE: usize = 128;

/// A groups=1 convolution with folded BatchNorm and an activation (f32, CPU).
#[derive(Debug, Clone)]
pub struct GemmConv {
    /// `[out, in·k·k]`, row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    out_ch: usize,
    in_ch: usize,
    kernel: usize,
    stride: usize,
    pad: PadMode,
    act: Activation,
}

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    pad: Padding,
}

impl GemmConv {
    pub fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        in_ch: usize,
        kernel: usize,
        stride: usize,
        pad: PadMode,
        act: Activation,
    ) -> Self {
        let out_ch = bias.len();
        debug_assert_eq!(weight.len(), out_ch * in_ch * kernel * kernel);
        Self { weight, bias, out_ch, in_ch, kernel, stride, pad, act }
    }

    fn pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1
    }

    fn k_dim(&self) -> usize {
        self.in_ch * self.kernel * self.kernel
    }

    /// Row `r` (`(ci·k + ky)·k + kx`) of one image's im2col matrix, into `dst` (`oh·ow`).
    fn im2col_row(&self, x: &[f32], d: Dims, r: usize, dst: &mut [f32]) {
        let (k, s) = (self.kernel, self.stride);
        let (ci, ky, kx) = (r / (k * k), (r / k) % k, r % k);
        let plane = &x[ci * d.h * d.w..(ci + 1) * d.h * d.w];
        // Output columns whose input column `ox·s + kx − left` lies inside the row.
        let lo = d.pad.left.saturating_sub(kx).div_ceil(s);
        let hi = (d.w + d.pad.left).saturating_sub(kx).div_ceil(s).min(d.ow);
        for (oy, out) in dst.chunks_mut(d.ow).enumerate() {
            let iy = (oy * s + ky) as isize - d.pad.top as isize;
            if iy < 0 || iy >= d.h as isize || lo >= hi {
                out.fill(0.0);
                continue;
            }
            let row = &plane[iy as usize * d.w..(iy as usize + 1) * d.w];
            out[..lo].fill(0.0);
            out[hi..].fill(0.0);
            let first = lo * s + kx - d.pad.left;
            if s == 1 {
                out[lo..hi].copy_from_slice(&row[first..first + (hi - lo)]);
            } else {
                for (j, o) in out[lo..hi].iter_mut().enumerate() {
                    *o = row[first + j * s];
                }
            }
        }
    }

    /// `dst[out × cols] = bias + W · rhs[k × cols]`, then the activation.
    fn gemm_bias_act(&self, rhs: &[f32], cols: usize, dst: &mut [f32]) {
        let k = self.k_dim();
        assert_eq!(rhs.len(), k * cols);
        assert_eq!(dst.len(), self.out_ch * cols);
        for (row, b) in dst.chunks_mut(cols).zip(&self.bias) {
            row.fill(*b);
        }
        if cols >= WIDE {
            // SAFETY: as below; matrixmultiply takes the same row-major slices.
            unsafe {
                matrixmultiply::sgemm(
                    self.out_ch,
                    k,
                    cols,
                    1.0,
                    self.weight.as_ptr(),
                    k as isize,
                    1,
                    rhs.as_ptr(),
                    cols as isize,
                    1,
                    1.0,
                    dst.as_mut_ptr(),
                    cols as isize,
                    1,
                );
            }
        } else {
            self.gemm_narrow(rhs, cols, dst);
        }
        if self.act != Activation::Identity {
            dst.par_chunks_mut(cols.max(4096)).for_each(|r| self.act.apply_slice(r));
        }
    }

    /// The `gemm` crate, for few columns, where it is the faster of the two.
    fn gemm_narrow(&self, rhs: &[f32], cols: usize, dst: &mut [f32]) {
        let k = self.k_dim();
        let threads = rayon::current_num_threads();
        let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
        // SAFETY: the three matrices are row-major slices of exactly m·k, k·n
        // and m·n elements (checked above), and `dst` aliases neither input.
        unsafe {
            gemm::gemm(
                self.out_ch,
                cols,
                k,
                dst.as_mut_ptr(),
                1,
                cols as isize,
                true,
                self.weight.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                cols as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }

    /// One GEMM per image, written in place in the NCHW output.
    fn per_image(&self, inp: &[f32], n: usize, d: Dims, out: &mut [f32]) {
        let (ohw, chw) = (d.oh * d.ow, d.c * d.h * d.w);
        let mut cols = if self.pointwise() { Vec::new() } else { vec![0f32; self.k_dim() * ohw] };
        for img in 0..n {
            let x = &inp[img * chw..(img + 1) * chw];
            let rhs: &[f32] = if self.pointwise() {
                x
            } else {
                cols.par_chunks_mut(ohw).enumerate().for_each(|(r, dst)| self.im2col_row(x, d, r, dst));
                &cols
            };
            self.gemm_bias_act(rhs, ohw, &mut out[img * self.out_ch * ohw..(img + 1) * self.out_ch * ohw]);
        }
    }

    /// One GEMM for the whole batch over `[k, n·oh·ow]`, then scattered to NCHW.
    fn batched(&self, inp: &[f32], n: usize, d: Dims, out: &mut [f32]) {
        let (ohw, chw, cols_n) = (d.oh * d.ow, d.c * d.h * d.w, n * d.oh * d.ow);
        let mut cols = vec![0f32; self.k_dim() * cols_n];
        cols.par_chunks_mut(cols_n).enumerate().for_each(|(r, row)| {
            for (img, dst) in row.chunks_mut(ohw).enumerate() {
                self.im2col_row(&inp[img * chw..(img + 1) * chw], d, r, dst);
            }
        });
        let mut tmp = vec![0f32; self.out_ch * cols_n];
        self.gemm_bias_act(&cols, cols_n, &mut tmp);
        out.par_chunks_mut(ohw).enumerate().for_each(|(i, dst)| {
            let (img, oc) = (i / self.out_ch, i % self.out_ch);
            dst.copy_from_slice(&tmp[oc * cols_n + img * ohw..][..ohw]);
        });
    }
}

impl CustomOp1 for GemmConv {
    fn name(&self) -> &'static str {
        "lineside-gemm-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let inp = contiguous_f32(storage, layout)?;
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.in_ch {
            candle_core::bail!("convolution expects {} input channels, got {c}", self.in_ch);
        }
        let pad = self.pad.resolve(h, w, self.kernel, self.stride);
        let oh = out_size(h, self.kernel, self.stride, pad.top, pad.bottom);
        let ow = out_size(w, self.kernel, self.stride, pad.left, pad.right);
        let d = Dims { c, h, w, oh, ow, pad };
        let mut out = vec![0f32; n * self.out_ch * oh * ow];
        if n > 1 && oh * ow < BATCHED_BELOW {
            self.batched(inp, n, d, &mut out);
        } else {
            self.per_image(inp, n, d, &mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, self.out_ch, oh, ow))))
    }
}
