//! An operator's decision on a payment whose card outcome is open, checked
//! and applied without the audit (`paygate payments resolve` adds the audit
//! row and marks the alerts resolved, [`crate::resolve::Resolver`]): the
//! record must be open and at the version the operator saw, a fresh card
//! lookup must not contradict the decision, and "not charged" waits until
//! no confirm can still be at the card company. The simulation's operators
//! run this same code.

use std::sync::Arc;

use paygate_core::{CardStatus, Partition, PaymentId, PaymentRecord};
use paygate_state_store::{StateStore, StoreError, Transition};

use crate::{
    resolve::{CardEvidence, Decision, ResolveError, ResolveRequest, OPERATOR_NOT_CHARGED},
    Saga, Settler, Tally,
};

/// What a decision did to the payment, before its audit
/// ([`Decider::decide`]).
#[derive(Debug)]
pub struct Decided {
    /// The card company's answer at the time.
    pub evidence: CardEvidence,
    /// The record before, and its partition.
    pub before: (Partition, PaymentRecord),
    /// What the ledger save and the moves did.
    pub tally: Tally,
    /// What followed the applied transition (the ledger save, the move to
    /// its partition) and failed on the store: the batch finishes it.
    pub follow_up: Result<(), StoreError>,
}

/// Checks and applies an operator's decision to the payment: the part of a
/// resolution that needs no SQL database (the audit and the outbox are the
/// [`Resolver`]'s), so the simulation's operators run the same code.
pub struct Decider {
    store: Arc<dyn StateStore>,
    saga: Arc<Saga>,
    settler: Settler,
}

impl Decider {
    /// A decider over the store and the saga (card lookups, ledger saves);
    /// `ledger_alert_threshold` as the batch's.
    pub fn new(store: Arc<dyn StateStore>, saga: Arc<Saga>, ledger_alert_threshold: i64) -> Self {
        Self {
            settler: Settler::new(store.clone(), saga.clone(), ledger_alert_threshold),
            store,
            saga,
        }
    }

    /// Checks the decision against the record (open, at the version the
    /// operator saw, old enough for "not charged") and a fresh card lookup,
    /// then applies it (see the module's doc).
    ///
    /// # Errors
    /// [`ResolveError`]; on any error but [`ResolveError::Store`] nothing
    /// was changed.
    pub async fn decide(&self, req: &ResolveRequest) -> Result<Decided, ResolveError> {
        let pid = &req.payment_id;
        let before = self
            .store
            .get(pid)
            .await?
            .ok_or_else(|| ResolveError::NotFound(pid.to_string()))?;
        let (part, record) = &before;
        let open = *part == Partition::Realtime
            && !record.is_paid
            && matches!(
                record.card_status,
                CardStatus::Pending | CardStatus::Unknown
            );
        if let Some(seen) = req.seen_version.filter(|v| *v != record.version) {
            return Err(ResolveError::NotOpen(format!(
                "{pid} changed since it was looked at (version {seen}, now {}): look again",
                record.version
            )));
        }
        if !open {
            return Err(ResolveError::NotOpen(format!(
                "{pid} is {} in {} (paid: {}, saved: {}); only a payment whose card outcome is open \
                 (PENDING or UNKNOWN, not paid) is resolved by hand: `paygate payments recheck` \
                 finishes the others as the batch would",
                record.card_status.as_str(),
                part.table(),
                record.is_paid,
                record.is_saved
            )));
        }
        // Taken before the lookup: a lookup answered before a confirm still
        // in flight reaches the card company proves nothing however long
        // the resolver then takes.
        let looked_up_at = self.saga.clock.now_ms();
        let evidence = self.saga.card_evidence(record).await;
        if evidence.contradicts(req.decision) && !req.force {
            return Err(ResolveError::Contradicted {
                evidence,
                decision: match req.decision {
                    Decision::Approved => "approved",
                    Decision::NotCharged => "not-charged",
                },
            });
        }
        // "Not charged": a confirm may still be at the card company (on
        // any replica) until the card stack's deadline has passed since
        // the record's last change, so a 404 lookup before then proves
        // nothing. Counted with a margin for the clocks of other replicas.
        // (An approval is a fact at any age.)
        let age_ms = looked_up_at - record.updated_at;
        let in_flight_ms = self.saga.settings.settle_on_access_after.as_millis() as i64;
        if req.decision == Decision::NotCharged && age_ms < in_flight_ms {
            return Err(ResolveError::NotOpen(format!(
                "{pid} last changed {age_ms} ms ago; a confirm may still be at the card company \
                 until {in_flight_ms} ms have passed: resolve it after that"
            )));
        }
        let mut tally = Tally::default();
        // Once the transition applied, what follows is reported, not
        // returned early: the caller audits the decision either way.
        let follow_up: Result<(), StoreError> = match req.decision {
            Decision::Approved => {
                let approved_at = match &evidence {
                    CardEvidence::Approved { approved_at } => approved_at.clone(),
                    _ => paygate_core::time::kst_rfc3339_from_ms(self.saga.clock.now_ms()),
                };
                // An approval the operator saw is a fact whatever changed:
                // guarded on state, as every approval.
                if !self
                    .store
                    .transition(pid, &Transition::MarkPaid { approved_at })
                    .await?
                {
                    return Err(self.raced(pid).await);
                }
                async {
                    if let Some((Partition::Realtime, paid)) = self.store.get(pid).await? {
                        tally += self.settler.save(paid, false).await?;
                    }
                    Ok(())
                }
                .await
            }
            Decision::NotCharged => {
                let t = Transition::MarkAborted {
                    failure_code: OPERATOR_NOT_CHARGED.to_owned(),
                    last_error: format!("resolved not charged by {}: {}", req.operator, req.reason),
                    // Only the record the operator and the lookup judged.
                    seen_version: Some(record.version),
                };
                if !self.store.transition(pid, &t).await? {
                    return Err(self.raced(pid).await);
                }
                if let Some((_, aborted)) = self.store.get(pid).await? {
                    self.saga.hold_on_aborted(&aborted).await;
                }
                self.store
                    .move_record(pid, Partition::Realtime, Partition::Unpaid)
                    .await
                    .map(|moved| tally.unpaid += u64::from(moved))
            }
        };
        Ok(Decided {
            evidence,
            before,
            tally,
            follow_up,
        })
    }

    async fn raced(&self, pid: &PaymentId) -> ResolveError {
        match self.store.get(pid).await {
            Ok(Some((part, r))) => ResolveError::Raced(format!(
                "{} in {}, paid: {}",
                r.card_status.as_str(),
                part.table(),
                r.is_paid
            )),
            Ok(None) => ResolveError::Raced("gone".to_owned()),
            Err(e) => ResolveError::Store(e),
        }
    }
}
