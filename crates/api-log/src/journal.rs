//! Guards I3 while cutting a confirm's commits: a [`Journal`] commits log
//! rows and a guarded state transition together when the state records and
//! the SQL log live in one SQL database (the default), so an approved and
//! saved confirm takes three commits instead of seven:
//!
//! - (a) record + claims + card `REQUEST` row ([`Journal::create_with_request`]);
//! - (b) card `RESPONSE` row + `MarkPaid` + ledger `REQUEST` row;
//! - (c) ledger `RESPONSE` row + `MarkSaved` (both [`Journal::answer_and_transition`]).
//!
//! I3 is unchanged: a call's `REQUEST` row is committed before the call, in
//! the same transaction as the state change that decided to make it. A
//! failed transaction wrote nothing; the saga then falls back to the
//! separate writes of DESIGN.md §4. With the state in MongoDB or in memory
//! there is no journal and every write is its own commit.

use paygate_core::PaymentRecord;
use paygate_state_store::{CreateOutcome, SqlStateStore, StoreError, Transition};

use crate::LogEntry;

/// Log rows and a state change committed together (see the module's doc).
#[async_trait::async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Writes a new `PENDING` record, its claims and `request` (the card
    /// `REQUEST` row of the first attempt) in one commit. On
    /// [`CreateOutcome::Exists`] nothing is written.
    ///
    /// # Errors
    /// [`StoreError`]; then nothing was written.
    async fn create_with_request(
        &self,
        record: &PaymentRecord,
        request: LogEntry<'_>,
    ) -> Result<CreateOutcome, StoreError>;

    /// Writes `answer` (a call's `RESPONSE`/`ERROR` row, always), applies
    /// the guarded `transition` to `answer.payment_id`, and writes `next`
    /// (the following call's `REQUEST` row) only when the transition
    /// applied; one commit. `Ok(true)` when the transition applied.
    ///
    /// # Errors
    /// [`StoreError`]; then nothing was written.
    async fn answer_and_transition(
        &self,
        answer: LogEntry<'_>,
        transition: &Transition,
        next: Option<LogEntry<'_>>,
    ) -> Result<bool, StoreError>;
}

/// The [`Journal`] of a SQL state store whose database also holds the log.
#[derive(Clone, Debug)]
pub struct SqlJournal {
    store: SqlStateStore,
}

impl SqlJournal {
    /// The journal on `store`'s database (which must be the log's).
    pub fn new(store: SqlStateStore) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl Journal for SqlJournal {
    async fn create_with_request(
        &self,
        record: &PaymentRecord,
        request: LogEntry<'_>,
    ) -> Result<CreateOutcome, StoreError> {
        self.store.create_logged(record, &request.to_row()).await
    }

    async fn answer_and_transition(
        &self,
        answer: LogEntry<'_>,
        transition: &Transition,
        next: Option<LogEntry<'_>>,
    ) -> Result<bool, StoreError> {
        let next = next.as_ref().map(LogEntry::to_row);
        self.store
            .transition_logged(
                answer.payment_id,
                &answer.to_row(),
                transition,
                next.as_ref(),
            )
            .await
    }
}
