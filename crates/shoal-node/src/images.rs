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
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Load(#[from] DeployError),
}

impl Node {
    /// The image of `function`, loading it again if it was dropped.
    pub(crate) async fn image_of(&self, function: &Arc<DeployedFunction>) -> Result<Arc<FunctionImage>, ImageError> {
        function.touch(self.use_clock.fetch_add(1, Ordering::Relaxed));
        if let Some(image) = function.loaded() {
            return Ok(image);
        }
        let wasm = self
            .registry
            .module(&function.record.sha256)
            .await?
            .ok_or_else(|| ImageError::Missing(function.key.to_string()))?;
        let image = self.runtime().load_with(&wasm, &function.record.load_options()).await?;
        function.set_image(image.clone());
        self.took_image(function);
        Ok(image)
    }

    /// `function` holds an image now: remember it (see
    /// `enforce_image_budget`) and keep to the budget.
    pub(crate) fn took_image(&self, function: &Arc<DeployedFunction>) {
        self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Arc::downgrade(function));
        self.enforce_image_budget();
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
    ///
    /// Only the functions given an image are looked at (those that let it
    /// go, or are gone, are forgotten here): with thousands deployed and a
    /// budget of a hundred, a reload no longer walks every function.
    pub(crate) fn enforce_image_budget(&self) {
        let mut noted = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut loaded: Vec<Arc<DeployedFunction>> =
            noted.drain(..).filter_map(|weak| weak.upgrade()).filter(|f| f.loaded().is_some()).collect();
        // A function noted twice (loaded, let go and loaded again between
        // two passes) counts once.
        loaded.sort_unstable_by_key(Arc::as_ptr);
        loaded.dedup_by(|a, b| Arc::ptr_eq(a, b));
        noted.extend(loaded.iter().map(Arc::downgrade));
        let uses = loaded.iter().map(|f| (f.record.sha256.as_str(), f.last_used()));
        let drop = images_to_drop(uses, self.config.max_loaded_images);
        for function in &loaded {
            if drop.contains(function.record.sha256.as_str()) {
                function.evict();
            }
        }
    }
}

/// The eviction decision: given each loaded function's image (by content
/// hash) and its last use, the images to drop so that at most `budget`
/// stay — the least recently used, an image's last use being the latest
/// of its functions'. No more than needed.
pub(crate) fn images_to_drop<'a>(uses: impl Iterator<Item = (&'a str, u64)>, budget: usize) -> HashSet<&'a str> {
    let mut last_use: HashMap<&str, u64> = HashMap::new();
    for (image, used) in uses {
        let last = last_use.entry(image).or_default();
        *last = (*last).max(used);
    }
    if last_use.len() <= budget {
        return HashSet::new();
    }
    let mut images: Vec<(u64, &str)> = last_use.into_iter().map(|(image, used)| (used, image)).collect();
    images.sort_unstable();
    let excess = images.len() - budget;
    images.into_iter().take(excess).map(|(_, image)| image).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever is loaded: at most the budget is left, nothing is
        /// dropped that need not be, and every image dropped was used no
        /// later than every image kept.
        #[test]
        fn the_budget_holds_by_dropping_the_least_recently_used(
            uses in proptest::collection::vec((0usize..12, 0u64..1_000), 0..60),
            budget in 1usize..8,
        ) {
            let names: Vec<String> = (0..12).map(|i| format!("sha{i}")).collect();
            let uses: Vec<(&str, u64)> = uses.iter().map(|&(i, t)| (names[i].as_str(), t)).collect();
            let drop = images_to_drop(uses.iter().copied(), budget);
            let mut last: HashMap<&str, u64> = HashMap::new();
            for &(image, t) in &uses {
                let l = last.entry(image).or_default();
                *l = (*l).max(t);
            }
            let kept: Vec<&str> = last.keys().copied().filter(|i| !drop.contains(i)).collect();
            prop_assert!(drop.iter().all(|i| last.contains_key(i)), "dropped an image not loaded");
            prop_assert!(kept.len() <= budget);
            prop_assert_eq!(drop.len(), last.len().saturating_sub(budget));
            for d in &drop {
                for k in &kept {
                    prop_assert!(last[d] <= last[k], "dropped {} (used {}) kept {} (used {})", d, last[d], k, last[k]);
                }
            }
        }
    }
}
