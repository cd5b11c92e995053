//! Usage metering over the API: what each tenant's calls used, per
//! function and minute, as JSON and CSV, to the tenant and the admin only.

use super::*;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_charged_to_their_tenant_and_function_by_outcome() {
    let node = TestNode::start().await;
    let (status, body) = node.deploy("demo/bomb", "memory_mb=16", shoal_guests::MISBEHAVE).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let acme = node.create_tenant("acme").await;
    let (status, _) = node
        .req(reqwest::Method::PUT, "/v1/functions/acme/fib", Some(&acme))
        .body(shoal_guests::FIB.to_vec())
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);

    let cpu_before = shoal_testkit::cpu_time_of(std::process::id());
    let mut answered_cpu_us = 0;
    for _ in 0..10 {
        let response = node.req(reqwest::Method::POST, "/v1/functions/demo/fib/invoke", Some(ADMIN)).body("27");
        let response = response.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        answered_cpu_us += response.headers()["x-shoal-cpu-us"].to_str().unwrap().parse::<u64>().unwrap();
    }
    let cpu_spent = shoal_testkit::cpu_time_of(std::process::id()) - cpu_before;
    // State moved by calls: 3000 bytes pushed, then pulled by another call.
    assert_eq!(node.deploy("demo/ops", "", shoal_guests::STATE_OPS).await.0, StatusCode::CREATED);
    let value = "v".repeat(3000);
    let (status, out) = node.invoke("demo/ops", format!("set big {value}\npush big").as_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&out));
    let (status, out) = node.invoke("demo/ops", b"pull big").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&out));
    assert_eq!(node.invoke("demo/misbehave", b"error").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_ne!(node.invoke("demo/bomb", b"oom").await.0, StatusCode::OK);
    assert_eq!(node.invoke_as(&acme, "acme/fib", b"10").await.0, StatusCode::OK);
    // A call that spawns three: the spawns are charged to it, and each
    // spawned call to its own function.
    assert_eq!(node.deploy("demo/chain", "", shoal_guests::CHAIN).await.0, StatusCode::CREATED);
    let (status, out) = node.invoke("demo/chain", b"spawn-all 3 echo x").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&out));

    let usage = node.get_json("/v1/tenants/demo/usage?by=function").await;
    let rows = usage["buckets"].as_array().unwrap();
    let row = |name: &str| rows.iter().find(|r| r["function"] == name).unwrap_or_else(|| panic!("{name}: {usage}"));
    let fib = row("fib");
    assert_eq!((fib["calls"].as_u64(), fib["outcomes"]["ok"].as_u64()), (Some(10), Some(10)), "{fib}");
    // The CPU charged is what the calls ran, never more than the process
    // spent meanwhile (which also served the requests and the client).
    let charged = Duration::from_micros(fib["cpu_us"].as_u64().unwrap());
    assert!(
        charged > Duration::ZERO && charged <= cpu_spent + Duration::from_millis(20),
        "{charged:?} of {cpu_spent:?}"
    );
    assert_eq!(fib["cpu_us"].as_u64(), Some(answered_cpu_us), "the sum of what each answer said it was charged");
    assert!(fib["wall_us"].as_u64().unwrap() > 0 && fib["memory_mib_ms"].as_u64().is_some(), "{fib}");
    let ops = row("ops");
    assert_eq!((ops["state_written_bytes"].as_u64(), ops["state_read_bytes"].as_u64()), (Some(3000), Some(3000)));
    assert_eq!(fib["state_written_bytes"].as_u64(), Some(0), "{fib}");
    let chain = row("chain");
    assert_eq!((chain["calls"].as_u64(), chain["spawned"].as_u64()), (Some(1), Some(3)), "{chain}");
    assert_eq!(row("echo")["calls"].as_u64(), Some(3), "{usage}");
    let failed = row("misbehave");
    assert_eq!((failed["calls"].as_u64(), failed["outcomes"]["function_error"].as_u64()), (Some(1), Some(1)));
    // A memory bomb is charged its peak (its 16 MiB limit) for its time.
    let bomb = row("bomb");
    assert_eq!(bomb["outcomes"]["out_of_memory"].as_u64(), Some(1), "{bomb}");
    let wall_ms = bomb["wall_us"].as_u64().unwrap() as f64 / 1000.0;
    let mib_ms = bomb["memory_mib_ms"].as_u64().unwrap() as f64;
    assert!(mib_ms >= 8.0 * wall_ms - 1.0 && mib_ms <= 16.0 * wall_ms + 1.0, "{bomb}");
    // The other tenant's call is its own, and only it (or the admin) sees it.
    assert!(rows.iter().all(|r| r["function"] != "fib" || r["calls"] == 10));
    let theirs = node.req(reqwest::Method::GET, "/v1/tenants/acme/usage", Some(&acme)).send().await.unwrap();
    assert_eq!(theirs.status(), StatusCode::OK);
    let theirs: Value = theirs.json().await.unwrap();
    assert_eq!(theirs["buckets"][0]["calls"], 1, "{theirs}");
    let peek = node.req(reqwest::Method::GET, "/v1/tenants/demo/usage", Some(&acme)).send().await.unwrap();
    assert_eq!(peek.status(), StatusCode::FORBIDDEN);

    // Summed over the tenant, in CSV.
    let csv = node
        .req(reqwest::Method::GET, "/v1/tenants/demo/usage?format=csv&step=3600", Some(ADMIN))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("start,function,calls,ok,errors,"), "{csv}");
    let calls: u64 = lines[1..].iter().map(|l| l.split(',').nth(2).unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(calls, 18, "{csv}");
    // The tenant's stored bytes: sampled when asked (and each minute), in
    // the tenant's rows; the key's value at least.
    assert!(lines[0].ends_with(",state_stored_bytes"), "{csv}");
    let stored: u64 = lines[1..].iter().map(|l| l.rsplit(',').next().unwrap().parse::<u64>().unwrap()).max().unwrap();
    let quota_counts = node.get_json("/v1/tenants/demo/limits").await["in_use"]["state_bytes"].as_u64().unwrap();
    assert!(stored >= 3000 && stored == quota_counts, "{stored} vs {quota_counts}: {csv}");
    // Bad parameters are named.
    for bad in ["step=90", "from=5&to=4", "from=x", "by=node", "nonsense=1", "step=60&from=0&to=99999999"] {
        let response =
            node.req(reqwest::Method::GET, &format!("/v1/tenants/demo/usage?{bad}"), Some(ADMIN)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    node.stop().await;
}

#[tokio::test]
async fn usage_is_written_when_the_node_stops_and_read_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_in(config(dir.path())).await;
    node.node.deploy_defaults("demo", shoal_guests::EXAMPLES).await.unwrap();
    for _ in 0..3 {
        assert_eq!(node.invoke("demo/hello", b"x").await.0, StatusCode::OK);
    }
    // Stopped before the periodic flush (10 s): the stop writes it.
    node.stop().await;
    let node = TestNode::start_in(config(dir.path())).await;
    let usage = node.get_json("/v1/tenants/demo/usage?function=hello").await;
    let calls: u64 = usage["buckets"].as_array().unwrap().iter().map(|b| b["calls"].as_u64().unwrap()).sum();
    assert_eq!(calls, 3, "{usage}");
    node.stop().await;
}
