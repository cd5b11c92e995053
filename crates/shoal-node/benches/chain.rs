//! `chain`: chained calls through a node in-process, over loopback HTTP.
//!
//! - `chained_call`: a parent (`fanout`) making 1,000 sequential `call`s of
//!   a no-op child (`echo`, empty input): time per chained call, next to
//!   a fresh instance of the same child run directly on the runtime (the
//!   part no chaining can avoid).
//! - `fan_out_100`: 1 → 100 no-op children, spawned and awaited, vs the
//!   same 100 as sequential calls.
//! - `wordcount`: map-reduce over spawned mappers vs one call counting
//!   alone, on 100 MiB of text (8 MiB when run as a test).

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal_node::{Node, NodeConfig};
use shoal_runtime::CallSettings;

const ADMIN: &str = "bench-admin-token-0123456789";

struct Bench {
    tokio: tokio::runtime::Runtime,
    node: Arc<Node>,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn start() -> Self {
        let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = NodeConfig::new(dir.path());
        config.admin_token = Some(ADMIN.into());
        config.max_body_bytes = 128 << 20;
        // Raised too: `wordcount`'s parent and its 25 mappers (the same
        // function, 256 MiB each) hold 6.5 GiB of memory limits at once,
        // more than a tenant's default share (half the node's call memory,
        // itself half the machine's), so some spawns would be refused.
        config.call_memory_bytes = config.call_memory_bytes.max(8 << 30);
        config.tenant_call_memory_bytes = Some(config.call_memory_bytes);
        let (node, base) = tokio.block_on(async {
            let node = Node::start(config).await.expect("node starts");
            node.deploy_defaults("demo", shoal_guests::EXAMPLES).await.expect("examples");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let base = format!("http://{}", listener.local_addr().expect("addr"));
            let served = node.clone();
            tokio::spawn(async move {
                served.serve(listener, std::future::pending()).await.expect("serve");
            });
            (node, base)
        });
        Self { tokio, node, base, http: reqwest::Client::new(), _dir: dir }
    }

    fn put(&self, path: &str, body: &'static [u8]) {
        self.tokio.block_on(async {
            let response =
                self.http.put(format!("{}{path}", self.base)).bearer_auth(ADMIN).body(body).send().await.expect("put");
            assert!(response.status().is_success(), "{path}: {}", response.status());
        });
    }

    fn invoke(&self, function: &str, input: impl Into<reqwest::Body>) -> Vec<u8> {
        self.tokio.block_on(async {
            let response = self
                .http
                .post(format!("{}/v1/functions/{function}/invoke", self.base))
                .bearer_auth(ADMIN)
                .body(input)
                .send()
                .await
                .expect("invoke");
            let status = response.status();
            let body = response.bytes().await.expect("body").to_vec();
            assert!(status.is_success(), "{function}: {status} {}", String::from_utf8_lossy(&body));
            body
        })
    }
}

fn chained_call(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("chained_call");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("parent_calls_noop_child_x1000", |b| {
        b.iter(|| assert_eq!(bench.invoke("demo/fanout", "call 1000 echo"), b"1000/1000 ok"))
    });
    let runtime = bench.node.runtime().clone();
    let image = bench.tokio.block_on(runtime.load(shoal_guests::ECHO)).expect("echo loads");
    let settings = CallSettings {
        tenant: Arc::from("demo"),
        memory_limit: 64 << 20,
        timeout: Duration::from_secs(5),
        env: Arc::from(Vec::new()),
        allowed_hosts: Arc::default(),
        config: Default::default(),
        trace: None,
    };
    group.bench_function("fresh_noop_instance_x1000_direct", |b| {
        b.iter(|| {
            bench.tokio.block_on(async {
                for _ in 0..1000 {
                    runtime.call(&image, &settings, b"").await.result.expect("echo");
                }
            })
        })
    });
    group.finish();
}

fn fan_out(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("fan_out_100");
    group.bench_function("spawn_100_then_await_all", |b| {
        b.iter(|| assert_eq!(bench.invoke("demo/fanout", "spawn 100 echo"), b"100/100 ok"))
    });
    group.bench_function("call_100_one_after_another", |b| {
        b.iter(|| assert_eq!(bench.invoke("demo/fanout", "call 100 echo"), b"100/100 ok"))
    });
    group.finish();
}

/// `bytes` of text: words from a fixed vocabulary of 5,000, in a
/// deterministic pseudo-random order, 12 words a line.
fn text(bytes: usize) -> Vec<u8> {
    let vocabulary: Vec<String> = (0..5000u32)
        .map(|i| {
            let mut word = String::new();
            let mut n = i.wrapping_mul(2_654_435_761);
            for _ in 0..(3 + i % 7) {
                word.push((b'a' + (n % 26) as u8) as char);
                n /= 26;
                n = n.wrapping_add(i);
            }
            word
        })
        .collect();
    let mut out = Vec::with_capacity(bytes + 64);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut on_line = 0;
    while out.len() < bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(vocabulary[(state % 5000) as usize].as_bytes());
        on_line += 1;
        out.push(if on_line % 12 == 0 { b'\n' } else { b' ' });
    }
    out
}

fn wordcount(c: &mut Criterion, bench: &Bench) {
    let full = std::env::args().any(|a| a == "--bench");
    let size = if full { 100 << 20 } else { 8 << 20 };
    // The parent holds the whole text (and, counting alone, its table).
    bench.put("/v1/functions/demo/wordcount?memory_mb=256&timeout_ms=120000", shoal_guests::WORDCOUNT);
    let text = bytes::Bytes::from(text(size));
    let alone = bytes::Bytes::from([b"\x01alone\n".as_slice(), &text].concat());
    assert_eq!(bench.invoke("demo/wordcount", text.clone()), bench.invoke("demo/wordcount", alone.clone()));
    let mut group = c.benchmark_group("wordcount");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(size as u64));
    group.bench_function(format!("map_reduce_{}MiB", size >> 20), |b| {
        b.iter(|| bench.invoke("demo/wordcount", text.clone()))
    });
    group.bench_function(format!("one_call_alone_{}MiB", size >> 20), |b| {
        b.iter(|| bench.invoke("demo/wordcount", alone.clone()))
    });
    // The ceiling on two cores: two calls counting half each, side by side
    // (no splitting, spawning or reducing inside Shoal).
    let half = text.len() / 2;
    let halves = [
        bytes::Bytes::from([b"\x01alone\n".as_slice(), &text[..half]].concat()),
        bytes::Bytes::from([b"\x01alone\n".as_slice(), &text[half..]].concat()),
    ];
    group.bench_function(format!("two_calls_alone_on_halves_in_parallel_{}MiB", size >> 20), |b| {
        b.iter(|| {
            std::thread::scope(|scope| {
                let runs: Vec<_> =
                    halves.iter().map(|h| scope.spawn(|| bench.invoke("demo/wordcount", h.clone()))).collect();
                for run in runs {
                    assert!(!run.join().expect("half").is_empty());
                }
            })
        })
    });
    group.finish();
}

fn all(c: &mut Criterion) {
    let bench = Bench::start();
    chained_call(c, &bench);
    fan_out(c, &bench);
    wordcount(c, &bench);
}

criterion_group!(benches, all);
criterion_main!(benches);
