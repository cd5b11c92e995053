//! Shoal's state: the two tiers.
//!
//! - [`LocalTier`]: one in-process store per node shared by every instance
//!   on it; values addressable by range, tracked in chunks with dirty bits.
//! - The global tier ([`GlobalTier`]): on a single node [`EmbeddedTier`],
//!   chunked values in the embedded durable store ([`EmbeddedStore`], one
//!   redb file in the data directory, where the node also keeps its
//!   registry); across nodes [`RedisTier`]. Both have atomic `incr`,
//!   `append` and lock leases, a per-tenant quota (counting a fixed
//!   overhead and the name of every key, not only its bytes) and a value
//!   size limit.
//!
//! Keys reach this crate already scoped to their tenant ([`ScopedKey`]).
//! This crate never interprets the bytes it stores.

mod embedded;
mod global;
mod key;
mod local;
mod tiers;

pub use embedded::{EmbeddedStore, ReadTx, StoreError, Table, WriteTx};
pub use global::{
    EmbeddedGlobal, EmbeddedTier, GlobalTier, KEY_OVERHEAD_BYTES, LeaseToken, Quotas, RedisConfig, RedisTier,
    StateFuture, StateLimits, key_charge, parse_counter, redacted_url,
};
pub use key::{MAX_KEY_BYTES, ScopedKey};
pub use local::{CHUNK_BYTES, DirtyChunks, LocalBytes, LocalLimits, LocalTier};
pub use tiers::{MovedBytes, StateTiers, TierStats, metered};

/// Why a state operation failed; maps onto the guest interface's `error`.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("{0}")]
    NotAnInteger(String),
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(StoreError),
}
