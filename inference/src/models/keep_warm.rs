//! Keeps a rayon pool's other threads awake while one forward pass forks
//! and joins inside every layer.
//!
//! With fewer images than threads (batch 1 on two cores), each layer's
//! parallel loop forks onto the other threads and joins at its end: 20 to
//! 60 joins per pass, a few tens of microseconds of work each. Between two
//! of them a rayon worker with nothing to do yields a few dozen times and
//! then sleeps; waking it again costs a futex call on one side and, in a
//! virtual machine, a halted vCPU's wake-up on the other. `perf` on
//! mobilenetv2 at batch 1 put 8% of the samples in the scheduler, and two
//! threads ran it only 1.51× as fast as one, where ONNX Runtime, whose
//! threads spin between its parallel loops, gained 1.86×.
//!
//! [`with_warm_workers`] runs a pass with a spinning task broadcast to each
//! thread of the pool: each takes any work the pass forks the moment it is
//! there ([`rayon::yield_now`]) and spins with the CPU's pause hint in
//! between, until the pass ends. A spinner must sit at the bottom of its
//! thread's stack, under nothing that waits for the pass. A broadcast job
//! stays in its own thread's queue, which an idle thread empties before it
//! steals, so it starts before that thread can have taken any of the pass;
//! the pass's own thread, which gets one too, drops it at once, as does a
//! thread already spinning; and a spinner that has found no work for
//! [`MAX_IDLE`] leaves its thread to rayon's own idling, which bounds any
//! case these miss (two passes at once on one pool). A pool with more
//! threads than the machine has CPUs does not spin: its spinners would
//! take the CPUs its working threads need.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rayon::Yield;

/// How long a spinner spins without finding work before it gives its
/// thread back: longer than any gap between two layers' loops, short
/// enough that a stray spinner costs little.
#[cfg(not(test))]
const MAX_IDLE: Duration = Duration::from_millis(2);
/// Long in tests, so that a spinner holding up its pass shows as a slow
/// pass.
#[cfg(test)]
const MAX_IDLE: Duration = Duration::from_secs(5);

thread_local! {
    /// Whether this thread runs a pass under [`with_warm_workers`] or one
    /// of its spinners.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` on the current thread while the current rayon pool's other
/// threads spin, ready for the work it forks (module docs). Call it from a
/// thread of that pool; elsewhere, or on one thread, it just runs `f`.
pub fn with_warm_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads < 2 || threads > cpus() || rayon::current_thread_index().is_none() || BUSY.get() {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        s.spawn_broadcast(|_, _| spin(&done));
        let _busy = Busy::set();
        // Dropped first, and on a panic too: the spinners stop at once.
        let _done = Done(&done);
        f()
    })
}

/// The CPUs this process may run on.
fn cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Takes the pool's work as it comes until `done`, or until none has come
/// for [`MAX_IDLE`].
fn spin(done: &AtomicBool) {
    if BUSY.get() {
        return;
    }
    let _busy = Busy::set();
    let mut idle_since = Instant::now();
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(Yield::Executed) {
            idle_since = Instant::now();
            continue;
        }
        if idle_since.elapsed() > MAX_IDLE {
            return;
        }
        // A few pauses, not more: each fork waits this long at worst.
        for _ in 0..8 {
            std::hint::spin_loop();
        }
    }
}

/// Ends the pass's spinners when dropped.
struct Done<'a>(&'a AtomicBool);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Marks the thread busy until dropped, even by a panic.
struct Busy(bool);

impl Busy {
    fn set() -> Self {
        Self(BUSY.replace(true))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.set(self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// A pass that forks many small loops gets every result right, on
    /// pools of one to four threads (those with more threads than CPUs
    /// run without spinners), from inside and outside the pool, nested,
    /// and two at once; and none waits out a spinner's [`MAX_IDLE`] (5 s
    /// here), which is how a spinner holding up a pass would show.
    #[test]
    fn passes_finish_with_the_right_results_and_without_stalls() {
        // Enough work per item that the other threads steal some, and the
        // pass's thread then waits in its joins.
        let item =
            |layer: u64, i: u64| (0..4000u64).fold(layer * 64 + i, |a, b| a.wrapping_mul(31).wrapping_add(b)) % 1000;
        let pass = || (0..40).map(|layer| (0..16u64).into_par_iter().map(|i| item(layer, i)).sum::<u64>()).sum::<u64>();
        let want = (0..40).map(|layer| (0..16u64).map(|i| item(layer, i)).sum::<u64>()).sum::<u64>();
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for _ in 0..5 {
                let start = Instant::now();
                assert_eq!(pool.install(|| with_warm_workers(pass)), want);
                assert_eq!(with_warm_workers(pass), want, "outside the pool");
                let nested = pool.install(|| with_warm_workers(|| with_warm_workers(pass)));
                assert_eq!(nested, want);
                let side_by_side = pool.install(|| rayon::join(|| with_warm_workers(pass), || with_warm_workers(pass)));
                assert_eq!(side_by_side, (want, want));
                assert!(start.elapsed() < Duration::from_secs(2), "{threads} threads: {:?}", start.elapsed());
            }
        }
    }

    /// What a layer's fork and join costs a pass under warm workers,
    /// against a bare handoff between two spinning threads (an atomic
    /// store each way), as threads running one pass each with a spinning
    /// barrier between layers would pay: two tasks of about 3 µs each (a
    /// small-map layer's halves), timed on two threads against one thread
    /// running both; the cost is the two-thread time over half the
    /// one-thread time. Median of 15 rounds of 2,000 layers:
    /// `cargo test --release -p lineside-inference --lib
    /// keep_warm::tests::join_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement: prints figures"]
    fn join_cost() {
        use std::sync::atomic::AtomicUsize;
        const LAYERS: usize = 2_000;
        let median = |mut t: Vec<f64>| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        let task = |seed: usize| (0..4_000usize).fold(seed, |a, b| std::hint::black_box(a.wrapping_mul(31) ^ b));
        let per_layer = |start: Instant| start.elapsed().as_secs_f64() * 1e6 / LAYERS as f64;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (mut alone, mut joins, mut handoffs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..15 {
            let start = Instant::now();
            for i in 0..LAYERS {
                std::hint::black_box(task(i) ^ task(i + 1));
            }
            alone.push(per_layer(start));
            let start = Instant::now();
            pool.install(|| {
                with_warm_workers(|| {
                    for i in 0..LAYERS {
                        (0..2usize).into_par_iter().for_each(|t| {
                            std::hint::black_box(task(i + t));
                        });
                    }
                })
            });
            joins.push(per_layer(start));
            // Even epochs are the main thread's to publish, odd ones the
            // helper's answer.
            let epoch = AtomicUsize::new(0);
            let start = Instant::now();
            std::thread::scope(|s| {
                s.spawn(|| {
                    for i in 0..LAYERS {
                        while epoch.load(Ordering::Acquire) != 2 * i + 1 {
                            std::hint::spin_loop();
                        }
                        std::hint::black_box(task(i + 1));
                        epoch.store(2 * i + 2, Ordering::Release);
                    }
                });
                for i in 0..LAYERS {
                    epoch.store(2 * i + 1, Ordering::Release);
                    std::hint::black_box(task(i));
                    while epoch.load(Ordering::Acquire) != 2 * i + 2 {
                        std::hint::spin_loop();
                    }
                }
            });
            handoffs.push(per_layer(start));
        }
        let half = median(alone) / 2.0;
        let (join, handoff) = (median(joins), median(handoffs));
        println!(
            "per layer of two {half:.2} µs tasks on two threads: fork and join under warm workers {join:.2} µs \
             ({:+.2} over half), bare handoff {handoff:.2} µs ({:+.2})",
            join - half,
            handoff - half
        );
    }

    /// A pass that panics ends its spinners and passes the panic on.
    #[test]
    fn a_panicking_pass_ends_its_spinners() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let start = Instant::now();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| with_warm_workers(|| (0..64).into_par_iter().for_each(|i| assert!(i < 63, "layer 63"))))
        }));
        assert!(caught.is_err());
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }
}
