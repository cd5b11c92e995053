//! Host side of `shoal:function/state`: the guest's keys are scoped to the
//! tenant of the function being called (taken from its deployment, never
//! from the guest), then handed to the state tiers.
//!
//! Locks belong to the call that took them: `lock` waits at most until the
//! call's deadline (then `unavailable`), the lease lasts until a little
//! after that deadline, and whatever the call still holds when it ends —
//! returned, trapped, timed out — is released (see `ComponentCtx`'s drop).
//! Taking a lock the call already holds succeeds at once; `unlock` of a
//! lock the call does not hold (or whose lease ran out) is `not-found`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_state::{ScopedKey, StateError, StateTiers};

use super::shoal::function::state::Host;
use super::{ComponentCtx, GuestError};

/// How long a lease outlives its call's deadline: the call may still be
/// finishing (the host stops waiting for it a little after the deadline).
const LEASE_GRACE: Duration = Duration::from_secs(1);

type HostResult<T> = wasmtime::Result<Result<T, GuestError>>;

fn guest_error(e: StateError) -> GuestError {
    match e {
        StateError::TooLarge(_) => GuestError::TooLarge,
        StateError::LimitExceeded(_) => GuestError::LimitExceeded,
        StateError::Unavailable(_) => GuestError::Unavailable,
        StateError::InvalidKey(m) | StateError::NotAnInteger(m) => GuestError::Other(m),
        StateError::Store(e) => {
            tracing::error!(error = %e, "state store failed");
            GuestError::Unavailable
        }
    }
}

impl ComponentCtx {
    /// The guest's error for `e`; a limit's refusal is also told in the
    /// call's logs (the guest's error carries no message).
    fn refused(&self, e: StateError) -> GuestError {
        if let StateError::LimitExceeded(why) | StateError::TooLarge(why) = &e {
            self.note(&format!("state: {why}"));
        }
        guest_error(e)
    }

    /// The tiers and the scoped key, or the guest-facing error.
    fn scope(&self, key: &str) -> Result<(&Arc<StateTiers>, ScopedKey), GuestError> {
        let tiers = self.state.as_ref().ok_or(GuestError::Unavailable)?;
        let key = ScopedKey::new(&self.tenant, key).map_err(guest_error)?;
        Ok((tiers, key))
    }
}

/// Run a state operation and turn its outcome into the guest's result.
/// A sampled call's operations are timed (`StateOpLog`).
macro_rules! state_op {
    ($ctx:expr, $op:literal, $key:expr, |$tiers:ident, $scoped:ident| $body:expr) => {{
        let ($tiers, $scoped) = match $ctx.scope(&$key) {
            Ok(scoped) => scoped,
            Err(e) => return Ok(Err(e)),
        };
        let started = $ctx.state_log.is_some().then(Instant::now);
        let result = $body.await;
        if let (Some(log), Some(started)) = ($ctx.state_log.as_mut(), started) {
            log.note($op, $scoped.key(), started, result.is_ok());
        }
        Ok(result.map_err(|e| $ctx.refused(e)))
    }};
}

fn found<T>(found: Result<Option<T>, GuestError>) -> Result<T, GuestError> {
    found.and_then(|v| v.ok_or(GuestError::NotFound))
}

impl Host for ComponentCtx {
    async fn get(&mut self, key: String) -> HostResult<Option<Vec<u8>>> {
        state_op!(self, "get", key, |tiers, key| tiers.get(&key))
    }
    async fn set(&mut self, key: String, value: Vec<u8>) -> HostResult<()> {
        state_op!(self, "set", key, |tiers, key| tiers.set(&key, value))
    }
    async fn delete(&mut self, key: String) -> HostResult<()> {
        state_op!(self, "delete", key, |tiers, key| tiers.delete(&key))
    }
    async fn get_range(&mut self, key: String, offset: u64, len: u64) -> HostResult<Vec<u8>> {
        let got: HostResult<Option<Vec<u8>>> =
            state_op!(self, "get-range", key, |tiers, key| tiers.get_range(&key, offset, len));
        Ok(found(got?))
    }
    async fn set_range(&mut self, key: String, offset: u64, data: Vec<u8>) -> HostResult<()> {
        state_op!(self, "set-range", key, |tiers, key| tiers.set_range(&key, offset, &data))
    }
    async fn append(&mut self, key: String, data: Vec<u8>) -> HostResult<()> {
        state_op!(self, "append", key, |tiers, key| tiers.append(&key, data))
    }
    async fn incr(&mut self, key: String, delta: i64) -> HostResult<i64> {
        state_op!(self, "incr", key, |tiers, key| tiers.incr(&key, delta))
    }
    async fn push(&mut self, key: String) -> HostResult<()> {
        let pushed: HostResult<bool> = state_op!(self, "push", key, |tiers, key| tiers.push(&key));
        Ok(pushed?.and_then(|local| if local { Ok(()) } else { Err(GuestError::NotFound) }))
    }
    async fn pull(&mut self, key: String) -> HostResult<()> {
        let pulled: HostResult<bool> = state_op!(self, "pull", key, |tiers, key| tiers.pull(&key));
        Ok(pulled?.and_then(|global| if global { Ok(()) } else { Err(GuestError::NotFound) }))
    }
    async fn lock(&mut self, key: String) -> HostResult<()> {
        let (tiers, key) = match self.scope(&key) {
            Ok(scoped) => scoped,
            Err(e) => return Ok(Err(e)),
        };
        if self.leases.iter().any(|(held, _)| *held == key) {
            return Ok(Ok(()));
        }
        let lease = self.deadline.saturating_duration_since(Instant::now()) + LEASE_GRACE;
        let started = Instant::now();
        let taken = tiers.lock(&key, lease, self.deadline).await;
        if let Some(log) = self.state_log.as_mut() {
            log.note("lock", key.key(), started, taken.is_ok());
        }
        match taken {
            Ok(token) => {
                self.leases.push((key, token));
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(self.refused(e))),
        }
    }
    async fn unlock(&mut self, key: String) -> HostResult<()> {
        let (tiers, key) = match self.scope(&key) {
            Ok(scoped) => scoped,
            Err(e) => return Ok(Err(e)),
        };
        let Some(at) = self.leases.iter().position(|(held, _)| *held == key) else {
            return Ok(Err(GuestError::NotFound));
        };
        let tiers = tiers.clone();
        let (key, token) = self.leases.swap_remove(at);
        Ok(match tiers.unlock(&key, &token).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(GuestError::NotFound),
            Err(e) => Err(guest_error(e)),
        })
    }
}
