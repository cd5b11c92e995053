//! What the runtime knows of tracing: the W3C trace context a call runs
//! under ([`TraceParent`], handed in with its settings and passed on to its
//! chained calls), and the timings of a traced call's slow state
//! operations ([`StateOpTiming`]), which it returns with the call's output.
//! Spans themselves are the node's: the runtime never exports anything.

use std::time::{Duration, Instant};

/// A W3C `traceparent`: the trace, the span a call's work hangs under,
/// and whether the trace is sampled (recorded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

fn hex_into(text: &str, out: &mut [u8]) -> Option<()> {
    if text.len() != out.len() * 2 || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(())
}

impl TraceParent {
    /// Parse a `traceparent` header (version 00, or a later version read
    /// as 00 would be); None for anything malformed or all-zero ids, which
    /// the recommendation says to ignore.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let mut v = [0u8; 1];
        hex_into(version, &mut v)?;
        let mut parent = Self { trace_id: [0; 16], span_id: [0; 8], sampled: false };
        hex_into(trace, &mut parent.trace_id)?;
        hex_into(span, &mut parent.span_id)?;
        let mut f = [0u8; 1];
        hex_into(flags, &mut f)?;
        if parent.trace_id == [0; 16] || parent.span_id == [0; 8] {
            return None;
        }
        parent.sampled = f[0] & 1 == 1;
        Some(parent)
    }

    /// As a `traceparent` header value.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.span_id), u8::from(self.sampled))
    }

    /// The trace id as 32 lowercase hex digits (what logs show).
    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// One state operation of a traced call that took at least the runtime's
/// `trace_state_ops_over`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateOpTiming {
    /// `get`, `set`, `push`, `pull`, `lock`, …
    pub op: &'static str,
    /// The guest's key (its tenant's: never another's).
    pub key: String,
    pub start: Instant,
    pub took: Duration,
    pub ok: bool,
}

/// At most this many are kept per call (the rest counted).
pub(crate) const MAX_STATE_OPS: usize = 128;

/// A traced call's slow state operations so far.
#[derive(Debug, Default)]
pub(crate) struct StateOpLog {
    /// Operations at least this long are kept.
    pub(crate) over: Duration,
    pub(crate) ops: Vec<StateOpTiming>,
    pub(crate) dropped: u32,
}

impl StateOpLog {
    pub(crate) fn note(&mut self, op: &'static str, key: &str, start: Instant, ok: bool) {
        let took = start.elapsed();
        if took < self.over {
            return;
        }
        if self.ops.len() >= MAX_STATE_OPS {
            self.dropped += 1;
            return;
        }
        self.ops.push(StateOpTiming { op, key: key.to_string(), start, took, ok });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_malformed_ones_are_ignored() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceParent::parse(text).unwrap();
        assert!(parent.sampled);
        assert_eq!(parent.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(parent.header(), text);
        assert_eq!(parent.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
        // A later version may add fields; version 00 may not.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_slow_operations_are_kept_and_at_most_so_many() {
        let mut log = StateOpLog { over: Duration::from_secs(3600), ..Default::default() };
        log.note("get", "k", Instant::now(), true);
        assert!(log.ops.is_empty());
        let mut log = StateOpLog::default();
        for _ in 0..MAX_STATE_OPS + 5 {
            log.note("set", "k", Instant::now(), true);
        }
        assert_eq!((log.ops.len(), log.dropped), (MAX_STATE_OPS, 5));
        assert_eq!(log.ops[0].op, "set");
    }
}
