//! Tracing: OpenTelemetry spans of every call, exported over OTLP/HTTP
//! (protobuf) to `--otlp-endpoint`.
//!
//! A call traced has a span of its own (the HTTP request that made it, a
//! chained call, an asynchronous call's run, a forwarded call on the node
//! that runs it) and, under it, its wait for a turn (`queue`), its
//! `instantiate` and its `run`; under the run, its state operations that
//! took at least `trace_state_ops_over` and its chained calls, whose spans
//! are made where they run (on another node too: the forward carries a W3C
//! `traceparent`). An incoming `traceparent` is honoured: the call joins
//! that trace, sampled or not as it says; a call without one starts a
//! trace, sampled with the configured ratio. A call not sampled makes no
//! span and passes no context on.
//!
//! Recording is off the call path: a finished span goes into a bounded
//! queue (`try_send`: when full it is dropped and counted, never waited
//! for), and one task batches and posts them. With no endpoint nothing is
//! made at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status, status};
use prost::Message;
use shoal_runtime::TraceParent;
use tokio::sync::mpsc;

/// Spans per export request, at most.
const BATCH: usize = 512;
/// How long a batch waits to fill before it is sent.
const BATCH_WAIT: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// OTLP span kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

#[derive(Clone, Debug)]
pub enum Attr {
    Str(String),
    Int(i64),
}

impl From<&str> for Attr {
    fn from(s: &str) -> Self {
        Self::Str(s.to_string())
    }
}

impl From<String> for Attr {
    fn from(s: String) -> Self {
        Self::Str(s)
    }
}

impl From<i64> for Attr {
    fn from(n: i64) -> Self {
        Self::Int(n)
    }
}

/// A span being made. Its context ([`Span::context`]) is what its
/// children and the calls it forwards carry; ended ([`Tracer::end`]) it
/// is exported if its trace is sampled.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
    pub name: String,
    pub kind: Kind,
    pub start: Instant,
    pub attrs: Vec<(&'static str, Attr)>,
}

impl Span {
    /// The context a child of this span carries.
    pub fn context(&self) -> TraceParent {
        TraceParent { trace_id: self.trace_id, span_id: self.span_id, sampled: self.sampled }
    }

    /// A child starting now.
    pub fn child(&self, name: impl Into<String>, kind: Kind) -> Span {
        self.child_at(name, kind, Instant::now())
    }

    pub fn child_at(&self, name: impl Into<String>, kind: Kind, start: Instant) -> Span {
        Span {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            parent: Some(self.span_id),
            sampled: self.sampled,
            name: name.into(),
            kind,
            start,
            attrs: Vec::new(),
        }
    }

    pub fn attr(&mut self, key: &'static str, value: impl Into<Attr>) {
        if self.sampled {
            self.attrs.push((key, value.into()));
        }
    }

    /// The trace id as logs show it.
    pub fn trace_hex(&self) -> String {
        self.context().trace_hex()
    }
}

pub(crate) fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

/// A finished span, waiting to be exported.
#[derive(Debug)]
struct Finished {
    span: Span,
    end: Instant,
    error: Option<String>,
}

/// Counts of what the tracer did, for `/metrics`.
#[derive(Debug, Default)]
pub struct TraceStats {
    pub exported: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Lost because an export request failed.
    pub failed: AtomicU64,
}

#[derive(Debug)]
pub struct Tracer {
    /// None: tracing is off.
    queue: Option<mpsc::Sender<Finished>>,
    /// The share of new traces sampled, in 0..=1.
    ratio: f64,
    pub stats: Arc<TraceStats>,
}

/// How the node traces.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// `http://host:port` (OTLP/HTTP; `/v1/traces` is added unless the URL
    /// names a path).
    pub endpoint: String,
    pub ratio: f64,
    /// Finished spans waiting for export, at most (then dropped).
    pub queue: usize,
    /// `service.instance.id` (the node's id in a cluster).
    pub instance: String,
}

impl Tracer {
    pub fn off() -> Self {
        Self { queue: None, ratio: 0.0, stats: Arc::default() }
    }

    /// A tracer exporting to `config.endpoint`, its exporter task spawned
    /// on the current runtime. It ends when the tracer is dropped, after
    /// sending what is queued.
    pub fn start(config: &TraceConfig) -> Result<Self, String> {
        let url = export_url(&config.endpoint)?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let stats = Arc::<TraceStats>::default();
        // Spans are timed with `Instant`s and exported in Unix time.
        tokio::spawn(export(rx, url, stats.clone(), epoch(), config.instance.clone()));
        Ok(Self { queue: Some(tx), ratio: config.ratio.clamp(0.0, 1.0), stats })
    }

    /// The span of a call starting now under `parent` (an incoming
    /// `traceparent`, or the caller's context), or of a new trace sampled
    /// with the configured ratio. None when tracing is off or the trace is
    /// not sampled: such a call makes nothing and passes nothing on (its
    /// chained calls, forwards and async runs begin no span of their own:
    /// they have no parent), so a call not sampled costs a coin toss.
    pub fn begin(&self, parent: Option<TraceParent>, name: impl FnOnce() -> String, kind: Kind) -> Option<Span> {
        self.queue.as_ref()?;
        let (trace_id, parent, sampled) = match parent {
            Some(p) => (p.trace_id, Some(p.span_id), p.sampled),
            None => {
                if !(self.ratio >= 1.0 || (self.ratio > 0.0 && rand::random::<f64>() < self.ratio)) {
                    return None;
                }
                let trace_id = loop {
                    let id: [u8; 16] = rand::random();
                    if id != [0; 16] {
                        break id;
                    }
                };
                (trace_id, None, true)
            }
        };
        if !sampled {
            return None;
        }
        Some(Span {
            trace_id,
            span_id: new_span_id(),
            parent,
            sampled,
            name: name(),
            kind,
            start: Instant::now(),
            attrs: Vec::new(),
        })
    }

    /// End `span` now (failed with `error`, if any).
    pub fn end(&self, span: Span, error: Option<String>) {
        self.end_at(span, Instant::now(), error);
    }

    pub fn end_at(&self, span: Span, end: Instant, error: Option<String>) {
        if !span.sampled {
            return;
        }
        let Some(queue) = &self.queue else { return };
        if queue.try_send(Finished { span, end, error }).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn epoch() -> (Instant, u64) {
    let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    (Instant::now(), unix)
}

fn unix_nanos(epoch: (Instant, u64), at: Instant) -> u64 {
    match at.checked_duration_since(epoch.0) {
        Some(after) => epoch.1 + after.as_nanos() as u64,
        None => epoch.1.saturating_sub(epoch.0.duration_since(at).as_nanos() as u64),
    }
}

fn export_url(endpoint: &str) -> Result<hyper::Uri, String> {
    let trimmed = endpoint.trim_end_matches('/');
    let full = if trimmed.ends_with("/v1/traces") { trimmed.to_string() } else { format!("{trimmed}/v1/traces") };
    let url: hyper::Uri = full.parse().map_err(|e| format!("--otlp-endpoint {endpoint:?}: {e}"))?;
    if url.scheme_str() != Some("http") {
        return Err(format!(
            "--otlp-endpoint {endpoint:?}: only http:// is supported (put a collector beside the node)"
        ));
    }
    Ok(url)
}

fn key_value(key: &str, value: Attr) -> KeyValue {
    let value = match value {
        Attr::Str(s) => any_value::Value::StringValue(s),
        Attr::Int(n) => any_value::Value::IntValue(n),
    };
    KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn encode(spans: Vec<Finished>, epoch: (Instant, u64), instance: &str) -> Vec<u8> {
    let spans = spans
        .into_iter()
        .map(|Finished { span, end, error }| opentelemetry_proto::tonic::trace::v1::Span {
            trace_id: span.trace_id.to_vec(),
            span_id: span.span_id.to_vec(),
            parent_span_id: span.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: 1,
            name: span.name,
            kind: span.kind as i32,
            start_time_unix_nano: unix_nanos(epoch, span.start),
            end_time_unix_nano: unix_nanos(epoch, end),
            attributes: span.attrs.into_iter().map(|(k, v)| key_value(k, v)).collect(),
            status: Some(match error {
                Some(message) => Status { message, code: status::StatusCode::Error as i32 },
                None => Status { message: String::new(), code: status::StatusCode::Unset as i32 },
            }),
            ..Default::default()
        })
        .collect();
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    key_value("service.name", "shoal".into()),
                    key_value("service.instance.id", instance.into()),
                    key_value("service.version", env!("CARGO_PKG_VERSION").into()),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "shoal".to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    request.encode_to_vec()
}

/// The exporter: batches of at most `BATCH`, sent when full or
/// `BATCH_WAIT` after their first span; at the end, what is left.
async fn export(
    mut rx: mpsc::Receiver<Finished>,
    url: hyper::Uri,
    stats: Arc<TraceStats>,
    epoch: (Instant, u64),
    instance: String,
) {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let body = encode(batch, epoch, &instance);
        let request = hyper::Request::post(url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .expect("an export request");
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.request(request)).await;
        match sent {
            Ok(Ok(response)) if response.status().is_success() => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
            }
            failed => {
                stats.failed.fetch_add(n, Ordering::Relaxed);
                let why = match failed {
                    Ok(Ok(response)) => format!("answered {}", response.status()),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_string(),
                };
                tracing::warn!(spans = n, %why, "exporting spans failed; they are lost");
            }
        }
    }
}

/// A traced call: its span (the HTTP request, the chained call, …) and
/// the id its `run` span will have, which its chained calls hang under.
#[derive(Debug)]
pub struct Traced {
    pub span: Span,
    pub run_id: [u8; 8],
}

impl Traced {
    pub fn new(span: Span) -> Self {
        Self { span, run_id: new_span_id() }
    }

    /// What the call's settings carry: its children's parent.
    pub fn parent(&self) -> TraceParent {
        TraceParent { trace_id: self.span.trace_id, span_id: self.run_id, sampled: self.span.sampled }
    }
}

/// The `traceparent` a request carries, if well formed.
pub fn incoming(headers: &hyper::HeaderMap) -> Option<TraceParent> {
    TraceParent::parse(headers.get("traceparent")?.to_str().ok()?)
}

impl crate::Node {
    /// The settings of a call of `function`, under `traced` if it is.
    pub(crate) fn settings_for<'f>(
        &self,
        function: &'f crate::registry::DeployedFunction,
        traced: Option<&Traced>,
    ) -> std::borrow::Cow<'f, shoal_runtime::CallSettings> {
        let mut settings = self.call_settings(function);
        if let Some(traced) = traced {
            settings.to_mut().trace = Some(traced.parent());
        }
        settings
    }

    /// The spans under a traced call that ran — its wait for a turn, its
    /// instantiation and its run (with its slow state operations) — ended
    /// now, and the call's attributes on its own span (which its owner
    /// ends).
    pub(crate) fn trace_call(
        &self,
        traced: &mut Traced,
        out: &shoal_runtime::CallOutput,
        call_id: &str,
        function: &crate::registry::DeployedFunction,
    ) {
        let span = &mut traced.span;
        if !span.sampled {
            return;
        }
        let outcome = match &out.result {
            Ok(_) => "ok",
            Err(e) => crate::error::ErrorKind::of_call(e).as_str(),
        };
        // Timed back from now, when the call has just ended: the runtime
        // measured its wall time and instantiation, the scheduler its wait.
        let usage = &out.usage;
        let ended = Instant::now();
        let began = ended.checked_sub(usage.wall).unwrap_or(ended).max(span.start);
        let ready = (began + usage.instantiate).min(ended);
        let queued_from = began.checked_sub(usage.queued).unwrap_or(began).max(span.start);
        let queued_until = began;
        let mut queue = span.child_at("queue", Kind::Internal, queued_from);
        queue.attr("shoal.queued_us", usage.queued.as_micros() as i64);
        self.tracer.end_at(queue, queued_until, None);
        self.tracer.end_at(span.child_at("instantiate", Kind::Internal, queued_until), ready, None);
        let mut run = span.child_at("run", Kind::Internal, ready);
        run.span_id = traced.run_id;
        run.attr("shoal.cpu_us", usage.cpu.as_micros() as i64);
        run.attr("shoal.peak_memory_bytes", usage.peak_memory_bytes as i64);
        for op in &out.state_ops {
            let mut state = run.child_at(format!("state {}", op.op), Kind::Internal, op.start);
            state.attr("shoal.state.key", op.key.as_str());
            self.tracer.end_at(state, op.start + op.took, (!op.ok).then(|| "failed".to_string()));
        }
        let error = out.result.as_ref().err().map(ToString::to_string);
        self.tracer.end_at(run, ended, error);
        span.attr("shoal.tenant", function.record.tenant.as_str());
        span.attr("shoal.function", function.record.name.as_str());
        span.attr("shoal.call_id", call_id);
        span.attr("shoal.outcome", outcome);
    }

    /// End a traced call's own span: failed when `error` says so.
    pub(crate) fn end_trace(&self, traced: Option<Traced>, error: Option<String>) {
        if let Some(traced) = traced {
            self.tracer.end(traced.span, error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_export_url_gets_its_path_and_only_http_is_taken() {
        assert_eq!(export_url("http://127.0.0.1:4318").unwrap().to_string(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(export_url("http://c:4318/v1/traces/").unwrap().to_string(), "http://c:4318/v1/traces");
        assert!(export_url("https://c:4318").is_err());
        assert!(export_url("not a url").is_err());
    }

    #[test]
    fn sampling_follows_the_parent_and_the_ratio() {
        let name = || "x".to_string();
        let off = Tracer::off();
        assert!(off.begin(None, name, Kind::Server).is_none());
        let (tx, _rx) = mpsc::channel(1);
        let never = Tracer { queue: Some(tx.clone()), ratio: 0.0, stats: Arc::default() };
        assert!(never.begin(None, name, Kind::Server).is_none(), "not sampled: nothing made");
        let parent = TraceParent { trace_id: [7; 16], span_id: [3; 8], sampled: true };
        let span = never.begin(Some(parent), name, Kind::Server).unwrap();
        assert_eq!((span.trace_id, span.parent, span.sampled), ([7; 16], Some([3; 8]), true));
        assert!(never.begin(Some(TraceParent { sampled: false, ..parent }), name, Kind::Server).is_none());
        let always = Tracer { queue: Some(tx), ratio: 1.0, stats: Arc::default() };
        let root = always.begin(None, name, Kind::Server).unwrap();
        assert!(root.sampled && root.parent.is_none());
        let child = root.child("y", Kind::Internal);
        assert_eq!((child.trace_id, child.parent), (root.trace_id, Some(root.span_id)));
        // A full queue drops and counts; it never waits.
        always.end(root.clone(), None);
        always.end(root, None);
        assert_eq!(always.stats.dropped.load(Ordering::Relaxed), 1);
    }
}
