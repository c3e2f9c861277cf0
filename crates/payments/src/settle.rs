//! Guards I1 (no lost approval) for the actors that come after the confirm:
//! the batch sweep and the reconciliation settle a payment whose card outcome
//! is not known by looking it up ([`Saga::settle_unknown`]), and save a paid,
//! unsaved payment in the ledger ([`Settler::save`]), filing each record in
//! its partition. Both share [`Settler`], so a payment is settled the same
//! way whoever finds it.

use std::sync::Arc;

use paygate_alert::AlertReason;
use paygate_core::{CardStatus, Partition, PaymentRecord};
use paygate_state_store::{StateStore, StoreError, Transition};

use crate::{
    expiry::Absent,
    ledger::SaveResult,
    outcome::{CardVerdict, Settlement},
    Saga,
};

impl Saga {
    /// Settles a payment whose card outcome is not known (`PENDING` past its
    /// grace period, or `UNKNOWN`) by looking it up at the card company, and
    /// records what it learns: paid, or declined. Used by the batch sweep
    /// and the reconciliation.
    ///
    /// # Errors
    /// [`StoreError`] when the outcome could not be recorded.
    pub async fn settle_unknown(
        self: &Arc<Self>,
        record: &PaymentRecord,
    ) -> Result<Settlement, StoreError> {
        let (verdict, version) = match self.settle_by_lookup(record).await {
            // The card company has no payment for the order: re-send it
            // inside its confirm window, settle it as not charged after.
            CardVerdict::Absent { detail } => match self.when_absent(record, detail).await {
                Absent::Judged(verdict, version) => (verdict, version),
                Absent::Expire(detail) => return self.expire(record, detail).await,
                Absent::Wait(detail, version) => {
                    return Ok(Settlement::Waiting { detail, version })
                }
            },
            verdict => (verdict, record.version),
        };
        self.record_verdict(record, verdict, version).await
    }

    /// Settles `record` (not paid, outcome unknown) from a payment the
    /// caller just looked up (a card webhook's worker, which looks once):
    /// approved → paid, declined → `ABORTED`, a mismatch as
    /// [`Saga::settle_unknown`] says it. `Ok(None)` when the card company's
    /// status is not final yet (nothing is written; the next change, or the
    /// janitor, settles it).
    ///
    /// # Errors
    /// [`StoreError`] when the outcome could not be recorded.
    pub async fn settle_found(
        self: &Arc<Self>,
        record: &PaymentRecord,
        found: paygate_card_api::CardPayment,
    ) -> Result<Option<Settlement>, StoreError> {
        match self.verdict_of_lookup(record, found) {
            Ok(verdict) => self
                .record_verdict(record, verdict, record.version)
                .await
                .map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Records what the card company's answers settled for `record`
    /// (`version`: the version they were judged at).
    async fn record_verdict(
        self: &Arc<Self>,
        record: &PaymentRecord,
        verdict: CardVerdict,
        version: i64,
    ) -> Result<Settlement, StoreError> {
        let pid = &record.payment_id;
        match verdict {
            CardVerdict::Approved(p) => {
                let approved_at = self.approved_at_of(&p);
                let t = Transition::MarkPaid { approved_at };
                if self.store.transition(pid, &t).await? {
                    self.hold_on_paid(record).await;
                    return Ok(Settlement::Paid);
                }
                // The guard failed: believe the store, not the lookup alone.
                match self.store.get(pid).await? {
                    Some((_, now)) if now.is_paid => Ok(Settlement::Paid),
                    now => Ok(Settlement::Mismatch(format!(
                        "the card company approved, but the record could not be marked paid (it is {})",
                        describe(now.as_ref())
                    ))),
                }
            }
            CardVerdict::Declined { code, message } => {
                let t = Transition::MarkAborted {
                    failure_code: code,
                    last_error: message,
                    seen_version: None,
                };
                if self.store.transition(pid, &t).await? {
                    self.hold_on_aborted(record).await;
                    return Ok(Settlement::Declined);
                }
                match self.store.get(pid).await? {
                    // Declined already (an earlier settlement whose
                    // acknowledgement was lost, or another actor): the
                    // card company's decline is final for the payment, so
                    // its hold is released here too, or it stays `during`
                    // for nobody.
                    Some((_, now)) if now.card_status == CardStatus::Aborted && !now.is_paid => {
                        self.hold_on_aborted(&now).await;
                        Ok(Settlement::Declined)
                    }
                    Some((_, now)) if now.is_paid => Ok(Settlement::Mismatch(format!(
                        "the card company shows the order not approved, but the record is paid ({})",
                        now.card_status.as_str()
                    ))),
                    now => Ok(Settlement::Unknown {
                        detail: format!(
                            "the decline could not be recorded (the record is {})",
                            describe(now.as_ref())
                        ),
                        version,
                    }),
                }
            }
            CardVerdict::Unsettled { detail } | CardVerdict::NoCall { detail, .. } => {
                Ok(Settlement::Unknown { detail, version })
            }
            CardVerdict::Absent { detail } => Ok(Settlement::Waiting { detail, version }),
            CardVerdict::Mismatch {
                detail,
                canceled: true,
            } => Ok(Settlement::Canceled(detail)),
            CardVerdict::Mismatch { detail, .. } => Ok(Settlement::Mismatch(detail)),
        }
    }
}

/// "PENDING in realtime_payments", or "gone".
fn describe(r: Option<&(Partition, PaymentRecord)>) -> String {
    r.map_or("gone".to_owned(), |(part, r)| {
        format!("{} in {}", r.card_status.as_str(), part.table())
    })
}

/// What settling or saving records did, in the units of the batch's
/// summary; the batch and the reconciliation add these up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Moved to `completed_payments`.
    pub completed: u64,
    /// Moved to `unpaid_payments`.
    pub unpaid: u64,
    /// Unknown outcomes settled by a lookup.
    pub settled: u64,
    /// Ledger tries made.
    pub retried: u64,
    /// Ledger tries that saved the payment.
    pub saved: u64,
    /// New alerts raised.
    pub alerts: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, b: Tally) {
        self.completed += b.completed;
        self.unpaid += b.unpaid;
        self.settled += b.settled;
        self.retried += b.retried;
        self.saved += b.saved;
        self.alerts += b.alerts;
    }
}

/// Settles and saves single records exactly as the batch does: shared by
/// the batch sweep and the reconciliation (which settles stale pending
/// records and recovers approvals the same way).
pub struct Settler {
    store: Arc<dyn StateStore>,
    saga: Arc<Saga>,
    ledger_alert_threshold: i64,
}

impl Settler {
    /// A settler over the store and the saga (card lookups and ledger saves
    /// go through its resilience stacks and SQL log); "ledger save failed"
    /// is raised at `ledger_alert_threshold` batch attempts.
    pub fn new(store: Arc<dyn StateStore>, saga: Arc<Saga>, ledger_alert_threshold: i64) -> Self {
        Self {
            store,
            saga,
            ledger_alert_threshold,
        }
    }

    /// Paid, not saved: one ledger try (`batch_attempts += 1` on failure);
    /// saved: move to `completed_payments`; at the threshold, alert once.
    /// A dry run counts the try and does nothing.
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    pub async fn save(&self, r: PaymentRecord, dry_run: bool) -> Result<Tally, StoreError> {
        let mut t = Tally {
            retried: 1,
            ..Tally::default()
        };
        if dry_run {
            return Ok(t);
        }
        // A paid payment sells its hold (a no-op when sold or absent).
        self.saga.hold_on_paid(&r).await;
        match self.saga.batch_save(&r).await {
            SaveResult::Saved => {
                t.saved += 1;
                if self
                    .store
                    .move_record(&r.payment_id, Partition::Realtime, Partition::Completed)
                    .await?
                {
                    t.completed += 1;
                }
            }
            SaveResult::Retry => {
                let attempts = match self.store.get(&r.payment_id).await? {
                    Some((_, now)) => now.batch_attempts,
                    None => r.batch_attempts,
                };
                if attempts >= self.ledger_alert_threshold {
                    let detail = format!(
                        "ledger save failed {attempts} times in the batch; last error: {}",
                        r.last_error.clone().unwrap_or_default()
                    );
                    if self
                        .saga
                        .alert(&r, AlertReason::LedgerSaveFailed, detail)
                        .await
                    {
                        t.alerts += 1;
                    }
                }
            }
            // Refused for good: the saga alerted (ledger_refused).
            SaveResult::Refused => {}
        }
        Ok(t)
    }

    /// Not paid, outcome unknown: looks the payment up at the card company
    /// by orderId and files it: approved → paid, then [`Settler::save`];
    /// declined → `unpaid_payments`; still unknown → `UNKNOWN` + alert
    /// "payment needs checking"; the card's answer does not match → alert.
    /// Returns what the lookup settled (`None` in a dry run, which calls
    /// nothing and counts one settlement).
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    pub async fn settle(
        &self,
        r: PaymentRecord,
        dry_run: bool,
    ) -> Result<(Option<Settlement>, Tally), StoreError> {
        let mut t = Tally::default();
        if dry_run {
            t.settled += 1;
            return Ok((None, t));
        }
        let settlement = self.saga.settle_unknown(&r).await?;
        let t = self.file(&r, &settlement).await?;
        Ok((Some(settlement), t))
    }

    /// [`Settler::settle`] from a payment the caller just looked up
    /// ([`Saga::settle_found`]): the record filed the same way. `Ok(None)`
    /// when the card company's status is not final yet.
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    pub async fn settle_found(
        &self,
        r: PaymentRecord,
        found: paygate_card_api::CardPayment,
    ) -> Result<Option<(Settlement, Tally)>, StoreError> {
        let Some(settlement) = self.saga.settle_found(&r, found).await? else {
            return Ok(None);
        };
        let t = self.file(&r, &settlement).await?;
        Ok(Some((settlement, t)))
    }

    /// Files `r` by what settled it: paid → saved in the ledger and moved;
    /// declined → `unpaid_payments`; unknown → counted, and an operator
    /// told; a mismatch → an alert.
    async fn file(&self, r: &PaymentRecord, settlement: &Settlement) -> Result<Tally, StoreError> {
        let mut t = Tally::default();
        let r = r.clone();
        match settlement {
            Settlement::Paid => {
                t.settled += 1;
                if let Some((Partition::Realtime, paid)) = self.store.get(&r.payment_id).await? {
                    t += self.save(paid, false).await?;
                }
            }
            Settlement::Declined => {
                t.settled += 1;
                if self
                    .store
                    .move_record(&r.payment_id, Partition::Realtime, Partition::Unpaid)
                    .await?
                {
                    t.unpaid += 1;
                }
            }
            Settlement::Waiting { detail, version } => {
                self.count_check(&r, detail, *version).await?;
            }
            Settlement::Unknown { detail, version } => {
                let expected = self.count_check(&r, detail, *version).await?;
                let detail = format!("payment needs checking: {detail}");
                if self.still_as_read(&r, expected).await?
                    && self
                        .saga
                        .alert(&r, AlertReason::OutcomeUnknown, detail)
                        .await
                {
                    t.alerts += 1;
                }
            }
            // Raised whatever changed since the read: every mismatch but a
            // cancel was checked against a fresh read already (a failed
            // MarkPaid re-reads the record), and an approval the record
            // cannot take is I1's last line.
            Settlement::Mismatch(detail) => {
                if self
                    .saga
                    .alert(&r, AlertReason::CardMismatch, detail.clone())
                    .await
                {
                    t.alerts += 1;
                }
            }
            // A cancel at the card company is explained by a record read
            // again paid (approved and refunded since the read).
            Settlement::Canceled(detail) => {
                let paid_now =
                    matches!(self.store.get(&r.payment_id).await?, Some((_, f)) if f.is_paid);
                if paid_now {
                    tracing::info!(payment_id = %r.payment_id,
                        "the card company shows a cancel of a payment approved since it was read; no alert");
                } else if self
                    .saga
                    .alert(&r, AlertReason::CardMismatch, detail.clone())
                    .await
                {
                    t.alerts += 1;
                }
            }
        }
        Ok(t)
    }

    /// A check that learned nothing is counted on the record (the recheck
    /// schedule backs off by it), guarded on the version the check was
    /// judged at; returns the version the record is at if nobody else
    /// moved it.
    async fn count_check(
        &self,
        r: &PaymentRecord,
        detail: &str,
        version: i64,
    ) -> Result<i64, StoreError> {
        let checked = Transition::CheckedUnknown {
            last_error: detail.to_owned(),
            seen_version: version,
        };
        Ok(if self.store.transition(&r.payment_id, &checked).await? {
            version + 1
        } else {
            version
        })
    }

    /// An alert is a state change too: "outcome unknown" is raised only
    /// when a fresh read shows the record at `expected` (the version the
    /// verdict was drawn from, plus this settler's own transition). A
    /// record another actor moved on since (the saga approved or declined
    /// it) makes the lookup's silence stale, not alarming: the next sweep
    /// judges it again from what it is then.
    async fn still_as_read(&self, r: &PaymentRecord, expected: i64) -> Result<bool, StoreError> {
        let fresh = self.store.get(&r.payment_id).await?;
        let same = fresh.as_ref().is_some_and(|(_, f)| f.version == expected);
        if !same {
            tracing::info!(payment_id = %r.payment_id,
                "the record changed since the lookup was decided; no alert, the next sweep judges it again");
        }
        Ok(same)
    }
}
