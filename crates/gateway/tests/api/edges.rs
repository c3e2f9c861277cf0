//! The merchant API's edges, black-box over HTTP against the real app:
//! answers given before a confirm's saga ends (issue 13 point 4, I4) and
//! at the shutdown deadline (issue 15 point 7).

use std::time::{Duration, Instant};

use paygate_core::{payment::failure_codes, PaymentId};
use paygate_sandbox::FaultProfile;
use paygate_state_store::{testing::Backend, SqlDatabase};
use serde_json::Value;

use crate::helpers::{backends, confirm_body, spawn_app, TestApp};

async fn json(resp: reqwest::Response) -> Value {
    resp.json().await.expect("json body")
}

/// Polls `GET path` until `done` holds for its body (10 s at most).
async fn poll_until(app: &TestApp, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = app.get(&app.key, path).await;
        if resp.status() == 200 {
            let body = json(resp).await;
            if done(&body) {
                return body;
            }
            assert!(Instant::now() < until, "{path} never settled: {body}");
        } else {
            assert!(Instant::now() < until, "{path}: {}", resp.status());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A confirm whose card call outlasts the inbound timeout is answered 202
/// with its paymentId (IN_PROGRESS), never 503 "nothing was charged"; the
/// saga carries on and the payment ends DONE, charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_card_call_is_answered_202_in_progress_never_503() {
    for backend in backends() {
        let profile = FaultProfile {
            card_latency_min_ms: 1_500,
            card_latency_max_ms: 1_500,
            ..FaultProfile::none()
        };
        let app = spawn_app(&backend, profile, |c| c.inbound_request_timeout_ms = 400).await;
        let sent = Instant::now();
        let resp = app.confirm(&confirm_body("order-slow-card-1", 7_000)).await;
        let waited = sent.elapsed();
        assert_eq!(resp.status(), 202, "{}", backend.name());
        assert!(
            waited < Duration::from_millis(1_300),
            "answered by the deadline, not after the card: {waited:?}"
        );
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body = json(resp).await;
        assert_eq!(body["status"], "IN_PROGRESS", "{body}");
        let payment_id = body["paymentId"].as_str().expect("paymentId").to_owned();

        let done = poll_until(&app, &format!("/v1/payments/{payment_id}"), |b| {
            b["status"] == "DONE"
        })
        .await;
        assert_eq!(done["orderId"], "order-slow-card-1");
        let stats = app.sandbox.card.stats();
        assert_eq!(
            (stats.confirm_calls, stats.approvals),
            (1, 1),
            "{}",
            backend.name()
        );
        app.teardown().await;
    }
}

/// Takes the write lock of the realtime state table on `db`, as a stalled
/// database would, until the returned sender fires.
async fn hold_write_lock(db: &SqlDatabase) -> tokio::sync::oneshot::Sender<()> {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (locked_tx, locked) = tokio::sync::oneshot::channel::<()>();
    match db.clone() {
        SqlDatabase::Sqlite(db) => {
            let pool = db.pool;
            tokio::spawn(async move {
                let mut conn = pool.acquire().await.expect("connection");
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut *conn)
                    .await
                    .expect("write lock");
                let _ = locked_tx.send(());
                let _ = released.await;
                sqlx::query("COMMIT")
                    .execute(&mut *conn)
                    .await
                    .expect("commit");
            });
        }
        SqlDatabase::Postgres(pool) => {
            tokio::spawn(async move {
                let mut tx = pool.begin().await.expect("transaction");
                sqlx::query("LOCK TABLE realtime_payments IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await
                    .expect("table lock");
                let _ = locked_tx.send(());
                let _ = released.await;
                tx.commit().await.expect("commit");
            });
        }
    }
    locked.await.expect("lock taken");
    release
}

/// A confirm whose record cannot be written before its deadline is
/// answered 503, and that 503 stays true: the saga, once the store answers,
/// sees the merchant was answered, aborts the record as a no-call and makes
/// no card call. The merchant's retry then confirms it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_answered_503_before_its_record_is_durable_never_calls_the_card() {
    // The stall is a lock on the SQL database, which holds the record only
    // when the state store is SQL; with state in MongoDB the record is
    // durable at once and the deadline's answer is rightly 202.
    for backend in backends().into_iter().filter(|b| !b.mongodb_state()) {
        let app = spawn_app(&backend, FaultProfile::none(), |c| {
            c.inbound_request_timeout_ms = 300
        })
        .await;
        let release = hold_write_lock(&app.app_db).await;
        let resp = app.confirm(&confirm_body("order-stalled-1", 3_000)).await;
        assert_eq!(resp.status(), 503, "{}", backend.name());
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let problem = json(resp).await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("made no card call"),
            "{problem}"
        );
        let _ = release.send(());

        let aborted = poll_until(&app, "/v1/payments/orders/order-stalled-1", |b| {
            b["status"] == "ABORTED"
        })
        .await;
        let pid = PaymentId::from_stored(aborted["paymentId"].as_str().unwrap());
        let (_, stored) = app.saga.store().get(&pid).await.unwrap().unwrap();
        assert_eq!(
            stored.failure_code.as_deref(),
            Some(failure_codes::ANSWER_TIMED_OUT)
        );
        assert_eq!(
            app.sandbox.card.stats().confirm_calls,
            0,
            "{}: the 503 was true, no card call",
            backend.name()
        );

        let retry = app.confirm(&confirm_body("order-stalled-1", 3_000)).await;
        assert_eq!(retry.status(), 200, "{}", backend.name());
        assert_eq!(json(retry).await["paymentId"], aborted["paymentId"]);
        let stats = app.sandbox.card.stats();
        assert_eq!((stats.confirm_calls, stats.approvals), (1, 1));
        app.teardown().await;
    }
}

/// At the shutdown deadline every confirm still in flight is answered (202
/// with its paymentId, or 200) before the server goes, none loses its
/// connection, and the sagas carry on to DONE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_shutdown_deadline_every_in_flight_confirm_gets_an_answer() {
    let profile = FaultProfile {
        ledger_latency_min_ms: 2_000,
        ledger_latency_max_ms: 2_000,
        ..FaultProfile::none()
    };
    let mut app = spawn_app(&Backend::Sqlite, profile, |c| {
        c.shutdown_timeout_ms = 300;
        c.inbound_rate_limit_per_second = 0;
    })
    .await;
    let n = 4;
    let confirms: Vec<_> = (0..n)
        .map(|i| {
            let (client, base, key) = (app.client.clone(), app.base.clone(), app.key.clone());
            tokio::spawn(async move {
                let resp = client
                    .post(format!("{base}/v1/payments/confirm"))
                    .bearer_auth(key)
                    .json(&confirm_body(&format!("order-drain-{i}"), 1_000))
                    .send()
                    .await;
                (resp, Instant::now())
            })
        })
        .collect();
    // Every confirm is approved and waiting on the slow ledger.
    let until = Instant::now() + Duration::from_secs(5);
    while app.sandbox.ledger.stats().record_calls < n {
        assert!(
            Instant::now() < until,
            "the confirms never reached the ledger"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stop = Instant::now();
    app.begin_shutdown();
    let mut ids = Vec::new();
    for c in confirms {
        let (resp, at) = c.await.unwrap();
        let resp = resp.expect("every in-flight confirm gets an answer, none a cut connection");
        let status = resp.status().as_u16();
        assert!(status == 202 || status == 200, "{status}");
        assert!(
            at - stop < Duration::from_millis(1_500),
            "answered at the deadline, not after the ledger: {:?}",
            at - stop
        );
        let body = json(resp).await;
        ids.push(PaymentId::from_stored(
            body["paymentId"].as_str().expect("paymentId"),
        ));
    }
    tokio::time::timeout(Duration::from_secs(2), app.served())
        .await
        .expect("run_until returns within the deadline and its grace")
        .unwrap();
    // The sagas were not cut by the answers: each payment ends paid.
    for id in &ids {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, r) = app.saga.store().get(id).await.unwrap().unwrap();
            if r.is_paid {
                break;
            }
            assert!(Instant::now() < until, "{id} never ended paid");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(app.sandbox.card.stats().approvals, n);
    app.teardown().await;
}

/// Issue 15 point 6: `inbound_max_concurrent` is one limit across the
/// merchant routes: with two slow confirms holding it, a GET is shed with
/// 503 problem+json (per route, the GET had a limit of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_concurrency_limit_is_one_limit_across_routes() {
    let profile = FaultProfile {
        card_latency_min_ms: 1_500,
        card_latency_max_ms: 1_500,
        ..FaultProfile::none()
    };
    let app = spawn_app(&Backend::Sqlite, profile, |c| {
        c.inbound_max_concurrent = 2;
        c.inbound_max_concurrent_per_merchant = Some(2);
        c.inbound_rate_limit_per_second = 0;
    })
    .await;
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let (client, base, key) = (app.client.clone(), app.base.clone(), app.key.clone());
            tokio::spawn(async move {
                client
                    .post(format!("{base}/v1/payments/confirm"))
                    .bearer_auth(key)
                    .json(&confirm_body(&format!("order-limit-{i}"), 1_000))
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
            "the confirms never reached the card"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shed = app.get(&app.key, "/v1/payments/orders/order-limit-0").await;
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["content-type"], "application/problem+json");
    assert!(shed.headers().contains_key("retry-after"));
    let ready = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "probes are outside the limit");
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    let after = app.get(&app.key, "/v1/payments/orders/order-limit-0").await;
    assert_eq!(after.status(), 200, "the limit frees up");
    app.teardown().await;
}

/// Reads until the peer closes (or resets) the connection; `None` when it
/// is still open after `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

async fn cut_total(app: &TestApp, reason: &str) -> f64 {
    let text = crate::operations::scrape(&app.base).await;
    crate::operations::series(
        &text,
        &format!("paygate_inbound_connections_cut_total{{reason=\"{reason}\"}}"),
    )
}

/// Issue 15 point 5: a client that never finishes its headers, or trickles
/// them, is disconnected within the header-read bound; an idle keep-alive
/// connection within the (longer) idle bound; each cut is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_disconnected_within_the_bounds() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |c| {
        c.inbound_header_read_timeout_ms = 300;
        c.inbound_idle_timeout_ms = 1_500;
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let header_cuts = cut_total(&app, "header_read_timeout").await;
    let idle_cuts = cut_total(&app, "idle_timeout").await;

    // Headers never finished.
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/payments/confirm HTTP/1.1\r\nHost: paygate\r\n")
        .await
        .unwrap();
    let cut = closed_within(&mut stalled, Duration::from_secs(3))
        .await
        .expect("a client that never finishes its headers is disconnected");
    assert!(cut < Duration::from_millis(2_000), "{cut:?}");

    // Headers trickled a byte at a time: a read timeout would never fire.
    let mut trickle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let mut cut_at = None;
    for b in b"GET /healthz HTTP/1.1\r\nHost: paygate\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if trickle.write_all(&[*b]).await.is_err() {
            cut_at = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(50), trickle.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut_at = Some(started.elapsed());
                break;
            }
            _ => {}
        }
    }
    let cut = cut_at.expect("a trickling client is disconnected");
    assert!(cut < Duration::from_millis(2_000), "{cut:?}");

    // Kept alive after an answer: open past the header bound, closed
    // within the idle bound.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: paygate\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 1024];
    let n = idle.read(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    assert_eq!(
        closed_within(&mut idle, Duration::from_millis(800)).await,
        None,
        "an idle keep-alive connection has the idle bound, not the header bound"
    );
    let cut = closed_within(&mut idle, Duration::from_secs(4))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(cut < Duration::from_millis(3_000), "{cut:?}");

    assert!(cut_total(&app, "header_read_timeout").await >= header_cuts + 2.0);
    assert!(cut_total(&app, "idle_timeout").await >= idle_cuts + 1.0);
    app.teardown().await;
}

/// Checks a problem+json answer: status, content type and members.
async fn assert_problem(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "{:?}", resp.headers());
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "{status}"
    );
    let body = json(resp).await;
    for member in ["type", "title", "detail", "code"] {
        assert!(body[member].is_string(), "{status}: no {member} in {body}");
    }
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    body
}

/// Issue 15 point 8: every error answer is problem+json, the framework's
/// own included, and a confirm that is not JSON is refused before any card
/// call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_problem_json() {
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |c| {
        c.inbound_rate_limit_per_second = 0;
    })
    .await;
    let confirm_url = format!("{}/v1/payments/confirm", app.base);

    // 413: a body over the limit.
    let big = serde_json::json!({"paymentKey": "x".repeat(20_000), "orderId": "order-big-1", "amount": 1000});
    let resp = app.confirm(&big).await;
    assert_problem(resp, 413, "PAYLOAD_TOO_LARGE").await;

    // 405, with Allow kept.
    let resp = app
        .client
        .delete(&confirm_url)
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap();
    let allow = resp.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("POST"), "{allow}");
    assert_problem(resp, 405, "METHOD_NOT_ALLOWED").await;

    // 400: a path segment that does not decode; the framework's text named
    // an internal field.
    for path in ["/v1/payments/%ff%fe", "/v1/payments/orders/%ff%fe"] {
        let resp = app.get(&app.key, path).await;
        let body = assert_problem(resp, 400, "INVALID_REQUEST").await;
        let text = body.to_string();
        assert!(
            !text.contains("payment_id") && !text.contains("order_id"),
            "{text}"
        );
    }

    // 404: no such route.
    let resp = app.get(&app.key, "/v1/nothing-here").await;
    assert_problem(resp, 404, "NOT_FOUND").await;

    // 415: a confirm body that is not declared JSON, or not declared at all.
    let body = confirm_body("order-media-1", 1_000).to_string();
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = app
            .client
            .post(&confirm_url)
            .bearer_auth(&app.key)
            .body(body.clone());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.unwrap();
        assert_problem(resp, 415, "UNSUPPORTED_MEDIA_TYPE").await;
    }
    // JSON with a charset parameter is JSON.
    let resp = app
        .client
        .post(&confirm_url)
        .bearer_auth(&app.key)
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(confirm_body("order-media-2", 1_000).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    assert_eq!(
        app.sandbox.card.stats().confirm_calls,
        1,
        "only the JSON confirm reached the card company"
    );
    let nothing = app.get(&app.key, "/v1/payments/orders/order-media-1").await;
    assert_eq!(nothing.status(), 404, "a refused confirm leaves no payment");
    app.teardown().await;
}

/// Issue 15 point 9: a confirm body with a member paygate does not know is
/// refused (a `"currency": "USD"` was charged in KRW), and so is an amount
/// above `max_amount`; neither reaches the card company.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_members_and_amounts_over_the_maximum_are_400() {
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |c| {
        c.max_amount = 50_000;
    })
    .await;
    for body in [
        serde_json::json!({"paymentKey": "pk_usd_1", "orderId": "order-usd-1", "amount": 1000, "currency": "USD"}),
        serde_json::json!({"paymentKey": "pk_usd_1", "orderId": "order-usd-1", "amount": 1000, "extra": null}),
        confirm_body("order-max-1", 50_001),
        confirm_body("order-max-1", i64::MAX),
    ] {
        let resp = app.confirm(&body).await;
        assert_problem(resp, 400, "INVALID_REQUEST").await;
    }
    assert_eq!(app.sandbox.card.stats().confirm_calls, 0);
    let resp = app.confirm(&confirm_body("order-max-1", 50_000)).await;
    assert_eq!(resp.status(), 200, "the maximum itself is allowed");
    app.teardown().await;
}

/// The default `max_amount` is ₩100,000,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_max_amount_is_100_million() {
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |_| {}).await;
    let resp = app.confirm(&confirm_body("order-max-2", 100_000_001)).await;
    let problem = assert_problem(resp, 400, "INVALID_REQUEST").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("100000000"),
        "{problem}"
    );
    assert_eq!(app.sandbox.card.stats().confirm_calls, 0);
    app.teardown().await;
}

/// Issue 15 point 10: the `Authorization` scheme is case-insensitive (RFC
/// 9110 §11.1), and two `Authorization` headers are a bad request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_and_two_authorizations_are_400() {
    let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |c| {
        c.inbound_rate_limit_per_second = 0;
    })
    .await;
    let url = format!("{}/v1/payments/orders/order-auth-case", app.base);
    for scheme in ["bearer", "BEARER", "bEaReR"] {
        let resp = app
            .client
            .get(&url)
            .header("authorization", format!("{scheme} {}", app.key))
            .send()
            .await
            .unwrap();
        // Authenticated: the order does not exist, so 404 rather than 401.
        assert_problem(resp, 404, "NOT_FOUND").await;
    }
    let resp = app
        .client
        .get(&url)
        .header("authorization", format!("Bearer {}", app.key))
        .header("authorization", "Bearer pgk_someone_else")
        .send()
        .await
        .unwrap();
    assert_problem(resp, 400, "INVALID_REQUEST").await;
    let resp = app
        .client
        .get(&url)
        .header("authorization", format!("Basic {}", app.key))
        .send()
        .await
        .unwrap();
    assert_problem(resp, 401, "UNAUTHORIZED").await;
    app.teardown().await;
}

/// Merchant lookups are cached for `merchant_cache_ttl_ms`: a key revoked
/// in the database keeps working until its entry expires (the bound the
/// docs state), then gets 401; with the cache off it stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_within_the_merchant_cache_ttl() {
    for ttl_ms in [1_500u64, 0] {
        let app = spawn_app(&Backend::Sqlite, FaultProfile::none(), |c| {
            c.merchant_cache_ttl_ms = ttl_ms;
        })
        .await;
        let path = "/v1/payments/orders/no-such-order";
        // Authenticated (404, not 401): the lookup is now cached.
        assert_eq!(app.get(&app.key, path).await.status(), 404, "ttl {ttl_ms}");
        let revoke = paygate_state_store::with_pool!(&app.app_db, pool => {
            sqlx::query("UPDATE merchants SET revoked_at = 1")
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        });
        assert_eq!(revoke.unwrap(), 1);
        let right_after = app.get(&app.key, path).await.status();
        if ttl_ms == 0 {
            assert_eq!(right_after, 401, "no cache: revoked at once");
        } else {
            assert_eq!(right_after, 404, "cached: still the merchant's");
            tokio::time::sleep(Duration::from_millis(ttl_ms + 300)).await;
            assert_eq!(app.get(&app.key, path).await.status(), 401, "after the ttl");
        }
        app.teardown().await;
    }
}
