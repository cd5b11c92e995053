//! The `shoal` binary end to end: `shoal serve` as a child process (the
//! embedded single-node default, examples deployed) and the client
//! commands against it.

mod common;

use std::path::Path;
use std::process::Command;

use common::{http_get, metric, serve, serve_with, shoal, stdout};

#[test]
fn serve_deploys_the_examples_and_the_client_commands_work() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve_with(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let run = |args: &[&str]| shoal(dir.path(), &served.url, args);
    // The examples are deployed and none is loaded: an idle node holds
    // neither their images nor a language runtime until they are called.
    let metrics_url = served.metrics.clone().expect("a metrics listener");
    assert_eq!(metric(&http_get(&metrics_url), "shoal_images_loaded"), 0.0);

    // The client finds the admin token in ./.shoal by itself.
    assert_eq!(stdout(&run(&["invoke", "demo/hello", "-d", "world"])), "hello world");
    assert_eq!(metric(&http_get(&metrics_url), "shoal_images_loaded"), 1.0, "loaded by its first call");
    assert_eq!(stdout(&run(&["invoke", "demo/fib", "-d", "30"])), "832040");
    std::fs::write(dir.path().join("input.txt"), "from a file").unwrap();
    assert_eq!(stdout(&run(&["invoke", "demo/upper", "--data-file", "input.txt"])), "FROM A FILE");
    let listed = stdout(&run(&["ls"]));
    for name in ["demo/hello", "demo/echo", "demo/fib", "demo/upper", "demo/hello-py", "demo/primes"] {
        assert!(listed.contains(name), "{listed}");
    }
    // The snapshot example: its tables were built once, at deploy.
    let primes = listed.lines().find(|line| line.starts_with("demo/primes ")).expect("primes listed");
    assert!(primes.split_whitespace().nth(2) == Some("yes"), "{primes}");
    let hello_py = listed.lines().find(|line| line.starts_with("demo/hello-py ")).expect("hello-py listed");
    assert!(hello_py.split_whitespace().nth(1) == Some("python"), "{hello_py}");
    assert_eq!(
        stdout(&run(&["invoke", "demo/primes", "-d", "1000"])),
        "1000 is not prime; 168 primes up to 1000 (tables built by init)"
    );

    // Deploy from a file with limits and env, under a new tenant.
    let token = stdout(&run(&["tenant", "create", "acme"])).trim().to_string();
    assert!(token.starts_with("acme."), "{token}");
    let limits: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["tenant", "limits", "acme", "--weight", "2", "--memory", "1GiB"])))
            .unwrap();
    assert_eq!(
        (limits["set"]["weight"].as_u64(), limits["effective"]["memory_bytes"].as_u64()),
        (Some(2), Some(1 << 30))
    );
    let limits: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["tenant", "limits", "acme", "--running", "3", "--state-quota", "5MiB"])))
            .unwrap();
    assert_eq!(
        limits["set"],
        serde_json::json!({ "weight": 2, "running": 3, "memory_bytes": 1u64 << 30, "state_quota_bytes": 5u64 << 20 }),
        "the others kept"
    );
    let wasm = dir.path().join("echo.wasm");
    std::fs::write(&wasm, shoal_guests::ECHO).unwrap();
    let described =
        stdout(&run(&["deploy", "acme/echo", "echo.wasm", "--memory", "16MiB", "--timeout", "2s", "--env", "K=V"]));
    let described: serde_json::Value = serde_json::from_str(&described).unwrap();
    assert_eq!(described["memory_bytes"], 16u64 << 20);
    assert_eq!(described["timeout_ms"], 2000);
    assert_eq!(described["snapshot"], false);
    std::fs::write(dir.path().join("primes.wasm"), shoal_guests::PRIMES).unwrap();
    let described: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["deploy", "acme/primes", "primes.wasm", "--snapshot"]))).unwrap();
    assert_eq!((described["kind"].as_str(), described["snapshot"].as_bool()), (Some("component"), Some(true)));
    let no_init = run(&["deploy", "acme/echo2", "echo.wasm", "--snapshot"]);
    let stderr = String::from_utf8_lossy(&no_init.stderr);
    assert!(!no_init.status.success() && stderr.contains("invalid_wasm") && stderr.contains("init"), "{stderr}");
    let as_acme = shoal(dir.path(), &served.url, &["--token", &token, "invoke", "acme/echo", "-d", "hi"]);
    assert_eq!(stdout(&as_acme), "hi");
    let denied = shoal(dir.path(), &served.url, &["--token", &token, "invoke", "demo/hello", "-d", "hi"]);
    assert!(!denied.status.success());
    // Another tenant's function answers as if it did not exist.
    assert!(String::from_utf8_lossy(&denied.stderr).contains("not_found"), "{denied:?}");

    // Errors are reported with their kind, and the exit code says so.
    let failed = run(&["invoke", "demo/fib", "-d", "nope"]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("function_error") && stderr.contains("(call "), "{stderr}");

    // State: set, get, list, delete; keys may hold `/` and spaces.
    assert!(run(&["state", "set", "demo/conf/a b", "value one"]).status.success());
    assert_eq!(stdout(&run(&["state", "get", "demo/conf/a b"])), "value one");
    assert_eq!(stdout(&run(&["invoke", "demo/counter", "-d", "3"])), "3");
    assert_eq!(stdout(&run(&["state", "get", "demo/counter"])), "3");
    let keys = stdout(&run(&["state", "ls"]));
    assert!(keys.contains("conf/a b") && keys.contains("counter"), "{keys}");
    assert!(run(&["state", "del", "demo/conf/a b"]).status.success());
    let gone = run(&["state", "get", "demo/conf/a b"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not_found"), "{gone:?}");

    // Python: the examples run on the shared runtime; a project made by
    // `shoal new python` deploys from its folder; bad source is refused.
    assert_eq!(stdout(&run(&["invoke", "demo/hello-py", "-d", "you"])), "hello you from python");
    // What those calls used, per function.
    let usage = stdout(&run(&["usage", "demo", "--by", "function", "--since", "1h"]));
    assert!(usage.starts_with("FUNCTION") && usage.contains("CPU ms"), "{usage}");
    let py = usage.lines().find(|l| l.starts_with("demo/hello-py ")).unwrap_or_else(|| panic!("{usage}"));
    assert_eq!(py.split_whitespace().nth(1), Some("1"), "one call: {py}");
    let visits = stdout(&run(&["invoke", "demo/visits", "-d", "ann"]));
    assert_eq!(visits, r#"{"greeting": "hello ann", "visits": 1}"#);
    assert!(stdout(&run(&["new", "python", "greet"])).contains("greet"));
    // The template as made, then grown by a module of its own.
    let described: serde_json::Value = serde_json::from_str(&stdout(&run(&["deploy", "acme/greet", "greet"]))).unwrap();
    assert_eq!(described["kind"], "python");
    assert_eq!(stdout(&run(&["invoke", "acme/greet", "-d", "py"])), "hello py");
    assert_eq!(stdout(&run(&["invoke", "acme/greet"])), "hello world");
    std::fs::write(dir.path().join("greet/names.py"), "def shout(name):\n    return name.upper()\n").unwrap();
    std::fs::write(
        dir.path().join("greet/app.py"),
        "from names import shout\n\ndef handle(input):\n    return 'hello ' + shout(input.decode())\n",
    )
    .unwrap();
    let described: serde_json::Value = serde_json::from_str(&stdout(&run(&["deploy", "acme/greet", "greet"]))).unwrap();
    assert_eq!(described["kind"], "python");
    assert_eq!(stdout(&run(&["invoke", "acme/greet", "-d", "bo"])), "hello BO");
    // JavaScript the same way.
    assert_eq!(stdout(&run(&["invoke", "demo/hello-js", "-d", "you"])), "hello you from javascript");
    assert!(stdout(&run(&["new", "js", "greet-js"])).contains("greet-js"));
    let described: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["deploy", "acme/greet-js", "greet-js"]))).unwrap();
    assert_eq!(described["kind"], "javascript");
    assert_eq!(stdout(&run(&["invoke", "acme/greet-js", "-d", "js"])), "hello js");
    // C: `shoal new c` makes a project that `make` builds (clang and
    // wasi-libc, installed by scripts/setup.sh's prerequisites) into a
    // command module; the input is its stdin.
    assert!(stdout(&run(&["new", "c", "greet-c"])).contains("greet-c"));
    let built = Command::new("make").arg("-C").arg(dir.path().join("greet-c")).output().expect("run make");
    assert!(built.status.success(), "make: {}", String::from_utf8_lossy(&built.stderr));
    let described: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["deploy", "acme/greet-c", "greet-c/app.wasm"]))).unwrap();
    assert_eq!(described["kind"], "command");
    assert_eq!(stdout(&run(&["invoke", "acme/greet-c", "-d", "c"])), "hello c");
    assert_eq!(stdout(&run(&["invoke", "acme/greet-c"])), "hello world");
    let unbuilt = run(&["deploy", "acme/greet-c", "greet-c"]);
    assert!(String::from_utf8_lossy(&unbuilt.stderr).contains("C project"), "{unbuilt:?}");
    std::fs::write(dir.path().join("broken.py"), "def handle(input)\n").unwrap();
    let broken = run(&["deploy", "acme/broken", "broken.py"]);
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(
        !broken.status.success() && stderr.contains("invalid_source") && stderr.contains("SyntaxError"),
        "{stderr}"
    );

    assert!(run(&["rm", "acme/echo"]).status.success());
    let gone = run(&["invoke", "acme/echo"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not_found"), "{gone:?}");
    let bad_ref = run(&["invoke", "no-slash"]);
    assert!(String::from_utf8_lossy(&bad_ref.stderr).contains("TENANT/NAME"), "{bad_ref:?}");

    // Token rotation with no grace, revocation, and deleting the tenant.
    let as_token = |token: &str, args: &[&str]| {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        shoal(dir.path(), &served.url, &all)
    };
    let rotated = stdout(&run(&["tenant", "rotate", "acme", "--grace", "0s"])).trim().to_string();
    assert!(rotated.starts_with("acme.") && rotated != token, "{rotated}");
    assert!(!as_token(&token, &["ls", "acme"]).status.success(), "the old token still works");
    assert!(as_token(&rotated, &["ls", "acme"]).status.success());
    assert!(run(&["tenant", "revoke", "acme"]).status.success());
    assert!(!as_token(&rotated, &["ls", "acme"]).status.success(), "a revoked token still works");
    assert!(run(&["tenant", "rm", "acme", "--wait"]).status.success());
    let gone = run(&["ls", "acme"]);
    assert!(stdout(&gone).lines().all(|l| !l.starts_with("acme/")), "{gone:?}");
    let again = stdout(&run(&["tenant", "create", "acme"])).trim().to_string();
    assert!(again.starts_with("acme."), "{again}");
    assert!(stdout(&run(&["ls", "acme"])).lines().all(|l| !l.starts_with("acme/")), "a new acme starts empty");

    // The HTTP example: a JSON API over state, public on its own listener.
    let functions = served.functions.clone().expect("serve printed where HTTP functions are");
    let address = functions.trim_start_matches("http://");
    assert_eq!(
        request(address, "PUT", "/demo/notes/notes/first", "hello \"world\""),
        (201, "{\"name\":\"first\",\"text\":\"hello \\\"world\\\"\"}\n".to_string())
    );
    assert_eq!(
        request(address, "GET", "/demo/notes/notes/first", "").1,
        "{\"name\":\"first\",\"text\":\"hello \\\"world\\\"\"}\n"
    );
    assert_eq!(request(address, "POST", "/demo/notes/visits", ""), (200, "{\"visits\":1}\n".to_string()));
    assert_eq!(request(address, "POST", "/demo/notes/visits", ""), (200, "{\"visits\":2}\n".to_string()));
    assert_eq!(request(address, "DELETE", "/demo/notes/notes/first", "").0, 200);
    assert_eq!(request(address, "GET", "/demo/notes/notes/first", "").0, 404);
    let listed = stdout(&run(&["ls", "demo"]));
    let notes = listed.lines().find(|line| line.starts_with("demo/notes ")).expect("notes listed");
    assert!(notes.contains("http") && notes.ends_with(&format!("{functions}/demo/notes/")), "{notes}");

    // The Python and JavaScript HTTP templates, as made: `--http` holds
    // them to answering requests, `--public` opens their route.
    for template in ["python-http", "js-http"] {
        let name = format!("web-{template}");
        assert!(stdout(&run(&["new", template, &name])).contains(&name));
        let deployed = stdout(&run(&["deploy", &format!("demo/{name}"), &name, "--http", "--public"]));
        let described: serde_json::Value = serde_json::from_str(&deployed).unwrap();
        assert_eq!(described["kind"], "http", "{template}");
        let (status, body) = request(address, "GET", &format!("/demo/{name}/?name=ann"), "");
        assert_eq!(status, 200, "{template}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer, serde_json::json!({"hello": "ann", "method": "GET"}), "{template}");
        assert_eq!(request(address, "GET", &format!("/demo/{name}/elsewhere"), "").0, 404, "{template}");
    }
    // `--http` refuses what does not answer requests.
    let refused = run(&["deploy", "demo/not-web", "greet", "--http"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("http=true is for HTTP functions"), "{stderr}");
}

/// One HTTP/1.1 request over a plain connection: the status and the body
/// (of an answer with a length).
fn request(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, rest) = answer.split_once("\r\n\r\n").unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let (mut body, mut rest) = (String::new(), rest);
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size, 16).unwrap();
            if size == 0 {
                break body;
            }
            body.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
    } else {
        rest.to_string()
    };
    (status, body)
}

/// Build the Rust template project in `project` with its README's command,
/// offline (the workspace's own build fetched its dependencies), into a
/// target directory kept between runs; the path of its `NAME.wasm`.
fn build_template(project: &Path, name: &str) -> String {
    let target = concat!(env!("CARGO_TARGET_TMPDIR"), "/template-target");
    let built = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--offline", "--target", "wasm32-wasip2"])
        .current_dir(project)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .expect("run cargo");
    assert!(built.status.success(), "cargo build: {}", String::from_utf8_lossy(&built.stderr));
    format!("{target}/wasm32-wasip2/release/{name}.wasm")
}

#[test]
fn the_rust_templates_build_into_functions_that_answer() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path());
    let run = |args: &[&str]| shoal(dir.path(), &served.url, args);
    assert!(stdout(&run(&["new", "rust", "adder"])).contains("adder"));
    let wasm = build_template(&dir.path().join("adder"), "adder");
    let described: serde_json::Value = serde_json::from_str(&stdout(&run(&["deploy", "demo/adder", &wasm]))).unwrap();
    assert_eq!(described["kind"], "component");
    assert_eq!(stdout(&run(&["invoke", "demo/adder", "-d", "rust"])), "hello rust");
    assert_eq!(stdout(&run(&["invoke", "demo/adder"])), "hello world");

    // The HTTP template: a wasi:http component built with `wstd`.
    assert!(stdout(&run(&["new", "rust-http", "web"])).contains("web"));
    let wasm = build_template(&dir.path().join("web"), "web");
    let deployed = stdout(&run(&["deploy", "demo/web", &wasm, "--http", "--public"]));
    let described: serde_json::Value = serde_json::from_str(&deployed).unwrap();
    assert_eq!(described["kind"], "http");
    let functions = served.functions.clone().expect("serve printed where HTTP functions are");
    let address = functions.trim_start_matches("http://");
    assert_eq!(request(address, "GET", "/demo/web/?name=rust", ""), (200, "hello rust (GET)\n".to_string()));
    assert_eq!(request(address, "GET", "/demo/web/other", "").0, 404);
}

#[test]
fn logs_show_what_a_function_printed() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path());
    let run = |args: &[&str]| shoal(dir.path(), &served.url, args);
    // `upper` writes its reason for failing to stderr.
    std::fs::write(dir.path().join("latin1.txt"), b"caf\xe9").unwrap();
    assert!(!run(&["invoke", "demo/upper", "--data-file", "latin1.txt"]).status.success());
    let logs = stdout(&run(&["logs", "demo/upper"]));
    assert!(logs.contains("stderr input is not UTF-8"), "{logs}");

    // `-f` prints what is kept, then each new line as its call ends.
    use std::io::BufRead;
    let mut follower = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["logs", "demo/upper", "-f"])
        .current_dir(dir.path())
        .env("SHOAL_URL", &served.url)
        .env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_ADMIN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follower.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("input is not UTF-8"), "the kept line first");
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::fs::write(dir.path().join("latin1-again.txt"), b"\xff").unwrap();
    assert!(!run(&["invoke", "demo/upper", "--data-file", "latin1-again.txt"]).status.success());
    let next = lines.next().unwrap().unwrap();
    assert!(next.contains("stderr input is not UTF-8"), "{next}");
    follower.kill().unwrap();
    follower.wait().unwrap();
}

#[test]
fn without_a_token_the_client_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path());
    let elsewhere = tempfile::tempdir().unwrap();
    let output = shoal(elsewhere.path(), &served.url, &["invoke", "demo/hello"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unauthorized") && stderr.contains("--token"), "{stderr}");
}

#[test]
fn acknowledged_state_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve(dir.path());
    {
        let run = |args: &[&str]| shoal(dir.path(), &served.url, args);
        std::fs::write(dir.path().join("ops.wasm"), shoal_guests::STATE_OPS).unwrap();
        stdout(&run(&["deploy", "demo/ops", "ops.wasm"]));
        // Over HTTP, from a guest's push, from a guest's incr and append.
        assert!(run(&["state", "set", "demo/put", "by http"]).status.success());
        assert_eq!(stdout(&run(&["invoke", "demo/ops", "-d", "set pushed by-push\npush pushed"])), "ok");
        assert_eq!(stdout(&run(&["invoke", "demo/ops", "-d", "append log a\nappend log b"])), "ok");
        for _ in 0..3 {
            stdout(&run(&["invoke", "demo/counter", "-d", "5"]));
        }
        // Written to the local tier only: not acknowledged as durable.
        assert_eq!(stdout(&run(&["invoke", "demo/ops", "-d", "set local-only x"])), "ok");
    }
    // SIGKILL: no shutdown hook runs.
    served.child.kill().unwrap();
    served.child.wait().unwrap();

    let served = serve(dir.path());
    let run = |args: &[&str]| shoal(dir.path(), &served.url, args);
    assert_eq!(stdout(&run(&["state", "get", "demo/put"])), "by http");
    assert_eq!(stdout(&run(&["state", "get", "demo/pushed"])), "by-push");
    assert_eq!(stdout(&run(&["state", "get", "demo/log"])), "ab");
    assert_eq!(stdout(&run(&["state", "get", "demo/counter"])), "15");
    assert_eq!(stdout(&run(&["invoke", "demo/counter"])), "16");
    assert_eq!(stdout(&run(&["invoke", "demo/ops", "-d", "get local-only"])), "<none>");
}

#[test]
fn a_killed_nodes_lock_on_redis_passes_on_when_its_lease_expires() {
    let dir = tempfile::tempdir().unwrap();
    let redis = shoal_testkit::RedisServer::start();
    let url = redis.url();
    let mut served = serve_with(dir.path(), &["--redis", &url]);
    std::fs::write(dir.path().join("ops.wasm"), shoal_guests::STATE_OPS).unwrap();
    stdout(&shoal(dir.path(), &served.url, &["deploy", "demo/ops", "ops.wasm", "--timeout", "3s"]));
    // The state lives in Redis: the counter's key is there.
    assert_eq!(stdout(&shoal(dir.path(), &served.url, &["invoke", "demo/counter", "-d", "4"])), "4");
    assert_eq!(redis.command(&["HGET", "shoal:v:demo/counter", "0"]), "$1");

    // A call takes the lock and holds it; the node dies under it.
    let holder = {
        let (dir, url) = (dir.path().to_path_buf(), served.url.clone());
        std::thread::spawn(move || shoal(&dir, &url, &["invoke", "demo/ops", "-d", "lock k\nsleep k 60000"]))
    };
    let lock_key = "shoal:l:demo/k";
    let start = std::time::Instant::now();
    while redis.command(&["EXISTS", lock_key]) != ":1" {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "the lock was never taken");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let ttl: i64 = redis.command(&["PTTL", lock_key])[1..].parse().unwrap();
    assert!(ttl > 0 && ttl <= 4000, "the lease lasts the call's deadline + 1 s, not forever: {ttl} ms");
    served.child.kill().unwrap();
    served.child.wait().unwrap();
    assert!(!holder.join().unwrap().status.success(), "the holder's caller sees its call fail");

    // Restarted, the node's calls get the lock once the dead holder's
    // lease runs out (each attempt waits at most its own 3 s deadline).
    let served = serve_with(dir.path(), &["--redis", &url]);
    let start = std::time::Instant::now();
    loop {
        let attempt = shoal(dir.path(), &served.url, &["invoke", "demo/ops", "-d", "lock k\nunlock k"]);
        if attempt.status.success() {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(15), "{attempt:?}");
    }
    assert_eq!(redis.command(&["EXISTS", lock_key]), ":0", "released by its new holder");
}

#[test]
fn async_calls_accepted_before_kill_9_all_finish_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve(dir.path());
    std::fs::write(dir.path().join("chain.wasm"), shoal_guests::CHAIN).unwrap();
    let (done_before, pending) = {
        let run = |args: &[&str]| shoal(dir.path(), &served.url, args);
        stdout(&run(&["deploy", "demo/chain", "chain.wasm"]));
        // One call finished before the crash: its result must stay readable.
        let done = stdout(&run(&["invoke", "demo/echo", "--async", "-d", "kept"])).trim().to_string();
        let record: serde_json::Value = serde_json::from_str(&stdout(&run(&["call", "get", &done, "--wait"]))).unwrap();
        assert_eq!(record["output"], "kept");
        // Calls still sleeping when the node dies.
        let pending: Vec<String> = (0..10)
            .map(|_| stdout(&run(&["invoke", "demo/chain", "--async", "-d", "sleep 2000"])).trim().to_string())
            .collect();
        let record: serde_json::Value = serde_json::from_str(&stdout(&run(&["call", "get", &pending[0]]))).unwrap();
        assert!(matches!(record["status"].as_str(), Some("queued" | "running")), "{record}");
        (done, pending)
    };
    served.child.kill().unwrap();
    served.child.wait().unwrap();

    let served = serve(dir.path());
    let run = |args: &[&str]| shoal(dir.path(), &served.url, args);
    let record: serde_json::Value = serde_json::from_str(&stdout(&run(&["call", "get", &done_before]))).unwrap();
    assert_eq!((record["status"].as_str(), record["output"].as_str()), (Some("succeeded"), Some("kept")));
    for id in &pending {
        let record: serde_json::Value = serde_json::from_str(&stdout(&run(&["call", "get", id, "--wait"]))).unwrap();
        assert_eq!((record["status"].as_str(), record["output"].as_str()), (Some("succeeded"), Some("slept")), "{id}");
        assert!(record["attempts"].as_u64().unwrap() >= 1);
    }
}

#[test]
fn bench_sweeps_rates_and_writes_csv_and_charts() {
    let dir = tempfile::tempdir().unwrap();
    // Nonsense is refused before any node starts, saying why.
    for (args, says) in [
        (["--functions", "0", "--rates", "40"], "at least 1"),
        (["--functions", "1", "--rates", "4000000000"], "requests in one window"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_shoal")).arg("bench").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(says), "{args:?}: {stderr}");
    }
    let out = dir.path().join("results");
    let output = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["bench", "--functions", "1,3", "--rates", "40,80", "--duration", "250ms", "--warmup", "100ms"])
        .args(["--timeline", "--out"])
        .arg(&out)
        .env("SHOAL_LOG", "warn")
        .output()
        .expect("run shoal bench");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].starts_with("n_functions,tenant,offered_rps,achieved_rps"), "{csv}");
    assert_eq!(rows.len(), 1 + 2 * 2, "one row per (N, rate): {csv}");
    for row in &rows[1..] {
        let fields: Vec<&str> = row.split(',').collect();
        let (offered, achieved): (f64, f64) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
        assert!(achieved > 0.0 && achieved <= offered * 1.01, "{row}");
        assert_eq!(fields[10], "0", "no errors: {row}");
        let lag: f64 = fields[14].parse().unwrap();
        assert!(lag >= 0.0, "the generator's lateness is a time: {row}");
        let node_p99: f64 = fields[15].parse().expect("the node's own p99 bound");
        assert!(node_p99 > 0.0, "a bucket of the node's histogram: {row}");
    }
    // Every measured request (not the warm-up's) is in its timeline, in
    // the order it was meant to be sent.
    for (n, rate) in [(1, 40), (1, 80), (3, 40), (3, 80)] {
        let timeline = std::fs::read_to_string(out.join(format!("timeline-{n}-{rate}.csv"))).unwrap();
        let sent: Vec<f64> =
            timeline.lines().skip(1).map(|line| line.split(',').nth(1).unwrap().parse().unwrap()).collect();
        assert_eq!(sent.len(), rate / 4, "{rate}/s for 250 ms: {timeline}");
        assert!(sent.windows(2).all(|w| w[0] <= w[1]) && sent[0] >= 0.0 && sent[sent.len() - 1] < 250.0, "{timeline}");
    }
    for chart in ["latency.svg", "cpu.svg", "memory.svg", "responses.svg"] {
        let svg = std::fs::read_to_string(out.join(chart)).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 2, "{chart}: a line per N");
    }
}

/// RSS of process `pid`, in bytes.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn an_http_function_deployed_from_the_cli_streams_a_gib_through_a_flat_node() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let served = serve_with(dir.path(), &["--no-examples", "--http-max-body", "2GiB"]);
    let run = |args: &[&str]| shoal(dir.path(), &served.url, args);
    std::fs::write(dir.path().join("probe.wasm"), shoal_guests::HTTP_PROBE).unwrap();
    run(&["tenant", "create", "demo"]);
    let described: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["deploy", "demo/probe", "probe.wasm", "--public", "--timeout", "5m"])))
            .unwrap();
    let functions = served.functions.clone().expect("serve printed where HTTP functions are");
    assert_eq!(described["kind"], "http");
    assert_eq!(described["url"], format!("{functions}/demo/probe/"));
    let listed = stdout(&run(&["ls", "demo"]));
    assert!(listed.contains(&format!("{functions}/demo/probe/")), "{listed}");

    // A secret, set from a file, given to a function that names it.
    std::fs::write(dir.path().join("key.txt"), "k-123\n").unwrap();
    assert!(run(&["secret", "set", "demo", "API_KEY", "--value-file", "key.txt"]).status.success());
    stdout(&run(&["deploy", "demo/keyed", "probe.wasm", "--public", "--secret", "API_KEY"]));
    let secrets = stdout(&run(&["secret", "ls", "demo"]));
    assert!(secrets.contains("API_KEY") && secrets.contains("keyed") && !secrets.contains("k-123"), "{secrets}");
    let address = functions.trim_start_matches("http://");
    assert_eq!(request(address, "GET", "/demo/keyed/env?name=API_KEY", ""), (200, "k-123".to_string()));
    assert!(run(&["secret", "rm", "demo", "API_KEY"]).status.success());
    assert_eq!(request(address, "GET", "/demo/keyed/env?name=API_KEY", ""), (200, String::new()));

    // 1 GiB up, chunked, and the echo read as it comes back, over one
    // plain connection.
    let address = functions.trim_start_matches("http://").to_string();
    let mut upload = std::net::TcpStream::connect(&address).unwrap();
    let mut download = upload.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        write!(upload, "POST /demo/probe/echo HTTP/1.1\r\nhost: {address}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n").unwrap();
        let chunk = vec![b'z'; 1 << 20];
        for _ in 0..1024 {
            write!(upload, "{:x}\r\n", chunk.len()).unwrap();
            upload.write_all(&chunk).unwrap();
            upload.write_all(b"\r\n").unwrap();
        }
        upload.write_all(b"0\r\n\r\n").unwrap();
    });
    let node_pid = served.child.id();
    let rss_at_start = rss_of(node_pid);
    let (mut received, mut zs, mut peak) = (0u64, 0u64, 0u64);
    let mut buf = vec![0u8; 256 << 10];
    let mut tail = Vec::new();
    loop {
        let n = download.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        zs += buf[..n].iter().filter(|b| **b == b'z').count() as u64;
        received += n as u64;
        if received % (32 << 20) < n as u64 {
            peak = peak.max(rss_of(node_pid));
        }
        tail.extend_from_slice(&buf[..n]);
        let keep = tail.len().saturating_sub(16);
        tail.drain(..keep);
    }
    sender.join().unwrap();
    assert_eq!(zs, 1 << 30, "every byte came back");
    assert!(tail.ends_with(b"0\r\n\r\n"), "the chunked answer ended cleanly: {tail:?}");
    let grown = peak.saturating_sub(rss_at_start);
    assert!(grown < 128 << 20, "the node's RSS grew by {} MiB while 1 GiB streamed through it", grown >> 20);
}

#[test]
fn queued_messages_survive_kill_9_and_are_all_handled_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve(dir.path());
    std::fs::write(dir.path().join("consume.wasm"), shoal_guests::QUEUE_CONSUMER).unwrap();
    let ids: Vec<String> = {
        let run = |args: &[&str]| shoal(dir.path(), &served.url, args);
        stdout(&run(&["deploy", "demo/consume", "consume.wasm"]));
        let added = run(&[
            "queue",
            "add",
            "demo/work",
            "--consumer",
            "consume",
            "--batch-size",
            "50",
            "--batch-wait",
            "10ms",
            "--retry-delay",
            "10ms",
            "--max-attempts",
            "10",
            "--visibility-timeout",
            "8s",
        ]);
        stdout(&added);
        let lines: String = (0..20_000).map(|i| format!("m{i}\n")).collect();
        std::fs::write(dir.path().join("messages.txt"), lines).unwrap();
        stdout(&run(&["queue", "send", "demo/work", "--data-file", "messages.txt", "--lines"]))
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(ids.len(), 20_000);
    let token = std::fs::read_to_string(dir.path().join(".shoal/admin.token")).unwrap().trim().to_string();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = reqwest::Client::new();
    let queue = |url: String| {
        let (http, token) = (http.clone(), token.clone());
        async move {
            let answer = http.get(format!("{url}/v1/queues/demo/work")).bearer_auth(&token).send().await.unwrap();
            answer.json::<serde_json::Value>().await.unwrap()
        }
    };
    // Killed with some handled, some in flight, most still waiting.
    runtime.block_on(async {
        let started = std::time::Instant::now();
        while queue(served.url.clone()).await["acked"].as_u64().unwrap() < 1000 {
            assert!(started.elapsed() < std::time::Duration::from_secs(60), "nothing handled");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    served.child.kill().unwrap();
    served.child.wait().unwrap();

    // Restarted: what was waiting is taken, what was in flight is taken
    // again once its lease runs out, and everything is handled.
    let served = serve(dir.path());
    let counts = runtime.block_on(async {
        let started = std::time::Instant::now();
        loop {
            let view = queue(served.url.clone()).await;
            if view["messages"] == 0 {
                assert_eq!(view["dead"], 0, "{view}");
                break;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(120), "not drained: {view}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let listed: serde_json::Value = http
            .get(format!("{}/v1/state/demo", served.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for key in listed["keys"].as_array().unwrap() {
            let key = key["key"].as_str().unwrap();
            if let Some(rest) = key.strip_prefix("seen/") {
                let url = format!("{}/v1/state/demo/seen%2F{}", served.url, rest.replace('/', "%2F"));
                let lines = http.get(url).bearer_auth(&token).send().await.unwrap().text().await.unwrap();
                for id in lines.lines() {
                    *counts.entry(id.to_string()).or_default() += 1;
                }
            }
        }
        counts
    });
    let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
    assert_eq!(missing, 0, "{missing} of 20,000 messages were never handled");
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    // Handled twice: at most the batches in flight when the node died
    // (2 batches of 50), handled before the crash but not yet acknowledged.
    assert!(duplicates <= 100, "{duplicates} handled twice");
    eprintln!("queue across kill -9: 20,000 handled, {duplicates} twice");
}
