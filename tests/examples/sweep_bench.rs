//! Benchmark of the batch sweep: records/s and peak RSS over a large
//! `realtime_payments` (default 1,000,000 records), to show that memory does
//! not grow with the count.
//!
//! ```sh
//! cargo run --release -p paygate-e2e --example sweep_bench            # 100k and 1M, SQLite
//! cargo run --release -p paygate-e2e --example sweep_bench -- 200000  # other sizes, comma-separated
//! PAYGATE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo run --release -p paygate-e2e --example sweep_bench          # PostgreSQL too
//! ```
//!
//! Every record is paid and saved, so the sweep moves each one from
//! `realtime_payments` to `completed_payments`: set-based, 1,000 records a
//! transaction (`SWEEP_MOVE_CHUNK=0` gives the per-record baseline, one
//! transaction each). The
//! sweep runs in a child process, so its peak RSS is the sweep's alone.
//! Writes `target/bench/sweep.json`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a measurement tool

use std::time::Duration;

use paygate_batch::{SweepOptions, Sweeper};
use paygate_core::{CardStatus, Config, MerchantId, OrderId, PaymentRecord, Secret};

use paygate_state_store::{
    testing::{fresh_sql_url, peak_rss_kib, seed_realtime, sql_backends},
    SqlDatabase,
};

async fn sweep_only(url: &str) {
    let config = Config {
        database_url: Secret::new(url.to_owned()),
        ..Config::default()
    };
    let (c, _sandbox) = paygate_gateway::components(&config).await.unwrap();
    let sweeper = Sweeper::new(c.store.clone(), c.saga.clone(), c.db.clone());
    let opts = SweepOptions {
        grace: Duration::ZERO,
        concurrency: 8,
        lease_ttl: Duration::from_secs(600),
        move_chunk: std::env::var("SWEEP_MOVE_CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(SweepOptions::default().move_chunk),
        ..SweepOptions::default()
    };
    let s = sweeper.sweep(&opts).await.unwrap();
    println!(
        "{} {} {} {}",
        s.scanned,
        s.completed,
        s.duration_ms,
        peak_rss_kib()
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--sweep-only") {
        sweep_only(&args[2]).await;
        return;
    }
    let sizes: Vec<usize> = match args.get(1) {
        Some(s) => s.split(',').map(|v| v.parse().unwrap()).collect(),
        None => vec![100_000, 1_000_000],
    };
    println!(
        "{:<9} {:>9} {:>10} {:>10} {:>12} {:>15}",
        "backend", "records", "completed", "sweep ms", "records/s", "sweep peak RSS"
    );
    let mut rows = Vec::new();
    for backend in sql_backends() {
        for &n in &sizes {
            let (url, cleanup) = fresh_sql_url(&backend).await;
            let db = SqlDatabase::connect(&url, 2).await.unwrap();
            db.migrate().await.unwrap();
            let merchant = MerchantId::generate();
            let long_ago = paygate_core::time::now_ms() - 3_600_000;
            seed_realtime(&db, n, |i| {
                let mut r = PaymentRecord::new_pending(
                    merchant.clone(),
                    OrderId::from_stored(format!("order-{i:08}")),
                    format!("pk_{i}"),
                    1_000,
                    "KRW".into(),
                    "fp".into(),
                    None,
                    long_ago,
                );
                r.is_paid = true;
                r.is_saved = true;
                r.card_status = CardStatus::Done;
                r
            })
            .await;
            db.close().await;
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--sweep-only", &url])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let f: Vec<u64> = text
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            assert_eq!(
                f.len(),
                4,
                "sweep output: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(f[1] as usize, n, "every record completed");
            let rate = f[1] as f64 / (f[2].max(1) as f64 / 1000.0);
            println!(
                "{:<9} {:>9} {:>10} {:>10} {:>12.0} {:>11} KiB",
                backend.name(),
                n,
                f[1],
                f[2],
                rate,
                f[3]
            );
            rows.push(
                serde_json::json!({"backend": backend.name(), "records": n, "completed": f[1],
                "sweep_ms": f[2], "records_per_s": rate, "peak_rss_kib": f[3]}),
            );
            cleanup.run().await;
        }
    }
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write(
        "target/bench/sweep.json",
        serde_json::to_string_pretty(&rows).unwrap(),
    )
    .unwrap();
    println!("wrote target/bench/sweep.json");
}
