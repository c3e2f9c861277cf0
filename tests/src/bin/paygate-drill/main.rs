//! `paygate-drill`: the failover drill. It runs the shipped binary the way
//! production does and judges every answer the merchants got against the
//! card company's and the ledger's own records and the database:
//!
//! 1. starts `paygate sim` (flaky faults; a second confirm of an order is
//!    approved, so an attempted double charge shows as a second approval), a
//!    fake Discord webhook, `paygate migrate`, and N `paygate serve`
//!    replicas on one database (`PAYGATE_MIGRATE_ON_START=false`: they only
//!    check the schema);
//! 2. for the load time: merchants confirm, hold and cancel at random
//!    replicas ([`load`]); a nemesis kills (SIGKILL), stops (SIGTERM) and
//!    restarts replicas and terminates the database connections under load
//!    (`pg_terminate_backend`); `paygate batch --once` runs in a loop and one
//!    `paygate reconcile` in the middle; the stock is sampled from the
//!    database;
//! 3. heals: every replica up, the batch until it finds no work, the
//!    reconciliation of the window, the batch again, every order read back;
//! 4. prints one line per check ([`checks`]) and exits 1 when one fails.
//!
//! `--mode postgres` keeps everything in PostgreSQL; `--mode mongodb` keeps
//! the state records (payments, cancels, holds) in MongoDB and the log,
//! merchants, outbox and leases in PostgreSQL. `--seconds`/`--minutes` set
//! the load time (a soak: `--minutes 30`).

mod checks;
mod cluster;
mod load;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;
use paygate_core::{config::StateStoreKind, Config, MerchantId, Secret};
use sqlx::{Connection, Executor};

use crate::{
    cluster::{Cluster, Stop},
    load::{Load, Rng},
};

/// The drill's command line.
#[derive(Parser, Debug)]
#[command(
    name = "paygate-drill",
    about = "Failover drill: paygate serve replicas, paygate sim, a nemesis, then checks of every answer against the card company's, the ledger's and the database's records"
)]
struct Args {
    /// Where the state records live: `postgres` (everything in PostgreSQL)
    /// or `mongodb` (payments, cancels and holds in MongoDB; the log,
    /// merchants, outbox and leases in PostgreSQL).
    #[arg(long, value_enum, default_value_t = Mode::Postgres)]
    mode: Mode,
    /// A PostgreSQL URL (any database on the server): the drill creates a
    /// database of its own there and drops it after a passing run.
    #[arg(long, env = "PAYGATE_TEST_POSTGRES_URL")]
    postgres_url: String,
    /// The MongoDB URI for `--mode mongodb`.
    #[arg(long, env = "PAYGATE_TEST_MONGODB_RS_URI")]
    mongodb_uri: Option<String>,
    /// Load time in seconds.
    #[arg(long, default_value_t = 60, conflicts_with = "minutes")]
    seconds: u64,
    /// Load time in minutes (a soak).
    #[arg(long)]
    minutes: Option<u64>,
    /// Merchant workers confirming (and holding) orders.
    #[arg(long, default_value_t = 28)]
    merchants: u64,
    /// Workers cancelling approved payments.
    #[arg(long, default_value_t = 4)]
    cancellers: u64,
    /// `paygate serve` replicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=9))]
    replicas: u64,
    /// Units of the held SKU (little, so holds race for it).
    #[arg(long, default_value_t = 20)]
    stock: i64,
    /// Seed of the workers' and the nemesis' choices and of the simulator's
    /// faults (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds between two nemesis actions (at random up to twice this).
    #[arg(long, default_value_t = 4)]
    nemesis_every: u64,
    /// Keep the database and the logs after a passing run too.
    #[arg(long)]
    keep: bool,
    /// The `paygate` binary (default: `paygate-under-test` or `paygate`
    /// beside this program).
    #[arg(long)]
    paygate: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Postgres,
    Mongodb,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(drill(args))
}

fn find_paygate(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("this program's directory")?;
    for name in ["paygate-under-test", "paygate"] {
        let p = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "no paygate binary beside {} (build it: cargo build -p paygate-e2e --bins, or pass --paygate)",
        exe.display()
    )
}

/// `url` with its database replaced by `db` (and the query kept).
fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").context("a postgres:// URL")? + 3;
    let base = match head[scheme_end..].find('/') {
        Some(slash) => &head[..scheme_end + slash],
        None => head,
    };
    Ok(match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    })
}

async fn drill(args: Args) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let load_time = Duration::from_secs(args.minutes.map_or(args.seconds, |m| m * 60));
    let mode = match args.mode {
        Mode::Postgres => "postgres",
        Mode::Mongodb => "mongodb",
    };
    let run = format!("{:x}", seed % 0xFFFF_FFFF);
    println!(
        "drill: {mode}, {} s of load, {} replicas, {} merchants + {} cancellers, seed {seed} (replay the choices: --seed {seed})",
        load_time.as_secs(), args.replicas, args.merchants, args.cancellers
    );
    let bin = find_paygate(args.paygate.clone())?;
    let work = std::env::temp_dir().join(format!("paygate-drill-{run}"));
    std::fs::create_dir_all(&work)?;
    println!("drill: logs in {}", work.display());

    // A database of its own.
    let db_name = format!("paygate_drill_{run}");
    let mut admin = sqlx::PgConnection::connect(&args.postgres_url)
        .await
        .context("connecting to PostgreSQL (--postgres-url)")?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)").as_str())
        .await?;
    admin
        .execute(format!("CREATE DATABASE {db_name}").as_str())
        .await?;
    let db_url = with_database(&args.postgres_url, &db_name)?;

    let outcome = drill_on(
        &args,
        seed,
        &run,
        load_time,
        &bin,
        &work,
        mode,
        (&db_url, &db_name),
    )
    .await;
    let passed = matches!(outcome, Ok(true));
    if passed && !args.keep {
        admin
            .execute(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)").as_str())
            .await?;
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!(
            "drill: kept database {db_name} and the logs in {}",
            work.display()
        );
    }
    match outcome {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => Ok(ExitCode::FAILURE),
        Err(e) => Err(e),
    }
}

#[allow(clippy::too_many_arguments)] // the drill's whole setup, once
async fn drill_on(
    args: &Args,
    seed: u64,
    run: &str,
    load_time: Duration,
    bin: &std::path::Path,
    work: &std::path::Path,
    mode: &str,
    (db_url, db_name): (&str, &str),
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let (_sim, card_url, ledger_url) = cluster::start_sim(bin, seed, work)?;
    let discord = paygate_sandbox::discord::DiscordSim::new(5, Duration::from_secs(2));
    let (discord_url, _discord_task) = paygate_sandbox::serve_discord(
        discord.clone(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    )?;

    let mongo_database = format!("paygate_drill_{run}");
    let mut env: Vec<(String, String)> = vec![
        ("PAYGATE_DATABASE_URL", db_url.to_owned()),
        ("PAYGATE_MIGRATE_ON_START", "false".into()),
        ("PAYGATE_CARD_API_URL", card_url.clone()),
        (
            "PAYGATE_CARD_API_SECRET_KEY",
            paygate_e2e::SIM_SECRET.into(),
        ),
        ("PAYGATE_LEDGER_API_URL", ledger_url.clone()),
        ("PAYGATE_DISCORD_WEBHOOK_URL", discord_url),
        (
            "PAYGATE_API_KEY_HASH_KEY",
            format!("drill-hash-key-{run}-0123456789abcdef"),
        ),
        ("PAYGATE_INBOUND_RATE_LIMIT_PER_SECOND", "0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut config = Config {
        database_url: Secret::new(format!(
            "{db_url}{}application_name=paygate-drill",
            if db_url.contains('?') { '&' } else { '?' }
        )),
        migrate_on_start: false,
        ..Config::default()
    };
    if mode == "mongodb" {
        let uri = args
            .mongodb_uri
            .clone()
            .context("--mode mongodb needs --mongodb-uri (or PAYGATE_TEST_MONGODB_RS_URI)")?;
        env.push(("PAYGATE_STATE_STORE".into(), "mongodb".into()));
        env.push(("PAYGATE_MONGODB_URI".into(), uri.clone()));
        env.push(("PAYGATE_MONGODB_DATABASE".into(), mongo_database.clone()));
        config.state_store = StateStoreKind::Mongodb;
        config.mongodb_uri = Some(Secret::new(uri));
        config.mongodb_database = mongo_database;
    }
    let cluster = Arc::new(Cluster::new(
        bin.to_owned(),
        env,
        work.to_owned(),
        args.replicas as usize,
    )?);

    // Migrations are one step, before any replica.
    cluster.run_ok(&["migrate"])?;
    let created = cluster.run_ok(&["merchants", "create", "drill-merchant"])?;
    let field = |name: &str| {
        created
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("`merchants create` printed no {name}"))
    };
    let (merchant_id, api_key) = (field("merchant_id:")?, field("api_key:")?);
    cluster.start_all()?;
    let db = paygate_payments::wiring::open_database(&config, 4).await?;
    let (store, inventory) = paygate_payments::wiring::stores(&config, &db).await?;
    let merchant = MerchantId::from_stored(merchant_id.clone());

    let http = load::client()?;
    let spec: serde_json::Value = http
        .get(format!("{}/openapi.json", cluster.base(0)))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let sku = "drill-sku";
    let stocked = http
        .put(format!("{}/v1/inventory/{sku}", cluster.base(0)))
        .bearer_auth(&api_key)
        .json(&serde_json::json!({ "stock": args.stock }))
        .send()
        .await?;
    if !stocked.status().is_success() {
        bail!("PUT /v1/inventory/{sku} answered {}", stocked.status());
    }

    // The load, the nemesis, the batch loop, the reconciliation, the sampler.
    let deadline = Instant::now() + load_time;
    let load = Load::new(
        cluster.clone(),
        api_key.clone(),
        run.to_owned(),
        sku.to_owned(),
        deadline,
    );
    let merchants: Vec<_> = (0..args.merchants)
        .map(|w| tokio::spawn(load.clone().merchant(w, seed)))
        .collect();
    let cancellers: Vec<_> = (0..args.cancellers)
        .map(|w| tokio::spawn(load.clone().canceller(w, seed)))
        .collect();
    let restocker = tokio::spawn(load.clone().restocker(seed));
    let calm = Arc::new(AtomicBool::new(false));
    let nemesis = {
        let (cluster, calm, db_name) = (cluster.clone(), calm.clone(), db_name.to_owned());
        let admin_url = config.database_url.expose().clone();
        let every = args.nemesis_every.max(1);
        tokio::spawn(nemesis(
            cluster,
            calm,
            seed,
            every,
            admin_url,
            db_name,
            work.to_owned(),
        ))
    };
    let batches = Arc::new(BatchCounts::default());
    let batch_loop = {
        let (cluster, calm, batches) = (cluster.clone(), calm.clone(), batches.clone());
        tokio::spawn(async move {
            while !calm.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let c = cluster.clone();
                let out = tokio::task::spawn_blocking(move || {
                    c.run(&["batch", "--once", "--grace", "2s", "--json"])
                })
                .await;
                batches.count(matches!(out, Ok(Ok(ref o)) if o.status.success()));
            }
        })
    };
    let reconcile_mid = {
        let cluster = cluster.clone();
        let half = load_time / 2;
        tokio::spawn(async move {
            tokio::time::sleep(half).await;
            tokio::task::spawn_blocking(move || {
                cluster.run(&["reconcile", "--from", "30m", "--json"])
            })
            .await
            .ok()
            .and_then(Result::ok)
            .map(|o| o.status.success())
        })
    };
    let samples: Arc<Mutex<Vec<checks::StockSample>>> = Arc::default();
    let sampler = {
        let (inventory, merchant, calm, samples) = (
            inventory.clone(),
            merchant.clone(),
            calm.clone(),
            samples.clone(),
        );
        tokio::spawn(async move {
            while !calm.load(Ordering::SeqCst) {
                let now = paygate_core::time::now_ms();
                if let Ok(Some(level)) = inventory.level(&merchant, sku, now).await {
                    if let Ok(mut s) = samples.lock() {
                        s.push(checks::StockSample::of(&level));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    for m in merchants {
        m.await?;
    }
    load.finish();
    restocker.await?;
    for c in cancellers {
        c.await?;
    }
    calm.store(true, Ordering::SeqCst);
    let nemesis_counts = nemesis.await??;
    batch_loop.await?;
    sampler.await?;
    let reconciled_mid = reconcile_mid.await?;
    println!(
        "drill: load done after {} s: {} orders, {} answers; nemesis: {nemesis_counts}; batch runs {} ({} exited non-zero); mid-load reconciliation {}",
        started.elapsed().as_secs(),
        load.orders().len(),
        load.answers().len(),
        batches.runs.load(Ordering::SeqCst),
        batches.failed.load(Ordering::SeqCst),
        match reconciled_mid {
            Some(true) => "exited 0",
            Some(false) => "exited non-zero",
            None => "did not run (load ended first)",
        }
    );

    // Heal.
    cluster.start_all()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let quiet_1 = batch_until_quiet(&cluster).await?;
    let window = format!("{}s", started.elapsed().as_secs() + 120);
    let c = cluster.clone();
    let reconciled = tokio::task::spawn_blocking(move || {
        c.run_ok(&[
            "reconcile",
            "--from",
            &window,
            "--stale-after",
            "0s",
            "--json",
        ])
    })
    .await??;
    let quiet_2 = batch_until_quiet(&cluster).await?;
    println!(
        "drill: healed: batch {quiet_1} runs, reconciliation {}, batch {quiet_2} runs",
        reconciled.trim()
    );
    let read_back = load.read_back(seed).await?;
    println!("drill: read back {read_back} orders");
    let level_end = inventory
        .level(&merchant, sku, paygate_core::time::now_ms())
        .await?
        .context("the drill's SKU has no level")?;
    if let Ok(mut s) = samples.lock() {
        s.push(checks::StockSample::of(&level_end));
    }

    let facts = checks::Facts::gather(checks::Sources {
        cluster: &cluster,
        http: &http,
        card_url: &card_url,
        ledger_url: &ledger_url,
        store: store.as_ref(),
        spec: &spec,
        answers: load.answers(),
        orders: load.orders(),
        samples: samples.lock().map(|s| s.clone()).unwrap_or_default(),
        discord: discord.received(),
    })
    .await?;
    let results = checks::run(&facts);
    let failed = results.iter().filter(|c| !c.ok).count();
    for c in &results {
        println!(
            "{} {}: {}",
            if c.ok { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    println!(
        "drill: {} checks, {failed} failed ({mode}, {} s in all)",
        results.len(),
        started.elapsed().as_secs()
    );
    cluster.stop_all()?;
    Ok(failed == 0)
}

/// Batch runs during the load.
#[derive(Default)]
struct BatchCounts {
    runs: AtomicU64,
    failed: AtomicU64,
}

impl BatchCounts {
    fn count(&self, ok: bool) {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if !ok {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// `paygate batch --once --grace 0s` until a run finds no work (at most 12
/// runs); returns how many ran.
async fn batch_until_quiet(cluster: &Arc<Cluster>) -> anyhow::Result<usize> {
    for n in 1..=12 {
        let c = cluster.clone();
        let out = tokio::task::spawn_blocking(move || {
            c.run_ok(&["batch", "--once", "--grace", "0s", "--json"])
        })
        .await??;
        let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let work: u64 = [
            "completed",
            "unpaid",
            "settled",
            "retried",
            "saved",
            "holds_sold",
            "holds_released",
        ]
        .iter()
        .filter_map(|k| s[*k].as_u64())
        .sum();
        if work == 0 {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(12)
}

/// The nemesis: every `every`..2×`every` seconds, one of: SIGKILL a replica
/// and restart it 0.2-1.5 s later; SIGTERM a replica, wait for its exit,
/// restart it; terminate every database connection of paygate's processes
/// (`pg_terminate_backend`; the drill's own, named `paygate-drill`, are
/// spared). Returns what it did.
async fn nemesis(
    cluster: Arc<Cluster>,
    calm: Arc<AtomicBool>,
    seed: u64,
    every: u64,
    admin_url: String,
    db_name: String,
    work: PathBuf,
) -> anyhow::Result<String> {
    let mut rng = Rng::new(seed ^ 0x4E4E);
    let (mut kills, mut terms, mut cuts, mut cut_conns) = (0, 0, 0, 0);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join("nemesis.log"))?;
    let t0 = Instant::now();
    while !calm.load(Ordering::SeqCst) {
        tokio::time::sleep(rng.ms(every * 1000, every * 2000)).await;
        if calm.load(Ordering::SeqCst) {
            break;
        }
        let victim = rng.below(cluster.len() as u64) as usize;
        let action = rng.below(10);
        let what = if action < 4 {
            kills += 1;
            let pause = rng.ms(200, 1500);
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                c.stop(victim, Stop::Kill)?;
                std::thread::sleep(pause);
                c.start(victim)
            })
            .await??;
            format!(
                "kill -9 replica {victim}, restarted after {} ms",
                pause.as_millis()
            )
        } else if action < 7 {
            terms += 1;
            let c = cluster.clone();
            let (stopped, up) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let t = Instant::now();
                c.stop(victim, Stop::Term)?;
                let stopped = t.elapsed();
                c.start(victim)?;
                Ok((stopped, t.elapsed()))
            })
            .await??;
            format!(
                "SIGTERM replica {victim}: exited after {} ms, listening again after {} ms",
                stopped.as_millis(),
                up.as_millis()
            )
        } else {
            cuts += 1;
            let mut conn = sqlx::PgConnection::connect(&admin_url).await?;
            let n: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid() \
                 AND application_name <> 'paygate-drill'",
            )
            .bind(&db_name)
            .fetch_one(&mut conn)
            .await?;
            cut_conns += n;
            format!("pg_terminate_backend: {n} connections")
        };
        use std::io::Write;
        let _ = writeln!(log, "{:>8} ms  {what}", t0.elapsed().as_millis());
    }
    Ok(format!(
        "{kills} kill -9, {terms} SIGTERM, {cuts} connection cuts ({cut_conns} connections)"
    ))
}
