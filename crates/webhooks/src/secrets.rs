//! Signing secrets at rest: sealed with XChaCha20-Poly1305 under
//! `PAYGATE_SECRETS_KEY` (32 bytes, base64), so a copy of the database
//! does not let anyone forge a merchant's webhooks. Stored as
//! `v1.<base64 nonce>.<base64 ciphertext>`; the merchant id is the
//! associated data, so a sealed secret moved to another merchant's row
//! does not open.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    XChaCha20Poly1305, XNonce,
};
use paygate_core::Secret;
use rand::RngCore;

/// Why a secret could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    /// `PAYGATE_SECRETS_KEY` is not 32 bytes of base64.
    #[error("secrets_key must be 32 bytes, base64-encoded")]
    BadKey,
    /// The stored text is not a sealed secret, or was sealed under another
    /// key or for another merchant.
    #[error("a sealed signing secret does not open with this secrets_key")]
    WontOpen,
}

/// The key that seals signing secrets.
#[derive(Clone)]
pub struct SecretsKey(XChaCha20Poly1305);

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(***)")
    }
}

/// The development key of sandbox mode (never accepted outside it).
pub const DEV_SECRETS_KEY: &str = "cGF5Z2F0ZS1kZXZlbG9wbWVudC1zZWNyZXRzLWtleSE=";

impl SecretsKey {
    /// Reads a base64 key of 32 bytes.
    ///
    /// # Errors
    /// [`SecretsError::BadKey`].
    pub fn from_base64(key: &str) -> Result<Self, SecretsError> {
        let bytes = STANDARD
            .decode(key.trim())
            .map_err(|_| SecretsError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SecretsError::BadKey);
        }
        XChaCha20Poly1305::new_from_slice(&bytes)
            .map(Self)
            .map_err(|_| SecretsError::BadKey)
    }

    /// Seals `secret` for `merchant_id`.
    ///
    /// # Errors
    /// [`SecretsError::WontOpen`] if the cipher refuses (it does not for
    /// inputs of this size).
    pub fn seal(&self, merchant_id: &str, secret: &Secret<String>) -> Result<String, SecretsError> {
        let mut nonce = [0_u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .0
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: secret.expose().as_bytes(),
                    aad: merchant_id.as_bytes(),
                },
            )
            .map_err(|_| SecretsError::WontOpen)?;
        Ok(format!(
            "v1.{}.{}",
            STANDARD.encode(nonce),
            STANDARD.encode(sealed)
        ))
    }

    /// Opens what [`SecretsKey::seal`] sealed for `merchant_id`.
    ///
    /// # Errors
    /// [`SecretsError::WontOpen`].
    pub fn open(&self, merchant_id: &str, sealed: &str) -> Result<Secret<String>, SecretsError> {
        let mut parts = sealed.split('.');
        let (Some("v1"), Some(nonce), Some(ct), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SecretsError::WontOpen);
        };
        let nonce = STANDARD.decode(nonce).map_err(|_| SecretsError::WontOpen)?;
        let ct = STANDARD.decode(ct).map_err(|_| SecretsError::WontOpen)?;
        if nonce.len() != 24 {
            return Err(SecretsError::WontOpen);
        }
        let plain = self
            .0
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: merchant_id.as_bytes(),
                },
            )
            .map_err(|_| SecretsError::WontOpen)?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| SecretsError::WontOpen)
    }
}

/// A fresh signing secret: `whsec_` and 32 random bytes, base64url.
pub fn generate_signing_secret() -> Secret<String> {
    let mut bytes = [0_u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    Secret::new(format!(
        "whsec_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_for_its_merchant() {
        let key = SecretsKey::from_base64(DEV_SECRETS_KEY).unwrap_or_else(|_| unreachable!());
        let secret = generate_signing_secret();
        let sealed = key
            .seal("mer_1", &secret)
            .unwrap_or_else(|_| unreachable!());
        assert!(!sealed.contains(secret.expose().as_str()));
        assert_eq!(
            key.open("mer_1", &sealed).map(|s| s.expose().clone()),
            Ok(secret.expose().clone())
        );
        assert_eq!(
            key.open("mer_2", &sealed).map(|_| ()),
            Err(SecretsError::WontOpen)
        );
        let other = SecretsKey::from_base64(&STANDARD.encode([7_u8; 32]))
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(
            other.open("mer_1", &sealed).map(|_| ()),
            Err(SecretsError::WontOpen)
        );
        assert!(SecretsKey::from_base64("c2hvcnQ=").is_err());
    }
}
