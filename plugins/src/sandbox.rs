//! The per-call sandbox state: WASI with nothing granted, a memory limiter
//! that remembers hitting its cap, and the host `log` import.

use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostWallClock, WasiCtx, WasiCtxView, WasiView};

/// Writing more than this to stderr traps: plugins report through `log`.
const STDERR_CAPACITY: usize = 8 << 10;

use crate::bindings::host::{self, Level};
use crate::error::Failure;

/// Data of one `Store`: lives for one call.
pub(crate) struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    plugin: String,
    /// The plugin's stderr, kept to explain a trap (a Rust panic message lands here).
    stderr: MemoryOutputPipe,
    /// Log lines written by this call; capped so a plugin cannot flood the log.
    log_budget: u32,
}

impl StoreState {
    pub(crate) fn new(plugin: &str, memory_bytes: usize) -> Self {
        // No preopened directories, no environment, no arguments, no inherited
        // stdio and no network: std links against WASI, but finds nothing in it.
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .wall_clock(FrozenClock)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(memory_bytes)
            .instances(4)
            .tables(4)
            .memories(2)
            .trap_on_grow_failure(true)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter { inner: limits, hit_cap: false },
            plugin: plugin.to_string(),
            stderr,
            log_budget: 64,
        }
    }
}

impl StoreState {
    /// What the plugin wrote to stderr, on one line.
    pub(crate) fn stderr(&self) -> String {
        let text = String::from_utf8_lossy(&self.stderr.contents()).into_owned();
        text.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(500).collect()
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

// The `types` interface has no functions; its generated trait is empty.
impl crate::bindings::types::Host for StoreState {}

impl host::Host for StoreState {
    fn log(&mut self, level: Level, message: String) {
        if self.log_budget == 0 {
            return;
        }
        self.log_budget -= 1;
        let message: String = message.chars().take(1024).collect();
        let plugin = self.plugin.as_str();
        match level {
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

/// A wall clock stuck at the Unix epoch: a verdict must not depend on the
/// time of day. (Rust's std needs a clock to exist; the monotonic one, which
/// reveals nothing about the host, stays real.)
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// `StoreLimits`, plus a flag telling a memory-cap trap from any other.
pub(crate) struct Limiter {
    inner: StoreLimits,
    pub(crate) hit_cap: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let r = self.inner.memory_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.hit_cap = true;
        }
        r
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }
    fn tables(&self) -> usize {
        self.inner.tables()
    }
    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// Names what stopped a call, from the error wasmtime returned.
pub(crate) fn classify(err: &wasmtime::Error, hit_cap: bool) -> Failure {
    if hit_cap {
        return Failure::MemoryLimit;
    }
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => Failure::Timeout,
        Some(wasmtime::Trap::StackOverflow) => Failure::StackOverflow,
        _ => Failure::Trap,
    }
}
