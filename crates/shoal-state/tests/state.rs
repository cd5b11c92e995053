//! The state tiers against a plain in-memory model (proptest): whatever
//! sequence of operations runs, each global tier backend — the embedded
//! store and a real `redis-server` started for the test — answers as a map
//! of byte vectors would, and a local tier pushed through dirty chunks ends
//! up equal to the global copy. Then limits (each key charged its overhead
//! and name, stores counted the old way), isolation, deleting a tenant,
//! durability, lock leases and Redis faults.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use shoal_state::{
    EmbeddedGlobal, EmbeddedStore, EmbeddedTier, GlobalTier, KEY_OVERHEAD_BYTES, LeaseToken, LocalTier, RedisConfig,
    RedisTier, ScopedKey, StateError, StateLimits, StateTiers, Table, key_charge, parse_counter,
};
use shoal_testkit::RedisServer;

#[derive(Clone, Debug)]
enum Op {
    Set(usize, u8, usize),
    Append(usize, u8, usize),
    Delete(usize),
    Incr(usize, i64),
    GetRange(usize, u64, u64),
}

const KEYS: [&str; 3] = ["a", "../b", "c\0d"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..KEYS.len(), any::<u8>(), 0usize..150_000).prop_map(|(k, b, n)| Op::Set(k, b, n)),
        // Short runs of digits too, so `incr` meets numbers and non-numbers.
        (0..KEYS.len(), b'-'..=b'9', 0usize..4).prop_map(|(k, b, n)| Op::Set(k, b, n)),
        (0..KEYS.len(), any::<u8>(), 0usize..70_000).prop_map(|(k, b, n)| Op::Append(k, b, n)),
        (0..KEYS.len()).prop_map(Op::Delete),
        (0..KEYS.len(), -1000i64..1000).prop_map(|(k, d)| Op::Incr(k, d)),
        (0..KEYS.len(), 0u64..200_000, 0u64..100_000).prop_map(|(k, o, l)| Op::GetRange(k, o, l)),
    ]
}

fn key(i: usize) -> ScopedKey {
    ScopedKey::new("t", KEYS[i]).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Embedded,
    Redis,
}

const BOTH: [Backend; 2] = [Backend::Embedded, Backend::Redis];

/// A Tokio runtime, a Redis server and a directory; every tier made from
/// them is fresh (its own redb file or its own Redis key prefix).
struct Env {
    rt: tokio::runtime::Runtime,
    redis: RedisServer,
    dir: tempfile::TempDir,
    made: AtomicUsize,
}

impl Env {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        Self { rt, redis: RedisServer::start(), dir: tempfile::tempdir().unwrap(), made: AtomicUsize::new(0) }
    }

    fn tier(&self, backend: Backend, limits: StateLimits) -> Arc<dyn GlobalTier> {
        self.raw_tier(backend, limits).0
    }

    /// A fresh tier and a way to look at (and tamper with) what it stores.
    fn raw_tier(&self, backend: Backend, limits: StateLimits) -> (Arc<dyn GlobalTier>, Raw) {
        let n = self.made.fetch_add(1, Ordering::Relaxed);
        match backend {
            Backend::Embedded => {
                let store = Arc::new(EmbeddedStore::open(&self.dir.path().join(format!("{n}.redb"))).unwrap());
                (Arc::new(EmbeddedTier::new(EmbeddedGlobal::new(store.clone(), limits))), Raw::Embedded(store))
            }
            Backend::Redis => {
                let prefix = format!("t{n}");
                let tier = self.redis_tier(RedisConfig { prefix: prefix.clone(), limits, ..self.redis_config() });
                (tier, Raw::Redis { url: self.redis.url().to_string(), prefix })
            }
        }
    }

    fn redis_config(&self) -> RedisConfig {
        RedisConfig::new(self.redis.url())
    }

    fn redis_tier(&self, config: RedisConfig) -> Arc<dyn GlobalTier> {
        let _guard = self.rt.enter();
        Arc::new(RedisTier::connect(config).unwrap())
    }
}

/// The store under a tier, read and written behind its back: the layout
/// each backend documents (`global/embedded.rs`, `global/redis.rs`).
enum Raw {
    Embedded(Arc<EmbeddedStore>),
    Redis { url: String, prefix: String },
}

/// The embedded backend's tables: every one a state key can reach.
const TABLES: [&str; 4] = ["state_meta", "state_chunks", "state_usage", "state_usage2"];

impl Raw {
    async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
        redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
    }

    /// Every entry (embedded: `table: key`) or key (Redis) that mentions
    /// `tenant`, found by scanning the whole store.
    async fn everything_of(&self, tenant: &str) -> Vec<String> {
        match self {
            Raw::Embedded(store) => TABLES
                .iter()
                .flat_map(|table| {
                    let entries = store.scan_prefix(Table::new(table), tenant).unwrap();
                    entries.into_iter().map(move |(key, _)| format!("{table}: {key:?}"))
                })
                .collect(),
            Raw::Redis { url, prefix } => {
                let pattern = format!("{prefix}:*{tenant}*");
                let keys: Vec<String> =
                    redis::cmd("KEYS").arg(pattern).query_async(&mut Self::redis(url).await).await.unwrap();
                // `{prefix}:{kind}:{tenant}[/{key}]`: another tenant's key
                // may hold the name too (`kept/gone`); it is not this one's.
                keys.into_iter()
                    .filter(|key| key.splitn(3, ':').nth(2).is_some_and(|rest| rest.split('/').next() == Some(tenant)))
                    .collect()
            }
        }
    }

    /// The tenant's counters: (the old one of value bytes, the new one).
    async fn counters(&self, tenant: &str) -> (Option<u64>, Option<u64>) {
        match self {
            Raw::Embedded(store) => {
                let read = |table| {
                    store.get(Table::new(table), tenant).unwrap().map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                };
                (read("state_usage"), read("state_usage2"))
            }
            Raw::Redis { url, prefix } => {
                let mut conn = Self::redis(url).await;
                let mut get = async |key: String| -> Option<u64> {
                    redis::cmd("GET").arg(key).query_async(&mut conn).await.unwrap()
                };
                (get(format!("{prefix}:u:{tenant}")).await, get(format!("{prefix}:u2:{tenant}")).await)
            }
        }
    }

    /// Make `tenant`'s counters what a store written before keys were
    /// charged has: only the old one, of `value_bytes`.
    async fn make_old(&self, tenant: &str, value_bytes: u64) {
        match self {
            Raw::Embedded(store) => {
                store.delete(Table::new("state_usage2"), tenant).unwrap();
                store.put(Table::new("state_usage"), tenant, &value_bytes.to_le_bytes()).unwrap();
            }
            Raw::Redis { url, prefix } => {
                let mut conn = Self::redis(url).await;
                let () = redis::cmd("DEL").arg(format!("{prefix}:u2:{tenant}")).query_async(&mut conn).await.unwrap();
                let () = redis::cmd("SET")
                    .arg(format!("{prefix}:u:{tenant}"))
                    .arg(value_bytes)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }
        assert_eq!(self.counters(tenant).await, (Some(value_bytes), None));
    }

    /// Milliseconds the lock lease on `key` has left (Redis), if any.
    async fn lease_left(&self, key: &ScopedKey) -> Option<i64> {
        let Raw::Redis { url, prefix } = self else { return None };
        let left: i64 = redis::cmd("PTTL")
            .arg(format!("{prefix}:l:{}", key.as_str()))
            .query_async(&mut Self::redis(url).await)
            .await
            .unwrap();
        Some(left)
    }
}

/// What the model's keys count for against the quota.
fn charged(model: &BTreeMap<usize, Vec<u8>>) -> u64 {
    model.iter().map(|(k, v)| key_charge(KEYS[*k], v.len() as u64)).sum()
}

async fn behaves_like_a_map(tier: &dyn GlobalTier, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    for op in ops.iter().cloned() {
        match op {
            Op::Set(k, b, n) => {
                tier.set(&key(k), vec![b; n]).await.unwrap();
                model.insert(k, vec![b; n]);
            }
            Op::Append(k, b, n) => {
                let len = tier.append(&key(k), vec![b; n]).await.unwrap();
                let value = model.entry(k).or_default();
                value.extend(std::iter::repeat_n(b, n));
                prop_assert_eq!(len, value.len() as u64);
            }
            Op::Delete(k) => {
                prop_assert_eq!(tier.delete(&key(k)).await.unwrap(), model.remove(&k).is_some());
            }
            Op::Incr(k, d) => {
                let expected = match model.get(&k) {
                    None => Some(0),
                    Some(v) => parse_counter(v),
                };
                match (tier.incr(&key(k), d).await, expected) {
                    (Ok(got), Some(before)) => {
                        prop_assert_eq!(got, before + d);
                        model.insert(k, (before + d).to_string().into_bytes());
                    }
                    (Err(StateError::NotAnInteger(_)), None) => {}
                    (got, expected) => prop_assert!(false, "incr: got {:?}, model {:?}", got, expected),
                }
            }
            Op::GetRange(k, o, l) => {
                let expected = model.get(&k).map(|v| {
                    let start = (o as usize).min(v.len());
                    let end = (start + l as usize).min(v.len());
                    v[start..end].to_vec()
                });
                prop_assert_eq!(tier.get_range(&key(k), o, l).await.unwrap(), expected);
            }
        }
    }
    for k in 0..KEYS.len() {
        prop_assert_eq!(tier.get(&key(k)).await.unwrap(), model.get(&k).cloned());
    }
    prop_assert_eq!(tier.usage("t").await.unwrap(), charged(&model), "usage equals the sum of the keys' charges");
    let listed: Vec<String> = tier.list("t").await.unwrap().into_iter().map(|(k, _)| k).collect();
    let mut expected: Vec<String> = model.keys().map(|k| key(*k).key().to_string()).collect();
    expected.sort();
    prop_assert_eq!(listed, expected);
    Ok(())
}

#[test]
fn every_global_tier_behaves_like_a_map() {
    let env = Env::new();
    let mut runner = TestRunner::new(Config { cases: 48, ..Config::default() });
    runner
        .run(&proptest::collection::vec(op(), 1..16), |ops| {
            for backend in BOTH {
                let tier = env.tier(backend, StateLimits::default());
                env.rt
                    .block_on(behaves_like_a_map(&*tier, &ops))
                    .map_err(|e| TestCaseError::fail(format!("{backend:?}: {e}")))?;
            }
            Ok(())
        })
        .unwrap();
}

async fn pushes_converge(
    tier: &dyn GlobalTier,
    writes: &[(u64, u8, usize)],
    push_every: usize,
) -> Result<(), TestCaseError> {
    let local = LocalTier::default();
    let k = key(0);
    let mut model: Vec<u8> = Vec::new();
    for (i, (offset, b, n)) in writes.iter().copied().enumerate() {
        local.set_range(&k, offset, &vec![b; n]).unwrap();
        let end = offset as usize + n;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[offset as usize..end].fill(b);
        if i % push_every == 0 {
            let dirty = tier.write_chunks(&k, local.dirty_chunks(&k).unwrap()).await.unwrap();
            local.mark_clean(&k, &dirty);
            prop_assert_eq!(tier.get(&k).await.unwrap().unwrap(), model.clone());
        }
    }
    let dirty = local.dirty_chunks(&k).unwrap();
    tier.write_chunks(&k, dirty).await.unwrap();
    prop_assert_eq!(tier.get(&k).await.unwrap().unwrap(), model.clone());
    prop_assert_eq!(local.get(&k).unwrap(), model);
    Ok(())
}

#[test]
fn pushing_dirty_chunks_makes_every_global_copy_equal() {
    let env = Env::new();
    let mut runner = TestRunner::new(Config { cases: 48, ..Config::default() });
    let writes = proptest::collection::vec((0u64..200_000, any::<u8>(), 1usize..70_000), 1..12);
    runner
        .run(&(writes, 1usize..4), |(writes, push_every)| {
            for backend in BOTH {
                let tier = env.tier(backend, StateLimits::default());
                env.rt
                    .block_on(pushes_converge(&*tier, &writes, push_every))
                    .map_err(|e| TestCaseError::fail(format!("{backend:?}: {e}")))?;
            }
            Ok(())
        })
        .unwrap();
}

fn k(tenant: &str, key: &str) -> ScopedKey {
    ScopedKey::new(tenant, key).unwrap()
}

#[test]
fn a_value_that_shrinks_and_grows_again_never_shows_old_bytes() {
    let env = Env::new();
    let chunk = shoal_state::CHUNK_BYTES;
    for backend in BOTH {
        let tier = env.tier(backend, StateLimits::default());
        env.rt.block_on(async {
            let key = k("t", "v");
            tier.set(&key, vec![1; 3 * chunk]).await.unwrap();
            tier.set(&key, vec![2; 10]).await.unwrap();
            tier.append(&key, vec![3; 2 * chunk]).await.unwrap();
            let mut expected = vec![2; 10];
            expected.resize(10 + 2 * chunk, 3);
            assert!(tier.get(&key).await.unwrap().unwrap() == expected, "{backend:?}: after set + append");
            // The same through a push that shrinks the value.
            let local = LocalTier::default();
            local.set(&key, vec![4; 3 * chunk]).unwrap();
            local.mark_clean(&key, &tier.write_chunks(&key, local.dirty_chunks(&key).unwrap()).await.unwrap());
            local.set(&key, vec![5; 1]).unwrap();
            tier.write_chunks(&key, local.dirty_chunks(&key).unwrap()).await.unwrap();
            tier.append(&key, vec![6; chunk]).await.unwrap();
            let mut expected = vec![5];
            expected.resize(1 + chunk, 6);
            assert!(tier.get(&key).await.unwrap().unwrap() == expected, "{backend:?}: after push + append");
        });
    }
}

#[test]
fn refused_writes_change_nothing() {
    let env = Env::new();
    for backend in BOTH {
        let tier = env.tier(backend, StateLimits { max_value_bytes: 1000, tenant_quota_bytes: 1500 });
        env.rt.block_on(async {
            let (a, b) = (k("t", "a"), k("t", "b"));
            tier.set(&a, vec![1; 1000]).await.unwrap();
            assert!(matches!(tier.set(&a, vec![2; 1001]).await, Err(StateError::TooLarge(_))), "{backend:?}");
            assert_eq!(tier.get(&a).await.unwrap().unwrap(), vec![1; 1000], "no partial write");
            assert!(matches!(tier.set(&b, vec![3; 600]).await, Err(StateError::LimitExceeded(_))), "{backend:?}");
            assert!(matches!(tier.append(&a, vec![4]).await, Err(StateError::TooLarge(_))), "{backend:?}");
            assert_eq!(tier.get(&b).await.unwrap(), None);
            assert_eq!(tier.usage("t").await.unwrap(), key_charge("a", 1000));
            // Shrinking is always allowed, and frees quota.
            tier.set(&a, vec![5; 10]).await.unwrap();
            tier.set(&b, vec![6; 600]).await.unwrap();
            assert_eq!(tier.usage("t").await.unwrap(), key_charge("a", 10) + key_charge("b", 600));
            // A counter that would overflow is refused and keeps its value.
            let c = k("t", "c");
            tier.incr(&c, i64::MAX).await.unwrap();
            assert!(matches!(tier.incr(&c, 1).await, Err(StateError::LimitExceeded(_))), "{backend:?}");
            assert_eq!(tier.incr(&c, 0).await.unwrap(), i64::MAX);
        });
    }
}

#[test]
fn every_key_costs_its_overhead_and_name_once_and_gives_it_all_back() {
    let env = Env::new();
    let quota = 1000;
    for backend in BOTH {
        let tier = env.tier(backend, StateLimits { max_value_bytes: 1000, tenant_quota_bytes: quota });
        env.rt.block_on(async {
            let empty = k("t", "empty");
            tier.set(&empty, Vec::new()).await.unwrap();
            assert_eq!(tier.usage("t").await.unwrap(), KEY_OVERHEAD_BYTES + 5, "{backend:?}: an empty key costs");
            tier.set(&empty, Vec::new()).await.unwrap();
            tier.set(&empty, vec![1; 10]).await.unwrap();
            assert_eq!(tier.usage("t").await.unwrap(), key_charge("empty", 10), "{backend:?}: charged once");
            // `append` and `incr` creating a key charge it, even for nothing.
            tier.append(&k("t", "log"), b"12345".to_vec()).await.unwrap();
            tier.append(&k("t", "nil"), Vec::new()).await.unwrap();
            assert_eq!(tier.incr(&k("t", "n"), 7).await.unwrap(), 7);
            let all = key_charge("empty", 10) + key_charge("log", 5) + key_charge("nil", 0) + key_charge("n", 1);
            assert_eq!(tier.usage("t").await.unwrap(), all, "{backend:?}");
            // Growing an existing key charges only the growth.
            tier.append(&k("t", "log"), b"678".to_vec()).await.unwrap();
            assert_eq!(tier.incr(&k("t", "n"), 3).await.unwrap(), 10);
            assert_eq!(tier.usage("t").await.unwrap(), all + 3 + 1, "{backend:?}");
            // Deleting gives back the whole charge.
            for key in ["empty", "log", "nil", "n"] {
                assert!(tier.delete(&k("t", key)).await.unwrap());
            }
            assert_eq!(tier.usage("t").await.unwrap(), 0, "{backend:?}");

            // Empty keys cannot be made without end: each costs.
            let per_key = key_charge("k0", 0);
            let fit = quota / per_key;
            for i in 0..fit {
                tier.set(&k("t", &format!("k{i}")), Vec::new()).await.unwrap();
            }
            let over = k("t", &format!("k{fit}"));
            let refused = tier.set(&over, Vec::new()).await;
            assert!(matches!(&refused, Err(StateError::LimitExceeded(m)) if m.contains(&format!("would use {}", (fit + 1) * per_key))), "{backend:?}: {refused:?}");
            assert!(matches!(tier.append(&over, Vec::new()).await, Err(StateError::LimitExceeded(_))), "{backend:?}");
            assert!(matches!(tier.incr(&over, 1).await, Err(StateError::LimitExceeded(_))), "{backend:?}");
            assert_eq!(tier.get(&over).await.unwrap(), None, "{backend:?}: nothing written");
            assert_eq!(tier.list("t").await.unwrap().len() as u64, fit);
            assert_eq!(tier.usage("t").await.unwrap(), fit * per_key);
            // Rewriting a key in place is not growth, even at the quota.
            tier.set(&k("t", "k0"), Vec::new()).await.unwrap();
            assert_eq!(tier.usage("t").await.unwrap(), fit * per_key);
        });
    }
}

#[test]
fn a_store_counted_in_value_bytes_only_is_recounted_once_and_never_underflows() {
    let env = Env::new();
    for backend in BOTH {
        let (tier, raw) = env.raw_tier(backend, StateLimits::default());
        env.rt.block_on(async {
            tier.set(&k("t", "a"), vec![1; 1000]).await.unwrap();
            tier.set(&k("t", "bb"), Vec::new()).await.unwrap();
            tier.incr(&k("t", "n"), 5).await.unwrap();
            tier.set(&k("other", "x"), vec![2; 10]).await.unwrap();
            let charged = key_charge("a", 1000) + key_charge("bb", 0) + key_charge("n", 1);
            assert_eq!(raw.counters("t").await, (None, Some(charged)), "{backend:?}");
            // As the old code left it: one counter, of value bytes.
            raw.make_old("t", 1001).await;
            assert_eq!(tier.usage("t").await.unwrap(), charged, "{backend:?}: computed from the keys");
            assert_eq!(raw.counters("t").await, (Some(1001), None), "{backend:?}: a read stores nothing");
            // The quota is checked against the computed usage, not the old
            // counter; a refusal changes nothing, counters included.
            tier.set_tenant_quota("t", Some(charged + key_charge("c", 99)));
            let refused = tier.set(&k("t", "c"), vec![3; 100]).await;
            assert!(matches!(refused, Err(StateError::LimitExceeded(_))), "{backend:?}: {refused:?}");
            assert_eq!(raw.counters("t").await, (Some(1001), None), "{backend:?}");
            tier.set(&k("t", "c"), vec![3; 99]).await.unwrap();
            let charged = charged + key_charge("c", 99);
            assert_eq!(raw.counters("t").await, (None, Some(charged)), "{backend:?}: stored once, the old one gone");
            assert_eq!(tier.usage("t").await.unwrap(), charged);
            assert_eq!(tier.usage("other").await.unwrap(), key_charge("x", 10), "{backend:?}: per tenant");

            // Old counters too small to pay for a delete: the first delete
            // recounts, and none goes below zero.
            raw.make_old("t", 0).await;
            let mut left = charged;
            for (key, len) in [("a", 1000), ("bb", 0), ("n", 1), ("c", 99)] {
                assert!(tier.delete(&k("t", key)).await.unwrap());
                left -= key_charge(key, len);
                assert_eq!(tier.usage("t").await.unwrap(), left, "{backend:?}: after deleting {key}");
            }
            assert_eq!(raw.counters("t").await, (None, Some(0)), "{backend:?}");
            // The same with `append` and `incr` as the first write.
            tier.set(&k("t", "a"), vec![1; 10]).await.unwrap();
            raw.make_old("t", 10).await;
            tier.append(&k("t", "a"), vec![1; 5]).await.unwrap();
            assert_eq!(tier.usage("t").await.unwrap(), key_charge("a", 15), "{backend:?}");
            raw.make_old("t", 15).await;
            tier.incr(&k("t", "n"), 1).await.unwrap();
            assert_eq!(tier.usage("t").await.unwrap(), key_charge("a", 15) + key_charge("n", 1), "{backend:?}");
            assert_eq!(raw.counters("t").await.0, None);
        });
    }
}

#[test]
fn deleting_a_tenant_removes_all_it_stored_in_batches_and_nothing_else() {
    let env = Env::new();
    let chunk = shoal_state::CHUNK_BYTES;
    for backend in BOTH {
        let (tier, raw) = env.raw_tier(backend, StateLimits::default());
        let tiers = StateTiers::new(tier.clone());
        env.rt.block_on(async {
            // More keys than one batch, and a value of several chunks.
            let small = 2_500;
            for i in 0..small {
                tier.set(&k("gone", &format!("key-{i:05}")), vec![i as u8; 3]).await.unwrap();
            }
            tier.set(&k("gone", "big"), vec![9; 3 * chunk + 5]).await.unwrap();
            tier.incr(&k("gone", "n"), 1).await.unwrap();
            tier.set_tenant_quota("gone", Some(1 << 40));
            let lock = k("gone", "big");
            assert!(tier.try_lock(&lock, &LeaseToken::random(), Duration::from_secs(30)).await.unwrap());
            // A value written on this node and never pushed.
            tiers.set(&k("gone", "local"), vec![7; 100]).await.unwrap();
            for key in ["x", "gone"] {
                tier.set(&k("kept", key), b"stays".to_vec()).await.unwrap();
            }
            let kept_usage = tier.usage("kept").await.unwrap();
            assert!(!raw.everything_of("gone").await.is_empty());

            let deleted = tiers.delete_tenant("gone").await.unwrap();
            assert_eq!(deleted, small + 2, "{backend:?}");
            assert_eq!(tier.list("gone").await.unwrap(), Vec::<(String, u64)>::new(), "{backend:?}");
            assert_eq!(tier.usage("gone").await.unwrap(), 0, "{backend:?}");
            assert_eq!(tier.get(&k("gone", "big")).await.unwrap(), None, "{backend:?}");
            assert_eq!(tiers.get(&k("gone", "local")).await.unwrap(), None, "{backend:?}: the local copy went too");
            assert_eq!(tiers.local().bytes_of("gone"), Default::default());
            assert_eq!(tier.quota_of("gone"), StateLimits::default().tenant_quota_bytes, "its own quota is forgotten");
            let mut left = raw.everything_of("gone").await;
            if let Some(ms) = raw.lease_left(&lock).await {
                // Redis: the lease is not in the tenant's index; it expires.
                assert!(ms > 0, "{backend:?}: the lock key has a lease ({ms})");
                left.retain(|key| !key.contains(":l:"));
            } else {
                assert!(tier.try_lock(&lock, &LeaseToken::random(), Duration::from_secs(1)).await.unwrap());
            }
            assert_eq!(left, Vec::<String>::new(), "{backend:?}: nothing of the tenant is left in the store");
            // The other tenant (even its key named like the tenant) is untouched.
            assert_eq!(tier.list("kept").await.unwrap().len(), 2, "{backend:?}");
            assert_eq!(tier.get(&k("kept", "gone")).await.unwrap().unwrap(), b"stays");
            assert_eq!(tier.usage("kept").await.unwrap(), kept_usage);

            // Again: nothing to delete, no error.
            assert_eq!(tiers.delete_tenant("gone").await.unwrap(), 0, "{backend:?}");
            assert_eq!(tier.delete_tenant("never-was").await.unwrap(), 0, "{backend:?}");
            // A tenant of the same name starts from nothing.
            tier.set(&k("gone", "new"), vec![1; 4]).await.unwrap();
            assert_eq!(tier.usage("gone").await.unwrap(), key_charge("new", 4), "{backend:?}");
        });
    }
}

#[test]
fn tenants_never_see_each_others_keys() {
    let env = Env::new();
    for backend in BOTH {
        let tier = env.tier(backend, StateLimits::default());
        env.rt.block_on(async {
            tier.set(&k("acme", "x"), b"acme's".to_vec()).await.unwrap();
            for probe in ["../acme/x", "acme/x", "/acme/x", "x\0", "..\\acme\\x", ":v:acme/x", "}{acme/x"] {
                assert_eq!(tier.get(&k("other", probe)).await.unwrap(), None, "{backend:?} {probe:?}");
            }
            assert_eq!(tier.list("other").await.unwrap(), Vec::<(String, u64)>::new());
            assert_eq!(tier.list("acme").await.unwrap(), vec![("x".to_string(), 6)]);
            tier.set(&k("other", "x"), b"mine".to_vec()).await.unwrap();
            assert_eq!(tier.get(&k("acme", "x")).await.unwrap().unwrap(), b"acme's");
            let token = LeaseToken::random();
            assert!(tier.try_lock(&k("acme", "x"), &token, Duration::from_secs(10)).await.unwrap());
            assert!(
                tier.try_lock(&k("other", "x"), &LeaseToken::random(), Duration::from_secs(10)).await.unwrap(),
                "{backend:?}: locks are per tenant too"
            );
        });
    }
}

#[test]
fn acknowledged_writes_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        EmbeddedGlobal::new(store, StateLimits::default())
    };
    let counter = k("t", "counter");
    {
        let tier = open();
        tier.incr(&counter, 41).unwrap();
        tier.incr(&counter, 1).unwrap();
        tier.append(&k("t", "log"), b"one,").unwrap();
    }
    let tier = open();
    assert_eq!(tier.get(&counter).unwrap().unwrap(), b"42");
    assert_eq!(tier.incr(&counter, 0).unwrap(), 42);
    assert_eq!(tier.get(&k("t", "log")).unwrap().unwrap(), b"one,");
}

#[test]
fn a_lease_is_exclusive_released_only_by_its_holder_and_expires() {
    let env = Env::new();
    for backend in BOTH {
        let tier = env.tier(backend, StateLimits::default());
        env.rt.block_on(async {
            let key = k("t", "l");
            let (holder, other) = (LeaseToken::random(), LeaseToken::random());
            assert!(tier.try_lock(&key, &holder, Duration::from_secs(30)).await.unwrap());
            assert!(!tier.try_lock(&key, &other, Duration::from_secs(30)).await.unwrap(), "{backend:?}: exclusive");
            assert!(!tier.unlock(&key, &other).await.unwrap(), "{backend:?}: only the holder releases");
            assert!(tier.unlock(&key, &holder).await.unwrap());
            assert!(!tier.unlock(&key, &holder).await.unwrap(), "{backend:?}: released once");
            // A holder that never releases (it died): the lease expires.
            assert!(tier.try_lock(&key, &holder, Duration::from_millis(100)).await.unwrap());
            let taken = Instant::now();
            while !tier.try_lock(&key, &other, Duration::from_secs(30)).await.unwrap() {
                assert!(taken.elapsed() < Duration::from_secs(10), "{backend:?}: the lease never expired");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(taken.elapsed() >= Duration::from_millis(100), "{backend:?}: not before the lease ran out");
            assert!(!tier.unlock(&key, &holder).await.unwrap(), "{backend:?}: an expired holder releases nothing");
            assert!(tier.unlock(&key, &other).await.unwrap());
        });
    }
}

#[test]
fn waiting_for_a_lock_ends_at_the_deadline_with_unavailable() {
    let env = Env::new();
    for backend in BOTH {
        let tiers = StateTiers::new(env.tier(backend, StateLimits::default()));
        env.rt.block_on(async {
            let key = k("t", "busy");
            let lease = Duration::from_secs(30);
            let held = tiers.lock(&key, lease, Instant::now()).await.unwrap();
            let start = Instant::now();
            let waited = tiers.lock(&key, lease, start + Duration::from_millis(150)).await;
            assert!(matches!(waited, Err(StateError::Unavailable(_))), "{backend:?}: {waited:?}");
            assert!(start.elapsed() >= Duration::from_millis(150), "{backend:?}: gave up early");
            assert!(tiers.unlock(&key, &held).await.unwrap());
            // Released: the next waiter gets it at once.
            tiers.lock(&key, lease, Instant::now()).await.unwrap();
        });
    }
}

#[test]
fn the_tiers_count_the_bytes_they_move_and_push_only_dirty_chunks() {
    let env = Env::new();
    for backend in BOTH {
        let tiers = StateTiers::new(env.tier(backend, StateLimits::default()));
        env.rt.block_on(async {
            let key = k("t", "big");
            let chunk = shoal_state::CHUNK_BYTES as u64;
            tiers.set(&key, vec![7; 4 * chunk as usize]).await.unwrap();
            tiers.push(&key).await.unwrap();
            assert_eq!(tiers.stats().bytes_to_global, 4 * chunk);
            tiers.set_range(&key, chunk + 1, b"xy").await.unwrap();
            tiers.push(&key).await.unwrap();
            assert_eq!(tiers.stats().bytes_to_global, 5 * chunk, "{backend:?}: the second push sent one chunk");
            // Reads of a local value never touch the global tier.
            assert_eq!(tiers.get_range(&key, chunk, 4).await.unwrap().unwrap(), [7, b'x', b'y', 7]);
            assert_eq!(tiers.stats().bytes_from_global, 0);
            tiers.pull(&key).await.unwrap();
            assert_eq!(tiers.stats().bytes_from_global, 4 * chunk);
            assert_eq!(tiers.get_range(&key, chunk, 4).await.unwrap().unwrap(), [7, b'x', b'y', 7]);
        });
    }
}

#[test]
fn pushing_an_unchanged_copy_sends_nothing_and_never_brings_back_a_deleted_value() {
    let env = Env::new();
    let chunk = shoal_state::CHUNK_BYTES;
    for backend in BOTH {
        let global = env.tier(backend, StateLimits::default());
        // Two nodes' tiers over one global tier.
        let (a, b) = (StateTiers::new(global.clone()), StateTiers::new(global.clone()));
        env.rt.block_on(async {
            let key = k("t", "shared");
            a.set(&key, vec![9; 3 * chunk]).await.unwrap();
            a.push(&key).await.unwrap();
            assert_eq!(b.get(&key).await.unwrap().map(|v| v.len()), Some(3 * chunk), "b holds a clean copy");
            a.delete(&key).await.unwrap();
            let sent = b.stats().bytes_to_global;
            assert!(b.push(&key).await.unwrap(), "{backend:?}: the copy is there to push");
            assert_eq!(b.stats().bytes_to_global, sent, "{backend:?}: nothing sent");
            assert_eq!(global.get(&key).await.unwrap(), None, "{backend:?}: the deleted value came back");
        });
    }
}

/// Retry `op` until it succeeds; Redis may take a moment to come back.
async fn eventually<T>(what: &str, mut op: impl AsyncFnMut() -> Result<T, StateError>) -> T {
    let start = Instant::now();
    loop {
        match op().await {
            Ok(value) => return value,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(20), "{what} never recovered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_stopped_or_paused_redis_answers_unavailable_in_bounded_time_and_recovers() {
    let mut env = Env::new();
    let timeout = RedisConfig::new(String::new()).timeout;
    let tier = env.redis_tier(env.redis_config());
    let key = k("t", "k");
    env.rt.block_on(async {
        tier.set(&key, b"before".to_vec()).await.unwrap();
    });

    // Paused: connections stay open but nothing answers.
    env.redis.pause();
    env.rt.block_on(async {
        for _ in 0..3 {
            let start = Instant::now();
            let got = tier.get(&key).await;
            assert!(matches!(got, Err(StateError::Unavailable(_))), "paused: {got:?}");
            // Bounded by the timeout (plus scheduling slack), never hung.
            assert!(start.elapsed() < timeout + Duration::from_secs(2), "took {:?}", start.elapsed());
        }
    });
    env.redis.resume();
    env.rt.block_on(async {
        let value = eventually("get after resume", async || tier.get(&key).await).await;
        assert_eq!(value.unwrap(), b"before");
    });

    // Stopped: connections drop and new ones are refused.
    env.redis.stop();
    env.rt.block_on(async {
        let start = Instant::now();
        let got = tier.incr(&k("t", "n"), 1).await;
        assert!(matches!(got, Err(StateError::Unavailable(_))), "stopped: {got:?}");
        assert!(start.elapsed() < timeout + Duration::from_secs(2), "took {:?}", start.elapsed());
    });
    env.redis.restart();
    env.rt.block_on(async {
        // The restarted server is empty (nothing persisted); the tier works.
        eventually("set after restart", async || tier.set(&key, b"after".to_vec()).await).await;
        assert_eq!(tier.get(&key).await.unwrap().unwrap(), b"after");
        assert_eq!(tier.incr(&k("t", "n"), 5).await.unwrap(), 5);
    });
}
