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

/// `wasm` (a module or a component) with a custom section `shoal-bench`
/// holding `tag` appended: other bytes (another digest, compiled on its
/// own) that run exactly the same.
pub fn tagged(wasm: &[u8], tag: u32) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    const NAME: &[u8] = b"shoal-bench";
    let mut body = Vec::new();
    leb128(NAME.len(), &mut body);
    body.extend_from_slice(NAME);
    body.extend_from_slice(&tag.to_le_bytes());
    let mut out = wasm.to_vec();
    out.push(0); // the custom section's id
    leb128(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}
