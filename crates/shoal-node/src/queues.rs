//! Queues: a tenant's named queues of messages, each drained by a consumer
//! function of the tenant in batches, at least once.
//!
//! A message is sent (`POST /v1/queues/{tenant}/{queue}/messages`) into
//! the store, durably, before the send is answered. The queue's consumer
//! loop takes a batch when `batch_size` messages are ready or the oldest
//! has waited `batch_wait_ms`: taking leases them (they are invisible for
//! `visibility_timeout_ms`) and counts an attempt, in one transaction. The
//! consumer function gets the batch as JSON; when it succeeds every
//! message is acknowledged (removed), except those it names in
//! `{"retry": [ids]}`; when it fails, all are retried. A retried message
//! becomes visible again after `retry_delay_ms`, doubled at each attempt
//! (at most five minutes); after `max_attempts` it moves to the queue's
//! dead letters, kept until they are redriven or purged. A node that
//! stops or dies mid-batch loses nothing: the leases run out and the
//! messages are taken again (at least once; a consumer must bear seeing a
//! message twice).
//!
//! Tables (keys start `tenant/queue/`): `queues` (`tenant/queue` → the
//! queue's settings), `queue_messages` (`…/<seq>` → attempts, send time,
//! body), `queue_ready` (`…/<visible at>.<seq>` → nothing: the order in
//! which messages become visible; a lease is an entry in the future),
//! `queue_dead` (`…/<seq>` → the dead letter). `seq` is the send time in
//! microseconds, made unique: messages are taken oldest first.
//!
//! What a tenant keeps — messages waiting, in flight and dead — is
//! bounded (`QueueLimits`), and so is what one queue's consumer runs at
//! once (`concurrency`); batches run in the tenant's turns like
//! asynchronous calls.
//!
//! On a node of a cluster the queues live in Redis instead
//! (`shoal_cluster::SharedQueues`: a stream per queue and one consumer
//! group, each node a consumer): every node mirrors the queues' settings
//! and runs a consumer loop for each, so any node takes a batch and a
//! batch leased by a node that died is claimed by another once its lease
//! runs out. Settings, messages, dead letters and what each tenant holds
//! are Redis's; the batch, retry and delivery counts a queue shows are the
//! answering node's since it started.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use shoal_cluster::{QueuePut, Sent, Settle, SharedQueues};
use shoal_state::{EmbeddedStore, StoreError, Table};
use tokio::sync::Notify;

use crate::error::{ApiError, ErrorKind};
use crate::{Node, now_ms};

const QUEUES: Table = Table::new("queues");
const MESSAGES: Table = Table::new("queue_messages");
const READY: Table = Table::new("queue_ready");
const DEAD: Table = Table::new("queue_dead");

/// The longest a retried message waits before it is visible again.
const MAX_RETRY_DELAY_MS: u64 = 300_000;
/// How long an idle consumer loop sleeps before it looks again (a send
/// wakes it at once).
const IDLE: Duration = Duration::from_millis(500);
/// How often a node of a cluster looks for changed queue settings.
const MIRROR_EVERY: Duration = Duration::from_millis(500);
/// Dead letters one redrive or purge moves at most.
const DEAD_BATCH: usize = 10_000;

/// What a tenant may keep in queues, and the sizes of what it sends.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub queues_per_tenant: usize,
    /// Messages waiting, in flight and dead, over all its queues.
    pub messages_per_tenant: u64,
    /// Their bodies' bytes.
    pub bytes_per_tenant: u64,
    pub message_bytes: usize,
    /// Messages one send may carry.
    pub batch_send: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            queues_per_tenant: 100,
            messages_per_tenant: 1_000_000,
            bytes_per_tenant: 1 << 30,
            message_bytes: 256 << 10,
            batch_send: 1000,
        }
    }
}

/// A queue's settings, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub tenant: String,
    pub name: String,
    /// The function that consumes it (`name`, `name@N` or `name@alias`).
    pub consumer: String,
    pub batch_size: u32,
    pub batch_wait_ms: u64,
    pub visibility_timeout_ms: u64,
    pub max_attempts: u32,
    pub retry_delay_ms: u64,
    pub concurrency: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// What a client sets (`PUT /v1/queues/{tenant}/{queue}`); unset: defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    pub consumer: String,
    pub batch_size: Option<u32>,
    pub batch_wait_ms: Option<u64>,
    pub visibility_timeout_ms: Option<u64>,
    pub max_attempts: Option<u32>,
    pub retry_delay_ms: Option<u64>,
    pub concurrency: Option<u32>,
}

/// A message as stored: attempts so far, when it was sent, its body.
#[derive(Debug, Clone)]
struct Message {
    attempts: u32,
    sent_ms: u64,
    body: Vec<u8>,
}

impl Message {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.body.len());
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.extend_from_slice(&self.sent_ms.to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let attempts = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
        let sent_ms = u64::from_le_bytes(bytes.get(4..12)?.try_into().ok()?);
        Some(Self { attempts, sent_ms, body: bytes[12..].to_vec() })
    }
}

/// A dead letter, as stored and shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: String,
    pub attempts: u32,
    pub sent_ms: u64,
    pub died_ms: u64,
    /// Why its last attempt failed.
    pub error: String,
    pub body_base64: String,
}

fn prefix_of(tenant: &str, queue: &str) -> String {
    format!("{tenant}/{queue}/")
}

fn message_key(prefix: &str, seq: u64) -> String {
    format!("{prefix}{seq:016x}")
}

fn ready_key(prefix: &str, visible_ms: u64, seq: u64) -> String {
    format!("{prefix}{visible_ms:016x}.{seq:016x}")
}

fn parse_ready(prefix: &str, key: &str) -> Option<(u64, u64)> {
    let (visible, seq) = key.strip_prefix(prefix)?.split_once('.')?;
    Some((u64::from_str_radix(visible, 16).ok()?, u64::from_str_radix(seq, 16).ok()?))
}

/// How long a message waits after its `attempts`-th failure.
fn retry_delay(base_ms: u64, attempts: u32) -> u64 {
    base_ms.saturating_mul(1u64 << attempts.saturating_sub(1).min(20)).min(MAX_RETRY_DELAY_MS)
}

/// A queue as this node runs it.
struct QueueState {
    config: RwLock<QueueConfig>,
    /// Messages kept (waiting, in flight) and dead, and their bytes.
    messages: AtomicU64,
    dead: AtomicU64,
    bytes: AtomicU64,
    in_flight: AtomicU32,
    /// From send to the consumer's start, for each message's first attempt
    /// (on this node, since it started).
    delivery: crate::activity::Latencies,
    /// Batches that ended, and messages acknowledged, retried, dead.
    acked: AtomicU64,
    retried: AtomicU64,
    died: AtomicU64,
    wake: Notify,
    stopped: AtomicBool,
}

impl QueueState {
    /// A queue holding `messages` and `dead` letters of `bytes` in all.
    fn new(config: QueueConfig, messages: u64, dead: u64, bytes: u64) -> Self {
        Self {
            config: RwLock::new(config),
            messages: AtomicU64::new(messages),
            dead: AtomicU64::new(dead),
            bytes: AtomicU64::new(bytes),
            in_flight: AtomicU32::new(0),
            delivery: Default::default(),
            acked: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            died: AtomicU64::new(0),
            wake: Notify::new(),
            stopped: AtomicBool::new(false),
        }
    }

    fn config(&self) -> QueueConfig {
        self.config.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// What a tenant keeps in queues.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    messages: u64,
    bytes: u64,
}

/// Every queue of the node.
pub(crate) struct Queues {
    store: Arc<EmbeddedStore>,
    queues: Mutex<HashMap<String, Arc<QueueState>>>,
    held: Mutex<HashMap<String, Held>>,
    /// The last message sequence number given out.
    seq: AtomicU64,
    limits: QueueLimits,
    /// On a node of a cluster: the queues in Redis, and this node's name
    /// as their consumer.
    shared: Option<(SharedQueues, String)>,
    /// The shared settings' version last mirrored (cluster only).
    version: AtomicU64,
    /// Bumped when this node applies its own change of a queue (cluster
    /// only): a mirror that overlapped one cannot trust the version it read.
    local_changes: AtomicU64,
}

impl std::fmt::Debug for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queues").finish_non_exhaustive()
    }
}

/// A taken message, as its consumer gets it.
struct Taken {
    id: String,
    /// Its attempts so far, this one included.
    attempts: u32,
    sent_ms: u64,
    /// When it was sent, in µs (its first delivery's delay is timed from it).
    sent_us: u64,
    body: Vec<u8>,
    lease: Lease,
}

/// What a taken message is settled by.
enum Lease {
    /// On one node: its sequence number and when it becomes visible again
    /// unless settled.
    Store { seq: u64, until_ms: u64 },
    /// In a cluster: the stream entry that carried it.
    Stream(String),
}

impl Queues {
    /// Read every queue and count what it holds (on one node; in a
    /// cluster the first mirror fills them).
    pub(crate) fn open(
        store: Arc<EmbeddedStore>,
        limits: QueueLimits,
        shared: Option<(SharedQueues, String)>,
    ) -> Result<Self, StoreError> {
        let mut queues = HashMap::new();
        let mut held: HashMap<String, Held> = HashMap::new();
        let mut last_seq = 0u64;
        let stored = if shared.is_some() { Vec::new() } else { store.scan_prefix(QUEUES, "")? };
        for (key, bytes) in stored {
            let Ok(config) = serde_json::from_slice::<QueueConfig>(&bytes) else {
                tracing::error!(queue = %key, "a stored queue is unreadable; skipping it");
                continue;
            };
            let prefix = prefix_of(&config.tenant, &config.name);
            let (n, size, top) = store.snapshot(|tx| {
                tx.fold_prefix(MESSAGES, &prefix, (0u64, 0u64, 0u64), |(n, size, top), key, value| {
                    let seq = u64::from_str_radix(&key[prefix.len()..], 16).unwrap_or(0);
                    (n + 1, size + value.len().saturating_sub(12) as u64, top.max(seq))
                })
            })?;
            let (dead, dead_size) = store.snapshot(|tx| {
                tx.fold_prefix(DEAD, &prefix, (0u64, 0u64), |(n, size), _, value| (n + 1, size + value.len() as u64))
            })?;
            last_seq = last_seq.max(top);
            let entry = held.entry(config.tenant.clone()).or_default();
            entry.messages += n + dead;
            entry.bytes += size + dead_size;
            queues.insert(key, Arc::new(QueueState::new(config, n, dead, size + dead_size)));
        }
        Ok(Self {
            store,
            queues: Mutex::new(queues),
            held: Mutex::new(held),
            seq: AtomicU64::new(last_seq),
            limits,
            shared,
            version: AtomicU64::new(0),
            local_changes: AtomicU64::new(0),
        })
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<QueueState>>> {
        self.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, tenant: &str, queue: &str) -> Option<Arc<QueueState>> {
        self.queues().get(&format!("{tenant}/{queue}")).cloned()
    }

    fn shared(&self) -> Option<&SharedQueues> {
        self.shared.as_ref().map(|(shared, _)| shared)
    }

    /// This node applied its own change of a queue after writing it to
    /// Redis: a mirror may have read the settings before the write and
    /// applied them after this, so the next one reads them all again.
    fn changed_here(&self) {
        self.local_changes.fetch_add(1, Ordering::AcqRel);
        self.version.store(0, Ordering::Release);
    }

    /// The next sequence numbers: send time in microseconds, unique.
    fn next_seqs(&self, n: usize) -> u64 {
        let now_us = now_us();
        let mut first = 0;
        let _ = self.seq.fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
            first = last.saturating_add(1).max(now_us);
            Some(first + n as u64 - 1)
        });
        first
    }

    async fn blocking<R: Send + 'static>(
        &self,
        work: impl FnOnce(&EmbeddedStore) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| ApiError::internal("a queue's store task", e))?
            .map_err(ApiError::from)
    }
}

/// A queue's view: settings and what it holds.
pub fn queue_view(config: &QueueConfig, state: &QueueStateView) -> serde_json::Value {
    serde_json::json!({
        "tenant": config.tenant,
        "name": config.name,
        "consumer": config.consumer,
        "batch_size": config.batch_size,
        "batch_wait_ms": config.batch_wait_ms,
        "visibility_timeout_ms": config.visibility_timeout_ms,
        "max_attempts": config.max_attempts,
        "retry_delay_ms": config.retry_delay_ms,
        "concurrency": config.concurrency,
        "created_ms": config.created_ms,
        "updated_ms": config.updated_ms,
        "messages": state.messages,
        "dead": state.dead,
        "bytes": state.bytes,
        "batches_running": state.in_flight,
        "acked": state.acked,
        "retried": state.retried,
        "died": state.died,
        "delivery_ms": { "count": state.delivered, "p50": state.delivery_p50_ms, "p99": state.delivery_p99_ms },
    })
}

/// What a queue holds, read at one moment.
#[derive(Clone, Copy, Debug)]
pub struct QueueStateView {
    pub messages: u64,
    pub dead: u64,
    pub bytes: u64,
    pub in_flight: u32,
    pub acked: u64,
    pub retried: u64,
    pub died: u64,
    /// First deliveries timed, and their send-to-start delay.
    pub delivered: u64,
    pub delivery_p50_ms: Option<f64>,
    pub delivery_p99_ms: Option<f64>,
}

impl QueueState {
    fn view(&self) -> QueueStateView {
        let (delivered, delivery_p50_ms, delivery_p99_ms) = self.delivery.summary();
        QueueStateView {
            delivered,
            delivery_p50_ms,
            delivery_p99_ms,
            messages: self.messages.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            died: self.died.load(Ordering::Relaxed),
        }
    }
}

/// A message to send: its body.
pub type Outgoing = Vec<u8>;

impl Node {
    /// Create or replace a queue; true when created.
    pub async fn put_queue(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        spec: QueueSpec,
    ) -> Result<(serde_json::Value, bool), ApiError> {
        let queues = &self.queues;
        crate::names::check_reference(&spec.consumer)?;
        if !self.registry.tenant_active(tenant) {
            return Err(ApiError::not_found(format!("tenant `{tenant}` does not exist")));
        }
        let consumer = self
            .registry
            .resolve(tenant, &spec.consumer, || 0)
            .ok_or_else(|| ApiError::not_found(format!("function `{tenant}/{}` does not exist", spec.consumer)))?;
        let range = |what: &str, value: u64, low: u64, high: u64| {
            if (low..=high).contains(&value) {
                Ok(value)
            } else {
                Err(ApiError::bad_request(format!("{what} is {low} to {high} (not {value})")))
            }
        };
        let timeout_ms = consumer.record.timeout_ms;
        let batch_size = range("batch_size", u64::from(spec.batch_size.unwrap_or(10)), 1, 1000)? as u32;
        let batch_wait_ms = range("batch_wait_ms", spec.batch_wait_ms.unwrap_or(1000), 0, 60_000)?;
        let visibility_timeout_ms = range(
            "visibility_timeout_ms",
            spec.visibility_timeout_ms.unwrap_or((timeout_ms + 5000).max(30_000)),
            timeout_ms + 1000,
            12 * 3_600_000,
        )?;
        let max_attempts = range("max_attempts", u64::from(spec.max_attempts.unwrap_or(5)), 1, 100)? as u32;
        let retry_delay_ms = range("retry_delay_ms", spec.retry_delay_ms.unwrap_or(1000), 0, MAX_RETRY_DELAY_MS)?;
        let concurrency = range("concurrency", u64::from(spec.concurrency.unwrap_or(2)), 1, 16)? as u32;
        let key = format!("{tenant}/{name}");
        let now = now_ms();
        let full = |n: usize| {
            ApiError::new(
                ErrorKind::LimitExceeded,
                format!("tenant `{tenant}` has {n} queues, its limit; remove one first"),
            )
        };
        // When it was created, if it was: from Redis in a cluster (another
        // node may have made it).
        let created_ms = match queues.shared() {
            Some(shared) => shared
                .get(&key)
                .await?
                .and_then(|bytes| serde_json::from_slice::<QueueConfig>(&bytes).ok())
                .map(|c| c.created_ms),
            None => {
                let existing = queues.queues().get(&key).map(|q| q.config().created_ms);
                let n = queues.queues().values().filter(|q| q.config().tenant == tenant).count();
                if existing.is_none() && n >= queues.limits.queues_per_tenant {
                    return Err(full(n));
                }
                existing
            }
        };
        let config = QueueConfig {
            tenant: tenant.to_string(),
            name: name.to_string(),
            consumer: spec.consumer,
            batch_size,
            batch_wait_ms,
            visibility_timeout_ms,
            max_attempts,
            retry_delay_ms,
            concurrency,
            created_ms: created_ms.unwrap_or(now),
            updated_ms: now,
        };
        let encoded = serde_json::to_vec(&config).map_err(|e| ApiError::internal("encoding a queue", e))?;
        let created = match queues.shared() {
            Some(shared) => match shared.put(&key, tenant, &encoded, queues.limits.queues_per_tenant).await? {
                QueuePut::Created => true,
                QueuePut::Replaced => false,
                QueuePut::TenantFull => return Err(full(queues.limits.queues_per_tenant)),
                QueuePut::NoTenant => return Err(ApiError::not_found(format!("tenant `{tenant}` does not exist"))),
            },
            None => {
                let stored = key.clone();
                queues.blocking(move |store| store.put(QUEUES, &stored, &encoded)).await?;
                created_ms.is_none()
            }
        };
        let state = self.install_queue(config);
        queues.changed_here();
        tracing::info!(%tenant, queue = %name, "queue set");
        Ok((self.queue_view_of(&state.config(), Some(&state)).await?, created))
    }

    /// Run a queue with these settings here: start its consumer loop, or
    /// give a running one its new settings.
    fn install_queue(self: &Arc<Self>, config: QueueConfig) -> Arc<QueueState> {
        let key = format!("{}/{}", config.tenant, config.name);
        let mut all = self.queues.queues();
        if let Some(state) = all.get(&key) {
            let mut current = state.config.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if *current != config {
                *current = config;
                state.wake.notify_one();
            }
            return state.clone();
        }
        let state = Arc::new(QueueState::new(config, 0, 0, 0));
        all.insert(key, state.clone());
        drop(all);
        self.spawn_consumer(state.clone());
        state
    }

    /// Stop running a queue here.
    fn uninstall_queue(&self, key: &str) -> Option<Arc<QueueState>> {
        let state = self.queues.queues().remove(key)?;
        state.stopped.store(true, Ordering::Release);
        state.wake.notify_one();
        Some(state)
    }

    /// A queue's view: what it holds from the store (Redis in a cluster),
    /// what its batches did from this node's counts.
    async fn queue_view_of(
        &self,
        config: &QueueConfig,
        state: Option<&Arc<QueueState>>,
    ) -> Result<serde_json::Value, ApiError> {
        let fresh;
        let state = match state {
            Some(state) => state,
            None => {
                fresh = Arc::new(QueueState::new(config.clone(), 0, 0, 0));
                &fresh
            }
        };
        let mut view = state.view();
        if let Some(shared) = self.queues.shared() {
            let counts = shared.counts(&format!("{}/{}", config.tenant, config.name)).await?;
            (view.messages, view.dead, view.bytes) = (counts.messages, counts.dead, counts.bytes);
        }
        Ok(queue_view(config, &view))
    }

    /// A tenant's queues (or the one named), with what each holds.
    pub async fn queues_of(&self, tenant: &str, only: Option<&str>) -> Result<Vec<serde_json::Value>, ApiError> {
        let queues = &self.queues;
        let mut found: Vec<QueueConfig> = match queues.shared() {
            // Redis's settings, not this node's mirror (which may lag).
            Some(shared) => {
                let records = match only {
                    Some(name) => shared.get(&format!("{tenant}/{name}")).await?.into_iter().collect(),
                    None => shared.all().await?.1.into_iter().map(|(_, record)| record).collect::<Vec<_>>(),
                };
                records.iter().filter_map(|bytes| serde_json::from_slice::<QueueConfig>(bytes).ok()).collect()
            }
            None => queues.queues().values().map(|q| q.config()).collect(),
        };
        found.retain(|c| c.tenant == tenant && only.is_none_or(|name| c.name == name));
        found.sort_by(|a, b| a.name.cmp(&b.name));
        let mut views = Vec::with_capacity(found.len());
        for config in &found {
            let state = queues.get(tenant, &config.name);
            views.push(self.queue_view_of(config, state.as_ref()).await?);
        }
        Ok(views)
    }

    /// Remove a queue with every message and dead letter it holds.
    pub async fn remove_queue(&self, tenant: &str, name: &str) -> Result<bool, ApiError> {
        let queues = &self.queues;
        let key = format!("{tenant}/{name}");
        if let Some(shared) = queues.shared() {
            let removed = shared.remove(&key, tenant).await?;
            self.uninstall_queue(&key);
            queues.changed_here();
            if removed {
                tracing::info!(%tenant, queue = %name, "queue removed");
            }
            return Ok(removed);
        }
        let Some(state) = self.uninstall_queue(&key) else { return Ok(false) };
        let prefix = prefix_of(tenant, name);
        queues
            .blocking(move |store| {
                store.delete(QUEUES, &key)?;
                for table in [MESSAGES, READY, DEAD] {
                    loop {
                        let n = store.transaction(|tx| {
                            let batch = tx.scan_prefix(table, &prefix, 10_000)?;
                            for (key, _) in &batch {
                                tx.delete(table, key)?;
                            }
                            Ok(batch.len())
                        })?;
                        if n == 0 {
                            break;
                        }
                    }
                }
                Ok(())
            })
            .await?;
        let mut held = queues.held();
        if let Some(entry) = held.get_mut(tenant) {
            entry.messages = entry
                .messages
                .saturating_sub(state.messages.load(Ordering::Relaxed) + state.dead.load(Ordering::Relaxed));
            entry.bytes = entry.bytes.saturating_sub(state.bytes.load(Ordering::Relaxed));
        }
        tracing::info!(%tenant, queue = %name, "queue removed");
        Ok(true)
    }

    /// Remove every queue of `tenant` (its deletion).
    pub(crate) async fn remove_queues_of(&self, tenant: &str) -> Result<usize, ApiError> {
        let prefix = format!("{tenant}/");
        let names: Vec<String> = match self.queues.shared() {
            Some(shared) => shared
                .all()
                .await?
                .1
                .into_iter()
                .filter_map(|(key, _)| Some(key.strip_prefix(&prefix)?.to_string()))
                .collect(),
            None => self
                .queues
                .queues()
                .values()
                .map(|q| q.config())
                .filter(|c| c.tenant == tenant)
                .map(|c| c.name)
                .collect(),
        };
        for name in &names {
            self.remove_queue(tenant, name).await?;
        }
        match self.queues.shared() {
            Some(shared) => shared.forget_tenant(tenant).await?,
            None => {
                self.queues.held().remove(tenant);
            }
        }
        Ok(names.len())
    }

    /// Send messages to a queue, durably: their ids, oldest first.
    pub async fn send_messages(
        &self,
        tenant: &str,
        name: &str,
        bodies: Vec<Outgoing>,
    ) -> Result<Vec<String>, ApiError> {
        let queues = &self.queues;
        let no_queue = || ApiError::not_found(format!("tenant `{tenant}` has no queue `{name}`"));
        // In a cluster Redis says whether the queue exists (this node's
        // mirror may lag behind its creation).
        let state = queues.get(tenant, name);
        if state.is_none() && queues.shared.is_none() {
            return Err(no_queue());
        }
        let limits = queues.limits;
        if bodies.is_empty() || bodies.len() > limits.batch_send {
            return Err(ApiError::bad_request(format!("a send carries 1 to {} messages", limits.batch_send)));
        }
        if let Some(big) = bodies.iter().find(|b| b.len() > limits.message_bytes) {
            return Err(ApiError::new(
                ErrorKind::TooLarge,
                format!("a message is at most {} bytes (one has {})", limits.message_bytes, big.len()),
            ));
        }
        let full = |messages: u64, bytes: u64| ApiError {
            kind: ErrorKind::LimitExceeded,
            message: format!(
                "tenant `{tenant}` keeps {messages} messages ({bytes} bytes) in queues; its limits are {} messages and {} bytes",
                limits.messages_per_tenant, limits.bytes_per_tenant
            ),
            retry_after: Some(Duration::from_secs(1)),
        };
        if let Some(shared) = queues.shared() {
            let sent = shared
                .send(
                    &format!("{tenant}/{name}"),
                    tenant,
                    &bodies,
                    now_us(),
                    (limits.messages_per_tenant, limits.bytes_per_tenant),
                )
                .await?;
            return match sent {
                Sent::Ids(ids) => {
                    if let Some(state) = state {
                        state.wake.notify_one();
                    }
                    Ok(ids)
                }
                Sent::Full(messages, bytes) => Err(full(messages, bytes)),
                Sent::Gone => Err(no_queue()),
            };
        }
        let Some(state) = state else { return Err(no_queue()) };
        let (n, size) = (bodies.len() as u64, bodies.iter().map(|b| b.len() as u64).sum::<u64>());
        {
            // Counted before the write (and given back if it fails), so
            // concurrent sends cannot pass the limits together.
            let mut held = queues.held();
            let entry = held.entry(tenant.to_string()).or_default();
            if entry.messages + n > limits.messages_per_tenant || entry.bytes + size > limits.bytes_per_tenant {
                return Err(full(entry.messages, entry.bytes));
            }
            entry.messages += n;
            entry.bytes += size;
        }
        let first = queues.next_seqs(bodies.len());
        let prefix = prefix_of(tenant, name);
        let now = now_ms();
        let written = queues
            .blocking(move |store| {
                store.transaction(|tx| {
                    for (i, body) in bodies.into_iter().enumerate() {
                        let seq = first + i as u64;
                        let message = Message { attempts: 0, sent_ms: now, body };
                        tx.put(MESSAGES, &message_key(&prefix, seq), &message.encode())?;
                        tx.put(READY, &ready_key(&prefix, now, seq), b"")?;
                    }
                    Ok(())
                })
            })
            .await;
        if let Err(e) = written {
            let mut held = queues.held();
            if let Some(entry) = held.get_mut(tenant) {
                entry.messages = entry.messages.saturating_sub(n);
                entry.bytes = entry.bytes.saturating_sub(size);
            }
            return Err(e);
        }
        state.messages.fetch_add(n, Ordering::Relaxed);
        state.bytes.fetch_add(size, Ordering::Relaxed);
        state.wake.notify_one();
        Ok((0..n).map(|i| format!("{:016x}", first + i)).collect())
    }

    /// The queue `tenant/name`, or a 404: this node's, or Redis's in a
    /// cluster.
    async fn queue_exists(&self, tenant: &str, name: &str) -> Result<Option<Arc<QueueState>>, ApiError> {
        let state = self.queues.get(tenant, name);
        let exists = match self.queues.shared() {
            Some(shared) => shared.get(&format!("{tenant}/{name}")).await?.is_some(),
            None => state.is_some(),
        };
        if !exists {
            return Err(ApiError::not_found(format!("tenant `{tenant}` has no queue `{name}`")));
        }
        Ok(state)
    }

    /// Up to `limit` of a queue's dead letters, oldest first.
    pub async fn dead_letters(&self, tenant: &str, name: &str, limit: usize) -> Result<Vec<DeadLetter>, ApiError> {
        let queues = &self.queues;
        self.queue_exists(tenant, name).await?;
        if let Some(shared) = queues.shared() {
            let mut dead: Vec<DeadLetter> = shared
                .dead(&format!("{tenant}/{name}"), limit)
                .await?
                .into_iter()
                .map(|d| DeadLetter {
                    id: d.id,
                    attempts: d.attempts,
                    sent_ms: d.sent_us / 1000,
                    died_ms: d.died_ms,
                    error: d.error,
                    body_base64: BASE64.encode(&d.body),
                })
                .collect();
            dead.sort_by(|a, b| a.id.cmp(&b.id));
            return Ok(dead);
        }
        let prefix = prefix_of(tenant, name);
        let found = queues
            .blocking(move |store| {
                store.snapshot(|tx| {
                    let mut out = Vec::new();
                    tx.visit_prefix(DEAD, &prefix, |_, value| {
                        if let Ok(dead) = serde_json::from_slice::<DeadLetter>(value) {
                            out.push(dead);
                        }
                        out.len() < limit
                    })?;
                    Ok(out)
                })
            })
            .await?;
        Ok(found)
    }

    /// Move a queue's dead letters back to it (attempts from 0), or
    /// (`purge`) remove them; at most `DEAD_BATCH` per call (1,000 in a
    /// cluster). How many.
    pub async fn settle_dead(&self, tenant: &str, name: &str, purge: bool) -> Result<usize, ApiError> {
        let queues = &self.queues;
        let state = self.queue_exists(tenant, name).await?;
        if let Some(shared) = queues.shared() {
            let n = shared.settle_dead(&format!("{tenant}/{name}"), tenant, purge).await?;
            if let Some(state) = state {
                state.wake.notify_one();
            }
            return Ok(usize::try_from(n).unwrap_or(usize::MAX));
        }
        let Some(state) = state else { return Ok(0) };
        let prefix = prefix_of(tenant, name);
        let now = now_ms();
        let (moved, dead_bytes, body_bytes) = queues
            .blocking(move |store| {
                store.transaction(|tx| {
                    let batch = tx.scan_prefix(DEAD, &prefix, DEAD_BATCH)?;
                    let (mut dead_bytes, mut body_bytes) = (0u64, 0u64);
                    for (key, value) in &batch {
                        tx.delete(DEAD, key)?;
                        dead_bytes += value.len() as u64;
                        if purge {
                            continue;
                        }
                        let Ok(dead) = serde_json::from_slice::<DeadLetter>(value) else { continue };
                        let (Ok(seq), Ok(body)) = (u64::from_str_radix(&dead.id, 16), BASE64.decode(&dead.body_base64))
                        else {
                            continue;
                        };
                        body_bytes += body.len() as u64;
                        let message = Message { attempts: 0, sent_ms: dead.sent_ms, body };
                        tx.put(MESSAGES, &message_key(&prefix, seq), &message.encode())?;
                        tx.put(READY, &ready_key(&prefix, now, seq), b"")?;
                    }
                    Ok((batch.len(), dead_bytes, body_bytes))
                })
            })
            .await?;
        let n = moved as u64;
        state.dead.fetch_sub(n.min(state.dead.load(Ordering::Relaxed)), Ordering::Relaxed);
        state.bytes.fetch_sub(dead_bytes.min(state.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        {
            let mut held = queues.held();
            let entry = held.entry(tenant.to_string()).or_default();
            entry.bytes = entry.bytes.saturating_sub(dead_bytes);
            if purge {
                entry.messages = entry.messages.saturating_sub(n);
            } else {
                entry.bytes += body_bytes;
            }
        }
        if !purge {
            state.messages.fetch_add(n, Ordering::Relaxed);
            state.bytes.fetch_add(body_bytes, Ordering::Relaxed);
            state.wake.notify_one();
        }
        Ok(moved)
    }

    /// Start every queue's consumer loop (at start); in a cluster, the
    /// chore that mirrors the queues' settings and starts and stops them.
    pub(crate) fn start_consumers(self: &Arc<Self>) {
        if self.queues.shared.is_some() {
            let weak = Arc::downgrade(self);
            crate::supervise(self, "queues", move || {
                let node = weak.clone();
                async move {
                    loop {
                        let Some(n) = node.upgrade() else { return };
                        if let Err(e) = n.mirror_queues().await {
                            tracing::warn!(error = %e.message, "reading the cluster's queues failed");
                        }
                        drop(n);
                        tokio::time::sleep(MIRROR_EVERY).await;
                    }
                }
            });
            return;
        }
        let all: Vec<Arc<QueueState>> = self.queues.queues().values().cloned().collect();
        for state in all {
            self.spawn_consumer(state);
        }
    }

    /// Run here the queues Redis has, with their settings, and no other
    /// (cluster only; a no-op while their version is unchanged).
    async fn mirror_queues(self: &Arc<Self>) -> Result<(), ApiError> {
        let Some(shared) = self.queues.shared() else { return Ok(()) };
        if shared.version().await? == self.queues.version.load(Ordering::Acquire) {
            return Ok(());
        }
        let changes = self.queues.local_changes.load(Ordering::Acquire);
        let (version, records) = shared.all().await?;
        let mut fresh = HashMap::new();
        for (key, bytes) in records {
            match serde_json::from_slice::<QueueConfig>(&bytes) {
                Ok(config) => {
                    fresh.insert(key, config);
                }
                Err(e) => tracing::error!(queue = %key, error = %e, "a shared queue is unreadable; skipping it"),
            }
        }
        let gone: Vec<String> = self.queues.queues().keys().filter(|key| !fresh.contains_key(*key)).cloned().collect();
        for key in gone {
            self.uninstall_queue(&key);
        }
        for config in fresh.into_values() {
            self.install_queue(config);
        }
        // Trusted only if no change of this node's overlapped the read
        // (else what it applied may be older than that change).
        if self.queues.local_changes.load(Ordering::Acquire) == changes {
            self.queues.version.store(version, Ordering::Release);
        }
        Ok(())
    }

    fn spawn_consumer(self: &Arc<Self>, state: Arc<QueueState>) {
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            while !state.stopped.load(Ordering::Acquire) {
                let wait = match consume_once(&node, &state).await {
                    Some(wait) => wait,
                    None => return,
                };
                if !wait.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = state.wake.notified() => {}
                    }
                }
            }
        });
    }

    /// Run one batch through the consumer and settle each message.
    async fn run_batch(self: Arc<Self>, state: Arc<QueueState>, config: QueueConfig, taken: Vec<Taken>) {
        let messages: Vec<serde_json::Value> = taken
            .iter()
            .map(|t| {
                let text = std::str::from_utf8(&t.body).ok();
                serde_json::json!({
                    "id": t.id,
                    "body": text,
                    "body_base64": if text.is_some() { None } else { Some(BASE64.encode(&t.body)) },
                    "attempt": t.attempts,
                    "sent_ms": t.sent_ms,
                })
            })
            .collect();
        let input =
            serde_json::to_vec(&serde_json::json!({ "queue": config.name, "messages": messages })).unwrap_or_default();
        // Each first attempt's delay from its send to the consumer's start.
        let started_at = || {
            let now_us = now_us();
            for t in taken.iter().filter(|t| t.attempts == 1) {
                state.delivery.record(Duration::from_micros(now_us.saturating_sub(t.sent_us)));
            }
        };
        let outcome = self.run_consumer(&config, input, started_at).await;
        // Which failed, and why: all, or those the consumer named.
        let failed: HashMap<String, String> = match outcome {
            Ok(output) => {
                let retry: Vec<String> = serde_json::from_slice::<serde_json::Value>(&output)
                    .ok()
                    .and_then(|v| v.get("retry").cloned())
                    .and_then(|v| serde_json::from_value(v).ok())
                    .unwrap_or_default();
                taken
                    .iter()
                    .filter(|t| retry.contains(&t.id))
                    .map(|t| (t.id.clone(), "the consumer asked to retry it".to_string()))
                    .collect()
            }
            Err(e) => taken.iter().map(|t| (t.id.clone(), format!("{}: {}", e.kind.as_str(), e.message))).collect(),
        };
        if let Err(e) = self.settle(&state, &config, taken, failed).await {
            // The leases run out and the messages are taken again.
            tracing::warn!(tenant = %config.tenant, queue = %config.name, error = %e.message, "settling a batch failed; its messages will be taken again");
        }
        state.in_flight.fetch_sub(1, Ordering::AcqRel);
        state.wake.notify_one();
    }

    /// Run the consumer function on a batch, in its tenant's turns.
    async fn run_consumer(
        &self,
        config: &QueueConfig,
        input: Vec<u8>,
        started_at: impl FnOnce(),
    ) -> Result<Vec<u8>, ApiError> {
        let function =
            self.registry.resolve(&config.tenant, &config.consumer, || crate::names::route_bucket(None)).ok_or_else(
                || ApiError::not_found(format!("function `{}/{}` does not exist", config.tenant, config.consumer)),
            )?;
        let call_id = crate::new_call_id();
        let started = std::time::Instant::now();
        let slot = self
            .executor
            .admit_accepted(&function.settings.tenant, &function.key, function.settings.memory_limit)
            .await;
        started_at();
        let image = self.image_of(&function).await.map_err(|e| ApiError::internal("loading the consumer", e))?;
        let settings = self.settings_for(&function, None);
        let mut out = slot.run(&image, &settings, bytes::Bytes::from(input)).await;
        function.logs.append(&call_id, None, now_ms(), out.take_logs());
        let outcome = out.result.as_ref().map(drop).map_err(ErrorKind::of_call);
        self.account(&function, (&call_id, None), outcome, Some(started.elapsed()), Some(&out.usage));
        out.result.map_err(|e| ApiError::new(ErrorKind::of_call(&e), e.to_string()))
    }

    /// Acknowledge the batch's messages but `failed`; retry those (or
    /// move them to the dead letters past their attempts).
    async fn settle(
        &self,
        state: &QueueState,
        config: &QueueConfig,
        taken: Vec<Taken>,
        failed: HashMap<String, String>,
    ) -> Result<(), ApiError> {
        let (max_attempts, base_delay) = (config.max_attempts, config.retry_delay_ms);
        let now = now_ms();
        let outcome = |t: &Taken| match failed.get(&t.id) {
            None => Settle::Ack,
            Some(error) if t.attempts >= max_attempts => Settle::Dead(error.clone()),
            Some(_) => Settle::Retry(now + retry_delay(base_delay, t.attempts)),
        };
        if let Some((shared, node)) = &self.queues.shared {
            let plan: Vec<(&str, &str, Settle)> = taken
                .iter()
                .filter_map(|t| match &t.lease {
                    Lease::Stream(entry) => Some((entry.as_str(), t.id.as_str(), outcome(t))),
                    Lease::Store { .. } => None,
                })
                .collect();
            let queue = format!("{}/{}", config.tenant, config.name);
            let (acked, retried, died) = shared.settle(&queue, &config.tenant, node, now, &plan).await?;
            state.acked.fetch_add(acked, Ordering::Relaxed);
            state.retried.fetch_add(retried, Ordering::Relaxed);
            state.died.fetch_add(died, Ordering::Relaxed);
            return Ok(());
        }
        let prefix = prefix_of(&config.tenant, &config.name);
        let plan: Vec<(Taken, Settle)> = taken
            .into_iter()
            .map(|t| {
                let settle = outcome(&t);
                (t, settle)
            })
            .collect();
        // (acknowledged, retried, died, bytes removed, dead bytes added)
        let counts = self
            .queues
            .blocking(move |store| {
                store.transaction(|tx| {
                    let (mut acked, mut retried, mut died, mut removed, mut dead_bytes) =
                        (0u64, 0u64, 0u64, 0u64, 0u64);
                    for (t, settle) in &plan {
                        let Lease::Store { seq, until_ms } = t.lease else { continue };
                        let lease = ready_key(&prefix, until_ms, seq);
                        let key = message_key(&prefix, seq);
                        match settle {
                            Settle::Ack => {
                                // Done, whoever else holds it now.
                                tx.delete(READY, &lease)?;
                                if tx.delete(MESSAGES, &key)? {
                                    acked += 1;
                                    removed += t.body.len() as u64;
                                }
                            }
                            // Leased again by another delivery (this one ran
                            // past its lease): that one settles it.
                            _ if tx.get(READY, &lease)?.is_none() => {}
                            Settle::Dead(error) => {
                                tx.delete(READY, &lease)?;
                                tx.delete(MESSAGES, &key)?;
                                let dead = DeadLetter {
                                    id: t.id.clone(),
                                    attempts: t.attempts,
                                    sent_ms: t.sent_ms,
                                    died_ms: now,
                                    error: error.clone(),
                                    body_base64: BASE64.encode(&t.body),
                                };
                                let encoded = serde_json::to_vec(&dead).unwrap_or_default();
                                dead_bytes += encoded.len() as u64;
                                removed += t.body.len() as u64;
                                tx.put(DEAD, &key, &encoded)?;
                                died += 1;
                            }
                            Settle::Retry(visible) => {
                                tx.delete(READY, &lease)?;
                                tx.put(READY, &ready_key(&prefix, *visible, seq), b"")?;
                                retried += 1;
                            }
                        }
                    }
                    Ok((acked, retried, died, removed, dead_bytes))
                })
            })
            .await?;
        let (acked, retried, died, removed, dead_bytes) = counts;
        let gone = acked + died;
        state.messages.fetch_sub(gone.min(state.messages.load(Ordering::Relaxed)), Ordering::Relaxed);
        state.dead.fetch_add(died, Ordering::Relaxed);
        state.bytes.fetch_sub(removed.min(state.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        state.bytes.fetch_add(dead_bytes, Ordering::Relaxed);
        state.acked.fetch_add(acked, Ordering::Relaxed);
        state.retried.fetch_add(retried, Ordering::Relaxed);
        state.died.fetch_add(died, Ordering::Relaxed);
        let mut held = self.queues.held();
        if let Some(entry) = held.get_mut(&config.tenant) {
            entry.messages = entry.messages.saturating_sub(acked);
            entry.bytes = (entry.bytes + dead_bytes).saturating_sub(removed);
        }
        Ok(())
    }
}

/// Now, in microseconds since the Unix epoch.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

/// One turn of a queue's consumer loop: take a batch if one is due and
/// there is room, start it, and say how long to wait before the next turn
/// (zero: at once). None when the node is gone.
async fn consume_once(node: &Weak<Node>, state: &Arc<QueueState>) -> Option<Duration> {
    let node = node.upgrade()?;
    let config = state.config();
    if state.in_flight.load(Ordering::Acquire) >= config.concurrency {
        return Some(IDLE);
    }
    let taken = match &node.queues.shared {
        Some((shared, name)) => {
            let queue = format!("{}/{}", config.tenant, config.name);
            let timing = (now_ms(), config.visibility_timeout_ms, config.batch_wait_ms);
            match shared.take(&queue, name, config.batch_size as usize, timing).await {
                Ok(take) if take.messages.is_empty() => {
                    return Some(take.retry_in_ms.map_or(IDLE, |ms| Duration::from_millis(ms).min(IDLE)));
                }
                Ok(take) => take
                    .messages
                    .into_iter()
                    .map(|m| Taken {
                        id: m.id,
                        attempts: m.attempts,
                        sent_ms: m.sent_us / 1000,
                        sent_us: m.sent_us,
                        body: m.body,
                        lease: Lease::Stream(m.entry),
                    })
                    .collect(),
                Err(e) => {
                    tracing::warn!(queue = %config.name, error = %e, "taking a batch failed");
                    return Some(IDLE);
                }
            }
        }
        None => match take_stored(&node, &config).await {
            Ok(Ok(taken)) => taken,
            Ok(Err(wait)) => return Some(wait),
            Err(e) => {
                tracing::warn!(queue = %config.name, error = %e.message, "taking a batch failed");
                return Some(IDLE);
            }
        },
    };
    if !taken.is_empty() {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(node.clone().run_batch(state.clone(), config, taken));
    }
    Some(Duration::ZERO)
}

/// Take a batch from the node's store if one is due: the batch, or how
/// long to wait for one.
async fn take_stored(node: &Node, config: &QueueConfig) -> Result<Result<Vec<Taken>, Duration>, ApiError> {
    let prefix = prefix_of(&config.tenant, &config.name);
    let now = now_ms();
    let batch = config.batch_size as usize;
    let peek_prefix = prefix.clone();
    let visible = node
        .queues
        .blocking(move |store| {
            store.snapshot(|tx| {
                let mut visible = Vec::new();
                tx.visit_prefix(READY, &peek_prefix, |key, _| {
                    visible.extend(parse_ready(&peek_prefix, key).map(|(at, _)| at));
                    visible.len() < batch
                })?;
                Ok(visible)
            })
        })
        .await?;
    let ready = visible.iter().filter(|at| **at <= now).count();
    let Some(first) = visible.first().copied() else { return Ok(Err(IDLE)) };
    if ready == 0 {
        return Ok(Err(Duration::from_millis(first - now).min(IDLE)));
    }
    if ready < batch && first + config.batch_wait_ms > now {
        return Ok(Err(Duration::from_millis(first + config.batch_wait_ms - now).min(IDLE)));
    }
    let until_ms = now + config.visibility_timeout_ms;
    node.queues
        .blocking(move |store| {
            store.transaction(|tx| {
                let mut taken = Vec::new();
                for (key, _) in tx.scan_prefix(READY, &prefix, batch)? {
                    let Some((at, seq)) = parse_ready(&prefix, &key) else { continue };
                    if at > now {
                        break;
                    }
                    tx.delete(READY, &key)?;
                    let message_key = message_key(&prefix, seq);
                    // Settled by a delivery that ran past its lease: gone.
                    let Some(mut message) = tx.get(MESSAGES, &message_key)?.as_deref().and_then(Message::decode) else {
                        continue;
                    };
                    message.attempts += 1;
                    tx.put(MESSAGES, &message_key, &message.encode())?;
                    tx.put(READY, &ready_key(&prefix, until_ms, seq), b"")?;
                    taken.push(Taken {
                        id: format!("{seq:016x}"),
                        attempts: message.attempts,
                        sent_ms: message.sent_ms,
                        // The sequence number is the send time in µs.
                        sent_us: seq,
                        body: message.body,
                        lease: Lease::Store { seq, until_ms },
                    });
                }
                Ok(Ok(taken))
            })
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_keys_read_back_as_written() {
        let message = Message { attempts: 3, sent_ms: 1_700_000_000_123, body: b"hello".to_vec() };
        let back = Message::decode(&message.encode()).unwrap();
        assert_eq!((back.attempts, back.sent_ms, back.body), (3, 1_700_000_000_123, b"hello".to_vec()));
        assert!(Message::decode(b"short").is_none());
        let prefix = prefix_of("acme", "orders");
        assert_eq!(parse_ready(&prefix, &ready_key(&prefix, 42, 7)), Some((42, 7)));
        assert_eq!(parse_ready(&prefix, "acme/orders/zz"), None);
        // Entries sort by when they become visible.
        assert!(ready_key(&prefix, 9, 100) < ready_key(&prefix, 10, 1));
    }

    #[test]
    fn retries_back_off_doubling_up_to_five_minutes() {
        assert_eq!(retry_delay(1000, 1), 1000);
        assert_eq!(retry_delay(1000, 2), 2000);
        assert_eq!(retry_delay(1000, 4), 8000);
        assert_eq!(retry_delay(1000, 60), MAX_RETRY_DELAY_MS);
        assert_eq!(retry_delay(0, 5), 0);
    }
}
