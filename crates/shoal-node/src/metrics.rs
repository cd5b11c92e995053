//! Node metrics in the Prometheus text format: call outcomes, call latency
//! (a fixed-bucket histogram), and gauges of what is deployed and running.
//! Plain atomics; recording a call never takes a lock.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ErrorKind;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 12] = [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000, 10_000_000];

/// Outcomes counted; index 0 is success.
const OUTCOMES: [&str; 9] =
    ["ok", "function_error", "trap", "timeout", "out_of_memory", "overloaded", "too_large", "internal", "other"];

#[derive(Debug, Default)]
pub struct Metrics {
    outcomes: [AtomicU64; OUTCOMES.len()],
    buckets: [AtomicU64; BUCKETS_US.len()],
    duration_us_sum: AtomicU64,
    n_timed: AtomicU64,
    n_deploys: AtomicU64,
}

fn outcome_index(outcome: Result<(), ErrorKind>) -> usize {
    let name = match outcome {
        Ok(()) => "ok",
        Err(kind) => kind.as_str(),
    };
    OUTCOMES.iter().position(|o| *o == name).unwrap_or(OUTCOMES.len() - 1)
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
}

impl Metrics {
    /// Record a call that ran (refused calls have no duration).
    pub fn record_call(&self, outcome: Result<(), ErrorKind>, duration: Option<Duration>) {
        self.outcomes[outcome_index(outcome)].fetch_add(1, Ordering::Relaxed);
        if let Some(duration) = duration {
            let us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
            if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
            self.duration_us_sum.fetch_add(us, Ordering::Relaxed);
            self.n_timed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn record_deploy(&self) {
        self.n_deploys.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let disk = gauges.disk.clone();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP shoal_calls_total Calls by outcome.\n# TYPE shoal_calls_total counter\n");
        for (name, count) in OUTCOMES.iter().zip(&self.outcomes) {
            let _ = writeln!(out, "shoal_calls_total{{outcome=\"{name}\"}} {}", load(count));
        }
        out.push_str("# HELP shoal_call_duration_seconds Time from start to end of calls that ran.\n");
        out.push_str("# TYPE shoal_call_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += load(count);
            let _ = writeln!(out, "shoal_call_duration_seconds_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
        }
        let n_timed = load(&self.n_timed);
        let _ = writeln!(out, "shoal_call_duration_seconds_bucket{{le=\"+Inf\"}} {n_timed}");
        let _ = writeln!(out, "shoal_call_duration_seconds_sum {}", load(&self.duration_us_sum) as f64 / 1e6);
        let _ = writeln!(out, "shoal_call_duration_seconds_count {n_timed}");
        let gauges = [
            ("shoal_deploys_total", "counter", "Successful deploys since start.", load(&self.n_deploys)),
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
        for (name, kind, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP shoal_disk_bytes Bytes the node keeps on disk, by kind (store: the embedded store's file; compiled: compiled functions).\n# TYPE shoal_disk_bytes gauge"
        );
        for (kind, bytes) in disk {
            let _ = writeln!(out, "shoal_disk_bytes{{kind=\"{kind}\"}} {bytes}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_land_in_their_outcome_and_bucket() {
        let m = Metrics::default();
        m.record_call(Ok(()), Some(Duration::from_micros(80)));
        m.record_call(Err(ErrorKind::Timeout), Some(Duration::from_secs(2)));
        m.record_call(Err(ErrorKind::Overloaded), None);
        let text = m.render(&Gauges {
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
        });
        for expected in [
            "shoal_calls_total{outcome=\"ok\"} 1",
            "shoal_calls_total{outcome=\"timeout\"} 1",
            "shoal_calls_total{outcome=\"overloaded\"} 1",
            "shoal_call_duration_seconds_bucket{le=\"0.00005\"} 0",
            "shoal_call_duration_seconds_bucket{le=\"0.0001\"} 1",
            "shoal_call_duration_seconds_bucket{le=\"10\"} 2",
            "shoal_call_duration_seconds_count 2",
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
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }
}
