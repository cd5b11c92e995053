//! `POST /v1/tenants`: the admin creates a tenant and gets its token, once.
//! `GET /v1/tenants`: the admin lists them all, with limits and weights.
//! `GET /v1/tenants/{tenant}`: whether it is active or being deleted.
//! `DELETE /v1/tenants/{tenant}`: the admin deletes it and everything it
//! has (in the background: 202, then the status says `deleting` until it
//! is gone and a GET answers 404).
//! `POST /v1/tenants/{tenant}/token`: a new token (the admin, or the
//! tenant with its current token); the old one stays valid for
//! `grace_seconds`. `DELETE /v1/tenants/{tenant}/token`: the admin
//! revokes every token of the tenant.
//! `PUT /v1/tenants/{tenant}/limits`: the admin sets a tenant's weight and
//! limits (applied at once, kept in the registry); `GET` shows them, with
//! what is in force (the node's defaults where none is set) and what the
//! tenant holds and has used on this node, to the admin and to the tenant
//! itself.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;

use super::{path_error, read_body};
use crate::Node;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorKind};
use crate::names::check_name;
use crate::registry::TenantLimitsRecord;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    name: String,
}

/// Tenant requests are tiny.
const MAX_TENANT_BODY: usize = 4096;

pub(super) async fn create(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    node.authenticate(&headers)?.check_admin()?;
    let body = read_body(&node, body, &headers, MAX_TENANT_BODY).await?;
    let request: CreateTenant = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("body must be {{\"name\": \"…\"}}: {e}")))?;
    match node.create_tenant(&request.name).await? {
        Some(token) => Ok((StatusCode::CREATED, Json(serde_json::json!({ "name": request.name, "token": token })))),
        None => Err(ApiError::new(ErrorKind::Conflict, format!("tenant `{}` exists already", request.name))),
    }
}

/// A tenant's limits as set, and as in force.
fn limits_view(node: &Node, tenant: &str, set: &TenantLimitsRecord) -> serde_json::Value {
    let config = &node.config;
    let sandboxes = config.sandbox_limits();
    let weight =
        set.weight.or_else(|| config.tenant_weights.iter().find(|(t, _)| t == tenant).map(|(_, w)| *w)).unwrap_or(1);
    serde_json::json!({
        "tenant": tenant,
        "set": set,
        "effective": {
            "weight": weight,
            "running": set.running.unwrap_or(config.scheduler.max_running_per_tenant),
            "sandboxes": set.sandboxes.unwrap_or(sandboxes.tenant_sandboxes),
            "memory_bytes": set.memory_bytes.unwrap_or(sandboxes.tenant_memory_bytes),
            "local_bytes": set.local_bytes.unwrap_or(config.local_limits().tenant_bytes),
            "state_quota_bytes": set.state_quota_bytes.unwrap_or(config.state_quota_bytes),
        },
    })
}

/// What a tenant holds and has used on this node now.
async fn in_use(node: &Node, tenant: &str) -> serde_json::Value {
    let (sandboxes, memory_bytes) = node.executor.in_use_of(tenant);
    let local = node.state.local().bytes_of(tenant);
    // Unknown (null) while the global tier cannot answer.
    let state_bytes = node.state.global().usage(tenant).await.ok();
    let compiles = node.runtime().compile_use_of(tenant);
    serde_json::json!({
        "sandboxes": sandboxes,
        "memory_bytes": memory_bytes,
        "local_bytes": local.clean + local.dirty,
        "local_unpushed_bytes": local.dirty,
        "state_bytes": state_bytes,
        "compiling": node.runtime().compiles_of(tenant),
        "compiles": compiles.compiles,
        "compile_cpu_ms": u64::try_from(compiles.cpu.as_millis()).unwrap_or(u64::MAX),
    })
}

/// The tenant the path names, if its name is valid.
fn named(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(tenant) = path.map_err(path_error)?;
    check_name("tenant", &tenant)?;
    Ok(tenant)
}

fn tenant_of(node: &Node, path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let tenant = named(path)?;
    if !node.registry.tenant_exists(&tenant) {
        return Err(ApiError::not_found(format!("tenant `{tenant}` does not exist")));
    }
    if !node.registry.tenant_active(&tenant) {
        return Err(ApiError::new(ErrorKind::Conflict, format!("tenant `{tenant}` is being deleted")));
    }
    Ok(tenant)
}

/// A tenant's status: `active`, or `deleting` (since when).
fn status_view(record: &crate::registry::TenantRecord) -> serde_json::Value {
    serde_json::json!({
        "name": record.name,
        "status": if record.deleting_since_ms.is_some() { "deleting" } else { "active" },
        "created_ms": record.created_ms,
        "deleting_since_ms": record.deleting_since_ms,
    })
}

/// `GET /v1/tenants`: the admin's list of every tenant, its status and
/// its limits (as set and in force, weight among them).
pub(super) async fn list(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    node.authenticate(&headers)?.check_admin()?;
    let mut names = node.registry.tenant_names();
    names.sort();
    let tenants: Vec<serde_json::Value> = names
        .iter()
        .filter_map(|name| {
            let record = node.registry.tenant(name)?;
            let set = node.registry.tenant_limits(name).unwrap_or_default();
            let mut view = status_view(&record);
            view["limits"] = limits_view(&node, name, &set);
            view["functions"] = node.registry.n_functions_of(name).into();
            Some(view)
        })
        .collect();
    Ok(Json(serde_json::json!({ "tenants": tenants })))
}

pub(super) async fn get(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = node.authenticate(&headers)?;
    let Path(tenant) = path.map_err(path_error)?;
    caller.check_tenant(&tenant)?;
    check_name("tenant", &tenant)?;
    let record = node
        .registry
        .tenant(&tenant)
        .ok_or_else(|| ApiError::not_found(format!("tenant `{tenant}` does not exist")))?;
    Ok(Json(status_view(&record)))
}

pub(super) async fn delete(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    node.authenticate(&headers)?.check_admin()?;
    let tenant = named(path)?;
    node.delete_tenant(&tenant).await?;
    let record = node.registry.tenant(&tenant);
    // The deletion may already have ended (a tenant with nothing to wait for).
    let view =
        record.as_ref().map(status_view).unwrap_or_else(|| serde_json::json!({ "name": tenant, "status": "deleted" }));
    Ok((StatusCode::ACCEPTED, Json(view)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Rotate {
    /// How long the current token stays valid (default an hour; 0: not at all).
    #[serde(default)]
    grace_seconds: Option<u64>,
}

/// The grace a rotated-out token gets unless the request says otherwise.
const DEFAULT_GRACE_SECONDS: u64 = 3600;

pub(super) async fn rotate_token(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = node.authenticate(&headers)?;
    let Path(tenant) = path.map_err(path_error)?;
    caller.check_tenant(&tenant)?;
    check_name("tenant", &tenant)?;
    // A token rotated out (still in its grace) cannot mint a new one: who
    // holds a leaked old token must not be able to outlive the rotation.
    if caller != Caller::Admin
        && !node.registry.is_current_token(&tenant, &crate::auth::hash_token(crate::auth::bearer(&headers)?))
    {
        return Err(ApiError::new(
            ErrorKind::Forbidden,
            "only the tenant's current token (or the admin's) can rotate it",
        ));
    }
    let body = read_body(&node, body, &headers, MAX_TENANT_BODY).await?;
    let request: Rotate = if body.is_empty() {
        Rotate::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("body must be {{\"grace_seconds\": N}} or empty: {e}")))?
    };
    let grace = Duration::from_secs(request.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS));
    let rotated = node.rotate_token(&tenant, grace).await?;
    Ok(Json(serde_json::json!({
        "name": tenant,
        "token": rotated.token,
        "previous_valid_until_ms": rotated.previous_valid_until_ms,
    })))
}

pub(super) async fn revoke_tokens(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    node.authenticate(&headers)?.check_admin()?;
    let tenant = named(path)?;
    node.revoke_tokens(&tenant).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn get_limits(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = node.authenticate(&headers)?;
    let Path(tenant) = path.map_err(path_error)?;
    caller.check_tenant(&tenant)?;
    let tenant = tenant_of(&node, Ok(Path(tenant)))?;
    let set = node.registry.tenant_limits(&tenant).unwrap_or_default();
    let mut view = limits_view(&node, &tenant, &set);
    view["in_use"] = in_use(&node, &tenant).await;
    Ok(Json(view))
}

pub(super) async fn put_limits(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    node.authenticate(&headers)?.check_admin()?;
    let tenant = tenant_of(&node, path)?;
    let body = read_body(&node, body, &headers, MAX_TENANT_BODY).await?;
    let limits: TenantLimitsRecord = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body must be {{\"weight\", \"running\", \"sandboxes\", \"memory_bytes\", \"local_bytes\", \"state_quota_bytes\"}} (each optional): {e}"
        ))
    })?;
    if limits.weight.is_some_and(|w| !(1..=1000).contains(&w)) {
        return Err(ApiError::bad_request("weight must be 1 to 1000"));
    }
    if limits.running == Some(0) || limits.sandboxes == Some(0) {
        return Err(ApiError::bad_request("running and sandboxes must be at least 1"));
    }
    if limits.memory_bytes.is_some_and(|m| m < 1 << 20) {
        return Err(ApiError::bad_request("memory_bytes must be at least 1 MiB"));
    }
    if !node.registry.set_tenant_limits(&tenant, limits.clone()).await? {
        return Err(ApiError::not_found(format!("tenant `{tenant}` does not exist")));
    }
    node.apply_tenant_limits();
    tracing::info!(%tenant, ?limits, "tenant limits set");
    Ok(Json(limits_view(&node, &tenant, &limits)))
}
