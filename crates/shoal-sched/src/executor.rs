//! The executor: the thin async driver of the [`Policy`]. It measures what
//! the policy needs (each function's CPU time per call, as an
//! exponentially weighted mean of the CPU time its calls use while being
//! polled),
//! asks it whether a call may run, parks queued calls on a channel until
//! the policy names them, and settles every call with it when it ends.
//!
//! Calls run on threads of their own (the call pool, a tokio runtime with
//! a worker per core), apart from the threads that serve HTTP: a node
//! whose cores are busy with guests still reads, refuses and answers
//! requests at once. Calls of a function measured to cost less than
//! [`INLINE_BELOW`] run where they were asked instead, as handing them to
//! the pool and back would cost more than running them.
//!
//! Two kinds of capacity: the policy's running limit (calls a client or an
//! asynchronous queue started) and the sandbox slots (every instance,
//! chained calls included). Chained calls skip the policy — their root was
//! admitted already, and making a parent wait for a child's turn could
//! deadlock — but still need a sandbox slot, without waiting for one.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_runtime::{CallError, CallOutput, CallSettings, FunctionImage, Lineage, Runtime};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::os::CpuClock;
use crate::policy::{Admission, CallTicket, Decision, Policy, PolicyConfig};

/// The node cannot take the call now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}; retry after {} ms", retry_after.as_millis())]
pub struct Overloaded {
    pub reason: String,
    pub retry_after: Duration,
}

/// How long a refused caller is told to wait when nothing better is known.
/// Calls are short; a second is the smallest `Retry-After` HTTP can express.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Expected CPU time of a function never measured.
const FIRST_GUESS: Duration = Duration::from_millis(1);

/// Weight of the newest measurement in a function's mean.
const EWMA_WEIGHT: f64 = 0.2;

/// Calls of a function whose mean CPU time is below this run on the
/// thread that asked for them (an HTTP request's): the hand-off to the
/// call pool and back costs more than they do.
pub const INLINE_BELOW: Duration = Duration::from_micros(100);

/// Deadline of work accepted already (asynchronous calls): far enough
/// that waiting never refuses it.
const ACCEPTED_HORIZON: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug)]
enum Start {
    Run,
    Expired,
}

struct Waiter {
    tenant: Arc<str>,
    cost: Duration,
    start: oneshot::Sender<Start>,
}

struct Inner {
    policy: Policy,
    waiters: HashMap<CallTicket, Waiter>,
    next_ticket: CallTicket,
}

pub struct Executor {
    runtime: Arc<Runtime>,
    inner: Arc<Mutex<Inner>>,
    /// Mean CPU time per call, by function.
    costs: Arc<Mutex<HashMap<Arc<str>, Duration>>>,
    slots: Arc<Semaphore>,
    n_slots: u32,
    pool: CallPool,
    /// The policy's `long_after`.
    long_after: Duration,
}

/// The call pool's threads yield to the node's others (HTTP, timers): a
/// request is read, refused or answered at once even when guests keep
/// every core busy. Their share among themselves is the scheduler's.
const POOL_NICE: i32 = 10;

thread_local! {
    /// Whether this thread is one of a call pool's.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// The threads calls run on: a tokio runtime of their own. Dropped, it
/// stops without waiting for the calls on it (they are dropped, which
/// ends them), so an executor may be dropped anywhere.
struct CallPool {
    runtime: Option<tokio::runtime::Runtime>,
}

impl CallPool {
    fn new(threads: u32) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1) as usize)
            .thread_name("shoal-call")
            .on_thread_start(|| {
                IN_POOL.with(|p| p.set(true));
                crate::os::lower_this_thread(POOL_NICE);
            })
            .enable_all()
            .build()
            .expect("starting the call pool's threads: the process is out of threads");
        Self { runtime: Some(runtime) }
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.as_ref().expect("the call pool runs until dropped").handle()
    }

    /// Run `call` on the pool; dropping the returned future cancels it.
    async fn run<T: Send + 'static>(&self, call: impl Future<Output = T> + Send + 'static) -> Result<T, String> {
        let mut task = AbortOnDrop(self.handle().spawn(call));
        match (&mut task.0).await {
            Ok(out) => Ok(out),
            Err(e) => Err(format!("the call's task ended abnormally: {e}")),
        }
    }
}

impl Drop for CallPool {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").field("n_slots", &self.n_slots).field("busy", &self.busy()).finish()
    }
}

const POISON: &str = "scheduler locks are never poisoned: nothing panics while holding them";

impl Executor {
    /// An executor with at most `n_slots` sandboxes in use (never more than
    /// the runtime has) and the scheduling `policy`.
    pub fn new(runtime: Arc<Runtime>, n_slots: u32, policy: PolicyConfig) -> Self {
        let n_slots = n_slots.clamp(1, runtime.config().max_instances);
        let pool = CallPool::new(policy.cores);
        let long_after = policy.long_after;
        Self {
            runtime,
            inner: Arc::new(Mutex::new(Inner { policy: Policy::new(policy), waiters: HashMap::new(), next_ticket: 0 })),
            costs: Arc::new(Mutex::new(HashMap::new())),
            slots: Arc::new(Semaphore::new(n_slots as usize)),
            n_slots,
            pool,
            long_after,
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn n_slots(&self) -> u32 {
        self.n_slots
    }

    /// Sandboxes in use now (every running call, chained ones included).
    pub fn busy(&self) -> u32 {
        self.n_slots - self.slots.available_permits() as u32
    }

    /// Calls waiting for their turn.
    pub fn queued(&self) -> usize {
        self.inner.lock().expect(POISON).policy.queued()
    }

    /// Set a tenant's share of the node (default weight 1).
    pub fn set_weight(&self, tenant: &str, weight: u32) {
        self.inner.lock().expect(POISON).policy.set_weight(tenant, weight);
    }

    /// The mean CPU time of `function`'s calls.
    pub fn expected_cost(&self, function: &str) -> Duration {
        self.costs.lock().expect(POISON).get(function).copied().unwrap_or(FIRST_GUESS)
    }

    /// Ask to run a call of `function` (a `tenant/name` key) that must end
    /// by `deadline`: now, after waiting its turn, or not at all.
    pub async fn admit(
        &self,
        tenant: &Arc<str>,
        function: &Arc<str>,
        deadline: Instant,
    ) -> Result<Admitted<'_>, Overloaded> {
        let cost = self.expected_cost(function);
        let now = Instant::now();
        let admitted = || Admitted {
            executor: self,
            tenant: tenant.clone(),
            function: function.clone(),
            cost,
            deadline,
            settled: false,
        };
        let rx = {
            let mut inner = self.inner.lock().expect(POISON);
            let ticket = inner.next_ticket;
            inner.next_ticket += 1;
            match inner.policy.admit(now, tenant, ticket, cost, deadline) {
                Admission::Run => return Ok(admitted()),
                Admission::Refused { retry_after, reason } => return Err(Overloaded { reason, retry_after }),
                Admission::Queued => {
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.insert(ticket, Waiter { tenant: tenant.clone(), cost, start: tx });
                    // Places may be free (held back only by a tenant's cap
                    // or by the long calls' share): let the policy decide
                    // now, not at the next call's end. A decision for this
                    // call waits in the channel.
                    pump(&mut inner);
                    QueuedGuard { executor: self, tenant: tenant.to_string(), ticket, cost, rx, done: false }
                }
            }
        };
        let mut queued = rx;
        let received = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), &mut queued.rx).await;
        let start = match received {
            Ok(Ok(start)) => Some(start),
            // The sender is dropped only after a decision is sent.
            Ok(Err(_)) => None,
            Err(_elapsed) => {
                if let Some(Start::Run) = queued.withdraw() {
                    // Named just as its deadline came: too late to start.
                    self.settle(tenant, cost, Duration::ZERO);
                }
                None
            }
        };
        queued.done = true;
        match start {
            Some(Start::Run) => Ok(admitted()),
            _ => Err(Overloaded {
                reason: "the call's deadline passed while it waited its turn".into(),
                retry_after: RETRY_AFTER,
            }),
        }
    }

    /// Wait for a turn for work accepted already (an asynchronous call):
    /// never refused, only delayed while the node is full.
    pub async fn admit_accepted(&self, tenant: &Arc<str>, function: &Arc<str>) -> Admitted<'_> {
        loop {
            match self.admit(tenant, function, Instant::now() + ACCEPTED_HORIZON).await {
                Ok(admitted) => return admitted,
                Err(refused) => tokio::time::sleep(refused.retry_after.min(Duration::from_millis(100))).await,
            }
        }
    }

    /// Run a root call now if the policy lets it start at once or after a
    /// wait that fits its timeout.
    pub async fn run(
        &self,
        tenant: &Arc<str>,
        function: &Arc<str>,
        image: &Arc<FunctionImage>,
        settings: &CallSettings,
        input: Bytes,
    ) -> Result<CallOutput, Overloaded> {
        let admitted = self.admit(tenant, function, Instant::now() + settings.timeout).await?;
        Ok(admitted.run(image, settings, input).await)
    }

    /// Run a chained call now, in a free sandbox, or refuse it at once. It
    /// runs on the call pool (where its caller usually is already).
    pub async fn run_in(
        &self,
        image: &Arc<FunctionImage>,
        settings: &CallSettings,
        input: Bytes,
        lineage: Lineage,
    ) -> Result<CallOutput, Overloaded> {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return Err(Overloaded {
                reason: format!("all {} sandboxes are in use", self.n_slots),
                retry_after: RETRY_AFTER,
            });
        };
        if IN_POOL.with(Cell::get) {
            return Ok(self.runtime.call_in(image, settings, &input, lineage).await);
        }
        let call = measured(self.runtime.clone(), image.clone(), settings.clone(), input, lineage, slot, None);
        Ok(self.pool.run(call).await.unwrap_or_else(failed))
    }

    /// A running call ended: settle it with the policy, start whoever the
    /// policy names next, and answer whoever can no longer make it.
    fn settle(&self, tenant: &str, expected: Duration, used: Duration) {
        let mut inner = self.inner.lock().expect(POISON);
        inner.policy.finish(tenant, expected, used);
        pump(&mut inner);
    }
}

/// Ask the policy what starts now (or expires), and tell the waiters.
fn pump(inner: &mut Inner) {
    loop {
        let decisions = inner.policy.next(Instant::now());
        if decisions.is_empty() {
            return;
        }
        for decision in decisions {
            let (ticket, start) = match decision {
                Decision::Run(ticket) => (ticket, Start::Run),
                Decision::Expire(ticket) => (ticket, Start::Expired),
            };
            let Some(waiter) = inner.waiters.remove(&ticket) else { continue };
            let started = matches!(start, Start::Run);
            if waiter.start.send(start).is_err() && started {
                // Its caller left just now: the place it was given is free.
                inner.policy.finish(&waiter.tenant, waiter.cost, Duration::ZERO);
            }
        }
    }
}

/// A queued call. If its caller stops waiting before the policy names
/// it, it is taken out of the queue; if the policy named it to run in the
/// meantime, the place is given back.
struct QueuedGuard<'a> {
    executor: &'a Executor,
    tenant: String,
    ticket: CallTicket,
    cost: Duration,
    rx: oneshot::Receiver<Start>,
    done: bool,
}

impl QueuedGuard<'_> {
    /// Stop waiting: out of the queue, or — if the policy decided already —
    /// that decision. Under the lock, so no decision can be in flight.
    fn withdraw(&mut self) -> Option<Start> {
        let mut inner = self.executor.inner.lock().expect(POISON);
        if inner.waiters.remove(&self.ticket).is_some() {
            inner.policy.cancel(&self.tenant, self.ticket);
            pump(&mut inner);
            return None;
        }
        self.rx.try_recv().ok()
    }
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(Start::Run) = self.withdraw() {
            // Named to run, but nobody will run it.
            self.executor.settle(&self.tenant, self.cost, Duration::ZERO);
        }
    }
}

/// A call the policy let start: run it (once), and it is settled when it
/// ends; dropped unrun, its place is given back.
pub struct Admitted<'a> {
    executor: &'a Executor,
    tenant: Arc<str>,
    function: Arc<str>,
    cost: Duration,
    /// The deadline it was admitted with: time spent waiting counts.
    deadline: Instant,
    settled: bool,
}

impl Admitted<'_> {
    /// Run one root call, measuring the CPU time it takes (see
    /// `measured`).
    ///
    /// It runs on the call pool unless its function is known to be cheaper
    /// than the hand-off ([`INLINE_BELOW`]).
    pub async fn run(mut self, image: &Arc<FunctionImage>, settings: &CallSettings, input: Bytes) -> CallOutput {
        let executor = self.executor;
        let Ok(slot) = executor.slots.clone().try_acquire_owned() else {
            return CallOutput {
                result: Err(CallError::Overloaded { limit: executor.n_slots }),
                stdout: Default::default(),
                stderr: Default::default(),
            };
        };
        // The call ends by the deadline it was admitted with, so time spent
        // queued comes out of its timeout.
        let lineage = Lineage { deadline: Some(self.deadline), ..Lineage::root() };
        // From here the call's account goes with its future, which
        // settles it where the call ends (on the pool: the next call is
        // named without waiting for this caller to be woken).
        self.settled = true;
        let account = Account {
            inner: executor.inner.clone(),
            costs: executor.costs.clone(),
            tenant: self.tenant.clone(),
            function: self.function.clone(),
            cost: self.cost,
            long: self.cost >= executor.long_after,
            blocked: false,
            used: Duration::ZERO,
        };
        let call =
            measured(executor.runtime.clone(), image.clone(), settings.clone(), input, lineage, slot, Some(account));
        if self.cost < INLINE_BELOW || IN_POOL.with(Cell::get) {
            call.await
        } else {
            executor.pool.run(call).await.unwrap_or_else(failed)
        }
    }
}

/// One call in a sandbox (`slot`, held until the call is dropped).
///
/// A call admitted by the policy has an `account` with it: its place on
/// the CPU, given back whenever the call stops (`Pending`) and taken again
/// when it is next polled — a short call stops only to wait (on I/O, a
/// chained call) or once it has run long enough to be long, when it takes
/// turns with the long calls and must not keep a short call's place;
/// and, when it ends, the CPU time it took (its thread's CPU time while
/// its future was being polled: the guest running, host calls included;
/// waits, and time the thread was preempted, excluded), settled with the
/// policy. (Wall time would count preemption: a call on the pool, whose
/// threads yield to the HTTP threads, would look costlier the busier the
/// node — and cheap functions would stop running inline just when it
/// matters most.)
async fn measured(
    runtime: Arc<Runtime>,
    image: Arc<FunctionImage>,
    settings: CallSettings,
    input: Bytes,
    lineage: Lineage,
    slot: OwnedSemaphorePermit,
    mut account: Option<Account>,
) -> CallOutput {
    // The call and then its sandbox are given back before the account is
    // settled, so that whoever the policy names next finds them free.
    // (Dropped unfinished, the locals go first too, and then the account.)
    let out = {
        let _slot = slot;
        let mut call = std::pin::pin!(runtime.call_in(&image, &settings, &input, lineage));
        std::future::poll_fn(|cx| {
            let Some(account) = &mut account else { return call.as_mut().poll(cx) };
            account.set_blocked(false);
            let polled_at = CpuClock::now();
            let poll = call.as_mut().poll(cx);
            account.used += polled_at.elapsed();
            if poll.is_pending() {
                account.set_blocked(true);
            }
            poll
        })
        .await
    };
    drop(account);
    out
}

/// A running call's account with the policy: its place on the CPU (given
/// back while the call is blocked) and its settlement when it ends —
/// with the CPU time it used, or nothing if it was dropped unfinished.
struct Account {
    inner: Arc<Mutex<Inner>>,
    costs: Arc<Mutex<HashMap<Arc<str>, Duration>>>,
    tenant: Arc<str>,
    function: Arc<str>,
    cost: Duration,
    /// Expected to be long: it holds a long call's place throughout, so
    /// its stops change nothing in the policy.
    long: bool,
    blocked: bool,
    /// CPU time used so far.
    used: Duration,
}

impl Account {
    fn set_blocked(&mut self, blocked: bool) {
        if self.long || self.blocked == blocked {
            return;
        }
        self.blocked = blocked;
        let mut inner = self.inner.lock().expect(POISON);
        if blocked {
            inner.policy.block(self.cost);
            pump(&mut inner);
        } else {
            inner.policy.unblock(self.cost);
        }
    }
}

impl Drop for Account {
    /// The call ended, or was dropped unfinished: its function's mean takes
    /// in the CPU it used (so a call cut short is still charged), its
    /// place goes back, and whoever is next starts.
    fn drop(&mut self) {
        let used = self.used;
        {
            let mut costs = self.costs.lock().expect(POISON);
            let mean = costs.entry(self.function.clone()).or_insert(used);
            *mean = mean.mul_f64(1.0 - EWMA_WEIGHT) + used.mul_f64(EWMA_WEIGHT);
        }
        let mut inner = self.inner.lock().expect(POISON);
        if self.blocked {
            inner.policy.unblock(self.cost);
        }
        inner.policy.finish(&self.tenant, self.cost, used);
        pump(&mut inner);
    }
}

fn failed(message: String) -> CallOutput {
    CallOutput { result: Err(CallError::Internal(message)), stdout: Default::default(), stderr: Default::default() }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.executor.settle(&self.tenant, self.cost, Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_runtime::RuntimeConfig;

    fn t() -> Arc<str> {
        Arc::from("t")
    }

    fn f() -> Arc<str> {
        Arc::from("t/f")
    }

    fn settings(timeout: Duration) -> CallSettings {
        CallSettings { tenant: Arc::from("t"), memory_limit: 16 << 20, timeout, env: Arc::from(Vec::new()) }
    }

    #[tokio::test]
    async fn a_queued_call_starts_at_once_when_a_place_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::new(dir.path());
        config.max_instances = 4;
        let runtime = Arc::new(Runtime::new(config).unwrap());
        // Room for 4, but one call per tenant.
        let policy = PolicyConfig { max_running: 4, max_running_per_tenant: 1, ..PolicyConfig::new(4) };
        let executor = Arc::new(Executor::new(runtime.clone(), 4, policy));
        let image = runtime.load(shoal_guests::MISBEHAVE).await.unwrap();
        let call_of_a = |input: &'static [u8], timeout: Duration| {
            let (executor, image) = (executor.clone(), image.clone());
            tokio::spawn(async move {
                let a: Arc<str> = Arc::from("a");
                executor.run(&a, &f(), &image, &settings(timeout), Bytes::from_static(input)).await
            })
        };
        let first = call_of_a(b"loop", Duration::from_secs(2));
        while executor.busy() == 0 {
            tokio::task::yield_now().await;
        }
        // A second call of `a` waits (its tenant's cap) ...
        let second = call_of_a(b"x", Duration::from_secs(10));
        while executor.queued() == 0 {
            tokio::task::yield_now().await;
        }
        // ... and a call of `b`, queued behind it, starts without waiting
        // for `a`'s loop to end: it answers long before the loop's 2 s.
        let started = std::time::Instant::now();
        let b: Arc<str> = Arc::from("b");
        let out =
            executor.run(&b, &f(), &image, &settings(Duration::from_secs(5)), Bytes::from_static(b"x")).await.unwrap();
        assert!(out.result.is_ok());
        assert!(started.elapsed() < Duration::from_secs(1), "b waited {:?}", started.elapsed());
        assert!(first.await.unwrap().unwrap().result.is_err(), "the loop ends at its deadline");
        assert!(second.await.unwrap().unwrap().result.is_ok(), "a's second call ran after its first");
    }

    #[tokio::test]
    async fn calls_queue_for_their_turn_and_are_refused_when_they_cannot_make_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::new(dir.path());
        config.max_instances = 4;
        let runtime = Arc::new(Runtime::new(config).unwrap());
        let policy = PolicyConfig { max_running: 1, max_running_per_tenant: 1, ..PolicyConfig::new(1) };
        let executor = Arc::new(Executor::new(runtime.clone(), 4, policy));
        let image = runtime.load(shoal_guests::MISBEHAVE).await.unwrap();
        // A call looping until its 300 ms deadline.
        let spin = || {
            let (running, image) = (executor.clone(), image.clone());
            tokio::spawn(async move {
                running
                    .run(&t(), &f(), &image, &settings(Duration::from_millis(300)), Bytes::from_static(b"loop"))
                    .await
            })
        };
        let busy = spin();
        while executor.busy() == 0 {
            tokio::task::yield_now().await;
        }
        // The looping call holds the only place; a quick call waits for it.
        let waiting = {
            let (executor, image) = (executor.clone(), image.clone());
            tokio::spawn(async move {
                executor.run(&t(), &f(), &image, &settings(Duration::from_secs(5)), Bytes::from_static(b"x")).await
            })
        };
        while executor.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(busy.await.unwrap().unwrap().result.is_err(), "the loop ends at its deadline");
        assert!(waiting.await.unwrap().unwrap().result.is_ok(), "the waiting call ran after it");
        // The function's mean CPU time now reflects the 300 ms loop (the CPU
        // it got: however busy the machine, some milliseconds, well over
        // the first guess of 1 ms), so behind another such call, a call
        // with 5 ms to live is refused at once instead of queued.
        assert!(executor.expected_cost("t/f") > Duration::from_millis(5), "{:?}", executor.expected_cost("t/f"));
        let busy = spin();
        while executor.busy() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = executor
            .run(&t(), &f(), &image, &settings(Duration::from_millis(5)), Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(refused.reason.contains("deadline"), "{refused}");
        busy.await.unwrap().unwrap();
        assert_eq!(executor.busy(), 0);
        assert_eq!(executor.queued(), 0);
    }

    #[tokio::test]
    async fn call_threads_are_marked_and_yield_to_the_others() {
        let pool = CallPool::new(1);
        let (in_pool, nice) = pool
            .run(async {
                // SAFETY: `getpriority` reads the calling thread's nice value.
                #[allow(unsafe_code)]
                let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
                (IN_POOL.with(Cell::get), nice)
            })
            .await
            .unwrap();
        assert!(in_pool);
        assert!(!IN_POOL.with(Cell::get), "the test's own thread is not a call thread");
        assert_eq!(nice, POOL_NICE);
    }

    #[tokio::test]
    async fn a_caller_leaving_ends_its_call_on_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Arc::new(Runtime::new(RuntimeConfig::new(dir.path())).unwrap());
        let executor = Arc::new(Executor::new(runtime.clone(), 4, PolicyConfig::new(2)));
        let image = runtime.load(shoal_guests::MISBEHAVE).await.unwrap();
        // Never measured, the function is expected to cost more than a
        // hand-off: its calls go to the pool.
        assert!(executor.expected_cost("t/f") >= INLINE_BELOW);
        let caller = {
            let (executor, image) = (executor.clone(), image.clone());
            tokio::spawn(async move {
                executor.run(&t(), &f(), &image, &settings(Duration::from_secs(60)), Bytes::from_static(b"loop")).await
            })
        };
        while executor.busy() == 0 {
            tokio::task::yield_now().await;
        }
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        // The loop would hold its sandbox for 60 s; cancelled, it lets go
        // as soon as the pool drops it.
        let waited = Instant::now();
        while executor.busy() > 0 {
            assert!(waited.elapsed() < Duration::from_secs(20), "the cancelled call still holds its sandbox");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // And the CPU it used is charged to its function all the same.
        while !executor.costs.lock().unwrap().contains_key("t/f") {
            assert!(waited.elapsed() < Duration::from_secs(20), "a call cut short went unmeasured");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// On a one-core executor (one short call on the CPU at a time), start
    /// a 60 s call of `tenant` with `input` in the background, wait until it
    /// runs, and check that a quick call of tenant `other` then gets
    /// through while the first still runs. Returns the executor and the
    /// first call, still running.
    async fn a_quick_call_gets_through_beside(
        tenant: &'static str,
        input: &'static [u8],
        other: &str,
    ) -> (Arc<Executor>, tokio::task::JoinHandle<Result<CallOutput, Overloaded>>) {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Arc::new(Runtime::new(RuntimeConfig::new(dir.path())).unwrap());
        let executor = Arc::new(Executor::new(runtime.clone(), 4, PolicyConfig::new(1)));
        let image = runtime.load(shoal_guests::MISBEHAVE).await.unwrap();
        let first = {
            let (executor, image) = (executor.clone(), image.clone());
            tokio::spawn(async move {
                let tenant: Arc<str> = Arc::from(tenant);
                executor.run(&tenant, &f(), &image, &settings(Duration::from_secs(60)), Bytes::from_static(input)).await
            })
        };
        while executor.busy() == 0 {
            tokio::task::yield_now().await;
        }
        let (other, function, settings) = (Arc::from(other), f(), settings(Duration::from_secs(60)));
        let quick = executor.run(&other, &function, &image, &settings, Bytes::from_static(b"x"));
        let out = tokio::time::timeout(Duration::from_secs(20), quick)
            .await
            .expect("the quick call waited for the first one to end")
            .unwrap();
        assert!(out.result.is_ok());
        assert!(!first.is_finished());
        (executor, first)
    }

    #[tokio::test]
    async fn a_call_blocked_in_a_host_call_gives_its_place_on_the_cpu_to_another() {
        // A call that sleeps (blocked in WASI's clock) until its 60 s are up.
        let (executor, sleeper) = a_quick_call_gets_through_beside("t", b"sleep", "t").await;
        assert_eq!(executor.inner.lock().unwrap().policy.short_on_cpu(), 0, "the sleeper is not on the CPU");
        sleeper.abort();
    }

    #[tokio::test]
    async fn a_call_that_runs_long_gives_its_short_place_to_others() {
        // Never measured, the function is expected to be short; this call
        // loops until its 60 s are up, and once long takes turns without
        // its short place.
        let (_, looping) = a_quick_call_gets_through_beside("a", b"loop", "b").await;
        looping.abort();
    }
}
