//! Host side of `shoal:function/queue`: a guest sends messages to a queue
//! of its own tenant (the tenant comes from the deployment, never from the
//! guest), through the invoker the node gave the runtime. A refusal's
//! reason goes to the call's logs, since the guest's error variant
//! carries none.

use super::shoal::function::queue::Host;
use super::{ComponentCtx, GuestError};
use crate::chain::SendError;

type HostResult<T> = wasmtime::Result<Result<T, GuestError>>;

impl ComponentCtx {
    async fn send_to(&mut self, queue: String, bodies: Vec<Vec<u8>>) -> Result<Vec<String>, GuestError> {
        let invoker = self.chain.invoker().ok_or(GuestError::Unavailable)?;
        invoker.send_to_queue(&self.tenant, &queue, bodies).await.map_err(|e| {
            self.note(&format!("send to queue `{queue}`: {e}"));
            match e {
                SendError::NotFound(_) => GuestError::NotFound,
                SendError::TooLarge(_) => GuestError::TooLarge,
                SendError::LimitExceeded(_) => GuestError::LimitExceeded,
                SendError::Unavailable(_) => GuestError::Unavailable,
            }
        })
    }
}

impl Host for ComponentCtx {
    async fn send(&mut self, queue: String, body: Vec<u8>) -> HostResult<String> {
        Ok(self.send_to(queue, vec![body]).await.map(|mut ids| ids.pop().unwrap_or_default()))
    }

    async fn send_batch(&mut self, queue: String, bodies: Vec<Vec<u8>>) -> HostResult<Vec<String>> {
        Ok(self.send_to(queue, bodies).await)
    }
}
