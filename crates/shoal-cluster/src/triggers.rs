//! Cron triggers of a cluster, in Redis: the definitions every node
//! mirrors, and each trigger's progress (the last tick some node turned
//! into a call).
//!
//! Keys (under the cluster's prefix `P`):
//! - `P:triggers` — hash, `tenant/name` → the trigger's record (JSON, as
//!   the node wrote it);
//! - `P:triggers:count` — hash, tenant → how many triggers it has (its cap
//!   is checked in the same script as the write);
//! - `P:triggers:version` — bumped by every change, so a node polls one
//!   small key to know whether to read the hash again;
//! - `P:triggers:ticks` — hash, `tenant/name` → `"<tick ms> <call id>"`,
//!   the last tick accepted as a call. The call queue's accept script reads
//!   and writes it in the same step as the call it queues
//!   ([`crate::CallQueue::accept`] with a tick): a tick at or before the
//!   one recorded is refused, so every tick becomes at most one call,
//!   whichever nodes try it and whenever they die; so is a tick of a
//!   trigger that is gone (removed while a node was offering it).

use redis::Script;
use redis::aio::ConnectionManager;

use crate::{ClusterError, redis_error};

/// The hash of every trigger's record.
pub(crate) fn records_key(prefix: &str) -> String {
    format!("{prefix}:triggers")
}

/// The hash of every trigger's last accepted tick.
pub(crate) fn ticks_key(prefix: &str) -> String {
    format!("{prefix}:triggers:ticks")
}

/// Write a trigger's record unless its tenant already has `max` others.
/// KEYS: triggers, count, version; ARGV: key, record, tenant, max.
/// Returns 1 when created, 2 when replaced, 0 when the tenant is at its cap.
const PUT: &str = r"
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
if not exists then
  if tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0') >= tonumber(ARGV[4]) then return 0 end
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[3])
if exists then return 2 end
return 1
";

/// Remove a trigger and its progress. KEYS: triggers, count, version,
/// ticks; ARGV: key, tenant. Returns 1 if there was one.
const REMOVE: &str = r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('INCR', KEYS[3])
return 1
";

/// Put back triggers Redis lost (a node's mirror of them), unless a
/// record of that name is there. KEYS: triggers, count, version; ARGV:
/// pairs of key, record, tenant. Returns how many were put back.
const REPUBLISH: &str = r"
local n = 0
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[i + 2], 1)
    n = n + 1
  end
end
if n > 0 then redis.call('INCR', KEYS[3]) end
return n
";

/// How a trigger's write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerPut {
    Created,
    Replaced,
    /// Its tenant has its most triggers already.
    TenantFull,
}

#[derive(Clone)]
pub struct SharedTriggers {
    conn: ConnectionManager,
    prefix: String,
    put: Script,
    remove: Script,
    republish: Script,
}

impl std::fmt::Debug for SharedTriggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTriggers").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl SharedTriggers {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_string(),
            put: Script::new(PUT),
            remove: Script::new(REMOVE),
            republish: Script::new(REPUBLISH),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}:triggers{name}", self.prefix)
    }

    /// Create or replace the trigger `key` (`tenant/name`) of `tenant`,
    /// unless that tenant has `max` triggers already.
    pub async fn put(&self, key: &str, tenant: &str, record: &[u8], max: usize) -> Result<TriggerPut, ClusterError> {
        let done: i64 = self
            .put
            .key(self.key(""))
            .key(self.key(":count"))
            .key(self.key(":version"))
            .arg(key)
            .arg(record)
            .arg(tenant)
            .arg(max)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(match done {
            1 => TriggerPut::Created,
            2 => TriggerPut::Replaced,
            _ => TriggerPut::TenantFull,
        })
    }

    /// Remove the trigger `key` of `tenant` and its progress; false if
    /// there was none.
    pub async fn remove(&self, key: &str, tenant: &str) -> Result<bool, ClusterError> {
        let removed: i64 = self
            .remove
            .key(self.key(""))
            .key(self.key(":count"))
            .key(self.key(":version"))
            .key(ticks_key(&self.prefix))
            .arg(key)
            .arg(tenant)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(removed == 1)
    }

    /// The triggers' version (0: Redis has none, it lost them or never had any).
    pub async fn version(&self) -> Result<u64, ClusterError> {
        crate::read_version(&self.conn, &self.key(":version")).await
    }

    /// Every trigger's record, with the version they were read at.
    pub async fn all(&self) -> Result<(u64, Vec<(String, Vec<u8>)>), ClusterError> {
        crate::read_versioned_hash(&self.conn, &self.key(":version"), &self.key("")).await
    }

    /// The last accepted tick of each of `keys` (`"<tick ms> <call id>"`).
    pub async fn ticks(&self, keys: &[&str]) -> Result<Vec<Option<String>>, ClusterError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        redis::cmd("HMGET")
            .arg(ticks_key(&self.prefix))
            .arg(keys)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)
    }

    /// Put back triggers Redis lost: `(key, tenant, record)` each, unless
    /// a record of that key is there. Returns how many were put back.
    pub async fn republish(&self, triggers: &[(String, String, Vec<u8>)]) -> Result<usize, ClusterError> {
        if triggers.is_empty() {
            return Ok(0);
        }
        let mut script = self.republish.key(self.key(""));
        script.key(self.key(":count")).key(self.key(":version"));
        for (key, tenant, record) in triggers {
            script.arg(key).arg(record.as_slice()).arg(tenant);
        }
        let n: i64 = script.invoke_async(&mut self.conn.clone()).await.map_err(redis_error)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}
