//! The global tier: the durable, shared copy of every value, and the atomic
//! operations (`incr`, `append`, locks) that act on it directly.
//!
//! Two backends implement [`GlobalTier`]:
//! - [`EmbeddedTier`], the single-node default: chunked values in the
//!   embedded store of the data directory ([`EmbeddedGlobal`]), every
//!   acknowledged write durable; lock leases in memory (no holder outlives
//!   the process that keeps them).
//! - [`RedisTier`]: chunked values in Redis, `incr`/`append`/writes as
//!   server-side scripts (atomic), locks as `SET NX PX` leases; every
//!   operation bounded by a timeout and answering `unavailable` past it.
//!
//! Both check sizes and the tenant's quota before writing anything, so a
//! refused write changes nothing, and both store the same bytes: a value is
//! its length plus chunks of [`CHUNK_BYTES`], so a range read or a push
//! moves only the chunks it needs.
//!
//! The quota counts every stored key, not only its bytes: a key costs
//! [`key_charge`] (a fixed [`KEY_OVERHEAD_BYTES`], its name and its value),
//! so a tenant cannot fill the store with millions of empty keys for free.
//!
//! [`CHUNK_BYTES`]: crate::CHUNK_BYTES

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::RwLock;
use std::time::Duration;

use crate::{DirtyChunks, ScopedKey, StateError};

mod embedded;
mod redis;

pub use embedded::{EmbeddedGlobal, EmbeddedTier};
pub use redis::{RedisConfig, RedisTier, redacted_url};

/// What a global-tier operation returns.
pub type StateFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StateError>> + Send + 'a>>;

/// What each stored key costs against its tenant's quota on top of its
/// name and value: an estimate of what either backend spends per key —
/// Redis a hash object with its length field plus a field in the tenant's
/// index; redb a length row and a chunk row, each repeating the scoped
/// name in a B-tree entry. Changing it changes every tenant's usage, so it
/// is a constant and both backends use this one.
pub const KEY_OVERHEAD_BYTES: u64 = 100;

/// Bytes the key `key` (as the tenant wrote it, without the tenant) with a
/// value of `value_len` bytes counts for against its tenant's quota.
pub fn key_charge(key: &str, value_len: u64) -> u64 {
    KEY_OVERHEAD_BYTES.saturating_add(key.len() as u64).saturating_add(value_len)
}

/// Size limits of the global tier.
#[derive(Clone, Copy, Debug)]
pub struct StateLimits {
    /// Largest value. Default 64 MiB.
    pub max_value_bytes: u64,
    /// What all of one tenant's keys may count for together, each
    /// [`key_charge`] bytes (value, name and overhead). Default 1 GiB.
    pub tenant_quota_bytes: u64,
}

impl Default for StateLimits {
    fn default() -> Self {
        Self { max_value_bytes: 64 << 20, tenant_quota_bytes: 1 << 30 }
    }
}

/// Each tenant's state quota: the node's default, or the one the admin set
/// for that tenant. Both backends check writes against [`Quotas::of`].
#[derive(Debug, Default)]
pub struct Quotas {
    set: RwLock<HashMap<String, u64>>,
}

impl Quotas {
    /// The quota of `tenant` under `limits`.
    pub fn of(&self, tenant: &str, limits: &StateLimits) -> u64 {
        self.set
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .copied()
            .unwrap_or(limits.tenant_quota_bytes)
    }

    /// Set (`Some`) or forget (`None`: back to the default) a tenant's quota.
    pub fn set(&self, tenant: &str, quota: Option<u64>) {
        let mut set = self.set.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        match quota {
            Some(bytes) => set.insert(tenant.to_string(), bytes),
            None => set.remove(tenant),
        };
    }
}

/// Proof of holding a lock: a random token only its holder knows, so only
/// the holder can release it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseToken(String);

impl LeaseToken {
    pub fn random() -> Self {
        Self(format!("{:032x}", rand::random::<u128>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A global tier backend. Every method is atomic on its own.
pub trait GlobalTier: Send + Sync + std::fmt::Debug {
    fn limits(&self) -> StateLimits;

    /// The per-tenant quotas this backend checks writes against.
    fn quotas(&self) -> &Quotas;

    /// Bytes of state `tenant` may hold: its own quota, or the default.
    fn quota_of(&self, tenant: &str) -> u64 {
        self.quotas().of(tenant, &self.limits())
    }

    /// Give `tenant` a quota of its own (`None`: the default again). Values
    /// already stored stay; writes that would grow past it are refused.
    fn set_tenant_quota(&self, tenant: &str, quota: Option<u64>) {
        self.quotas().set(tenant, quota);
    }

    /// `len` bytes from `offset`, clamped to the value's end (None if the
    /// key is absent), reading only the chunks that hold them.
    fn get_range<'a>(&'a self, key: &'a ScopedKey, offset: u64, len: u64) -> StateFuture<'a, Option<Vec<u8>>>;

    /// The whole value.
    fn get<'a>(&'a self, key: &'a ScopedKey) -> StateFuture<'a, Option<Vec<u8>>> {
        self.get_range(key, 0, u64::MAX)
    }

    /// Replace the whole value.
    fn set<'a>(&'a self, key: &'a ScopedKey, value: Vec<u8>) -> StateFuture<'a, ()>;

    /// Write the chunks a push sends and set the value's length; gives the
    /// chunks back so the caller can mark them clean.
    fn write_chunks<'a>(&'a self, key: &'a ScopedKey, dirty: DirtyChunks) -> StateFuture<'a, DirtyChunks>;

    /// Remove the value; returns whether it existed.
    fn delete<'a>(&'a self, key: &'a ScopedKey) -> StateFuture<'a, bool>;

    /// Append atomically; returns the new length.
    fn append<'a>(&'a self, key: &'a ScopedKey, data: Vec<u8>) -> StateFuture<'a, u64>;

    /// Add `delta` to the integer stored under `key` (decimal text, see
    /// [`parse_counter`]), starting from 0; returns the new value.
    fn incr<'a>(&'a self, key: &'a ScopedKey, delta: i64) -> StateFuture<'a, i64>;

    /// Every key of `tenant` with its length, in key order.
    fn list<'a>(&'a self, tenant: &'a str) -> StateFuture<'a, Vec<(String, u64)>>;

    /// Bytes of state `tenant` uses: the sum of [`key_charge`] over its
    /// keys, which is what its quota limits.
    fn usage<'a>(&'a self, tenant: &'a str) -> StateFuture<'a, u64>;

    /// Take the lock on `key` for `lease` unless someone holds it; returns
    /// whether it was taken. A lease not released expires by itself.
    fn try_lock<'a>(&'a self, key: &'a ScopedKey, token: &'a LeaseToken, lease: Duration) -> StateFuture<'a, bool>;

    /// Release the lock if `token` holds it; returns whether it did.
    fn unlock<'a>(&'a self, key: &'a ScopedKey, token: &'a LeaseToken) -> StateFuture<'a, bool>;

    /// Delete every value of `tenant` (and its usage counter and index), in
    /// batches so no single transaction or script runs long; returns how many
    /// keys were deleted. Idempotent: a second call deletes nothing and succeeds.
    ///
    /// Also forgets the tenant's own quota and any lock it holds. Meant for
    /// a tenant that is being deleted: its functions should no longer run,
    /// since a write racing with the deletion may be left behind.
    fn delete_tenant<'a>(&'a self, tenant: &'a str) -> StateFuture<'a, u64>;
}

/// The integers `incr` works on: decimal text, an optional `-`, no leading
/// zeros or `+`, within 64 bits (the form Redis accepts, so both backends
/// agree).
pub fn parse_counter(bytes: &[u8]) -> Option<i64> {
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    let canonical = match digits {
        [b'0'] => bytes.len() == 1,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn too_large(len: u64, limit: u64) -> StateError {
    StateError::TooLarge(format!("value of {len} bytes is over the limit of {limit}"))
}

fn over_quota(tenant: &str, after: u64, quota: u64) -> StateError {
    StateError::LimitExceeded(format!("tenant `{tenant}` would use {after} bytes of state, over its quota of {quota}"))
}

fn not_an_integer(key: &ScopedKey) -> StateError {
    StateError::NotAnInteger(format!("the value of `{}` is not a decimal 64-bit integer", key.key()))
}

fn overflow(key: &ScopedKey, delta: i64) -> StateError {
    StateError::LimitExceeded(format!("incr of `{}` by {delta} overflows a 64-bit integer", key.key()))
}

#[cfg(test)]
mod tests {
    use super::parse_counter;

    #[test]
    fn counters_are_canonical_decimal() {
        for (text, value) in [("0", Some(0)), ("-12", Some(-12)), ("9223372036854775807", Some(i64::MAX))] {
            assert_eq!(parse_counter(text.as_bytes()), value, "{text}");
        }
        for text in ["", "-", "-0", "007", "+5", " 5", "5 ", "9223372036854775808", "1e3", "٣"] {
            assert_eq!(parse_counter(text.as_bytes()), None, "{text:?}");
        }
    }
}
