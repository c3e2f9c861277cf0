//! `paygate prune`: retention of the SQL log and the alert outbox.
//!
//! Deletes `api_logs` rows older than `--api-logs-older-than` (default 90
//! days) and alerts older than `--alerts-older-than` (default 30 days), in
//! bounded batches (`--batch-size` rows per statement), and only rows of a
//! payment that is settled for good: in `completed_payments` or
//! `unpaid_payments` (neither is ever left again). Rows of a payment still in
//! `realtime_payments`, of an orphan approval (`orphan_<orderId>`, no
//! record) or of anything else unknown are kept, whatever their age; so is
//! an alert not yet delivered nor resolved. The reconciliation's own page
//! requests (`reconcile_<ULID>`, no payment) are pruned by age alone. The
//! operators' audit (`payment_resolutions`) is never pruned.
//!
//! `--dry-run` walks the same rows, reports what it would delete, and
//! deletes nothing.

use std::{collections::HashMap, process::ExitCode, sync::Arc, time::Duration};

use paygate_alert::SqlOutbox;
use paygate_api_log::SqlApiLog;
use paygate_core::{Partition, PaymentId};
use paygate_state_store::StateStore;
use serde::Serialize;

use crate::ops::open_stores;

/// Options of `paygate prune`.
#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    /// Delete SQL log rows older than this (of settled payments only).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90d")]
    api_logs_older_than: Duration,
    /// Delete delivered or resolved alerts older than this (of settled
    /// payments only).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30d")]
    alerts_older_than: Duration,
    /// Report what would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Rows read and deleted per statement.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=5000))]
    batch_size: i64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// What a prune did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PruneSummary {
    /// A dry run: nothing was deleted.
    pub dry_run: bool,
    /// `api_logs` rows deleted (or that would be).
    pub api_logs_deleted: u64,
    /// Old `api_logs` rows kept: their payment is not completed or unpaid.
    pub api_logs_kept: u64,
    /// Alerts deleted (or that would be).
    pub alerts_deleted: u64,
    /// Old, delivered or resolved alerts kept: their payment is not
    /// completed or unpaid.
    pub alerts_kept: u64,
    /// Batches (statements) run.
    pub batches: u64,
}

/// Whether rows about `subject` may go: the payment is completed or unpaid,
/// or the subject is the reconciliation's page log, which is no payment.
struct Settled<'a> {
    store: &'a Arc<dyn StateStore>,
    /// Per batch: a payment's rows are usually next to each other.
    seen: HashMap<String, bool>,
}

impl Settled<'_> {
    async fn check(&mut self, subject: &str) -> anyhow::Result<bool> {
        if let Some(known) = self.seen.get(subject) {
            return Ok(*known);
        }
        let settled = if subject.starts_with("reconcile_") {
            true
        } else if subject.starts_with("pay_") {
            matches!(
                self.store.get(&PaymentId::from_stored(subject)).await?,
                Some((Partition::Completed | Partition::Unpaid, _))
            )
        } else {
            false
        };
        self.seen.insert(subject.to_owned(), settled);
        Ok(settled)
    }
}

/// Runs the command.
///
/// # Errors
/// Setup failures (config, database) and store errors (what was deleted
/// before one stays deleted; a rerun continues).
pub async fn run(config: paygate_core::Config, args: PruneArgs) -> anyhow::Result<ExitCode> {
    let (db, store) = open_stores(&config).await?;
    let summary = prune(
        &SqlApiLog::new(db.clone()),
        &SqlOutbox::new(db),
        &store,
        &args,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let verb = if args.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        println!(
            "api_logs older than {}: {verb} {} rows, kept {} (payment not completed or unpaid)",
            short(args.api_logs_older_than),
            summary.api_logs_deleted,
            summary.api_logs_kept
        );
        println!(
            "alerts older than {}: {verb} {}, kept {} (payment not completed or unpaid)",
            short(args.alerts_older_than),
            summary.alerts_deleted,
            summary.alerts_kept
        );
        if args.dry_run {
            println!("dry run: nothing was deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `90d`, `12h`, or humantime's form when not whole days or hours.
fn short(d: Duration) -> String {
    match d.as_secs() {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        _ => humantime::format_duration(d).to_string(),
    }
}

fn cutoff(older_than: Duration) -> i64 {
    paygate_core::time::now_ms() - i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX / 2)
}

async fn prune(
    log: &SqlApiLog,
    outbox: &SqlOutbox,
    store: &Arc<dyn StateStore>,
    args: &PruneArgs,
) -> anyhow::Result<PruneSummary> {
    let mut s = PruneSummary {
        dry_run: args.dry_run,
        ..PruneSummary::default()
    };
    // The SQL log, walked by id (a cursor: kept rows are not read again).
    let logs_before = cutoff(args.api_logs_older_than);
    let mut after = 0;
    loop {
        let rows = log
            .older_than_after(after, logs_before, args.batch_size)
            .await?;
        let Some((last, _)) = rows.last() else { break };
        after = *last;
        let mut settled = Settled {
            store,
            seen: HashMap::new(),
        };
        let mut ids = Vec::with_capacity(rows.len());
        for (id, subject) in &rows {
            if settled.check(subject).await? {
                ids.push(*id);
            } else {
                s.api_logs_kept += 1;
            }
        }
        s.batches += 1;
        s.api_logs_deleted += if args.dry_run {
            ids.len() as u64
        } else {
            log.delete(&ids).await?
        };
    }
    // The outbox: delivered or resolved alerts only.
    let alerts_before = cutoff(args.alerts_older_than);
    let mut after = 0;
    loop {
        let rows = outbox
            .prunable_after(after, alerts_before, args.batch_size)
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        let mut settled = Settled {
            store,
            seen: HashMap::new(),
        };
        let mut ids = Vec::with_capacity(rows.len());
        for a in &rows {
            // Alerts have no reconciliation-page subject: only payments.
            let payment = a.payment_id.as_deref().filter(|p| p.starts_with("pay_"));
            match payment {
                Some(p) if settled.check(p).await? => ids.push(a.id),
                _ => s.alerts_kept += 1,
            }
        }
        s.batches += 1;
        s.alerts_deleted += if args.dry_run {
            ids.len() as u64
        } else {
            outbox.delete(&ids).await?
        };
    }
    Ok(s)
}
