//! Guards I1 and I4 for refunds: recording a done cancel's reversal in the
//! ledger (DESIGN.md §7, `POST /v1/ledger/reversals` with
//! `Idempotency-Key: <payment_id>:cancel:<n>`), by the approval's rule: one
//! synchronous try, bounded async retries drawn from the ledger's retry
//! budget, then the batch ([`Saga::batch_reverse`]) with an alert at its
//! threshold. Every try is a logged call (I3).
//!
//! A reversal is sent only after the approval's own entry: a payment
//! canceled while paid but not yet saved keeps its reversal until the
//! approval is recorded (the ledger would refuse a reversal of an entry it
//! does not hold); the batch saves the approval first, then the reversal.

use std::sync::{atomic::AtomicU32, Arc};

use paygate_alert::AlertReason;
use paygate_api_log::Target;
use paygate_core::PaymentId;
use paygate_ledger_api::{LedgerReversal, REVERSAL_PATH};
use paygate_resilience::{CallError, RequestKind};
use paygate_state_store::{CancelRecord, CancelStatus, CancelTransition};
use tower::retry::budget::Budget as _;

use crate::{
    classify::{self, AttemptError},
    logged_call::{describe_ledger, CallSite, Policy},
    Saga, SaveResult,
};

/// Who makes a reversal try, which says what a failure counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Try {
    /// The cancel's own synchronous try (deposits in the budget).
    Sync,
    /// An async retry (withdrew from the budget).
    Async,
    /// The batch (`batch_attempts`).
    Batch,
}

impl Saga {
    /// One synchronous reversal try of cancel `n`; async retries follow a
    /// transient failure (and a payment whose approval is not saved yet
    /// leaves it to the batch).
    pub(crate) async fn reverse_with_retries(self: &Arc<Self>, pid: &PaymentId, n: i64) {
        if self.reverse_once(pid, n, Try::Sync).await == SaveResult::Retry {
            self.spawn_reversal_retry(pid.clone(), n);
        }
    }

    /// One batch try of the reversal of cancel `n` (a failure counts in its
    /// `batch_attempts`).
    pub async fn batch_reverse(self: &Arc<Self>, pid: &PaymentId, n: i64) -> SaveResult {
        self.reverse_once(pid, n, Try::Batch).await
    }

    fn spawn_reversal_retry(self: &Arc<Self>, pid: PaymentId, n: i64) {
        if self.retries.pending() >= self.settings.ledger_retry_max_pending {
            tracing::warn!(payment_id = %pid, n, "too many async ledger retries; the batch sweep will record this reversal");
            return;
        }
        self.retries.begin();
        let saga = Arc::clone(self);
        tokio::spawn(async move {
            for attempt in 2..=saga.settings.ledger_retry_max_attempts.saturating_add(1) {
                let delay = paygate_resilience::retry::full_jitter_backoff(
                    saga.settings.ledger_retry_base_delay,
                    saga.settings.ledger_retry_max_delay,
                    attempt,
                );
                tokio::time::sleep(delay).await;
                if !saga.ledger_stack.budget().withdraw() {
                    tracing::warn!(payment_id = %pid, n, "ledger retry budget exhausted; the batch sweep will record the reversal");
                    break;
                }
                if saga.reverse_once(&pid, n, Try::Async).await != SaveResult::Retry {
                    break;
                }
            }
            saga.retries.end();
        });
    }

    /// Reads the cancel and its payment, and records the reversal when the
    /// cancel is done and not yet reversed and the approval is saved.
    async fn reverse_once(self: &Arc<Self>, pid: &PaymentId, n: i64, who: Try) -> SaveResult {
        let (record, c) = match (self.store.get(pid).await, self.store.cancels_of(pid).await) {
            (Ok(Some((_, r))), Ok(cancels)) => match cancels.into_iter().find(|c| c.n == n) {
                Some(c) => (r, c),
                None => return SaveResult::Refused,
            },
            (Ok(None), _) => return SaveResult::Refused,
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(payment_id = %pid, n, error = %e, "state store unavailable before a reversal");
                return SaveResult::Retry;
            }
        };
        if c.status != CancelStatus::Done {
            return SaveResult::Refused;
        }
        if c.is_saved {
            return SaveResult::Saved;
        }
        if !record.is_saved {
            // The approval's entry first (see the module doc).
            return SaveResult::Retry;
        }
        let Some(canceled_at) = c.canceled_at.clone() else {
            return SaveResult::Refused;
        };
        let reversal = LedgerReversal {
            payment_id: pid.to_string(),
            cancel_amount: c.amount,
            currency: record.currency.clone(),
            canceled_at,
            reason: c.reason.clone(),
        };
        let res = self.reversal_call(&c, reversal, who).await;
        match res {
            Ok(_) => match self
                .store
                .cancel_transition(pid, n, &CancelTransition::MarkSaved)
                .await
            {
                Ok(_) => SaveResult::Saved,
                Err(e) => {
                    tracing::warn!(payment_id = %pid, n, error = %e, "ledger recorded the reversal but the store failed");
                    SaveResult::Retry
                }
            },
            Err(CallError::Downstream(AttemptError::Downstream(e))) => {
                self.count_failed_reversal(&c, who, e.to_string()).await;
                if e.is_transient() {
                    SaveResult::Retry
                } else {
                    self.alert(
                        &record,
                        AlertReason::ReversalFailed,
                        format!("cancel {n}: the ledger refused the reversal: {e}"),
                    )
                    .await;
                    SaveResult::Refused
                }
            }
            Err(e)
                if e.no_call_made()
                    || matches!(e, CallError::Downstream(AttemptError::LogUnavailable(_))) =>
            {
                tracing::info!(payment_id = %pid, n, reason = %e, "reversal try skipped");
                SaveResult::Retry
            }
            Err(e) => {
                self.count_failed_reversal(&c, who, e.to_string()).await;
                SaveResult::Retry
            }
        }
    }

    async fn reversal_call(
        self: &Arc<Self>,
        c: &CancelRecord,
        reversal: LedgerReversal,
        who: Try,
    ) -> Result<
        paygate_ledger_api::LedgerOutcome,
        CallError<AttemptError<paygate_ledger_api::LedgerApiError>>,
    > {
        let site = CallSite {
            payment_id: c.payment_id.clone(),
            target: Target::LedgerApi,
            method: "POST",
            path: REVERSAL_PATH.to_owned(),
            body: serde_json::to_value(&reversal).ok(),
            attempt_offset: i32::try_from(c.save_attempts + c.batch_attempts).unwrap_or(i32::MAX),
            fusion: crate::logged_call::Fusion::default(),
        };
        let (ledger, key) = (self.ledger.clone(), c.idempotency_key_downstream());
        let call = move || {
            let (ledger, reversal, key) = (ledger.clone(), reversal.clone(), key.clone());
            async move { ledger.reverse(&reversal, &key).await }
        };
        let policy = Policy {
            stack: self.ledger_stack.clone(),
            kind: if who == Try::Async {
                RequestKind::CallerRetry
            } else {
                RequestKind::Idempotent
            },
            max_attempts: None,
            classify: classify::ledger,
            attempt_timeout: paygate_resilience::ATTEMPT_TIMEOUT_RETRYABLE,
        };
        self.through(
            policy,
            site,
            call,
            describe_ledger,
            Arc::new(AtomicU32::new(0)),
        )
        .await
    }

    async fn count_failed_reversal(&self, c: &CancelRecord, who: Try, last_error: String) {
        let t = if who == Try::Batch {
            CancelTransition::BatchSaveFailed { last_error }
        } else {
            CancelTransition::SaveFailed { last_error }
        };
        if let Err(e) = self.store.cancel_transition(&c.payment_id, c.n, &t).await {
            tracing::warn!(payment_id = %c.payment_id, n = c.n, error = %e, "could not count the failed reversal try");
        }
    }
}
