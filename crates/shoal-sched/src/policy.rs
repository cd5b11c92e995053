//! The scheduling policy: admission, per-tenant queues served by deficit
//! round robin, and per-tenant shares of the running places — pure
//! functions over a state and a clock (the caller passes `now`), with no
//! I/O, no tasks and no sleeps, so every decision is unit- and
//! property-tested.
//!
//! - **Capacity** is CPU: the node has `cores`, and each call is expected
//!   to use the CPU time its function used lately (an exponentially
//!   weighted mean the driver keeps; a function never measured is expected
//!   to be long). At most `short_places` short calls are on the CPU at
//!   once (one per core: more would only take turns on the cores and each
//!   would end later; a call blocked in a host call, on I/O or a chained
//!   call, is not on the CPU — see [`Policy::block`]), and at most
//!   `max_running` root calls (a client's or an asynchronous queue's) are
//!   started and unfinished.
//! - **Shares**: a tenant alone may start up to `max_running_per_tenant`
//!   root calls (fewer than the node's: never all of them) and
//!   `max_long_per_tenant` long ones; while other tenants wait, no more
//!   than its weighted share of the places among the tenants waiting
//!   (itself included). Calls it started already run on; it starts no
//!   more until it is back under its share.
//! - **Chained calls** (a call's children, [`Origin::Chained`]) are charged
//!   to their root's tenant: they wait in its queue, take its turns and
//!   the short places like any call, but take no running place (their
//!   root holds one), and a long one takes no long place (long calls take
//!   turns on the CPU in the runtime, round robin by tenant). So a child
//!   never waits for a place a blocked call holds: a parent waiting for
//!   its children cannot deadlock the node.
//! - **Admission**: a call runs now if there is room and no one waits;
//!   else it is queued only if its tenant's queue and the node's queue
//!   have room *and* its expected completion fits its deadline; else it is
//!   refused at once with a `retry_after`. The expected wait is the
//!   smaller of the node's work (running and queued) spread over the
//!   places the call runs on and the tenant's own work at its weighted
//!   share of them, so a light tenant is not refused because a heavy one
//!   filled the node. A short call counts only short work over the short
//!   places: long calls, however many, do not hold up short ones. That
//!   plan takes the cores as the calls' alone. While a tenant's calls of
//!   a kind wait and their queue has drained slower than planned (part of
//!   the cores going to the node's own threads or other processes, or its
//!   calls holding its places blocked), a root call's wait is read from
//!   the rate it drained at, a quarter longer, so that a call is not
//!   queued only to expire.
//! - **Pick next**: deficit round robin over tenants with queued calls, on
//!   expected CPU time, corrected by the measured time when a call ends;
//!   quanta are proportional to tenant weights. A sparse tenant — one with
//!   nothing running and nothing queued when its call arrives — goes to
//!   the front of the round with credit for that call (as new flows do in
//!   FQ-CoDel): a light tenant's call waits for one place to free, not for
//!   the busy tenants' turns. It gets this once per time it was idle, so
//!   a tenant keeping calls queued or running cannot use it to pass others.
//! - **Short and long calls**: a call expected to use at least
//!   `long_after` of CPU is long; at most `max_running_long` long root
//!   calls hold running places (they take turns on the CPU in the
//!   runtime), so short calls always find one. A tenant's queue is FIFO
//!   within each kind and origin: a waiting call whose places are full
//!   never holds up a call that could start behind it.
//! - **Expiry**: a queued call whose deadline can no longer be met is
//!   handed back (never silently dropped) so its caller gets an answer.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A call's handle in the policy, chosen by the driver.
pub type CallTicket = u64;

#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// CPU cores calls run on.
    pub cores: u32,
    /// Short calls on the CPU at once (started, not finished, not blocked
    /// in a host call).
    pub short_places: u32,
    /// Root calls started and unfinished at once (blocked ones included),
    /// all tenants together.
    pub max_running: u32,
    /// Root calls of one tenant running at once when no other tenant
    /// waits (while others wait: its weighted share of `max_running`).
    pub max_running_per_tenant: u32,
    /// Calls waiting, all tenants together, and per tenant.
    pub max_queued: usize,
    pub max_queued_per_tenant: usize,
    /// CPU time a tenant of weight 1 may use per round.
    pub quantum: Duration,
    /// Expected CPU time from which a call is long.
    pub long_after: Duration,
    /// Long root calls holding running places at once.
    pub max_running_long: u32,
    /// Long root calls of one tenant when no other tenant waits (while
    /// others wait: its weighted share of `max_running_long`).
    pub max_long_per_tenant: u32,
}

impl PolicyConfig {
    pub fn new(cores: u32) -> Self {
        let cores = cores.max(1);
        Self {
            cores,
            short_places: cores,
            max_running: 4 * cores,
            max_running_per_tenant: 3 * cores,
            max_queued: 10_000,
            max_queued_per_tenant: 2_000,
            quantum: Duration::from_micros(250),
            long_after: Duration::from_millis(5),
            max_running_long: 2 * cores,
            max_long_per_tenant: cores,
        }
    }
}

/// Who made a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A client, or the queue of asynchronous calls: it takes a running
    /// place.
    Root,
    /// Another call (`invoke.call`/`spawn`): charged to the root's tenant,
    /// it takes no running place.
    Chained,
}

/// What happens to a call that arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Start it now.
    Run,
    /// It waits; [`Policy::next`] will name it.
    Queued,
    /// Refused: the queue is full or it could not finish in time.
    Refused { retry_after: Duration, reason: String },
}

/// A decision about a queued call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Run(CallTicket),
    /// Its deadline can no longer be met; answer its caller.
    Expire(CallTicket),
}

#[derive(Debug)]
struct Waiting {
    ticket: CallTicket,
    cost: Duration,
    deadline: Instant,
    /// Arrival order within the policy.
    seq: u64,
}

impl Waiting {
    /// From when it can no longer make its deadline (`now` if it cannot
    /// already).
    fn expires_from(&self, now: Instant) -> Instant {
        self.deadline.checked_sub(self.cost).unwrap_or(now)
    }
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// A tenant's queues, one per kind of call: (origin, long). Each is FIFO;
/// the oldest head that can start goes first.
const KINDS: [(Origin, bool); 4] =
    [(Origin::Root, false), (Origin::Root, true), (Origin::Chained, false), (Origin::Chained, true)];

fn kind_index(origin: Origin, long: bool) -> usize {
    match (origin, long) {
        (Origin::Root, false) => 0,
        (Origin::Root, true) => 1,
        (Origin::Chained, false) => 2,
        (Origin::Chained, true) => 3,
    }
}

#[derive(Debug, Default)]
struct Tenant {
    weight: u32,
    queues: [VecDeque<Waiting>; 4],
    queued: usize,
    /// Root calls started and unfinished.
    running: u32,
    /// Long root calls holding long places.
    long: u32,
    /// The admin's cap on its running root calls, if any (else the
    /// policy's `max_running_per_tenant`).
    running_cap: Option<u32>,
    /// CPU time it may still use this round, in nanoseconds (may go
    /// negative when calls use more than expected).
    deficit: i128,
    /// Expected CPU time of its queued calls, and of its running ones
    /// (its chained calls included).
    queued_work: Work,
    running_work: Work,
    /// Whether it is in the round-robin list.
    active: bool,
    /// No queued call can expire before this (the earliest deadline less
    /// cost among them; may be earlier than that after calls left the
    /// queue, which only costs a needless look).
    expires_from: Option<Instant>,
    /// How fast its queues of short and of long calls drained lately.
    drain: [Drain; 2],
}

impl Tenant {
    /// Whether calls of this kind (short or long, of any origin) wait.
    fn waits(&self, long: bool) -> bool {
        !self.queues[kind_index(Origin::Root, long)].is_empty()
            || !self.queues[kind_index(Origin::Chained, long)].is_empty()
    }
}

/// A window over which a drain rate is measured, at least: shorter ones
/// (a queue that emptied sooner) are measured only from a tenth of it.
const DRAIN_WINDOW: Duration = Duration::from_millis(100);
/// Calls a window must see start to be measured: a call or two that
/// waited behind a long one say how long that one ran, not how fast the
/// queue drains.
const DRAIN_STARTS: u32 = 8;
/// A rate measured longer ago than this, before the calls that wait now
/// began to wait, says nothing about them.
const DRAIN_FRESH: Duration = Duration::from_secs(1);
/// The weight of a new window's rate in the running mean.
const DRAIN_SMOOTHING: f64 = 0.3;
/// The slowest rate taken (a thousandth of a core), so that calls
/// expected to cost nothing do not make it zero.
const DRAIN_SLOWEST: f64 = 0.001;
/// A measured rate swings from window to window: a wait read from it is
/// taken this much longer, so that a queue filled to what the rate
/// allows keeps room for it to drop.
const DRAIN_MARGIN: f64 = 1.25;
/// The longest a refused caller is told to wait before trying again: a
/// wait longer than that is reckoned again by then.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The longest wait the policy reckons with.
const LONGEST_WAIT: Duration = Duration::from_secs(24 * 3600);

/// How fast a tenant's queue of calls of one kind drains: the
/// expected CPU time of its calls started per wall second, measured from
/// one start to the next ones while calls of the kind waited throughout —
/// so the starts were held back by the places and the turns, never by a
/// lack of calls, and a stall before the first start (calls waiting for a
/// running one that took long) is not counted. One core's worth of calls
/// is a rate of 1.0; a rate below what the tenant's share of the places
/// gives it means the cores do other work besides, or its calls hold its
/// places blocked.
#[derive(Debug, Default)]
struct Drain {
    /// Whether calls of the kind wait now.
    waiting: bool,
    /// The open window: from which start (none until the first since
    /// calls began to wait), and the calls and work started since.
    since: Option<Instant>,
    starts: u32,
    started: Duration,
    /// The mean rate over the last windows, and when it was last measured.
    rate: Option<(f64, Instant)>,
    /// Whether that rate was measured since calls began to wait this time.
    rate_now: bool,
}

impl Drain {
    /// Calls of the kind wait (a window opens at the next start).
    fn waiting(&mut self) {
        if !self.waiting {
            self.waiting = true;
            self.since = None;
            self.rate_now = false;
        }
    }

    /// No call of the kind waits any more, and not because one started
    /// (they expired or were cancelled): the window closes unmeasured.
    fn stopped(&mut self) {
        self.waiting = false;
        self.since = None;
    }

    /// A waiting call costing `cost` started at `now`; `emptied`: it was
    /// the last of its kind. The first start opens a window; each later
    /// one may end it, so a window measures the work started over the
    /// time it took. It goes into the mean once it lasted a
    /// `DRAIN_WINDOW` with `DRAIN_STARTS` starts in it (and the next
    /// opens), or, when the queue emptied, a tenth of that with as many.
    fn started(&mut self, now: Instant, cost: Duration, emptied: bool) {
        if !self.waiting {
            return;
        }
        match self.since {
            None => {
                self.since = Some(now);
                self.starts = 0;
                self.started = Duration::ZERO;
            }
            Some(since) => {
                self.starts += 1;
                self.started += cost;
                let elapsed = now.saturating_duration_since(since);
                let at_least = if emptied { DRAIN_WINDOW / 10 } else { DRAIN_WINDOW };
                if elapsed >= at_least && !elapsed.is_zero() && self.starts >= DRAIN_STARTS {
                    self.measure(now, elapsed);
                }
            }
        }
        if emptied {
            self.stopped();
        }
    }

    /// Fold the window just ended (`elapsed` long) into the mean, and open
    /// the next one.
    fn measure(&mut self, now: Instant, elapsed: Duration) {
        let sample = (self.started.as_secs_f64() / elapsed.as_secs_f64()).max(DRAIN_SLOWEST);
        let rate = match self.rate {
            Some((rate, at)) if now.saturating_duration_since(at) <= DRAIN_FRESH => {
                rate + (sample - rate) * DRAIN_SMOOTHING
            }
            _ => sample,
        };
        self.rate = Some((rate, now));
        self.rate_now = true;
        self.since = Some(now);
        self.starts = 0;
        self.started = Duration::ZERO;
    }

    /// How long `work` takes to drain at the rate measured lately (with a
    /// margin for its swings), if one was: while the calls that wait now
    /// have waited, or else in the last `DRAIN_FRESH`.
    fn time_for(&self, now: Instant, work: Duration) -> Option<(Duration, f64)> {
        let (rate, at) = self.rate?;
        if !self.rate_now && now.saturating_duration_since(at) > DRAIN_FRESH {
            return None;
        }
        let time = Duration::try_from_secs_f64(work.as_secs_f64() * DRAIN_MARGIN / rate).unwrap_or(LONGEST_WAIT);
        Some((time.min(LONGEST_WAIT), rate))
    }
}

/// The scheduler's state.
#[derive(Debug)]
pub struct Policy {
    config: PolicyConfig,
    tenants: HashMap<Arc<str>, Tenant>,
    /// Tenants with queued calls, in round-robin order.
    round: VecDeque<Arc<str>>,
    /// Sum of the weights of the tenants in the round.
    active_weight: u64,
    /// Root calls started and unfinished.
    running: u32,
    /// Long root calls holding long places.
    running_long: u32,
    /// Short calls (of any origin) started and unfinished.
    running_short: u32,
    /// Chained calls started and unfinished.
    running_chained: u32,
    /// Short calls running but blocked in a host call.
    blocked_short: u32,
    queued: usize,
    next_seq: u64,
    /// Expected CPU time of the calls running and of those queued.
    running_work: Work,
    queued_work: Work,
}

/// Expected CPU time of a set of calls, short and long apart: a short
/// call waits only for the short work ahead of it (long calls take turns
/// on the CPU in the runtime, not the short places).
#[derive(Clone, Copy, Debug, Default)]
struct Work {
    short: Duration,
    long: Duration,
}

impl Work {
    fn add(&mut self, cost: Duration, long: bool) {
        if long {
            self.long += cost;
        } else {
            self.short += cost;
        }
    }

    fn take(&mut self, cost: Duration, long: bool) {
        let of = if long { &mut self.long } else { &mut self.short };
        *of = of.saturating_sub(cost);
    }

    fn total(self) -> Duration {
        self.short + self.long
    }
}

fn nanos(d: Duration) -> i128 {
    d.as_nanos() as i128
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Self {
        Self {
            config,
            tenants: HashMap::new(),
            round: VecDeque::new(),
            active_weight: 0,
            running: 0,
            running_long: 0,
            running_short: 0,
            running_chained: 0,
            blocked_short: 0,
            queued: 0,
            next_seq: 0,
            running_work: Work::default(),
            queued_work: Work::default(),
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Root calls running now.
    pub fn running(&self) -> u32 {
        self.running
    }

    /// Chained calls running now.
    pub fn running_chained(&self) -> u32 {
        self.running_chained
    }

    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Calls of `tenant` waiting now.
    pub fn queued_of(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |t| t.queued)
    }

    /// Long root calls running now.
    pub fn running_long(&self) -> u32 {
        self.running_long
    }

    fn is_long(&self, cost: Duration) -> bool {
        cost >= self.config.long_after
    }

    /// Short calls on the CPU now: running and not blocked.
    pub fn short_on_cpu(&self) -> u32 {
        self.running_short.saturating_sub(self.blocked_short)
    }

    /// A running call of expected `cost` stopped: it waits in a host call
    /// (for I/O or a chained call), or it ran long enough to be long and
    /// takes turns with the long calls. A short one gives its place on the
    /// CPU to another until [`Policy::unblock`]. Long calls take turns on
    /// the CPU by themselves and keep their places.
    pub fn block(&mut self, cost: Duration) {
        if !self.is_long(cost) {
            self.blocked_short += 1;
        }
    }

    /// The blocked call runs again (taking its place back even when that
    /// puts the CPU over its short places for a while).
    pub fn unblock(&mut self, cost: Duration) {
        if !self.is_long(cost) {
            self.blocked_short = self.blocked_short.saturating_sub(1);
        }
    }

    /// Root calls of `tenant` running now.
    pub fn running_of(&self, tenant: &str) -> u32 {
        self.tenants.get(tenant).map_or(0, |t| t.running)
    }

    /// Set a tenant's weight (default 1; 0 is taken as 1).
    pub fn set_weight(&mut self, tenant: &str, weight: u32) {
        let weight = weight.max(1);
        let t = self.tenant(tenant);
        let (old, active) = (t.weight, t.active);
        t.weight = weight;
        if active {
            self.active_weight = self.active_weight - u64::from(old) + u64::from(weight);
        }
    }

    /// Cap a tenant's running root calls below the policy's
    /// `max_running_per_tenant` (None: that default).
    pub fn set_running_cap(&mut self, tenant: &str, cap: Option<u32>) {
        self.tenant(tenant).running_cap = cap.map(|c| c.max(1));
    }

    /// `name`'s state, made on its first call. Looked up by `&str` first:
    /// making the key (an `Arc<str>`) only for a new tenant keeps an
    /// allocation off every admission (this runs up to three times per
    /// call).
    fn tenant(&mut self, name: &str) -> &mut Tenant {
        if !self.tenants.contains_key(name) {
            self.tenants.insert(Arc::from(name), Tenant { weight: 1, ..Tenant::default() });
        }
        self.tenants.get_mut(name).expect("inserted just now")
    }

    /// The most of `total` places `t` may hold: `alone` while no other
    /// tenant waits, else its weighted share among the tenants waiting and
    /// itself (at least one place, at most `alone`).
    fn share(&self, t: &Tenant, total: u32, alone: u32) -> u32 {
        let own = u64::from(t.weight);
        let others = self.active_weight - if t.active { own } else { 0 };
        if others == 0 {
            return alone;
        }
        let share = (u64::from(total) * own).div_ceil(own + others);
        u32::try_from(share).unwrap_or(u32::MAX).clamp(1, alone.max(1))
    }

    /// Whether a call of `t` of this origin and kind may start now.
    fn may_start(&self, t: &Tenant, origin: Origin, long: bool) -> bool {
        let config = &self.config;
        match (origin, long) {
            (Origin::Chained, true) => true,
            (_, false) if self.short_on_cpu() >= config.short_places => false,
            (Origin::Chained, false) => true,
            (Origin::Root, long) => {
                let alone = t.running_cap.unwrap_or(config.max_running_per_tenant).min(config.max_running);
                self.running < config.max_running
                    && t.running < self.share(t, config.max_running, alone)
                    && (!long
                        || (self.running_long < config.max_running_long
                            && t.long < self.share(t, config.max_running_long, config.max_long_per_tenant)))
            }
        }
    }

    /// Take the places of a call of `tenant` starting now.
    fn start(&mut self, tenant: &str, origin: Origin, cost: Duration) {
        let long = self.is_long(cost);
        self.running_work.add(cost, long);
        self.running_short += u32::from(!long);
        self.tenant(tenant).running_work.add(cost, long);
        match origin {
            Origin::Root => {
                self.running += 1;
                self.running_long += u32::from(long);
                let t = self.tenant(tenant);
                t.running += 1;
                t.long += u32::from(long);
            }
            Origin::Chained => self.running_chained += 1,
        }
    }

    /// How long until a call of `tenant` costing `cost` would be done if
    /// queued now: the smaller of all work (running and queued) spread
    /// over the places it runs on and the tenant's own work at its
    /// weighted share of them — so a light tenant is not refused because a
    /// heavy one filled the node, whether with queued calls or running
    /// ones. A short call counts only short work over the short places:
    /// long calls, however many, take turns on the CPU in the runtime and
    /// leave the short places to short calls. A long call counts all work
    /// over the cores. For a root call, where the tenant's calls of this
    /// kind wait and their queue drained slower than that lately: the wait
    /// at the rate it drained at (which is returned too). A chained call
    /// keeps the plan: it needs no running place, so it may start before
    /// root calls held back by the tenant's places.
    fn expected_wait(&self, now: Instant, tenant: &str, cost: Duration, origin: Origin) -> (Duration, Option<f64>) {
        let long = self.is_long(cost);
        let (places, of): (u32, fn(Work) -> Duration) = if long {
            // Calls run on at most this many cores at once.
            (self.config.cores.min(self.config.max_running), Work::total)
        } else {
            (self.config.short_places, |w| w.short)
        };
        let places = places.max(1);
        let node_wide = (of(self.running_work) + of(self.queued_work) + cost) / places;
        let Some(t) = self.tenants.get(tenant) else { return (node_wide, None) };
        // Its share of the places among the tenants waiting, itself included.
        let total_weight = self.active_weight + if t.active { 0 } else { u64::from(t.weight) };
        let own = (of(t.running_work) + of(t.queued_work) + cost)
            .mul_f64(total_weight as f64 / (f64::from(t.weight) * f64::from(places)));
        let planned = node_wide.min(own);
        let queued = if long { t.queued_work.long } else { t.queued_work.short };
        match t.drain[usize::from(long)].time_for(now, queued + cost) {
            Some((measured, rate)) if origin == Origin::Root && t.waits(long) && measured > planned => {
                (measured, Some(rate))
            }
            _ => (planned, None),
        }
    }

    /// A call arrives: run it now, queue it, or refuse it.
    pub fn admit(
        &mut self,
        now: Instant,
        tenant: &str,
        ticket: CallTicket,
        cost: Duration,
        deadline: Instant,
        origin: Origin,
    ) -> Admission {
        let nobody_waits = self.queued == 0;
        let long = self.is_long(cost);
        self.tenant(tenant);
        let t = &self.tenants[tenant];
        if nobody_waits && t.queued == 0 && self.may_start(t, origin, long) {
            self.start(tenant, origin, cost);
            return Admission::Run;
        }
        let refuse = |retry_after: Duration, reason: String| Admission::Refused {
            retry_after: retry_after.clamp(Duration::from_secs(1), LONGEST_RETRY_AFTER),
            reason,
        };
        let (wait, drained_at) = self.expected_wait(now, tenant, cost, origin);
        if self.queued >= self.config.max_queued {
            return refuse(wait, format!("the node's queue holds {} calls, its limit", self.config.max_queued));
        }
        if t.queued >= self.config.max_queued_per_tenant {
            return refuse(
                wait,
                format!("tenant `{tenant}` has {} calls queued, its limit", self.config.max_queued_per_tenant),
            );
        }
        if now + wait > deadline {
            return refuse(
                wait,
                format!(
                    "the expected wait of {} ms{} would pass the call's deadline in {} ms",
                    wait.as_millis(),
                    drained_at.map_or(String::new(), |rate| format!(
                        " (at the rate its queue drained lately: {rate:.3} cores' worth of calls)"
                    )),
                    deadline.saturating_duration_since(now).as_millis()
                ),
            );
        }
        let name: Arc<str> = self.tenants.get_key_value(tenant).map(|(k, _)| k.clone()).expect("inserted above");
        let seq = self.next_seq;
        self.next_seq += 1;
        let t = self.tenants.get_mut(tenant).expect("inserted above");
        let waiting = Waiting { ticket, cost, deadline, seq };
        t.expires_from = earliest(t.expires_from, waiting.expires_from(now));
        t.queues[kind_index(origin, long)].push_back(waiting);
        t.queued += 1;
        t.queued_work.add(cost, long);
        t.drain[usize::from(long)].waiting();
        let newly_active = !t.active;
        t.active = true;
        if newly_active {
            self.active_weight += u64::from(t.weight);
            if t.running == 0 {
                // A sparse tenant (nothing running, nothing waiting) goes
                // first, once, with credit for this call: its call waits for
                // one place to free, not for a round of the busy tenants.
                t.deficit = t.deficit.max(nanos(cost));
                self.round.push_front(name);
            } else {
                self.round.push_back(name);
            }
        }
        self.queued += 1;
        self.queued_work.add(cost, long);
        Admission::Queued
    }

    /// Take `name` out of the round's accounting (its queue is empty).
    fn deactivate(&mut self, name: &str) {
        if let Some(t) = self.tenants.get_mut(name)
            && t.active
        {
            t.active = false;
            t.deficit = 0;
            self.active_weight -= u64::from(t.weight);
        }
    }

    /// Decide what starts now (and which waiting calls can no longer make
    /// their deadline), by deficit round robin.
    pub fn next(&mut self, now: Instant) -> Vec<Decision> {
        let mut decisions = Vec::new();
        self.expire(now, &mut decisions);
        self.fast_forward();
        // Each pass either starts a call or adds quanta; a tenant none of
        // whose calls can have a place now is set aside for this decision
        // and keeps its place in the round (a sparse tenant stays first).
        let mut passed = Vec::new();
        while let Some(name) = self.round.pop_front() {
            let Some(t) = self.tenants.get(&name) else { continue };
            if t.queued == 0 {
                self.deactivate(&name);
                continue;
            }
            let Some(kind) = self.startable(t) else {
                passed.push(name);
                continue;
            };
            let quantum = nanos(self.config.quantum).max(1);
            let cost = t.queues[kind].front().expect("a startable queue has a head").cost;
            if t.deficit < nanos(cost) {
                let t = self.tenants.get_mut(&name).expect("looked up just now");
                t.deficit += quantum * i128::from(t.weight);
                self.round.push_back(name);
                continue;
            }
            let t = self.tenants.get_mut(&name).expect("looked up just now");
            let head = t.queues[kind].pop_front().expect("a startable queue has a head");
            t.deficit -= nanos(head.cost);
            t.queued -= 1;
            let long = KINDS[kind].1;
            t.queued_work.take(head.cost, long);
            let none_of_kind = !t.waits(long);
            t.drain[usize::from(long)].started(now, head.cost, none_of_kind);
            let emptied = t.queued == 0;
            self.queued_work.take(head.cost, long);
            self.queued -= 1;
            self.start(&name, KINDS[kind].0, head.cost);
            decisions.push(Decision::Run(head.ticket));
            if emptied {
                self.deactivate(&name);
            } else {
                // Stay at the front while its deficit lasts.
                self.round.push_front(name);
            }
        }
        for name in passed.into_iter().rev() {
            self.round.push_front(name);
        }
        decisions
    }

    /// Which of `t`'s queues has the oldest head that can start now; none
    /// when no call of it can.
    fn startable(&self, t: &Tenant) -> Option<usize> {
        let long_after = self.config.long_after;
        (0..KINDS.len())
            .filter_map(|kind| t.queues[kind].front().map(|head| (kind, head)))
            .filter(|(kind, head)| {
                let (origin, long) = KINDS[*kind];
                debug_assert_eq!(long, head.cost >= long_after);
                self.may_start(t, origin, long)
            })
            .min_by_key(|(_, head)| head.seq)
            .map(|(kind, _)| kind)
    }

    /// Skip the rounds in which no tenant could start a call yet: add to
    /// every waiting tenant, at once, the quanta all of them would get in
    /// those rounds (a call far costlier than a quantum would otherwise
    /// take one pass per quantum to become affordable). Counted over the
    /// calls that could start now: a tenant waiting for a place does not
    /// hold the others back.
    fn fast_forward(&mut self) {
        let quantum = nanos(self.config.quantum).max(1);
        let rounds = self
            .round
            .iter()
            .filter_map(|name| self.tenants.get(name))
            .filter_map(|t| {
                let kind = self.startable(t)?;
                let need = nanos(t.queues[kind].front()?.cost) - t.deficit;
                let per_round = quantum * i128::from(t.weight);
                Some(if need <= 0 { 0 } else { (need + per_round - 1) / per_round })
            })
            .min()
            .unwrap_or(0);
        if rounds > 1 {
            for name in &self.round {
                if let Some(t) = self.tenants.get_mut(name) {
                    t.deficit += (rounds - 1) * quantum * i128::from(t.weight);
                }
            }
        }
    }

    /// Hand back the queued calls that can no longer make their deadline.
    /// Only tenants with calls queued can have any, and they are the ones
    /// in the round: the work is in the tenants waiting, not in all the
    /// tenants the node has seen.
    fn expire(&mut self, now: Instant, decisions: &mut Vec<Decision>) {
        if self.queued == 0 {
            return;
        }
        let long_after = self.config.long_after;
        let mut emptied = Vec::new();
        for name in &self.round {
            let Some(t) = self.tenants.get_mut(name) else { continue };
            if t.expires_from.is_none_or(|from| now <= from) {
                continue;
            }
            let mut expired = 0;
            let mut expired_work = Work::default();
            let mut expires_from = None;
            for queue in &mut t.queues {
                queue.retain(|w| {
                    let keep = now + w.cost <= w.deadline;
                    if keep {
                        expires_from = earliest(expires_from, w.expires_from(now));
                    } else {
                        decisions.push(Decision::Expire(w.ticket));
                        expired += 1;
                        expired_work.add(w.cost, w.cost >= long_after);
                    }
                    keep
                });
            }
            t.expires_from = expires_from;
            for long in [false, true] {
                if !t.waits(long) {
                    t.drain[usize::from(long)].stopped();
                }
            }
            t.queued -= expired;
            self.queued -= expired;
            for (cost, long) in [(expired_work.short, false), (expired_work.long, true)] {
                t.queued_work.take(cost, long);
                self.queued_work.take(cost, long);
            }
            if t.queued == 0 && t.active {
                emptied.push(name.clone());
            }
        }
        if emptied.is_empty() {
            return;
        }
        for name in &emptied {
            self.deactivate(name);
        }
        let tenants = &self.tenants;
        self.round.retain(|name| tenants.get(name).is_some_and(|t| t.active));
    }

    /// Take a queued call out (its caller gave up).
    pub fn cancel(&mut self, tenant: &str, ticket: CallTicket) -> bool {
        let Some(t) = self.tenants.get_mut(tenant) else { return false };
        let Some(w) = t.queues.iter_mut().find_map(|queue| {
            let at = queue.iter().position(|w| w.ticket == ticket)?;
            queue.remove(at)
        }) else {
            return false;
        };
        let long = w.cost >= self.config.long_after;
        if !t.waits(long) {
            t.drain[usize::from(long)].stopped();
        }
        t.queued -= 1;
        t.queued_work.take(w.cost, long);
        let emptied = t.queued == 0;
        self.queued_work.take(w.cost, long);
        self.queued -= 1;
        if emptied {
            self.deactivate(tenant);
            self.round.retain(|name| name.as_ref() != tenant);
        }
        true
    }

    /// A running call of `tenant` ended after using `used` CPU time where
    /// `expected` was planned: free its places and settle the difference
    /// with its tenant's deficit. (A blocked short call is unblocked first.)
    pub fn finish(&mut self, tenant: &str, expected: Duration, used: Duration, origin: Origin) {
        let long = self.is_long(expected);
        if !long {
            self.running_short = self.running_short.saturating_sub(1);
        }
        self.running_work.take(expected, long);
        match origin {
            Origin::Root => {
                self.running = self.running.saturating_sub(1);
                if long {
                    self.running_long = self.running_long.saturating_sub(1);
                }
            }
            Origin::Chained => self.running_chained = self.running_chained.saturating_sub(1),
        }
        if let Some(t) = self.tenants.get_mut(tenant) {
            t.running_work.take(expected, long);
            if origin == Origin::Root {
                t.running = t.running.saturating_sub(1);
                if long {
                    t.long = t.long.saturating_sub(1);
                }
            }
            if t.active {
                t.deficit -= nanos(used) - nanos(expected);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(cores: u32, max_running: u32) -> Policy {
        Policy::new(PolicyConfig { max_running, max_running_per_tenant: max_running, ..PolicyConfig::new(cores) })
    }

    #[test]
    fn a_call_runs_at_once_when_there_is_room() {
        let mut p = policy(2, 2);
        let now = Instant::now();
        assert_eq!(p.admit(now, "a", 1, MS, now + 100 * MS, Origin::Root), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, MS, now + 100 * MS, Origin::Root), Admission::Run);
        assert_eq!(p.admit(now, "a", 3, MS, now + 100 * MS, Origin::Root), Admission::Queued);
        assert_eq!(p.next(now), vec![]);
        p.finish("a", MS, MS, Origin::Root);
        assert_eq!(p.next(now), vec![Decision::Run(3)]);
    }

    #[test]
    fn calls_that_cannot_finish_in_time_are_refused_at_once() {
        let mut p = policy(1, 1);
        let now = Instant::now();
        assert_eq!(p.admit(now, "a", 1, 50 * MS, now + 100 * MS, Origin::Root), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, 40 * MS, now + 100 * MS, Origin::Root), Admission::Queued);
        match p.admit(now, "a", 3, 40 * MS, now + 100 * MS, Origin::Root) {
            Admission::Refused { reason, retry_after } => {
                assert!(reason.contains("deadline"), "{reason}");
                assert!(retry_after >= Duration::from_secs(1));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_light_tenant_is_not_refused_for_a_heavy_tenants_backlog() {
        let mut p = policy(1, 1);
        let now = Instant::now();
        assert_eq!(p.admit(now, "heavy", 0, 10 * MS, now + Duration::from_secs(10), Origin::Root), Admission::Run);
        for i in 1..=90 {
            assert_eq!(
                p.admit(now, "heavy", i, 10 * MS, now + Duration::from_secs(10), Origin::Root),
                Admission::Queued
            );
        }
        // 900 ms of heavy work queued; light's own call needs ~2 ms at a
        // half share.
        assert_eq!(p.admit(now, "light", 100, MS, now + 50 * MS, Origin::Root), Admission::Queued);
    }

    #[test]
    fn another_tenants_long_calls_do_not_refuse_a_call_queued_for_a_moment() {
        let mut p = Policy::new(PolicyConfig { max_running: 8, max_running_per_tenant: 8, ..PolicyConfig::new(2) });
        let now = Instant::now();
        let far = now + Duration::from_secs(100);
        // A tenant's root call spawned 50 long children (a second of CPU
        // each: 25 s of work on two cores) and holds both short places.
        assert_eq!(p.admit(now, "loud", 0, MS, far, Origin::Root), Admission::Run);
        for i in 1..=50 {
            assert_eq!(p.admit(now, "loud", i, Duration::from_secs(1), far, Origin::Chained), Admission::Run);
        }
        assert_eq!(p.admit(now, "loud", 99, MS, far, Origin::Chained), Admission::Run);
        // Another tenant's short call waits for a short place, a
        // millisecond's work ahead of it, not for the long calls.
        assert_eq!(p.admit(now, "quiet", 100, MS, now + Duration::from_secs(1), Origin::Root), Admission::Queued);
        // Its long call waits for its share of the cores, not for the
        // other tenant's long calls to end.
        assert_eq!(p.admit(now, "quiet", 101, 10 * MS, now + Duration::from_secs(1), Origin::Root), Admission::Queued);
        // Those of the tenant with the long calls wait for them.
        assert!(matches!(p.admit(now, "loud", 102, MS, now + Duration::from_secs(1), Origin::Root), Admission::Queued));
        assert!(matches!(
            p.admit(now, "loud", 103, 10 * MS, now + Duration::from_secs(1), Origin::Root),
            Admission::Refused { .. }
        ));
        p.finish("loud", MS, MS, Origin::Chained);
        assert_eq!(p.next(now), vec![Decision::Run(100), Decision::Run(101)], "quiet goes first; loud's waits");
    }

    /// One tenant on a one-core policy: call 0 runs and calls 1..=`queued`
    /// wait, each expected to cost `cost`, with deadlines far off.
    fn one_running_and_queued(queued: u64, cost: Duration) -> (Policy, Instant) {
        let mut p = policy(1, 1);
        let now = Instant::now();
        let far = now + Duration::from_secs(1000);
        assert_eq!(p.admit(now, "a", 0, cost, far, Origin::Root), Admission::Run);
        for i in 1..=queued {
            assert_eq!(p.admit(now, "a", i, cost, far, Origin::Root), Admission::Queued);
        }
        (p, now)
    }

    /// One tenant on a one-core policy: call 0 runs and calls 1..=60 (10 ms
    /// each) wait; then every `every`, the running call ends and the next
    /// starts, 20 times. Returns the policy and the time of the last
    /// start: 40 calls (400 ms of work) and the running one are queued.
    fn after_draining_every(every: Duration) -> (Policy, Instant) {
        let cost = 10 * MS;
        let (mut p, start) = one_running_and_queued(60, cost);
        let mut now = start;
        for i in 1..=20 {
            now += every;
            p.finish("a", cost, cost, Origin::Root);
            assert_eq!(p.next(now), vec![Decision::Run(i)]);
        }
        (p, now)
    }

    #[test]
    fn a_queue_draining_slower_than_planned_refuses_what_it_could_not_finish_in_time() {
        // The core does other work too: a call ends every 20 ms, not every
        // 10. Planned, a call with 600 ms to live is done in 420 ms; at the
        // rate the queue drained at, in 820 ms (1,025 with the margin).
        let (mut p, now) = after_draining_every(20 * MS);
        match p.admit(now, "a", 100, 10 * MS, now + 600 * MS, Origin::Root) {
            Admission::Refused { reason, .. } => {
                assert!(reason.contains("expected wait of 1025 ms"), "{reason}");
                assert!(reason.contains("drained lately: 0.500 cores' worth"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A chained call needs no running place: it keeps the plan.
        assert_eq!(p.admit(now, "a", 101, 10 * MS, now + 600 * MS, Origin::Chained), Admission::Queued);
        // At the planned rate the call is queued (its 410 ms of work ahead
        // drain in 512 ms with the margin).
        let (mut p, now) = after_draining_every(10 * MS);
        assert_eq!(p.admit(now, "a", 100, 10 * MS, now + 600 * MS, Origin::Root), Admission::Queued);
        // While the same calls wait, the rate holds however long ago it was
        // measured; a refused caller is told to come back within a minute
        // (the wait, at 0.005 cores, would be 102 s).
        let (mut p, now) = after_draining_every(Duration::from_secs(2));
        match p.admit(now + 2 * DRAIN_FRESH, "a", 100, 10 * MS, now + Duration::from_secs(60), Origin::Root) {
            Admission::Refused { reason, retry_after } => {
                assert!(reason.contains("expected wait of 102"), "{reason}");
                assert_eq!(retry_after, LONGEST_RETRY_AFTER);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn one_tenants_slow_queue_refuses_no_other_tenants_calls() {
        // `a`'s queue drained at half the planned rate; `b`'s calls wait for
        // their half share of the place as planned (20 and 40 ms), which
        // `a`'s rate would make 25 and 50 ms, past their 45.
        let (mut p, now) = after_draining_every(20 * MS);
        assert!(matches!(p.admit(now, "a", 100, 10 * MS, now + 600 * MS, Origin::Root), Admission::Refused { .. }));
        assert_eq!(p.admit(now, "b", 200, 10 * MS, now + 45 * MS, Origin::Root), Admission::Queued);
        assert_eq!(p.admit(now, "b", 201, 10 * MS, now + 45 * MS, Origin::Root), Admission::Queued);
    }

    #[test]
    fn a_rate_from_before_the_calls_waiting_now_is_not_theirs_once_stale() {
        let (mut p, mut now) = after_draining_every(20 * MS);
        // The rest drain at the same rate; the queue empties.
        for i in 21..=60 {
            now += 20 * MS;
            p.finish("a", 10 * MS, 10 * MS, Origin::Root);
            assert_eq!(p.next(now), vec![Decision::Run(i)]);
        }
        p.finish("a", 10 * MS, 10 * MS, Origin::Root);
        assert_eq!(p.next(now), vec![]);
        // Calls wait again, long after: 30 ms of work planned, which the
        // old rate would make 50 ms.
        let now = now + 2 * DRAIN_FRESH;
        assert_eq!(p.admit(now, "a", 70, 10 * MS, now + 30 * MS, Origin::Root), Admission::Run);
        assert_eq!(p.admit(now, "a", 71, 10 * MS, now + 30 * MS, Origin::Root), Admission::Queued);
        assert_eq!(p.admit(now, "a", 72, 10 * MS, now + 30 * MS, Origin::Root), Admission::Queued);
    }

    #[test]
    fn calls_that_waited_behind_a_long_one_measure_from_their_first_start() {
        let cost = 4 * MS;
        // Call 0, expected short, runs 800 ms; 40 calls wait behind it.
        let (mut p, now) = one_running_and_queued(40, cost);
        let mut now = now + 800 * MS;
        p.finish("a", cost, 800 * MS, Origin::Root);
        assert_eq!(p.next(now), vec![Decision::Run(1)]);
        // Then they start as planned, one every 4 ms: the 800 ms before the
        // first is not how fast they drain.
        for i in 2..=30 {
            now += cost;
            p.finish("a", cost, cost, Origin::Root);
            assert_eq!(p.next(now), vec![Decision::Run(i)]);
        }
        let drain = &p.tenants["a"].drain[0];
        assert!(drain.rate.is_some_and(|(rate, _)| rate > 0.9), "{drain:?}");
        // 44 ms of work ahead, 48 with its own (55 at the rate, with the
        // margin): it fits 70 ms.
        assert_eq!(p.admit(now, "a", 100, cost, now + 70 * MS, Origin::Root), Admission::Queued);
    }

    /// `heavy` runs call 0 (the one short place of a one-core policy) with
    /// calls 1..=5 queued; then `light`, with nothing running or waiting,
    /// queues call 100. Returns the time and a far deadline.
    fn heavy_running_and_queued_then_light(p: &mut Policy) -> (Instant, Instant) {
        let now = Instant::now();
        let far = now + Duration::from_secs(10);
        assert_eq!(p.admit(now, "heavy", 0, MS, far, Origin::Root), Admission::Run);
        for i in 1..=5 {
            assert_eq!(p.admit(now, "heavy", i, MS, far, Origin::Root), Admission::Queued);
        }
        assert_eq!(p.admit(now, "light", 100, MS, far, Origin::Root), Admission::Queued);
        (now, far)
    }

    #[test]
    fn a_sparse_tenant_goes_next_but_only_once() {
        let mut p = policy(1, 1);
        let (now, far) = heavy_running_and_queued_then_light(&mut p);
        p.finish("heavy", MS, MS, Origin::Root);
        assert_eq!(p.next(now), vec![Decision::Run(100)]);
        // Its next call arrives while the first runs: no head start.
        assert_eq!(p.admit(now, "light", 101, MS, far, Origin::Root), Admission::Queued);
        p.finish("light", MS, MS, Origin::Root);
        assert_eq!(p.next(now), vec![Decision::Run(1)], "heavy's turn");
    }

    #[test]
    fn a_sparse_tenant_keeps_its_turn_while_no_place_is_free() {
        // More calls may be started than there are short places: deciding
        // while the places are full must not reorder the round.
        let mut p = Policy::new(PolicyConfig { max_running: 4, max_running_per_tenant: 4, ..PolicyConfig::new(1) });
        let (now, _) = heavy_running_and_queued_then_light(&mut p);
        for _ in 0..3 {
            assert_eq!(p.next(now), vec![], "the one short place is taken");
        }
        // Heavy's call used less than expected: it has credit for its next
        // call, but light is first in the round.
        p.finish("heavy", MS, Duration::ZERO, Origin::Root);
        assert_eq!(p.next(now), vec![Decision::Run(100)]);
    }

    #[test]
    fn waiting_calls_past_hope_are_handed_back() {
        let mut p = policy(1, 1);
        let now = Instant::now();
        assert_eq!(p.admit(now, "a", 1, 10 * MS, now + Duration::from_secs(1), Origin::Root), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, 10 * MS, now + 30 * MS, Origin::Root), Admission::Queued);
        assert_eq!(p.next(now + 25 * MS), vec![Decision::Expire(2)]);
        assert_eq!(p.queued(), 0);
    }

    #[test]
    fn per_tenant_concurrency_is_capped() {
        let mut p = Policy::new(PolicyConfig { max_running: 4, max_running_per_tenant: 1, ..PolicyConfig::new(4) });
        let now = Instant::now();
        let far = now + Duration::from_secs(10);
        assert_eq!(p.admit(now, "a", 1, MS, far, Origin::Root), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, MS, far, Origin::Root), Admission::Queued);
        assert_eq!(p.admit(now, "b", 3, MS, far, Origin::Root), Admission::Queued);
        assert_eq!(p.next(now), vec![Decision::Run(3)], "b starts; a is at its limit");
        p.finish("a", MS, MS, Origin::Root);
        assert_eq!(p.next(now), vec![Decision::Run(2)]);
    }

    #[test]
    fn short_calls_find_a_place_while_long_ones_wait_their_turn() {
        let config = PolicyConfig {
            max_running: 3,
            max_running_per_tenant: 3,
            max_running_long: 1,
            long_after: 5 * MS,
            ..PolicyConfig::new(2)
        };
        let mut p = Policy::new(config);
        let now = Instant::now();
        let far = now + Duration::from_secs(100);
        assert_eq!(p.admit(now, "a", 1, 500 * MS, far, Origin::Root), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, 500 * MS, far, Origin::Root), Admission::Queued, "the long place is taken");
        // A short call of the same tenant, queued behind the long one, and
        // one arriving now: neither waits for the long place.
        assert_eq!(p.admit(now, "a", 3, MS, far, Origin::Root), Admission::Queued, "someone waits: FIFO");
        assert_eq!(p.next(now), vec![Decision::Run(3)]);
        assert_eq!(p.running_long(), 1);
        p.finish("a", 500 * MS, 500 * MS, Origin::Root);
        assert_eq!(p.next(now), vec![Decision::Run(2)]);
        assert_eq!(p.running_long(), 1);
    }

    #[test]
    fn a_call_far_costlier_than_a_quantum_starts_in_one_decision() {
        let mut p = policy(1, 1);
        let now = Instant::now();
        let far = now + Duration::from_secs(10_000);
        assert_eq!(p.admit(now, "a", 1, MS, far, Origin::Root), Admission::Run);
        // Expected to cost 900 s of CPU: 450,000 quanta of 2 ms.
        assert_eq!(p.admit(now, "b", 2, Duration::from_secs(900), far, Origin::Root), Admission::Queued);
        p.finish("a", MS, MS, Origin::Root);
        assert_eq!(p.next(now), vec![Decision::Run(2)]);
    }

    /// A policy whose short places are never the limit: the running
    /// places are.
    fn roomy(cores: u32) -> Policy {
        Policy::new(PolicyConfig { short_places: 100, ..PolicyConfig::new(cores) })
    }

    #[test]
    fn a_tenant_alone_never_takes_every_running_place() {
        let mut p = roomy(2);
        let (now, far) = (Instant::now(), Instant::now() + Duration::from_secs(60));
        assert_eq!(p.config().max_running, 8);
        for i in 0..6 {
            assert_eq!(p.admit(now, "a", i, MS, far, Origin::Root), Admission::Run, "call {i}");
        }
        assert_eq!(p.admit(now, "a", 6, MS, far, Origin::Root), Admission::Queued, "6 of 8: its limit alone");
        assert_eq!(p.next(now), vec![]);
        // Another tenant's call finds one of the places left.
        assert_eq!(p.admit(now, "b", 100, MS, far, Origin::Root), Admission::Queued, "someone waits: FIFO");
        assert_eq!(p.next(now), vec![Decision::Run(100)]);
        assert_eq!(p.running_of("b"), 1);
    }

    #[test]
    fn while_others_wait_a_tenant_starts_no_more_than_its_weighted_share() {
        let mut p = roomy(2);
        let (now, far) = (Instant::now(), Instant::now() + Duration::from_secs(60));
        for i in 0..6 {
            assert_eq!(p.admit(now, "a", i, MS, far, Origin::Root), Admission::Run);
        }
        for i in 6..20 {
            assert_eq!(p.admit(now, "a", i, MS, far, Origin::Root), Admission::Queued);
        }
        // b keeps calls waiting: a's share is half of the 8 places.
        for i in 100..110 {
            p.admit(now, "b", i, MS, far, Origin::Root);
        }
        p.next(now);
        assert_eq!(p.running_of("b"), 2, "the places a left");
        for _ in 0..6 {
            p.finish("a", MS, MS, Origin::Root);
            p.next(now);
        }
        assert_eq!((p.running_of("a"), p.running_of("b")), (4, 4), "each at its share of 4");
        p.finish("b", MS, MS, Origin::Root);
        p.next(now);
        assert_eq!((p.running_of("a"), p.running_of("b")), (4, 4), "b, under its share, starts again; a does not");
        // With weight 3 to b's 1, a's share is 6 of 8 and b's 2.
        p.set_weight("a", 3);
        p.finish("b", MS, MS, Origin::Root);
        p.finish("b", MS, MS, Origin::Root);
        p.next(now);
        assert_eq!((p.running_of("a"), p.running_of("b")), (6, 2));
    }

    #[test]
    fn long_calls_of_one_tenant_leave_long_places_to_others() {
        let mut p = roomy(2);
        let (now, far) = (Instant::now(), Instant::now() + Duration::from_secs(600));
        let long = Duration::from_secs(1);
        assert_eq!(p.admit(now, "a", 0, long, far, Origin::Root), Admission::Run);
        assert_eq!(p.admit(now, "a", 1, long, far, Origin::Root), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, long, far, Origin::Root), Admission::Queued, "2 of 4 long places alone");
        assert_eq!(p.admit(now, "b", 3, long, far, Origin::Root), Admission::Queued);
        assert_eq!(p.next(now), vec![Decision::Run(3)], "b's long call starts, a's waits");
        assert_eq!(p.running_long(), 3);
        // a's short calls are not held up by its long ones.
        assert_eq!(p.admit(now, "a", 4, MS, far, Origin::Root), Admission::Queued);
        assert_eq!(p.next(now), vec![Decision::Run(4)]);
    }

    #[test]
    fn chained_calls_take_no_running_place_and_wait_only_for_the_cpu() {
        let mut p = Policy::new(PolicyConfig { max_running: 1, max_running_per_tenant: 1, ..PolicyConfig::new(1) });
        let (now, far) = (Instant::now(), Instant::now() + Duration::from_secs(60));
        assert_eq!(p.admit(now, "a", 0, MS, far, Origin::Root), Admission::Run);
        // The root holds the one running place and the one short place:
        // its short child waits for the CPU, its long one starts.
        assert_eq!(p.admit(now, "a", 1, MS, far, Origin::Chained), Admission::Queued);
        assert_eq!(p.admit(now, "a", 2, Duration::from_secs(1), far, Origin::Chained), Admission::Queued);
        assert_eq!(p.next(now), vec![Decision::Run(2)]);
        // The root blocks, waiting for its children: the short child runs.
        p.block(MS);
        assert_eq!(p.next(now), vec![Decision::Run(1)]);
        assert_eq!((p.running(), p.running_chained()), (1, 2));
        // Another tenant's root call still waits for the running place,
        // not for the children.
        assert_eq!(p.admit(now, "b", 3, MS, far, Origin::Root), Admission::Queued);
        p.finish("a", MS, MS, Origin::Chained);
        p.finish("a", Duration::from_secs(1), Duration::from_secs(1), Origin::Chained);
        assert_eq!(p.next(now), vec![]);
        p.unblock(MS);
        p.finish("a", MS, MS, Origin::Root);
        assert_eq!(p.next(now), vec![Decision::Run(3)]);
    }

    #[test]
    fn a_tenants_children_are_served_in_its_turns() {
        // One short place; a's children flood its queue, b's calls go
        // first as soon as they arrive.
        let mut p = Policy::new(PolicyConfig { short_places: 1, ..PolicyConfig::new(1) });
        let (now, far) = (Instant::now(), Instant::now() + Duration::from_secs(60));
        assert_eq!(p.admit(now, "a", 0, MS, far, Origin::Chained), Admission::Run);
        for i in 1..500 {
            assert_eq!(p.admit(now, "a", i, MS, far, Origin::Chained), Admission::Queued);
        }
        assert_eq!(p.admit(now, "b", 1000, MS, far, Origin::Root), Admission::Queued);
        p.finish("a", MS, MS, Origin::Chained);
        assert_eq!(p.next(now), vec![Decision::Run(1000)], "b's call is next");
    }

    #[derive(Clone, Debug)]
    enum Step {
        Arrive { tenant: usize, cost_ms: u64, deadline_ms: u64, chained: bool },
        Finish { pick: usize, used_ms: u64 },
        Block { pick: usize },
        Unblock { pick: usize },
        Tick { ms: u64 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..3, 1u64..20, 1u64..500, any::<bool>()).prop_map(|(tenant, cost_ms, deadline_ms, chained)| {
                Step::Arrive { tenant, cost_ms, deadline_ms, chained }
            }),
            (any::<usize>(), 0u64..40).prop_map(|(pick, used_ms)| Step::Finish { pick, used_ms }),
            any::<usize>().prop_map(|pick| Step::Block { pick }),
            any::<usize>().prop_map(|pick| Step::Unblock { pick }),
            (0u64..50).prop_map(|ms| Step::Tick { ms }),
        ]
    }

    const TENANTS: [&str; 3] = ["a", "b", "c"];

    /// A call the model knows: ticket, tenant, expected cost, origin.
    type Call = (u64, usize, Duration, Origin);

    proptest! {
        /// Whatever arrives and ends, in any order: never more running than
        /// allowed, and every call is answered exactly once (run, refused
        /// or expired) — nothing is lost or answered twice.
        #[test]
        fn never_over_capacity_and_nothing_lost(steps in proptest::collection::vec(step(), 1..200)) {
            let config = PolicyConfig {
                max_running: 3,
                max_running_per_tenant: 2,
                max_queued: 20,
                max_queued_per_tenant: 10,
                long_after: Duration::from_millis(10),
                max_running_long: 2,
                max_long_per_tenant: 1,
                short_places: 1,
                ..PolicyConfig::new(2)
            };
            let mut p = Policy::new(config.clone());
            let mut blocked: std::collections::HashSet<u64> = std::collections::HashSet::new();
            let start = Instant::now();
            let mut now = start;
            let mut next_ticket = 0u64;
            let mut answered: HashMap<u64, &'static str> = HashMap::new();
            let mut running: Vec<Call> = Vec::new();
            let mut waiting: HashMap<u64, Call> = HashMap::new();
            for step in steps {
                match step {
                    Step::Arrive { tenant, cost_ms, deadline_ms, chained } => {
                        let ticket = next_ticket;
                        next_ticket += 1;
                        let cost = Duration::from_millis(cost_ms);
                        let origin = if chained { Origin::Chained } else { Origin::Root };
                        match p.admit(now, TENANTS[tenant], ticket, cost, now + Duration::from_millis(deadline_ms), origin) {
                            Admission::Run => {
                                if cost < config.long_after {
                                    prop_assert!(p.short_on_cpu() <= config.short_places, "started past the short places");
                                }
                                answered.insert(ticket, "run");
                                running.push((ticket, tenant, cost, origin));
                            }
                            Admission::Queued => { waiting.insert(ticket, (ticket, tenant, cost, origin)); }
                            Admission::Refused { .. } => { answered.insert(ticket, "refused"); }
                        }
                    }
                    Step::Finish { pick, used_ms } => {
                        if !running.is_empty() {
                            let (ticket, tenant, cost, origin) = running.remove(pick % running.len());
                            if blocked.remove(&ticket) {
                                p.unblock(cost);
                            }
                            p.finish(TENANTS[tenant], cost, Duration::from_millis(used_ms), origin);
                        }
                    }
                    Step::Block { pick } => {
                        if !running.is_empty() {
                            let (ticket, _, cost, _) = running[pick % running.len()];
                            if blocked.insert(ticket) {
                                p.block(cost);
                            }
                        }
                    }
                    Step::Unblock { pick } => {
                        if !running.is_empty() {
                            let (ticket, _, cost, _) = running[pick % running.len()];
                            if blocked.remove(&ticket) {
                                p.unblock(cost);
                            }
                        }
                    }
                    Step::Tick { ms } => now += Duration::from_millis(ms),
                }
                let short_on_cpu = |running: &[Call]| {
                    running.iter().filter(|(t, _, c, _)| *c < config.long_after && !blocked.contains(t)).count() as u32
                };
                let on_cpu_before = short_on_cpu(&running);
                prop_assert_eq!(p.short_on_cpu(), on_cpu_before);
                let roots_before: Vec<u32> = (0..TENANTS.len())
                    .map(|i| running.iter().filter(|c| c.1 == i && c.3 == Origin::Root).count() as u32)
                    .collect();
                let mut started = vec![0u32; TENANTS.len()];
                for decision in p.next(now) {
                    let (ticket, what) = match decision { Decision::Run(t) => (t, "run"), Decision::Expire(t) => (t, "expired") };
                    let call = waiting.remove(&ticket).expect("decided about a waiting call");
                    prop_assert!(answered.insert(ticket, what).is_none(), "ticket {} answered twice", ticket);
                    if what == "run" {
                        if call.3 == Origin::Root {
                            started[call.1] += 1;
                        }
                        running.push(call);
                    }
                }
                let roots = running.iter().filter(|c| c.3 == Origin::Root).count();
                prop_assert_eq!(p.running() as usize, roots);
                prop_assert!(p.running() <= config.max_running);
                prop_assert_eq!(p.running_chained() as usize, running.len() - roots);
                // Short calls start only into free places on the CPU (a
                // blocked call running again may overfill them for a while).
                let on_cpu = short_on_cpu(&running);
                prop_assert_eq!(p.short_on_cpu(), on_cpu);
                prop_assert!(on_cpu <= config.short_places.max(on_cpu_before), "{} short calls on the CPU", on_cpu);
                let long = running.iter().filter(|c| c.2 >= config.long_after && c.3 == Origin::Root).count() as u32;
                prop_assert_eq!(p.running_long(), long);
                prop_assert!(long <= config.max_running_long);
                for (i, name) in TENANTS.iter().enumerate() {
                    let n = running.iter().filter(|c| c.1 == i && c.3 == Origin::Root).count() as u32;
                    prop_assert_eq!(p.running_of(name), n);
                    // Never all the running places, and no more started
                    // while over its share.
                    prop_assert!(n <= config.max_running_per_tenant);
                    let long = running.iter().filter(|c| c.1 == i && c.3 == Origin::Root && c.2 >= config.long_after).count() as u32;
                    prop_assert!(long <= config.max_long_per_tenant);
                    if started[i] > 0 {
                        prop_assert!(roots_before[i] < config.max_running_per_tenant);
                    }
                }
                prop_assert_eq!(p.queued(), waiting.len());
                prop_assert!(p.queued() <= config.max_queued);
                // Nothing left waiting that can no longer make its deadline.
                for t in p.tenants.values() {
                    for w in t.queues.iter().flatten() {
                        prop_assert!(now + w.cost <= w.deadline, "ticket {} waits past hope", w.ticket);
                    }
                }
                let weights: u64 = p.round.iter().map(|name| u64::from(p.tenants[name].weight)).sum();
                prop_assert_eq!(p.active_weight, weights, "the round's weight is kept exactly");
                // The expected work is kept exactly, short and long apart.
                let work = |calls: &mut dyn Iterator<Item = Duration>| {
                    let mut w = Work::default();
                    calls.for_each(|c| w.add(c, c >= config.long_after));
                    (w.short, w.long)
                };
                let run = work(&mut running.iter().map(|c| c.2));
                prop_assert_eq!((p.running_work.short, p.running_work.long), run);
                let queued = work(&mut waiting.values().map(|c| c.2));
                prop_assert_eq!((p.queued_work.short, p.queued_work.long), queued);
                for (i, name) in TENANTS.iter().enumerate() {
                    let own = work(&mut waiting.values().filter(|c| c.1 == i).map(|c| c.2));
                    let t = p.tenants.get(*name).map(|t| (t.queued_work.short, t.queued_work.long));
                    prop_assert_eq!(t.unwrap_or_default(), own);
                    let own = work(&mut running.iter().filter(|c| c.1 == i).map(|c| c.2));
                    let t = p.tenants.get(*name).map(|t| (t.running_work.short, t.running_work.long));
                    prop_assert_eq!(t.unwrap_or_default(), own);
                }
            }
            // Drain: finish everything; every waiting call is eventually
            // started or expired.
            let mut rounds = 0;
            while !running.is_empty() || !waiting.is_empty() {
                if let Some((ticket, tenant, cost, origin)) = running.pop() {
                    if blocked.remove(&ticket) {
                        p.unblock(cost);
                    }
                    p.finish(TENANTS[tenant], cost, cost, origin);
                }
                for decision in p.next(now) {
                    let (ticket, what) = match decision { Decision::Run(t) => (t, "run"), Decision::Expire(t) => (t, "expired") };
                    let call = waiting.remove(&ticket).expect("decided about a waiting call");
                    prop_assert!(answered.insert(ticket, what).is_none());
                    if what == "run" { running.push(call); }
                }
                rounds += 1;
                prop_assert!(rounds < 10_000, "waiting calls never started");
            }
            prop_assert_eq!(answered.len() as u64, next_ticket, "every call answered");
        }

        /// Two tenants that always have calls waiting get CPU in the ratio
        /// of their weights.
        #[test]
        fn shares_converge_to_weights(wa in 1u32..5, wb in 1u32..5, cost_a in 1u64..10, cost_b in 1u64..10) {
            let mut p = Policy::new(PolicyConfig { max_running: 1, max_running_per_tenant: 1, ..PolicyConfig::new(1) });
            p.set_weight("a", wa);
            p.set_weight("b", wb);
            let now = Instant::now();
            let far = now + Duration::from_secs(1_000_000);
            let (cost_a, cost_b) = (Duration::from_millis(cost_a), Duration::from_millis(cost_b));
            let mut ticket = 0;
            let mut owner = HashMap::new();
            let mut used: HashMap<&str, Duration> = HashMap::new();
            let mut current: Option<(&str, Duration)> = None;
            // Keep both queues non-empty.
            for _ in 0..50 {
                for (t, c) in [("a", cost_a), ("b", cost_b)] {
                    ticket += 1;
                    owner.insert(ticket, (t, c));
                    match p.admit(now, t, ticket, c, far, Origin::Root) {
                        Admission::Run => current = Some((t, c)),
                        Admission::Queued => {}
                        refused => prop_assert!(false, "{:?}", refused),
                    }
                }
            }
            for _ in 0..2000 {
                if let Some((t, c)) = current.take() {
                    p.finish(t, c, c, Origin::Root);
                    *used.entry(t).or_default() += c;
                    ticket += 1;
                    owner.insert(ticket, (t, c));
                    p.admit(now, t, ticket, c, far, Origin::Root);
                }
                for d in p.next(now) {
                    if let Decision::Run(id) = d { current = Some(owner[&id]); }
                }
            }
            let (ua, ub) = (used["a"].as_secs_f64(), used["b"].as_secs_f64());
            let want = f64::from(wa) / f64::from(wb);
            let got = ua / ub;
            prop_assert!((got / want - 1.0).abs() < 0.1, "share a/b {:.3}, weights {}/{}", got, wa, wb);
        }
    }
}
