//! Recent log lines of each function: what its calls wrote to stdout and
//! stderr, tagged with the call id (and the trace id of a sampled call). A
//! bounded ring per function; the oldest lines go first. Every line has a
//! sequence number, so a reader can ask for what came after the last one
//! it saw, and wait for it (`shoal logs -f`).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;
use shoal_runtime::LogLine;

#[derive(Clone, Debug, Serialize)]
pub struct LogEntry {
    /// 1 for the function's first line on this node, then one more each.
    pub seq: u64,
    pub call_id: String,
    /// The trace of a sampled call, as 32 hex digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Unix time in milliseconds when the call finished.
    pub time_ms: u64,
    pub stream: &'static str,
    pub line: String,
}

/// Longest line kept; longer ones are cut (at a char boundary).
const MAX_LINE_BYTES: usize = 4096;

#[derive(Debug)]
pub struct LogRing {
    capacity: usize,
    lines: Mutex<Lines>,
    /// Woken when lines are added.
    added: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Lines {
    ring: VecDeque<LogEntry>,
    last_seq: u64,
}

impl LogRing {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, lines: Mutex::default(), added: tokio::sync::Notify::new() }
    }

    pub fn append(&self, call_id: &str, trace_id: Option<&str>, time_ms: u64, lines: Vec<LogLine>) {
        if lines.is_empty() || self.capacity == 0 {
            return;
        }
        let mut guard = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Lines { ring, last_seq } = &mut *guard;
        for LogLine { stream, mut line } in lines {
            if line.len() > MAX_LINE_BYTES {
                let mut cut = MAX_LINE_BYTES;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
            }
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            *last_seq += 1;
            ring.push_back(LogEntry {
                seq: *last_seq,
                call_id: call_id.to_string(),
                trace_id: trace_id.map(str::to_string),
                time_ms,
                stream: stream.as_str(),
                line,
            });
        }
        drop(guard);
        self.added.notify_waiters();
    }

    /// The lines kept whose sequence number is above `seq`.
    pub fn after(&self, seq: u64) -> Vec<LogEntry> {
        let lines = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let skip = lines.ring.partition_point(|e| e.seq <= seq);
        lines.ring.iter().skip(skip).cloned().collect()
    }

    /// The lines after `seq`, waiting up to `wait` for one when there is
    /// none yet.
    pub async fn follow(&self, seq: u64, wait: std::time::Duration) -> Vec<LogEntry> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let added = self.added.notified();
            let lines = self.after(seq);
            if !lines.is_empty() {
                return lines;
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return Vec::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_runtime::LogStream;

    fn line(text: &str) -> LogLine {
        LogLine { stream: LogStream::Stdout, line: text.to_string() }
    }

    #[test]
    fn the_ring_keeps_the_newest_lines() {
        let ring = LogRing::new(3);
        ring.append("c1", None, 1, vec![line("a"), line("b")]);
        ring.append("c2", Some("ab12"), 2, vec![line("c"), line("d")]);
        let kept: Vec<(String, String)> = ring.after(0).into_iter().map(|e| (e.call_id, e.line)).collect();
        assert_eq!(kept, [("c1".into(), "b".into()), ("c2".into(), "c".into()), ("c2".into(), "d".into())]);
        let after: Vec<(u64, Option<String>)> = ring.after(3).into_iter().map(|e| (e.seq, e.trace_id)).collect();
        assert_eq!(after, [(4, Some("ab12".to_string()))]);
        assert!(ring.after(4).is_empty());
    }

    #[tokio::test]
    async fn a_follower_waits_for_the_next_line_or_its_time() {
        let ring = std::sync::Arc::new(LogRing::new(10));
        ring.append("c1", None, 1, vec![line("a")]);
        assert_eq!(ring.follow(0, std::time::Duration::ZERO).await.len(), 1);
        assert!(ring.follow(1, std::time::Duration::from_millis(20)).await.is_empty(), "nothing new: it times out");
        let writer = {
            let ring = ring.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                ring.append("c2", None, 2, vec![line("b")]);
            })
        };
        let next = ring.follow(1, std::time::Duration::from_secs(30)).await;
        assert_eq!(next.iter().map(|e| e.line.as_str()).collect::<Vec<_>>(), ["b"]);
        writer.await.unwrap();
    }

    #[test]
    fn long_lines_are_cut_at_a_char_boundary() {
        let ring = LogRing::new(1);
        ring.append("c", None, 0, vec![line(&"é".repeat(MAX_LINE_BYTES))]);
        let kept = &ring.after(0)[0].line;
        assert!(kept.len() <= MAX_LINE_BYTES && kept.len() > MAX_LINE_BYTES - 2);
    }
}
