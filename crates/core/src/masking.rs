//! Masking: keep secrets and card data out of logs (invariant I6).
//!
//! [`Secret<T>`] wraps a value whose `Debug` and `Display` print `***`, in the
//! manner of Hyperswitch's `masking` crate; the value is reachable only through
//! an explicit [`Secret::expose`]. [`scrub_json`] removes sensitive fields from a
//! JSON body before it is written to the SQL request/response log.

use std::fmt;

/// A value that must never be printed: API keys, the card API secret key,
/// webhook URLs (their path is a credential).
///
/// `Debug`/`Display` print `***`, and serializing one writes `"***"`: a
/// serialized configuration (`paygate config check`) shows that a secret is
/// set, never its value. Deserializing reads the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// Gives the secret value; call this only where the value is sent to its
    /// one legitimate destination (an `Authorization` header, a hash).
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<T> serde::Serialize for Secret<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Secret<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Secret)
    }
}

/// JSON field names (compared case-insensitively) whose values are replaced
/// by `"[REDACTED]"` before a body is logged. Card numbers, CVCs, secret and
/// billing keys, account numbers and credentials.
pub const SENSITIVE_FIELDS: &[&str] = &[
    "cardnumber",
    "number",
    "cvc",
    "cvv",
    "password",
    "cardpassword",
    "secretkey",
    "secret",
    "billingkey",
    "accountnumber",
    "authorization",
    "apikey",
    "api_key",
    "customeridentitynumber",
];

/// Replaces the value of every sensitive field (see [`SENSITIVE_FIELDS`]) in
/// `value`, at any depth, with the string `"[REDACTED]"`.
pub fn scrub_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let lower = key.to_ascii_lowercase();
                if SENSITIVE_FIELDS.contains(&lower.as_str()) {
                    *v = serde_json::Value::String("[REDACTED]".to_owned());
                } else {
                    scrub_json(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(scrub_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_and_display_hide_the_value() {
        let s = Secret::new("test_sk_abc".to_owned());
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "test_sk_abc");
    }

    #[test]
    fn scrub_replaces_nested_sensitive_fields() {
        let mut v = serde_json::json!({
            "orderId": "order-1",
            "card": {"number": "4330123412341234", "issuerCode": "71"},
            "list": [{"secretKey": "sk"}],
        });
        scrub_json(&mut v);
        assert_eq!(v["orderId"], "order-1");
        assert_eq!(v["card"]["number"], "[REDACTED]");
        assert_eq!(v["card"]["issuerCode"], "71");
        assert_eq!(v["list"][0]["secretKey"], "[REDACTED]");
    }
}
