//! The fully connected layer from globally pooled features to logits, cut
//! by output columns so that its threads share the weights' reads.
//!
//! ImageNet heads are 512 or 1280 features by 1000 classes: 2 to 5 MB of
//! weights read once per call, and at batch 1 little arithmetic on each. A
//! single matrix product ran on the calling thread alone and waited on
//! cache and memory: on mobilenetv2 at batch 1 on two threads it was 3% of
//! the samples (about 6% of the pass's time), with the other thread idle.
//! Here each cut (a contiguous `[features, cols]` block of the weights)
//! is its own product, and the cuts run in parallel. Each logit is still
//! the dot product of the same features and weight column; only the
//! order in which the matrix product sums may differ from one whole
//! product's (the test allows 1e-4).

use candle_core::Tensor;
use rayon::prelude::*;

use crate::Result;

/// Fewest output columns per cut: fewer would spend more on the fork than
/// the cut reads.
const MIN_CUT_COLS: usize = 128;

/// Most cuts, whatever the CPU count.
const MAX_CUTS: usize = 8;

/// `logits = pooled · W + b`, with `W` stored as `[features, classes]` in
/// column cuts (module docs).
#[derive(Debug, Clone)]
pub struct LinearHead {
    /// `([features, cols], [cols])` per cut, in column order.
    cuts: Vec<(Tensor, Tensor)>,
    classes: usize,
}

impl LinearHead {
    /// The head from PyTorch's `weight` `[classes, features]` and `bias`
    /// `[classes]`, cut for this machine's CPUs (one cut where the weights
    /// are not on the CPU: a GPU runs one product best).
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let (classes, _) = weight.dims2()?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cuts = if weight.device().is_cpu() { cpus.min(MAX_CUTS).min(classes / MIN_CUT_COLS).max(1) } else { 1 };
        let cuts = (0..cuts)
            .map(|i| {
                let (start, end) = (i * classes / cuts, (i + 1) * classes / cuts);
                Ok((weight.narrow(0, start, end - start)?.t()?.contiguous()?, bias.narrow(0, start, end - start)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cuts, classes })
    }

    /// Logits `[N, classes]` for pooled features `[N, features]`.
    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        let one = |(w, b): &(Tensor, Tensor)| -> Result<Tensor> { Ok(pooled.matmul(w)?.broadcast_add(b)?) };
        if let [only] = self.cuts.as_slice() {
            return one(only);
        }
        let parts = self.cuts.par_iter().map(one).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Number of column cuts (module docs).
    pub fn cuts(&self) -> usize {
        self.cuts.len()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// The cut head gives the whole product's logits, on batches of one and
    /// several, with the classes not a multiple of the cut count.
    #[test]
    fn cuts_give_the_whole_products_logits() {
        let dev = Device::Cpu;
        let (features, classes) = (96, 1001);
        let w = Tensor::randn(0f32, 1.0, (classes, features), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, classes, &dev).unwrap();
        let head = LinearHead::new(&w, &b).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for n in [1, 5] {
            let x = Tensor::randn(0f32, 1.0, (n, features), &dev).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            let got = pool.install(|| head.forward(&x)).unwrap();
            assert_eq!(got.dims(), &[n, classes]);
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F32).unwrap();
            let err = err.to_scalar::<f32>().unwrap();
            assert!(err < 1e-4, "batch {n}: max err {err}");
        }
        // One cut per CPU up to the cap, where the classes allow.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(head.cuts(), cpus.clamp(1, MAX_CUTS).min(classes / MIN_CUT_COLS));
        assert_eq!(head.classes(), classes);
    }
}
