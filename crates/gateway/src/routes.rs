//! The merchant API handlers (DESIGN.md §5).

use axum::{
    body::Bytes,
    extract::{rejection::PathRejection, FromRequest, FromRequestParts, Path, Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use paygate_core::{OrderId, PaymentId, PaymentRecord, PaymentStatus};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use paygate_state_store::{CancelRecord, CancelStatus};

use paygate_payments::{ConfirmInput, ConfirmOutcome, ConfirmTicket, EarlyAnswer, Refusal, Reuse};

use crate::{auth::AuthedMerchant, problem::Problem, telemetry::RequestStarted, AppState};

/// Body of `POST /v1/payments/confirm`. `amount` is in minor units, 1 to
/// the configured `max_amount` (default 100,000,000). Any other member is
/// refused (400): a `"currency": "USD"` must not be charged in KRW.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfirmBody {
    /// The card company's payment key (1-200 printable characters).
    #[schema(min_length = 1, max_length = 200)]
    pub payment_key: String,
    /// 6-64 characters of `[A-Za-z0-9-_.]`.
    #[schema(min_length = 6, max_length = 64, pattern = "^[A-Za-z0-9_.-]+$")]
    pub order_id: String,
    /// Amount in minor units, >= 1 and <= the configured `max_amount`
    /// (default 100,000,000).
    #[schema(minimum = 1)]
    pub amount: i64,
}

/// The payment as a merchant sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentView {
    /// `pay_...`.
    pub payment_id: String,
    /// The merchant's order id.
    pub order_id: String,
    /// The card company's key.
    pub payment_key: String,
    /// Amount, minor units.
    pub amount: i64,
    /// ISO 4217 currency.
    pub currency: String,
    /// `DONE`, `ABORTED`, `UNKNOWN`, `IN_PROGRESS`, `CANCELED` (nothing
    /// left) or `PARTIAL_CANCELED` (cancels done, a balance left).
    #[schema(value_type = String, example = "DONE")]
    pub status: PaymentStatus,
    /// What is left after the done cancels, minor units (`amount` when
    /// there are none).
    pub balance_amount: i64,
    /// The cancels (refunds) of the payment, oldest first.
    pub cancels: Vec<CancelView>,
    /// True once the ledger recorded it.
    pub saved: bool,
    /// The card company's approval time, RFC 3339.
    pub approved_at: Option<String>,
    /// When paygate accepted the confirm, RFC 3339 (UTC).
    pub requested_at: String,
}

/// One cancel (refund) of a payment as a merchant sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelView {
    /// Amount canceled, minor units.
    pub cancel_amount: i64,
    /// The merchant's `cancelReason`.
    pub cancel_reason: String,
    /// `DONE`, `IN_PROGRESS`, `UNKNOWN` (the card's answer was lost; the
    /// batch settles it) or `ABORTED` (not canceled).
    #[schema(example = "DONE")]
    pub status: String,
    /// The card company's cancel time, RFC 3339, once done.
    pub canceled_at: Option<String>,
}

impl From<&CancelRecord> for CancelView {
    fn from(c: &CancelRecord) -> Self {
        Self {
            cancel_amount: c.amount,
            cancel_reason: c.reason.clone(),
            status: match c.status {
                CancelStatus::Pending => "IN_PROGRESS",
                CancelStatus::Done => "DONE",
                CancelStatus::Unknown => "UNKNOWN",
                CancelStatus::Failed => "ABORTED",
            }
            .to_owned(),
            canceled_at: c.canceled_at.clone(),
        }
    }
}

impl PaymentView {
    /// The payment with its cancels: the status is `CANCELED` once the done
    /// cancels reach the amount, `PARTIAL_CANCELED` while a balance is left.
    pub fn with_cancels(r: &PaymentRecord, cancels: &[CancelRecord]) -> Self {
        let mut v = Self::from(r);
        let done: i64 = cancels
            .iter()
            .filter(|c| c.status == CancelStatus::Done)
            .map(|c| c.amount)
            .sum();
        v.balance_amount = r.amount - done;
        if done > 0 {
            v.status = if v.balance_amount <= 0 {
                PaymentStatus::Canceled
            } else {
                PaymentStatus::PartialCanceled
            };
        }
        v.cancels = cancels.iter().map(CancelView::from).collect();
        v
    }
}

impl From<&PaymentRecord> for PaymentView {
    fn from(r: &PaymentRecord) -> Self {
        Self {
            balance_amount: r.amount,
            cancels: Vec::new(),
            payment_id: r.payment_id.to_string(),
            order_id: r.order_id.to_string(),
            payment_key: r.payment_key.clone(),
            amount: r.amount,
            currency: r.currency.clone(),
            status: r.status(),
            saved: r.is_saved,
            approved_at: r.approved_at.clone(),
            requested_at: paygate_core::time::rfc3339_from_ms(r.created_at),
        }
    }
}

fn view(status: StatusCode, r: &PaymentRecord) -> Response {
    (status, Json(PaymentView::from(r))).into_response()
}

/// Reads `Idempotency-Key`, quoted (`"abc"`) or bare: 1-255 visible ASCII.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = raw
        .to_str()
        .map_err(|_| Problem::invalid("Idempotency-Key must be visible ASCII"))?
        .trim();
    let s = s
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s);
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Problem::invalid(
            "Idempotency-Key must be 1-255 visible ASCII characters",
        ));
    }
    Ok(Some(s.to_owned()))
}

/// True when `Content-Type` is `application/json` (parameters such as
/// `charset` allowed, case-insensitive).
pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// A path parameter, or 400 when it does not decode (the framework's text
/// names internal fields, so it is never passed on).
pub(crate) fn path_param(param: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    param
        .map(|Path(p)| p)
        .map_err(|_| Problem::invalid("a path segment is not valid percent-encoded UTF-8"))
}

/// Reads, authenticates and validates a confirm request (no I/O but the
/// merchant lookup; nothing is charged on any error here).
async fn confirm_input(state: &AppState, req: Request) -> Result<ConfirmInput, Problem> {
    let (mut parts, body) = req.into_parts();
    let AuthedMerchant(merchant) = AuthedMerchant::from_request_parts(&mut parts, state).await?;
    let idempotency_key = idempotency_key(&parts.headers)?;
    if !is_json(&parts.headers) {
        return Err(Problem::unsupported_media_type());
    }
    let body = Bytes::from_request(Request::from_parts(parts, body), state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::payload_too_large()
            } else {
                Problem::invalid("the body could not be read")
            }
        })?;
    let body: ConfirmBody = serde_json::from_slice(&body).map_err(|_| {
        Problem::invalid(
            "body must be JSON {\"paymentKey\": string, \"orderId\": string, \"amount\": integer} and nothing else",
        )
    })?;
    let order_id = OrderId::parse(&body.order_id).map_err(|e| Problem::invalid(e.to_string()))?;
    if body.amount < 1 {
        return Err(Problem::invalid(
            "amount must be an integer >= 1 (minor units)",
        ));
    }
    if body.amount > state.max_amount {
        return Err(Problem::invalid(format!(
            "amount must be at most {} (minor units)",
            state.max_amount
        )));
    }
    if body.payment_key.is_empty()
        || body.payment_key.len() > 200
        || !body.payment_key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Problem::invalid(
            "paymentKey must be 1-200 visible ASCII characters",
        ));
    }
    Ok(ConfirmInput {
        merchant_id: merchant.merchant_id,
        payment_key: body.payment_key,
        order_id,
        amount: body.amount,
        idempotency_key,
    })
}

/// The answer to a confirm whose saga has not ended (its deadline, the
/// shutdown deadline, or a failed task): 202 with the payment once the card
/// may be called, else 503, which is then true: the ticket is given up and
/// the saga makes no card call (I4).
fn early_answer(ticket: &ConfirmTicket, cause: &'static str) -> Response {
    match ticket.give_up() {
        EarlyAnswer::InProgress(record) => {
            metrics::counter!("paygate_confirm_early_answers_total", "answer" => "in_progress")
                .increment(1);
            tracing::info!(cause, payment_id = %record.payment_id,
                "confirm answered 202 before its saga ended; the saga carries on");
            let mut resp = view(StatusCode::ACCEPTED, &record);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        EarlyAnswer::NothingCharged => {
            metrics::counter!("paygate_confirm_early_answers_total", "answer" => "nothing_charged")
                .increment(1);
            tracing::warn!(
                cause,
                "confirm answered 503 before its record was durable; no card call will be made"
            );
            Problem::unavailable(
                "no answer in time; this request made no card call and will make none, retry with the same body",
            )
                .into_response()
        }
    }
}

/// `POST /v1/payments/confirm`.
#[utoipa::path(post, path = "/v1/payments/confirm", tag = "payments",
    request_body = ConfirmBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "optional; quoted or bare; the same key replays the same payment")),
    responses(
        (status = 200, description = "approved (saved: whether the ledger has it yet)", body = PaymentView),
        (status = 202, description = "outcome not known yet (status UNKNOWN, or IN_PROGRESS when the answer deadline or a shutdown came while the card call may be in flight); poll GET", body = PaymentView),
        (status = 400, description = "invalid body: not the three members, an unknown member, amount out of 1..max_amount, a bad Idempotency-Key, or two Authorization headers", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 402, description = "declined by the card company (its code)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 405, description = "another method on this path (`Allow` lists the served ones)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "the same payment is still in flight (PAYMENT_IN_PROGRESS), or the order's stock hold expired and its stock is gone (HOLD_EXPIRED; nothing was charged; a retry may pass once stock is back)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 413, description = "body over 16 KiB", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 422, description = "refused before any card call: `ORDER_ID_REUSED` / `IDEMPOTENCY_KEY_REUSED` (this merchant's order or key with another body; names the payment), `PAYMENT_KEY_REUSED` (the paymentKey was confirmed under another order), `ORDER_ID_IN_USE` (another merchant on the card account holds the orderId; whose is not said)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "`RATE_LIMITED`: over the merchant's request rate, or the merchant already has `inbound_max_concurrent_per_merchant` requests in flight; nothing was charged (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "cannot safely proceed, or too many requests in flight; nothing was charged (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn confirm(State(state): State<AppState>, req: Request) -> Result<Response, Problem> {
    // One deadline from the moment the request arrived, over reading and
    // authenticating it as well as the saga: this route has no timeout
    // layer, so the handler alone decides what an answer says (I4).
    let started = req
        .extensions()
        .get::<RequestStarted>()
        .map_or_else(std::time::Instant::now, |s| s.0);
    let answer_by = tokio::time::Instant::from_std(started + state.confirm_answer_within);
    let input = match tokio::time::timeout_at(answer_by, confirm_input(&state, req)).await {
        Ok(input) => input?,
        Err(_) => {
            return Err(Problem::unavailable(
                "the request took too long to arrive; nothing was charged, retry",
            ))
        }
    };
    let mut shutdown = state.shutdown_deadline.clone();
    if *shutdown.borrow() {
        return Err(Problem::unavailable(
            "shutting down; nothing was charged, retry",
        ));
    }
    // The saga runs in its own task: a client that disconnects, an early
    // answer or the shutdown deadline must not cancel it between the card
    // approval and the writes that record it. The ticket says what an early
    // answer may claim.
    let ticket = ConfirmTicket::new();
    let saga = state.saga.clone();
    let span = tracing::Span::current();
    let saga_ticket = ticket.clone();
    let task = tokio::spawn(
        async move { saga.confirm_with_ticket(input, saga_ticket).await }.instrument(span),
    );
    let shutdown_reached = async move {
        // A dropped sender (the server is gone) is no deadline.
        if shutdown.wait_for(|reached| *reached).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let outcome = tokio::select! {
        biased;
        joined = task => match joined {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, "confirm task failed");
                return Ok(early_answer(&ticket, "task_failed"));
            }
        },
        () = tokio::time::sleep_until(answer_by) => return Ok(early_answer(&ticket, "deadline")),
        () = shutdown_reached => return Ok(early_answer(&ticket, "shutdown")),
    };
    Ok(match outcome {
        ConfirmOutcome::Approved(r) => view(StatusCode::OK, &r),
        ConfirmOutcome::Unknown(r) => view(StatusCode::ACCEPTED, &r),
        ConfirmOutcome::Declined {
            record,
            code,
            message,
        } => {
            // A code of paygate's own carries operators' detail in the
            // record: the merchant gets a fixed sentence for it.
            let detail = if code == paygate_core::payment::failure_codes::CONFIRM_EXPIRED {
                "the card company's confirm window closed with no approval for the order; nothing was charged".to_owned()
            } else if message.is_empty() {
                "the card company declined the payment".to_owned()
            } else {
                message
            };
            Problem::new(
                StatusCode::PAYMENT_REQUIRED,
                &code,
                "Payment declined",
                detail,
            )
            .with_payment(record.payment_id.as_str())
            .into_response()
        }
        ConfirmOutcome::InFlight(r) => Problem::new(
            StatusCode::CONFLICT,
            "PAYMENT_IN_PROGRESS",
            "Payment in progress",
            "this confirm is still being processed; poll GET /v1/payments/{paymentId}",
        )
        .with_payment(r.payment_id.as_str())
        .retry_after(1)
        .into_response(),
        ConfirmOutcome::Reused { payment_id, reuse } => {
            let (code, detail) = match reuse {
                Reuse::IdempotencyKey => (
                    "IDEMPOTENCY_KEY_REUSED",
                    "this Idempotency-Key was used with a different body",
                ),
                Reuse::OrderId => (
                    "ORDER_ID_REUSED",
                    "this orderId was confirmed with a different body",
                ),
            };
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                code,
                "Conflicting reuse",
                detail,
            )
            .with_payment(payment_id.as_str())
            .into_response()
        }
        // No paymentId: the claim's holder may be another merchant's.
        ConfirmOutcome::Refused(refusal) => {
            let (code, title, detail) = match refusal {
                Refusal::OrderIdInUse => (
                    "ORDER_ID_IN_USE",
                    "Order id in use",
                    "this orderId is already in use on the card account; choose another orderId",
                ),
                Refusal::PaymentKeyReused => (
                    "PAYMENT_KEY_REUSED",
                    "Payment key reused",
                    "this paymentKey was already confirmed under another order; a paymentKey pays one order",
                ),
            };
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, title, detail).into_response()
        }
        ConfirmOutcome::HoldExpired { payment_id, short } => Problem::new(
            StatusCode::CONFLICT,
            "HOLD_EXPIRED",
            "Stock hold expired",
            format!(
                "the order's stock hold expired and the stock is gone ({}); nothing was charged",
                short.join(", ")
            ),
        )
        .with_payment(payment_id.as_str())
        .into_response(),
        ConfirmOutcome::Unavailable {
            detail,
            payment_id,
            retry_after_s,
        } => {
            let p = Problem::unavailable(detail).retry_after(retry_after_s.unwrap_or(1));
            match payment_id {
                Some(id) => p.with_payment(id.as_str()).into_response(),
                None => p.into_response(),
            }
        }
    })
}

/// `GET /v1/payments/{paymentId}`: 404 for another merchant's payment.
#[utoipa::path(get, path = "/v1/payments/{payment_id}", tag = "payments",
    params(("payment_id" = String, Path, description = "pay_ + ULID")),
    responses(
        (status = 200, description = "the payment", body = PaymentView),
        (status = 400, description = "a path segment that is not valid percent-encoded UTF-8, or two Authorization headers", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "no such payment for this merchant", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 405, description = "another method on this path (`Allow` lists the served ones)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "`RATE_LIMITED`: over the merchant's request rate, or its requests in flight at `inbound_max_concurrent_per_merchant` (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "state store unavailable, too many requests in flight, or too slow (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_payment(
    State(state): State<AppState>,
    AuthedMerchant(merchant): AuthedMerchant,
    payment_id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let payment_id = path_param(payment_id)?;
    let id = PaymentId::parse(&payment_id).ok_or_else(Problem::not_found)?;
    tracing::Span::current().record("payment_id", id.as_str());
    match state.saga.store().get(&id).await {
        Ok(Some((_, r))) if r.merchant_id == merchant.merchant_id => with_cancels(&state, &r).await,
        Ok(_) => Err(Problem::not_found()),
        Err(e) => {
            tracing::error!(error = %e, "state store unavailable");
            Err(Problem::unavailable("payment state store unavailable"))
        }
    }
}

/// 200 with a paid payment's cancels read from the store.
async fn with_cancels(state: &AppState, r: &PaymentRecord) -> Result<Response, Problem> {
    if !r.is_paid {
        return Ok(view(StatusCode::OK, r));
    }
    match state.saga.store().cancels_of(&r.payment_id).await {
        Ok(cancels) => {
            Ok((StatusCode::OK, Json(PaymentView::with_cancels(r, &cancels))).into_response())
        }
        Err(e) => {
            tracing::error!(error = %e, "state store unavailable");
            Err(Problem::unavailable("payment state store unavailable"))
        }
    }
}

/// `GET /v1/payments/orders/{orderId}`.
#[utoipa::path(get, path = "/v1/payments/orders/{order_id}", tag = "payments",
    params(("order_id" = String, Path, description = "the merchant's order id")),
    responses(
        (status = 200, description = "the payment", body = PaymentView),
        (status = 400, description = "a path segment that is not valid percent-encoded UTF-8, or two Authorization headers", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "no such order for this merchant", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 405, description = "another method on this path (`Allow` lists the served ones)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "`RATE_LIMITED`: over the merchant's request rate, or its requests in flight at `inbound_max_concurrent_per_merchant` (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "state store unavailable, too many requests in flight, or too slow (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_by_order(
    State(state): State<AppState>,
    AuthedMerchant(merchant): AuthedMerchant,
    order_id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let order_id = path_param(order_id)?;
    let order_id = OrderId::parse(&order_id).map_err(|_| Problem::not_found())?;
    match state
        .saga
        .store()
        .get_by_order(&merchant.merchant_id, &order_id)
        .await
    {
        Ok(Some(r)) => with_cancels(&state, &r).await,
        Ok(None) => Err(Problem::not_found()),
        Err(e) => {
            tracing::error!(error = %e, "state store unavailable");
            Err(Problem::unavailable("payment state store unavailable"))
        }
    }
}

/// `GET /healthz`: the process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "the process is alive", body = Object, example = json!({"status": "ok"})),
        (status = 405, description = "another method on this path (`Allow` lists the served ones)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /metrics`: Prometheus text exposition format 0.0.4. The sidecar
/// jobs' last summaries are read from `job_runs` at each scrape.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 405, description = "another method on this path (`Allow` lists the served ones)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "metrics are not available in this process", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    match paygate_api_log::JobRuns::new(state.db.clone())
        .latest()
        .await
    {
        Ok(runs) => crate::telemetry::set_job_gauges(&runs),
        Err(e) => tracing::warn!(error = %e, "could not read job runs for /metrics"),
    }
    match crate::telemetry::prometheus() {
        Some(handle) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => Problem::unavailable("metrics are not available in this process").into_response(),
    }
}

/// `GET /readyz`: 200 when the stores answer and the process is not
/// shutting down, 503 otherwise.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "stores reachable, not shutting down", body = Object, example = json!({"status": "ready"})),
        (status = 405, description = "another method on this path (`Allow` lists the served ones)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "a store is unreachable, or shutting down", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state
        .shutting_down
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Problem::unavailable("shutting down").into_response();
    }
    let store = state.saga.store().ping().await;
    let db = state.db.ping().await;
    match (store, db) {
        (Ok(()), Ok(())) => Json(serde_json::json!({"status": "ready"})).into_response(),
        _ => Problem::unavailable("a store is unreachable").into_response(),
    }
}

/// `GET /openapi.json`: this API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses(
        (status = 200, description = "the OpenAPI 3.1 document", body = Object),
        (status = 405, description = "another method on this path (`Allow` lists the served ones)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(crate::openapi::document())
}

/// Any other path: 404 problem.
pub async fn fallback() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "Not found",
        "no such route",
    )
}
