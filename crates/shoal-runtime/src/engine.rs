//! Building the one `Engine` of the process, and the epoch ticker thread
//! that drives yields and deadlines. The ticker is owned by the runtime and
//! joined when it stops; no other thread touches the epoch.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::{RuntimeConfig, RuntimeError};

/// Core instances a component may hold: a Rust component has a handful
/// (its module plus adapter shims), so this leaves room.
const CORE_INSTANCES_PER_SANDBOX: u32 = 8;
const MEMORIES_PER_SANDBOX: u32 = 2;
const TABLES_PER_SANDBOX: u32 = 4;

pub(crate) fn build(config: &RuntimeConfig) -> Result<Engine, RuntimeError> {
    let mut pool = PoolingAllocationConfig::new();
    let n = config.max_instances;
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_SANDBOX))
        .total_memories(n.saturating_mul(MEMORIES_PER_SANDBOX))
        .total_tables(n.saturating_mul(TABLES_PER_SANDBOX))
        .total_stacks(n)
        .max_memory_size(config.max_memory_bytes)
        .max_memories_per_module(MEMORIES_PER_SANDBOX)
        .max_memories_per_component(MEMORIES_PER_SANDBOX)
        .max_core_instances_per_component(CORE_INSTANCES_PER_SANDBOX)
        // Keep what a typical call dirties resident and reset it in place
        // rather than unmapping it; pagemap scanning resets only the pages
        // a call actually touched.
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(64 << 10)
        .pagemap_scan(Enabled::Auto);

    let mut wasm = Config::new();
    wasm.strategy(wasmtime::Strategy::Cranelift)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .memory_init_cow(true)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        .async_stack_size(config.async_stack_size)
        .wasm_component_model(true);
    // Compilation is bounded by the runtime's own pool, and one compile
    // stays on one thread: wasmtime is built without its
    // `parallel-compilation` feature.
    Engine::new(&wasm).map_err(|e| RuntimeError::Config(format!("building the wasm engine: {e:#}")))
}

/// Advances the engine's epoch every tick until stopped.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("shoal-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .expect("spawning the epoch thread: the process is out of threads")
        };
        Self { stop, thread: Mutex::new(Some(thread)) }
    }

    /// Stop and join; idempotent.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}
