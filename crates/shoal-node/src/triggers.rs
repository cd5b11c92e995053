//! Cron triggers: a schedule (`cron.rs`) that runs one of its tenant's
//! functions, with a fixed input, as an asynchronous call at each tick (a
//! call like any other: its record, its output, at least once).
//!
//! Each node runs the trigger chore: it sleeps until the next tick of any
//! trigger (at most half a second, to see changes), then offers each due
//! tick to the call queue. A tick is accepted only if it is later than the
//! trigger's last accepted tick, and becomes it in the same step as the
//! call is queued (one store transaction on one node; one Redis script in
//! a cluster, `shoal_cluster::SharedTriggers`). So each tick is one call
//! whichever nodes offer it, and a node killed at any point loses none:
//! the tick it was offering is either queued, or offered again by another
//! node within half a second.
//!
//! Late ticks: ticks due while no node ran the chore (the node or the
//! whole cluster was down) are caught up as follows. If every missed tick
//! is less than [`GRACE_MS`] old, each runs, in order; if older ones were
//! missed, only the newest due tick runs: at most one catch-up run after
//! downtime, never a burst. A tick refused for its tenant's limits (too
//! many asynchronous calls queued) is offered again after half a second
//! (or the refusal's `Retry-After`), under the same rule, and the refusal
//! shown with the trigger. A tick carries the trigger's `updated_ms` as
//! the offering node read it, and is refused unless the trigger is still
//! that record and enabled: a change, pause or removal stops the old
//! definition's ticks on every node at once.
//!
//! Tables: `triggers` (`tenant/name` → the record), `trigger_ticks`
//! (`tenant/name` → `"<tick ms> <call id>"`, the last accepted tick). In a
//! cluster both live in Redis and every node mirrors the records.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use shoal_cluster::{SharedTriggers, TriggerPut};
use shoal_state::{EmbeddedStore, StoreError, Table};
use tokio::sync::Notify;

use crate::calls::Tick;
use crate::cron::Schedule;
use crate::error::{ApiError, ErrorKind};
use crate::{Node, now_ms};

pub(crate) const TRIGGERS: Table = Table::new("triggers");
pub(crate) const TICKS: Table = Table::new("trigger_ticks");

/// The largest input a trigger carries (it is kept with the trigger, in
/// memory on every node of a cluster: 100 triggers of a tenant hold at
/// most 1.6 MiB of inputs).
pub const MAX_TRIGGER_INPUT: usize = 16 << 10;
/// The longest schedule expression and time zone name.
const MAX_SCHEDULE_LEN: usize = 200;
const MAX_ZONE_LEN: usize = 64;
/// Missed ticks younger than this all run; past it, only the newest.
pub const GRACE_MS: u64 = 30_000;
/// The most ticks of one trigger one round offers (a per-second schedule
/// misses at most `GRACE_MS / 1000` before the catch-up rule applies).
const MAX_BURST: usize = 64;
/// The longest the chore sleeps (how soon it sees a change made on
/// another node).
const POLL: Duration = Duration::from_millis(500);
/// Triggers one round offers ticks of at once.
const ROUND_CONCURRENCY: usize = 16;

/// A trigger as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRecord {
    pub tenant: String,
    pub name: String,
    pub schedule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub function: String,
    /// Its input, base64.
    #[serde(default)]
    pub input_base64: String,
    pub enabled: bool,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// What a client sets (`PUT /v1/triggers/{tenant}/{name}`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSpec {
    pub schedule: String,
    #[serde(default)]
    pub zone: Option<String>,
    pub function: String,
    /// The input as text, or (`input_base64`) as base64; neither: empty.
    #[serde(default)]
    pub input: Option<String>,
    #[serde(default)]
    pub input_base64: Option<String>,
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
}

fn enabled_by_default() -> bool {
    true
}

/// The last tick accepted as a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastRun {
    pub tick_ms: u64,
    pub call_id: String,
}

/// A trigger as shown to clients.
#[derive(Clone, Debug, Serialize)]
pub struct TriggerView {
    pub tenant: String,
    pub name: String,
    pub schedule: String,
    pub zone: String,
    pub function: String,
    /// The input as text when it is UTF-8.
    pub input: Option<String>,
    pub input_base64: String,
    pub enabled: bool,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub next_run_ms: Option<u64>,
    pub last_run: Option<LastRun>,
    /// Why this node could not queue its last due tick, if it could not.
    pub last_refusal: Option<String>,
}

/// `"<tick ms> <call id>"`, a trigger's progress.
pub(crate) fn parse_progress(bytes: &[u8]) -> Option<(u64, &str)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (tick, id) = text.split_once(' ')?;
    Some((tick.parse().ok()?, id))
}

/// Whether a stored trigger record is still the one of `generation` (its
/// `updated_ms`), and enabled.
pub(crate) fn is_generation(record: &[u8], generation: u64) -> bool {
    serde_json::from_slice::<TriggerRecord>(record).is_ok_and(|r| r.updated_ms == generation && r.enabled)
}

fn last_run(bytes: &[u8]) -> Option<LastRun> {
    parse_progress(bytes).map(|(tick_ms, id)| LastRun { tick_ms, call_id: id.to_string() })
}

fn trigger_key(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

/// The next tick of `schedule` strictly after `after_ms`.
fn next_tick(schedule: &Schedule, after_ms: u64) -> Option<u64> {
    let after = jiff::Timestamp::from_millisecond(i64::try_from(after_ms).ok()?).ok()?;
    u64::try_from(schedule.next_after(after)?.as_millisecond()).ok()
}

/// The ticks to offer at `now_ms`, the last accepted (or the trigger's
/// change) being `base_ms`: every one due if none is older than the grace,
/// else only the newest due (the one catch-up run).
fn due_ticks(schedule: &Schedule, base_ms: u64, now_ms: u64) -> Vec<u64> {
    let Some(first) = next_tick(schedule, base_ms).filter(|t| *t <= now_ms) else { return Vec::new() };
    if first + GRACE_MS < now_ms {
        return vec![newest_due(schedule, first, now_ms)];
    }
    let mut ticks = vec![first];
    while let Some(next) = next_tick(schedule, ticks[ticks.len() - 1]).filter(|t| *t <= now_ms) {
        if ticks.len() == MAX_BURST {
            break;
        }
        ticks.push(next);
    }
    ticks
}

/// The newest tick at or before `now_ms`, `first` being one: a binary
/// search between the newest tick known and now (some forty steps for any
/// downtime), so a long downtime is never walked tick by tick.
fn newest_due(schedule: &Schedule, first: u64, now_ms: u64) -> u64 {
    // `lo` is a tick; no tick falls after `hi`, up to now.
    let (mut lo, mut hi) = (first, now_ms);
    while hi > lo {
        let mid = lo + (hi - lo) / 2;
        match next_tick(schedule, mid).filter(|t| *t <= hi) {
            Some(tick) => lo = tick,
            None => hi = mid,
        }
    }
    lo
}

/// A trigger this node knows, ready for its chore.
#[derive(Debug)]
struct Armed {
    record: TriggerRecord,
    schedule: Schedule,
    input: Arc<[u8]>,
    last: Option<LastRun>,
    /// Ticks up to this were offered and found taken (by another node, or
    /// refused as no longer this trigger's): never offered again.
    offered_through: u64,
    /// When its next tick falls (None: disabled, or it never ticks again).
    next_ms: Option<u64>,
    refused: Option<String>,
    /// A refused tick is offered again from this time on (Unix ms).
    retry_at: u64,
}

impl Armed {
    fn new(record: TriggerRecord, last: Option<LastRun>) -> Result<Self, String> {
        let schedule = Schedule::parse(&record.schedule, record.zone.as_deref())?;
        let input = BASE64.decode(&record.input_base64).map_err(|e| format!("its input is not base64: {e}"))?;
        let mut armed = Self {
            record,
            schedule,
            input: input.into(),
            last,
            offered_through: 0,
            next_ms: None,
            refused: None,
            retry_at: 0,
        };
        armed.plan();
        Ok(armed)
    }

    /// Ticks after this are offered: the last accepted, or the trigger's
    /// last change (a new or changed trigger runs nothing from before it).
    fn base(&self) -> u64 {
        self.last.as_ref().map_or(0, |l| l.tick_ms).max(self.record.updated_ms).max(self.offered_through)
    }

    /// When the chore should look at it next: its next tick, or after a
    /// refusal the time it may be offered again.
    fn due_at(&self) -> Option<u64> {
        self.next_ms.map(|next| next.max(self.retry_at))
    }

    fn plan(&mut self) {
        self.next_ms = if self.record.enabled { next_tick(&self.schedule, self.base()) } else { None };
    }

    fn view(&self) -> TriggerView {
        let record = &self.record;
        TriggerView {
            tenant: record.tenant.clone(),
            name: record.name.clone(),
            schedule: record.schedule.clone(),
            zone: record.zone.clone().unwrap_or_else(|| "UTC".to_string()),
            function: record.function.clone(),
            input: std::str::from_utf8(&self.input).ok().map(str::to_string),
            input_base64: record.input_base64.clone(),
            enabled: record.enabled,
            created_ms: record.created_ms,
            updated_ms: record.updated_ms,
            next_run_ms: self.next_ms,
            last_run: self.last.clone(),
            last_refusal: self.refused.clone(),
        }
    }
}

/// What became of a round's offer of a trigger's ticks.
#[derive(Debug, Default)]
struct Settled {
    last: Option<LastRun>,
    offered_through: u64,
    /// Why a tick was refused, and when to offer it again.
    refused: Option<(String, u64)>,
}

/// A trigger's due ticks, to offer to the call queue.
struct Offer {
    key: String,
    record: TriggerRecord,
    input: Arc<[u8]>,
    ticks: Vec<u64>,
}

/// The triggers this node knows: from its store, or mirrored from Redis.
pub(crate) struct Triggers {
    store: Arc<EmbeddedStore>,
    shared: Option<SharedTriggers>,
    armed: Mutex<BTreeMap<String, Armed>>,
    /// The shared triggers' version last mirrored (cluster only).
    version: AtomicU64,
    /// Wakes the chore: a trigger changed on this node.
    changed: Arc<Notify>,
    max_per_tenant: usize,
    /// Held across a put's count, write and arming, so concurrent puts on
    /// one node cannot pass the cap together.
    puts: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Triggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Triggers").finish_non_exhaustive()
    }
}

impl Triggers {
    /// Load what the store holds (on one node; in a cluster the first
    /// mirror fills it).
    pub(crate) fn open(
        store: Arc<EmbeddedStore>,
        shared: Option<SharedTriggers>,
        max_per_tenant: usize,
    ) -> Result<Self, StoreError> {
        let triggers = Self {
            store,
            shared,
            armed: Mutex::default(),
            version: AtomicU64::new(0),
            changed: Arc::default(),
            max_per_tenant,
            puts: tokio::sync::Mutex::new(()),
        };
        if triggers.shared.is_none() {
            let ticks: BTreeMap<String, Vec<u8>> = triggers.store.scan_prefix(TICKS, "")?.into_iter().collect();
            let mut armed = triggers.armed();
            for (key, bytes) in triggers.store.scan_prefix(TRIGGERS, "")? {
                let last = ticks.get(&key).and_then(|b| last_run(b));
                match serde_json::from_slice(&bytes).map_err(|e| e.to_string()).and_then(|r| Armed::new(r, last)) {
                    Ok(trigger) => {
                        armed.insert(key, trigger);
                    }
                    Err(e) => {
                        tracing::error!(trigger = %key, error = %e, "a stored trigger is unreadable; skipping it")
                    }
                }
            }
        }
        Ok(triggers)
    }

    fn armed(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Armed>> {
        self.armed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn count_of(&self, tenant: &str) -> usize {
        self.armed().values().filter(|a| a.record.tenant == tenant).count()
    }

    /// Read the shared triggers again if they changed (cluster only). If
    /// Redis lost them, put back this node's copy.
    async fn mirror(&self, force: bool) -> Result<(), ApiError> {
        let Some(shared) = &self.shared else { return Ok(()) };
        let version = shared.version().await?;
        let seen = self.version.load(Ordering::Acquire);
        // Redis lost them (restarted empty, or from an older snapshot).
        if seen > 0 && version < seen {
            let records: Vec<(String, String, Vec<u8>)> = self
                .armed()
                .iter()
                .map(|(key, a)| {
                    (key.clone(), a.record.tenant.clone(), serde_json::to_vec(&a.record).unwrap_or_default())
                })
                .collect();
            let n = shared.republish(&records).await?;
            tracing::warn!(n, "Redis had lost the cron triggers: put back this node's copy");
        } else if version == seen && !force {
            return Ok(());
        }
        let (version, records) = shared.all().await?;
        let keys: Vec<&str> = records.iter().map(|(key, _)| key.as_str()).collect();
        let ticks = shared.ticks(&keys).await?;
        let mut fresh = BTreeMap::new();
        for ((key, bytes), tick) in records.iter().zip(ticks) {
            let Ok(record) = serde_json::from_slice::<TriggerRecord>(bytes) else {
                tracing::error!(trigger = %key, "a shared trigger is unreadable; skipping it");
                continue;
            };
            let last = tick.as_deref().and_then(|t| last_run(t.as_bytes()));
            fresh.insert(key.clone(), (record, last));
        }
        let mut armed = self.armed();
        armed.retain(|key, _| fresh.contains_key(key));
        for (key, (record, last)) in fresh {
            match armed.get_mut(&key) {
                Some(known) if known.record == record => {
                    if last.as_ref().map(|l| l.tick_ms) > known.last.as_ref().map(|l| l.tick_ms) {
                        known.last = last;
                        known.plan();
                    }
                }
                _ => match Armed::new(record, last) {
                    Ok(trigger) => {
                        armed.insert(key, trigger);
                    }
                    Err(e) => {
                        tracing::error!(trigger = %key, error = %e, "a shared trigger cannot be armed; skipping it")
                    }
                },
            }
        }
        self.version.store(version, Ordering::Release);
        Ok(())
    }

    /// The last accepted tick of each of `keys`, as stored now (another
    /// node may have run them).
    async fn progress(&self, keys: Vec<String>) -> Result<Vec<Option<LastRun>>, ApiError> {
        if let Some(shared) = &self.shared {
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let ticks = shared.ticks(&refs).await?;
            return Ok(ticks.into_iter().map(|t| t.and_then(|t| last_run(t.as_bytes()))).collect());
        }
        let store = self.store.clone();
        let found = tokio::task::spawn_blocking(move || {
            store.snapshot(|tx| keys.iter().map(|key| Ok(tx.get(TICKS, key)?.and_then(|b| last_run(&b)))).collect())
        })
        .await
        .map_err(|e| ApiError::internal("reading triggers' progress", e))?;
        Ok(found?)
    }

    /// Note what became of a round's offer of the trigger `key` (unless it
    /// changed meanwhile).
    fn settle(&self, key: &str, record: &TriggerRecord, settled: Settled) {
        let mut armed = self.armed();
        let Some(known) = armed.get_mut(key).filter(|k| k.record == *record) else { return };
        if settled.last.as_ref().map(|l| l.tick_ms) > known.last.as_ref().map(|l| l.tick_ms) {
            known.last = settled.last;
        }
        known.offered_through = known.offered_through.max(settled.offered_through);
        known.retry_at = settled.refused.as_ref().map_or(0, |(_, retry_at)| *retry_at);
        known.refused = settled.refused.map(|(why, _)| why);
        known.plan();
    }
}

impl Node {
    /// Create or replace a trigger; true when created.
    pub async fn put_trigger(
        &self,
        tenant: &str,
        name: &str,
        spec: TriggerSpec,
    ) -> Result<(TriggerView, bool), ApiError> {
        if spec.schedule.len() > MAX_SCHEDULE_LEN {
            return Err(ApiError::bad_request(format!("a schedule is at most {MAX_SCHEDULE_LEN} bytes")));
        }
        if spec.zone.as_ref().is_some_and(|z| z.len() > MAX_ZONE_LEN) {
            return Err(ApiError::bad_request(format!("a time zone name is at most {MAX_ZONE_LEN} bytes")));
        }
        crate::names::check_reference(&spec.function)?;
        let schedule = Schedule::parse(&spec.schedule, spec.zone.as_deref())
            .map_err(|e| ApiError::bad_request(format!("schedule {:?}: {e}", spec.schedule)))?;
        let now = now_ms();
        if next_tick(&schedule, now).is_none() {
            return Err(ApiError::bad_request(format!(
                "schedule {:?} never ticks (none in the next eight years)",
                spec.schedule
            )));
        }
        let input = match (spec.input, spec.input_base64) {
            (Some(_), Some(_)) => return Err(ApiError::bad_request("give `input` or `input_base64`, not both")),
            (Some(text), None) => text.into_bytes(),
            (None, Some(encoded)) => {
                BASE64.decode(encoded).map_err(|e| ApiError::bad_request(format!("input_base64 is not base64: {e}")))?
            }
            (None, None) => Vec::new(),
        };
        if input.len() > MAX_TRIGGER_INPUT {
            return Err(ApiError::new(
                ErrorKind::TooLarge,
                format!("a trigger's input is at most {MAX_TRIGGER_INPUT} bytes (this one has {})", input.len()),
            ));
        }
        if !self.registry.tenant_active(tenant) {
            return Err(ApiError::not_found(format!("tenant `{tenant}` does not exist")));
        }
        let exists = || self.registry.resolve(tenant, &spec.function, || 0).is_some();
        if !exists() {
            if self.cluster.is_some() {
                self.registry.mirror(true, self.config.log_lines_per_function).await?;
            }
            if !exists() {
                return Err(ApiError::not_found(format!("function `{tenant}/{}` does not exist", spec.function)));
            }
        }
        let key = trigger_key(tenant, name);
        let triggers = &self.triggers;
        let _put = triggers.puts.lock().await;
        let created_ms = triggers.armed().get(&key).map_or(now, |a| a.record.created_ms);
        let record = TriggerRecord {
            tenant: tenant.to_string(),
            name: name.to_string(),
            schedule: spec.schedule,
            zone: spec.zone,
            function: spec.function,
            input_base64: BASE64.encode(&input),
            enabled: spec.enabled,
            created_ms,
            updated_ms: now,
        };
        let max = triggers.max_per_tenant;
        let full = || {
            ApiError::new(
                ErrorKind::LimitExceeded,
                format!("tenant `{tenant}` has {max} triggers, its limit; remove one first"),
            )
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| ApiError::internal("encoding a trigger", e))?;
        let created = match &triggers.shared {
            Some(shared) => match shared.put(&key, tenant, &bytes, max).await? {
                TriggerPut::Created => true,
                TriggerPut::Replaced => false,
                TriggerPut::TenantFull => return Err(full()),
            },
            None => {
                let exists = triggers.armed().contains_key(&key);
                if !exists && triggers.count_of(tenant) >= max {
                    return Err(full());
                }
                let (store, stored_key) = (triggers.store.clone(), key.clone());
                tokio::task::spawn_blocking(move || store.put(TRIGGERS, &stored_key, &bytes))
                    .await
                    .map_err(|e| ApiError::internal("storing a trigger", e))??;
                !exists
            }
        };
        let last = triggers.progress(vec![key.clone()]).await?.pop().flatten();
        let armed = Armed::new(record, last).map_err(|e| ApiError::internal("arming a trigger", e))?;
        let view = armed.view();
        triggers.armed().insert(key, armed);
        triggers.changed.notify_one();
        tracing::info!(%tenant, trigger = %name, created, "trigger set");
        Ok((view, created))
    }

    /// Remove a trigger and its progress; false if there was none.
    pub async fn remove_trigger(&self, tenant: &str, name: &str) -> Result<bool, ApiError> {
        let key = trigger_key(tenant, name);
        let triggers = &self.triggers;
        let removed = match &triggers.shared {
            Some(shared) => shared.remove(&key, tenant).await?,
            None => {
                let (store, stored_key) = (triggers.store.clone(), key.clone());
                tokio::task::spawn_blocking(move || {
                    store.transaction(|tx| {
                        tx.delete(TICKS, &stored_key)?;
                        tx.delete(TRIGGERS, &stored_key)
                    })
                })
                .await
                .map_err(|e| ApiError::internal("removing a trigger", e))??
            }
        };
        let known = triggers.armed().remove(&key).is_some();
        if removed || known {
            tracing::info!(%tenant, trigger = %name, "trigger removed");
        }
        Ok(removed)
    }

    /// Remove every trigger of `tenant` (its deletion's first step): all
    /// stored under its name, readable or not.
    pub(crate) async fn remove_triggers_of(&self, tenant: &str) -> Result<usize, ApiError> {
        let prefix = trigger_key(tenant, "");
        let stored: Vec<String> = match &self.triggers.shared {
            Some(shared) => shared.all().await?.1.into_iter().map(|(key, _)| key).collect(),
            None => {
                let store = self.triggers.store.clone();
                let scan = prefix.clone();
                tokio::task::spawn_blocking(move || store.scan_prefix(TRIGGERS, &scan))
                    .await
                    .map_err(|e| ApiError::internal("listing a tenant's triggers", e))??
                    .into_iter()
                    .map(|(key, _)| key)
                    .collect()
            }
        };
        let names: Vec<&str> = stored.iter().filter_map(|key| key.strip_prefix(&prefix)).collect();
        for name in &names {
            self.remove_trigger(tenant, name).await?;
        }
        Ok(names.len())
    }

    /// `tenant`'s triggers (or the one named), with their last runs as
    /// stored now.
    /// (In a cluster, as this node mirrors them: the chore reads changes
    /// within half a second.)
    pub async fn triggers_of(&self, tenant: &str, only: Option<&str>) -> Result<Vec<TriggerView>, ApiError> {
        let mut views: Vec<TriggerView> = self
            .triggers
            .armed()
            .values()
            .filter(|a| a.record.tenant == tenant && only.is_none_or(|name| a.record.name == name))
            .map(Armed::view)
            .collect();
        let keys = views.iter().map(|v| trigger_key(&v.tenant, &v.name)).collect();
        for (view, last) in views.iter_mut().zip(self.triggers.progress(keys).await?) {
            if last.as_ref().map(|l| l.tick_ms) > view.last_run.as_ref().map(|l| l.tick_ms) {
                view.last_run = last;
            }
        }
        Ok(views)
    }

    /// Start the trigger chore (see the module's comment).
    pub(crate) fn spawn_trigger_chore(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let changed = self.triggers.changed.clone();
        crate::supervise(self, "cron triggers", move || {
            let (node, changed) = (weak.clone(), changed.clone());
            async move {
                loop {
                    let Some(n) = node.upgrade() else { return };
                    let wait = n.trigger_round().await;
                    drop(n);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = changed.notified() => {}
                    }
                }
            }
        });
    }

    /// Offer every due tick; returns how long to sleep before the next.
    async fn trigger_round(self: &Arc<Self>) -> Duration {
        if let Err(e) = self.triggers.mirror(false).await {
            tracing::warn!(error = %e.message, "reading the cluster's triggers failed");
        }
        let now = now_ms();
        // What is due is read under the lock; its ticks are worked out
        // after (a catch-up's search takes some steps).
        let due: Vec<(Offer, Schedule, u64)> = self
            .triggers
            .armed()
            .iter()
            .filter(|(_, a)| a.due_at().is_some_and(|at| at <= now))
            .filter(|(_, a)| self.registry.tenant_active(&a.record.tenant))
            .map(|(key, a)| {
                let offer =
                    Offer { key: key.clone(), record: a.record.clone(), input: a.input.clone(), ticks: Vec::new() };
                (offer, a.schedule.clone(), a.base())
            })
            .collect();
        let due: Vec<Offer> = due
            .into_iter()
            .map(|(offer, schedule, base)| Offer { ticks: due_ticks(&schedule, base, now), ..offer })
            .filter(|offer| !offer.ticks.is_empty())
            .collect();
        let mut offers = tokio::task::JoinSet::new();
        for offer in due {
            if offers.len() >= ROUND_CONCURRENCY {
                offers.join_next().await;
            }
            let node = self.clone();
            offers.spawn(async move { node.offer_ticks(offer).await });
        }
        while offers.join_next().await.is_some() {}
        let next = self.triggers.armed().values().filter_map(Armed::due_at).min();
        let now = now_ms();
        next.map_or(POLL, |next| Duration::from_millis(next.saturating_sub(now)).min(POLL))
    }

    /// Offer a trigger's due ticks, in order, stopping at a refusal.
    async fn offer_ticks(self: Arc<Self>, offer: Offer) {
        let Offer { key, record, input, ticks } = offer;
        let mut settled = Settled::default();
        for tick_ms in ticks {
            let tick = Tick { key: key.clone(), name: record.name.clone(), tick_ms, generation: record.updated_ms };
            match self.accept_async_tick(&record.tenant, &record.function, input.to_vec(), None, Some(&tick)).await {
                Ok(Some(call_id)) => {
                    tracing::debug!(tenant = %record.tenant, trigger = %record.name, tick_ms, %call_id, "trigger ran");
                    settled.last = Some(LastRun { tick_ms, call_id });
                }
                // Taken already (by another node), or no longer this
                // trigger's (changed or removed meanwhile): never offered
                // again; learn how far it got.
                Ok(None) => {
                    settled.offered_through = tick_ms;
                    match self.triggers.progress(vec![key.clone()]).await {
                        Ok(mut found) => settled.last = found.pop().flatten().or(settled.last),
                        Err(e) => {
                            tracing::warn!(trigger = %key, error = %e.message, "reading a trigger's progress failed");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(tenant = %record.tenant, trigger = %record.name, tick_ms, error = %e.message, "a trigger's tick could not be queued; offered again later");
                    let wait = e.retry_after.unwrap_or(POLL).max(POLL);
                    let retry_at = now_ms() + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX / 2);
                    settled.refused = Some((format!("{}: {}", e.kind.as_str(), e.message), retry_at));
                    break;
                }
            }
        }
        self.triggers.settle(&key, &record, settled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> u64 {
        text.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64
    }

    #[test]
    fn every_missed_tick_within_the_grace_runs_and_after_downtime_only_the_newest() {
        let every_second = Schedule::parse("* * * * * *", None).unwrap();
        let base = ms("2026-12-04T10:00:00Z");
        assert_eq!(due_ticks(&every_second, base, base + 999), Vec::<u64>::new(), "nothing due yet");
        assert_eq!(due_ticks(&every_second, base, base + 1000), vec![base + 1000]);
        // A stall of 3.5 s: each of the three ticks runs, in order.
        assert_eq!(due_ticks(&every_second, base, base + 3500), vec![base + 1000, base + 2000, base + 3000]);
        // Down for an hour: one catch-up run, the newest due tick.
        assert_eq!(due_ticks(&every_second, base, base + 3_600_500), vec![base + 3_600_000]);
        let hourly = Schedule::parse("0 * * * *", None).unwrap();
        assert_eq!(due_ticks(&hourly, base, base + 5 * 3_600_000 + 10), vec![base + 5 * 3_600_000]);
        let daily = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        // Down from 1 December to 4 December 12:00 UTC: the tick of 4 December 01:30 UTC.
        assert_eq!(
            due_ticks(&daily, ms("2026-12-01T00:00:00Z"), ms("2026-12-04T12:00:00Z")),
            vec![ms("2026-12-04T01:30:00Z")]
        );
        // Within the grace every missed tick runs: a stall of 29 s, 29 ticks.
        let base = ms("2026-12-04T10:00:00Z");
        assert_eq!(due_ticks(&every_second, base, base + 29_500).len(), 29);
    }

    #[test]
    fn the_newest_due_tick_is_found_by_search_as_a_walk_would() {
        let cases = [
            ("* * * * * *", "2026-12-04T10:00:00Z", "2026-12-04T11:00:00.500Z"),
            ("* * * 1 * *", "2026-11-01T00:00:05Z", "2026-12-20T12:00:00Z"),
            ("*/7 3-5 * * MON", "2026-11-02T03:00:00Z", "2026-12-04T12:00:00Z"),
            ("0 30 2 * * *", "2026-03-20T00:00:00Z", "2026-04-02T00:00:00Z"),
        ];
        for (expr, first_after, now) in cases {
            let schedule = Schedule::parse(expr, Some("Europe/Berlin")).unwrap();
            let (first, now) = (next_tick(&schedule, ms(first_after)).unwrap(), ms(now));
            let mut walked = first;
            while let Some(t) = next_tick(&schedule, walked).filter(|t| *t <= now) {
                walked = t;
            }
            assert_eq!(newest_due(&schedule, first, now), walked, "{expr}");
        }
    }

    #[test]
    fn progress_reads_back_as_written() {
        assert_eq!(parse_progress(b"1700000000000 0018abc"), Some((1_700_000_000_000, "0018abc")));
        assert_eq!(parse_progress(b"junk"), None);
        assert_eq!(parse_progress(b"12x id"), None);
    }
}
