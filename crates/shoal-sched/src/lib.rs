//! Shoal's scheduling.
//!
//! For now: the [`Executor`], which runs calls on the runtime and refuses
//! one at once when every sandbox slot is taken, so callers get a clear
//! `overloaded` instead of waiting in an unbounded line. Per-tenant fair
//! queues and deadline-aware admission build on it.
//!
//! This crate never speaks HTTP and never compiles wasm.

mod executor;
mod policy;

pub use executor::{Executor, Overloaded, Slot};
pub use policy::{Admission, CallTicket, Decision, Policy, PolicyConfig};
