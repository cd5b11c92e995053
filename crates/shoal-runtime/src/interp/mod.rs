//! Shared interpreter runtimes: one compiled CPython for every Python
//! function, each function a snapshot of that runtime's memory taken
//! after its source was loaded.
//!
//! The runtime component is compiled once (and cached on disk, with the
//! memory image split from it, under a key made of the digest of the
//! runtime's bytes: a node that finds both never reads those bytes) on a
//! second engine whose linear memories are made by
//! [`memory::SnapshotMemories`]. A runtime is prepared when a function of
//! its language is first loaded and goes when the last such function's
//! image does: an idle node whose interpreted functions are not loaded
//! holds none of it. Deploying a function instantiates the
//! runtime from its base image, calls the `loader` export with the
//! function's files, and keeps the pages of memory that differ from the
//! base as the function's [`MemorySnapshot`]. A call instantiates the same
//! compiled runtime with its memory starting from that snapshot: nothing
//! is imported, parsed or initialised per call, and what one function
//! costs the node is its differing pages.
//!
//! Only linear memory is kept: the runtime's wasm globals must not change
//! while a function loads. The runtimes Shoal builds keep all interpreter
//! state in linear memory (their globals are the stack pointer, which a
//! finished call leaves where it found it, and addresses fixed when the
//! runtime was built), which the tests check by running functions from
//! their snapshots.

pub(crate) mod memory;
mod strip;
mod tracking;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{ComponentExportIndex, ComponentType, InstancePre, Lift};
use wasmtime::{Config, Engine, InstanceAllocationStrategy};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use self::memory::{BaseImage, MemorySnapshot, Plan, SnapshotMemories};
use crate::artifact_cache::{ArtifactCache, Compiled};
use crate::host::{ComponentCtx, FunctionPre, Linkers, deploy_store};
use crate::source::{Language, SourceBundle};
use crate::{DeployError, FunctionKind, RuntimeBinary, RuntimeConfig, RuntimeError};

/// The loader interface's export name (wit/interpreter.wit).
const LOADER: &str = "shoal:function/loader@0.1.0";

/// Tags a runtime's cache key (with the digest of its bytes). A new tag
/// whenever how a runtime is split into code and memory changes
/// (`strip.rs`), so that code and memory cached by an older split are
/// never paired with a newer one.
const RUNTIME_KEY_TAG: &[u8] = b"shoal-interpreter-runtime/2\0";
/// The name under which a runtime's memory image is cached beside its code.
const MEMORY_IMAGE: &str = "memory";

/// The interpreter engine and the runtimes compiled on it.
pub(crate) struct Interpreters {
    pub(crate) engine: Engine,
    linkers: Linkers,
    cache: Arc<ArtifactCache>,
    python: RuntimeBinary,
    javascript: RuntimeBinary,
    /// Runtimes compiled (not loaded from the cache) since start.
    pub(crate) n_compiles: std::sync::atomic::AtomicU64,
    /// Each language's runtime while any image of its functions holds it.
    runtimes: tokio::sync::Mutex<HashMap<Language, Weak<SharedRuntime>>>,
}

/// What a loaded function answers (wit/interpreter.wit, `loader.entry`).
#[derive(ComponentType, Lift, Clone, Copy, Debug, PartialEq, Eq)]
#[component(enum)]
#[repr(u8)]
pub(crate) enum Entry {
    /// `handler.handle`: bytes in, bytes out.
    #[component(name = "bytes")]
    Bytes,
    /// `wasi:http/incoming-handler`: an HTTP function.
    #[component(name = "http")]
    Http,
}

/// One language's runtime, ready to instantiate.
pub(crate) struct SharedRuntime {
    pub(crate) pre: FunctionPre<ComponentCtx>,
    /// The same code as an HTTP handler (for functions whose entry is
    /// `http`).
    pub(crate) proxy: ProxyPre<ComponentCtx>,
    instance_pre: InstancePre<ComponentCtx>,
    loader: ComponentExportIndex,
    base: Arc<BaseImage>,
    /// The base as a snapshot of itself, for instantiating before a load.
    base_snapshot: Arc<MemorySnapshot>,
    /// Its key in the cache (see `prepare`).
    key: [u8; 32],
}

/// The layout of a function's snapshot kept on disk (its first byte).
const SNAPSHOT_FORMAT: u8 = 1;

impl SharedRuntime {
    /// What a function's snapshot on this runtime is kept as in the cache,
    /// beside the function's code: named after this runtime, so that it is
    /// never read back over another runtime's memory.
    pub(crate) fn snapshot_name(&self) -> String {
        format!("{}.snapshot", &hex::encode(self.key)[..16])
    }

    /// A function's snapshot and entry as bytes to keep: read back by
    /// [`SharedRuntime::decode_snapshot`], a restart loads the function
    /// without running its code again.
    pub(crate) fn encode_snapshot(snapshot: &MemorySnapshot, entry: Entry) -> Vec<u8> {
        let entry = match entry {
            Entry::Bytes => 0,
            Entry::Http => 1,
        };
        [vec![SNAPSHOT_FORMAT, entry], snapshot.encode()].concat()
    }

    pub(crate) fn decode_snapshot(&self, bytes: &[u8]) -> Option<(Arc<MemorySnapshot>, Entry)> {
        let [SNAPSHOT_FORMAT, entry, rest @ ..] = bytes else { return None };
        let entry = match entry {
            0 => Entry::Bytes,
            1 => Entry::Http,
            _ => return None,
        };
        Some((Arc::new(MemorySnapshot::decode(self.base.clone(), rest)?), entry))
    }
}

pub(crate) fn build_engine(config: &RuntimeConfig) -> Result<Engine, RuntimeError> {
    let mut wasm = Config::new();
    wasm.strategy(wasmtime::Strategy::Cranelift)
        .allocation_strategy(InstanceAllocationStrategy::OnDemand)
        .with_host_memory(Arc::new(SnapshotMemories::new(config.idle_interpreter_memories)))
        // Memories get their content from `SnapshotMemories`, never from
        // wasmtime's own images.
        .memory_init_cow(false)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        .async_stack_size(config.async_stack_size)
        .wasm_component_model(true);
    Engine::new(&wasm).map_err(|e| RuntimeError::Config(format!("building the interpreter engine: {e:#}")))
}

impl Interpreters {
    pub(crate) fn new(config: &RuntimeConfig) -> Result<Self, RuntimeError> {
        let engine = build_engine(config)?;
        let linkers = Linkers::new(&engine)?;
        let cache =
            Arc::new(ArtifactCache::open(config.runtime_cache_dir.as_ref().unwrap_or(&config.cache_dir), &engine)?);
        Ok(Self {
            engine,
            linkers,
            cache,
            python: config.python_runtime,
            javascript: config.js_runtime,
            runtimes: tokio::sync::Mutex::new(HashMap::new()),
            n_compiles: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// `language`'s runtime: the one in use, or else prepared (loaded from
    /// the cache, or compiled the first time). The caller keeps it alive.
    pub(crate) async fn runtime(&self, language: Language) -> Result<Arc<SharedRuntime>, DeployError> {
        let mut runtimes = self.runtimes.lock().await;
        if let Some(runtime) = runtimes.get(&language).and_then(Weak::upgrade) {
            return Ok(runtime);
        }
        let binary = match language {
            Language::Python => self.python,
            Language::JavaScript => self.javascript,
        };
        let bytes = binary.bytes().ok_or_else(|| {
            DeployError::Unsupported(format!(
                "this node has no {} runtime (it was built without one)",
                language.as_str()
            ))
        })?;
        let started = Instant::now();
        let runtime = Arc::new(self.prepare(bytes, binary.sha256()).await?);
        tracing::info!(language = language.as_str(), elapsed_ms = started.elapsed().as_millis(), "runtime ready");
        runtimes.insert(language, Arc::downgrade(&runtime));
        // What reading, splitting or compiling it allocated is free now.
        crate::off_the_async_threads(crate::os::release_free_memory).await?;
        Ok(runtime)
    }

    /// Runtimes held by some function's image now.
    pub(crate) async fn n_prepared(&self) -> usize {
        self.runtimes.lock().await.values().filter(|runtime| runtime.strong_count() > 0).count()
    }

    async fn prepare(&self, bytes: &'static [u8], digest: Option<[u8; 32]>) -> Result<SharedRuntime, DeployError> {
        let engine = self.engine.clone();
        let internal = |what: &str, e: &dyn std::fmt::Display| DeployError::Internal(format!("{what}: {e}"));
        let digest: [u8; 32] = match digest {
            Some(digest) => digest,
            None => tokio::task::spawn_blocking(move || Sha256::digest(bytes).into())
                .await
                .map_err(|e| internal("hashing the runtime", &e))?,
        };
        // Keyed by the runtime's bytes and how they are split, tagged:
        // never the key of a function that deployed the same bytes.
        let key: [u8; 32] = Sha256::new().chain_update(RUNTIME_KEY_TAG).chain_update(digest).finalize().into();
        // Read and checked whole (tens of MB): off the async threads.
        let (cache, loading) = (self.cache.clone(), engine.clone());
        let (cached, memory) = crate::off_the_async_threads(move || {
            let cached = cache.load(&loading, &key, FunctionKind::Component);
            let memory = cached.as_ref().and_then(|_| cache.load_blob(&key, MEMORY_IMAGE));
            (cached, memory)
        })
        .await?;
        let (compiled, memory) = match (cached, memory) {
            (Some(compiled), Some(memory)) => (compiled, memory),
            (cached, _) => {
                let stripped = tokio::task::spawn_blocking(move || strip::strip(bytes))
                    .await
                    .map_err(|e| internal("splitting the runtime", &e))?
                    .map_err(|e| DeployError::Internal(format!("the runtime cannot be used: {e}")))?;
                // Read once: its pages go back to the executable's file.
                crate::os::release_static(bytes);
                let (cache, memory) = (self.cache.clone(), stripped.memory);
                let (stored, memory) = crate::off_the_async_threads(move || {
                    let stored = cache.store_blob(&key, MEMORY_IMAGE, &memory);
                    (stored, memory)
                })
                .await?;
                if let Err(e) = stored {
                    tracing::warn!(error = %e, "keeping the runtime's memory image failed; it is split again next time");
                }
                let compiled = match cached {
                    Some(compiled) => compiled,
                    None => {
                        self.n_compiles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let component = stripped.component;
                        let artifact = tokio::task::spawn_blocking(move || engine.precompile_component(&component))
                            .await
                            .map_err(|e| internal("compiling the runtime", &e))?
                            .map_err(|e| internal("compiling the runtime", &format!("{e:#}")))?;
                        let (cache, storing) = (self.cache.clone(), self.engine.clone());
                        crate::off_the_async_threads(move || {
                            cache.store(&storing, &key, FunctionKind::Component, &artifact)
                        })
                        .await??
                    }
                };
                (compiled, memory)
            }
        };
        let Compiled::Component(component) = compiled else {
            return Err(DeployError::Internal("the runtime compiled to a module".into()));
        };
        let instance_pre = self
            .linkers
            .component
            .instantiate_pre(&component)
            .map_err(|e| internal("linking the runtime", &format!("{e:#}")))?;
        let pre = FunctionPre::new(instance_pre.clone()).map_err(|e| internal("the runtime's handler", &e))?;
        let proxy = ProxyPre::new(instance_pre.clone())
            .map_err(|e| internal("the runtime's HTTP handler", &format!("{e:#}")))?;
        let loader = component
            .get_export_index(None, LOADER)
            .and_then(|interface| component.get_export_index(Some(&interface), "load"))
            .ok_or_else(|| DeployError::Internal(format!("the runtime does not export {LOADER}")))?;
        let size = memory.len();
        let base = crate::off_the_async_threads(move || BaseImage::new("shoal-runtime-base", &memory))
            .await?
            .map_err(|e| internal("the runtime's image", &e))?;
        let base = Arc::new(base);
        let base_snapshot = Arc::new(MemorySnapshot::of_base(base.clone(), size));
        Ok(SharedRuntime { pre, proxy, instance_pre, loader, base, base_snapshot, key })
    }

    /// Load `bundle` into a fresh instance of its runtime and keep the
    /// memory that results as the function's snapshot, with the entry the
    /// function defines. Loading runs the
    /// function's top-level code: it may not reach state or other
    /// functions (they answer `unavailable`), and it has `limit` to finish.
    pub(crate) async fn snapshot(
        &self,
        runtime: &SharedRuntime,
        bundle: &SourceBundle,
        config: &RuntimeConfig,
        limit: Duration,
        turns: crate::call::Turns,
        owner: Option<Arc<str>>,
    ) -> Result<(Arc<MemorySnapshot>, Entry), DeployError> {
        let capture = Arc::new(Mutex::new(None));
        let adopt = Arc::new(Mutex::new(None));
        let plan = Plan {
            snapshot: runtime.base_snapshot.clone(),
            capture: Some(capture.clone()),
            tenant: None,
            adopt: Some(adopt.clone()),
            owner,
        };
        let (mut store, stderr) = deploy_store(&self.engine, config, limit, Some(plan), "loading", turns.clone());
        let files: Vec<(String, Vec<u8>)> = bundle.files.clone();
        let load = async {
            let instance = runtime.instance_pre.instantiate_async(&mut store).await?;
            let load = instance
                .get_typed_func::<(Vec<(String, Vec<u8>)>,), (Result<Entry, String>,)>(&mut store, runtime.loader)?;
            let (result,) = load.call_async(&mut store, (files,)).await?;
            Ok::<_, wasmtime::Error>(result)
        };
        let outcome = match tokio::time::timeout(limit + Duration::from_millis(100), turns.run(load)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                return Err(DeployError::InvalidSource(format!("loading took longer than {} ms", limit.as_millis())));
            }
        };
        let printed = String::from_utf8_lossy(&stderr.take().0).trim().to_string();
        let entry = match outcome {
            Ok(Ok(entry)) => entry,
            Ok(Err(reason)) => return Err(DeployError::InvalidSource(reason)),
            Err(e) => {
                let tail = if printed.is_empty() { String::new() } else { format!("; stderr: {printed}") };
                return Err(DeployError::InvalidSource(format!("loading the function failed: {e:#}{tail}")));
            }
        };
        let view = capture
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .ok_or_else(|| DeployError::Internal("the runtime's memory was not seen being created".into()))?;
        // SAFETY: `store` (which owns the memory) is alive and idle: the
        // load has returned and nothing else can run in it.
        #[allow(unsafe_code)]
        let content = unsafe { view.read() };
        let base = runtime.base.clone();
        let snapshot = tokio::task::spawn_blocking(move || Arc::new(MemorySnapshot::diff(base, &content)))
            .await
            .map_err(|e| DeployError::Internal(format!("taking the snapshot: {e}")))?;
        // The memory, untouched since it was read, holds exactly the
        // snapshot: dropping the store keeps it for the first call.
        *adopt.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(snapshot.clone());
        drop(store);
        Ok((snapshot, entry))
    }
}
