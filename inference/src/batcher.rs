//! The dynamic batcher: one per loaded model, on its own OS thread.
//!
//! Requests arrive already decoded and preprocessed (that work runs on other
//! threads, in parallel with inference). The batcher thread collects them into
//! a batch of at most `max_batch_size`, drops requests whose client has gone
//! or whose deadline has passed, runs the model once for the whole batch and
//! answers each request through its own oneshot channel.
//!
//! A partial batch waits only for requests that are on their way: callers
//! announce each request before decoding it ([`Batcher::incoming`]), and the
//! batcher waits for those, at most `max_queue_delay` after the oldest
//! request was queued. With none on the way it runs at once, so a lone
//! request is not held for company that cannot come.
//!
//! The queue is a bounded channel: [`Batcher::submit`] fails at once with
//! [`SubmitError::Overloaded`] when it is full, so overload turns into fast
//! 429s instead of growing latency.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use tokio::sync::oneshot;

/// A model the batcher can drive.
pub trait BatchModel: Send + 'static {
    /// What one image yields.
    type Output: Send + 'static;

    /// `(channels, height, width)` of one input.
    fn input_shape(&self) -> (usize, usize, usize);

    /// The device inputs are placed on.
    fn device(&self) -> &Device;

    /// Runs one `[N, C, H, W]` batch; returns exactly N outputs.
    fn infer(&self, batch: &Tensor) -> crate::Result<Vec<Self::Output>>;
}

/// Batching and queueing settings of one model.
#[derive(Debug, Clone)]
pub struct BatcherConfig {
    pub max_batch_size: usize,
    /// The longest a partial batch waits, after its oldest request was
    /// queued, for requests announced as [`Incoming`].
    pub max_queue_delay: Duration,
    pub queue_capacity: usize,
    /// Threads of this model's own pool; `None`: as many as the global
    /// pool's (the cores, or `RAYON_NUM_THREADS`).
    pub threads: Option<usize>,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self { max_batch_size: 8, max_queue_delay: Duration::from_millis(5), queue_capacity: 64, threads: None }
    }
}

/// Lifecycle of a batcher's model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelStatus {
    /// Loading weights or running the warm-up batch.
    Loading,
    /// Warmed up and serving.
    Ready,
    /// Loading or warm-up failed; the message says why.
    Failed(String),
    /// The batcher thread has exited.
    Stopped,
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("queue is full ({capacity} requests waiting)")]
    Overloaded { capacity: usize },
    #[error("model is not ready: {0:?}")]
    NotReady(ModelStatus),
    #[error("input has {found} values, the model takes {expected}")]
    BadInput { found: usize, expected: usize },
}

/// Why a queued request got no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("deadline passed after {waited_ms} ms in the queue")]
    DeadlineExceeded { waited_ms: u64 },
    #[error("inference failed: {0}")]
    Inference(String),
}

/// A result with the time it spent in the batcher.
#[derive(Debug)]
pub struct Served<O> {
    pub output: O,
    pub queue: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

/// The channel a submitted request's answer arrives on.
pub type Reply<O> = oneshot::Receiver<Result<Served<O>, JobError>>;

struct Job<O> {
    input: Vec<f32>,
    enqueued_at: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Served<O>, JobError>>,
}

struct Shared {
    name: String,
    status: RwLock<ModelStatus>,
    depth: AtomicUsize,
    capacity: usize,
    input_len: AtomicUsize,
    /// Requests announced ([`Batcher::incoming`]) and not yet queued.
    incoming: AtomicUsize,
}

impl Shared {
    fn set_status(&self, s: ModelStatus) {
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = s;
    }
    fn set_depth(&self, d: usize) {
        self.depth.store(d, Ordering::Relaxed);
        metrics::gauge!("lineside_queue_depth", "model" => self.name.clone()).set(d as f64);
    }
}

/// Handle to one model's batcher thread. Cheap to clone.
pub struct Batcher<O> {
    tx: Sender<Job<O>>,
    shared: Arc<Shared>,
}

impl<O> Clone for Batcher<O> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), shared: self.shared.clone() }
    }
}

impl<O: Send + 'static> Batcher<O> {
    /// Starts the batcher thread. `load` runs on that thread, followed by one
    /// warm-up batch of `max_batch_size`; until both finish the status is
    /// [`ModelStatus::Loading`] and submissions are refused.
    pub fn spawn<M, F>(name: &str, cfg: BatcherConfig, load: F) -> std::io::Result<Self>
    where
        M: BatchModel<Output = O>,
        F: FnOnce() -> crate::Result<M> + Send + 'static,
    {
        let cfg = BatcherConfig {
            max_batch_size: cfg.max_batch_size.max(1),
            queue_capacity: cfg.queue_capacity.max(1),
            ..cfg
        };
        let (tx, rx) = bounded(cfg.queue_capacity);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            status: RwLock::new(ModelStatus::Loading),
            depth: AtomicUsize::new(0),
            capacity: cfg.queue_capacity,
            input_len: AtomicUsize::new(0),
            incoming: AtomicUsize::new(0),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new().name(format!("batcher-{name}")).spawn(move || run(thread_shared, cfg, rx, load))?;
        Ok(Self { tx, shared })
    }

    /// Queues one preprocessed CHW input. Fails at once when the queue is
    /// full or the model is not ready; never blocks.
    pub fn submit(&self, input: Vec<f32>, deadline: Instant) -> Result<Reply<O>, SubmitError> {
        let status = self.status();
        if status != ModelStatus::Ready {
            return Err(SubmitError::NotReady(status));
        }
        let expected = self.shared.input_len.load(Ordering::Relaxed);
        if input.len() != expected {
            return Err(SubmitError::BadInput { found: input.len(), expected });
        }
        let (reply, rx) = oneshot::channel();
        let job = Job { input, enqueued_at: Instant::now(), deadline, reply };
        match self.tx.try_send(job) {
            Ok(()) => {
                metrics::counter!("lineside_queued_total", "model" => self.shared.name.clone()).increment(1);
                self.shared.set_depth(self.tx.len());
                Ok(rx)
            }
            Err(TrySendError::Full(_)) => Err(SubmitError::Overloaded { capacity: self.shared.capacity }),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::NotReady(ModelStatus::Stopped)),
        }
    }

    /// Announces a request that will be submitted once it is decoded and
    /// preprocessed: until it is submitted through the returned handle, or
    /// the handle dropped, a partial batch may wait for it.
    #[must_use = "dropping the handle withdraws the announcement"]
    pub fn incoming(&self) -> Incoming<O> {
        self.shared.incoming.fetch_add(1, Ordering::AcqRel);
        Incoming { batcher: self.clone() }
    }

    /// The model's current lifecycle state.
    pub fn status(&self) -> ModelStatus {
        self.shared.status.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Requests waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }
}

/// A request on its way to a [`Batcher`], from [`Batcher::incoming`].
/// Dropping it (a request that failed before the model) withdraws it.
#[must_use = "dropping the handle withdraws the announcement"]
pub struct Incoming<O> {
    batcher: Batcher<O>,
}

impl<O: Send + 'static> Incoming<O> {
    /// [`Batcher::submit`] for the announced request.
    pub fn submit(self, input: Vec<f32>, deadline: Instant) -> Result<Reply<O>, SubmitError> {
        let batcher = self.batcher.clone();
        // Withdrawn before it is queued, not after: the batcher wakes on the
        // send, and would often still count a lone request it already holds
        // and poll once more (INCOMING_POLL) before running it. This order
        // only risks, in a narrow window, a request missing the batch that
        // is being cut and going to the next one.
        drop(self);
        batcher.submit(input, deadline)
    }
}

impl<O> Drop for Incoming<O> {
    fn drop(&mut self) {
        self.batcher.shared.incoming.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How often a batch waiting for incoming requests looks whether any are
/// still on their way (one that fails to decode never arrives).
const INCOMING_POLL: Duration = Duration::from_millis(1);

fn run<M, F>(shared: Arc<Shared>, cfg: BatcherConfig, rx: Receiver<Job<M::Output>>, load: F)
where
    M: BatchModel,
    F: FnOnce() -> crate::Result<M> + Send,
{
    // The whole loop runs on a worker of the model's own pool, so every
    // rayon call in the model (GEMM, kernels) stays inside this model's
    // threads. On a pool shared by several models, a thread waiting in one
    // model's join could take up another model's whole forward pass and
    // hold the first batch until it ends.
    let threads = cfg.threads.unwrap_or_else(rayon::current_num_threads);
    match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(move || run_loop(shared, cfg, rx, load)),
        Err(e) => shared.set_status(ModelStatus::Failed(format!("thread pool: {e}"))),
    }
}

fn run_loop<M, F>(shared: Arc<Shared>, cfg: BatcherConfig, rx: Receiver<Job<M::Output>>, load: F)
where
    M: BatchModel,
    F: FnOnce() -> crate::Result<M>,
{
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        load().and_then(|m| warm_up(&m, cfg.max_batch_size).map(|()| m))
    }))
    .unwrap_or_else(|p| Err(crate::Error::config("model", format!("panicked while loading: {}", panic_message(&p)))));
    let model = match loaded {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(model = %shared.name, error = %e, "model failed to load");
            shared.set_status(ModelStatus::Failed(e.to_string()));
            return;
        }
    };
    let (c, h, w) = model.input_shape();
    shared.input_len.store(c * h * w, Ordering::Relaxed);
    shared.set_status(ModelStatus::Ready);
    tracing::info!(model = %shared.name, max_batch = cfg.max_batch_size, "model ready");

    while let Some(jobs) = collect(&rx, &cfg, &shared.incoming) {
        shared.set_depth(rx.len());
        let jobs = drop_stale(&shared.name, jobs);
        if !jobs.is_empty() {
            // A panicking batch drops its jobs (their clients get an error) but not the batcher.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(&shared.name, &model, jobs)))
            {
                tracing::error!(model = %shared.name, panic = panic_message(&p), "batch panicked");
            }
        }
    }
    shared.set_status(ModelStatus::Stopped);
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
}

fn warm_up<M: BatchModel>(model: &M, batch: usize) -> crate::Result<()> {
    let (c, h, w) = model.input_shape();
    let x = Tensor::zeros((batch, c, h, w), candle_core::DType::F32, model.device())?;
    let out = model.infer(&x)?;
    if out.len() != batch {
        return Err(crate::Error::config("warm-up", format!("{} outputs for {batch} inputs", out.len())));
    }
    Ok(())
}

/// Blocks for the first request, then gathers what is queued and, while
/// `incoming` requests are on their way, waits for them until the batch is
/// full or `max_queue_delay` has passed since the first one was queued.
/// Returns `None` once every sender is gone.
fn collect<O>(rx: &Receiver<Job<O>>, cfg: &BatcherConfig, incoming: &AtomicUsize) -> Option<Vec<Job<O>>> {
    let first = rx.recv().ok()?;
    let until = first.enqueued_at + cfg.max_queue_delay;
    let mut jobs = vec![first];
    while jobs.len() < cfg.max_batch_size {
        if let Ok(job) = rx.try_recv() {
            jobs.push(job);
            continue;
        }
        let now = Instant::now();
        if now >= until || incoming.load(Ordering::Acquire) == 0 {
            break;
        }
        if let Ok(job) = rx.recv_timeout((until - now).min(INCOMING_POLL)) {
            jobs.push(job);
        }
    }
    Some(jobs)
}

/// Removes requests nobody is waiting for, and answers those past their deadline.
fn drop_stale<O>(model: &str, jobs: Vec<Job<O>>) -> Vec<Job<O>> {
    let now = Instant::now();
    let mut keep = Vec::with_capacity(jobs.len());
    for job in jobs {
        // Deadline first: a caller that stopped waiting at its deadline has also closed its reply.
        if now >= job.deadline {
            metrics::counter!("lineside_dropped_total", "model" => model.to_string(), "reason" => "deadline")
                .increment(1);
            let waited_ms = now.duration_since(job.enqueued_at).as_millis() as u64;
            let _ = job.reply.send(Err(JobError::DeadlineExceeded { waited_ms }));
        } else if job.reply.is_closed() {
            metrics::counter!("lineside_dropped_total", "model" => model.to_string(), "reason" => "client_gone")
                .increment(1);
        } else {
            keep.push(job);
        }
    }
    keep
}

fn serve<M: BatchModel>(name: &str, model: &M, jobs: Vec<Job<M::Output>>) {
    let started = Instant::now();
    let n = jobs.len();
    let (c, h, w) = model.input_shape();
    let mut data = Vec::with_capacity(n * c * h * w);
    for j in &jobs {
        data.extend_from_slice(&j.input);
    }
    let result = Tensor::from_vec(data, (n, c, h, w), model.device())
        .map_err(crate::Error::from)
        .and_then(|x| model.infer(&x))
        .and_then(|outs| {
            if outs.len() == n {
                Ok(outs)
            } else {
                Err(crate::Error::config("model", format!("{} outputs for {n} inputs", outs.len())))
            }
        });
    let inference = started.elapsed();
    metrics::histogram!("lineside_batch_size", "model" => name.to_string()).record(n as f64);
    metrics::histogram!("lineside_inference_seconds", "model" => name.to_string()).record(inference.as_secs_f64());
    match result {
        Ok(outs) => {
            for (job, output) in jobs.into_iter().zip(outs) {
                let served =
                    Served { output, queue: started.duration_since(job.enqueued_at), inference, batch_size: n };
                let _ = job.reply.send(Ok(served));
            }
        }
        Err(e) => {
            tracing::error!(model = name, error = %e, "batch failed");
            for job in jobs {
                let _ = job.reply.send(Err(JobError::Inference(e.to_string())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(enqueued_at: Instant) -> Job<()> {
        let (reply, _) = oneshot::channel();
        Job { input: Vec::new(), enqueued_at, deadline: enqueued_at + Duration::from_secs(60), reply }
    }

    fn config(max_queue_delay: Duration) -> BatcherConfig {
        BatcherConfig { max_batch_size: 8, max_queue_delay, queue_capacity: 16, threads: None }
    }

    #[test]
    fn a_lone_request_runs_at_once() {
        let (tx, rx) = bounded(16);
        tx.send(job(Instant::now())).unwrap();
        let t = Instant::now();
        let jobs = collect(&rx, &config(Duration::from_secs(30)), &AtomicUsize::new(0)).unwrap();
        assert_eq!(jobs.len(), 1);
        assert!(t.elapsed() < Duration::from_secs(5), "waited {:?} with nothing on the way", t.elapsed());
    }

    #[test]
    fn a_partial_batch_waits_for_incoming_requests() {
        let (tx, rx) = bounded(16);
        let incoming = AtomicUsize::new(2);
        tx.send(job(Instant::now())).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..2 {
                    std::thread::sleep(Duration::from_millis(30));
                    // Queued, then no longer counted: the other order could let
                    // a slow thread's request miss the batch.
                    tx.send(job(Instant::now())).unwrap();
                    incoming.fetch_sub(1, Ordering::AcqRel);
                }
            });
            let jobs = collect(&rx, &config(Duration::from_secs(30)), &incoming).unwrap();
            assert_eq!(jobs.len(), 3);
        });
    }

    #[test]
    fn a_withdrawn_request_is_not_waited_for() {
        let (tx, rx) = bounded(16);
        let incoming = AtomicUsize::new(1);
        tx.send(job(Instant::now())).unwrap();
        let t = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                incoming.fetch_sub(1, Ordering::AcqRel);
            });
            let jobs = collect(&rx, &config(Duration::from_secs(30)), &incoming).unwrap();
            assert_eq!(jobs.len(), 1);
        });
        assert!(t.elapsed() < Duration::from_secs(5), "waited {:?} for a withdrawn request", t.elapsed());
    }

    #[test]
    fn waits_at_most_the_queue_delay() {
        let (tx, rx) = bounded(16);
        let queued = Instant::now();
        tx.send(job(queued)).unwrap();
        let jobs = collect(&rx, &config(Duration::from_millis(40)), &AtomicUsize::new(1)).unwrap();
        assert_eq!(jobs.len(), 1);
        assert!(queued.elapsed() >= Duration::from_millis(40));
    }

    #[test]
    fn a_full_batch_does_not_wait_for_incoming_requests() {
        let (tx, rx) = bounded(16);
        for _ in 0..10 {
            tx.send(job(Instant::now())).unwrap();
        }
        let t = Instant::now();
        let jobs = collect(&rx, &config(Duration::from_secs(30)), &AtomicUsize::new(1)).unwrap();
        assert_eq!(jobs.len(), 8);
        assert_eq!(rx.len(), 2);
        assert!(t.elapsed() < Duration::from_secs(5), "a full batch waited {:?}", t.elapsed());
    }
}
