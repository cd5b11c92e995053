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
