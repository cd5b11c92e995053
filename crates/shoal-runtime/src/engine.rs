//! Building the one `Engine` of the process, and the epoch ticker thread
//! that drives yields and deadlines. The ticker is owned by the runtime and
//! joined when it stops; no other thread touches the epoch.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::{RuntimeConfig, RuntimeError};

/// Core instances a component may hold: a Rust component has a handful
/// (its module plus adapter shims); one built around an interpreter has
/// more (componentize-py's: 14). A slot for a core instance is a little
/// metadata, not reserved memory: going from 8 to 32 left an idle node's
/// address-space reservation and RSS unchanged.
const CORE_INSTANCES_PER_SANDBOX: u32 = 32;
pub(crate) const MEMORIES_PER_SANDBOX: u32 = 2;
pub(crate) const TABLES_PER_SANDBOX: u32 = 4;
/// Tables one core module may define (modules from Rust and C define one).
pub(crate) const TABLES_PER_MODULE: u32 = 1;
/// Elements a table may hold (declared or grown to).
pub(crate) const TABLE_ELEMENTS: u32 = 20_000;

pub(crate) fn build(config: &RuntimeConfig) -> Result<Engine, RuntimeError> {
    let mut pool = PoolingAllocationConfig::new();
    let n = config.max_instances;
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_SANDBOX))
        .total_memories(n.saturating_mul(MEMORIES_PER_SANDBOX))
        .total_tables(n.saturating_mul(TABLES_PER_SANDBOX))
        .total_stacks(n)
        .max_memory_size(config.max_memory_bytes)
        .table_elements(TABLE_ELEMENTS as usize)
        .max_tables_per_module(TABLES_PER_MODULE)
        .max_tables_per_component(TABLES_PER_SANDBOX)
        .max_memories_per_module(MEMORIES_PER_SANDBOX)
        .max_memories_per_component(MEMORIES_PER_SANDBOX)
        .max_core_instances_per_component(CORE_INSTANCES_PER_SANDBOX)
        // Keep what a typical call dirties resident and reset it in place
        // rather than unmapping it; pagemap scanning resets only the pages
        // a call actually touched.
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(64 << 10)
        .pagemap_scan(Enabled::Auto)
        // Every slot may stay warm for the module that last used it: with
        // wasmtime's default (100) a node calling more than ~50 distinct
        // functions in turn re-mapped a slot's image for nearly every call
        // (~50% more CPU per call, a third less capacity: BENCHMARKS.md,
        // "Flat in N with distinct code"). The cost is what reset slots
        // keep resident: at most `linear_memory_keep_resident` of each.
        .max_unused_warm_slots(n.saturating_mul(MEMORIES_PER_SANDBOX));

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

/// Advances the engine's epoch every tick while calls are running, and
/// sleeps (parked) while none are, so an idle node costs no wake-ups.
pub(crate) struct EpochTicker {
    shared: Arc<TickerShared>,
    /// To wake the ticker; cloned out of the join handle.
    waker: std::thread::Thread,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Idle ticks before the ticker parks: under steady load it never parks,
/// so calls never pay for waking it.
const IDLE_TICKS_BEFORE_PARKING: u32 = 100;

struct TickerShared {
    stop: AtomicBool,
    n_running: AtomicUsize,
}

/// Held by a running call; the ticker ticks while any exists.
pub(crate) struct TickerGuard<'a> {
    ticker: &'a EpochTicker,
}

impl Drop for TickerGuard<'_> {
    fn drop(&mut self) {
        self.ticker.shared.n_running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EpochTicker {
    pub(crate) fn start(engines: Vec<Engine>, tick: Duration) -> Self {
        let shared = Arc::new(TickerShared { stop: AtomicBool::new(false), n_running: AtomicUsize::new(0) });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("shoal-epoch".into())
                .spawn(move || {
                    let mut n_idle_ticks = 0;
                    while !shared.stop.load(Ordering::Acquire) {
                        if shared.n_running.load(Ordering::Acquire) == 0 {
                            n_idle_ticks += 1;
                            if n_idle_ticks > IDLE_TICKS_BEFORE_PARKING {
                                // Woken by the next call to start; the
                                // timeout is only a safety net.
                                std::thread::park_timeout(Duration::from_millis(100));
                                continue;
                            }
                        } else {
                            n_idle_ticks = 0;
                        }
                        std::thread::sleep(tick);
                        for engine in &engines {
                            engine.increment_epoch();
                        }
                    }
                })
                .expect("spawning the epoch thread: the process is out of threads")
        };
        Self { shared, waker: thread.thread().clone(), thread: Mutex::new(Some(thread)) }
    }

    /// Mark a call as running until the guard drops.
    pub(crate) fn enter(&self) -> TickerGuard<'_> {
        if self.shared.n_running.fetch_add(1, Ordering::AcqRel) == 0 {
            // Cheap when the ticker is not parked: it only sets a flag.
            self.waker.unpark();
        }
        TickerGuard { ticker: self }
    }

    /// Stop and join; idempotent.
    pub(crate) fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let handle = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(handle) = handle {
            self.waker.unpark();
            let _ = handle.join();
        }
    }
}
