//! Recent log lines of each function: what its calls wrote to stdout and
//! stderr, tagged with the call id. A bounded ring per function; the oldest
//! lines go first.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;
use shoal_runtime::LogLine;

#[derive(Clone, Debug, Serialize)]
pub struct LogEntry {
    pub call_id: String,
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
    lines: Mutex<VecDeque<LogEntry>>,
}

impl LogRing {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, lines: Mutex::new(VecDeque::new()) }
    }

    pub fn append(&self, call_id: &str, time_ms: u64, lines: Vec<LogLine>) {
        if lines.is_empty() || self.capacity == 0 {
            return;
        }
        let mut ring = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
            ring.push_back(LogEntry { call_id: call_id.to_string(), time_ms, stream: stream.as_str(), line });
        }
    }

    pub fn snapshot(&self) -> Vec<LogEntry> {
        let ring = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.iter().cloned().collect()
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
        ring.append("c1", 1, vec![line("a"), line("b")]);
        ring.append("c2", 2, vec![line("c"), line("d")]);
        let kept: Vec<(String, String)> = ring.snapshot().into_iter().map(|e| (e.call_id, e.line)).collect();
        assert_eq!(kept, [("c1".into(), "b".into()), ("c2".into(), "c".into()), ("c2".into(), "d".into())]);
    }

    #[test]
    fn long_lines_are_cut_at_a_char_boundary() {
        let ring = LogRing::new(1);
        ring.append("c", 0, vec![line(&"é".repeat(MAX_LINE_BYTES))]);
        let kept = &ring.snapshot()[0].line;
        assert!(kept.len() <= MAX_LINE_BYTES && kept.len() > MAX_LINE_BYTES - 2);
    }
}
