//! The scheduling policy: admission, per-tenant queues served by deficit
//! round robin, and per-tenant concurrency — pure functions over a state
//! and a clock (the caller passes `now`), with no I/O, no tasks and no
//! sleeps, so every decision is unit- and property-tested.
//!
//! - **Capacity** is CPU: the node has `cores`, and each call is expected
//!   to use the CPU time its function used lately (an exponentially
//!   weighted mean the driver keeps). At most `short_places` short calls
//!   are on the CPU at once (one per core: more would only take turns on
//!   the cores and each would end later; a call blocked in a host call, on
//!   I/O or a chained call, is not on the CPU — see [`Policy::block`]),
//!   and at most `max_running` calls are started and unfinished, at most
//!   `max_running_per_tenant` of one tenant.
//! - **Admission**: a call runs now if there is room and no one waits;
//!   else it is queued only if its tenant's queue and the node's queue
//!   have room *and* its expected completion fits its deadline; else it is
//!   refused at once with a `retry_after`. The expected wait is the
//!   smaller of the node's whole backlog spread over the cores and the
//!   tenant's own backlog at its weighted share of the cores, so a light
//!   tenant is not refused because a heavy one filled the queue.
//! - **Pick next**: deficit round robin over tenants with queued calls, on
//!   expected CPU time, corrected by the measured time when a call ends;
//!   quanta are proportional to tenant weights. A sparse tenant — one with
//!   nothing running and nothing queued when its call arrives — goes to
//!   the front of the round with credit for that call (as new flows do in
//!   FQ-CoDel): a light tenant's call waits for one place to free, not for
//!   the busy tenants' turns. It gets this once per time it was idle, so
//!   a tenant keeping calls queued or running cannot use it to pass others.
//! - **Short and long calls**: a call expected to use at least
//!   `long_after` of CPU is long; at most `max_running_long` long calls hold
//!   running places (they take turns on the CPU in the runtime), so short
//!   calls always find one. A tenant's queue is FIFO within each kind: a
//!   waiting call whose kind's places are full never holds up a call of
//!   the other kind behind it.
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
    /// Calls started and unfinished at once (blocked ones included), all
    /// tenants together.
    pub max_running: u32,
    /// Calls of one tenant running at once.
    pub max_running_per_tenant: u32,
    /// Calls waiting, all tenants together, and per tenant.
    pub max_queued: usize,
    pub max_queued_per_tenant: usize,
    /// CPU time a tenant of weight 1 may use per round.
    pub quantum: Duration,
    /// Expected CPU time from which a call is long.
    pub long_after: Duration,
    /// Long calls holding running places at once.
    pub max_running_long: u32,
}

impl PolicyConfig {
    pub fn new(cores: u32) -> Self {
        let cores = cores.max(1);
        Self {
            cores,
            short_places: cores,
            max_running: 4 * cores,
            max_running_per_tenant: 4 * cores,
            max_queued: 10_000,
            max_queued_per_tenant: 2_000,
            quantum: Duration::from_micros(250),
            long_after: Duration::from_millis(5),
            max_running_long: 2 * cores,
        }
    }
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

#[derive(Debug, Default)]
struct Tenant {
    weight: u32,
    queue: VecDeque<Waiting>,
    running: u32,
    /// CPU time it may still use this round, in nanoseconds (may go
    /// negative when calls use more than expected).
    deficit: i128,
    /// Expected CPU time of its queued calls.
    queued_cost: Duration,
    /// Whether it is in the round-robin list.
    active: bool,
    /// No queued call can expire before this (the earliest deadline less
    /// cost among them; may be earlier than that after calls left the
    /// queue, which only costs a needless look).
    expires_from: Option<Instant>,
}

/// The scheduler's state.
#[derive(Debug)]
pub struct Policy {
    config: PolicyConfig,
    tenants: HashMap<Arc<str>, Tenant>,
    /// Tenants with queued calls, in round-robin order.
    round: VecDeque<Arc<str>>,
    running: u32,
    running_long: u32,
    /// Short calls running but blocked in a host call.
    blocked_short: u32,
    queued: usize,
    /// Expected CPU time of running and queued calls, and of queued ones.
    backlog: Duration,
    queued_cost: Duration,
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
            running: 0,
            running_long: 0,
            blocked_short: 0,
            queued: 0,
            backlog: Duration::ZERO,
            queued_cost: Duration::ZERO,
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    pub fn running(&self) -> u32 {
        self.running
    }

    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Long calls running now.
    pub fn running_long(&self) -> u32 {
        self.running_long
    }

    fn is_long(&self, cost: Duration) -> bool {
        cost >= self.config.long_after
    }

    /// Short calls on the CPU now: running and not blocked.
    pub fn short_on_cpu(&self) -> u32 {
        (self.running - self.running_long).saturating_sub(self.blocked_short)
    }

    /// Whether a call of this cost may take a running place now (leaving
    /// the tenant's own cap aside).
    fn place_for(&self, cost: Duration) -> bool {
        self.running < self.config.max_running
            && if self.is_long(cost) {
                self.running_long < self.config.max_running_long
            } else {
                self.short_on_cpu() < self.config.short_places
            }
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

    pub fn running_of(&self, tenant: &str) -> u32 {
        self.tenants.get(tenant).map_or(0, |t| t.running)
    }

    /// Set a tenant's weight (default 1; 0 is taken as 1).
    pub fn set_weight(&mut self, tenant: &str, weight: u32) {
        self.tenant(tenant).weight = weight.max(1);
    }

    fn tenant(&mut self, name: &str) -> &mut Tenant {
        self.tenants.entry(Arc::from(name)).or_insert_with(|| Tenant { weight: 1, ..Tenant::default() })
    }

    /// How long until a call of `tenant` costing `cost` would be done if
    /// queued now: the running calls' work spread over the cores, then the
    /// smaller of all queued work over the cores and the tenant's own
    /// queued work at its weighted share of the cores.
    fn expected_wait(&self, tenant: &str, cost: Duration) -> Duration {
        // Calls run on at most this many cores at once.
        let cores = self.config.cores.min(self.config.max_running).max(1);
        let running_cost = self.backlog.saturating_sub(self.queued_cost);
        let node_wide = (self.queued_cost + cost) / cores;
        let Some(t) = self.tenants.get(tenant) else { return (running_cost + self.queued_cost + cost) / cores };
        // Its share of the cores among the tenants waiting, itself included.
        let total_weight: u64 = self
            .round
            .iter()
            .filter(|name| name.as_ref() != tenant)
            .filter_map(|name| self.tenants.get(name))
            .map(|other| u64::from(other.weight))
            .sum::<u64>()
            + u64::from(t.weight);
        let own = (t.queued_cost + cost).mul_f64(total_weight as f64 / (f64::from(t.weight) * f64::from(cores)));
        running_cost / cores + node_wide.min(own)
    }

    fn may_start(&self, t: &Tenant) -> bool {
        self.running < self.config.max_running && t.running < self.config.max_running_per_tenant
    }

    /// A call arrives: run it now, queue it, or refuse it.
    pub fn admit(
        &mut self,
        now: Instant,
        tenant: &str,
        ticket: CallTicket,
        cost: Duration,
        deadline: Instant,
    ) -> Admission {
        let nobody_waits = self.queued == 0;
        let t = self.tenant(tenant);
        let tenant_idle = t.queue.is_empty();
        if nobody_waits && tenant_idle && self.may_start(&self.tenants[tenant]) && self.place_for(cost) {
            let long = self.is_long(cost);
            let t = self.tenant(tenant);
            t.running += 1;
            self.running += 1;
            self.running_long += u32::from(long);
            self.backlog += cost;
            return Admission::Run;
        }
        let refuse = |retry_after: Duration, reason: String| Admission::Refused {
            retry_after: retry_after.max(Duration::from_secs(1)),
            reason,
        };
        let wait = self.expected_wait(tenant, cost);
        if self.queued >= self.config.max_queued {
            return refuse(wait, format!("the node's queue holds {} calls, its limit", self.config.max_queued));
        }
        let t = &self.tenants[tenant];
        if t.queue.len() >= self.config.max_queued_per_tenant {
            return refuse(
                wait,
                format!("tenant `{tenant}` has {} calls queued, its limit", self.config.max_queued_per_tenant),
            );
        }
        if now + wait > deadline {
            return refuse(
                wait,
                format!(
                    "the expected wait of {} ms would pass the call's deadline in {} ms",
                    wait.as_millis(),
                    deadline.saturating_duration_since(now).as_millis()
                ),
            );
        }
        let name: Arc<str> =
            self.tenants.get_key_value(tenant).map(|(k, _)| k.clone()).unwrap_or_else(|| Arc::from(tenant));
        let t = self.tenant(tenant);
        let waiting = Waiting { ticket, cost, deadline };
        t.expires_from = earliest(t.expires_from, waiting.expires_from(now));
        t.queue.push_back(waiting);
        t.queued_cost += cost;
        let newly_active = !t.active;
        t.active = true;
        if newly_active && t.running == 0 {
            // A sparse tenant (nothing running, nothing waiting) goes
            // first, once, with credit for this call: its call waits for
            // one place to free, not for a round of the busy tenants.
            t.deficit = t.deficit.max(nanos(cost));
            self.round.push_front(name);
        } else if newly_active {
            self.round.push_back(name);
        }
        self.queued += 1;
        self.backlog += cost;
        self.queued_cost += cost;
        Admission::Queued
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
        while self.running < self.config.max_running {
            let Some(name) = self.round.pop_front() else { break };
            let Some(t) = self.tenants.get(&name) else { continue };
            if t.queue.is_empty() {
                let t = self.tenants.get_mut(&name).expect("looked up just now");
                t.active = false;
                t.deficit = 0;
                continue;
            }
            let Some(at) = self.startable(t) else {
                passed.push(name);
                continue;
            };
            let quantum = nanos(self.config.quantum).max(1);
            let long_after = self.config.long_after;
            let t = self.tenants.get_mut(&name).expect("looked up just now");
            let cost = t.queue[at].cost;
            if t.deficit < nanos(cost) {
                t.deficit += quantum * i128::from(t.weight);
                self.round.push_back(name);
                continue;
            }
            let head = t.queue.remove(at).expect("position is in range");
            t.deficit -= nanos(head.cost);
            t.queued_cost = t.queued_cost.saturating_sub(head.cost);
            self.queued_cost = self.queued_cost.saturating_sub(head.cost);
            t.running += 1;
            self.running += 1;
            self.running_long += u32::from(head.cost >= long_after);
            self.queued -= 1;
            decisions.push(Decision::Run(head.ticket));
            if t.queue.is_empty() {
                t.active = false;
                t.deficit = 0;
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

    /// Where in `t`'s queue is the first call that can have a place now:
    /// the head, or — when one kind's places are full — the first call of
    /// the other kind; none when the tenant is at its own limit.
    fn startable(&self, t: &Tenant) -> Option<usize> {
        if t.running >= self.config.max_running_per_tenant {
            return None;
        }
        let long_full = self.running_long >= self.config.max_running_long;
        let short_full = self.short_on_cpu() >= self.config.short_places;
        let long_after = self.config.long_after;
        t.queue.iter().position(|w| if w.cost < long_after { !short_full } else { !long_full })
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
                let at = self.startable(t)?;
                let need = nanos(t.queue[at].cost) - t.deficit;
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

    fn expire(&mut self, now: Instant, decisions: &mut Vec<Decision>) {
        for t in self.tenants.values_mut() {
            if t.expires_from.is_none_or(|from| now <= from) {
                continue;
            }
            let before = t.queue.len();
            let mut expired_cost = Duration::ZERO;
            let mut expires_from = None;
            t.queue.retain(|w| {
                let keep = now + w.cost <= w.deadline;
                if keep {
                    expires_from = earliest(expires_from, w.expires_from(now));
                } else {
                    decisions.push(Decision::Expire(w.ticket));
                    expired_cost += w.cost;
                }
                keep
            });
            t.expires_from = expires_from;
            let n = before - t.queue.len();
            self.queued -= n;
            t.queued_cost = t.queued_cost.saturating_sub(expired_cost);
            self.backlog = self.backlog.saturating_sub(expired_cost);
            self.queued_cost = self.queued_cost.saturating_sub(expired_cost);
            if t.queue.is_empty() && t.active {
                t.active = false;
                t.deficit = 0;
            }
        }
        let tenants = &self.tenants;
        self.round.retain(|name| tenants.get(name).is_some_and(|t| t.active));
    }

    /// Take a queued call out (its caller gave up).
    pub fn cancel(&mut self, tenant: &str, ticket: CallTicket) -> bool {
        let Some(t) = self.tenants.get_mut(tenant) else { return false };
        let Some(at) = t.queue.iter().position(|w| w.ticket == ticket) else { return false };
        let w = t.queue.remove(at).expect("position is in range");
        t.queued_cost = t.queued_cost.saturating_sub(w.cost);
        self.backlog = self.backlog.saturating_sub(w.cost);
        self.queued_cost = self.queued_cost.saturating_sub(w.cost);
        self.queued -= 1;
        if t.queue.is_empty() {
            t.active = false;
            t.deficit = 0;
            self.round.retain(|name| name.as_ref() != tenant);
        }
        true
    }

    /// A running call of `tenant` ended after using `used` CPU time where
    /// `expected` was planned: free its place and settle the difference
    /// with its tenant's deficit.
    pub fn finish(&mut self, tenant: &str, expected: Duration, used: Duration) {
        self.running = self.running.saturating_sub(1);
        if self.is_long(expected) {
            self.running_long = self.running_long.saturating_sub(1);
        }
        self.backlog = self.backlog.saturating_sub(expected);
        if let Some(t) = self.tenants.get_mut(tenant) {
            t.running = t.running.saturating_sub(1);
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
        assert_eq!(p.admit(now, "a", 1, MS, now + 100 * MS), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, MS, now + 100 * MS), Admission::Run);
        assert_eq!(p.admit(now, "a", 3, MS, now + 100 * MS), Admission::Queued);
        assert_eq!(p.next(now), vec![]);
        p.finish("a", MS, MS);
        assert_eq!(p.next(now), vec![Decision::Run(3)]);
    }

    #[test]
    fn calls_that_cannot_finish_in_time_are_refused_at_once() {
        let mut p = policy(1, 1);
        let now = Instant::now();
        assert_eq!(p.admit(now, "a", 1, 50 * MS, now + 100 * MS), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, 40 * MS, now + 100 * MS), Admission::Queued);
        match p.admit(now, "a", 3, 40 * MS, now + 100 * MS) {
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
        assert_eq!(p.admit(now, "heavy", 0, 10 * MS, now + Duration::from_secs(10)), Admission::Run);
        for i in 1..=90 {
            assert_eq!(p.admit(now, "heavy", i, 10 * MS, now + Duration::from_secs(10)), Admission::Queued);
        }
        // 900 ms of heavy work queued; light's own call needs ~2 ms at a
        // half share.
        assert_eq!(p.admit(now, "light", 100, MS, now + 50 * MS), Admission::Queued);
    }

    /// `heavy` runs call 0 (the one short place of a one-core policy) with
    /// calls 1..=5 queued; then `light`, with nothing running or waiting,
    /// queues call 100. Returns the time and a far deadline.
    fn heavy_running_and_queued_then_light(p: &mut Policy) -> (Instant, Instant) {
        let now = Instant::now();
        let far = now + Duration::from_secs(10);
        assert_eq!(p.admit(now, "heavy", 0, MS, far), Admission::Run);
        for i in 1..=5 {
            assert_eq!(p.admit(now, "heavy", i, MS, far), Admission::Queued);
        }
        assert_eq!(p.admit(now, "light", 100, MS, far), Admission::Queued);
        (now, far)
    }

    #[test]
    fn a_sparse_tenant_goes_next_but_only_once() {
        let mut p = policy(1, 1);
        let (now, far) = heavy_running_and_queued_then_light(&mut p);
        p.finish("heavy", MS, MS);
        assert_eq!(p.next(now), vec![Decision::Run(100)]);
        // Its next call arrives while the first runs: no head start.
        assert_eq!(p.admit(now, "light", 101, MS, far), Admission::Queued);
        p.finish("light", MS, MS);
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
        p.finish("heavy", MS, Duration::ZERO);
        assert_eq!(p.next(now), vec![Decision::Run(100)]);
    }

    #[test]
    fn waiting_calls_past_hope_are_handed_back() {
        let mut p = policy(1, 1);
        let now = Instant::now();
        assert_eq!(p.admit(now, "a", 1, 10 * MS, now + Duration::from_secs(1)), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, 10 * MS, now + 30 * MS), Admission::Queued);
        assert_eq!(p.next(now + 25 * MS), vec![Decision::Expire(2)]);
        assert_eq!(p.queued(), 0);
    }

    #[test]
    fn per_tenant_concurrency_is_capped() {
        let mut p = Policy::new(PolicyConfig { max_running: 4, max_running_per_tenant: 1, ..PolicyConfig::new(4) });
        let now = Instant::now();
        let far = now + Duration::from_secs(10);
        assert_eq!(p.admit(now, "a", 1, MS, far), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, MS, far), Admission::Queued);
        assert_eq!(p.admit(now, "b", 3, MS, far), Admission::Queued);
        assert_eq!(p.next(now), vec![Decision::Run(3)], "b starts; a is at its limit");
        p.finish("a", MS, MS);
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
        assert_eq!(p.admit(now, "a", 1, 500 * MS, far), Admission::Run);
        assert_eq!(p.admit(now, "a", 2, 500 * MS, far), Admission::Queued, "the long place is taken");
        // A short call of the same tenant, queued behind the long one, and
        // one arriving now: neither waits for the long place.
        assert_eq!(p.admit(now, "a", 3, MS, far), Admission::Queued, "someone waits: FIFO");
        assert_eq!(p.next(now), vec![Decision::Run(3)]);
        assert_eq!(p.running_long(), 1);
        p.finish("a", 500 * MS, 500 * MS);
        assert_eq!(p.next(now), vec![Decision::Run(2)]);
        assert_eq!(p.running_long(), 1);
    }

    #[test]
    fn a_call_far_costlier_than_a_quantum_starts_in_one_decision() {
        let mut p = policy(1, 1);
        let now = Instant::now();
        let far = now + Duration::from_secs(10_000);
        assert_eq!(p.admit(now, "a", 1, MS, far), Admission::Run);
        // Expected to cost 900 s of CPU: 450,000 quanta of 2 ms.
        assert_eq!(p.admit(now, "b", 2, Duration::from_secs(900), far), Admission::Queued);
        p.finish("a", MS, MS);
        assert_eq!(p.next(now), vec![Decision::Run(2)]);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Arrive { tenant: usize, cost_ms: u64, deadline_ms: u64 },
        Finish { pick: usize, used_ms: u64 },
        Block { pick: usize },
        Unblock { pick: usize },
        Tick { ms: u64 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..3, 1u64..20, 1u64..500).prop_map(|(tenant, cost_ms, deadline_ms)| Step::Arrive {
                tenant,
                cost_ms,
                deadline_ms
            }),
            (any::<usize>(), 0u64..40).prop_map(|(pick, used_ms)| Step::Finish { pick, used_ms }),
            any::<usize>().prop_map(|pick| Step::Block { pick }),
            any::<usize>().prop_map(|pick| Step::Unblock { pick }),
            (0u64..50).prop_map(|ms| Step::Tick { ms }),
        ]
    }

    const TENANTS: [&str; 3] = ["a", "b", "c"];

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
                max_running_long: 1,
                short_places: 1,
                ..PolicyConfig::new(2)
            };
            let mut p = Policy::new(config.clone());
            let mut blocked: std::collections::HashSet<u64> = std::collections::HashSet::new();
            let start = Instant::now();
            let mut now = start;
            let mut next_ticket = 0u64;
            let mut answered: HashMap<u64, &'static str> = HashMap::new();
            let mut running: Vec<(u64, usize, Duration)> = Vec::new();
            let mut waiting: HashMap<u64, (usize, Duration)> = HashMap::new();
            for step in steps {
                match step {
                    Step::Arrive { tenant, cost_ms, deadline_ms } => {
                        let ticket = next_ticket;
                        next_ticket += 1;
                        let cost = Duration::from_millis(cost_ms);
                        match p.admit(now, TENANTS[tenant], ticket, cost, now + Duration::from_millis(deadline_ms)) {
                            Admission::Run => {
                                if cost < config.long_after {
                                    prop_assert!(p.short_on_cpu() <= config.short_places, "started past the short places");
                                }
                                answered.insert(ticket, "run");
                                running.push((ticket, tenant, cost));
                            }
                            Admission::Queued => { waiting.insert(ticket, (tenant, cost)); }
                            Admission::Refused { .. } => { answered.insert(ticket, "refused"); }
                        }
                    }
                    Step::Finish { pick, used_ms } => {
                        if !running.is_empty() {
                            let (ticket, tenant, cost) = running.remove(pick % running.len());
                            if blocked.remove(&ticket) {
                                p.unblock(cost);
                            }
                            p.finish(TENANTS[tenant], cost, Duration::from_millis(used_ms));
                        }
                    }
                    Step::Block { pick } => {
                        if !running.is_empty() {
                            let (ticket, _, cost) = running[pick % running.len()];
                            if blocked.insert(ticket) {
                                p.block(cost);
                            }
                        }
                    }
                    Step::Unblock { pick } => {
                        if !running.is_empty() {
                            let (ticket, _, cost) = running[pick % running.len()];
                            if blocked.remove(&ticket) {
                                p.unblock(cost);
                            }
                        }
                    }
                    Step::Tick { ms } => now += Duration::from_millis(ms),
                }
                let short_on_cpu = |running: &[(u64, usize, Duration)]| {
                    running.iter().filter(|(t, _, c)| *c < config.long_after && !blocked.contains(t)).count() as u32
                };
                let on_cpu_before = short_on_cpu(&running);
                prop_assert_eq!(p.short_on_cpu(), on_cpu_before);
                for decision in p.next(now) {
                    let (ticket, what) = match decision { Decision::Run(t) => (t, "run"), Decision::Expire(t) => (t, "expired") };
                    let (tenant, cost) = waiting.remove(&ticket).expect("decided about a waiting call");
                    prop_assert!(answered.insert(ticket, what).is_none(), "ticket {} answered twice", ticket);
                    if what == "run" { running.push((ticket, tenant, cost)); }
                }
                prop_assert_eq!(p.running() as usize, running.len());
                prop_assert!(p.running() <= config.max_running);
                // Short calls start only into free places on the CPU (a
                // blocked call running again may overfill them for a while).
                let on_cpu = short_on_cpu(&running);
                prop_assert_eq!(p.short_on_cpu(), on_cpu);
                prop_assert!(on_cpu <= config.short_places.max(on_cpu_before), "{} short calls on the CPU", on_cpu);
                let long = running.iter().filter(|(_, _, cost)| *cost >= config.long_after).count() as u32;
                prop_assert_eq!(p.running_long(), long);
                prop_assert!(long <= config.max_running_long);
                for (i, name) in TENANTS.iter().enumerate() {
                    let n = running.iter().filter(|(_, t, _)| *t == i).count() as u32;
                    prop_assert_eq!(p.running_of(name), n);
                    prop_assert!(n <= config.max_running_per_tenant);
                }
                prop_assert_eq!(p.queued(), waiting.len());
                prop_assert!(p.queued() <= config.max_queued);
                // Nothing left waiting that can no longer make its deadline.
                for t in p.tenants.values() {
                    for w in &t.queue {
                        prop_assert!(now + w.cost <= w.deadline, "ticket {} waits past hope", w.ticket);
                    }
                }
            }
            // Drain: finish everything; every waiting call is eventually
            // started or expired.
            let mut rounds = 0;
            while !running.is_empty() || !waiting.is_empty() {
                if let Some((_, tenant, cost)) = running.pop() {
                    p.finish(TENANTS[tenant], cost, cost);
                }
                for decision in p.next(now) {
                    let (ticket, what) = match decision { Decision::Run(t) => (t, "run"), Decision::Expire(t) => (t, "expired") };
                    let (tenant, cost) = waiting.remove(&ticket).expect("decided about a waiting call");
                    prop_assert!(answered.insert(ticket, what).is_none());
                    if what == "run" { running.push((ticket, tenant, cost)); }
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
                    match p.admit(now, t, ticket, c, far) {
                        Admission::Run => current = Some((t, c)),
                        Admission::Queued => {}
                        refused => prop_assert!(false, "{:?}", refused),
                    }
                }
            }
            for _ in 0..2000 {
                if let Some((t, c)) = current.take() {
                    p.finish(t, c, c);
                    *used.entry(t).or_default() += c;
                    ticket += 1;
                    owner.insert(ticket, (t, c));
                    p.admit(now, t, ticket, c, far);
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
