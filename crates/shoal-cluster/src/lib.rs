//! Cluster mode (ARCHITECTURE.md, `crates/shoal-cluster`): identical nodes that share what they must
//! through Redis, with no consensus of their own.
//!
//! - [`Membership`]: each node keeps a key with a short TTL alive in Redis
//!   (its heartbeat, carrying its load) and reads everyone's to know who is
//!   up. A node that stops heartbeating drops out when its key expires.
//! - [`SharedRegistry`]: tenants, function records and wasm (by content),
//!   with a version every node polls to mirror changes.
//! - [`CallQueue`]: asynchronous calls, taken by whichever node has room,
//!   leased to it by its heartbeat and put back when it dies.
//! - [`placement`]: rendezvous hashing with bounded load.
//! - [`Forwarder`]: HTTP/2 between nodes, with the cluster secret.
//!
//! The crate keeps records as bytes: what they mean is the node's
//! business. It never sees HTTP routes or function images.

mod calls;
mod forward;
mod membership;
pub mod placement;
mod registry;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use calls::{CallQueue, Refused, TakenCall};
pub use forward::{Answer, ForwardError, Forwarder, SECRET_HEADER};
pub use membership::{Load, Member, Membership, MembershipConfig};
pub use registry::{RegistrySnapshot, Republished, SharedRegistry};

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("this node's admin token is not the cluster's: start every node with the same SHOAL_ADMIN_TOKEN")]
    AdminToken,
}

pub(crate) fn redis_error(e: redis::RedisError) -> ClusterError {
    ClusterError::Redis(e.to_string())
}

/// A connection to Redis that reconnects by itself, each command bounded
/// by `timeout`. Fails if Redis does not answer a `PING` now.
pub async fn connect(url: &str, timeout: Duration) -> Result<ConnectionManager, ClusterError> {
    let client = redis::Client::open(url).map_err(|e| ClusterError::Redis(format!("redis URL: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    let mut conn = ConnectionManager::new_lazy_with_config(client, config).map_err(redis_error)?;
    redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(redis_error)?;
    Ok(conn)
}
