//! Cluster mode on one machine (not a criterion benchmark: it reports
//! percentiles and one-off times). Three nodes in this process, each on its
//! own loopback address and HTTP listener, over one real `redis-server`.
//!
//! - Forwarding overhead: a no-op call (`echo`, empty input) sent to the
//!   node where it is warm, and the same call sent to a gateway node that
//!   forwards it there; p50/p99 of each, interleaved in blocks.
//! - Throughput: 32 concurrent clients calling 12 no-op functions on one
//!   node directly, and through a gateway node that places them on two
//!   nodes behind it (every call forwarded). The nodes share this machine's
//!   cores, so this shows the cost of forwarding, not a speed-up.
//! - Deploy propagation: from a deploy on one node to the first successful
//!   call of that function through another.
//! - A new node: from starting it to the first call another node forwards
//!   to it.
//!
//! `cargo bench -p shoal-node --bench cluster`; without `--bench` (as
//! `cargo test --all-targets` runs it) every part runs briefly, as a smoke
//! test.
//!
//! What the cluster's own bookkeeping in Redis costs (heartbeats, reading
//! the members, finding lease holders, deploys and removals) as Redis
//! fills with state and call records is measured without nodes, by
//! `cargo bench -p shoal-cluster --bench bookkeeping`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_node::{Node, NodeConfig};
use shoal_testkit::RedisServer;

const ADMIN: &str = "bench-admin-token-0123456789";

struct Running {
    node: Arc<Node>,
    base: String,
    _dir: tempfile::TempDir,
}

async fn start(redis: &RedisServer, host: &str, gateway: bool) -> Running {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = tokio::net::TcpListener::bind((host, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut config = NodeConfig::new(dir.path());
    config.admin_token = Some(ADMIN.into());
    config.redis_url = Some(redis.url().into());
    config.advertise = Some(addr.to_string());
    config.max_concurrent_calls = 200;
    config.gateway = gateway;
    let node = Node::start(config).await.expect("node starts");
    let served = node.clone();
    tokio::spawn(async move { served.serve(listener, std::future::pending()).await.expect("serve") });
    Running { node, base: format!("http://{addr}"), _dir: dir }
}

async fn invoke(http: &reqwest::Client, base: &str, function: &str) -> (reqwest::StatusCode, Option<String>) {
    let response =
        http.post(format!("{base}/v1/functions/{function}/invoke")).bearer_auth(ADMIN).send().await.expect("invoke");
    let node = response.headers().get("x-shoal-node").and_then(|v| v.to_str().ok()).map(str::to_string);
    let status = response.status();
    let _ = response.bytes().await;
    (status, node)
}

async fn deploy(http: &reqwest::Client, base: &str, function: &str) {
    let response = http
        .put(format!("{base}/v1/functions/{function}"))
        .bearer_auth(ADMIN)
        .body(shoal_guests::ECHO)
        .send()
        .await
        .expect("deploy");
    assert!(response.status().is_success(), "deploy {function}: {}", response.status());
}

/// A function name of `tenant` whose first node among `ids` is `owner`.
fn owned_by(prefix: &str, ids: &[&str], owner: &str) -> String {
    use shoal_cluster::placement::score;
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|name| {
            let key = format!("bench/{name}");
            ids.iter().max_by_key(|id| score(&key, id)) == Some(&owner)
        })
        .expect("some name")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn wait_members(http: &reqwest::Client, base: &str, n: usize) {
    let started = Instant::now();
    loop {
        let response = http.get(format!("{base}/metrics")).bearer_auth(ADMIN).send().await.expect("metrics");
        let text = response.text().await.expect("text");
        if text.lines().any(|l| l == format!("shoal_cluster_members {n}")) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never saw {n} members");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Calls per second of `clients` concurrent clients through `base` for
/// `length`, over `functions`.
async fn throughput(base: &str, functions: &[String], clients: usize, length: Duration) -> f64 {
    let deadline = Instant::now() + length;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (base, functions) = (base.to_string(), functions.to_vec());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let function = &functions[(c + n as usize) % functions.len()];
                let (status, _) = invoke(&http, &base, function).await;
                assert!(status.is_success(), "{function}: {status}");
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("client");
    }
    total as f64 / length.as_secs_f64()
}

fn main() {
    // A failed check ends the process at once: nodes serving in the
    // background would otherwise keep the runtime (and the run) alive.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    let full = std::env::args().any(|a| a == "--bench");
    let (calls, rounds, length) =
        if full { (500, 10, Duration::from_secs(5)) } else { (20, 2, Duration::from_millis(300)) };
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    let redis = RedisServer::start();
    tokio.block_on(async {
        let http = reqwest::Client::new();
        // A runs calls; B is a gateway that places every call elsewhere.
        let a = start(&redis, "127.0.0.2", false).await;
        let b = start(&redis, "127.0.0.3", true).await;
        wait_members(&http, &a.base, 2).await;
        let created = http
            .post(format!("{}/v1/tenants", a.base))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({ "name": "bench" }))
            .send()
            .await
            .expect("tenant");
        assert!(created.status().is_success());

        // Forwarding overhead: a function that A owns, warm on A.
        let ids = [a.node.cluster_id().expect("id"), b.node.cluster_id().expect("id")];
        let name = owned_by("noop", &ids, ids[0]);
        let function = format!("bench/{name}");
        deploy(&http, &a.base, &function).await;
        // Through B (once B sees it): forwarded to A, where it is warm.
        loop {
            let (status, node) = invoke(&http, &b.base, &function).await;
            if status.is_success() {
                assert_eq!(node.as_deref(), Some(ids[0]), "placed on its owner");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (mut direct, mut forwarded) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            for (base, into) in [(&a.base, &mut direct), (&b.base, &mut forwarded)] {
                for _ in 0..calls {
                    let started = Instant::now();
                    let (status, node) = invoke(&http, base, &function).await;
                    into.push(started.elapsed());
                    assert!(status.is_success() && node.as_deref() == Some(ids[0]));
                }
            }
        }
        direct.sort_unstable();
        forwarded.sort_unstable();
        let (d50, d99, f50, f99) = (
            percentile(&direct, 0.5),
            percentile(&direct, 0.99),
            percentile(&forwarded, 0.5),
            percentile(&forwarded, 0.99),
        );
        println!("no-op call, {} calls each, interleaved in blocks of {calls}:", direct.len());
        println!("  direct to the warm node:  p50 {d50:>9.1?}  p99 {d99:>9.1?}");
        println!("  forwarded by a gateway:   p50 {f50:>9.1?}  p99 {f99:>9.1?}");
        println!(
            "  added by forwarding:      p50 {:>9.1?}  p99 {:>9.1?}",
            f50.saturating_sub(d50),
            f99.saturating_sub(d99)
        );

        // Deploy propagation: deploy on A, call through B until it answers.
        let mut propagation = Vec::new();
        for i in 0..rounds.min(10) {
            let function = format!("bench/p{i}");
            let started = Instant::now();
            deploy(&http, &a.base, &function).await;
            let deployed = started.elapsed();
            while !invoke(&http, &b.base, &function).await.0.is_success() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            propagation.push(started.elapsed() - deployed);
        }
        propagation.sort_unstable();
        println!(
            "deploy on one node → callable through another: median {:.0?}, max {:.0?} ({} deploys)",
            percentile(&propagation, 0.5),
            propagation.last().expect("some"),
            propagation.len()
        );

        // A new node: from its start to the first call forwarded to it.
        let started = Instant::now();
        let c = start(&redis, "127.0.0.4", false).await;
        let c_id = c.node.cluster_id().expect("id").to_string();
        let workers = [ids[0], c_id.as_str()];
        let function = format!("bench/{}", owned_by("n", &workers, &c_id));
        let deploying = Instant::now();
        deploy(&http, &a.base, &function).await;
        let deploy_time = deploying.elapsed();
        loop {
            let (status, node) = invoke(&http, &b.base, &function).await;
            if status.is_success() && node.as_deref() == Some(c_id.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        println!(
            "a new node serves its first forwarded call {:.0?} after it starts (a deploy of {deploy_time:.0?} included)",
            started.elapsed()
        );

        // Throughput: 32 clients calling 12 functions on A directly (one
        // node does all the work), then through the gateway B, which
        // places them on A and C.
        let functions: Vec<String> = (0..12).map(|i| format!("bench/t{i}")).collect();
        for function in &functions {
            deploy(&http, &a.base, function).await;
        }
        let mut on_c = 0;
        for function in &functions {
            loop {
                let (status, node) = invoke(&http, &b.base, function).await;
                if status.is_success() {
                    on_c += usize::from(node.as_deref() == Some(c_id.as_str()));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let alone = throughput(&a.base, &functions, 32, length).await;
        let behind = throughput(&b.base, &functions, 32, length).await;
        let alone_again = throughput(&a.base, &functions, 32, length).await;
        println!(
            "32 clients, no-op calls of 12 functions: one node alone {alone:.0}/s and {alone_again:.0}/s; \
             through a gateway to two nodes ({on_c} of the 12 placed on the new one) {behind:.0}/s (ratio {:.2})",
            behind / ((alone + alone_again) / 2.0)
        );
    });
}
