//! Depthwise convolutions on channels-last (NHWC) maps.
//!
//! In NHWC one tap of a depthwise kernel is a run of consecutive channels,
//! so a vector holds consecutive channels of one pixel: the kernel needs no
//! padded copy and no split of the input by stride phase, as the NCHW
//! kernel ([`super::DepthwiseConv`]) does. A tap outside the image reads a
//! zeroed row. For each block of channels (one register: 16 with AVX-512,
//! 8 with AVX2) the `K×K` weight vectors stay in registers (K = 3 or 5;
//! AVX2's 16 registers spill some of a 5×5's) while the kernel walks the
//! output row, so each tap is one load and one FMA.
//!
//! Built on x86-64 only; [`NhwcDepthwise::new`] returns `None` on CPUs
//! with neither AVX-512F nor AVX2 with FMA.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::nhwc_conv::Nhwc;
use super::sgemm::Fused;
use super::simd::Isa;
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
    /// What the kernel runs on.
    isa: Isa,
}

impl NhwcDepthwise {
    /// From a folded weight `[c, 1, k, k]` (flattened) and bias, for the
    /// widest instruction set this CPU runs, or `None` where it has neither
    /// AVX-512F nor AVX2 with FMA, or `k` is not 3 or 5.
    pub fn new(weight: &[f32], bias: &[f32], kernel: usize, stride: usize, pad: PadMode, act: Fused) -> Option<Self> {
        if !matches!(kernel, 3 | 5) {
            return None;
        }
        Some(Self::for_isa(Isa::detect()?, weight, bias, kernel, stride, pad, act))
    }

    /// [`Self::new`] for `isa`, which the CPU must run, and `k` 3 or 5.
    pub(crate) fn for_isa(
        isa: Isa,
        weight: &[f32],
        bias: &[f32],
        kernel: usize,
        stride: usize,
        pad: PadMode,
        act: Fused,
    ) -> Self {
        assert!(Isa::supported().contains(&isa), "this CPU does not run {isa:?}");
        assert!(matches!(kernel, 3 | 5), "a {kernel}×{kernel} depthwise kernel");
        let (c, taps) = (bias.len(), kernel * kernel);
        assert_eq!(weight.len(), c * taps, "depthwise weight shape");
        let mut weights = vec![0f32; taps * c];
        for ch in 0..c {
            for t in 0..taps {
                weights[t * c + ch] = weight[ch * taps + t];
            }
        }
        Self { weights, bias: bias.to_vec(), kernel, stride, pad, act, isa }
    }

    /// Channels in and out.
    pub fn channels(&self) -> usize {
        self.bias.len()
    }

    /// The layer on channels `range` only, whose outputs are the whole
    /// layer's on those channels, bit for bit.
    ///
    /// # Panics
    /// Where `range` is empty or past the layer's channels.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        let c = self.channels();
        assert!(!range.is_empty() && range.end <= c, "channels {range:?} of {c}");
        let taps = self.kernel * self.kernel;
        // Back to `[c, 1, k, k]` from `[k·k][c]`.
        let weight: Vec<f32> = range.clone().flat_map(|ch| (0..taps).map(move |t| self.weights[t * c + ch])).collect();
        Self::for_isa(self.isa, &weight, &self.bias[range], self.kernel, self.stride, self.pad, self.act)
    }

    /// The padding and output size for an `h`×`w` input.
    pub fn output_geometry(&self, h: usize, w: usize) -> (Padding, usize, usize) {
        let (k, s) = (self.kernel, self.stride);
        let p = self.pad.resolve(h, w, k, s);
        (p, out_size(h, k, s, p.top, p.bottom), out_size(w, k, s, p.left, p.right))
    }

    /// Kernel size.
    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// Stride.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// `act(depthwise(x) + bias)`, NHWC in and out.
    pub fn forward(&self, x: &Nhwc) -> Nhwc {
        let c = self.channels();
        assert_eq!(x.c, c, "input channels");
        let (_, oh, ow) = self.output_geometry(x.h, x.w);
        let mut data: Box<[MaybeUninit<f32>]> = Box::new_uninit_slice(x.n * oh * ow * c);
        let zeros = vec![0f32; c];
        if ow * c > 0 {
            data.par_chunks_mut(ow * c).enumerate().for_each(|(r, row)| {
                let (img, oy) = (r / oh, r % oh);
                let input_row = |iy: usize| (iy < x.h).then(|| &x.data[(img * x.h + iy) * x.w * c..][..x.w * c]);
                // SAFETY: `row` is one output row, `ow × c` floats.
                unsafe { self.row_raw(oy, input_row, (x.h, x.w), &zeros, row.as_mut_ptr().cast()) };
            });
        }
        // SAFETY: every output row was written whole above.
        let data = unsafe { data.assume_init() }.into_vec();
        Nhwc { data, n: x.n, h: oh, w: ow, c }
    }

    /// Output row `oy` of one `h`×`w` image into `out` (`ow × c` floats),
    /// where `input_row(iy)` is input row `iy` (`w × c` floats; `None` past
    /// the last row) and `zeros` holds `c` zeros: the depthwise pass of a
    /// fused block that holds only a band of its input rows
    /// ([`super::inverted_residual`]).
    pub fn row_into<'a>(
        &self,
        oy: usize,
        input_row: impl Fn(usize) -> Option<&'a [f32]>,
        (h, w): (usize, usize),
        zeros: &[f32],
        out: &mut [f32],
    ) {
        let (_, _, ow) = self.output_geometry(h, w);
        assert_eq!(out.len(), ow * self.channels(), "output row");
        // SAFETY: `out` holds `ow × c` floats (asserted).
        unsafe { self.row_raw(oy, input_row, (h, w), zeros, out.as_mut_ptr()) }
    }

    /// [`Self::row_into`] through a pointer.
    ///
    /// # Safety
    /// `out` is valid for writes of `ow × c` floats.
    unsafe fn row_raw<'a>(
        &self,
        oy: usize,
        input_row: impl Fn(usize) -> Option<&'a [f32]>,
        (h, w): (usize, usize),
        zeros: &[f32],
        out: *mut f32,
    ) {
        let c = self.channels();
        let (p, _, ow) = self.output_geometry(h, w);
        assert!(zeros.len() >= c, "zero row");
        debug_assert!(zeros.iter().all(|&z| z == 0.0), "zero row");
        let row = |ky: usize| {
            let iy = (oy * self.stride + ky).checked_sub(p.top)?;
            let row = input_row(iy)?;
            assert_eq!(row.len(), w * c, "input row");
            Some(row)
        };
        let g = Geometry { w, left: p.left, ow, zeros };
        // SAFETY: `for_isa` checked the CPU runs `isa` and that `kernel`
        // is 3 or 5; every row holds `w × c` floats (asserted), `zeros`
        // holds `c` (asserted) and `out` `ow × c` (the caller's promise).
        unsafe {
            match (self.isa, self.kernel) {
                (Isa::Avx512, 3) => kernels::avx512::<3>(self, std::array::from_fn(row), &g, out),
                (Isa::Avx512, _) => kernels::avx512::<5>(self, std::array::from_fn(row), &g, out),
                (Isa::Avx2, 3) => kernels::avx2::<3>(self, std::array::from_fn(row), &g, out),
                (Isa::Avx2, _) => kernels::avx2::<5>(self, std::array::from_fn(row), &g, out),
            }
        }
    }
}

/// One output row's shapes.
struct Geometry<'a> {
    /// Input width.
    w: usize,
    /// Padding columns on the left.
    left: usize,
    ow: usize,
    /// `c` zeros: what a tap outside the image reads.
    zeros: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::{Geometry, NhwcDepthwise};
    use crate::ops::simd::{Simd, Ymm, Zmm, activate};

    /// [`row`] on AVX-512F.
    ///
    /// # Safety
    /// The CPU has AVX-512F; as for [`row`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512<const K: usize>(op: &NhwcDepthwise, rows: [Option<&[f32]>; K], g: &Geometry, out: *mut f32) {
        // SAFETY: forwarded.
        unsafe { row::<Zmm, K>(op, rows, g, out) }
    }

    /// [`row`] on AVX2 with FMA.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; as for [`row`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2<const K: usize>(op: &NhwcDepthwise, rows: [Option<&[f32]>; K], g: &Geometry, out: *mut f32) {
        // SAFETY: forwarded.
        unsafe { row::<Ymm, K>(op, rows, g, out) }
    }

    /// Output pixels at a time in a row's interior: independent
    /// accumulators, so that the FMAs of neighbouring pixels overlap
    /// instead of each pixel waiting on its own chain of `K × K`. A 5×5
    /// kernel's 25 weight registers leave AVX-512 room for two.
    const fn group(k: usize) -> usize {
        if k == 3 { 4 } else { 2 }
    }

    /// One output row into `out` from the input row under each kernel row
    /// (`None` in the padding).
    ///
    /// # Safety
    /// The CPU runs `S`; `op.kernel == K`; each row holds `g.w × c` floats
    /// with `c = op.channels()`; `g.zeros` holds `c` floats; `out` holds
    /// `g.ow × c`.
    #[inline(always)]
    unsafe fn row<S: Simd, const K: usize>(op: &NhwcDepthwise, rows: [Option<&[f32]>; K], g: &Geometry, out: *mut f32) {
        let (c, s) = (op.channels(), op.stride);
        // The interior `lo..hi`: output pixels all of whose taps fall
        // inside the input row, taken `group(K)` at a time without bounds
        // checks at strides 1 and 2 (every model's); the rest pixel by pixel.
        let lo = g.left.div_ceil(s).min(g.ow);
        let hi = match (g.w + g.left).checked_sub(K) {
            Some(last) if matches!(s, 1 | 2) => (last / s + 1).clamp(lo, g.ow),
            _ => lo,
        };
        for cb in (0..c).step_by(S::LANES) {
            let n = c - cb;
            // SAFETY (all loads and stores below): masked to the `n` lanes
            // from `cb`, inside a pixel's `c` channels of the input row, of
            // `zeros`, of the weights' tap row, or of the output pixel; the
            // interior's taps are inside their rows by the bounds above.
            unsafe {
                let m = S::first(n);
                // Whole vectors take plain loads and stores: AVX2's masked
                // ones are slow on AMD, the store microcoded.
                let load = |p: *const f32| if n >= S::LANES { S::load(p) } else { S::load_masked(m, p) };
                let store = |to: *mut f32, v: S| {
                    if n >= S::LANES { S::store(to, v) } else { S::store_masked(m, to, v) }
                };
                let w: [[S; K]; K] = std::array::from_fn(|ky| {
                    std::array::from_fn(|kx| load(op.weights.as_ptr().add((ky * K + kx) * c + cb)))
                });
                let bias = load(op.bias.as_ptr().add(cb));
                let group = group(K);
                let end = lo + (hi - lo) / group * group;
                // The edges, pixel by pixel, in one loop written out here: a
                // closure called twice stays a call, compiled without
                // AVX-512, where the intrinsics inside stay calls too.
                for ox in (0..lo).chain(end..g.ow) {
                    let mut acc = bias;
                    for (row, w) in rows.iter().zip(&w) {
                        for (kx, &w) in w.iter().enumerate() {
                            let ix = (ox * s + kx).wrapping_sub(g.left);
                            let tap = match row {
                                Some(row) if ix < g.w => row.as_ptr().add(ix * c + cb),
                                _ => g.zeros.as_ptr().add(cb),
                            };
                            acc = S::mul_add(load(tap), w, acc);
                        }
                    }
                    store(out.add(ox * c + cb), activate(acc, op.act));
                }
                let starts = rows.map(|row| row.map(|row| row.as_ptr().add(cb)));
                for ox in (lo..end).step_by(group) {
                    let put = |i: usize, acc: S| store(out.add((ox + i) * c + cb), activate(acc, op.act));
                    let first = ox * s - g.left;
                    // Other strides have no interior (`hi == lo` above).
                    match (s, group) {
                        (1, 4) => interior::<S, K, 4, 1>(&starts, &w, bias, c, first, load, put),
                        (1, _) => interior::<S, K, 2, 1>(&starts, &w, bias, c, first, load, put),
                        (2, 4) => interior::<S, K, 4, 2>(&starts, &w, bias, c, first, load, put),
                        (2, _) => interior::<S, K, 2, 2>(&starts, &w, bias, c, first, load, put),
                        _ => unreachable!("an interior at stride {s}"),
                    }
                }
            }
        }
    }

    /// `G` neighbouring interior output pixels at stride `ST`, handed to
    /// `put` with their index before their activation, the first reading
    /// input pixel `first` of each row (`rows`: each row's pointer at the
    /// block's channels, `None` for rows of padding). Each pixel sums its
    /// taps in the edge path's order; a row of padding, which there adds
    /// `0 × w`, is skipped.
    ///
    /// # Safety
    /// Every row holds the `(G - 1) × ST + K` pixels of `c` floats from
    /// `first`, and `load` reads one block of channels.
    #[inline(always)]
    unsafe fn interior<S: Simd, const K: usize, const G: usize, const ST: usize>(
        rows: &[Option<*const f32>; K],
        w: &[[S; K]; K],
        bias: S,
        c: usize,
        first: usize,
        load: impl Fn(*const f32) -> S,
        put: impl Fn(usize, S),
    ) {
        let mut acc = [bias; G];
        for (row, w) in rows.iter().zip(w) {
            let Some(row) = row else { continue };
            // SAFETY: inside the row (the caller's promise).
            let row = unsafe { row.add(first * c) };
            for (kx, &w) in w.iter().enumerate() {
                for (i, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: as above; the CPU runs `S` (the caller's).
                    *acc = unsafe { S::mul_add(load(row.add((i * ST + kx) * c)), w, *acc) };
                }
            }
        }
        for (i, acc) in acc.into_iter().enumerate() {
            put(i, acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::ops::test_util::values;

    /// A slice of the channels, starting off the register lanes, gives the
    /// whole layer's values on them bit for bit, on every ISA the CPU runs.
    #[test]
    fn slice_matches_the_whole_layer() {
        for isa in Isa::supported() {
            let (c, k) = (72, 5);
            let whole =
                NhwcDepthwise::for_isa(isa, &values(c * k * k, 1), &values(c, 2), k, 2, PadMode::TfSame, Fused::Relu6);
            let x = Nhwc::from_nchw(&values(c * 11 * 9, 3), 1, c, 11, 9);
            let want = whole.forward(&x);
            let part = whole.slice(20..61);
            let xs = Nhwc::from_nchw(&values(c * 11 * 9, 3)[20 * 11 * 9..61 * 11 * 9], 1, 41, 11, 9);
            let got = part.forward(&xs);
            for (px, got) in got.data.chunks(41).enumerate() {
                assert_eq!(got, &want.data[px * c + 20..][..41], "{isa:?}: pixel {px}");
            }
        }
    }

    /// Against candle's grouped convolution: 3×3 and 5×5, strides 1 and 2,
    /// symmetric and TF "SAME" padding, channel counts off the 16 lanes,
    /// odd map sizes, each fused activation.
    #[test]
    fn matches_candle_conv() {
        let sets = Isa::supported();
        eprintln!("instruction sets: {sets:?}");
        for isa in sets {
            matches_candle_conv_on(isa);
        }
    }

    fn matches_candle_conv_on(isa: Isa) {
        let cases = [
            (2, 24, 9, 7, 3, 1, PadMode::Symmetric(1), Fused::Relu6),
            (1, 35, 8, 11, 3, 2, PadMode::Symmetric(1), Fused::None),
            (3, 16, 10, 10, 5, 2, PadMode::TfSame, Fused::Relu),
            (1, 40, 7, 9, 5, 1, PadMode::Symmetric(2), Fused::Relu6),
            (1, 7, 4, 5, 3, 2, PadMode::TfSame, Fused::None),
            // Rows wide enough for several groups of interior pixels, with
            // a masked tail of channels; rows narrower than the kernel.
            (1, 20, 5, 23, 3, 1, PadMode::Symmetric(1), Fused::Relu6),
            (1, 20, 6, 27, 5, 2, PadMode::TfSame, Fused::None),
            (1, 8, 4, 1, 5, 1, PadMode::Symmetric(2), Fused::None),
            (1, 8, 3, 2, 3, 1, PadMode::Symmetric(1), Fused::Relu),
        ];
        for (i, &(n, c, h, w, k, s, pad, act)) in cases.iter().enumerate() {
            let x = values(n * c * h * w, 3 + i as u32);
            let wt = values(c * k * k, 7 + i as u32);
            let bias = values(c, 11 + i as u32);
            let op = NhwcDepthwise::for_isa(isa, &wt, &bias, k, s, pad, act);
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
            assert_eq!((got.n, got.c, got.h, got.w), y.dims4().unwrap(), "{isa:?} case {i}");
            let want = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = got.to_nchw().iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "{isa:?} case {i}: max err {err}");
        }
    }
}
