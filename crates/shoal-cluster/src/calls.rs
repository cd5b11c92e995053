//! Asynchronous calls of a cluster: a queue in Redis any node may take
//! from, with a lease on every call a node is running.
//!
//! Keys (under the cluster's prefix `P`):
//! - `P:call:<id>` — the call's record (JSON, as the node wrote it);
//! - `P:call:<id>:in` — its input, until it finishes;
//! - `P:call:<id>:out` — the output of a call that succeeded;
//! - `P:calls:queue` — ids accepted and not yet taken (pushed left, taken
//!   right: oldest first);
//! - `P:calls:running:<node>` — ids a node has taken and not finished. The
//!   node's heartbeat is the lease on all of them: when its membership key
//!   expires, any other node moves them back to the queue
//!   ([`CallQueue::requeue_from`]), so the calls of a killed node run
//!   again elsewhere. At least once.
//!
//! Finished records (and outputs) expire after the retention time.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use crate::{ClusterError, redis_error};

/// Queue a call unless the queue is full: record, input and queue entry
/// in one step. Returns 0 when full.
const ACCEPT: &str = r"
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('LPUSH', KEYS[1], ARGV[4])
return 1
";

#[derive(Clone)]
pub struct CallQueue {
    conn: ConnectionManager,
    prefix: String,
    accept: Script,
}

impl std::fmt::Debug for CallQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallQueue").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// A call a node has taken from the queue.
#[derive(Debug)]
pub struct TakenCall {
    pub id: String,
    /// None if the record has expired or was never written.
    pub record: Option<Vec<u8>>,
    pub input: Vec<u8>,
}

impl CallQueue {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self { conn, prefix: prefix.to_string(), accept: Script::new(ACCEPT) }
    }

    fn record_key(&self, id: &str) -> String {
        format!("{}:call:{id}", self.prefix)
    }

    fn queue_key(&self) -> String {
        format!("{}:calls:queue", self.prefix)
    }

    fn running_key(&self, node: &str) -> String {
        format!("{}:calls:running:{node}", self.prefix)
    }

    /// Queue a call; false when `max_queued` calls wait already.
    pub async fn accept(&self, id: &str, record: &[u8], input: &[u8], max_queued: usize) -> Result<bool, ClusterError> {
        let key = self.record_key(id);
        let accepted: i64 = self
            .accept
            .key(self.queue_key())
            .key(&key)
            .key(format!("{key}:in"))
            .arg(max_queued)
            .arg(record)
            .arg(input)
            .arg(id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(accepted == 1)
    }

    /// Take the oldest queued call for `node`, holding it under the node's
    /// lease; None when the queue is empty.
    pub async fn take(&self, node: &str) -> Result<Option<TakenCall>, ClusterError> {
        let mut conn = self.conn.clone();
        let id: Option<String> = redis::cmd("LMOVE")
            .arg(self.queue_key())
            .arg(self.running_key(node))
            .arg("RIGHT")
            .arg("LEFT")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let Some(id) = id else { return Ok(None) };
        let key = self.record_key(&id);
        let (record, input): (Option<Vec<u8>>, Option<Vec<u8>>) =
            conn.mget(&[&key, &format!("{key}:in")]).await.map_err(redis_error)?;
        Ok(Some(TakenCall { id, record, input: input.unwrap_or_default() }))
    }

    /// Replace the record of a call still running.
    pub async fn update(&self, id: &str, record: &[u8]) -> Result<(), ClusterError> {
        self.conn.clone().set(self.record_key(id), record).await.map_err(redis_error)
    }

    /// A call `node` ran has finished: its record (and output) kept for
    /// `retention`, its input dropped, its lease released; one step.
    pub async fn finish(
        &self,
        node: &str,
        id: &str,
        record: &[u8],
        output: Option<&[u8]>,
        retention: Duration,
    ) -> Result<(), ClusterError> {
        let key = self.record_key(id);
        let ttl = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("SET").arg(&key).arg(record).arg("PX").arg(ttl).ignore();
        if let Some(output) = output {
            pipe.cmd("SET").arg(format!("{key}:out")).arg(output).arg("PX").arg(ttl).ignore();
        }
        pipe.del(format!("{key}:in")).ignore().lrem(self.running_key(node), 1, id).ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await.map_err(redis_error)
    }

    /// Give up `node`'s lease on a call it will not run (its record is
    /// gone or finished already).
    pub async fn release(&self, node: &str, id: &str) -> Result<(), ClusterError> {
        self.conn.clone().lrem(self.running_key(node), 1, id).await.map_err(redis_error)
    }

    /// The record of a call and, if it succeeded, its output.
    pub async fn get(&self, id: &str) -> Result<Option<(Vec<u8>, Option<Vec<u8>>)>, ClusterError> {
        let key = self.record_key(id);
        let (record, output): (Option<Vec<u8>>, Option<Vec<u8>>) =
            self.conn.clone().mget(&[&key, &format!("{key}:out")]).await.map_err(redis_error)?;
        Ok(record.map(|record| (record, output)))
    }

    /// Calls queued and not taken.
    pub async fn queued(&self) -> Result<usize, ClusterError> {
        self.conn.clone().llen(self.queue_key()).await.map_err(redis_error)
    }

    /// Nodes holding leases on calls (whether or not they are alive).
    pub async fn lease_holders(&self) -> Result<Vec<String>, ClusterError> {
        let mut conn = self.conn.clone();
        let pattern = self.running_key("*");
        let strip = self.running_key("");
        let mut nodes = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            nodes.extend(keys.into_iter().filter_map(|k| k.strip_prefix(&strip).map(str::to_string)));
            if next == 0 {
                return Ok(nodes);
            }
            cursor = next;
        }
    }

    /// Put every call `node` holds back on the queue (to be taken first):
    /// the node is gone. Safe to run from several nodes at once: each call
    /// moves once. Returns how many moved.
    pub async fn requeue_from(&self, node: &str) -> Result<usize, ClusterError> {
        let mut conn = self.conn.clone();
        let mut moved = 0;
        loop {
            let id: Option<String> = redis::cmd("LMOVE")
                .arg(self.running_key(node))
                .arg(self.queue_key())
                .arg("RIGHT")
                .arg("RIGHT")
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            if id.is_none() {
                return Ok(moved);
            }
            moved += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect;
    use shoal_testkit::RedisServer;

    #[tokio::test]
    async fn calls_are_taken_oldest_first_and_a_dead_nodes_calls_go_back_to_the_queue() {
        let redis = RedisServer::start();
        let queue = CallQueue::new(connect(&redis.url(), Duration::from_secs(1)).await.unwrap(), "t");
        for i in 0..3 {
            assert!(queue.accept(&format!("c{i}"), b"queued", format!("in{i}").as_bytes(), 3).await.unwrap());
        }
        assert!(!queue.accept("c3", b"queued", b"", 3).await.unwrap(), "the queue holds 3");
        assert_eq!(queue.get("c3").await.unwrap(), None, "a refused call leaves nothing");
        let first = queue.take("n1").await.unwrap().unwrap();
        assert_eq!((first.id.as_str(), first.input.as_slice()), ("c0", &b"in0"[..]));
        assert_eq!(first.record.as_deref(), Some(&b"queued"[..]));
        let second = queue.take("n2").await.unwrap().unwrap();
        assert_eq!(second.id, "c1");
        queue.finish("n1", "c0", b"done", Some(b"out"), Duration::from_secs(60)).await.unwrap();
        assert_eq!(queue.get("c0").await.unwrap(), Some((b"done".to_vec(), Some(b"out".to_vec()))));

        // n2 dies holding c1: it goes back to the head of the queue.
        let mut holders = queue.lease_holders().await.unwrap();
        holders.sort();
        assert_eq!(holders, ["n2"], "n1 released its lease when it finished");
        assert_eq!(queue.requeue_from("n2").await.unwrap(), 1);
        assert_eq!(queue.requeue_from("n2").await.unwrap(), 0, "moved once");
        assert_eq!(queue.queued().await.unwrap(), 2);
        assert_eq!(queue.take("n1").await.unwrap().unwrap().id, "c1", "the requeued call is taken first");
        assert_eq!(queue.take("n1").await.unwrap().unwrap().id, "c2");
        assert!(queue.take("n1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn finished_records_expire_after_the_retention() {
        let redis = RedisServer::start();
        let queue = CallQueue::new(connect(&redis.url(), Duration::from_secs(1)).await.unwrap(), "t");
        assert!(queue.accept("c", b"queued", b"x", 10).await.unwrap());
        queue.take("n").await.unwrap().unwrap();
        queue.finish("n", "c", b"failed", None, Duration::from_secs(2)).await.unwrap();
        assert_eq!(queue.get("c").await.unwrap(), Some((b"failed".to_vec(), None)));
        let started = std::time::Instant::now();
        while queue.get("c").await.unwrap().is_some() {
            assert!(started.elapsed() < Duration::from_secs(20), "the record never expired");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
