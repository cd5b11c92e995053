//! The global tier: the durable, shared copy of every value, and the atomic
//! operations (`incr`, `append`, locks) that act on it directly.
//!
//! On a single node it is the embedded store ([`EmbeddedGlobal`]): values
//! kept in chunks of [`CHUNK_BYTES`] so a range read or a push touches only
//! the chunks it needs, a per-tenant usage counter updated in the same
//! transaction as the value, and every acknowledged write durable.
//! Checks (value size, tenant quota) happen before anything is written, so
//! a refused write changes nothing.

use std::sync::Arc;

use crate::embedded::{EmbeddedStore, ReadTx, Table, WriteTx};
use crate::local::{CHUNK_BYTES, DirtyChunks};
use crate::{ScopedKey, StateError};

const META: Table = Table::new("state_meta");
const CHUNKS: Table = Table::new("state_chunks");
const USAGE: Table = Table::new("state_usage");

/// Size limits of the global tier.
#[derive(Clone, Copy, Debug)]
pub struct StateLimits {
    /// Largest value. Default 64 MiB.
    pub max_value_bytes: u64,
    /// Bytes of all of one tenant's values together. Default 1 GiB.
    pub tenant_quota_bytes: u64,
}

impl Default for StateLimits {
    fn default() -> Self {
        Self { max_value_bytes: 64 << 20, tenant_quota_bytes: 1 << 30 }
    }
}

fn chunk_key(key: &ScopedKey, idx: u64) -> String {
    // The key may hold any character, NUL included; the suffix has a fixed
    // length, so (key, idx) ↦ string is one-to-one.
    format!("{}\0{idx:08x}", key.as_str())
}

fn decode_u64(bytes: Option<Vec<u8>>) -> u64 {
    bytes.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok()).map(u64::from_le_bytes).unwrap_or(0)
}

/// The global tier on the embedded store.
#[derive(Debug)]
pub struct EmbeddedGlobal {
    store: Arc<EmbeddedStore>,
    limits: StateLimits,
}

impl EmbeddedGlobal {
    pub fn new(store: Arc<EmbeddedStore>, limits: StateLimits) -> Self {
        Self { store, limits }
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

    /// Check the size and quota for `key` going from its current length to
    /// `new_len`, and record the new usage.
    fn account(&self, tx: &WriteTx<'_>, key: &ScopedKey, old_len: u64, new_len: u64) -> Result<(), StateError> {
        if new_len > self.limits.max_value_bytes {
            return Err(StateError::TooLarge(format!(
                "value of {new_len} bytes is over the limit of {}",
                self.limits.max_value_bytes
            )));
        }
        let tenant = key.tenant();
        let used = decode_u64(tx.get(USAGE, tenant)?);
        let after = used.saturating_sub(old_len).saturating_add(new_len);
        if new_len > old_len && after > self.limits.tenant_quota_bytes {
            return Err(StateError::LimitExceeded(format!(
                "tenant `{tenant}` would use {after} bytes of state, over its quota of {}",
                self.limits.tenant_quota_bytes
            )));
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
                let old_len = Self::old_len(tx, key).map_err(into_store)?.unwrap_or(0);
                self.account(tx, key, old_len, new_len).map_err(into_store)?;
                Self::truncate(tx, key, old_len, new_len).map_err(into_store)?;
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
                let old_len = Self::old_len(tx, key).map_err(into_store)?.unwrap_or(0);
                self.account(tx, key, old_len, dirty.len).map_err(into_store)?;
                Self::truncate(tx, key, old_len, dirty.len).map_err(into_store)?;
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
                self.account(tx, key, old_len, 0).map_err(into_store)?;
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
                let old_len = Self::old_len(tx, key).map_err(into_store)?.unwrap_or(0);
                let new_len = old_len + data.len() as u64;
                self.account(tx, key, old_len, new_len).map_err(into_store)?;
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
                        std::str::from_utf8(&text)
                            .ok()
                            .and_then(|t| t.parse::<i64>().ok())
                            .ok_or_else(|| into_store(not_an_integer(key)))?
                    }
                };
                let next = current.checked_add(delta).ok_or_else(|| {
                    into_store(StateError::LimitExceeded(format!(
                        "incr of {current} by {delta} overflows a 64-bit integer"
                    )))
                })?;
                let text = next.to_string();
                self.account(tx, key, old_len.unwrap_or(0), text.len() as u64).map_err(into_store)?;
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

    /// Bytes of state `tenant` uses.
    pub fn usage(&self, tenant: &str) -> Result<u64, StateError> {
        Ok(decode_u64(self.store.get(USAGE, tenant)?))
    }
}

fn not_an_integer(key: &ScopedKey) -> StateError {
    StateError::NotAnInteger(format!("the value of `{}` is not a decimal 64-bit integer", key.key()))
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
