//! `shoal bench --noisy`: a victim tenant's latency and success alone and
//! beside each hostile tenant of the noisy-neighbour suite, on one node in
//! one run, so the ratios compare like with like.
//!
//! The victim calls a cheap function (`hello`) at a fixed rate, each call
//! on its own task (a slow answer does not slow the rate down). Each attacker runs alone beside it: started, given
//! a second to build up, measured for the duration, stopped; then the node
//! drains (no call running) before the next one. The victim is measured
//! alone first and again last, so drift on a shared machine shows.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{ADMIN, NodeProcess, create_tenant, deploy, percentile};

/// What the victim saw over one measurement.
struct Seen {
    calls: usize,
    ok: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// The victim's calls at `rate` per second for `time`.
async fn victim(http: &reqwest::Client, url: &str, rate: u32, time: Duration) -> Seen {
    let total = (f64::from(rate) * time.as_secs_f64()).round() as u64;
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut calls = Vec::with_capacity(total as usize);
    for i in 0..total {
        let intended = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
        tokio::time::sleep_until(intended).await;
        let (http, url) = (http.clone(), url.to_string());
        // Timed from when it is sent: the runtime's timer wakes up to a
        // millisecond after the intended time, which is the generator's
        // delay, not the node's (at this rate nothing else holds it back).
        let sent = Instant::now();
        calls.push(tokio::spawn(async move {
            let response = http.post(url).bearer_auth(ADMIN).body("you").send().await;
            let ok = match response {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok_and(|b| b.as_ref() == b"hello you"),
                Err(_) => false,
            };
            (ok, u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX))
        }));
    }
    let mut latencies = Vec::with_capacity(calls.len());
    let mut ok = 0;
    for call in calls {
        if let Ok((good, us)) = call.await {
            ok += usize::from(good);
            latencies.push(us);
        }
    }
    latencies.sort_unstable();
    Seen {
        calls: total as usize,
        ok,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().map_or(0.0, |us| *us as f64 / 1000.0),
    }
}

/// A hostile tenant's tasks, repeating their requests until stopped.
#[derive(Default)]
struct Attack {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Attack {
    /// `n` tasks each sending `request(i)` (the attacker's `i`th) again and
    /// again.
    fn repeat(
        &mut self,
        http: &reqwest::Client,
        n: usize,
        request: impl Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
    ) {
        let request = Arc::new(request);
        for _ in 0..n {
            let (http, stop, sent, request) = (http.clone(), self.stop.clone(), self.sent.clone(), request.clone());
            self.tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = sent.fetch_add(1, Ordering::Relaxed);
                    let refused = match request(&http, i).bearer_auth(ADMIN).send().await {
                        Ok(r) => {
                            let status = r.status();
                            let _ = r.bytes().await;
                            status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        }
                        Err(_) => true,
                    };
                    if refused {
                        // Refused at once: do not spin.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }));
        }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        self.sent.load(Ordering::Relaxed)
    }
}

/// Distinct modules the compile bombs deploy, in turn (each compiled
/// once: more than a run compiles).
const BOMBS: u64 = 40;

/// The attackers of the noisy-neighbour suite, by name.
const ATTACKERS: &[&str] = &[
    "loops",
    "flood",
    "spawns",
    "memory-bombs",
    "log-floods",
    "local-tier",
    "async-flood",
    "slow-deploys",
    "compile-bombs",
];

/// Deploy what `name` needs (tenant `hostile`) and start it.
async fn start(name: &str, http: &reqwest::Client, base: &str) -> anyhow::Result<Attack> {
    let mut attack = Attack::default();
    let invoke = |function: &str| format!("{base}/v1/functions/hostile/{function}/invoke");
    let post = |url: String, input: &'static [u8]| move |http: &reqwest::Client, _| http.post(&url).body(input);
    match name {
        "loops" => {
            for i in 0..16 {
                let function = format!("spin{i}");
                deploy(http, base, &format!("hostile/{function}"), "timeout_ms=20000", shoal_guests::MISBEHAVE).await?;
                attack.repeat(http, 2, post(invoke(&function), b"loop"));
            }
        }
        "flood" => {
            deploy(http, base, "hostile/hello", "", shoal_guests::HELLO).await?;
            attack.repeat(http, 64, post(invoke("hello"), b"x"));
        }
        "spawns" => {
            deploy(http, base, "hostile/chain", "timeout_ms=10000", shoal_guests::CHAIN).await?;
            deploy(http, base, "hostile/spin", "timeout_ms=10000", shoal_guests::MISBEHAVE).await?;
            attack.repeat(http, 3, post(invoke("chain"), b"spawn-all 1000 spin loop"));
            attack.repeat(http, 2, post(invoke("chain"), b"deep 0"));
        }
        "memory-bombs" => {
            deploy(http, base, "hostile/chain", "", shoal_guests::CHAIN).await?;
            deploy(http, base, "hostile/bomb", "memory_mb=256&timeout_ms=2000", shoal_guests::MISBEHAVE).await?;
            attack.repeat(http, 2, post(invoke("chain"), b"spawn-all 100 bomb oom"));
            attack.repeat(http, 8, post(invoke("bomb"), b"oom"));
        }
        "log-floods" => {
            deploy(http, base, "hostile/printer", "timeout_ms=30000", shoal_guests::MISBEHAVE).await?;
            attack.repeat(http, 6, post(invoke("printer"), b"print 1000000"));
        }
        "local-tier" => {
            deploy(http, base, "hostile/state", "memory_mb=128", shoal_guests::STATE_OPS).await?;
            let url = invoke("state");
            attack.repeat(http, 4, move |http, i| {
                // Eight 8 MiB values under new keys; every third call fails
                // after writing.
                let mut script: String = (0..8).map(|k| format!("fill k{i}-{k} 1 {}\n", 8 << 20)).collect();
                if i % 3 == 0 {
                    script.push_str("panic x\n");
                }
                http.post(&url).body(script)
            });
        }
        "async-flood" => {
            deploy(http, base, "hostile/chain", "", shoal_guests::CHAIN).await?;
            attack.repeat(http, 16, post(format!("{}?async=true", invoke("chain")), b"sleep 1000"));
        }
        "slow-deploys" => {
            for (worker, language) in ["python", "python", "javascript", "javascript"].into_iter().enumerate() {
                let url = format!("{base}/v1/functions/hostile/slow{worker}?language={language}");
                attack.repeat(http, 1, move |http, i| {
                    // New source each time: nothing is shared or cached.
                    let source = match language {
                        "python" => format!(
                            "# {i}\nn = 0\nfor k in range(2_000_000):\n    n += k\n\ndef handle(input):\n    return str(n)\n"
                        ),
                        _ => format!(
                            "// {i}\nlet n = 0;\nfor (let k = 0; k < 5000000; k++) {{ n += k; }}\nfunction handle(input) {{ return String(n); }}\nmodule.exports = {{ handle }};\n"
                        ),
                    };
                    http.put(&url).body(source)
                });
            }
        }
        "compile-bombs" => {
            // Made before the attack starts: making them is itself work
            // (tens of milliseconds each) that would share this machine's
            // CPU with the node and the victim.
            let bombs: Vec<bytes::Bytes> = tokio::task::spawn_blocking(|| {
                (0..BOMBS).map(|tag| shoal_guests::slow_to_compile(tag, 12_000).into()).collect()
            })
            .await
            .context("making the compile bombs")?;
            let base = base.to_string();
            attack.repeat(http, 3, move |http, i| {
                let url = format!("{base}/v1/functions/hostile/bomb{}", i % 3);
                http.put(url).body(bombs[(i % BOMBS) as usize].clone())
            });
        }
        other => anyhow::bail!("no attacker `{other}` (known: {})", ATTACKERS.join(", ")),
    }
    Ok(attack)
}

/// Until the node runs no call (the last attacker's are over), at most
/// `limit`.
async fn drain(http: &reqwest::Client, base: &str, limit: Duration) {
    let started = Instant::now();
    while started.elapsed() < limit {
        let running = async {
            let text = http.get(format!("{base}/metrics")).bearer_auth(ADMIN).send().await.ok()?.text().await.ok()?;
            text.lines().find_map(|l| l.strip_prefix("shoal_calls_running ")).and_then(|v| v.trim().parse::<u64>().ok())
        }
        .await;
        if running == Some(0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) struct NoisyArgs<'a> {
    pub attackers: &'a [String],
    pub victim_rate: u32,
    pub duration: Duration,
    pub out: &'a std::path::Path,
    pub node_args: &'a [String],
    pub node_cpus: Option<&'a str>,
}

pub(super) async fn run(args: NoisyArgs<'_>) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(60))
        .build()
        .context("an HTTP client")?;
    let node = NodeProcess::start(args.node_args, args.node_cpus)?;
    eprintln!("bench: noisy neighbours on a node at {}", node.base);
    for tenant in ["victim", "hostile"] {
        create_tenant(&http, &node.base, tenant).await?;
    }
    deploy(&http, &node.base, "victim/hello", "", shoal_guests::HELLO).await?;
    let url = format!("{}/v1/functions/victim/hello/invoke", node.base);
    // Measured a few times: from then on the scheduler knows it is cheap.
    for _ in 0..20 {
        http.post(&url).bearer_auth(ADMIN).body("you").send().await?.error_for_status()?;
    }
    let attackers: Vec<String> = if args.attackers.is_empty() {
        ATTACKERS.iter().map(|a| a.to_string()).collect()
    } else {
        args.attackers.to_vec()
    };
    let mut csv =
        vec!["attacker,victim_calls,victim_ok,p50_ms,p99_ms,max_ms,p99_vs_alone,attacker_requests".to_string()];
    let alone = victim(&http, &url, args.victim_rate, args.duration).await;
    let mut row = |name: &str, seen: &Seen, sent: u64| {
        let ratio = seen.p99_ms / alone.p99_ms.max(1e-3);
        eprintln!(
            "bench: victim beside {name}: {}/{} ok, p50 {:.2} ms, p99 {:.2} ms ({ratio:.2}× alone), max {:.2} ms; attacker sent {sent}",
            seen.ok, seen.calls, seen.p50_ms, seen.p99_ms, seen.max_ms
        );
        csv.push(format!(
            "{name},{},{},{:.3},{:.3},{:.3},{ratio:.2},{sent}",
            seen.calls, seen.ok, seen.p50_ms, seen.p99_ms, seen.max_ms
        ));
    };
    row("none", &alone, 0);
    for name in &attackers {
        let attack = start(name, &http, &node.base).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let seen = victim(&http, &url, args.victim_rate, args.duration).await;
        let sent = attack.stop().await;
        row(name, &seen, sent);
        drain(&http, &node.base, Duration::from_secs(30)).await;
    }
    let again = victim(&http, &url, args.victim_rate, args.duration).await;
    row("none (again)", &again, 0);
    std::fs::create_dir_all(args.out).with_context(|| format!("creating {}", args.out.display()))?;
    std::fs::write(args.out.join("noisy.csv"), csv.join("\n") + "\n").context("writing noisy.csv")?;
    eprintln!("bench: results in {}", args.out.join("noisy.csv").display());
    Ok(())
}
