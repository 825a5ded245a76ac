//! Inverted-residual blocks (`expand 1×1 → depthwise → project 1×1 [+ x]`)
//! fused over bands of rows, channels-last.
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
//! The arithmetic is the unfused layers', in the same order, so the output
//! is bit for bit theirs.

use rayon::prelude::*;

use super::nhwc_conv::{Nhwc, NhwcConv};
use super::nhwc_depthwise::NhwcDepthwise;

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

/// Fewest output rows per range of rows.
const MIN_RANGE_ROWS: usize = 4;

/// An inverted-residual block, run band by band where its expanded map is
/// large (module docs).
#[derive(Debug, Clone)]
pub struct InvertedResidual {
    expand: NhwcConv,
    dw: NhwcDepthwise,
    project: NhwcConv,
    skip: bool,
}

impl InvertedResidual {
    /// Whether the layers chain into a block: both 1×1 layers pointwise
    /// ([`NhwcConv::is_pointwise`]), channels matching, and with `skip` a
    /// projection back to the input's channels at stride 1.
    pub fn chains(expand: &NhwcConv, dw: &NhwcDepthwise, project: &NhwcConv, skip: bool) -> bool {
        let chained = expand.is_pointwise()
            && project.is_pointwise()
            && expand.out_channels() == dw.channels()
            && project.in_channels() == dw.channels();
        chained && (!skip || (dw.stride() == 1 && project.out_channels() == expand.in_channels()))
    }

    /// The block.
    ///
    /// # Panics
    /// Unless the layers [chain](Self::chains).
    pub fn new(expand: NhwcConv, dw: NhwcDepthwise, project: NhwcConv, skip: bool) -> Self {
        assert!(Self::chains(&expand, &dw, &project, skip), "layers that do not chain into a block");
        Self { expand, dw, project, skip }
    }

    /// Floats in one image's expanded map for an `h`×`w` input: what the
    /// unfused layers would send through the caches.
    pub fn expanded_len(&self, h: usize, w: usize) -> usize {
        h * w * self.dw.channels()
    }

    /// `project(dw(expand(x))) [+ x]`, NHWC in and out, where the caller
    /// may count on `threads` threads (1 for one share of a batch where
    /// every thread has a share; see `models::micro_batch::threads_here`).
    /// Band by band where one image's expanded map holds 1 MiB or more, or
    /// where the threads outnumber the images; else layer by layer. With
    /// two threads on one image, a range of rows each ran faster than
    /// splitting every layer even on small maps, whose layers would join
    /// the threads three times per block.
    pub fn forward(&self, x: &Nhwc, threads: usize) -> Nhwc {
        if self.expanded_len(x.h, x.w) * size_of::<f32>() >= FUSE_FROM_BYTES || threads > x.n {
            self.forward_banded(x, threads)
        } else {
            self.forward_layers(x)
        }
    }

    /// Layer by layer, each layer over the whole batch.
    pub fn forward_layers(&self, x: &Nhwc) -> Nhwc {
        self.project.forward(&self.dw.forward(&self.expand.forward(x, None)), self.skip.then_some(x))
    }

    /// Band by band, in ranges of rows for `threads` threads.
    pub fn forward_banded(&self, x: &Nhwc, threads: usize) -> Nhwc {
        let (cin, cout) = (self.expand.in_channels(), self.project.out_channels());
        assert_eq!(x.c, cin, "input channels");
        let (_, oh, ow) = self.dw.output_geometry(x.h, x.w);
        if self.skip {
            // `chains` checked the stride and channels; padding that changes
            // the size would misplace the residual's rows.
            assert_eq!((oh, ow), (x.h, x.w), "a skip around a depthwise pass that changes the map's size");
        }
        let mut data = vec![0f32; x.n * oh * ow * cout];
        // Enough ranges of rows per image for every thread (one image per
        // micro-batch: a range per thread), each of at least
        // `MIN_RANGE_ROWS`: a range expands `k - stride` rows more than it
        // projects.
        let ranges = threads.div_ceil(x.n.max(1)).clamp(1, oh.div_ceil(MIN_RANGE_ROWS).max(1));
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
        let mut ring = vec![0f32; slots * ex_row];
        let mut depthwise = vec![0f32; band * ow * ce];
        let zeros = vec![0f32; ce];
        let mut expanded_to = 0;
        for o0 in rows.clone().step_by(band) {
            let o1 = (o0 + band).min(rows.end);
            let need = under(o0, o1);
            let mut iy = expanded_to.max(need.start);
            while iy < need.end {
                // Up to the ring's end; the rest wraps to its start.
                let slot = iy % slots;
                let n = (need.end - iy).min(slots - slot);
                let src = &image[iy * in_row..][..n * in_row];
                self.expand.pointwise_into(src, &mut ring[slot * ex_row..][..n * ex_row], None);
                iy += n;
            }
            expanded_to = need.end;
            for (oy, dst) in (o0..o1).zip(depthwise.chunks_exact_mut(ow * ce)) {
                let row = |iy: usize| {
                    debug_assert!(iy >= x.h || need.contains(&iy), "row {iy} outside the band's {need:?}");
                    (iy < x.h).then(|| &ring[(iy % slots) * ex_row..][..ex_row])
                };
                self.dw.row_into(oy, row, (x.h, x.w), &zeros, dst);
            }
            let px = (o1 - o0) * ow;
            let residual = self.skip.then(|| &image[o0 * ow * cout..][..px * cout]);
            let dst = &mut out[(o0 - rows.start) * ow * cout..][..px * cout];
            self.project.pointwise_into(&depthwise[..px * ce], dst, residual);
        }
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

    /// Band by band equals layer by layer, bit for bit: 3×3 and 5×5,
    /// strides 1 and 2, PyTorch and TF "SAME" padding, one band per range
    /// and many (the ring wrapping), ranges split across 1–3 threads, odd
    /// sizes, channel counts off the 16 lanes, with and without the skip.
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
            let expand = pointwise(cin, ce, Fused::Relu6, seed);
            let dw = NhwcDepthwise::new(&values(ce * k * k, seed + 2), &values(ce, seed + 3), k, s, pad, Fused::Relu6)
                .unwrap();
            let project = pointwise(ce, cout, Fused::None, seed + 4);
            let block = InvertedResidual::new(expand, dw, project, skip);
            let x = Nhwc::from_nchw(&values(n * cin * h * w, seed + 5), n, cin, h, w);
            let want = block.forward_layers(&x);
            for threads in 1..=3 {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let got = pool.install(|| block.forward_banded(&x, threads));
                assert_eq!((got.n, got.h, got.w, got.c), (want.n, want.h, want.w, want.c), "case {i}");
                let diff = got.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
                assert_eq!(diff, 0, "case {i}, {threads} threads: {diff} values differ");
            }
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
        assert!(InvertedResidual::chains(&e, &dw(96, 1).unwrap(), &p, true));
        assert!(!InvertedResidual::chains(&e, &dw(96, 2).unwrap(), &p, true), "a skip at stride 2");
        assert!(!InvertedResidual::chains(&e, &dw(64, 1).unwrap(), &p, false), "expanded channels");
        let strided = NhwcConv::new(&values(96 * 16, 5), &values(96, 6), 16, 1, 2, PadMode::Symmetric(0), Fused::Relu6);
        assert!(!InvertedResidual::chains(&strided.unwrap(), &dw(96, 1).unwrap(), &p, false), "a strided 1×1");
    }

    /// Milliseconds per image of MobileNetV2's inverted-residual blocks,
    /// layer by layer against band by band, on one thread (as each share of
    /// a batch runs) and on two; rounds alternate and the figure is the
    /// median round: `cargo test --release -p lineside-inference
    /// --lib inverted_residual::tests::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        // (cin, expanded, cout, stride, input size, skip)
        let blocks = [
            (16, 96, 24, 2, 112, false),
            (24, 144, 24, 1, 56, true),
            (24, 144, 32, 2, 56, false),
            (32, 192, 32, 1, 28, true),
            (64, 384, 64, 1, 14, true),
            (160, 960, 160, 1, 7, true),
        ];
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for (cin, ce, cout, s, h, skip) in blocks {
                let expand = pointwise(cin, ce, Fused::Relu6, 1);
                let dw =
                    NhwcDepthwise::new(&values(ce * 9, 2), &values(ce, 3), 3, s, PadMode::Symmetric(1), Fused::Relu6);
                let block = InvertedResidual::new(expand, dw.unwrap(), pointwise(ce, cout, Fused::None, 4), skip);
                let x = Nhwc::from_nchw(&values(cin * h * h, 5), 1, cin, h, h);
                let time = |f: &dyn Fn() -> Nhwc| {
                    let t = std::time::Instant::now();
                    for _ in 0..20 {
                        drop(f());
                    }
                    t.elapsed().as_secs_f64() * 1e3 / 20.0
                };
                let (mut layers, mut banded) = (Vec::new(), Vec::new());
                pool.install(|| {
                    for _ in 0..15 {
                        layers.push(time(&|| block.forward_layers(&x)));
                        banded.push(time(&|| block.forward_banded(&x, threads)));
                    }
                });
                let median = |v: &mut Vec<f64>| {
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                let (l, b) = (median(&mut layers), median(&mut banded));
                println!(
                    "{threads} thread(s), {cin}->{ce}->{cout} s{s} {h}²: layers {l:.3} ms, banded {b:.3} ms ({:+.0}%)",
                    (l / b - 1.0) * 100.0
                );
            }
        }
    }
}
