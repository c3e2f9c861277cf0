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
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use paygate_api_log::{Kind, LogEntry, SqlApiLog, Target};
use paygate_card_api::{CardApi, CardApiError, CardPayment, ConfirmRequest, CONFIRM_PATH};
use paygate_core::{
    payment::failure_codes, CardStatus, MerchantId, OrderId, Partition, PaymentId, PaymentRecord,
};
use paygate_ledger_api::{LedgerApi, LedgerApiError, LedgerEntry, LedgerOutcome, RECORD_PATH};
use paygate_state_store::{CreateOutcome, StateStore, StoreError, Transition};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::alert::{Alert, AlertReason, Alerter};

/// Tunables of the saga. Durations are wall-clock (tokio time).
#[derive(Clone, Debug)]
pub struct SagaSettings {
    /// Currency of every payment (`KRW`).
    pub currency: String,
    /// Card confirm attempts on 5xx / 429 / "still processing", including the first.
    pub card_max_attempts: u32,
    /// First delay between card confirm attempts (doubles, full jitter).
    pub card_retry_base_delay: Duration,
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
            card_max_attempts: 3,
            card_retry_base_delay: Duration::from_millis(50),
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
    Declined { code: String, message: String },
    NoCall { code: &'static str, detail: String },
    Unsettled { detail: String },
    Mismatch { detail: String },
}

/// Result of one ledger try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SaveResult {
    Saved,
    Retry,
    Refused,
}

/// The saga and everything it calls. Shared as `Arc<Saga>`.
pub struct Saga {
    store: Arc<dyn StateStore>,
    log: SqlApiLog,
    card: Arc<dyn CardApi>,
    ledger: Arc<dyn LedgerApi>,
    alerter: Arc<dyn Alerter>,
    settings: SagaSettings,
    retries: RetryTracker,
}

/// Full jitter: a uniformly random delay in `[0, d]`.
fn full_jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

fn backoff(base: Duration, max: Duration, times: u32) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(max)
        .with_max_times(times as usize)
        .build()
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
            }
            | CardApiError::Server {
                status,
                code,
                message,
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
            Some(json!({"code": paygate_card_api::codes::NOT_FOUND_PAYMENT})),
        ),
        Ok(Some(p)) => (Kind::Response, Some(200), serde_json::to_value(p).ok()),
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

impl Saga {
    /// A saga over its downstreams.
    pub fn new(
        store: Arc<dyn StateStore>,
        log: SqlApiLog,
        card: Arc<dyn CardApi>,
        ledger: Arc<dyn LedgerApi>,
        alerter: Arc<dyn Alerter>,
        settings: SagaSettings,
    ) -> Self {
        Self {
            store,
            log,
            card,
            ledger,
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

    /// Writes the REQUEST row, makes the call only if that succeeded, then
    /// writes the RESPONSE/ERROR row (best effort: the call already happened).
    ///
    /// `Err` means the REQUEST row could not be written and no call was made.
    #[allow(clippy::too_many_arguments)]
    async fn logged<T, E, F, Fut>(
        &self,
        payment_id: &PaymentId,
        target: Target,
        method: &str,
        path: &str,
        attempt: i32,
        request_body: Option<Value>,
        call: F,
        describe: impl FnOnce(&Result<T, E>) -> (Kind, Option<i32>, Option<Value>),
    ) -> Result<Result<T, E>, StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let entry = |kind, status_code, body, latency_ms| LogEntry {
            payment_id,
            target,
            kind,
            attempt,
            method,
            path,
            status_code,
            body,
            latency_ms,
        };
        self.log
            .append(entry(Kind::Request, None, request_body, None))
            .await?;
        let started = tokio::time::Instant::now();
        let res = call().await;
        let latency = started.elapsed().as_millis() as i64;
        let (kind, status, body) = describe(&res);
        if let Err(e) = self
            .log
            .append(entry(kind, status, body, Some(latency)))
            .await
        {
            tracing::warn!(payment_id = %payment_id, target = target.as_str(), error = %e,
                "could not write the response row; the call itself was logged as a REQUEST");
        }
        Ok(res)
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
        match self.store.create(&record).await {
            Ok(CreateOutcome::Created) => self.run(record).await,
            Ok(CreateOutcome::Exists(existing)) => {
                self.replay(*existing, &input, &fingerprint).await
            }
            Err(e) => {
                tracing::error!(order_id = %input.order_id, error = %e, "state store unavailable; no card call made");
                ConfirmOutcome::Unavailable {
                    detail: "payment state store unavailable; nothing was charged",
                    payment_id: None,
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
                    match self
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
                            return self.run(reopened).await;
                        }
                        Ok(false) => return ConfirmOutcome::InFlight(existing),
                        Err(_) => {
                            return ConfirmOutcome::Unavailable {
                                detail: "payment state store unavailable; nothing was charged",
                                payment_id: Some(existing.payment_id),
                            }
                        }
                    }
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
                ConfirmOutcome::Declined {
                    record,
                    code,
                    message,
                }
            }
            CardVerdict::NoCall { code, detail } => {
                tracing::error!(payment_id = %pid, reason = code, detail = %detail, "no card call made");
                let t = Transition::MarkAborted {
                    failure_code: code.to_owned(),
                    last_error: detail,
                };
                if let Err(e) = self.store.transition(&pid, &t).await {
                    tracing::warn!(payment_id = %pid, error = %e, "could not mark the record aborted");
                }
                let detail = if code == failure_codes::LOG_UNAVAILABLE {
                    "request log unavailable; nothing was charged, retry later"
                } else {
                    "card company unavailable; nothing was charged, retry later"
                };
                ConfirmOutcome::Unavailable {
                    detail,
                    payment_id: Some(pid),
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
        ConfirmOutcome::Unknown(record)
    }

    async fn alert(&self, record: &PaymentRecord, reason: AlertReason, detail: String) {
        self.alerter
            .raise(Alert {
                reason,
                payment_id: record.payment_id.to_string(),
                merchant_id: record.merchant_id.to_string(),
                order_id: record.order_id.to_string(),
                amount: record.amount,
                detail,
            })
            .await;
    }

    /// Confirms at the card company, retrying 5xx with the same idempotency
    /// key, then settles a lost answer by lookups.
    async fn settle_at_card(&self, record: &PaymentRecord) -> CardVerdict {
        let req = ConfirmRequest {
            payment_key: record.payment_key.clone(),
            order_id: record.order_id.to_string(),
            amount: record.amount,
        };
        let body = serde_json::to_value(&req).ok();
        let pid = &record.payment_id;
        let mut delays = backoff(
            self.settings.card_retry_base_delay,
            self.settings.card_retry_base_delay * 8,
            self.settings.card_max_attempts.saturating_sub(1),
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self
                .logged(
                    pid,
                    Target::CardApi,
                    "POST",
                    CONFIRM_PATH,
                    attempt,
                    body.clone(),
                    || self.card.confirm(&req, pid.as_str()),
                    describe_card,
                )
                .await;
            let res = match res {
                Ok(r) => r,
                Err(e) if attempt == 1 => {
                    return CardVerdict::NoCall {
                        code: failure_codes::LOG_UNAVAILABLE,
                        detail: e.to_string(),
                    };
                }
                Err(e) => {
                    return CardVerdict::Unsettled {
                        detail: format!(
                            "request log unavailable after attempt {}: {e}",
                            attempt - 1
                        ),
                    };
                }
            };
            match res {
                Ok(p) if p.is_approved() => return self.check_match(record, p),
                Ok(p) => {
                    let (code, message) = p
                        .failure
                        .map(|f| (f.code, f.message))
                        .unwrap_or((p.status, String::new()));
                    return CardVerdict::Declined { code, message };
                }
                Err(e) if e.is_decline() => {
                    return CardVerdict::Declined {
                        code: e.code().to_owned(),
                        message: card_message(&e),
                    };
                }
                Err(e) if e.is_auth_failure() && attempt == 1 => {
                    return CardVerdict::NoCall {
                        code: failure_codes::CARD_AUTH_FAILED,
                        detail: e.to_string(),
                    };
                }
                Err(e) => {
                    let retry = matches!(e, CardApiError::Server { .. })
                        || (e.is_transient() && matches!(e, CardApiError::Rejected { .. }));
                    match delays.next() {
                        Some(d) if retry => {
                            tracing::warn!(payment_id = %pid, attempt, error = %e, "card confirm failed; retrying with the same idempotency key");
                            tokio::time::sleep(full_jitter(d)).await;
                        }
                        _ => {
                            tracing::warn!(payment_id = %pid, attempt, error = %e, "card confirm got no usable answer; looking the payment up");
                            return self.settle_by_lookup(record).await;
                        }
                    }
                }
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
    async fn settle_by_lookup(&self, record: &PaymentRecord) -> CardVerdict {
        let pid = &record.payment_id;
        let path = format!("/v1/payments/orders/{}", record.order_id);
        let mut last = String::from("no lookup made");
        for attempt in 1..=self.settings.lookup_attempts as i32 {
            if attempt > 1 {
                tokio::time::sleep(self.settings.lookup_delay * (attempt as u32 - 1)).await;
            }
            let res = self
                .logged(
                    pid,
                    Target::CardApi,
                    "GET",
                    &path,
                    attempt,
                    None,
                    || self.card.payment_by_order_id(record.order_id.as_str()),
                    describe_lookup,
                )
                .await;
            let res = match res {
                Ok(r) => r,
                Err(e) => {
                    return CardVerdict::Unsettled {
                        detail: format!("request log unavailable; lookup not made: {e}"),
                    }
                }
            };
            match res {
                Ok(Some(p)) if p.payment_key != record.payment_key => {
                    return CardVerdict::Mismatch {
                        detail: format!(
                            "order {} is held at the card company by another paymentKey",
                            record.order_id
                        ),
                    };
                }
                Ok(Some(p))
                    if p.is_approved()
                        || p.status == "CANCELED"
                        || p.status == "PARTIAL_CANCELED" =>
                {
                    if p.is_approved() {
                        return self.check_match(record, p);
                    }
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

    /// One synchronous ledger try; on a transient failure, async retries are
    /// started. Returns whether the ledger has it now.
    async fn save_with_retries(self: &Arc<Self>, record: &PaymentRecord) -> bool {
        match self.save_once(record).await {
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
        let saga = Arc::clone(self);
        tokio::spawn(async move {
            saga.retry_ledger(&payment_id).await;
            saga.retries.end();
        });
    }

    async fn retry_ledger(&self, pid: &PaymentId) {
        let delays = backoff(
            self.settings.ledger_retry_base_delay,
            self.settings.ledger_retry_max_delay,
            self.settings.ledger_retry_max_attempts,
        );
        for delay in delays {
            tokio::time::sleep(full_jitter(delay)).await;
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
            match self.save_once(&record).await {
                SaveResult::Saved | SaveResult::Refused => return,
                SaveResult::Retry => {}
            }
        }
        tracing::warn!(payment_id = %pid, "async ledger retries exhausted; the batch sweep will retry");
    }

    async fn save_once(&self, record: &PaymentRecord) -> SaveResult {
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
        let attempt = i32::try_from(record.save_attempts + 1).unwrap_or(i32::MAX);
        let res = self
            .logged(
                pid,
                Target::LedgerApi,
                "POST",
                RECORD_PATH,
                attempt,
                serde_json::to_value(&entry).ok(),
                || self.ledger.record(&entry, pid.as_str()),
                describe_ledger,
            )
            .await;
        let res = match res {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(payment_id = %pid, error = %e, "request log unavailable; ledger call not made");
                return SaveResult::Retry;
            }
        };
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
            Err(e) => {
                let t = Transition::SaveFailed {
                    last_error: e.to_string(),
                };
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
