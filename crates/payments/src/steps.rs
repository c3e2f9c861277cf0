//! The saga's durable steps, written one way whatever the storage.
//!
//! A step is a log row and a guarded [`Transition`] of the payment, and
//! after an applied transition, optionally, the next call's `REQUEST` row:
//! the card `REQUEST` row and the fence `MarkSending` before the card call;
//! the card's answer row, `MarkPaid` and the ledger's `REQUEST` row after an
//! approval; the ledger's answer row and `MarkSaved`. With a journal (state
//! and log in one SQL database, [`paygate_api_log::journal`]) a step is one
//! commit. Without one, or when that commit fails (it then wrote nothing,
//! or, its answer lost, all of it), its parts are written apart in the same
//! order. The saga asks [`Saga::commit_step`] and reads one [`Landed`]: the
//! storage is not a second path through the saga.

use paygate_core::PaymentId;
use paygate_state_store::{StoreError, Transition};

use crate::{logged_call::OwnedRow, Saga};

/// What a step's row is to its transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowNeed {
    /// A `REQUEST` row: durable before the transition that lets the call go
    /// (I3). A row that cannot be written stops the step.
    BeforeTransition,
    /// An answer row: the call is already logged as a `REQUEST`; losing
    /// this row costs the log a line, never the transition.
    BestEffort,
}

/// One durable step.
pub(crate) struct Step<'a> {
    /// The payment whose record the transition changes.
    pub payment_id: &'a PaymentId,
    /// The row written first (`None`: an answer that left no row).
    pub row: Option<OwnedRow>,
    /// What the row is to the transition.
    pub need: RowNeed,
    /// The guarded transition.
    pub transition: &'a Transition,
    /// The next call's `REQUEST` row, committed with an applied transition
    /// when a journal commits the step; written apart, it is left to the
    /// next call (which then writes it itself).
    pub next: Option<OwnedRow>,
}

/// How a step landed.
#[derive(Debug)]
pub(crate) enum Landed {
    /// The transition applied; `next_written`: the `next` row was committed
    /// with it (the next call must not write it again).
    Applied { next_written: bool },
    /// The guard failed: another actor changed the record since it was
    /// read. `row_twice`: the row may have landed twice (a journal commit
    /// whose answer was lost, then the row written apart).
    Refused { row_twice: bool },
    /// A [`RowNeed::BeforeTransition`] row could not be written: the
    /// transition was not tried (the error's text, for the record).
    RowFailed(String),
    /// The store did not answer the transition (it may or may not have
    /// applied); `row_twice` as for [`Landed::Refused`].
    StoreFailed { error: StoreError, row_twice: bool },
}

impl Saga {
    /// Writes `step`: one journal commit, else its row, its transition (and
    /// never its `next` row) apart. See the module's doc.
    pub(crate) async fn commit_step(&self, step: Step<'_>) -> Landed {
        let pid = step.payment_id;
        let mut row_twice = false;
        if let (Some(journal), Some(row)) = (&self.journal, &step.row) {
            match journal
                .answer_and_transition(
                    row.entry(),
                    step.transition,
                    step.next.as_ref().map(OwnedRow::entry),
                )
                .await
            {
                Ok(true) => {
                    return Landed::Applied {
                        next_written: step.next.is_some(),
                    }
                }
                Ok(false) => return Landed::Refused { row_twice: false },
                // One transaction: nothing was written, or (a lost commit
                // answer) all of it. Writing the parts apart is safe either
                // way: had it landed, the transition's guard now fails.
                Err(e) => {
                    row_twice = true;
                    tracing::warn!(payment_id = %pid, error = %e,
                        "could not commit the step's row with its transition; writing them apart");
                }
            }
        }
        if let Some(row) = &step.row {
            if let Err(e) = self.log.append(row.entry()).await {
                match step.need {
                    RowNeed::BeforeTransition => return Landed::RowFailed(e.to_string()),
                    RowNeed::BestEffort => {
                        tracing::warn!(payment_id = %pid, target = row.target.as_str(), error = %e,
                            "could not write the response row; the call itself was logged as a REQUEST");
                    }
                }
            }
        }
        match self.store.transition(pid, step.transition).await {
            Ok(true) => Landed::Applied {
                next_written: false,
            },
            Ok(false) => Landed::Refused { row_twice },
            Err(error) => Landed::StoreFailed { error, row_twice },
        }
    }
}
