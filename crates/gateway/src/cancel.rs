//! `POST /v1/payments/{paymentId}/cancel` (DESIGN.md §5): a merchant's
//! full or partial cancel (refund) of an approved payment, adapted to HTTP.
//! The money logic is [`paygate_payments::cancel`]; this file reads the
//! request and maps each [`CancelOutcome`] to its answer.
//!
//! Like the confirm, the cancel runs in its own task with the route's own
//! deadline ([`crate::Protection::OwnDeadline`]): a client that disconnects
//! or a deadline never drops it between the card's answer and the writes
//! that record it, and an answer given before it ends is 202 (the outcome
//! is not known yet; poll `GET`), never a 503 that would claim nothing was
//! canceled.

use axum::{
    body::Bytes,
    extract::{rejection::PathRejection, FromRequest, FromRequestParts, Path, Request, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use paygate_core::PaymentId;
use paygate_payments::{CancelInput, CancelOutcome, CanceledPayment};
use serde::Deserialize;
use tracing::Instrument;

use crate::{
    auth::AuthedMerchant,
    problem::Problem,
    routes::{idempotency_key, is_json, path_param, PaymentView},
    telemetry::RequestStarted,
    AppState,
};

/// Body of `POST /v1/payments/{paymentId}/cancel`. Any other member is
/// refused (400).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CancelBody {
    /// Why the payment is canceled (1-200 characters; the card company
    /// shows it to the customer).
    #[schema(min_length = 1, max_length = 200)]
    pub cancel_reason: String,
    /// Amount to cancel in minor units (>= 1, at most the balance); absent,
    /// the whole balance.
    #[schema(minimum = 1)]
    pub cancel_amount: Option<i64>,
}

/// Reads, authenticates and validates a cancel request (no I/O but the
/// merchant lookup).
async fn cancel_input(
    state: &AppState,
    req: Request,
    payment_id: Result<Path<String>, PathRejection>,
) -> Result<CancelInput, Problem> {
    let (mut parts, body) = req.into_parts();
    let AuthedMerchant(merchant) = AuthedMerchant::from_request_parts(&mut parts, state).await?;
    let payment_id = path_param(payment_id)?;
    let payment_id = PaymentId::parse(&payment_id).ok_or_else(Problem::not_found)?;
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
    let body: CancelBody = serde_json::from_slice(&body).map_err(|_| {
        Problem::invalid(
            "body must be JSON {\"cancelReason\": string, \"cancelAmount\"?: integer} and nothing else",
        )
    })?;
    let reason = body.cancel_reason.trim();
    if reason.is_empty() || reason.chars().count() > 200 || reason.chars().any(char::is_control) {
        return Err(Problem::invalid(
            "cancelReason must be 1-200 characters with no control characters",
        ));
    }
    if body.cancel_amount.is_some_and(|a| a < 1) {
        return Err(Problem::invalid(
            "cancelAmount must be an integer >= 1 (minor units)",
        ));
    }
    Ok(CancelInput {
        merchant_id: merchant.merchant_id,
        payment_id,
        reason: reason.to_owned(),
        amount: body.cancel_amount,
        idempotency_key,
    })
}

fn view(status: StatusCode, p: &CanceledPayment) -> Response {
    (
        status,
        Json(PaymentView::with_cancels(&p.record, &p.cancels)),
    )
        .into_response()
}

/// `POST /v1/payments/{paymentId}/cancel`.
#[utoipa::path(post, path = "/v1/payments/{payment_id}/cancel", tag = "payments",
    request_body = CancelBody,
    params(
        ("payment_id" = String, Path, description = "pay_ + ULID"),
        ("Idempotency-Key" = Option<String>, Header, description = "optional; quoted or bare; the same key with the same body replays the first answer"),
    ),
    responses(
        (status = 200, description = "canceled: status CANCELED or PARTIAL_CANCELED, balanceAmount and cancels[]", body = PaymentView),
        (status = 202, description = "the card company's answer is not known yet (the cancel shows UNKNOWN or IN_PROGRESS); poll GET, the batch settles it", body = PaymentView),
        (status = 400, description = "invalid body: an unknown member, cancelReason not 1-200 characters, cancelAmount < 1, a bad Idempotency-Key, a bad path segment, or two Authorization headers", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "no such payment for this merchant", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 405, description = "another method on this path (`Allow` lists the served ones)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "NOT_APPROVED: the payment is not approved (in progress, unknown or declined); CANCEL_IN_PROGRESS: another cancel of it is in flight", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 413, description = "body over 16 KiB", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 422, description = "CANCEL_AMOUNT_EXCEEDS_BALANCE, IDEMPOTENCY_KEY_REUSED (another body), or the card company's code when it refused the cancel", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "rate limited (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "cannot safely proceed, or too many requests in flight; nothing was canceled (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    payment_id: Result<Path<String>, PathRejection>,
    req: Request,
) -> Result<Response, Problem> {
    let started = req
        .extensions()
        .get::<RequestStarted>()
        .map_or_else(std::time::Instant::now, |s| s.0);
    let answer_by = tokio::time::Instant::from_std(started + state.confirm_answer_within);
    let input =
        match tokio::time::timeout_at(answer_by, cancel_input(&state, req, payment_id)).await {
            Ok(input) => input?,
            Err(_) => {
                return Err(Problem::unavailable(
                    "the request took too long to arrive; nothing was canceled, retry",
                ))
            }
        };
    if *state.shutdown_deadline.borrow() {
        return Err(Problem::unavailable(
            "shutting down; nothing was canceled, retry",
        ));
    }
    tracing::Span::current().record("payment_id", input.payment_id.as_str());
    let payment_id = input.payment_id.clone();
    let saga = state.saga.clone();
    let span = tracing::Span::current();
    let task = tokio::spawn(async move { saga.cancel(input).await }.instrument(span));
    let outcome = tokio::select! {
        biased;
        joined = task => match joined {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, "cancel task failed");
                return Ok(accepted(&state, &payment_id).await);
            }
        },
        () = tokio::time::sleep_until(answer_by) => return Ok(accepted(&state, &payment_id).await),
    };
    Ok(answer(outcome, &payment_id))
}

/// 202 with the payment as it is now: the cancel may be in flight.
async fn accepted(state: &AppState, payment_id: &PaymentId) -> Response {
    let store = state.saga.store();
    match (
        store.get(payment_id).await,
        store.cancels_of(payment_id).await,
    ) {
        (Ok(Some((_, record))), Ok(cancels)) => {
            let mut resp = view(StatusCode::ACCEPTED, &CanceledPayment { record, cancels });
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        // The state cannot be read: 409 says "still being processed", which
        // is true, where a 503 would claim nothing was canceled.
        _ => Problem::new(
            StatusCode::CONFLICT,
            "CANCEL_IN_PROGRESS",
            "Cancel in progress",
            "the cancel is still being processed; poll GET /v1/payments/{paymentId}",
        )
        .with_payment(payment_id.as_str())
        .retry_after(1)
        .into_response(),
    }
}

fn answer(outcome: CancelOutcome, payment_id: &PaymentId) -> Response {
    let problem = |status, code: &str, title: &str, detail: String| {
        Problem::new(status, code, title, detail)
            .with_payment(payment_id.as_str())
            .into_response()
    };
    match outcome {
        CancelOutcome::Canceled(p) => view(StatusCode::OK, &p),
        CancelOutcome::Unknown(p) => view(StatusCode::ACCEPTED, &p),
        CancelOutcome::NotFound => Problem::not_found().into_response(),
        CancelOutcome::NotApproved => problem(
            StatusCode::CONFLICT,
            "NOT_APPROVED",
            "Payment not approved",
            "only an approved payment can be canceled; this one is in progress, unknown or declined".to_owned(),
        ),
        CancelOutcome::InProgress => Problem::new(
            StatusCode::CONFLICT,
            "CANCEL_IN_PROGRESS",
            "Cancel in progress",
            "another cancel of this payment is still being processed; retry shortly",
        )
        .with_payment(payment_id.as_str())
        .retry_after(1)
        .into_response(),
        CancelOutcome::ExceedsBalance { balance } => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "CANCEL_AMOUNT_EXCEEDS_BALANCE",
            "Cancel amount exceeds the balance",
            format!("at most {balance} (minor units) is left to cancel"),
        ),
        CancelOutcome::KeyReused => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "IDEMPOTENCY_KEY_REUSED",
            "Conflicting reuse",
            "this Idempotency-Key was used with a different body".to_owned(),
        ),
        CancelOutcome::Refused { code } => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            &code,
            "Cancel refused",
            "the card company refused the cancel".to_owned(),
        ),
        CancelOutcome::Unavailable {
            detail,
            retry_after_s,
        } => Problem::unavailable(detail)
            .retry_after(retry_after_s)
            .with_payment(payment_id.as_str())
            .into_response(),
    }
}
