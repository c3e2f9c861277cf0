//! The [`Saga`]: one value holding everything a payment's life touches (the
//! state store, the SQL log, the card API and the ledger behind their
//! resilience stacks, the alerter) and the tunables of the saga.
//!
//! Use it as `Arc<Saga>`: the confirm path, the async ledger retries, the
//! batch's [`crate::Settler`] and the reconciliation all act through it, so
//! every downstream call they make is logged first (I3) and goes through
//! the same breaker, bulkhead and retry budget (I5). Its methods live in the
//! modules named after what they do (`confirm`, `lookup`, `ledger`, ...).

use std::{sync::Arc, time::Duration};

use paygate_alert::{Alert, AlertReason, Alerter};
use paygate_api_log::{ApiLog, Journal};
use paygate_card_api::CardApi;
use paygate_core::PaymentRecord;
use paygate_ledger_api::LedgerApi;
use paygate_resilience::Downstream;
use paygate_state_store::StateStore;

use crate::ledger::RetryTracker;

/// Tunables of the saga. Durations are wall-clock (tokio time).
#[derive(Clone, Debug)]
pub struct SagaSettings {
    /// Currency of every payment (`KRW`).
    pub currency: String,
    /// Lookups by orderId after a lost answer.
    pub lookup_attempts: u32,
    /// Delay before the second lookup (grows linearly).
    pub lookup_delay: Duration,
    /// Async ledger retries after the synchronous try.
    pub ledger_retry_max_attempts: u32,
    /// First async ledger retry delay (doubles, full jitter).
    pub ledger_retry_base_delay: Duration,
    /// Cap on one ledger retry delay.
    pub ledger_retry_max_delay: Duration,
    /// Async ledger retries in progress at most; past it the batch saves.
    pub ledger_retry_max_pending: usize,
    /// A merchant's retry of a `PENDING` payment that no live confirm in
    /// this process owns, and whose last transition is at least this old,
    /// settles it on the spot (by the log, or by lookup) instead of
    /// answering 409 until the batch runs. A confirm on another replica is
    /// invisible here, so this must exceed the card stack's deadline (a
    /// lookup before it may miss a confirm still at the card company)
    /// plus the clock skew between replicas; the wiring sets it to
    /// [`in_flight_window`] of the card policy. Operators' resolves wait
    /// as long.
    pub settle_on_access_after: Duration,
    /// How long the card company accepts a confirm after the customer
    /// authenticated (Toss: 10 minutes), counted from the record's
    /// `created_at`: inside it a payment the card company has no record of
    /// is confirmed again under its Idempotency-Key; after it (and
    /// `settle_on_access_after`) it is settled as not charged when the
    /// transaction list agrees (see [`crate::expiry`]).
    pub card_confirm_window: Duration,
}

impl Default for SagaSettings {
    fn default() -> Self {
        Self {
            currency: "KRW".to_owned(),
            lookup_attempts: 3,
            lookup_delay: Duration::from_millis(100),
            ledger_retry_max_attempts: 5,
            ledger_retry_base_delay: Duration::from_millis(200),
            ledger_retry_max_delay: Duration::from_secs(10),
            ledger_retry_max_pending: 10_000,
            settle_on_access_after: in_flight_window(
                paygate_core::config::DownstreamPolicy::card_api().deadline_ms,
            ),
            card_confirm_window: Duration::from_secs(600),
        }
    }
}

/// How far two processes' clocks may disagree: each within ±3 s of true
/// time (NTP keeps machines far closer), so two of them within 6 s. The
/// settle-on-access age ([`in_flight_window`]) is widened by it, as one
/// replica measures it against a stamp another wrote, and so is the
/// reconciliation's stale pass; the batch's grace (120 s by default) and
/// the reconciliation's `min_age` are far above it.
pub const CLOCK_SKEW_MARGIN: Duration = Duration::from_secs(6);

/// How long after a record's last change a confirm of it may still be at
/// the card company: the card stack's whole deadline (`deadline_ms`,
/// retries included) plus [`CLOCK_SKEW_MARGIN`].
pub fn in_flight_window(card_deadline_ms: u64) -> Duration {
    Duration::from_millis(card_deadline_ms) + CLOCK_SKEW_MARGIN
}

/// The saga and everything it calls. Shared as `Arc<Saga>`.
pub struct Saga {
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) log: Arc<dyn ApiLog>,
    pub(crate) card: Arc<dyn CardApi>,
    pub(crate) ledger: Arc<dyn LedgerApi>,
    pub(crate) card_stack: Arc<Downstream>,
    pub(crate) list_stack: Arc<Downstream>,
    pub(crate) ledger_stack: Arc<Downstream>,
    pub(crate) alerter: Arc<dyn Alerter>,
    pub(crate) settings: SagaSettings,
    pub(crate) retries: RetryTracker,
    pub(crate) live: LiveConfirms,
    pub(crate) inventory: Option<Arc<dyn paygate_state_store::InventoryStore>>,
    /// Commits log rows with state changes when both live in one SQL
    /// database (see [`paygate_api_log::journal`]); `None`: separate writes.
    pub(crate) journal: Option<Arc<dyn Journal>>,
    /// This process's clock: ages it measures (settle-on-access, a hold's
    /// expiry as this process asks it) and the stamps of its own copies.
    pub(crate) clock: paygate_core::Clock,
}

/// The payments whose confirm is running in this process right now. A
/// merchant's retry of one of them is answered 409; any other `PENDING`
/// payment may be settled on access (see [`SagaSettings::settle_on_access_after`]).
#[derive(Debug, Default, Clone)]
pub(crate) struct LiveConfirms(Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

/// Ownership of one live confirm; dropping it (the confirm ended, or its
/// task was dropped) gives the payment up.
#[derive(Debug)]
pub(crate) struct LiveConfirm {
    set: LiveConfirms,
    payment_id: String,
}

impl LiveConfirms {
    /// Takes ownership of `payment_id`; `None` when a live confirm has it.
    pub(crate) fn claim(&self, payment_id: &paygate_core::PaymentId) -> Option<LiveConfirm> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(payment_id.to_string()).then(|| LiveConfirm {
            set: self.clone(),
            payment_id: payment_id.to_string(),
        })
    }
}

impl Drop for LiveConfirm {
    fn drop(&mut self) {
        let mut set = self.set.0.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.payment_id);
    }
}

/// The downstreams a [`Saga`] calls, each with its resilience stack.
pub struct Downstreams {
    /// The card company (Toss Payments v1 shape).
    pub card: Arc<dyn CardApi>,
    /// The card API's stack: breaker, bulkhead, rate limit, retry budget.
    pub card_stack: Arc<Downstream>,
    /// The stack of the card company's transaction list (Toss asks clients
    /// to allow at least 60 s per page, far beyond a confirm's timeouts).
    pub list_stack: Arc<Downstream>,
    /// The internal ledger.
    pub ledger: Arc<dyn LedgerApi>,
    /// The ledger's stack.
    pub ledger_stack: Arc<Downstream>,
}

impl Saga {
    /// A saga over the state store, the SQL log, the downstreams and the
    /// alerter.
    pub fn new(
        store: Arc<dyn StateStore>,
        log: Arc<dyn ApiLog>,
        downstreams: Downstreams,
        alerter: Arc<dyn Alerter>,
        settings: SagaSettings,
    ) -> Self {
        Self {
            store,
            log,
            card: downstreams.card,
            ledger: downstreams.ledger,
            card_stack: downstreams.card_stack,
            list_stack: downstreams.list_stack,
            ledger_stack: downstreams.ledger_stack,
            alerter,
            settings,
            retries: RetryTracker::default(),
            live: LiveConfirms::default(),
            inventory: None,
            journal: None,
            clock: paygate_core::Clock::system(),
        }
    }

    /// The saga on `clock` instead of the process clock (the simulation
    /// gives each replica a skewed one).
    #[must_use]
    pub fn with_clock(mut self, clock: paygate_core::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The card company's `approvedAt`, or now when an approval carried none.
    pub(crate) fn approved_at_of(&self, p: &paygate_card_api::CardPayment) -> String {
        p.approved_at
            .clone()
            .unwrap_or_else(|| paygate_core::time::rfc3339_from_ms(self.clock.now_ms()))
    }

    /// This process's clock, for the jobs that run over this saga.
    pub fn clock(&self) -> &paygate_core::Clock {
        &self.clock
    }

    /// The saga with a [`Journal`]: only when `journal` writes to the
    /// database of both the state store and the log. A confirm then takes
    /// three commits when approved and saved (see [`paygate_api_log::journal`]).
    #[must_use]
    pub fn with_journal(mut self, journal: Arc<dyn Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// The async ledger retries in progress.
    pub fn retries(&self) -> &RetryTracker {
        &self.retries
    }

    /// The request/response log.
    pub fn log(&self) -> &Arc<dyn ApiLog> {
        &self.log
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// The card API's resilience stack.
    pub fn card_stack(&self) -> &Arc<Downstream> {
        &self.card_stack
    }

    /// The transaction list's resilience stack.
    pub fn list_stack(&self) -> &Arc<Downstream> {
        &self.list_stack
    }

    /// The ledger's resilience stack.
    pub fn ledger_stack(&self) -> &Arc<Downstream> {
        &self.ledger_stack
    }

    /// Raises an alert as it is (the reconciliation's alerts about
    /// approvals paygate holds no record of); `true` when it is new.
    pub async fn raise_alert(&self, alert: Alert) -> bool {
        self.alerter.raise(alert).await
    }

    /// Raises an alert about a payment; `true` when it is new.
    pub async fn alert(&self, record: &PaymentRecord, reason: AlertReason, detail: String) -> bool {
        self.alerter
            .raise(Alert {
                reason,
                payment_id: record.payment_id.to_string(),
                merchant_id: record.merchant_id.to_string(),
                order_id: record.order_id.to_string(),
                amount: record.amount,
                detail,
            })
            .await
    }
}
