//! 3×3, stride-1 convolutions by Winograd's minimal filtering F(2×2, 3×3)
//! (Lavin and Gray, 2015), on channels-last maps.
//!
//! A direct 3×3 convolution spends 36 multiply-adds per input channel on a
//! 2×2 block of output pixels. F(2×2, 3×3) spends 16: the 4×4 input tile
//! under the block and each filter are transformed (`Bᵀ d B`, `G g Gᵀ`),
//! multiplied element by element and summed over the input channels, and
//! the 4×4 result transformed back (`Aᵀ m A`). Summed over channels, each
//! of the 16 element positions is a GEMM of (tiles × cin) by (cin × cout):
//! a pointwise convolution on the transformed tiles, which runs on the same
//! microkernel as every other layer ([`NhwcConv::pointwise_into`]). The
//! transforms are additions only, vectorized across channels, which are
//! contiguous in NHWC.
//!
//! The trade: 2.25× fewer multiply-adds, against 16/9 the weights and the
//! transforms' memory traffic. It pays on large maps; on small ones, where
//! a batch-1 layer streams its weights from L3 or memory for few pixels,
//! the direct kernel is faster ([`pays_on`]). The results differ
//! from the direct convolution's by rounding only (relative error ~1e-6 in
//! f32 on resnet's layers; the transforms' constants are 0, ±1 and ½).

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::PadMode;
use super::nhwc_conv::{Nhwc, NhwcConv, Shared};
use super::sgemm::Fused;
use super::simd::{Isa, Simd, Ymm, Zmm, activate};

/// Positions in a transformed 4×4 tile: one GEMM each.
const POINTS: usize = 16;
/// Bytes of one chunk's transformed tiles, in and out: they stay in L2
/// from the input transform, through the 16 GEMMs, to the output transform.
const CHUNK_BYTES: usize = 1 << 20;
/// The smallest map side (rows and columns) on which the transform pays:
/// measured per resnet18 layer by `winograd::tests::speed`.
const MIN_SIDE: usize = 14;

/// A 3×3, stride-1, padding-1, groups=1 convolution with folded
/// BatchNorm, computed as F(2×2, 3×3) Winograd.
#[derive(Debug, Clone)]
pub struct Winograd {
    /// Per tile position ξ, the transformed filters `(G g Gᵀ)[ξ]` as a
    /// pointwise convolution of `cin` to `cout` channels, without bias.
    gemms: Vec<NhwcConv>,
    /// What the transforms are compiled for: the GEMMs' own.
    isa: Isa,
    bias: Vec<f32>,
    act: Fused,
    cin: usize,
    cout: usize,
    /// The value of taps outside the map.
    zeros: Vec<f32>,
}

/// Whether Winograd is faster than the direct kernel on `x`.
pub fn pays_on(x: &Nhwc) -> bool {
    x.h.min(x.w) >= MIN_SIDE
}

/// Builds a layer's [`Winograd`] form, or `None` where the CPU lacks the kernels.
pub type Build = Box<dyn Fn() -> Option<Winograd> + Send + Sync>;

/// A channels-last layer that runs as [`Winograd`] on the maps where that
/// pays ([`pays_on`]) and on the direct kernel elsewhere. The Winograd
/// form (16/9 the direct kernel's weights) is built the first time a map
/// needs it, so a network whose small maps never do (resnet's last stage
/// at 224×224) does not hold it; a server's warm-up builds it before the
/// first request.
pub struct Switching {
    direct: NhwcConv,
    build: Option<Build>,
    winograd: OnceLock<Option<Winograd>>,
}

impl Switching {
    /// `direct`, and where `build` is given, its Winograd form from it.
    pub fn new(direct: NhwcConv, build: Option<Build>) -> Self {
        Self { direct, build, winograd: OnceLock::new() }
    }

    /// `act(conv(x) + bias [+ residual])`, NHWC in and out.
    pub fn forward(&self, x: &Nhwc, residual: Option<&Nhwc>) -> Nhwc {
        let winograd = match &self.build {
            Some(build) if pays_on(x) => self.winograd.get_or_init(build).as_ref(),
            _ => None,
        };
        match winograd {
            Some(w) => w.forward(x, residual),
            None => self.direct.forward(x, residual),
        }
    }
}

thread_local! {
    /// A chunk's transformed input and output tiles, reused across chunks
    /// and layers on each thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The output pointer, shared by chunks that write only the output pixels
/// of their own tiles.
type Out = Shared<*mut f32>;

impl Winograd {
    /// From a folded weight `[cout, cin, 3, 3]` (flattened) and bias, or
    /// `None` where the CPU has no channels-last kernel ([`NhwcConv::new`]).
    pub fn new(weight: &[f32], bias: &[f32], cin: usize, act: Fused) -> Option<Self> {
        let cout = bias.len();
        assert_eq!(weight.len(), cout * cin * 9, "a 3×3 weight");
        let mut u = vec![vec![0f32; cout * cin]; POINTS];
        for o in 0..cout {
            for ci in 0..cin {
                let g = &weight[(o * cin + ci) * 9..][..9];
                for (p, v) in filter_transform(g).into_iter().enumerate() {
                    u[p][o * cin + ci] = v;
                }
            }
        }
        let zero = vec![0f32; cout];
        let gemms = u
            .iter()
            .map(|w| NhwcConv::new(w, &zero, cin, 1, 1, PadMode::Symmetric(0), Fused::None))
            .collect::<Option<Vec<_>>>()?;
        Some(Self { gemms, isa: Isa::detect()?, bias: bias.to_vec(), act, cin, cout, zeros: vec![0f32; cin] })
    }

    /// `act(conv(x) + bias [+ residual])`, NHWC in and out, the same size
    /// as `x`. The residual has the output's shape.
    pub fn forward(&self, x: &Nhwc, residual: Option<&Nhwc>) -> Nhwc {
        assert_eq!(x.c, self.cin, "input channels");
        let (n, h, w, cout) = (x.n, x.h, x.w, self.cout);
        if let Some(r) = residual {
            assert_eq!((r.n, r.h, r.w, r.c), (n, h, w, cout), "residual shape");
        }
        let tiles = n * h.div_ceil(2) * w.div_ceil(2);
        let mut data: Box<[MaybeUninit<f32>]> = Box::new_uninit_slice(n * h * w * cout);
        if tiles > 0 {
            let out = Shared(data.as_mut_ptr().cast::<f32>());
            let per = self.chunk_tiles(tiles, rayon::current_num_threads());
            (0..tiles.div_ceil(per)).into_par_iter().for_each(|c| {
                let tiles = c * per..((c + 1) * per).min(tiles);
                SCRATCH.with_borrow_mut(|scratch| match self.isa {
                    // SAFETY: `isa` is one the CPU runs (`NhwcConv::new`).
                    Isa::Avx512 => unsafe { self.chunk_avx512(x, residual, tiles, scratch, out) },
                    Isa::Avx2 => unsafe { self.chunk_avx2(x, residual, tiles, scratch, out) },
                });
            });
        }
        // SAFETY: the chunks cover every tile, and a tile writes every
        // channel of each of its pixels inside the map.
        let data = unsafe { data.assume_init() }.into_vec();
        Nhwc { data, n, h, w, c: cout }
    }

    /// Tiles per chunk: as many as fit [`CHUNK_BYTES`], in a number of
    /// chunks that the threads share evenly.
    fn chunk_tiles(&self, tiles: usize, threads: usize) -> usize {
        let most = (CHUNK_BYTES / (POINTS * 4 * (self.cin + self.cout))).max(1);
        let chunks = tiles.div_ceil(most).next_multiple_of(threads.max(1));
        // Whole microkernel calls of 6 pixels (`nhwc_conv::MR`).
        tiles.div_ceil(chunks).next_multiple_of(6)
    }

    /// [`Self::chunk`] on AVX-512F.
    ///
    /// # Safety
    /// The CPU runs AVX-512F; as for [`Self::chunk`].
    #[target_feature(enable = "avx512f")]
    unsafe fn chunk_avx512(&self, x: &Nhwc, res: Option<&Nhwc>, tiles: Range<usize>, v: &mut Vec<f32>, out: Out) {
        // SAFETY: forwarded.
        unsafe { self.chunk::<Zmm>(x, res, tiles, v, out) }
    }

    /// [`Self::chunk`] on AVX2 with FMA.
    ///
    /// # Safety
    /// The CPU runs AVX2 and FMA; as for [`Self::chunk`].
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk_avx2(&self, x: &Nhwc, res: Option<&Nhwc>, tiles: Range<usize>, v: &mut Vec<f32>, out: Out) {
        // SAFETY: forwarded.
        unsafe { self.chunk::<Ymm>(x, res, tiles, v, out) }
    }

    /// Transforms `tiles` in, runs the 16 GEMMs, transforms them out.
    ///
    /// # Safety
    /// The CPU runs `S`; `x` (and `res`) has this layer's input (output)
    /// channels; `out` holds the whole output map, whose pixels under
    /// `tiles` no other thread writes.
    #[inline(always)]
    unsafe fn chunk<S: Simd>(
        &self,
        x: &Nhwc,
        res: Option<&Nhwc>,
        tiles: Range<usize>,
        scratch: &mut Vec<f32>,
        out: Out,
    ) {
        let (cin, cout, t) = (self.cin, self.cout, tiles.len());
        let need = POINTS * t * (cin + cout);
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (v, m) = scratch[..need].split_at_mut(POINTS * t * cin);
        let grid = Grid { h: x.h, w: x.w, tw: x.w.div_ceil(2), th: x.h.div_ceil(2) };
        let mut rows = [self.zeros.as_ptr(); POINTS];
        for (k, tile) in tiles.clone().enumerate() {
            let at = grid.tile(tile);
            for (p, row) in rows.iter_mut().enumerate() {
                *row = match grid.input_pixel(at, p) {
                    Some(px) => x.data[px * cin..][..cin].as_ptr(),
                    None => self.zeros.as_ptr(),
                };
            }
            // SAFETY: each row holds `cin` floats; `v` holds 16 positions
            // of `t` tiles of `cin`.
            unsafe { input_tile::<S>(&rows, cin, v.as_mut_ptr().add(k * cin), t * cin) };
        }
        for (p, gemm) in self.gemms.iter().enumerate() {
            gemm.pointwise_into(&v[p * t * cin..][..t * cin], &mut m[p * t * cout..][..t * cout], None);
        }
        for (k, tile) in tiles.enumerate() {
            let at = grid.tile(tile);
            let mut to = [None; 4];
            let mut from = [None; 4];
            for q in 0..4 {
                if let Some(px) = grid.output_pixel(at, q) {
                    // SAFETY: the caller's: a pixel of this tile, in the map.
                    to[q] = Some(unsafe { out.0.add(px * cout) });
                    from[q] = res.map(|r| r.data[px * cout..][..cout].as_ptr());
                }
            }
            // SAFETY: `m` holds 16 positions of `t` tiles of `cout`; the
            // pixels are the caller's, `cout` floats each, as are the bias
            // and the residual's.
            unsafe {
                output_tile::<S>(m.as_ptr().add(k * cout), t * cout, cout, self.bias.as_ptr(), &from, &to, self.act)
            };
        }
    }
}
/// Tiles of 2×2 output pixels over an `h`×`w` map, `th`×`tw` per image.
#[derive(Clone, Copy)]
struct Grid {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Grid {
    /// (image, tile row, tile column) of tile `i`.
    fn tile(&self, i: usize) -> (usize, usize, usize) {
        (i / (self.th * self.tw), i / self.tw % self.th, i % self.tw)
    }

    /// The input pixel under position `p` of the tile's 4×4 window (which
    /// starts one row and column before the tile: the padding), or `None`
    /// outside the map.
    fn input_pixel(&self, (img, ty, tx): (usize, usize, usize), p: usize) -> Option<usize> {
        let y = (2 * ty + p / 4).checked_sub(1).filter(|&y| y < self.h)?;
        let x = (2 * tx + p % 4).checked_sub(1).filter(|&x| x < self.w)?;
        Some((img * self.h + y) * self.w + x)
    }

    /// Output pixel `q` (row-major) of the tile, or `None` past an odd edge.
    fn output_pixel(&self, (img, ty, tx): (usize, usize, usize), q: usize) -> Option<usize> {
        let (y, x) = (2 * ty + q / 2, 2 * tx + q % 2);
        (y < self.h && x < self.w).then(|| (img * self.h + y) * self.w + x)
    }
}

/// `G g Gᵀ` for a 3×3 filter `g` (row-major), in f64 so that the halves
/// round once: `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
fn filter_transform(g: &[f32]) -> [f32; POINTS] {
    let side = |a: f64, b: f64, c: f64| [a, (a + b + c) / 2.0, (a - b + c) / 2.0, c];
    let g = |y: usize, x: usize| f64::from(g[y * 3 + x]);
    let cols = [0, 1, 2].map(|x| side(g(0, x), g(1, x), g(2, x)));
    let mut u = [0f32; POINTS];
    for i in 0..4 {
        for (j, v) in side(cols[0][i], cols[1][i], cols[2][i]).into_iter().enumerate() {
            u[i * 4 + j] = v as f32;
        }
    }
    u
}

/// `Bᵀ d B` of one tile, for each channel of its 16 input pixels `rows`
/// (row-major over the 4×4 window), written to `v + p·stride` for position
/// `p`: `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
///
/// # Safety
/// The CPU runs `S`; each row holds `c` floats, and `v + p·stride` holds
/// `c` for every `p`.
#[inline(always)]
unsafe fn input_tile<S: Simd>(rows: &[*const f32; POINTS], c: usize, v: *mut f32, stride: usize) {
    for cb in (0..c).step_by(S::LANES) {
        let n = c - cb;
        // SAFETY (loads and stores): masked to the `n` lanes from `cb`,
        // inside each row and each position's `c` floats.
        unsafe {
            let mask = S::first(n);
            let mut d = [S::zero(); POINTS];
            for (d, row) in d.iter_mut().zip(rows) {
                *d = if n >= S::LANES { S::load(row.add(cb)) } else { S::load_masked(mask, row.add(cb)) };
            }
            // Bᵀ down each column, then along each row.
            let mut r = [S::zero(); POINTS];
            for j in 0..4 {
                r[j] = S::sub(d[j], d[8 + j]);
                r[4 + j] = S::add(d[4 + j], d[8 + j]);
                r[8 + j] = S::sub(d[8 + j], d[4 + j]);
                r[12 + j] = S::sub(d[4 + j], d[12 + j]);
            }
            for i in 0..4 {
                let r = &r[i * 4..i * 4 + 4];
                let row = [S::sub(r[0], r[2]), S::add(r[1], r[2]), S::sub(r[2], r[1]), S::sub(r[1], r[3])];
                for (j, e) in row.into_iter().enumerate() {
                    let to = v.add((i * 4 + j) * stride + cb);
                    if n >= S::LANES { S::store(to, e) } else { S::store_masked(mask, to, e) }
                }
            }
        }
    }
}

/// `act(Aᵀ m A + bias [+ residual])` of one tile, `Aᵀ = [[1, 1, 1, 0],
/// [0, 1, -1, -1]]`, from its 16 positions at `m + p·stride`, into the
/// output pixels `to` (row-major; `None` past an odd edge) with their
/// residuals `from`.
///
/// # Safety
/// The CPU runs `S`; `m + p·stride` for every `p`, `bias`, and each pixel
/// and residual hold `c` floats.
#[inline(always)]
unsafe fn output_tile<S: Simd>(
    m: *const f32,
    stride: usize,
    c: usize,
    bias: *const f32,
    from: &[Option<*const f32>; 4],
    to: &[Option<*mut f32>; 4],
    act: Fused,
) {
    for cb in (0..c).step_by(S::LANES) {
        let n = c - cb;
        // SAFETY (loads and stores): masked to the `n` lanes from `cb`,
        // inside each position's, the bias's and each pixel's `c` floats.
        unsafe {
            let mask = S::first(n);
            let load = |p: *const f32| if n >= S::LANES { S::load(p) } else { S::load_masked(mask, p) };
            let mut e = [S::zero(); POINTS];
            for (p, e) in e.iter_mut().enumerate() {
                *e = load(m.add(p * stride + cb));
            }
            // Aᵀ down each column, then along each row.
            let mut s = [S::zero(); 8];
            for j in 0..4 {
                s[j] = S::add(S::add(e[j], e[4 + j]), e[8 + j]);
                s[4 + j] = S::sub(S::sub(e[4 + j], e[8 + j]), e[12 + j]);
            }
            let b = load(bias.add(cb));
            for i in 0..2 {
                let s = &s[i * 4..i * 4 + 4];
                let pair = [S::add(S::add(s[0], s[1]), s[2]), S::sub(S::sub(s[1], s[2]), s[3])];
                for (j, y) in pair.into_iter().enumerate() {
                    let q = i * 2 + j;
                    let Some(px) = to[q] else { continue };
                    let mut y = S::add(y, b);
                    if let Some(r) = from[q] {
                        y = S::add(y, load(r.add(cb)));
                    }
                    let y = activate(y, act);
                    if n >= S::LANES { S::store(px.add(cb), y) } else { S::store_masked(mask, px.add(cb), y) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{gflops, values};

    fn direct(wt: &[f32], b: &[f32], cin: usize, act: Fused) -> NhwcConv {
        NhwcConv::new(wt, b, cin, 3, 1, PadMode::Symmetric(1), act).unwrap()
    }

    /// The same maps as the direct kernel, up to rounding: odd and even
    /// sides, channels that do not fill a vector, a residual, each
    /// activation, more chunks than threads.
    #[test]
    fn matches_the_direct_convolution() {
        if Isa::detect().is_none() {
            eprintln!("no AVX-512F/AVX2: skipped");
            return;
        }
        for (n, cin, cout, h, w, act, res) in [
            (1, 3, 5, 7, 6, Fused::None, false),
            (2, 16, 24, 15, 14, Fused::Relu, true),
            (3, 64, 64, 28, 27, Fused::Relu, true),
            (1, 40, 17, 1, 3, Fused::Relu6, false),
            (2, 128, 96, 9, 16, Fused::Relu, false),
        ] {
            let (wt, b) = (values(cout * cin * 9, 7), values(cout, 8));
            let x = Nhwc { data: values(n * h * w * cin, 9), n, h, w, c: cin };
            let r = Nhwc { data: values(n * h * w * cout, 10), n, h, w, c: cout };
            let r = res.then_some(&r);
            let want = direct(&wt, &b, cin, act).forward(&x, r);
            let got = Winograd::new(&wt, &b, cin, act).unwrap().forward(&x, r);
            assert_eq!((got.n, got.h, got.w, got.c), (n, h, w, cout));
            let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got.data.iter().zip(&want.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= 1e-5 * scale, "{n}×{cin}→{cout} {h}×{w}: off by {worst} (scale {scale})");
        }
    }

    /// Winograd against the direct kernel on resnet18's 3×3 stride-1
    /// layers, at batch 1 and 8, in nominal GFLOP/s of the direct
    /// convolution: `cargo test --release -p lineside-inference --lib
    /// winograd::tests::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        for n in [1, 8] {
            for (c, h) in [(64, 56), (128, 28), (256, 14), (512, 7)] {
                let (wt, b) = (values(c * c * 9, 2), values(c, 3));
                let x = Nhwc { data: values(n * h * h * c, 1), n, h, w: h, c };
                let (slow, fast) = (direct(&wt, &b, c, Fused::Relu), Winograd::new(&wt, &b, c, Fused::Relu).unwrap());
                let flops = 2.0 * (n * h * h * c * c * 9) as f64;
                let d = gflops(flops, 1e9, &mut || drop(slow.forward(&x, None)));
                let f = gflops(flops, 1e9, &mut || drop(fast.forward(&x, None)));
                println!("n{n} {c:>3}→{c:>3} {h:>2}²: direct {d:6.1}, winograd {f:6.1} GFLOP/s ({:.2}×)", f / d);
            }
        }
    }
}
