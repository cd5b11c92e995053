//! `languages`: what a Python or JavaScript function costs on its shared
//! runtime.
//!
//! - the runtime: compiling it (empty cache) and loading it compiled (a
//!   restart);
//! - deploying N distinct functions (their source loaded, snapshot taken),
//!   the time per deploy;
//! - memory: RSS of the process before and after deploying and invoking
//!   each of them once, and the pages each snapshot holds alone;
//! - cold start (a new instance from the snapshot + one call), median and
//!   p99, side by side with the same function on a runtime that makes
//!   every call's memory afresh (no idle memories kept) and with the Rust
//!   `hello` component, in the same run; and the first call after each
//!   deploy (on the memory the deploy left, which holds the snapshot).
//!
//! `cargo bench -p shoal-runtime --bench languages` (N = 100 per language); run as a test
//! (`cargo test --all-targets`), N = 3 and a few calls, as a smoke test.
//! To profile one path: `SHOAL_BENCH_LANGUAGE=python|javascript` runs one
//! language, `SHOAL_BENCH_CALLS=N` sets the calls per cold-start loop,
//! `SHOAL_BENCH_DIR` keeps the compiled runtimes between runs.

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

/// Minor page faults of the process so far.
fn minor_faults() -> i64 {
    // SAFETY: getrusage writes only into the struct it is given.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    usage.ru_minflt
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn function_source(language: Language, i: usize) -> Vec<u8> {
    // Distinct functions of the size of a small real one: a table built at
    // load, a helper, a handler using both.
    let app = match language {
        Language::Python => format!(
            "import json\n\nRATES = {{f'k{{n}}': n * {i} for n in range(200)}}\n\n\
             def describe(name):\n    return {{'function': {i}, 'name': name, 'rate': RATES.get(name, 0)}}\n\n\
             def handle(input):\n    return json.dumps(describe(input.decode())).encode()\n"
        ),
        Language::JavaScript => format!(
            "const rates = new Map();\nfor (let n = 0; n < 200; n++) rates.set(`k${{n}}`, n * {i});\n\
             const describe = (name) => ({{ function: {i}, name, rate: rates.get(name) ?? 0 }});\n\
             exports.handle = (input) => JSON.stringify(describe(new TextDecoder().decode(input)));\n"
        ),
    };
    let files = vec![(language.entry_file().to_string(), app.into_bytes())];
    SourceBundle::new(language, files).expect("bundle").encode()
}

fn example(language: Language, name: &str) -> Vec<u8> {
    let examples = match language {
        Language::Python => shoal_guests::PYTHON_EXAMPLES,
        Language::JavaScript => shoal_guests::JS_EXAMPLES,
    };
    let (_, files) = examples.iter().find(|(n, _)| *n == name).expect("the example exists");
    let files = files.iter().map(|(p, c)| (p.to_string(), c.to_vec())).collect();
    SourceBundle::new(language, files).expect("bundle").encode()
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let (n_functions, n_calls) = if full { (100, 2000) } else { (3, 5) };
    // For profiling one path: more calls, one language.
    let n_calls = std::env::var("SHOAL_BENCH_CALLS").ok().and_then(|n| n.parse().ok()).unwrap_or(n_calls);
    let only = std::env::var("SHOAL_BENCH_LANGUAGE").ok();
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    let dir = tempfile::tempdir().expect("temp dir");
    // The compile step (a child process) and this one share the cache.
    let base: std::path::PathBuf =
        std::env::var_os("SHOAL_BENCH_DIR").map_or_else(|| dir.path().to_path_buf(), Into::into);
    let cache = base.join("cache");
    let config = || {
        let mut config = RuntimeConfig::new(&cache);
        config.python_runtime = RuntimeBinary::new(shoal_guests::PYTHON_RUNTIME);
        config.js_runtime = RuntimeBinary::new(shoal_guests::JS_RUNTIME);
        config
    };
    let settings = CallSettings {
        tenant: Arc::from("bench"),
        memory_limit: 128 << 20,
        timeout: Duration::from_secs(10),
        env: Arc::from(Vec::new()),
        allowed_hosts: Arc::default(),
        config: Default::default(),
        trace: None,
    };
    let hellos = [
        (Language::Python, example(Language::Python, "hello-py")),
        (Language::JavaScript, example(Language::JavaScript, "hello-js")),
    ];

    // The runtimes are compiled on a node's first deploy of each language:
    // done in a child process, so the compiler's heap does not hide what
    // functions add to this one's.
    if std::env::var_os("SHOAL_BENCH_COMPILE_ONLY").is_some() {
        let runtime = Runtime::new(config()).expect("runtime");
        for (language, hello) in &hellos {
            let (started, compiles) = (Instant::now(), runtime.n_compiles());
            drop(tokio.block_on(runtime.load(hello)).expect("hello loads"));
            let compiled =
                if runtime.n_compiles() > compiles { "compiling it" } else { "found in SHOAL_BENCH_DIR's cache" };
            println!("{} runtime: first deploy on a node ({compiled}) {:.2?}", language.as_str(), started.elapsed());
        }
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().expect("own path"))
        .env("SHOAL_BENCH_COMPILE_ONLY", "1")
        .env("SHOAL_BENCH_DIR", &base)
        .status()
        .expect("run the compile step");
    assert!(status.success(), "the compile step failed");

    let runtime = Runtime::new(config()).expect("runtime");
    let mut loaded = Vec::new();
    for (language, hello) in &hellos {
        let started = Instant::now();
        loaded.push(tokio.block_on(runtime.load(hello)).expect("hello loads"));
        println!("{} runtime: after a restart (cached) {:.2?} to deploy hello", language.as_str(), started.elapsed());
    }
    println!("compiles after the restart: {}", runtime.n_compiles());
    // The same hellos on a runtime that makes every call's memory afresh
    // (no reuse), for the side-by-side cold start below.
    let afresh = Runtime::new(RuntimeConfig { idle_interpreter_memories: 0, ..config() }).expect("runtime");
    let afresh_hellos: Vec<_> =
        hellos.iter().map(|(_, hello)| tokio.block_on(afresh.load(hello)).expect("hello loads")).collect();
    let rust = tokio.block_on(runtime.load(shoal_guests::HELLO)).expect("hello loads");
    // Every function stays deployed to the end: memory freed by one
    // language's would be reused by the next's and hide what they add.
    let mut deployed = Vec::new();
    for (((language, _), hello), hello_afresh) in hellos.iter().zip(loaded).zip(afresh_hellos) {
        let name = language.as_str();
        if only.as_deref().is_some_and(|only| only != name) {
            continue;
        }

        // N distinct functions: deploy each, call each once. On a runtime
        // of their own, so the idle memories this language's calls keep
        // do not push out the other's (which would hide what they add).
        let own = Runtime::new(config()).expect("runtime");
        drop(tokio.block_on(own.load(&hellos[0].1)).expect("hello loads"));
        drop(tokio.block_on(own.load(&hellos[1].1)).expect("hello loads"));
        let rss_before = rss_bytes();
        let mut deploys = Vec::new();
        let mut first_calls = Vec::new();
        let mut images = Vec::new();
        for i in 0..n_functions {
            let source = function_source(*language, i);
            let started = Instant::now();
            let image = tokio.block_on(own.load(&source)).expect("function loads");
            deploys.push(started.elapsed());
            let started = Instant::now();
            let out = tokio.block_on(own.call(&image, &settings, b"k7"));
            first_calls.push(started.elapsed());
            let output = String::from_utf8_lossy(&out.result.expect("call succeeds")).replace(' ', "");
            assert!(output.contains(&format!("\"rate\":{}", 7 * i)), "{output}");
            images.push(image);
        }
        let rss_after = rss_bytes();
        deploys.sort();
        first_calls.sort();
        let own: usize = images.iter().map(|image| image.snapshot_bytes()).sum();
        deployed.push((own, images));
        println!(
            "{name}: deploy (runtime compiled): median {:.2?}, p99 {:.2?}, max {:.2?} over {n_functions}",
            percentile(&deploys, 0.5),
            percentile(&deploys, 0.99),
            deploys.last().expect("some")
        );
        println!(
            "{name}: first call after deploy (on the memory the deploy left): median {:.2?}, p99 {:.2?}",
            percentile(&first_calls, 0.5),
            percentile(&first_calls, 0.99)
        );
        println!(
            "{name}: RSS +{:.2} MiB for {n_functions} functions deployed and invoked ({:.0} KiB each); snapshots' own pages {:.0} KiB each on average",
            (rss_after.saturating_sub(rss_before)) as f64 / (1 << 20) as f64,
            (rss_after.saturating_sub(rss_before)) as f64 / 1024.0 / n_functions as f64,
            own as f64 / 1024.0 / n_functions as f64
        );

        // Cold start: a fresh instance from the snapshot + one call, side
        // by side with the Rust hello component.
        let runs = [
            (format!("hello ({name})"), &runtime, &hello),
            (format!("hello ({name}), memory made afresh every call"), &afresh, &hello_afresh),
            ("hello (rust component)".to_string(), &runtime, &rust),
        ];
        for (what, runtime, image) in runs {
            let mut times = Vec::with_capacity(n_calls);
            // Where each call's time went: making the sandbox (its memory
            // and the instances), running the call, and after it (dropping
            // the store: the memory reset or unmapped).
            let (mut making, mut running, mut after) = (Vec::new(), Vec::new(), Vec::new());
            let faults_before = minor_faults();
            for _ in 0..n_calls {
                let started = Instant::now();
                let out = tokio.block_on(runtime.call(image, &settings, b"bench"));
                let total = started.elapsed();
                times.push(total);
                assert!(out.result.is_ok(), "{:?}", out.result);
                making.push(out.usage.instantiate);
                running.push(out.usage.wall.saturating_sub(out.usage.instantiate));
                after.push(total.saturating_sub(out.usage.wall));
            }
            let faults = (minor_faults() - faults_before) as f64 / n_calls as f64;
            for list in [&mut times, &mut making, &mut running, &mut after] {
                list.sort();
            }
            println!(
                "cold start {what}: median {:.1?}, p99 {:.1?} over {n_calls} calls \
                 (medians: making the sandbox {:.1?}, the call {:.1?}, after it {:.1?}; {faults:.0} page faults per call)",
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                percentile(&making, 0.5),
                percentile(&running, 0.5),
                percentile(&after, 0.5),
            );
        }
    }
}
