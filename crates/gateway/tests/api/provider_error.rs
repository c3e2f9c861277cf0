//! Issue 14: Toss sends `PROVIDER_ERROR` (a temporary error of the card
//! company) as HTTP 400. It is retried with the same Idempotency-Key and
//! then looked up; it is never read as a decline (402).

use paygate_sandbox::{faults::roll, FaultProfile};
use paygate_state_store::testing::Backend;

use crate::helpers::{confirm_body, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_error_400_is_retried_with_the_same_key_then_looked_up_never_402() {
    // Every confirm attempt meets 400 PROVIDER_ERROR: retried to the stack's
    // limit, then looked up (the card has nothing): 202 UNKNOWN, not 402.
    let always = FaultProfile {
        provider_error_rate: 1.0,
        ..FaultProfile::none()
    };
    let app = spawn_app(&Backend::Sqlite, always, |_| {}).await;
    let resp = app.confirm(&confirm_body("order-provider-1", 5_000)).await;
    assert_eq!(resp.status(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "UNKNOWN");
    let s = app.sandbox.card.stats();
    assert_eq!(
        s.confirm_calls, 3,
        "retried up to max_attempts with the same key"
    );
    assert!(s.lookup_calls >= 1 && s.approvals == 0, "{s:?}");
    app.teardown().await;

    // Only the first attempt meets it: the retry (same key) is approved.
    let half = FaultProfile {
        provider_error_rate: 0.5,
        ..FaultProfile::none()
    };
    let order = (0..1000)
        .map(|i| format!("order-provider-retry-{i}"))
        .find(|o| {
            roll(half.seed, o, "provider", 1) < 0.5 && roll(half.seed, o, "provider", 2) >= 0.5
        })
        .unwrap();
    let app = spawn_app(&Backend::Sqlite, half, |_| {}).await;
    let resp = app.confirm(&confirm_body(&order, 5_000)).await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let s = app.sandbox.card.stats();
    assert_eq!((s.confirm_calls, s.approvals), (2, 1));
    assert_eq!(
        app.sandbox.card.approvals()[0].idempotency_key.as_deref(),
        body["paymentId"].as_str(),
        "the retry carried the payment's own key"
    );
    app.teardown().await;
}
