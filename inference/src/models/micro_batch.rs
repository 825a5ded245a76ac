//! How a CPU batch is spread over the cores and the caches.
//!
//! Across threads: a batch of at least two images is cut into shares, one
//! per thread (fewer where a share would hold under [`MIN_SHARE`] images, see
//! [`shares`]), and each share runs the whole network on its own. The
//! kernels' parallel loops still fork, but with every thread busy on its
//! own share their tasks mostly run where they were forked, and no thread
//! waits for the others at the end of every layer; a thread that finishes
//! first steals from the rest. Measured here (2 threads, batch 8,
//! alternating runs, median of 3, img/s): resnet18 42.9 → 47.8,
//! tf_efficientnet_lite0 89.3 → 98.4, mobilenetv2 122.2 → 126.7. Not
//! measured on more than two cores.
//!
//! In time: a share larger than the network's
//! [`ImageModel::cpu_micro_batch`] runs as consecutive micro-batches. On CPU
//! a batch's layer outputs are its working set: at batch 32 a single
//! mobilenetv2 activation is 154 MiB, past the caches and past glibc's
//! largest heap block (so every layer page-faults its output in again).
//! Running eight images at a time per share ([`CPU_MICRO_BATCH`]) keeps each
//! step's working set small; measured on mobilenetv2 (2 cores), batch 32
//! then runs as fast per image as batch 8 instead of 25% slower. Networks
//! on the channels-last kernels run one image per step: they have no
//! whole-batch GEMM to feed, and one image's largest map (mobilenetv2's
//! 4.8 MB expansion) is what stays nearest the core. mobilenetv2, 2 cores,
//! alternating runs, img/s at batch 8 / 32, steps of 8 → 1: 121 / 135 →
//! 161 / 158 and 130 / 108 → 120 / 167, peak RSS 187 → 99 MiB; resnet18 and
//! tf_efficientnet_lite0 level within the noise, at lower RSS.
//!
//! The results are the same either way: every layer treats images
//! independently.

use std::cell::Cell;

use candle_core::Tensor;
use rayon::prelude::*;

use super::{FeatureInfo, ImageModel};
use crate::Result;

/// Images per step on CPU.
pub const CPU_MICRO_BATCH: usize = 8;

/// Images per step for networks on the channels-last kernels (module docs).
pub const CHANNELS_LAST_MICRO_BATCH: usize = 1;

/// Fewest images per share beyond the first two shares: on many cores a
/// batch of 8 makes two shares of 4 (the rest of the threads help inside
/// their layers), not eight shares of one image, whose small-map layers
/// would lose the whole-batch GEMM.
pub const MIN_SHARE: usize = 4;

/// How many shares a batch of `n` images is cut into on `threads` threads:
/// one where either is 1, else at least two, and more only while every
/// share keeps [`MIN_SHARE`] images.
pub fn shares(n: usize, threads: usize) -> usize {
    if n < 2 || threads < 2 { 1 } else { threads.min((n / MIN_SHARE).max(2)) }
}

thread_local! {
    /// While the thread runs one share of a split batch: the threads that
    /// share may count on.
    static SHARE_THREADS: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The threads the calling thread's layers may count on: the current rayon
/// pool's, or, while it runs one share of a batch split over that pool,
/// the share's part of them (1 where every thread has a share of its own,
/// the rest busy with theirs).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub fn threads_here() -> usize {
    SHARE_THREADS.get().unwrap_or_else(rayon::current_num_threads)
}

/// Restores the thread's share setting when a share ends, even by a panic.
struct ShareThreads(Option<usize>);

impl ShareThreads {
    fn set(threads: usize) -> Self {
        Self(SHARE_THREADS.replace(Some(threads.max(1))))
    }
}

impl Drop for ShareThreads {
    fn drop(&mut self) {
        SHARE_THREADS.set(self.0);
    }
}

/// A network whose batches are shared out over the current rayon pool's
/// threads, each share in steps of at most `size` images.
pub struct MicroBatched {
    inner: Box<dyn ImageModel>,
    size: usize,
}

impl MicroBatched {
    /// `inner` with batches shared out and run in steps of at most
    /// [`ImageModel::cpu_micro_batch`] images.
    pub fn new(inner: Box<dyn ImageModel>) -> Self {
        let size = inner.cpu_micro_batch();
        Self::with_size(inner, size)
    }

    /// `inner` with batches shared out and run in steps of at most `size`.
    pub fn with_size(inner: Box<dyn ImageModel>, size: usize) -> Self {
        Self { inner, size: size.max(1) }
    }
}

/// Feature maps and optional logits, as [`ImageModel::forward_maps`] returns them.
type Outputs = (Vec<Tensor>, Option<Tensor>);

impl MicroBatched {
    /// `f` over the batch in consecutive steps of at most `size` images.
    fn steps(&self, x: &Tensor, f: &StepFn<'_>) -> Result<Outputs> {
        let n = x.dim(0)?;
        if n <= self.size {
            return f(x);
        }
        let parts = (0..n)
            .step_by(self.size)
            .map(|start| f(&x.narrow(0, start, self.size.min(n - start))?))
            .collect::<Result<Vec<_>>>()?;
        concat(parts)
    }

    /// `f` over the batch, shared out over the threads, each share in steps,
    /// then `then` over the whole batch's outputs, on a thread of the
    /// current rayon pool ([`on_pool`]).
    fn split(&self, x: &Tensor, f: &StepFn<'_>, then: &ThenFn<'_>) -> Result<Outputs> {
        on_pool(|| self.split_here(x, f, then))
    }

    fn split_here(&self, x: &Tensor, f: &StepFn<'_>, then: &ThenFn<'_>) -> Result<Outputs> {
        let n = x.dim(0)?;
        let threads = rayon::current_num_threads();
        let k = shares(n, threads);
        if k < 2 {
            // The layers fork and join among all the threads: keep them awake.
            return super::keep_warm::with_warm_workers(|| then(self.steps(x, f)?));
        }
        let bounds: Vec<(usize, usize)> = (0..k).map(|t| (t * n / k, (t + 1) * n / k - t * n / k)).collect();
        let parts = bounds
            .into_par_iter()
            .map(|(start, len)| {
                let _share = ShareThreads::set(threads / k);
                self.steps(&x.narrow(0, start, len)?, f)
            })
            .collect::<Result<Vec<_>>>()?;
        then(concat(parts)?)
    }
}

/// What runs on each step of a batch.
type StepFn<'a> = dyn Fn(&Tensor) -> Result<Outputs> + Sync + 'a;

/// What runs on the whole batch's outputs, after its steps.
type ThenFn<'a> = dyn Fn(Outputs) -> Result<Outputs> + Sync + 'a;

/// Runs `f` on a thread of the current rayon pool (in place where it is on one).
///
/// `lineside bench` calls the network from its main thread, not a pool's
/// (the batcher runs inside its model's pool). Called from such a thread,
/// every parallel loop of the network was handed to the pool from outside,
/// and the caller slept on a latch until it was done: a wake-up on each
/// side of every layer. From inside the pool a loop forks and joins among
/// its threads, and only the whole forward pass crosses over.
/// mobilenetv2 at batch 1 gained 12% (docs/performance.md, "One crossing
/// per forward pass").
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // `scope` runs its body in place on a pool thread, and from anywhere
    // else injects it into the pool and waits. A pool thread that waits in
    // a join may pick the pass up while it runs a share of another batch:
    // the pass starts with no share setting of its own, and gets that
    // setting back when it ends.
    rayon::scope(|_| {
        let _outer = ShareThreads(SHARE_THREADS.replace(None));
        f()
    })
}

/// Joins per-part outputs along the batch dimension.
fn concat(parts: Vec<Outputs>) -> Result<Outputs> {
    let mut maps: Vec<Vec<Tensor>> = Vec::new();
    let mut heads = Vec::new();
    for (m, l) in parts {
        maps.resize_with(m.len(), Vec::new);
        for (all, map) in maps.iter_mut().zip(m) {
            all.push(map);
        }
        heads.extend(l);
    }
    let maps = maps.iter().map(|parts| Tensor::cat(parts, 0)).collect::<candle_core::Result<Vec<_>>>()?;
    let logits = if heads.is_empty() { None } else { Some(Tensor::cat(&heads, 0)?) };
    Ok((maps, logits))
}

impl ImageModel for MicroBatched {
    fn forward_maps(&self, x: &Tensor, last: Option<usize>, logits: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        self.split(x, &|x| self.inner.forward_maps(x, last, logits), &Ok)
    }

    /// The inner network's own logits-only path (which may skip work the
    /// feature maps would need). Where its head is a linear layer over
    /// pooled features ([`super::PooledHead`]), every step stops at the pool and
    /// the head runs once over the whole batch: its weights (2–5 MB for
    /// 1000 classes) are read once per batch, not once per image.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, logits) = match self.inner.pooled_head() {
            Some(net) => self.split(x, &|x| Ok((Vec::new(), Some(net.forward_pooled(x)?))), &|(maps, pooled)| {
                Ok((maps, pooled.map(|p| net.head().forward(&p)).transpose()?))
            })?,
            None => self.split(x, &|x| Ok((Vec::new(), Some(self.inner.forward(x)?))), &Ok)?,
        };
        Ok(logits.expect("every part has logits"))
    }

    fn cpu_micro_batch(&self) -> usize {
        self.size
    }

    fn feature_info(&self) -> &[FeatureInfo] {
        self.inner.feature_info()
    }

    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::models::{LoadedModel, ModelFiles};

    #[test]
    fn the_forward_pass_runs_on_a_pool_thread() {
        assert_eq!(rayon::current_thread_index(), None, "the test thread is not the pool's");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/test_resnet.random6");
        if !dir.exists() {
            eprintln!("no ../shared/models: skipped");
            return;
        }
        let files = ModelFiles::from_dir(&dir).unwrap();
        let net = MicroBatched::with_size(LoadedModel::load(&files, &Device::Cpu).unwrap().network, 1);
        let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let on_a_pool_thread = |_: &Tensor| {
            assert!(rayon::current_thread_index().is_some(), "the pass ran outside the pool");
            assert_eq!(SHARE_THREADS.get(), None, "the pass inherited a share setting");
            Ok((Vec::new(), None))
        };
        net.split(&x, &on_a_pool_thread, &Ok).unwrap();
        // Already on a pool thread: in place, on the same thread, and the
        // thread's share setting is back afterwards.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            let _share = ShareThreads::set(1);
            let here = std::thread::current().id();
            assert_eq!(on_pool(|| std::thread::current().id()), here);
            net.split(&x, &on_a_pool_thread, &Ok).unwrap();
            assert_eq!(SHARE_THREADS.get(), Some(1));
        });
    }

    #[test]
    fn shares_keep_enough_images_each() {
        assert_eq!(shares(1, 16), 1);
        assert_eq!(shares(8, 1), 1);
        assert_eq!(shares(2, 2), 2);
        assert_eq!(shares(7, 3), 2);
        assert_eq!(shares(8, 2), 2);
        assert_eq!(shares(8, 16), 2);
        assert_eq!(shares(32, 2), 2);
        assert_eq!(shares(64, 16), 16);
        assert_eq!(shares(40, 16), 10);
    }

    /// Split batches (two shares on three threads, each in steps of two images)
    /// give the same logits and feature maps as the whole batch on one thread.
    #[test]
    fn split_batches_match_the_whole_batch() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/test_resnet.random6");
        if !dir.exists() {
            eprintln!("no ../shared/models: skipped");
            return;
        }
        let files = ModelFiles::from_dir(&dir).unwrap();
        let net = LoadedModel::load(&files, &Device::Cpu).unwrap().network;
        let split = MicroBatched::with_size(LoadedModel::load(&files, &Device::Cpu).unwrap().network, 2);
        let x = Tensor::randn(0f32, 1.0, (7, 3, 64, 64), &Device::Cpu).unwrap();
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        let (m1, l1) = pool(1).install(|| net.forward_all(&x, true)).unwrap();
        let (m2, l2) = pool(3).install(|| split.forward_all(&x, true)).unwrap();
        assert_eq!(m1.len(), m2.len());
        for (a, b) in m1.iter().chain(l1.as_ref()).zip(m2.iter().chain(l2.as_ref())) {
            assert_eq!(a.dims(), b.dims());
            let err = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-5, "max err {err}");
        }
    }

    /// Batch 8 in steps of 1, 2, 4 and 8 images: img/s of the median of
    /// alternating rounds, per model folder under `../shared/models` or
    /// `/tmp/models` (resnet18, which `bench/peers.py`'s `materialize`
    /// writes there): `cargo test --release -p lineside-inference --lib
    /// micro_batch::tests::step_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn step_speed() {
        for name in ["mobilenetv2_100.imagenet", "tf_efficientnet_lite0.imagenet", "resnet18"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models").join(name);
            let dir = if dir.exists() { dir } else { std::path::PathBuf::from("/tmp/models").join(name) };
            if !dir.exists() {
                eprintln!("no {name}: skipped");
                continue;
            }
            let files = ModelFiles::from_dir(&dir).unwrap();
            let sizes = [1, 2, 4, 8];
            let nets: Vec<_> = sizes
                .iter()
                .map(|&s| MicroBatched::with_size(LoadedModel::load(&files, &Device::Cpu).unwrap().network, s))
                .collect();
            let x = Tensor::randn(0f32, 1.0, (8, 3, 224, 224), &Device::Cpu).unwrap();
            let mut rounds = vec![Vec::new(); sizes.len()];
            for _ in 0..9 {
                for (net, r) in nets.iter().zip(&mut rounds) {
                    let t = std::time::Instant::now();
                    for _ in 0..3 {
                        net.forward(&x).unwrap();
                    }
                    r.push(24.0 / t.elapsed().as_secs_f64());
                }
            }
            for (s, mut r) in sizes.iter().zip(rounds) {
                r.sort_by(f64::total_cmp);
                println!(
                    "{name}: steps of {s}: {:.1} img/s (rounds {:.1}-{:.1})",
                    r[r.len() / 2],
                    r[0],
                    r[r.len() - 1]
                );
            }
        }
    }
}
