//! `shoal bench`: an open-loop load generator reproducing the experiments
//! of the paper Shoal answers (OpenWhisk under load over 1, 10, 100
//! functions), and measuring Shoal's own goals.
//!
//! For each number of functions N it starts a fresh node (`shoal serve`,
//! this same binary, as a child process on loopback), deploys N functions,
//! and sweeps the offered rate. Arrivals follow a fixed schedule (rate R:
//! one every 1/R s, round robin over the functions) whatever the node
//! does, and each latency runs from the *intended* send time, so a slow
//! node cannot hide its queueing by slowing the generator down
//! (coordinated omission). Each rate is first offered for a warm-up
//! (`--warmup`, not counted), so that the window measures the node in its
//! steady state, not the generator opening its connections. For every
//! rate it records what was achieved:
//! responses per second, latency p50/p99/p999, refusals (429) and their
//! latency, errors, the node's CPU seconds and RSS. Results go to a CSV
//! file and four SVG charts: latency vs throughput, CPU vs throughput,
//! memory vs throughput, responses vs submitted.

mod noisy;
mod plot;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::Semaphore;

use crate::units::parse_duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// `echo` of a 16-byte input: the platform's own overhead.
    Noop,
    /// `fib` of `--fib`: CPU-bound.
    Cpu,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Numbers of functions to spread the load over, one node each.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    functions: Vec<u32>,
    /// Offered rates to sweep, in requests per second.
    #[arg(long, value_delimiter = ',', default_value = "2000,5000,10000,20000,30000,40000")]
    rates: Vec<u32>,
    /// How long each rate is offered.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Before each rate's measured window, the same rate offered for this
    /// long and not counted: the generator opens the connections the rate
    /// needs (a connection opened mid-window costs its request a connect
    /// and an accept: without a warm-up, the first fifth of a second of an
    /// 8,000/s window waited up to 130 ms) and the node settles.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Also write every measured request's send time (ms from the window's
    /// start) and latency to `OUT/timeline-N-RATE.csv`: where in the
    /// window the slow ones were.
    #[arg(long)]
    timeline: bool,
    #[arg(long, value_enum, default_value = "noop")]
    workload: Workload,
    /// The input of `fib` for `--workload cpu`.
    #[arg(long, default_value_t = 20)]
    fib: u32,
    /// Two tenants: half the functions each, tenant `a` offering SKEW times
    /// the rate of tenant `b`; results per tenant.
    #[arg(long)]
    skew: Option<u32>,
    /// CPU-bound calls (`fib --background-fib`) at this rate beside the
    /// measured ones, which are reported alone.
    #[arg(long)]
    background_rate: Option<f64>,
    #[arg(long, default_value_t = 36)]
    background_fib: u32,
    /// Requests in flight at most, per tenant (the generator's connections).
    /// High by default so that the offered load reaches the node: a
    /// request waiting here for a connection would be queueing the node
    /// never sees.
    #[arg(long, default_value_t = 8192)]
    connections: usize,
    /// A response later than this after its intended send time counts as
    /// late (the functions' default timeout).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    deadline: Duration,
    /// Where the CSV and the charts go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Extra flags for the node, e.g. `--node-arg=--max-concurrent-calls=64`.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// Instead of the sweep: a victim tenant's calls (`hello` at
    /// `--victim-rate`) alone and beside each hostile tenant of the
    /// noisy-neighbour suite in turn, for `--duration` each; results in
    /// `OUT/noisy.csv`.
    #[arg(long)]
    noisy: bool,
    /// With `--noisy`: the attackers to run (default: all of them).
    #[arg(long, value_delimiter = ',')]
    attackers: Vec<String>,
    /// With `--noisy`: the victim's calls per second.
    #[arg(long, default_value_t = 50)]
    victim_rate: u32,
    /// Run the node on these CPUs only (`taskset -c LIST`, e.g. `1`), so
    /// that it and the generator do not take turns on the same cores. Run
    /// the generator itself under `taskset -c` on the others.
    #[arg(long)]
    node_cpus: Option<String>,
    /// Deploy N distinct binaries (the workload's, each with a custom
    /// section naming its function): each its own compiled code, as a
    /// provider's functions are. Without it every name deploys the same
    /// binary, compiled once.
    #[arg(long)]
    distinct: bool,
}

const ADMIN: &str = "bench-admin-token-0123456789abcdef";

/// A node under test: a `shoal serve` child process.
struct NodeProcess {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    fn start(extra: &[String], cpus: Option<&str>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("a data directory for the node")?;
        let exe = std::env::current_exe().context("finding the shoal binary")?;
        let mut command = match cpus {
            Some(cpus) => {
                let mut taskset = Command::new("taskset");
                taskset.args(["-c", cpus]).arg(exe);
                taskset
            }
            None => Command::new(exe),
        };
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--no-examples", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .env("SHOAL_ADMIN_TOKEN", ADMIN)
            .env("SHOAL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting `shoal serve`")?;
        let stderr = child.stderr.take().context("the node's stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut base = None;
        for line in lines.by_ref() {
            let line = line.context("reading the node's stderr")?;
            if let Some(rest) = line.strip_prefix("shoal: serving ") {
                base = rest.split_whitespace().next().map(str::to_string);
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        let base = base.context("the node never said where it serves")?;
        Ok(Self { child, base, _dir: dir })
    }

    /// User + system CPU seconds the node has used.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces), 1-based 14 and 15.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
            + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
        ticks as f64 / clock_ticks()
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }
}

/// Clock ticks per second in `/proc/PID/stat` (USER_HZ, fixed at 100 in
/// the Linux ABI whatever the kernel's own tick rate).
fn clock_ticks() -> f64 {
    100.0
}

/// One target of the load: a function and the input it gets.
#[derive(Clone)]
struct Target {
    url: String,
    tenant: usize,
    input: &'static [u8],
}

#[derive(Default)]
struct Tally {
    ok_us: Vec<u64>,
    refused_us: Vec<u64>,
    /// With `--timeline`, every request: its intended send time (µs from
    /// the window's start), its latency (µs) and whether it succeeded.
    timeline: Vec<(u64, u64, bool)>,
    /// How late the generator got to each request (µs after its intended
    /// time, before any wait for a free connection): what of a latency is
    /// the generator's own.
    lag_us: Vec<u64>,
    errors: u64,
    /// From the first intended send to this tenant's last response.
    span: Duration,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

struct Row {
    n_functions: u32,
    tenant: &'static str,
    offered: f64,
    achieved: f64,
    /// Responses within the deadline, per second.
    goodput: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    refused: usize,
    refused_p99_ms: f64,
    generator_lag_p99_ms: f64,
    /// The node's own view: the upper bound (seconds) of the bucket of its
    /// call-duration histogram that holds the window's p99 (all tenants;
    /// from admission to the call's end, HTTP excluded).
    node_p99_bound: Option<f64>,
    errors: u64,
    cpu_cores: f64,
    cpu_us_per_call: f64,
    rss_mib: f64,
}

const CSV_HEADER: &str = "n_functions,tenant,offered_rps,achieved_rps,goodput_rps,p50_ms,p99_ms,p999_ms,refused,refused_p99_ms,errors,node_cpu_cores,node_cpu_us_per_response,node_rss_mib,generator_lag_p99_ms,node_p99_bound_ms";

impl Row {
    fn csv(&self) -> String {
        format!(
            "{},{},{:.0},{:.1},{:.1},{:.3},{:.3},{:.3},{},{:.3},{},{:.3},{:.1},{:.1},{:.3},{}",
            self.n_functions,
            self.tenant,
            self.offered,
            self.achieved,
            self.goodput,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.refused,
            self.refused_p99_ms,
            self.errors,
            self.cpu_cores,
            self.cpu_us_per_call,
            self.rss_mib,
            self.generator_lag_p99_ms,
            self.node_p99_bound.map_or(String::new(), bound_ms)
        )
    }
}

async fn deploy(
    http: &reqwest::Client,
    base: &str,
    function: &str,
    query: &str,
    wasm: impl Into<reqwest::Body>,
) -> anyhow::Result<()> {
    let response = http
        .put(format!("{base}/v1/functions/{function}?{query}"))
        .bearer_auth(ADMIN)
        .body(wasm)
        .send()
        .await
        .with_context(|| format!("deploying {function}"))?;
    if !response.status().is_success() {
        bail!("deploying {function}: {} {}", response.status(), response.text().await.unwrap_or_default());
    }
    Ok(())
}

async fn create_tenant(http: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<()> {
    let response = http
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("creating tenant {name}: {}", response.status());
    }
    Ok(())
}

/// Offer `rate` requests/s for `duration`, round robin over `targets`,
/// on a fixed schedule; tally per tenant. Requests run on the caller's
/// runtime, the schedule is kept by a thread of its own sleeping to each
/// intended send time (the runtime's timers have a 1 ms grain, which
/// would add up to a millisecond of the generator's own delay to every
/// latency).
#[allow(clippy::too_many_arguments)]
async fn offer(
    http: &reqwest::Client,
    timeline: bool,
    targets: &[Target],
    weights: &[u32],
    rate: f64,
    duration: Duration,
    in_flight: &[Arc<Semaphore>],
    n_tenants: usize,
) -> Vec<Tally> {
    let tallies: Arc<Mutex<Vec<Tally>>> = Arc::new(Mutex::new((0..n_tenants).map(|_| Tally::default()).collect()));
    // Expand the round robin by tenant weights (skew): a target of weight
    // w appears w times per cycle.
    let cycle: Vec<Target> =
        targets.iter().flat_map(|t| std::iter::repeat_n(t.clone(), weights[t.tenant] as usize)).collect();
    let total = (rate * duration.as_secs_f64()).round() as u64;
    // Each request's task ends by adding a permit here (also if it
    // panics): the window is over when all have. Tasks are not joined one
    // by one: a finished task's memory then stays until its handle is
    // awaited, and a window's tens of thousands of them grew the
    // generator by hundreds of MiB, its page faults stalling the schedule
    // by up to 300 ms.
    let finished = Arc::new(Semaphore::new(0));
    let window =
        Window { cycle, rate, total, in_flight: in_flight.to_vec(), tallies: tallies.clone(), finished, timeline };
    let (http, runtime, finished) = (http.clone(), tokio::runtime::Handle::current(), window.finished.clone());
    let scheduler = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(50);
        for i in 0..window.total {
            let intended = window.intended(start, i);
            if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            runtime.spawn(window.request(&http, start, i));
        }
    });
    match tokio::task::spawn_blocking(move || scheduler.join()).await {
        // `run` keeps a window's requests within u32.
        Ok(Ok(())) => drop(finished.acquire_many(u32::try_from(total).unwrap_or(u32::MAX)).await),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(e) => panic!("the generator's scheduler was lost: {e}"),
    }
    std::mem::take(&mut *tallies.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// One window of an offered rate.
struct Window {
    /// The targets in round-robin order (a tenant's weight times each).
    cycle: Vec<Target>,
    rate: f64,
    total: u64,
    in_flight: Vec<Arc<Semaphore>>,
    tallies: Arc<Mutex<Vec<Tally>>>,
    finished: Arc<Semaphore>,
    /// Whether to keep every request's timing (`--timeline`).
    timeline: bool,
}

impl Window {
    fn intended(&self, start: Instant, i: u64) -> Instant {
        start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// The `i`th request, meant to be sent at its intended time: send it,
    /// read the response and tally it.
    fn request(&self, http: &reqwest::Client, start: Instant, i: u64) -> impl Future<Output = ()> + Send + 'static {
        let intended = self.intended(start, i);
        let target = self.cycle[(i as usize) % self.cycle.len()].clone();
        // Each tenant has connections of its own, as separate clients would.
        let (http, in_flight, tallies) = (http.clone(), self.in_flight[target.tenant].clone(), self.tallies.clone());
        let (done, timeline) = (Finished(self.finished.clone()), self.timeline);
        async move {
            let _done = done;
            // The generator's own lateness: before any wait for one of the
            // `--connections` (that wait is the node's backpressure).
            let lag = u64::try_from(intended.elapsed().as_micros()).unwrap_or(u64::MAX);
            let _permit = in_flight.acquire_owned().await;
            let response = http.post(&target.url).bearer_auth(ADMIN).body(target.input).send().await;
            let outcome = match response {
                Ok(r) => {
                    let status = r.status();
                    let _ = r.bytes().await;
                    Some(status)
                }
                Err(_) => None,
            };
            let elapsed = u64::try_from(intended.elapsed().as_micros()).unwrap_or(u64::MAX);
            let sent = u64::try_from(intended.duration_since(start).as_micros()).unwrap_or(u64::MAX);
            let mut tallies = tallies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let tally = &mut tallies[target.tenant];
            tally.span = tally.span.max(start.elapsed());
            if timeline {
                tally.timeline.push((sent, elapsed, outcome.is_some_and(|s| s.is_success())));
            }
            tally.lag_us.push(lag);
            match outcome {
                Some(s) if s.is_success() => tally.ok_us.push(elapsed),
                Some(s) if s == reqwest::StatusCode::TOO_MANY_REQUESTS => tally.refused_us.push(elapsed),
                _ => tally.errors += 1,
            }
        }
    }
}

/// The node's own histogram of call durations, as cumulative counts per
/// bucket bound (seconds), read from its metrics; empty if unreadable.
async fn node_durations(http: &reqwest::Client, base: &str) -> Vec<(f64, u64)> {
    match http.get(format!("{base}/metrics")).bearer_auth(ADMIN).send().await {
        Ok(response) if response.status().is_success() => parse_durations(&response.text().await.unwrap_or_default()),
        _ => Vec::new(),
    }
}

/// The node-wide call-duration buckets of a metrics text.
fn parse_durations(text: &str) -> Vec<(f64, u64)> {
    text.lines()
        .filter_map(|line| line.strip_prefix("shoal_call_duration_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (bound, count) = rest.split_once("\"} ")?;
            let bound = if bound == "+Inf" { f64::INFINITY } else { bound.parse().ok()? };
            Some((bound, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bound of the node's bucket that holds the p99 of the calls it ran
/// between two reads of its histogram (seconds; infinite: past the last
/// finite bound). None if either read failed, the two do not have the
/// same buckets, or it ran no call in between.
fn node_p99_bound(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<f64> {
    if before.is_empty() || before.len() != after.len() || before.iter().zip(after).any(|(b, a)| b.0 != a.0) {
        return None;
    }
    let counts: Vec<(f64, u64)> = before.iter().zip(after).map(|(b, a)| (a.0, a.1.saturating_sub(b.1))).collect();
    let total = counts.iter().map(|&(_, n)| n).max()?;
    if total == 0 {
        return None;
    }
    let rank = (total as f64 * 0.99).ceil() as u64;
    counts.iter().find(|&&(_, n)| n >= rank).map(|&(bound, _)| bound)
}

/// A bucket bound in ms as the CSV and the summary show it.
fn bound_ms(bound_s: f64) -> String {
    if bound_s.is_finite() { format!("{}", bound_s * 1e3) } else { "inf".to_string() }
}

/// Adds a permit to its semaphore when dropped: a request's task is over.
struct Finished(Arc<Semaphore>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// Background CPU-bound load until `stop` (for the time-slicing run).
fn background(
    http: reqwest::Client,
    url: String,
    input: bytes::Bytes,
    rate: f64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    tokio::spawn(async move {
        let mut next = tokio::time::Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            next += Duration::from_secs_f64(1.0 / rate);
            tokio::time::sleep_until(next).await;
            let (http, url, input) = (http.clone(), url.clone(), input.clone());
            tokio::spawn(async move {
                let _ = http.post(url).bearer_auth(ADMIN).body(input).send().await;
            });
        }
    });
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.noisy {
        return noisy::run(noisy::NoisyArgs {
            attackers: &args.attackers,
            victim_rate: args.victim_rate,
            duration: args.duration,
            out: &args.out,
            node_args: &args.node_args,
            node_cpus: args.node_cpus.as_deref(),
        })
        .await;
    }
    if args.functions.contains(&0) {
        bail!("--functions: every number of functions must be at least 1");
    }
    let longest = args.duration.max(args.warmup).as_secs_f64();
    if args.rates.iter().any(|&rate| f64::from(rate) * longest > f64::from(u32::MAX)) {
        bail!("--rates × --duration: over {} requests in one window", u32::MAX);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(60))
        .build()
        .context("an HTTP client")?;
    let n_tenants = if args.skew.is_some() { 2 } else { 1 };
    let in_flight: Vec<Arc<Semaphore>> = (0..n_tenants).map(|_| Arc::new(Semaphore::new(args.connections))).collect();
    let tenants: Vec<&'static str> = if args.skew.is_some() { vec!["a", "b"] } else { vec!["bench"] };
    let weights: Vec<u32> = match args.skew {
        Some(k) => vec![k.max(1), 1],
        None => vec![1],
    };
    let (wasm, input): (&'static [u8], &'static [u8]) = match args.workload {
        Workload::Noop => (shoal_guests::ECHO, b"0123456789abcdef"),
        Workload::Cpu => (shoal_guests::FIB, Box::leak(args.fib.to_string().into_bytes().into_boxed_slice())),
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut csv = vec![CSV_HEADER.to_string()];
    for &n in &args.functions {
        // Room for every connection the generator opens.
        let mut node_args = vec![format!("--max-connections={}", args.connections * n_tenants + 1024)];
        node_args.extend(args.node_args.iter().cloned());
        let node = NodeProcess::start(&node_args, args.node_cpus.as_deref())?;
        eprintln!("bench: N = {n} functions on a node at {}", node.base);
        for tenant in &tenants {
            create_tenant(&http, &node.base, tenant).await?;
        }
        let mut targets = Vec::new();
        for i in 0..n {
            let tenant = (i as usize) % tenants.len();
            let function = format!("{}/f{i}", tenants[tenant]);
            let binary = if args.distinct { shoal_guests::tagged(wasm, i) } else { wasm.to_vec() };
            deploy(&http, &node.base, &function, "", binary).await?;
            targets.push(Target { url: format!("{}/v1/functions/{function}/invoke", node.base), tenant, input });
        }
        // Warm every function once.
        for target in &targets {
            let _ = http.post(&target.url).bearer_auth(ADMIN).body(target.input).send().await;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(rate) = args.background_rate {
            deploy(&http, &node.base, &format!("{}/cpu", tenants[0]), "timeout_ms=60000", shoal_guests::FIB).await?;
            let url = format!("{}/v1/functions/{}/cpu/invoke", node.base, tenants[0]);
            background(http.clone(), url, args.background_fib.to_string().into(), rate, stop.clone());
        }
        for &rate in &args.rates {
            let rate = f64::from(rate);
            if !args.warmup.is_zero() {
                offer(&http, false, &targets, &weights, rate, args.warmup, &in_flight, tenants.len()).await;
            }
            let durations_before = node_durations(&http, &node.base).await;
            let cpu_before = node.cpu_seconds();
            let started = Instant::now();
            let tallies =
                offer(&http, args.timeline, &targets, &weights, rate, args.duration, &in_flight, tenants.len()).await;
            // A tenant's rates are over the time until its last response: a
            // node that falls behind shows a lower rate, not the offered one.
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = node.cpu_seconds() - cpu_before;
            let rss = node.rss_mib();
            let node_p99 = node_p99_bound(&durations_before, &node_durations(&http, &node.base).await);
            let total_ok: usize = tallies.iter().map(|t| t.ok_us.len()).sum();
            let deadline_us = u64::try_from(args.deadline.as_micros()).unwrap_or(u64::MAX);
            let weight_sum: u32 = weights.iter().sum();
            if args.timeline {
                let mut lines = vec!["tenant,sent_ms,latency_ms,ok".to_string()];
                for (i, tally) in tallies.iter().enumerate() {
                    let mut timeline = tally.timeline.clone();
                    timeline.sort_unstable();
                    lines.extend(timeline.iter().map(|(sent, latency, ok)| {
                        format!("{},{:.3},{:.3},{ok}", tenants[i], *sent as f64 / 1e3, *latency as f64 / 1e3)
                    }));
                }
                let path = args.out.join(format!("timeline-{n}-{rate:.0}.csv"));
                std::fs::write(&path, lines.join("\n") + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            for (i, mut tally) in tallies.into_iter().enumerate() {
                let wall = tally.span.as_secs_f64().max(args.duration.as_secs_f64());
                tally.ok_us.sort_unstable();
                tally.refused_us.sort_unstable();
                tally.lag_us.sort_unstable();
                let row = Row {
                    n_functions: n,
                    tenant: tenants[i],
                    offered: rate * f64::from(weights[i]) / f64::from(weight_sum),
                    achieved: tally.ok_us.len() as f64 / wall,
                    goodput: tally.ok_us.iter().filter(|us| **us <= deadline_us).count() as f64 / wall,
                    p50_ms: percentile(&tally.ok_us, 0.50),
                    p99_ms: percentile(&tally.ok_us, 0.99),
                    p999_ms: percentile(&tally.ok_us, 0.999),
                    refused: tally.refused_us.len(),
                    refused_p99_ms: percentile(&tally.refused_us, 0.99),
                    generator_lag_p99_ms: percentile(&tally.lag_us, 0.99),
                    node_p99_bound: node_p99,
                    errors: tally.errors,
                    cpu_cores: cpu / elapsed,
                    cpu_us_per_call: if total_ok > 0 { cpu * 1e6 / total_ok as f64 } else { 0.0 },
                    rss_mib: rss,
                };
                eprintln!(
                    "bench: N={n} {} offered {:.0}/s: {:.0}/s ok ({:.0}/s in time), p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, {} refused (p99 {:.2} ms), {} errors, CPU {:.2} cores, RSS {:.0} MiB; the generator sent late by up to {:.2} ms (p99); the node's p99 <= {} ms",
                    row.tenant,
                    row.offered,
                    row.achieved,
                    row.goodput,
                    row.p50_ms,
                    row.p99_ms,
                    row.p999_ms,
                    row.refused,
                    row.refused_p99_ms,
                    row.errors,
                    row.cpu_cores,
                    row.rss_mib,
                    row.generator_lag_p99_ms,
                    row.node_p99_bound.map_or("?".to_string(), bound_ms)
                );
                csv.push(row.csv());
                rows.push(row);
            }
            std::fs::write(args.out.join("results.csv"), csv.join("\n") + "\n").context("writing results.csv")?;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    write_charts(&args, &rows)?;
    eprintln!("bench: results in {}", args.out.display());
    Ok(())
}

fn write_charts(args: &BenchArgs, rows: &[Row]) -> anyhow::Result<()> {
    let mut keys: Vec<(u32, &str)> = rows.iter().map(|r| (r.n_functions, r.tenant)).collect();
    keys.dedup();
    let series = |y: &dyn Fn(&Row) -> f64, x: &dyn Fn(&Row) -> f64| -> Vec<plot::Series> {
        keys.iter()
            .map(|(n, tenant)| plot::Series {
                label: if args.skew.is_some() { format!("N={n} {tenant}") } else { format!("N={n}") },
                points: rows
                    .iter()
                    .filter(|r| (r.n_functions, r.tenant) == (*n, *tenant))
                    .map(|r| (x(r), y(r)))
                    .collect(),
            })
            .collect()
    };
    let charts = [
        (
            "latency.svg",
            "p99 latency vs throughput",
            "responses/s",
            "p99 latency (ms)",
            series(&|r| r.p99_ms, &|r| r.achieved),
            false,
        ),
        (
            "cpu.svg",
            "node CPU vs throughput",
            "responses/s",
            "CPU (cores)",
            series(&|r| r.cpu_cores, &|r| r.achieved),
            false,
        ),
        (
            "memory.svg",
            "node memory vs throughput",
            "responses/s",
            "RSS (MiB)",
            series(&|r| r.rss_mib, &|r| r.achieved),
            false,
        ),
        (
            "responses.svg",
            "responses vs submitted",
            "submitted/s",
            "responses/s",
            series(&|r| r.achieved, &|r| r.offered),
            true,
        ),
    ];
    for (file, title, x_label, y_label, series, diagonal) in charts {
        let chart = plot::Chart { title, x_label, y_label, series, diagonal };
        std::fs::write(args.out.join(file), chart.to_svg()).with_context(|| format!("writing {file}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_from_the_sorted_latencies() {
        let us: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(percentile(&us, 0.5), 501.0);
        assert_eq!(percentile(&us, 0.99), 990.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
    }

    #[test]
    fn the_nodes_p99_is_the_bucket_its_window_reaches_99_percent_in() {
        let metrics = |counts: [u64; 4]| {
            format!(
                "# TYPE shoal_call_duration_seconds histogram\n\
                 shoal_call_duration_seconds_bucket{{le=\"0.0001\"}} {}\n\
                 shoal_call_duration_seconds_bucket{{le=\"0.001\"}} {}\n\
                 shoal_call_duration_seconds_bucket{{le=\"10\"}} {}\n\
                 shoal_call_duration_seconds_bucket{{le=\"+Inf\"}} {}\n\
                 shoal_function_call_duration_seconds_bucket{{tenant=\"t\",function=\"f\",le=\"10\"}} 7\n",
                counts[0], counts[1], counts[2], counts[3]
            )
        };
        let before = parse_durations(&metrics([5, 10, 10, 10]));
        assert_eq!(before, vec![(0.0001, 5), (0.001, 10), (10.0, 10), (f64::INFINITY, 10)]);
        // 1,000 calls in the window, 985 under 100 µs: the p99 is in the
        // bucket up to 1 ms (what came before the window does not count).
        let after = parse_durations(&metrics([990, 1010, 1010, 1010]));
        assert_eq!(node_p99_bound(&before, &after), Some(0.001));
        let slow = parse_durations(&metrics([990, 995, 999, 1010]));
        assert_eq!(node_p99_bound(&before, &slow), Some(f64::INFINITY));
        assert_eq!(bound_ms(f64::INFINITY), "inf");
        assert_eq!(bound_ms(0.001), "1");
        // No call in the window, or a read that failed: no bound, never
        // one counted from the node's start.
        assert_eq!(node_p99_bound(&before, &before), None);
        assert_eq!(node_p99_bound(&[], &after), None);
        assert_eq!(node_p99_bound(&before, &after[..2]), None);
    }

    #[test]
    fn a_tagged_binary_is_other_bytes_that_answer_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = shoal_runtime::Runtime::new(shoal_runtime::RuntimeConfig::new(dir.path())).unwrap();
        let settings = shoal_runtime::CallSettings {
            tenant: Arc::from("t"),
            memory_limit: 64 << 20,
            timeout: Duration::from_secs(10),
            env: Arc::from(Vec::new()),
            allowed_hosts: Arc::default(),
            config: Default::default(),
            trace: None,
        };
        let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (one, two) = (shoal_guests::tagged(shoal_guests::ECHO, 1), shoal_guests::tagged(shoal_guests::ECHO, 300));
        assert_ne!(one, two);
        assert_ne!(one.as_slice(), shoal_guests::ECHO);
        for wasm in [shoal_guests::ECHO, &one, &two] {
            let image = tokio.block_on(runtime.load(wasm)).expect("a valid binary");
            let out = tokio.block_on(runtime.call(&image, &settings, b"same"));
            assert_eq!(out.result.expect("the call succeeds"), b"same");
        }
        assert_eq!(runtime.n_compiles(), 3, "each compiled on its own");
    }
}
