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
//! [`with_warm_workers`] runs a pass with one spinning task per other
//! thread of the pool: each takes any work the pass forks the moment it is
//! there ([`rayon::yield_now`]) and spins with the CPU's pause hint in
//! between, until the pass ends. Three guards keep a spinner from holding
//! up the pass it serves: the pass's own thread, should it pick a spinner
//! up while it waits in a join, drops it at once; so does a thread already
//! spinning (a spinner must sit at the bottom of its thread's stack, under
//! nothing that waits for the pass); and a spinner that has found no work
//! for [`MAX_IDLE`] leaves the thread to rayon's own idling.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rayon::Yield;

/// How long a spinner spins without finding work before it gives its
/// thread back: longer than any gap between two layers' loops, short
/// enough that a stray spinner costs little.
const MAX_IDLE: Duration = Duration::from_millis(2);

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
    if threads < 2 || rayon::current_thread_index().is_none() || BUSY.get() {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| spin(&done));
        }
        let _busy = Busy::set();
        let out = f();
        done.store(true, Ordering::Release);
        out
    })
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
        for _ in 0..32 {
            std::hint::spin_loop();
        }
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
    /// pools of one to four threads, from inside and outside the pool, and
    /// nested passes do not wait on each other's spinners.
    #[test]
    fn passes_finish_with_the_right_results() {
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let pass = || (0..200).map(|layer| (0..64u64).into_par_iter().map(|i| i * layer).sum::<u64>()).sum::<u64>();
            let want = 2016 * (0..200).sum::<u64>();
            for _ in 0..20 {
                assert_eq!(pool.install(|| with_warm_workers(pass)), want);
                assert_eq!(with_warm_workers(pass), want, "outside the pool");
                let nested = pool.install(|| with_warm_workers(|| with_warm_workers(pass)));
                assert_eq!(nested, want);
                let side_by_side = pool.install(|| rayon::join(|| with_warm_workers(pass), || with_warm_workers(pass)));
                assert_eq!(side_by_side, (want, want));
            }
        }
    }
}
