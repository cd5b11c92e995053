//! Drives the `invoke` interface for host tests. The input's first word
//! picks what to do:
//! - `call NAME REST` / `spawn NAME REST`: call (or spawn and await) NAME
//!   with input REST, return its output;
//! - `spawn-all N NAME REST`: spawn N calls, await them all, return how
//!   many succeeded and the first error;
//! - `deep N`: call itself with `deep N+1` until refused; returns the
//!   deepest N reached;
//! - `bomb`: spawn itself twice with `bomb` and await both, forever;
//! - `forget NAME REST`: spawn NAME and return without awaiting;
//! - `await ID`: await a call id that was never spawned;
//! - `sleep MS`: sleep, then return `slept`.

use shoal_sdk::invoke;

struct Chain;

fn show(e: shoal_sdk::Error) -> String {
    format!("{e:?}")
}

fn handle(text: &str) -> Result<Vec<u8>, String> {
    let mut words = text.splitn(2, ' ');
    let op = words.next().unwrap_or_default();
    let rest = words.next().unwrap_or_default();
    let split = |s: &str| {
        let mut parts = s.splitn(2, ' ');
        (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string())
    };
    match op {
        "call" => {
            let (name, input) = split(rest);
            invoke::call(&name, input.as_bytes()).map_err(show)
        }
        "spawn" => {
            let (name, input) = split(rest);
            let id = invoke::spawn(&name, input.as_bytes()).map_err(show)?;
            invoke::await_(id).map_err(show)
        }
        "spawn-all" => {
            let (n, rest) = split(rest);
            let n: usize = n.parse().map_err(|_| "spawn-all N NAME INPUT")?;
            let (name, input) = split(&rest);
            let mut ids = Vec::new();
            let mut first_error = None;
            for _ in 0..n {
                match invoke::spawn(&name, input.as_bytes()) {
                    Ok(id) => ids.push(id),
                    Err(e) => {
                        first_error.get_or_insert(show(e));
                    }
                }
            }
            let mut ok = 0;
            for id in ids {
                match invoke::await_(id) {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        first_error.get_or_insert(show(e));
                    }
                }
            }
            Ok(format!("{ok} ok; first error: {}", first_error.unwrap_or_else(|| "none".into())).into_bytes())
        }
        "deep" => {
            let n: u32 = rest.parse().map_err(|_| "deep N")?;
            match invoke::call("chain", format!("deep {}", n + 1).as_bytes()) {
                Ok(deepest) => Ok(deepest),
                Err(shoal_sdk::Error::LimitExceeded) => Ok(n.to_string().into_bytes()),
                Err(e) => Err(show(e)),
            }
        }
        "bomb" => {
            let a = invoke::spawn("chain", b"bomb").map_err(show)?;
            let b = invoke::spawn("chain", b"bomb").map_err(show)?;
            invoke::await_(a).map_err(show)?;
            invoke::await_(b).map_err(show)
        }
        "forget" => {
            let (name, input) = split(rest);
            invoke::spawn(&name, input.as_bytes()).map_err(show)?;
            Ok(b"forgotten".to_vec())
        }
        "await" => invoke::await_(rest.parse().map_err(|_| "await ID")?).map_err(show),
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_millis(rest.parse().map_err(|_| "sleep MS")?));
            Ok(b"slept".to_vec())
        }
        other => Err(format!("unknown op {other:?}")),
    }
}

impl shoal_sdk::Function for Chain {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        handle(std::str::from_utf8(&input).map_err(|_| "input is not UTF-8")?)
    }
}

shoal_sdk::export!(Chain);
