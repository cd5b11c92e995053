//! `POST /v1/tenants`: the admin creates a tenant and gets its token, once.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;

use super::read_body;
use crate::Node;
use crate::error::{ApiError, ErrorKind};

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
