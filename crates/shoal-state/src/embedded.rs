//! The embedded durable store: redb tables keyed by strings. Every write is
//! its own transaction, committed durably (fsync) before it returns, so an
//! acknowledged write survives `kill -9` and power loss.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition, TableError};

type StrTable = TableDefinition<'static, &'static str, &'static [u8]>;

/// A named table of the store. Names are fixed by the code that uses them.
#[derive(Clone, Copy, Debug)]
pub struct Table(&'static str);

impl Table {
    pub const fn new(name: &'static str) -> Self {
        Self(name)
    }

    fn definition(self) -> StrTable {
        TableDefinition::new(self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("embedded store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("embedded store: {0}")]
    Io(String),
    /// A state-level refusal raised inside a transaction (it is rolled back).
    #[error(transparent)]
    State(Box<crate::StateError>),
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Memory redb may keep for the pages it reads and writes (its default is
/// 1 GiB, which a node's deploys and queues would fill and keep). The
/// kernel's page cache holds the file besides.
const CACHE_BYTES: usize = 64 << 20;

/// One redb file; cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    db: Database,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Open or create the store at `path`. A second open of the same file in
    /// another process fails (redb locks the file) rather than corrupting it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })?;
        Ok(Self { db })
    }

    pub fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let t = match tx.open_table(table.definition()) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        Ok(t.get(key).map_err(io)?.map(|v| v.value().to_vec()))
    }

    /// Write `value` under `key`, durably.
    pub fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(table.definition()).map_err(io)?.insert(key, value).map_err(io)?;
            Ok(())
        })
    }

    /// Write several entries in one durable transaction: all or none.
    pub fn put_all(&self, entries: &[(Table, &str, &[u8])]) -> Result<(), StoreError> {
        self.write(|tx| {
            for (table, key, value) in entries {
                tx.open_table(table.definition()).map_err(io)?.insert(*key, *value).map_err(io)?;
            }
            Ok(())
        })
    }

    /// Remove `key`; returns whether it was there.
    pub fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let mut existed = false;
        self.write(|tx| {
            existed = tx.open_table(table.definition()).map_err(io)?.remove(key).map_err(io)?.is_some();
            Ok(())
        })?;
        Ok(existed)
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, table: Table, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan(table, prefix.., usize::MAX, |key| key.starts_with(prefix))
    }

    /// Up to `limit` entries with keys from `start` (included) to `end`
    /// (excluded), in key order.
    pub fn scan_range(
        &self,
        table: Table,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if start >= end {
            return Ok(Vec::new());
        }
        self.scan(table, start..end, limit, |_| true)
    }

    /// Up to `limit` entries with keys before `end`, in key order.
    pub fn scan_before(&self, table: Table, end: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan(table, ..end, limit, |_| true)
    }

    /// Up to `limit` entries of `range`, in key order, stopping at the
    /// first key `keep` refuses.
    fn scan<'a>(
        &self,
        table: Table,
        range: impl std::ops::RangeBounds<&'a str>,
        limit: usize,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let t = match tx.open_table(table.definition()) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let mut out = Vec::new();
        for entry in t.range(range).map_err(io)?.take(limit) {
            let (key, value) = entry.map_err(io)?;
            if !keep(key.value()) {
                break;
            }
            out.push((key.value().to_string(), value.value().to_vec()));
        }
        Ok(out)
    }

    fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        f(&tx)?;
        tx.commit().map_err(io)
    }

    /// Run `f` in one durable write transaction: every change it makes is
    /// committed together, or none is (when it returns an error). Write
    /// transactions are serialised, so a read-modify-write in `f` is atomic.
    pub fn transaction<R>(&self, f: impl FnOnce(&WriteTx<'_>) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        let result = f(&WriteTx { tx: &tx })?;
        tx.commit().map_err(io)?;
        Ok(result)
    }
}

/// Run `f` on one consistent snapshot of the store.
impl EmbeddedStore {
    pub fn snapshot<R>(&self, f: impl FnOnce(&ReadTx) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        f(&ReadTx { tx })
    }
}

/// Access to tables inside [`EmbeddedStore::snapshot`].
pub struct ReadTx {
    tx: redb::ReadTransaction,
}

impl ReadTx {
    pub fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = match self.tx.open_table(table.definition()) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        Ok(t.get(key).map_err(io)?.map(|v| v.value().to_vec()))
    }

    /// Call `f` on each entry whose key starts with `prefix`, in key
    /// order, until it returns false or the prefix's entries end.
    pub fn visit_prefix(
        &self,
        table: Table,
        prefix: &str,
        f: impl FnMut(&str, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        match self.tx.open_table(table.definition()) {
            Ok(t) => visit_prefix(&t, prefix, f),
            Err(TableError::TableDoesNotExist(_)) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    /// Call `f` on each entry whose key starts with `prefix`, in reverse
    /// key order (newest first, for keys that end in a time), until it
    /// returns false or the prefix's entries end.
    pub fn visit_prefix_rev(
        &self,
        table: Table,
        prefix: &str,
        mut f: impl FnMut(&str, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let t = match self.tx.open_table(table.definition()) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        // Every key with the prefix sorts before the prefix with its last
        // char bumped by one.
        let mut end = prefix.to_string();
        let bumped = end.pop().and_then(|c| char::from_u32(c as u32 + 1));
        let entries = match bumped {
            Some(c) => {
                end.push(c);
                t.range(prefix..end.as_str()).map_err(io)?
            }
            None => t.range(prefix..).map_err(io)?,
        };
        for entry in entries.rev() {
            let (key, value) = entry.map_err(io)?;
            if !key.value().starts_with(prefix) {
                // Past the prefix's keys (only without an upper bound: keys
                // after them come first, then theirs, then smaller ones).
                if key.value() < prefix {
                    break;
                }
                continue;
            }
            if !f(key.value(), value.value()) {
                break;
            }
        }
        Ok(())
    }

    /// Fold `f` over every entry whose key starts with `prefix`, in key
    /// order, without collecting them.
    pub fn fold_prefix<A>(
        &self,
        table: Table,
        prefix: &str,
        init: A,
        f: impl FnMut(A, &str, &[u8]) -> A,
    ) -> Result<A, StoreError> {
        match self.tx.open_table(table.definition()) {
            Ok(t) => fold_prefix(&t, prefix, init, f),
            Err(TableError::TableDoesNotExist(_)) => Ok(init),
            Err(e) => Err(io(e)),
        }
    }
}

/// Call `f` on each entry whose key starts with `prefix`, in key order,
/// until it returns false or the prefix's entries end.
fn visit_prefix<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    prefix: &str,
    mut f: impl FnMut(&str, &[u8]) -> bool,
) -> Result<(), StoreError> {
    for entry in table.range(prefix..).map_err(io)? {
        let (key, value) = entry.map_err(io)?;
        if !key.value().starts_with(prefix) || !f(key.value(), value.value()) {
            break;
        }
    }
    Ok(())
}

/// Fold `f` over every entry whose key starts with `prefix`.
fn fold_prefix<A, T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    prefix: &str,
    mut acc: A,
    mut f: impl FnMut(A, &str, &[u8]) -> A,
) -> Result<A, StoreError> {
    for entry in table.range(prefix..).map_err(io)? {
        let (key, value) = entry.map_err(io)?;
        if !key.value().starts_with(prefix) {
            break;
        }
        acc = f(acc, key.value(), value.value());
    }
    Ok(acc)
}

/// Access to tables inside [`EmbeddedStore::transaction`].
pub struct WriteTx<'a> {
    tx: &'a redb::WriteTransaction,
}

impl WriteTx<'_> {
    pub fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.tx.open_table(table.definition()).map_err(io)?;
        Ok(t.get(key).map_err(io)?.map(|v| v.value().to_vec()))
    }

    pub fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tx.open_table(table.definition()).map_err(io)?.insert(key, value).map_err(io)?;
        Ok(())
    }

    pub fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        Ok(self.tx.open_table(table.definition()).map_err(io)?.remove(key).map_err(io)?.is_some())
    }

    /// Fold `f` over every entry whose key starts with `prefix`, in key
    /// order, without collecting them.
    pub fn fold_prefix<A>(
        &self,
        table: Table,
        prefix: &str,
        init: A,
        f: impl FnMut(A, &str, &[u8]) -> A,
    ) -> Result<A, StoreError> {
        fold_prefix(&self.tx.open_table(table.definition()).map_err(io)?, prefix, init, f)
    }

    /// The first `limit` entries whose key starts with `prefix`, in key
    /// order.
    pub fn scan_prefix(&self, table: Table, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        visit_prefix(&self.tx.open_table(table.definition()).map_err(io)?, prefix, |key, value| {
            if out.len() >= limit {
                return false;
            }
            out.push((key.to_string(), value.to_vec()));
            true
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Table = Table::new("t");
    const U: Table = Table::new("u");

    #[test]
    fn writes_read_back_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            assert_eq!(store.get(T, "a").unwrap(), None, "a table never written is empty");
            store.put(T, "a", b"1").unwrap();
            store.put_all(&[(T, "b/x", b"2"), (U, "b/y", b"3")]).unwrap();
            assert_eq!(store.get(T, "a").unwrap().as_deref(), Some(&b"1"[..]));
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.get(T, "b/x").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(store.get(U, "b/y").unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(store.get(U, "a").unwrap(), None, "tables are separate");
    }

    #[test]
    fn a_reverse_visit_sees_only_the_prefix_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("db.redb")).unwrap();
        for key in ["a/1", "a/2", "a/3", "a0", "ab/9", "b/1", "a"] {
            store.put(T, key, key.as_bytes()).unwrap();
        }
        let seen = |prefix: &str, most: usize| {
            let mut keys = Vec::new();
            store
                .snapshot(|tx| {
                    tx.visit_prefix_rev(T, prefix, |key, value| {
                        assert_eq!(key.as_bytes(), value);
                        keys.push(key.to_string());
                        keys.len() < most
                    })
                })
                .unwrap();
            keys
        };
        assert_eq!(seen("a/", 10), ["a/3", "a/2", "a/1"]);
        assert_eq!(seen("a/", 2), ["a/3", "a/2"], "it stops when told");
        assert_eq!(seen("c/", 10), Vec::<String>::new());
        assert_eq!(seen("b/", 10), ["b/1"]);
    }

    #[test]
    fn delete_reports_whether_the_key_existed() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("db.redb")).unwrap();
        store.put(T, "k", b"v").unwrap();
        assert!(store.delete(T, "k").unwrap());
        assert!(!store.delete(T, "k").unwrap());
        assert_eq!(store.get(T, "k").unwrap(), None);
    }

    #[test]
    fn scan_prefix_returns_only_matching_keys_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("db.redb")).unwrap();
        assert!(store.scan_prefix(T, "x").unwrap().is_empty());
        for key in ["acme/b", "acme/a", "acmf/c", "acm/d", "acme/"] {
            store.put(T, key, key.as_bytes()).unwrap();
        }
        let keys: Vec<String> = store.scan_prefix(T, "acme/").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["acme/", "acme/a", "acme/b"]);
        let keys: Vec<String> = store.scan_before(T, "acme/b", 2).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["acm/d", "acme/"], "before the end, in order, at most the limit");
    }
}
