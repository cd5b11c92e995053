//! Queues of a cluster, in Redis: a stream per queue read by one consumer
//! group (each node a consumer), so any node takes a batch and a batch a
//! node leased and never settled is taken again by another once its lease
//! (the queue's visibility timeout) runs out (`XAUTOCLAIM`).
//!
//! Keys (under the cluster's prefix `P`, per queue `Q` = `tenant/queue`):
//! - `P:queues` — hash, `Q` → the queue's settings (JSON, as the node
//!   wrote them), which every node mirrors to run a consumer loop;
//!   `P:queues:count` — hash, tenant → its queues (capped in the write's
//!   script); `P:queues:version` — bumped by every change of a setting;
//! - `P:q:Q:s` — the stream; each entry names a message id (`m`); the
//!   group `c` reads it;
//! - `P:q:Q:m`, `P:q:Q:t`, `P:q:Q:a` — hashes, message id → body, send
//!   time (µs), attempts so far: a message's data lives here from its send
//!   to its acknowledgement (or purge), whatever stream entry carries it;
//! - `P:q:Q:d` — sorted set of retried message ids, by when they become
//!   visible again; a take moves those due back into the stream;
//! - `P:q:Q:x` — hash, message id → its death (JSON: when, why), and
//!   `P:q:Q:o` — sorted set of the same ids by when they died (dead
//!   letters are listed, redriven and purged oldest first from it): dead
//!   letters keep their data in the hashes above until redriven or purged;
//! - `P:queues:held` — hash, `tenant:n` / `tenant:b` → messages and body
//!   bytes the tenant keeps (dead letters included), checked and added in
//!   the send script; `Q:b` → the body bytes the queue keeps;
//! - `P:queues:seq` — the last message id given out (ids are its value in
//!   hex, 16 digits).
//!
//! At least once: a message is acknowledged (its data removed) only by a
//! settle after its consumer succeeded; a node that dies mid-batch leaves
//! its entries pending, and they are claimed again after the lease.

use redis::Script;
use redis::aio::ConnectionManager;

use crate::{ClusterError, redis_error};

/// Write a queue's settings (making its stream and group) unless its
/// tenant has `max` queues already, or is not (or no longer) a tenant in
/// the cluster's registry. KEYS: configs, count, version, stream, tenants;
/// ARGV: queue, record, tenant, max. 1 created, 2 replaced, 0 full, -1 no
/// such tenant (its deletion begun: none of its queues can be made after
/// the deletion listed them).
const PUT: &str = r"
local tenant = redis.call('HGET', KEYS[5], ARGV[3])
if not tenant then return -1 end
local deleting = cjson.decode(tenant)['deleting_since_ms']
if deleting ~= nil and deleting ~= cjson.null then return -1 end
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
if not exists then
  if tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0') >= tonumber(ARGV[4]) then return 0 end
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.pcall('XGROUP', 'CREATE', KEYS[4], 'c', '0', 'MKSTREAM')
redis.call('INCR', KEYS[3])
if exists then return 2 end
return 1
";

/// Remove a queue with everything it holds, giving its tenant's held
/// messages and bytes back. KEYS: configs, count, version, held, then the
/// queue's stream, bodies, times, attempts, delayed, dead, dead by time; ARGV: queue,
/// tenant. 1 if there was one. (Counts go down by `0 - n`, never `-n`:
/// Lua's `-0` reaches Redis as "-0", which `HINCRBY` refuses.)
const REMOVE: &str = r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
local n = redis.call('HLEN', KEYS[6])
local b = tonumber(redis.call('HGET', KEYS[4], ARGV[1] .. ':b') or '0')
redis.call('HINCRBY', KEYS[4], ARGV[2] .. ':n', 0 - n)
redis.call('HINCRBY', KEYS[4], ARGV[2] .. ':b', 0 - b)
redis.call('HDEL', KEYS[4], ARGV[1] .. ':b')
redis.call('UNLINK', KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11])
redis.call('INCR', KEYS[3])
return 1
";

/// Send messages if the queue exists and the tenant stays within its
/// limits. KEYS: stream, bodies, times, held, seq, configs; ARGV: tenant,
/// most messages, most bytes, send time (µs), queue, bodies. `{"ok",
/// ids…}`, `{"full", held messages, held bytes}` or `{"gone"}`.
const SEND: &str = r"
if redis.call('HEXISTS', KEYS[6], ARGV[5]) == 0 then return {'gone'} end
local n = #ARGV - 5
local bytes = 0
for i = 6, #ARGV do bytes = bytes + #ARGV[i] end
local held_n = tonumber(redis.call('HGET', KEYS[4], ARGV[1] .. ':n') or '0')
local held_b = tonumber(redis.call('HGET', KEYS[4], ARGV[1] .. ':b') or '0')
if held_n + n > tonumber(ARGV[2]) or held_b + bytes > tonumber(ARGV[3]) then
  return {'full', tostring(held_n), tostring(held_b)}
end
local last = redis.call('INCRBY', KEYS[5], n)
local out = {'ok'}
for i = 6, #ARGV do
  local id = string.format('%016x', last - n + (i - 5))
  redis.call('HSET', KEYS[2], id, ARGV[i])
  redis.call('HSET', KEYS[3], id, ARGV[4])
  redis.call('XADD', KEYS[1], '*', 'm', id)
  out[#out + 1] = id
end
redis.call('HINCRBY', KEYS[4], ARGV[1] .. ':n', n)
redis.call('HINCRBY', KEYS[4], ARGV[1] .. ':b', bytes)
redis.call('HINCRBY', KEYS[4], ARGV[5] .. ':b', bytes)
return out
";

/// Take up to a batch for a node: retries that are due go back into the
/// stream, entries whose lease ran out are claimed, new ones read — but
/// new ones only once a whole batch waits or the oldest has waited
/// `wait` ms (by Redis's clock, which stamped the entries). Each taken
/// message's attempts go up by one. KEYS: stream, bodies, times,
/// attempts, delayed; ARGV: node, batch, now (ms), lease (ms), wait (ms).
/// A flat list: first how long until something may be taken when
/// nothing was (ms; -1: nothing waits), then per message its entry id,
/// message id, attempts, send time, body.
const TAKE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'-1'} end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', ARGV[3], 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[5], id)
  redis.call('XADD', KEYS[1], '*', 'm', id)
end
local want = tonumber(ARGV[2])
local out = {'0'}
local taken, seen = 0, 0
local function take(entry)
  seen = seen + 1
  local id = entry[2][2]
  local body = redis.call('HGET', KEYS[2], id)
  if not body then
    -- Settled already (a delivery that ran past its lease).
    redis.call('XACK', KEYS[1], 'c', entry[1])
    redis.call('XDEL', KEYS[1], entry[1])
    return
  end
  local attempts = redis.call('HINCRBY', KEYS[4], id, 1)
  local sent = redis.call('HGET', KEYS[3], id) or '0'
  out[#out + 1] = entry[1]
  out[#out + 1] = id
  out[#out + 1] = tostring(attempts)
  out[#out + 1] = sent
  out[#out + 1] = body
  taken = taken + 1
end
local claimed = redis.call('XAUTOCLAIM', KEYS[1], 'c', ARGV[1], ARGV[4], '0-0', 'COUNT', want)
for _, entry in ipairs(claimed[2]) do
  if entry and entry[2] then take(entry) end
end
if taken >= want then return out end
-- Hold new entries back until a batch is whole or its oldest waited.
local hint = -1
local wait = tonumber(ARGV[5])
if taken == 0 and wait > 0 then
  local last = '0-0'
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local fields = {}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    if fields['name'] == 'c' then last = fields['last-delivered-id'] end
  end
  local fresh = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', want)
  if #fresh > 0 and #fresh < want then
    local clock = redis.call('TIME')
    local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
    local oldest = tonumber(string.match(fresh[1][1], '^(%d+)'))
    if oldest + wait > now then hint = oldest + wait - now end
  end
end
if hint == -1 then
  local read = redis.call('XREADGROUP', 'GROUP', 'c', ARGV[1], 'COUNT', want - taken, 'STREAMS', KEYS[1], '>')
  if read then
    for _, entry in ipairs(read[1][2]) do take(entry) end
  end
end
if taken == 0 and seen > 0 then
  -- Only settled entries were read: more may be waiting behind them.
  out[1] = '0'
  return out
end
if taken == 0 then
  local due = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
  if due[2] then
    local until_due = math.max(1, tonumber(due[2]) - tonumber(ARGV[3]))
    if hint == -1 or until_due < hint then hint = until_due end
  end
  out[1] = tostring(hint)
end
return out
";

/// Settle a batch's messages. KEYS: stream, bodies, times, attempts,
/// delayed, dead, held, dead by time; ARGV: tenant, node, now (ms), queue, then per
/// message four values: `a` (acknowledge), `r` (retry; the fourth is when it is
/// visible again) or `x` (dead; the fourth is why), entry id, message id,
/// that value. A retry or death of an entry this node no longer holds (it
/// was claimed by another after its lease) is left to that one. Returns
/// acknowledged, retried, dead.
const SETTLE: &str = r"
local acked, retried, died = 0, 0, 0
if redis.call('EXISTS', KEYS[1]) == 0 then return {acked, retried, died} end
local function mine(entry)
  local pending = redis.call('XPENDING', KEYS[1], 'c', entry, entry, 1)
  return pending[1] and pending[1][2] == ARGV[2]
end
for i = 5, #ARGV, 4 do
  local kind, entry, id, extra = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if kind == 'a' then
    redis.call('XACK', KEYS[1], 'c', entry)
    redis.call('XDEL', KEYS[1], entry)
    local size = redis.call('HSTRLEN', KEYS[2], id)
    if redis.call('HDEL', KEYS[2], id) == 1 then
      redis.call('HDEL', KEYS[3], id)
      redis.call('HDEL', KEYS[4], id)
      -- Another node may have retried or buried it after this delivery's
      -- lease ran out: it is done all the same.
      redis.call('ZREM', KEYS[5], id)
      redis.call('HDEL', KEYS[6], id)
      redis.call('ZREM', KEYS[8], id)
      redis.call('HINCRBY', KEYS[7], ARGV[1] .. ':n', -1)
      redis.call('HINCRBY', KEYS[7], ARGV[1] .. ':b', 0 - size)
      redis.call('HINCRBY', KEYS[7], ARGV[4] .. ':b', 0 - size)
      acked = acked + 1
    end
  elseif mine(entry) then
    redis.call('XACK', KEYS[1], 'c', entry)
    redis.call('XDEL', KEYS[1], entry)
    if kind == 'r' then
      redis.call('ZADD', KEYS[5], extra, id)
      retried = retried + 1
    else
      redis.call('HSET', KEYS[6], id, cjson.encode({died_ms = tonumber(ARGV[3]), error = extra}))
      redis.call('ZADD', KEYS[8], ARGV[3], id)
      died = died + 1
    end
  end
end
return {acked, retried, died}
";

/// Send up to 1,000 dead letters, oldest first, back to the stream
/// (attempts from 0), or purge them (ARGV[2] = '1'). KEYS: stream,
/// bodies, times, attempts, dead, held, dead by time; ARGV: tenant, purge,
/// queue. How many.
const SETTLE_DEAD: &str = r"
local ids = redis.call('ZRANGE', KEYS[7], 0, 999)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[7], id)
  redis.call('HDEL', KEYS[5], id)
  if ARGV[2] == '1' then
    local size = redis.call('HSTRLEN', KEYS[2], id)
    if redis.call('HDEL', KEYS[2], id) == 1 then
      redis.call('HINCRBY', KEYS[6], ARGV[1] .. ':n', -1)
      redis.call('HINCRBY', KEYS[6], ARGV[1] .. ':b', 0 - size)
      redis.call('HINCRBY', KEYS[6], ARGV[3] .. ':b', 0 - size)
    end
    redis.call('HDEL', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
  else
    redis.call('HSET', KEYS[4], id, 0)
    redis.call('XADD', KEYS[1], '*', 'm', id)
  end
end
return #ids
";

/// A message a node took: its stream entry (to settle it by), its id,
/// attempts so far (this one included), send time (µs), body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenMessage {
    pub entry: String,
    pub id: String,
    pub attempts: u32,
    pub sent_us: u64,
    pub body: Vec<u8>,
}

/// What becomes of a taken message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    Ack,
    /// Visible again at this time (Unix ms).
    Retry(u64),
    /// Dead, and why.
    Dead(String),
}

/// A dead letter as Redis keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadMessage {
    pub id: String,
    pub attempts: u32,
    pub sent_us: u64,
    pub died_ms: u64,
    pub error: String,
    pub body: Vec<u8>,
}

/// What a queue holds: messages waiting or in flight, dead letters, and
/// the bytes of their bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueCounts {
    pub messages: u64,
    pub dead: u64,
    pub bytes: u64,
}

/// How a send went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// The messages' ids, in order.
    Ids(Vec<String>),
    /// The tenant would keep too much: what it holds (messages, bytes).
    Full(u64, u64),
    /// There is no such queue.
    Gone,
}

/// How a queue's settings were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuePut {
    Created,
    Replaced,
    /// Its tenant has its most queues already.
    TenantFull,
    /// Its tenant is not in the cluster's registry, or is being deleted.
    NoTenant,
}

/// What a take found: messages, or none and how long until some may be
/// taken (None: nothing waits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take {
    pub messages: Vec<TakenMessage>,
    pub retry_in_ms: Option<u64>,
}

#[derive(Clone)]
pub struct SharedQueues {
    conn: ConnectionManager,
    prefix: String,
    put: Script,
    remove: Script,
    send: Script,
    take: Script,
    settle: Script,
    settle_dead: Script,
}

impl std::fmt::Debug for SharedQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedQueues").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl SharedQueues {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_string(),
            put: Script::new(PUT),
            remove: Script::new(REMOVE),
            send: Script::new(SEND),
            take: Script::new(TAKE),
            settle: Script::new(SETTLE),
            settle_dead: Script::new(SETTLE_DEAD),
        }
    }

    fn key(&self, queue: &str, part: &str) -> String {
        format!("{}:q:{queue}:{part}", self.prefix)
    }

    fn held_key(&self) -> String {
        format!("{}:queues:held", self.prefix)
    }

    fn configs_key(&self, part: &str) -> String {
        format!("{}:queues{part}", self.prefix)
    }

    /// Create or replace the settings of `queue` (`tenant/name`) of
    /// `tenant`, unless that tenant has `max` queues already.
    pub async fn put(&self, queue: &str, tenant: &str, record: &[u8], max: usize) -> Result<QueuePut, ClusterError> {
        let done: i64 = self
            .put
            .key(self.configs_key(""))
            .key(self.configs_key(":count"))
            .key(self.configs_key(":version"))
            .key(self.key(queue, "s"))
            .key(format!("{}:tenants", self.prefix))
            .arg(queue)
            .arg(record)
            .arg(tenant)
            .arg(max)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(match done {
            1 => QueuePut::Created,
            2 => QueuePut::Replaced,
            0 => QueuePut::TenantFull,
            _ => QueuePut::NoTenant,
        })
    }

    /// Remove `queue` of `tenant` with every message and dead letter it
    /// holds; false if there was none.
    pub async fn remove(&self, queue: &str, tenant: &str) -> Result<bool, ClusterError> {
        let mut script = self.remove.key(self.configs_key(""));
        script.key(self.configs_key(":count")).key(self.configs_key(":version")).key(self.held_key());
        for part in ["s", "m", "t", "a", "d", "x", "o"] {
            script.key(self.key(queue, part));
        }
        let removed: i64 =
            script.arg(queue).arg(tenant).invoke_async(&mut self.conn.clone()).await.map_err(redis_error)?;
        Ok(removed == 1)
    }

    /// The settings' version (0: Redis has none).
    pub async fn version(&self) -> Result<u64, ClusterError> {
        crate::read_version(&self.conn, &self.configs_key(":version")).await
    }

    /// Every queue's settings, with the version they were read at.
    pub async fn all(&self) -> Result<(u64, Vec<(String, Vec<u8>)>), ClusterError> {
        crate::read_versioned_hash(&self.conn, &self.configs_key(":version"), &self.configs_key("")).await
    }

    /// One queue's settings, if it exists.
    pub async fn get(&self, queue: &str) -> Result<Option<Vec<u8>>, ClusterError> {
        redis::cmd("HGET")
            .arg(self.configs_key(""))
            .arg(queue)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)
    }

    /// Forget what `tenant` held (after its queues were removed).
    pub async fn forget_tenant(&self, tenant: &str) -> Result<(), ClusterError> {
        redis::cmd("HDEL")
            .arg(self.held_key())
            .arg(format!("{tenant}:n"))
            .arg(format!("{tenant}:b"))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(redis_error)
    }

    /// Send `bodies` to `queue` of `tenant` (at `sent_us`), unless the
    /// queue is gone or the tenant would keep more than `most_messages` or
    /// `most_bytes`.
    pub async fn send(
        &self,
        queue: &str,
        tenant: &str,
        bodies: &[Vec<u8>],
        sent_us: u64,
        (most_messages, most_bytes): (u64, u64),
    ) -> Result<Sent, ClusterError> {
        let mut script = self.send.prepare_invoke();
        script
            .key(self.key(queue, "s"))
            .key(self.key(queue, "m"))
            .key(self.key(queue, "t"))
            .key(self.held_key())
            .key(self.configs_key(":seq"))
            .key(self.configs_key(""))
            .arg(tenant)
            .arg(most_messages)
            .arg(most_bytes)
            .arg(sent_us)
            .arg(queue);
        for body in bodies {
            script.arg(body.as_slice());
        }
        let mut answer: Vec<String> = script.invoke_async(&mut self.conn.clone()).await.map_err(redis_error)?;
        let number = |answer: &[String], i: usize| answer.get(i).and_then(|n| n.parse().ok()).unwrap_or(0);
        Ok(match answer.first().map(String::as_str) {
            Some("ok") => {
                answer.remove(0);
                Sent::Ids(answer)
            }
            Some("full") => Sent::Full(number(&answer, 1), number(&answer, 2)),
            _ => Sent::Gone,
        })
    }

    /// Take up to `batch` messages of `queue` for `node`, leasing them for
    /// `lease_ms`; new messages only once a batch is whole or the oldest
    /// waited `wait_ms`.
    pub async fn take(
        &self,
        queue: &str,
        node: &str,
        batch: usize,
        (now_ms, lease_ms, wait_ms): (u64, u64, u64),
    ) -> Result<Take, ClusterError> {
        let flat: Vec<Vec<u8>> = self
            .take
            .key(self.key(queue, "s"))
            .key(self.key(queue, "m"))
            .key(self.key(queue, "t"))
            .key(self.key(queue, "a"))
            .key(self.key(queue, "d"))
            .arg(node)
            .arg(batch)
            .arg(now_ms)
            .arg(lease_ms)
            .arg(wait_ms)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let retry_in_ms =
            flat.first().and_then(|hint| text(hint).parse::<i64>().ok()).and_then(|h| u64::try_from(h).ok());
        let messages: Vec<TakenMessage> = flat
            .get(1..)
            .unwrap_or_default()
            .chunks_exact(5)
            .map(|m| TakenMessage {
                entry: text(&m[0]),
                id: text(&m[1]),
                attempts: text(&m[2]).parse().unwrap_or(0),
                sent_us: text(&m[3]).parse().unwrap_or(0),
                body: m[4].clone(),
            })
            .collect();
        let retry_in_ms = if messages.is_empty() { retry_in_ms } else { Some(0) };
        Ok(Take { messages, retry_in_ms })
    }

    /// Settle taken messages of `tenant`'s `queue` (as `node`), each by
    /// its stream entry, id and outcome; returns how many were
    /// acknowledged, retried and dead.
    pub async fn settle(
        &self,
        queue: &str,
        tenant: &str,
        node: &str,
        now_ms: u64,
        settled: &[(&str, &str, Settle)],
    ) -> Result<(u64, u64, u64), ClusterError> {
        let mut script = self.settle.prepare_invoke();
        script
            .key(self.key(queue, "s"))
            .key(self.key(queue, "m"))
            .key(self.key(queue, "t"))
            .key(self.key(queue, "a"))
            .key(self.key(queue, "d"))
            .key(self.key(queue, "x"))
            .key(self.held_key())
            .key(self.key(queue, "o"))
            .arg(tenant)
            .arg(node)
            .arg(now_ms)
            .arg(queue);
        for (entry, id, outcome) in settled {
            let (kind, extra) = match outcome {
                Settle::Ack => ("a", String::new()),
                Settle::Retry(at) => ("r", at.to_string()),
                Settle::Dead(why) => ("x", why.clone()),
            };
            script.arg(kind).arg(entry).arg(id).arg(extra);
        }
        let (acked, retried, died): (u64, u64, u64) =
            script.invoke_async(&mut self.conn.clone()).await.map_err(redis_error)?;
        Ok((acked, retried, died))
    }

    /// What `queue` holds now.
    pub async fn counts(&self, queue: &str) -> Result<QueueCounts, ClusterError> {
        let (kept, dead, bytes): (u64, u64, Option<i64>) = redis::pipe()
            .hlen(self.key(queue, "m"))
            .hlen(self.key(queue, "x"))
            .hget(self.held_key(), format!("{queue}:b"))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        let bytes = u64::try_from(bytes.unwrap_or(0)).unwrap_or(0);
        Ok(QueueCounts { messages: kept.saturating_sub(dead), dead, bytes })
    }

    /// Up to `limit` dead letters, oldest first.
    pub async fn dead(&self, queue: &str, limit: usize) -> Result<Vec<DeadMessage>, ClusterError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.key(queue, "o"))
            .arg(0)
            .arg(limit.saturating_sub(1))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        if ids.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hget(self.key(queue, "x"), id)
                .hget(self.key(queue, "m"), id)
                .hget(self.key(queue, "t"), id)
                .hget(self.key(queue, "a"), id);
        }
        type Row = (Option<String>, Option<Vec<u8>>, Option<u64>, Option<u32>);
        let rows: Vec<Row> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
        Ok(ids
            .into_iter()
            .zip(rows)
            .filter_map(|(id, (death, body, sent, attempts))| {
                let death: serde_json::Value = serde_json::from_str(&death?).unwrap_or_default();
                Some(DeadMessage {
                    id,
                    attempts: attempts.unwrap_or(0),
                    sent_us: sent.unwrap_or(0),
                    died_ms: death["died_ms"].as_u64().unwrap_or(0),
                    error: death["error"].as_str().unwrap_or_default().to_string(),
                    body: body.unwrap_or_default(),
                })
            })
            .collect())
    }

    /// Redrive (or, with `purge`, remove) up to 1,000 dead letters; how many.
    pub async fn settle_dead(&self, queue: &str, tenant: &str, purge: bool) -> Result<u64, ClusterError> {
        self.settle_dead
            .key(self.key(queue, "s"))
            .key(self.key(queue, "m"))
            .key(self.key(queue, "t"))
            .key(self.key(queue, "a"))
            .key(self.key(queue, "x"))
            .key(self.held_key())
            .key(self.key(queue, "o"))
            .arg(tenant)
            .arg(if purge { "1" } else { "0" })
            .arg(queue)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::connect;
    use shoal_testkit::RedisServer;

    /// Settle each of `taken` with the outcome beside it.
    fn plan(taken: &[TakenMessage], outcomes: impl IntoIterator<Item = Settle>) -> Vec<(&str, &str, Settle)> {
        taken.iter().zip(outcomes).map(|(m, o)| (m.entry.as_str(), m.id.as_str(), o)).collect()
    }

    #[tokio::test]
    async fn messages_are_taken_once_leased_retried_dead_and_taken_again_after_a_lease() {
        let redis = RedisServer::start();
        let conn = connect(&redis.url(), Duration::from_secs(1)).await.unwrap();
        let queues = SharedQueues::new(conn, "k");
        redis.command(&["HSET", "k:tenants", "a", r#"{"name":"a"}"#, "b", r#"{"name":"b","deleting_since_ms":1}"#]);
        // Only a tenant of the registry, not being deleted, gets a queue.
        assert_eq!(queues.put("z/q", "z", b"{}", 1).await.unwrap(), QueuePut::NoTenant);
        assert_eq!(queues.put("b/q", "b", b"{}", 1).await.unwrap(), QueuePut::NoTenant);
        let take = |node: &'static str, n: usize, now: u64, lease: u64| {
            let queues = queues.clone();
            async move { queues.take("a/q", node, n, (now, lease, 0)).await.unwrap().messages }
        };
        assert_eq!(queues.send("a/q", "a", &[b"x".to_vec()], 0, (10, 10)).await.unwrap(), Sent::Gone);
        assert_eq!(queues.put("a/q", "a", b"{}", 1).await.unwrap(), QueuePut::Created);
        assert_eq!(queues.put("a/q", "a", b"{}", 1).await.unwrap(), QueuePut::Replaced);
        assert_eq!(queues.put("a/r", "a", b"{}", 1).await.unwrap(), QueuePut::TenantFull);
        let bodies: Vec<Vec<u8>> = (0..5).map(|i| format!("m{i}").into_bytes()).collect();
        let Sent::Ids(ids) = queues.send("a/q", "a", &bodies, 1000, (10, 1000)).await.unwrap() else { panic!() };
        assert_eq!(ids.len(), 5);
        assert_eq!(queues.send("a/q", "a", &bodies[..], 1000, (9, 1000)).await.unwrap(), Sent::Full(5, 10));
        assert_eq!(queues.counts("a/q").await.unwrap(), QueueCounts { messages: 5, dead: 0, bytes: 10 });
        // Two nodes take in turn: each message once.
        let x = take("n1", 3, 0, 60_000).await;
        let y = take("n2", 3, 0, 60_000).await;
        assert_eq!((x.len(), y.len()), (3, 2));
        let mut taken: Vec<&str> = x.iter().chain(&y).map(|m| m.id.as_str()).collect();
        taken.sort_unstable();
        assert_eq!(taken, ids.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(x.iter().chain(&y).all(|m| m.attempts == 1 && m.sent_us == 1000));
        assert_eq!(
            queues.take("a/q", "n1", 10, (0, 60_000, 0)).await.unwrap(),
            Take { messages: vec![], retry_in_ms: None }
        );
        // n1 acknowledges its first, retries the next (visible at 5000), kills one.
        let outcomes = [Settle::Ack, Settle::Retry(5000), Settle::Dead("poison".into())];
        let (acked, retried, died) = queues.settle("a/q", "a", "n1", 100, &plan(&x, outcomes)).await.unwrap();
        assert_eq!((acked, retried, died), (1, 1, 1));
        // Another node cannot settle n2's messages but as acknowledgements.
        let stolen = plan(&y, std::iter::repeat(Settle::Retry(0)));
        assert_eq!(queues.settle("a/q", "a", "n1", 100, &stolen).await.unwrap(), (0, 0, 0));
        // The retry is taken again once due (attempt 2), not before: the
        // take says when.
        let early = queues.take("a/q", "n1", 10, (4990, 60_000, 0)).await.unwrap();
        assert_eq!((early.messages.len(), early.retry_in_ms), (0, Some(10)));
        let again = take("n1", 10, 5000, 60_000).await;
        assert_eq!((again.len(), again[0].id.as_str(), again[0].attempts), (1, x[1].id.as_str(), 2));
        queues.settle("a/q", "a", "n1", 100, &plan(&again, [Settle::Ack])).await.unwrap();
        // n2 dies holding its messages: after the lease (1 ms here) n1 claims them.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let claimed = take("n1", 10, 6000, 1).await;
        assert_eq!(claimed.len(), y.len());
        assert!(claimed.iter().all(|m| m.attempts == 2));
        let acks = plan(&claimed, std::iter::repeat(Settle::Ack));
        queues.settle("a/q", "a", "n1", 100, &acks).await.unwrap();
        assert_eq!(queues.counts("a/q").await.unwrap(), QueueCounts { messages: 0, dead: 1, bytes: 2 });
        // The dead letter, redriven, comes back with its attempts from 0; then purged.
        let dead = queues.dead("a/q", 10).await.unwrap();
        assert_eq!((dead.len(), dead[0].id.as_str(), dead[0].error.as_str()), (1, x[2].id.as_str(), "poison"));
        assert_eq!((dead[0].attempts, dead[0].body.as_slice()), (1, x[2].body.as_slice()));
        assert_eq!(queues.settle_dead("a/q", "a", false).await.unwrap(), 1);
        let back = take("n1", 10, 7000, 60_000).await;
        assert_eq!((back.len(), back[0].attempts), (1, 1));
        queues.settle("a/q", "a", "n1", 100, &plan(&back, [Settle::Dead("again".into())])).await.unwrap();
        assert_eq!(queues.settle_dead("a/q", "a", true).await.unwrap(), 1);
        assert_eq!(queues.counts("a/q").await.unwrap(), QueueCounts::default());
        // Everything given back: the tenant may send its whole limit again.
        let ten: Vec<Vec<u8>> = (0..10).map(|_| b"x".to_vec()).collect();
        assert!(matches!(queues.send("a/q", "a", &ten, 0, (10, 10)).await.unwrap(), Sent::Ids(_)));
    }

    #[tokio::test]
    async fn a_batch_waits_until_whole_or_old_and_a_removed_queue_gives_back_what_it_held() {
        let redis = RedisServer::start();
        let conn = connect(&redis.url(), Duration::from_secs(1)).await.unwrap();
        let queues = SharedQueues::new(conn, "k");
        redis.command(&["HSET", "k:tenants", "a", r#"{"name":"a"}"#]);
        queues.put("a/q", "a", b"{}", 10).await.unwrap();
        queues.put("a/r", "a", b"{}", 10).await.unwrap();
        let two = vec![b"ab".to_vec(), b"cd".to_vec()];
        assert!(matches!(queues.send("a/q", "a", &two, 0, (100, 100)).await.unwrap(), Sent::Ids(_)));
        // Two of a batch of three, waited for up to a minute: held back, and the take says for how long.
        let held = queues.take("a/q", "n1", 3, (0, 60_000, 60_000)).await.unwrap();
        assert!(held.messages.is_empty());
        assert!(held.retry_in_ms.is_some_and(|ms| (50_000..=60_000).contains(&ms)), "{held:?}");
        // A third makes the batch whole.
        assert!(matches!(queues.send("a/q", "a", &[b"e".to_vec()], 0, (100, 100)).await.unwrap(), Sent::Ids(_)));
        assert_eq!(queues.take("a/q", "n1", 3, (0, 60_000, 60_000)).await.unwrap().messages.len(), 3);
        // Two more, waited for 1 ms: taken once that has passed.
        queues.send("a/q", "a", &two, 0, (100, 100)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(queues.take("a/q", "n1", 3, (0, 60_000, 1)).await.unwrap().messages.len(), 2);
        queues.send("a/r", "a", &two, 0, (100, 100)).await.unwrap();
        // An empty message is taken and acknowledged like any other.
        assert!(matches!(queues.send("a/q", "a", &[Vec::new()], 0, (100, 100)).await.unwrap(), Sent::Ids(_)));
        let empty = queues.take("a/q", "n1", 3, (0, 60_000, 0)).await.unwrap().messages;
        assert_eq!((empty.len(), empty[0].body.len()), (1, 0));
        assert_eq!(queues.settle("a/q", "a", "n1", 0, &plan(&empty, [Settle::Ack])).await.unwrap(), (1, 0, 0));
        // Removed (with messages in flight): what it held is given back,
        // its keys are gone, sends and takes find nothing, and a late
        // settle of its messages changes nothing.
        let in_flight = queues.take("a/r", "n1", 3, (0, 60_000, 0)).await.unwrap().messages;
        assert!(queues.remove("a/q", "a").await.unwrap());
        assert!(!queues.remove("a/q", "a").await.unwrap());
        assert!(queues.remove("a/r", "a").await.unwrap());
        let settle = plan(&in_flight, std::iter::repeat(Settle::Retry(0)));
        assert_eq!(queues.settle("a/r", "a", "n1", 0, &settle).await.unwrap(), (0, 0, 0));
        assert_eq!(queues.send("a/q", "a", &two, 0, (100, 100)).await.unwrap(), Sent::Gone);
        assert_eq!(queues.take("a/q", "n1", 3, (0, 60_000, 0)).await.unwrap().messages, vec![]);
        let held: Vec<(String, i64)> =
            redis::cmd("HGETALL").arg("k:queues:held").query_async(&mut queues.conn.clone()).await.unwrap();
        assert!(held.iter().all(|(_, n)| *n == 0), "{held:?}");
        assert_eq!(redis.command(&["EXISTS", "k:q:a/q:s", "k:q:a/q:m", "k:q:a/r:m"]), ":0");
        assert_eq!(queues.all().await.unwrap().1, vec![]);
        assert!(queues.version().await.unwrap() >= 4);
    }

    #[tokio::test]
    async fn a_late_acknowledgement_settles_a_buried_message_and_dead_letters_go_back_oldest_first() {
        let redis = RedisServer::start();
        let conn = connect(&redis.url(), Duration::from_secs(1)).await.unwrap();
        let queues = SharedQueues::new(conn, "k");
        redis.command(&["HSET", "k:tenants", "a", r#"{"name":"a"}"#]);
        queues.put("a/q", "a", b"{}", 10).await.unwrap();
        queues.send("a/q", "a", &[b"late".to_vec()], 0, (10_000, 1 << 20)).await.unwrap();
        // n1's lease runs out; n2 claims the message and buries it; then
        // n1's consumer succeeds after all: the message is done, not dead.
        let first = queues.take("a/q", "n1", 1, (0, 60_000, 0)).await.unwrap().messages;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = queues.take("a/q", "n2", 1, (0, 1, 0)).await.unwrap().messages;
        assert_eq!((second.len(), second[0].attempts), (1, 2));
        queues.settle("a/q", "a", "n2", 5, &plan(&second, [Settle::Dead("no".into())])).await.unwrap();
        assert_eq!(queues.counts("a/q").await.unwrap(), QueueCounts { messages: 0, dead: 1, bytes: 4 });
        assert_eq!(queues.settle("a/q", "a", "n1", 6, &plan(&first, [Settle::Ack])).await.unwrap(), (1, 0, 0));
        assert_eq!(queues.counts("a/q").await.unwrap(), QueueCounts::default());
        assert_eq!(queues.dead("a/q", 10).await.unwrap(), vec![]);
        assert_eq!(queues.settle_dead("a/q", "a", true).await.unwrap(), 0);

        // 2,500 dead letters: listed, redriven and purged oldest first, a thousand at a time, to the last.
        let bodies: Vec<Vec<u8>> = (0..1000).map(|i| format!("d{i}").into_bytes()).collect();
        for _ in 0..3 {
            queues.send("a/q", "a", &bodies, 0, (10_000, 1 << 20)).await.unwrap();
        }
        let mut died = 0;
        while died < 2500 {
            let taken = queues.take("a/q", "n1", 500, (0, 60_000, 0)).await.unwrap().messages;
            let why = (died..).map(|n| Settle::Dead(format!("death {n}")));
            died += queues.settle("a/q", "a", "n1", died as u64, &plan(&taken, why)).await.unwrap().2 as usize;
        }
        let oldest = queues.dead("a/q", 3).await.unwrap();
        let errors: Vec<&str> = oldest.iter().map(|d| d.error.as_str()).collect();
        assert_eq!(errors, ["death 0", "death 1", "death 2"]);
        assert_eq!(queues.settle_dead("a/q", "a", false).await.unwrap(), 1000);
        assert_eq!(queues.dead("a/q", 1).await.unwrap()[0].error, "death 1000", "the oldest went back first");
        assert_eq!(queues.settle_dead("a/q", "a", true).await.unwrap(), 1000);
        assert_eq!(queues.settle_dead("a/q", "a", true).await.unwrap(), 500);
        assert_eq!(queues.settle_dead("a/q", "a", true).await.unwrap(), 0);
        let counts = queues.counts("a/q").await.unwrap();
        // The redriven thousand wait again, beside the 500 never taken.
        assert_eq!((counts.messages, counts.dead), (1500, 0));
    }
}
