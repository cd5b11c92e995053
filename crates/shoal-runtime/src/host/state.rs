//! Host side of `shoal:function/state`. Until the state tier is wired in,
//! every operation answers `unavailable`: the import links, so functions
//! that use state deploy, and they get a clear error instead of a trap.

use super::shoal::function::state::Host;
use super::{ComponentCtx, GuestError};

type HostResult<T> = wasmtime::Result<Result<T, GuestError>>;

fn unavailable<T>() -> HostResult<T> {
    Ok(Err(GuestError::Unavailable))
}

impl Host for ComponentCtx {
    async fn get(&mut self, _key: String) -> HostResult<Option<Vec<u8>>> {
        unavailable()
    }
    async fn set(&mut self, _key: String, _value: Vec<u8>) -> HostResult<()> {
        unavailable()
    }
    async fn delete(&mut self, _key: String) -> HostResult<()> {
        unavailable()
    }
    async fn get_range(&mut self, _key: String, _offset: u64, _len: u64) -> HostResult<Vec<u8>> {
        unavailable()
    }
    async fn set_range(&mut self, _key: String, _offset: u64, _data: Vec<u8>) -> HostResult<()> {
        unavailable()
    }
    async fn append(&mut self, _key: String, _data: Vec<u8>) -> HostResult<()> {
        unavailable()
    }
    async fn incr(&mut self, _key: String, _delta: i64) -> HostResult<i64> {
        unavailable()
    }
    async fn push(&mut self, _key: String) -> HostResult<()> {
        unavailable()
    }
    async fn pull(&mut self, _key: String) -> HostResult<()> {
        unavailable()
    }
    async fn lock(&mut self, _key: String) -> HostResult<()> {
        unavailable()
    }
    async fn unlock(&mut self, _key: String) -> HostResult<()> {
        unavailable()
    }
}
