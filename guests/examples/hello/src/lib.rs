//! `hello`: answers `hello <input>`.

struct Hello;

impl shoal_sdk::Function for Hello {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok([b"hello ".as_slice(), &input].concat())
    }
}

shoal_sdk::export!(Hello);
