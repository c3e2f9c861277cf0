//! `paygate`: the one binary. Subcommands: `serve` (the merchant API),
//! `merchants` (create and list API keys), `migrate`, `config check` (the
//! effective configuration, secrets masked), `batch` (the sweep sidecar job),
//! `reconcile` (against the card company's transaction list), `check`
//! (invariants I1/I2 against the sandbox), `sim` (the
//! sandbox simulators as HTTP servers), `demo` (an end-to-end run under
//! faults that checks invariants I1-I3), and the operator tools: `payments`
//! (show, list problems, recheck, resolve), `alerts` (list, resend),
//! `webhooks` (merchant webhooks: list, resend, endpoint), `prune`
//! (retention), `console` (the operator console in the browser) and
//! `operators` (its accounts).

mod alerts;
mod batch;
mod check;
mod console;
mod demo;
mod flash_sale;
mod ops;
mod payments;
mod progress;
mod prune;
mod reconcile;
mod settings;
mod webhooks;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use paygate_core::crypto::{generate_api_key, hash_api_key, API_KEY_DISPLAY_LEN};
use paygate_gateway::Application;
use paygate_sandbox::{CardSim, FaultProfile, LedgerSim, SandboxServers};
use paygate_state_store::{Merchant, SqlDatabase, SqlMerchantStore};
use tokio::net::TcpListener;

/// paygate: a resilient payment gateway.
#[derive(Parser, Debug)]
#[command(name = "paygate", version, about)]
struct Cli {
    /// TOML configuration file (keys as in DESIGN.md §11, lower case).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the merchant API on PAYGATE_LISTEN.
    Serve,
    /// Apply the SQL migrations and exit.
    Migrate,
    /// Manage merchants and their API keys.
    Merchants {
        #[command(subcommand)]
        command: MerchantsCommand,
    },
    /// Run the sandbox card API and ledger as HTTP servers.
    Sim {
        /// Port of the card API simulator.
        #[arg(long, default_value_t = 18080)]
        card_port: u16,
        /// Port of the ledger simulator.
        #[arg(long, default_value_t = 18081)]
        ledger_port: u16,
        /// Fault preset: none or flaky.
        #[arg(long, default_value = "none")]
        faults: String,
        /// Seed of the fault rolls.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Secret key the card simulator accepts.
        #[arg(long, default_value = paygate_sandbox::SANDBOX_CARD_SECRET)]
        secret_key: String,
        /// Generated approvals to hold in the transaction list, spread over
        /// the last 24 h (orderIds `gen-000000000`...; paygate has no
        /// record of them, so reconcile them with `--dry-run`).
        #[arg(long, default_value_t = 0)]
        transactions: usize,
        /// Latency of each transaction-list page, ms.
        #[arg(long)]
        page_latency_ms: Option<u64>,
        /// Latency of every ledger call, ms (a slow ledger).
        #[arg(long)]
        ledger_latency_ms: Option<u64>,
        /// Approve a second confirm of an approved order under a new
        /// Idempotency-Key (Toss refuses it with ALREADY_PROCESSED_PAYMENT):
        /// for measuring paygate's own no-double-charge guarantee.
        #[arg(long)]
        approve_duplicate_confirms: bool,
        /// Send a Toss `PAYMENT_STATUS_CHANGED` webhook for every change the
        /// card simulator makes to this URL (paygate's
        /// `http://HOST:PORT/v1/webhooks/card`, or a load balancer before
        /// several replicas).
        #[arg(long)]
        webhook_url: Option<String>,
        /// Divide Toss's webhook redelivery schedule (1, 4, 16 ... 4096
        /// minutes) by this factor.
        #[arg(long, default_value_t = 1)]
        webhook_compression: u32,
    },
    /// Configuration: `paygate config check` validates it and prints the
    /// effective values (defaults, then --config, then PAYGATE_*), secrets
    /// masked.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Sweep realtime payments: complete, move unpaid, settle unknown
    /// outcomes, retry the ledger, alert (the sidecar job).
    Batch(batch::BatchArgs),
    /// Match paygate's records against the card company's transaction list
    /// for a window: recover, cancel orphan approvals, alert.
    Reconcile(reconcile::ReconcileArgs),
    /// Check invariants I1/I2 against the sandbox card API's approvals:
    /// exit 1 when an approval is lost or an order was charged twice.
    Check(check::CheckArgs),
    /// Drive real HTTP confirms through the real server under faults and
    /// check that no approval is lost and none is doubled.
    Demo(demo::DemoArgs),
    /// Operators: show a payment, list the ones that need a person, recheck
    /// one now, resolve one by hand (audited).
    Payments {
        #[command(subcommand)]
        command: payments::PaymentsCommand,
    },
    /// Operators: list the alert outbox, resend an alert.
    Alerts {
        #[command(subcommand)]
        command: alerts::AlertsCommand,
    },
    /// Operators: merchant webhooks (list events and deliveries, resend
    /// one, register a merchant's endpoint).
    Webhooks {
        #[command(subcommand)]
        command: webhooks::WebhooksCommand,
    },
    /// Retention: delete old SQL log rows and alerts of settled payments,
    /// in bounded batches (`--dry-run` deletes nothing).
    Prune(prune::PruneArgs),
    /// Serve the operator console on PAYGATE_CONSOLE_LISTEN (default
    /// 127.0.0.1:8090).
    Console,
    /// Operators: console accounts (create, list, disable).
    Operators {
        #[command(subcommand)]
        command: console::OperatorsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate and print the effective configuration as JSON, secrets as "***".
    Check,
}

#[derive(Subcommand, Debug)]
enum MerchantsCommand {
    /// Create a merchant and print its API key (shown once).
    Create {
        /// Display name.
        name: String,
    },
    /// List merchants (never their keys).
    List,
}

/// Log lines go to stderr through `tracing-appender`'s non-blocking
/// writer: a background thread writes them, so a slow log sink (a full
/// pipe, a stalled disk under the container runtime) never blocks a
/// request's task. Lossy by choice: when its buffer (128k lines) is full a
/// line is dropped and counted, rather than every request waiting; the
/// durable record of each downstream call is the SQL log, not these lines.
/// The guard flushes what is buffered when the command ends.
fn init_tracing(default_filter: &str, json: bool) -> Logging {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    Logging {
        _guard: guard,
        dropped,
    }
}

/// The logging of one command: flushes its buffered lines when dropped and
/// says how many it had to drop.
struct Logging {
    _guard: tracing_appender::non_blocking::WorkerGuard,
    dropped: tracing_appender::non_blocking::ErrorCounter,
}

impl Drop for Logging {
    fn drop(&mut self) {
        let n = self.dropped.dropped_lines();
        if n > 0 {
            eprintln!("paygate: {n} log lines were dropped: the log sink could not keep up");
        }
    }
}

/// The `paygate` command: parses the arguments, runs the subcommand, and
/// returns its exit code (errors are printed to stderr as `error: ...`).
/// `src/main.rs` runs it on a multi-threaded tokio runtime.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => {
            let _logging = init_tracing("error", false);
            demo::run(args).await
        }
        Command::Sim {
            card_port,
            ledger_port,
            faults,
            seed,
            secret_key,
            transactions,
            page_latency_ms,
            ledger_latency_ms,
            approve_duplicate_confirms,
            webhook_url,
            webhook_compression,
        } => {
            let _logging = init_tracing("info", false);
            let profile = FaultProfile::preset(&faults)
                .with_context(|| {
                    format!(
                        "unknown fault preset {faults:?}; one of {:?}",
                        FaultProfile::PRESETS
                    )
                })?
                .with_seed(seed)
                .with_duplicate_confirms_approved(approve_duplicate_confirms);
            let profile = match page_latency_ms {
                Some(ms) => FaultProfile {
                    page_latency_ms: ms,
                    ..profile
                },
                None => profile,
            };
            let profile = match ledger_latency_ms {
                Some(ms) => FaultProfile {
                    ledger_latency_min_ms: ms,
                    ledger_latency_max_ms: ms,
                    ..profile
                },
                None => profile,
            };
            let card_l = TcpListener::bind(("127.0.0.1", card_port))
                .await
                .context("binding the card simulator")?;
            let ledger_l = TcpListener::bind(("127.0.0.1", ledger_port))
                .await
                .context("binding the ledger simulator")?;
            let card = std::sync::Arc::new(CardSim::new(profile.clone(), &secret_key));
            if transactions > 0 {
                let now = paygate_core::time::now_ms();
                card.seed_approvals(paygate_sandbox::generated_approvals(
                    transactions,
                    now - 86_400_000,
                    now,
                ));
                println!("transaction list: {transactions} generated approvals over the last 24 h");
            }
            if let Some(url) = &webhook_url {
                card.send_webhooks_to(url, webhook_compression);
                println!("card webhooks:      {url}");
            }
            let ledger = std::sync::Arc::new(LedgerSim::new(profile));
            let servers = SandboxServers::start_on(card, ledger, card_l, ledger_l).await?;
            println!("card API simulator: {}", servers.card_url);
            println!("ledger simulator:   {}", servers.ledger_url);
            shutdown_signal().await;
            Ok(ExitCode::SUCCESS)
        }
        command => {
            let config = settings::load(cli.config.as_deref())?;
            let _logging = init_tracing("info,sqlx=warn", config.log_format == "json");
            match command {
                Command::Serve => serve(config).await,
                Command::Migrate => {
                    // Retried: a connection terminated mid-migration rolls
                    // that migration back, and the next try applies it.
                    let db = SqlDatabase::open(
                        config.database_url.expose(),
                        1,
                        paygate_state_store::SchemaStep::Migrate,
                        paygate_payments::wiring::DATABASE_OPEN_WAIT,
                    )
                    .await?;
                    println!("migrations applied ({})", db.backend());
                    Ok(ExitCode::SUCCESS)
                }
                Command::Merchants { command } => merchants(config, command).await,
                Command::Config {
                    command: ConfigCommand::Check,
                } => {
                    // `settings::load` already validated every key and value.
                    println!("{}", serde_json::to_string_pretty(&config)?);
                    Ok(ExitCode::SUCCESS)
                }
                Command::Batch(args) => batch::run(config, args).await,
                Command::Reconcile(args) => reconcile::run(config, args).await,
                Command::Check(args) => check::run(config, args).await,
                Command::Payments { command } => payments::run(config, command).await,
                Command::Alerts { command } => alerts::run(config, command).await,
                Command::Webhooks { command } => webhooks::run(config, command).await,
                Command::Prune(args) => prune::run(config, args).await,
                Command::Console => console::serve(config).await,
                Command::Operators { command } => console::operators(config, command).await,
                Command::Demo(_) | Command::Sim { .. } => Ok(ExitCode::SUCCESS),
            }
        }
    }
}

async fn serve(config: paygate_core::Config) -> anyhow::Result<ExitCode> {
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let app = Application::build(listener, &config).await?;
    tracing::info!(addr = %app.local_addr(), backend = app.database().backend(), "paygate listening");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let janitor = tokio::spawn(janitor(&config, &app, stopped));
    app.run_until(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    })
    .await?;
    let _ = janitor.await;
    tracing::info!("paygate stopped");
    Ok(ExitCode::SUCCESS)
}

/// `serve`'s janitor: every `janitor_interval_ms`, one pass of
/// [`paygate_batch::Sweeper::janitor`] over the undecided payments whose
/// next check is due (grace: a confirm's in-flight window, so no live
/// confirm's payment is looked up). A pass another replica holds the lease
/// for is skipped; a pass still running at shutdown is dropped between two
/// awaits, which every step of it survives (each change is a guarded
/// transition, as when a replica dies). Its alerts go out with `serve`'s
/// own outbox sender.
fn janitor(
    config: &paygate_core::Config,
    app: &Application,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let interval = std::time::Duration::from_millis(config.janitor_interval_ms);
    let saga = app.saga();
    let sweeper = paygate_batch::Sweeper::new(saga.store().clone(), saga.clone(), app.database());
    let opts = paygate_batch::SweepOptions {
        grace: paygate_payments::in_flight_window(config.card_api_policy.deadline_ms),
        recheck: paygate_payments::wiring::recheck_schedule(config),
        concurrency: 4,
        ..paygate_batch::SweepOptions::default()
    };
    async move {
        if interval.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let pass = sweeper.janitor(&opts);
            let result = tokio::select! {
                _ = stopped.changed() => return,
                r = pass => r,
            };
            match result {
                Ok(s) if s.settled + s.unpaid + s.alerts + s.failures > 0 => {
                    tracing::info!(
                        scanned = s.scanned,
                        settled = s.settled,
                        unpaid = s.unpaid,
                        saved = s.saved,
                        alerts = s.alerts,
                        deferred = s.deferred,
                        failures = s.failures,
                        "janitor: undecided payments checked"
                    );
                }
                Ok(_) | Err(paygate_batch::BatchError::LeaseHeld { .. }) => {}
                Err(e) => tracing::warn!(error = %e, "janitor: pass failed; the next one retries"),
            }
        }
    }
}

async fn merchants(
    config: paygate_core::Config,
    command: MerchantsCommand,
) -> anyhow::Result<ExitCode> {
    let db = paygate_payments::wiring::open_database(&config, 1).await?;
    let store = SqlMerchantStore::new(db);
    match command {
        MerchantsCommand::Create { name } => {
            let key = generate_api_key();
            let merchant = Merchant {
                merchant_id: paygate_core::MerchantId::generate(),
                name,
                api_key_prefix: key.expose().chars().take(API_KEY_DISPLAY_LEN).collect(),
                created_at: paygate_core::time::now_ms(),
                revoked_at: None,
            };
            store
                .create(
                    &merchant,
                    &hash_api_key(&config.api_key_hash_key, key.expose()),
                )
                .await?;
            println!("merchant_id: {}", merchant.merchant_id);
            println!("name:        {}", merchant.name);
            println!("api_key:     {}", key.expose());
            println!("(the API key is shown once; only its keyed hash is stored)");
        }
        MerchantsCommand::List => {
            println!(
                "{:<32} {:<14} {:<8} name",
                "merchant_id", "key prefix", "status"
            );
            for m in store.list().await? {
                let status = if m.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<32} {:<14} {:<8} {}",
                    m.merchant_id, m.api_key_prefix, status, m.name
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
