//! paygate-console: the operator console, `paygate console`.
//!
//! An operator paged on Discord follows the alert's link to the payment's
//! page: its state, amounts, cancels and hold, and one timeline of every
//! event, SQL log row (request and response, scrubbed as the log stores
//! them), alert, decision and console action, in order. From there the
//! buttons the payment's state and the operator's role allow — recheck at
//! the card company, resolve as approved or not charged, cancel, resend an
//! alert — run the same code as the CLI (`paygate payments recheck|resolve`,
//! the merchant cancel, `paygate alerts resend`), guarded on the version the
//! page showed where the code takes one.
//!
//! The console is its own listener (`console_listen`, loopback by default;
//! never the merchant port) serving HTML rendered in this binary, with
//! plain forms and no script. Operators log in with a name and an argon2id
//! password ([`operators`]); sessions, CSRF tokens ([`sessions`]) and a
//! per-name and per-address login rate limit guard every form; every
//! action, refusal and failed login is written to the append-only
//! [`audit`].
//!
//! Several consoles may run on one database: sessions and the audit are in
//! the database; only the login rate limit is per process.

pub mod audit;
pub mod operators;
pub mod pages;
mod routes;
pub mod sessions;
mod views;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use paygate_core::Config;
use paygate_payments::Components;
use paygate_state_store::StoreError;
use tokio::net::TcpListener;

/// Why a console operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The input is not acceptable (a name, a role, a short password).
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Something that should not fail did (hashing, a task).
    #[error("internal: {0}")]
    Internal(String),
    /// The listener failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The console's settings, read from the configuration.
#[derive(Clone, Debug)]
pub struct ConsoleSettings {
    /// The operators' time zone (`time_zone`).
    pub zone: chrono_tz::Tz,
    /// How long a login lasts, ms.
    pub session_ttl_ms: u64,
    /// Mark the session cookie `Secure` (the public URL is `https`).
    pub secure_cookie: bool,
    /// Login attempts per minute per operator name; per client address,
    /// four times as many (behind a proxy every login comes from its
    /// address).
    pub login_attempts_per_minute: u32,
    /// A `PENDING` payment unchanged this long is a problem.
    pub stale_pending: Duration,
    /// Ledger failures in the batch before "ledger save failed" is raised
    /// (the CLI's `--alert-threshold` default).
    pub ledger_alert_threshold: i64,
}

impl ConsoleSettings {
    /// From `config`: `time_zone`, `console_session_ttl_ms`,
    /// `console_public_url`, `console_login_attempts_per_minute`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            zone: config.time_zone.parse().unwrap_or(chrono_tz::UTC),
            session_ttl_ms: config.console_session_ttl_ms,
            secure_cookie: config
                .console_public_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://")),
            login_attempts_per_minute: config.console_login_attempts_per_minute.max(1),
            stale_pending: Duration::from_secs(600),
            ledger_alert_threshold: 5,
        }
    }
}

/// The built console, ready to serve.
pub struct Console {
    listener: TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    state: Shared,
}

impl Console {
    /// Builds the console on `listener` over `components` (the same stores,
    /// saga and alerter as the CLI's operator commands).
    ///
    /// # Errors
    /// [`ConsoleError::Io`] when the listener's address cannot be read.
    pub fn build(
        listener: TcpListener,
        settings: ConsoleSettings,
        components: Components,
    ) -> Result<Self, ConsoleError> {
        let addr = listener.local_addr()?;
        let state: Shared = Arc::new(routes::State::new(settings, components));
        let router = routes::router(state.clone());
        Ok(Self {
            listener,
            addr,
            router,
            state,
        })
    }

    /// The address the console listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then lets requests in flight
    /// finish.
    ///
    /// # Errors
    /// I/O errors of the server.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let sweeper = tokio::spawn(routes::sweep_limiters(Arc::downgrade(&self.state)));
        drop(self.state);
        let served = axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        sweeper.abort();
        served
    }
}

/// The shared state behind every handler.
pub(crate) type Shared = Arc<routes::State>;
