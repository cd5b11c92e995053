//! Usage metering: what every call used, charged to its tenant and
//! function, summed per minute and kept in the node's store.
//!
//! A call's usage (`shoal_runtime::CallUsage`, with the CPU and queue time
//! the scheduler measured) is added to a pending table in memory, sharded
//! by thread: one lock no other thread is likely to hold (nor to have
//! touched: its cache line stays with the core), a lookup by the
//! function's name and a few additions per call; nothing is allocated or
//! reference-counted once the function's row of the minute exists. The `usage` chore writes
//! the pending sums into the store every `usage_flush` (and the node
//! before it stops, and before answering a usage query), adding them to the
//! minute each call ended in. A crash (`kill -9`) loses what was pending:
//! at most the last `usage_flush` of usage. Minutes older than
//! `usage_retention` are removed by the same chore.
//!
//! Every call that ran is charged where it ran, once: a call forwarded to
//! another node of a cluster is that node's to count.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_cluster::{SharedUsage, UsageRow};
use shoal_runtime::CallUsage;
use shoal_state::{EmbeddedStore, StoreError, Table};

use crate::error::ErrorKind;

const USAGE: Table = Table::new("usage");

/// What a tenant's calls (of one function, in one bucket) used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Calls, refused ones included.
    pub calls: u64,
    /// Calls by outcome: `ok`, or the error kind (`overloaded` for a call
    /// refused before it ran).
    pub outcomes: BTreeMap<String, u64>,
    /// Wall time of the calls that ran, from instantiation to the end.
    pub wall_us: u64,
    /// CPU time of the threads that ran them while they ran.
    pub cpu_us: u64,
    /// Each call's peak linear memory × its wall time, in MiB·ms.
    pub memory_mib_ms: u64,
    /// Time waiting for a turn before starting.
    pub queued_us: u64,
    pub outbound_requests: u64,
    pub outbound_bytes: u64,
    /// Calls started with `spawn` (each also counted as a call of its own
    /// function).
    pub spawned: u64,
    /// Bytes the calls' state operations read from the global tier and
    /// wrote to it.
    pub state_read_bytes: u64,
    pub state_written_bytes: u64,
    /// The tenant's bytes in the global state tier (what its quota
    /// counts), sampled once a minute: the most seen in the bucket. A
    /// tenant-wide gauge, in the tenant's rows only (not per function).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub state_stored_bytes: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Usage {
    fn add(&mut self, other: &Usage) {
        self.calls += other.calls;
        for (outcome, n) in &other.outcomes {
            *self.outcomes.entry(outcome.clone()).or_default() += n;
        }
        self.wall_us += other.wall_us;
        self.cpu_us += other.cpu_us;
        self.memory_mib_ms += other.memory_mib_ms;
        self.queued_us += other.queued_us;
        self.outbound_requests += other.outbound_requests;
        self.outbound_bytes += other.outbound_bytes;
        self.spawned += other.spawned;
        self.state_read_bytes += other.state_read_bytes;
        self.state_written_bytes += other.state_written_bytes;
        self.state_stored_bytes = self.state_stored_bytes.max(other.state_stored_bytes);
    }
}

/// Pending sums of one function in one minute: outcomes by static name,
/// so that recording a call allocates nothing once its row exists.
#[derive(Default)]
struct Pending {
    outcomes: BTreeMap<&'static str, u64>,
    usage: Usage,
}

/// Shards of the pending table (a power of two).
const SHARDS: usize = 16;

/// One shard: `tenant/name` → its sums not yet stored, by Unix minute
/// (the current one last). A tenant's own row (its stored bytes) is under
/// `tenant/`.
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<Rows>);

/// `tenant/name` → (Unix minute, sums) pairs.
type Rows = HashMap<Arc<str>, Vec<(u64, Pending)>>;

/// This thread's shard.
fn my_shard() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    MINE.with(|i| *i)
}

/// The node's meter.
#[derive(Default)]
pub struct Meter {
    /// Sums not yet stored.
    pending: [Shard; SHARDS],
    /// Sums a flush failed to store, for the next one.
    unwritten: Mutex<Vec<(String, Usage)>>,
    /// Held by a flush from taking the rows until they are written: a
    /// flush that finds nothing pending because another took it first
    /// returns only once that one's rows are stored (a usage query flushes
    /// and then reads, and must see them).
    flushing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").finish_non_exhaustive()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The current Unix minute.
pub fn this_minute() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 60)
}

impl Meter {
    /// Charge a call of `function` (`tenant/name`) to its tenant: one that
    /// ran (`usage`), or one refused before it ran (`None`).
    pub fn record(&self, function: &Arc<str>, outcome: Result<(), ErrorKind>, usage: Option<&CallUsage>) {
        let name = match outcome {
            Ok(()) => "ok",
            Err(kind) => kind.as_str(),
        };
        let minute = this_minute();
        let mut shard = self.pending[my_shard()].0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let row = Self::row(&mut shard, function, minute);
        *row.outcomes.entry(name).or_default() += 1;
        let sums = &mut row.usage;
        sums.calls += 1;
        if let Some(used) = usage {
            sums.wall_us += micros(used.wall);
            sums.cpu_us += micros(used.cpu);
            sums.memory_mib_ms += used.memory_mib_ms();
            sums.queued_us += micros(used.queued);
            sums.outbound_requests += u64::from(used.outbound_requests);
            sums.outbound_bytes += used.outbound_bytes;
            sums.spawned += u64::from(used.spawned);
            sums.state_read_bytes += used.state_read_bytes;
            sums.state_written_bytes += used.state_written_bytes;
        }
    }

    /// The row of `function` for `minute` in a shard, made if new.
    fn row<'a>(shard: &'a mut Rows, function: &Arc<str>, minute: u64) -> &'a mut Pending {
        if !shard.contains_key(&**function) {
            shard.insert(function.clone(), Vec::new());
        }
        let minutes = shard.get_mut(&**function).expect("just made");
        if minutes.last().is_none_or(|(m, _)| *m != minute) {
            minutes.push((minute, Pending::default()));
        }
        &mut minutes.last_mut().expect("just made").1
    }

    /// Note `tenant`'s bytes stored in the global state tier this minute.
    pub fn record_stored(&self, tenant: &str, bytes: u64) {
        let key: Arc<str> = Arc::from(format!("{tenant}/"));
        let mut shard = self.pending[my_shard()].0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let row = Self::row(&mut shard, &key, this_minute());
        row.usage.state_stored_bytes = row.usage.state_stored_bytes.max(bytes);
    }

    /// What is pending (and what a failed flush left), as store keys
    /// (`tenant/minute/function`) and sums.
    fn take_rows(&self) -> Vec<(String, Usage)> {
        let mut rows = std::mem::take(&mut *self.unwritten.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for shard in &self.pending {
            let taken = std::mem::take(&mut *shard.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            for (function, minutes) in taken {
                let Some((tenant, name)) = function.split_once('/') else { continue };
                for (minute, mut row) in minutes {
                    row.usage.outcomes = row.outcomes.iter().map(|(k, n)| (k.to_string(), *n)).collect();
                    rows.push((row_key(tenant, minute, name), row.usage));
                }
            }
        }
        // Shards may hold the same function and minute: one row each.
        let mut merged: BTreeMap<String, Usage> = BTreeMap::new();
        for (key, usage) in rows {
            merged.entry(key).or_default().add(&usage);
        }
        merged.into_iter().collect()
    }

    /// Keep rows a flush could not write for the next one.
    fn keep_unwritten(&self, rows: Vec<(String, Usage)>) {
        self.unwritten.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(rows);
    }

    /// Add what is pending to the store (on a blocking thread). On a
    /// failure the sums are kept, for the next flush.
    pub async fn flush(&self, store: &Arc<EmbeddedStore>) -> Result<(), StoreError> {
        let _flushing = self.flushing.lock().await;
        let rows = self.take_rows();
        if rows.is_empty() {
            return Ok(());
        }
        let store = store.clone();
        let kept = rows.clone();
        let written = tokio::task::spawn_blocking(move || {
            store.transaction(|tx| {
                for (key, usage) in &rows {
                    let mut sum = match tx.get(USAGE, key)? {
                        Some(bytes) => serde_json::from_slice::<Usage>(&bytes).unwrap_or_default(),
                        None => Usage::default(),
                    };
                    sum.add(usage);
                    tx.put(USAGE, key, &serde_json::to_vec(&sum).expect("usage encodes"))?;
                }
                Ok(())
            })
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(format!("flushing usage: {e}"))));
        if written.is_err() {
            self.keep_unwritten(kept);
        }
        written
    }

    /// Add what is pending to the cluster's sums in Redis, each minute kept
    /// for `retention`. On a failure the sums are kept, for the next flush.
    pub async fn flush_shared(&self, shared: &SharedUsage, retention: Duration) -> Result<(), String> {
        let _flushing = self.flushing.lock().await;
        let rows = self.take_rows();
        if rows.is_empty() {
            return Ok(());
        }
        let mut by_minute: BTreeMap<(String, u64), Vec<(String, u64)>> = BTreeMap::new();
        let mut gauges: Vec<UsageRow> = Vec::new();
        for (key, usage) in &rows {
            let mut parts = key.splitn(3, '/');
            let (Some(tenant), Some(minute), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let minute = minute.parse().unwrap_or(0);
            let fields = by_minute.entry((tenant.to_string(), minute)).or_default();
            fields.extend(to_fields(usage).into_iter().map(|(metric, n)| (format!("{name}|{metric}"), n)));
            if usage.state_stored_bytes > 0 {
                // The same value whichever node samples it: set, not added.
                let gauge = vec![(format!("{name}|{STORED}"), usage.state_stored_bytes)];
                gauges.push((tenant.to_string(), minute, gauge));
            }
        }
        let shared_rows: Vec<UsageRow> =
            by_minute.into_iter().map(|((tenant, minute), fields)| (tenant, minute, fields)).collect();
        match shared.add(&shared_rows, &gauges, retention).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.keep_unwritten(rows);
                Err(e.to_string())
            }
        }
    }

    /// The same as [`Meter::query`], from the cluster's sums in Redis.
    pub async fn query_shared(shared: &SharedUsage, query: Query) -> Result<Vec<Bucket>, String> {
        let Query { tenant, from, to, step, function, by_function } = query;
        let minutes = shared.read(&tenant, from, to).await.map_err(|e| e.to_string())?;
        let mut buckets: BTreeMap<(u64, Option<String>), Usage> = BTreeMap::new();
        for (minute, fields) in minutes {
            let mut per_function: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
            for (field, n) in &fields {
                if let Some((name, metric)) = field.split_once('|') {
                    per_function.entry(name).or_default().push((metric, *n));
                }
            }
            for (name, metrics) in per_function {
                if function.as_deref().is_some_and(|f| f != name) || (name.is_empty() && by_function) {
                    continue;
                }
                let start = from + (minute - from) / step * step;
                let group = (by_function || function.is_some()).then(|| name.to_string());
                buckets.entry((start, group)).or_default().add(&from_fields(&metrics));
            }
        }
        Ok(buckets.into_iter().map(|((start, function), usage)| Bucket { start, function, usage }).collect())
    }

    /// Remove every tenant's minutes before `cutoff` (a Unix minute) —
    /// deleted tenants' too: the tenants are read off the table, one seek
    /// each.
    pub async fn prune(store: &Arc<EmbeddedStore>, cutoff: u64) -> Result<usize, StoreError> {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            let mut tenants = Vec::new();
            let mut from = String::new();
            // Names are [a-z0-9_-]: `~` sorts after all of them, and `0`
            // right after `/`.
            while let Some((key, _)) = store.scan_range(USAGE, &from, "~", 1)?.pop() {
                let Some((tenant, _)) = key.split_once('/') else { break };
                from = format!("{tenant}0");
                tenants.push(tenant.to_string());
            }
            for tenant in tenants {
                let old =
                    store.scan_range(USAGE, &format!("{tenant}/"), &format!("{tenant}/{cutoff:010}"), usize::MAX)?;
                if old.is_empty() {
                    continue;
                }
                store.transaction(|tx| {
                    for (key, _) in &old {
                        tx.delete(USAGE, key)?;
                    }
                    Ok(())
                })?;
                removed += old.len();
            }
            Ok(removed)
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(format!("pruning usage: {e}"))))
    }

    /// `tenant`'s stored usage in minutes `from..to`, summed into buckets
    /// of `step` minutes (aligned to `from`), per function when
    /// `by_function`, of one function when `function` names it.
    pub async fn query(store: &Arc<EmbeddedStore>, query: Query) -> Result<Vec<Bucket>, StoreError> {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let Query { tenant, from, to, step, function, by_function } = query;
            let (start, end) = (format!("{tenant}/{from:010}/"), format!("{tenant}/{to:010}/"));
            let rows = store.scan_range(USAGE, &start, &end, usize::MAX)?;
            let mut buckets: BTreeMap<(u64, Option<String>), Usage> = BTreeMap::new();
            for (key, bytes) in rows {
                let mut parts = key.splitn(3, '/');
                let (_, Some(minute), Some(name)) = (parts.next(), parts.next(), parts.next()) else { continue };
                if function.as_deref().is_some_and(|f| f != name) || (name.is_empty() && by_function) {
                    continue;
                }
                let Ok(minute) = minute.parse::<u64>() else { continue };
                let Ok(usage) = serde_json::from_slice::<Usage>(&bytes) else { continue };
                let start = from + (minute - from) / step * step;
                let group = (by_function || function.is_some()).then(|| name.to_string());
                buckets.entry((start, group)).or_default().add(&usage);
            }
            Ok(buckets.into_iter().map(|((start, function), usage)| Bucket { start, function, usage }).collect())
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(format!("reading usage: {e}"))))
    }
}

/// Flush every `usage_flush`, and remove what is past `usage_retention`
/// once a minute.
pub(crate) fn spawn_chore(node: &Arc<crate::Node>) {
    let weak = Arc::downgrade(node);
    crate::supervise(node, "usage", move || {
        let weak = weak.clone();
        async move {
            let mut pruned_at = 0;
            loop {
                let Some(node) = weak.upgrade() else { return };
                let every = node.config.usage_flush;
                node.metrics.rerank();
                if let Err(e) = node.flush_usage().await {
                    tracing::warn!(error = %e, "writing usage failed; kept for the next try");
                }
                let minute = this_minute();
                if minute != pruned_at {
                    pruned_at = minute;
                    node.sample_stored(node.registry.tenant_names()).await;
                    let keep = node.config.usage_retention.as_secs() / 60;
                    if let Err(e) = Meter::prune(&node.usage_store, minute.saturating_sub(keep)).await {
                        tracing::warn!(error = %e, "removing old usage failed");
                    }
                }
                drop(node);
                tokio::time::sleep(every).await;
            }
        }
    });
}

impl crate::Node {
    /// Count a call of `function` in the metrics and charge it to its
    /// tenant (see [`Meter::record`]): one that ran for `elapsed` and used
    /// `usage`, or one refused before it ran (`None`, `None`); and note it
    /// in the function's recent calls (`call_id`, its trace when sampled).
    pub(crate) fn account(
        &self,
        function: &crate::registry::DeployedFunction,
        (call_id, trace_id): (&str, Option<&str>),
        outcome: Result<(), ErrorKind>,
        elapsed: Option<Duration>,
        usage: Option<&CallUsage>,
    ) {
        let (tenant, key) = (&function.settings.tenant, &function.key);
        let cpu = usage.map_or(Duration::ZERO, |u| u.cpu);
        self.metrics.record_call(tenant, key, outcome, elapsed.map(|wall| (wall, cpu)));
        self.usage.record(key, outcome, usage);
        let ended = crate::activity::Ended {
            call_id,
            trace_id,
            outcome: outcome.map_err(ErrorKind::as_str),
            elapsed,
            cpu: usage.map(|u| u.cpu),
        };
        function.history.record(crate::now_ms(), ended);
    }

    /// Note every tenant's bytes in the global state tier (the tier's own
    /// count, what the quota checks) for this minute.
    async fn sample_stored(&self, tenants: Vec<String>) {
        for tenant in tenants {
            match self.state.global().usage(&tenant).await {
                Ok(bytes) if bytes > 0 => self.usage.record_stored(&tenant, bytes),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, %tenant, "reading a tenant's stored state bytes failed"),
            }
        }
    }

    /// Write what is pending: to the cluster's sums in Redis, or to the
    /// node's store.
    pub(crate) async fn flush_usage(&self) -> Result<(), String> {
        match self.cluster.as_ref().and_then(|c| c.usage.as_ref()) {
            Some(shared) => self.usage.flush_shared(shared, self.config.usage_retention).await,
            None => self.usage.flush(&self.usage_store).await.map_err(|e| e.to_string()),
        }
    }

    /// `query`, with what is pending written first (this node's: another
    /// node's last `usage_flush` may not be in yet) and the tenant's stored
    /// bytes sampled now.
    pub async fn usage(&self, query: Query) -> Result<Vec<Bucket>, String> {
        self.sample_stored(vec![query.tenant.clone()]).await;
        self.flush_usage().await?;
        match self.cluster.as_ref().and_then(|c| c.usage.as_ref()) {
            Some(shared) => Meter::query_shared(shared, query).await,
            None => Meter::query(&self.usage_store, query).await.map_err(|e| e.to_string()),
        }
    }
}

/// A row's sums as `(metric, amount)`: outcomes as `o:NAME`.
fn to_fields(usage: &Usage) -> Vec<(String, u64)> {
    let mut fields = vec![
        ("calls".to_string(), usage.calls),
        ("wall_us".to_string(), usage.wall_us),
        ("cpu_us".to_string(), usage.cpu_us),
        ("memory_mib_ms".to_string(), usage.memory_mib_ms),
        ("queued_us".to_string(), usage.queued_us),
        ("outbound_requests".to_string(), usage.outbound_requests),
        ("outbound_bytes".to_string(), usage.outbound_bytes),
        ("spawned".to_string(), usage.spawned),
        ("state_read_bytes".to_string(), usage.state_read_bytes),
        ("state_written_bytes".to_string(), usage.state_written_bytes),
    ];
    fields.retain(|(_, n)| *n > 0);
    fields.extend(usage.outcomes.iter().map(|(outcome, n)| (format!("o:{outcome}"), *n)));
    fields
}

fn from_fields(fields: &[(&str, u64)]) -> Usage {
    let mut usage = Usage::default();
    for (metric, n) in fields {
        let n = *n;
        match *metric {
            "calls" => usage.calls += n,
            "wall_us" => usage.wall_us += n,
            "cpu_us" => usage.cpu_us += n,
            "memory_mib_ms" => usage.memory_mib_ms += n,
            "queued_us" => usage.queued_us += n,
            "outbound_requests" => usage.outbound_requests += n,
            "outbound_bytes" => usage.outbound_bytes += n,
            "spawned" => usage.spawned += n,
            "state_read_bytes" => usage.state_read_bytes += n,
            "state_written_bytes" => usage.state_written_bytes += n,
            STORED => usage.state_stored_bytes = usage.state_stored_bytes.max(n),
            other => {
                if let Some(outcome) = other.strip_prefix("o:") {
                    *usage.outcomes.entry(outcome.to_string()).or_default() += n;
                }
            }
        }
    }
    usage
}

/// The field of the tenant-wide stored-bytes gauge.
const STORED: &str = "state_stored_bytes";

fn row_key(tenant: &str, minute: u64, name: &str) -> String {
    format!("{tenant}/{minute:010}/{name}")
}

/// What a usage query asks for (minutes are Unix minutes).
#[derive(Clone, Debug)]
pub struct Query {
    pub tenant: String,
    pub from: u64,
    pub to: u64,
    pub step: u64,
    pub function: Option<String>,
    pub by_function: bool,
}

/// One bucket of a usage query's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Its first minute (Unix minutes).
    pub start: u64,
    pub function: Option<String>,
    pub usage: Usage,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flush that finds the pending rows taken by another flush still
    /// writing them returns only once they are stored: a usage query
    /// (flush, then read) sees every call counted before it, even when the
    /// node's periodic flush ran at the same moment.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_returns_only_once_what_was_pending_before_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("usage.redb")).unwrap());
        let meter = Arc::new(Meter::default());
        let function: Arc<str> = Arc::from("acme/f");
        let from = this_minute();
        for round in 1..=40u64 {
            meter.record(&function, Ok(()), None);
            let chore = {
                let (meter, store) = (meter.clone(), store.clone());
                tokio::spawn(async move { meter.flush(&store).await })
            };
            meter.flush(&store).await.unwrap();
            let query =
                Query { tenant: "acme".into(), from, to: from + 5, step: 5, function: None, by_function: false };
            let calls: u64 = Meter::query(&store, query).await.unwrap().iter().map(|b| b.usage.calls).sum();
            assert_eq!(calls, round, "a flush returned before the calls counted ahead of it were stored");
            chore.await.unwrap().unwrap();
        }
    }
}
