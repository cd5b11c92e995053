//! Host side of `shoal:function/invoke`: `call` runs a chained call and
//! waits for it; `spawn` starts one on its own task and returns an id at
//! once; `await` waits for a spawned call's result.
//!
//! Before the invoker is asked, the bounds of `chain.rs` are checked: the
//! chain's depth, and the spawns outstanding in the whole tree of the root
//! call. A refusal answers `limit-exceeded` to the guest and writes a line
//! naming the limit to the call's stderr (its logs), since the guest's
//! error variant carries no message. A child's deadline is never later
//! than its caller's. Spawned calls not awaited when their caller ends are
//! cancelled with it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::shoal::function::invoke::{CallId, Host};
use super::{ComponentCtx, GuestError};
use crate::CallError;
use crate::capture::CaptureBuffer;
use crate::chain::{ChainError, Invoker, Lineage, SpawnTicket};

type HostResult<T> = wasmtime::Result<Result<T, GuestError>>;

/// A spawned call: its task, and its place among the root's outstanding spawns.
struct Spawned {
    task: JoinHandle<Result<Vec<u8>, ChainError>>,
    _ticket: SpawnTicket,
}

/// The chaining part of a call's store data.
pub(crate) struct ChainCtx {
    lineage: Lineage,
    invoker: Option<Arc<dyn Invoker>>,
    stderr: CaptureBuffer,
    spawned: HashMap<CallId, Spawned>,
    next_id: CallId,
}

impl ChainCtx {
    pub(crate) fn new(lineage: Lineage, invoker: Option<Arc<dyn Invoker>>, stderr: CaptureBuffer) -> Self {
        Self { lineage, invoker, stderr, spawned: HashMap::new(), next_id: 1 }
    }
}

impl ChainCtx {
    /// The node's invoker, if the runtime has one.
    pub(crate) fn invoker(&self) -> Option<std::sync::Arc<dyn Invoker>> {
        self.invoker.clone()
    }

    /// Calls started with `spawn` (awaited or not).
    pub(crate) fn n_spawned(&self) -> u32 {
        u32::try_from(self.next_id - 1).unwrap_or(u32::MAX)
    }
}

impl Drop for ChainCtx {
    fn drop(&mut self) {
        for (_, spawned) in self.spawned.drain() {
            spawned.task.abort();
        }
    }
}

fn guest_error(e: ChainError) -> GuestError {
    match e {
        ChainError::NotFound(_) => GuestError::NotFound,
        ChainError::Denied(_) => GuestError::Denied,
        ChainError::LimitExceeded(_) => GuestError::LimitExceeded,
        ChainError::Unavailable(_) | ChainError::Failed(CallError::Overloaded { .. }) => GuestError::Unavailable,
        ChainError::Failed(CallError::Function { message }) => GuestError::Other(message),
        ChainError::Failed(e) => GuestError::Other(e.to_string()),
    }
}

impl ComponentCtx {
    /// The invoker and the lineage a child of this call gets, or why no
    /// child may be started.
    fn child(&self, what: &str, function: &str) -> Result<(Arc<dyn Invoker>, Lineage), GuestError> {
        let chain = &self.chain;
        let invoker = chain.invoker.clone().ok_or(GuestError::Unavailable)?;
        let depth = chain.lineage.depth + 1;
        if depth > self.max_call_depth {
            self.note(&format!(
                "{what} of `{function}` refused: the call depth limit of {} is reached",
                self.max_call_depth
            ));
            return Err(GuestError::LimitExceeded);
        }
        let lineage = Lineage {
            depth,
            deadline: Some(self.deadline),
            root: chain.lineage.root.clone(),
            long: false,
            trace: self.trace,
        };
        Ok((invoker, lineage))
    }

    /// Tell the function's logs why the host refused something.
    pub(super) fn note(&self, message: &str) {
        self.chain.stderr.append(format!("shoal: {message}\n").as_bytes());
    }

    fn answer(&self, function: &str, result: Result<Vec<u8>, ChainError>) -> Result<Vec<u8>, GuestError> {
        result.map_err(|e| {
            if let ChainError::LimitExceeded(why) | ChainError::Denied(why) | ChainError::Unavailable(why) = &e {
                self.note(&format!("call of `{function}`: {why}"));
            }
            guest_error(e)
        })
    }
}

impl Host for ComponentCtx {
    async fn call(&mut self, function: String, input: Vec<u8>) -> HostResult<Vec<u8>> {
        let (invoker, lineage) = match self.child("call", &function) {
            Ok(child) => child,
            Err(e) => return Ok(Err(e)),
        };
        let result = invoker.invoke(&self.tenant, &function, input, lineage).await;
        Ok(self.answer(&function, result))
    }

    async fn spawn(&mut self, function: String, input: Vec<u8>) -> HostResult<CallId> {
        let (invoker, lineage) = match self.child("spawn", &function) {
            Ok(child) => child,
            Err(e) => return Ok(Err(e)),
        };
        let Some(ticket) = lineage.root.try_spawn(self.max_spawns_per_root) else {
            self.note(&format!(
                "spawn of `{function}` refused: the limit of {} outstanding spawns per root call is reached",
                self.max_spawns_per_root
            ));
            return Ok(Err(GuestError::LimitExceeded));
        };
        let task = tokio::spawn(invoker.invoke(&self.tenant, &function, input, lineage));
        let id = self.chain.next_id;
        self.chain.next_id += 1;
        self.chain.spawned.insert(id, Spawned { task, _ticket: ticket });
        Ok(Ok(id))
    }

    async fn await_(&mut self, id: CallId) -> HostResult<Vec<u8>> {
        let Some(spawned) = self.chain.spawned.remove(&id) else {
            return Ok(Err(GuestError::NotFound));
        };
        let result = match spawned.task.await {
            Ok(result) => result,
            Err(e) => Err(ChainError::Unavailable(format!("spawned call {id} ended abnormally: {e}"))),
        };
        Ok(self.answer(&format!("spawned call {id}"), result))
    }
}
