//! Issue 17 through the real app: stock holds follow the confirm (I7).
//! Acceptance 2 (an expired hold frees its stock at once, no batch) and 3
//! (decline and no-call abort release; approval sells; replays never sell
//! twice), with card calls counted at the simulator. Expiry is staged by
//! taking a hold at an instant in the past through the app's own inventory
//! store, so no test waits for a clock.

use paygate_core::{MerchantId, OrderId};
use paygate_sandbox::FaultProfile;
use paygate_state_store::{Hold, HoldItem, TakeOutcome};
use serde_json::{json, Value};

use crate::helpers::{
    backends, confirm_body, create_merchant, make_log_read_only, make_log_writable, spawn_app,
    TestApp,
};

async fn body(resp: reqwest::Response) -> Value {
    resp.json().await.expect("json body")
}

async fn put_stock(app: &TestApp, key: &str, sku: &str, stock: i64) -> reqwest::Response {
    app.client
        .put(format!("{}/v1/inventory/{sku}", app.base))
        .bearer_auth(key)
        .json(&json!({"stock": stock}))
        .send()
        .await
        .expect("sent")
}

async fn post_hold(app: &TestApp, key: &str, hold: &Value) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/holds", app.base))
        .bearer_auth(key)
        .json(hold)
        .send()
        .await
        .expect("sent")
}

async fn level(app: &TestApp, key: &str, sku: &str) -> (i64, i64, i64, i64) {
    let v = body(app.get(key, &format!("/v1/inventory/{sku}")).await).await;
    let n = |k: &str| v[k].as_i64().unwrap_or(-999);
    (n("stock"), n("held"), n("sold"), n("available"))
}

fn hold_body(order: &str, sku: &str, quantity: i64) -> Value {
    json!({"orderId": order, "items": [{"sku": sku, "quantity": quantity}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_sells_the_hold_once_and_replays_change_nothing() {
    for backend in backends() {
        let name = backend.name();
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let key = app.key.clone();
        assert_eq!(
            put_stock(&app, &key, "sku-tee", 2).await.status(),
            200,
            "{name}"
        );
        let created = post_hold(&app, &key, &hold_body("order-h-0001", "sku-tee", 1)).await;
        assert_eq!(created.status(), 201, "{name}");
        let hold = body(created).await;
        assert_eq!(hold["state"], "pre");
        // Replay: 200, the same hold; another body for the order: 422.
        let replay = post_hold(&app, &key, &hold_body("order-h-0001", "sku-tee", 1)).await;
        assert_eq!(replay.status(), 200, "{name}");
        assert_eq!(body(replay).await["holdId"], hold["holdId"]);
        let reused = post_hold(&app, &key, &hold_body("order-h-0001", "sku-tee", 2)).await;
        assert_eq!(reused.status(), 422, "{name}");
        assert_eq!(level(&app, &key, "sku-tee").await, (2, 1, 0, 1), "{name}");
        // Two units asked, one free: 409 naming the SKU, nothing held.
        let short = post_hold(&app, &key, &hold_body("order-h-0002", "sku-tee", 2)).await;
        assert_eq!(short.status(), 409, "{name}");
        let problem = body(short).await;
        assert_eq!(problem["code"], "OUT_OF_STOCK");
        assert!(problem["detail"].as_str().unwrap().contains("sku-tee"));

        let paid = app.confirm(&confirm_body("order-h-0001", 1_000)).await;
        assert_eq!(paid.status(), 200, "{name}");
        let id = hold["holdId"].as_str().unwrap();
        assert_eq!(
            body(app.get(&key, &format!("/v1/holds/{id}")).await).await["state"],
            "sold"
        );
        assert_eq!(level(&app, &key, "sku-tee").await, (2, 0, 1, 1), "{name}");
        // A replayed confirm sells nothing twice.
        assert_eq!(
            app.confirm(&confirm_body("order-h-0001", 1_000))
                .await
                .status(),
            200
        );
        assert_eq!(
            level(&app, &key, "sku-tee").await,
            (2, 0, 1, 1),
            "{name}: sold once"
        );
        // A sold hold cannot be deleted; another merchant cannot see it.
        let del = app
            .client
            .delete(format!("{}/v1/holds/{id}", app.base))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(body(del).await["state"], "sold");
        let (_, other) = create_merchant(&app.app_db, &app.config, "merchant-b").await;
        assert_eq!(
            app.get(&other, &format!("/v1/holds/{id}")).await.status(),
            404
        );
        // A confirm without a hold works as before.
        assert_eq!(
            app.confirm(&confirm_body("order-h-nohold", 500))
                .await
                .status(),
            200
        );
        assert_eq!(app.sandbox.card.stats().approvals, 2, "{name}");
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_and_no_call_abort_release_the_hold() {
    for backend in backends() {
        let name = backend.name();
        let profile = FaultProfile {
            decline_rate: 1.0,
            ..FaultProfile::none()
        };
        let app = spawn_app(&backend, profile, |_| {}).await;
        let key = app.key.clone();
        put_stock(&app, &key, "sku-mug", 1).await;
        assert_eq!(
            post_hold(&app, &key, &hold_body("order-d-0001", "sku-mug", 1))
                .await
                .status(),
            201
        );
        assert_eq!(level(&app, &key, "sku-mug").await.3, 0);
        assert_eq!(
            app.confirm(&confirm_body("order-d-0001", 700))
                .await
                .status(),
            402,
            "{name}"
        );
        assert_eq!(
            level(&app, &key, "sku-mug").await,
            (1, 0, 0, 1),
            "{name}: released"
        );
        app.teardown().await;

        // No-call abort: the log refuses the REQUEST row (503, no card call).
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let key = app.key.clone();
        put_stock(&app, &key, "sku-mug", 1).await;
        let hold =
            body(post_hold(&app, &key, &hold_body("order-n-0001", "sku-mug", 1)).await).await;
        make_log_read_only(&app.app_db).await;
        assert_eq!(
            app.confirm(&confirm_body("order-n-0001", 700))
                .await
                .status(),
            503,
            "{name}"
        );
        assert_eq!(app.sandbox.card.stats().confirm_calls, 0);
        let id = hold["holdId"].as_str().unwrap();
        assert_eq!(
            body(app.get(&key, &format!("/v1/holds/{id}")).await).await["state"],
            "released",
            "{name}"
        );
        assert_eq!(level(&app, &key, "sku-mug").await.3, 1, "{name}");
        // The retry reopens the payment and takes the stock again.
        make_log_writable(&app.app_db).await;
        assert_eq!(
            app.confirm(&confirm_body("order-n-0001", 700))
                .await
                .status(),
            200,
            "{name}"
        );
        assert_eq!(level(&app, &key, "sku-mug").await, (1, 0, 1, 0), "{name}");
        app.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_hold_frees_stock_at_once_and_its_confirm_is_409_without_a_card_call() {
    for backend in backends() {
        let name = backend.name();
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let (merchant, key): (MerchantId, String) =
            create_merchant(&app.app_db, &app.config, "merchant-x").await;
        put_stock(&app, &key, "sku-cap", 1).await;
        // A hold taken an hour ago for ten minutes: expired now.
        let then = paygate_core::time::now_ms() - 3_600_000;
        let old = Hold::new_pre(
            merchant.clone(),
            OrderId::parse("order-e-0001").unwrap(),
            vec![HoldItem {
                sku: "sku-cap".into(),
                quantity: 1,
            }],
            then + 600_000,
            "fp".into(),
            then,
        );
        let inventory = app.saga.inventory().unwrap();
        assert!(matches!(
            inventory.take(&old, then).await.unwrap(),
            TakeOutcome::Taken(_)
        ));
        // Its unit is free with no batch run: another buyer takes it.
        assert_eq!(level(&app, &key, "sku-cap").await, (1, 0, 0, 1), "{name}");
        let hold = body(app.get(&key, &format!("/v1/holds/{}", old.hold_id)).await).await;
        assert_eq!(hold["state"], "expired", "{name}");
        assert_eq!(
            post_hold(&app, &key, &hold_body("order-e-0002", "sku-cap", 1))
                .await
                .status(),
            201
        );
        // The first buyer's confirm: 409 HOLD_EXPIRED, no card call.
        let late = app
            .confirm_with(&key, &confirm_body("order-e-0001", 900), None)
            .await;
        assert_eq!(late.status(), 409, "{name}");
        let problem = body(late).await;
        assert_eq!(problem["code"], "HOLD_EXPIRED");
        assert_eq!(app.sandbox.card.stats().confirm_calls, 0, "{name}");
        let pid = problem["paymentId"].as_str().unwrap();
        assert_eq!(
            body(app.get(&key, &format!("/v1/payments/{pid}")).await).await["status"],
            "ABORTED"
        );
        // The second buyer leaves; the first one's retry takes the unit again.
        let second = inventory
            .hold_by_order(&merchant, &OrderId::parse("order-e-0002").unwrap())
            .await
            .unwrap()
            .unwrap();
        let del = app
            .client
            .delete(format!("{}/v1/holds/{}", app.base, second.hold_id))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(body(del).await["state"], "released");
        let retry = app
            .confirm_with(&key, &confirm_body("order-e-0001", 900), None)
            .await;
        assert_eq!(retry.status(), 200, "{name}");
        assert_eq!(level(&app, &key, "sku-cap").await, (1, 0, 1, 0), "{name}");
        assert_eq!(app.sandbox.card.stats().approvals, 1);
        app.teardown().await;
    }
}
