//! Identifiers: [`PaymentId`] (`pay_` + ULID), [`MerchantId`] (`mer_` + ULID)
//! and the merchant's [`OrderId`] (6-64 characters of `[A-Za-z0-9-_.]`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// paygate's id for a payment: `pay_` followed by a ULID (26 characters of
/// Crockford base32), so ids sort by creation time. It is also the
/// `Idempotency-Key` of every downstream call made for the payment, which is
/// why a key is never reused for another payment (invariant I2).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PaymentId(String);

impl PaymentId {
    /// A fresh id.
    pub fn generate() -> Self {
        Self(format!("pay_{}", crate::ambient::ulid()))
    }

    /// Wraps a stored id without checking it (ids come from our own stores).
    pub fn from_stored(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// Parses an id given by a client: `pay_` + a valid ULID, else `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("pay_")?;
        ulid::Ulid::from_string(rest).ok()?;
        Some(Self(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A merchant's id: `mer_` followed by a ULID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MerchantId(String);

impl MerchantId {
    /// A fresh id.
    pub fn generate() -> Self {
        Self(format!("mer_{}", crate::ambient::ulid()))
    }

    /// Wraps a stored id without checking it.
    pub fn from_stored(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MerchantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The merchant's order id, unique per merchant: 6 to 64 characters of
/// `[A-Za-z0-9-_.]` (the Toss Payments `orderId` rule).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct OrderId(String);

/// Why an order id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("orderId must be 6 to 64 characters of A-Z, a-z, 0-9, '-', '_' or '.'")]
pub struct InvalidOrderId;

impl OrderId {
    /// Checks the 6-64 `[A-Za-z0-9-_.]` rule.
    ///
    /// # Errors
    /// [`InvalidOrderId`] when the rule is broken.
    pub fn parse(s: &str) -> Result<Self, InvalidOrderId> {
        let ok_len = (6..=64).contains(&s.len());
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok_len && ok_chars {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidOrderId)
        }
    }

    /// Wraps a stored id without checking it.
    pub fn from_stored(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_id_rules() {
        assert!(OrderId::parse("order-1_a.b").is_ok());
        assert!(OrderId::parse("short").is_err());
        assert!(OrderId::parse(&"x".repeat(65)).is_err());
        assert!(OrderId::parse("order 123").is_err());
        assert!(OrderId::parse("주문번호123").is_err());
    }

    #[test]
    fn payment_id_round_trip() {
        let id = PaymentId::generate();
        assert!(id.as_str().starts_with("pay_"));
        assert_eq!(PaymentId::parse(id.as_str()), Some(id));
        assert_eq!(PaymentId::parse("pay_nope"), None);
        assert_eq!(PaymentId::parse("01HZ"), None);
    }
}
