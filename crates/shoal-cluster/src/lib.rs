//! Cluster mode (ARCHITECTURE.md, `crates/shoal-cluster`): identical nodes that share what they must
//! through Redis, with no consensus of their own.
//!
//! - [`Membership`]: each node keeps its entry in one sorted set alive in
//!   Redis (its heartbeat: a score that runs out after a short TTL, and its
//!   load) and reads the set to know who is up. A node that stops
//!   heartbeating drops out when its score runs out.
//! - [`SharedRegistry`]: tenants, function records and wasm (by content),
//!   with a version every node polls to mirror changes.
//! - [`CallQueue`]: asynchronous calls, taken by whichever node has room,
//!   leased to it by its heartbeat and put back when it dies.
//! - [`placement`]: rendezvous hashing with bounded load.
//! - [`Forwarder`]: HTTP/2 between nodes, with the cluster secret.
//! - [`SharedUsage`]: what each tenant's calls used, per minute, summed
//!   over the nodes.
//! - [`SharedTriggers`]: cron triggers and the last tick each ran.
//! - [`SharedQueues`]: queues as Redis streams read by one consumer group
//!   (not yet used by the node: its queues are single-node for now).
//!
//! The crate keeps records as bytes: what they mean is the node's
//! business. It never sees HTTP routes or function images.
//!
//! Nothing a node does over and over reads more of Redis than the cluster's
//! own bookkeeping: no `SCAN`, `KEYS` or `HVALS` (the same Redis holds every
//! state value and call record, which may be millions of keys). Members
//! are one sorted set, lease holders one set, and wasm is kept by a count
//! of the records that use it. The only reads of everything are one-time
//! migrations from an older layout (see [`CallQueue::adopt_older_leases`]
//! and `registry.rs`).

mod calls;
mod forward;
mod membership;
pub mod placement;
mod queues;
mod registry;
mod triggers;
mod usage;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use calls::{CallQueue, Finished, Refused, TakenCall, TickClaim};
pub use forward::{Answer, ForwardError, Forwarder, SECRET_HEADER};
pub use membership::{Load, Member, Membership, MembershipConfig};
pub use queues::{DeadMessage, QueueCounts, QueuePut, Sent, Settle, SharedQueues, Take, TakenMessage};
pub use registry::{AliasChange, RegistrySnapshot, Republished, SharedRegistry, VersionRemoval};
pub use triggers::{SharedTriggers, TriggerPut};
pub use usage::{SharedUsage, UsageRow};

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

/// The counter at `key` (0 when missing): a version nodes poll.
pub(crate) async fn read_version(conn: &ConnectionManager, key: &str) -> Result<u64, ClusterError> {
    let version: Option<u64> = redis::cmd("GET").arg(key).query_async(&mut conn.clone()).await.map_err(redis_error)?;
    Ok(version.unwrap_or(0))
}

/// Every field of the hash at `key`, with the version at `version_key`
/// read in the same step.
pub(crate) async fn read_versioned_hash(
    conn: &ConnectionManager,
    version_key: &str,
    key: &str,
) -> Result<(u64, Vec<(String, Vec<u8>)>), ClusterError> {
    let (version, fields): (Option<u64>, Vec<(String, Vec<u8>)>) = redis::pipe()
        .atomic()
        .get(version_key)
        .hgetall(key)
        .query_async(&mut conn.clone())
        .await
        .map_err(redis_error)?;
    Ok((version.unwrap_or(0), fields))
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_testkit::RedisServer;

    /// How often Redis ran each of `commands` since its stats were reset,
    /// from `INFO commandstats` (which counts commands run by scripts too).
    async fn calls_of(conn: &mut ConnectionManager, commands: &[&str]) -> Vec<(String, u64)> {
        let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
        commands
            .iter()
            .map(|command| {
                let prefix = format!("cmdstat_{command}:calls=");
                let calls = info
                    .lines()
                    .find_map(|line| line.strip_prefix(&prefix))
                    .and_then(|rest| rest.split(',').next())
                    .map_or(0, |n| n.parse().unwrap());
                (command.to_string(), calls)
            })
            .collect()
    }

    #[tokio::test]
    async fn the_clusters_bookkeeping_never_reads_the_whole_keyspace_or_every_record() {
        let redis = RedisServer::start();
        let mut conn = connect(&redis.url(), Duration::from_secs(1)).await.unwrap();
        let queue = CallQueue::new(conn.clone(), "t");
        let registry = SharedRegistry::new(conn.clone(), "t");
        // The one-time migrations, done (and checked to count) first.
        queue.adopt_older_leases().await.unwrap();
        registry.put_function("acme/zero", "s0", br#"{"sha256":"s0"}"#, b"w").await.unwrap();
        assert_eq!(calls_of(&mut conn, &["scan"]).await, [("scan".to_string(), 1)], "the stats count");
        // Some state and call records, as a cluster's Redis holds.
        for i in 0..200 {
            redis.command(&["SET", &format!("t:state:acme:k{i}"), "v"]);
        }
        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut conn).await.unwrap();

        let config = MembershipConfig {
            ttl: Duration::from_millis(300),
            prefix: "t".into(),
            ..MembershipConfig::new(redis.url())
        };
        let a = Membership::join(config.clone(), Member::new("a", "127.0.0.2:8080")).await.unwrap();
        let b = Membership::join(config, Member::new("b", "127.0.0.3:8080")).await.unwrap();
        a.heartbeat().await.unwrap();
        assert_eq!(a.read_members().await.unwrap().len(), 2);
        for i in 0..4 {
            assert_eq!(queue.accept("acme", &format!("c{i}"), b"r", b"", 10, 10, None).await.unwrap(), Ok(()));
        }
        let c0 = queue.take("a").await.unwrap().unwrap().id;
        let c1 = queue.take("a").await.unwrap().unwrap().id;
        let c2 = queue.take("b").await.unwrap().unwrap().id;
        let _c3 = queue.take("b").await.unwrap().unwrap().id;
        assert!(queue.update("a", &c0, b"running").await.unwrap());
        assert_eq!(queue.finish("a", &c0, b"done", None, Duration::from_secs(60)).await.unwrap(), Finished::Recorded);
        queue.release("a", &c1).await.unwrap();
        assert!(queue.requeue("b", &c2).await.unwrap());
        assert_eq!(queue.lease_holders().await.unwrap(), ["b"]);
        // b dies; once its heartbeat ran out, its calls are requeued.
        drop(b);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(queue.requeue_from("b").await.unwrap(), Some(1));
        assert_eq!(a.read_members().await.unwrap().len(), 1);
        registry.put_function("acme/one", "s1", br#"{"sha256":"s1"}"#, b"w1").await.unwrap();
        registry.put_function("acme/two", "s1", br#"{"sha256":"s1"}"#, b"w1").await.unwrap();
        registry.put_function("acme/two", "s2", br#"{"sha256":"s2"}"#, b"w2").await.unwrap();
        assert!(registry.remove_function("acme/one", &[]).await.unwrap());
        assert!(registry.remove_function("acme/two", &[]).await.unwrap());
        registry.snapshot().await.unwrap();
        a.leave().await.unwrap();

        let calls = calls_of(&mut conn, &["scan", "keys", "hvals", "evalsha", "zadd"]).await;
        assert_eq!(calls[..3], [("scan".into(), 0), ("keys".into(), 0), ("hvals".into(), 0)], "{calls:?}");
        // The scripts did run (and so were counted) and heartbeats wrote.
        assert!(calls[3].1 > 10 && calls[4].1 > 2, "{calls:?}");
    }
}
