//! What the web console is served with and the API it reads: `/console`
//! under a strict Content-Security-Policy, `whoami`, the admin's tenants
//! and nodes, a function's recent calls and rates, and a tenant's
//! asynchronous calls by status — each scoped like every other route.

use super::*;
use std::time::{Duration, Instant};

async fn get_as(node: &TestNode, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    status_and_json(node.req(reqwest::Method::GET, path, token).send().await.unwrap()).await
}

#[tokio::test]
async fn the_console_is_served_whole_under_a_strict_policy() {
    let node = TestNode::start().await;
    for (path, content_type) in [
        ("/console", "text/html"),
        ("/console/", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let response = node.req(reqwest::Method::GET, path, None).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers();
        assert!(headers["content-type"].to_str().unwrap().starts_with(content_type), "{path}");
        let policy = headers["content-security-policy"].to_str().unwrap();
        for needed in ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"] {
            assert!(policy.contains(needed), "{path}: {policy}");
        }
        assert!(!policy.contains("unsafe"), "{path}: {policy}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let body = response.text().await.unwrap();
        // Nothing is fetched from elsewhere: no URL but the SVG namespace.
        let elsewhere: Vec<&str> = body
            .match_indices("http")
            .map(|(at, _)| &body[at..(at + 40).min(body.len())])
            .filter(|url| url.starts_with("http://") || url.starts_with("https://"))
            .filter(|url| !url.starts_with("http://www.w3.org/2000/svg"))
            .collect();
        assert!(elsewhere.is_empty(), "{path} names {elsewhere:?}");
        // Output is written as text: the script never parses markup.
        if path.ends_with(".js") {
            for risky in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
                assert!(!body.contains(risky), "app.js uses {risky}");
            }
        }
    }
    let (status, body) = get_as(&node, "/console/secrets.txt", None).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    node.stop().await;
}

#[tokio::test]
async fn whoami_and_the_admins_views_of_tenants_and_nodes() {
    let node = TestNode::start().await;
    let acme = node.create_tenant("acme").await;
    assert_eq!(
        get_as(&node, "/v1/whoami", Some(ADMIN)).await.1,
        serde_json::json!({ "admin": true, "tenant": null, "trace_link": null })
    );
    assert_eq!(
        get_as(&node, "/v1/whoami", Some(&acme)).await.1,
        serde_json::json!({ "admin": false, "tenant": "acme", "trace_link": null })
    );
    let (status, body) = get_as(&node, "/v1/whoami", Some("acme.wrong")).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));

    let put = node
        .req(reqwest::Method::PUT, "/v1/tenants/acme/limits", Some(ADMIN))
        .json(&serde_json::json!({ "weight": 3, "sandboxes": 5 }))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let tenants = node.get_json("/v1/tenants").await;
    let names: Vec<&str> = tenants["tenants"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme", "demo"]);
    let acme_view = &tenants["tenants"][0];
    assert_eq!(acme_view["status"], "active");
    assert_eq!(acme_view["functions"], 0);
    assert_eq!(acme_view["limits"]["set"]["weight"], 3);
    assert_eq!(acme_view["limits"]["effective"]["sandboxes"], 5);
    assert_eq!(tenants["tenants"][1]["limits"]["effective"]["weight"], 1, "the default");
    assert!(tenants["tenants"][1]["functions"].as_u64().unwrap() >= 9);

    let cluster = node.get_json("/v1/cluster").await;
    assert_eq!(cluster["clustered"], false);
    let members = cluster["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!((members[0]["this_node"].as_bool(), members[0]["capacity"].as_u64()), (Some(true), Some(8)));

    // A tenant sees neither the other tenants nor the nodes.
    for path in ["/v1/tenants", "/v1/cluster"] {
        let (status, body) = get_as(&node, path, Some(&acme)).await;
        assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{path}");
        let (status, _) = get_as(&node, path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_functions_recent_calls_and_rates_are_its_tenants_alone() {
    let node = TestNode::start().await;
    let acme = node.create_tenant("acme").await;
    let mut ids = Vec::new();
    for input in ["a", "b", "c"] {
        let response = node
            .req(reqwest::Method::POST, "/v1/functions/demo/echo/invoke", Some(ADMIN))
            .body(input)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        ids.push(response.headers()["x-shoal-call-id"].to_str().unwrap().to_string());
    }
    assert_error(node.invoke("demo/misbehave", b"panic").await, StatusCode::INTERNAL_SERVER_ERROR, "trap");

    let echo = node.get_json("/v1/functions/demo/echo/calls").await;
    let listed: Vec<&str> = echo["calls"].as_array().unwrap().iter().map(|c| c["call_id"].as_str().unwrap()).collect();
    ids.reverse();
    assert_eq!(listed, ids, "newest first");
    let first = &echo["calls"][0];
    assert_eq!(first["outcome"], "ok");
    assert!(first["duration_us"].as_u64().unwrap() > 0, "{first}");
    assert!(first["cpu_us"].as_u64().is_some(), "{first}");
    assert_eq!((echo["slot_seconds"].as_u64(), echo["series"].as_array().unwrap().len()), (Some(10), 30));
    let slots_calls: u64 = echo["series"].as_array().unwrap().iter().map(|s| s["calls"].as_u64().unwrap()).sum();
    assert_eq!(slots_calls, 3);
    assert_eq!(echo["last_minute"]["calls"], 3);
    assert_eq!(echo["last_minute"]["error_rate"], 0.0);
    assert!(echo["last_minute"]["p50_ms"].as_f64().unwrap() > 0.0);

    let misbehave = node.get_json("/v1/functions/demo/misbehave/calls").await;
    assert_eq!(misbehave["calls"][0]["outcome"], "trap");
    assert_eq!(misbehave["last_minute"]["error_rate"], 1.0);

    // The list carries each function's last minute and its calls per slot.
    let list = node.get_json("/v1/functions/demo").await;
    let echo_row = list["functions"].as_array().unwrap().iter().find(|f| f["name"] == "echo").unwrap();
    assert_eq!(echo_row["activity"]["calls"], 3);
    assert_eq!(echo_row["activity"]["calls_series"].as_array().unwrap().len(), 30);

    // A redeploy keeps the history, like the logs.
    let (status, _) = node.deploy("demo/echo", "memory_mb=32", shoal_guests::ECHO).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(node.get_json("/v1/functions/demo/echo/calls").await["calls"].as_array().unwrap().len(), 3);

    // Another tenant: the same 404 as a function that does not exist.
    let (status, body) = get_as(&node, "/v1/functions/demo/echo/calls", Some(&acme)).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let (status, _) = get_as(&node, "/v1/functions/demo/nothing/calls", Some(ADMIN)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn a_tenants_async_calls_are_listed_by_status() {
    async_calls_listed(TestNode::start().await).await;
}

#[tokio::test]
async fn a_tenants_async_calls_are_listed_by_status_in_a_cluster() {
    let redis = RedisServer::start();
    async_calls_listed(TestNode::start_with(|c| c.redis_url = Some(redis.url().into())).await).await;
}

async fn async_calls_listed(node: TestNode) {
    let acme = node.create_tenant("acme").await;
    let rival = node.create_tenant("rival").await;
    for tenant in ["acme", "rival"] {
        let (status, _) = node.deploy(&format!("{tenant}/echo"), "", shoal_guests::ECHO).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, _) = node.deploy(&format!("{tenant}/fib"), "", shoal_guests::FIB).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let submit = |token: &str, function: &str, input: &'static str| {
        let request = node
            .req(reqwest::Method::POST, &format!("/v1/functions/{function}/invoke?async=true"), Some(token))
            .body(input);
        async move {
            let (status, body) = status_and_json(request.send().await.unwrap()).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
            body["call_id"].as_str().unwrap().to_string()
        }
    };
    let mut acme_ids = Vec::new();
    for input in ["1", "2", "3"] {
        acme_ids.push(submit(&acme, "acme/echo", input).await);
    }
    acme_ids.push(submit(&acme, "acme/fib", "not a number").await);
    let rival_id = submit(&rival, "rival/echo", "theirs").await;

    // Wait until all of acme's have finished.
    let started = Instant::now();
    let listed = loop {
        let (status, body) = get_as(&node, "/v1/calls", Some(&acme)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let calls = body["calls"].as_array().unwrap().clone();
        if calls.len() == 4 && calls.iter().all(|c| matches!(c["status"].as_str(), Some("succeeded" | "failed"))) {
            break calls;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never finished: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ids: Vec<&str> = listed.iter().map(|c| c["call_id"].as_str().unwrap()).collect();
    let mut newest_first: Vec<&str> = acme_ids.iter().map(String::as_str).collect();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids, newest_first, "acme's four, newest first, none of rival's");
    assert!(listed.iter().all(|c| c["function"].as_str().unwrap().starts_with("acme/")));
    assert!(listed.iter().all(|c| c.get("output").is_none()), "a listing carries no outputs");

    let by_status = |token: String, query: &'static str| {
        let request = node.req(reqwest::Method::GET, &format!("/v1/calls?{query}"), Some(&token));
        async move { status_and_json(request.send().await.unwrap()).await }
    };
    let (_, failed) = by_status(acme.clone(), "status=failed").await;
    let failed = failed["calls"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0]["call_id"].as_str(), failed[0]["error"]["kind"].as_str()),
        (Some(acme_ids[3].as_str()), Some("function_error"))
    );
    let (_, succeeded) = by_status(acme.clone(), "status=succeeded&limit=2").await;
    assert_eq!(succeeded["calls"].as_array().unwrap().len(), 2, "limit holds");
    let (_, queued) = by_status(acme.clone(), "status=queued").await;
    assert_eq!(queued["calls"], serde_json::json!([]));

    // The admin names the tenant; a tenant names only itself.
    let (_, theirs) = by_status(ADMIN.to_string(), "tenant=rival").await;
    let theirs: Vec<&str> =
        theirs["calls"].as_array().unwrap().iter().map(|c| c["call_id"].as_str().unwrap()).collect();
    assert_eq!(theirs, [rival_id.as_str()]);
    for (token, query, status, kind) in [
        (acme.clone(), "tenant=rival", StatusCode::FORBIDDEN, "forbidden"),
        (ADMIN.to_string(), "status=done", StatusCode::BAD_REQUEST, "bad_request"),
        (ADMIN.to_string(), "tenant=acme&limit=0", StatusCode::BAD_REQUEST, "bad_request"),
        (ADMIN.to_string(), "tenant=acme&limit=1001", StatusCode::BAD_REQUEST, "bad_request"),
        (ADMIN.to_string(), "tenant=acme&colour=red", StatusCode::BAD_REQUEST, "bad_request"),
        (ADMIN.to_string(), "", StatusCode::BAD_REQUEST, "bad_request"),
        (ADMIN.to_string(), "tenant=Not%20A%20Name", StatusCode::BAD_REQUEST, "bad_request"),
    ] {
        let (got, body) = by_status(token, query).await;
        assert_eq!((got, body["error"]["kind"].as_str()), (status, Some(kind)), "?{query}: {body}");
    }
    node.stop().await;
}
