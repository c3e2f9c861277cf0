//! The resilience stack seen from outside: the real app against the sandbox.

use std::time::Duration;

use paygate_resilience::BreakerState;
use paygate_sandbox::FaultProfile;
use paygate_state_store::testing::Backend;

use crate::helpers::{confirm_body, create_merchant, spawn_app};

async fn json(resp: reqwest::Response) -> serde_json::Value {
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulkhead_caps_concurrency_at_a_slow_card_api() {
    let profile = FaultProfile {
        card_latency_min_ms: 300,
        card_latency_max_ms: 300,
        ..FaultProfile::none()
    };
    let app = spawn_app(&Backend::Sqlite, profile, |c| {
        c.card_api_policy.bulkhead_max_concurrent = 10;
        c.inbound_rate_limit_per_second = 0;
        c.database_max_connections = 20;
        // One merchant sends all 200: only the card bulkhead may shed here.
        c.inbound_max_concurrent_per_merchant = Some(c.inbound_max_concurrent);
    })
    .await;
    let bodies: Vec<_> = (0..200)
        .map(|i| confirm_body(&format!("order-bulk-{i:04}"), 1_000))
        .collect();
    let responses = futures_util::future::join_all(bodies.iter().map(|b| app.confirm(b))).await;
    let mut ok = 0;
    let mut shed = 0;
    for r in responses {
        match r.status().as_u16() {
            200 => ok += 1,
            503 => {
                assert!(r.headers().contains_key("retry-after"));
                shed += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let stats = app.sandbox.card.stats();
    assert!(
        stats.max_in_flight <= 10,
        "the card API saw {} at once",
        stats.max_in_flight
    );
    assert!(shed > 0, "the excess was rejected");
    assert_eq!(
        stats.confirm_calls, ok,
        "a rejected confirm never reached the card API"
    );
    assert_eq!(stats.approvals, ok);
    assert_eq!(
        app.saga.card_stack().breaker().state(),
        BreakerState::Closed,
        "rejections do not trip the breaker"
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_retries_stay_within_the_retry_budget_when_the_ledger_is_down() {
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |c| {
        c.ledger_api_policy.breaker_mode = "disabled".into(); // the budget alone bounds the load
        c.ledger_api_policy.retry_budget_percent = 20.0;
        c.ledger_api_policy.retry_budget_min_per_second = 1;
        c.ledger_api_policy.retry_budget_ttl_ms = 10_000;
        c.ledger_retry_max_attempts = 10;
        c.ledger_retry_base_delay_ms = 1;
        c.ledger_retry_max_delay_ms = 5;
        c.inbound_rate_limit_per_second = 0;
    })
    .await;
    app.sandbox.ledger.set_down(true);
    let confirms = 100u64;
    for i in 0..confirms {
        let r = app
            .confirm(&confirm_body(&format!("order-budget-{i:04}"), 1_000))
            .await;
        assert_eq!(
            r.status(),
            200,
            "ledger trouble never fails an approved payment"
        );
    }
    tokio::time::timeout(Duration::from_secs(30), app.saga.retries().wait_idle())
        .await
        .unwrap();
    let calls = app.sandbox.ledger.stats().record_calls;
    let ratio = calls as f64 / confirms as f64;
    let bound = 1.0 + 0.20 + 1.0 * 10.0 / confirms as f64;
    assert!(
        ratio <= bound,
        "ledger calls per confirm {ratio:.3} over the budget bound {bound:.3}"
    );
    assert!(calls > confirms, "some retries were made");
    eprintln!("ledger down: {calls} calls for {confirms} confirms, ratio {ratio:.3} <= {bound:.3}");
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_never_open_the_card_breaker() {
    let profile = FaultProfile {
        decline_rate: 1.0,
        ..FaultProfile::none()
    };
    let app = spawn_app(&Backend::Sqlite, profile, |c| {
        c.card_api_policy.breaker_minimum_number_of_calls = 5;
        c.card_api_policy.breaker_window_size = 10;
        c.inbound_rate_limit_per_second = 0;
    })
    .await;
    for i in 0..50 {
        let r = app
            .confirm(&confirm_body(&format!("order-dec-{i:04}"), 1_000))
            .await;
        assert_eq!(r.status(), 402);
    }
    assert_eq!(
        app.saga.card_stack().breaker().state(),
        BreakerState::Closed
    );
    assert_eq!(
        app.sandbox.card.stats().confirm_calls,
        50,
        "every decline was a real call, none refused"
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_card_breaker_is_503_with_retry_after_and_no_call() {
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |_| {}).await;
    app.saga.card_stack().breaker().force_open(true);
    let r = app.confirm(&confirm_body("order-open-1", 1_000)).await;
    assert_eq!(r.status(), 503);
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let problem = json(r).await;
    assert_eq!(
        app.sandbox.card.stats().confirm_calls,
        0,
        "no card call while open"
    );
    let got = json(app.get(&app.key, "/v1/payments/orders/order-open-1").await).await;
    assert_eq!(got["status"], "ABORTED");
    // The card REQUEST row was committed with the record (one commit) and
    // the call never left: the log withdraws it, so the batch and a retry
    // still read "never sent" rather than looking the payment up.
    let pid = got["paymentId"].as_str().unwrap();
    let evidence = app
        .saga
        .log()
        .confirm_evidence(pid, "/v1/payments/confirm")
        .await
        .unwrap();
    assert_eq!(evidence.requests, 0, "{evidence:?}");

    // Closed again, the merchant's retry goes through for the same payment.
    app.saga.card_stack().breaker().force_open(false);
    let r = app.confirm(&confirm_body("order-open-1", 1_000)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["paymentId"], problem["paymentId"]);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_ledger_breaker_skips_the_sync_try_and_answers_200_unsaved() {
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |c| {
        c.ledger_retry_max_attempts = 1
    })
    .await;
    app.saga.ledger_stack().breaker().force_open(true);
    let r = app.confirm(&confirm_body("order-ledger-open", 1_000)).await;
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(
        (body["status"].as_str(), body["saved"].as_bool()),
        (Some("DONE"), Some(false))
    );
    tokio::time::timeout(Duration::from_secs(10), app.saga.retries().wait_idle())
        .await
        .unwrap();
    assert_eq!(
        app.sandbox.ledger.stats().record_calls,
        0,
        "no ledger call while its breaker is open"
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_over_its_rate_limit_gets_429_and_others_are_unaffected() {
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |c| {
        c.inbound_rate_limit_per_second = 1;
        c.inbound_rate_limit_burst = 3;
    })
    .await;
    let (_, key_b) = create_merchant(&app.app_db, &app.config, "merchant-b").await;
    let mut limited = None;
    for _ in 0..10 {
        let r = app.get(&app.key, "/v1/payments/orders/order-none-1").await;
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 404);
    }
    let r = limited.expect("merchant A is limited within 10 requests");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(json(r).await["code"], "RATE_LIMITED");
    let b = app.get(&key_b, "/v1/payments/orders/order-none-1").await;
    assert_eq!(b.status(), 404, "merchant B is not limited by A's traffic");
    app.teardown().await;
}
