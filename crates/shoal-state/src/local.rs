//! The local tier: one in-process store per node, shared by every instance
//! on it. Values are byte arrays addressable by range and tracked in
//! fixed-size chunks with a dirty bit each, so a push sends only what
//! changed since the last push or pull.
//!
//! This module never talks to the global tier; the caller moves bytes
//! between the tiers (`dirty_chunks` / `mark_clean` / `install`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::ScopedKey;

/// Bytes per chunk of dirty tracking (and of chunked global storage).
pub const CHUNK_BYTES: usize = 64 << 10;

#[derive(Debug, Default)]
struct LocalValue {
    bytes: Vec<u8>,
    /// One flag per chunk of `bytes`; `true` = changed since last synced.
    dirty: Vec<bool>,
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
}

/// The chunks of a value that changed, for a push.
#[derive(Debug, PartialEq, Eq)]
pub struct DirtyChunks {
    /// Length of the whole value.
    pub len: u64,
    /// (chunk index, chunk bytes) of each changed chunk, in order.
    pub chunks: Vec<(u32, Vec<u8>)>,
}

const POISON: &str = "local tier locks are never poisoned: nothing panics while holding them";

/// The local tier of one node.
#[derive(Debug, Default)]
pub struct LocalTier {
    values: RwLock<HashMap<ScopedKey, Arc<Mutex<LocalValue>>>>,
}

impl LocalTier {
    pub fn new() -> Self {
        Self::default()
    }

    fn value(&self, key: &ScopedKey) -> Option<Arc<Mutex<LocalValue>>> {
        self.values.read().expect(POISON).get(key).cloned()
    }

    fn value_or_insert(&self, key: &ScopedKey) -> Arc<Mutex<LocalValue>> {
        if let Some(value) = self.value(key) {
            return value;
        }
        self.values.write().expect(POISON).entry(key.clone()).or_default().clone()
    }

    pub fn contains(&self, key: &ScopedKey) -> bool {
        self.values.read().expect(POISON).contains_key(key)
    }

    /// A copy of the whole value.
    pub fn get(&self, key: &ScopedKey) -> Option<Vec<u8>> {
        Some(self.value(key)?.lock().expect(POISON).bytes.clone())
    }

    /// A copy of `len` bytes from `offset`, clamped to the value's end;
    /// only those bytes are copied.
    pub fn get_range(&self, key: &ScopedKey, offset: u64, len: u64) -> Option<Vec<u8>> {
        let value = self.value(key)?;
        let value = value.lock().expect(POISON);
        let size = value.bytes.len();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(size);
        let end = start.saturating_add(usize::try_from(len).unwrap_or(usize::MAX)).min(size);
        Some(value.bytes[start..end].to_vec())
    }

    /// Replace the whole value; every chunk becomes dirty.
    pub fn set(&self, key: &ScopedKey, bytes: Vec<u8>) {
        let value = self.value_or_insert(key);
        let mut value = value.lock().expect(POISON);
        value.bytes = bytes;
        value.dirty = vec![true; LocalValue::n_chunks(value.bytes.len())];
    }

    /// Write `data` at `offset`, growing the value (zero-filled) if needed;
    /// only the chunks touched become dirty. Returns the new length.
    pub fn set_range(&self, key: &ScopedKey, offset: u64, data: &[u8]) -> Result<u64, u64> {
        let offset = usize::try_from(offset).map_err(|_| offset)?;
        let end = offset.checked_add(data.len()).ok_or(offset as u64)?;
        let value = self.value_or_insert(key);
        let mut value = value.lock().expect(POISON);
        let old_len = value.bytes.len();
        if old_len < end {
            value.bytes.resize(end, 0);
        }
        value.bytes[offset..end].copy_from_slice(data);
        // Growing writes zeros between the old end and `offset`: changed too.
        value.mark_dirty(offset.min(old_len), end);
        Ok(value.bytes.len() as u64)
    }

    /// Length of the value, if present.
    pub fn len(&self, key: &ScopedKey) -> Option<u64> {
        Some(self.value(key)?.lock().expect(POISON).bytes.len() as u64)
    }

    pub fn remove(&self, key: &ScopedKey) -> bool {
        self.values.write().expect(POISON).remove(key).is_some()
    }

    /// Put a value fetched from the global tier; it starts clean.
    pub fn install(&self, key: &ScopedKey, bytes: Vec<u8>) {
        let value = self.value_or_insert(key);
        let mut value = value.lock().expect(POISON);
        value.dirty = vec![false; LocalValue::n_chunks(bytes.len())];
        value.bytes = bytes;
    }

    /// The changed chunks of `key` (None if it is not in the local tier).
    pub fn dirty_chunks(&self, key: &ScopedKey) -> Option<DirtyChunks> {
        let value = self.value(key)?;
        let value = value.lock().expect(POISON);
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
        Some(DirtyChunks { len: value.bytes.len() as u64, chunks })
    }

    /// Clear the dirty flags of the chunks a push sent, unless the value
    /// changed length meanwhile (then everything stays dirty).
    pub fn mark_clean(&self, key: &ScopedKey, pushed: &DirtyChunks) {
        let Some(value) = self.value(key) else { return };
        let mut value = value.lock().expect(POISON);
        if value.bytes.len() as u64 != pushed.len {
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
        let tier = LocalTier::new();
        let k = key("v");
        tier.set(&k, vec![1; 3 * CHUNK_BYTES]);
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
        let tier = LocalTier::new();
        let k = key("grow");
        assert_eq!(tier.set_range(&k, 3, b"ab"), Ok(5));
        assert_eq!(tier.get(&k).unwrap(), [0, 0, 0, b'a', b'b']);
        assert!(tier.set_range(&k, u64::MAX, b"x").is_err());
    }

    #[test]
    fn installed_values_are_clean_and_a_changed_length_keeps_chunks_dirty() {
        let tier = LocalTier::new();
        let k = key("i");
        tier.install(&k, vec![0; CHUNK_BYTES + 1]);
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
}
