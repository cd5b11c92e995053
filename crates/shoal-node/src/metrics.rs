//! Node metrics in the Prometheus text format, through `prometheus-client`:
//! node-wide call outcomes and latency, the same per tenant and per
//! function (calls by outcome, duration, CPU seconds), and gauges of what
//! is deployed and running, read at scrape time.
//!
//! Label cardinality is bounded: at most `metrics_functions` functions and
//! `metrics_tenants` tenants have series of their own, the ones used most
//! (`Labels`: the first ones seen while there is room; then every
//! `rerank` — each usage flush — a function or tenant used more than twice
//! as much as the least used one with series takes its place, and the
//! other's series are removed). Calls of the rest are counted under
//! `tenant="other"`, `function="other"`. Recording a call takes a read lock
//! on each chosen set, a histogram's lock and a few atomic additions; one
//! not in the chosen set also a short lock on the candidates' counts.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::ErrorKind;

/// Upper bounds of the node-wide latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 10.0];
/// Fewer for each function's histogram (each bucket is a series).
const FUNCTION_BUCKETS: [f64; 8] = [0.0001, 0.0005, 0.001, 0.005, 0.025, 0.1, 1.0, 10.0];
/// The name calls outside the chosen set are counted under.
pub const OTHER: &str = "other";
/// `ok` and every error kind: the outcomes a call can have.
const N_OUTCOMES: usize = 20;

fn outcome_index(outcome: Result<(), ErrorKind>) -> (usize, &'static str) {
    match outcome {
        Ok(()) => (0, "ok"),
        Err(kind) => ((kind as usize + 1).min(N_OUTCOMES - 1), kind.as_str()),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantOutcome {
    tenant: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    tenant: String,
    function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionOutcome {
    tenant: String,
    function: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type CpuCounter = Counter<f64, AtomicU64>;

fn function_histogram() -> Histogram {
    Histogram::new(FUNCTION_BUCKETS)
}

/// The families one kind of label (tenants, or functions) counts into.
#[derive(Clone, Debug)]
struct Families {
    /// `tenant` alone, or `tenant` and `function`.
    per_function: bool,
    calls: Family<FunctionOutcome, Counter>,
    duration: HistogramFamily<FunctionLabels>,
    cpu: Family<FunctionLabels, CpuCounter>,
    tenant_calls: Family<TenantOutcome, Counter>,
    tenant_cpu: Family<TenantLabels, CpuCounter>,
}

/// One series set: a chosen function or tenant, or `other`.
#[derive(Debug)]
struct Series {
    tenant: String,
    function: String,
    calls: [OnceLock<Counter>; N_OUTCOMES],
    duration: Option<Histogram>,
    cpu: CpuCounter,
}

impl Series {
    fn new(families: &Families, tenant: &str, function: &str) -> Self {
        let (duration, cpu) = if families.per_function {
            let labels = FunctionLabels { tenant: tenant.to_string(), function: function.to_string() };
            (Some(families.duration.get_or_create_owned(&labels)), families.cpu.get_or_create_owned(&labels))
        } else {
            (None, families.tenant_cpu.get_or_create_owned(&TenantLabels { tenant: tenant.to_string() }))
        };
        Self { tenant: tenant.to_string(), function: function.to_string(), calls: Default::default(), duration, cpu }
    }

    fn record(&self, families: &Families, outcome: Result<(), ErrorKind>, call: Option<(Duration, Duration)>) {
        let (i, name) = outcome_index(outcome);
        self.calls[i]
            .get_or_init(|| {
                if families.per_function {
                    families.calls.get_or_create_owned(&FunctionOutcome {
                        tenant: self.tenant.clone(),
                        function: self.function.clone(),
                        outcome: name,
                    })
                } else {
                    families
                        .tenant_calls
                        .get_or_create_owned(&TenantOutcome { tenant: self.tenant.clone(), outcome: name })
                }
            })
            .inc();
        if let Some((wall, cpu)) = call {
            if let Some(duration) = &self.duration {
                duration.observe(wall.as_secs_f64());
            }
            self.cpu.inc_by(cpu.as_secs_f64());
        }
    }

    /// Calls counted so far, every outcome.
    fn total(&self) -> u64 {
        self.calls.iter().filter_map(OnceLock::get).map(Counter::get).sum()
    }

    /// Remove this set's series from the families.
    fn remove(&self, families: &Families) {
        let (tenant, function) = (self.tenant.clone(), self.function.clone());
        for outcome in self.calls.iter().enumerate().filter(|(_, c)| c.get().is_some()).map(|(i, _)| outcome_name(i)) {
            if families.per_function {
                families.calls.remove(&FunctionOutcome { tenant: tenant.clone(), function: function.clone(), outcome });
            } else {
                families.tenant_calls.remove(&TenantOutcome { tenant: tenant.clone(), outcome });
            }
        }
        if families.per_function {
            let labels = FunctionLabels { tenant, function };
            families.duration.remove(&labels);
            families.cpu.remove(&labels);
        } else {
            families.tenant_cpu.remove(&TenantLabels { tenant });
        }
    }
}

/// The outcome name of index `i` (see `outcome_index`).
fn outcome_name(i: usize) -> &'static str {
    if i == 0 {
        return "ok";
    }
    ALL_KINDS.iter().find(|k| **k as usize + 1 == i).map_or("internal", |k| k.as_str())
}

const ALL_KINDS: [ErrorKind; N_OUTCOMES - 1] = [
    ErrorKind::BadRequest,
    ErrorKind::Unauthorized,
    ErrorKind::Forbidden,
    ErrorKind::NotFound,
    ErrorKind::MethodNotAllowed,
    ErrorKind::Conflict,
    ErrorKind::TooLarge,
    ErrorKind::LimitExceeded,
    ErrorKind::UriTooLong,
    ErrorKind::RequestTimeout,
    ErrorKind::InvalidWasm,
    ErrorKind::InvalidSource,
    ErrorKind::Overloaded,
    ErrorKind::Trap,
    ErrorKind::FunctionError,
    ErrorKind::OutOfMemory,
    ErrorKind::Timeout,
    ErrorKind::Unavailable,
    ErrorKind::Internal,
];

/// Which keys (tenants, or `tenant/name`) have series of their own.
#[derive(Debug)]
struct Labels {
    max: usize,
    families: Families,
    chosen: RwLock<HashMap<Arc<str>, Arc<Series>>>,
    /// Scores of the chosen at the last rerank (decayed by half each
    /// time), and their call totals then.
    scores: Mutex<HashMap<Arc<str>, (u64, u64)>>,
    /// Calls of keys not chosen since the last rerank (at most `4 × max`
    /// keys tracked).
    candidates: Mutex<HashMap<Arc<str>, u64>>,
    other: Series,
}

impl Labels {
    fn new(max: usize, families: Families) -> Self {
        let other = Series::new(&families, OTHER, OTHER);
        Self { max, families, chosen: RwLock::default(), scores: Mutex::default(), candidates: Mutex::default(), other }
    }

    fn split(key: &str) -> (&str, &str) {
        key.split_once('/').unwrap_or((key, ""))
    }

    fn record(&self, key: &Arc<str>, outcome: Result<(), ErrorKind>, call: Option<(Duration, Duration)>) {
        let room = {
            let chosen = self.chosen.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(series) = chosen.get(key) {
                series.record(&self.families, outcome, call);
                return;
            }
            chosen.len() < self.max
        };
        // Room left: it gets series of its own at once (a call of a function
        // without takes no write lock).
        if room {
            let mut chosen = self.chosen.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if chosen.len() < self.max || chosen.contains_key(key) {
                let (tenant, function) = Self::split(key);
                let series = chosen
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(Series::new(&self.families, tenant, function)));
                series.record(&self.families, outcome, call);
                return;
            }
        }
        self.other.record(&self.families, outcome, call);
        let mut candidates = self.candidates.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = candidates.get_mut(key) {
            *count += 1;
        } else if candidates.len() < 4 * self.max.max(1) {
            candidates.insert(key.clone(), 1);
        }
    }

    /// Let the most used candidates take the places of the least used
    /// chosen (when they were used more than twice as much since the last
    /// rerank as those were, decayed).
    fn rerank(&self) {
        let candidates =
            std::mem::take(&mut *self.candidates.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let mut scores = self.scores.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut chosen = self.chosen.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut ranked: Vec<(u64, Arc<str>)> = chosen
            .iter()
            .map(|(key, series)| {
                let total = series.total();
                let (score, then) = scores.get(key).copied().unwrap_or((0, 0));
                (score / 2 + total.saturating_sub(then), key.clone())
            })
            .collect();
        let totals: HashMap<Arc<str>, u64> = chosen.iter().map(|(k, s)| (k.clone(), s.total())).collect();
        scores.clear();
        ranked.sort();
        let mut candidates: Vec<(u64, Arc<str>)> = candidates.into_iter().map(|(k, n)| (n, k)).collect();
        candidates.sort_by(|a, b| b.cmp(a));
        let mut weakest = ranked.iter();
        let mut out = Vec::new();
        for (score, key) in candidates {
            if chosen.len() - out.len() < self.max {
                // Room (a function was removed from the set).
            } else {
                match weakest.next() {
                    Some((least, _)) if score > least.saturating_mul(2) => {}
                    _ => break,
                }
                let (_, gone) = &ranked[out.len()];
                out.push(gone.clone());
            }
            let (tenant, function) = Self::split(&key);
            let series = Arc::new(Series::new(&self.families, tenant, function));
            scores.insert(key.clone(), (score, 0));
            chosen.insert(key, series);
        }
        for key in &out {
            if let Some(series) = chosen.remove(key) {
                series.remove(&self.families);
            }
        }
        for (score, key) in ranked {
            if chosen.contains_key(&key) {
                let total = totals.get(&key).copied().unwrap_or(0);
                scores.insert(key, (score, total));
            }
        }
    }

    fn n_chosen(&self) -> usize {
        self.chosen.read().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

/// A registry whose help texts lose their final period (the encoder adds
/// one).
struct Help<'a>(&'a mut Registry);

impl Help<'_> {
    fn register(&mut self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        self.0.register(name, help.strip_suffix('.').unwrap_or(help), metric);
    }
}

#[derive(Debug)]
pub struct Metrics {
    calls: Family<OutcomeLabel, Counter>,
    /// The same counters, by outcome index (no lookup per call).
    calls_by_outcome: [OnceLock<Counter>; N_OUTCOMES],
    duration: Histogram,
    deploys: Counter,
    functions: Labels,
    tenants: Labels,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(100, 100)
    }
}

/// Gauges read at render time.
#[derive(Debug)]
pub struct Gauges {
    pub n_tenants: usize,
    pub n_functions: usize,
    pub n_running: u32,
    pub n_slots: u32,
    pub n_compiles: u64,
    pub state: shoal_state::TierStats,
    pub async_unfinished: usize,
    pub n_loaded_images: usize,
    pub connections_open: usize,
    pub connections_refused: u64,
    pub connections_idle_closed: u64,
    pub panics: u64,
    pub chore_restarts: u64,
    /// Members seen, calls forwarded to peers, and forwards that failed
    /// (zero when the node runs alone).
    pub cluster_members: usize,
    /// Members whose heartbeat reports room for calls (not gateways, not
    /// nodes still starting).
    pub cluster_members_ready: usize,
    pub calls_forwarded: u64,
    pub forward_failures: u64,
    /// Calls waiting for their turn.
    pub n_queued: usize,
    /// Sum of the memory limits of the calls running now.
    pub call_memory_bytes: u64,
    /// The local state tier: bytes of values held, and evictions since
    /// start (values, bytes).
    pub local: shoal_state::LocalBytes,
    pub local_evictions: (u64, u64),
    /// Bytes on disk by kind: (kind, bytes).
    pub disk: Vec<(&'static str, u64)>,
    /// Spans exported, dropped from the full queue, and lost with a failed
    /// export.
    pub trace_spans: (u64, u64, u64),
}

impl Metrics {
    /// Series of their own for at most `max_functions` functions and
    /// `max_tenants` tenants.
    pub fn new(max_functions: usize, max_tenants: usize) -> Self {
        let families = |per_function| Families {
            per_function,
            calls: Family::default(),
            duration: Family::new_with_constructor(function_histogram as fn() -> Histogram),
            cpu: Family::default(),
            tenant_calls: Family::default(),
            tenant_cpu: Family::default(),
        };
        Self {
            calls: Family::default(),
            calls_by_outcome: Default::default(),
            duration: Histogram::new(BUCKETS),
            deploys: Counter::default(),
            functions: Labels::new(max_functions, families(true)),
            tenants: Labels::new(max_tenants, families(false)),
        }
    }

    /// Record a call of `function` (`tenant/name`) of `tenant`: one that
    /// ran, with its wall and CPU time, or one refused before it ran.
    pub fn record_call(
        &self,
        tenant: &Arc<str>,
        function: &Arc<str>,
        outcome: Result<(), ErrorKind>,
        call: Option<(Duration, Duration)>,
    ) {
        let (i, name) = outcome_index(outcome);
        self.calls_by_outcome[i].get_or_init(|| self.calls.get_or_create_owned(&OutcomeLabel { outcome: name })).inc();
        if let Some((wall, _)) = call {
            self.duration.observe(wall.as_secs_f64());
        }
        self.functions.record(function, outcome, call);
        self.tenants.record(tenant, outcome, call);
    }

    pub fn record_deploy(&self) {
        self.deploys.inc();
    }

    /// Give the most used functions and tenants series of their own.
    pub fn rerank(&self) {
        self.functions.rerank();
        self.tenants.rerank();
    }

    /// Functions and tenants with series of their own now.
    pub fn n_labelled(&self) -> (usize, usize) {
        (self.functions.n_chosen(), self.tenants.n_chosen())
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut registry = Registry::default();
        // (The library ends each help text with a period.)
        let mut registry = Help(&mut registry);
        registry.register("shoal_calls", "Calls by outcome.", self.calls.clone());
        registry.register(
            "shoal_call_duration_seconds",
            "Time from start to end of calls that ran.",
            self.duration.clone(),
        );
        let functions = &self.functions.families;
        registry.register(
            "shoal_function_calls",
            "Calls of each function by outcome (the most used functions; the rest as tenant=\"other\", function=\"other\").",
            functions.calls.clone(),
        );
        registry.register(
            "shoal_function_call_duration_seconds",
            "Time from start to end of each function's calls that ran.",
            functions.duration.clone(),
        );
        registry.register(
            "shoal_function_cpu_seconds",
            "CPU time of each function's calls (the threads that ran them, while they ran).",
            functions.cpu.clone(),
        );
        let tenants = &self.tenants.families;
        registry.register(
            "shoal_tenant_calls",
            "Calls of each tenant by outcome (the most used tenants; the rest as tenant=\"other\").",
            tenants.tenant_calls.clone(),
        );
        registry.register("shoal_tenant_cpu_seconds", "CPU time of each tenant's calls.", tenants.tenant_cpu.clone());
        let (n_functions, n_tenants) = self.n_labelled();
        registry.register(
            "shoal_metrics_labelled_functions",
            "Functions with series of their own (at most --metrics-functions).",
            ConstGauge::new(n_functions as i64),
        );
        registry.register(
            "shoal_metrics_labelled_tenants",
            "Tenants with series of their own (at most --metrics-tenants).",
            ConstGauge::new(n_tenants as i64),
        );
        registry.register("shoal_deploys", "Successful deploys since start.", self.deploys.clone());
        let values = [
            ("shoal_compiles_total", "counter", "Wasm binaries compiled since start.", gauges.n_compiles),
            ("shoal_tenants", "gauge", "Tenants.", gauges.n_tenants as u64),
            ("shoal_functions", "gauge", "Deployed functions.", gauges.n_functions as u64),
            ("shoal_images_loaded", "gauge", "Function images loaded.", gauges.n_loaded_images as u64),
            ("shoal_calls_running", "gauge", "Calls running now.", u64::from(gauges.n_running)),
            ("shoal_call_slots", "gauge", "Calls that may run at once.", u64::from(gauges.n_slots)),
            (
                "shoal_async_calls_unfinished",
                "gauge",
                "Asynchronous calls accepted and not finished.",
                gauges.async_unfinished as u64,
            ),
            ("shoal_http_connections", "gauge", "HTTP connections open.", gauges.connections_open as u64),
            (
                "shoal_http_connections_refused_total",
                "counter",
                "Connections answered 503 because the connection limit was reached.",
                gauges.connections_refused,
            ),
            (
                "shoal_http_connections_idle_closed_total",
                "counter",
                "Connections closed after moving no bytes for the idle timeout.",
                gauges.connections_idle_closed,
            ),
            (
                "shoal_panics_total",
                "counter",
                "Requests and asynchronous calls whose handling panicked (answered 500 `internal`, or the call recorded failed `internal`; a bug to report).",
                gauges.panics,
            ),
            (
                "shoal_chore_restarts_total",
                "counter",
                "Background chores (the cluster chores and async worker, the call record sweep) started again after a panic.",
                gauges.chore_restarts,
            ),
            ("shoal_cluster_members", "gauge", "Nodes of the cluster this node sees.", gauges.cluster_members as u64),
            (
                "shoal_cluster_members_ready",
                "gauge",
                "Nodes of the cluster this node sees taking calls (with capacity in their heartbeat).",
                gauges.cluster_members_ready as u64,
            ),
            (
                "shoal_calls_forwarded_total",
                "counter",
                "Calls this node placed on another node.",
                gauges.calls_forwarded,
            ),
            (
                "shoal_forward_failures_total",
                "counter",
                "Forwards whose node could not be reached or whose answer was lost.",
                gauges.forward_failures,
            ),
            ("shoal_calls_queued", "gauge", "Calls waiting for their turn.", gauges.n_queued as u64),
            (
                "shoal_call_memory_bytes",
                "gauge",
                "Sum of the memory limits of the calls running now.",
                gauges.call_memory_bytes,
            ),
            (
                "shoal_state_local_clean_bytes",
                "gauge",
                "Bytes of the local state tier's copies of global values (evicted first to make room).",
                gauges.local.clean,
            ),
            (
                "shoal_state_local_dirty_bytes",
                "gauge",
                "Bytes of the local state tier's values written and not pushed.",
                gauges.local.dirty,
            ),
            (
                "shoal_state_local_evictions_total",
                "counter",
                "Copies of global values evicted from the local state tier to make room.",
                gauges.local_evictions.0,
            ),
            (
                "shoal_state_local_evicted_bytes_total",
                "counter",
                "Bytes of the copies evicted from the local state tier.",
                gauges.local_evictions.1,
            ),
            (
                "shoal_state_global_read_bytes_total",
                "counter",
                "Bytes read from the global state tier.",
                gauges.state.bytes_from_global,
            ),
            (
                "shoal_state_global_written_bytes_total",
                "counter",
                "Bytes written to the global state tier.",
                gauges.state.bytes_to_global,
            ),
        ];
        let (exported, dropped, failed) = gauges.trace_spans;
        let values = values.into_iter().chain([
            ("shoal_trace_spans_exported_total", "counter", "Spans sent to the OTLP endpoint.", exported),
            (
                "shoal_trace_spans_dropped_total",
                "counter",
                "Spans dropped because the export queue was full (calls never wait for it).",
                dropped,
            ),
            ("shoal_trace_spans_failed_total", "counter", "Spans lost with an export request that failed.", failed),
        ]);
        for (name, kind, help, value) in values {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            match kind {
                "counter" => registry.register(name.trim_end_matches("_total"), help, ConstCounter::new(value as u64)),
                _ => registry.register(name, help, ConstGauge::new(value)),
            }
        }
        let disk: Family<KindLabel, prometheus_client::metrics::gauge::Gauge> = Family::default();
        for (kind, bytes) in &gauges.disk {
            disk.get_or_create(&KindLabel { kind }).set(i64::try_from(*bytes).unwrap_or(i64::MAX));
        }
        registry.register(
            "shoal_disk_bytes",
            "Bytes the node keeps on disk, by kind (store: the embedded store's file; compiled: compiled functions).",
            disk,
        );
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry.0).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges {
            n_tenants: 1,
            n_functions: 2,
            n_running: 0,
            n_slots: 8,
            n_compiles: 3,
            state: Default::default(),
            async_unfinished: 4,
            n_loaded_images: 2,
            connections_open: 5,
            connections_refused: 6,
            connections_idle_closed: 7,
            panics: 0,
            chore_restarts: 0,
            cluster_members: 3,
            cluster_members_ready: 2,
            calls_forwarded: 8,
            forward_failures: 9,
            n_queued: 10,
            call_memory_bytes: 11,
            local: shoal_state::LocalBytes { clean: 12, dirty: 13 },
            local_evictions: (14, 15),
            disk: vec![("store", 16), ("compiled", 17)],
            trace_spans: (18, 19, 20),
        }
    }

    fn key(text: &str) -> Arc<str> {
        Arc::from(text)
    }

    /// The value of the series `line` names exactly (name and labels).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn calls_land_in_their_outcome_bucket_tenant_and_function() {
        let m = Metrics::new(10, 10);
        let (acme, fib) = (key("acme"), key("acme/fib"));
        m.record_call(&acme, &fib, Ok(()), Some((Duration::from_micros(80), Duration::from_micros(70))));
        m.record_call(&acme, &fib, Err(ErrorKind::Timeout), Some((Duration::from_secs(2), Duration::from_millis(5))));
        m.record_call(&acme, &fib, Err(ErrorKind::Overloaded), None);
        let text = m.render(&gauges());
        for expected in [
            "shoal_calls_total{outcome=\"ok\"} 1",
            "shoal_calls_total{outcome=\"timeout\"} 1",
            "shoal_calls_total{outcome=\"overloaded\"} 1",
            "shoal_call_duration_seconds_bucket{le=\"5e-05\"} 0",
            "shoal_call_duration_seconds_bucket{le=\"0.0001\"} 1",
            "shoal_call_duration_seconds_bucket{le=\"10\"} 2",
            "shoal_call_duration_seconds_count 2",
            "shoal_function_calls_total{tenant=\"acme\",function=\"fib\",outcome=\"ok\"} 1",
            "shoal_function_calls_total{tenant=\"acme\",function=\"fib\",outcome=\"timeout\"} 1",
            "shoal_function_calls_total{tenant=\"acme\",function=\"fib\",outcome=\"overloaded\"} 1",
            "shoal_function_call_duration_seconds_count{tenant=\"acme\",function=\"fib\"} 2",
            "shoal_tenant_calls_total{tenant=\"acme\",outcome=\"ok\"} 1",
            "shoal_functions 2",
            "shoal_compiles_total 3",
            "shoal_async_calls_unfinished 4",
            "shoal_http_connections 5",
            "shoal_http_connections_refused_total 6",
            "shoal_http_connections_idle_closed_total 7",
            "shoal_calls_queued 10",
            "shoal_call_memory_bytes 11",
            "shoal_state_local_clean_bytes 12",
            "shoal_state_local_dirty_bytes 13",
            "shoal_state_local_evictions_total 14",
            "shoal_disk_bytes{kind=\"store\"} 16",
            "shoal_disk_bytes{kind=\"compiled\"} 17",
            "shoal_state_local_evicted_bytes_total 15",
            "shoal_cluster_members 3",
            "shoal_cluster_members_ready 2",
            "shoal_calls_forwarded_total 8",
            "shoal_forward_failures_total 9",
            "shoal_trace_spans_exported_total 18",
            "shoal_trace_spans_dropped_total 19",
            "shoal_trace_spans_failed_total 20",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        let cpu = value(&text, "shoal_function_cpu_seconds_total{tenant=\"acme\",function=\"fib\"}").unwrap();
        assert!((cpu - 0.00507).abs() < 1e-9, "{cpu}");
        // Every outcome has a name of its own.
        for (i, kind) in ALL_KINDS.iter().enumerate() {
            assert_eq!(outcome_name(i + 1), kind.as_str());
            assert_eq!(outcome_index(Err(*kind)), (i + 1, kind.as_str()));
        }
    }

    #[test]
    fn only_the_most_used_functions_and_tenants_get_series_of_their_own() {
        let m = Metrics::new(2, 2);
        let call = |tenant: &str, name: &str, n: usize| {
            for _ in 0..n {
                m.record_call(&key(tenant), &key(&format!("{tenant}/{name}")), Ok(()), None);
            }
        };
        // Two functions fill the room; the rest are `other`.
        call("a", "f", 1);
        call("a", "g", 1);
        call("b", "h", 5);
        call("c", "i", 1);
        let text = m.render(&gauges());
        assert_eq!(value(&text, "shoal_function_calls_total{tenant=\"a\",function=\"f\",outcome=\"ok\"}"), Some(1.0));
        assert_eq!(
            value(&text, "shoal_function_calls_total{tenant=\"other\",function=\"other\",outcome=\"ok\"}"),
            Some(6.0)
        );
        assert_eq!(value(&text, "shoal_tenant_calls_total{tenant=\"b\",outcome=\"ok\"}"), Some(5.0));
        assert_eq!(value(&text, "shoal_tenant_calls_total{tenant=\"other\",outcome=\"ok\"}"), Some(1.0));
        assert!(!text.contains("function=\"h\""), "{text}");
        // `b/h` was used far more than either: it takes the place of one.
        m.rerank();
        call("b", "h", 3);
        let text = m.render(&gauges());
        assert_eq!(value(&text, "shoal_function_calls_total{tenant=\"b\",function=\"h\",outcome=\"ok\"}"), Some(3.0));
        let kept = ["f", "g"].iter().filter(|f| text.contains(&format!("function=\"{f}\""))).count();
        assert_eq!(kept, 1, "one of the two made room:\n{text}");
        assert_eq!(m.n_labelled(), (2, 2));
        // A candidate used about as much as the least used one does not
        // displace it (no flapping).
        call("a", "f", 2);
        call("a", "g", 2);
        m.rerank();
        call("c", "i", 1);
        m.rerank();
        let text = m.render(&gauges());
        assert!(!text.contains("function=\"i\""), "{text}");
        // However many functions are called, the series stay bounded.
        for i in 0..500 {
            call("z", &format!("f{i}"), 1);
        }
        m.rerank();
        let text = m.render(&gauges());
        let series = text.lines().filter(|l| l.starts_with("shoal_function_calls_total{")).count();
        assert!(series <= 3, "{series} series");
    }
}
