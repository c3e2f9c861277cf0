//! Guards I1 for changes the card company tells us of: what a
//! `PAYMENT_STATUS_CHANGED` webhook (Toss Payments, unsigned) settles.
//!
//! The webhook's body is never believed. It only names an order; the
//! worker looks that order up through the logged card stack (I3) and acts on
//! the lookup alone, through the same guarded transitions the batch uses:
//! - **an undecided payment** (`UNKNOWN`, or `PENDING` past a confirm's
//!   in-flight window) is settled from the lookup as the batch settles it
//!   (paid, then the ledger; declined, then `unpaid_payments`). A `PENDING`
//!   payment younger than that window belongs to its confirm, whose own
//!   answer settles it: the receipt waits, as the batch's grace does;
//! - **a paid payment** whose lookup lists cancels paygate does not hold
//!   (made in the card company's console): each becomes a recorded cancel,
//!   claimed under the key `card:<transactionKey>` (so a second worker, a
//!   replay or a crash finds it, never records it twice) and marked done at
//!   once, then reversed in the ledger. While a merchant's cancel of the
//!   payment is in flight, the receipt waits: that cancel's own answer
//!   tells which of the card's cancels is its own;
//! - **an approval paygate has no payment for** is canceled and alerted, as
//!   the reconciliation handles an orphan;
//! - **anything else** the lookup contradicts (an approval of a payment
//!   paygate recorded declined) is an alert; a lookup that shows nothing new
//!   (a replay, a reordered or forged webhook, a change already recorded)
//!   changes nothing.
//!
//! Cancels are matched to the card's `cancels[]` by amount (see
//! [`crate::cancel::unmatched_card_cancels`]): each of paygate's done
//! cancels accounts for one entry of its amount, and the entries left are
//! the card company's own (or a cancel in flight, which is why the receipt
//! waits for one). Equal amounts are interchangeable, so the totals, the
//! ledger's reversals and the balance agree whichever entry each takes.

use std::sync::Arc;

use paygate_alert::AlertReason;
use paygate_card_api::{Cancel, CardPayment};
use paygate_core::{CardStatus, PaymentRecord};
use paygate_state_store::{
    CancelClaim, CancelDraft, CancelRecord, CancelStatus, CancelTransition, StoreError,
};

use crate::{
    cancel::{card_shows_cancel, unmatched_card_cancels},
    card_calls::{orphan_subject, OrphanCancel},
    Saga, Settlement, Settler,
};

/// The `request_fingerprint` prefix of a cancel recorded from the card
/// company's own records (`card:<transactionKey>`); a merchant's cancel
/// carries a hash, never this. Such a cancel was never sent by paygate, so
/// nothing may ever send it (the batch only looks it up).
pub const CARD_MADE_CANCEL: &str = "card:";

/// Whether `c` was recorded from the card company's records (not sent).
pub fn card_made(c: &CancelRecord) -> bool {
    c.request_fingerprint.starts_with(CARD_MADE_CANCEL)
}

/// What one webhook's lookup settled ([`Saga::act_on_card_webhook`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// An undecided payment was settled from the lookup.
    Settled(Settlement),
    /// Cancels made outside paygate were recorded (how many), their
    /// reversals tried.
    CancelsRecorded(usize),
    /// An approval with no paygate payment, canceled or not (alerted).
    Orphan(OrphanCancel),
    /// The lookup contradicts paygate's record: an operator is told.
    Alerted(String),
    /// The lookup shows nothing paygate does not hold (why).
    NothingNew(&'static str),
    /// Not now (why): the lookup failed, or a confirm or a cancel of the
    /// payment is in flight. The receipt is taken again later.
    Later(String),
}

impl WebhookOutcome {
    /// The receipt's stored outcome (`settled`, `cancels_recorded`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Settled(Settlement::Paid) => "settled_paid",
            Self::Settled(Settlement::Declined) => "settled_declined",
            Self::Settled(_) => "settled_other",
            Self::CancelsRecorded(_) => "cancels_recorded",
            Self::Orphan(_) => "orphan",
            Self::Alerted(_) => "alerted",
            Self::NothingNew(_) => "nothing_new",
            Self::Later(_) => "later",
        }
    }
}

impl Saga {
    /// Acts on a card webhook that names `order_id` (and, as the sender
    /// claims, `payment_key` and `claimed_status`): one logged lookup, then
    /// what it settles (see the module doc). `settler` files a settled
    /// payment as the batch does. A claim that could not change anything
    /// even if true (an approval of a paid payment, a decline of a decided
    /// one, the approval's own webhook of a payment its confirm recorded)
    /// is not looked up: every approval sends one, and a lookup each would
    /// cost the card company as many calls as confirms.
    pub async fn act_on_card_webhook(
        self: &Arc<Self>,
        settler: &Settler,
        order_id: &str,
        payment_key: &str,
        claimed_status: &str,
    ) -> WebhookOutcome {
        let found = match self
            .store
            .find_by_order_ids(std::slice::from_ref(&order_id.to_owned()))
            .await
        {
            Ok(found) => found,
            Err(e) => return WebhookOutcome::Later(format!("store: {e}")),
        };
        let record = found
            .iter()
            .find(|(_, r)| r.payment_key == payment_key)
            .or(found.first())
            .map(|(_, r)| r.clone());
        if let Some(r) = &record {
            let young = self.clock().now_ms().saturating_sub(r.updated_at)
                < i64::try_from(self.settings.settle_on_access_after.as_millis())
                    .unwrap_or(i64::MAX);
            if r.card_status == CardStatus::Pending && !r.is_paid && young {
                return WebhookOutcome::Later(
                    "its confirm may still be at the card company; its own answer settles it"
                        .to_owned(),
                );
            }
        }
        let other_key = record
            .as_ref()
            .is_some_and(|r| r.payment_key != payment_key);
        if !other_key && !could_change(record.as_ref(), claimed_status) {
            return WebhookOutcome::NothingNew("the claim, even if true, changes nothing held");
        }
        let subject = record
            .as_ref()
            .map_or_else(|| orphan_subject(order_id), |r| r.payment_id.clone());
        let p = match self.lookup_once(&subject, order_id, 0).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                return WebhookOutcome::NothingNew("the card company has no payment for the order")
            }
            Err(e) => return WebhookOutcome::Later(format!("lookup failed: {e}")),
        };
        let Some(r) = record else {
            if matches!(p.status.as_str(), "DONE" | "PARTIAL_CANCELED") {
                let amount = p.balance_amount.unwrap_or(p.total_amount);
                return WebhookOutcome::Orphan(
                    self.cancel_orphan(&subject, order_id, &p.payment_key, amount)
                        .await,
                );
            }
            return WebhookOutcome::NothingNew("no paygate payment, and nothing charged");
        };
        if r.is_paid {
            if p.payment_key != r.payment_key {
                return self
                    .contradicted(&r, format!(
                        "order {order_id} is held at the card company by another paymentKey than the paid record's"
                    ))
                    .await;
            }
            return match self.record_card_cancels(&r, &p).await {
                Ok(outcome) => outcome,
                Err(e) => WebhookOutcome::Later(format!("store: {e}")),
            };
        }
        if matches!(r.card_status, CardStatus::Pending | CardStatus::Unknown) {
            let pid = r.payment_id.clone();
            return match settler.settle_found(r, p.clone()).await {
                // Canceled at the card company, and (read again) paid by
                // another actor since the read: record its cancels now.
                Ok(Some((Settlement::Canceled(detail), _))) => match self.store.get(&pid).await {
                    Ok(Some((_, now))) if now.is_paid => {
                        match self.record_card_cancels(&now, &p).await {
                            Ok(outcome) => outcome,
                            Err(e) => WebhookOutcome::Later(format!("store: {e}")),
                        }
                    }
                    Ok(_) => WebhookOutcome::Settled(Settlement::Canceled(detail)),
                    Err(e) => WebhookOutcome::Later(format!("store: {e}")),
                },
                Ok(Some((settlement, _))) => WebhookOutcome::Settled(settlement),
                Ok(None) => WebhookOutcome::NothingNew("not final at the card company yet"),
                Err(e) => WebhookOutcome::Later(format!("store: {e}")),
            };
        }
        // Declined in paygate: only an approval (or its cancel) contradicts.
        if p.payment_key == r.payment_key
            && (p.is_approved() || matches!(p.status.as_str(), "CANCELED" | "PARTIAL_CANCELED"))
        {
            let detail = format!(
                "the card company shows order {order_id} {} but paygate recorded it as {} ({})",
                p.status,
                r.card_status.as_str(),
                r.failure_code.clone().unwrap_or_default()
            );
            return self.contradicted(&r, detail).await;
        }
        WebhookOutcome::NothingNew("declined at the card company as in paygate")
    }

    async fn contradicted(&self, r: &PaymentRecord, detail: String) -> WebhookOutcome {
        self.alert(r, AlertReason::CardMismatch, detail.clone())
            .await;
        WebhookOutcome::Alerted(detail)
    }

    /// Records the cancels `p` (a fresh lookup of the paid `r`) lists
    /// beyond paygate's own, one at a time (see the module doc).
    async fn record_card_cancels(
        self: &Arc<Self>,
        r: &PaymentRecord,
        p: &CardPayment,
    ) -> Result<WebhookOutcome, StoreError> {
        let pid = &r.payment_id;
        let card = p.cancels.as_deref().unwrap_or(&[]);
        let mut recorded = 0;
        // Each round records one cancel or finishes one left in flight; the
        // card lists at most `card.len()` of them.
        for _ in 0..=card.len() {
            let cancels = self.store.cancels_of(pid).await?;
            if let Some(c) = cancels.iter().find(|c| c.status.in_flight()) {
                if !card_made(c) {
                    return Ok(WebhookOutcome::Later(format!(
                        "cancel {} of the payment is in flight; its answer comes first",
                        c.n
                    )));
                }
                // Recorded from the card's list by a worker that stopped
                // before marking it done.
                let Some(at) = card_shows_cancel(p, &cancels, c) else {
                    return Ok(WebhookOutcome::Later(format!(
                        "cancel {} recorded from the card company is not where its list shows it",
                        c.n
                    )));
                };
                self.finish_card_cancel(r, c.n, at).await?;
                recorded += 1;
                continue;
            }
            let done: Vec<i64> = cancels
                .iter()
                .filter(|c| c.status == CancelStatus::Done)
                .map(|c| c.amount)
                .collect();
            let first = unmatched_card_cancels(p, &done).into_iter().next();
            let Some(entry) = first.and_then(|i| card.get(i)) else {
                return Ok(if recorded > 0 {
                    WebhookOutcome::CancelsRecorded(recorded)
                } else {
                    WebhookOutcome::NothingNew("every cancel the card company lists is recorded")
                });
            };
            match self
                .store
                .claim_cancel(&card_cancel_draft(r, entry, self.clock().now_ms()))
                .await?
            {
                CancelClaim::Claimed(c) => {
                    self.finish_card_cancel(r, c.n, entry.canceled_at.clone())
                        .await?;
                    recorded += 1;
                }
                // Recorded since the read (another worker): read again.
                CancelClaim::Existing(c) if card_made(&c) => {}
                CancelClaim::Existing(_) | CancelClaim::InProgress(_) => {
                    return Ok(WebhookOutcome::Later(
                        "another cancel of the payment was claimed since the read".to_owned(),
                    ))
                }
                CancelClaim::ExceedsBalance { balance } => {
                    let detail = format!(
                        "the card company lists a cancel of {} (transaction {}) that paygate's balance of {balance} cannot take",
                        entry.cancel_amount,
                        entry.transaction_key.as_deref().unwrap_or("?")
                    );
                    self.alert(r, AlertReason::CancelMismatch, detail.clone())
                        .await;
                    return Ok(WebhookOutcome::Alerted(detail));
                }
            }
        }
        Ok(WebhookOutcome::CancelsRecorded(recorded))
    }

    /// Marks card-made cancel `n` done (the card company holds it) and
    /// reverses it in the ledger (one try, then async retries and the
    /// batch, as a merchant's cancel).
    async fn finish_card_cancel(
        self: &Arc<Self>,
        r: &PaymentRecord,
        n: i64,
        canceled_at: String,
    ) -> Result<(), StoreError> {
        let t = CancelTransition::MarkDone { canceled_at };
        if self.store.cancel_transition(&r.payment_id, n, &t).await? {
            tracing::info!(payment_id = %r.payment_id, n,
                "a cancel made at the card company is recorded; reversing it in the ledger");
            metrics::counter!("paygate_card_cancels_recorded_total").increment(1);
            self.reverse_with_retries(&r.payment_id, n).await;
        }
        Ok(())
    }
}

/// Whether a webhook claiming `status` could change anything about
/// `record` (`None`: no paygate payment) if it were true; only then is the
/// order looked up.
fn could_change(record: Option<&PaymentRecord>, status: &str) -> bool {
    let charged = matches!(status, "DONE" | "PARTIAL_CANCELED");
    let canceled = matches!(status, "CANCELED" | "PARTIAL_CANCELED");
    match record {
        None => charged,
        Some(r) if r.is_paid => canceled,
        Some(r) if matches!(r.card_status, CardStatus::Pending | CardStatus::Unknown) => true,
        Some(_) => charged || canceled,
    }
}

/// The claim of a cancel the card company lists and paygate does not hold.
fn card_cancel_draft(r: &PaymentRecord, entry: &Cancel, now: i64) -> CancelDraft {
    let key = entry
        .transaction_key
        .clone()
        .unwrap_or_else(|| format!("{}-{}", entry.canceled_at, entry.cancel_amount));
    CancelDraft {
        payment_id: r.payment_id.clone(),
        merchant_id: r.merchant_id.clone(),
        total_amount: r.amount,
        amount: Some(entry.cancel_amount),
        reason: format!("canceled at the card company: {}", entry.cancel_reason),
        idempotency_key: Some(format!("{CARD_MADE_CANCEL}{key}")),
        request_fingerprint: format!("{CARD_MADE_CANCEL}{key}"),
        now,
    }
}
