//! `paygate batch`: the batch sweep as a sidecar job — once (default), on a
//! stable interval (`--every 10m`), or on a seconds-resolution cron schedule
//! (`--cron "0 0 4 * * *"`, the default when `--cron` has no value: daily at
//! 04:00 in the operators' time zone, `time_zone`, `Asia/Seoul` by default,
//! as the seed's Spring `@Scheduled` ran in the server's Korean zone).
//! Scheduled runs print when the next one starts, in that zone and in UTC.
//!
//! A single run shows its progress on stderr: a bar on a terminal, a
//! `progress:` log line every `--progress-every` (5 s) otherwise.
//!
//! Exit code: 0 when the sweep ran (per-record failures are counted in the
//! summary, not fatal), 2 when another sweep holds the lease, 1 when it
//! could not run (store down, lease lost).

use std::{process::ExitCode, str::FromStr, sync::Arc, time::Duration};

use anyhow::Context;
use paygate_batch::{BatchError, Progress, Summary, SweepOptions, Sweeper};

use crate::progress::{Reporter, Units};

/// Options of `paygate batch`.
#[derive(clap::Args, Debug)]
pub struct BatchArgs {
    /// Run one sweep and exit (the default).
    #[arg(long, conflicts_with_all = ["every", "cron"])]
    once: bool,
    /// Run a sweep every DURATION (e.g. `10m`); the next starts no sooner
    /// than DURATION after the previous start, never overlapping.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "cron")]
    every: Option<Duration>,
    /// Run on a cron schedule with seconds (`sec min hour day month
    /// weekday`) read in the `time_zone` setting's zone (Asia/Seoul by
    /// default); without a value, daily at 04:00 there.
    #[arg(long, num_args = 0..=1, default_missing_value = "0 0 4 * * *")]
    cron: Option<String>,
    /// When stderr is not a terminal, log a progress line this often.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    progress_every: Duration,
    /// Classify and print the plan; change nothing, call nothing.
    #[arg(long)]
    dry_run: bool,
    /// Leave records younger than this alone.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    grace: Duration,
    /// Records handled at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Ledger failures in the batch before "ledger save failed" is raised.
    #[arg(long, default_value_t = 5)]
    alert_threshold: i64,
    /// Print each summary as one JSON object.
    #[arg(long)]
    json: bool,
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
        "batch sweep{plan}: scanned {} | completed {} | unpaid {} | settled {} | ledger retried {} saved {} | alerts {} | failures {} | {} ms",
        summary.scanned, summary.completed, summary.unpaid, summary.settled, summary.retried, summary.saved,
        summary.alerts, summary.failures, summary.duration_ms
    );
}

/// Runs the command.
///
/// # Errors
/// Setup failures (config, database) and an invalid cron expression.
pub async fn run(config: paygate_core::Config, args: BatchArgs) -> anyhow::Result<ExitCode> {
    let schedule = match &args.cron {
        Some(expr) => Some(
            cron::Schedule::from_str(expr)
                .with_context(|| format!("invalid --cron expression {expr:?}"))?,
        ),
        None => None,
    };
    let zone = crate::ops::zone(&config);
    let (components, _sandbox) = paygate_gateway::components(&config).await?;
    let progress = Arc::new(Progress::default());
    let sweeper = Sweeper::new(
        components.store.clone(),
        components.saga.clone(),
        components.db.clone(),
    )
    .with_progress(progress.clone());
    let opts = SweepOptions {
        grace: args.grace,
        dry_run: args.dry_run,
        concurrency: args.concurrency,
        ledger_alert_threshold: args.alert_threshold,
        recheck: paygate_payments::wiring::recheck_schedule(&config),
        ..SweepOptions::default()
    };
    let once = || async {
        let result = sweeper.sweep(&opts).await;
        // Deliver what this sweep raised, and anything older still unsent.
        // Bounded (`paygate_alert::DEFAULT_FLUSH_BUDGET`): a Discord that
        // refuses or rate-limits for ever cannot hold the run or its shutdown.
        let _ = components.alerter.flush().await;
        result
    };
    if args.every.is_none() && schedule.is_none() {
        // The bar's total: one COUNT(*) where the records are in SQL.
        if config.state_store == paygate_core::config::StateStoreKind::Sql {
            match paygate_state_store::SqlStateStore::new(components.db.clone())
                .count(paygate_core::Partition::Realtime)
                .await
            {
                Ok(n) => progress.set_total(u64::try_from(n).unwrap_or(0)),
                Err(e) => tracing::debug!(error = %e, "no record count for the progress bar"),
            }
        }
        let reporter = Reporter::start(progress.clone(), Units::Records, args.progress_every);
        let result = once().await;
        reporter.finish().await;
        return Ok(match result {
            Ok(summary) => {
                print(&summary, args.json, args.dry_run);
                ExitCode::SUCCESS
            }
            Err(BatchError::LeaseHeld {
                owner,
                expires_in_ms,
            }) => {
                eprintln!("lease held by {owner} (expires in {expires_in_ms} ms); another sweep is running");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("batch sweep failed: {e}");
                ExitCode::FAILURE
            }
        });
    }
    let report = |result: Result<Summary, BatchError>| match result {
        Ok(summary) => print(&summary, args.json, args.dry_run),
        Err(e) => tracing::error!(error = %e, "batch sweep did not run"),
    };
    if let Some(every) = args.every {
        paygate_batch::schedule::every(every, crate::shutdown_signal(), || async {
            let started = paygate_core::time::now_ms();
            report(once().await);
            let next = started + i64::try_from(every.as_millis()).unwrap_or(i64::MAX / 2);
            print_next(&next_run_text(next, zone), args.json);
        })
        .await;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(schedule) = schedule else {
        return Ok(ExitCode::SUCCESS);
    };
    let shutdown = crate::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        report(once().await);
        let Some(next) = schedule.upcoming(zone).next() else {
            return Ok(ExitCode::SUCCESS);
        };
        print_next(&next_run_text(next.timestamp_millis(), zone), args.json);
        let wait = (next.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
        tokio::select! {
            () = &mut shutdown => return Ok(ExitCode::SUCCESS),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// `next run: 2026-11-22 04:00:00 KST (19:00:00 UTC)`.
pub(crate) fn next_run_text(at_ms: i64, zone: chrono_tz::Tz) -> String {
    format!("next run: {}", crate::ops::local_time(at_ms, zone))
}

/// The next-run line: on stdout, or on stderr when stdout carries JSON.
pub(crate) fn print_next(text: &str, json: bool) {
    if json {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
}
