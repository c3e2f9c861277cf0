//! Guards I1 (no lost approval): a confirm whose answer was lost (timeout,
//! reset, 5xx after retries) is settled by looking the payment up by orderId
//! (Toss `GET /v1/payments/orders/{orderId}`), never assumed declined. A 404
//! after a lost answer is "not known yet", not a decline.

use std::{
    future::Future,
    sync::{atomic::AtomicU32, Arc},
};

use paygate_api_log::Target;
use paygate_card_api::{CardApiError, CardPayment};
use paygate_core::{PaymentId, PaymentRecord};
use paygate_resilience::{CallError, RequestKind};

use crate::{
    classify::{self, AttemptError},
    logged_call::{describe_lookup, CallSite, Fusion, Policy},
    outcome::CardVerdict,
    Saga,
};

impl Saga {
    /// Looks the payment up by orderId until the card company's answer settles it.
    pub(crate) async fn settle_by_lookup(self: &Arc<Self>, record: &PaymentRecord) -> CardVerdict {
        let mut last = String::from("no lookup made");
        let mut absent = false;
        for attempt in 1..=self.settings.lookup_attempts {
            if attempt > 1 {
                tokio::time::sleep(self.settings.lookup_delay * (attempt - 1)).await;
            }
            let offset = i32::try_from(attempt).unwrap_or(i32::MAX) - 1;
            let res = self
                .lookup_once(&record.payment_id, record.order_id.as_str(), offset)
                .await;
            absent = matches!(res, Ok(None));
            match res {
                Ok(Some(p)) => match self.verdict_of_lookup(record, p) {
                    Ok(verdict) => return verdict,
                    Err(status) => last = format!("card company shows status {status}"),
                },
                Ok(None) => last = "card company has no payment for the order yet".to_owned(),
                Err(CallError::Downstream(AttemptError::LogUnavailable(e))) => {
                    return CardVerdict::Unsettled {
                        detail: format!("request log unavailable; lookup not made: {e}"),
                    };
                }
                Err(e) => last = format!("lookup failed: {e}"),
            }
        }
        let detail = format!(
            "outcome unknown after {} lookups: {last}",
            self.settings.lookup_attempts
        );
        if absent {
            CardVerdict::Absent { detail }
        } else {
            CardVerdict::Unsettled { detail }
        }
    }

    /// What one found payment settles; `Err(status)` when its status is not
    /// final yet (look again).
    pub(crate) fn verdict_of_lookup(
        &self,
        record: &PaymentRecord,
        p: CardPayment,
    ) -> Result<CardVerdict, String> {
        if p.payment_key != record.payment_key {
            return Ok(CardVerdict::Mismatch {
                detail: format!(
                    "order {} is held at the card company by another paymentKey",
                    record.order_id
                ),
                canceled: false,
            });
        }
        if p.is_approved() {
            return Ok(self.check_match(record, p));
        }
        match p.status.as_str() {
            "CANCELED" | "PARTIAL_CANCELED" => Ok(CardVerdict::Mismatch {
                detail: format!("card company shows the payment {}", p.status),
                canceled: true,
            }),
            "ABORTED" | "EXPIRED" => {
                let (code, message) = p
                    .failure
                    .map(|f| (f.code, f.message))
                    .unwrap_or((p.status, String::new()));
                Ok(CardVerdict::Declined { code, message })
            }
            _ => Err(p.status),
        }
    }

    /// One logged lookup by orderId through the card stack (one attempt).
    pub(crate) fn lookup_once(
        self: &Arc<Self>,
        subject: &PaymentId,
        order_id: &str,
        attempt_offset: i32,
    ) -> impl Future<Output = Result<Option<CardPayment>, CallError<AttemptError<CardApiError>>>>
           + Send
           + 'static {
        let site = CallSite {
            payment_id: subject.clone(),
            target: Target::CardApi,
            method: "GET",
            path: format!("/v1/payments/orders/{order_id}"),
            body: None,
            attempt_offset,
            fusion: Fusion::default(),
        };
        let card = self.card.clone();
        let order = order_id.to_owned();
        let call = move || {
            let (card, order) = (card.clone(), order.clone());
            async move { card.payment_by_order_id(&order).await }
        };
        let policy = Policy {
            stack: self.card_stack.clone(),
            kind: RequestKind::Idempotent,
            max_attempts: Some(1),
            classify: classify::lookup,
            attempt_timeout: paygate_resilience::ATTEMPT_TIMEOUT_RETRYABLE,
        };
        self.through(
            policy,
            site,
            call,
            describe_lookup,
            Arc::new(AtomicU32::new(0)),
        )
    }

    /// Looks an order up at the card company (Toss
    /// `GET /v1/payments/orders/{orderId}`), logged in the SQL log under
    /// `subject` like every downstream call: a payment's id, or for an order
    /// paygate has no record of, the reconciliation's `orphan_<orderId>`.
    /// `Ok(None)` when the card company has no payment for the order.
    ///
    /// # Errors
    /// A description of why no answer was had (the stack refused, the log
    /// could not be written, or the card API failed).
    pub async fn lookup_order(
        self: &Arc<Self>,
        subject: &PaymentId,
        order_id: &str,
    ) -> Result<Option<CardPayment>, String> {
        self.lookup_once(subject, order_id, 0)
            .await
            .map_err(|e| e.to_string())
    }
}
