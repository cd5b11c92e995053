//! The OS's view of the calling thread (priority, CPU time), from the
//! runtime, which needs it too.

pub(crate) use shoal_runtime::{CpuClock, lower_this_thread};
