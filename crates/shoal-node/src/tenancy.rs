//! A tenant's life after its creation: token rotation (a new token, the
//! old one valid for a grace period), revocation (every token refused at
//! once) and deletion (everything it has on the node removed, in the
//! background, with a status the admin can read).

use std::sync::Arc;
use std::time::Duration;

use crate::error::{ApiError, ErrorKind};
use crate::registry::PreviousToken;
use crate::{Node, auth, now_ms};

/// The longest grace period a rotated-out token may be given.
pub const MAX_TOKEN_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Tokens rotated out and still in their grace a tenant keeps at most:
/// past it the oldest is refused at once. Bounds the record, and the
/// hashes each request of the tenant is compared with, however often a
/// tenant rotates.
pub const MAX_PREVIOUS_TOKENS: usize = 4;

/// How long a deletion waits for the tenant's running calls to end before
/// it removes their state anyway (a call runs at most 15 minutes; its
/// functions are gone, so no new call starts).
const DELETE_WAIT: Duration = Duration::from_secs(16 * 60);

/// A new token for a tenant, and until when the one it replaced still works.
#[derive(Debug)]
pub struct Rotated {
    pub token: String,
    pub previous_valid_until_ms: u64,
}

fn gone(tenant: &str) -> ApiError {
    ApiError::not_found(format!("tenant `{tenant}` does not exist"))
}

fn being_deleted(tenant: &str) -> ApiError {
    ApiError::new(ErrorKind::Conflict, format!("tenant `{tenant}` is being deleted"))
}

impl Node {
    /// Give `tenant` a new token; the current one stays valid for `grace`
    /// (zero: refused at once). Tokens rotated out earlier keep their own
    /// grace; those whose grace ran out are forgotten.
    pub async fn rotate_token(&self, tenant: &str, grace: Duration) -> Result<Rotated, ApiError> {
        if grace > MAX_TOKEN_GRACE {
            return Err(ApiError::bad_request(format!(
                "grace_seconds must be at most {} (7 days)",
                MAX_TOKEN_GRACE.as_secs()
            )));
        }
        let token = auth::new_tenant_token(tenant);
        let hash = hex::encode(auth::hash_token(&token));
        let now = now_ms();
        let until = now.saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        let changed = self
            .registry
            .update_tenant(tenant, |record| {
                if record.deleting_since_ms.is_some() {
                    return false;
                }
                record.previous_tokens.retain(|t| t.valid_until_ms > now);
                let old = std::mem::replace(&mut record.token_sha256, hash);
                if !old.is_empty() && until > now {
                    record.previous_tokens.push(PreviousToken { token_sha256: old, valid_until_ms: until });
                }
                let excess = record.previous_tokens.len().saturating_sub(MAX_PREVIOUS_TOKENS);
                record.previous_tokens.drain(..excess);
                true
            })
            .await?;
        match changed {
            None => Err(gone(tenant)),
            Some(false) => Err(being_deleted(tenant)),
            Some(true) => {
                tracing::info!(%tenant, grace_s = grace.as_secs(), "tenant token rotated");
                Ok(Rotated { token, previous_valid_until_ms: until.max(now) })
            }
        }
    }

    /// Refuse every token of `tenant` from now on (its current one and any
    /// in their grace). The admin gives it a new one with a rotation.
    pub async fn revoke_tokens(&self, tenant: &str) -> Result<(), ApiError> {
        let changed = self
            .registry
            .update_tenant(tenant, |record| {
                record.token_sha256.clear();
                record.previous_tokens.clear();
            })
            .await?;
        changed.ok_or_else(|| gone(tenant))?;
        tracing::warn!(%tenant, "every token of the tenant revoked");
        Ok(())
    }

    /// Begin deleting `tenant`: from now on none of its tokens is valid and
    /// nothing of it can be deployed or called; its functions, state, call
    /// records and record are removed in the background. Returns when it
    /// began (again, if it had already).
    pub async fn delete_tenant(self: &Arc<Self>, tenant: &str) -> Result<u64, ApiError> {
        let now = now_ms();
        let since = self
            .registry
            .update_tenant(tenant, |record| *record.deleting_since_ms.get_or_insert(now))
            .await?
            .ok_or_else(|| gone(tenant))?;
        tracing::warn!(%tenant, "tenant deletion begun");
        self.spawn_deletion(tenant);
        Ok(since)
    }

    /// Run (or resume) a deletion on its own task; a failed step is tried
    /// again a few seconds later, until it is done.
    pub(crate) fn spawn_deletion(self: &Arc<Self>, tenant: &str) {
        let node = Arc::downgrade(self);
        let tenant = tenant.to_string();
        tokio::spawn(async move {
            loop {
                let Some(node) = node.upgrade() else { return };
                match node.finish_deletion(&tenant).await {
                    Ok(()) => return,
                    Err(e) => tracing::error!(%tenant, error = %e.message, "deleting the tenant failed; trying again"),
                }
                drop(node);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }

    /// Every step of a deletion, each idempotent.
    async fn finish_deletion(&self, tenant: &str) -> Result<(), ApiError> {
        // Its triggers, then its functions: no call of it can start after this.
        self.remove_triggers_of(tenant).await?;
        self.remove_queues_of(tenant).await?;
        let functions = self.registry.list(tenant);
        // Their versions' timeouts count too: an older version may run longer.
        let longest = functions
            .iter()
            .flat_map(|f| self.registry.versions_of(tenant, &f.name))
            .chain(functions.iter().cloned())
            .map(|f| f.timeout_ms)
            .max()
            .unwrap_or(0);
        for function in &functions {
            self.registry.remove(tenant, &function.name).await?;
        }
        self.collect_orphans();
        // Calls already running end (they are bounded by their timeouts)
        // before their state goes, so none writes after the wipe.
        let started = tokio::time::Instant::now();
        while (self.executor.in_use_of(tenant).0 > 0 || self.async_calls.unfinished_of(tenant) > 0)
            && started.elapsed() < DELETE_WAIT
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.cluster.is_some() && !functions.is_empty() {
            // Other nodes may have started calls of it just before they
            // mirrored the removal: those end within their timeout. (Each
            // node drops the tenant's local values when it mirrors the
            // deletion.)
            tokio::time::sleep(Duration::from_millis(longest) + Duration::from_secs(2)).await;
        }
        // Both tiers: the global tier's keys first, then this node's local values.
        let keys = self.state.delete_tenant(tenant).await?;
        let calls = self.async_calls.clone();
        let owner = tenant.to_string();
        let mut records = tokio::task::spawn_blocking(move || calls.delete_records_of(&owner))
            .await
            .map_err(|e| ApiError::internal("deleting a tenant's call records", e))??;
        if let Some(cluster) = &self.cluster {
            records += cluster.queue.forget_tenant(tenant).await?;
        }
        self.registry.remove_tenant(tenant).await?;
        self.executor.set_tenant_limits(tenant, Default::default());
        tracing::warn!(%tenant, state_keys = keys, call_records = records, "tenant deleted");
        Ok(())
    }

    /// Remove the compiled code of binaries no function uses any more (the
    /// registry counts who uses each; nothing on disk is scanned).
    pub(crate) fn collect_orphans(&self) {
        for sha in self.registry.take_orphaned() {
            let mut key = [0u8; 32];
            if self.registry.uses(&sha) || hex::decode_to_slice(&sha, &mut key).is_err() {
                continue;
            }
            let freed = self.runtime().forget_compiled(&key);
            tracing::debug!(sha256 = %sha, freed, "compiled code no function uses removed");
        }
    }

    /// Resume the deletions a previous run of the node did not finish.
    pub(crate) fn resume_deletions(self: &Arc<Self>) {
        for tenant in self.registry.tenants_being_deleted() {
            tracing::warn!(%tenant, "resuming a tenant's deletion");
            self.spawn_deletion(&tenant);
        }
    }
}
