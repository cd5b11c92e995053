//! `python`: what a Python function costs on the shared runtime.
//!
//! - the runtime: compiling it (empty cache) and loading it compiled (a
//!   restart);
//! - deploying N distinct functions (their source loaded, snapshot taken),
//!   the time per deploy;
//! - memory: RSS of the process before and after deploying and invoking
//!   each of them once, and the pages each snapshot holds alone;
//! - cold start (a new instance from the snapshot + one call), median and
//!   p99, side by side with the Rust `hello` component in the same run.
//!
//! `cargo bench -p shoal-runtime --bench python` (N = 100); run as a test
//! (`cargo test --all-targets`), N = 3 and a few calls, as a smoke test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_runtime::{CallSettings, Language, Runtime, RuntimeBinary, RuntimeConfig, SourceBundle};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn function_source(i: usize) -> Vec<u8> {
    // Distinct functions of the size of a small real one: a table built at
    // load, a helper, a handler using both.
    let app = format!(
        "import json\n\nRATES = {{f'k{{n}}': n * {i} for n in range(200)}}\n\n\
         def describe(name):\n    return {{'function': {i}, 'name': name, 'rate': RATES.get(name, 0)}}\n\n\
         def handle(input):\n    return json.dumps(describe(input.decode())).encode()\n"
    );
    SourceBundle::new(Language::Python, vec![("app.py".into(), app.into_bytes())]).expect("bundle").encode()
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let (n_functions, n_calls) = if full { (100, 2000) } else { (3, 5) };
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = || {
        let mut config = RuntimeConfig::new(dir.path().join("cache"));
        config.python_runtime = RuntimeBinary(Some(shoal_guests::PYTHON_RUNTIME));
        config
    };
    let settings = CallSettings {
        tenant: Arc::from("bench"),
        memory_limit: 128 << 20,
        timeout: Duration::from_secs(10),
        env: Arc::from(Vec::new()),
    };

    // The runtime: compiled on the first Python deploy, from the cache after.
    let hello = {
        let (_, files) = shoal_guests::PYTHON_EXAMPLES.iter().find(|(n, _)| *n == "hello-py").expect("hello-py");
        let files = files.iter().map(|(p, c)| (p.to_string(), c.to_vec())).collect();
        SourceBundle::new(Language::Python, files).expect("bundle").encode()
    };
    let started = Instant::now();
    drop(tokio.block_on(Runtime::new(config()).expect("runtime").load(&hello)).expect("hello-py loads"));
    let first = started.elapsed();
    let runtime = Runtime::new(config()).expect("runtime");
    let started = Instant::now();
    let hello = tokio.block_on(runtime.load(&hello)).expect("hello-py loads");
    let restarted = started.elapsed();
    println!(
        "python runtime: first deploy on a node (compile + load) {first:.2?}; after a restart (cached) {restarted:.2?}"
    );
    println!("python runtime: {} compiles in the restarted runtime", runtime.n_compiles());

    // N distinct functions: deploy each, call each once.
    let rss_before = rss_bytes();
    let mut deploys = Vec::new();
    let mut images = Vec::new();
    for i in 0..n_functions {
        let source = function_source(i);
        let started = Instant::now();
        let image = tokio.block_on(runtime.load(&source)).expect("function loads");
        deploys.push(started.elapsed());
        let out = tokio.block_on(runtime.call(&image, &settings, b"k7"));
        let expected = format!("\"rate\": {}", 7 * i);
        assert!(String::from_utf8_lossy(&out.result.expect("call succeeds")).contains(&expected));
        images.push(image);
    }
    let rss_after = rss_bytes();
    deploys.sort();
    let own: usize = images.iter().map(|image| image.snapshot_bytes()).sum();
    println!(
        "deploy of a python function (runtime compiled): median {:.2?}, p99 {:.2?}, max {:.2?} over {n_functions}",
        percentile(&deploys, 0.5),
        percentile(&deploys, 0.99),
        deploys.last().expect("some")
    );
    println!(
        "memory: RSS +{:.2} MiB for {n_functions} functions deployed and invoked ({:.0} KiB each); snapshots' own pages {:.0} KiB each on average",
        (rss_after.saturating_sub(rss_before)) as f64 / (1 << 20) as f64,
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0 / n_functions as f64,
        own as f64 / 1024.0 / n_functions as f64
    );

    // Cold start: a fresh instance from the snapshot + one call, side by
    // side with the Rust hello component.
    let rust = tokio.block_on(runtime.load(shoal_guests::HELLO)).expect("hello loads");
    for (name, image) in [("hello-py (python)", &hello), ("hello (rust component)", &rust)] {
        let mut times = Vec::with_capacity(n_calls);
        for _ in 0..n_calls {
            let started = Instant::now();
            let out = tokio.block_on(runtime.call(image, &settings, b"bench"));
            times.push(started.elapsed());
            assert!(out.result.is_ok(), "{:?}", out.result);
        }
        times.sort();
        println!(
            "cold start {name}: median {:.1?}, p99 {:.1?} over {n_calls} calls",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
    }
}
