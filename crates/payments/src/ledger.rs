//! Guards I1 and I4: recording an approved payment in the ledger (DESIGN.md
//! §7, `POST /v1/ledger/transactions` with `Idempotency-Key: <payment_id>`).
//!
//! The confirm makes one synchronous try, so ledger trouble never turns an
//! approval into an error (I4); a transient failure starts bounded async
//! retries (exponential backoff, full jitter, drawn from the ledger's retry
//! budget); whatever they do not finish, the batch does through
//! [`Saga::batch_save`]. Every try is a logged call (I3).

use std::sync::{
    atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    Arc,
};

use paygate_alert::AlertReason;
use paygate_api_log::Target;
use paygate_core::{Partition, PaymentId, PaymentRecord};
use paygate_ledger_api::{LedgerEntry, RECORD_PATH};
use paygate_resilience::{CallError, RequestKind};
use paygate_state_store::Transition;
use tokio::sync::Notify;
use tower::retry::budget::Budget as _;

use crate::{
    classify::{self, AttemptError},
    logged_call::{describe_ledger, CallSite, Fusion, OwnedRow, Policy},
    steps::{Landed, RowNeed, Step},
    Saga,
};

/// Counts async ledger retries in progress, so a caller can wait for them.
#[derive(Debug, Default)]
pub struct RetryTracker {
    pending: AtomicUsize,
    idle: Notify,
}

impl RetryTracker {
    pub(crate) fn begin(&self) {
        self.pending.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn end(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Retries in progress.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Waits until no retry is in progress.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pending() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Result of one ledger try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveResult {
    /// The ledger has it and the record says so.
    Saved,
    /// It failed or was skipped (breaker open, no log row): try again later.
    Retry,
    /// The ledger refused it for good (409 or another 4xx); an operator was
    /// alerted (`ledger_refused`).
    Refused,
}

impl Saga {
    /// One synchronous ledger try; on a transient failure, async retries are
    /// started. Returns whether the ledger has it now.
    pub(crate) async fn save_with_retries(self: &Arc<Self>, record: &PaymentRecord) -> bool {
        self.save_with_retries_prewritten(record, false).await
    }

    /// [`Saga::save_with_retries`]; `prewritten`: the try's `REQUEST` row
    /// was committed with `MarkPaid` (a journal's commit (b)).
    pub(crate) async fn save_with_retries_prewritten(
        self: &Arc<Self>,
        record: &PaymentRecord,
        prewritten: bool,
    ) -> bool {
        match self
            .save_counted(record, RequestKind::Idempotent, false, prewritten)
            .await
        {
            SaveResult::Saved => true,
            SaveResult::Refused => false,
            SaveResult::Retry => {
                self.spawn_ledger_retry(record.payment_id.clone());
                false
            }
        }
    }

    /// Starts bounded async ledger retries for a paid, unsaved payment.
    /// At most `ledger_retry_max_pending` run at once; past that the payment
    /// is left to the batch (it is stored paid and unsaved, so nothing is
    /// only in memory), which keeps a long ledger outage from growing the
    /// task count without bound.
    pub fn spawn_ledger_retry(self: &Arc<Self>, payment_id: PaymentId) {
        if self.retries.pending() >= self.settings.ledger_retry_max_pending {
            tracing::warn!(payment_id = %payment_id, pending = self.retries.pending(),
                "too many async ledger retries in progress; the batch sweep will save this payment");
            metrics::counter!("paygate_ledger_retries_deferred_total").increment(1);
            return;
        }
        self.retries.begin();
        metrics::gauge!("paygate_ledger_retry_queue_depth").set(self.retries.pending() as f64);
        let saga = Arc::clone(self);
        tokio::spawn(async move {
            saga.retry_ledger(&payment_id).await;
            saga.retries.end();
            metrics::gauge!("paygate_ledger_retry_queue_depth").set(saga.retries.pending() as f64);
        });
    }

    async fn retry_ledger(self: &Arc<Self>, pid: &PaymentId) {
        for attempt in 2..=self.settings.ledger_retry_max_attempts.saturating_add(1) {
            let delay = paygate_resilience::retry::full_jitter_backoff(
                self.settings.ledger_retry_base_delay,
                self.settings.ledger_retry_max_delay,
                attempt,
            );
            tokio::time::sleep(delay).await;
            // Async retries draw on the ledger's retry budget like any retry.
            if !self.ledger_stack.budget().withdraw() {
                tracing::warn!(payment_id = %pid, "ledger retry budget exhausted; the batch sweep will retry");
                metrics::counter!("paygate_retry_budget_exhausted_total", "downstream" => "ledger_api").increment(1);
                return;
            }
            let record = match self.store.get(pid).await {
                Ok(Some((Partition::Realtime, r))) => r,
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(payment_id = %pid, error = %e, "state store unavailable during a ledger retry");
                    continue;
                }
            };
            if !record.is_paid || record.is_saved {
                return;
            }
            metrics::counter!("paygate_retries_total", "downstream" => "ledger_api").increment(1);
            match self.save_once(&record, RequestKind::CallerRetry).await {
                SaveResult::Saved | SaveResult::Refused => return,
                SaveResult::Retry => {}
            }
        }
        tracing::warn!(payment_id = %pid, "async ledger retries exhausted; the batch sweep will retry");
    }

    /// One ledger try: `Idempotent` for the synchronous try (it deposits into
    /// the retry budget), `CallerRetry` for an async retry (which withdrew).
    async fn save_once(self: &Arc<Self>, record: &PaymentRecord, kind: RequestKind) -> SaveResult {
        self.save_counted(record, kind, false, false).await
    }

    /// One ledger try for the batch sweep: a failure counts in
    /// `batch_attempts` rather than `save_attempts`.
    pub async fn batch_save(self: &Arc<Self>, record: &PaymentRecord) -> SaveResult {
        self.save_counted(record, RequestKind::Idempotent, true, false)
            .await
    }

    /// The ledger entry of a paid record and its logged call site; `None`
    /// when the record is not paid (only a paid record with its stored
    /// approval time is ever sent: the ledger is the system of record for
    /// settlement).
    pub(crate) fn ledger_site(&self, record: &PaymentRecord) -> Option<(LedgerEntry, CallSite)> {
        let pid = &record.payment_id;
        let approved_at = record.approved_at.clone().filter(|_| record.is_paid)?;
        let entry = LedgerEntry {
            payment_id: pid.to_string(),
            merchant_id: record.merchant_id.to_string(),
            order_id: record.order_id.to_string(),
            payment_key: record.payment_key.clone(),
            amount: record.amount,
            currency: record.currency.clone(),
            approved_at,
        };
        let site = CallSite {
            payment_id: pid.clone(),
            target: Target::LedgerApi,
            method: "POST",
            path: RECORD_PATH.to_owned(),
            body: serde_json::to_value(&entry).ok(),
            attempt_offset: i32::try_from(record.save_attempts).unwrap_or(i32::MAX),
            fusion: Fusion::default(),
        };
        Some((entry, site))
    }

    async fn save_counted(
        self: &Arc<Self>,
        record: &PaymentRecord,
        kind: RequestKind,
        batch: bool,
        prewritten: bool,
    ) -> SaveResult {
        let pid = &record.payment_id;
        let Some((entry, mut site)) = self.ledger_site(record) else {
            tracing::error!(payment_id = %pid, "ledger try refused: the record is not paid");
            return SaveResult::Refused;
        };
        site.fusion = Fusion {
            prewritten: prewritten.then(|| Arc::new(AtomicBool::new(true))),
            deferred: self.journal.as_ref().map(|_| Arc::default()),
        };
        let fusion = site.fusion.clone();
        let first_request = site.first_request();
        let ledger = self.ledger.clone();
        let key = pid.to_string();
        let call = move || {
            let (ledger, entry, key) = (ledger.clone(), entry.clone(), key.clone());
            async move { ledger.record(&entry, &key).await }
        };
        let policy = Policy {
            stack: self.ledger_stack.clone(),
            kind,
            max_attempts: None,
            classify: classify::ledger,
            attempt_timeout: paygate_resilience::ATTEMPT_TIMEOUT_RETRYABLE,
        };
        let res = self
            .through(
                policy,
                site,
                call,
                describe_ledger,
                Arc::new(AtomicU32::new(0)),
            )
            .await;
        self.withdraw_request(&fusion, first_request).await;
        let answer = fusion.take_deferred();
        match res {
            Ok(_) => match self.mark_saved(pid, answer).await {
                Ok(true) => SaveResult::Saved,
                // Saved by another actor already, or changed under us: the
                // store decides, never this try's hope.
                Ok(false) => match self.store.get(pid).await {
                    Ok(Some((_, now))) if now.is_saved => SaveResult::Saved,
                    _ => {
                        tracing::warn!(payment_id = %pid, "ledger recorded the payment but MarkSaved's guard failed; retrying later");
                        SaveResult::Retry
                    }
                },
                Err(e) => {
                    // The ledger has it; the flag will be set by the batch's
                    // idempotent re-record.
                    tracing::warn!(payment_id = %pid, error = %e, "ledger recorded the payment but the state store failed");
                    SaveResult::Retry
                }
            },
            Err(CallError::Downstream(AttemptError::Downstream(e))) => {
                self.count_failed_try(record, batch, e.to_string()).await;
                if e.is_transient() {
                    SaveResult::Retry
                } else {
                    self.alert(record, AlertReason::LedgerRefused, e.to_string())
                        .await;
                    SaveResult::Refused
                }
            }
            Err(e)
                if e.no_call_made()
                    || matches!(e, CallError::Downstream(AttemptError::LogUnavailable(_))) =>
            {
                // Breaker open, bulkhead full, rate limited or no log row:
                // the try is skipped, not failed; retries and the batch follow.
                tracing::info!(payment_id = %pid, reason = %e, "ledger try skipped");
                SaveResult::Retry
            }
            Err(e) => {
                self.count_failed_try(record, batch, e.to_string()).await;
                SaveResult::Retry
            }
        }
    }

    /// `MarkSaved`, guarded, as one step with the ledger's deferred answer
    /// row (see [`crate::steps`]).
    async fn mark_saved(
        &self,
        pid: &PaymentId,
        answer: Option<OwnedRow>,
    ) -> Result<bool, paygate_state_store::StoreError> {
        let step = Step {
            payment_id: pid,
            row: answer,
            need: RowNeed::BestEffort,
            transition: &Transition::MarkSaved,
            next: None,
        };
        match self.commit_step(step).await {
            Landed::Applied { .. } => Ok(true),
            Landed::Refused { .. } => Ok(false),
            Landed::StoreFailed { error, .. } => Err(error),
            // Only a `BeforeTransition` row stops a step.
            Landed::RowFailed(detail) => Err(paygate_state_store::StoreError::Unavailable(detail)),
        }
    }

    /// `save_attempts += 1` (or `batch_attempts` for the batch), guarded on
    /// paid and not saved.
    async fn count_failed_try(&self, record: &PaymentRecord, batch: bool, last_error: String) {
        let t = if batch {
            Transition::BatchSaveFailed { last_error }
        } else {
            Transition::SaveFailed { last_error }
        };
        if let Err(se) = self.store.transition(&record.payment_id, &t).await {
            tracing::warn!(payment_id = %record.payment_id, error = %se, "could not count the failed ledger try");
        }
    }
}
