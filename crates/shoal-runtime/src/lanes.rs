//! Places shared fairly among tenants: the lanes long calls run in, and
//! the places on the compile pool.
//!
//! A call past its first few milliseconds is long: it yields at every
//! epoch tick and runs each tick only while it holds a lane (see
//! `call.rs`). There are fewer lanes than cores, so short calls always
//! find a core — unless no short call has been on a core or waiting for
//! one for a while ([`IDLE_HOLD`]): then long calls may also use the
//! cores the scheduler reports idle ([`IdleCores`]), and give them back at
//! their next tick once short calls want them (a place given back then
//! goes to no one). Waiters are served round robin by tenant, not first
//! come first served: a tenant with a thousand long calls waiting gets one
//! turn in each round, as does a tenant with one, so the number of calls
//! a tenant keeps running never buys it more of the lanes' time. A tenant
//! may also be held to fewer places than there are (`per_tenant`): the
//! compile pool keeps one place for the other tenants' compiles.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

#[derive(Default)]
struct State {
    /// Places held.
    in_use: u32,
    /// Places that may be held now: the capacity, or more once the
    /// scheduler has reported more cores idle for [`IDLE_HOLD`].
    limit: u32,
    /// Cores the scheduler last reported idle of short calls.
    idle: u32,
    /// Since when more cores than the capacity have been idle (reset
    /// whenever a short call takes or wants one).
    idle_since: Option<Instant>,
    /// Places each tenant holds.
    held: HashMap<Arc<str>, u32>,
    /// Waiters by tenant, oldest first.
    waiting: HashMap<Arc<str>, VecDeque<oneshot::Sender<()>>>,
    /// Tenants with waiters, in the order they are served.
    round: VecDeque<Arc<str>>,
}

impl State {
    /// Raise the limit to the idle cores once they have been idle for
    /// [`IDLE_HOLD`].
    fn raise_if_idle(&mut self) {
        if let Some(since) = self.idle_since
            && self.limit < self.idle
            && since.elapsed() >= IDLE_HOLD
        {
            self.limit = self.idle;
        }
    }

    fn held_by(&self, tenant: &str) -> u32 {
        self.held.get(tenant).copied().unwrap_or(0)
    }

    fn take(&mut self, tenant: &Arc<str>) {
        *self.held.entry(tenant.clone()).or_default() += 1;
    }

    fn give_back(&mut self, tenant: &str) {
        if let Some(held) = self.held.get_mut(tenant) {
            *held -= 1;
            if *held == 0 {
                self.held.remove(tenant);
            }
        }
    }

    /// The next waiter, round robin over the tenants under `per_tenant`
    /// places (it may have left: its receiver is then closed). A tenant
    /// at its limit keeps its turn.
    fn next_waiter(&mut self, per_tenant: u32) -> Option<(Arc<str>, oneshot::Sender<()>)> {
        let at = self.round.iter().position(|tenant| self.held_by(tenant) < per_tenant)?;
        let tenant = self.round.remove(at).expect("position is in range");
        let queue = self.waiting.get_mut(&tenant).expect("a tenant in the round has waiters");
        let waiter = queue.pop_front().expect("a tenant in the round has waiters");
        if queue.is_empty() {
            self.waiting.remove(&tenant);
        } else {
            self.round.push_back(tenant.clone());
        }
        Some((tenant, waiter))
    }
}

/// Places shared round robin by tenant.
pub(crate) struct FairLanes {
    capacity: u32,
    per_tenant: u32,
    state: Mutex<State>,
}

/// How long more cores than the lanes must have been idle of short calls
/// before long calls may use them: short calls arriving in bursts keep
/// them (a short call finding its core taken waits for the long call's
/// next tick), while long work on an otherwise idle node gets every core
/// after a few ticks.
pub const IDLE_HOLD: Duration = Duration::from_millis(10);

/// What the scheduler tells the runtime's long-call lanes: how many cores
/// no short call is on or waiting for. Once that has been more than the
/// lanes for [`IDLE_HOLD`], long calls may hold that many places (checked
/// as places come back, at every long call's tick); fewer takes effect at
/// once. It is set after every change and costs an atomic read when
/// nothing changed.
#[derive(Clone)]
pub struct IdleCores {
    lanes: Arc<FairLanes>,
    last: Arc<std::sync::atomic::AtomicU32>,
}

impl IdleCores {
    pub(crate) fn new(lanes: Arc<FairLanes>) -> Self {
        let last = Arc::new(std::sync::atomic::AtomicU32::new(0));
        Self { lanes, last }
    }

    /// `cores` are idle of short calls now.
    pub fn set(&self, cores: u32) {
        use std::sync::atomic::Ordering;
        if self.last.load(Ordering::Relaxed) == cores {
            return;
        }
        // Under the lanes' lock, so that the last value set is the one kept.
        let mut state = self.lanes.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.last.store(cores, Ordering::Relaxed);
        let capacity = self.lanes.capacity;
        if cores <= capacity {
            state.idle_since = None;
            state.limit = capacity;
        } else if cores < state.idle || state.idle_since.is_none() {
            // A short call took or wants a core (or the cores just became
            // idle): back to the lanes' own number until the hold passes.
            state.idle_since = Some(Instant::now());
            state.limit = capacity;
        }
        state.idle = cores;
        state.raise_if_idle();
        self.lanes.hand_out(&mut state);
    }
}

/// A place held; dropping it hands it to the next tenant's waiter.
pub(crate) struct Lane {
    lanes: Arc<FairLanes>,
    tenant: Arc<str>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.lanes.release(&self.tenant);
    }
}

/// A wait for a place; dropped before it got one, it leaves, and a place
/// sent to it in the meantime goes on to the next waiter.
struct Waiting {
    lanes: Arc<FairLanes>,
    tenant: Arc<str>,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.lanes.release(&self.tenant);
            }
        }
    }
}

impl FairLanes {
    /// `capacity` places, any tenant may hold all of them.
    pub(crate) fn new(capacity: u32) -> Arc<Self> {
        Self::with_per_tenant(capacity, capacity)
    }

    /// `capacity` places, a tenant at most `per_tenant` of them.
    pub(crate) fn with_per_tenant(capacity: u32, per_tenant: u32) -> Arc<Self> {
        let state = Mutex::new(State { limit: capacity, ..State::default() });
        Arc::new(Self { capacity, per_tenant: per_tenant.clamp(1, capacity.max(1)), state })
    }

    /// Places held now.
    pub(crate) fn in_use(&self) -> u32 {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).in_use
    }

    /// Places `tenant` holds now.
    pub(crate) fn held_by(&self, tenant: &str) -> u32 {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).held_by(tenant)
    }

    /// Wait for a place, behind the other tenants' waiters in turn.
    pub(crate) async fn acquire(self: &Arc<Self>, tenant: &Arc<str>) -> Lane {
        let rx = {
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let first = !state.waiting.contains_key(tenant);
            if state.in_use >= state.limit {
                // Cores idle long enough go to the waiters first.
                state.raise_if_idle();
                self.hand_out(&mut state);
            }
            if state.in_use < state.limit && first && state.held_by(tenant) < self.per_tenant(&state) {
                state.in_use += 1;
                state.take(tenant);
                return Lane { lanes: self.clone(), tenant: tenant.clone() };
            }
            let (tx, rx) = oneshot::channel();
            match state.waiting.get_mut(tenant) {
                Some(queue) => queue.push_back(tx),
                None => {
                    state.waiting.insert(tenant.clone(), VecDeque::from([tx]));
                    state.round.push_back(tenant.clone());
                }
            }
            rx
        };
        let mut waiting = Waiting { lanes: self.clone(), tenant: tenant.clone(), rx: Some(rx) };
        let received = waiting.rx.as_mut().expect("set just now").await;
        // The sender is dropped unsent only when the state is dropped,
        // which outlives every waiter (it holds an `Arc` to it).
        debug_assert!(received.is_ok());
        waiting.rx = None;
        Lane { lanes: self.clone(), tenant: tenant.clone() }
    }

    /// A tenant may hold `per_tenant` places, and all of them when the
    /// limit is raised past the capacity (a tenant held to fewer keeps
    /// its share of the capacity).
    fn per_tenant(&self, state: &State) -> u32 {
        if self.per_tenant >= self.capacity { state.limit } else { self.per_tenant }
    }

    /// `tenant` gives a place back: to the next waiter, or free.
    fn release(&self, tenant: &str) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.give_back(tenant);
        state.in_use -= 1;
        state.raise_if_idle();
        self.hand_out(&mut state);
    }

    /// Give free places to waiters, in turn, while the limit allows.
    fn hand_out(&self, state: &mut State) {
        while state.in_use < state.limit {
            let per_tenant = self.per_tenant(state);
            let Some((next, waiter)) = state.next_waiter(per_tenant) else { return };
            // Counted as the next tenant's before it is sent: a waiter that
            // left gives it back through its `Waiting`.
            state.take(&next);
            state.in_use += 1;
            if waiter.send(()).is_err() {
                state.give_back(&next);
                state.in_use -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[tokio::test]
    async fn waiters_are_served_round_robin_by_tenant() {
        let lanes = FairLanes::new(1);
        let held = lanes.acquire(&tenant("a")).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waits = Vec::new();
        // Tenant a queues three waiters, then b one: b is served second.
        for (who, i) in [("a", 1), ("a", 2), ("a", 3), ("b", 1)] {
            let (shared, order) = (lanes.clone(), order.clone());
            waits.push(tokio::spawn(async move {
                let lane = shared.acquire(&tenant(who)).await;
                order.lock().unwrap().push(format!("{who}{i}"));
                drop(lane);
            }));
            while lanes.state.lock().unwrap().waiting.values().map(VecDeque::len).sum::<usize>() < waits.len() {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for wait in waits {
            wait.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a1", "b1", "a2", "a3"]);
        assert_eq!(lanes.in_use(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_passes_its_lane_on() {
        let lanes = FairLanes::new(1);
        let held = lanes.acquire(&tenant("a")).await;
        let gone = {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.acquire(&tenant("b")).await })
        };
        let next = {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.acquire(&tenant("c")).await })
        };
        while lanes.state.lock().unwrap().round.len() < 2 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        assert!(gone.await.is_err_and(|e| e.is_cancelled()));
        drop(held);
        let lane = tokio::time::timeout(Duration::from_secs(5), next).await.expect("c got the lane").unwrap();
        assert_eq!(lanes.in_use(), 1);
        drop(lane);
        assert_eq!(lanes.in_use(), 0);
        // A waiter timing out just as a lane is sent gives it back.
        let held = lanes.acquire(&tenant("a")).await;
        let timed_out = tokio::time::timeout(Duration::from_millis(1), lanes.acquire(&tenant("b"))).await;
        assert!(timed_out.is_err());
        drop(held);
        assert_eq!(lanes.in_use(), 0, "no lane is lost to a waiter that left");
    }

    #[tokio::test]
    async fn a_tenant_held_to_fewer_places_leaves_the_rest_to_others() {
        let lanes = FairLanes::with_per_tenant(2, 1);
        let a = lanes.acquire(&tenant("a")).await;
        // a's second wait does not take the free place; b's takes it.
        let a_again = {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.acquire(&tenant("a")).await })
        };
        while lanes.state.lock().unwrap().round.is_empty() {
            tokio::task::yield_now().await;
        }
        let b = tokio::time::timeout(Duration::from_secs(5), lanes.acquire(&tenant("b"))).await.expect("b got in");
        assert_eq!((lanes.held_by("a"), lanes.held_by("b")), (1, 1));
        drop(b);
        assert!(!a_again.is_finished(), "a is held to one place");
        drop(a);
        let a_again = tokio::time::timeout(Duration::from_secs(5), a_again).await.expect("a's turn came").unwrap();
        assert_eq!((lanes.in_use(), lanes.held_by("a")), (1, 1));
        drop(a_again);
        assert_eq!(lanes.in_use(), 0);
    }

    #[tokio::test]
    async fn idle_cores_raise_the_places_once_idle_for_a_while_until_short_calls_want_them() {
        let lanes = FairLanes::new(1);
        let idle = IdleCores::new(lanes.clone());
        let first = lanes.acquire(&tenant("a")).await;
        let waiter = |who: &'static str| {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.acquire(&tenant(who)).await })
        };
        let waiting = |n: usize| {
            let lanes = lanes.clone();
            async move {
                let enough = async {
                    while lanes.state.lock().unwrap().waiting.values().map(VecDeque::len).sum::<usize>() < n {
                        tokio::task::yield_now().await;
                    }
                };
                tokio::time::timeout(Duration::from_secs(5), enough)
                    .await
                    .unwrap_or_else(|_| panic!("never {n} waiting"));
            }
        };
        let second = waiter("a");
        waiting(1).await;
        // One idle core (or none) is the lanes' own capacity; both idle,
        // the waiting long call takes the second once they have been idle
        // for the hold, at the next place asked for or given back.
        idle.set(1);
        idle.set(2);
        let third = waiter("b");
        waiting(2).await;
        assert!(!second.is_finished(), "the second core was taken before the hold");
        tokio::time::sleep(IDLE_HOLD + Duration::from_millis(5)).await;
        let fourth = waiter("c");
        let second = tokio::time::timeout(Duration::from_secs(5), second).await.expect("a core was idle").unwrap();
        waiting(2).await;
        assert_eq!(lanes.in_use(), 2);
        assert!(!third.is_finished() && !fourth.is_finished());
        // A short call wants a core: the places held stay held until given
        // back (at the holders' next tick), and one given back goes to no
        // one while the lanes are over their capacity.
        idle.set(1);
        drop(first);
        tokio::task::yield_now().await;
        assert_eq!(lanes.in_use(), 1);
        assert!(!third.is_finished(), "b got the core a short call wants");
        drop(second);
        let third = tokio::time::timeout(Duration::from_secs(5), third).await.expect("b's turn came").unwrap();
        assert_eq!(lanes.in_use(), 1);
        // Cores idle again past the hold, but a short call came just now:
        // the hold starts over.
        idle.set(2);
        tokio::time::sleep(IDLE_HOLD + Duration::from_millis(5)).await;
        idle.set(1);
        idle.set(2);
        let fifth = waiter("d");
        waiting(2).await;
        assert!(!fourth.is_finished(), "the hold did not start over when a short call came");
        tokio::time::sleep(IDLE_HOLD + Duration::from_millis(5)).await;
        drop(third);
        let fourth = tokio::time::timeout(Duration::from_secs(5), fourth).await.expect("c's turn came").unwrap();
        let fifth = tokio::time::timeout(Duration::from_secs(5), fifth).await.expect("d's turn came").unwrap();
        assert_eq!(lanes.in_use(), 2);
        drop(fifth);
        drop(fourth);
        assert_eq!(lanes.in_use(), 0);
    }
}
