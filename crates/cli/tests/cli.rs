//! Tests of the `paygate` binary as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn paygate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_paygate"));
    // Start from a clean configuration environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYGATE_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "info");
    c
}

fn temp_db(name: &str) -> (String, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("paygate-cli-{name}-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    (format!("sqlite://{}", path.display()), path)
}

/// `paygate merchants create NAME`, returning the key it prints once.
fn create_merchant(url: &str, name: &str) -> String {
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

fn remove_db(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[test]
fn demo_under_flaky_faults_reports_no_lost_or_double_charges() {
    let out = paygate()
        .args([
            "demo",
            "--payments",
            "300",
            "--concurrency",
            "16",
            "--faults",
            "flaky",
            "--json",
        ])
        .output()
        .expect("demo runs");
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "sent",
        "approved",
        "declined",
        "unknown",
        "saved",
        "unsaved",
        "sandbox_approvals",
        "lost",
        "double_charges",
        "throughput_per_s",
        "p50_ms",
        "p99_ms",
    ] {
        assert!(summary.get(key).is_some(), "missing {key}");
    }
    assert_eq!(summary["lost"], 0);
    assert_eq!(summary["double_charges"], 0);
    // 300 orders, every 10th repeated, every 50th also sent concurrently.
    assert_eq!(summary["sent"], 300 + 30 + 6);
    assert!(
        summary["declined"].as_u64().unwrap() > 0,
        "flaky declines some"
    );
    assert!(summary["sandbox_approvals"].as_u64().unwrap() > 250);
}

#[test]
fn a_typo_or_a_bad_value_fails_startup_naming_the_key() {
    let (url, _) = temp_db("typo");
    let out = paygate()
        .args(["migrate"])
        .env("PAYGATE_DATABASE_URL", &url)
        .env("PAYGATE_LISTN", "x")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listn"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = paygate()
        .args(["migrate"])
        .env("PAYGATE_DATABASE_URL", &url)
        .env("PAYGATE_LISTEN", "nope")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`listen`"));

    let out = paygate()
        .args(["serve"])
        .env("PAYGATE_CARD_API_SECRET_KEY", "live_sk_x")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the sandbox refuses a live key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("card_api_secret_key"));
}

#[test]
fn merchants_create_shows_the_key_once_and_list_never_does() {
    let (url, path) = temp_db("merchants");
    let key = create_merchant(&url, "Acme Shop");
    assert!(key.starts_with("pgk_"));

    let out = paygate()
        .args(["merchants", "list"])
        .env("PAYGATE_DATABASE_URL", &url)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("Acme Shop") && list.contains(&key[..12]));
    assert!(!list.contains(&key), "the full key is never shown again");
    remove_db(&path);
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_in_sandbox_mode_confirms_a_payment() {
    let (url, path) = temp_db("serve");
    let key = create_merchant(&url, "shop");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = paygate()
        .args(["serve"])
        .env("PAYGATE_DATABASE_URL", &url)
        .env("PAYGATE_LISTEN", format!("127.0.0.1:{port}"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = KillOnDrop(child);
    let mut lines = BufReader::new(stderr).lines();
    let mut saw_sandbox = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        saw_sandbox |= line.contains("SANDBOX MODE");
        if line.contains("paygate listening") {
            break;
        }
    }
    assert!(saw_sandbox, "startup says the sandbox runs in-process");

    let client = reqwest::blocking::Client::new();
    let resp = client
        .post(format!("http://127.0.0.1:{port}/v1/payments/confirm"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"paymentKey": "pk_cli_1", "orderId": "order-cli-1", "amount": 12000}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["status"], "DONE");
    assert_eq!(body["saved"], true);
    drop(child);
    remove_db(&path);
}

#[test]
fn batch_once_prints_its_summary_as_json_and_rejects_a_bad_cron() {
    let (url, path) = temp_db("batch");
    let out = paygate()
        .args(["batch", "--once", "--grace", "0s", "--json"])
        .env("PAYGATE_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "scanned",
        "completed",
        "unpaid",
        "settled",
        "retried",
        "saved",
        "alerts",
        "failures",
        "duration_ms",
    ] {
        assert!(summary.get(key).is_some(), "missing {key}");
    }
    let out = paygate()
        .args(["batch", "--cron", "every day"])
        .env("PAYGATE_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cron"));
    remove_db(&path);
}

#[test]
fn mongodb_state_store_is_selected_and_its_uri_never_echoed() {
    let (url, path) = temp_db("mongo");
    // Without a URI: refused by validation, naming the key.
    let out = paygate()
        .args(["serve"])
        .env("PAYGATE_DATABASE_URL", &url)
        .env("PAYGATE_STATE_STORE", "mongodb")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mongodb_uri"));
    // With a URI to a closed port: the MongoDB backend is tried and fails
    // fast, and the password in the URI never reaches the output.
    let out = paygate()
        .args(["serve"])
        .env("PAYGATE_DATABASE_URL", &url)
        .env("PAYGATE_LISTEN", "127.0.0.1:0")
        .env("PAYGATE_STATE_STORE", "mongodb")
        .env(
            "PAYGATE_MONGODB_URI",
            "mongodb://paygate:s3cret-pw@127.0.0.1:9/?serverSelectionTimeoutMS=300",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("store unavailable"), "{stderr}");
    assert!(
        !stderr.contains("s3cret-pw"),
        "the URI's password leaked: {stderr}"
    );
    let out = paygate()
        .args(["serve"])
        .env("PAYGATE_DATABASE_URL", &url)
        .env("PAYGATE_STATE_STORE", "mongodb")
        .env("PAYGATE_MONGODB_URI", "mongodb://paygate:s3cret-pw@[bad")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid MongoDB connection string") && !stderr.contains("s3cret-pw"),
        "{stderr}"
    );
    remove_db(&path);
}

/// The key `paygate sim` accepts by default (`paygate_gateway::SANDBOX_CARD_SECRET`).
const SIM_SECRET: &str = "test_sk_paygate_sandbox";

/// A port free a moment ago (the OS picks it; the child binds it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn reconcile_dry_run_pages_a_generated_list_and_prints_the_plan() {
    let (card_port, ledger_port) = (free_port(), free_port());
    let mut sim = Killed(
        paygate()
            .args(["sim", "--transactions", "120", "--page-latency-ms", "5"])
            .args(["--card-port", &card_port.to_string()])
            .args(["--ledger-port", &ledger_port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Ready once it printed its addresses.
    let mut lines = BufReader::new(sim.0.stdout.take().unwrap()).lines();
    let banner: Vec<String> = (0..3).map(|_| lines.next().unwrap().unwrap()).collect();
    assert!(
        banner.iter().any(|l| l.contains("120 generated")),
        "{banner:?}"
    );
    let (url, path) = temp_db("reconcile");
    let out = paygate()
        .args(["reconcile", "--dry-run", "--json", "--from", "25h"])
        .args(["--page-size", "50", "--slices", "1"])
        .env("PAYGATE_DATABASE_URL", &url)
        .env(
            "PAYGATE_CARD_API_URL",
            format!("http://127.0.0.1:{card_port}"),
        )
        .env("PAYGATE_CARD_API_SECRET_KEY", SIM_SECRET)
        .env(
            "PAYGATE_LEDGER_API_URL",
            format!("http://127.0.0.1:{ledger_port}"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let keys: Vec<&str> = summary
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut want = [
        "transactions",
        "pages",
        "matched",
        "recovered",
        "cancelled",
        "alerts",
        "failures",
        "duration_ms",
    ];
    want.sort_unstable();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, want);
    // 120 in pages of 50: 50, 50, 20 — three requests, no empty fourth.
    assert_eq!(summary["transactions"], 120);
    assert_eq!(summary["pages"], 3);
    // paygate has none of them: the plan cancels every one, and nothing ran.
    assert_eq!(summary["cancelled"], 120);
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.starts_with("plan: cancel orphan approval"))
            .count(),
        120
    );
    let out = paygate()
        .args(["reconcile", "--from", "1h", "--to", "2h"])
        .env("PAYGATE_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--to must be after --from"));
    remove_db(&path);
}
