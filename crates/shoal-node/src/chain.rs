//! Chained calls on this node: the [`Invoker`] the runtime asks when a
//! guest calls `invoke.call` or `invoke.spawn`. The callee is resolved in
//! the caller's tenant only and goes through the scheduler charged to
//! that tenant: it waits for its turn on the CPU like any call, but takes
//! no running place and never waits for a sandbox (with none free, or its
//! tenant at its caps, the guest gets `unavailable`, so parents waiting on
//! children can never deadlock the node). It is logged and counted like a
//! call made over HTTP. No HTTP hop and no copy beyond the input bytes.

use std::sync::{Arc, Weak};
use std::time::Instant;

use shoal_runtime::{ChainError, InvokeFuture, Invoker, Lineage};

use crate::error::ErrorKind;
use crate::trace::{Kind, Traced};
use crate::{Node, new_call_id, now_ms};

pub(crate) struct NodeInvoker {
    /// Weak: the runtime holds the invoker, and the node holds the runtime.
    pub(crate) node: Weak<Node>,
}

impl Invoker for NodeInvoker {
    fn invoke(&self, tenant: &str, function: &str, input: Vec<u8>, lineage: Lineage) -> InvokeFuture {
        let node = self.node.upgrade();
        let tenant = tenant.to_string();
        let function = function.to_string();
        Box::pin(async move {
            let node = node.ok_or_else(|| ChainError::Unavailable("the node is shutting down".into()))?;
            let (target, name) = function.split_once('/').unwrap_or((&tenant, &function));
            if target != tenant {
                return Err(ChainError::Denied(format!(
                    "`{function}` is not a function of tenant `{tenant}`; functions may call only their own tenant's"
                )));
            }
            let missing = || ChainError::NotFound(format!("function `{tenant}/{name}` does not exist"));
            if !crate::names::is_valid_reference(name) {
                return Err(missing());
            }
            let deployed =
                node.registry.resolve(&tenant, name, || crate::names::route_bucket(None)).ok_or_else(missing)?;
            let call_id = new_call_id();
            let started = Instant::now();
            let image = node
                .image_of(&deployed)
                .await
                .map_err(|e| ChainError::Unavailable(format!("loading `{}`: {e}", deployed.key)))?;
            let input = bytes::Bytes::from(input);
            let hop = (lineage.depth, lineage.deadline);
            // A child span of the caller's run, when the caller is traced.
            let mut traced = lineage
                .trace
                .and_then(|parent| node.tracer.begin(Some(parent), || format!("call {}", deployed.key), Kind::Internal))
                .map(Traced::new);
            // Charged to the caller's tenant (the callee's: the same one).
            let settings = node.settings_for(&deployed, traced.as_ref());
            let run = node.executor.run_chained(
                &deployed.settings.tenant,
                &deployed.key,
                &image,
                &settings,
                input.clone(),
                lineage,
            );
            let mut out = match run.await {
                Ok(out) => out,
                // No place or sandbox here in time: another node of the
                // cluster may have one.
                Err(_) if node.cluster.is_some() => {
                    let forwarded =
                        node.forward_chained(&deployed, input, hop.0, hop.1, traced.as_ref().map(|t| &t.span)).await;
                    node.end_trace(traced, forwarded.as_ref().err().map(ToString::to_string));
                    return forwarded;
                }
                Err(overloaded) => {
                    node.account(&deployed, (&call_id, None), Err(ErrorKind::Overloaded), None, None);
                    let error = ChainError::Unavailable(overloaded.to_string());
                    node.end_trace(traced, Some(error.to_string()));
                    return Err(error);
                }
            };
            let trace_id = traced.as_ref().filter(|t| t.span.sampled).map(|t| t.span.trace_hex());
            if let Some(traced) = &mut traced {
                node.trace_call(traced, &out, &call_id, &deployed);
            }
            node.end_trace(traced, out.result.as_ref().err().map(ToString::to_string));
            deployed.logs.append(&call_id, trace_id.as_deref(), now_ms(), out.take_logs());
            let outcome = out.result.as_ref().map(drop).map_err(ErrorKind::of_call);
            node.account(
                &deployed,
                (&call_id, trace_id.as_deref()),
                outcome,
                Some(started.elapsed()),
                Some(&out.usage),
            );
            out.result.map_err(ChainError::Failed)
        })
    }

    fn send_to_queue(&self, tenant: &str, queue: &str, bodies: Vec<Vec<u8>>) -> shoal_runtime::SendFuture {
        use shoal_runtime::SendError;
        let node = self.node.upgrade();
        let (tenant, queue) = (tenant.to_string(), queue.to_string());
        Box::pin(async move {
            let node = node.ok_or_else(|| SendError::Unavailable("the node is shutting down".into()))?;
            if !crate::names::is_valid_name(&queue) {
                return Err(SendError::NotFound(format!("`{queue}` is not a queue's name")));
            }
            node.send_messages(&tenant, &queue, bodies).await.map_err(|e| match e.kind {
                ErrorKind::NotFound => SendError::NotFound(e.message),
                ErrorKind::TooLarge => SendError::TooLarge(e.message),
                ErrorKind::LimitExceeded | ErrorKind::BadRequest => SendError::LimitExceeded(e.message),
                _ => SendError::Unavailable(e.message),
            })
        })
    }
}

pub(crate) fn invoker(node: &Weak<Node>) -> Arc<dyn Invoker> {
    Arc::new(NodeInvoker { node: node.clone() })
}
