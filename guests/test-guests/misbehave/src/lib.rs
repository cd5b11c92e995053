//! A component that misbehaves on request, for the host's tests. The input
//! names what to do; each arm is one way a guest can go wrong.

use std::hint::black_box;

struct Misbehave;

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth; 16]);
    recurse(black_box(depth + 1)) + frame[3]
}

impl shoal_sdk::Function for Misbehave {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        match input.as_slice() {
            b"panic" => panic!("guest panicked on purpose"),
            b"loop" => loop {
                black_box(());
            },
            b"oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    black_box(&hoard);
                }
            }
            b"recurse" => Ok(recurse(0).to_string().into_bytes()),
            b"read-passwd" => match std::fs::read("../../etc/passwd") {
                Ok(bytes) => Ok(bytes),
                Err(e) => Err(format!("open failed: {e}")),
            },
            b"list-root" => match std::fs::read_dir("/") {
                Ok(dir) => Ok(format!("{} entries", dir.count()).into_bytes()),
                Err(e) => Err(format!("read_dir failed: {e}")),
            },
            b"connect" => match std::net::TcpStream::connect("127.0.0.1:1") {
                Ok(_) => Ok(b"connected".to_vec()),
                Err(e) => Err(format!("connect failed: {e}")),
            },
            b"env" => {
                let mut vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                vars.sort();
                Ok(vars.join("\n").into_bytes())
            }
            b"log" => {
                println!("to stdout");
                eprintln!("to stderr");
                Ok(b"logged".to_vec())
            }
            b"state" => match shoal_sdk::state::get("k") {
                Ok(_) => Ok(b"state answered".to_vec()),
                Err(e) => Err(format!("state: {e}")),
            },
            b"invoke" => match shoal_sdk::invoke::call("echo", b"x") {
                Ok(_) => Ok(b"invoke answered".to_vec()),
                Err(e) => Err(format!("invoke: {e}")),
            },
            b"sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(b"woke up".to_vec())
            }
            b"error" => Err("failed on purpose".to_string()),
            // `print N`: N lines to stdout, one write each.
            other if other.starts_with(b"print ") => {
                let n: u64 = std::str::from_utf8(&other[6..]).ok().and_then(|n| n.parse().ok()).unwrap_or(0);
                for i in 0..n {
                    println!("line {i}");
                }
                Ok(format!("printed {n}").into_bytes())
            }
            other => {
                // Remember the input in a static: a fresh instance per call
                // means the next call must never see it.
                static mut LAST: Vec<u8> = Vec::new();
                #[allow(static_mut_refs)]
                // SAFETY: a component instance is single-threaded.
                let previous = unsafe { std::mem::replace(&mut LAST, other.to_vec()) };
                Ok(previous)
            }
        }
    }
}

shoal_sdk::export!(Misbehave);
