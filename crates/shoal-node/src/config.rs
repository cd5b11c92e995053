//! The node's typed configuration: every limit the node enforces, with its
//! default. The binary fills it (defaults < file < env < flags); the node
//! never reads settings itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A setting that must not be printed: its `Debug` says `<redacted>`, so
/// a configuration logged or shown in an error keeps it out.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_string())
    }
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    /// Connection-level limits: connections, header and body timeouts,
    /// header and URL sizes.
    pub http: crate::HttpLimits,
    pub data_dir: PathBuf,
    /// Admin token; generated into `<data_dir>/admin.token` when unset.
    pub admin_token: Option<Secret>,
    /// Largest invoke request body and response body. Default 6 MiB.
    pub max_body_bytes: usize,
    /// Where HTTP functions are served (`Node::serve_functions` is given
    /// its listener; this is what their URLs name). Default none.
    pub http_listen: Option<SocketAddr>,
    /// HTTP functions are also reached by host: `{name}.{tenant}.{domain}`.
    pub http_domain: Option<String>,
    /// Largest request body an HTTP function is sent, counted as it
    /// streams. Default 64 MiB.
    pub http_max_body_bytes: u64,
    /// Non-public addresses (loopback, private, link-local) functions'
    /// outbound HTTP may reach when their deploy names them; no other
    /// non-public address can be named. Default none.
    pub outbound_open: Vec<std::net::IpAddr>,
    /// Largest wasm binary a deploy accepts. Default 64 MiB.
    pub max_module_bytes: usize,
    /// Limits a function gets when its deploy names none.
    pub default_timeout: Duration,
    pub default_memory_bytes: u64,
    /// The most a deploy may ask for.
    pub max_timeout: Duration,
    pub max_memory_bytes: u64,
    /// Env vars per function and bytes of all of them. Defaults 64, 64 KiB.
    pub max_env_vars: usize,
    /// Functions one tenant may have deployed at once. Default 1,000.
    pub max_functions_per_tenant: usize,
    /// Cron triggers one tenant may have. Default 100.
    pub max_triggers_per_tenant: usize,
    /// What a tenant may keep in queues, and the sizes of what it sends.
    pub queue_limits: crate::QueueLimits,
    /// Versions of a function kept (the newest; older ones are collected
    /// at the next deploy unless an alias routes calls to them). Default 10.
    pub max_versions: usize,
    pub max_env_bytes: usize,
    /// Sandboxes in use at once (every running call, chained ones
    /// included). Default 1,000.
    pub max_concurrent_calls: u32,
    /// Admission, fairness and the running limit of client and
    /// asynchronous calls (never above `max_concurrent_calls`). Default:
    /// 4 running per core.
    pub scheduler: shoal_sched::PolicyConfig,
    /// Tenants' shares of the node's CPU when they compete (weight 1 for
    /// any tenant not named).
    pub tenant_weights: Vec<(String, u32)>,
    /// Sum of the memory limits of the calls running at once (every
    /// tenant's, chained calls included); a call that would pass it is
    /// refused. Default: half of the machine's memory.
    pub call_memory_bytes: u64,
    /// Sandboxes one tenant's calls (roots and their children) hold at
    /// once. Default (None): half of `max_concurrent_calls`.
    pub tenant_sandboxes: Option<u32>,
    /// Sum of the memory limits of one tenant's running calls. Default
    /// (None): half of `call_memory_bytes`.
    pub tenant_call_memory_bytes: Option<u64>,
    /// Function images (compiled, pre-linked code) kept loaded; past it the
    /// least recently used idle ones are dropped and reloaded from the
    /// compiled cache (no compiling) when next called. Default 4,096 (an
    /// image of the `hello` example is ~236 KiB resident: ~1 GiB).
    pub max_loaded_images: usize,
    /// Concurrent compilations (at a lower priority than calls), shared
    /// round robin by tenant, one tenant holding at most all but one of
    /// them. Default 2.
    pub compile_concurrency: usize,
    /// The longest a deploy waits for its compile. Default 60 s.
    pub compile_timeout: Duration,
    /// Log lines kept per function. Default 1,000.
    pub log_lines_per_function: usize,
    /// Longest chain of calls; spawned calls not yet awaited per root
    /// call. Defaults 16, 1,000.
    pub max_call_depth: u32,
    pub max_spawns_per_root: u32,
    /// Asynchronous calls accepted and not finished; more are refused with
    /// 429. Default 10,000.
    pub max_async_calls: usize,
    /// Asynchronous calls of one tenant accepted and not finished on this
    /// node; more of its calls are refused with 429, the other tenants'
    /// still accepted. Default (None): a quarter of `max_async_calls`.
    pub max_async_calls_per_tenant: Option<usize>,
    /// How long records of asynchronous calls are kept. Default 24 h.
    pub async_retention: Duration,
    /// How often each call's usage, summed in memory, is written to the
    /// store (what a crash can lose), and how long usage is kept.
    pub usage_flush: Duration,
    pub usage_retention: Duration,
    /// How many functions, and tenants, have metrics series of their own
    /// (the most used; the rest are counted as `other`). Default 100 each.
    pub metrics_functions: usize,
    pub metrics_tenants: usize,
    /// Where spans go (OTLP/HTTP, `http://host:4318`); None: no tracing.
    pub otlp_endpoint: Option<String>,
    /// The share of traces started here that are sampled (a call with a
    /// `traceparent` follows it). Default 1.
    pub trace_sample: f64,
    /// Where the console links a trace: a URL with `{trace_id}` in it.
    pub trace_link: Option<String>,
    /// Finished spans waiting for export, at most; more are dropped and
    /// counted. Default 8192.
    pub trace_queue: usize,
    /// A sampled call's state operations that take at least this long get
    /// spans. Default 1 ms.
    pub trace_state_ops_over: Duration,
    /// Records of asynchronous calls one tenant may keep on this node
    /// (queued, running, or finished and not yet expired); more of its
    /// calls are refused with 507. Default 100,000.
    pub max_async_records_per_tenant: usize,
    /// Bytes of outputs of asynchronous calls one tenant may keep on this
    /// node: a call whose output would pass it is recorded failed
    /// (`limit_exceeded`, the output dropped), and once it is reached the
    /// tenant's new calls are refused with 507. Default 1 GiB.
    pub max_async_output_bytes_per_tenant: u64,
    /// Cluster mode: with a Redis URL the node joins the cluster kept
    /// there (membership, registry, async calls) and its global state tier
    /// is that Redis; None (the default) runs alone on the embedded store
    /// in the data directory. (It may hold a password: never printed.)
    pub redis_url: Option<Secret>,
    /// Where the other nodes reach this one (`host:port`); default the
    /// listen address.
    pub advertise: Option<String>,
    /// Prefix of the cluster's keys in Redis. Default `shoal`.
    pub cluster_prefix: String,
    /// How long a node stays a member without heartbeats. Default 1 s.
    pub heartbeat_ttl: Duration,
    /// A gateway node of a cluster: it takes requests and places every
    /// call on the other nodes, running calls itself only when no other
    /// node can. Default false.
    pub gateway: bool,
    /// The shared Python runtime component Python functions run on (the
    /// `shoal` binary passes the one it is built with); none: Python
    /// deploys are refused.
    pub python_runtime: shoal_runtime::RuntimeBinary,
    /// The shared JavaScript runtime component, the same way.
    pub js_runtime: shoal_runtime::RuntimeBinary,
    /// Where compiled language runtimes are cached. Default: the data
    /// directory's compiled-artifact cache.
    pub runtime_cache_dir: Option<PathBuf>,
    /// Bytes of values the node's local state tier holds, every tenant's
    /// together (values not yet pushed and copies of the global tier's;
    /// copies are evicted to make room). Default: an eighth of the
    /// machine's memory.
    pub local_tier_bytes: u64,
    /// Bytes of one tenant's values in the local tier. Default (None): a
    /// quarter of `local_tier_bytes`.
    pub tenant_local_bytes: Option<u64>,
    /// Largest state value and bytes of state per tenant. Defaults 64 MiB, 1 GiB.
    pub max_state_value_bytes: u64,
    pub state_quota_bytes: u64,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            http: crate::HttpLimits::default(),
            data_dir: data_dir.into(),
            admin_token: None,
            max_body_bytes: (6 * MIB) as usize,
            http_listen: None,
            http_domain: None,
            http_max_body_bytes: 64 * MIB,
            outbound_open: Vec::new(),
            max_module_bytes: (64 * MIB) as usize,
            default_timeout: Duration::from_secs(5),
            default_memory_bytes: 64 * MIB,
            max_timeout: Duration::from_secs(900),
            max_memory_bytes: 256 * MIB,
            max_env_vars: 64,
            max_functions_per_tenant: 1000,
            max_triggers_per_tenant: 100,
            max_versions: 10,
            queue_limits: crate::QueueLimits::default(),
            max_env_bytes: 64 << 10,
            max_concurrent_calls: 1000,
            scheduler: shoal_sched::PolicyConfig::new(
                std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
            ),
            tenant_weights: Vec::new(),
            call_memory_bytes: machine_memory_bytes().map_or(8 << 30, |total| total / 2),
            tenant_sandboxes: None,
            tenant_call_memory_bytes: None,
            max_loaded_images: 4096,
            compile_concurrency: 2,
            compile_timeout: Duration::from_secs(60),
            log_lines_per_function: 1000,
            max_call_depth: 16,
            max_spawns_per_root: 1000,
            max_async_calls: 10_000,
            max_async_calls_per_tenant: None,
            async_retention: Duration::from_secs(24 * 3600),
            usage_flush: Duration::from_secs(10),
            usage_retention: Duration::from_secs(31 * 24 * 3600),
            metrics_functions: 100,
            metrics_tenants: 100,
            otlp_endpoint: None,
            trace_sample: 1.0,
            trace_link: None,
            trace_queue: 8192,
            trace_state_ops_over: Duration::from_millis(1),
            max_async_records_per_tenant: 100_000,
            max_async_output_bytes_per_tenant: 1 << 30,
            redis_url: None,
            advertise: None,
            cluster_prefix: "shoal".into(),
            heartbeat_ttl: Duration::from_secs(1),
            gateway: false,
            python_runtime: shoal_runtime::RuntimeBinary::default(),
            js_runtime: shoal_runtime::RuntimeBinary::default(),
            runtime_cache_dir: None,
            local_tier_bytes: machine_memory_bytes().map_or(GIB, |total| total / 8),
            tenant_local_bytes: None,
            max_state_value_bytes: 64 * MIB,
            state_quota_bytes: 1024 * MIB,
        }
    }

    /// What the node's and each tenant's running calls may hold (the
    /// defaults derived from the node's limits where unset).
    pub fn sandbox_limits(&self) -> shoal_sched::SandboxLimits {
        let derived = shoal_sched::SandboxLimits::derived(self.max_concurrent_calls, self.call_memory_bytes);
        shoal_sched::SandboxLimits {
            tenant_sandboxes: self.tenant_sandboxes.unwrap_or(derived.tenant_sandboxes),
            tenant_memory_bytes: self.tenant_call_memory_bytes.unwrap_or(derived.tenant_memory_bytes),
            ..derived
        }
    }

    /// What the local state tier may hold.
    pub fn local_limits(&self) -> shoal_state::LocalLimits {
        let derived = shoal_state::LocalLimits::derived(self.local_tier_bytes);
        shoal_state::LocalLimits { tenant_bytes: self.tenant_local_bytes.unwrap_or(derived.tenant_bytes), ..derived }
    }

    /// Check the settings once, at start.
    pub fn validate(&self) -> Result<(), String> {
        self.http.validate()?;
        if let Some((tenant, _)) = self.tenant_weights.iter().find(|(_, w)| *w == 0 || *w > 1000) {
            return Err(format!("the weight of tenant `{tenant}` must be 1 to 1000"));
        }
        if self.default_timeout > self.max_timeout || self.default_timeout.is_zero() {
            return Err(format!(
                "default timeout {:?} must be positive and at most the maximum {:?}",
                self.default_timeout, self.max_timeout
            ));
        }
        if self.default_memory_bytes > self.max_memory_bytes || self.default_memory_bytes < 65536 {
            return Err(format!(
                "default memory {} must be at least one wasm page and at most the maximum {}",
                self.default_memory_bytes, self.max_memory_bytes
            ));
        }
        if self.gateway && self.redis_url.is_none() {
            return Err("a gateway places calls on the other nodes of a cluster: it needs a Redis URL".into());
        }
        if self.call_memory_bytes < self.max_memory_bytes {
            return Err(format!(
                "the node's call memory {} MiB must hold at least one call of the largest memory limit ({} MiB)",
                self.call_memory_bytes >> 20,
                self.max_memory_bytes >> 20
            ));
        }
        if self.tenant_sandboxes == Some(0) || self.tenant_call_memory_bytes.is_some_and(|m| m < self.max_memory_bytes)
        {
            return Err(
                "a tenant's sandboxes must be at least 1 and its call memory at least the largest memory limit".into(),
            );
        }
        if self.max_concurrent_calls == 0 {
            return Err("max_concurrent_calls must be at least 1".into());
        }
        if let Some(token) = &self.admin_token
            && token.expose().len() < 16
        {
            return Err("the admin token must be at least 16 characters".into());
        }
        Ok(())
    }
}

/// The machine's memory (Linux: `MemTotal` of /proc/meminfo).
fn machine_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
