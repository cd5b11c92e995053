//! Calls between nodes: HTTP/2 over kept-alive connections, one per peer,
//! every request multiplexed on it. Each request carries the cluster
//! secret; the receiving node runs the call itself and never forwards it
//! again.
//!
//! What a failure means to the caller matters: a request that never left
//! (the peer refused the connection or could not be reached in time) did
//! not run there and may be tried on another node; one that was sent and
//! then lost its answer may have run, and is reported as such.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The header a forwarded request carries the cluster secret in.
pub const SECRET_HEADER: &str = "x-shoal-cluster-secret";

/// Why a forwarded request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// It never reached the peer: safe to try elsewhere.
    #[error("not sent to {peer}: {reason}")]
    NotSent { peer: String, reason: String },
    /// It was sent and the answer was lost: the call may have run.
    #[error("the answer from {peer} was lost: {reason}")]
    Lost { peer: String, reason: String },
    #[error("no answer from {peer} within {timeout:?}")]
    Timeout { peer: String, timeout: Duration },
}

/// A peer's answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The pool of connections to every peer.
#[derive(Clone)]
pub struct Forwarder {
    client: Client<HttpConnector, Full<Bytes>>,
    secret: Arc<RwLock<HeaderValue>>,
    max_answer_bytes: usize,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    /// `secret` goes with every request; answers over `max_answer_bytes`
    /// are refused.
    pub fn new(secret: &str, connect_timeout: Duration, max_answer_bytes: usize) -> Result<Self, String> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(50))
            .http2_keep_alive_interval(Some(Duration::from_secs(20)))
            .build(connector);
        let secret = Arc::new(RwLock::new(secret_header(secret)?));
        Ok(Self { client, secret, max_answer_bytes })
    }

    /// Send `secret` from now on (the cluster's secret changed).
    pub fn set_secret(&self, secret: &str) -> Result<(), String> {
        *self.secret.write().unwrap_or_else(|e| e.into_inner()) = secret_header(secret)?;
        Ok(())
    }

    /// POST `body` to `http://{peer}{path}` with `headers`, and read the
    /// whole answer within `timeout`.
    pub async fn post(
        &self,
        peer: &str,
        path: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, ForwardError> {
        let mut request = Request::builder().method(Method::POST).uri(format!("http://{peer}{path}"));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .header(SECRET_HEADER, self.secret.read().unwrap_or_else(|e| e.into_inner()).clone())
            .body(Full::new(body))
            .map_err(|e| ForwardError::NotSent { peer: peer.to_string(), reason: e.to_string() })?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                let reason = describe(&e);
                if e.is_connect() {
                    ForwardError::NotSent { peer: peer.to_string(), reason }
                } else {
                    ForwardError::Lost { peer: peer.to_string(), reason }
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, self.max_answer_bytes)
                .collect()
                .await
                .map_err(|e| ForwardError::Lost { peer: peer.to_string(), reason: e.to_string() })?
                .to_bytes();
            Ok(Answer { status: parts.status, headers: parts.headers, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(ForwardError::Timeout { peer: peer.to_string(), timeout }))
    }
}

fn secret_header(secret: &str) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::from_str(secret).map_err(|_| "the cluster secret is not a header value")?;
    value.set_sensitive(true);
    Ok(value)
}

/// The error with its causes, which hyper keeps in its source chain.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_is_not_listening_is_not_sent_to() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let forwarder = Forwarder::new("secret", Duration::from_secs(1), 1024).unwrap();
        let sent = forwarder.post(&addr, "/x", &[], Bytes::from_static(b"in"), Duration::from_secs(5)).await;
        assert!(matches!(sent, Err(ForwardError::NotSent { .. })), "{sent:?}");
    }
}
