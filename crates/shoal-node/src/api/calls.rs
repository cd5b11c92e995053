//! `GET /v1/calls/{id}`: the record of an asynchronous call — status,
//! timings, error, output. A tenant sees only its own calls; any other id
//! is the same 404 as an unknown one.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use base64::Engine as _;
use serde_json::json;

use super::path_error;
use crate::Node;
use crate::error::ApiError;

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
    Ok(Json(json!({
        "call_id": record.call_id,
        "function": format!("{}/{}", record.tenant, record.function),
        "status": record.status,
        "attempts": record.attempts,
        "timings": {
            "queued_at_ms": record.queued_at_ms,
            "started_at_ms": record.started_at_ms,
            "finished_at_ms": record.finished_at_ms,
        },
        "error": record.error,
        "output": text,
        "output_base64": output.as_deref().map(|o| base64::engine::general_purpose::STANDARD.encode(o)),
    })))
}
