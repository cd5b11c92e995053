//! Asynchronous calls of a cluster: a queue per tenant in Redis that any
//! node may take from, round robin by tenant, with a lease on every call a
//! node is running.
//!
//! Keys (under the cluster's prefix `P`):
//! - `P:call:<id>` — the call's record (JSON, as the node wrote it);
//! - `P:call:<id>:in` — its input, until it finishes;
//! - `P:call:<id>:out` — the output of a call that succeeded;
//! - `P:calls:queue:<tenant>` — a tenant's ids accepted and not yet taken
//!   (pushed left, taken right: oldest first);
//! - `P:calls:tenants` — the tenants with calls queued, in the order they
//!   are served: a take serves the first and moves it to the end, so a
//!   tenant with ten thousand calls queued and one with one call each get
//!   one call taken per round;
//! - `P:calls:queued` — calls queued in all (the cluster's limit);
//! - `P:calls:owner` — the tenant of every call accepted and not finished
//!   (for a requeue to find its tenant's queue);
//! - `P:calls:running:<node>` — ids a node has taken and not finished. The
//!   node's heartbeat is the lease on all of them: when its heartbeat runs
//!   out (its score in `P:members`, see `membership.rs`), any other node
//!   moves them back to their queues ([`CallQueue::requeue_from`], which
//!   does nothing while the heartbeat has time left), so the calls of a
//!   killed node run again elsewhere. At least once. A node finishes a
//!   call only while it still holds its lease, so a run whose lease was
//!   taken away never overwrites the outcome of the run that took over;
//! - `P:calls:holders` — set of the nodes whose running list is not empty,
//!   kept by the same scripts that fill and empty those lists (a take adds
//!   the node; a finish, release or requeue that empties its list removes
//!   it), so [`CallQueue::lease_holders`] reads one small set instead of
//!   scanning the keyspace for running lists;
//! - `P:calls:holders:complete` — set once the holders set is known to
//!   name every running list ([`CallQueue::adopt_older_leases`]).
//!
//! - `P:calls:kept:<tenant>` — sorted set of the tenant's call ids kept
//!   (queued, running, or finished and not expired), each scored by when
//!   its record expires (queued and running ones: never), pruned by each
//!   accept; with `P:calls:kept-bytes:<tenant>` (id → bytes of its kept
//!   output) and `P:calls:kept-out:<tenant>` (their sum): what a tenant
//!   keeps is counted without reading any record, and capped.
//!
//! Finished records (and outputs) expire after the retention time.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use crate::membership::{NOW_MS, members_key};
use crate::{ClusterError, redis_error};

/// `let_go(running, holders, node)`: after a call left a node's running
/// list, the node no longer holds leases if the list is empty (Redis
/// deletes an empty list), so it leaves the holders set.
const LET_GO: &str = r"
local function let_go(running, holders, node)
  if redis.call('LLEN', running) == 0 then redis.call('SREM', holders, node) end
end
";

/// Take the next tenant's oldest queued call under a node's lease, with
/// its record and input, in one step (nothing is leased that the node does
/// not also get), the node among the lease holders. KEYS: tenants,
/// running, queued, holders; ARGV: record prefix, queue prefix, node.
const TAKE: &str = r"
local tenant = redis.call('LMOVE', KEYS[1], KEYS[1], 'LEFT', 'RIGHT')
if not tenant then return false end
local queue = ARGV[2] .. tenant
local id = redis.call('LMOVE', queue, KEYS[2], 'RIGHT', 'LEFT')
if redis.call('LLEN', queue) == 0 then redis.call('LREM', KEYS[1], 0, tenant) end
if not id then return false end
redis.call('SADD', KEYS[4], ARGV[3])
redis.call('DECR', KEYS[3])
local record = redis.call('GET', ARGV[1] .. id)
local input = redis.call('GET', ARGV[1] .. id .. ':in')
return {id, record or '', input or '', record and 1 or 0}
";

/// Finish a call if the node still holds its lease: the outcome, kept for
/// the retention time; the input dropped; the lease released. 0 if the
/// lease was gone (the call was requeued; its new run will finish it).
/// KEYS: running, record, output, input, owner, holders; ARGV: id,
/// record, retention ms, whether there is an output, output, node, calls
/// prefix, output bytes the tenant may keep. 2 (nothing changed) when the
/// output would pass the tenant's kept output bytes: the caller records
/// the call failed, without it.
const FINISH: &str = r"
if not redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
local tenant = redis.call('HGET', KEYS[5], ARGV[1])
local ids, bytes, out
if tenant then
  ids, bytes, out = kept(ARGV[7], tenant)
  if ARGV[4] == '1' and tonumber(redis.call('GET', out) or '0') + #ARGV[5] > tonumber(ARGV[8]) then return 2 end
end
redis.call('LREM', KEYS[1], 1, ARGV[1])
let_go(KEYS[1], KEYS[6], ARGV[6])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if ARGV[4] == '1' then redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[3]) end
redis.call('DEL', KEYS[4])
redis.call('HDEL', KEYS[5], ARGV[1])
if tenant then
  redis.call('ZADD', ids, now_ms() + tonumber(ARGV[3]), ARGV[1])
  if ARGV[4] == '1' then
    redis.call('HSET', bytes, ARGV[1], #ARGV[5])
    redis.call('INCRBY', out, #ARGV[5])
  end
end
return 1
";

/// Forget up to 1,000 of a tenant's kept calls (records, inputs, outputs,
/// owner entries) and, once none is left, its queue and counts. KEYS:
/// tenants, the tenant's queue, queued, owner; ARGV: calls prefix, record
/// prefix, tenant. Returns how many were forgotten (0: done).
const FORGET_TENANT: &str = r"
local ids, bytes, out = kept(ARGV[1], ARGV[3])
local batch = redis.call('ZRANGE', ids, 0, 999)
for _, id in ipairs(batch) do
  redis.call('DEL', ARGV[2] .. id, ARGV[2] .. id .. ':in', ARGV[2] .. id .. ':out')
  redis.call('HDEL', KEYS[4], id)
  redis.call('ZREM', ids, id)
end
if #batch == 0 then
  local queued = redis.call('LLEN', KEYS[2])
  if queued > 0 then redis.call('DECRBY', KEYS[3], queued) end
  redis.call('DEL', KEYS[2], bytes, out)
  redis.call('LREM', KEYS[1], 0, ARGV[3])
end
return #batch
";

/// Give a call back to the head of its tenant's queue, and the tenant to
/// the head of the round when it had nothing queued. Used by the requeue
/// scripts: `id` was just removed from a node's running list; KEYS[2..4]
/// are tenants, queued, owner; `prefix` the queue prefix.
const GIVE_BACK: &str = r"
local function give_back(id, prefix)
  local tenant = redis.call('HGET', KEYS[4], id) or ''
  if redis.call('RPUSH', prefix .. tenant, id) == 1 then redis.call('LPUSH', KEYS[2], tenant) end
  redis.call('INCR', KEYS[3])
end
";

/// Move every call a node holds back to its queue, unless the node's
/// heartbeat has time left (by Redis's clock: it is alive); the node is no
/// longer a lease holder. -1 when alive. KEYS: running, tenants, queued,
/// owner, members, holders; ARGV: queue prefix, node.
const REQUEUE_FROM: &str = r"
local expires = redis.call('ZSCORE', KEYS[5], ARGV[2])
if expires and tonumber(expires) > now_ms() then return -1 end
local moved = 0
while true do
  local id = redis.call('RPOP', KEYS[1])
  if not id then break end
  give_back(id, ARGV[1])
  moved = moved + 1
end
redis.call('SREM', KEYS[6], ARGV[2])
return moved
";

/// Replace the record of a call a node is about to run, only while the
/// node holds its lease and the record does not say it finished. 0 if not
/// (the call was requeued, or another run finished it): do not run it.
const UPDATE: &str = r"
if not redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
local current = redis.call('GET', KEYS[2])
if current then
  local ok, decoded = pcall(cjson.decode, current)
  if ok and type(decoded) == 'table' and (decoded['status'] == 'succeeded' or decoded['status'] == 'failed') then
    return 0
  end
end
redis.call('SET', KEYS[2], ARGV[2])
return 1
";

/// Give one call a node holds back to the head of its queue. KEYS:
/// running, tenants, queued, owner, holders; ARGV: id, queue prefix, node.
const REQUEUE_ONE: &str = r"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
let_go(KEYS[1], KEYS[5], ARGV[3])
give_back(ARGV[1], ARGV[2])
return 1
";

/// Drop a node's lease on a call it will not run. KEYS: running, owner,
/// holders; ARGV: id, node.
const RELEASE: &str = r"
redis.call('LREM', KEYS[1], 1, ARGV[1])
let_go(KEYS[1], KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
";

/// What a tenant keeps: `kept(prefix, tenant)` its three keys;
/// `prune(...)` forgets (at most 1,000 at a time) the ids whose records
/// have expired by `now`, and their output bytes.
const KEPT: &str = r"
local function kept(prefix, tenant)
  return prefix .. 'kept:' .. tenant, prefix .. 'kept-bytes:' .. tenant, prefix .. 'kept-out:' .. tenant
end
local function prune(ids, bytes, out, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', ids, '-inf', now, 'LIMIT', 0, 1000)) do
    local b = redis.call('HGET', bytes, id)
    if b then
      redis.call('DECRBY', out, b)
      redis.call('HDEL', bytes, id)
    end
    redis.call('ZREM', ids, id)
  end
end
";

/// The score of an id whose record does not expire yet (queued, running).
const KEPT_FOREVER: &str = "9000000000000000";

/// Queue a call unless the cluster's queue or the tenant's is full:
/// record, input, queue entry, owner in one step. KEYS: tenants, the
/// tenant's queue, record, input, queued, owner; ARGV: cluster limit,
/// record, input, id, tenant limit, tenant, calls prefix, records a
/// tenant may keep, output bytes it may keep. Returns 1 when queued, 0
/// when the cluster's queue is full, 2 when the tenant's is, 3 when the
/// tenant keeps its limit of records, 4 of output bytes.
///
/// A trigger's tick (KEYS[7] the triggers' ticks hash, KEYS[8] their
/// records, ARGV[11] the trigger, ARGV[12] the tick's ms, ARGV[13] the
/// record's `updated_ms` the offering node knows) is queued only if the
/// trigger is still that record and enabled, and the tick is later than
/// its last accepted one, which it then becomes, in the same step: 5 when
/// not (another node, or an earlier try, queued it; or it was changed,
/// paused or removed). 6 when the tick is more than a second ahead of
/// Redis's clock (the offering node's clock runs ahead): not yet.
const ACCEPT: &str = r"
if KEYS[7] then
  local trigger = redis.call('HGET', KEYS[8], ARGV[11])
  if not trigger then return 5 end
  local ok, decoded = pcall(cjson.decode, trigger)
  if not ok or type(decoded) ~= 'table' or tonumber(decoded['updated_ms']) ~= tonumber(ARGV[13]) or decoded['enabled'] ~= true then
    return 5
  end
  if tonumber(ARGV[12]) > now_ms() + 1000 then return 6 end
  local last = redis.call('HGET', KEYS[7], ARGV[11])
  if last and tonumber(string.match(last, '^%d+')) >= tonumber(ARGV[12]) then return 5 end
end
if tonumber(redis.call('GET', KEYS[5]) or '0') >= tonumber(ARGV[1]) then return 0 end
local mine = redis.call('LLEN', KEYS[2])
if mine >= tonumber(ARGV[5]) then return 2 end
local ids, bytes, out = kept(ARGV[7], ARGV[6])
prune(ids, bytes, out, now_ms())
if redis.call('ZCARD', ids) >= tonumber(ARGV[8]) then return 3 end
if tonumber(redis.call('GET', out) or '0') >= tonumber(ARGV[9]) then return 4 end
redis.call('ZADD', ids, ARGV[10], ARGV[4])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SET', KEYS[4], ARGV[3])
redis.call('LPUSH', KEYS[2], ARGV[4])
if mine == 0 then redis.call('RPUSH', KEYS[1], ARGV[6]) end
redis.call('HSET', KEYS[6], ARGV[4], ARGV[6])
redis.call('INCR', KEYS[5])
if KEYS[7] then redis.call('HSET', KEYS[7], ARGV[11], ARGV[12] .. ' ' .. ARGV[4]) end
return 1
";

/// Why the queue refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The cluster's queue holds its limit of calls.
    Cluster,
    /// The tenant's queue holds its share.
    Tenant,
    /// The tenant keeps its limit of call records.
    TenantRecords,
    /// The tenant keeps its limit of output bytes.
    TenantOutput,
    /// The trigger's tick was accepted already (by this node or another),
    /// or the trigger is gone, changed or paused.
    TickTaken,
    /// The tick is ahead of Redis's clock: offer it again later.
    TickEarly,
}

/// A trigger's tick offered with a call: `trigger` (`tenant/name`), the
/// tick, and the trigger record's `updated_ms` the offering node knows.
#[derive(Debug, Clone, Copy)]
pub struct TickClaim<'a> {
    pub trigger: &'a str,
    pub tick_ms: u64,
    pub generation: u64,
}

/// How a finish went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Recorded.
    Recorded,
    /// The node no longer held the call's lease: nothing recorded (the
    /// call was requeued; its new run records it).
    LeaseGone,
    /// The output would pass the tenant's kept output bytes: nothing
    /// recorded; record the call failed, without its output.
    OutputOverLimit,
}

#[derive(Clone)]
pub struct CallQueue {
    conn: ConnectionManager,
    prefix: String,
    accept: Script,
    take: Script,
    finish: Script,
    requeue_from: Script,
    requeue_one: Script,
    release: Script,
    update: Script,
    forget_tenant: Script,
    /// What each tenant may keep ([`CallQueue::with_kept_limits`]).
    kept_records: usize,
    kept_output_bytes: u64,
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
        Self {
            conn,
            prefix: prefix.to_string(),
            accept: Script::new(&format!("{NOW_MS}{KEPT}{ACCEPT}")),
            take: Script::new(TAKE),
            finish: Script::new(&format!("{NOW_MS}{KEPT}{LET_GO}{FINISH}")),
            forget_tenant: Script::new(&format!("{KEPT}{FORGET_TENANT}")),
            kept_records: usize::MAX,
            kept_output_bytes: u64::MAX,
            requeue_from: Script::new(&format!("{NOW_MS}{GIVE_BACK}{REQUEUE_FROM}")),
            requeue_one: Script::new(&format!("{LET_GO}{GIVE_BACK}{REQUEUE_ONE}")),
            release: Script::new(&format!("{LET_GO}{RELEASE}")),
            update: Script::new(UPDATE),
        }
    }

    /// Cap what each tenant keeps: `records` call records (queued,
    /// running, or finished and not expired) and `output_bytes` of outputs.
    pub fn with_kept_limits(mut self, records: usize, output_bytes: u64) -> Self {
        self.kept_records = records;
        self.kept_output_bytes = output_bytes;
        self
    }

    fn calls_prefix(&self) -> String {
        format!("{}:calls:", self.prefix)
    }

    /// Forget every call of `tenant` (records, inputs, outputs, its queue),
    /// in batches; returns how many records went. Its calls running on a
    /// node when this runs are recorded again when they finish (and expire
    /// after the retention time).
    pub async fn forget_tenant(&self, tenant: &str) -> Result<usize, ClusterError> {
        let mut forgotten = 0;
        loop {
            let n: i64 = self
                .forget_tenant
                .key(self.tenants_key())
                .key(format!("{}{tenant}", self.queue_prefix()))
                .key(self.queued_key())
                .key(self.owner_key())
                .arg(self.calls_prefix())
                .arg(self.record_key(""))
                .arg(tenant)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(redis_error)?;
            if n <= 0 {
                return Ok(forgotten);
            }
            forgotten += usize::try_from(n).unwrap_or(0);
        }
    }

    fn record_key(&self, id: &str) -> String {
        format!("{}:call:{id}", self.prefix)
    }

    /// Prefix of the tenants' queues.
    fn queue_prefix(&self) -> String {
        format!("{}:calls:queue:", self.prefix)
    }

    fn tenants_key(&self) -> String {
        format!("{}:calls:tenants", self.prefix)
    }

    fn queued_key(&self) -> String {
        format!("{}:calls:queued", self.prefix)
    }

    fn owner_key(&self) -> String {
        format!("{}:calls:owner", self.prefix)
    }

    fn running_key(&self, node: &str) -> String {
        format!("{}:calls:running:{node}", self.prefix)
    }

    fn holders_key(&self) -> String {
        format!("{}:calls:holders", self.prefix)
    }

    /// Queue a call of `tenant`; refused when `max_queued` calls wait in
    /// the cluster already, or `max_per_tenant` of this tenant's. With a
    /// trigger's `tick` (`(trigger, tick ms)`), only if that tick is later
    /// than the trigger's last accepted one and the trigger is still the
    /// record the offering node knows (see `triggers.rs`).
    #[expect(clippy::too_many_arguments, reason = "one script's arguments, named at the one call site")]
    pub async fn accept(
        &self,
        tenant: &str,
        id: &str,
        record: &[u8],
        input: &[u8],
        max_queued: usize,
        max_per_tenant: usize,
        tick: Option<TickClaim<'_>>,
    ) -> Result<Result<(), Refused>, ClusterError> {
        let key = self.record_key(id);
        let mut script = self.accept.prepare_invoke();
        script
            .key(self.tenants_key())
            .key(format!("{}{tenant}", self.queue_prefix()))
            .key(&key)
            .key(format!("{key}:in"))
            .key(self.queued_key())
            .key(self.owner_key())
            .arg(max_queued)
            .arg(record)
            .arg(input)
            .arg(id)
            .arg(max_per_tenant)
            .arg(tenant)
            .arg(self.calls_prefix())
            .arg(self.kept_records)
            .arg(self.kept_output_bytes)
            .arg(KEPT_FOREVER);
        if let Some(TickClaim { trigger, tick_ms, generation }) = tick {
            script
                .key(crate::triggers::ticks_key(&self.prefix))
                .key(crate::triggers::records_key(&self.prefix))
                .arg(trigger)
                .arg(tick_ms)
                .arg(generation);
        }
        let accepted: i64 = script.invoke_async(&mut self.conn.clone()).await.map_err(redis_error)?;
        Ok(match accepted {
            1 => Ok(()),
            2 => Err(Refused::Tenant),
            3 => Err(Refused::TenantRecords),
            4 => Err(Refused::TenantOutput),
            5 => Err(Refused::TickTaken),
            6 => Err(Refused::TickEarly),
            _ => Err(Refused::Cluster),
        })
    }

    /// Take a queued call for `node`, holding it under the node's lease:
    /// the oldest of the tenant whose turn it is. None when nothing waits.
    pub async fn take(&self, node: &str) -> Result<Option<TakenCall>, ClusterError> {
        let taken: Option<(String, Vec<u8>, Vec<u8>, i64)> = self
            .take
            .key(self.tenants_key())
            .key(self.running_key(node))
            .key(self.queued_key())
            .key(self.holders_key())
            .arg(self.record_key(""))
            .arg(self.queue_prefix())
            .arg(node)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(taken.map(|(id, record, input, has_record)| TakenCall {
            id,
            record: (has_record == 1).then_some(record),
            input,
        }))
    }

    /// Mark a call `node` is about to run (its record replaced), only while
    /// `node` holds the lease and the call has not finished elsewhere.
    /// False: do not run it.
    pub async fn update(&self, node: &str, id: &str, record: &[u8]) -> Result<bool, ClusterError> {
        let updated: i64 = self
            .update
            .key(self.running_key(node))
            .key(self.record_key(id))
            .arg(id)
            .arg(record)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(updated == 1)
    }

    /// A call `node` ran has finished: its record (and output) kept for
    /// `retention`, its input dropped, its lease released; one step, and
    /// only while `node` holds the lease (else `LeaseGone`: the call was
    /// requeued and runs again elsewhere; that run records it) and the
    /// output fits what its tenant may keep (else `OutputOverLimit`).
    pub async fn finish(
        &self,
        node: &str,
        id: &str,
        record: &[u8],
        output: Option<&[u8]>,
        retention: Duration,
    ) -> Result<Finished, ClusterError> {
        let key = self.record_key(id);
        let ttl = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX).max(1);
        let written: i64 = self
            .finish
            .key(self.running_key(node))
            .key(&key)
            .key(format!("{key}:out"))
            .key(format!("{key}:in"))
            .key(self.owner_key())
            .key(self.holders_key())
            .arg(id)
            .arg(record)
            .arg(ttl)
            .arg(if output.is_some() { "1" } else { "0" })
            .arg(output.unwrap_or_default())
            .arg(node)
            .arg(self.calls_prefix())
            .arg(self.kept_output_bytes)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(match written {
            1 => Finished::Recorded,
            2 => Finished::OutputOverLimit,
            _ => Finished::LeaseGone,
        })
    }

    /// The calls `node` holds leases on now.
    pub async fn held(&self, node: &str) -> Result<Vec<String>, ClusterError> {
        self.conn.clone().lrange(self.running_key(node), 0, -1).await.map_err(redis_error)
    }

    /// Give a call `node` holds back to the head of the queue (it could not
    /// be run here). False if `node` did not hold it.
    pub async fn requeue(&self, node: &str, id: &str) -> Result<bool, ClusterError> {
        let moved: i64 = self
            .requeue_one
            .key(self.running_key(node))
            .key(self.tenants_key())
            .key(self.queued_key())
            .key(self.owner_key())
            .key(self.holders_key())
            .arg(id)
            .arg(self.queue_prefix())
            .arg(node)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(moved == 1)
    }

    /// Give up `node`'s lease on a call it will not run (its record is
    /// gone or finished already).
    pub async fn release(&self, node: &str, id: &str) -> Result<(), ClusterError> {
        let _: i64 = self
            .release
            .key(self.running_key(node))
            .key(self.owner_key())
            .key(self.holders_key())
            .arg(id)
            .arg(node)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    /// The record of a call and, if it succeeded, its output.
    pub async fn get(&self, id: &str) -> Result<Option<(Vec<u8>, Option<Vec<u8>>)>, ClusterError> {
        let key = self.record_key(id);
        let (record, output): (Option<Vec<u8>>, Option<Vec<u8>>) =
            self.conn.clone().mget(&[&key, &format!("{key}:out")]).await.map_err(redis_error)?;
        Ok(record.map(|record| (record, output)))
    }

    /// Up to `most` of `tenant`'s kept calls with their records: those not
    /// finished first, then the finished ones whose records expire last
    /// (the latest finished). Ids whose record has just expired are left
    /// out.
    pub async fn recent_of(&self, tenant: &str, most: usize) -> Result<Vec<(String, Vec<u8>)>, ClusterError> {
        let mut conn = self.conn.clone();
        let last = isize::try_from(most).unwrap_or(isize::MAX).saturating_sub(1);
        let ids: Vec<String> =
            conn.zrevrange(format!("{}kept:{tenant}", self.calls_prefix()), 0, last).await.map_err(redis_error)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.record_key(id)).collect();
        let records: Vec<Option<Vec<u8>>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await.map_err(redis_error)?;
        Ok(ids.into_iter().zip(records).filter_map(|(id, record)| Some((id, record?))).collect())
    }

    /// Calls queued and not taken.
    pub async fn queued(&self) -> Result<usize, ClusterError> {
        let queued: Option<i64> = self.conn.clone().get(self.queued_key()).await.map_err(redis_error)?;
        Ok(usize::try_from(queued.unwrap_or(0)).unwrap_or(0))
    }

    /// Calls of `tenant` queued and not taken.
    pub async fn queued_of(&self, tenant: &str) -> Result<usize, ClusterError> {
        self.conn.clone().llen(format!("{}{tenant}", self.queue_prefix())).await.map_err(redis_error)
    }

    /// Nodes holding leases on calls (whether or not they are alive).
    pub async fn lease_holders(&self) -> Result<Vec<String>, ClusterError> {
        self.conn.clone().smembers(self.holders_key()).await.map_err(redis_error)
    }

    /// Make the holders set name the running lists an older version of
    /// the node left (it kept no such set, and found them with `SCAN`), so
    /// that their calls are requeued when those nodes are gone. Runs the
    /// one `SCAN` only while `P:calls:holders:complete` is missing: once per
    /// Redis (again if Redis lost its data), and it is set only after the
    /// holders are added, so a node that dies half-way leaves it for the
    /// next start. Returns how many holders it added.
    pub async fn adopt_older_leases(&self) -> Result<usize, ClusterError> {
        let mut conn = self.conn.clone();
        let complete = format!("{}:complete", self.holders_key());
        let done: bool = conn.exists(&complete).await.map_err(redis_error)?;
        if done {
            return Ok(0);
        }
        let pattern = self.running_key("*");
        let strip = self.running_key("");
        let mut nodes: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            nodes.extend(keys.into_iter().filter_map(|k| k.strip_prefix(&strip).map(str::to_string)));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut pipe = redis::pipe();
        if !nodes.is_empty() {
            pipe.sadd(self.holders_key(), &nodes).ignore();
        }
        pipe.set(&complete, 1).ignore();
        pipe.query_async::<()>(&mut conn).await.map_err(redis_error)?;
        Ok(nodes.len())
    }

    /// Put every call `node` holds back on the queue (to be taken first):
    /// the node is gone. Nothing moves while the node's heartbeat has time
    /// left (None then). Safe to run from several nodes at once: each call
    /// moves once. Returns how many moved.
    pub async fn requeue_from(&self, node: &str) -> Result<Option<usize>, ClusterError> {
        let moved: i64 = self
            .requeue_from
            .key(self.running_key(node))
            .key(self.tenants_key())
            .key(self.queued_key())
            .key(self.owner_key())
            .key(members_key(&self.prefix))
            .key(self.holders_key())
            .arg(self.queue_prefix())
            .arg(node)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(usize::try_from(moved).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect;
    use shoal_testkit::RedisServer;

    #[tokio::test]
    async fn a_tenant_keeps_at_most_its_records_and_output_bytes_and_can_be_forgotten() {
        let redis = RedisServer::start();
        let conn = connect(&redis.url(), Duration::from_secs(1)).await.unwrap();
        let queue = CallQueue::new(conn.clone(), "k").with_kept_limits(3, 10);
        let retention = Duration::from_millis(300);
        // Two calls finish with 6 bytes each: the second's output would make 12 of 10.
        for id in ["a0", "a1"] {
            assert_eq!(queue.accept("a", id, b"queued", b"in", 100, 100, None).await.unwrap(), Ok(()));
            let taken = queue.take("n").await.unwrap().unwrap();
            assert_eq!(taken.id, id);
        }
        assert_eq!(queue.finish("n", "a0", b"done", Some(b"sixsix"), retention).await.unwrap(), Finished::Recorded);
        assert_eq!(
            queue.finish("n", "a1", b"done", Some(b"sixsix"), retention).await.unwrap(),
            Finished::OutputOverLimit
        );
        assert_eq!(queue.held("n").await.unwrap(), vec!["a1".to_string()], "refused: nothing changed");
        assert_eq!(queue.finish("n", "a1", b"failed", None, retention).await.unwrap(), Finished::Recorded);
        assert_eq!(queue.accept("a", "a2", b"queued", b"in", 100, 100, None).await.unwrap(), Ok(()));
        // Three records kept: the fourth call is refused; another tenant's is not.
        assert_eq!(queue.accept("a", "a3", b"q", b"", 100, 100, None).await.unwrap(), Err(Refused::TenantRecords));
        assert_eq!(queue.accept("b", "b0", b"q", b"", 100, 100, None).await.unwrap(), Ok(()));
        // Once the finished records expire, they count no more.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(queue.accept("a", "a3", b"q", b"", 100, 100, None).await.unwrap(), Ok(()));
        assert_eq!(queue.accept("a", "a4", b"q", b"", 100, 100, None).await.unwrap(), Ok(()));
        assert_eq!(queue.accept("a", "a5", b"q", b"", 100, 100, None).await.unwrap(), Err(Refused::TenantRecords));
        // Forgetting the tenant leaves nothing of it, and b's call as it was.
        assert_eq!(queue.forget_tenant("a").await.unwrap(), 3);
        let mut raw = conn.clone();
        let left: Vec<String> = redis::cmd("KEYS").arg("k:*").query_async(&mut raw).await.unwrap();
        assert!(left.iter().all(|k| !k.contains(":a") && !k.ends_with(":a")), "{left:?}");
        assert_eq!(queue.queued().await.unwrap(), 1);
        assert_eq!(queue.take("n").await.unwrap().unwrap().id, "b0");
        assert_eq!(queue.accept("a", "a6", b"q", b"", 100, 100, None).await.unwrap(), Ok(()), "a starts afresh");
    }

    #[tokio::test]
    async fn a_triggers_tick_is_queued_once_whoever_tries_it_and_never_before_a_later_one() {
        let redis = RedisServer::start();
        let conn = connect(&redis.url(), Duration::from_secs(1)).await.unwrap();
        let queue = CallQueue::new(conn.clone(), "k");
        let triggers = crate::SharedTriggers::new(conn, "k");
        let tick = |ms| Some(TickClaim { trigger: "a/every", tick_ms: ms, generation: 7 });
        assert_eq!(
            queue.accept("a", "c0", b"q", b"", 100, 100, tick(1000)).await.unwrap(),
            Err(Refused::TickTaken),
            "no such trigger"
        );
        let record = br#"{"updated_ms":7,"enabled":true}"#;
        assert_eq!(triggers.put("a/every", "a", record, 10).await.unwrap(), crate::TriggerPut::Created);
        // Two nodes try tick 1000 at once: one call.
        let (first, second) = tokio::join!(
            queue.accept("a", "c1", b"q", b"", 100, 100, tick(1000)),
            queue.accept("a", "c2", b"q", b"", 100, 100, tick(1000)),
        );
        let mut outcomes = [first.unwrap(), second.unwrap()];
        outcomes.sort_by_key(|o| o.is_err());
        assert_eq!(outcomes, [Ok(()), Err(Refused::TickTaken)]);
        assert_eq!(queue.queued().await.unwrap(), 1, "the refused try queued nothing");
        let won = if queue.get("c1").await.unwrap().is_some() { "c1" } else { "c2" };
        assert_eq!(triggers.ticks(&["a/every", "a/other"]).await.unwrap(), vec![Some(format!("1000 {won}")), None]);
        // A later tick runs; an earlier one (a slow node) never does.
        assert_eq!(queue.accept("a", "c3", b"q", b"", 100, 100, tick(2000)).await.unwrap(), Ok(()));
        assert_eq!(queue.accept("a", "c4", b"q", b"", 100, 100, tick(1500)).await.unwrap(), Err(Refused::TickTaken));
        // A tick refused for the tenant's limits is not taken: it may be tried again.
        assert_eq!(queue.accept("a", "c5", b"q", b"", 100, 2, tick(3000)).await.unwrap(), Err(Refused::Tenant));
        assert_eq!(triggers.ticks(&["a/every"]).await.unwrap(), vec![Some("2000 c3".to_string())]);
        assert_eq!(queue.accept("a", "c5", b"q", b"", 100, 100, tick(3000)).await.unwrap(), Ok(()));
        // A tick an hour ahead of Redis's clock (a node's clock runs fast): not yet.
        let ahead =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 + 3_600_000;
        assert_eq!(queue.accept("a", "c6", b"q", b"", 100, 100, tick(ahead)).await.unwrap(), Err(Refused::TickEarly));
        // A node that knows an older record of the trigger (changed since), or
        // a paused one, has its ticks refused.
        let stale = Some(TickClaim { trigger: "a/every", tick_ms: 4000, generation: 6 });
        assert_eq!(queue.accept("a", "c7", b"q", b"", 100, 100, stale).await.unwrap(), Err(Refused::TickTaken));
        triggers.put("a/every", "a", br#"{"updated_ms":7,"enabled":false}"#, 10).await.unwrap();
        assert_eq!(queue.accept("a", "c8", b"q", b"", 100, 100, tick(4000)).await.unwrap(), Err(Refused::TickTaken));
        assert_eq!(triggers.ticks(&["a/every"]).await.unwrap(), vec![Some("3000 c5".to_string())]);
    }

    #[tokio::test]
    async fn triggers_are_capped_per_tenant_and_removed_with_their_progress() {
        let redis = RedisServer::start();
        let conn = connect(&redis.url(), Duration::from_secs(1)).await.unwrap();
        let (queue, triggers) = (CallQueue::new(conn.clone(), "k"), crate::SharedTriggers::new(conn, "k"));
        use crate::TriggerPut::*;
        assert_eq!(triggers.version().await.unwrap(), 0);
        let live = br#"{"updated_ms":1,"enabled":true}"#;
        assert_eq!(triggers.put("a/one", "a", live, 2).await.unwrap(), Created);
        assert_eq!(triggers.put("a/two", "a", b"2", 2).await.unwrap(), Created);
        assert_eq!(triggers.put("a/two", "a", b"2'", 2).await.unwrap(), Replaced, "a replacement is not one more");
        assert_eq!(triggers.put("a/three", "a", b"3", 2).await.unwrap(), TenantFull);
        assert_eq!(triggers.put("b/one", "b", b"b", 2).await.unwrap(), Created, "another tenant's cap is its own");
        let (version, mut all) = triggers.all().await.unwrap();
        all.sort();
        assert_eq!(version, 4);
        assert_eq!(
            all,
            vec![("a/one".into(), live.to_vec()), ("a/two".into(), b"2'".to_vec()), ("b/one".into(), b"b".to_vec())]
        );
        assert_eq!(
            queue
                .accept(
                    "a",
                    "c1",
                    b"q",
                    b"",
                    100,
                    100,
                    Some(TickClaim { trigger: "a/one", tick_ms: 5000, generation: 1 })
                )
                .await
                .unwrap(),
            Ok(())
        );
        assert!(triggers.remove("a/one", "a").await.unwrap());
        let late = queue
            .accept("a", "c2", b"q", b"", 100, 100, Some(TickClaim { trigger: "a/one", tick_ms: 6000, generation: 1 }))
            .await
            .unwrap();
        assert_eq!(late, Err(Refused::TickTaken), "a tick offered after the removal");
        assert!(!triggers.remove("a/one", "a").await.unwrap());
        assert_eq!(triggers.ticks(&["a/one"]).await.unwrap(), vec![None], "its progress went with it");
        assert_eq!(triggers.put("a/three", "a", b"3", 2).await.unwrap(), Created, "room again");
        // Redis lost them: a node's copy goes back, without overwriting one there.
        let republished =
            [("a/one".to_string(), "a".to_string(), b"1".to_vec()), ("a/two".into(), "a".into(), b"x".to_vec())];
        assert_eq!(triggers.republish(&republished).await.unwrap(), 1);
        assert_eq!(triggers.put("a/four", "a", b"4", 3).await.unwrap(), TenantFull, "the put-back one counts");
    }

    #[tokio::test]
    async fn calls_are_taken_oldest_first_and_a_dead_nodes_calls_go_back_to_the_queue() {
        let redis = RedisServer::start();
        let queue = CallQueue::new(connect(&redis.url(), Duration::from_secs(1)).await.unwrap(), "t");
        for i in 0..3 {
            let accepted =
                queue.accept("a", &format!("c{i}"), b"queued", format!("in{i}").as_bytes(), 3, 3, None).await;
            assert_eq!(accepted.unwrap(), Ok(()));
        }
        assert_eq!(queue.accept("b", "c3", b"queued", b"", 3, 3, None).await.unwrap(), Err(Refused::Cluster));
        assert_eq!(queue.get("c3").await.unwrap(), None, "a refused call leaves nothing");
        let first = queue.take("n1").await.unwrap().unwrap();
        assert_eq!((first.id.as_str(), first.input.as_slice()), ("c0", &b"in0"[..]));
        assert_eq!(first.record.as_deref(), Some(&b"queued"[..]));
        let second = queue.take("n2").await.unwrap().unwrap();
        assert_eq!(second.id, "c1");
        assert!(queue.update("n1", "c0", br#"{"status":"running"}"#).await.unwrap());
        assert!(!queue.update("n2", "c0", b"{}").await.unwrap(), "n2 holds no lease on c0");
        assert_eq!(
            queue.finish("n1", "c0", b"done", Some(b"out"), Duration::from_secs(60)).await.unwrap(),
            Finished::Recorded
        );
        assert_eq!(queue.get("c0").await.unwrap(), Some((b"done".to_vec(), Some(b"out".to_vec()))));

        // n2 dies holding c1: it goes back to the head of the queue.
        let mut holders = queue.lease_holders().await.unwrap();
        holders.sort();
        assert_eq!(holders, ["n2"], "n1 released its lease when it finished");
        // While n2's heartbeat has time left, n2 is alive: nothing moves.
        redis.command(&["ZADD", "t:members", "99999999999999", "n2"]);
        assert_eq!(queue.requeue_from("n2").await.unwrap(), None);
        assert_eq!(queue.held("n2").await.unwrap(), ["c1"]);
        assert_eq!(queue.lease_holders().await.unwrap(), ["n2"]);
        // Its time ran out (not yet cleaned up by a reader: the score says
        // it is dead all the same).
        redis.command(&["ZADD", "t:members", "1", "n2"]);
        assert_eq!(queue.requeue_from("n2").await.unwrap(), Some(1));
        assert_eq!(queue.requeue_from("n2").await.unwrap(), Some(0), "moved once");
        assert!(queue.lease_holders().await.unwrap().is_empty(), "n2 holds nothing now");
        // n2 was only slow: its late start and finish do not overwrite the
        // rerun's record.
        assert!(!queue.update("n2", "c1", b"late").await.unwrap());
        assert_eq!(
            queue.finish("n2", "c1", b"late", None, Duration::from_secs(60)).await.unwrap(),
            Finished::LeaseGone
        );
        assert_eq!(queue.get("c1").await.unwrap(), Some((b"queued".to_vec(), None)));
        assert_eq!(queue.queued().await.unwrap(), 2);
        assert_eq!(queue.take("n1").await.unwrap().unwrap().id, "c1", "the requeued call is taken first");
        assert_eq!(queue.take("n1").await.unwrap().unwrap().id, "c2");
        assert!(queue.take("n1").await.unwrap().is_none());

        // A call a node cannot run goes back to the head of the queue.
        assert!(queue.requeue("n1", "c2").await.unwrap());
        assert!(!queue.requeue("n1", "c2").await.unwrap(), "n1 no longer holds it");
        assert_eq!(queue.take("n3").await.unwrap().unwrap().id, "c2");
        // A finished call taken again (a requeue raced its finish) is not
        // marked running again.
        assert_eq!(
            queue.finish("n3", "c2", br#"{"status":"succeeded"}"#, None, Duration::from_secs(60)).await.unwrap(),
            Finished::Recorded
        );
        redis.command(&["LPUSH", "t:calls:running:n3", "c2"]);
        assert!(!queue.update("n3", "c2", br#"{"status":"running"}"#).await.unwrap());
    }

    #[tokio::test]
    async fn tenants_are_served_in_turns_and_a_tenants_backlog_fills_only_its_own_share() {
        let redis = RedisServer::start();
        let queue = CallQueue::new(connect(&redis.url(), Duration::from_secs(1)).await.unwrap(), "t");
        let accept = |tenant: &'static str, id: String| {
            let queue = queue.clone();
            async move { queue.accept(tenant, &id, b"r", b"", 100, 5, None).await.unwrap() }
        };
        // A flooder fills its share of 5; its sixth call is refused, not
        // another tenant's.
        for i in 0..5 {
            assert_eq!(accept("flood", format!("f{i}")).await, Ok(()));
        }
        assert_eq!(accept("flood", "f5".into()).await, Err(Refused::Tenant));
        assert_eq!(accept("quiet", "q0".into()).await, Ok(()));
        assert_eq!(accept("quiet", "q1".into()).await, Ok(()));
        assert_eq!((queue.queued().await.unwrap(), queue.queued_of("flood").await.unwrap()), (7, 5));
        // Taken in turns: the quiet tenant's calls do not wait behind the
        // flood, and each tenant's come oldest first.
        let mut order = Vec::new();
        while let Some(call) = queue.take("n").await.unwrap() {
            order.push(call.id);
        }
        assert_eq!(order, ["f0", "q0", "f1", "q1", "f2", "f3", "f4"]);
        assert_eq!(queue.queued().await.unwrap(), 0);
        // A requeued call goes back to its own tenant's queue, taken first,
        // and counts against its share again.
        assert!(queue.requeue("n", "q1").await.unwrap());
        assert_eq!(queue.queued_of("quiet").await.unwrap(), 1);
        assert_eq!(queue.take("m").await.unwrap().unwrap().id, "q1");
        // A dead node's calls go back to their tenants' queues.
        assert_eq!(queue.requeue_from("n").await.unwrap(), Some(6));
        assert_eq!((queue.queued_of("flood").await.unwrap(), queue.queued_of("quiet").await.unwrap()), (5, 1));
        // Finished and released calls leave no owner entry behind.
        for i in 0..6 {
            let call = queue.take("m").await.unwrap().unwrap();
            if i % 2 == 0 {
                assert_eq!(
                    queue.finish("m", &call.id, b"done", None, Duration::from_secs(60)).await.unwrap(),
                    Finished::Recorded
                );
            } else {
                queue.release("m", &call.id).await.unwrap();
            }
        }
        assert_eq!(queue.finish("m", "q1", b"done", None, Duration::from_secs(60)).await.unwrap(), Finished::Recorded);
        assert!(queue.take("m").await.unwrap().is_none());
        assert_eq!(redis.command(&["HLEN", "t:calls:owner"]), ":0");
        assert_eq!(redis.command(&["LLEN", "t:calls:tenants"]), ":0");
        assert_eq!(queue.queued().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn finished_records_expire_after_the_retention() {
        let redis = RedisServer::start();
        let queue = CallQueue::new(connect(&redis.url(), Duration::from_secs(1)).await.unwrap(), "t");
        assert_eq!(queue.accept("a", "c", b"queued", b"x", 10, 10, None).await.unwrap(), Ok(()));
        queue.take("n").await.unwrap().unwrap();
        assert_eq!(queue.finish("n", "c", b"failed", None, Duration::from_secs(2)).await.unwrap(), Finished::Recorded);
        assert_eq!(queue.get("c").await.unwrap(), Some((b"failed".to_vec(), None)));
        let started = std::time::Instant::now();
        while queue.get("c").await.unwrap().is_some() {
            assert!(started.elapsed() < Duration::from_secs(20), "the record never expired");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn holders(queue: &CallQueue) -> Vec<String> {
        let mut holders = queue.lease_holders().await.unwrap();
        holders.sort();
        holders
    }

    #[tokio::test]
    async fn lease_holders_follow_takes_finishes_releases_and_requeues() {
        let redis = RedisServer::start();
        let queue = CallQueue::new(connect(&redis.url(), Duration::from_secs(1)).await.unwrap(), "t");
        for i in 0..6 {
            assert_eq!(queue.accept("a", &format!("c{i}"), b"r", b"", 10, 10, None).await.unwrap(), Ok(()));
        }
        assert!(holders(&queue).await.is_empty());
        let c0 = queue.take("n1").await.unwrap().unwrap().id;
        let c1 = queue.take("n1").await.unwrap().unwrap().id;
        let c2 = queue.take("n2").await.unwrap().unwrap().id;
        let c3 = queue.take("n3").await.unwrap().unwrap().id;
        assert_eq!(holders(&queue).await, ["n1", "n2", "n3"]);
        // n1 still holds c1 after finishing c0; not after releasing it.
        assert_eq!(queue.finish("n1", &c0, b"done", None, Duration::from_secs(60)).await.unwrap(), Finished::Recorded);
        assert_eq!(holders(&queue).await, ["n1", "n2", "n3"]);
        queue.release("n1", &c1).await.unwrap();
        assert_eq!(holders(&queue).await, ["n2", "n3"]);
        // A call given back, and a call given back by a late finish that
        // no longer holds it, change nothing for the others.
        assert!(queue.requeue("n2", &c2).await.unwrap());
        assert_eq!(queue.finish("n2", &c2, b"late", None, Duration::from_secs(60)).await.unwrap(), Finished::LeaseGone);
        assert_eq!(holders(&queue).await, ["n3"]);
        // A dead node's calls requeued: no longer a holder.
        assert_eq!(queue.requeue_from("n3").await.unwrap(), Some(1));
        assert!(holders(&queue).await.is_empty());
        assert_eq!(queue.take("n4").await.unwrap().unwrap().id, c3, "requeued calls are taken first");
        assert_eq!(holders(&queue).await, ["n4"]);
        // A live node whose requeue is refused stays a holder.
        redis.command(&["ZADD", "t:members", "99999999999999", "n4"]);
        assert_eq!(queue.requeue_from("n4").await.unwrap(), None);
        assert_eq!(holders(&queue).await, ["n4"]);
    }

    #[tokio::test]
    async fn a_dead_nodes_calls_are_requeued_only_once_its_heartbeat_ran_out() {
        use crate::{Member, Membership, MembershipConfig};
        let redis = RedisServer::start();
        let queue = CallQueue::new(connect(&redis.url(), Duration::from_secs(1)).await.unwrap(), "t");
        let config = MembershipConfig {
            ttl: Duration::from_millis(600),
            prefix: "t".into(),
            ..MembershipConfig::new(redis.url())
        };
        let node = Membership::join(config, Member::new("n", "127.0.0.2:8080")).await.unwrap();
        assert_eq!(queue.accept("a", "c", b"r", b"", 10, 10, None).await.unwrap(), Ok(()));
        assert_eq!(queue.take("n").await.unwrap().unwrap().id, "c");
        assert_eq!(queue.requeue_from("n").await.unwrap(), None, "alive: heartbeating");
        // Killed: no more heartbeats, no leave. Until its last heartbeat
        // runs out, nothing moves; then its call does.
        drop(node);
        let killed = std::time::Instant::now();
        let moved = loop {
            match queue.requeue_from("n").await.unwrap() {
                None => {
                    assert!(killed.elapsed() < Duration::from_secs(5), "the heartbeat never ran out");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(moved) => break moved,
            }
        };
        let waited = killed.elapsed();
        assert_eq!(moved, 1);
        // The last heartbeat came within a third of the TTL before the
        // kill, so the call stayed at least the remaining two thirds.
        assert!(waited >= Duration::from_millis(350), "requeued {waited:?} after the kill");
        assert!(queue.lease_holders().await.unwrap().is_empty());
        assert_eq!(queue.take("m").await.unwrap().unwrap().id, "c");
    }

    #[tokio::test]
    async fn leases_of_an_older_version_are_adopted_once() {
        let redis = RedisServer::start();
        let queue = CallQueue::new(connect(&redis.url(), Duration::from_secs(1)).await.unwrap(), "t");
        // An older node took c and died: a running list and an owner, no
        // holders set.
        redis.command(&["LPUSH", "t:calls:running:old", "c"]);
        redis.command(&["HSET", "t:calls:owner", "c", "a"]);
        assert!(queue.lease_holders().await.unwrap().is_empty());
        assert_eq!(queue.adopt_older_leases().await.unwrap(), 1);
        assert_eq!(queue.lease_holders().await.unwrap(), ["old"]);
        assert_eq!(queue.adopt_older_leases().await.unwrap(), 0, "once");
        assert_eq!(queue.requeue_from("old").await.unwrap(), Some(1));
        assert_eq!(queue.queued_of("a").await.unwrap(), 1);
    }
}
