//! Bearer tokens. Tokens are random, shown once, and kept only as SHA-256
//! hashes; a presented token is hashed and compared in constant time. A
//! tenant token has the form `<tenant>.<secret>`, so the node knows which
//! hash to compare against without searching.

use std::io::Write;
use std::path::Path;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorKind};

pub type TokenHash = [u8; 32];

pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

pub fn hashes_equal(a: &TokenHash, b: &TokenHash) -> bool {
    a.ct_eq(b).into()
}

fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A fresh token for `tenant`.
pub fn new_tenant_token(tenant: &str) -> String {
    format!("{tenant}.{}", random_secret())
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Tenant(String),
}

impl Caller {
    /// May this caller act on `tenant`'s functions and state?
    pub fn check_tenant(&self, tenant: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Tenant(own) if own == tenant => Ok(()),
            Caller::Tenant(_) => Err(ApiError::new(ErrorKind::Forbidden, "this token acts on its own tenant only")),
        }
    }

    pub fn check_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Tenant(_) => Err(ApiError::new(ErrorKind::Forbidden, "this needs the admin token")),
        }
    }
}

/// The token presented in the `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let unauthorized = |m: &str| ApiError::new(ErrorKind::Unauthorized, m);
    let value =
        headers.get(AUTHORIZATION).ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>` header"))?;
    value
        .to_str()
        .ok()
        // The scheme's name is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| v.get(..7).filter(|scheme| scheme.eq_ignore_ascii_case("bearer ")).map(|_| &v[7..]))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))
}

/// Identify the caller from the `Authorization` header. `opens(tenant,
/// hash)` says whether a token hashing to `hash` is one of `tenant`'s valid
/// tokens now (its current one, or one rotated out and still in its grace
/// period), comparing in constant time.
pub fn authenticate(
    headers: &HeaderMap,
    admin_hash: &TokenHash,
    opens: impl Fn(&str, &TokenHash) -> bool,
) -> Result<Caller, ApiError> {
    let token = bearer(headers)?;
    let presented = hash_token(token);
    if hashes_equal(&presented, admin_hash) {
        return Ok(Caller::Admin);
    }
    if let Some((tenant, _secret)) = token.split_once('.')
        && opens(tenant, &presented)
    {
        return Ok(Caller::Tenant(tenant.to_string()));
    }
    Err(ApiError::new(ErrorKind::Unauthorized, "invalid token"))
}

/// The admin token: `configured` if given, else the one in
/// `<data_dir>/admin.token`, created (mode 0600) on first start.
pub fn admin_token(data_dir: &Path, configured: Option<&str>) -> std::io::Result<String> {
    if let Some(token) = configured {
        return Ok(token.to_string());
    }
    let path = data_dir.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = format!("admin-{}", random_secret());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    fn check(header: Option<&str>, expected: Result<Caller, ErrorKind>) {
        let admin = hash_token("admin-secret-token");
        let acme = hash_token("acme.s3cret");
        let lookup = |t: &str, presented: &TokenHash| t == "acme" && hashes_equal(presented, &acme);
        let h = header.map(headers).unwrap_or_default();
        let got = authenticate(&h, &admin, lookup).map_err(|e| e.kind);
        assert_eq!(got, expected, "header {header:?}");
    }

    #[test]
    fn tokens_identify_their_caller() {
        check(Some("Bearer admin-secret-token"), Ok(Caller::Admin));
        check(Some("Bearer acme.s3cret"), Ok(Caller::Tenant("acme".into())));
        check(None, Err(ErrorKind::Unauthorized));
        check(Some("Basic abc"), Err(ErrorKind::Unauthorized));
        check(Some("Bearer "), Err(ErrorKind::Unauthorized));
        check(Some("Bearer acme.wrong"), Err(ErrorKind::Unauthorized));
        check(Some("Bearer other.s3cret"), Err(ErrorKind::Unauthorized));
        check(Some("Bearer admin-secret-tokeN"), Err(ErrorKind::Unauthorized));
        // The scheme's name in any case; nothing else in its place.
        check(Some("bearer admin-secret-token"), Ok(Caller::Admin));
        check(Some("BEARER acme.s3cret"), Ok(Caller::Tenant("acme".into())));
        check(Some("Bearerxadmin-secret-token"), Err(ErrorKind::Unauthorized));
        check(Some("Token admin-secret-token"), Err(ErrorKind::Unauthorized));
    }

    #[test]
    fn a_tenant_acts_on_itself_only() {
        let acme = Caller::Tenant("acme".into());
        assert!(acme.check_tenant("acme").is_ok());
        assert_eq!(acme.check_tenant("other").unwrap_err().kind, ErrorKind::Forbidden);
        assert_eq!(acme.check_admin().unwrap_err().kind, ErrorKind::Forbidden);
        assert!(Caller::Admin.check_tenant("anyone").is_ok());
    }

    #[test]
    fn the_admin_token_is_created_once_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let first = admin_token(dir.path(), None).unwrap();
        assert_eq!(admin_token(dir.path(), None).unwrap(), first);
        assert_eq!(admin_token(dir.path(), Some("from-config-0123456")).unwrap(), "from-config-0123456");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("admin.token")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
