//! paygate-alert: operator alerts, so that every approval ends recorded or
//! in front of a human (invariant I1).
//!
//! An alert is written to the SQL outbox first ([`outbox::SqlOutbox`]), then
//! sent to Discord ([`discord::DiscordClient`], DESIGN.md §8), then marked
//! sent. A dedup key (payment id + reason) means an operator sees one alert
//! per problem however often it is raised. Unsent alerts are resent by the
//! background sender in `serve` ([`OutboxAlerter::run_sender`]) and by the
//! batch; with no webhook configured they are logged and kept in the outbox.
//!
//! A flush is bounded in time ([`OutboxAlerter::flush_within`]; [`OutboxAlerter::flush`]
//! uses [`DEFAULT_FLUSH_BUDGET`]) and reads each row at most once. A message
//! Discord refuses for good (a 4xx other than 404 and 429) is *parked*: kept
//! unsent with its error, counted in `paygate_alerts_parked_total` and the
//! `paygate_alert_outbox_parked` gauge, listed by [`SqlOutbox::list`] with
//! [`outbox::Listing::Parked`], and sent again only after
//! [`SqlOutbox::unpark`]. It no longer blocks the alerts behind it.

pub mod discord;
pub mod outbox;

use std::{sync::Arc, time::Duration};

use tokio::{sync::Notify, time::Instant};

pub use discord::{DiscordClient, DiscordError};
pub use outbox::{Listing, SqlOutbox};

/// The time budget of [`OutboxAlerter::flush`]: at Discord's usual pace
/// (about 5 messages per 2 s) some 50 alerts; the rest wait for the next flush.
pub const DEFAULT_FLUSH_BUDGET: Duration = Duration::from_secs(20);

/// Rows read from the outbox at a time.
const FLUSH_PAGE: i64 = 50;

/// Why an operator is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertReason {
    /// The card outcome could not be learned (`UNKNOWN`): check the payment.
    OutcomeUnknown,
    /// The card company's answer does not match the payment (amount, key).
    CardMismatch,
    /// The ledger refused the payment (409 or 4xx): it will not retry.
    LedgerRefused,
    /// The ledger save kept failing up to the batch threshold.
    LedgerSaveFailed,
    /// The state store failed after an approval; the record is left for the batch.
    StoreFailedAfterApproval,
    /// Reconciliation: the card company approved a different amount than
    /// paygate recorded. No automatic action.
    AmountMismatch,
    /// Reconciliation: paid in paygate, but the card company shows no
    /// approval (its list does not have it and a lookup confirms).
    PaidNotApproved,
    /// Reconciliation: an approval with no paygate record at all was
    /// canceled at the card company.
    OrphanCanceled,
    /// Reconciliation: an approval with no paygate record could not be
    /// canceled; it is still charged.
    OrphanNotCanceled,
    /// A merchant's cancel (refund) could not be settled: the card
    /// company's answer was lost and the batch's lookups did not find it.
    CancelUnknown,
    /// The ledger refused a cancel's reversal, or the batch failed to record
    /// it up to the threshold.
    ReversalFailed,
    /// Reconciliation: paygate's cancels and the card company's disagree
    /// (a cancel one side holds and the other does not).
    CancelMismatch,
    /// An approval sold a hold after its stock had gone to other buyers
    /// (recovered after the hold expired): `sold + active holds > stock`
    /// for the SKUs named (I7). The buyer was charged; decide whether to
    /// ship, back-order or refund.
    Oversold,
}

impl AlertReason {
    /// Stable name, part of the dedup key.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::OutcomeUnknown => "outcome_unknown",
            Self::CardMismatch => "card_mismatch",
            Self::LedgerRefused => "ledger_refused",
            Self::LedgerSaveFailed => "ledger_save_failed",
            Self::StoreFailedAfterApproval => "store_failed_after_approval",
            Self::AmountMismatch => "amount_mismatch",
            Self::PaidNotApproved => "paid_not_approved",
            Self::OrphanCanceled => "orphan_canceled",
            Self::OrphanNotCanceled => "orphan_not_canceled",
            Self::CancelUnknown => "cancel_unknown",
            Self::ReversalFailed => "reversal_failed",
            Self::CancelMismatch => "cancel_mismatch",
            Self::Oversold => "oversold",
        }
    }

    /// Headline for the operator.
    pub fn title(&self) -> &'static str {
        match self {
            Self::OutcomeUnknown => "Payment needs checking: card outcome unknown",
            Self::CardMismatch => "Card answer does not match the payment",
            Self::LedgerRefused => "Ledger refused an approved payment",
            Self::LedgerSaveFailed => "Ledger save failed repeatedly",
            Self::StoreFailedAfterApproval => "State store failed after an approval",
            Self::AmountMismatch => "Card company approved a different amount",
            Self::PaidNotApproved => "Paid in paygate but not approved at the card company",
            Self::OrphanCanceled => "Approval without a paygate payment was canceled",
            Self::OrphanNotCanceled => "Approval without a paygate payment could NOT be canceled",
            Self::CancelUnknown => "Cancel needs checking: card outcome unknown",
            Self::ReversalFailed => "Ledger reversal of a cancel failed",
            Self::CancelMismatch => "Cancels differ between paygate and the card company",
            Self::Oversold => "Oversold: an approval sold stock that was no longer available",
        }
    }
}

/// An alert about one payment. Holds no card data or secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// Why.
    pub reason: AlertReason,
    /// `pay_...`.
    pub payment_id: String,
    /// `mer_...`.
    pub merchant_id: String,
    /// The merchant's order id.
    pub order_id: String,
    /// Amount, minor units.
    pub amount: i64,
    /// Detail for the operator.
    pub detail: String,
}

impl Alert {
    /// `payment_id:reason`: one alert per problem.
    pub fn dedup_key(&self) -> String {
        format!("{}:{}", self.payment_id, self.reason.as_str())
    }
}

/// Where alerts go.
#[async_trait::async_trait]
pub trait Alerter: Send + Sync + 'static {
    /// Raises one alert; `true` when it is new (not a repeat of the same
    /// payment and reason). Never fails the caller's flow: a failure to record
    /// it is logged at `ERROR` with the whole alert, so it still reaches logs.
    async fn raise(&self, alert: Alert) -> bool;
}

/// The production alerter: outbox first, then Discord.
pub struct OutboxAlerter {
    outbox: SqlOutbox,
    client: Option<DiscordClient>,
    wake: Notify,
    console_url: Option<String>,
}

impl std::fmt::Debug for OutboxAlerter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxAlerter")
            .field("discord", &self.client.is_some())
            .finish()
    }
}

/// What one flush of the outbox did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushSummary {
    /// Alerts delivered.
    pub sent: u64,
    /// Alerts that failed this time (kept for the next flush).
    pub failed: u64,
    /// Alerts Discord refused for good, parked this time.
    pub parked: u64,
    /// The flush stopped at its deadline (or a rate-limit wait that would
    /// have passed it); what is left waits for the next flush.
    pub out_of_time: bool,
}

impl OutboxAlerter {
    /// An alerter over `outbox`, delivering through `client` when a webhook
    /// is configured.
    pub fn new(outbox: SqlOutbox, client: Option<DiscordClient>) -> Arc<Self> {
        Self::with_console(outbox, client, None)
    }

    /// [`OutboxAlerter::new`], with every alert's message linking to its
    /// payment's page on the operator console at `console_url` (its public
    /// base URL, `console_public_url`; `None`: no link).
    pub fn with_console(
        outbox: SqlOutbox,
        client: Option<DiscordClient>,
        console_url: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            outbox,
            client,
            wake: Notify::new(),
            console_url: console_url.map(|u| u.trim_end_matches('/').to_owned()),
        })
    }

    /// The outbox.
    pub fn outbox(&self) -> &SqlOutbox {
        &self.outbox
    }

    /// [`OutboxAlerter::flush_within`] [`DEFAULT_FLUSH_BUDGET`].
    pub async fn flush(&self) -> FlushSummary {
        self.flush_within(DEFAULT_FLUSH_BUDGET).await
    }

    /// [`OutboxAlerter::flush_until`] `budget` from now.
    pub async fn flush_within(&self, budget: Duration) -> FlushSummary {
        self.flush_until(Instant::now() + budget).await
    }

    /// Sends the pending alerts, oldest first, marking each sent, and returns
    /// by `deadline` whatever happens (Discord slow or rate limiting, the
    /// database slow). Each row is read at most once per flush. A message
    /// Discord refuses for good is parked and the next one is tried; the
    /// flush stops at the first failure that is not about one message
    /// (Discord down or rate limiting, webhook gone), leaving the rest for
    /// the next flush.
    ///
    /// Cut at the deadline in the middle of a send, an alert Discord did
    /// accept may be sent again by a later flush (at least once, never lost).
    pub async fn flush_until(&self, deadline: Instant) -> FlushSummary {
        let mut summary = FlushSummary::default();
        let Some(client) = &self.client else {
            return summary;
        };
        if client.is_disabled() {
            return summary;
        }
        let delivered =
            tokio::time::timeout_at(deadline, self.deliver(client, deadline, &mut summary)).await;
        if delivered.is_err() {
            summary.out_of_time = true;
        }
        if summary.out_of_time {
            tracing::warn!(
                sent = summary.sent,
                parked = summary.parked,
                "alert flush reached its deadline; the rest waits for the next flush"
            );
        }
        summary
    }

    async fn deliver(&self, client: &DiscordClient, deadline: Instant, summary: &mut FlushSummary) {
        // A cursor, not "the first unsent rows" again: a row that could not
        // be marked (sent, parked) is not met twice in one flush.
        let mut after = i64::MIN;
        loop {
            let page = match self.outbox.pending_after(after, FLUSH_PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "alert outbox unreadable");
                    return;
                }
            };
            if page.is_empty() {
                break;
            }
            for row in page {
                after = row.id;
                match client.send_before(&row.payload, deadline).await {
                    Ok(()) => {
                        if let Err(e) = self.outbox.mark_sent(row.id).await {
                            tracing::error!(error = %e, id = row.id, "alert sent but not marked; it may be sent again");
                        }
                        metrics::counter!("paygate_alerts_sent_total").increment(1);
                        summary.sent += 1;
                    }
                    Err(DiscordError::OutOfTime) => {
                        summary.out_of_time = true;
                        self.publish_depth().await;
                        return;
                    }
                    Err(e) if e.is_permanent() => {
                        tracing::error!(id = row.id, dedup_key = %row.dedup_key, error = %e,
                            "alert parked: Discord refused it for good; see it with the outbox's parked list, un-park it to resend");
                        if let Err(pe) = self.outbox.park(row.id, &e.to_string()).await {
                            tracing::error!(error = %pe, id = row.id, "alert refused but not parked; the next flush tries it again");
                        }
                        metrics::counter!("paygate_alerts_parked_total").increment(1);
                        summary.parked += 1;
                    }
                    Err(e) => {
                        summary.failed += 1;
                        let _ = self.outbox.record_failure(row.id, &e.to_string()).await;
                        if e.stops_delivery() {
                            self.publish_depth().await;
                            return;
                        }
                    }
                }
            }
        }
        self.publish_depth().await;
    }

    /// Sets `paygate_alert_outbox_depth` (pending: unsent, not parked) and
    /// `paygate_alert_outbox_parked`.
    async fn publish_depth(&self) {
        if let Ok(n) = self.outbox.unsent_count().await {
            metrics::gauge!("paygate_alert_outbox_depth").set(n as f64);
        }
        if let Ok(n) = self.outbox.parked_count().await {
            metrics::gauge!("paygate_alert_outbox_parked").set(n as f64);
        }
    }

    /// Flushes whenever an alert is raised, and every `every` regardless,
    /// until `shutdown` completes. Run it as a background task in `serve`.
    /// `shutdown` is honoured at once, in the middle of a flush too (each
    /// flush is bounded by [`DEFAULT_FLUSH_BUDGET`] anyway): a shutdown
    /// never waits for Discord.
    pub async fn run_sender(
        self: Arc<Self>,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        // The families exist on /metrics before the first event.
        metrics::counter!("paygate_alerts_parked_total").increment(0);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                _ = self.flush() => {}
            }
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[async_trait::async_trait]
impl Alerter for OutboxAlerter {
    async fn raise(&self, a: Alert) -> bool {
        tracing::error!(
            alert = a.reason.as_str(),
            payment_id = %a.payment_id,
            merchant_id = %a.merchant_id,
            order_id = %a.order_id,
            amount = a.amount,
            detail = %a.detail,
            "operator alert"
        );
        let link = self
            .console_url
            .as_ref()
            .map(|base| discord::console_link(base, a.payment_id.as_str()));
        let payload = discord::message_with_link(&a, link.as_deref());
        match self.outbox.enqueue(&a, &payload).await {
            Ok(true) => {
                metrics::counter!("paygate_alerts_raised_total", "reason" => a.reason.as_str())
                    .increment(1);
                if self.client.is_none() {
                    tracing::warn!(payment_id = %a.payment_id, "no Discord webhook configured; alert kept in the outbox");
                }
                self.wake.notify_one();
                true
            }
            Ok(false) => {
                tracing::debug!(dedup_key = %a.dedup_key(), "alert already raised");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, payment_id = %a.payment_id, "alert could not be written to the outbox");
                false
            }
        }
    }
}
