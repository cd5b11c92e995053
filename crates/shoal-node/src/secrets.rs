//! Tenants' secrets: values a tenant sets once (write-only: never read
//! back, listed by name only), which the functions that name them at
//! deploy see as env vars and through `wasi:config/store`.
//!
//! A secret is kept sealed in its tenant's registry record (the embedded
//! store on one node, Redis in a cluster) with ChaCha20-Poly1305, under a
//! key derived from the admin token — which every node of a cluster is
//! given and neither the store nor Redis holds (only its hash) — with the
//! tenant and the secret's name as associated data, so a sealed value
//! copied under another name or tenant does not open. A call's settings
//! get the values when it starts, so a change reaches the next call.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorKind};
use crate::registry::DeployedFunction;
use crate::{Node, now_ms};

/// Secrets one tenant may have.
pub const MAX_SECRETS_PER_TENANT: usize = 64;
/// Bytes of one secret's value.
pub const MAX_SECRET_BYTES: usize = 4096;

/// A secret as kept: sealed, and when it was last set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    /// Base64 of the nonce (12 bytes) and the ciphertext with its tag.
    pub sealed: String,
    pub updated_ms: u64,
}

/// The key secrets are sealed with.
pub struct SecretKey(ChaCha20Poly1305);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

fn associated(tenant: &str, name: &str) -> Vec<u8> {
    format!("shoal secret\0{tenant}\0{name}").into_bytes()
}

impl SecretKey {
    /// The key of every node started with `admin_token`.
    pub fn derive(admin_token: &str) -> Self {
        let key: [u8; 32] = Sha256::new()
            .chain_update(b"shoal secrets key v1\0")
            .chain_update(admin_token.as_bytes())
            .finalize()
            .into();
        Self(ChaCha20Poly1305::new(Key::from_slice(&key)))
    }

    pub fn seal(&self, tenant: &str, name: &str, value: &str) -> String {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let aad = associated(tenant, name);
        let sealed = self
            .0
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: value.as_bytes(), aad: &aad })
            .expect("sealing a small value cannot fail");
        base64::engine::general_purpose::STANDARD.encode([nonce.as_slice(), &sealed].concat())
    }

    /// The value, or None if `sealed` does not open under this key for
    /// this tenant and name.
    pub fn open(&self, tenant: &str, name: &str, sealed: &str) -> Option<String> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(sealed).ok()?;
        if bytes.len() < 12 {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(12);
        let aad = associated(tenant, name);
        let value = self.0.decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: &aad }).ok()?;
        String::from_utf8(value).ok()
    }
}

/// A secret's name: an env var's (`[A-Za-z_][A-Za-z0-9_]*`), at most 64.
pub fn check_secret_name(name: &str) -> Result<(), ApiError> {
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("secret name {name:?} must match [A-Za-z_][A-Za-z0-9_]{{0,63}}")))
    }
}

impl Node {
    /// Set `tenant`'s secret `name` (UTF-8, at most [`MAX_SECRET_BYTES`]).
    pub async fn set_secret(&self, tenant: &str, name: &str, value: &[u8]) -> Result<(), ApiError> {
        check_secret_name(name)?;
        if value.len() > MAX_SECRET_BYTES {
            return Err(ApiError::new(
                ErrorKind::TooLarge,
                format!("a secret is at most {MAX_SECRET_BYTES} bytes; this one is {}", value.len()),
            ));
        }
        let value = std::str::from_utf8(value).map_err(|_| ApiError::bad_request("a secret's value must be UTF-8"))?;
        if !self.registry.tenant_active(tenant) {
            return Err(ApiError::not_found(format!("tenant `{tenant}` does not exist")));
        }
        let sealed = SealedSecret { sealed: self.secret_key.seal(tenant, name, value), updated_ms: now_ms() };
        let changed = self
            .registry
            .update_tenant(tenant, |record| {
                if !record.secrets.contains_key(name) && record.secrets.len() >= MAX_SECRETS_PER_TENANT {
                    return false;
                }
                record.secrets.insert(name.to_string(), sealed);
                true
            })
            .await?;
        match changed {
            Some(true) => Ok(()),
            Some(false) => Err(ApiError::new(
                ErrorKind::LimitExceeded,
                format!("tenant `{tenant}` has {MAX_SECRETS_PER_TENANT} secrets, its limit; remove one first"),
            )),
            None => Err(ApiError::not_found(format!("tenant `{tenant}` does not exist"))),
        }
    }

    /// Remove `tenant`'s secret `name`; false if it had none.
    pub async fn remove_secret(&self, tenant: &str, name: &str) -> Result<bool, ApiError> {
        check_secret_name(name)?;
        let removed = self.registry.update_tenant(tenant, |record| record.secrets.remove(name).is_some()).await?;
        Ok(removed.unwrap_or(false))
    }

    /// `tenant`'s secrets: name → when each was set (never a value).
    pub fn secrets_of(&self, tenant: &str) -> Option<BTreeMap<String, u64>> {
        let record = self.registry.tenant(tenant)?;
        Some(record.secrets.into_iter().map(|(name, sealed)| (name, sealed.updated_ms)).collect())
    }

    /// The settings a call of `function` runs with: with the values of the
    /// secrets it names (as env vars and `wasi:config` values) as they are
    /// now. A secret removed since the deploy is left out.
    pub(crate) fn call_settings<'f>(&self, function: &'f DeployedFunction) -> Cow<'f, shoal_runtime::CallSettings> {
        if function.record.secrets.is_empty() {
            return Cow::Borrowed(&function.settings);
        }
        let tenant = &function.record.tenant;
        let record = self.registry.tenant(tenant);
        let values: Vec<(String, String)> = function
            .record
            .secrets
            .iter()
            .filter_map(|name| {
                let sealed = record.as_ref()?.secrets.get(name)?;
                let value = self.secret_key.open(tenant, name, &sealed.sealed);
                if value.is_none() {
                    tracing::warn!(%tenant, secret = %name, "a secret does not open with this node's key (was the admin token changed?)");
                }
                Some((name.clone(), value?))
            })
            .collect();
        let mut settings = function.settings.clone();
        let env: Vec<(String, String)> = settings.env.iter().cloned().chain(values.iter().cloned()).collect();
        settings.env = env.into();
        settings.config = shoal_runtime::ConfigValues::new(values);
        Cow::Owned(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_tenant_and_name() {
        let key = SecretKey::derive("admin-token");
        let sealed = key.seal("acme", "API_KEY", "s3cret");
        assert!(!sealed.contains("s3cret"));
        assert_ne!(sealed, key.seal("acme", "API_KEY", "s3cret"), "a fresh nonce each time");
        assert_eq!(key.open("acme", "API_KEY", &sealed).as_deref(), Some("s3cret"));
        assert_eq!(key.open("beta", "API_KEY", &sealed), None, "moved to another tenant");
        assert_eq!(key.open("acme", "OTHER", &sealed), None, "moved to another name");
        assert_eq!(SecretKey::derive("another-admin").open("acme", "API_KEY", &sealed), None);
        assert_eq!(key.open("acme", "API_KEY", "not base64!"), None);
        assert_eq!(key.open("acme", "API_KEY", "AAAA"), None);
    }

    #[test]
    fn names_are_env_var_names() {
        for good in ["API_KEY", "_x", "a1"] {
            assert!(check_secret_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1A", "a-b", "a b", &"x".repeat(65)] {
            assert!(check_secret_name(bad).is_err(), "{bad}");
        }
    }
}
