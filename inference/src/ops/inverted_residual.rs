//! Inverted-residual blocks (`expand 1×1 → depthwise → project 1×1 [+ x]`)
//! and depthwise-separable ones (the same without the expansion) fused
//! over bands of rows, channels-last.
//!
//! Layer by layer, MobileNetV2's first blocks write their expanded map
//! (112×112×96 floats, 4.8 MB for one image) past the 2 MB L2 before the
//! depthwise pass reads it back, and the depthwise output once more before
//! the projection: the depthwise kernel, which does little arithmetic per
//! load, then waits on L3. Here each task owns a range of output rows and
//! walks it band by band: it expands only the input rows the band needs
//! into a ring of rows, runs the depthwise pass on the band and projects
//! it straight away, so neither map leaves L2. The ring carries the rows
//! two bands share, so each input row is expanded once per range; only
//! where two ranges meet are `k - stride` rows expanded twice.
//!
//! A depthwise-separable block (MobileNetV2's and EfficientNet-Lite's
//! first, on 112×112×32 maps) has no expansion: its depthwise pass reads
//! the input's rows in place, and only its output (1.6 MB layer by layer)
//! is kept to a band.
//!
//! Band by band, the arithmetic is the unfused layers', in the same order,
//! so the output is bit for bit theirs.
//!
//! With more threads than images on a small map, ranges of rows cost too
//! much: on a 7×7 map two ranges expand 11 rows for 7 output rows, and a
//! 5×5 kernel on 14×14 expands 22 for 14. There the block is cut by the
//! channels of its expansion instead ([`InvertedResidual::forward_split`]):
//! each part expands, filters and projects its own channels of the whole
//! map, which repeats no work and reads only its part of the weights, and
//! the parts' projections are summed. The sum is taken in another order
//! than the whole projection's, so these outputs differ from the layers'
//! in the last bits.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::nhwc_conv::{Nhwc, NhwcConv};
use super::nhwc_depthwise::NhwcDepthwise;
use super::sgemm::Fused;

/// Output pixels per band: enough for the projection's microkernel to run
/// whole tiles, few enough that the ring of expanded rows (5 rows of
/// 112×96 floats, 210 KiB, on MobileNetV2's first block) stays in L2.
const BAND_PIXELS: usize = 128;

/// Expanded maps from this many bytes per image run band by band on a
/// single thread. Smaller ones stay in L2 between the layers anyway, and
/// bands of a small map read the 1×1 weights again for every band: on one
/// thread (as each share of a batch runs) MobileNetV2's 28², 14² and 7²
/// blocks ran 4–6% slower banded, its 112² and 56² blocks 16–51% faster
/// (`tests::speed`, docs/performance.md).
const FUSE_FROM_BYTES: usize = 1 << 20;

thread_local! {
    /// Each thread's ring of expanded rows and band of depthwise output,
    /// kept from one range to the next: allocated and zeroed afresh for
    /// every range they were 2.5% of a batch-1 MobileNetV2 pass on two
    /// threads (`perf`, docs/performance.md). A call that finds it taken
    /// (none does: a range runs on one thread, and nothing in it forks)
    /// would just start an empty one.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Fewest output rows per range of rows.
const MIN_RANGE_ROWS: usize = 4;

/// Ranges of rows shorter than this make a block split by channels instead
/// (where it can be): each range expands `k - stride` rows more than it
/// projects, 2/7 more on a 14×14 map cut in two for a 3×3 kernel and 4/7
/// for a 5×5. Two threads on one image, ms, ranges of rows → parts, median
/// of 15 rounds in each of two runs (`tests::speed`): MobileNetV2's
/// 64→384 14² block 0.090 → 0.083 and 0.127 → 0.117, its 96→576 14² block
/// 0.134 → 0.126 and 0.142 → 0.132, its 7² block 0.106 → 0.099 and 0.107 →
/// 0.088; tf_efficientnet_lite0's 14² block 0.251 → 0.226 and 0.272 →
/// 0.247, its 7² block 0.202 → 0.156 and 0.181 → 0.142. On 28² maps (14
/// rows a range) parts were slower: 0.116 → 0.126 and 0.138 → 0.148 for
/// MobileNetV2's, 0.209 → 0.234 and 0.177 → 0.179 for lite0's.
const SHORT_RANGE_ROWS: usize = 8;

/// Ranges of rows per image for a batch of `n` on `threads` threads: one
/// per thread (with one image, a range per thread), each of at least
/// [`MIN_RANGE_ROWS`] of the `oh` output rows.
fn ranges_of_rows(oh: usize, n: usize, threads: usize) -> usize {
    threads.div_ceil(n.max(1)).clamp(1, oh.div_ceil(MIN_RANGE_ROWS).max(1))
}

/// Fewest expanded channels per part of a block split by channels: two
/// AVX-512 registers, so that a part's microkernel still runs whole tiles.
const MIN_PART_CHANNELS: usize = 32;

/// Most parts a block is cut into; more threads per image than this share
/// the parts.
const MAX_PARTS: usize = 8;

/// Part boundaries fall on multiples of this many channels: one AVX2
/// register (the depthwise kernel masks a tail of fewer on AVX-512).
const PART_ALIGN: usize = 8;

/// An inverted-residual or (without `expand`) depthwise-separable block,
/// run band by band where its expanded map is large (module docs).
#[derive(Debug, Clone)]
pub struct InvertedResidual {
    expand: Option<NhwcConv>,
    dw: NhwcDepthwise,
    project: NhwcConv,
    skip: bool,
    /// The block cut by expanded channels into 2, 3, … [`MAX_PARTS`]
    /// parts, each cut built by the first pass that asks for that many:
    /// each part a block of its own, on those channels' expansion and
    /// depthwise filters and the projection's weights that read them, the
    /// first with the projection's bias and the skip.
    parts: Box<[OnceLock<Option<Vec<InvertedResidual>>>]>,
}

impl InvertedResidual {
    /// Whether the layers chain into a block: the 1×1 layers pointwise
    /// ([`NhwcConv::is_pointwise`]), channels matching, and with `skip` a
    /// projection back to the input's channels at stride 1.
    pub fn chains(expand: Option<&NhwcConv>, dw: &NhwcDepthwise, project: &NhwcConv, skip: bool) -> bool {
        let expands = expand.is_none_or(|e| e.is_pointwise() && e.out_channels() == dw.channels());
        let chained = expands && project.is_pointwise() && project.in_channels() == dw.channels();
        let cin = expand.map_or(dw.channels(), NhwcConv::in_channels);
        chained && (!skip || (dw.stride() == 1 && project.out_channels() == cin))
    }

    /// The block.
    ///
    /// # Panics
    /// Unless the layers [chain](Self::chains).
    pub fn new(expand: Option<NhwcConv>, dw: NhwcDepthwise, project: NhwcConv, skip: bool) -> Self {
        assert!(Self::chains(expand.as_ref(), &dw, &project, skip), "layers that do not chain into a block");
        Self { expand, dw, project, skip, parts: (2..=MAX_PARTS).map(|_| OnceLock::new()).collect() }
    }

    /// The block cut into up to `parts` parts by expanded channels, as
    /// many as leave [`MIN_PART_CHANNELS`] to a part before the bounds are
    /// rounded up to [`PART_ALIGN`] (so the last part may have a few
    /// fewer), or `None` where that gives one part, the projection has
    /// an activation, which a sum of parts cannot fuse, or the block has
    /// no expansion: a part would filter a slice of every input pixel's
    /// channels, which no kernel reads in place (and those blocks run on
    /// 112² maps, long ranges of rows).
    fn cut(&self, parts: usize) -> Option<Vec<InvertedResidual>> {
        let ce = self.dw.channels();
        let parts = parts.min(ce / MIN_PART_CHANNELS);
        let expand = self.expand.as_ref()?;
        if parts < 2 || self.project.fused() != Fused::None {
            return None;
        }
        let bound = |p: usize| if p == parts { ce } else { (ce * p / parts).next_multiple_of(PART_ALIGN).min(ce) };
        let (cin, cout) = (expand.in_channels(), self.project.out_channels());
        let cut = (0..parts)
            .map(|p| bound(p)..bound(p + 1))
            .filter(|r| !r.is_empty())
            .enumerate()
            .map(|(p, r)| {
                let (expand, dw) = (expand.slice(r.clone(), 0..cin, true), self.dw.slice(r.clone()));
                Self::new(Some(expand), dw, self.project.slice(0..cout, r, p == 0), self.skip && p == 0)
            })
            .collect::<Vec<_>>();
        (cut.len() > 1).then_some(cut)
    }

    /// Floats in one image's expanded map (the depthwise pass's input) for
    /// an `h`×`w` input: what the unfused layers would send through the
    /// caches.
    pub fn expanded_len(&self, h: usize, w: usize) -> usize {
        h * w * self.dw.channels()
    }

    /// `project(dw(expand(x))) [+ x]`, NHWC in and out, where the caller
    /// may count on `threads` threads (1 for one share of a batch where
    /// every thread has a share; see `models::micro_batch::threads_here`).
    /// Where the threads outnumber the images: split by channels where
    /// ranges of rows would be short ([`SHORT_RANGE_ROWS`]), else band by
    /// band in ranges of rows. Otherwise band by band where one image's
    /// expanded map holds 1 MiB or more, else layer by layer. With
    /// two threads on one image, a range of rows each ran faster than
    /// splitting every layer even on small maps, whose layers would join
    /// the threads three times per block.
    pub fn forward(&self, x: &Nhwc, threads: usize) -> Nhwc {
        if threads > x.n {
            match self.split_for(x, threads) {
                Some(parts) => self.forward_split(x, parts),
                None => self.forward_banded(x, threads),
            }
        } else if self.expanded_len(x.h, x.w) * size_of::<f32>() >= FUSE_FROM_BYTES {
            self.forward_banded(x, threads)
        } else {
            self.forward_layers(x)
        }
    }

    /// The parts to split `x` into for `threads` threads, where ranges of
    /// rows would be shorter than [`SHORT_RANGE_ROWS`] and the cut gives at
    /// least as many parts as there would be ranges.
    fn split_for(&self, x: &Nhwc, threads: usize) -> Option<&[InvertedResidual]> {
        let (_, oh, _) = self.dw.output_geometry(x.h, x.w);
        let ranges = ranges_of_rows(oh, x.n, threads);
        if oh.div_ceil(ranges) >= SHORT_RANGE_ROWS {
            return None;
        }
        let wanted = threads.div_ceil(x.n.max(1)).clamp(2, MAX_PARTS);
        let parts = self.parts[wanted - 2].get_or_init(|| self.cut(wanted)).as_deref()?;
        (parts.len() >= ranges).then_some(parts)
    }

    /// Split into `parts` by expanded channels (module docs): every image
    /// by every part at once, each band by band on one thread, then the
    /// parts summed.
    fn forward_split(&self, x: &Nhwc, parts: &[InvertedResidual]) -> Nhwc {
        let (oh, ow) = self.output_size(x);
        let first = &parts[0];
        let per_image = oh * ow * first.project.out_channels();
        let band = (BAND_PIXELS / ow.max(1)).clamp(1, oh.max(1));
        let mut data = vec![0f32; x.n * per_image];
        if data.is_empty() {
            return Nhwc { data, n: x.n, h: oh, w: ow, c: first.project.out_channels() };
        }
        // The first part writes the output, each other part a map of its own.
        let mut rest = vec![0f32; (parts.len() - 1) * x.n * per_image];
        let mut tasks: Vec<(usize, &InvertedResidual, &mut [f32])> = data
            .chunks_mut(per_image)
            .enumerate()
            .map(|(img, out)| (img, first, out))
            .chain(rest.chunks_mut(per_image).enumerate().map(|(i, out)| (i % x.n, &parts[1 + i / x.n], out)))
            .collect();
        tasks.par_iter_mut().for_each(|(img, part, out)| part.rows(x, *img, 0..oh, band, out));
        // The sum, shared over the threads like the parts were.
        let total = data.len();
        let piece = (total / (2 * rayon::current_num_threads())).max(4096);
        data.par_chunks_mut(piece).enumerate().for_each(|(i, out)| {
            for other in rest.chunks(total) {
                for (o, r) in out.iter_mut().zip(&other[i * piece..]) {
                    *o += r;
                }
            }
        });
        Nhwc { data, n: x.n, h: oh, w: ow, c: first.project.out_channels() }
    }

    /// Layer by layer, each layer over the whole batch.
    pub fn forward_layers(&self, x: &Nhwc) -> Nhwc {
        let filtered = match &self.expand {
            Some(e) => self.dw.forward(&e.forward(x, None)),
            None => self.dw.forward(x),
        };
        self.project.forward(&filtered, self.skip.then_some(x))
    }

    /// The block's input channels.
    fn in_channels(&self) -> usize {
        self.expand.as_ref().map_or(self.dw.channels(), NhwcConv::in_channels)
    }

    /// The output's height and width for `x`.
    ///
    /// # Panics
    /// Where `x` has other channels than the block's input, or a skip
    /// would be added to a map of another size.
    fn output_size(&self, x: &Nhwc) -> (usize, usize) {
        assert_eq!(x.c, self.in_channels(), "input channels");
        let (_, oh, ow) = self.dw.output_geometry(x.h, x.w);
        if self.skip {
            // `chains` checked the stride and channels; padding that changes
            // the size would misplace the residual's rows.
            assert_eq!((oh, ow), (x.h, x.w), "a skip around a depthwise pass that changes the map's size");
        }
        (oh, ow)
    }

    /// Band by band, in ranges of rows for `threads` threads.
    pub fn forward_banded(&self, x: &Nhwc, threads: usize) -> Nhwc {
        let cout = self.project.out_channels();
        let (oh, ow) = self.output_size(x);
        let mut data = vec![0f32; x.n * oh * ow * cout];
        let ranges = ranges_of_rows(oh, x.n, threads);
        let per_range = oh.div_ceil(ranges).max(1);
        let band = (BAND_PIXELS / ow.max(1)).clamp(1, per_range);
        if !data.is_empty() {
            data.par_chunks_mut(oh * ow * cout).enumerate().for_each(|(img, out)| {
                out.par_chunks_mut(per_range * ow * cout).enumerate().for_each(|(r, out)| {
                    let first = r * per_range;
                    self.rows(x, img, first..first + out.len() / (ow * cout), band, out)
                })
            });
        }
        Nhwc { data, n: x.n, h: oh, w: ow, c: cout }
    }

    /// Output rows `rows` of image `img` into `out`, `band` rows at a time.
    fn rows(&self, x: &Nhwc, img: usize, rows: std::ops::Range<usize>, band: usize, out: &mut [f32]) {
        let (cin, ce, cout) = (x.c, self.dw.channels(), self.project.out_channels());
        let (k, s) = (self.dw.kernel(), self.dw.stride());
        let (p, _, ow) = self.dw.output_geometry(x.h, x.w);
        let image = &x.data[img * x.h * x.w * cin..][..x.h * x.w * cin];
        let (in_row, ex_row) = (x.w * cin, x.w * ce);
        // Input rows under output rows `o0..o1`.
        let under =
            |o0: usize, o1: usize| (o0 * s).saturating_sub(p.top)..((o1 - 1) * s + k).saturating_sub(p.top).min(x.h);
        // Input row `iy` is expanded into slot `iy % slots`: a band's input
        // rows are at most `slots` consecutive rows, so they never share one.
        let slots = (band - 1) * s + k;
        let ring_len = if self.expand.is_some() { slots * ex_row } else { 0 };
        let band_len = band * ow * ce;
        // Every value is written before it is read: the kept buffer's old
        // contents never show.
        let mut scratch = SCRATCH.take();
        if scratch.len() < ring_len + band_len {
            scratch.resize(ring_len + band_len, 0.0);
        }
        let (ring, depthwise) = scratch[..ring_len + band_len].split_at_mut(ring_len);
        let zeros = vec![0f32; ce];
        let mut expanded_to = 0;
        for o0 in rows.clone().step_by(band) {
            let o1 = (o0 + band).min(rows.end);
            let need = under(o0, o1);
            if let Some(expand) = &self.expand {
                let mut iy = expanded_to.max(need.start);
                while iy < need.end {
                    // Up to the ring's end; the rest wraps to its start.
                    let slot = iy % slots;
                    let n = (need.end - iy).min(slots - slot);
                    let src = &image[iy * in_row..][..n * in_row];
                    expand.pointwise_into(src, &mut ring[slot * ex_row..][..n * ex_row], None);
                    iy += n;
                }
                expanded_to = need.end;
            }
            // Without an expansion the depthwise pass reads the input's own
            // rows (`ex_row == in_row` then).
            let (source, slots) = if self.expand.is_some() { (&*ring, slots) } else { (image, usize::MAX) };
            for (oy, dst) in (o0..o1).zip(depthwise.chunks_exact_mut(ow * ce)) {
                let row = |iy: usize| {
                    debug_assert!(iy >= x.h || need.contains(&iy), "row {iy} outside the band's {need:?}");
                    (iy < x.h).then(|| &source[(iy % slots) * ex_row..][..ex_row])
                };
                self.dw.row_into(oy, row, (x.h, x.w), &zeros, dst);
            }
            let px = (o1 - o0) * ow;
            let residual = self.skip.then(|| &image[o0 * ow * cout..][..px * cout]);
            let dst = &mut out[(o0 - rows.start) * ow * cout..][..px * cout];
            self.project.pointwise_into(&depthwise[..px * ce], dst, residual);
        }
        SCRATCH.set(scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::PadMode;
    use crate::ops::sgemm::Fused;
    use crate::ops::simd::Isa;
    use crate::ops::test_util::values;

    fn pointwise(cin: usize, cout: usize, act: Fused, seed: u32) -> NhwcConv {
        NhwcConv::new(&values(cout * cin, seed), &values(cout, seed + 1), cin, 1, 1, PadMode::Symmetric(0), act)
            .unwrap()
    }

    /// A block of `cin → ce → cout` channels with a `k`×`k` stride-`s`
    /// depthwise pass, its weights from `seed` on.
    #[allow(clippy::too_many_arguments)]
    fn block(
        cin: usize,
        ce: usize,
        cout: usize,
        k: usize,
        s: usize,
        pad: PadMode,
        skip: bool,
        seed: u32,
    ) -> InvertedResidual {
        let dw = NhwcDepthwise::new(&values(ce * k * k, seed + 2), &values(ce, seed + 3), k, s, pad, Fused::Relu6);
        InvertedResidual::new(
            Some(pointwise(cin, ce, Fused::Relu6, seed)),
            dw.unwrap(),
            pointwise(ce, cout, Fused::None, seed + 4),
            skip,
        )
    }

    /// A depthwise-separable block of `c → cout` channels: [`block`]'s
    /// layers without the expansion.
    fn separable(c: usize, cout: usize, k: usize, s: usize, pad: PadMode, skip: bool, seed: u32) -> InvertedResidual {
        let InvertedResidual { dw, project, .. } = block(c, c, cout, k, s, pad, skip, seed);
        InvertedResidual::new(None, dw, project, skip)
    }

    /// Band by band equals layer by layer, bit for bit: 3×3 and 5×5,
    /// strides 1 and 2, PyTorch and TF "SAME" padding, one band per range
    /// and many (the ring wrapping), ranges split across 1–3 threads, odd
    /// sizes, channel counts off the 16 lanes, with and without the skip,
    /// with and without the expansion.
    #[test]
    fn banded_equals_layers() {
        if Isa::detect().is_none() {
            eprintln!("no AVX-512F or AVX2: skipped");
            return;
        }
        // (n, cin, expanded, cout, k, s, h, w, pad, skip)
        let cases = [
            (1, 16, 96, 24, 3, 2, 23, 21, PadMode::Symmetric(1), false),
            (1, 24, 144, 24, 3, 1, 19, 17, PadMode::Symmetric(1), true),
            (2, 16, 40, 16, 5, 1, 13, 9, PadMode::Symmetric(2), true),
            (1, 8, 40, 24, 5, 2, 30, 7, PadMode::TfSame, false),
            (3, 24, 72, 40, 3, 2, 6, 5, PadMode::TfSame, false),
            (1, 8, 24, 8, 3, 1, 1, 150, PadMode::Symmetric(1), true),
            (1, 8, 24, 8, 3, 1, 200, 1, PadMode::Symmetric(1), true),
            // Stride 2 with the ring wrapping: 5×5 and 3×3, TF "SAME".
            (1, 8, 40, 24, 5, 2, 61, 21, PadMode::TfSame, false),
            (1, 8, 24, 16, 3, 2, 57, 31, PadMode::TfSame, false),
        ];
        for (i, &(n, cin, ce, cout, k, s, h, w, pad, skip)) in cases.iter().enumerate() {
            let seed = 10 * i as u32;
            // The separable block reads the expanded channels as its input;
            // its skip needs `cout == ce`.
            let separable = separable(ce, cout, k, s, pad, skip && cout == ce, seed);
            for (kind, block, c) in
                [("inverted", block(cin, ce, cout, k, s, pad, skip, seed), cin), ("separable", separable, ce)]
            {
                let x = Nhwc::from_nchw(&values(n * c * h * w, seed + 5), n, c, h, w);
                let want = block.forward_layers(&x);
                for threads in 1..=3 {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let got = pool.install(|| block.forward_banded(&x, threads));
                    assert_eq!((got.n, got.h, got.w, got.c), (want.n, want.h, want.w, want.c), "{kind} case {i}");
                    let diff = got.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
                    assert_eq!(diff, 0, "{kind} case {i}, {threads} threads: {diff} values differ");
                }
            }
        }
    }

    /// Split by expanded channels equals layer by layer to float rounding
    /// (the projection sums in another order): 3×3 and 5×5, strides 1 and
    /// 2, both paddings, 2–4 parts (one not on a multiple of 16 channels),
    /// with and without the skip, one image and several, on 1–3 threads.
    /// Where a cut would leave one part, or the projection has an
    /// activation, there is none.
    #[test]
    fn split_by_channels_matches_layers() {
        if Isa::detect().is_none() {
            eprintln!("no AVX-512F or AVX2: skipped");
            return;
        }
        // (n, cin, expanded, cout, k, s, h, w, pad, skip, parts)
        let cases = [
            (1, 32, 192, 32, 3, 1, 7, 7, PadMode::Symmetric(1), true, 2),
            (1, 64, 384, 96, 3, 1, 14, 14, PadMode::Symmetric(1), false, 3),
            (2, 40, 240, 40, 5, 1, 9, 11, PadMode::TfSame, true, 2),
            (1, 24, 144, 40, 5, 2, 15, 13, PadMode::TfSame, false, 4),
            (3, 16, 72, 24, 3, 2, 8, 6, PadMode::Symmetric(1), false, 2),
        ];
        for (i, &(n, cin, ce, cout, k, s, h, w, pad, skip, parts)) in cases.iter().enumerate() {
            let seed = 7 * i as u32;
            let block = block(cin, ce, cout, k, s, pad, skip, seed);
            let x = Nhwc::from_nchw(&values(n * cin * h * w, seed + 5), n, cin, h, w);
            let want = block.forward_layers(&x);
            let cut = block.cut(parts).expect("a block that splits");
            assert_eq!(cut.len(), parts, "case {i}");
            assert_eq!(cut.iter().map(|p| p.dw.channels()).sum::<usize>(), ce, "case {i}: every channel once");
            let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            for threads in 1..=3 {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let got = pool.install(|| block.forward_split(&x, &cut));
                assert_eq!((got.n, got.h, got.w, got.c), (want.n, want.h, want.w, want.c), "case {i}");
                let worst = got.data.iter().zip(&want.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(worst <= 1e-5 * scale, "case {i}, {threads} threads: off by {worst} of {scale}");
            }
        }
        let narrow = block(8, 48, 8, 3, 1, PadMode::Symmetric(1), true, 3);
        assert!(narrow.cut(2).is_none(), "48 channels make one part of 32 or more");
        let separable = separable(64, 16, 3, 1, PadMode::Symmetric(1), false, 3);
        assert!(separable.cut(2).is_none(), "no expansion to cut");
        let dw = NhwcDepthwise::new(&values(64 * 9, 1), &values(64, 2), 3, 1, PadMode::Symmetric(1), Fused::Relu6);
        let activated = InvertedResidual::new(
            Some(pointwise(8, 64, Fused::Relu6, 3)),
            dw.unwrap(),
            pointwise(64, 8, Fused::Relu, 4),
            false,
        );
        assert!(activated.cut(1).is_none() && activated.cut(2).is_none());
    }

    /// A pass with more threads than images takes the split where ranges
    /// of rows would be short (7² and 14² on two threads) and the cut has
    /// as many parts as there would be ranges, and the bands elsewhere;
    /// both give the layers' output.
    #[test]
    fn forward_picks_split_or_bands() {
        if Isa::detect().is_none() {
            eprintln!("no AVX-512F or AVX2: skipped");
            return;
        }
        // (threads, images, size, split): on 8 threads a 14² map has 4
        // ranges of rows, and 96 channels only 3 parts.
        let cases = [(2, 1, 7, true), (2, 1, 14, true), (2, 1, 28, false), (2, 1, 56, false), (4, 2, 14, true)];
        for (threads, n, h, split) in cases.into_iter().chain([(8, 1, 14, false)]) {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let block = block(16, 96, 16, 3, 1, PadMode::Symmetric(1), true, 3);
            let x = Nhwc::from_nchw(&values(n * 16 * h * h, 5), n, 16, h, h);
            let what = format!("{n} × {h}² on {threads} threads");
            assert_eq!(block.split_for(&x, threads).is_some(), split, "{what}: split or not");
            let got = pool.install(|| block.forward(&x, threads));
            let want = block.forward_layers(&x);
            let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got.data.iter().zip(&want.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= 1e-5 * scale, "{what}: off by {worst} of {scale}");
        }
    }

    /// Blocks whose layers do not chain are refused.
    #[test]
    fn refuses_layers_that_do_not_chain() {
        if Isa::detect().is_none() {
            eprintln!("no AVX-512F or AVX2: skipped");
            return;
        }
        let dw = |c, s| NhwcDepthwise::new(&values(c * 9, 1), &values(c, 2), 3, s, PadMode::Symmetric(1), Fused::Relu6);
        let (e, p) = (pointwise(16, 96, Fused::Relu6, 3), pointwise(96, 16, Fused::None, 4));
        assert!(InvertedResidual::chains(Some(&e), &dw(96, 1).unwrap(), &p, true));
        assert!(!InvertedResidual::chains(Some(&e), &dw(96, 2).unwrap(), &p, true), "a skip at stride 2");
        assert!(!InvertedResidual::chains(Some(&e), &dw(64, 1).unwrap(), &p, false), "expanded channels");
        let strided = NhwcConv::new(&values(96 * 16, 5), &values(96, 6), 16, 1, 2, PadMode::Symmetric(0), Fused::Relu6);
        assert!(!InvertedResidual::chains(Some(&strided.unwrap()), &dw(96, 1).unwrap(), &p, false), "a strided 1×1");
        // Without the expansion the depthwise pass takes the input's channels.
        assert!(InvertedResidual::chains(None, &dw(96, 1).unwrap(), &p, false));
        assert!(!InvertedResidual::chains(None, &dw(96, 1).unwrap(), &p, true), "a skip from 96 to 16 channels");
        assert!(InvertedResidual::chains(None, &dw(16, 1).unwrap(), &pointwise(16, 16, Fused::None, 5), true));
        assert!(!InvertedResidual::chains(None, &dw(64, 1).unwrap(), &p, false), "projected channels");
    }

    /// Milliseconds per image of MobileNetV2's and tf_efficientnet_lite0's
    /// inverted-residual blocks, layer by layer against band by band and,
    /// on two threads, split by channels, on one thread (as each share of a
    /// batch runs) and on two (under the warm workers, as a batch-1 pass
    /// runs); rounds alternate and the figure is the median round:
    /// `cargo test --release -p lineside-inference --lib
    /// inverted_residual::tests::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        // (cin, expanded, cout, kernel, stride, input size, skip); `cin ==
        // expanded`: the depthwise-separable block, without an expansion.
        let blocks = [
            (32, 32, 16, 3, 1, 112, false),
            (16, 96, 24, 3, 2, 112, false),
            (24, 144, 24, 3, 1, 56, true),
            (24, 144, 32, 3, 2, 56, false),
            (32, 192, 32, 3, 1, 28, true),
            (64, 384, 64, 3, 1, 14, true),
            (96, 576, 96, 3, 1, 14, true),
            (160, 960, 160, 3, 1, 7, true),
            (40, 240, 40, 5, 1, 28, true),
            (112, 672, 112, 5, 1, 14, true),
            (192, 1152, 192, 5, 1, 7, true),
        ];
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for (cin, ce, cout, k, s, h, skip) in blocks {
                let pad = PadMode::Symmetric(k / 2);
                let block = if cin == ce {
                    separable(ce, cout, k, s, pad, skip, 1)
                } else {
                    block(cin, ce, cout, k, s, pad, skip, 1)
                };
                let cut = block.cut(threads);
                let x = Nhwc::from_nchw(&values(cin * h * h, 5), 1, cin, h, h);
                let time = |f: &dyn Fn() -> Nhwc| {
                    let t = std::time::Instant::now();
                    for _ in 0..20 {
                        drop(f());
                    }
                    t.elapsed().as_secs_f64() * 1e3 / 20.0
                };
                let (mut layers, mut banded, mut split) = (Vec::new(), Vec::new(), Vec::new());
                pool.install(|| {
                    crate::models::keep_warm::with_warm_workers(|| {
                        for _ in 0..15 {
                            layers.push(time(&|| block.forward_layers(&x)));
                            banded.push(time(&|| block.forward_banded(&x, threads)));
                            if let Some(cut) = &cut {
                                split.push(time(&|| block.forward_split(&x, cut)));
                            }
                        }
                    })
                });
                let median = |v: &mut Vec<f64>| {
                    v.sort_by(f64::total_cmp);
                    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
                };
                let (l, b, c) = (median(&mut layers), median(&mut banded), median(&mut split));
                println!(
                    "{threads} thread(s), {cin}->{ce}->{cout} {k}x{k} s{s} {h}²: layers {l:.3} ms, banded {b:.3} ms ({:+.0}%), split {c:.3} ms ({:+.0}%)",
                    (l / b - 1.0) * 100.0,
                    (l / c - 1.0) * 100.0
                );
            }
        }
    }
}
