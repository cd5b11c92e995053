//! HTTP functions (`wasi:http` components) on the function listener, over
//! real sockets: routes, access, streaming both ways, deadlines, failures
//! after the head, and outbound requests behind allow-lists.

use std::time::{Duration, Instant};

use super::*;

const PROBE: &[u8] = shoal_guests::HTTP_PROBE;

impl TestNode {
    async fn deploy_probe(&self, name: &str, query: &str) -> Value {
        let (status, body) = self.deploy(&format!("demo/{name}"), query, PROBE).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    fn route(&self, function: &str, rest: &str) -> String {
        format!("{}/{function}{rest}", self.fn_base)
    }

    async fn get_text(&self, url: &str) -> (StatusCode, String) {
        let response = self.http.get(url).send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }

    async fn log_lines(&self, function: &str) -> String {
        self.get_json(&format!("/v1/functions/{function}/logs")).await["lines"].to_string()
    }

    /// The function's logs once they hold `needle` (a call's lines are
    /// kept when it ends, which may be just after its answer did).
    async fn logs_with(&self, function: &str, needle: &str) -> String {
        let waited = Instant::now();
        loop {
            let logs = self.log_lines(function).await;
            if logs.contains(needle) || waited.elapsed() > Duration::from_secs(10) {
                return logs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn a_wasi_http_component_is_an_http_function_on_its_route() {
    let node = TestNode::start().await;
    let described = node.deploy_probe("probe", "access=public").await;
    assert_eq!((described["kind"].as_str(), described["access"].as_str()), (Some("http"), Some("public")));

    let (status, text) = node.get_text(&node.route("demo/probe", "/hello?x=1&y=%20")).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "hello GET /hello?x=1&y=%20"));
    // The prefix alone is the guest's `/`.
    let (status, text) = node.get_text(&node.route("demo/probe", "")).await;
    assert_eq!((status, text.as_str()), (StatusCode::NOT_FOUND, "no route /"));
    let response = node.http.post(node.route("demo/probe", "/hello")).body("ignored").send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "hello POST /hello");
    let response = node.http.head(node.route("demo/probe", "/hello")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.bytes().await.unwrap().is_empty(), "a HEAD answer has no body");

    // Not an HTTP function, or none at all: 404 with the API's error body.
    for missing in ["/demo/hello/x", "/demo/nothing/x", "/demo", "/"] {
        let response = node.http.get(format!("{}{missing}", node.fn_base)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{missing}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["kind"], "not_found");
    }

    // Called with bytes through the API, it gets `POST /`: its 404 is the
    // call's failure, named with the status.
    let (status, body) = node.invoke("demo/probe", b"x").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&body).contains("404"), "{}", String::from_utf8_lossy(&body));
    node.stop().await;
}

#[tokio::test]
async fn a_token_function_needs_its_tenants_token_and_never_sees_it() {
    let node = TestNode::start().await;
    node.deploy_probe("private", "").await;
    node.deploy_probe("open", "access=public").await;
    let acme = node.create_tenant("acme").await;

    let url = node.route("demo/private", "/headers");
    // Without a token: the 404 of a function that is not there (names
    // behind tokens cannot be probed).
    let response = node.http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = node.http.get(&url).bearer_auth("not-a-token").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // Another tenant's token: the same 404 as a function that is not there.
    let response = node.http.get(&url).bearer_auth(&acme).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = node.http.get(&url).bearer_auth(ADMIN).header("x-probe", "yes").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = response.text().await.unwrap();
    assert!(seen.contains("x-probe: yes"), "{seen}");
    assert!(!seen.to_ascii_lowercase().contains("authorization"), "the token reached the guest: {seen}");
    assert!(!seen.contains(ADMIN));

    // A public function's Authorization header is its own business —
    // unless it holds a platform token, which is taken out.
    let response = node.http.get(node.route("demo/open", "/headers")).bearer_auth("its-own").send().await.unwrap();
    assert!(response.text().await.unwrap().contains("authorization: Bearer its-own"));
    for token in [ADMIN, acme.as_str()] {
        let response = node.http.get(node.route("demo/open", "/headers")).bearer_auth(token).send().await.unwrap();
        let seen = response.text().await.unwrap();
        assert!(!seen.contains(token) && !seen.to_ascii_lowercase().contains("authorization"), "{seen}");
    }

    // `access=public` is for HTTP functions only.
    let (status, body) = node.deploy("demo/wrong", "access=public", shoal_guests::HELLO).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    node.stop().await;
}

#[tokio::test]
async fn headers_repeat_and_need_not_be_utf8() {
    let node = TestNode::start().await;
    node.deploy_probe("probe", "access=public").await;
    let response = node
        .http
        .get(node.route("demo/probe", "/headers"))
        .header("x-twice", "a")
        .header("x-twice", "b")
        .header("x-bytes", reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap())
        .send()
        .await
        .unwrap();
    let answered: Vec<_> =
        response.headers().get_all("x-multi").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert_eq!(answered, ["one", "two"]);
    let seen = response.text().await.unwrap();
    assert!(seen.contains("x-twice: a\nx-twice: b\n"), "{seen}");
    assert!(seen.contains("x-bytes: hex 636166e9"), "{seen}");
    node.stop().await;
}

#[tokio::test]
async fn bodies_stream_both_ways_and_the_limit_counts_streamed_bytes() {
    let node = TestNode::start_with(|c| c.http_max_body_bytes = 256 << 20).await;
    node.deploy_probe("probe", "access=public&timeout_ms=60000").await;
    // 64 MiB through the echo, sent and read as it goes, every byte in
    // its place. (1 GiB with the node's RSS watched: the CLI's tests, where
    // the node is a process of its own.)
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 64;
    let chunks = futures_util::stream::iter((0..CHUNKS).map(|i| Ok::<_, std::io::Error>(vec![(i % 251) as u8; CHUNK])));
    let response = node
        .http
        .post(node.route("demo/probe", "/echo"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.bytes_stream();
    let mut received = 0usize;
    let mut expected_at = 0usize;
    while let Some(piece) = futures_util::StreamExt::next(&mut stream).await {
        let piece = piece.unwrap();
        for (offset, byte) in piece.iter().enumerate() {
            let at = expected_at + offset;
            assert_eq!(*byte, ((at / CHUNK) % 251) as u8, "byte {at}");
        }
        expected_at += piece.len();
        received += piece.len();
    }
    assert_eq!(received, CHUNK * CHUNKS);

    // Over the limit: refused before it runs when the length is declared;
    // cut as it streams when it is not (the guest's read fails).
    let small = TestNode::start_with(|c| c.http_max_body_bytes = 1 << 20).await;
    small.deploy_probe("probe", "access=public").await;
    let response =
        small.http.post(small.route("demo/probe", "/count")).body(vec![0u8; (1 << 20) + 1]).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let chunks = futures_util::stream::iter((0..3).map(|_| Ok::<_, std::io::Error>(vec![1u8; 512 << 10])));
    let response = small
        .http
        .post(small.route("demo/probe", "/count"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let text = response.text().await.unwrap();
    assert!(text.starts_with("after 1048576 bytes") || text.starts_with("after 524288 bytes"), "{text}");
    let response = small.http.post(small.route("demo/probe", "/count")).body(vec![0u8; 1 << 20]).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "1048576");
    small.stop().await;
    node.stop().await;
}

#[tokio::test]
async fn an_event_stream_reaches_the_client_as_it_is_written() {
    let node = TestNode::start().await;
    node.deploy_probe("probe", "access=public").await;
    let started = Instant::now();
    let response = node.http.get(node.route("demo/probe", "/sse?n=12&ms=100")).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let first = futures_util::StreamExt::next(&mut stream).await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(first.starts_with(b"data: 0\n\n"), "{first:?}");
    let mut all = first.to_vec();
    while let Some(piece) = futures_util::StreamExt::next(&mut stream).await {
        all.extend_from_slice(&piece.unwrap());
    }
    let last_at = started.elapsed();
    let expected: String = (0..12).map(|i| format!("data: {i}\n\n")).collect();
    assert_eq!(String::from_utf8(all).unwrap(), expected);
    // The guest sleeps 100 ms after each event: eleven sleeps came after
    // the first event reached the client.
    assert!(last_at - first_at >= Duration::from_millis(1000), "first at {first_at:?}, last at {last_at:?}");
    node.stop().await;
}

#[tokio::test]
async fn failures_after_the_head_cut_the_stream_and_are_logged() {
    let node = TestNode::start().await;
    node.deploy_probe("probe", "access=public&timeout_ms=700").await;

    // A trap after the head: the connection is cut, whether or not the
    // head had left the node (never an answer that looks whole, nor a hang).
    match node.http.get(node.route("demo/probe", "/trap")).send().await {
        Ok(response) => {
            assert_eq!(response.status(), StatusCode::OK);
            assert!(response.bytes().await.is_err(), "a trapped call's body must not end cleanly");
        }
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }

    // Still streaming at the deadline: cut, and the call's log says so.
    let response = node.http.get(node.route("demo/probe", "/sse?n=100&ms=50")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.bytes().await.is_err(), "a body cut at the deadline must not end cleanly");
    let logs = node.logs_with("demo/probe", "a response still streaming was cut").await;
    assert!(logs.contains("a response still streaming was cut"), "{logs}");
    assert!(logs.contains("a trap after the head was sent"), "{logs}");

    // No answer at all, or none in time: the node answers for it.
    let response = node.http.get(node.route("demo/probe", "/none")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["kind"], "function_error");
    let response = node.http.get(node.route("demo/probe", "/spin")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);

    // Logs of a call that answered.
    let (status, text) = node.get_text(&node.route("demo/probe", "/log")).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "logged"));
    let logs = node.logs_with("demo/probe", "a line on stderr").await;
    assert!(logs.contains("a line on stdout") && logs.contains("a line on stderr"), "{logs}");
    node.stop().await;
}

#[tokio::test]
async fn an_answer_is_held_to_its_declared_length_both_ways() {
    // A function declares a length and writes more: a second response
    // after the declared bytes. Past the length nothing may reach the
    // connection (a proxy in front may reuse it for another client's
    // request). Writing less must end the connection, not leave the client
    // waiting for bytes that never come.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start().await;
    node.deploy_probe("probe", "access=public").await;
    let address = node.fn_base.trim_start_matches("http://").to_string();
    let read_all = |mut stream: tokio::net::TcpStream| async move {
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut seen))
            .await
            .expect("the connection ends, not hangs")
            .ok();
        String::from_utf8_lossy(&seen).into_owned()
    };

    // Longer, with a second request behind it on the same connection.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let requests = format!(
        "GET /demo/probe/lie?declared=5 HTTP/1.1\r\nhost: {address}\r\n\r\n\
         GET /demo/probe/hello HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(requests.as_bytes()).await.unwrap();
    let seen = read_all(stream).await;
    assert!(!seen.contains("smuggled"), "bytes past the declared length reached the client: {seen}");
    let (head, rest) = seen.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200 OK") && head.contains("content-length: 5"), "{head}");
    // At most the declared bytes, then the next answer whole, or the end.
    let body_len = rest.find("HTTP/1.1").unwrap_or(rest.len());
    assert!(body_len <= 5 && rest[..body_len].bytes().all(|b| b == b'a'), "{rest}");
    let next = &rest[body_len..];
    assert!(next.is_empty() || (next.starts_with("HTTP/1.1 200 OK") && next.contains("hello GET /hello")), "{next}");

    // Shorter: half the declared bytes, and the connection ends.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = format!("GET /demo/probe/lie?declared=64&short=1 HTTP/1.1\r\nhost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    // Cut before its head left the node or after: never a whole answer.
    let seen = read_all(stream).await;
    if let Some((head, rest)) = seen.split_once("\r\n\r\n") {
        assert!(head.contains("content-length: 64"), "{head}");
        assert!(rest.len() < 64, "{} bytes", rest.len());
    } else {
        assert!(!seen.contains("HTTP/1.1"), "{seen}");
    }

    // And the node serves on.
    let (status, text) = node.get_text(&node.route("demo/probe", "/hello")).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "hello GET /hello"));
    node.stop().await;
}

#[tokio::test]
async fn a_call_cannot_take_the_nodes_memory_through_host_resources() {
    // Header sets live in the host's memory, outside the call's own limit:
    // a call holds at most 4,096 handles, a header set at most 32 KiB.
    let node = TestNode::start().await;
    node.deploy_probe("probe", "access=public").await;
    let (status, text) = node.get_text(&node.route("demo/probe", "/hog?n=100&kib=16")).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "100"));
    // One header set over 32 KiB: the call traps there.
    let (status, text) = node.get_text(&node.route("demo/probe", "/hog?n=10&kib=40")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(text.contains(r#""kind":"trap""#) && text.contains("total size of fields exceeds limit"), "{text}");
    // Handles without end: the call traps at the limit (unbounded, this one
    // held ~1.3 GB of the node's memory at 20,000), and the node serves on.
    let (status, text) = node.get_text(&node.route("demo/probe", "/hog?n=100000&kib=1")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(text.contains(r#""kind":"trap""#) && text.contains("resource table has no free keys"), "{text}");
    let (status, text) = node.get_text(&node.route("demo/probe", "/hello")).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "hello GET /hello"));
    node.stop().await;
}

/// An HTTP server on 127.0.0.1 for outbound requests: `/data` answers
/// `outside`, `/redirect?to=URL` redirects there.
async fn outside_server() -> (u16, tokio::task::JoinHandle<()>) {
    use axum::extract::Query;
    let app = axum::Router::new().route("/data", axum::routing::get(|| async { "outside" })).route(
        "/redirect",
        axum::routing::get(|Query(to): Query<std::collections::HashMap<String, String>>| async move {
            (axum::http::StatusCode::FOUND, [(axum::http::header::LOCATION, to["to"].clone())])
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (port, tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }))
}

#[tokio::test]
async fn outbound_requests_go_only_where_the_allow_list_says() {
    // The operator opens the loopback address the test's server is on;
    // nothing else non-public.
    let node = TestNode::start_with(|c| c.outbound_open = vec!["127.0.0.1".parse().unwrap()]).await;
    let (port, server) = outside_server().await;
    let direct = format!("http://127.0.0.1:{port}");
    node.deploy_probe("closed", "access=public").await;
    node.deploy_probe("open", &format!("access=public&allow_host=http://127.0.0.1:{port}")).await;
    node.deploy_probe("by-name", &format!("access=public&allow_host=http://localhost:{port}")).await;
    let fetch = |function: &str, url: &str, follow: bool| {
        let url = url.replace(':', "%3A").replace('/', "%2F").replace('?', "%3F").replace('=', "%3D");
        let follow = if follow { "&follow=1" } else { "" };
        node.route(function, &format!("/fetch?url={url}{follow}"))
    };

    let (_, text) = node.get_text(&fetch("demo/open", &format!("{direct}/data"), false)).await;
    assert_eq!(text, "200 outside");
    // Not on the list: denied, and the call's log names it.
    let (_, text) = node.get_text(&fetch("demo/closed", &format!("{direct}/data"), false)).await;
    assert_eq!(text, "error ErrorCode::HttpRequestDenied");
    let logs = node.logs_with("demo/closed", "refused").await;
    assert!(
        logs.contains(&format!("outbound request to {direct} refused: not on the function's allowed hosts")),
        "{logs}"
    );
    // Another port of the same address is another host.
    let (_, text) = node.get_text(&fetch("demo/open", &format!("http://127.0.0.1:{}/data", port ^ 1), false)).await;
    assert_eq!(text, "error ErrorCode::HttpRequestDenied");
    // A name on the list that resolves to a loopback address: refused by
    // the address, which only an entry naming it allows.
    let (_, text) = node.get_text(&fetch("demo/by-name", &format!("http://localhost:{port}/data"), false)).await;
    assert_eq!(text, "error ErrorCode::DestinationIpProhibited");
    let logs = node.logs_with("demo/by-name", "prohibited").await;
    assert!(logs.contains("destination IP address is prohibited"), "{logs}");
    // The v4-mapped form of an allowed address is that address; of
    // another, another.
    let (_, text) = node.get_text(&fetch("demo/open", &format!("http://[::ffff:127.0.0.2]:{port}/data"), false)).await;
    assert_eq!(text, "error ErrorCode::HttpRequestDenied");
    // A redirect to a host not on the list: the next request is checked.
    let elsewhere = format!("http://localhost:{port}/data");
    let redirect = format!("{direct}/redirect?to={elsewhere}");
    let (_, text) = node.get_text(&fetch("demo/open", &redirect, true)).await;
    assert_eq!(text, "error ErrorCode::HttpRequestDenied");
    let (_, text) = node.get_text(&fetch("demo/open", &format!("{direct}/redirect?to={direct}/data"), true)).await;
    assert_eq!(text, "200 outside");
    // The request that called the function cannot steer it: a Host header
    // naming the allowed server changes nothing for the closed function.
    let response = node
        .http
        .get(fetch("demo/closed", &format!("{direct}/data"), false))
        .header("host", format!("127.0.0.1:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "error ErrorCode::HttpRequestDenied");

    // A tenant cannot name a non-public address the operator did not open
    // (the cloud metadata service, another loopback address, a private
    // network), nor reach one through a name.
    for closed in ["http://169.254.169.254", "http://127.0.0.2:8080", "http://[::1]:80", "http://10.0.0.1"] {
        let (status, body) = node.deploy("demo/sneaky", &format!("allow_host={closed}"), PROBE).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{closed}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("not a public address"), "{body}");
    }
    // Bad entries are refused at deploy, by name.
    let (status, body) = node.deploy("demo/bad", "allow_host=example.com", PROBE).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("\"example.com\""), "{body}");
    server.abort();
    node.stop().await;
}

#[tokio::test]
async fn hello_worlds_built_for_wasmtime_serve_and_spin_run_unmodified() {
    let node = TestNode::start().await;
    for (name, wasm) in [("wstd", shoal_guests::COMPAT_WSTD), ("spin", shoal_guests::COMPAT_SPIN)] {
        let (status, body) = node.deploy(&format!("demo/{name}"), "access=public", wasm).await;
        assert_eq!(status, StatusCode::CREATED, "{name}: {body}");
        assert_eq!(body["kind"], "http", "{name}");
    }
    // What each answers under `wasmtime serve` (wstd's example and Spin's
    // template, unchanged).
    let response = node.http.get(node.route("demo/wstd", "/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "Hello, wasi:http/proxy world!\n");
    let (status, text) = node.get_text(&node.route("demo/wstd", "/elsewhere")).await;
    assert_eq!((status, text.as_str()), (StatusCode::NOT_FOUND, "not found\n"));
    let response = node.http.get(node.route("demo/spin", "/anything")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/plain");
    assert_eq!(response.text().await.unwrap(), "Hello, Fermyon");
    node.stop().await;
}

#[tokio::test]
async fn secrets_are_write_only_sealed_and_reach_the_functions_that_name_them() {
    let node = TestNode::start().await;
    let acme = node.create_tenant("acme").await;
    let beta = node.create_tenant("beta").await;
    let secret_url = |tenant: &str, name: &str| format!("{}/v1/tenants/{tenant}/secrets/{name}", node.base);
    let put = |token: &str, tenant: &str, name: &str, value: Vec<u8>| {
        node.http.put(secret_url(tenant, name)).bearer_auth(token).body(value).send()
    };
    assert_eq!(
        put(&acme, "acme", "API_KEY", b"first-value-1".to_vec()).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(put(&beta, "acme", "API_KEY", b"x".to_vec()).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(put(&acme, "acme", "bad-name", b"x".to_vec()).await.unwrap().status(), StatusCode::BAD_REQUEST);
    assert_eq!(put(&acme, "acme", "BIG", vec![b'x'; 4097]).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(put(&acme, "acme", "LATIN", b"caf\xe9".to_vec()).await.unwrap().status(), StatusCode::BAD_REQUEST);

    // A deploy names the secrets its function gets; one that does not
    // exist is refused.
    let (status, body) = node.deploy("acme/probe", "access=public&secret=MISSING", PROBE).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, described) = node.deploy("acme/probe", "access=public&secret=API_KEY", PROBE).await;
    assert_eq!(status, StatusCode::CREATED, "{described}");
    assert_eq!(described["secrets"], serde_json::json!(["API_KEY"]));
    assert!(!described.to_string().contains("first-value"), "{described}");

    let env = node.route("acme/probe", "/env?name=API_KEY");
    let config = node.route("acme/probe", "/config?name=API_KEY");
    assert_eq!(node.get_text(&env).await.1, "first-value-1");
    assert_eq!(node.get_text(&config).await.1, "first-value-1");
    assert_eq!(node.get_text(&node.route("acme/probe", "/config?name=OTHER")).await.1, "none");

    // A new value reaches the next call.
    assert_eq!(
        put(ADMIN, "acme", "API_KEY", b"second-value-2".to_vec()).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(node.get_text(&config).await.1, "second-value-2");

    // Listed by name, with who uses it: never a value.
    let listed =
        node.http.get(format!("{}/v1/tenants/acme/secrets", node.base)).bearer_auth(&acme).send().await.unwrap();
    let listed: Value = listed.json().await.unwrap();
    assert_eq!(listed["secrets"][0]["name"], "API_KEY");
    assert_eq!(listed["secrets"][0]["used_by"], serde_json::json!(["probe"]));
    assert!(!listed.to_string().contains("value-"), "{listed}");
    let response =
        node.http.get(format!("{}/v1/tenants/acme/secrets", node.base)).bearer_auth(&beta).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // Kept sealed: the node's store never holds the value in clear.
    let store = std::fs::read(node._dir.as_ref().unwrap().path().join("shoal.redb")).unwrap();
    assert!(
        !store.windows(b"second-value-2".len()).any(|w| w == b"second-value-2"),
        "a secret is in the store in clear"
    );

    // Removed: the function no longer gets it.
    let response = node.http.delete(secret_url("acme", "API_KEY")).bearer_auth(&acme).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(node.get_text(&config).await.1, "none");
    assert_eq!(node.get_text(&env).await.1, "");
    let response = node.http.delete(secret_url("acme", "API_KEY")).bearer_auth(&acme).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn requests_reach_functions_by_host_and_answers_start_before_the_body_ends() {
    let node = TestNode::start_with(|c| c.http_domain = Some("fn.example.test".into())).await;
    node.deploy_probe("probe", "access=public").await;

    // By host: NAME.TENANT.DOMAIN, the whole path the guest's.
    let response = node
        .http
        .get(format!("{}/hello?by=host", node.fn_base))
        .header("host", "probe.demo.fn.example.test:8081")
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "hello GET /hello?by=host");
    let response = node
        .http
        .get(format!("{}/hello", node.fn_base))
        .header("host", "nothing.demo.fn.example.test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // The echo's head arrives while the request body is still being sent.
    let (more, rest) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    more.send(Ok(b"first ".to_vec())).await.unwrap();
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rest, |mut rest| async move {
        rest.recv().await.map(|chunk| (chunk, rest))
    }));
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        node.http.post(node.route("demo/probe", "/echo")).body(body).send(),
    )
    .await
    .expect("the head came before the body ended")
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    more.send(Ok(b"and last".to_vec())).await.unwrap();
    drop(more);
    assert_eq!(response.text().await.unwrap(), "first and last");

    // A body the guest never reads: the answer comes all the same.
    let response = node.http.post(node.route("demo/probe", "/hello")).body(vec![7u8; 2 << 20]).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "hello POST /hello");

    // `Expect: 100-continue`: the node says continue when the guest reads.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = node.fn_base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /demo/probe/count HTTP/1.1\r\nhost: {address}\r\ncontent-length: 5\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = vec![0u8; 25];
    stream.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"12345").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    // Its answer has no length: chunked, one chunk `5`.
    assert!(answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("\r\n\r\n1\r\n5\r\n0\r\n\r\n"), "{answer}");
    node.stop().await;
}

#[tokio::test]
async fn any_kind_of_function_has_an_allow_list_and_only_http_ones_an_access() {
    // Outbound HTTP is linked for every component, not only HTTP
    // functions: any deploy may name its allowed hosts.
    let node = TestNode::start().await;
    let (status, body) = node.deploy("demo/fetcher", "allow_host=https://api.example.com", shoal_guests::HELLO).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["allowed_hosts"], serde_json::json!(["https://api.example.com"]));
    assert_eq!(body["access"], Value::Null);
    node.stop().await;
}

/// A Python HTTP function: `on_fetch(request)` with a request/response
/// pair, state, a streamed answer, outbound requests.
const PY_HTTP: &[u8] = br#"
import shoal

def on_fetch(request):
    if request.path == "/echo":
        return shoal.Response(request.body, status=201, headers={"x-method": request.method})
    if request.path == "/info":
        return shoal.Response.json({
            "method": request.method, "path": request.path, "query": request.query,
            "args": request.args, "many": request.headers.get_all("x-many"),
            "auth": request.headers.get("authorization"),
        })
    if request.path == "/count":
        return str(shoal.state.incr("hits-py"))
    if request.path == "/stream":
        return shoal.Response((f"chunk {i}\n" for i in range(3)), headers={"content-type": "text/plain"})
    if request.path == "/fetch":
        try:
            answer = shoal.fetch(request.args["url"])
        except shoal.HttpError as error:
            return shoal.Response(f"refused: {error}", status=502)
        return f"{answer.status} {answer.text()}"
    if request.path == "/fail":
        raise ValueError("on purpose")
    return shoal.Response("no route", status=404)
"#;

/// The same in JavaScript, Workers style.
const JS_HTTP: &[u8] = br#"
const shoal = require("shoal");

export default {
  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname === "/echo") {
      return new Response(await request.text(), { status: 201, headers: { "x-method": request.method } });
    }
    if (url.pathname === "/info") {
      return new Response(JSON.stringify({
        method: request.method, path: url.pathname, query: url.search,
        auth: request.headers.get("authorization"),
      }), { headers: { "content-type": "application/json" } });
    }
    if (url.pathname === "/count") return new Response(String(shoal.state.incr("hits-js")));
    if (url.pathname === "/fetch") {
      try {
        const answer = await fetch(url.searchParams.get("url"));
        return new Response(`${answer.status} ${await answer.text()}`);
      } catch (error) {
        return new Response(`refused: ${error}`, { status: 502 });
      }
    }
    if (url.pathname === "/stream") {
      let i = 0;
      const chunks = new ReadableStream({
        pull(controller) {
          if (i < 3) controller.enqueue(new TextEncoder().encode(`chunk ${i++}\n`));
          else controller.close();
        },
      });
      return new Response(chunks, { headers: { "content-type": "text/plain" } });
    }
    if (url.pathname === "/fail") throw new Error("on purpose");
    return new Response("no route", { status: 404 });
  },
};
"#;

#[tokio::test]
async fn python_and_javascript_functions_answer_http_and_fetch_behind_the_allow_list() {
    let node = TestNode::start_with(|config| {
        config.outbound_open = vec!["127.0.0.1".parse().unwrap()];
        config.python_runtime = shoal_runtime::RuntimeBinary::new(shoal_guests::PYTHON_RUNTIME);
        config.js_runtime = shoal_runtime::RuntimeBinary::new(shoal_guests::JS_RUNTIME);
        // Compiled once for every run of these tests.
        config.runtime_cache_dir = Some(concat!(env!("CARGO_TARGET_TMPDIR"), "/runtime-cache").into());
    })
    .await;
    let (port, server) = outside_server().await;
    let allowed = format!("allow_host=http://127.0.0.1:{port}");
    for (language, source) in [("python", PY_HTTP), ("javascript", JS_HTTP)] {
        let name = format!("demo/{language}-web");
        let (status, described) =
            node.deploy(&name, &format!("language={language}&access=public&{allowed}"), source).await;
        assert_eq!(status, StatusCode::CREATED, "{described}");
        assert_eq!(described["kind"], "http", "{described}");

        let response = node.http.post(node.route(&name, "/echo")).body("some body").send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{language}");
        assert_eq!(response.headers()["x-method"], "POST", "{language}");
        assert_eq!(response.text().await.unwrap(), "some body", "{language}");

        let response = node
            .http
            .get(node.route(&name, "/info?a=1&b=two"))
            .header("x-many", "one")
            .header("x-many", "two")
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{language}");
        let info: Value = response.json().await.unwrap();
        assert_eq!((info["method"].as_str(), info["path"].as_str()), (Some("GET"), Some("/info")), "{info}");
        assert!(info["query"].as_str().unwrap().ends_with("a=1&b=two"), "{info}");
        assert_eq!(info["auth"], Value::Null, "the platform token reached the guest: {info}");
        if language == "python" {
            assert_eq!(info["args"], serde_json::json!({"a": "1", "b": "two"}));
            assert_eq!(info["many"], serde_json::json!(["one", "two"]));
        }

        // State, and a fresh sandbox per request (the counter is in state,
        // not in the snapshot's globals).
        for expected in ["1", "2"] {
            let (status, text) = node.get_text(&node.route(&name, "/count")).await;
            assert_eq!((status, text.as_str()), (StatusCode::OK, expected), "{language}");
        }

        let fetch =
            |url: &str| node.route(&name, &format!("/fetch?url={}", url.replace(':', "%3A").replace('/', "%2F")));
        let (status, text) = node.get_text(&fetch(&format!("http://127.0.0.1:{port}/data"))).await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, "200 outside"), "{language}");
        // Another port is another host: refused, and the log says so.
        let (status, text) = node.get_text(&fetch(&format!("http://127.0.0.1:{}/data", port ^ 1))).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{language}: {text}");
        assert!(text.starts_with("refused"), "{language}: {text}");
        let logs = node.logs_with(&name, "refused: not on").await;
        assert!(logs.contains("refused: not on the function's allowed hosts"), "{language}: {logs}");

        // A failing handler fails the call: 500, and its error in the logs.
        let (status, _) = node.get_text(&node.route(&name, "/fail")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{language}");
        let logs = node.logs_with(&name, "on purpose").await;
        assert!(logs.contains("on purpose"), "{language}: {logs}");
    }

    // A generator (Python) or a ReadableStream (JavaScript) is sent as it
    // is produced: chunked, with no length.
    for name in ["demo/python-web", "demo/javascript-web"] {
        let response = node.http.get(node.route(name, "/stream")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{name}");
        assert!(response.content_length().is_none(), "{name} answered with a length");
        assert_eq!(response.text().await.unwrap(), "chunk 0\nchunk 1\nchunk 2\n", "{name}");
    }

    // JavaScript's other style: a fetch listener.
    let listener = br#"addEventListener("fetch", (event) => event.respondWith(new Response("from a listener")));"#;
    let (status, described) = node.deploy("demo/listener", "language=javascript&access=public", listener).await;
    assert_eq!((status, described["kind"].as_str()), (StatusCode::CREATED, Some("http")), "{described}");
    let (_, text) = node.get_text(&node.route("demo/listener", "/")).await;
    assert_eq!(text, "from a listener");

    // Bytes functions of both languages reach the same allow-list.
    let py_bytes =
        format!("import shoal\ndef handle(input):\n    return shoal.fetch('http://127.0.0.1:{port}/data').body\n");
    let js_bytes = format!("exports.handle = async () => (await fetch('http://127.0.0.1:{port}/data')).text();\n");
    for (language, source) in [("python", py_bytes), ("javascript", js_bytes)] {
        let name = format!("demo/{language}-fetcher");
        let (status, body) = node.deploy(&name, &format!("language={language}&{allowed}"), source.as_bytes()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, output) = node.invoke(&name, b"").await;
        assert_eq!((status, String::from_utf8_lossy(&output).as_ref()), (StatusCode::OK, "outside"), "{language}");
        let (status, _) = node.deploy(&name, &format!("language={language}"), source.as_bytes()).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, output) = node.invoke(&name, b"").await;
        assert_ne!(
            status,
            StatusCode::OK,
            "{language} reached a host off its list: {}",
            String::from_utf8_lossy(&output)
        );
    }
    server.abort();
    node.stop().await;
}
