//! The operator commands (issue 19) as an operator runs them: the real
//! binary against a real database (SQLite, and PostgreSQL when
//! `PAYGATE_TEST_POSTGRES_URL` is set) and the sandbox simulators, after a
//! scripted history made by the real saga.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use paygate_alert::{Alert, AlertReason, Alerter, Listing, SqlOutbox};
use paygate_api_log::{Kind, LogEntry, ResolutionLog, SqlApiLog, Target};
use paygate_core::{
    config::DownstreamPolicy, Config, MerchantId, OrderId, Partition, PaymentRecord, Secret,
};
use paygate_e2e::{paygate, start_sim, SIM_SECRET};
use paygate_payments::{Components, ConfirmInput, ConfirmOutcome};
use paygate_sandbox::{DiscordSim, FaultProfile, SandboxServers};
use paygate_state_store::{
    testing::{fresh_sql_url, sql_backends, Backend, Cleanup},
    with_pool, SqlDatabase, Transition,
};
use serde_json::Value;

const SECRET: &str = "test_sk_ops";

struct Env {
    sandbox: SandboxServers,
    c: Components,
    url: String,
    cleanup: Cleanup,
    merchant: MerchantId,
}

/// The sandbox (answers held `hold_ms` when `drop` is on), a fresh
/// database, and the components over them with short card timeouts.
async fn env(backend: &Backend, drop: bool) -> Env {
    let profile = FaultProfile {
        drop_response_rate: if drop { 1.0 } else { 0.0 },
        drop_hold_ms: 3_000,
        ..FaultProfile::none()
    };
    let sandbox = SandboxServers::start(profile, SECRET).await.unwrap();
    let (url, cleanup) = fresh_sql_url(backend).await;
    let config = Config {
        database_url: Secret::new(url.clone()),
        card_api_url: Some(sandbox.card_url.clone()),
        card_api_secret_key: Some(Secret::new(SECRET.into())),
        ledger_api_url: Some(sandbox.ledger_url.clone()),
        card_api_policy: DownstreamPolicy {
            attempt_timeout_ms: 400,
            deadline_ms: 2_000,
            max_attempts: 2,
            ..DownstreamPolicy::card_api()
        },
        card_api_lookup_attempts: 1,
        ..Config::default()
    };
    let c = Components::build(&config, None).await.unwrap();
    Env {
        sandbox,
        c,
        url,
        cleanup,
        merchant: MerchantId::generate(),
    }
}

impl Env {
    /// `paygate <args>` on this database and sandbox.
    fn cli(&self, args: &[&str]) -> Output {
        paygate()
            .args(args)
            .env("PAYGATE_DATABASE_URL", &self.url)
            .env("PAYGATE_CARD_API_URL", &self.sandbox.card_url)
            .env("PAYGATE_CARD_API_SECRET_KEY", SECRET)
            .env("PAYGATE_LEDGER_API_URL", &self.sandbox.ledger_url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    async fn record(&self, order: &str) -> PaymentRecord {
        let r = PaymentRecord::new_pending(
            self.merchant.clone(),
            OrderId::parse(order).unwrap(),
            format!("pk_{order}"),
            5_000,
            "KRW".into(),
            format!("fp_{order}"),
            None,
            paygate_core::time::now_ms(),
        );
        self.c.store.create(&r).await.unwrap();
        r
    }

    async fn t(&self, r: &PaymentRecord, t: Transition) {
        assert!(
            self.c.store.transition(&r.payment_id, &t).await.unwrap(),
            "{t:?}"
        );
    }

    fn db(&self) -> &SqlDatabase {
        &self.c.db
    }

    /// Makes `r`'s last change `ms` older (a record whose confirm is long
    /// over, as an operator finds it).
    async fn age(&self, r: &PaymentRecord, ms: i64) {
        paygate_state_store::with_pool!(self.db(), pool => {
            sqlx::query("UPDATE realtime_payments SET updated_at = updated_at - $1 WHERE payment_id = $2")
                .bind(ms)
                .bind(r.payment_id.as_str())
                .execute(pool)
                .await
                .unwrap();
        });
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn paid() -> Transition {
    Transition::MarkPaid {
        approved_at: "2026-11-21T12:00:00+09:00".into(),
    }
}

/// Acceptance 1: an answer lost → UNKNOWN → shown and listed → resolved
/// approved (after a contradicted "not charged" is refused) → saved in the
/// ledger → completed, with the audit row and the alert resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_resolved_approved_by_an_operator_and_audited() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, true).await;
        // The card company approves and its answer is held: the card goes
        // down at that moment, so the retry and the lookup fail too.
        let saga = e.c.saga.clone();
        let input = ConfirmInput {
            merchant_id: e.merchant.clone(),
            payment_key: "pk_lost_1".into(),
            order_id: OrderId::parse("order-lost-1").unwrap(),
            amount: 15_000,
            idempotency_key: None,
        };
        let confirm = tokio::spawn(async move { saga.confirm(input).await });
        let deadline = Instant::now() + Duration::from_secs(10);
        while e.sandbox.card.stats().approvals == 0 {
            assert!(Instant::now() < deadline, "{name}: no approval");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        e.sandbox.card.set_down(true);
        let outcome = confirm.await.unwrap();
        let ConfirmOutcome::Unknown(record) = outcome else {
            panic!("{name}: expected an unknown outcome, got {outcome:?}");
        };
        e.sandbox.card.set_down(false);
        let pid = record.payment_id.to_string();
        let outbox = SqlOutbox::new(e.db().clone());
        let alerts = outbox.for_payment(&pid).await.unwrap();
        assert_eq!(alerts.len(), 1, "{name}: {alerts:?}");
        assert_eq!(alerts[0].reason, "outcome_unknown");

        // The problem list shows it.
        let list = json_lines(&ok(&e.cli(&["payments", "list", "--problems", "--json"])));
        assert!(
            list.iter()
                .any(|p| p["paymentId"] == pid.as_str() && p["kind"] == "unknown"),
            "{name}: {list:?}"
        );
        // So does show, by orderId: the record, the log rows in order, the alert.
        let shown: Value =
            serde_json::from_str(&ok(&e.cli(&["payments", "show", "order-lost-1", "--json"])))
                .unwrap();
        assert_eq!(shown["payment"]["paymentId"], pid.as_str());
        assert_eq!(shown["payment"]["cardStatus"], "UNKNOWN");
        let kinds: Vec<&str> = shown["apiLogs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds.first(), Some(&"REQUEST"), "{name}: {kinds:?}");
        assert!(
            kinds.contains(&"ERROR"),
            "{name}: the lost answer: {kinds:?}"
        );
        let ids: Vec<i64> = shown["apiLogs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
        assert_eq!(shown["alerts"][0]["reason"], "outcome_unknown");
        let text = ok(&e.cli(&["payments", "show", &pid]));
        assert!(
            text.contains("UNKNOWN") && text.contains("outcome_unknown"),
            "{text}"
        );

        // "Not charged" contradicts the card company's approval: refused.
        let out = e.cli(&[
            "payments",
            "resolve",
            &pid,
            "--not-charged",
            "--reason",
            "customer says no",
            "--operator",
            "bob",
        ]);
        assert!(!out.status.success(), "{name}: refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("contradicts") && err.contains("approved"),
            "{err}"
        );
        let audit = ResolutionLog::new(e.db().clone());
        assert!(
            audit.for_payment(&pid).await.unwrap().is_empty(),
            "nothing written"
        );
        let (part, now) = e.c.store.get(&record.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (part, now.card_status.as_str()),
            (Partition::Realtime, "UNKNOWN")
        );

        // "Approved" agrees with it: paid, saved in the ledger, completed.
        let out = ok(&e.cli(&[
            "payments",
            "resolve",
            &pid,
            "--approved",
            "--reason",
            "approved in the card console",
            "--operator",
            "alice",
        ]));
        assert!(out.contains("resolved"), "{out}");
        let (part, now) = e.c.store.get(&record.payment_id).await.unwrap().unwrap();
        assert_eq!(part, Partition::Completed, "{name}: {now:?}");
        assert!(now.is_paid && now.is_saved);
        let entry = e.sandbox.ledger.record(&pid).expect("in the ledger");
        assert_eq!(entry.amount, 15_000);
        assert_eq!(e.sandbox.card.stats().approvals, 1, "no second charge");

        // The audit row: who, before, after, reason, evidence.
        let rows = audit.for_payment(&pid).await.unwrap();
        assert_eq!(rows.len(), 1, "{name}: {rows:?}");
        let a = &rows[0].entry;
        assert_eq!(
            (
                a.action.as_str(),
                a.operator.as_str(),
                a.reason.as_str(),
                a.forced
            ),
            ("approved", "alice", "approved in the card console", false)
        );
        assert!(a.card_evidence.contains("approved"), "{}", a.card_evidence);
        assert_eq!(a.before["cardStatus"], "UNKNOWN");
        assert_eq!(a.before["partition"], "realtime_payments");
        assert_eq!(a.after["partition"], "completed_payments");
        assert_eq!(a.after["isSaved"], true);
        // The alert is resolved by it, and the list is clear.
        let alerts = outbox.for_payment(&pid).await.unwrap();
        assert!(alerts[0].resolved_at.is_some(), "{alerts:?}");
        assert_eq!(alerts[0].resolution_id, Some(rows[0].id));
        let list = json_lines(&ok(&e.cli(&["payments", "list", "--problems", "--json"])));
        assert!(
            list.iter().all(|p| p["paymentId"] != pid.as_str()),
            "{list:?}"
        );
        // show prints the decision.
        let text = ok(&e.cli(&["payments", "show", &pid]));
        assert!(text.contains("approved by alice"), "{text}");

        // The audit is append-only in the database itself.
        let update = with_pool!(e.db(), pool => sqlx::query("UPDATE payment_resolutions SET operator = 'mallory'").execute(pool).await.map(|_| ()));
        assert!(update.is_err(), "{name}: audit rows cannot be changed");
        let delete = with_pool!(e.db(), pool => sqlx::query("DELETE FROM payment_resolutions").execute(pool).await.map(|_| ()));
        assert!(delete.is_err(), "{name}: audit rows cannot be deleted");
        assert_eq!(
            audit.for_payment(&pid).await.unwrap()[0].entry.operator,
            "alice"
        );

        // A settled payment is not resolved again.
        let out = e.cli(&[
            "payments",
            "resolve",
            &pid,
            "--approved",
            "--reason",
            "again",
            "--operator",
            "alice",
        ]);
        assert!(!out.status.success());
        e.cleanup.run().await;
    }
}

/// `resolve --not-charged` against a card company with no payment: aborted,
/// filed unpaid; and `--approved` against no payment is refused unless
/// forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_charged_files_unpaid_and_force_overrides_a_contradiction() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, false).await;
        let a = e.record("order-never-1").await;
        e.t(
            &a,
            Transition::MarkUnknown {
                last_error: "timeout".into(),
            },
        )
        .await;
        let b = e.record("order-never-2").await;
        e.t(
            &b,
            Transition::MarkUnknown {
                last_error: "timeout".into(),
            },
        )
        .await;
        // A "not charged" waits until no confirm can still be at the card
        // company: the records' last changes are a minute old.
        e.age(&a, 60_000).await;
        e.age(&b, 60_000).await;

        let pid = a.payment_id.to_string();
        ok(&e.cli(&[
            "payments",
            "resolve",
            &pid,
            "--not-charged",
            "--reason",
            "not in the console",
            "--operator",
            "carol",
        ]));
        let (part, now) = e.c.store.get(&a.payment_id).await.unwrap().unwrap();
        assert_eq!(part, Partition::Unpaid, "{name}");
        assert_eq!(
            now.failure_code.as_deref(),
            Some("PAYGATE_OPERATOR_NOT_CHARGED")
        );

        let pid = b.payment_id.to_string();
        let out = e.cli(&[
            "payments",
            "resolve",
            &pid,
            "--approved",
            "--reason",
            "r",
            "--operator",
            "dave",
        ]);
        assert!(
            !out.status.success(),
            "{name}: the card company has no payment"
        );
        ok(&e.cli(&[
            "payments",
            "resolve",
            &pid,
            "--approved",
            "--reason",
            "r",
            "--operator",
            "dave",
            "--force",
        ]));
        let (part, _) = e.c.store.get(&b.payment_id).await.unwrap().unwrap();
        assert_eq!(part, Partition::Completed, "{name}: forced");
        let rows = ResolutionLog::new(e.db().clone())
            .for_payment(&pid)
            .await
            .unwrap();
        assert!(rows[0].entry.forced, "the override is on record");
        assert!(
            rows[0].entry.card_evidence.contains("no payment"),
            "{rows:?}"
        );
        e.cleanup.run().await;
    }
}

/// Acceptance 2: a logged body holding secrets prints masked, in text and
/// JSON, whoever wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_masks_secrets_in_logged_bodies() {
    for backend in sql_backends() {
        let e = env(&backend, false).await;
        let r = e.record("order-secret-1").await;
        let pid = r.payment_id.to_string();
        // Through the log (scrubbed on the way in) ...
        SqlApiLog::new(e.db().clone())
            .append(LogEntry {
                payment_id: &r.payment_id,
                target: Target::CardApi,
                kind: Kind::Request,
                attempt: 1,
                method: "POST",
                path: "/v1/payments/confirm",
                status_code: None,
                body: Some(serde_json::json!({"orderId": "order-secret-1", "secretKey": "test_sk_LOGGEDSECRET1"})),
                latency_ms: None,
            })
            .await
            .unwrap();
        // ... and written raw (an older writer, a hand-made row).
        let raw = r#"{"card":{"number":"4330123412341234","cvc":"123"},"message":"key test_sk_RAWSECRET2 refused","apiKey":"pgk_RAWSECRET3"}"#;
        let sql = match e.db() {
            SqlDatabase::Sqlite(_) => "INSERT INTO api_logs (payment_id, target, kind, attempt, method, path, status_code, body, created_at) VALUES ($1, 'card_api', 'RESPONSE', 1, 'POST', '/v1/payments/confirm', 500, $2, $3)",
            SqlDatabase::Postgres(_) => "INSERT INTO api_logs (payment_id, target, kind, attempt, method, path, status_code, body, created_at) VALUES ($1, 'card_api', 'RESPONSE', 1, 'POST', '/v1/payments/confirm', 500, CAST($2 AS JSONB), $3)",
        };
        with_pool!(e.db(), pool => sqlx::query(sql).bind(&pid).bind(raw).bind(paygate_core::time::now_ms()).execute(pool).await.map(|_| ()).unwrap());
        e.t(
            &r,
            Transition::MarkUnknown {
                last_error: "card said: key test_sk_RAWSECRET4 refused".into(),
            },
        )
        .await;

        for args in [
            vec!["payments", "show", pid.as_str()],
            vec!["payments", "show", pid.as_str(), "--json"],
        ] {
            let out = e.cli(&args);
            let text = format!("{}{}", ok(&out), String::from_utf8_lossy(&out.stderr));
            for secret in [
                "LOGGEDSECRET1",
                "RAWSECRET2",
                "RAWSECRET3",
                "RAWSECRET4",
                "4330123412341234",
            ] {
                assert!(!text.contains(secret), "{args:?} printed {secret}: {text}");
            }
            assert!(text.contains("[REDACTED]"), "{text}");
            assert!(text.contains("test_sk_***"), "masked inside text: {text}");
            assert!(text.contains("order-secret-1"), "the rest is shown: {text}");
        }
        e.cleanup.run().await;
    }
}

/// `recheck` does what the batch would do to one record, now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recheck_settles_one_payment_as_the_batch_would() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, false).await;
        // Paid, not saved: saved and completed.
        let a = e.record("order-recheck-1").await;
        e.t(&a, paid()).await;
        let out = ok(&e.cli(&["payments", "recheck", a.payment_id.as_str()]));
        assert!(out.contains("completed_payments"), "{name}: {out}");
        assert!(e.sandbox.ledger.record(a.payment_id.as_str()).is_some());
        // PENDING with no confirm logged (none was sent): filed unpaid at once,
        // young as it is.
        let b = e.record("order-recheck-2").await;
        let v: Value = serde_json::from_str(&ok(&e.cli(&[
            "payments",
            "recheck",
            b.payment_id.as_str(),
            "--json",
        ])))
        .unwrap();
        assert_eq!(v["after"]["partition"], "unpaid_payments", "{name}: {v}");
        assert_eq!(v["summary"]["unpaid"], 1);
        // A second recheck finds it settled and does nothing.
        let out = ok(&e.cli(&["payments", "recheck", b.payment_id.as_str()]));
        assert!(out.contains("nothing to do"), "{out}");
        let out = e.cli(&["payments", "recheck", "pay_nosuchpayment"]);
        assert!(!out.status.success());
        e.cleanup.run().await;
    }
}

/// `payments list --problems`: unknown, paid-unsaved, stale pending and
/// unresolved mismatch alerts, newest first, filtered by merchant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_problem_list_names_what_needs_a_person() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, false).await;
        let fresh = e.record("order-fresh-1").await; // PENDING, young: no problem
        let unsaved = e.record("order-unsaved-1").await;
        e.t(&unsaved, paid()).await;
        let unknown = e.record("order-unknown-1").await;
        e.t(
            &unknown,
            Transition::MarkUnknown {
                last_error: "lost".into(),
            },
        )
        .await;
        e.c.saga
            .alert(
                &unsaved,
                AlertReason::CardMismatch,
                "card shows another amount".into(),
            )
            .await;
        e.c.alerter
            .raise(Alert {
                reason: AlertReason::OutcomeUnknown,
                payment_id: unknown.payment_id.to_string(),
                merchant_id: e.merchant.to_string(),
                order_id: "order-unknown-1".into(),
                amount: 5_000,
                detail: "not a mismatch".into(),
            })
            .await;
        let list = json_lines(&ok(&e.cli(&["payments", "list", "--problems", "--json"])));
        let kinds: Vec<(String, String)> = list
            .iter()
            .map(|p| {
                (
                    p["kind"].as_str().unwrap().to_owned(),
                    p["paymentId"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(kinds.len(), 3, "{name}: {kinds:?}");
        assert!(kinds.contains(&("unknown".into(), unknown.payment_id.to_string())));
        assert!(kinds.contains(&("paid_unsaved".into(), unsaved.payment_id.to_string())));
        assert!(kinds.contains(&("alert".into(), unsaved.payment_id.to_string())));
        assert!(list
            .iter()
            .all(|p| p["paymentId"] != fresh.payment_id.as_str()));
        // Compared as instants: RFC 3339 drops trailing zeros of the
        // fraction (`.77Z` is 770 ms), so the strings do not sort.
        let since: Vec<i64> = list
            .iter()
            .map(|p| paygate_core::time::ms_from_rfc3339(p["since"].as_str().unwrap()).unwrap())
            .collect();
        assert!(
            since.windows(2).all(|w| w[0] >= w[1]),
            "newest first: {since:?}"
        );
        // With no age, the young PENDING one is stale too.
        let list = json_lines(&ok(&e.cli(&[
            "payments",
            "list",
            "--problems",
            "--older-than",
            "0s",
            "--json",
        ])));
        assert!(list
            .iter()
            .any(|p| p["kind"] == "stale_pending" && p["paymentId"] == fresh.payment_id.as_str()));
        // Another merchant has none.
        let other = MerchantId::generate().to_string();
        let out = ok(&e.cli(&["payments", "list", "--problems", "--merchant", &other]));
        assert!(out.contains("no problems"), "{out}");
        // The table.
        let out = ok(&e.cli(&["payments", "list", "--problems"]));
        assert!(out.lines().next().unwrap().starts_with("kind"), "{out}");
        assert!(out.contains("card_mismatch"), "{out}");
        e.cleanup.run().await;
    }
}

/// `alerts list` with its filters, and `alerts resend` of a parked alert
/// through a Discord simulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_listed_and_a_parked_one_is_resent() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, false).await;
        let r = e.record("order-alert-1").await;
        e.c.saga
            .alert(&r, AlertReason::OutcomeUnknown, "one".into())
            .await;
        e.c.saga
            .alert(&r, AlertReason::LedgerSaveFailed, "two".into())
            .await;
        let outbox = SqlOutbox::new(e.db().clone());
        let rows = outbox.list(Listing::All, 10).await.unwrap();
        let (first, second) = (rows[0].id, rows[1].id);
        outbox
            .park(first, "401 Invalid Webhook Token")
            .await
            .unwrap();

        let all = json_lines(&ok(&e.cli(&["alerts", "list", "--json"])));
        assert_eq!(all.len(), 2, "{name}");
        assert_eq!(all[0]["id"], second, "newest first");
        let parked = json_lines(&ok(&e.cli(&["alerts", "list", "--parked", "--json"])));
        assert_eq!(parked.len(), 1);
        assert_eq!(
            (parked[0]["id"].as_i64(), parked[0]["state"].as_str()),
            (Some(first), Some("parked"))
        );
        let unsent = json_lines(&ok(&e.cli(&["alerts", "list", "--unsent", "--json"])));
        assert_eq!(unsent.len(), 2);
        let table = ok(&e.cli(&["alerts", "list"]));
        assert!(table.contains("401 Invalid Webhook Token"), "{table}");

        let discord = DiscordSim::new(5, Duration::from_secs(2));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (webhook, _server) = paygate_sandbox::serve_discord(discord.clone(), listener).unwrap();
        let out = paygate()
            .args(["alerts", "resend", &first.to_string()])
            .env("PAYGATE_DATABASE_URL", &e.url)
            .env("PAYGATE_DISCORD_WEBHOOK_URL", &webhook)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let text = ok(&out);
        assert!(text.contains("sent now"), "{name}: {text}");
        assert!(
            !text.contains("sandbox-token")
                && !String::from_utf8_lossy(&out.stderr).contains("sandbox-token")
        );
        let row = outbox.get(first).await.unwrap().unwrap();
        assert!(row.sent_at.is_some() && row.parked_at.is_none(), "{row:?}");
        assert!(!discord.received().is_empty());
        let out = e.cli(&["alerts", "resend", "999999"]);
        assert!(!out.status.success());
        e.cleanup.run().await;
    }
}

/// Acceptance 4 and the retention rule: a dry run reports and deletes
/// nothing; a run deletes in batches only the old rows of completed or
/// unpaid payments (and the reconciliation's page log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_only_old_rows_of_settled_payments_and_dry_run_nothing() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, false).await;
        let done = e.record("order-prune-done").await;
        e.t(&done, paid()).await;
        e.t(&done, Transition::MarkSaved).await;
        assert!(e
            .c
            .store
            .move_record(&done.payment_id, Partition::Realtime, Partition::Completed)
            .await
            .unwrap());
        let open = e.record("order-prune-open").await;
        e.t(
            &open,
            Transition::MarkUnknown {
                last_error: "lost".into(),
            },
        )
        .await;
        let old = paygate_core::time::now_ms() - 100 * 86_400_000;
        let young = paygate_core::time::now_ms();
        let body = match e.db() {
            SqlDatabase::Sqlite(_) => "$3",
            SqlDatabase::Postgres(_) => "CAST($3 AS JSONB)",
        };
        let insert = format!("INSERT INTO api_logs (payment_id, target, kind, attempt, method, path, body, created_at) VALUES ($1, 'card_api', 'REQUEST', 1, 'GET', '/x', {body}, $2)");
        let rows = [
            (done.payment_id.as_str(), old),   // deleted
            (done.payment_id.as_str(), old),   // deleted
            (done.payment_id.as_str(), young), // young: kept
            (open.payment_id.as_str(), old),   // not settled: kept
            ("reconcile_01JTESTRUN", old),     // page log: deleted
            ("orphan_order-x", old),           // orphan: kept
        ];
        for (pid, at) in rows {
            with_pool!(e.db(), pool => sqlx::query(&insert).bind(pid).bind(at).bind("{}").execute(pool).await.map(|_| ()).unwrap());
        }
        e.c.saga
            .alert(&done, AlertReason::CardMismatch, "old, sent".into())
            .await;
        e.c.saga
            .alert(&done, AlertReason::LedgerRefused, "old, unsent".into())
            .await;
        e.c.saga
            .alert(&open, AlertReason::OutcomeUnknown, "old, sent, open".into())
            .await;
        let outbox = SqlOutbox::new(e.db().clone());
        let ids: Vec<i64> = outbox
            .list(Listing::All, 10)
            .await
            .unwrap()
            .iter()
            .map(|a| a.id)
            .collect();
        with_pool!(e.db(), pool => sqlx::query("UPDATE alert_outbox SET created_at = $1").bind(old - 1).execute(pool).await.map(|_| ()).unwrap());
        outbox.mark_sent(ids[0]).await.unwrap();
        outbox.mark_sent(ids[2]).await.unwrap();
        let counts = || async {
            with_pool!(e.db(), pool => {
                let logs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_logs").fetch_one(pool).await.unwrap();
                let alerts: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM alert_outbox").fetch_one(pool).await.unwrap();
                (logs, alerts)
            })
        };
        assert_eq!(counts().await, (6, 3));

        let dry: Value =
            serde_json::from_str(&ok(&e.cli(&["prune", "--dry-run", "--json"]))).unwrap();
        assert_eq!(
            (
                dry["api_logs_deleted"].as_u64(),
                dry["api_logs_kept"].as_u64(),
                dry["alerts_deleted"].as_u64(),
                dry["alerts_kept"].as_u64()
            ),
            (Some(3), Some(2), Some(1), Some(1)),
            "{name}: {dry}"
        );
        assert_eq!(counts().await, (6, 3), "{name}: a dry run deletes nothing");
        let text = ok(&e.cli(&["prune", "--dry-run"]));
        assert!(
            text.contains("would delete 3 rows") && text.contains("nothing was deleted"),
            "{text}"
        );

        let run: Value =
            serde_json::from_str(&ok(&e.cli(&["prune", "--batch-size", "2", "--json"]))).unwrap();
        assert_eq!(run["api_logs_deleted"], 3, "{name}: {run}");
        assert_eq!(run["alerts_deleted"], 1);
        assert!(
            run["batches"].as_u64().unwrap() >= 4,
            "bounded batches: {run}"
        );
        assert_eq!(counts().await, (3, 2));
        let left: Vec<String> = with_pool!(e.db(), pool => sqlx::query_scalar("SELECT payment_id FROM api_logs ORDER BY id").fetch_all(pool).await.unwrap());
        assert_eq!(
            left,
            vec![
                done.payment_id.to_string(),
                open.payment_id.to_string(),
                "orphan_order-x".to_owned()
            ]
        );
        let left = outbox.list(Listing::All, 10).await.unwrap();
        assert!(
            left.iter().all(|a| a.id != ids[0]),
            "the old sent alert of the completed payment went"
        );
        // A rerun has nothing left to do.
        let again: Value = serde_json::from_str(&ok(&e.cli(&["prune", "--json"]))).unwrap();
        assert_eq!(
            (
                again["api_logs_deleted"].as_u64(),
                again["alerts_deleted"].as_u64()
            ),
            (Some(0), Some(0))
        );
        e.cleanup.run().await;
    }
}

/// A batch with real work: paid-unsaved records against a slow ledger
/// (`paygate sim --ledger-latency-ms`), one at a time.
fn slow_batch_env(
    name: &str,
    records: usize,
) -> (
    paygate_e2e::KillOnDrop,
    String,
    String,
    String,
    std::path::PathBuf,
) {
    let (sim, card, ledger) =
        start_sim(&["--ledger-latency-ms", "250", "--page-latency-ms", "300"]);
    let (url, path) = paygate_e2e::temp_db(name);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = SqlDatabase::connect(&url, 1).await.unwrap();
        db.migrate().await.unwrap();
        let store = paygate_state_store::SqlStateStore::new(db.clone());
        let merchant = MerchantId::generate();
        for i in 0..records {
            let r = PaymentRecord::new_pending(
                merchant.clone(),
                OrderId::parse(&format!("order-progress-{i}")).unwrap(),
                format!("pk_progress_{i}"),
                1_000,
                "KRW".into(),
                format!("fp_{i}"),
                None,
                paygate_core::time::now_ms(),
            );
            use paygate_state_store::StateStore;
            store.create(&r).await.unwrap();
            assert!(store.transition(&r.payment_id, &paid()).await.unwrap());
        }
        db.close().await;
    });
    (sim, card, ledger, url, path)
}

fn job(card: &str, ledger: &str, url: &str) -> Command {
    let mut c = paygate();
    c.env("PAYGATE_DATABASE_URL", url)
        .env("PAYGATE_CARD_API_URL", card)
        .env("PAYGATE_CARD_API_SECRET_KEY", SIM_SECRET)
        .env("PAYGATE_LEDGER_API_URL", ledger);
    c
}

/// Acceptance 3, in a pipe: no bar, a `progress:` log line every
/// `--progress-every`, stdout left to the summary.
#[test]
fn progress_is_logged_in_lines_when_stderr_is_a_pipe() {
    let (_sim, card, ledger, url, path) = slow_batch_env("progress-pipe", 8);
    let out = job(&card, &ledger, &url)
        .args([
            "batch",
            "--once",
            "--grace",
            "0s",
            "--concurrency",
            "1",
            "--progress-every",
            "300ms",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stdout = ok(&out);
    let summary: Value = serde_json::from_str(stdout.trim()).expect("stdout is the summary alone");
    assert_eq!(summary["completed"], 8, "{summary}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("progress:")).collect();
    assert!(lines.len() >= 3, "a line every 300 ms over ~2 s: {stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("/8 records") && l.contains("records/s") && l.contains("eta")),
        "{lines:?}"
    );
    assert!(
        lines.last().unwrap().contains("finished: 8/8 records"),
        "{lines:?}"
    );
    assert!(
        !stderr.contains('\r') && !stderr.contains("\u{1b}[2K"),
        "no bar drawing in a pipe: {stderr}"
    );

    // The reconciliation: slices done of all, pages, transactions.
    let out = job(&card, &ledger, &url)
        .args([
            "reconcile",
            "--from",
            "1h",
            "--slices",
            "4",
            "--slice-concurrency",
            "1",
            "--progress-every",
            "250ms",
        ])
        .output()
        .unwrap();
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("progress:")).collect();
    assert!(lines.len() >= 3, "{stderr}");
    assert!(
        lines.last().unwrap().contains("4/4 slices, 4 pages"),
        "{lines:?}"
    );
    paygate_e2e::remove_db(&path);
}

/// Acceptance 3, on a terminal: `script` runs the job on a pseudo-terminal;
/// indicatif draws the bar (carriage returns and erase-line sequences) and
/// no log lines are printed.
#[test]
fn progress_is_a_live_bar_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED: `script` (util-linux) is not installed; no pty to test on");
        return;
    }
    let (_sim, card, ledger, url, path) = slow_batch_env("progress-pty", 6);
    let cmd = format!(
        "{} batch --once --grace 0s --concurrency 1",
        paygate_e2e::binary().display()
    );
    let mut script = Command::new("script");
    script
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env("PAYGATE_DATABASE_URL", &url)
        .env("PAYGATE_CARD_API_URL", &card)
        .env("PAYGATE_CARD_API_SECRET_KEY", SIM_SECRET)
        .env("PAYGATE_LEDGER_API_URL", &ledger)
        .env("RUST_LOG", "warn")
        .env("TERM", "xterm")
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYGATE_")
            && ![
                "PAYGATE_DATABASE_URL",
                "PAYGATE_CARD_API_URL",
                "PAYGATE_CARD_API_SECRET_KEY",
                "PAYGATE_LEDGER_API_URL",
            ]
            .contains(&k.as_str())
        {
            script.env_remove(k);
        }
    }
    let out = script.output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("6/6 records"),
        "the bar's final state: {screen:?}"
    );
    assert!(screen.contains("records/s"), "{screen:?}");
    assert!(
        screen.contains('\r') || screen.contains("\u{1b}["),
        "drawn in place: {screen:?}"
    );
    assert!(
        !screen.contains("progress:"),
        "no log lines on a terminal: {screen:?}"
    );
    assert!(
        screen.contains("batch sweep: scanned 6 | completed 6"),
        "{screen:?}"
    );
    paygate_e2e::remove_db(&path);
}

/// Reads stdout lines of a running `paygate` until one contains `want`
/// (or 30 s pass), then kills it; returns the lines read.
fn lines_until(mut cmd: Command, want: &str) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    let mut child = paygate_e2e::KillOnDrop(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let done = line.contains(want);
                seen.push(line);
                if done {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    seen
}

/// `--cron` reads its schedule in `time_zone` (Asia/Seoul by default) and
/// says when the next run is, there and in UTC; a bad zone is refused
/// naming the key.
#[test]
fn cron_schedules_run_in_the_operators_time_zone() {
    let (url, path) = paygate_e2e::temp_db("tz");
    let mut cmd = paygate();
    cmd.args(["batch", "--cron"])
        .env("PAYGATE_DATABASE_URL", &url);
    let lines = lines_until(cmd, "next run:");
    let next = lines
        .iter()
        .find(|l| l.contains("next run:"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(
        next.contains(" 04:00:00 KST (19:00:00 UTC)"),
        "04:00 in Seoul: {next}"
    );

    let mut cmd = paygate();
    cmd.args(["batch", "--cron", "0 30 9 * * *"])
        .env("PAYGATE_DATABASE_URL", &url)
        .env("PAYGATE_TIME_ZONE", "UTC");
    let lines = lines_until(cmd, "next run:");
    let next = lines
        .iter()
        .find(|l| l.contains("next run:"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(next.contains(" 09:30:00 UTC (09:30:00 UTC)"), "{next}");

    let mut cmd = paygate();
    cmd.args(["batch", "--every", "1h"])
        .env("PAYGATE_DATABASE_URL", &url);
    let lines = lines_until(cmd, "next run:");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("next run:") && l.contains("KST (")),
        "{lines:?}"
    );

    let out = paygate()
        .args(["batch", "--once"])
        .env("PAYGATE_DATABASE_URL", &url)
        .env("PAYGATE_TIME_ZONE", "Mars/Olympus")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`time_zone`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    paygate_e2e::remove_db(&path);
}
