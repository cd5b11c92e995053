//! `echo`: answers its input unchanged.

struct Echo;

impl shoal_sdk::Function for Echo {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(input)
    }
}

shoal_sdk::export!(Echo);
