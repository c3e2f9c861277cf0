//! Guards I1 where no automatic actor can: an operator settles a payment by
//! hand after checking the card company's console (`paygate payments
//! resolve`). The decision is a guarded transition like every other change
//! (DESIGN.md §1), checked first against a fresh card lookup, written to the
//! append-only audit (`payment_resolutions`), and it marks the payment's
//! alerts resolved.
//!
//! - *approved*: `MarkPaid` (guard: not paid, `PENDING`/`UNKNOWN`), then the
//!   ledger through the batch's own path ([`Settler::save`]), which moves the
//!   saved record to `completed_payments`; a ledger failure leaves it
//!   paid-unsaved for the batch, as after any approval;
//! - *not charged*: `MarkAborted` with [`OPERATOR_NOT_CHARGED`], then the
//!   guarded move to `unpaid_payments`.
//!
//! A card lookup that contradicts the decision (approved, but the card
//! company has no approval; not charged, but it shows one) refuses it unless
//! it is forced; the lookup's answer is recorded either way. A lookup that
//! cannot be made (the card API down) does not block the decision: the
//! operator read the console; the audit says it was not verified.

use std::sync::Arc;

use paygate_alert::SqlOutbox;
use paygate_api_log::{NewResolution, ResolutionLog};
use paygate_card_api::CardPayment;
use paygate_core::{Partition, PaymentId, PaymentRecord};
use paygate_state_store::{SqlDatabase, StateStore, StoreError};
use serde_json::{json, Value};

use crate::{decide::Decider, Saga, Tally};

/// The `failure_code` of a payment an operator resolved as not charged.
pub const OPERATOR_NOT_CHARGED: &str = "PAYGATE_OPERATOR_NOT_CHARGED";

/// What the operator decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The card company approved it: record it paid and in the ledger.
    Approved,
    /// Nothing was charged: file it unpaid.
    NotCharged,
}

impl Decision {
    /// `approved` or `not_charged` (the audit's `action`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::NotCharged => "not_charged",
        }
    }
}

/// What the card company said about the payment when it was looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CardEvidence {
    /// Approved, and the answer matches the payment.
    Approved {
        /// The card company's `approvedAt`.
        approved_at: String,
    },
    /// Declined, aborted or expired there.
    NotApproved {
        /// The card company's status or failure code.
        code: String,
    },
    /// The card company has no payment for the order.
    NotFound,
    /// Its answer does not match the payment (another key or amount, a
    /// cancel).
    Mismatch(String),
    /// Not final there yet (`IN_PROGRESS`, `READY`, ...).
    NotFinal(String),
    /// No answer could be had (the card API down, the log unwritable).
    Unavailable(String),
}

impl CardEvidence {
    /// Whether this answer contradicts `decision`. [`CardEvidence::Unavailable`]
    /// contradicts nothing: the operator's reading of the console stands.
    pub fn contradicts(&self, decision: Decision) -> bool {
        match (decision, self) {
            (_, Self::Unavailable(_)) => false,
            (Decision::Approved, Self::Approved { .. }) => false,
            (Decision::Approved, _) => true,
            (Decision::NotCharged, Self::NotApproved { .. } | Self::NotFound) => false,
            (Decision::NotCharged, _) => true,
        }
    }
}

impl std::fmt::Display for CardEvidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Approved { approved_at } => write!(f, "card company: approved at {approved_at}"),
            Self::NotApproved { code } => write!(f, "card company: not approved ({code})"),
            Self::NotFound => f.write_str("card company: no payment for the order"),
            Self::Mismatch(d) => write!(f, "card company: does not match ({d})"),
            Self::NotFinal(s) => write!(f, "card company: not final yet ({s})"),
            Self::Unavailable(e) => write!(f, "card company: not verified, lookup failed ({e})"),
        }
    }
}

/// A decision to carry out.
#[derive(Clone, Debug)]
pub struct ResolveRequest {
    /// The payment.
    pub payment_id: PaymentId,
    /// What the operator decided.
    pub decision: Decision,
    /// Why, for the audit.
    pub reason: String,
    /// Who, for the audit.
    pub operator: String,
    /// Carry it out even when the card lookup contradicts it.
    pub force: bool,
    /// The record's `version` the operator looked at (`paygate payments
    /// show`): the decision is refused when the payment changed since.
    /// `None`: the version the resolver reads before its card lookup.
    pub seen_version: Option<i64>,
}

/// What a resolution did.
#[derive(Clone, Debug)]
pub struct ResolveReport {
    /// The audit row.
    pub resolution_id: i64,
    /// The card company's answer at the time.
    pub evidence: CardEvidence,
    /// The record before, and its partition.
    pub before: (Partition, PaymentRecord),
    /// The record after, and its partition.
    pub after: (Partition, PaymentRecord),
    /// What the ledger save and the moves did.
    pub tally: Tally,
    /// Alerts marked resolved.
    pub alerts_resolved: u64,
    /// The decision applied, but what follows it (the ledger save, the move
    /// to its partition) failed on the store: the batch finishes it.
    pub follow_up_error: Option<String>,
}

/// Why a resolution was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No payment has this id.
    #[error("no payment {0}")]
    NotFound(String),
    /// The record is not one an operator decides on: only a payment whose
    /// card outcome is open (`PENDING` or `UNKNOWN`, not paid) is.
    #[error("{0}")]
    NotOpen(String),
    /// The card company's lookup contradicts the decision (`--force` to
    /// override).
    #[error("refused: {evidence}, which contradicts --{decision}; check again, or pass --force to override")]
    Contradicted {
        /// What the card company said.
        evidence: CardEvidence,
        /// The decision, as its flag reads.
        decision: &'static str,
    },
    /// The record changed under the decision (another actor settled it);
    /// nothing was written.
    #[error("the record changed while it was being resolved (it is now {0}); nothing was done, look at it again")]
    Raced(String),
    /// The store, the log or the audit failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The decision was applied to the record, but its audit row could not
    /// be written: the operator must record it by other means.
    #[error(
        "the decision was applied ({applied}) but its audit row could not be written: {error}"
    )]
    NotAudited {
        /// What was applied.
        applied: String,
        /// Why the audit failed.
        error: StoreError,
    },
}

/// The record as JSON, for the audit and `paygate payments show --json`.
/// Holds no secret: a record has none (the payment key is the card
/// company's public id of the payment).
pub fn record_json(partition: Partition, r: &PaymentRecord) -> Value {
    json!({
        "partition": partition.table(),
        "paymentId": r.payment_id.as_str(),
        "merchantId": r.merchant_id.as_str(),
        "orderId": r.order_id.as_str(),
        "paymentKey": r.payment_key,
        "amount": r.amount,
        "currency": r.currency,
        "isPaid": r.is_paid,
        "isSaved": r.is_saved,
        "cardStatus": r.card_status.as_str(),
        "approvedAt": r.approved_at,
        "saveAttempts": r.save_attempts,
        "batchAttempts": r.batch_attempts,
        "failureCode": r.failure_code,
        "lastError": r.last_error,
        "createdAt": paygate_core::time::rfc3339_from_ms(r.created_at),
        "updatedAt": paygate_core::time::rfc3339_from_ms(r.updated_at),
        "version": r.version,
    })
}

impl Saga {
    /// One logged lookup of the payment's order at the card company, read
    /// as [`CardEvidence`] (for an operator's decision: no retries, no
    /// waiting for a final status).
    pub async fn card_evidence(self: &Arc<Self>, record: &PaymentRecord) -> CardEvidence {
        match self
            .lookup_once(&record.payment_id, record.order_id.as_str(), 0)
            .await
        {
            Ok(Some(p)) => self.evidence_of(record, p),
            Ok(None) => CardEvidence::NotFound,
            Err(e) => CardEvidence::Unavailable(e.to_string()),
        }
    }

    fn evidence_of(&self, record: &PaymentRecord, p: CardPayment) -> CardEvidence {
        let status = p.status.clone();
        match self.verdict_of_lookup(record, p) {
            Ok(crate::outcome::CardVerdict::Approved(p)) => CardEvidence::Approved {
                approved_at: self.approved_at_of(&p),
            },
            Ok(crate::outcome::CardVerdict::Declined { code, .. }) => {
                CardEvidence::NotApproved { code }
            }
            Ok(crate::outcome::CardVerdict::Mismatch { detail, .. }) => {
                CardEvidence::Mismatch(detail)
            }
            Ok(
                crate::outcome::CardVerdict::Unsettled { detail }
                | crate::outcome::CardVerdict::Absent { detail }
                | crate::outcome::CardVerdict::NoCall { detail, .. },
            ) => CardEvidence::Unavailable(detail),
            Err(_) => CardEvidence::NotFinal(status),
        }
    }
}

/// Carries out operators' decisions: [`Decider::decide`], then the audit
/// row and the payment's alerts marked resolved.
pub struct Resolver {
    store: Arc<dyn StateStore>,
    decider: Decider,
    audit: ResolutionLog,
    outbox: SqlOutbox,
}

impl Resolver {
    /// A resolver over the store, the saga (card lookups, ledger saves) and
    /// the SQL database (audit, outbox); `ledger_alert_threshold` as the
    /// batch's.
    pub fn new(
        store: Arc<dyn StateStore>,
        saga: Arc<Saga>,
        db: SqlDatabase,
        ledger_alert_threshold: i64,
    ) -> Self {
        Self {
            decider: Decider::new(store.clone(), saga, ledger_alert_threshold),
            store,
            audit: ResolutionLog::new(db.clone()),
            outbox: SqlOutbox::new(db),
        }
    }

    /// Carries out one decision (see the module's doc).
    ///
    /// # Errors
    /// [`ResolveError`]; on any error but [`ResolveError::Store`] nothing
    /// was changed.
    pub async fn resolve(&self, req: &ResolveRequest) -> Result<ResolveReport, ResolveError> {
        let pid = &req.payment_id;
        // The alerts this decision answers: those raised before it was
        // checked.
        let answered = self
            .outbox
            .for_payment(pid.as_str())
            .await?
            .iter()
            .map(|a| a.id)
            .max()
            .unwrap_or(0);
        let crate::decide::Decided {
            evidence,
            before,
            tally,
            mut follow_up,
        } = self.decider.decide(req).await?;
        let applied = match req.decision {
            Decision::Approved => "marked paid",
            Decision::NotCharged => "marked aborted",
        };
        let not_audited = |error: StoreError| ResolveError::NotAudited {
            applied: format!("{pid} {applied}"),
            error,
        };
        let after = match self.store.get(pid).await {
            Ok(Some(after)) => after,
            Ok(None) => {
                return Err(not_audited(StoreError::Corrupt(
                    "the record vanished".into(),
                )))
            }
            Err(e) => return Err(not_audited(e)),
        };
        let resolution_id = self
            .audit
            .append(&NewResolution {
                payment_id: pid.to_string(),
                action: req.decision.as_str().to_owned(),
                operator: req.operator.clone(),
                reason: req.reason.clone(),
                forced: req.force && evidence.contradicts(req.decision),
                card_evidence: evidence.to_string(),
                before: record_json(before.0, &before.1),
                after: record_json(after.0, &after.1),
            })
            .await
            .map_err(not_audited)?;
        let alerts_resolved = match self
            .outbox
            .resolve_for_payment(pid.as_str(), answered, Some(resolution_id))
            .await
        {
            Ok(n) => n,
            Err(e) => {
                if follow_up.is_ok() {
                    follow_up = Err(e);
                }
                0
            }
        };
        tracing::warn!(payment_id = %pid, action = req.decision.as_str(), operator = %req.operator,
            resolution_id, forced = req.force, evidence = %evidence, "payment resolved by an operator");
        Ok(ResolveReport {
            resolution_id,
            evidence,
            before,
            after,
            tally,
            alerts_resolved,
            follow_up_error: follow_up.err().map(|e| e.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_answer_against_the_decision_contradicts_it() {
        let approved = CardEvidence::Approved {
            approved_at: "2026-11-21T12:00:00+09:00".into(),
        };
        let declined = CardEvidence::NotApproved {
            code: "REJECT_CARD_PAYMENT".into(),
        };
        let down = CardEvidence::Unavailable("503".into());
        let mismatch = CardEvidence::Mismatch("amount".into());
        let in_progress = CardEvidence::NotFinal("IN_PROGRESS".into());
        assert!(!approved.contradicts(Decision::Approved));
        assert!(approved.contradicts(Decision::NotCharged));
        assert!(declined.contradicts(Decision::Approved));
        assert!(!declined.contradicts(Decision::NotCharged));
        assert!(CardEvidence::NotFound.contradicts(Decision::Approved));
        assert!(!CardEvidence::NotFound.contradicts(Decision::NotCharged));
        assert!(
            mismatch.contradicts(Decision::Approved) && mismatch.contradicts(Decision::NotCharged)
        );
        assert!(
            in_progress.contradicts(Decision::Approved)
                && in_progress.contradicts(Decision::NotCharged)
        );
        assert!(!down.contradicts(Decision::Approved) && !down.contradicts(Decision::NotCharged));
    }
}
