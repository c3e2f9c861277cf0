//! Alert delivery through the outbox to the Discord simulator.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::{sync::Arc, time::Duration};

use paygate_alert::{
    Alert, AlertReason, Alerter, DiscordClient, DiscordError, Listing, OutboxAlerter, SqlOutbox,
};
use paygate_core::Secret;
use paygate_sandbox::{serve_discord, DiscordSim};
use paygate_state_store::{
    testing::{fresh_sql_url, sql_backends, Cleanup},
    SqlDatabase,
};

fn alert(i: usize) -> Alert {
    Alert {
        reason: AlertReason::OutcomeUnknown,
        payment_id: format!("pay_test_{i:04}"),
        merchant_id: "mer_test".into(),
        order_id: format!("order-{i:04}"),
        amount: 1_000 + i as i64,
        detail: "outcome unknown after 3 lookups".into(),
    }
}

/// The longest a test waits for a flush that should end much sooner: the
/// code before parking spun forever on a refused message.
const HANG: Duration = Duration::from_secs(30);

async fn setup(
    backend: &paygate_state_store::testing::Backend,
    sim: Arc<DiscordSim>,
) -> (Arc<OutboxAlerter>, Cleanup) {
    let (url, cleanup) = fresh_sql_url(backend).await;
    let db = SqlDatabase::connect(&url, 4).await.unwrap();
    db.migrate().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (webhook, _server) = serve_discord(sim, listener).unwrap();
    let client = DiscordClient::new(reqwest::Client::new(), Secret::new(webhook), 50);
    (
        OutboxAlerter::new(SqlOutbox::new(db), Some(client)),
        cleanup,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_thirty_is_delivered_whole_honouring_429s() {
    for backend in sql_backends() {
        // 5 per 300 ms: the burst must wait several times.
        let sim = DiscordSim::new(5, Duration::from_millis(300));
        let (alerter, cleanup) = setup(&backend, sim.clone()).await;
        for i in 0..30 {
            alerter.raise(alert(i)).await;
        }
        let flushed = alerter.flush().await;
        assert_eq!(flushed.sent, 30, "{}", backend.name());
        let stats = sim.stats();
        assert_eq!(stats.delivered, 30, "none dropped");
        assert_eq!(stats.rejected, 0, "every message within Discord's limits");
        // Each 429 is waited out and the message resent; the X-RateLimit
        // headers let the client wait before most of them.
        assert_eq!(stats.requests, 30 + stats.rate_limited);
        eprintln!("burst: {stats:?}");
        let received = sim.received();
        let contents: Vec<&str> = received
            .iter()
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert!(
            contents[0].contains("pay_test_0000") && contents[29].contains("pay_test_0029"),
            "in order"
        );
        assert_eq!(
            received[0]["allowed_mentions"]["parse"],
            serde_json::json!([])
        );
        assert_eq!(alerter.outbox().unsent_count().await.unwrap(), 0);
        cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_webhook_keeps_alerts_in_the_outbox() {
    for backend in sql_backends() {
        let sim = DiscordSim::new(5, Duration::from_millis(300));
        sim.set_unknown(true);
        let (alerter, cleanup) = setup(&backend, sim.clone()).await;
        for i in 0..3 {
            alerter.raise(alert(i)).await;
        }
        let flushed = alerter.flush().await;
        assert_eq!(flushed.sent, 0, "{}", backend.name());
        assert_eq!(
            alerter.outbox().unsent_count().await.unwrap(),
            3,
            "kept for later"
        );
        assert_eq!(
            sim.stats().unknown,
            1,
            "the URL is not used again after the 404"
        );
        let again = alerter.flush().await;
        assert_eq!((again.sent, sim.stats().requests), (0, 1));
        cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_alert_per_problem_and_none_lost_without_a_webhook() {
    for backend in sql_backends() {
        let (url, cleanup) = fresh_sql_url(&backend).await;
        let db = SqlDatabase::connect(&url, 4).await.unwrap();
        db.migrate().await.unwrap();
        let alerter = OutboxAlerter::new(SqlOutbox::new(db), None);
        for _ in 0..5 {
            alerter.raise(alert(7)).await;
        }
        alerter
            .raise(Alert {
                reason: AlertReason::LedgerSaveFailed,
                ..alert(7)
            })
            .await;
        let rows = alerter.outbox().all().await.unwrap();
        assert_eq!(
            rows.len(),
            2,
            "{}: one per (payment, reason)",
            backend.name()
        );
        assert_eq!(alerter.flush().await.sent, 0);
        assert_eq!(
            alerter.outbox().unsent_count().await.unwrap(),
            2,
            "kept in the outbox"
        );
        cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_sharing_a_webhook_wait_out_429s_and_lose_nothing() {
    // Three processes (say serve and two batch runs) share one webhook, so
    // header pacing in one client cannot prevent 429s: they must be waited out.
    let sim = DiscordSim::new(5, Duration::from_millis(300));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (webhook, _server) = serve_discord(sim.clone(), listener).unwrap();
    let senders = (0..3).map(|s| {
        let client = DiscordClient::new(reqwest::Client::new(), Secret::new(webhook.clone()), 50);
        tokio::spawn(async move {
            for i in 0..10 {
                let a = alert(s * 10 + i);
                client
                    .send(&paygate_alert::discord::message_for(&a))
                    .await
                    .unwrap();
            }
        })
    });
    for s in senders.collect::<Vec<_>>() {
        s.await.unwrap();
    }
    let stats = sim.stats();
    assert_eq!(stats.delivered, 30, "all delivered");
    assert!(stats.rate_limited > 0, "the burst met 429s: {stats:?}");
    assert_eq!(
        stats.requests,
        30 + stats.rate_limited,
        "each 429 was resent once it had been waited out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_parks_the_message_and_newer_alerts_are_still_delivered() {
    for backend in sql_backends() {
        let sim = DiscordSim::new(100, Duration::from_millis(10));
        let (alerter, cleanup) = setup(&backend, sim.clone()).await;
        let outbox = alerter.outbox();
        // The webhook's token is wrong: more refused alerts than one page of
        // the outbox (50), which the flush used to re-read forever.
        sim.set_invalid_token(true);
        for i in 0..60 {
            alerter.raise(alert(i)).await;
        }
        let flushed = tokio::time::timeout(HANG, alerter.flush_within(Duration::from_secs(10)))
            .await
            .expect("a refused message does not make the flush spin");
        assert_eq!(
            (flushed.sent, flushed.parked, flushed.out_of_time),
            (0, 60, false),
            "{}: {flushed:?}",
            backend.name()
        );
        assert_eq!(sim.stats().unauthorized, 60, "each one tried once");
        assert_eq!(outbox.parked_count().await.unwrap(), 60);
        assert_eq!(outbox.unsent_count().await.unwrap(), 0, "none pending");
        let parked = outbox.list(Listing::Parked, 100).await.unwrap();
        assert_eq!(parked.len(), 60, "operators see them");
        assert!(parked.iter().all(|r| r.parked_at.is_some()
            && r.sent_at.is_none()
            && r.attempts == 1
            && r.last_error
                .as_deref()
                .is_some_and(|e| e.contains("401") && e.contains("Invalid Webhook Token"))));
        assert_eq!(outbox.list(Listing::Unsent, 100).await.unwrap().len(), 60);

        // The token is fixed; a newer alert goes out, the parked ones stay put.
        sim.set_invalid_token(false);
        alerter.raise(alert(60)).await;
        let flushed = alerter.flush_within(Duration::from_secs(10)).await;
        assert_eq!((flushed.sent, flushed.parked), (1, 0), "{flushed:?}");
        let received = sim.received();
        assert_eq!(received.len(), 1);
        assert!(received[0]["content"]
            .as_str()
            .unwrap()
            .contains("pay_test_0060"));
        assert_eq!(sim.stats().requests, 61, "parked alerts are not re-sent");

        // An operator un-parks one: the next flush sends it.
        let first = parked[0].id;
        assert!(outbox.unpark(first).await.unwrap());
        assert!(!outbox.unpark(first).await.unwrap(), "no longer parked");
        assert_eq!(alerter.flush().await.sent, 1);
        assert!(sim.received()[1]["content"]
            .as_str()
            .unwrap()
            .contains("pay_test_0000"));
        assert!(
            !outbox.unpark(first).await.unwrap(),
            "a sent alert is not un-parked"
        );
        assert_eq!(outbox.parked_count().await.unwrap(), 59);
        assert_eq!(outbox.unsent_count().await.unwrap(), 0);
        // The rest at once, oldest first.
        assert_eq!(outbox.unpark_all().await.unwrap(), 59);
        assert_eq!(outbox.unsent_count().await.unwrap(), 59);
        let flushed = alerter.flush().await;
        assert_eq!((flushed.sent, flushed.parked), (59, 0), "{flushed:?}");
        assert!(sim.received()[2]["content"]
            .as_str()
            .unwrap()
            .contains("pay_test_0001"));
        assert_eq!(outbox.list(Listing::Unsent, 100).await.unwrap().len(), 0);
        assert_eq!(outbox.count(Listing::All).await.unwrap(), 61);
        cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_payload_is_parked_and_the_next_alert_goes_out_in_the_same_flush() {
    for backend in sql_backends() {
        let sim = DiscordSim::new(100, Duration::from_millis(10));
        let (alerter, cleanup) = setup(&backend, sim.clone()).await;
        // A body Discord refuses (400: content over 2000 characters), then a good one.
        let bad = serde_json::json!({"content": "x".repeat(2001)});
        assert!(alerter.outbox().enqueue(&alert(0), &bad).await.unwrap());
        alerter.raise(alert(1)).await;
        let flushed = tokio::time::timeout(HANG, alerter.flush())
            .await
            .expect("a refused message does not make the flush spin");
        assert_eq!(
            (flushed.sent, flushed.parked),
            (1, 1),
            "{}: {flushed:?}",
            backend.name()
        );
        let stats = sim.stats();
        assert_eq!((stats.rejected, stats.delivered, stats.requests), (1, 1, 2));
        assert!(sim.received()[0]["content"]
            .as_str()
            .unwrap()
            .contains("pay_test_0001"));
        let parked = alerter.outbox().list(Listing::Parked, 10).await.unwrap();
        assert_eq!(parked.len(), 1);
        assert!(parked[0].last_error.as_deref().unwrap().contains("400"));
        cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_under_a_rate_limit_that_never_lifts_returns_within_its_budget() {
    for backend in sql_backends() {
        let sim = DiscordSim::new(5, Duration::from_millis(300));
        sim.set_always_rate_limited(Some(Duration::from_millis(400)));
        let (alerter, cleanup) = setup(&backend, sim.clone()).await;
        for i in 0..3 {
            alerter.raise(alert(i)).await;
        }
        let budget = Duration::from_millis(1_500);
        let started = std::time::Instant::now();
        let flushed = tokio::time::timeout(HANG, alerter.flush_within(budget))
            .await
            .expect("the flush ends");
        let took = started.elapsed();
        // The old flush waited 50 retry_afters (20 s) for the first message.
        assert!(
            took <= budget + Duration::from_millis(250),
            "{}: {took:?}",
            backend.name()
        );
        assert!(
            flushed.out_of_time && flushed.sent == 0 && flushed.parked == 0,
            "{flushed:?}"
        );
        let stats = sim.stats();
        assert!(
            stats.rate_limited >= 2,
            "429s were waited out and resent until the budget ran out: {stats:?}"
        );
        assert_eq!(stats.delivered, 0);
        assert_eq!(
            alerter.outbox().unsent_count().await.unwrap(),
            3,
            "a 429 never parks: all kept for the next flush"
        );
        assert_eq!(alerter.outbox().parked_count().await.unwrap(), 0);
        cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_stops_at_once_even_in_the_middle_of_a_flush() {
    let backend = &sql_backends()[0];
    let sim = DiscordSim::new(5, Duration::from_millis(300));
    // A 10 s retry_after: the flush is waiting it out when the stop comes.
    sim.set_always_rate_limited(Some(Duration::from_secs(10)));
    let (alerter, cleanup) = setup(backend, sim.clone()).await;
    alerter.raise(alert(0)).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sender = tokio::spawn(alerter.clone().run_sender(Duration::from_secs(5), async {
        let _ = stopped.await;
    }));
    let started = std::time::Instant::now();
    while sim.stats().rate_limited == 0 {
        assert!(started.elapsed() < HANG, "the sender tried");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    let stopped_at = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(2), sender)
        .await
        .expect("the stop is honoured without waiting for Discord")
        .unwrap();
    assert!(stopped_at.elapsed() < Duration::from_millis(500));
    assert_eq!(alerter.outbox().unsent_count().await.unwrap(), 1, "kept");
    cleanup.run().await;
}

/// The client alone, in paused time: a send never waits past its deadline
/// however long Discord keeps answering 429, and it honours each
/// `retry_after` before resending.
#[tokio::test(start_paused = true)]
async fn a_send_under_a_rate_limit_that_never_lifts_gives_up_at_its_deadline() {
    let sim = DiscordSim::new(5, Duration::from_millis(300));
    sim.set_always_rate_limited(Some(Duration::from_secs(1)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (webhook, _server) = serve_discord(sim.clone(), listener).unwrap();
    let client = DiscordClient::new(reqwest::Client::new(), Secret::new(webhook), 50);
    let body = paygate_alert::discord::message_for(&alert(0));
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(4_500);
    let sent = client.send_before(&body, deadline).await;
    assert_eq!(sent, Err(DiscordError::OutOfTime));
    assert!(tokio::time::Instant::now() <= deadline);
    // Sent at 0, 1, 2, 3 and 4 s; the wait after the last one passes the deadline.
    assert_eq!(sim.stats().rate_limited, 5, "{:?}", sim.stats());
    // The next send does not knock before the retry_after is over.
    let again = client
        .send_before(
            &body,
            tokio::time::Instant::now() + Duration::from_millis(100),
        )
        .await;
    assert_eq!(again, Err(DiscordError::OutOfTime));
    assert_eq!(sim.stats().requests, 5, "no request inside the retry_after");
}

/// With the console's public URL set, the message Discord receives links to
/// the payment's console page (the embed's title and a `console` field).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_alert_links_to_its_payment_on_the_console() {
    for backend in sql_backends() {
        let sim = DiscordSim::new(50, Duration::from_millis(100));
        let (url, cleanup) = fresh_sql_url(&backend).await;
        let db = SqlDatabase::connect(&url, 4).await.unwrap();
        db.migrate().await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (webhook, _server) = serve_discord(sim.clone(), listener).unwrap();
        let client = DiscordClient::new(reqwest::Client::new(), Secret::new(webhook), 50);
        let alerter = OutboxAlerter::with_console(
            SqlOutbox::new(db),
            Some(client),
            Some("https://console.example/".into()),
        );
        alerter.raise(alert(7)).await;
        assert_eq!(alerter.flush().await.sent, 1, "{}", backend.name());
        let got = sim.received();
        let embed = &got[0]["embeds"][0];
        assert_eq!(
            embed["url"],
            "https://console.example/payments/pay_test_0007"
        );
        assert!(embed["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "console"
                && f["value"] == "https://console.example/payments/pay_test_0007"));
        cleanup.run().await;
    }
}
