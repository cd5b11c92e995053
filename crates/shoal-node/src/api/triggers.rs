//! Cron triggers (`triggers.rs`): `PUT /v1/triggers/{tenant}/{name}` sets
//! one (a JSON body: schedule, time zone, function, input, enabled), `GET`
//! reads it with its last and next run, `DELETE` removes it;
//! `GET /v1/triggers/{tenant}` lists the tenant's. The admin, or the
//! tenant with its token.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{path_error, read_body};
use crate::Node;
use crate::error::ApiError;
use crate::triggers::{MAX_TRIGGER_INPUT, TriggerSpec};

/// A body holds the input as JSON text (each byte at most six, escaped)
/// or base64, and the rest is small.
const MAX_BODY: usize = MAX_TRIGGER_INPUT * 6 + 4096;

fn authorise(node: &Node, headers: &HeaderMap, tenant: &str, name: Option<&str>) -> Result<(), ApiError> {
    super::authorise_own(node, headers, tenant, name.map(|name| ("trigger", name)))
}

pub(super) async fn put(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&name))?;
    let body = read_body(&node, body, &headers, MAX_BODY).await?;
    let spec: TriggerSpec =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("the body is not a trigger: {e}")))?;
    let (view, created) = node.put_trigger(&tenant, &name, spec).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(view)).into_response())
}

pub(super) async fn get(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&name))?;
    let view = node.triggers_of(&tenant, Some(&name)).await?.pop();
    let view = view.ok_or_else(|| ApiError::not_found(format!("tenant `{tenant}` has no trigger `{name}`")))?;
    Ok(Json(view).into_response())
}

pub(super) async fn delete(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&name))?;
    if node.remove_trigger(&tenant, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("tenant `{tenant}` has no trigger `{name}`")))
    }
}

pub(super) async fn list(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(tenant) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, None)?;
    if !node.registry.tenant_exists(&tenant) {
        return Err(ApiError::not_found(format!("tenant `{tenant}` does not exist")));
    }
    let triggers = node.triggers_of(&tenant, None).await?;
    Ok(Json(serde_json::json!({ "triggers": triggers })).into_response())
}
