//! The HTTP API (ARCHITECTURE.md, "How a call flows"). Handlers are thin: authenticate, check
//! names and limits, call the node, map the outcome. Bodies are read with
//! their limit enforced while reading, so an oversized body is refused
//! without being buffered.

mod calls;
mod cluster;
mod console;
mod functions;
mod queues;
mod secrets;
mod state;
mod tenants;
mod triggers;
mod usage;
mod versions;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::extract::rejection::PathRejection;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::Node;
use crate::auth::{self, Caller};
use crate::error::{ApiError, ErrorKind};
use crate::metrics::Gauges;

pub(crate) fn router(node: Arc<Node>) -> Router {
    let router = Router::new();
    #[cfg(feature = "fault-injection")]
    let router = router.route("/v1/_fault/panic", post(fault_panic));
    router
        .route("/v1/tenants", post(tenants::create).get(tenants::list))
        .route("/v1/cluster", get(cluster::get))
        .route("/v1/whoami", get(whoami))
        .route("/v1/tenants/{tenant}", get(tenants::get).delete(tenants::delete))
        .route("/v1/tenants/{tenant}/token", post(tenants::rotate_token).delete(tenants::revoke_tokens))
        .route("/v1/tenants/{tenant}/limits", get(tenants::get_limits).put(tenants::put_limits))
        .route("/v1/tenants/{tenant}/secrets", get(secrets::list))
        .route("/v1/tenants/{tenant}/usage", get(usage::get))
        .route("/v1/tenants/{tenant}/secrets/{name}", put(secrets::put).delete(secrets::delete))
        .route("/v1/functions/{tenant}", get(functions::list))
        .route(
            "/v1/functions/{tenant}/{name}",
            put(functions::deploy).get(functions::describe).delete(functions::remove),
        )
        .route("/v1/functions/{tenant}/{name}/invoke", post(functions::invoke))
        .route("/v1/functions/{tenant}/{name}/logs", get(functions::logs))
        .route("/v1/functions/{tenant}/{name}/calls", get(functions::recent_calls))
        .route("/v1/functions/{tenant}/{name}/versions", get(versions::list_versions))
        .route("/v1/functions/{tenant}/{name}/aliases", get(versions::list_aliases))
        .route("/v1/functions/{tenant}/{name}/aliases/{alias}", put(versions::put_alias).delete(versions::delete_alias))
        .route("/internal/v1/functions/{tenant}/{name}/invoke", post(functions::internal_invoke))
        .route("/v1/queues/{tenant}", get(queues::list))
        .route("/v1/queues/{tenant}/{queue}", put(queues::put).get(queues::get).delete(queues::delete))
        .route("/v1/queues/{tenant}/{queue}/messages", post(queues::send))
        .route("/v1/queues/{tenant}/{queue}/dead", get(queues::dead).delete(queues::purge))
        .route("/v1/queues/{tenant}/{queue}/dead/redrive", post(queues::redrive))
        .route("/v1/triggers/{tenant}", get(triggers::list))
        .route("/v1/triggers/{tenant}/{name}", put(triggers::put).get(triggers::get).delete(triggers::delete))
        .route("/v1/calls", get(calls::list))
        .route("/v1/calls/{id}", get(calls::get))
        .route("/console", get(console::page))
        .route("/console/", get(console::page))
        .route("/console/{asset}", get(console::asset))
        .route("/v1/state/{tenant}", get(state::list))
        .route("/v1/state/{tenant}/{*key}", get(state::get).put(state::put).delete(state::delete))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorKind::MethodNotAllowed, "this route does not take that method")
        })
        .with_state(node)
}

impl Node {
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        auth::authenticate(headers, &self.admin_hash, |tenant, presented| self.registry.opens(tenant, presented))
    }
}

/// Authenticate a request about `tenant`'s own things (the admin's or the
/// tenant's token), with the tenant's name and the thing's (`what`, e.g.
/// "queue") checked.
fn authorise_own(node: &Node, headers: &HeaderMap, tenant: &str, named: Option<(&str, &str)>) -> Result<(), ApiError> {
    node.authenticate(headers)?.check_tenant(tenant)?;
    crate::names::check_name("tenant", tenant)?;
    named.map_or(Ok(()), |(what, name)| crate::names::check_name(what, name))
}

fn path_error(rejection: PathRejection) -> ApiError {
    ApiError::bad_request(format!("bad path: {}", rejection.body_text()))
}

/// Read a request body of at most `limit` bytes. A declared length over
/// the limit is refused before reading; an undeclared one is cut off as
/// soon as it passes the limit. A body that trickles in (slower on average
/// than the node's minimum body rate, once its grace period is over) is
/// answered 408 and its connection closed.
async fn read_body(node: &Node, body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::new(ErrorKind::TooLarge, format!("request body is over the limit of {limit} bytes"));
    if let Some(length) = headers.get(CONTENT_LENGTH) {
        let length: u64 = length
            .to_str()
            .ok()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| ApiError::bad_request("Content-Length is not a number"))?;
        if length > limit as u64 {
            return Err(too_large());
        }
    }
    let http = &node.config.http;
    let started = tokio::time::Instant::now();
    let mut body = http_body_util::Limited::new(body, limit);
    let mut received = bytes::BytesMut::new();
    loop {
        // The deadline moves with what has arrived: the grace period, plus
        // the time the bytes so far are worth at the minimum rate.
        let earned = Duration::from_secs_f64(received.len() as f64 / http.min_body_rate as f64);
        let deadline = started + http.body_grace + earned;
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    ErrorKind::RequestTimeout,
                    format!(
                        "the request body arrived too slowly ({} bytes in {:.1} s; the minimum is {} bytes/s after {} s)",
                        received.len(),
                        started.elapsed().as_secs_f64(),
                        http.min_body_rate,
                        http.body_grace.as_secs_f64()
                    ),
                ));
            }
            Ok(None) => return Ok(received.freeze()),
            Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Ok(Some(Err(e))) => return Err(ApiError::bad_request(format!("reading the request body: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }
}

/// `GET /v1/whoami`: whose token this is, and where traces are shown
/// (`--trace-link`): how the console learns what to show after signing in.
async fn whoami(State(node): State<Arc<Node>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let link = node.config.trace_link.as_deref();
    let view = match node.authenticate(&headers)? {
        Caller::Admin => serde_json::json!({ "admin": true, "tenant": null, "trace_link": link }),
        Caller::Tenant(tenant) => serde_json::json!({ "admin": false, "tenant": tenant, "trace_link": link }),
    };
    Ok(axum::Json(view).into_response())
}

/// `/metrics` on the API: the admin's only (counts of tenants, functions
/// and compiles say more than a stranger should know).
async fn metrics(State(node): State<Arc<Node>>, headers: HeaderMap) -> Result<Response, ApiError> {
    node.authenticate(&headers)?.check_admin()?;
    Ok(render_metrics(&node))
}

/// The router of the metrics listener (`--metrics-listen`): `/metrics`
/// with no token, for a scraper on a network the operator trusts, and
/// `/healthz`.
pub(crate) fn metrics_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/metrics", get(|State(node): State<Arc<Node>>| async move { render_metrics(&node) }))
        .route("/healthz", get(healthz))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(node)
}

fn render_metrics(node: &Node) -> Response {
    let gauges = Gauges {
        n_tenants: node.registry.n_tenants(),
        n_functions: node.registry.n_functions(),
        n_running: node.executor.busy(),
        n_slots: node.executor.n_slots(),
        n_compiles: node.runtime().n_compiles(),
        state: node.state.stats(),
        async_unfinished: node.async_calls.unfinished()
            + node.cluster.as_ref().map_or(0, |c| c.async_running.load(Ordering::Relaxed) as usize),
        n_loaded_images: node.n_loaded_images(),
        connections_open: node.conn_stats.open.load(Ordering::Relaxed),
        connections_refused: node.conn_stats.refused.load(Ordering::Relaxed),
        connections_idle_closed: node.conn_stats.idle_closed.load(Ordering::Relaxed),
        panics: node.conn_stats.panics.load(Ordering::Relaxed),
        chore_restarts: node.chore_restarts.load(Ordering::Relaxed),
        cluster_members: node.cluster.as_ref().map_or(0, |c| c.membership.members().len()),
        cluster_members_ready: node
            .cluster
            .as_ref()
            .map_or(0, |c| c.membership.members().iter().filter(|m| m.load.capacity > 0).count()),
        calls_forwarded: node.cluster.as_ref().map_or(0, |c| c.n_forwarded.load(Ordering::Relaxed)),
        forward_failures: node.cluster.as_ref().map_or(0, |c| c.n_forward_failures.load(Ordering::Relaxed)),
        n_queued: node.executor.queued(),
        call_memory_bytes: node.executor.memory_in_use(),
        local: node.state.local().bytes(),
        local_evictions: node.state.local().evictions(),
        disk: vec![
            ("store", std::fs::metadata(node.config.data_dir.join("shoal.redb")).map_or(0, |m| m.len())),
            ("compiled", node.runtime().compiled_bytes()),
        ],
        trace_spans: {
            let stats = &node.tracer.stats;
            (
                stats.exported.load(Ordering::Relaxed),
                stats.dropped.load(Ordering::Relaxed),
                stats.failed.load(Ordering::Relaxed),
            )
        },
    };
    let mut response = node.metrics.render(&gauges).into_response();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// The OpenAPI description of this API (checked against a live node by
/// `scripts/schemathesis.sh` in CI).
async fn openapi() -> Response {
    let mut response = include_str!("api/openapi.json").into_response();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Fault injection (the `fault-injection` feature, for tests only): the
/// admin makes the handler panic holding the registry's locks.
#[cfg(feature = "fault-injection")]
async fn fault_panic(
    State(node): State<Arc<Node>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    node.authenticate(&headers)?.check_admin()?;
    // `?in=chores`: the cluster chores panic at their next tick instead.
    if query.as_deref() == Some("in=chores") {
        node.fault_in_chores.store(true, Ordering::Release);
        return Ok(axum::http::StatusCode::NO_CONTENT.into_response());
    }
    // `?in=async-call`: the next asynchronous call's task panics (on one node).
    if query.as_deref() == Some("in=async-call") {
        node.fault_in_async_call.store(true, Ordering::Release);
        return Ok(axum::http::StatusCode::NO_CONTENT.into_response());
    }
    match node.registry.panic_holding_locks() {}
}

/// Ready for work (see `Node::readiness`): 200 `ready`, else 503 with why.
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    match node.readiness().await {
        Ok(()) => "ready\n".into_response(),
        Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}

/// Alive: the node answers (its async threads run).
async fn healthz() -> &'static str {
    "ok\n"
}
