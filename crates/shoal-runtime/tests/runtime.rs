//! The runtime's integration tests: real guests from `guests/`, compiled by
//! the build, run through the public API.

use std::sync::Arc;
use std::time::Duration;

use shoal_runtime::{
    CallError, CallOutput, CallSettings, DeployError, FunctionKind, LoadOptions, Runtime, RuntimeConfig,
};

const MIB: u64 = 1 << 20;

fn runtime(dir: &tempfile::TempDir) -> Runtime {
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.max_instances = 8;
    config.max_memory_bytes = 64 << 20;
    Runtime::new(config).expect("runtime builds")
}

fn settings() -> CallSettings {
    CallSettings {
        tenant: Arc::from("acme"),
        memory_limit: 32 * MIB,
        timeout: Duration::from_secs(5),
        env: Arc::from(vec![("GREETING".to_string(), "hi".to_string())]),
        allowed_hosts: Arc::default(),
        config: Default::default(),
        trace: None,
    }
}

async fn call_with(rt: &Runtime, wasm: &[u8], settings: &CallSettings, input: &[u8]) -> CallOutput {
    let image = rt.load(wasm).await.expect("guest loads");
    rt.call(&image, settings, input).await
}

async fn call(rt: &Runtime, wasm: &[u8], input: &[u8]) -> CallOutput {
    call_with(rt, wasm, &settings(), input).await
}

fn ok(out: CallOutput) -> String {
    String::from_utf8(out.result.expect("call succeeds")).expect("utf-8 output")
}

#[tokio::test]
async fn examples_answer() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    assert_eq!(ok(call(&rt, shoal_guests::HELLO, b"world").await), "hello world");
    assert_eq!(ok(call(&rt, shoal_guests::ECHO, b"\x00\x01 bytes").await).as_bytes(), b"\x00\x01 bytes");
    assert_eq!(ok(call(&rt, shoal_guests::FIB, b"20").await), "6765");
    assert_eq!(ok(call(&rt, shoal_guests::UPPER, b"shout").await), "SHOUT");
    assert_eq!(ok(call(&rt, shoal_guests::NOOP_CMD, b"").await), "");
}

#[tokio::test]
async fn a_call_reports_the_memory_and_time_it_used() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let out = call(&rt, shoal_guests::HELLO, b"world").await;
    let small = out.usage;
    assert!(small.wall > std::time::Duration::ZERO && small.peak_memory_bytes > 0, "{small:?}");
    // Echoing 8 MiB holds at least those bytes in the guest's memory.
    let big = call(&rt, shoal_guests::ECHO, &vec![7u8; 8 << 20]).await.usage;
    assert!(big.peak_memory_bytes >= 8 * MIB && big.peak_memory_bytes > small.peak_memory_bytes, "{big:?}");
    // A memory bomb's peak is its limit (32 MiB), not more.
    let bomb = call(&rt, shoal_guests::MISBEHAVE, b"oom").await;
    assert!(matches!(bomb.result, Err(CallError::OutOfMemory { .. })));
    let peak = bomb.usage.peak_memory_bytes;
    assert!(peak > 24 * MIB && peak <= 32 * MIB, "{peak}");
    assert!(bomb.usage.memory_mib_ms() <= 32 * (bomb.usage.wall.as_millis() as u64 + 1), "{:?}", bomb.usage);
    // No scheduler measured it: no CPU time, no queue.
    assert_eq!((bomb.usage.cpu, bomb.usage.queued), (std::time::Duration::ZERO, std::time::Duration::ZERO));
}

#[tokio::test]
async fn function_errors_carry_the_guests_message() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    match call(&rt, shoal_guests::FIB, b"ten").await.result {
        Err(CallError::Function { message }) => assert!(message.contains("\"ten\" is not a decimal"), "{message}"),
        other => panic!("expected a function error, got {other:?}"),
    }
    match call(&rt, shoal_guests::UPPER, b"\xff\xfe").await.result {
        Err(CallError::Function { message }) => {
            assert!(message.contains("exited with code 1"), "{message}");
            assert!(message.contains("input is not UTF-8"), "{message}");
        }
        other => panic!("expected a function error, got {other:?}"),
    }
}

#[tokio::test]
async fn every_call_gets_a_fresh_instance() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    // `misbehave` answers the input of the previous call it saw in the same
    // instance; a fresh instance has seen none.
    assert_eq!(ok(call(&rt, shoal_guests::MISBEHAVE, b"first").await), "");
    assert_eq!(ok(call(&rt, shoal_guests::MISBEHAVE, b"second").await), "");
}

#[tokio::test]
async fn the_same_bytes_share_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let a = rt.load(shoal_guests::HELLO).await.unwrap();
    let b = rt.load(shoal_guests::HELLO).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(rt.n_compiles(), 1);
    assert_eq!(a.kind(), FunctionKind::Component);
    assert_eq!(rt.load(shoal_guests::UPPER).await.unwrap().kind(), FunctionKind::Command);
}

#[tokio::test]
async fn compiled_artifacts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = runtime(&dir);
        rt.load(shoal_guests::HELLO).await.unwrap();
        rt.load(shoal_guests::UPPER).await.unwrap();
        assert_eq!(rt.n_compiles(), 2);
    }
    let rt = runtime(&dir);
    assert_eq!(ok(call(&rt, shoal_guests::HELLO, b"again").await), "hello again");
    assert_eq!(ok(call(&rt, shoal_guests::UPPER, b"again").await), "AGAIN");
    assert_eq!(rt.n_compiles(), 0, "a restart loads from the artifact cache");
}

#[tokio::test]
async fn a_corrupt_cached_artifact_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    runtime(&dir).load(shoal_guests::ECHO).await.unwrap();
    for entry in std::fs::read_dir(dir.path().join("cache")).unwrap() {
        std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
    }
    let rt = runtime(&dir);
    assert_eq!(ok(call(&rt, shoal_guests::ECHO, b"x").await), "x");
    assert_eq!(rt.n_compiles(), 1);
}

/// The artifacts (not their sums) in the cache directory.
fn cached_artifacts(dir: &tempfile::TempDir) -> Vec<std::path::PathBuf> {
    let entries = std::fs::read_dir(dir.path().join("cache")).unwrap();
    let mut paths: Vec<_> =
        entries.map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().ends_with(".cwasm")).collect();
    paths.sort();
    paths
}

#[tokio::test]
async fn a_torn_or_altered_artifact_is_never_run_but_compiled_again() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = runtime(&dir);
        rt.load(shoal_guests::ECHO).await.unwrap();
        rt.load(shoal_guests::UPPER).await.unwrap();
    }
    let artifacts = cached_artifacts(&dir);
    assert_eq!(artifacts.len(), 2, "{artifacts:?}");
    for artifact in &artifacts {
        assert!(artifact.with_extension("cwasm.sum").exists(), "each artifact has its sum");
    }
    // One torn (cut short, as by a crash mid-write), one altered in its
    // code: a byte in the middle flipped, which wasmtime's own checks of
    // the header and metadata would not notice.
    let torn = std::fs::read(&artifacts[0]).unwrap();
    std::fs::write(&artifacts[0], &torn[..torn.len() / 2]).unwrap();
    let mut altered = std::fs::read(&artifacts[1]).unwrap();
    let middle = altered.len() / 2;
    altered[middle] ^= 0x5a;
    std::fs::write(&artifacts[1], &altered).unwrap();
    let rt = runtime(&dir);
    assert_eq!(ok(call(&rt, shoal_guests::ECHO, b"x").await), "x");
    assert_eq!(ok(call(&rt, shoal_guests::UPPER, b"y").await), "Y");
    assert_eq!(rt.n_compiles(), 2, "both compiled again");
    // An artifact whose sum is gone is not trusted either.
    for artifact in cached_artifacts(&dir) {
        std::fs::remove_file(artifact.with_extension("cwasm.sum")).unwrap();
    }
    let rt = runtime(&dir);
    assert_eq!(ok(call(&rt, shoal_guests::ECHO, b"z").await), "z");
    assert_eq!(rt.n_compiles(), 1);
}

#[tokio::test]
async fn malformed_wasm_is_refused_with_the_validators_message() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    match rt.load(b"not wasm at all").await {
        Err(DeployError::InvalidWasm(message)) => assert!(message.contains("magic"), "{message}"),
        other => panic!("expected invalid wasm, got {other:?}"),
    }
    // Right header, broken body.
    let mut truncated = shoal_guests::NOOP_CMD.to_vec();
    truncated.truncate(100);
    match rt.load(&truncated).await {
        Err(DeployError::InvalidWasm(message)) => assert!(!message.is_empty()),
        other => panic!("expected invalid wasm, got {other:?}"),
    }
    let bad_type = wat::parse_str(r#"(module (func (export "_start") (result i32) (i64.const 1)))"#).unwrap();
    match rt.load(&bad_type).await {
        Err(DeployError::InvalidWasm(message)) => assert!(message.contains("type mismatch"), "{message}"),
        other => panic!("expected invalid wasm, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_imports_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let module =
        wat::parse_str(r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#).unwrap();
    match rt.load(&module).await {
        Err(DeployError::InvalidWasm(message)) => assert!(message.contains("env::launch_missiles"), "{message}"),
        other => panic!("expected invalid wasm, got {other:?}"),
    }
    let component = wat::parse_str(r#"(component (import "acme:db/query" (instance)))"#).unwrap();
    match rt.load(&component).await {
        Err(DeployError::InvalidWasm(message)) => assert!(message.contains("acme:db/query"), "{message}"),
        other => panic!("expected invalid wasm, got {other:?}"),
    }
    let no_start = wat::parse_str(r#"(module (func (export "main")))"#).unwrap();
    match rt.load(&no_start).await {
        Err(DeployError::InvalidWasm(message)) => assert!(message.contains("_start"), "{message}"),
        other => panic!("expected invalid wasm, got {other:?}"),
    }
    let no_handler = wat::parse_str(r#"(component)"#).unwrap();
    match rt.load(&no_handler).await {
        Err(DeployError::InvalidWasm(message)) => assert!(message.contains("handler"), "{message}"),
        other => panic!("expected invalid wasm, got {other:?}"),
    }
}

/// A component of `n_extra + 1` core instances whose handler echoes its
/// input: the shape of components built around an interpreter
/// (componentize-py's hold 14 core instances), in miniature.
fn echo_component_with_core_instances(n_extra: usize) -> Vec<u8> {
    let extra = "  (core instance (instantiate $empty))\n".repeat(n_extra);
    let text = format!(
        r#"(component
  (core module $empty)
{extra}
  (core module $m
    (memory (export "memory") 1)
    (global $next (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $at i32)
      (local.set $at (global.get $next))
      (global.set $next (i32.add (global.get $next) (i32.add (local.get 3) (i32.const 8))))
      (local.get $at))
    (func (export "handle") (param $ptr i32) (param $len i32) (result i32)
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 20) (local.get $ptr))
      (i32.store (i32.const 24) (local.get $len))
      (i32.const 16)))
  (core instance $i (instantiate $m))
  (type $out (result (list u8) (error string)))
  (func $handle (param "input" (list u8)) (result $out)
    (canon lift (core func $i "handle") (memory $i "memory") (realloc (func $i "realloc"))))
  (instance $handler (export "handle" (func $handle)))
  (export "shoal:function/handler@0.1.0" (instance $handler)))"#
    );
    wat::parse_str(&text).unwrap()
}

#[tokio::test]
async fn components_of_many_core_instances_run() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    // 16 core instances: over the 8 a Rust component needs, within the 32
    // each sandbox has room for.
    assert_eq!(ok(call(&rt, &echo_component_with_core_instances(15), b"echo me").await), "echo me");
    // Past that: refused at deploy, saying why.
    match rt.load(&echo_component_with_core_instances(40)).await {
        Err(DeployError::InvalidWasm(message)) => assert!(message.contains("core module instances"), "{message}"),
        other => panic!("expected invalid wasm, got {other:?}"),
    }
}

#[tokio::test]
async fn oversized_modules_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.max_instances = 2;
    config.max_module_bytes = 1000;
    let rt = Runtime::new(config).unwrap();
    assert!(matches!(rt.load(shoal_guests::HELLO).await, Err(DeployError::TooLarge { limit: 1000, .. })));
}

#[tokio::test]
async fn a_trap_reports_its_message_and_the_guests_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    match call(&rt, shoal_guests::MISBEHAVE, b"panic").await.result {
        Err(CallError::Trap { message }) => {
            assert!(message.contains("unreachable"), "{message}");
            assert!(message.contains("guest panicked on purpose"), "{message}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    let module =
        wat::parse_str(r#"(module (func (export "_start") (drop (i32.div_u (i32.const 1) (i32.const 0)))))"#).unwrap();
    match call(&rt, &module, b"").await.result {
        Err(CallError::Trap { message }) => assert!(message.contains("divide by zero"), "{message}"),
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[tokio::test]
async fn an_infinite_loop_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let mut short = settings();
    short.timeout = Duration::from_millis(100);
    let out = call_with(&rt, shoal_guests::MISBEHAVE, &short, b"loop").await;
    assert!(matches!(out.result, Err(CallError::Timeout { limit }) if limit == short.timeout), "{:?}", out.result);
    let spin = wat::parse_str(r#"(module (func (export "_start") (loop (br 0))))"#).unwrap();
    let out = call_with(&rt, &spin, &short, b"").await;
    assert!(matches!(out.result, Err(CallError::Timeout { .. })), "{:?}", out.result);
    // Blocked in a host call (a WASI sleep), where epochs do not reach it.
    let out = call_with(&rt, shoal_guests::MISBEHAVE, &short, b"sleep").await;
    assert!(matches!(out.result, Err(CallError::Timeout { .. })), "{:?}", out.result);
    // The runtime is unharmed.
    assert_eq!(ok(call(&rt, shoal_guests::HELLO, b"after").await), "hello after");
}

#[tokio::test]
async fn deadlines_hold_after_the_epoch_ticker_has_parked() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let mut short = settings();
    short.timeout = Duration::from_millis(100);
    // Idle long enough for the ticker to park (it parks after ~100 idle
    // ticks); the next call must wake it.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = call_with(&rt, shoal_guests::MISBEHAVE, &short, b"loop").await;
        assert!(matches!(out.result, Err(CallError::Timeout { .. })), "{:?}", out.result);
    }
}

#[tokio::test]
async fn growing_past_the_memory_limit_is_out_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let out = call(&rt, shoal_guests::MISBEHAVE, b"oom").await;
    assert!(matches!(out.result, Err(CallError::OutOfMemory { limit }) if limit == 32 * MIB), "{:?}", out.result);
    let grow = wat::parse_str(
        r#"(module (memory 1) (func (export "_start") (loop (br_if 0 (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable))"#,
    )
    .unwrap();
    let out = call(&rt, &grow, b"").await;
    assert!(matches!(out.result, Err(CallError::OutOfMemory { .. })), "{:?}", out.result);
}

#[tokio::test]
async fn unbounded_recursion_is_a_trap_and_the_runtime_survives() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    // Native wasm stack: the engine's `max_wasm_stack` stops it.
    let recurse = wat::parse_str(r#"(module (func $f (export "_start") (call $f)))"#).unwrap();
    match call(&rt, &recurse, b"").await.result {
        Err(CallError::Trap { message }) => assert!(message.contains("call stack exhausted"), "{message}"),
        other => panic!("expected a stack overflow trap, got {other:?}"),
    }
    // Rust keeps its frames on a stack in linear memory, which runs out
    // first: that is a trap too.
    assert!(matches!(call(&rt, shoal_guests::MISBEHAVE, b"recurse").await.result, Err(CallError::Trap { .. })));
    assert_eq!(ok(call(&rt, shoal_guests::ECHO, b"alive").await), "alive");
}

#[tokio::test]
async fn the_sandbox_grants_no_files_sockets_or_host_env() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    // A host env var must not reach the guest.
    set_host_env();
    for (input, expected) in
        [(&b"read-passwd"[..], "open failed"), (b"list-root", "read_dir failed"), (b"connect", "connect failed")]
    {
        match call(&rt, shoal_guests::MISBEHAVE, input).await.result {
            Err(CallError::Function { message }) => assert!(message.contains(expected), "{message}"),
            other => panic!("{input:?}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(ok(call(&rt, shoal_guests::MISBEHAVE, b"env").await), "GREETING=hi");
}

#[allow(unsafe_code)]
fn set_host_env() {
    // SAFETY: no test in this binary reads the environment concurrently.
    unsafe {
        std::env::set_var("SHOAL_HOST_SECRET", "must-not-leak");
    }
}

#[tokio::test]
async fn stdout_and_stderr_are_captured_as_logs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let out = call(&rt, shoal_guests::MISBEHAVE, b"log").await;
    let lines: Vec<(String, String)> =
        out.logs.clone().into_iter().map(|l| (l.stream.as_str().to_string(), l.line)).collect();
    assert_eq!(lines, vec![("stdout".into(), "to stdout".into()), ("stderr".into(), "to stderr".into())]);
    assert_eq!(ok(out), "logged");
}

#[tokio::test]
async fn printing_past_the_log_limit_truncates_and_never_fails_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.max_instances = 2;
    config.max_log_bytes = 4;
    let rt = Runtime::new(config).unwrap();
    let out = call(&rt, shoal_guests::MISBEHAVE, b"log").await;
    assert_eq!(&out.stdout[..], b"to s");
    assert_eq!(&out.stderr[..], b"to s");
    assert_eq!(ok(out), "logged");
}

#[tokio::test]
async fn state_and_invoke_imports_answer_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    for (input, expected) in [(&b"state"[..], "state: "), (b"invoke", "invoke: ")] {
        match call(&rt, shoal_guests::MISBEHAVE, input).await.result {
            Err(CallError::Function { message }) => {
                assert!(message.starts_with(expected), "{message}");
                assert!(message.to_lowercase().contains("unavailable"), "{message}");
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn calls_run_concurrently_up_to_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(runtime(&dir));
    let image = rt.load(shoal_guests::FIB).await.unwrap();
    let mut tasks = Vec::new();
    for n in 0..8u32 {
        let rt = rt.clone();
        let image = image.clone();
        tasks.push(tokio::spawn(async move { rt.call(&image, &settings(), n.to_string().as_bytes()).await }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(ok(task.await.unwrap()));
    }
    assert_eq!(answers, ["0", "1", "1", "2", "3", "5", "8", "13"]);
}

#[tokio::test]
async fn calls_run_while_the_compile_pool_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(runtime(&dir));
    assert_eq!(rt.config().compile_concurrency, 1);
    let echo = rt.load(shoal_guests::ECHO).await.unwrap();
    let loads: Vec<_> = (0..2)
        .map(|tag| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.load(&shoal_guests::slow_to_compile(tag, 8_000)).await.map(|_| ()) })
        })
        .collect();
    while rt.n_compiling() == 0 {
        tokio::task::yield_now().await;
    }
    // This test runs on one thread: were compiling done on it, no call
    // could run until the compile ended. A call takes milliseconds; a
    // compile of 40,000 functions takes far longer.
    for _ in 0..3 {
        let out = rt.call(&echo, &settings(), b"meanwhile").await;
        assert_eq!(out.result.unwrap(), b"meanwhile");
        assert_eq!(rt.n_compiling(), 1, "one compile at a time, still running");
    }
    for load in loads {
        load.await.unwrap().unwrap();
    }
    assert_eq!(rt.n_compiling(), 0);
}

#[tokio::test]
async fn a_tenants_compiles_leave_a_place_on_the_pool_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.compile_concurrency = 2;
    let rt = Arc::new(Runtime::new(config).unwrap());
    let as_tenant = |name: &str| LoadOptions { snapshot: false, tenant: Some(Arc::from(name)) };
    // Three slow compiles of one tenant at once hold one of the two places.
    let loads: Vec<_> = (0..3)
        .map(|tag| {
            let (rt, options) = (rt.clone(), as_tenant("hostile"));
            tokio::spawn(async move {
                rt.load_with(&shoal_guests::slow_to_compile(100 + tag, 8_000), &options).await.map(|_| ())
            })
        })
        .collect();
    while rt.n_compiling() == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(rt.compiles_of("hostile"), 1);
    // Another tenant's deploy compiles in the other place at once, while
    // the first of the three is still compiling.
    rt.load_with(shoal_guests::ECHO, &as_tenant("victim")).await.unwrap();
    assert_eq!(rt.compiles_of("hostile"), 1);
    assert!(loads.iter().all(|load| !load.is_finished()), "the victim's compile waited for the hostile ones");
    for load in loads {
        load.await.unwrap().unwrap();
    }
    assert_eq!((rt.n_compiling(), rt.compiles_of("hostile")), (0, 0));
}

#[tokio::test]
async fn output_over_the_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.max_instances = 2;
    config.max_output_bytes = 100;
    let rt = Runtime::new(config).unwrap();
    assert!(call(&rt, shoal_guests::ECHO, &[1; 100]).await.result.is_ok());
    let out = call(&rt, shoal_guests::ECHO, &[1; 101]).await;
    assert!(matches!(out.result, Err(CallError::OutputTooLarge { limit: 100 })), "{:?}", out.result);
    assert!(call(&rt, shoal_guests::UPPER, &[b'a'; 100]).await.result.is_ok());
    let out = call(&rt, shoal_guests::UPPER, &[b'a'; 101]).await;
    assert!(matches!(out.result, Err(CallError::OutputTooLarge { limit: 100 })), "{:?}", out.result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_calls_take_turns_on_their_places_and_short_calls_never_wait_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.max_instances = 8;
    config.long_call_lanes = 1;
    let rt = Arc::new(Runtime::new(config).unwrap());
    let looping = rt.load(shoal_guests::MISBEHAVE).await.unwrap();
    let short = CallSettings { timeout: Duration::from_millis(600), ..settings() };
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let (rt, image, settings) = (rt.clone(), looping.clone(), short.clone());
            tokio::spawn(async move { rt.call(&image, &settings, b"loop").await })
        })
        .collect();
    // All four become long; never more than one runs at a time.
    let mut seen_one = false;
    while !loops.iter().all(|l| l.is_finished()) {
        let running = rt.long_calls_running();
        assert!(running <= 1, "{running} long calls ran at once");
        seen_one |= running == 1;
        // Short calls run meanwhile, without a long-call place.
        assert_eq!(ok(call(&rt, shoal_guests::ECHO, b"quick").await), "quick");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen_one, "the loops became long calls");
    for l in loops {
        assert!(matches!(l.await.unwrap().result, Err(CallError::Timeout { .. })), "each loop ends at its deadline");
    }
    assert_eq!(rt.long_calls_running(), 0, "places are given back");
}

mod state {
    //! The `state` interface from a real guest (`state-ops`), over the
    //! embedded global tier and, for the atomics and locks, over a real
    //! `redis-server` too.

    use std::time::Instant;

    use super::*;
    use shoal_state::{
        EmbeddedGlobal, EmbeddedStore, EmbeddedTier, LeaseToken, RedisConfig, RedisTier, ScopedKey, StateLimits,
        StateTiers,
    };
    use shoal_testkit::RedisServer;

    fn tiers(dir: &tempfile::TempDir, limits: StateLimits) -> Arc<StateTiers> {
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        Arc::new(StateTiers::new(Arc::new(EmbeddedTier::new(EmbeddedGlobal::new(store, limits)))))
    }

    /// Tiers on either backend; the Redis server lives as long as the guard.
    fn tiers_on(redis: bool, dir: &tempfile::TempDir) -> (Arc<StateTiers>, Option<RedisServer>) {
        if !redis {
            return (tiers(dir, StateLimits::default()), None);
        }
        let server = RedisServer::start();
        let tier = RedisTier::connect(RedisConfig::new(server.url())).unwrap();
        (Arc::new(StateTiers::new(Arc::new(tier))), Some(server))
    }

    fn runtime_with(dir: &tempfile::TempDir, tiers: Arc<StateTiers>) -> Runtime {
        let mut config = RuntimeConfig::new(dir.path().join("cache"));
        config.max_instances = 128;
        config.max_memory_bytes = 64 << 20;
        Runtime::with_state(config, tiers).unwrap()
    }

    fn as_tenant(tenant: &str) -> CallSettings {
        CallSettings { tenant: Arc::from(tenant), ..settings() }
    }

    async fn ops(rt: &Runtime, tenant: &str, script: &str) -> Result<String, String> {
        match call_with(rt, shoal_guests::STATE_OPS, &as_tenant(tenant), script.as_bytes()).await.result {
            Ok(out) => Ok(String::from_utf8(out).unwrap()),
            Err(CallError::Function { message }) => Err(message),
            Err(other) => panic!("{script}: {other:?}"),
        }
    }

    #[tokio::test]
    async fn local_writes_reach_the_global_tier_only_when_pushed() {
        let dir = tempfile::tempdir().unwrap();
        let tiers = tiers(&dir, StateLimits::default());
        let rt = runtime_with(&dir, tiers.clone());
        assert_eq!(ops(&rt, "acme", "get k").await.unwrap(), "<none>");
        assert_eq!(ops(&rt, "acme", "set k v1").await.unwrap(), "ok");
        // Another call on the same node sees the local tier at once.
        assert_eq!(ops(&rt, "acme", "get k").await.unwrap(), "v1");
        let k = shoal_state::ScopedKey::new("acme", "k").unwrap();
        assert_eq!(tiers.global().get(&k).await.unwrap(), None, "not pushed yet");
        assert_eq!(ops(&rt, "acme", "push k").await.unwrap(), "ok");
        assert_eq!(tiers.global().get(&k).await.unwrap().unwrap(), b"v1");
        // Pull replaces the local copy with the global one.
        tiers.global().set(&k, b"from elsewhere".to_vec()).await.unwrap();
        assert_eq!(ops(&rt, "acme", "get k").await.unwrap(), "v1");
        assert_eq!(ops(&rt, "acme", "pull k\nget k").await.unwrap(), "from elsewhere");
        assert_eq!(ops(&rt, "acme", "push nothing-here").await.unwrap_err(), "push nothing-here: Error::NotFound");
        assert_eq!(ops(&rt, "acme", "pull nothing-here").await.unwrap_err(), "pull nothing-here: Error::NotFound");
    }

    #[tokio::test]
    async fn ranges_atomics_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime_with(&dir, tiers(&dir, StateLimits::default()));
        assert_eq!(ops(&rt, "acme", "set r hello_world\nsetrange r 6 WORLD\nrange r 4 4").await.unwrap(), "o_WO");
        assert_eq!(ops(&rt, "acme", "range missing 0 1").await.unwrap_err(), "range missing 0 1: Error::NotFound");
        assert_eq!(ops(&rt, "acme", "incr n 5\nincr n -2").await.unwrap(), "3");
        assert_eq!(ops(&rt, "acme", "get n").await.unwrap(), "3");
        assert_eq!(ops(&rt, "acme", "append log a\nappend log b\nget log").await.unwrap(), "ab");
        assert!(ops(&rt, "acme", "set r x\npush r\nincr r 1").await.unwrap_err().contains("not a decimal"));
        assert_eq!(ops(&rt, "acme", "del log\nget log").await.unwrap(), "<none>");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_increments_add_up_exactly() {
        for redis in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (tiers, _server) = tiers_on(redis, &dir);
            let rt = Arc::new(runtime_with(&dir, tiers));
            let image = rt.load(shoal_guests::COUNTER).await.unwrap();
            let mut tasks = Vec::new();
            for _ in 0..100 {
                let (rt, image) = (rt.clone(), image.clone());
                tasks.push(tokio::spawn(async move { rt.call(&image, &as_tenant("acme"), b"").await.result.unwrap() }));
            }
            let mut seen: Vec<i64> = Vec::new();
            for task in tasks {
                seen.push(String::from_utf8(task.await.unwrap()).unwrap().parse().unwrap());
            }
            seen.sort();
            assert_eq!(seen, (1..=100).collect::<Vec<i64>>(), "redis={redis}: every increment saw a distinct value");
            assert_eq!(ok(call_with(&rt, shoal_guests::COUNTER, &as_tenant("acme"), b"10").await), "110");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_makes_read_modify_write_exclusive() {
        for redis in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (tiers, _server) = tiers_on(redis, &dir);
            let rt = Arc::new(runtime_with(&dir, tiers.clone()));
            ops(&rt, "acme", "set c 0\npush c").await.unwrap();
            let image = rt.load(shoal_guests::STATE_OPS).await.unwrap();
            // Each call copies the global value in, adds one and pushes it
            // back: only mutual exclusion keeps every increment.
            let script = b"lock c\npull c\nbump c\npush c\nunlock c";
            let mut tasks = Vec::new();
            for _ in 0..30 {
                let (rt, image) = (rt.clone(), image.clone());
                tasks.push(tokio::spawn(async move { rt.call(&image, &as_tenant("acme"), script).await.result }));
            }
            for task in tasks {
                task.await.unwrap().expect("every call gets the lock in time");
            }
            let c = ScopedKey::new("acme", "c").unwrap();
            assert_eq!(tiers.global().get(&c).await.unwrap().unwrap(), b"30", "redis={redis}");
        }
    }

    #[tokio::test]
    async fn a_call_that_ends_holding_a_lock_releases_it() {
        for redis in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (tiers, _server) = tiers_on(redis, &dir);
            let rt = runtime_with(&dir, tiers.clone());
            // Returned without unlocking, and trapped while holding.
            ops(&rt, "acme", "lock a\nlock a").await.unwrap();
            let trapped = call_with(&rt, shoal_guests::STATE_OPS, &as_tenant("acme"), b"lock b\npanic b").await;
            assert!(matches!(trapped.result, Err(CallError::Trap { .. })), "{:?}", trapped.result);
            let short = CallSettings { timeout: Duration::from_secs(3), ..as_tenant("acme") };
            for key in ["a", "b"] {
                let start = Instant::now();
                // The release runs just after the call; the next lock waits for it.
                let out = call_with(&rt, shoal_guests::STATE_OPS, &short, format!("lock {key}").as_bytes()).await;
                assert_eq!(out.result.unwrap(), b"ok", "redis={redis} key={key}");
                assert!(start.elapsed() < Duration::from_secs(2), "redis={redis}: {key} was released, not expired");
            }
            assert_eq!(
                ops(&rt, "acme", "unlock never-locked").await.unwrap_err(),
                "unlock never-locked: Error::NotFound"
            );
        }
    }

    #[tokio::test]
    async fn a_dead_holders_lease_expires_and_waiting_ends_at_the_deadline() {
        for redis in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (tiers, _server) = tiers_on(redis, &dir);
            let rt = runtime_with(&dir, tiers.clone());
            // A holder that died without unlocking (say, on a node that was
            // killed): its lease runs out and a waiting call gets the lock.
            let key = ScopedKey::new("acme", "l").unwrap();
            assert!(tiers.global().try_lock(&key, &LeaseToken::random(), Duration::from_millis(300)).await.unwrap());
            let start = Instant::now();
            assert_eq!(ops(&rt, "acme", "lock l").await.unwrap(), "ok", "redis={redis}");
            assert!(start.elapsed() >= Duration::from_millis(250), "redis={redis}: got the lock before expiry");

            // A holder that stays: the waiting call ends by its deadline,
            // never hangs.
            let held = ScopedKey::new("acme", "held").unwrap();
            assert!(tiers.global().try_lock(&held, &LeaseToken::random(), Duration::from_secs(60)).await.unwrap());
            let short = CallSettings { timeout: Duration::from_millis(300), ..as_tenant("acme") };
            let start = Instant::now();
            let out = call_with(&rt, shoal_guests::STATE_OPS, &short, b"lock held").await;
            match out.result {
                Err(CallError::Timeout { .. }) => {}
                Err(CallError::Function { message }) => assert_eq!(message, "lock held: Error::Unavailable"),
                other => panic!("redis={redis}: expected unavailable or a timeout, got {other:?}"),
            }
            assert!(start.elapsed() < Duration::from_secs(3), "redis={redis}: took {:?}", start.elapsed());
        }
    }

    #[tokio::test]
    async fn guests_cannot_name_another_tenants_keys() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime_with(&dir, tiers(&dir, StateLimits::default()));
        ops(&rt, "acme", "set x secret\npush x").await.unwrap();
        for probe in ["x", "../acme/x", "acme/x", "/acme/x", "x\\0", "..\\0acme/x"] {
            assert_eq!(ops(&rt, "other", &format!("get {probe}")).await.unwrap(), "<none>", "{probe}");
        }
        let long = "k".repeat(513);
        assert_eq!(
            ops(&rt, "other", &format!("get {long}")).await.unwrap_err(),
            format!("get {long}: Error::TooLarge")
        );
        assert_eq!(ops(&rt, "acme", "get x").await.unwrap(), "secret");
    }

    #[tokio::test]
    async fn oversized_values_and_quota_are_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime_with(&dir, tiers(&dir, StateLimits { max_value_bytes: 1000, tenant_quota_bytes: 1500 }));
        assert_eq!(ops(&rt, "acme", "fill big 1 1001").await.unwrap_err(), "fill big 1 1001: Error::TooLarge");
        assert_eq!(ops(&rt, "acme", "setrange big 1000 x").await.unwrap_err(), "setrange big 1000 x: Error::TooLarge");
        ops(&rt, "acme", "fill a 1 1000\npush a").await.unwrap();
        assert_eq!(ops(&rt, "acme", "fill b 2 600\npush b").await.unwrap_err(), "push b: Error::LimitExceeded");
        assert_eq!(
            ops(&rt, "acme", "pull b").await.unwrap_err(),
            "pull b: Error::NotFound",
            "nothing partial was written"
        );
    }

    #[tokio::test]
    async fn without_state_tiers_state_answers_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(&dir);
        assert_eq!(ops(&rt, "acme", "get k").await.unwrap_err(), "get k: Error::Unavailable");
    }

    #[tokio::test]
    async fn pushed_values_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let rt = runtime_with(&dir, tiers(&dir, StateLimits::default()));
            ops(&rt, "acme", "set p kept\npush p\nset q lost").await.unwrap();
            assert_eq!(ok(call_with(&rt, shoal_guests::COUNTER, &as_tenant("acme"), b"7").await), "7");
        }
        let rt = runtime_with(&dir, tiers(&dir, StateLimits::default()));
        assert_eq!(ops(&rt, "acme", "get p").await.unwrap(), "kept");
        assert_eq!(ops(&rt, "acme", "get q").await.unwrap(), "<none>", "never pushed");
        assert_eq!(ops(&rt, "acme", "get counter").await.unwrap(), "7");
    }
}

mod hostile_guests {
    //! Guests written to hurt the host or their neighbours: each fails
    //! alone, with its own error, and leaves nothing behind.

    use super::*;
    use std::time::Instant;

    /// Tests that read the process's RSS take turns, so that one's
    /// allocations do not show up in another's numbers.
    static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    fn command(body: &str) -> Vec<u8> {
        wat::parse_str(body).unwrap_or_else(|e| panic!("{e}\n{body}"))
    }

    #[tokio::test]
    async fn giant_declared_memories_and_tables_are_refused_before_compiling() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(&dir);
        let cases = [
            (r#"(module (memory 65536) (func (export "_start")))"#, "declares a memory of 4096 MiB"),
            (r#"(module (memory 1025) (func (export "_start")))"#, "declares a memory of 64 MiB"),
            (r#"(module (table 10000000 funcref) (func (export "_start")))"#, "declares a table of 10000000"),
            // Found by the fuzzer: once internal errors after compiling.
            (r#"(module (memory 1) (memory 1) (memory 1) (func (export "_start")))"#, "defines 3 memories"),
            (r#"(module (table 1 funcref) (table 1 funcref) (func (export "_start")))"#, "and 2 tables"),
        ];
        for (wat, expected) in cases {
            match rt.load(&command(wat)).await {
                Err(DeployError::InvalidWasm(message)) => assert!(message.contains(expected), "{message}"),
                other => panic!("{wat}: expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(rt.n_compiles(), 0, "refused before any compiling");
        // At the limit is fine, and the image says what it declares.
        let image = rt.load(&command(r#"(module (memory 1024) (table 20000 funcref) (func (export "_start")))"#)).await;
        let declared = image.expect("at the limits loads").declared();
        assert_eq!((declared.memory_bytes, declared.largest_table_elements), (64 * MIB, 20_000));
        assert!(shoal_runtime::Declared::of(shoal_guests::HELLO).unwrap().memory_bytes > 0);
    }

    /// One module per trap kind, and the words the trap is reported with.
    fn trap_kinds() -> Vec<(&'static str, Vec<u8>)> {
        let cases = [
            ("unreachable", "unreachable"),
            ("integer divide by zero", "(drop (i32.div_s (i32.const 1) (i32.const 0)))"),
            ("integer overflow", "(drop (i32.div_s (i32.const 0x80000000) (i32.const -1)))"),
            ("invalid conversion to integer", "(drop (i32.trunc_f32_s (f32.const nan)))"),
            ("out of bounds memory access", "(drop (i32.load (i32.const 70000)))"),
            ("undefined element", "(call_indirect (type $none) (i32.const 7))"),
            ("uninitialized element", "(call_indirect (type $none) (i32.const 1))"),
            ("indirect call type mismatch", "(call_indirect (type $none) (i32.const 0))"),
            ("call stack exhausted", "(call $deep)"),
        ];
        cases
            .into_iter()
            .map(|(reason, body)| {
                let module = format!(
                    r#"(module
                        (type $none (func))
                        (memory 1)
                        (table 2 funcref)
                        (elem (i32.const 0) $takes_one)
                        (func $takes_one (param i32))
                        (func $deep (call $deep))
                        (func (export "_start") {body}))"#
                );
                (reason, command(&module))
            })
            .collect()
    }

    #[tokio::test]
    async fn every_trap_kind_is_a_trap_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(&dir);
        for (reason, wasm) in trap_kinds() {
            match call(&rt, &wasm, b"").await.result {
                Err(CallError::Trap { message }) => assert!(message.contains(reason), "{reason}: {message}"),
                other => panic!("{reason}: expected a trap, got {other:?}"),
            }
        }
        assert_eq!(ok(call(&rt, shoal_guests::HELLO, b"after").await), "hello after");
    }

    #[tokio::test]
    async fn a_thousand_traps_leave_memory_descriptors_and_instances_flat() {
        let _turn = MEASURING.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(&dir);
        // Each call dirties 4 MiB, then traps: a leaked instance or memory
        // per trap would add gigabytes.
        let wasm = command(
            r#"(module (memory 64) (func (export "_start")
                (memory.fill (i32.const 0) (i32.const 0xab) (i32.const 4194304)) unreachable))"#,
        );
        let image = rt.load(&wasm).await.unwrap();
        let mut kinds = Vec::new();
        for (_, wasm) in trap_kinds() {
            kinds.push(rt.load(&wasm).await.unwrap());
        }
        let warm_up = 50;
        let mut baseline = (0, 0);
        for i in 0..warm_up + 1000 {
            let out = rt.call(&image, &settings(), b"").await;
            assert!(matches!(out.result, Err(CallError::Trap { .. })), "{:?}", out.result);
            let kind = &kinds[i % kinds.len()];
            assert!(matches!(rt.call(kind, &settings(), b"").await.result, Err(CallError::Trap { .. })));
            if i == warm_up - 1 {
                // Measured after the warm-up: the pool's slots are mapped.
                baseline = (rss_bytes(), open_fds());
            }
        }
        let (rss_before, fds_before) = baseline;
        let (rss_after, fds_after) = (rss_bytes(), open_fds());
        assert!(
            rss_after <= rss_before + 64 * MIB,
            "RSS grew by {} MiB over 1,000 traps",
            (rss_after.saturating_sub(rss_before)) >> 20
        );
        // Other tests in this process open files too; a leak would be ~1,000.
        assert!(fds_after <= fds_before + 32, "descriptors: {fds_before} → {fds_after}");
        assert_eq!(rt.live_instances(), 0, "no instance outlives its call");
    }

    #[tokio::test]
    async fn no_instance_is_reused_after_a_trap_a_timeout_or_a_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(&dir);
        // Marks its instance, then ends badly; a reused instance would
        // find the mark and exit 0 instead.
        let marked = |ending: &str| {
            command(&format!(
                r#"(module (global $seen (mut i32) (i32.const 0))
                    (func (export "_start")
                      (if (global.get $seen) (then (return)))
                      (global.set $seen (i32.const 1))
                      {ending}))"#
            ))
        };
        let mut short = settings();
        short.timeout = Duration::from_millis(100);
        let trap = rt.load(&marked("unreachable")).await.unwrap();
        let spin = rt.load(&marked("(loop (br 0))")).await.unwrap();
        for _ in 0..3 {
            assert!(matches!(rt.call(&trap, &short, b"").await.result, Err(CallError::Trap { .. })));
            assert!(matches!(rt.call(&spin, &short, b"").await.result, Err(CallError::Timeout { .. })));
            // Cancelled: the caller gives up before the deadline.
            let mut long = settings();
            long.timeout = Duration::from_secs(60);
            let cancelled = tokio::time::timeout(Duration::from_millis(30), rt.call(&spin, &long, b"")).await;
            assert!(cancelled.is_err(), "the spin ran past the caller's patience");
        }
        assert_eq!(rt.live_instances(), 0);
    }

    #[tokio::test]
    async fn no_bytes_of_one_tenants_call_reach_the_next_call_in_the_same_slot() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::new(dir.path().join("cache"));
        // One slot: every call reuses the same memory of the pool.
        config.max_instances = 1;
        config.max_memory_bytes = 64 << 20;
        let rt = Runtime::new(config).unwrap();
        // Fills its initial and grown memory with a secret.
        let writer = command(
            r#"(module (memory 16) (func (export "_start")
                (drop (memory.grow (i32.const 48)))
                (memory.fill (i32.const 0) (i32.const 0x5a) (i32.const 4194304))))"#,
        );
        // Grows the same way and counts the non-zero bytes it can see.
        let reader = command(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 16)
                (func (export "_start") (local $i i32) (local $dirty i32)
                  (drop (memory.grow (i32.const 48)))
                  (block $done (loop $scan
                    (br_if $done (i32.ge_u (local.get $i) (i32.const 4194304)))
                    (if (i32.load8_u (local.get $i))
                      (then (local.set $dirty (i32.add (local.get $dirty) (i32.const 1)))))
                    (local.set $i (i32.add (local.get $i) (i32.const 1)))
                    (br $scan)))
                  (i32.store8 (i32.const 0) (select (i32.const 100) (i32.const 99) (local.get $dirty)))
                  (i32.store (i32.const 16) (i32.const 0))
                  (i32.store (i32.const 20) (i32.const 1))
                  (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))"#,
        );
        let mut victim = settings();
        victim.tenant = Arc::from("victim");
        for _ in 0..3 {
            assert!(call(&rt, &writer, b"").await.result.is_ok());
            // `c`lean, not `d`irty.
            assert_eq!(ok(call_with(&rt, &reader, &victim, b"").await), "c");
        }
        // The reader can tell: run it right after writing in its own memory.
        let self_check = command(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (func (export "_start")
                  (i32.store8 (i32.const 100) (i32.const 7))
                  (i32.store8 (i32.const 0) (select (i32.const 100) (i32.const 99) (i32.load8_u (i32.const 100))))
                  (i32.store (i32.const 16) (i32.const 0))
                  (i32.store (i32.const 20) (i32.const 1))
                  (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))"#,
        );
        assert_eq!(ok(call(&rt, &self_check, b"").await), "d");
    }

    #[tokio::test]
    async fn a_compile_past_its_time_limit_is_answered_and_finishes_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::new(dir.path().join("cache"));
        config.max_instances = 8;
        config.compile_timeout = Duration::from_millis(1);
        let rt = Runtime::new(config).unwrap();
        let bomb = shoal_guests::slow_to_compile(99, 8_000);
        match rt.load(&bomb).await {
            Err(DeployError::CompileTimeout { limit }) => assert_eq!(limit, Duration::from_millis(1)),
            other => panic!("expected a compile timeout, got {other:?}"),
        }
        // Retried until the background compile is done: the retry uses its
        // result, it does not compile again.
        let started = Instant::now();
        let image = loop {
            match rt.load(&bomb).await {
                Ok(image) => break image,
                Err(DeployError::CompileTimeout { .. }) if started.elapsed() < Duration::from_secs(120) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(other) => panic!("retrying the deploy: {other:?}"),
            }
        };
        assert_eq!(rt.n_compiles(), 1, "compiled once, in the background");
        assert!(rt.call(&image, &settings(), b"").await.result.is_ok());
    }

    #[tokio::test]
    async fn binaries_over_a_mebibyte_are_hashed_and_checked_off_the_async_threads() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(&dir);
        // 2 MiB of data: hashed and scanned on the blocking pool.
        let big = command(&format!(
            r#"(module (memory 64) (data (i32.const 0) "{}") (func (export "_start")))"#,
            "x".repeat(2 << 20)
        ));
        assert!(big.len() > 2 << 20);
        let image = rt.load(&big).await.unwrap();
        assert_eq!(image.declared().memory_bytes, 4 * MIB);
        assert!(Arc::ptr_eq(&image, &rt.load(&big).await.unwrap()), "the same bytes find the same image");
        assert!(rt.call(&image, &settings(), b"").await.result.is_ok());
    }

    #[tokio::test]
    async fn bulk_memory_copy_loops_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(&dir);
        let copy = command(
            r#"(module (memory 256) (func (export "_start")
                (loop (memory.copy (i32.const 0) (i32.const 8388608) (i32.const 8388608)) (br 0))))"#,
        );
        let mut short = settings();
        short.timeout = Duration::from_millis(200);
        let started = Instant::now();
        let out = call_with(&rt, &copy, &short, b"").await;
        assert!(matches!(out.result, Err(CallError::Timeout { .. })), "{:?}", out.result);
        assert!(started.elapsed() < Duration::from_secs(10), "stopped after {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn eight_memory_bombs_at_once_stay_within_their_limits_and_memory_returns() {
        let _turn = MEASURING.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(runtime(&dir));
        let bomb = rt.load(shoal_guests::MISBEHAVE).await.unwrap();
        // Warm the slots once so that the baseline includes them.
        assert!(matches!(rt.call(&bomb, &settings(), b"oom").await.result, Err(CallError::OutOfMemory { .. })));
        let baseline = rss_bytes();
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(baseline));
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let (peak, sampling) = (peak.clone(), sampling.clone());
            std::thread::spawn(move || {
                while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(), std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let bombs: Vec<_> = (0..8)
            .map(|_| {
                let (rt, bomb) = (rt.clone(), bomb.clone());
                tokio::spawn(async move { rt.call(&bomb, &settings(), b"oom").await.result })
            })
            .collect();
        for bomb in bombs {
            let result = bomb.await.unwrap();
            assert!(matches!(result, Err(CallError::OutOfMemory { limit }) if limit == 32 * MIB), "{result:?}");
        }
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        sampler.join().unwrap();
        let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
        // Eight calls of at most 32 MiB each, plus room for the rest of the
        // process; without the limit each would take gigabytes.
        assert!(peak <= baseline + 8 * 32 * MIB + 128 * MIB, "peak {} MiB over the baseline", (peak - baseline) >> 20);
        let after = rss_bytes();
        assert!(
            after <= baseline + 64 * MIB,
            "{} MiB still resident after the bombs",
            after.saturating_sub(baseline) >> 20
        );
        assert_eq!(ok(call(&rt, shoal_guests::HELLO, b"after").await), "hello after");
    }
}

mod fuzzed {
    //! The fuzz targets' generators (`shoal_testkit::fuzz`, also driven by
    //! libFuzzer under `fuzz/`), run as proptests on stable: deploys of
    //! generated and damaged modules, and the host side of `state` under
    //! generated scripts. `SHOAL_FUZZ_CASES` sets the number of cases.

    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use shoal_state::{EmbeddedGlobal, EmbeddedStore, EmbeddedTier, ScopedKey, StateLimits, StateTiers};

    /// The same cases on every run (CI must not fail by chance), unless
    /// `SHOAL_FUZZ_RANDOM=1`: then new ones, for exploring.
    fn runner(default_cases: u32) -> TestRunner {
        let cases = std::env::var("SHOAL_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(default_cases);
        // Few shrink steps: each one deploys or calls, and the failing seed
        // is reported either way.
        let config = Config { cases, failure_persistence: None, max_shrink_iters: 16, ..Config::default() };
        if std::env::var_os("SHOAL_FUZZ_RANDOM").is_some() {
            TestRunner::new(config)
        } else {
            let rng = proptest::test_runner::TestRng::deterministic_rng(config.rng_algorithm);
            TestRunner::new_with_rng(config, rng)
        }
    }

    fn seeds() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..4096)
    }

    #[test]
    fn generated_modules_deploy_or_are_refused_and_their_calls_end_cleanly() {
        let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio.block_on(async { runtime(&dir) });
        let mut short = settings();
        short.timeout = Duration::from_millis(100);
        short.memory_limit = 16 * MIB;
        let (loaded, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        runner(48)
            .run(&seeds(), |seed| {
                let mut u = arbitrary::Unstructured::new(&seed);
                let Ok(wasm) = shoal_testkit::fuzz::wasm_module(&mut u) else { return Ok(()) };
                tokio.block_on(async {
                    match rt.load(&wasm).await {
                        Ok(image) => {
                            loaded.set(loaded.get() + 1);
                            let out = rt.call(&image, &short, b"").await;
                            prop_assert!(!matches!(out.result, Err(CallError::Internal(_))), "{:?}", out.result);
                        }
                        Err(DeployError::InvalidWasm(_)) => refused.set(refused.get() + 1),
                        Err(other) => prop_assert!(false, "deploy failed with {other:?}"),
                    }
                    Ok(())
                })
            })
            .unwrap();
        // Raw bytes too: never anything but a clean refusal.
        runner(64)
            .run(&seeds(), |bytes| {
                tokio.block_on(async {
                    let result = rt.load(&bytes).await;
                    prop_assert!(matches!(result, Ok(_) | Err(DeployError::InvalidWasm(_))), "{result:?}");
                    Ok(())
                })
            })
            .unwrap();
        let (loaded, refused) = (loaded.get(), refused.get());
        assert!(loaded > 0 && refused > 0, "the generator reaches both sides: {loaded} loaded, {refused} refused");
        assert_eq!(rt.live_instances(), 0);
        tokio.block_on(async { assert_eq!(ok(call(&rt, shoal_guests::HELLO, b"after").await), "hello after") });
    }

    #[test]
    fn generated_state_scripts_get_answers_never_host_failures_and_stay_in_their_tenant() {
        let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        let limits = StateLimits { max_value_bytes: 1 << 20, tenant_quota_bytes: 4 << 20 };
        let tiers = Arc::new(StateTiers::new(Arc::new(EmbeddedTier::new(EmbeddedGlobal::new(store, limits)))));
        let mut config = RuntimeConfig::new(dir.path().join("cache"));
        config.max_instances = 8;
        config.max_memory_bytes = 64 << 20;
        let rt = Runtime::with_state(config, tiers.clone()).unwrap();
        let image = tokio.block_on(rt.load(shoal_guests::STATE_OPS)).unwrap();
        let other = ScopedKey::new("other", "secret").unwrap();
        tokio.block_on(tiers.put_global(&other, b"untouched".to_vec())).unwrap();
        let mut fuzz = settings();
        fuzz.tenant = Arc::from("fuzz");
        fuzz.timeout = Duration::from_millis(300);
        runner(96)
            .run(&seeds(), |seed| {
                let mut u = arbitrary::Unstructured::new(&seed);
                let Ok(script) = shoal_testkit::fuzz::state_script(&mut u) else { return Ok(()) };
                tokio.block_on(async {
                    let out = rt.call(&image, &fuzz, script.as_bytes()).await;
                    // The guest's own answer or the error the host gave it;
                    // a lock held past the deadline is a timeout. Never a
                    // failure of the host.
                    let clean =
                        matches!(out.result, Ok(_) | Err(CallError::Function { .. }) | Err(CallError::Timeout { .. }));
                    prop_assert!(clean, "{:?} → {:?}", script.chars().take(200).collect::<String>(), out.result);
                    Ok(())
                })
            })
            .unwrap();
        let kept = tokio.block_on(tiers.get_global(&other)).unwrap();
        assert_eq!(kept.as_deref(), Some(&b"untouched"[..]), "another tenant's key is as it was");
    }
}

/// Python functions: source loaded into the one shared CPython runtime,
/// each call starting from the function's snapshot.
mod python {
    use super::*;
    use shoal_runtime::{Language, RuntimeBinary, SourceBundle};
    use shoal_state::{EmbeddedGlobal, EmbeddedStore, EmbeddedTier, StateLimits, StateTiers};

    /// One cache directory for every run of these tests: the runtime is
    /// compiled once, not once per test.
    fn python_runtime(dir: &tempfile::TempDir) -> Runtime {
        let mut config = RuntimeConfig::new(concat!(env!("CARGO_TARGET_TMPDIR"), "/python-cache"));
        config.max_instances = 8;
        config.max_memory_bytes = 256 << 20;
        config.python_runtime = RuntimeBinary::new(shoal_guests::PYTHON_RUNTIME);
        config.js_runtime = RuntimeBinary::new(shoal_guests::JS_RUNTIME);
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        let limits = StateLimits { max_value_bytes: 1 << 20, tenant_quota_bytes: 16 << 20 };
        let tiers = Arc::new(StateTiers::new(Arc::new(EmbeddedTier::new(EmbeddedGlobal::new(store, limits)))));
        Runtime::with_state(config, tiers).expect("runtime builds")
    }

    fn source(files: &[(&str, &str)]) -> Vec<u8> {
        let files = files.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect();
        SourceBundle::new(Language::Python, files).unwrap().encode()
    }

    /// `shoal serve` finds the runtimes' compiled code by the digests the
    /// build computed, without reading the runtimes: they must match.
    #[test]
    fn the_built_in_runtimes_digests_are_of_their_bytes() {
        use sha2::Digest;
        let digest = |bytes: &[u8]| -> [u8; 32] { sha2::Sha256::digest(bytes).into() };
        assert_eq!(digest(shoal_guests::PYTHON_RUNTIME), shoal_guests::PYTHON_RUNTIME_SHA256);
        assert_eq!(digest(shoal_guests::JS_RUNTIME), shoal_guests::JS_RUNTIME_SHA256);
    }

    fn py_settings() -> CallSettings {
        CallSettings { memory_limit: 128 * MIB, ..settings() }
    }

    fn example(name: &str) -> Vec<u8> {
        let python = shoal_guests::PYTHON_EXAMPLES.iter().map(|e| (Language::Python, e));
        let js = shoal_guests::JS_EXAMPLES.iter().map(|e| (Language::JavaScript, e));
        let (language, (_, files)) = python.chain(js).find(|(_, (n, _))| *n == name).expect("example exists");
        let files = files.iter().map(|(p, c)| (p.to_string(), c.to_vec())).collect();
        SourceBundle::new(language, files).unwrap().encode()
    }

    /// The reason `bytes` is refused as invalid source.
    async fn refused(rt: &Runtime, bytes: Vec<u8>) -> String {
        match rt.load(&bytes).await {
            Err(DeployError::InvalidSource(message)) => message,
            other => panic!("expected invalid source, got {other:?}"),
        }
    }

    fn js(files: &[(&str, &str)]) -> Vec<u8> {
        let files = files.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect();
        SourceBundle::new(Language::JavaScript, files).unwrap().encode()
    }

    /// A bare HTTP/1.1 server on 127.0.0.1: `/slow` answers after 400 ms,
    /// `/big` with 1 MiB, anything else `ok`.
    async fn outside_server() -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let body = match path.as_str() {
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(400)).await;
                            b"slow".to_vec()
                        }
                        "/big" => vec![b'x'; 1 << 20],
                        _ => b"ok".to_vec(),
                    };
                    let answer =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                    let _ = socket.write_all(answer.as_bytes()).await;
                    let _ = socket.write_all(&body).await;
                });
            }
        });
        port
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_calls_outbound_requests_are_bounded_in_number_and_bytes() {
        let port = outside_server().await;
        let mut config = RuntimeConfig::new(concat!(env!("CARGO_TARGET_TMPDIR"), "/python-cache"));
        config.max_memory_bytes = 256 << 20;
        config.js_runtime = RuntimeBinary::new(shoal_guests::JS_RUNTIME);
        config.python_runtime = RuntimeBinary::new(shoal_guests::PYTHON_RUNTIME);
        config.outbound = shoal_runtime::OutboundLimits {
            max_in_flight: 2,
            max_bytes: 256 << 10,
            opened: vec!["127.0.0.1".parse().unwrap()],
        };
        let rt = Runtime::new(config).expect("runtime builds");
        let base = format!("http://127.0.0.1:{port}");
        let settings = CallSettings {
            allowed_hosts: Arc::new(shoal_runtime::AllowList::parse(&[base.as_str()]).unwrap()),
            env: Arc::from(vec![("BASE".to_string(), base.clone())]),
            ..py_settings()
        };
        let fetcher = js(&[(
            "app.js",
            "const shoal = require('shoal');\n\
             exports.handle = async (input) => {\n\
               const base = shoal.env().BASE;\n\
               if (shoal.text(input) === 'three') {\n\
                 const all = await Promise.allSettled([1, 2, 3].map(() => fetch(`${base}/slow`).then((r) => r.text())));\n\
                 return all.map((r) => r.status).join(',');\n\
               }\n\
               try { return `got ${(await (await fetch(`${base}/big`)).arrayBuffer()).byteLength}`; }\n\
               catch (error) { return `failed ${error}`; }\n\
             };\n",
        )]);
        let fetcher = rt.load(&fetcher).await.expect("loads");
        // Two requests in flight at once: the third is refused, and the log
        // says why. A new call has its own two.
        for _ in 0..2 {
            let out = rt.call(&fetcher, &settings, b"three").await;
            // Metered: the two sent, with their bodies; not the refused one.
            assert_eq!((out.usage.outbound_requests, out.usage.outbound_bytes), (2, 8), "{:?}", out.usage);
            let logs: Vec<String> = out.logs.iter().map(|l| l.line.clone()).collect();
            assert_eq!(ok(out), "fulfilled,fulfilled,rejected");
            assert!(logs.iter().any(|l| l.contains("too many requests of this call in flight")), "{logs:?}");
        }
        // 1 MiB is past the call's 256 KiB of outbound bytes.
        let out = ok(rt.call(&fetcher, &settings, b"big").await);
        assert!(out.starts_with("failed"), "{out}");
        // Python's `shoal.fetch` meets the same limit.
        let files = vec![(
            "app.py".to_string(),
            b"import os, shoal\n\ndef handle(input):\n    try:\n        return str(len(shoal.fetch(os.environ['BASE'] + '/' + input.decode()).body))\n    except shoal.HttpError as error:\n        return f'failed {error}'\n".to_vec(),
        )];
        let py = rt.load(&SourceBundle::new(Language::Python, files).unwrap().encode()).await.expect("loads");
        let small = rt.call(&py, &settings, b"small").await;
        assert_eq!((small.usage.outbound_requests, small.usage.outbound_bytes), (1, 2));
        assert_eq!(ok(small), "2");
        let out = ok(rt.call(&py, &settings, b"big").await);
        assert!(out.starts_with("failed"), "{out}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn javascript_functions_run_from_snapshots_of_one_shared_engine() {
        let dir = tempfile::tempdir().unwrap();
        let rt = python_runtime(&dir);
        let hello = rt.load(&example("hello-js")).await.expect("hello-js loads");
        assert_eq!(hello.kind(), FunctionKind::JavaScript);
        assert!(hello.is_snapshot());
        assert_eq!(ok(rt.call(&hello, &py_settings(), b"you").await), "hello you from javascript");

        let tally = rt.load(&example("tally")).await.expect("tally loads");
        assert_eq!(ok(rt.call(&tally, &py_settings(), b"ann").await), r#"{"greeting":"hello ann","count":1}"#);
        assert_eq!(ok(rt.call(&tally, &py_settings(), b"ann").await), r#"{"greeting":"hello ann","count":2}"#);

        // Top-level code ran at deploy; each call starts from its result.
        let stateful = js(&[(
            "app.js",
            "const table = new Map(); for (let i = 0; i < 10000; i++) table.set(i, i * i);\n\
             let calls = 0;\nexports.handle = () => `${table.get(9999)} ${++calls}`;\n",
        )]);
        let stateful = rt.load(&stateful).await.unwrap();
        for _ in 0..3 {
            assert_eq!(ok(rt.call(&stateful, &py_settings(), b"").await), "99980001 1");
        }
        assert!(stateful.snapshot_bytes() < 4 << 20, "{} KiB of its own", stateful.snapshot_bytes() >> 10);

        let refused = |bytes: Vec<u8>| refused(&rt, bytes);
        let syntax = refused(js(&[("app.js", "exports.handle = (input => ;")])).await;
        assert!(syntax.contains("SyntaxError"), "{syntax}");
        let no_handle = refused(js(&[("app.js", "exports.x = 1;")])).await;
        assert!(no_handle.contains("exports no function handle"), "{no_handle}");
        let missing = refused(js(&[("app.js", "require('./nowhere.js');")])).await;
        assert!(missing.contains("cannot find module"), "{missing}");
        let at_load = refused(js(&[("app.js", "require('shoal').state.incr('x');")])).await;
        assert!(at_load.contains("unavailable"), "{at_load}");

        let logs = js(&[(
            "app.js",
            "console.log('at load');\nexports.handle = () => { console.log('in call'); return 'ok'; };",
        )]);
        let logs = rt.load(&logs).await.unwrap();
        let out = rt.call(&logs, &py_settings(), b"").await;
        assert_eq!((&out.stdout[..], out.result.unwrap()), (&b"in call\n"[..], b"ok".to_vec()));

        let failing = rt
            .load(&js(&[("app.js", "exports.handle = (i) => { throw new TypeError('bad ' + i.length); };")]))
            .await
            .unwrap();
        match rt.call(&failing, &py_settings(), b"42").await.result {
            Err(CallError::Function { message }) => assert_eq!(message, "TypeError: bad 2"),
            other => panic!("expected a function error, got {other:?}"),
        }
        let spin = rt.load(&js(&[("app.js", "exports.handle = () => { for (;;) {} };")])).await.unwrap();
        let quick = CallSettings { timeout: Duration::from_millis(200), ..py_settings() };
        assert!(matches!(rt.call(&spin, &quick, b"").await.result, Err(CallError::Timeout { .. })));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn python_functions_run_from_snapshots_of_one_shared_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let rt = python_runtime(&dir);
        let hello = rt.load(&example("hello-py")).await.expect("hello loads");
        assert_eq!(hello.kind(), FunctionKind::Python);
        assert_eq!(ok(rt.call(&hello, &py_settings(), b"you").await), "hello you from python");

        // Top-level code runs once, at deploy: its result is in the
        // snapshot; every call starts from that snapshot, so what a call
        // changes is gone by the next.
        let stateful = source(&[(
            "app.py",
            "import os\nLOADS = [os.getpid() if hasattr(os, 'getpid') else 0]\nTABLE = {i: i * i for i in range(10000)}\ncalls = 0\nBIG = []\n\
             def handle(input):\n    global calls\n    calls += 1\n    TABLE[9999] += 1\n\
             \x20   BIG.append(bytearray(b'x') * (8 << 20))\n\
             \x20   while input == b'spin':\n        pass\n\
             \x20   return f'{len(LOADS)} {TABLE[9999] - 1} {calls} {len(BIG)}'\n",
        )]);
        let stateful = rt.load(&stateful).await.expect("loads");
        // Each call changes module state and grows memory by 8 MiB; a
        // memory kept for the next call is reset first (even after a call
        // that timed out), so every call sees what the deploy left.
        let quick = CallSettings { timeout: Duration::from_millis(300), ..py_settings() };
        for round in 0..3 {
            assert_eq!(ok(rt.call(&stateful, &py_settings(), b"").await), "1 99980001 1 1", "round {round}");
            assert!(matches!(rt.call(&stateful, &quick, b"spin").await.result, Err(CallError::Timeout { .. })));
        }
        // Both functions share the runtime; each holds only its own pages.
        assert!(hello.snapshot_bytes() > 0);
        assert!(hello.snapshot_bytes() < 4 << 20, "hello's own pages: {} KiB", hello.snapshot_bytes() >> 10);
        assert_eq!(ok(rt.call(&hello, &py_settings(), b"again").await), "hello again from python");
        // A restart loads the runtime compiled: nothing is compiled again.
        let restarted = python_runtime(&tempfile::tempdir().unwrap());
        let again = restarted.load(&example("hello-py")).await.unwrap();
        assert_eq!(restarted.n_compiles(), 0);
        assert_eq!(ok(restarted.call(&again, &py_settings(), b"back").await), "hello back from python");
        // The runtime is held while a function of it is loaded, and made
        // again from the cache (its code and its memory image) after.
        assert_eq!(restarted.n_language_runtimes().await, 1);
        drop(again);
        assert_eq!(restarted.n_language_runtimes().await, 0, "let go with its last function");
        let images = std::fs::read_dir(concat!(env!("CARGO_TARGET_TMPDIR"), "/python-cache"))
            .unwrap()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".memory"))
            .count();
        assert!(images >= 1, "the runtime's memory image is cached beside its code");
        let back = restarted.load(&example("hello-py")).await.unwrap();
        assert_eq!((restarted.n_compiles(), restarted.n_language_runtimes().await), (0, 1));
        assert_eq!(ok(restarted.call(&back, &py_settings(), b"home").await), "hello home from python");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_python_call_sees_its_env_fresh_randomness_and_working_stdio() {
        let dir = tempfile::tempdir().unwrap();
        let rt = python_runtime(&dir);
        let probe = source(&[(
            "app.py",
            "import os, random\nprint('at load')\n\
             def handle(input):\n    print('in call')\n    return f\"{os.environ.get('GREETING')} {random.random()}\"\n",
        )]);
        let probe = rt.load(&probe).await.unwrap();
        let first = rt.call(&probe, &py_settings(), b"").await;
        assert_eq!(&first.stdout[..], b"in call\n");
        let first = String::from_utf8(first.result.unwrap()).unwrap();
        let second = ok(rt.call(&probe, &py_settings(), b"").await);
        assert!(first.starts_with("hi "), "the deploy's env vars reach os.environ: {first}");
        assert_ne!(first, second, "each call draws its own random numbers");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn python_functions_reach_state_and_their_own_modules() {
        let dir = tempfile::tempdir().unwrap();
        let rt = python_runtime(&dir);
        let visits = rt.load(&example("visits")).await.expect("visits loads");
        let first = ok(rt.call(&visits, &py_settings(), b"ann").await);
        assert_eq!(first, r#"{"greeting": "hello ann", "visits": 1}"#);
        let second = ok(rt.call(&visits, &py_settings(), b"ann").await);
        assert_eq!(second, r#"{"greeting": "hello ann", "visits": 2}"#);
    }

    /// A function's top-level code runs once, at its first load: a restart
    /// (another runtime on the same cache) reads its snapshot back, and
    /// forgetting the function's compiled files removes that snapshot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_python_functions_snapshot_is_kept_and_its_code_not_run_again() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let unique = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let code =
            format!("# {unique}\nimport time\nSTAMP = str(time.time_ns())\n\ndef handle(input):\n    return STAMP\n");
        let bundle = source(&[("app.py", &code)]);
        let rt = python_runtime(&dir);
        let first = ok(rt.call(&rt.load(&bundle).await.unwrap(), &py_settings(), b"").await);
        let restarted = python_runtime(&tempfile::tempdir().unwrap());
        let image = restarted.load(&bundle).await.unwrap();
        assert_eq!(ok(restarted.call(&image, &py_settings(), b"").await), first, "the stamp its first load took");
        let sha256: [u8; 32] = sha2::Sha256::digest(&bundle).into();
        let prefix: String = sha256.iter().map(|b| format!("{b:02x}")).collect();
        let kept = || {
            std::fs::read_dir(concat!(env!("CARGO_TARGET_TMPDIR"), "/python-cache"))
                .unwrap()
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&prefix) && name.ends_with(".snapshot"))
                .count()
        };
        assert_eq!(kept(), 1);
        assert!(restarted.forget_compiled(&sha256) > 0);
        assert_eq!(kept(), 0, "removed with the function's other files");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_python_is_refused_at_deploy_and_failing_calls_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let rt = python_runtime(&dir);
        let refused = |bytes: Vec<u8>| refused(&rt, bytes);
        let syntax = refused(source(&[("app.py", "def handle(input)\n    return input\n")])).await;
        assert!(syntax.contains("SyntaxError"), "{syntax}");
        let no_handle = refused(source(&[("app.py", "x = 1\n")])).await;
        assert!(no_handle.contains("defines no function `handle"), "{no_handle}");
        let raises = refused(source(&[("app.py", "raise RuntimeError('no config')\n")])).await;
        assert!(raises.contains("RuntimeError: no config"), "{raises}");
        let missing = refused(source(&[("app.py", "import nowhere\n")])).await;
        assert!(missing.contains("ModuleNotFoundError"), "{missing}");
        // Only the preloaded standard library is there.
        let unlisted = refused(source(&[("app.py", "import sqlite3\n")])).await;
        assert!(unlisted.contains("ModuleNotFoundError"), "{unlisted}");
        // Top-level code runs at deploy, where state is not reachable.
        let at_load = refused(source(&[("app.py", "import shoal\nshoal.state.incr('x')\n")])).await;
        assert!(at_load.contains("Unavailable"), "{at_load}");

        let failing =
            source(&[("app.py", "def handle(input):\n    raise ValueError('bad input: ' + input.decode())\n")]);
        let failing = rt.load(&failing).await.unwrap();
        match rt.call(&failing, &py_settings(), b"42").await.result {
            Err(CallError::Function { message }) => assert_eq!(message, "ValueError: bad input: 42"),
            other => panic!("expected a function error, got {other:?}"),
        }
        let spin = source(&[("app.py", "def handle(input):\n    while True:\n        pass\n")]);
        let spin = rt.load(&spin).await.unwrap();
        let quick = CallSettings { timeout: Duration::from_millis(200), ..py_settings() };
        assert!(matches!(rt.call(&spin, &quick, b"").await.result, Err(CallError::Timeout { .. })));
        let hog = source(&[("app.py", "def handle(input):\n    return bytes(200 * 1024 * 1024)\n")]);
        let hog = rt.load(&hog).await.unwrap();
        assert!(matches!(rt.call(&hog, &py_settings(), b"").await.result, Err(CallError::OutOfMemory { .. })));
        let endless = source(&[("app.py", "while True:\n    pass\n")]);
        let mut config = RuntimeConfig::new(concat!(env!("CARGO_TARGET_TMPDIR"), "/python-cache"));
        config.compile_timeout = Duration::from_millis(500);
        config.python_runtime = RuntimeBinary::new(shoal_guests::PYTHON_RUNTIME);
        let impatient = Runtime::new(config).unwrap();
        match impatient.load(&endless).await {
            Err(DeployError::InvalidSource(message)) => assert!(message.contains("loading took longer"), "{message}"),
            other => panic!("expected the load to time out, got {other:?}"),
        }
        let printer = source(&[("app.py", "def handle(input):\n    print('to the log')\n    return None\n")]);
        let printer = rt.load(&printer).await.unwrap();
        let out = rt.call(&printer, &py_settings(), b"").await;
        assert_eq!(&out.stdout[..], b"to the log\n");
        assert_eq!(out.result.unwrap(), b"");
    }
}

/// Pre-initialisation snapshots (deploy option `snapshot`).
mod snapshots {
    use super::*;
    use shoal_runtime::LoadOptions;

    const SNAPSHOT: &LoadOptions = &LoadOptions { snapshot: true, tenant: None };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_call_starts_from_the_state_init_left_and_never_runs_it() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(&dir);
        let snapshot = rt.load_with(shoal_guests::PRIMES, SNAPSHOT).await.expect("snapshot taken");
        assert!(snapshot.is_snapshot());
        assert!(snapshot.declared().memory_bytes >= 8 << 20, "the snapshot's memory holds the tables");
        let plain = rt.load(shoal_guests::PRIMES).await.expect("loads without a snapshot");
        assert!(!plain.is_snapshot() && !Arc::ptr_eq(&snapshot, &plain), "two images of the same bytes");
        assert!(plain.declared().memory_bytes < 8 << 20);
        for _ in 0..2 {
            assert_eq!(
                ok(rt.call(&snapshot, &settings(), b"97").await),
                "97 is prime; 25 primes up to 97 (tables built by init)"
            );
        }
        assert_eq!(
            ok(rt.call(&plain, &settings(), b"97").await),
            "97 is prime; 25 primes up to 97 (tables built by this call)"
        );
        assert_eq!(
            ok(rt.call(&snapshot, &settings(), b"67108863").await),
            "67108863 is not prime; 3957809 primes up to 67108863 (tables built by init)"
        );

        // A restart loads the compiled snapshot: no init, no compile.
        let restarted = runtime(&dir);
        let again = restarted.load_with(shoal_guests::PRIMES, SNAPSHOT).await.unwrap();
        assert_eq!(restarted.n_compiles(), 0);
        assert_eq!(again.declared(), snapshot.declared(), "what the snapshot declares is kept with it");
        assert_eq!(
            ok(restarted.call(&again, &settings(), b"2").await),
            "2 is prime; 1 primes up to 2 (tables built by init)"
        );
    }

    #[tokio::test]
    async fn a_snapshot_needs_an_init_that_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(&dir);
        for (wasm, expected) in
            [(shoal_guests::HELLO, "exported `init: func()`"), (shoal_guests::UPPER, "command module")]
        {
            match rt.load_with(wasm, SNAPSHOT).await {
                Err(DeployError::InvalidWasm(message)) => assert!(message.contains(expected), "{message}"),
                other => panic!("expected a refusal naming {expected:?}, got {other:?}"),
            }
        }
        let trapping = wat::parse_str(
            r#"(component
                 (core module $m (func (export "init") unreachable)
                   (memory (export "memory") 1)
                   (func (export "handle") (param i32 i32) (result i32) unreachable)
                   (func (export "realloc") (param i32 i32 i32 i32) (result i32) unreachable))
                 (core instance $i (instantiate $m))
                 (func (export "init") (canon lift (core func $i "init")))
                 (type $error (result (list u8) (error string)))
                 (func $handle (param "input" (list u8)) (result $error)
                   (canon lift (core func $i "handle") (memory $i "memory") (realloc (func $i "realloc"))))
                 (instance $handler (export "handle" (func $handle)))
                 (export "shoal:function/handler@0.1.0" (instance $handler)))"#,
        )
        .unwrap();
        match rt.load_with(&trapping, SNAPSHOT).await {
            Err(DeployError::InvalidWasm(message)) => assert!(message.contains("the initialiser failed"), "{message}"),
            other => panic!("expected the trap in init to refuse the deploy, got {other:?}"),
        }
    }
}
