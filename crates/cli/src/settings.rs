//! Loading the configuration: defaults, then an optional TOML file
//! (`--config`), then `PAYGATE_*` environment variables (DESIGN.md §11).
//!
//! `figment` is used because it layers these sources and reports the key a
//! bad value came from. Unknown keys are errors (typos must not be silently
//! ignored); `PAYGATE_TEST_*` variables belong to the test suite and are
//! skipped. Nested tables (the per-downstream policies) are set in the
//! environment with `__`: `PAYGATE_CARD_API_POLICY__BULKHEAD_MAX_CONCURRENT=20`
//! is `[card_api_policy] bulkhead_max_concurrent = 20`; keys left out keep
//! that downstream's own defaults.
//!
//! Secret settings ([`SECRET_KEYS`]) are text whatever they look like: their
//! environment variables are taken as written (figment would read
//! `987654321987654321` as a number, `true` as a boolean, `00123` as 123 and
//! `[x]` as a list), and an error about one names the key, never the value.

use std::path::Path;

use anyhow::bail;
use figment::{
    error::{Actual, Kind},
    providers::{Env, Format, Serialized, Toml},
    value::{Dict, Map, Value},
    Figment, Metadata, Profile, Provider,
};
use paygate_core::{
    config::{DownstreamPolicy, SECRET_KEYS},
    Config,
};

/// The per-downstream defaults, so a partial `[card_api_policy]` table keeps
/// the card API's own defaults for the keys it leaves out.
#[derive(serde::Serialize)]
struct PolicyDefaults {
    card_api_policy: DownstreamPolicy,
    ledger_api_policy: DownstreamPolicy,
}

/// A configuration that cannot be read: every problem, each naming its key.
/// A secret key's value is never part of it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {}", .problems.join("; "))]
pub struct LoadError {
    /// One message per problem found.
    pub problems: Vec<String>,
}

/// Environment variables taken as written, each a string value (figment's
/// own `Env` parses values into numbers, booleans, lists and tables).
struct RawEnv {
    values: Dict,
    metadata: Metadata,
}

impl RawEnv {
    /// The `PAYGATE_*` variables of the secret keys.
    fn secrets() -> Self {
        let env = Env::prefixed("PAYGATE_").only(SECRET_KEYS);
        let metadata = env.metadata();
        Self::new(env.iter().map(|(k, v)| (k.to_string(), v)), metadata)
    }

    fn new(values: impl IntoIterator<Item = (String, String)>, metadata: Metadata) -> Self {
        Self {
            values: values
                .into_iter()
                .map(|(k, v)| (k, Value::from(v)))
                .collect(),
            metadata,
        }
    }
}

impl Provider for RawEnv {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// Loads and validates the configuration.
///
/// # Errors
/// A missing `--config` file, an unknown key, a value of the wrong type
/// ([`LoadError`]), or a value that fails [`Config::validate`]; each message
/// names the key, and none shows a secret's value.
pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let mut figment = Figment::from(Serialized::defaults(PolicyDefaults {
        card_api_policy: DownstreamPolicy::card_api(),
        ledger_api_policy: DownstreamPolicy::ledger_api(),
    }));
    if let Some(p) = path {
        if !p.is_file() {
            bail!("config file {} not found", p.display());
        }
        figment = figment.merge(Toml::file(p));
    }
    figment = figment
        .merge(
            Env::prefixed("PAYGATE_")
                // Keys arrive as written (`TEST_POSTGRES_URL`): compare uncased.
                .filter(|k| !k.as_str().to_ascii_lowercase().starts_with("test_"))
                .ignore(SECRET_KEYS)
                .split("__"),
        )
        .merge(RawEnv::secrets());
    let config = extract(&figment)?;
    config.validate()?;
    if config.time_zone.parse::<chrono_tz::Tz>().is_err() {
        bail!(
            "invalid configuration: `time_zone`: {:?} is not an IANA time zone (e.g. Asia/Seoul, UTC)",
            config.time_zone
        );
    }
    Ok(config)
}

/// The configuration `figment` holds (not yet validated).
///
/// # Errors
/// [`LoadError`], with secret values left out.
fn extract(figment: &Figment) -> Result<Config, LoadError> {
    figment.extract().map_err(redact)
}

/// Turns figment's errors into messages. An error about a secret key (its
/// path starts with one of [`SECRET_KEYS`]) names the key and the kind of
/// value found, not the value: figment's own message would print it
/// (`invalid type: found unsigned int 987654321987654321`).
fn redact(errors: figment::Error) -> LoadError {
    let problems = errors
        .into_iter()
        .map(|e| {
            let Some(key) = e.path.first().filter(|k| SECRET_KEYS.contains(&k.as_str())) else {
                return e.to_string();
            };
            let what = match &e.kind {
                Kind::InvalidType(actual, expected) => {
                    format!(
                        "invalid type: found {}, expected {expected}",
                        kind_of(actual)
                    )
                }
                Kind::MissingField(field) => format!("missing field `{field}`"),
                _ => "invalid value".to_owned(),
            };
            let source = e
                .metadata
                .as_ref()
                .map(|m| format!(" in {}", m.name))
                .unwrap_or_default();
            format!("`{key}`: {what}{source} (the value is secret and not shown)")
        })
        .collect();
    LoadError { problems }
}

/// The kind of a value, without the value.
fn kind_of(actual: &Actual) -> &'static str {
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit => "nothing",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        _ => "another kind of value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGITS: &str = "987654321987654321";

    fn defaults() -> Figment {
        Figment::from(Serialized::defaults(PolicyDefaults {
            card_api_policy: DownstreamPolicy::card_api(),
            ledger_api_policy: DownstreamPolicy::ledger_api(),
        }))
    }

    #[test]
    fn secrets_that_look_like_numbers_or_booleans_are_text() {
        // Unquoted in TOML: an integer and a boolean.
        let toml = format!("card_api_secret_key = {DIGITS}\ndiscord_webhook_url = true\n");
        let c = extract(&defaults().merge(Toml::string(&toml))).unwrap();
        assert_eq!(c.card_api_secret_key.unwrap().expose(), DIGITS);
        assert_eq!(c.discord_webhook_url.unwrap().expose(), "true");
        // From the environment, as written: figment's Env would read these
        // as 987654321987654321, false and 123 (losing the zeros).
        let env = RawEnv::new(
            [
                ("card_api_secret_key".to_owned(), DIGITS.to_owned()),
                ("api_key_hash_key".to_owned(), "false".to_owned()),
                ("database_url".to_owned(), "00123".to_owned()),
            ],
            Metadata::named("test environment"),
        );
        let c = extract(&defaults().merge(env)).unwrap();
        assert_eq!(c.card_api_secret_key.unwrap().expose(), DIGITS);
        assert_eq!(c.api_key_hash_key.expose(), "false");
        assert_eq!(c.database_url.expose(), "00123");
    }

    #[test]
    fn an_invalid_secret_value_is_named_by_key_never_shown() {
        // figment's own message holds the value; the redacted one does not.
        #[derive(Debug, serde::Deserialize)]
        struct Typed {
            #[allow(dead_code)]
            card_api_secret_key: u8,
        }
        let figment = Figment::from(Serialized::default("card_api_secret_key", DIGITS));
        let raw = figment.extract::<Typed>().unwrap_err();
        assert!(raw.to_string().contains(DIGITS), "{raw}");
        let shown = redact(raw).to_string();
        assert!(
            shown.contains("`card_api_secret_key`") && !shown.contains(DIGITS),
            "{shown}"
        );

        // Through the real loader: a secret given as a list or a table.
        for toml in [
            format!("api_key_hash_key = [\"{DIGITS}\"]"),
            format!("database_url = {{ url = \"{DIGITS}\" }}"),
            format!("[discord_webhook_url]\ntoken = \"{DIGITS}\""),
        ] {
            let e = extract(&defaults().merge(Toml::string(&toml))).unwrap_err();
            let shown = e.to_string();
            assert!(!shown.contains(DIGITS), "{toml}: {shown}");
            assert!(shown.contains("not shown"), "{toml}: {shown}");
        }
    }

    #[test]
    fn other_errors_keep_figment_s_message() {
        let e = extract(&defaults().merge(Toml::string("listn = \"x\"")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listn"), "{e}");
        let e = extract(&defaults().merge(Toml::string("shutdown_timeout_ms = \"soon\"")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("shutdown_timeout_ms") && e.contains("soon"),
            "{e}"
        );
    }
}
