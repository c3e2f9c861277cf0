//! Guards I1 and I2 for refunds after the request that claimed them: the
//! batch settles a cancel left `PENDING` or `UNKNOWN` (a lost answer, a
//! crash between the claim and the card call, a request that stalled past
//! the grace) by lookup, and sends it again only after fencing it on the
//! version it read, with the same `Idempotency-Key: <payment_id>:cancel:<n>`
//! (Toss Payments v1 `POST /v1/payments/{paymentKey}/cancel`), so the card
//! company replays the first answer: never a second refund.

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use paygate_card_api::CodeClass;
use paygate_core::PaymentRecord;
use paygate_resilience::{CallError, RequestKind};
use paygate_state_store::{CancelRecord, CancelTransition};

use crate::{
    classify::{self, AttemptError},
    Saga,
};

/// What the batch did with a cancel in flight ([`Saga::settle_cancel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelSettlement {
    /// The card company holds it: marked `DONE` (its reversal was tried).
    Done,
    /// The card company refused it: marked `FAILED`.
    Failed,
    /// Still not known; `batch_attempts` counted (alerted at the threshold).
    StillUnknown,
    /// Not in flight any more (another actor settled it), or the store failed.
    Skipped,
}

impl Saga {
    /// Settles a cancel left `PENDING` or `UNKNOWN` (a lost answer, or a
    /// crash between the claim and the card call): looks the payment up by
    /// orderId and reads its `cancels[]`; when the cancel is not there, fences
    /// it ([`CancelTransition::MarkSending`] on the version read, so a live
    /// request that made no call can no longer answer "nothing was
    /// canceled") and sends the same cancel again with the same
    /// `Idempotency-Key` (the card company replays the first answer, or
    /// makes the cancel the merchant asked for: never a second refund).
    /// Still unknown: `batch_attempts += 1` and an alert (`cancel_unknown`)
    /// once it reaches `alert_threshold`.
    pub async fn settle_cancel(
        self: &Arc<Self>,
        c: &CancelRecord,
        alert_threshold: i64,
    ) -> CancelSettlement {
        let pid = &c.payment_id;
        let record = match self.store.get(pid).await {
            Ok(Some((_, r))) => r,
            _ => return CancelSettlement::Skipped,
        };
        if let Ok(Some(p)) = self.lookup_once(pid, record.order_id.as_str(), 0).await {
            if let Some(at) = self.done_by(&p, c).await {
                return self.batch_done(&record, c, at).await;
            }
        }
        let why = if crate::card_webhook::card_made(c) {
            // Recorded from the card company's own list, never sent by
            // paygate: sending it under `<payment_id>:cancel:<n>` would be a
            // new refund. Only a lookup settles it.
            "a cancel recorded from the card company's list is not in its cancels[]".to_owned()
        } else {
            match self.resend_cancel(&record, c).await {
                Ok(settled) => return settled,
                Err(why) => why,
            }
        };
        let t = CancelTransition::LookupFailed {
            last_error: why.clone(),
        };
        match self.store.cancel_transition(pid, c.n, &t).await {
            Ok(true) => {
                if c.batch_attempts + 1 >= alert_threshold {
                    self.alert(
                        &record,
                        paygate_alert::AlertReason::CancelUnknown,
                        format!("cancel {} of {} (minor units): {why}", c.n, c.amount),
                    )
                    .await;
                }
                CancelSettlement::StillUnknown
            }
            _ => CancelSettlement::Skipped,
        }
    }

    /// Fences `c` on the version read and sends it again under its own
    /// key: what that settled, or why it is still not known.
    async fn resend_cancel(
        self: &Arc<Self>,
        record: &PaymentRecord,
        c: &CancelRecord,
    ) -> Result<CancelSettlement, String> {
        let pid = &c.payment_id;
        let fence = CancelTransition::MarkSending {
            seen_version: c.version,
        };
        match self.store.cancel_transition(pid, c.n, &fence).await {
            Ok(true) => {}
            // Settled or fenced by another actor since it was read: the
            // next sweep reads it again.
            _ => return Ok(CancelSettlement::Skipped),
        }
        let sent = Arc::new(AtomicU32::new(0));
        let res = self
            .cancel_call(record, c, RequestKind::Idempotent, sent.clone())
            .await;
        let sent = sent.load(Ordering::SeqCst);
        let why = match res {
            Ok(p) => match self.done_by(&p, c).await {
                Some(at) => return Ok(self.batch_done(record, c, at).await),
                None => "the card company's answer does not list this cancel".to_owned(),
            },
            Err(CallError::Downstream(AttemptError::Downstream(ce)))
                if sent <= 1
                    && matches!(
                        ce.class(),
                        CodeClass::Decline | CodeClass::InvalidRequest | CodeClass::NotFound
                    ) =>
            {
                let t = CancelTransition::MarkFailed {
                    failure_code: ce.code().to_owned(),
                    last_error: classify::card_message(&ce),
                    release_key: false,
                    seen_version: None,
                };
                return Ok(match self.store.cancel_transition(pid, c.n, &t).await {
                    Ok(true) => CancelSettlement::Failed,
                    _ => CancelSettlement::Skipped,
                });
            }
            Err(e) => e.to_string(),
        };
        Err(why)
    }

    async fn batch_done(
        self: &Arc<Self>,
        record: &PaymentRecord,
        c: &CancelRecord,
        canceled_at: String,
    ) -> CancelSettlement {
        let t = CancelTransition::MarkDone { canceled_at };
        match self
            .store
            .cancel_transition(&record.payment_id, c.n, &t)
            .await
        {
            Ok(true) => {
                self.batch_reverse(&record.payment_id, c.n).await;
                CancelSettlement::Done
            }
            _ => CancelSettlement::Skipped,
        }
    }
}
