//! The HTTP API over real sockets: a node on 127.0.0.1:0 with the example
//! and test guests deployed, driven by a real HTTP client.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::Value;
use shoal_node::{Node, NodeConfig};
use shoal_testkit::RedisServer;
use tokio::sync::oneshot;

const ADMIN: &str = "test-admin-token-0123456789";

struct TestNode {
    node: Arc<Node>,
    base: String,
    /// Where its HTTP functions are served.
    fn_base: String,
    fn_stop: Option<oneshot::Sender<()>>,
    fn_served: Option<tokio::task::JoinHandle<()>>,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

fn config(dir: &std::path::Path) -> NodeConfig {
    let mut config = NodeConfig::new(dir);
    config.admin_token = Some(ADMIN.into());
    config.max_concurrent_calls = 8;
    config.max_body_bytes = 64 << 10;
    config
}

impl TestNode {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut NodeConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        tweak(&mut config);
        let mut node = Self::start_in(config).await;
        node.node.deploy_defaults("demo", shoal_guests::EXAMPLES).await.unwrap();
        node.node.deploy_defaults("demo", &[("misbehave", shoal_guests::MISBEHAVE)]).await.unwrap();
        node._dir = Some(dir);
        node
    }

    async fn start_in(config: NodeConfig) -> Self {
        // A node of this test may have just left the directory: the last
        // of its work (a sandbox dropped on a call thread) can hold the
        // embedded store a moment after the node is gone.
        let waited = std::time::Instant::now();
        let node = loop {
            match Node::start(config.clone()).await {
                Ok(node) => break node,
                Err(e) if e.to_string().contains("already open") && waited.elapsed().as_secs() < 20 => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("node starts: {e}"),
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let served = {
            let node = node.clone();
            tokio::spawn(async move {
                node.serve(listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            })
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fn_base = format!("http://{}", listener.local_addr().unwrap());
        let (fn_stop, fn_stopped) = oneshot::channel::<()>();
        let fn_served = {
            let node = node.clone();
            tokio::spawn(async move {
                node.serve_functions(listener, async {
                    let _ = fn_stopped.await;
                })
                .await
                .unwrap();
            })
        };
        Self {
            node,
            base,
            fn_base,
            fn_stop: Some(fn_stop),
            fn_served: Some(fn_served),
            http: reqwest::Client::new(),
            stop: Some(stop),
            served: Some(served),
            _dir: None,
        }
    }

    async fn stop(mut self) {
        let _ = self.fn_stop.take().unwrap().send(());
        self.fn_served.take().unwrap().await.unwrap();
        let _ = self.stop.take().unwrap().send(());
        self.served.take().unwrap().await.unwrap();
    }

    fn req(&self, method: reqwest::Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    async fn invoke_as(&self, token: &str, function: &str, input: &[u8]) -> (StatusCode, Vec<u8>) {
        let response = self
            .req(reqwest::Method::POST, &format!("/v1/functions/{function}/invoke"), Some(token))
            .body(input.to_vec())
            .send()
            .await
            .unwrap();
        (response.status(), response.bytes().await.unwrap().to_vec())
    }

    async fn invoke(&self, function: &str, input: &[u8]) -> (StatusCode, Vec<u8>) {
        self.invoke_as(ADMIN, function, input).await
    }

    async fn deploy(&self, function: &str, query: &str, wasm: &[u8]) -> (StatusCode, Value) {
        let response = self
            .req(reqwest::Method::PUT, &format!("/v1/functions/{function}?{query}"), Some(ADMIN))
            .body(wasm.to_vec())
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn get_json(&self, path: &str) -> Value {
        let response = self.req(reqwest::Method::GET, path, Some(ADMIN)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    async fn create_tenant(&self, name: &str) -> String {
        let response = self
            .req(reqwest::Method::POST, "/v1/tenants", Some(ADMIN))
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        body["token"].as_str().unwrap().to_string()
    }
}

/// Status and JSON body of a response.
async fn status_and_json(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("{status}: not JSON: {:?}", String::from_utf8_lossy(&bytes)));
    (status, value)
}

/// The error kind and message of an error body.
fn error_of(body: &[u8]) -> (String, String) {
    let value: Value =
        serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(body)));
    (value["error"]["kind"].as_str().unwrap().to_string(), value["error"]["message"].as_str().unwrap().to_string())
}

fn assert_error(result: (StatusCode, Vec<u8>), status: StatusCode, kind: &str) -> String {
    let (got_status, body) = result;
    let (got_kind, message) = error_of(&body);
    assert_eq!((got_status, got_kind.as_str()), (status, kind), "message: {message}");
    message
}

#[tokio::test]
async fn examples_answer_over_http() {
    let node = TestNode::start().await;
    assert_eq!(node.invoke("demo/hello", b"world").await, (StatusCode::OK, b"hello world".to_vec()));
    assert_eq!(node.invoke("demo/echo", b"\x00\xff").await, (StatusCode::OK, b"\x00\xff".to_vec()));
    assert_eq!(node.invoke("demo/fib", b"20").await, (StatusCode::OK, b"6765".to_vec()));
    assert_eq!(node.invoke("demo/upper", b"abc").await, (StatusCode::OK, b"ABC".to_vec()));
    assert_eq!(node.invoke("demo/counter", b"").await, (StatusCode::OK, b"1".to_vec()));
    assert_eq!(node.invoke("demo/counter", b"41").await, (StatusCode::OK, b"42".to_vec()));
    let response = node.req(reqwest::Method::POST, "/v1/functions/demo/echo/invoke", Some(ADMIN)).send().await.unwrap();
    assert_eq!(response.headers()["x-shoal-call-id"].len(), 16);
    let message =
        assert_error(node.invoke("demo/fib", b"ten").await, StatusCode::INTERNAL_SERVER_ERROR, "function_error");
    assert!(message.contains("not a decimal number"), "{message}");
    node.stop().await;
}

#[tokio::test]
async fn bad_wasm_is_refused_with_a_clear_reason() {
    let node = TestNode::start().await;
    let (status, body) = node.deploy("demo/junk", "", b"\0asm\x01\0\0\0\x05garbage").await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_wasm")));
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    let (status, body) = node.deploy("demo/junk", "", b"hello").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"]["message"].as_str().unwrap().contains("magic"), "{body}");
    let module = wat::parse_str(r#"(module (import "env" "syscall" (func)) (func (export "_start")))"#).unwrap();
    let (status, body) = node.deploy("demo/sneaky", "", &module).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"]["message"].as_str().unwrap().contains("env::syscall"), "{body}");
    assert_error(node.invoke("demo/sneaky", b"").await, StatusCode::NOT_FOUND, "not_found");
    node.stop().await;
}

#[tokio::test]
async fn misbehaving_guests_fail_alone() {
    let node = TestNode::start().await;
    let (status, _) = node.deploy("demo/slow", "timeout_ms=300&memory_mb=16", shoal_guests::MISBEHAVE).await;
    assert_eq!(status, StatusCode::CREATED);
    // While a guest spins until its deadline, others keep being served.
    let spinning = {
        let http = node.http.clone();
        let url = format!("{}/v1/functions/demo/slow/invoke", node.base);
        tokio::spawn(async move {
            let response = http.post(url).bearer_auth(ADMIN).body("loop").send().await.unwrap();
            (response.status(), response.bytes().await.unwrap().to_vec())
        })
    };
    for _ in 0..5 {
        assert_eq!(node.invoke("demo/hello", b"x").await, (StatusCode::OK, b"hello x".to_vec()));
    }
    let message = assert_error(spinning.await.unwrap(), StatusCode::GATEWAY_TIMEOUT, "timeout");
    assert!(message.contains("300 ms"), "{message}");

    let message =
        assert_error(node.invoke("demo/misbehave", b"panic").await, StatusCode::INTERNAL_SERVER_ERROR, "trap");
    assert!(message.contains("guest panicked on purpose"), "{message}");
    let message =
        assert_error(node.invoke("demo/slow", b"oom").await, StatusCode::INTERNAL_SERVER_ERROR, "out_of_memory");
    assert!(message.contains(&(16u64 << 20).to_string()), "{message}");
    assert_error(node.invoke("demo/misbehave", b"recurse").await, StatusCode::INTERNAL_SERVER_ERROR, "trap");
    let message = assert_error(
        node.invoke("demo/misbehave", b"read-passwd").await,
        StatusCode::INTERNAL_SERVER_ERROR,
        "function_error",
    );
    assert!(message.contains("open failed"), "{message}");
    assert_eq!(node.invoke("demo/hello", b"still here").await, (StatusCode::OK, b"hello still here".to_vec()));
    node.stop().await;
}

#[tokio::test]
async fn a_full_node_queues_what_it_can_finish_in_time_and_refuses_the_rest() {
    let node = TestNode::start_with(|c| c.max_concurrent_calls = 1).await;
    for (name, timeout) in [("slow", 800), ("quick", 50)] {
        let (status, _) =
            node.deploy(&format!("demo/{name}"), &format!("timeout_ms={timeout}"), shoal_guests::MISBEHAVE).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let spin = || {
        let http = node.http.clone();
        let url = format!("{}/v1/functions/demo/slow/invoke", node.base);
        tokio::spawn(async move { http.post(url).bearer_auth(ADMIN).body("loop").send().await.unwrap().status() })
    };
    let wait_until_running = async || {
        // Without sleeping blind: until the spinning call holds the place.
        loop {
            let metrics =
                node.req(reqwest::Method::GET, "/metrics", Some(ADMIN)).send().await.unwrap().text().await.unwrap();
            if metrics.contains("shoal_calls_running 1") {
                break;
            }
            tokio::task::yield_now().await;
        }
    };
    let spinning = spin();
    wait_until_running().await;
    // A call that can wait for the place is queued and runs after it.
    let queued = {
        let http = node.http.clone();
        let url = format!("{}/v1/functions/demo/hello/invoke", node.base);
        tokio::spawn(async move { http.post(url).bearer_auth(ADMIN).body("x").send().await.unwrap().status() })
    };
    // One whose deadline comes first is answered 429 by then.
    let response =
        node.req(reqwest::Method::POST, "/v1/functions/demo/quick/invoke", Some(ADMIN)).body("x").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    let (kind, message) = error_of(&response.bytes().await.unwrap());
    assert_eq!(kind, "overloaded", "{message}");
    assert_eq!(spinning.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(queued.await.unwrap(), StatusCode::OK, "the queued call ran");

    // Now the node knows a call of `slow` costs what that loop used: some
    // milliseconds of CPU at the least, however busy the machine. Deployed
    // again with a 2 ms timeout (the mean stays), a call of it cannot
    // finish in time behind the one running and is refused at once.
    let spinning = spin();
    wait_until_running().await;
    let (status, _) = node.deploy("demo/slow", "timeout_ms=2", shoal_guests::MISBEHAVE).await;
    assert_eq!(status, StatusCode::CREATED);
    let response =
        node.req(reqwest::Method::POST, "/v1/functions/demo/slow/invoke", Some(ADMIN)).body("x").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let (_, message) = error_of(&response.bytes().await.unwrap());
    assert!(message.contains("expected wait"), "{message}");
    spinning.await.unwrap();
    assert_eq!(node.invoke("demo/hello", b"x").await.0, StatusCode::OK, "the place comes back");
    node.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused() {
    let node = TestNode::start().await;
    let big = vec![b'a'; (64 << 10) + 1];
    assert_error(node.invoke("demo/echo", &big).await, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    // Without a Content-Length the limit holds while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..100).map(|_| Ok(vec![b'a'; 1024])).collect();
    let response = node
        .req(reqwest::Method::POST, "/v1/functions/demo/echo/invoke", Some(ADMIN))
        .body(reqwest::Body::wrap_stream(futures_stream(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let exact = vec![b'a'; 64 << 10];
    assert_eq!(node.invoke("demo/echo", &exact).await, (StatusCode::OK, exact));
    node.stop().await;
}

fn futures_stream(
    chunks: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    struct Chunks(std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Chunks(chunks.into_iter())
}

#[tokio::test]
async fn tenant_limits_are_set_by_the_admin_applied_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_in(config(dir.path())).await;
    let acme = node.create_tenant("acme").await;
    let beta = node.create_tenant("beta").await;
    for (name, wasm) in [("chain", shoal_guests::CHAIN), ("echo", shoal_guests::ECHO)] {
        assert_eq!(node.deploy(&format!("acme/{name}"), "", wasm).await.0, StatusCode::CREATED);
    }
    let limits = |node: &TestNode, token: &str| {
        let request = node.req(reqwest::Method::GET, "/v1/tenants/acme/limits", Some(token));
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let put = |node: &TestNode, token: &str, body: Value| {
        let request = node.req(reqwest::Method::PUT, "/v1/tenants/acme/limits", Some(token)).json(&body);
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // The node's defaults, shown to the tenant itself; not to another.
    let (status, shown) = limits(&node, &acme).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["set"], serde_json::json!({}));
    let running = node.node.config().scheduler.max_running_per_tenant;
    assert_eq!(shown["effective"]["running"], running);
    assert_eq!(shown["effective"]["sandboxes"], 4, "half of the node's 8");
    assert_eq!(limits(&node, &beta).await.0, StatusCode::FORBIDDEN);
    // Only the admin sets them, and only sensible ones.
    assert_eq!(put(&node, &acme, serde_json::json!({ "sandboxes": 8 })).await.0, StatusCode::FORBIDDEN);
    for bad in
        [serde_json::json!({ "weight": 0 }), serde_json::json!({ "sandboxes": 0 }), serde_json::json!({ "nope": 1 })]
    {
        assert_eq!(put(&node, ADMIN, bad.clone()).await.0, StatusCode::BAD_REQUEST, "{bad}");
    }
    let missing = node.req(reqwest::Method::PUT, "/v1/tenants/nobody/limits", Some(ADMIN)).json(&serde_json::json!({}));
    assert_eq!(missing.send().await.unwrap().status(), StatusCode::NOT_FOUND);
    // One sandbox: the root call holds it, so its child finds none.
    let (status, shown) = put(&node, ADMIN, serde_json::json!({ "sandboxes": 1, "weight": 3 })).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!((shown["effective"]["sandboxes"].as_u64(), shown["set"]["weight"].as_u64()), (Some(1), Some(3)));
    async fn refused(node: &TestNode, token: &str) -> bool {
        let (status, body) = node.invoke_as(token, "acme/chain", b"call echo x").await;
        status == StatusCode::INTERNAL_SERVER_ERROR && String::from_utf8_lossy(&body).contains("Unavailable")
    }
    assert!(refused(&node, &acme).await, "the child was given a second sandbox");
    let logs = node.get_json("/v1/functions/acme/chain/logs").await.to_string();
    assert!(logs.contains("tenant `acme` has 1 sandboxes in use"), "{logs}");
    // What it holds and has used: a module of its own compiled here, a
    // value stored; nothing running.
    let unique = shoal_guests::slow_to_compile(0x5eed_ac0e, 50);
    assert_eq!(node.deploy("acme/unique", "", &unique).await.0, StatusCode::CREATED);
    let stored = node.req(reqwest::Method::PUT, "/v1/state/acme/k", Some(&acme)).body(vec![b'v'; 100]).send().await;
    assert_eq!(stored.unwrap().status(), StatusCode::NO_CONTENT);
    let (_, shown) = limits(&node, &acme).await;
    let in_use = &shown["in_use"];
    assert!(in_use["compiles"].as_u64().unwrap() >= 1, "{shown}");
    assert!(in_use["compile_cpu_ms"].is_u64(), "{shown}");
    assert_eq!((in_use["sandboxes"].as_u64(), in_use["compiling"].as_u64()), (Some(0), Some(0)), "{shown}");
    assert_eq!(in_use["state_bytes"].as_u64(), Some(shoal_state::key_charge("k", 100)), "{shown}");
    // Kept across a restart.
    node.stop().await;
    let node = TestNode::start_in(config(dir.path())).await;
    let (_, shown) = limits(&node, &acme).await;
    assert_eq!(shown["set"], serde_json::json!({ "sandboxes": 1, "weight": 3 }));
    assert!(refused(&node, &acme).await, "the limit holds after the restart");
    // Set back to the defaults: the child runs.
    assert_eq!(put(&node, ADMIN, serde_json::json!({})).await.0, StatusCode::OK);
    assert_eq!(node.invoke_as(&acme, "acme/chain", b"call echo x").await, (StatusCode::OK, b"x".to_vec()));
    node.stop().await;
}

#[tokio::test]
async fn tokens_are_required_and_scoped_to_their_tenant() {
    let node = TestNode::start().await;
    let acme = node.create_tenant("acme").await;
    let other = node.create_tenant("other").await;
    let (status, _) = node.deploy("acme/echo", "", shoal_guests::ECHO).await;
    assert_eq!(status, StatusCode::CREATED);

    assert_eq!(node.invoke_as(&acme, "acme/echo", b"mine").await, (StatusCode::OK, b"mine".to_vec()));
    assert_error(node.invoke_as("wrong", "acme/echo", b"").await, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_error(node.invoke_as("acme.0000", "acme/echo", b"").await, StatusCode::UNAUTHORIZED, "unauthorized");
    let response = node.req(reqwest::Method::POST, "/v1/functions/acme/echo/invoke", None).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Another tenant's token: the 404 of a missing function, whether or
    // not the function exists, on every route about one function.
    for (method, route) in [
        (reqwest::Method::POST, "invoke"),
        (reqwest::Method::GET, ""),
        (reqwest::Method::GET, "logs"),
        (reqwest::Method::DELETE, ""),
    ] {
        let mut answers = Vec::new();
        for function in ["acme/echo", "acme/nothing"] {
            let path = format!("/v1/functions/{function}/{route}");
            let response = node.req(method.clone(), path.trim_end_matches('/'), Some(&other)).send().await.unwrap();
            let (status, body) = status_and_json(response).await;
            assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
            answers.push(body["error"]["message"].as_str().unwrap().replace(function, "F"));
        }
        assert_eq!(answers[0], answers[1], "{method} {route}: the same answer either way");
    }
    assert_eq!(node.invoke("acme/echo", b"still here").await.0, StatusCode::OK, "the DELETE removed nothing");
    // A tenant cannot create tenants.
    let response = node
        .req(reqwest::Method::POST, "/v1/tenants", Some(&acme))
        .json(&serde_json::json!({"name": "evil"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // Creating a tenant twice is a conflict, and the first token stays valid.
    let response = node
        .req(reqwest::Method::POST, "/v1/tenants", Some(ADMIN))
        .json(&serde_json::json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(node.invoke_as(&acme, "acme/echo", b"ok").await.0, StatusCode::OK);
    node.stop().await;
}

#[tokio::test]
async fn unknown_functions_and_bad_names() {
    let node = TestNode::start().await;
    assert_error(node.invoke("demo/nothing", b"").await, StatusCode::NOT_FOUND, "not_found");
    assert_error(node.invoke("nobody/nothing", b"").await, StatusCode::NOT_FOUND, "not_found");
    for bad in ["demo/Hello", "demo/-x", "demo/a.b", "BAD/hello", &format!("demo/{}", "x".repeat(64))] {
        assert_error(node.invoke(bad, b"").await, StatusCode::BAD_REQUEST, "bad_request");
    }
    let (status, body) = node.deploy("demo/Bad_Name", "", shoal_guests::ECHO).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
    let (status, body) = node.deploy("ghost/echo", "", shoal_guests::ECHO).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let response = node.req(reqwest::Method::GET, "/v2/whatever", Some(ADMIN)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn deploy_options_are_checked_and_applied() {
    let node = TestNode::start().await;
    for (query, kind) in [
        ("memory_mb=0", "bad_request"),
        ("memory_mb=100000", "bad_request"),
        ("timeout_ms=abc", "bad_request"),
        ("timeout_ms=0", "bad_request"),
        ("colour=blue", "bad_request"),
        ("env=NOEQUALS", "bad_request"),
        ("env=1BAD=x", "bad_request"),
    ] {
        let (status, body) = node.deploy("demo/opts", query, shoal_guests::MISBEHAVE).await;
        assert_eq!(body["error"]["kind"].as_str(), Some(kind), "{query}: {status} {body}");
    }
    let (status, body) =
        node.deploy("demo/opts", "memory_mb=32&timeout_ms=1500&env=A=1&env=B=x%3Dy", shoal_guests::MISBEHAVE).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["memory_bytes"], 32u64 << 20);
    assert_eq!(body["timeout_ms"], 1500);
    assert_eq!(body["kind"], "component");
    assert_eq!(body["env"], serde_json::json!(["A", "B"]), "values are never shown");
    assert_eq!(node.invoke("demo/opts", b"env").await, (StatusCode::OK, b"A=1\nB=x=y".to_vec()));
    // Env vars in `Shoal-Env` headers (secrets stay out of URLs), checked
    // the same way; a query's var of the same name comes after.
    let deploy = |headers: &[&str], query: &str| {
        let mut request = node
            .req(reqwest::Method::PUT, &format!("/v1/functions/demo/opts?{query}"), Some(ADMIN))
            .body(shoal_guests::MISBEHAVE);
        for header in headers {
            request = request.header("shoal-env", *header);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = deploy(&["TOKEN=s3cr3t=1", "B=from-header"], "env=B=from-query").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(node.invoke("demo/opts", b"env").await, (StatusCode::OK, b"B=from-query\nTOKEN=s3cr3t=1".to_vec()));
    let (status, body) = deploy(&["1BAD=x"], "").await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{body}");
    let many: Vec<String> = (0..65).map(|i| format!("V{i}=x")).collect();
    let (status, body) = deploy(&many.iter().map(String::as_str).collect::<Vec<_>>(), "").await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")), "{body}");
    node.stop().await;
}

#[tokio::test]
async fn a_tenant_deploys_at_most_its_number_of_functions() {
    // Nine: as many as the examples `demo` gets at start.
    let node = TestNode::start_with(|c| c.max_functions_per_tenant = 9).await;
    let acme = node.create_tenant("acme").await;
    for i in 1..=9 {
        assert_eq!(node.deploy(&format!("acme/f{i}"), "", shoal_guests::ECHO).await.0, StatusCode::CREATED);
    }
    let (status, body) = node.deploy("acme/f10", "", shoal_guests::ECHO).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::INSUFFICIENT_STORAGE, Some("limit_exceeded")));
    assert!(body["error"]["message"].as_str().unwrap().contains("9 functions"), "{body}");
    // A redeploy is no new function; another tenant has its own count.
    assert_eq!(node.deploy("acme/f1", "", shoal_guests::HELLO).await.0, StatusCode::CREATED);
    node.create_tenant("beta").await;
    assert_eq!(node.deploy("beta/f1", "", shoal_guests::ECHO).await.0, StatusCode::CREATED);
    // A removal makes room.
    let removed = node.req(reqwest::Method::DELETE, "/v1/functions/acme/f2", Some(&acme)).send().await.unwrap();
    assert!(removed.status().is_success());
    assert_eq!(node.deploy("acme/f10", "", shoal_guests::ECHO).await.0, StatusCode::CREATED);
    assert_eq!(node.invoke_as(&acme, "acme/f10", b"ok").await, (StatusCode::OK, b"ok".to_vec()));
    node.stop().await;
}

#[tokio::test]
async fn list_describe_remove_and_logs() {
    let node = TestNode::start().await;
    let list: Value = node.get_json("/v1/functions/demo").await;
    let names: Vec<&str> = list["functions"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["counter", "echo", "fanout", "fib", "hello", "matvec", "misbehave", "upper", "wordcount"]);
    let described: Value = node.get_json("/v1/functions/demo/upper").await;
    assert_eq!(described["kind"], "command");

    let response = node
        .req(reqwest::Method::POST, "/v1/functions/demo/misbehave/invoke", Some(ADMIN))
        .body("log")
        .send()
        .await
        .unwrap();
    let call_id = response.headers()["x-shoal-call-id"].to_str().unwrap().to_string();
    let logs: Value = node.get_json("/v1/functions/demo/misbehave/logs").await;
    let lines: Vec<(String, String, String)> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["call_id"].as_str().unwrap().into(),
                l["stream"].as_str().unwrap().into(),
                l["line"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        lines,
        [(call_id.clone(), "stdout".into(), "to stdout".into()), (call_id, "stderr".into(), "to stderr".into())]
    );

    let response = node.req(reqwest::Method::DELETE, "/v1/functions/demo/echo", Some(ADMIN)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_error(node.invoke("demo/echo", b"").await, StatusCode::NOT_FOUND, "not_found");
    let response = node.req(reqwest::Method::DELETE, "/v1/functions/demo/echo", Some(ADMIN)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn metrics_and_health() {
    let node = TestNode::start().await;
    node.invoke("demo/hello", b"x").await;
    node.invoke("demo/misbehave", b"panic").await;
    let health = node.req(reqwest::Method::GET, "/healthz", None).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = node.req(reqwest::Method::GET, "/readyz", None).send().await.unwrap();
    assert_eq!((ready.status(), ready.text().await.unwrap()), (StatusCode::OK, "ready\n".to_string()));
    let metrics = node.req(reqwest::Method::GET, "/metrics", Some(ADMIN)).send().await.unwrap().text().await.unwrap();
    for expected in [
        "shoal_calls_total{outcome=\"ok\"} 1",
        "shoal_calls_total{outcome=\"trap\"} 1",
        "shoal_functions 9",
        "shoal_function_calls_total{tenant=\"demo\",function=\"hello\",outcome=\"ok\"} 1",
        "shoal_function_calls_total{tenant=\"demo\",function=\"misbehave\",outcome=\"trap\"} 1",
        "shoal_function_call_duration_seconds_count{tenant=\"demo\",function=\"hello\"} 1",
        "shoal_tenant_calls_total{tenant=\"demo\",outcome=\"ok\"} 1",
    ] {
        assert!(metrics.contains(expected), "missing {expected:?} in\n{metrics}");
    }
    assert!(metrics.contains("shoal_tenant_cpu_seconds_total{tenant=\"demo\"} "), "{metrics}");
    // Prometheus's own parser and linter take it.
    shoal_testkit::promtool_check(&metrics);
    // On the API, only to the admin: not to strangers, nor to a tenant.
    let stranger = node.req(reqwest::Method::GET, "/metrics", None).send().await.unwrap();
    assert_eq!(stranger.status(), StatusCode::UNAUTHORIZED);
    let acme = node.create_tenant("acme").await;
    let tenant = node.req(reqwest::Method::GET, "/metrics", Some(&acme)).send().await.unwrap();
    assert_eq!(tenant.status(), StatusCode::FORBIDDEN);
    // Open on a listener of its own, for a scraper.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = node.node.clone();
    let scraping = tokio::spawn(async move { served.serve_metrics(listener).await });
    let scraped = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
    assert_eq!(scraped.status(), StatusCode::OK);
    assert!(scraped.text().await.unwrap().contains("shoal_functions 9"));
    let other = reqwest::get(format!("http://{addr}/v1/functions/demo")).await.unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND, "the metrics listener serves nothing else");
    scraping.abort();
    node.stop().await;
}

#[tokio::test]
async fn a_panic_in_a_handler_is_answered_500_and_poisons_nothing() {
    let node = TestNode::start().await;
    let acme = node.create_tenant("acme").await;
    // Only the admin reaches the fault; the tenant is refused as anywhere.
    let refused = node.req(reqwest::Method::POST, "/v1/_fault/panic", Some(&acme)).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    for _ in 0..2 {
        let response = node.req(reqwest::Method::POST, "/v1/_fault/panic", Some(ADMIN)).send().await.unwrap();
        let (status, body) = status_and_json(response).await;
        assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::INTERNAL_SERVER_ERROR, Some("internal")));
    }
    // The locks it held serve every later request: a tenant's token is
    // checked, functions are found, deployed and listed, tenants made.
    assert_eq!(node.invoke_as(&acme, "demo/hello", b"x").await.0, StatusCode::NOT_FOUND, "not acme's function");
    assert_eq!(node.deploy("acme/echo", "", shoal_guests::ECHO).await.0, StatusCode::CREATED);
    assert_eq!(node.invoke_as(&acme, "acme/echo", b"still").await, (StatusCode::OK, b"still".to_vec()));
    assert_eq!(node.invoke("demo/hello", b"y").await, (StatusCode::OK, b"hello y".to_vec()));
    node.create_tenant("beta").await;
    assert_eq!(metric(&node, "shoal_panics_total").await, 2);
    node.stop().await;
}

#[tokio::test]
async fn a_background_chore_that_panics_is_started_again() {
    let redis = RedisServer::start();
    let node = TestNode::start_with(|c| c.redis_url = Some(redis.url().into())).await;
    let ready = || node.req(reqwest::Method::GET, "/readyz", None).send();
    assert_eq!(ready().await.unwrap().status(), StatusCode::OK);
    let fault = node.req(reqwest::Method::POST, "/v1/_fault/panic?in=chores", Some(ADMIN)).send().await.unwrap();
    assert_eq!(fault.status(), StatusCode::NO_CONTENT);
    let started = std::time::Instant::now();
    while metric(&node, "shoal_chore_restarts_total").await < 1 {
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "the chores were never restarted");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Started again: they tick (readiness fails once they have not for
    // 3 s), and the node serves.
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let answer = ready().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK, "{}", answer.text().await.unwrap());
    assert_eq!(metric(&node, "shoal_chore_restarts_total").await, 1);
    assert_eq!(node.invoke("demo/hello", b"z").await, (StatusCode::OK, b"hello z".to_vec()));
    // Stopping the node ends and joins its chores (cluster chores, async
    // worker, record sweep).
    let handle = node.node.clone();
    assert!(handle.chores_running() >= 2, "{} chores running", handle.chores_running());
    node.stop().await;
    assert_eq!(handle.chores_running(), 0, "chores outlived the node's stop");
}

#[tokio::test]
async fn an_asynchronous_call_whose_task_panics_is_recorded_failed_and_counted() {
    let node = TestNode::start().await;
    let fault = node.req(reqwest::Method::POST, "/v1/_fault/panic?in=async-call", Some(ADMIN)).send().await.unwrap();
    assert_eq!(fault.status(), StatusCode::NO_CONTENT);
    let submit = || node.req(reqwest::Method::POST, "/v1/functions/demo/hello/invoke?async=true", Some(ADMIN));
    let (status, accepted) = status_and_json(submit().body("p").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let id = accepted["call_id"].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let record = loop {
        let record = node.get_json(&format!("/v1/calls/{id}")).await;
        if record["status"] != "queued" && record["status"] != "running" {
            break record;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "never recorded: {record}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!((record["status"].as_str(), record["error"]["kind"].as_str()), (Some("failed"), Some("internal")));
    assert_eq!(metric(&node, "shoal_panics_total").await, 1);
    // The tenant's count was given back: its next calls run.
    let (status, accepted) = status_and_json(submit().body("q").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let started = std::time::Instant::now();
    while metric(&node, "shoal_async_calls_unfinished").await > 0 {
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "the panicked call is still counted");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_every_function_without_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let acme_token;
    {
        let node = TestNode::start_in(config(dir.path())).await;
        acme_token = node.create_tenant("acme").await;
        let (status, _) = node.deploy("acme/greeter", "env=GREETING=hej&memory_mb=8", shoal_guests::MISBEHAVE).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, _) = node.deploy("acme/up", "", shoal_guests::UPPER).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, _) = node.deploy("acme/counter", "", shoal_guests::COUNTER).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(node.invoke_as(&acme_token, "acme/counter", b"5").await, (StatusCode::OK, b"5".to_vec()));
        node.stop().await;
    }
    let node = TestNode::start_in(config(dir.path())).await;
    // Known at start, none loaded: each loads on its first call.
    assert!(["greeter", "up", "counter"].iter().all(|name| !node.node.is_loaded("acme", name)));
    assert_eq!(node.invoke_as(&acme_token, "acme/greeter", b"env").await, (StatusCode::OK, b"GREETING=hej".to_vec()));
    assert!(node.node.is_loaded("acme", "greeter") && !node.node.is_loaded("acme", "up"));
    assert_eq!(node.invoke_as(&acme_token, "acme/up", b"abc").await, (StatusCode::OK, b"ABC".to_vec()));
    assert_eq!(
        node.invoke_as(&acme_token, "acme/counter", b"").await,
        (StatusCode::OK, b"6".to_vec()),
        "state is durable"
    );
    assert_eq!(node.node.runtime().n_compiles(), 0, "loaded from the compiled-artifact cache");
    node.stop().await;
}

#[tokio::test]
async fn state_over_http_acts_on_the_global_tier() {
    state_over_http(TestNode::start().await).await;
}

#[tokio::test]
async fn state_over_http_on_redis() {
    let redis = RedisServer::start();
    state_over_http(TestNode::start_with(|c| c.redis_url = Some(redis.url().into())).await).await;
}

async fn state_over_http(node: TestNode) {
    let acme = node.create_tenant("acme").await;
    let put = |path: &str, token: &str, body: &[u8]| {
        node.req(reqwest::Method::PUT, path, Some(token)).body(body.to_vec()).send()
    };
    let response = put("/v1/state/acme/config/db", &acme, b"postgres://x").await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = node.req(reqwest::Method::GET, "/v1/state/acme/config/db", Some(&acme)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(&response.bytes().await.unwrap()[..], b"postgres://x");
    let listed = node.get_json("/v1/state/acme").await;
    assert_eq!(listed["keys"], serde_json::json!([{ "key": "config/db", "size": 12 }]));

    // Functions and HTTP share the global tier: the counter's incr shows.
    node.invoke("demo/counter", b"7").await;
    let response = node.req(reqwest::Method::GET, "/v1/state/demo/counter", Some(ADMIN)).send().await.unwrap();
    assert_eq!(&response.bytes().await.unwrap()[..], b"7");

    // Another tenant's token, and path tricks, reach nothing of acme's.
    let other = node.create_tenant("other").await;
    let response = node.req(reqwest::Method::GET, "/v1/state/acme/config/db", Some(&other)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response =
        node.req(reqwest::Method::GET, "/v1/state/other/..%2Facme%2Fconfig%2Fdb", Some(&other)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let long = format!("/v1/state/acme/{}", "k".repeat(513));
    let response = put(&long, &acme, b"x").await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let response = node.req(reqwest::Method::DELETE, "/v1/state/acme/config/db", Some(&acme)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = node.req(reqwest::Method::GET, "/v1/state/acme/config/db", Some(&acme)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = node.req(reqwest::Method::DELETE, "/v1/state/acme/config/db", Some(&acme)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn state_limits_over_http_refuse_whole_writes() {
    for redis in [None, Some(RedisServer::start())] {
        let node = TestNode::start_with(|c| {
            c.redis_url = redis.as_ref().map(|r| r.url().into());
            c.max_state_value_bytes = 1000;
            c.state_quota_bytes = 1500;
        })
        .await;
        let acme = node.create_tenant("acme").await;
        let put = |key: &str, len: usize| {
            node.req(reqwest::Method::PUT, &format!("/v1/state/acme/{key}"), Some(&acme)).body(vec![b'x'; len]).send()
        };
        let (status, body) = status_and_json(put("a", 1001).await.unwrap()).await;
        assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")));
        assert_eq!(put("a", 1000).await.unwrap().status(), StatusCode::NO_CONTENT);
        let (status, body) = status_and_json(put("b", 600).await.unwrap()).await;
        assert_eq!(
            (status, body["error"]["kind"].as_str()),
            (StatusCode::INSUFFICIENT_STORAGE, Some("limit_exceeded")),
            "redis={}: {body}",
            redis.is_some()
        );
        let listed = node.get_json("/v1/state/acme").await;
        assert_eq!(listed["keys"], serde_json::json!([{ "key": "a", "size": 1000 }]), "nothing partial was written");
        // The admin raises this tenant's quota: the write fits.
        let set_quota = |bytes: u64| {
            node.req(reqwest::Method::PUT, "/v1/tenants/acme/limits", Some(ADMIN))
                .json(&serde_json::json!({ "state_quota_bytes": bytes }))
                .send()
        };
        let shown: Value = set_quota(2000).await.unwrap().json().await.unwrap();
        assert_eq!(shown["effective"]["state_quota_bytes"], 2000, "{shown}");
        assert_eq!(put("b", 600).await.unwrap().status(), StatusCode::NO_CONTENT);
        // Lowered below what it holds: what is stored stays, nothing grows.
        assert_eq!(set_quota(500).await.unwrap().status(), StatusCode::OK);
        let (status, body) = status_and_json(put("c", 1).await.unwrap()).await;
        assert_eq!(
            (status, body["error"]["kind"].as_str()),
            (StatusCode::INSUFFICIENT_STORAGE, Some("limit_exceeded"))
        );
        assert!(body["error"]["message"].as_str().unwrap().contains("quota of 500"), "{body}");
        assert_eq!(put("b", 100).await.unwrap().status(), StatusCode::NO_CONTENT, "shrinking is allowed");
        // Another tenant keeps the node's default.
        let beta = node.create_tenant("beta").await;
        let response =
            node.req(reqwest::Method::PUT, "/v1/state/beta/k", Some(&beta)).body(vec![b'y'; 1000]).send().await;
        assert_eq!(response.unwrap().status(), StatusCode::NO_CONTENT);
        node.stop().await;
    }
}

#[tokio::test]
async fn with_redis_down_state_answers_503_and_recovers() {
    let mut redis = RedisServer::start();
    let node = TestNode::start_with(|c| c.redis_url = Some(redis.url().into())).await;
    assert_eq!(node.invoke("demo/counter", b"2").await, (StatusCode::OK, b"2".to_vec()));
    let ready = |node: &TestNode| {
        let request = node.req(reqwest::Method::GET, "/readyz", None);
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    };
    assert_eq!(ready(&node).await.0, StatusCode::OK);
    redis.stop();
    let (status, why) = ready(&node).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{why}");
    assert!(why.contains("Redis"), "{why}");
    let response = node.req(reqwest::Method::GET, "/v1/state/demo/counter", Some(ADMIN)).send().await.unwrap();
    let (status, body) = status_and_json(response).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")));
    // The function sees `unavailable` from its state call and reports it;
    // the instance is not left hanging.
    let (status, body) = node.invoke("demo/counter", b"1").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&body).contains("Unavailable"), "{}", String::from_utf8_lossy(&body));
    redis.restart();
    let start = std::time::Instant::now();
    loop {
        let (status, body) = node.invoke("demo/counter", b"1").await;
        if status == StatusCode::OK {
            assert_eq!(body, b"1", "the restarted Redis is empty");
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "never recovered: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(ready(&node).await.0, StatusCode::OK, "ready again");
    node.stop().await;
}

#[tokio::test]
async fn a_node_refuses_to_start_on_an_unreachable_redis() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.stop();
    let mut config = config(dir.path());
    config.redis_url = Some(url.into());
    let error = Node::start(config).await.unwrap_err();
    assert!(error.to_string().contains("redis"), "{error}");
}

/// A counter from the node's `/metrics`.
async fn metric(node: &TestNode, name: &str) -> u64 {
    let text = node.req(reqwest::Method::GET, "/metrics", Some(ADMIN)).send().await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn matvec_reads_its_matrix_through_the_local_tier() {
    for redis in [None, Some(RedisServer::start())] {
        let node = TestNode::start_with(|c| c.redis_url = redis.as_ref().map(|r| r.url().into())).await;
        let (status, body) = node.invoke("demo/matvec", b"init 512 512").await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let matrix_bytes = 512 * 512 * 4;
        assert_eq!(
            metric(&node, "shoal_state_global_written_bytes_total").await,
            matrix_bytes + b"512 512".len() as u64
        );

        let read_before = metric(&node, "shoal_state_global_read_bytes_total").await;
        let (status, local) = node.invoke("demo/matvec", b"mul 7").await;
        assert_eq!(status, StatusCode::OK);
        for _ in 0..4 {
            assert_eq!(node.invoke("demo/matvec", b"mul 7").await.1, local, "deterministic");
        }
        assert_eq!(
            metric(&node, "shoal_state_global_read_bytes_total").await,
            read_before,
            "redis={}: the matrix stays in the local tier",
            redis.is_some()
        );
        for _ in 0..3 {
            assert_eq!(node.invoke("demo/matvec", b"mul-fresh 7").await.1, local, "same answer when fetched");
        }
        assert_eq!(metric(&node, "shoal_state_global_read_bytes_total").await, read_before + 3 * matrix_bytes);
        assert!(String::from_utf8_lossy(&local).starts_with("rows=512 sum="), "{}", String::from_utf8_lossy(&local));
        node.stop().await;
    }
}

mod chaining {
    //! `invoke.call`/`spawn`/`await` from real guests (`chain`, `fanout`,
    //! `wordcount`) through the node's invoker.

    use super::*;
    use std::time::{Duration, Instant};

    /// A node whose one tenant may hold every sandbox (the tests here are
    /// about chains, not about sharing the node).
    async fn node_with(tweak: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let node = TestNode::start_with(|c| {
            tweak(c);
            c.tenant_sandboxes = Some(c.max_concurrent_calls);
        })
        .await;
        node.node.deploy_defaults("demo", &[("chain", shoal_guests::CHAIN)]).await.unwrap();
        node
    }

    fn text((status, body): (StatusCode, Vec<u8>)) -> (StatusCode, String) {
        (status, String::from_utf8(body).unwrap())
    }

    #[tokio::test]
    async fn chained_calls_return_their_childrens_output() {
        let node = node_with(|_| {}).await;
        assert_eq!(text(node.invoke("demo/chain", b"call hello world").await), (StatusCode::OK, "hello world".into()));
        assert_eq!(text(node.invoke("demo/chain", b"call demo/echo x y").await), (StatusCode::OK, "x y".into()));
        assert_eq!(text(node.invoke("demo/chain", b"spawn fib 20").await), (StatusCode::OK, "6765".into()));
        assert_eq!(
            text(node.invoke("demo/chain", b"spawn-all 5 echo e").await),
            (StatusCode::OK, "5 ok; first error: none".into())
        );
        assert_eq!(text(node.invoke("demo/fanout", b"").await), (StatusCode::OK, "100/100 ok".into()));
        assert_eq!(text(node.invoke("demo/fanout", b"call 20 echo").await), (StatusCode::OK, "20/20 ok".into()));
        // A child's failure reaches its parent as an error it can report.
        let (status, body) = text(node.invoke("demo/chain", b"call fib ten").await);
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("is not a decimal"), "{body}");
        let (_, body) = text(node.invoke("demo/chain", b"call nothing-here x").await);
        assert!(body.contains("NotFound"), "{body}");
        let (_, body) = text(node.invoke("demo/chain", b"await 7").await);
        assert!(body.contains("NotFound"), "an id never spawned: {body}");
        // Every chained call is a call of its own: counted and logged.
        let lines = node.get_json("/v1/functions/demo/echo/logs").await;
        assert!(lines["lines"].is_array());
        node.stop().await;
    }

    #[tokio::test]
    async fn spawned_calls_never_awaited_are_cancelled_with_their_caller() {
        let node = node_with(|_| {}).await;
        let start = Instant::now();
        assert_eq!(
            text(node.invoke("demo/chain", b"forget chain sleep 4000").await),
            (StatusCode::OK, "forgotten".into())
        );
        while node.node.executor_busy() > 0 {
            assert!(start.elapsed() < Duration::from_secs(3), "the forgotten child still runs");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        node.stop().await;
    }

    #[tokio::test]
    async fn another_tenants_functions_answer_denied() {
        let node = node_with(|_| {}).await;
        let acme = node.create_tenant("acme").await;
        let (status, _) = node.deploy("acme/chain", "", shoal_guests::CHAIN).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(node.invoke_as(&acme, "acme/chain", b"call chain sleep 1").await.1, b"slept");
        for target in ["demo/hello", "demo/nothing-here"] {
            let (status, body) = node.invoke_as(&acme, "acme/chain", format!("call {target} x").as_bytes()).await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            // The same answer whether or not the function exists.
            assert_eq!(error_of(&body).1, "Error::Denied", "{target}");
        }
        node.stop().await;
    }

    #[tokio::test]
    async fn call_depth_and_spawns_per_root_are_limited_and_named_in_the_logs() {
        let node = node_with(|c| {
            c.max_call_depth = 5;
            c.max_spawns_per_root = 3;
        })
        .await;
        assert_eq!(text(node.invoke("demo/chain", b"deep 0").await), (StatusCode::OK, "5".into()));
        let logs = node.get_json("/v1/functions/demo/chain/logs").await.to_string();
        assert!(logs.contains("the call depth limit of 5 is reached"), "{logs}");

        // Three children sleep; the fourth and fifth spawns are refused.
        let (status, body) = text(node.invoke("demo/chain", b"spawn-all 5 chain sleep 200").await);
        assert_eq!((status, body.as_str()), (StatusCode::OK, "3 ok; first error: Error::LimitExceeded"));
        let logs = node.get_json("/v1/functions/demo/chain/logs").await.to_string();
        assert!(logs.contains("the limit of 3 outstanding spawns per root call is reached"), "{logs}");
        // Awaited spawns give their places back: the next root starts afresh.
        let (status, body) = text(node.invoke("demo/chain", b"spawn-all 3 echo x").await);
        assert_eq!((status, body.as_str()), (StatusCode::OK, "3 ok; first error: none"));
        node.stop().await;
    }

    #[tokio::test]
    async fn chained_calls_on_a_full_node_answer_unavailable_at_once() {
        // Three sandboxes: the root and two sleeping children fill them.
        let node = node_with(|c| c.max_concurrent_calls = 3).await;
        let (status, body) = text(node.invoke("demo/chain", b"spawn-all 5 chain sleep 200").await);
        assert_eq!((status, body.as_str()), (StatusCode::OK, "2 ok; first error: Error::Unavailable"));
        // Nothing was left behind: all five fit one after another.
        let (status, body) = text(node.invoke("demo/chain", b"spawn-all 2 echo x").await);
        assert_eq!((status, body.as_str()), (StatusCode::OK, "2 ok; first error: none"));
        node.stop().await;
    }

    #[tokio::test]
    async fn a_child_ends_by_its_parents_deadline() {
        let node = node_with(|_| {}).await;
        let (status, _) = node.deploy("demo/parent", "timeout_ms=100", shoal_guests::CHAIN).await;
        assert_eq!(status, StatusCode::CREATED);
        // `demo/chain` may run 5 s; called from a parent with 100 ms, it
        // is stopped with the parent.
        let start = Instant::now();
        let (status, body) = node.invoke("demo/parent", b"call chain sleep 3000").await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{}", String::from_utf8_lossy(&body));
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        let metrics =
            node.req(reqwest::Method::GET, "/metrics", Some(ADMIN)).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("shoal_calls_total{outcome=\"timeout\"} 2"), "parent and child: {metrics}");
        assert_eq!(node.node.executor_busy(), 0, "no call is left running");
        node.stop().await;
    }

    #[tokio::test]
    async fn a_recursion_bomb_ends_in_errors_and_the_node_carries_on() {
        let node = node_with(|c| c.max_concurrent_calls = 1000).await;
        let (status, _) = node.deploy("demo/chain", "timeout_ms=3000", shoal_guests::CHAIN).await;
        assert_eq!(status, StatusCode::CREATED);
        let start = Instant::now();
        let (status, body) = node.invoke("demo/chain", b"bomb").await;
        assert!(status.is_server_error(), "{status} {}", String::from_utf8_lossy(&body));
        assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
        // Everything it started is gone, and other calls run as before.
        let idle = Instant::now();
        while node.node.executor_busy() > 0 {
            assert!(idle.elapsed() < Duration::from_secs(10), "calls still running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(text(node.invoke("demo/hello", b"after").await), (StatusCode::OK, "hello after".into()));
        node.stop().await;
    }

    #[tokio::test]
    async fn wordcount_maps_and_reduces_over_spawned_calls() {
        let node = node_with(|c| c.max_body_bytes = 16 << 20).await;
        // 9 MiB and a bit: three mappers of 4 MiB pieces.
        let line = "The quick brown fox jumps over the lazy dog's back\n";
        let n_lines = (9 << 20) / line.len() as u64 + 10;
        let text: String = line.repeat(n_lines as usize);
        let (status, body) = node.invoke("demo/wordcount", text.as_bytes()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let counts: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(counts["the"], n_lines * 2);
        assert_eq!(counts["dog's"], n_lines);
        assert_eq!(counts.as_object().unwrap().len(), 9);
        let alone = node.invoke("demo/wordcount", &[b"\x01alone\n".as_slice(), text.as_bytes()].concat()).await;
        assert_eq!(alone.1, body, "the same answer as one call alone");
        node.stop().await;
    }
}

mod async_calls {
    //! `POST …/invoke?async=true` and `GET /v1/calls/{id}`.

    use super::*;
    use std::time::{Duration, Instant};

    async fn submit(node: &TestNode, token: &str, function: &str, input: &[u8]) -> (StatusCode, Value) {
        let path = format!("/v1/functions/{function}/invoke?async=true");
        status_and_json(node.req(reqwest::Method::POST, &path, Some(token)).body(input.to_vec()).send().await.unwrap())
            .await
    }

    async fn record(node: &TestNode, token: &str, id: &str) -> (StatusCode, Value) {
        status_and_json(node.req(reqwest::Method::GET, &format!("/v1/calls/{id}"), Some(token)).send().await.unwrap())
            .await
    }

    async fn finished(node: &TestNode, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let (status, record) = record(node, ADMIN, id).await;
            assert_eq!(status, StatusCode::OK, "{record}");
            if matches!(record["status"].as_str(), Some("succeeded" | "failed")) {
                return record;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "never finished: {record}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn an_async_call_goes_from_queued_to_running_to_succeeded() {
        let node = TestNode::start_with(|c| c.max_concurrent_calls = 1).await;
        node.node.deploy_defaults("demo", &[("chain", shoal_guests::CHAIN)]).await.unwrap();
        // The one slot is taken by the first call, so the second waits.
        let (status, first) = submit(&node, ADMIN, "demo/chain", b"sleep 300").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{first}");
        let first = first["call_id"].as_str().unwrap().to_string();
        let start = Instant::now();
        while record(&node, ADMIN, &first).await.1["status"] != "running" {
            assert!(start.elapsed() < Duration::from_secs(10), "the first call never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (_, second) = submit(&node, ADMIN, "demo/echo", b"later").await;
        let second = second["call_id"].as_str().unwrap().to_string();
        let (_, queued) = record(&node, ADMIN, &second).await;
        assert_eq!(queued["status"], "queued", "{queued}");
        assert_eq!(queued["timings"]["started_at_ms"], Value::Null);

        let done = finished(&node, &first).await;
        assert_eq!((done["status"].as_str(), done["output"].as_str()), (Some("succeeded"), Some("slept")));
        let done = finished(&node, &second).await;
        assert_eq!(done["output"], "later");
        assert_eq!(done["output_base64"], "bGF0ZXI=");
        assert_eq!(done["function"], "demo/echo");
        assert_eq!(done["attempts"], 1);
        let t = &done["timings"];
        let (queued, started, ended) = (
            t["queued_at_ms"].as_u64().unwrap(),
            t["started_at_ms"].as_u64().unwrap(),
            t["finished_at_ms"].as_u64().unwrap(),
        );
        assert!(queued <= started && started <= ended, "{t}");
        node.stop().await;
    }

    #[tokio::test]
    async fn failures_are_recorded_and_records_belong_to_their_tenant() {
        let node = TestNode::start().await;
        let (_, accepted) = submit(&node, ADMIN, "demo/fib", b"ten").await;
        let id = accepted["call_id"].as_str().unwrap().to_string();
        let done = finished(&node, &id).await;
        assert_eq!(done["status"], "failed");
        assert_eq!(done["error"]["kind"], "function_error");
        assert!(done["error"]["message"].as_str().unwrap().contains("is not a decimal"), "{done}");
        assert_eq!(done["output"], Value::Null);

        // Another tenant sees the same 404 as for an id that never existed.
        let other = node.create_tenant("other").await;
        let (status, _) = record(&node, &other, &id).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        for missing in ["00000000000000000000000000000000", "not-a-call-id"] {
            assert_eq!(record(&node, ADMIN, missing).await.0, StatusCode::NOT_FOUND, "{missing}");
        }
        let (status, _) = submit(&node, &other, "demo/fib", b"1").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "another tenant's function looks missing");
        let (status, _) = submit(&node, ADMIN, "demo/nothing-here", b"1").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "refused at once, not accepted");
        node.stop().await;
    }

    #[tokio::test]
    async fn a_tenants_backlog_fills_its_own_share_and_never_refuses_another_tenant() {
        let node = TestNode::start_with(|c| {
            c.max_async_calls = 8;
            c.max_async_calls_per_tenant = Some(2);
        })
        .await;
        node.node.deploy_defaults("demo", &[("chain", shoal_guests::CHAIN)]).await.unwrap();
        let acme = node.create_tenant("acme").await;
        assert_eq!(node.deploy("acme/echo", "", shoal_guests::ECHO).await.0, StatusCode::CREATED);
        for _ in 0..2 {
            assert_eq!(submit(&node, ADMIN, "demo/chain", b"sleep 300").await.0, StatusCode::ACCEPTED);
        }
        let (status, refused) = submit(&node, ADMIN, "demo/echo", b"x").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains("tenant `demo` has 2 asynchronous calls"), "{message}");
        let (status, accepted) = submit(&node, &acme, "acme/echo", b"mine").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let done = finished(&node, accepted["call_id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        node.stop().await;
    }

    #[tokio::test]
    async fn a_tenant_keeps_at_most_its_records_and_output_bytes_and_the_counts_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let tweak = |c: &mut NodeConfig| {
            c.max_async_records_per_tenant = 3;
            c.max_async_output_bytes_per_tenant = 25;
        };
        let mut cfg = config(dir.path());
        tweak(&mut cfg);
        let node = TestNode::start_in(cfg).await;
        let acme = node.create_tenant("acme").await;
        let other = node.create_tenant("other").await;
        for function in ["acme/echo", "other/echo"] {
            assert_eq!(node.deploy(function, "", shoal_guests::ECHO).await.0, StatusCode::CREATED);
        }
        let mut records = Vec::new();
        for _ in 0..3 {
            let (status, accepted) = submit(&node, &acme, "acme/echo", b"0123456789").await;
            assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
            records.push(finished(&node, accepted["call_id"].as_str().unwrap()).await);
        }
        // 10 + 10 bytes kept; the third output would make 30 of 25.
        assert_eq!(records[1]["output"], "0123456789");
        assert_eq!(
            (records[2]["status"].as_str(), records[2]["error"]["kind"].as_str()),
            (Some("failed"), Some("limit_exceeded")),
            "{}",
            records[2]
        );
        assert!(records[2]["output"].is_null());
        // Three records kept: the fourth call is refused; another tenant's is not.
        let (status, refused) = submit(&node, &acme, "acme/echo", b"x").await;
        assert_eq!(
            (status, refused["error"]["kind"].as_str()),
            (StatusCode::INSUFFICIENT_STORAGE, Some("limit_exceeded"))
        );
        let (status, accepted) = submit(&node, &other, "other/echo", b"x").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        finished(&node, accepted["call_id"].as_str().unwrap()).await;
        node.stop().await;
        // Counted again from the records at start.
        let mut cfg = config(dir.path());
        tweak(&mut cfg);
        let node = TestNode::start_in(cfg).await;
        let (status, refused) = submit(&node, &acme, "acme/echo", b"x").await;
        assert_eq!(
            (status, refused["error"]["kind"].as_str()),
            (StatusCode::INSUFFICIENT_STORAGE, Some("limit_exceeded"))
        );
        node.stop().await;
    }

    #[tokio::test]
    async fn too_many_unfinished_calls_are_refused_and_old_records_expire() {
        let node = TestNode::start_with(|c| {
            c.max_async_calls = 2;
            c.max_async_calls_per_tenant = Some(2);
            c.async_retention = Duration::ZERO;
        })
        .await;
        node.node.deploy_defaults("demo", &[("chain", shoal_guests::CHAIN)]).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let (status, accepted) = submit(&node, ADMIN, "demo/chain", b"sleep 300").await;
            assert_eq!(status, StatusCode::ACCEPTED);
            ids.push(accepted["call_id"].as_str().unwrap().to_string());
        }
        let (status, refused) = submit(&node, ADMIN, "demo/echo", b"x").await;
        assert_eq!((status, refused["error"]["kind"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("overloaded")));
        for id in &ids {
            finished(&node, id).await;
        }
        // Retention zero: every finished record is past it.
        assert_eq!(node.node.expire_call_records().await.unwrap(), 2);
        assert_eq!(record(&node, ADMIN, &ids[0]).await.0, StatusCode::NOT_FOUND);
        node.stop().await;
    }
}

#[tokio::test]
async fn past_the_image_budget_idle_images_are_dropped_and_reloaded_without_compiling() {
    let node = TestNode::start_with(|c| c.max_loaded_images = 2).await;
    let loaded = async || {
        let text = node.req(reqwest::Method::GET, "/metrics", Some(ADMIN)).send().await.unwrap().text().await.unwrap();
        let line = text.lines().find(|l| l.starts_with("shoal_images_loaded ")).unwrap().to_string();
        line.rsplit(' ').next().unwrap().parse::<usize>().unwrap()
    };
    assert!(loaded().await <= 2, "the examples were deployed past the budget");
    let compiled = node.node.runtime().n_compiles();
    for _ in 0..2 {
        assert_eq!(node.invoke("demo/hello", b"a").await, (StatusCode::OK, b"hello a".to_vec()));
        assert_eq!(node.invoke("demo/fib", b"10").await, (StatusCode::OK, b"55".to_vec()));
        assert_eq!(node.invoke("demo/upper", b"b").await, (StatusCode::OK, b"B".to_vec()));
        assert_eq!(node.invoke("demo/echo", b"c").await, (StatusCode::OK, b"c".to_vec()));
        assert!(loaded().await <= 2);
    }
    assert_eq!(node.node.runtime().n_compiles(), compiled, "reloaded from the compiled cache");
    // Two names deploying the same bytes share one image, counted once and
    // dropped from both together.
    for (name, wasm) in [("hello-again", shoal_guests::HELLO), ("fib-again", shoal_guests::FIB)] {
        let (status, _) = node.deploy(&format!("demo/{name}"), "", wasm).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    for name in ["hello", "hello-again", "fib", "fib-again"] {
        assert_eq!(node.invoke(&format!("demo/{name}"), b"10").await.0, StatusCode::OK);
    }
    assert_eq!(loaded().await, 2, "hello's image and fib's");
    assert_eq!(node.invoke("demo/upper", b"b").await.0, StatusCode::OK);
    assert_eq!(loaded().await, 2);
    // The least recently used image went, from both its names.
    assert!(!node.node.is_loaded("demo", "hello") && !node.node.is_loaded("demo", "hello-again"));
    assert!(node.node.is_loaded("demo", "fib-again") && node.node.is_loaded("demo", "upper"));
    node.stop().await;
}

mod hostile_clients {
    //! Clients that attack the connection layer, over raw sockets: each is
    //! cut off by a limit while a well-behaved client keeps being served.

    use super::*;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Short timeouts, so that the tests see them fire.
    fn tight(config: &mut NodeConfig) {
        config.http.header_read_timeout = Duration::from_millis(300);
        config.http.idle_timeout = Duration::from_millis(400);
        config.http.body_grace = Duration::from_millis(300);
        config.http.min_body_rate = 1024;
    }

    async fn connect(node: &TestNode) -> TcpStream {
        TcpStream::connect(node.base.trim_start_matches("http://")).await.unwrap()
    }

    /// Everything the server sends until it closes the connection, or None
    /// if it is still open after `bound`.
    async fn read_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin), bound: Duration) -> Option<String> {
        let mut received = Vec::new();
        let read = tokio::time::timeout(bound, async {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        read.ok().map(|()| String::from_utf8_lossy(&received).into_owned())
    }

    /// The status code of the first response in `text`, if any.
    fn status_of(text: &str) -> Option<u16> {
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    async fn victim_is_served(node: &TestNode) {
        assert_eq!(node.invoke("demo/hello", b"v").await, (StatusCode::OK, b"hello v".to_vec()));
    }

    /// Send a request head and then the whole body, reading nothing
    /// until it is all written (as Python's `urllib` does); the answer, up
    /// to the server's close, or why the body could not be written.
    async fn send_all_then_read(node: &TestNode, path: &str, token: &str, body_len: usize) -> Result<String, String> {
        let mut stream = connect(node).await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {body_len}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
        let chunk = vec![b'x'; 1 << 20];
        let mut left = body_len;
        while left > 0 {
            let n = left.min(chunk.len());
            stream.write_all(&chunk[..n]).await.map_err(|e| format!("writing the body: {e}"))?;
            left -= n;
        }
        read_until_closed(&mut stream, Duration::from_secs(10)).await.ok_or_else(|| "never closed".to_string())
    }

    #[tokio::test]
    async fn a_client_that_writes_its_whole_body_before_reading_gets_the_refusal() {
        let node = TestNode::start().await;
        // 15 MiB: more than the loopback's socket buffers hold, so the
        // server must read it for the client to finish writing.
        let body = 15 << 20;
        for (path, token, status) in [
            ("/v1/functions/demo/echo/invoke", ADMIN, 413),
            ("/v1/functions/demo/echo/invoke", "wrong", 401),
            ("/v1/functions/demo/nothing/invoke", ADMIN, 404),
        ] {
            let answer = send_all_then_read(&node, path, token, body).await.unwrap_or_else(|e| panic!("{status}: {e}"));
            assert_eq!(status_of(&answer), Some(status), "{answer}");
            assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
        }
        victim_is_served(&node).await;
        node.stop().await;
        // What is read after a refusal is bounded: past it, the connection
        // is closed on the writer.
        let node = TestNode::start_with(|c| {
            c.http.linger = shoal_node::Linger { bytes: 1 << 20, time: Duration::from_secs(5) }
        })
        .await;
        let started = Instant::now();
        let cut = send_all_then_read(&node, "/v1/functions/demo/echo/invoke", "wrong", 256 << 20).await;
        assert!(cut.is_err(), "256 MiB were read after the refusal: {cut:?}");
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
        victim_is_served(&node).await;
        node.stop().await;
    }

    #[tokio::test]
    async fn slowloris_heads_are_cut_off_by_the_header_timeout() {
        let node = TestNode::start_with(tight).await;
        let mut attacker = connect(&node).await;
        attacker.write_all(b"POST /v1/functions/demo/hello/invoke HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        // A header byte every 50 ms: the connection is never idle, but
        // the head never completes.
        let trickle = {
            let (mut reader, mut writer) = attacker.into_split();
            let writing = tokio::spawn(async move {
                for _ in 0..200 {
                    if writer.write_all(b"X").await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            let started = Instant::now();
            let closed = read_until_closed(&mut reader, Duration::from_secs(5)).await.is_some();
            writing.abort();
            (closed, started.elapsed())
        };
        victim_is_served(&node).await;
        let (closed, after) = trickle;
        assert!(closed, "a head trickled in for 5 s and the connection is still open");
        assert!(after < Duration::from_secs(4), "closed after {after:?}");
        node.stop().await;
    }

    #[tokio::test]
    async fn slow_bodies_are_answered_408() {
        let node = TestNode::start_with(tight).await;
        let mut attacker = connect(&node).await;
        attacker
            .write_all(
                b"POST /v1/functions/demo/echo/invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-admin-token-0123456789\r\nContent-Length: 60000\r\n\r\n",
            )
            .await
            .unwrap();
        let (mut reader, mut writer) = attacker.into_split();
        // 10 bytes every 100 ms: 100 bytes/s, under the minimum of 1 KiB/s.
        let writing = tokio::spawn(async move {
            for _ in 0..100 {
                if writer.write_all(&[b'a'; 10]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        victim_is_served(&node).await;
        let mut received = Vec::new();
        let answered = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut received)).await;
        writing.abort();
        assert!(answered.is_ok(), "a body at 100 bytes/s was still being read after 5 s");
        let text = String::from_utf8_lossy(&received);
        assert_eq!(status_of(&text), Some(408), "{text}");
        assert!(text.contains("request_timeout"), "{text}");
        // A body that is merely not instant is fine.
        let slow_but_fair: Vec<Result<Vec<u8>, std::io::Error>> = (0..4).map(|_| Ok(vec![b'b'; 2048])).collect();
        let response = node
            .req(reqwest::Method::POST, "/v1/functions/demo/echo/invoke", Some(ADMIN))
            .body(reqwest::Body::wrap_stream(futures_stream(slow_but_fair)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        node.stop().await;
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let node = TestNode::start_with(tight).await;
        // Says nothing at all.
        let mut silent = connect(&node).await;
        // Says one request, then nothing.
        let mut kept = connect(&node).await;
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        // Opens HTTP/2 (preface and empty settings), then nothing.
        let mut h2 = connect(&node).await;
        h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
        for (name, stream) in [("silent", &mut silent), ("keep-alive", &mut kept), ("http/2", &mut h2)] {
            let text = read_until_closed(stream, Duration::from_secs(5)).await;
            assert!(text.is_some(), "the {name} connection was still open after 5 s");
        }
        // Opens HTTP/2, then pings every 50 ms and never asks for anything:
        // bytes move both ways, but no request, so it is idle all the same.
        let pinger = connect(&node).await;
        let (mut reader, mut writer) = pinger.into_split();
        writer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
        let pinging = tokio::spawn(async move {
            for i in 0u64..200 {
                let mut ping = b"\0\0\x08\x06\0\0\0\0\0".to_vec();
                ping.extend_from_slice(&i.to_be_bytes());
                if writer.write_all(&ping).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let closed = read_until_closed(&mut reader, Duration::from_secs(5)).await.is_some();
        pinging.abort();
        assert!(closed, "an HTTP/2 connection kept open by pings alone");
        victim_is_served(&node).await;
        let metrics =
            node.req(reqwest::Method::GET, "/metrics", Some(ADMIN)).send().await.unwrap().text().await.unwrap();
        let idle_closed: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("shoal_http_connections_idle_closed_total "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(idle_closed >= 2, "{metrics}");
        node.stop().await;
    }

    #[tokio::test]
    async fn past_the_connection_limit_new_connections_get_503_and_held_ones_keep_working() {
        let node = TestNode::start_with(|c| {
            tight(c);
            c.http.max_connections = 4;
            // Long enough that the attacker's connections stay while we look.
            c.http.idle_timeout = Duration::from_secs(2);
            c.http.header_read_timeout = Duration::from_secs(2);
        })
        .await;
        // The victim's connection is open before the flood.
        victim_is_served(&node).await;
        let mut flood = Vec::new();
        for _ in 0..3 {
            flood.push(connect(&node).await);
        }
        let mut refused = connect(&node).await;
        let text = read_until_closed(&mut refused, Duration::from_secs(2)).await.expect("answered and closed");
        assert_eq!(status_of(&text), Some(503), "{text}");
        assert!(text.contains("overloaded"), "{text}");
        // The victim, on its kept-alive connection, is served throughout.
        for _ in 0..3 {
            victim_is_served(&node).await;
        }
        // The flood's connections time out and free their places.
        for stream in &mut flood {
            assert!(read_until_closed(stream, Duration::from_secs(5)).await.is_some());
        }
        drop(flood);
        let fresh = reqwest::Client::new();
        let response = fresh.get(format!("{}/healthz", node.base)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        node.stop().await;
    }

    #[tokio::test]
    async fn oversized_heads_and_targets_are_refused_before_routing() {
        let node = TestNode::start().await;
        let mut big_header = connect(&node).await;
        let head = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20 << 10));
        let _ = big_header.write_all(head.as_bytes()).await;
        let text = read_until_closed(&mut big_header, Duration::from_secs(5)).await.unwrap();
        assert_eq!(status_of(&text), Some(431), "{text}");

        let long = format!("/v1/functions/demo/{}/invoke", "a".repeat(9 << 10));
        let response = node.req(reqwest::Method::POST, &long, Some(ADMIN)).send().await.unwrap();
        let (status, body) = status_and_json(response).await;
        assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::URI_TOO_LONG, Some("uri_too_long")));
        victim_is_served(&node).await;
        node.stop().await;
    }

    #[tokio::test]
    async fn malformed_requests_get_4xx_and_the_node_carries_on() {
        let node = TestNode::start().await;
        let cases: &[&[u8]] = &[
            b"GARBAGE\r\n\r\n",
            b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
            b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            b"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            b"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n",
            b"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            b"GET /v1/functions/%zz/x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/functions/demo/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        ];
        for case in cases {
            let mut stream = connect(&node).await;
            let _ = stream.write_all(case).await;
            let _ = stream.shutdown().await;
            let text = read_until_closed(&mut stream, Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("{:?}: no answer and not closed", String::from_utf8_lossy(case)));
            if let Some(status) = status_of(&text) {
                assert!((400..500).contains(&status), "{:?} got {text}", String::from_utf8_lossy(case));
            }
            victim_is_served(&node).await;
        }
        node.stop().await;
    }

    #[tokio::test]
    async fn tokens_in_the_query_string_are_not_credentials() {
        let node = TestNode::start().await;
        let path = format!("/v1/functions/demo/hello?token={ADMIN}");
        let response = node.req(reqwest::Method::GET, &path, None).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let path = format!("/v1/functions/demo/hello/invoke?access_token={ADMIN}");
        let response = node.req(reqwest::Method::POST, &path, None).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        node.stop().await;
    }
}

#[tokio::test]
async fn a_binary_declaring_more_memory_than_its_function_may_have_is_refused_at_deploy() {
    let node = TestNode::start().await;
    // Two MiB at start, one allowed.
    let module = wat::parse_str(r#"(module (memory 32) (func (export "_start")))"#).unwrap();
    let (status, body) = node.deploy("demo/greedy", "memory_mb=1", &module).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_wasm")));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("declares 2048 KiB") && message.contains("1024 KiB"), "{message}");
    assert_error(node.invoke("demo/greedy", b"").await, StatusCode::NOT_FOUND, "not_found");
    let (status, _) = node.deploy("demo/greedy", "memory_mb=2", &module).await;
    assert_eq!(status, StatusCode::CREATED, "at its limit it deploys");
    node.stop().await;
}

#[tokio::test]
async fn tokens_are_kept_hashed_and_never_logged() {
    // Everything logged on every thread (the call pool's and the blocking
    // threads' too) while this test runs; the only test that sets the
    // process's subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("no other test sets the global subscriber");

    let node = TestNode::start().await;
    let token = node.create_tenant("acme").await;
    let secret = token.split_once('.').unwrap().1.to_string();
    assert_eq!(node.invoke_as(&token, "acme/nothing", b"").await.0, StatusCode::NOT_FOUND);
    assert_eq!(node.invoke_as(&format!("{token}x"), "acme/nothing", b"").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(node.invoke("demo/misbehave", b"panic").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    // The store as written (every write is committed before it is answered).
    let store = std::fs::read(node._dir.as_ref().unwrap().path().join("shoal.redb")).unwrap();
    node.stop().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("deployed"), "the capture works: {logs}");
    // Secrets in the configuration print as `<redacted>`: the admin token,
    // and the Redis URL's password (in the node's and in the tier's own).
    let mut shown = config(std::path::Path::new("/tmp"));
    shown.redis_url = Some("redis://shoal:hunter2-password@10.0.0.5:6379".into());
    let printed = format!("{shown:?} {:?}", shoal_state::RedisConfig::new("redis://u:hunter2-password@h:1"));
    assert!(!printed.contains(ADMIN) && !printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("<redacted>"), "{printed}");
    for (what, text) in [("the tenant token", secret.as_str()), ("the admin token", ADMIN)] {
        assert!(!logs.contains(text), "{what} is in the logs:\n{logs}");
    }
    // At rest: the store holds the token's hash, never the token.
    let contains = |needle: &[u8]| store.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(secret.as_bytes()), "the tenant token is stored in clear");
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    assert!(contains(hash.as_bytes()), "the token's hash is stored");
}

#[tokio::test]
async fn state_of_a_tenant_that_was_never_created_is_not_found() {
    let node = TestNode::start().await;
    for (method, path) in [
        (reqwest::Method::PUT, "/v1/state/nosuch/k"),
        (reqwest::Method::GET, "/v1/state/nosuch/k"),
        (reqwest::Method::GET, "/v1/state/nosuch"),
    ] {
        let response = node.req(method.clone(), path, Some(ADMIN)).body("v").send().await.unwrap();
        let (status, body) = status_and_json(response).await;
        assert_eq!(
            (status, body["error"]["kind"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{method} {path}"
        );
    }
    let response = node.req(reqwest::Method::GET, "/openapi.json", None).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let spec: Value = response.json().await.unwrap();
    assert!(spec["paths"]["/v1/functions/{tenant}/{name}/invoke"]["post"].is_object(), "the spec describes invoke");
    node.stop().await;
}

#[test]
fn generated_requests_never_get_a_platform_failure() {
    // The fuzz target `routing`'s generator, as a proptest on stable.
    use proptest::prelude::*;
    use tower::ServiceExt;
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let node = tokio.block_on(TestNode::start());
    let acme = tokio.block_on(node.create_tenant("acme"));
    let router = node.node.router();
    let cases = std::env::var("SHOAL_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256);
    let config =
        proptest::test_runner::Config { cases, failure_persistence: None, max_shrink_iters: 64, ..Default::default() };
    // The same cases every run, unless SHOAL_FUZZ_RANDOM=1.
    let mut runner = if std::env::var_os("SHOAL_FUZZ_RANDOM").is_some() {
        proptest::test_runner::TestRunner::new(config)
    } else {
        let rng = proptest::test_runner::TestRng::deterministic_rng(config.rng_algorithm);
        proptest::test_runner::TestRunner::new_with_rng(config, rng)
    };
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..512), |seed| {
            let mut u = arbitrary::Unstructured::new(&seed);
            let Ok(request) = shoal_testkit::fuzz::api_request(
                &mut u,
                &[ADMIN, &acme],
                &["demo", "acme"],
                &["hello", "echo", "upper", "counter"],
            ) else {
                return Ok(());
            };
            let mut builder = axum::http::Request::builder().method(request.method).uri(&request.path_and_query);
            if let Some(token) = &request.token {
                builder = builder.header("authorization", format!("Bearer {token}"));
            }
            let Ok(http_request) = builder.body(axum::body::Body::from(request.body.clone())) else {
                return Ok(()); // not a request a client could send
            };
            let response = tokio.block_on(router.clone().oneshot(http_request)).unwrap();
            let status = response.status().as_u16();
            let body = tokio.block_on(http_body_util::BodyExt::collect(response.into_body())).unwrap().to_bytes();
            if status >= 500 {
                // Only a function's own failure may be a 5xx.
                let kind = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["error"]["kind"].as_str().map(String::from));
                let guest = matches!(kind.as_deref(), Some("trap" | "function_error" | "out_of_memory" | "timeout"));
                prop_assert!(guest, "{request:?} → {status} {}", String::from_utf8_lossy(&body));
            }
            Ok(())
        })
        .unwrap();
    tokio.block_on(node.stop());
}

#[tokio::test]
async fn a_tenant_creation_body_over_4_kib_is_refused() {
    let node = TestNode::start().await;
    let name = "a".repeat(5000);
    let response = node
        .req(reqwest::Method::POST, "/v1/tenants", Some(ADMIN))
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(response).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")));
    node.stop().await;
}

#[tokio::test]
async fn shutdown_waits_for_requests_in_flight_only_until_the_drain_timeout() {
    let node = TestNode::start_with(|c| c.http.drain_timeout = std::time::Duration::from_millis(200)).await;
    let (status, _) = node.deploy("demo/sleepy", "timeout_ms=60000", shoal_guests::MISBEHAVE).await;
    assert_eq!(status, StatusCode::CREATED);
    let sleeping = {
        let request = node.req(reqwest::Method::POST, "/v1/functions/demo/sleepy/invoke", Some(ADMIN)).body("sleep");
        tokio::spawn(request.send())
    };
    while node.node.executor_busy() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let started = std::time::Instant::now();
    let inner = node.node.clone();
    node.stop().await;
    assert_eq!(inner.executor_busy(), 0, "the cut-off call was cancelled before the node stopped");
    // The call would run for 60 s; the node stops after the drain.
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "stopped after {:?}", started.elapsed());
    assert!(sleeping.await.unwrap().is_err(), "the cut-off request sees its connection close");
}

/// Functions deployed as source, over HTTP.
mod source_functions {
    use super::*;

    async fn python_node() -> TestNode {
        TestNode::start_with(|config| {
            config.python_runtime = shoal_runtime::RuntimeBinary::new(shoal_guests::PYTHON_RUNTIME);
            // Compiled once for every run of these tests.
            config.runtime_cache_dir = Some(concat!(env!("CARGO_TARGET_TMPDIR"), "/runtime-cache").into());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn python_source_deploys_as_one_canonical_bundle_and_bad_uploads_are_named() {
        let node = python_node().await;
        let app = b"from util import shout\ndef handle(input):\n    return shout(input.decode())\n";
        let util = b"def shout(s):\n    return s.upper() + '!'\n";

        // A single file is the entry file.
        let (status, described) = node.deploy("demo/one", "language=python", b"def handle(i):\n    return i\n").await;
        assert_eq!(status, StatusCode::CREATED, "{described}");
        assert_eq!((described["kind"].as_str(), described["snapshot"].as_bool()), (Some("python"), Some(true)));
        assert_eq!(node.invoke("demo/one", b"same").await, (StatusCode::OK, b"same".to_vec()));

        // A bundle sent as it is, its files out of order, is stored in the
        // canonical form: the same hash as the same source sorted.
        let mut raw = b"\0shoal-source\npython\n".to_vec();
        for (path, contents) in [("util.py", &util[..]), ("app.py", &app[..])] {
            raw.extend_from_slice(format!("{path}\n{}\n", contents.len()).as_bytes());
            raw.extend_from_slice(contents);
        }
        let canonical = shoal_runtime::SourceBundle::decode(&raw).unwrap().encode();
        assert_ne!(raw, canonical);
        let (status, described) = node.deploy("demo/two", "", &raw).await;
        assert_eq!(status, StatusCode::CREATED, "{described}");
        assert_eq!(described["sha256"], hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&canonical)));
        assert_eq!(node.invoke("demo/two", b"hey").await, (StatusCode::OK, b"HEY!".to_vec()));

        // Refusals name their reason and kind.
        let (status, body) = node.deploy("demo/bad", "language=python", b"def handle(i)\n").await;
        assert_eq!(
            (status, body["error"]["kind"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_source"))
        );
        assert!(body["error"]["message"].as_str().unwrap().contains("SyntaxError"), "{body}");
        let (status, body) = node.deploy("demo/bad", "language=cobol", app).await;
        assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
        // (An empty body: refused before the body is read, a large one
        // would leave the connection to be closed under the next request.)
        let (status, body) = node.deploy("demo/bad", "snapshot=maybe", b"").await;
        assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
        let (status, body) = node.deploy("demo/bad", "language=python", shoal_guests::HELLO).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("WebAssembly"), "{body}");
        // JavaScript is not configured on this node: said so, nothing stored.
        let (status, body) = node.deploy("demo/bad", "language=js", b"exports.handle = () => 1;").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("no javascript runtime"), "{body}");
        assert_eq!(node.invoke("demo/bad", b"").await.0, StatusCode::NOT_FOUND);
        node.stop().await;
    }
}

mod tenant_lifecycle {
    //! Token rotation and revocation, and deleting a tenant.

    use super::*;
    use std::time::{Duration, Instant};

    async fn rotate(node: &TestNode, tenant: &str, token: &str, grace_seconds: u64) -> (StatusCode, Value) {
        let path = format!("/v1/tenants/{tenant}/token");
        let body = serde_json::json!({ "grace_seconds": grace_seconds });
        status_and_json(node.req(reqwest::Method::POST, &path, Some(token)).json(&body).send().await.unwrap()).await
    }

    /// The status of listing the tenant's functions with `token`.
    async fn list_status(node: &TestNode, tenant: &str, token: &str) -> StatusCode {
        node.req(reqwest::Method::GET, &format!("/v1/functions/{tenant}"), Some(token)).send().await.unwrap().status()
    }

    #[tokio::test]
    async fn a_rotated_token_works_through_its_grace_and_is_then_refused() {
        let node = TestNode::start().await;
        let first = node.create_tenant("rota").await;
        let other = node.create_tenant("rotb").await;

        // The tenant rotates its own token; the old one keeps working for a second.
        let (status, body) = rotate(&node, "rota", &first, 1).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let second = body["token"].as_str().unwrap().to_string();
        assert_ne!(second, first);
        assert_eq!(list_status(&node, "rota", &first).await, StatusCode::OK);
        assert_eq!(list_status(&node, "rota", &second).await, StatusCode::OK);
        // A token in its grace cannot mint another; nor can another tenant.
        assert_eq!(rotate(&node, "rota", &first, 60).await.0, StatusCode::FORBIDDEN);
        assert_eq!(rotate(&node, "rota", &other, 60).await.0, StatusCode::FORBIDDEN);
        assert_eq!(rotate(&node, "rota", ADMIN, 8 * 24 * 3600).await.0, StatusCode::BAD_REQUEST);
        let started = Instant::now();
        while list_status(&node, "rota", &first).await == StatusCode::OK {
            assert!(started.elapsed() < Duration::from_secs(10), "the old token outlived its grace");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(list_status(&node, "rota", &first).await, StatusCode::UNAUTHORIZED);
        assert_eq!(list_status(&node, "rota", &second).await, StatusCode::OK);

        // No grace: the token it replaces is refused at once.
        let (status, body) = rotate(&node, "rota", ADMIN, 0).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let third = body["token"].as_str().unwrap().to_string();
        assert_eq!(list_status(&node, "rota", &second).await, StatusCode::UNAUTHORIZED);
        assert_eq!(list_status(&node, "rota", &third).await, StatusCode::OK);

        // Revocation: every token refused, including one in its grace; the
        // other tenant untouched. A tenant cannot revoke.
        let (status, body) = rotate(&node, "rota", &third, 3600).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let fourth = body["token"].as_str().unwrap().to_string();
        let revoke = |token: &str| node.req(reqwest::Method::DELETE, "/v1/tenants/rota/token", Some(token)).send();
        assert_eq!(revoke(&fourth).await.unwrap().status(), StatusCode::FORBIDDEN);
        assert_eq!(revoke(ADMIN).await.unwrap().status(), StatusCode::NO_CONTENT);
        for token in [&first, &second, &third, &fourth] {
            assert_eq!(list_status(&node, "rota", token).await, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(list_status(&node, "rotb", &other).await, StatusCode::OK);
        // The admin gives it a token again.
        let (status, body) = rotate(&node, "rota", ADMIN, 0).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(list_status(&node, "rota", body["token"].as_str().unwrap()).await, StatusCode::OK);
        assert_eq!(rotate(&node, "nosuch", ADMIN, 0).await.0, StatusCode::NOT_FOUND);

        // However often a tenant rotates, it keeps at most 4 tokens in their
        // grace besides its current one: the oldest beyond that is refused.
        let mut tokens = vec![body["token"].as_str().unwrap().to_string()];
        for _ in 0..6 {
            let (status, body) = rotate(&node, "rota", tokens.last().unwrap(), 3600).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            tokens.push(body["token"].as_str().unwrap().to_string());
        }
        let mut valid = Vec::new();
        for token in &tokens {
            valid.push(list_status(&node, "rota", token).await == StatusCode::OK);
        }
        assert_eq!(valid, [false, false, true, true, true, true, true], "the 2 oldest of 7 are refused");
        node.stop().await;
    }

    fn hello() -> &'static [u8] {
        shoal_guests::EXAMPLES.iter().find(|(name, _)| *name == "hello").unwrap().1
    }

    #[tokio::test]
    async fn deleting_a_tenant_removes_everything_it_has_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let node = TestNode::start_in(config(dir.path())).await;
        let token = node.create_tenant("leaving").await;
        let kept = node.create_tenant("staying").await;
        let own_wasm = shoal_guests::slow_to_compile(4242, 4);
        for (function, wasm) in [("leaving/hello", hello()), ("leaving/own", &own_wasm[..]), ("staying/hello", hello())]
        {
            assert_eq!(node.deploy(function, "", wasm).await.0, StatusCode::CREATED, "{function}");
        }
        for tenant in ["leaving", "staying"] {
            for i in 0..30 {
                let path = format!("/v1/state/{tenant}/key-{i}");
                let put = node.req(reqwest::Method::PUT, &path, Some(ADMIN)).body(format!("{tenant}-value-{i}"));
                assert!(put.send().await.unwrap().status().is_success());
            }
        }
        // A finished asynchronous call leaves a record.
        let path = "/v1/functions/leaving/hello/invoke?async=true";
        let (status, accepted) =
            status_and_json(node.req(reqwest::Method::POST, path, Some(&token)).body("x").send().await.unwrap()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let call = accepted["call_id"].as_str().unwrap().to_string();
        let started = Instant::now();
        loop {
            let record = node.get_json(&format!("/v1/calls/{call}")).await;
            if record["status"] == "succeeded" {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "the call never finished: {record}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // Only the admin deletes; then it is refused everything at once.
        let delete = |t: &str| node.req(reqwest::Method::DELETE, "/v1/tenants/leaving", Some(t)).send();
        assert_eq!(delete(&token).await.unwrap().status(), StatusCode::FORBIDDEN);
        let (status, body) = status_and_json(delete(ADMIN).await.unwrap()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert!(matches!(body["status"].as_str(), Some("deleting" | "deleted")), "{body}");
        assert_eq!(list_status(&node, "leaving", &token).await, StatusCode::UNAUTHORIZED);
        let started = Instant::now();
        loop {
            let response = node.req(reqwest::Method::GET, "/v1/tenants/leaving", Some(ADMIN)).send().await.unwrap();
            if response.status() == StatusCode::NOT_FOUND {
                break;
            }
            let (status, body) = status_and_json(response).await;
            assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("deleting")), "{body}");
            assert!(started.elapsed() < Duration::from_secs(30), "the deletion never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(delete(ADMIN).await.unwrap().status(), StatusCode::NOT_FOUND);
        // Over the API: nothing of it; the other tenant has all it had.
        let response = node.req(reqwest::Method::GET, "/v1/state/leaving", Some(ADMIN)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let (status, _) = node.invoke_as(&kept, "staying/hello", b"x").await;
        assert_eq!(status, StatusCode::OK);
        let listed = node.get_json("/v1/state/staying").await;
        assert_eq!(listed["keys"].as_array().map(Vec::len), Some(30), "{listed}");
        let call = node.req(reqwest::Method::GET, &format!("/v1/calls/{call}"), Some(ADMIN)).send().await.unwrap();
        assert_eq!(call.status(), StatusCode::NOT_FOUND);
        node.stop().await;

        // In the store's file: no row of it in any table, the other's all there.
        let store = shoal_state::EmbeddedStore::open(&dir.path().join("shoal.redb")).unwrap();
        let table = shoal_state::Table::new;
        let rows = |name: &'static str, prefix: &str| store.scan_prefix(table(name), prefix).unwrap();
        assert!(rows("tenants", "leaving").is_empty());
        assert!(rows("functions", "leaving/").is_empty());
        // The function and its one version.
        assert_eq!(rows("functions", "staying/").len(), 2);
        for state_table in ["state_meta", "state_chunks", "state_usage", "state_usage2"] {
            assert!(rows(state_table, "leaving").is_empty(), "{state_table} holds some of it");
        }
        for state_table in ["state_meta", "state_chunks", "state_usage2"] {
            assert!(!rows(state_table, "staying").is_empty(), "{state_table} lost the other tenant's");
        }
        let own_sha = hex_sha256(&own_wasm);
        assert!(store.get(table("modules"), &own_sha).unwrap().is_none(), "its own wasm stayed");
        assert!(store.get(table("modules"), &hex_sha256(hello())).unwrap().is_some(), "shared wasm went");
        for (id, record) in rows("calls", "") {
            let record: Value = serde_json::from_slice(&record).unwrap();
            assert_ne!(record["tenant"], "leaving", "call record {id} stayed");
        }
        drop(store);

        // After a restart, the name can be taken again, by a tenant with nothing.
        let node = TestNode::start_in(config(dir.path())).await;
        let again = node.create_tenant("leaving").await;
        let listed = node.get_json("/v1/functions/leaving").await;
        assert_eq!(listed["functions"].as_array().map(Vec::len), Some(0), "{listed}");
        let listed = node.get_json("/v1/state/leaving").await;
        assert_eq!(listed["keys"].as_array().map(Vec::len), Some(0), "{listed}");
        assert_eq!(list_status(&node, "leaving", &token).await, StatusCode::UNAUTHORIZED);
        assert_eq!(list_status(&node, "leaving", &again).await, StatusCode::OK);
        node.stop().await;
    }

    fn hex_sha256(bytes: &[u8]) -> String {
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
    }
}

#[tokio::test]
async fn compiled_code_goes_with_the_last_function_that_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_in(config(dir.path())).await;
    node.create_tenant("gc").await;
    let wasm = shoal_guests::slow_to_compile(9191, 3);
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&wasm));
    let cached = || -> usize {
        std::fs::read_dir(dir.path().join("cache"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&sha))
            .count()
    };
    let compiled = r#"shoal_disk_bytes{kind="compiled"}"#;
    let before = metric(&node, compiled).await;
    for function in ["gc/first", "gc/second"] {
        assert_eq!(node.deploy(function, "", &wasm).await.0, StatusCode::CREATED);
    }
    assert_eq!(cached(), 2, "the artifact and its sum");
    let with = metric(&node, compiled).await;
    assert!(with > before, "{with} bytes with it, {before} before");
    assert!(metric(&node, r#"shoal_disk_bytes{kind="store"}"#).await > 0);
    let remove = |f: &str| node.req(reqwest::Method::DELETE, &format!("/v1/functions/gc/{f}"), Some(ADMIN)).send();
    assert_eq!(remove("first").await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(cached(), 2, "another function still uses it");
    assert_eq!(remove("second").await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(cached(), 0, "no function uses it: its compiled code goes");
    assert_eq!(metric(&node, compiled).await, before);
    // Deployed again, it is compiled again and works.
    assert_eq!(node.deploy("gc/third", "", &wasm).await.0, StatusCode::CREATED);
    assert_eq!(cached(), 2);
    node.stop().await;
}

#[tokio::test]
async fn in_a_cluster_kept_records_are_capped_per_tenant_and_go_with_their_tenant() {
    let redis = RedisServer::start();
    let node = TestNode::start_with(|c| {
        c.redis_url = Some(redis.url().into());
        c.max_async_records_per_tenant = 2;
    })
    .await;
    let token = node.create_tenant("kept").await;
    assert_eq!(node.deploy("kept/echo", "", shoal_guests::ECHO).await.0, StatusCode::CREATED);
    let submit = || node.req(reqwest::Method::POST, "/v1/functions/kept/echo/invoke?async=true", Some(&token));
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, accepted) = status_and_json(submit().body("x").send().await.unwrap()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        ids.push(accepted["call_id"].as_str().unwrap().to_string());
    }
    let (status, refused) = status_and_json(submit().body("x").send().await.unwrap()).await;
    assert_eq!((status, refused["error"]["kind"].as_str()), (StatusCode::INSUFFICIENT_STORAGE, Some("limit_exceeded")));
    // The demo tenant's calls are still taken.
    let path = "/v1/functions/demo/echo/invoke?async=true";
    assert_eq!(
        node.req(reqwest::Method::POST, path, Some(ADMIN)).body("y").send().await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    for id in &ids {
        let started = std::time::Instant::now();
        while node.get_json(&format!("/v1/calls/{id}")).await["status"] != "succeeded" {
            assert!(started.elapsed() < std::time::Duration::from_secs(20), "call {id} never finished");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let deleted = node.req(reqwest::Method::DELETE, "/v1/tenants/kept", Some(ADMIN)).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    let started = std::time::Instant::now();
    while node.req(reqwest::Method::GET, "/v1/tenants/kept", Some(ADMIN)).send().await.unwrap().status()
        != StatusCode::NOT_FOUND
    {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the deletion never ended");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for id in &ids {
        let response = node.req(reqwest::Method::GET, &format!("/v1/calls/{id}"), Some(ADMIN)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "record {id} stayed");
    }
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    // The tenant's keys end with its name (queues, counts, indexes) or hold
    // `kept/` (its state values).
    let left: Vec<&String> = keys.iter().filter(|k| k.ends_with(":kept") || k.contains("kept/")).collect();
    assert!(left.is_empty(), "keys of the deleted tenant: {left:?}");
    node.stop().await;
}

#[path = "api/console.rs"]
mod console;
#[path = "api/http_functions.rs"]
mod http_functions;
#[path = "api/queues.rs"]
mod queues;
#[path = "api/tracing.rs"]
mod tracing_spans;
#[path = "api/triggers.rs"]
mod triggers;
#[path = "api/usage.rs"]
mod usage;
#[path = "api/versions.rs"]
mod versions;
