//! Guards I1 and I2 at the card company: a confirm's card call through the
//! card stack (Toss Payments v1 `POST /v1/payments/confirm` with
//! `Idempotency-Key: <payment_id>`; 5xx retried with the same key, a lost
//! answer never re-sent but settled by lookups), and what its answer or
//! error settles ([`CardVerdict`]).

use std::sync::{
    atomic::{AtomicBool, AtomicU32, Ordering},
    Arc,
};

use paygate_api_log::Target;
use paygate_card_api::{CardApiError, CardPayment, ConfirmRequest, CONFIRM_PATH};
use paygate_core::{payment::failure_codes, PaymentRecord};
use paygate_resilience::{CallError, RequestKind};

use crate::{
    classify::{self, card_message, AttemptError},
    logged_call::{describe_card, CallSite, Fusion, OwnedRow, Policy},
    outcome::CardVerdict,
    Saga,
};

/// The card confirm of `record`: its request and its logged call site.
pub(crate) fn card_site(record: &PaymentRecord) -> (ConfirmRequest, CallSite) {
    let req = ConfirmRequest {
        payment_key: record.payment_key.clone(),
        order_id: record.order_id.to_string(),
        amount: record.amount,
    };
    let site = CallSite {
        payment_id: record.payment_id.clone(),
        target: Target::CardApi,
        method: "POST",
        path: CONFIRM_PATH.to_owned(),
        body: serde_json::to_value(&req).ok(),
        attempt_offset: 0,
        fusion: Fusion::default(),
    };
    (req, site)
}

impl Saga {
    /// Confirms at the card company through its stack (5xx retried with the
    /// same idempotency key), then settles a lost answer by lookups.
    /// The first attempt's `REQUEST` row is already committed (with the
    /// record, or by [`Saga::open_for_sending`]); with a journal, an approval's `RESPONSE` row comes back
    /// with the verdict, unwritten, for [`Saga::approved`] to commit with
    /// `MarkPaid` (every other answer's row is written here).
    pub(crate) async fn settle_at_card(
        self: &Arc<Self>,
        record: &PaymentRecord,
    ) -> (CardVerdict, Option<OwnedRow>) {
        let (req, mut site) = card_site(record);
        site.fusion = Fusion {
            prewritten: Some(Arc::new(AtomicBool::new(true))),
            deferred: self.journal.as_ref().map(|_| Arc::default()),
        };
        let fusion = site.fusion.clone();
        let first_request = site.first_request();
        let card = self.card.clone();
        let key = record.payment_id.to_string();
        let sent = Arc::new(AtomicU32::new(0));
        let call = move || {
            let (card, req, key) = (card.clone(), req.clone(), key.clone());
            async move { card.confirm(&req, &key).await }
        };
        let policy = Policy {
            stack: self.card_stack.clone(),
            kind: RequestKind::Idempotent,
            max_attempts: None,
            classify: classify::confirm,
            attempt_timeout: paygate_resilience::ATTEMPT_TIMEOUT_NOT_RETRIED,
        };
        let res = self
            .through(policy, site, call, describe_card, sent.clone())
            .await;
        let sent = sent.load(Ordering::SeqCst);
        self.withdraw_request(&fusion, first_request).await;
        let answer = fusion.take_deferred();
        match res {
            // A 200 settles the payment only when its status is final
            // (approved, or aborted/expired); IN_PROGRESS or
            // WAITING_FOR_DEPOSIT may still turn DONE: look it up, never
            // call it a decline.
            Ok(p) => match self.verdict_of_lookup(record, p) {
                Ok(verdict @ CardVerdict::Approved(_)) => (verdict, answer),
                Ok(verdict) => {
                    self.write_row(answer).await;
                    (verdict, None)
                }
                Err(status) => {
                    self.write_row(answer).await;
                    tracing::warn!(payment_id = %record.payment_id, status = %status,
                        "card confirm answered a status that is not final; looking the payment up");
                    (self.settle_by_lookup(record).await, None)
                }
            },
            Err(e) => {
                self.write_row(answer).await;
                (self.verdict_of_error(record, e, sent).await, None)
            }
        }
    }

    /// What a confirm that ended in an error settled; `sent` is the number
    /// of attempts that actually left (0: no card call was made).
    pub(crate) async fn verdict_of_error(
        self: &Arc<Self>,
        record: &PaymentRecord,
        e: CallError<AttemptError<CardApiError>>,
        sent: u32,
    ) -> CardVerdict {
        match e {
            CallError::Downstream(AttemptError::Downstream(e)) if e.is_decline() => {
                CardVerdict::Declined {
                    code: e.code().to_owned(),
                    message: card_message(&e),
                }
            }
            // Refused before anything happened (an expired checkout
            // session, an invalid request): final when it answered the only
            // attempt; after an earlier attempt that may have gone through,
            // only a lookup can tell.
            CallError::Downstream(AttemptError::Downstream(e))
                if sent == 1 && e.definitely_not_approved() && !e.is_auth_failure() =>
            {
                tracing::warn!(payment_id = %record.payment_id, code = e.code(), class = ?e.class(),
                    "card company refused the confirm; nothing was approved");
                CardVerdict::Declined {
                    code: e.code().to_owned(),
                    message: card_message(&e),
                }
            }
            CallError::Downstream(AttemptError::Downstream(e))
                if e.is_auth_failure() && sent == 1 =>
            {
                CardVerdict::NoCall {
                    code: failure_codes::CARD_AUTH_FAILED,
                    detail: e.to_string(),
                    retry_after_s: None,
                }
            }
            CallError::Downstream(AttemptError::LogUnavailable(detail)) if sent == 0 => {
                CardVerdict::NoCall {
                    code: failure_codes::LOG_UNAVAILABLE,
                    detail,
                    retry_after_s: None,
                }
            }
            CallError::Downstream(AttemptError::LogUnavailable(detail)) => CardVerdict::Unsettled {
                detail: format!("request log unavailable after {sent} attempts: {detail}"),
            },
            e if e.no_call_made() && sent == 0 => {
                let (code, retry_after_s) = match &e {
                    CallError::BreakerOpen { retry_after } => (
                        failure_codes::CIRCUIT_OPEN,
                        Some(retry_after.as_secs_f64().ceil().max(1.0) as u64),
                    ),
                    _ => (failure_codes::OVERLOADED, Some(1)),
                };
                CardVerdict::NoCall {
                    code,
                    detail: e.to_string(),
                    retry_after_s,
                }
            }
            e => {
                tracing::warn!(payment_id = %record.payment_id, attempts = sent, error = %e,
                    "card confirm got no usable answer; looking the payment up");
                self.settle_by_lookup(record).await
            }
        }
    }

    /// An approval counts only when it is for this order, key and amount.
    pub(crate) fn check_match(&self, record: &PaymentRecord, p: CardPayment) -> CardVerdict {
        if p.order_id == record.order_id.as_str()
            && p.total_amount == record.amount
            && p.payment_key == record.payment_key
        {
            CardVerdict::Approved(Box::new(p))
        } else {
            CardVerdict::Mismatch {
                detail: format!(
                    "card company approved orderId={} amount={} for a payment of amount={}",
                    p.order_id, p.total_amount, record.amount
                ),
                canceled: false,
            }
        }
    }
}
