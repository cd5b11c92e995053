//! The host side of `state`, driven by generated scripts through the
//! `state-ops` guest: every operation gets an answer, never a host failure.
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shoal_runtime::{CallError, CallSettings, FunctionImage, Runtime, RuntimeConfig};
use shoal_state::{EmbeddedGlobal, EmbeddedStore, EmbeddedTier, StateLimits, StateTiers};

struct Fixture {
    tokio: tokio::runtime::Runtime,
    runtime: Runtime,
    image: Arc<FunctionImage>,
    _dir: tempfile::TempDir,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    let limits = StateLimits { max_value_bytes: 1 << 20, tenant_quota_bytes: 4 << 20 };
    let tiers = Arc::new(StateTiers::new(Arc::new(EmbeddedTier::new(EmbeddedGlobal::new(store, limits)))));
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.max_instances = 4;
    config.max_memory_bytes = 64 << 20;
    let runtime = tokio.block_on(async { Runtime::with_state(config, tiers) }).unwrap();
    let image = tokio.block_on(runtime.load(shoal_guests::STATE_OPS)).unwrap();
    Fixture { tokio, runtime, image, _dir: dir }
});

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let Ok(script) = shoal_testkit::fuzz::state_script(&mut u) else { return };
    let fixture = &*FIXTURE;
    let settings = CallSettings {
        tenant: Arc::from("fuzz"),
        memory_limit: 32 << 20,
        timeout: Duration::from_millis(300),
        env: Arc::from(Vec::new()),
    };
    let out = fixture.tokio.block_on(fixture.runtime.call(&fixture.image, &settings, script.as_bytes()));
    assert!(
        matches!(out.result, Ok(_) | Err(CallError::Function { .. }) | Err(CallError::Timeout { .. })),
        "{script:?}: {:?}",
        out.result
    );
});
