//! Confirm benchmarks (issue 8, benchmarks 1-3): the real gateway on a
//! loopback port against the sandbox simulators over HTTP, driven by
//! `--concurrency` clients for `--confirms` confirms.
//!
//! ```sh
//! cargo run --release -p paygate-gateway --example confirm_bench
//! PAYGATE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo run --release -p paygate-gateway --example confirm_bench -- 5000 32
//! #                                                      confirms, concurrency
//! ```
//!
//! 1. Throughput and latency (p50, p99, p99.9) at zero downstream latency, on
//!    SQLite and PostgreSQL.
//! 2. On PostgreSQL: `pgbench` with a one-insert script (same concurrency,
//!    10 s) in a database of its own: the server's single-row commit rate,
//!    and the ratio confirms/s ÷ (commit rate ÷ 3); commits per confirm are
//!    measured from `pg_stat_database.xact_commit` over the confirm run.
//! 3. Gateway overhead: confirm latency minus the simulators' own latency
//!    (card + ledger, each fixed at 1 ms, then 50 ms), p50 and p99.
//! 4. Open loop (issue 18): confirms started on a fixed schedule, 200/s and
//!    500/s for 30 s (`BENCH_OPEN_LOOP_SECS`), card and ledger at 50 ms
//!    each, on SQLite and PostgreSQL: overhead p50/p99/p99.9 beside the
//!    measured latency of one single-row commit on the same database.
//!
//! Commits per confirm: PostgreSQL's `xact_commit` over the run; on SQLite
//! the transactions of the group-commit writer
//! (`PAYGATE_SQLITE_GROUP_COMMIT=off` gives the baseline without it).
//!
//! Prints tables and writes `target/bench/confirm.json`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a measurement tool

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};

use paygate_core::{crypto, Config, MerchantId, Secret};
use paygate_gateway::Application;
use paygate_sandbox::{FaultProfile, SandboxServers};
use paygate_state_store::{
    testing::{fresh_sql_url, sql_backends, Backend, Cleanup},
    Merchant, SqlDatabase, SqlMerchantStore,
};
use serde_json::json;

const SECRET: &str = "test_sk_bench";

struct Run {
    throughput: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    ok: usize,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// A gateway on a fresh database against simulators that answer after
/// `latency_ms` each, with one merchant.
struct Gateway {
    base: String,
    key: String,
    db: SqlDatabase,
    url: String,
    cleanup: Cleanup,
    _sandbox: SandboxServers,
}

async fn start(backend: &Backend, latency_ms: u64) -> Gateway {
    let profile = FaultProfile {
        card_latency_min_ms: latency_ms,
        card_latency_max_ms: latency_ms,
        ledger_latency_min_ms: latency_ms,
        ledger_latency_max_ms: latency_ms,
        ..FaultProfile::none()
    };
    let sandbox = SandboxServers::start(profile, SECRET).await.unwrap();
    let (url, cleanup) = fresh_sql_url(backend).await;
    let config = Config {
        listen: "127.0.0.1:0".into(),
        database_url: Secret::new(url.clone()),
        database_max_connections: 20,
        card_api_url: Some(sandbox.card_url.clone()),
        card_api_secret_key: Some(Secret::new(SECRET.into())),
        ledger_api_url: Some(sandbox.ledger_url.clone()),
        inbound_rate_limit_per_second: 0,
        inbound_max_concurrent: 1024,
        ..Config::default()
    };
    let app = Application::build(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &config,
    )
    .await
    .unwrap();
    let base = format!("http://{}", app.local_addr());
    let db = app.database();
    let key = crypto::generate_api_key();
    SqlMerchantStore::new(db.clone())
        .create(
            &Merchant {
                merchant_id: MerchantId::generate(),
                name: "bench".into(),
                api_key_prefix: key.expose()[..crypto::API_KEY_DISPLAY_LEN].to_owned(),
                created_at: 0,
                revoked_at: None,
            },
            &crypto::hash_api_key(&config.api_key_hash_key, key.expose()),
        )
        .await
        .unwrap();
    tokio::spawn(app.run_until(std::future::pending()));
    Gateway {
        base,
        key: key.expose().clone(),
        db,
        url,
        cleanup,
        _sandbox: sandbox,
    }
}

/// One run: a fresh database, the app, `n` confirms at `c` concurrent clients.
/// Returns the run, the database and the commits it took (PostgreSQL:
/// `xact_commit`; SQLite: the group-commit writer's transactions).
async fn run(
    backend: &Backend,
    latency_ms: u64,
    n: usize,
    c: usize,
) -> (Run, SqlDatabase, i64, Cleanup) {
    let Gateway {
        base,
        key,
        db,
        url,
        cleanup,
        _sandbox,
    } = start(backend, latency_ms).await;
    let commits_before = xact_commit(&db).await;
    let next = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(c)
        .build()
        .unwrap();
    let started = Instant::now();
    let workers: Vec<_> = (0..c)
        .map(|_| {
            let (next, client, base, key) =
                (next.clone(), client.clone(), base.clone(), key.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return lat;
                    }
                    let t = Instant::now();
                    let resp = client
                        .post(format!("{base}/v1/payments/confirm"))
                        .bearer_auth(&key)
                        .json(&json!({"paymentKey": format!("pk_b{i}"), "orderId": format!("bench-{i:08}"), "amount": 1000}))
                        .send()
                        .await
                        .unwrap();
                    if resp.status() == 200 {
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                }
            })
        })
        .collect();
    let mut lat: Vec<f64> = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap());
    }
    let wall = started.elapsed().as_secs_f64();
    // A backend reports its commits to pg_stat_database when it is idle
    // for a while or exits: close the app's pool (the run is over) and read
    // from a fresh connection, or the last second's commits go uncounted.
    let commits = match &db {
        SqlDatabase::Sqlite(_) => xact_commit(&db).await - commits_before,
        // Minus the id the first probe took.
        SqlDatabase::Postgres(_) => xact_commit(&db).await - commits_before - 1,
    };
    let _ = &url;
    lat.sort_by(f64::total_cmp);
    (
        Run {
            throughput: lat.len() as f64 / wall,
            p50: pct(&lat, 0.50),
            p99: pct(&lat, 0.99),
            p999: pct(&lat, 0.999),
            ok: lat.len(),
        },
        db,
        commits,
        cleanup,
    )
}

/// Durable commits so far. PostgreSQL: the transaction id counter, which
/// only a transaction that writes advances (`xact_commit` counts every
/// autocommit SELECT too; the probe itself takes one id, subtracted by the
/// caller's difference of two probes). On SQLite: the transactions of the
/// group-commit writer (0 without one).
async fn xact_commit(db: &SqlDatabase) -> i64 {
    match db {
        SqlDatabase::Postgres(pool) => sqlx::query_scalar::<_, i64>("SELECT txid_current()")
            .fetch_one(pool)
            .await
            .unwrap(),
        SqlDatabase::Sqlite(s) => s.writer().map_or(0, |w| w.committed().0 as i64),
    }
}

/// The floor of a confirm's latency: one single-row `INSERT` committed
/// alone, `n` times in a row on one connection of `db` (no concurrency),
/// p50 and p99 in ms.
async fn commit_latency(db: &SqlDatabase, n: usize) -> (f64, f64) {
    let create = "CREATE TABLE IF NOT EXISTS bench_commit_probe (id BIGINT PRIMARY KEY, created_at BIGINT NOT NULL)";
    let insert = "INSERT INTO bench_commit_probe (id, created_at) VALUES ($1, $2)";
    let mut lat = Vec::with_capacity(n);
    paygate_state_store::with_pool!(db, pool => {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(create).execute(&mut *conn).await.unwrap();
        for i in 0..n {
            let t = Instant::now();
            sqlx::query(insert)
                .bind(i as i64)
                .bind(i as i64)
                .execute(&mut *conn)
                .await
                .unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    });
    lat.sort_by(f64::total_cmp);
    (pct(&lat, 0.50), pct(&lat, 0.99))
}

/// Open loop: confirms started on a fixed schedule, `rate` a second for
/// `secs` s, whether or not earlier ones have finished (a closed loop
/// slows its own arrivals when the gateway slows and hides the queue).
/// Latency counts from the scheduled start. Returns p50, p99, p99.9 in
/// ms, the confirms answered 200 and those that were not.
async fn open_loop(gw: &Gateway, rate: u64, secs: u64) -> (f64, f64, f64, usize, usize) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2_048)
        .build()
        .unwrap();
    let total = rate * secs;
    let period = std::time::Duration::from_nanos(1_000_000_000 / rate);
    let begin = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    let tag = paygate_core::time::now_ms();
    for i in 0..total {
        let at = begin + period * i as u32;
        tokio::time::sleep_until(at).await;
        let (client, base, key) = (client.clone(), gw.base.clone(), gw.key.clone());
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(format!("{base}/v1/payments/confirm"))
                .bearer_auth(&key)
                .json(&json!({"paymentKey": format!("pk_o{tag}_{i}"), "orderId": format!("open-{tag}-{i:08}"), "amount": 1000}))
                .send()
                .await;
            let ok = matches!(&resp, Ok(r) if r.status() == 200);
            (ok, at.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let (mut lat, mut failed) = (Vec::with_capacity(tasks.len()), 0);
    for t in tasks {
        match t.await.unwrap() {
            (true, ms) => lat.push(ms),
            (false, _) => failed += 1,
        }
    }
    lat.sort_by(f64::total_cmp);
    (
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        lat.len(),
        failed,
    )
}

/// `pgbench` with a one-insert script (`INSERT INTO one_insert ...`, one
/// single-row commit per transaction) at `c` clients for 10 s, in a
/// database of its own: the server's single-row commit rate (tps).
fn pgbench(admin_url: &str, c: usize) -> Option<f64> {
    let db = format!("paygate_pgbench_{}", std::process::id());
    let (host, user) = ("127.0.0.1", "postgres");
    let user = url_user(admin_url).unwrap_or(user.to_owned());
    let psql = |database: &str, sql: &str| {
        std::process::Command::new("psql")
            .args(["-h", host, "-U", &user, "-d", database, "-qc", sql])
            .status()
            .ok()
            .filter(|s| s.success())
    };
    psql("test", &format!("CREATE DATABASE {db}"))?;
    let script = std::env::temp_dir().join(format!("{db}.sql"));
    std::fs::write(
        &script,
        "INSERT INTO one_insert (payment_id, created_at) VALUES ('pay_bench', 1);\n",
    )
    .ok()?;
    let made = psql(
        &db,
        "CREATE TABLE one_insert (id BIGSERIAL PRIMARY KEY, payment_id TEXT NOT NULL, created_at BIGINT NOT NULL)",
    );
    let out = made.map(|_| {
        std::process::Command::new("pgbench")
            .args(["-h", host, "-U", &user, "-n", "-f"])
            .arg(&script)
            .args(["-c", &c.to_string(), "-j", "2", "-T", "10", &db])
            .output()
            .ok()
    });
    psql(
        "test",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    );
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out??.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("tps ="))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
}

fn url_user(url: &str) -> Option<String> {
    let rest = url.split("://").nth(1)?;
    let userinfo = rest.split('@').next().filter(|_| rest.contains('@'))?;
    Some(userinfo.split(':').next()?.to_owned())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(5_000, |v| v.parse().unwrap());
    let c: usize = args.get(2).map_or(32, |v| v.parse().unwrap());
    let mut out = serde_json::Map::new();

    println!("1. confirm throughput at zero downstream latency ({n} confirms, concurrency {c})");
    println!(
        "{:<9} {:>8} {:>12} {:>9} {:>9} {:>10}",
        "backend", "ok", "confirms/s", "p50 ms", "p99 ms", "p99.9 ms"
    );
    let mut pg_run = None;
    for backend in sql_backends() {
        let (r, db, commits, cleanup) = run(&backend, 0, n, c).await;
        println!(
            "{:<9} {:>8} {:>12.0} {:>9.2} {:>9.2} {:>10.2}",
            backend.name(),
            r.ok,
            r.throughput,
            r.p50,
            r.p99,
            r.p999
        );
        out.insert(
            format!("throughput_{}", backend.name()),
            json!({"confirms": r.ok, "confirms_per_s": r.throughput, "p50_ms": r.p50, "p99_ms": r.p99, "p999_ms": r.p999, "concurrency": c}),
        );
        if let Backend::Postgres(url) = &backend {
            pg_run = Some((url.clone(), r, commits));
        } else {
            let per_confirm = commits as f64 / r.ok.max(1) as f64;
            println!("          SQLite: {per_confirm:.3} group commits per confirm (the writer's transactions; 3 writes each, shared)");
            out.insert(
                "commits_sqlite".into(),
                json!({"group_commits_per_confirm": per_confirm}),
            );
        }
        db.close().await;
        cleanup.run().await;
    }

    if let Some((url, r, commits)) = pg_run {
        let per_confirm = commits as f64 / r.ok.max(1) as f64;
        println!("durable commits per confirm {per_confirm:.2} (write transactions: txid_current() over the run; reads take no transaction id)");
        out.insert(
            "commits".into(),
            json!({"durable_commits_per_confirm": per_confirm}),
        );
        println!("\n2. PostgreSQL against pgbench (one single-row INSERT per transaction, {c} clients, 10 s)");
        match pgbench(&url, c) {
            Some(tps) => {
                // The target: confirms/s >= 0.8 x (single-row commit rate / 3).
                let ratio = r.throughput / (tps / 3.0);
                println!("single-row commits/s {tps:.0}; paygate commits per confirm {per_confirm:.2} (measured); confirms/s {:.0}; ratio to commits/s / 3: {ratio:.2}", r.throughput);
                out.insert(
                    "pgbench".into(),
                    json!({"one_insert_commits_per_s": tps, "commits_per_confirm": per_confirm, "confirms_per_s": r.throughput, "ratio_to_rate_over_3": ratio, "p50_ms": r.p50, "p99_ms": r.p99, "p999_ms": r.p999, "concurrency": c}),
                );
            }
            None => println!("pgbench did not run (is it installed?)"),
        }
    } else {
        println!("\n2. skipped: set PAYGATE_TEST_POSTGRES_URL for the PostgreSQL and pgbench runs");
    }

    println!("\n3. gateway overhead: confirm latency minus the simulators' (card + ledger) latency, SQLite");
    println!(
        "{:>11} {:>10} {:>12} {:>12}",
        "downstream", "sim ms", "overhead p50", "overhead p99"
    );
    for latency in [1_u64, 50] {
        let (r, db, _, cleanup) = run(&Backend::Sqlite, latency, n.min(2_000), c).await;
        let sim = 2.0 * latency as f64;
        println!(
            "{:>9}ms {:>10.0} {:>10.2}ms {:>10.2}ms",
            latency,
            sim,
            r.p50 - sim,
            r.p99 - sim
        );
        out.insert(
            format!("overhead_{latency}ms"),
            json!({"downstream_ms_each": latency, "sim_ms": sim, "overhead_p50_ms": r.p50 - sim, "overhead_p99_ms": r.p99 - sim}),
        );
        db.close().await;
        cleanup.run().await;
    }
    let secs: u64 = std::env::var("BENCH_OPEN_LOOP_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    println!("\n4. open loop: confirms started at a fixed rate for {secs} s, card and ledger 50 ms each; overhead = latency - 100 ms; the floor is one commit's latency (a confirm needs 3)");
    println!(
        "{:<9} {:>6} {:>8} {:>7} {:>13} {:>13} {:>15} {:>15} {:>15}",
        "backend",
        "rate/s",
        "ok",
        "failed",
        "overhead p50",
        "overhead p99",
        "overhead p99.9",
        "1 commit p50",
        "1 commit p99"
    );
    for backend in sql_backends() {
        for rate in [200_u64, 500] {
            let gw = start(&backend, 50).await;
            let (c50, c99) = commit_latency(&gw.db, 500).await;
            let (p50, p99, p999, ok, failed) = open_loop(&gw, rate, secs).await;
            let sim = 100.0;
            println!(
                "{:<9} {:>6} {:>8} {:>7} {:>11.2}ms {:>11.2}ms {:>13.2}ms {:>13.3}ms {:>13.3}ms",
                backend.name(),
                rate,
                ok,
                failed,
                p50 - sim,
                p99 - sim,
                p999 - sim,
                c50,
                c99
            );
            out.insert(
                format!("open_loop_{}_{rate}", backend.name()),
                json!({"rate_per_s": rate, "secs": secs, "ok": ok, "failed": failed, "sim_ms": sim, "overhead_p50_ms": p50 - sim, "overhead_p99_ms": p99 - sim, "overhead_p999_ms": p999 - sim, "one_commit_p50_ms": c50, "one_commit_p99_ms": c99}),
            );
            gw.db.close().await;
            gw.cleanup.run().await;
        }
    }
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write(
        "target/bench/confirm.json",
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
    println!("\nwrote target/bench/confirm.json");
}
