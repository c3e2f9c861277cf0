//! Operations (issue 7): `/metrics` after traffic, request ids, readiness.

use paygate_sandbox::FaultProfile;

use crate::helpers::{confirm_body, spawn_app, Backend};

/// The value of one series (`name{labels}` as rendered), or 0 when absent.
pub(crate) fn series(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub(crate) async fn scrape(base: &str) -> String {
    let resp = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    resp.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_every_family_and_move_with_traffic() {
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |_| {}).await;
    // A finished batch run is exposed by the serving process.
    paygate_api_log::JobRuns::new(app.app_db.clone())
        .record("batch", &serde_json::json!({"scanned": 7, "failures": 0}))
        .await
        .unwrap();
    let before = scrape(&app.base).await;
    for i in 0..3 {
        let resp = app
            .confirm(&confirm_body(&format!("order-metrics-{i}"), 1_000))
            .await;
        assert_eq!(resp.status(), 200);
    }
    let after = scrape(&app.base).await;
    for family in [
        "paygate_http_requests_total",
        "paygate_http_request_duration_seconds_bucket",
        "paygate_downstream_calls_total",
        "paygate_downstream_call_duration_seconds_bucket",
        "paygate_circuit_breaker_state",
        "paygate_bulkhead_rejections_total",
        "paygate_retries_total",
        "paygate_payments_total",
        "paygate_ledger_retry_queue_depth",
        "paygate_job_last_run",
        "paygate_job_last_run_timestamp_seconds",
    ] {
        assert!(
            after.lines().any(|l| l.starts_with(family)),
            "{family} missing from /metrics:\n{after}"
        );
    }
    let confirms =
        r#"paygate_http_requests_total{route="/v1/payments/confirm",method="POST",status="200"}"#;
    assert!(
        series(&after, confirms) >= series(&before, confirms) + 3.0,
        "{confirms}"
    );
    let approved = r#"paygate_payments_total{outcome="approved"}"#;
    assert!(series(&after, approved) >= series(&before, approved) + 3.0);
    let card_ok = r#"paygate_downstream_calls_total{downstream="card_api",outcome="ok"}"#;
    assert!(
        series(&after, card_ok) >= series(&before, card_ok) + 3.0,
        "{after}"
    );
    assert_eq!(
        series(
            &after,
            r#"paygate_job_last_run{job="batch",field="scanned"}"#
        ),
        7.0
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id() {
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |_| {}).await;
    let echoed = app
        .client
        .get(format!("{}/healthz", app.base))
        .header("X-Request-Id", "req-from-the-merchant-42")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "req-from-the-merchant-42");
    // None given (or an unusable one): a fresh UUIDv7, on errors too.
    let made = app.get("wrong-key", "/v1/payments/pay_nothing").await;
    assert_eq!(made.status(), 401);
    let id = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    // The OpenAPI document is served without a key.
    let doc: serde_json::Value = reqwest::get(format!("{}/openapi.json", app.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/v1/payments/confirm"]["post"].is_object());
    app.teardown().await;
}
