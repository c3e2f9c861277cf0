//! The confirm saga of DESIGN.md §4, and the ledger retries that finish it.
//!
//! Order of work for one confirm, each step durable before the next:
//! 1. the state record (`PENDING`) and its order / idempotency-key claims;
//! 2. the card `REQUEST` row in the SQL log (no row, no call: invariant I3);
//! 3. the card confirm with `Idempotency-Key: <payment_id>`, retried on 5xx;
//!    after a lost answer, lookups by orderId settle it (invariant I1);
//! 4. the `RESPONSE`/`ERROR` row and the record's new state;
//! 5. one synchronous ledger try; on failure, bounded async retries with
//!    exponential backoff and full jitter, then the batch (invariant I4).

use std::{
    future::Future,
    sync::{
        atomic::{AtomicU32, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use paygate_api_log::{Kind, LogEntry, SqlApiLog, Target};
use paygate_card_api::{
    codes, CancelRequest, CardApi, CardApiError, CardPayment, ConfirmRequest, Transaction,
    TransactionsQuery, CONFIRM_PATH,
};
use paygate_core::{
    payment::failure_codes, CardStatus, MerchantId, OrderId, Partition, PaymentId, PaymentRecord,
};
use paygate_ledger_api::{LedgerApi, LedgerApiError, LedgerEntry, LedgerOutcome, RECORD_PATH};
use paygate_resilience::{CallError, CallOutcome, Downstream, ErrorClass, RequestKind};
use paygate_state_store::{CreateOutcome, StateStore, Transition};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tower::retry::budget::Budget;

use paygate_alert::{Alert, AlertReason, Alerter};

/// Tunables of the saga. Durations are wall-clock (tokio time).
#[derive(Clone, Debug)]
pub struct SagaSettings {
    /// Currency of every payment (`KRW`).
    pub currency: String,
    /// Lookups by orderId after a lost answer.
    pub lookup_attempts: u32,
    /// Delay before the second lookup (grows linearly).
    pub lookup_delay: Duration,
    /// Async ledger retries after the synchronous try.
    pub ledger_retry_max_attempts: u32,
    /// First async ledger retry delay (doubles, full jitter).
    pub ledger_retry_base_delay: Duration,
    /// Cap on one ledger retry delay.
    pub ledger_retry_max_delay: Duration,
}

impl Default for SagaSettings {
    fn default() -> Self {
        Self {
            currency: "KRW".to_owned(),
            lookup_attempts: 3,
            lookup_delay: Duration::from_millis(100),
            ledger_retry_max_attempts: 5,
            ledger_retry_base_delay: Duration::from_millis(200),
            ledger_retry_max_delay: Duration::from_secs(10),
        }
    }
}

/// A validated confirm request from an authenticated merchant.
#[derive(Clone, Debug)]
pub struct ConfirmInput {
    /// The authenticated merchant.
    pub merchant_id: MerchantId,
    /// The card company's payment key.
    pub payment_key: String,
    /// The merchant's order id.
    pub order_id: OrderId,
    /// Amount, minor units, >= 1.
    pub amount: i64,
    /// The merchant's `Idempotency-Key` header (unquoted), if sent.
    pub idempotency_key: Option<String>,
}

/// Which claim a different body collided with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// The `Idempotency-Key` was used for another body.
    IdempotencyKey,
    /// The orderId was used for another body.
    OrderId,
}

/// How a confirm ended, before it becomes an HTTP answer.
#[derive(Clone, Debug)]
pub enum ConfirmOutcome {
    /// 200: approved (`is_saved` says whether the ledger has it yet).
    Approved(PaymentRecord),
    /// 402: declined by the card company, with its code and message.
    Declined {
        /// The record (`ABORTED`).
        record: PaymentRecord,
        /// The card company's code.
        code: String,
        /// The card company's message.
        message: String,
    },
    /// 202: outcome unknown; an operator was alerted.
    Unknown(PaymentRecord),
    /// 409: the same confirm is still being processed.
    InFlight(PaymentRecord),
    /// 422: the key or the order was used with a different body.
    Reused {
        /// The payment holding the claim.
        payment_id: PaymentId,
        /// Which claim.
        reuse: Reuse,
    },
    /// 503: paygate could not safely proceed; no card call was made.
    Unavailable {
        /// Safe, merchant-facing detail.
        detail: &'static str,
        /// The payment, when a record exists.
        payment_id: Option<PaymentId>,
        /// Seconds after which a retry may succeed (an open breaker's wait).
        retry_after_s: Option<u64>,
    },
}

/// Counts async ledger retries in progress, so a caller can wait for them.
#[derive(Debug, Default)]
pub struct RetryTracker {
    pending: AtomicUsize,
    idle: Notify,
}

impl RetryTracker {
    fn begin(&self) {
        self.pending.fetch_add(1, Ordering::SeqCst);
    }

    fn end(&self) {
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

/// What the card company's answers settled.
enum CardVerdict {
    Approved(Box<CardPayment>),
    Declined {
        code: String,
        message: String,
    },
    NoCall {
        code: &'static str,
        detail: String,
        retry_after_s: Option<u64>,
    },
    Unsettled {
        detail: String,
    },
    Mismatch {
        detail: String,
    },
}

/// What a lookup settled (see [`Saga::settle_unknown`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// The card company approved it; the record is now paid.
    Paid,
    /// The card company declined it; the record is now `ABORTED`.
    Declined,
    /// Still not known.
    Unknown(String),
    /// The card company's answer does not match the payment.
    Mismatch(String),
}

/// Result of one ledger try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SaveResult {
    Saved,
    Retry,
    Refused,
}

/// One attempt's failure: the downstream's error, or the `REQUEST` row could
/// not be written, in which case this attempt made no call (invariant I3).
#[derive(Debug, thiserror::Error)]
enum AttemptError<E> {
    #[error(transparent)]
    Downstream(E),
    #[error("request log unavailable: {0}")]
    LogUnavailable(String),
}

const NO_RETRY_IGNORED: ErrorClass = ErrorClass {
    outcome: CallOutcome::Ignored,
    retryable: false,
    retry_after: None,
};

/// Card confirm: 5xx, 429 and "still processing" are retried with the same
/// idempotency key; a timeout or reset is settled by lookup, not re-sent; a
/// decline is a healthy answer for the breaker.
fn classify_confirm(e: &AttemptError<CardApiError>) -> ErrorClass {
    let AttemptError::Downstream(e) = e else {
        return NO_RETRY_IGNORED;
    };
    let class = |outcome, retryable| ErrorClass {
        outcome,
        retryable,
        retry_after: e.retry_after(),
    };
    if e.is_auth_failure() {
        return NO_RETRY_IGNORED;
    }
    if e.is_decline() {
        return class(CallOutcome::Success, false);
    }
    match e {
        CardApiError::Server { .. } => class(CallOutcome::Failure, true),
        CardApiError::Rejected { status: 429, .. } => class(CallOutcome::Failure, true),
        CardApiError::Rejected { code, .. } if code == codes::IDEMPOTENT_REQUEST_PROCESSING => {
            class(CallOutcome::Success, true)
        }
        CardApiError::Rejected { .. } if e.is_transient() => class(CallOutcome::Failure, true),
        CardApiError::Rejected { .. } => class(CallOutcome::Success, false),
        CardApiError::Timeout | CardApiError::Connection(_) | CardApiError::Decode(_) => {
            class(CallOutcome::Failure, false)
        }
    }
}

/// Lookups: the saga's own loop spaces them out; the stack makes one attempt.
fn classify_lookup(e: &AttemptError<CardApiError>) -> ErrorClass {
    let AttemptError::Downstream(e) = e else {
        return NO_RETRY_IGNORED;
    };
    let outcome = match e {
        CardApiError::Rejected { status, .. } if *status != 429 => CallOutcome::Success,
        _ => CallOutcome::Failure,
    };
    ErrorClass {
        outcome,
        retryable: false,
        retry_after: e.retry_after(),
    }
}

/// Transaction-list pages (reads) and cancels (which carry an idempotency
/// key, so the card company replays the first answer): 5xx, 429, timeouts
/// and resets are retried within the budget; other 4xx are healthy refusals;
/// a failed `REQUEST` row is no call and no retry.
fn classify_repeatable(e: &AttemptError<CardApiError>) -> ErrorClass {
    let AttemptError::Downstream(e) = e else {
        return NO_RETRY_IGNORED;
    };
    let transient = e.is_transient() || matches!(e, CardApiError::Rejected { status: 429, .. });
    ErrorClass {
        outcome: if transient {
            CallOutcome::Failure
        } else {
            CallOutcome::Success
        },
        retryable: transient,
        retry_after: e.retry_after(),
    }
}

/// Ledger: 5xx, timeouts and resets are failures and may be retried; a 409 or
/// other 4xx is a healthy refusal that no retry will change.
fn classify_ledger(e: &AttemptError<LedgerApiError>) -> ErrorClass {
    let AttemptError::Downstream(e) = e else {
        return NO_RETRY_IGNORED;
    };
    if e.is_transient() {
        ErrorClass {
            outcome: CallOutcome::Failure,
            retryable: true,
            retry_after: None,
        }
    } else {
        ErrorClass {
            outcome: CallOutcome::Success,
            retryable: false,
            retry_after: None,
        }
    }
}

/// The saga and everything it calls. Shared as `Arc<Saga>`.
pub struct Saga {
    store: Arc<dyn StateStore>,
    log: SqlApiLog,
    card: Arc<dyn CardApi>,
    ledger: Arc<dyn LedgerApi>,
    card_stack: Arc<Downstream>,
    ledger_stack: Arc<Downstream>,
    alerter: Arc<dyn Alerter>,
    settings: SagaSettings,
    retries: RetryTracker,
}

fn describe_card<T: serde::Serialize>(
    res: &Result<T, CardApiError>,
) -> (Kind, Option<i32>, Option<Value>) {
    match res {
        Ok(v) => (Kind::Response, Some(200), serde_json::to_value(v).ok()),
        Err(
            CardApiError::Rejected {
                status,
                code,
                message,
                ..
            }
            | CardApiError::Server {
                status,
                code,
                message,
                ..
            },
        ) => (
            Kind::Response,
            Some(i32::from(*status)),
            Some(json!({"code": code, "message": message})),
        ),
        Err(e) => (
            Kind::Error,
            None,
            Some(json!({"code": e.code(), "message": e.to_string()})),
        ),
    }
}

fn describe_lookup(
    res: &Result<Option<CardPayment>, CardApiError>,
) -> (Kind, Option<i32>, Option<Value>) {
    match res {
        Ok(None) => (
            Kind::Response,
            Some(404),
            Some(json!({"code": codes::NOT_FOUND_PAYMENT})),
        ),
        Ok(Some(p)) => (Kind::Response, Some(200), serde_json::to_value(p).ok()),
        Err(e) => describe_card::<()>(&Err(e.clone())),
    }
}

fn describe_page(res: &Result<Vec<Transaction>, CardApiError>) -> Row {
    match res {
        Ok(page) => (
            Kind::Response,
            Some(200),
            Some(json!({"transactions": page.len()})),
        ),
        Err(e) => describe_card::<()>(&Err(e.clone())),
    }
}

fn describe_ledger(
    res: &Result<LedgerOutcome, LedgerApiError>,
) -> (Kind, Option<i32>, Option<Value>) {
    match res {
        Ok(LedgerOutcome::Recorded) => (Kind::Response, Some(201), None),
        Ok(LedgerOutcome::AlreadyRecorded) => (Kind::Response, Some(200), None),
        Err(e) => match e.status() {
            Some(s) => (
                Kind::Response,
                Some(i32::from(s)),
                Some(json!({"message": e.to_string()})),
            ),
            None => (Kind::Error, None, Some(json!({"message": e.to_string()}))),
        },
    }
}

/// A logged row's kind, status and body for a call's result.
type Row = (Kind, Option<i32>, Option<Value>);

/// Turns a call's result into its `RESPONSE`/`ERROR` row.
type Describe<T, E> = fn(&Result<T, E>) -> Row;

/// Where one logged downstream call goes.
struct CallSite {
    payment_id: PaymentId,
    target: Target,
    method: &'static str,
    path: String,
    body: Option<Value>,
    /// Added to the stack's attempt number (from 1) for the log's `attempt`.
    attempt_offset: i32,
}

impl Saga {
    /// A saga over its downstreams and their resilience stacks.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn StateStore>,
        log: SqlApiLog,
        card: Arc<dyn CardApi>,
        ledger: Arc<dyn LedgerApi>,
        card_stack: Arc<Downstream>,
        ledger_stack: Arc<Downstream>,
        alerter: Arc<dyn Alerter>,
        settings: SagaSettings,
    ) -> Self {
        Self {
            store,
            log,
            card,
            ledger,
            card_stack,
            ledger_stack,
            alerter,
            settings,
            retries: RetryTracker::default(),
        }
    }

    /// The async ledger retries in progress.
    pub fn retries(&self) -> &RetryTracker {
        &self.retries
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// The card API's resilience stack.
    pub fn card_stack(&self) -> &Arc<Downstream> {
        &self.card_stack
    }

    /// The ledger's resilience stack.
    pub fn ledger_stack(&self) -> &Arc<Downstream> {
        &self.ledger_stack
    }

    /// Makes a downstream call through `stack`. Every attempt first writes
    /// its `REQUEST` row and makes the call only if that succeeded (I3), then
    /// writes the `RESPONSE`/`ERROR` row (best effort: the call happened).
    /// `sent` counts the attempts that actually left.
    #[allow(clippy::too_many_arguments)]
    fn through<T, E, F, Fut>(
        self: &Arc<Self>,
        stack: &Arc<Downstream>,
        kind: RequestKind,
        max_attempts: Option<u32>,
        site: CallSite,
        call: F,
        describe: Describe<T, E>,
        classify: fn(&AttemptError<E>) -> ErrorClass,
        sent: Arc<AtomicU32>,
    ) -> impl Future<Output = Result<T, CallError<AttemptError<E>>>> + Send + 'static
    where
        T: Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let saga = Arc::clone(self);
        let site = Arc::new(site);
        let stack = Arc::clone(stack);
        let attempt = move |n: u32| {
            let saga = saga.clone();
            let site = site.clone();
            let sent = sent.clone();
            let fut = call();
            async move {
                let attempt = site.attempt_offset + i32::try_from(n).unwrap_or(i32::MAX);
                let entry = |kind, status_code, body, latency_ms| LogEntry {
                    payment_id: &site.payment_id,
                    target: site.target,
                    kind,
                    attempt,
                    method: site.method,
                    path: &site.path,
                    status_code,
                    body,
                    latency_ms,
                };
                saga.log
                    .append(entry(Kind::Request, None, site.body.clone(), None))
                    .await
                    .map_err(|e| AttemptError::LogUnavailable(e.to_string()))?;
                sent.fetch_add(1, Ordering::SeqCst);
                let started = tokio::time::Instant::now();
                let res = fut.await;
                let latency = started.elapsed().as_millis() as i64;
                let (kind, status, body) = describe(&res);
                if let Err(e) = saga
                    .log
                    .append(entry(kind, status, body, Some(latency)))
                    .await
                {
                    tracing::warn!(payment_id = %site.payment_id, target = site.target.as_str(), error = %e,
                        "could not write the response row; the call itself was logged as a REQUEST");
                }
                res.map_err(AttemptError::Downstream)
            }
        };
        async move { stack.call(kind, max_attempts, attempt, classify).await }
    }

    /// Runs the confirm saga for one request.
    pub async fn confirm(self: &Arc<Self>, input: ConfirmInput) -> ConfirmOutcome {
        let fingerprint = paygate_core::crypto::fingerprint(&[
            &input.payment_key,
            input.order_id.as_str(),
            &input.amount.to_string(),
        ]);
        let record = PaymentRecord::new_pending(
            input.merchant_id.clone(),
            input.order_id.clone(),
            input.payment_key.clone(),
            input.amount,
            self.settings.currency.clone(),
            fingerprint.clone(),
            input.idempotency_key.clone(),
            paygate_core::time::now_ms(),
        );
        let span = tracing::Span::current();
        match self.store.create(&record).await {
            Ok(CreateOutcome::Created) => {
                span.record("payment_id", record.payment_id.as_str());
                self.run(record).await
            }
            Ok(CreateOutcome::Exists(existing)) => {
                span.record("payment_id", existing.payment_id.as_str());
                self.replay(*existing, &input, &fingerprint).await
            }
            Err(e) => {
                tracing::error!(order_id = %input.order_id, error = %e, "state store unavailable; no card call made");
                ConfirmOutcome::Unavailable {
                    detail: "payment state store unavailable; nothing was charged",
                    payment_id: None,
                    retry_after_s: None,
                }
            }
        }
    }

    async fn replay(
        self: &Arc<Self>,
        existing: PaymentRecord,
        input: &ConfirmInput,
        fingerprint: &str,
    ) -> ConfirmOutcome {
        if existing.request_fingerprint != fingerprint {
            let reuse = match (&input.idempotency_key, &existing.idempotency_key) {
                (Some(a), Some(b)) if a == b => Reuse::IdempotencyKey,
                _ => Reuse::OrderId,
            };
            return ConfirmOutcome::Reused {
                payment_id: existing.payment_id,
                reuse,
            };
        }
        match existing.card_status {
            CardStatus::Pending => ConfirmOutcome::InFlight(existing),
            CardStatus::Done | CardStatus::Canceled => ConfirmOutcome::Approved(existing),
            CardStatus::Unknown => ConfirmOutcome::Unknown(existing),
            CardStatus::Aborted => {
                let code = existing.failure_code.clone().unwrap_or_default();
                if failure_codes::is_no_call(&code) {
                    // No card call was made for it: this retry may try again.
                    // The batch may have moved it to unpaid_payments already.
                    if let Ok(Some((Partition::Unpaid, _))) =
                        self.store.get(&existing.payment_id).await
                    {
                        let _ = self
                            .store
                            .move_record(
                                &existing.payment_id,
                                Partition::Unpaid,
                                Partition::Realtime,
                            )
                            .await;
                    }
                    return match self
                        .store
                        .transition(
                            &existing.payment_id,
                            &Transition::Reopen { failure_code: code },
                        )
                        .await
                    {
                        Ok(true) => {
                            let mut reopened = existing;
                            reopened.card_status = CardStatus::Pending;
                            reopened.failure_code = None;
                            self.run(reopened).await
                        }
                        Ok(false) => ConfirmOutcome::InFlight(existing),
                        Err(_) => ConfirmOutcome::Unavailable {
                            detail: "payment state store unavailable; nothing was charged",
                            payment_id: Some(existing.payment_id),
                            retry_after_s: None,
                        },
                    };
                }
                let message = existing.last_error.clone().unwrap_or_default();
                ConfirmOutcome::Declined {
                    record: existing,
                    code,
                    message,
                }
            }
        }
    }

    async fn run(self: &Arc<Self>, mut record: PaymentRecord) -> ConfirmOutcome {
        let verdict = self.settle_at_card(&record).await;
        let pid = record.payment_id.clone();
        match verdict {
            CardVerdict::Approved(p) => {
                let approved_at = p.approved_at.clone().unwrap_or_else(|| {
                    paygate_core::time::rfc3339_from_ms(paygate_core::time::now_ms())
                });
                match self
                    .store
                    .transition(
                        &pid,
                        &Transition::MarkPaid {
                            approved_at: approved_at.clone(),
                        },
                    )
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        // Another path (batch, reconciliation) settled it first.
                        if let Ok(Some((_, current))) = self.store.get(&pid).await {
                            if current.is_paid && current.is_saved {
                                return ConfirmOutcome::Approved(current);
                            }
                        }
                    }
                    Err(e) => {
                        // The approval is real but only in memory now. The
                        // record stays PENDING, which the batch settles by
                        // lookup; the operator hears of it now.
                        self.alert(
                            &record,
                            AlertReason::StoreFailedAfterApproval,
                            format!("mark paid failed: {e}"),
                        )
                        .await;
                        record.is_paid = true;
                        record.card_status = CardStatus::Done;
                        record.approved_at = Some(approved_at);
                        return ConfirmOutcome::Approved(record);
                    }
                }
                record.is_paid = true;
                record.card_status = CardStatus::Done;
                record.approved_at = Some(approved_at);
                record.failure_code = None;
                record.is_saved = self.save_with_retries(&record).await;
                metrics::counter!("paygate_payments_total", "outcome" => "approved").increment(1);
                ConfirmOutcome::Approved(record)
            }
            CardVerdict::Declined { code, message } => {
                let t = Transition::MarkAborted {
                    failure_code: code.clone(),
                    last_error: message.clone(),
                };
                if let Err(e) = self.store.transition(&pid, &t).await {
                    tracing::warn!(payment_id = %pid, error = %e, "could not record the decline; the batch will settle it");
                }
                record.card_status = CardStatus::Aborted;
                record.failure_code = Some(code.clone());
                metrics::counter!("paygate_payments_total", "outcome" => "declined").increment(1);
                ConfirmOutcome::Declined {
                    record,
                    code,
                    message,
                }
            }
            CardVerdict::NoCall {
                code,
                detail,
                retry_after_s,
            } => {
                tracing::error!(payment_id = %pid, reason = code, detail = %detail, "no card call made");
                let t = Transition::MarkAborted {
                    failure_code: code.to_owned(),
                    last_error: detail,
                };
                if let Err(e) = self.store.transition(&pid, &t).await {
                    tracing::warn!(payment_id = %pid, error = %e, "could not mark the record aborted");
                }
                let detail = match code {
                    failure_codes::LOG_UNAVAILABLE => {
                        "request log unavailable; nothing was charged, retry later"
                    }
                    failure_codes::CIRCUIT_OPEN => {
                        "card company unavailable (circuit open); nothing was charged, retry later"
                    }
                    failure_codes::OVERLOADED => {
                        "too many payments in flight; nothing was charged, retry later"
                    }
                    _ => "card company unavailable; nothing was charged, retry later",
                };
                metrics::counter!("paygate_payments_total", "outcome" => "not_attempted")
                    .increment(1);
                ConfirmOutcome::Unavailable {
                    detail,
                    payment_id: Some(pid),
                    retry_after_s,
                }
            }
            CardVerdict::Unsettled { detail } => {
                self.unknown(record, AlertReason::OutcomeUnknown, detail)
                    .await
            }
            CardVerdict::Mismatch { detail } => {
                self.unknown(record, AlertReason::CardMismatch, detail)
                    .await
            }
        }
    }

    async fn unknown(
        &self,
        mut record: PaymentRecord,
        reason: AlertReason,
        detail: String,
    ) -> ConfirmOutcome {
        let t = Transition::MarkUnknown {
            last_error: detail.clone(),
        };
        if let Err(e) = self.store.transition(&record.payment_id, &t).await {
            tracing::warn!(payment_id = %record.payment_id, error = %e, "could not mark the record unknown");
        }
        self.alert(&record, reason, detail).await;
        record.card_status = CardStatus::Unknown;
        metrics::counter!("paygate_payments_total", "outcome" => "unknown").increment(1);
        ConfirmOutcome::Unknown(record)
    }

    /// Raises an alert as it is (the reconciliation's alerts about
    /// approvals paygate holds no record of); `true` when it is new.
    pub async fn raise_alert(&self, alert: Alert) -> bool {
        self.alerter.raise(alert).await
    }

    /// Raises an alert about a payment; `true` when it is new.
    pub async fn alert(&self, record: &PaymentRecord, reason: AlertReason, detail: String) -> bool {
        self.alerter
            .raise(Alert {
                reason,
                payment_id: record.payment_id.to_string(),
                merchant_id: record.merchant_id.to_string(),
                order_id: record.order_id.to_string(),
                amount: record.amount,
                detail,
            })
            .await
    }

    /// Confirms at the card company through its stack (5xx retried with the
    /// same idempotency key), then settles a lost answer by lookups.
    async fn settle_at_card(self: &Arc<Self>, record: &PaymentRecord) -> CardVerdict {
        let req = ConfirmRequest {
            payment_key: record.payment_key.clone(),
            order_id: record.order_id.to_string(),
            amount: record.amount,
        };
        let site = CallSite {
            payment_id: record.payment_id.clone(),
            target: Target::CardApi,
            method: "POST",
            path: CONFIRM_PATH.to_owned(),
            body: serde_json::to_value(&req).ok(),
            attempt_offset: 0,
        };
        let card = self.card.clone();
        let key = record.payment_id.to_string();
        let sent = Arc::new(AtomicU32::new(0));
        let call = move || {
            let (card, req, key) = (card.clone(), req.clone(), key.clone());
            async move { card.confirm(&req, &key).await }
        };
        let res = self
            .through(
                &self.card_stack,
                RequestKind::Idempotent,
                None,
                site,
                call,
                describe_card,
                classify_confirm,
                sent.clone(),
            )
            .await;
        let sent = sent.load(Ordering::SeqCst);
        let pid = &record.payment_id;
        match res {
            Ok(p) if p.is_approved() => self.check_match(record, p),
            Ok(p) => {
                let (code, message) = p
                    .failure
                    .map(|f| (f.code, f.message))
                    .unwrap_or((p.status, String::new()));
                CardVerdict::Declined { code, message }
            }
            Err(CallError::Downstream(AttemptError::Downstream(e))) if e.is_decline() => {
                CardVerdict::Declined {
                    code: e.code().to_owned(),
                    message: card_message(&e),
                }
            }
            Err(CallError::Downstream(AttemptError::Downstream(e)))
                if e.is_auth_failure() && sent == 1 =>
            {
                CardVerdict::NoCall {
                    code: failure_codes::CARD_AUTH_FAILED,
                    detail: e.to_string(),
                    retry_after_s: None,
                }
            }
            Err(CallError::Downstream(AttemptError::LogUnavailable(detail))) if sent == 0 => {
                CardVerdict::NoCall {
                    code: failure_codes::LOG_UNAVAILABLE,
                    detail,
                    retry_after_s: None,
                }
            }
            Err(CallError::Downstream(AttemptError::LogUnavailable(detail))) => {
                CardVerdict::Unsettled {
                    detail: format!("request log unavailable after {sent} attempts: {detail}"),
                }
            }
            Err(e) if e.no_call_made() && sent == 0 => {
                let (code, retry_after_s) = match &e {
                    CallError::BreakerOpen { retry_after } => (
                        failure_codes::CIRCUIT_OPEN,
                        Some(retry_after.as_secs_f64().ceil().max(1.0) as u64),
                    ),
                    _ => (failure_codes::OVERLOADED, Some(1)),
                };
                CardVerdict::NoCall {
                    code,
                    detail: e.to_string(),
                    retry_after_s,
                }
            }
            Err(e) => {
                tracing::warn!(payment_id = %pid, attempts = sent, error = %e, "card confirm got no usable answer; looking the payment up");
                self.settle_by_lookup(record).await
            }
        }
    }

    fn check_match(&self, record: &PaymentRecord, p: CardPayment) -> CardVerdict {
        if p.order_id == record.order_id.as_str()
            && p.total_amount == record.amount
            && p.payment_key == record.payment_key
        {
            CardVerdict::Approved(Box::new(p))
        } else {
            CardVerdict::Mismatch {
                detail: format!(
                    "card company approved orderId={} amount={} for a payment of amount={}",
                    p.order_id, p.total_amount, record.amount
                ),
            }
        }
    }

    /// Looks the payment up by orderId until the card company's answer settles it.
    async fn settle_by_lookup(self: &Arc<Self>, record: &PaymentRecord) -> CardVerdict {
        let mut last = String::from("no lookup made");
        for attempt in 1..=self.settings.lookup_attempts {
            if attempt > 1 {
                tokio::time::sleep(self.settings.lookup_delay * (attempt - 1)).await;
            }
            let offset = i32::try_from(attempt).unwrap_or(i32::MAX) - 1;
            match self
                .lookup_once(&record.payment_id, record.order_id.as_str(), offset)
                .await
            {
                Ok(Some(p)) if p.payment_key != record.payment_key => {
                    return CardVerdict::Mismatch {
                        detail: format!(
                            "order {} is held at the card company by another paymentKey",
                            record.order_id
                        ),
                    };
                }
                Ok(Some(p)) if p.is_approved() => return self.check_match(record, p),
                Ok(Some(p)) if p.status == "CANCELED" || p.status == "PARTIAL_CANCELED" => {
                    return CardVerdict::Mismatch {
                        detail: format!("card company shows the payment {}", p.status),
                    };
                }
                Ok(Some(p)) if p.status == "ABORTED" || p.status == "EXPIRED" => {
                    let (code, message) = p
                        .failure
                        .map(|f| (f.code, f.message))
                        .unwrap_or((p.status, String::new()));
                    return CardVerdict::Declined { code, message };
                }
                Ok(Some(p)) => last = format!("card company shows status {}", p.status),
                Ok(None) => last = "card company has no payment for the order yet".to_owned(),
                Err(CallError::Downstream(AttemptError::LogUnavailable(e))) => {
                    return CardVerdict::Unsettled {
                        detail: format!("request log unavailable; lookup not made: {e}"),
                    };
                }
                Err(e) => last = format!("lookup failed: {e}"),
            }
        }
        CardVerdict::Unsettled {
            detail: format!(
                "outcome unknown after {} lookups: {last}",
                self.settings.lookup_attempts
            ),
        }
    }

    /// One logged lookup by orderId through the card stack (one attempt).
    fn lookup_once(
        self: &Arc<Self>,
        subject: &PaymentId,
        order_id: &str,
        attempt_offset: i32,
    ) -> impl Future<Output = Result<Option<CardPayment>, CallError<AttemptError<CardApiError>>>>
           + Send
           + 'static {
        let site = CallSite {
            payment_id: subject.clone(),
            target: Target::CardApi,
            method: "GET",
            path: format!("/v1/payments/orders/{order_id}"),
            body: None,
            attempt_offset,
        };
        let card = self.card.clone();
        let order = order_id.to_owned();
        let call = move || {
            let (card, order) = (card.clone(), order.clone());
            async move { card.payment_by_order_id(&order).await }
        };
        self.through(
            &self.card_stack,
            RequestKind::Idempotent,
            Some(1),
            site,
            call,
            describe_lookup,
            classify_lookup,
            Arc::new(AtomicU32::new(0)),
        )
    }

    /// Looks an order up at the card company (Toss
    /// `GET /v1/payments/orders/{orderId}`), logged in the SQL log under
    /// `subject` like every downstream call: a payment's id, or for an order
    /// paygate has no record of, the reconciliation's `orphan_<orderId>`.
    /// `Ok(None)` when the card company has no payment for the order.
    ///
    /// # Errors
    /// A description of why no answer was had (the stack refused, the log
    /// could not be written, or the card API failed).
    pub async fn lookup_order(
        self: &Arc<Self>,
        subject: &PaymentId,
        order_id: &str,
    ) -> Result<Option<CardPayment>, String> {
        self.lookup_once(subject, order_id, 0)
            .await
            .map_err(|e| e.to_string())
    }

    /// Cancels a payment at the card company (Toss
    /// `POST /v1/payments/{paymentKey}/cancel`, full amount) with
    /// `idempotency_key`, through the card stack (retried on 5xx and lost
    /// answers with the same key) and logged under `subject`.
    ///
    /// # Errors
    /// A description of why it was not canceled (the card company refused,
    /// the stack refused, or no answer).
    pub async fn cancel_at_card(
        self: &Arc<Self>,
        subject: &PaymentId,
        payment_key: &str,
        reason: &str,
        idempotency_key: &str,
    ) -> Result<CardPayment, String> {
        let req = CancelRequest {
            cancel_reason: reason.to_owned(),
            cancel_amount: None,
        };
        let site = CallSite {
            payment_id: subject.clone(),
            target: Target::CardApi,
            method: "POST",
            path: format!("/v1/payments/{payment_key}/cancel"),
            body: serde_json::to_value(&req).ok(),
            attempt_offset: 0,
        };
        let (card, key, pk) = (
            self.card.clone(),
            idempotency_key.to_owned(),
            payment_key.to_owned(),
        );
        let call = move || {
            let (card, req, key, pk) = (card.clone(), req.clone(), key.clone(), pk.clone());
            async move { card.cancel(&pk, &req, &key).await }
        };
        self.through(
            &self.card_stack,
            RequestKind::Idempotent,
            None,
            site,
            call,
            describe_card,
            classify_repeatable,
            Arc::new(AtomicU32::new(0)),
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// One page of the card company's transaction list (Toss
    /// `GET /v1/transactions`) through the card stack: breaker, bulkhead,
    /// rate limit and budgeted retries of 5xx/429/timeouts. Like every
    /// downstream call, each attempt is in the SQL log first (I3), under
    /// `subject` (the reconciliation run's `reconcile_<ULID>`); the
    /// `RESPONSE` row holds the page's size, not its transactions.
    ///
    /// # Errors
    /// [`CallError`] after retries, or the stack's refusal; a `REQUEST` row
    /// that could not be written is an error and no call.
    pub async fn transactions_page(
        self: &Arc<Self>,
        subject: &PaymentId,
        query: TransactionsQuery,
    ) -> Result<Vec<Transaction>, String> {
        let path = format!(
            "/v1/transactions?startDate={}&endDate={}&startingAfter={}&limit={}",
            query.start_date,
            query.end_date,
            query.starting_after.as_deref().unwrap_or(""),
            query.limit.unwrap_or(100)
        );
        let site = CallSite {
            payment_id: subject.clone(),
            target: Target::CardApi,
            method: "GET",
            path,
            body: None,
            attempt_offset: 0,
        };
        let (card, query) = (self.card.clone(), Arc::new(query));
        let call = move || {
            let (card, query) = (card.clone(), query.clone());
            async move { card.transactions(&query).await }
        };
        self.through(
            &self.card_stack,
            RequestKind::Idempotent,
            None,
            site,
            call,
            describe_page,
            classify_repeatable,
            Arc::new(AtomicU32::new(0)),
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// Settles a payment whose card outcome is not known (`PENDING` past its
    /// grace period, or `UNKNOWN`) by looking it up at the card company, and
    /// records what it learns: paid, or declined. Used by the batch sweep
    /// and the reconciliation.
    ///
    /// # Errors
    /// [`paygate_state_store::StoreError`] when the outcome could not be recorded.
    pub async fn settle_unknown(
        self: &Arc<Self>,
        record: &PaymentRecord,
    ) -> Result<Settlement, paygate_state_store::StoreError> {
        let pid = &record.payment_id;
        match self.settle_by_lookup(record).await {
            CardVerdict::Approved(p) => {
                let approved_at = p.approved_at.clone().unwrap_or_else(|| {
                    paygate_core::time::rfc3339_from_ms(paygate_core::time::now_ms())
                });
                self.store
                    .transition(pid, &Transition::MarkPaid { approved_at })
                    .await?;
                Ok(Settlement::Paid)
            }
            CardVerdict::Declined { code, message } => {
                let t = Transition::MarkAborted {
                    failure_code: code,
                    last_error: message,
                };
                self.store.transition(pid, &t).await?;
                Ok(Settlement::Declined)
            }
            CardVerdict::Unsettled { detail } | CardVerdict::NoCall { detail, .. } => {
                Ok(Settlement::Unknown(detail))
            }
            CardVerdict::Mismatch { detail } => Ok(Settlement::Mismatch(detail)),
        }
    }

    /// One synchronous ledger try; on a transient failure, async retries are
    /// started. Returns whether the ledger has it now.
    async fn save_with_retries(self: &Arc<Self>, record: &PaymentRecord) -> bool {
        match self.save_once(record, RequestKind::Idempotent).await {
            SaveResult::Saved => true,
            SaveResult::Refused => false,
            SaveResult::Retry => {
                self.spawn_ledger_retry(record.payment_id.clone());
                false
            }
        }
    }

    /// Starts bounded async ledger retries for a paid, unsaved payment.
    pub fn spawn_ledger_retry(self: &Arc<Self>, payment_id: PaymentId) {
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
        self.save_counted(record, kind, false).await
    }

    /// One ledger try for the batch sweep: a failure counts in
    /// `batch_attempts` rather than `save_attempts`. `Ok(true)` when saved,
    /// `Ok(false)` when it failed or was skipped (retry later), `Err(())`
    /// when the ledger refused it for good (an operator was alerted).
    pub async fn batch_save(self: &Arc<Self>, record: &PaymentRecord) -> Result<bool, ()> {
        match self
            .save_counted(record, RequestKind::Idempotent, true)
            .await
        {
            SaveResult::Saved => Ok(true),
            SaveResult::Retry => Ok(false),
            SaveResult::Refused => Err(()),
        }
    }

    async fn save_counted(
        self: &Arc<Self>,
        record: &PaymentRecord,
        kind: RequestKind,
        batch: bool,
    ) -> SaveResult {
        let failed = |last_error: String| {
            if batch {
                Transition::BatchSaveFailed { last_error }
            } else {
                Transition::SaveFailed { last_error }
            }
        };
        let pid = &record.payment_id;
        let entry = LedgerEntry {
            payment_id: pid.to_string(),
            merchant_id: record.merchant_id.to_string(),
            order_id: record.order_id.to_string(),
            payment_key: record.payment_key.clone(),
            amount: record.amount,
            currency: record.currency.clone(),
            approved_at: record.approved_at.clone().unwrap_or_default(),
        };
        let site = CallSite {
            payment_id: pid.clone(),
            target: Target::LedgerApi,
            method: "POST",
            path: RECORD_PATH.to_owned(),
            body: serde_json::to_value(&entry).ok(),
            attempt_offset: i32::try_from(record.save_attempts).unwrap_or(i32::MAX),
        };
        let ledger = self.ledger.clone();
        let key = pid.to_string();
        let call = move || {
            let (ledger, entry, key) = (ledger.clone(), entry.clone(), key.clone());
            async move { ledger.record(&entry, &key).await }
        };
        let sent = Arc::new(AtomicU32::new(0));
        let res = self
            .through(
                &self.ledger_stack,
                kind,
                None,
                site,
                call,
                describe_ledger,
                classify_ledger,
                sent,
            )
            .await;
        match res {
            Ok(_) => match self.store.transition(pid, &Transition::MarkSaved).await {
                Ok(_) => SaveResult::Saved,
                Err(e) => {
                    // The ledger has it; the flag will be set by the batch's
                    // idempotent re-record.
                    tracing::warn!(payment_id = %pid, error = %e, "ledger recorded the payment but the state store failed");
                    SaveResult::Retry
                }
            },
            Err(CallError::Downstream(AttemptError::Downstream(e))) => {
                let t = failed(e.to_string());
                if let Err(se) = self.store.transition(pid, &t).await {
                    tracing::warn!(payment_id = %pid, error = %se, "could not count the failed ledger try");
                }
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
                let t = failed(e.to_string());
                if let Err(se) = self.store.transition(pid, &t).await {
                    tracing::warn!(payment_id = %pid, error = %se, "could not count the failed ledger try");
                }
                SaveResult::Retry
            }
        }
    }
}

fn card_message(e: &CardApiError) -> String {
    match e {
        CardApiError::Rejected { message, .. } | CardApiError::Server { message, .. } => {
            message.clone()
        }
        other => other.to_string(),
    }
}
