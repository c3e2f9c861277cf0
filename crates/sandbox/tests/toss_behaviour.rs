//! The card simulator behaves like Toss Payments v1 where paygate's paths
//! depend on it: idempotency scope and in-progress repeats, duplicate
//! confirms, `PROVIDER_ERROR` as 400, cancel amounts, date-only list dates
//! and unpadded Basic auth. Each test drives the simulator over HTTP, and,
//! where paygate reads the answer, through paygate's own adapter.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::time::Duration;

use base64::Engine;
use paygate_card_api::{
    codes, CancelRequest, CardApi, CardApiError, CodeClass, ConfirmRequest, TossCardApi,
    TransactionsQuery,
};
use paygate_core::Secret;
use paygate_sandbox::{faults::roll, FaultProfile, SandboxServers, SeedApproval};
use serde_json::{json, Value};

/// `"test_sk_x:"` is 10 bytes, so its base64 form ends in `==`.
const SECRET: &str = "test_sk_x";

struct Sim {
    servers: SandboxServers,
    http: reqwest::Client,
}

impl Sim {
    async fn start(profile: FaultProfile) -> Self {
        Self {
            servers: SandboxServers::start(profile, SECRET).await.unwrap(),
            http: reqwest::Client::new(),
        }
    }

    fn adapter(&self) -> TossCardApi {
        TossCardApi::new(
            reqwest::Client::new(),
            &self.servers.card_url,
            Secret::new(SECRET.to_owned()),
            Duration::from_secs(10),
        )
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.servers.card_url)
    }

    async fn post(&self, path: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self
            .http
            .post(self.url(path))
            .basic_auth(SECRET, Some(""))
            .json(&body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn confirm(&self, order: &str, amount: i64, key: Option<&str>) -> (u16, Value) {
        let body = json!({"paymentKey": format!("pk_{order}"), "orderId": order, "amount": amount});
        self.post("/v1/payments/confirm", key, body).await
    }

    async fn cancel(&self, order: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        self.post(&format!("/v1/payments/pk_{order}/cancel"), key, body)
            .await
    }

    async fn list(&self, query: &[(&str, &str)], auth: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.url("/v1/transactions"))
            .header("Authorization", auth)
            .query(query)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }
}

fn req(order: &str, amount: i64) -> ConfirmRequest {
    ConfirmRequest {
        payment_key: format!("pk_{order}"),
        order_id: order.to_owned(),
        amount,
    }
}

// Point 5: a second confirm of a DONE payment under a new key.
#[tokio::test]
async fn a_second_confirm_of_an_approved_payment_under_a_new_key_is_already_processed() {
    let sim = Sim::start(FaultProfile::none()).await;
    let (status, first) = sim.confirm("order-dup-1", 5_000, Some("key-a")).await;
    assert_eq!((status, first["status"].as_str()), (200, Some("DONE")));

    let (status, second) = sim.confirm("order-dup-1", 5_000, Some("key-b")).await;
    assert_eq!(status, 400);
    assert_eq!(second["code"], codes::ALREADY_PROCESSED_PAYMENT);
    let stats = sim.servers.card.stats();
    assert_eq!(
        (
            stats.approvals,
            stats.double_charges,
            stats.duplicate_confirms
        ),
        (1, 0, 1)
    );
    // The first key still replays its approval.
    let (status, replay) = sim.confirm("order-dup-1", 5_000, Some("key-a")).await;
    assert_eq!((status, &replay), (200, &first));

    // paygate's adapter reads it as "already processed": settle by lookup.
    let e = sim
        .adapter()
        .confirm(&req("order-dup-1", 5_000), "key-c")
        .await
        .unwrap_err();
    assert_eq!(e.class(), CodeClass::AlreadyProcessed);
    assert!(e.outcome_unknown() && !e.is_decline());
}

// Point 5: the switch restores the permissive simulator.
#[tokio::test]
async fn the_permissive_switch_approves_a_duplicate_confirm_again() {
    let sim = Sim::start(FaultProfile::none().with_duplicate_confirms_approved(true)).await;
    assert_eq!(
        sim.confirm("order-dup-2", 5_000, Some("key-a")).await.0,
        200
    );
    let (status, second) = sim.confirm("order-dup-2", 5_000, Some("key-b")).await;
    assert_eq!((status, second["status"].as_str()), (200, Some("DONE")));
    let stats = sim.servers.card.stats();
    assert_eq!(
        (
            stats.approvals,
            stats.double_charges,
            stats.duplicate_confirms
        ),
        (2, 1, 1)
    );
}

// Issue 15 point 2: a paymentKey names one payment at the card company.
// With the switch on, a direct second use under another orderId is refused
// as Toss refuses it (400 ALREADY_PROCESSED_PAYMENT, no approval); off (the
// default), the sandbox approves it, so paygate's own claim is what a
// paygate test sees.
#[tokio::test]
async fn a_reused_payment_key_is_refused_when_the_switch_is_on_and_approved_when_off() {
    for (refuse, want_status, want_approvals) in [(true, 400, 1), (false, 200, 2)] {
        let sim = Sim::start(FaultProfile::none().with_reused_payment_keys_refused(refuse)).await;
        let body =
            |order: &str| json!({"paymentKey": "pk_shared", "orderId": order, "amount": 5_000});
        let (status, _) = sim
            .post("/v1/payments/confirm", Some("key-a"), body("order-pk-1"))
            .await;
        assert_eq!(status, 200);
        let (status, second) = sim
            .post("/v1/payments/confirm", Some("key-b"), body("order-pk-2"))
            .await;
        assert_eq!(status, want_status, "refuse={refuse}: {second}");
        if refuse {
            assert_eq!(second["code"], codes::ALREADY_PROCESSED_PAYMENT);
        }
        let stats = sim.servers.card.stats();
        assert_eq!(
            (stats.approvals, stats.reused_payment_keys),
            (want_approvals, 1),
            "refuse={refuse}"
        );
        // The same order again with its key is not a reuse.
        let (status, _) = sim
            .post("/v1/payments/confirm", Some("key-a"), body("order-pk-1"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(sim.servers.card.stats().reused_payment_keys, 1);
    }
}

// Point 6: a repeat of a request still in progress, same key.
#[tokio::test]
async fn a_repeat_while_the_first_request_runs_gets_409_then_the_first_answer() {
    let sim = Sim::start(FaultProfile {
        card_latency_min_ms: 600,
        card_latency_max_ms: 600,
        ..FaultProfile::none()
    })
    .await;
    let first = sim.confirm("order-slow-1", 7_000, Some("key-slow"));
    let repeat = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        sim.confirm("order-slow-1", 7_000, Some("key-slow")).await
    };
    let ((s1, b1), (s2, b2)) = tokio::join!(first, repeat);
    assert_eq!((s1, b1["status"].as_str()), (200, Some("DONE")));
    assert_eq!(s2, 409);
    assert_eq!(b2["code"], codes::IDEMPOTENT_REQUEST_PROCESSING);
    // Once it is done, the same key replays the first answer; one approval.
    let (s3, b3) = sim.confirm("order-slow-1", 7_000, Some("key-slow")).await;
    assert_eq!((s3, &b3), (200, &b1));
    assert_eq!(sim.servers.card.stats().approvals, 1);

    // paygate reads the 409 as "in progress": ask again.
    let adapter = sim.adapter();
    let slow = req("order-slow-2", 1_000);
    let (_, repeat) = tokio::join!(adapter.confirm(&slow, "key-slow-2"), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        adapter.confirm(&slow, "key-slow-2").await
    });
    let e = repeat.unwrap_err();
    assert_eq!(e.class(), CodeClass::InProgress);
    assert!(e.is_transient() && !e.is_decline());
}

// Point 7: PROVIDER_ERROR is a 400, and a 5xx fault remains.
#[tokio::test]
async fn provider_error_is_sent_as_400_and_read_as_transient() {
    let sim = Sim::start(FaultProfile {
        provider_error_rate: 1.0,
        ..FaultProfile::none()
    })
    .await;
    let (status, body) = sim.confirm("order-prov-1", 3_000, Some("key-p")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some(codes::PROVIDER_ERROR))
    );
    let e = sim
        .adapter()
        .confirm(&req("order-prov-1", 3_000), "key-p")
        .await
        .unwrap_err();
    assert!(matches!(e, CardApiError::Rejected { status: 400, .. }));
    assert!(e.is_transient() && e.outcome_unknown() && !e.is_decline());
    assert_eq!(sim.servers.card.stats().approvals, 0);

    let sim = Sim::start(FaultProfile {
        transient_error_rate: 1.0,
        ..FaultProfile::none()
    })
    .await;
    let (status, body) = sim.confirm("order-5xx-1", 3_000, Some("key-5")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (500, Some(codes::FAILED_INTERNAL_SYSTEM_PROCESSING))
    );

    // The flaky preset mixes both.
    let flaky = FaultProfile::flaky();
    assert!(flaky.provider_error_rate > 0.0 && flaky.transient_error_rate > 0.0);
}

// Point 7: a temporary error is not the key's answer: asking again with the
// same key may be approved.
#[tokio::test]
async fn a_provider_error_is_not_replayed_so_a_retry_with_the_same_key_can_succeed() {
    let profile = FaultProfile {
        provider_error_rate: 0.5,
        ..FaultProfile::none()
    };
    // An order whose first attempt fails and whose second does not.
    let order = (0..1000)
        .map(|i| format!("order-retry-{i}"))
        .find(|o| {
            roll(profile.seed, o, "provider", 1) < 0.5
                && roll(profile.seed, o, "provider", 2) >= 0.5
        })
        .unwrap();
    let sim = Sim::start(profile).await;
    let adapter = sim.adapter();
    let e = adapter
        .confirm(&req(&order, 2_000), "key-r")
        .await
        .unwrap_err();
    assert_eq!(e.code(), codes::PROVIDER_ERROR);
    let p = adapter.confirm(&req(&order, 2_000), "key-r").await.unwrap();
    assert!(p.is_approved());
}

// Point 8: an idempotency key's scope includes the method and the URL.
#[tokio::test]
async fn a_cancel_key_reused_on_another_payment_does_not_replay_the_first() {
    let sim = Sim::start(FaultProfile::none()).await;
    for order in ["order-scope-a", "order-scope-b"] {
        assert_eq!(sim.confirm(order, 4_000, Some(order)).await.0, 200);
    }
    let reason = json!({"cancelReason": "customer asked"});
    let (s1, a) = sim
        .cancel("order-scope-a", Some("cancel-key"), reason.clone())
        .await;
    let (s2, b) = sim
        .cancel("order-scope-b", Some("cancel-key"), reason.clone())
        .await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(a["paymentKey"], "pk_order-scope-a");
    assert_eq!(b["paymentKey"], "pk_order-scope-b");
    assert_eq!(b["status"], "CANCELED");
    // The same key on the same URL still replays.
    let (s3, again) = sim
        .cancel("order-scope-b", Some("cancel-key"), reason)
        .await;
    assert_eq!((s3, &again), (200, &b));
    // And a confirm key is not a cancel key.
    let (s4, fresh) = sim
        .confirm("order-scope-c", 1_000, Some("cancel-key"))
        .await;
    assert_eq!(
        (s4, fresh["orderId"].as_str()),
        (200, Some("order-scope-c"))
    );
    assert_eq!(sim.servers.card.stats().approvals, 3);
}

// Point 9: a cancel amount above the balance is refused, not clamped.
#[tokio::test]
async fn a_cancel_amount_above_the_balance_is_refused() {
    let sim = Sim::start(FaultProfile::none()).await;
    assert_eq!(sim.confirm("order-amt-1", 10_000, Some("k1")).await.0, 200);
    let (status, body) = sim
        .cancel(
            "order-amt-1",
            Some("c1"),
            json!({"cancelReason": "too much", "cancelAmount": 10_001}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some(codes::NOT_CANCELABLE_AMOUNT))
    );
    let p = sim.servers.card.payment("order-amt-1").unwrap();
    assert_eq!(
        (p.status.as_str(), p.balance_amount),
        ("DONE", Some(10_000))
    );

    // A partial cancel within the balance goes through; then more than
    // what is left is refused again.
    let adapter = sim.adapter();
    let partial = CancelRequest {
        cancel_reason: "one item".to_owned(),
        cancel_amount: Some(4_000),
    };
    let p = adapter
        .cancel("pk_order-amt-1", &partial, "c2")
        .await
        .unwrap();
    assert_eq!(
        (p.status.as_str(), p.balance_amount),
        ("PARTIAL_CANCELED", Some(6_000))
    );
    let too_much = CancelRequest {
        cancel_reason: "rest and more".to_owned(),
        cancel_amount: Some(6_001),
    };
    let e = adapter
        .cancel("pk_order-amt-1", &too_much, "c3")
        .await
        .unwrap_err();
    assert_eq!(e.code(), codes::NOT_CANCELABLE_AMOUNT);
    assert!(!e.is_decline() && !e.is_transient());
}

// Point 10: date-only list dates are 00:00:00 KST.
#[tokio::test]
async fn date_only_list_dates_are_read_as_midnight_kst() {
    let sim = Sim::start(FaultProfile::none()).await;
    let at = |s: &str| paygate_core::time::ms_from_rfc3339(s).unwrap();
    sim.servers.card.seed_approvals([
        SeedApproval {
            order_id: "order-day-1".into(),
            payment_key: "pk_day-1".into(),
            amount: 1_000,
            at_ms: at("2026-11-23T00:00:00+09:00"),
        },
        SeedApproval {
            order_id: "order-day-2".into(),
            payment_key: "pk_day-2".into(),
            amount: 2_000,
            at_ms: at("2026-11-23T23:59:59+09:00"),
        },
        SeedApproval {
            order_id: "order-day-3".into(),
            payment_key: "pk_day-3".into(),
            amount: 3_000,
            at_ms: at("2026-11-24T00:00:01+09:00"),
        },
    ]);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{SECRET}:"))
    );
    let orders = |page: &Value| -> Vec<String> {
        page.as_array()
            .unwrap()
            .iter()
            .map(|t| t["orderId"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, page) = sim
        .list(
            &[("startDate", "2026-11-23"), ("endDate", "2026-11-24")],
            &auth,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(orders(&page), ["order-day-1", "order-day-2"]);
    let (_, page) = sim
        .list(
            &[("startDate", "2026-11-24"), ("endDate", "2026-11-25")],
            &auth,
        )
        .await;
    assert_eq!(orders(&page), ["order-day-3"]);

    // Through paygate's adapter too.
    let txs = sim
        .adapter()
        .transactions(&TransactionsQuery {
            start_date: "2026-11-23".into(),
            end_date: "2026-11-24".into(),
            starting_after: None,
            limit: Some(10),
        })
        .await
        .unwrap();
    assert_eq!(txs.len(), 2);
    assert_eq!(txs[1].amount, 2_000);
}

// Point 10: Basic auth with or without base64 padding.
#[tokio::test]
async fn basic_auth_is_accepted_with_or_without_padding() {
    let sim = Sim::start(FaultProfile::none()).await;
    let query = [("startDate", "2026-11-23"), ("endDate", "2026-11-24")];
    let padded = base64::engine::general_purpose::STANDARD.encode(format!("{SECRET}:"));
    assert!(padded.ends_with("=="), "{padded}");
    let unpadded = padded.trim_end_matches('=');
    for (auth, want) in [
        (format!("Basic {padded}"), 200),
        (format!("Basic {unpadded}"), 200),
        (format!("basic {unpadded}"), 200),
        (
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode("test_sk_y:")
            ),
            401,
        ),
        (
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(SECRET)
            ),
            401,
        ),
        (format!("Bearer {padded}"), 401),
    ] {
        let (status, body) = sim.list(&query, &auth).await;
        assert_eq!(status, want, "{auth}: {body}");
    }
}
