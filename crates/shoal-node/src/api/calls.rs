//! `GET /v1/calls/{id}`: the record of an asynchronous call — status,
//! timings, error, output. A tenant sees only its own calls; any other id
//! is the same 404 as an unknown one.
//! `GET /v1/calls?tenant=&status=&limit=`: a tenant's recent asynchronous
//! calls (records without outputs), newest first.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use base64::Engine as _;
use serde_json::json;

use super::path_error;
use crate::Node;
use crate::auth::Caller;
use crate::calls::{CallRecord, CallStatus};
use crate::error::ApiError;
use crate::names::check_name;

/// The most records one listing answers with (and its default).
const MAX_LIST: usize = 1000;
const DEFAULT_LIST: usize = 50;

/// A call's record as clients see it (without its output).
fn view(record: &CallRecord) -> serde_json::Value {
    // The record names the version it runs (`name@N`).
    let (name, version) = match record.function.split_once('@') {
        Some((name, version)) => (name, version.parse::<u32>().ok()),
        None => (record.function.as_str(), None),
    };
    let mut view = json!({
        "call_id": record.call_id,
        "function": format!("{}/{name}", record.tenant),
        "version": version,
        "status": record.status,
        "attempts": record.attempts,
        "timings": {
            "queued_at_ms": record.queued_at_ms,
            "started_at_ms": record.started_at_ms,
            "finished_at_ms": record.finished_at_ms,
        },
        "error": record.error,
    });
    if let Some(trigger) = &record.trigger {
        view["trigger"] = json!({ "name": trigger.name, "tick_ms": trigger.tick_ms });
    }
    view
}

pub(super) async fn list(
    State(node): State<Arc<Node>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = node.authenticate(&headers)?;
    let (mut tenant, mut status, mut limit) = (None, None, DEFAULT_LIST);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "tenant" => {
                check_name("tenant", &value)?;
                tenant = Some(value.into_owned());
            }
            "status" => {
                status = Some(CallStatus::parse(&value).ok_or_else(|| {
                    ApiError::bad_request(format!("status={value:?} is not queued, running, succeeded or failed"))
                })?);
            }
            "limit" => {
                limit = value.parse().ok().filter(|n| (1..=MAX_LIST).contains(n)).ok_or_else(|| {
                    ApiError::bad_request(format!("limit={value:?} is not a whole number from 1 to {MAX_LIST}"))
                })?;
            }
            other => return Err(ApiError::bad_request(format!("unknown query parameter {other:?}"))),
        }
    }
    let tenant = match (tenant, &caller) {
        (Some(tenant), _) => tenant,
        (None, Caller::Tenant(own)) => own.clone(),
        (None, Caller::Admin) => return Err(ApiError::bad_request("the admin names the tenant: ?tenant=NAME")),
    };
    caller.check_tenant(&tenant)?;
    let records = node.async_calls.list(&tenant, status, limit).await?;
    Ok(Json(json!({ "calls": records.iter().map(view).collect::<Vec<_>>() })))
}

fn looks_like_a_call_id(id: &str) -> bool {
    id.len() <= 64 && !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(super) async fn get(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = path.map_err(path_error)?;
    let caller = node.authenticate(&headers)?;
    let not_found = || ApiError::not_found(format!("call `{id}` does not exist (or its record has expired)"));
    if !looks_like_a_call_id(&id) {
        return Err(not_found());
    }
    let Some((record, output)) = node.async_calls.get(&id).await? else { return Err(not_found()) };
    if caller.check_tenant(&record.tenant).is_err() {
        return Err(not_found());
    }
    let text = output.as_deref().and_then(|o| std::str::from_utf8(o).ok());
    let mut view = view(&record);
    view["output"] = text.into();
    view["output_base64"] = output.as_deref().map(|o| base64::engine::general_purpose::STANDARD.encode(o)).into();
    Ok(Json(view))
}
