//! A Shoal node: the runtime, the embedded store and the executor composed
//! behind the HTTP API (ARCHITECTURE.md, `crates/shoal-node`), with auth, logs and metrics.
//!
//! [`Node::start`] opens the data directory, loads every deployed function
//! (from the compiled-artifact cache, without compiling) and returns a node
//! ready to serve; [`Node::router`] is the HTTP API, testable in-process or
//! on a real socket; [`Node::serve`] runs it until a shutdown signal.
//!
//! The node owns the mapping from typed errors to HTTP statuses and nothing
//! below it ever sees HTTP.

mod activity;
mod api;
mod auth;
mod calls;
mod chain;
mod cluster;
mod config;
mod cron;
mod error;
mod images;
mod linger;
mod logs;
mod metrics;
mod names;
mod queues;
mod registry;
mod routes;
mod secrets;
mod server;
mod tenancy;
mod trace;
mod triggers;
pub mod usage;

pub use calls::{CallFailure, CallRecord, CallStatus};
pub use config::{NodeConfig, Secret};
pub use error::{ApiError, ErrorKind};
pub use linger::Linger;
pub use queues::QueueLimits;
pub use registry::FunctionRecord;
pub use server::HttpLimits;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shoal_runtime::{LoadOptions, Runtime, RuntimeConfig};
use shoal_sched::Executor;
use shoal_state::{
    EmbeddedGlobal, EmbeddedStore, EmbeddedTier, GlobalTier, RedisConfig, RedisTier, StateLimits, StateTiers,
};
use tokio::net::TcpListener;

use crate::auth::TokenHash;
use crate::calls::AsyncCalls;
use crate::metrics::Metrics;
use crate::registry::{DeployedFunction, Registry, TenantRecord};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Runtime(#[from] shoal_runtime::RuntimeError),
    #[error("the global state tier: {0}")]
    Redis(String),
    #[error("joining the cluster: {0}")]
    Cluster(#[from] shoal_cluster::ClusterError),
    #[error(transparent)]
    Store(#[from] shoal_state::StoreError),
}

/// A fresh call id: 64 random bits in hex.
pub(crate) fn new_call_id() -> String {
    use rand::RngCore;
    format!("{:016x}", rand::rng().next_u64())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The limits and env of a deploy, already checked against the node's caps.
#[derive(Clone, Debug)]
pub struct DeploySpec {
    pub memory_bytes: u64,
    pub timeout: Duration,
    pub env: Vec<(String, String)>,
    /// The body is source for this language's shared runtime, not wasm.
    pub language: Option<shoal_runtime::Language>,
    /// Run the component's `init` once, at deploy, and start every call
    /// from the state it leaves.
    pub snapshot: bool,
    /// Where its outbound HTTP requests may go (`scheme://host[:port]`).
    pub allowed_hosts: Vec<String>,
    /// An HTTP function anyone may call (else: the tenant's token).
    pub public: bool,
    /// It must be an HTTP function: anything else is refused.
    pub http: bool,
    /// The tenant's secrets it is given, by name.
    pub secrets: Vec<String>,
}

impl DeploySpec {
    /// The node's defaults: its default limits, nothing else.
    pub fn defaults(config: &NodeConfig) -> Self {
        Self {
            memory_bytes: config.default_memory_bytes,
            timeout: config.default_timeout,
            env: Vec::new(),
            language: None,
            snapshot: false,
            allowed_hosts: Vec::new(),
            public: false,
            http: false,
            secrets: Vec::new(),
        }
    }
}

/// Each readiness check must answer within this.
const READY_CHECK: Duration = Duration::from_secs(2);
/// The longest a task may wait for an async thread on a ready node.
const READY_LAG: Duration = Duration::from_millis(500);
/// The longest the cluster chores may go without a tick on a ready node.
const READY_CHORES_MS: u64 = 3000;

pub struct Node {
    config: NodeConfig,
    state: Arc<StateTiers>,
    registry: Registry,
    executor: Executor,
    metrics: Metrics,
    pub(crate) tracer: trace::Tracer,
    /// What each tenant's calls used (`usage.rs`), and the store it is
    /// kept in (the registry's).
    usage: usage::Meter,
    usage_store: Arc<EmbeddedStore>,
    admin_hash: TokenHash,
    /// What tenants' secrets are sealed with (from the admin token).
    secret_key: secrets::SecretKey,
    async_calls: Arc<AsyncCalls>,
    /// Cron triggers (`triggers.rs`).
    triggers: triggers::Triggers,
    /// Queues and their consumers (`queues.rs`).
    queues: queues::Queues,
    /// This node's part in a cluster, when started with a Redis URL.
    cluster: Option<Arc<cluster::Cluster>>,
    /// The clock of function use, for evicting the least recently used.
    use_clock: std::sync::atomic::AtomicU64,
    /// The functions this node gave an image to (some may have let it go
    /// since, or be gone): what the image budget looks at, so that a
    /// reload costs the loaded functions, not every function deployed.
    loaded: std::sync::Mutex<Vec<std::sync::Weak<registry::DeployedFunction>>>,
    conn_stats: server::ConnStats,
    /// Set when the node begins to stop: not ready for new work.
    draining: std::sync::atomic::AtomicBool,
    /// When the cluster chores last ticked (Unix ms; 0 before the first).
    chores_beat: std::sync::atomic::AtomicU64,
    /// When a readiness check last wrote to the store (Unix ms).
    store_ready_ms: std::sync::atomic::AtomicU64,
    /// Background chores restarted after a panic.
    chore_restarts: std::sync::atomic::AtomicU64,
    /// Fault injection: the cluster chores panic at their next tick.
    #[cfg(feature = "fault-injection")]
    fault_in_chores: std::sync::atomic::AtomicBool,
    /// Fault injection: the next asynchronous call's task panics.
    #[cfg(feature = "fault-injection")]
    fault_in_async_call: std::sync::atomic::AtomicBool,
    /// Background chores' supervisors, joined when the node stops.
    chores: std::sync::Mutex<Vec<(&'static str, tokio::task::JoinHandle<()>)>>,
    /// Set when the node stops: supervisors end their chores.
    stop_chores: tokio::sync::watch::Sender<bool>,
}

/// Run the chore `make` starts, on its own task, and start it again a
/// second after it panics (counted in `shoal_chore_restarts_total` and
/// logged), until it ends by itself, the node stops (it is then ended at
/// its next await and joined: [`Node::join_chores`]) or the node is gone.
pub(crate) fn supervise<F, Fut>(node: &Arc<Node>, name: &'static str, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let weak = Arc::downgrade(node);
    let mut stop = node.stop_chores.subscribe();
    let supervisor = tokio::spawn(async move {
        loop {
            let mut chore = tokio::spawn(make());
            let ended = tokio::select! {
                ended = &mut chore => ended,
                () = stopped(&mut stop) => {
                    chore.abort();
                    let _ = chore.await;
                    return;
                }
            };
            match ended {
                Err(e) if e.is_panic() => {
                    let Some(node) = weak.upgrade() else { return };
                    node.chore_restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    drop(node);
                    tracing::error!(chore = name, "a background chore panicked; starting it again in a second");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = stopped(&mut stop) => return,
                    }
                }
                _ => return,
            }
        }
    });
    node.chores.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((name, supervisor));
}

/// Until the node stops (or is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let now = *stop.borrow_and_update();
        if now || stop.changed().await.is_err() {
            return;
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Node {
    /// Open the data directory and load every deployed function.
    pub async fn start(config: NodeConfig) -> Result<Arc<Self>, StartError> {
        config.validate().map_err(StartError::Config)?;
        let data_dir = &config.data_dir;
        std::fs::create_dir_all(data_dir)
            .map_err(|source| StartError::DataDir { path: data_dir.display().to_string(), source })?;
        let admin_token = auth::admin_token(data_dir, config.admin_token.as_ref().map(Secret::expose))
            .map_err(|source| StartError::DataDir { path: data_dir.display().to_string(), source })?;
        let store = Arc::new(EmbeddedStore::open(&data_dir.join("shoal.redb"))?);

        let mut runtime_config = RuntimeConfig::new(data_dir.join("cache"));
        runtime_config.max_instances = config.max_concurrent_calls;
        runtime_config.max_memory_bytes = usize::try_from(config.max_memory_bytes).unwrap_or(usize::MAX);
        runtime_config.max_module_bytes = config.max_module_bytes;
        runtime_config.compile_concurrency = config.compile_concurrency;
        runtime_config.compile_timeout = config.compile_timeout;
        runtime_config.max_output_bytes = config.max_body_bytes;
        runtime_config.max_log_lines = config.log_lines_per_function;
        runtime_config.max_call_depth = config.max_call_depth;
        runtime_config.max_spawns_per_root = config.max_spawns_per_root;
        runtime_config.trace_state_ops_over = config.trace_state_ops_over;
        runtime_config.python_runtime = config.python_runtime;
        runtime_config.outbound.opened = config.outbound_open.clone();
        runtime_config.js_runtime = config.js_runtime;
        runtime_config.runtime_cache_dir = config.runtime_cache_dir.clone();
        let limits =
            StateLimits { max_value_bytes: config.max_state_value_bytes, tenant_quota_bytes: config.state_quota_bytes };
        let global: Arc<dyn GlobalTier> = match &config.redis_url {
            None => Arc::new(EmbeddedTier::new(EmbeddedGlobal::new(store.clone(), limits))),
            Some(url) => {
                let redis = RedisTier::connect(RedisConfig { limits, ..RedisConfig::new(url.expose()) })
                    .map_err(|e| StartError::Redis(e.to_string()))?;
                // Refuse to start against a Redis that is not there: a wrong
                // URL should fail now, not at the first state call.
                redis.ping().await.map_err(|e| StartError::Redis(e.to_string()))?;
                Arc::new(redis)
            }
        };
        let state = Arc::new(StateTiers::with_local_limits(global, config.local_limits()));
        let max_running = config.scheduler.max_running.min(config.max_concurrent_calls);
        let (shared, cluster) = match &config.redis_url {
            None => (None, None),
            Some(url) => {
                let (shared, cluster) = join_cluster(&config, url.expose(), &admin_token, max_running).await?;
                (Some(shared), Some(cluster))
            }
        };
        let runtime = Arc::new(Runtime::with_state(runtime_config, state.clone())?);
        let mut policy = config.scheduler.clone();
        policy.max_running = policy.max_running.min(config.max_concurrent_calls);
        policy.max_running_per_tenant = policy.max_running_per_tenant.min(policy.max_running);
        policy.max_running_long = policy.max_running_long.min(policy.max_running);
        policy.max_long_per_tenant = policy.max_long_per_tenant.min(policy.max_running_long);
        let executor =
            Executor::with_limits(runtime.clone(), config.max_concurrent_calls, policy, config.sandbox_limits());
        for (tenant, weight) in &config.tenant_weights {
            executor.set_weight(tenant, *weight);
        }

        let queue = cluster.as_ref().map(|c| c.queue.clone());
        let metrics = Metrics::new(config.metrics_functions, config.metrics_tenants);
        let tracer = match &config.otlp_endpoint {
            None => trace::Tracer::off(),
            Some(endpoint) => trace::Tracer::start(&trace::TraceConfig {
                endpoint: endpoint.clone(),
                ratio: config.trace_sample,
                queue: config.trace_queue,
                instance: cluster.as_ref().map_or_else(|| "single".to_string(), |c| c.id().to_string()),
            })
            .map_err(StartError::Config)?,
        };
        let async_per_tenant = config.max_async_calls_per_tenant.unwrap_or((config.max_async_calls / 4).max(1));
        let async_calls = Arc::new(AsyncCalls::new(
            store.clone(),
            queue,
            config.max_async_calls,
            async_per_tenant,
            config.async_retention,
            calls::KeptLimits {
                records: config.max_async_records_per_tenant,
                output_bytes: config.max_async_output_bytes_per_tenant,
            },
        )?);
        let usage_store = store.clone();
        let shared_triggers = cluster.as_ref().and_then(|c| c.triggers.clone());
        let triggers = triggers::Triggers::open(store.clone(), shared_triggers, config.max_triggers_per_tenant)?;
        let shared_queues = cluster.as_ref().and_then(|c| Some((c.queues.clone()?, c.id().to_string())));
        let queues = queues::Queues::open(store.clone(), config.queue_limits, shared_queues)?;
        let registry = Registry::open(store, shared)?;
        let node = Arc::new_cyclic(|node| {
            // A fresh runtime has no invoker yet: this cannot fail.
            let _ = runtime.set_invoker(chain::invoker(node));
            Self {
                admin_hash: auth::hash_token(&admin_token),
                secret_key: secrets::SecretKey::derive(&admin_token),
                config,
                state,
                registry,
                executor,
                metrics,
                tracer,
                usage: usage::Meter::default(),
                usage_store,
                async_calls,
                triggers,
                queues,
                cluster,
                use_clock: std::sync::atomic::AtomicU64::new(0),
                loaded: std::sync::Mutex::default(),
                conn_stats: server::ConnStats::default(),
                draining: std::sync::atomic::AtomicBool::new(false),
                chores_beat: std::sync::atomic::AtomicU64::new(0),
                store_ready_ms: std::sync::atomic::AtomicU64::new(0),
                chore_restarts: std::sync::atomic::AtomicU64::new(0),
                #[cfg(feature = "fault-injection")]
                fault_in_chores: std::sync::atomic::AtomicBool::new(false),
                #[cfg(feature = "fault-injection")]
                fault_in_async_call: std::sync::atomic::AtomicBool::new(false),
                chores: std::sync::Mutex::new(Vec::new()),
                stop_chores: tokio::sync::watch::Sender::new(false),
            }
        });
        if node.cluster.is_some() {
            node.registry.mirror(true, node.config.log_lines_per_function).await.map_err(|e| match e {
                registry::RegistryError::Cluster(e) => StartError::Cluster(e),
                registry::RegistryError::Store(e) => StartError::Store(e),
            })?;
            cluster::spawn_chores(&node);
            tracing::info!(
                node_id = %node.cluster.as_ref().map_or("", |c| c.id()),
                n_functions = node.registry.n_functions(),
                "joined the cluster"
            );
        } else {
            node.read_functions().await?;
        }
        usage::spawn_chore(&node);
        node.enforce_image_budget();
        node.apply_tenant_limits();
        node.resume_deletions();
        let resumed = node.resume_async_calls()?;
        node.spawn_trigger_chore();
        node.start_consumers();
        if resumed > 0 {
            tracing::info!(resumed, "resuming asynchronous calls accepted before the last stop");
        }
        Ok(node)
    }

    /// Make the stored functions known, none loaded: each image loads on
    /// its function's first call (from the compiled cache, no compiling),
    /// so a node starts in the same time and memory whatever it holds, and
    /// a Python or JavaScript runtime is prepared only once one of its
    /// functions is called.
    async fn read_functions(&self) -> Result<(), StartError> {
        let stored = self.registry.stored_functions()?;
        let n_stored = stored.len();
        let started = std::time::Instant::now();
        for record in stored {
            let trail = self.registry.trail_for(&record.tenant, &record.name, self.config.log_lines_per_function);
            self.registry.insert_known(DeployedFunction::unloaded(record, trail));
        }
        let n_versions = self.registry.insert_versions(self.config.log_lines_per_function)?;
        tracing::info!(
            n_functions = self.registry.n_functions(),
            n_versions,
            n_stored,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "read deployed functions"
        );
        Ok(())
    }

    /// Apply every tenant's limits as the registry holds them (at start,
    /// after a change, and in a cluster after each mirror that read
    /// something).
    pub(crate) fn apply_tenant_limits(&self) {
        for (tenant, limits) in self.registry.all_tenant_limits() {
            let weight = limits
                .weight
                .or_else(|| self.config.tenant_weights.iter().find(|(t, _)| *t == tenant).map(|(_, w)| *w));
            self.executor.set_tenant_limits(
                &tenant,
                shoal_sched::TenantLimits {
                    weight,
                    running: limits.running,
                    sandboxes: limits.sandboxes,
                    memory_bytes: limits.memory_bytes,
                },
            );
            self.state.local().set_tenant_limit(&tenant, limits.local_bytes);
            self.state.global().set_tenant_quota(&tenant, limits.state_quota_bytes);
        }
        // In a cluster, another node may be deleting a tenant: what this
        // node holds of it locally goes now (its functions are gone here
        // with the mirror).
        if self.cluster.is_some() {
            for tenant in self.registry.tenants_being_deleted() {
                self.state.local().remove_tenant(&tenant);
            }
        }
    }

    /// Whether the node should be sent new work, and if not, why: it is
    /// not draining, its store takes a write, its cluster's Redis answers
    /// and its cluster chores run, and its async threads run a task within
    /// `READY_LAG`.
    pub(crate) async fn readiness(&self) -> Result<(), String> {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return Err("draining: the node is stopping".into());
        }
        let bounded = |what: &'static str| move |_| format!("{what}: no answer within {READY_CHECK:?}");
        // How long a task waits for an async thread: a node whose threads
        // are held up cannot serve what it is sent.
        let started = std::time::Instant::now();
        tokio::time::timeout(READY_CHECK, tokio::spawn(async {}))
            .await
            .map_err(bounded("the async threads"))?
            .map_err(|e| format!("the async threads: {e}"))?;
        let lag = started.elapsed();
        if lag > READY_LAG {
            return Err(format!("the async threads: a task waited {lag:?} to run (the bound is {READY_LAG:?})"));
        }
        // At most one durable write a second, however often `/readyz` (open
        // to anyone) is asked: a recent success stands.
        let last_write = self.store_ready_ms.load(std::sync::atomic::Ordering::Acquire);
        if now_ms().saturating_sub(last_write) >= 1000 {
            tokio::time::timeout(READY_CHECK, self.registry.store_writable())
                .await
                .map_err(bounded("the store"))?
                .map_err(|e| format!("the store: {e}"))?;
            self.store_ready_ms.store(now_ms(), std::sync::atomic::Ordering::Release);
        }
        if self.cluster.is_some() {
            // The chores (heartbeat, mirror, reclaim) tick every 100 ms.
            let beat = self.chores_beat.load(std::sync::atomic::Ordering::Acquire);
            let since = now_ms().saturating_sub(beat);
            if beat > 0 && since > READY_CHORES_MS {
                return Err(format!("the cluster chores have not run for {since} ms"));
            }
        }
        if let Some(cluster) = &self.cluster {
            tokio::time::timeout(READY_CHECK, cluster.queue.queued())
                .await
                .map_err(bounded("Redis"))?
                .map_err(|e| format!("Redis: {e}"))?;
        }
        Ok(())
    }

    /// This node's id in its cluster (None when it runs alone).
    /// End the background chores and wait (at most `bound`) until each has.
    async fn join_chores(&self, bound: Duration) {
        self.stop_chores.send_replace(true);
        let chores = std::mem::take(&mut *self.chores.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let deadline = tokio::time::Instant::now() + bound;
        for (name, chore) in chores {
            if tokio::time::timeout_at(deadline, chore).await.is_err() {
                tracing::warn!(chore = name, "a background chore did not end in time; left behind");
            }
        }
    }

    /// Background chores running now (none once the node has stopped).
    pub fn chores_running(&self) -> usize {
        let chores = self.chores.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        chores.iter().filter(|(_, chore)| !chore.is_finished()).count()
    }

    pub fn cluster_id(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.id())
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Calls running now.
    pub fn executor_busy(&self) -> u32 {
        self.executor.busy()
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        self.executor.runtime()
    }

    /// The HTTP API.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        api::router(self.clone())
    }

    /// Serve `/metrics` without a token (and `/healthz`) on `listener`, a
    /// separate address for a scraper, until the process ends.
    pub async fn serve_metrics(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        axum::serve(listener, api::metrics_router(self.clone())).await
    }

    /// Create `tenant` if it does not exist; returns its new token, or None
    /// when it existed.
    pub async fn create_tenant(&self, tenant: &str) -> Result<Option<String>, ApiError> {
        names::check_name("tenant", tenant)?;
        let token = auth::new_tenant_token(tenant);
        let record = TenantRecord {
            name: tenant.to_string(),
            token_sha256: hex::encode(auth::hash_token(&token)),
            created_ms: now_ms(),
            limits: Default::default(),
            previous_tokens: Vec::new(),
            deleting_since_ms: None,
            secrets: Default::default(),
        };
        if self.registry.tenant(tenant).is_some_and(|t| t.deleting_since_ms.is_some()) {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!("tenant `{tenant}` is being deleted; create it again once it is gone"),
            ));
        }
        Ok(self.registry.create_tenant(record).await?.then_some(token))
    }

    /// Deploy `wasm` as `tenant/name`: compile (or reuse), persist, publish.
    pub async fn deploy(
        &self,
        tenant: &str,
        name: &str,
        wasm: &[u8],
        spec: DeploySpec,
    ) -> Result<FunctionRecord, ApiError> {
        names::check_name("tenant", tenant)?;
        names::check_name("function", name)?;
        if !self.registry.tenant_active(tenant) {
            // In a cluster the tenant may have been created on another
            // node a moment ago: read the registry before saying no.
            if self.cluster.is_some() {
                self.registry.mirror(true, self.config.log_lines_per_function).await?;
            }
            if !self.registry.tenant_active(tenant) {
                return Err(ApiError::not_found(format!("tenant `{tenant}` does not exist; create it first")));
            }
        }
        // A new name counts against the tenant's functions (a redeploy
        // does not): checked before any compile work.
        let max = self.config.max_functions_per_tenant;
        if self.registry.get(tenant, name).is_none() && self.registry.n_functions_of(tenant) >= max {
            return Err(ApiError::new(
                ErrorKind::LimitExceeded,
                format!("tenant `{tenant}` has {max} functions, its limit; remove one first"),
            ));
        }
        // Compiled and loaded in the tenant's turns, the deploy-time guest
        // code on the call pool (never on a thread that serves HTTP).
        let allowed = shoal_runtime::AllowList::parse(&spec.allowed_hosts).map_err(ApiError::bad_request)?;
        // A tenant names only public hosts, or addresses the operator opened.
        let opened = &self.runtime().config().outbound;
        if let Some(closed) = allowed.non_public_addresses().into_iter().find(|a| !opened.is_open(*a)) {
            return Err(ApiError::bad_request(format!(
                "allowed host {closed} is not a public address, and the operator has not opened it to functions (shoal serve --outbound-open)"
            )));
        }
        let secrets = self.secrets_of(tenant).unwrap_or_default();
        for name in &spec.secrets {
            secrets::check_secret_name(name)?;
            if !secrets.contains_key(name) {
                return Err(ApiError::bad_request(format!(
                    "tenant `{tenant}` has no secret {name}; set it first (shoal secret set {tenant} {name})"
                )));
            }
            if spec.env.iter().any(|(env, _)| env == name) {
                return Err(ApiError::bad_request(format!("{name} is both an env var and a secret of this deploy")));
            }
        }
        let options = LoadOptions { snapshot: spec.snapshot, tenant: Some(Arc::from(tenant)) };
        let (runtime, bytes) = (self.runtime().clone(), wasm.to_vec());
        let load = self.executor.on_pool(async move { runtime.load_with(&bytes, &options).await }).await;
        let image = load.map_err(|e| ApiError::internal("loading a function", e))??;
        let declared = image.declared().memory_bytes;
        if declared > spec.memory_bytes {
            let (kind, what) = if shoal_runtime::SourceBundle::is_bundle(wasm) {
                (ErrorKind::InvalidSource, "the function's snapshot (its runtime's memory after loading it) is")
            } else if image.is_snapshot() {
                (ErrorKind::InvalidWasm, "the memory `init` left is")
            } else {
                (ErrorKind::InvalidWasm, "the binary declares")
            };
            return Err(ApiError::new(
                kind,
                format!(
                    "{what} {} KiB of memory at start, over this function's limit of {} KiB (memory_mb)",
                    declared >> 10,
                    spec.memory_bytes >> 10
                ),
            ));
        }
        let kind = image.kind();
        if (spec.public || spec.http) && kind != shoal_runtime::FunctionKind::Http {
            return Err(ApiError::bad_request(format!(
                "{} is for HTTP functions (wasi:http components, or Python or JavaScript that answers requests: \
                 `on_fetch(request)`, `export default {{ fetch(request) }}`); this is a {} function",
                if spec.http { "http=true" } else { "access=public" },
                kind.as_str()
            )));
        }
        let record = FunctionRecord {
            tenant: tenant.to_string(),
            name: name.to_string(),
            kind: kind.as_str().to_string(),
            snapshot: image.is_snapshot(),
            sha256: image.sha256_hex(),
            size_bytes: wasm.len(),
            memory_bytes: spec.memory_bytes,
            timeout_ms: spec.timeout.as_millis() as u64,
            env: spec.env,
            deployed_ms: now_ms(),
            allowed_hosts: allowed.entries(),
            public: spec.public,
            secrets: spec.secrets,
            // The registry gives it the next number.
            version: 0,
        };
        let trail = self.registry.trail_for(tenant, name, self.config.log_lines_per_function);
        let function = DeployedFunction::new(record, image, trail);
        let function = self.registry.deploy(function, wasm, self.config.max_versions).await?;
        self.collect_orphans();
        function.touch(self.use_clock.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        self.took_image(&function);
        self.metrics.record_deploy();
        tracing::info!(%tenant, function = %name, sha256 = %function.record.sha256, "deployed");
        Ok(function.record.clone())
    }

    /// Deploy `functions` under `tenant` with default limits, creating the
    /// tenant if needed; a function already deployed with the same bytes is
    /// left as it is. Each is left unloaded after its deploy, as a restart
    /// leaves it: defaults nobody calls hold no memory.
    pub async fn deploy_defaults(&self, tenant: &str, functions: &[(&str, &[u8])]) -> Result<(), ApiError> {
        self.deploy_defaults_with(tenant, functions, false).await
    }

    /// [`Node::deploy_defaults`], each taking a snapshot at deploy or not.
    pub async fn deploy_defaults_with(
        &self,
        tenant: &str,
        functions: &[(&str, &[u8])],
        snapshot: bool,
    ) -> Result<(), ApiError> {
        let spec = DeploySpec { snapshot, ..DeploySpec::defaults(&self.config) };
        self.deploy_defaults_as(tenant, functions, &spec).await
    }

    /// [`Node::deploy_defaults`] for HTTP functions anyone may call.
    pub async fn deploy_public_defaults(&self, tenant: &str, functions: &[(&str, &[u8])]) -> Result<(), ApiError> {
        let spec = DeploySpec { public: true, ..DeploySpec::defaults(&self.config) };
        self.deploy_defaults_as(tenant, functions, &spec).await
    }

    async fn deploy_defaults_as(
        &self,
        tenant: &str,
        functions: &[(&str, &[u8])],
        spec: &DeploySpec,
    ) -> Result<(), ApiError> {
        self.create_tenant(tenant).await?;
        let mut deployed = Vec::new();
        for (name, wasm) in functions {
            let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(wasm));
            // Source (Python, JavaScript) always starts from a snapshot.
            let source = shoal_runtime::SourceBundle::is_bundle(wasm);
            if self.registry.get(tenant, name).is_some_and(|f| {
                f.record.sha256 == sha
                    && (f.record.snapshot == spec.snapshot || source)
                    && f.record.public == spec.public
            }) {
                continue;
            }
            self.deploy(tenant, name, wasm, spec.clone()).await?;
            deployed.push(*name);
        }
        // Left as a restart leaves them: known, each loaded on its first
        // call (after all deploys, so that functions of one language
        // runtime share one preparation of it).
        for name in deployed {
            if let Some(function) = self.registry.get(tenant, name) {
                function.evict();
            }
        }
        Ok(())
    }

    /// Serve HTTP functions on `listener` (see `routes.rs`) until
    /// `shutdown` resolves, then let the exchanges in flight finish (up to
    /// the drain timeout). The connection limits are the API's
    /// (`config.http`). Stop this before [`Node::serve`] returns: that
    /// stops the runtime's clock, which ends calls at their deadlines.
    pub async fn serve_functions(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "serving HTTP functions");
        server::serve(self.clone(), routes::router(self.clone()), listener, shutdown).await
    }

    /// Serve the API on `listener` until `shutdown` resolves, then finish
    /// the requests in flight (up to the drain timeout) and stop the
    /// runtime's threads. Connection limits are `config.http`.
    pub async fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "serving");
        // From the shutdown signal on, take no more asynchronous calls from
        // the cluster's queue.
        let cluster = self.cluster.clone();
        let node = self.clone();
        let shutdown = async move {
            shutdown.await;
            node.draining.store(true, std::sync::atomic::Ordering::Release);
            if let Some(cluster) = cluster {
                cluster.stopping.store(true, std::sync::atomic::Ordering::Release);
                // Peers stop placing calls here at their next refresh.
                cluster.membership.report_load(shoal_cluster::Load { running: 0, capacity: 0 });
            }
        };
        server::serve(self.clone(), self.router(), listener, shutdown).await?;
        // Calls cancelled by the end of the drain stop at their next epoch
        // check: keep the epoch ticking until they have (bounded). The
        // asynchronous calls this node took get the same time to finish.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let async_running =
            || self.cluster.as_ref().map_or(0, |c| c.async_running.load(std::sync::atomic::Ordering::Acquire));
        while (self.executor.busy() > 0 || async_running() > 0) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(cluster) = &self.cluster {
            cluster.stopping.store(true, std::sync::atomic::Ordering::Release);
            if let Err(e) = cluster.membership.leave().await {
                tracing::warn!(error = %e, "leaving the cluster failed; this node's heartbeat runs out by itself");
            }
            // Calls it took and did not finish go back to the queue now,
            // rather than when the others notice it left.
            match cluster.queue.requeue_from(cluster.id()).await {
                Ok(Some(n)) if n > 0 => tracing::info!(calls = n, "requeued unfinished asynchronous calls"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "requeueing this node's calls failed; the others will"),
            }
        }
        self.join_chores(Duration::from_secs(5)).await;
        if let Err(e) = self.flush_usage().await {
            tracing::warn!(error = %e, "writing the last usage failed; it is lost");
        }
        self.runtime().shutdown();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Connect to the cluster's Redis: check the admin token is the cluster's,
/// get the node-to-node secret, join with a fresh id.
async fn join_cluster(
    config: &NodeConfig,
    url: &str,
    admin_token: &str,
    capacity: u32,
) -> Result<(shoal_cluster::SharedRegistry, Arc<cluster::Cluster>), StartError> {
    use shoal_cluster::{CallQueue, Forwarder, Member, Membership, MembershipConfig, SharedRegistry};
    let conn = shoal_cluster::connect(url, Duration::from_secs(2)).await?;
    let shared = SharedRegistry::new(conn.clone(), &config.cluster_prefix);
    shared.claim_admin(&hex::encode(auth::hash_token(admin_token))).await?;
    let secret = shared.secret().await?;
    let advertise = config.advertise.clone().unwrap_or_else(|| config.listen.to_string());
    let membership_config = MembershipConfig {
        ttl: config.heartbeat_ttl,
        prefix: config.cluster_prefix.clone(),
        ..MembershipConfig::new(url)
    };
    // Joined with no capacity: peers place nothing here until the node is
    // ready to run calls and reports its capacity.
    let membership = Membership::join(membership_config, Member::new(new_call_id(), advertise)).await?;
    let forwarder = Forwarder::new(&secret, Duration::from_secs(1), config.max_body_bytes + (64 << 10))
        .map_err(StartError::Config)?;
    let usage = shoal_cluster::SharedUsage::new(conn.clone(), &config.cluster_prefix);
    let triggers = shoal_cluster::SharedTriggers::new(conn.clone(), &config.cluster_prefix);
    let queues = shoal_cluster::SharedQueues::new(conn.clone(), &config.cluster_prefix);
    let queue = CallQueue::new(conn, &config.cluster_prefix)
        .with_kept_limits(config.max_async_records_per_tenant, config.max_async_output_bytes_per_tenant);
    // Leases an older version of the node left are found once (by a scan
    // of the keyspace, while no marker says it was done); failing that,
    // the next start tries again.
    match queue.adopt_older_leases().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(nodes = n, "found the call leases of nodes of an older version"),
        Err(e) => tracing::warn!(error = %e, "looking for call leases of an older version failed"),
    }
    let capacity = if config.gateway { 0 } else { capacity };
    let mut cluster = cluster::Cluster::new(shared.clone(), membership, queue, forwarder, secret, capacity);
    cluster.usage = Some(usage);
    cluster.triggers = Some(triggers);
    cluster.queues = Some(queues);
    Ok((shared, Arc::new(cluster)))
}
