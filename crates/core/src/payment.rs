//! The realtime payment state record (DESIGN.md §3) and its statuses.
//!
//! One [`PaymentRecord`] exists per payment from the moment paygate accepts a
//! confirm, before any downstream call, so that a crash at any later point
//! leaves something the batch and the reconciliation can find (invariant I1).

use serde::{Deserialize, Serialize};

use crate::ids::{MerchantId, OrderId, PaymentId};

/// What paygate knows of the card company's answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CardStatus {
    /// Written before the card call; the outcome is not known yet.
    Pending,
    /// The card company approved the payment (`DONE`).
    Done,
    /// The card company declined, or paygate refused to call it (see
    /// [`PaymentRecord::failure_code`]).
    Aborted,
    /// The outcome could not be learned; an operator was alerted, the batch
    /// and the reconciliation settle it.
    Unknown,
    /// The approval was cancelled (refunded).
    Canceled,
}

impl CardStatus {
    /// The stored spelling: `PENDING`, `DONE`, `ABORTED`, `UNKNOWN`, `CANCELED`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Done => "DONE",
            Self::Aborted => "ABORTED",
            Self::Unknown => "UNKNOWN",
            Self::Canceled => "CANCELED",
        }
    }

    /// Parses the stored spelling; an unrecognised value reads as `Unknown`,
    /// the state that sends a record to an operator rather than dropping it.
    pub fn from_stored(s: &str) -> Self {
        match s {
            "PENDING" => Self::Pending,
            "DONE" => Self::Done,
            "ABORTED" => Self::Aborted,
            "CANCELED" => Self::Canceled,
            _ => Self::Unknown,
        }
    }
}

/// The status a merchant sees (DESIGN.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentStatus {
    /// Approved by the card company.
    Done,
    /// Declined, or not attempted.
    Aborted,
    /// Outcome not known yet; poll `GET /v1/payments/{paymentId}`.
    Unknown,
    /// paygate is still working on it.
    InProgress,
    /// Approved, then cancelled.
    Canceled,
    /// Approved, then partly cancelled (a balance is left).
    PartialCanceled,
}

impl From<&CardStatus> for PaymentStatus {
    fn from(s: &CardStatus) -> Self {
        match s {
            CardStatus::Pending => Self::InProgress,
            CardStatus::Done => Self::Done,
            CardStatus::Aborted => Self::Aborted,
            CardStatus::Unknown => Self::Unknown,
            CardStatus::Canceled => Self::Canceled,
        }
    }
}

/// The three partitions of the state store (DESIGN.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Partition {
    /// Hot: in flight or needing work.
    Realtime,
    /// Paid and saved in the ledger.
    Completed,
    /// The card company said no.
    Unpaid,
}

impl Partition {
    /// Every partition, hot first (the order lookups search them in).
    pub const ALL: [Partition; 3] = [Self::Realtime, Self::Completed, Self::Unpaid];

    /// The table (SQL) or collection (MongoDB) name.
    pub fn table(&self) -> &'static str {
        match self {
            Self::Realtime => "realtime_payments",
            Self::Completed => "completed_payments",
            Self::Unpaid => "unpaid_payments",
        }
    }
}

/// `failure_code` values paygate sets itself when it made **no** card call;
/// a merchant retry of such a payment is allowed to try the card again.
pub mod failure_codes {
    /// The REQUEST row could not be written to the SQL log (invariant I3).
    pub const LOG_UNAVAILABLE: &str = "PAYGATE_LOG_UNAVAILABLE";
    /// The card API circuit breaker was open.
    pub const CIRCUIT_OPEN: &str = "PAYGATE_CIRCUIT_OPEN";
    /// The card company refused paygate's own credentials (401/403) on the
    /// first attempt: nothing was processed.
    pub const CARD_AUTH_FAILED: &str = "PAYGATE_CARD_AUTH_FAILED";
    /// The card API's bulkhead or outbound rate limit refused the call.
    pub const OVERLOADED: &str = "PAYGATE_OVERLOADED";
    /// The record was written but the SQL log holds no confirm `REQUEST`
    /// for it (a crash, or a failed log write followed by a failed
    /// `MarkAborted`): by I3 no confirm was sent.
    pub const NOT_SENT: &str = "PAYGATE_NOT_SENT";
    /// The merchant was already answered 503 ("nothing was charged") before
    /// the confirm reached the point where the card may be called (its
    /// answer deadline or the shutdown deadline came first), so the saga
    /// made no card call to keep that answer true (invariant I4).
    pub const ANSWER_TIMED_OUT: &str = "PAYGATE_ANSWER_TIMED_OUT";
    /// The order's stock hold had expired (or been released) and its units
    /// were gone, so no card call was made (issue 17; the merchant got 409
    /// `HOLD_EXPIRED`). A retry reopens it when stock is back.
    pub const HOLD_EXPIRED: &str = "PAYGATE_HOLD_EXPIRED";
    /// The inventory store could not move the order's hold to `during`, so
    /// no card call was made (503).
    pub const INVENTORY_UNAVAILABLE: &str = "PAYGATE_INVENTORY_UNAVAILABLE";
    /// The card company's confirm window closed and neither its lookup nor
    /// its transaction list over the window shows the payment: nothing was
    /// charged. Not a no-call code (a confirm was sent, so a retry is not
    /// reopened: the card company would refuse it), but as final for the
    /// merchant as a decline.
    pub const CONFIRM_EXPIRED: &str = "PAYGATE_CONFIRM_EXPIRED";

    /// True when the code means no card call was made.
    pub fn is_no_call(code: &str) -> bool {
        code == LOG_UNAVAILABLE
            || code == CIRCUIT_OPEN
            || code == CARD_AUTH_FAILED
            || code == OVERLOADED
            || code == NOT_SENT
            || code == ANSWER_TIMED_OUT
            || code == HOLD_EXPIRED
            || code == INVENTORY_UNAVAILABLE
    }
}

/// One payment's realtime state record. Amounts are integers in minor units
/// of `currency` (KRW has none, so 15000 means ₩15,000); timestamps are epoch
/// milliseconds (UTC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentRecord {
    /// Primary key, `pay_` + ULID; also the downstream idempotency key.
    pub payment_id: PaymentId,
    /// The merchant that owns the payment.
    pub merchant_id: MerchantId,
    /// The merchant's order id, unique per merchant.
    pub order_id: OrderId,
    /// The card company's key for the payment.
    pub payment_key: String,
    /// Amount in minor units, >= 1.
    pub amount: i64,
    /// ISO 4217 currency code (`KRW`).
    pub currency: String,
    /// The card company approved it.
    pub is_paid: bool,
    /// The ledger recorded it.
    pub is_saved: bool,
    /// What paygate knows of the card company's answer.
    pub card_status: CardStatus,
    /// The card company's `approvedAt`, RFC 3339 as received.
    pub approved_at: Option<String>,
    /// Ledger tries so far (the synchronous one plus async retries).
    pub save_attempts: i64,
    /// Ledger tries by the batch sweep.
    pub batch_attempts: i64,
    /// The card company's failure code for a decline, or one of
    /// [`failure_codes`] when no card call was made.
    pub failure_code: Option<String>,
    /// Last error, for operators (never shown to a merchant).
    pub last_error: Option<String>,
    /// Hex SHA-256 of the confirm body, for idempotency.
    pub request_fingerprint: String,
    /// The merchant's `Idempotency-Key` header, when one was sent.
    pub idempotency_key: Option<String>,
    /// Created, epoch ms.
    pub created_at: i64,
    /// Last changed, epoch ms, by the writer's clock: for ages and for
    /// operators, never for a guard (clocks of replicas differ).
    pub updated_at: i64,
    /// +1 on every applied transition and every move between partitions
    /// (DESIGN.md §1): the value a write that depends on an earlier read
    /// is guarded on. A new record is version 0.
    pub version: i64,
}

impl PaymentRecord {
    /// A new `PENDING` record, written before any downstream call.
    #[allow(clippy::too_many_arguments)]
    pub fn new_pending(
        merchant_id: MerchantId,
        order_id: OrderId,
        payment_key: String,
        amount: i64,
        currency: String,
        request_fingerprint: String,
        idempotency_key: Option<String>,
        now_ms: i64,
    ) -> Self {
        Self {
            payment_id: PaymentId::generate(),
            merchant_id,
            order_id,
            payment_key,
            amount,
            currency,
            is_paid: false,
            is_saved: false,
            card_status: CardStatus::Pending,
            approved_at: None,
            save_attempts: 0,
            batch_attempts: 0,
            failure_code: None,
            last_error: None,
            request_fingerprint,
            idempotency_key,
            created_at: now_ms,
            updated_at: now_ms,
            version: 0,
        }
    }

    /// The status a merchant sees.
    pub fn status(&self) -> PaymentStatus {
        PaymentStatus::from(&self.card_status)
    }
}
