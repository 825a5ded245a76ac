//! A packed f32 GEMM with an AVX-512 microkernel, written for convolutions.
//!
//! `C[m×n] = act(A[m×k] · B[k×n] + bias)`, where A is a layer's weights
//! (packed once, at load time), B the activation or its im2col matrix (packed
//! per call, in blocks that stay in cache) and C the NCHW output. The bias is
//! the accumulators' starting value; a residual (a block's shortcut) is added
//! and ReLU/ReLU6 applied in registers before the store, so nothing else
//! touches the output afterwards.
//!
//! Blocking follows BLIS: a `KC×NR` sliver of B stays in L1 while the
//! `MR`-row panels of A stream past it from L2. The general-purpose GEMM
//! crates we used before reached 40–160 GFLOP/s on two cores here; they pack
//! the weights on every call and (matrixmultiply) stop at AVX2.
//!
//! Only x86-64 with AVX-512F gets a [`PackedA`]; elsewhere
//! [`PackedA::new`] returns `None` and callers keep their portable path.

// Off x86-64 no PackedA is ever built, so the packed GEMM is dead code there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::simd::Isa;

/// Rows of A per microkernel call (one broadcast each per k step): 12
/// fills the 32 registers best, but shallow GEMMs (k < [`DEEP`]) are bound
/// by memory and waste less of a panel with 8.
const MR_DEEP: usize = 12;
const MR_SHALLOW: usize = 8;
const DEEP: usize = 64;
/// Columns of B per microkernel call: two 16-lane registers.
pub const NR: usize = 32;
/// Depth of one block: a `KC×NR` B sliver is 32 KiB, inside a 48 KiB L1.
const KC: usize = 256;
/// Blocks at least this deep run tile-major, shallower ones panel-major.
const TILE_MAJOR_FROM: usize = 64;
/// Most columns one task packs: a `KC×NC` B block is 512 KiB of L2.
const NC: usize = 512;

/// The activation fused into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fused {
    None,
    Relu,
    Relu6,
}

/// Weights packed as `mr`-row panels, each k-major (`mr` values per k),
/// zero-padded to a whole panel.
#[derive(Debug, Clone)]
pub struct PackedA {
    data: Vec<f32>,
    m: usize,
    k: usize,
    mr: usize,
}

impl PackedA {
    /// Packs a row-major `m×k` matrix, or `None` where the CPU has no AVX-512F.
    pub fn new(a: &[f32], m: usize, k: usize) -> Option<Self> {
        assert_eq!(a.len(), m * k, "weights are not {m}×{k}");
        if !available() {
            return None;
        }
        let mr = if k >= DEEP { MR_DEEP } else { MR_SHALLOW };
        let mut data = vec![0f32; m.div_ceil(mr) * mr * k];
        for (p, panel) in data.chunks_mut(mr * k).enumerate() {
            for r in 0..mr.min(m - p * mr) {
                let row = &a[(p * mr + r) * k..][..k];
                for (kk, v) in row.iter().enumerate() {
                    panel[kk * mr + r] = *v;
                }
            }
        }
        Some(Self { data, m, k, mr })
    }
}

/// Whether the kernel runs here: the CPU has AVX-512F and
/// `LINESIDE_ISA=avx2` does not cap it ([`Isa::detect`]), so the cap keeps
/// every kernel of ours off AVX-512, on the NCHW path too.
pub fn available() -> bool {
    Isa::detect() == Some(Isa::Avx512)
}

/// The right-hand matrix B, read one row segment at a time while packing.
///
/// A convolution's im2col matrix need never exist: its rows are produced
/// straight from the image, a cache-sized block at a time.
pub trait Rhs: Sync {
    /// Rows of B (the GEMM's k).
    fn rows(&self) -> usize;
    /// Columns of B (the GEMM's n).
    fn cols(&self) -> usize;
    /// `B[r, cols]`: borrowed where B is stored, else written into `buf`
    /// (exactly `cols.len()` long).
    fn row<'a>(&'a self, r: usize, cols: Range<usize>, buf: &'a mut [f32]) -> &'a [f32];
    /// All of B as one row-major `rows×cols` slice, where it is stored so
    /// (for GEMMs that take B whole).
    fn stored(&self) -> Option<&[f32]> {
        None
    }
    /// Packs `B[r, cols]` for the packed GEMM (AVX-512F CPUs): its
    /// `NR`-column pieces go `stride` apart into `dst`, one per sliver, the
    /// last zero-padded. By default through [`Rhs::row`] and a copy; a B
    /// that can produce its row in place overrides this to skip the copy.
    fn pack_row(&self, r: usize, cols: Range<usize>, buf: &mut [f32], dst: &mut [f32], stride: usize) {
        let src = self.row(r, cols, buf);
        // SAFETY: only the packed GEMM packs, and it exists only where the
        // CPU has AVX-512F (`PackedA::new`).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::scatter_row(src, dst, stride)
        };
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (src, dst, stride);
            unreachable!("PackedA exists only on x86-64");
        }
    }
}

/// A row-major matrix in memory.
#[derive(Debug, Clone, Copy)]
pub struct Dense<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> Dense<'a> {
    /// `rows×cols`, rows `stride` apart.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(
            cols <= stride && (rows == 0 || data.len() >= (rows - 1) * stride + cols),
            "B is smaller than {rows}×{cols}"
        );
        Self { data, rows, cols, stride }
    }
}

impl Rhs for Dense<'_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn row<'b>(&'b self, r: usize, cols: Range<usize>, _: &'b mut [f32]) -> &'b [f32] {
        &self.data[r * self.stride..][cols]
    }

    fn stored(&self) -> Option<&[f32]> {
        (self.stride == self.cols).then(|| &self.data[..self.rows * self.cols])
    }
}

/// `C = act(A · B + bias [+ R])`: C is `m×n` with row stride `ldc`, `bias`
/// has one value per row, and the optional residual `R` (a ResNet shortcut,
/// an inverted residual's input) has C's shape and stride. Runs on the
/// current rayon pool.
///
/// The residual is added in registers before the activation, so a block's
/// `relu(conv(x) + shortcut)` makes one pass over memory instead of three.
/// C may be uninitialized: every element of its `m×n` is written.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    a: &PackedA,
    b: &impl Rhs,
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    bias: &[f32],
    residual: Option<&[f32]>,
    act: Fused,
) {
    let (m, n) = (a.m, b.cols());
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= ldc, "bad GEMM strides");
    assert!(c.len() >= (m - 1) * ldc + n, "C is smaller than {m}×{n}");
    let threads = rayon::current_num_threads();
    // SAFETY: checked just above; `c` is borrowed mutably, so no one else
    // writes it.
    unsafe { gemm_raw(threads, a, b, c.as_mut_ptr().cast(), ldc, bias, residual, act) }
}

/// [`gemm`] into C given by pointer, on `threads` tasks at most (1: on the
/// calling thread). Lets callers running in parallel write disjoint
/// column ranges of one matrix.
///
/// # Safety
/// `c` points at `(m - 1)·ldc + n` floats, of which the `m×n` block at
/// stride `ldc` is writable and written by no one else during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw(
    threads: usize,
    a: &PackedA,
    b: &impl Rhs,
    c: *mut f32,
    ldc: usize,
    bias: &[f32],
    residual: Option<&[f32]>,
    act: Fused,
) {
    let (m, k, n) = (a.m, a.k, b.cols());
    assert_eq!(b.rows(), k, "A is {m}×{k} but B has {} rows", b.rows());
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0 && n <= ldc, "bad GEMM strides");
    assert_eq!(bias.len(), m, "one bias per row");
    if let Some(r) = residual {
        assert!(r.len() >= (m - 1) * ldc + n, "the residual is smaller than {m}×{n}");
    }
    let res = residual.map(|r| SharedIn(r.as_ptr()));
    let plan = Plan::new(m, a.mr, n, k, threads.max(1));
    let job = Job { a, b, n, c: SharedOut(c), ldc, bias, res, act, plan };
    if threads <= 1 {
        (0..plan.tasks()).for_each(|t| job.run(t));
    } else {
        (0..plan.tasks()).into_par_iter().for_each(|t| job.run(t));
    }
}

/// How the output is cut into tasks: column chunks (each packs its own B
/// block) times row chunks (whole panels), enough for every thread.
#[derive(Debug, Clone, Copy)]
struct Plan {
    panels: usize,
    panels_per_task: usize,
    row_chunks: usize,
    tiles_per_task: usize,
    col_chunks: usize,
    kc: usize,
}

impl Plan {
    fn new(m: usize, mr: usize, n: usize, k: usize, threads: usize) -> Self {
        let panels = m.div_ceil(mr);
        let tiles = n.div_ceil(NR);
        let tiles_per_task = (NC / NR).min(tiles.div_ceil(threads)).max(1);
        let col_chunks = tiles.div_ceil(tiles_per_task);
        // Too few column chunks to keep every thread busy: split the rows too
        // (the chunks then pack the same B block, a cost of 1/mr per row).
        let want = if threads > 1 { 2 * threads } else { 1 };
        let row_chunks = want.div_ceil(col_chunks).clamp(1, panels);
        let panels_per_task = panels.div_ceil(row_chunks);
        let row_chunks = panels.div_ceil(panels_per_task);
        let kc = k.div_ceil(k.div_ceil(KC));
        Self { panels, panels_per_task, row_chunks, tiles_per_task, col_chunks, kc }
    }

    fn tasks(&self) -> usize {
        self.row_chunks * self.col_chunks
    }
}

/// The output pointer, shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint row/column ranges of C (see `Job::run`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// The residual's pointer (read only), shared by every task.
#[derive(Clone, Copy)]
struct SharedIn(*const f32);
// SAFETY: only read, and the borrow it came from outlives the job.
unsafe impl Send for SharedIn {}
unsafe impl Sync for SharedIn {}

struct Job<'a, R> {
    a: &'a PackedA,
    b: &'a R,
    n: usize,
    c: SharedOut,
    ldc: usize,
    bias: &'a [f32],
    res: Option<SharedIn>,
    act: Fused,
    plan: Plan,
}

thread_local! {
    /// Each worker's B block and row buffer, reused across calls.
    static B_BLOCK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl<R: Rhs> Job<'_, R> {
    /// Task `t`: one chunk of panels × one chunk of column tiles, all of k.
    fn run(&self, t: usize) {
        let p = self.plan;
        let (rc, cc) = (t % p.row_chunks, t / p.row_chunks);
        let panels = rc * p.panels_per_task..((rc + 1) * p.panels_per_task).min(p.panels);
        let j0 = cc * p.tiles_per_task * NR;
        let j1 = (j0 + p.tiles_per_task * NR).min(self.n);
        let k = self.a.k;
        B_BLOCK.with_borrow_mut(|(block, row)| {
            block.resize(p.kc * p.tiles_per_task * NR, 0.0);
            row.resize(j1 - j0, 0.0);
            for k0 in (0..k).step_by(p.kc) {
                let kc = p.kc.min(k - k0);
                self.pack_b(k0, kc, j0..j1, block, row);
                let first = k0 == 0;
                // The residual and activation belong to the finished sum.
                let last = k0 + kc == k;
                let act = if last { self.act } else { Fused::None };
                let tiles = (j0..j1).step_by(NR).enumerate();
                if kc >= TILE_MAJOR_FROM {
                    // A B sliver stays in L1 while the A panels stream past
                    // it from L2: the least L2 traffic per FMA.
                    for (tile, j) in tiles {
                        let sliver = &block[tile * kc * NR..][..kc * NR];
                        for panel in panels.clone() {
                            self.tile(panel, j, NR.min(j1 - j), k0, kc, sliver, first, last, act);
                        }
                    }
                } else {
                    // Shallow: the stores dominate, so write C as `mr`
                    // sequential rows rather than a column strip of all rows.
                    for panel in panels.clone() {
                        for (tile, j) in tiles.clone() {
                            let sliver = &block[tile * kc * NR..][..kc * NR];
                            self.tile(panel, j, NR.min(j1 - j), k0, kc, sliver, first, last, act);
                        }
                    }
                }
            }
        });
    }

    /// Copies `B[k0..k0+kc, j0..j1]` into `NR`-column slivers, k-major,
    /// zero-padding the last one.
    fn pack_b(&self, k0: usize, kc: usize, cols: Range<usize>, block: &mut [f32], row: &mut [f32]) {
        for kk in 0..kc {
            self.b.pack_row(k0 + kk, cols.clone(), &mut row[..cols.len()], &mut block[kk * NR..], kc * NR);
        }
    }

    /// One `mr×NR` tile of C at row panel `panel`, column `j`.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        panel: usize,
        j: usize,
        cols: usize,
        k0: usize,
        kc: usize,
        sliver: &[f32],
        first: bool,
        last: bool,
        act: Fused,
    ) {
        let (m, k, mr) = (self.a.m, self.a.k, self.a.mr);
        let row0 = panel * mr;
        let rows = mr.min(m - row0);
        let a = &self.a.data[panel * mr * k + k0 * mr..][..kc * mr];
        let bias = first.then(|| &self.bias[row0..row0 + rows]);
        // SAFETY: `gemm` checked that C holds rows `row0..row0+rows` at
        // stride `ldc` with `n` columns; `j + cols <= n`; this task is the
        // only writer of this tile; the kernel exists only where AVX-512F
        // was detected (`PackedA::new`).
        // The residual, where given, has C's shape and stride (`gemm`).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let at = row0 * self.ldc + j;
            let c = self.c.0.add(at);
            let res = match self.res {
                Some(r) if last => r.0.add(at),
                _ => std::ptr::null(),
            };
            match mr {
                MR_DEEP => avx512::kernel::<MR_DEEP>(kc, a, sliver, c, self.ldc, rows, cols, bias, res, act),
                _ => avx512::kernel::<MR_SHALLOW>(kc, a, sliver, c, self.ldc, rows, cols, bias, res, act),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (j, cols, sliver, a, bias, last, act);
            unreachable!("PackedA exists only on x86-64")
        }
    }
}

/// `dst[t] = src[start + stride·t]`, or 0 where that index is outside
/// `src`: one output row of an im2col, padding included. Strides 1 and 2 run
/// on AVX-512 where the CPU has it.
pub fn padded_copy(dst: &mut [f32], src: &[f32], start: isize, stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if available() && stride <= 2 {
        // SAFETY: AVX-512F was just detected.
        unsafe {
            match stride {
                1 => avx512::shifted_copy(dst, src, start),
                _ => avx512::stride2_copy(dst, src, start),
            }
        }
        return;
    }
    strided_copy(dst, src, start, stride as isize);
}

/// [`padded_copy`] without SIMD.
fn strided_copy(dst: &mut [f32], src: &[f32], start: isize, stride: isize) {
    for (t, d) in dst.iter_mut().enumerate() {
        let i = start + stride * t as isize;
        *d = if i >= 0 && (i as usize) < src.len() { src[i as usize] } else { 0.0 };
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{Fused, NR};

    /// One packed row: `src`'s `NR`-column pieces go `stride` apart into
    /// `dst` (one per sliver), the last zero-padded; no memcpy call per
    /// 128 bytes.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scatter_row(src: &[f32], dst: &mut [f32], stride: usize) {
        for (tile, part) in src.chunks(NR).enumerate() {
            let out = &mut dst[tile * stride..][..NR];
            let (m0, m1) = lane_masks(part.len());
            // SAFETY: the masks cover only `part`; `out` holds NR floats.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(m0, part.as_ptr());
                let hi = _mm512_maskz_loadu_ps(m1, part.as_ptr().wrapping_add(16));
                _mm512_storeu_ps(out.as_mut_ptr(), lo);
                _mm512_storeu_ps(out.as_mut_ptr().add(16), hi);
            }
        }
    }

    /// `src[base + lane]` for the 16 lanes, 0 where that is outside `src`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load16(src: &[f32], base: isize) -> __m512 {
        let valid = valid_lanes(src, base);
        // SAFETY: only the lanes in `valid` are read, and they index inside `src`.
        unsafe { _mm512_maskz_loadu_ps(valid, src.as_ptr().wrapping_offset(base)) }
    }

    /// Stores the first `out.len()` (at most 16) lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn store_first(out: &mut [f32], v: __m512) {
        let store = if out.len() >= 16 { 0xffff } else { ((1u32 << out.len()) - 1) as u16 };
        // SAFETY: only the lanes in `store` are written, inside `out`.
        unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr(), store, v) };
    }

    /// [`super::padded_copy`] at stride 1: 16 lanes at a time, with the lanes that
    /// fall outside `src` masked off (masked lanes are never read).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn shifted_copy(dst: &mut [f32], src: &[f32], shift: isize) {
        for (c, out) in dst.chunks_mut(16).enumerate() {
            store_first(out, load16(src, c as isize * 16 + shift));
        }
    }

    /// [`super::padded_copy`] at stride 2: 32 inputs per 16 outputs, evens kept.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn stride2_copy(dst: &mut [f32], src: &[f32], start: isize) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        for (c, out) in dst.chunks_mut(16).enumerate() {
            let first = start + c as isize * 32;
            store_first(out, _mm512_permutex2var_ps(load16(src, first), even, load16(src, first + 16)));
        }
    }

    /// `src[start + i]` (0 outside `src`) for `i` in `0..len`, written as
    /// packed columns `at..at + len` of a row whose `NR`-column slivers lie
    /// `stride` apart in `dst`: the shifted copy and the packing in one pass.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn shifted_to_slivers(dst: &mut [f32], stride: usize, at: usize, len: usize, src: &[f32], start: isize) {
        let mut c = at;
        while c < at + len {
            // Lanes `lane0..lane0 + n` of the 16-column group holding `c`.
            let (lane0, group) = (c % 16, c - c % 16);
            let n = (16 - lane0).min(at + len - c);
            let want = (((1u32 << n) - 1) << lane0) as u16;
            let base = start + group as isize - at as isize;
            let valid = valid_lanes(src, base);
            let out = &mut dst[(group / NR) * stride + group % NR..][..16];
            // SAFETY: the loaded lanes index inside `src` (`valid`), the
            // stored ones inside `out`.
            unsafe {
                let v = _mm512_maskz_loadu_ps(want & valid, src.as_ptr().wrapping_offset(base));
                _mm512_mask_storeu_ps(out.as_mut_ptr(), want, v);
            }
            c += n;
        }
    }

    /// The lanes `l` of 16 for which `src[base + l]` exists.
    #[inline]
    fn valid_lanes(src: &[f32], base: isize) -> __mmask16 {
        let lo = (-base).clamp(0, 16) as u32;
        let hi = (src.len() as isize - base).clamp(0, 16) as u32;
        if hi > lo { (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16 } else { 0 }
    }

    /// Masks for the first `n` of two 16-lane halves.
    #[inline]
    fn lane_masks(n: usize) -> (__mmask16, __mmask16) {
        let m = |n: usize| if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as u16 };
        (m(n), m(n.saturating_sub(16)))
    }

    /// `C[rows×cols] = act((bias or C) + A·B [+ R])` for one tile.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `c` points at `rows` (≤ `MR`) rows of at least
    /// `cols` (≤ `NR`) writable floats at stride `ldc`; `res` is null or
    /// points at as many readable floats, laid out the same way.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel<const MR: usize>(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        bias: Option<&[f32]>,
        res: *const f32,
        act: Fused,
    ) {
        debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR && rows <= MR && cols <= NR);
        let (m0, m1) = lane_masks(cols);
        // SAFETY: loads stay inside `a` and `b` (lengths above) and the
        // masked loads and stores inside the caller's `rows × cols` of C.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            // Constant indices only (`i < MR`, guarded by `rows`), so the
            // accumulators stay in registers.
            for (i, acc) in acc.iter_mut().enumerate() {
                if i < rows {
                    *acc = match bias {
                        Some(bias) => [_mm512_set1_ps(bias[i]); 2],
                        None => {
                            let r = c.add(i * ldc);
                            [_mm512_maskz_loadu_ps(m0, r), _mm512_maskz_loadu_ps(m1, r.add(16))]
                        }
                    };
                }
            }
            let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
            for _ in 0..kc {
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(16));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(i));
                    acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                }
                (ap, bp) = (ap.add(MR), bp.add(NR));
            }
            let zero = _mm512_setzero_ps();
            let six = _mm512_set1_ps(6.0);
            for (i, &[mut lo, mut hi]) in acc.iter().enumerate() {
                if i < rows {
                    if !res.is_null() {
                        let r = res.add(i * ldc);
                        lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(m0, r));
                        hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(m1, r.add(16)));
                    }
                    match act {
                        Fused::None => {}
                        Fused::Relu => {
                            lo = _mm512_max_ps(lo, zero);
                            hi = _mm512_max_ps(hi, zero);
                        }
                        Fused::Relu6 => {
                            lo = _mm512_min_ps(_mm512_max_ps(lo, zero), six);
                            hi = _mm512_min_ps(_mm512_max_ps(hi, zero), six);
                        }
                    }
                    let r = c.add(i * ldc);
                    _mm512_mask_storeu_ps(r, m0, lo);
                    _mm512_mask_storeu_ps(r.add(16), m1, hi);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{gflops, values};

    /// Initialized floats seen as an output buffer (the GEMM writes only floats).
    fn as_uninit(s: &mut [f32]) -> &mut [MaybeUninit<f32>] {
        // SAFETY: same layout; the GEMM stores only initialized floats.
        unsafe { &mut *(s as *mut [f32] as *mut [MaybeUninit<f32>]) }
    }

    /// `act(A·B + bias + res)`, with `res` (if any) at row stride `ldr`.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        a: &[f32],
        b: &[f32],
        m: usize,
        k: usize,
        n: usize,
        bias: &[f32],
        res: Option<(&[f32], usize)>,
        act: Fused,
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = bias[i] as f64;
                for kk in 0..k {
                    s += a[i * k + kk] as f64 * b[kk * n + j] as f64;
                }
                let v = s as f32 + res.map_or(0.0, |(r, ldr)| r[i * ldr + j]);
                c[i * n + j] = match act {
                    Fused::None => v,
                    Fused::Relu => v.max(0.0),
                    Fused::Relu6 => v.clamp(0.0, 6.0),
                };
            }
        }
        c
    }

    #[test]
    fn padded_copies_match_the_portable_ones() {
        if !available() {
            return;
        }
        let src = values(37, 4);
        for len in [1, 7, 16, 17, 40] {
            for start in -20..45 {
                let (mut simd, mut portable) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                // SAFETY: AVX-512F is available (checked above).
                unsafe { avx512::shifted_copy(&mut simd, &src, start) };
                strided_copy(&mut portable, &src, start, 1);
                assert_eq!(simd, portable, "shift {start}, {len} long");
                unsafe { avx512::stride2_copy(&mut simd, &src, start) };
                strided_copy(&mut portable, &src, start, 2);
                assert_eq!(simd, portable, "stride 2 from {start}, {len} long");
            }
        }
    }

    #[test]
    fn matches_naive_on_ragged_shapes() {
        if !available() {
            eprintln!("no AVX-512F: the packed GEMM is not used on this CPU");
            return;
        }
        // Rows and columns off the tile sizes, k across block boundaries.
        for &(m, k, n) in
            &[(1, 1, 1), (7, 3, 17), (8, 27, 32), (13, 256, 33), (24, 257, 49), (70, 600, 530), (16, 5, 1100)]
        {
            for (act, with_res) in
                [Fused::None, Fused::Relu, Fused::Relu6].into_iter().flat_map(|a| [(a, false), (a, true)])
            {
                let (a, b, bias) = (values(m * k, 1), values(k * n, 2), values(m, 3));
                // Strided C: the padding columns must survive untouched.
                let ldc = n + 3;
                let res = with_res.then(|| values(m * ldc, 5));
                let want = naive(&a, &b, m, k, n, &bias, res.as_deref().map(|r| (r, ldc)), act);
                let mut c = vec![f32::NAN; m * ldc];
                let pa = PackedA::new(&a, m, k).unwrap();
                gemm(&pa, &Dense::new(&b, k, n, n), as_uninit(&mut c), ldc, &bias, res.as_deref(), act);
                for i in 0..m {
                    for j in 0..ldc {
                        let got = c[i * ldc + j];
                        if j >= n {
                            assert!(got.is_nan(), "{m}×{k}×{n}: wrote past column {n}");
                            continue;
                        }
                        let w = want[i * n + j];
                        assert!(
                            (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{m}×{k}×{n} {act:?} residual {with_res} [{i},{j}]: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// The f32 FMA peak that the GFLOP/s figures are a share of, measured
    /// rather than taken from a data sheet (a VM's clock and its CPU's FMA
    /// width vary: AMD's Zen 4 runs a 16-lane FMA on two 8-lane units):
    /// twelve independent chains of FMAs per thread, on one thread and on
    /// all, for each instruction set the CPU runs. `cargo test --release -p lineside-inference --lib
    /// sgemm::tests::fma_peak -- --ignored --nocapture`
    #[test]
    #[ignore = "measurement: prints figures"]
    fn fma_peak() {
        use crate::ops::simd::{Isa, Simd, Ymm, Zmm};
        /// Twelve chains of `iters` FMAs each.
        ///
        /// # Safety
        /// The CPU runs `S`.
        #[inline(always)]
        unsafe fn chains<S: Simd>(iters: usize) -> f32 {
            // SAFETY: the caller's promise; the store writes `LANES` floats
            // of a 16-float buffer.
            unsafe {
                let (b, c) = (S::splat(1.000_000_1), S::splat(1e-7));
                // Different starting values, so no two chains are the same value.
                let mut acc: [S; 12] = std::array::from_fn(|i| S::splat(i as f32 * 1e-3));
                for _ in 0..iters {
                    for a in &mut acc {
                        *a = S::mul_add(*a, b, c);
                    }
                }
                let mut lanes = [0f32; 16];
                acc.iter()
                    .map(|&a| {
                        S::store(lanes.as_mut_ptr(), a);
                        lanes.iter().sum::<f32>()
                    })
                    .sum()
            }
        }
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(iters: usize) -> f32 {
            // SAFETY: forwarded.
            unsafe { chains::<Zmm>(iters) }
        }
        /// # Safety
        /// The CPU has AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(iters: usize) -> f32 {
            // SAFETY: forwarded.
            unsafe { chains::<Ymm>(iters) }
        }
        const ITERS: usize = 100_000_000;
        let all = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut counts = vec![1, all];
        counts.dedup();
        for isa in Isa::supported() {
            let (run, lanes): (unsafe fn(usize) -> f32, usize) = match isa {
                Isa::Avx512 => (avx512, 16),
                Isa::Avx2 => (avx2, 8),
            };
            for &threads in &counts {
                let start = std::time::Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        // SAFETY: `Isa::supported` found the CPU runs it.
                        s.spawn(|| std::hint::black_box(unsafe { run(std::hint::black_box(ITERS)) }));
                    }
                });
                let flops = (threads * ITERS * 12 * lanes * 2) as f64;
                let rate = flops / start.elapsed().as_secs_f64() / 1e9;
                println!("{isa:?}, {threads} thread(s): {rate:.1} GFLOP/s, {:.1} per thread", rate / threads as f64);
            }
        }
    }

    /// GFLOP/s on the convolution shapes of resnet18 and mobilenetv2, against
    /// matrixmultiply: `cargo test -p lineside-inference --lib sgemm::tests::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        let shapes = [
            (64, 576, 3136),
            (128, 1152, 784),
            (256, 2304, 196),
            (512, 4608, 49),
            (512, 4608, 392),
            (32, 16, 12544),
            (96, 16, 12544),
            (24, 144, 3136),
            (144, 24, 3136),
            (192, 32, 784),
            (64, 384, 196),
            (384, 64, 196),
            (1280, 320, 49),
        ];
        for (m, k, n) in shapes {
            let (a, b, bias) = (values(m * k, 1), values(k * n, 2), values(m, 3));
            let pa = PackedA::new(&a, m, k).unwrap();
            let mut c = vec![0f32; m * n];
            let flops = 2.0 * (m * k * n) as f64;
            let time = |f: &mut dyn FnMut()| gflops(flops, 2e9, f);
            let ours =
                time(&mut || gemm(&pa, &Dense::new(&b, k, n, n), as_uninit(&mut c), n, &bias, None, Fused::Relu));
            let mm = time(&mut || unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    k as isize,
                    1,
                    b.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                )
            });
            println!("{m:>5}×{k:>5}×{n:>6}: packed {ours:6.1} GFLOP/s, matrixmultiply {mm:6.1}");
        }
    }
}
