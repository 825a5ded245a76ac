//! The threads that decode, run preprocess plugins on and resize images.
//!
//! On a machine with few cores, decoding competes with inference for the
//! same cores. Run on tokio's blocking pool, every request in flight had its
//! own decoding thread (16 at a time under 16 connections), and the OS split
//! the cores between them and the model's threads: the GEMM's working set
//! was evicted and its threads waited on each other. Here a fixed number of
//! threads decode, at a lower scheduling priority (nice 10 by default), so
//! inference runs whenever a batch is ready and decoding fills the gaps. On
//! 2 cores with 1920×1080 JPEGs this raised end-to-end throughput by about a
//! third (docs/performance.md).
//!
//! The pool has no queue limit of its own: every job belongs to a request
//! that the model's admission (`queue_capacity + max_batch_size` in flight)
//! has already let in, so a second limit here could only refuse work that
//! was promised. A job whose deadline has passed, or whose caller has gone,
//! is skipped rather than decoded. A preprocess plugin holds its thread for
//! as long as it runs (at most its `timeout_ms`).

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;
use std::time::Instant;

use crate::error::ApiError;

/// How the pool is sized and scheduled (`[server]` preprocess_* keys).
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Niceness of the workers, 0–19 (Linux: per thread; 0 keeps the process's).
    pub nice: i32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self { threads: 0, nice: 10 }
    }
}

/// The pool of preprocessing threads.
pub struct PreprocessPool {
    pool: rayon::ThreadPool,
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

/// Runs `f` on the process's preprocessing threads (see [`PreprocessPool::run`]).
pub async fn run<T: Send + 'static>(
    deadline: Instant,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    pool().run(deadline, f).await
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
        Ok(Self { pool })
    }

    /// Runs `f` on the pool, unless `deadline` has passed by the time a
    /// thread is free (504). A panic in `f` becomes a 500 for this request only.
    pub async fn run<T: Send + 'static>(
        &self,
        deadline: Instant,
        f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pool.spawn(move || {
            // A caller that has gone (client disconnected) needs no decoding.
            if tx.is_closed() {
                return;
            }
            let out = if Instant::now() >= deadline {
                Ok(Err(ApiError::DeadlineExceeded("the deadline passed while waiting for preprocessing".into())))
            } else {
                std::panic::catch_unwind(AssertUnwindSafe(f))
            };
            let _ = tx.send(out);
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
    use std::time::Duration;

    use super::*;

    fn small_pool() -> PreprocessPool {
        PreprocessPool::new(PoolConfig { threads: 1, nice: 0 }).unwrap()
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn a_panic_fails_only_its_request() {
        let pool = small_pool();
        let r: Result<(), _> = pool.run(later(), || panic!("bad image")).await;
        assert!(matches!(r, Err(ApiError::Internal(_))), "{r:?}");
        assert_eq!(pool.run(later(), || Ok("still serving")).await.unwrap(), "still serving");
        let e = pool.run(later(), || Err::<(), _>(ApiError::InvalidImage("no".into()))).await;
        assert!(matches!(e, Err(ApiError::InvalidImage(_))), "{e:?}");
    }

    #[tokio::test]
    async fn work_past_its_deadline_is_skipped() {
        let pool = small_pool();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = pool.run(later(), move || Ok(wait.recv().is_ok()));
        let flag = ran.clone();
        let late = pool.run(Instant::now() + Duration::from_millis(20), move || {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        });
        let unblock = async {
            // The only thread is busy until the second job's deadline has passed.
            tokio::time::sleep(Duration::from_millis(50)).await;
            release.send(()).unwrap();
        };
        let (busy, late, ()) = tokio::join!(busy, late, unblock);
        assert!(busy.unwrap());
        assert!(matches!(late, Err(ApiError::DeadlineExceeded(_))), "{late:?}");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "expired work was not run");
    }
}
