//! Guards I3 (write-ahead log): every downstream call paygate makes goes
//! through [`Saga::through`], which writes the attempt's `REQUEST` row to the
//! SQL log and makes the call only if that write succeeded, then writes the
//! `RESPONSE`/`ERROR` row. The `describe_*` functions turn each kind of
//! answer into its logged row (bodies carry no card data).

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
};

use paygate_api_log::{Kind, LogEntry, Target};
use paygate_card_api::{codes, CardApiError, CardPayment, Transaction};
use paygate_core::PaymentId;
use paygate_ledger_api::{LedgerApiError, LedgerOutcome};
use paygate_resilience::{CallError, Downstream, ErrorClass, RequestKind};
use serde_json::{json, Value};

use crate::{classify::AttemptError, Saga};

impl Saga {
    /// Writes a deferred row on its own (best effort: the call happened;
    /// a lost row is what a crash right after the call leaves too).
    pub(crate) async fn write_row(&self, row: Option<OwnedRow>) {
        let Some(row) = row else { return };
        if let Err(e) = self.log.append(row.entry()).await {
            tracing::warn!(payment_id = %row.payment_id, target = row.target.as_str(), error = %e,
                "could not write the response row; the call itself was logged as a REQUEST");
        }
    }

    /// Withdraws the first attempt's prewritten `REQUEST` row of `site` when
    /// the call never left: an `ERROR` row with code
    /// [`paygate_api_log::NOT_SENT`], which the log's confirm evidence
    /// subtracts. If this write is lost, the log says a request may have
    /// been sent: the batch looks the payment up, the safe direction.
    pub(crate) async fn withdraw_request(&self, site_fusion: &Fusion, request: OwnedRow) {
        if !site_fusion.unused_request() {
            return;
        }
        let row = OwnedRow {
            kind: Kind::Error,
            body: Some(
                json!({"code": paygate_api_log::NOT_SENT, "message": "the call never left"}),
            ),
            ..request
        };
        self.write_row(Some(row)).await;
    }
}

/// A logged row's kind, status and body for a call's result.
pub(crate) type Row = (Kind, Option<i32>, Option<Value>);

/// Turns a call's result into its `RESPONSE`/`ERROR` row.
pub(crate) type Describe<T, E> = fn(&Result<T, E>) -> Row;

/// Where one logged downstream call goes.
pub(crate) struct CallSite {
    /// The payment the rows are filed under (or a run's subject id).
    pub payment_id: PaymentId,
    /// Which downstream.
    pub target: Target,
    /// HTTP method, for the log.
    pub method: &'static str,
    /// Path (and query), for the log.
    pub path: String,
    /// The request body as logged.
    pub body: Option<Value>,
    /// Added to the stack's attempt number (from 1) for the log's `attempt`.
    pub attempt_offset: i32,
    /// How the call's rows share commits with state changes (a [`crate::Saga`]
    /// with a journal); `Fusion::default()` writes every row on its own.
    pub fusion: Fusion,
}

/// Rows of a logged call that are committed together with a state change
/// by the saga's [`paygate_api_log::Journal`] rather than on their own.
#[derive(Clone, Debug, Default)]
pub(crate) struct Fusion {
    /// `Some(true)`: the first attempt's `REQUEST` row is already committed
    /// (with the record, or with the transition that decided the call), so
    /// the first attempt does not write it again; the flag turns `false`
    /// when that attempt starts. Still `true` after the call: the attempt
    /// never left, and the caller withdraws the row ([`Saga::withdraw_request`]).
    pub prewritten: Option<Arc<AtomicBool>>,
    /// `Some`: a successful answer's `RESPONSE` row is not written but left
    /// here, for the caller to commit with the transition it leads to.
    pub deferred: Option<Arc<Mutex<Option<OwnedRow>>>>,
}

impl Fusion {
    /// True when the first attempt's prewritten `REQUEST` row was never
    /// used (the stack refused the call before it left).
    pub fn unused_request(&self) -> bool {
        self.prewritten
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
    }

    /// The deferred answer row, if one was left.
    pub fn take_deferred(&self) -> Option<OwnedRow> {
        self.deferred
            .as_ref()
            .and_then(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).take())
    }
}

/// An owned log row, kept until it is committed (see [`Fusion::deferred`]).
#[derive(Clone, Debug)]
pub(crate) struct OwnedRow {
    pub payment_id: PaymentId,
    pub target: Target,
    pub kind: Kind,
    pub attempt: i32,
    pub method: &'static str,
    pub path: String,
    pub status_code: Option<i32>,
    pub body: Option<Value>,
    pub latency_ms: Option<i64>,
}

impl OwnedRow {
    /// The row to append.
    pub fn entry(&self) -> LogEntry<'_> {
        LogEntry {
            payment_id: &self.payment_id,
            target: self.target,
            kind: self.kind,
            attempt: self.attempt,
            method: self.method,
            path: &self.path,
            status_code: self.status_code,
            body: self.body.clone(),
            latency_ms: self.latency_ms,
        }
    }
}

impl CallSite {
    /// The `REQUEST` row of this call's first attempt.
    pub fn first_request(&self) -> OwnedRow {
        OwnedRow {
            payment_id: self.payment_id.clone(),
            target: self.target,
            kind: Kind::Request,
            attempt: self.attempt_offset.saturating_add(1),
            method: self.method,
            path: self.path.clone(),
            status_code: None,
            body: self.body.clone(),
            latency_ms: None,
        }
    }
}

/// How one call goes through its stack.
pub(crate) struct Policy<E: 'static> {
    /// Which stack.
    pub stack: Arc<Downstream>,
    /// `Idempotent` for a first call (deposits in the retry budget),
    /// `CallerRetry` for a retry its caller already drew from the budget.
    pub kind: RequestKind,
    /// At most this many attempts (`None`: the stack's policy).
    pub max_attempts: Option<u32>,
    /// What each error means for the breaker and retries.
    pub classify: fn(&AttemptError<E>) -> ErrorClass,
    /// What the stack's own per-attempt timeout means: retried for reads,
    /// cancels and the ledger; never for a confirm (its answer may have
    /// been lost after an approval: it is settled by lookup instead).
    pub attempt_timeout: ErrorClass,
}

impl Saga {
    /// Makes a downstream call through its stack. Every attempt first writes
    /// its `REQUEST` row and makes the call only if that succeeded (I3), then
    /// writes the `RESPONSE`/`ERROR` row (best effort: the call happened).
    /// `sent` counts the attempts that actually left.
    pub(crate) fn through<T, E, F, Fut>(
        self: &Arc<Self>,
        policy: Policy<E>,
        site: CallSite,
        call: F,
        describe: Describe<T, E>,
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
                let prewritten = site
                    .fusion
                    .prewritten
                    .as_ref()
                    .is_some_and(|f| f.swap(false, Ordering::SeqCst));
                if !prewritten {
                    saga.log
                        .append(entry(Kind::Request, None, site.body.clone(), None))
                        .await
                        .map_err(|e| AttemptError::LogUnavailable(e.to_string()))?;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                let started = tokio::time::Instant::now();
                let res = fut.await;
                let latency = started.elapsed().as_millis() as i64;
                let (kind, status, body) = describe(&res);
                if let (Ok(_), Some(slot)) = (&res, &site.fusion.deferred) {
                    // Committed by the caller with the transition it leads to.
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(OwnedRow {
                        payment_id: site.payment_id.clone(),
                        target: site.target,
                        kind,
                        attempt,
                        method: site.method,
                        path: site.path.clone(),
                        status_code: status,
                        body,
                        latency_ms: Some(latency),
                    });
                } else if let Err(e) = saga
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
        let Policy {
            stack,
            kind,
            max_attempts,
            classify,
            attempt_timeout,
        } = policy;
        async move {
            stack
                .call_with_timeout_class(kind, max_attempts, attempt, classify, attempt_timeout)
                .await
        }
    }
}

/// The row of a card answer: the Payment, or the card company's `{code, message}`.
pub(crate) fn describe_card<T: serde::Serialize>(res: &Result<T, CardApiError>) -> Row {
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

/// The row of a lookup by orderId (a 404 is an answer, not an error).
pub(crate) fn describe_lookup(res: &Result<Option<CardPayment>, CardApiError>) -> Row {
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

/// The row of a transaction-list page: its size, not its transactions.
pub(crate) fn describe_page(res: &Result<Vec<Transaction>, CardApiError>) -> Row {
    match res {
        Ok(page) => (
            Kind::Response,
            Some(200),
            Some(json!({"transactions": page.len()})),
        ),
        Err(e) => describe_card::<()>(&Err(e.clone())),
    }
}

/// The row of a ledger answer.
pub(crate) fn describe_ledger(res: &Result<LedgerOutcome, LedgerApiError>) -> Row {
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
