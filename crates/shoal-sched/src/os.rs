//! What the executor asks of the OS about the calling thread: its
//! priority (Linux `nice`, which applies per thread) and the CPU time it
//! has used.
#![allow(unsafe_code)]

use std::time::{Duration, Instant};

/// A point in the calling thread's CPU time: the difference of two, taken
/// on one thread, is the CPU that thread used in between — not counting
/// time it was preempted by others (a wall clock would count it).
#[derive(Clone, Copy, Debug)]
pub(crate) enum CpuClock {
    Thread(Duration),
    /// Where the thread's CPU clock cannot be read: wall time.
    Wall(Instant),
}

impl CpuClock {
    pub(crate) fn now() -> Self {
        #[cfg(target_os = "linux")]
        {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: `ts` is a valid, writable timespec for the call.
            if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
                return Self::Thread(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
            }
        }
        Self::Wall(Instant::now())
    }

    /// CPU time used since `self` (on the same thread).
    pub(crate) fn elapsed(self) -> Duration {
        match (self, Self::now()) {
            (Self::Thread(then), Self::Thread(now)) => now.saturating_sub(then),
            (Self::Wall(then), _) => then.elapsed(),
            (Self::Thread(_), Self::Wall(_)) => Duration::ZERO,
        }
    }
}

pub(crate) use shoal_runtime::lower_this_thread;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_clock_counts_running_not_waiting() {
        let start = CpuClock::now();
        assert!(matches!(start, CpuClock::Thread(_)), "Linux has a per-thread CPU clock");
        std::thread::sleep(Duration::from_millis(200));
        assert!(start.elapsed() < Duration::from_millis(100), "sleeping counted as CPU: {:?}", start.elapsed());
        // Spinning does count.
        let spin = CpuClock::now();
        let wall = Instant::now();
        while spin.elapsed() < Duration::from_millis(5) {
            assert!(wall.elapsed() < Duration::from_secs(30), "the thread's CPU clock does not advance");
        }
    }
}
