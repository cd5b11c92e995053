//! Usage in a cluster: every node adds what its calls used to one hash per
//! tenant and minute (`HINCRBY`, so the nodes' sums add up and nothing is
//! counted twice: each call is added by the node that ran it), which
//! expires after the retention time. A query reads one hash per minute of
//! its range, pipelined. Fields and their meaning are the node's.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::{ClusterError, redis_error};

/// Minutes read per round trip.
const READ_BATCH: usize = 512;

#[derive(Clone)]
pub struct SharedUsage {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for SharedUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedUsage").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// One row to add: tenant, Unix minute, and `(field, amount)` pairs.
pub type UsageRow = (String, u64, Vec<(String, u64)>);

impl SharedUsage {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self { conn, prefix: prefix.to_string() }
    }

    fn key(&self, tenant: &str, minute: u64) -> String {
        format!("{}:usage:{tenant}:{minute}", self.prefix)
    }

    /// Add `rows` and set `gauges` (fields whose value is the same
    /// whichever node writes it), in one pipeline, atomically; each
    /// minute's hash is kept for `retention` after its last write.
    pub async fn add(&self, rows: &[UsageRow], gauges: &[UsageRow], retention: Duration) -> Result<(), ClusterError> {
        if rows.is_empty() && gauges.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let keep = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        for (tenant, minute, fields) in rows {
            let key = self.key(tenant, *minute);
            for (field, amount) in fields {
                pipe.hincr(&key, field, *amount).ignore();
            }
            pipe.expire(&key, keep).ignore();
        }
        for (tenant, minute, fields) in gauges {
            let key = self.key(tenant, *minute);
            for (field, value) in fields {
                pipe.hset(&key, field, *value).ignore();
            }
            pipe.expire(&key, keep).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(redis_error)
    }

    /// `tenant`'s fields of each minute `from..to` that has any.
    pub async fn read(
        &self,
        tenant: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, HashMap<String, u64>)>, ClusterError> {
        let minutes: Vec<u64> = (from..to).collect();
        let mut out = Vec::new();
        let mut conn = self.conn.clone();
        for batch in minutes.chunks(READ_BATCH) {
            let mut pipe = redis::pipe();
            for minute in batch {
                pipe.hgetall(self.key(tenant, *minute));
            }
            let hashes: Vec<HashMap<String, u64>> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
            out.extend(batch.iter().copied().zip(hashes).filter(|(_, fields)| !fields.is_empty()));
        }
        Ok(out)
    }
}
