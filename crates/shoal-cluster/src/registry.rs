//! The function registry every node of a cluster shares, in Redis.
//!
//! Keys (under the cluster's prefix `P`):
//! - `P:tenants` — hash, tenant name → its record (JSON, as the node wrote it);
//! - `P:functions` — hash, `tenant/name` → the function's record (JSON);
//! - `P:wasm:<sha256>` — the wasm bytes, once per content, shared by every
//!   function deployed with them, deleted with the last of them;
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
/// caller last saw); its wasm loses a reference (and goes with the last);
/// bump the version. Returns 1 if there was such a function. KEYS:
/// functions, version, refs; ARGV: key, wasm prefix.
const REMOVE_FUNCTION: &str = r"
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
count_refs(KEYS[1], KEYS[3])
redis.call('HDEL', KEYS[1], ARGV[1])
local sha = sha_of(record)
if sha then unref(KEYS[3], ARGV[2], sha) end
redis.call('INCR', KEYS[2])
return 1
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

/// Entries of a hash: field → value.
type Entries = Vec<(String, Vec<u8>)>;

/// Everything a node needs to mirror the registry, read at one moment.
#[derive(Debug, Default)]
pub struct RegistrySnapshot {
    pub version: u64,
    pub tenants: Entries,
    pub functions: Entries,
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

/// A function as a node re-publishes it after Redis lost the registry.
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
            remove_function: Script::new(&format!("{HELPERS}{REMOVE_FUNCTION}")),
            republish_function: Script::new(&format!("{HELPERS}{REPUBLISH_FUNCTION}")),
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

    /// Deploy: store the wasm (once per content) and the record, which
    /// must name it in its `sha256` field (that is what counts as a use).
    pub async fn put_function(&self, key: &str, sha256: &str, record: &[u8], wasm: &[u8]) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let wasm_key = self.wasm_key(sha256);
        for _ in 0..3 {
            let present: bool = conn.exists(&wasm_key).await.map_err(redis_error)?;
            if !present {
                let _: () = conn.set(&wasm_key, wasm).await.map_err(redis_error)?;
            }
            let stored: i64 = self
                .put_function
                .key(self.key("functions"))
                .key(self.key("registry:version"))
                .key(&wasm_key)
                .key(self.key("wasm-refs"))
                .arg(key)
                .arg(record)
                .arg(self.wasm_key(""))
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            if stored == 1 {
                return Ok(());
            }
        }
        Err(ClusterError::Redis(format!("the wasm of `{key}` kept being removed while it was deployed")))
    }

    /// Remove a function (and its wasm when no other function uses it).
    pub async fn remove_function(&self, key: &str) -> Result<bool, ClusterError> {
        let removed: i64 = self
            .remove_function
            .key(self.key("functions"))
            .key(self.key("registry:version"))
            .key(self.key("wasm-refs"))
            .arg(key)
            .arg(self.wasm_key(""))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(removed == 1)
    }

    /// The version with every tenant and function, read atomically.
    pub async fn snapshot(&self) -> Result<RegistrySnapshot, ClusterError> {
        let (version, tenants, functions): (Option<u64>, Entries, Entries) = redis::pipe()
            .atomic()
            .get(self.key("registry:version"))
            .hgetall(self.key("tenants"))
            .hgetall(self.key("functions"))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(RegistrySnapshot { version: version.unwrap_or(0), tenants, functions })
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

        assert!(a.remove_function("acme/one").await.unwrap());
        assert!(b.wasm("s1").await.unwrap().is_some(), "still used by acme/two");
        assert!(!a.remove_function("acme/one").await.unwrap(), "already gone");
        // A redeploy with other bytes lets go of the old wasm; an env var
        // that looks like a record's field keeps nothing alive.
        a.put_function("acme/nine", "s9", br#"{"sha256":"s9"}"#, b"wasm-9").await.unwrap();
        a.put_function("acme/nine", "s8", br#"{"sha256":"s8"}"#, b"wasm-8").await.unwrap();
        assert_eq!(b.wasm("s9").await.unwrap(), None, "replaced, and no one else's");
        assert!(b.remove_function("acme/two").await.unwrap());
        assert_eq!(b.wasm("s1").await.unwrap(), None, "the last user took the wasm with it");
        assert!(b.remove_function("acme/nine").await.unwrap());
        assert_eq!(b.wasm("s8").await.unwrap(), None);
        assert_eq!(a.version().await.unwrap().0, 9);
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
        assert!(r.remove_function("acme/one").await.unwrap());
        assert_eq!(refs(&r).await, counts(&[("s1", 1)]));
        assert!(r.wasm("s1").await.unwrap().is_some());
        assert!(!r.remove_function("acme/one").await.unwrap());
        assert_eq!(refs(&r).await, counts(&[("s1", 1)]), "a removal of nothing changes no count");
        assert!(r.remove_function("acme/two").await.unwrap());
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
        assert!(r.remove_function("acme/one").await.unwrap());
        assert_eq!(refs(&r).await, counts(&[("s1", 1), ("s3", 1)]));
        assert!(r.wasm("s1").await.unwrap().is_some(), "acme/two still uses it");
        // From then on the counts are kept, not rebuilt.
        r.put_function("acme/four", "s3", br#"{"sha256":"s3"}"#, b"wasm").await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 1), ("s3", 2)]));
        assert!(r.remove_function("acme/two").await.unwrap());
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
        r.republish(&[], &functions).await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 1), ("s2", 1)]));
        assert_eq!(r.wasm("s2").await.unwrap().as_deref(), Some(&b"w2"[..]));
        r.republish(&[], &functions).await.unwrap();
        assert_eq!(refs(&r).await, counts(&[("s1", 1), ("s2", 1)]), "a second republish adds nothing");
    }
}
