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
/// set, never its value. Deserializing reads the value: a `Secret<String>`
/// takes a number or a boolean as its text (`987654321987654321`, `true`),
/// since a key may be all digits and a configuration source (an environment
/// variable read by figment, an unquoted TOML value) may have typed it, and
/// its deserialization errors never hold the value.
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

impl<'de> serde::Deserialize<'de> for Secret<String> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SecretText).map(Secret)
    }
}

/// Reads a secret as text, whatever type the source gave it. Errors name
/// the kind of value found (a sequence, a map), never the value.
struct SecretText;

impl serde::de::Visitor<'_> for SecretText {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string (a secret)")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_char<E: serde::de::Error>(self, v: char) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<String, E> {
        String::from_utf8(v.to_vec()).map_err(|_| {
            E::invalid_value(
                serde::de::Unexpected::Other("bytes that are not UTF-8"),
                &self,
            )
        })
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

/// Prefixes of credentials that may turn up inside free text (an error
/// message, a body paygate did not write): Toss secret and client keys,
/// paygate's merchant API keys, and Discord webhook paths.
pub const SECRET_PREFIXES: &[&str] = &[
    "test_sk_",
    "live_sk_",
    "test_gsk_",
    "live_gsk_",
    "test_ck_",
    "live_ck_",
    "pgk_",
    "api/webhooks/",
];

/// Masks every credential-looking token in `text` (see [`SECRET_PREFIXES`]):
/// the prefix stays, the rest of the token (up to a space, a quote or a
/// delimiter) becomes `***`. For operator output of text paygate did not
/// compose itself.
pub fn mask_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let next = SECRET_PREFIXES
            .iter()
            .filter_map(|p| rest.find(p).map(|i| (i, p.len())))
            .min();
        let Some((at, len)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..at + len]);
        let tail = &rest[at + len..];
        let end = tail
            .find(|c: char| c.is_whitespace() || "\"'`,;:)]}>".contains(c))
            .unwrap_or(tail.len());
        if end > 0 {
            out.push_str("***");
        }
        rest = &tail[end..];
    }
}

/// [`scrub_json`], then [`mask_text`] on every string left: what an
/// operator command prints of a stored body.
pub fn scrub_json_for_display(value: &mut serde_json::Value) {
    scrub_json(value);
    mask_strings(value);
}

fn mask_strings(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) => *s = mask_text(s),
        serde_json::Value::Object(map) => map.values_mut().for_each(mask_strings),
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_strings),
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
    fn a_secret_string_takes_numbers_and_booleans_as_text() {
        let read = |json: &str| serde_json::from_str::<Secret<String>>(json);
        assert_eq!(
            read("987654321987654321").unwrap().expose(),
            "987654321987654321"
        );
        assert_eq!(read("-12").unwrap().expose(), "-12");
        assert_eq!(read("1.5").unwrap().expose(), "1.5");
        assert_eq!(read("true").unwrap().expose(), "true");
        assert_eq!(read("false").unwrap().expose(), "false");
        assert_eq!(read(r#""test_sk_1""#).unwrap().expose(), "test_sk_1");
        let e = read(r#"["s3cr3t-in-a-list"]"#).unwrap_err().to_string();
        assert!(
            e.contains("sequence") && !e.contains("s3cr3t"),
            "refused, value not shown: {e}"
        );
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

    #[test]
    fn credentials_inside_text_are_masked() {
        assert_eq!(
            mask_text("bad key test_sk_abc123: refused"),
            "bad key test_sk_***: refused"
        );
        assert_eq!(
            mask_text("https://discord.com/api/webhooks/123/tok?wait=true"),
            "https://discord.com/api/webhooks/***"
        );
        assert_eq!(mask_text("pgk_"), "pgk_", "a bare prefix is no secret");
        assert_eq!(mask_text("nothing here"), "nothing here");
        let mut v = serde_json::json!({
            "secretKey": "live_sk_zzz",
            "message": "\"live_sk_zzz\" is not valid",
            "list": ["pgk_1234abcd"],
        });
        scrub_json_for_display(&mut v);
        let shown = v.to_string();
        assert!(
            !shown.contains("zzz") && !shown.contains("1234abcd"),
            "{shown}"
        );
        assert_eq!(v["secretKey"], "[REDACTED]");
    }
}
