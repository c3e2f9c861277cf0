//! `paygate reconcile`: match paygate's records against the card company's
//! transaction list for a window (default: the last 24 h) — once, or on a
//! stable interval (`--every 1h`). `--dry-run` prints the plan and changes
//! nothing; `--json` prints each summary as one JSON object with the keys
//! `transactions, pages, matched, recovered, cancelled, alerts, failures,
//! duration_ms` (a dry run's plan then goes to stderr).
//!
//! With `--every`, each run covers the window of the same length ending at
//! its start (a run at 10:00 with `--from 24h` covers 10:00 yesterday to now).
//!
//! Exit code (single run): 0 when the window was reconciled (per-record
//! failures are counted, not fatal), 1 when a slice of the list could not be
//! fetched or the run could not start, 2 when another run holds the lease.
//!
//! A single run shows its progress on stderr (slices of the window done,
//! pages, transactions, rate, ETA): a bar on a terminal, a `progress:` log
//! line every `--progress-every` (5 s) otherwise. `--every` prints when the
//! next run starts, in the `time_zone` setting's zone and in UTC.

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use paygate_reconcile::{Action, ReconcileError, ReconcileOptions, Reconciler, Summary};

use crate::progress::{Reporter, Units};

/// Options of `paygate reconcile`.
#[derive(clap::Args, Debug)]
pub struct ReconcileArgs {
    /// Window start: RFC 3339 (`2026-11-20T00:00:00+09:00`) or a duration
    /// ago (`24h`).
    #[arg(long, default_value = "24h")]
    from: String,
    /// Window end (exclusive): RFC 3339, a duration ago, or `now`.
    #[arg(long, default_value = "now")]
    to: String,
    /// Print the plan; change nothing, make no call but the list's pages.
    #[arg(long)]
    dry_run: bool,
    /// Run every DURATION (e.g. `1h`): the next run starts no sooner than
    /// DURATION after the previous start, never overlapping.
    #[arg(long, value_parser = humantime::parse_duration)]
    every: Option<Duration>,
    /// Print each summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Transactions per page (the card API's `limit`, at most 5000).
    #[arg(long, default_value_t = 1_000)]
    page_size: u32,
    /// Slices the window is cut into.
    #[arg(long, default_value_t = 8)]
    slices: u32,
    /// Slices fetched at once.
    #[arg(long, default_value_t = 4)]
    slice_concurrency: usize,
    /// Most orderIds per store query.
    #[arg(long, default_value_t = 500)]
    lookup_chunk: usize,
    /// Not-paid records older than this are settled by lookup.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    stale_after: Duration,
    /// Stale lookups at once.
    #[arg(long, default_value_t = 10)]
    stale_concurrency: usize,
    /// When stderr is not a terminal, log a progress line this often.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    progress_every: Duration,
}

/// Parses `now`, a duration ago, or RFC 3339, into epoch ms.
fn parse_time(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    if s == "now" {
        return Ok(now_ms);
    }
    if let Some(ms) = paygate_core::time::ms_from_rfc3339(s) {
        return Ok(ms);
    }
    let ago = humantime::parse_duration(s)
        .with_context(|| format!("{s:?} is neither RFC 3339, a duration ago, nor `now`"))?;
    Ok(now_ms - ago.as_millis() as i64)
}

fn options(
    args: &ReconcileArgs,
    recheck: paygate_payments::RecheckSchedule,
) -> anyhow::Result<ReconcileOptions> {
    let now = paygate_core::time::now_ms();
    let from = parse_time(&args.from, now).context("--from")?;
    let to = parse_time(&args.to, now).context("--to")?;
    let opts = ReconcileOptions {
        page_size: args.page_size,
        slices: args.slices,
        slice_concurrency: args.slice_concurrency,
        lookup_chunk: args.lookup_chunk,
        stale_after: args.stale_after,
        stale_concurrency: args.stale_concurrency,
        dry_run: args.dry_run,
        recheck,
        ..ReconcileOptions::window(from, to)
    };
    opts.validate()?;
    Ok(opts)
}

fn print(summary: &Summary, json: bool, dry_run: bool) {
    if json {
        if let Ok(s) = serde_json::to_string(summary) {
            println!("{s}");
        }
        return;
    }
    let plan = if dry_run {
        " (dry run: what it would do)"
    } else {
        ""
    };
    println!(
        "reconcile{plan}: transactions {} | pages {} | matched {} | recovered {} | cancelled {} | alerts {} | failures {} | {} ms",
        summary.transactions, summary.pages, summary.matched, summary.recovered, summary.cancelled,
        summary.alerts, summary.failures, summary.duration_ms
    );
}

/// Runs the command.
///
/// # Errors
/// Setup failures (config, database) and bad options.
pub async fn run(config: paygate_core::Config, args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    let recheck = paygate_payments::wiring::recheck_schedule(&config);
    options(&args, recheck)?;
    let (components, _sandbox) = paygate_gateway::components(&config).await?;
    let json = args.json;
    let zone = crate::ops::zone(&config);
    let progress = Arc::new(paygate_batch::Progress::default());
    let mut reconciler = Reconciler::new(
        components.store.clone(),
        components.saga.clone(),
        components.db.clone(),
    )
    .with_progress(progress.clone());
    if args.dry_run {
        reconciler = reconciler.with_sink(Arc::new(move |a: &Action| {
            if json {
                eprintln!("plan: {a}");
            } else {
                println!("plan: {a}");
            }
        }));
    }
    let once = || async {
        let result = match options(&args, recheck) {
            Ok(opts) => reconciler.run(&opts).await,
            Err(e) => Err(ReconcileError::Invalid(e.to_string())),
        };
        // Deliver what this run raised, and anything older still unsent.
        let _ = components.alerter.flush().await;
        result
    };
    let Some(every) = args.every else {
        let reporter = Reporter::start(progress.clone(), Units::Slices, args.progress_every);
        let result = once().await;
        reporter.finish().await;
        return Ok(match result {
            Ok(summary) => {
                print(&summary, json, args.dry_run);
                if summary.incomplete_slices > 0 {
                    eprintln!(
                        "{} slice(s) of the window could not be fetched: not fully reconciled",
                        summary.incomplete_slices
                    );
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(ReconcileError::LeaseHeld {
                owner,
                expires_in_ms,
            }) => {
                eprintln!("lease held by {owner} (expires in {expires_in_ms} ms); another reconciliation is running");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("reconciliation failed: {e}");
                ExitCode::FAILURE
            }
        });
    };
    paygate_batch::schedule::every(every, crate::shutdown_signal(), || async {
        let started = paygate_core::time::now_ms();
        match once().await {
            Ok(summary) => print(&summary, json, args.dry_run),
            Err(e) => tracing::error!(error = %e, "reconciliation did not run"),
        }
        let next = started + i64::try_from(every.as_millis()).unwrap_or(i64::MAX / 2);
        crate::batch::print_next(&crate::batch::next_run_text(next, zone), json);
    })
    .await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn times_are_rfc3339_durations_ago_or_now() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_time("now", now).unwrap(), now);
        assert_eq!(parse_time("24h", now).unwrap(), now - 86_400_000);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", now).unwrap(),
            1_700_000_000_000
        );
        assert!(parse_time("yesterday-ish", now).is_err());
    }
}
