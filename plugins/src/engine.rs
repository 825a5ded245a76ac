//! One wasmtime `Engine` for every plugin, and the thread that drives its epoch.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::cache::ComponentCache;

/// How often the epoch advances: the granularity of plugin deadlines.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Engine-wide settings. Per-plugin limits are in [`crate::Limits`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Where compiled components are cached; `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// Largest linear memory any plugin may have; the pooling allocator
    /// reserves this much address space per slot.
    pub max_memory_bytes: usize,
    /// Sandboxes that can exist at once (pooling allocator slots).
    pub max_instances: u32,
    /// Wasm stack limit; deeper recursion traps as a stack overflow.
    pub max_wasm_stack: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            cache_dir: Some(std::env::temp_dir().join("lineside-plugin-cache")),
            max_memory_bytes: 256 << 20,
            max_instances: 128,
            max_wasm_stack: 512 << 10,
        }
    }
}

/// The shared engine. Cheap to clone.
#[derive(Clone)]
pub struct PluginEngine {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    cache: ComponentCache,
    stop: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl PluginEngine {
    /// Builds the engine and starts its epoch thread.
    pub fn new(opts: &EngineOptions) -> anyhow::Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        // A Rust wasip2 component is a few core instances (the program and
        // wit-component's shims) with one linear memory between them.
        pool.total_component_instances(opts.max_instances)
            .total_core_instances(opts.max_instances * 4)
            .total_memories(opts.max_instances)
            .total_tables(opts.max_instances * 4)
            .max_memory_size(opts.max_memory_bytes)
            // Pages a plugin touched are zeroed in place and stay mapped for the next
            // sandbox in the slot, instead of being unmapped and faulted in again:
            // a fresh Store per call then costs a memset, not thousands of page faults.
            .linear_memory_keep_resident(opts.max_memory_bytes);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .max_wasm_stack(opts.max_wasm_stack)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let stop = Arc::new(AtomicBool::new(false));
        spawn_ticker(engine.clone(), stop.clone())?;
        let cache = ComponentCache::new(opts.cache_dir.clone(), &engine);
        Ok(Self { inner: Arc::new(Inner { engine, cache, stop }) })
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub(crate) fn cache(&self) -> &ComponentCache {
        &self.inner.cache
    }
}

fn spawn_ticker(engine: Engine, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    std::thread::Builder::new().name("plugin-epoch".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
        }
    })?;
    Ok(())
}
