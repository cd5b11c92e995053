//! `fanout`: runs one function many times from inside Shoal, in parallel
//! or one after another, and reports how it went.
//!
//! Input: `[spawn|call] [N] [FUNCTION] [INPUT…]`, default `spawn 100 hello`.
//! `spawn` starts all N calls at once and awaits them; `call` makes them
//! one at a time. Output: `N/N ok`, or the first error.

use shoal_sdk::invoke;

struct Fanout;

impl shoal_sdk::Function for Fanout {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = String::from_utf8(input).map_err(|_| "input is not UTF-8".to_string())?;
        let mut words = text.trim().splitn(4, ' ').filter(|w| !w.is_empty());
        let mode = words.next().unwrap_or("spawn").to_string();
        let n: usize = match words.next() {
            Some(n) => n.parse().map_err(|_| format!("{n:?} is not a count"))?,
            None => 100,
        };
        let function = words.next().unwrap_or("hello").to_string();
        let child_input = words.next().unwrap_or("").as_bytes().to_vec();
        let mut ok = 0;
        let mut first_error = None;
        match mode.as_str() {
            "spawn" => {
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    match invoke::spawn(&function, &child_input) {
                        Ok(id) => ids.push(id),
                        Err(e) => {
                            first_error.get_or_insert(format!("spawn: {e:?}"));
                        }
                    }
                }
                for id in ids {
                    match invoke::await_(id) {
                        Ok(_) => ok += 1,
                        Err(e) => {
                            first_error.get_or_insert(format!("await: {e:?}"));
                        }
                    }
                }
            }
            "call" => {
                for _ in 0..n {
                    match invoke::call(&function, &child_input) {
                        Ok(_) => ok += 1,
                        Err(e) => {
                            first_error.get_or_insert(format!("call: {e:?}"));
                        }
                    }
                }
            }
            other => return Err(format!("mode {other:?}: use spawn or call")),
        }
        match first_error {
            None => Ok(format!("{ok}/{n} ok").into_bytes()),
            Some(e) => Err(format!("{ok}/{n} ok; first error: {e}")),
        }
    }
}

shoal_sdk::export!(Fanout);
