//! The Rust SDK for Shoal functions.
//!
//! A function is a type implementing [`Function`], exported with
//! [`export!`]; build the crate as a `cdylib` for `wasm32-wasip2` and the
//! result is a component Shoal can deploy:
//!
//! ```ignore
//! struct Hello;
//! impl shoal_sdk::Function for Hello {
//!     fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
//!         Ok([b"hello ", &input[..]].concat())
//!     }
//! }
//! shoal_sdk::export!(Hello);
//! ```
//!
//! A function with an initialiser implements [`Function::init`] and is
//! exported with `shoal_sdk::export!(Type, init)`; deployed with a snapshot,
//! `init` runs once and every call starts from what it built.
//!
//! The host interfaces are re-exported as [`state`] and [`invoke`]; this
//! module never hides what a host call can fail with ([`Error`]).

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "function",
        pub_export_macro: true,
        export_macro_name: "__export_function_world",
        default_bindings_module: "shoal_sdk::bindings",
    });
}

/// The initialiser of world `function-with-init` (wit/shoal.wit), on its
/// own: exported beside `bindings`' handler, the component's exports are
/// that world's.
#[doc(hidden)]
pub mod bindings_init {
    wit_bindgen::generate!({
        inline: "package shoal:sdk-init;\nworld init { export init: func(); }\n",
        world: "init",
        pub_export_macro: true,
        export_macro_name: "__export_init_world",
        default_bindings_module: "shoal_sdk::bindings_init",
    });
}

pub use bindings::shoal::function::types::Error;
pub use bindings::shoal::function::{invoke, queue, state};

/// A Shoal function: bytes in, bytes out, or an error message.
pub trait Function {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String>;

    /// The initialiser, exported by `export!(Type, init)`: deployed with
    /// `snapshot=true` (`shoal deploy --snapshot`), it runs once, at
    /// deploy, and every call starts from the memory it leaves (tables
    /// built, configuration parsed). It reaches no state and calls no
    /// function. Deployed without a snapshot it never runs, so `handle`
    /// must not depend on it having run (build lazily, e.g. a `OnceLock`
    /// that `init` fills first).
    fn init() {}
}

/// Export a type implementing [`Function`] as this component's handler;
/// `export!(Type, init)` exports its [`Function::init`] too.
#[macro_export]
macro_rules! export {
    ($ty:ident) => {
        impl $crate::bindings::exports::shoal::function::handler::Guest for $ty {
            fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
                <$ty as $crate::Function>::handle(input)
            }
        }
        $crate::bindings::__export_function_world!($ty with_types_in $crate::bindings);
    };
    ($ty:ident, init) => {
        $crate::export!($ty);
        impl $crate::bindings_init::Guest for $ty {
            fn init() {
                <$ty as $crate::Function>::init()
            }
        }
        $crate::bindings_init::__export_init_world!($ty with_types_in $crate::bindings_init);
    };
}
