//! Cluster mode end to end: a real `redis-server` and `shoal serve`
//! processes on their own loopback addresses (127.0.0.2, .3, .4), talking
//! HTTP to each other as they would across machines. The tests run one at
//! a time: three nodes each are enough for two cores.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use shoal_testkit::RedisServer;

const ADMIN: &str = "cluster-admin-token-for-tests-0001";
/// Bound of every wait for the cluster to settle: generous, since the
/// tests must never depend on the machine's speed.
const SETTLE: Duration = Duration::from_secs(60);

/// One cluster test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Run a test's body on its own runtime, no other cluster test running.
fn one_at_a_time(body: impl std::future::Future<Output = ()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(body);
}

struct NodeProcess {
    child: Child,
    url: String,
    id: String,
    _dir: tempfile::TempDir,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    /// `kill -9`.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// `shoal serve` as a node of the cluster in `redis`, listening on `host`.
fn start_node(redis: &RedisServer, host: &str, extra: &[&str]) -> NodeProcess {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        // The Python runtime compiled once for every node of every test.
        .env("SHOAL_RUNTIME_CACHE", concat!(env!("CARGO_TARGET_TMPDIR"), "/runtime-cache"))
        .args(["serve", "--redis", &redis.url(), "--listen", &format!("{host}:0"), "--no-examples"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(extra)
        .env("SHOAL_ADMIN_TOKEN", ADMIN)
        .env("SHOAL_LOG", std::env::var("SHOAL_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shoal serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut found = None;
    for line in lines.by_ref() {
        let line = line.expect("read serve's stderr");
        eprintln!("[{host}] {line}");
        if let Some(rest) = line.strip_prefix("shoal: serving ") {
            let url = rest.split_whitespace().next().unwrap().to_string();
            let id = rest.split("cluster node ").nth(1).expect("a cluster node id").trim_end_matches(')').to_string();
            found = Some((url, id));
            break;
        }
    }
    let (url, id) = found.expect("shoal serve printed its address");
    let tag = host.to_string();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
        }
    });
    NodeProcess { child, url, id, _dir: dir }
}

#[derive(Clone)]
struct Http(reqwest::Client);

/// A response's status, the node that ran it and its body.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    node: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("{}: not JSON: {}", self.status, self.text()))
    }

    fn error_kind(&self) -> Option<String> {
        serde_json::from_slice::<Value>(&self.body).ok()?["error"]["kind"].as_str().map(str::to_string)
    }
}

impl Http {
    fn new() -> Self {
        Self(reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap())
    }

    async fn send(
        &self,
        method: Method,
        url: String,
        token: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> reqwest::Result<Reply> {
        let mut request = self.0.request(method, url).bearer_auth(token).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await?;
        let status = response.status();
        let node = response.headers().get("x-shoal-node").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = response.bytes().await?.to_vec();
        Ok(Reply { status, node, body })
    }

    async fn ok(&self, method: Method, url: String, token: &str, body: Vec<u8>) -> Reply {
        let reply = self.send(method.clone(), url.clone(), token, body, &[]).await.unwrap();
        assert!(reply.status.is_success(), "{method} {url}: {} {}", reply.status, reply.text());
        reply
    }

    async fn create_tenant(&self, node: &NodeProcess, name: &str) -> String {
        let body = serde_json::to_vec(&json!({ "name": name })).unwrap();
        let reply = self.ok(Method::POST, format!("{}/v1/tenants", node.url), ADMIN, body).await;
        reply.json()["token"].as_str().unwrap().to_string()
    }

    async fn deploy(&self, node: &NodeProcess, token: &str, function: &str, wasm: &[u8]) {
        self.ok(Method::PUT, format!("{}/v1/functions/{function}", node.url), token, wasm.to_vec()).await;
    }

    async fn invoke(&self, node: &NodeProcess, token: &str, function: &str, input: &str) -> reqwest::Result<Reply> {
        let url = format!("{}/v1/functions/{function}/invoke", node.url);
        self.send(Method::POST, url, token, input.as_bytes().to_vec(), &[]).await
    }

    /// Invoke until it answers 200 (the function may not have reached
    /// this node's view yet); returns the reply and how long it took.
    async fn invoke_once_visible(&self, node: &NodeProcess, token: &str, function: &str, input: &str) -> Reply {
        let started = Instant::now();
        loop {
            if let Ok(reply) = self.invoke(node, token, function, input).await
                && reply.status == StatusCode::OK
            {
                return reply;
            }
            assert!(started.elapsed() < SETTLE, "{function} never became callable on {}", node.url);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metric(&self, node: &NodeProcess, name: &str) -> Option<u64> {
        let reply = self.send(Method::GET, format!("{}/metrics", node.url), ADMIN, Vec::new(), &[]).await.ok()?;
        let text = reply.text();
        let line = text.lines().find(|l| l.starts_with(&format!("{name} ")))?;
        line.rsplit(' ').next()?.parse().ok()
    }

    /// Wait until `node` sees `n` members; returns how long it took.
    async fn wait_members(&self, node: &NodeProcess, n: u64) -> Duration {
        self.wait_metric(node, "shoal_cluster_members", n).await
    }

    /// Wait until `node` sees `n` members taking calls (their capacity in
    /// their heartbeats: placement puts nothing on a node before).
    async fn wait_ready(&self, node: &NodeProcess, n: u64) -> Duration {
        self.wait_metric(node, "shoal_cluster_members_ready", n).await
    }

    async fn wait_metric(&self, node: &NodeProcess, name: &str, n: u64) -> Duration {
        let started = Instant::now();
        while self.metric(node, name).await != Some(n) {
            assert!(started.elapsed() < SETTLE, "{} never had {name} = {n}", node.url);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }

    async fn state(&self, node: &NodeProcess, token: &str, key: &str) -> String {
        self.ok(Method::GET, format!("{}/v1/state/{key}", node.url), token, Vec::new()).await.text()
    }
}

/// Names `prefix0`, `prefix1`, … whose first node by rendezvous among
/// `ids` is `owner` — placement as the nodes compute it.
fn names_owned_by(prefix: &str, tenant: &str, ids: &[&str], owner: &str, n: usize) -> Vec<String> {
    use shoal_cluster::placement::score;
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|name| {
            let key = format!("{tenant}/{name}");
            ids.iter().max_by_key(|id| score(&key, id)).is_some_and(|best| *best == owner)
        })
        .take(n)
        .collect()
}

#[test]
fn deploys_propagate_and_calls_are_placed_where_their_function_is_warm() {
    one_at_a_time(deploys_propagate_and_calls_are_placed_where_their_function_is_warm_body());
}

async fn deploys_propagate_and_calls_are_placed_where_their_function_is_warm_body() {
    let redis = RedisServer::start();
    // Two nodes that run calls and a gateway in front of them.
    let mut nodes: Vec<NodeProcess> = ["127.0.0.2", "127.0.0.3"].iter().map(|h| start_node(&redis, h, &[])).collect();
    nodes.push(start_node(&redis, "127.0.0.4", &["--gateway"]));
    let http = Http::new();
    for node in &nodes {
        http.wait_members(node, 3).await;
        http.wait_ready(node, 2).await;
    }
    // The admin's view of the nodes (the console's): all three, each
    // with its address and capacity (the gateway runs none), this one marked.
    let view = http.ok(Method::GET, format!("{}/v1/cluster", nodes[0].url), ADMIN, Vec::new()).await.json();
    assert_eq!(view["clustered"], true);
    let members = view["members"].as_array().unwrap();
    let listed: BTreeSet<&str> = members.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(listed, nodes.iter().map(|n| n.id.as_str()).collect::<BTreeSet<_>>(), "{view}");
    for member in members {
        let node = nodes.iter().find(|n| n.id == member["id"]).unwrap();
        assert_eq!(member["this_node"], node.id == nodes[0].id, "{member}");
        assert_eq!(member["capacity"] == 0, node.id == nodes[2].id, "{member}");
        assert!(node.url.contains(member["advertise"].as_str().unwrap()), "{member} vs {}", node.url);
    }
    // A tenant made on one node, its functions deployed there: six that
    // each worker comes first for.
    let token = http.create_tenant(&nodes[0], "acme").await;
    let ids = [nodes[0].id.as_str(), nodes[1].id.as_str(), nodes[2].id.as_str()];
    let mut names = names_owned_by("f", "acme", &ids, ids[0], 6);
    names.extend(names_owned_by("g", "acme", &ids, ids[1], 6));
    for name in &names {
        http.deploy(&nodes[0], &token, &format!("acme/{name}"), shoal_guests::HELLO).await;
    }
    // Every node takes the tenant's token and calls its functions.
    for node in &nodes[1..] {
        let reply = http.invoke_once_visible(node, &token, &format!("acme/{}", names[11]), "there").await;
        assert_eq!(reply.text(), "hello there");
    }

    // A node with room runs what it is sent.
    for name in &names[..4] {
        let reply = http.invoke(&nodes[1], &token, &format!("acme/{name}"), "here").await.unwrap();
        assert_eq!(reply.node.as_deref(), Some(nodes[1].id.as_str()), "{name}");
    }
    // Through the gateway, each function is run by the node it ranks
    // first, call after call (where it is warm).
    let gateway = &nodes[2];
    let mut ran_on: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for name in &names {
        for i in 0..4 {
            let reply = http.invoke(gateway, &token, &format!("acme/{name}"), &format!("{i}")).await.unwrap();
            assert_eq!((reply.status, reply.text()), (StatusCode::OK, format!("hello {i}")));
            ran_on.entry(name).or_default().insert(reply.node.expect("a cluster answer names its node"));
        }
    }
    for (i, name) in names.iter().enumerate() {
        let owner = if i < 6 { ids[0] } else { ids[1] };
        assert_eq!(ran_on[name.as_str()], BTreeSet::from([owner.to_string()]), "{name}: {ran_on:?}");
    }
    assert!(http.metric(gateway, "shoal_calls_forwarded_total").await.unwrap() >= 48);

    // Usage is summed over the nodes in Redis, each call counted once, by
    // the node that ran it — also a call the gateway forwarded.
    http.deploy(&nodes[0], &token, "acme/metered", shoal_guests::HELLO).await;
    for node in &nodes {
        assert_eq!(http.invoke_once_visible(node, &token, "acme/metered", "x").await.status, StatusCode::OK);
    }
    for node in nodes.iter().cycle().take(9) {
        assert_eq!(http.invoke(node, &token, "acme/metered", "y").await.unwrap().status, StatusCode::OK);
    }
    let usage_url = format!("{}/v1/tenants/acme/usage?function=metered&step=3600", nodes[1].url);
    let metered = |http: Http, url: String, token: String| async move {
        let answer = http.ok(Method::GET, url, &token, Vec::new()).await.json();
        answer["buckets"].as_array().unwrap().iter().map(|b| b["calls"].as_u64().unwrap()).sum::<u64>()
    };
    let started = Instant::now();
    loop {
        let calls = metered(http.clone(), usage_url.clone(), token.clone()).await;
        assert!(calls <= 12, "{calls} calls metered for 12 made");
        if calls == 12 {
            break;
        }
        // Each node writes its sums every 10 s.
        assert!(started.elapsed() < SETTLE, "only {calls} of 12 calls metered");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A flush later, still 12: nothing was counted twice.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(metered(http.clone(), usage_url.clone(), token.clone()).await, 12);
    // The tenant's stored state bytes: a gauge every node samples, set in
    // Redis rather than added, so three nodes do not make it three times.
    http.ok(Method::PUT, format!("{}/v1/state/acme/big", nodes[0].url), &token, vec![b'z'; 2000]).await;
    let limits = http.ok(Method::GET, format!("{}/v1/tenants/acme/limits", nodes[0].url), &token, Vec::new()).await;
    let held = limits.json()["in_use"]["state_bytes"].as_u64().unwrap();
    assert!(held >= 2000, "{held}");
    for node in &nodes {
        let url = format!("{}/v1/tenants/acme/usage?step=3600", node.url);
        let answer = http.ok(Method::GET, url, &token, Vec::new()).await.json();
        let stored =
            answer["buckets"].as_array().unwrap().iter().filter_map(|b| b["state_stored_bytes"].as_u64()).max();
        assert_eq!(stored, Some(held), "{answer}");
    }

    // A removal reaches every node too.
    let removed = format!("acme/{}", names[0]);
    http.ok(Method::DELETE, format!("{}/v1/functions/{removed}", nodes[1].url), &token, Vec::new()).await;
    let started = Instant::now();
    while http.invoke(gateway, &token, &removed, "").await.unwrap().status != StatusCode::NOT_FOUND {
        assert!(started.elapsed() < SETTLE, "the removal never reached {}", gateway.url);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_chained_call_runs_on_another_node_when_its_own_is_full() {
    one_at_a_time(a_chained_call_runs_on_another_node_when_its_own_is_full_body());
}

async fn a_chained_call_runs_on_another_node_when_its_own_is_full_body() {
    let redis = RedisServer::start();
    // Both trace every call to one receiver.
    let receiver = std::sync::Arc::new(shoal_testkit::OtlpReceiver::start());
    let otlp = receiver.endpoint();
    // One sandbox: the caller holds it, its callee must go elsewhere.
    let small = start_node(&redis, "127.0.0.2", &["--max-concurrent-calls", "1", "--otlp-endpoint", &otlp]);
    let other = start_node(&redis, "127.0.0.3", &["--otlp-endpoint", &otlp]);
    let http = Http::new();
    http.wait_members(&small, 2).await;
    http.wait_ready(&small, 2).await;
    let token = http.create_tenant(&small, "acme").await;
    http.deploy(&small, &token, "acme/chain", shoal_guests::CHAIN).await;
    http.deploy(&small, &token, "acme/hello", shoal_guests::HELLO).await;
    http.invoke_once_visible(&other, &token, "acme/hello", "warm").await;

    let reply = http.invoke(&small, &token, "acme/chain", "call hello across").await.unwrap();
    assert_eq!((reply.status, reply.text()), (StatusCode::OK, "hello across".to_string()));
    assert_eq!(reply.node.as_deref(), Some(small.id.as_str()), "the caller ran where it was called");
    let reply = http.invoke(&small, &token, "acme/chain", "spawn hello spawned").await.unwrap();
    assert_eq!((reply.status, reply.text()), (StatusCode::OK, "hello spawned".to_string()));
    assert!(http.metric(&small, "shoal_calls_forwarded_total").await.unwrap() >= 2);
    // A callee that fails on the other node fails its caller the same way
    // (its error comes back across), and a missing one is not found.
    http.deploy(&small, &token, "acme/ops", shoal_guests::STATE_OPS).await;
    http.invoke_once_visible(&other, &token, "acme/ops", "get nothing").await;
    let reply = http.invoke(&small, &token, "acme/chain", "call ops panic x").await.unwrap();
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", reply.text());
    assert!(reply.text().contains("trap"), "{}", reply.text());
    let reply = http.invoke(&small, &token, "acme/chain", "call missing x").await.unwrap();
    assert!(reply.text().contains("NotFound"), "{}", reply.text());

    // The map-reduce across the two nodes is one trace: the reducer runs
    // where it is called, its two mappers (no sandbox left there) on the
    // other node, under the forwards that carried its traceparent.
    http.deploy(&small, &token, "acme/wordcount", shoal_guests::WORDCOUNT).await;
    http.invoke_once_visible(&other, &token, "acme/wordcount", "warm").await;
    let (trace, parent) = ("5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8");
    let text = "the quick brown fox jumps over the lazy dog\n".repeat((5 << 20) / 44);
    let url = format!("{}/v1/functions/acme/wordcount/invoke", small.url);
    let traceparent = format!("00-{trace}-{parent}-01");
    let reply = http
        .send(Method::POST, url, &token, text.into_bytes(), &[("traceparent", traceparent.as_str())])
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["fox"], (5 << 20) / 44);
    let spans = {
        let receiver = receiver.clone();
        tokio::task::spawn_blocking(move || receiver.wait_for(trace, Duration::from_secs(20), |s| s.len() >= 16))
            .await
            .unwrap()
    };
    assert_eq!(spans.len(), 16, "{spans:#?}");
    let under = |id: &str| spans.iter().filter(|s| s.parent_id == id).collect::<Vec<_>>();
    let named = |list: &[&shoal_testkit::ReceivedSpan], name: &str| list.iter().filter(|s| s.name == name).count();
    let request = spans.iter().find(|s| s.parent_id == parent).expect("the request's span, under the caller's");
    assert_eq!((request.instance.as_str(), request.kind), (small.id.as_str(), 2));
    let steps = under(&request.span_id);
    assert_eq!((named(&steps, "queue"), named(&steps, "instantiate"), named(&steps, "run")), (1, 1, 1), "{spans:#?}");
    let run = steps.iter().find(|s| s.name == "run").unwrap();
    let mappers = under(&run.span_id);
    assert_eq!(mappers.len(), 2, "{spans:#?}");
    for mapper in mappers {
        assert_eq!((mapper.name.as_str(), mapper.instance.as_str()), ("call acme/wordcount", small.id.as_str()));
        let forwards = under(&mapper.span_id);
        assert_eq!(forwards.len(), 1, "{spans:#?}");
        let forward = forwards[0];
        assert_eq!((forward.name.as_str(), forward.kind), ("forward acme/wordcount", 3));
        assert_eq!(forward.attr("shoal.peer"), Some(other.id.as_str()));
        let remote = under(&forward.span_id);
        assert_eq!(remote.len(), 1, "{spans:#?}");
        let remote = remote[0];
        assert_eq!(
            (remote.name.as_str(), remote.instance.as_str(), remote.kind),
            ("call acme/wordcount", other.id.as_str(), 2)
        );
        assert_eq!(remote.attr("shoal.outcome"), Some("ok"));
        let steps = under(&remote.span_id);
        assert_eq!((named(&steps, "queue"), named(&steps, "instantiate"), named(&steps, "run")), (1, 1, 1));
    }
}

#[test]
fn state_pushed_on_one_node_is_seen_on_another_after_a_pull() {
    one_at_a_time(state_pushed_on_one_node_is_seen_on_another_after_a_pull_body());
}

async fn state_pushed_on_one_node_is_seen_on_another_after_a_pull_body() {
    let redis = RedisServer::start();
    let a = start_node(&redis, "127.0.0.2", &[]);
    let b = start_node(&redis, "127.0.0.3", &[]);
    let http = Http::new();
    http.wait_members(&a, 2).await;
    let token = http.create_tenant(&a, "acme").await;
    http.deploy(&a, &token, "acme/ops", shoal_guests::STATE_OPS).await;
    http.invoke_once_visible(&b, &token, "acme/ops", "get nothing").await;

    // Run the function on a chosen node: as a call placed there by a peer.
    let secret = redis.get("shoal:secret").expect("the cluster secret is in Redis");
    let on = |node: &NodeProcess, input: &str| {
        let url = format!("{}/internal/v1/functions/acme/ops/invoke", node.url);
        let http = http.clone();
        let (input, secret) = (input.to_string(), secret.clone());
        async move {
            let reply = http
                .send(Method::POST, url, "", input.into_bytes(), &[("x-shoal-cluster-secret", secret.as_str())])
                .await
                .unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            reply
        }
    };
    let reply = on(&a, "set k one\npush k").await;
    assert_eq!(reply.node.as_deref(), Some(a.id.as_str()));
    let reply = on(&b, "pull k\nget k").await;
    assert_eq!((reply.node.as_deref(), reply.text().as_str()), (Some(b.id.as_str()), "one"));
    on(&b, "set k two\npush k").await;
    assert_eq!(on(&a, "get k").await.text(), "one", "a's local tier keeps its copy until a pulls");
    assert_eq!(on(&a, "pull k\nget k").await.text(), "two");
    assert_eq!(http.state(&b, &token, "acme/k").await, "two");

    // Without the secret, the route between nodes runs nothing.
    let url = format!("{}/internal/v1/functions/acme/ops/invoke", b.url);
    let wrong = [("x-shoal-cluster-secret", "not-the-secret")];
    let reply = http.send(Method::POST, url.clone(), &token, b"set k three".to_vec(), &wrong).await.unwrap();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = http.send(Method::POST, url, &token, b"set k three".to_vec(), &[]).await.unwrap();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(on(&b, "get k").await.text(), "two");

    // A tenant's limits set through one node hold on every node: a state
    // quota below what it holds, set on a, refuses a write on b.
    let limits = serde_json::to_vec(&serde_json::json!({ "state_quota_bytes": 2 })).unwrap();
    http.ok(Method::PUT, format!("{}/v1/tenants/acme/limits", a.url), ADMIN, limits).await;
    let started = Instant::now();
    loop {
        let url = format!("{}/v1/state/acme/big", b.url);
        let reply = http.send(Method::PUT, url, &token, vec![b'x'; 100], &[]).await.unwrap();
        if reply.status == StatusCode::INSUFFICIENT_STORAGE {
            assert_eq!(reply.error_kind().as_deref(), Some("limit_exceeded"));
            break;
        }
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text());
        assert!(started.elapsed() < SETTLE, "the quota set on a never applied on b");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let url = format!("{}/v1/state/acme/big", b.url);
        http.ok(Method::DELETE, url, &token, Vec::new()).await;
    }
    let shown = http.ok(Method::GET, format!("{}/v1/tenants/acme/limits", b.url), &token, Vec::new()).await.json();
    assert_eq!(shown["set"], serde_json::json!({ "state_quota_bytes": 2 }), "{shown}");
}

#[test]
fn nodes_ride_out_a_redis_restart_without_restarting() {
    one_at_a_time(nodes_ride_out_a_redis_restart_without_restarting_body());
}

async fn nodes_ride_out_a_redis_restart_without_restarting_body() {
    let mut redis = RedisServer::start();
    let a = start_node(&redis, "127.0.0.2", &[]);
    let b = start_node(&redis, "127.0.0.3", &[]);
    let http = Http::new();
    http.wait_members(&a, 2).await;
    let token = http.create_tenant(&a, "acme").await;
    http.deploy(&a, &token, "acme/hello", shoal_guests::HELLO).await;
    http.invoke_once_visible(&b, &token, "acme/hello", "before").await;

    // Redis comes back empty (no persistence): the nodes reconnect and put
    // the registry back from what they know.
    redis.restart();
    // Put back by the nodes: the heartbeats, the function's record and the
    // secret (checked here in Redis itself, not in the nodes' memory).
    let started = Instant::now();
    while redis.command(&["HEXISTS", "shoal:functions", "acme/hello"]) != ":1"
        || redis.command(&["HEXISTS", "shoal:tenants", "acme"]) != ":1"
        || redis.get("shoal:secret").is_none()
        || redis.command(&["HEXISTS", "shoal:member-info", &a.id]) != ":1"
        || redis.command(&["HEXISTS", "shoal:member-info", &b.id]) != ":1"
        || redis.command(&["ZSCORE", "shoal:members", &a.id]) == "$-1"
        || redis.command(&["ZSCORE", "shoal:members", &b.id]) == "$-1"
    {
        assert!(started.elapsed() < SETTLE, "the nodes never put the registry back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for node in [&a, &b] {
        assert_eq!(http.invoke_once_visible(node, &token, "acme/hello", "after").await.text(), "hello after");
    }

    // And the cluster works as before: a new deploy reaches the other node,
    // an asynchronous call is queued, run and recorded.
    http.deploy(&b, &token, "acme/hello2", shoal_guests::HELLO).await;
    assert_eq!(http.invoke_once_visible(&a, &token, "acme/hello2", "new").await.text(), "hello new");
    let url = format!("{}/v1/functions/acme/hello2/invoke?async=true", a.url);
    let accepted = http.ok(Method::POST, url, &token, b"later".to_vec()).await.json();
    let id = accepted["call_id"].as_str().unwrap();
    let started = Instant::now();
    loop {
        let call = http.ok(Method::GET, format!("{}/v1/calls/{id}", b.url), &token, Vec::new()).await.json();
        if call["status"] == "succeeded" {
            assert_eq!(call["output"], "hello later");
            break;
        }
        assert!(started.elapsed() < SETTLE, "the async call never finished: {call}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One line of the kill-9 test's history.
fn record(history: &Mutex<std::fs::File>, started: Instant, line: Value) {
    let mut line = line;
    line["t_ms"] = json!(started.elapsed().as_millis() as u64);
    writeln!(history.lock().unwrap(), "{line}").unwrap();
}

#[test]
fn a_node_killed_mid_load_loses_no_acknowledged_write_and_no_accepted_call() {
    one_at_a_time(a_node_killed_mid_load_loses_no_acknowledged_write_and_no_accepted_call_body());
}

async fn a_node_killed_mid_load_loses_no_acknowledged_write_and_no_accepted_call_body() {
    let redis = RedisServer::start();
    let hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    // Node 1 is a gateway (it places every call, so calls reach the victim
    // through it); the others run calls, at most 8 at a time (8 on two
    // cores or more: 4 per core), all of them the one tenant's (this test
    // is about a node dying, not about tenants sharing it).
    let mut nodes: Vec<NodeProcess> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let extra: &[&str] = if i == 1 {
                &["--gateway"]
            } else {
                &["--max-concurrent-calls", "8", "--tenant-running", "8", "--tenant-sandboxes", "8"]
            };
            start_node(&redis, h, extra)
        })
        .collect();
    let http = Http::new();
    for node in &nodes {
        http.wait_members(node, 3).await;
        http.wait_ready(node, 2).await;
    }
    let token = http.create_tenant(&nodes[0], "acme").await;
    // Functions the victim owns (calls to them through the others are
    // forwarded to it) and functions the survivors own.
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut functions = names_owned_by("v", "acme", &ids, ids[2], 3);
    functions.extend(names_owned_by("s", "acme", &ids, ids[0], 2));
    for name in &functions {
        http.deploy(&nodes[0], &token, &format!("acme/{name}?timeout_ms=30000"), shoal_guests::STATE_OPS).await;
    }
    for node in &nodes {
        for name in &functions {
            http.invoke_once_visible(node, &token, &format!("acme/{name}"), "get nothing").await;
        }
    }

    // Kept after the run (under target/tmp), for a failure's post-mortem.
    let history_path =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cluster-kill-9-history-{}.jsonl", std::process::id()));
    let history = Arc::new(Mutex::new(std::fs::File::create(&history_path).unwrap()));
    let started = Instant::now();
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Make sure the kill catches calls in flight: calls that wait for a
    // lock the test holds (as if some call held it) until after the kill.
    assert_eq!(redis.command(&["SET", "shoal:l:acme/gate", "test", "PX", "120000"]), "+OK");
    // Sync calls forwarded by the gateway to the victim (whose functions
    // they are) and running there…
    let mut long_sync = Vec::new();
    for (k, function) in functions.iter().take(3).cloned().enumerate() {
        let (http, token, url) = (http.clone(), token.clone(), urls[1].clone());
        long_sync.push(tokio::spawn(async move {
            let input = format!("lock gate\nunlock gate\nappend log long-sync-{k};");
            let url = format!("{url}/v1/functions/acme/{function}/invoke");
            http.send(Method::POST, url, &token, input.into_bytes(), &[]).await.unwrap()
        }));
    }
    let waiting = Instant::now();
    while http.metric(&nodes[2], "shoal_calls_running").await.unwrap_or(0) < 3 {
        assert!(waiting.elapsed() < SETTLE, "the long calls never ran on the victim");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // …and async calls it has taken: 12 waiting ones, of which node 0 can
    // hold 8 at most (the gateway takes none), so the victim holds at
    // least 4 once the queue is empty (4 places are left for the load's).
    for k in 0..12 {
        let url = format!("{}/v1/functions/acme/{}/invoke?async=true", urls[0], functions[3 + k % 2]);
        let input = format!("lock gate\nunlock gate\nappend alog long-async-{k};");
        let reply = http.send(Method::POST, url, &token, input.into_bytes(), &[]).await.unwrap();
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
        let line = json!({ "op": "async", "entry": 0, "token": format!("long-async-{k}"), "status": 202,
            "call_id": reply.json()["call_id"].clone() });
        record(&history, started, line);
    }
    let mut load = Vec::new();
    for worker in 0..4usize {
        let (http, token, urls, functions) = (http.clone(), token.clone(), urls.clone(), functions.clone());
        let (history, stop) = (history.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let entry = (worker + i) % urls.len();
                let function = &functions[i % functions.len()];
                let url = format!("{}/v1/functions/acme/{function}/invoke", urls[entry]);
                let is_async = i.is_multiple_of(3);
                let token_text = format!("w{worker}-{i}");
                let (key, url) = if is_async { ("alog", format!("{url}?async=true")) } else { ("log", url) };
                // Some calls sleep first, so that some are mid-call when
                // the node dies.
                let input =
                    format!("sleep x {}\nappend {key} {token_text};", if i.is_multiple_of(2) { 150 } else { 0 });
                let sent = http.send(Method::POST, url, &token, input.into_bytes(), &[]).await;
                let line = match sent {
                    Ok(reply) => json!({
                        "op": if is_async { "async" } else { "sync" },
                        "entry": entry,
                        "token": token_text,
                        "status": reply.status.as_u16(),
                        "kind": reply.error_kind(),
                        "node": reply.node,
                        "call_id": if is_async && reply.status == StatusCode::ACCEPTED {
                            reply.json()["call_id"].clone()
                        } else {
                            Value::Null
                        },
                    }),
                    Err(e) => json!({
                        "op": if is_async { "async" } else { "sync" },
                        "entry": entry, "token": token_text, "status": null, "error": e.to_string(),
                    }),
                };
                record(&history, started, line);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let waiting = Instant::now();
    while redis.command(&["LLEN", "shoal:calls:queue"]) != ":0" {
        // Well inside the waiting calls' 30 s timeout.
        assert!(waiting.elapsed() < Duration::from_secs(20), "the queue never emptied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nodes[2].kill();
    record(&history, started, json!({ "op": "kill", "node": ids[2] }));
    let gone_after = http.wait_members(&nodes[0], 2).await;
    record(&history, started, json!({ "op": "members", "n": 2, "after_kill_ms": gone_after.as_millis() as u64 }));
    // Let the waiting calls through.
    redis.command(&["DEL", "shoal:l:acme/gate"]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    for (k, task) in long_sync.into_iter().enumerate() {
        let reply = task.await.unwrap();
        let line = json!({ "op": "sync", "entry": 1, "token": format!("long-sync-{k}"),
            "status": reply.status.as_u16(), "kind": reply.error_kind(), "node": reply.node });
        // Lost with the node: the caller is told so, not left hanging.
        assert_eq!(
            (reply.status, reply.error_kind().as_deref()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")),
            "{line}"
        );
        record(&history, started, line);
    }
    assert!(http.metric(&nodes[1], "shoal_forward_failures_total").await.unwrap() >= 3);

    // Every accepted async call finishes (some on a node other than the
    // one that took it first).
    let lines: Vec<Value> =
        std::fs::read_to_string(&history_path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let accepted: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l["op"] == "async" && l["status"] == 202)
        .map(|l| (l["call_id"].as_str().unwrap(), l["token"].as_str().unwrap()))
        .collect();
    assert!(!accepted.is_empty(), "no async call was accepted");
    let mut attempts = HashMap::new();
    for (id, _) in &accepted {
        let started_waiting = Instant::now();
        loop {
            let reply = http.ok(Method::GET, format!("{}/v1/calls/{id}", nodes[0].url), &token, Vec::new()).await;
            let call = reply.json();
            match call["status"].as_str() {
                Some("succeeded") => {
                    attempts.insert(*id, call["attempts"].as_u64().unwrap());
                    break;
                }
                Some("failed") => panic!("async call {id} failed: {call}"),
                _ => {}
            }
            assert!(started_waiting.elapsed() < SETTLE, "async call {id} never finished: {call}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Checked against the history: every acknowledged write is there.
    let log = http.state(&nodes[0], &token, "acme/log").await;
    let alog = http.state(&nodes[0], &token, "acme/alog").await;
    let written: BTreeSet<&str> = log.split(';').chain(alog.split(';')).filter(|t| !t.is_empty()).collect();
    let mut n_sync_ok = 0;
    for line in &lines {
        let token = line["token"].as_str().unwrap_or_default();
        match (line["op"].as_str(), line["status"].as_u64()) {
            (Some("sync"), Some(200)) => {
                n_sync_ok += 1;
                assert!(written.contains(token), "acknowledged write {token} is missing: {line}");
            }
            (Some("async"), Some(202)) => {
                assert!(written.contains(token), "finished async call's write {token} is missing: {line}")
            }
            // A survivor answers a call it could not finish with a clear
            // error, never a crash of its own.
            (Some("sync" | "async"), Some(status)) => {
                let kind = line["kind"].as_str().unwrap_or_default();
                assert!(
                    (status == 503 && kind == "unavailable") || (status == 429 && kind == "overloaded"),
                    "unexpected answer: {line}"
                );
            }
            // No answer at all: only from the killed node itself.
            (Some("sync" | "async"), None) => assert_eq!(line["entry"], 2, "a survivor did not answer: {line}"),
            _ => {}
        }
    }
    assert!(n_sync_ok > 0, "no sync call succeeded");
    assert!(attempts.values().any(|a| *a > 1), "no async call of the victim's was run again: {attempts:?}");
    eprintln!(
        "history ({}): {} lines, {n_sync_ok} sync calls acknowledged, {} async calls accepted ({} run more than once); \
         the killed node left the view after {gone_after:?}",
        history_path.display(),
        lines.len(),
        accepted.len(),
        attempts.values().filter(|a| **a > 1).count()
    );

    // The node comes back (a new process, a new id) and serves again.
    nodes[2] = start_node(&redis, hosts[2], &["--max-concurrent-calls", "8"]);
    http.wait_members(&nodes[0], 3).await;
    let reply =
        http.invoke_once_visible(&nodes[2], &token, &format!("acme/{}", functions[0]), "pull log\nget log").await;
    assert_eq!(reply.text(), log, "the rejoined node reads the same log");
}

#[test]
fn a_per_second_trigger_runs_each_tick_exactly_once_over_three_nodes_one_killed() {
    one_at_a_time(a_per_second_trigger_runs_each_tick_exactly_once_over_three_nodes_one_killed_body());
}

/// The ticks of trigger `acme/beat` that became calls, oldest first: (tick
/// ms, call id, status), from the cluster's call records.
async fn trigger_runs(http: &Http, node: &NodeProcess, token: &str) -> Vec<(u64, String, String)> {
    let listed = http.ok(Method::GET, format!("{}/v1/calls?tenant=acme&limit=1000", node.url), token, Vec::new()).await;
    let mut runs: Vec<(u64, String, String)> = listed.json()["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["trigger"]["name"] == "beat")
        .map(|c| {
            let tick = c["trigger"]["tick_ms"].as_u64().unwrap();
            (tick, c["call_id"].as_str().unwrap().to_string(), c["status"].as_str().unwrap().to_string())
        })
        .collect();
    runs.sort();
    runs
}

/// Wait until `acme/beat` has run at least `n` ticks.
async fn wait_trigger_runs(http: &Http, node: &NodeProcess, token: &str, n: usize) -> Vec<(u64, String, String)> {
    let started = Instant::now();
    loop {
        let runs = trigger_runs(http, node, token).await;
        if runs.len() >= n {
            return runs;
        }
        assert!(started.elapsed() < SETTLE, "only {} of {n} ticks ran", runs.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_per_second_trigger_runs_each_tick_exactly_once_over_three_nodes_one_killed_body() {
    let redis = RedisServer::start();
    let mut nodes: Vec<NodeProcess> =
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().map(|h| start_node(&redis, h, &[])).collect();
    let http = Http::new();
    for node in &nodes {
        http.wait_members(node, 3).await;
        http.wait_ready(node, 3).await;
    }
    let token = http.create_tenant(&nodes[0], "acme").await;
    http.deploy(&nodes[0], &token, "acme/echo", shoal_guests::ECHO).await;
    let spec = json!({ "schedule": "* * * * * *", "function": "echo", "input": "beat" });
    let url = format!("{}/v1/triggers/acme/beat", nodes[0].url);
    let made = http.ok(Method::PUT, url.clone(), &token, serde_json::to_vec(&spec).unwrap()).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());

    // Every node offers every tick; a few seconds of that, then one is killed.
    let before = wait_trigger_runs(&http, &nodes[0], &token, 4).await.len();
    // The trigger and its last run are seen from every node.
    for node in &nodes[1..] {
        let started = Instant::now();
        loop {
            let shown = http.ok(Method::GET, format!("{}/v1/triggers/acme/beat", node.url), &token, Vec::new()).await;
            if shown.json()["last_run"]["tick_ms"].as_u64().is_some() {
                break;
            }
            assert!(started.elapsed() < SETTLE, "{} never showed a last run: {}", node.url, shown.text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    nodes[2].kill();
    let killed_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    wait_trigger_runs(&http, &nodes[0], &token, before + 6).await;
    http.ok(Method::DELETE, url, &token, Vec::new()).await;
    // What was offered as it was removed lands or not; then nothing more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs = trigger_runs(&http, &nodes[0], &token).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(trigger_runs(&http, &nodes[0], &token).await.len(), runs.len(), "a removed trigger ran");

    // The history: each tick exactly once, consecutive seconds, from
    // before the kill to after it.
    let ticks: Vec<u64> = runs.iter().map(|(tick, ..)| *tick).collect();
    for pair in ticks.windows(2) {
        assert_eq!(pair[1] - pair[0], 1000, "ticks {pair:?} of {ticks:?}");
    }
    assert!(ticks[0] < killed_ms && *ticks.last().unwrap() > killed_ms + 3000, "{ticks:?}, killed at {killed_ms}");
    // And every one of them ran: those the killed node held went back to
    // the queue when its heartbeat ran out, and ran on a survivor.
    let started = Instant::now();
    loop {
        let runs = trigger_runs(&http, &nodes[0], &token).await;
        assert_eq!(runs.iter().map(|(tick, ..)| *tick).collect::<Vec<_>>(), ticks, "the history changed");
        let unfinished: Vec<&(u64, String, String)> =
            runs.iter().filter(|(.., status)| status != "succeeded").collect();
        if unfinished.is_empty() {
            break;
        }
        assert!(started.elapsed() < SETTLE, "not finished: {unfinished:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn an_alias_rolled_back_under_load_serves_only_its_versions_and_reaches_every_node() {
    one_at_a_time(an_alias_rolled_back_under_load_serves_only_its_versions_and_reaches_every_node_body());
}

async fn an_alias_rolled_back_under_load_serves_only_its_versions_and_reaches_every_node_body() {
    let redis = RedisServer::start();
    let nodes: Vec<NodeProcess> =
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().map(|h| start_node(&redis, h, &[])).collect();
    let http = Http::new();
    for node in &nodes {
        http.wait_members(node, 3).await;
        http.wait_ready(node, 3).await;
    }
    let token = http.create_tenant(&nodes[0], "acme").await;
    // Three versions, each deployed on another node: numbered by the
    // cluster, 1, 2, 3. For input "x": "hello x", "x", "X".
    for (node, wasm, version) in
        [(&nodes[0], shoal_guests::HELLO, 1), (&nodes[1], shoal_guests::ECHO, 2), (&nodes[2], shoal_guests::UPPER, 3)]
    {
        let started = Instant::now();
        // The tenant (and so its token) may not have reached this node's
        // view yet: 404 or 401 until it does.
        let reply = loop {
            let url = format!("{}/v1/functions/acme/f", node.url);
            let reply = http.send(Method::PUT, url, &token, wasm.to_vec(), &[]).await.unwrap();
            let unseen = [StatusCode::NOT_FOUND, StatusCode::UNAUTHORIZED].contains(&reply.status);
            if !unseen || started.elapsed() > SETTLE {
                break reply;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        assert_eq!(reply.json()["version"], version, "{}", reply.text());
    }
    for node in &nodes {
        http.invoke_once_visible(node, &token, "acme/f@3", "x").await;
    }
    let set_alias = |node: &NodeProcess, body: Value| {
        let url = format!("{}/v1/functions/acme/f/aliases/prod", node.url);
        let (http, token) = (http.clone(), token.clone());
        async move { http.ok(Method::PUT, url, &token, serde_json::to_vec(&body).unwrap()).await }
    };
    set_alias(&nodes[0], json!({ "versions": [{ "version": 2, "weight": 50 }, { "version": 3, "weight": 50 }] })).await;
    // Every node routes the split before the load starts.
    for node in &nodes {
        let started = Instant::now();
        let mut seen = BTreeSet::new();
        while seen.len() < 2 {
            let reply = http.invoke(node, &token, "acme/f@prod", "x").await.unwrap();
            match reply.status {
                // Not on this node yet (its next registry poll).
                StatusCode::NOT_FOUND => tokio::time::sleep(Duration::from_millis(20)).await,
                status => {
                    assert_eq!(status, StatusCode::OK, "{}", reply.text());
                    seen.insert(reply.text());
                }
            }
            assert!(started.elapsed() < SETTLE, "{} never split: {seen:?}", node.url);
        }
        assert_eq!(seen, BTreeSet::from(["X".to_string(), "x".to_string()]));
    }

    // Load on every node; halfway, prod is rolled back to version 2 alone.
    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        for _ in 0..2 {
            let (http, token, url, stop) = (http.clone(), token.clone(), node.url.clone(), stop.clone());
            load.spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let sent = started.elapsed();
                    let reply = http
                        .send(
                            Method::POST,
                            format!("{url}/v1/functions/acme/f@prod/invoke"),
                            &token,
                            b"x".to_vec(),
                            &[],
                        )
                        .await
                        .unwrap();
                    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                    answers.push((i, sent, reply.text()));
                }
                answers
            });
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    set_alias(&nodes[1], json!({ "version": 2 })).await;
    let rolled_back = started.elapsed();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = Vec::new();
    while let Some(done) = load.join_next().await {
        answers.extend(done.unwrap());
    }
    // Only the alias's versions ever answered: never version 1.
    let outputs: BTreeMap<&str, usize> = answers.iter().fold(BTreeMap::new(), |mut n, (_, _, out)| {
        *n.entry(out.as_str()).or_default() += 1;
        n
    });
    assert!(outputs.keys().all(|o| *o == "x" || *o == "X"), "{outputs:?}");
    assert!(answers.len() > 60, "{} calls", answers.len());
    // Each node stopped sending calls to version 3 within the propagation
    // bound (its registry poll, 200 ms; generous here for a loaded machine).
    for (i, node) in nodes.iter().enumerate() {
        let last_old = answers.iter().filter(|(n, _, out)| *n == i && out == "X").map(|(_, sent, _)| *sent).max();
        let lag = last_old.map_or(Duration::ZERO, |t| t.saturating_sub(rolled_back));
        eprintln!("{}: version 3 last answered {lag:?} after the rollback", node.url);
        assert!(lag < Duration::from_secs(2), "{} kept routing to version 3 for {lag:?}", node.url);
        let after = answers.iter().filter(|(n, sent, _)| *n == i && *sent > rolled_back + Duration::from_secs(2));
        assert!(after.clone().count() > 5 && after.clone().all(|(.., out)| out == "x"), "{}", node.url);
    }
}

#[test]
fn queued_messages_over_three_nodes_are_all_handled_across_kill_9_of_a_consumer_and_a_redis_restart() {
    one_at_a_time(
        queued_messages_over_three_nodes_are_all_handled_across_kill_9_of_a_consumer_and_a_redis_restart_body(),
    );
}

/// `acme/work` as `node` shows it.
async fn work_queue(http: &Http, node: &NodeProcess, token: &str) -> Value {
    http.ok(Method::GET, format!("{}/v1/queues/acme/work", node.url), token, Vec::new()).await.json()
}

async fn queued_messages_over_three_nodes_are_all_handled_across_kill_9_of_a_consumer_and_a_redis_restart_body() {
    // Redis writes every change to its append-only file before answering.
    let mut redis = RedisServer::start_durable();
    let mut nodes: Vec<NodeProcess> =
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().map(|h| start_node(&redis, h, &[])).collect();
    let http = Http::new();
    for node in &nodes {
        http.wait_members(node, 3).await;
        http.wait_ready(node, 3).await;
    }
    let token = http.create_tenant(&nodes[0], "acme").await;
    http.deploy(&nodes[0], &token, "acme/consume", shoal_guests::QUEUE_CONSUMER).await;
    for node in &nodes {
        http.invoke_once_visible(node, &token, "acme/consume", r#"{"queue":"work","messages":[]}"#).await;
    }
    // Made on one node, it is answered for by the others at once (from
    // Redis) and every node runs its consumer. The consumer refuses one
    // message in ten at random: with 10 attempts, a message that is not
    // poison dies with a chance of 1 in 10^10.
    let spec = json!({
        "consumer": "consume", "batch_size": 100, "batch_wait_ms": 20, "max_attempts": 10,
        "retry_delay_ms": 20, "concurrency": 2, "visibility_timeout_ms": 6000,
    });
    let made = http
        .ok(Method::PUT, format!("{}/v1/queues/acme/work", nodes[1].url), &token, serde_json::to_vec(&spec).unwrap())
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    assert_eq!(work_queue(&http, &nodes[2], &token).await["consumer"], "consume");

    // 100,000 messages in sends of 1,000 through every node, 20 of them
    // poison; a consuming node is killed after 30 sends, Redis after 60.
    let started = Instant::now();
    let (mut ids, mut poison) = (Vec::new(), Vec::new());
    let mut killed_had_acked = 0;
    for send in 0..100 {
        if send == 30 {
            // The node killed is one consuming: on a quick machine the first
            // 30 sends may all be taken by the other two before it acks any.
            loop {
                killed_had_acked = work_queue(&http, &nodes[2], &token).await["acked"].as_u64().unwrap();
                if killed_had_acked > 0 || started.elapsed() > SETTLE {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            nodes[2].kill();
        }
        if send == 60 {
            redis.restart();
        }
        let messages: Vec<Value> = (0..1000)
            .map(|i| {
                let n = send * 1000 + i;
                json!({ "body": if n % 5000 == 1234 { format!("poison {n}") } else { format!("m{n}") } })
            })
            .collect();
        let body = serde_json::to_vec(&json!({ "messages": messages })).unwrap();
        let via = &nodes[send % if send < 30 { 3 } else { 2 }];
        let url = format!("{}/v1/queues/acme/work/messages", via.url);
        // Until the nodes have reconnected to the restarted Redis a send
        // may be refused (nothing of it written: the script runs whole or
        // not at all); it is sent again.
        let sent = loop {
            let reply = http.send(Method::POST, url.clone(), &token, body.clone(), &[]).await.unwrap();
            if reply.status == StatusCode::ACCEPTED {
                break reply.json();
            }
            assert!(reply.status.is_server_error(), "send {send}: {} {}", reply.status, reply.text());
            assert!(started.elapsed() < SETTLE * 2, "send {send} never went through: {}", reply.text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for (i, id) in sent["ids"].as_array().unwrap().iter().enumerate() {
            let id = id.as_str().unwrap().to_string();
            if (send * 1000 + i) % 5000 == 1234 {
                poison.push(id.clone());
            }
            ids.push(id);
        }
    }
    assert!(killed_had_acked > 0, "the killed node was consuming");
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 100_000, "ids are unique");

    // Drained, as Redis counts it: nothing waits or is leased; the poison is dead.
    let view = loop {
        let view = work_queue(&http, &nodes[0], &token).await;
        if view["messages"] == 0 {
            break view;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "not drained: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("cluster queue: 100,000 drained in {:?}", started.elapsed());
    assert_eq!(view["dead"], 20, "{view}");
    // Both survivors consumed.
    for node in &nodes[..2] {
        let view = work_queue(&http, node, &token).await;
        assert!(view["acked"].as_u64().unwrap() > 1000, "{}: {view}", node.url);
    }
    let dead = http.ok(Method::GET, format!("{}/v1/queues/acme/work/dead", nodes[1].url), &token, Vec::new()).await;
    let letters = dead.json()["dead"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 20);
    for letter in &letters {
        assert!(poison.contains(&letter["id"].as_str().unwrap().to_string()), "{letter}");
        // (One more if a take's answer was lost as Redis was killed.)
        assert!(matches!(letter["attempts"].as_u64(), Some(10 | 11)), "{letter}");
    }

    // Every message handled at least once (the consumer's `seen/…` keys,
    // in Redis), the poison never; handled twice at most what was in
    // flight when the node died (2 batches of 100) and when Redis did (2
    // batches of 100 on each of 2 nodes).
    let listed = http.ok(Method::GET, format!("{}/v1/state/acme", nodes[0].url), &token, Vec::new()).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for key in listed.json()["keys"].as_array().unwrap() {
        let key = key["key"].as_str().unwrap();
        if key.starts_with("seen/") {
            for id in http.state(&nodes[0], &token, &format!("acme/{}", key.replace('/', "%2F"))).await.lines() {
                *counts.entry(id.to_string()).or_default() += 1;
            }
        }
    }
    let missing: Vec<&String> = ids.iter().filter(|id| !poison.contains(id) && !counts.contains_key(*id)).collect();
    assert!(missing.is_empty(), "{} never handled, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    assert!(poison.iter().all(|id| !counts.contains_key(id)));
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!("cluster queue: {duplicates} handled twice");
    assert!(duplicates <= 600, "{duplicates} handled twice");

    // Purged from any node, the dead letters are gone; the queue removed, so is all it kept.
    let purged =
        http.ok(Method::DELETE, format!("{}/v1/queues/acme/work/dead", nodes[1].url), &token, Vec::new()).await;
    assert_eq!(purged.json()["purged"], 20);
    assert_eq!(work_queue(&http, &nodes[0], &token).await["dead"], 0);
    http.ok(Method::DELETE, format!("{}/v1/queues/acme/work", nodes[0].url), &token, Vec::new()).await;
    let gone = http.send(Method::GET, format!("{}/v1/queues/acme/work", nodes[1].url), &token, Vec::new(), &[]).await;
    assert_eq!(gone.unwrap().status, StatusCode::NOT_FOUND);
    assert_eq!(redis.command(&["EXISTS", "shoal:q:acme/work:s", "shoal:q:acme/work:m"]), ":0");

    // A deleted tenant's queues go with it, whatever they held.
    let spec =
        serde_json::to_vec(&json!({ "consumer": "consume", "batch_wait_ms": 60_000, "batch_size": 1000 })).unwrap();
    http.ok(Method::PUT, format!("{}/v1/queues/acme/later", nodes[0].url), &token, spec).await;
    let ten = serde_json::to_vec(&json!({ "messages": vec![json!({ "body": "keep:x" }); 10] })).unwrap();
    http.ok(Method::POST, format!("{}/v1/queues/acme/later/messages", nodes[1].url), &token, ten).await;
    assert_eq!(redis.command(&["HLEN", "shoal:q:acme/later:m"]), ":10");
    http.ok(Method::DELETE, format!("{}/v1/tenants/acme", nodes[1].url), ADMIN, Vec::new()).await;
    let deleting = Instant::now();
    while redis.command(&["EXISTS", "shoal:q:acme/later:m", "shoal:q:acme/later:s"]) != ":0"
        || redis.command(&["HLEN", "shoal:queues"]) != ":0"
        || redis.command(&["HEXISTS", "shoal:queues:held", "acme:n"]) != ":0"
    {
        assert!(deleting.elapsed() < SETTLE, "the deleted tenant's queue is still in Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
