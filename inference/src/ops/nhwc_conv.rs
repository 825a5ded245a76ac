//! Dense convolutions in channels-last (NHWC) layout, as an indirect GEMM.
//!
//! In NHWC a pixel's channels are contiguous, so one kernel tap of an output
//! pixel reads `cin` consecutive floats of the input. The microkernel
//! broadcasts those floats straight from the input through one pointer per
//! pixel and tap (XNNPACK's indirection buffer, built per block of pixels
//! here), against the weights packed once at load time in slivers of 8
//! to 64 output channels (as wide as fits the layer's channel count
//! without waste: MobileNetV2's 24-channel projections would use 24 of 64
//! lanes). Nothing is copied per call: no im2col, no packing of the
//! activation, which on ResNet's 3×3 layers cost as much memory traffic as
//! the GEMM's arithmetic in the NCHW path ([`super::GemmConv`]). Padding taps
//! point at a zeroed row. The output is NHWC again, so a chain of these
//! layers never changes layout; the bias starts the accumulators and the
//! residual and activation are applied in registers before the store.
//!
//! Where `cin · k` is small (a stem on three colour channels) the taps of a
//! kernel row are merged into one segment, read from a zero-padded copy of
//! the input: 21 floats per pointer instead of 3. A 1×1, stride-1,
//! unpadded convolution needs no pointers at all: output pixel `i` reads
//! input pixel `i`.
//!
//! Built on x86-64 only. The kernel is written once over [`Simd`] and
//! compiled for AVX-512F and for AVX2 with FMA; [`NhwcConv::new`] picks the
//! widest the CPU runs and packs the weights for its register width, and
//! returns `None` on a CPU with neither.
//!
//! [`Simd`]: super::simd::Simd

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::sgemm::Fused;
use super::simd::Isa;
use super::{PadMode, Padding, out_size};

/// Most output channels per sliver: four AVX-512 registers, eight AVX2.
const NR: usize = 64;
/// Pixels per microkernel call: 6 × 4 accumulators leave registers for the
/// four weight vectors and a broadcast.
const MR: usize = 6;
/// Most k per block: a `KC × NR` weight block is 32 KiB, inside a 48 KiB L1.
const KC: usize = 128;
/// Pixels per task: the task's output rows (`PB × NR` floats, 60 KiB) and
/// the input rows under them stay in L2 while every weight block passes.
const PB: usize = 40 * MR;
/// Tasks whose weights take at least this many bytes fetch each block of
/// them into L2 while they compute on the one before ([`Step::prefetch`]);
/// smaller ones stay in L2 from one use to the next.
const PREFETCH_FROM_BYTES: usize = 256 << 10;
/// How many blocks ahead of the one computed that prefetch reaches.
const PREFETCH_AHEAD: usize = 1;
/// Kernel rows whose taps hold at most this many floats are merged.
const MERGE_UP_TO: usize = 32;

/// A batch of feature maps, channels last: `data[((n·h + y)·w + x)·c + ch]`.
#[derive(Debug, Clone)]
pub struct Nhwc {
    pub data: Vec<f32>,
    /// Images.
    pub n: usize,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// Channels.
    pub c: usize,
}

impl Nhwc {
    /// Transposes an NCHW batch, row by row over the threads: at batch 1
    /// a network's input would otherwise be turned on one thread while the
    /// other waits.
    pub fn from_nchw(src: &[f32], n: usize, c: usize, h: usize, w: usize) -> Self {
        Self::from_nchw_padded(src, n, c, h, w, Padding::default())
    }

    /// [`Self::from_nchw`] with `p` zeros around each image, in the same
    /// pass: a stem reads a padded copy of the network's input
    /// ([`NhwcConv::forward_nchw`]), which would otherwise be a second pass
    /// over it. Each row is written whole, so the buffer is never zeroed
    /// first.
    pub fn from_nchw_padded(src: &[f32], n: usize, c: usize, h: usize, w: usize, p: Padding) -> Self {
        assert_eq!(src.len(), n * c * h * w);
        let plane = h * w;
        // SAFETY: the closure writes every pixel's every channel of its row.
        unsafe {
            Self::padded_with(n, h, w, c, p, |img, y, middle| {
                let src = &src[img * c * plane + y * w..];
                for (x, px) in middle.chunks_exact_mut(c).enumerate() {
                    for (ch, v) in px.iter_mut().enumerate() {
                        v.write(src[ch * plane + x]);
                    }
                }
            })
        }
    }

    /// An `n`×`h`×`w`×`c` map with `p` zeros around each image, its rows
    /// made over the threads: `row(img, y, middle)` writes row `y` of image
    /// `img` into `middle`, and the padding is written around it. Each row
    /// is written whole rather than into a zeroed buffer, whose zeroing was
    /// a serial `memset` of the whole map.
    ///
    /// # Safety
    /// `row` must write every element of `middle`.
    unsafe fn padded_with(
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        p: Padding,
        row: impl Fn(usize, usize, &mut [MaybeUninit<f32>]) + Sync,
    ) -> Self {
        let (hp, wp) = (h + p.top + p.bottom, w + p.left + p.right);
        let mut data: Box<[MaybeUninit<f32>]> = Box::new_uninit_slice(n * hp * wp * c);
        if wp * c > 0 {
            let zero = MaybeUninit::new(0f32);
            data.par_chunks_mut(wp * c).enumerate().for_each(|(r, dst)| {
                let (img, y) = (r / hp, (r % hp).wrapping_sub(p.top));
                if y < h {
                    let (left, rest) = dst.split_at_mut(p.left * c);
                    let (middle, right) = rest.split_at_mut(w * c);
                    left.fill(zero);
                    row(img, y, middle);
                    right.fill(zero);
                } else {
                    dst.fill(zero);
                }
            });
        }
        // SAFETY: the padding is written above and the rest by `row`, which
        // the caller promises writes all of it.
        let data = unsafe { data.assume_init() }.into_vec();
        Self { data, n, h: hp, w: wp, c }
    }

    /// The same maps as NCHW, channel plane by channel plane over the
    /// threads.
    pub fn to_nchw(&self) -> Vec<f32> {
        let (plane, c) = (self.h * self.w, self.c);
        let mut out = vec![0f32; self.data.len()];
        if plane > 0 {
            out.par_chunks_mut(plane).enumerate().for_each(|(i, dst)| {
                let (img, ch) = (i / c, i % c);
                let src = &self.data[img * plane * c..][..plane * c];
                for (v, px) in dst.iter_mut().zip(src.chunks_exact(c)) {
                    *v = px[ch];
                }
            });
        }
        out
    }

    /// Max pooling with PyTorch's semantics (padding never wins, floor
    /// rounding): resnet's stem pool.
    pub fn max_pool(&self, kernel: usize, stride: usize, pad: usize) -> Self {
        assert!(pad < kernel, "max pool padding {pad} not under the kernel {kernel}");
        let (h, w, c) = (self.h, self.w, self.c);
        let (oh, ow) = (out_size(h, kernel, stride, pad, pad), out_size(w, kernel, stride, pad, pad));
        let mut data = vec![f32::NEG_INFINITY; self.n * oh * ow * c];
        data.par_chunks_mut(ow * c).enumerate().for_each(|(row, out)| {
            let (img, oy) = (row / oh, row % oh);
            let ys = (oy * stride).saturating_sub(pad)..(oy * stride + kernel - pad).min(h);
            for (ox, px) in out.chunks_exact_mut(c).enumerate() {
                let xs = (ox * stride).saturating_sub(pad)..(ox * stride + kernel - pad).min(w);
                for y in ys.clone() {
                    for x in xs.clone() {
                        let src = &self.data[((img * h + y) * w + x) * c..][..c];
                        // Not f32::max: its NaN rule keeps this from vectorizing.
                        px.iter_mut().zip(src).for_each(|(o, &v)| *o = if v > *o { v } else { *o });
                    }
                }
            }
        });
        Self { data, n: self.n, h: oh, w: ow, c }
    }

    /// `AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`: on an odd
    /// size the last window averages only the pixels it covers.
    pub fn avg_pool_2x2_ceil(&self) -> Self {
        let (h, w, c) = (self.h, self.w, self.c);
        let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
        let mut data = vec![0f32; self.n * oh * ow * c];
        data.par_chunks_mut(ow * c).enumerate().for_each(|(row, out)| {
            let (img, oy) = (row / oh, row % oh);
            let ys = 2 * oy..(2 * oy + 2).min(h);
            for (ox, px) in out.chunks_exact_mut(c).enumerate() {
                let xs = 2 * ox..(2 * ox + 2).min(w);
                for y in ys.clone() {
                    for x in xs.clone() {
                        let src = &self.data[((img * h + y) * w + x) * c..][..c];
                        px.iter_mut().zip(src).for_each(|(o, v)| *o += v);
                    }
                }
                let scale = 1.0 / (ys.len() * xs.len()) as f32;
                px.iter_mut().for_each(|o| *o *= scale);
            }
        });
        Self { data, n: self.n, h: oh, w: ow, c }
    }

    /// The mean over each map: `[n][c]`.
    pub fn mean(&self) -> Vec<f32> {
        let plane = self.h * self.w;
        let mut out = vec![0f32; self.n * self.c];
        for (sum, img) in out.chunks_mut(self.c).zip(self.data.chunks(plane * self.c)) {
            for px in img.chunks_exact(self.c) {
                sum.iter_mut().zip(px).for_each(|(s, v)| *s += v);
            }
            sum.iter_mut().for_each(|s| *s /= plane as f32);
        }
        out
    }

    fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }

    /// A zero-padded copy, row by row over the threads (a stem's input at
    /// batch 1 is one image).
    fn padded(&self, p: Padding) -> Self {
        let (h, w, c) = (self.h, self.w, self.c);
        // SAFETY: the closure copies a whole row into `middle`.
        unsafe {
            Self::padded_with(self.n, h, w, c, p, |img, y, middle| {
                middle.write_copy_of_slice(&self.data[(img * h + y) * w * c..][..w * c]);
            })
        }
    }
}

/// How a map's output pixels are cut into tasks' blocks: in whole `MR`
/// tiles, about [`PB`] pixels each, and where the map makes a block per
/// thread or more, into a multiple of the threads whose tile counts differ
/// by at most one (the last block may end in a partial tile). Fixed blocks
/// of `PB` left one thread idle for much of a small map at batch 1:
/// resnet18's 28² layers made blocks of 240, 240, 240 and 64 pixels, so
/// one thread ran 480 and the other 304. A map of fewer blocks
/// than threads keeps its ⌈pixels / PB⌉ blocks and its channels are split
/// as well ([`NhwcConv::forward`]), so each task reads its weights once.
#[derive(Debug, Clone, Copy)]
struct PixelBlocks {
    pixels: usize,
    tiles: usize,
    count: usize,
}

impl PixelBlocks {
    fn new(pixels: usize, threads: usize) -> Self {
        let tiles = pixels.div_ceil(MR);
        let count = pixels.div_ceil(PB);
        let count = if count >= threads { count.next_multiple_of(threads.max(1)) } else { count };
        Self { pixels, tiles, count: count.clamp(1, tiles.max(1)) }
    }

    /// The pixels of block `b`.
    fn range(&self, b: usize) -> Range<usize> {
        let tile = |b: usize| b * self.tiles / self.count * MR;
        tile(b).min(self.pixels)..tile(b + 1).min(self.pixels)
    }
}

/// Registers of `lanes` per sliver for `cout` channels: the fewest
/// padding lanes in the last sliver, and of equals the widest (more FMAs
/// per broadcast).
fn sliver_vectors(cout: usize, lanes: usize) -> usize {
    (1..=NR / lanes).rev().min_by_key(|&v| cout.next_multiple_of(v * lanes) - cout).expect("a non-empty range")
}

/// Lanes of one register of `isa`.
fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 => 8,
    }
}

/// A groups=1 convolution with folded BatchNorm, on NHWC maps.
#[derive(Debug, Clone)]
pub struct NhwcConv {
    /// `[sliver][k][nr]` with k ordered (ky, kx, ci), zero-padded past `cout`.
    filters: Vec<f32>,
    /// What the kernel runs on; the packing follows its register width.
    isa: Isa,
    /// Registers per sliver: `nr = lanes(isa) · vectors` channels.
    vectors: usize,
    /// Zero-padded to whole slivers.
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    pad: PadMode,
    act: Fused,
}

/// How the k dimension is cut into contiguous reads of the input.
#[derive(Debug, Clone, Copy)]
struct Segments {
    /// Reads per pixel.
    count: usize,
    /// Floats per read.
    len: usize,
    /// Whole kernel rows per read, from a padded copy.
    merged: bool,
}

/// A block of k: whole segments `segs`, or part `cols` of one.
#[derive(Debug, Clone)]
struct Chunk {
    segs: Range<usize>,
    cols: Range<usize>,
}

impl Segments {
    fn k(&self) -> usize {
        self.count * self.len
    }

    fn chunks(&self) -> Vec<Chunk> {
        if self.len >= KC {
            let parts = self.len.div_ceil(KC);
            let step = self.len.div_ceil(parts);
            (0..self.count)
                .flat_map(|s| {
                    (0..self.len)
                        .step_by(step)
                        .map(move |j| Chunk { segs: s..s + 1, cols: j..(j + step).min(self.len) })
                })
                .collect()
        } else {
            let per = KC / self.len;
            (0..self.count)
                .step_by(per)
                .map(|s| Chunk { segs: s..(s + per).min(self.count), cols: 0..self.len })
                .collect()
        }
    }
}

/// Raw pointers shared by tasks that read the input and write disjoint
/// parts of the output.
#[derive(Clone, Copy)]
pub(super) struct Shared<T>(pub(super) T);
// SAFETY: see the uses: inputs are only read, and tasks write disjoint
// (pixel block × sliver) regions of the output.
unsafe impl Send for Shared<*const f32> {}
unsafe impl Sync for Shared<*const f32> {}
unsafe impl Send for Shared<*mut f32> {}
unsafe impl Sync for Shared<*mut f32> {}

impl NhwcConv {
    /// From a folded weight `[cout, cin, k, k]` (flattened) and bias, for
    /// the widest instruction set this CPU runs, or `None` where it has
    /// neither AVX-512F nor AVX2 with FMA.
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        cin: usize,
        kernel: usize,
        stride: usize,
        pad: PadMode,
        act: Fused,
    ) -> Option<Self> {
        Some(Self::for_isa(Isa::detect()?, weight, bias, cin, kernel, stride, pad, act))
    }

    /// [`Self::new`] for `isa`, which the CPU must run (tests check each
    /// set the CPU has).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn for_isa(
        isa: Isa,
        weight: &[f32],
        bias: &[f32],
        cin: usize,
        kernel: usize,
        stride: usize,
        pad: PadMode,
        act: Fused,
    ) -> Self {
        assert!(Isa::supported().contains(&isa), "this CPU does not run {isa:?}");
        let cout = bias.len();
        assert_eq!(weight.len(), cout * cin * kernel * kernel);
        let k = cin * kernel * kernel;
        let vectors = sliver_vectors(cout, lanes(isa));
        let nr = vectors * lanes(isa);
        let slivers = cout.div_ceil(nr);
        let mut filters = vec![0f32; slivers * k * nr];
        for o in 0..cout {
            let (s, lane) = (o / nr, o % nr);
            for ci in 0..cin {
                for ky in 0..kernel {
                    for kx in 0..kernel {
                        let kk = (ky * kernel + kx) * cin + ci;
                        filters[(s * k + kk) * nr + lane] = weight[((o * cin + ci) * kernel + ky) * kernel + kx];
                    }
                }
            }
        }
        let mut padded_bias = bias.to_vec();
        padded_bias.resize(slivers * nr, 0.0);
        Self { filters, isa, vectors, bias: padded_bias, cin, cout, kernel, stride, pad, act }
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.cout
    }

    /// The activation fused into the store.
    pub fn fused(&self) -> Fused {
        self.act
    }

    /// The layer cut down to output channels `outs` and input channels
    /// `ins`, keeping its bias or with none: one part of a layer split by
    /// channels ([`super::inverted_residual`]). The part's outputs are the
    /// whole layer's, bit for bit, where `ins` is every input channel.
    ///
    /// # Panics
    /// Where a range is empty or past the layer's channels.
    pub fn slice(&self, outs: Range<usize>, ins: Range<usize>, keep_bias: bool) -> Self {
        assert!(!outs.is_empty() && outs.end <= self.cout, "output channels {outs:?} of {}", self.cout);
        assert!(!ins.is_empty() && ins.end <= self.cin, "input channels {ins:?} of {}", self.cin);
        let (nr, taps) = (self.nr(), self.kernel * self.kernel);
        let k = self.cin * taps;
        // Back to `[cout, cin, k, k]` from `[sliver][(ky, kx, ci)][nr]`.
        let mut weight = Vec::with_capacity(outs.len() * ins.len() * taps);
        for o in outs.clone() {
            for ci in ins.clone() {
                weight.extend((0..taps).map(|t| self.filters[((o / nr) * k + t * self.cin + ci) * nr + o % nr]));
            }
        }
        let bias = if keep_bias { self.bias[outs].to_vec() } else { vec![0.0; outs.len()] };
        Self::for_isa(self.isa, &weight, &bias, ins.len(), self.kernel, self.stride, self.pad, self.act)
    }

    /// Output channels per sliver.
    fn nr(&self) -> usize {
        self.vectors * lanes(self.isa)
    }

    fn segments(&self) -> Segments {
        let row = self.kernel * self.cin;
        if self.kernel > 1 && row <= MERGE_UP_TO {
            Segments { count: self.kernel, len: row, merged: true }
        } else {
            Segments { count: self.kernel * self.kernel, len: self.cin, merged: false }
        }
    }

    /// `act(conv(x) + bias [+ residual])`, NHWC in and out. The residual has
    /// the output's shape.
    pub fn forward(&self, x: &Nhwc, residual: Option<&Nhwc>) -> Nhwc {
        self.forward_with(x, residual, PREFETCH_AHEAD, true)
    }

    /// [`Self::forward`], prefetching the weights `ahead` blocks ahead (0:
    /// not at all), with tiles `grouped` by padding or in raster order
    /// ([`Geometry::tiles`]), to measure what each gains.
    fn forward_with(&self, x: &Nhwc, residual: Option<&Nhwc>, ahead: usize, grouped: bool) -> Nhwc {
        assert_eq!(x.c, self.cin, "input channels");
        let p = self.pad.resolve(x.h, x.w, self.kernel, self.stride);
        if self.segments().merged {
            self.run(&x.padded(p), Padding::default(), residual, ahead, grouped)
        } else {
            self.run(x, p, residual, ahead, grouped)
        }
    }

    /// [`Self::forward`] on an NCHW batch, without a residual: a network's
    /// first layer. A stem whose kernel rows are merged takes its padded
    /// input straight from the transpose ([`Nhwc::from_nchw_padded`]).
    pub fn forward_nchw(&self, src: &[f32], n: usize, c: usize, h: usize, w: usize) -> Nhwc {
        assert_eq!(c, self.cin, "input channels");
        if self.segments().merged {
            let p = self.pad.resolve(h, w, self.kernel, self.stride);
            let x = Nhwc::from_nchw_padded(src, n, c, h, w, p);
            self.run(&x, Padding::default(), None, PREFETCH_AHEAD, true)
        } else {
            self.forward(&Nhwc::from_nchw(src, n, c, h, w), None)
        }
    }

    /// The convolution of `src` with `p` padding still to apply (none once
    /// merged segments read a padded copy).
    fn run(&self, src: &Nhwc, p: Padding, residual: Option<&Nhwc>, ahead: usize, grouped: bool) -> Nhwc {
        let (k, s) = (self.kernel, self.stride);
        let (oh, ow) = (out_size(src.h, k, s, p.top, p.bottom), out_size(src.w, k, s, p.left, p.right));
        let out = Nhwc { data: Vec::new(), n: src.n, h: oh, w: ow, c: self.cout };
        if let Some(r) = residual {
            assert_eq!((r.n, r.h, r.w, r.c), (out.n, out.h, out.w, out.c), "residual shape");
        }
        let segs = self.segments();
        if out.pixels() == 0 {
            return Nhwc { data: Vec::new(), ..out };
        }
        let mut data: Box<[MaybeUninit<f32>]> = Box::new_uninit_slice(out.pixels() * self.cout);
        let zeros = vec![0f32; segs.len];
        let geometry = Geometry { src: src.into(), p, oh, ow, kernel: k, stride: s, segs, zeros, grouped };
        let job = Job {
            conv: self,
            geometry: &geometry,
            chunks: segs.chunks(),
            out: Shared(data.as_mut_ptr().cast::<f32>()),
            res: residual.map(|r| Shared(r.data.as_ptr())),
            ahead,
        };
        let pixels = out.pixels();
        let threads = rayon::current_num_threads();
        let cut = PixelBlocks::new(pixels, threads);
        let blocks = cut.count;
        let slivers = self.cout.div_ceil(self.nr());
        // Enough tasks for every thread; split the channels where the
        // pixels alone give too few (small maps at batch 1).
        let groups = if threads > 1 { (2 * threads).div_ceil(blocks).clamp(1, slivers) } else { 1 };
        let per_group = slivers.div_ceil(groups);
        let groups = slivers.div_ceil(per_group);
        let run = |t: usize| {
            let (b, g) = (t / groups, t % groups);
            let px = cut.range(b);
            job.run(px, g * per_group..((g + 1) * per_group).min(slivers));
        };
        if blocks * groups == 1 {
            run(0);
        } else {
            (0..blocks * groups).into_par_iter().for_each(run);
        }
        // SAFETY: the tasks cover every pixel block × every sliver, and each
        // writes all of its pixels' channels in its slivers.
        let data = unsafe { data.assume_init() }.into_vec();
        Nhwc { data, ..out }
    }

    /// Whether [`Self::pointwise_into`] applies: a 1×1, stride-1 convolution
    /// without padding, whose output pixel `i` is input pixel `i`.
    pub fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.pad.resolve(1, 1, 1, 1) == Padding::default()
    }

    /// `act(conv(x) + bias [+ residual])` of a pointwise layer
    /// ([`Self::is_pointwise`]) on a run of pixels, `cin` floats each in `x`
    /// and `cout` in `out` and `residual`, on the calling thread: a piece
    /// of a fused block that keeps its maps in cache
    /// ([`super::inverted_residual`]).
    pub fn pointwise_into(&self, x: &[f32], out: &mut [f32], residual: Option<&[f32]>) {
        assert!(
            self.is_pointwise(),
            "pointwise_into on a {}×{} stride-{} layer",
            self.kernel,
            self.kernel,
            self.stride
        );
        let pixels = x.len() / self.cin;
        assert_eq!(x.len(), pixels * self.cin, "whole input pixels");
        assert_eq!(out.len(), pixels * self.cout, "output pixels");
        if let Some(r) = residual {
            assert_eq!(r.len(), out.len(), "residual pixels");
        }
        let segs = self.segments();
        let geometry = Geometry {
            src: Src { data: x, h: 1, w: pixels, c: self.cin },
            p: Padding::default(),
            oh: 1,
            ow: pixels,
            kernel: 1,
            stride: 1,
            segs,
            zeros: vec![0f32; segs.len],
            grouped: true,
        };
        let job = Job {
            conv: self,
            geometry: &geometry,
            chunks: segs.chunks(),
            out: Shared(out.as_mut_ptr()),
            res: residual.map(|r| Shared(r.as_ptr())),
            // A fused block calls this band after band with the same
            // weights: they stay in L2.
            ahead: 0,
        };
        let slivers = self.cout.div_ceil(self.nr());
        for start in (0..pixels).step_by(PB) {
            job.run(start..(start + PB).min(pixels), 0..slivers);
        }
    }
}

/// Borrowed input maps: `data[((n·h + y)·w + x)·c + ch]`.
#[derive(Clone, Copy)]
struct Src<'a> {
    data: &'a [f32],
    h: usize,
    w: usize,
    c: usize,
}

impl<'a> From<&'a Nhwc> for Src<'a> {
    fn from(x: &'a Nhwc) -> Self {
        Self { data: &x.data, h: x.h, w: x.w, c: x.c }
    }
}

/// Where each output pixel's taps are in the input.
struct Geometry<'a> {
    src: Src<'a>,
    /// Padding still to apply by pointing at `zeros` (none once merged).
    p: Padding,
    oh: usize,
    ow: usize,
    kernel: usize,
    stride: usize,
    segs: Segments,
    zeros: Vec<f32>,
    /// Tiles grouped by padding (always, but to measure the gain).
    grouped: bool,
}

/// An output pixel: (image, row, column).
type Coords = (usize, usize, usize);

/// Output rows (or columns) by the kernel rows (columns) at which they
/// read inside the input: pixels of one row class and one column class
/// share tiles ([`Geometry::tiles`]).
struct Classes {
    /// The class of each output row; class 0 reads no padding.
    of: Vec<usize>,
    count: usize,
}

/// A block's indirection buffer and the order of its pixels in tiles.
struct Tiles {
    /// Per tile, per segment, `MR` pointers (the zero row past a partial
    /// tile's pixels); a segment that is padding for every pixel of its
    /// tile has a null first pointer instead, and the microkernel skips it.
    ptrs: Vec<*const f32>,
    /// Per tile, the `MR` output pixels of its rows, from the block's
    /// first; a partial tile's unused rows hold 0 and are never read.
    pixels: Vec<usize>,
    /// The microkernel calls that cover the tiles ([`Call::cover`]).
    calls: Vec<Call>,
}

/// Tiles `first..first + tiles`, of `rows` pixels each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Call {
    first: usize,
    tiles: usize,
    rows: usize,
}

impl Call {
    /// The calls over `pixels` in tiles: the whole tiles in one (thin
    /// layers do little work per tile, so a call per tile was a tenth of
    /// the time), the partial tile in another.
    fn cover(pixels: usize) -> Vec<Call> {
        let (full, rest) = (pixels / MR, pixels % MR);
        [Call { first: 0, tiles: full, rows: MR }, Call { first: full, tiles: 1, rows: rest }]
            .into_iter()
            .filter(|c| c.tiles > 0 && c.rows > 0)
            .collect()
    }
}

impl Geometry<'_> {
    /// A 1×1, stride-1, unpadded convolution: output pixel `i` reads input
    /// pixel `i`, so no indirection buffer is needed.
    fn dense(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.p == Padding::default()
    }

    /// The tiles of output pixels `px`, grouped by padding: pixels whose
    /// taps fall outside the input at the same kernel rows and columns
    /// fill whole tiles together, so such a tile skips its padding
    /// segments for all of its pixels. In raster order only the top and
    /// bottom rows' tiles could skip (a kernel row); a left or right edge
    /// pixel shared its tile with inside pixels, while padding taps are 2%
    /// of the arithmetic of resnet18's 3×3 layers at 56² and 18% at 7². The pixels with no padding, and what
    /// no group fills a whole tile with (the corners, a small map's
    /// edges), follow in raster order, into whole tiles and one partial
    /// one as before: a partial tile per group cost more than its padding
    /// saved (resnet18's 7² layer at batch 1 ran 7% slower so), and
    /// inside pixels grouped apart from the edges ran the 56² layer 2%
    /// slower.
    fn tiles(&self, px: Range<usize>) -> Tiles {
        if self.p == Padding::default() {
            return self.tiles_unpadded(px);
        }
        // Two passes in raster order, without sorting: a version that
        // sorted each block's pixels ran the 56² layer 4–6% slower. The
        // first counts the groups; the second puts each pixel in its
        // group's tiles or in the rest. A
        // pixel's group is its row's class of kernel rows inside the input
        // by its column's class of kernel columns, found once per block.
        // The coordinates advance pixel by pixel: two divisions per pixel
        // cost as much as the microkernel on thin layers.
        let rows = self.classes(self.oh, self.p.top, self.src.h);
        let cols = self.classes(self.ow, self.p.left, self.src.w);
        let ncols = cols.count;
        // Group 0 reads no padding (class 0 of both).
        let group = |(_, oy, ox): Coords| if self.grouped { rows.of[oy] * ncols + cols.of[ox] } else { 0 };
        let mut sizes = vec![0usize; rows.count * ncols];
        let mut at = self.coordinates(px.start);
        for _ in 0..px.len() {
            sizes[group(at)] += 1;
            at = self.next(at);
        }
        // Each padded group's whole tiles, in order of group, then the rest.
        let mut quota: Vec<usize> =
            sizes.iter().enumerate().map(|(g, &n)| if g == 0 { 0 } else { n / MR * MR }).collect();
        let mut next_slot: Vec<usize> = quota
            .iter()
            .scan(0, |start, &n| {
                *start += n;
                Some(*start - n)
            })
            .collect();
        let mut rest: usize = quota.iter().sum();
        let nseg = self.segs.count;
        let zeros = self.zeros.as_ptr();
        let count = px.len().div_ceil(MR);
        let mut ptrs = vec![zeros; count * nseg * MR];
        let mut pixels = vec![0; count * MR];
        let mut at = self.coordinates(px.start);
        for i in 0..px.len() {
            let g = group(at);
            let slot = if quota[g] > 0 {
                quota[g] -= 1;
                next_slot[g] += 1;
                next_slot[g] - 1
            } else {
                rest += 1;
                rest - 1
            };
            let (t, r) = (slot / MR, slot % MR);
            pixels[slot] = i;
            let seg_ptrs = &mut ptrs[t * nseg * MR..][..nseg * MR];
            self.taps(at, |seg, ptr| seg_ptrs[seg * MR + r] = ptr);
            at = self.next(at);
        }
        // The rows a partial tile leaves unused point at `zeros` too, so
        // it skips a segment that is padding for the rows it uses.
        for seg in ptrs.chunks_exact_mut(MR) {
            if seg.iter().all(|&p| p == zeros) {
                seg[0] = std::ptr::null();
            }
        }
        Tiles { ptrs, pixels, calls: Call::cover(px.len()) }
    }

    /// [`Self::tiles`] where no tap reads padding (a stem's merged rows read
    /// a padded copy): every pixel in raster order, each segment a fixed
    /// offset from the pixel's first. On MobileNetV2's stem the general
    /// path's grouping and bounds checks took 36% of the layer's samples,
    /// as much as the microkernel.
    fn tiles_unpadded(&self, px: Range<usize>) -> Tiles {
        let src = self.src;
        // Each segment's offset in floats from the pixel's first, in
        // `taps`' order: those of the first pixel, which starts the input.
        let base = src.data.as_ptr() as usize;
        let mut offsets = Vec::with_capacity(self.segs.count);
        self.taps((0, 0, 0), |_, ptr| offsets.push((ptr as usize - base) / size_of::<f32>()));
        let nseg = offsets.len();
        let count = px.len().div_ceil(MR);
        let mut ptrs = vec![self.zeros.as_ptr(); count * nseg * MR];
        let mut at = self.coordinates(px.start);
        for i in 0..px.len() {
            let (img, oy, ox) = at;
            // Unpadded, the output size keeps every tap inside the input.
            debug_assert!(oy * self.stride + self.kernel <= src.h && ox * self.stride + self.kernel <= src.w);
            let first =
                src.data.as_ptr().wrapping_add(((img * src.h + oy * self.stride) * src.w + ox * self.stride) * src.c);
            let tile_ptrs = &mut ptrs[i / MR * nseg * MR..][..nseg * MR];
            for (seg, off) in offsets.iter().enumerate() {
                tile_ptrs[seg * MR + i % MR] = first.wrapping_add(*off);
            }
            at = self.next(at);
        }
        let pixels = (0..count * MR).map(|i| if i < px.len() { i } else { 0 }).collect();
        Tiles { ptrs, pixels, calls: Call::cover(px.len()) }
    }

    /// The classes of the `out` output rows (or columns) by which kernel
    /// rows (columns) read inside an input of `size` with `before` padding
    /// (merged segments read a padded copy: all of them).
    fn classes(&self, out: usize, before: usize, size: usize) -> Classes {
        let k = self.kernel as isize;
        let span = |o: usize| {
            let first = (o * self.stride) as isize - before as isize;
            ((-first).clamp(0, k), (size as isize - first).clamp(0, k))
        };
        let mut spans = vec![(0, k)];
        let of = (0..out)
            .map(|o| {
                let s = span(o);
                spans.iter().position(|&x| x == s).unwrap_or_else(|| {
                    spans.push(s);
                    spans.len() - 1
                })
            })
            .collect();
        Classes { of, count: spans.len() }
    }

    /// Output pixel `px` as (image, row, column).
    fn coordinates(&self, px: usize) -> Coords {
        let (img, rest) = (px / (self.oh * self.ow), px % (self.oh * self.ow));
        (img, rest / self.ow, rest % self.ow)
    }

    /// The output pixel after `(img, oy, ox)`.
    fn next(&self, (img, oy, ox): Coords) -> Coords {
        if ox + 1 < self.ow {
            (img, oy, ox + 1)
        } else if oy + 1 < self.oh {
            (img, oy + 1, 0)
        } else {
            (img + 1, 0, 0)
        }
    }

    /// The input read of every segment of output pixel `(img, oy, ox)`, in
    /// order.
    fn taps(&self, (img, oy, ox): Coords, mut put: impl FnMut(usize, *const f32)) {
        let src = self.src;
        let (rows, cols) = if self.segs.merged { (self.segs.count, 1) } else { (self.kernel, self.kernel) };
        let y0 = (oy * self.stride) as isize - self.p.top as isize;
        let x0 = (ox * self.stride) as isize - self.p.left as isize;
        for ky in 0..rows {
            let iy = y0 + ky as isize;
            for kx in 0..cols {
                let ix = x0 + kx as isize;
                let inside = (0..src.h as isize).contains(&iy) && (0..src.w as isize).contains(&ix);
                let at = ((img * src.h) as isize + iy) * src.w as isize + ix;
                // Evaluated only for a tap inside the input, so it stays in
                // `src.data`; wrapping_add keeps the function safe.
                let ptr =
                    if inside { src.data.as_ptr().wrapping_add(at as usize * src.c) } else { self.zeros.as_ptr() };
                put(ky * cols + kx, ptr);
            }
        }
    }
}

struct Job<'a> {
    conv: &'a NhwcConv,
    geometry: &'a Geometry<'a>,
    chunks: Vec<Chunk>,
    out: Shared<*mut f32>,
    res: Option<Shared<*const f32>>,
    /// How many blocks ahead a task with weights of [`PREFETCH_FROM_BYTES`]
    /// or more prefetches them ([`Step::prefetch`]); 0: it does not.
    ahead: usize,
}

impl Job<'_> {
    /// Output pixels `px` × slivers `slivers`, all of k.
    fn run(&self, px: Range<usize>, slivers: Range<usize>) {
        let g = self.geometry;
        let nseg = g.segs.count;
        let dense = g.dense();
        let tiles = if dense {
            Tiles { ptrs: Vec::new(), pixels: Vec::new(), calls: Call::cover(px.len()) }
        } else {
            g.tiles(px.clone())
        };
        let (k, cout, nr) = (g.segs.k(), self.conv.cout, self.conv.nr());
        // The task's weights are one run of memory: `[sliver][k][nr]`, and
        // its chunks in order along k.
        let task_weights = self.conv.filters[slivers.start * k * nr..slivers.end * k * nr].as_ptr_range();
        let task_bytes = (slivers.end - slivers.start) * k * nr * size_of::<f32>();
        for sliver in slivers {
            let filters = &self.conv.filters[sliver * k * nr..][..k * nr];
            let lanes = (cout - sliver * nr).min(nr);
            for (ci, chunk) in self.chunks.iter().enumerate() {
                let k0 = chunk.segs.start * g.segs.len + chunk.cols.start;
                let kc = chunk.segs.len() * chunk.cols.len();
                let b = &filters[k0 * nr..][..kc * nr];
                let first = ci == 0;
                let last = ci + 1 == self.chunks.len();
                // The block `ahead` of this one: a later chunk's, or one of
                // a later sliver; none past the task's last block.
                let later = ci + self.ahead;
                let (to_sliver, to_chunk) =
                    (sliver + later / self.chunks.len(), &self.chunks[later % self.chunks.len()]);
                let next_at = (to_sliver * k + to_chunk.segs.start * g.segs.len + to_chunk.cols.start) * nr;
                let next = self.conv.filters.as_ptr().wrapping_add(next_at);
                let next_len = to_chunk.segs.len() * to_chunk.cols.len() * nr;
                // Chunks are contiguous along k and slivers along the weights.
                debug_assert!(self.ahead != 1 || next == b.as_ptr_range().end, "one block ahead is the next");
                let prefetch = if self.ahead > 0 && next < task_weights.end && task_bytes >= PREFETCH_FROM_BYTES {
                    (next, next_len)
                } else {
                    (std::ptr::null(), 0)
                };
                for (i, &Call { first: t0, tiles: count, rows }) in tiles.calls.iter().enumerate() {
                    let (a, pixels) = if dense {
                        // In the input whenever the call has a tile; wrapping_add
                        // keeps this safe code.
                        let base = g.src.data.as_ptr().wrapping_add((px.start + t0 * MR) * g.src.c);
                        (Rows::Dense { base, ld: g.src.c }, None)
                    } else {
                        let ptrs = &tiles.ptrs[(t0 * nseg + chunk.segs.start) * MR..];
                        (Rows::Indirect { ptrs, tile_stride: nseg * MR }, Some(&tiles.pixels[t0 * MR..]))
                    };
                    // Dense tiles are in pixel order; grouped ones name
                    // their pixels from the block's first.
                    let at = if dense { (px.start + t0 * MR) * cout } else { px.start * cout } + sliver * nr;
                    let step = Step {
                        a,
                        segs: chunk.segs.len(),
                        tiles: count,
                        pixels,
                        col0: chunk.cols.start,
                        len: chunk.cols.len(),
                        b,
                        // SAFETY: `at` is the block's first pixel (indirect)
                        // or the call's (dense), both before `px.end`:
                        // `Call::cover` yields only non-empty calls in `px`.
                        c: unsafe { self.out.0.add(at) },
                        ldc: cout,
                        lanes,
                        bias: first.then(|| &self.conv.bias[sliver * nr..][..nr]),
                        // SAFETY: the residual has the output's shape.
                        res: if last {
                            self.res.map_or(std::ptr::null(), |r| unsafe { r.0.add(at) })
                        } else {
                            std::ptr::null()
                        },
                        act: if last { self.conv.act } else { Fused::None },
                        // The partial tile's call reuses the block the
                        // full tiles' call loaded.
                        prefetch: if i == 0 { prefetch } else { (std::ptr::null(), 0) },
                    };
                    // SAFETY: `for_isa` checked the CPU runs `isa`; for each of the `count`
                    // tiles the chunk's rows (indirect: `tile_stride` pointers
                    // apart; dense: pixels of the input, which has the
                    // output's pixels) each have `col0 + len` readable floats
                    // (a segment of the input or `zeros`), or the segment is
                    // skipped (a null first pointer); C and the residual
                    // hold the tiles' pixels of `ldc` channels from `at`
                    // (`pixels`: distinct and under `px.len()` for the rows
                    // used; dense: `count` × `rows` in order), written by
                    // this task only.
                    unsafe {
                        match self.conv.isa {
                            Isa::Avx512 => kernels::avx512(rows, self.conv.vectors, &step),
                            Isa::Avx2 => kernels::avx2(rows, self.conv.vectors, &step),
                        }
                    }
                }
            }
        }
    }
}

/// Where a microkernel call's input pixels are.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// Per tile (`tile_stride` apart), per segment of the chunk, `MR`
    /// pointers (the first `rows` used), the first null where the segment
    /// is padding for the whole tile.
    Indirect { ptrs: &'a [*const f32], tile_stride: usize },
    /// One segment; the call's pixel `i` starts at `base + i · ld`.
    Dense { base: *const f32, ld: usize },
}

/// One microkernel call: `tiles` runs of `rows` pixels × one sliver × one
/// chunk of k.
struct Step<'a> {
    a: Rows<'a>,
    /// Segments in the chunk.
    segs: usize,
    /// Tiles in the call (more than one only with `MR` rows): `MR`
    /// entries of `pixels` and `tile_stride` pointers apart, or dense,
    /// `MR` pixels apart.
    tiles: usize,
    col0: usize,
    len: usize,
    /// `[k][nr]` weights of this chunk.
    b: &'a [f32],
    /// The output at the block's first pixel, from which `pixels` counts,
    /// or (dense) at the call's first pixel, the next tile's `MR · ldc`
    /// further.
    c: *mut f32,
    /// Per tile, the output pixel of each of its `MR` rows, counted from
    /// `c`; `None`: tile `t`'s row `r` is pixel `t · MR + r`.
    pixels: Option<&'a [usize]>,
    ldc: usize,
    lanes: usize,
    /// Set on the first chunk: the accumulators start from it, not from C.
    bias: Option<&'a [f32]>,
    /// Null, or the residual at `c`'s pixel.
    res: *const f32,
    act: Fused,
    /// The weights the task reads next, and how many floats of them to
    /// fetch into L2 while this call computes from L1: at batch 1 a small
    /// map's layer does too few tiles per block of weights to hide the
    /// wait for them (resnet18's 7² layers ran at two thirds the rate of
    /// its 56² ones).
    prefetch: (*const f32, usize),
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};

    use super::{MR, NR, Rows, Step};
    use crate::ops::simd::{Simd, Ymm, Zmm, activate};

    /// The AVX-512 kernel for `rows` pixels and slivers of `vectors`
    /// registers: the whole sliver in one pass (up to 24 accumulators of
    /// 32 registers).
    ///
    /// # Safety
    /// The CPU has AVX-512F; as for [`kernel`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(rows: usize, vectors: usize, s: &Step) {
        macro_rules! by_rows {
            ($v:literal) => {
                // SAFETY: forwarded.
                unsafe {
                    match rows {
                        6 => kernel::<Zmm, 6, $v>(s, $v),
                        5 => kernel::<Zmm, 5, $v>(s, $v),
                        4 => kernel::<Zmm, 4, $v>(s, $v),
                        3 => kernel::<Zmm, 3, $v>(s, $v),
                        2 => kernel::<Zmm, 2, $v>(s, $v),
                        _ => kernel::<Zmm, 1, $v>(s, $v),
                    }
                }
            };
        }
        match vectors {
            4 => by_rows!(4),
            3 => by_rows!(3),
            2 => by_rows!(2),
            _ => by_rows!(1),
        }
    }

    /// The AVX2 kernel: 16 registers hold 6 pixels × 2 vectors of
    /// accumulators, so a sliver goes in passes of two vectors (the last
    /// of one where `vectors` is odd), each over the tile's input again
    /// (from L1).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; as for [`kernel`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(rows: usize, vectors: usize, s: &Step) {
        // SAFETY: forwarded.
        unsafe {
            match rows {
                6 => kernel::<Ymm, 6, 2>(s, vectors),
                5 => kernel::<Ymm, 5, 2>(s, vectors),
                4 => kernel::<Ymm, 4, 2>(s, vectors),
                3 => kernel::<Ymm, 3, 2>(s, vectors),
                2 => kernel::<Ymm, 2, 2>(s, vectors),
                _ => kernel::<Ymm, 1, 2>(s, vectors),
            }
        }
    }

    /// Bytes per cache line.
    const LINE_BYTES: usize = 64;

    /// Prefetches still to issue in one tile: `left` lines from `at`,
    /// `per_step` at each k step.
    #[derive(Clone, Copy)]
    struct Prefetch {
        at: *const u8,
        left: usize,
        per_step: usize,
    }

    impl Prefetch {
        const NONE: Self = Self { at: std::ptr::null(), left: 0, per_step: 0 };

        /// Fetches the next `lines` of them (at most those left) into L2.
        #[inline(always)]
        fn issue(&mut self, lines: usize) {
            let n = lines.min(self.left);
            for _ in 0..n {
                // SAFETY: SSE is part of x86-64, and a prefetch never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(self.at.cast()) };
                self.at = self.at.wrapping_add(LINE_BYTES);
            }
            self.left -= n;
        }
    }

    /// `R` pixels of every tile of the call, over slivers of `vectors`
    /// registers, in passes of `W` registers (`W` = `vectors`, or 2).
    ///
    /// # Safety
    /// The CPU runs `S`; see [`super::Job::run`] for the pointers.
    #[inline(always)]
    unsafe fn kernel<S: Simd, const R: usize, const W: usize>(s: &Step, vectors: usize) {
        debug_assert!(W == vectors || W == 2, "passes of {W} over {vectors} vectors");
        debug_assert!(s.tiles <= 1 || R == MR, "tiles are MR pixels apart");
        debug_assert!(matches!(s.a, Rows::Indirect { .. }) || s.segs == 1, "dense rows have one segment");
        // The cache lines to prefetch, from the one the block starts in,
        // spread evenly over the tiles and, in each, over its k steps.
        let (start, len) = s.prefetch;
        let skew = start as usize % LINE_BYTES;
        let lines = if len == 0 { 0 } else { (skew + len * size_of::<f32>()).div_ceil(LINE_BYTES) };
        let first = start.cast::<u8>().wrapping_sub(skew);
        let per_tile = lines.div_ceil(s.tiles.max(1));
        let per_step = per_tile.div_ceil((s.segs * s.len).max(1));
        for t in 0..s.tiles {
            let (from, to) = ((t * per_tile).min(lines), ((t + 1) * per_tile).min(lines));
            let mut pf = Prefetch { at: first.wrapping_add(from * LINE_BYTES), left: to - from, per_step };
            for v0 in (0..vectors).step_by(W) {
                // Passes wholly past the sliver's channels compute nothing.
                if v0 * S::LANES >= s.lanes {
                    break;
                }
                // SAFETY: forwarded from the caller: tile `t` is inside `a`,
                // C and the residual.
                unsafe {
                    if vectors - v0 >= W {
                        pass::<S, R, W>(s, t, v0 * S::LANES, vectors * S::LANES, pf);
                    } else {
                        pass::<S, R, 1>(s, t, v0 * S::LANES, vectors * S::LANES, pf);
                    }
                }
                pf = Prefetch::NONE;
            }
        }
    }

    /// Tile `t`'s `R` pixels × the `V` registers of channels from `col` of
    /// a sliver `nr` wide.
    ///
    /// # Safety
    /// As for [`kernel`].
    #[inline(always)]
    unsafe fn pass<S: Simd, const R: usize, const V: usize>(s: &Step, t: usize, col: usize, nr: usize, pf: Prefetch) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let pixel = |r: usize| s.pixels.map_or(t * MR + r, |p| p[t * MR + r]) * s.ldc + col;
            let c: [*mut f32; R] = std::array::from_fn(|r| s.c.add(pixel(r)));
            let res: [*const f32; R] =
                std::array::from_fn(|r| if s.res.is_null() { s.res } else { s.res.add(pixel(r)) });
            match s.a {
                Rows::Indirect { ptrs, tile_stride } => {
                    let tile = &ptrs[t * tile_stride..][..s.segs * MR];
                    self::tile::<S, R, V>(s, |seg| std::array::from_fn(|r| tile[seg * MR + r]), c, res, col, nr, pf)
                }
                Rows::Dense { base, ld } => {
                    let first = base.add(t * MR * ld);
                    self::tile::<S, R, V>(
                        s,
                        |_| std::array::from_fn(|r| first.wrapping_add(r * ld)),
                        c,
                        res,
                        col,
                        nr,
                        pf,
                    )
                }
            }
        }
    }

    /// One tile: `R` pixels at `c` (and `res`, unless null) × `V`
    /// registers of channels from `col`, reading segment `seg` of pixel `r`
    /// from `a(seg)[r]` and the weights of each k `nr` apart.
    ///
    /// # Safety
    /// As for [`kernel`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<S: Simd, const R: usize, const V: usize>(
        s: &Step,
        a: impl Fn(usize) -> [*const f32; R],
        c: [*mut f32; R],
        res: [*const f32; R],
        col: usize,
        nr: usize,
        mut pf: Prefetch,
    ) {
        let lanes = s.lanes.saturating_sub(col);
        // SAFETY: forwarded from the caller. Masks keep loads and stores
        // inside the sliver's `lanes` channels; the bias and weights are
        // padded to whole slivers.
        unsafe {
            // Made where they are used, not once before the k loop: AVX2's
            // masks are vector registers, and kept live across the loop they
            // pushed an accumulator out to the stack.
            let masks = || -> [S::Mask; V] { std::array::from_fn(|v| S::first(lanes.saturating_sub(v * S::LANES))) };
            let mut acc = [[S::zero(); V]; R];
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = match s.bias {
                    Some(b) => std::array::from_fn(|v| S::load(b.as_ptr().add(col + v * S::LANES))),
                    None => {
                        let m = masks();
                        let c = c[r];
                        // wrapping_add: a vector past `lanes` (mask 0) touches
                        // no memory, but its address may lie past the buffer.
                        std::array::from_fn(|v| S::load_masked(m[v], c.wrapping_add(v * S::LANES)))
                    }
                };
            }
            // wrapping_add: in a pass past the first (`col` > 0) the last
            // step leaves `bp` past the end of the weights, never read.
            let mut bp = s.b.as_ptr().add(col);
            for seg in 0..s.segs {
                let a: [*const f32; R] = a(seg);
                if a[0].is_null() {
                    // Padding for every pixel of the tile (`Geometry::tiles`);
                    // its share of the prefetches still goes out.
                    bp = bp.wrapping_add(s.len * nr);
                    pf.issue(pf.per_step * s.len);
                    continue;
                }
                let a = a.map(|p| p.add(s.col0));
                for j in 0..s.len {
                    if pf.left > 0 {
                        pf.issue(pf.per_step);
                    }
                    let b: [S; V] = std::array::from_fn(|v| S::load(bp.add(v * S::LANES)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av = S::splat(*a[r].add(j));
                        for v in 0..V {
                            acc[v] = S::mul_add(av, b[v], acc[v]);
                        }
                    }
                    bp = bp.wrapping_add(nr);
                }
            }
            // The sums leave the registers first, in a loop small enough to
            // unroll: an epilogue that indexed `acc` by a loop variable kept
            // the accumulators in memory, stored at every k step.
            const { assert!(R * V * S::LANES <= MR * NR, "a tile's sums fit the buffer") };
            let mut sums = [0f32; MR * NR];
            for (r, acc) in acc.iter().enumerate() {
                for (v, &x) in acc.iter().enumerate() {
                    S::store(sums.as_mut_ptr().add((r * V + v) * S::LANES), x);
                }
            }
            let m = masks();
            for r in 0..R {
                let c = c[r];
                for (v, &mask) in m.iter().enumerate() {
                    let mut x = S::load(sums.as_ptr().add((r * V + v) * S::LANES));
                    if !s.res.is_null() {
                        x = S::add(x, S::load_masked(mask, res[r].wrapping_add(v * S::LANES)));
                    }
                    x = activate(x, s.act);
                    // A full vector's plain store: AVX2's masked store is
                    // microcoded on AMD.
                    if lanes >= (v + 1) * S::LANES {
                        S::store(c.add(v * S::LANES), x);
                    } else {
                        S::store_masked(mask, c.wrapping_add(v * S::LANES), x);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::ops::test_util::{gflops, values};

    /// A layer cut down to some output channels gives the whole layer's
    /// values on them bit for bit; cut by input channels, the parts sum to
    /// the whole (with the bias in one part), on every ISA the CPU runs.
    #[test]
    fn slices_match_the_whole_layer() {
        for isa in Isa::supported() {
            let (cin, cout, k) = (24, 40, 3);
            let whole = NhwcConv::for_isa(
                isa,
                &values(cout * cin * k * k, 1),
                &values(cout, 2),
                cin,
                k,
                1,
                PadMode::Symmetric(1),
                Fused::None,
            );
            let x = Nhwc::from_nchw(&values(cin * 9 * 7, 3), 1, cin, 9, 7);
            let want = whole.forward(&x, None);
            let outs = whole.slice(8..29, 0..cin, true).forward(&x, None);
            for (px, got) in outs.data.chunks(21).enumerate() {
                assert_eq!(got, &want.data[px * cout + 8..][..21], "{isa:?}: pixel {px}");
            }
            let (a, b) = (whole.slice(0..cout, 0..10, true), whole.slice(0..cout, 10..cin, false));
            let xa = Nhwc::from_nchw(&values(10 * 9 * 7, 3), 1, 10, 9, 7);
            let xb = Nhwc::from_nchw(&values(cin * 9 * 7, 3)[10 * 9 * 7..], 1, cin - 10, 9, 7);
            let sum: Vec<f32> =
                a.forward(&xa, None).data.iter().zip(&b.forward(&xb, None).data).map(|(p, q)| p + q).collect();
            let worst = sum.iter().zip(&want.data).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(worst < 1e-4, "{isa:?}: parts off by {worst}");
        }
    }

    /// The transpose that pads gives the transpose, then the padded copy.
    #[test]
    fn padded_transposes_match_an_index_by_index_copy() {
        for (n, c, h, w) in [
            (1, 3, 7, 5),
            (2, 3, 4, 9),
            (3, 1, 1, 1),
            (1, 5, 6, 6),
            (1, 3, 0, 0),
            (1, 3, 4, 0),
            (0, 3, 4, 4),
            (2, 0, 3, 3),
        ] {
            let x = values(n * c * h * w, 7);
            for p in [
                Padding::default(),
                Padding { top: 1, bottom: 1, left: 1, right: 1 },
                Padding { top: 3, bottom: 2, left: 0, right: 3 },
            ] {
                let (hp, wp) = (h + p.top + p.bottom, w + p.left + p.right);
                let mut want = vec![0f32; n * hp * wp * c];
                for (i, v) in x.iter().enumerate() {
                    let (img, ch, y, xx) = (i / (c * h * w), i / (h * w) % c, i / w % h, i % w);
                    want[((img * hp + y + p.top) * wp + xx + p.left) * c + ch] = *v;
                }
                let case = format!("{n}x{c}x{h}x{w} {p:?}");
                for got in [Nhwc::from_nchw_padded(&x, n, c, h, w, p), Nhwc::from_nchw(&x, n, c, h, w).padded(p)] {
                    assert_eq!((got.n, got.h, got.w, got.c), (n, hp, wp, c), "{case}");
                    assert_eq!(got.data, want, "{case}");
                }
            }
        }
    }

    /// Slivers as wide as fit without waste.
    #[test]
    fn sliver_widths() {
        let couts = [16, 24, 32, 64, 96, 144, 160, 320, 1280, 70];
        assert_eq!(couts.map(|c| sliver_vectors(c, 16)), [1, 2, 2, 4, 3, 3, 2, 4, 4, 1]);
        assert_eq!(couts.map(|c| sliver_vectors(c, 8)), [2, 3, 4, 8, 6, 6, 5, 8, 8, 3]);
    }

    /// Blocks cover the map in order, in whole tiles (but the last), none
    /// empty; with a block per thread or more, a multiple of the threads
    /// and near equal.
    #[test]
    fn blocks_split_evenly() {
        let sizes = |pixels, threads| {
            let cut = PixelBlocks::new(pixels, threads);
            (0..cut.count).map(|b| cut.range(b).len()).collect::<Vec<_>>()
        };
        assert_eq!(sizes(784, 2), [192, 198, 198, 196]);
        assert_eq!(sizes(196, 2), [196]);
        for threads in 1..=16 {
            for pixels in (1..5000).chain((5000..40000).step_by(97)) {
                let cut = PixelBlocks::new(pixels, threads);
                let mut next = 0;
                for b in 0..cut.count {
                    let px = cut.range(b);
                    assert_eq!(px.start, next, "{pixels} px, {threads} threads: block {b} starts at {}", px.start);
                    assert!(!px.is_empty() && px.len() <= PB + MR, "{pixels} px, {threads} threads: block {b} {px:?}");
                    assert!(px.end == pixels || px.len().is_multiple_of(MR), "{pixels} px: block {b} {px:?}");
                    next = px.end;
                }
                assert_eq!(next, pixels, "{pixels} px, {threads} threads: covered");
                if pixels >= PB * threads {
                    assert!(cut.count.is_multiple_of(threads), "{pixels} px, {threads} threads: {} blocks", cut.count);
                    let lens: Vec<usize> = (0..cut.count).map(|b| cut.range(b).len()).collect();
                    let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                    // Whole tiles differ by at most one; the last block may
                    // end in a partial tile.
                    assert!(max - min < 2 * MR, "{pixels} px, {threads} threads: blocks of {min} to {max}");
                }
            }
        }
    }

    /// Milliseconds per layer without prefetching the weights and with the
    /// prefetch 1, 2 and 4 blocks ahead, on
    /// resnet18's shapes at batch 1: four layers of each shape with weights
    /// of their own, run in turn so that (as in the network) a layer's
    /// weights are not in cache when it starts. Alternating rounds, median
    /// of 15. `cargo test --release -p lineside-inference --lib
    /// nhwc_conv::tests::prefetch_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "measurement: prints figures"]
    fn prefetch_speed() {
        if Isa::detect().is_none() {
            eprintln!("no AVX-512F or AVX2: skipped");
            return;
        }
        // (cin, cout, k, s, h)
        let shapes = [
            (64, 64, 3, 1, 56),
            (128, 128, 3, 1, 28),
            (128, 256, 3, 2, 28),
            (256, 256, 3, 1, 14),
            (256, 512, 3, 2, 14),
            (512, 512, 3, 1, 7),
        ];
        for (cin, cout, k, s, h) in shapes {
            let convs: Vec<_> = (0..4)
                .map(|i| {
                    let (wt, b) = (values(cout * cin * k * k, 2 + i as u32), values(cout, 3));
                    NhwcConv::new(&wt, &b, cin, k, s, PadMode::Symmetric(k / 2), Fused::Relu).unwrap()
                })
                .collect();
            let x = Nhwc::from_nchw(&values(cin * h * h, 1), 1, cin, h, h);
            const AHEAD: [usize; 4] = [0, 1, 2, 4];
            let mut times = AHEAD.map(|_| Vec::new());
            for _ in 0..15 {
                for (ahead, t) in AHEAD.into_iter().zip(&mut times) {
                    let start = std::time::Instant::now();
                    for _ in 0..5 {
                        convs.iter().for_each(|c| drop(c.forward_with(&x, None, ahead, true)));
                    }
                    t.push(start.elapsed().as_secs_f64() * 1e3 / 20.0);
                }
            }
            let ms = times.map(|mut t| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            });
            let shown: Vec<String> = AHEAD.iter().zip(ms).map(|(a, ms)| format!("{a} ahead {ms:.3}")).collect();
            println!("{cin:>3}->{cout:>3} k{k} s{s} {h:>2}²: ms with the prefetch {}", shown.join(", "));
        }
    }

    /// Milliseconds per layer with tiles in raster order and grouped by
    /// padding, on resnet18's padded shapes at batch 1 and 8: alternating
    /// rounds, median of 15. `cargo test --release -p lineside-inference
    /// --lib nhwc_conv::tests::padding_groups_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "measurement: prints figures"]
    fn padding_groups_speed() {
        if Isa::detect().is_none() {
            eprintln!("no AVX-512F or AVX2: skipped");
            return;
        }
        // (cin, cout, s, h)
        let shapes = [(64, 64, 1, 56), (128, 128, 1, 28), (128, 256, 2, 28), (256, 256, 1, 14), (512, 512, 1, 7)];
        for n in [1, 8] {
            for (cin, cout, s, h) in shapes {
                let (wt, b) = (values(cout * cin * 9, 2), values(cout, 3));
                let conv = NhwcConv::new(&wt, &b, cin, 3, s, PadMode::Symmetric(1), Fused::Relu).unwrap();
                let x = Nhwc::from_nchw(&values(n * cin * h * h, 1), n, cin, h, h);
                let mut times = [false, true].map(|_| Vec::new());
                for _ in 0..15 {
                    for (grouped, t) in [false, true].into_iter().zip(&mut times) {
                        let start = std::time::Instant::now();
                        for _ in 0..5 {
                            drop(conv.forward_with(&x, None, PREFETCH_AHEAD, grouped));
                        }
                        t.push(start.elapsed().as_secs_f64() * 1e3 / 5.0);
                    }
                }
                let [raster, grouped] = times.map(|mut t| {
                    t.sort_by(f64::total_cmp);
                    t[t.len() / 2]
                });
                println!(
                    "n{n} {cin:>3}->{cout:>3} s{s} {h:>2}²: raster {raster:.3} ms, grouped {grouped:.3} ms ({:+.1}%)",
                    (grouped / raster - 1.0) * 100.0
                );
            }
        }
    }

    /// A tile skips a segment exactly where it is padding for every one of
    /// its pixels, the tiles and calls cover each pixel of the block once,
    /// and grouping by padding skips more than raster order: on a 14² map
    /// each edge's 12 pixels fill two tiles that skip a kernel row or
    /// column.
    #[test]
    fn tiles_skip_padding_shared_by_the_tile() {
        // (h, w, stride, block): one image, then blocks that start
        // mid-image and span two.
        for (h, w, s, px) in [(14, 14, 1, 0..196), (3, 6, 1, 0..18), (7, 7, 1, 10..75), (9, 10, 2, 3..40)] {
            let case = format!("{h}x{w} s{s} {px:?}");
            let x = Nhwc::from_nchw(&values(2 * 4 * h * w, 1), 2, 4, h, w);
            let p = PadMode::Symmetric(1).resolve(h, w, 3, s);
            let (oh, ow) = (out_size(h, 3, s, p.top, p.bottom), out_size(w, 3, s, p.left, p.right));
            let segs = Segments { count: 9, len: 4, merged: false };
            let skips = |grouped: bool| {
                let zeros = vec![0f32; 4];
                let g = Geometry { src: (&x).into(), p, oh, ow, kernel: 3, stride: s, segs, zeros, grouped };
                let t = g.tiles(px.clone());
                let mut seen = vec![0; px.len()];
                let mut skipped_segs = 0;
                for call in &t.calls {
                    assert!(call.rows == MR || call.tiles == 1, "{case}: {call:?}");
                    for tile in call.first..call.first + call.tiles {
                        let skipped: Vec<bool> = (0..9).map(|seg| t.ptrs[(tile * 9 + seg) * MR].is_null()).collect();
                        let mut shared = [true; 9];
                        for r in 0..call.rows {
                            let i = t.pixels[tile * MR + r];
                            seen[i] += 1;
                            g.taps(g.coordinates(px.start + i), |seg, ptr| shared[seg] &= ptr == g.zeros.as_ptr());
                        }
                        assert_eq!(skipped, shared, "{case}: tile {tile}");
                        skipped_segs += skipped.iter().filter(|&&s| s).count();
                    }
                }
                assert!(seen.iter().all(|&n| n == 1), "{case}: pixels covered {seen:?}");
                skipped_segs
            };
            let (raster, grouped) = (skips(false), skips(true));
            assert!(grouped >= raster, "{case}: grouped tiles skip {grouped} segments, raster {raster}");
            if h == 14 {
                assert!(grouped >= 8 * 3 && raster < 8 * 3, "{case}: grouped {grouped}, raster {raster}");
            }
        }
    }

    /// Grouped tiles give raster order's results (but for the sign of a
    /// zero: a skipped `+ 0 · w`) on maps of several blocks, whose blocks
    /// start mid-image, with a residual, at strides 1 and 2.
    #[test]
    fn grouped_tiles_match_raster_order() {
        for (n, cin, cout, s, h, w) in [(3, 16, 40, 1, 20, 19), (2, 24, 16, 2, 33, 30)] {
            let (wt, b) = (values(cout * cin * 9, 2), values(cout, 3));
            let Some(conv) = NhwcConv::new(&wt, &b, cin, 3, s, PadMode::Symmetric(1), Fused::Relu) else {
                eprintln!("no AVX-512F or AVX2: skipped");
                return;
            };
            let x = Nhwc::from_nchw(&values(n * cin * h * w, 1), n, cin, h, w);
            let raster = conv.forward_with(&x, None, PREFETCH_AHEAD, false);
            assert!(raster.pixels() > 2 * PB, "several blocks");
            let r = Nhwc::from_nchw(&values(raster.data.len(), 4), n, cout, raster.h, raster.w);
            let raster = conv.forward_with(&x, Some(&r), PREFETCH_AHEAD, false);
            let grouped = conv.forward_with(&x, Some(&r), PREFETCH_AHEAD, true);
            assert!(raster.data == grouped.data, "{n}x{cin}x{h}x{w} s{s}: grouped tiles differ");
        }
    }

    /// Against candle's convolution, on every instruction set this CPU
    /// runs: merged and per-tap segments, strides 1 and 2, 1×1, slivers of
    /// 1–4 AVX-512 registers (1, 2, 3, 4, 6 and 8 AVX2 ones, partial
    /// registers in one- and two-register passes), channel counts off the
    /// sliver and k off the block size, TF padding, with and without a
    /// residual, each fused activation.
    #[test]
    fn matches_candle_conv() {
        let sets = Isa::supported();
        eprintln!("instruction sets: {sets:?}");
        for isa in sets {
            matches_candle_conv_on(isa);
        }
    }

    fn matches_candle_conv_on(isa: Isa) {
        let dev = Device::Cpu;
        // (n, cin, cout, k, s, h, w, pad, residual)
        for case in [
            (2, 3, 64, 7, 2, 30, 26, PadMode::Symmetric(3), false),
            (1, 64, 64, 3, 1, 13, 11, PadMode::Symmetric(1), true),
            (3, 40, 70, 3, 2, 9, 10, PadMode::Symmetric(1), false),
            (2, 200, 130, 3, 1, 7, 7, PadMode::Symmetric(1), true),
            (2, 64, 128, 1, 2, 14, 14, PadMode::Symmetric(0), false),
            (1, 300, 20, 1, 1, 5, 6, PadMode::Symmetric(0), true),
            (2, 8, 24, 3, 2, 16, 15, PadMode::TfSame, false),
            (1, 3, 32, 3, 2, 17, 17, PadMode::Symmetric(1), true),
            (2, 32, 16, 1, 1, 9, 8, PadMode::Symmetric(0), true),
            (1, 96, 24, 1, 1, 7, 9, PadMode::Symmetric(0), true),
            (1, 16, 144, 1, 1, 6, 5, PadMode::Symmetric(0), false),
            // Dense 1×1: a second pixel block, columns split, a partial tile.
            (2, 160, 24, 1, 1, 11, 13, PadMode::Symmetric(0), true),
            (1, 300, 20, 1, 1, 1, 5, PadMode::Symmetric(0), false),
            // A partial register inside a two-register AVX2 pass.
            (1, 24, 12, 3, 1, 8, 9, PadMode::Symmetric(1), true),
            (2, 16, 28, 1, 1, 7, 6, PadMode::Symmetric(0), false),
            // Unpadded 3×3 taps (nine segments, no merging), images and
            // tiles running across rows.
            (2, 40, 24, 3, 2, 11, 12, PadMode::Symmetric(0), true),
            // Merged stems without a residual, so that `forward_nchw` runs
            // them too: MobileNetV2's padding and EfficientNet-Lite's TF one.
            (2, 3, 32, 3, 2, 17, 15, PadMode::Symmetric(1), false),
            (1, 3, 32, 3, 2, 16, 16, PadMode::TfSame, false),
        ]
        .iter()
        .zip([Fused::Relu, Fused::Relu6, Fused::None].iter().cycle())
        {
            let (&(n, cin, cout, k, s, h, w, pad, res), &act) = case;
            let case = format!("{isa:?} n{n} {cin}->{cout} k{k} s{s} {h}x{w} {pad:?} res {res} {act:?}");
            let x = values(n * cin * h * w, 1);
            let wt = values(cout * cin * k * k, 2);
            let b = values(cout, 3);
            let conv = NhwcConv::for_isa(isa, &wt, &b, cin, k, s, pad, act);
            let xt = Tensor::from_vec(x.clone(), (n, cin, h, w), &dev).unwrap();
            let p = pad.resolve(h, w, k, s);
            let xp = xt.pad_with_zeros(2, p.top, p.bottom).unwrap().pad_with_zeros(3, p.left, p.right).unwrap();
            let wt = Tensor::from_vec(wt, (cout, cin, k, k), &dev).unwrap();
            let y = xp.conv2d(&wt, 0, s, 1, 1).unwrap();
            let y = y.broadcast_add(&Tensor::from_vec(b, (1, cout, 1, 1), &dev).unwrap()).unwrap();
            let (_, _, oh, ow) = y.dims4().unwrap();
            let r = values(n * cout * oh * ow, 4);
            let want =
                if res { (y + Tensor::from_vec(r.clone(), (n, cout, oh, ow), &dev).unwrap()).unwrap() } else { y };
            let want = match act {
                Fused::None => want,
                Fused::Relu => want.relu().unwrap(),
                Fused::Relu6 => want.clamp(0f32, 6f32).unwrap(),
            };
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rn = res.then(|| Nhwc::from_nchw(&r, n, cout, oh, ow));
            let got = conv.forward(&Nhwc::from_nchw(&x, n, cin, h, w), rn.as_ref());
            assert_eq!((got.n, got.h, got.w, got.c), (n, oh, ow, cout), "{case}");
            if !res {
                // A network's first layer, padded in the transpose where merged.
                assert_eq!(conv.forward_nchw(&x, n, cin, h, w).data, got.data, "{case}: from NCHW");
            }
            let got = got.to_nchw();
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-3, "{case}: max err {err}");
        }
        let conv =
            NhwcConv::for_isa(isa, &values(8 * 4 * 9, 2), &values(8, 3), 4, 3, 1, PadMode::Symmetric(1), Fused::Relu);
        let empty = conv.forward(&Nhwc { data: Vec::new(), n: 0, h: 5, w: 5, c: 4 }, None);
        assert_eq!((empty.n, empty.h, empty.w, empty.c, empty.data.len()), (0, 5, 5, 8, 0));
    }

    /// GFLOP/s on resnet18's convolutions against the NCHW GEMM path, at
    /// batch 1 and 8: `cargo test --release -p lineside-inference --lib
    /// nhwc_conv::tests::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        use crate::ops::{Activation, ConvBnAct};
        let dev = Device::Cpu;
        // (cin, cout, k, s, h)
        let shapes = [
            (3, 64, 7, 2, 224),
            (64, 64, 3, 1, 56),
            (64, 128, 3, 2, 56),
            (128, 128, 3, 1, 28),
            (256, 256, 3, 1, 14),
            (512, 512, 3, 1, 7),
            (256, 512, 1, 2, 14),
        ];
        for n in [1, 8] {
            for (cin, cout, k, s, h) in shapes {
                let pad = PadMode::Symmetric(k / 2);
                let (wt, b) = (values(cout * cin * k * k, 2), values(cout, 3));
                let x = values(n * cin * h * h, 1);
                let conv = NhwcConv::new(&wt, &b, cin, k, s, pad, Fused::Relu).unwrap();
                let xn = Nhwc::from_nchw(&x, n, cin, h, h);
                let layer = ConvBnAct::new(
                    Tensor::from_vec(wt, (cout, cin, k, k), &dev).unwrap(),
                    Tensor::from_vec(b, cout, &dev).unwrap(),
                    s,
                    1,
                    pad,
                    Activation::Relu,
                    crate::Kernels::Lineside,
                )
                .unwrap();
                let xt = Tensor::from_vec(x, (n, cin, h, h), &dev).unwrap();
                let oh = (h + 2 * (k / 2) - k) / s + 1;
                let flops = 2.0 * (n * cout * oh * oh * cin * k * k) as f64;
                let time = |f: &mut dyn FnMut()| gflops(flops, 1e9, f);
                let ours = time(&mut || drop(conv.forward(&xn, None)));
                let nchw = time(&mut || drop(layer.forward(&xt).unwrap()));
                println!("n{n} {cin:>3}->{cout:>3} k{k} s{s} {h:>3}²: nhwc {ours:6.1} GFLOP/s, nchw {nchw:6.1}");
            }
        }
    }
}
