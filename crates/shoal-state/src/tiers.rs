//! The two tiers together, as the host's `state` interface uses them
//! (`wit/shoal.wit` says what each does; ARCHITECTURE.md, `crates/shoal-state`):
//! - `get`/`set`/ranges work on the local tier, which is filled with the
//!   whole value from the global tier on a miss: the first read of a key on
//!   a node fetches it once, later reads copy out only what they ask for;
//! - `push`/`pull` move a value between the tiers (a push sends only dirty
//!   chunks);
//! - `incr`, `append` and `delete` act on the global tier and drop the
//!   local copy, so the next read sees their result.
//!
//! Locks are leases on the global tier: `lock` waits (polling with a short
//! backoff) until the key is free or the caller's deadline comes.
//!
//! Limits: a local `set`/`set-range` checks the value size limit and the
//! local tier's budget (the node's and the tenant's share: a write that
//! would pass it with nothing clean left to evict is `limit_exceeded`);
//! the tenant's quota is the global tier's and is checked when a value
//! reaches it (`push`, `incr`, `append`, HTTP `PUT`). A value written and
//! not pushed stays in the local tier until it is pushed (then it may be
//! evicted like any clean copy), deleted or pulled over, or the node
//! restarts; a read finding no room in the local tier is served from the
//! global tier without being kept.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{DirtyChunks, GlobalTier, LeaseToken, LocalLimits, LocalTier, ScopedKey, StateError};

/// Bytes one call's state operations moved between the tiers, counted
/// while the call runs inside [`metered`]: every read from and write to
/// the global tier a `StateTiers` method makes on the call's task is added
/// here as well as to the node's totals.
#[derive(Debug, Default)]
pub struct MovedBytes {
    pub from_global: AtomicU64,
    pub to_global: AtomicU64,
}

tokio::task_local! {
    static MOVED: Arc<MovedBytes>;
}

/// Run `work` with the bytes its state operations move counted in `moved`.
pub async fn metered<F: Future>(moved: Arc<MovedBytes>, work: F) -> F::Output {
    MOVED.scope(moved, work).await
}

fn count_for_call(to_global: bool, bytes: u64) {
    let _ = MOVED.try_with(|moved| {
        let counter = if to_global { &moved.to_global } else { &moved.from_global };
        counter.fetch_add(bytes, Ordering::Relaxed);
    });
}

/// Bytes moved between the tiers since the node started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Read from the global tier (fills, pulls, range reads of values not
    /// held locally, HTTP reads).
    pub bytes_from_global: u64,
    /// Written to the global tier (pushes, appends, HTTP writes).
    pub bytes_to_global: u64,
}

#[derive(Debug)]
pub struct StateTiers {
    local: LocalTier,
    global: Arc<dyn GlobalTier>,
    from_global: AtomicU64,
    to_global: AtomicU64,
}

/// Longest pause between two attempts to take a held lock.
const LOCK_RETRY_MAX: Duration = Duration::from_millis(20);

/// What a fill found.
enum Fill {
    /// The local tier holds the value.
    Local,
    /// Read from the global tier, with no room to keep it locally.
    Fetched(Vec<u8>),
    /// Neither tier has it.
    Missing,
}

impl StateTiers {
    /// Tiers with an unbounded local tier.
    pub fn new(global: Arc<dyn GlobalTier>) -> Self {
        Self::with_local_limits(global, LocalLimits::UNBOUNDED)
    }

    /// Tiers whose local tier holds at most `limits`.
    pub fn with_local_limits(global: Arc<dyn GlobalTier>, limits: LocalLimits) -> Self {
        Self { local: LocalTier::new(limits), global, from_global: AtomicU64::new(0), to_global: AtomicU64::new(0) }
    }

    pub fn local(&self) -> &LocalTier {
        &self.local
    }

    pub fn global(&self) -> &dyn GlobalTier {
        &*self.global
    }

    pub fn stats(&self) -> TierStats {
        TierStats {
            bytes_from_global: self.from_global.load(Ordering::Relaxed),
            bytes_to_global: self.to_global.load(Ordering::Relaxed),
        }
    }

    fn wrote(&self, bytes: u64) {
        self.to_global.fetch_add(bytes, Ordering::Relaxed);
        count_for_call(true, bytes);
    }

    fn read(&self, got: Option<Vec<u8>>) -> Option<Vec<u8>> {
        if let Some(bytes) = &got {
            self.from_global.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            count_for_call(false, bytes.len() as u64);
        }
        got
    }

    /// Make sure the local tier holds `key` if the global tier has it and
    /// there is room for it.
    async fn fill(&self, key: &ScopedKey) -> Result<Fill, StateError> {
        if self.local.contains(key) {
            return Ok(Fill::Local);
        }
        let Some(bytes) = self.read(self.global.get(key).await?) else { return Ok(Fill::Missing) };
        if self.local.contains(key) {
            return Ok(Fill::Local);
        }
        Ok(match self.local.install(key, bytes) {
            Ok(()) => Fill::Local,
            Err(bytes) => Fill::Fetched(bytes),
        })
    }

    pub async fn get(&self, key: &ScopedKey) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(bytes) = self.local.get(key) {
            return Ok(Some(bytes));
        }
        match self.fill(key).await? {
            Fill::Local => match self.local.get(key) {
                Some(bytes) => Ok(Some(bytes)),
                // Evicted a moment after it was filled.
                None => Ok(self.read(self.global.get(key).await?)),
            },
            Fill::Fetched(bytes) => Ok(Some(bytes)),
            Fill::Missing => Ok(None),
        }
    }

    pub async fn set(&self, key: &ScopedKey, value: Vec<u8>) -> Result<(), StateError> {
        self.check_size(value.len() as u64)?;
        self.local.set(key, value)
    }

    /// Read a range of the local copy, filling it from the global tier on a
    /// miss: only the range is copied out, and later calls on this node
    /// read the same value without touching the global tier again.
    pub async fn get_range(&self, key: &ScopedKey, offset: u64, len: u64) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(bytes) = self.local.get_range(key, offset, len) {
            return Ok(Some(bytes));
        }
        let range = |bytes: &[u8]| {
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
            let end = start.saturating_add(usize::try_from(len).unwrap_or(usize::MAX)).min(bytes.len());
            bytes[start..end].to_vec()
        };
        match self.fill(key).await? {
            Fill::Local => match self.local.get_range(key, offset, len) {
                Some(bytes) => Ok(Some(bytes)),
                None => Ok(self.read(self.global.get(key).await?).map(|bytes| range(&bytes))),
            },
            Fill::Fetched(bytes) => Ok(Some(range(&bytes))),
            Fill::Missing => Ok(None),
        }
    }

    pub async fn set_range(&self, key: &ScopedKey, offset: u64, data: &[u8]) -> Result<(), StateError> {
        let end =
            offset.checked_add(data.len() as u64).ok_or_else(|| StateError::TooLarge("range end overflows".into()))?;
        self.check_size(end)?;
        // Writing into a value that lives only in the global tier: fetch
        // it first, so the local copy (and a later push) is whole.
        if let Fill::Fetched(_) = self.fill(key).await? {
            return Err(StateError::LimitExceeded(format!(
                "the local state tier has no room for `{}` to be written in place (push or delete values first)",
                key.key()
            )));
        }
        self.local.set_range(key, offset, data)?;
        Ok(())
    }

    pub async fn delete(&self, key: &ScopedKey) -> Result<(), StateError> {
        self.local.remove(key);
        self.global.delete(key).await.map(drop)
    }

    pub async fn append(&self, key: &ScopedKey, data: Vec<u8>) -> Result<(), StateError> {
        let len = data.len() as u64;
        self.global.append(key, data).await?;
        self.wrote(len);
        self.local.remove(key);
        Ok(())
    }

    pub async fn incr(&self, key: &ScopedKey, delta: i64) -> Result<i64, StateError> {
        let value = self.global.incr(key, delta).await?;
        self.local.remove(key);
        Ok(value)
    }

    /// Send the local copy's dirty chunks to the global tier. Returns false
    /// when there is no local copy.
    pub async fn push(&self, key: &ScopedKey) -> Result<bool, StateError> {
        let Some(dirty) = self.local.dirty_chunks(key) else { return Ok(false) };
        if dirty.chunks.is_empty() {
            // Nothing changed here since the copy was read or pushed: there
            // is nothing to send. (Sending its length alone would put back
            // a value another node deleted or shortened meanwhile, without
            // its bytes.)
            return Ok(true);
        }
        let sent: u64 = dirty.chunks.iter().map(|(_, c)| c.len() as u64).sum();
        let dirty: DirtyChunks = self.global.write_chunks(key, dirty).await?;
        self.wrote(sent);
        self.local.mark_clean(key, &dirty);
        Ok(true)
    }

    /// Replace the local copy with the global one. Returns false when the
    /// global tier has no such key (the local copy is dropped too).
    pub async fn pull(&self, key: &ScopedKey) -> Result<bool, StateError> {
        match self.read(self.global.get(key).await?) {
            Some(bytes) => {
                if self.local.install(key, bytes).is_err() {
                    // No room to keep it: the next read fetches it.
                    self.local.remove(key);
                }
                Ok(true)
            }
            None => {
                self.local.remove(key);
                Ok(false)
            }
        }
    }

    /// Take the global lock on `key`, waiting while another holder has it,
    /// until `give_up` (then `unavailable`). The lease lasts `lease` unless
    /// released first.
    pub async fn lock(&self, key: &ScopedKey, lease: Duration, give_up: Instant) -> Result<LeaseToken, StateError> {
        let token = LeaseToken::random();
        let mut pause = Duration::from_millis(1);
        loop {
            if self.global.try_lock(key, &token, lease).await? {
                return Ok(token);
            }
            let now = Instant::now();
            if now >= give_up {
                return Err(StateError::Unavailable(format!(
                    "the lock on `{}` was still held when the call's deadline came",
                    key.key()
                )));
            }
            tokio::time::sleep(pause.min(give_up - now)).await;
            pause = (pause * 2).min(LOCK_RETRY_MAX);
        }
    }

    /// Release a lock `token` holds; returns whether it still held it.
    pub async fn unlock(&self, key: &ScopedKey, token: &LeaseToken) -> Result<bool, StateError> {
        self.global.unlock(key, token).await
    }

    /// Write the global copy directly (the HTTP API's `PUT`), dropping any
    /// local copy on this node so its next read sees the new value.
    pub async fn put_global(&self, key: &ScopedKey, value: Vec<u8>) -> Result<(), StateError> {
        let len = value.len() as u64;
        self.global.set(key, value).await?;
        self.wrote(len);
        self.local.remove(key);
        Ok(())
    }

    /// Read the global copy directly (the HTTP API's `GET`).
    pub async fn get_global(&self, key: &ScopedKey) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.read(self.global.get(key).await?))
    }

    /// Remove from both tiers; returns whether the global tier had it.
    pub async fn delete_global(&self, key: &ScopedKey) -> Result<bool, StateError> {
        self.local.remove(key);
        self.global.delete(key).await
    }

    /// Keys of `tenant` in the global tier, with their sizes.
    pub async fn list_global(&self, tenant: &str) -> Result<Vec<(String, u64)>, StateError> {
        self.global.list(tenant).await
    }

    /// Delete everything `tenant` holds in state: every key in the global
    /// tier (with its usage counter, index, locks and own quota), then every
    /// value in this node's local tier, clean or dirty (nothing is pushed),
    /// and its local limit. Returns how many keys the global tier deleted.
    /// Idempotent; if the global tier fails, the local tier is left as it
    /// was, so a retry does both. Other nodes' local tiers keep their own
    /// copies until they are told (see `LocalTier::remove_tenant`).
    pub async fn delete_tenant(&self, tenant: &str) -> Result<u64, StateError> {
        let deleted = self.global.delete_tenant(tenant).await?;
        self.local.remove_tenant(tenant);
        Ok(deleted)
    }

    fn check_size(&self, len: u64) -> Result<(), StateError> {
        let limit = self.global.limits().max_value_bytes;
        if len > limit {
            return Err(StateError::TooLarge(format!("value of {len} bytes is over the limit of {limit}")));
        }
        Ok(())
    }
}
