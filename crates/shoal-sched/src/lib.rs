//! Shoal's scheduling.
//!
//! The [`Policy`] decides — admission on deadlines and the expected CPU
//! backlog, deficit round robin over per-tenant queues, per-tenant
//! concurrency — as pure functions of a state and a clock; the
//! [`Executor`] drives it: measures each function's CPU time per call,
//! parks queued calls until the policy names them, and runs them on the
//! runtime.
//!
//! This crate never speaks HTTP and never compiles wasm.

mod executor;
mod os;
mod policy;

pub use executor::{Admitted, Executor, Overloaded, SandboxLimits, TenantLimits};
pub use policy::{Admission, CallTicket, Decision, Origin, Policy, PolicyConfig};
