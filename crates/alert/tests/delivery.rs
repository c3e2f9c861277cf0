//! Alert delivery through the outbox to the Discord simulator.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::{sync::Arc, time::Duration};

use paygate_alert::{Alert, AlertReason, Alerter, DiscordClient, OutboxAlerter, SqlOutbox};
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
