//! `POST /v1/webhooks/card`: the card company's `PAYMENT_STATUS_CHANGED`
//! webhooks (Toss Payments), and the worker that acts on them.
//!
//! The route is outside merchant auth (the card company calls it) and has
//! its own body limit ([`MAX_WEBHOOK_BYTES`]) and rate limit
//! (`card_webhook_rate_limit_per_second`). It answers 200 only after the
//! receipt is durable in `card_webhooks` ([`paygate_api_log::SqlCardInbox`]),
//! and does nothing else: Toss's payment webhooks are not signed, so the
//! body is a reason to look, never a fact. The worker of every replica
//! takes due receipts and calls [`Saga::act_on_card_webhook`], which looks
//! the order up through the logged card stack and settles what that lookup
//! shows with the batch's guarded transitions. A forged, replayed or
//! reordered webhook therefore changes only what a fresh lookup confirms.
//!
//! An event type other than `PAYMENT_STATUS_CHANGED` is answered 200 and
//! dropped (Toss would otherwise redeliver it for days); a body without an
//! order id is 400.

use std::{sync::Arc, time::Duration};

use axum::{extract::State, http::StatusCode, response::IntoResponse, Json};
use paygate_api_log::{CardWebhook, Receipt, SqlCardInbox};
use paygate_payments::{Saga, Settler, WebhookOutcome};
use serde_json::Value;
use tokio::sync::Notify;

use crate::{problem::Problem, AppState};

/// Largest webhook body accepted, bytes: a Toss `Payment` object with a
/// few dozen cancels fits several times over.
pub const MAX_WEBHOOK_BYTES: usize = 64 * 1024;

/// The event type acted on.
pub const PAYMENT_STATUS_CHANGED: &str = "PAYMENT_STATUS_CHANGED";

/// Receipts one replica works at once (each is at most one card lookup,
/// through the card stack's bulkhead like any other).
pub const WORKERS: usize = 8;

/// How long a worker holds a receipt it took before another may take it.
pub const RECEIPT_LEASE: Duration = Duration::from_secs(60);

/// Waits before a receipt that could not be finished is taken again, by
/// the number of times it was taken: 1 s, 2 s, 4 s ... at most 5 min.
pub fn retry_wait(attempts: i32) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(9);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(300))
}

/// "ledger save failed" is raised at this many batch attempts when a
/// webhook's settlement saves a payment (the batch's default).
pub const LEDGER_ALERT_THRESHOLD: i64 = 5;

/// A receipt taken this many times is finished as `gave_up` (the janitor,
/// the batch and the reconciliation still cover its payment).
pub const MAX_ATTEMPTS: i32 = 20;

/// Reads the fields paygate uses from a webhook body; `None` when it is
/// not one (no `data.orderId`, `data.paymentKey` or `data.status`).
pub fn parse(body: &Value) -> Option<CardWebhook> {
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let data = body.get("data")?;
    Some(CardWebhook {
        event_type: text(body.get("eventType")?)?,
        order_id: text(data.get("orderId")?)?,
        payment_key: text(data.get("paymentKey")?)?,
        status: text(data.get("status")?)?,
        event_at: body.get("createdAt").and_then(text).unwrap_or_default(),
        body: body.clone(),
    })
}

/// `POST /v1/webhooks/card` (see the module doc).
#[utoipa::path(post, path = "/v1/webhooks/card", tag = "webhooks",
    request_body(content = Object, description = "Toss Payments `PAYMENT_STATUS_CHANGED`: `{eventType, createdAt, data: Payment}`"),
    responses(
        (status = 200, description = "received durably (or an event type paygate does not act on); the payment is looked up before anything changes"),
        (status = 400, description = "not a payment webhook (no data.orderId, data.paymentKey, data.status)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 413, description = "body over 64 KiB", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "`RATE_LIMITED`: over `card_webhook_rate_limit_per_second` (the card company delivers it again)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "the receipt could not be stored (the card company delivers it again)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ))]
pub async fn receive(
    State(state): State<AppState>,
    body: Json<Value>,
) -> Result<impl IntoResponse, Problem> {
    if let Some(limiter) = &state.card_webhook_limiter {
        if limiter.check().is_err() {
            metrics::counter!("paygate_card_webhooks_total", "result" => "rate_limited")
                .increment(1);
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                "Too many requests",
                "card webhooks are over their rate limit; deliver again later",
            )
            .retry_after(1));
        }
    }
    let Json(body) = body;
    let Some(webhook) = parse(&body) else {
        metrics::counter!("paygate_card_webhooks_total", "result" => "invalid").increment(1);
        return Err(Problem::invalid(
            "not a payment webhook: data.orderId, data.paymentKey and data.status are required",
        ));
    };
    if webhook.event_type != PAYMENT_STATUS_CHANGED {
        tracing::info!(event_type = %webhook.event_type, "card webhook of a type paygate does not act on; dropped");
        metrics::counter!("paygate_card_webhooks_total", "result" => "ignored").increment(1);
        return Ok(StatusCode::OK);
    }
    let inbox = SqlCardInbox::new(state.db.clone());
    match inbox.receive(&webhook, state.saga.clock().now_ms()).await {
        Ok(new) => {
            let result = if new { "received" } else { "redelivered" };
            metrics::counter!("paygate_card_webhooks_total", "result" => result).increment(1);
            tracing::info!(order_id = %webhook.order_id, status = %webhook.status, new,
                "card webhook received; the payment is looked up before anything changes");
            if new {
                state.card_webhook_wake.notify_one();
            }
            Ok(StatusCode::OK)
        }
        Err(e) => {
            tracing::error!(error = %e, order_id = %webhook.order_id, "card webhook could not be stored; answered 503 for a redelivery");
            Err(Problem::unavailable(
                "the webhook could not be stored; deliver it again",
            ))
        }
    }
}

/// The worker: takes due receipts (at once when this replica received
/// one, else every `poll`) and acts on each until `stopped` turns true.
/// Receipts are worked [`WORKERS`] at a time; a failure of the inbox is logged
/// and the next round tries again.
pub async fn run_worker(
    saga: Arc<Saga>,
    inbox: SqlCardInbox,
    wake: Arc<Notify>,
    poll: Duration,
    ledger_alert_threshold: i64,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    use futures_util::StreamExt;
    let settler = Settler::new(saga.store().clone(), saga.clone(), ledger_alert_threshold);
    let lease = i64::try_from(RECEIPT_LEASE.as_millis()).unwrap_or(i64::MAX);
    loop {
        let taken = match inbox.take_due(saga.clock().now_ms(), lease, 32).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(error = %e, "card webhooks: the inbox could not be read; next round");
                Vec::new()
            }
        };
        let busy = !taken.is_empty();
        futures_util::stream::iter(taken)
            .for_each_concurrent(WORKERS, |r| work(&saga, &settler, &inbox, r))
            .await;
        if let Ok(open) = inbox.open().await {
            metrics::gauge!("paygate_card_webhooks_open").set(open as f64);
        }
        if busy {
            continue;
        }
        tokio::select! {
            _ = stopped.changed() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(poll) => {}
        }
        if *stopped.borrow() {
            return;
        }
    }
}

/// Acts on one receipt and records what came of it.
async fn work(saga: &Arc<Saga>, settler: &Settler, inbox: &SqlCardInbox, r: Receipt) {
    let started = std::time::Instant::now();
    let outcome = saga
        .act_on_card_webhook(settler, &r.order_id, &r.payment_key, &r.status)
        .await;
    metrics::histogram!("paygate_card_webhook_work_seconds").record(started.elapsed());
    metrics::counter!("paygate_card_webhook_outcomes_total", "outcome" => outcome.as_str())
        .increment(1);
    let now = saga.clock().now_ms();
    let stored = match &outcome {
        WebhookOutcome::Later(why) if r.attempts < MAX_ATTEMPTS => {
            tracing::info!(order_id = %r.order_id, attempts = r.attempts, why = %why,
                "card webhook: not settled yet; taken again later");
            let wait = i64::try_from(retry_wait(r.attempts).as_millis()).unwrap_or(i64::MAX);
            inbox.retry_at(r.id, now.saturating_add(wait), why).await
        }
        WebhookOutcome::Later(why) => {
            tracing::warn!(order_id = %r.order_id, attempts = r.attempts, why = %why,
                "card webhook: given up; the janitor, the batch and the reconciliation still cover the payment");
            inbox.finish(r.id, "gave_up", now).await
        }
        other => {
            tracing::info!(order_id = %r.order_id, status = %r.status, outcome = other.as_str(), detail = ?other,
                "card webhook: acted on the lookup");
            inbox.finish(r.id, other.as_str(), now).await
        }
    };
    if let Err(e) = stored {
        tracing::warn!(error = %e, receipt = r.id, "card webhook: its outcome could not be stored; it is taken again after its lease");
    }
}
