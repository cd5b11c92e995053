//! The runtime's integration tests: real guests from `guests/`, compiled by
//! the build, run through the public API.

use std::sync::Arc;
use std::time::Duration;

use shoal_runtime::{CallError, CallOutput, CallSettings, DeployError, FunctionKind, Runtime, RuntimeConfig};

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
        out.log_lines().into_iter().map(|l| (l.stream.as_str().to_string(), l.line)).collect();
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

/// A module that takes long to compile: many functions with real bodies.
fn slow_to_compile(tag: u32, n_functions: usize) -> Vec<u8> {
    let mut text = String::from("(module (memory 1)");
    for i in 0..n_functions {
        text.push_str(&format!(
            "(func (param i32) (result i32) (local.get 0) (i32.const {i}) (i32.add) (i32.const {tag}) (i32.mul) \
             (i32.load (i32.const 0)) (i32.xor) (i32.const 7) (i32.rotl))"
        ));
    }
    text.push_str(r#"(func (export "_start")))"#);
    wat::parse_str(&text).unwrap()
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
            tokio::spawn(async move { rt.load(&slow_to_compile(tag, 8_000)).await.map(|_| ()) })
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
