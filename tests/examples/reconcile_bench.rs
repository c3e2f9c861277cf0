//! Benchmark of the reconciliation (issue 6, acceptance 3): 100,000 sandbox
//! transactions at 50 ms page latency, limit 1,000, every one matching a
//! paid paygate record. Reports wall time against the bound
//! `ceil(pages / slice concurrency) * page latency` and the run's peak RSS.
//!
//! ```sh
//! cargo run --release -p paygate-e2e --example reconcile_bench
//! cargo run --release -p paygate-e2e --example reconcile_bench -- 100000 50 8x8,16x16
//! #                                          transactions, page latency ms, slices x concurrency
//! PAYGATE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo run --release -p paygate-e2e --example reconcile_bench   # PostgreSQL too
//! ```
//!
//! The simulator and the seeding run in this process; each reconciliation
//! runs in a fresh child process over HTTP, so its peak RSS and CPU time
//! (`cpu ms`, user + system) are its own. The database server's CPU is not
//! in `cpu ms`; on a 2-core machine it competes with the run. On
//! PostgreSQL, `rows/tx` is the server's own count of payment rows the run
//! read (`pg_stat_user_tables`), per transaction of the list. Writes
//! `target/bench/reconcile.json`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a measurement tool

use paygate_core::{CardStatus, Config, MerchantId, OrderId, PaymentRecord, Secret};

use paygate_reconcile::{ReconcileOptions, Reconciler};
use paygate_sandbox::{generated_approvals, FaultProfile, SandboxServers};
use paygate_state_store::{
    testing::{fresh_sql_url, peak_rss_kib, seed_realtime, sql_backends},
    SqlDatabase,
};

const SECRET: &str = "test_sk_bench";
const PAGE_SIZE: u32 = 1_000;

/// The child: one reconciliation, printing
/// `transactions pages matched failures wall_ms peak_rss_kib`.
async fn reconcile_only(args: &[String]) {
    let (url, card, ledger) = (&args[2], &args[3], &args[4]);
    let (from, to): (i64, i64) = (args[5].parse().unwrap(), args[6].parse().unwrap());
    let (slices, concurrency): (u32, usize) = (args[7].parse().unwrap(), args[8].parse().unwrap());
    let config = Config {
        database_url: Secret::new(url.clone()),
        card_api_url: Some(card.clone()),
        card_api_secret_key: Some(Secret::new(SECRET.into())),
        ledger_api_url: Some(ledger.clone()),
        ..Config::default()
    };
    let (c, _sandbox) = paygate_gateway::components(&config).await.unwrap();
    let r = Reconciler::new(c.store.clone(), c.saga.clone(), c.db.clone());
    let opts = ReconcileOptions {
        page_size: PAGE_SIZE,
        slices,
        slice_concurrency: concurrency,
        ..ReconcileOptions::window(from, to)
    };
    let started = std::time::Instant::now();
    let s = r.run(&opts).await.unwrap();
    let wall = started.elapsed().as_millis();
    println!(
        "{} {} {} {} {} {} {}",
        s.transactions,
        s.pages,
        s.matched,
        s.failures,
        wall,
        peak_rss_kib(),
        cpu_ms()
    );
}

/// Payment rows PostgreSQL has read from the three partitions so far
/// (sequential scans plus index fetches, `pg_stat_user_tables`); `None` on
/// SQLite, which keeps no such count.
async fn rows_read(url: &str) -> Option<i64> {
    let db = SqlDatabase::connect(url, 1).await.unwrap();
    let n = match &db {
        SqlDatabase::Postgres(pool) => Some(
            sqlx::query_scalar::<_, i64>(
                "SELECT COALESCE(SUM(COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0)), 0)::BIGINT \
                 FROM pg_stat_user_tables \
                 WHERE relname IN ('realtime_payments', 'completed_payments', 'unpaid_payments')",
            )
            .fetch_one(pool)
            .await
            .unwrap(),
        ),
        SqlDatabase::Sqlite(_) => None,
    };
    db.close().await;
    n
}

/// CPU time of this process (user + system), ms, from `/proc/self/stat`
/// (clock ticks of 10 ms); 0 where unknown.
fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<u64> = after_comm
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    (f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0)) * 10
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--reconcile-only") {
        reconcile_only(&args).await;
        return;
    }
    let n: usize = args.get(1).map_or(100_000, |v| v.parse().unwrap());
    let latency: u64 = args.get(2).map_or(50, |v| v.parse().unwrap());
    let configs: Vec<(u32, usize)> = args
        .get(3)
        .map_or("4x4,8x8,16x16,32x32", String::as_str)
        .split(',')
        .map(|c| {
            let (s, k) = c.split_once('x').unwrap();
            (s.parse().unwrap(), k.parse().unwrap())
        })
        .collect();
    let profile = FaultProfile {
        page_latency_ms: latency,
        ..FaultProfile::none()
    };
    let sandbox = SandboxServers::start(profile, SECRET).await.unwrap();
    let now = paygate_core::time::now_ms();
    let (from, to) = (now - 86_400_000, now);
    let approvals: Vec<_> = generated_approvals(n, from, to).collect();
    sandbox.card.seed_approvals(approvals.clone());
    println!(
        "{n} transactions over 24 h, page latency {latency} ms, limit {PAGE_SIZE}; bound = ceil(pages / concurrency) x {latency} ms"
    );
    println!(
        "{:<9} {:>7} {:>6} {:>9} {:>8} {:>8} {:>7} {:>13} {:>7} {:>10}",
        "backend",
        "slices",
        "pages",
        "matched",
        "wall ms",
        "bound ms",
        "ratio",
        "peak RSS",
        "cpu ms",
        "rows/tx"
    );
    let mut rows = Vec::new();
    for backend in sql_backends() {
        let (url, cleanup) = fresh_sql_url(&backend).await;
        let db = SqlDatabase::connect(&url, 2).await.unwrap();
        db.migrate().await.unwrap();
        let merchant = MerchantId::generate();
        seed_realtime(&db, n, |i| {
            let a = &approvals[i];
            let mut r = PaymentRecord::new_pending(
                merchant.clone(),
                OrderId::from_stored(a.order_id.clone()),
                a.payment_key.clone(),
                a.amount,
                "KRW".into(),
                "fp".into(),
                None,
                a.at_ms,
            );
            r.is_paid = true;
            r.is_saved = true;
            r.card_status = CardStatus::Done;
            r.approved_at = Some(paygate_core::time::kst_rfc3339_from_ms(a.at_ms));
            r
        })
        .await;
        db.close().await;
        for &(slices, concurrency) in &configs {
            let read_before = rows_read(&url).await;
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .arg("--reconcile-only")
                .args([&url, &sandbox.card_url, &sandbox.ledger_url])
                .args([from.to_string(), to.to_string()])
                .args([slices.to_string(), concurrency.to_string()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let f: Vec<u64> = text
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            assert_eq!(
                f.len(),
                7,
                "child output: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (txs, pages, matched, failures, wall, rss, cpu) =
                (f[0], f[1], f[2], f[3], f[4], f[5], f[6]);
            assert_eq!(txs as usize, n, "every transaction read");
            assert_eq!(failures, 0);
            let bound = pages.div_ceil(concurrency as u64) * latency;
            // PostgreSQL's own count of the payment rows the run read, per
            // transaction of the list (the child's connections are closed, so
            // its statistics are flushed; give the server a moment).
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let rows_per_tx = match (read_before, rows_read(&url).await) {
                (Some(a), Some(b)) => Some((b - a) as f64 / txs.max(1) as f64),
                _ => None,
            };
            println!(
                "{:<9} {:>7} {:>6} {:>9} {:>8} {:>8} {:>6.2}x {:>9} KiB {:>7} {:>10}",
                backend.name(),
                format!("{slices}x{concurrency}"),
                pages,
                matched,
                wall,
                bound,
                wall as f64 / bound.max(1) as f64,
                rss,
                cpu,
                rows_per_tx.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))
            );
            rows.push(
                serde_json::json!({"backend": backend.name(), "slices": slices,
                "slice_concurrency": concurrency, "transactions": txs, "pages": pages,
                "matched": matched, "wall_ms": wall, "bound_ms": bound,
                "ratio": wall as f64 / bound.max(1) as f64, "peak_rss_kib": rss, "cpu_ms": cpu,
                "rows_read_per_transaction": rows_per_tx}),
            );
        }
        cleanup.run().await;
    }
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write(
        "target/bench/reconcile.json",
        serde_json::to_string_pretty(&rows).unwrap(),
    )
    .unwrap();
    println!("wrote target/bench/reconcile.json");
}
