//! paygate-e2e: helpers shared by the workspace-level end-to-end suites in
//! `tests/tests/`: the `paygate` command with a clean environment, temporary
//! databases, merchants, and child processes that are killed on drop.
//!
//! The suites run the real binary as a child process over real HTTP, the way
//! an operator does; the binary is `paygate-under-test`, this package's build
//! of the CLI library (the same code as `paygate`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)] // test helpers

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

/// The key `paygate sim` accepts by default (`paygate_sandbox::SANDBOX_CARD_SECRET`).
pub const SIM_SECRET: &str = "test_sk_paygate_sandbox";

/// The binary under test: `target/<profile>/paygate-under-test`, beside the
/// suite's own executable in `target/<profile>/deps/` (where
/// `CARGO_BIN_EXE_paygate-under-test` points; that variable is set for the
/// suites, not for this library).
pub fn binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    profile_dir.join(format!(
        "paygate-under-test{}",
        std::env::consts::EXE_SUFFIX
    ))
}

/// The `paygate` command with a clean configuration environment.
pub fn paygate() -> Command {
    let mut c = command_at(&binary());
    c.env("RUST_LOG", "info");
    c
}

/// `bin` with no inherited `PAYGATE_*` variable: the caller sets the
/// configuration it means (the drill runs a binary it was given).
pub fn command_at(bin: &std::path::Path) -> Command {
    let mut c = Command::new(bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYGATE_") {
            c.env_remove(k);
        }
    }
    c
}

pub fn temp_db(name: &str) -> (String, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("paygate-cli-{name}-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    (format!("sqlite://{}", path.display()), path)
}

/// `paygate merchants create NAME`, returning the key it prints once.
pub fn create_merchant(url: &str, name: &str) -> String {
    let out = paygate()
        .args(["merchants", "create", name])
        .env("PAYGATE_DATABASE_URL", url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("api_key:"))
        .unwrap()
        .trim()
        .to_owned()
}

pub fn remove_db(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `paygate serve` on a free port with `envs` (the stores, the
/// downstreams, anything else) and the inbound rate limit off, and waits
/// until it listens; its stderr is drained. Returns it and its base URL.
pub fn start_serve(envs: &[(&str, String)]) -> (KillOnDrop, String) {
    let port = free_port();
    let mut c = paygate();
    c.arg("serve")
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .env("PAYGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("PAYGATE_INBOUND_RATE_LIMIT_PER_SECOND", "0")
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        assert!(std::time::Instant::now() < deadline, "serve did not start");
        match lines.next() {
            Some(Ok(l)) if l.contains("paygate listening") => break,
            Some(_) => {}
            None => panic!("serve exited before listening"),
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (KillOnDrop(child), format!("http://127.0.0.1:{port}"))
}

/// A port free a moment ago (the OS picks it; the child binds it).
pub fn free_port() -> u16 {
    try_free_port().unwrap()
}

/// [`free_port`], with the OS's refusal as an error.
///
/// # Errors
/// Loopback cannot be bound.
pub fn try_free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `paygate sim` on free ports; returns it and (card, ledger) URLs.
pub fn start_sim(extra: &[&str]) -> (KillOnDrop, String, String) {
    let (card_port, ledger_port) = (free_port(), free_port());
    let mut sim = KillOnDrop(
        paygate()
            .arg("sim")
            .args(extra)
            .args(["--card-port", &card_port.to_string()])
            .args(["--ledger-port", &ledger_port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(sim.0.stdout.take().unwrap()).lines();
    // Ready once it printed its last address (both servers are bound by then).
    loop {
        let line = lines
            .next()
            .expect("sim exited before it was ready")
            .unwrap();
        if line.starts_with("ledger simulator:") {
            break;
        }
    }
    // Keep reading, so the sim never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (
        sim,
        format!("http://127.0.0.1:{card_port}"),
        format!("http://127.0.0.1:{ledger_port}"),
    )
}

/// Claims a cancel of `amount` (minor units) of the paid record `r`, as a
/// merchant's request does before its card call (no Idempotency-Key).
///
/// # Panics
/// When the store fails or answers anything but a fresh claim.
pub async fn claim_cancel(
    store: &dyn paygate_state_store::StateStore,
    r: &paygate_core::PaymentRecord,
    amount: i64,
) -> paygate_state_store::CancelRecord {
    let draft = paygate_state_store::CancelDraft {
        payment_id: r.payment_id.clone(),
        merchant_id: r.merchant_id.clone(),
        total_amount: r.amount,
        amount: Some(amount),
        reason: "refund".into(),
        idempotency_key: None,
        request_fingerprint: "fp".into(),
        now: paygate_core::time::now_ms(),
    };
    match store.claim_cancel(&draft).await.unwrap() {
        paygate_state_store::CancelClaim::Claimed(c) => c,
        other => panic!("expected a claim, got {other:?}"),
    }
}

/// Creates a merchant named `name` in `db` with a fresh API key hashed
/// under `hash_key` (as `paygate merchants create` does); returns the key.
///
/// # Panics
/// When the merchant cannot be stored.
pub async fn merchant_key(
    db: &paygate_state_store::SqlDatabase,
    hash_key: &paygate_core::Secret<String>,
    name: &str,
) -> String {
    use paygate_core::crypto;
    let key = crypto::generate_api_key();
    paygate_state_store::SqlMerchantStore::new(db.clone())
        .create(
            &paygate_state_store::Merchant {
                merchant_id: paygate_core::MerchantId::generate(),
                name: name.to_owned(),
                api_key_prefix: key.expose()[..crypto::API_KEY_DISPLAY_LEN].to_owned(),
                created_at: paygate_core::time::now_ms(),
                revoked_at: None,
            },
            &crypto::hash_api_key(hash_key, key.expose()),
        )
        .await
        .unwrap();
    key.expose().clone()
}
