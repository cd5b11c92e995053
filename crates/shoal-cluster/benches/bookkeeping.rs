//! The cluster's own bookkeeping in Redis as the rest of Redis fills up
//! (not a criterion benchmark: it prints a table of medians and p99s).
//!
//! Every node heartbeats, reads the member list (placement weighs it), and
//! lists the nodes holding call leases, several times a second; a deploy
//! or removal decides whether a wasm blob is still used. The same Redis
//! holds every state value and call record, so these must cost the same
//! whether it holds a hundred keys or a million. Each operation is timed
//! three times: on an otherwise empty Redis, after adding 1,000,000
//! state-like keys and 100,000 call-record-like keys, and after adding
//! 10,000 function records as well. Next to each, the same operation as
//! the earlier layout did it (a key per node found with `SCAN`, running
//! lists found with `SCAN`, wasm use decided by `HVALS` over every
//! function record), on the same Redis, so the table shows before and
//! after side by side.
//!
//! `cargo bench -p shoal-cluster --bench bookkeeping`; without `--bench`
//! (as `cargo test --all-targets` runs it) it runs with a few thousand keys
//! and a few rounds, as a smoke test.

use std::time::{Duration, Instant};

use redis::Script;
use redis::aio::ConnectionManager;
use shoal_cluster::{CallQueue, Member, Membership, MembershipConfig, SharedRegistry, connect};
use shoal_testkit::RedisServer;

/// The earlier layout's deploy and removal scripts (as they were before
/// the wasm reference counts), run under their own prefix so that they
/// never touch the counts of the current ones.
const OLD_HELPERS: &str = r#"
local function used(sha)
  local field = '"sha256":"' .. sha .. '"'
  for _, other in ipairs(redis.call('HVALS', KEYS[1])) do
    if string.find(other, field, 1, true) then return true end
  end
  return false
end
local function sha_of(record)
  local ok, decoded = pcall(cjson.decode, record)
  if ok and type(decoded) == 'table' and type(decoded['sha256']) == 'string' then return decoded['sha256'] end
  return nil
end
"#;
const OLD_PUT_FUNCTION: &str = r"
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if old then
  local old_sha = sha_of(old)
  if old_sha and old_sha ~= ARGV[3] and not used(old_sha) then redis.call('DEL', ARGV[4] .. old_sha) end
end
redis.call('INCR', KEYS[2])
return 1
";
const OLD_REMOVE_FUNCTION: &str = r"
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local sha = sha_of(record)
if sha and not used(sha) then redis.call('DEL', ARGV[2] .. sha) end
redis.call('INCR', KEYS[2])
return 1
";

const NODES: usize = 3;

struct Sizes {
    state_keys: usize,
    call_records: usize,
    functions: usize,
    /// Rounds of each operation that does not grow with Redis.
    rounds: usize,
    /// Rounds of each operation of the earlier layout that may.
    old_rounds: usize,
}

/// Median and p99 of `rounds` runs of `op`.
macro_rules! measure {
    ($rounds:expr, $op:expr) => {{
        let mut times = Vec::with_capacity($rounds);
        for _ in 0..$rounds {
            let started = Instant::now();
            $op;
            times.push(started.elapsed());
        }
        times.sort_unstable();
        (times[times.len() / 2], times[((times.len() as f64 * 0.99) as usize).min(times.len() - 1)])
    }};
}

fn sha(i: usize) -> String {
    format!("{i:064x}")
}

fn record(name: &str, sha: &str) -> String {
    format!(
        r#"{{"tenant":"bench","name":"{name}","sha256":"{sha}","env":[["MODE","production"]],"timeout_ms":30000,"memory_bytes":134217728,"created_ms":1700000000000}}"#
    )
}

/// Add `n` keys named `prefix<i>` holding `value`, fast: `MSET`s of a
/// thousand keys, pipelined fifty at a time.
async fn fill(conn: &mut ConnectionManager, prefix: &str, n: usize, value: &str) {
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        for _ in 0..50 {
            if i >= n {
                break;
            }
            let mut mset = redis::cmd("MSET");
            for j in i..(i + 1000).min(n) {
                mset.arg(format!("{prefix}{j}")).arg(value);
            }
            i = (i + 1000).min(n);
            pipe.add_command(mset).ignore();
        }
        pipe.query_async::<()>(conn).await.expect("fill");
    }
}

/// Add `n` function records naming one wasm, in the current layout (with
/// its count) and in the earlier one.
async fn fill_functions(conn: &mut ConnectionManager, n: usize) {
    let shared = sha(999_999_999);
    for (prefix, counted) in [("shoal", true), ("old", false)] {
        let mut pipe = redis::pipe();
        for i in 0..n {
            let name = format!("fill{i}");
            pipe.hset(format!("{prefix}:functions"), format!("bench/{name}"), record(&name, &shared)).ignore();
            if pipe.len() >= 1000 {
                pipe.query_async::<()>(conn).await.expect("fill functions");
                pipe = redis::pipe();
            }
        }
        pipe.set(format!("{prefix}:wasm:{shared}"), "wasm").ignore();
        if counted {
            pipe.hincr(format!("{prefix}:wasm-refs"), &shared, n).ignore();
        }
        pipe.query_async::<()>(conn).await.expect("fill functions");
    }
}

/// The earlier layout's `SCAN` for keys matching `pattern`.
async fn scan(conn: &mut ConnectionManager, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await
            .expect("scan");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// One row of the table: an operation, now and before, at each fill.
struct Row {
    name: &'static str,
    now: Vec<(Duration, Duration)>,
    before: Vec<(Duration, Duration)>,
}

async fn run(redis: &RedisServer, sizes: &Sizes, full: bool) -> Vec<Row> {
    let mut conn = connect(&redis.url(), Duration::from_secs(60)).await.expect("connect");
    let queue = CallQueue::new(conn.clone(), "shoal");
    let registry = SharedRegistry::new(conn.clone(), "shoal");
    let (old_put, old_remove) = (
        Script::new(&format!("{OLD_HELPERS}{OLD_PUT_FUNCTION}")),
        Script::new(&format!("{OLD_HELPERS}{OLD_REMOVE_FUNCTION}")),
    );
    // Three nodes, each a member holding one call's lease (the current
    // layout), and the same as the earlier layout kept it.
    let mut members = Vec::new();
    for n in 0..NODES {
        let config = MembershipConfig { ttl: Duration::from_secs(3), ..MembershipConfig::new(redis.url()) };
        let member = Membership::join(config, Member::new(format!("n{n}"), format!("127.0.0.{}:8080", n + 2)))
            .await
            .expect("join");
        members.push(member);
        queue
            .accept("bench", &format!("held{n}"), b"{}", b"", 1000, 1000, None)
            .await
            .expect("accept")
            .expect("queued");
        queue.take(&format!("n{n}")).await.expect("take").expect("a call");
        let old = serde_json::to_string(members[n].me()).expect("json");
        redis::cmd("SET").arg(format!("shoal:node:n{n}")).arg(old).query_async::<()>(&mut conn).await.expect("set");
    }
    let me = &members[0];
    let wasm = vec![7u8; 1024];
    let names = ["heartbeat", "read the members", "list lease holders", "deploy a function", "remove a function"];
    let mut rows: Vec<Row> = names.iter().map(|&name| Row { name, now: Vec::new(), before: Vec::new() }).collect();
    for stage in 0..3 {
        match stage {
            1 => {
                let started = Instant::now();
                fill(
                    &mut conn,
                    "shoal:state:bench:key-",
                    sizes.state_keys,
                    "a state value of some sixty-four bytes....",
                )
                .await;
                let call = r#"{"id":"x","tenant":"bench","function":"f","status":"succeeded","accepted_ms":1700000000000,"started_ms":1700000000001,"finished_ms":1700000000002,"node":"n0"}"#;
                fill(&mut conn, "shoal:call:", sizes.call_records, call).await;
                let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.expect("dbsize");
                eprintln!("filled Redis to {keys} keys in {:.1?}", started.elapsed());
            }
            2 => fill_functions(&mut conn, sizes.functions).await,
            _ => {}
        }
        if stage > 0 && full {
            // Redis grows its main table a step at a time after a fill,
            // on commands and on its timer: let it finish first.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let (r, o) = (sizes.rounds, sizes.old_rounds);
        // Unmeasured rounds first: scripts loaded, connections warm.
        for _ in 0..r / 10 {
            me.heartbeat().await.expect("heartbeat");
            me.read_members().await.expect("members");
            queue.lease_holders().await.expect("holders");
        }
        rows[0].now.push(measure!(r, me.heartbeat().await.expect("heartbeat")));
        rows[0].before.push(measure!(
            r,
            redis::cmd("SET")
                .arg("shoal:node:n0")
                .arg(serde_json::to_string(me.me()).expect("json"))
                .arg("PX")
                // Long enough to outlive the rounds that read it.
                .arg(600_000)
                .query_async::<()>(&mut conn)
                .await
                .expect("set")
        ));
        rows[1].now.push(measure!(r, assert_eq!(me.read_members().await.expect("members").len(), NODES)));
        rows[1].before.push(measure!(o, {
            let keys = scan(&mut conn, "shoal:node:*").await;
            let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await.expect("mget");
            assert_eq!(values.len(), NODES);
        }));
        rows[2].now.push(measure!(r, assert_eq!(queue.lease_holders().await.expect("holders").len(), NODES)));
        rows[2].before.push(measure!(o, assert_eq!(scan(&mut conn, "shoal:calls:running:*").await.len(), NODES)));
        // Deploy then remove a function whose wasm another function also
        // uses (so the removal must find out it is still used), and one
        // whose wasm is its own.
        let shared = sha(999_999_999);
        let mut deploys = Vec::new();
        let mut removals = Vec::new();
        let mut old_deploys = Vec::new();
        let mut old_removals = Vec::new();
        for i in 0..o.max(r / 4) {
            let own = sha(i);
            let sha = if i % 2 == 0 { &shared } else { &own };
            let key = format!("bench/f{i}");
            let body = record(&format!("f{i}"), sha);
            // The shared wasm must exist in both layouts for a deploy of it.
            if i == 0 {
                for prefix in ["shoal", "old"] {
                    let key = format!("{prefix}:wasm:{shared}");
                    redis::cmd("SET").arg(&key).arg("wasm").query_async::<()>(&mut conn).await.expect("set");
                }
                registry
                    .put_function("bench/keeper", &shared, record("keeper", &shared).as_bytes(), &wasm)
                    .await
                    .expect("put");
                let _: i64 = old_put
                    .key("old:functions")
                    .key("old:registry:version")
                    .key(format!("old:wasm:{shared}"))
                    .arg("bench/keeper")
                    .arg(record("keeper", &shared))
                    .arg(&shared)
                    .arg("old:wasm:")
                    .invoke_async(&mut conn)
                    .await
                    .expect("old put");
            }
            let started = Instant::now();
            registry.put_function(&key, sha, body.as_bytes(), &wasm).await.expect("put");
            deploys.push(started.elapsed());
            let started = Instant::now();
            assert!(registry.remove_function(&key, &[]).await.expect("remove"));
            removals.push(started.elapsed());
            if i < o {
                // The earlier deploy: the same wasm write, then its script.
                let started = Instant::now();
                let wasm_key = format!("old:wasm:{sha}");
                let present: bool = redis::cmd("EXISTS").arg(&wasm_key).query_async(&mut conn).await.expect("exists");
                if !present {
                    redis::cmd("SET").arg(&wasm_key).arg(&wasm).query_async::<()>(&mut conn).await.expect("set");
                }
                let stored: i64 = old_put
                    .key("old:functions")
                    .key("old:registry:version")
                    .key(&wasm_key)
                    .arg(&key)
                    .arg(&body)
                    .arg(sha)
                    .arg("old:wasm:")
                    .invoke_async(&mut conn)
                    .await
                    .expect("old put");
                assert_eq!(stored, 1);
                old_deploys.push(started.elapsed());
                let started = Instant::now();
                let removed: i64 = old_remove
                    .key("old:functions")
                    .key("old:registry:version")
                    .arg(&key)
                    .arg("old:wasm:")
                    .invoke_async(&mut conn)
                    .await
                    .expect("old remove");
                assert_eq!(removed, 1);
                old_removals.push(started.elapsed());
            }
        }
        let mut wasm_left: Vec<String> = Vec::new();
        for i in 0..o.max(r / 4) {
            if i % 2 == 1 {
                let blob: Option<Vec<u8>> = registry.wasm(&sha(i)).await.expect("wasm");
                if blob.is_some() {
                    wasm_left.push(sha(i));
                }
            }
        }
        assert!(wasm_left.is_empty(), "removals left their own wasm behind: {wasm_left:?}");
        assert!(registry.wasm(&shared).await.expect("wasm").is_some(), "the shared wasm stays");
        for (times, row, now) in
            [(deploys, 3, true), (removals, 4, true), (old_deploys, 3, false), (old_removals, 4, false)]
        {
            let mut times = times;
            times.sort_unstable();
            let stats = (times[times.len() / 2], times[((times.len() as f64 * 0.99) as usize).min(times.len() - 1)]);
            if now {
                rows[row].now.push(stats);
            } else {
                rows[row].before.push(stats);
            }
        }
    }
    for member in &members {
        member.leave().await.expect("leave");
    }
    rows
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes { state_keys: 1_000_000, call_records: 100_000, functions: 10_000, rounds: 2000, old_rounds: 20 }
    } else {
        Sizes { state_keys: 2_000, call_records: 200, functions: 50, rounds: 20, old_rounds: 4 }
    };
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    let redis = RedisServer::start();
    let rows = tokio.block_on(run(&redis, &sizes, full));
    println!(
        "median / p99, with Redis holding: nothing else | +{} state and {} call-record keys | +{} functions as well",
        sizes.state_keys, sizes.call_records, sizes.functions
    );
    let cell = |(p50, p99): (Duration, Duration)| format!("{p50:>9.1?} / {p99:>9.1?}");
    for row in rows {
        for (layout, stats) in [("now", &row.now), ("before", &row.before)] {
            let cells: Vec<String> = stats.iter().map(|s| cell(*s)).collect();
            println!("{:<20} {layout:<7} {}", row.name, cells.join(" | "));
        }
    }
}
