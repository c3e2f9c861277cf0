//! `paygate webhooks`: merchant webhooks for operators.
//!
//! - `list [--merchant ID] [--state STATE] [--limit N] [--json]`: events,
//!   newest first, with their delivery (`pending`, `delivered`, `failed`,
//!   `no_endpoint`, or `-` before numbering), tries and last error.
//! - `resend <eventId>`: deliver one event again (a `failed` one after the
//!   merchant fixed its endpoint, or a delivered one the merchant lost);
//!   the running replicas' workers send it within a poll.
//! - `endpoint <merchantId> <url>`: register a merchant's endpoint as `PUT
//!   /v1/webhook-endpoint` does, printing the new signing secret once.

use std::process::ExitCode;

use paygate_core::MerchantId;
use paygate_gateway::merchant_webhooks::MerchantWebhooks;
use paygate_webhooks::{secrets::generate_signing_secret, store::Endpoint, EventRow};
use serde_json::json;

use crate::ops::{age, open_stores, truncate};

/// `paygate webhooks ...`.
#[derive(clap::Subcommand, Debug)]
pub enum WebhooksCommand {
    /// List events and their deliveries, newest first.
    List(ListArgs),
    /// Deliver one event again.
    Resend {
        /// The event's id (`evt_...`, from `paygate webhooks list`).
        event_id: String,
    },
    /// Register (or replace) a merchant's endpoint; prints the new signing
    /// secret once.
    Endpoint {
        /// The merchant (`mer_...`).
        merchant_id: String,
        /// The endpoint URL (https; checked as the API checks it).
        url: String,
    },
}

/// Options of `paygate webhooks list`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only this merchant's events.
    #[arg(long)]
    merchant: Option<String>,
    /// Only events in this delivery state.
    #[arg(long, value_parser = ["pending", "delivered", "failed", "no_endpoint"])]
    state: Option<String>,
    /// Print at most this many.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

fn row_json(r: &EventRow) -> serde_json::Value {
    json!({
        "eventId": r.event.event_id,
        "type": r.event.event_type.as_str(),
        "merchantId": r.event.merchant_id.as_str(),
        "paymentId": r.event.payment_id.as_str(),
        "version": r.event.version,
        "sequence": (r.seq > 0).then_some(r.seq),
        "delivery": r.delivery,
        "attempts": r.attempts,
        "lastStatus": r.last_status,
        "lastError": r.last_error,
        "createdAt": paygate_core::time::rfc3339_from_ms(r.event.created_at),
    })
}

/// Runs the command.
///
/// # Errors
/// Setup failures (config, database).
pub async fn run(
    config: paygate_core::Config,
    command: WebhooksCommand,
) -> anyhow::Result<ExitCode> {
    let (db, store) = open_stores(&config).await?;
    let hooks = MerchantWebhooks::from_config(&config, db)?;
    let events = &hooks.events;
    match command {
        WebhooksCommand::List(args) => {
            events.relay(store.as_ref()).await?;
            events.number_all().await?;
            let merchant = args.merchant.map(MerchantId::from_stored);
            let rows = events
                .list(merchant.as_ref(), args.state.as_deref(), args.limit.max(1))
                .await?;
            if args.json {
                for r in &rows {
                    println!("{}", row_json(r));
                }
                return Ok(ExitCode::SUCCESS);
            }
            if rows.is_empty() {
                println!("no events");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<44} {:<27} {:<34} {:>6} {:<11} {:>3} {:<6} last error",
                "event", "type", "payment", "seq", "delivery", "try", "age"
            );
            for r in &rows {
                let status = r.last_status.map(|s| format!("{s} ")).unwrap_or_default();
                println!(
                    "{:<44} {:<27} {:<34} {:>6} {:<11} {:>3} {:<6} {}{}",
                    r.event.event_id,
                    r.event.event_type.as_str(),
                    r.event.payment_id.as_str(),
                    if r.seq > 0 {
                        r.seq.to_string()
                    } else {
                        "-".into()
                    },
                    if r.seq > 0 { r.delivery.as_str() } else { "-" },
                    r.attempts,
                    age(r.event.created_at),
                    status,
                    truncate(r.last_error.as_deref().unwrap_or(""), 60)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        WebhooksCommand::Resend { event_id } => {
            events.relay(store.as_ref()).await?;
            events.number_all().await?;
            if events.resend(&event_id).await? {
                println!("{event_id} queued; a running replica delivers it within a poll");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("no numbered event {event_id}");
                Ok(ExitCode::FAILURE)
            }
        }
        WebhooksCommand::Endpoint { merchant_id, url } => {
            let Some(key) = hooks.secrets.as_ref() else {
                eprintln!("merchant webhooks are off: set secrets_key (PAYGATE_SECRETS_KEY)");
                return Ok(ExitCode::FAILURE);
            };
            let url = match hooks.policy.check(&url).await {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("refused: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let merchant = MerchantId::from_stored(merchant_id.as_str());
            let secret = generate_signing_secret();
            let endpoint = Endpoint {
                url: url.to_string(),
                secret_sealed: key.seal(merchant.as_str(), &secret)?,
            };
            events
                .put_endpoint(&merchant, &endpoint, paygate_core::time::now_ms())
                .await?;
            println!("endpoint: {}", endpoint.url);
            println!("signing_secret: {}", secret.expose());
            println!("(shown once: give it to the merchant to verify Paygate-Signature)");
            Ok(ExitCode::SUCCESS)
        }
    }
}
