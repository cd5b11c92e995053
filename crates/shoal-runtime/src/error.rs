//! The runtime's typed errors. A guest misbehaving is a [`CallError`], an
//! outcome of a call; it is never a host failure.

use std::time::Duration;

/// Setting up the runtime failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid runtime configuration: {0}")]
    Config(String),
    #[error("compiled-artifact cache at {path}: {source}")]
    Cache { path: String, source: std::io::Error },
}

/// Why wasm could not be deployed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    InvalidWasm(String),
    /// A function deployed as source: the upload is malformed, or loading
    /// it failed (a syntax error, a missing `handle`); the message says
    /// which, with the interpreter's traceback.
    #[error("{0}")]
    InvalidSource(String),
    /// The node has no runtime for the function's language.
    #[error("{0}")]
    Unsupported(String),
    #[error("module is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// Compiling (with the wait for the compile pool) took longer than the
    /// limit. The compile goes on in the background and its result is
    /// cached: the same deploy, retried later, uses it.
    #[error(
        "compiling took longer than {} s; it goes on in the background, and the same deploy retried later uses its result",
        limit.as_secs_f64()
    )]
    CompileTimeout { limit: std::time::Duration },
    #[error("internal error: {0}")]
    Internal(String),
}

/// How a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest trapped (including stack overflow).
    #[error("{message}")]
    Trap { message: String },
    /// The call ran past its deadline and was stopped.
    #[error("call exceeded its time limit of {} ms", limit.as_millis())]
    Timeout { limit: Duration },
    /// The guest needed more linear memory than its limit and trapped.
    #[error("call exceeded its memory limit of {limit} bytes")]
    OutOfMemory { limit: u64 },
    /// The guest returned an error, or a command exited non-zero.
    #[error("{message}")]
    Function { message: String },
    /// The guest's output is larger than the runtime returns.
    #[error("output is over the limit of {limit} bytes")]
    OutputTooLarge { limit: usize },
    /// Every sandbox slot is in use.
    #[error("all {limit} sandbox slots are busy")]
    Overloaded { limit: u32 },
    #[error("internal error: {0}")]
    Internal(String),
}
