//! Process configuration (DESIGN.md §11): the keys, their defaults and their
//! validation. Loading (defaults, then an optional TOML file, then `PAYGATE_*`
//! environment variables) happens in the binary; this module only says what
//! a valid configuration is, so a bad value stops the process before it binds.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::masking::Secret;

/// Which store keeps the realtime state records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateStoreKind {
    /// The SQL database at `database_url` (SQLite or PostgreSQL).
    Sql,
    /// MongoDB at `mongodb_uri`.
    Mongodb,
}

/// The whole configuration. Field names are the keys of the TOML file and,
/// upper-cased with a `PAYGATE_` prefix, of the environment
/// (`card_api_url` = `PAYGATE_CARD_API_URL`). Durations are milliseconds.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Merchant API listen address. Default `127.0.0.1:8080`.
    pub listen: String,
    /// SQL database for the request/response log, merchants and (with
    /// `state_store = "sql"`) the state records. `sqlite://paygate.db` or
    /// `postgres://...`.
    pub database_url: Secret<String>,
    /// Maximum connections in the SQL pool. Default 10.
    pub database_max_connections: u32,
    /// Apply migrations when `serve` starts. Default true.
    pub migrate_on_start: bool,
    /// `sql` (default) or `mongodb`.
    pub state_store: StateStoreKind,
    /// MongoDB connection string (with `state_store = "mongodb"`).
    pub mongodb_uri: Option<Secret<String>>,
    /// MongoDB database name. Default `paygate`.
    pub mongodb_database: String,
    /// Card API base URL (Toss Payments v1 shape). Unset: the in-process sandbox.
    pub card_api_url: Option<String>,
    /// Card API secret key (`test_sk_...` / `live_sk_...`), sent as Basic auth.
    pub card_api_secret_key: Option<Secret<String>>,
    /// Per-attempt timeout of a card API call, ms. Default 10000.
    pub card_api_timeout_ms: u64,
    /// Card confirm attempts on a transient (5xx) answer, including the first.
    /// Default 3.
    pub card_api_max_attempts: u32,
    /// Lookups by orderId after a confirm got no answer. Default 3.
    pub card_api_lookup_attempts: u32,
    /// Ledger API base URL. Unset: the in-process sandbox ledger.
    pub ledger_api_url: Option<String>,
    /// Per-attempt timeout of a ledger call, ms. Default 3000.
    pub ledger_api_timeout_ms: u64,
    /// Async ledger retries after the one synchronous try. Default 5.
    pub ledger_retry_max_attempts: u32,
    /// First async retry delay, ms (doubles each time, full jitter). Default 200.
    pub ledger_retry_base_delay_ms: u64,
    /// Cap on one async retry delay, ms. Default 10000.
    pub ledger_retry_max_delay_ms: u64,
    /// Discord webhook for operator alerts. Unset: alerts are only logged.
    pub discord_webhook_url: Option<Secret<String>>,
    /// Key of the HMAC that hashes merchant API keys. Must be set (>= 32
    /// characters) when a `live_` card key is configured.
    pub api_key_hash_key: Secret<String>,
    /// Currency of confirmed payments. Default `KRW`.
    pub currency: String,
    /// Fault profile of the in-process sandbox: `none` (default) or `flaky`.
    pub sandbox_faults: String,
    /// `pretty` (default) or `json`.
    pub log_format: String,
}

/// The development HMAC key used when none is configured.
pub const DEV_API_KEY_HASH_KEY: &str = "paygate-development-key-hash-key-change-me";

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            database_url: Secret::new("sqlite://paygate.db".to_owned()),
            database_max_connections: 10,
            migrate_on_start: true,
            state_store: StateStoreKind::Sql,
            mongodb_uri: None,
            mongodb_database: "paygate".to_owned(),
            card_api_url: None,
            card_api_secret_key: None,
            card_api_timeout_ms: 10_000,
            card_api_max_attempts: 3,
            card_api_lookup_attempts: 3,
            ledger_api_url: None,
            ledger_api_timeout_ms: 3_000,
            ledger_retry_max_attempts: 5,
            ledger_retry_base_delay_ms: 200,
            ledger_retry_max_delay_ms: 10_000,
            discord_webhook_url: None,
            api_key_hash_key: Secret::new(DEV_API_KEY_HASH_KEY.to_owned()),
            currency: "KRW".to_owned(),
            sandbox_faults: "none".to_owned(),
            log_format: "pretty".to_owned(),
        }
    }
}

/// A configuration value that cannot be used; names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration `{key}`: {reason}")]
pub struct ConfigError {
    /// The offending key, as written in the TOML file.
    pub key: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        reason: reason.into(),
    }
}

impl Config {
    /// True when the card API is the in-process sandbox.
    pub fn card_sandbox(&self) -> bool {
        self.card_api_url.is_none()
    }

    /// True when the ledger is the in-process sandbox.
    pub fn ledger_sandbox(&self) -> bool {
        self.ledger_api_url.is_none()
    }

    /// Checks every value; call before binding anything.
    ///
    /// # Errors
    /// The first [`ConfigError`] found, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen
            .parse::<SocketAddr>()
            .map_err(|e| bad("listen", format!("not a socket address: {e}")))?;
        let db = self.database_url.expose();
        if !(db.starts_with("sqlite:")
            || db.starts_with("postgres://")
            || db.starts_with("postgresql://"))
        {
            return Err(bad(
                "database_url",
                "must start with sqlite: or postgres://",
            ));
        }
        if self.database_max_connections == 0 {
            return Err(bad("database_max_connections", "must be at least 1"));
        }
        if self.state_store == StateStoreKind::Mongodb && self.mongodb_uri.is_none() {
            return Err(bad(
                "mongodb_uri",
                "required when state_store = \"mongodb\"",
            ));
        }
        for (key, url) in [
            ("card_api_url", &self.card_api_url),
            ("ledger_api_url", &self.ledger_api_url),
        ] {
            if let Some(u) = url {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(bad(key, "must be an http:// or https:// URL"));
                }
            }
        }
        let live_key = self
            .card_api_secret_key
            .as_ref()
            .is_some_and(|k| k.expose().starts_with("live_"));
        if self.card_sandbox() && live_key {
            return Err(bad(
                "card_api_secret_key",
                "the sandbox refuses a live_ card key",
            ));
        }
        if !self.card_sandbox() && self.card_api_secret_key.is_none() {
            return Err(bad(
                "card_api_secret_key",
                "required when card_api_url is set",
            ));
        }
        if live_key
            && (self.api_key_hash_key.expose() == DEV_API_KEY_HASH_KEY
                || self.api_key_hash_key.expose().len() < 32)
        {
            return Err(bad(
                "api_key_hash_key",
                "set a secret of at least 32 characters for live keys",
            ));
        }
        for (key, v) in [
            ("card_api_timeout_ms", self.card_api_timeout_ms),
            ("ledger_api_timeout_ms", self.ledger_api_timeout_ms),
            (
                "ledger_retry_base_delay_ms",
                self.ledger_retry_base_delay_ms,
            ),
        ] {
            if v == 0 {
                return Err(bad(key, "must be greater than 0"));
            }
        }
        if self.ledger_retry_max_delay_ms < self.ledger_retry_base_delay_ms {
            return Err(bad(
                "ledger_retry_max_delay_ms",
                "must be >= ledger_retry_base_delay_ms",
            ));
        }
        if self.card_api_max_attempts == 0 || self.card_api_max_attempts > 10 {
            return Err(bad("card_api_max_attempts", "must be 1 to 10"));
        }
        if self.card_api_lookup_attempts == 0 || self.card_api_lookup_attempts > 10 {
            return Err(bad("card_api_lookup_attempts", "must be 1 to 10"));
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(bad("currency", "must be a 3-letter ISO 4217 code"));
        }
        if !matches!(self.log_format.as_str(), "pretty" | "json") {
            return Err(bad("log_format", "must be pretty or json"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn bad_values_name_their_key() {
        let c = Config {
            listen: "nope".into(),
            ..Config::default()
        };
        assert_eq!(c.validate().map_err(|e| e.key), Err("listen"));
        let c = Config {
            card_api_secret_key: Some(Secret::new("live_sk_x".into())),
            ..Config::default()
        };
        assert_eq!(c.validate().map_err(|e| e.key), Err("card_api_secret_key"));
        let c = Config {
            card_api_url: Some("http://x".into()),
            ..Config::default()
        };
        assert_eq!(c.validate().map_err(|e| e.key), Err("card_api_secret_key"));
    }
}
