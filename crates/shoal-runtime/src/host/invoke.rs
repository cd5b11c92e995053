//! Host side of `shoal:function/invoke`. Until chaining is wired in, every
//! operation answers `unavailable`.

use super::shoal::function::invoke::{CallId, Host};
use super::{ComponentCtx, GuestError};

type HostResult<T> = wasmtime::Result<Result<T, GuestError>>;

impl Host for ComponentCtx {
    async fn call(&mut self, _function: String, _input: Vec<u8>) -> HostResult<Vec<u8>> {
        Ok(Err(GuestError::Unavailable))
    }
    async fn spawn(&mut self, _function: String, _input: Vec<u8>) -> HostResult<CallId> {
        Ok(Err(GuestError::Unavailable))
    }
    async fn await_(&mut self, _id: CallId) -> HostResult<Vec<u8>> {
        Ok(Err(GuestError::Unavailable))
    }
}
