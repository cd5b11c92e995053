//! HTTP functions and outbound HTTP.
//!
//! An HTTP function is a component of the standard `wasi:http/proxy`
//! world: it exports `wasi:http/incoming-handler`. A request reaches it as
//! an [`HttpExchange`]: the request (its body streaming in) and where its
//! answer goes (the head as soon as the guest sets it, the body streaming
//! out while the guest writes it). The call lasts as long as the guest
//! runs, so its deadline covers the whole exchange.
//!
//! Outbound requests (`wasi:http/outgoing-handler`, imported by any kind
//! of component) go only where the function's [`AllowList`] says; see
//! `outbound.rs` for how they are checked and sent.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use wasmtime::Store;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme as WasiScheme;

use crate::host::ComponentCtx;

pub use wasmtime_wasi_http::Error as HttpError;

/// A body in either direction: bytes, streamed, failing with an
/// [`HttpError`].
pub type HttpBody = UnsyncBoxBody<Bytes, HttpError>;

/// What a guest answered: the head, its body streaming while the guest
/// runs; or the error the guest set instead of a response.
pub type HttpAnswer = Result<http::Response<HttpBody>, String>;

/// One request to an HTTP function and where its answer goes.
#[derive(Debug)]
pub struct HttpExchange {
    /// The request as the guest sees it: its URI is the path after the
    /// function's prefix with the query, its authority the request's host.
    pub request: http::Request<HttpBody>,
    pub respond: tokio::sync::oneshot::Sender<HttpAnswer>,
}

impl HttpExchange {
    /// An exchange for `request`, and where its answer arrives. If the
    /// receiver gets nothing (the sender is dropped), the guest never set
    /// a response: the call's outcome says why.
    pub fn new(request: http::Request<HttpBody>) -> (Self, tokio::sync::oneshot::Receiver<HttpAnswer>) {
        let (respond, answer) = tokio::sync::oneshot::channel();
        (Self { request, respond }, answer)
    }
}

/// What a call is given.
#[derive(Debug)]
pub enum CallInput {
    /// Bytes in, bytes out. An HTTP function called this way gets a
    /// `POST /` with the bytes as its body, and its answer's body is the
    /// output (a status of 400 or more fails the call).
    Bytes(Bytes),
    /// A request in, a response out, both streaming (HTTP functions only).
    Http(Box<HttpExchange>),
}

impl From<Bytes> for CallInput {
    fn from(bytes: Bytes) -> Self {
        Self::Bytes(bytes)
    }
}

impl From<HttpExchange> for CallInput {
    fn from(exchange: HttpExchange) -> Self {
        Self::Http(Box::new(exchange))
    }
}

/// Run an HTTP function's handler on `exchange` in `store`; returns when
/// the guest's `handle` does (the answer went out meanwhile).
pub(crate) async fn handle(
    pre: &ProxyPre<ComponentCtx>,
    store: &mut Store<ComponentCtx>,
    exchange: HttpExchange,
) -> wasmtime::Result<()> {
    let HttpExchange { request, respond } = exchange;
    let cut = Arc::new(AtomicBool::new(false));
    store.data_mut().response_cut = Some(cut.clone());
    let proxy = pre.instantiate_async(&mut *store).await?;
    store.data_mut().ready_at = Some(std::time::Instant::now());
    let request = store.data_mut().http().new_incoming_request(WasiScheme::Http, request)?;
    let out = store.data_mut().http().new_response_outparam_from_callback(move |answer| {
        let answer = answer
            .map(|response| response.map(|body| CutOnFailure { inner: body, cut }.boxed_unsync()))
            .map_err(|code| format!("{code:?}"));
        let _ = respond.send(answer);
    })?;
    proxy.wasi_http_incoming_handler().call_handle(&mut *store, request, out).await
}

/// An answer's body that ends in an error, not cleanly, when its call
/// failed before the guest finished it (a trap, the deadline): the
/// client can tell a cut answer from a whole one. (A body the guest
/// dropped unfinished would otherwise end as if complete.)
struct CutOnFailure {
    inner: HttpBody,
    cut: Arc<AtomicBool>,
}

impl http_body::Body for CutOnFailure {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            std::task::Poll::Ready(None) if self.cut.load(Ordering::Acquire) => std::task::Poll::Ready(Some(Err(
                HttpError::InternalError(Some("the function failed before its answer ended".into())),
            ))),
            polled => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Call an HTTP function with bytes: `POST /` with them as the body; the
/// answer's body is the output (at most `max_output` bytes and one more,
/// which the caller reports as too large), a status of 400 or more an
/// error.
pub(crate) async fn handle_bytes(
    pre: &ProxyPre<ComponentCtx>,
    store: &mut Store<ComponentCtx>,
    input: &[u8],
    max_output: usize,
) -> wasmtime::Result<Result<Vec<u8>, String>> {
    let body = Full::new(Bytes::copy_from_slice(input)).map_err(|never| match never {}).boxed_unsync();
    let request = http::Request::post("http://localhost/")
        .header(http::header::CONTENT_LENGTH, input.len())
        .body(body)
        .map_err(|e| wasmtime::format_err!("building the request: {e}"))?;
    let (exchange, answer) = HttpExchange::new(request);
    let guest = async {
        let handled = handle(pre, store, exchange).await;
        // What the guest left open (its answer, its body) ends with it.
        store.data_mut().table = crate::host::call_table();
        handled
    };
    let (handled, output) = tokio::join!(guest, collect(answer, max_output));
    handled?;
    Ok(output)
}

async fn collect(answer: tokio::sync::oneshot::Receiver<HttpAnswer>, max_output: usize) -> Result<Vec<u8>, String> {
    let response = match answer.await {
        Ok(Ok(response)) => response,
        Ok(Err(code)) => return Err(format!("the function answered with the error {code}")),
        Err(_) => return Err("the function ended without setting a response".into()),
    };
    let status = response.status();
    let mut body = response.into_body();
    let mut output = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the function's response body failed: {e}"))?;
        if let Some(data) = frame.data_ref() {
            let room = (max_output + 1).saturating_sub(output.len());
            output.extend_from_slice(&data[..data.len().min(room)]);
            if output.len() > max_output {
                break;
            }
        }
    }
    if status.as_u16() >= 400 {
        let shown = String::from_utf8_lossy(&output[..output.len().min(1024)]).into_owned();
        return Err(format!("the function answered {status}: {shown}"));
    }
    Ok(output)
}

/// Where a function's outbound requests may go: entries of the form
/// `scheme://host[:port]`, set at deploy.
///
/// - scheme: `http`, `https` or `*`;
/// - host: a name (`api.example.com`), `*.example.com` (any name under
///   it, not the name itself), `*` (any name), or an IP address
///   (`127.0.0.1`, `[::1]`);
/// - port: a number or `*`; omitted, the scheme's default (80, 443; with
///   scheme `*`, either).
///
/// A name is allowed by the entries; the addresses it resolves to are then
/// checked again: loopback, private, link-local (cloud metadata),
/// shared, multicast and unspecified addresses are reached only through an
/// entry naming that very address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<AllowedHost>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct AllowedHost {
    scheme: Option<Scheme>,
    host: HostPattern,
    port: PortPattern,
    /// As written, for messages.
    text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// `*.suffix`: names ending in `.suffix`.
    Under(String),
    Name(String),
    Address(IpAddr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortPattern {
    Any,
    /// The scheme's default port.
    Default,
    Exactly(u16),
}

/// At most this many entries per function.
pub const MAX_ALLOWED_HOSTS: usize = 64;

impl AllowList {
    /// Nothing allowed.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parse entries, each `scheme://host[:port]`; the error names the
    /// entry and what is wrong with it.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        if entries.len() > MAX_ALLOWED_HOSTS {
            return Err(format!("at most {MAX_ALLOWED_HOSTS} allowed hosts per function; got {}", entries.len()));
        }
        let entries = entries.iter().map(|e| parse_entry(e.as_ref())).collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries as written.
    pub fn entries(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.text.clone()).collect()
    }

    /// Whether a request to `scheme://host:port` is allowed. `host` is the
    /// URI's host (brackets of an IPv6 literal removed), lower case.
    pub fn allows(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        let address = host.parse::<IpAddr>().ok().map(canonical);
        self.entries.iter().any(|entry| {
            let scheme_ok = entry.scheme.is_none_or(|s| s == scheme);
            let port_ok = match entry.port {
                PortPattern::Any => true,
                PortPattern::Exactly(p) => p == port,
                PortPattern::Default => match entry.scheme {
                    Some(s) => s.default_port() == port,
                    None => scheme.default_port() == port,
                },
            };
            let host_ok = match (&entry.host, address) {
                (HostPattern::Address(allowed), Some(address)) => *allowed == address,
                (HostPattern::Address(_), None) => false,
                // Patterns of names do not match address literals: an
                // address must be named to be reached.
                (_, Some(_)) => false,
                (HostPattern::Any, None) => true,
                (HostPattern::Under(suffix), None) => {
                    host.len() > suffix.len() + 1
                        && host.ends_with(suffix.as_str())
                        && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                }
                (HostPattern::Name(name), None) => name == host,
            };
            scheme_ok && port_ok && host_ok
        })
    }

    /// Whether an address a name resolved to may be connected to, for a
    /// request to `scheme` and `port`: a public address always (the name
    /// was allowed); any other only if an entry names that address with
    /// that scheme and port (and the operator opened it: `outbound.rs`).
    pub fn may_connect(&self, address: IpAddr, scheme: Scheme, port: u16) -> bool {
        let address = canonical(address);
        is_public(address) || self.allows(scheme, &address.to_string(), port)
    }

    /// The non-public addresses the entries name (each must be opened by
    /// the operator for a deploy to name it).
    pub fn non_public_addresses(&self) -> Vec<IpAddr> {
        self.entries
            .iter()
            .filter_map(|e| match e.host {
                HostPattern::Address(address) if !is_public(address) => Some(address),
                _ => None,
            })
            .collect()
    }
}

fn parse_entry(text: &str) -> Result<AllowedHost, String> {
    let bad = |why: &str| {
        format!(
            "allowed host {text:?}: {why} (the form is scheme://host[:port], e.g. https://api.example.com or http://127.0.0.1:8080)"
        )
    };
    let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Some(Scheme::Http),
        "https" => Some(Scheme::Https),
        "*" => None,
        _ => return Err(bad("the scheme must be http, https or *")),
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return Err(bad("only a host and port may follow the scheme"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (address, after) = v6.split_once(']').ok_or_else(|| bad("an unclosed ["))?;
        let address = address.parse::<std::net::Ipv6Addr>().map_err(|_| bad("not an IPv6 address in [ ]"))?;
        let port = match after {
            "" => None,
            after => Some(after.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
        };
        (HostPattern::Address(canonical(IpAddr::V6(address))), port)
    } else {
        let (host, port) = match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        };
        if port.is_some_and(|p| p.contains(':')) {
            return Err(bad("an IPv6 address goes in [ ]"));
        }
        let host = host.to_ascii_lowercase();
        let pattern = if host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            check_name(suffix).map_err(|why| bad(&why))?;
            HostPattern::Under(suffix.to_string())
        } else if let Ok(address) = host.parse::<IpAddr>() {
            HostPattern::Address(canonical(address))
        } else {
            check_name(&host).map_err(|why| bad(&why))?;
            HostPattern::Name(host)
        };
        (pattern, port)
    };
    let port = match port {
        None => PortPattern::Default,
        Some("*") => PortPattern::Any,
        Some(port) => PortPattern::Exactly(
            port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad("the port must be 1 to 65535 or *"))?,
        ),
    };
    Ok(AllowedHost { scheme, host, port, text: text.to_string() })
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok { Ok(()) } else { Err(format!("{name:?} is not a host name")) }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is the IPv4 one.
pub fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `address` is on the public internet: not loopback, private,
/// shared (CGNAT), link-local (where cloud metadata services answer),
/// documentation, benchmarking, multicast, broadcast, reserved or
/// unspecified, nor an IPv6 unique-local, link-local, site-local,
/// NAT64-to-private or 6to4-of-private address.
pub fn is_public(address: IpAddr) -> bool {
    match canonical(address) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            // 64:ff9b::/96 (NAT64) and 2002::/16 (6to4) carry an IPv4
            // address: judged by it.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let v4 = std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                return is_public(IpAddr::V4(v4));
            }
            // 64:ff9b:1::/48, local-use NAT64: whatever it maps to is local.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
                return false;
            }
            if s[0] == 0x2002 {
                let v4 = std::net::Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
                return is_public(IpAddr::V4(v4));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || s[0] == 0x0100 && s[1..4] == [0, 0, 0]
                // The rest of ::/8 (IPv4-compatible and reserved).
                || s[0] == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(entries).unwrap()
    }

    #[test]
    fn entries_match_scheme_host_and_port() {
        let allow = list(&["https://api.example.com", "http://*.internal.test:8080", "*://files.example.org:*"]);
        assert!(allow.allows(Scheme::Https, "api.example.com", 443));
        assert!(!allow.allows(Scheme::Http, "api.example.com", 80), "the scheme counts");
        assert!(!allow.allows(Scheme::Https, "api.example.com", 8443), "the default port only");
        assert!(!allow.allows(Scheme::Https, "evil.api.example.com", 443));
        assert!(allow.allows(Scheme::Http, "a.internal.test", 8080));
        assert!(allow.allows(Scheme::Http, "a.b.internal.test", 8080));
        assert!(!allow.allows(Scheme::Http, "internal.test", 8080), "*.x is names under x");
        assert!(!allow.allows(Scheme::Http, "xinternal.test", 8080));
        assert!(allow.allows(Scheme::Http, "files.example.org", 1234));
        assert!(allow.allows(Scheme::Https, "files.example.org", 1));
        assert!(!AllowList::none().allows(Scheme::Https, "api.example.com", 443));
    }

    #[test]
    fn addresses_are_reached_only_when_named() {
        let allow = list(&["*://*:*", "http://127.0.0.1:8080", "http://[::1]:9000"]);
        assert!(allow.allows(Scheme::Http, "127.0.0.1", 8080));
        assert!(!allow.allows(Scheme::Http, "127.0.0.1", 8081));
        assert!(allow.allows(Scheme::Http, "::1", 9000));
        assert!(allow.allows(Scheme::Http, "::ffff:127.0.0.1", 8080), "v4-mapped is the v4 address");
        assert!(!allow.allows(Scheme::Http, "10.0.0.1", 80), "a wildcard name does not match an address");
        let http = Scheme::Http;
        assert!(allow.may_connect("127.0.0.1".parse().unwrap(), http, 8080));
        assert!(allow.may_connect("::ffff:127.0.0.1".parse().unwrap(), http, 8080));
        assert!(!allow.may_connect("127.0.0.1".parse().unwrap(), http, 22), "a named address, another port");
        assert!(!allow.may_connect("127.0.0.1".parse().unwrap(), Scheme::Https, 8080), "another scheme");
        assert!(!allow.may_connect("127.0.0.2".parse().unwrap(), http, 8080));
        assert_eq!(allow.non_public_addresses().len(), 2);
        for blocked in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
        ] {
            assert!(!allow.may_connect(blocked.parse().unwrap(), http, 80), "{blocked}");
        }
        for public in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "1.1.1.1"] {
            assert!(allow.may_connect(public.parse().unwrap(), http, 80), "{public}");
        }
    }

    #[test]
    fn bad_entries_are_refused_by_name() {
        for bad in [
            "example.com",
            "ftp://example.com",
            "https://example.com/path",
            "https://user@example.com",
            "https://example.com:0",
            "https://example.com:99999",
            "https://exa mple.com",
            "https://[::1",
            "https://",
            "http://fd00::1:2",
        ] {
            let error = AllowList::parse(&[bad]).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
        let many: Vec<String> = (0..=MAX_ALLOWED_HOSTS).map(|i| format!("https://h{i}.example.com")).collect();
        assert!(AllowList::parse(&many).is_err());
    }
}
