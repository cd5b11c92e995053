//! One call: a fresh store and instance with the function's limits, run to
//! completion or to its deadline, then dropped. Nothing of one call is
//! visible to the next.
//!
//! Capabilities are granted here and only here: stdout and stderr are
//! captured, env vars are exactly those set at deploy, clocks and random
//! are available; no directory is preopened and no socket address is
//! allowed.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;

mod backstop;

use self::backstop::Backstop;
use crate::capture::CaptureBuffer;
use crate::host::{CallLimiter, ChainCtx, CommandCtx, ComponentCtx};
use crate::http::HttpExchange;
use crate::image::ImagePre;
use crate::interp::memory::Plan;
use crate::lanes::{FairLanes, Lane};
use crate::outbound::Outbound;
use crate::{CallError, FunctionImage, Lineage, Runtime};

/// How long past its deadline a call may take to notice it (epoch ticks
/// are checked at function entries and loop heads) before the host stops
/// waiting for it.
const DEADLINE_GRACE: Duration = Duration::from_millis(50);

/// How much sooner than its caller a chained call is given up on, per
/// level of depth: a child sharing its caller's deadline ends (and is
/// counted) before its caller stops waiting for it.
const GRACE_PER_DEPTH: Duration = Duration::from_millis(3);

/// The limits and environment of one call, set at deploy.
#[derive(Clone)]
pub struct CallSettings {
    /// The tenant the function belongs to: its state keys are scoped to it.
    pub tenant: Arc<str>,
    /// Linear memory, all of the call's memories together.
    pub memory_limit: u64,
    /// Wall-clock time from the start of instantiation.
    pub timeout: Duration,
    /// The env vars the guest sees; nothing of the host's leaks in.
    pub env: Arc<[(String, String)]>,
    /// Where its outbound HTTP requests may go.
    pub allowed_hosts: Arc<crate::AllowList>,
    /// What `wasi:config/store` answers (the tenant's secrets the
    /// function names).
    pub config: ConfigValues,
    /// The trace context the call's work hangs under (its chained calls
    /// get it as their parent), when it is traced; when sampled, its slow
    /// state operations are timed (`CallOutput::state_ops`).
    pub trace: Option<crate::TraceParent>,
}

/// Values a function reads through `wasi:config/store`. Never printed:
/// they are often secrets.
#[derive(Clone, Default)]
pub struct ConfigValues(pub(crate) Arc<wasmtime_wasi_config::WasiConfigVariables>);

impl ConfigValues {
    pub fn new<I: IntoIterator<Item = (String, String)>>(values: I) -> Self {
        Self(Arc::new(values.into_iter().collect()))
    }
}

impl std::fmt::Debug for ConfigValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigValues(..)")
    }
}

/// Env var names only: their values may be secrets.
impl std::fmt::Debug for CallSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSettings")
            .field("tenant", &self.tenant)
            .field("memory_limit", &self.memory_limit)
            .field("timeout", &self.timeout)
            .field("env", &self.env.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>())
            .field("allowed_hosts", &self.allowed_hosts)
            .finish_non_exhaustive()
    }
}

/// What a call produced, whether it succeeded or not.
#[derive(Debug)]
pub struct CallOutput {
    pub result: Result<Vec<u8>, CallError>,
    /// Captured stdout (components only: a command's stdout is its output).
    pub stdout: Bytes,
    pub stderr: Bytes,
    /// The last lines of stdout then stderr, at most
    /// `RuntimeConfig::max_log_lines`, split where the call ran (its
    /// thread, its CPU time), never by whoever reads its answer.
    pub logs: Vec<LogLine>,
    /// What it used, for metering.
    pub usage: CallUsage,
    /// A sampled call's state operations that took at least
    /// `RuntimeConfig::trace_state_ops_over` (at most 128), for its trace.
    pub state_ops: Vec<crate::StateOpTiming>,
}

/// What one call used: what a tenant is charged for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallUsage {
    /// From the start of its instantiation to its end (its answer's body
    /// streamed, for an HTTP function).
    pub wall: Duration,
    /// The CPU time of the threads that ran it while it was running (the
    /// guest and its host calls; not its waits). Set by the scheduler,
    /// which measures it; zero for a call run without one.
    pub cpu: Duration,
    /// How long it waited for its turn before it started (set by the
    /// scheduler).
    pub queued: Duration,
    /// The most linear memory it held at once, all its memories together
    /// (for a function of a shared runtime, the whole runtime's memory:
    /// what its limit counts).
    pub peak_memory_bytes: u64,
    /// Outbound HTTP requests it sent (refused ones not counted) and the
    /// body bytes they moved both ways.
    pub outbound_requests: u32,
    pub outbound_bytes: u64,
    /// Calls it started with `spawn`.
    pub spawned: u32,
    /// From the start of its instantiation until its instance was ready
    /// (the rest of `wall` is the guest's run).
    pub instantiate: Duration,
    /// Bytes its state operations read from the global tier (fills of the
    /// local tier, pulls, reads served from the global tier) and wrote to
    /// it (pushes of dirty chunks, appends).
    pub state_read_bytes: u64,
    pub state_written_bytes: u64,
}

impl CallUsage {
    /// Peak memory × wall time, in MiB·ms (rounded down).
    pub fn memory_mib_ms(&self) -> u64 {
        let ms = u64::try_from(self.wall.as_millis()).unwrap_or(u64::MAX);
        // Bytes × ms / MiB, without overflowing for any real call.
        u64::try_from((u128::from(self.peak_memory_bytes) * u128::from(ms)) >> 20).unwrap_or(u64::MAX)
    }
}

impl CallOutput {
    /// A call that did not run, or failed outside the guest.
    pub fn failed(error: CallError) -> Self {
        Self {
            result: Err(error),
            stdout: Bytes::new(),
            stderr: Bytes::new(),
            logs: Vec::new(),
            usage: CallUsage::default(),
            state_ops: Vec::new(),
        }
    }

    /// The call's log lines, taken out.
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        std::mem::take(&mut self.logs)
    }
}

/// The last `max` lines of `stdout` then `stderr`, stdout's first; when
/// there are more, stderr's (where failures are told) are kept first.
/// Only the lines kept are copied: a call that printed a million lines
/// costs a scan of its bounded buffers, not a million allocations.
fn tail_lines(stdout: &[u8], stderr: &[u8], max: usize) -> Vec<LogLine> {
    let err = String::from_utf8_lossy(stderr);
    let mut err_lines: Vec<&str> = err.lines().rev().take(max).collect();
    let out = String::from_utf8_lossy(stdout);
    let mut out_lines: Vec<&str> = out.lines().rev().take(max - err_lines.len()).collect();
    out_lines.reverse();
    err_lines.reverse();
    let line = |stream, text: &str| LogLine { stream, line: text.to_string() };
    out_lines
        .into_iter()
        .map(|text| line(LogStream::Stdout, text))
        .chain(err_lines.into_iter().map(|text| line(LogStream::Stderr, text)))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

#[derive(Clone, Debug)]
pub struct LogLine {
    pub stream: LogStream,
    pub line: String,
}

/// Raised by the epoch callback when a call's deadline has passed.
#[derive(Debug)]
struct DeadlineExceeded;

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// Long calls and the places they may run in.
#[derive(Clone)]
struct LongLanes {
    /// Epoch ticks of running after which a call is long.
    after_ticks: u64,
    places: Arc<FairLanes>,
    /// Whose turns this call takes (lanes are shared round robin by tenant).
    tenant: Arc<str>,
    /// The place this call holds, if any.
    held: Arc<Mutex<Option<Lane>>>,
}

impl LongLanes {
    /// Give the place back (the call stopped running: it waits in a host
    /// call, or for its next turn).
    fn release(&self) {
        drop(self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
    }
}

/// Run `call`, giving back its long-call place whenever it stops running
/// (a host call blocks): a long call waiting for a child or for I/O must
/// not keep a place others need. It queues for one again at its next tick.
async fn releasing_when_blocked<F: Future>(call: F, lanes: &LongLanes) -> F::Output {
    let mut call = std::pin::pin!(call);
    std::future::poll_fn(|cx| {
        let poll = call.as_mut().poll(cx);
        if poll.is_pending() {
            lanes.release();
        }
        poll
    })
    .await
}

/// Check the deadline at every epoch tick, stop the call when it has
/// passed, and time-slice long calls.
///
/// A call runs its first `after_ticks` uninterrupted: most calls end by
/// then, and switching between calls on a core costs them all (measured:
/// four fib(27) calls interleaved on one core finish ~7% fewer calls per
/// second than run one after the other). Past `after_ticks` a call is
/// long: from then on it yields at every tick and runs each tick only
/// while it holds one of the few long-call places, given back and queued
/// for again at every tick (round robin by tenant: `lanes.rs`). Long calls
/// take turns on those places, each tenant's in proportion to nothing but
/// its being there, and the remaining cores stay free for short calls. A call blocked in a host call holds no place (see
/// `releasing_when_blocked`).
fn arm_deadline<T: 'static>(store: &mut Store<T>, deadline: Instant, lanes: LongLanes) {
    store.set_epoch_deadline(1);
    let mut ticks = 0u64;
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            return Err(wasmtime::Error::new(DeadlineExceeded));
        }
        ticks += 1;
        if ticks < lanes.after_ticks {
            return Ok(UpdateDeadline::Continue(1));
        }
        Ok(lanes.next_turn(deadline))
    });
}

impl LongLanes {
    /// A call expected to be long waits for its first turn before it
    /// starts (until `deadline` at most: then its first check ends it).
    async fn first_turn(&self, expected_long: bool, deadline: Instant) {
        if !expected_long {
            return;
        }
        let place =
            tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), self.places.acquire(&self.tenant));
        if let Ok(place) = place.await {
            *self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(place);
        }
    }

    /// What a long call does at a tick: give its place back, let the
    /// executor run others, and wait for its next turn on a place (until
    /// `deadline` at most: then the next check ends it).
    fn next_turn(&self, deadline: Instant) -> UpdateDeadline {
        self.release();
        let (places, held, tenant) = (self.places.clone(), self.held.clone(), self.tenant.clone());
        UpdateDeadline::YieldCustom(
            1,
            Box::pin(async move {
                // Always let the executor run others, even with a place free.
                tokio::task::yield_now().await;
                let place = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), places.acquire(&tenant));
                if let Ok(place) = place.await {
                    *held.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(place);
                }
            }),
        )
    }
}

/// Deploy-time guest code (a snapshot's `init`, a Python or JavaScript
/// loader running a function's top-level code) takes its tenant's turns
/// on the long calls' lanes from its first tick, like a long call: a
/// tenant deploying many slow sources at once gets the lanes' time one
/// turn per round, beside every other tenant's long calls.
#[derive(Clone)]
pub(crate) struct Turns(LongLanes);

impl Turns {
    pub(crate) fn new(places: Arc<FairLanes>, tenant: Arc<str>) -> Self {
        Self(LongLanes { after_ticks: 1, places, tenant, held: Arc::default() })
    }

    /// The epoch callback's answer at a tick before `deadline`.
    pub(crate) fn next_turn(&self, deadline: Instant) -> UpdateDeadline {
        self.0.next_turn(deadline)
    }

    /// Run `work`, its turn given back whenever it blocks.
    pub(crate) async fn run<F: Future>(&self, work: F) -> F::Output {
        releasing_when_blocked(work, &self.0).await
    }
}

/// What a call is given, borrowed where it can be.
pub(crate) enum Given<'a> {
    Bytes(&'a [u8]),
    Http(Box<HttpExchange>),
}

pub(crate) async fn run(
    runtime: &Runtime,
    image: &FunctionImage,
    settings: &CallSettings,
    input: Given<'_>,
    lineage: Lineage,
) -> CallOutput {
    let config = &runtime.config;
    let now = Instant::now();
    let own_deadline = now + settings.timeout;
    // A call stopped by its caller's deadline reports the time it had.
    // (A root call's earlier deadline is its own timeout counted from its
    // admission, time queued included: it reports that timeout.)
    let (deadline, time_limit) = match lineage.deadline {
        Some(caller) if caller < own_deadline && lineage.depth == 0 => (caller, settings.timeout),
        Some(caller) if caller < own_deadline => (caller, caller.saturating_duration_since(now)),
        _ => (own_deadline, settings.timeout),
    };
    let grace = DEADLINE_GRACE.saturating_sub(GRACE_PER_DEPTH * lineage.depth.min(15));
    let backstop = tokio::time::Instant::from_std(deadline + grace);
    let stderr = CaptureBuffer::new(config.max_log_bytes);
    let mut wasi = WasiCtxBuilder::new();
    wasi.stderr(stderr.clone()).envs(&settings.env);
    let mut limiter = CallLimiter::new(settings.memory_limit);
    let tick = config.epoch_tick.as_nanos().max(1);
    let expected_long = lineage.long;
    let lanes = LongLanes {
        after_ticks: if expected_long {
            1
        } else {
            u64::try_from(config.long_call_after.as_nanos() / tick).unwrap_or(u64::MAX).max(1)
        },
        places: runtime.long_lanes.clone(),
        tenant: settings.tenant.clone(),
        held: Arc::default(),
    };

    match &image.pre {
        ImagePre::Component(_) | ImagePre::Interpreted { .. } | ImagePre::Http(_) => {
            // A function of a shared runtime runs on the interpreter
            // engine, its memory starting from its snapshot.
            let engine = match &image.pre {
                ImagePre::Interpreted { snapshot, .. } => {
                    limiter.plan = Some(Plan {
                        snapshot: snapshot.clone(),
                        capture: None,
                        tenant: Some(settings.tenant.clone()),
                        adopt: None,
                        owner: None,
                    });
                    &runtime.interp.engine
                }
                _ => &runtime.engine,
            };
            let stdout = CaptureBuffer::new(config.max_log_bytes);
            wasi.stdout(stdout.clone());
            let ctx = ComponentCtx {
                wasi: wasi.build(),
                table: crate::host::call_table(),
                limiter,
                tenant: settings.tenant.clone(),
                state: runtime.state.clone(),
                deadline,
                leases: Vec::new(),
                chain: ChainCtx::new(lineage, runtime.invoker.get().cloned(), stderr.clone()),
                max_call_depth: config.max_call_depth,
                max_spawns_per_root: config.max_spawns_per_root,
                env: settings.env.clone(),
                http: crate::host::call_http_ctx(),
                outbound: Outbound::new(
                    settings.allowed_hosts.clone(),
                    runtime.outbound_limits.clone(),
                    deadline,
                    stderr.clone(),
                ),
                response_cut: None,
                config: settings.config.0.clone(),
                trace: settings.trace,
                state_log: settings
                    .trace
                    .filter(|t| t.sampled)
                    .map(|_| crate::trace::StateOpLog { over: config.trace_state_ops_over, ..Default::default() }),
                ready_at: None,
            };
            let mut store = Store::new(engine, ctx);
            store.limiter(|ctx| &mut ctx.limiter);
            arm_deadline(&mut store, deadline, lanes.clone());
            let call = async {
                lanes.first_turn(expected_long, deadline).await;
                match (&image.pre, input) {
                    (
                        ImagePre::Component(pre) | ImagePre::Interpreted { pre, proxy: None, .. },
                        Given::Bytes(input),
                    ) => {
                        let function = pre.instantiate_async(&mut store).await?;
                        store.data_mut().ready_at = Some(Instant::now());
                        function.shoal_function_handler().call_handle(&mut store, input).await
                    }
                    (ImagePre::Http(pre) | ImagePre::Interpreted { proxy: Some(pre), .. }, Given::Http(exchange)) => {
                        crate::http::handle(pre, &mut store, *exchange).await.map(|()| Ok(Vec::new()))
                    }
                    (ImagePre::Http(pre) | ImagePre::Interpreted { proxy: Some(pre), .. }, Given::Bytes(input)) => {
                        crate::http::handle_bytes(pre, &mut store, input, config.max_output_bytes).await
                    }
                    _ => Ok(Err("this function is not an HTTP function: it takes bytes, not requests".into())),
                }
            };
            let moved = Arc::new(shoal_state::MovedBytes::default());
            let call = shoal_state::metered(moved.clone(), call);
            let outcome = Backstop::new(backstop, releasing_when_blocked(call, &lanes)).await;
            let (stderr, _) = stderr.take();
            let result = match outcome {
                Err(_elapsed) => Err(CallError::Timeout { limit: time_limit }),
                Ok(Err(e)) => Err(classify(
                    e,
                    store.data().limiter.memory_denied,
                    settings.memory_limit,
                    time_limit,
                    config.max_instances,
                    &stderr,
                )),
                // A guest that catches a failed allocation (Python's
                // MemoryError) fails with its own error: still out of memory.
                Ok(Ok(Err(_))) if store.data().limiter.memory_denied => {
                    Err(CallError::OutOfMemory { limit: settings.memory_limit })
                }
                Ok(Ok(Err(message))) => Err(CallError::Function { message }),
                Ok(Ok(Ok(output))) if output.len() > config.max_output_bytes => {
                    Err(CallError::OutputTooLarge { limit: config.max_output_bytes })
                }
                Ok(Ok(Ok(output))) => Ok(output),
            };
            // Before the store (and with it the writer of an HTTP answer's
            // body) is dropped: a failed call's body ends in an error.
            if let (Err(_), Some(cut)) = (&result, &store.data().response_cut) {
                cut.store(true, std::sync::atomic::Ordering::Release);
            }
            let stdout = stdout.take().0;
            let logs = tail_lines(&stdout, &stderr, config.max_log_lines);
            let data = store.data();
            let (outbound_requests, outbound_bytes) = data.outbound.used();
            let usage = CallUsage {
                wall: now.elapsed(),
                instantiate: data.ready_at.map_or(Duration::ZERO, |at| at.saturating_duration_since(now)),
                peak_memory_bytes: data.limiter.peak as u64,
                outbound_requests,
                outbound_bytes,
                spawned: data.chain.n_spawned(),
                state_read_bytes: moved.from_global.load(std::sync::atomic::Ordering::Relaxed),
                state_written_bytes: moved.to_global.load(std::sync::atomic::Ordering::Relaxed),
                ..CallUsage::default()
            };
            let state_ops = store.data_mut().state_log.take().map(|log| log.ops).unwrap_or_default();
            CallOutput { result, stdout, stderr, logs, usage, state_ops }
        }
        ImagePre::Command(pre) => {
            let Given::Bytes(input) = input else {
                return CallOutput::failed(CallError::Function {
                    message: "this function is not an HTTP function: it takes bytes, not requests".into(),
                });
            };
            let stdout = CaptureBuffer::new(config.max_output_bytes);
            wasi.stdout(stdout.clone()).stdin(MemoryInputPipe::new(Bytes::copy_from_slice(input)));
            let ctx = CommandCtx { wasi: wasi.build_p1(), limiter };
            let mut store = Store::new(&runtime.engine, ctx);
            store.limiter(|ctx| &mut ctx.limiter);
            arm_deadline(&mut store, deadline, lanes.clone());
            let call = async {
                lanes.first_turn(expected_long, deadline).await;
                let instance = pre.instantiate_async(&mut store).await?;
                let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                start.call_async(&mut store, ()).await
            };
            let moved = Arc::new(shoal_state::MovedBytes::default());
            let call = shoal_state::metered(moved.clone(), call);
            let outcome = Backstop::new(backstop, releasing_when_blocked(call, &lanes)).await;
            let (stderr, _) = stderr.take();
            let (output, output_truncated) = stdout.take();
            let exit_code = match &outcome {
                Ok(Ok(())) => Some(0),
                Ok(Err(e)) => e.downcast_ref::<wasmtime_wasi::I32Exit>().map(|exit| exit.0),
                Err(_) => None,
            };
            let result = match (exit_code, outcome) {
                (Some(0), _) if output_truncated => Err(CallError::OutputTooLarge { limit: config.max_output_bytes }),
                (Some(0), _) => Ok(output.to_vec()),
                (Some(code), _) => {
                    Err(CallError::Function { message: format!("exited with code {code}{}", stderr_suffix(&stderr)) })
                }
                (None, Err(_elapsed)) => Err(CallError::Timeout { limit: time_limit }),
                (None, Ok(Err(e))) => Err(classify(
                    e,
                    store.data().limiter.memory_denied,
                    settings.memory_limit,
                    time_limit,
                    config.max_instances,
                    &stderr,
                )),
                (None, Ok(Ok(()))) => unreachable!("a successful return has exit code 0"),
            };
            let logs = tail_lines(&[], &stderr, config.max_log_lines);
            let usage = CallUsage {
                wall: now.elapsed(),
                peak_memory_bytes: store.data().limiter.peak as u64,
                ..CallUsage::default()
            };
            CallOutput { result, stdout: Bytes::new(), stderr, logs, usage, state_ops: Vec::new() }
        }
    }
}

/// Most of what a failing guest printed last, for error messages.
const STDERR_TAIL: usize = 1024;

fn stderr_suffix(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(STDERR_TAIL)..]);
    let text = text.trim();
    if text.is_empty() { String::new() } else { format!("; stderr: {text}") }
}

fn classify(
    error: wasmtime::Error,
    memory_denied: bool,
    memory_limit: u64,
    time_limit: Duration,
    max_instances: u32,
    stderr: &[u8],
) -> CallError {
    if error.downcast_ref::<DeadlineExceeded>().is_some() {
        return CallError::Timeout { limit: time_limit };
    }
    if let Some(exhausted) = error.downcast_ref::<wasmtime::PoolConcurrencyLimitError>() {
        tracing::warn!(%exhausted, "sandbox pool exhausted");
        return CallError::Overloaded { limit: max_instances };
    }
    if memory_denied {
        return CallError::OutOfMemory { limit: memory_limit };
    }
    match error.downcast_ref::<Trap>() {
        Some(trap) => CallError::Trap { message: format!("{trap}{}", stderr_suffix(stderr)) },
        // A host function failed in a way the guest cannot handle; report it
        // as a trap of this call, never as a failure of the node.
        None => CallError::Trap { message: format!("{error:#}{}", stderr_suffix(stderr)) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_time_is_peak_mib_times_wall_ms() {
        let usage = CallUsage { wall: Duration::from_millis(250), peak_memory_bytes: 64 << 20, ..Default::default() };
        assert_eq!(usage.memory_mib_ms(), 64 * 250);
        let half = CallUsage { wall: Duration::from_millis(3), peak_memory_bytes: 512 << 10, ..Default::default() };
        assert_eq!(half.memory_mib_ms(), 1, "rounded down from 1.5");
        assert_eq!(CallUsage::default().memory_mib_ms(), 0);
    }

    #[test]
    fn only_the_last_lines_are_kept_stderr_first() {
        let stdout = (0..100_000).map(|i| format!("out {i}\n")).collect::<String>();
        let lines = tail_lines(stdout.as_bytes(), b"err a\nerr b", 3);
        let kept: Vec<(&str, &str)> = lines.iter().map(|l| (l.stream.as_str(), l.line.as_str())).collect();
        assert_eq!(kept, [("stdout", "out 99999"), ("stderr", "err a"), ("stderr", "err b")]);
        let lines = tail_lines(b"a\r\nb\n", b"", 10);
        assert_eq!(lines.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(tail_lines(b"x\n", b"y\n", 0).is_empty());
    }
}
