//! Issue 15, points 2-4, black-box over HTTP against the real app: one
//! paymentKey pays one order, an orderId belongs to one merchant on the
//! shared card account, and one merchant's requests in flight are capped
//! so the others are still served. Call counts are read at the simulator.

use std::time::{Duration, Instant};

use paygate_sandbox::FaultProfile;
use serde_json::{json, Value};

use crate::helpers::{backends, confirm_body, create_merchant, spawn_app, Backend};

async fn json_of(resp: reqwest::Response) -> Value {
    resp.json().await.expect("json body")
}

fn body_with_key(order_id: &str, payment_key: &str, amount: i64) -> Value {
    json!({"paymentKey": payment_key, "orderId": order_id, "amount": amount})
}

/// Checks a 422 claim refusal: problem+json, the code, and nothing that
/// names a payment (the holder may be another merchant's).
async fn assert_refused(resp: reqwest::Response, code: &str, forbidden: &[&str], ctx: &str) {
    assert_eq!(resp.status(), 422, "{ctx}");
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "{ctx}"
    );
    let text = resp.text().await.expect("body");
    let body: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(body["code"], code, "{ctx}: {body}");
    assert!(body.get("paymentId").is_none(), "{ctx}: {body}");
    for f in forbidden {
        assert!(!text.contains(f), "{ctx}: the answer leaks {f}: {text}");
    }
}

/// Point 2: paymentKey P confirmed under order A, then under order B (same
/// merchant) and under order C (another merchant): both 422
/// `PAYMENT_KEY_REUSED`, one card call in all; order A still replays; B and
/// C were not written and can be paid with their own keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_key_confirmed_under_another_order_is_refused_without_a_card_call() {
    for backend in backends() {
        let name = backend.name();
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let (_, key_b) = create_merchant(&app.app_db, &app.config, "merchant-b").await;
        let first = app
            .confirm(&body_with_key("order-pk-a", "pk_shared", 1_000))
            .await;
        assert_eq!(first.status(), 200, "{name}");
        let first = json_of(first).await;
        let pid = first["paymentId"].as_str().unwrap().to_owned();

        let same_merchant = app
            .confirm(&body_with_key("order-pk-b", "pk_shared", 1_000))
            .await;
        assert_refused(same_merchant, "PAYMENT_KEY_REUSED", &[&pid], &name).await;
        let other_merchant = app
            .confirm_with(
                &key_b,
                &body_with_key("order-pk-c", "pk_shared", 1_000),
                Some("idem-c"),
            )
            .await;
        assert_refused(other_merchant, "PAYMENT_KEY_REUSED", &[&pid], &name).await;
        assert_eq!(
            app.sandbox.card.stats().confirm_calls,
            1,
            "{name}: no card call for a reused paymentKey"
        );

        // The same confirm replayed still replays (no new card call).
        let replay = app
            .confirm(&body_with_key("order-pk-a", "pk_shared", 1_000))
            .await;
        assert_eq!(replay.status(), 200, "{name}");
        assert_eq!(json_of(replay).await["paymentId"], first["paymentId"]);
        assert_eq!(app.sandbox.card.stats().confirm_calls, 1, "{name}");

        // Nothing was written for B or C: their orders (and C's key) are free.
        assert_eq!(
            app.get(&app.key, "/v1/payments/orders/order-pk-b")
                .await
                .status(),
            404
        );
        let b = app
            .confirm(&body_with_key("order-pk-b", "pk_own_b", 1_000))
            .await;
        assert_eq!(b.status(), 200, "{name}");
        let c = app
            .confirm_with(
                &key_b,
                &body_with_key("order-pk-c", "pk_own_c", 1_000),
                Some("idem-c"),
            )
            .await;
        assert_eq!(c.status(), 200, "{name}");
        let stats = app.sandbox.card.stats();
        assert_eq!(
            (stats.approvals, stats.reused_payment_keys),
            (3, 0),
            "{name}"
        );
        app.teardown().await;
    }
}

/// Point 3: merchant B confirming an orderId merchant A holds gets 422
/// `ORDER_ID_IN_USE` before any card call, not naming A's payment or A;
/// A's own reuse keeps its answers (replay, 422 `ORDER_ID_REUSED`); the
/// card company never sees the orderId twice (no double charge for
/// `paygate check` to find).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_id_held_by_another_merchant_is_refused_before_any_card_call() {
    for backend in backends() {
        let name = backend.name();
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        let (merchant_b, key_b) = create_merchant(&app.app_db, &app.config, "merchant-b").await;
        let a = app.confirm(&confirm_body("order-shared-1", 1_000)).await;
        assert_eq!(a.status(), 200, "{name}");
        let a = json_of(a).await;
        let pid = a["paymentId"].as_str().unwrap().to_owned();

        for (body, idem) in [
            (body_with_key("order-shared-1", "pk_of_b", 1_000), None),
            (confirm_body("order-shared-1", 1_000), Some("idem-b")),
        ] {
            let resp = app.confirm_with(&key_b, &body, idem).await;
            assert_refused(resp, "ORDER_ID_IN_USE", &[&pid, "merchant-a"], &name).await;
        }
        assert_eq!(app.sandbox.card.stats().confirm_calls, 1, "{name}");
        assert_eq!(
            app.get(&key_b, "/v1/payments/orders/order-shared-1")
                .await
                .status(),
            404,
            "{name}: nothing written for B"
        );

        // A's own reuse: replay, and 422 ORDER_ID_REUSED with another body.
        let replay = app.confirm(&confirm_body("order-shared-1", 1_000)).await;
        assert_eq!(replay.status(), 200);
        assert_eq!(json_of(replay).await["paymentId"], a["paymentId"]);
        let other = app.confirm(&confirm_body("order-shared-1", 2_000)).await;
        assert_eq!(other.status(), 422);
        assert_eq!(json_of(other).await["code"], "ORDER_ID_REUSED");

        // B's next order is served as usual.
        let b = app
            .confirm_with(&key_b, &confirm_body("order-shared-2", 1_000), None)
            .await;
        assert_eq!(b.status(), 200, "{name} ({merchant_b})");
        let stats = app.sandbox.card.stats();
        assert_eq!(
            (stats.confirm_calls, stats.approvals, stats.double_charges),
            (2, 2, 0),
            "{name}"
        );
        app.teardown().await;
    }
}

/// Point 4: merchant A holding its cap of slow confirms gets 429
/// `RATE_LIMITED` (problem+json, `Retry-After`) for the next one, with no
/// card call, while merchant B's confirm is served; the shed is counted in
/// `/metrics`; once A's confirms end, A is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_merchant_at_its_cap_is_shed_while_another_is_served() {
    let profile = FaultProfile {
        card_latency_min_ms: 1_500,
        card_latency_max_ms: 1_500,
        ..FaultProfile::none()
    };
    let app = spawn_app(&Backend::Sqlite, profile, |c| {
        c.inbound_max_concurrent = 8;
        c.inbound_max_concurrent_per_merchant = Some(2);
        c.inbound_rate_limit_per_second = 0;
    })
    .await;
    let (_, key_b) = create_merchant(&app.app_db, &app.config, "merchant-b").await;
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let (client, base, key) = (app.client.clone(), app.base.clone(), app.key.clone());
            tokio::spawn(async move {
                client
                    .post(format!("{base}/v1/payments/confirm"))
                    .bearer_auth(key)
                    .json(&confirm_body(&format!("order-cap-a{i}"), 1_000))
                    .send()
                    .await
                    .expect("answered")
                    .status()
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(5);
    while app.sandbox.card.stats().confirm_calls < 2 {
        assert!(
            Instant::now() < until,
            "A's confirms never reached the card"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A is at its cap: its third request is shed, before any card call.
    let shed = app.confirm(&confirm_body("order-cap-a2", 1_000)).await;
    assert_eq!(shed.status(), 429);
    assert_eq!(shed.headers()["content-type"], "application/problem+json");
    assert!(shed.headers().contains_key("retry-after"));
    assert_eq!(json_of(shed).await["code"], "RATE_LIMITED");
    let get = app.get(&app.key, "/v1/payments/orders/order-cap-a0").await;
    assert_eq!(get.status(), 429, "every merchant route counts");
    // B is served while A holds its slots (its card call takes 1.5 s too).
    let b = app
        .confirm_with(&key_b, &confirm_body("order-cap-b0", 1_000), None)
        .await;
    assert_eq!(b.status(), 200, "B is not starved by A");
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    assert_eq!(
        app.sandbox.card.stats().confirm_calls,
        3,
        "no call for the shed one"
    );
    let again = app.confirm(&confirm_body("order-cap-a2", 1_000)).await;
    assert_eq!(again.status(), 200, "A's slots are given back");
    let metrics = reqwest::get(format!("{}/metrics", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let shed_count: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("paygate_inbound_merchant_shed_total "))
        .expect("the shed counter is exported")
        .trim()
        .parse()
        .unwrap();
    assert!(shed_count >= 2.0, "both sheds counted: {shed_count}");
    app.teardown().await;
}
