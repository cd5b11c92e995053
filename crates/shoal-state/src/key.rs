//! State keys as the host sees them: a guest's key string scoped to its
//! tenant. Tenant names cannot contain `/` (they match
//! `[a-z0-9][a-z0-9_-]{0,62}`), so the scoped form `<tenant>/<key>` is
//! unambiguous: whatever the key string holds — `../other/x`, more `/`,
//! NUL bytes — it stays under the caller's tenant.

use crate::StateError;

/// Longest key a guest or client may use, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// A key scoped to its tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopedKey(String);

impl ScopedKey {
    /// Scope `key` to `tenant`. The tenant is trusted (it comes from the
    /// caller's identity, never from the key); the key is checked.
    pub fn new(tenant: &str, key: &str) -> Result<Self, StateError> {
        debug_assert!(!tenant.is_empty() && !tenant.contains('/'), "tenant names are validated at the edge");
        if key.is_empty() {
            return Err(StateError::InvalidKey("a key must not be empty".into()));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(StateError::TooLarge(format!("key is {} bytes, over the limit of {MAX_KEY_BYTES}", key.len())));
        }
        Ok(Self(format!("{tenant}/{key}")))
    }

    /// The prefix every key of `tenant` starts with.
    pub fn tenant_prefix(tenant: &str) -> String {
        format!("{tenant}/")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn tenant(&self) -> &str {
        self.0.split_once('/').map(|(tenant, _)| tenant).unwrap_or_default()
    }

    /// The key as the tenant wrote it.
    pub fn key(&self) -> &str {
        self.0.split_once('/').map(|(_, key)| key).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_key_leaves_its_tenant() {
        for key in ["../other/x", "/other/x", "other/x", "a\0b", "..", "x/../../y", "\u{202e}rtl"] {
            let scoped = ScopedKey::new("acme", key).unwrap();
            assert_eq!(scoped.tenant(), "acme", "{key:?}");
            assert_eq!(scoped.key(), key);
            assert!(scoped.as_str().starts_with(&ScopedKey::tenant_prefix("acme")));
        }
    }

    #[test]
    fn empty_and_overlong_keys_are_refused() {
        assert!(matches!(ScopedKey::new("acme", ""), Err(StateError::InvalidKey(_))));
        assert!(ScopedKey::new("acme", &"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(matches!(ScopedKey::new("acme", &"k".repeat(MAX_KEY_BYTES + 1)), Err(StateError::TooLarge(_))));
    }
}
