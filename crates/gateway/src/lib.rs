//! paygate-gateway: the merchant API over HTTP (axum): routes, auth,
//! problem+json, OpenAPI, telemetry. The money logic lives in
//! `paygate-payments`; this crate only adapts it to HTTP.
//!
//! [`Application::build`] takes a bound listener and a [`Config`] and wires
//! everything: the components of `paygate-payments` (stores, clients, the
//! saga), the in-process sandbox when no card or ledger URL is set, and the
//! routes. Tests bind port 0 and build the real thing; `paygate
//! serve` does the same with the configured address.

pub mod auth;
pub mod cancel;
pub mod card_webhooks;
pub mod holds;
pub mod merchant_slots;
pub mod merchant_webhooks;
pub mod openapi;
pub mod problem;
pub mod replica;
pub mod routes;
pub mod server;
pub mod telemetry;

use std::{future::Future, net::SocketAddr, num::NonZeroU32, sync::Arc, time::Duration};

use axum::{
    extract::DefaultBodyLimit,
    routing::{delete, get, post, put},
    Router,
};
use paygate_core::{config::ConfigError, Config, Secret};
use paygate_payments::{Components, SandboxUrls, WiringError};
use paygate_sandbox::{FaultProfile, SandboxServers};
use paygate_state_store::{SqlDatabase, SqlMerchantStore, StoreError};
use tokio::net::TcpListener;

pub use paygate_alert::{Alert, AlertReason, Alerter, OutboxAlerter};
pub use paygate_payments::{Saga, SagaSettings};
pub use paygate_sandbox::SANDBOX_CARD_SECRET;

pub use paygate_core::config;

/// Largest accepted request body, bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

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
    /// The stores, clients or saga could not be built.
    #[error(transparent)]
    Wiring(#[from] WiringError),
    /// The listener's address could not be read.
    #[error("listener: {0}")]
    Listener(std::io::Error),
}

/// After the shutdown deadline, how long handlers get to write the answers
/// they owe (a confirm answers 202 with its paymentId or 503 when nothing
/// was charged, see [`routes::confirm`]) before the server is dropped.
pub const ANSWER_GRACE: Duration = Duration::from_millis(500);

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    saga: Arc<Saga>,
    merchants: SqlMerchantStore,
    /// Merchant lookups by key hash, kept `merchant_cache_ttl_ms` (`None`:
    /// every request asks the database).
    merchant_cache: Option<auth::MerchantCache>,
    api_key_hash_key: Secret<String>,
    db: SqlDatabase,
    merchant_limiter: Option<Arc<governor::DefaultKeyedRateLimiter<String>>>,
    /// Requests in flight per merchant (`inbound_max_concurrent_per_merchant`).
    merchant_slots: Arc<merchant_slots::MerchantSlots>,
    /// Set when shutdown begins: `/readyz` then answers 503 so the load
    /// balancer stops sending new requests.
    shutting_down: Arc<std::sync::atomic::AtomicBool>,
    /// Largest amount a confirm may carry (`max_amount`).
    max_amount: i64,
    /// A hold's time when its request names none, s (`hold_default_ttl_seconds`).
    hold_default_ttl_s: u64,
    /// Longest hold time a request may ask, s (`hold_max_ttl_seconds`).
    hold_max_ttl_s: u64,
    /// Time a confirm has, from the moment its request arrived, to answer.
    confirm_answer_within: Duration,
    /// Turns `true` at the shutdown deadline: a confirm still waiting for
    /// its saga answers at once (202 or a true 503).
    shutdown_deadline: tokio::sync::watch::Receiver<bool>,
    /// `card_webhook_rate_limit_per_second`, one bucket per replica.
    card_webhook_limiter: Option<Arc<governor::DefaultDirectRateLimiter>>,
    /// Wakes this replica's webhook worker when a new receipt is stored.
    card_webhook_wake: Arc<tokio::sync::Notify>,
    /// Merchant webhooks: endpoints, events, the secrets key.
    webhooks: Arc<merchant_webhooks::MerchantWebhooks>,
}

/// Protection of the merchant API on the way in.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// Merchant requests handled at once across all merchant routes (one
    /// limit); more are shed with 503.
    pub max_concurrent: usize,
    /// Time before a request is answered 503. A confirm answers by this
    /// deadline itself, with 202 once its card call may be in flight.
    pub request_timeout: Duration,
}

/// How a route is protected on the way in (see [`router`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// A merchant route: the global concurrency limit and the request
    /// timeout (503 on either).
    Merchant,
    /// The confirm: the global concurrency limit, and no timeout layer: the
    /// handler bounds its own time and answers 202 once the card may be
    /// called, which a timeout layer (503) could not know.
    OwnDeadline,
    /// The card company's webhooks: the global concurrency limit and the
    /// request timeout, no merchant (the route has its own rate limit).
    CardCompany,
    /// Probes, metrics and the OpenAPI document: outside the limit, so an
    /// overloaded gateway is neither killed by its liveness probe nor blind
    /// to its metrics scraper.
    Operations,
}

/// The in-process sandbox, started when the config names no card API or
/// ledger URL (DESIGN.md §11), with the fault preset `sandbox_faults`.
///
/// # Errors
/// [`StartupError::Config`] for an unknown preset, [`StartupError::Sandbox`]
/// when its ports cannot be bound.
pub async fn start_sandbox(config: &Config) -> Result<Option<SandboxServers>, StartupError> {
    if !(config.card_sandbox() || config.ledger_sandbox()) {
        return Ok(None);
    }
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
    Ok(Some(servers))
}

/// [`Components::build`] with the in-process sandbox for the downstreams
/// the config leaves unset (see [`start_sandbox`]); the sandbox's servers
/// run as long as the returned handle lives.
///
/// # Errors
/// [`StartupError`].
pub async fn components(
    config: &Config,
) -> Result<(Components, Option<SandboxServers>), StartupError> {
    config.validate()?;
    let sandbox = start_sandbox(config).await?;
    let urls = sandbox.as_ref().map(|s| SandboxUrls {
        card_url: s.card_url.clone(),
        card_secret: Secret::new(SANDBOX_CARD_SECRET.to_owned()),
        ledger_url: s.ledger_url.clone(),
    });
    let components = Components::build(config, urls.as_ref()).await?;
    Ok((components, sandbox))
}

/// The built gateway, ready to serve.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    shutting_down: Arc<std::sync::atomic::AtomicBool>,
    shutdown_deadline: tokio::sync::watch::Sender<bool>,
    shutdown_timeout: Duration,
    conn_limits: server::ConnLimits,
    router: Router,
    card_webhook_wake: Arc<tokio::sync::Notify>,
    card_webhook_poll: Duration,
    delivery: paygate_webhooks::Delivery,
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
        let (
            Components {
                db, saga, alerter, ..
            },
            sandbox,
        ) = components(config).await?;
        let (shutdown_deadline, deadline_rx) = tokio::sync::watch::channel(false);
        let webhooks = Arc::new(
            merchant_webhooks::MerchantWebhooks::from_config(config, db.clone()).map_err(|e| {
                ConfigError {
                    key: "secrets_key".to_owned(),
                    reason: e.to_string(),
                }
            })?,
        );
        let delivery = paygate_webhooks::Delivery {
            events: webhooks.events.clone(),
            state: saga.store().clone(),
            secrets: webhooks.secrets.clone(),
            http: paygate_webhooks::worker::client(config.webhook_allow_private).map_err(|e| {
                StartupError::Listener(std::io::Error::other(format!("webhook client: {e}")))
            })?,
            retry: paygate_webhooks::RetryPolicy {
                first_wait_ms: config.webhook_retry_first_ms,
                max_attempts: config.webhook_max_attempts,
            },
            poll: Duration::from_millis(config.webhook_poll_ms),
            clock: saga.clock().clone(),
        };
        let state = AppState {
            webhooks,
            max_amount: config.max_amount,
            hold_default_ttl_s: config.hold_default_ttl_seconds,
            hold_max_ttl_s: config.hold_max_ttl_seconds,
            confirm_answer_within: Duration::from_millis(config.inbound_request_timeout_ms),
            shutdown_deadline: deadline_rx,
            saga: saga.clone(),
            merchants: SqlMerchantStore::new(db.clone()),
            merchant_cache: auth::merchant_cache(config.merchant_cache_ttl_ms),
            api_key_hash_key: config.api_key_hash_key.clone(),
            db: db.clone(),
            shutting_down: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            merchant_slots: merchant_slots::MerchantSlots::new(
                config.per_merchant_max_concurrent() as usize,
            ),
            card_webhook_limiter: NonZeroU32::new(config.card_webhook_rate_limit_per_second).map(
                |rate| {
                    Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
                        rate,
                    )))
                },
            ),
            card_webhook_wake: Arc::new(tokio::sync::Notify::new()),
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
        let card_webhook_wake = state.card_webhook_wake.clone();
        if let Some(sandbox) = &sandbox {
            // The in-process card company tells this replica of its changes.
            sandbox
                .card
                .send_webhooks_to(&format!("http://{addr}/v1/webhooks/card"), 1);
        }
        Ok(Self {
            listener,
            addr,
            shutting_down,
            shutdown_deadline,
            shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
            conn_limits: server::ConnLimits {
                header_read_timeout: Duration::from_millis(config.inbound_header_read_timeout_ms),
                idle_timeout: Duration::from_millis(config.inbound_idle_timeout_ms),
            },
            router: router(state, &inbound),
            card_webhook_wake,
            card_webhook_poll: Duration::from_millis(config.card_webhook_poll_ms),
            delivery,
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
    ///
    /// At that deadline every confirm still waiting for its saga is told to
    /// answer now (I4: 202 with its paymentId once the card may be called,
    /// 503 only when no card call was or will be made for it), and handlers
    /// get [`ANSWER_GRACE`] to write those answers before the server is
    /// dropped. The saga tasks are not cut by that answer; whatever they do
    /// not finish before the process exits is stored for the batch.
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
        // The card company's webhooks are worked until the server drained.
        let (stop_worker, worker_stopped) = tokio::sync::watch::channel(false);
        let worker = tokio::spawn(card_webhooks::run_worker(
            self.saga.clone(),
            paygate_api_log::SqlCardInbox::new(self.db.clone()),
            self.card_webhook_wake.clone(),
            self.card_webhook_poll,
            card_webhooks::LEDGER_ALERT_THRESHOLD,
            worker_stopped,
        ));
        // Merchant webhooks are delivered until the server drained.
        let (stop_delivery, delivery_stopped) = tokio::sync::watch::channel(false);
        let delivery = tokio::spawn(paygate_webhooks::worker::run(
            self.delivery,
            delivery_stopped,
        ));
        // The replica reports its breakers and bulkheads for the console.
        let (stop_report, report_stopped) = tokio::sync::watch::channel(false);
        let report = tokio::spawn(replica::run(
            self.saga.clone(),
            paygate_api_log::ReplicaStatus::new(self.db.clone()),
            replica::replica_name(self.addr),
            report_stopped,
        ));
        let (begun_tx, begun_rx) = tokio::sync::oneshot::channel::<()>();
        let shutting_down = self.shutting_down.clone();
        let signal = async move {
            shutdown.await;
            shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::info!("shutdown: no new connections; draining in-flight requests");
            let _ = begun_tx.send(());
        };
        let server = server::serve(self.listener, self.router, self.conn_limits, signal);
        tokio::pin!(server);
        let deadline = self.shutdown_timeout;
        let answer_now = self.shutdown_deadline;
        let drained = async move {
            // Pending forever when the server ends without a shutdown signal.
            if begun_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(deadline).await;
        };
        let served = tokio::select! {
            served = &mut server => served,
            () = drained => {
                tracing::warn!(deadline_ms = deadline.as_millis() as u64,
                    "shutdown deadline reached with requests still in flight: confirms answer now (202 or a true 503); their payments are left for the batch");
                let _ = answer_now.send(true);
                match tokio::time::timeout(ANSWER_GRACE, &mut server).await {
                    Ok(served) => served,
                    Err(_) => {
                        tracing::warn!(grace_ms = ANSWER_GRACE.as_millis() as u64,
                            "requests still unanswered after the grace; dropping them");
                        Ok(())
                    }
                }
            }
        };
        let retries = self.saga.retries().pending();
        if retries > 0 {
            tracing::info!(
                pending = retries,
                "async ledger retries not finished; their payments are stored paid-unsaved for the batch"
            );
        }
        let _ = stop_worker.send(true);
        let _ = worker.await;
        let _ = stop_delivery.send(true);
        let _ = delivery.await;
        let _ = stop_report.send(true);
        let _ = report.await;
        let _ = stop_sender.send(());
        let _ = sender.await;
        served
    }
}

/// Maps the inbound stack's refusals to problem answers: load shed and
/// request timeout are 503 with `Retry-After`. The timeout never applies to
/// a confirm (see [`Protection::OwnDeadline`]), so "retry" is true here.
async fn inbound_error(e: tower::BoxError) -> axum::response::Response {
    use axum::response::IntoResponse;
    if e.is::<tower::load_shed::error::Overloaded>() {
        metrics::counter!("paygate_inbound_shed_total").increment(1);
        return problem::Problem::unavailable("too many requests in flight; retry shortly")
            .into_response();
    }
    if e.is::<tower::timeout::error::Elapsed>() {
        return problem::Problem::unavailable("the request took too long; retry shortly")
            .into_response();
    }
    tracing::error!(error = %e, "inbound stack error");
    problem::Problem::unavailable("internal error").into_response()
}

/// Every route: (method, path, handler, protection). The router is built
/// from this table, and the OpenAPI test checks the document against it.
pub fn routes_table() -> Vec<(
    &'static str,
    &'static str,
    axum::routing::MethodRouter<AppState>,
    Protection,
)> {
    use Protection::{CardCompany, Merchant, Operations, OwnDeadline};
    vec![
        (
            "POST",
            "/v1/payments/confirm",
            post(routes::confirm),
            OwnDeadline,
        ),
        (
            "GET",
            "/v1/payments/orders/{order_id}",
            get(routes::get_by_order),
            Merchant,
        ),
        (
            "GET",
            "/v1/payments/{payment_id}",
            get(routes::get_payment),
            Merchant,
        ),
        (
            "POST",
            "/v1/payments/{payment_id}/cancel",
            post(cancel::cancel),
            OwnDeadline,
        ),
        (
            "PUT",
            "/v1/inventory/{sku}",
            put(holds::put_inventory),
            Merchant,
        ),
        (
            "GET",
            "/v1/inventory/{sku}",
            get(holds::get_inventory),
            Merchant,
        ),
        ("POST", "/v1/holds", post(holds::post_hold), Merchant),
        ("GET", "/v1/holds/{hold_id}", get(holds::get_hold), Merchant),
        (
            "DELETE",
            "/v1/holds/{hold_id}",
            delete(holds::delete_hold),
            Merchant,
        ),
        (
            "PUT",
            "/v1/webhook-endpoint",
            put(merchant_webhooks::put_endpoint),
            Merchant,
        ),
        (
            "GET",
            "/v1/events",
            get(merchant_webhooks::list_events),
            Merchant,
        ),
        (
            "POST",
            "/v1/webhooks/card",
            post(card_webhooks::receive)
                .layer(DefaultBodyLimit::max(card_webhooks::MAX_WEBHOOK_BYTES)),
            CardCompany,
        ),
        ("GET", "/healthz", get(routes::healthz), Operations),
        ("GET", "/readyz", get(routes::readyz), Operations),
        ("GET", "/metrics", get(routes::metrics), Operations),
        (
            "GET",
            "/openapi.json",
            get(routes::openapi_json),
            Operations,
        ),
    ]
}

/// The merchant API routes over `state`, behind the inbound protections.
///
/// `inbound.max_concurrent` is one limit shared by every merchant route: a
/// `GlobalConcurrencyLimitLayer` holds one semaphore for every service it
/// makes, where a `ConcurrencyLimitLayer` applied route by route gave each
/// route a limit of its own (N routes let N times the limit in). Operations
/// routes are outside it (see [`Protection`]). A tighter per-route limit, if
/// one is ever wanted, goes beside it on that route's `MethodRouter`.
pub fn router(state: AppState, inbound: &Inbound) -> Router {
    let limit = tower::limit::GlobalConcurrencyLimitLayer::new(inbound.max_concurrent);
    let limited = tower::ServiceBuilder::new()
        .layer(axum::error_handling::HandleErrorLayer::new(inbound_error))
        .layer(tower::load_shed::LoadShedLayer::new())
        .layer(limit);
    let timed = limited
        .clone()
        .layer(tower::timeout::TimeoutLayer::new(inbound.request_timeout));
    routes_table()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler, protection)| {
            let slot = axum::middleware::from_fn(merchant_slots::hold);
            let handler = match protection {
                Protection::Merchant => handler.layer(timed.clone()).layer(slot),
                Protection::OwnDeadline => handler.layer(limited.clone()).layer(slot),
                Protection::CardCompany => handler.layer(timed.clone()),
                Protection::Operations => handler,
            };
            r.route(path, handler)
        })
        .fallback(routes::fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(problem::ensure_problem))
        .layer(axum::middleware::from_fn(telemetry::request_context))
        .with_state(state)
}
