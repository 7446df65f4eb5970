//! Passwords: a policy, and argon2id hashing.
//!
//! Policy: at least 10 characters, at most 256 (and 1,024 bytes, checked
//! first, so a huge input costs nothing), and not one of the 20,000 most
//! common passwords (`data/common-passwords.txt`, compared case-insensitively).
//!
//! Hashing: argon2id, version 19, m = 19,456 KiB, t = 2, p = 1 (the OWASP
//! recommendation), a random 16-byte salt, stored as a PHC string. Hashing
//! takes tens of milliseconds of CPU, so it runs on the blocking pool.

use std::collections::HashSet;
use std::sync::LazyLock;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use plinth_tenants::{ApiError, FieldError};

pub const MIN_CHARS: usize = 10;
pub const MAX_CHARS: usize = 256;
const MAX_BYTES: usize = 1024;

static COMMON: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| include_str!("../data/common-passwords.txt").lines().map(str::trim).collect());

/// Why a password is refused, as a field error for `field`.
pub fn check(field: &str, password: &str) -> Result<(), FieldError> {
    if password.len() > MAX_BYTES || password.chars().count() > MAX_CHARS {
        return Err(FieldError::new(field, "too_long", format!("must be at most {MAX_CHARS} characters")));
    }
    if password.chars().count() < MIN_CHARS {
        return Err(FieldError::new(field, "too_short", format!("must be at least {MIN_CHARS} characters")));
    }
    if COMMON.contains(password.to_lowercase().as_str()) {
        return Err(FieldError::new(field, "too_common", "is one of the most common passwords; choose another"));
    }
    Ok(())
}

/// Hashes a password that passed [`check`].
pub async fn hash(password: String) -> Result<String, ApiError> {
    actix_web::web::block(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string())
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("password hashing was cancelled: {e}")))?
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("hashing a password: {e}")))
}

/// A valid hash of a password nobody has, verified against when the account
/// does not exist, so a login takes as long either way.
static DUMMY: LazyLock<Option<String>> = LazyLock::new(|| {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(b"no account has this password", &salt).map(|h| h.to_string()).ok()
});

/// Whether `password` matches `stored` (or, with `None`, spends the same time
/// and says no).
pub async fn verify(password: String, stored: Option<String>) -> Result<bool, ApiError> {
    actix_web::web::block(move || {
        let known = stored.is_some();
        let Some(stored) = stored.or_else(|| DUMMY.clone()) else { return false };
        let Ok(parsed) = PasswordHash::new(&stored) else { return false };
        known && Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("password verification was cancelled: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy() {
        assert!(check("p", "correct horse battery staple").is_ok());
        assert!(check("p", "ünïcødé-😀-pass").is_ok(), "unicode counts in characters");
        assert_eq!(check("p", "short").map_err(|e| e.code), Err("too_short"));
        assert_eq!(check("p", "😀😀😀😀😀😀😀😀😀").map_err(|e| e.code), Err("too_short"));
        assert_eq!(check("p", &"x".repeat(5000)).map_err(|e| e.code), Err("too_long"));
        for common in ["password123", "qwertyuiop", "PASSWORD123", "1234567890"] {
            assert_eq!(check("p", common).map_err(|e| e.code), Err("too_common"), "{common}");
        }
        assert!(COMMON.len() > 19_000);
    }
}
