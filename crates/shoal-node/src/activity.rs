//! What a function's calls did lately on this node, for the console and
//! `GET /v1/functions/{tenant}/{name}/calls`: its last [`RECENT`] calls
//! (id, when, outcome, duration, CPU, trace) and, per [`SLOT_SECONDS`]
//! slot over the last [`SLOTS`] slots, its calls, errors and a latency
//! histogram (two bins per octave) from which p50 and p99 are read.
//!
//! Each function has one, kept across redeploys like its logs and made
//! (about 14 KiB) on its first call, so a tenant's thousand idle functions
//! cost a pointer each. Recording a call takes the function's own lock
//! once; readers copy out under it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Calls kept per function, newest last.
pub const RECENT: usize = 50;
/// Seconds per slot of the series.
pub const SLOT_SECONDS: u64 = 10;
/// Slots kept: five minutes.
pub const SLOTS: usize = 30;
/// Latency bins: bin 0 is under 1 µs, bin `b` ≥ 1 covers
/// `[2^((b-1)/2), 2^(b/2))` µs; the last holds everything from ~2 minutes.
const BINS: usize = 56;

/// One call, as the console lists it.
#[derive(Clone, Debug, Serialize)]
pub struct RecentCall {
    pub call_id: String,
    /// Unix ms when it ended.
    pub time_ms: u64,
    /// `ok`, or the kind of its error (`trap`, `timeout`, `overloaded`, …).
    pub outcome: &'static str,
    /// Wall time from its arrival to its end (none for one refused).
    pub duration_us: Option<u64>,
    pub cpu_us: Option<u64>,
    /// Its trace, when it was sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// How a call ended, as [`CallHistory::record`] takes it.
pub struct Ended<'a> {
    pub call_id: &'a str,
    pub trace_id: Option<&'a str>,
    pub outcome: Result<(), &'static str>,
    pub elapsed: Option<Duration>,
    pub cpu: Option<Duration>,
}

#[derive(Clone, Copy)]
struct Slot {
    /// Unix seconds / SLOT_SECONDS: which slot of time this holds.
    number: u64,
    calls: u32,
    errors: u32,
    bins: [u32; BINS],
}

impl Slot {
    const EMPTY: Slot = Slot { number: 0, calls: 0, errors: 0, bins: [0; BINS] };
}

/// A call as kept: its ids in place, so that recording one allocates
/// nothing (a node's thousand functions keep 50 each, and a call is
/// recorded on every call's path).
struct Kept {
    call_id: Id,
    trace_id: Option<Id>,
    time_ms: u64,
    outcome: &'static str,
    duration_us: Option<u64>,
    cpu_us: Option<u64>,
}

/// An id of up to [`Id::INLINE`] bytes kept in place (the node's call and
/// trace ids are 16 and 32), a longer one (another node's) on the heap.
enum Id {
    Inline { len: u8, bytes: [u8; Id::INLINE] },
    Heap(Box<str>),
}

impl Id {
    const INLINE: usize = 32;

    fn new(text: &str) -> Self {
        if text.len() <= Self::INLINE {
            let mut bytes = [0; Self::INLINE];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            Self::Inline { len: text.len() as u8, bytes }
        } else {
            Self::Heap(text.into())
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // The bytes are a whole `str`'s, copied.
            Self::Inline { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default(),
            Self::Heap(text) => text,
        }
    }
}

impl Kept {
    fn view(&self) -> RecentCall {
        RecentCall {
            call_id: self.call_id.as_str().to_string(),
            time_ms: self.time_ms,
            outcome: self.outcome,
            duration_us: self.duration_us,
            cpu_us: self.cpu_us,
            trace_id: self.trace_id.as_ref().map(|id| id.as_str().to_string()),
        }
    }
}

struct History {
    recent: VecDeque<Kept>,
    /// Indexed by slot number modulo SLOTS; a slot whose number is not the
    /// one asked for holds older time and counts as empty.
    slots: [Slot; SLOTS],
}

/// A function's recent calls and rates on this node.
#[derive(Default)]
pub struct CallHistory {
    inner: Mutex<Option<Box<History>>>,
}

impl std::fmt::Debug for CallHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallHistory").finish_non_exhaustive()
    }
}

/// One slot of the series, as clients see it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SlotView {
    /// Unix ms at the slot's start.
    pub start_ms: u64,
    pub calls: u32,
    pub errors: u32,
    /// Latency quantiles of the slot's calls that ran (null when none did),
    /// read off the histogram: within ~20% of the true value.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The last minute (or the window asked for), summed.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub window_seconds: u64,
    pub calls: u64,
    pub calls_per_second: f64,
    /// Errors / calls (0 with no calls).
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A latency histogram of its own (two bins per octave from 1 µs), for
/// what is not a call: a queue's delivery delays.
#[derive(Debug)]
pub(crate) struct Latencies {
    bins: std::sync::Mutex<[u32; BINS]>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self { bins: std::sync::Mutex::new([0; BINS]) }
    }
}

impl Latencies {
    pub(crate) fn record(&self, elapsed: Duration) {
        let mut bins = self.bins.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let bin = &mut bins[bin_of(elapsed)];
        *bin = bin.saturating_add(1);
    }

    /// How many were recorded, and their p50 and p99 in ms (None before any).
    pub(crate) fn summary(&self) -> (u64, Option<f64>, Option<f64>) {
        let bins = *self.bins.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (bins.iter().map(|&n| u64::from(n)).sum(), quantile(&bins, 0.5), quantile(&bins, 0.99))
    }
}

fn bin_of(elapsed: Duration) -> usize {
    let us = elapsed.as_secs_f64() * 1e6;
    if us < 1.0 {
        return 0;
    }
    // Two bins per octave: 1 + floor(2 * log2(us)).
    ((2.0 * us.log2()).floor() as usize + 1).min(BINS - 1)
}

/// The geometric middle of a bin, in ms.
fn bin_middle_ms(bin: usize) -> f64 {
    if bin == 0 {
        return 0.0005;
    }
    2f64.powf((2.0 * bin as f64 - 1.0) / 4.0) / 1000.0
}

fn quantile(bins: &[u32; BINS], q: f64) -> Option<f64> {
    let total: u64 = bins.iter().map(|&n| u64::from(n)).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (bin, &n) in bins.iter().enumerate() {
        seen += u64::from(n);
        if seen >= rank {
            return Some((bin_middle_ms(bin) * 1000.0).round() / 1000.0);
        }
    }
    None
}

impl CallHistory {
    /// Note a call that ended at `now_ms`.
    pub fn record(&self, now_ms: u64, call: Ended<'_>) {
        let entry = Kept {
            call_id: Id::new(call.call_id),
            time_ms: now_ms,
            outcome: match call.outcome {
                Ok(()) => "ok",
                Err(kind) => kind,
            },
            duration_us: call.elapsed.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            cpu_us: call.cpu.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            trace_id: call.trace_id.map(Id::new),
        };
        let number = now_ms / 1000 / SLOT_SECONDS;
        let mut guard = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let history = guard.get_or_insert_with(|| {
            Box::new(History { recent: VecDeque::with_capacity(RECENT), slots: [Slot::EMPTY; SLOTS] })
        });
        if history.recent.len() == RECENT {
            history.recent.pop_front();
        }
        history.recent.push_back(entry);
        let slot = &mut history.slots[(number % SLOTS as u64) as usize];
        if slot.number != number {
            *slot = Slot { number, ..Slot::EMPTY };
        }
        slot.calls = slot.calls.saturating_add(1);
        if call.outcome.is_err() {
            slot.errors = slot.errors.saturating_add(1);
        }
        if let Some(elapsed) = call.elapsed {
            let bin = &mut slot.bins[bin_of(elapsed)];
            *bin = bin.saturating_add(1);
        }
    }

    /// The calls kept, newest first.
    pub fn recent(&self) -> Vec<RecentCall> {
        let guard = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.as_ref().map(|h| h.recent.iter().rev().map(Kept::view).collect()).unwrap_or_default()
    }

    /// The slots of the last five minutes up to `now_ms`, oldest first
    /// (empty slots included: a chart's x axis is time).
    fn slots(&self, now_ms: u64) -> Vec<Slot> {
        let current = now_ms / 1000 / SLOT_SECONDS;
        let guard = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (0..SLOTS as u64)
            .rev()
            .map(|back| {
                let number = current.saturating_sub(back);
                match guard.as_ref().map(|h| h.slots[(number % SLOTS as u64) as usize]) {
                    Some(slot) if slot.number == number => slot,
                    _ => Slot { number, ..Slot::EMPTY },
                }
            })
            .collect()
    }

    /// The series of the last five minutes, oldest slot first; the last
    /// one is the slot still filling.
    pub fn series(&self, now_ms: u64) -> Vec<SlotView> {
        self.slots(now_ms)
            .iter()
            .map(|slot| SlotView {
                start_ms: slot.number * SLOT_SECONDS * 1000,
                calls: slot.calls,
                errors: slot.errors,
                p50_ms: quantile(&slot.bins, 0.5),
                p99_ms: quantile(&slot.bins, 0.99),
            })
            .collect()
    }

    /// The last `window_slots` slots (the one filling included) summed.
    pub fn summary(&self, now_ms: u64, window_slots: usize) -> Summary {
        let window_slots = window_slots.clamp(1, SLOTS);
        let slots = self.slots(now_ms);
        let mut bins = [0u32; BINS];
        let (mut calls, mut errors) = (0u64, 0u64);
        for slot in &slots[SLOTS - window_slots..] {
            calls += u64::from(slot.calls);
            errors += u64::from(slot.errors);
            for (sum, n) in bins.iter_mut().zip(slot.bins) {
                *sum = sum.saturating_add(n);
            }
        }
        // The slot filling has run only part of its time.
        let filling_ms = now_ms % (SLOT_SECONDS * 1000);
        let window_ms = (window_slots as u64 - 1) * SLOT_SECONDS * 1000 + filling_ms.max(1);
        Summary {
            window_seconds: window_slots as u64 * SLOT_SECONDS,
            calls,
            calls_per_second: ((calls as f64 * 1000.0 / window_ms as f64) * 100.0).round() / 100.0,
            error_rate: if calls == 0 { 0.0 } else { ((errors as f64 / calls as f64) * 10_000.0).round() / 10_000.0 },
            p50_ms: quantile(&bins, 0.5),
            p99_ms: quantile(&bins, 0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended<'a>(id: &'a str, outcome: Result<(), &'static str>, ms: u64) -> Ended<'a> {
        Ended {
            call_id: id,
            trace_id: None,
            outcome,
            elapsed: Some(Duration::from_millis(ms)),
            cpu: Some(Duration::from_micros(ms * 500)),
        }
    }

    #[test]
    fn ids_of_any_length_come_back_as_they_were_recorded() {
        let history = CallHistory::default();
        let long = "n".repeat(Id::INLINE) + "é-and-more";
        let mut call = ended(&long, Ok(()), 1);
        call.trace_id = Some("0123456789abcdef0123456789abcdef");
        history.record(1_000, call);
        history.record(2_000, ended("short", Ok(()), 1));
        let exact = "x".repeat(Id::INLINE);
        history.record(3_000, ended(&exact, Ok(()), 1));
        let recent = history.recent();
        assert_eq!(recent[0].call_id, exact);
        assert_eq!((recent[1].call_id.as_str(), recent[1].trace_id.as_deref()), ("short", None));
        assert_eq!(recent[2].call_id, long);
        assert_eq!(recent[2].trace_id.as_deref(), Some("0123456789abcdef0123456789abcdef"));
        // The size the docs and LIMITS.md give.
        let size = std::mem::size_of::<History>() + RECENT * std::mem::size_of::<Kept>();
        assert!((12 << 10..16 << 10).contains(&size), "{size} bytes per function");
    }

    #[test]
    fn nothing_is_made_before_the_first_call() {
        let history = CallHistory::default();
        assert!(history.inner.lock().unwrap().is_none());
        assert!(history.recent().is_empty());
        let series = history.series(1_000_000);
        assert_eq!(series.len(), SLOTS);
        assert!(series.iter().all(|s| s.calls == 0 && s.p50_ms.is_none()));
        assert_eq!(series.last().unwrap().start_ms, 1_000_000 / 10_000 * 10_000);
    }

    #[test]
    fn the_newest_calls_are_kept_newest_first() {
        let history = CallHistory::default();
        let ids: Vec<String> = (0..RECENT + 5).map(|i| format!("c{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            history.record(1_000 + i as u64, ended(id, Ok(()), 1));
        }
        let recent = history.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].call_id, format!("c{}", RECENT + 4));
        assert_eq!(recent.last().unwrap().call_id, "c5");
        assert_eq!(recent[0].duration_us, Some(1000));
        assert_eq!(recent[0].cpu_us, Some(500));
    }

    #[test]
    fn slots_count_calls_errors_and_quantiles_and_forget_old_time() {
        let history = CallHistory::default();
        let t0 = 1_700_000_000_000u64;
        for i in 0..98 {
            history.record(t0 + i, ended("a", Ok(()), 2));
        }
        history.record(t0 + 200, ended("b", Err("trap"), 100));
        history.record(t0 + 201, ended("c", Err("timeout"), 100));
        let series = history.series(t0 + 500);
        let last = series.last().unwrap();
        assert_eq!((last.calls, last.errors), (100, 2));
        let p50 = last.p50_ms.unwrap();
        assert!((1.6..=2.4).contains(&p50), "p50 {p50} ms of calls that took 2 ms");
        let p99 = last.p99_ms.unwrap();
        assert!((80.0..=120.0).contains(&p99), "p99 {p99} ms: the 99th of 100 took 100 ms");
        let summary = history.summary(t0 + 500, 6);
        assert_eq!(summary.calls, 100);
        assert_eq!(summary.error_rate, 0.02);
        // Five minutes later the slot is old time: it reads as empty.
        let later = t0 + (SLOTS as u64 * SLOT_SECONDS + 1) * 1000;
        assert!(history.series(later).iter().all(|s| s.calls == 0));
        assert_eq!(history.summary(later, SLOTS).calls, 0);
        // The same ring position, a new slot: counted afresh.
        history.record(later, ended("d", Ok(()), 1));
        assert_eq!(history.series(later).last().unwrap().calls, 1);
    }

    #[test]
    fn a_refused_call_counts_as_an_error_with_no_latency() {
        let history = CallHistory::default();
        let call = Ended { call_id: "x", trace_id: Some("ab"), outcome: Err("overloaded"), elapsed: None, cpu: None };
        history.record(5_000, call);
        let last = history.series(5_000).pop().unwrap();
        assert_eq!((last.calls, last.errors, last.p50_ms), (1, 1, None));
        let recent = &history.recent()[0];
        assert_eq!((recent.outcome, recent.duration_us, recent.trace_id.as_deref()), ("overloaded", None, Some("ab")));
    }

    #[test]
    fn bins_cover_their_latencies() {
        for us in [1u64, 3, 10, 150, 1_000, 42_000, 3_000_000] {
            let bin = bin_of(Duration::from_micros(us));
            let middle_us = bin_middle_ms(bin) * 1000.0;
            let ratio = middle_us / us as f64;
            assert!((0.7..=1.42).contains(&ratio), "{us} µs → bin {bin}, middle {middle_us} µs");
        }
        assert_eq!(bin_of(Duration::from_secs(3600)), BINS - 1);
        assert_eq!(bin_of(Duration::from_nanos(10)), 0);
    }
}
