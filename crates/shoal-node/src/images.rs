//! The image budget: at most `max_loaded_images` function images stay
//! loaded. A call of a function whose image was dropped reloads it from
//! the compiled-artifact cache (the wasm comes from the store, the code
//! from the cache file: no compiling); loading one past the budget drops
//! the least recently used image no call is using. Many functions then
//! cost their records and their files on disk, not resident code.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use shoal_runtime::{DeployError, FunctionImage};

use crate::Node;
use crate::registry::DeployedFunction;

/// Why an image could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImageError {
    #[error("the wasm of `{0}` is missing from the store")]
    Missing(String),
    #[error(transparent)]
    Store(#[from] shoal_state::StoreError),
    #[error(transparent)]
    Load(#[from] DeployError),
}

impl Node {
    /// The image of `function`, loading it again if it was dropped.
    pub(crate) async fn image_of(&self, function: &DeployedFunction) -> Result<Arc<FunctionImage>, ImageError> {
        function.touch(self.use_clock.fetch_add(1, Ordering::Relaxed));
        if let Some(image) = function.loaded() {
            return Ok(image);
        }
        let wasm = self
            .registry
            .module(&function.record.sha256)?
            .ok_or_else(|| ImageError::Missing(function.key.to_string()))?;
        let image = self.runtime().load(&wasm).await?;
        function.set_image(image.clone());
        self.enforce_image_budget();
        Ok(image)
    }

    /// Images loaded now.
    pub fn n_loaded_images(&self) -> usize {
        self.registry.all().iter().filter(|f| f.loaded().is_some()).count()
    }

    /// Drop least recently used idle images until the budget holds (or
    /// every image left is in use).
    pub(crate) fn enforce_image_budget(&self) {
        let mut loaded: Vec<Arc<DeployedFunction>> =
            self.registry.all().into_iter().filter(|f| f.loaded().is_some()).collect();
        let budget = self.config.max_loaded_images;
        if loaded.len() <= budget {
            return;
        }
        loaded.sort_by_key(|f| f.last_used());
        let mut excess = loaded.len() - budget;
        for function in loaded {
            if excess == 0 {
                break;
            }
            if function.evict() {
                excess -= 1;
            }
        }
    }
}
