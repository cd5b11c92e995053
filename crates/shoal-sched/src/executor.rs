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
//! [`INLINE_BELOW`] start where they were asked instead, as handing them to
//! the pool and back would cost more than running them; one that stops
//! (blocks in a host call, or runs long and yields) goes on on the pool.
//!
//! Besides the policy's places, every running call holds a **sandbox**:
//! one of the node's sandboxes, counted against its tenant's cap on
//! sandboxes and, with its memory limit, against its tenant's and the
//! node's budgets of memory in use ([`SandboxLimits`]). A call that would
//! pass one is refused, so a tenant's calls and their children together
//! can never hold the node's sandboxes or memory.
//!
//! Chained calls go through the policy too, charged to the tenant of the
//! call that made them ([`Origin::Chained`]): they wait for their turn and
//! a place on the CPU like any call, but take no running place (their root
//! holds one) and never wait for a sandbox — with none free, or over their
//! tenant's caps, they are refused at once (a parent waiting for a child
//! that waits for its parent's sandbox would deadlock). Asked on the pool,
//! a chained call runs in the task that asked for it, inside its caller's
//! poll, on the place its waiting caller lends it
//! ([`Executor::run_chained`]).

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_runtime::{CallInput, CallOutput, CallSettings, FunctionImage, Lineage, Runtime};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::os::CpuClock;
use crate::policy::{Admission, CallTicket, Decision, Origin, Policy, PolicyConfig};

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

/// Weight of the newest measurement in a function's mean.
const EWMA_WEIGHT: f64 = 0.2;

/// Calls of a function whose mean CPU time is below this run on the
/// thread that asked for them (an HTTP request's): the hand-off to the
/// call pool and back costs more than they do.
pub const INLINE_BELOW: Duration = Duration::from_micros(100);

/// Deadline of work accepted already (asynchronous calls): far enough
/// that waiting never refuses it.
const ACCEPTED_HORIZON: Duration = Duration::from_secs(24 * 3600);

/// What the node's running calls may hold together, and one tenant's
/// calls (its root calls and all their children).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Sum of the memory limits of the calls running at once, all tenants.
    pub node_memory_bytes: u64,
    /// Sandboxes one tenant's calls hold at once.
    pub tenant_sandboxes: u32,
    /// Sum of the memory limits of one tenant's running calls.
    pub tenant_memory_bytes: u64,
}

impl SandboxLimits {
    /// Defaults derived from the node's: a tenant may hold half of the
    /// sandboxes and half of the memory budget.
    pub fn derived(n_sandboxes: u32, node_memory_bytes: u64) -> Self {
        Self {
            node_memory_bytes,
            tenant_sandboxes: (n_sandboxes / 2).max(1),
            tenant_memory_bytes: node_memory_bytes / 2,
        }
    }
}

/// One tenant's settings, as the admin set them (None: the node's
/// default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// Its share of the CPU when tenants compete (default 1).
    pub weight: Option<u32>,
    /// Root calls running at once when no other tenant waits.
    pub running: Option<u32>,
    /// Sandboxes its calls hold at once.
    pub sandboxes: Option<u32>,
    /// Sum of the memory limits of its running calls.
    pub memory_bytes: Option<u64>,
}

#[derive(Debug)]
enum Start {
    Run,
    Expired,
}

struct Waiter {
    tenant: Arc<str>,
    cost: Duration,
    origin: Origin,
    start: oneshot::Sender<Start>,
}

/// Sandboxes and memory one tenant's calls hold now.
#[derive(Debug, Default)]
struct InUse {
    sandboxes: u32,
    memory: u64,
}

struct Inner {
    policy: Policy,
    waiters: HashMap<CallTicket, Waiter>,
    next_ticket: CallTicket,
    limits: SandboxLimits,
    overrides: HashMap<Arc<str>, TenantLimits>,
    in_use: HashMap<Arc<str>, InUse>,
    node_memory: u64,
    /// Where the runtime's long calls learn which cores short calls leave
    /// idle.
    idle_cores: shoal_runtime::IdleCores,
}

impl Inner {
    /// Tell the runtime how many cores no short call is on or waiting for
    /// (none while any call waits): long calls may run on them until short
    /// calls want them back. After every change of the policy's counts.
    fn note_idle_cores(&self) {
        let idle = if self.policy.queued() > 0 {
            0
        } else {
            self.policy.config().cores.saturating_sub(self.policy.short_on_cpu())
        };
        self.idle_cores.set(idle);
    }

    /// Count a sandbox with `memory` for `tenant`, or say which limit it
    /// would pass.
    fn reserve(&mut self, tenant: &Arc<str>, memory: u64) -> Result<(), String> {
        let own = self.overrides.get(tenant);
        let max_sandboxes = own.and_then(|o| o.sandboxes).unwrap_or(self.limits.tenant_sandboxes);
        let max_memory = own.and_then(|o| o.memory_bytes).unwrap_or(self.limits.tenant_memory_bytes);
        let used = self.in_use.entry(tenant.clone()).or_default();
        if used.sandboxes >= max_sandboxes {
            return Err(format!("tenant `{tenant}` has {max_sandboxes} sandboxes in use, its limit"));
        }
        if used.memory + memory > max_memory {
            return Err(format!(
                "tenant `{tenant}`'s running calls hold {} MiB of memory limits; this call's {} MiB would pass its limit of {} MiB",
                used.memory >> 20,
                memory >> 20,
                max_memory >> 20
            ));
        }
        if self.node_memory + memory > self.limits.node_memory_bytes {
            return Err(format!(
                "the node's running calls hold {} MiB of memory limits; this call's {} MiB would pass its limit of {} MiB",
                self.node_memory >> 20,
                memory >> 20,
                self.limits.node_memory_bytes >> 20
            ));
        }
        used.sandboxes += 1;
        used.memory += memory;
        self.node_memory += memory;
        Ok(())
    }

    fn release(&mut self, tenant: &str, memory: u64) {
        self.node_memory = self.node_memory.saturating_sub(memory);
        if let Some(used) = self.in_use.get_mut(tenant) {
            used.sandboxes = used.sandboxes.saturating_sub(1);
            used.memory = used.memory.saturating_sub(memory);
            if used.sandboxes == 0 {
                self.in_use.remove(tenant);
            }
        }
    }
}

pub struct Executor {
    runtime: Arc<Runtime>,
    inner: Arc<Mutex<Inner>>,
    /// Mean CPU time per call, by function.
    costs: Arc<Mutex<HashMap<Arc<str>, Duration>>>,
    slots: Arc<Semaphore>,
    n_slots: u32,
    pool: CallPool,
    /// The policy's `long_after`: also what a function never measured is
    /// expected to cost (it is not trusted to be cheap).
    long_after: Duration,
}

/// The call pool's threads yield to the node's others (HTTP, timers): a
/// request is read, refused or answered at once even when guests keep
/// every core busy. Their share among themselves is the scheduler's.
const POOL_NICE: i32 = 10;

thread_local! {
    /// Whether this thread is one of a call pool's.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
    /// While a call is polled on this thread and holds a short place on
    /// the CPU: its expected cost (what the policy counts it by), so that
    /// a chained call it runs in its own poll can take that place while
    /// it runs (the caller, waiting for it, is not on the CPU).
    static ON_CPU: Cell<Option<Duration>> = const { Cell::new(None) };
    /// CPU time of the calls polled inside the poll of the call being
    /// polled on this thread (its chained calls run in its task), which
    /// that call's own measurement leaves out.
    static NESTED_CPU: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// When the outermost poll of a call on this thread started, by the
    /// thread's CPU clock and by the wall clock: polls inside it are timed
    /// from these (see [`Polling`]).
    static OUTERMOST: Cell<Option<(CpuClock, Instant)>> = const { Cell::new(None) };
}

/// A poll inside another call's poll that took longer than this by the
/// wall clock has its time scaled by the share of the CPU its thread had
/// (it may have been preempted); a shorter one counts its wall time.
const NESTED_EXACT_ABOVE: Duration = Duration::from_micros(50);

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

impl Executor {
    /// An executor with at most `n_slots` sandboxes in use (never more than
    /// the runtime has), the scheduling `policy`, and the default sandbox
    /// limits (every tenant may hold half the sandboxes; memory limits
    /// are not summed).
    pub fn new(runtime: Arc<Runtime>, n_slots: u32, policy: PolicyConfig) -> Self {
        let limits = SandboxLimits::derived(n_slots, u64::MAX);
        Self::with_limits(runtime, n_slots, policy, limits)
    }

    /// [`Executor::new`] with explicit sandbox and memory limits.
    pub fn with_limits(runtime: Arc<Runtime>, n_slots: u32, policy: PolicyConfig, limits: SandboxLimits) -> Self {
        let n_slots = n_slots.clamp(1, runtime.config().max_instances);
        let pool = CallPool::new(policy.cores);
        let long_after = policy.long_after;
        let inner = Inner {
            policy: Policy::new(policy),
            waiters: HashMap::new(),
            next_ticket: 0,
            limits,
            overrides: HashMap::new(),
            in_use: HashMap::new(),
            node_memory: 0,
            idle_cores: runtime.idle_cores().clone(),
        };
        Self {
            runtime,
            inner: Arc::new(Mutex::new(inner)),
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
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).policy.queued()
    }

    /// Sandboxes and the sum of their memory limits that `tenant`'s calls
    /// hold now.
    pub fn in_use_of(&self, tenant: &str) -> (u32, u64) {
        let inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.in_use.get(tenant).map_or((0, 0), |used| (used.sandboxes, used.memory))
    }

    /// Run `work` on the call pool (at its priority, off the threads that
    /// serve HTTP); dropping the returned future cancels it.
    pub async fn on_pool<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, String> {
        self.pool.run(work).await
    }

    /// Sum of the memory limits of the calls running now.
    pub fn memory_in_use(&self) -> u64 {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).node_memory
    }

    /// Set a tenant's share of the node (default weight 1).
    pub fn set_weight(&self, tenant: &str, weight: u32) {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).policy.set_weight(tenant, weight);
    }

    /// Set what the admin decided for `tenant` (None fields: the node's
    /// defaults). Calls running keep what they hold; new ones obey.
    pub fn set_tenant_limits(&self, tenant: &str, limits: TenantLimits) {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.policy.set_weight(tenant, limits.weight.unwrap_or(1));
        inner.policy.set_running_cap(tenant, limits.running);
        if limits == TenantLimits::default() {
            inner.overrides.remove(tenant);
        } else {
            inner.overrides.insert(Arc::from(tenant), limits);
        }
        pump(&mut inner);
    }

    /// The mean CPU time of `function`'s calls; a function never measured
    /// is expected to be long.
    pub fn expected_cost(&self, function: &str) -> Duration {
        self.costs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(function)
            .copied()
            .unwrap_or(self.long_after)
    }

    /// Ask to run a root call of `function` (a `tenant/name` key) that must
    /// end by `deadline` and may use `memory` bytes: now, after waiting its
    /// turn, or not at all.
    pub async fn admit(
        &self,
        tenant: &Arc<str>,
        function: &Arc<str>,
        deadline: Instant,
        memory: u64,
    ) -> Result<Admitted<'_>, Overloaded> {
        self.admit_as(tenant, function, deadline, memory, Origin::Root).await
    }

    async fn admit_as(
        &self,
        tenant: &Arc<str>,
        function: &Arc<str>,
        deadline: Instant,
        memory: u64,
        origin: Origin,
    ) -> Result<Admitted<'_>, Overloaded> {
        let cost = self.expected_cost(function);
        let now = Instant::now();
        let rx = {
            let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let ticket = inner.next_ticket;
            inner.next_ticket += 1;
            match inner.policy.admit(now, tenant, ticket, cost, deadline, origin) {
                Admission::Run => {
                    inner.note_idle_cores();
                    drop(inner);
                    return self.take_sandbox(tenant, function, cost, deadline, memory, origin);
                }
                Admission::Refused { retry_after, reason } => return Err(Overloaded { reason, retry_after }),
                Admission::Queued => {
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.insert(ticket, Waiter { tenant: tenant.clone(), cost, origin, start: tx });
                    // Places may be free (held back only by a tenant's cap
                    // or by the long calls' share): let the policy decide
                    // now, not at the next call's end. A decision for this
                    // call waits in the channel.
                    pump(&mut inner);
                    QueuedGuard { executor: self, tenant: tenant.to_string(), ticket, cost, origin, rx, done: false }
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
                    self.settle(tenant, cost, Duration::ZERO, origin);
                }
                None
            }
        };
        queued.done = true;
        match start {
            Some(Start::Run) => {
                self.take_sandbox(tenant, function, cost, deadline, memory, origin).map(|mut admitted| {
                    admitted.queued = now.elapsed();
                    admitted
                })
            }
            _ => Err(Overloaded {
                reason: "the call's deadline passed while it waited its turn".into(),
                retry_after: RETRY_AFTER,
            }),
        }
    }

    /// A call the policy let start takes its sandbox, or gives its places
    /// back and is refused.
    fn take_sandbox(
        &self,
        tenant: &Arc<str>,
        function: &Arc<str>,
        cost: Duration,
        deadline: Instant,
        memory: u64,
        origin: Origin,
    ) -> Result<Admitted<'_>, Overloaded> {
        let refused = |reason: String| {
            self.settle(tenant, cost, Duration::ZERO, origin);
            Err(Overloaded { reason, retry_after: RETRY_AFTER })
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return refused(format!("all {} sandboxes are in use", self.n_slots));
        };
        let reserved = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).reserve(tenant, memory);
        if let Err(reason) = reserved {
            return refused(reason);
        }
        let sandbox = Sandbox { inner: self.inner.clone(), tenant: tenant.clone(), memory, _slot: slot };
        Ok(Admitted {
            executor: self,
            tenant: tenant.clone(),
            function: function.clone(),
            cost,
            deadline,
            origin,
            sandbox: Some(sandbox),
            queued: Duration::ZERO,
        })
    }

    /// Wait for a turn for work accepted already (an asynchronous call):
    /// never refused, only delayed while the node (or its tenant) is full.
    pub async fn admit_accepted(&self, tenant: &Arc<str>, function: &Arc<str>, memory: u64) -> Admitted<'_> {
        loop {
            match self.admit(tenant, function, Instant::now() + ACCEPTED_HORIZON, memory).await {
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
        input: impl Into<CallInput>,
    ) -> Result<CallOutput, Overloaded> {
        let deadline = Instant::now() + settings.timeout;
        let admitted = self.admit(tenant, function, deadline, settings.memory_limit).await?;
        Ok(admitted.run(image, settings, input).await)
    }

    /// Run a chained call of `function`, charged to `tenant` (its root's):
    /// after its turn, if one comes before its caller's deadline, in a
    /// sandbox that must be free now (else it is refused).
    ///
    /// Asked on the call pool (its caller runs there, or a task its caller
    /// spawned), it runs in the task that asked, inside its caller's poll:
    /// no hand-off to another task or thread, whose wake-ups cost more
    /// than a small call. Its caller, waiting for it, lends it its short
    /// place on the CPU for each of those polls ([`Lent`]); its CPU time
    /// is its own, left out of its caller's. Asked elsewhere (its caller
    /// runs on a thread that serves HTTP), it runs on the pool, on a task
    /// of its own.
    pub async fn run_chained(
        &self,
        tenant: &Arc<str>,
        function: &Arc<str>,
        image: &Arc<FunctionImage>,
        settings: &CallSettings,
        input: Bytes,
        lineage: Lineage,
    ) -> Result<CallOutput, Overloaded> {
        let own = Instant::now() + settings.timeout;
        let deadline = lineage.deadline.map_or(own, |caller| caller.min(own));
        let run = async {
            let admitted = self.admit_as(tenant, function, deadline, settings.memory_limit, Origin::Chained).await?;
            Ok(admitted.run_in(image, settings, input.into(), lineage).await)
        };
        if !IN_POOL.with(Cell::get) {
            return run.await;
        }
        let mut run = std::pin::pin!(run);
        std::future::poll_fn(|cx| {
            let _lent = Lent::take(&self.inner);
            run.as_mut().poll(cx)
        })
        .await
    }

    /// A running call ended (or never started): settle it with the
    /// policy, start whoever the policy names next, and answer whoever can
    /// no longer make it.
    fn settle(&self, tenant: &str, expected: Duration, used: Duration, origin: Origin) {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.policy.finish(tenant, expected, used, origin);
        pump(&mut inner);
    }
}

/// Ask the policy what starts now (or expires), and tell the waiters.
fn pump(inner: &mut Inner) {
    loop {
        let decisions = inner.policy.next(Instant::now());
        if decisions.is_empty() {
            inner.note_idle_cores();
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
                inner.policy.finish(&waiter.tenant, waiter.cost, Duration::ZERO, waiter.origin);
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
    origin: Origin,
    rx: oneshot::Receiver<Start>,
    done: bool,
}

impl QueuedGuard<'_> {
    /// Stop waiting: out of the queue, or — if the policy decided already —
    /// that decision. Under the lock, so no decision can be in flight.
    fn withdraw(&mut self) -> Option<Start> {
        let mut inner = self.executor.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
            self.executor.settle(&self.tenant, self.cost, Duration::ZERO, self.origin);
        }
    }
}

/// A sandbox held: one of the node's, counted with its memory limit
/// against its tenant's and the node's budgets until dropped.
struct Sandbox {
    inner: Arc<Mutex<Inner>>,
    tenant: Arc<str>,
    memory: u64,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).release(&self.tenant, self.memory);
    }
}

/// A call the policy let start, with its sandbox: run it (once), and it
/// is settled when it ends; dropped unrun, its places are given back.
pub struct Admitted<'a> {
    executor: &'a Executor,
    tenant: Arc<str>,
    function: Arc<str>,
    cost: Duration,
    /// The deadline it was admitted with: time spent waiting counts.
    deadline: Instant,
    origin: Origin,
    /// Taken when it runs.
    sandbox: Option<Sandbox>,
    /// How long it waited for its turn.
    queued: Duration,
}

impl Admitted<'_> {
    /// Run one root call, measuring the CPU time it takes (see
    /// `measured`).
    ///
    /// It runs on the call pool unless its function is known to be cheaper
    /// than the hand-off ([`INLINE_BELOW`]); such a call that stops before
    /// it ends (blocked in a host call, or run long) goes on on the pool,
    /// so no call ever holds a thread that serves HTTP for long.
    pub async fn run(
        self,
        image: &Arc<FunctionImage>,
        settings: &CallSettings,
        input: impl Into<CallInput>,
    ) -> CallOutput {
        // The call ends by the deadline it was admitted with, so time spent
        // queued comes out of its timeout.
        let lineage = Lineage { deadline: Some(self.deadline), ..Lineage::root() };
        self.run_in(image, settings, input.into(), lineage).await
    }

    async fn run_in(
        mut self,
        image: &Arc<FunctionImage>,
        settings: &CallSettings,
        input: CallInput,
        mut lineage: Lineage,
    ) -> CallOutput {
        let executor = self.executor;
        // Expected long, it takes turns on the long calls' places from its
        // start: its CPU (host work included) stays within those places,
        // and the other cores stay free for short calls.
        lineage.long = self.cost >= executor.long_after;
        let sandbox = self.sandbox.take().expect("an admitted call has its sandbox until it runs");
        // From here the call's account goes with its future, which
        // settles it where the call ends (on the pool: the next call is
        // named without waiting for this caller to be woken).
        let account = Account {
            inner: executor.inner.clone(),
            costs: executor.costs.clone(),
            tenant: self.tenant.clone(),
            function: self.function.clone(),
            cost: self.cost,
            origin: self.origin,
            long: self.cost >= executor.long_after,
            turned_long: false,
            long_after: executor.long_after,
            blocked: false,
            used: Duration::ZERO,
            queued: self.queued,
        };
        let call =
            measured(executor.runtime.clone(), image.clone(), settings.clone(), input, lineage, sandbox, account);
        let inline = self.origin == Origin::Root && self.cost < INLINE_BELOW;
        if IN_POOL.with(Cell::get) {
            if self.origin == Origin::Root {
                return call.await;
            }
            // A chained call, in its caller's task: a panic ends it alone
            // (as it would on a task of its own), not its caller.
            let mut call = std::pin::pin!(call);
            return std::future::poll_fn(|cx| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call.as_mut().poll(cx)))
                    .unwrap_or_else(|_| Poll::Ready(failed("the chained call panicked".into())))
            })
            .await;
        }
        if !inline {
            return executor.pool.run(call).await.unwrap_or_else(failed);
        }
        let mut call = Box::pin(call);
        match std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
            Poll::Ready(out) => out,
            Poll::Pending => executor.pool.run(call).await.unwrap_or_else(failed),
        }
    }
}

/// One call in its `sandbox` (held until the call is dropped), with its
/// `account` with the policy: its place on the CPU, given back whenever
/// the call stops (`Pending`) and taken again when it is next polled — a
/// short call stops only to wait (on I/O, a chained call) or once it has
/// run long enough to be long, when it takes turns with the long calls and
/// must not keep a short call's place; and, when it ends, the CPU time it
/// took (its thread's CPU time while its future was being polled: the
/// guest running, host calls included; waits, time the thread was
/// preempted, and chained calls polled inside its polls excluded — see
/// [`Polling`]), settled with the policy. (Wall time would count
/// preemption: a call on the pool, whose threads yield to the HTTP
/// threads, would look costlier the busier the node — and cheap functions
/// would stop running inline just when it matters most.)
async fn measured(
    runtime: Arc<Runtime>,
    image: Arc<FunctionImage>,
    settings: CallSettings,
    input: CallInput,
    lineage: Lineage,
    sandbox: Sandbox,
    mut account: Account,
) -> CallOutput {
    // The call and then its sandbox are given back before the account is
    // settled, so that whoever the policy names next finds them free.
    // (Dropped unfinished, the locals go first too, and then the account.)
    let out = {
        let _sandbox = sandbox;
        let mut call = std::pin::pin!(async {
            match input {
                CallInput::Bytes(bytes) => runtime.call_in(&image, &settings, &bytes, lineage).await,
                CallInput::Http(exchange) => runtime.call_http(&image, &settings, exchange, lineage).await,
            }
        });
        std::future::poll_fn(|cx| {
            account.set_blocked(false);
            let polling = Polling::start(account.holds_short_place().then_some(account.cost));
            let poll = call.as_mut().poll(cx);
            account.used += polling.own_cpu();
            if poll.is_pending() {
                account.set_blocked(true);
                account.note_long();
            }
            poll
        })
        .await
    };
    let mut out = out;
    out.usage.cpu = account.used;
    out.usage.queued = account.queued;
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
    origin: Origin,
    /// Expected to be long: it holds a long call's place throughout (or,
    /// chained, none), so its stops change nothing in the policy.
    long: bool,
    /// Expected short, it has run long: it stays off the short places
    /// (blocked, for the policy) until it ends.
    turned_long: bool,
    long_after: Duration,
    blocked: bool,
    /// CPU time used so far.
    used: Duration,
    /// How long the call waited for its turn (reported with its usage).
    queued: Duration,
}

impl Account {
    /// Whether it counts on a short place while it runs (see `set_blocked`).
    fn holds_short_place(&self) -> bool {
        !self.long && !self.turned_long
    }

    fn set_blocked(&mut self, blocked: bool) {
        if self.long || self.turned_long || self.blocked == blocked {
            return;
        }
        self.blocked = blocked;
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if blocked {
            inner.policy.block(self.cost);
            pump(&mut inner);
        } else {
            inner.policy.unblock(self.cost);
            inner.note_idle_cores();
        }
    }

    /// A call expected short that has run long: while it runs, its
    /// function is expected to cost at least what this call has used so
    /// far, without waiting for the call to end — a function that turns
    /// into a loop gets no more short places for its next calls. The call
    /// itself stays off the short places (blocked, for the policy) and
    /// takes turns with the long calls.
    fn note_long(&mut self) {
        if self.long || self.used < self.long_after {
            return;
        }
        self.turned_long = true;
        let mut costs = self.costs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mean = costs.entry(self.function.clone()).or_insert(self.used);
        *mean = (*mean).max(self.used);
    }
}

impl Drop for Account {
    /// The call ended, or was dropped unfinished: its function's mean takes
    /// in the CPU it used (so a call cut short is still charged), its
    /// place goes back, and whoever is next starts.
    fn drop(&mut self) {
        let used = self.used;
        {
            let mut costs = self.costs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mean = costs.entry(self.function.clone()).or_insert(used);
            *mean = mean.mul_f64(1.0 - EWMA_WEIGHT) + used.mul_f64(EWMA_WEIGHT);
        }
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.blocked {
            inner.policy.unblock(self.cost);
        }
        inner.policy.finish(&self.tenant, self.cost, used, self.origin);
        pump(&mut inner);
    }
}

/// One poll of a measured call on this thread: what it tells the calls
/// polled inside it (its place on the CPU, to lend) and the CPU time it
/// used itself. Dropped (also by a panic), it restores what the poll of an
/// enclosing call had set.
///
/// The outermost poll on a thread is timed by the thread's CPU clock (a
/// system call: about a microsecond on a virtual machine). A poll inside
/// it (a chained call run in its caller's poll) is timed by the wall clock
/// (tens of nanoseconds), which counts the time its thread was preempted:
/// one longer than [`NESTED_EXACT_ABOVE`] is scaled by the share of the
/// CPU the thread had since the outermost poll began.
struct Polling {
    /// Set when this is the outermost poll on its thread.
    cpu_at: Option<CpuClock>,
    wall_at: Instant,
    outer_on_cpu: Option<Duration>,
    outer_nested: Duration,
    done: bool,
}

impl Polling {
    fn start(on_cpu: Option<Duration>) -> Self {
        let outer_on_cpu = ON_CPU.replace(on_cpu);
        let outer_nested = NESTED_CPU.replace(Duration::ZERO);
        let wall_at = Instant::now();
        let cpu_at = match OUTERMOST.get() {
            Some(_) => None,
            None => {
                let cpu_at = CpuClock::now();
                OUTERMOST.set(Some((cpu_at, wall_at)));
                Some(cpu_at)
            }
        };
        Self { cpu_at, wall_at, outer_on_cpu, outer_nested, done: false }
    }

    /// The CPU time of the poll, less that of the calls polled inside it;
    /// the whole of it counts as nested for an enclosing call's poll.
    fn own_cpu(mut self) -> Duration {
        let spent = match self.cpu_at {
            Some(cpu_at) => cpu_at.elapsed(),
            None => {
                let wall = self.wall_at.elapsed();
                match OUTERMOST.get() {
                    Some((cpu_then, wall_then)) if wall > NESTED_EXACT_ABOVE => {
                        let share = cpu_then.elapsed().as_secs_f64() / wall_then.elapsed().as_secs_f64().max(1e-9);
                        wall.mul_f64(share.min(1.0))
                    }
                    _ => wall,
                }
            }
        };
        let nested = NESTED_CPU.replace(self.outer_nested + spent);
        self.restore();
        spent.saturating_sub(nested)
    }

    fn restore(&mut self) {
        self.done = true;
        ON_CPU.set(self.outer_on_cpu);
        if self.cpu_at.is_some() {
            OUTERMOST.set(None);
        }
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        if !self.done {
            NESTED_CPU.set(self.outer_nested);
            self.restore();
        }
    }
}

/// The short place of the call being polled on this thread, lent to a
/// chained call it runs in its own poll (its caller waits for it, so is
/// not on the CPU): for the policy the caller is blocked until this is
/// dropped, within the same poll. A caller that holds no short place (it
/// is long, or none is polled here) lends nothing.
struct Lent<'a> {
    inner: &'a Mutex<Inner>,
    cost: Option<Duration>,
}

impl<'a> Lent<'a> {
    fn take(inner: &'a Mutex<Inner>) -> Self {
        let cost = ON_CPU.take();
        if let Some(cost) = cost {
            let mut inner = inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            inner.policy.block(cost);
            pump(&mut inner);
        }
        Self { inner, cost }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(cost) = self.cost {
            let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            inner.policy.unblock(cost);
            inner.note_idle_cores();
            ON_CPU.set(Some(cost));
        }
    }
}

fn failed(message: String) -> CallOutput {
    CallOutput::failed(shoal_runtime::CallError::Internal(message))
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if let Some(sandbox) = self.sandbox.take() {
            drop(sandbox);
            self.executor.settle(&self.tenant, self.cost, Duration::ZERO, self.origin);
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
        CallSettings {
            tenant: Arc::from("t"),
            memory_limit: 16 << 20,
            timeout,
            env: Arc::from(Vec::new()),
            allowed_hosts: Arc::default(),
            config: Default::default(),
            trace: None,
        }
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
        let first = first.await.unwrap().unwrap();
        assert!(first.result.is_err(), "the loop ends at its deadline");
        // Its usage: the CPU its loop burned, never more than its wall time.
        let used = first.usage;
        assert!(used.cpu > Duration::ZERO && used.cpu <= used.wall + Duration::from_millis(20), "{used:?}");
        let second = second.await.unwrap().unwrap();
        assert!(second.result.is_ok(), "a's second call ran after its first");
        // It waited its turn through most of the first's 2 s.
        assert!(second.usage.queued >= Duration::from_secs(1), "{:?}", second.usage);
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
        // Measured once, the function is expected to be short.
        let (measured_by, five_s) = (Arc::from(other), settings(Duration::from_secs(5)));
        let function = f();
        let measure = executor.run(&measured_by, &function, &image, &five_s, Bytes::from_static(b"x"));
        assert!(measure.await.unwrap().result.is_ok());
        assert!(executor.expected_cost("t/f") < executor.long_after);
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
        // Measured short, the function's call loops until its 60 s are
        // up, and once long takes turns without its short place; once it
        // has used a long call's CPU, its function is expected to be long,
        // before the call ends.
        let (executor, looping) = a_quick_call_gets_through_beside("a", b"loop", "b").await;
        let waited = Instant::now();
        while executor.expected_cost("t/f") < executor.long_after {
            assert!(waited.elapsed() < Duration::from_secs(20), "still expected short");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!looping.is_finished());
        looping.abort();
    }

    /// An executor on 2 cores with `limits` (and the policy's caps on a
    /// tenant's running calls out of the way), the misbehaving guest
    /// loaded.
    async fn with_limits(limits: SandboxLimits) -> (Arc<Executor>, Arc<FunctionImage>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Arc::new(Runtime::new(RuntimeConfig::new(dir.path())).unwrap());
        let policy = PolicyConfig { max_running_per_tenant: 8, max_long_per_tenant: 4, ..PolicyConfig::new(2) };
        let executor = Arc::new(Executor::with_limits(runtime.clone(), 16, policy, limits));
        let image = runtime.load(shoal_guests::MISBEHAVE).await.unwrap();
        (executor, image, dir)
    }

    /// A call of `tenant` sleeping for 60 s in the background, once it holds
    /// its sandbox.
    async fn sleeper(
        executor: &Arc<Executor>,
        image: &Arc<FunctionImage>,
        tenant: &'static str,
    ) -> tokio::task::JoinHandle<Result<CallOutput, Overloaded>> {
        let before = executor.busy();
        let call = {
            let (executor, image) = (executor.clone(), image.clone());
            tokio::spawn(async move {
                let settings = settings(Duration::from_secs(60));
                executor.run(&Arc::from(tenant), &f(), &image, &settings, Bytes::from_static(b"sleep")).await
            })
        };
        while executor.busy() == before {
            tokio::task::yield_now().await;
        }
        call
    }

    #[tokio::test]
    async fn a_tenants_calls_and_children_stop_at_its_sandboxes_and_memory() {
        let limits = SandboxLimits { node_memory_bytes: 56 << 20, tenant_sandboxes: 2, tenant_memory_bytes: 32 << 20 };
        let (executor, image, _dir) = with_limits(limits).await;
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        let quick = settings(Duration::from_secs(5));
        let first = sleeper(&executor, &image, "a").await;
        let second = sleeper(&executor, &image, "a").await;
        assert_eq!(executor.in_use_of("a"), (2, 32 << 20));
        // a's third call, root or chained, is refused at once, naming a's
        // limit; b's runs.
        let refused = executor.run(&a, &f(), &image, &quick, Bytes::from_static(b"x")).await.unwrap_err();
        assert!(refused.reason.contains("tenant `a` has 2 sandboxes"), "{refused}");
        let lineage = Lineage { depth: 1, deadline: Some(Instant::now() + Duration::from_secs(5)), ..Lineage::root() };
        let function = f();
        let child = executor.run_chained(&a, &function, &image, &quick, Bytes::from_static(b"x"), lineage.clone());
        let refused = tokio::time::timeout(Duration::from_secs(5), child).await.expect("refused at once").unwrap_err();
        assert!(refused.reason.contains("tenant `a`"), "{refused}");
        let out = executor.run_chained(&b, &f(), &image, &quick, Bytes::from_static(b"x"), lineage).await.unwrap();
        assert!(out.result.is_ok());
        // The node's memory: a and b hold 48 MiB of 56; c's 16 MiB call
        // would pass it.
        let third = sleeper(&executor, &image, "b").await;
        let refused = executor.run(&c, &f(), &image, &quick, Bytes::from_static(b"x")).await.unwrap_err();
        assert!(refused.reason.contains("the node's running calls hold 48 MiB"), "{refused}");
        for call in [first, second, third] {
            call.abort();
        }
        let waited = Instant::now();
        while executor.in_use_of("a") != (0, 0) {
            assert!(waited.elapsed() < Duration::from_secs(20), "a's sandboxes were not given back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(executor.run(&c, &f(), &image, &quick, Bytes::from_static(b"x")).await.unwrap().result.is_ok());
    }

    #[tokio::test]
    async fn a_function_never_measured_is_expected_to_be_long() {
        let (executor, image, _dir) = with_limits(SandboxLimits::derived(16, u64::MAX)).await;
        assert_eq!(executor.expected_cost("t/f"), executor.long_after);
        let out = executor.run(&t(), &f(), &image, &settings(Duration::from_secs(5)), Bytes::from_static(b"x")).await;
        assert!(out.unwrap().result.is_ok());
        assert!(executor.expected_cost("t/f") < executor.long_after, "measured: {:?}", executor.expected_cost("t/f"));
    }

    #[tokio::test]
    async fn a_cheap_call_that_turns_long_leaves_the_asking_thread() {
        let (executor, image, _dir) = with_limits(SandboxLimits::derived(16, u64::MAX)).await;
        // Measured cheap: its calls start on the asking thread (this
        // test's, its runtime's only one).
        executor.costs.lock().unwrap().insert(f(), Duration::from_micros(10));
        let looping = {
            let (executor, image) = (executor.clone(), image.clone());
            tokio::spawn(async move {
                executor.run(&t(), &f(), &image, &settings(Duration::from_secs(3)), Bytes::from_static(b"loop")).await
            })
        };
        while executor.busy() == 0 {
            tokio::task::yield_now().await;
        }
        // Had it stayed on this thread, nothing else here would run until
        // its 3 s were up.
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(started.elapsed() < Duration::from_secs(2), "the thread was held for {:?}", started.elapsed());
        assert!(!looping.is_finished());
        let out = looping.await.unwrap().unwrap();
        assert!(matches!(out.result, Err(shoal_runtime::CallError::Timeout { .. })), "{:?}", out.result);
    }

    /// Runs the chained calls of a test's runtime as the node does (with
    /// `run_chained`, charged to the caller's tenant), the callee looked up
    /// by name; keeps the CPU time each child reports.
    struct Chainer {
        executor: std::sync::OnceLock<std::sync::Weak<Executor>>,
        images: HashMap<String, Arc<FunctionImage>>,
        child_cpu: Arc<Mutex<Vec<Duration>>>,
    }

    impl shoal_runtime::Invoker for Chainer {
        fn invoke(
            &self,
            tenant: &str,
            function: &str,
            input: Vec<u8>,
            lineage: Lineage,
        ) -> shoal_runtime::InvokeFuture {
            use shoal_runtime::ChainError;
            let executor = self.executor.get().and_then(std::sync::Weak::upgrade).expect("the executor is set");
            let image = self.images.get(function).cloned();
            let (tenant, key): (Arc<str>, Arc<str>) = (Arc::from(tenant), Arc::from(format!("{tenant}/{function}")));
            let child_cpu = self.child_cpu.clone();
            Box::pin(async move {
                let image = image.ok_or_else(|| ChainError::NotFound(key.to_string()))?;
                let quick = settings(Duration::from_secs(20));
                let out = executor
                    .run_chained(&tenant, &key, &image, &quick, Bytes::from(input), lineage)
                    .await
                    .map_err(|e| ChainError::Unavailable(e.reason))?;
                child_cpu.lock().unwrap().push(out.usage.cpu);
                out.result.map_err(ChainError::Failed)
            })
        }
    }

    #[tokio::test]
    async fn a_chained_call_runs_on_its_callers_place_and_its_cpu_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Arc::new(Runtime::new(RuntimeConfig::new(dir.path())).unwrap());
        let fanout = runtime.load(shoal_guests::FANOUT).await.unwrap();
        let fib = runtime.load(shoal_guests::FIB).await.unwrap();
        let chainer = Arc::new(Chainer {
            executor: std::sync::OnceLock::new(),
            images: HashMap::from([("fib".to_string(), fib)]),
            child_cpu: Arc::default(),
        });
        runtime.set_invoker(chainer.clone()).unwrap();
        let executor = Arc::new(Executor::new(runtime.clone(), 16, PolicyConfig::new(2)));
        chainer.executor.set(Arc::downgrade(&executor)).unwrap();
        // Both measured short: the parent holds a short place, goes to the
        // pool (it costs more than the hand-off), and so do its children.
        let parent: Arc<str> = Arc::from("t/fanout");
        for (function, cost) in [("t/fanout", 2 * INLINE_BELOW), ("t/fib", INLINE_BELOW)] {
            executor.costs.lock().unwrap().insert(Arc::from(function), cost);
        }

        // While the children run one after another, the short places on
        // the CPU are watched: the parent, waiting, lends its place to the
        // child running, so there is never more than one.
        let call = {
            let (executor, fanout, parent) = (executor.clone(), fanout.clone(), parent.clone());
            tokio::spawn(async move {
                let input = Bytes::from_static(b"call 200 fib 16");
                executor.run(&t(), &parent, &fanout, &settings(Duration::from_secs(60)), input).await
            })
        };
        let (mut most, mut seen_running) = (0, 0);
        while !call.is_finished() {
            let on_cpu = executor.inner.lock().unwrap().policy.short_on_cpu();
            most = most.max(on_cpu);
            seen_running += u32::from(on_cpu > 0);
            tokio::task::yield_now().await;
        }
        let out = call.await.unwrap().unwrap();
        assert_eq!(out.result.as_deref().map(String::from_utf8_lossy).unwrap(), "200/200 ok");
        assert!(seen_running > 10, "the calls were seen running {seen_running} times");
        assert_eq!(most, 1, "a caller and its child held two short places");
        assert_eq!(executor.inner.lock().unwrap().policy.short_on_cpu(), 0, "every place came back");

        // The parent's CPU time leaves out its child's, run in its poll.
        chainer.child_cpu.lock().unwrap().clear();
        let input = Bytes::from_static(b"call 1 fib 28");
        let out = executor.run(&t(), &parent, &fanout, &settings(Duration::from_secs(60)), input).await.unwrap();
        assert_eq!(out.result.as_deref().map(String::from_utf8_lossy).unwrap(), "1/1 ok");
        // fib(28) is ~1.6 ms on the development machines; well under it on
        // any, it was not measured.
        let child = chainer.child_cpu.lock().unwrap()[0];
        assert!(child > Duration::from_micros(300), "fib(28) took {child:?}");
        assert!(out.usage.cpu < child / 2, "the parent was charged {:?}, its child {child:?}", out.usage.cpu);
    }

    #[tokio::test]
    async fn long_calls_use_the_cores_no_short_call_wants() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::new(dir.path());
        config.long_call_lanes = 1;
        let runtime = Arc::new(Runtime::new(config).unwrap());
        let executor = Arc::new(Executor::new(runtime.clone(), 8, PolicyConfig::new(2)));
        let image = runtime.load(shoal_guests::MISBEHAVE).await.unwrap();
        // Two calls looping until their deadline, expected long from the
        // start: with no short call on either core, both run at once.
        let looping = |tenant: &'static str| {
            let (executor, image) = (executor.clone(), image.clone());
            tokio::spawn(async move {
                let quick = settings(Duration::from_millis(1500));
                executor.run(&Arc::from(tenant), &f(), &image, &quick, Bytes::from_static(b"loop")).await
            })
        };
        let calls = [looping("a"), looping("b")];
        let mut most = 0;
        while calls.iter().any(|call| !call.is_finished()) {
            most = most.max(runtime.long_calls_running());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(most, 2, "two long calls took turns on one lane while the other core was idle");
        for call in calls {
            let out = call.await.unwrap().unwrap();
            assert!(matches!(out.result, Err(shoal_runtime::CallError::Timeout { .. })), "{:?}", out.result);
        }
        assert_eq!(runtime.long_calls_running(), 0);
    }
}
