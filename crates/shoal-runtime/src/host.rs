//! The host side of the guest interface: the per-call store data, the
//! linkers (WASI plus `shoal:function`) built once per runtime, and the
//! `state` and `invoke` imports.
//!
//! What a call may reach is decided when its store is built (see
//! `call.rs`): nothing here grants files, sockets or the host's env.

mod invoke;
mod queue;
mod state;

pub(crate) use self::invoke::ChainCtx;

use std::sync::Arc;
use std::time::Instant;

use shoal_state::{LeaseToken, ScopedKey, StateTiers};
use wasmtime::component::{HasSelf, ResourceTable};
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::RuntimeError;
use crate::interp::memory::{Plan, plan_next};
use crate::outbound::Outbound;

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "shoal:function/function",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub(crate) use self::shoal::function::types::Error as GuestError;

/// Host resources (handles: streams, header sets, requests, …) a call may
/// hold at once. What the host keeps for a guest lives outside its linear
/// memory and its limit, so a call that made them without end would take
/// the node's memory from every tenant; real functions hold a few dozen.
pub(crate) const MAX_CALL_HANDLES: usize = 4096;

/// Bytes of one header set a guest builds (`wasi:http` fields): names and
/// values together. With [`MAX_CALL_HANDLES`], header sets can hold at
/// most 128 MiB of the host's memory for a call.
pub(crate) const MAX_FIELDS_BYTES: usize = 32 << 10;

/// A call's resource table, held to [`MAX_CALL_HANDLES`].
pub(crate) fn call_table() -> ResourceTable {
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_CALL_HANDLES);
    table
}

/// A call's `wasi:http` context, its header sets held to [`MAX_FIELDS_BYTES`].
pub(crate) fn call_http_ctx() -> WasiHttpCtx {
    let mut http = WasiHttpCtx::new();
    http.set_field_size_limit(MAX_FIELDS_BYTES);
    http
}

/// Store data of a component call.
pub(crate) struct ComponentCtx {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: CallLimiter,
    /// The caller's tenant, from its deployment (never from the guest).
    pub(crate) tenant: Arc<str>,
    pub(crate) state: Option<Arc<StateTiers>>,
    /// When the call must end: bounds waiting for a lock and its lease.
    pub(crate) deadline: Instant,
    /// Locks this call holds; released when the call ends, however it ends.
    pub(crate) leases: Vec<(ScopedKey, LeaseToken)>,
    /// Chained calls: lineage, invoker, spawned children.
    pub(crate) chain: ChainCtx,
    pub(crate) max_call_depth: u32,
    pub(crate) max_spawns_per_root: u32,
    /// The env vars set at deploy (`shoal:function/environment`).
    pub(crate) env: Arc<[(String, String)]>,
    /// `wasi:http`: its settings, and where outbound requests may go.
    pub(crate) http: WasiHttpCtx,
    pub(crate) outbound: Outbound,
    /// Set when an HTTP function's call fails: its response body, if it
    /// has not ended, ends in an error instead of looking complete.
    pub(crate) response_cut: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// What `wasi:config/store` answers.
    pub(crate) config: Arc<wasmtime_wasi_config::WasiConfigVariables>,
    /// The trace its chained calls hang under, and (sampled) its slow
    /// state operations so far.
    pub(crate) trace: Option<crate::TraceParent>,
    pub(crate) state_log: Option<crate::trace::StateOpLog>,
    /// When its instance was ready.
    pub(crate) ready_at: Option<std::time::Instant>,
}

impl WasiHttpView for ComponentCtx {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

impl Drop for ComponentCtx {
    fn drop(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        // Without a runtime to release them on, the leases expire by
        // themselves shortly after the call's deadline.
        let (Some(tiers), Ok(handle)) = (self.state.clone(), tokio::runtime::Handle::try_current()) else { return };
        let leases = std::mem::take(&mut self.leases);
        handle.spawn(async move {
            for (key, token) in leases {
                if let Err(e) = tiers.unlock(&key, &token).await {
                    tracing::warn!(error = %e, "releasing a finished call's lock failed; its lease will expire");
                }
            }
        });
    }
}

impl WasiView for ComponentCtx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl self::shoal::function::types::Host for ComponentCtx {}

/// Store data of a command-module call.
pub(crate) struct CommandCtx {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: CallLimiter,
}

/// Per-call memory and table limits. Remembers whether it refused memory,
/// so a trap that follows can be reported as running out of memory.
pub(crate) struct CallLimiter {
    memory_limit: usize,
    memory_used: usize,
    /// The most `memory_used` has been.
    pub(crate) peak: usize,
    pub(crate) memory_denied: bool,
    /// What the call's memories start from (interpreter engine only).
    pub(crate) plan: Option<Plan>,
}

/// Table elements one call may have in all its tables.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl CallLimiter {
    pub(crate) fn new(memory_limit: u64) -> Self {
        Self {
            memory_limit: usize::try_from(memory_limit).unwrap_or(usize::MAX),
            memory_used: 0,
            peak: 0,
            memory_denied: false,
            plan: None,
        }
    }
}

impl ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        mut desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // A memory being created (or an empty one grown) starts at its
        // snapshot's size (interpreter engine).
        let creating = current == 0;
        if let (true, Some(plan)) = (creating, &self.plan) {
            desired = desired.max(plan.snapshot.size());
        }
        // The limit covers all of a call's memories together.
        let after = self.memory_used.saturating_sub(current).saturating_add(desired);
        if after > self.memory_limit {
            self.memory_denied = true;
            if creating {
                plan_next(None);
            }
            return Ok(false);
        }
        self.memory_used = after;
        self.peak = self.peak.max(after);
        if creating {
            // wasmtime creates the memory next, on this thread, with no
            // await in between: the creator takes this plan (see
            // `interp/memory.rs`).
            plan_next(self.plan.clone());
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Linkers for both kinds of function, built once per runtime.
pub(crate) struct Linkers {
    pub(crate) component: wasmtime::component::Linker<ComponentCtx>,
    pub(crate) command: wasmtime::Linker<CommandCtx>,
}

impl Linkers {
    pub(crate) fn new(engine: &Engine) -> Result<Self, RuntimeError> {
        let link_error = |e: wasmtime::Error| RuntimeError::Config(format!("linking host interfaces: {e:#}"));
        let mut component = wasmtime::component::Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component).map_err(link_error)?;
        // wasi:http: an HTTP function's own interfaces, and outbound
        // requests for every component (refused unless allowed).
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component).map_err(link_error)?;
        // wasi:config/store@0.2.0-rc.1: the secrets a function names.
        wasmtime_wasi_config::add_to_linker(&mut component, |ctx: &mut ComponentCtx| {
            wasmtime_wasi_config::WasiConfig::from(&*ctx.config)
        })
        .map_err(link_error)?;
        Function::add_to_linker::<ComponentCtx, HasSelf<ComponentCtx>>(&mut component, |ctx| ctx)
            .map_err(link_error)?;
        // wit/interpreter.wit's `environment`, for shared language runtimes.
        component
            .instance("shoal:function/environment@0.1.0")
            .and_then(|mut environment| {
                environment.func_wrap(
                    "get",
                    |store: wasmtime::StoreContextMut<'_, ComponentCtx>,
                     (): ()|
                     -> wasmtime::Result<(Vec<(String, String)>,)> {
                        Ok((store.data().env.to_vec(),))
                    },
                )
            })
            .map_err(link_error)?;
        let mut command = wasmtime::Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut command, |ctx: &mut CommandCtx| &mut ctx.wasi)
            .map_err(link_error)?;
        Ok(Self { component, command })
    }
}

/// A store for running a guest's own code at deploy (a snapshot's `init`,
/// a language runtime's loader): its output captured (stderr kept for the
/// error message), no state, no chained calls, the node's largest memory,
/// and stopped with "{doing} took longer than …" after `limit`.
pub(crate) fn deploy_store(
    engine: &Engine,
    config: &crate::RuntimeConfig,
    limit: std::time::Duration,
    plan: Option<Plan>,
    doing: &'static str,
    turns: crate::call::Turns,
) -> (wasmtime::Store<ComponentCtx>, crate::capture::CaptureBuffer) {
    let stderr = crate::capture::CaptureBuffer::new(config.max_log_bytes);
    let mut wasi = wasmtime_wasi::WasiCtxBuilder::new();
    wasi.stdout(crate::capture::CaptureBuffer::new(config.max_log_bytes)).stderr(stderr.clone());
    let deadline = Instant::now() + limit;
    let mut limiter = CallLimiter::new(config.max_memory_bytes as u64);
    limiter.plan = plan;
    let ctx = ComponentCtx {
        wasi: wasi.build(),
        table: call_table(),
        limiter,
        tenant: Arc::from(""),
        state: None,
        deadline,
        leases: Vec::new(),
        chain: ChainCtx::new(crate::Lineage::root(), None, stderr.clone()),
        max_call_depth: 0,
        max_spawns_per_root: 0,
        env: Arc::from(Vec::new()),
        http: call_http_ctx(),
        outbound: Outbound::denied(stderr.clone()),
        response_cut: None,
        config: Arc::default(),
        trace: None,
        state_log: None,
        ready_at: None,
    };
    let mut store = wasmtime::Store::new(engine, ctx);
    store.limiter(|ctx| &mut ctx.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            return Err(wasmtime::format_err!("{doing} took longer than {} ms", limit.as_millis()));
        }
        // Yield at every tick, and run each only on its tenant's turn on
        // the long calls' lanes: deploy-time code may run for long, and
        // must leave the executor's threads and the CPU to everything
        // else meanwhile.
        Ok(turns.next_turn(deadline))
    });
    (store, stderr)
}
