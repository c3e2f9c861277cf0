//! Guards I2 (no double charge) and I1: a confirm for an order (or
//! idempotency key) that already has a payment. The same body replays the
//! payment's outcome; another body is refused (422); a payment that was
//! never sent to the card company (a no-call abort) is reopened so this
//! retry may try the card.
//!
//! A `PENDING` payment that no live confirm in this process owns (its
//! gateway died, or its confirm task was dropped) is settled on access, as
//! Kill Bill's Janitor does: when the SQL log proves no confirm was sent
//! (I3), it is a no-call abort that this retry reopens; otherwise it is
//! looked up at the card company and filed through the same guarded
//! transitions the batch uses. The retry gets the true answer at once
//! instead of 409 until the batch runs. An `UNKNOWN` payment as old is
//! checked the same way (the janitor's check: a lookup, and inside the card
//! company's confirm window a re-send under its Idempotency-Key), so a
//! merchant who retries is not answered 202 until the janitor comes by.

use std::sync::Arc;

use paygate_alert::AlertReason;
use paygate_card_api::CONFIRM_PATH;
use paygate_core::{payment::failure_codes, CardStatus, Partition, PaymentRecord};
use paygate_state_store::Transition;

use crate::{
    outcome::{ConfirmInput, ConfirmOutcome, ConfirmTicket, Reuse, Settlement},
    Saga,
};

impl Saga {
    /// Answers a confirm whose order or key is already claimed by `existing`.
    pub(crate) async fn replay(
        self: &Arc<Self>,
        existing: PaymentRecord,
        input: &ConfirmInput,
        fingerprint: &str,
        ticket: &ConfirmTicket,
    ) -> ConfirmOutcome {
        if existing.request_fingerprint != fingerprint {
            let reuse = match (&input.idempotency_key, &existing.idempotency_key) {
                (Some(a), Some(b)) if a == b => Reuse::IdempotencyKey,
                _ => Reuse::OrderId,
            };
            return ConfirmOutcome::Reused {
                payment_id: existing.payment_id,
                reuse,
            };
        }
        match existing.card_status {
            CardStatus::Pending => self.pending_on_access(existing, ticket).await,
            CardStatus::Done | CardStatus::Canceled => ConfirmOutcome::Approved(existing),
            CardStatus::Unknown => self.unknown_on_access(existing, ticket).await,
            CardStatus::Aborted => {
                let code = existing.failure_code.clone().unwrap_or_default();
                if failure_codes::is_no_call(&code) {
                    return self.reopen(existing, code, ticket).await;
                }
                let message = existing.last_error.clone().unwrap_or_default();
                ConfirmOutcome::Declined {
                    record: existing,
                    code,
                    message,
                }
            }
        }
    }

    /// A retry of a `PENDING` payment (see the module's doc).
    async fn pending_on_access(
        self: &Arc<Self>,
        existing: PaymentRecord,
        ticket: &ConfirmTicket,
    ) -> ConfirmOutcome {
        let Some(live) = self.claim_on_access(&existing, ticket) else {
            return ConfirmOutcome::InFlight(existing);
        };
        let pid = existing.payment_id.clone();
        let evidence = self.log.confirm_evidence(pid.as_str(), CONFIRM_PATH).await;
        match evidence {
            Err(_) => ConfirmOutcome::InFlight(existing),
            Ok(e) if e.requests == 0 => {
                // Guarded on the version read before the log (see
                // `Transition::MarkSending`).
                let t = Transition::FileNotSent {
                    seen_version: existing.version,
                    last_error: "no card confirm was logged for it; none was sent".to_owned(),
                };
                match self.store.transition(&pid, &t).await {
                    Ok(true) => {
                        tracing::info!(payment_id = %pid, "retry of a PENDING payment that was never sent: reopened");
                        drop(live);
                        self.reopen(existing, failure_codes::NOT_SENT.to_owned(), ticket)
                            .await
                    }
                    // The write's outcome is unknown, and the log's
                    // evidence is no proof (a stalled REQUEST row of an
                    // earlier confirm may still land): poll, never
                    // "nothing was charged".
                    Ok(false) | Err(_) => ConfirmOutcome::InFlight(existing),
                }
            }
            Ok(_) => self.settle_on_access(existing).await,
        }
    }

    /// A retry of an `UNKNOWN` payment: once it has been still for a
    /// confirm's in-flight window and no confirm of it runs in this
    /// process, it is checked as the janitor checks it (looked up; inside
    /// the card company's confirm window and unknown there, confirmed
    /// again under its Idempotency-Key; after it, settled as not charged)
    /// and the retry answers what that settled. Otherwise 202 as it stands.
    async fn unknown_on_access(
        self: &Arc<Self>,
        existing: PaymentRecord,
        ticket: &ConfirmTicket,
    ) -> ConfirmOutcome {
        let Some(_live) = self.claim_on_access(&existing, ticket) else {
            return ConfirmOutcome::Unknown(existing);
        };
        self.settle_on_access(existing).await
    }

    /// Whether this retry may settle `existing` itself: its last change is
    /// at least a confirm's in-flight window old (an age, not a guard: the
    /// transitions that follow are guarded on the version), no confirm of
    /// it runs in this process (the claim, held while it settles), and the
    /// handler has not answered yet. From here an early answer is 202,
    /// never "nothing was charged": an earlier confirm may have charged it.
    fn claim_on_access(
        &self,
        existing: &PaymentRecord,
        ticket: &ConfirmTicket,
    ) -> Option<crate::saga::LiveConfirm> {
        let age_ms = self.clock.now_ms() - existing.updated_at;
        if age_ms < self.settings.settle_on_access_after.as_millis() as i64 {
            return None;
        }
        let live = self.live.claim(&existing.payment_id)?;
        ticket.make_durable(existing).then_some(live)
    }

    /// Looks an undecided payment up and answers what the card company says,
    /// recorded through the guarded transitions of [`Saga::settle_unknown`].
    async fn settle_on_access(self: &Arc<Self>, existing: PaymentRecord) -> ConfirmOutcome {
        let pid = existing.payment_id.clone();
        tracing::info!(payment_id = %pid, "retry of a PENDING payment no live confirm owns: settling it by lookup");
        let settlement = match self.settle_unknown(&existing).await {
            Ok(s) => s,
            Err(_) => return ConfirmOutcome::InFlight(existing),
        };
        let stored = match self.store.get(&pid).await {
            Ok(Some((_, r))) => r,
            _ => return ConfirmOutcome::InFlight(existing),
        };
        match settlement {
            Settlement::Paid if stored.is_saved => ConfirmOutcome::Approved(stored),
            Settlement::Paid => {
                let mut r = stored;
                r.is_saved = self.save_with_retries(&r).await;
                ConfirmOutcome::Approved(r)
            }
            Settlement::Declined => ConfirmOutcome::Declined {
                code: stored.failure_code.clone().unwrap_or_default(),
                message: stored.last_error.clone().unwrap_or_default(),
                record: stored,
            },
            Settlement::Unknown { detail, version } => {
                // Counted as a check, as the janitor counts it (the recheck
                // schedule and the next retry's age start from it).
                let t = Transition::CheckedUnknown {
                    last_error: detail.clone(),
                    seen_version: version,
                };
                let mut r = stored;
                if matches!(self.store.transition(&pid, &t).await, Ok(true)) {
                    t.apply(&mut r, self.clock.now_ms());
                }
                self.unknown(r, AlertReason::OutcomeUnknown, detail).await
            }
            // Nothing to page about: counted as a check, answered 202.
            Settlement::Waiting { detail, version } => {
                let t = Transition::CheckedUnknown {
                    last_error: detail,
                    seen_version: version,
                };
                let mut r = stored;
                if matches!(self.store.transition(&pid, &t).await, Ok(true)) {
                    t.apply(&mut r, self.clock.now_ms());
                }
                ConfirmOutcome::Unknown(r)
            }
            // Approved and refunded since this retry read it: its answer.
            Settlement::Canceled(_) if stored.is_paid => ConfirmOutcome::Approved(stored),
            Settlement::Mismatch(detail) | Settlement::Canceled(detail) => {
                self.unknown(stored, AlertReason::CardMismatch, detail)
                    .await
            }
        }
    }

    /// A no-call abort: no card call was made for it, so this retry may try
    /// again. The batch may have moved it to `unpaid_payments` already.
    async fn reopen(
        self: &Arc<Self>,
        existing: PaymentRecord,
        code: String,
        ticket: &ConfirmTicket,
    ) -> ConfirmOutcome {
        // PAYGATE_NOT_SENT is the one no-call code another actor sets (the
        // batch, from the log's evidence), and a confirm on its way to the
        // card can race it. Reopening is still safe (the confirm is sent
        // again under the same idempotency key, so the card company replays
        // any first answer), but neither a failure here nor a no-call end
        // of the reopened confirm can promise that nothing was charged:
        // they answer 409, poll, and the record stays PAYGATE_NOT_SENT.
        let in_doubt = code == failure_codes::NOT_SENT;
        // A store that failed here leaves this request unable to say what
        // the payment does now: another replica's retry may have reopened
        // it and be sending it. The answer promises only that this
        // request charged nothing (no paymentId, as when the record could
        // not be written).
        let unavailable = if in_doubt {
            ConfirmOutcome::InFlight(existing.clone())
        } else {
            ConfirmOutcome::Unavailable {
                detail: "payment state store unavailable; this request made no card call; poll GET /v1/payments/orders/{orderId} for the order",
                payment_id: None,
                retry_after_s: None,
            }
        };
        let pid = existing.payment_id.clone();
        let mut current = self.store.get(&pid).await;
        if let Ok(Some((Partition::Unpaid, _))) = current {
            let moved = self
                .store
                .move_record(&pid, Partition::Unpaid, Partition::Realtime)
                .await;
            if let Err(e) = moved {
                tracing::warn!(payment_id = %pid, error = %e,
                    "could not move a no-call abort back to realtime; no card call made");
                return unavailable;
            }
            current = self.store.get(&pid).await;
        }
        // Reopened on the version read here, so this retry knows the
        // version it holds from now on, and its own no-call abort cannot
        // undo what another actor did since.
        let current = match current {
            Ok(Some((Partition::Realtime, r)))
                if r.card_status == CardStatus::Aborted
                    && r.failure_code.as_deref() == Some(code.as_str()) =>
            {
                r
            }
            Ok(_) => return ConfirmOutcome::InFlight(existing),
            Err(_) => return unavailable,
        };
        let Some(_live) = self.live.claim(&pid) else {
            return ConfirmOutcome::InFlight(existing);
        };
        let reopen = Transition::Reopen {
            failure_code: code,
            seen_version: Some(current.version),
        };
        match self.store.transition(&pid, &reopen).await {
            Ok(true) => {
                let mut reopened = current;
                reopen.apply(&mut reopened, self.clock.now_ms());
                if in_doubt {
                    self.run_reopened_not_sent(reopened, ticket).await
                } else {
                    self.run(reopened, ticket).await
                }
            }
            Ok(false) => ConfirmOutcome::InFlight(existing),
            Err(_) => unavailable,
        }
    }
}
