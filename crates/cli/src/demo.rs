//! `paygate demo`: the main job, end to end. Starts the sandbox simulators
//! and the real gateway in-process on port 0 (SQLite in a temporary file;
//! with `--state-store mongodb --mongodb-uri URI`, or `PAYGATE_STATE_STORE`
//! and `PAYGATE_MONGODB_URI`, the state records in a fresh MongoDB database
//! `paygate_demo_<run id>` that the demo drops at the end),
//! sends confirms through a real HTTP client (some repeated, some of them
//! concurrently, to exercise idempotency), waits for async ledger retries,
//! then compares the card simulator's approvals with paygate's records.
//!
//! A **lost** approval is one the simulator gave whose payment paygate holds
//! neither as paid nor as `UNKNOWN` in front of an operator (I1). A **double
//! charge** is an order the simulator approved more than once (I2). The exit
//! code is non-zero when either is above zero.

use std::{
    collections::HashMap,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::StreamExt;
use paygate_core::{
    config::StateStoreKind, crypto, CardStatus, Config, MerchantId, OrderId, Secret,
};
use paygate_gateway::Application;
use paygate_sandbox::{FaultProfile, SandboxServers};
use paygate_state_store::{Merchant, MongoOptions, MongoStateStore, SqlMerchantStore};
use serde::Serialize;
use tokio::net::TcpListener;

/// Options of `paygate demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Distinct payments (orders) to confirm.
    #[arg(long, default_value_t = 500)]
    payments: usize,
    /// Confirms in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Fault preset of the sandbox: none or flaky.
    #[arg(long, default_value = "flaky")]
    faults: String,
    /// Seed of the fault rolls.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Approvals the sandbox card company settles late: it answers the
    /// first N confirms it would approve `IN_PROGRESS` and approves them
    /// 1.5 s later, telling paygate by webhook (so they are answered 202
    /// and then settled by the webhook alone).
    #[arg(long, default_value_t = 10)]
    late_approvals: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Where the state records live: `sql` (beside the log, in the temporary
    /// SQLite file) or `mongodb` (a fresh database at `--mongodb-uri`,
    /// dropped at the end; the log, merchants and outbox stay in SQLite).
    #[arg(long, env = "PAYGATE_STATE_STORE", default_value = "sql")]
    state_store: String,
    /// MongoDB connection string, with `--state-store mongodb`.
    #[arg(long, env = "PAYGATE_MONGODB_URI", hide_env_values = true)]
    mongodb_uri: Option<String>,
    /// Run the flash sale instead (issue 17): `--buyers` race for `--units`
    /// with stock holds; exits non-zero if anything is oversold.
    #[arg(long)]
    flash_sale: bool,
    /// Buyers of the flash sale.
    #[arg(long, default_value_t = 2_000)]
    buyers: usize,
    /// Units on sale in the flash sale.
    #[arg(long, default_value_t = 100)]
    units: i64,
}

/// The demo's result; `--json` prints exactly these keys.
#[derive(Debug, Serialize)]
struct Summary {
    sent: u64,
    approved: u64,
    declined: u64,
    unknown: u64,
    saved: u64,
    unsaved: u64,
    sandbox_approvals: u64,
    lost: u64,
    double_charges: u64,
    throughput_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Of the confirms answered 202, how many a card webhook settled.
    unknown_settled_by_webhook: u64,
    /// Median and longest time from the webhook's receipt to its
    /// settlement, ms.
    webhook_settle_p50_ms: f64,
    webhook_settle_max_ms: f64,
}

const DEMO_SECRET: &str = "test_sk_paygate_demo";

/// What one HTTP confirm returned.
struct Sent {
    status: u16,
    payment_id: Option<String>,
    latency: Duration,
}

async fn send(client: &reqwest::Client, url: &str, key: &str, order: &str, amount: i64) -> Sent {
    let started = Instant::now();
    let body = serde_json::json!({"paymentKey": format!("pk_{order}"), "orderId": order, "amount": amount});
    let resp = client.post(url).bearer_auth(key).json(&body).send().await;
    let (status, payment_id) = match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            (
                status,
                v.get("paymentId")
                    .and_then(|p| p.as_str())
                    .map(str::to_owned),
            )
        }
        Err(_) => (0, None),
    };
    Sent {
        status,
        payment_id,
        latency: started.elapsed(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Runs the demo.
///
/// # Errors
/// Setup failures (temporary database, ports); invariant failures are
/// reported through the exit code, not as errors.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.flash_sale {
        return crate::flash_sale::run(crate::flash_sale::FlashSale {
            buyers: args.buyers,
            units: args.units,
            concurrency: args.concurrency,
            faults: args.faults.clone(),
            seed: args.seed,
            json: args.json,
        })
        .await;
    }
    let mut profile = FaultProfile::preset(&args.faults)
        .with_context(|| {
            format!(
                "unknown fault preset {:?}; one of {:?}",
                args.faults,
                FaultProfile::PRESETS
            )
        })?
        .with_seed(args.seed);
    // A dropped answer is held well past the client timeout below.
    profile.drop_hold_ms = 3_000;
    // The demo measures paygate's own I2: the sandbox approves a second
    // confirm of an order under a new key (Toss would refuse it), so any
    // attempted double charge is counted as one.
    profile.approve_duplicate_confirms = true;
    let sandbox = SandboxServers::start(profile, DEMO_SECRET).await?;

    let run_id = ulid::Ulid::new().to_string().to_lowercase();
    let db_path = std::env::temp_dir().join(format!("paygate-demo-{run_id}.db"));
    let mongodb = match (args.state_store.as_str(), &args.mongodb_uri) {
        ("sql", _) => None,
        ("mongodb", Some(uri)) => Some((uri.clone(), format!("paygate_demo_{run_id}"))),
        ("mongodb", None) => {
            anyhow::bail!("--state-store mongodb needs --mongodb-uri (or PAYGATE_MONGODB_URI)")
        }
        (other, _) => anyhow::bail!("unknown state store {other:?}; one of \"sql\", \"mongodb\""),
    };
    let mut config = Config {
        listen: "127.0.0.1:0".to_owned(),
        database_url: Secret::new(format!("sqlite://{}", db_path.display())),
        card_api_url: Some(sandbox.card_url.clone()),
        card_api_secret_key: Some(Secret::new(DEMO_SECRET.to_owned())),
        ledger_api_url: Some(sandbox.ledger_url.clone()),
        card_api_policy: paygate_core::config::DownstreamPolicy {
            attempt_timeout_ms: 1_000,
            ..paygate_core::config::DownstreamPolicy::card_api()
        },
        // The demo drives its own load; the per-merchant limit is for real merchants.
        inbound_rate_limit_per_second: 0,
        ledger_retry_max_attempts: 10,
        ledger_retry_base_delay_ms: 20,
        ledger_retry_max_delay_ms: 500,
        ..Config::default()
    };
    if let Some((uri, database)) = &mongodb {
        config.state_store = StateStoreKind::Mongodb;
        config.mongodb_uri = Some(Secret::new(uri.clone()));
        config.mongodb_database = database.clone();
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let app = Application::build(listener, &config).await?;
    let addr = app.local_addr();
    let saga = app.saga();
    let db = app.database();

    let merchant_id = MerchantId::generate();
    let key = crypto::generate_api_key();
    SqlMerchantStore::new(db.clone())
        .create(
            &Merchant {
                merchant_id: merchant_id.clone(),
                name: "demo".to_owned(),
                api_key_prefix: key
                    .expose()
                    .chars()
                    .take(crypto::API_KEY_DISPLAY_LEN)
                    .collect(),
                created_at: paygate_core::time::now_ms(),
                revoked_at: None,
            },
            &crypto::hash_api_key(&config.api_key_hash_key, key.expose()),
        )
        .await?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stop_rx.await;
    }));

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("http://{addr}/v1/payments/confirm");
    // The sandbox card company tells paygate of its changes, as Toss does
    // (its redelivery schedule a minute to 1 s).
    sandbox
        .card
        .send_webhooks_to(&format!("http://{addr}/v1/webhooks/card"), 60);
    sandbox
        .card
        .approve_later(args.late_approvals, Duration::from_millis(1_500));
    let started = Instant::now();
    let orders: Vec<String> = (0..args.payments)
        .map(|i| format!("demo-{run_id}-{i:06}"))
        .collect();
    let client = Arc::new(client);
    let results: Vec<(String, Vec<Sent>)> = futures_util::stream::iter(orders.iter().enumerate())
        .map(|(i, order)| {
            let client = client.clone();
            let url = url.clone();
            let key = key.expose().clone();
            let order = order.clone();
            async move {
                let amount = 1_000 + (i as i64 % 50) * 100;
                let mut sent = Vec::new();
                if i % 50 == 0 {
                    // Two identical confirms at once: one must win, the other
                    // sees 409 or the replayed outcome.
                    let (a, b) = tokio::join!(
                        send(&client, &url, &key, &order, amount),
                        send(&client, &url, &key, &order, amount)
                    );
                    sent.push(a);
                    sent.push(b);
                } else {
                    sent.push(send(&client, &url, &key, &order, amount).await);
                }
                if i % 10 == 0 {
                    // A client retry after the answer: must replay the same payment.
                    sent.push(send(&client, &url, &key, &order, amount).await);
                }
                (order, sent)
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let elapsed = started.elapsed();

    // Let async ledger retries finish (bounded: they give up by themselves).
    let _ = tokio::time::timeout(Duration::from_secs(60), saga.retries().wait_idle()).await;

    // Let the webhooks' worker finish what it has (bounded).
    let inbox = paygate_api_log::SqlCardInbox::new(db.clone());
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(20) && inbox.open().await.unwrap_or(0) > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let store = saga.store().clone();
    let mut latencies = Vec::new();
    let mut summary = Summary {
        sent: 0,
        approved: 0,
        declined: 0,
        unknown: 0,
        saved: 0,
        unsaved: 0,
        sandbox_approvals: 0,
        lost: 0,
        double_charges: 0,
        throughput_per_s: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        unknown_settled_by_webhook: 0,
        webhook_settle_p50_ms: 0.0,
        webhook_settle_max_ms: 0.0,
    };
    let mut webhook_settles = Vec::new();
    let mut replay_mismatches = 0u64;
    for (order, sent) in &results {
        summary.sent += sent.len() as u64;
        latencies.extend(sent.iter().map(|s| s.latency));
        let ids: Vec<&String> = sent.iter().filter_map(|s| s.payment_id.as_ref()).collect();
        if ids.windows(2).any(|w| w[0] != w[1]) {
            replay_mismatches += 1;
        }
        // The last answer is the settled one (earlier ones may be 409 while a
        // concurrent duplicate was still in flight).
        match sent.last().map(|s| s.status) {
            Some(200) => summary.approved += 1,
            Some(402) => summary.declined += 1,
            Some(202) => {
                summary.unknown += 1;
                // From the approval's (or decline's) webhook to the
                // settlement, which an earlier receipt's retry may make.
                let receipts = inbox.for_order(order).await?;
                let settled_at = receipts
                    .iter()
                    .filter(|r| {
                        r.outcome
                            .as_deref()
                            .is_some_and(|o| o.starts_with("settled_"))
                    })
                    .filter_map(|r| r.done_at)
                    .min();
                let told_at = receipts
                    .iter()
                    .filter(|r| matches!(r.status.as_str(), "DONE" | "ABORTED"))
                    .map(|r| r.received_at)
                    .min();
                if let (Some(settled), Some(told)) = (settled_at, told_at) {
                    summary.unknown_settled_by_webhook += 1;
                    let ms = (settled - told).max(0) as u64;
                    webhook_settles.push(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
    }
    webhook_settles.sort();
    summary.webhook_settle_p50_ms = percentile(&webhook_settles, 0.50);
    summary.webhook_settle_max_ms = percentile(&webhook_settles, 1.0);
    let mut records = HashMap::new();
    for order in &orders {
        let oid = OrderId::parse(order)?;
        if let Some(r) = store.get_by_order(&merchant_id, &oid).await? {
            if r.is_paid {
                if r.is_saved {
                    summary.saved += 1;
                } else {
                    summary.unsaved += 1;
                }
            }
            records.insert(order.clone(), r);
        }
    }
    let card_stats = sandbox.card.stats();
    summary.sandbox_approvals = card_stats.approvals;
    summary.double_charges = card_stats.double_charges;
    summary.lost = sandbox
        .card
        .approvals()
        .iter()
        .filter(|a| match records.get(&a.order_id) {
            Some(r) => !(r.is_paid || r.card_status == CardStatus::Unknown),
            None => true,
        })
        .count() as u64;
    latencies.sort();
    summary.throughput_per_s = summary.sent as f64 / elapsed.as_secs_f64().max(1e-9);
    summary.p50_ms = percentile(&latencies, 0.50);
    summary.p99_ms = percentile(&latencies, 0.99);

    let _ = stop_tx.send(());
    let _ = server.await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db_path.display()));
    }
    if let Some((uri, database)) = &mongodb {
        let options = MongoOptions {
            database: database.clone(),
            ..MongoOptions::default()
        };
        if let Ok(demo_db) = MongoStateStore::connect(uri, &options).await {
            let _ = demo_db.database().drop().await;
        }
    }

    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "paygate demo: {} payments, concurrency {}, faults {:?} (seed {}), state in {}",
            args.payments, args.concurrency, args.faults, args.seed, args.state_store
        );
        println!("  confirms sent        {}", summary.sent);
        println!("  approved             {}", summary.approved);
        println!("  declined             {}", summary.declined);
        println!("  unknown (202)        {}", summary.unknown);
        println!(
            "    settled by webhook {}  (p50 {:.0} ms, max {:.0} ms after the card company's webhook)",
            summary.unknown_settled_by_webhook,
            summary.webhook_settle_p50_ms,
            summary.webhook_settle_max_ms
        );
        println!("  saved in ledger      {}", summary.saved);
        println!(
            "  not yet saved        {}  (left for the batch)",
            summary.unsaved
        );
        println!("  sandbox approvals    {}", summary.sandbox_approvals);
        println!("  LOST approvals       {}", summary.lost);
        println!("  DOUBLE charges       {}", summary.double_charges);
        println!("  replays with another paymentId {}", replay_mismatches);
        println!(
            "  throughput           {:.0} confirms/s",
            summary.throughput_per_s
        );
        println!(
            "  latency p50 / p99    {:.1} ms / {:.1} ms",
            summary.p50_ms, summary.p99_ms
        );
    }
    let ok = summary.lost == 0 && summary.double_charges == 0 && replay_mismatches == 0;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
