//! Hashes: the confirm request fingerprint (plain SHA-256) and merchant API
//! keys (HMAC-SHA-256 keyed with a server-side secret, so a leaked table of
//! hashes is useless without the key).
//!
//! `sha2`/`hmac` (RustCrypto) are used rather than our own code: they are the
//! maintained, audited implementations.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::masking::Secret;

/// Hex SHA-256 over `parts`, each length-prefixed so that `("ab","c")` and
/// `("a","bc")` differ. Used as the confirm request fingerprint over
/// `(paymentKey, orderId, amount)`.
pub fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Prefix of every merchant API key.
pub const API_KEY_PREFIX: &str = "pgk_";

/// Length of the stored, displayable key prefix (`pgk_` + 8 characters).
pub const API_KEY_DISPLAY_LEN: usize = 12;

/// A fresh merchant API key: `pgk_` + 64 hex characters (256 random bits).
pub fn generate_api_key() -> Secret<String> {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    Secret::new(format!("{API_KEY_PREFIX}{}", hex::encode(bytes)))
}

/// Hex HMAC-SHA-256 of `api_key` under `hash_key`.
pub fn hash_api_key(hash_key: &Secret<String>, api_key: &str) -> String {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here;
    // fall back to the plain hash rather than panic if that ever changed.
    match Hmac::<Sha256>::new_from_slice(hash_key.expose().as_bytes()) {
        Ok(mut mac) => {
            mac.update(api_key.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => fingerprint(&[hash_key.expose(), api_key]),
    }
}

/// Compares two strings in time independent of where they first differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_length_prefixed() {
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
        assert_eq!(fingerprint(&["a", "b"]), fingerprint(&["a", "b"]));
    }

    #[test]
    fn api_keys_hash_under_the_key() {
        let k = generate_api_key();
        assert!(k.expose().starts_with(API_KEY_PREFIX));
        assert_eq!(k.expose().len(), 4 + 64);
        let h1 = hash_api_key(&Secret::new("one".into()), k.expose());
        let h2 = hash_api_key(&Secret::new("two".into()), k.expose());
        assert_ne!(h1, h2);
        assert!(constant_time_eq(&h1, &h1.clone()));
        assert!(!constant_time_eq(&h1, &h2));
    }
}
