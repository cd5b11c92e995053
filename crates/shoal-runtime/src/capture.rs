//! Where a call's stdout and stderr go: a bounded in-memory buffer that
//! keeps the first `capacity` bytes and drops the rest, remembering that
//! it did. A guest never sees a write fail because it printed too much
//! (a full buffer must not turn logging into a trap).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes a guest may write per `check-write` permit.
const WRITE_PERMIT: usize = 64 << 10;

#[derive(Clone, Debug)]
pub(crate) struct CaptureBuffer {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Debug)]
struct Captured {
    bytes: BytesMut,
    capacity: usize,
    truncated: bool,
}

impl CaptureBuffer {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { inner: Arc::new(Mutex::new(Captured { bytes: BytesMut::new(), capacity, truncated: false })) }
    }

    pub(crate) fn append(&self, data: &[u8]) {
        let mut captured = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = captured.capacity - captured.bytes.len();
        if data.len() > room {
            captured.truncated = true;
        }
        captured.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// What was captured, and whether anything was dropped.
    pub(crate) fn take(&self) -> (Bytes, bool) {
        let mut captured = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (std::mem::take(&mut captured.bytes).freeze(), captured.truncated)
    }
}

impl IsTerminal for CaptureBuffer {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CaptureBuffer {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for CaptureBuffer {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CaptureBuffer {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CaptureBuffer {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_remembers_dropping_the_rest() {
        let buffer = CaptureBuffer::new(5);
        buffer.append(b"abc");
        assert_eq!(buffer.take(), (Bytes::from_static(b"abc"), false));
        let buffer = CaptureBuffer::new(5);
        buffer.append(b"abc");
        buffer.append(b"defg");
        buffer.append(b"h");
        assert_eq!(buffer.take(), (Bytes::from_static(b"abcde"), true));
    }
}
