//! A whole inverted-residual block (1×1 expansion, depthwise, 1×1
//! projection, optional skip) in bands of output rows, so that the expanded
//! activation never leaves the core's cache.
//!
//! Layer by layer, MobileNetV2's first blocks write and re-read expanded
//! maps of 1.6–4.8 MB per image (112×112×96 floats is 4.8 MB), over the
//! 2 MiB L2: the depthwise kernel then waits on memory, not on its FMAs.
//! Here each band of output rows expands only the input rows under it (plus
//! the kernel's halo, recomputed at each band's edge), runs the depthwise
//! kernel on them and projects the result straight into the NCHW output,
//! with the skip added in the GEMM's store. A band's buffers are a few
//! hundred KiB. Bands are independent, so they are also the unit of
//! parallelism at batch 1.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use std::ops::Range;

use super::depthwise::{Geometry, Phases};
use super::gemm_conv::Weights;
use super::sgemm::{self, Dense, Fused, PackedA, Rhs};
use super::{Activation, DepthwiseConv, GemmConv, Padding, Uninit, contiguous_f32, finish, out_size, uninit_output};

/// Blocks whose expanded map per image is smaller than this run layer by
/// layer: the map fits in L2 anyway. 256 KiB (taking in the 28×28 and
/// 14×14 blocks) measured no different within this VM's noise.
const FUSE_FROM_BYTES: usize = 1 << 20;

/// Target size of one band's expanded rows.
const BAND_BYTES: usize = 384 << 10;

/// The block's layers, each known to run on the packed AVX-512 kernels with
/// its activation applied in registers.
pub struct InvertedResidual<'a> {
    expand: Option<(&'a PackedA, &'a GemmConv)>,
    dw: &'a DepthwiseConv,
    project: (&'a PackedA, &'a GemmConv),
    skip: bool,
}

impl<'a> InvertedResidual<'a> {
    /// The fused block where every layer can run fused and the expanded map
    /// of an `h×w` input is large enough to gain from it; else `None`, and
    /// the caller runs the layers one by one.
    pub fn new(
        expand: Option<&'a GemmConv>,
        dw: &'a DepthwiseConv,
        project: &'a GemmConv,
        skip: bool,
        (h, w): (usize, usize),
    ) -> Option<Self> {
        let in_registers = |act: Activation| act == Activation::Identity || act.fused() != Fused::None;
        let packed = |conv: &'a GemmConv| match &conv.weight {
            Weights::Packed(a) if conv.pointwise() && in_registers(conv.act) => Some((a, conv)),
            _ => None,
        };
        let expand = match expand {
            Some(conv) => Some(packed(conv)?),
            None => None,
        };
        let project = packed(project)?;
        let expanded = expand.map_or(project.1.in_ch, |(_, e)| e.out_ch);
        // Padding of a kernel's size or more would leave a band all padding.
        let pad = dw.pad.resolve(h, w, dw.kernel, dw.stride);
        let fits = dw.simd
            && in_registers(dw.act)
            && dw.channels() == expanded
            && project.1.in_ch == expanded
            && pad.top.max(pad.bottom) < dw.kernel
            && !(skip && (project.1.act != Activation::Identity || dw.stride != 1));
        let large = expanded * h * w * size_of::<f32>() >= FUSE_FROM_BYTES;
        (fits && large).then_some(Self { expand, dw, project, skip })
    }

    fn in_channels(&self) -> usize {
        self.expand.map_or(self.project.1.in_ch, |(_, e)| e.in_ch)
    }

    fn expanded(&self) -> usize {
        self.project.1.in_ch
    }
}

/// Sizes of one image's pass.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    pad: Padding,
    /// Output rows per band.
    band: usize,
}

/// One band's buffers, kept per worker.
#[derive(Default)]
struct Scratch {
    expanded: Vec<f32>,
    depthwise: Vec<f32>,
    plane: Vec<f32>,
}

/// The output pointer, shared by bands that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each band writes only its own output columns (`InvertedResidual::band`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer `n` floats on.
    ///
    /// # Safety
    /// As for `pointer::add`: it stays inside the output.
    unsafe fn add(self, n: usize) -> Out {
        // SAFETY: forwarded.
        Out(unsafe { self.0.add(n) })
    }
}

impl InvertedResidual<'_> {
    /// The band of output rows from `o0` of one image: expand the input
    /// rows under them, depthwise, project into `out` (the image's
    /// `[out_ch, oh·ow]`).
    fn band(&self, x: &[f32], d: Dims, o0: usize, s: &mut Scratch, out: Out) {
        let (k, st) = (self.dw.kernel, self.dw.stride);
        let rows = o0..(o0 + d.band).min(d.oh);
        // The band's rows in padded coordinates, then in the input.
        let (p0, p1) = (o0 * st, (rows.end - 1) * st + k);
        let r0 = p0.saturating_sub(d.pad.top).min(d.h);
        let r1 = p1.saturating_sub(d.pad.top).min(d.h);
        let top = d.pad.top.saturating_sub(p0);
        let pad = Padding { top, bottom: p1 - p0 - top - (r1 - r0), ..d.pad };
        let (hw, band_in) = (d.h * d.w, (r1 - r0) * d.w);
        let c = self.expanded();

        let band_out = rows.len() * d.ow;
        s.depthwise.resize(c * band_out, 0.0);
        let g = Geometry { h: r1 - r0, w: d.w, ow: d.ow, pad };
        match self.expand {
            Some((a, conv)) => {
                // The GEMM writes the expanded rows straight in the layout
                // the depthwise kernel reads: no copy in between.
                let phases = self.dw.phases(g);
                let body = phases.body();
                s.expanded.resize(c * body + phases.len() - body, 0.0);
                let b = PhasedInput { x: &x[r0 * d.w..], hw, cin: conv.in_ch, phases };
                // SAFETY: `expanded` holds `c × body` floats, this worker's own.
                unsafe { sgemm::gemm_raw(1, a, &b, s.expanded.as_mut_ptr(), body, &conv.bias, None, conv.act.fused()) };
                for (ch, plane) in s.depthwise.chunks_mut(band_out).enumerate() {
                    phases.zero_padding(&mut s.expanded[ch * body..]);
                    self.dw.plane_from_phases(ch, &s.expanded[ch * body..], g, as_uninit(plane));
                }
            }
            None => {
                let src = &x[r0 * d.w..];
                for (ch, plane) in s.depthwise.chunks_mut(band_out).enumerate() {
                    self.dw.plane_into(ch, &src[ch * hw..][..band_in], g, &mut s.plane, as_uninit(plane));
                }
            }
        }

        let (a, conv) = self.project;
        let ohw = d.oh * d.ow;
        let b = Dense::new(&s.depthwise, c, band_out, band_out);
        let residual = self.skip.then(|| &x[o0 * d.ow..]);
        // SAFETY: `out` holds `out_ch × oh·ow` floats; this band writes only
        // columns `o0·ow .. o0·ow + band_out` of each row, which no other
        // band writes.
        unsafe { sgemm::gemm_raw(1, a, &b, out.add(o0 * d.ow).0, ohw, &conv.bias, residual, conv.act.fused()) };
    }
}

/// The expansion's right-hand side for one band: the input rows under it
/// (`[cin, rows·w]` at channel stride `hw`), arranged as the depthwise
/// kernel's phases with zeros in the padding.
struct PhasedInput<'a> {
    x: &'a [f32],
    hw: usize,
    cin: usize,
    phases: Phases,
}

impl Rhs for PhasedInput<'_> {
    fn rows(&self) -> usize {
        self.cin
    }

    fn cols(&self) -> usize {
        self.phases.body()
    }

    fn row<'a>(&'a self, r: usize, cols: Range<usize>, buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..cols.len()];
        // SAFETY: a fused block exists only with packed GEMMs, so the CPU
        // has AVX-512F.
        unsafe { self.phases.write(&self.x[r * self.hw..], cols, buf) };
        buf
    }
}

/// An initialized buffer seen as one a kernel may overwrite.
fn as_uninit(s: &mut [f32]) -> &mut Uninit {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and whatever is
    // written through it is an initialized f32.
    unsafe { &mut *(s as *mut [f32] as *mut Uninit) }
}

impl CustomOp1 for InvertedResidual<'_> {
    fn name(&self) -> &'static str {
        "lineside-inverted-residual"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let inp = contiguous_f32(storage, layout)?;
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.in_channels() {
            candle_core::bail!("the block expects {} input channels, got {c}", self.in_channels());
        }
        let (k, st) = (self.dw.kernel, self.dw.stride);
        let pad = self.dw.pad.resolve(h, w, k, st);
        let (oh, ow) = (out_size(h, k, st, pad.top, pad.bottom), out_size(w, k, st, pad.left, pad.right));
        let out_ch = self.project.1.out_ch;
        if self.skip && (out_ch, oh, ow) != (c, h, w) {
            candle_core::bail!("the skip needs the block's output ({out_ch}×{oh}×{ow}) to match its input");
        }
        // As many output rows as keep the band's expanded rows near BAND_BYTES.
        let row_bytes = self.expanded() * w * size_of::<f32>();
        let in_rows = (BAND_BYTES / row_bytes.max(1)).max(k);
        let mut band = ((in_rows - k) / st + 1).min(oh);
        if n == 1 {
            // Bands are the only parallelism within one image: one per
            // thread at least, where the map has the rows.
            band = band.min(oh.div_ceil(rayon::current_num_threads()));
        }
        let d = Dims { h, w, oh, ow, pad, band };
        let mut out = uninit_output(n * out_ch * oh * ow);
        let (bands, dst) = (oh.div_ceil(band), Out(out.as_mut_ptr().cast()));
        (0..n * bands).into_par_iter().for_each_init(Scratch::default, |s, i| {
            let (img, b) = (i / bands, i % bands);
            let x = &inp[img * c * h * w..][..c * h * w];
            // SAFETY: image `img`'s output lies inside `out`.
            let dst = unsafe { dst.add(img * out_ch * oh * ow) };
            self.band(x, d, b * band, s, dst);
        });
        // SAFETY: the bands cover every output row, and each writes all
        // columns of its rows for every channel.
        Ok((CpuStorage::F32(unsafe { finish(out) }), Shape::from((n, out_ch, oh, ow))))
    }
}
