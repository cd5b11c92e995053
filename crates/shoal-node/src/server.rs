//! The node's HTTP server: the accept loop and every connection-level
//! defence, in front of the API router.
//!
//! - At most `max_connections` connections are served at once; past it a
//!   new connection is answered `503` with `Connection: close` at once,
//!   so a flood of connections costs a write each and never queues.
//! - HTTP/1 request heads must arrive within `header_read_timeout`
//!   (slowloris; it also ends keep-alive connections that send nothing)
//!   and fit in `max_header_bytes` (else hyper answers `431`).
//! - A connection with no request being handled for `idle_timeout` is
//!   closed: counted from its accept and from the end of its last request,
//!   whatever bytes move meanwhile (HTTP/2 pings and settings do not keep
//!   a connection; neither does a request head that never completes, nor a
//!   response the client stops reading).
//! - Request targets longer than `max_uri_bytes` are answered `414`
//!   before routing.
//!
//! - An answer to a request whose body was left unread (an early refusal)
//!   is sent after reading what the client still sends, up to `linger`,
//!   and closes an HTTP/1 connection (see `linger.rs`), so a client that
//!   writes its whole body before reading still gets the answer.
//!
//! Bodies are read, with their size and rate limits, by the handlers
//! (`api::read_body`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::Node;
use crate::error::{ApiError, ErrorKind};
use crate::linger::{Leftover, Linger, Watched};

/// Connection-level limits (see the module docs).
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Connections served at once. Default 10,000.
    pub max_connections: usize,
    /// Time to receive a whole HTTP/1 request head. Default 10 s.
    pub header_read_timeout: Duration,
    /// Bytes of a request head (request line and headers). Default 16 KiB.
    pub max_header_bytes: usize,
    /// Bytes of a request target (path and query). Default 8 KiB.
    pub max_uri_bytes: usize,
    /// A connection with no request being handled for this long is closed.
    /// Default 60 s.
    pub idle_timeout: Duration,
    /// Request bodies: after `body_grace`, a body must have arrived at an
    /// average of at least `min_body_rate` bytes per second, else 408.
    /// Defaults 10 s, 64 KiB/s.
    pub body_grace: Duration,
    pub min_body_rate: u64,
    /// On shutdown, requests in flight get this long to finish. Default 30 s.
    pub drain_timeout: Duration,
    /// Of a body the handler left unread (an early refusal), read and
    /// discard at most this much before answering and closing (none after
    /// a 408). Default 16 MiB, 5 s.
    pub linger: Linger,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 << 10,
            max_uri_bytes: 8 << 10,
            idle_timeout: Duration::from_secs(60),
            body_grace: Duration::from_secs(10),
            min_body_rate: 64 << 10,
            drain_timeout: Duration::from_secs(30),
            linger: Linger { bytes: 16 << 20, time: Duration::from_secs(5) },
        }
    }
}

impl HttpLimits {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        // The head is bounded by hyper's read buffer, which is at least 8 KiB.
        if self.max_header_bytes < 8192 || self.max_header_bytes > (1 << 20) {
            return Err("max_header_bytes must be 8 KiB to 1 MiB".into());
        }
        if self.max_uri_bytes < 256 || self.max_uri_bytes > self.max_header_bytes {
            return Err("max_uri_bytes must be at least 256 and at most max_header_bytes".into());
        }
        for (name, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
            ("body_grace", self.body_grace),
            ("drain_timeout", self.drain_timeout),
            ("linger time", self.linger.time),
        ] {
            if value < Duration::from_millis(10) || value > Duration::from_secs(24 * 3600) {
                return Err(format!("{name} must be 10 ms to 24 h"));
            }
        }
        if self.min_body_rate == 0 {
            return Err("min_body_rate must be positive".into());
        }
        Ok(())
    }
}

/// Counts kept by the server, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ConnStats {
    pub open: AtomicUsize,
    pub refused: AtomicU64,
    pub idle_closed: AtomicU64,
    pub panics: AtomicU64,
}

/// Serve `router` (the node's API, or its HTTP functions) on `listener` until `shutdown` resolves; then stop
/// accepting, let requests in flight finish (up to the drain timeout) and
/// return.
pub(crate) async fn serve(
    node: Arc<Node>,
    router: axum::Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = node.config.http.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    // Set when the drain ends: connections still open are dropped, with
    // the requests they carry (their calls are cancelled).
    let (abandon, abandoned) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // A head that does not fit the read buffer is answered 431.
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Each stream may buffer a request body up to its limit: few
        // streams per connection keep a connection's share small.
        .max_concurrent_streams(32);
    // No HTTP/2 keep-alive pings: they would count as activity and keep
    // idle connections open; the idle check below closes them instead.
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors (or a connection reset before
                    // it was accepted): back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            node.conn_stats.refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(refuse(stream));
            continue;
        };
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(stream);
        let service = {
            let router = router.clone();
            let activity = activity.clone();
            let max_uri = limits.max_uri_bytes;
            let linger = limits.linger;
            let served = node.clone();
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let router = router.clone();
                let node = served.clone();
                let handling = activity.handling();
                async move {
                    let _handling = handling;
                    let uri_len = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
                    if uri_len > max_uri {
                        let error = ApiError::new(
                            ErrorKind::UriTooLong,
                            format!("the request target is {uri_len} bytes; the limit is {max_uri}"),
                        );
                        return Ok::<_, std::convert::Infallible>(error.into_response());
                    }
                    let http1 = request.version() <= hyper::Version::HTTP_11;
                    let leftover = Leftover::default();
                    let request = request.map(|body| Body::new(Watched::new(body, leftover.clone())));
                    let handling = std::pin::pin!(router.oneshot(request));
                    let response = match CatchPanic(handling).await {
                        Ok(response) => response?,
                        Err(panic) => {
                            node.conn_stats.panics.fetch_add(1, Ordering::Relaxed);
                            let what = panic
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_default();
                            tracing::error!(panic = %what, "a request's handling panicked; answered 500");
                            ApiError::internal("handling the request", "a bug in the node (it was logged)")
                                .into_response()
                        }
                    };
                    Ok(match leftover.take() {
                        Some(rest) if http1 => crate::linger::closing(response, rest, linger).await,
                        _ => response,
                    })
                }
            })
        };
        let connection = graceful.watch(builder.serve_connection(io, service).into_owned());
        let node = node.clone();
        let idle_timeout = limits.idle_timeout;
        let mut abandoned = abandoned.clone();
        connections.spawn(async move {
            let _permit = permit;
            node.conn_stats.open.fetch_add(1, Ordering::Relaxed);
            tokio::pin!(connection);
            let mut check = tokio::time::interval(idle_timeout / 4);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    result = &mut connection => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = abandoned.changed() => break,
                    _ = check.tick() => {
                        if activity.idle_for() >= idle_timeout {
                            node.conn_stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
            node.conn_stats.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(drain_timeout = ?limits.drain_timeout, "requests still in flight at the end of the drain; dropping them");
        let _ = abandon.send(true);
        // Their tasks drop the connections, and the calls with them.
        let _ =
            tokio::time::timeout(Duration::from_secs(1), async { while connections.join_next().await.is_some() {} })
                .await;
    }
    Ok(())
}

/// Answer a connection over the limit and close it. Bounded in time: a
/// client that does not read gets its connection dropped.
async fn refuse(mut stream: TcpStream) {
    const BODY: &str = r#"{"error":{"kind":"overloaded","message":"too many connections; retry later"}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent before closing: closing with unread
        // bytes resets the connection, and the client may never see the 503.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// A request's handling, with a panic in it caught: the connection gets a
/// `500` instead of being dropped, and the node goes on (its locks do not
/// stay poisoned: every lock is taken past a poisoning).
/// (The future is pinned where it is awaited: no allocation per request.)
struct CatchPanic<'a, F>(std::pin::Pin<&'a mut F>);

impl<F: Future> Future for CatchPanic<'_, F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(output)) => std::task::Poll::Ready(Ok(output)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

/// When a connection last started or finished handling a request, and how
/// many of its requests are being handled.
struct Activity {
    started: Instant,
    /// Milliseconds after `started`.
    last_ms: AtomicU64,
    handling: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self { started: Instant::now(), last_ms: AtomicU64::new(0), handling: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long the connection has been idle: zero while a request is
    /// being handled (a call may legitimately run for minutes), else the
    /// time since the last request ended (or since the accept).
    fn idle_for(&self) -> Duration {
        if self.handling.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    fn handling(self: &Arc<Self>) -> Handling {
        self.touch();
        self.handling.fetch_add(1, Ordering::AcqRel);
        Handling(self.clone())
    }
}

/// A request being handled; dropped when its handler is done.
struct Handling(Arc<Activity>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.touch();
        self.0.handling.fetch_sub(1, Ordering::AcqRel);
    }
}
