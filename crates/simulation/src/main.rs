//! `paygate-simulation`: runs seeds of the deterministic simulation and
//! prints a summary (or `--json`: one object with `seeds`, `from`,
//! `store`, `replicas`, `violations`, `failing_seeds`,
//! `first_failing_seed`, `duration_ms`). Exit code 1 when any history
//! broke an invariant, 2 on a usage error.
//!
//! ```text
//! cargo run --release -p paygate-simulation -- --seeds 10000
//! cargo run --release -p paygate-simulation -- --seed 4242              # replay one
//! cargo run --release -p paygate-simulation -- --seed 4242 --trace      # with paygate's logs
//! cargo run --release -p paygate-simulation -- --seeds 1000 --from 5000 --json
//! cargo run --release -p paygate-simulation -- --seeds 1000 --replicas 3
//! cargo run --release -p paygate-simulation -- --store sqlite --seeds 200
//! cargo run --release -p paygate-simulation -- --store mongo --mongo-uri mongodb://127.0.0.1:27117 --seeds 100
//! ```

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Parser;

/// Runs seeded histories of every paygate actor and checks the invariants
/// after each (one seed is one history, replayed exactly in memory).
#[derive(Parser, Debug)]
#[command(name = "paygate-simulation", version)]
struct Args {
    /// How many seeds to run, from `--from`.
    #[arg(long, default_value_t = 1_000, conflicts_with = "seed")]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0, conflicts_with = "seed")]
    from: u64,
    /// Replay this one seed (prints `PAYGATE_SIM_SEED=<n>` first).
    #[arg(long)]
    seed: Option<u64>,
    /// Gateway replicas serving at once (1-3); default: drawn per seed.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
    replicas: Option<u8>,
    /// The state store: `memory` (exact replay), `sqlite` (a fresh file
    /// per history) or `mongo` (a fresh database per history).
    #[arg(long, env = "PAYGATE_SIM_STORE", default_value = "memory")]
    store: String,
    /// MongoDB for `--store mongo` (else `PAYGATE_SIM_MONGODB_URI`, else
    /// `PAYGATE_TEST_MONGODB_URI`).
    #[arg(long)]
    mongo_uri: Option<String>,
    /// One JSON summary on stdout, nothing else.
    #[arg(long)]
    json: bool,
    /// Print each history's report (JSON, one per line).
    #[arg(long)]
    verbose: bool,
    /// paygate's own logs of the histories on stderr (`RUST_LOG` filters).
    #[arg(long)]
    trace: bool,
}

/// A progress line on stderr at most this often on long runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args = Args::parse();
    let mode = match paygate_simulation::StoreMode::parse(&args.store, args.mongo_uri.as_deref()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.trace {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let (from, count) = match args.seed {
        Some(seed) => (seed, 1),
        None => (args.from, args.seeds),
    };
    let replicas = args.replicas.map(usize::from);
    let started = Instant::now();
    let mut last_progress = started;
    let (mut violations, mut failing, mut first_failing) = (0usize, 0u64, None);
    let mut by_replicas = [0u64; 3];
    for (done, seed) in (from..from.saturating_add(count)).enumerate() {
        if args.seed.is_some() && !args.json {
            eprintln!("PAYGATE_SIM_SEED={seed}");
        }
        let report = match paygate_simulation::run_seed_with(seed, &mode, replicas) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("seed {seed}: could not run: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(n) = by_replicas.get_mut(report.options.replicas.saturating_sub(1)) {
            *n += 1;
        }
        if args.verbose && !args.json {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        }
        if !report.violations.is_empty() {
            violations += report.violations.len();
            failing += 1;
            first_failing.get_or_insert(seed);
            if !args.json {
                for v in &report.violations {
                    println!("seed {seed}: {} {}: {}", v.invariant, v.subject, v.detail);
                }
                let store = match &mode {
                    paygate_simulation::StoreMode::Memory => String::new(),
                    m => format!(" --store {}", m.name()),
                };
                let forced = replicas
                    .map(|n| format!(" --replicas {n}"))
                    .unwrap_or_default();
                println!(
                    "replay: cargo run --release -p paygate-simulation -- --seed {seed}{store}{forced}"
                );
            }
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let done = done as u64 + 1;
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "progress: {done}/{count} seeds ({:.0}/s), {failing} failing, {violations} violations",
                rate
            );
        }
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "seeds": count,
                "from": from,
                "store": mode.name(),
                "replicas": {"1": by_replicas[0], "2": by_replicas[1], "3": by_replicas[2]},
                "violations": violations,
                "failing_seeds": failing,
                "first_failing_seed": first_failing,
                "duration_ms": duration_ms,
            })
        );
    } else {
        println!(
            "{count} seeds from {from} on {} (replicas 1/2/3: {}/{}/{}): {failing} failing, {violations} violations, {duration_ms} ms",
            mode.name(),
            by_replicas[0],
            by_replicas[1],
            by_replicas[2]
        );
    }
    if violations > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
