//! Merchant webhooks, black box: `paygate serve` as a child process (sandbox
//! mode), a merchant endpoint that fails with 500 for a while, and a
//! `kill -9` of paygate in the middle. Every event the store holds reaches
//! the endpoint, each with a valid `Paygate-Signature`, a payment's events
//! in version order, duplicates with the same `eventId` and body; every
//! applied transition has exactly one event; `GET /v1/events` lists the
//! same events in order. On SQLite, PostgreSQL and with the state records in
//! MongoDB (`e2e_backends`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use paygate_e2e::*;
use paygate_state_store::{
    testing::{e2e_backends, fresh_e2e, E2eStores},
    SqlDatabase,
};
use paygate_webhooks::{signature, EventRow, EventStore};
use serde_json::{json, Value};

/// 32 bytes, base64.
const SECRETS_KEY: &str = "dGVzdC1zZWNyZXRzLWtleS0wMTIzNDU2Nzg5YWJjZGU=";

/// What the merchant's endpoint saw: `(signature header, body)` per POST,
/// and whether it is failing (500) right now.
#[derive(Default)]
struct Endpoint {
    seen: Mutex<Vec<(String, Bytes)>>,
    failing: AtomicBool,
    refused: std::sync::atomic::AtomicUsize,
}

async fn receive(State(e): State<Arc<Endpoint>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if e.failing.load(Ordering::SeqCst) {
        e.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let sig = headers
        .get(signature::HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    e.seen.lock().unwrap().push((sig, body));
    StatusCode::OK
}

/// `serve` in sandbox mode with merchant webhooks on, polling and
/// retrying fast, endpoints on loopback allowed.
fn serve_with_webhooks(stores: &E2eStores) -> (KillOnDrop, String) {
    let mut envs = stores.env();
    envs.extend([
        ("PAYGATE_SECRETS_KEY", SECRETS_KEY.to_owned()),
        ("PAYGATE_WEBHOOK_ALLOW_PRIVATE", "true".to_owned()),
        ("PAYGATE_WEBHOOK_POLL_MS", "50".to_owned()),
        ("PAYGATE_WEBHOOK_RETRY_FIRST_MS", "100".to_owned()),
        ("PAYGATE_WEBHOOK_MAX_ATTEMPTS", "100".to_owned()),
    ]);
    start_serve(&envs)
}

async fn stored_events(db: &SqlDatabase) -> Vec<EventRow> {
    EventStore::new(db.clone())
        .list(None, None, 10_000)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_reaches_the_endpoint_signed_and_in_order_across_500s_and_a_kill_9() {
    for backend in e2e_backends() {
        let name = backend.name();
        let (stores, cleanup) = fresh_e2e(&backend).await;
        let db = SqlDatabase::connect(&stores.database_url, 2).await.unwrap();
        db.migrate().await.unwrap();
        let key = create_merchant(&stores.database_url, "webhooks");

        let endpoint = Arc::new(Endpoint::default());
        endpoint.failing.store(true, Ordering::SeqCst);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(endpoint.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let (serve, base) = tokio::task::spawn_blocking({
            let stores = stores.clone();
            move || serve_with_webhooks(&stores)
        })
        .await
        .unwrap();
        let http = reqwest::Client::new();
        let r = http
            .put(format!("{base}/v1/webhook-endpoint"))
            .bearer_auth(&key)
            .json(&json!({ "url": hook }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let secret = r.json::<Value>().await.unwrap()["signingSecret"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(secret.starts_with("whsec_"), "{name}");
        // The secret is stored sealed, never in the clear.
        let sealed: Vec<String> = paygate_state_store::with_pool!(&db, pool => {
            sqlx::query_scalar("SELECT secret_sealed FROM webhook_endpoints")
                .fetch_all(pool)
                .await
                .unwrap()
        });
        assert_eq!(sealed.len(), 1, "{name}");
        assert!(!sealed[0].contains(&secret["whsec_".len()..]), "{name}");

        let mut paid = Vec::new();
        for i in 0..8 {
            let order = format!("order-hook-{i:03}");
            let r = http
                .post(format!("{base}/v1/payments/confirm"))
                .bearer_auth(&key)
                .json(&json!({"paymentKey": format!("pk_hook_{i}"), "orderId": order, "amount": 10_000}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{name}: confirm {i}");
            let v: Value = r.json().await.unwrap();
            paid.push(v["paymentId"].as_str().unwrap().to_owned());
        }
        // A replay is not a transition: no event.
        let r = http
            .post(format!("{base}/v1/payments/confirm"))
            .bearer_auth(&key)
            .json(
                &json!({"paymentKey": "pk_hook_0", "orderId": "order-hook-000", "amount": 10_000}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}: replay");
        // A partial cancel, then the rest, of two payments.
        for id in &paid[..2] {
            for body in [
                json!({"cancelReason": "part", "cancelAmount": 4_000}),
                json!({"cancelReason": "rest"}),
            ] {
                let r = http
                    .post(format!("{base}/v1/payments/{id}/cancel"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{name}: cancel of {id}");
            }
        }
        // The endpoint refuses a while; then paygate dies mid-retries.
        let deadline = Instant::now() + Duration::from_secs(20);
        while endpoint.refused.load(Ordering::SeqCst) < 12 {
            assert!(Instant::now() < deadline, "{name}: no delivery was tried");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut serve = serve;
        serve.0.kill().unwrap();
        let _ = serve.0.wait();
        endpoint.failing.store(false, Ordering::SeqCst);
        let (_serve, base) = tokio::task::spawn_blocking({
            let stores = stores.clone();
            move || serve_with_webhooks(&stores)
        })
        .await
        .unwrap();

        // Every stored event is delivered, and the endpoint has each.
        let deadline = Instant::now() + Duration::from_secs(60);
        let stored = loop {
            let stored = stored_events(&db).await;
            let got: BTreeSet<String> = endpoint
                .seen
                .lock()
                .unwrap()
                .iter()
                .map(|(_, b)| {
                    serde_json::from_slice::<Value>(b).unwrap()["eventId"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            let all_in = stored.len() >= 12
                && stored
                    .iter()
                    .all(|e| e.delivery == "delivered" && got.contains(&e.event.event_id));
            if all_in {
                break stored;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: undelivered {:?}",
                stored
                    .iter()
                    .filter(|e| e.delivery != "delivered")
                    .map(|e| (&e.event.event_id, &e.delivery, e.attempts))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };

        // Exactly one event per applied transition: an approval per paid
        // payment, a partial cancel and a cancel for the two canceled.
        let mut by_payment: BTreeMap<String, Vec<(i64, i64, String)>> = BTreeMap::new();
        for e in &stored {
            by_payment
                .entry(e.event.payment_id.to_string())
                .or_default()
                .push((
                    e.event.version,
                    e.event.cancel_n,
                    e.event.event_type.as_str().to_owned(),
                ));
        }
        assert_eq!(by_payment.len(), paid.len(), "{name}");
        for (i, id) in paid.iter().enumerate() {
            let mut kinds = by_payment[id].clone();
            kinds.sort();
            let kinds: Vec<&str> = kinds.iter().map(|k| k.2.as_str()).collect();
            let want: &[&str] = if i < 2 {
                &[
                    "payment.approved",
                    "payment.partially_canceled",
                    "payment.canceled",
                ]
            } else {
                &["payment.approved"]
            };
            assert_eq!(kinds, want, "{name}: events of {id}");
        }

        // Each delivery is signed; duplicates carry the same id and body; a
        // payment's events first arrived in version order; nothing arrived
        // that the store does not hold.
        let seen = endpoint.seen.lock().unwrap().clone();
        let now = paygate_core::time::now_ms() / 1_000;
        let mut first: BTreeMap<String, Bytes> = BTreeMap::new();
        let mut order: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
        let ids: BTreeSet<&str> = stored.iter().map(|e| e.event.event_id.as_str()).collect();
        for (sig, body) in &seen {
            assert!(
                signature::verify(sig, &secret, body, now, 600),
                "{name}: bad signature {sig}"
            );
            let v: Value = serde_json::from_slice(body).unwrap();
            let id = v["eventId"].as_str().unwrap().to_owned();
            assert!(ids.contains(id.as_str()), "{name}: unknown event {id}");
            match first.get(&id) {
                Some(b) => assert_eq!(b, body, "{name}: a duplicate of {id} differs"),
                None => {
                    first.insert(id.clone(), body.clone());
                    order
                        .entry(v["paymentId"].as_str().unwrap().to_owned())
                        .or_default()
                        .push((
                            v["version"].as_i64().unwrap(),
                            v["data"]["cancel"].is_object() as i64,
                        ));
                }
            }
        }
        for (pid, seq) in &order {
            let mut sorted = seq.clone();
            sorted.sort();
            assert_eq!(seq, &sorted, "{name}: events of {pid} out of order");
        }
        eprintln!(
            "{name}: {} events, {} POSTs received, {} refused with 500",
            stored.len(),
            seen.len(),
            endpoint.refused.load(Ordering::SeqCst)
        );

        // The catch-up list holds the same events, in sequence order, paged.
        let mut listed = Vec::new();
        let mut after = 0;
        loop {
            let page: Value = http
                .get(format!("{base}/v1/events?after={after}&limit=5"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let events = page["events"].as_array().unwrap().clone();
            if events.is_empty() {
                break;
            }
            after = page["nextAfter"].as_i64().unwrap();
            listed.extend(events);
        }
        let seqs: Vec<i64> = listed
            .iter()
            .map(|e| e["sequence"].as_i64().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{name}: {seqs:?}");
        let listed_ids: BTreeSet<&str> = listed
            .iter()
            .map(|e| e["eventId"].as_str().unwrap())
            .collect();
        assert_eq!(listed_ids, ids, "{name}");
        // Another merchant sees none of them.
        let other = create_merchant(&stores.database_url, "other");
        let page: Value = http
            .get(format!("{base}/v1/events"))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(page["events"].as_array().unwrap().len(), 0, "{name}");

        // An operator lists the deliveries and sends one again: the
        // endpoint gets it a second time, with the same id and body.
        let out = paygate()
            .args(["webhooks", "list", "--json"])
            .envs(stores.env())
            .env("PAYGATE_SECRETS_KEY", SECRETS_KEY)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), stored.len(), "{name}");
        assert!(
            rows.iter().all(|r| r["delivery"] == "delivered"),
            "{name}: {rows:?}"
        );
        let target = stored[0].event.event_id.clone();
        let times = |id: &str| {
            endpoint
                .seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, b)| serde_json::from_slice::<Value>(b).unwrap()["eventId"] == id)
                .count()
        };
        let before = times(&target);
        let out = paygate()
            .args(["webhooks", "resend", &target])
            .envs(stores.env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while times(&target) == before {
            assert!(
                Instant::now() < deadline,
                "{name}: {target} was not sent again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        server.abort();
        db.close().await;
        cleanup.run().await;
    }
}

/// What a merchant's endpoint that hangs has seen, and the gate that
/// releases it.
#[derive(Default)]
struct Hanging {
    started: std::sync::atomic::AtomicUsize,
    in_flight: std::sync::atomic::AtomicUsize,
    released: tokio::sync::Notify,
    open: AtomicBool,
}

/// Counts a request as hanging until its handler ends (answered, or
/// dropped when paygate's client gave up on it).
struct InFlight(Arc<Hanging>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn hang(State(h): State<Arc<Hanging>>) -> StatusCode {
    h.started.fetch_add(1, Ordering::SeqCst);
    h.in_flight.fetch_add(1, Ordering::SeqCst);
    let _guard = InFlight(h.clone());
    if !h.open.load(Ordering::SeqCst) {
        h.released.notified().await;
    }
    StatusCode::OK
}

/// One merchant's endpoint hangs; another merchant's events are all
/// delivered while it does, and the hanging one's arrive once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_endpoint_holds_only_its_own_merchant() {
    let backend = e2e_backends().into_iter().next().unwrap();
    let (stores, cleanup) = fresh_e2e(&backend).await;
    let db = SqlDatabase::connect(&stores.database_url, 2).await.unwrap();
    db.migrate().await.unwrap();
    let slow_key = create_merchant(&stores.database_url, "slow");
    let fast_key = create_merchant(&stores.database_url, "fast");
    let fast = Arc::new(Endpoint::default());
    let slow = Arc::new(Hanging::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/fast", post(receive).with_state(fast.clone()))
        .route("/slow", post(hang).with_state(slow.clone()));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let (_serve, base) = tokio::task::spawn_blocking({
        let stores = stores.clone();
        move || serve_with_webhooks(&stores)
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    for (key, path) in [(&slow_key, "slow"), (&fast_key, "fast")] {
        let r = http
            .put(format!("{base}/v1/webhook-endpoint"))
            .bearer_auth(key)
            .json(&json!({ "url": format!("http://{at}/{path}") }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for (key, tag, n) in [(&slow_key, "slow", 2), (&fast_key, "fast", 4)] {
        for i in 0..n {
            let r = http
                .post(format!("{base}/v1/payments/confirm"))
                .bearer_auth(key)
                .json(&json!({"paymentKey": format!("pk_{tag}_{i}"), "orderId": format!("order-{tag}-{i:03}"), "amount": 1_000}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    // The slow merchant's first delivery hangs; the fast one's all arrive.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fast.seen.lock().unwrap().len() < 4 || slow.started.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the fast merchant's events did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...while the slow merchant's request is still hanging (a worker
    // that served merchants one after another would have delivered them
    // only after that request's 10 s timeout had ended it).
    assert!(
        slow.started.load(Ordering::SeqCst) >= 1,
        "the slow endpoint was never called"
    );
    assert_eq!(
        slow.in_flight.load(Ordering::SeqCst),
        1,
        "the fast merchant's events waited for the slow endpoint"
    );
    // Released, the slow merchant's events arrive too.
    slow.open.store(true, Ordering::SeqCst);
    slow.released.notify_waiters();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = EventStore::new(db.clone())
            .list(None, None, 100)
            .await
            .unwrap();
        if rows.len() == 6 && rows.iter().all(|r| r.delivery == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.abort();
    db.close().await;
    cleanup.run().await;
}
