//! The image budget: at most `max_loaded_images` function images stay
//! loaded. A call of a function whose image was dropped reloads it from
//! the compiled-artifact cache (the wasm comes from the store, the code
//! from the cache file: no compiling); loading one past the budget drops
//! the least recently used image. Many functions then
//! cost their records and their files on disk, not resident code.

use std::collections::{HashMap, HashSet};
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

    /// Whether `tenant/name`'s image is loaded now (false if there is no
    /// such function).
    pub fn is_loaded(&self, tenant: &str, name: &str) -> bool {
        self.registry.get(tenant, name).is_some_and(|f| f.loaded().is_some())
    }

    /// Images loaded now (functions deployed with the same bytes share one).
    pub fn n_loaded_images(&self) -> usize {
        let all = self.registry.all();
        let loaded: HashSet<&str> =
            all.iter().filter(|f| f.loaded().is_some()).map(|f| f.record.sha256.as_str()).collect();
        loaded.len()
    }

    /// Drop least recently used images until the budget holds. An image is
    /// dropped from every function sharing it; a call using it keeps it
    /// alive until it ends (and a call starting meanwhile gets that same
    /// image back from the runtime, not a second copy).
    pub(crate) fn enforce_image_budget(&self) {
        let all = self.registry.all();
        // Loaded images by content, each with its last use and its users.
        let mut images: HashMap<&str, (u64, Vec<&Arc<DeployedFunction>>)> = HashMap::new();
        for function in all.iter().filter(|f| f.loaded().is_some()) {
            let (last_used, users) = images.entry(function.record.sha256.as_str()).or_default();
            *last_used = (*last_used).max(function.last_used());
            users.push(function);
        }
        let budget = self.config.max_loaded_images;
        if images.len() <= budget {
            return;
        }
        let mut images: Vec<(u64, Vec<&Arc<DeployedFunction>>)> = images.into_values().collect();
        images.sort_by_key(|(last_used, _)| *last_used);
        let excess = images.len() - budget;
        for (_, users) in images.into_iter().take(excess) {
            for function in users {
                function.evict();
            }
        }
    }
}
