//! Scale of a node with many functions (not a criterion benchmark: it
//! measures memory and restart time once, over real HTTP).
//!
//! `cargo bench -p shoal-node --bench scale` deploys 1,000 functions whose
//! wasm all differ (the `hello` example with a distinct custom section each,
//! so no two share compiled code) and invokes each once, then 1,000 names
//! deploying one and the same binary, and reports the RSS increment per
//! function for each; then it restarts the node on the same data directory
//! and reports the time until it serves again and how many binaries it
//! compiled (0: everything comes from the artifact cache).
//! Run without `--bench` (as `cargo test --all-targets` does) it does the
//! same with 10 functions, as a smoke test.

use std::sync::Arc;
use std::time::Instant;

use shoal_node::{Node, NodeConfig};

const ADMIN: &str = "bench-admin-token-0123456789";

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value");
    kib * 1024
}

struct Served {
    node: Arc<Node>,
    base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(dir: &std::path::Path) -> Served {
    serve_with(dir, NodeConfig::new(dir).max_loaded_images).await
}

async fn serve_with(dir: &std::path::Path, max_loaded_images: usize) -> Served {
    let mut config = NodeConfig::new(dir);
    config.admin_token = Some(ADMIN.into());
    config.max_concurrent_calls = 64;
    config.max_loaded_images = max_loaded_images;
    let node = start_node(config).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let node = node.clone();
        tokio::spawn(async move {
            node.serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        })
    };
    Served { node, base, stop, task }
}

/// Stop a node and wait until the last reference to it is gone (tasks
/// finishing the requests it served may hold one a moment longer), so
/// that its store can be opened again.
/// Start a node on a data directory a node of this process may have just
/// left: the last of the old node's work (a sandbox dropped on a call
/// thread, a sweep finishing) can hold the embedded store a moment after
/// the node itself is gone, so "already open" is tried again for a while.
async fn start_node(config: NodeConfig) -> Arc<Node> {
    let waited = Instant::now();
    loop {
        match Node::start(config.clone()).await {
            Ok(node) => return node,
            Err(e) if e.to_string().contains("already open") && waited.elapsed().as_secs() < 20 => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("node starts: {e}"),
        }
    }
}

async fn stop(served: Served) {
    let _ = served.stop.send(());
    served.task.await.expect("serve task");
    let waited = Instant::now();
    while Arc::strong_count(&served.node) > 1 {
        assert!(waited.elapsed() < std::time::Duration::from_secs(30), "the node is still referenced");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn deploy_and_invoke(http: &reqwest::Client, base: &str, function: &str, wasm: Vec<u8>) {
    let url = format!("{base}/v1/functions/{function}");
    let response = http.put(&url).bearer_auth(ADMIN).body(wasm).send().await.expect("deploy");
    assert_eq!(response.status(), 201, "deploy {function}: {}", response.text().await.unwrap_or_default());
    invoke(http, base, function).await;
}

async fn invoke(http: &reqwest::Client, base: &str, function: &str) {
    let url = format!("{base}/v1/functions/{function}/invoke");
    let response = http.post(url).bearer_auth(ADMIN).body("bench").send().await.expect("invoke");
    assert_eq!(response.status(), 200, "invoke {function}");
    assert_eq!(&response.bytes().await.expect("body")[..], b"hello bench");
}

async fn create_tenant(http: &reqwest::Client, base: &str, name: &str) {
    let response = http
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await
        .expect("create tenant");
    assert_eq!(response.status(), 201);
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = if full { 1000 } else { 10 };
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    tokio.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let http = reqwest::Client::new();
        let served = serve(dir.path()).await;
        let base = served.base.clone();
        create_tenant(&http, &base, "distinct").await;
        create_tenant(&http, &base, "same").await;
        create_tenant(&http, &base, "warm").await;
        // Warm up everything that is paid once (linkers, pools, HTTP), in
        // a tenant of its own: each group fills its tenant's 1,000.
        deploy_and_invoke(&http, &base, "warm/up", shoal_guests::HELLO.to_vec()).await;

        let rss0 = rss_bytes();
        let started = Instant::now();
        for i in 0..n {
            deploy_and_invoke(
                &http,
                &base,
                &format!("distinct/f{i}"),
                shoal_guests::tagged(shoal_guests::HELLO, i as u32),
            )
            .await;
        }
        let distinct_secs = started.elapsed().as_secs_f64();
        let rss1 = rss_bytes();
        for i in 0..n {
            deploy_and_invoke(&http, &base, &format!("same/f{i}"), shoal_guests::HELLO.to_vec()).await;
        }
        let rss2 = rss_bytes();
        let per_distinct = (rss1.saturating_sub(rss0)) as f64 / n as f64 / 1024.0;
        let per_same = (rss2.saturating_sub(rss1)) as f64 / n as f64 / 1024.0;
        println!("functions per group: {n}");
        println!("distinct binaries: deploy+invoke {distinct_secs:.1} s, RSS +{per_distinct:.1} KiB per function");
        println!("one shared binary: RSS +{per_same:.1} KiB per function");
        println!("RSS: {} MiB before, {} MiB after both groups", rss0 >> 20, rss2 >> 20);
        let compiles_before = served.node.runtime().n_compiles();
        assert_eq!(compiles_before, n as u64 + 1, "one compile per distinct binary, none for shared bytes");

        let _ = served.stop.send(());
        served.task.await.expect("serve task");
        drop(served.node);

        let started = Instant::now();
        let again = serve(dir.path()).await;
        let restart_ms = started.elapsed().as_secs_f64() * 1000.0;
        let response = http
            .post(format!("{}/v1/functions/distinct/f0/invoke", again.base))
            .bearer_auth(ADMIN)
            .body("bench")
            .send()
            .await
            .expect("invoke after restart");
        assert_eq!(response.status(), 200);
        let compiled = again.node.runtime().n_compiles();
        println!("restart with {} functions: serving after {restart_ms:.0} ms, {compiled} compiled", 2 * n + 1);
        assert_eq!(compiled, 0, "a restart compiles nothing");
        stop(again).await;

        // The image budget: a tenth of the distinct functions kept loaded.
        // Calls to as many functions as fit are served from memory; calls
        // round the whole set reload an image each from the compiled cache.
        let budget = (n / 10).max(1);
        let limited = serve_with(dir.path(), budget).await;
        assert!(limited.node.n_loaded_images() <= budget);
        let base = limited.base.clone();
        for i in 0..budget {
            invoke(&http, &base, &format!("distinct/f{i}")).await;
        }
        let rss_before = rss_bytes();
        let rounds = 5;
        let started = Instant::now();
        for _ in 0..rounds {
            for i in 0..budget {
                invoke(&http, &base, &format!("distinct/f{i}")).await;
            }
        }
        let loaded_us = started.elapsed().as_secs_f64() * 1e6 / (rounds * budget) as f64;
        let started = Instant::now();
        for _ in 0..2 {
            for i in 0..n {
                invoke(&http, &base, &format!("distinct/f{i}")).await;
            }
        }
        let reloading_us = started.elapsed().as_secs_f64() * 1e6 / (2 * n) as f64;
        let rss_after = rss_bytes();
        let loaded = limited.node.n_loaded_images();
        let compiled = limited.node.runtime().n_compiles();
        println!(
            "budget of {budget} images, {n} functions called round robin twice: {reloading_us:.0} us per call \
             (reloading each) vs {loaded_us:.0} us per call of a loaded one; RSS {} -> {} MiB; \
             {loaded} loaded after, {compiled} compiled",
            rss_before >> 20,
            rss_after >> 20
        );
        assert!(loaded <= budget, "{loaded} images loaded past a budget of {budget}");
        assert_eq!(compiled, 0, "reloading compiles nothing");
        let _ = limited.stop.send(());
        limited.task.await.expect("serve task");
    });
}
