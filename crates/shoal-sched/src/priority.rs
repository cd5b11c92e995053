//! Thread priority (Linux `nice`, which applies per thread).
#![allow(unsafe_code)]

/// Lower the calling thread's priority to `nice` (0 normal, 19 lowest).
/// Best effort: where it cannot be done, the thread keeps its priority.
pub(crate) fn lower_this_thread(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `gettid` and `setpriority` take and return plain integers
        // and touch no memory of ours.
        let result = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
        };
        if result != 0 {
            tracing::debug!(nice, error = %std::io::Error::last_os_error(), "could not lower a call thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}
