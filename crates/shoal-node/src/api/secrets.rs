//! `PUT /v1/tenants/{tenant}/secrets/{name}`: set a secret (the body, UTF-8
//! text) — the admin, or the tenant with its token. Write-only: no route
//! returns a value. `DELETE` removes one; `GET /v1/tenants/{tenant}/secrets`
//! lists their names, when each was set, and the functions naming each.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};

use super::{path_error, read_body};
use crate::Node;
use crate::error::ApiError;
use crate::names::check_name;
use crate::secrets::{MAX_SECRET_BYTES, check_secret_name};

fn authorise(node: &Node, headers: &HeaderMap, tenant: &str) -> Result<(), ApiError> {
    node.authenticate(headers)?.check_tenant(tenant)?;
    check_name("tenant", tenant)
}

pub(super) async fn put(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant)?;
    check_secret_name(&name)?;
    let value = read_body(&node, body, &headers, MAX_SECRET_BYTES).await?;
    node.set_secret(&tenant, &name, &value).await?;
    // Never the value, in any log.
    tracing::info!(%tenant, secret = %name, "secret set");
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn delete(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant)?;
    if node.remove_secret(&tenant, &name).await? {
        tracing::info!(%tenant, secret = %name, "secret removed");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("tenant `{tenant}` has no secret {name}")))
    }
}

pub(super) async fn list(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(tenant) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant)?;
    let secrets =
        node.secrets_of(&tenant).ok_or_else(|| ApiError::not_found(format!("tenant `{tenant}` does not exist")))?;
    let functions = node.registry.list(&tenant);
    let listed: Vec<_> = secrets
        .into_iter()
        .map(|(name, updated_ms)| {
            let used_by: Vec<&str> =
                functions.iter().filter(|f| f.secrets.contains(&name)).map(|f| f.name.as_str()).collect();
            serde_json::json!({ "name": name, "updated_ms": updated_ms, "used_by": used_by })
        })
        .collect();
    Ok(Json(serde_json::json!({ "secrets": listed })))
}
