//! Guards I4 (every answer true): how a confirm ends when it does not end
//! approved. Each end applies its transition (a no-call abort guarded on
//! the version the confirm last wrote), releases only the hold the confirm
//! moved itself, raises what needs an operator and builds the merchant's
//! answer: declined (402), no card call (503, or 409 when another actor
//! changed the payment since or an earlier confirm may have been sent),
//! outcome unknown (202), or an approval the store could not record (200,
//! alerted).

use paygate_alert::AlertReason;
use paygate_core::{payment::failure_codes, CardStatus, PaymentRecord};
use paygate_state_store::{Hold, Transition};

use crate::{outcome::ConfirmOutcome, Saga};

impl Saga {
    /// The approval is real but the store failed: the record stays PENDING,
    /// which the batch settles by lookup; the operator hears of it now. The
    /// merchant is told the truth: approved.
    pub(crate) async fn approval_not_recorded(
        &self,
        mut record: PaymentRecord,
        approved_at: String,
        e: paygate_state_store::StoreError,
    ) -> ConfirmOutcome {
        self.alert(
            &record,
            AlertReason::StoreFailedAfterApproval,
            format!("mark paid failed: {e}"),
        )
        .await;
        // What the record would be had the write applied: the merchant is
        // answered from the approval, not from the store.
        Transition::MarkPaid { approved_at }.apply(&mut record, self.clock.now_ms());
        ConfirmOutcome::Approved(record)
    }

    /// The card company declined. The decline is its answer for this
    /// payment whoever sent it, so the abort is guarded on state alone;
    /// the hold released is only the one this confirm moved (`moved`).
    pub(crate) async fn declined(
        &self,
        mut record: PaymentRecord,
        code: String,
        message: String,
        moved: Option<&Hold>,
    ) -> ConfirmOutcome {
        let pid = &record.payment_id;
        let t = Transition::MarkAborted {
            failure_code: code.clone(),
            last_error: message.clone(),
            seen_version: None,
        };
        if let Err(e) = self.store.transition(pid, &t).await {
            tracing::warn!(payment_id = %pid, error = %e, "could not record the decline; the batch will settle it");
        }
        t.apply(&mut record, self.clock.now_ms());
        self.release_moved_hold(&record, moved).await;
        metrics::counter!("paygate_payments_total", "outcome" => "declined").increment(1);
        ConfirmOutcome::Declined {
            record,
            code,
            message,
        }
    }

    /// No card call was made by this confirm: the record is aborted with
    /// `code`, guarded on the version this confirm last wrote, and only
    /// when that applied is the hold it moved (`moved`) released and the
    /// merchant told that nothing was charged. A guard that fails means
    /// another actor changed the payment since (a retry at another
    /// replica may be sending it): this request answers 409, poll.
    pub(crate) async fn not_attempted(
        &self,
        record: PaymentRecord,
        code: &'static str,
        detail: String,
        retry_after_s: Option<u64>,
        moved: Option<&Hold>,
    ) -> ConfirmOutcome {
        let pid = record.payment_id.clone();
        tracing::error!(payment_id = %pid, reason = code, detail = %detail, "no card call made");
        let t = Transition::MarkAborted {
            failure_code: code.to_owned(),
            last_error: detail,
            seen_version: Some(record.version),
        };
        match self.store.transition(&pid, &t).await {
            Ok(true) => self.release_moved_hold(&record, moved).await,
            Ok(false) => {
                tracing::warn!(payment_id = %pid,
                    "the record changed since this confirm wrote it; left to the actor that changed it");
                metrics::counter!("paygate_payments_total", "outcome" => "not_attempted")
                    .increment(1);
                return ConfirmOutcome::InFlight(record);
            }
            // The record stays PENDING with its hold `during`: the batch
            // files it as never sent, and its stuck-hold pass releases the
            // hold from that state.
            Err(e) => {
                tracing::warn!(payment_id = %pid, error = %e, "could not mark the record aborted")
            }
        }
        let detail = match code {
            failure_codes::LOG_UNAVAILABLE => {
                "request log unavailable; nothing was charged, retry later"
            }
            failure_codes::CIRCUIT_OPEN => {
                "card company unavailable (circuit open); nothing was charged, retry later"
            }
            failure_codes::OVERLOADED => {
                "too many payments in flight; nothing was charged, retry later"
            }
            failure_codes::ANSWER_TIMED_OUT => {
                "no answer in time; this request made no card call and will make none, retry with the same body"
            }
            _ => "card company unavailable; nothing was charged, retry later",
        };
        metrics::counter!("paygate_payments_total", "outcome" => "not_attempted").increment(1);
        let answer = ConfirmOutcome::Unavailable {
            detail,
            payment_id: Some(pid),
            retry_after_s,
        };
        self.nothing_charged(record, code, answer).await
    }

    /// `answer` ("nothing was charged" for the payment) when a fresh read
    /// still shows the payment as this confirm's no-call end left it:
    /// aborted with `code`, unpaid. The promise is about the payment and
    /// reaches the merchant after whatever this request did last: one that
    /// stalled after its abort while a retry at another replica reopened
    /// the payment and sent it must not make it. Otherwise 409 with the
    /// payment as it stands (poll), and 409 when the store cannot say.
    pub(crate) async fn nothing_charged(
        &self,
        record: PaymentRecord,
        code: &str,
        answer: ConfirmOutcome,
    ) -> ConfirmOutcome {
        match self.store.get(&record.payment_id).await {
            Ok(Some((_, now)))
                if !now.is_paid
                    && now.card_status == CardStatus::Aborted
                    && now.failure_code.as_deref() == Some(code) =>
            {
                answer
            }
            Ok(Some((_, now))) => {
                tracing::info!(payment_id = %record.payment_id,
                    "the payment changed since this request's no-call end; answering 409, not \"nothing was charged\"");
                ConfirmOutcome::InFlight(now)
            }
            _ => ConfirmOutcome::InFlight(record),
        }
    }

    /// This retry made no card call, but an earlier confirm of the same
    /// payment may have (the record had been filed `PAYGATE_NOT_SENT` by an
    /// actor that read no `REQUEST` row, which a stalled log write can
    /// still land after): the record goes back to `PAYGATE_NOT_SENT`, so the
    /// doubt outlives this retry (a next retry reopens it the same way, a
    /// late approval repairs it, the reconciliation finds it), and the
    /// merchant is answered 409 with the paymentId (poll), never a 503
    /// that would promise nothing was charged.
    pub(crate) async fn not_attempted_in_doubt(
        &self,
        record: PaymentRecord,
        code: &'static str,
        detail: String,
    ) -> ConfirmOutcome {
        let pid = &record.payment_id;
        tracing::warn!(payment_id = %pid, reason = code, detail = %detail,
            "no card call made by this retry of a payment filed as not sent; an earlier confirm may have been sent");
        let t = Transition::MarkAborted {
            failure_code: failure_codes::NOT_SENT.to_owned(),
            last_error: format!(
                "{code}: {detail}; an earlier confirm of this payment may have been sent"
            ),
            seen_version: Some(record.version),
        };
        if let Err(e) = self.store.transition(pid, &t).await {
            tracing::warn!(payment_id = %pid, error = %e, "could not mark the record aborted");
        }
        metrics::counter!("paygate_payments_total", "outcome" => "not_attempted").increment(1);
        ConfirmOutcome::InFlight(record)
    }

    /// The card company shows the payment canceled (fully or in part), so
    /// it approved it first: when the record, read again, is paid, another
    /// actor recorded that approval (a retry at another replica settled it
    /// by lookup) and the merchant refunded it since this confirm's call,
    /// so the approval is this confirm's answer and nobody is paged. Any
    /// other record is a mismatch in front of an operator. An alert is a
    /// state change too: raised only when a fresh read still justifies it.
    pub(crate) async fn canceled_at_card(
        &self,
        record: PaymentRecord,
        detail: String,
    ) -> ConfirmOutcome {
        match self.store.get(&record.payment_id).await {
            Ok(Some((_, fresh))) if fresh.is_paid => {
                tracing::info!(payment_id = %record.payment_id,
                    "the card company shows a cancel of a payment another actor recorded paid since this confirm's call; no alert");
                ConfirmOutcome::Approved(fresh)
            }
            _ => {
                self.unknown(record, AlertReason::CardMismatch, detail)
                    .await
            }
        }
    }

    pub(crate) async fn unknown(
        &self,
        mut record: PaymentRecord,
        reason: AlertReason,
        detail: String,
    ) -> ConfirmOutcome {
        let t = Transition::MarkUnknown {
            last_error: detail.clone(),
        };
        if let Err(e) = self.store.transition(&record.payment_id, &t).await {
            tracing::warn!(payment_id = %record.payment_id, error = %e, "could not mark the record unknown");
        }
        self.alert(&record, reason, detail).await;
        t.apply(&mut record, self.clock.now_ms());
        metrics::counter!("paygate_payments_total", "outcome" => "unknown").increment(1);
        ConfirmOutcome::Unknown(record)
    }
}
