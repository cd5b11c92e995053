//! Names of tenants and functions: `[a-z0-9][a-z0-9_-]{0,62}`. Checked at
//! the edge, so nothing downstream ever sees a name that could be a path,
//! a key separator or an empty string.

use crate::error::ApiError;

pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes[1..].iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

/// A function reference: `name`, `name@N` (version N) or `name@alias`
/// (an alias is a name that is not all digits).
pub fn is_valid_reference(reference: &str) -> bool {
    match reference.split_once('@') {
        None => is_valid_name(reference),
        Some((name, at)) => {
            let version =
                !at.is_empty() && at.len() <= 9 && at.bytes().all(|b| b.is_ascii_digit()) && !at.starts_with('0');
            is_valid_name(name) && (version || (is_valid_name(at) && !at.bytes().all(|b| b.is_ascii_digit())))
        }
    }
}

pub fn check_reference(reference: &str) -> Result<(), ApiError> {
    if is_valid_reference(reference) {
        Ok(())
    } else {
        let shown: String = reference.chars().take(80).collect();
        Err(ApiError::bad_request(format!(
            "function {shown:?} is not valid: NAME, NAME@VERSION or NAME@ALIAS, names matching [a-z0-9][a-z0-9_-]{{0,62}}"
        )))
    }
}

/// A bucket for an alias's split: a stable hash of the request's key (the
/// same key, the same version, on every node), else a random number.
pub fn route_bucket(key: Option<&[u8]>) -> u64 {
    match key {
        // FNV-1a: stable across nodes and builds.
        Some(key) => {
            key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
        }
        None => rand::random(),
    }
}

/// The header whose value keeps a caller's calls on one version of a
/// split alias.
pub const ROUTE_KEY_HEADER: &str = "x-shoal-route-key";

pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        let shown: String = name.chars().take(80).collect();
        Err(ApiError::bad_request(format!(
            "{what} name {shown:?} is not valid: names match [a-z0-9][a-z0-9_-]{{0,62}}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_pattern() {
        for good in ["a", "0", "hello", "my-fn_2", &"x".repeat(63)] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "-a", "_a", "Hello", "a.b", "a/b", "../x", "a b", "é", &"x".repeat(64), "a\0"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }
}
