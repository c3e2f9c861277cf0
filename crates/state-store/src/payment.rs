//! The payment record's state machine: every guarded change of a record
//! in `realtime_payments` ([`Transition`]), the guard of a move between
//! partitions ([`entry_guard`]) and the stale-payment predicate
//! ([`stale_guard`]), each defined once as a [`Rule`] or a guard that
//! every backend applies or compiles (module [`crate::rules`]).

use paygate_core::payment::failure_codes;
use paygate_core::{CardStatus, Partition, PaymentRecord};

use crate::rules::{all_hold, Change, Cond, Rule, Stored, Value};

/// A guarded change to one record in `realtime_payments`. Each applies only
/// when its guard holds; [`StateStore::transition`] says whether it applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The card company approved: `is_paid = true`, `card_status = DONE`.
    /// Guard: not paid yet and `card_status` is `PENDING` or `UNKNOWN`.
    MarkPaid {
        /// The card company's `approvedAt`, RFC 3339.
        approved_at: String,
    },
    /// The card company declined, or no call was made: `card_status = ABORTED`.
    /// Guard: not paid and `card_status` is `PENDING` or `UNKNOWN`, and,
    /// with `seen_version`, the record is still at that version.
    MarkAborted {
        /// The card company's code, or a paygate no-call code.
        failure_code: String,
        /// Detail for operators.
        last_error: String,
        /// `Some(v)`: apply only to the record as it was at version `v`. A
        /// no-call abort passes the version its confirm last wrote, so a
        /// confirm that stalled cannot abort a payment that another
        /// replica reopened and is sending since. `None` (an answer of the
        /// card company, true whoever sent the call): state only.
        seen_version: Option<i64>,
    },
    /// The outcome could not be learned: `card_status = UNKNOWN`.
    /// Guard: `card_status = PENDING`.
    MarkUnknown {
        /// Detail for operators.
        last_error: String,
    },
    /// A lookup after the confirm (the batch's, the janitor's) found no
    /// outcome: `card_status = UNKNOWN`, `batch_attempts += 1` (the checks
    /// so far, which the recheck schedule backs off by), `last_error` set.
    /// Guard: not paid, `PENDING` or `UNKNOWN`, and the record is still at
    /// `seen_version`, the version the check's verdict was drawn from (an
    /// actor that settled or reopened it since makes the verdict stale).
    CheckedUnknown {
        /// Detail for operators.
        last_error: String,
        /// The version the lookup's verdict was drawn from.
        seen_version: i64,
    },
    /// The ledger recorded it: `is_saved = true`, `save_attempts += 1`.
    /// Guard: paid and not saved.
    MarkSaved,
    /// A ledger try failed: `save_attempts += 1`, `last_error` set.
    /// Guard: paid and not saved.
    SaveFailed {
        /// Detail for operators.
        last_error: String,
    },
    /// The batch tried the ledger and failed: `batch_attempts += 1`,
    /// `last_error` set. Guard: paid and not saved.
    BatchSaveFailed {
        /// Detail for operators.
        last_error: String,
    },
    /// A no-call abort (see `paygate_core::payment::failure_codes`) is opened
    /// again for a merchant retry: `card_status = PENDING`, failure cleared.
    /// Guard: `card_status = ABORTED` with that `failure_code`, and, with
    /// `seen_version`, the record is still at that version (the retry
    /// that reopens it then knows the version it holds: `seen + 1`).
    Reopen {
        /// The no-call code the record must carry.
        failure_code: String,
        /// `Some(v)`: apply only to the record as it was at version `v`.
        seen_version: Option<i64>,
    },
    /// A confirm has written its card `REQUEST` row and is about to send
    /// the call: the version moves on (and `updated_at` strictly forward,
    /// so the stale age counts from the send), nothing else changes.
    /// Guard: not paid, `card_status = PENDING`, and the record is still
    /// at `seen_version` (the version the confirm last wrote or read). It
    /// fences a [`Transition::FileNotSent`] that read the record before
    /// the row landed (DESIGN.md §1): either the filing sees a new version
    /// and changes nothing, or this guard fails and the confirm makes no
    /// call. Guarded on the version too, so a confirm that stalled before
    /// its fence while its payment was filed, reopened and sent by another
    /// replica makes no second call, and the confirm knows its version
    /// after it (`seen_version + 1`).
    MarkSending {
        /// The version the confirm holds.
        seen_version: i64,
    },
    /// The card company has no record of an undecided payment while its
    /// confirm window is open, and a check is about to confirm it again
    /// under the payment's own Idempotency-Key, having written the card
    /// `REQUEST` row: the version moves on and `updated_at` strictly
    /// forward (every stale pass then waits a confirm's in-flight window
    /// from the re-send), nothing else changes. Guard: not paid, `PENDING`
    /// or `UNKNOWN`, and the record is still at `seen_version`, the version
    /// the lookup was judged from: of two checks that judged the same
    /// version, one re-sends, and a settlement "not charged" judged before
    /// the re-send fails its own guard.
    MarkResending {
        /// The version the 404 lookup was judged from.
        seen_version: i64,
    },
    /// No card `REQUEST` row is in the log for a record read at
    /// `seen_version` (by I3 no confirm was sent): `card_status = ABORTED`,
    /// `failure_code = PAYGATE_NOT_SENT`. Guard: not paid, `PENDING` or
    /// `UNKNOWN`, and the version is still `seen_version` (a confirm that
    /// wrote its row since then moved it with [`Transition::MarkSending`]).
    FileNotSent {
        /// `version` of the record as read before the log.
        seen_version: i64,
        /// Detail for operators.
        last_error: String,
    },
}

/// The fields of a [`PaymentRecord`] a rule names (`version` and
/// `updated_at` are the rules' own bookkeeping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaymentField {
    /// `is_paid`.
    IsPaid,
    /// `is_saved`.
    IsSaved,
    /// `card_status`, in its stored spelling.
    CardStatus,
    /// `approved_at`.
    ApprovedAt,
    /// `failure_code`.
    FailureCode,
    /// `last_error`.
    LastError,
    /// `save_attempts`.
    SaveAttempts,
    /// `batch_attempts`.
    BatchAttempts,
    /// `updated_at` (epoch ms), for the stale predicate.
    UpdatedAt,
}

impl Stored for PaymentRecord {
    type Field = PaymentField;

    fn column(field: PaymentField) -> &'static str {
        match field {
            PaymentField::IsPaid => "is_paid",
            PaymentField::IsSaved => "is_saved",
            PaymentField::CardStatus => "card_status",
            PaymentField::ApprovedAt => "approved_at",
            PaymentField::FailureCode => "failure_code",
            PaymentField::LastError => "last_error",
            PaymentField::SaveAttempts => "save_attempts",
            PaymentField::BatchAttempts => "batch_attempts",
            PaymentField::UpdatedAt => "updated_at",
        }
    }

    fn read(&self, field: PaymentField) -> Value {
        match field {
            PaymentField::IsPaid => Value::Bool(self.is_paid),
            PaymentField::IsSaved => Value::Bool(self.is_saved),
            PaymentField::CardStatus => Value::Const(self.card_status.as_str()),
            PaymentField::ApprovedAt => self.approved_at.as_ref().into(),
            PaymentField::FailureCode => self.failure_code.as_ref().into(),
            PaymentField::LastError => self.last_error.as_ref().into(),
            PaymentField::SaveAttempts => Value::Int(self.save_attempts),
            PaymentField::BatchAttempts => Value::Int(self.batch_attempts),
            PaymentField::UpdatedAt => Value::Int(self.updated_at),
        }
    }

    fn write(&mut self, field: PaymentField, value: Value) {
        let text = || value.text().map(str::to_owned);
        match (field, &value) {
            (PaymentField::IsPaid, Value::Bool(b)) => self.is_paid = *b,
            (PaymentField::IsSaved, Value::Bool(b)) => self.is_saved = *b,
            (PaymentField::CardStatus, _) => {
                if let Some(s) = value.text() {
                    self.card_status = CardStatus::from_stored(s);
                }
            }
            (PaymentField::ApprovedAt, _) => self.approved_at = text(),
            (PaymentField::FailureCode, _) => self.failure_code = text(),
            (PaymentField::LastError, _) => self.last_error = text(),
            (PaymentField::SaveAttempts, Value::Int(i)) => self.save_attempts = *i,
            (PaymentField::BatchAttempts, Value::Int(i)) => self.batch_attempts = *i,
            (PaymentField::UpdatedAt, Value::Int(i)) => self.updated_at = *i,
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

/// `card_status` is one of `states`. A set that includes `UNKNOWN` is
/// written as "none of the other known statuses", so that a stored value
/// the code does not recognise (which reads as `UNKNOWN`) matches in every
/// backend exactly as it reads.
pub fn card_status_in(states: &[CardStatus]) -> Cond<PaymentField> {
    const KNOWN: [CardStatus; 5] = [
        CardStatus::Pending,
        CardStatus::Done,
        CardStatus::Aborted,
        CardStatus::Unknown,
        CardStatus::Canceled,
    ];
    let stored = |s: &CardStatus| Value::Const(s.as_str());
    match states {
        [one] if *one != CardStatus::Unknown => Cond::Is(PaymentField::CardStatus, stored(one)),
        _ if states.contains(&CardStatus::Unknown) => Cond::NoneOf(
            PaymentField::CardStatus,
            KNOWN
                .iter()
                .filter(|s| !states.contains(s))
                .map(stored)
                .collect(),
        ),
        _ => Cond::OneOf(
            PaymentField::CardStatus,
            states.iter().map(stored).collect(),
        ),
    }
}

/// Not paid, and the card's answer is not settled (`PENDING` or `UNKNOWN`).
fn undecided() -> Vec<Cond<PaymentField>> {
    vec![
        Cond::Is(PaymentField::IsPaid, Value::Bool(false)),
        card_status_in(&[CardStatus::Pending, CardStatus::Unknown]),
    ]
}

/// Paid and not saved in the ledger yet.
fn saving() -> Vec<Cond<PaymentField>> {
    vec![
        Cond::Is(PaymentField::IsPaid, Value::Bool(true)),
        Cond::Is(PaymentField::IsSaved, Value::Bool(false)),
    ]
}

fn with_version(mut guard: Vec<Cond<PaymentField>>, seen: Option<i64>) -> Vec<Cond<PaymentField>> {
    guard.extend(seen.map(Cond::Version));
    guard
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

impl Transition {
    /// The transition as a rule: its guard and its effect (see each
    /// variant). `None` when it can never apply (a [`Transition::Reopen`]
    /// of a code that is not a no-call code).
    pub fn rule(&self) -> Option<Rule<PaymentField>> {
        use PaymentField as F;
        let status = |s: CardStatus| Change::Set(F::CardStatus, Value::Const(s.as_str()));
        let (guard, effect) = match self {
            Self::MarkPaid { approved_at } => (
                undecided(),
                vec![
                    Change::Set(F::IsPaid, Value::Bool(true)),
                    status(CardStatus::Done),
                    Change::Set(F::ApprovedAt, text(approved_at)),
                    Change::Set(F::FailureCode, Value::Null),
                    Change::Stamp,
                ],
            ),
            Self::MarkAborted {
                failure_code,
                last_error,
                seen_version,
            } => (
                with_version(undecided(), *seen_version),
                vec![
                    status(CardStatus::Aborted),
                    Change::Set(F::FailureCode, text(failure_code)),
                    Change::Set(F::LastError, text(last_error)),
                    Change::Stamp,
                ],
            ),
            Self::MarkUnknown { last_error } => (
                vec![card_status_in(&[CardStatus::Pending])],
                vec![
                    status(CardStatus::Unknown),
                    Change::Set(F::LastError, text(last_error)),
                    Change::Stamp,
                ],
            ),
            Self::CheckedUnknown {
                last_error,
                seen_version,
            } => (
                with_version(undecided(), Some(*seen_version)),
                vec![
                    status(CardStatus::Unknown),
                    Change::Add(F::BatchAttempts, 1),
                    Change::Set(F::LastError, text(last_error)),
                    Change::Stamp,
                ],
            ),
            Self::MarkSaved => (
                saving(),
                vec![
                    Change::Set(F::IsSaved, Value::Bool(true)),
                    Change::Add(F::SaveAttempts, 1),
                    Change::Set(F::LastError, Value::Null),
                    Change::Stamp,
                ],
            ),
            Self::SaveFailed { last_error } => (
                saving(),
                vec![
                    Change::Add(F::SaveAttempts, 1),
                    Change::Set(F::LastError, text(last_error)),
                    Change::Stamp,
                ],
            ),
            Self::BatchSaveFailed { last_error } => (
                saving(),
                vec![
                    Change::Add(F::BatchAttempts, 1),
                    Change::Set(F::LastError, text(last_error)),
                    Change::Stamp,
                ],
            ),
            Self::Reopen {
                failure_code,
                seen_version,
            } => {
                if !failure_codes::is_no_call(failure_code) {
                    return None;
                }
                (
                    with_version(
                        vec![
                            card_status_in(&[CardStatus::Aborted]),
                            Cond::Is(F::FailureCode, text(failure_code)),
                        ],
                        *seen_version,
                    ),
                    vec![
                        status(CardStatus::Pending),
                        Change::Set(F::FailureCode, Value::Null),
                        Change::Stamp,
                    ],
                )
            }
            // The version is the fence; `updated_at` only moves forward
            // (the stale age counts from the send).
            Self::MarkSending { seen_version } => (
                vec![
                    Cond::Is(F::IsPaid, Value::Bool(false)),
                    card_status_in(&[CardStatus::Pending]),
                    Cond::Version(*seen_version),
                ],
                vec![Change::StampForward],
            ),
            Self::MarkResending { seen_version } => (
                with_version(undecided(), Some(*seen_version)),
                vec![Change::StampForward],
            ),
            Self::FileNotSent {
                seen_version,
                last_error,
            } => (
                with_version(undecided(), Some(*seen_version)),
                vec![
                    status(CardStatus::Aborted),
                    Change::Set(F::FailureCode, Value::Const(failure_codes::NOT_SENT)),
                    Change::Set(F::LastError, text(last_error)),
                    Change::Stamp,
                ],
            ),
        };
        Some(Rule { guard, effect })
    }

    /// Applies the transition to `r` when its guard holds (the reference
    /// semantics of every backend); `true` when it applied.
    pub fn apply_if(&self, r: &mut PaymentRecord, now_ms: i64) -> bool {
        self.rule().is_some_and(|rule| rule.apply_if(r, now_ms))
    }

    /// Applies the transition's effect to `r` unchecked: for a caller whose
    /// store has just applied it and who keeps its copy in step.
    pub fn apply(&self, r: &mut PaymentRecord, now_ms: i64) {
        if let Some(rule) = self.rule() {
            rule.apply(r, now_ms);
        }
    }
}

/// What a record must be to enter `partition` (see [`may_enter`]).
pub fn entry_guard(partition: Partition) -> Vec<Cond<PaymentField>> {
    match partition {
        Partition::Completed => vec![
            Cond::Is(PaymentField::IsPaid, Value::Bool(true)),
            Cond::Is(PaymentField::IsSaved, Value::Bool(true)),
        ],
        Partition::Unpaid => vec![
            Cond::Is(PaymentField::IsPaid, Value::Bool(false)),
            card_status_in(&[CardStatus::Aborted]),
        ],
        Partition::Realtime => Vec::new(),
    }
}

/// Whether a record may enter `partition`: a move is guarded on the state
/// that justifies it (DESIGN.md §1), checked atomically with the move, so a
/// move decided on a stale read (the batch scanned the record, then a
/// merchant's retry reopened it) does not apply.
///
/// - `completed_payments`: paid and saved;
/// - `unpaid_payments`: not paid and `ABORTED` (declined, or no card call);
/// - `realtime_payments`: anything (it is where work happens).
pub fn may_enter(partition: Partition, r: &PaymentRecord) -> bool {
    all_hold(&entry_guard(partition), r)
}

/// What a stale-payment pass settles: not paid, `PENDING` or `UNKNOWN`
/// (or a status the code does not recognise), last updated at or before
/// `updated_before_ms` (epoch ms).
pub fn stale_guard(updated_before_ms: i64) -> Vec<Cond<PaymentField>> {
    let mut guard = undecided();
    guard.push(Cond::AtMost(PaymentField::UpdatedAt, updated_before_ms));
    guard
}

/// Whether a stale-payment pass settles `r` ([`stale_guard`]).
/// [`crate::StateStore::scan_stale`] streams exactly these.
pub fn is_stale(r: &PaymentRecord, updated_before_ms: i64) -> bool {
    all_hold(&stale_guard(updated_before_ms), r)
}
