//! Versions and aliases on one node: every deploy a numbered version,
//! `NAME@N` and `NAME@ALIAS` callable, old versions collected unless an
//! alias routes to them, `latest` pinned and moved back by a deploy, a
//! weighted split landing within ±2% over 10,000 calls and sticking by
//! the route key, all kept across a restart. (Across a cluster, a rollback
//! under load: `cluster.rs` in shoal-cli.)

use super::*;

async fn call(node: &TestNode, token: &str, reference: &str, key: Option<&str>) -> (StatusCode, String) {
    let mut request = node.req(reqwest::Method::POST, &format!("/v1/functions/{reference}/invoke"), Some(token));
    if let Some(key) = key {
        request = request.header("x-shoal-route-key", key);
    }
    let response = request.body("x").send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

async fn set_alias(node: &TestNode, token: &str, function: &str, alias: &str, body: Value) -> (StatusCode, Value) {
    let path = format!("/v1/functions/{function}/aliases/{alias}");
    status_and_json(node.req(reqwest::Method::PUT, &path, Some(token)).json(&body).send().await.unwrap()).await
}

async fn versions(node: &TestNode, token: &str, function: &str) -> Vec<(u64, Vec<String>)> {
    let path = format!("/v1/functions/{function}/versions");
    let (status, listed) =
        status_and_json(node.req(reqwest::Method::GET, &path, Some(token)).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    listed["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let aliases = v["aliases"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
            (v["version"].as_u64().unwrap(), aliases)
        })
        .collect()
}

async fn deploy_as(node: &TestNode, token: &str, function: &str, wasm: &[u8]) -> u64 {
    let response = node
        .req(reqwest::Method::PUT, &format!("/v1/functions/{function}"), Some(token))
        .body(wasm.to_vec())
        .send()
        .await;
    let (status, body) = status_and_json(response.unwrap()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["version"].as_u64().unwrap()
}

const V_HELLO: &str = "hello x";
const V_ECHO: &str = "x";

#[tokio::test]
async fn every_deploy_is_a_version_callable_by_number_and_old_ones_go_unless_aliased() {
    let dir = tempfile::tempdir().unwrap();
    let acme;
    {
        let node = TestNode::start_in(NodeConfig { max_versions: 3, ..config(dir.path()) }).await;
        acme = node.create_tenant("acme").await;
        let rival = node.create_tenant("rival").await;
        // Versions 1 to 3, alternating two binaries.
        for (n, wasm) in [(1, shoal_guests::HELLO), (2, shoal_guests::ECHO), (3, shoal_guests::HELLO)] {
            assert_eq!(deploy_as(&node, &acme, "acme/f", wasm).await, n);
        }
        assert_eq!(call(&node, &acme, "acme/f@1", None).await, (StatusCode::OK, V_HELLO.into()));
        assert_eq!(call(&node, &acme, "acme/f@2", None).await, (StatusCode::OK, V_ECHO.into()));
        assert_eq!(call(&node, &acme, "acme/f", None).await, (StatusCode::OK, V_HELLO.into()), "the newest");
        assert_eq!(
            versions(&node, &acme, "acme/f").await,
            vec![(3, vec!["latest".to_string()]), (2, vec![]), (1, vec![])]
        );
        // A fourth: version 1 is collected (three kept).
        assert_eq!(deploy_as(&node, &acme, "acme/f", shoal_guests::ECHO).await, 4);
        assert_eq!(call(&node, &acme, "acme/f@1", None).await.0, StatusCode::NOT_FOUND);
        assert_eq!(call(&node, &acme, "acme/f", None).await.1, V_ECHO);
        // An alias keeps its version past the count.
        let (status, body) = set_alias(&node, &acme, "acme/f", "prod", serde_json::json!({ "version": 2 })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for n in [5, 6] {
            assert_eq!(deploy_as(&node, &acme, "acme/f", shoal_guests::HELLO).await, n);
        }
        let kept: Vec<u64> = versions(&node, &acme, "acme/f").await.iter().map(|(v, _)| *v).collect();
        assert_eq!(kept, vec![6, 5, 4, 2]);
        assert_eq!(call(&node, &acme, "acme/f@prod", None).await, (StatusCode::OK, V_ECHO.into()));
        // `latest` pinned: the unversioned name runs it, until the next deploy.
        assert_eq!(
            set_alias(&node, &acme, "acme/f", "latest", serde_json::json!({ "version": 4 })).await.0,
            StatusCode::OK
        );
        assert_eq!(call(&node, &acme, "acme/f", None).await.1, V_ECHO);
        assert_eq!(deploy_as(&node, &acme, "acme/f", shoal_guests::HELLO).await, 7);
        assert_eq!(call(&node, &acme, "acme/f", None).await.1, V_HELLO, "the deploy moved latest back");

        // Bad references and aliases, each with its reason.
        for (reference, status) in [
            ("acme/f@0", StatusCode::BAD_REQUEST),
            ("acme/f@", StatusCode::BAD_REQUEST),
            ("acme/f@a@b", StatusCode::BAD_REQUEST),
            ("acme/f@nosuch", StatusCode::NOT_FOUND),
            ("acme/f@99", StatusCode::NOT_FOUND),
        ] {
            assert_eq!(call(&node, &acme, reference, None).await.0, status, "{reference}");
        }
        for (alias, body, status, kind) in [
            ("beta", serde_json::json!({ "version": 99 }), StatusCode::NOT_FOUND, "not_found"),
            ("beta", serde_json::json!({ "version": 1 }), StatusCode::NOT_FOUND, "not_found"),
            ("123", serde_json::json!({ "version": 2 }), StatusCode::BAD_REQUEST, "bad_request"),
            ("Beta", serde_json::json!({ "version": 2 }), StatusCode::BAD_REQUEST, "bad_request"),
            ("beta", serde_json::json!({ "version": 0 }), StatusCode::BAD_REQUEST, "bad_request"),
            ("beta", serde_json::json!({ "version": 2, "versions": [] }), StatusCode::BAD_REQUEST, "bad_request"),
            (
                "beta",
                serde_json::json!({ "versions": [{ "version": 2, "weight": 1 }, { "version": 2, "weight": 1 }] }),
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "beta",
                serde_json::json!({ "versions": [{ "version": 2, "weight": 0 }, { "version": 4, "weight": 1 }] }),
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            ("beta", serde_json::json!({ "version": 2, "surprise": 1 }), StatusCode::BAD_REQUEST, "bad_request"),
        ] {
            let (got, answer) = set_alias(&node, &acme, "acme/f", alias, body.clone()).await;
            assert_eq!((got, answer["error"]["kind"].as_str()), (status, Some(kind)), "{alias} {body}: {answer}");
        }
        // `NAME@latest` is the bare name.
        assert_eq!(call(&node, &acme, "acme/f@latest", None).await.1, V_HELLO);
        // At most 16 aliases (each may keep a version): a 17th is refused, a change is not.
        for n in 0..15 {
            let alias = format!("a{n}");
            assert_eq!(
                set_alias(&node, &acme, "acme/f", &alias, serde_json::json!({ "version": 6 })).await.0,
                StatusCode::OK
            );
        }
        let (status, answer) = set_alias(&node, &acme, "acme/f", "one-more", serde_json::json!({ "version": 6 })).await;
        assert_eq!(
            (status, answer["error"]["kind"].as_str()),
            (StatusCode::INSUFFICIENT_STORAGE, Some("limit_exceeded"))
        );
        assert_eq!(
            set_alias(&node, &acme, "acme/f", "a0", serde_json::json!({ "version": 5 })).await.0,
            StatusCode::OK
        );
        // Another tenant sees none of it: the 404 of a missing function.
        assert_eq!(call(&node, &rival, "acme/f@prod", None).await.0, StatusCode::NOT_FOUND);
        assert_eq!(
            set_alias(&node, &rival, "acme/f", "prod", serde_json::json!({ "version": 4 })).await.0,
            StatusCode::NOT_FOUND
        );
        let listed =
            node.req(reqwest::Method::GET, "/v1/functions/acme/f/versions", Some(&rival)).send().await.unwrap();
        assert_eq!(listed.status(), StatusCode::NOT_FOUND);
        node.stop().await;
    }
    // Versions and aliases are kept across a restart.
    let node = TestNode::start_in(NodeConfig { max_versions: 3, ..config(dir.path()) }).await;
    let kept: Vec<u64> = versions(&node, &acme, "acme/f").await.iter().map(|(v, _)| *v).collect();
    assert_eq!(kept, vec![7, 6, 5, 2]);
    assert_eq!(call(&node, &acme, "acme/f@prod", None).await, (StatusCode::OK, V_ECHO.into()));
    assert_eq!(call(&node, &acme, "acme/f@6", None).await, (StatusCode::OK, V_HELLO.into()));
    let path = "/v1/functions/acme/f/aliases/prod";
    assert_eq!(
        node.req(reqwest::Method::DELETE, path, Some(&acme)).send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        node.req(reqwest::Method::DELETE, path, Some(&acme)).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(call(&node, &acme, "acme/f@prod", None).await.0, StatusCode::NOT_FOUND);
    // Removed, the function takes its versions with it; deployed again, it starts at 1.
    let removal = node.req(reqwest::Method::DELETE, "/v1/functions/acme/f", Some(&acme)).send().await.unwrap();
    assert_eq!(removal.status(), StatusCode::NO_CONTENT);
    assert_eq!(call(&node, &acme, "acme/f@6", None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(deploy_as(&node, &acme, "acme/f", shoal_guests::ECHO).await, 1);
    node.stop().await;
}

#[tokio::test]
async fn a_weighted_alias_splits_10000_calls_within_two_percent_and_sticks_by_route_key() {
    let node = TestNode::start().await;
    let acme = node.create_tenant("acme").await;
    deploy_as(&node, &acme, "acme/f", shoal_guests::HELLO).await;
    deploy_as(&node, &acme, "acme/f", shoal_guests::ECHO).await;
    let split = serde_json::json!({ "versions": [{ "version": 1, "weight": 90 }, { "version": 2, "weight": 10 }] });
    let (status, body) = set_alias(&node, &acme, "acme/f", "canary", split).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let node = Arc::new(node);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (node, acme) = (node.clone(), acme.clone());
        tasks.spawn(async move {
            let mut seconds = 0;
            for _ in 0..10_000 / 16 + usize::from(worker < 10_000 % 16) {
                let (status, output) = call(&node, &acme, "acme/f@canary", None).await;
                assert_eq!(status, StatusCode::OK, "{output}");
                match output.as_str() {
                    V_ECHO => seconds += 1,
                    V_HELLO => {}
                    other => panic!("neither version answered: {other}"),
                }
            }
            seconds
        });
    }
    let mut second = 0;
    while let Some(n) = tasks.join_next().await {
        second += n.unwrap();
    }
    assert!((800..=1200).contains(&second), "{second} of 10,000 calls went to the 10% version");
    // One key, one version, call after call; many keys find both.
    let mut seen = std::collections::BTreeSet::new();
    for user in 0..200 {
        let key = format!("user-{user}");
        let (_, first) = call(&node, &acme, "acme/f@canary", Some(&key)).await;
        for _ in 0..3 {
            assert_eq!(call(&node, &acme, "acme/f@canary", Some(&key)).await.1, first, "{key} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // An asynchronous call's record names the version it ran.
    let path = "/v1/functions/acme/f@canary/invoke?async=true";
    let (status, accepted) = status_and_json(
        node.req(reqwest::Method::POST, path, Some(&acme))
            .header("x-shoal-route-key", "user-7")
            .body("x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let (_, sync) = call(&node, &acme, "acme/f@canary", Some("user-7")).await;
    let id = accepted["call_id"].as_str().unwrap();
    let (_, record) =
        status_and_json(node.req(reqwest::Method::GET, &format!("/v1/calls/{id}"), Some(&acme)).send().await.unwrap())
            .await;
    let expected = if sync == V_ECHO { 2 } else { 1 };
    assert_eq!((record["function"].as_str(), record["version"].as_u64()), (Some("acme/f"), Some(expected)), "{record}");
    Arc::into_inner(node).unwrap().stop().await;
}

#[tokio::test]
async fn a_public_http_functions_other_versions_and_aliases_take_its_tenants_token() {
    let node = TestNode::start().await;
    let acme = node.create_tenant("acme").await;
    for _ in 0..2 {
        let (status, body) = node.deploy("acme/site", "access=public", shoal_guests::NOTES).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = set_alias(&node, &acme, "acme/site", "prod", serde_json::json!({ "version": 1 })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let visit = |path: &str, token: Option<&str>| {
        let mut request = node.http.post(format!("{}/acme/{path}/visits", node.fn_base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(visit("site", None).await, StatusCode::OK, "the public function as it is now");
    for reference in ["site@1", "site@2", "site@prod"] {
        assert_eq!(visit(reference, None).await, StatusCode::NOT_FOUND, "{reference} without a token");
        assert_eq!(visit(reference, Some(&acme)).await, StatusCode::OK, "{reference} with acme's token");
    }
    node.stop().await;
}
