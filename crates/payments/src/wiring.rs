//! Builds what every command needs from a [`Config`], with no HTTP server:
//! the SQL database (migrated when configured), the state store (SQL or
//! MongoDB), the card API and ledger clients behind their resilience
//! stacks, the alerter with its outbox, and the [`Saga`] over them.
//!
//! `serve`, `batch`, `reconcile` and `check` all start here. When the config
//! names no card or ledger URL, the caller starts the sandbox simulators
//! (crate `paygate-sandbox`, which needs an HTTP server and so is not a
//! dependency of this crate) and passes their [`SandboxUrls`].

use std::{sync::Arc, time::Duration};

use paygate_alert::OutboxAlerter;
use paygate_api_log::SqlApiLog;
use paygate_card_api::{CardApi, TossCardApi};
use paygate_core::{
    config::{ConfigError, DownstreamPolicy, StateStoreKind},
    Config, Secret,
};
use paygate_ledger_api::{HttpLedgerApi, LedgerApi};
use paygate_resilience::Downstream;
use paygate_state_store::{
    InventoryStore, SqlDatabase, SqlInventoryStore, SqlStateStore, StateStore, StoreError,
};

use crate::{saga::Downstreams, Saga, SagaSettings};

/// Why the components could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    /// A configuration value is invalid (names the key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The SQL database or the state store could not be opened or migrated.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Http(String),
    /// A downstream has neither a URL nor a sandbox.
    #[error("not configured: {0}")]
    Unconfigured(&'static str),
}

/// How long a process waits for its SQL database and its schema at start
/// (a database restarting, a migration job still running) before it fails.
pub const DATABASE_OPEN_WAIT: Duration = Duration::from_secs(60);

/// The SQL database of `config`, with `max_connections`: migrated when
/// `migrate_on_start`, else checked to be at this binary's migrations;
/// connection and step retried for up to [`DATABASE_OPEN_WAIT`].
///
/// # Errors
/// [`StoreError`] once the wait has passed.
pub async fn open_database(
    config: &Config,
    max_connections: u32,
) -> Result<SqlDatabase, paygate_state_store::StoreError> {
    let step = if config.migrate_on_start {
        paygate_state_store::SchemaStep::Migrate
    } else {
        paygate_state_store::SchemaStep::Check
    };
    SqlDatabase::open(
        config.database_url.expose(),
        max_connections,
        step,
        DATABASE_OPEN_WAIT,
    )
    .await
}

/// The in-process sandbox's addresses, for the downstreams the config leaves
/// unset.
#[derive(Clone, Debug)]
pub struct SandboxUrls {
    /// Base URL of the card API simulator.
    pub card_url: String,
    /// The secret key the card simulator accepts.
    pub card_secret: Secret<String>,
    /// Base URL of the ledger simulator.
    pub ledger_url: String,
}

/// Everything but the HTTP server. The batch and the reconciliation build
/// these too.
pub struct Components {
    /// The SQL database (log, merchants, outbox, leases; state with `sql`).
    pub db: SqlDatabase,
    /// The state store.
    pub store: Arc<dyn StateStore>,
    /// The saga and its downstream stacks.
    pub saga: Arc<Saga>,
    /// Inventory and holds (on the state store's backend).
    pub inventory: Arc<dyn InventoryStore>,
    /// The alerter.
    pub alerter: Arc<OutboxAlerter>,
}

impl Components {
    /// Builds the components from `config`; `sandbox` supplies the URLs the
    /// config leaves unset.
    ///
    /// # Errors
    /// [`WiringError`].
    pub async fn build(
        config: &Config,
        sandbox: Option<&SandboxUrls>,
    ) -> Result<Self, WiringError> {
        config.validate()?;
        let db = open_database(config, config.database_max_connections).await?;
        let (store, inventory) = stores(config, &db).await?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| WiringError::Http(e.to_string()))?;
        let downstreams = downstreams(config, &http, sandbox)?;
        let discord = config
            .discord_webhook_url
            .as_ref()
            .map(|url| paygate_alert::DiscordClient::new(http.clone(), url.clone(), 5));
        if discord.is_none() {
            tracing::warn!("no Discord webhook configured (PAYGATE_DISCORD_WEBHOOK_URL): alerts are logged and kept in the outbox");
        }
        let alerter = OutboxAlerter::with_console(
            paygate_alert::SqlOutbox::new(db.clone()),
            discord,
            config.console_public_url.clone(),
        );
        let settings = SagaSettings {
            currency: config.currency.clone(),
            lookup_attempts: config.card_api_lookup_attempts,
            ledger_retry_max_attempts: config.ledger_retry_max_attempts,
            ledger_retry_base_delay: Duration::from_millis(config.ledger_retry_base_delay_ms),
            ledger_retry_max_delay: Duration::from_millis(config.ledger_retry_max_delay_ms),
            settle_on_access_after: crate::saga::in_flight_window(
                config.card_api_policy.deadline_ms,
            ),
            card_confirm_window: Duration::from_millis(config.card_confirm_window_ms),
            ..SagaSettings::default()
        };
        let saga = Saga::new(
            store.clone(),
            Arc::new(SqlApiLog::new(db.clone())),
            downstreams,
            alerter.clone(),
            settings,
        )
        .with_inventory(inventory.clone());
        // State and log in one SQL database: log rows share commits with
        // the state changes (three commits per approved, saved confirm).
        let saga = Arc::new(match config.state_store {
            StateStoreKind::Sql => saga.with_journal(Arc::new(paygate_api_log::SqlJournal::new(
                SqlStateStore::new(db.clone()),
            ))),
            StateStoreKind::Mongodb => saga,
        });
        Ok(Self {
            db,
            store,
            saga,
            inventory,
            alerter,
        })
    }
}

/// The state store the config selects, on `db` (for commands that need no
/// downstream: `paygate payments show`, `prune`).
///
/// # Errors
/// [`WiringError`] when the store cannot be opened.
pub async fn state_store(
    config: &Config,
    db: &SqlDatabase,
) -> Result<Arc<dyn StateStore>, WiringError> {
    Ok(stores(config, db).await?.0)
}

/// The state store and the inventory store the config selects: both in SQL
/// on `db`, or both in MongoDB (one client).
///
/// # Errors
/// [`WiringError`] when a store cannot be opened.
pub async fn stores(
    config: &Config,
    db: &SqlDatabase,
) -> Result<(Arc<dyn StateStore>, Arc<dyn InventoryStore>), WiringError> {
    match config.state_store {
        StateStoreKind::Sql => Ok((
            Arc::new(SqlStateStore::new(db.clone())),
            Arc::new(SqlInventoryStore::new(db.clone())),
        )),
        StateStoreKind::Mongodb => {
            let uri = config.mongodb_uri.as_ref().ok_or(ConfigError {
                key: "mongodb_uri".to_owned(),
                reason: "required when state_store = \"mongodb\"".to_owned(),
            })?;
            let options = paygate_state_store::MongoOptions {
                database: config.mongodb_database.clone(),
                max_pool_size: config.mongodb_max_pool_size,
                write_concern_w: config.mongodb_write_concern.clone(),
                journal: config.mongodb_journal,
            };
            let store =
                paygate_state_store::MongoStateStore::connect(uri.expose(), &options).await?;
            tracing::info!(
                transactions = store.uses_transactions(),
                "state store: MongoDB"
            );
            let inventory =
                paygate_state_store::MongoInventoryStore::new(store.database().clone()).await?;
            Ok((Arc::new(store), Arc::new(inventory)))
        }
    }
}

/// The card API and ledger clients behind their stacks.
fn downstreams(
    config: &Config,
    http: &reqwest::Client,
    sandbox: Option<&SandboxUrls>,
) -> Result<Downstreams, WiringError> {
    let (card_url, card_key) = match (&config.card_api_url, sandbox) {
        (Some(url), _) => (
            url.clone(),
            config.card_api_secret_key.clone().unwrap_or_default(),
        ),
        (None, Some(s)) => (s.card_url.clone(), s.card_secret.clone()),
        (None, None) => return Err(WiringError::Unconfigured("card API URL (card_api_url)")),
    };
    let card: Arc<dyn CardApi> = Arc::new(
        TossCardApi::new(
            http.clone(),
            &card_url,
            card_key,
            Duration::from_millis(config.card_api_policy.attempt_timeout_ms),
        )
        .with_list_timeout(Duration::from_millis(
            config.card_api_list_attempt_timeout_ms,
        )),
    );
    let ledger_url = match (&config.ledger_api_url, sandbox) {
        (Some(url), _) => url.clone(),
        (None, Some(s)) => s.ledger_url.clone(),
        (None, None) => return Err(WiringError::Unconfigured("ledger URL (ledger_api_url)")),
    };
    let ledger: Arc<dyn LedgerApi> = Arc::new(HttpLedgerApi::new(
        http.clone(),
        &ledger_url,
        Duration::from_millis(config.ledger_api_policy.attempt_timeout_ms),
    ));
    Ok(Downstreams {
        card,
        card_stack: Arc::new(Downstream::new("card_api", &config.card_api_policy)),
        list_stack: Arc::new(Downstream::new("card_api_list", &list_policy(config))),
        ledger,
        ledger_stack: Arc::new(Downstream::new("ledger_api", &config.ledger_api_policy)),
    })
}

/// The recheck schedule of undecided payments the config sets
/// (`unknown_recheck_first_ms`, `unknown_recheck_max_ms`).
pub fn recheck_schedule(config: &Config) -> crate::RecheckSchedule {
    crate::RecheckSchedule {
        first: Duration::from_millis(config.unknown_recheck_first_ms),
        max: Duration::from_millis(config.unknown_recheck_max_ms),
    }
}

/// The transaction list's policy: the card API's, with the list's own
/// per-attempt timeout (`card_api_list_attempt_timeout_ms`, 60 s by default
/// as Toss asks) and a deadline that lets every attempt run to it.
pub fn list_policy(config: &Config) -> DownstreamPolicy {
    let p = &config.card_api_policy;
    let attempt = config.card_api_list_attempt_timeout_ms;
    let attempts = u64::from(p.max_attempts.max(1));
    DownstreamPolicy {
        attempt_timeout_ms: attempt,
        deadline_ms: p.deadline_ms.max(
            attempt
                .saturating_mul(attempts)
                .saturating_add(p.retry_max_delay_ms.saturating_mul(attempts)),
        ),
        breaker_slow_call_duration_ms: p.breaker_slow_call_duration_ms.max(attempt),
        ..p.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transaction_list_has_its_own_timeouts() {
        let config = Config::default();
        let list = list_policy(&config);
        assert_eq!(
            list.attempt_timeout_ms, 60_000,
            "Toss asks for at least 60 s"
        );
        assert!(list.deadline_ms >= 60_000 * u64::from(config.card_api_policy.max_attempts));
        assert_eq!(
            config.card_api_policy.attempt_timeout_ms, 10_000,
            "the confirm keeps its own"
        );
    }
}
