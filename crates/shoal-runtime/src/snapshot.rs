//! Pre-initialisation snapshots of components (deploy option `snapshot`).
//!
//! A component of the `function-with-init` world exports `init`. At deploy
//! Shoal instruments it (wasmtime-wizer: every core module's memories and
//! globals made readable from outside), instantiates that once in a store
//! of its own, runs `init`, reads back every memory and global, and writes
//! them into the component as its starting state (data segments and global
//! initialisers). That component is what is
//! compiled and cached: each call starts from its memory image
//! copy-on-write like any other, and never runs `init`.

use std::time::Duration;

use wasmtime::component::{Component, Instance, Lift, WasmList};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use crate::host::{ComponentCtx, Linkers, deploy_store};
use crate::{DeployError, RuntimeConfig};

/// The export a snapshot runs (`wit/shoal.wit`, world `function-with-init`).
pub(crate) const INIT_EXPORT: &str = "init";

fn wizer() -> Wizer {
    let mut wizer = Wizer::new();
    // Kept: the component's lifted `init` refers to its core export (the
    // snapshot keeps exporting it; Shoal never calls it again).
    wizer.init_func(INIT_EXPORT).keep_init_func(true);
    wizer
}

/// `wasm` with its `init` run and its state kept as its start.
pub(crate) async fn take(
    engine: &Engine,
    linkers: &Linkers,
    wasm: &[u8],
    config: &RuntimeConfig,
    limit: Duration,
    turns: crate::call::Turns,
) -> Result<Vec<u8>, DeployError> {
    let invalid = |what: &str, e: wasmtime::Error| DeployError::InvalidWasm(format!("{what}: {e:#}"));
    let wizer = wizer();
    let (cx, instrumented) = wizer.instrument_component(wasm).map_err(|e| invalid("preparing the snapshot", e))?;
    let component = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || Component::new(&engine, &instrumented))
            .await
            .map_err(|e| DeployError::Internal(format!("compiling for the snapshot: {e}")))?
            .map_err(|e| invalid("compiling for the snapshot", e))?
    };
    match component.get_export_index(None, INIT_EXPORT) {
        Some(_) => {}
        None => {
            return Err(DeployError::InvalidWasm(format!(
                "snapshot=true needs an exported `{INIT_EXPORT}: func()` (world function-with-init in wit/shoal.wit)"
            )));
        }
    }
    let pre = linkers.component.instantiate_pre(&component).map_err(|e| invalid("linking for the snapshot", e))?;

    let (mut store, stderr) = deploy_store(engine, config, limit, None, "the initialiser", turns.clone());
    let run = async {
        let instance = pre.instantiate_async(&mut store).await?;
        let init = instance.get_typed_func::<(), ()>(&mut store, INIT_EXPORT)?;
        init.call_async(&mut store, ()).await?;
        Ok::<_, wasmtime::Error>(instance)
    };
    let instance = match tokio::time::timeout(limit + Duration::from_millis(100), turns.run(run)).await {
        Ok(Ok(instance)) => instance,
        Ok(Err(e)) => {
            let printed = String::from_utf8_lossy(&stderr.take().0).trim().to_string();
            let tail = if printed.is_empty() { String::new() } else { format!("; stderr: {printed}") };
            return Err(DeployError::InvalidWasm(format!("the initialiser failed: {e:#}{tail}")));
        }
        Err(_) => {
            return Err(DeployError::InvalidWasm(format!("the initialiser took longer than {} ms", limit.as_millis())));
        }
    };
    // Reading the state back is not the initialiser's time.
    store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Continue(1)));
    wizer
        .snapshot_component(&cx, &mut Snapshotting { store: &mut store, instance })
        .await
        .map_err(|e| invalid("writing the snapshot", e))
}

/// Reads an initialised instance's state through the accessors the
/// instrumentation exported.
struct Snapshotting<'a> {
    store: &'a mut Store<ComponentCtx>,
    instance: Instance,
}

impl Snapshotting<'_> {
    async fn read<R: Lift + Send + Sync + 'static>(&mut self, instance: &str, func: &str) -> R {
        let (_, exported) = self.instance.get_export(&mut *self.store, None, instance).expect(ACCESSORS);
        let (_, index) = self.instance.get_export(&mut *self.store, Some(&exported), func).expect(ACCESSORS);
        let accessor = self.instance.get_typed_func::<(), (R,)>(&mut *self.store, index).expect(ACCESSORS);
        accessor.call_async(&mut *self.store, ()).await.expect("an accessor of the instrumented state cannot fail").0
    }
}

const ACCESSORS: &str = "the instrumentation exports every accessor the snapshot asks for";

impl ComponentInstanceState for Snapshotting<'_> {
    async fn call_func_ret_list_u8(&mut self, instance: &str, func: &str, contents: impl FnOnce(&[u8]) + Send) {
        let list: WasmList<u8> = self.read(instance, func).await;
        contents(list.as_le_slice(&*self.store));
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.read(instance, func).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.read(instance, func).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.read::<f32>(instance, func).await.to_bits()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.read::<f64>(instance, func).await.to_bits()
    }
}
