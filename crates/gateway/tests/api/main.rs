//! End-to-end tests of the confirm saga (issue 2 acceptance), through the
//! real HTTP server against the sandbox simulators over HTTP, on every
//! reachable SQL backend and, beside SQLite, with the state records in each
//! configured MongoDB (standalone and replica set).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod cancel;
mod chaos;
mod claims;
mod edges;
mod helpers;
mod holds;
mod operations;
mod provider_error;
mod resilience;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use helpers::{
    backends, confirm_body, create_merchant, make_log_read_only, make_log_writable, spawn_app,
    Backend, E2eBackend,
};
use paygate_api_log::{SqlApiLog, Target};
use paygate_sandbox::{CallObserver, FaultProfile, ObservedCall, SimTarget};
use paygate_state_store::StateStore as _;
use serde_json::Value;

/// Checks, at the moment a call reaches the simulator, that paygate's log
/// already holds the REQUEST row for it.
struct RequestRowChecker {
    log: SqlApiLog,
    seen: Mutex<Vec<(SimTarget, bool)>>,
}

#[async_trait::async_trait]
impl CallObserver for RequestRowChecker {
    async fn on_call(&self, call: ObservedCall) {
        let target = match call.target {
            SimTarget::Card => Target::CardApi,
            SimTarget::Ledger => Target::LedgerApi,
        };
        let key = call.idempotency_key.unwrap_or_default();
        let present = self.log.has_request(&key, target).await.unwrap_or(false);
        self.seen.lock().unwrap().push((call.target, present));
    }
}

async fn json(resp: reqwest::Response) -> Value {
    resp.json().await.expect("json body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_logs_every_request_before_the_call() {
    for backend in backends() {
        happy_path(&backend).await;
    }
}

async fn happy_path(backend: &E2eBackend) {
    let app = spawn_app(backend, FaultProfile::none(), |_| {}).await;
    assert_eq!(
        app.app_db.backend(),
        backend.sql.name(),
        "the app runs on the backend under test"
    );
    let checker = Arc::new(RequestRowChecker {
        log: app.log(),
        seen: Mutex::new(Vec::new()),
    });
    app.sandbox.card.set_observer(checker.clone());
    app.sandbox.ledger.set_observer(checker.clone());

    let resp = app.confirm(&confirm_body("order-happy-1", 15_000)).await;
    assert_eq!(resp.status(), 200, "{}", backend.name());
    let body = json(resp).await;
    assert_eq!(body["status"], "DONE");
    assert_eq!(body["saved"], true);
    assert_eq!(body["amount"], 15_000);
    assert_eq!(body["currency"], "KRW");
    assert!(body["approvedAt"].is_string());
    let payment_id = body["paymentId"].as_str().unwrap().to_owned();
    // The state record lives in the store under test: in SQL, or only in
    // MongoDB (the SQL tables hold none).
    let in_sql = paygate_state_store::SqlStateStore::new(app.app_db.clone())
        .get(&paygate_core::PaymentId::from_stored(&payment_id))
        .await
        .unwrap()
        .is_some();
    assert_eq!(
        in_sql,
        !backend.mongodb_state(),
        "{}: the state record is in the configured state store",
        backend.name()
    );
    assert!(app
        .saga
        .store()
        .get(&paygate_core::PaymentId::from_stored(&payment_id))
        .await
        .unwrap()
        .is_some());

    // The simulator saw exactly one card call and one ledger call, and each
    // found its REQUEST row already written.
    let seen = checker.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(SimTarget::Card, true), (SimTarget::Ledger, true)],
        "{}",
        backend.name()
    );

    let rows = app
        .log()
        .for_payment(&paygate_core::PaymentId::from_stored(&payment_id))
        .await
        .unwrap();
    let kinds: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.target.clone(), r.kind.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("card_api".into(), "REQUEST".into()),
            ("card_api".into(), "RESPONSE".into()),
            ("ledger_api".into(), "REQUEST".into()),
            ("ledger_api".into(), "RESPONSE".into()),
        ]
    );
    assert_eq!(rows[1].status_code, Some(200));
    assert_eq!(rows[3].status_code, Some(201));
    assert_eq!(rows[0].body.as_ref().unwrap()["orderId"], "order-happy-1");

    let stats = app.sandbox.card.stats();
    assert_eq!((stats.confirm_calls, stats.approvals), (1, 1));
    assert_eq!(app.sandbox.ledger.stats().records, 1);
    assert_eq!(
        app.sandbox.ledger.record(&payment_id).unwrap().amount,
        15_000
    );

    let got = json(
        app.get(&app.key, &format!("/v1/payments/{payment_id}"))
            .await,
    )
    .await;
    assert_eq!(got, body);
    let by_order = json(app.get(&app.key, "/v1/payments/orders/order-happy-1").await).await;
    assert_eq!(by_order, body);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_is_402_problem_with_the_card_code() {
    for backend in backends() {
        let profile = FaultProfile {
            decline_rate: 1.0,
            ..FaultProfile::none()
        };
        let app = spawn_app(&backend, profile, |_| {}).await;
        let resp = app.confirm(&confirm_body("order-decline", 5_000)).await;
        assert_eq!(resp.status(), 402, "{}", backend.name());
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let problem = json(resp).await;
        assert_eq!(problem["code"], "REJECT_CARD_PAYMENT");
        assert_eq!(problem["status"], 402);
        assert!(
            problem["type"].is_string()
                && problem["title"].is_string()
                && problem["detail"].is_string()
        );

        let got = json(app.get(&app.key, "/v1/payments/orders/order-decline").await).await;
        assert_eq!(got["status"], "ABORTED");
        assert_eq!(got["saved"], false);
        assert!(got["approvedAt"].is_null());
        assert_eq!(app.sandbox.card.stats().approvals, 0);
        assert_eq!(
            app.sandbox.ledger.stats().record_calls,
            0,
            "a decline is never sent to the ledger"
        );

        // A retry of the declined confirm replays the decline without a new card call.
        let again = app.confirm(&confirm_body("order-decline", 5_000)).await;
        assert_eq!(again.status(), 402);
        assert_eq!(app.sandbox.card.stats().confirm_calls, 1);
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_with_a_dropped_response_is_settled_by_lookup() {
    for backend in backends() {
        let profile = FaultProfile {
            drop_response_rate: 1.0,
            drop_hold_ms: 3_000,
            ..FaultProfile::none()
        };
        let app = spawn_app(&backend, profile, |c| {
            c.card_api_policy.attempt_timeout_ms = 300
        })
        .await;
        let resp = app.confirm(&confirm_body("order-dropped", 7_000)).await;
        assert_eq!(resp.status(), 200, "{}", backend.name());
        let body = json(resp).await;
        assert_eq!(body["status"], "DONE");
        assert_eq!(body["saved"], true);
        let stats = app.sandbox.card.stats();
        assert_eq!(stats.approvals, 1, "exactly one approval");
        assert_eq!(
            stats.confirm_calls, 1,
            "a timed-out confirm is settled by lookup, not re-sent"
        );
        assert!(stats.lookup_calls >= 1);
        assert_eq!(stats.double_charges, 0);

        let pid = paygate_core::PaymentId::from_stored(body["paymentId"].as_str().unwrap());
        let rows = app.log().for_payment(&pid).await.unwrap();
        assert!(
            rows.iter()
                .any(|r| r.target == "card_api" && r.kind == "ERROR"),
            "the timeout is logged"
        );
        assert!(
            rows.iter()
                .any(|r| r.method == "GET" && r.kind == "REQUEST"),
            "the lookup is logged first"
        );
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_down_answers_200_unsaved_then_async_retries_save_it() {
    for backend in backends() {
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        app.sandbox.ledger.set_down(true);
        let resp = app.confirm(&confirm_body("order-ledger-down", 9_900)).await;
        assert_eq!(resp.status(), 200, "{}", backend.name());
        let body = json(resp).await;
        assert_eq!(body["status"], "DONE");
        assert_eq!(body["saved"], false);
        assert!(
            app.saga.retries().pending() >= 1,
            "async retries are running"
        );

        tokio::time::sleep(Duration::from_millis(100)).await;
        app.sandbox.ledger.set_down(false);
        tokio::time::timeout(Duration::from_secs(20), app.saga.retries().wait_idle())
            .await
            .expect("retries settle");

        let pid = body["paymentId"].as_str().unwrap();
        let got = json(app.get(&app.key, &format!("/v1/payments/{pid}")).await).await;
        assert_eq!(got["saved"], true);
        let ledger = app.sandbox.ledger.stats();
        assert_eq!(ledger.records, 1, "the ledger holds one record");
        assert!(ledger.failures >= 1 && ledger.record_calls > ledger.failures);
        assert_eq!(app.sandbox.card.stats().approvals, 1);
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_log_write_is_503_with_no_card_call() {
    for backend in backends() {
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        make_log_read_only(&app.app_db).await;
        let resp = app.confirm(&confirm_body("order-nolog", 1_000)).await;
        assert_eq!(resp.status(), 503, "{}", backend.name());
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        assert!(resp.headers().contains_key("retry-after"));
        let problem = json(resp).await;
        assert!(
            !problem["detail"].as_str().unwrap().contains("read-only"),
            "internal error text must not leak"
        );
        assert_eq!(
            app.sandbox.card.stats().confirm_calls,
            0,
            "no card call without its REQUEST row"
        );

        let got = json(app.get(&app.key, "/v1/payments/orders/order-nolog").await).await;
        assert_eq!(got["status"], "ABORTED");

        // Once the log is writable again, the merchant's retry goes through
        // for the same payment.
        make_log_writable(&app.app_db).await;
        let retry = app.confirm(&confirm_body("order-nolog", 1_000)).await;
        assert_eq!(retry.status(), 200);
        let body = json(retry).await;
        assert_eq!(body["paymentId"], problem["paymentId"]);
        assert_eq!(app.sandbox.card.stats().approvals, 1);
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_replay_concurrency_and_reuse() {
    for backend in backends() {
        let app = spawn_app(
            &backend,
            FaultProfile {
                card_latency_min_ms: 20,
                card_latency_max_ms: 40,
                ..FaultProfile::none()
            },
            |_| {},
        )
        .await;

        // The same confirm twice: the same payment.
        let first = json(app.confirm(&confirm_body("order-twice", 3_000)).await).await;
        let second = json(app.confirm(&confirm_body("order-twice", 3_000)).await).await;
        assert_eq!(
            first["paymentId"],
            second["paymentId"],
            "{}",
            backend.name()
        );
        assert_eq!(second["status"], "DONE");

        // 50 identical confirms at once: one approval.
        let body = confirm_body("order-race-50", 4_000);
        let responses = futures_util::future::join_all((0..50).map(|_| app.confirm(&body))).await;
        let mut ids = std::collections::HashSet::new();
        for r in responses {
            let status = r.status().as_u16();
            assert!(status == 200 || status == 409, "unexpected {status}");
            ids.insert(json(r).await["paymentId"].as_str().unwrap().to_owned());
        }
        assert_eq!(ids.len(), 1, "one payment for the order");
        let stats = app.sandbox.card.stats();
        assert_eq!(stats.approvals, 2, "one approval per order");
        assert_eq!(stats.double_charges, 0);

        // Same orderId, different amount: 422.
        let resp = app.confirm(&confirm_body("order-twice", 3_001)).await;
        assert_eq!(resp.status(), 422);
        assert_eq!(json(resp).await["code"], "ORDER_ID_REUSED");

        // Idempotency-Key (quoted or bare) reused for another body: 422.
        let ok = app
            .confirm_with(
                &app.key,
                &confirm_body("order-key-1", 100),
                Some("\"key-123\""),
            )
            .await;
        assert_eq!(ok.status(), 200);
        let replay = app
            .confirm_with(&app.key, &confirm_body("order-key-1", 100), Some("key-123"))
            .await;
        assert_eq!(replay.status(), 200);
        let reused = app
            .confirm_with(&app.key, &confirm_body("order-key-2", 100), Some("key-123"))
            .await;
        assert_eq!(reused.status(), 422);
        assert_eq!(json(reused).await["code"], "IDEMPOTENCY_KEY_REUSED");
        assert_eq!(app.sandbox.card.stats().approvals, 3);
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_merchant_isolation() {
    for backend in backends() {
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let no_key = app
            .client
            .post(format!("{}/v1/payments/confirm", app.base))
            .json(&confirm_body("order-auth", 100))
            .send()
            .await
            .unwrap();
        assert_eq!(no_key.status(), 401, "{}", backend.name());
        assert_eq!(no_key.headers()["content-type"], "application/problem+json");
        let bad_key = app
            .confirm_with("pgk_0000", &confirm_body("order-auth", 100), None)
            .await;
        assert_eq!(bad_key.status(), 401);
        assert_eq!(app.sandbox.card.stats().confirm_calls, 0);

        let a = json(app.confirm(&confirm_body("order-of-a", 100)).await).await;
        let (_, key_b) = create_merchant(&app.app_db, &app.config, "merchant-b").await;
        let pid = a["paymentId"].as_str().unwrap();
        assert_eq!(
            app.get(&key_b, &format!("/v1/payments/{pid}"))
                .await
                .status(),
            404
        );
        assert_eq!(
            app.get(&key_b, "/v1/payments/orders/order-of-a")
                .await
                .status(),
            404
        );
        assert_eq!(
            app.get(&app.key, &format!("/v1/payments/{pid}"))
                .await
                .status(),
            200
        );
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_outage_leaves_unknown_with_an_alert_and_no_approval() {
    for backend in backends() {
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        app.sandbox.card.set_down(true);
        let resp = app.confirm(&confirm_body("order-outage", 2_000)).await;
        assert_eq!(resp.status(), 202, "{}", backend.name());
        let body = json(resp).await;
        assert_eq!(body["status"], "UNKNOWN");
        let stats = app.sandbox.card.stats();
        assert_eq!(
            stats.confirm_calls, 3,
            "5xx is retried up to card_api_max_attempts"
        );
        assert_eq!(stats.lookup_calls, 3);
        assert_eq!(stats.approvals, 0);
        let alerts = app.alerts.outbox().all().await.unwrap();
        assert_eq!(alerts.len(), 1, "an operator is told");
        assert_eq!(
            alerts[0].dedup_key,
            format!("{}:outcome_unknown", body["paymentId"].as_str().unwrap())
        );
        assert_eq!(
            alerts[0].sent_at, None,
            "no webhook configured: kept in the outbox"
        );
        // A retry while the outcome is unknown replays 202 and makes no new call.
        let again = app.confirm(&confirm_body("order-outage", 2_000)).await;
        assert_eq!(again.status(), 202);
        assert_eq!(app.sandbox.card.stats().confirm_calls, 3);
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bodies_are_400_problems() {
    let backend = Backend::Sqlite;
    let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
    for body in [
        serde_json::json!({"paymentKey": "pk", "orderId": "short", "amount": 100}),
        serde_json::json!({"paymentKey": "pk", "orderId": "order-ok-1", "amount": 0}),
        serde_json::json!({"paymentKey": "pk", "orderId": "order-ok-1", "amount": 1.5}),
        serde_json::json!({"paymentKey": "", "orderId": "order-ok-1", "amount": 100}),
        serde_json::json!({"orderId": "order-ok-1"}),
    ] {
        let resp = app.confirm(&body).await;
        assert_eq!(resp.status(), 400, "{body}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
    }
    let resp = app.get(&app.key, "/v1/payments/not-an-id").await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        app.client
            .get(format!("{}/healthz", app.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        app.client
            .get(format!("{}/readyz", app.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(app.sandbox.card.stats().confirm_calls, 0);
    app.teardown().await;
}
