//! What a confirm or a settling lookup ended in, before anything turns it
//! into an HTTP answer or a batch count. No HTTP types here: the gateway maps
//! [`ConfirmOutcome`] to status codes (guarding I4: every answer is true).

use std::sync::{Arc, Mutex, MutexGuard};

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

/// Which card-account claim refused a confirm before any card call
/// (DESIGN.md I2; the holder is not named: it may be another merchant's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Another merchant on the same card account holds this orderId.
    OrderIdInUse,
    /// The paymentKey is already claimed by another order (of this merchant
    /// or of another merchant on the card account).
    PaymentKeyReused,
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
    /// 422: refused by a card-account claim; nothing was written and no
    /// card call was made.
    Refused(Refusal),
    /// 409 `HOLD_EXPIRED`: the order's stock hold expired and its units are
    /// gone; no card call was made (the record is a no-call abort, so a
    /// retry with the same body may go through once stock is back).
    HoldExpired {
        /// The payment (`ABORTED`, `PAYGATE_HOLD_EXPIRED`).
        payment_id: PaymentId,
        /// The SKUs that are short.
        short: Vec<String>,
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

/// Where one confirm stands, as far as an early answer is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TicketState {
    /// No record this confirm acts on is durable yet: no card call was or
    /// will be made without first moving to [`TicketState::Durable`].
    Starting,
    /// The record is written and the card may be called from now on; an
    /// early answer is 202 with this payment (`IN_PROGRESS`), never 503.
    Durable(Box<PaymentRecord>),
    /// The merchant was answered 503 before the confirm became durable;
    /// the saga makes no card call for it.
    GaveUp,
}

/// What an early answer may say (see [`ConfirmTicket::give_up`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EarlyAnswer {
    /// The card may be in flight: answer 202 with this payment.
    InProgress(Box<PaymentRecord>),
    /// No card call was or will be made for this request: 503 is true.
    NothingCharged,
}

/// The one place where a confirm's HTTP handler and its saga task agree on
/// what an answer given *before* the saga ends may say (invariant I4).
///
/// The handler gives up waiting at its deadline (or the shutdown deadline)
/// with [`ConfirmTicket::give_up`]; the saga asks [`ConfirmTicket::make_durable`]
/// before the card `REQUEST` row is written. Both check and set the state
/// under one mutex, so exactly one of these holds: the handler answered 503
/// and the saga makes no card call, or the card may be called and the
/// handler's early answer is 202 with the payment.
#[derive(Clone, Debug)]
pub struct ConfirmTicket(Arc<Mutex<TicketState>>);

impl Default for ConfirmTicket {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfirmTicket {
    /// A ticket in [`TicketState::Starting`].
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(TicketState::Starting)))
    }

    fn lock(&self) -> MutexGuard<'_, TicketState> {
        // A panic elsewhere cannot leave the enum half-written; go on.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state now.
    pub fn state(&self) -> TicketState {
        self.lock().clone()
    }

    /// Saga side: the record is durable and the card may be called next.
    /// `false` when the handler already gave up (answered 503): then the
    /// card must not be called. Called again, it updates the record.
    pub fn make_durable(&self, record: &PaymentRecord) -> bool {
        let mut state = self.lock();
        if *state == TicketState::GaveUp {
            return false;
        }
        *state = TicketState::Durable(Box::new(record.clone()));
        true
    }

    /// Handler side, at its deadline: what an answer given now may say.
    /// From `Starting` the ticket moves to `GaveUp` (the saga will make no
    /// card call); once `GaveUp`, it stays so.
    pub fn give_up(&self) -> EarlyAnswer {
        let mut state = self.lock();
        match &*state {
            TicketState::Durable(record) => EarlyAnswer::InProgress(record.clone()),
            TicketState::Starting | TicketState::GaveUp => {
                *state = TicketState::GaveUp;
                EarlyAnswer::NothingCharged
            }
        }
    }
}

/// What a lookup settled (see [`crate::Saga::settle_unknown`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// The card company approved it; the record is now paid.
    Paid,
    /// The card company declined it; the record is now `ABORTED`.
    Declined,
    /// Still not known, and an operator is told: the card company could
    /// not be reached, or its answers could not be recorded. `version`:
    /// the record's version the verdict was judged at (a check counts
    /// itself on it).
    Unknown {
        /// Why, for the operator.
        detail: String,
        /// The version judged.
        version: i64,
    },
    /// Not known yet, and nobody to page: the card company has no payment
    /// for the order and its confirm window is closing, or another actor
    /// is acting on it. The recheck schedule brings it back.
    Waiting {
        /// Why, for the record.
        detail: String,
        /// The version judged.
        version: i64,
    },
    /// The card company's answer does not match the payment.
    Mismatch(String),
    /// The card company shows the payment canceled (fully or in part): a
    /// mismatch unless the record, read again, is paid (it was approved,
    /// and refunded, after the read the settlement started from).
    Canceled(String),
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
    /// The last lookup answered 404: the card company has no payment for
    /// the order (see [`crate::expiry`] for what a check does then).
    Absent { detail: String },
    /// The card company's answer does not match the payment.
    Mismatch {
        detail: String,
        /// The card company shows the payment canceled (fully or in part):
        /// it was approved there first, so a record read before it was
        /// approved and refunded is no mismatch once read again paid.
        canceled: bool,
    },
}
