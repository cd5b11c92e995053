//! The Redis backend, for nodes that share state (`shoal serve --redis`).
//!
//! Layout, under a prefix (default `shoal`):
//! - `{p}:v:{tenant}/{key}`: a hash per value, field `n` its length and
//!   fields `0`, `1`, … its chunks of [`CHUNK_BYTES`], so a range read or a
//!   push moves only the chunks it needs;
//! - `{p}:k:{tenant}`: a hash of the tenant's keys and their lengths;
//! - `{p}:u2:{tenant}`: what the tenant's keys count for against its quota,
//!   the sum of [`key_charge`](super::key_charge) (overhead, name and value of each key);
//! - `{p}:u:{tenant}`: left by stores written before keys were charged, the
//!   bytes of the tenant's values alone. Never read: a tenant without a
//!   `u2` counter has it computed from its index by its next write script,
//!   which deletes this one;
//! - `{p}:l:{tenant}/{key}`: a lock lease, `SET NX PX` with a random token.
//!
//! Every write is one Lua script, so it is atomic on the server and checks
//! the size and quota before changing anything; `incr` is the server's
//! `HINCRBY`. The connection manager reconnects by itself; every operation
//! is bounded by the configured timeout (default 1 s) and answers
//! `unavailable` past it, so a stopped or paused Redis never hangs a call.
//! Redis Cluster is not supported (a write touches keys of several slots);
//! use a single primary, with Sentinel for failover.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation, Value};

use super::{
    GlobalTier, KEY_OVERHEAD_BYTES, LeaseToken, Quotas, StateFuture, StateLimits, not_an_integer, over_quota, overflow,
    too_large,
};
use crate::local::{CHUNK_BYTES, DirtyChunks};
use crate::{ScopedKey, StateError};

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Longest any one operation may take before it answers `unavailable`.
    pub timeout: Duration,
    /// Prefix of every key Shoal writes.
    pub prefix: String,
    pub limits: StateLimits,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redacted_url(&self.url))
            .field("timeout", &self.timeout)
            .field("prefix", &self.prefix)
            .field("limits", &self.limits)
            .finish()
    }
}

/// `url` with any password replaced, for logs and errors.
pub fn redacted_url(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?))) {
        Some((scheme, (userinfo, host))) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:<redacted>@{host}")
        }
        None => url.to_string(),
    }
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timeout: Duration::from_secs(1),
            prefix: "shoal".into(),
            limits: StateLimits::default(),
        }
    }
}

// Script replies are `{code, value}`: 0 done, 1 too large, 2 over quota,
// 3 not an integer, 4 overflow.
const DONE: i64 = 0;
const TOO_LARGE: i64 = 1;
const OVER_QUOTA: i64 = 2;
const NOT_AN_INTEGER: i64 = 3;
const OVERFLOW: i64 = 4;

/// Put in front of every script below (after `local OVERHEAD = …`, the
/// value of [`KEY_OVERHEAD_BYTES`]): what a key counts for, and the
/// tenant's usage.
const PRELUDE: &str = r"
-- What a key counts for against its tenant's quota (`key_charge`).
local function charge(key, len) return OVERHEAD + #key + len end
-- The tenant's usage: its counter; or, for a store written before keys
-- were charged (whose only counter held value bytes), computed from its
-- index, once: the next write stores it.
local function used(index, usage)
  local u = redis.call('GET', usage)
  if u then return tonumber(u) end
  local total = 0
  local all = redis.call('HGETALL', index)
  for i = 1, #all, 2 do total = total + charge(all[i], tonumber(all[i + 1])) end
  return total
end
-- Store the usage (KEYS[3]) of a value script; the old counter (KEYS[4])
-- is stale from now on. As an integer: a Lua number would be sent in %.14g.
local function store_used(after)
  redis.call('SET', KEYS[3], string.format('%d', after))
  redis.call('DEL', KEYS[4])
end
";

/// KEYS: value, index, usage, old usage. ARGV: key, new length, max value,
/// quota, chunk size, whole ("1": drop every old chunk), then (index,
/// bytes) pairs.
const WRITE: &str = r"
local n = redis.call('HGET', KEYS[1], 'n')
local old = tonumber(n or '0')
local new = tonumber(ARGV[2])
if new > tonumber(ARGV[3]) then return {1, new} end
local was = 0
if n then was = charge(ARGV[1], old) end
local now = charge(ARGV[1], new)
local after = used(KEYS[2], KEYS[3]) - was + now
if now > was and after > tonumber(ARGV[4]) then return {2, after} end
local chunk = tonumber(ARGV[5])
local keep = math.ceil(new / chunk)
if ARGV[6] == '1' then keep = 0 end
for i = keep, math.ceil(old / chunk) - 1 do redis.call('HDEL', KEYS[1], i) end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'n', new)
redis.call('HSET', KEYS[2], ARGV[1], new)
store_used(after)
return {0, new}
";

/// KEYS: value, index, usage, old usage. ARGV: key, data, max value, quota,
/// chunk size.
const APPEND: &str = r"
local n = redis.call('HGET', KEYS[1], 'n')
local old = tonumber(n or '0')
local data = ARGV[2]
local new = old + #data
if new > tonumber(ARGV[3]) then return {1, new} end
local was = 0
if n then was = charge(ARGV[1], old) end
local now = charge(ARGV[1], new)
local after = used(KEYS[2], KEYS[3]) - was + now
if now > was and after > tonumber(ARGV[4]) then return {2, after} end
local chunk = tonumber(ARGV[5])
local pos = old
local written = 0
while written < #data do
  local idx = math.floor(pos / chunk)
  local take = math.min(chunk - pos % chunk, #data - written)
  local cur = redis.call('HGET', KEYS[1], idx) or ''
  redis.call('HSET', KEYS[1], idx, cur .. string.sub(data, written + 1, written + take))
  written = written + take
  pos = pos + take
end
redis.call('HSET', KEYS[1], 'n', new)
redis.call('HSET', KEYS[2], ARGV[1], new)
store_used(after)
return {0, new}
";

/// KEYS: value, index, usage, old usage. ARGV: key, delta, quota. The
/// reply's value is the new integer as text (Lua numbers are doubles).
const INCR: &str = r"
local n = redis.call('HGET', KEYS[1], 'n')
local before = ''
if n then
  before = redis.call('HGET', KEYS[1], '0') or ''
  if tonumber(n) ~= #before or not (before == '0' or string.match(before, '^%-?[1-9]%d*$')) then
    return {3, 0}
  end
end
local ok, err = pcall(redis.call, 'HINCRBY', KEYS[1], '0', ARGV[2])
if not ok then
  local msg = type(err) == 'table' and err.err or tostring(err)
  if string.find(msg, 'overflow') then return {4, 0} end
  return {3, 0}
end
local text = redis.call('HGET', KEYS[1], '0')
local was = 0
if n then was = charge(ARGV[1], tonumber(n)) end
local now = charge(ARGV[1], #text)
local after = used(KEYS[2], KEYS[3]) - was + now
if now > was and after > tonumber(ARGV[3]) then
  if n then redis.call('HSET', KEYS[1], '0', before) else redis.call('DEL', KEYS[1]) end
  return {2, after}
end
redis.call('HSET', KEYS[1], 'n', #text)
redis.call('HSET', KEYS[2], ARGV[1], #text)
store_used(after)
return {0, text}
";

/// KEYS: value, index, usage, old usage. ARGV: key. The usage is taken
/// before the key leaves the index (a computed one counts it), and never
/// goes below 0.
const DELETE: &str = r"
local old = redis.call('HGET', KEYS[1], 'n')
if not old then return 0 end
local after = math.max(used(KEYS[2], KEYS[3]) - charge(ARGV[1], tonumber(old)), 0)
redis.call('UNLINK', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
store_used(after)
return 1
";

/// KEYS: index, usage. Reads only: a computed usage is not stored.
const USAGE: &str = r"
return used(KEYS[1], KEYS[2])
";

/// One batch of a tenant's deletion. KEYS: index, usage, then the value
/// key of each key in ARGV (the keys as the tenant wrote them, from the
/// index). Keys no longer in the index are skipped (a scan may return a
/// key twice); the usage, if stored, keeps counting what is left.
const DELETE_BATCH: &str = r"
local freed = 0
local removed = 0
for i = 1, #ARGV do
  local len = redis.call('HGET', KEYS[1], ARGV[i])
  if len then
    redis.call('UNLINK', KEYS[i + 2])
    redis.call('HDEL', KEYS[1], ARGV[i])
    freed = freed + charge(ARGV[i], tonumber(len))
    removed = removed + 1
  end
end
local u = redis.call('GET', KEYS[2])
if u then redis.call('SET', KEYS[2], string.format('%d', math.max(tonumber(u) - freed, 0))) end
return removed
";

/// The end of a tenant's deletion. KEYS: index, usage, old usage. Drops
/// the counters if the index is empty (then it no longer exists either);
/// replies 0 if a key came back meanwhile, for another round.
const DELETE_END: &str = r"
if redis.call('HLEN', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
";

/// Fields asked of each `HSCAN` of a tenant's index when deleting it (a
/// hint: Redis may answer a few more), and so the keys of one
/// [`DELETE_BATCH`] script.
const DELETE_BATCH_KEYS: usize = 1000;

/// Rounds of scanning a tenant's index before its deletion gives up: each
/// round deletes every key the index held when it began, so more than a
/// couple means something keeps writing for the tenant.
const DELETE_ROUNDS: usize = 16;

/// KEYS: value. ARGV: offset, length, chunk size. Replies nil, or
/// `{len, start, end, first chunk index, chunks…}`.
const GET_RANGE: &str = r"
local n = redis.call('HGET', KEYS[1], 'n')
if not n then return false end
n = tonumber(n)
local start = math.min(tonumber(ARGV[1]), n)
local stop = math.min(start + tonumber(ARGV[2]), n)
local chunk = tonumber(ARGV[3])
local first = math.floor(start / chunk)
local out = {n, start, stop, first}
for i = first, math.ceil(stop / chunk) - 1 do out[#out + 1] = redis.call('HGET', KEYS[1], i) or '' end
return out
";

/// KEYS: lock. ARGV: token.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

struct Scripts {
    write: Script,
    append: Script,
    incr: Script,
    delete: Script,
    usage: Script,
    delete_batch: Script,
    delete_end: Script,
    get_range: Script,
    unlock: Script,
}

/// A field of a tenant's index (a key as the tenant wrote it) and its value
/// (the key's length), as `HSCAN` answers them.
type IndexEntry = (Vec<u8>, Vec<u8>);

/// A script that counts charges: the overhead and [`PRELUDE`] in front.
fn charging(body: &str) -> Script {
    Script::new(&format!("local OVERHEAD = {KEY_OVERHEAD_BYTES}\n{PRELUDE}{body}"))
}

/// The global tier on Redis.
pub struct RedisTier {
    conn: ConnectionManager,
    config: RedisConfig,
    scripts: Scripts,
    quotas: Quotas,
}

impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier").field("config", &self.config).finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> StateError {
    StateError::Unavailable(format!("redis: {e}"))
}

fn bad_reply(what: &str, reply: &Value) -> StateError {
    StateError::Unavailable(format!("redis: unexpected reply to {what}: {reply:?}"))
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

impl RedisTier {
    /// Set up the connection manager; it connects on first use and
    /// reconnects by itself, so this fails only on a malformed URL. Must be
    /// called within a Tokio runtime.
    pub fn connect(config: RedisConfig) -> Result<Self, StateError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StateError::Unavailable(format!("redis URL {:?}: {e}", redacted_url(&config.url))))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config).map_err(unavailable)?;
        let scripts = Scripts {
            write: charging(WRITE),
            append: charging(APPEND),
            incr: charging(INCR),
            delete: charging(DELETE),
            usage: charging(USAGE),
            delete_batch: charging(DELETE_BATCH),
            delete_end: Script::new(DELETE_END),
            get_range: Script::new(GET_RANGE),
            unlock: Script::new(UNLOCK),
        };
        Ok(Self { conn, config, scripts, quotas: Quotas::default() })
    }

    /// Check that Redis answers.
    pub async fn ping(&self) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        self.bounded(async move { redis::cmd("PING").query_async::<String>(&mut conn).await.map(drop) }).await
    }

    /// Run one Redis exchange within the timeout.
    async fn bounded<T>(&self, op: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StateError> {
        match tokio::time::timeout(self.config.timeout, op).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StateError::Unavailable(format!(
                "redis did not answer within {} ms",
                self.config.timeout.as_millis()
            ))),
        }
    }

    fn value_key(&self, key: &ScopedKey) -> Vec<u8> {
        format!("{}:v:{}", self.config.prefix, key.as_str()).into_bytes()
    }

    fn index_key(&self, tenant: &str) -> String {
        format!("{}:k:{tenant}", self.config.prefix)
    }

    fn usage_key(&self, tenant: &str) -> String {
        format!("{}:u2:{tenant}", self.config.prefix)
    }

    /// The counter of stores written before keys were charged.
    fn old_usage_key(&self, tenant: &str) -> String {
        format!("{}:u:{tenant}", self.config.prefix)
    }

    fn lock_key(&self, key: &ScopedKey) -> Vec<u8> {
        format!("{}:l:{}", self.config.prefix, key.as_str()).into_bytes()
    }

    /// An invocation of one of the value scripts: KEYS value, index, usage,
    /// old usage; first ARGV the key as the tenant wrote it.
    fn on_value<'s>(&self, script: &'s Script, key: &ScopedKey) -> ScriptInvocation<'s> {
        let mut call = script.prepare_invoke();
        call.key(self.value_key(key))
            .key(self.index_key(key.tenant()))
            .key(self.usage_key(key.tenant()))
            .key(self.old_usage_key(key.tenant()))
            .arg(key.key());
        call
    }

    /// Delete the keys `fields` (as the tenant wrote them) of `tenant`, in
    /// scripts of at most [`DELETE_BATCH_KEYS`]; returns how many were
    /// there.
    async fn delete_batch(&self, tenant: &str, fields: &[Vec<u8>]) -> Result<u64, StateError> {
        let mut removed = 0;
        let value_prefix = format!("{}:v:{}", self.config.prefix, ScopedKey::tenant_prefix(tenant)).into_bytes();
        for batch in fields.chunks(DELETE_BATCH_KEYS) {
            let mut call = self.scripts.delete_batch.prepare_invoke();
            call.key(self.index_key(tenant)).key(self.usage_key(tenant));
            for field in batch {
                call.key([value_prefix.as_slice(), field.as_slice()].concat());
            }
            for field in batch {
                call.arg(field.as_slice());
            }
            let mut conn = self.conn.clone();
            let n: u64 = self.bounded(call.invoke_async(&mut conn)).await?;
            removed += n;
        }
        Ok(removed)
    }

    /// Turn a write script's `{code, value}` into the result.
    fn written(&self, key: &ScopedKey, what: &str, reply: Value) -> Result<u64, StateError> {
        let Value::Array(items) = &reply else { return Err(bad_reply(what, &reply)) };
        let (Some(code), Some(value)) = (items.first().and_then(int), items.get(1).and_then(int)) else {
            return Err(bad_reply(what, &reply));
        };
        let value = u64::try_from(value).unwrap_or(0);
        match code {
            DONE => Ok(value),
            TOO_LARGE => Err(too_large(value, self.config.limits.max_value_bytes)),
            OVER_QUOTA => Err(over_quota(key.tenant(), value, self.quota_of(key.tenant()))),
            _ => Err(bad_reply(what, &reply)),
        }
    }

    async fn write(
        &self,
        key: &ScopedKey,
        len: u64,
        whole: bool,
        chunks: impl Iterator<Item = (u64, &[u8])>,
    ) -> Result<(), StateError> {
        let mut call = self.on_value(&self.scripts.write, key);
        call.arg(len)
            .arg(self.config.limits.max_value_bytes)
            .arg(self.quota_of(key.tenant()))
            .arg(CHUNK_BYTES)
            .arg(if whole { "1" } else { "0" });
        for (idx, bytes) in chunks {
            call.arg(idx).arg(bytes);
        }
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded(call.invoke_async(&mut conn)).await?;
        self.written(key, "write", reply).map(drop)
    }
}

impl GlobalTier for RedisTier {
    fn limits(&self) -> StateLimits {
        self.config.limits
    }

    fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    fn get_range<'a>(&'a self, key: &'a ScopedKey, offset: u64, len: u64) -> StateFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let mut call = self.scripts.get_range.prepare_invoke();
            call.key(self.value_key(key)).arg(offset).arg(len).arg(CHUNK_BYTES);
            let mut conn = self.conn.clone();
            let reply: Value = self.bounded(call.invoke_async(&mut conn)).await?;
            let items = match &reply {
                Value::Nil => return Ok(None),
                Value::Array(items) if items.len() >= 4 => items,
                _ => return Err(bad_reply("get-range", &reply)),
            };
            let head: Option<Vec<u64>> =
                items[..4].iter().map(|v| int(v).and_then(|i| u64::try_from(i).ok())).collect();
            let Some([_len, start, end, first]) = head.as_deref().and_then(|h| <[u64; 4]>::try_from(h).ok()) else {
                return Err(bad_reply("get-range", &reply));
            };
            let mut out = Vec::with_capacity((end - start) as usize);
            let chunk = CHUNK_BYTES as u64;
            for (i, piece) in items[4..].iter().enumerate() {
                let Value::BulkString(bytes) = piece else { return Err(bad_reply("get-range", &reply)) };
                let chunk_start = (first + i as u64) * chunk;
                let from = (start.max(chunk_start) - chunk_start) as usize;
                let to = ((end.min(chunk_start + chunk) - chunk_start) as usize).min(bytes.len());
                if from < to {
                    out.extend_from_slice(&bytes[from..to]);
                }
            }
            Ok(Some(out))
        })
    }

    fn set<'a>(&'a self, key: &'a ScopedKey, value: Vec<u8>) -> StateFuture<'a, ()> {
        Box::pin(async move {
            let chunks = value.chunks(CHUNK_BYTES).enumerate().map(|(i, c)| (i as u64, c));
            self.write(key, value.len() as u64, true, chunks).await
        })
    }

    fn write_chunks<'a>(&'a self, key: &'a ScopedKey, dirty: DirtyChunks) -> StateFuture<'a, DirtyChunks> {
        Box::pin(async move {
            let chunks = dirty.chunks.iter().map(|(i, c)| (u64::from(*i), c.as_slice()));
            self.write(key, dirty.len, false, chunks).await?;
            Ok(dirty)
        })
    }

    fn delete<'a>(&'a self, key: &'a ScopedKey) -> StateFuture<'a, bool> {
        Box::pin(async move {
            let call = self.on_value(&self.scripts.delete, key);
            let mut conn = self.conn.clone();
            let removed: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
            Ok(removed == 1)
        })
    }

    fn append<'a>(&'a self, key: &'a ScopedKey, data: Vec<u8>) -> StateFuture<'a, u64> {
        Box::pin(async move {
            let mut call = self.on_value(&self.scripts.append, key);
            call.arg(data).arg(self.config.limits.max_value_bytes).arg(self.quota_of(key.tenant())).arg(CHUNK_BYTES);
            let mut conn = self.conn.clone();
            let reply: Value = self.bounded(call.invoke_async(&mut conn)).await?;
            self.written(key, "append", reply)
        })
    }

    fn incr<'a>(&'a self, key: &'a ScopedKey, delta: i64) -> StateFuture<'a, i64> {
        Box::pin(async move {
            let mut call = self.on_value(&self.scripts.incr, key);
            call.arg(delta).arg(self.quota_of(key.tenant()));
            let mut conn = self.conn.clone();
            let reply: Value = self.bounded(call.invoke_async(&mut conn)).await?;
            let Value::Array(items) = &reply else { return Err(bad_reply("incr", &reply)) };
            match (items.first().and_then(int), items.get(1)) {
                (Some(DONE), Some(Value::BulkString(text))) => {
                    super::parse_counter(text).ok_or_else(|| bad_reply("incr", &reply))
                }
                (Some(NOT_AN_INTEGER), _) => Err(not_an_integer(key)),
                (Some(OVERFLOW), _) => Err(overflow(key, delta)),
                (Some(OVER_QUOTA), Some(after)) => {
                    Err(over_quota(key.tenant(), int(after).unwrap_or(0) as u64, self.quota_of(key.tenant())))
                }
                _ => Err(bad_reply("incr", &reply)),
            }
        })
    }

    fn list<'a>(&'a self, tenant: &'a str) -> StateFuture<'a, Vec<(String, u64)>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let index = self.index_key(tenant);
            let mut entries: Vec<(String, u64)> =
                self.bounded(redis::cmd("HGETALL").arg(index).query_async(&mut conn)).await?;
            entries.sort();
            Ok(entries)
        })
    }

    fn usage<'a>(&'a self, tenant: &'a str) -> StateFuture<'a, u64> {
        Box::pin(async move {
            let mut call = self.scripts.usage.prepare_invoke();
            call.key(self.index_key(tenant)).key(self.usage_key(tenant));
            let mut conn = self.conn.clone();
            let used: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
            Ok(u64::try_from(used).unwrap_or(0))
        })
    }

    fn delete_tenant<'a>(&'a self, tenant: &'a str) -> StateFuture<'a, u64> {
        Box::pin(async move {
            // The tenant's keys are its index's fields: scan that one hash
            // (never the keyspace), deleting each batch found. Deleting
            // fields while scanning is allowed: a field there all along is
            // returned at least once; one returned twice is skipped.
            // Lock leases (`{p}:l:…`) are not in the index; they expire by
            // themselves within their lease.
            let index = self.index_key(tenant);
            let mut deleted = 0;
            for _ in 0..DELETE_ROUNDS {
                let mut cursor = 0u64;
                loop {
                    let mut conn = self.conn.clone();
                    let (next, entries): (u64, Vec<IndexEntry>) = self
                        .bounded(
                            redis::cmd("HSCAN")
                                .arg(&index)
                                .arg(cursor)
                                .arg("COUNT")
                                .arg(DELETE_BATCH_KEYS)
                                .query_async(&mut conn),
                        )
                        .await?;
                    let fields: Vec<Vec<u8>> = entries.into_iter().map(|(field, _)| field).collect();
                    deleted += self.delete_batch(tenant, &fields).await?;
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
                let mut call = self.scripts.delete_end.prepare_invoke();
                call.key(&index).key(self.usage_key(tenant)).key(self.old_usage_key(tenant));
                let mut conn = self.conn.clone();
                let done: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
                if done == 1 {
                    self.quotas.set(tenant, None);
                    return Ok(deleted);
                }
            }
            Err(StateError::Unavailable(format!(
                "tenant `{tenant}` kept writing state while it was being deleted; try again once it has stopped"
            )))
        })
    }

    fn try_lock<'a>(&'a self, key: &'a ScopedKey, token: &'a LeaseToken, lease: Duration) -> StateFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1);
            let set: Option<String> = self
                .bounded(
                    redis::cmd("SET")
                        .arg(self.lock_key(key))
                        .arg(token.as_str())
                        .arg("NX")
                        .arg("PX")
                        .arg(lease_ms)
                        .query_async(&mut conn),
                )
                .await?;
            Ok(set.is_some())
        })
    }

    fn unlock<'a>(&'a self, key: &'a ScopedKey, token: &'a LeaseToken) -> StateFuture<'a, bool> {
        Box::pin(async move {
            let mut call = self.scripts.unlock.prepare_invoke();
            call.key(self.lock_key(key)).arg(token.as_str());
            let mut conn = self.conn.clone();
            let released: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
            Ok(released == 1)
        })
    }
}
