//! Guest artifacts as bytes: the example functions and the test guests from
//! `guests/`, compiled by this crate's build script, and modules generated
//! on demand for load (e.g. [`slow_to_compile`]). It only makes bytes; it
//! never runs or inspects them.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// A core command module that takes long to compile: `n_functions`
/// functions with real bodies, its code unlike any other's (`tag`).
pub fn slow_to_compile(tag: u64, n_functions: usize) -> Vec<u8> {
    let mut text = String::from("(module (memory 1)");
    for i in 0..n_functions {
        text.push_str(&format!(
            "(func (param i32) (result i32) (local.get 0) (i32.const {i}) (i32.add) (i32.const {tag}) (i32.mul) \
             (i32.load (i32.const 0)) (i32.xor) (i32.const 7) (i32.rotl))"
        ));
    }
    text.push_str(r#"(func (export "_start")))"#);
    wat::parse_str(&text).expect("the module's text is valid")
}
