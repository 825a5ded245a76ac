//! 3×3, stride-1 convolutions by Winograd's minimal filtering F(m×m, 3×3)
//! (Lavin and Gray, 2015), on channels-last maps, with output tiles of
//! m = 2 or 4 pixels a side ([`Tile`]).
//!
//! A direct 3×3 convolution spends 9 multiply-adds per input channel on
//! each output pixel. F(m×m, 3×3) spends (m+2)²/m²: 4 for m = 2, 2.25 for
//! m = 4. The (m+2)×(m+2) input tile under an m×m block of output pixels
//! and each filter are transformed (`Bᵀ d B`, `G g Gᵀ`), multiplied element
//! by element and summed over the input channels, and the result
//! transformed back (`Aᵀ M A`). Summed over channels, each of the (m+2)²
//! element positions is a GEMM of (tiles × cin) by (cin × cout): a
//! pointwise convolution on the transformed tiles, which runs on the same
//! microkernel as every other layer ([`NhwcConv::pointwise_into`]). The
//! transforms are vectorized across channels, which are contiguous in NHWC.
//!
//! The trade: fewer multiply-adds, against (m+2)²/9 the weights and the
//! transforms' work and memory traffic. It pays on large maps; on small
//! ones, where a batch-1 layer streams its weights from L3 or memory for
//! few pixels, the direct kernel is faster ([`Tile::for_map`]). The results
//! differ from the direct convolution's by rounding: relative error ~1e-6
//! in f32 for m = 2, whose transforms' constants are 0, ±1 and ½, and
//! ~1e-5 for m = 4, whose constants reach 8 and 1/24.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::PadMode;
use super::nhwc_conv::{Nhwc, NhwcConv, Shared};
use super::sgemm::Fused;
use super::simd::{Isa, Simd, Ymm, Zmm, activate};

/// The most positions in a transformed tile (6×6, for m = 4).
const MAX_POINTS: usize = 36;
/// Bytes of one chunk's transformed tiles, in and out: they stay in L2
/// from the input transform, through the GEMMs, to the output transform.
const CHUNK_BYTES: usize = 1 << 20;

/// The output tile: F(2×2, 3×3) or F(4×4, 3×3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// 2×2 output pixels from 4×4 input ones: 16 GEMMs.
    F2,
    /// 4×4 output pixels from 6×6 input ones: 36 GEMMs.
    F4,
}

impl Tile {
    /// The most weights (`cin · cout`) for which F4 beats F2: above it, the
    /// 36 transformed matrices (2.4 MB at 128 channels, 9.4 MB at 256) that
    /// every chunk of tiles streams cost more than F4 saves. A layer alone,
    /// its weights hot in L3, runs F4 at 1.2–2.9× the direct kernel up to
    /// 256 channels and F2 faster at 384 and 512 (`winograd::tests::speed`); but
    /// a whole resnet18 at batch 8 ran at 138–149 img/s with F4 on its
    /// 256-channel 14² stage, 156–162 with F2 there (and F4 before it),
    /// and 132–142 with F2 everywhere.
    const F4_MOST_WEIGHTS: usize = 128 * 128;

    /// The fastest form for a layer of `cout` channels on `x`, or `None`
    /// for the direct kernel: that is, on maps under 7 (F4) or 8 (F2)
    /// pixels a side, where a tile's padding and the transformed weights'
    /// traffic cost more than the multiply-adds saved (512 channels on 7²:
    /// F2 at 0.8–1.9× over eight runs, about 1× in most). A layer's
    /// channels are fixed, so it only ever gets one of the two tiles.
    pub fn for_map(x: &Nhwc, cout: usize) -> Option<Self> {
        let side = x.h.min(x.w);
        if x.c * cout <= Self::F4_MOST_WEIGHTS {
            (side >= 7).then_some(Self::F4)
        } else {
            (side >= 8).then_some(Self::F2)
        }
    }

    /// Output pixels per tile side.
    fn m(self) -> usize {
        match self {
            Self::F2 => F2::M,
            Self::F4 => F4::M,
        }
    }

    /// Positions in a transformed tile: one GEMM each.
    fn points(self) -> usize {
        (self.m() + 2).pow(2)
    }
}

/// A 3×3, stride-1, padding-1, groups=1 convolution with folded
/// BatchNorm, computed as F(m×m, 3×3) Winograd.
#[derive(Debug, Clone)]
pub struct Winograd {
    tile: Tile,
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

/// Builds a layer's [`Winograd`] form for a tile, or `None` where the CPU
/// lacks the kernels.
pub type Build = Box<dyn Fn(Tile) -> Option<Winograd> + Send + Sync>;

/// A channels-last layer that runs as [`Winograd`] on the maps where that
/// pays ([`Tile::for_map`]) and on the direct kernel elsewhere. Each
/// Winograd form ((m+2)²/9 the direct kernel's weights) is built the first
/// time a map needs it, so a network whose small maps never do (resnet's
/// last stage at 224×224) does not hold it; a server's warm-up builds it
/// before the first request.
pub struct Switching {
    direct: NhwcConv,
    build: Option<Build>,
    /// The Winograd form, for the tile that the first large enough map
    /// chose: [`Tile::for_map`] picks one tile per layer.
    winograd: OnceLock<Option<Winograd>>,
}

impl Switching {
    /// `direct`, and where `build` is given, its Winograd form from it.
    pub fn new(direct: NhwcConv, build: Option<Build>) -> Self {
        Self { direct, build, winograd: OnceLock::new() }
    }

    /// `act(conv(x) + bias [+ residual])`, NHWC in and out.
    pub fn forward(&self, x: &Nhwc, residual: Option<&Nhwc>) -> Nhwc {
        let winograd = match (&self.build, Tile::for_map(x, self.direct.out_channels())) {
            (Some(build), Some(tile)) => self.winograd.get_or_init(|| build(tile)).as_ref(),
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
    pub fn new(weight: &[f32], bias: &[f32], cin: usize, act: Fused, tile: Tile) -> Option<Self> {
        Some(Self::for_isa(Isa::detect()?, weight, bias, cin, act, tile))
    }

    /// [`Self::new`] for `isa`, which the CPU must run (tests check each
    /// set the CPU has).
    pub(crate) fn for_isa(isa: Isa, weight: &[f32], bias: &[f32], cin: usize, act: Fused, tile: Tile) -> Self {
        let cout = bias.len();
        assert_eq!(weight.len(), cout * cin * 9, "a 3×3 weight");
        let mut u = vec![vec![0f32; cout * cin]; tile.points()];
        for o in 0..cout {
            for ci in 0..cin {
                let g = &weight[(o * cin + ci) * 9..][..9];
                for (p, v) in filter_transform(g, tile).into_iter().take(tile.points()).enumerate() {
                    u[p][o * cin + ci] = v;
                }
            }
        }
        let zero = vec![0f32; cout];
        let gemms =
            u.iter().map(|w| NhwcConv::for_isa(isa, w, &zero, cin, 1, 1, PadMode::Symmetric(0), Fused::None)).collect();
        Self { tile, gemms, isa, bias: bias.to_vec(), act, cin, cout, zeros: vec![0f32; cin] }
    }

    /// `act(conv(x) + bias [+ residual])`, NHWC in and out, the same size
    /// as `x`. The residual has the output's shape.
    pub fn forward(&self, x: &Nhwc, residual: Option<&Nhwc>) -> Nhwc {
        assert_eq!(x.c, self.cin, "input channels");
        let (n, h, w, cout) = (x.n, x.h, x.w, self.cout);
        if let Some(r) = residual {
            assert_eq!((r.n, r.h, r.w, r.c), (n, h, w, cout), "residual shape");
        }
        let m = self.tile.m();
        let tiles = n * h.div_ceil(m) * w.div_ceil(m);
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
        let most = (CHUNK_BYTES / (self.tile.points() * 4 * (self.cin + self.cout))).max(1);
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
        unsafe {
            match self.tile {
                Tile::F2 => self.chunk::<Zmm, F2>(x, res, tiles, v, out),
                Tile::F4 => self.chunk::<Zmm, F4>(x, res, tiles, v, out),
            }
        }
    }

    /// [`Self::chunk`] on AVX2 with FMA.
    ///
    /// # Safety
    /// The CPU runs AVX2 and FMA; as for [`Self::chunk`].
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk_avx2(&self, x: &Nhwc, res: Option<&Nhwc>, tiles: Range<usize>, v: &mut Vec<f32>, out: Out) {
        // SAFETY: forwarded.
        unsafe {
            match self.tile {
                Tile::F2 => self.chunk::<Ymm, F2>(x, res, tiles, v, out),
                Tile::F4 => self.chunk::<Ymm, F4>(x, res, tiles, v, out),
            }
        }
    }

    /// Transforms `tiles` in, runs the GEMMs, transforms them out.
    ///
    /// # Safety
    /// The CPU runs `S`; `x` (and `res`) has this layer's input (output)
    /// channels; `out` holds the whole output map, whose pixels under
    /// `tiles` no other thread writes.
    #[inline(always)]
    unsafe fn chunk<S: Simd, T: Transform>(
        &self,
        x: &Nhwc,
        res: Option<&Nhwc>,
        tiles: Range<usize>,
        scratch: &mut Vec<f32>,
        out: Out,
    ) {
        debug_assert_eq!(T::M, self.tile.m(), "the transforms of this layer's tile");
        let (cin, cout, t, points) = (self.cin, self.cout, tiles.len(), T::SIDE * T::SIDE);
        let need = points * t * (cin + cout);
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (v, m) = scratch[..need].split_at_mut(points * t * cin);
        let grid = Grid { h: x.h, w: x.w, m: T::M, th: x.h.div_ceil(T::M), tw: x.w.div_ceil(T::M) };
        let mut rows = [self.zeros.as_ptr(); MAX_POINTS];
        for (k, tile) in tiles.clone().enumerate() {
            let at = grid.tile(tile);
            for (p, row) in rows[..points].iter_mut().enumerate() {
                *row = match grid.input_pixel(at, p) {
                    Some(px) => x.data[px * cin..][..cin].as_ptr(),
                    None => self.zeros.as_ptr(),
                };
            }
            // SAFETY: each row holds `cin` floats; `v` holds `points`
            // positions of `t` tiles of `cin`.
            unsafe { input_tile::<S, T>(&rows, cin, v.as_mut_ptr().add(k * cin), t * cin) };
        }
        for (p, gemm) in self.gemms.iter().enumerate() {
            gemm.pointwise_into(&v[p * t * cin..][..t * cin], &mut m[p * t * cout..][..t * cout], None);
        }
        let mut to = [None; 16];
        let mut from = [None; 16];
        for (k, tile) in tiles.enumerate() {
            let at = grid.tile(tile);
            for q in 0..T::M * T::M {
                (to[q], from[q]) = match grid.output_pixel(at, q) {
                    // SAFETY: the caller's: a pixel of this tile, in the map.
                    Some(px) => {
                        (Some(unsafe { out.0.add(px * cout) }), res.map(|r| r.data[px * cout..][..cout].as_ptr()))
                    }
                    None => (None, None),
                };
            }
            // SAFETY: `m` holds `points` positions of `t` tiles of `cout`;
            // the pixels are the caller's, `cout` floats each, as are the
            // bias and the residual's.
            unsafe {
                output_tile::<S, T>(m.as_ptr().add(k * cout), t * cout, cout, self.bias.as_ptr(), &from, &to, self.act)
            };
        }
    }
}

/// Tiles of `m`×`m` output pixels over an `h`×`w` map, `th`×`tw` per image.
#[derive(Clone, Copy)]
struct Grid {
    h: usize,
    w: usize,
    m: usize,
    th: usize,
    tw: usize,
}

impl Grid {
    /// (image, tile row, tile column) of tile `i`.
    fn tile(&self, i: usize) -> (usize, usize, usize) {
        (i / (self.th * self.tw), i / self.tw % self.th, i % self.tw)
    }

    /// The input pixel under position `p` of the tile's (m+2)×(m+2) window
    /// (which starts one row and column before the tile: the padding), or
    /// `None` outside the map.
    fn input_pixel(&self, (img, ty, tx): (usize, usize, usize), p: usize) -> Option<usize> {
        let side = self.m + 2;
        let y = (self.m * ty + p / side).checked_sub(1).filter(|&y| y < self.h)?;
        let x = (self.m * tx + p % side).checked_sub(1).filter(|&x| x < self.w)?;
        Some((img * self.h + y) * self.w + x)
    }

    /// Output pixel `q` (row-major) of the tile, or `None` past the map's
    /// edge.
    fn output_pixel(&self, (img, ty, tx): (usize, usize, usize), q: usize) -> Option<usize> {
        let (y, x) = (self.m * ty + q / self.m, self.m * tx + q % self.m);
        (y < self.h && x < self.w).then(|| (img * self.h + y) * self.w + x)
    }
}

/// One F(m, 3) in one dimension: the three matrices of a tile size, applied
/// to the first `SIDE` (input) or `M` (output) entries of 6-long arrays.
/// The 2-D transforms apply them down each column, then along each row.
trait Transform {
    /// Output pixels per side.
    const M: usize;
    /// Input pixels per side.
    const SIDE: usize = Self::M + 2;
    /// `G g` of a 3-tap filter, in f64 so that the fractions round once.
    fn filter(g: [f64; 3]) -> [f64; 6];
    /// `Bᵀ d`.
    unsafe fn input<S: Simd>(d: [S; 6]) -> [S; 6];
    /// `Aᵀ m`.
    unsafe fn output<S: Simd>(m: [S; 6]) -> [S; 4];
}

/// F(2, 3): `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`,
/// `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`,
/// `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
struct F2;

impl Transform for F2 {
    const M: usize = 2;

    fn filter([a, b, c]: [f64; 3]) -> [f64; 6] {
        [a, (a + b + c) / 2.0, (a - b + c) / 2.0, c, 0.0, 0.0]
    }

    #[inline(always)]
    unsafe fn input<S: Simd>(d: [S; 6]) -> [S; 6] {
        // SAFETY: the caller's CPU runs `S`.
        unsafe { [S::sub(d[0], d[2]), S::add(d[1], d[2]), S::sub(d[2], d[1]), S::sub(d[1], d[3]), d[4], d[5]] }
    }

    #[inline(always)]
    unsafe fn output<S: Simd>(m: [S; 6]) -> [S; 4] {
        // SAFETY: the caller's CPU runs `S`.
        unsafe { [S::add(S::add(m[0], m[1]), m[2]), S::sub(S::sub(m[1], m[2]), m[3]), m[4], m[5]] }
    }
}

/// F(4, 3): `G = [[¼, 0, 0], [-⅙, -⅙, -⅙], [-⅙, ⅙, -⅙], [1/24, 1/12, ⅙],
/// [1/24, -1/12, ⅙], [0, 0, 1]]`, `Bᵀ = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1,
/// 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0],
/// [0, 4, 0, -5, 0, 1]]`, `Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0],
/// [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]`.
struct F4;

impl Transform for F4 {
    const M: usize = 4;

    fn filter([a, b, c]: [f64; 3]) -> [f64; 6] {
        [
            a / 4.0,
            -(a + b + c) / 6.0,
            -(a - b + c) / 6.0,
            a / 24.0 + b / 12.0 + c / 6.0,
            a / 24.0 - b / 12.0 + c / 6.0,
            c,
        ]
    }

    #[inline(always)]
    unsafe fn input<S: Simd>(d: [S; 6]) -> [S; 6] {
        // SAFETY: the caller's CPU runs `S`.
        unsafe {
            let (two, four) = (S::splat(2.0), S::splat(4.0));
            let d42 = S::sub(d[4], d[2]);
            let d31 = S::sub(d[3], d[1]);
            [
                S::mul_add(four, S::sub(d[0], d[2]), d42),
                S::mul_add(S::splat(-4.0), S::add(d[1], d[2]), S::add(d[4], d[3])),
                S::mul_add(four, S::sub(d[1], d[2]), S::sub(d[4], d[3])),
                S::mul_add(two, d31, d42),
                S::mul_add(S::splat(-2.0), d31, d42),
                S::mul_add(four, S::sub(d[1], d[3]), S::sub(d[5], d[3])),
            ]
        }
    }

    #[inline(always)]
    unsafe fn output<S: Simd>(m: [S; 6]) -> [S; 4] {
        // SAFETY: the caller's CPU runs `S`.
        unsafe {
            let (a, b) = (S::add(m[1], m[2]), S::sub(m[1], m[2]));
            let (c, d) = (S::add(m[3], m[4]), S::sub(m[3], m[4]));
            [
                S::add(S::add(m[0], a), c),
                S::mul_add(S::splat(2.0), d, b),
                S::mul_add(S::splat(4.0), c, a),
                S::add(S::mul_add(S::splat(8.0), d, b), m[5]),
            ]
        }
    }
}

/// `G g Gᵀ` for a 3×3 filter `g` (row-major), row-major over the
/// transformed tile.
fn filter_transform(g: &[f32], tile: Tile) -> [f32; MAX_POINTS] {
    let side = |taps| match tile {
        Tile::F2 => F2::filter(taps),
        Tile::F4 => F4::filter(taps),
    };
    let n = tile.m() + 2;
    let g = |y: usize, x: usize| f64::from(g[y * 3 + x]);
    let cols = [0, 1, 2].map(|x| side([g(0, x), g(1, x), g(2, x)]));
    let mut u = [0f32; MAX_POINTS];
    for i in 0..n {
        for (j, v) in side([cols[0][i], cols[1][i], cols[2][i]]).into_iter().take(n).enumerate() {
            u[i * n + j] = v as f32;
        }
    }
    u
}

/// Column `j` of a row-major `n`×`n` tile, in the first `n` entries.
#[inline(always)]
fn column<S: Copy>(tile: &[S; MAX_POINTS], n: usize, j: usize) -> [S; 6] {
    let mut col = [tile[j]; 6];
    for (i, c) in col.iter_mut().take(n).enumerate() {
        *c = tile[i * n + j];
    }
    col
}

/// `Bᵀ d B` of one tile, for each channel of its input pixels `rows`
/// (row-major over the window, `T::SIDE`² of them), written to `v +
/// p·stride` for position `p`.
///
/// # Safety
/// The CPU runs `S`; each row holds `c` floats, and `v + p·stride` holds
/// `c` for every `p`.
#[inline(always)]
unsafe fn input_tile<S: Simd, T: Transform>(rows: &[*const f32; MAX_POINTS], c: usize, v: *mut f32, stride: usize) {
    let n = T::SIDE;
    for cb in (0..c).step_by(S::LANES) {
        let left = c - cb;
        // SAFETY (loads and stores): masked to the `left` lanes from `cb`,
        // inside each row and each position's `c` floats.
        unsafe {
            let mask = S::first(left);
            let mut d = [S::zero(); MAX_POINTS];
            for p in 0..n * n {
                let row = rows[p].add(cb);
                d[p] = if left >= S::LANES { S::load(row) } else { S::load_masked(mask, row) };
            }
            // Bᵀ down each column, then along each row.
            let mut r = [S::zero(); MAX_POINTS];
            for j in 0..n {
                let col = T::input(column(&d, n, j));
                for i in 0..n {
                    r[i * n + j] = col[i];
                }
            }
            for i in 0..n {
                let mut row = [S::zero(); 6];
                row[..n].copy_from_slice(&r[i * n..i * n + n]);
                let row = T::input(row);
                for (j, e) in row.into_iter().take(n).enumerate() {
                    let to = v.add((i * n + j) * stride + cb);
                    if left >= S::LANES { S::store(to, e) } else { S::store_masked(mask, to, e) }
                }
            }
        }
    }
}

/// `act(Aᵀ M A + bias [+ residual])` of one tile, from its positions at
/// `m + p·stride`, into the output pixels `to` (row-major, `T::M`² of
/// them; `None` past the map's edge) with their residuals `from`.
///
/// # Safety
/// The CPU runs `S`; `m + p·stride` for every `p`, `bias`, and each pixel
/// and residual hold `c` floats.
#[inline(always)]
unsafe fn output_tile<S: Simd, T: Transform>(
    m: *const f32,
    stride: usize,
    c: usize,
    bias: *const f32,
    from: &[Option<*const f32>; 16],
    to: &[Option<*mut f32>; 16],
    act: Fused,
) {
    let (n, k) = (T::SIDE, T::M);
    for cb in (0..c).step_by(S::LANES) {
        let left = c - cb;
        // SAFETY (loads and stores): masked to the `left` lanes from `cb`,
        // inside each position's, the bias's and each pixel's `c` floats.
        unsafe {
            let mask = S::first(left);
            let load = |p: *const f32| if left >= S::LANES { S::load(p) } else { S::load_masked(mask, p) };
            let mut e = [S::zero(); MAX_POINTS];
            for (p, e) in e[..n * n].iter_mut().enumerate() {
                *e = load(m.add(p * stride + cb));
            }
            // Aᵀ down each column, then along each row.
            let mut s = [S::zero(); 24];
            for j in 0..n {
                let col = T::output(column(&e, n, j));
                for i in 0..k {
                    s[i * n + j] = col[i];
                }
            }
            let b = load(bias.add(cb));
            for i in 0..k {
                let mut row = [S::zero(); 6];
                row[..n].copy_from_slice(&s[i * n..i * n + n]);
                for (j, y) in T::output(row).into_iter().take(k).enumerate() {
                    let q = i * k + j;
                    let Some(px) = to[q] else { continue };
                    let mut y = S::add(y, b);
                    if let Some(r) = from[q] {
                        y = S::add(y, load(r.add(cb)));
                    }
                    let y = activate(y, act);
                    if left >= S::LANES { S::store(px.add(cb), y) } else { S::store_masked(mask, px.add(cb), y) }
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

    /// The same maps as the direct kernel, up to rounding, on every
    /// instruction set this CPU runs: sides leaving each remainder after
    /// the 2- and 4-pixel tiles, a map smaller than a tile, channels that
    /// do not fill a vector, a residual, each activation, more chunks than
    /// threads.
    #[test]
    fn matches_the_direct_convolution() {
        let sets = Isa::supported();
        eprintln!("instruction sets: {sets:?}");
        for isa in sets {
            matches_the_direct_convolution_on(isa);
        }
    }

    fn matches_the_direct_convolution_on(isa: Isa) {
        for (n, cin, cout, h, w, act, res) in [
            (1, 3, 5, 7, 6, Fused::None, false),
            (2, 16, 24, 15, 14, Fused::Relu, true),
            (3, 64, 64, 28, 27, Fused::Relu, true),
            (1, 40, 17, 1, 3, Fused::Relu6, false),
            (2, 128, 96, 9, 16, Fused::Relu, false),
            (1, 256, 256, 14, 14, Fused::Relu, true),
        ] {
            let (wt, b) = (values(cout * cin * 9, 7), values(cout, 8));
            let x = Nhwc { data: values(n * h * w * cin, 9), n, h, w, c: cin };
            let r = Nhwc { data: values(n * h * w * cout, 10), n, h, w, c: cout };
            let r = res.then_some(&r);
            let want = NhwcConv::for_isa(isa, &wt, &b, cin, 3, 1, PadMode::Symmetric(1), act).forward(&x, r);
            let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (tile, tol) in [(Tile::F2, 1e-5), (Tile::F4, 1e-4)] {
                let got = Winograd::for_isa(isa, &wt, &b, cin, act, tile).forward(&x, r);
                assert_eq!((got.n, got.h, got.w, got.c), (n, h, w, cout));
                let worst = got.data.iter().zip(&want.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(worst <= tol * scale, "{isa:?} {tile:?} {n}×{cin}→{cout} {h}×{w}: off by {worst} (of {scale})");
            }
        }
    }

    /// F2 and F4 against the direct kernel on resnet18's 3×3 stride-1
    /// layers and on 384 and 512 channels at 14² (512: wide_resnet50's)
    /// and 256 at 7², at batch 1 and 8, in nominal GFLOP/s of the direct
    /// convolution: `cargo test --release -p lineside-inference --lib
    /// winograd::tests::speed -- --ignored --nocapture`.
    /// The tile for each map and layer width, at the thresholds.
    #[test]
    fn picks_the_tile_by_side_and_weights() {
        let map = |side: usize, c: usize| Nhwc { data: Vec::new(), n: 0, h: side, w: side + 3, c };
        for (side, cin, cout, want) in [
            (56, 64, 64, Some(Tile::F4)),
            (7, 128, 128, Some(Tile::F4)),
            (6, 128, 128, None),
            (28, 128, 129, Some(Tile::F2)),
            (8, 512, 512, Some(Tile::F2)),
            (7, 512, 512, None),
        ] {
            assert_eq!(Tile::for_map(&map(side, cin), cout), want, "{side}² {cin}→{cout}");
        }
    }

    #[test]
    #[ignore]
    fn speed() {
        for n in [1, 8] {
            for (c, h) in [(64, 56), (128, 28), (256, 14), (384, 14), (512, 14), (256, 7), (512, 7)] {
                let (wt, b) = (values(c * c * 9, 2), values(c, 3));
                let x = Nhwc { data: values(n * h * h * c, 1), n, h, w: h, c };
                let slow = direct(&wt, &b, c, Fused::Relu);
                let f2 = Winograd::new(&wt, &b, c, Fused::Relu, Tile::F2).unwrap();
                let f4 = Winograd::new(&wt, &b, c, Fused::Relu, Tile::F4).unwrap();
                let flops = 2.0 * (n * h * h * c * c * 9) as f64;
                let d = gflops(flops, 1e9, &mut || drop(slow.forward(&x, None)));
                let g2 = gflops(flops, 1e9, &mut || drop(f2.forward(&x, None)));
                let g4 = gflops(flops, 1e9, &mut || drop(f4.forward(&x, None)));
                println!(
                    "n{n} {c:>3}→{c:>3} {h:>2}²: direct {d:6.1}, F2 {g2:6.1} ({:.2}×), F4 {g4:6.1} ({:.2}×) GFLOP/s",
                    g2 / d,
                    g4 / d
                );
            }
        }
    }
}
