//! Max pooling with PyTorch's padding semantics (padded positions never win),
//! NCHW, f32, on CPU; candle's own pooling elsewhere.
//!
//! candle's `max_pool2d` needs the padding as a copy of the input first and
//! then visits every window tap by tap; here each output row takes the
//! column-wise maximum of its input rows (one contiguous pass that
//! vectorizes), then the maximum of each window across that row.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, finish, out_size, uninit_output, zeroed};
use crate::{Kernels, Result};

/// `MaxPool2d(kernel, stride, padding)` as in PyTorch.
#[derive(Debug, Clone, Copy)]
pub struct MaxPool {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool {
    /// Pools `x` (`[N, C, H, W]`): this kernel on CPU with
    /// [`Kernels::Lineside`], candle's elsewhere.
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if kernels == Kernels::Lineside && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            return Ok(x.apply_op1_no_bwd(self)?);
        }
        // Elsewhere: candle's pooling over a -inf-padded copy.
        let (n, c, h, w) = x.dims4()?;
        let p = self.padding;
        let padded = Tensor::full(f32::NEG_INFINITY, (n, c, h + 2 * p, w + 2 * p), x.device())?.to_dtype(x.dtype())?;
        let padded = padded.slice_assign(&[0..n, 0..c, p..p + h, p..p + w], x)?;
        Ok(padded.max_pool2d_with_stride(self.kernel, self.stride)?)
    }

    /// One output plane from one input plane.
    fn plane(&self, x: &[f32], h: usize, w: usize, ow: usize, colmax: &mut Vec<f32>, out: &mut [f32]) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        for (oy, row) in out.chunks_mut(ow).enumerate() {
            // Input rows of this window, clipped to the image.
            let y0 = (oy * s).saturating_sub(p);
            let y1 = (oy * s + k).saturating_sub(p).min(h);
            colmax.clear();
            colmax.extend_from_slice(&x[y0 * w..(y0 + 1) * w]);
            for y in y0 + 1..y1 {
                for (m, v) in colmax.iter_mut().zip(&x[y * w..(y + 1) * w]) {
                    *m = m.max(*v);
                }
            }
            for (ox, o) in row.iter_mut().enumerate() {
                let x0 = (ox * s).saturating_sub(p);
                let x1 = (ox * s + k).saturating_sub(p).min(w);
                *o = colmax[x0..x1].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            }
        }
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "lineside-max-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let inp = contiguous_f32(storage, layout)?;
        let (n, c, h, w) = layout.shape().dims4()?;
        if self.padding * 2 >= self.kernel || h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            candle_core::bail!(
                "max pool {}x{} with padding {} on a {h}x{w} map",
                self.kernel,
                self.kernel,
                self.padding
            );
        }
        let (p, k, s) = (self.padding, self.kernel, self.stride);
        let (oh, ow) = (out_size(h, k, s, p, p), out_size(w, k, s, p, p));
        let mut out = uninit_output(n * c * oh * ow);
        out.par_chunks_mut(oh * ow).enumerate().for_each_init(Vec::new, |colmax, (plane, o)| {
            self.plane(&inp[plane * h * w..(plane + 1) * h * w], h, w, ow, colmax, zeroed(o));
        });
        // SAFETY: every plane's every output was written.
        Ok((CpuStorage::F32(unsafe { finish(out) }), Shape::from((n, c, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Matches candle's pooling over an explicitly -inf-padded input (the
    /// path off the CPU), negative values included (zero padding would be
    /// wrong there).
    #[test]
    fn matches_candle_with_negative_inputs() {
        for &(h, w) in &[(112, 112), (7, 9), (3, 3), (10, 5)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
            let pool = MaxPool { kernel: 3, stride: 2, padding: 1 };
            let got = pool.forward(&x, Kernels::Lineside).unwrap();
            let want = pool.forward(&x, Kernels::Candle).unwrap();
            assert_eq!(got.dims(), want.dims(), "{h}x{w}");
            assert_eq!(got.dims(), &[2, 3, h.div_ceil(2), w.div_ceil(2)], "{h}x{w}");
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(err, 0.0, "{h}x{w}");
        }
    }
}
