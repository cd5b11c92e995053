//! The executor: a fixed number of call slots in front of the runtime.
//! Taking a slot never waits: a call either starts now or is refused.

use std::sync::Arc;
use std::time::Duration;

use shoal_runtime::{CallOutput, CallSettings, FunctionImage, Lineage, Runtime};
use tokio::sync::Semaphore;

/// Every call slot is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("all {limit} call slots are busy; retry after {} ms", retry_after.as_millis())]
pub struct Overloaded {
    pub limit: u32,
    pub retry_after: Duration,
}

/// How long a refused caller is told to wait. Calls are short; a second is
/// the smallest `Retry-After` HTTP can express.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct Executor {
    runtime: Arc<Runtime>,
    slots: Semaphore,
    n_slots: u32,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").field("n_slots", &self.n_slots).field("busy", &self.busy()).finish()
    }
}

impl Executor {
    /// An executor running at most `n_slots` calls at once, never more than
    /// the runtime has sandboxes for.
    pub fn new(runtime: Arc<Runtime>, n_slots: u32) -> Self {
        let n_slots = n_slots.clamp(1, runtime.config().max_instances);
        Self { runtime, slots: Semaphore::new(n_slots as usize), n_slots }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn n_slots(&self) -> u32 {
        self.n_slots
    }

    /// Calls running now.
    pub fn busy(&self) -> u32 {
        self.n_slots - self.slots.available_permits() as u32
    }

    /// Run one call now, or refuse it at once if every slot is busy.
    pub async fn run(
        &self,
        image: &FunctionImage,
        settings: &CallSettings,
        input: &[u8],
    ) -> Result<CallOutput, Overloaded> {
        self.run_in(image, settings, input, Lineage::root()).await
    }

    /// Run a call at its place in a tree of chained calls now, or refuse
    /// it at once if every slot is busy.
    pub async fn run_in(
        &self,
        image: &FunctionImage,
        settings: &CallSettings,
        input: &[u8],
        lineage: Lineage,
    ) -> Result<CallOutput, Overloaded> {
        let Ok(_slot) = self.slots.try_acquire() else {
            return Err(Overloaded { limit: self.n_slots, retry_after: RETRY_AFTER });
        };
        Ok(self.runtime.call_in(image, settings, input, lineage).await)
    }

    /// Wait until a slot is free (for work already accepted, such as
    /// asynchronous calls), then hold it until the call it runs ends.
    pub async fn wait_for_slot(&self) -> Slot<'_> {
        // The semaphore is never closed, so acquiring only ever waits.
        let permit = self.slots.acquire().await.ok();
        Slot { executor: self, _permit: permit }
    }
}

/// A call slot held for one call.
pub struct Slot<'a> {
    executor: &'a Executor,
    _permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl Slot<'_> {
    /// Run one root call in this slot, then give the slot back.
    pub async fn run(self, image: &FunctionImage, settings: &CallSettings, input: &[u8]) -> CallOutput {
        self.executor.runtime.call(image, settings, input).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_runtime::RuntimeConfig;

    #[tokio::test]
    async fn a_call_beyond_the_slots_is_refused_at_once_and_slots_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::new(dir.path());
        config.max_instances = 4;
        let runtime = Arc::new(Runtime::new(config).unwrap());
        let executor = Arc::new(Executor::new(runtime.clone(), 1));
        let image = runtime.load(shoal_guests::MISBEHAVE).await.unwrap();
        let settings = CallSettings {
            tenant: Arc::from("t"),
            memory_limit: 16 << 20,
            timeout: Duration::from_millis(300),
            env: Arc::from(Vec::new()),
        };
        let busy = {
            let (executor, image, settings) = (executor.clone(), image.clone(), settings.clone());
            tokio::spawn(async move { executor.run(&image, &settings, b"loop").await })
        };
        // Wait until the looping call holds the slot (it yields every tick).
        while executor.busy() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = executor.run(&image, &settings, b"x").await;
        assert_eq!(refused.unwrap_err().limit, 1);
        assert!(busy.await.unwrap().unwrap().result.is_err(), "the loop ends at its deadline");
        assert_eq!(executor.busy(), 0);
        let out = executor.run(&image, &settings, b"x").await.unwrap();
        assert!(out.result.is_ok());
    }
}
