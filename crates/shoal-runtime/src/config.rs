//! The runtime's one typed configuration. Every default is listed here;
//! nothing else in the crate reads settings from anywhere.

use std::path::PathBuf;
use std::time::Duration;

use crate::RuntimeError;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Where compiled artifacts are cached, keyed by wasm SHA-256 and the
    /// engine's fingerprint.
    pub cache_dir: PathBuf,
    /// Concurrent sandboxes (component or module instances) the pooling
    /// allocator reserves slots for. Default 1,000.
    pub max_instances: u32,
    /// The largest linear memory any call may have; a function's own limit
    /// must be at most this. Default 256 MiB.
    pub max_memory_bytes: usize,
    /// Wasm stack per call. Default 512 KiB.
    pub max_wasm_stack: usize,
    /// Stack of the fiber a call runs on: wasm stack plus room for host
    /// calls. Must exceed `max_wasm_stack` by at least 256 KiB. Default 1 MiB.
    pub async_stack_size: usize,
    /// Largest wasm binary accepted. Default 64 MiB.
    pub max_module_bytes: usize,
    /// Compilations run at once on the compile pool. Default 1.
    pub compile_concurrency: usize,
    /// The longest a deploy waits for its compile (including its turn on
    /// the pool) before it is answered `CompileTimeout`. Default 60 s.
    pub compile_timeout: Duration,
    /// How often the epoch advances: the granularity of yields and deadline
    /// checks. Default 1 ms.
    pub epoch_tick: Duration,
    /// Bytes of a call's stdout/stderr kept as logs (and, for command
    /// modules, the largest stdout accepted as output). Default 1 MiB.
    pub max_log_bytes: usize,
    /// Log lines a call's captured output is split into: the last ones,
    /// stderr's first. Default 1,000.
    pub max_log_lines: usize,
    /// Largest output a call may return. Default 6 MiB.
    pub max_output_bytes: usize,
    /// Running time after which a call counts as long. Default 5 ms.
    pub long_call_after: Duration,
    /// Long calls that may run at once; the others wait their turn, tick
    /// by tick, so some cores always stay free for short calls. Default:
    /// one less than the cores (at least 1).
    pub long_call_lanes: u32,
    /// Longest chain of calls (a root call is depth 0). Default 16.
    pub max_call_depth: u32,
    /// Spawned calls not yet awaited, per root call and all its
    /// descendants together. Default 1,000.
    pub max_spawns_per_root: u32,
    /// A sampled call's state operations that take at least this long are
    /// timed for its trace. Default 1 ms.
    pub trace_state_ops_over: std::time::Duration,
    /// The Python runtime component (componentize-py's CPython against
    /// `wit/interpreter.wit`), shared by every Python function; without
    /// one, Python deploys are refused. Default: none (the node passes
    /// the one it is built with).
    pub python_runtime: RuntimeBinary,
    /// The JavaScript runtime component (componentize-js's StarlingMonkey
    /// against `wit/interpreter.wit`), shared the same way. Default: none.
    pub js_runtime: RuntimeBinary,
    /// Where compiled language runtimes are cached, if not in `cache_dir`
    /// (nodes on one machine may share it). Default: none.
    pub runtime_cache_dir: Option<PathBuf>,
    /// Linear memories of Python and JavaScript functions kept between
    /// calls, in all (least recently used go first; at most two per
    /// function and tenant, and only for that tenant's calls), each reset to its function's snapshot after a call by
    /// restoring only the pages the call wrote. A call that finds none
    /// makes one afresh. 0 turns reuse off. Needs Linux 6.7
    /// (PAGEMAP_SCAN); older kernels always make memories afresh.
    /// Default 64.
    pub idle_interpreter_memories: usize,
    /// Outbound HTTP of one call: requests in flight, bytes moved.
    pub outbound: crate::OutboundLimits,
}

/// A language runtime's component, built into the binary.
#[derive(Clone, Copy, Default)]
pub struct RuntimeBinary {
    bytes: Option<&'static [u8]>,
    sha256: Option<[u8; 32]>,
}

impl RuntimeBinary {
    /// `bytes`, hashed when the runtime is first needed.
    pub fn new(bytes: &'static [u8]) -> Self {
        Self { bytes: Some(bytes), sha256: None }
    }

    /// `bytes` with their SHA-256 computed when they were built: finding
    /// the runtime's compiled code in the cache then never reads them.
    pub fn prehashed(bytes: &'static [u8], sha256: [u8; 32]) -> Self {
        Self { bytes: Some(bytes), sha256: Some(sha256) }
    }

    pub(crate) fn bytes(&self) -> Option<&'static [u8]> {
        self.bytes
    }

    pub(crate) fn sha256(&self) -> Option<[u8; 32]> {
        self.sha256
    }
}

impl std::fmt::Debug for RuntimeBinary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.bytes {
            Some(bytes) => write!(f, "RuntimeBinary({} bytes)", bytes.len()),
            None => f.write_str("RuntimeBinary(none)"),
        }
    }
}

impl RuntimeConfig {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            max_instances: 1000,
            max_memory_bytes: 256 * MIB,
            max_wasm_stack: 512 * KIB,
            async_stack_size: MIB,
            max_module_bytes: 64 * MIB,
            compile_concurrency: 1,
            compile_timeout: Duration::from_secs(60),
            epoch_tick: Duration::from_millis(1),
            max_log_bytes: MIB,
            max_log_lines: 1000,
            max_output_bytes: 6 * MIB,
            long_call_after: Duration::from_millis(5),
            long_call_lanes: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
                .saturating_sub(1)
                .max(1),
            max_call_depth: 16,
            max_spawns_per_root: 1000,
            trace_state_ops_over: std::time::Duration::from_millis(1),
            python_runtime: RuntimeBinary::default(),
            js_runtime: RuntimeBinary::default(),
            runtime_cache_dir: None,
            idle_interpreter_memories: 64,
            outbound: crate::OutboundLimits::default(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), RuntimeError> {
        let invalid = |msg: String| Err(RuntimeError::Config(msg));
        if self.max_instances == 0 {
            return invalid("max_instances must be at least 1".into());
        }
        if self.compile_concurrency == 0 {
            return invalid("compile_concurrency must be at least 1".into());
        }
        if self.async_stack_size < self.max_wasm_stack + 256 * KIB {
            return invalid(format!(
                "async_stack_size ({}) must exceed max_wasm_stack ({}) by 256 KiB of host headroom",
                self.async_stack_size, self.max_wasm_stack
            ));
        }
        if self.long_call_lanes == 0 {
            return invalid("long_call_lanes must be at least 1".into());
        }
        if self.compile_timeout.is_zero() {
            return invalid("compile_timeout must be positive".into());
        }
        if self.epoch_tick.is_zero() {
            return invalid("epoch_tick must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fiber_stack_must_leave_host_headroom_above_the_wasm_stack() {
        let mut config = RuntimeConfig::new("/nonexistent");
        assert!(config.validate().is_ok(), "the defaults are valid");
        config.async_stack_size = config.max_wasm_stack + 128 * KIB;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("256 KiB of host headroom"), "{error}");
        config.async_stack_size = config.max_wasm_stack + 256 * KIB;
        assert!(config.validate().is_ok());
        config.compile_timeout = Duration::ZERO;
        assert!(config.validate().is_err(), "a compile needs some time");
    }
}
