//! Generators of hostile input, shared by the fuzz targets (`fuzz/`, on
//! nightly with libFuzzer) and by the proptests that drive them on stable
//! in `cargo test`. Each takes raw bytes as `arbitrary::Unstructured`, so
//! either engine can steer it.

use arbitrary::{Result, Unstructured};

/// A wasm binary for deploy: mostly valid modules from `wasm-smith` that
/// export `_start` (so they link as commands and can be called), some of
/// them with bytes flipped, some with giant memories or tables.
pub fn wasm_module(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut config: wasm_smith::Config = u.arbitrary()?;
    config.max_imports = 0;
    config.exports = Some(wat::parse_str(r#"(module (func (export "_start")))"#).expect("a fixed module parses"));
    config.max_memory32_bytes = 512 << 20;
    config.max_table_elements = 40_000;
    config.max_instructions = config.max_instructions.min(200);
    config.max_funcs = config.max_funcs.min(20);
    // Mostly within what a sandbox holds; the refusals past it are tested
    // on their own.
    config.max_tables = config.max_tables.min(1);
    config.max_memories = config.max_memories.min(2);
    // Proposals the node's engine does not enable would only be refused.
    config.threads_enabled = false;
    config.shared_everything_threads_enabled = false;
    config.gc_enabled = false;
    config.exceptions_enabled = false;
    config.custom_descriptors_enabled = false;
    let mut wasm = wasm_smith::Module::new(config, u)?.to_bytes();
    if u.ratio(1, 4)? {
        // Damage: the validator, not a panic, must answer.
        for _ in 0..u.int_in_range(1..=4)? {
            let at = u.choose_index(wasm.len())?;
            wasm[at] = u.arbitrary()?;
        }
    }
    Ok(wasm)
}

/// A script for the `state-ops` test guest: a few operations on keys of
/// any characters (but the space and newline the script uses) and any
/// length around the limits, with offsets and lengths at the edges.
pub fn state_script(u: &mut Unstructured<'_>) -> Result<String> {
    const OPS: &[&str] =
        &["get", "set", "del", "range", "setrange", "append", "incr", "push", "pull", "fill", "lock", "unlock", "bump"];
    let mut lines = Vec::new();
    for _ in 0..u.int_in_range(1..=6)? {
        let op = *u.choose(OPS)?;
        let key = word(u, 600)?;
        let line = match op {
            "range" => format!("{op} {key} {} {}", number(u)?, number(u)?),
            "setrange" => format!("{op} {key} {} {}", number(u)?, word(u, 64)?),
            "incr" => format!("{op} {key} {}", number(u)?),
            // The guest builds the value itself: a length it cannot
            // allocate would be its own panic, not the host's answer.
            "fill" => format!("{op} {key} {} {}", u.arbitrary::<u8>()?, u.int_in_range(0..=(2u32 << 20))?),
            "set" | "append" => format!("{op} {key} {}", word(u, 64)?),
            _ => format!("{op} {key}"),
        };
        lines.push(line);
    }
    Ok(lines.join("\n"))
}

/// A word of up to `max` characters without spaces or newlines (empty
/// words are kept: an empty key must be refused cleanly).
fn word(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let len = u.int_in_range(0..=max)?;
    let mut word = String::new();
    for _ in 0..len {
        let c = match u.int_in_range(0..=3)? {
            0 => char::from(u.int_in_range(b'a'..=b'z')?),
            1 => *u.choose(&['/', '.', '%', '\\', '0', '\0', '*', ':'])?,
            _ => u.arbitrary::<char>()?,
        };
        if c != ' ' && c != '\n' {
            word.push(c);
        }
    }
    Ok(word)
}

fn number(u: &mut Unstructured<'_>) -> Result<i64> {
    Ok(match u.int_in_range(0..=4)? {
        0 => *u.choose(&[0, 1, -1, i64::MAX, i64::MIN, 1 << 32, 1 << 40, 64 << 20])?,
        1 => u.arbitrary()?,
        _ => u.int_in_range(0..=4096)?,
    })
}

/// One HTTP request to the API, near its routes: real and hostile names,
/// query strings, tokens and bodies.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: &'static str,
    pub path_and_query: String,
    /// The bearer token to send, if any.
    pub token: Option<String>,
    pub body: Vec<u8>,
}

/// `tokens` are the credentials a request may carry (e.g. the admin's and
/// a tenant's); `tenants` and `functions` names that exist.
pub fn api_request(
    u: &mut Unstructured<'_>,
    tokens: &[&str],
    tenants: &[&str],
    functions: &[&str],
) -> Result<ApiRequest> {
    const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"];
    let method = *u.choose(METHODS)?;
    let tenant = segment(u, tenants)?;
    let name = segment(u, functions)?;
    let path = match u.int_in_range(0..=11)? {
        0 => "/v1/tenants".to_string(),
        1 => format!("/v1/functions/{tenant}"),
        2 => format!("/v1/functions/{tenant}/{name}"),
        3 | 4 => format!("/v1/functions/{tenant}/{name}/invoke"),
        5 => format!("/v1/functions/{tenant}/{name}/logs"),
        6 => format!("/v1/calls/{}", segment(u, &["0123456789abcdef"])?),
        7 => format!("/v1/state/{tenant}"),
        8 => format!("/v1/state/{tenant}/{name}/{}", segment(u, &["k"])?),
        9 => (*u.choose(&["/metrics", "/healthz", "/openapi.json", "/", "//", "/v1", "/v2/x"])?).to_string(),
        _ => format!("/{}", segment(u, &[])?),
    };
    let query = if u.ratio(1, 3)? {
        let mut pairs = Vec::new();
        for _ in 0..u.int_in_range(1..=3)? {
            let key = *u.choose(&["async", "timeout_ms", "memory_mb", "env", "token", "x"])?;
            let value = match u.int_in_range(0..=2)? {
                0 => (*u.choose(&["true", "false", "0", "1", "900000", "99999999999", "A=b", "=", "-1"])?).to_string(),
                _ => percent_encode(&word(u, 20)?),
            };
            pairs.push(format!("{key}={value}"));
        }
        format!("?{}", pairs.join("&"))
    } else {
        String::new()
    };
    let token = match u.int_in_range(0..=4)? {
        0 => None,
        1 => Some(word(u, 80)?.chars().filter(|c| c.is_ascii_graphic()).collect()),
        _ => Some((*u.choose(tokens)?).to_string()),
    };
    let body = match u.int_in_range(0..=3)? {
        0 => Vec::new(),
        1 => br#"{"name":"fuzzed"}"#.to_vec(),
        _ => {
            let len = u.int_in_range(0..=256)?;
            u.bytes(len)?.to_vec()
        }
    };
    Ok(ApiRequest { method, path_and_query: format!("{path}{query}"), token, body })
}

/// A path segment: a known name, or something hostile, percent-encoded
/// so that it is a valid request target.
fn segment(u: &mut Unstructured<'_>, known: &[&str]) -> Result<String> {
    if !known.is_empty() && u.ratio(2, 3)? {
        return Ok((*u.choose(known)?).to_string());
    }
    Ok(match u.int_in_range(0..=3)? {
        0 => (*u.choose(&["..", ".", "%2F", "%00", "", "A", "-x", LONG_NAME])?).to_string(),
        _ => percent_encode(&word(u, 40)?),
    })
}

/// One character past the longest valid name.
const LONG_NAME: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
