//! paygate-sandbox: simulators that stand in for the card company (Toss
//! Payments v1 shape) and the internal ledger, with seeded fault profiles.
//!
//! Use it in tests, in `paygate demo`, in `paygate sim` (the simulators as
//! HTTP servers) and in `paygate serve` when no downstream URL is configured.
//! The simulators keep their own record of every approval they gave, so a
//! test or the demo can compare paygate's state against the card company's
//! truth: that comparison is how lost approvals and double charges are found.
//!
//! The card simulator behaves like Toss Payments: a second confirm of an
//! approved order under a new idempotency key is refused (400
//! `ALREADY_PROCESSED_PAYMENT`), and counted in `CardStats::duplicate_confirms`.
//! [`FaultProfile::approve_duplicate_confirms`] restores the permissive
//! simulator, which approves it again, so that counting approvals per order
//! measures paygate's protection against double charges, not the card
//! company's.

pub mod card;
pub mod discord;
pub mod faults;
pub mod ledger;
pub mod webhooks;
mod wire;

use std::{net::SocketAddr, sync::Arc};

pub use card::{generated_approvals, Approval, CardSim, CardStats, SeedApproval};
pub use discord::{DiscordSim, DiscordStats};
pub use faults::{FaultProfile, OutageWindow};
pub use webhooks::{WebhookSender, WebhookStats};

/// The card secret key the in-process sandbox (and `paygate sim`) accepts by
/// default.
pub const SANDBOX_CARD_SECRET: &str = "test_sk_paygate_sandbox";
pub use ledger::{LedgerSim, LedgerStats};
use tokio::{net::TcpListener, task::JoinHandle};

/// Which simulator saw a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimTarget {
    /// The card API simulator.
    Card,
    /// The ledger simulator.
    Ledger,
}

/// A state-changing call as it arrived at a simulator, before it is handled.
#[derive(Clone, Debug)]
pub struct ObservedCall {
    /// Which simulator.
    pub target: SimTarget,
    /// `confirm`, `cancel` or `record`.
    pub operation: &'static str,
    /// The `Idempotency-Key` header (paygate sends the `payment_id`).
    pub idempotency_key: Option<String>,
}

/// Called by a simulator when a state-changing call arrives, before it is
/// handled; tests use it to check what paygate had written by then.
#[async_trait::async_trait]
pub trait CallObserver: Send + Sync + 'static {
    /// Sees one call.
    async fn on_call(&self, call: ObservedCall);
}

/// Serves the Discord simulator on `listener`; returns its webhook URL and
/// the server task.
///
/// # Errors
/// I/O errors reading the listener's address.
pub fn serve_discord(
    sim: Arc<DiscordSim>,
    listener: TcpListener,
) -> std::io::Result<(String, JoinHandle<()>)> {
    let url = format!(
        "{}/api/webhooks/1000/sandbox-token",
        url_of(listener.local_addr()?)
    );
    Ok((url, spawn_server(listener, discord::router(sim))))
}

/// The observer a simulator may have, shared by the card and ledger simulators.
#[derive(Default)]
pub(crate) struct ObserverSlot(std::sync::Mutex<Option<Arc<dyn CallObserver>>>);

impl ObserverSlot {
    pub(crate) fn set(&self, observer: Arc<dyn CallObserver>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    /// Tells the observer, if any, of a call, and waits for it.
    pub(crate) async fn notify(
        &self,
        target: SimTarget,
        operation: &'static str,
        idempotency_key: Option<String>,
    ) {
        let observer = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(o) = observer {
            o.on_call(ObservedCall {
                target,
                operation,
                idempotency_key,
            })
            .await;
        }
    }
}

/// Both simulators serving HTTP on loopback ports, as one handle.
pub struct SandboxServers {
    /// The card API simulator.
    pub card: Arc<CardSim>,
    /// The ledger simulator.
    pub ledger: Arc<LedgerSim>,
    /// Base URL of the card API simulator (`http://127.0.0.1:<port>`).
    pub card_url: String,
    /// Base URL of the ledger simulator.
    pub ledger_url: String,
    tasks: Vec<JoinHandle<()>>,
}

impl SandboxServers {
    /// Starts both simulators with `profile` on ports chosen by the OS.
    /// `card_secret_key` is the key the card simulator accepts in Basic auth.
    ///
    /// # Errors
    /// I/O errors binding the listeners.
    pub async fn start(profile: FaultProfile, card_secret_key: &str) -> std::io::Result<Self> {
        let card = Arc::new(CardSim::new(profile.clone(), card_secret_key));
        let ledger = Arc::new(LedgerSim::new(profile));
        let card_listener = TcpListener::bind("127.0.0.1:0").await?;
        let ledger_listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(card, ledger, card_listener, ledger_listener).await
    }

    /// Starts the given simulators on the given listeners.
    ///
    /// # Errors
    /// I/O errors reading the listeners' addresses.
    pub async fn start_on(
        card: Arc<CardSim>,
        ledger: Arc<LedgerSim>,
        card_listener: TcpListener,
        ledger_listener: TcpListener,
    ) -> std::io::Result<Self> {
        let card_url = url_of(card_listener.local_addr()?);
        let ledger_url = url_of(ledger_listener.local_addr()?);
        let tasks = vec![
            spawn_server(card_listener, card::router(card.clone())),
            spawn_server(ledger_listener, ledger::router(ledger.clone())),
        ];
        Ok(Self {
            card,
            ledger,
            card_url,
            ledger_url,
            tasks,
        })
    }
}

impl Drop for SandboxServers {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

fn url_of(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

fn spawn_server(listener: TcpListener, router: axum::Router) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "sandbox server stopped");
        }
    })
}

/// A JSON error answer in the Toss Payments v1 shape `{code, message}`.
pub(crate) fn error_response(status: u16, code: &str, message: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = axum::http::StatusCode::from_u16(status)
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(paygate_card_api::ErrorBody {
            code: code.to_owned(),
            message: message.to_owned(),
        }),
    )
        .into_response()
}
