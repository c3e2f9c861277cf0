//! `paygate payments`: the operator's view of and hand on single payments.
//!
//! - `show <paymentId|orderId>`: the record wherever it is, every `api_logs`
//!   row of it in order, its alerts and the operators' decisions about it;
//!   bodies and free text are masked again before printing (I6), whatever
//!   wrote them.
//! - `list --problems`: `UNKNOWN`, paid-unsaved, `PENDING` older than an age,
//!   and unresolved mismatch alerts, newest first.
//! - `recheck <paymentId>`: the batch's handling of one record, now.
//! - `resolve <paymentId> --approved|--not-charged --reason TEXT`: an
//!   operator's decision, guarded, checked against a card lookup, audited.
//!
//! Exit codes: 0 done; 1 not found, refused or failed.

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::{bail, Context};
use paygate_alert::{outbox::OutboxRow, SqlOutbox};
use paygate_api_log::{ResolutionLog, SqlApiLog, StoredLogEntry};
use paygate_core::{
    masking::{mask_text, scrub_json_for_display},
    MerchantId, OrderId, Partition, PaymentId, PaymentRecord,
};
use paygate_payments::{problems, record_json, Decision, ResolveError, ResolveRequest, Resolver};
use paygate_state_store::StateStore;
use serde_json::{json, Value};

use crate::ops::{age, local_time, open_stores, truncate};

/// `paygate payments ...`.
#[derive(clap::Subcommand, Debug)]
pub enum PaymentsCommand {
    /// One payment: its record, every SQL log row, its alerts and the
    /// operators' decisions about it (secrets masked).
    Show(ShowArgs),
    /// Payments that need a person: `--problems`.
    List(ListArgs),
    /// Settle one payment now by lookup, exactly as the batch would.
    Recheck(RecheckArgs),
    /// Settle an open (PENDING or UNKNOWN) payment by hand after checking
    /// the card company's console; audited.
    Resolve(ResolveArgs),
}

/// Options of `paygate payments show`.
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// A paymentId (`pay_...`) or the merchant's orderId.
    id: String,
    /// The merchant, when an orderId is used by more than one.
    #[arg(long)]
    merchant: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Options of `paygate payments list`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// List the payments that need a person (the only listing so far).
    #[arg(long, required = true)]
    problems: bool,
    /// Only this merchant's payments.
    #[arg(long)]
    merchant: Option<String>,
    /// A PENDING payment is a problem once its last change is this old.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    older_than: Duration,
    /// Print at most this many.
    #[arg(long, default_value_t = 200)]
    limit: usize,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// Options of `paygate payments recheck`.
#[derive(clap::Args, Debug)]
pub struct RecheckArgs {
    /// The payment (`pay_...`).
    payment_id: String,
    /// Ledger failures in the batch before "ledger save failed" is raised.
    #[arg(long, default_value_t = 5)]
    alert_threshold: i64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Options of `paygate payments resolve`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("decision").required(true).args(["approved", "not_charged"])))]
pub struct ResolveArgs {
    /// The payment (`pay_...`).
    payment_id: String,
    /// The card company approved it (seen in its console): mark it paid,
    /// record it in the ledger, complete it.
    #[arg(long)]
    approved: bool,
    /// Nothing was charged: mark it aborted and file it unpaid.
    #[arg(long)]
    not_charged: bool,
    /// Why (kept in the audit).
    #[arg(long)]
    reason: String,
    /// Who decides (kept in the audit). Default: $USER.
    #[arg(long)]
    operator: Option<String>,
    /// Carry it out even when the card company's lookup contradicts it.
    #[arg(long)]
    force: bool,
    /// The version `paygate payments show` printed: refused when the
    /// payment changed since.
    #[arg(long = "version")]
    seen_version: Option<i64>,
    /// Ledger failures in the batch before "ledger save failed" is raised.
    #[arg(long, default_value_t = 5)]
    alert_threshold: i64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs the command.
///
/// # Errors
/// Setup failures (config, database).
pub async fn run(
    config: paygate_core::Config,
    command: PaymentsCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        PaymentsCommand::Show(args) => show(config, args).await,
        PaymentsCommand::List(args) => list(config, args).await,
        PaymentsCommand::Recheck(args) => recheck(config, args).await,
        PaymentsCommand::Resolve(args) => resolve(config, args).await,
    }
}

/// Finds a payment by paymentId, or by orderId (of `merchant`, or of the
/// only merchant that used it).
async fn find(
    store: &Arc<dyn StateStore>,
    id: &str,
    merchant: Option<&str>,
) -> anyhow::Result<Option<(Partition, PaymentRecord)>> {
    if id.starts_with("pay_") {
        return Ok(store.get(&PaymentId::from_stored(id)).await?);
    }
    if let Some(m) = merchant {
        let order =
            OrderId::parse(id).map_err(|e| anyhow::anyhow!("{id:?} is not an orderId: {e}"))?;
        return match store
            .get_by_order(&MerchantId::from_stored(m), &order)
            .await?
        {
            Some(r) => Ok(store.get(&r.payment_id).await?),
            None => Ok(None),
        };
    }
    let found = store.find_by_order_ids(&[id.to_owned()]).await?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.into_iter().next()),
        _ => {
            let merchants: Vec<String> = found
                .iter()
                .map(|(_, r)| r.merchant_id.to_string())
                .collect();
            bail!(
                "orderId {id:?} is used by {} merchants ({}): pass --merchant",
                merchants.len(),
                merchants.join(", ")
            )
        }
    }
}

fn log_json(e: &StoredLogEntry) -> Value {
    let mut body = e.body.clone();
    if let Some(b) = body.as_mut() {
        scrub_json_for_display(b);
    }
    json!({
        "id": e.id,
        "at": paygate_core::time::rfc3339_from_ms(e.created_at),
        "target": e.target,
        "kind": e.kind,
        "attempt": e.attempt,
        "method": e.method,
        "path": mask_text(&e.path),
        "status": e.status_code,
        "latencyMs": e.latency_ms,
        "body": body,
    })
}

fn alert_json(a: &OutboxRow) -> Value {
    json!({
        "id": a.id,
        "reason": a.reason,
        "paymentId": a.payment_id,
        "state": a.state(),
        "raisedAt": paygate_core::time::rfc3339_from_ms(a.created_at),
        "sentAt": a.sent_at.map(paygate_core::time::rfc3339_from_ms),
        "parkedAt": a.parked_at.map(paygate_core::time::rfc3339_from_ms),
        "resolvedAt": a.resolved_at.map(paygate_core::time::rfc3339_from_ms),
        "resolutionId": a.resolution_id,
        "attempts": a.attempts,
        "lastError": a.last_error.as_deref().map(mask_text),
        "detail": mask_text(&a.detail()),
    })
}

/// The record's JSON with its free text masked.
fn masked_record(part: Partition, r: &PaymentRecord) -> Value {
    let mut v = record_json(part, r);
    scrub_json_for_display(&mut v);
    v
}

async fn show(config: paygate_core::Config, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let (db, store) = open_stores(&config).await?;
    let Some((part, record)) = find(&store, &args.id, args.merchant.as_deref()).await? else {
        eprintln!("no payment {:?}", args.id);
        return Ok(ExitCode::FAILURE);
    };
    let pid = record.payment_id.clone();
    let logs = SqlApiLog::new(db.clone()).for_payment(&pid).await?;
    let alerts = SqlOutbox::new(db.clone()).for_payment(pid.as_str()).await?;
    let resolutions = ResolutionLog::new(db.clone())
        .for_payment(pid.as_str())
        .await?;
    let resolutions: Vec<Value> = resolutions
        .iter()
        .map(|r| {
            let mut v = json!({
                "id": r.id,
                "at": paygate_core::time::rfc3339_from_ms(r.created_at),
                "action": r.entry.action,
                "operator": r.entry.operator,
                "reason": r.entry.reason,
                "forced": r.entry.forced,
                "cardEvidence": r.entry.card_evidence,
                "before": r.entry.before,
                "after": r.entry.after,
            });
            scrub_json_for_display(&mut v);
            v
        })
        .collect();
    let doc = json!({
        "payment": masked_record(part, &record),
        "apiLogs": logs.iter().map(log_json).collect::<Vec<_>>(),
        "alerts": alerts.iter().map(alert_json).collect::<Vec<_>>(),
        "resolutions": resolutions,
        // Inventory holds do not exist yet (DESIGN.md §3a): nothing to show.
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    let zone = crate::ops::zone(&config);
    let p = &doc["payment"];
    let text = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!("payment {}  ({})", pid, part.table());
    println!("  merchant     {}", text(&p["merchantId"]));
    println!("  order        {}", text(&p["orderId"]));
    println!("  paymentKey   {}", text(&p["paymentKey"]));
    println!("  amount       {} {}", record.amount, record.currency);
    println!(
        "  card status  {}   paid {}   saved {}",
        record.card_status.as_str(),
        yes(record.is_paid),
        yes(record.is_saved)
    );
    println!("  approved at  {}", text(&p["approvedAt"]));
    // `batch_attempts` counts the batch's ledger retries of a paid
    // payment, and the lookups that learned nothing of an undecided one.
    let batch = if record.is_paid {
        "batch ledger retries"
    } else {
        "lookups that learned nothing"
    };
    println!(
        "  attempts     ledger {}, {batch} {}",
        record.save_attempts, record.batch_attempts
    );
    println!("  failure      {}", text(&p["failureCode"]));
    println!("  last error   {}", text(&p["lastError"]));
    println!("  created      {}", local_time(record.created_at, zone));
    println!(
        "  updated      {}  ({} ago)",
        local_time(record.updated_at, zone),
        age(record.updated_at)
    );
    println!(
        "  version      {}  (pass --version {} to `payments resolve`)",
        record.version, record.version
    );
    println!("api_logs ({}):", logs.len());
    for row in doc["apiLogs"].as_array().into_iter().flatten() {
        println!(
            "  #{:<6} {}  {:<10} {:<8} attempt {}  {} {}  status {}  latency {} ms",
            text(&row["id"]),
            text(&row["at"]),
            text(&row["target"]),
            text(&row["kind"]),
            text(&row["attempt"]),
            text(&row["method"]),
            text(&row["path"]),
            text(&row["status"]),
            text(&row["latencyMs"]),
        );
        if !row["body"].is_null() {
            println!("          body {}", row["body"]);
        }
    }
    println!("alerts ({}):", alerts.len());
    for a in doc["alerts"].as_array().into_iter().flatten() {
        println!(
            "  #{:<6} {:<28} {:<8} raised {}  {}",
            text(&a["id"]),
            text(&a["reason"]),
            text(&a["state"]),
            text(&a["raisedAt"]),
            truncate(&text(&a["detail"]), 120)
        );
    }
    println!(
        "resolutions ({}):",
        doc["resolutions"].as_array().map_or(0, Vec::len)
    );
    for r in doc["resolutions"].as_array().into_iter().flatten() {
        println!(
            "  #{:<6} {}  {} by {}{}: {}  [{}]",
            text(&r["id"]),
            text(&r["at"]),
            text(&r["action"]),
            text(&r["operator"]),
            if r["forced"] == Value::Bool(true) {
                " (forced)"
            } else {
                ""
            },
            text(&r["reason"]),
            text(&r["cardEvidence"]),
        );
    }
    println!("holds: none (inventory holds are not built yet)");
    Ok(ExitCode::SUCCESS)
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

async fn list(config: paygate_core::Config, args: ListArgs) -> anyhow::Result<ExitCode> {
    let (db, store) = open_stores(&config).await?;
    let found = problems(&db, &store, args.merchant.as_deref(), args.older_than).await?;
    let total = found.len();
    if args.json {
        for p in found.iter().take(args.limit) {
            println!("{}", p.json());
        }
        return Ok(ExitCode::SUCCESS);
    }
    if found.is_empty() {
        println!("no problems");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<14} {:<8} {:<30} {:<30} {:<22} {:>10} {:<26} detail",
        "kind", "age", "payment", "merchant", "order", "amount", "status"
    );
    for p in found.iter().take(args.limit) {
        println!(
            "{:<14} {:<8} {:<30} {:<30} {:<22} {:>10} {:<26} {}",
            p.kind,
            age(p.since_ms),
            p.payment_id,
            p.merchant_id,
            truncate(&p.order_id, 22),
            p.amount.map_or("-".to_owned(), |a| a.to_string()),
            p.status,
            truncate(&p.detail, 80)
        );
    }
    if total > args.limit {
        println!("... and {} more (--limit)", total - args.limit);
    }
    Ok(ExitCode::SUCCESS)
}

fn state_line(r: Option<&(Partition, PaymentRecord)>) -> String {
    r.map_or("gone".to_owned(), |(part, r)| {
        format!(
            "{} in {} (paid {}, saved {})",
            r.card_status.as_str(),
            part.table(),
            yes(r.is_paid),
            yes(r.is_saved)
        )
    })
}

async fn recheck(config: paygate_core::Config, args: RecheckArgs) -> anyhow::Result<ExitCode> {
    let (components, _sandbox) = paygate_gateway::components(&config).await?;
    let sweeper = paygate_batch::Sweeper::new(
        components.store.clone(),
        components.saga.clone(),
        components.db.clone(),
    );
    let opts = paygate_batch::SweepOptions {
        grace: Duration::ZERO,
        ledger_alert_threshold: args.alert_threshold,
        ..paygate_batch::SweepOptions::default()
    };
    let pid = PaymentId::from_stored(args.payment_id.as_str());
    let result = sweeper.recheck(&pid, &opts).await;
    let _ = components.alerter.flush().await;
    let Some(done) = result.context("recheck")? else {
        eprintln!("no payment {pid}");
        return Ok(ExitCode::FAILURE);
    };
    if args.json {
        let doc = json!({
            "before": masked_record(done.before.0, &done.before.1),
            "after": done.after.as_ref().map(|(p, r)| masked_record(*p, r)),
            "summary": done.summary,
        });
        println!("{doc}");
        return Ok(ExitCode::SUCCESS);
    }
    let s = &done.summary;
    println!("before: {}", state_line(Some(&done.before)));
    println!("after:  {}", state_line(done.after.as_ref()));
    if done.before.0 != Partition::Realtime {
        println!("(already settled: nothing to do)");
    }
    println!(
        "did: completed {} | unpaid {} | settled {} | ledger tries {} | saved {} | alerts {} | failures {}",
        s.completed, s.unpaid, s.settled, s.retried, s.saved, s.alerts, s.failures
    );
    if let Some((_, r)) = &done.after {
        if let Some(e) = &r.last_error {
            println!("last error: {}", mask_text(e));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn resolve(config: paygate_core::Config, args: ResolveArgs) -> anyhow::Result<ExitCode> {
    let operator = match args.operator.clone().or_else(|| std::env::var("USER").ok()) {
        Some(o) if !o.trim().is_empty() => o.trim().to_owned(),
        _ => bail!("--operator is required (no $USER to default to)"),
    };
    if args.reason.trim().is_empty() {
        bail!("--reason must say why");
    }
    let (components, _sandbox) = paygate_gateway::components(&config).await?;
    let resolver = Resolver::new(
        components.store.clone(),
        components.saga.clone(),
        components.db.clone(),
        args.alert_threshold,
    );
    let req = ResolveRequest {
        payment_id: PaymentId::from_stored(args.payment_id.as_str()),
        decision: if args.approved {
            Decision::Approved
        } else {
            Decision::NotCharged
        },
        reason: args.reason.trim().to_owned(),
        operator,
        force: args.force,
        seen_version: args.seen_version,
    };
    let result = resolver.resolve(&req).await;
    let _ = components.alerter.flush().await;
    let report = match result {
        Ok(r) => r,
        Err(e @ (ResolveError::Store(_) | ResolveError::NotFound(_))) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            eprintln!("{}", mask_text(&e.to_string()));
            return Ok(ExitCode::FAILURE);
        }
    };
    if args.json {
        let doc = json!({
            "resolutionId": report.resolution_id,
            "cardEvidence": mask_text(&report.evidence.to_string()),
            "before": masked_record(report.before.0, &report.before.1),
            "after": masked_record(report.after.0, &report.after.1),
            "alertsResolved": report.alerts_resolved,
        });
        println!("{doc}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "resolved {} as {} (audit #{})",
        req.payment_id,
        req.decision.as_str(),
        report.resolution_id
    );
    println!("  {}", mask_text(&report.evidence.to_string()));
    println!("  before: {}", state_line(Some(&report.before)));
    println!("  after:  {}", state_line(Some(&report.after)));
    println!("  alerts resolved: {}", report.alerts_resolved);
    if let Some(e) = &report.follow_up_error {
        println!("  not finished: {} (the batch finishes it)", mask_text(e));
    }
    let (part, r) = &report.after;
    if req.decision == Decision::Approved && *part == Partition::Realtime {
        println!(
            "  the ledger did not take it yet ({}); the batch keeps trying (`paygate payments recheck {}`)",
            r.last_error.as_deref().map(mask_text).unwrap_or_default(),
            req.payment_id
        );
    }
    Ok(ExitCode::SUCCESS)
}
