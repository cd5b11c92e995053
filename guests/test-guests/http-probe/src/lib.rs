//! A `wasi:http` handler for the host's tests. The path picks what it does:
//!
//! - `/hello`: `hello {method} {path-with-query}`.
//! - `/echo`: answers at once, then streams the request body back as it
//!   arrives (chunked), and at its end a trailer-less finish.
//! - `/count`: reads the whole body, answers its length.
//! - `/headers`: the request's headers, a `name: value` line each (values
//!   hex when not UTF-8); answers with `x-multi` set twice.
//! - `/sse?n=N&ms=D`: N events `data: i`, each flushed, D ms apart.
//! - `/big?mib=N`: N MiB of `x`.
//! - `/trap`: the head and a first chunk, then a trap.
//! - `/status?code=N`: an empty answer with that status.
//! - `/env?name=K`: the env var K.
//! - `/log`: a line on stdout and one on stderr, then `logged`.
//! - `/none`: returns without answering.
//! - `/spin`: loops forever.
//! - `/config?name=K`: `wasi:config/store`'s value for K (`none` if unset).
//! - `/fetch?url=U&follow=1`: GETs U (following one redirect when asked)
//!   and answers `{status} {body}`, or `error {code}`.
//! - `/hog?n=N&kib=K`: makes N header sets of one K KiB header each and
//!   holds them all, stopping at the first the host refuses; answers how
//!   many it made.
//! - `/lie?declared=N`: declares a body of N bytes, then writes N bytes of
//!   `a` and a whole second response after them (what a tenant smuggling a
//!   response to a shared proxy's connection would write); with `short=1`
//!   it writes N/2 bytes and ends. Write errors are ignored.

use std::io::{Read as _, Write as _};

use wasip2::http::types::{
    Fields, IncomingRequest, IncomingResponse, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

wasip2::http::proxy::export!(Probe);

mod config {
    wit_bindgen::generate!({ path: "wit", world: "shoal:probe/probe", generate_all });
}

struct Probe;

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            v.replace("%3A", ":").replace("%2F", "/").replace("%3F", "?").replace("%3D", "=").replace("%26", "&")
        })
    })
}

fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, &[u8])], body: &[u8]) {
    let fields = Fields::new();
    for (name, value) in headers {
        fields.append(name, value).expect("a valid header");
    }
    let response = OutgoingResponse::new(fields);
    response.set_status_code(status).expect("a valid status");
    let outgoing = response.body().expect("the body, once");
    ResponseOutparam::set(out, Ok(response));
    {
        let mut stream = outgoing.write().expect("the stream, once");
        stream.write_all(body).expect("the client reads");
        stream.flush().expect("the client reads");
    }
    OutgoingBody::finish(outgoing, None).expect("the body ends");
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Patch => "PATCH".into(),
        Method::Options => "OPTIONS".into(),
        Method::Connect => "CONNECT".into(),
        Method::Trace => "TRACE".into(),
        Method::Other(other) => other.clone(),
    }
}

/// Start an answer: its body's stream and the body to finish.
fn start(out: ResponseOutparam, status: u16, content_type: &str) -> (wasip2::io::streams::OutputStream, OutgoingBody) {
    let fields = Fields::new();
    fields.append("content-type", content_type.as_bytes()).expect("a valid header");
    let response = OutgoingResponse::new(fields);
    response.set_status_code(status).expect("a valid status");
    let body = response.body().expect("the body, once");
    ResponseOutparam::set(out, Ok(response));
    (body.write().expect("the stream, once"), body)
}

fn sleep_ms(ms: u64) {
    wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
}

fn get(url: &str) -> Result<IncomingResponse, String> {
    let (scheme, rest) = url.split_once("://").ok_or("no scheme")?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&if scheme == "https" { Scheme::Https } else { Scheme::Http })).map_err(|()| "scheme")?;
    request.set_authority(Some(authority)).map_err(|()| "authority")?;
    request.set_path_with_query(Some(path)).map_err(|()| "path")?;
    let pending = wasip2::http::outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    match pending.get() {
        Some(Ok(Ok(response))) => Ok(response),
        Some(Ok(Err(e))) => Err(format!("{e:?}")),
        _ => Err("no response".into()),
    }
}

fn fetch(url: &str, follow: bool) -> String {
    let mut response = match get(url) {
        Ok(response) => response,
        Err(e) => return format!("error {e}"),
    };
    if follow && (300..400).contains(&response.status()) {
        let location = response.headers().get("location");
        let Some(location) = location.first() else { return "error a redirect without a location".into() };
        response = match get(&String::from_utf8_lossy(location)) {
            Ok(response) => response,
            Err(e) => return format!("error {e}"),
        };
    }
    let status = response.status();
    let body = response.consume().expect("the body, once");
    let mut text = Vec::new();
    {
        let mut stream = body.stream().expect("the stream, once");
        if let Err(e) = stream.read_to_end(&mut text) {
            return format!("error reading the body: {e}");
        }
    }
    format!("{status} {}", String::from_utf8_lossy(&text))
}

impl wasip2::exports::http::incoming_handler::Guest for Probe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        match path {
            "/hello" => {
                let text = format!("hello {} {target}", method_name(&request.method()));
                respond(out, 200, &[("content-type", b"text/plain")], text.as_bytes());
            }
            "/echo" => {
                // The head goes out before the body is read at all.
                let (mut sink, outgoing) = start(out, 200, "application/octet-stream");
                let incoming = request.consume().expect("the body, once");
                let source = incoming.stream().expect("the stream, once");
                while let Ok(chunk) = source.blocking_read(64 << 10) {
                    if sink.write_all(&chunk).is_err() {
                        return;
                    }
                }
                drop(source);
                let _ = sink.flush();
                drop(sink);
                OutgoingBody::finish(outgoing, None).expect("the body ends");
            }
            "/count" => {
                let incoming = request.consume().expect("the body, once");
                let mut source = incoming.stream().expect("the stream, once");
                let mut n = 0u64;
                let mut buf = vec![0u8; 64 << 10];
                let outcome = loop {
                    match std::io::Read::read(&mut source, &mut buf) {
                        Ok(0) => break Ok(n),
                        Ok(read) => n += read as u64,
                        Err(e) => break Err(e.to_string()),
                    }
                };
                match outcome {
                    Ok(n) => respond(out, 200, &[], n.to_string().as_bytes()),
                    Err(e) => respond(out, 400, &[], format!("after {n} bytes: {e}").as_bytes()),
                }
            }
            "/headers" => {
                let mut text = String::new();
                for (name, value) in request.headers().entries() {
                    match std::str::from_utf8(&value) {
                        Ok(value) => text.push_str(&format!("{name}: {value}\n")),
                        Err(_) => {
                            let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
                            text.push_str(&format!("{name}: hex {hex}\n"));
                        }
                    }
                }
                respond(out, 200, &[("x-multi", b"one"), ("x-multi", b"two")], text.as_bytes());
            }
            "/sse" => {
                let n: u32 = query_param(query, "n").and_then(|n| n.parse().ok()).unwrap_or(10);
                let ms: u64 = query_param(query, "ms").and_then(|n| n.parse().ok()).unwrap_or(0);
                let (mut sink, outgoing) = start(out, 200, "text/event-stream");
                for i in 0..n {
                    if sink
                        .write_all(format!("data: {i}\n\n").as_bytes())
                        .and_then(|()| std::io::Write::flush(&mut sink))
                        .is_err()
                    {
                        return;
                    }
                    if ms > 0 {
                        sleep_ms(ms);
                    }
                }
                drop(sink);
                OutgoingBody::finish(outgoing, None).expect("the body ends");
            }
            "/big" => {
                let mib: u64 = query_param(query, "mib").and_then(|n| n.parse().ok()).unwrap_or(1);
                let (mut sink, outgoing) = start(out, 200, "application/octet-stream");
                let chunk = vec![b'x'; 1 << 20];
                for _ in 0..mib {
                    if sink.write_all(&chunk).is_err() {
                        return;
                    }
                }
                let _ = sink.flush();
                drop(sink);
                OutgoingBody::finish(outgoing, None).expect("the body ends");
            }
            "/trap" => {
                let (mut sink, _outgoing) = start(out, 200, "text/plain");
                let _ = sink.write_all(b"first part\n");
                let _ = sink.flush();
                panic!("a trap after the head was sent");
            }
            "/status" => {
                let code: u16 = query_param(query, "code").and_then(|n| n.parse().ok()).unwrap_or(200);
                respond(out, code, &[], b"");
            }
            "/env" => {
                let name = query_param(query, "name").unwrap_or_default();
                let value = wasip2::cli::environment::get_environment()
                    .into_iter()
                    .find_map(|(k, v)| (k == name).then_some(v))
                    .unwrap_or_default();
                respond(out, 200, &[], value.as_bytes());
            }
            "/config" => {
                let name = query_param(query, "name").unwrap_or_default();
                let text = match config::wasi::config::store::get(&name) {
                    Ok(Some(value)) => value,
                    Ok(None) => "none".to_string(),
                    Err(e) => format!("error {e:?}"),
                };
                respond(out, 200, &[], text.as_bytes());
            }
            "/log" => {
                println!("a line on stdout");
                eprintln!("a line on stderr");
                respond(out, 200, &[], b"logged");
            }
            "/none" => {}
            "/spin" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "/fetch" => {
                let url = query_param(query, "url").unwrap_or_default();
                let follow = query_param(query, "follow").as_deref() == Some("1");
                respond(out, 200, &[], fetch(&url, follow).as_bytes());
            }
            "/hog" => {
                let n: usize = query_param(query, "n").and_then(|n| n.parse().ok()).unwrap_or(1000);
                let kib: usize = query_param(query, "kib").and_then(|n| n.parse().ok()).unwrap_or(64);
                let value = vec![b'v'; kib << 10];
                let mut kept = Vec::new();
                let mut made = 0;
                for i in 0..n {
                    let fields = Fields::new();
                    if fields.append(&format!("x-{i}"), &value).is_err() {
                        break;
                    }
                    kept.push(fields);
                    made += 1;
                }
                respond(out, 200, &[], made.to_string().as_bytes());
            }
            "/lie" => {
                let declared: usize = query_param(query, "declared").and_then(|n| n.parse().ok()).unwrap_or(5);
                let short = query_param(query, "short").as_deref() == Some("1");
                let fields = Fields::new();
                fields.append("content-length", declared.to_string().as_bytes()).expect("a valid header");
                let response = OutgoingResponse::new(fields);
                let outgoing = response.body().expect("the body, once");
                ResponseOutparam::set(out, Ok(response));
                let mut body = vec![b'a'; if short { declared / 2 } else { declared }];
                if !short {
                    body.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled");
                }
                if let Ok(mut stream) = outgoing.write() {
                    let _ = stream.write_all(&body);
                    let _ = stream.flush();
                }
                let _ = OutgoingBody::finish(outgoing, None);
            }
            _ => respond(out, 404, &[], format!("no route {path}").as_bytes()),
        }
    }
}
