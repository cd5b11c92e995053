//! `cold_start`: a new instance of a deployed function + one call + drop,
//! as in production (async, epoch deadlines, WASI context, pooling
//! allocator). Compares a component built with shoal-sdk (echo of 64
//! bytes) with a no-op WASI command module in the same run.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use shoal_runtime::{CallSettings, Language, LoadOptions, Runtime, RuntimeBinary, RuntimeConfig, SourceBundle};

fn cold_start(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.python_runtime = RuntimeBinary::new(shoal_guests::PYTHON_RUNTIME);
    let runtime = Runtime::new(config).expect("runtime");
    let settings = CallSettings {
        tenant: Arc::from("bench"),
        memory_limit: 64 << 20,
        timeout: Duration::from_secs(5),
        env: Arc::from(Vec::new()),
        allowed_hosts: Arc::default(),
        config: Default::default(),
        trace: None,
    };
    let input = [b'x'; 64];
    let mut group = c.benchmark_group("cold_start");
    for (name, wasm) in [
        ("echo_component_64b", shoal_guests::ECHO),
        ("hello_component", shoal_guests::HELLO),
        ("noop_command_module", shoal_guests::NOOP_CMD),
    ] {
        let image = tokio.block_on(runtime.load(wasm)).expect("guest loads");
        group.bench_function(name, |b| {
            b.iter(|| {
                let out = tokio.block_on(runtime.call(&image, &settings, &input));
                assert!(out.result.is_ok(), "{:?}", out.result);
            })
        });
    }
    // A Python function: the shared CPython runtime instantiated with its
    // memory from the function's snapshot, then one call of `handle`.
    let (_, files) =
        shoal_guests::PYTHON_EXAMPLES.iter().find(|(name, _)| *name == "hello-py").expect("hello-py example");
    let files = files.iter().map(|(path, contents)| (path.to_string(), contents.to_vec())).collect();
    let source = SourceBundle::new(Language::Python, files).expect("bundle").encode();
    let image = tokio.block_on(runtime.load(&source)).expect("python hello loads");
    let python_settings = CallSettings { memory_limit: 128 << 20, ..settings.clone() };
    group.bench_function("hello_python", |b| {
        b.iter(|| {
            let out = tokio.block_on(runtime.call(&image, &python_settings, b"bench"));
            assert!(out.result.is_ok(), "{:?}", out.result);
        })
    });
    group.finish();

    // The heavy-initialiser example (`primes`: 8.5 MiB of tables built by
    // `init`): a call starting from the snapshot taken at deploy, and a call
    // of the same binary deployed without one, which builds the tables first.
    let mut group = c.benchmark_group("heavy_init");
    group.sample_size(10);
    let snapshot = tokio
        .block_on(runtime.load_with(shoal_guests::PRIMES, &LoadOptions { snapshot: true, tenant: None }))
        .expect("snapshot");
    let plain = tokio.block_on(runtime.load(shoal_guests::PRIMES)).expect("primes loads");
    for (name, image) in [("primes_from_snapshot", &snapshot), ("primes_init_every_call", &plain)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let out = tokio.block_on(runtime.call(image, &settings, b"1000003"));
                assert!(out.result.is_ok(), "{:?}", out.result);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, cold_start);
criterion_main!(benches);
