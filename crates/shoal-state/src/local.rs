//! The local tier: one in-process store per node, shared by every instance
//! on it. Values are byte arrays addressable by range and tracked in
//! fixed-size chunks with a dirty bit each, so a push sends only what
//! changed since the last push or pull.
//!
//! Memory is bounded ([`LocalLimits`]): the node's values together, and one
//! tenant's. A value is *clean* when it equals the global tier's copy (read
//! from it, or pushed since its last write) and *dirty* otherwise (written
//! here and not pushed: the local tier holds the only copy). Clean values
//! are evicted, least recently used first, to make room — their next read
//! fetches them again. Dirty ones are never evicted: a write that would
//! put its tenant's values (or the node's) over the limit with no clean
//! value left to evict is refused with `limit_exceeded`, and nothing is
//! written. A read that finds no room is served without being kept.
//!
//! This module never talks to the global tier; the caller moves bytes
//! between the tiers (`dirty_chunks` / `mark_clean` / `install`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::{ScopedKey, StateError};

/// Bytes per chunk of dirty tracking (and of chunked global storage).
pub const CHUNK_BYTES: usize = 64 << 10;

/// What the local tier may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalLimits {
    /// Bytes of values, every tenant's together.
    pub node_bytes: u64,
    /// Bytes of one tenant's values (clean and dirty together).
    pub tenant_bytes: u64,
}

impl LocalLimits {
    /// No limits (tests and tools).
    pub const UNBOUNDED: Self = Self { node_bytes: u64::MAX, tenant_bytes: u64::MAX };

    /// A node budget of `node_bytes`, a quarter of it per tenant.
    pub fn derived(node_bytes: u64) -> Self {
        Self { node_bytes, tenant_bytes: node_bytes / 4 }
    }
}

/// What a value counts for in the accounts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counted {
    len: u64,
    dirty: bool,
}

#[derive(Debug, Default)]
struct LocalValue {
    bytes: Vec<u8>,
    /// One flag per chunk of `bytes`; `true` = changed since last synced.
    dirty: Vec<bool>,
    /// The tier's clock when it was last read or written.
    last_use: u64,
    /// What the accounts hold for it.
    counted: Counted,
    /// Taken out of the map (evicted or removed): writes to it are lost
    /// and must go to a fresh value.
    gone: bool,
}

impl LocalValue {
    fn n_chunks(len: usize) -> usize {
        len.div_ceil(CHUNK_BYTES)
    }

    fn mark_dirty(&mut self, start: usize, end: usize) {
        self.dirty.resize(Self::n_chunks(self.bytes.len()), false);
        if end > start {
            for flag in &mut self.dirty[start / CHUNK_BYTES..end.div_ceil(CHUNK_BYTES)] {
                *flag = true;
            }
        }
    }

    fn counted_now(&self) -> Counted {
        Counted { len: self.bytes.len() as u64, dirty: self.dirty.iter().any(|d| *d) }
    }
}

/// The chunks of a value that changed, for a push.
#[derive(Debug, PartialEq, Eq)]
pub struct DirtyChunks {
    /// Length of the whole value.
    pub len: u64,
    /// (chunk index, chunk bytes) of each changed chunk, in order.
    pub chunks: Vec<(u32, Vec<u8>)>,
}

/// Bytes of values held, clean and dirty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalBytes {
    pub clean: u64,
    pub dirty: u64,
}

impl LocalBytes {
    fn total(self) -> u64 {
        self.clean + self.dirty
    }

    fn add(&mut self, c: Counted) {
        if c.dirty {
            self.dirty += c.len;
        } else {
            self.clean += c.len;
        }
    }

    fn sub(&mut self, c: Counted) {
        if c.dirty {
            self.dirty = self.dirty.saturating_sub(c.len);
        } else {
            self.clean = self.clean.saturating_sub(c.len);
        }
    }
}

#[derive(Debug, Default)]
struct Accounts {
    node: LocalBytes,
    tenants: HashMap<String, LocalBytes>,
    /// Tenants whose share the admin set.
    tenant_limits: HashMap<String, u64>,
}

/// Why a value does not fit.
enum NoRoom {
    /// Over the tenant's bytes: `need` more than it may hold.
    Tenant {
        need: u64,
        limit: u64,
    },
    Node {
        need: u64,
        limit: u64,
    },
}

impl Accounts {
    fn tenant_limit(&self, tenant: &str, limits: LocalLimits) -> u64 {
        self.tenant_limits.get(tenant).copied().unwrap_or(limits.tenant_bytes)
    }

    /// Whether `tenant`'s value may go from `old` to `new`.
    fn fits(&self, tenant: &str, old: Counted, new: Counted, limits: LocalLimits) -> Result<(), NoRoom> {
        let grows = new.len.saturating_sub(old.len);
        if grows == 0 {
            return Ok(());
        }
        let own = self.tenants.get(tenant).copied().unwrap_or_default().total();
        let limit = self.tenant_limit(tenant, limits);
        if own + grows > limit {
            return Err(NoRoom::Tenant { need: own + grows - limit, limit });
        }
        if self.node.total() + grows > limits.node_bytes {
            return Err(NoRoom::Node { need: self.node.total() + grows - limits.node_bytes, limit: limits.node_bytes });
        }
        Ok(())
    }

    fn apply(&mut self, tenant: &str, old: Counted, new: Counted) {
        self.node.sub(old);
        self.node.add(new);
        let own = self.tenants.entry(tenant.to_string()).or_default();
        own.sub(old);
        own.add(new);
        if own.total() == 0 {
            self.tenants.remove(tenant);
        }
    }
}

/// The local tier of one node.
#[derive(Debug)]
pub struct LocalTier {
    values: RwLock<HashMap<ScopedKey, Arc<Mutex<LocalValue>>>>,
    accounts: Mutex<Accounts>,
    limits: LocalLimits,
    clock: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
}

impl Default for LocalTier {
    fn default() -> Self {
        Self::new(LocalLimits::UNBOUNDED)
    }
}

/// How a write changes a value, decided under its lock.
type Edit<'a> = &'a mut dyn FnMut(&mut LocalValue);

impl LocalTier {
    pub fn new(limits: LocalLimits) -> Self {
        Self {
            values: RwLock::default(),
            accounts: Mutex::default(),
            limits,
            clock: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> LocalLimits {
        self.limits
    }

    /// Set a tenant's bytes (None: the node's default share).
    pub fn set_tenant_limit(&self, tenant: &str, bytes: Option<u64>) {
        let mut accounts = self.accounts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match bytes {
            Some(bytes) => accounts.tenant_limits.insert(tenant.to_string(), bytes),
            None => accounts.tenant_limits.remove(tenant),
        };
    }

    /// Bytes held by every tenant's values together.
    pub fn bytes(&self) -> LocalBytes {
        self.accounts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).node
    }

    /// Bytes held by `tenant`'s values.
    pub fn bytes_of(&self, tenant: &str) -> LocalBytes {
        self.accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .tenants
            .get(tenant)
            .copied()
            .unwrap_or_default()
    }

    /// Values evicted since start, and their bytes.
    pub fn evictions(&self) -> (u64, u64) {
        (self.evictions.load(Ordering::Relaxed), self.evicted_bytes.load(Ordering::Relaxed))
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn value(&self, key: &ScopedKey) -> Option<Arc<Mutex<LocalValue>>> {
        self.values.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).cloned()
    }

    fn value_or_insert(&self, key: &ScopedKey) -> Arc<Mutex<LocalValue>> {
        if let Some(value) = self.value(key) {
            return value;
        }
        self.values.write().unwrap_or_else(std::sync::PoisonError::into_inner).entry(key.clone()).or_default().clone()
    }

    pub fn contains(&self, key: &ScopedKey) -> bool {
        self.values.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(key)
    }

    /// Read under the value's lock, marking it used.
    fn read<T>(&self, key: &ScopedKey, f: impl FnOnce(&LocalValue) -> T) -> Option<T> {
        let value = self.value(key)?;
        let mut value = value.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        value.last_use = self.tick();
        Some(f(&value))
    }

    /// A copy of the whole value.
    pub fn get(&self, key: &ScopedKey) -> Option<Vec<u8>> {
        self.read(key, |v| v.bytes.clone())
    }

    /// A copy of `len` bytes from `offset`, clamped to the value's end;
    /// only those bytes are copied.
    pub fn get_range(&self, key: &ScopedKey, offset: u64, len: u64) -> Option<Vec<u8>> {
        self.read(key, |value| {
            let size = value.bytes.len();
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(size);
            let end = start.saturating_add(usize::try_from(len).unwrap_or(usize::MAX)).min(size);
            value.bytes[start..end].to_vec()
        })
    }

    /// Change `key`'s value with `edit`, which will leave it `new_len`
    /// bytes long and dirty or clean as `dirty` says — if that fits the
    /// limits, evicting clean values to make room; else nothing changes.
    /// `create`: make the value if it is missing (else do nothing).
    fn write(
        &self,
        key: &ScopedKey,
        create: bool,
        planned: impl Fn(&LocalValue) -> Counted,
        edit: Edit<'_>,
    ) -> Result<(), StateError> {
        let tenant = key.tenant();
        // A few rounds: each either writes, or evicts and looks again.
        for _ in 0..4 {
            let value = if create {
                self.value_or_insert(key)
            } else {
                match self.value(key) {
                    Some(value) => value,
                    None => return Ok(()),
                }
            };
            let mut value = value.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if value.gone {
                continue;
            }
            let (old, new) = (value.counted, planned(&value));
            let fits = self.accounts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).fits(
                tenant,
                old,
                new,
                self.limits,
            );
            match fits {
                Ok(()) => {
                    edit(&mut value);
                    value.last_use = self.tick();
                    let now = value.counted_now();
                    value.counted = now;
                    self.accounts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).apply(tenant, old, now);
                    return Ok(());
                }
                Err(no_room) => {
                    drop(value);
                    let (scope, need, what) = match no_room {
                        NoRoom::Tenant { need, limit } => {
                            (Some(tenant), need, format!("tenant `{tenant}`'s {} MiB", limit >> 20))
                        }
                        NoRoom::Node { need, limit } => (None, need, format!("the node's {} MiB", limit >> 20)),
                    };
                    if self.evict(scope, need) < need {
                        self.drop_placeholder(key);
                        return Err(StateError::LimitExceeded(format!(
                            "the local state tier is full: {what} are held by values not yet pushed (push them, or delete some)"
                        )));
                    }
                }
            }
        }
        self.drop_placeholder(key);
        Err(StateError::LimitExceeded("the local state tier is too busy making room; try again".into()))
    }

    /// Take out the empty value a refused write made for `key`, if it is
    /// still empty and nobody holds it.
    fn drop_placeholder(&self, key: &ScopedKey) {
        let mut values = self.values.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let empty = values.get(key).is_some_and(|value| {
            value.try_lock().is_ok_and(|mut value| {
                let empty = value.counted == Counted::default() && value.bytes.is_empty();
                value.gone |= empty;
                empty
            })
        });
        if empty {
            values.remove(key);
        }
    }

    /// Evict clean values, least recently used first — `tenant`'s only, or
    /// anyone's — until `need` bytes are freed (and a little more, so the
    /// next writes do not each scan again). Returns the bytes freed.
    fn evict(&self, tenant: Option<&str>, need: u64) -> u64 {
        let slack = match tenant {
            Some(_) => self.limits.tenant_bytes / 16,
            None => self.limits.node_bytes / 16,
        };
        let target = need.saturating_add(slack.min(64 << 20));
        let mut values = self.values.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut clean: Vec<(u64, ScopedKey)> = values
            .iter()
            .filter(|(key, _)| tenant.is_none_or(|t| key.tenant() == t))
            .filter_map(|(key, value)| {
                let value = value.try_lock().ok()?;
                (!value.counted.dirty && value.counted.len > 0).then(|| (value.last_use, key.clone()))
            })
            .collect();
        clean.sort_unstable_by_key(|(last_use, _)| *last_use);
        let mut freed = 0;
        for (_, key) in clean {
            if freed >= target {
                break;
            }
            let Some(value) = values.get(&key) else { continue };
            let Ok(mut value) = value.try_lock() else { continue };
            if value.counted.dirty {
                continue;
            }
            let counted = self.forget(&key, &mut value);
            freed += counted.len;
            drop(value);
            values.remove(&key);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            self.evicted_bytes.fetch_add(counted.len, Ordering::Relaxed);
        }
        freed
    }

    /// Mark a value taken out of the map as gone and take its bytes off its
    /// tenant's account; returns what it counted.
    fn forget(&self, key: &ScopedKey, value: &mut LocalValue) -> Counted {
        value.gone = true;
        let counted = std::mem::take(&mut value.counted);
        self.accounts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).apply(
            key.tenant(),
            counted,
            Counted::default(),
        );
        counted
    }

    /// Replace the whole value; every chunk becomes dirty.
    pub fn set(&self, key: &ScopedKey, bytes: Vec<u8>) -> Result<(), StateError> {
        let len = bytes.len() as u64;
        let mut bytes = Some(bytes);
        self.write(key, true, |_| Counted { len, dirty: len > 0 }, &mut |value| {
            value.bytes = bytes.take().unwrap_or_default();
            value.dirty = vec![true; LocalValue::n_chunks(value.bytes.len())];
        })
    }

    /// Write `data` at `offset`, growing the value (zero-filled) if needed;
    /// only the chunks touched become dirty. Returns the new length.
    pub fn set_range(&self, key: &ScopedKey, offset: u64, data: &[u8]) -> Result<u64, StateError> {
        let overflow = || StateError::TooLarge("range end overflows".into());
        let offset = usize::try_from(offset).map_err(|_| overflow())?;
        let end = offset.checked_add(data.len()).ok_or_else(overflow)?;
        let mut new_len = 0;
        self.write(key, true, |value| Counted { len: value.bytes.len().max(end) as u64, dirty: true }, &mut |value| {
            let old_len = value.bytes.len();
            if old_len < end {
                value.bytes.resize(end, 0);
            }
            value.bytes[offset..end].copy_from_slice(data);
            // Growing writes zeros between the old end and `offset`: changed too.
            value.mark_dirty(offset.min(old_len), end);
            new_len = value.bytes.len() as u64;
        })?;
        Ok(new_len)
    }

    /// Length of the value, if present.
    pub fn len(&self, key: &ScopedKey) -> Option<u64> {
        self.read(key, |v| v.bytes.len() as u64)
    }

    pub fn remove(&self, key: &ScopedKey) -> bool {
        let Some(value) = self.values.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(key) else {
            return false;
        };
        let mut value = value.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.forget(key, &mut value);
        true
    }

    /// Drop every value `tenant` holds here, clean or dirty (its dirty bytes
    /// are not pushed), and its limit; returns how many values were dropped.
    pub fn remove_tenant(&self, tenant: &str) -> usize {
        // Take them out of the map first, then settle each one's account
        // under its own lock (the order `remove` uses): a write holding one
        // finishes first, and one coming after finds it gone.
        let taken: Vec<(ScopedKey, Arc<Mutex<LocalValue>>)> = {
            let mut values = self.values.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            let keys: Vec<ScopedKey> = values.keys().filter(|key| key.tenant() == tenant).cloned().collect();
            keys.into_iter().filter_map(|key| values.remove(&key).map(|value| (key, value))).collect()
        };
        for (key, value) in &taken {
            let mut value = value.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.forget(key, &mut value);
        }
        self.accounts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).tenant_limits.remove(tenant);
        taken.len()
    }

    /// Put a value fetched from the global tier; it starts clean. When
    /// there is no room for it, it is not kept (a value already here is
    /// left as it was) and its bytes are handed back.
    pub fn install(&self, key: &ScopedKey, bytes: Vec<u8>) -> Result<(), Vec<u8>> {
        let len = bytes.len() as u64;
        let mut bytes = Some(bytes);
        let installed = self.write(key, true, |_| Counted { len, dirty: false }, &mut |value| {
            value.bytes = bytes.take().unwrap_or_default();
            value.dirty = vec![false; LocalValue::n_chunks(value.bytes.len())];
        });
        match installed {
            Ok(()) => Ok(()),
            Err(_) => Err(bytes.take().unwrap_or_default()),
        }
    }

    /// The changed chunks of `key` (None if it is not in the local tier).
    pub fn dirty_chunks(&self, key: &ScopedKey) -> Option<DirtyChunks> {
        self.read(key, |value| {
            let chunks = value
                .dirty
                .iter()
                .enumerate()
                .filter(|(_, dirty)| **dirty)
                .map(|(idx, _)| {
                    let start = idx * CHUNK_BYTES;
                    let end = (start + CHUNK_BYTES).min(value.bytes.len());
                    (idx as u32, value.bytes[start..end].to_vec())
                })
                .collect();
            DirtyChunks { len: value.bytes.len() as u64, chunks }
        })
    }

    /// Clear the dirty flags of the chunks a push sent, unless the value
    /// changed length meanwhile (then everything stays dirty).
    pub fn mark_clean(&self, key: &ScopedKey, pushed: &DirtyChunks) {
        let Some(value) = self.value(key) else { return };
        let mut value = value.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if value.gone || value.bytes.len() as u64 != pushed.len {
            return;
        }
        for (idx, bytes) in &pushed.chunks {
            let start = *idx as usize * CHUNK_BYTES;
            if value.bytes.get(start..start + bytes.len()) == Some(bytes.as_slice())
                && let Some(flag) = value.dirty.get_mut(*idx as usize)
            {
                *flag = false;
            }
        }
        let (old, now) = (value.counted, value.counted_now());
        value.counted = now;
        self.accounts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).apply(key.tenant(), old, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> ScopedKey {
        ScopedKey::new("t", k).unwrap()
    }

    #[test]
    fn ranges_read_and_write_without_touching_the_rest() {
        let tier = LocalTier::default();
        let k = key("v");
        tier.set(&k, vec![1; 3 * CHUNK_BYTES]).unwrap();
        tier.mark_clean(&k, &tier.dirty_chunks(&k).unwrap());
        assert!(tier.dirty_chunks(&k).unwrap().chunks.is_empty());
        tier.set_range(&k, (CHUNK_BYTES + 10) as u64, &[7, 7]).unwrap();
        let dirty = tier.dirty_chunks(&k).unwrap();
        assert_eq!(dirty.chunks.len(), 1);
        assert_eq!(dirty.chunks[0].0, 1);
        assert_eq!(tier.get_range(&k, (CHUNK_BYTES + 9) as u64, 4).unwrap(), [1, 7, 7, 1]);
        assert_eq!(tier.get_range(&k, (3 * CHUNK_BYTES - 1) as u64, 100).unwrap(), [1], "clamped at the end");
        assert_eq!(tier.get_range(&k, u64::MAX, 5).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn writes_past_the_end_grow_with_zeros() {
        let tier = LocalTier::default();
        let k = key("grow");
        assert_eq!(tier.set_range(&k, 3, b"ab").unwrap(), 5);
        assert_eq!(tier.get(&k).unwrap(), [0, 0, 0, b'a', b'b']);
        assert!(tier.set_range(&k, u64::MAX, b"x").is_err());
    }

    #[test]
    fn installed_values_are_clean_and_a_changed_length_keeps_chunks_dirty() {
        let tier = LocalTier::default();
        let k = key("i");
        tier.install(&k, vec![0; CHUNK_BYTES + 1]).unwrap();
        assert!(tier.dirty_chunks(&k).unwrap().chunks.is_empty());
        tier.set_range(&k, 0, b"x").unwrap();
        let pushed = tier.dirty_chunks(&k).unwrap();
        tier.set_range(&k, (2 * CHUNK_BYTES) as u64, b"y").unwrap();
        tier.mark_clean(&k, &pushed);
        // The value grew after the push was taken: nothing is marked clean,
        // and the chunk that gained zeros is dirty too.
        let idx: Vec<u32> = tier.dirty_chunks(&k).unwrap().chunks.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, [0, 1, 2]);
    }

    fn scoped(tenant: &str, k: &str) -> ScopedKey {
        ScopedKey::new(tenant, k).unwrap()
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn a_tenants_unpushed_bytes_stop_at_its_share_and_nothing_is_half_written() {
        let tier = LocalTier::new(LocalLimits { node_bytes: 16 << 20, tenant_bytes: 4 << 20 });
        for i in 0..4 {
            tier.set(&scoped("a", &format!("k{i}")), vec![1; MIB]).unwrap();
        }
        assert_eq!(tier.bytes_of("a"), LocalBytes { clean: 0, dirty: 4 << 20 });
        let refused = tier.set(&scoped("a", "k4"), vec![1; MIB]).unwrap_err();
        assert!(matches!(&refused, StateError::LimitExceeded(m) if m.contains("tenant `a`")), "{refused:?}");
        assert!(!tier.contains(&scoped("a", "k4")), "a refused write leaves nothing");
        assert!(tier.set_range(&scoped("a", "k0"), MIB as u64, b"x").is_err(), "growing is refused too");
        assert_eq!(tier.len(&scoped("a", "k0")), Some(MIB as u64));
        // Rewriting in place, or shrinking, is not growth.
        tier.set(&scoped("a", "k0"), vec![2; MIB]).unwrap();
        tier.set(&scoped("a", "k1"), vec![2; 10]).unwrap();
        assert_eq!(tier.bytes_of("a").dirty, (3 << 20) + 10);
        // Another tenant is not touched by a's being full.
        tier.set(&scoped("b", "k"), vec![3; 2 * MIB]).unwrap();
        assert_eq!(tier.bytes_of("b").dirty, 2 << 20);
        // Deleting gives room back.
        assert!(tier.remove(&scoped("a", "k2")));
        tier.set(&scoped("a", "k4"), vec![1; MIB]).unwrap();
        assert_eq!(tier.bytes(), LocalBytes { clean: 0, dirty: (5 << 20) + 10 });
    }

    #[test]
    fn clean_values_are_evicted_least_recently_used_first_and_dirty_ones_never() {
        let tier = LocalTier::new(LocalLimits { node_bytes: 64 << 20, tenant_bytes: 4 << 20 });
        for i in 0..4 {
            tier.install(&scoped("a", &format!("c{i}")), vec![i as u8; MIB]).unwrap();
        }
        // c0 is read again: c1 is now the least recently used.
        assert_eq!(tier.get_range(&scoped("a", "c0"), 0, 1), Some(vec![0]));
        // A dirty value needs room: clean ones go, oldest first.
        tier.set(&scoped("a", "d"), vec![9; MIB]).unwrap();
        assert!(!tier.contains(&scoped("a", "c1")), "the least recently used went");
        assert!(tier.contains(&scoped("a", "c0")));
        assert_eq!(tier.get(&scoped("a", "d")), Some(vec![9; MIB]));
        assert!(tier.evictions().0 >= 1);
        // Pushed (marked clean), a dirty value may go too.
        let pushed = tier.dirty_chunks(&scoped("a", "d")).unwrap();
        tier.mark_clean(&scoped("a", "d"), &pushed);
        assert_eq!(tier.bytes_of("a").dirty, 0);
        // An install that cannot fit is handed back, and the rest stays.
        let big = LocalTier::new(LocalLimits { node_bytes: 64 << 20, tenant_bytes: MIB as u64 });
        big.set(&scoped("a", "d"), vec![1; MIB]).unwrap();
        assert_eq!(big.install(&scoped("a", "c"), vec![2; 10]), Err(vec![2; 10]));
        assert!(!big.contains(&scoped("a", "c")));
        assert_eq!(big.bytes_of("a"), LocalBytes { clean: 0, dirty: MIB as u64 });
    }

    #[test]
    fn removing_a_tenant_drops_its_clean_and_dirty_values_and_keeps_the_accounts_exact() {
        let tier = LocalTier::new(LocalLimits { node_bytes: 64 << 20, tenant_bytes: 16 << 20 });
        tier.set_tenant_limit("a", Some(8 << 20));
        tier.set(&scoped("a", "dirty"), vec![1; MIB]).unwrap();
        tier.install(&scoped("a", "clean"), vec![2; 2 * MIB]).unwrap();
        // Half pushed: one chunk clean, the rest dirty.
        tier.set(&scoped("a", "mixed"), vec![3; 3 * CHUNK_BYTES]).unwrap();
        let pushed = tier.dirty_chunks(&scoped("a", "mixed")).unwrap();
        tier.mark_clean(
            &scoped("a", "mixed"),
            &DirtyChunks { len: pushed.len, chunks: vec![pushed.chunks[0].clone()] },
        );
        tier.set(&scoped("a", "empty"), Vec::new()).unwrap();
        tier.set(&scoped("b", "dirty"), vec![4; MIB]).unwrap();
        tier.install(&scoped("b", "clean"), vec![5; 10]).unwrap();
        let b_before = tier.bytes_of("b");
        assert_eq!(b_before, LocalBytes { clean: 10, dirty: MIB as u64 });

        assert_eq!(tier.remove_tenant("a"), 4);
        assert_eq!(tier.bytes_of("a"), LocalBytes::default());
        assert_eq!(tier.bytes_of("b"), b_before, "another tenant is untouched");
        assert_eq!(tier.bytes(), b_before, "the node counts only what is left");
        for k in ["dirty", "clean", "mixed", "empty"] {
            assert!(!tier.contains(&scoped("a", k)), "{k}");
        }
        assert_eq!(tier.get(&scoped("b", "dirty")), Some(vec![4; MIB]));
        assert_eq!(tier.remove_tenant("a"), 0, "a second removal finds nothing");
        // Its own limit went too: the node's default share applies again.
        tier.set(&scoped("a", "k"), vec![6; 12 * MIB]).unwrap();
        assert_eq!(tier.bytes_of("a"), LocalBytes { clean: 0, dirty: 12 << 20 });
        assert_eq!(tier.bytes(), LocalBytes { clean: 10, dirty: 13 << 20 });
    }

    #[test]
    fn the_node_budget_evicts_any_tenants_clean_values_but_keeps_unpushed_ones() {
        let tier = LocalTier::new(LocalLimits { node_bytes: 4 << 20, tenant_bytes: 3 << 20 });
        tier.install(&scoped("a", "c"), vec![1; 2 * MIB]).unwrap();
        tier.set(&scoped("b", "d"), vec![1; 2 * MIB]).unwrap();
        // b needs room beyond the node's 4 MiB: a's clean value goes.
        tier.set(&scoped("b", "e"), vec![1; MIB]).unwrap();
        assert!(!tier.contains(&scoped("a", "c")));
        // Only unpushed values are left (3 MiB of 4): c wants 2 MiB.
        let refused = tier.set(&scoped("c", "x"), vec![1; 2 * MIB]).unwrap_err();
        assert!(matches!(&refused, StateError::LimitExceeded(m) if m.contains("the node's 4 MiB")), "{refused:?}");
        assert_eq!(tier.bytes(), LocalBytes { clean: 0, dirty: 3 << 20 });
    }
}
