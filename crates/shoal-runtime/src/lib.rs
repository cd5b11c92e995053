//! Shoal's WebAssembly runtime.
//!
//! One [`Runtime`] per process owns the wasmtime `Engine` (pooling
//! allocator, copy-on-write memory images, epoch interruption), the on-disk
//! cache of compiled artifacts and the linkers for both kinds of function.
//! Loading wasm gives a [`FunctionImage`]: validated, compiled and
//! pre-linked. [`Runtime::call`] runs one call in a fresh store and instance
//! with its own limits and drops both afterwards.
//!
//! This crate never decides *whether* a call should run (admission and
//! fairness are the scheduler's) and never speaks HTTP.

mod artifact_cache;
mod call;
mod capture;
mod chain;
mod config;
mod engine;
mod error;
mod host;
mod http;
mod image;
mod interp;
mod lanes;
mod os;
mod outbound;
mod snapshot;
mod source;
mod trace;

pub use call::{CallOutput, CallSettings, CallUsage, ConfigValues, LogLine, LogStream};
pub use chain::{ChainError, InvokeFuture, Invoker, Lineage, RootCall, SendError, SendFuture};
pub use config::{RuntimeBinary, RuntimeConfig};
pub use error::{CallError, DeployError, RuntimeError};
pub use http::{AllowList, CallInput, HttpAnswer, HttpBody, HttpError, HttpExchange, MAX_ALLOWED_HOSTS};
pub use image::{Declared, FunctionImage, FunctionKind};
pub use lanes::IdleCores;
pub use os::{CpuClock, lower_this_thread, release_free_memory, release_static, tune_allocator};
pub use outbound::OutboundLimits;
pub use trace::{StateOpTiming, TraceParent};

pub use source::{Language, MAX_SOURCE_FILES, SourceBundle};

/// How [`Runtime::load_with`] loads a binary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Run the component's `init` export once and start every call from
    /// the state it leaves.
    pub snapshot: bool,
    /// Whose deploy this is: its compiles take that tenant's turns on the
    /// compile pool, its deploy-time guest code that tenant's turns on the
    /// long calls' lanes. None: the node's own (its examples, a restart).
    pub tenant: Option<Arc<str>>,
}

impl LoadOptions {
    fn tenant(&self) -> Arc<str> {
        self.tenant.clone().unwrap_or_else(|| Arc::from(""))
    }
}

/// What one tenant's compiles have used on a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileUse {
    pub compiles: u64,
    /// CPU time of the compile threads.
    pub cpu: std::time::Duration,
}

/// The compile threads' priority: below the call pool's, so compiles use
/// what calls leave of the CPU (and never the HTTP threads' share).
const COMPILE_NICE: i32 = 15;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use sha2::{Digest, Sha256};
use shoal_state::StateTiers;

use crate::artifact_cache::{ArtifactCache, Compiled};
use crate::engine::EpochTicker;

/// The process-wide runtime. Cheap to share behind an `Arc`.
pub struct Runtime {
    engine: wasmtime::Engine,
    linkers: host::Linkers,
    /// The engine of shared language runtimes, and those runtimes.
    interp: interp::Interpreters,
    cache: Arc<ArtifactCache>,
    /// Bounds concurrent compilations so a burst of deploys cannot take
    /// every core from running calls; shared round robin by tenant, one
    /// tenant holding at most all but one of them.
    compile_permits: Arc<lanes::FairLanes>,
    /// Images by content hash: many names deploying the same bytes share one.
    images: Mutex<HashMap<[u8; 32], Weak<FunctionImage>>>,
    config: RuntimeConfig,
    ticker: EpochTicker,
    n_compiles: AtomicU64,
    n_compiling: Arc<AtomicU64>,
    /// Each tenant's compiles so far: how many, and the CPU they used
    /// (compiles its deploys stopped waiting for included).
    compile_use: Arc<Mutex<HashMap<Arc<str>, CompileUse>>>,
    /// The state tiers the `state` interface reaches; without them every
    /// state operation answers `unavailable`.
    state: Option<Arc<StateTiers>>,
    /// Runs chained calls; without one, `invoke` answers `unavailable`.
    invoker: OnceLock<Arc<dyn Invoker>>,
    /// Places for long calls to run in (see `call.rs`).
    long_lanes: Arc<lanes::FairLanes>,
    /// What the scheduler tells those places of the cores short calls leave idle.
    idle_cores: IdleCores,
    /// `config.outbound`, shared by every call's `Outbound`.
    outbound_limits: Arc<OutboundLimits>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The key a snapshot of the binary `sha256` is kept under (its images
/// and compiled code differ from the binary's own).
fn snapshot_key(sha256: &[u8; 32]) -> [u8; 32] {
    Sha256::new().chain_update(b"shoal-snapshot\0").chain_update(sha256).finalize().into()
}

impl Runtime {
    /// Build the engine, start the epoch ticker and open the artifact cache.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        Self::build(config, None)
    }

    /// A runtime whose functions reach `state` through the `state` interface.
    pub fn with_state(config: RuntimeConfig, state: Arc<StateTiers>) -> Result<Self, RuntimeError> {
        Self::build(config, Some(state))
    }

    fn build(config: RuntimeConfig, state: Option<Arc<StateTiers>>) -> Result<Self, RuntimeError> {
        config.validate()?;
        let engine = engine::build(&config)?;
        let linkers = host::Linkers::new(&engine)?;
        let cache = Arc::new(ArtifactCache::open(&config.cache_dir, &engine)?);
        let interp = interp::Interpreters::new(&config)?;
        let ticker = EpochTicker::start(vec![engine.clone(), interp.engine.clone()], config.epoch_tick);
        let long_lanes = lanes::FairLanes::new(config.long_call_lanes);
        Ok(Self {
            compile_permits: lanes::FairLanes::with_per_tenant(
                config.compile_concurrency as u32,
                (config.compile_concurrency as u32).saturating_sub(1),
            ),
            engine,
            linkers,
            interp,
            cache,
            images: Mutex::new(HashMap::new()),
            ticker,
            n_compiles: AtomicU64::new(0),
            n_compiling: Arc::new(AtomicU64::new(0)),
            compile_use: Arc::default(),
            state,
            invoker: OnceLock::new(),
            idle_cores: lanes::IdleCores::new(long_lanes.clone()),
            long_lanes,
            outbound_limits: Arc::new(config.outbound.clone()),
            config,
        })
    }

    /// Give the runtime what runs its guests' chained calls. Set once; the
    /// invoker must not own the runtime (hold a `Weak`), or neither is
    /// ever dropped.
    pub fn set_invoker(&self, invoker: Arc<dyn Invoker>) -> Result<(), RuntimeError> {
        self.invoker.set(invoker).map_err(|_| RuntimeError::Config("the invoker is set already".into()))
    }

    /// Remove the compiled code kept on disk for the binary `sha256` (and
    /// for its snapshot): no function uses it any more. A call running it
    /// keeps its mapped code until it ends. Returns the bytes freed.
    pub fn forget_compiled(&self, sha256: &[u8; 32]) -> u64 {
        self.cache.remove(sha256) + self.cache.remove(&snapshot_key(sha256))
    }

    /// Bytes of compiled functions kept on disk.
    pub fn compiled_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    /// Wasm binaries compiled since start, language runtimes included
    /// (cache hits and shared images are not counted).
    pub fn n_compiles(&self) -> u64 {
        self.n_compiles.load(Ordering::Relaxed) + self.interp.n_compiles.load(Ordering::Relaxed)
    }

    /// Compilations running now (never more than `compile_concurrency`).
    /// What `tenant`'s compiles have used so far on this node.
    pub fn compile_use_of(&self, tenant: &str) -> CompileUse {
        self.compile_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .copied()
            .unwrap_or_default()
    }

    /// Language runtimes (Python, JavaScript) held now: each is prepared
    /// when a function of its language is loaded, and let go with the
    /// last such image.
    pub async fn n_language_runtimes(&self) -> usize {
        self.interp.n_prepared().await
    }

    pub fn n_compiling(&self) -> u64 {
        self.n_compiling.load(Ordering::Relaxed)
    }

    /// Long calls holding one of the long-call places now.
    /// Core and component instances alive in the pool now: every running
    /// call holds some; a finished call none.
    pub fn live_instances(&self) -> u64 {
        self.engine
            .pooling_allocator_metrics()
            .map_or(0, |metrics| metrics.core_instances() + metrics.component_instances())
    }

    pub fn long_calls_running(&self) -> u32 {
        self.long_lanes.in_use()
    }

    /// Where the scheduler reports the cores no short call is on or
    /// waiting for: long calls may run on as many (more than
    /// `long_call_lanes`) while it says so.
    pub fn idle_cores(&self) -> &IdleCores {
        &self.idle_cores
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Stop the epoch ticker and join its thread. Calls still running are
    /// no longer interrupted by deadline checks; call this after the last
    /// call has finished. Also done on drop.
    pub fn shutdown(&self) {
        self.ticker.stop();
    }

    /// The image for `wasm`: shared if these bytes are loaded already, else
    /// from the compiled-artifact cache, else compiled on the bounded
    /// compile pool (never on the calling task's thread).
    pub async fn load(&self, wasm: &[u8]) -> Result<Arc<FunctionImage>, DeployError> {
        self.load_with(wasm, &LoadOptions::default()).await
    }

    /// [`Runtime::load`], with options. With `snapshot`, the component's
    /// `init` export runs once here and the state it leaves is where every
    /// call starts (see `snapshot.rs`); the snapshot is compiled and cached
    /// under its own key, so a restart neither runs `init` nor compiles.
    pub async fn load_with(&self, wasm: &[u8], options: &LoadOptions) -> Result<Arc<FunctionImage>, DeployError> {
        if wasm.len() > self.config.max_module_bytes {
            return Err(DeployError::TooLarge { size: wasm.len(), limit: self.config.max_module_bytes });
        }
        let sha256: [u8; 32] = on_a_blocking_thread_if_large(wasm, |wasm| Sha256::digest(wasm).into()).await?;
        let kind = FunctionKind::detect(wasm)?;
        // A function of a shared runtime always starts from a snapshot.
        let interpreted = matches!(kind, FunctionKind::Python | FunctionKind::JavaScript);
        let snapshot = options.snapshot && !interpreted;
        // Images and compiled artifacts of a snapshot have a key of their own.
        let key: [u8; 32] = if snapshot { snapshot_key(&sha256) } else { sha256 };
        if let Some(image) = self.lookup(&key) {
            return Ok(image);
        }
        if interpreted {
            let image = self.load_source(sha256, kind, SourceBundle::decode(wasm)?, options).await?;
            return Ok(self.keep(key, image));
        }
        if snapshot && kind != FunctionKind::Component {
            return Err(DeployError::InvalidWasm(format!(
                "snapshot=true needs a component exporting `{}`; this is a command module",
                snapshot::INIT_EXPORT
            )));
        }
        let mut declared = on_a_blocking_thread_if_large(wasm, Declared::of).await?.unwrap_or_default();
        if declared.largest_memory_bytes > self.config.max_memory_bytes as u64 {
            return Err(DeployError::InvalidWasm(format!(
                "the binary declares a memory of {} MiB at start; no function may have more than {} MiB",
                declared.largest_memory_bytes >> 20,
                self.config.max_memory_bytes >> 20
            )));
        }
        if declared.most_memories_in_a_module > engine::MEMORIES_PER_SANDBOX
            || declared.most_tables_in_a_module > engine::TABLES_PER_MODULE
        {
            return Err(DeployError::InvalidWasm(format!(
                "a module of the binary defines {} memories and {} tables; the most a module may define is {} and {}",
                declared.most_memories_in_a_module,
                declared.most_tables_in_a_module,
                engine::MEMORIES_PER_SANDBOX,
                engine::TABLES_PER_MODULE
            )));
        }
        if declared.largest_table_elements > u64::from(engine::TABLE_ELEMENTS) {
            return Err(DeployError::InvalidWasm(format!(
                "the binary declares a table of {} elements at start; the most a table may hold is {}",
                declared.largest_table_elements,
                engine::TABLE_ELEMENTS
            )));
        }
        let (cache, engine) = (self.cache.clone(), self.engine.clone());
        // Read and checked whole: off the async threads.
        let cached = off_the_async_threads(move || cache.load(&engine, &key, kind)).await?;
        if snapshot && cached.is_some() {
            // A snapshot's memories are larger than the wasm declares:
            // what its own binary declared was kept beside the artifact.
            declared = self.cache.load_declared(&key).unwrap_or(declared);
        }
        let compiled = match cached {
            Some(compiled) => compiled,
            None => {
                let limit = self.config.compile_timeout;
                let work = async {
                    let tenant = options.tenant();
                    if !snapshot {
                        return self.compile(key, kind, wasm, &tenant).await;
                    }
                    let snapshotted = {
                        // The instrumented binary is compiled too: it takes
                        // its turn on the compile pool like any compile.
                        let _permit = self.compile_permits.acquire(&tenant).await;
                        let _ticking = self.ticker.enter();
                        let turns = call::Turns::new(self.long_lanes.clone(), tenant.clone());
                        snapshot::take(&self.engine, &self.linkers, wasm, &self.config, limit, turns).await?
                    };
                    declared = on_a_blocking_thread_if_large(&snapshotted, Declared::of).await?.unwrap_or_default();
                    self.cache.store_declared(&key, &declared);
                    self.compile(key, kind, &snapshotted, &tenant).await
                };
                match tokio::time::timeout(limit, work).await {
                    Ok(compiled) => compiled?,
                    Err(_) => return Err(DeployError::CompileTimeout { limit }),
                }
            }
        };
        let mut image = FunctionImage::link(&self.linkers, sha256, declared, compiled)?;
        image.snapshot = snapshot;
        Ok(self.keep(key, Arc::new(image)))
    }

    /// A function of a shared language runtime: the runtime compiled (once
    /// per node), the function's source loaded into it and the memory
    /// that results kept as its snapshot.
    async fn load_source(
        &self,
        sha256: [u8; 32],
        kind: FunctionKind,
        bundle: SourceBundle,
        options: &LoadOptions,
    ) -> Result<Arc<FunctionImage>, DeployError> {
        let shared = self.interp.runtime(bundle.language).await?;
        // Loaded before: its snapshot is kept, its code need not run again.
        let kept = shared.snapshot_name();
        let (cache, name) = (self.cache.clone(), kept.clone());
        let stored = off_the_async_threads(move || cache.load_blob(&sha256, &name)).await?;
        if let Some((snapshot, entry)) = stored.and_then(|bytes| shared.decode_snapshot(&bytes)) {
            return Ok(Arc::new(FunctionImage::interpreted(
                sha256,
                kind,
                shared,
                entry == interp::Entry::Http,
                snapshot,
            )));
        }
        let _ticking = self.ticker.enter();
        let turns = call::Turns::new(self.long_lanes.clone(), options.tenant());
        let limit = self.config.compile_timeout;
        let (snapshot, entry) =
            self.interp.snapshot(&shared, &bundle, &self.config, limit, turns, options.tenant.clone()).await?;
        let encoded = interp::SharedRuntime::encode_snapshot(&snapshot, entry);
        let cache = self.cache.clone();
        if let Err(e) = off_the_async_threads(move || cache.store_blob(&sha256, &kept, &encoded)).await? {
            tracing::warn!(error = %e, "keeping a function's snapshot failed; its code runs again when it is next loaded");
        }
        let http = entry == interp::Entry::Http;
        Ok(Arc::new(FunctionImage::interpreted(sha256, kind, shared, http, snapshot)))
    }

    /// Keep `image` as the one image of these bytes (another task may have
    /// loaded the same bytes meanwhile: the first kept wins).
    fn keep(&self, sha256: [u8; 32], image: Arc<FunctionImage>) -> Arc<FunctionImage> {
        let mut images = self.images.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(existing) = images.get(&sha256).and_then(Weak::upgrade) {
            return existing;
        }
        images.retain(|_, weak| weak.strong_count() > 0);
        images.insert(sha256, Arc::downgrade(&image));
        image
    }

    /// Compile on a thread of its own and cache the artifact, after
    /// `tenant`'s turn on the compile pool. The pool's place and the work
    /// belong to that thread: a deploy that stops waiting (its compile
    /// timed out, or its client left) leaves the compile to finish,
    /// holding its tenant's place on the pool, and its artifact cached.
    async fn compile(
        &self,
        sha256: [u8; 32],
        kind: FunctionKind,
        wasm: &[u8],
        tenant: &Arc<str>,
    ) -> Result<Compiled, DeployError> {
        let permit = self.compile_permits.acquire(tenant).await;
        // A compile of the same bytes that finished while this one waited
        // (a deploy that timed out and is retried).
        if let Some(compiled) = self.cache.load(&self.engine, &sha256, kind) {
            return Ok(compiled);
        }
        self.n_compiles.fetch_add(1, Ordering::Relaxed);
        let engine = self.engine.clone();
        let cache = self.cache.clone();
        let bytes = wasm.to_vec();
        let n_compiling = self.n_compiling.clone();
        let (compile_use, tenant) = (self.compile_use.clone(), tenant.clone());
        let (done, compiled) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("shoal-compile".into())
            .spawn(move || {
                lower_this_thread(COMPILE_NICE);
                let cpu = CpuClock::now();
                n_compiling.fetch_add(1, Ordering::Relaxed);
                let artifact = image::precompile(&engine, kind, &bytes);
                let compiled = artifact.and_then(|artifact| cache.store(&engine, &sha256, kind, &artifact));
                n_compiling.fetch_sub(1, Ordering::Relaxed);
                // What the compiler allocated is free now: give it back.
                os::release_free_memory();
                let used = cpu.elapsed();
                let mut uses = compile_use.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let of_tenant = uses.entry(tenant).or_default();
                of_tenant.compiles += 1;
                of_tenant.cpu += used;
                drop(uses);
                // The place is free before the deploy hears its compile ended.
                drop(permit);
                let _ = done.send(compiled);
            })
            .map_err(|e| DeployError::Internal(format!("starting a compile thread: {e}")))?;
        compiled.await.map_err(|_| DeployError::Internal("the compile thread failed".into()))?
    }

    /// Compiles `tenant`'s deploys hold places on the compile pool now
    /// (finished waiting or not).
    pub fn compiles_of(&self, tenant: &str) -> u32 {
        self.compile_permits.held_by(tenant)
    }

    fn lookup(&self, sha256: &[u8; 32]) -> Option<Arc<FunctionImage>> {
        let images = self.images.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        images.get(sha256).and_then(Weak::upgrade)
    }

    /// Run one call of `image` in a fresh sandbox, as a root call.
    pub async fn call(&self, image: &FunctionImage, settings: &CallSettings, input: &[u8]) -> CallOutput {
        self.call_in(image, settings, input, Lineage::root()).await
    }

    /// Run one call of `image` in a fresh sandbox at its place in a tree of
    /// chained calls: it ends by its caller's deadline at the latest.
    pub async fn call_in(
        &self,
        image: &FunctionImage,
        settings: &CallSettings,
        input: &[u8],
        lineage: Lineage,
    ) -> CallOutput {
        let _ticking = self.ticker.enter();
        call::run(self, image, settings, call::Given::Bytes(input), lineage).await
    }

    /// Run one request to an HTTP function in a fresh sandbox: the
    /// answer's head goes to the exchange as soon as the guest sets it, its
    /// body streams while the guest writes it, and the call ends when the
    /// guest does (its deadline covers the whole exchange).
    pub async fn call_http(
        &self,
        image: &FunctionImage,
        settings: &CallSettings,
        exchange: Box<HttpExchange>,
        lineage: Lineage,
    ) -> CallOutput {
        let _ticking = self.ticker.enter();
        call::run(self, image, settings, call::Given::Http(exchange), lineage).await
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// Binaries larger than this are hashed and scanned off the async threads,
/// which would otherwise stall every connection they serve (~100 ms for
/// 64 MiB).
const BLOCKING_ABOVE_BYTES: usize = 1 << 20;

/// `work` on a blocking thread: file reads, checksums and writes that
/// would stall every connection an async thread serves.
pub(crate) async fn off_the_async_threads<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DeployError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| DeployError::Internal(format!("a blocking task failed: {e}")))
}

async fn on_a_blocking_thread_if_large<T: Send + 'static>(wasm: &[u8], work: fn(&[u8]) -> T) -> Result<T, DeployError> {
    if wasm.len() <= BLOCKING_ABOVE_BYTES {
        return Ok(work(wasm));
    }
    let bytes = wasm.to_vec();
    tokio::task::spawn_blocking(move || work(&bytes))
        .await
        .map_err(|e| DeployError::Internal(format!("reading the binary: {e}")))
}
