//! Guards I1 and I2 for refunds: the merchant's cancels of an approved
//! payment (DESIGN.md §5, `POST /v1/payments/{paymentId}/cancel`), one
//! guarded entity per cancel, `payment_cancels` keyed by `(payment_id, n)`.
//!
//! - **Claiming is atomic with the balance check.** [`CancelStore::claim_cancel`]
//!   reads the payment's cancels, decides ([`decide_claim`]: replay of the
//!   same `Idempotency-Key`, another cancel still in flight, amount over the
//!   balance, or a new cancel numbered `max(n) + 1`) and inserts that number
//!   only if it is still free. The unique `(payment_id, n)` is the
//!   serialization point: any cancel claimed since the read takes the same
//!   number, so the insert fails and the claim reads again. Statuses only
//!   ever go from in flight (`PENDING`, `UNKNOWN`) to final (`DONE`,
//!   `FAILED`), and a read that sees one in flight claims nothing, so no
//!   change since the read can make an inserted claim wrong. With at most
//!   one cancel in flight per payment, the sum of the cancels that may have
//!   reached the card company never exceeds the approved amount.
//! - **Every change is a guarded transition** ([`CancelTransition`]) on the
//!   state it expects, `Ok(true)` when it applied.
//! - The merchant's `Idempotency-Key` is scoped to the payment; a cancel
//!   that ended with no card call (no log row, breaker open) gives its key
//!   back ([`CancelTransition::MarkFailed`] with `release_key`), so the
//!   merchant's retry with the same key is a new cancel, not a replay of
//!   "nothing was canceled".

use futures_util::stream::BoxStream;
use paygate_core::{MerchantId, PaymentId};

use crate::rules::{Change, Cond, Rule, Stored, Value};
use crate::StoreError;

/// How many times a claim reads again after losing the race for its number.
pub const CLAIM_ATTEMPTS: usize = 16;

/// Where one cancel stands at the card company.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CancelStatus {
    /// Claimed; the card call is about to be made or is in flight.
    Pending,
    /// The card company canceled it (`cancels[]` holds it).
    Done,
    /// Not canceled: the card company refused, or no call was made.
    Failed,
    /// The answer was lost; the batch looks it up.
    Unknown,
}

impl CancelStatus {
    /// `PENDING`, `DONE`, `FAILED` or `UNKNOWN` (the stored form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Done => "DONE",
            Self::Failed => "FAILED",
            Self::Unknown => "UNKNOWN",
        }
    }

    /// Reads the stored form.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for any other text.
    pub fn from_stored(s: &str) -> Result<Self, StoreError> {
        match s {
            "PENDING" => Ok(Self::Pending),
            "DONE" => Ok(Self::Done),
            "FAILED" => Ok(Self::Failed),
            "UNKNOWN" => Ok(Self::Unknown),
            other => Err(StoreError::Corrupt(format!("cancel status {other}"))),
        }
    }

    /// True while the card company may still act on it (`PENDING`, `UNKNOWN`).
    pub fn in_flight(self) -> bool {
        matches!(self, Self::Pending | Self::Unknown)
    }

    /// True when its amount counts against the balance (in flight or done).
    pub fn reserves(self) -> bool {
        self != Self::Failed
    }
}

/// One cancel (refund) of a payment. Amounts in minor units; times epoch ms
/// unless said otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelRecord {
    /// The payment canceled.
    pub payment_id: PaymentId,
    /// The cancel's number within the payment, from 1. The card call's
    /// `Idempotency-Key` is `<payment_id>:cancel:<n>`.
    pub n: i64,
    /// The payment's merchant.
    pub merchant_id: MerchantId,
    /// Amount canceled, minor units (>= 1).
    pub amount: i64,
    /// The merchant's `cancelReason`.
    pub reason: String,
    /// The merchant's `Idempotency-Key`, while it is claimed.
    pub idempotency_key: Option<String>,
    /// Hash of the cancel request (reason and requested amount).
    pub request_fingerprint: String,
    /// Where it stands at the card company.
    pub status: CancelStatus,
    /// The ledger holds its reversal.
    pub is_saved: bool,
    /// Reversal tries (sync + async).
    pub save_attempts: i64,
    /// Batch tries (reversal or lookup).
    pub batch_attempts: i64,
    /// Why it failed (the card company's code, or a no-call code).
    pub failure_code: Option<String>,
    /// Detail for operators.
    pub last_error: Option<String>,
    /// The card company's `canceledAt`, RFC 3339, once done.
    pub canceled_at: Option<String>,
    /// Claimed at.
    pub created_at: i64,
    /// Last transition at (the writer's clock: for ages only).
    pub updated_at: i64,
    /// +1 on every applied transition (DESIGN.md §1). A new cancel is
    /// version 0; guards that depend on an earlier read compare it.
    pub version: i64,
}

impl CancelRecord {
    /// The card call's and the ledger reversal's `Idempotency-Key`:
    /// `<payment_id>:cancel:<n>` (DESIGN.md §7).
    pub fn idempotency_key_downstream(&self) -> String {
        format!("{}:cancel:{}", self.payment_id, self.n)
    }
}

/// A cancel to claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelDraft {
    /// The payment to cancel (paid).
    pub payment_id: PaymentId,
    /// Its merchant.
    pub merchant_id: MerchantId,
    /// The payment's approved amount, minor units.
    pub total_amount: i64,
    /// The amount asked for, minor units; `None` cancels the whole balance.
    pub amount: Option<i64>,
    /// The merchant's `cancelReason`.
    pub reason: String,
    /// The merchant's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// Hash of the request, compared on a replay.
    pub request_fingerprint: String,
    /// Now, epoch ms.
    pub now: i64,
}

/// Result of [`CancelStore::claim_cancel`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelClaim {
    /// The cancel was claimed as number `n`, `PENDING`; make the card call.
    Claimed(CancelRecord),
    /// A cancel with this `Idempotency-Key` exists (compare fingerprints).
    Existing(CancelRecord),
    /// Another cancel of this payment is still in flight.
    InProgress(CancelRecord),
    /// The amount asked for is above what is left; nothing was claimed.
    ExceedsBalance {
        /// What is left to cancel, minor units.
        balance: i64,
    },
}

/// What [`decide_claim`] says to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimDecision {
    /// Answer with this, claim nothing.
    Answer(CancelClaim),
    /// Insert this record if its `(payment_id, n)` is still free.
    Insert(CancelRecord),
}

/// What is left to cancel of `total` after `cancels` (in flight ones
/// reserved), minor units.
pub fn balance(total: i64, cancels: &[CancelRecord]) -> i64 {
    total
        - cancels
            .iter()
            .filter(|c| c.status.reserves())
            .map(|c| c.amount)
            .sum::<i64>()
}

/// The claim rule, shared by every backend: on the payment's current
/// `cancels`, a draft is a replay (same key), waits for a cancel in flight,
/// exceeds the balance, or becomes cancel number `max(n) + 1`.
pub fn decide_claim(draft: &CancelDraft, cancels: &[CancelRecord]) -> ClaimDecision {
    if let Some(key) = draft.idempotency_key.as_deref() {
        if let Some(c) = cancels
            .iter()
            .find(|c| c.idempotency_key.as_deref() == Some(key))
        {
            return ClaimDecision::Answer(CancelClaim::Existing(c.clone()));
        }
    }
    if let Some(c) = cancels.iter().find(|c| c.status.in_flight()) {
        return ClaimDecision::Answer(CancelClaim::InProgress(c.clone()));
    }
    let left = balance(draft.total_amount, cancels);
    let amount = draft.amount.unwrap_or(left);
    if amount < 1 || amount > left {
        return ClaimDecision::Answer(CancelClaim::ExceedsBalance {
            balance: left.max(0),
        });
    }
    let n = cancels.iter().map(|c| c.n).max().unwrap_or(0) + 1;
    ClaimDecision::Insert(CancelRecord {
        payment_id: draft.payment_id.clone(),
        n,
        merchant_id: draft.merchant_id.clone(),
        amount,
        reason: draft.reason.clone(),
        idempotency_key: draft.idempotency_key.clone(),
        request_fingerprint: draft.request_fingerprint.clone(),
        status: CancelStatus::Pending,
        is_saved: false,
        save_attempts: 0,
        batch_attempts: 0,
        failure_code: None,
        last_error: None,
        canceled_at: None,
        created_at: draft.now,
        updated_at: draft.now,
        version: 0,
    })
}

/// A guarded change to one cancel; [`CancelStore::cancel_transition`] says
/// whether it applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelTransition {
    /// The card company canceled it: `status = DONE`, `canceled_at` set.
    /// Guard: in flight (`PENDING` or `UNKNOWN`).
    MarkDone {
        /// The card company's `canceledAt`, RFC 3339.
        canceled_at: String,
    },
    /// Not canceled: `status = FAILED`. Guard: in flight, and, with
    /// `seen_version`, still at that version.
    MarkFailed {
        /// The card company's code or a no-call code.
        failure_code: String,
        /// Detail for operators.
        last_error: String,
        /// No call was made: give the merchant's `Idempotency-Key` back.
        release_key: bool,
        /// `Some(v)`: apply only to the cancel as it was at version `v`. A
        /// request that made no card call passes the version it claimed:
        /// if the batch has since fenced the cancel to send it again
        /// ([`CancelTransition::MarkSending`]), the card may have applied
        /// it, and "nothing was canceled" would be false.
        seen_version: Option<i64>,
    },
    /// The batch is about to send the cancel again (it read it at
    /// `seen_version` and the card company's lookup did not list it): the
    /// version moves on, nothing else changes. Guard: in flight and still
    /// at `seen_version`. Either the live request's no-call `MarkFailed`
    /// lands first and this fails (the batch sends nothing), or this lands
    /// first and that fails (the live request answers from a lookup).
    MarkSending {
        /// `version` of the cancel as the batch read it.
        seen_version: i64,
    },
    /// The answer was lost: `status = UNKNOWN`. Guard: `PENDING`.
    MarkUnknown {
        /// Detail for operators.
        last_error: String,
    },
    /// The batch looked it up and could not settle it: `batch_attempts += 1`,
    /// `status = UNKNOWN`. Guard: in flight.
    LookupFailed {
        /// Detail for operators.
        last_error: String,
    },
    /// The ledger holds the reversal: `is_saved = true`, `save_attempts += 1`.
    /// Guard: `DONE` and not saved.
    MarkSaved,
    /// A reversal try failed: `save_attempts += 1`. Guard: `DONE`, not saved.
    SaveFailed {
        /// Detail for operators.
        last_error: String,
    },
    /// The batch's reversal try failed: `batch_attempts += 1`.
    /// Guard: `DONE`, not saved.
    BatchSaveFailed {
        /// Detail for operators.
        last_error: String,
    },
}

/// The fields of a [`CancelRecord`] a rule names (`version` and
/// `updated_at` are the rules' own bookkeeping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelField {
    /// `status`, in its stored spelling.
    Status,
    /// `canceled_at`.
    CanceledAt,
    /// `failure_code`.
    FailureCode,
    /// `last_error`.
    LastError,
    /// `idempotency_key` (the merchant's).
    IdempotencyKey,
    /// `is_saved`.
    IsSaved,
    /// `save_attempts`.
    SaveAttempts,
    /// `batch_attempts`.
    BatchAttempts,
}

impl Stored for CancelRecord {
    type Field = CancelField;

    fn column(field: CancelField) -> &'static str {
        match field {
            CancelField::Status => "status",
            CancelField::CanceledAt => "canceled_at",
            CancelField::FailureCode => "failure_code",
            CancelField::LastError => "last_error",
            CancelField::IdempotencyKey => "idempotency_key",
            CancelField::IsSaved => "is_saved",
            CancelField::SaveAttempts => "save_attempts",
            CancelField::BatchAttempts => "batch_attempts",
        }
    }

    fn read(&self, field: CancelField) -> Value {
        match field {
            CancelField::Status => Value::Const(self.status.as_str()),
            CancelField::CanceledAt => self.canceled_at.as_ref().into(),
            CancelField::FailureCode => self.failure_code.as_ref().into(),
            CancelField::LastError => self.last_error.as_ref().into(),
            CancelField::IdempotencyKey => self.idempotency_key.as_ref().into(),
            CancelField::IsSaved => Value::Bool(self.is_saved),
            CancelField::SaveAttempts => Value::Int(self.save_attempts),
            CancelField::BatchAttempts => Value::Int(self.batch_attempts),
        }
    }

    fn write(&mut self, field: CancelField, value: Value) {
        let text = || value.text().map(str::to_owned);
        match (field, &value) {
            (CancelField::Status, _) => {
                if let Some(Ok(s)) = value.text().map(CancelStatus::from_stored) {
                    self.status = s;
                }
            }
            (CancelField::CanceledAt, _) => self.canceled_at = text(),
            (CancelField::FailureCode, _) => self.failure_code = text(),
            (CancelField::LastError, _) => self.last_error = text(),
            (CancelField::IdempotencyKey, _) => self.idempotency_key = text(),
            (CancelField::IsSaved, Value::Bool(b)) => self.is_saved = *b,
            (CancelField::SaveAttempts, Value::Int(i)) => self.save_attempts = *i,
            (CancelField::BatchAttempts, Value::Int(i)) => self.batch_attempts = *i,
            _ => {}
        }
    }

    fn version(&self) -> i64 {
        self.version
    }

    fn bookkeeping(&mut self) -> (&mut i64, &mut i64) {
        (&mut self.version, &mut self.updated_at)
    }
}

/// `status` is one of `states`.
fn status_in(states: &[CancelStatus]) -> Cond<CancelField> {
    match states {
        [one] => Cond::Is(CancelField::Status, Value::Const(one.as_str())),
        _ => Cond::OneOf(
            CancelField::Status,
            states.iter().map(|s| Value::Const(s.as_str())).collect(),
        ),
    }
}

/// In flight: the card company may still act on it.
fn in_flight() -> Vec<Cond<CancelField>> {
    vec![status_in(&[CancelStatus::Pending, CancelStatus::Unknown])]
}

/// Done at the card company, the reversal not in the ledger yet.
fn saving() -> Vec<Cond<CancelField>> {
    vec![
        status_in(&[CancelStatus::Done]),
        Cond::Is(CancelField::IsSaved, Value::Bool(false)),
    ]
}

/// The cancels the batch still has work on: in flight, or done and not
/// saved ([`CancelStore::scan_open_cancels`]).
pub fn open_guard() -> Vec<Cond<CancelField>> {
    vec![Cond::AnyOf(vec![in_flight(), saving()])]
}

impl CancelTransition {
    /// The transition as a rule: its guard and its effect (see each variant).
    pub fn rule(&self) -> Rule<CancelField> {
        use CancelField as F;
        let text = |s: &str| Value::Text(s.to_owned());
        let status = |s: CancelStatus| Change::Set(F::Status, Value::Const(s.as_str()));
        let (guard, mut effect) = match self {
            Self::MarkDone { canceled_at } => (
                in_flight(),
                vec![
                    status(CancelStatus::Done),
                    Change::Set(F::CanceledAt, text(canceled_at)),
                    Change::Set(F::FailureCode, Value::Null),
                ],
            ),
            Self::MarkFailed {
                failure_code,
                last_error,
                release_key,
                seen_version,
            } => {
                let mut guard = in_flight();
                guard.extend(seen_version.map(Cond::Version));
                let mut effect = vec![
                    status(CancelStatus::Failed),
                    Change::Set(F::FailureCode, text(failure_code)),
                    Change::Set(F::LastError, text(last_error)),
                ];
                if *release_key {
                    effect.push(Change::Set(F::IdempotencyKey, Value::Null));
                }
                (guard, effect)
            }
            Self::MarkSending { seen_version } => {
                let mut guard = in_flight();
                guard.push(Cond::Version(*seen_version));
                (guard, Vec::new())
            }
            Self::MarkUnknown { last_error } => (
                vec![status_in(&[CancelStatus::Pending])],
                vec![
                    status(CancelStatus::Unknown),
                    Change::Set(F::LastError, text(last_error)),
                ],
            ),
            Self::LookupFailed { last_error } => (
                in_flight(),
                vec![
                    status(CancelStatus::Unknown),
                    Change::Add(F::BatchAttempts, 1),
                    Change::Set(F::LastError, text(last_error)),
                ],
            ),
            Self::MarkSaved => (
                saving(),
                vec![
                    Change::Set(F::IsSaved, Value::Bool(true)),
                    Change::Add(F::SaveAttempts, 1),
                    Change::Set(F::LastError, Value::Null),
                ],
            ),
            Self::SaveFailed { last_error } => (
                saving(),
                vec![
                    Change::Add(F::SaveAttempts, 1),
                    Change::Set(F::LastError, text(last_error)),
                ],
            ),
            Self::BatchSaveFailed { last_error } => (
                saving(),
                vec![
                    Change::Add(F::BatchAttempts, 1),
                    Change::Set(F::LastError, text(last_error)),
                ],
            ),
        };
        effect.push(Change::Stamp);
        Rule { guard, effect }
    }
}

/// Applies `t` to `c` when its guard holds (the reference semantics every
/// backend's conditional update follows); `true` when it applied.
pub fn apply_cancel_transition(c: &mut CancelRecord, t: &CancelTransition, now: i64) -> bool {
    t.rule().apply_if(c, now)
}

/// The cancels of payments, on every backend (a part of
/// [`crate::StateStore`]).
#[async_trait::async_trait]
pub trait CancelStore: Send + Sync + 'static {
    /// Claims a cancel atomically with the balance check (see the module
    /// doc): [`CancelClaim::Claimed`] is the only answer that wrote.
    ///
    /// # Errors
    /// [`StoreError`]; on error nothing was claimed, or (a lost commit
    /// acknowledgement) a `PENDING` cancel was, which a retry with the same
    /// `Idempotency-Key` finds and the batch settles.
    async fn claim_cancel(&self, draft: &CancelDraft) -> Result<CancelClaim, StoreError>;

    /// The cancels of a payment, in `n` order.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn cancels_of(&self, payment_id: &PaymentId) -> Result<Vec<CancelRecord>, StoreError>;

    /// Applies a guarded transition to cancel `n` of a payment; `Ok(true)`
    /// when it applied, `Ok(false)` when the guard did not hold.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn cancel_transition(
        &self,
        payment_id: &PaymentId,
        n: i64,
        t: &CancelTransition,
    ) -> Result<bool, StoreError>;

    /// Streams the cancels that need work (in flight, or done without the
    /// ledger's reversal) in `(payment_id, n)` order, `batch_size` per round
    /// trip.
    fn scan_open_cancels(&self, batch_size: u32)
        -> BoxStream<'_, Result<CancelRecord, StoreError>>;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn draft(amount: Option<i64>, key: Option<&str>) -> CancelDraft {
        CancelDraft {
            payment_id: PaymentId::from_stored("pay_1"),
            merchant_id: MerchantId::from_stored("m"),
            total_amount: 1000,
            amount,
            reason: "r".into(),
            idempotency_key: key.map(str::to_owned),
            request_fingerprint: "fp".into(),
            now: 1,
        }
    }

    fn claimed(d: &CancelDraft, cancels: &[CancelRecord]) -> CancelRecord {
        match decide_claim(d, cancels) {
            ClaimDecision::Insert(c) => c,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[test]
    fn the_claim_rule() {
        let mut first = claimed(&draft(Some(600), Some("k")), &[]);
        assert_eq!((first.n, first.amount), (1, 600));
        // In flight: another cancel waits; the same key replays.
        assert!(matches!(
            decide_claim(&draft(Some(1), None), std::slice::from_ref(&first)),
            ClaimDecision::Answer(CancelClaim::InProgress(_))
        ));
        assert!(matches!(
            decide_claim(&draft(Some(1), Some("k")), std::slice::from_ref(&first)),
            ClaimDecision::Answer(CancelClaim::Existing(_))
        ));
        assert!(apply_cancel_transition(
            &mut first,
            &CancelTransition::MarkDone {
                canceled_at: "t".into()
            },
            2
        ));
        let cancels = vec![first.clone()];
        assert_eq!(
            decide_claim(&draft(Some(401), None), &cancels),
            ClaimDecision::Answer(CancelClaim::ExceedsBalance { balance: 400 })
        );
        let rest = claimed(&draft(None, None), &cancels);
        assert_eq!((rest.n, rest.amount), (2, 400));
        // A failed cancel gives its amount back, and its number stays taken.
        let mut failed = rest;
        assert!(apply_cancel_transition(
            &mut failed,
            &CancelTransition::MarkFailed {
                failure_code: "X".into(),
                last_error: "e".into(),
                release_key: true,
                seen_version: None,
            },
            3
        ));
        let third = claimed(&draft(None, None), &[first, failed]);
        assert_eq!((third.n, third.amount), (3, 400));
    }
}
