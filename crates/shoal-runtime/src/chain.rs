//! Chained calls: what the runtime knows about a call that another call
//! made, and the [`Invoker`] a higher crate hands in to run them.
//!
//! The runtime cannot resolve a function name (the registry is the node's)
//! nor decide whether a call may run now (the scheduler's), so a guest's
//! `invoke.call`/`spawn` goes through an [`Invoker`]. What the runtime does
//! own are the bounds every chained call obeys, checked before the invoker
//! is asked:
//! - a child's deadline is the smaller of its own timeout and its caller's
//!   deadline ([`Lineage::deadline`]);
//! - the depth of a chain is limited ([`RuntimeConfig::max_call_depth`]);
//! - spawned calls not yet awaited are limited per root call
//!   ([`RuntimeConfig::max_spawns_per_root`]), counted in [`RootCall`],
//!   which the whole tree of a root call shares.
//!
//! [`RuntimeConfig::max_call_depth`]: crate::RuntimeConfig::max_call_depth
//! [`RuntimeConfig::max_spawns_per_root`]: crate::RuntimeConfig::max_spawns_per_root

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use crate::CallError;

/// What every call of one tree of chained calls shares.
#[derive(Debug, Default)]
pub struct RootCall {
    outstanding_spawns: AtomicU32,
}

impl RootCall {
    /// Spawned calls of this tree not yet awaited (nor cancelled).
    pub fn outstanding_spawns(&self) -> u32 {
        self.outstanding_spawns.load(Ordering::Relaxed)
    }

    /// Count one more spawn unless `limit` are outstanding already.
    pub(crate) fn try_spawn(self: &Arc<Self>, limit: u32) -> Option<SpawnTicket> {
        self.outstanding_spawns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| SpawnTicket(self.clone()))
    }
}

/// One outstanding spawn; dropping it (the child was awaited, or its
/// parent ended) gives the place back.
#[derive(Debug)]
pub(crate) struct SpawnTicket(Arc<RootCall>);

impl Drop for SpawnTicket {
    fn drop(&mut self) {
        self.0.outstanding_spawns.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a call sits in its tree: how deep, until when its caller waits,
/// and the tree's shared counters.
#[derive(Clone, Debug)]
pub struct Lineage {
    /// 0 for a root call (one a client made), 1 for its children, …
    pub depth: u32,
    /// The caller's deadline: the call must end by then whatever its own
    /// timeout. None for a root call.
    pub deadline: Option<Instant>,
    pub root: Arc<RootCall>,
    /// The scheduler expects the call to be long: it takes its turns on
    /// the long calls' places from its start (host work included), not
    /// only once it has run long.
    pub long: bool,
    /// The trace context of its caller's run (for a chained call: the
    /// span it hangs under), when the caller is traced.
    pub trace: Option<crate::TraceParent>,
}

impl Lineage {
    /// The lineage of a call a client made.
    pub fn root() -> Self {
        Self { depth: 0, deadline: None, root: Arc::new(RootCall::default()), long: false, trace: None }
    }
}

/// Why a chained call did not produce output.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("{0}")]
    NotFound(String),
    /// The callee belongs to another tenant.
    #[error("{0}")]
    Denied(String),
    /// Depth, spawns per root call, or another bound; the message names it.
    #[error("{0}")]
    LimitExceeded(String),
    /// The node could not run the call now (no capacity, shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// The call ran and failed.
    #[error("{0}")]
    Failed(CallError),
}

/// What an invoker returns: owned, so it can run on its own task.
pub type InvokeFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, ChainError>> + Send + 'static>>;

/// Why a guest's send to a queue failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("{0}")]
    Unavailable(String),
}

/// What a send to a queue returns: the messages' ids.
pub type SendFuture = Pin<Box<dyn Future<Output = Result<Vec<String>, SendError>> + Send + 'static>>;

/// Runs a chained call. Implemented by the crate that knows the deployed
/// functions and admits calls; given to the runtime with
/// [`Runtime::set_invoker`](crate::Runtime::set_invoker).
pub trait Invoker: Send + Sync {
    /// Run `function` — a name of `tenant`'s, or `tenant/name` — with
    /// `input`, as a call with `lineage` (already one level deeper than its
    /// caller, with the caller's deadline). The same tenant only: a
    /// function of another tenant answers [`ChainError::Denied`].
    fn invoke(&self, tenant: &str, function: &str, input: Vec<u8>, lineage: Lineage) -> InvokeFuture;

    /// Send `bodies` to `tenant`'s queue `queue` (the caller's tenant
    /// only: the host gives no way to name another's). Without queues:
    /// unavailable.
    fn send_to_queue(&self, tenant: &str, queue: &str, bodies: Vec<Vec<u8>>) -> SendFuture {
        let _ = (tenant, bodies);
        let queue = queue.to_string();
        Box::pin(async move { Err(SendError::Unavailable(format!("queue `{queue}`: no queues here"))) })
    }
}
