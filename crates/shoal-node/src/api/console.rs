//! `/console`: the web console, a page and its script and style, built
//! into the binary (no build step, nothing fetched at run time). The
//! console holds no privilege of its own: it signs in with a token the
//! user pastes (kept in the tab's session storage, sent as the
//! `Authorization` header) and does everything through the same API and
//! checks as the CLI.
//!
//! Every answer here carries a Content-Security-Policy that allows only
//! this origin's script and style, no inline script, no framing, and
//! connections only back to this origin: output and log lines are put on
//! the page as text, and even a mistake there could not run a script.

use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                      img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const PAGE: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/app.js");
const STYLE: &str = include_str!("../../console/app.css");

fn serve(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(HeaderName::from_static("x-frame-options"), HeaderValue::from_static("DENY"));
    // The assets change with the binary: a browser asks again each time.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub(super) async fn page() -> Response {
    serve(PAGE, "text/html; charset=utf-8")
}

pub(super) async fn asset(Path(asset): Path<String>) -> Result<Response, ApiError> {
    match asset.as_str() {
        "app.js" => Ok(serve(SCRIPT, "text/javascript; charset=utf-8")),
        "app.css" => Ok(serve(STYLE, "text/css; charset=utf-8")),
        _ => Err(ApiError::not_found("no such console asset")),
    }
}
