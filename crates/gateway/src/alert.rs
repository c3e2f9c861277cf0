//! Operator alerts raised by the gateway (an approval whose outcome could not
//! be settled, a ledger that refuses a payment).
//!
//! [`Alerter`] is the seam; [`LogAlerter`] writes each alert as an `ERROR`
//! tracing event naming the payment and keeps a count. Delivery to Discord
//! with an outbox comes with the `paygate-alert` crate (issue 5), behind
//! this same trait.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why an operator is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertReason {
    /// The card outcome could not be learned after lookups (`UNKNOWN`).
    OutcomeUnknown,
    /// The card company's answer does not match the payment (amount, key).
    CardMismatch,
    /// The ledger refused the payment (409 or 4xx): it will not retry.
    LedgerRefused,
    /// The state store failed after an approval; the record is left for the batch.
    StoreFailedAfterApproval,
}

impl AlertReason {
    /// Stable name, used as part of the dedup key.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::OutcomeUnknown => "outcome_unknown",
            Self::CardMismatch => "card_mismatch",
            Self::LedgerRefused => "ledger_refused",
            Self::StoreFailedAfterApproval => "store_failed_after_approval",
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

/// Where alerts go.
#[async_trait::async_trait]
pub trait Alerter: Send + Sync + 'static {
    /// Raises one alert; must not fail the caller's flow.
    async fn raise(&self, alert: Alert);
}

/// Alerts as `ERROR` log events, counted.
#[derive(Debug, Default)]
pub struct LogAlerter {
    raised: AtomicU64,
}

impl LogAlerter {
    /// Alerts raised so far.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Alerter for LogAlerter {
    async fn raise(&self, a: Alert) {
        self.raised.fetch_add(1, Ordering::SeqCst);
        tracing::error!(
            alert = a.reason.as_str(),
            payment_id = %a.payment_id,
            merchant_id = %a.merchant_id,
            order_id = %a.order_id,
            amount = a.amount,
            detail = %a.detail,
            "operator alert"
        );
    }
}
