//! Usage metering: what every call used, charged to its tenant and
//! function, summed per minute and kept in the node's store.
//!
//! A call's usage (`shoal_runtime::CallUsage`, with the CPU and queue time
//! the scheduler measured) is added to a pending table in memory: one
//! uncontended lock and a map update per call. The `usage` chore writes
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
    }
}

/// Pending sums of one function in one minute: outcomes by static name,
/// so that recording a call allocates nothing once its row exists.
#[derive(Default)]
struct Pending {
    outcomes: BTreeMap<&'static str, u64>,
    usage: Usage,
}

type PendingKey = (Arc<str>, Arc<str>, u64);

/// The node's meter.
#[derive(Default)]
pub struct Meter {
    /// (tenant, `tenant/name`, Unix minute) → sums not yet stored.
    pending: Mutex<HashMap<PendingKey, Pending>>,
    /// Sums a flush failed to store, for the next one.
    unwritten: Mutex<Vec<(String, Usage)>>,
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
    /// Charge a call of `function` (`tenant/name`) to `tenant`: one that
    /// ran (`usage`), or one refused before it ran (`None`).
    pub fn record(
        &self,
        tenant: &Arc<str>,
        function: &Arc<str>,
        outcome: Result<(), ErrorKind>,
        usage: Option<&CallUsage>,
    ) {
        let name = match outcome {
            Ok(()) => "ok",
            Err(kind) => kind.as_str(),
        };
        let minute = this_minute();
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let row = pending.entry((tenant.clone(), function.clone(), minute)).or_default();
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
        }
    }

    /// Add what is pending to the store (on a blocking thread). On a
    /// failure the sums are kept pending, for the next flush.
    pub async fn flush(&self, store: &Arc<EmbeddedStore>) -> Result<(), StoreError> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let mut rows = std::mem::take(&mut *self.unwritten.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if taken.is_empty() && rows.is_empty() {
            return Ok(());
        }
        for ((_, function, minute), mut row) in taken {
            let Some((tenant, name)) = function.split_once('/') else { continue };
            row.usage.outcomes = row.outcomes.iter().map(|(k, n)| (k.to_string(), *n)).collect();
            rows.push((row_key(tenant, minute, name), row.usage));
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
            // Kept for the next flush.
            self.unwritten.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(kept);
        }
        written
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
                if function.as_deref().is_some_and(|f| f != name) {
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
                if let Err(e) = node.usage.flush(&node.usage_store).await {
                    tracing::warn!(error = %e, "writing usage failed; kept for the next try");
                }
                let minute = this_minute();
                if minute != pruned_at {
                    pruned_at = minute;
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
    /// Charge a call of `function` to its tenant (see [`Meter::record`]).
    pub(crate) fn meter(
        &self,
        function: &crate::registry::DeployedFunction,
        outcome: Result<(), ErrorKind>,
        usage: Option<&CallUsage>,
    ) {
        self.usage.record(&function.settings.tenant, &function.key, outcome, usage);
    }

    /// `query`, with what is pending stored first.
    pub async fn usage(&self, query: Query) -> Result<Vec<Bucket>, StoreError> {
        self.usage.flush(&self.usage_store).await?;
        Meter::query(&self.usage_store, query).await
    }
}

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
