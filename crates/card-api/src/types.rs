//! Wire types of the Toss Payments v1 API, as far as paygate uses them.
//! Unknown fields are ignored on input (serde's default).

use serde::{Deserialize, Serialize};

/// Path of the confirm call.
pub const CONFIRM_PATH: &str = "/v1/payments/confirm";

/// Body of `POST /v1/payments/confirm`. `amount` is in minor units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfirmRequest {
    /// The card company's key for the payment session.
    pub payment_key: String,
    /// The merchant's order id.
    pub order_id: String,
    /// Amount in minor units.
    pub amount: i64,
}

/// Body of `POST /v1/payments/{paymentKey}/cancel`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    /// Why the payment is cancelled (shown to the customer by the card company).
    pub cancel_reason: String,
    /// Partial cancel amount in minor units; `None` cancels the whole balance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_amount: Option<i64>,
}

/// `failure` of a Payment object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Error code.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

/// One entry of `cancels[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cancel {
    /// Amount cancelled, minor units.
    pub cancel_amount: i64,
    /// Reason given.
    pub cancel_reason: String,
    /// When, RFC 3339.
    pub canceled_at: String,
    /// The cancel's transaction key.
    #[serde(default)]
    pub transaction_key: Option<String>,
}

/// The Toss Payments `Payment` object (the fields paygate uses).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CardPayment {
    /// The card company's key.
    pub payment_key: String,
    /// The merchant's order id.
    pub order_id: String,
    /// `READY`, `IN_PROGRESS`, `WAITING_FOR_DEPOSIT`, `DONE`, `CANCELED`,
    /// `PARTIAL_CANCELED`, `ABORTED`, `EXPIRED`.
    pub status: String,
    /// Total amount, minor units.
    pub total_amount: i64,
    /// Amount left after cancels, minor units.
    #[serde(default)]
    pub balance_amount: Option<i64>,
    /// When approved, RFC 3339 with offset (`2024-02-13T12:18:14+09:00`).
    #[serde(default)]
    pub approved_at: Option<String>,
    /// When requested, RFC 3339.
    #[serde(default)]
    pub requested_at: Option<String>,
    /// Payment method (`카드` for card).
    #[serde(default)]
    pub method: Option<String>,
    /// ISO 4217 currency.
    #[serde(default)]
    pub currency: Option<String>,
    /// Why it failed, when it did.
    #[serde(default)]
    pub failure: Option<Failure>,
    /// Cancels so far.
    #[serde(default)]
    pub cancels: Option<Vec<Cancel>>,
}

impl CardPayment {
    /// True when the card company approved it (`DONE`).
    pub fn is_approved(&self) -> bool {
        self.status == "DONE"
    }
}

/// The error body of every Toss Payments v1 error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Error code (an open set).
    pub code: String,
    /// Message.
    pub message: String,
}

/// Query of `GET /v1/transactions`. Dates are ISO 8601 local date-times
/// (`2024-01-01T00:00:00`) as Toss takes them; `limit` is at most 5000.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionsQuery {
    /// Window start (inclusive).
    pub start_date: String,
    /// Window end (inclusive).
    pub end_date: String,
    /// Cursor: the last `transactionKey` of the previous page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starting_after: Option<String>,
    /// Page size, 1-5000 (Toss default 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// One entry of the transaction list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transaction {
    /// Unique, ordered key of the transaction.
    pub transaction_key: String,
    /// The payment's key.
    pub payment_key: String,
    /// The merchant's order id.
    pub order_id: String,
    /// Payment method.
    #[serde(default)]
    pub method: Option<String>,
    /// Payment status after this transaction.
    pub status: String,
    /// When, RFC 3339.
    pub transaction_at: String,
    /// ISO 4217 currency.
    #[serde(default)]
    pub currency: Option<String>,
    /// Amount, minor units.
    pub amount: i64,
}
