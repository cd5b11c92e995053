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

pub use bindings::shoal::function::types::Error;
pub use bindings::shoal::function::{invoke, state};

/// A Shoal function: bytes in, bytes out, or an error message.
pub trait Function {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String>;
}

/// Export a type implementing [`Function`] as this component's handler.
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
}
