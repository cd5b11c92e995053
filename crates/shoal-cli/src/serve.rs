//! `shoal serve`: one node. Settings come from defaults, then an optional
//! TOML file (`--config`), then `SHOAL_*` env vars, then flags; they are
//! checked once before anything starts.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use shoal_node::{Node, NodeConfig};

use crate::units::{parse_duration, parse_size};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML file of settings (same names as the flags, with underscores).
    #[arg(long, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (a loopback address unless --public).
    #[arg(long, env = "SHOAL_LISTEN")]
    listen: Option<SocketAddr>,
    /// Allow listening on an address other machines can reach. Off by
    /// default: a node should be exposed on purpose, behind TLS.
    #[arg(long, env = "SHOAL_PUBLIC")]
    public: bool,
    /// Also serve `/metrics` with no token on this address, for a scraper
    /// (loopback unless --public). On the API, `/metrics` needs the admin
    /// token.
    #[arg(long, env = "SHOAL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// How many functions (default 100) and tenants (100) have metrics
    /// series of their own: the most used; the rest are counted as `other`.
    #[arg(long, env = "SHOAL_METRICS_FUNCTIONS")]
    metrics_functions: Option<usize>,
    #[arg(long, env = "SHOAL_METRICS_TENANTS")]
    metrics_tenants: Option<usize>,
    /// Export spans of every call over OTLP/HTTP to this collector
    /// (http://host:4318). Default: no tracing.
    #[arg(long, env = "SHOAL_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The share of new traces sampled, 0 to 1 (default 1); a request
    /// with a `traceparent` follows its flag.
    #[arg(long, env = "SHOAL_TRACE_SAMPLE")]
    trace_sample: Option<f64>,
    /// Where the console links a trace id to: a URL with `{trace_id}`,
    /// e.g. http://127.0.0.1:16686/trace/{trace_id} for Jaeger.
    #[arg(long, env = "SHOAL_TRACE_LINK")]
    trace_link: Option<String>,
    /// State operations of a sampled call that take at least this long
    /// get spans (default 1ms).
    #[arg(long, env = "SHOAL_TRACE_STATE_OVER", value_parser = parse_duration)]
    trace_state_over: Option<Duration>,
    /// Where HTTP functions are served, at /TENANT/NAME/…; `off` for
    /// nowhere. Default: the --listen address with the next port
    /// (127.0.0.1:8081), a free port when --listen's is 0.
    #[arg(long, env = "SHOAL_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Also route HTTP functions by host: NAME.TENANT.DOMAIN.
    #[arg(long, env = "SHOAL_HTTP_DOMAIN")]
    http_domain: Option<String>,
    /// Largest request body an HTTP function is sent, counted as it
    /// streams, e.g. 64MiB.
    #[arg(long, env = "SHOAL_HTTP_MAX_BODY", value_parser = parse_size)]
    http_max_body: Option<u64>,
    /// A non-public address (loopback, private, link-local) functions'
    /// outbound HTTP may reach when their deploy names it; repeatable.
    /// None by default: tenants reach public addresses only.
    #[arg(long = "outbound-open", env = "SHOAL_OUTBOUND_OPEN", value_delimiter = ',')]
    outbound_open: Vec<std::net::IpAddr>,
    /// Connections served at once; past it new ones are answered 503.
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Time a client has to send a whole request head, e.g. 10s.
    #[arg(long, env = "SHOAL_HEADER_READ_TIMEOUT", value_parser = parse_duration)]
    header_read_timeout: Option<Duration>,
    /// A connection moving no bytes, with no request being handled, is
    /// closed after this long, e.g. 60s.
    #[arg(long, env = "SHOAL_IDLE_TIMEOUT", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Slowest average request body accepted after the first 10 s, bytes
    /// per second, e.g. 64KiB.
    #[arg(long, env = "SHOAL_MIN_BODY_RATE", value_parser = parse_size)]
    min_body_rate: Option<u64>,
    /// Where the registry, the compiled-artifact cache and the admin token live.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where compiled language runtimes (the shared Python and JavaScript
    /// runtimes) are cached: by default the user's cache,
    /// $XDG_CACHE_HOME/shoal/runtimes or ~/.cache/shoal/runtimes, shared
    /// by every node the user starts on this machine, so they are compiled
    /// once, not per data directory (DATA_DIR/cache when there is no home,
    /// or that directory is not the user's alone).
    #[arg(long, env = "SHOAL_RUNTIME_CACHE")]
    runtime_cache: Option<PathBuf>,
    /// Largest invoke request and response body, e.g. 6MiB.
    #[arg(long, env = "SHOAL_MAX_BODY", value_parser = parse_size)]
    max_body: Option<u64>,
    /// Largest wasm binary a deploy accepts, e.g. 64MiB.
    #[arg(long, env = "SHOAL_MAX_MODULE", value_parser = parse_size)]
    max_module: Option<u64>,
    /// Calls running at once; each holds one sandbox.
    #[arg(long, env = "SHOAL_MAX_CONCURRENT_CALLS")]
    max_concurrent_calls: Option<u32>,
    /// Limits of a function whose deploy sets none.
    #[arg(long, env = "SHOAL_DEFAULT_TIMEOUT", value_parser = parse_duration)]
    default_timeout: Option<Duration>,
    #[arg(long, env = "SHOAL_DEFAULT_MEMORY", value_parser = parse_size)]
    default_memory: Option<u64>,
    /// How long usage (`shoal usage`) is kept, e.g. 90d (default 31d).
    #[arg(long, env = "SHOAL_USAGE_RETENTION", value_parser = parse_duration)]
    usage_retention: Option<Duration>,
    /// How often usage is written to the store (default 10s): a crash
    /// loses at most this much of it.
    #[arg(long, env = "SHOAL_USAGE_FLUSH", value_parser = parse_duration)]
    usage_flush: Option<Duration>,
    /// Run as a node of the cluster kept in this Redis (redis://host:port):
    /// shared registry, async calls and global state tier there, calls
    /// placed across the nodes. Without it the node runs alone on the
    /// embedded store in the data directory.
    #[arg(long, env = "SHOAL_REDIS")]
    redis: Option<String>,
    /// Where the other nodes of the cluster reach this one (host:port);
    /// default the address it listens on.
    #[arg(long, env = "SHOAL_ADVERTISE")]
    advertise: Option<String>,
    /// With --redis: take requests and place every call on the other
    /// nodes (running calls itself only when no other node can).
    #[arg(long, env = "SHOAL_GATEWAY")]
    gateway: bool,
    /// Largest state value, e.g. 64MiB.
    #[arg(long, env = "SHOAL_MAX_STATE_VALUE", value_parser = parse_size)]
    max_state_value: Option<u64>,
    /// Bytes of state each tenant may keep, e.g. 1GiB.
    #[arg(long, env = "SHOAL_STATE_QUOTA", value_parser = parse_size)]
    state_quota: Option<u64>,
    /// A tenant's share of the CPU when tenants compete, TENANT=WEIGHT
    /// (default 1 each); repeatable.
    #[arg(long = "tenant-weight", value_parser = parse_weight)]
    tenant_weights: Vec<(String, u32)>,
    /// Sum of the memory limits of the calls running at once, all
    /// tenants, e.g. 8GiB (default: half of the machine's memory).
    #[arg(long, env = "SHOAL_CALL_MEMORY", value_parser = parse_size)]
    call_memory: Option<u64>,
    /// Root calls of one tenant running at once while no other tenant
    /// waits (default: 3 per core, never all of the node's 4 per core).
    #[arg(long, env = "SHOAL_TENANT_RUNNING")]
    tenant_running: Option<u32>,
    /// Sandboxes one tenant's calls (and their children) hold at once
    /// (default: half of --max-concurrent-calls).
    #[arg(long, env = "SHOAL_TENANT_SANDBOXES")]
    tenant_sandboxes: Option<u32>,
    /// Sum of the memory limits of one tenant's running calls, e.g. 4GiB
    /// (default: half of --call-memory).
    #[arg(long, env = "SHOAL_TENANT_CALL_MEMORY", value_parser = parse_size)]
    tenant_call_memory: Option<u64>,
    /// Bytes of values the local state tier holds, every tenant's
    /// together, e.g. 2GiB (default: an eighth of the machine's memory).
    #[arg(long, env = "SHOAL_LOCAL_TIER_MEMORY", value_parser = parse_size)]
    local_tier_memory: Option<u64>,
    /// Bytes of one tenant's values in the local state tier (default: a
    /// quarter of --local-tier-memory).
    #[arg(long, env = "SHOAL_TENANT_LOCAL_MEMORY", value_parser = parse_size)]
    tenant_local_memory: Option<u64>,
    /// Function images kept loaded; past it the least recently used idle
    /// ones are dropped and reloaded from the compiled cache when called.
    #[arg(long, env = "SHOAL_MAX_LOADED_IMAGES")]
    max_loaded_images: Option<usize>,
    /// Functions one tenant may have deployed at once (default 1000).
    #[arg(long, env = "SHOAL_MAX_FUNCTIONS_PER_TENANT")]
    max_functions_per_tenant: Option<usize>,
    /// Cron triggers one tenant may have (default 100).
    #[arg(long, env = "SHOAL_MAX_TRIGGERS_PER_TENANT")]
    max_triggers_per_tenant: Option<usize>,
    /// Versions of a function kept (default 10; older ones go at the next
    /// deploy unless an alias routes calls to them).
    #[arg(long, env = "SHOAL_MAX_VERSIONS")]
    max_versions: Option<usize>,
    /// Records of asynchronous calls one tenant may keep (default 100000;
    /// finished ones expire after the retention time).
    #[arg(long, env = "SHOAL_TENANT_ASYNC_RECORDS")]
    tenant_async_records: Option<usize>,
    /// Bytes of asynchronous calls' outputs one tenant may keep (default 1GiB).
    #[arg(long, env = "SHOAL_TENANT_ASYNC_OUTPUT", value_parser = parse_size)]
    tenant_async_output: Option<u64>,
    /// Do not deploy the example functions under tenant `demo`.
    #[arg(long)]
    no_examples: bool,
}

/// The `--config` file. Every field is optional; unknown fields are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    listen: Option<SocketAddr>,
    public: Option<bool>,
    metrics_listen: Option<SocketAddr>,
    metrics_functions: Option<usize>,
    metrics_tenants: Option<usize>,
    otlp_endpoint: Option<String>,
    trace_sample: Option<f64>,
    trace_link: Option<String>,
    trace_state_over: Option<String>,
    trace_queue: Option<usize>,
    http_listen: Option<String>,
    http_domain: Option<String>,
    http_max_body: Option<String>,
    outbound_open: Option<Vec<std::net::IpAddr>>,
    max_connections: Option<usize>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    min_body_rate: Option<String>,
    data_dir: Option<PathBuf>,
    max_body: Option<String>,
    max_module: Option<String>,
    max_concurrent_calls: Option<u32>,
    max_loaded_images: Option<usize>,
    max_functions_per_tenant: Option<usize>,
    max_triggers_per_tenant: Option<usize>,
    max_versions: Option<usize>,
    tenant_async_records: Option<usize>,
    tenant_async_output: Option<String>,
    default_timeout: Option<String>,
    default_memory: Option<String>,
    usage_retention: Option<String>,
    usage_flush: Option<String>,
    redis: Option<String>,
    advertise: Option<String>,
    gateway: Option<bool>,
    tenant_weights: Option<std::collections::BTreeMap<String, u32>>,
    call_memory: Option<String>,
    tenant_running: Option<u32>,
    tenant_sandboxes: Option<u32>,
    tenant_call_memory: Option<String>,
    local_tier_memory: Option<String>,
    tenant_local_memory: Option<String>,
    max_state_value: Option<String>,
    state_quota: Option<String>,
    examples: Option<bool>,
}

fn parse_weight(text: &str) -> Result<(String, u32), String> {
    let (tenant, weight) = text.split_once('=').ok_or_else(|| format!("{text:?} is not TENANT=WEIGHT"))?;
    let weight = weight.parse().map_err(|_| format!("weight {weight:?} is not a whole number"))?;
    Ok((tenant.to_string(), weight))
}

fn size(text: &str) -> anyhow::Result<usize> {
    let bytes = parse_size(text).map_err(anyhow::Error::msg)?;
    usize::try_from(bytes).context("size does not fit this machine")
}

/// The node's settings, whether to deploy the examples, and the metrics
/// listener's address.
fn node_config(args: &ServeArgs) -> anyhow::Result<(NodeConfig, bool, Option<SocketAddr>)> {
    let file: ServeFile = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => ServeFile::default(),
    };
    let data_dir = args.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from(".shoal"));
    let mut config = NodeConfig::new(data_dir);
    config.python_runtime =
        shoal_runtime::RuntimeBinary::prehashed(shoal_guests::PYTHON_RUNTIME, shoal_guests::PYTHON_RUNTIME_SHA256);
    config.js_runtime =
        shoal_runtime::RuntimeBinary::prehashed(shoal_guests::JS_RUNTIME, shoal_guests::JS_RUNTIME_SHA256);
    config.runtime_cache_dir = args.runtime_cache.clone().or_else(|| {
        runtime_cache_under(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
            .map_err(|(dir, e)| {
                tracing::warn!(dir = %dir.display(), error = %e, "not sharing compiled runtimes through the user's cache; using the data directory's")
            })
            .ok()
    });
    config.admin_token = std::env::var("SHOAL_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()).map(Into::into);
    if let Some(listen) = args.listen.or(file.listen) {
        config.listen = listen;
    }
    let public = args.public || file.public.unwrap_or(false);
    anyhow::ensure!(
        public || config.listen.ip().is_loopback(),
        "refusing to listen on {}, which other machines can reach: pass --public (or `public = true`) to mean it",
        config.listen
    );
    let metrics_listen = args.metrics_listen.or(file.metrics_listen);
    if let Some(addr) = metrics_listen {
        anyhow::ensure!(
            public || addr.ip().is_loopback(),
            "refusing to serve metrics on {addr}, which other machines can reach: pass --public (or `public = true`) to mean it"
        );
    }
    config.http_listen = match args.http_listen.as_deref().or(file.http_listen.as_deref()) {
        Some("off") => None,
        Some(addr) => Some(addr.parse().with_context(|| format!("--http-listen {addr:?} is not an address or `off`"))?),
        None => {
            let (ip, port) = (config.listen.ip(), config.listen.port());
            Some(SocketAddr::new(
                ip,
                if port == 0 {
                    0
                } else {
                    port.checked_add(1).context("--listen's port is the last one: set --http-listen")?
                },
            ))
        }
    };
    if let Some(addr) = config.http_listen {
        anyhow::ensure!(
            public || addr.ip().is_loopback(),
            "refusing to serve HTTP functions on {addr}, which other machines can reach: pass --public (or `public = true`) to mean it"
        );
    }
    config.http_domain =
        args.http_domain.clone().or(file.http_domain.clone()).map(|d| d.trim_matches('.').to_ascii_lowercase());
    if let Some(text) = &file.http_max_body {
        config.http_max_body_bytes = parse_size(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(bytes) = args.http_max_body {
        config.http_max_body_bytes = bytes;
    }
    config.outbound_open = if args.outbound_open.is_empty() {
        file.outbound_open.clone().unwrap_or_default()
    } else {
        args.outbound_open.clone()
    };
    if let Some(n) = args.max_connections.or(file.max_connections) {
        config.http.max_connections = n;
    }
    if let Some(text) = &file.header_read_timeout {
        config.http.header_read_timeout = parse_duration(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(timeout) = args.header_read_timeout {
        config.http.header_read_timeout = timeout;
    }
    if let Some(text) = &file.idle_timeout {
        config.http.idle_timeout = parse_duration(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(timeout) = args.idle_timeout {
        config.http.idle_timeout = timeout;
    }
    if let Some(text) = &file.min_body_rate {
        config.http.min_body_rate = parse_size(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(rate) = args.min_body_rate {
        config.http.min_body_rate = rate;
    }
    if let Some(text) = &file.max_body {
        config.max_body_bytes = size(text)?;
    }
    if let Some(bytes) = args.max_body {
        config.max_body_bytes = usize::try_from(bytes)?;
    }
    if let Some(text) = &file.max_module {
        config.max_module_bytes = size(text)?;
    }
    if let Some(bytes) = args.max_module {
        config.max_module_bytes = usize::try_from(bytes)?;
    }
    if let Some(n) = args.max_concurrent_calls.or(file.max_concurrent_calls) {
        config.max_concurrent_calls = n;
    }
    if let Some(n) = args.max_functions_per_tenant.or(file.max_functions_per_tenant) {
        anyhow::ensure!(n > 0, "max_functions_per_tenant must be at least 1");
        config.max_functions_per_tenant = n;
    }
    if let Some(n) = args.max_triggers_per_tenant.or(file.max_triggers_per_tenant) {
        config.max_triggers_per_tenant = n;
    }
    if let Some(n) = args.max_versions.or(file.max_versions) {
        anyhow::ensure!(n > 0, "max_versions must be at least 1");
        config.max_versions = n;
    }
    if let Some(n) = args.tenant_async_records.or(file.tenant_async_records) {
        anyhow::ensure!(n > 0, "tenant_async_records must be at least 1");
        config.max_async_records_per_tenant = n;
    }
    if let Some(bytes) = args.tenant_async_output {
        config.max_async_output_bytes_per_tenant = bytes;
    } else if let Some(text) = &file.tenant_async_output {
        config.max_async_output_bytes_per_tenant = parse_size(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(n) = args.max_loaded_images.or(file.max_loaded_images) {
        anyhow::ensure!(n > 0, "max_loaded_images must be at least 1");
        config.max_loaded_images = n;
    }
    if let Some(text) = &file.default_timeout {
        config.default_timeout = parse_duration(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(timeout) = args.default_timeout {
        config.default_timeout = timeout;
    }
    if let Some(text) = &file.usage_retention {
        config.usage_retention = parse_duration(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(retention) = args.usage_retention {
        config.usage_retention = retention;
    }
    anyhow::ensure!(config.usage_retention >= Duration::from_secs(60), "usage_retention must be at least a minute");
    if let Some(n) = args.metrics_functions.or(file.metrics_functions) {
        config.metrics_functions = n;
    }
    if let Some(n) = args.metrics_tenants.or(file.metrics_tenants) {
        config.metrics_tenants = n;
    }
    config.otlp_endpoint = args.otlp_endpoint.clone().or(file.otlp_endpoint.clone());
    if let Some(link) = args.trace_link.clone().or(file.trace_link.clone()) {
        anyhow::ensure!(
            (link.starts_with("http://") || link.starts_with("https://")) && link.contains("{trace_id}"),
            "trace_link must be an http(s) URL holding {{trace_id}}, not {link:?}"
        );
        config.trace_link = Some(link);
    }
    if let Some(ratio) = args.trace_sample.or(file.trace_sample) {
        anyhow::ensure!((0.0..=1.0).contains(&ratio), "trace_sample must be between 0 and 1, not {ratio}");
        config.trace_sample = ratio;
    }
    if let Some(text) = &file.trace_state_over {
        config.trace_state_ops_over = parse_duration(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(over) = args.trace_state_over {
        config.trace_state_ops_over = over;
    }
    if let Some(n) = file.trace_queue {
        anyhow::ensure!(n > 0, "trace_queue must be at least 1");
        config.trace_queue = n;
    }
    if let Some(text) = &file.usage_flush {
        config.usage_flush = parse_duration(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(every) = args.usage_flush {
        config.usage_flush = every;
    }
    anyhow::ensure!(
        (Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&config.usage_flush),
        "usage_flush must be between 100ms and 1h"
    );
    if let Some(text) = &file.default_memory {
        config.default_memory_bytes = parse_size(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(bytes) = args.default_memory {
        config.default_memory_bytes = bytes;
    }
    config.redis_url = args.redis.clone().or(file.redis).filter(|url| !url.is_empty()).map(Into::into);
    config.advertise = args.advertise.clone().or(file.advertise).filter(|a| !a.is_empty());
    config.gateway = args.gateway || file.gateway.unwrap_or(false);
    if config.redis_url.is_some() && config.advertise.is_none() {
        anyhow::ensure!(
            !config.listen.ip().is_unspecified(),
            "listening on {} (every interface): pass --advertise HOST:PORT so the other nodes know where to reach this one",
            config.listen
        );
    }
    config.tenant_weights = file.tenant_weights.unwrap_or_default().into_iter().collect();
    for (tenant, weight) in &args.tenant_weights {
        config.tenant_weights.retain(|(t, _)| t != tenant);
        config.tenant_weights.push((tenant.clone(), *weight));
    }
    if let Some(text) = &file.call_memory {
        config.call_memory_bytes = parse_size(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(bytes) = args.call_memory {
        config.call_memory_bytes = bytes;
    }
    if let Some(n) = args.tenant_running.or(file.tenant_running) {
        anyhow::ensure!(n > 0, "tenant_running must be at least 1");
        config.scheduler.max_running_per_tenant = n;
    }
    config.tenant_sandboxes = args.tenant_sandboxes.or(file.tenant_sandboxes);
    if let Some(text) = &file.tenant_call_memory {
        config.tenant_call_memory_bytes = Some(parse_size(text).map_err(anyhow::Error::msg)?);
    }
    if let Some(bytes) = args.tenant_call_memory {
        config.tenant_call_memory_bytes = Some(bytes);
    }
    if let Some(text) = &file.local_tier_memory {
        config.local_tier_bytes = parse_size(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(bytes) = args.local_tier_memory {
        config.local_tier_bytes = bytes;
    }
    if let Some(text) = &file.tenant_local_memory {
        config.tenant_local_bytes = Some(parse_size(text).map_err(anyhow::Error::msg)?);
    }
    if let Some(bytes) = args.tenant_local_memory {
        config.tenant_local_bytes = Some(bytes);
    }
    if let Some(text) = &file.max_state_value {
        config.max_state_value_bytes = parse_size(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(bytes) = args.max_state_value {
        config.max_state_value_bytes = bytes;
    }
    if let Some(text) = &file.state_quota {
        config.state_quota_bytes = parse_size(text).map_err(anyhow::Error::msg)?;
    }
    if let Some(bytes) = args.state_quota {
        config.state_quota_bytes = bytes;
    }
    config.validate().map_err(anyhow::Error::msg)?;
    let examples = !args.no_examples && file.examples.unwrap_or(true);
    Ok((config, examples, metrics_listen))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (mut config, examples, metrics_listen) = node_config(&args)?;
    let listen = config.listen;
    let data_dir = config.data_dir.clone();
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    if config.redis_url.is_some() && config.advertise.is_none() {
        // The port actually bound (the listen address may say port 0).
        config.advertise = Some(listener.local_addr()?.to_string());
    }
    // Bound first: its address (the port a 0 became) is in the URLs the
    // node gives its HTTP functions.
    let mut functions_listener = match config.http_listen {
        Some(addr) => {
            let bound = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
            config.http_listen = Some(bound.local_addr()?);
            Some(bound)
        }
        None => None,
    };
    let node = Node::start(config).await.context("starting the node")?;
    // Never print the Redis URL: it may hold a password.
    let state_tier = match node.cluster_id() {
        Some(id) => format!("Redis, as cluster node {id}"),
        None => "the embedded store".to_string(),
    };
    if examples {
        node.deploy_defaults("demo", shoal_guests::EXAMPLES)
            .await
            .map_err(|e| anyhow::anyhow!("deploying the examples: {}", e.message))?;
        let sources = source_examples()?;
        let sources: Vec<(&str, &[u8])> =
            sources.iter().map(|(name, bytes)| (name.as_str(), bytes.as_slice())).collect();
        node.deploy_defaults("demo", &sources)
            .await
            .map_err(|e| anyhow::anyhow!("deploying the Python and JavaScript examples: {}", e.message))?;
        node.deploy_defaults_with("demo", &[("primes", shoal_guests::PRIMES)], true)
            .await
            .map_err(|e| anyhow::anyhow!("deploying the snapshot example: {}", e.message))?;
        if node.config().http_listen.is_some() {
            node.deploy_public_defaults("demo", &[("notes", shoal_guests::NOTES)])
                .await
                .map_err(|e| anyhow::anyhow!("deploying the HTTP example: {}", e.message))?;
        }
    }
    // What opening the store and deploying the examples allocated is free.
    shoal_runtime::release_free_memory();
    // Announced before the API's address, which ends what tests read.
    if let Some(addr) = metrics_listen {
        let metrics = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let _ = writeln!(std::io::stderr(), "shoal: metrics at http://{}/metrics", metrics.local_addr()?);
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = node.serve_metrics(metrics).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        });
    }
    // HTTP functions: drained before the API stops (which stops the
    // runtime's clock).
    let (stop_functions, functions_stopped) = tokio::sync::watch::channel(false);
    let functions = match node.config().http_listen {
        Some(addr) => {
            let _ = writeln!(std::io::stderr(), "shoal: HTTP functions at http://{addr}/TENANT/NAME/");
            let functions = functions_listener.take().expect("bound with the address");
            let node = node.clone();
            let mut stopped = functions_stopped;
            Some(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                if let Err(e) = node.serve_functions(functions, shutdown).await {
                    tracing::error!(error = %e, "the HTTP function listener failed");
                }
            }))
        }
        None => None,
    };
    let shutdown = async move {
        shutdown_signal().await;
        let _ = stop_functions.send(true);
        if let Some(functions) = functions {
            let _ = functions.await;
        }
    };
    let addr = listener.local_addr()?;
    // Written with `writeln!`, not `eprintln!`: a closed stderr must not
    // bring the node down.
    let mut stderr = std::io::stderr();
    let _ =
        writeln!(stderr, "shoal: serving http://{addr} (data in {}; global state in {state_tier})", data_dir.display());
    if examples {
        let names: Vec<&str> = shoal_guests::EXAMPLES
            .iter()
            .map(|(name, _)| *name)
            .chain(shoal_guests::PYTHON_EXAMPLES.iter().map(|(name, _)| *name))
            .chain(shoal_guests::JS_EXAMPLES.iter().map(|(name, _)| *name))
            .chain(["primes"])
            .chain(node.config().http_listen.map(|_| "notes"))
            .collect();
        let _ = writeln!(stderr, "shoal: examples deployed as demo/{{{}}}", names.join(","));
    }
    node.serve(listener, shutdown).await.context("serving")?;
    Ok(())
}

/// The Python and JavaScript examples as the bundles a deploy of their
/// folders stores.
fn source_examples() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use shoal_runtime::{Language, SourceBundle};
    let python = shoal_guests::PYTHON_EXAMPLES.iter().map(|example| (Language::Python, example));
    let js = shoal_guests::JS_EXAMPLES.iter().map(|example| (Language::JavaScript, example));
    python
        .chain(js)
        .map(|(language, (name, files))| {
            let files = files.iter().map(|(path, contents)| (path.to_string(), contents.to_vec())).collect();
            let bundle = SourceBundle::new(language, files).map_err(|e| anyhow::anyhow!("example {name}: {e}"))?;
            Ok((name.to_string(), bundle.encode()))
        })
        .collect()
}

/// The user's cache of compiled language runtimes under `xdg_cache`
/// (`$XDG_CACHE_HOME`), else under `home`'s `.cache`: `shoal/runtimes`,
/// made if missing. Compiled code is loaded from it as trusted, so it must
/// be a directory of this user that nobody else can write (made 0700);
/// otherwise (or with no home at all) the error says why not.
pub(crate) fn runtime_cache_under(
    xdg_cache: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Result<PathBuf, (PathBuf, String)> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let base = match (xdg_cache.filter(|v| !v.is_empty()), home.filter(|v| !v.is_empty())) {
        (Some(xdg), _) => PathBuf::from(xdg),
        (None, Some(home)) => PathBuf::from(home).join(".cache"),
        (None, None) => return Err((PathBuf::new(), "neither XDG_CACHE_HOME nor HOME is set".into())),
    };
    let dir = base.join("shoal").join("runtimes");
    let fail = |e: String| (dir.clone(), e);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| fail(e.to_string()))?;
    // The process's own user: /proc/self belongs to it.
    let me = std::fs::metadata("/proc/self").map_err(|e| fail(format!("reading /proc/self: {e}")))?.uid();
    for path in [dir.parent().unwrap_or(&dir), dir.as_path()] {
        let meta = std::fs::symlink_metadata(path).map_err(|e| fail(e.to_string()))?;
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(fail(format!(
                "{} must be a directory of this user that no one else can write (owner {}, mode {:o})",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn tenant_weights_come_from_the_file_and_flags_override_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shoal.toml");
        std::fs::write(&file, "[tenant_weights]\nacme = 3\nbeta = 2\n").unwrap();
        let cli = Cli::parse_from(["serve", "--config", file.to_str().unwrap(), "--tenant-weight", "beta=5"]);
        let (config, _, _) = node_config(&cli.serve).unwrap();
        let mut weights = config.tenant_weights.clone();
        weights.sort();
        assert_eq!(weights, [("acme".to_string(), 3), ("beta".to_string(), 5)]);
        assert!(parse_weight("acme").is_err());
        assert!(parse_weight("acme=x").is_err());
        let zero = Cli::parse_from(["serve", "--tenant-weight", "acme=0"]);
        let error = node_config(&zero.serve).unwrap_err().to_string();
        assert!(error.contains("weight of tenant `acme`"), "{error}");
    }

    #[test]
    fn the_image_budget_comes_from_the_file_and_the_flag_overrides_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shoal.toml");
        std::fs::write(&file, "max_loaded_images = 300\n").unwrap();
        let from_file = Cli::parse_from(["serve", "--config", file.to_str().unwrap()]);
        assert_eq!(node_config(&from_file.serve).unwrap().0.max_loaded_images, 300);
        let flag = Cli::parse_from(["serve", "--config", file.to_str().unwrap(), "--max-loaded-images", "20"]);
        assert_eq!(node_config(&flag.serve).unwrap().0.max_loaded_images, 20);
        let zero = Cli::parse_from(["serve", "--max-loaded-images", "0"]);
        assert!(node_config(&zero.serve).is_err(), "a budget of no images is refused");
    }

    #[test]
    fn listening_beyond_loopback_needs_public() {
        let open = Cli::parse_from(["serve", "--listen", "0.0.0.0:8080"]);
        let error = node_config(&open.serve).unwrap_err().to_string();
        assert!(error.contains("--public"), "{error}");
        let meant = Cli::parse_from(["serve", "--listen", "0.0.0.0:8080", "--public"]);
        assert_eq!(node_config(&meant.serve).unwrap().0.listen.port(), 8080);
        let metrics = Cli::parse_from(["serve", "--metrics-listen", "0.0.0.0:9464"]);
        assert!(node_config(&metrics.serve).unwrap_err().to_string().contains("--public"));
        let metrics = Cli::parse_from(["serve", "--metrics-listen", "127.0.0.1:9464"]);
        assert_eq!(node_config(&metrics.serve).unwrap().2.map(|a| a.port()), Some(9464));
        let v6 = Cli::parse_from(["serve", "--listen", "[::1]:8080"]);
        assert!(node_config(&v6.serve).is_ok(), "IPv6 loopback needs no flag");
    }

    #[test]
    fn cluster_flags_need_redis_and_an_address_peers_can_use() {
        let alone = Cli::parse_from(["serve", "--gateway"]);
        let error = node_config(&alone.serve).unwrap_err().to_string();
        assert!(error.contains("gateway"), "{error}");
        let everywhere =
            Cli::parse_from(["serve", "--redis", "redis://127.0.0.1:1", "--listen", "0.0.0.0:8080", "--public"]);
        let error = node_config(&everywhere.serve).unwrap_err().to_string();
        assert!(error.contains("--advertise"), "{error}");
        let meant = Cli::parse_from([
            "serve",
            "--redis",
            "redis://127.0.0.1:1",
            "--listen",
            "0.0.0.0:8080",
            "--public",
            "--advertise",
            "10.0.0.11:8080",
            "--gateway",
        ]);
        let config = node_config(&meant.serve).unwrap().0;
        assert_eq!((config.advertise.as_deref(), config.gateway), (Some("10.0.0.11:8080"), true));
    }

    #[test]
    fn connection_limits_come_from_the_file_and_flags_override_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shoal.toml");
        std::fs::write(&file, "max_connections = 50\nheader_read_timeout = \"3s\"\nmin_body_rate = \"1KiB\"\n")
            .unwrap();
        let from_file = Cli::parse_from(["serve", "--config", file.to_str().unwrap()]);
        let http = node_config(&from_file.serve).unwrap().0.http;
        assert_eq!(
            (http.max_connections, http.header_read_timeout, http.min_body_rate),
            (50, Duration::from_secs(3), 1024)
        );
        let flags = Cli::parse_from([
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--max-connections",
            "70",
            "--idle-timeout",
            "5s",
        ]);
        let http = node_config(&flags.serve).unwrap().0.http;
        assert_eq!((http.max_connections, http.idle_timeout), (70, Duration::from_secs(5)));
        let zero = Cli::parse_from(["serve", "--max-connections", "0"]);
        assert!(node_config(&zero.serve).is_err(), "no connections at all is refused");
    }

    #[test]
    fn compiled_runtimes_are_shared_through_the_users_own_cache_only() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let xdg = tempfile::tempdir().unwrap();
        // XDG_CACHE_HOME first, else ~/.cache; made private.
        let dir = runtime_cache_under(Some(xdg.path().into()), Some(home.path().into())).unwrap();
        assert_eq!(dir, xdg.path().join("shoal/runtimes"));
        let dir = runtime_cache_under(Some("".into()), Some(home.path().into())).unwrap();
        assert_eq!(dir, home.path().join(".cache/shoal/runtimes"));
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        // Found again as it is.
        assert_eq!(runtime_cache_under(None, Some(home.path().into())).unwrap(), dir);
        assert!(runtime_cache_under(None, None).is_err());
        // A directory others may write is refused (someone could plant code in it).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (refused, why) = runtime_cache_under(None, Some(home.path().into())).unwrap_err();
        assert_eq!(refused, dir);
        assert!(why.contains("no one else can write"), "{why}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let parent = dir.parent().unwrap();
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(runtime_cache_under(None, Some(home.path().into())).is_err(), "its parent too");
    }
}
