//! Measures the peak RSS of a streaming scan of `realtime_payments`, to show
//! that memory does not grow with the number of records.
//!
//! ```sh
//! cargo run --release -p paygate-state-store --example scan_memory
//! # PostgreSQL too:
//! PAYGATE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo run --release -p paygate-state-store --example scan_memory
//! ```
//!
//! For each size (10,000 and 100,000 records by default) it seeds a fresh
//! database, then runs the scan alone in a child process and reads that
//! process's peak RSS (`VmHWM` in `/proc/self/status`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a measurement tool

use futures_util::TryStreamExt;
use paygate_core::{MerchantId, OrderId, Partition, PaymentRecord};
use paygate_state_store::{
    testing::{fresh_sql_url, peak_rss_kib, seed_realtime, sql_backends},
    SqlDatabase, SqlStateStore, StateStore,
};

async fn seed(db: &SqlDatabase, n: usize) {
    let merchant = MerchantId::generate();
    let now = paygate_core::time::now_ms();
    seed_realtime(db, n, |i| {
        PaymentRecord::new_pending(
            merchant.clone(),
            OrderId::from_stored(format!("order-{i:08}")),
            format!("pk_{i}"),
            1_000,
            "KRW".into(),
            "fp".into(),
            None,
            now,
        )
    })
    .await;
}

async fn scan_only(url: &str, batch: u32) {
    let db = SqlDatabase::connect(url, 2).await.unwrap();
    let store = SqlStateStore::new(db);
    let started = std::time::Instant::now();
    let mut count = 0u64;
    let mut amount = 0i64;
    let mut stream = store.scan(Partition::Realtime, batch);
    while let Some(r) = stream.try_next().await.unwrap() {
        count += 1;
        amount += r.amount;
    }
    let ms = started.elapsed().as_millis();
    println!("{count} {amount} {ms} {}", peak_rss_kib());
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--scan-only") {
        scan_only(&args[2], args[3].parse().unwrap()).await;
        return;
    }
    let sizes: Vec<usize> = match args.get(1) {
        Some(s) => s.split(',').map(|v| v.parse().unwrap()).collect(),
        None => vec![10_000, 100_000],
    };
    let batch = 500u32;
    println!(
        "{:<9} {:>9} {:>10} {:>12} {:>14}",
        "backend", "records", "scan ms", "records/s", "scan peak RSS"
    );
    for backend in sql_backends() {
        for &n in &sizes {
            let (url, cleanup) = fresh_sql_url(&backend).await;
            let db = SqlDatabase::connect(&url, 2).await.unwrap();
            db.migrate().await.unwrap();
            seed(&db, n).await;
            db.close().await;
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--scan-only", &url, &batch.to_string()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let f: Vec<u64> = text
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            assert_eq!(f[0] as usize, n, "every record scanned");
            let rate = f[0] as f64 / (f[2].max(1) as f64 / 1000.0);
            println!(
                "{:<9} {:>9} {:>10} {:>12.0} {:>11} KiB",
                backend.name(),
                f[0],
                f[2],
                rate,
                f[3]
            );
            cleanup.run().await;
        }
    }
}
