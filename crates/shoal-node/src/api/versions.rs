//! A function's versions and aliases: `GET /v1/functions/{tenant}/{name}/versions`
//! lists the versions kept (newest first) with the aliases routing to
//! each; `PUT /v1/functions/{tenant}/{name}/aliases/{alias}` points an
//! alias at one version (`{"version": N}`) or splits its calls between two
//! by weight (`{"versions": [{"version": N, "weight": W}, …]}`);
//! `DELETE` removes one; `GET …/aliases` lists them. The admin, or the
//! tenant with its token (another tenant gets the 404 of a missing
//! function).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::json;
use shoal_cluster::AliasChange;

use super::{path_error, read_body};
use crate::Node;
use crate::error::{ApiError, ErrorKind};
use crate::names::check_name;
use crate::registry::{AliasTarget, Aliases, Route};

/// The most a weight may be (weights are relative: 90 and 10 are 90%).
const MAX_WEIGHT: u32 = 1_000_000;

fn authorise(node: &Node, headers: &HeaderMap, tenant: &str, name: &str) -> Result<(), ApiError> {
    let missing = || ApiError::not_found(format!("function `{tenant}/{name}` does not exist"));
    let checked = node
        .authenticate(headers)
        .and_then(|caller| caller.check_tenant(tenant))
        .and_then(|()| check_name("tenant", tenant))
        .and_then(|()| check_name("function", name));
    match checked {
        Err(e) if e.kind == ErrorKind::Forbidden => return Err(missing()),
        other => other?,
    }
    if node.registry.get(tenant, name).is_none() {
        return Err(missing());
    }
    Ok(())
}

fn check_alias(alias: &str) -> Result<(), ApiError> {
    check_name("alias", alias)?;
    if alias.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_request(format!("alias {alias:?} is a number: `NAME@N` names version N")));
    }
    Ok(())
}

fn aliases_json(aliases: &Aliases) -> serde_json::Value {
    serde_json::to_value(aliases).unwrap_or_default()
}

pub(super) async fn list_versions(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, &name)?;
    let aliases = node.registry.aliases_of(&tenant, &name);
    let mut versions = node.registry.versions_of(&tenant, &name);
    if versions.is_empty() {
        // Deployed before versions existed: it is version 1.
        versions.extend(node.registry.get(&tenant, &name).map(|f| f.record.clone()));
    }
    let newest = versions.first().map_or(0, |r| r.version.max(1));
    let listed: Vec<serde_json::Value> = versions
        .iter()
        .map(|record| {
            let version = record.version.max(1);
            let mut routed: Vec<&str> =
                aliases.iter().filter(|(_, t)| t.names(version)).map(|(alias, _)| alias.as_str()).collect();
            if version == newest && !aliases.contains_key(crate::registry::LATEST) {
                routed.push(crate::registry::LATEST);
            }
            let mut described = super::functions::description(&node, record);
            described["aliases"] = json!(routed);
            described
        })
        .collect();
    Ok(Json(json!({ "versions": listed, "aliases": aliases_json(&aliases) })))
}

pub(super) async fn list_aliases(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path((tenant, name)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, &name)?;
    Ok(Json(json!({ "aliases": aliases_json(&node.registry.aliases_of(&tenant, &name)) })))
}

/// `{"version": N}` or `{"versions": [{"version": N, "weight": W}, …]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AliasSpec {
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    versions: Option<Vec<Route>>,
}

impl AliasSpec {
    fn target(self) -> Result<AliasTarget, ApiError> {
        let routes = match (self.version, self.versions) {
            (Some(version), None) => vec![Route { version, weight: 1 }],
            (None, Some(routes)) => routes,
            _ => return Err(ApiError::bad_request("give `version`, or `versions` with their weights, not both")),
        };
        match routes.as_slice() {
            [_] | [_, _] => {}
            _ => return Err(ApiError::bad_request("an alias routes to one version, or splits between two")),
        }
        if routes.iter().any(|r| r.version == 0) {
            return Err(ApiError::bad_request("versions start at 1"));
        }
        if let [a, b] = routes.as_slice() {
            if a.version == b.version {
                return Err(ApiError::bad_request("a split names two different versions"));
            }
            if [a, b].iter().any(|r| r.weight == 0 || r.weight > MAX_WEIGHT) {
                return Err(ApiError::bad_request(format!("each weight of a split is 1 to {MAX_WEIGHT}")));
            }
        }
        Ok(AliasTarget { versions: routes })
    }
}

pub(super) async fn put_alias(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path((tenant, name, alias)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, &name)?;
    check_alias(&alias)?;
    let body = read_body(&node, body, &headers, 4096).await?;
    let spec: AliasSpec =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("the body is not an alias: {e}")))?;
    let target = spec.target()?;
    match node.registry.set_alias(&tenant, &name, &alias, Some(target.clone())).await? {
        AliasChange::Done => {}
        AliasChange::NoSuchVersion(v) => {
            return Err(ApiError::not_found(format!("function `{tenant}/{name}` has no version {v} (kept)")));
        }
        AliasChange::TooMany => {
            return Err(ApiError::new(
                ErrorKind::LimitExceeded,
                format!(
                    "function `{tenant}/{name}` has {} aliases, its limit; remove one first",
                    crate::registry::MAX_ALIASES
                ),
            ));
        }
        AliasChange::NoSuchAlias => return Err(ApiError::internal("setting an alias", "refused as a removal")),
    }
    tracing::info!(%tenant, function = %name, %alias, "alias set");
    Ok(Json(json!({ "alias": alias, "versions": target.versions })))
}

pub(super) async fn delete_alias(
    State(node): State<Arc<Node>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Path((tenant, name, alias)) = path.map_err(path_error)?;
    authorise(&node, &headers, &tenant, &name)?;
    check_alias(&alias)?;
    match node.registry.set_alias(&tenant, &name, &alias, None).await? {
        AliasChange::Done => Ok(StatusCode::NO_CONTENT),
        _ => Err(ApiError::not_found(format!("function `{tenant}/{name}` has no alias `{alias}`"))),
    }
}
