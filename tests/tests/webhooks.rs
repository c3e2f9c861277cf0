//! The card company's webhooks, black box: the real gateway on port 0 with
//! the sandbox card company sending Toss `PAYMENT_STATUS_CHANGED` webhooks
//! to it, on every SQL backend and with the state records in each
//! configured MongoDB. No batch, janitor or reconciliation runs here: what
//! settles, the webhook's worker settled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::time::{Duration, Instant};

use paygate_api_log::{Receipt, SqlApiLog, SqlCardInbox};
use paygate_core::{config::DownstreamPolicy, Config, PaymentId, Secret};
use paygate_gateway::Application;
use paygate_sandbox::{FaultProfile, SandboxServers, WebhookSender};
use paygate_state_store::{
    testing::{e2e_backends, fresh_e2e, Cleanup, E2eBackend},
    CancelStatus, SqlDatabase, StateStore,
};
use serde_json::{json, Value};

const SECRET: &str = "test_sk_webhooks";

struct Gateway {
    base: String,
    key: String,
    sandbox: SandboxServers,
    db: SqlDatabase,
    store: std::sync::Arc<dyn StateStore>,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
    cleanup: Cleanup,
}

async fn start<B: Clone + Into<E2eBackend>>(backend: &B, profile: FaultProfile) -> Gateway {
    let sandbox = SandboxServers::start(profile, SECRET).await.unwrap();
    let (stores, cleanup) = fresh_e2e(&backend.clone().into()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    // Toss's redelivery schedule, a minute made 1 ms.
    sandbox
        .card
        .send_webhooks_to(&format!("{base}/v1/webhooks/card"), 60_000);
    let config = Config {
        listen: "127.0.0.1:0".into(),
        card_api_url: Some(sandbox.card_url.clone()),
        card_api_secret_key: Some(Secret::new(SECRET.into())),
        ledger_api_url: Some(sandbox.ledger_url.clone()),
        card_api_policy: DownstreamPolicy {
            attempt_timeout_ms: 2_000,
            deadline_ms: 4_000,
            ..DownstreamPolicy::card_api()
        },
        inbound_rate_limit_per_second: 0,
        card_webhook_poll_ms: 200,
        ..stores.config()
    };
    let app = Application::build(listener, &config).await.unwrap();
    let (db, store) = (app.database(), app.saga().store().clone());
    let key = paygate_e2e::merchant_key(&db, &config.api_key_hash_key, "webhooks").await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    Gateway {
        base,
        key,
        sandbox,
        db,
        store,
        http: reqwest::Client::new(),
        _stop: stop,
        cleanup,
    }
}

impl Gateway {
    /// A merchant's confirm of `order` for 1,000: (status, body).
    async fn confirm(&self, order: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/payments/confirm", self.base))
            .bearer_auth(&self.key)
            .json(&json!({"paymentKey": format!("pk_{order}"), "orderId": order, "amount": 1000}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn payment(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/v1/payments/{id}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Posts `body` to the card webhook route as the card company would.
    async fn deliver(&self, body: &Value) -> u16 {
        self.http
            .post(format!("{}/v1/webhooks/card", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn receipts(&self, order: &str) -> Vec<Receipt> {
        SqlCardInbox::new(self.db.clone())
            .for_order(order)
            .await
            .unwrap()
    }

    /// Waits (at most 15 s) until every receipt of `order` is finished and
    /// there are at least `n`; returns them.
    async fn worked(&self, order: &str, n: usize) -> Vec<Receipt> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rs = self.receipts(order).await;
            if rs.len() >= n && rs.iter().all(|r| r.done_at.is_some()) {
                return rs;
            }
            assert!(Instant::now() < deadline, "receipts of {order}: {rs:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The card lookups logged for payment `id`.
    async fn lookups(&self, id: &str) -> usize {
        SqlApiLog::new(self.db.clone())
            .for_payment(&PaymentId::from_stored(id))
            .await
            .unwrap()
            .iter()
            .filter(|r| r.kind == "REQUEST" && r.path.starts_with("/v1/payments/orders/"))
            .count()
    }
}

/// A `PAYMENT_STATUS_CHANGED` body for `order` claiming `status`.
fn webhook(order: &str, status: &str, created_at_ms: i64) -> Value {
    WebhookSender::event(
        json!({"paymentKey": format!("pk_{order}"), "orderId": order, "status": status,
               "totalAmount": 1000, "method": "카드"}),
        created_at_ms,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_answered_202_is_done_within_seconds_of_the_card_company_s_webhook() {
    for backend in e2e_backends() {
        let g = start(&backend, FaultProfile::none()).await;
        let name = backend.name();
        // The card company answers IN_PROGRESS and approves 1.5 s later.
        g.sandbox
            .card
            .approve_later(1, Duration::from_millis(1_500));
        let (status, body) = g.confirm("order-late-1").await;
        assert_eq!(status, 202, "{name}: {body}");
        let id = body["paymentId"].as_str().unwrap().to_owned();
        assert_eq!(g.payment(&id).await["status"], "UNKNOWN", "{name}");
        let answered = Instant::now();
        let settled = loop {
            let p = g.payment(&id).await;
            if p["status"] == "DONE" && p["saved"] == true {
                break answered.elapsed();
            }
            assert!(
                answered.elapsed() < Duration::from_secs(10),
                "{name}: not settled by the webhook: {p}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let rs = g.worked("order-late-1", 1).await;
        assert!(
            rs.iter()
                .any(|r| r.outcome.as_deref() == Some("settled_paid")),
            "{name}: {rs:?}"
        );
        assert!(
            g.sandbox.card.webhook_stats().delivered >= 1,
            "{name}: the sandbox delivered its webhook"
        );
        // The ledger has it once, from the one settlement.
        let ledger = g.sandbox.ledger.stats();
        assert_eq!(ledger.records, 1, "{name}: {ledger:?}");
        assert!(g.sandbox.ledger.record(&id).is_some(), "{name}");
        println!("{name}: 202 settled {settled:?} after the answer (the card company approved 1.5 s after its IN_PROGRESS answer)");
        g.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_made_in_the_card_company_s_console_is_recorded_with_its_reversal() {
    for backend in e2e_backends() {
        let g = start(&backend, FaultProfile::none()).await;
        let name = backend.name();
        let (status, body) = g.confirm("order-console-1").await;
        assert_eq!(status, 200, "{name}: {body}");
        let id = body["paymentId"].as_str().unwrap().to_owned();
        let pid = PaymentId::from_stored(&id);
        g.sandbox
            .card
            .console_cancel(
                "pk_order-console-1",
                "customer phoned the card company",
                Some(400),
            )
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let cancel = loop {
            let cs = g.store.cancels_of(&pid).await.unwrap();
            if let [c] = cs.as_slice() {
                if c.status == CancelStatus::Done && c.is_saved {
                    break c.clone();
                }
            }
            assert!(Instant::now() < deadline, "{name}: {cs:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!((cancel.n, cancel.amount), (1, 400), "{name}");
        let reversals = g.sandbox.ledger.reversals_of(&id);
        assert_eq!(reversals.len(), 1, "{name}: {reversals:?}");
        assert_eq!(
            g.sandbox.card.stats().cancel_calls,
            0,
            "{name}: paygate sent no cancel"
        );
        // The merchant's own cancel of the rest follows it in order.
        let r = g
            .http
            .post(format!("{}/v1/payments/{id}/cancel", g.base))
            .bearer_auth(&g.key)
            .json(&json!({"cancelReason": "the rest"}))
            .send()
            .await
            .unwrap();
        let (st, body): (u16, Value) = (r.status().as_u16(), r.json().await.unwrap());
        assert_eq!(st, 200, "{name}: {body}");
        let card = g.sandbox.card.payment("order-console-1").unwrap();
        assert_eq!(
            (card.status.as_str(), card.balance_amount),
            ("CANCELED", Some(0)),
            "{name}"
        );
        // Its webhook, and every redelivery, changes nothing more.
        g.worked("order-console-1", 3).await;
        let cs = g.store.cancels_of(&pid).await.unwrap();
        let amounts: Vec<_> = cs.iter().map(|c| (c.n, c.amount, c.status)).collect();
        assert_eq!(
            amounts,
            vec![(1, 400, CancelStatus::Done), (2, 600, CancelStatus::Done)],
            "{name}"
        );
        g.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_cancel_after_a_console_cancel_paygate_has_not_heard_of_is_matched_by_amount() {
    for backend in e2e_backends() {
        let g = start(&backend, FaultProfile::none()).await;
        let name = backend.name();
        let (status, body) = g.confirm("order-unheard-1").await;
        assert_eq!(status, 200, "{name}: {body}");
        let id = body["paymentId"].as_str().unwrap().to_owned();
        let pid = PaymentId::from_stored(&id);
        g.worked("order-unheard-1", 1).await;
        // The console cancel's webhook goes nowhere (a port that refuses).
        g.sandbox
            .card
            .send_webhooks_to("http://127.0.0.1:9/", 60_000);
        g.sandbox
            .card
            .console_cancel("pk_order-unheard-1", "phoned", Some(300))
            .unwrap();
        // The merchant's cancel of 200 finds itself second in the card's
        // list, after a cancel paygate has not recorded: matched by amount.
        let r = g
            .http
            .post(format!("{}/v1/payments/{id}/cancel", g.base))
            .bearer_auth(&g.key)
            .json(&json!({"cancelReason": "returned", "cancelAmount": 200}))
            .send()
            .await
            .unwrap();
        let (st, body): (u16, Value) = (r.status().as_u16(), r.json().await.unwrap());
        assert_eq!(st, 200, "{name}: {body}");
        // The console cancel's webhook, delivered late, records the 300.
        let late = webhook(
            "order-unheard-1",
            "PARTIAL_CANCELED",
            paygate_core::time::now_ms(),
        );
        assert_eq!(g.deliver(&late).await, 200, "{name}");
        g.worked("order-unheard-1", 2).await;
        let cs = g.store.cancels_of(&pid).await.unwrap();
        let got: Vec<_> = cs.iter().map(|c| (c.n, c.amount, c.status)).collect();
        assert_eq!(
            got,
            vec![(1, 200, CancelStatus::Done), (2, 300, CancelStatus::Done)],
            "{name}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.sandbox.ledger.reversals_of(&id).len() < 2 {
            assert!(Instant::now() < deadline, "{name}: reversals");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            g.sandbox.card.stats().cancel_calls,
            1,
            "{name}: one cancel sent, the merchant's"
        );
        g.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_webhook_for_an_unpaid_order_changes_nothing_but_one_logged_lookup() {
    for backend in e2e_backends() {
        let profile = FaultProfile {
            decline_rate: 1.0,
            ..FaultProfile::none()
        };
        let g = start(&backend, profile).await;
        let name = backend.name();
        let (status, body) = g.confirm("order-forged-1").await;
        assert_eq!(status, 402, "{name}: {body}");
        // The decline's own webhook is worked first.
        g.worked("order-forged-1", 1).await;
        let (_, before) = g
            .store
            .find_by_order_ids(&["order-forged-1".to_owned()])
            .await
            .unwrap()
            .remove(0);
        let id = before.payment_id.to_string();
        let lookups = g.lookups(&id).await;
        let calls = g.sandbox.card.stats().lookup_calls;
        // Forged: "DONE", for an order the card company declined.
        let forged = webhook("order-forged-1", "DONE", paygate_core::time::now_ms());
        assert_eq!(g.deliver(&forged).await, 200, "{name}");
        let rs = g.worked("order-forged-1", 2).await;
        assert_eq!(
            rs[1].outcome.as_deref(),
            Some("nothing_new"),
            "{name}: {rs:?}"
        );
        let (_, after) = g
            .store
            .find_by_order_ids(&["order-forged-1".to_owned()])
            .await
            .unwrap()
            .remove(0);
        assert_eq!(after, before, "{name}: the record did not change");
        assert_eq!(
            g.lookups(&id).await,
            lookups + 1,
            "{name}: one lookup, logged"
        );
        assert_eq!(g.sandbox.card.stats().lookup_calls, calls + 1, "{name}");
        // Forged for an order nobody has: one lookup (404), no cancel.
        let nobody = webhook("order-nobody-1", "DONE", paygate_core::time::now_ms());
        assert_eq!(g.deliver(&nobody).await, 200, "{name}");
        let rs = g.worked("order-nobody-1", 1).await;
        assert_eq!(rs[0].outcome.as_deref(), Some("nothing_new"), "{name}");
        assert_eq!(g.sandbox.card.stats().cancel_calls, 0, "{name}");
        // Not a payment webhook at all: 400, nothing stored.
        assert_eq!(
            g.deliver(&json!({"eventType": "PAYMENT_STATUS_CHANGED"}))
                .await,
            400,
            "{name}"
        );
        g.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_or_reordered_webhook_changes_nothing() {
    for backend in e2e_backends() {
        let g = start(&backend, FaultProfile::none()).await;
        let name = backend.name();
        let (status, body) = g.confirm("order-replay-1").await;
        assert_eq!(status, 200, "{name}: {body}");
        let id = body["paymentId"].as_str().unwrap().to_owned();
        g.worked("order-replay-1", 1).await;
        let (_, before) = g
            .store
            .find_by_order_ids(&["order-replay-1".to_owned()])
            .await
            .unwrap()
            .remove(0);
        let lookups = g.lookups(&id).await;
        // The same event delivered three times is one receipt.
        let at = paygate_core::time::now_ms();
        for _ in 0..3 {
            assert_eq!(
                g.deliver(&webhook("order-replay-1", "DONE", at)).await,
                200,
                "{name}"
            );
        }
        // An older change, delivered late: ABORTED before the approval.
        assert_eq!(
            g.deliver(&webhook("order-replay-1", "ABORTED", at - 60_000))
                .await,
            200,
            "{name}"
        );
        let rs = g.worked("order-replay-1", 3).await;
        assert_eq!(rs.len(), 3, "{name}: {rs:?}");
        assert_eq!(rs[1].deliveries, 3, "{name}: the replays only counted");
        assert!(
            rs[1..]
                .iter()
                .all(|r| r.outcome.as_deref() == Some("nothing_new")),
            "{name}: {rs:?}"
        );
        assert_eq!(
            g.lookups(&id).await,
            lookups,
            "{name}: an approval or a decline of a paid payment changes nothing even if true: no lookup"
        );
        // A cancel claimed for it is looked up, once, and is false.
        assert_eq!(
            g.deliver(&webhook("order-replay-1", "CANCELED", at)).await,
            200,
            "{name}"
        );
        let rs = g.worked("order-replay-1", 4).await;
        assert_eq!(
            rs[3].outcome.as_deref(),
            Some("nothing_new"),
            "{name}: {rs:?}"
        );
        assert_eq!(g.lookups(&id).await, lookups + 1, "{name}");
        assert!(
            g.store
                .cancels_of(&before.payment_id)
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );
        let (_, after) = g
            .store
            .find_by_order_ids(&["order-replay-1".to_owned()])
            .await
            .unwrap()
            .remove(0);
        assert_eq!(after, before, "{name}");
        assert_eq!(g.sandbox.ledger.stats().records, 1, "{name}");
        g.cleanup.run().await;
    }
}
