//! Process configuration (DESIGN.md §11): the keys, their defaults and their
//! validation. Loading (defaults, then an optional TOML file, then `PAYGATE_*`
//! environment variables) happens in the binary; this module only says what
//! a valid configuration is, so a bad value stops the process before it binds.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::masking::Secret;

/// Which store keeps the realtime state records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
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
///
/// `Serialize` writes the effective configuration with every secret as
/// `"***"` (see [`Secret`]), for `paygate config check`.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
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
    /// Apply pending migrations when a process opens the SQL database;
    /// `false`: only check the schema is at this binary's migrations (a
    /// deployment applies them once, with `paygate migrate`). Default true.
    pub migrate_on_start: bool,
    /// `sql` (default) or `mongodb`.
    pub state_store: StateStoreKind,
    /// MongoDB connection string (with `state_store = "mongodb"`).
    pub mongodb_uri: Option<Secret<String>>,
    /// MongoDB database name. Default `paygate`.
    pub mongodb_database: String,
    /// MongoDB driver pool size per server. Default 20.
    pub mongodb_max_pool_size: u32,
    /// MongoDB write concern `w`: `majority` (default), a node count, or a tag.
    pub mongodb_write_concern: String,
    /// MongoDB journaled writes (`j`). Default true.
    pub mongodb_journal: bool,
    /// Card API base URL (Toss Payments v1 shape). Unset: the in-process sandbox.
    pub card_api_url: Option<String>,
    /// Card API secret key (`test_sk_...` / `live_sk_...`), sent as Basic auth.
    pub card_api_secret_key: Option<Secret<String>>,
    /// Resilience policy of card API calls (`[card_api_policy]`).
    pub card_api_policy: DownstreamPolicy,
    /// Lookups by orderId after a confirm got no answer. Default 3.
    pub card_api_lookup_attempts: u32,
    /// Per-attempt timeout of one page of the card company's transaction
    /// list (Toss Payments v1 `GET /v1/transactions`), ms: the list has its
    /// own, longer, timeout because Toss asks clients to allow at least
    /// 60 s for it. Default 60000; 1 to 600000, and at least 60000 when
    /// `card_api_url` names a real card API.
    pub card_api_list_attempt_timeout_ms: u64,
    /// Ledger API base URL. Unset: the in-process sandbox ledger.
    pub ledger_api_url: Option<String>,
    /// Resilience policy of ledger calls (`[ledger_api_policy]`); its
    /// `max_attempts` applies to the synchronous try and defaults to 1.
    pub ledger_api_policy: DownstreamPolicy,
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
    /// Requests per second a merchant may make (GCRA); 0 turns it off. Default 50.
    pub inbound_rate_limit_per_second: u32,
    /// Burst a merchant may make above its rate. Default 100.
    pub inbound_rate_limit_burst: u32,
    /// Merchant requests handled at once; more are shed with 503. Default 256.
    pub inbound_max_concurrent: u32,
    /// Requests one merchant may have in flight at once, counted from the
    /// moment the request is authenticated (a slow upload counts while it
    /// is read); more are refused with 429 `RATE_LIMITED` and `Retry-After`,
    /// so one merchant cannot take the whole `inbound_max_concurrent` from
    /// the others. 1 to `inbound_max_concurrent`. Unset: half of
    /// `inbound_max_concurrent`, rounded up (128 of the default 256), so that
    /// lowering the global limit alone stays valid; read it through
    /// [`Config::per_merchant_max_concurrent`].
    pub inbound_max_concurrent_per_merchant: Option<u32>,
    /// Time a merchant request has to be answered, ms, from its arrival.
    /// Past it a request is answered 503, except a confirm whose card call
    /// may be in flight: that one is answered 202 with its paymentId
    /// (`IN_PROGRESS`, poll `GET`) and carries on. Default 30000.
    pub inbound_request_timeout_ms: u64,
    /// Time to read a request's line and headers, ms: from the accept for a
    /// connection's first request, from the first byte for later ones; a
    /// client slower than that is disconnected. Default 10000.
    pub inbound_header_read_timeout_ms: u64,
    /// Time an idle keep-alive connection may wait for its next request,
    /// ms, before paygate closes it. Keep it above the idle timeout of a
    /// load balancer in front. Default 75000.
    pub inbound_idle_timeout_ms: u64,
    /// Largest `amount` a confirm may carry, minor units of `currency`; a
    /// confirm above it is refused with 400 before anything is charged.
    /// Default 100,000,000 (₩100 million); 1 to 2^53 - 1 (a JSON-safe
    /// integer).
    pub max_amount: i64,
    /// Time a stock hold lasts when `POST /v1/holds` names no `ttlSeconds`,
    /// seconds. Default 600 (10 minutes); 1 to `hold_max_ttl_seconds`.
    pub hold_default_ttl_seconds: u64,
    /// Longest `ttlSeconds` a hold may ask for, seconds; more is 400.
    /// Default 3600; 1 to 86400.
    pub hold_max_ttl_seconds: u64,
    /// Currency of confirmed payments. Default `KRW`, and the only one
    /// accepted: paygate is KRW-only today (amounts are whole won, the
    /// ledger and reconciliation compare them as such).
    pub currency: String,
    /// Fault profile of the in-process sandbox: `none` (default) or `flaky`.
    pub sandbox_faults: String,
    /// `pretty` (default) or `json`.
    pub log_format: String,
    /// The operators' time zone, an IANA name (`Asia/Seoul`, the default:
    /// the payments are KRW): `paygate batch --cron` reads its schedule in
    /// it, and the operator commands print times in it (and in UTC).
    pub time_zone: String,
    /// On SIGTERM/Ctrl-C, how long in-flight requests may take to finish
    /// before the server stops waiting, ms. Default 25,000 (inside
    /// Kubernetes' default 30 s grace period).
    pub shutdown_timeout_ms: u64,
    /// How often `serve`'s janitor looks for undecided payments (`PENDING`
    /// past a confirm's in-flight window, `UNKNOWN`) whose next check is
    /// due, ms; one replica at a time runs it (the lease `janitor`). 0
    /// turns it off (the batch still checks them). Default 30,000.
    pub janitor_interval_ms: u64,
    /// Wait before looking an undecided payment up again after the first
    /// lookup that learned nothing, ms; four times longer after each
    /// further one, at most `unknown_recheck_max_ms`. The janitor and
    /// `paygate batch` follow it. Default 60,000 (1, 4, 16, 60 minutes).
    pub unknown_recheck_first_ms: u64,
    /// Longest wait between two lookups of an undecided payment, ms, at
    /// least `unknown_recheck_first_ms`. Default 3,600,000 (1 h).
    pub unknown_recheck_max_ms: u64,
    /// How long the card company accepts a confirm after the customer
    /// authenticated, ms (Toss Payments discards a payment not confirmed
    /// within 10 minutes). Inside it, a payment whose lookup answers 404 is
    /// confirmed again under its own Idempotency-Key; once it (and a
    /// confirm's in-flight window) has passed with no approval in the
    /// lookup or the transaction list, it is settled as not charged
    /// (`PAYGATE_CONFIRM_EXPIRED`). Never set it below the card company's
    /// window. 0: never re-send (settle as soon as the in-flight window
    /// has passed). Default 600,000.
    pub card_confirm_window_ms: u64,
    /// Card company webhooks (`POST /v1/webhooks/card`) accepted per
    /// second on one replica, before 429 (the card company delivers a
    /// refused one again). Default 100; 0 turns the limit off.
    pub card_webhook_rate_limit_per_second: u32,
    /// How often a replica's webhook worker looks for receipts it has not
    /// been woken for (another replica's, or a retry due), ms. Default
    /// 1,000. A receipt taken by this replica is worked at once.
    pub card_webhook_poll_ms: u64,
    /// The key that seals merchants' webhook signing secrets at rest: 32
    /// bytes, base64 (`openssl rand -base64 32`). Unset: sandbox mode uses
    /// a development key; otherwise merchant webhooks are off (`PUT
    /// /v1/webhook-endpoint` answers 503; events are still listed by `GET
    /// /v1/events`). Changing it makes the stored secrets unreadable:
    /// merchants then register their endpoints again.
    pub secrets_key: Option<Secret<String>>,
    /// Accept merchant webhook endpoints on loopback, private and
    /// link-local addresses (tests and local development only; it lets a
    /// merchant make paygate call inside its network). Default false.
    pub webhook_allow_private: bool,
    /// How often a replica's webhook worker looks for events to number
    /// and deliver, ms. Default 500; 1 to 60000.
    pub webhook_poll_ms: u64,
    /// Wait after a merchant endpoint's first failed delivery, ms; each
    /// later wait is three times the one before, at most a day. Default
    /// 10,000.
    pub webhook_retry_first_ms: u64,
    /// Tries of one webhook delivery before it is marked failed (`paygate
    /// webhooks resend` sends it again). Default 12 (about three days).
    pub webhook_max_attempts: u32,
    /// The operator console's listen address (`paygate console`). Default
    /// `127.0.0.1:8090`: loopback, reached through an SSH tunnel or a
    /// proxy that terminates TLS. Must differ from `listen`: the console is
    /// never served on the merchant port.
    pub console_listen: String,
    /// The console's address as operators reach it (`https://console.example`),
    /// used for the link in every Discord alert and, when it is `https`, to
    /// mark the session cookie `Secure`. Unset: alerts carry no link.
    pub console_public_url: Option<String>,
    /// How long a console login lasts, ms (absolute, from the login).
    /// Default 28,800,000 (8 hours); 1,000 to 604,800,000 (7 days).
    pub console_session_ttl_ms: u64,
    /// Console login attempts allowed per minute for one operator name and,
    /// separately, for one client address; further attempts are refused
    /// (429) until the minute has passed. Default 5; 1 to 1000.
    pub console_login_attempts_per_minute: u32,
    /// How long a replica keeps a merchant's key lookup, ms: a revoked key
    /// stops working on every replica within this time. Default 5,000; 0
    /// asks the database on every request; at most 60,000.
    pub merchant_cache_ttl_ms: u64,
}

/// The least per-attempt timeout Toss Payments asks clients to allow for
/// `GET /v1/transactions`, ms (and the default of
/// [`Config::card_api_list_attempt_timeout_ms`]).
pub const CARD_API_LIST_MIN_TIMEOUT_MS: u64 = 60_000;

/// The default of [`Config::max_amount`]: ₩100,000,000.
pub const DEFAULT_MAX_AMOUNT: i64 = 100_000_000;

/// The largest integer a JSON number carries exactly (2^53 - 1), and so the
/// largest `max_amount` accepted.
pub const MAX_JSON_SAFE_INTEGER: i64 = 9_007_199_254_740_991;

/// Currencies paygate accepts in `currency`.
pub const SUPPORTED_CURRENCIES: &[&str] = &["KRW"];

/// The keys whose values are [`Secret`]s: never printed, in an error either,
/// and read as text whatever they look like (a key may be all digits).
pub const SECRET_KEYS: &[&str] = &[
    "database_url",
    "mongodb_uri",
    "card_api_secret_key",
    "discord_webhook_url",
    "api_key_hash_key",
    "secrets_key",
];

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
            mongodb_max_pool_size: 20,
            mongodb_write_concern: "majority".to_owned(),
            mongodb_journal: true,
            card_api_url: None,
            card_api_secret_key: None,
            card_api_policy: DownstreamPolicy::card_api(),
            card_api_lookup_attempts: 3,
            card_api_list_attempt_timeout_ms: CARD_API_LIST_MIN_TIMEOUT_MS,
            ledger_api_url: None,
            ledger_api_policy: DownstreamPolicy::ledger_api(),
            ledger_retry_max_attempts: 5,
            ledger_retry_base_delay_ms: 200,
            ledger_retry_max_delay_ms: 10_000,
            discord_webhook_url: None,
            api_key_hash_key: Secret::new(DEV_API_KEY_HASH_KEY.to_owned()),
            inbound_rate_limit_per_second: 50,
            inbound_rate_limit_burst: 100,
            inbound_max_concurrent: 256,
            inbound_max_concurrent_per_merchant: None,
            inbound_request_timeout_ms: 30_000,
            inbound_header_read_timeout_ms: 10_000,
            inbound_idle_timeout_ms: 75_000,
            max_amount: DEFAULT_MAX_AMOUNT,
            hold_default_ttl_seconds: 600,
            hold_max_ttl_seconds: 3_600,
            currency: "KRW".to_owned(),
            sandbox_faults: "none".to_owned(),
            log_format: "pretty".to_owned(),
            time_zone: "Asia/Seoul".to_owned(),
            shutdown_timeout_ms: 25_000,
            janitor_interval_ms: 30_000,
            unknown_recheck_first_ms: 60_000,
            unknown_recheck_max_ms: 3_600_000,
            card_confirm_window_ms: 600_000,
            card_webhook_rate_limit_per_second: 100,
            card_webhook_poll_ms: 1_000,
            secrets_key: None,
            webhook_allow_private: false,
            webhook_poll_ms: 500,
            webhook_retry_first_ms: 10_000,
            webhook_max_attempts: 12,
            console_listen: "127.0.0.1:8090".to_owned(),
            console_public_url: None,
            console_session_ttl_ms: 28_800_000,
            console_login_attempts_per_minute: 5,
            merchant_cache_ttl_ms: 5_000,
        }
    }
}

/// A configuration value that cannot be used; names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration `{key}`: {reason}")]
pub struct ConfigError {
    /// The offending key, as written in the TOML file (`table.key` when nested).
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
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

    /// Requests one merchant may have in flight at once: the configured
    /// `inbound_max_concurrent_per_merchant`, or half of
    /// `inbound_max_concurrent` rounded up when it is unset.
    pub fn per_merchant_max_concurrent(&self) -> u32 {
        self.inbound_max_concurrent_per_merchant
            .unwrap_or_else(|| self.inbound_max_concurrent.div_ceil(2))
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
        if !(1..=86_400).contains(&self.hold_max_ttl_seconds) {
            return Err(bad("hold_max_ttl_seconds", "must be 1 to 86400"));
        }
        if !(1..=self.hold_max_ttl_seconds).contains(&self.hold_default_ttl_seconds) {
            return Err(bad(
                "hold_default_ttl_seconds",
                "must be 1 to hold_max_ttl_seconds",
            ));
        }
        if self.shutdown_timeout_ms == 0 {
            return Err(bad("shutdown_timeout_ms", "must be greater than 0"));
        }
        if self.unknown_recheck_max_ms < self.unknown_recheck_first_ms {
            return Err(bad(
                "unknown_recheck_max_ms",
                "must be at least unknown_recheck_first_ms",
            ));
        }
        if self.card_confirm_window_ms > 86_400_000 {
            return Err(bad(
                "card_confirm_window_ms",
                "must be at most 86400000 (one day)",
            ));
        }
        if self.card_webhook_poll_ms == 0 || self.card_webhook_poll_ms > 60_000 {
            return Err(bad("card_webhook_poll_ms", "must be 1 to 60000"));
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
        if self.mongodb_max_pool_size == 0 {
            return Err(bad("mongodb_max_pool_size", "must be at least 1"));
        }
        if self.mongodb_write_concern.trim().is_empty() || self.mongodb_write_concern == "0" {
            return Err(bad(
                "mongodb_write_concern",
                "must be majority, a node count >= 1, or a tag",
            ));
        }
        if self.mongodb_database.is_empty() {
            return Err(bad("mongodb_database", "must not be empty"));
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
        self.card_api_policy.validate("card_api_policy")?;
        self.ledger_api_policy.validate("ledger_api_policy")?;
        if self.ledger_retry_base_delay_ms == 0 {
            return Err(bad("ledger_retry_base_delay_ms", "must be greater than 0"));
        }
        if self.inbound_max_concurrent == 0 {
            return Err(bad("inbound_max_concurrent", "must be at least 1"));
        }
        if !(1..=self.inbound_max_concurrent).contains(&self.per_merchant_max_concurrent()) {
            return Err(bad(
                "inbound_max_concurrent_per_merchant",
                "must be at least 1 and at most inbound_max_concurrent",
            ));
        }
        for (key, ms) in [
            (
                "inbound_request_timeout_ms",
                self.inbound_request_timeout_ms,
            ),
            (
                "inbound_header_read_timeout_ms",
                self.inbound_header_read_timeout_ms,
            ),
            ("inbound_idle_timeout_ms", self.inbound_idle_timeout_ms),
        ] {
            if !(1..=3_600_000).contains(&ms) {
                return Err(bad(key, "must be 1 to 3600000 (ms)"));
            }
        }
        if self.ledger_retry_max_delay_ms < self.ledger_retry_base_delay_ms {
            return Err(bad(
                "ledger_retry_max_delay_ms",
                "must be >= ledger_retry_base_delay_ms",
            ));
        }
        if self.card_api_lookup_attempts == 0 || self.card_api_lookup_attempts > 10 {
            return Err(bad("card_api_lookup_attempts", "must be 1 to 10"));
        }
        if !(1..=MAX_JSON_SAFE_INTEGER).contains(&self.max_amount) {
            return Err(bad("max_amount", "must be 1 to 9007199254740991"));
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(bad("currency", "must be a 3-letter ISO 4217 code"));
        }
        if !SUPPORTED_CURRENCIES.contains(&self.currency.as_str()) {
            return Err(bad(
                "currency",
                format!(
                    "{} is not supported: paygate is KRW-only today (set currency = \"KRW\")",
                    self.currency
                ),
            ));
        }
        if !(1..=600_000).contains(&self.card_api_list_attempt_timeout_ms) {
            return Err(bad(
                "card_api_list_attempt_timeout_ms",
                "must be 1 to 600000 (ms)",
            ));
        }
        if !self.card_sandbox()
            && self.card_api_list_attempt_timeout_ms < CARD_API_LIST_MIN_TIMEOUT_MS
        {
            return Err(bad(
                "card_api_list_attempt_timeout_ms",
                "must be at least 60000 against a real card API (Toss asks clients to allow 60 s for the transaction list)",
            ));
        }
        if !matches!(self.log_format.as_str(), "pretty" | "json") {
            return Err(bad("log_format", "must be pretty or json"));
        }
        if let Some(key) = &self.secrets_key {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD.decode(key.expose().trim());
            if decoded.map(|k| k.len()) != Ok(32) {
                return Err(bad(
                    "secrets_key",
                    "must be 32 bytes, base64-encoded (openssl rand -base64 32)",
                ));
            }
        }
        if self.webhook_poll_ms == 0 || self.webhook_poll_ms > 60_000 {
            return Err(bad("webhook_poll_ms", "must be 1 to 60000"));
        }
        if self.webhook_retry_first_ms == 0 || self.webhook_retry_first_ms > 3_600_000 {
            return Err(bad("webhook_retry_first_ms", "must be 1 to 3600000"));
        }
        if !(1..=100).contains(&self.webhook_max_attempts) {
            return Err(bad("webhook_max_attempts", "must be 1 to 100"));
        }
        let console = self
            .console_listen
            .parse::<SocketAddr>()
            .map_err(|e| bad("console_listen", format!("not a socket address: {e}")))?;
        if let Ok(merchant) = self.listen.parse::<SocketAddr>() {
            let same_host = merchant.ip() == console.ip()
                || merchant.ip().is_unspecified()
                || console.ip().is_unspecified();
            if same_host && merchant.port() == console.port() && console.port() != 0 {
                return Err(bad(
                    "console_listen",
                    "must not be the merchant API's address (`listen`)",
                ));
            }
        }
        if let Some(url) = &self.console_public_url {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            if rest
                .is_none_or(|r| r.trim_matches('/').is_empty() || r.contains(char::is_whitespace))
            {
                return Err(bad(
                    "console_public_url",
                    "must be an http:// or https:// URL with a host",
                ));
            }
        }
        if !(1_000..=604_800_000).contains(&self.console_session_ttl_ms) {
            return Err(bad("console_session_ttl_ms", "must be 1000 to 604800000"));
        }
        if self.merchant_cache_ttl_ms > 60_000 {
            return Err(bad("merchant_cache_ttl_ms", "must be 0 to 60000"));
        }
        if !(1..=1000).contains(&self.console_login_attempts_per_minute) {
            return Err(bad(
                "console_login_attempts_per_minute",
                "must be 1 to 1000",
            ));
        }
        Ok(())
    }
}

/// Resilience knobs of one downstream (see crate `paygate-resilience`).
/// Durations in ms, rates in percent.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamPolicy {
    /// Whole call, retries included.
    pub deadline_ms: u64,
    /// One attempt.
    pub attempt_timeout_ms: u64,
    /// Attempts, including the first (idempotent calls only).
    pub max_attempts: u32,
    /// First retry backoff (doubles, full jitter).
    pub retry_base_delay_ms: u64,
    /// Cap on one retry backoff.
    pub retry_max_delay_ms: u64,
    /// Retries may add at most this share of the requests, percent.
    pub retry_budget_percent: f32,
    /// Retries always allowed per second, whatever the share.
    pub retry_budget_min_per_second: u32,
    /// How long a request counts toward the budget.
    pub retry_budget_ttl_ms: u64,
    /// `count` or `time`.
    pub breaker_window_type: String,
    /// Calls (count window) or seconds (time window).
    pub breaker_window_size: u32,
    /// Failure rate that opens the breaker, percent.
    pub breaker_failure_rate_threshold: f64,
    /// Slow-call rate that opens the breaker, percent.
    pub breaker_slow_call_rate_threshold: f64,
    /// A call at least this long is slow.
    pub breaker_slow_call_duration_ms: u64,
    /// Calls needed in the window before rates count.
    pub breaker_minimum_number_of_calls: u32,
    /// Time open before probing.
    pub breaker_wait_duration_in_open_ms: u64,
    /// Probes in half-open.
    pub breaker_permitted_calls_in_half_open: u32,
    /// `normal`, `forced_open` or `disabled`.
    pub breaker_mode: String,
    /// Calls in flight at once; more are rejected at once.
    pub bulkhead_max_concurrent: u32,
    /// Outbound calls per second (GCRA); 0 turns it off.
    pub rate_limit_per_second: u32,
    /// Burst above the rate.
    pub rate_limit_burst: u32,
    /// Longest wait for a rate-limit slot before refusing.
    pub rate_limit_max_wait_ms: u64,
}

impl DownstreamPolicy {
    /// Card API defaults: 10 s per attempt (a confirm can be slow), 3
    /// attempts, 30 s overall, breaker over the last 100 calls.
    pub fn card_api() -> Self {
        Self {
            deadline_ms: 30_000,
            attempt_timeout_ms: 10_000,
            max_attempts: 3,
            retry_base_delay_ms: 50,
            retry_max_delay_ms: 1_000,
            retry_budget_percent: 20.0,
            retry_budget_min_per_second: 10,
            retry_budget_ttl_ms: 10_000,
            breaker_window_type: "count".to_owned(),
            breaker_window_size: 100,
            breaker_failure_rate_threshold: 50.0,
            breaker_slow_call_rate_threshold: 100.0,
            breaker_slow_call_duration_ms: 8_000,
            breaker_minimum_number_of_calls: 20,
            breaker_wait_duration_in_open_ms: 30_000,
            breaker_permitted_calls_in_half_open: 5,
            breaker_mode: "normal".to_owned(),
            bulkhead_max_concurrent: 100,
            rate_limit_per_second: 0,
            rate_limit_burst: 0,
            rate_limit_max_wait_ms: 1_000,
        }
    }

    /// Ledger defaults: 3 s per attempt, one synchronous attempt (the async
    /// retries and the batch do the rest), breaker over the last 50 calls.
    pub fn ledger_api() -> Self {
        Self {
            deadline_ms: 5_000,
            attempt_timeout_ms: 3_000,
            max_attempts: 1,
            breaker_window_size: 50,
            breaker_slow_call_duration_ms: 2_500,
            breaker_minimum_number_of_calls: 10,
            breaker_wait_duration_in_open_ms: 10_000,
            breaker_permitted_calls_in_half_open: 3,
            bulkhead_max_concurrent: 50,
            ..Self::card_api()
        }
    }

    /// Checks every knob; `table` names the table in errors.
    ///
    /// # Errors
    /// [`ConfigError`] naming `table.key`.
    pub fn validate(&self, table: &str) -> Result<(), ConfigError> {
        let k = |key: &str| format!("{table}.{key}");
        for (key, v) in [
            ("deadline_ms", self.deadline_ms),
            ("attempt_timeout_ms", self.attempt_timeout_ms),
            ("retry_base_delay_ms", self.retry_base_delay_ms),
            ("retry_budget_ttl_ms", self.retry_budget_ttl_ms),
            (
                "breaker_slow_call_duration_ms",
                self.breaker_slow_call_duration_ms,
            ),
        ] {
            if v == 0 {
                return Err(bad(k(key), "must be greater than 0"));
            }
        }
        if self.deadline_ms < self.attempt_timeout_ms {
            return Err(bad(k("deadline_ms"), "must be >= attempt_timeout_ms"));
        }
        if self.retry_max_delay_ms < self.retry_base_delay_ms {
            return Err(bad(
                k("retry_max_delay_ms"),
                "must be >= retry_base_delay_ms",
            ));
        }
        if !(1..=10).contains(&self.max_attempts) {
            return Err(bad(k("max_attempts"), "must be 1 to 10"));
        }
        if !(0.0..=1000.0).contains(&self.retry_budget_percent) {
            return Err(bad(k("retry_budget_percent"), "must be 0 to 1000"));
        }
        if !matches!(self.breaker_window_type.as_str(), "count" | "time") {
            return Err(bad(k("breaker_window_type"), "must be count or time"));
        }
        if self.breaker_window_size == 0 {
            return Err(bad(k("breaker_window_size"), "must be at least 1"));
        }
        for (key, v) in [
            (
                "breaker_failure_rate_threshold",
                self.breaker_failure_rate_threshold,
            ),
            (
                "breaker_slow_call_rate_threshold",
                self.breaker_slow_call_rate_threshold,
            ),
        ] {
            if !(v > 0.0 && v <= 100.0) {
                return Err(bad(k(key), "must be a percentage in (0, 100]"));
            }
        }
        if self.breaker_permitted_calls_in_half_open == 0 {
            return Err(bad(
                k("breaker_permitted_calls_in_half_open"),
                "must be at least 1",
            ));
        }
        if !matches!(
            self.breaker_mode.as_str(),
            "normal" | "forced_open" | "disabled"
        ) {
            return Err(bad(
                k("breaker_mode"),
                "must be normal, forced_open or disabled",
            ));
        }
        if self.bulkhead_max_concurrent == 0 {
            return Err(bad(k("bulkhead_max_concurrent"), "must be at least 1"));
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
    fn the_console_is_never_on_the_merchant_port_and_its_url_is_checked() {
        let same = Config {
            console_listen: "127.0.0.1:8080".into(),
            ..Config::default()
        };
        assert_eq!(
            same.validate().map_err(|e| e.key),
            Err("console_listen".to_owned())
        );
        let wildcard = Config {
            listen: "0.0.0.0:9000".into(),
            console_listen: "127.0.0.1:9000".into(),
            ..Config::default()
        };
        assert_eq!(
            wildcard.validate().map_err(|e| e.key),
            Err("console_listen".to_owned())
        );
        for url in ["console.example", "https://", "ftp://x", "https://a b"] {
            let c = Config {
                console_public_url: Some(url.into()),
                ..Config::default()
            };
            assert_eq!(
                c.validate().map_err(|e| e.key),
                Err("console_public_url".to_owned()),
                "{url}"
            );
        }
        let ok = Config {
            console_public_url: Some("https://console.example/".into()),
            ..Config::default()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn a_recheck_schedule_whose_longest_wait_is_below_its_first_is_refused() {
        let c = Config {
            unknown_recheck_first_ms: 120_000,
            unknown_recheck_max_ms: 60_000,
            ..Config::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "unknown_recheck_max_ms");
        let every_time = Config {
            unknown_recheck_first_ms: 0,
            unknown_recheck_max_ms: 0,
            janitor_interval_ms: 0,
            ..Config::default()
        };
        assert_eq!(
            every_time.validate(),
            Ok(()),
            "0 is every check, and no janitor"
        );
    }

    #[test]
    fn secret_keys_are_exactly_the_secret_fields() {
        // Every secret set: the serialized config shows "***" exactly there.
        let c = Config {
            mongodb_uri: Some(Secret::new("mongodb://u:p@h".into())),
            card_api_secret_key: Some(Secret::new("test_sk_x".into())),
            discord_webhook_url: Some(Secret::new("https://discord/x".into())),
            secrets_key: Some(Secret::new(
                "c2VjcmV0cy1rZXktZm9yLXRlc3RzLTAxMjM0NTY3ODk=".into(),
            )),
            ..Config::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        let mut masked: Vec<&str> = v
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| *v == "***")
            .map(|(k, _)| k.as_str())
            .collect();
        masked.sort_unstable();
        let mut keys = SECRET_KEYS.to_vec();
        keys.sort_unstable();
        assert_eq!(masked, keys);
    }

    #[test]
    fn bad_values_name_their_key() {
        let c = Config {
            listen: "nope".into(),
            ..Config::default()
        };
        assert_eq!(c.validate().map_err(|e| e.key), Err("listen".to_owned()));
        let c = Config {
            card_api_secret_key: Some(Secret::new("live_sk_x".into())),
            ..Config::default()
        };
        assert_eq!(
            c.validate().map_err(|e| e.key),
            Err("card_api_secret_key".to_owned())
        );
        let c = Config {
            card_api_url: Some("http://x".into()),
            ..Config::default()
        };
        assert_eq!(
            c.validate().map_err(|e| e.key),
            Err("card_api_secret_key".to_owned())
        );
        let c = Config {
            currency: "usd".into(),
            ..Config::default()
        };
        assert_eq!(c.validate().map_err(|e| e.key), Err("currency".to_owned()));
        for max_amount in [0, -1, MAX_JSON_SAFE_INTEGER + 1] {
            let c = Config {
                max_amount,
                ..Config::default()
            };
            assert_eq!(
                c.validate().map_err(|e| e.key),
                Err("max_amount".to_owned())
            );
        }
        for (key, c) in [
            (
                "inbound_header_read_timeout_ms",
                Config {
                    inbound_header_read_timeout_ms: 0,
                    ..Config::default()
                },
            ),
            (
                "inbound_idle_timeout_ms",
                Config {
                    inbound_idle_timeout_ms: 0,
                    ..Config::default()
                },
            ),
            (
                "inbound_max_concurrent_per_merchant",
                Config {
                    inbound_max_concurrent_per_merchant: Some(0),
                    ..Config::default()
                },
            ),
            (
                "inbound_max_concurrent_per_merchant",
                Config {
                    inbound_max_concurrent: 10,
                    inbound_max_concurrent_per_merchant: Some(11),
                    ..Config::default()
                },
            ),
        ] {
            assert_eq!(c.validate().map_err(|e| e.key), Err(key.to_owned()));
        }
        // The global limit lowered alone: the per-merchant cap follows it.
        let c = Config {
            inbound_max_concurrent: 6,
            ..Config::default()
        };
        assert_eq!(c.validate().map_err(|e| e.key), Ok(()));
        assert_eq!(c.per_merchant_max_concurrent(), 3);
        assert_eq!(Config::default().per_merchant_max_concurrent(), 128);
        let c = Config {
            inbound_max_concurrent: 1,
            ..Config::default()
        };
        assert_eq!(c.per_merchant_max_concurrent(), 1);
        assert_eq!(c.validate().map_err(|e| e.key), Ok(()));
        let mut c = Config::default();
        c.ledger_api_policy.breaker_window_type = "sliding".into();
        assert_eq!(
            c.validate().map_err(|e| e.key),
            Err("ledger_api_policy.breaker_window_type".to_owned())
        );
    }

    #[test]
    fn a_currency_other_than_krw_stops_the_start_naming_the_key() {
        for currency in ["USD", "JPY", "EUR"] {
            let c = Config {
                currency: currency.into(),
                ..Config::default()
            };
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, "currency");
            assert!(e.reason.contains("KRW-only"), "{e}");
            assert!(e.to_string().contains("`currency`"), "{e}");
        }
        let krw = Config {
            currency: "KRW".into(),
            ..Config::default()
        };
        assert_eq!(krw.validate(), Ok(()));
    }

    #[test]
    fn the_list_timeout_is_its_own_and_at_least_60_s_against_a_real_card_api() {
        assert_eq!(Config::default().card_api_list_attempt_timeout_ms, 60_000);
        let real = |ms| Config {
            card_api_url: Some("https://api.example.invalid".into()),
            card_api_secret_key: Some(Secret::new("test_sk_x".into())),
            card_api_list_attempt_timeout_ms: ms,
            ..Config::default()
        };
        assert_eq!(real(60_000).validate(), Ok(()));
        assert_eq!(
            real(59_999).validate().map_err(|e| e.key),
            Err("card_api_list_attempt_timeout_ms".to_owned())
        );
        // The sandbox may use a short one (tests), but not none.
        let sandbox = |ms| Config {
            card_api_list_attempt_timeout_ms: ms,
            ..Config::default()
        };
        assert_eq!(sandbox(500).validate(), Ok(()));
        for ms in [0, 600_001] {
            assert_eq!(
                sandbox(ms).validate().map_err(|e| e.key),
                Err("card_api_list_attempt_timeout_ms".to_owned())
            );
        }
        // The key is read from TOML and the environment like the others.
        let c: Config =
            serde_json::from_str(r#"{"card_api_list_attempt_timeout_ms": 90000}"#).unwrap();
        assert_eq!(c.card_api_list_attempt_timeout_ms, 90_000);
    }
}
