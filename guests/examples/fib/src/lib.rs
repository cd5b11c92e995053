//! `fib`: input a decimal `n` as text, output fib(n) as decimal text.
//!
//! Computed by naive recursion on purpose: it is the CPU-bound example.

struct Fib;

/// fib(93) is the largest that fits in a u64, and far beyond any timeout.
const MAX_N: u64 = 93;

fn fib(n: u64) -> u64 {
    if n < 2 { n } else { fib(n - 1) + fib(n - 2) }
}

impl shoal_sdk::Function for Fib {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(&input).map_err(|_| "input is not UTF-8".to_string())?;
        let n: u64 = text.trim().parse().map_err(|_| format!("input {text:?} is not a decimal number"))?;
        if n > MAX_N {
            return Err(format!("n = {n} is over the largest supported, {MAX_N}"));
        }
        Ok(fib(n).to_string().into_bytes())
    }
}

shoal_sdk::export!(Fib);
