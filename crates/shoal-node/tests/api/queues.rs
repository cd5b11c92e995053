//! Queues on one node: 100,000 messages through a consumer that asks to
//! retry one in ten at random — every message handled at least once,
//! duplicates counted, poison messages dead after their attempts, then
//! redriven; limits and scoping. (Across `kill -9`: `cli.rs` in shoal-cli.)

use super::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

async fn send_json(
    node: &TestNode,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Value,
) -> (StatusCode, Value) {
    status_and_json(node.req(method, path, Some(token)).json(&body).send().await.unwrap()).await
}

/// How many times each message id was handled, from the consumer's
/// `seen/…` state keys.
async fn handled(node: &TestNode, token: &str) -> HashMap<String, usize> {
    let (status, listed) =
        status_and_json(node.req(reqwest::Method::GET, "/v1/state/acme", Some(token)).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let mut counts = HashMap::new();
    for key in listed["keys"].as_array().unwrap() {
        let key = key["key"].as_str().unwrap();
        if !key.starts_with("seen/") {
            continue;
        }
        let path = format!("/v1/state/acme/{}", key.replace('/', "%2F"));
        let lines = node.req(reqwest::Method::GET, &path, Some(token)).send().await.unwrap().text().await.unwrap();
        for id in lines.lines() {
            *counts.entry(id.to_string()).or_default() += 1;
        }
    }
    counts
}

async fn queue(node: &TestNode, token: &str) -> Value {
    queue_named(node, token, "work").await
}

async fn queue_named(node: &TestNode, token: &str, name: &str) -> Value {
    let path = format!("/v1/queues/acme/{name}");
    let (status, view) =
        status_and_json(node.req(reqwest::Method::GET, &path, Some(token)).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view
}

#[tokio::test]
async fn a_hundred_thousand_messages_are_each_handled_and_poison_ends_in_the_dead_letters() {
    let node = TestNode::start_with(|c| c.max_body_bytes = 1 << 20).await;
    let acme = node.create_tenant("acme").await;
    assert_eq!(node.deploy("acme/consume", "", shoal_guests::QUEUE_CONSUMER).await.0, StatusCode::CREATED);
    let spec = serde_json::json!({
        "consumer": "consume", "batch_size": 100, "batch_wait_ms": 20, "max_attempts": 8,
        "retry_delay_ms": 10, "concurrency": 4,
    });
    let (status, view) = send_json(&node, reqwest::Method::PUT, "/v1/queues/acme/work", &acme, spec).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    // 100,000 messages in sends of 1,000, 20 of them poison. (A message the
    // consumer refuses at random 8 times in a row, 1 in 10^8, would die too.)
    let started = Instant::now();
    let mut ids = Vec::new();
    let mut poison = Vec::new();
    for send in 0..100 {
        let messages: Vec<Value> = (0..1000)
            .map(|i| {
                let n = send * 1000 + i;
                let body = if n % 5000 == 1234 { format!("poison {n}") } else { format!("m{n}") };
                serde_json::json!({ "body": body })
            })
            .collect();
        let (status, sent) = send_json(
            &node,
            reqwest::Method::POST,
            "/v1/queues/acme/work/messages",
            &acme,
            serde_json::json!({ "messages": messages }),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
        for (i, id) in sent["ids"].as_array().unwrap().iter().enumerate() {
            let id = id.as_str().unwrap().to_string();
            if (send * 1000 + i) % 5000 == 1234 {
                poison.push(id.clone());
            }
            ids.push(id);
        }
    }
    let sent_in = started.elapsed();
    assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), 100_000, "ids are unique");
    // Drained: nothing waits or runs; the poison is dead.
    let view = loop {
        let view = queue(&node, &acme).await;
        if view["messages"] == 0 && view["batches_running"] == 0 {
            break view;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "not drained: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let drained_in = started.elapsed();
    assert_eq!(view["dead"], 20, "{view}");
    assert_eq!(view["acked"], 100_000 - 20, "{view}");
    assert_eq!(view["delivery_ms"]["count"], 100_000, "each first attempt timed: {view}");
    assert!(view["delivery_ms"]["p99"].as_f64().unwrap() >= view["delivery_ms"]["p50"].as_f64().unwrap());
    assert!(view["retried"].as_u64().unwrap() >= 5_000, "about a tenth retried at least once: {view}");
    // Every message handled at least once; the poison never.
    let counts = handled(&node, &acme).await;
    let missing: Vec<&String> = ids.iter().filter(|id| !poison.contains(id) && !counts.contains_key(*id)).collect();
    assert!(missing.is_empty(), "{} never handled, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    assert!(poison.iter().all(|id| !counts.contains_key(id)));
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "queues: 100,000 sent in {sent_in:?}, drained in {drained_in:?}; {} retried, {duplicates} handled twice",
        view["retried"]
    );
    // A lease never ran out here (each batch ends well within it): no message was handled twice.
    assert_eq!(duplicates, 0);

    // The dead letters: each poison message, its attempts and why.
    let (status, dead) =
        send_json(&node, reqwest::Method::GET, "/v1/queues/acme/work/dead?limit=100", &acme, Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{dead}");
    let letters = dead["dead"].as_array().unwrap();
    assert_eq!(letters.len(), 20);
    for letter in letters {
        assert!(poison.contains(&letter["id"].as_str().unwrap().to_string()), "{letter}");
        assert_eq!(letter["attempts"], 8, "{letter}");
        assert_eq!(letter["error"], "the consumer asked to retry it", "{letter}");
    }
    // Redriven, they come back and die again; purged, they are gone.
    let (_, redriven) =
        send_json(&node, reqwest::Method::POST, "/v1/queues/acme/work/dead/redrive", &acme, Value::Null).await;
    assert_eq!(redriven["redriven"], 20);
    let again = Instant::now();
    while queue(&node, &acme).await["dead"] != 20 || queue(&node, &acme).await["messages"] != 0 {
        assert!(again.elapsed() < Duration::from_secs(60), "{}", queue(&node, &acme).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queue(&node, &acme).await["died"], 40);
    let (_, purged) = send_json(&node, reqwest::Method::DELETE, "/v1/queues/acme/work/dead", &acme, Value::Null).await;
    assert_eq!(purged["purged"], 20);
    assert_eq!(queue(&node, &acme).await["dead"], 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_are_bounded_checked_and_their_tenants_own() {
    let node = TestNode::start_with(|c| {
        c.queue_limits = shoal_node::QueueLimits { messages_per_tenant: 50, message_bytes: 1000, ..Default::default() };
        // Python and JavaScript functions send too (the runtimes compiled
        // once for every test run).
        c.python_runtime = shoal_runtime::RuntimeBinary::new(shoal_guests::PYTHON_RUNTIME);
        c.js_runtime = shoal_runtime::RuntimeBinary::new(shoal_guests::JS_RUNTIME);
        c.runtime_cache_dir = Some(concat!(env!("CARGO_TARGET_TMPDIR"), "/runtime-cache").into());
    })
    .await;
    let acme = node.create_tenant("acme").await;
    let rival = node.create_tenant("rival").await;
    assert_eq!(node.deploy("acme/consume", "", shoal_guests::QUEUE_CONSUMER).await.0, StatusCode::CREATED);
    let put = |token: &str, path: &str, body: Value| {
        let (node, token, path) = (&node, token.to_string(), path.to_string());
        async move { send_json(node, reqwest::Method::PUT, &path, &token, body).await }
    };
    for (body, status) in [
        (serde_json::json!({ "consumer": "nosuch" }), StatusCode::NOT_FOUND),
        (serde_json::json!({ "consumer": "consume", "batch_size": 0 }), StatusCode::BAD_REQUEST),
        (serde_json::json!({ "consumer": "consume", "concurrency": 99 }), StatusCode::BAD_REQUEST),
        (serde_json::json!({ "consumer": "consume", "visibility_timeout_ms": 10 }), StatusCode::BAD_REQUEST),
        (serde_json::json!({ "consumer": "consume", "surprise": 1 }), StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(put(&acme, "/v1/queues/acme/q", body.clone()).await.0, status, "{body}");
    }
    // Paused by a consumer that fails every batch: messages stay queued.
    let spec =
        serde_json::json!({ "consumer": "consume", "batch_size": 10, "batch_wait_ms": 60000, "retry_delay_ms": 60000 });
    assert_eq!(put(&acme, "/v1/queues/acme/q", spec.clone()).await.0, StatusCode::CREATED);
    assert_eq!(put(&acme, "/v1/queues/acme/q", spec).await.0, StatusCode::OK);
    // Bodies of `fail` fail their batch (retried a minute later): nothing drains.
    let send = |token: &str, n: usize, body: String| {
        let messages: Vec<Value> = (0..n).map(|_| serde_json::json!({ "body": body })).collect();
        let (node, token) = (&node, token.to_string());
        async move {
            send_json(
                node,
                reqwest::Method::POST,
                "/v1/queues/acme/q/messages",
                &token,
                serde_json::json!({ "messages": messages }),
            )
            .await
        }
    };
    let fail = || "fail".to_string();
    assert_eq!(send(&acme, 1, "x".repeat(1001)).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(send(&acme, 40, fail()).await.0, StatusCode::ACCEPTED);
    let (status, full) = send(&acme, 11, fail()).await;
    assert_eq!((status, full["error"]["kind"].as_str()), (StatusCode::INSUFFICIENT_STORAGE, Some("limit_exceeded")));
    assert_eq!(send(&acme, 10, fail()).await.0, StatusCode::ACCEPTED, "exactly the limit");
    let (status, _) = send(&acme, 0, fail()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an empty send");
    // Another tenant neither sees nor sends nor drains acme's queue.
    assert_eq!(send(&rival, 1, fail()).await.0, StatusCode::FORBIDDEN);
    for path in ["/v1/queues/acme", "/v1/queues/acme/q", "/v1/queues/acme/q/dead"] {
        assert_eq!(
            node.req(reqwest::Method::GET, path, Some(&rival)).send().await.unwrap().status(),
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        put(&rival, "/v1/queues/rival/steal", serde_json::json!({ "consumer": "consume" })).await.0,
        StatusCode::NOT_FOUND
    );
    // A function sends to its own tenant's queues through the host
    // interface: ids back, the same limits, a missing queue named.
    assert_eq!(node.deploy("acme/ops", "", shoal_guests::STATE_OPS).await.0, StatusCode::CREATED);
    let (status, out) = node.invoke_as(&acme, "acme/ops", b"qsend q fail").await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the tenant is at its limit: {}",
        String::from_utf8_lossy(&out)
    );
    assert!(String::from_utf8_lossy(&out).contains("LimitExceeded"), "{}", String::from_utf8_lossy(&out));
    let (status, out) = node.invoke_as(&acme, "acme/ops", b"qsend nosuch x").await;
    assert!(status == StatusCode::INTERNAL_SERVER_ERROR && String::from_utf8_lossy(&out).contains("NotFound"));
    // The same from Python and JavaScript: at the limit, each language's error.
    let python = b"import shoal\ndef handle(i):\n    try:\n        return shoal.queue.send('q', i).encode()\n    except shoal.LimitExceeded:\n        return b'full'\n";
    let (status, body) = node.deploy("acme/py", "language=python", python).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let js = b"const shoal = require('shoal');\nexports.handle = (i) => { try { return shoal.queue.send('q', i); } catch (e) { return e.kind; } };";
    let (status, body) = node.deploy("acme/js", "language=javascript", js).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(node.invoke_as(&acme, "acme/py", b"fail").await, (StatusCode::OK, b"full".to_vec()));
    assert_eq!(node.invoke_as(&acme, "acme/js", b"fail").await, (StatusCode::OK, b"limit-exceeded".to_vec()));
    // Removing the queue frees what it held.
    let removal = node.req(reqwest::Method::DELETE, "/v1/queues/acme/q", Some(&acme)).send().await.unwrap();
    assert_eq!(removal.status(), StatusCode::NO_CONTENT);
    let spec = serde_json::json!({ "consumer": "consume", "batch_wait_ms": 60000 });
    assert_eq!(put(&acme, "/v1/queues/acme/q", spec).await.0, StatusCode::CREATED);
    assert_eq!(send(&acme, 47, fail()).await.0, StatusCode::ACCEPTED, "the removed queue's messages no longer count");
    for function in ["acme/py", "acme/js"] {
        let (status, id) = node.invoke_as(&acme, function, b"fail").await;
        assert_eq!((status, id.len()), (StatusCode::OK, 16), "{function}: {}", String::from_utf8_lossy(&id));
    }
    let (status, id) = node.invoke_as(&acme, "acme/ops", b"qsend q fail").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&id));
    assert_eq!(id.len(), 16, "a message id: {}", String::from_utf8_lossy(&id));
    assert_eq!(queue_named(&node, &acme, "q").await["messages"], 50, "sent by the guest");
    node.stop().await;
}
