//! Cron triggers on one node: each tick of a schedule one asynchronous
//! call (across a restart too), last and next run shown, bad schedules and
//! inputs refused, scoped to their tenant and capped per tenant, gone with
//! their tenant. (Across a cluster, with a node killed: `cluster.rs` in
//! shoal-cli.)

use super::*;
use std::time::{Duration, Instant};

async fn put(node: &TestNode, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let path = format!("/v1/triggers/{path}");
    status_and_json(node.req(reqwest::Method::PUT, &path, Some(token)).json(&body).send().await.unwrap()).await
}

async fn get(node: &TestNode, path: &str, token: &str) -> (StatusCode, Value) {
    status_and_json(node.req(reqwest::Method::GET, path, Some(token)).send().await.unwrap()).await
}

/// The ticks of trigger `name` that became calls, oldest first, with the
/// calls' records.
async fn runs_of(node: &TestNode, tenant: &str, name: &str) -> Vec<(u64, Value)> {
    let (status, listed) = get(node, &format!("/v1/calls?tenant={tenant}&limit=1000"), ADMIN).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let mut runs: Vec<(u64, Value)> = listed["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["trigger"]["name"] == name)
        .map(|c| (c["trigger"]["tick_ms"].as_u64().unwrap(), c.clone()))
        .collect();
    runs.sort_by_key(|(tick, _)| *tick);
    runs
}

/// Wait until trigger `name` has run at least `n` ticks.
async fn wait_runs(node: &TestNode, tenant: &str, name: &str, n: usize) -> Vec<(u64, Value)> {
    let started = Instant::now();
    loop {
        let runs = runs_of(node, tenant, name).await;
        if runs.len() >= n {
            return runs;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "only {} of {n} ticks ran", runs.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each tick once: consecutive seconds, no tick twice, none missing.
fn assert_every_second_once(runs: &[(u64, Value)]) {
    for pair in runs.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, 1000, "ticks {} and {} (all: {:?})", pair[0].0, pair[1].0, ticks(runs));
    }
    for (tick, _) in runs {
        assert_eq!(tick % 1000, 0, "a tick falls on a whole second");
    }
}

fn ticks(runs: &[(u64, Value)]) -> Vec<u64> {
    runs.iter().map(|(t, _)| *t).collect()
}

#[tokio::test]
async fn a_per_second_trigger_runs_each_tick_once_as_an_async_call_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let acme;
    let before;
    {
        let node = TestNode::start_in(config(dir.path())).await;
        acme = node.create_tenant("acme").await;
        assert_eq!(node.deploy("acme/echo", "", shoal_guests::ECHO).await.0, StatusCode::CREATED);
        let created_at = crate_now_ms();
        let (status, view) = put(
            &node,
            "acme/beat",
            &acme,
            serde_json::json!({ "schedule": "* * * * * *", "function": "echo", "input": "tick" }),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{view}");
        assert_eq!((view["zone"].as_str(), view["enabled"].as_bool()), (Some("UTC"), Some(true)));
        assert_eq!(view["input"], "tick");
        let next = view["next_run_ms"].as_u64().unwrap();
        assert!(next > created_at && next <= created_at + 1000 && next % 1000 == 0, "next {next}, now {created_at}");

        let runs = wait_runs(&node, "acme", "beat", 3).await;
        assert_every_second_once(&runs);
        assert!(runs[0].0 > created_at, "nothing from before the trigger was made");
        // Each run is a call of the function with the trigger's input.
        let last_id = runs.last().unwrap().1["call_id"].as_str().unwrap().to_string();
        let started = Instant::now();
        let done = loop {
            let (_, record) = get(&node, &format!("/v1/calls/{last_id}"), &acme).await;
            if record["status"] == "succeeded" {
                break record;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "{record}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!((done["function"].as_str(), done["output"].as_str()), (Some("acme/echo"), Some("tick")));
        assert_eq!(done["trigger"]["name"], "beat");
        // The trigger shows its last run (one of those listed, or a later one) and its next.
        let (status, shown) = get(&node, "/v1/triggers/acme/beat", &acme).await;
        assert_eq!(status, StatusCode::OK, "{shown}");
        let last_tick = shown["last_run"]["tick_ms"].as_u64().unwrap();
        assert!(last_tick >= runs.last().unwrap().0, "{shown}");
        assert!(shown["next_run_ms"].as_u64().unwrap() > last_tick, "{shown}");
        before = runs.len();
        node.stop().await;
    }
    // Stopped for a moment (less than the grace): after the restart every
    // tick still runs once — those missed while it was down included.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let node = TestNode::start_in(config(dir.path())).await;
    let runs = wait_runs(&node, "acme", "beat", before + 4).await;
    assert_every_second_once(&runs);
    let (_, listed) = get(&node, "/v1/triggers/acme", &acme).await;
    assert_eq!(listed["triggers"].as_array().unwrap().len(), 1, "{listed}");

    // Paused: no tick runs (one being offered as it was paused may land).
    let (status, view) = put(
        &node,
        "acme/beat",
        &acme,
        serde_json::json!({ "schedule": "* * * * * *", "function": "echo", "enabled": false }),
    )
    .await;
    assert_eq!((status, view["enabled"].as_bool(), view["next_run_ms"].as_u64()), (StatusCode::OK, Some(false), None));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let paused = runs_of(&node, "acme", "beat").await.len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(runs_of(&node, "acme", "beat").await.len(), paused, "a paused trigger ran");

    // Removed: gone, and nothing runs.
    let path = "/v1/triggers/acme/beat";
    assert_eq!(
        node.req(reqwest::Method::DELETE, path, Some(&acme)).send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    let (status, body) = get(&node, path, &acme).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    assert_eq!(
        node.req(reqwest::Method::DELETE, path, Some(&acme)).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    node.stop().await;
}

fn crate_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn bad_triggers_are_refused_with_their_reason_and_tenants_keep_to_their_own() {
    let node = TestNode::start_with(|c| c.max_triggers_per_tenant = 2).await;
    let acme = node.create_tenant("acme").await;
    let rival = node.create_tenant("rival").await;
    assert_eq!(node.deploy("acme/echo", "", shoal_guests::ECHO).await.0, StatusCode::CREATED);
    let ok = serde_json::json!({ "schedule": "0 9 * * MON-FRI", "zone": "Europe/Berlin", "function": "echo" });
    let with = |key: &str, value: Value| {
        let mut body = ok.clone();
        body[key] = value;
        body
    };
    let refused = [
        (with("schedule", "61 * * * *".into()), StatusCode::BAD_REQUEST, "bad_request"),
        (with("schedule", "* * * *".into()), StatusCode::BAD_REQUEST, "bad_request"),
        (with("schedule", "0 0 30 2 *".into()), StatusCode::BAD_REQUEST, "bad_request"),
        (with("schedule", "x".repeat(300).into()), StatusCode::BAD_REQUEST, "bad_request"),
        (with("zone", "Mars/Olympus".into()), StatusCode::BAD_REQUEST, "bad_request"),
        (with("function", "nosuch".into()), StatusCode::NOT_FOUND, "not_found"),
        (with("function", "../x".into()), StatusCode::BAD_REQUEST, "bad_request"),
        (with("input", "x".repeat(17_000).into()), StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        (with("input_base64", "!!".into()), StatusCode::BAD_REQUEST, "bad_request"),
        (with("surprise", true.into()), StatusCode::BAD_REQUEST, "bad_request"),
    ];
    for (body, status, kind) in refused {
        let (got, answer) = put(&node, "acme/daily", &acme, body.clone()).await;
        assert_eq!((got, answer["error"]["kind"].as_str()), (status, Some(kind)), "{body}: {answer}");
    }
    let (status, answer) = put(&node, "acme/Bad Name", &acme, ok.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    // A body past its limit is refused before it is read whole.
    let huge = serde_json::json!({ "schedule": "* * * * *", "function": "echo", "input": "x".repeat(200_000) });
    assert_eq!(put(&node, "acme/daily", &acme, huge).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(get(&node, "/v1/triggers/acme", &acme).await.1["triggers"], serde_json::json!([]), "nothing was made");

    // Another tenant can neither see, set nor remove acme's triggers.
    assert_eq!(put(&node, "acme/daily", &acme, ok.clone()).await.0, StatusCode::CREATED);
    assert_eq!(get(&node, "/v1/triggers/acme", &rival).await.0, StatusCode::FORBIDDEN);
    assert_eq!(get(&node, "/v1/triggers/acme/daily", &rival).await.0, StatusCode::FORBIDDEN);
    assert_eq!(put(&node, "acme/daily", &rival, ok.clone()).await.0, StatusCode::FORBIDDEN);
    let removal = node.req(reqwest::Method::DELETE, "/v1/triggers/acme/daily", Some(&rival)).send().await.unwrap();
    assert_eq!(removal.status(), StatusCode::FORBIDDEN);
    assert_eq!(get(&node, "/v1/triggers/acme", "not-a-token").await.0, StatusCode::UNAUTHORIZED);
    // Nor point one of its own at acme's function: names are the tenant's own.
    assert_eq!(put(&node, "rival/steal", &rival, ok.clone()).await.0, StatusCode::NOT_FOUND);

    // At most two per tenant: a third is refused, a replacement is not.
    let (status, view) = put(&node, "acme/other", &acme, with("input_base64", "AAEC".into())).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_eq!((view["input"].as_str(), view["input_base64"].as_str()), (Some("\0\u{1}\u{2}"), Some("AAEC")));
    let (status, answer) = put(&node, "acme/third", &acme, ok.clone()).await;
    assert_eq!((status, answer["error"]["kind"].as_str()), (StatusCode::INSUFFICIENT_STORAGE, Some("limit_exceeded")));
    let (status, view) = put(&node, "acme/daily", &acme, with("schedule", "30 8 * * *".into())).await;
    assert_eq!((status, view["schedule"].as_str()), (StatusCode::OK, Some("30 8 * * *")));
    // Its next run is 08:30 in Berlin: 07:30 UTC in winter, 06:30 in summer.
    let next = view["next_run_ms"].as_u64().unwrap();
    let minute_of_day = next / 60_000 % (24 * 60);
    assert!(minute_of_day == 7 * 60 + 30 || minute_of_day == 6 * 60 + 30, "{view}");

    // A deleted tenant's triggers go with it: re-created, it has none.
    let deletion = node.req(reqwest::Method::DELETE, "/v1/tenants/acme", Some(ADMIN)).send().await.unwrap();
    assert_eq!(deletion.status(), StatusCode::ACCEPTED);
    let started = Instant::now();
    while node.req(reqwest::Method::GET, "/v1/tenants/acme", Some(ADMIN)).send().await.unwrap().status()
        != StatusCode::NOT_FOUND
    {
        assert!(started.elapsed() < Duration::from_secs(30), "the deletion never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.create_tenant("acme").await;
    assert_eq!(get(&node, "/v1/triggers/acme", ADMIN).await.1["triggers"], serde_json::json!([]));
    assert_eq!(get(&node, "/v1/triggers/nosuch", ADMIN).await.0, StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test]
async fn ticks_refused_for_the_tenants_async_limit_are_offered_again_and_all_run_late() {
    // One unfinished asynchronous call per tenant; each run takes 1.5 s,
    // so most ticks of a per-second schedule are refused when first due.
    let node = TestNode::start_with(|c| c.max_async_calls_per_tenant = Some(1)).await;
    let acme = node.create_tenant("acme").await;
    assert_eq!(node.deploy("acme/slow", "", shoal_guests::CHAIN).await.0, StatusCode::CREATED);
    let spec = serde_json::json!({ "schedule": "* * * * * *", "function": "slow", "input": "sleep 1500" });
    assert_eq!(put(&node, "acme/beat", &acme, spec).await.0, StatusCode::CREATED);
    let started = Instant::now();
    let mut refusal = None;
    while refusal.is_none() {
        let (_, shown) = get(&node, "/v1/triggers/acme/beat", &acme).await;
        refusal = shown["last_refusal"].as_str().map(str::to_string);
        assert!(started.elapsed() < Duration::from_secs(30), "no tick was ever refused: {shown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refusal.as_deref().is_some_and(|r| r.starts_with("overloaded")), "{refusal:?}");
    // Offered again (not dropped): every tick since the first still runs
    // once, in order, each after the one before it finished.
    let runs = wait_runs(&node, "acme", "beat", 5).await;
    assert_every_second_once(&runs);
    for pair in runs.windows(2) {
        let started_at = |run: &Value| run["timings"]["queued_at_ms"].as_u64().unwrap();
        assert!(started_at(&pair[1].1) >= started_at(&pair[0].1), "{pair:?}");
    }
    let late = runs.iter().map(|(tick, run)| run["timings"]["queued_at_ms"].as_u64().unwrap() - tick).max().unwrap();
    assert!(late >= 1000, "ticks were queued at most {late} ms late: none waited for the limit");
    node.stop().await;
}
