//! `paygate-simulation`: runs seeds of the deterministic simulation and
//! prints a summary (or `--json`: one object with `seeds`, `violations`,
//! `first_failing_seed`, `duration_ms`). Exit code 1 when any history broke
//! an invariant.
//!
//! ```text
//! cargo run --release -p paygate-simulation -- --seeds 10000
//! cargo run --release -p paygate-simulation -- --seed 4242      # replay one
//! cargo run --release -p paygate-simulation -- --seed 4242 --trace   # with paygate's logs
//! cargo run --release -p paygate-simulation -- --seeds 1000 --from 5000 --json
//! cargo run --release -p paygate-simulation -- --store sqlite --seeds 200
//! cargo run --release -p paygate-simulation -- --store mongo --mongo-uri mongodb://127.0.0.1:27117 --seeds 100
//! ```
//!
//! `--store memory|sqlite|mongo` picks the state store (default memory, or
//! `PAYGATE_SIM_STORE`); `mongo` reads its URI from `--mongo-uri`, else
//! `PAYGATE_SIM_MONGODB_URI`, else `PAYGATE_TEST_MONGODB_URI`.

use std::{process::ExitCode, time::Instant};

fn arg(args: &[String], name: &str) -> Option<u64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn text_arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let mode = match text_arg(&args, "--store") {
        Some(name) => paygate_simulation::StoreMode::parse(name, text_arg(&args, "--mongo-uri")),
        None => paygate_simulation::StoreMode::from_env(),
    };
    let mode = match mode {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.iter().any(|a| a == "--json");
    let verbose = args.iter().any(|a| a == "--verbose");
    if args.iter().any(|a| a == "--trace") {
        // paygate's own logs of the replayed history (RUST_LOG filters).
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let (from, count) = match arg(&args, "--seed") {
        Some(seed) => (seed, 1),
        None => (
            arg(&args, "--from").unwrap_or(0),
            arg(&args, "--seeds").unwrap_or(1_000),
        ),
    };
    let started = Instant::now();
    let (mut violations, mut failing, mut first_failing) = (0usize, 0u64, None);
    for seed in from..from.saturating_add(count) {
        if !json {
            eprintln!("PAYGATE_SIM_SEED={seed}");
        }
        let report = match paygate_simulation::run_seed_on(seed, &mode) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("seed {seed}: could not run: {e}");
                return ExitCode::FAILURE;
            }
        };
        if verbose && !json {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        }
        if !report.violations.is_empty() {
            violations += report.violations.len();
            failing += 1;
            first_failing.get_or_insert(seed);
            if !json {
                for v in &report.violations {
                    println!("seed {seed}: {} {}: {}", v.invariant, v.subject, v.detail);
                }
                let store = match &mode {
                    paygate_simulation::StoreMode::Memory => String::new(),
                    m => format!(" --store {}", m.name()),
                };
                println!(
                    "replay: cargo run --release -p paygate-simulation -- --seed {seed}{store}"
                );
            }
        }
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "seeds": count,
                "from": from,
                "store": mode.name(),
                "violations": violations,
                "failing_seeds": failing,
                "first_failing_seed": first_failing,
                "duration_ms": duration_ms,
            })
        );
    } else {
        println!(
            "{count} seeds from {from} on {}: {failing} failing, {violations} violations, {duration_ms} ms",
            mode.name()
        );
    }
    if violations > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
