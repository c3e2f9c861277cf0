//! The merchant cancel route (issue 15, point 11), black box over HTTP
//! against the real server and the sandbox simulators, on every backend:
//! call counts and balances are read at the sandbox.

use std::sync::Arc;

use paygate_sandbox::FaultProfile;
use serde_json::{json, Value};

use crate::helpers::{
    backends, confirm_body, create_merchant, make_log_read_only, make_log_writable, spawn_app,
    TestApp,
};

impl TestApp {
    async fn cancel_with(
        &self,
        key: &str,
        payment_id: &str,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}/v1/payments/{payment_id}/cancel", self.base))
            .bearer_auth(key)
            .json(body);
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.expect("request sent")
    }

    async fn cancel(&self, payment_id: &str, body: &Value) -> reqwest::Response {
        self.cancel_with(&self.key, payment_id, body, None).await
    }

    /// Confirms an order and returns its paymentId.
    async fn paid(&self, order: &str, amount: i64) -> String {
        let resp = self.confirm(&confirm_body(order, amount)).await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        body["paymentId"].as_str().unwrap().to_owned()
    }
}

async fn status_and_body(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_cancels_down_to_zero_then_over_the_balance_is_422() {
    for backend in backends() {
        let name = backend.name();
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let pid = app.paid("order-cancel-partial", 10_000).await;

        let (s, b) = status_and_body(
            app.cancel(
                &pid,
                &json!({"cancelReason": "one item out of stock", "cancelAmount": 3_000}),
            )
            .await,
        )
        .await;
        assert_eq!(s, 200, "{name}: {b}");
        assert_eq!(b["status"], "PARTIAL_CANCELED", "{name}");
        assert_eq!(b["balanceAmount"], 7_000);
        assert_eq!(b["amount"], 10_000);
        assert_eq!(b["cancels"][0]["cancelAmount"], 3_000);
        assert_eq!(b["cancels"][0]["status"], "DONE");

        let (s, b) = status_and_body(
            app.cancel(
                &pid,
                &json!({"cancelReason": "more", "cancelAmount": 7_001}),
            )
            .await,
        )
        .await;
        assert_eq!(
            (s, b["code"].as_str()),
            (422, Some("CANCEL_AMOUNT_EXCEEDS_BALANCE")),
            "{name}: {b}"
        );

        let (s, b) = status_and_body(
            app.cancel(
                &pid,
                &json!({"cancelReason": "the rest", "cancelAmount": 7_000}),
            )
            .await,
        )
        .await;
        assert_eq!(s, 200, "{name}: {b}");
        assert_eq!(
            (b["status"].as_str(), b["balanceAmount"].as_i64()),
            (Some("CANCELED"), Some(0))
        );

        let (s, b) =
            status_and_body(app.cancel(&pid, &json!({"cancelReason": "again"})).await).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (422, Some("CANCEL_AMOUNT_EXCEEDS_BALANCE")),
            "{name}: {b}"
        );

        // Two cancel calls reached the card company; its balance is zero;
        // the ledger holds both reversals; GET shows the same.
        assert_eq!(app.sandbox.card.stats().cancel_calls, 2, "{name}");
        let at_card = app.sandbox.card.payment("order-cancel-partial").unwrap();
        assert_eq!(
            (at_card.status.as_str(), at_card.balance_amount),
            ("CANCELED", Some(0))
        );
        app.saga.retries().wait_idle().await;
        let reversals = app.sandbox.ledger.reversals_of(&pid);
        let keys: Vec<_> = reversals
            .iter()
            .map(|(k, r)| (k.clone(), r.cancel_amount))
            .collect();
        assert_eq!(
            keys,
            vec![
                (format!("{pid}:cancel:1"), 3_000),
                (format!("{pid}:cancel:2"), 7_000)
            ],
            "{name}"
        );
        let got: Value = app
            .get(&app.key, &format!("/v1/payments/{pid}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            (got["status"].as_str(), got["balanceAmount"].as_i64()),
            (Some("CANCELED"), Some(0))
        );

        // A full cancel without an amount cancels the whole payment.
        let full = app.paid("order-cancel-full", 5_000).await;
        let (s, b) = status_and_body(
            app.cancel(&full, &json!({"cancelReason": "changed my mind"}))
                .await,
        )
        .await;
        assert_eq!(
            (s, b["status"].as_str(), b["balanceAmount"].as_i64()),
            (200, Some("CANCELED"), Some(0)),
            "{name}"
        );
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_cancel_with_the_same_key_replays_without_a_second_card_call() {
    for backend in backends() {
        let name = backend.name();
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let pid = app.paid("order-cancel-replay", 8_000).await;
        let body = json!({"cancelReason": "refund", "cancelAmount": 2_000});
        let (s1, b1) = status_and_body(
            app.cancel_with(&app.key, &pid, &body, Some("\"cancel-key-1\""))
                .await,
        )
        .await;
        let (s2, b2) = status_and_body(
            app.cancel_with(&app.key, &pid, &body, Some("cancel-key-1"))
                .await,
        )
        .await;
        assert_eq!((s1, s2), (200, 200), "{name}: {b1} {b2}");
        assert_eq!(b1, b2, "{name}");
        assert_eq!(b2["balanceAmount"], 6_000);
        assert_eq!(app.sandbox.card.stats().cancel_calls, 1, "{name}");
        // Same key, another body.
        let other = json!({"cancelReason": "refund", "cancelAmount": 1_000});
        let (s, b) = status_and_body(
            app.cancel_with(&app.key, &pid, &other, Some("cancel-key-1"))
                .await,
        )
        .await;
        assert_eq!(
            (s, b["code"].as_str()),
            (422, Some("IDEMPOTENCY_KEY_REUSED")),
            "{name}"
        );
        assert_eq!(app.sandbox.card.stats().cancel_calls, 1, "{name}");
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_refusals_make_no_card_call() {
    for backend in backends() {
        let name = backend.name();
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let pid = app.paid("order-cancel-refusals", 4_000).await;
        let reason = json!({"cancelReason": "r"});
        // Another merchant's payment, and no such payment: 404.
        let (_, other_key) = create_merchant(&app.app_db, &app.config, "merchant-b").await;
        let (s, b) = status_and_body(app.cancel_with(&other_key, &pid, &reason, None).await).await;
        assert_eq!(s, 404, "{name}: {b}");
        let (s, _) =
            status_and_body(app.cancel("pay_01ARZ3NDEKTSV4RRFFQ69G5FAV", &reason).await).await;
        assert_eq!(s, 404, "{name}");
        // Bad bodies: 400; no JSON content type: 415; no key: 401.
        for bad in [
            json!({"cancelReason": "r", "currency": "USD"}),
            json!({"cancelReason": "r", "cancelAmount": 0}),
            json!({"cancelReason": ""}),
            json!({"cancelAmount": 100}),
        ] {
            let (s, b) = status_and_body(app.cancel(&pid, &bad).await).await;
            assert_eq!(
                (s, b["code"].as_str()),
                (400, Some("INVALID_REQUEST")),
                "{name}: {bad}"
            );
        }
        let resp = app
            .client
            .post(format!("{}/v1/payments/{pid}/cancel", app.base))
            .bearer_auth(&app.key)
            .header("content-type", "text/plain")
            .body("{\"cancelReason\":\"r\"}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 415, "{name}");
        let resp = app
            .client
            .post(format!("{}/v1/payments/{pid}/cancel", app.base))
            .json(&reason)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{name}");
        assert_eq!(app.sandbox.card.stats().cancel_calls, 0, "{name}");
        app.teardown().await;

        // A declined payment is not approved: 409 NOT_APPROVED.
        let declining = FaultProfile {
            decline_rate: 1.0,
            ..FaultProfile::none()
        };
        let app = spawn_app(&backend, declining, |_| {}).await;
        let resp = app
            .confirm(&confirm_body("order-cancel-declined", 4_000))
            .await;
        assert_eq!(resp.status(), 402);
        let pid = resp.json::<Value>().await.unwrap()["paymentId"]
            .as_str()
            .unwrap()
            .to_owned();
        let (s, b) = status_and_body(app.cancel(&pid, &reason).await).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (409, Some("NOT_APPROVED")),
            "{name}: {b}"
        );
        assert_eq!(app.sandbox.card.stats().cancel_calls, 0, "{name}");
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_row_no_card_call_and_the_key_is_free_again() {
    for backend in backends() {
        let name = backend.name();
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let pid = app.paid("order-cancel-nolog", 6_000).await;
        make_log_read_only(&app.app_db).await;
        let body = json!({"cancelReason": "refund"});
        let (s, b) = status_and_body(
            app.cancel_with(&app.key, &pid, &body, Some("k-nolog"))
                .await,
        )
        .await;
        assert_eq!(
            (s, b["code"].as_str()),
            (503, Some("SERVICE_UNAVAILABLE")),
            "{name}: {b}"
        );
        assert_eq!(app.sandbox.card.stats().cancel_calls, 0, "{name}");
        let at_card = app.sandbox.card.payment("order-cancel-nolog").unwrap();
        assert_eq!(at_card.balance_amount, Some(6_000));
        make_log_writable(&app.app_db).await;
        // "Nothing was canceled, retry" is true: the same request now cancels.
        let (s, b) = status_and_body(
            app.cancel_with(&app.key, &pid, &body, Some("k-nolog"))
                .await,
        )
        .await;
        assert_eq!(
            (s, b["status"].as_str()),
            (200, Some("CANCELED")),
            "{name}: {b}"
        );
        assert_eq!(app.sandbox.card.stats().cancel_calls, 1, "{name}");
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_down_during_a_cancel_is_recorded_later_by_the_async_retries() {
    for backend in backends() {
        let name = backend.name();
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let pid = app.paid("order-cancel-ledger", 9_000).await;
        app.saga.retries().wait_idle().await;
        app.sandbox.ledger.set_down(true);
        let (s, b) = status_and_body(
            app.cancel(
                &pid,
                &json!({"cancelReason": "refund", "cancelAmount": 4_000}),
            )
            .await,
        )
        .await;
        // Ledger trouble never turns a done cancel into an error.
        assert_eq!(
            (s, b["status"].as_str()),
            (200, Some("PARTIAL_CANCELED")),
            "{name}: {b}"
        );
        assert!(app.sandbox.ledger.reversals_of(&pid).is_empty(), "{name}");
        app.sandbox.ledger.set_down(false);
        app.saga.retries().wait_idle().await;
        let reversals = app.sandbox.ledger.reversals_of(&pid);
        assert_eq!(reversals.len(), 1, "{name}");
        assert_eq!(reversals[0].1.cancel_amount, 4_000);
        let cancels = app
            .saga
            .store()
            .cancels_of(&paygate_core::PaymentId::from_stored(pid.clone()))
            .await
            .unwrap();
        assert!(
            cancels[0].is_saved && cancels[0].save_attempts >= 2,
            "{name}: {cancels:?}"
        );
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_cancels_never_refund_more_than_the_amount() {
    for backend in backends() {
        let name = backend.name();
        let app = Arc::new(spawn_app(&backend, FaultProfile::none(), |_| {}).await);
        let pid = app.paid("order-cancel-race", 5_000).await;
        // 24 merchants' retries racing, 1,000 each, on 5,000: never more than
        // five can be done, whatever interleaving.
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let (app, pid) = (app.clone(), pid.clone());
                tokio::spawn(async move {
                    let body = json!({"cancelReason": format!("race {i}"), "cancelAmount": 1_000});
                    app.cancel(&pid, &body).await.status().as_u16()
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        assert!(
            statuses.iter().all(|s| [200, 409, 422].contains(s)),
            "{name}: {statuses:?}"
        );
        let done = statuses.iter().filter(|s| **s == 200).count() as i64;
        let at_card = app.sandbox.card.payment("order-cancel-race").unwrap();
        let refunded: i64 = at_card
            .cancels
            .unwrap_or_default()
            .iter()
            .map(|c| c.cancel_amount)
            .sum();
        assert!(refunded <= 5_000, "{name}: {refunded}");
        assert_eq!(
            refunded,
            done * 1_000,
            "{name}: paygate's 200s are the card's cancels"
        );
        assert_eq!(at_card.balance_amount, Some(5_000 - refunded));
        let app = Arc::into_inner(app).expect("tasks ended");
        app.teardown().await;
    }
}
