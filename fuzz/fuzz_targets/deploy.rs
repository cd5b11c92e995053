//! Deploy generated (and damaged) modules, and call those that load: a
//! deploy is loaded or refused as invalid; a call never fails inside the host.
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shoal_runtime::{CallError, CallSettings, DeployError, Runtime, RuntimeConfig};

struct Fixture {
    tokio: tokio::runtime::Runtime,
    runtime: Runtime,
    _dir: tempfile::TempDir,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.max_instances = 4;
    config.max_memory_bytes = 64 << 20;
    let runtime = tokio.block_on(async { Runtime::new(config) }).unwrap();
    Fixture { tokio, runtime, _dir: dir }
});

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let Ok(wasm) = shoal_testkit::fuzz::wasm_module(&mut u) else { return };
    let fixture = &*FIXTURE;
    let settings = CallSettings {
        tenant: Arc::from("fuzz"),
        memory_limit: 16 << 20,
        timeout: Duration::from_millis(100),
        env: Arc::from(Vec::new()),
    };
    fixture.tokio.block_on(async {
        match fixture.runtime.load(&wasm).await {
            Ok(image) => {
                let out = fixture.runtime.call(&image, &settings, b"").await;
                assert!(!matches!(out.result, Err(CallError::Internal(_))), "{:?}", out.result);
            }
            Err(DeployError::InvalidWasm(_)) => {}
            Err(other) => panic!("deploy failed with {other:?}"),
        }
    });
});
