//! What Shoal asks of the OS about the calling thread: its priority
//! (Linux `nice`, which applies per thread) and the CPU time it has used.
#![allow(unsafe_code)]

use std::time::{Duration, Instant};

/// A point in the calling thread's CPU time: the difference of two, taken
/// on one thread, is the CPU that thread used in between — not counting
/// time it was preempted by others (a wall clock would count it).
#[derive(Clone, Copy, Debug)]
pub enum CpuClock {
    Thread(Duration),
    /// Where the thread's CPU clock cannot be read: wall time.
    Wall(Instant),
}

impl CpuClock {
    pub fn now() -> Self {
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
    pub fn elapsed(self) -> Duration {
        match (self, Self::now()) {
            (Self::Thread(then), Self::Thread(now)) => now.saturating_sub(then),
            (Self::Wall(then), _) => then.elapsed(),
            (Self::Thread(_), Self::Wall(_)) => Duration::ZERO,
        }
    }
}

/// Lower the calling thread's priority to `nice` (0 normal, 19 lowest).
/// Best effort: where it cannot be done, the thread keeps its priority.
pub fn lower_this_thread(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `gettid` and `setpriority` take and return plain integers
        // and touch no memory of ours.
        #[allow(unsafe_code)]
        let result = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
        };
        if result != 0 {
            tracing::debug!(nice, error = %std::io::Error::last_os_error(), "could not lower a thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

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
