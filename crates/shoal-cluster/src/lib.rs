//! Cluster mode (DESIGN.md §6): identical nodes that share their state
//! through Redis, with no consensus of their own.
//!
//! [`Membership`] is the first piece: each node keeps a key with a short
//! TTL alive in Redis (its heartbeat) and reads everyone's keys to know
//! who is up. A node that stops heartbeating drops out when its key
//! expires; one that stops cleanly deletes its key at once.

mod membership;

pub use membership::{Member, Membership, MembershipConfig};

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis: {0}")]
    Redis(String),
}
