//! The threads that decode, run preprocess plugins on and resize images.
//!
//! On a machine with few cores, decoding competes with inference for the
//! same cores. Run on tokio's blocking pool, every request in flight had its
//! own decoding thread (16 at a time under 16 connections), and the OS split
//! the cores between them and the model's threads: the GEMM's working set
//! was evicted and its threads waited on each other. Here a fixed number of
//! threads decode, at a lower scheduling priority (nice 10 by default), so
//! inference runs whenever a batch is ready and decoding fills the gaps. On
//! 2 cores with 1920×1080 JPEGs this raised end-to-end throughput by about
//! 15% (docs/performance.md). The queue in front of the threads is bounded:
//! a request that finds it full gets 429, like a full batch queue.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::error::ApiError;

/// How the pool is sized and scheduled (`[server]` preprocess_* keys).
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Niceness of the workers (Linux: per thread; 0 keeps the process's).
    pub nice: i32,
    /// Requests waiting for or in preprocessing before new ones get 429.
    pub queue: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self { threads: 0, nice: 10, queue: 256 }
    }
}

/// A bounded pool of preprocessing threads.
pub struct PreprocessPool {
    pool: rayon::ThreadPool,
    pending: Arc<AtomicUsize>,
    capacity: usize,
}

static POOL: OnceLock<PreprocessPool> = OnceLock::new();

/// Builds the process's pool. Call before serving; without it the first
/// request builds one with the defaults. The first configuration in a
/// process stays (tests start several servers in one process).
pub fn configure(cfg: PoolConfig) -> anyhow::Result<()> {
    if POOL.get().is_none() {
        let _ = POOL.set(PreprocessPool::new(cfg)?);
    }
    Ok(())
}

fn pool() -> &'static PreprocessPool {
    POOL.get_or_init(|| PreprocessPool::new(PoolConfig::default()).expect("preprocessing threads start"))
}

impl PreprocessPool {
    fn new(cfg: PoolConfig) -> anyhow::Result<Self> {
        let threads = match cfg.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let nice = cfg.nice;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("preprocess-{i}"))
            .start_handler(move |_| lower_priority(nice))
            .build()?;
        Ok(Self { pool, pending: Arc::default(), capacity: cfg.queue.max(1) })
    }
}

/// Runs `f` on the process's preprocessing threads (see [`PreprocessPool::run`]).
pub async fn run<T: Send + 'static>(
    model: &str,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    pool().run(model, f).await
}

impl PreprocessPool {
    /// Runs `f` on the pool; `model` names the model in a 429 when the queue
    /// is full. A panic in `f` becomes a 500 for this request only.
    pub async fn run<T: Send + 'static>(
        &self,
        model: &str,
        f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::Overloaded {
                model: model.into(),
                reason: format!("{} images are already waiting for preprocessing", self.capacity),
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pending = self.pending.clone();
        self.pool.spawn(move || {
            // A caller that has gone (client disconnected) needs no decoding.
            if !tx.is_closed() {
                let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(f)));
            }
            // Counted down here, not by the caller, which may be dropped while waiting.
            pending.fetch_sub(1, Ordering::AcqRel);
        });
        match rx.await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ApiError::Internal("preprocessing panicked".into())),
            Err(_) => Err(ApiError::Internal("preprocessing thread stopped".into())),
        }
    }
}

/// Raises this thread's niceness (Linux schedules threads separately).
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice != 0 {
        // SAFETY: setpriority on this thread's own id; a failure leaves the priority as it was.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
        if r != 0 {
            tracing::warn!(nice, error = %std::io::Error::last_os_error(), "could not lower preprocessing priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_pool(queue: usize) -> PreprocessPool {
        PreprocessPool::new(PoolConfig { threads: 1, nice: 0, queue }).unwrap()
    }

    #[tokio::test]
    async fn a_full_queue_answers_429_and_frees_up() {
        let pool = small_pool(1);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let busy = pool.run("m", move || Ok(wait.recv().is_ok()));
        let meanwhile = async {
            // The first job holds the only place once it is counted.
            while pool.pending.load(Ordering::Acquire) == 0 {
                tokio::task::yield_now().await;
            }
            let refused = pool.run("m", || Ok(())).await;
            assert!(matches!(refused, Err(ApiError::Overloaded { .. })), "{refused:?}");
            release.send(()).unwrap();
        };
        let (busy, ()) = tokio::join!(busy, meanwhile);
        assert!(busy.unwrap());
        while pool.pending.load(Ordering::Acquire) != 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.run("m", || Ok(7)).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_panic_fails_only_its_request() {
        let pool = small_pool(4);
        let r: Result<(), _> = pool.run("m", || panic!("bad image")).await;
        assert!(matches!(r, Err(ApiError::Internal(_))), "{r:?}");
        assert_eq!(pool.run("m", || Ok("still serving")).await.unwrap(), "still serving");
        let e = pool.run("m", || Err::<(), _>(ApiError::InvalidImage("no".into()))).await;
        assert!(matches!(e, Err(ApiError::InvalidImage(_))), "{e:?}");
    }
}
