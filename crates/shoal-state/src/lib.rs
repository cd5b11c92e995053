//! Shoal's state.
//!
//! For now this crate holds the embedded durable store of a single node
//! ([`EmbeddedStore`]): named tables of byte values in one file in the data
//! directory, where an acknowledged write survives a crash. The node keeps
//! its function registry there; the global state tier will live beside it.
//!
//! This crate never interprets the bytes it stores.

mod embedded;

pub use embedded::{EmbeddedStore, StoreError, Table};
