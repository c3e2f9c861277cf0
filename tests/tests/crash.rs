//! The crash test (issue 8): `paygate serve` as a child process against
//! `paygate sim` (flaky faults) over HTTP, confirms driven by merchant-like
//! clients that retry what got no answer, and `kill -9` of the gateway at
//! random moments, again and again; then the batch, the reconciliation and
//! the invariant checker: zero lost approvals, zero double charges. On
//! SQLite, on PostgreSQL when `PAYGATE_TEST_POSTGRES_URL` is set, and with
//! the state records in MongoDB (standalone and replica set) beside SQLite
//! when `PAYGATE_TEST_MONGODB_URI` / `PAYGATE_TEST_MONGODB_RS_URI` are set
//! (`e2e_backends`; the binary gets its stores as `PAYGATE_*` variables).
//!
//! Kills per backend: `PAYGATE_CRASH_KILLS` (default 5, the short form CI
//! runs; `PAYGATE_CRASH_KILLS=20 cargo test -p paygate-e2e --test crash` is the
//! full run). The random schedule's seed is printed and can be replayed with
//! `PAYGATE_CRASH_SEED`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::{
    collections::{BTreeMap, VecDeque},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use paygate_e2e::*;
use paygate_state_store::testing::{e2e_backends, fresh_e2e, E2eStores};

/// A small deterministic generator (xorshift64*): the schedule is replayable
/// from its printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % below.max(1)
    }
}

/// Tries per order before a merchant stops asking (and would poll `GET`).
const MAX_TRIES: usize = 4;

/// What the merchants know: each order's last answer (0 = no answer) and tries.
#[derive(Default)]
struct Merchants {
    last: Mutex<BTreeMap<usize, (u16, usize)>>,
    retry: Mutex<VecDeque<usize>>,
    next: AtomicUsize,
}

impl Merchants {
    /// The next order to send: one that got no final answer first, else a new one.
    fn take(&self, new_allowed: bool) -> Option<usize> {
        if let Some(i) = self.retry.lock().unwrap().pop_front() {
            return Some(i);
        }
        new_allowed.then(|| self.next.fetch_add(1, Ordering::SeqCst))
    }

    fn answer(&self, i: usize, status: u16) {
        let tries = {
            let mut last = self.last.lock().unwrap();
            let entry = last.entry(i).or_insert((0, 0));
            *entry = (status, entry.1 + 1);
            entry.1
        };
        // No answer, still in flight, or "cannot proceed now": ask again
        // later, a few times (a record left PENDING by a kill answers 409
        // until the batch settles it).
        if matches!(status, 0 | 409 | 503) && tries < MAX_TRIES {
            self.retry.lock().unwrap().push_back(i);
        }
    }
}

fn confirm(client: &reqwest::blocking::Client, base: &str, key: &str, i: usize) -> u16 {
    client
        .post(format!("{base}/v1/payments/confirm"))
        .bearer_auth(key)
        .json(&serde_json::json!({
            "paymentKey": format!("pk_crash_{i}"),
            "orderId": format!("order-crash-{i:06}"),
            "amount": 1_000 + (i % 50) as i64 * 100,
        }))
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

fn with_env(c: &mut Command, db: &E2eStores, card: &str, ledger: &str) {
    c.envs(db.env())
        .env("PAYGATE_CARD_API_URL", card)
        .env("PAYGATE_CARD_API_SECRET_KEY", SIM_SECRET)
        .env("PAYGATE_LEDGER_API_URL", ledger);
}

/// Starts `serve` on the stores and the simulators.
fn serve_on(db: &E2eStores, card: &str, ledger: &str) -> (KillOnDrop, String) {
    let mut envs = db.env();
    envs.extend([
        ("PAYGATE_CARD_API_URL", card.to_owned()),
        ("PAYGATE_CARD_API_SECRET_KEY", SIM_SECRET.to_owned()),
        ("PAYGATE_LEDGER_API_URL", ledger.to_owned()),
    ]);
    start_serve(&envs)
}

/// Runs `paygate` with the environment; returns its stdout, asserting success.
fn run(db: &E2eStores, card: &str, ledger: &str, args: &[&str]) -> String {
    let mut c = paygate();
    c.args(args);
    with_env(&mut c, db, card, ledger);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "paygate {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn crash_run(db: &E2eStores, kills: usize, seed: u64, label: &str) {
    let (_sim, card, ledger) = start_sim(&[
        "--faults",
        "flaky",
        "--seed",
        &seed.to_string(),
        "--approve-duplicate-confirms",
    ]);
    let key = create_merchant(&db.database_url, "crash-merchant");
    let merchants = Arc::new(Merchants::default());
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    for round in 0..=kills {
        let last_round = round == kills;
        let (mut serve, base) = serve_on(db, &card, &ledger);
        let stop = Arc::new(AtomicBool::new(false));
        let drivers: Vec<_> = (0..8)
            .map(|_| {
                let (merchants, stop, base, key) =
                    (merchants.clone(), stop.clone(), base.clone(), key.clone());
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(15))
                        .build()
                        .unwrap();
                    // In the last round: only what still lacks an answer.
                    while !stop.load(Ordering::SeqCst) {
                        let Some(i) = merchants.take(!last_round) else {
                            break;
                        };
                        let status = confirm(&client, &base, &key, i);
                        merchants.answer(i, status);
                        if status == 409 {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        if last_round && status == 0 {
                            break;
                        }
                    }
                })
            })
            .collect();
        if last_round {
            drivers.into_iter().for_each(|d| d.join().unwrap());
            let pid = serve.0.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            serve.0.wait().unwrap();
        } else {
            std::thread::sleep(Duration::from_millis(150 + rng.next(650)));
            // kill -9: no drain, no flush, mid-whatever it was doing.
            serve.0.kill().unwrap();
            serve.0.wait().unwrap();
            stop.store(true, Ordering::SeqCst);
            drivers.into_iter().for_each(|d| d.join().unwrap());
        }
    }
    let sent = merchants.next.load(Ordering::SeqCst);
    let answers = merchants.last.lock().unwrap().clone();
    let count = |code: u16| answers.values().filter(|(s, _)| *s == code).count();
    eprintln!(
        "{label}: {kills} kill -9s, {sent} orders, answers: 200={} 202={} 402={} 409={} 503={} none={} ({} ms)",
        count(200), count(202), count(402), count(409), count(503), count(0),
        started.elapsed().as_millis()
    );
    // What the crashes left: the batch saves and settles, the reconciliation
    // recovers what is still pending (stale after 0 s: everyone has stopped),
    // and a second batch moves what the reconciliation recovered.
    run(
        db,
        &card,
        &ledger,
        &["batch", "--once", "--grace", "0s", "--json"],
    );
    run(
        db,
        &card,
        &ledger,
        &["reconcile", "--from", "1h", "--stale-after", "0s", "--json"],
    );
    run(
        db,
        &card,
        &ledger,
        &["batch", "--once", "--grace", "0s", "--json"],
    );
    let mut c = paygate();
    c.args(["check", "--json"]);
    with_env(&mut c, db, &card, &ledger);
    let out = c.output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    eprintln!("{label}: check {report}");
    assert_eq!(report["lost"], 0, "{label}: {report}");
    assert_eq!(report["double_charges"], 0, "{label}: {report}");
    assert!(out.status.success());
    assert!(
        report["approvals"].as_u64().unwrap() > 0,
        "{label}: the run approved payments"
    );
}

#[test]
fn kill_9_at_random_moments_loses_no_approval_and_charges_nothing_twice() {
    let kills: usize = std::env::var("PAYGATE_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("PAYGATE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test: {kills} kills per backend, PAYGATE_CRASH_SEED={seed}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    for backend in e2e_backends() {
        let (stores, cleanup) = rt.block_on(fresh_e2e(&backend));
        crash_run(&stores, kills, seed, &backend.name());
        rt.block_on(cleanup.run());
    }
}
