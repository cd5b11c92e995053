//! What Shoal asks of the OS: about the calling thread, its priority
//! (Linux `nice`, which applies per thread) and the CPU time it has used;
//! about the process's memory, to give back what a compile or a load held
//! once it is done.
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

/// Set the C allocator up for a long-lived node, once at the start of the
/// process (before its threads). glibc's malloc raises its threshold for
/// serving a block by its own mapping to the size of the largest such block
/// freed (up to 32 MiB), and then keeps up to twice that free in its arenas:
/// after one compile or one read of a large artifact, tens of MiB freed
/// stay resident for good. A fixed threshold turns that off: blocks of
/// 2 MiB and more are mapped on their own and unmapped when freed. Not
/// lower: a streamed body moves in chunks of up to 1 MiB or so, and a
/// chunk mapped, faulted in page by page and unmapped each time streamed
/// at a third of the speed.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and changes only malloc's
        // parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
        }
    }
}

/// Give back to the OS the memory the C allocator holds free (in every
/// arena, not only at the top of each). Costs a walk of the free lists:
/// for after a compile, a load or the node's start, not for every call.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free pages to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Drop from the process's resident set the pages of `bytes`, data built
/// into the executable (e.g. an interpreter runtime read once to compile
/// it). Only whole pages inside `bytes` that are clean copies of a file
/// go: they are read from the file again if they are ever used again.
/// Anything else (memory of the process's own, written pages) stays as it
/// is, so this never changes what `bytes` holds.
pub fn release_static(bytes: &'static [u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (bytes.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (bytes.as_ptr() as usize + bytes.len()) & !(PAGE - 1);
        if end > start {
            // SAFETY: the range lies inside `bytes`. MADV_PAGEOUT reclaims
            // pages as memory pressure would: a clean page of a file is
            // dropped and faulted back in from the file, anything else is
            // swapped out or left, never lost. No reference is affected.
            let result = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
            if result != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "could not release built-in data");
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
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

    /// A streamed body's 1 MiB chunk comes from malloc's arenas (as its own
    /// mapping it was faulted in and unmapped every time: a third of the
    /// speed), while a large block still gets a mapping of its own (the
    /// threshold is fixed, not raised by what was freed).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_chunk_of_a_stream_is_not_a_mapping_of_its_own_and_a_large_block_is() {
        tune_allocator();
        // SAFETY: mallinfo2 only reads malloc's counters.
        let mapped = || unsafe { libc::mallinfo2() }.hblks;
        // Other tests' threads may map or unmap blocks at the same time:
        // one undisturbed look of several is enough.
        let grows_by = |bytes: usize, by: usize| {
            (0..8).any(|_| {
                let before = mapped();
                let block = std::hint::black_box(vec![7u8; bytes]);
                let during = mapped();
                drop(block);
                during == before + by
            })
        };
        assert!(grows_by(1 << 20, 0), "a 1 MiB block was mapped on its own");
        assert!(grows_by(8 << 20, 1), "an 8 MiB block came from the arenas");
        // Freeing it did not raise the threshold.
        assert!(grows_by(8 << 20, 1), "the threshold moved");
    }

    /// Built-in data: a static the compiler places in the executable's
    /// read-only data (a non-zero pattern, so it is not in .bss).
    static BUILT_IN: [u8; 5 * 4096] = {
        let mut bytes = [0u8; 5 * 4096];
        let mut i = 0;
        while i < bytes.len() {
            bytes[i] = (i % 251) as u8;
            i += 1;
        }
        bytes
    };

    #[test]
    fn released_built_in_data_reads_back_the_same() {
        let sum = |b: &[u8]| b.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8);
        assert!(sum(&BUILT_IN));
        release_static(&BUILT_IN);
        assert!(sum(&BUILT_IN), "released pages come back from the file unchanged");
        // Memory of the process's own is never lost either.
        let owned: &'static [u8] = Box::leak(vec![9u8; 4 * 4096].into_boxed_slice());
        release_static(owned);
        assert!(owned.iter().all(|&x| x == 9));
        release_free_memory();
    }
}
