//! The events a payment's applied transitions leave (DESIGN.md §3,
//! "Events"): what merchant webhooks deliver and `GET /v1/events` lists.
//!
//! An event is written by the store **in the same write as its
//! transition** (one SQL transaction; on MongoDB in the same document
//! update), so a transition that applied always has its event and one that
//! did not apply never has one, whichever replica wrote it and whenever it
//! died. Which transitions leave one is defined once, here
//! ([`Transition::event_type`], [`CancelTransition::event_type`]); every
//! backend asks the same question.
//!
//! The event id is derived from what the event is about, not drawn at
//! random: `evt_<payment ulid>_v<version>` for a payment's transition (a
//! version is applied once) and `evt_<payment ulid>_c<n>` for cancel `n`
//! (a cancel is done once). A re-relayed or re-sent event therefore keeps
//! its id, and a store can insert it idempotently.

use paygate_core::time::rfc3339_from_ms;
use paygate_core::{MerchantId, PaymentId, PaymentRecord, PaymentStatus};
use serde_json::json;

use crate::cancels::{CancelRecord, CancelStatus, CancelTransition};
use crate::payment::Transition;

/// What an event tells a merchant (the `type` of DESIGN.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// The card company approved the payment (`DONE`).
    Approved,
    /// The card company declined it, or paygate settled it as not charged
    /// (`ABORTED`; the payment object's `failureCode` says which).
    Declined,
    /// The confirm could not learn the outcome (the merchant was answered
    /// 202); a later `approved` or `declined` settles it.
    Unknown,
    /// A cancel was done and nothing is left to cancel.
    Canceled,
    /// A cancel was done and a balance is left.
    PartiallyCanceled,
}

impl EventType {
    /// `payment.approved`, `payment.declined`, `payment.unknown`,
    /// `payment.canceled` or `payment.partially_canceled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approved => "payment.approved",
            Self::Declined => "payment.declined",
            Self::Unknown => "payment.unknown",
            Self::Canceled => "payment.canceled",
            Self::PartiallyCanceled => "payment.partially_canceled",
        }
    }

    /// Reads the stored form; `None` for any other text.
    pub fn from_stored(s: &str) -> Option<Self> {
        [
            Self::Approved,
            Self::Declined,
            Self::Unknown,
            Self::Canceled,
            Self::PartiallyCanceled,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// One event, as stored. Times epoch ms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `evt_<payment ulid>_v<version>` or `evt_<payment ulid>_c<n>`.
    pub event_id: String,
    /// The payment's merchant.
    pub merchant_id: MerchantId,
    /// The payment.
    pub payment_id: PaymentId,
    /// What happened.
    pub event_type: EventType,
    /// The payment's version at the event: after the transition for a
    /// payment's event; the paid record's version when the cancel was
    /// marked done, for a cancel's (never below its approval's).
    pub version: i64,
    /// The cancel's number for a cancel's event, 0 for a payment's. A
    /// payment's events are ordered by `(version, cancel_n)`: every cancel
    /// follows the approval it cancels.
    pub cancel_n: i64,
    /// The payment object as a merchant's `GET` would have shown it at the
    /// event (JSON text, the shape of DESIGN.md §5's payment answer, plus
    /// `failureCode` and, for a cancel, `cancel`).
    pub payload: String,
    /// The writer's clock at the transition (for people only; never
    /// ordered by).
    pub created_at: i64,
}

/// `pay_<ulid>` without its prefix, for event ids.
fn stem(payment_id: &PaymentId) -> &str {
    let id = payment_id.as_str();
    id.strip_prefix("pay_").unwrap_or(id)
}

impl Transition {
    /// The event the transition leaves when it applies: approval, decline
    /// (the card's, or a no-call settlement) and the confirm's unknown
    /// outcome. The rest (a ledger save, a fence before a call, a recheck
    /// that learned nothing, a reopen) change nothing a merchant is told.
    pub fn event_type(&self) -> Option<EventType> {
        match self {
            Self::MarkPaid { .. } => Some(EventType::Approved),
            Self::MarkAborted { .. } | Self::FileNotSent { .. } => Some(EventType::Declined),
            Self::MarkUnknown { .. } => Some(EventType::Unknown),
            Self::CheckedUnknown { .. }
            | Self::MarkSaved
            | Self::SaveFailed { .. }
            | Self::BatchSaveFailed { .. }
            | Self::Reopen { .. }
            | Self::MarkSending { .. }
            | Self::MarkResending { .. } => None,
        }
    }
}

impl CancelTransition {
    /// Whether the transition leaves an event when it applies: only a
    /// cancel done at the card company ([`CancelTransition::MarkDone`]).
    pub fn leaves_event(&self) -> bool {
        matches!(self, Self::MarkDone { .. })
    }
}

/// The payment object of DESIGN.md §5 for `r`, with `failureCode`.
fn payment_object(r: &PaymentRecord) -> serde_json::Value {
    json!({
        "paymentId": r.payment_id.as_str(),
        "orderId": r.order_id.as_str(),
        "paymentKey": r.payment_key,
        "amount": r.amount,
        "currency": r.currency,
        "status": r.status(),
        "balanceAmount": r.amount,
        "saved": r.is_saved,
        "approvedAt": r.approved_at,
        "failureCode": r.failure_code,
        "requestedAt": rfc3339_from_ms(r.created_at),
    })
}

/// The event `t` leaves on `after` (the record as the transition left it),
/// or `None` when `t` leaves none.
pub fn payment_event(t: &Transition, after: &PaymentRecord, now_ms: i64) -> Option<Event> {
    let event_type = t.event_type()?;
    Some(Event {
        event_id: format!("evt_{}_v{}", stem(&after.payment_id), after.version),
        merchant_id: after.merchant_id.clone(),
        payment_id: after.payment_id.clone(),
        event_type,
        version: after.version,
        cancel_n: 0,
        payload: payment_object(after).to_string(),
        created_at: now_ms,
    })
}

/// The event of cancel `done` of `payment` (the paid record it was made
/// against) becoming `DONE`; `done_before` is the sum of the payment's
/// other done cancels (minor units). `None` unless `done` is done.
pub fn cancel_event(
    payment: &PaymentRecord,
    done: &CancelRecord,
    done_before: i64,
    now_ms: i64,
) -> Option<Event> {
    if done.status != CancelStatus::Done {
        return None;
    }
    let balance = payment.amount - done_before - done.amount;
    let (event_type, status) = if balance <= 0 {
        (EventType::Canceled, PaymentStatus::Canceled)
    } else {
        (EventType::PartiallyCanceled, PaymentStatus::PartialCanceled)
    };
    let mut object = payment_object(payment);
    object["status"] = json!(status);
    object["balanceAmount"] = json!(balance.max(0));
    object["cancel"] = json!({
        "cancelAmount": done.amount,
        "cancelReason": done.reason,
        "canceledAt": done.canceled_at,
    });
    Some(Event {
        event_id: format!("evt_{}_c{}", stem(&payment.payment_id), done.n),
        merchant_id: payment.merchant_id.clone(),
        payment_id: payment.payment_id.clone(),
        event_type,
        version: payment.version,
        cancel_n: done.n,
        payload: object.to_string(),
        created_at: now_ms,
    })
}
