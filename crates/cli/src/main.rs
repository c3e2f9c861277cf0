//! `paygate`: the one binary. Everything is in the library (`paygate::main`),
//! so the end-to-end suite (`tests/`, package `paygate-e2e`) can build the
//! same command as its own test binary.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    paygate::main().await
}
