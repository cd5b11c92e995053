//! The one mapping from failures to HTTP: every error a client sees is
//! `{"error":{"kind":…,"message":…}}` with the status of its kind. Internal
//! details (paths, host errors) are logged, not sent.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use shoal_runtime::{CallError, DeployError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    TooLarge,
    LimitExceeded,
    UriTooLong,
    RequestTimeout,
    InvalidWasm,
    InvalidSource,
    Overloaded,
    Trap,
    FunctionError,
    OutOfMemory,
    Timeout,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict => "conflict",
            Self::TooLarge => "too_large",
            Self::LimitExceeded => "limit_exceeded",
            Self::UriTooLong => "uri_too_long",
            Self::RequestTimeout => "request_timeout",
            Self::InvalidWasm => "invalid_wasm",
            Self::InvalidSource => "invalid_source",
            Self::Overloaded => "overloaded",
            Self::Trap => "trap",
            Self::FunctionError => "function_error",
            Self::OutOfMemory => "out_of_memory",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict => StatusCode::CONFLICT,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::LimitExceeded => StatusCode::INSUFFICIENT_STORAGE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::InvalidWasm | Self::InvalidSource => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Trap | Self::FunctionError | Self::OutOfMemory | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// A failure inside the node: logged in full, reported without details.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        Self::new(ErrorKind::Internal, format!("internal error while {context}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "kind": self.kind.as_str(), "message": self.message } });
        let mut response = (self.kind.status(), axum::Json(body)).into_response();
        if let Some(retry_after) = self.retry_after {
            let secs = retry_after.as_secs().max(1);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        match e {
            DeployError::InvalidWasm(message) => Self::new(ErrorKind::InvalidWasm, message),
            DeployError::InvalidSource(message) => Self::new(ErrorKind::InvalidSource, message),
            DeployError::Unsupported(message) => Self::bad_request(message),
            DeployError::TooLarge { .. } => Self::new(ErrorKind::TooLarge, e.to_string()),
            DeployError::CompileTimeout { .. } => {
                Self { kind: ErrorKind::Timeout, message: e.to_string(), retry_after: Some(Duration::from_secs(30)) }
            }
            DeployError::Internal(message) => Self::internal("compiling", message),
        }
    }
}

impl ErrorKind {
    /// The kind of a failed call.
    pub fn of_call(e: &CallError) -> Self {
        match e {
            CallError::Trap { .. } => Self::Trap,
            CallError::Timeout { .. } => Self::Timeout,
            CallError::OutOfMemory { .. } => Self::OutOfMemory,
            CallError::Function { .. } => Self::FunctionError,
            CallError::OutputTooLarge { .. } => Self::TooLarge,
            CallError::Overloaded { .. } => Self::Overloaded,
            CallError::Internal(_) => Self::Internal,
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match ErrorKind::of_call(&e) {
            ErrorKind::Overloaded => {
                Self { kind: ErrorKind::Overloaded, message: e.to_string(), retry_after: Some(Duration::from_secs(1)) }
            }
            ErrorKind::Internal => Self::internal("running a call", &e),
            kind => Self::new(kind, e.to_string()),
        }
    }
}

impl From<shoal_sched::Overloaded> for ApiError {
    fn from(e: shoal_sched::Overloaded) -> Self {
        Self { kind: ErrorKind::Overloaded, message: e.to_string(), retry_after: Some(e.retry_after) }
    }
}

impl From<shoal_state::StoreError> for ApiError {
    fn from(e: shoal_state::StoreError) -> Self {
        Self::internal("using the embedded store", e)
    }
}

impl From<shoal_state::StateError> for ApiError {
    fn from(e: shoal_state::StateError) -> Self {
        use shoal_state::StateError;
        match e {
            StateError::InvalidKey(m) | StateError::NotAnInteger(m) => Self::bad_request(m),
            StateError::TooLarge(m) => Self::new(ErrorKind::TooLarge, m),
            StateError::LimitExceeded(m) => Self::new(ErrorKind::LimitExceeded, m),
            StateError::Unavailable(m) => Self::new(ErrorKind::Unavailable, m),
            StateError::Store(e) => Self::internal("using the state store", e),
        }
    }
}

impl From<shoal_cluster::ClusterError> for ApiError {
    fn from(e: shoal_cluster::ClusterError) -> Self {
        // Redis is down or slow: the cluster cannot take this now.
        Self {
            kind: ErrorKind::Unavailable,
            message: format!("the cluster: {e}"),
            retry_after: Some(Duration::from_secs(1)),
        }
    }
}

impl From<crate::registry::RegistryError> for ApiError {
    fn from(e: crate::registry::RegistryError) -> Self {
        match e {
            crate::registry::RegistryError::Store(e) => e.into(),
            crate::registry::RegistryError::Cluster(e) => e.into(),
        }
    }
}

impl From<crate::calls::RecordError> for ApiError {
    fn from(e: crate::calls::RecordError) -> Self {
        match e {
            crate::calls::RecordError::Store(e) => e.into(),
            crate::calls::RecordError::Cluster(e) => e.into(),
            crate::calls::RecordError::Registry(e) => e.into(),
        }
    }
}
