//! The function registry every node of a cluster shares, in Redis.
//!
//! Keys (under the cluster's prefix `P`):
//! - `P:tenants` — hash, tenant name → its record (JSON, as the node wrote it);
//! - `P:functions` — hash, `tenant/name` → the function's record (JSON);
//! - `P:wasm:<sha256>` — the wasm bytes, once per content, shared by every
//!   function deployed with them, deleted with the last of them;
//! - `P:functions` also holds each version of a function, immutable, under
//!   `tenant/name@N`; the `tenant/name` record is the newest version's;
//! - `P:function-versions` — hash, `tenant/name` → the last version number
//!   given out (a deploy takes the next, whichever node it is on);
//! - `P:aliases` — hash, `tenant/name` → the function's aliases (JSON:
//!   alias → `{"versions":[{"version":N,"weight":W},…]}`), changed only by
//!   scripts that check what they name exists, and read by the script that
//!   collects old versions, so an aliased version is never collected;
//! - `P:wasm-refs` — hash, sha256 → how many function records name that
//!   wasm. Deploys and removals keep it in the same script as the record,
//!   so deciding whether a wasm is still used reads one field, not every
//!   function record;
//! - `P:registry:version` — bumped by every change, so a node polls one
//!   small key to know whether to read the hashes again;
//! - `P:admin` — SHA-256 of the cluster's admin token (the first node's);
//! - `P:secret` — the secret nodes present to each other;
//! - `P:epoch` — a random value set when the registry is first created (or
//!   re-created after Redis lost it): a node that sees it change knows
//!   Redis lost data, whatever the version says.
//!
//! Records are opaque bytes here: what a tenant or a function is, the node
//! decides, except that a function's record names its wasm in a top-level
//! `"sha256"` field. Changes that touch two keys run as Lua scripts, so a
//! removal can never delete the wasm a concurrent deploy is about to point
//! at.
//!
//! A Redis written by an older version of the node has functions and no
//! `P:wasm-refs` (it read every record on each deploy and removal to find
//! out). The first deploy, removal or republish that finds functions and
//! no counts rebuilds them, reading every record once, in the same script
//! (so no change slips between the count and its use). After that, counts
//! exist as long as functions do. Nodes of the older version must not
//! deploy or remove functions on the same Redis once a newer node has:
//! they do not keep the counts.

use std::sync::{Arc, Mutex};

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use crate::{ClusterError, redis_error};

/// Helpers of the registry's scripts:
/// - `sha_of(record)`: the wasm a function record names (its `sha256`);
/// - `count_refs(functions, refs)`: rebuild the reference counts from the
///   records when there are records and no counts (a Redis of an older
///   version); otherwise nothing, at the cost of two O(1) commands;
/// - `unref(refs, prefix, sha)`: one record less names `sha`; its wasm is
///   deleted with the last.
const HELPERS: &str = r#"
local function sha_of(record)
  local ok, decoded = pcall(cjson.decode, record)
  if ok and type(decoded) == 'table' and type(decoded['sha256']) == 'string' then return decoded['sha256'] end
  return nil
end
local function count_refs(functions, refs)
  if redis.call('EXISTS', refs) == 1 or redis.call('HLEN', functions) == 0 then return end
  for _, record in ipairs(redis.call('HVALS', functions)) do
    local sha = sha_of(record)
    if sha then redis.call('HINCRBY', refs, sha, 1) end
  end
end
local function unref(refs, prefix, sha)
  if redis.call('HINCRBY', refs, sha, -1) <= 0 then
    redis.call('HDEL', refs, sha)
    redis.call('DEL', prefix .. sha)
  end
end
"#;

/// Set `functions[key] = record` and bump the version, only if the wasm is
/// there (a concurrent removal may have just deleted it). The new record's
/// wasm gains a reference and the old one's loses one, unless they are
/// the same (a redeploy of the same bytes changes no count); the old wasm
/// goes with its last reference. KEYS: functions, version, wasm, refs;
/// ARGV: key, record, wasm prefix.
const PUT_FUNCTION: &str = r"
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
count_refs(KEYS[1], KEYS[4])
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local new_sha = sha_of(ARGV[2])
local old_sha = old and sha_of(old)
if new_sha ~= old_sha then
  if new_sha then redis.call('HINCRBY', KEYS[4], new_sha, 1) end
  if old_sha then unref(KEYS[4], ARGV[3], old_sha) end
end
redis.call('INCR', KEYS[2])
return 1
";

/// Remove `functions[key]` (whatever its record says now, not what the
/// caller last saw) with its versions — the last 64 given out and those
/// the caller names (older ones it knows of: aliased, or kept by a larger
/// count) — its aliases and its version counter; each record's wasm loses
/// a reference (and goes with the last); bump the version. Returns 1 if
/// there was such a function or version. KEYS: functions, version, refs,
/// aliases, counters; ARGV: key, wasm prefix, versions.
const REMOVE_FUNCTION: &str = r"
count_refs(KEYS[1], KEYS[3])
local removed = 0
local function drop(key)
  local record = redis.call('HGET', KEYS[1], key)
  if not record then return end
  redis.call('HDEL', KEYS[1], key)
  local sha = sha_of(record)
  if sha then unref(KEYS[3], ARGV[2], sha) end
  removed = 1
end
local last = tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0')
local head = redis.call('HGET', KEYS[1], ARGV[1])
if head then last = math.max(last, version_of(head)) end
drop(ARGV[1])
for v = math.max(1, last - 63), last do drop(ARGV[1] .. '@' .. v) end
for i = 3, #ARGV do drop(ARGV[1] .. '@' .. ARGV[i]) end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if removed == 1 then redis.call('INCR', KEYS[2]) end
return removed
";

/// Put back a function Redis lost, unless a record is there already (a
/// node re-publishing at the same time): the record with a reference to
/// its wasm, and the wasm if missing. When the record there names the same
/// wasm, only the wasm is put back if missing. KEYS: functions, wasm,
/// refs; ARGV: key, record, wasm.
const REPUBLISH_FUNCTION: &str = r"
count_refs(KEYS[1], KEYS[3])
local sha = sha_of(ARGV[2])
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  if sha then redis.call('HINCRBY', KEYS[3], sha, 1) end
elseif sha_of(redis.call('HGET', KEYS[1], ARGV[1])) ~= sha then
  return 0
end
redis.call('SET', KEYS[2], ARGV[3], 'NX')
return 1
";

/// Helpers of the versions' scripts (after `HELPERS`):
/// - `version_of(record)`: a function record's `version` (0 if none);
/// - `put(functions, refs, prefix, key, record)`: set a record, keeping
///   its wasm's reference count (the old record's wasm loses one);
/// - `aliases_of(aliases, function)`: the function's aliases, decoded;
/// - `aliased(aliases, function, version)`: whether an alias routes any
///   share of its calls to `version`.
const VERSION_HELPERS: &str = r#"
local function version_of(record)
  local ok, decoded = pcall(cjson.decode, record)
  if ok and type(decoded) == 'table' and tonumber(decoded['version']) then return tonumber(decoded['version']) end
  return 0
end
local function put(functions, refs, prefix, key, record)
  local old = redis.call('HGET', functions, key)
  redis.call('HSET', functions, key, record)
  local new_sha = sha_of(record)
  local old_sha = old and sha_of(old)
  if new_sha ~= old_sha then
    if new_sha then redis.call('HINCRBY', refs, new_sha, 1) end
    if old_sha then unref(refs, prefix, old_sha) end
  end
end
local function aliases_of(aliases, function_key)
  local raw = redis.call('HGET', aliases, function_key)
  if not raw then return {} end
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then return decoded end
  return {}
end
local function aliased(aliases, function_key, version)
  for _, target in pairs(aliases_of(aliases, function_key)) do
    if type(target) == 'table' and type(target['versions']) == 'table' then
      for _, route in ipairs(target['versions']) do
        if tonumber(route['version']) == tonumber(version) then return true end
      end
    end
  end
  return false
end
local function save_aliases(aliases, function_key, decoded)
  if next(decoded) == nil then redis.call('HDEL', aliases, function_key)
  else redis.call('HSET', aliases, function_key, cjson.encode(decoded)) end
end
"#;

/// Deploy a version: its record under `tenant/name@N` and as the
/// function's (`tenant/name`), only if the wasm is there; a `latest` alias
/// is dropped (the unversioned name runs the newest version again). With
/// ARGV[5] = '1' (moving a function deployed before versions existed to
/// version 1), only if the function's record still has no version.
/// KEYS: functions, version, wasm, refs, aliases; ARGV: function key,
/// version key, record, wasm prefix, only-unversioned. 1 done, 0 the wasm
/// went missing, 2 not unversioned any more, 3 stored as a version only (a
/// newer version is the function's already).
const PUT_VERSION: &str = r"
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
if ARGV[5] == '1' then
  local head = redis.call('HGET', KEYS[1], ARGV[1])
  if not head or version_of(head) ~= 0 then return 2 end
end
count_refs(KEYS[1], KEYS[4])
put(KEYS[1], KEYS[4], ARGV[4], ARGV[2], ARGV[3])
-- The function's own record moves only forward: a deploy that took its
-- number before another's, and writes after it, leaves the newer.
local head = redis.call('HGET', KEYS[1], ARGV[1])
if head and ARGV[5] ~= '1' and version_of(head) >= version_of(ARGV[3]) then
  redis.call('INCR', KEYS[2])
  return 3
end
put(KEYS[1], KEYS[4], ARGV[4], ARGV[1], ARGV[3])
local aliases = aliases_of(KEYS[5], ARGV[1])
if aliases['latest'] then
  aliases['latest'] = nil
  save_aliases(KEYS[5], ARGV[1], aliases)
end
redis.call('INCR', KEYS[2])
return 1
";

/// The next version number of a function: one more than the last given
/// out, and more than `floor` (the newest this node knows). KEYS:
/// counters; ARGV: function key, floor.
const NEXT_VERSION: &str = r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if n <= tonumber(ARGV[2]) then
  n = tonumber(ARGV[2]) + 1
  redis.call('HSET', KEYS[1], ARGV[1], n)
end
return n
";

/// Collect one old version unless an alias routes calls to it or it is
/// the function's newest. KEYS: functions, version, refs, aliases; ARGV:
/// version key, wasm prefix, function key, version. 1 removed, 0 none,
/// 2 kept.
const REMOVE_VERSION: &str = r"
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
if aliased(KEYS[4], ARGV[3], ARGV[4]) then return 2 end
local head = redis.call('HGET', KEYS[1], ARGV[3])
if head and version_of(head) == tonumber(ARGV[4]) then return 2 end
count_refs(KEYS[1], KEYS[3])
redis.call('HDEL', KEYS[1], ARGV[1])
local sha = sha_of(record)
if sha then unref(KEYS[3], ARGV[2], sha) end
redis.call('INCR', KEYS[2])
return 1
";

/// Set (ARGV[3] a target, JSON) or remove (ARGV[3] empty) one alias of a
/// function; a target's versions (ARGV[5..]) must exist, and a new alias
/// must leave the function at most ARGV[4] of them. KEYS: functions,
/// version, aliases; ARGV: function key, alias, target, most aliases,
/// versions. 1 done, 0 no such alias to remove, -N version N does not
/// exist, 2 too many aliases.
const SET_ALIAS: &str = r"
local aliases = aliases_of(KEYS[3], ARGV[1])
if ARGV[3] == '' then
  if aliases[ARGV[2]] == nil then return 0 end
  aliases[ARGV[2]] = nil
else
  if aliases[ARGV[2]] == nil then
    local n = 0
    for _ in pairs(aliases) do n = n + 1 end
    if n >= tonumber(ARGV[4]) then return 2 end
  end
  for i = 5, #ARGV do
    if redis.call('HEXISTS', KEYS[1], ARGV[1] .. '@' .. ARGV[i]) == 0 then return -tonumber(ARGV[i]) end
  end
  aliases[ARGV[2]] = cjson.decode(ARGV[3])
end
save_aliases(KEYS[3], ARGV[1], aliases)
redis.call('INCR', KEYS[2])
return 1
";

/// How a version's collection went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRemoval {
    Removed,
    /// No such version.
    Missing,
    /// An alias routes calls to it, or it is the newest: kept.
    Kept,
}

/// How an alias change went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasChange {
    Done,
    /// Removing an alias the function does not have.
    NoSuchAlias,
    /// The target names a version that does not exist.
    NoSuchVersion(u32),
    /// The function has its most aliases.
    TooMany,
}

/// Entries of a hash: field → value.
type Entries = Vec<(String, Vec<u8>)>;

/// Everything a node needs to mirror the registry, read at one moment.
#[derive(Debug, Default)]
pub struct RegistrySnapshot {
    pub version: u64,
    pub tenants: Entries,
    pub functions: Entries,
    /// `tenant/name` → the function's aliases (JSON).
    pub aliases: Entries,
}

/// The shared registry: one multiplexed connection that reconnects by
/// itself when Redis comes back.
#[derive(Clone)]
pub struct SharedRegistry {
    conn: ConnectionManager,
    prefix: String,
    put_function: Script,
    remove_function: Script,
    republish_function: Script,
    put_version: Script,
    next_version: Script,
    remove_version: Script,
    set_alias: Script,
    /// The admin token hash and secret this node claimed or got, to put
    /// back if Redis loses them.
    claimed: Arc<Mutex<Claimed>>,
}

#[derive(Debug, Default)]
struct Claimed {
    admin: Option<String>,
    secret: Option<String>,
}

fn random_hex() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A function (or one of its versions, `tenant/name@N`) as a node
/// re-publishes it after Redis lost the registry.
#[derive(Debug)]
pub struct Republished<'a> {
    pub key: &'a str,
    pub sha256: &'a str,
    pub record: Vec<u8>,
    pub wasm: Vec<u8>,
}

impl std::fmt::Debug for SharedRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRegistry").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl SharedRegistry {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_string(),
            put_function: Script::new(&format!("{HELPERS}{PUT_FUNCTION}")),
            remove_function: Script::new(&format!("{HELPERS}{VERSION_HELPERS}{REMOVE_FUNCTION}")),
            republish_function: Script::new(&format!("{HELPERS}{REPUBLISH_FUNCTION}")),
            put_version: Script::new(&format!("{HELPERS}{VERSION_HELPERS}{PUT_VERSION}")),
            next_version: Script::new(NEXT_VERSION),
            remove_version: Script::new(&format!("{HELPERS}{VERSION_HELPERS}{REMOVE_VERSION}")),
            set_alias: Script::new(&format!("{HELPERS}{VERSION_HELPERS}{SET_ALIAS}")),
            claimed: Arc::default(),
        }
    }

    fn claimed(&self) -> std::sync::MutexGuard<'_, Claimed> {
        self.claimed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    fn wasm_key(&self, sha256: &str) -> String {
        format!("{}:wasm:{sha256}", self.prefix)
    }

    /// Make `admin_sha256` the cluster's admin token hash if it has none
    /// yet; fails when the cluster's differs (every node must be started
    /// with the same admin token).
    pub async fn claim_admin(&self, admin_sha256: &str) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let key = self.key("admin");
        let _: bool = conn.set_nx(&key, admin_sha256).await.map_err(redis_error)?;
        let current: Option<String> = conn.get(&key).await.map_err(redis_error)?;
        match current {
            Some(hash) if hash == admin_sha256 => {
                self.claimed().admin = Some(hash);
                Ok(())
            }
            _ => Err(ClusterError::AdminToken),
        }
    }

    /// The cluster's node-to-node secret, created by the first node to ask.
    pub async fn secret(&self) -> Result<String, ClusterError> {
        let mut conn = self.conn.clone();
        let key = self.key("secret");
        let _: bool = conn.set_nx(&key, random_hex()).await.map_err(redis_error)?;
        let secret: Option<String> = conn.get(&key).await.map_err(redis_error)?;
        let secret = secret.ok_or_else(|| ClusterError::Redis("the cluster secret vanished as it was read".into()))?;
        self.claimed().secret = Some(secret.clone());
        Ok(secret)
    }

    /// The secret as Redis has it now (it changes only if Redis lost it
    /// and another node made a new one).
    pub async fn current_secret(&self) -> Result<Option<String>, ClusterError> {
        self.conn.clone().get(self.key("secret")).await.map_err(redis_error)
    }

    /// Remember `secret` as the one to put back if Redis loses it.
    pub fn adopt_secret(&self, secret: &str) {
        self.claimed().secret = Some(secret.to_string());
    }

    /// The registry's epoch, creating it if there is none.
    pub async fn epoch(&self) -> Result<String, ClusterError> {
        let mut conn = self.conn.clone();
        let key = self.key("epoch");
        let _: bool = conn.set_nx(&key, random_hex()).await.map_err(redis_error)?;
        let epoch: Option<String> = conn.get(&key).await.map_err(redis_error)?;
        epoch.ok_or_else(|| ClusterError::Redis("the registry's epoch vanished as it was read".into()))
    }

    /// The registry's version (changes whenever anything in it does) and
    /// epoch (None if Redis has none: it lost the registry).
    pub async fn version(&self) -> Result<(u64, Option<String>), ClusterError> {
        let (version, epoch): (Option<u64>, Option<String>) = redis::pipe()
            .get(self.key("registry:version"))
            .get(self.key("epoch"))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok((version.unwrap_or(0), epoch))
    }

    /// Store a new tenant; false if one of that name exists.
    pub async fn put_tenant(&self, name: &str, record: &[u8]) -> Result<bool, ClusterError> {
        let (added, _): (bool, u64) = redis::pipe()
            .atomic()
            .hset_nx(self.key("tenants"), name, record)
            .incr(self.key("registry:version"), 1)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(added)
    }

    /// Replace a tenant's record (its limits changed).
    pub async fn update_tenant(&self, name: &str, record: &[u8]) -> Result<(), ClusterError> {
        let (_, _): (u64, u64) = redis::pipe()
            .atomic()
            .hset(self.key("tenants"), name, record)
            .incr(self.key("registry:version"), 1)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    /// Forget a tenant's record (the last step of its deletion, after its
    /// functions are gone); false if there was none.
    pub async fn remove_tenant(&self, name: &str) -> Result<bool, ClusterError> {
        let (removed, _): (u64, u64) = redis::pipe()
            .atomic()
            .hdel(self.key("tenants"), name)
            .incr(self.key("registry:version"), 1)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(removed == 1)
    }

    /// Store `wasm` under its content's key (once per content), then run
    /// `script`, which writes a record naming it only if the wasm is still
    /// there (0 when a removal took it meanwhile): tried three times.
    async fn store_with_wasm(
        &self,
        what: &str,
        sha256: &str,
        wasm: &[u8],
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<i64, ClusterError> {
        let mut conn = self.conn.clone();
        let wasm_key = self.wasm_key(sha256);
        for _ in 0..3 {
            let present: bool = conn.exists(&wasm_key).await.map_err(redis_error)?;
            if !present {
                let _: () = conn.set(&wasm_key, wasm).await.map_err(redis_error)?;
            }
            let stored: i64 = script.invoke_async(&mut conn).await.map_err(redis_error)?;
            if stored != 0 {
                return Ok(stored);
            }
        }
        Err(ClusterError::Redis(format!("the wasm of `{what}` kept being removed while it was deployed")))
    }

    /// Deploy: store the wasm (once per content) and the record, which
    /// must name it in its `sha256` field (that is what counts as a use).
    pub async fn put_function(&self, key: &str, sha256: &str, record: &[u8], wasm: &[u8]) -> Result<(), ClusterError> {
        let mut script = self.put_function.prepare_invoke();
        script
            .key(self.key("functions"))
            .key(self.key("registry:version"))
            .key(self.wasm_key(sha256))
            .key(self.key("wasm-refs"))
            .arg(key)
            .arg(record)
            .arg(self.wasm_key(""));
        self.store_with_wasm(key, sha256, wasm, &script).await.map(drop)
    }

    /// Remove a function with its versions (the last 64 given out and
    /// `versions`, those older the caller knows of) and aliases, each wasm
    /// when no other record uses it.
    pub async fn remove_function(&self, key: &str, versions: &[u32]) -> Result<bool, ClusterError> {
        let mut script = self.remove_function.prepare_invoke();
        script
            .key(self.key("functions"))
            .key(self.key("registry:version"))
            .key(self.key("wasm-refs"))
            .key(self.key("aliases"))
            .key(self.key("function-versions"))
            .arg(key)
            .arg(self.wasm_key(""));
        for version in versions {
            script.arg(version);
        }
        let removed: i64 = script.invoke_async(&mut self.conn.clone()).await.map_err(redis_error)?;
        Ok(removed == 1)
    }

    /// The version with every tenant, function and alias, read atomically.
    pub async fn snapshot(&self) -> Result<RegistrySnapshot, ClusterError> {
        let (version, tenants, functions, aliases): (Option<u64>, Entries, Entries, Entries) = redis::pipe()
            .atomic()
            .get(self.key("registry:version"))
            .hgetall(self.key("tenants"))
            .hgetall(self.key("functions"))
            .hgetall(self.key("aliases"))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(RegistrySnapshot { version: version.unwrap_or(0), tenants, functions, aliases })
    }

    /// The next version number of `function` (`tenant/name`), above `floor`.
    pub async fn next_version(&self, function: &str, floor: u32) -> Result<u32, ClusterError> {
        self.next_version
            .key(self.key("function-versions"))
            .arg(function)
            .arg(floor)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)
    }

    /// Deploy version `version` of `function` (`tenant/name`): the record
    /// (which names its wasm in `sha256` and carries `version`) under
    /// `tenant/name@N` and as the function's, the wasm stored once per
    /// content, a `latest` alias dropped. With `only_unversioned`, only if
    /// the function's record has no version yet (false returned if it has).
    /// If a newer version is the function's already (a deploy that took its
    /// number later wrote first), this one is stored as a version only
    /// (false returned).
    pub async fn put_version(
        &self,
        function: &str,
        version: u32,
        sha256: &str,
        record: &[u8],
        wasm: &[u8],
        only_unversioned: bool,
    ) -> Result<bool, ClusterError> {
        let mut script = self.put_version.prepare_invoke();
        script
            .key(self.key("functions"))
            .key(self.key("registry:version"))
            .key(self.wasm_key(sha256))
            .key(self.key("wasm-refs"))
            .key(self.key("aliases"))
            .arg(function)
            .arg(format!("{function}@{version}"))
            .arg(record)
            .arg(self.wasm_key(""))
            .arg(if only_unversioned { "1" } else { "0" });
        // 1: the function's now; 2, 3: stored as a version only, or not at all.
        Ok(self.store_with_wasm(function, sha256, wasm, &script).await? == 1)
    }

    /// Collect version `version` of `function` unless an alias routes
    /// calls to it or it is the newest.
    pub async fn remove_version(&self, function: &str, version: u32) -> Result<VersionRemoval, ClusterError> {
        let removed: i64 = self
            .remove_version
            .key(self.key("functions"))
            .key(self.key("registry:version"))
            .key(self.key("wasm-refs"))
            .key(self.key("aliases"))
            .arg(format!("{function}@{version}"))
            .arg(self.wasm_key(""))
            .arg(function)
            .arg(version)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(match removed {
            1 => VersionRemoval::Removed,
            2 => VersionRemoval::Kept,
            _ => VersionRemoval::Missing,
        })
    }

    /// Set `alias` of `function` to `target` (JSON naming `versions`,
    /// each of which must exist), or remove it (`target` None).
    pub async fn set_alias(
        &self,
        function: &str,
        alias: &str,
        target: Option<&[u8]>,
        versions: &[u32],
        most: usize,
    ) -> Result<AliasChange, ClusterError> {
        let mut script = self.set_alias.prepare_invoke();
        script
            .key(self.key("functions"))
            .key(self.key("registry:version"))
            .key(self.key("aliases"))
            .arg(function)
            .arg(alias)
            .arg(target.unwrap_or_default())
            .arg(most);
        for version in versions {
            script.arg(version);
        }
        let done: i64 = script.invoke_async(&mut self.conn.clone()).await.map_err(redis_error)?;
        Ok(match done {
            1 => AliasChange::Done,
            0 => AliasChange::NoSuchAlias,
            2 => AliasChange::TooMany,
            n => AliasChange::NoSuchVersion(u32::try_from(-n).unwrap_or(0)),
        })
    }

    /// Put back what this node knows after Redis lost the registry (it
    /// restarted without persistence, or from an older snapshot): the
    /// admin token hash, the secret, `tenants` and `functions`, each only
    /// where nothing is stored now, so nodes re-publishing at once agree;
    /// and a new epoch if there is none, so that every node notices.
    pub async fn republish(
        &self,
        tenants: &[(&str, Vec<u8>)],
        functions: &[Republished<'_>],
        aliases: &[(String, Vec<u8>)],
    ) -> Result<(), ClusterError> {
        let (admin, secret) = {
            let claimed = self.claimed();
            (claimed.admin.clone(), claimed.secret.clone())
        };
        let mut pipe = redis::pipe();
        if let Some(admin) = admin {
            pipe.set_nx(self.key("admin"), admin).ignore();
        }
        if let Some(secret) = secret {
            pipe.set_nx(self.key("secret"), secret).ignore();
        }
        for (name, record) in tenants {
            pipe.hset_nx(self.key("tenants"), name, record).ignore();
        }
        for (function, record) in aliases {
            pipe.hset_nx(self.key("aliases"), function, record).ignore();
        }
        if !pipe.is_empty() {
            pipe.query_async::<()>(&mut self.conn.clone()).await.map_err(redis_error)?;
        }
        // One script per function, as each keeps its wasm's reference
        // count with the record.
        for function in functions {
            let _: i64 = self
                .republish_function
                .key(self.key("functions"))
                .key(self.wasm_key(function.sha256))
                .key(self.key("wasm-refs"))
                .arg(function.key)
                .arg(&function.record)
                .arg(&function.wasm)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(redis_error)?;
        }
        // Last, so that a node that sees the new version finds everything.
        redis::pipe()
            .set_nx(self.key("epoch"), random_hex())
            .ignore()
            .incr(self.key("registry:version"), 1)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(redis_error)
    }

    /// The wasm stored under `sha256`.
    pub async fn wasm(&self, sha256: &str) -> Result<Option<Vec<u8>>, ClusterError> {
        self.conn.clone().get(self.wasm_key(sha256)).await.map_err(redis_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect;
    use shoal_testkit::RedisServer;

    async fn registry(redis: &RedisServer) -> SharedRegistry {
        SharedRegistry::new(connect(&redis.url(), std::time::Duration::from_secs(1)).await.unwrap(), "t")
    }

    #[tokio::test]
    async fn deploys_and_removals_bump_the_version_and_share_wasm_by_content() {
        let redis = RedisServer::start();
        let a = registry(&redis).await;
        let b = registry(&redis).await;
        assert_eq!(a.version().await.unwrap(), (0, None));
        let epoch = a.epoch().await.unwrap();
        assert_eq!(b.epoch().await.unwrap(), epoch, "one epoch for the cluster");
        assert!(a.put_tenant("acme", b"{}").await.unwrap());
        assert!(!b.put_tenant("acme", b"{\"other\":1}").await.unwrap(), "a tenant is created once");
        a.put_function("acme/one", "s1", br#"{"sha256":"s1"}"#, b"wasm-1").await.unwrap();
        b.put_function("acme/two", "s1", br#"{"sha256":"s1","env":[["X","\"sha256\":\"s9\""]]}"#, b"wasm-1")
            .await
            .unwrap();
        let snapshot = b.snapshot().await.unwrap();
        assert_eq!(snapshot.version, 4);
        assert_eq!(b.version().await.unwrap(), (4, Some(epoch)));
        assert_eq!(snapshot.tenants, vec![("acme".to_string(), b"{}".to_vec())]);
        let mut keys: Vec<&str> = snapshot.functions.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["acme/one", "acme/two"]);
        assert_eq!(b.wasm("s1").await.unwrap().as_deref(), Some(&b"wasm-1"[..]));

        assert!(a.remove_function("acme/one", &[]).await.unwrap());
        assert!(b.wasm("s1").await.unwrap().is_some(), "still used by acme/two");
        assert!(!a.remove_function("acme/one", &[]).await.unwrap(), "already gone");
        // A redeploy with other bytes lets go of the old wasm; an env var
        // that looks like a record's field keeps nothing alive.
        a.put_function("acme/nine", "s9", br#"{"sha256":"s9"}"#, b"wasm-9").await.unwrap();
        a.put_function("acme/nine", "s8", br#"{"sha256":"s8"}"#, b"wasm-8").await.unwrap();
        assert_eq!(b.wasm("s9").await.unwrap(), None, "replaced, and no one else's");
        assert!(b.remove_function("acme/two", &[]).await.unwrap());
        assert_eq!(b.wasm("s1").await.unwrap(), None, "the last user took the wasm with it");
        assert!(b.remove_function("acme/nine", &[]).await.unwrap());
        assert_eq!(b.wasm("s8").await.unwrap(), None);
        assert_eq!(a.version().await.unwrap().0, 9);
    }

    #[tokio::test]
    async fn versions_are_numbered_collected_unless_aliased_and_go_with_their_function() {
        let redis = RedisServer::start();
        let (a, b) = (registry(&redis).await, registry(&redis).await);
        let record = |v: u32, sha: &str| format!(r#"{{"sha256":"{sha}","version":{v}}}"#).into_bytes();
        // A function from before versions: moved to version 1 once, and
        // not over a version deployed meanwhile.
        a.put_function("acme/f", "s0", br#"{"sha256":"s0"}"#, b"wasm-0").await.unwrap();
        assert!(a.put_version("acme/f", 1, "s0", &record(1, "s0"), b"wasm-0", true).await.unwrap());
        assert!(!b.put_version("acme/f", 1, "s0", &record(1, "s0"), b"wasm-0", true).await.unwrap(), "done already");
        // Two nodes deploying at once get distinct numbers, above what they know.
        let (n2, n3) = tokio::join!(a.next_version("acme/f", 1), b.next_version("acme/f", 1));
        let mut numbers = [n2.unwrap(), n3.unwrap()];
        numbers.sort_unstable();
        assert_eq!(numbers, [2, 3]);
        assert_eq!(a.next_version("acme/f", 9).await.unwrap(), 10, "never below the floor");
        // Version 3 written before version 2 (which took its number first):
        // the function stays on 3, version 2 is kept as a version.
        assert!(a.put_version("acme/f", 3, "s1", &record(3, "s1"), b"s1", false).await.unwrap());
        assert!(!b.put_version("acme/f", 2, "s1", &record(2, "s1"), b"s1", false).await.unwrap());
        let head = b.snapshot().await.unwrap().functions.into_iter().find(|(k, _)| k == "acme/f").unwrap();
        assert_eq!(head.1, record(3, "s1"));
        for (v, sha) in [(10, "s2")] {
            assert!(a.put_version("acme/f", v, sha, &record(v, sha), sha.as_bytes(), false).await.unwrap());
        }
        let functions = b.snapshot().await.unwrap().functions;
        let head = functions.iter().find(|(k, _)| k == "acme/f").unwrap();
        assert_eq!(head.1, record(10, "s2"), "the function's record is the newest version's");
        assert_eq!(functions.len(), 5);
        // Aliases name existing versions only; an aliased or the newest version is kept.
        let prod = br#"{"versions":[{"version":2,"weight":90},{"version":3,"weight":10}]}"#;
        assert_eq!(a.set_alias("acme/f", "prod", Some(prod), &[2, 3], 16).await.unwrap(), AliasChange::Done);
        let bad = br#"{"versions":[{"version":7,"weight":1}]}"#;
        assert_eq!(a.set_alias("acme/f", "x", Some(bad), &[7], 16).await.unwrap(), AliasChange::NoSuchVersion(7));
        assert_eq!(a.set_alias("acme/f", "x", None, &[], 16).await.unwrap(), AliasChange::NoSuchAlias);
        let one = br#"{"versions":[{"version":3,"weight":1}]}"#;
        assert_eq!(a.set_alias("acme/f", "more", Some(one), &[3], 1).await.unwrap(), AliasChange::TooMany);
        assert_eq!(
            a.set_alias("acme/f", "prod", Some(prod), &[2, 3], 1).await.unwrap(),
            AliasChange::Done,
            "a change is no new one"
        );
        assert_eq!(b.remove_version("acme/f", 2).await.unwrap(), VersionRemoval::Kept);
        assert_eq!(b.remove_version("acme/f", 3).await.unwrap(), VersionRemoval::Kept);
        assert_eq!(b.remove_version("acme/f", 10).await.unwrap(), VersionRemoval::Kept, "the newest");
        assert_eq!(b.remove_version("acme/f", 1).await.unwrap(), VersionRemoval::Removed);
        assert_eq!(b.wasm("s0").await.unwrap(), None, "version 1's wasm went with it");
        assert_eq!(b.remove_version("acme/f", 1).await.unwrap(), VersionRemoval::Missing);
        // A pinned `latest` is dropped by the next deploy; others stay.
        let pin = br#"{"versions":[{"version":3,"weight":1}]}"#;
        assert_eq!(a.set_alias("acme/f", "latest", Some(pin), &[3], 16).await.unwrap(), AliasChange::Done);
        assert!(a.put_version("acme/f", 11, "s2", &record(11, "s2"), b"s2", false).await.unwrap());
        let aliases = b.snapshot().await.unwrap().aliases;
        assert_eq!(aliases.len(), 1);
        let decoded: serde_json::Value = serde_json::from_slice(&aliases[0].1).unwrap();
        assert_eq!(decoded, serde_json::json!({ "prod": serde_json::from_slice::<serde_json::Value>(prod).unwrap() }));
        assert_eq!(a.set_alias("acme/f", "prod", None, &[], 16).await.unwrap(), AliasChange::Done);
        assert_eq!(b.remove_version("acme/f", 2).await.unwrap(), VersionRemoval::Removed, "no longer aliased");
        // Removing the function takes every version, alias and the counter.
        assert_eq!(a.set_alias("acme/f", "prod", Some(pin), &[3], 16).await.unwrap(), AliasChange::Done);
        assert!(a.remove_function("acme/f", &[]).await.unwrap());
        let after = b.snapshot().await.unwrap();
        assert!(after.functions.is_empty() && after.aliases.is_empty(), "{after:?}");
        for sha in ["s1", "s2"] {
            assert_eq!(b.wasm(sha).await.unwrap(), None);
        }
        assert_eq!(a.next_version("acme/f", 0).await.unwrap(), 1, "a new function of the name starts again");
    }

    #[tokio::test]
    async fn the_first_admin_token_and_secret_are_the_clusters() {
        let redis = RedisServer::start();
        let a = registry(&redis).await;
        let b = registry(&redis).await;
        a.claim_admin("hash-1").await.unwrap();
        b.claim_admin("hash-1").await.unwrap();
        assert!(matches!(b.claim_admin("hash-2").await, Err(ClusterError::AdminToken)));
        let secret = a.secret().await.unwrap();
        assert_eq!(secret.len(), 64);
        assert_eq!(b.secret().await.unwrap(), secret, "every node gets the first one's secret");
    }

    /// The reference counts as Redis has them, by sha.
    async fn refs(registry: &SharedRegistry) -> Vec<(String, i64)> {
        let mut refs: Vec<(String, i64)> = registry.conn.clone().hgetall("t:wasm-refs").await.unwrap();
        refs.sort();
        refs
    }

    fn counts(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
        pairs.iter().map(|(sha, n)| (sha.to_string(), *n)).collect()
    }

    #[tokio::test]
    async fn wasm_is_counted_by_the_records_that_name_it_and_goes_with_the_last() {
        let redis = RedisServer::start();
        let r = registry(&redis).await;
        r.put_function("acme/one", "s1", br#"{"sha256":"s1"}"#, b"wasm-1").await.unwrap();
        r.put_function("acme/two", "s1", br#"{"sha256":"s1"}"#, b"wasm-1").await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 2)]));
        // A redeploy with the same bytes (a new env, say) changes no count.
        r.put_function("acme/one", "s1", br#"{"sha256":"s1","env":[]}"#, b"wasm-1").await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 2)]));
        // A redeploy with other bytes moves one reference.
        r.put_function("acme/two", "s2", br#"{"sha256":"s2"}"#, b"wasm-2").await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 1), ("s2", 1)]));
        assert!(r.wasm("s1").await.unwrap().is_some(), "acme/one still uses s1");
        // Back to s1: s2 loses its last reference and goes.
        r.put_function("acme/two", "s1", br#"{"sha256":"s1"}"#, b"wasm-1").await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 2)]));
        assert_eq!(r.wasm("s2").await.unwrap(), None);
        // Removing one of two users keeps the wasm; the second takes it.
        assert!(r.remove_function("acme/one", &[]).await.unwrap());
        assert_eq!(refs(&r).await, counts(&[("s1", 1)]));
        assert!(r.wasm("s1").await.unwrap().is_some());
        assert!(!r.remove_function("acme/one", &[]).await.unwrap());
        assert_eq!(refs(&r).await, counts(&[("s1", 1)]), "a removal of nothing changes no count");
        assert!(r.remove_function("acme/two", &[]).await.unwrap());
        assert_eq!(r.wasm("s1").await.unwrap(), None);
        assert!(refs(&r).await.is_empty());
        assert_eq!(redis.command(&["EXISTS", "t:wasm-refs"]), ":0");
    }

    #[tokio::test]
    async fn counts_missing_from_an_older_version_are_rebuilt_once() {
        let redis = RedisServer::start();
        let r = registry(&redis).await;
        // What an older node left: records and wasm, no counts.
        for (key, sha) in [("acme/one", "s1"), ("acme/two", "s1"), ("acme/three", "s3")] {
            redis.command(&["HSET", "t:functions", key, &format!(r#"{{"sha256":"{sha}"}}"#)]);
            redis.command(&["SET", &format!("t:wasm:{sha}"), "wasm"]);
        }
        // The first removal counts every record first, then lets go of one.
        assert!(r.remove_function("acme/one", &[]).await.unwrap());
        assert_eq!(refs(&r).await, counts(&[("s1", 1), ("s3", 1)]));
        assert!(r.wasm("s1").await.unwrap().is_some(), "acme/two still uses it");
        // From then on the counts are kept, not rebuilt.
        r.put_function("acme/four", "s3", br#"{"sha256":"s3"}"#, b"wasm").await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 1), ("s3", 2)]));
        assert!(r.remove_function("acme/two", &[]).await.unwrap());
        assert_eq!(r.wasm("s1").await.unwrap(), None);

        // The same when the first change is a deploy, and when it is a
        // republish after Redis lost part of the registry.
        let redis = RedisServer::start();
        let r = registry(&redis).await;
        redis.command(&["HSET", "t:functions", "acme/one", r#"{"sha256":"s1"}"#]);
        redis.command(&["SET", "t:wasm:s1", "wasm"]);
        r.put_function("acme/two", "s1", br#"{"sha256":"s1"}"#, b"wasm").await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 2)]));
        let redis = RedisServer::start();
        let r = registry(&redis).await;
        redis.command(&["HSET", "t:functions", "acme/one", r#"{"sha256":"s1"}"#]);
        redis.command(&["SET", "t:wasm:s1", "wasm"]);
        let functions = [
            Republished {
                key: "acme/one",
                sha256: "s1",
                record: br#"{"sha256":"s1"}"#.to_vec(),
                wasm: b"wasm".to_vec(),
            },
            Republished { key: "acme/two", sha256: "s2", record: br#"{"sha256":"s2"}"#.to_vec(), wasm: b"w2".to_vec() },
        ];
        r.republish(&[], &functions, &[]).await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 1), ("s2", 1)]));
        assert_eq!(r.wasm("s2").await.unwrap().as_deref(), Some(&b"w2"[..]));
        r.republish(&[], &functions, &[]).await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 1), ("s2", 1)]), "a second republish adds nothing");
    }
}
