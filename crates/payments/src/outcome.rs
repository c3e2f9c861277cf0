//! What a confirm or a settling lookup ended in, before anything turns it
//! into an HTTP answer or a batch count. No HTTP types here: the gateway maps
//! [`ConfirmOutcome`] to status codes (guarding I4: every answer is true).

use paygate_card_api::CardPayment;
use paygate_core::{MerchantId, OrderId, PaymentId, PaymentRecord};

/// A validated confirm request from an authenticated merchant.
#[derive(Clone, Debug)]
pub struct ConfirmInput {
    /// The authenticated merchant.
    pub merchant_id: MerchantId,
    /// The card company's payment key.
    pub payment_key: String,
    /// The merchant's order id.
    pub order_id: OrderId,
    /// Amount, minor units, >= 1.
    pub amount: i64,
    /// The merchant's `Idempotency-Key` header (unquoted), if sent.
    pub idempotency_key: Option<String>,
}

/// Which claim a different body collided with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// The `Idempotency-Key` was used for another body.
    IdempotencyKey,
    /// The orderId was used for another body.
    OrderId,
}

/// How a confirm ended, before it becomes an HTTP answer.
#[derive(Clone, Debug)]
pub enum ConfirmOutcome {
    /// 200: approved (`is_saved` says whether the ledger has it yet).
    Approved(PaymentRecord),
    /// 402: declined by the card company, with its code and message.
    Declined {
        /// The record (`ABORTED`).
        record: PaymentRecord,
        /// The card company's code.
        code: String,
        /// The card company's message.
        message: String,
    },
    /// 202: outcome unknown; an operator was alerted.
    Unknown(PaymentRecord),
    /// 409: the same confirm is still being processed.
    InFlight(PaymentRecord),
    /// 422: the key or the order was used with a different body.
    Reused {
        /// The payment holding the claim.
        payment_id: PaymentId,
        /// Which claim.
        reuse: Reuse,
    },
    /// 503: paygate could not safely proceed; no card call was made. With a
    /// `payment_id`, nothing was charged for that payment (the order's only
    /// one); without one, paygate could not read the order, and the answer
    /// promises only that this request charged nothing.
    Unavailable {
        /// Safe, merchant-facing detail.
        detail: &'static str,
        /// The payment, when a record exists.
        payment_id: Option<PaymentId>,
        /// Seconds after which a retry may succeed (an open breaker's wait).
        retry_after_s: Option<u64>,
    },
}

/// What a lookup settled (see [`crate::Saga::settle_unknown`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// The card company approved it; the record is now paid.
    Paid,
    /// The card company declined it; the record is now `ABORTED`.
    Declined,
    /// Still not known.
    Unknown(String),
    /// The card company's answer does not match the payment.
    Mismatch(String),
}

/// What the card company's answers settled for one payment.
pub(crate) enum CardVerdict {
    /// Approved, and the answer matches the payment.
    Approved(Box<CardPayment>),
    /// Declined (or aborted/expired at the card company).
    Declined { code: String, message: String },
    /// No card call was made (log down, breaker open, bulkhead full, our
    /// credentials refused on the first attempt).
    NoCall {
        code: &'static str,
        detail: String,
        retry_after_s: Option<u64>,
    },
    /// No answer settled it.
    Unsettled { detail: String },
    /// The card company's answer does not match the payment.
    Mismatch { detail: String },
}
