//! `demo/notes`: a small JSON API kept in Shoal's state, served as an HTTP
//! function (a `wasi:http` handler).
//!
//! - `GET /` says what it offers;
//! - `PUT /notes/{name}` stores the body as note `name` (at most 4 KiB);
//! - `GET /notes/{name}` answers `{"name":…,"text":…}`, or 404;
//! - `DELETE /notes/{name}` removes it;
//! - `POST /visits` counts one more visit, atomically, and answers the
//!   count.

use std::io::Write as _;

use wasip2::http::types::{Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam};

mod host {
    wit_bindgen::generate!({
        path: "../../../wit",
        inline: "package shoal:examples;\nworld notes { import shoal:function/state@0.1.0; }\n",
        world: "shoal:examples/notes",
        generate_all,
    });
}

use host::shoal::function::state;

wasip2::http::proxy::export!(Notes);

struct Notes;

const MAX_NOTE: usize = 4096;

fn answer(out: ResponseOutparam, status: u16, json: &str) {
    let headers = Fields::new();
    headers.append("content-type", b"application/json").expect("a valid header");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("a valid status");
    let body = response.body().expect("the body, once");
    ResponseOutparam::set(out, Ok(response));
    {
        let mut stream = body.write().expect("the stream, once");
        let _ = stream.write_all(json.as_bytes());
        let _ = stream.write_all(b"\n");
        let _ = stream.flush();
    }
    let _ = OutgoingBody::finish(body, None);
}

/// `text` as a JSON string.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn error(out: ResponseOutparam, status: u16, message: &str) {
    answer(out, status, &format!("{{\"error\":{}}}", quoted(message)));
}

/// The request body, or None past `limit` bytes.
fn body_of(request: &IncomingRequest, limit: usize) -> Option<Vec<u8>> {
    let incoming = request.consume().ok()?;
    let mut stream = incoming.stream().ok()?;
    let mut body = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match std::io::Read::read(&mut stream, &mut chunk) {
            Ok(0) => return Some(body),
            Ok(n) if body.len() + n <= limit => body.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl wasip2::exports::http::incoming_handler::Guest for Notes {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_default();
        let path = target.split('?').next().unwrap_or("/");
        let method = request.method();
        match (method, path) {
            (Method::Get, "/") => answer(
                out,
                200,
                r#"{"routes":["PUT /notes/{name}","GET /notes/{name}","DELETE /notes/{name}","POST /visits"]}"#,
            ),
            (Method::Post, "/visits") => match state::incr("visits", 1) {
                Ok(n) => answer(out, 200, &format!("{{\"visits\":{n}}}")),
                Err(e) => error(out, 503, &format!("state: {e:?}")),
            },
            (method, path) if path.starts_with("/notes/") => {
                let name = &path["/notes/".len()..];
                if !valid_name(name) {
                    return error(out, 400, "a note's name is 1 to 64 letters, digits, - or _");
                }
                let key = format!("notes/{name}");
                match method {
                    Method::Put => {
                        let Some(text) = body_of(&request, MAX_NOTE) else {
                            return error(out, 413, "a note is at most 4096 bytes");
                        };
                        let Ok(text) = String::from_utf8(text) else {
                            return error(out, 400, "a note is UTF-8 text");
                        };
                        // Written through to the global tier: every node sees it.
                        match state::set(&key, text.as_bytes()).and_then(|()| state::push(&key)) {
                            Ok(()) => {
                                answer(out, 201, &format!("{{\"name\":{},\"text\":{}}}", quoted(name), quoted(&text)))
                            }
                            Err(e) => error(out, 503, &format!("state: {e:?}")),
                        }
                    }
                    Method::Get => {
                        let _ = state::pull(&key);
                        match state::get(&key) {
                            Ok(Some(text)) => {
                                let text = String::from_utf8_lossy(&text);
                                answer(out, 200, &format!("{{\"name\":{},\"text\":{}}}", quoted(name), quoted(&text)))
                            }
                            Ok(None) => error(out, 404, &format!("no note {name}")),
                            Err(e) => error(out, 503, &format!("state: {e:?}")),
                        }
                    }
                    Method::Delete => match state::delete(&key) {
                        Ok(()) => answer(out, 200, &format!("{{\"deleted\":{}}}", quoted(name))),
                        Err(e) => error(out, 503, &format!("state: {e:?}")),
                    },
                    _ => error(out, 405, "notes take GET, PUT and DELETE"),
                }
            }
            _ => error(out, 404, &format!("no route {path}")),
        }
    }
}
