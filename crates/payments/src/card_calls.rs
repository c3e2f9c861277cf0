//! Guards I3 for the card calls that are not a confirm or a lookup: cancels
//! (refunds, Toss `POST /v1/payments/{paymentKey}/cancel`) and the
//! transaction list the reconciliation pages through (Toss
//! `GET /v1/transactions`). Both go through the card stack and are written
//! to the SQL log before they leave.

use std::sync::{atomic::AtomicU32, Arc};

use paygate_api_log::Target;
use paygate_card_api::{CancelRequest, CardPayment, Transaction, TransactionsQuery};
use paygate_core::PaymentId;
use paygate_resilience::RequestKind;

use paygate_alert::{Alert, AlertReason};

use crate::{
    classify,
    logged_call::{describe_card, describe_page, CallSite, Fusion, Policy},
    Saga,
};

/// What [`Saga::cancel_orphan`] did with an approval paygate has no
/// record of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrphanCancel {
    /// Canceled at the card company; `alerted`: a new `orphan_canceled`
    /// alert was raised (false when one was open already).
    Canceled {
        /// A new alert was raised.
        alerted: bool,
    },
    /// The cancel failed; `orphan_not_canceled` raised (`alerted`: new).
    Failed {
        /// A new alert was raised.
        alerted: bool,
    },
}

/// The subject an order paygate has no record of is logged and alerted
/// under: `orphan_<orderId>`.
pub fn orphan_subject(order_id: &str) -> PaymentId {
    PaymentId::from_stored(format!("orphan_{order_id}"))
}

impl Saga {
    /// Cancels an approval paygate has no payment for (found by the
    /// reconciliation's list or a card webhook, and shown still charged by
    /// a lookup the caller made), with the idempotency key
    /// `reconcile-cancel-<paymentKey>` (whoever finds it first cancels it;
    /// a second finder's cancel replays the first answer), then alerts an
    /// operator: `orphan_canceled`, or `orphan_not_canceled` with the
    /// reason. Logged under `subject` ([`orphan_subject`]). `amount` in
    /// minor units, for the alert.
    pub async fn cancel_orphan(
        self: &Arc<Self>,
        subject: &PaymentId,
        order_id: &str,
        payment_key: &str,
        amount: i64,
    ) -> OrphanCancel {
        let key = format!("reconcile-cancel-{payment_key}");
        let reason = "reconciliation: approval without a paygate payment";
        let alert = |reason, detail| Alert {
            reason,
            payment_id: subject.to_string(),
            merchant_id: String::new(),
            order_id: order_id.to_owned(),
            amount,
            detail,
        };
        match self
            .cancel_at_card(subject, payment_key, reason, &key)
            .await
        {
            Ok(_) => {
                let detail = format!(
                    "approval of order {order_id} (amount {amount}) had no paygate payment; canceled at the card company"
                );
                OrphanCancel::Canceled {
                    alerted: self
                        .raise_alert(alert(AlertReason::OrphanCanceled, detail))
                        .await,
                }
            }
            Err(e) => {
                let detail = format!(
                    "approval of order {order_id} (amount {amount}) has no paygate payment and the cancel failed: {e}"
                );
                OrphanCancel::Failed {
                    alerted: self
                        .raise_alert(alert(AlertReason::OrphanNotCanceled, detail))
                        .await,
                }
            }
        }
    }

    /// Cancels a payment at the card company (Toss
    /// `POST /v1/payments/{paymentKey}/cancel`, full amount) with
    /// `idempotency_key`, through the card stack (retried on 5xx and lost
    /// answers with the same key) and logged under `subject`.
    ///
    /// # Errors
    /// A description of why it was not canceled (the card company refused,
    /// the stack refused, or no answer).
    pub async fn cancel_at_card(
        self: &Arc<Self>,
        subject: &PaymentId,
        payment_key: &str,
        reason: &str,
        idempotency_key: &str,
    ) -> Result<CardPayment, String> {
        let req = CancelRequest {
            cancel_reason: reason.to_owned(),
            cancel_amount: None,
        };
        let site = CallSite {
            payment_id: subject.clone(),
            target: Target::CardApi,
            method: "POST",
            path: format!("/v1/payments/{payment_key}/cancel"),
            body: serde_json::to_value(&req).ok(),
            attempt_offset: 0,
            fusion: Fusion::default(),
        };
        let (card, key, pk) = (
            self.card.clone(),
            idempotency_key.to_owned(),
            payment_key.to_owned(),
        );
        let call = move || {
            let (card, req, key, pk) = (card.clone(), req.clone(), key.clone(), pk.clone());
            async move { card.cancel(&pk, &req, &key).await }
        };
        let policy = Policy {
            stack: self.card_stack.clone(),
            kind: RequestKind::Idempotent,
            max_attempts: None,
            classify: classify::repeatable,
            attempt_timeout: paygate_resilience::ATTEMPT_TIMEOUT_RETRYABLE,
        };
        self.through(
            policy,
            site,
            call,
            describe_card,
            Arc::new(AtomicU32::new(0)),
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// One page of the card company's transaction list (Toss
    /// `GET /v1/transactions`) through the list's own stack: breaker, bulkhead,
    /// rate limit and budgeted retries of 5xx/429/timeouts. Like every
    /// downstream call, each attempt is in the SQL log first (I3), under
    /// `subject` (the reconciliation run's `reconcile_<ULID>`); the
    /// `RESPONSE` row holds the page's size, not its transactions.
    ///
    /// # Errors
    /// A description of the failure after retries, or the stack's refusal;
    /// a `REQUEST` row that could not be written is an error and no call.
    pub async fn transactions_page(
        self: &Arc<Self>,
        subject: &PaymentId,
        query: TransactionsQuery,
    ) -> Result<Vec<Transaction>, String> {
        let path = format!(
            "/v1/transactions?startDate={}&endDate={}&startingAfter={}&limit={}",
            query.start_date,
            query.end_date,
            query.starting_after.as_deref().unwrap_or(""),
            query.limit.unwrap_or(100)
        );
        let site = CallSite {
            payment_id: subject.clone(),
            target: Target::CardApi,
            method: "GET",
            path,
            body: None,
            attempt_offset: 0,
            fusion: Fusion::default(),
        };
        let (card, query) = (self.card.clone(), Arc::new(query));
        let call = move || {
            let (card, query) = (card.clone(), query.clone());
            async move { card.transactions(&query).await }
        };
        let policy = Policy {
            stack: self.list_stack.clone(),
            kind: RequestKind::Idempotent,
            max_attempts: None,
            classify: classify::repeatable,
            attempt_timeout: paygate_resilience::ATTEMPT_TIMEOUT_RETRYABLE,
        };
        self.through(
            policy,
            site,
            call,
            describe_page,
            Arc::new(AtomicU32::new(0)),
        )
        .await
        .map_err(|e| e.to_string())
    }
}
