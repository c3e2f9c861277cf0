//! Guards I1 and I2 for a payment the card company has no record of: its
//! confirm was sent (the SQL log holds the `REQUEST` row), no answer
//! settled it, and a lookup by orderId (Toss
//! `GET /v1/payments/orders/{orderId}`) answers 404. Left alone it would stay
//! `UNKNOWN` for ever. What a check does depends on the card company's
//! confirm window (Toss discards a payment not confirmed within 10 minutes
//! of authentication), counted from the record's `created_at` (the confirm
//! arrived after the authentication, so the window closes no later than
//! `created_at + window`):
//!
//! - **window open** ([`Saga::resend`]), and the card company answered
//!   the confirm at least once (a `REQUEST` row alone proves no call left):
//!   confirm again under the payment's own Idempotency-Key. The card
//!   company replays the first answer for a key it has seen and refuses one
//!   still in progress, so a second confirm can never charge twice; it goes through the card stack and its
//!   `REQUEST` row like any confirm, fenced by
//!   [`Transition::MarkResending`] on the version the lookup was judged
//!   from (of two actors that judged the same version, one sends);
//! - **closing** (less than [`CLOCK_SKEW_MARGIN`] before the close, or a
//!   confirm's in-flight window after it, or the record changed within an
//!   in-flight window): wait, nobody paged; the recheck schedule brings it
//!   back;
//! - **window open, no answer logged** (a `REQUEST` row alone: the replica
//!   died before or during the call, or the merchant was answered 503
//!   before it and the abort was lost): wait for the window to close;
//! - **closed** ([`Saga::expire`]): the transaction list over the window
//!   (Toss `GET /v1/transactions`) must agree. No transaction for the
//!   order: settled as not charged (`ABORTED`,
//!   [`failure_codes::CONFIRM_EXPIRED`], guarded on the version judged, so
//!   a re-send fenced since makes it fail), hold released, no operator. A
//!   transaction for it: the two sources disagree, an operator decides.

use std::sync::Arc;

use paygate_card_api::{Transaction, TransactionsQuery, CONFIRM_PATH};
use paygate_core::{payment::failure_codes, CardStatus, PaymentRecord};
use paygate_state_store::{BeginOutcome, StoreError, Transition};

use crate::{
    at_card::card_site,
    outcome::{CardVerdict, Settlement},
    steps::{Landed, RowNeed, Step},
    Saga, CLOCK_SKEW_MARGIN,
};

/// Transaction-list pages read for one payment at most (5,000 each): a
/// window that holds more is left to an operator rather than paged for
/// minutes.
const MAX_LIST_PAGES: usize = 20;

/// How far past the confirm window (and its in-flight window) the
/// transaction list is read, ms.
const LIST_PAST_WINDOW_MS: i64 = 3_600_000;

/// The page size asked for (Toss's largest).
const LIST_PAGE_SIZE: u32 = 5_000;

/// What a check does with a payment the card company has no record of.
pub(crate) enum Absent {
    /// A verdict to record, judged at this version of the record (one
    /// more than the version read when a re-send fenced it).
    Judged(CardVerdict, i64),
    /// The window has closed and the transaction list agrees: settle it
    /// as not charged (the operator's detail).
    Expire(String),
    /// Nothing to do yet and nobody to page (the detail, for the record),
    /// judged at this version.
    Wait(String, i64),
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Saga {
    /// Decides what a check does with `record` after its last lookup
    /// answered 404 (`detail` says so); see the module's doc.
    pub(crate) async fn when_absent(
        self: &Arc<Self>,
        record: &PaymentRecord,
        detail: String,
    ) -> Absent {
        let now = self.clock.now_ms();
        let window = ms(self.settings.card_confirm_window);
        let in_flight = ms(self.settings.settle_on_access_after);
        let skew = ms(CLOCK_SKEW_MARGIN);
        let closes_at = record.created_at.saturating_add(window);
        if window > 0 && now < closes_at.saturating_sub(skew) {
            // Only a confirm the card company answered at least once is
            // sent again: a `REQUEST` row alone does not prove a call left
            // (a confirm whose merchant was answered 503 before the call,
            // and whose abort was then lost, leaves one too), and a
            // re-send would then charge what was promised uncharged. That
            // payment waits for the window to close instead.
            let answered = self
                .log
                .confirm_evidence(record.payment_id.as_str(), CONFIRM_PATH)
                .await
                .is_ok_and(|e| !e.answers.is_empty());
            if answered {
                return self.resend(record).await;
            }
            return Absent::Wait(
                format!(
                    "{detail}; no answer of the card company to its confirm is logged, so it is not sent again: settled when the confirm window closes at {}",
                    paygate_core::time::rfc3339_from_ms(closes_at)
                ),
                record.version,
            );
        }
        let settled_after = closes_at.saturating_add(in_flight);
        if now < settled_after || now.saturating_sub(record.updated_at) < in_flight {
            return Absent::Wait(
                format!(
                    "{detail}; the card company's confirm window closes at {}: judged again after {}",
                    paygate_core::time::rfc3339_from_ms(closes_at),
                    paygate_core::time::rfc3339_from_ms(
                        settled_after.max(record.updated_at + in_flight)
                    ),
                ),
                record.version,
            );
        }
        // From the confirm's arrival to now, at most an hour past the
        // window (nothing can be approved later; a payment first judged
        // days on does not page days of traffic): a transaction for the
        // order is a disagreement with the lookup. The list's dates are
        // whole seconds, so the end is rounded up.
        let from = record.created_at.saturating_sub(skew);
        let to = now.min(settled_after.saturating_add(LIST_PAST_WINDOW_MS));
        match self.transactions_of(record, from, to.saturating_add(999)).await {
            Err(e) => Absent::Judged(
                CardVerdict::Unsettled {
                    detail: format!(
                        "{detail}; its confirm window has closed, but the transaction list could not be read: {e}"
                    ),
                },
                record.version,
            ),
            Ok(txs) if txs.is_empty() => Absent::Expire(format!(
                "{detail}; its confirm window closed at {} and the transaction list shows no transaction for the order: nothing was charged",
                paygate_core::time::rfc3339_from_ms(closes_at)
            )),
            Ok(txs) => {
                let seen: Vec<String> = txs
                    .iter()
                    .map(|t| format!("{} {} at {}", t.status, t.amount, t.transaction_at))
                    .collect();
                Absent::Judged(
                    CardVerdict::Mismatch {
                        detail: format!(
                            "the card company's lookup has no payment for order {}, but its transaction list shows {}",
                            record.order_id,
                            seen.join(", ")
                        ),
                        canceled: false,
                    },
                    record.version,
                )
            }
        }
    }

    /// Confirms `record` again under its Idempotency-Key: the card
    /// `REQUEST` row and the fence [`Transition::MarkResending`] as one
    /// step, then the confirm through the card stack; its verdict is
    /// judged at the fenced version.
    async fn resend(self: &Arc<Self>, record: &PaymentRecord) -> Absent {
        let pid = &record.payment_id;
        // I7 first, as before any card call: the order's hold must be
        // `during` (a no-call abort of an earlier try released it, or it
        // expired). Unlike a confirm's, a refusal here files nothing: a
        // confirm was sent before, so this is no no-call abort; the
        // payment waits for its window to close.
        if let Some(inventory) = self.inventory.as_ref() {
            let now = self.clock.now_ms();
            match inventory
                .begin_payment(&record.merchant_id, &record.order_id, now)
                .await
            {
                Ok(BeginOutcome::During(_) | BeginOutcome::NoHold | BeginOutcome::Sold(_)) => {}
                Ok(BeginOutcome::Expired { short, .. }) => {
                    return Absent::Wait(format!(
                        "the card company has no payment for the order, and its stock hold expired with {} gone: not confirmed again",
                        short.join(", ")
                    ), record.version)
                }
                Err(e) => {
                    return Absent::Judged(
                        CardVerdict::Unsettled {
                            detail: format!(
                                "the card company has no payment for the order; not confirmed again: inventory store: {e}"
                            ),
                        },
                        record.version,
                    )
                }
            }
        }
        let fence = Transition::MarkResending {
            seen_version: record.version,
        };
        let (_, site) = card_site(record);
        let step = Step {
            payment_id: pid,
            row: Some(site.first_request()),
            need: RowNeed::BeforeTransition,
            transition: &fence,
            next: None,
        };
        let landed = self.commit_step(step).await;
        let not_sent = |why: String| CardVerdict::Unsettled {
            detail: format!("the card company has no payment for the order; {why}"),
        };
        match landed {
            Landed::Applied { .. } => {}
            Landed::RowFailed(e) => {
                return Absent::Judged(
                    not_sent(format!(
                        "not confirmed again: the request log refused its row: {e}"
                    )),
                    record.version,
                )
            }
            Landed::Refused { row_twice } | Landed::StoreFailed { row_twice, .. } => {
                // The row landed (a refused journal commit keeps it too):
                // withdraw it, as a confirm whose fence failed does.
                self.withdraw_prewritten(record).await;
                if row_twice {
                    self.withdraw_prewritten(record).await;
                }
                return Absent::Wait(
                    "the record changed (or could not be fenced) before it was confirmed again; judged again when due"
                        .to_owned(),
                    record.version,
                );
            }
        }
        tracing::info!(payment_id = %pid, order_id = %record.order_id,
            "the card company has no payment for the order inside its confirm window: confirming it again under its Idempotency-Key");
        metrics::counter!("paygate_confirm_resends_total").increment(1);
        let mut fenced = record.clone();
        fence.apply(&mut fenced, self.clock.now_ms());
        let (verdict, answer) = self.settle_at_card(&fenced).await;
        // An approval's answer row comes back for a caller that commits it
        // with `MarkPaid`; a check writes it on its own.
        self.write_row(answer).await;
        match verdict {
            CardVerdict::Absent { detail } => Absent::Wait(
                format!("confirmed again, still unknown: {detail}; judged again when due"),
                fenced.version,
            ),
            v => Absent::Judged(v, fenced.version),
        }
    }

    /// Settles `record` as not charged ([`failure_codes::CONFIRM_EXPIRED`],
    /// guarded on the version judged) and releases its hold; a record
    /// another actor settled since is reported as it stands.
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    pub(crate) async fn expire(
        self: &Arc<Self>,
        record: &PaymentRecord,
        detail: String,
    ) -> Result<Settlement, StoreError> {
        let pid = &record.payment_id;
        let t = Transition::MarkAborted {
            failure_code: failure_codes::CONFIRM_EXPIRED.to_owned(),
            last_error: detail,
            seen_version: Some(record.version),
        };
        if self.store.transition(pid, &t).await? {
            tracing::info!(payment_id = %pid,
                "the card company's confirm window closed with no approval in its lookup or its transaction list: settled as not charged");
            metrics::counter!("paygate_payments_total", "outcome" => "confirm_expired")
                .increment(1);
            self.hold_on_aborted(record).await;
            return Ok(Settlement::Declined);
        }
        match self.store.get(pid).await? {
            Some((_, now)) if now.is_paid => Ok(Settlement::Paid),
            // Ended since (another check expired it, or a decline): its
            // hold is released only if it still ended when read after the
            // hold, as the batch releases it (a no-call abort may be
            // reopened by a merchant's retry meanwhile).
            Some((_, now)) if now.card_status == CardStatus::Aborted => {
                self.release_hold_if_ended(&now).await?;
                Ok(Settlement::Declined)
            }
            _ => Ok(Settlement::Waiting {
                detail: "the record changed since it was judged expired; judged again when due"
                    .to_owned(),
                version: record.version,
            }),
        }
    }

    /// The card company's transactions for `record`'s order (or its
    /// paymentKey) between `from_ms` and `to_ms`, every page, logged under
    /// the payment.
    async fn transactions_of(
        self: &Arc<Self>,
        record: &PaymentRecord,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Transaction>, String> {
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let query = TransactionsQuery {
                start_date: paygate_core::time::kst_local_from_ms(from_ms),
                end_date: paygate_core::time::kst_local_from_ms(to_ms),
                starting_after: after.take(),
                limit: Some(LIST_PAGE_SIZE),
            };
            let page = self.transactions_page(&record.payment_id, query).await?;
            let full = page.len() >= LIST_PAGE_SIZE as usize;
            after = page.last().map(|t| t.transaction_key.clone());
            found.extend(page.into_iter().filter(|t| {
                t.order_id == record.order_id.as_str() || t.payment_key == record.payment_key
            }));
            if !full || after.is_none() {
                return Ok(found);
            }
        }
        Err(format!(
            "more than {} transactions in the window; not read to the end",
            MAX_LIST_PAGES * LIST_PAGE_SIZE as usize
        ))
    }
}
