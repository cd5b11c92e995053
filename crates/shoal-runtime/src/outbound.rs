//! Sending a guest's outbound HTTP requests (`wasi:http/outgoing-handler`).
//!
//! Every request goes through one check, on what is actually connected to:
//!
//! 1. The URI's scheme, host and port must be on the function's
//!    [`AllowList`] (the URI the guest built; a `Host` header it sets is
//!    forbidden by wasi:http and never used to pick where to connect, nor
//!    is anything of the request that called the function).
//! 2. The host is resolved here, and each address it resolves to is
//!    checked again: loopback, private, link-local and other non-public
//!    addresses only when an entry names that address. The connection is
//!    made to the checked addresses only, so a name cannot change what it
//!    points to between the check and the connect.
//! 3. HTTPS is verified against the web's root certificates for the name.
//!
//! A redirect is the guest's to follow: its next request is checked
//! afresh. Each call may have a few requests in flight and move a bounded
//! number of bytes; every wait ends by the call's deadline. Refusals are
//! written to the call's log (stderr) as well as returned to the guest.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use crate::capture::CaptureBuffer;
use crate::http::{AllowList, HttpError, Scheme};

/// What a call may do with outbound HTTP.
#[derive(Clone, Debug)]
pub struct OutboundLimits {
    /// Requests of one call in flight at once (a connection counts until
    /// its response body has been read or dropped).
    pub max_in_flight: u32,
    /// Bytes sent and received (bodies) by one call, all its requests
    /// together.
    pub max_bytes: u64,
    /// Non-public addresses (loopback, private, link-local…) the operator
    /// opened: a deploy's allow-list may name these, and no others. Default
    /// none — a tenant can never reach the node's own loopback services,
    /// its private network or a cloud metadata service on its own say.
    pub opened: Vec<IpAddr>,
}

impl Default for OutboundLimits {
    fn default() -> Self {
        Self { max_in_flight: 8, max_bytes: 64 << 20, opened: Vec::new() }
    }
}

impl OutboundLimits {
    /// Whether a request may connect to `address`: a public one, or one the
    /// operator opened.
    pub fn is_open(&self, address: IpAddr) -> bool {
        let address = crate::http::canonical(address);
        crate::http::is_public(address) || self.opened.iter().any(|o| crate::http::canonical(*o) == address)
    }
}

/// A call's outbound HTTP: its allow-list, limits and log.
pub(crate) struct Outbound {
    allow: Arc<AllowList>,
    limits: Arc<OutboundLimits>,
    deadline: Instant,
    log: CaptureBuffer,
    /// The call's requests in flight and bytes left: made at its first
    /// request (most calls make none, and pay nothing for them).
    budget: Option<(Arc<tokio::sync::Semaphore>, Arc<Budget>)>,
    /// Requests sent (past the allow-list and the in-flight limit).
    sent: u32,
}

impl Outbound {
    pub(crate) fn new(
        allow: Arc<AllowList>,
        limits: Arc<OutboundLimits>,
        deadline: Instant,
        log: CaptureBuffer,
    ) -> Self {
        Self { allow, limits, deadline, log, budget: None, sent: 0 }
    }

    /// Outbound HTTP refused whatever the request (deploy-time code).
    pub(crate) fn denied(log: CaptureBuffer) -> Self {
        Self::new(Arc::new(AllowList::none()), Arc::new(OutboundLimits::default()), Instant::now(), log)
    }

    /// Requests sent, and body bytes moved both ways (for metering).
    pub(crate) fn used(&self) -> (u32, u64) {
        let bytes = self.budget.as_ref().map_or(0, |(_, budget)| {
            budget.limit.saturating_sub(budget.left.load(Ordering::Acquire).min(budget.limit))
        });
        (self.sent, bytes)
    }

    fn budget(&mut self) -> &(Arc<tokio::sync::Semaphore>, Arc<Budget>) {
        let limits = &self.limits;
        self.budget.get_or_insert_with(|| {
            (
                Arc::new(tokio::sync::Semaphore::new(limits.max_in_flight as usize)),
                Arc::new(Budget { left: AtomicU64::new(limits.max_bytes), limit: limits.max_bytes }),
            )
        })
    }
}

/// Bytes a call may still move.
struct Budget {
    left: AtomicU64,
    limit: u64,
}

impl Budget {
    fn take(&self, n: u64) -> bool {
        self.left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(n)).is_ok()
    }
}

type SendFuture = Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpError>> + Send>;
type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_errors: IoFuture,
    ) -> SendFuture {
        let target = match Target::of(request.uri()) {
            Ok(target) => target,
            Err(e) => return Box::new(std::future::ready(Err(e))),
        };
        if !self.allow.allows(target.scheme, &target.host, target.port) {
            self.note(&target, "not on the function's allowed hosts");
            return Box::new(std::future::ready(Err(HttpError::HttpRequestDenied)));
        }
        let (in_flight, bytes) = self.budget().clone();
        let Ok(permit) = in_flight.try_acquire_owned() else {
            self.note(&target, "too many requests of this call in flight");
            return Box::new(std::future::ready(Err(HttpError::ConnectionLimitReached)));
        };
        self.sent = self.sent.saturating_add(1);
        let (allow, log, deadline) = (self.allow.clone(), self.log.clone(), self.deadline);
        let limits = self.limits.clone();
        Box::new(async move {
            let sent = send(request, &target, &allow, &limits, bytes, options, deadline).await;
            match sent {
                Ok((response, io)) => {
                    let io: IoFuture = Box::new(async move {
                        let _permit = permit;
                        Box::into_pin(io).await
                    });
                    Ok((response, io))
                }
                Err(e) => {
                    note(&log, &target, &e.to_string());
                    Err(e)
                }
            }
        })
    }
}

impl Outbound {
    fn note(&self, target: &Target, why: &str) {
        note(&self.log, target, why);
    }
}

fn note(log: &CaptureBuffer, target: &Target, why: &str) {
    log.append(format!("shoal: outbound request to {target} refused: {why}\n").as_bytes());
}

/// Where a request goes, from its URI.
struct Target {
    scheme: Scheme,
    /// Lower case; an IPv6 literal without its brackets.
    host: String,
    port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme.as_str(), self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
        }
    }
}

impl Target {
    fn of(uri: &http::Uri) -> Result<Self, HttpError> {
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            _ => return Err(HttpError::HttpProtocolError),
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or(HttpError::HttpRequestUriInvalid)?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        Ok(Self { scheme, host, port })
    }
}

/// The wait for something of a request: its own option, at most until
/// the call's deadline.
fn bounded(option: Option<Duration>, deadline: Instant) -> Duration {
    let left = deadline.saturating_duration_since(Instant::now());
    option.map_or(left, |o| o.min(left))
}

async fn send(
    mut request: http::Request<WasiBody>,
    target: &Target,
    allow: &AllowList,
    limits: &OutboundLimits,
    bytes: Arc<Budget>,
    options: Option<RequestOptions>,
    deadline: Instant,
) -> Result<(http::Response<WasiBody>, IoFuture), HttpError> {
    let connect_within = bounded(options.and_then(|o| o.connect_timeout), deadline);
    let addresses = resolve(target, connect_within).await?;
    let addresses: Vec<SocketAddr> = addresses
        .into_iter()
        .filter(|a| allow.may_connect(a.ip(), target.scheme, target.port) && limits.is_open(a.ip()))
        .collect();
    if addresses.is_empty() {
        return Err(HttpError::DestinationIpProhibited);
    }
    let stream = tokio::time::timeout(connect_within, TcpStream::connect(&addresses[..]))
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => HttpError::ConnectionRefused,
            _ => HttpError::Connect(e),
        })?;
    let _ = stream.set_nodelay(true);
    let stream: Box<dyn Stream> = match target.scheme {
        Scheme::Http => Box::new(stream),
        Scheme::Https => {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|_| HttpError::HttpRequestUriInvalid)?;
            let tls = tokio::time::timeout(connect_within, tls_connector().connect(name, stream))
                .await
                .map_err(|_| HttpError::ConnectionTimeout)?
                .map_err(HttpError::Tls)?;
            Box::new(tls)
        }
    };
    let (mut sender, connection) =
        tokio::time::timeout(connect_within, hyper::client::conn::http1::handshake(TokioIo::new(stream)))
            .await
            .map_err(|_| HttpError::ConnectionTimeout)??;
    // On the wire the target is the path and query (the host is in
    // `Host`), and only an origin-form path: a request line naming another
    // host (`GET http://elsewhere/…`) would be routed there by proxies.
    let path = request.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if !path.as_str().starts_with('/') {
        return Err(HttpError::HttpRequestUriInvalid);
    }
    *request.uri_mut() = http::Uri::from(path);
    let request = request.map(|body| Metered { inner: body, budget: bytes.clone() }.boxed_unsync());

    let first_byte = bounded(options.and_then(|o| o.first_byte_timeout), deadline);
    let between_bytes = options.and_then(|o| o.between_bytes_timeout);
    let mut connection = Box::pin(connection);
    let mut responding = Box::pin(tokio::time::timeout(first_byte, sender.send_request(request)));
    // The connection is driven while the response head is awaited; after
    // it, by wasi:http (the future returned with the response).
    let response = std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = responding.as_mut().poll(cx) {
            return Poll::Ready(result);
        }
        match connection.as_mut().poll(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Ok(Err(e))),
            // Ended without a response: the next poll of the send says so.
            Poll::Ready(Ok(())) => responding.as_mut().poll(cx),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
    .map_err(|_| HttpError::ConnectionReadTimeout)??;
    let response = response.map(|incoming| {
        let incoming = Paced::new(incoming, between_bytes, deadline);
        Metered { inner: incoming, budget: bytes }.boxed_unsync()
    });
    let io: IoFuture = Box::new(async move {
        let until = tokio::time::Instant::from_std(deadline);
        match tokio::time::timeout_at(until, connection).await {
            Ok(result) => result.map_err(HttpError::from),
            Err(_) => Err(HttpError::HttpResponseTimeout),
        }
    });
    Ok((response, io))
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Lookups running at once in the process. The system resolver blocks a
/// thread until it answers (a name server that never does holds it for
/// its own timeouts, whatever the caller's): each lookup holds a place
/// until its thread is free again, so guests cannot fill the blocking
/// threads every node task shares.
const MAX_LOOKUPS: usize = 16;

fn lookups() -> &'static Arc<tokio::sync::Semaphore> {
    static LOOKUPS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    LOOKUPS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS)))
}

async fn resolve(target: &Target, within: Duration) -> Result<Vec<SocketAddr>, HttpError> {
    if let Ok(address) = target.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(address, target.port)]);
    }
    let lookup = async {
        let place = lookups().clone().acquire_owned().await.map_err(|_| HttpError::DnsTimeout)?;
        let (host, port) = (target.host.clone(), target.port);
        tokio::task::spawn_blocking(move || {
            let _place = place;
            std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port)).map(Iterator::collect::<Vec<_>>)
        })
        .await
        .map_err(|_| HttpError::DnsTimeout)
    };
    let found = tokio::time::timeout(within, lookup)
        .await
        .map_err(|_| HttpError::DnsTimeout)??
        .map_err(|e| HttpError::DnsError { rcode: Some(e.to_string()), info_code: None })?;
    let found: Vec<SocketAddr> =
        found.into_iter().map(|a| SocketAddr::new(crate::http::canonical(a.ip()), a.port())).collect();
    if found.is_empty() {
        return Err(HttpError::DestinationNotFound);
    }
    Ok(found)
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

/// A body whose bytes come out of the call's outbound budget; past it, the
/// body fails.
struct Metered<B> {
    inner: B,
    budget: Arc<Budget>,
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes, Error = HttpError> + Unpin,
{
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && !self.budget.take(data.len() as u64)
        {
            return Poll::Ready(Some(Err(HttpError::InternalError(Some(format!(
                "the call's outbound HTTP moved more than {} bytes",
                self.budget.limit
            ))))));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body read with a limit on the wait between frames, and never
/// past the call's deadline.
struct Paced {
    incoming: hyper::body::Incoming,
    between: Option<Duration>,
    deadline: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Paced {
    fn new(incoming: hyper::body::Incoming, between: Option<Duration>, deadline: Instant) -> Self {
        let timer = Box::pin(tokio::time::sleep(bounded(between, deadline)));
        Self { incoming, between, deadline, timer }
    }
}

impl Body for Paced {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let wait = bounded(self.between, self.deadline);
                self.timer.as_mut().reset(tokio::time::Instant::now() + wait);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(HttpError::from(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
}
