//! `/v1/state/{tenant}/{key}`: the global tier over HTTP. Keys may hold
//! `/` (the route takes the rest of the path); they are scoped to the
//! tenant in the path, which the caller's token must own.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use shoal_state::ScopedKey;

use super::{path_error, read_body};
use crate::Node;
use crate::error::ApiError;
use crate::names::check_name;

fn scoped(node: &Node, headers: &HeaderMap, tenant: &str, key: &str) -> Result<ScopedKey, ApiError> {
    check_tenant(node, headers, tenant)?;
    Ok(ScopedKey::new(tenant, key)?)
}

/// The caller owns `tenant` (or is the admin), and the tenant exists and
/// is not being deleted: the admin cannot write state for a tenant that
/// was never created, or bring back one that is going.
fn check_tenant(node: &Node, headers: &HeaderMap, tenant: &str) -> Result<(), ApiError> {
    node.authenticate(headers)?.check_tenant(tenant)?;
    check_name("tenant", tenant)?;
    if !node.registry.tenant_active(tenant) {
        return Err(ApiError::not_found(format!("tenant `{tenant}` does not exist")));
    }
    Ok(())
}

fn missing(tenant: &str, key: &str) -> ApiError {
    ApiError::not_found(format!("state key `{key}` of tenant `{tenant}` does not exist"))
}

pub(super) async fn get(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path((tenant, key)) = path.map_err(path_error)?;
    let scoped = scoped(&node, &headers, &tenant, &key)?;
    let value = node.state.get_global(&scoped).await?.ok_or_else(|| missing(&tenant, &key))?;
    let mut response = value.into_response();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(response)
}

pub(super) async fn put(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let Path((tenant, key)) = path.map_err(path_error)?;
    let scoped = scoped(&node, &headers, &tenant, &key)?;
    let limit = usize::try_from(node.state.global().limits().max_value_bytes).unwrap_or(usize::MAX);
    let value = read_body(&node, body, &headers, limit).await?;
    node.state.put_global(&scoped, value.to_vec()).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn delete(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Path((tenant, key)) = path.map_err(path_error)?;
    let scoped = scoped(&node, &headers, &tenant, &key)?;
    if node.state.delete_global(&scoped).await? { Ok(StatusCode::NO_CONTENT) } else { Err(missing(&tenant, &key)) }
}

pub(super) async fn list(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(tenant) = path.map_err(path_error)?;
    check_tenant(&node, &headers, &tenant)?;
    let keys: Vec<_> = node
        .state
        .list_global(&tenant)
        .await?
        .into_iter()
        .map(|(key, size)| json!({ "key": key, "size": size }))
        .collect();
    Ok(Json(json!({ "keys": keys })))
}
