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
//!
//! Where the CPU has AVX-512F the weights are packed once at load time and
//! every GEMM runs on our own kernel ([`super::sgemm`]), with ReLU/ReLU6 fused
//! into its store. Elsewhere two GEMM crates serve, each for the shapes it is
//! faster on ([`WIDE`]).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

use std::ops::Range;

use super::sgemm::{self, Dense, Fused, PackedA, Rhs};
use super::{
    Activation, PadMode, Padding, Uninit, assume_init, contiguous_f32, finish, out_size, uninit_output, zeroed,
};

/// Output planes smaller than this run as one GEMM for the whole batch.
const BATCHED_BELOW: usize = 1024;

/// Without AVX-512, GEMMs with at least this many columns run on
/// `matrixmultiply`, narrower ones on `gemm`. Measured here (2 threads, AVX-512 machine, GFLOP/s,
/// `matrixmultiply` vs `gemm`): 64×576×3136 66 vs 51, 128×1152×784 102 vs 65,
/// 256×2304×196 86 vs 59, 512³ 159 vs 71, but 512×4608×49 29 vs 50.
const WIDE: usize = 128;

/// A groups=1 convolution with folded BatchNorm and an activation (f32, CPU).
#[derive(Debug, Clone)]
pub struct GemmConv {
    pub(super) weight: Weights,
    pub(super) bias: Vec<f32>,
    pub(super) out_ch: usize,
    pub(super) in_ch: usize,
    kernel: usize,
    stride: usize,
    pad: PadMode,
    pub(super) act: Activation,
}

/// A layer's `[out, in·k·k]` weight matrix, in the form its GEMM takes.
#[derive(Debug, Clone)]
pub(super) enum Weights {
    /// Packed for [`sgemm`] (AVX-512F CPUs).
    Packed(PackedA),
    /// Row-major, for the GEMM crates.
    Plain(Vec<f32>),
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

/// What happens to `W · B + bias` before it is stored: the residual added
/// (same shape as the output), then the activation.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    residual: Option<&'a [f32]>,
    act: Activation,
}

impl Epilogue<'_> {
    /// Adds the residual and applies the activation to a finished output.
    fn apply(&self, dst: &mut [f32]) {
        if let Some(res) = self.residual {
            dst.par_chunks_mut(4096).zip(res.par_chunks(4096)).for_each(|(d, r)| {
                d.iter_mut().zip(r).for_each(|(d, r)| *d += r);
                self.act.apply_slice(d);
            });
        } else if self.act != Activation::Identity {
            dst.par_chunks_mut(4096).for_each(|d| self.act.apply_slice(d));
        }
    }
}

/// Which GEMM a layer may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPath {
    /// The packed AVX-512 kernel where the CPU has it, else the GEMM crates.
    Fastest,
    /// The GEMM crates only (tests run it on AVX-512 machines too).
    Portable,
}

impl GemmConv {
    /// A layer from a row-major `[out, in·k·k]` weight matrix and one bias
    /// per output channel.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        in_ch: usize,
        kernel: usize,
        stride: usize,
        pad: PadMode,
        act: Activation,
        path: GemmPath,
    ) -> Self {
        let out_ch = bias.len();
        let k = in_ch * kernel * kernel;
        let packed = match path {
            GemmPath::Fastest => PackedA::new(&weight, out_ch, k),
            GemmPath::Portable => None,
        };
        let weight = match packed {
            Some(packed) => Weights::Packed(packed),
            None => Weights::Plain(weight),
        };
        Self { weight, bias, out_ch, in_ch, kernel, stride, pad, act }
    }

    pub(super) fn pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1
    }

    fn k_dim(&self) -> usize {
        self.in_ch * self.kernel * self.kernel
    }

    /// `dst[out × cols] = bias + W · rhs[k × cols]`, then the epilogue, on
    /// the GEMM crates (CPUs without AVX-512F).
    fn gemm_bias_act(&self, weight: &[f32], rhs: &[f32], cols: usize, dst: &mut [f32], epi: Epilogue) {
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
                    weight.as_ptr(),
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
            self.gemm_narrow(weight, rhs, cols, dst);
        }
        epi.apply(dst);
    }

    /// The `gemm` crate, for few columns, where it is the faster of the two.
    fn gemm_narrow(&self, weight: &[f32], rhs: &[f32], cols: usize, dst: &mut [f32]) {
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
                weight.as_ptr(),
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

    /// `out = epi(W · B + bias)` for a `B` of `k × cols`, written with row stride `cols`.
    fn gemm_from(&self, rhs: &impl Rhs, out: &mut Uninit, epi: Epilogue) {
        let cols = rhs.cols();
        match &self.weight {
            Weights::Packed(packed) => {
                let fused = epi.act.fused();
                sgemm::gemm(packed, rhs, out, cols, &self.bias, epi.residual, fused);
                if fused == Fused::None && epi.act != Activation::Identity {
                    // SAFETY: the GEMM wrote all of C.
                    let out = unsafe { assume_init(out) };
                    Epilogue { residual: None, act: epi.act }.apply(out);
                }
            }
            Weights::Plain(weight) => {
                // The GEMM crates take B as a matrix in memory: the image
                // itself for a 1×1 convolution, else its im2col matrix.
                if let Some(b) = rhs.stored() {
                    return self.gemm_bias_act(weight, b, cols, zeroed(out), epi);
                }
                let mut b = vec![0f32; rhs.rows() * cols];
                b.par_chunks_mut(cols)
                    .enumerate()
                    .for_each_init(|| vec![0f32; cols], |buf, (r, row)| row.copy_from_slice(rhs.row(r, 0..cols, buf)));
                self.gemm_bias_act(weight, &b, cols, zeroed(out), epi);
            }
        }
    }

    /// One GEMM per image, written in place in the NCHW output.
    fn per_image(&self, inp: &[f32], n: usize, d: Dims, out: &mut Uninit, epi: Epilogue) {
        let (ohw, chw) = (d.oh * d.ow, d.c * d.h * d.w);
        let out_len = self.out_ch * ohw;
        for img in 0..n {
            let x = &inp[img * chw..(img + 1) * chw];
            let o = &mut out[img * out_len..(img + 1) * out_len];
            let epi = Epilogue { residual: epi.residual.map(|r| &r[img * out_len..(img + 1) * out_len]), ..epi };
            if self.pointwise() {
                self.gemm_from(&Dense::new(x, d.c, ohw, ohw), o, epi);
            } else {
                self.gemm_from(&Im2col { conv: self, x, n: 1, d }, o, epi);
            }
        }
    }

    /// One GEMM for the whole batch over `[k, n·oh·ow]`, then scattered to
    /// NCHW. The residual is in NCHW, so it is added during the scatter.
    fn batched(&self, inp: &[f32], n: usize, d: Dims, out: &mut Uninit, epi: Epilogue) {
        let ohw = d.oh * d.ow;
        let mut tmp = uninit_output(self.out_ch * n * ohw);
        let in_gemm = match epi.residual {
            Some(_) => Epilogue { residual: None, act: Activation::Identity },
            None => epi,
        };
        self.gemm_from(&Im2col { conv: self, x: inp, n, d }, &mut tmp, in_gemm);
        // SAFETY: `gemm_from` wrote all of C.
        let tmp = unsafe { assume_init(&mut tmp) };
        out.par_chunks_mut(ohw).enumerate().for_each(|(i, dst)| {
            let (img, oc) = (i / self.out_ch, i % self.out_ch);
            let src = &tmp[oc * n * ohw + img * ohw..][..ohw];
            let dst = dst.write_copy_of_slice(src);
            if let Some(res) = epi.residual {
                dst.iter_mut().zip(&res[i * ohw..][..ohw]).for_each(|(d, r)| *d += r);
                epi.act.apply_slice(dst);
            }
        });
    }

    /// Runs the layer on an NCHW input, with `epi` applied to its output;
    /// `res_shape` is the shape of `epi`'s residual, if it has one.
    fn run(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        epi: Epilogue,
        res_shape: Option<&Shape>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inp = contiguous_f32(storage, layout)?;
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.in_ch {
            candle_core::bail!("convolution expects {} input channels, got {c}", self.in_ch);
        }
        let pad = self.pad.resolve(h, w, self.kernel, self.stride);
        let oh = out_size(h, self.kernel, self.stride, pad.top, pad.bottom);
        let ow = out_size(w, self.kernel, self.stride, pad.left, pad.right);
        let shape = Shape::from((n, self.out_ch, oh, ow));
        if let (Some(res), Some(res_shape)) = (epi.residual, res_shape)
            && (res_shape != &shape || res.len() != shape.elem_count())
        {
            candle_core::bail!("the residual is {res_shape:?}, the convolution's output {shape:?}");
        }
        let d = Dims { c, h, w, oh, ow, pad };
        let mut out = uninit_output(shape.elem_count());
        if n > 1 && oh * ow < BATCHED_BELOW {
            self.batched(inp, n, d, &mut out, epi);
        } else {
            self.per_image(inp, n, d, &mut out, epi);
        }
        // SAFETY: both paths write every output element (C is written whole,
        // per image or scattered from the batched result).
        Ok((CpuStorage::F32(unsafe { finish(out) }), shape))
    }
}

/// A convolution whose output gets a residual added before an activation:
/// `act(conv(x) + residual)`, the end of a ResNet or inverted-residual block.
/// Per image the residual is added in the GEMM's store; on the whole-batch
/// path (small maps) while the result is scattered back to NCHW. The
/// convolution's own activation must be the identity.
pub struct ConvAddAct<'a> {
    pub conv: &'a GemmConv,
    pub act: Activation,
}

impl CustomOp2 for ConvAddAct<'_> {
    fn name(&self) -> &'static str {
        "lineside-conv-add-act"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        residual: &CpuStorage,
        res_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if self.conv.act != Activation::Identity {
            candle_core::bail!("a convolution with its own activation ({:?}) cannot take a residual", self.conv.act);
        }
        let residual = contiguous_f32(residual, res_layout)?;
        let epi = Epilogue { residual: Some(residual), act: self.act };
        self.conv.run(x, x_layout, epi, Some(res_layout.shape()))
    }
}

/// The im2col matrix of a batch, produced a row segment at a time and never
/// stored: row `(ci·k + ky)·k + kx`, column `img·oh·ow + oy·ow + ox`.
struct Im2col<'a> {
    conv: &'a GemmConv,
    x: &'a [f32],
    n: usize,
    d: Dims,
}

impl Im2col<'_> {
    /// Row `r`'s input channel and kernel tap.
    fn tap(&self, r: usize) -> (usize, usize, usize) {
        let k = self.conv.kernel;
        (r / (k * k), (r / k) % k, r % k)
    }

    /// Whether rows are shifted copies of the plane ([`Self::same_size`]).
    fn is_same_size(&self) -> bool {
        self.conv.stride == 1 && (self.d.oh, self.d.ow) == (self.d.h, self.d.w)
    }

    /// A row of a stride-1 convolution whose output is the input's size: the
    /// image plane shifted by `(ky − top)·w + kx − left`, one copy per image
    /// (the top and bottom padding fall outside the plane and read as zero),
    /// then the columns that wrapped around a row's edge are zeroed.
    fn same_size(&self, (ci, ky, kx): (usize, usize, usize), cols: Range<usize>, out: &mut impl RowOut) {
        let d = self.d;
        let plane = d.h * d.w;
        let shift = (ky as isize - d.pad.top as isize) * d.w as isize + kx as isize - d.pad.left as isize;
        // Output columns `ox` whose input `ox + kx − left` is left of 0 or right of w.
        let (wrap_lo, wrap_hi) = (d.pad.left.saturating_sub(kx), (d.w + d.pad.left).saturating_sub(kx).min(d.w));
        let mut j = cols.start;
        while j < cols.end {
            let (img, p) = (j / plane, j % plane);
            let len = (plane - p).min(cols.end - j);
            out.copy(j - cols.start, len, &self.x[(img * d.c + ci) * plane..][..plane], p as isize + shift);
            // Zero the wrapped columns of every output row in `p..p + len`.
            let mut row_start = p - p % d.w;
            while row_start < p + len {
                for c in (0..wrap_lo).chain(wrap_hi..d.w).map(|ox| row_start + ox) {
                    if (p..p + len).contains(&c) {
                        out.zero(c - p + j - cols.start);
                    }
                }
                row_start += d.w;
            }
            j += len;
        }
    }
}

/// Where [`Im2col::same_size`] writes a row.
trait RowOut {
    /// `src[start + i]` (0 outside `src`) as row positions `at + i`, `i < len`.
    fn copy(&mut self, at: usize, len: usize, src: &[f32], start: isize);
    /// Clears row position `at`.
    fn zero(&mut self, at: usize);
}

/// The row as a plain slice.
struct Plain<'a>(&'a mut [f32]);

impl RowOut for Plain<'_> {
    fn copy(&mut self, at: usize, len: usize, src: &[f32], start: isize) {
        sgemm::padded_copy(&mut self.0[at..at + len], src, start, 1);
    }

    fn zero(&mut self, at: usize) {
        self.0[at] = 0.0;
    }
}

/// The row packed for the GEMM: `NR`-column slivers `stride` apart.
#[cfg(target_arch = "x86_64")]
struct Slivers<'a> {
    dst: &'a mut [f32],
    stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl RowOut for Slivers<'_> {
    fn copy(&mut self, at: usize, len: usize, src: &[f32], start: isize) {
        // SAFETY: packing runs only for the packed GEMM, which exists only
        // where the CPU has AVX-512F.
        unsafe { sgemm::avx512::shifted_to_slivers(self.dst, self.stride, at, len, src, start) };
    }

    fn zero(&mut self, at: usize) {
        self.dst[(at / sgemm::NR) * self.stride + at % sgemm::NR] = 0.0;
    }
}

impl Rhs for Im2col<'_> {
    fn rows(&self) -> usize {
        self.conv.k_dim()
    }

    fn cols(&self) -> usize {
        self.n * self.d.oh * self.d.ow
    }

    fn row<'b>(&'b self, r: usize, cols: Range<usize>, buf: &'b mut [f32]) -> &'b [f32] {
        let (s, d) = (self.conv.stride, self.d);
        let (ci, ky, kx) = self.tap(r);
        let (ohw, plane) = (d.oh * d.ow, d.h * d.w);
        if self.is_same_size() {
            self.same_size((ci, ky, kx), cols, &mut Plain(buf));
            return buf;
        }
        let (mut img, p) = (cols.start / ohw, cols.start % ohw);
        let (mut oy, mut ox0) = (p / d.ow, p % d.ow);
        let mut at = 0;
        while at < cols.len() {
            // One output row's worth of columns (or what is left of the range).
            let run = (d.ow - ox0).min(cols.len() - at);
            let dst = &mut buf[at..at + run];
            let iy = (oy * s + ky) as isize - d.pad.top as isize;
            if iy < 0 || iy >= d.h as isize {
                dst.fill(0.0);
            } else {
                // Input column `ox·s + kx − left`; the padding reads as zero.
                let src = &self.x[(img * d.c + ci) * plane + iy as usize * d.w..][..d.w];
                sgemm::padded_copy(dst, src, (ox0 * s + kx) as isize - d.pad.left as isize, s);
            }
            at += run;
            (ox0, oy) = (0, oy + 1);
            if oy == d.oh {
                (oy, img) = (0, img + 1);
            }
        }
        buf
    }

    #[cfg(target_arch = "x86_64")]
    fn pack_row(&self, r: usize, cols: Range<usize>, buf: &mut [f32], dst: &mut [f32], stride: usize) {
        if !self.is_same_size() {
            // SAFETY: as in `Rhs::pack_row`.
            return unsafe { sgemm::avx512::scatter_row(self.row(r, cols, buf), dst, stride) };
        }
        let mut out = Slivers { dst, stride };
        // The last sliver's columns past the row are zero.
        (cols.len()..cols.len().next_multiple_of(sgemm::NR)).for_each(|c| out.zero(c));
        self.same_size(self.tap(r), cols, &mut out);
    }
}

impl CustomOp1 for GemmConv {
    fn name(&self) -> &'static str {
        "lineside-gemm-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(storage, layout, Epilogue { residual: None, act: self.act }, None)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The packed kernel and the portable GEMM crates agree, on per-image
    /// and batched shapes, strides and both paddings.
    #[test]
    fn packed_and_portable_paths_agree() {
        let dev = Device::Cpu;
        for &(n, cin, cout, k, s, h, w, pad) in &[
            (2, 5, 7, 3, 1, 40, 36, PadMode::Symmetric(1)),
            (3, 16, 20, 3, 2, 41, 37, PadMode::Symmetric(1)),
            (2, 8, 13, 3, 2, 9, 8, PadMode::TfSame),
            (1, 3, 16, 7, 2, 30, 30, PadMode::Symmetric(3)),
            (4, 24, 40, 1, 2, 10, 10, PadMode::Symmetric(0)),
            (2, 70, 33, 1, 1, 40, 40, PadMode::Symmetric(0)),
            (3, 300, 9, 1, 1, 7, 7, PadMode::Symmetric(0)),
            (2, 4, 6, 3, 3, 20, 17, PadMode::Symmetric(1)),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev).unwrap();
            let wt: Vec<f32> = Tensor::randn(0f32, 1.0, cout * cin * k * k, &dev).unwrap().to_vec1().unwrap();
            let b: Vec<f32> = Tensor::randn(0f32, 1.0, cout, &dev).unwrap().to_vec1().unwrap();
            let run = |path| {
                let op = GemmConv::new(wt.clone(), b.clone(), cin, k, s, pad, Activation::Relu6, path);
                x.apply_op1_no_bwd(&op).unwrap()
            };
            let (fast, portable) = (run(GemmPath::Fastest), run(GemmPath::Portable));
            assert_eq!(fast.dims(), portable.dims());
            let err = (fast - portable).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-4, "n{n} {cin}→{cout} k{k} s{s} {h}×{w}: max err {err}");
        }
    }
}
