//! paygate-gateway: the merchant API (axum) and the confirm saga.
//!
//! [`Application::build`] takes a bound listener and a [`Config`] and wires
//! everything: the SQL database (migrated), the state store, the card API and
//! ledger clients (or the in-process sandbox when their URLs are unset), the
//! saga and the routes. Tests bind port 0 and build the real thing; `paygate
//! serve` does the same with the configured address.

pub mod auth;
pub mod openapi;
pub mod problem;
pub mod routes;
pub mod saga;
pub mod telemetry;

use std::{future::Future, net::SocketAddr, num::NonZeroU32, sync::Arc, time::Duration};

use axum::{
    extract::DefaultBodyLimit,
    routing::{get, post},
    Router,
};
use paygate_api_log::SqlApiLog;
use paygate_card_api::{CardApi, TossCardApi};
use paygate_core::{
    config::{ConfigError, StateStoreKind},
    Config, Secret,
};
use paygate_ledger_api::{HttpLedgerApi, LedgerApi};
use paygate_resilience::Downstream;
use paygate_sandbox::{FaultProfile, SandboxServers};
use paygate_state_store::{SqlDatabase, SqlMerchantStore, SqlStateStore, StateStore, StoreError};
use tokio::net::TcpListener;

pub use paygate_alert::{Alert, AlertReason, Alerter, OutboxAlerter};
pub use saga::{Saga, SagaSettings};

pub use paygate_core::config;

/// Largest accepted request body, bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// The card secret key the in-process sandbox accepts.
pub const SANDBOX_CARD_SECRET: &str = "test_sk_paygate_sandbox";

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A configuration value is invalid (names the key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The SQL database could not be opened or migrated.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The in-process sandbox could not bind its ports.
    #[error("sandbox: {0}")]
    Sandbox(std::io::Error),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Http(String),
    /// A configured feature is not available in this build.
    #[error("not supported yet: {0}")]
    Unsupported(&'static str),
    /// The listener's address could not be read.
    #[error("listener: {0}")]
    Listener(std::io::Error),
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    saga: Arc<Saga>,
    merchants: SqlMerchantStore,
    api_key_hash_key: Secret<String>,
    db: SqlDatabase,
    merchant_limiter: Option<Arc<governor::DefaultKeyedRateLimiter<String>>>,
    /// Set when shutdown begins: `/readyz` then answers 503 so the load
    /// balancer stops sending new requests.
    shutting_down: Arc<std::sync::atomic::AtomicBool>,
}

/// Protection of the merchant API on the way in.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// Requests handled at once; more are shed with 503.
    pub max_concurrent: usize,
    /// Time before a request is answered 503 (a confirm carries on).
    pub request_timeout: Duration,
}

/// Everything but the HTTP server: the SQL database (migrated when
/// configured), the state store, the saga with its downstream stacks, the
/// alerter, and the in-process sandbox when no downstream URL is set. The
/// batch and the reconciliation build these too.
pub struct Components {
    /// The SQL database (log, merchants, outbox, leases; state with `sql`).
    pub db: SqlDatabase,
    /// The state store.
    pub store: Arc<dyn StateStore>,
    /// The saga and its downstream stacks.
    pub saga: Arc<Saga>,
    /// The alerter.
    pub alerter: Arc<OutboxAlerter>,
    /// The in-process sandbox, when one runs.
    pub sandbox: Option<SandboxServers>,
}

impl Components {
    /// Builds the components from `config`.
    ///
    /// # Errors
    /// [`StartupError`].
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        config.validate()?;
        let db = SqlDatabase::connect(
            config.database_url.expose(),
            config.database_max_connections,
        )
        .await?;
        if config.migrate_on_start {
            db.migrate().await?;
        }
        let store: Arc<dyn StateStore> = match config.state_store {
            StateStoreKind::Sql => Arc::new(SqlStateStore::new(db.clone())),
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
                Arc::new(store)
            }
        };
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| StartupError::Http(e.to_string()))?;

        let sandbox = if config.card_sandbox() || config.ledger_sandbox() {
            let profile = FaultProfile::preset(&config.sandbox_faults).ok_or(ConfigError {
                key: "sandbox_faults".to_owned(),
                reason: format!("unknown preset; one of {:?}", FaultProfile::PRESETS),
            })?;
            let servers = SandboxServers::start(profile, SANDBOX_CARD_SECRET)
                .await
                .map_err(StartupError::Sandbox)?;
            tracing::warn!(
                card = config.card_sandbox(),
                ledger = config.ledger_sandbox(),
                faults = %config.sandbox_faults,
                "SANDBOX MODE: no card/ledger URL configured, the sandbox simulators run in-process; no real money moves"
            );
            Some(servers)
        } else {
            None
        };
        let card: Arc<dyn CardApi> = {
            let (url, key) = match (&config.card_api_url, &sandbox) {
                (Some(url), _) => (
                    url.clone(),
                    config.card_api_secret_key.clone().unwrap_or_default(),
                ),
                (None, Some(s)) => (
                    s.card_url.clone(),
                    Secret::new(SANDBOX_CARD_SECRET.to_owned()),
                ),
                (None, None) => {
                    return Err(StartupError::Unsupported("card API without URL or sandbox"))
                }
            };
            Arc::new(TossCardApi::new(
                http.clone(),
                &url,
                key,
                Duration::from_millis(config.card_api_policy.attempt_timeout_ms),
            ))
        };
        let ledger: Arc<dyn LedgerApi> = {
            let url = match (&config.ledger_api_url, &sandbox) {
                (Some(url), _) => url.clone(),
                (None, Some(s)) => s.ledger_url.clone(),
                (None, None) => {
                    return Err(StartupError::Unsupported(
                        "ledger API without URL or sandbox",
                    ))
                }
            };
            Arc::new(HttpLedgerApi::new(
                http.clone(),
                &url,
                Duration::from_millis(config.ledger_api_policy.attempt_timeout_ms),
            ))
        };
        let discord = config
            .discord_webhook_url
            .as_ref()
            .map(|url| paygate_alert::DiscordClient::new(http.clone(), url.clone(), 5));
        if discord.is_none() {
            tracing::warn!("no Discord webhook configured (PAYGATE_DISCORD_WEBHOOK_URL): alerts are logged and kept in the outbox");
        }
        let alerter = OutboxAlerter::new(paygate_alert::SqlOutbox::new(db.clone()), discord);
        let settings = SagaSettings {
            currency: config.currency.clone(),
            lookup_attempts: config.card_api_lookup_attempts,
            ledger_retry_max_attempts: config.ledger_retry_max_attempts,
            ledger_retry_base_delay: Duration::from_millis(config.ledger_retry_base_delay_ms),
            ledger_retry_max_delay: Duration::from_millis(config.ledger_retry_max_delay_ms),
            ..SagaSettings::default()
        };
        let saga = Arc::new(Saga::new(
            store.clone(),
            SqlApiLog::new(db.clone()),
            card,
            ledger,
            Arc::new(Downstream::new("card_api", &config.card_api_policy)),
            Arc::new(Downstream::new("ledger_api", &config.ledger_api_policy)),
            alerter.clone(),
            settings,
        ));
        Ok(Self {
            db,
            store,
            saga,
            alerter,
            sandbox,
        })
    }
}

/// The built gateway, ready to serve.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    shutting_down: Arc<std::sync::atomic::AtomicBool>,
    shutdown_timeout: Duration,
    router: Router,
    saga: Arc<Saga>,
    db: SqlDatabase,
    alerter: Arc<OutboxAlerter>,
    sandbox: Option<SandboxServers>,
}

impl Application {
    /// Builds the application on `listener` from `config`.
    ///
    /// # Errors
    /// [`StartupError`] when the config is invalid, the database cannot be
    /// opened or migrated, or the sandbox cannot start.
    pub async fn build(listener: TcpListener, config: &Config) -> Result<Self, StartupError> {
        let addr = listener.local_addr().map_err(StartupError::Listener)?;
        // The recorder goes in before anything records.
        telemetry::prometheus();
        telemetry::register_families();
        let Components {
            db,
            saga,
            alerter,
            sandbox,
            ..
        } = Components::build(config).await?;
        let state = AppState {
            saga: saga.clone(),
            merchants: SqlMerchantStore::new(db.clone()),
            api_key_hash_key: config.api_key_hash_key.clone(),
            db: db.clone(),
            shutting_down: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            merchant_limiter: NonZeroU32::new(config.inbound_rate_limit_per_second).map(|rate| {
                let burst = NonZeroU32::new(config.inbound_rate_limit_burst).unwrap_or(rate);
                Arc::new(governor::RateLimiter::keyed(
                    governor::Quota::per_second(rate).allow_burst(burst),
                ))
            }),
        };
        let inbound = Inbound {
            max_concurrent: config.inbound_max_concurrent as usize,
            request_timeout: Duration::from_millis(config.inbound_request_timeout_ms),
        };
        let shutting_down = state.shutting_down.clone();
        Ok(Self {
            listener,
            addr,
            shutting_down,
            shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
            router: router(state, &inbound),
            saga,
            db,
            alerter,
            sandbox,
        })
    }

    /// The address the merchant API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The saga (for waiting on async ledger retries).
    pub fn saga(&self) -> Arc<Saga> {
        self.saga.clone()
    }

    /// The SQL database.
    pub fn database(&self) -> SqlDatabase {
        self.db.clone()
    }

    /// The alerter (its outbox holds every alert raised).
    pub fn alerter(&self) -> Arc<OutboxAlerter> {
        self.alerter.clone()
    }

    /// The in-process sandbox, when one runs.
    pub fn sandbox(&self) -> Option<&SandboxServers> {
        self.sandbox.as_ref()
    }

    /// Serves until `shutdown` completes; then `/readyz` turns 503, the
    /// listener closes, and in-flight requests get up to
    /// `shutdown_timeout_ms` to finish (a confirm runs in its own task, so it
    /// is not cut between the card approval and the writes that record it).
    /// Async ledger retries still running are not waited for: their payments
    /// are already stored paid-and-unsaved, which is what the batch sweep
    /// picks up, so nothing is left only in memory.
    ///
    /// # Errors
    /// I/O errors of the server.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let _sandbox = self.sandbox;
        // The alert sender delivers the outbox in the background and stops
        // after the server has drained.
        let (stop_sender, sender_stopped) = tokio::sync::oneshot::channel::<()>();
        let sender = tokio::spawn(
            self.alerter
                .clone()
                .run_sender(Duration::from_secs(5), async {
                    let _ = sender_stopped.await;
                }),
        );
        let (begun_tx, begun_rx) = tokio::sync::oneshot::channel::<()>();
        let shutting_down = self.shutting_down.clone();
        let signal = async move {
            shutdown.await;
            shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::info!("shutdown: no new connections; draining in-flight requests");
            let _ = begun_tx.send(());
        };
        let server = axum::serve(self.listener, self.router).with_graceful_shutdown(signal);
        let deadline = self.shutdown_timeout;
        let drained = async move {
            // Pending forever when the server ends without a shutdown signal.
            if begun_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(deadline).await;
        };
        let served = tokio::select! {
            served = server => served,
            () = drained => {
                tracing::warn!(deadline_ms = deadline.as_millis() as u64,
                    "shutdown deadline reached with requests still in flight; their payments are left for the batch");
                Ok(())
            }
        };
        let retries = self.saga.retries().pending();
        if retries > 0 {
            tracing::info!(
                pending = retries,
                "async ledger retries not finished; their payments are stored paid-unsaved for the batch"
            );
        }
        let _ = stop_sender.send(());
        let _ = sender.await;
        served
    }
}

/// Maps the inbound stack's refusals to problem answers: load shed and
/// request timeout are 503 with `Retry-After`.
async fn inbound_error(e: tower::BoxError) -> axum::response::Response {
    use axum::response::IntoResponse;
    if e.is::<tower::load_shed::error::Overloaded>() {
        metrics::counter!("paygate_inbound_shed_total").increment(1);
        return problem::Problem::unavailable("too many requests in flight; retry shortly")
            .into_response();
    }
    if e.is::<tower::timeout::error::Elapsed>() {
        return problem::Problem::unavailable(
            "the request took too long; a confirm carries on: poll GET /v1/payments/orders/{orderId}",
        )
        .into_response();
    }
    tracing::error!(error = %e, "inbound stack error");
    problem::Problem::unavailable("internal error").into_response()
}

/// Every route: (method, path, handler). The router is built from this table,
/// and the OpenAPI test checks the document against it.
pub fn routes_table() -> Vec<(
    &'static str,
    &'static str,
    axum::routing::MethodRouter<AppState>,
)> {
    vec![
        ("POST", "/v1/payments/confirm", post(routes::confirm)),
        (
            "GET",
            "/v1/payments/orders/{order_id}",
            get(routes::get_by_order),
        ),
        ("GET", "/v1/payments/{payment_id}", get(routes::get_payment)),
        ("GET", "/healthz", get(routes::healthz)),
        ("GET", "/readyz", get(routes::readyz)),
        ("GET", "/metrics", get(routes::metrics)),
        ("GET", "/openapi.json", get(routes::openapi_json)),
    ]
}

/// The merchant API routes over `state`, behind the inbound protections.
pub fn router(state: AppState, inbound: &Inbound) -> Router {
    let protect = tower::ServiceBuilder::new()
        .layer(axum::error_handling::HandleErrorLayer::new(inbound_error))
        .layer(tower::load_shed::LoadShedLayer::new())
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            inbound.max_concurrent,
        ))
        .layer(tower::timeout::TimeoutLayer::new(inbound.request_timeout));
    routes_table()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .fallback(routes::fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(protect)
        .layer(axum::middleware::from_fn(telemetry::request_context))
        .with_state(state)
}
