//! Queues of a cluster, in Redis: a stream per queue read by one consumer
//! group (each node a consumer), so any node takes a batch and a batch a
//! node leased and never settled is taken again by another once its lease
//! (the queue's visibility timeout) runs out (`XAUTOCLAIM`).
//!
//! Keys (under the cluster's prefix `P`, per queue `Q` = `tenant/queue`):
//! - `P:q:Q:s` — the stream; each entry names a message id (`m`); the
//!   group `c` reads it;
//! - `P:q:Q:m`, `P:q:Q:t`, `P:q:Q:a` — hashes, message id → body, send
//!   time (µs), attempts so far: a message's data lives here from its send
//!   to its acknowledgement (or purge), whatever stream entry carries it;
//! - `P:q:Q:d` — sorted set of retried message ids, by when they become
//!   visible again; a take moves those due back into the stream;
//! - `P:q:Q:x` — hash, message id → its death (JSON: when, why): dead
//!   letters keep their data in the hashes above until redriven or purged;
//! - `P:queues:held` — hash, `tenant:n` / `tenant:b` → messages and body
//!   bytes the tenant keeps (dead letters included), checked and added in
//!   the send script;
//! - `P:queues:seq` — the last message id given out (ids are its value in
//!   hex, 16 digits).
//!
//! At least once: a message is acknowledged (its data removed) only by a
//! settle after its consumer succeeded; a node that dies mid-batch leaves
//! its entries pending, and they are claimed again after the lease.

use redis::Script;
use redis::aio::ConnectionManager;

use crate::{ClusterError, redis_error};

/// The consumer group every node reads a queue's stream in.
const GROUP: &str = "c";

/// Send messages if the tenant stays within its limits. KEYS: stream,
/// bodies, times, held, seq; ARGV: tenant, most messages, most bytes, send
/// time (µs), bodies. `{"ok", ids…}` or `{"full", held messages, held
/// bytes}`.
const SEND: &str = r"
local n = #ARGV - 4
local bytes = 0
for i = 5, #ARGV do bytes = bytes + #ARGV[i] end
local held_n = tonumber(redis.call('HGET', KEYS[4], ARGV[1] .. ':n') or '0')
local held_b = tonumber(redis.call('HGET', KEYS[4], ARGV[1] .. ':b') or '0')
if held_n + n > tonumber(ARGV[2]) or held_b + bytes > tonumber(ARGV[3]) then
  return {'full', tostring(held_n), tostring(held_b)}
end
local last = redis.call('INCRBY', KEYS[5], n)
local out = {'ok'}
for i = 5, #ARGV do
  local id = string.format('%016x', last - n + (i - 4))
  redis.call('HSET', KEYS[2], id, ARGV[i])
  redis.call('HSET', KEYS[3], id, ARGV[4])
  redis.call('XADD', KEYS[1], '*', 'm', id)
  out[#out + 1] = id
end
redis.call('HINCRBY', KEYS[4], ARGV[1] .. ':n', n)
redis.call('HINCRBY', KEYS[4], ARGV[1] .. ':b', bytes)
return out
";

/// Take up to a batch for a node: retries that are due go back into the
/// stream, entries whose lease ran out are claimed, new ones read; each
/// taken message's attempts go up by one. KEYS: stream, bodies, times,
/// attempts, delayed; ARGV: node, batch, now (ms), lease (ms). A flat
/// list: entry id, message id, attempts, send time, body — per message.
const TAKE: &str = r"
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', ARGV[3], 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[5], id)
  redis.call('XADD', KEYS[1], '*', 'm', id)
end
local want = tonumber(ARGV[2])
local out = {}
local taken = 0
local function take(entry)
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
if taken < want then
  local read = redis.call('XREADGROUP', 'GROUP', 'c', ARGV[1], 'COUNT', want - taken, 'STREAMS', KEYS[1], '>')
  if read then
    for _, entry in ipairs(read[1][2]) do take(entry) end
  end
end
return out
";

/// Settle a batch's messages. KEYS: stream, bodies, times, attempts,
/// delayed, dead, held; ARGV: tenant, node, now (ms), then per message
/// four values: `a` (acknowledge), `r` (retry; the fourth is when it is
/// visible again) or `x` (dead; the fourth is why), entry id, message id,
/// that value. A retry or death of an entry this node no longer holds (it
/// was claimed by another after its lease) is left to that one. Returns
/// acknowledged, retried, dead.
const SETTLE: &str = r"
local acked, retried, died = 0, 0, 0
local function mine(entry)
  local pending = redis.call('XPENDING', KEYS[1], 'c', entry, entry, 1)
  return pending[1] and pending[1][2] == ARGV[2]
end
for i = 4, #ARGV, 4 do
  local kind, entry, id, extra = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if kind == 'a' then
    redis.call('XACK', KEYS[1], 'c', entry)
    redis.call('XDEL', KEYS[1], entry)
    local size = redis.call('HSTRLEN', KEYS[2], id)
    if redis.call('HDEL', KEYS[2], id) == 1 then
      redis.call('HDEL', KEYS[3], id)
      redis.call('HDEL', KEYS[4], id)
      redis.call('HINCRBY', KEYS[7], ARGV[1] .. ':n', -1)
      redis.call('HINCRBY', KEYS[7], ARGV[1] .. ':b', -size)
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
      died = died + 1
    end
  end
end
return {acked, retried, died}
";

/// Send up to 1,000 dead letters back to the stream (attempts from 0), or
/// purge them (ARGV[2] = '1'). KEYS: stream, bodies, times, attempts,
/// dead, held; ARGV: tenant, purge. How many.
const SETTLE_DEAD: &str = r"
local scanned = redis.call('HSCAN', KEYS[5], '0', 'COUNT', 1000)
local ids = {}
for i = 1, #scanned[2], 2 do ids[#ids + 1] = scanned[2][i] end
for _, id in ipairs(ids) do
  redis.call('HDEL', KEYS[5], id)
  if ARGV[2] == '1' then
    local size = redis.call('HSTRLEN', KEYS[2], id)
    if redis.call('HDEL', KEYS[2], id) == 1 then
      redis.call('HINCRBY', KEYS[6], ARGV[1] .. ':n', -1)
      redis.call('HINCRBY', KEYS[6], ARGV[1] .. ':b', -size)
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

/// What a queue holds: messages waiting or in flight, dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueCounts {
    pub messages: u64,
    pub dead: u64,
}

#[derive(Clone)]
pub struct SharedQueues {
    conn: ConnectionManager,
    prefix: String,
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

    /// Make the queue's stream and group (idempotent).
    pub async fn create(&self, queue: &str) -> Result<(), ClusterError> {
        let made: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.key(queue, "s"))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match made {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other.map_err(redis_error),
        }
    }

    /// Send `bodies` to `queue` of `tenant` (at `sent_us`), unless the
    /// tenant would keep more than `most_messages` or `most_bytes`: their
    /// ids, or `Err((held messages, held bytes))`.
    pub async fn send(
        &self,
        queue: &str,
        tenant: &str,
        bodies: &[Vec<u8>],
        sent_us: u64,
        (most_messages, most_bytes): (u64, u64),
    ) -> Result<Result<Vec<String>, (u64, u64)>, ClusterError> {
        let mut script = self.send.prepare_invoke();
        script
            .key(self.key(queue, "s"))
            .key(self.key(queue, "m"))
            .key(self.key(queue, "t"))
            .key(self.held_key())
            .key(format!("{}:queues:seq", self.prefix))
            .arg(tenant)
            .arg(most_messages)
            .arg(most_bytes)
            .arg(sent_us);
        for body in bodies {
            script.arg(body.as_slice());
        }
        let mut answer: Vec<String> = script.invoke_async(&mut self.conn.clone()).await.map_err(redis_error)?;
        if answer.first().map(String::as_str) == Some("ok") {
            answer.remove(0);
            return Ok(Ok(answer));
        }
        let number = |i: usize| answer.get(i).and_then(|n| n.parse().ok()).unwrap_or(0);
        Ok(Err((number(1), number(2))))
    }

    /// Take up to `batch` messages of `queue` for `node`, leasing them for
    /// `lease_ms`.
    pub async fn take(
        &self,
        queue: &str,
        node: &str,
        batch: usize,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Vec<TakenMessage>, ClusterError> {
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
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        Ok(flat
            .chunks_exact(5)
            .map(|m| TakenMessage {
                entry: text(&m[0]),
                id: text(&m[1]),
                attempts: text(&m[2]).parse().unwrap_or(0),
                sent_us: text(&m[3]).parse().unwrap_or(0),
                body: m[4].clone(),
            })
            .collect())
    }

    /// Settle taken messages of `tenant`'s `queue` (as `node`); returns
    /// how many were acknowledged, retried and dead.
    pub async fn settle(
        &self,
        queue: &str,
        tenant: &str,
        node: &str,
        now_ms: u64,
        settled: &[(&TakenMessage, Settle)],
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
            .arg(tenant)
            .arg(node)
            .arg(now_ms);
        for (message, outcome) in settled {
            let (kind, extra) = match outcome {
                Settle::Ack => ("a", String::new()),
                Settle::Retry(at) => ("r", at.to_string()),
                Settle::Dead(why) => ("x", why.clone()),
            };
            script.arg(kind).arg(&message.entry).arg(&message.id).arg(extra);
        }
        let (acked, retried, died): (u64, u64, u64) =
            script.invoke_async(&mut self.conn.clone()).await.map_err(redis_error)?;
        Ok((acked, retried, died))
    }

    /// What `queue` holds now.
    pub async fn counts(&self, queue: &str) -> Result<QueueCounts, ClusterError> {
        let (kept, dead): (u64, u64) = redis::pipe()
            .hlen(self.key(queue, "m"))
            .hlen(self.key(queue, "x"))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(QueueCounts { messages: kept.saturating_sub(dead), dead })
    }

    /// Up to `limit` dead letters.
    pub async fn dead(&self, queue: &str, limit: usize) -> Result<Vec<DeadMessage>, ClusterError> {
        let mut conn = self.conn.clone();
        let (_, entries): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(self.key(queue, "x"))
            .arg(0)
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut out = Vec::new();
        for (id, death) in entries.into_iter().take(limit) {
            let (body, sent, attempts): (Option<Vec<u8>>, Option<u64>, Option<u32>) = redis::pipe()
                .hget(self.key(queue, "m"), &id)
                .hget(self.key(queue, "t"), &id)
                .hget(self.key(queue, "a"), &id)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            let death: serde_json::Value = serde_json::from_str(&death).unwrap_or_default();
            out.push(DeadMessage {
                id,
                attempts: attempts.unwrap_or(0),
                sent_us: sent.unwrap_or(0),
                died_ms: death["died_ms"].as_u64().unwrap_or(0),
                error: death["error"].as_str().unwrap_or_default().to_string(),
                body: body.unwrap_or_default(),
            });
        }
        Ok(out)
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
            .arg(tenant)
            .arg(if purge { "1" } else { "0" })
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

    #[tokio::test]
    async fn messages_are_taken_once_leased_retried_dead_and_taken_again_after_a_lease() {
        let redis = RedisServer::start();
        let conn = connect(&redis.url(), Duration::from_secs(1)).await.unwrap();
        let queues = SharedQueues::new(conn, "k");
        queues.create("a/q").await.unwrap();
        queues.create("a/q").await.unwrap();
        let bodies: Vec<Vec<u8>> = (0..5).map(|i| format!("m{i}").into_bytes()).collect();
        let ids = queues.send("a/q", "a", &bodies, 1000, (10, 1000)).await.unwrap().unwrap();
        assert_eq!(ids.len(), 5);
        assert_eq!(
            queues.send("a/q", "a", &bodies[..], 1000, (9, 1000)).await.unwrap(),
            Err((5, 10)),
            "over its limit"
        );
        // Two nodes take in turn: each message once.
        let x = queues.take("a/q", "n1", 3, 0, 60_000).await.unwrap();
        let y = queues.take("a/q", "n2", 3, 0, 60_000).await.unwrap();
        assert_eq!((x.len(), y.len()), (3, 2));
        let mut taken: Vec<&str> = x.iter().chain(&y).map(|m| m.id.as_str()).collect();
        taken.sort_unstable();
        assert_eq!(taken, ids.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(x.iter().chain(&y).all(|m| m.attempts == 1 && m.sent_us == 1000));
        assert_eq!(queues.take("a/q", "n1", 10, 0, 60_000).await.unwrap(), vec![], "all leased");
        // n1 acknowledges its first, retries the next (visible at 5000), kills one.
        let plan: Vec<(&TakenMessage, Settle)> =
            x.iter().zip([Settle::Ack, Settle::Retry(5000), Settle::Dead("poison".into())]).collect();
        let (acked, retried, died) = queues.settle("a/q", "a", "n1", 100, &plan).await.unwrap();
        assert_eq!((acked, retried, died), (1, 1, 1));
        // Another node cannot settle n2's messages but as acknowledgements.
        let stolen: Vec<(&TakenMessage, Settle)> = y.iter().map(|m| (m, Settle::Retry(0))).collect();
        assert_eq!(queues.settle("a/q", "a", "n1", 100, &stolen).await.unwrap(), (0, 0, 0));
        // The retry is taken again once due (attempt 2), not before.
        assert_eq!(queues.take("a/q", "n1", 10, 4999, 60_000).await.unwrap(), vec![]);
        let again = queues.take("a/q", "n1", 10, 5000, 60_000).await.unwrap();
        assert_eq!((again.len(), again[0].id.as_str(), again[0].attempts), (1, x[1].id.as_str(), 2));
        queues.settle("a/q", "a", "n1", 100, &[(&again[0], Settle::Ack)]).await.unwrap();
        // n2 dies holding its messages: after the lease (1 ms here) n1 claims them.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let claimed = queues.take("a/q", "n1", 10, 6000, 1).await.unwrap();
        assert_eq!(claimed.len(), y.len());
        assert!(claimed.iter().all(|m| m.attempts == 2));
        let acks: Vec<(&TakenMessage, Settle)> = claimed.iter().map(|m| (m, Settle::Ack)).collect();
        queues.settle("a/q", "a", "n1", 100, &acks).await.unwrap();
        assert_eq!(queues.counts("a/q").await.unwrap(), QueueCounts { messages: 0, dead: 1 });
        // The dead letter, redriven, comes back with its attempts from 0; then purged.
        let dead = queues.dead("a/q", 10).await.unwrap();
        assert_eq!((dead.len(), dead[0].id.as_str(), dead[0].error.as_str()), (1, x[2].id.as_str(), "poison"));
        assert_eq!((dead[0].attempts, dead[0].body.as_slice()), (1, x[2].body.as_slice()));
        assert_eq!(queues.settle_dead("a/q", "a", false).await.unwrap(), 1);
        let back = queues.take("a/q", "n1", 10, 7000, 60_000).await.unwrap();
        assert_eq!((back.len(), back[0].attempts), (1, 1));
        queues.settle("a/q", "a", "n1", 100, &[(&back[0], Settle::Dead("again".into()))]).await.unwrap();
        assert_eq!(queues.settle_dead("a/q", "a", true).await.unwrap(), 1);
        assert_eq!(queues.counts("a/q").await.unwrap(), QueueCounts::default());
        // Everything given back: the tenant may send its whole limit again.
        let ten: Vec<Vec<u8>> = (0..10).map(|_| b"x".to_vec()).collect();
        assert!(queues.send("a/q", "a", &ten, 0, (10, 10)).await.unwrap().is_ok());
    }
}
