//! `paygate check`: the invariant checker against the sandbox card API.
//! Reads every approval the simulator gave (`GET /sandbox/approvals` on
//! `card_api_url`, Basic auth with `card_api_secret_key`) and classifies each
//! against paygate's stores and alert outbox (see
//! `paygate_reconcile::check`). Exit code 1 when an approval is lost, an
//! order was charged twice, or paygate's done cancels of an order differ
//! from the card company's (none in flight, no alert); 0 otherwise. It also
//! counts the `oversold` alerts (I7: an approval recovered after its hold
//! lapsed sold stock that was gone); those are alerted, so they do not
//! change the exit code.

use std::process::ExitCode;

use anyhow::Context;
use paygate_alert::SqlOutbox;
use paygate_reconcile::check::{check, CardApproval};
use paygate_sandbox::Approval;

/// Options of `paygate check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs the command.
///
/// # Errors
/// Setup failures, and a card API that is not the sandbox.
pub async fn run(config: paygate_core::Config, args: CheckArgs) -> anyhow::Result<ExitCode> {
    let card_url = config.card_api_url.clone().context(
        "paygate check needs card_api_url: the sandbox card API whose approvals it checks",
    )?;
    let secret = config
        .card_api_secret_key
        .as_ref()
        .map(|s| s.expose().clone())
        .unwrap_or_default();
    let approvals: Vec<Approval> = reqwest::Client::new()
        .get(format!(
            "{}/sandbox/approvals",
            card_url.trim_end_matches('/')
        ))
        .basic_auth(secret, Some(""))
        .send()
        .await
        .context("reading the card simulator's approvals")?
        .error_for_status()
        .context(
            "the card API has no /sandbox/approvals: paygate check runs against `paygate sim`",
        )?
        .json()
        .await
        .context("decoding the approvals")?;
    let approvals: Vec<CardApproval> = approvals
        .into_iter()
        .map(|a| CardApproval {
            order_id: a.order_id,
            payment_key: a.payment_key,
            canceled_amount: a.canceled_amount,
        })
        .collect();
    let (c, _sandbox) = paygate_gateway::components(&config).await?;
    let outbox = SqlOutbox::new(c.db.clone());
    let report = check(c.store.as_ref(), &outbox, &approvals).await?;
    // I7: approvals that sold stock already gone (each raised an alert).
    let oversold = outbox
        .all()
        .await?
        .iter()
        .filter(|a| a.dedup_key.ends_with(":oversold"))
        .count();
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["oversold"] = oversold.into();
        println!("{v}");
    } else {
        println!("approvals        {}", report.approvals);
        println!("completed        {}", report.completed);
        println!("paid-unsaved     {}", report.paid_unsaved);
        println!("pending          {}", report.pending);
        println!("unknown-alerted  {}", report.unknown_alerted);
        println!("lost             {}", report.lost);
        println!("double charges   {}", report.double_charges);
        println!("canceled         {}", report.canceled);
        println!("cancel mismatch  {}", report.cancel_mismatches);
        println!("oversold         {oversold}");
        if !report.lost_orders.is_empty() {
            println!("lost orders      {}", report.lost_orders.join(", "));
        }
        if !report.cancel_mismatch_orders.is_empty() {
            println!(
                "cancel mismatch orders {}",
                report.cancel_mismatch_orders.join(", ")
            );
        }
    }
    Ok(if report.holds() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
