//! Outage tests (issue 8): the real gateway under load while a downstream is
//! down for a window — the ledger, the card API (5xx), PostgreSQL (every
//! connection of the test's database cut, again and again), Discord (429s)
//! — then recovery, the batch, and the invariant checker: zero lost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::{sync::Arc, time::Duration};

use paygate_alert::SqlOutbox;
use paygate_batch::{SweepOptions, Sweeper};
use paygate_core::{config::DownstreamPolicy, Config, Secret};
use paygate_gateway::{Application, Saga};
use paygate_reconcile::check::{check, CardApproval, CheckReport};
use paygate_sandbox::{DiscordSim, FaultProfile, SandboxServers};
use paygate_state_store::{
    testing::{e2e_backends, fresh_e2e, Backend, Cleanup, E2eBackend},
    SqlDatabase,
};

const SECRET: &str = "test_sk_outage";

struct Gateway {
    base: String,
    key: String,
    sandbox: SandboxServers,
    db: SqlDatabase,
    saga: Arc<Saga>,
    alerter: Arc<paygate_gateway::OutboxAlerter>,
    stop: tokio::sync::oneshot::Sender<()>,
    cleanup: Cleanup,
}

/// Short breaker waits so recovery is seen within the test.
fn quick(p: DownstreamPolicy) -> DownstreamPolicy {
    DownstreamPolicy {
        attempt_timeout_ms: 2_000,
        deadline_ms: 6_000,
        breaker_wait_duration_in_open_ms: 300,
        breaker_minimum_number_of_calls: 5,
        ..p
    }
}

async fn start<B: Clone + Into<E2eBackend>>(backend: &B, discord: Option<String>) -> Gateway {
    // Measures paygate's own I2: a second approval would show (see helpers).
    let profile = FaultProfile::none().with_duplicate_confirms_approved(true);
    let sandbox = SandboxServers::start(profile, SECRET).await.unwrap();
    let (stores, cleanup) = fresh_e2e(&backend.clone().into()).await;
    let config = Config {
        listen: "127.0.0.1:0".into(),
        card_api_url: Some(sandbox.card_url.clone()),
        card_api_secret_key: Some(Secret::new(SECRET.into())),
        ledger_api_url: Some(sandbox.ledger_url.clone()),
        card_api_policy: quick(DownstreamPolicy::card_api()),
        ledger_api_policy: quick(DownstreamPolicy::ledger_api()),
        ledger_retry_base_delay_ms: 20,
        ledger_retry_max_delay_ms: 100,
        inbound_rate_limit_per_second: 0,
        discord_webhook_url: discord.map(Secret::new),
        ..stores.config()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = Application::build(listener, &config).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    let (db, saga, alerter) = (app.database(), app.saga(), app.alerter());
    let key = paygate_e2e::merchant_key(&db, &config.api_key_hash_key, "outage").await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    Gateway {
        base,
        key,
        sandbox,
        db,
        saga,
        alerter,
        stop,
        cleanup,
    }
}

impl Gateway {
    /// `n` confirms at once for orders `{prefix}-{i}`; their statuses.
    async fn confirms(&self, prefix: &str, n: usize) -> Vec<u16> {
        let client = reqwest::Client::new();
        let calls = (0..n).map(|i| {
            let client = client.clone();
            let (base, key) = (self.base.clone(), self.key.clone());
            let order = format!("{prefix}-{i:04}");
            async move {
                client
                    .post(format!("{base}/v1/payments/confirm"))
                    .bearer_auth(key)
                    .json(&serde_json::json!({"paymentKey": format!("pk_{order}"), "orderId": order, "amount": 1000}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        });
        futures_util::future::join_all(calls).await
    }

    /// After recovery: async retries finish, then the batch sweeps (twice: a
    /// settled payment is saved by the second), then the checker.
    async fn recover_and_check(self) -> CheckReport {
        tokio::time::timeout(Duration::from_secs(30), self.saga.retries().wait_idle())
            .await
            .unwrap();
        let store = self.saga.store().clone();
        let sweeper = Sweeper::new(store.clone(), self.saga.clone(), self.db.clone());
        let opts = SweepOptions {
            grace: Duration::ZERO,
            ..SweepOptions::default()
        };
        for _ in 0..2 {
            sweeper.sweep(&opts).await.unwrap();
        }
        let approvals: Vec<CardApproval> = self
            .sandbox
            .card
            .approvals()
            .into_iter()
            .map(|a| CardApproval {
                order_id: a.order_id,
                payment_key: a.payment_key,
                canceled_amount: a.canceled_amount,
            })
            .collect();
        let report = check(store.as_ref(), &SqlOutbox::new(self.db.clone()), &approvals)
            .await
            .unwrap();
        let _ = self.stop.send(());
        self.cleanup.run().await;
        report
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_down_for_a_window() {
    for backend in e2e_backends() {
        let g = start(&backend, None).await;
        assert!(g.confirms("before", 20).await.iter().all(|s| *s == 200));
        g.sandbox.ledger.set_down(true);
        let during = g.confirms("during", 40).await;
        assert!(
            during.iter().all(|s| *s == 200),
            "{during:?}: approved, saved or not"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        g.sandbox.ledger.set_down(false);
        assert!(g.confirms("after", 20).await.iter().all(|s| *s == 200));
        let r = g.recover_and_check().await;
        assert_eq!(
            (r.approvals, r.lost, r.double_charges),
            (80, 0, 0),
            "{}: {r:?}",
            backend.name()
        );
        assert_eq!(
            r.completed,
            80,
            "{}: the batch saved every one: {r:?}",
            backend.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_api_answering_5xx_for_a_window() {
    for backend in e2e_backends() {
        let g = start(&backend, None).await;
        g.confirms("before", 20).await;
        g.sandbox.card.set_down(true);
        let during = g.confirms("during", 40).await;
        assert!(
            during.iter().all(|s| matches!(*s, 202 | 503)),
            "unknown or refused, never approved or errored: {during:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        g.sandbox.card.set_down(false);
        tokio::time::sleep(Duration::from_millis(400)).await; // the breaker's wait in open
                                                              // The breaker half-opens with a few probes: a merchant retries its 503s.
        let mut after = g.confirms("after", 20).await;
        for _ in 0..20 {
            if after.iter().all(|s| *s == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            after = g.confirms("after", 20).await;
        }
        assert!(after.iter().all(|s| *s == 200), "{after:?}");
        let r = g.recover_and_check().await;
        // The card company never saw the confirms of the outage. Each one
        // answered 503 charged nothing; each one answered 202 (its answer
        // unknown) is confirmed again inside the card company's confirm
        // window once the card is back, and approved.
        let unknown = during.iter().filter(|s| **s == 202).count() as u64;
        assert_eq!(
            (r.approvals, r.lost, r.double_charges),
            (40 + unknown, 0, 0),
            "{}: {r:?}",
            backend.name()
        );
    }
}

/// PostgreSQL only, so it is ignored by default rather than passing without
/// running; `.ci/run` runs it with `--ignored` (it fails without the URL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set PAYGATE_TEST_POSTGRES_URL and run with --ignored (.ci/run does)"]
async fn postgres_connections_cut_again_and_again_mid_load() {
    let admin_url = std::env::var("PAYGATE_TEST_POSTGRES_URL").expect(
        "this test needs PAYGATE_TEST_POSTGRES_URL (a PostgreSQL it may cut connections on)",
    );
    let backend = Backend::Postgres(admin_url.clone());
    let g = start(&backend, None).await;
    // The app's connections carry the test schema as application_name.
    let app_name: String = match &g.db {
        SqlDatabase::Postgres(pool) => {
            sqlx::query_scalar("SELECT current_setting('application_name')")
                .fetch_one(pool)
                .await
                .unwrap()
        }
        SqlDatabase::Sqlite(_) => unreachable!(),
    };
    let admin = SqlDatabase::connect(&admin_url, 1).await.unwrap();
    let cutter = {
        let admin = admin.clone();
        tokio::spawn(async move {
            // What a restart looks like to the app: every connection dies, for ~1.5 s.
            let mut killed = 0_i64;
            for _ in 0..15 {
                if let SqlDatabase::Postgres(pool) = &admin {
                    killed += sqlx::query_scalar::<_, i64>(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                    )
                    .bind(&app_name)
                    .fetch_one(pool)
                    .await
                    .unwrap_or(0);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            killed
        })
    };
    let statuses = g.confirms("pgcut", 80).await;
    let killed = cutter.await.unwrap();
    assert!(killed > 0, "connections were cut");
    assert!(
        statuses.iter().all(|s| matches!(*s, 200 | 202 | 503)),
        "{statuses:?}"
    );
    let r = g.recover_and_check().await;
    eprintln!("postgres cut {killed} connections; {r:?}");
    assert_eq!((r.lost, r.double_charges), (0, 0), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_answering_429s_delays_alerts_but_loses_none() {
    let backend = Backend::Sqlite;
    // Two messages per 2 s: a burst of alerts meets 429s.
    let discord = DiscordSim::new(2, Duration::from_secs(2));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (webhook, _server) = paygate_sandbox::serve_discord(discord.clone(), listener).unwrap();
    let g = start(&backend, Some(webhook.clone())).await;
    // Another service shares the webhook and spends its budget, so paygate's
    // sender meets 429s however well it paces itself.
    let neighbour = tokio::spawn(async move {
        let client = reqwest::Client::new();
        for i in 0..30 {
            let _ = client
                .post(&webhook)
                .json(&serde_json::json!({"content": format!("neighbour {i}")}))
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    g.sandbox.card.set_down(true);
    let during = g.confirms("alerting", 6).await;
    assert!(during.iter().all(|s| matches!(*s, 202 | 503)), "{during:?}");
    g.sandbox.card.set_down(false);
    let outbox = SqlOutbox::new(g.db.clone());
    let raised = outbox.all().await.unwrap().len();
    assert!(raised > 0, "the outage raised alerts");
    // Keep flushing (the server's sender does this every 5 s) until all are out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while outbox.unsent_count().await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alerts stuck in the outbox"
        );
        g.alerter.flush().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    neighbour.await.unwrap();
    let stats = discord.stats();
    assert!(stats.rate_limited > 0, "Discord answered 429: {stats:?}");
    let raised = outbox.all().await.unwrap().len();
    let received = discord.received();
    let unique: std::collections::HashSet<String> = received
        .iter()
        .map(|m| m.to_string())
        .filter(|m| !m.contains("neighbour"))
        .collect();
    assert_eq!(unique.len(), raised, "every alert delivered: {received:#?}");
    let r = g.recover_and_check().await;
    assert_eq!((r.lost, r.double_charges), (0, 0), "{r:?}");
}
