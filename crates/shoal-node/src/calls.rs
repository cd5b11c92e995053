//! Asynchronous calls: accepted at once (`POST …/invoke?async=true` → 202
//! and a call id), run when a call slot is free, their records readable at
//! `GET /v1/calls/{id}` for the retention time (default 24 h).
//!
//! Records live in the node's embedded store, every change durable before
//! it is acknowledged:
//! - `calls`: id → the record (JSON: status, function, timings, error);
//! - `call_inputs`: id → input, until the call finishes;
//! - `call_outputs`: id → output of a call that succeeded;
//! - `calls_pending`: ids of calls queued or running;
//! - `calls_of`: `tenant/id` → the call's status, so a tenant's recent
//!   calls (by status) are listed from its own entries, newest first,
//!   whatever other tenants keep.
//!
//! Guarantee: at least once. A call accepted before a crash is still
//! pending after the restart and runs then (again, if it was running when
//! the node died); a finished call's record and output stay readable.
//! Call ids start with the acceptance time (hex milliseconds), so the
//! oldest records come first and the retention sweep reads only those.
//!
//! In a cluster the records live in Redis instead ([`CallQueue`]): any
//! node accepts a call into the shared queue, whichever node has room
//! takes it under its heartbeat's lease and runs it, and the calls of a
//! node that dies go back to the queue. Still at least once; finished
//! records expire in Redis after the retention time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_cluster::{CallQueue, ClusterError, Finished, Refused, TakenCall};
use shoal_state::{EmbeddedStore, StoreError, Table};

use crate::error::{ApiError, ErrorKind};
use crate::{Node, now_ms};

const CALLS: Table = Table::new("calls");
const INPUTS: Table = Table::new("call_inputs");
const OUTPUTS: Table = Table::new("call_outputs");
const PENDING: Table = Table::new("calls_pending");
const CALLS_OF: Table = Table::new("calls_of");

fn index_key(tenant: &str, id: &str) -> String {
    format!("{tenant}/{id}")
}

/// The most entries of its own one listing of a tenant's calls reads (on
/// one node; in a cluster, the most recent records it reads).
const LIST_SCAN: usize = 10_000;
const LIST_SCAN_CLUSTER: usize = 1_000;

/// How often expired records are removed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Records removed per sweep transaction.
const SWEEP_BATCH: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl CallStatus {
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Queued, Self::Running, Self::Succeeded, Self::Failed].into_iter().find(|s| s.as_str() == text)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallRecord {
    pub call_id: String,
    pub tenant: String,
    pub function: String,
    pub status: CallStatus,
    pub queued_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// Times the call was started (more than 1 after a crash mid-call).
    pub attempts: u32,
    pub error: Option<CallFailure>,
    /// Bytes of its output, kept (records written before this was counted
    /// have none, and count as 0 against the tenant's output bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// The W3C `traceparent` of the request that made it, when traced:
    /// its run hangs under that span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The cron trigger's tick it runs, when a trigger made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<TriggerTick>,
}

/// A trigger's tick, as a call made by it records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerTick {
    /// The trigger's name (of the call's tenant).
    pub name: String,
    /// When the tick fell (Unix ms).
    pub tick_ms: u64,
}

impl CallRecord {
    fn queued(call_id: String, tenant: &str, function: &str, now: u64) -> Self {
        Self {
            call_id,
            tenant: tenant.to_string(),
            function: function.to_string(),
            status: CallStatus::Queued,
            queued_at_ms: now,
            started_at_ms: None,
            finished_at_ms: None,
            attempts: 0,
            error: None,
            output_bytes: None,
            traceparent: None,
            trigger: None,
        }
    }
}

impl CallRecord {
    /// The call's output of `len` bytes would pass its tenant's `limit` of
    /// kept output bytes: it is recorded failed, without the output.
    fn drop_output(&mut self, len: u64, limit: u64) {
        self.status = CallStatus::Failed;
        self.error = Some(CallFailure {
            kind: ErrorKind::LimitExceeded.as_str().to_string(),
            message: format!(
                "the call's output ({len} bytes) would pass tenant `{}`'s limit of {limit} bytes of kept outputs; it was dropped",
                self.tenant
            ),
        });
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallFailure {
    pub kind: String,
    pub message: String,
}

fn encode(record: &CallRecord) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}

fn decode(id: &str, bytes: &[u8]) -> Result<CallRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Io(format!("call record {id} is corrupt: {e}")))
}

/// Why a call record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// A trigger's tick to accept as a call at most once.
#[derive(Clone, Debug)]
pub(crate) struct Tick {
    /// `tenant/name`: the trigger's progress is kept under it.
    pub key: String,
    pub name: String,
    pub tick_ms: u64,
    /// The trigger's `updated_ms` when the tick was found due: a tick of a
    /// trigger changed (or paused) since is not run.
    pub generation: u64,
}

/// A tenant's asynchronous calls on this node.
struct TenantCalls {
    unfinished: usize,
    /// Its calls asking the scheduler for a turn at once: the others wait
    /// here, in order, so a tenant's backlog is drained by the
    /// scheduler's round robin among tenants without polling it.
    turns: Arc<tokio::sync::Semaphore>,
}

/// A tenant's asynchronous calls that may ask the scheduler for a turn at
/// once.
const ASYNC_TURNS_PER_TENANT: usize = 16;

/// The records of asynchronous calls and the count of those not finished.
pub(crate) struct AsyncCalls {
    store: Arc<EmbeddedStore>,
    /// The cluster's queue, when this node is one of a cluster: records
    /// live there, not in `store`.
    queue: Option<CallQueue>,
    /// Queued or running on this node now.
    unfinished: AtomicUsize,
    max_unfinished: usize,
    /// Unfinished calls per tenant, and the most one tenant may have.
    tenants: std::sync::Mutex<std::collections::HashMap<String, TenantCalls>>,
    max_per_tenant: usize,
    retention: Duration,
    /// What each tenant's records hold on this node (one node only: in a
    /// cluster, records live in Redis), and the most they may.
    kept: std::sync::Mutex<std::collections::HashMap<String, Kept>>,
    kept_limits: KeptLimits,
}

/// The records of asynchronous calls a tenant may keep.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeptLimits {
    pub records: usize,
    pub output_bytes: u64,
}

/// What a tenant's records hold.
#[derive(Clone, Copy, Debug, Default)]
struct Kept {
    records: usize,
    output_bytes: u64,
}

impl AsyncCalls {
    pub(crate) fn new(
        store: Arc<EmbeddedStore>,
        queue: Option<CallQueue>,
        max_unfinished: usize,
        max_per_tenant: usize,
        retention: Duration,
        kept_limits: KeptLimits,
    ) -> Result<Self, StoreError> {
        // What each tenant keeps, counted once from the records at start.
        let mut kept: std::collections::HashMap<String, Kept> = Default::default();
        if queue.is_none() {
            // The index made right with the records (a version of the node
            // before the index, or an older one run since, kept records it
            // does not name or statuses it does not know): entries missing
            // or stale are written, those of records gone removed.
            let mut indexed: std::collections::HashMap<String, Vec<u8>> =
                store.scan_prefix(CALLS_OF, "")?.into_iter().collect();
            let mut writes: Vec<(String, Option<&'static str>)> = Vec::new();
            for (id, bytes) in store.scan_prefix(CALLS, "")? {
                let Ok(record) = decode(&id, &bytes) else { continue };
                let key = index_key(&record.tenant, &id);
                let status = record.status.as_str();
                if indexed.remove(&key).is_none_or(|s| s != status.as_bytes()) {
                    writes.push((key, Some(status)));
                }
                let entry = kept.entry(record.tenant).or_default();
                entry.records += 1;
                entry.output_bytes += record.output_bytes.unwrap_or(0);
            }
            writes.extend(indexed.into_keys().map(|orphan| (orphan, None)));
            for batch in writes.chunks(SWEEP_BATCH) {
                store.transaction(|tx| {
                    for (key, status) in batch {
                        match status {
                            Some(status) => tx.put(CALLS_OF, key, status.as_bytes())?,
                            None => {
                                tx.delete(CALLS_OF, key)?;
                            }
                        }
                    }
                    Ok(())
                })?;
            }
        }
        Ok(Self {
            store,
            queue,
            unfinished: AtomicUsize::new(0),
            max_unfinished,
            tenants: Default::default(),
            max_per_tenant,
            retention,
            kept: std::sync::Mutex::new(kept),
            kept_limits,
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Kept>> {
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Refuse a new call of `tenant` if its records are at their limits.
    fn check_kept(&self, tenant: &str) -> Result<(), ApiError> {
        let kept = self.kept().get(tenant).copied().unwrap_or_default();
        let limits = self.kept_limits;
        if kept.records >= limits.records {
            return Err(self.kept_full(tenant, format!("{} records", limits.records)));
        }
        if kept.output_bytes >= limits.output_bytes {
            return Err(self.kept_full(tenant, format!("{} bytes of outputs", limits.output_bytes)));
        }
        Ok(())
    }

    fn kept_full(&self, tenant: &str, what: String) -> ApiError {
        ApiError::new(
            ErrorKind::LimitExceeded,
            format!(
                "tenant `{tenant}` keeps {what} of asynchronous calls, its limit; records expire {} s after their call",
                self.retention.as_secs()
            ),
        )
    }

    /// Count `output` against its tenant's output bytes, or, past them,
    /// fail the call with `limit_exceeded` and drop its output.
    fn keep_output(&self, record: &mut CallRecord, output: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let output = output?;
        let len = output.len() as u64;
        let mut kept = self.kept();
        let entry = kept.entry(record.tenant.clone()).or_default();
        if entry.output_bytes.saturating_add(len) > self.kept_limits.output_bytes {
            drop(kept);
            record.drop_output(len, self.kept_limits.output_bytes);
            return None;
        }
        entry.output_bytes += len;
        record.output_bytes = Some(len);
        Some(output)
    }

    /// Records of `tenant` removed: uncount them.
    fn forget_kept(&self, removed: &[CallRecord]) {
        let mut kept = self.kept();
        for record in removed {
            if let Some(entry) = kept.get_mut(&record.tenant) {
                entry.records = entry.records.saturating_sub(1);
                entry.output_bytes = entry.output_bytes.saturating_sub(record.output_bytes.unwrap_or(0));
                if entry.records == 0 {
                    kept.remove(&record.tenant);
                }
            }
        }
    }

    fn full(&self, what: &str) -> ApiError {
        ApiError {
            kind: ErrorKind::Overloaded,
            message: format!("{} asynchronous calls are waiting already, the most {what} keeps", self.max_unfinished),
            retry_after: Some(Duration::from_secs(1)),
        }
    }

    fn tenant_full(&self, tenant: &str, where_: &str) -> ApiError {
        ApiError {
            kind: ErrorKind::Overloaded,
            message: format!("tenant `{tenant}` has {} asynchronous calls {where_}, its limit", self.max_per_tenant),
            retry_after: Some(Duration::from_secs(1)),
        }
    }

    pub(crate) fn unfinished(&self) -> usize {
        self.unfinished.load(Ordering::Relaxed)
    }

    /// Count one more unfinished call of `tenant` (refused past its
    /// share or the node's limit, unless `forced`: a call accepted before
    /// a restart).
    fn count(&self, tenant: &str, forced: bool) -> Result<(), ApiError> {
        let mut tenants = self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let calls = tenants.entry(tenant.to_string()).or_insert_with(|| TenantCalls {
            unfinished: 0,
            turns: Arc::new(tokio::sync::Semaphore::new(ASYNC_TURNS_PER_TENANT)),
        });
        if !forced && calls.unfinished >= self.max_per_tenant {
            return Err(self.tenant_full(tenant, "waiting or running on this node"));
        }
        let admitted = self.unfinished.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (forced || n < self.max_unfinished).then_some(n + 1)
        });
        if admitted.is_err() {
            return Err(self.full("this node"));
        }
        calls.unfinished += 1;
        Ok(())
    }

    /// One unfinished call of `tenant` fewer.
    fn uncount(&self, tenant: &str) {
        self.unfinished.fetch_sub(1, Ordering::AcqRel);
        let mut tenants = self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(calls) = tenants.get_mut(tenant) {
            calls.unfinished = calls.unfinished.saturating_sub(1);
            if calls.unfinished == 0 {
                tenants.remove(tenant);
            }
        }
    }

    /// Wait until `tenant`'s call may ask the scheduler for its turn.
    async fn turn(&self, tenant: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let turns = self
            .tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .map(|calls| calls.turns.clone())?;
        turns.acquire_owned().await.ok()
    }

    /// A new id: acceptance time first (so ids sort by age), then 64
    /// random bits.
    fn new_id(now_ms: u64) -> String {
        format!("{now_ms:012x}{}", crate::new_call_id())
    }

    /// Record an accepted call, durably, and count it; refused when too
    /// many are unfinished. A trigger's `tick` is accepted only if it is
    /// later than the trigger's last accepted tick, which it becomes in the
    /// same step (in the same transaction here, in the same script in a
    /// cluster): None when it is not (the tick was run already), or the
    /// trigger is gone.
    async fn accept(
        &self,
        tenant: &str,
        function: &str,
        input: Vec<u8>,
        trace: Option<shoal_runtime::TraceParent>,
        tick: Option<&Tick>,
    ) -> Result<Option<CallRecord>, ApiError> {
        let now = now_ms();
        let queued = |id| CallRecord {
            traceparent: trace.map(|t| t.header()),
            trigger: tick.map(|t| TriggerTick { name: t.name.clone(), tick_ms: t.tick_ms }),
            ..CallRecord::queued(id, tenant, function, now)
        };
        if let Some(queue) = &self.queue {
            let record = queued(Self::new_id(now));
            let queued = queue
                .accept(
                    tenant,
                    &record.call_id,
                    &encode(&record),
                    &input,
                    self.max_unfinished,
                    self.max_per_tenant,
                    tick.map(|t| shoal_cluster::TickClaim {
                        trigger: &t.key,
                        tick_ms: t.tick_ms,
                        generation: t.generation,
                    }),
                )
                .await?;
            return match queued {
                Ok(()) => Ok(Some(record)),
                Err(Refused::TickTaken) => Ok(None),
                Err(Refused::TickEarly) => Err(ApiError {
                    kind: ErrorKind::Unavailable,
                    message: "the tick is not due yet by Redis's clock (this node's clock runs ahead)".into(),
                    retry_after: Some(Duration::from_secs(1)),
                }),
                Err(Refused::Cluster) => Err(self.full("the cluster")),
                Err(Refused::Tenant) => Err(self.tenant_full(tenant, "queued in the cluster")),
                Err(Refused::TenantRecords) => {
                    Err(self.kept_full(tenant, format!("{} records", self.kept_limits.records)))
                }
                Err(Refused::TenantOutput) => {
                    Err(self.kept_full(tenant, format!("{} bytes of outputs", self.kept_limits.output_bytes)))
                }
            };
        }
        self.check_kept(tenant)?;
        self.count(tenant, false)?;
        let record = queued(Self::new_id(now));
        let (store, stored) = (self.store.clone(), record.clone());
        let tick = tick.map(|t| (t.key.clone(), t.tick_ms, t.generation));
        let written = tokio::task::spawn_blocking(move || {
            let id = stored.call_id.as_str();
            store.transaction(|tx| {
                if let Some((key, tick_ms, generation)) = &tick {
                    // Removed, changed or paused while its tick was being
                    // offered: not run.
                    let current = tx.get(crate::triggers::TRIGGERS, key)?;
                    if !current.as_deref().is_some_and(|r| crate::triggers::is_generation(r, *generation)) {
                        return Ok(false);
                    }
                    let last = tx.get(crate::triggers::TICKS, key)?;
                    if last.as_deref().and_then(crate::triggers::parse_progress).is_some_and(|(t, _)| t >= *tick_ms) {
                        return Ok(false);
                    }
                    tx.put(crate::triggers::TICKS, key, format!("{tick_ms} {id}").as_bytes())?;
                }
                tx.put(CALLS, id, &encode(&stored))?;
                tx.put(CALLS_OF, &index_key(&stored.tenant, id), stored.status.as_str().as_bytes())?;
                tx.put(INPUTS, id, &input)?;
                tx.put(PENDING, id, b"")?;
                Ok(true)
            })
        })
        .await;
        match written {
            Ok(Ok(true)) => {
                self.kept().entry(tenant.to_string()).or_default().records += 1;
                Ok(Some(record))
            }
            Ok(Ok(false)) => {
                self.uncount(tenant);
                Ok(None)
            }
            failed => {
                self.uncount(tenant);
                Err(match failed {
                    Ok(Err(e)) => ApiError::from(e),
                    _ => ApiError::internal("recording an asynchronous call", "the store task failed"),
                })
            }
        }
    }

    /// The record of `id`, if it is still kept.
    pub(crate) async fn get(&self, id: &str) -> Result<Option<(CallRecord, Option<Vec<u8>>)>, ApiError> {
        if let Some(queue) = &self.queue {
            let Some((bytes, output)) = queue.get(id).await? else { return Ok(None) };
            let record = decode(id, &bytes)?;
            let output = output.filter(|_| record.status == CallStatus::Succeeded);
            return Ok(Some((record, output)));
        }
        let (store, id) = (self.store.clone(), id.to_string());
        let found = tokio::task::spawn_blocking(move || {
            store.snapshot(|tx| {
                let Some(bytes) = tx.get(CALLS, &id)? else { return Ok(None) };
                let record = decode(&id, &bytes)?;
                let output = if record.status == CallStatus::Succeeded { tx.get(OUTPUTS, &id)? } else { None };
                Ok(Some((record, output)))
            })
        })
        .await
        .map_err(|e| ApiError::internal("reading a call record", e))?;
        Ok(found?)
    }

    /// Up to `most` of `tenant`'s calls (with `status`, if given), newest
    /// first. On one node it reads the tenant's own index, at most
    /// `LIST_SCAN` entries; in a cluster, the tenant's `LIST_SCAN_CLUSTER`
    /// most recent records.
    pub(crate) async fn list(
        &self,
        tenant: &str,
        status: Option<CallStatus>,
        most: usize,
    ) -> Result<Vec<CallRecord>, ApiError> {
        if let Some(queue) = &self.queue {
            // Any status: the newest `most` are enough; one status: read
            // more and filter.
            let read = if status.is_some() { LIST_SCAN_CLUSTER } else { most.min(LIST_SCAN_CLUSTER) };
            let found = queue.recent_of(tenant, read).await?;
            let mut records: Vec<CallRecord> = found
                .into_iter()
                .filter_map(|(id, bytes)| decode(&id, &bytes).ok())
                .filter(|r| r.tenant == tenant && status.is_none_or(|s| r.status == s))
                .collect();
            records.sort_by(|a, b| b.call_id.cmp(&a.call_id));
            records.truncate(most);
            return Ok(records);
        }
        let (store, prefix) = (self.store.clone(), index_key(tenant, ""));
        let found = tokio::task::spawn_blocking(move || {
            store.snapshot(|tx| {
                let (mut ids, mut scanned) = (Vec::new(), 0);
                tx.visit_prefix_rev(CALLS_OF, &prefix, |key, value| {
                    scanned += 1;
                    if status.is_none_or(|s| value == s.as_str().as_bytes()) {
                        ids.push(key[prefix.len()..].to_string());
                    }
                    ids.len() < most && scanned < LIST_SCAN
                })?;
                let mut records = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(bytes) = tx.get(CALLS, &id)? {
                        records.push(decode(&id, &bytes)?);
                    }
                }
                Ok(records)
            })
        })
        .await
        .map_err(|e| ApiError::internal("listing call records", e))?;
        Ok(found?)
    }

    fn update(&self, record: &CallRecord, output: Option<&[u8]>) -> Result<(), StoreError> {
        let id = record.call_id.as_str();
        self.store.transaction(|tx| {
            tx.put(CALLS, id, &encode(record))?;
            tx.put(CALLS_OF, &index_key(&record.tenant, id), record.status.as_str().as_bytes())?;
            if record.status.is_finished() {
                tx.delete(INPUTS, id)?;
                tx.delete(PENDING, id)?;
                if let Some(output) = output {
                    tx.put(OUTPUTS, id, output)?;
                }
            }
            Ok(())
        })
    }

    /// `tenant`'s calls queued or running on this node.
    pub(crate) fn unfinished_of(&self, tenant: &str) -> usize {
        self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(tenant).map_or(0, |c| c.unfinished)
    }

    /// Remove every record of `tenant`'s calls on this node (records,
    /// inputs, outputs, pending marks); returns how many. Records carry no
    /// tenant in their key, so this reads every record once: it runs only
    /// when a tenant is deleted. (In a cluster the records live in Redis:
    /// see `CallQueue::forget_tenant`.)
    pub(crate) fn delete_records_of(&self, tenant: &str) -> Result<usize, StoreError> {
        if self.queue.is_some() {
            // In a cluster: `Node::delete_records_of` asks the queue.
            return Ok(0);
        }
        let ids: Vec<String> = self
            .store
            .scan_prefix(CALLS, "")?
            .into_iter()
            .filter(|(id, bytes)| decode(id, bytes).is_ok_and(|r| r.tenant == tenant))
            .map(|(id, _)| id)
            .collect();
        for batch in ids.chunks(SWEEP_BATCH) {
            self.store.transaction(|tx| {
                for id in batch {
                    for table in [CALLS, INPUTS, OUTPUTS, PENDING] {
                        tx.delete(table, id)?;
                    }
                    tx.delete(CALLS_OF, &index_key(tenant, id))?;
                }
                Ok(())
            })?;
        }
        self.kept().remove(tenant);
        Ok(ids.len())
    }

    /// Calls accepted but not finished (after a restart: those the last
    /// run of the node did not finish).
    fn pending(&self) -> Result<Vec<(String, String)>, StoreError> {
        let ids: Vec<String> = self.store.scan_prefix(PENDING, "")?.into_iter().map(|(id, _)| id).collect();
        self.store.snapshot(|tx| {
            let mut pending = Vec::with_capacity(ids.len());
            for id in ids {
                // A pending id without a readable record runs (and is
                // dropped) like any other; its tenant is unknown.
                let tenant = tx.get(CALLS, &id)?.and_then(|bytes| decode(&id, &bytes).ok()).map(|r| r.tenant);
                pending.push((id, tenant.unwrap_or_default()));
            }
            Ok(pending)
        })
    }

    /// Remove finished records accepted more than the retention time ago.
    fn sweep(&self) -> Result<usize, StoreError> {
        // Ids start with the acceptance time: those before the cutoff were
        // accepted at least the retention time ago.
        let cutoff = format!("{:012x}", now_ms().saturating_sub(self.retention.as_millis() as u64) + 1);
        let mut removed = 0;
        loop {
            let old = self.store.scan_before(CALLS, &cutoff, SWEEP_BATCH)?;
            let n = old.len();
            let finished: Vec<CallRecord> = old
                .iter()
                .filter_map(|(id, bytes)| decode(id, bytes).ok())
                .filter(|r| r.status.is_finished())
                .collect();
            self.store.transaction(|tx| {
                for record in &finished {
                    tx.delete(CALLS, &record.call_id)?;
                    tx.delete(OUTPUTS, &record.call_id)?;
                    tx.delete(CALLS_OF, &index_key(&record.tenant, &record.call_id))?;
                }
                Ok(())
            })?;
            self.forget_kept(&finished);
            removed += finished.len();
            // Unfinished records this old cannot exist (a call runs at most
            // 15 minutes); if one did, stop rather than loop over it.
            if n < SWEEP_BATCH || finished.len() < n {
                return Ok(removed);
            }
        }
    }
}

impl Node {
    /// Accept an asynchronous call of a deployed function; it runs as soon
    /// as a call slot is free.
    pub(crate) async fn accept_async(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        input: Vec<u8>,
        trace: Option<shoal_runtime::TraceParent>,
    ) -> Result<String, ApiError> {
        let accepted = self.accept_async_tick(tenant, name, input, trace, None).await?;
        accepted.ok_or_else(|| ApiError::internal("accepting an asynchronous call", "refused as a trigger's tick"))
    }

    /// [`Node::accept_async`], for a trigger's `tick` when given: None if
    /// that tick was accepted already (here, or by another node).
    pub(crate) async fn accept_async_tick(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        input: Vec<u8>,
        trace: Option<shoal_runtime::TraceParent>,
        tick: Option<&Tick>,
    ) -> Result<Option<String>, ApiError> {
        // The record names the version the call runs (an alias may split).
        let resolved = self.registry.resolve(tenant, name, || crate::names::route_bucket(None));
        let name = resolved.map_or_else(|| name.to_string(), |f| f.reference());
        let Some(record) = self.async_calls.accept(tenant, &name, input, trace, tick).await? else { return Ok(None) };
        let id = record.call_id.clone();
        match &self.cluster {
            // Whichever node has room takes it from the queue; this one
            // looks at once.
            Some(cluster) => cluster.queued.notify_one(),
            None => self.spawn_async(record.call_id, record.tenant),
        }
        Ok(Some(id))
    }

    fn spawn_async(self: &Arc<Self>, id: String, tenant: String) {
        let node = self.clone();
        tokio::spawn(async move {
            // The call runs on a task of its own, so a panic in it is seen
            // here: recorded as the call's failure, and the tenant's count
            // given back either way.
            let run = {
                let (node, id) = (node.clone(), id.clone());
                tokio::spawn(async move { node.run_async(&id).await })
            };
            match run.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(call_id = %id, error = %e, "an asynchronous call could not be recorded; it stays pending")
                }
                Err(e) => {
                    node.conn_stats.panics.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(call_id = %id, error = %e, "an asynchronous call's task panicked; recorded as failed");
                    if let Err(e) = node.record_panicked(&id).await {
                        tracing::error!(call_id = %id, error = %e, "recording the panicked call failed");
                    }
                }
            }
            node.async_calls.uncount(&tenant);
        });
    }

    /// Record a call whose task panicked as failed (`internal`).
    async fn record_panicked(&self, id: &str) -> Result<(), StoreError> {
        let (store, key) = (self.async_calls.store.clone(), id.to_string());
        let bytes = tokio::task::spawn_blocking(move || store.get(CALLS, &key))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))??;
        let Some(bytes) = bytes else { return Ok(()) };
        let mut record = decode(id, &bytes)?;
        record.status = CallStatus::Failed;
        record.finished_at_ms = Some(now_ms());
        record.error = Some(CallFailure {
            kind: ErrorKind::Internal.as_str().to_string(),
            message: "the platform failed while running this call (a panic, counted in shoal_panics_total)".into(),
        });
        self.write_record(&record, None).await
    }

    async fn run_async(&self, id: &str) -> Result<(), RecordError> {
        let calls = &self.async_calls;
        let store = calls.store.clone();
        let key = id.to_string();
        let loaded =
            tokio::task::spawn_blocking(move || store.snapshot(|tx| Ok((tx.get(CALLS, &key)?, tx.get(INPUTS, &key)?))))
                .await
                .map_err(|e| StoreError::Io(e.to_string()))??;
        let (Some(bytes), input) = loaded else { return Ok(()) };
        #[cfg(feature = "fault-injection")]
        if self.fault_in_async_call.swap(false, Ordering::AcqRel) {
            panic!("fault injected: a panic in an asynchronous call's task");
        }
        let mut record = decode(id, &bytes)?;
        if record.status.is_finished() {
            return Ok(());
        }
        let output = self.execute_async(&mut record, input.unwrap_or_default(), None).await?.flatten();
        let output = self.async_calls.keep_output(&mut record, output);
        Ok(self.write_record(&record, output).await?)
    }

    /// Run a call taken from the cluster's queue, and record how it ended.
    /// True when it could not start and must go back to the queue (the
    /// caller gives it back once it no longer counts it as running here).
    pub(crate) async fn run_taken(&self, call: TakenCall) -> bool {
        let Some(queue) = &self.async_calls.queue else { return false };
        let Some(cluster) = &self.cluster else { return false };
        let me = cluster.id();
        let record = match call.record.as_deref().map(|bytes| decode(&call.id, bytes)) {
            Some(Ok(record)) if !record.status.is_finished() => Some(record),
            Some(Ok(_)) => None,
            Some(Err(e)) => {
                tracing::error!(call_id = %call.id, error = %e, "dropping an unreadable call record");
                None
            }
            None => None,
        };
        let Some(mut record) = record else {
            if let Err(e) = queue.release(me, &call.id).await {
                tracing::warn!(call_id = %call.id, error = %e, "releasing a call's lease failed");
            }
            return false;
        };
        let output = match self.execute_async(&mut record, call.input, Some(queue)).await {
            Ok(Some(output)) => output,
            // Not this node's to run any more: requeued meanwhile, or
            // finished by another run.
            Ok(None) => return false,
            Err(e) => {
                // It did not start (its record could not be marked running).
                tracing::warn!(call_id = %call.id, error = %e, "an asynchronous call could not start; requeueing it");
                return true;
            }
        };
        // The outcome is in hand: keep trying to record it while Redis is
        // away (if this node dies first, the call runs again elsewhere).
        let mut backoff = Duration::from_millis(100);
        let mut output = output;
        loop {
            match queue.finish(me, &call.id, &encode(&record), output.as_deref(), self.async_calls.retention).await {
                Ok(Finished::Recorded) => return false,
                Ok(Finished::OutputOverLimit) => {
                    // Past what its tenant may keep: recorded failed, without it.
                    let len = output.take().map_or(0, |o| o.len());
                    record.drop_output(len as u64, self.config.max_async_output_bytes_per_tenant);
                }
                Ok(Finished::LeaseGone) => {
                    tracing::info!(call_id = %call.id, "this node's lease on a call was taken over; the other run records it");
                    return false;
                }
                Err(e) if !cluster.stopping.load(Ordering::Acquire) => {
                    tracing::warn!(call_id = %call.id, error = %e, "recording an asynchronous call failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::error!(call_id = %call.id, error = %e, "an asynchronous call could not be recorded before stopping; it runs again elsewhere");
                    return false;
                }
            }
        }
    }

    /// Run an accepted call once a slot is free: the record says running
    /// (in `shared`, else the local store) before the call starts, and
    /// how it ended afterwards (for the caller to store). Returns the
    /// output of a call that succeeded (`Some(None)` for one that failed),
    /// or None when the shared record may no longer be marked running by
    /// this node (its lease is gone, or it finished elsewhere): not run.
    async fn execute_async(
        &self,
        record: &mut CallRecord,
        input: Vec<u8>,
        shared: Option<&CallQueue>,
    ) -> Result<Option<Option<Vec<u8>>>, RecordError> {
        let id = record.call_id.clone();
        let mut deployed = self.registry.get(&record.tenant, &record.function);
        if deployed.is_none() && self.cluster.is_some() {
            // Deployed on another node a moment ago: read the registry now.
            self.registry.mirror(true, self.config.log_lines_per_function).await?;
            deployed = self.registry.get(&record.tenant, &record.function);
        }
        let started = Instant::now();
        let (output, failure) = match &deployed {
            None => (
                None,
                Some((ErrorKind::NotFound, format!("function `{}/{}` does not exist", record.tenant, record.function))),
            ),
            Some(deployed) => {
                // Its tenant's turn to ask the scheduler (in a cluster,
                // the worker takes calls only while the node has room).
                let _turn = if shared.is_none() { self.async_calls.turn(&record.tenant).await } else { None };
                let slot = self
                    .executor
                    .admit_accepted(&deployed.settings.tenant, &deployed.key, deployed.settings.memory_limit)
                    .await;
                record.status = CallStatus::Running;
                record.started_at_ms = Some(now_ms());
                record.attempts += 1;
                match shared {
                    Some(queue) => {
                        let me = self.cluster.as_ref().map_or("", |c| c.id());
                        if !queue.update(me, &id, &encode(record)).await? {
                            return Ok(None);
                        }
                    }
                    None => self.write_record(record, None).await?,
                }
                // Its run hangs under the request that made it, if traced.
                let parent = record.traceparent.as_deref().and_then(shoal_runtime::TraceParent::parse);
                let mut traced = parent
                    .and_then(|parent| {
                        self.tracer.begin(
                            Some(parent),
                            || format!("async {}", deployed.key),
                            crate::trace::Kind::Internal,
                        )
                    })
                    .map(crate::trace::Traced::new);
                let mut out = match self.image_of(deployed).await {
                    Ok(image) => {
                        let settings = self.settings_for(deployed, traced.as_ref());
                        slot.run(&image, &settings, bytes::Bytes::from(input)).await
                    }
                    Err(e) => shoal_runtime::CallOutput::failed(shoal_runtime::CallError::Internal(format!(
                        "loading the function: {e}"
                    ))),
                };
                let trace_id = traced.as_ref().filter(|t| t.span.sampled).map(|t| t.span.trace_hex());
                if let Some(traced) = &mut traced {
                    self.trace_call(traced, &out, &id, deployed);
                    traced.span.attr("shoal.attempt", i64::from(record.attempts));
                }
                self.end_trace(traced, out.result.as_ref().err().map(ToString::to_string));
                deployed.logs.append(&id, trace_id.as_deref(), now_ms(), out.take_logs());
                let outcome = out.result.as_ref().map(drop).map_err(ErrorKind::of_call);
                self.account(deployed, (&id, trace_id.as_deref()), outcome, Some(started.elapsed()), Some(&out.usage));
                match out.result {
                    Ok(output) => (Some(output), None),
                    Err(e) => (None, Some((ErrorKind::of_call(&e), e.to_string()))),
                }
            }
        };
        record.finished_at_ms = Some(now_ms());
        match failure {
            None => record.status = CallStatus::Succeeded,
            Some((kind, message)) => {
                record.status = CallStatus::Failed;
                record.error = Some(CallFailure { kind: kind.as_str().to_string(), message });
            }
        }
        Ok(Some(output))
    }

    async fn write_record(&self, record: &CallRecord, output: Option<Vec<u8>>) -> Result<(), StoreError> {
        let calls = self.async_calls.clone();
        let record = record.clone();
        tokio::task::spawn_blocking(move || calls.update(&record, output.as_deref()))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
    }

    /// Start every call the store holds as pending (after a restart), and
    /// the retention sweep.
    pub(crate) fn resume_async_calls(self: &Arc<Self>) -> Result<usize, StoreError> {
        let pending = self.async_calls.pending()?;
        for (id, tenant) in &pending {
            // Accepted before the restart: counted whatever the limits.
            let _ = self.async_calls.count(tenant, true);
            self.spawn_async(id.clone(), tenant.clone());
        }
        let weak = Arc::downgrade(self);
        crate::supervise(self, "call record sweep", move || {
            let node = weak.clone();
            async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                loop {
                    every.tick().await;
                    let Some(node) = node.upgrade() else { return };
                    match node.expire_call_records().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(removed = n, "expired asynchronous call records"),
                        Err(e) => tracing::warn!(error = %e, "expiring call records failed"),
                    }
                }
            }
        });
        Ok(pending.len())
    }

    /// Remove the records of finished calls accepted more than the
    /// retention time ago; returns how many. Runs every minute by itself.
    pub async fn expire_call_records(&self) -> Result<usize, StoreError> {
        let calls = self.async_calls.clone();
        tokio::task::spawn_blocking(move || calls.sweep()).await.map_err(|e| StoreError::Io(e.to_string()))?
    }
}
