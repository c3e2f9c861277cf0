//! `paygate console` (the operator console on `console_listen`) and
//! `paygate operators` (its accounts).
//!
//! - `console`: serves the console until SIGINT or SIGTERM, over the same
//!   stores, card API and ledger as the other operator commands.
//! - `operators create NAME --role viewer|operator|admin`: creates an
//!   account. The password is read from the first line of standard input
//!   when it is not a terminal (`--password-stdin`); otherwise one is
//!   generated and printed once.
//! - `operators list`, `operators disable NAME`.
//!
//! Exit codes: 0 done; 1 refused (a taken name, a short password).

use std::{io::BufRead, process::ExitCode};

use anyhow::Context;
use paygate_console::{
    operators::{OperatorStore, Role},
    Console, ConsoleSettings,
};
use tokio::net::TcpListener;

use crate::ops::{local_time, open_stores, zone};

/// `paygate operators ...`.
#[derive(clap::Subcommand, Debug)]
pub enum OperatorsCommand {
    /// Create an operator account.
    Create {
        /// Login name: 1-64 of a-z, 0-9, '.', '_', '-'.
        name: String,
        /// viewer (reads), operator (also resolves, rechecks, cancels,
        /// resends) or admin (also manages operators).
        #[arg(long)]
        role: String,
        /// Read the password (12 characters or more) from the first line
        /// of standard input instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List operator accounts.
    List,
    /// Disable an account: it cannot log in, its sessions end.
    Disable {
        /// The login name.
        name: String,
    },
}

/// Runs `paygate console`.
///
/// # Errors
/// Setup failures (config, database, listener).
pub async fn serve(config: paygate_core::Config) -> anyhow::Result<ExitCode> {
    let listener = TcpListener::bind(&config.console_listen)
        .await
        .with_context(|| format!("binding {}", config.console_listen))?;
    let (components, _sandbox) = paygate_gateway::components(&config).await?;
    if _sandbox.is_some() {
        tracing::warn!("sandbox mode: rechecks and resolves ask this process's own card simulator, not serve's; set PAYGATE_CARD_API_URL to share one");
    }
    let console = Console::build(listener, ConsoleSettings::from_config(&config), components)?;
    tracing::info!(addr = %console.local_addr(), "paygate console listening");
    console.run_until(crate::shutdown_signal()).await?;
    tracing::info!("console stopped");
    Ok(ExitCode::SUCCESS)
}

fn generated_password() -> String {
    // 18 random bytes, base64url: 24 characters, 144 bits.
    let mut b = [0u8; 18];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b)
}

/// Runs `paygate operators ...`.
///
/// # Errors
/// Setup failures (config, database).
pub async fn operators(
    config: paygate_core::Config,
    command: OperatorsCommand,
) -> anyhow::Result<ExitCode> {
    let (db, _store) = open_stores(&config).await?;
    let store = OperatorStore::new(db);
    match command {
        OperatorsCommand::Create {
            name,
            role,
            password_stdin,
        } => {
            let role = Role::parse(&role)?;
            let (password, generated) = if password_stdin {
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                (line.trim_end_matches(['\r', '\n']).to_owned(), false)
            } else {
                (generated_password(), true)
            };
            match store.create(&name, role, &password).await {
                Ok(true) => {
                    println!("operator {name} created ({})", role.as_str());
                    if generated {
                        println!("password: {password}");
                        println!("(shown once; log in at the console and keep it in your password manager)");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Ok(false) => {
                    eprintln!("operator {name:?} exists already");
                    Ok(ExitCode::FAILURE)
                }
                Err(paygate_console::ConsoleError::Invalid(why)) => {
                    eprintln!("{why}");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e.into()),
            }
        }
        OperatorsCommand::List => {
            let zone = zone(&config);
            let rows = store.list().await?;
            if rows.is_empty() {
                println!("no operators (create one: paygate operators create NAME --role admin)");
            }
            for o in rows {
                println!(
                    "{:<24} {:<9} created {}  {}",
                    o.name,
                    o.role.as_str(),
                    local_time(o.created_at, zone),
                    o.disabled_at
                        .map(|t| format!("disabled {}", local_time(t, zone)))
                        .unwrap_or_else(|| "enabled".to_owned())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        OperatorsCommand::Disable { name } => {
            if store.disable(&name).await? {
                println!("operator {name} disabled; their sessions ended");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("no enabled operator {name:?}");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}
