//! `counter`: adds the decimal input (default 1) to the key `counter` with
//! the atomic `incr` of the global tier, and returns the new value.

struct Counter;

impl shoal_sdk::Function for Counter {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(&input).map_err(|_| "input is not UTF-8".to_string())?.trim();
        let delta: i64 = if text.is_empty() {
            1
        } else {
            text.parse().map_err(|_| format!("input {text:?} is not a decimal integer"))?
        };
        let value = shoal_sdk::state::incr("counter", delta).map_err(|e| format!("incr failed: {e:?}"))?;
        Ok(value.to_string().into_bytes())
    }
}

shoal_sdk::export!(Counter);
