//! HTTP functions on their routes: the function listener (`--http-listen`)
//! maps `/{tenant}/{name}/…` (or the host `{name}.{tenant}.{domain}` with
//! `--http-domain`) to a `wasi:http` function and streams the exchange
//! through a fresh sandbox.
//!
//! The guest sees the method, the path after its prefix (at least `/`),
//! the query, the headers and the body as it arrives; a function whose
//! access is `token` needs its tenant's token (or the admin's) in
//! `Authorization`, which is taken out before the guest sees the request.
//! The answer's head goes out as soon as the guest sets it and its body
//! while the guest writes it; the call's deadline covers the whole
//! exchange (a body still streaming then is cut, and the call's log says
//! so). Request bodies are limited in bytes as they stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Request, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use shoal_runtime::{CallError, HttpBody, HttpError, HttpExchange, LogLine, LogStream};

use crate::error::{ApiError, ErrorKind};
use crate::registry::DeployedFunction;
use crate::{Node, new_call_id, now_ms};

const CALL_ID_HEADER: &str = "x-shoal-call-id";

/// The function listener's router: every path goes to [`handle`].
pub(crate) fn router(node: Arc<Node>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(node)
}

async fn handle(State(node): State<Arc<Node>>, request: Request<Body>) -> Response {
    let call_id = new_call_id();
    let mut response = match route(&node, request, &call_id).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&call_id) {
        response.headers_mut().insert(CALL_ID_HEADER, value);
    }
    response
}

/// The function a request is for, and the path its guest sees.
fn target<'a>(node: &Node, request: &'a Request<Body>) -> Option<(String, String, &'a str)> {
    let path = request.uri().path();
    if let Some(domain) = &node.config.http_domain {
        let host = request.uri().host().or_else(|| request.headers().get(header::HOST)?.to_str().ok())?;
        let host = host.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).map_or(host, |(h, _)| h);
        if let Some(prefix) = host.strip_suffix(domain.as_str()).and_then(|p| p.strip_suffix('.'))
            && let Some((name, tenant)) = prefix.split_once('.')
        {
            return Some((tenant.to_string(), name.to_string(), path));
        }
    }
    let rest = path.strip_prefix('/')?;
    let (tenant, rest) = rest.split_once('/')?;
    let (name, rest) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    Some((tenant.to_string(), name.to_string(), rest))
}

async fn route(node: &Arc<Node>, request: Request<Body>, call_id: &str) -> Result<Response, ApiError> {
    let shown = request.uri().path().to_string();
    let not_found = || ApiError::not_found(format!("no HTTP function at {shown}"));
    let (tenant, name, path) = target(node, &request).ok_or_else(not_found)?;
    let path = path.to_string();
    if !crate::names::is_valid_reference(&name) {
        return Err(not_found());
    }
    let key = request.headers().get(crate::names::ROUTE_KEY_HEADER).map(|v| v.as_bytes().to_vec());
    let function = node
        .registry
        .resolve(&tenant, &name, || crate::names::route_bucket(key.as_deref()))
        .filter(|f| f.record.kind == shoal_runtime::FunctionKind::Http.as_str())
        .ok_or_else(not_found)?;
    // A platform token never reaches a guest: a `token` function's caller
    // must present its tenant's (or the admin's), and one sent to a public
    // function is taken out too. Without it, or with another tenant's,
    // the answer is the 404 of a missing function (names of functions
    // behind tokens cannot be probed).
    let caller = node.authenticate(request.headers());
    // Public means the function as it is now: its other versions and its
    // aliases (an older version may have been public, or had a flaw since
    // fixed) take the tenant's token.
    if !function.record.public || name.contains('@') {
        caller.as_ref().map_err(|_| not_found())?.check_tenant(&tenant).map_err(|_| not_found())?;
    }
    let platform_token = caller.is_ok();
    let limit = node.config.http_max_body_bytes;
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::new(
            ErrorKind::TooLarge,
            format!("the request body is {} bytes; the limit is {limit}", declared.unwrap_or_default()),
        ));
    }
    let traced = node
        .tracer
        .begin(
            crate::trace::incoming(request.headers()),
            || format!("{} {tenant}/{name}", request.method()),
            crate::trace::Kind::Server,
        )
        .map(crate::trace::Traced::new);
    let method = traced.as_ref().map(|_| request.method().to_string());
    let guest_request = for_the_guest(request, &path, platform_token, limit)?;
    let image = node.image_of(&function).await.map_err(|e| ApiError::internal("loading a function's image", e))?;
    let (exchange, answer) = HttpExchange::new(guest_request);

    // The call runs on a task of its own: it goes on after the answer's
    // head is returned, while its body streams.
    let started = Instant::now();
    let call = {
        let (node, function, call_id) = (node.clone(), function.clone(), call_id.to_string());
        let mut traced = traced;
        tokio::spawn(async move {
            let settings = node.settings_for(&function, traced.as_ref());
            let run = node.executor.run(&function.settings.tenant, &function.key, &image, &settings, exchange);
            let trace_id = traced.as_ref().filter(|t| t.span.sampled).map(|t| t.span.trace_hex());
            let span = tracing::debug_span!("call", tenant = %function.record.tenant, function = %function.record.name, %call_id, trace_id = trace_id.as_deref().unwrap_or(""));
            let out = tracing::Instrument::instrument(run, span).await;
            if let (Some(traced), Ok(out)) = (&mut traced, &out) {
                node.trace_call(traced, out, &call_id, &function);
                traced.span.attr("http.request.method", method.unwrap_or_default());
                traced.span.attr("url.path", path);
            }
            let failed = finish(&node, &function, out, started, &call_id, trace_id.as_deref());
            node.end_trace(traced, failed.as_ref().map(ToString::to_string));
            failed
        })
    };
    // A client gone before the head is answered takes the call with it.
    let mut call = AbortOnDrop(Some(call));
    match answer.await {
        Ok(Ok(response)) => {
            call.detach();
            let (parts, body) = response.into_parts();
            Ok(Response::from_parts(parts, Body::new(body)))
        }
        Ok(Err(code)) => {
            call.detach();
            Err(ApiError::new(ErrorKind::FunctionError, format!("the function answered with the error {code}")))
        }
        Err(_) => {
            let outcome = call.join().await;
            Err(outcome.unwrap_or_else(|| {
                ApiError::new(ErrorKind::FunctionError, "the function ended without setting a response")
            }))
        }
    }
}

/// Log and count a call that ended; the error that says how it failed
/// (for a caller that never got its answer's head).
fn finish(
    node: &Node,
    function: &DeployedFunction,
    out: Result<shoal_runtime::CallOutput, shoal_sched::Overloaded>,
    started: Instant,
    call_id: &str,
    trace_id: Option<&str>,
) -> Option<ApiError> {
    let elapsed = started.elapsed();
    let mut out = match out {
        Ok(out) => out,
        Err(overloaded) => {
            node.account(function, (call_id, trace_id), Err(ErrorKind::Overloaded), None, None);
            return Some(overloaded.into());
        }
    };
    let mut logs = out.take_logs();
    let outcome = out.result.as_ref().map(drop).map_err(ErrorKind::of_call);
    node.account(function, (call_id, trace_id), outcome, Some(elapsed), Some(&out.usage));
    let result = match out.result {
        Ok(_) => None,
        Err(e) => {
            if let CallError::Timeout { .. } = e {
                logs.push(LogLine {
                    stream: LogStream::Stderr,
                    line: format!("shoal: {e}; a response still streaming was cut"),
                });
            }
            Some(ApiError::from(e))
        }
    };
    function.logs.append(call_id, trace_id, now_ms(), logs);
    result
}

/// The request as the guest sees it: the URI `http://{host}{path}?{query}`
/// (the host from `Host`), the headers less the platform's credentials
/// (`Authorization` when it holds a platform token), the body limited to
/// `limit` bytes as it streams.
fn for_the_guest(
    request: Request<Body>,
    path: &str,
    platform_token: bool,
    limit: u64,
) -> Result<Request<HttpBody>, ApiError> {
    let (mut parts, body) = request.into_parts();
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_else(|| "localhost".to_string());
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    parts.uri = axum::http::Uri::builder()
        .scheme("http")
        .authority(host)
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| ApiError::bad_request(format!("the request's host or path: {e}")))?;
    if platform_token {
        parts.headers.remove(header::AUTHORIZATION);
    }
    let body = Limited { inner: body, left: limit, limit }.boxed_unsync();
    Ok(Request::from_parts(parts, body))
}

/// A request body cut off past `limit` bytes (the guest's read fails).
struct Limited {
    inner: Body,
    left: u64,
    limit: u64,
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                if n > self.left {
                    self.left = 0;
                    return Poll::Ready(Some(Err(HttpError::HttpRequestBodySize(Some(self.limit)))));
                }
                self.left -= n;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(HttpError::InternalError(Some(e.to_string()))))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A spawned call, aborted if dropped before it is detached or joined.
struct AbortOnDrop(Option<tokio::task::JoinHandle<Option<ApiError>>>);

impl AbortOnDrop {
    fn detach(&mut self) {
        self.0.take();
    }

    async fn join(&mut self) -> Option<ApiError> {
        let handle = self.0.take()?;
        match handle.await {
            Ok(outcome) => outcome,
            Err(e) => Some(ApiError::internal("running a call", e)),
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}
