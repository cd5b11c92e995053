//! `state`: the state interface as guests use it.
//!
//! - `state_local`: 1,000 operations per call from a real guest on the
//!   local tier (`get`/`set` of 1 KiB, `get-range` of 4 KiB from a 64 MiB
//!   value, next to one `get` of the whole 64 MiB value for scale).
//! - `state_redis`: `push`/`pull` of 1 KiB and 1 MiB values against a real
//!   `redis-server` on loopback, a push of one dirty chunk next to a push
//!   of all of them; the embedded store's push for reference.
//! - `matvec`: the data-intensive example (2048 × 2048 `f32`, 16 MiB) with
//!   its matrix in the local tier vs pulled from Redis on every call; the
//!   bytes each call moves from the global tier are printed.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal_runtime::{CallSettings, FunctionImage, Runtime, RuntimeConfig};
use shoal_state::{
    EmbeddedGlobal, EmbeddedStore, EmbeddedTier, GlobalTier, RedisConfig, RedisTier, ScopedKey, StateLimits, StateTiers,
};
use shoal_testkit::RedisServer;

const OPS: u64 = 1000;

fn settings() -> CallSettings {
    CallSettings {
        tenant: Arc::from("bench"),
        memory_limit: 128 << 20,
        timeout: Duration::from_secs(30),
        env: Arc::from(Vec::new()),
        allowed_hosts: Arc::default(),
        config: Default::default(),
        trace: None,
    }
}

struct Bench {
    tokio: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    _redis: RedisServer,
    embedded: Arc<StateTiers>,
    redis: Arc<StateTiers>,
    on_embedded: Runtime,
    on_redis: Runtime,
}

impl Bench {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
        let redis_server = RedisServer::start();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).expect("store"));
        let embedded: Arc<dyn GlobalTier> =
            Arc::new(EmbeddedTier::new(EmbeddedGlobal::new(store, StateLimits::default())));
        let redis: Arc<dyn GlobalTier> = {
            let _guard = tokio.enter();
            Arc::new(RedisTier::connect(RedisConfig::new(redis_server.url())).expect("redis tier"))
        };
        let embedded = Arc::new(StateTiers::new(embedded));
        let redis = Arc::new(StateTiers::new(redis));
        let runtime = |tiers: &Arc<StateTiers>| {
            let mut config = RuntimeConfig::new(dir.path().join("cache"));
            config.max_instances = 16;
            Runtime::with_state(config, tiers.clone()).expect("runtime")
        };
        let (on_embedded, on_redis) = (runtime(&embedded), runtime(&redis));
        Self { tokio, _dir: dir, _redis: redis_server, embedded, redis, on_embedded, on_redis }
    }

    fn load(&self, runtime: &Runtime, wasm: &[u8]) -> Arc<FunctionImage> {
        self.tokio.block_on(runtime.load(wasm)).expect("guest loads")
    }

    fn call(&self, runtime: &Runtime, image: &FunctionImage, input: &[u8]) -> Vec<u8> {
        let out = self.tokio.block_on(runtime.call(image, &settings(), input));
        out.result.unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(input)))
    }
}

fn key(name: &str) -> ScopedKey {
    ScopedKey::new("bench", name).expect("key")
}

fn state_local(c: &mut Criterion, bench: &Bench) {
    let ops = bench.load(&bench.on_embedded, shoal_guests::STATE_OPS);
    bench.call(&bench.on_embedded, &ops, b"fill small 1 1024");
    let span = 64u64 << 20;
    bench.tokio.block_on(bench.embedded.set(&key("big"), vec![3; span as usize])).expect("64 MiB value");

    let mut group = c.benchmark_group("state_local");
    group.throughput(Throughput::Elements(OPS));
    let scripts = [
        ("get_1KiB_x1000", format!("loopget small {OPS}")),
        ("set_1KiB_x1000", format!("loopset small 1024 {OPS}")),
        ("get_range_4KiB_of_64MiB_x1000", format!("looprange big 4096 {OPS} {span}")),
        ("call_with_no_state_op", "loopget small 0".to_string()),
    ];
    for (name, script) in scripts {
        group.bench_function(name, |b| b.iter(|| bench.call(&bench.on_embedded, &ops, script.as_bytes())));
    }
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.bench_function("get_whole_64MiB_x1", |b| b.iter(|| bench.call(&bench.on_embedded, &ops, b"loopget big 1")));
    group.finish();
}

fn state_redis(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("state_redis");
    let rt = &bench.tokio;
    for (name, tiers) in [("redis", &bench.redis), ("embedded", &bench.embedded)] {
        for (size_name, size) in [("1KiB", 1usize << 10), ("1MiB", 1 << 20)] {
            let k = key(&format!("push-{size_name}"));
            rt.block_on(tiers.set(&k, vec![1; size])).expect("set");
            rt.block_on(tiers.push(&k)).expect("push");
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(format!("{name}/push_{size_name}_all_dirty"), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        tiers.set(&k, vec![2; size]).await.expect("set");
                        tiers.push(&k).await.expect("push")
                    })
                })
            });
            group.bench_function(format!("{name}/push_{size_name}_one_byte_changed"), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        tiers.set_range(&k, 10, &[9]).await.expect("set range");
                        tiers.push(&k).await.expect("push")
                    })
                })
            });
            group.bench_function(format!("{name}/pull_{size_name}"), |b| {
                b.iter(|| rt.block_on(tiers.pull(&k)).expect("pull"))
            });
        }
    }
    group.finish();
}

fn matvec(c: &mut Criterion, bench: &Bench) {
    let image = bench.load(&bench.on_redis, shoal_guests::MATVEC);
    bench.call(&bench.on_redis, &image, b"init 2048 2048");
    let mut group = c.benchmark_group("matvec_2048x2048");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(15));
    for (name, input) in [("local_tier", &b"mul 7"[..]), ("pull_from_redis_every_call", &b"mul-fresh 7"[..])] {
        let before = bench.redis.stats().bytes_from_global;
        let n_calls = 5;
        for _ in 0..n_calls {
            bench.call(&bench.on_redis, &image, input);
        }
        let per_call = (bench.redis.stats().bytes_from_global - before) / n_calls;
        println!("matvec {name}: {per_call} bytes from the global tier per call");
        group.bench_function(name, |b| b.iter(|| bench.call(&bench.on_redis, &image, input)));
    }
    group.finish();
}

fn all(c: &mut Criterion) {
    let bench = Bench::new();
    state_local(c, &bench);
    state_redis(c, &bench);
    matvec(c, &bench);
}

criterion_group!(benches, all);
criterion_main!(benches);
