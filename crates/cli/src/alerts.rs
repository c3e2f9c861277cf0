//! `paygate alerts`: the alert outbox for operators.
//!
//! - `list [--unsent|--parked] [--json]`: newest first; `--unsent` is every
//!   alert not delivered (pending and parked), `--parked` those Discord
//!   refused for good.
//! - `resend <id>`: queue one alert again (un-park a parked one, reopen a
//!   sent or resolved one) and flush the outbox now.

use std::process::ExitCode;

use paygate_alert::{outbox::OutboxRow, DiscordClient, Listing, OutboxAlerter, SqlOutbox};
use paygate_core::masking::mask_text;
use serde_json::json;

use crate::ops::{age, open_stores, truncate};

/// `paygate alerts ...`.
#[derive(clap::Subcommand, Debug)]
pub enum AlertsCommand {
    /// List alerts, newest first.
    List(ListArgs),
    /// Queue one alert to be sent again, and send it now.
    Resend {
        /// The alert's id (`paygate alerts list`).
        id: i64,
    },
}

/// Options of `paygate alerts list`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only alerts not delivered yet (pending and parked).
    #[arg(long, conflicts_with = "parked")]
    unsent: bool,
    /// Only alerts Discord refused for good (waiting for `resend`).
    #[arg(long)]
    parked: bool,
    /// Print at most this many.
    #[arg(long, default_value_t = 100)]
    limit: i64,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

fn row_json(a: &OutboxRow) -> serde_json::Value {
    json!({
        "id": a.id,
        "reason": a.reason,
        "paymentId": a.payment_id,
        "state": a.state(),
        "raisedAt": paygate_core::time::rfc3339_from_ms(a.created_at),
        "sentAt": a.sent_at.map(paygate_core::time::rfc3339_from_ms),
        "parkedAt": a.parked_at.map(paygate_core::time::rfc3339_from_ms),
        "resolvedAt": a.resolved_at.map(paygate_core::time::rfc3339_from_ms),
        "attempts": a.attempts,
        "lastError": a.last_error.as_deref().map(mask_text),
        "detail": mask_text(&a.detail()),
    })
}

/// Runs the command.
///
/// # Errors
/// Setup failures (config, database).
pub async fn run(config: paygate_core::Config, command: AlertsCommand) -> anyhow::Result<ExitCode> {
    let (db, _store) = open_stores(&config).await?;
    let outbox = SqlOutbox::new(db);
    match command {
        AlertsCommand::List(args) => {
            let which = if args.parked {
                Listing::Parked
            } else if args.unsent {
                Listing::Unsent
            } else {
                Listing::All
            };
            let rows = outbox.list_newest(which, args.limit.max(1)).await?;
            if args.json {
                for r in &rows {
                    println!("{}", row_json(r));
                }
                return Ok(ExitCode::SUCCESS);
            }
            if rows.is_empty() {
                println!("no alerts");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:>6} {:<9} {:<28} {:<34} {:<6} {:>3} detail / last error",
                "id", "state", "reason", "payment", "age", "try"
            );
            for r in &rows {
                let note = match (&r.last_error, r.sent_at) {
                    (Some(e), None) => format!(
                        "{} | {}",
                        truncate(&mask_text(&r.detail()), 60),
                        mask_text(e)
                    ),
                    _ => mask_text(&r.detail()),
                };
                println!(
                    "{:>6} {:<9} {:<28} {:<34} {:<6} {:>3} {}",
                    r.id,
                    r.state(),
                    r.reason,
                    r.payment_id.as_deref().unwrap_or("-"),
                    age(r.created_at),
                    r.attempts,
                    truncate(&note, 120)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AlertsCommand::Resend { id } => {
            let Some(before) = outbox.get(id).await? else {
                eprintln!("no alert #{id}");
                return Ok(ExitCode::FAILURE);
            };
            outbox.requeue(id).await?;
            let discord = match &config.discord_webhook_url {
                Some(url) => {
                    let http = reqwest::Client::builder()
                        .connect_timeout(std::time::Duration::from_secs(2))
                        .build()?;
                    Some(DiscordClient::new(http, url.clone(), 5))
                }
                None => None,
            };
            let has_webhook = discord.is_some();
            let alerter = OutboxAlerter::new(outbox.clone(), discord);
            let flushed = alerter.flush().await;
            let after = outbox.get(id).await?;
            println!("alert #{id} ({}) was {}", before.reason, before.state());
            match after {
                Some(a) if a.sent_at.is_some() => {
                    println!("sent now");
                    Ok(ExitCode::SUCCESS)
                }
                Some(a) if !has_webhook => {
                    println!(
                        "queued ({}): no Discord webhook is configured (PAYGATE_DISCORD_WEBHOOK_URL); it waits in the outbox",
                        a.state()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Some(a) => {
                    println!(
                        "not sent ({}; this flush: sent {}, failed {}, parked {}): {}",
                        a.state(),
                        flushed.sent,
                        flushed.failed,
                        flushed.parked,
                        a.last_error.as_deref().map(mask_text).unwrap_or_default()
                    );
                    Ok(ExitCode::FAILURE)
                }
                None => {
                    eprintln!("alert #{id} vanished (pruned?)");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}
