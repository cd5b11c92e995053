//! Queues (`queues.rs`): `PUT /v1/queues/{tenant}/{queue}` sets one (its
//! consumer function and delivery settings), `GET` reads it with what it
//! holds, `DELETE` removes it with its messages; `GET /v1/queues/{tenant}`
//! lists them; `POST …/messages` sends a batch; `GET …/dead` reads the
//! dead letters, `POST …/dead/redrive` sends them back, `DELETE …/dead`
//! purges them. The admin, or the tenant with its token.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::json;

use super::{path_error, read_body};
use crate::Node;
use crate::error::ApiError;
use crate::queues::QueueSpec;

fn authorise(node: &Node, headers: &HeaderMap, tenant: &str, name: Option<&str>) -> Result<(), ApiError> {
    super::authorise_own(node, headers, tenant, name.map(|name| ("queue", name)))
}

pub(super) async fn put(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((tenant, queue)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&queue))?;
    let body = read_body(&node, body, &headers, 4096).await?;
    let spec: QueueSpec =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("the body is not a queue: {e}")))?;
    let (view, created) = node.put_queue(&tenant, &queue, spec).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(view)).into_response())
}

pub(super) async fn get(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path((tenant, queue)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&queue))?;
    let found = node.queues_of(&tenant, Some(&queue)).await?.pop();
    Ok(Json(found.ok_or_else(|| ApiError::not_found(format!("tenant `{tenant}` has no queue `{queue}`")))?))
}

pub(super) async fn list(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(tenant) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, None)?;
    if !node.registry.tenant_exists(&tenant) {
        return Err(ApiError::not_found(format!("tenant `{tenant}` does not exist")));
    }
    Ok(Json(json!({ "queues": node.queues_of(&tenant, None).await? })))
}

pub(super) async fn delete(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Path((tenant, queue)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&queue))?;
    if node.remove_queue(&tenant, &queue).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("tenant `{tenant}` has no queue `{queue}`")))
    }
}

/// `{"messages": [{"body": "text"} or {"body_base64": "…"}, …]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Send {
    messages: Vec<Outgoing>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Outgoing {
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_base64: Option<String>,
}

pub(super) async fn send(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((tenant, queue)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&queue))?;
    let body = read_body(&node, body, &headers, node.config.max_body_bytes).await?;
    let sent: Send =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("the body is not a send: {e}")))?;
    let mut bodies = Vec::with_capacity(sent.messages.len());
    for message in sent.messages {
        bodies.push(match (message.body, message.body_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(encoded)) => BASE64
                .decode(encoded)
                .map_err(|e| ApiError::bad_request(format!("a message's body_base64 is not base64: {e}")))?,
            _ => return Err(ApiError::bad_request("each message has `body` or `body_base64`, not both")),
        });
    }
    let ids = node.send_messages(&tenant, &queue, bodies).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "ids": ids }))).into_response())
}

pub(super) async fn dead(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path((tenant, queue)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&queue))?;
    let mut limit = 100usize;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match (key.as_ref(), value.parse::<usize>()) {
            ("limit", Ok(n)) if (1..=1000).contains(&n) => limit = n,
            _ => return Err(ApiError::bad_request(format!("{key}={value:?}: only `limit` (1 to 1000) is taken"))),
        }
    }
    Ok(Json(json!({ "dead": node.dead_letters(&tenant, &queue, limit).await? })))
}

pub(super) async fn redrive(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path((tenant, queue)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&queue))?;
    Ok(Json(json!({ "redriven": node.settle_dead(&tenant, &queue, false).await? })))
}

pub(super) async fn purge(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path((tenant, queue)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, Some(&queue))?;
    Ok(Json(json!({ "purged": node.settle_dead(&tenant, &queue, true).await? })))
}
