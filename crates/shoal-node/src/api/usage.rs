//! `GET /v1/tenants/{tenant}/usage`: what a tenant's calls used, in buckets
//! of time (`usage.rs`) — the admin, or the tenant with its own token.
//! `from` and `to` are Unix seconds (default: the last hour), `step` the
//! bucket in seconds (a multiple of 60, default 60), `function` one
//! function, `by=function` a row per function; `format=csv` (or `Accept:
//! text/csv`) answers CSV instead of JSON.

use std::fmt::Write;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::path_error;
use crate::Node;
use crate::error::ApiError;
use crate::names::check_name;
use crate::usage::{Bucket, Query};

/// The most buckets one answer may have.
const MAX_BUCKETS: u64 = 10_000;

pub(super) async fn get(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(tenant) = path.map_err(path_error)?;
    node.authenticate(&headers)?.check_tenant(&tenant)?;
    check_name("tenant", &tenant)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (mut from, mut to, mut step) = (None, None, 60u64);
    let (mut function, mut by_function) = (None, false);
    let mut csv = headers.get(ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/csv"));
    let seconds = |name: &str, value: &str| {
        value.parse::<u64>().map_err(|_| ApiError::bad_request(format!("{name}={value:?} is not Unix seconds")))
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "from" => from = Some(seconds("from", &value)?),
            "to" => to = Some(seconds("to", &value)?),
            "step" => {
                step = value.parse().ok().filter(|s| *s >= 60 && s % 60 == 0).ok_or_else(|| {
                    ApiError::bad_request(format!("step={value:?} is not a whole number of minutes, in seconds"))
                })?;
            }
            "function" => {
                check_name("function", &value)?;
                function = Some(value.into_owned());
            }
            "by" => match value.as_ref() {
                "function" => by_function = true,
                "tenant" => by_function = false,
                _ => return Err(ApiError::bad_request(format!("by={value:?} is not function or tenant"))),
            },
            "format" => match value.as_ref() {
                "csv" => csv = true,
                "json" => csv = false,
                _ => return Err(ApiError::bad_request(format!("format={value:?} is not json or csv"))),
            },
            other => return Err(ApiError::bad_request(format!("unknown query parameter {other:?}"))),
        }
    }
    let to = to.unwrap_or(now);
    let from = from.unwrap_or(to.saturating_sub(3600));
    if from >= to {
        return Err(ApiError::bad_request(format!("from={from} is not before to={to}")));
    }
    // Whole minutes: `from` rounded down, `to` up.
    // (Minutes are stored as ten digits: up to the year 20989.)
    let (from_min, to_min) = (from / 60, to.div_ceil(60).min(9_999_999_999));
    if from_min >= to_min {
        return Err(ApiError::bad_request(format!("from={from} is past the last minute kept")));
    }
    let step_min = step / 60;
    if (to_min - from_min).div_ceil(step_min) > MAX_BUCKETS {
        return Err(ApiError::bad_request(format!("at most {MAX_BUCKETS} buckets: widen step or narrow from..to")));
    }
    let query = Query { tenant: tenant.clone(), from: from_min, to: to_min, step: step_min, function, by_function };
    let buckets = node.usage(query).await.map_err(|e| ApiError::internal("reading usage", e))?;
    if csv {
        let mut text = String::from(
            "start,function,calls,ok,errors,wall_us,cpu_us,memory_mib_ms,queued_us,outbound_requests,outbound_bytes,spawned,state_read_bytes,state_written_bytes,state_stored_bytes\n",
        );
        for Bucket { start, function, usage } in &buckets {
            let ok = usage.outcomes.get("ok").copied().unwrap_or(0);
            let _ = writeln!(
                text,
                "{},{},{},{ok},{},{},{},{},{},{},{},{},{},{},{}",
                start * 60,
                function.as_deref().unwrap_or(""),
                usage.calls,
                usage.calls - ok,
                usage.wall_us,
                usage.cpu_us,
                usage.memory_mib_ms,
                usage.queued_us,
                usage.outbound_requests,
                usage.outbound_bytes,
                usage.spawned,
                usage.state_read_bytes,
                usage.state_written_bytes,
                usage.state_stored_bytes
            );
        }
        let mut response = text.into_response();
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
        return Ok(response);
    }
    let rows: Vec<serde_json::Value> = buckets
        .into_iter()
        .map(|Bucket { start, function, usage }| {
            let mut row = serde_json::to_value(&usage).expect("usage encodes");
            row["start"] = (start * 60).into();
            if let Some(function) = function {
                row["function"] = function.into();
            }
            row
        })
        .collect();
    let body = serde_json::json!({
        "tenant": tenant,
        "from": from_min * 60,
        "to": to_min * 60,
        "step": step,
        "buckets": rows,
    });
    Ok(Json(body).into_response())
}
