//! A receiver of OTLP/HTTP traces for the tests: a plain HTTP/1.1 server on
//! a free loopback port that decodes each `POST /v1/traces`
//! (`ExportTraceServiceRequest`, protobuf) with the OpenTelemetry protocol
//! types and keeps the spans.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One span as received.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// Hex, as in a `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_id: String,
    pub name: String,
    /// OTLP kinds: 1 internal, 2 server, 3 client.
    pub kind: i32,
    /// Attributes, integers written in decimal.
    pub attributes: BTreeMap<String, String>,
    /// The exporter's `service.instance.id`.
    pub instance: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// Its status is an error.
    pub failed: bool,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

pub struct OtlpReceiver {
    port: u16,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<u64>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl OtlpReceiver {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the OTLP receiver");
        let port = listener.local_addr().expect("its address").port();
        let spans = Arc::<Mutex<Vec<ReceivedSpan>>>::default();
        let requests = Arc::<Mutex<u64>>::default();
        {
            let (spans, requests) = (spans.clone(), requests.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (spans, requests) = (spans.clone(), requests.clone());
                    std::thread::spawn(move || serve(stream, &spans, &requests));
                }
            });
        }
        Self { port, spans, requests }
    }

    /// `http://127.0.0.1:PORT`, for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("spans").clone()
    }

    /// Export requests received.
    pub fn requests(&self) -> u64 {
        *self.requests.lock().expect("requests")
    }

    /// The spans of `trace_id`, once `done` says they are all there (or
    /// the time is up: then what came).
    pub fn wait_for(
        &self,
        trace_id: &str,
        within: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let start = Instant::now();
        loop {
            let spans: Vec<ReceivedSpan> = self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect();
            if done(&spans) || start.elapsed() > within {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn serve(stream: TcpStream, spans: &Mutex<Vec<ReceivedSpan>>, requests: &Mutex<u64>) {
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let status = match ExportTraceServiceRequest::decode(body.as_slice()) {
            Ok(export) if request_line.starts_with("POST /v1/traces ") => {
                keep(export, spans);
                *requests.lock().expect("requests") += 1;
                "200 OK"
            }
            _ => "400 Bad Request",
        };
        if write!(writer, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}

fn keep(export: ExportTraceServiceRequest, spans: &Mutex<Vec<ReceivedSpan>>) {
    let mut kept = spans.lock().expect("spans");
    for resource in export.resource_spans {
        let instance = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.instance.id")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                let attributes = span
                    .attributes
                    .iter()
                    .filter_map(|kv| {
                        let value = match kv.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => s.clone(),
                            Value::IntValue(n) => n.to_string(),
                            other => format!("{other:?}"),
                        };
                        Some((kv.key.clone(), value))
                    })
                    .collect();
                kept.push(ReceivedSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes,
                    instance: instance.clone(),
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano,
                    failed: span.status.is_some_and(|s| s.code == 2),
                });
            }
        }
    }
}
