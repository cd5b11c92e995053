//! The two tiers together, as the host's `state` interface uses them
//! (DESIGN.md "State semantics"): `get`/`set`/ranges on the local tier,
//! filled from the global tier on a miss; `push`/`pull` move a value
//! between the tiers (a push sends only dirty chunks); `incr`, `append` and
//! `delete` act on the global tier and drop the local copy, so the next
//! read sees their result.
//!
//! Global-tier work runs on the blocking pool (the embedded store fsyncs),
//! never on the async worker that runs guests.
//!
//! Limits: a local `set`/`set-range` checks the value size limit; the
//! tenant's quota is the global tier's and is checked when a value reaches
//! it (`push`, `incr`, `append`, HTTP `PUT`). The local tier has no memory
//! budget of its own yet: a value stays local until deleted, pulled over or
//! the node restarts.

use std::sync::Arc;

use crate::{EmbeddedGlobal, LocalTier, ScopedKey, StateError};

#[derive(Debug)]
pub struct StateTiers {
    local: LocalTier,
    global: Arc<EmbeddedGlobal>,
}

impl StateTiers {
    pub fn new(global: EmbeddedGlobal) -> Self {
        Self { local: LocalTier::new(), global: Arc::new(global) }
    }

    pub fn local(&self) -> &LocalTier {
        &self.local
    }

    pub fn global(&self) -> &EmbeddedGlobal {
        &self.global
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedGlobal) -> Result<R, StateError> + Send + 'static,
    ) -> Result<R, StateError> {
        let global = self.global.clone();
        tokio::task::spawn_blocking(move || f(&global))
            .await
            .map_err(|e| StateError::Unavailable(format!("state task failed: {e}")))?
    }

    /// Make sure the local tier holds `key` if the global tier has it;
    /// returns whether it is local now.
    async fn fill(&self, key: &ScopedKey) -> Result<bool, StateError> {
        if self.local.contains(key) {
            return Ok(true);
        }
        let k = key.clone();
        match self.blocking(move |g| g.get(&k)).await? {
            Some(bytes) => {
                if !self.local.contains(key) {
                    self.local.install(key, bytes);
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    pub async fn get(&self, key: &ScopedKey) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(bytes) = self.local.get(key) {
            return Ok(Some(bytes));
        }
        Ok(if self.fill(key).await? { self.local.get(key) } else { None })
    }

    pub async fn set(&self, key: &ScopedKey, value: Vec<u8>) -> Result<(), StateError> {
        self.check_size(value.len() as u64)?;
        self.local.set(key, value);
        Ok(())
    }

    /// Read a range: from the local copy if there is one, else straight
    /// from the global tier's chunks (without fetching the whole value).
    pub async fn get_range(&self, key: &ScopedKey, offset: u64, len: u64) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(bytes) = self.local.get_range(key, offset, len) {
            return Ok(Some(bytes));
        }
        let k = key.clone();
        self.blocking(move |g| g.get_range(&k, offset, len)).await
    }

    pub async fn set_range(&self, key: &ScopedKey, offset: u64, data: &[u8]) -> Result<(), StateError> {
        let end =
            offset.checked_add(data.len() as u64).ok_or_else(|| StateError::TooLarge("range end overflows".into()))?;
        self.check_size(end)?;
        // Writing into a value that lives only in the global tier: fetch
        // it first, so the local copy (and a later push) is whole.
        self.fill(key).await?;
        self.local.set_range(key, offset, data).map_err(|_| StateError::TooLarge("range end overflows".into()))?;
        Ok(())
    }

    pub async fn delete(&self, key: &ScopedKey) -> Result<(), StateError> {
        self.local.remove(key);
        let k = key.clone();
        self.blocking(move |g| g.delete(&k).map(|_| ())).await
    }

    pub async fn append(&self, key: &ScopedKey, data: Vec<u8>) -> Result<(), StateError> {
        let k = key.clone();
        self.blocking(move |g| g.append(&k, &data).map(|_| ())).await?;
        self.local.remove(key);
        Ok(())
    }

    pub async fn incr(&self, key: &ScopedKey, delta: i64) -> Result<i64, StateError> {
        let k = key.clone();
        let value = self.blocking(move |g| g.incr(&k, delta)).await?;
        self.local.remove(key);
        Ok(value)
    }

    /// Send the local copy's dirty chunks to the global tier. Returns false
    /// when there is no local copy.
    pub async fn push(&self, key: &ScopedKey) -> Result<bool, StateError> {
        let Some(dirty) = self.local.dirty_chunks(key) else { return Ok(false) };
        let k = key.clone();
        let dirty = self.blocking(move |g| g.write_chunks(&k, &dirty).map(|()| dirty)).await?;
        self.local.mark_clean(key, &dirty);
        Ok(true)
    }

    /// Replace the local copy with the global one. Returns false when the
    /// global tier has no such key (the local copy is dropped too).
    pub async fn pull(&self, key: &ScopedKey) -> Result<bool, StateError> {
        let k = key.clone();
        match self.blocking(move |g| g.get(&k)).await? {
            Some(bytes) => {
                self.local.install(key, bytes);
                Ok(true)
            }
            None => {
                self.local.remove(key);
                Ok(false)
            }
        }
    }

    /// Write the global copy directly (the HTTP API's `PUT`), dropping any
    /// local copy on this node so its next read sees the new value.
    pub async fn put_global(&self, key: &ScopedKey, value: Vec<u8>) -> Result<(), StateError> {
        let k = key.clone();
        self.blocking(move |g| g.set(&k, &value)).await?;
        self.local.remove(key);
        Ok(())
    }

    /// Read the global copy directly (the HTTP API's `GET`).
    pub async fn get_global(&self, key: &ScopedKey) -> Result<Option<Vec<u8>>, StateError> {
        let k = key.clone();
        self.blocking(move |g| g.get(&k)).await
    }

    /// Remove from both tiers; returns whether the global tier had it.
    pub async fn delete_global(&self, key: &ScopedKey) -> Result<bool, StateError> {
        self.local.remove(key);
        let k = key.clone();
        self.blocking(move |g| g.delete(&k)).await
    }

    /// Keys of `tenant` in the global tier, with their sizes.
    pub async fn list_global(&self, tenant: &str) -> Result<Vec<(String, u64)>, StateError> {
        let tenant = tenant.to_string();
        self.blocking(move |g| g.list(&tenant)).await
    }

    fn check_size(&self, len: u64) -> Result<(), StateError> {
        let limit = self.global.limits().max_value_bytes;
        if len > limit {
            return Err(StateError::TooLarge(format!("value of {len} bytes is over the limit of {limit}")));
        }
        Ok(())
    }
}
