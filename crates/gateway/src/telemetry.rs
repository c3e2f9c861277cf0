//! Telemetry of the merchant API: the Prometheus exporter behind
//! `GET /metrics`, and the per-request middleware that gives every request a
//! request id (the caller's `X-Request-Id`, or a new UUIDv7), a tracing span
//! that every log line of the request carries (`request_id`, then
//! `merchant_id` and `payment_id` once known), HTTP metrics by route and
//! status, and one `INFO` line when the request ends.
//!
//! `metrics-exporter-prometheus` is the `metrics` facade's own Prometheus
//! exporter; it is used without its HTTP listener (the route serves it).

use std::{sync::OnceLock, time::Instant};

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

/// The request id header, read and echoed.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Latency buckets, seconds: 1 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus exporter, installed as the global `metrics`
/// recorder on first use. `None` when another recorder was installed first
/// (then `/metrics` answers 503 rather than lie with an empty page).
pub fn prometheus() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    LATENCY_BUCKETS,
                )
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder was already installed; /metrics is disabled");
                    None
                }
            }
        })
        .clone()
}

/// Registers the families an operator alerts on, at zero, so they exist on
/// `/metrics` before the first event (a rate over a missing series is no
/// alert at all).
pub fn register_families() {
    for d in ["card_api", "ledger_api"] {
        metrics::counter!("paygate_bulkhead_rejections_total", "downstream" => d).increment(0);
        metrics::counter!("paygate_circuit_breaker_rejections_total", "downstream" => d)
            .increment(0);
        metrics::counter!("paygate_retries_total", "downstream" => d).increment(0);
        metrics::counter!("paygate_retry_budget_exhausted_total", "downstream" => d).increment(0);
    }
    for outcome in ["approved", "declined", "unknown"] {
        metrics::counter!("paygate_payments_total", "outcome" => outcome).increment(0);
    }
    metrics::gauge!("paygate_ledger_retry_queue_depth").increment(0.0);
    metrics::counter!("paygate_inbound_shed_total").increment(0);
    metrics::counter!("paygate_inbound_rate_limited_total").increment(0);
    metrics::counter!("paygate_inbound_merchant_shed_total").increment(0);
    for reason in ["header_read_timeout", "idle_timeout"] {
        metrics::counter!("paygate_inbound_connections_cut_total", "reason" => reason).increment(0);
    }
    for answer in ["in_progress", "nothing_charged"] {
        metrics::counter!("paygate_confirm_early_answers_total", "answer" => answer).increment(0);
    }
    for result in ["delivered", "pending", "failed"] {
        metrics::counter!("paygate_webhook_deliveries_total", "result" => result).increment(0);
    }
    metrics::gauge!("paygate_webhook_deliveries_pending").increment(0.0);
    metrics::gauge!("paygate_events_unnumbered").increment(0.0);
}

/// Sets the job gauges from `job_runs` (see `paygate_api_log::JobRuns`):
/// `paygate_job_last_run_timestamp_seconds{job}` and, for each count in the
/// job's summary, `paygate_job_last_run{job, field}`.
pub fn set_job_gauges(runs: &[(String, i64, serde_json::Value)]) {
    for (job, finished_at, summary) in runs {
        metrics::gauge!("paygate_job_last_run_timestamp_seconds", "job" => job.clone())
            .set(*finished_at as f64 / 1000.0);
        if let Some(fields) = summary.as_object() {
            for (field, v) in fields {
                if let Some(n) = v.as_f64() {
                    metrics::gauge!("paygate_job_last_run", "job" => job.clone(), "field" => field.clone())
                        .set(n);
                }
            }
        }
    }
}

/// A caller's request id is kept if it is 1-128 visible ASCII characters;
/// otherwise a new UUIDv7 (time-ordered) is made.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}

/// When the request reached the gateway (an extension set by
/// [`request_context`]); a confirm's answer deadline counts from it.
#[derive(Clone, Copy, Debug)]
pub struct RequestStarted(pub Instant);

/// The middleware: request id, span, metrics, access log.
pub async fn request_context(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    req.extensions_mut().insert(RequestStarted(started));
    let id = request_id(&req);
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %method,
        route = %route,
        merchant_id = tracing::field::Empty,
        payment_id = tracing::field::Empty,
    );
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    let labels = [
        ("route", route.clone()),
        ("method", method.to_string()),
        ("status", status.to_string()),
    ];
    metrics::counter!("paygate_http_requests_total", &labels).increment(1);
    metrics::histogram!("paygate_http_request_duration_seconds", &labels)
        .record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = elapsed.as_millis() as u64,
            "request finished"
        );
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: Option<&str>) -> Request {
        let mut b = axum::http::Request::builder();
        if let Some(id) = id {
            b = b.header("x-request-id", id);
        }
        b.body(axum::body::Body::empty()).unwrap_or_default()
    }

    #[test]
    fn a_sane_caller_id_is_kept_and_anything_else_replaced_by_a_uuid_v7() {
        assert_eq!(request_id(&req(Some("abc-123"))), "abc-123");
        for bad in [
            None,
            Some(""),
            Some("has space"),
            Some(&"x".repeat(129)[..]),
        ] {
            let made = request_id(&req(bad));
            let uuid = uuid::Uuid::parse_str(&made).unwrap_or_default();
            assert_eq!(uuid.get_version_num(), 7, "{bad:?} -> {made}");
        }
    }
}
