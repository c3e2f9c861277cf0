//! The `paygate` command, built inside the end-to-end package so its suites
//! can run it as a child process (see `paygate_e2e::paygate`).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    paygate::main().await
}
