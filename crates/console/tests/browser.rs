//! The console in a real browser: Debian's chromium, driven through
//! chromedriver (WebDriver) with fantoccini. An operator logs in, finds
//! the payment the sandbox left UNKNOWN on the Problems page, opens its
//! timeline, resolves it as approved with a reason, and sees it leave
//! Problems, completed with its ledger entry and the audit naming them. A
//! viewer's page has no resolve button and the viewer's forged POST is
//! refused. A screenshot of each page is written to
//! `$CARGO_TARGET_TMPDIR/console-screenshots/`.
//!
//! Needs `chromedriver` and `chromium` (`PAYGATE_TEST_CHROMEDRIVER`,
//! `PAYGATE_TEST_CHROMIUM`, default `/usr/bin/...`); without them it prints
//! SKIPPED and passes nothing, except under CI (`CI` or
//! `PAYGATE_TEST_REQUIRE_BROWSER` set; `.ci/run` installs both), where it
//! fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod support;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use paygate_core::Partition;
use paygate_state_store::testing::Backend;
use support::{csrf_in, env, Client, PASSWORD};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(var: &str, default: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.to_owned()));
    path.exists().then_some(path)
}

async fn start_browser() -> Option<(Driver, Browser)> {
    let (Some(driver), Some(chromium)) = (
        tool("PAYGATE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"),
        tool("PAYGATE_TEST_CHROMIUM", "/usr/bin/chromium"),
    ) else {
        assert!(
            std::env::var_os("PAYGATE_TEST_REQUIRE_BROWSER").is_none()
                && std::env::var_os("CI").is_none(),
            "CI must run the browser test: install chromium and chromium-driver"
        );
        println!("SKIPPED browser test: no chromedriver/chromium (PAYGATE_TEST_CHROMEDRIVER, PAYGATE_TEST_CHROMIUM)");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Driver(
        Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let profile = std::env::temp_dir().join(format!("paygate-chromium-{}", ulid::Ulid::new()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1366,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let http = hyper_util::client::legacy::connect::HttpConnector::new();
    let browser = ClientBuilder::new(http)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    Some((child, browser))
}

fn shots_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(b: &Browser, name: &str) {
    let png = b.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = shots_dir().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
}

/// Waits until the page's source contains `needle`; returns the source.
async fn until(b: &Browser, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let html = b.source().await.unwrap();
        if html.contains(needle) {
            return html;
        }
        assert!(
            Instant::now() < deadline,
            "page never showed {needle:?}: {html}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn log_in(b: &Browser, base: &str, name: &str) {
    b.goto(&format!("{base}/login")).await.unwrap();
    b.find(Locator::Css("#name"))
        .await
        .unwrap()
        .send_keys(name)
        .await
        .unwrap();
    b.find(Locator::Css("#password"))
        .await
        .unwrap()
        .send_keys(PASSWORD)
        .await
        .unwrap();
    b.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(b, &format!("{name} · ")).await;
}

async fn log_out(b: &Browser) {
    b.find(Locator::Css("form.who button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(b, "Operator name").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_resolves_an_unknown_payment_in_the_browser() {
    let Some((_driver, b)) = start_browser().await else {
        return;
    };
    let e = env(&Backend::Sqlite, |_| {}).await;
    let pid = e.unknown.payment_id.as_str().to_owned();
    // The Health page shows a replica's report, as serve writes it.
    paygate_api_log::ReplicaStatus::new(e.db.clone())
        .report(
            "replica-a:8080",
            &paygate_gateway::replica::snapshot(&e.saga),
        )
        .await
        .unwrap();

    b.goto(&format!("{}/login", e.base)).await.unwrap();
    shot(&b, "01-login").await;
    log_in(&b, &e.base, "alice").await;

    // Problems lists it, UNKNOWN, with its reason.
    let html = until(&b, &pid).await;
    assert!(html.contains("unknown"), "{html}");
    shot(&b, "02-problems").await;

    // Its page: the timeline has the confirm's log rows, its alert and
    // its event.
    b.find(Locator::Css(&format!("a[href='/payments/{pid}']")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let html = until(&b, "Timeline").await;
    for needle in [
        "card_api REQUEST",
        "outcome_unknown",
        "payment.unknown",
        "Resolve: approved",
    ] {
        assert!(html.contains(needle), "the page shows {needle:?}: {html}");
    }
    // A tall window, so the payment's screenshots show its timeline.
    b.set_window_size(1366, 2000).await.unwrap();
    shot(&b, "03-payment-unknown").await;

    // Resolve it as approved, with a reason.
    b.find(Locator::Css("#resolve-reason"))
        .await
        .unwrap()
        .send_keys("approved in the card company's console (browser test)")
        .await
        .unwrap();
    b.find(Locator::Css("button[name=decision][value=approved]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let html = until(&b, "resolved as approved").await;
    assert!(html.contains("completed_payments"), "{html}");
    assert!(
        !html.contains("Resolve: approved"),
        "no resolve button once settled"
    );
    shot(&b, "04-payment-resolved").await;
    b.set_window_size(1366, 900).await.unwrap();

    // Completed, saved, in the ledger, charged once.
    let (part, now) = e.store.get(&e.unknown.payment_id).await.unwrap().unwrap();
    assert_eq!(part, Partition::Completed);
    assert!(now.is_paid && now.is_saved, "{now:?}");
    assert_eq!(
        e.sandbox.ledger.record(&pid).expect("in the ledger").amount,
        15_000
    );
    assert_eq!(e.sandbox.card.stats().approvals, 1);
    // The audit names the operator: the decision and the console action.
    let decisions = paygate_api_log::ResolutionLog::new(e.db.clone())
        .for_payment(&pid)
        .await
        .unwrap();
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0].entry.operator, "alice");
    assert_eq!(decisions[0].entry.action, "approved");
    let audit = paygate_console::audit::AuditLog::new(e.db.clone())
        .for_payment(&pid)
        .await
        .unwrap();
    assert!(
        audit
            .iter()
            .any(|r| r.action == "resolve" && r.operator == "alice" && r.outcome == "ok"),
        "{audit:?}"
    );

    // It left Problems.
    b.goto(&format!("{}/problems", e.base)).await.unwrap();
    let html = until(&b, "Problems").await;
    assert!(!html.contains(&pid), "{html}");
    shot(&b, "05-problems-clear").await;

    // Search finds it by orderId; the other pages render.
    b.goto(&format!(
        "{}/search?order_id={}",
        e.base,
        e.unknown.order_id.as_str()
    ))
    .await
    .unwrap();
    until(&b, &pid).await;
    shot(&b, "06-search").await;
    b.goto(&format!("{}/alerts", e.base)).await.unwrap();
    until(&b, "outcome_unknown").await;
    shot(&b, "07-alerts").await;
    let now_ms = paygate_core::time::now_ms();
    paygate_reconcile::Reconciler::new(e.store.clone(), e.saga.clone(), e.db.clone())
        .run(&paygate_reconcile::ReconcileOptions::window(
            now_ms - 3_600_000,
            now_ms,
        ))
        .await
        .unwrap();
    b.goto(&format!("{}/reconciliation", e.base)).await.unwrap();
    let html = until(&b, "Reconciliation runs").await;
    assert_eq!(
        html.matches("No run yet.").count(),
        1,
        "the reconciliation run is listed, no batch run: {html}"
    );
    shot(&b, "08-reconciliation").await;
    b.goto(&format!("{}/health", e.base)).await.unwrap();
    until(&b, "replica-a:8080").await;
    shot(&b, "09-health").await;
    log_out(&b).await;

    // A viewer sees no resolve button; its forged POST is refused.
    let other = support::env(&Backend::Sqlite, |_| {}).await;
    let open = other.unknown.payment_id.as_str().to_owned();
    log_in(&b, &other.base, "victor").await;
    b.goto(&format!("{}/payments/{open}", other.base))
        .await
        .unwrap();
    let html = until(&b, "reads only").await;
    assert!(
        b.find(Locator::Css("button[name=decision]")).await.is_err(),
        "no resolve button"
    );
    assert!(!html.contains("/resolve"));
    shot(&b, "10-payment-viewer").await;
    let cookie = b.get_named_cookie("paygate_console").await.unwrap();
    let mut forged = Client::new(&other.base);
    forged
        .cookies
        .insert("paygate_console".into(), cookie.value().to_owned());
    let csrf = csrf_in(&html);
    let a = forged
        .post(
            &format!("/payments/{open}/resolve"),
            &[
                ("csrf", csrf.as_str()),
                ("decision", "approved"),
                ("reason", "forged"),
            ],
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    // And an operator's POST without the CSRF token is refused.
    let mut alice = Client::new(&other.base);
    alice.login("alice", PASSWORD).await;
    let a = alice
        .post(
            &format!("/payments/{open}/resolve"),
            &[("decision", "approved"), ("reason", "no token")],
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    let (_, still) = other
        .store
        .get(&other.unknown.payment_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        still.card_status.as_str(),
        "UNKNOWN",
        "nothing was resolved"
    );
    log_out(&b).await;

    // An admin's Operators page.
    log_in(&b, &other.base, "ada").await;
    b.goto(&format!("{}/operators", other.base)).await.unwrap();
    until(&b, "Create an operator").await;
    shot(&b, "11-operators").await;
    b.close().await.unwrap();
}
