//! The embedded backend: values in chunks of [`CHUNK_BYTES`] in the redb
//! file of the data directory, a per-tenant usage counter (the sum of
//! [`key_charge`] over the tenant's keys) updated in the same transaction
//! as the value, every acknowledged write durable.
//! [`EmbeddedGlobal`] is the synchronous store; [`EmbeddedTier`] runs it on
//! the blocking pool (writes fsync) and keeps lock leases in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    GlobalTier, LeaseToken, Quotas, StateFuture, StateLimits, key_charge, not_an_integer, over_quota, overflow,
    too_large,
};
use crate::embedded::{EmbeddedStore, ReadTx, Table, WriteTx};
use crate::local::{CHUNK_BYTES, DirtyChunks};
use crate::{ScopedKey, StateError};

/// `<tenant>/<key>` → the value's length.
const META: Table = Table::new("state_meta");
/// `<tenant>/<key>\0<index>` → one chunk of the value.
const CHUNKS: Table = Table::new("state_chunks");
/// `<tenant>` → what its keys count for against its quota (the sum of
/// [`key_charge`]).
const USAGE: Table = Table::new("state_usage2");
/// `<tenant>` → the bytes of its values alone: the counter of stores
/// written before keys were charged. Never read: a tenant without a
/// [`USAGE`] row has it computed from its [`META`] rows at its next write,
/// and this row is dropped in the same transaction.
const OLD_USAGE: Table = Table::new("state_usage");

/// Most keys one transaction of [`EmbeddedGlobal::delete_tenant`] removes.
const DELETE_BATCH_KEYS: usize = 1000;
/// Most chunks one such transaction removes (it takes at least one key,
/// however large), so a batch of large values is no longer than one of
/// small ones.
const DELETE_BATCH_CHUNKS: u64 = 4096;

fn chunk_key(key: &ScopedKey, idx: u64) -> String {
    chunk_name(key.as_str(), idx)
}

fn chunk_name(scoped: &str, idx: u64) -> String {
    // The key may hold any character, NUL included; the suffix has a fixed
    // length, so (key, idx) ↦ string is one-to-one.
    format!("{scoped}\0{idx:08x}")
}

fn decode_u64(bytes: Option<Vec<u8>>) -> u64 {
    bytes.as_deref().map(decode).unwrap_or(0)
}

fn decode(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes).map(u64::from_le_bytes).unwrap_or(0)
}

/// A fold over a tenant's [`META`] rows (`prefix` is its key prefix)
/// adding up what its keys count for.
fn add_charge(prefix: &str) -> impl Fn(u64, &str, &[u8]) -> u64 + '_ {
    move |sum, scoped, len| sum.saturating_add(key_charge(scoped.get(prefix.len()..).unwrap_or_default(), decode(len)))
}

/// The global tier on the embedded store.
#[derive(Debug)]
pub struct EmbeddedGlobal {
    store: Arc<EmbeddedStore>,
    limits: StateLimits,
    quotas: Quotas,
}

impl EmbeddedGlobal {
    pub fn new(store: Arc<EmbeddedStore>, limits: StateLimits) -> Self {
        Self { store, limits, quotas: Quotas::default() }
    }

    pub fn limits(&self) -> StateLimits {
        self.limits
    }

    fn len_in(tx: &ReadTx, key: &ScopedKey) -> Result<Option<u64>, StateError> {
        Ok(tx.get(META, key.as_str())?.map(|b| decode_u64(Some(b))))
    }

    /// The whole value, if present.
    pub fn get(&self, key: &ScopedKey) -> Result<Option<Vec<u8>>, StateError> {
        self.get_range(key, 0, u64::MAX)
    }

    /// `len` bytes from `offset`, clamped to the value's end, reading only
    /// the chunks that hold them.
    pub fn get_range(&self, key: &ScopedKey, offset: u64, len: u64) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.store.snapshot(|tx| {
            let Some(size) = Self::len_in(tx, key).map_err(into_store)? else { return Ok(None) };
            let start = offset.min(size);
            let end = start.saturating_add(len).min(size);
            let mut out = Vec::with_capacity((end - start) as usize);
            let chunk = CHUNK_BYTES as u64;
            let mut idx = start / chunk;
            while idx * chunk < end {
                let bytes = tx.get(CHUNKS, &chunk_key(key, idx))?.unwrap_or_default();
                let chunk_start = idx * chunk;
                let from = (start.max(chunk_start) - chunk_start) as usize;
                let to = ((end.min(chunk_start + chunk) - chunk_start) as usize).min(bytes.len());
                if from < to {
                    out.extend_from_slice(&bytes[from..to]);
                }
                idx += 1;
            }
            Ok(Some(out))
        })?)
    }

    /// Length of the value, if present.
    pub fn len(&self, key: &ScopedKey) -> Result<Option<u64>, StateError> {
        Ok(self.store.snapshot(|tx| Self::len_in(tx, key).map_err(into_store))?)
    }

    /// What `tenant`'s keys count for, inside a write. A tenant with no
    /// counter yet — none of its keys written since keys were charged, its
    /// old counter counting value bytes only — has it computed once from
    /// its length rows; the caller stores it and the old counter goes (in
    /// the same transaction, so both or neither).
    fn used(tx: &WriteTx<'_>, tenant: &str) -> Result<u64, StateError> {
        if let Some(bytes) = tx.get(USAGE, tenant)? {
            return Ok(decode(&bytes));
        }
        let prefix = ScopedKey::tenant_prefix(tenant);
        let used = tx.fold_prefix(META, &prefix, 0, add_charge(&prefix))?;
        tx.delete(OLD_USAGE, tenant)?;
        Ok(used)
    }

    /// Check the size and quota for `key` going from its current length
    /// (`None`: absent) to `new_len` (`None`: deleted), and record the new
    /// usage. A key counts for [`key_charge`] of its length while it
    /// exists, so rewriting one charges only the change in length, and
    /// deleting it gives back all of it.
    fn account(
        &self,
        tx: &WriteTx<'_>,
        key: &ScopedKey,
        old_len: Option<u64>,
        new_len: Option<u64>,
    ) -> Result<(), StateError> {
        if let Some(len) = new_len
            && len > self.limits.max_value_bytes
        {
            return Err(too_large(len, self.limits.max_value_bytes));
        }
        let tenant = key.tenant();
        let old = old_len.map_or(0, |len| key_charge(key.key(), len));
        let new = new_len.map_or(0, |len| key_charge(key.key(), len));
        let after = Self::used(tx, tenant)?.saturating_sub(old).saturating_add(new);
        let quota = self.quotas.of(tenant, &self.limits);
        if new > old && after > quota {
            return Err(over_quota(tenant, after, quota));
        }
        tx.put(USAGE, tenant, &after.to_le_bytes())?;
        Ok(())
    }

    fn old_len(tx: &WriteTx<'_>, key: &ScopedKey) -> Result<Option<u64>, StateError> {
        Ok(tx.get(META, key.as_str())?.map(|b| decode_u64(Some(b))))
    }

    /// Drop chunks past `new_len` (when a value shrinks).
    fn truncate(tx: &WriteTx<'_>, key: &ScopedKey, old_len: u64, new_len: u64) -> Result<(), StateError> {
        let chunk = CHUNK_BYTES as u64;
        for idx in new_len.div_ceil(chunk)..old_len.div_ceil(chunk) {
            tx.delete(CHUNKS, &chunk_key(key, idx))?;
        }
        Ok(())
    }

    /// Replace the whole value.
    pub fn set(&self, key: &ScopedKey, bytes: &[u8]) -> Result<(), StateError> {
        let new_len = bytes.len() as u64;
        self.store
            .transaction(|tx| {
                let old_len = Self::old_len(tx, key).map_err(into_store)?;
                self.account(tx, key, old_len, Some(new_len)).map_err(into_store)?;
                Self::truncate(tx, key, old_len.unwrap_or(0), new_len).map_err(into_store)?;
                for (idx, piece) in bytes.chunks(CHUNK_BYTES).enumerate() {
                    tx.put(CHUNKS, &chunk_key(key, idx as u64), piece)?;
                }
                tx.put(META, key.as_str(), &new_len.to_le_bytes())
            })
            .map_err(from_store)
    }

    /// Write the chunks a push sends and set the value's length.
    pub fn write_chunks(&self, key: &ScopedKey, dirty: &DirtyChunks) -> Result<(), StateError> {
        self.store
            .transaction(|tx| {
                let old_len = Self::old_len(tx, key).map_err(into_store)?;
                self.account(tx, key, old_len, Some(dirty.len)).map_err(into_store)?;
                Self::truncate(tx, key, old_len.unwrap_or(0), dirty.len).map_err(into_store)?;
                for (idx, bytes) in &dirty.chunks {
                    tx.put(CHUNKS, &chunk_key(key, u64::from(*idx)), bytes)?;
                }
                tx.put(META, key.as_str(), &dirty.len.to_le_bytes())
            })
            .map_err(from_store)
    }

    /// Remove the value; returns whether it existed.
    pub fn delete(&self, key: &ScopedKey) -> Result<bool, StateError> {
        self.store
            .transaction(|tx| {
                let Some(old_len) = Self::old_len(tx, key).map_err(into_store)? else { return Ok(false) };
                self.account(tx, key, Some(old_len), None).map_err(into_store)?;
                Self::truncate(tx, key, old_len, 0).map_err(into_store)?;
                tx.delete(META, key.as_str())?;
                Ok(true)
            })
            .map_err(from_store)
    }

    /// Append `data` atomically; returns the new length.
    pub fn append(&self, key: &ScopedKey, data: &[u8]) -> Result<u64, StateError> {
        self.store
            .transaction(|tx| {
                let existing = Self::old_len(tx, key).map_err(into_store)?;
                let old_len = existing.unwrap_or(0);
                let new_len = old_len + data.len() as u64;
                self.account(tx, key, existing, Some(new_len)).map_err(into_store)?;
                let chunk = CHUNK_BYTES as u64;
                let mut written = 0usize;
                while written < data.len() {
                    let pos = old_len + written as u64;
                    let idx = pos / chunk;
                    let ck = chunk_key(key, idx);
                    let mut bytes = tx.get(CHUNKS, &ck)?.unwrap_or_default();
                    let room = CHUNK_BYTES - (pos % chunk) as usize;
                    let take = room.min(data.len() - written);
                    bytes.extend_from_slice(&data[written..written + take]);
                    tx.put(CHUNKS, &ck, &bytes)?;
                    written += take;
                }
                tx.put(META, key.as_str(), &new_len.to_le_bytes())?;
                Ok(new_len)
            })
            .map_err(from_store)
    }

    /// Add `delta` to the integer stored (as decimal text) under `key`,
    /// starting from 0; returns the new value.
    pub fn incr(&self, key: &ScopedKey, delta: i64) -> Result<i64, StateError> {
        self.store
            .transaction(|tx| {
                let old_len = Self::old_len(tx, key).map_err(into_store)?;
                let current = match old_len {
                    None => 0,
                    Some(len) if len > 20 => return Err(into_store(not_an_integer(key))),
                    Some(_) => {
                        let text = tx.get(CHUNKS, &chunk_key(key, 0))?.unwrap_or_default();
                        super::parse_counter(&text).ok_or_else(|| into_store(not_an_integer(key)))?
                    }
                };
                let next = current.checked_add(delta).ok_or_else(|| into_store(overflow(key, delta)))?;
                let text = next.to_string();
                self.account(tx, key, old_len, Some(text.len() as u64)).map_err(into_store)?;
                tx.put(CHUNKS, &chunk_key(key, 0), text.as_bytes())?;
                tx.put(META, key.as_str(), &(text.len() as u64).to_le_bytes())?;
                Ok(next)
            })
            .map_err(from_store)
    }

    /// Every key of `tenant` with its length, in key order.
    pub fn list(&self, tenant: &str) -> Result<Vec<(String, u64)>, StateError> {
        let prefix = ScopedKey::tenant_prefix(tenant);
        let entries = self.store.scan_prefix(META, &prefix)?;
        Ok(entries.into_iter().map(|(k, v)| (k[prefix.len()..].to_string(), decode_u64(Some(v)))).collect())
    }

    /// Bytes of state `tenant` uses, as its quota counts them. Computed
    /// (not stored: this is a read) when its counter predates per-key
    /// charges.
    pub fn usage(&self, tenant: &str) -> Result<u64, StateError> {
        Ok(self.store.snapshot(|tx| match tx.get(USAGE, tenant)? {
            Some(bytes) => Ok(decode(&bytes)),
            None => {
                let prefix = ScopedKey::tenant_prefix(tenant);
                tx.fold_prefix(META, &prefix, 0, add_charge(&prefix))
            }
        })?)
    }

    /// Delete every key of `tenant`, its counters and its quota; returns
    /// how many keys there were. Batches of at most [`DELETE_BATCH_KEYS`]
    /// keys and [`DELETE_BATCH_CHUNKS`] chunks, each its own transaction
    /// keeping the counter right, so other writes wait for one batch at a
    /// time and a deletion cut short leaves a consistent store that a
    /// second call finishes.
    pub fn delete_tenant(&self, tenant: &str) -> Result<u64, StateError> {
        let prefix = ScopedKey::tenant_prefix(tenant);
        let mut deleted = 0u64;
        loop {
            let removed = self.store.transaction(|tx| {
                let mut removed = 0u64;
                let mut chunks = 0u64;
                let mut freed = 0u64;
                for (scoped, len) in tx.scan_prefix(META, &prefix, DELETE_BATCH_KEYS)? {
                    let len = decode(&len);
                    let count = len.div_ceil(CHUNK_BYTES as u64);
                    if removed > 0 && chunks + count > DELETE_BATCH_CHUNKS {
                        break;
                    }
                    for idx in 0..count {
                        tx.delete(CHUNKS, &chunk_name(&scoped, idx))?;
                    }
                    tx.delete(META, &scoped)?;
                    freed = freed.saturating_add(key_charge(scoped.get(prefix.len()..).unwrap_or_default(), len));
                    chunks += count;
                    removed += 1;
                }
                // A counter not made yet is computed from what is left.
                if let Some(used) = tx.get(USAGE, tenant)? {
                    tx.put(USAGE, tenant, &decode(&used).saturating_sub(freed).to_le_bytes())?;
                }
                Ok(removed)
            })?;
            if removed == 0 {
                break;
            }
            deleted += removed;
        }
        // Every chunk went with its length row; sweep the tenant's prefix
        // anyway, so nothing of it can be left behind.
        loop {
            let swept = self.store.transaction(|tx| {
                let stray = tx.scan_prefix(CHUNKS, &prefix, DELETE_BATCH_CHUNKS as usize)?;
                for (name, _) in &stray {
                    tx.delete(CHUNKS, name)?;
                }
                Ok(stray.len())
            })?;
            if swept == 0 {
                break;
            }
        }
        self.store.transaction(|tx| {
            tx.delete(USAGE, tenant)?;
            tx.delete(OLD_USAGE, tenant)?;
            Ok(())
        })?;
        self.quotas.set(tenant, None);
        Ok(deleted)
    }
}

// Transactions speak `StoreError`; a state error raised inside one travels
// through it and comes back out unchanged.
fn into_store(e: StateError) -> crate::StoreError {
    crate::StoreError::State(Box::new(e))
}

fn from_store(e: crate::StoreError) -> StateError {
    match e {
        crate::StoreError::State(inner) => *inner,
        other => StateError::Store(other),
    }
}

impl From<crate::StoreError> for StateError {
    fn from(e: crate::StoreError) -> Self {
        from_store(e)
    }
}

/// The embedded store as a [`GlobalTier`]: its work runs on the blocking
/// pool, never on the async worker that runs guests. Leases live in memory:
/// on one node, no lock holder outlives the process.
#[derive(Debug)]
pub struct EmbeddedTier {
    global: Arc<EmbeddedGlobal>,
    leases: Mutex<HashMap<ScopedKey, (LeaseToken, Instant)>>,
}

impl EmbeddedTier {
    pub fn new(global: EmbeddedGlobal) -> Self {
        Self { global: Arc::new(global), leases: Mutex::default() }
    }

    /// The synchronous store underneath.
    pub fn store(&self) -> &EmbeddedGlobal {
        &self.global
    }

    fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedGlobal) -> Result<R, StateError> + Send + 'static,
    ) -> StateFuture<'static, R> {
        let global = self.global.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&global))
                .await
                .map_err(|e| StateError::Unavailable(format!("state task failed: {e}")))?
        })
    }
}

impl GlobalTier for EmbeddedTier {
    fn limits(&self) -> StateLimits {
        self.global.limits
    }

    fn quotas(&self) -> &Quotas {
        &self.global.quotas
    }

    fn get_range<'a>(&'a self, key: &'a ScopedKey, offset: u64, len: u64) -> StateFuture<'a, Option<Vec<u8>>> {
        let key = key.clone();
        self.blocking(move |g| g.get_range(&key, offset, len))
    }

    fn set<'a>(&'a self, key: &'a ScopedKey, value: Vec<u8>) -> StateFuture<'a, ()> {
        let key = key.clone();
        self.blocking(move |g| g.set(&key, &value))
    }

    fn write_chunks<'a>(&'a self, key: &'a ScopedKey, dirty: DirtyChunks) -> StateFuture<'a, DirtyChunks> {
        let key = key.clone();
        self.blocking(move |g| g.write_chunks(&key, &dirty).map(|()| dirty))
    }

    fn delete<'a>(&'a self, key: &'a ScopedKey) -> StateFuture<'a, bool> {
        let key = key.clone();
        self.blocking(move |g| g.delete(&key))
    }

    fn append<'a>(&'a self, key: &'a ScopedKey, data: Vec<u8>) -> StateFuture<'a, u64> {
        let key = key.clone();
        self.blocking(move |g| g.append(&key, &data))
    }

    fn incr<'a>(&'a self, key: &'a ScopedKey, delta: i64) -> StateFuture<'a, i64> {
        let key = key.clone();
        self.blocking(move |g| g.incr(&key, delta))
    }

    fn list<'a>(&'a self, tenant: &'a str) -> StateFuture<'a, Vec<(String, u64)>> {
        let tenant = tenant.to_string();
        self.blocking(move |g| g.list(&tenant))
    }

    fn usage<'a>(&'a self, tenant: &'a str) -> StateFuture<'a, u64> {
        let tenant = tenant.to_string();
        self.blocking(move |g| g.usage(&tenant))
    }

    fn try_lock<'a>(&'a self, key: &'a ScopedKey, token: &'a LeaseToken, lease: Duration) -> StateFuture<'a, bool> {
        let now = Instant::now();
        let mut leases = self.leases.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let taken = match leases.get(key) {
            Some((_, expiry)) if *expiry > now => false,
            _ => {
                leases.insert(key.clone(), (token.clone(), now + lease));
                true
            }
        };
        Box::pin(std::future::ready(Ok(taken)))
    }

    fn delete_tenant<'a>(&'a self, tenant: &'a str) -> StateFuture<'a, u64> {
        let owned = tenant.to_string();
        let deleting = self.blocking(move |g| g.delete_tenant(&owned));
        Box::pin(async move {
            let deleted = deleting.await?;
            // Leases live only here; a holder of one of the tenant's locks
            // finds it gone (its unlock answers false).
            self.leases
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|key, _| key.tenant() != tenant);
            Ok(deleted)
        })
    }

    fn unlock<'a>(&'a self, key: &'a ScopedKey, token: &'a LeaseToken) -> StateFuture<'a, bool> {
        let mut leases = self.leases.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = matches!(leases.get(key), Some((holder, expiry)) if holder == token && *expiry > Instant::now());
        if held || matches!(leases.get(key), Some((_, expiry)) if *expiry <= Instant::now()) {
            leases.remove(key);
        }
        Box::pin(std::future::ready(Ok(held)))
    }
}
