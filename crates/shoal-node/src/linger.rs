//! Refusals a client can read even when it sends its whole body first.
//!
//! A request may be answered before its body is read: a bad token (401),
//! an unknown function (404), a full node (429), a body over its limit
//! (413, after reading up to the limit). Closing an HTTP/1 connection with
//! the rest of that body unread makes the kernel reset it, and a client
//! still writing — one that reads nothing until it has sent everything,
//! as Python's `urllib` does — gets a broken pipe instead of the answer.
//!
//! So the server hands the router a body that, if dropped before its end,
//! leaves the rest behind ([`Watched`]); when the router answers with a
//! body left unread, the server first reads and discards what the client
//! still sends, up to a bound in bytes and in time ([`closing`]), then
//! sends the answer with `Connection: close`. (Reading after the answer,
//! as nginx does, does not fit hyper: it ends a response, and drops the
//! request body with it, once the response's own bytes are written.) A
//! client that reads while it writes sees the answer once it has sent its
//! body or the bound is reached; past the bound the connection is closed
//! on the rest.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

/// How much of a body left unread is read (and discarded) before the
/// answer, at most.
#[derive(Clone, Copy, Debug)]
pub struct Linger {
    pub bytes: u64,
    pub time: Duration,
}

/// Where a request body dropped before its end leaves the rest.
#[derive(Clone, Default)]
pub(crate) struct Leftover(Arc<Mutex<Option<Incoming>>>);

impl Leftover {
    /// The rest of the body, if the router dropped it unfinished.
    pub(crate) fn take(&self) -> Option<Incoming> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// The request body the router reads: hyper's, passed through.
pub(crate) struct Watched {
    inner: Option<Incoming>,
    leftover: Leftover,
}

impl Watched {
    pub(crate) fn new(inner: Incoming, leftover: Leftover) -> Self {
        Self { inner: Some(inner), leftover }
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take().filter(|inner| !inner.is_end_stream()) {
            *self.leftover.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(inner);
        }
    }
}

/// Read and discard what is left of a request body, up to `linger`'s
/// bytes and time, then make `response` close the connection.
pub(crate) async fn closing(
    mut response: axum::response::Response,
    mut rest: Incoming,
    linger: Linger,
) -> axum::response::Response {
    // A body refused for arriving too slowly is not waited for again.
    let mut left = if response.status() == axum::http::StatusCode::REQUEST_TIMEOUT { 0 } else { linger.bytes };
    let _ = tokio::time::timeout(linger.time, async {
        while left > 0 {
            match rest.frame().await {
                Some(Ok(frame)) => left = left.saturating_sub(frame.data_ref().map_or(0, |d| d.len() as u64)),
                // Its end, or an error: nothing more to read.
                _ => break,
            }
        }
    })
    .await;
    response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    response
}
