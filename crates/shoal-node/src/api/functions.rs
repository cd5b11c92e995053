//! Routes under `/v1/functions/{tenant}`: deploy, list, describe, remove,
//! invoke, logs and recent calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use serde_json::json;
use tracing::Instrument;

use super::{path_error, read_body};
use crate::activity::CallHistory;
use crate::error::{ApiError, ErrorKind};
use crate::images::ImageError;
use crate::names::check_name;
use crate::registry::{DeployedFunction, FunctionRecord};
use crate::trace::{Kind, Traced, incoming};
use crate::{DeploySpec, Node, new_call_id, now_ms};

const CALL_ID_HEADER: &str = "x-shoal-call-id";

/// A function as clients see it: env var names, never their values.
pub(super) fn description(node: &Node, record: &FunctionRecord) -> serde_json::Value {
    let url = match node.config.http_listen {
        Some(addr) if record.kind == "http" => Some(format!("http://{addr}/{}/{}/", record.tenant, record.name)),
        _ => None,
    };
    json!({
        "url": url,
        "tenant": record.tenant,
        "name": record.name,
        "version": record.version.max(1),
        "kind": record.kind,
        "snapshot": record.snapshot,
        "sha256": record.sha256,
        "size_bytes": record.size_bytes,
        "memory_bytes": record.memory_bytes,
        "timeout_ms": record.timeout_ms,
        "env": record.env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "deployed_ms": record.deployed_ms,
        "allowed_hosts": record.allowed_hosts,
        "secrets": record.secrets,
        "access": if record.kind == "http" { Some(if record.public { "public" } else { "token" }) } else { None },
    })
}

/// Authenticate and check that the caller may act on `tenant/name`.
fn authorise(node: &Node, headers: &HeaderMap, tenant: &str, name: Option<&str>) -> Result<(), ApiError> {
    let caller = node.authenticate(headers)?;
    caller.check_tenant(tenant)?;
    check_name("tenant", tenant)?;
    if let Some(name) = name {
        check_name("function", name)?;
    }
    Ok(())
}

/// Authorise a request about one existing function: another tenant's
/// token gets the 404 a missing function gets, so that it cannot learn
/// which functions exist outside its own tenant.
fn authorise_existing(node: &Node, headers: &HeaderMap, tenant: &str, name: &str) -> Result<(), ApiError> {
    match authorise(node, headers, tenant, Some(name)) {
        Err(e) if e.kind == ErrorKind::Forbidden => Err(missing(tenant, name)),
        other => other,
    }
}

/// [`authorise_existing`] for a call: `name`, `name@N` or `name@alias`.
fn authorise_call(node: &Node, headers: &HeaderMap, tenant: &str, reference: &str) -> Result<(), ApiError> {
    let checked = node
        .authenticate(headers)
        .and_then(|caller| caller.check_tenant(tenant))
        .and_then(|()| check_name("tenant", tenant))
        .and_then(|()| crate::names::check_reference(reference));
    match checked {
        Err(e) if e.kind == ErrorKind::Forbidden => Err(missing(tenant, reference)),
        other => other,
    }
}

/// The version a call of `reference` runs (a split alias picks by the
/// request's route key, else at random), or the 404 of a missing function.
fn resolve(node: &Node, tenant: &str, reference: &str, headers: &HeaderMap) -> Result<Arc<DeployedFunction>, ApiError> {
    let key = headers.get(crate::names::ROUTE_KEY_HEADER).map(HeaderValue::as_bytes);
    node.registry
        .resolve(tenant, reference, || crate::names::route_bucket(key))
        .ok_or_else(|| missing(tenant, reference))
}

fn missing(tenant: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("function `{tenant}/{name}` does not exist"))
}

/// The function the path names, for a caller who may see it (else the
/// 404 of a missing one).
fn existing(
    node: &Node,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: &HeaderMap,
) -> Result<Arc<DeployedFunction>, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise_existing(node, headers, &tenant, &name)?;
    find(node, &tenant, &name)
}

/// The function, or the same 404 whether or not the tenant exists.
fn find(node: &Node, tenant: &str, name: &str) -> Result<Arc<DeployedFunction>, ApiError> {
    node.registry.get(tenant, name).ok_or_else(|| missing(tenant, name))
}

fn env_name_is_valid(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The header carrying one env var of a deploy, `NAME=VALUE` (repeatable):
/// the place for secrets, which a query string would put in URLs (and the
/// access logs of every proxy on the way).
pub(crate) const ENV_HEADER: &str = "shoal-env";

/// Parse `timeout_ms`, `memory_mb` and repeated `env=K=V` from the query and
/// `Shoal-Env: K=V` headers against the node's caps. Unknown parameters
/// are refused, not ignored.
fn deploy_spec(node: &Node, query: Option<&str>, headers: &HeaderMap) -> Result<DeploySpec, ApiError> {
    let config = &node.config;
    let mut spec = DeploySpec::defaults(config);
    let mut env_bytes = 0;
    let mut add_env = |value: &str, spec: &mut DeploySpec| -> Result<(), ApiError> {
        let Some((name, val)) = value.split_once('=') else {
            return Err(ApiError::bad_request(format!("env {value:?} must be NAME=VALUE")));
        };
        if !env_name_is_valid(name) {
            return Err(ApiError::bad_request(format!("env var name {name:?} must match [A-Za-z_][A-Za-z0-9_]*")));
        }
        env_bytes += name.len() + val.len();
        if spec.env.len() == config.max_env_vars || env_bytes > config.max_env_bytes {
            return Err(ApiError::new(
                ErrorKind::TooLarge,
                format!(
                    "env vars are over the limit of {} vars or {} bytes",
                    config.max_env_vars, config.max_env_bytes
                ),
            ));
        }
        spec.env.retain(|(k, _)| k != name);
        spec.env.push((name.to_string(), val.to_string()));
        Ok(())
    };
    for value in headers.get_all(ENV_HEADER) {
        let value = std::str::from_utf8(value.as_bytes())
            .map_err(|_| ApiError::bad_request(format!("a {ENV_HEADER} header is not UTF-8")))?;
        add_env(value, &mut spec)?;
    }
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let number = || {
            value.parse::<u64>().map_err(|_| ApiError::bad_request(format!("{key}={value:?} is not a whole number")))
        };
        match key.as_ref() {
            "timeout_ms" => {
                let ms = number()?;
                let max = config.max_timeout.as_millis() as u64;
                if ms == 0 || ms > max {
                    return Err(ApiError::bad_request(format!("timeout_ms={ms} is outside 1..={max}")));
                }
                spec.timeout = Duration::from_millis(ms);
            }
            "memory_mb" => {
                let mb = number()?;
                let max = config.max_memory_bytes >> 20;
                if mb == 0 || mb > max {
                    return Err(ApiError::bad_request(format!("memory_mb={mb} is outside 1..={max}")));
                }
                spec.memory_bytes = mb << 20;
            }
            "env" => add_env(&value, &mut spec)?,
            "snapshot" => spec.snapshot = flag("snapshot", &value)?,
            "http" => spec.http = flag("http", &value)?,
            "allow_host" => {
                if spec.allowed_hosts.len() == shoal_runtime::MAX_ALLOWED_HOSTS {
                    return Err(ApiError::bad_request(format!(
                        "at most {} allow_host entries per function",
                        shoal_runtime::MAX_ALLOWED_HOSTS
                    )));
                }
                spec.allowed_hosts.push(value.into_owned());
            }
            "secret" => {
                crate::secrets::check_secret_name(&value)?;
                if !spec.secrets.iter().any(|s| *s == *value) {
                    spec.secrets.push(value.into_owned());
                }
            }
            "access" => {
                spec.public = match value.as_ref() {
                    "public" => true,
                    "token" => false,
                    _ => return Err(ApiError::bad_request(format!("access={value:?} is not public or token"))),
                };
            }
            "language" => {
                let language = shoal_runtime::Language::parse(&value).ok_or_else(|| {
                    ApiError::bad_request(format!("language={value:?} is not one Shoal runs (python, javascript)"))
                })?;
                spec.language = Some(language);
            }
            other => return Err(ApiError::bad_request(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok(spec)
}

/// A true-or-false query parameter.
fn flag(name: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ApiError::bad_request(format!("{name}={value:?} is not true or false"))),
    }
}

pub(super) async fn deploy(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&name))?;
    let spec = deploy_spec(&node, query.as_deref(), &headers)?;
    let mut wasm = read_body(&node, body, &headers, node.config.max_module_bytes).await?;
    if let Some(language) = spec.language {
        // Stored and shared as the canonical bundle, like wasm by content.
        wasm = shoal_runtime::SourceBundle::from_upload(language, &wasm)?.encode().into();
    } else if shoal_runtime::SourceBundle::is_bundle(&wasm) {
        // A bundle sent as it is: stored in its canonical form too, so the
        // same source has one hash however its files were ordered.
        wasm = shoal_runtime::SourceBundle::decode(&wasm)?.encode().into();
    }
    let record = node.deploy(&tenant, &name, &wasm, spec).await?;
    Ok((StatusCode::CREATED, Json(description(&node, &record))))
}

pub(super) async fn list(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(tenant) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, None)?;
    let now = now_ms();
    let functions: Vec<_> = node
        .registry
        .list(&tenant)
        .iter()
        .map(|record| {
            let mut view = description(&node, record);
            if let Some(function) = node.registry.get(&record.tenant, &record.name) {
                view["activity"] = activity(&function.history, now);
            }
            view
        })
        .collect();
    Ok(Json(json!({ "functions": functions })))
}

/// A function's last minute on this node, and its calls per slot over the
/// last five (what the console's list charts).
fn activity(history: &CallHistory, now: u64) -> serde_json::Value {
    let mut view = serde_json::to_value(history.summary(now, LAST_MINUTE)).unwrap_or_default();
    view["calls_series"] = history.series(now).iter().map(|slot| slot.calls).collect::<Vec<_>>().into();
    view
}

/// Slots in a minute.
const LAST_MINUTE: usize = (60 / crate::activity::SLOT_SECONDS) as usize;

/// `GET /v1/functions/{tenant}/{name}/calls`: the function's recent calls
/// on this node (newest first: id, end time, outcome, duration, CPU,
/// trace id when sampled), its calls, errors, p50 and p99 per 10 s over
/// the last five minutes, and its last minute summed.
pub(super) async fn recent_calls(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let function = existing(&node, path, &headers)?;
    let now = now_ms();
    let history = &function.history;
    Ok(Json(json!({
        "calls": history.recent(),
        "slot_seconds": crate::activity::SLOT_SECONDS,
        "series": history.series(now),
        "last_minute": history.summary(now, LAST_MINUTE),
    })))
}

pub(super) async fn describe(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(description(&node, &existing(&node, path, &headers)?.record)))
}

pub(super) async fn remove(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise_existing(&node, &headers, &tenant, &name)?;
    if node.registry.remove(&tenant, &name).await? {
        node.collect_orphans();
        tracing::info!(%tenant, function = %name, "removed");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("function `{tenant}/{name}` does not exist")))
    }
}

/// The longest a `GET …/logs?wait=` waits for a new line.
const MAX_LOG_WAIT: Duration = Duration::from_secs(60);

/// `GET /v1/functions/{tenant}/{name}/logs[?after=SEQ][&wait=SECONDS]`:
/// the lines kept (after line `after`), waiting up to `wait` for one when
/// there is none yet (how `shoal logs -f` follows).
pub(super) async fn logs(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise_existing(&node, &headers, &tenant, &name)?;
    let (mut after, mut wait) = (0u64, Duration::ZERO);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let number = || {
            value.parse::<u64>().map_err(|_| ApiError::bad_request(format!("{key}={value:?} is not a whole number")))
        };
        match key.as_ref() {
            "after" => after = number()?,
            "wait" => wait = Duration::from_secs(number()?).min(MAX_LOG_WAIT),
            other => return Err(ApiError::bad_request(format!("unknown query parameter {other:?}"))),
        }
    }
    let function = find(&node, &tenant, &name)?;
    let lines = function.logs.follow(after, wait).await;
    Ok(Json(json!({ "lines": lines })))
}

pub(super) async fn invoke(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let call_id = new_call_id();
    let mut traced = node
        .tracer
        .begin(incoming(&headers), || "POST /v1/functions/{tenant}/{name}/invoke".to_string(), Kind::Server)
        .map(Traced::new);
    let answered = invoke_inner(&node, path, query.as_deref(), &headers, body, &call_id, traced.as_mut()).await;
    let mut response = match answered {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    if let Some(traced) = &mut traced {
        let span = &mut traced.span;
        span.attr("http.request.method", "POST");
        span.attr("http.route", "/v1/functions/{tenant}/{name}/invoke");
        span.attr("http.response.status_code", i64::from(response.status().as_u16()));
        span.attr("shoal.call_id", call_id.as_str());
    }
    let failed = response.status().is_server_error().then(|| response.status().to_string());
    node.end_trace(traced, failed);
    if !response.headers().contains_key(CALL_ID_HEADER)
        && let Ok(value) = HeaderValue::from_str(&call_id)
    {
        response.headers_mut().insert(CALL_ID_HEADER, value);
    }
    mark_node(&node, &mut response);
    response
}

/// Name the node that answered, in a cluster (a forwarded call's answer
/// names the node that ran it already).
fn mark_node(node: &Node, response: &mut Response) {
    if let Some(id) = node.cluster_id()
        && !response.headers().contains_key(crate::cluster::NODE_HEADER)
        && let Ok(value) = HeaderValue::from_str(id)
    {
        response.headers_mut().insert(crate::cluster::NODE_HEADER, value);
    }
}

async fn invoke_inner(
    node: &Arc<Node>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    call_id: &str,
    mut traced: Option<&mut Traced>,
) -> Result<Response, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise_call(node, headers, &tenant, &name)?;
    if let Some(traced) = traced.as_deref_mut() {
        traced.span.attr("shoal.tenant", tenant.as_str());
        traced.span.attr("shoal.function", name.as_str());
    }
    let mut is_async = false;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match (key.as_ref(), value.as_ref()) {
            ("async", "false") => is_async = false,
            ("async", "true") => is_async = true,
            (key, value) => return Err(ApiError::bad_request(format!("unknown query parameter {key}={value:?}"))),
        }
    }
    let function = resolve(node, &tenant, &name, headers)?;
    let input = read_body(node, body, headers, node.config.max_body_bytes).await?;
    if is_async {
        let parent = traced.as_deref().map(|t| t.span.context());
        let id = node.accept_async(&tenant, &function.reference(), input.to_vec(), parent).await?;
        let mut response = (StatusCode::ACCEPTED, Json(json!({ "call_id": id }))).into_response();
        if let Ok(value) = HeaderValue::from_str(&id) {
            response.headers_mut().insert(CALL_ID_HEADER, value);
        }
        return Ok(response);
    }

    if let Some(response) = node.forward_invoke(&function, &input, call_id, traced.as_deref()).await? {
        return Ok(response);
    }
    run_here(node, &function, input, call_id, traced).await
}

/// Run a sync call on this node, with admission, and answer with its output.
async fn run_here(
    node: &Node,
    function: &Arc<DeployedFunction>,
    input: bytes::Bytes,
    call_id: &str,
    traced: Option<&mut Traced>,
) -> Result<Response, ApiError> {
    let trace_id = traced.as_deref().filter(|t| t.span.sampled).map(|t| t.span.trace_hex());
    let span = tracing::debug_span!("call", tenant = %function.record.tenant, function = %function.record.name, %call_id, trace_id = trace_id.as_deref().unwrap_or(""));
    let started = Instant::now();
    let image = load_image(node, function).await?;
    let settings = node.settings_for(function, traced.as_deref());
    let run = node.executor.run(&function.settings.tenant, &function.key, &image, &settings, input);
    let out = match run.instrument(span).await {
        Ok(out) => out,
        Err(overloaded) => {
            node.account(function, (call_id, trace_id.as_deref()), Err(ErrorKind::Overloaded), None, None);
            if let Some(traced) = traced {
                traced.span.attr("shoal.outcome", "overloaded");
            }
            return Err(overloaded.into());
        }
    };
    if let Some(traced) = traced {
        node.trace_call(traced, &out, call_id, function);
    }
    answer(node, function, out, started, call_id, trace_id.as_deref())
}

async fn load_image(
    node: &Node,
    function: &Arc<DeployedFunction>,
) -> Result<Arc<shoal_runtime::FunctionImage>, ApiError> {
    node.image_of(function).await.map_err(|e| match e {
        // A reload that had to compile again (the cache was lost) and ran
        // past the compile limit: worth a retry, not an internal error.
        ImageError::Load(e @ shoal_runtime::DeployError::CompileTimeout { .. }) => ApiError::from(e),
        e => ApiError::internal("loading a function's image", e),
    })
}

/// Log, count and answer a call that ran.
fn answer(
    node: &Node,
    function: &DeployedFunction,
    mut out: shoal_runtime::CallOutput,
    started: Instant,
    call_id: &str,
    trace_id: Option<&str>,
) -> Result<Response, ApiError> {
    let elapsed = started.elapsed();
    function.logs.append(call_id, trace_id, now_ms(), out.take_logs());
    let outcome = out.result.as_ref().map(drop).map_err(ErrorKind::of_call);
    node.account(function, (call_id, trace_id), outcome, Some(elapsed), Some(&out.usage));
    match out.result {
        Ok(output) => {
            let mut response = output.into_response();
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            response.headers_mut().insert(
                axum::http::HeaderName::from_static(crate::cluster::CPU_HEADER),
                HeaderValue::from(u64::try_from(out.usage.cpu.as_micros()).unwrap_or(u64::MAX)),
            );
            Ok(response)
        }
        Err(e) => Err(ApiError::from(e)),
    }
}

/// `POST /internal/v1/functions/{tenant}/{name}/invoke`: a call another
/// node of the cluster placed here. Only with the cluster secret; it runs
/// here whatever this node's load (admission still applies), and the
/// answer carries this node's load. A chained call (it names its depth
/// and the time left to its caller) takes a free sandbox or is refused at
/// once, as on the node it came from.
pub(super) async fn internal_invoke(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(cluster) = node.cluster.clone() else {
        return ApiError::not_found("no such route").into_response();
    };
    let presented = headers.get(shoal_cluster::SECRET_HEADER).map(HeaderValue::as_bytes).unwrap_or_default();
    if !cluster.is_secret(presented) {
        return ApiError::new(ErrorKind::Unauthorized, "a call between nodes needs the cluster secret").into_response();
    }
    let call_id = headers
        .get(CALL_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map_or_else(new_call_id, str::to_string);
    let mut response = match run_placed(&node, path, &headers, body, &call_id).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    response.headers_mut().insert(
        axum::http::HeaderName::from_static(crate::cluster::LOAD_HEADER),
        crate::cluster::load_header(node.executor.busy(), cluster.capacity),
    );
    if let Ok(value) = HeaderValue::from_str(&call_id) {
        response.headers_mut().insert(CALL_ID_HEADER, value);
    }
    mark_node(&node, &mut response);
    response
}

async fn run_placed(
    node: &Arc<Node>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: &HeaderMap,
    body: Body,
    call_id: &str,
) -> Result<Response, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    let function = match node.registry.get(&tenant, &name) {
        Some(function) => function,
        None => {
            // Deployed a moment ago on another node: read the registry now.
            node.registry.mirror(true, node.config.log_lines_per_function).await?;
            find(node, &tenant, &name)?
        }
    };
    let input = read_body(node, body, headers, node.config.max_body_bytes).await?;
    // Traced where it was placed from: its span here hangs under that.
    let mut traced = incoming(headers)
        .and_then(|parent| node.tracer.begin(Some(parent), || format!("call {}", function.key), Kind::Server))
        .map(Traced::new);
    let number = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let Some(depth) = number(crate::cluster::DEPTH_HEADER) else {
        let answered = run_here(node, &function, input, call_id, traced.as_mut()).await;
        node.end_trace(traced, answered.as_ref().err().map(ToString::to_string));
        return answered;
    };
    // The time left to the caller, never more than the callee's own timeout.
    let left =
        Duration::from_millis(number(crate::cluster::DEADLINE_HEADER).unwrap_or(0)).min(function.settings.timeout);
    let lineage = shoal_runtime::Lineage {
        depth: u32::try_from(depth).unwrap_or(u32::MAX),
        deadline: Some(std::time::Instant::now() + left),
        root: Arc::new(shoal_runtime::RootCall::default()),
        long: false,
        trace: None,
    };
    let started = Instant::now();
    let image = load_image(node, &function).await?;
    let settings = node.settings_for(&function, traced.as_ref());
    let run = node.executor.run_chained(&function.settings.tenant, &function.key, &image, &settings, input, lineage);
    let out = match run.await {
        Ok(out) => out,
        Err(overloaded) => {
            // Not charged: the node that placed it here answers for it.
            node.metrics.record_call(&function.settings.tenant, &function.key, Err(ErrorKind::Overloaded), None);
            let error = ApiError::new(ErrorKind::Unavailable, overloaded.to_string());
            node.end_trace(traced, Some(error.to_string()));
            return Err(error);
        }
    };
    let trace_id = traced.as_ref().filter(|t| t.span.sampled).map(|t| t.span.trace_hex());
    if let Some(traced) = &mut traced {
        node.trace_call(traced, &out, call_id, &function);
    }
    let error = out.result.as_ref().err().map(ToString::to_string);
    node.end_trace(traced, error);
    answer(node, &function, out, started, call_id, trace_id.as_deref())
}
