//! Tracing: the spans of calls, received over OTLP/HTTP by a real receiver
//! decoding the OpenTelemetry protocol types, checked as trees.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_testkit::{OtlpReceiver, ReceivedSpan};

use super::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// `POST path` as the admin, with a `traceparent` if given.
async fn post(
    node: &TestNode,
    path: &str,
    traceparent: Option<String>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = node.req(reqwest::Method::POST, path, Some(ADMIN)).body(body);
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    request.send().await.unwrap()
}

/// The spans of `trace`, once at least `n` came.
async fn spans_of(receiver: &Arc<OtlpReceiver>, trace: &str, n: usize) -> Vec<ReceivedSpan> {
    let (receiver, trace) = (receiver.clone(), trace.to_string());
    tokio::task::spawn_blocking(move || receiver.wait_for(&trace, Duration::from_secs(20), |s| s.len() >= n))
        .await
        .unwrap()
}

fn children<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.parent_id == parent.span_id).collect()
}

fn child<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan, name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = children(spans, parent).into_iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} under {:?}: {spans:#?}", parent.name);
    found[0]
}

/// A call's span has its queue, instantiate and run spans, in order and
/// within it.
fn check_call<'a>(spans: &'a [ReceivedSpan], call: &ReceivedSpan, function: &str) -> &'a ReceivedSpan {
    assert_eq!(call.attr("shoal.tenant"), Some("demo"), "{call:?}");
    assert_eq!(call.attr("shoal.function"), Some(function), "{call:?}");
    assert_eq!(call.attr("shoal.outcome"), Some("ok"), "{call:?}");
    assert!(
        call.attr("shoal.call_id").is_some_and(|id| id.len() >= 16 && id.bytes().all(|b| b.is_ascii_alphanumeric())),
        "{call:?}"
    );
    let queue = child(spans, call, "queue");
    let instantiate = child(spans, call, "instantiate");
    let run = child(spans, call, "run");
    assert!(
        queue.end_unix_nano <= instantiate.start_unix_nano + 1_000
            && instantiate.end_unix_nano <= run.start_unix_nano + 1_000
    );
    assert!(
        call.start_unix_nano <= queue.start_unix_nano && run.end_unix_nano <= call.end_unix_nano + 1_000_000,
        "{call:?} {run:?}"
    );
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_reduce_is_one_trace_of_its_chained_calls_and_state_operations_have_spans() {
    let receiver = Arc::new(OtlpReceiver::start());
    let node = TestNode::start_with(|config| {
        config.otlp_endpoint = Some(receiver.endpoint());
        config.trace_state_ops_over = Duration::ZERO;
        config.max_body_bytes = 8 << 20;
    })
    .await;

    // ~5 MiB of text: the reducer spawns two mappers (4 MiB pieces). The
    // caller's traceparent is honoured: the call joins its trace.
    let text = "the quick brown fox jumps over the lazy dog\n".repeat((5 << 20) / 44);
    let response =
        post(&node, "/v1/functions/demo/wordcount/invoke", Some(format!("00-{TRACE}-{PARENT}-01")), text).await;
    assert_eq!(response.status(), StatusCode::OK);
    let call_id = response.headers()["x-shoal-call-id"].to_str().unwrap().to_string();
    let counts: Value = response.json().await.unwrap();
    assert_eq!(counts["fox"], (5 << 20) / 44, "{counts}");

    // The request (4 spans) and two mappers (4 each).
    let spans = spans_of(&receiver, TRACE, 12).await;
    assert_eq!(spans.len(), 12, "{spans:#?}");
    let by_id: BTreeMap<&str, &ReceivedSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    assert_eq!(by_id.len(), spans.len(), "span ids are unique");
    let roots: Vec<_> = spans.iter().filter(|s| !by_id.contains_key(s.parent_id.as_str())).collect();
    assert_eq!(roots.len(), 1, "one tree: {spans:#?}");
    let request = roots[0];
    assert_eq!((request.parent_id.as_str(), request.kind), (PARENT, 2), "under the caller's span, a server span");
    assert_eq!(request.name, "POST /v1/functions/{tenant}/{name}/invoke");
    assert_eq!(request.attr("http.response.status_code"), Some("200"));
    assert_eq!(request.attr("shoal.call_id"), Some(call_id.as_str()));
    assert!(request.instance == "single" && !request.failed, "{request:?}");
    let run = check_call(&spans, request, "wordcount");
    let mappers = children(&spans, run);
    assert_eq!(mappers.len(), 2, "the spawned mappers hang under the reducer's run: {spans:#?}");
    for mapper in mappers {
        assert_eq!(mapper.name, "call demo/wordcount");
        assert_eq!(mapper.kind, 1);
        check_call(&spans, mapper, "wordcount");
        assert!(mapper.start_unix_nano >= run.start_unix_nano && mapper.end_unix_nano <= run.end_unix_nano + 1_000_000);
    }

    // A call with no traceparent starts a trace of its own (sampled: the
    // ratio is 1); its state operations have spans under its run, with
    // their keys; its log lines carry its trace id.
    assert_eq!(node.deploy("demo/ops", "", shoal_guests::STATE_OPS).await.0, StatusCode::CREATED);
    let response = post(&node, "/v1/functions/demo/ops/invoke", None, "set k v\npush k\nget k").await;
    assert_eq!(response.status(), StatusCode::OK);
    let call_id = response.headers()["x-shoal-call-id"].to_str().unwrap().to_string();
    let trace = {
        let receiver = receiver.clone();
        let id = call_id.clone();
        tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            loop {
                let found = receiver.spans().into_iter().find(|s| s.attr("shoal.call_id") == Some(id.as_str()));
                if let Some(span) = found {
                    break span.trace_id;
                }
                assert!(start.elapsed() < Duration::from_secs(20), "no span of call {id}");
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
        .unwrap()
    };
    let spans = spans_of(&receiver, &trace, 7).await;
    let request = spans.iter().find(|s| s.parent_id.is_empty()).expect("a root span");
    let run = check_call(&spans, request, "ops");
    let state: Vec<(&str, Option<&str>)> =
        children(&spans, run).iter().map(|s| (s.name.as_str(), s.attr("shoal.state.key"))).collect();
    let mut state = state;
    state.sort();
    assert_eq!(state, [("state get", Some("k")), ("state push", Some("k")), ("state set", Some("k"))]);

    let response =
        post(&node, "/v1/functions/demo/misbehave/invoke", Some(format!("00-{TRACE}-{PARENT}-01")), "log").await;
    assert_eq!(response.status(), StatusCode::OK);
    let logs = node.get_json("/v1/functions/demo/misbehave/logs").await;
    let lines = logs["lines"].as_array().unwrap();
    assert!(!lines.is_empty() && lines.iter().all(|l| l["trace_id"] == TRACE), "{logs}");
    // Following from the last line waits, and gets nothing new; bad
    // parameters are named.
    let last = lines.last().unwrap()["seq"].as_u64().unwrap();
    let none = node.get_json(&format!("/v1/functions/demo/misbehave/logs?after={last}&wait=1")).await;
    assert_eq!(none["lines"].as_array().map(Vec::len), Some(0), "{none}");
    for bad in ["after=x", "wait=-1", "follow=1"] {
        let path = format!("/v1/functions/demo/misbehave/logs?{bad}");
        let response = node.req(reqwest::Method::GET, &path, Some(ADMIN)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }

    // An asynchronous call's run hangs under the request that made it.
    let response =
        post(&node, "/v1/functions/demo/hello/invoke?async=true", Some(format!("00-{TRACE}-{PARENT}-01")), "x").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let spans = spans_of(&receiver, TRACE, 12 + 4 + 1 + 4).await;
    let accepted = spans
        .iter()
        .find(|s| s.parent_id == PARENT && s.attr("http.response.status_code") == Some("202"))
        .expect("the accepting request's span");
    let run = spans.iter().find(|s| s.name == "async demo/hello").expect("the async call's span");
    assert_eq!(run.parent_id, accepted.span_id);
    check_call(&spans, run, "hello");

    // A caller that did not sample its trace gets no spans here.
    let quiet = "0af7651916cd43dd8448eb211c80319c";
    let response =
        post(&node, "/v1/functions/demo/hello/invoke", Some(format!("00-{quiet}-b7ad6b7169203331-00")), "x").await;
    assert_eq!(response.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(receiver.spans().iter().all(|s| s.trace_id != quiet));
    node.stop().await;
}

#[tokio::test]
async fn an_unreachable_collector_costs_calls_nothing_and_drops_are_counted() {
    // Nothing listens on the endpoint, and the queue holds 4 spans.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let node = TestNode::start_with(|config| {
        config.otlp_endpoint = Some(format!("http://127.0.0.1:{port}"));
        config.trace_queue = 4;
    })
    .await;
    for _ in 0..20 {
        assert_eq!(node.invoke("demo/hello", b"x").await.0, StatusCode::OK);
    }
    // 4 spans a call: each either lost with its failed export or dropped
    // from the full queue, and counted.
    let start = std::time::Instant::now();
    loop {
        let lost = metric(&node, "shoal_trace_spans_failed_total").await
            + metric(&node, "shoal_trace_spans_dropped_total").await;
        assert!(lost <= 80);
        if lost == 80 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{lost} of 80 spans counted lost");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&node, "shoal_trace_spans_exported_total").await, 0);
    node.stop().await;
}
