//! Wire types of the Toss Payments v1 API, as far as paygate uses them.
//! Unknown fields are ignored on input (serde's default).

use serde::{Deserialize, Serialize};
use serde_json::Number;

use crate::amount::{to_major, to_minor, AmountError};

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

/// One entry of `cancels[]`. Amounts are in minor units of the payment's
/// currency; a `Cancel` is read and written only as part of its
/// [`CardPayment`], whose `currency` converts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancel {
    /// Amount cancelled, minor units.
    pub cancel_amount: i64,
    /// Reason given.
    pub cancel_reason: String,
    /// When, RFC 3339.
    pub canceled_at: String,
    /// The cancel's transaction key.
    pub transaction_key: Option<String>,
}

/// The Toss Payments `Payment` object (the fields paygate uses), answered by
/// Toss Payments v1 `POST /v1/payments/confirm`,
/// `GET /v1/payments/orders/{orderId}` and
/// `POST /v1/payments/{paymentKey}/cancel`.
///
/// Amounts are `i64` in **minor units** of `currency` (KRW and JPY have
/// none, other currencies two decimals: see [`minor_unit_exponent`](crate::minor_unit_exponent)). Toss
/// writes them in major units (`"totalAmount": 726.24` for USD); decoding
/// converts with the object's own `currency` (KRW when absent), and encoding
/// writes Toss's form back, so a decimal amount is never a decode error. An
/// amount finer than the currency's minor unit is one ([`AmountError`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPayment", into = "RawPayment")]
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
    pub balance_amount: Option<i64>,
    /// When approved, RFC 3339 with offset (`2024-02-13T12:18:14+09:00`).
    pub approved_at: Option<String>,
    /// When requested, RFC 3339.
    pub requested_at: Option<String>,
    /// Payment method (`카드` for card).
    pub method: Option<String>,
    /// ISO 4217 currency.
    pub currency: Option<String>,
    /// Why it failed, when it did.
    pub failure: Option<Failure>,
    /// Cancels so far.
    pub cancels: Option<Vec<Cancel>>,
}

/// The currency an object's amounts are in: its `currency`, KRW when absent
/// (Toss's only currency for domestic cards).
fn currency_of(currency: Option<&str>) -> &str {
    currency.unwrap_or("KRW")
}

/// `Payment` as Toss writes it: amounts in major units.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPayment {
    payment_key: String,
    order_id: String,
    status: String,
    total_amount: Number,
    #[serde(default)]
    balance_amount: Option<Number>,
    #[serde(default)]
    approved_at: Option<String>,
    #[serde(default)]
    requested_at: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    failure: Option<Failure>,
    #[serde(default)]
    cancels: Option<Vec<RawCancel>>,
}

/// One `cancels[]` entry as Toss writes it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCancel {
    cancel_amount: Number,
    cancel_reason: String,
    canceled_at: String,
    #[serde(default)]
    transaction_key: Option<String>,
}

impl TryFrom<RawPayment> for CardPayment {
    type Error = AmountError;

    fn try_from(raw: RawPayment) -> Result<Self, Self::Error> {
        let cur = currency_of(raw.currency.as_deref()).to_owned();
        let cancels = raw
            .cancels
            .map(|cs| {
                cs.into_iter()
                    .map(|c| {
                        Ok(Cancel {
                            cancel_amount: to_minor(&c.cancel_amount, &cur)?,
                            cancel_reason: c.cancel_reason,
                            canceled_at: c.canceled_at,
                            transaction_key: c.transaction_key,
                        })
                    })
                    .collect::<Result<Vec<_>, AmountError>>()
            })
            .transpose()?;
        Ok(Self {
            total_amount: to_minor(&raw.total_amount, &cur)?,
            balance_amount: raw.balance_amount.map(|b| to_minor(&b, &cur)).transpose()?,
            payment_key: raw.payment_key,
            order_id: raw.order_id,
            status: raw.status,
            approved_at: raw.approved_at,
            requested_at: raw.requested_at,
            method: raw.method,
            currency: raw.currency,
            failure: raw.failure,
            cancels,
        })
    }
}

impl From<CardPayment> for RawPayment {
    fn from(p: CardPayment) -> Self {
        let cur = currency_of(p.currency.as_deref()).to_owned();
        Self {
            total_amount: to_major(p.total_amount, &cur),
            balance_amount: p.balance_amount.map(|b| to_major(b, &cur)),
            cancels: p.cancels.map(|cs| {
                cs.into_iter()
                    .map(|c| RawCancel {
                        cancel_amount: to_major(c.cancel_amount, &cur),
                        cancel_reason: c.cancel_reason,
                        canceled_at: c.canceled_at,
                        transaction_key: c.transaction_key,
                    })
                    .collect()
            }),
            payment_key: p.payment_key,
            order_id: p.order_id,
            status: p.status,
            approved_at: p.approved_at,
            requested_at: p.requested_at,
            method: p.method,
            currency: p.currency,
            failure: p.failure,
        }
    }
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

/// One entry of the transaction list of Toss Payments v1
/// `GET /v1/transactions`. `amount` is in minor units of `currency`,
/// converted like [`CardPayment`]'s amounts (Toss writes major units).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTransaction", into = "RawTransaction")]
pub struct Transaction {
    /// Unique, ordered key of the transaction.
    pub transaction_key: String,
    /// The payment's key.
    pub payment_key: String,
    /// The merchant's order id.
    pub order_id: String,
    /// Payment method.
    pub method: Option<String>,
    /// Payment status after this transaction.
    pub status: String,
    /// When, RFC 3339.
    pub transaction_at: String,
    /// ISO 4217 currency.
    pub currency: Option<String>,
    /// Amount, minor units.
    pub amount: i64,
}

/// A transaction as Toss writes it: `amount` in major units.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTransaction {
    transaction_key: String,
    payment_key: String,
    order_id: String,
    #[serde(default)]
    method: Option<String>,
    status: String,
    transaction_at: String,
    #[serde(default)]
    currency: Option<String>,
    amount: Number,
}

impl TryFrom<RawTransaction> for Transaction {
    type Error = AmountError;

    fn try_from(raw: RawTransaction) -> Result<Self, Self::Error> {
        Ok(Self {
            amount: to_minor(&raw.amount, currency_of(raw.currency.as_deref()))?,
            transaction_key: raw.transaction_key,
            payment_key: raw.payment_key,
            order_id: raw.order_id,
            method: raw.method,
            status: raw.status,
            transaction_at: raw.transaction_at,
            currency: raw.currency,
        })
    }
}

impl From<Transaction> for RawTransaction {
    fn from(t: Transaction) -> Self {
        Self {
            amount: to_major(t.amount, currency_of(t.currency.as_deref())),
            transaction_key: t.transaction_key,
            payment_key: t.payment_key,
            order_id: t.order_id,
            method: t.method,
            status: t.status,
            transaction_at: t.transaction_at,
            currency: t.currency,
        }
    }
}
