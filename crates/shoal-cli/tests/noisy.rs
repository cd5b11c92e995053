//! The noisy-neighbour suite: one hostile tenant per test on a real
//! `shoal serve` (a child process, real sockets), and a victim tenant
//! calling a cheap function 25 times a second throughout. The victim must
//! get every answer, with a p99 latency within a bound taken from its own
//! latency alone on the same node, in the same test; the node's memory must
//! stay within its budget.
//!
//! The tests run one at a time (they measure latency on a shared machine).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Served, serve_with};
use reqwest::StatusCode;

/// One test at a time: each measures latency beside its attacker only.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The victim's calls per second.
const VICTIM_RATE: u32 = 25;

/// The most the victim's p99 beside an attacker may be: its p99 alone
/// plus this. Measured on the 2-core CI machine (debug build of the node),
/// beside every attacker here the p99 stayed within a few milliseconds of
/// its value alone; the bound leaves room for a busy machine.
const P99_MARGIN: Duration = Duration::from_millis(100);

struct Node {
    served: Served,
    http: reqwest::Client,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["--no-examples"];
        args.extend_from_slice(extra);
        let served = serve_with(dir.path(), &args);
        let admin = std::fs::read_to_string(dir.path().join(".shoal/admin.token")).unwrap().trim().to_string();
        Self { served, http: client(), admin, _dir: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.served.url)
    }

    async fn tenant(&self, name: &str) -> String {
        let created = self
            .http
            .post(self.url("/v1/tenants"))
            .bearer_auth(&self.admin)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), StatusCode::CREATED);
        created.json::<serde_json::Value>().await.unwrap()["token"].as_str().unwrap().to_string()
    }

    async fn deploy_ok(&self, token: &str, function: &str, query: &str, body: &[u8]) {
        let (status, answer) = self.deploy(token, function, query, body).await;
        assert_eq!(status, StatusCode::CREATED, "deploying {function}: {answer}");
    }

    async fn deploy(&self, token: &str, function: &str, query: &str, body: &[u8]) -> (StatusCode, String) {
        let response = self
            .http
            .put(self.url(&format!("/v1/functions/{function}?{query}")))
            .bearer_auth(token)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }

    /// The node's resident memory.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.served.child.id())).unwrap();
        let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// The node's largest resident memory seen, sampled every 50 ms for
    /// `time`.
    async fn peak_rss(&self, time: Duration) -> u64 {
        let start = Instant::now();
        let mut peak = 0;
        while start.elapsed() < time {
            peak = peak.max(self.rss());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    }

    async fn metric(&self, name: &str) -> u64 {
        let text =
            self.http.get(self.url("/metrics")).bearer_auth(&self.admin).send().await.unwrap().text().await.unwrap();
        let line = text.lines().find(|line| line.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap()
}

/// A call over HTTP: status, body, time to the whole answer.
async fn invoke(http: &reqwest::Client, url: &str, token: &str, input: &[u8]) -> (StatusCode, Vec<u8>, Duration) {
    let started = Instant::now();
    match http.post(url).bearer_auth(token).body(input.to_vec()).send().await {
        Ok(response) => {
            let status = response.status();
            let body = response.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            (status, body, started.elapsed())
        }
        Err(e) => (StatusCode::IM_A_TEAPOT, e.to_string().into_bytes(), started.elapsed()),
    }
}

/// The victim: a tenant calling its cheap function.
struct Victim {
    token: String,
    url: String,
    input: Vec<u8>,
    expect: Vec<u8>,
}

#[derive(Debug)]
struct Seen {
    calls: usize,
    failures: Vec<String>,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} calls, {} failed, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.calls,
            self.failures.len(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3
        )
    }
}

impl Victim {
    /// Tenant `victim` with `hello` deployed and called once.
    async fn on(node: &Node) -> Self {
        let token = node.tenant("victim").await;
        node.deploy_ok(&token, "victim/hello", "", shoal_guests::HELLO).await;
        let victim = Self {
            token,
            url: node.url("/v1/functions/victim/hello/invoke"),
            input: b"you".to_vec(),
            expect: b"hello you".to_vec(),
        };
        // Measured once: from then on the scheduler knows it is cheap.
        for _ in 0..20 {
            let (status, _, _) = invoke(&node.http, &victim.url, &victim.token, &victim.input).await;
            assert_eq!(status, StatusCode::OK);
        }
        victim
    }

    /// Call at `VICTIM_RATE` per second for `time`, each call on its own
    /// task (a slow answer does not slow the rate).
    async fn calls_for(&self, time: Duration) -> Seen {
        let http = client();
        let mut every = tokio::time::interval(Duration::from_secs(1) / VICTIM_RATE);
        let mut calls = Vec::new();
        let start = Instant::now();
        while start.elapsed() < time {
            every.tick().await;
            let (http, url, token, input) = (http.clone(), self.url.clone(), self.token.clone(), self.input.clone());
            calls.push(tokio::spawn(async move { invoke(&http, &url, &token, &input).await }));
        }
        let mut latencies = Vec::new();
        let mut failures = Vec::new();
        for call in calls {
            let (status, body, took) = call.await.unwrap();
            if status != StatusCode::OK || body != self.expect {
                failures.push(format!("{status}: {}", String::from_utf8_lossy(&body)));
            }
            latencies.push(took);
        }
        latencies.sort();
        let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        Seen { calls: latencies.len(), failures, p50: at(0.5), p99: at(0.99), max: *latencies.last().unwrap() }
    }
}

/// An attacker: tasks repeating their calls until stopped.
struct Attack {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sent: Arc<AtomicU64>,
}

impl Attack {
    fn new() -> Self {
        Self { stop: Arc::default(), tasks: Vec::new(), sent: Arc::default() }
    }

    /// `n` tasks, each calling `url` with `input` again and again.
    fn repeat(&mut self, n: usize, url: String, token: &str, input: &[u8]) {
        let input = input.to_vec();
        self.repeat_with(n, url, token, move |_| input.clone());
    }

    /// `n` tasks, each calling `url` again and again, the attacker's `i`th
    /// call with `input(i)`.
    fn repeat_with(
        &mut self,
        n: usize,
        url: String,
        token: &str,
        input: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
    ) {
        let http = client();
        let input = Arc::new(input);
        for _ in 0..n {
            let (stop, sent, http, url, token, input) =
                (self.stop.clone(), self.sent.clone(), http.clone(), url.clone(), token.to_string(), input.clone());
            self.tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = sent.fetch_add(1, Ordering::Relaxed);
                    let (status, _, _) = invoke(&http, &url, &token, &input(i)).await;
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        // Refused at once: do not spin.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }));
        }
    }

    /// Stop the tasks (their calls in flight are dropped).
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        self.sent.load(Ordering::Relaxed)
    }
}

/// The victim alone, then beside `attack`'s calls (started by `start`,
/// given `warmup` to build up): every call answered, p99 within the bound.
async fn victim_beside(node: &Node, victim: &Victim, warmup: Duration, start: impl FnOnce(&mut Attack)) -> (Seen, u64) {
    let alone = victim.calls_for(Duration::from_secs(3)).await;
    assert!(alone.failures.is_empty(), "alone: {alone:?}");
    let mut attack = Attack::new();
    start(&mut attack);
    tokio::time::sleep(warmup).await;
    let running = node.metric("shoal_calls_running").await;
    let (beside, rss) = tokio::join!(victim.calls_for(Duration::from_secs(6)), node.peak_rss(Duration::from_secs(6)));
    let sent = attack.stop().await;
    eprintln!(
        "victim alone: {alone}\nbeside (attacker started {sent} calls, {running} sandboxes busy when the victim began, node RSS up to {} MiB): {beside}",
        rss >> 20
    );
    assert!(beside.calls >= (VICTIM_RATE * 5) as usize, "the victim's calls were not all made: {beside:?}");
    assert!(sent > 0, "the attacker sent nothing");
    assert!(
        beside.failures.is_empty(),
        "the victim lost {} calls, the first: {:?}",
        beside.failures.len(),
        &beside.failures[..beside.failures.len().min(3)]
    );
    assert!(beside.p99 <= alone.p99 + P99_MARGIN, "victim p99 {:?} beside, {:?} alone", beside.p99, alone.p99);
    (beside, rss)
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A node started with `extra`, the victim on it, and the hostile
/// tenant's token.
async fn arena(extra: &[&str]) -> (Node, Victim, String) {
    let node = Node::start(extra);
    let victim = Victim::on(&node).await;
    let token = node.tenant("hostile").await;
    (node, victim, token)
}

/// Run one test: alone on the machine's node, on a runtime of its own.
fn one_at_a_time(test: impl std::future::Future<Output = ()>) {
    let _one = lock();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(test);
}

#[test]
fn loops_in_many_never_called_functions_with_long_timeouts() {
    one_at_a_time(loops());
}

async fn loops() {
    let (node, victim, token) = arena(&[]).await;
    let mut urls = Vec::new();
    for i in 0..16 {
        node.deploy_ok(&token, &format!("hostile/spin{i}"), "timeout_ms=20000", shoal_guests::MISBEHAVE).await;
        urls.push(node.url(&format!("/v1/functions/hostile/spin{i}/invoke")));
    }
    victim_beside(&node, &victim, Duration::from_millis(500), |attack| {
        for url in urls {
            attack.repeat(2, url, &token, b"loop");
        }
    })
    .await;
}

#[test]
fn a_flood_of_cheap_calls_far_past_capacity() {
    one_at_a_time(flood());
}

async fn flood() {
    let (node, victim, token) = arena(&[]).await;
    node.deploy_ok(&token, "hostile/hello", "", shoal_guests::HELLO).await;
    let url = node.url("/v1/functions/hostile/hello/invoke");
    victim_beside(&node, &victim, Duration::from_millis(500), |attack| attack.repeat(64, url, &token, b"x")).await;
}

#[test]
fn spawn_floods_and_deep_chains() {
    one_at_a_time(spawns());
}

async fn spawns() {
    let (node, victim, token) = arena(&[]).await;
    for (name, wasm) in [("chain", shoal_guests::CHAIN), ("spin", shoal_guests::MISBEHAVE)] {
        node.deploy_ok(&token, &format!("hostile/{name}"), "timeout_ms=10000", wasm).await;
    }
    let url = node.url("/v1/functions/hostile/chain/invoke");
    victim_beside(&node, &victim, Duration::from_secs(1), |attack| {
        // Roots spawning 1,000 looping children each, and chains as deep
        // as the node allows.
        attack.repeat(3, url.clone(), &token, b"spawn-all 1000 spin loop");
        attack.repeat(2, url, &token, b"deep 0");
    })
    .await;
}

const MIB: u64 = 1 << 20;

#[test]
fn local_tier_floods_stop_at_the_tenants_share() {
    one_at_a_time(local_tier_floods());
}

async fn local_tier_floods() {
    // 512 MiB for the node's local tier: 128 MiB per tenant.
    let node = Node::start(&["--local-tier-memory", "512MiB"]);
    let victim = Victim::on(&node).await;
    // The victim's own value, written and never pushed.
    node.deploy_ok(&victim.token, "victim/state", "", shoal_guests::STATE_OPS).await;
    let state_url = node.url("/v1/functions/victim/state/invoke");
    let (status, _, _) = invoke(&node.http, &state_url, &victim.token, b"set mine kept").await;
    assert_eq!(status, StatusCode::OK);
    let token = node.tenant("hostile").await;
    node.deploy_ok(&token, "hostile/state", "memory_mb=128", shoal_guests::STATE_OPS).await;
    let url = node.url("/v1/functions/hostile/state/invoke");
    let rss_before = node.rss();
    let (_, peak) = victim_beside(&node, &victim, Duration::from_secs(1), |attack| {
        // Eight 8 MiB values under new keys per call; every third call
        // fails after writing.
        attack.repeat_with(4, url, &token, |i| {
            let mut script: String = (0..8).map(|k| format!("fill k{i}-{k} 1 {}\n", 8 * MIB)).collect();
            if i % 3 == 0 {
                script.push_str("panic x\n");
            }
            script.into_bytes()
        });
    })
    .await;
    let dirty = node.metric("shoal_state_local_dirty_bytes").await;
    let clean = node.metric("shoal_state_local_clean_bytes").await;
    eprintln!(
        "local tier: {} MiB dirty, {} MiB clean; RSS {} MiB before, peak {} MiB",
        dirty >> 20,
        clean >> 20,
        rss_before >> 20,
        peak >> 20
    );
    assert!(dirty + clean <= 512 * MIB, "the node's budget");
    assert!(dirty <= 128 * MIB + MIB, "the hostile tenant's share (and the victim's few bytes)");
    // The node's memory grew by the local tier's share at most, and the
    // hostile calls' own memory (four at a time, 128 MiB each).
    assert!(peak <= rss_before + (128 + 4 * 128 + 128) * MIB, "RSS {} MiB after {} MiB", peak >> 20, rss_before >> 20);
    // Refused, and said why in the hostile function's logs.
    let logs = node
        .http
        .get(node.url("/v1/functions/hostile/state/logs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(logs.contains("the local state tier is full"), "{}", &logs[..logs.len().min(2000)]);
    let (status, kept, _) = invoke(&node.http, &state_url, &victim.token, b"get mine").await;
    assert_eq!((status, kept.as_slice()), (StatusCode::OK, &b"kept"[..]), "the victim's own value is still served");
}

#[test]
fn memory_bombs_in_many_sandboxes_stop_at_the_tenants_memory() {
    one_at_a_time(memory_bombs());
}

async fn memory_bombs() {
    // 2 GiB for the memory of the calls running: 1 GiB per tenant.
    let (node, victim, token) = arena(&["--call-memory", "2GiB"]).await;
    for (name, query, wasm) in
        [("chain", "", shoal_guests::CHAIN), ("bomb", "memory_mb=256&timeout_ms=2000", shoal_guests::MISBEHAVE)]
    {
        node.deploy_ok(&token, &format!("hostile/{name}"), query, wasm).await;
    }
    let (chain, bomb) = (node.url("/v1/functions/hostile/chain/invoke"), node.url("/v1/functions/hostile/bomb/invoke"));
    let rss_before = node.rss();
    let (_, peak) = victim_beside(&node, &victim, Duration::from_secs(1), |attack| {
        attack.repeat(2, chain, &token, b"spawn-all 100 bomb oom");
        attack.repeat(8, bomb, &token, b"oom");
    })
    .await;
    eprintln!("RSS {} MiB before, peak {} MiB", rss_before >> 20, peak >> 20);
    // Four 256 MiB bombs at a time at most (the tenant's 1 GiB), and a
    // little for what runs around them.
    assert!(peak <= rss_before + 1024 * MIB + 256 * MIB, "RSS {} MiB after {} MiB", peak >> 20, rss_before >> 20);
}

#[test]
fn log_floods_cost_their_own_tenant() {
    one_at_a_time(log_floods());
}

async fn log_floods() {
    let (node, victim, token) = arena(&[]).await;
    node.deploy_ok(&token, "hostile/printer", "timeout_ms=30000", shoal_guests::MISBEHAVE).await;
    let url = node.url("/v1/functions/hostile/printer/invoke");
    victim_beside(&node, &victim, Duration::from_secs(1), |attack| attack.repeat(6, url, &token, b"print 1000000"))
        .await;
}

#[test]
fn async_floods_fill_their_own_share_only() {
    one_at_a_time(async_floods());
}

async fn async_floods() {
    let (node, victim, token) = arena(&[]).await;
    node.deploy_ok(&token, "hostile/chain", "", shoal_guests::CHAIN).await;
    let url = node.url("/v1/functions/hostile/chain/invoke?async=true");
    let mut attack = Attack::new();
    attack.repeat(16, url, &token, b"sleep 1000");
    // Until the hostile tenant's share is full.
    let start = Instant::now();
    while node.metric("shoal_async_calls_unfinished").await < 2500 {
        assert!(start.elapsed() < Duration::from_secs(60), "the flood never filled its share");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The victim's asynchronous calls are accepted, and run before the
    // hostile backlog is drained.
    let async_url = format!("{}?async=true", victim.url);
    for _ in 0..5 {
        let (status, body, _) = invoke(&node.http, &async_url, &victim.token, b"later").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&body));
        let id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["call_id"].as_str().unwrap().to_string();
        let asked = Instant::now();
        loop {
            let record: serde_json::Value = node
                .http
                .get(node.url(&format!("/v1/calls/{id}")))
                .bearer_auth(&victim.token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if record["status"] == "succeeded" {
                break;
            }
            assert!(asked.elapsed() < Duration::from_secs(10), "the victim's call waited behind the flood: {record}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let beside = victim.calls_for(Duration::from_secs(3)).await;
    assert!(beside.failures.is_empty(), "{beside}");
    let sent = attack.stop().await;
    eprintln!("hostile async calls sent: {sent}; victim beside: {beside}");
}

#[test]
fn slow_python_and_javascript_deploys_take_their_own_turns() {
    one_at_a_time(slow_deploys());
}

async fn slow_deploys() {
    let (node, victim, token) = arena(&[]).await;
    let deploys = Arc::new(AtomicU64::new(0));
    victim_beside(&node, &victim, Duration::from_secs(2), |attack| {
        // Four deploys at a time whose top-level code runs for seconds,
        // each of new source (nothing is shared or cached).
        for (language, worker) in [("python", 0), ("python", 1), ("javascript", 2), ("javascript", 3)] {
            let (http, token, deploys) = (client(), token.clone(), deploys.clone());
            let (stop, started) = (attack.stop.clone(), attack.sent.clone());
            let base = node.served.url.clone();
            attack.tasks.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let source = match language {
                        "python" => format!(
                            "# {worker}-{i}\nn = 0\nfor k in range(2_000_000):\n    n += k\n\ndef handle(input):\n    return str(n)\n"
                        ),
                        _ => format!(
                            "// {worker}-{i}\nlet n = 0;\nfor (let k = 0; k < 5000000; k++) {{ n += k; }}\nfunction handle(input) {{ return String(n); }}\nmodule.exports = {{ handle }};\n"
                        ),
                    };
                    started.fetch_add(1, Ordering::Relaxed);
                    let url = format!("{base}/v1/functions/hostile/slow{worker}?language={language}");
                    let sent = http.put(url).bearer_auth(&token).body(source).send().await;
                    if sent.is_ok_and(|response| response.status() == StatusCode::CREATED) {
                        deploys.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    })
    .await;
    // The slow loaders made progress: they ran, in their own turns.
    let deployed = deploys.load(Ordering::Relaxed);
    eprintln!("hostile slow deploys done: {deployed}");
    assert!(deployed > 0, "no slow deploy finished");
}

#[test]
fn compile_bombs_leave_another_tenants_deploy_a_place() {
    one_at_a_time(compile_bombs());
}

async fn compile_bombs() {
    let (node, victim, token) = arena(&[]).await;
    let bomb_size = shoal_guests::slow_to_compile(0, 12_000).len();
    eprintln!("a compile bomb is {} KiB", bomb_size >> 10);
    // The victim's small deploys (of new code each time), alone.
    let small = |i: u64| shoal_guests::slow_to_compile(1_000_000 + i, 20);
    let mut alone = Duration::ZERO;
    for i in 0..3 {
        let started = Instant::now();
        node.deploy_ok(&victim.token, &format!("victim/small{i}"), "", &small(i)).await;
        alone = alone.max(started.elapsed());
    }
    let mut attack = Attack::new();
    for worker in 0..3u64 {
        let (http, token, stop, base) = (client(), token.clone(), attack.stop.clone(), node.served.url.clone());
        attack.tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let wasm = shoal_guests::slow_to_compile(worker * 1_000 + i, 12_000);
                let url = format!("{base}/v1/functions/hostile/bomb{worker}");
                let _ = http.put(url).bearer_auth(&token).body(wasm).send().await;
            }
        }));
    }
    // Until the bombs are compiling.
    let start = Instant::now();
    while node.metric("shoal_compiles_total").await < 4 {
        assert!(start.elapsed() < Duration::from_secs(60), "the bombs never compiled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut beside = Duration::ZERO;
    for i in 3..6 {
        let started = Instant::now();
        node.deploy_ok(&victim.token, &format!("victim/small{i}"), "", &small(i)).await;
        beside = beside.max(started.elapsed());
    }
    let calls = victim.calls_for(Duration::from_secs(3)).await;
    attack.stop().await;
    eprintln!("victim's small deploy: {alone:?} alone, {beside:?} beside the bombs; calls beside them: {calls}");
    assert!(calls.failures.is_empty(), "{calls}");
    // Its compile never waits for a bomb's: it only shares the CPU.
    assert!(beside <= alone * 4 + Duration::from_millis(500), "{beside:?} beside, {alone:?} alone");
}
