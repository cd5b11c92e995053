//! The state tiers against a plain in-memory model (proptest): whatever
//! sequence of operations runs, each global tier backend — the embedded
//! store and a real `redis-server` started for the test — answers as a map
//! of byte vectors would, and a local tier pushed through dirty chunks ends
//! up equal to the global copy. Then limits, isolation, durability, lock
//! leases and Redis faults.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use shoal_state::{
    EmbeddedGlobal, EmbeddedStore, EmbeddedTier, GlobalTier, LeaseToken, LocalTier, RedisConfig, RedisTier, ScopedKey,
    StateError, StateLimits, StateTiers, parse_counter,
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
        let n = self.made.fetch_add(1, Ordering::Relaxed);
        match backend {
            Backend::Embedded => {
                let store = Arc::new(EmbeddedStore::open(&self.dir.path().join(format!("{n}.redb"))).unwrap());
                Arc::new(EmbeddedTier::new(EmbeddedGlobal::new(store, limits)))
            }
            Backend::Redis => self.redis_tier(RedisConfig { prefix: format!("t{n}"), limits, ..self.redis_config() }),
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
    let total: usize = model.values().map(Vec::len).sum();
    prop_assert_eq!(tier.usage("t").await.unwrap(), total as u64, "usage equals the sum of lengths");
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
            assert_eq!(tier.usage("t").await.unwrap(), 1000);
            // Shrinking is always allowed, and frees quota.
            tier.set(&a, vec![5; 10]).await.unwrap();
            tier.set(&b, vec![6; 600]).await.unwrap();
            assert_eq!(tier.usage("t").await.unwrap(), 610);
            // A counter that would overflow is refused and keeps its value.
            let c = k("t", "c");
            tier.incr(&c, i64::MAX).await.unwrap();
            assert!(matches!(tier.incr(&c, 1).await, Err(StateError::LimitExceeded(_))), "{backend:?}");
            assert_eq!(tier.incr(&c, 0).await.unwrap(), i64::MAX);
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
