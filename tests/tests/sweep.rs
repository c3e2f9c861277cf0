//! The batch sweep against the sandbox and a real store, on every SQL backend
//! and with the state records in each configured MongoDB (`e2e_backends`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::time::Duration;

use futures_util::TryStreamExt;
use paygate_api_log::{Kind, LogEntry, SqlApiLog, Target};
use paygate_batch::{BatchError, SweepOptions, Sweeper};
use paygate_card_api::{CardApi, ConfirmRequest, TossCardApi};
use paygate_core::{
    payment::failure_codes, Config, MerchantId, OrderId, Partition, PaymentRecord, Secret,
};
use paygate_payments::Components;
use paygate_sandbox::{FaultProfile, SandboxServers};
use paygate_state_store::{
    testing::{e2e_backends, fresh_e2e, Backend, Cleanup, E2eBackend},
    Transition,
};

const SECRET: &str = "test_sk_batch";

struct Env {
    sandbox: SandboxServers,
    c: Components,
    cleanup: Cleanup,
    merchant: MerchantId,
}

async fn env<B: Clone + Into<E2eBackend>>(backend: &B, profile: FaultProfile) -> Env {
    env_with(backend, profile, |_| {}).await
}

/// [`env`] with `tune` applied to the configuration.
async fn env_with<B: Clone + Into<E2eBackend>>(
    backend: &B,
    profile: FaultProfile,
    tune: impl FnOnce(&mut Config),
) -> Env {
    let sandbox = SandboxServers::start(profile, SECRET).await.unwrap();
    let (stores, cleanup) = fresh_e2e(&backend.clone().into()).await;
    let mut config = Config {
        card_api_url: Some(sandbox.card_url.clone()),
        card_api_secret_key: Some(Secret::new(SECRET.into())),
        ledger_api_url: Some(sandbox.ledger_url.clone()),
        ..stores.config()
    };
    tune(&mut config);
    let c = Components::build(&config, None).await.unwrap();
    Env {
        sandbox,
        c,
        cleanup,
        merchant: MerchantId::generate(),
    }
}

impl Env {
    async fn record(&self, order: &str) -> PaymentRecord {
        self.record_at(order, paygate_core::time::now_ms()).await
    }

    /// The sandbox card company, called directly (as a merchant's other
    /// system, or the card company's own console, would).
    fn card_api(&self) -> TossCardApi {
        TossCardApi::new(
            reqwest::Client::new(),
            &self.sandbox.card_url,
            Secret::new(SECRET.into()),
            Duration::from_secs(5),
        )
    }

    /// A `PENDING` record created (and last changed) at `created_ms`.
    async fn record_at(&self, order: &str, created_ms: i64) -> PaymentRecord {
        let r = self.unsaved(order, created_ms);
        self.c.store.create(&r).await.unwrap();
        r
    }

    /// A `PENDING` record of `order` at `created_ms`, not stored yet.
    fn unsaved(&self, order: &str, created_ms: i64) -> PaymentRecord {
        PaymentRecord::new_pending(
            self.merchant.clone(),
            OrderId::parse(order).unwrap(),
            format!("pk_{order}"),
            5_000,
            "KRW".into(),
            // As the saga fingerprints a confirm: a merchant's retry of the
            // same body replays this record.
            paygate_core::crypto::fingerprint(&[&format!("pk_{order}"), order, "5000"]),
            None,
            created_ms,
        )
    }

    /// The merchant's confirm of `r`'s order, as the gateway makes it.
    fn input(&self, r: &PaymentRecord) -> paygate_payments::ConfirmInput {
        paygate_payments::ConfirmInput {
            merchant_id: self.merchant.clone(),
            payment_key: r.payment_key.clone(),
            order_id: r.order_id.clone(),
            amount: r.amount,
            idempotency_key: None,
        }
    }

    /// Confirm `REQUEST` rows in the log for `r`.
    async fn confirm_requests(&self, r: &PaymentRecord) -> i64 {
        SqlApiLog::new(self.c.db.clone())
            .confirm_evidence(r.payment_id.as_str(), "/v1/payments/confirm")
            .await
            .unwrap()
            .requests
    }

    /// The confirm `REQUEST` row the saga writes before every card call
    /// (I3): a record "whose gateway died after the call" has one.
    async fn sent(&self, r: &PaymentRecord) {
        SqlApiLog::new(self.c.db.clone())
            .append(LogEntry {
                payment_id: &r.payment_id,
                target: Target::CardApi,
                kind: Kind::Request,
                attempt: 1,
                method: "POST",
                path: "/v1/payments/confirm",
                status_code: None,
                body: None,
                latency_ms: None,
            })
            .await
            .unwrap();
    }

    /// An answer of the card company to `r`'s confirm, as the saga logs
    /// it: `status` with Toss's code for a transient failure.
    async fn answered(&self, r: &PaymentRecord, status: i32) {
        SqlApiLog::new(self.c.db.clone())
            .append(LogEntry {
                payment_id: &r.payment_id,
                target: Target::CardApi,
                kind: Kind::Error,
                attempt: 1,
                method: "POST",
                path: "/v1/payments/confirm",
                status_code: Some(status),
                body: Some(serde_json::json!({"code": "FAILED_INTERNAL_SYSTEM_PROCESSING"})),
                latency_ms: None,
            })
            .await
            .unwrap();
    }

    async fn t(&self, r: &PaymentRecord, t: Transition) {
        assert!(
            self.c.store.transition(&r.payment_id, &t).await.unwrap(),
            "{t:?}"
        );
    }

    fn sweeper(&self) -> Sweeper {
        Sweeper::new(self.c.store.clone(), self.c.saga.clone(), self.c.db.clone())
    }

    async fn count(&self, p: Partition) -> usize {
        self.c
            .store
            .scan(p, 100)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .len()
    }
}

fn paid() -> Transition {
    Transition::MarkPaid {
        approved_at: "2026-11-21T12:00:00+09:00".into(),
    }
}

fn now_opts() -> SweepOptions {
    SweepOptions {
        grace: Duration::ZERO,
        ..SweepOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_class_gets_exactly_its_action_and_a_rerun_does_nothing_new() {
    for backend in e2e_backends() {
        let e = env(&backend, FaultProfile::none()).await;
        let name = backend.name();
        // A: paid and saved.
        let a = e.record("order-a-done").await;
        e.t(&a, paid()).await;
        e.t(&a, Transition::MarkSaved).await;
        // B: paid, not saved.
        let b = e.record("order-b-unsaved").await;
        e.t(&b, paid()).await;
        // C: declined, the log holds the 403.
        let c = e.record("order-c-declined").await;
        e.t(
            &c,
            Transition::MarkAborted {
                failure_code: "REJECT_CARD_PAYMENT".into(),
                last_error: "no".into(),
                seen_version: None,
            },
        )
        .await;
        let log = SqlApiLog::new(e.c.db.clone());
        for (kind, status) in [(Kind::Request, None), (Kind::Response, Some(403))] {
            log.append(LogEntry {
                payment_id: &c.payment_id,
                target: Target::CardApi,
                kind,
                attempt: 1,
                method: "POST",
                path: "/v1/payments/confirm",
                status_code: status,
                // As the saga logs a card answer: the card company's code.
                body: status
                    .map(|_| serde_json::json!({"code": "REJECT_CARD_PAYMENT", "message": "no"})),
                latency_ms: None,
            })
            .await
            .unwrap();
        }
        // C2: aborted before any card call (no log rows).
        let c2 = e.record("order-c2-nocall").await;
        e.t(
            &c2,
            Transition::MarkAborted {
                failure_code: failure_codes::LOG_UNAVAILABLE.into(),
                last_error: "log".into(),
                seen_version: None,
            },
        )
        .await;
        // D: PENDING, but the card company approved it (the gateway died after the call).
        let d = e.record("order-d-orphan").await;
        e.sent(&d).await;
        let card = e.card_api();
        card.confirm(
            &ConfirmRequest {
                payment_key: d.payment_key.clone(),
                order_id: d.order_id.to_string(),
                amount: d.amount,
            },
            d.payment_id.as_str(),
        )
        .await
        .unwrap();
        // E: UNKNOWN, and the card company has nothing. Its log holds the
        // REQUEST row alone (no answer proves the call left), so inside its
        // confirm window it is not sent again: it waits, nobody paged.
        let u = e.record("order-e-unknown").await;
        e.t(
            &u,
            Transition::MarkUnknown {
                last_error: "timeout".into(),
            },
        )
        .await;

        // (E's confirm was sent too: UNKNOWN comes after a call.)
        e.sent(&u).await;
        let s = e.sweeper().sweep(&now_opts()).await.unwrap();
        assert_eq!(
            (
                s.scanned,
                s.completed,
                s.unpaid,
                s.settled,
                s.retried,
                s.saved,
                s.alerts,
                s.failures
            ),
            (6, 3, 2, 1, 2, 2, 0, 0),
            "{name}: {s:?}"
        );
        let card_stats = e.sandbox.card.stats();
        assert_eq!(
            card_stats.lookup_calls,
            1 + 3,
            "{name}: one lookup settles D, three find nothing for E"
        );
        assert_eq!(
            (card_stats.confirm_calls, card_stats.approvals),
            (1, 1),
            "{name}: D's confirm; E is not sent again"
        );
        assert_eq!(
            e.sandbox.ledger.stats().records,
            2,
            "{name}: B and D recorded"
        );
        assert!(
            e.sandbox.ledger.record(b.payment_id.as_str()).is_some()
                && e.sandbox.ledger.record(d.payment_id.as_str()).is_some()
        );
        assert_eq!(
            (
                e.count(Partition::Realtime).await,
                e.count(Partition::Completed).await,
                e.count(Partition::Unpaid).await
            ),
            (1, 3, 2)
        );
        let (part, settled_d) = e.c.store.get(&d.payment_id).await.unwrap().unwrap();
        assert!(part == Partition::Completed && settled_d.is_paid && settled_d.is_saved);
        let (_, waiting) = e.c.store.get(&u.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (waiting.card_status, waiting.batch_attempts),
            (paygate_core::CardStatus::Unknown, 1),
            "{name}: the check is counted"
        );
        assert!(
            e.c.alerter.outbox().all().await.unwrap().is_empty(),
            "{name}: nothing needed an operator"
        );

        // A rerun: E is looked up again, nothing else happens.
        let again = e.sweeper().sweep(&now_opts()).await.unwrap();
        assert_eq!(
            (
                again.scanned,
                again.completed,
                again.unpaid,
                again.saved,
                again.alerts
            ),
            (1, 0, 0, 0, 0),
            "{name}"
        );
        assert_eq!(e.sandbox.card.stats().confirm_calls, 1, "{name}");
        assert_eq!(e.sandbox.ledger.stats().records, 2);
        e.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn young_records_are_left_alone_and_a_dry_run_changes_nothing() {
    let e = env(&Backend::Sqlite, FaultProfile::none()).await;
    let a = e.record("order-young-1").await;
    e.t(&a, paid()).await;
    let s = e
        .sweeper()
        .sweep(&SweepOptions {
            grace: Duration::from_secs(120),
            ..SweepOptions::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (s.scanned, s.retried, s.completed),
        (1, 0, 0),
        "inside the grace period"
    );
    let dry = e
        .sweeper()
        .sweep(&SweepOptions {
            dry_run: true,
            ..now_opts()
        })
        .await
        .unwrap();
    assert_eq!(dry.retried, 1, "the plan");
    assert_eq!(
        e.sandbox.ledger.stats().record_calls,
        0,
        "a dry run calls nothing"
    );
    assert_eq!(e.count(Partition::Realtime).await, 1, "and moves nothing");
    e.cleanup.run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_killed_mid_move_is_finished_by_the_next_and_the_threshold_alerts_once() {
    for backend in e2e_backends() {
        let e = env(&backend, FaultProfile::none()).await;
        // G: the previous sweep died between writing completed and deleting realtime.
        let g = e.record("order-g-crash").await;
        e.t(&g, paid()).await;
        e.t(&g, Transition::MarkSaved).await;
        e.c.store
            .copy_to_partition(&g.payment_id, Partition::Realtime, Partition::Completed)
            .await
            .unwrap();
        // F: paid, the ledger is down for every sweep.
        let f = e.record("order-f-ledger").await;
        e.t(&f, paid()).await;
        e.sandbox.ledger.set_down(true);
        let opts = SweepOptions {
            ledger_alert_threshold: 3,
            ..now_opts()
        };
        let mut alerts = 0;
        for _ in 0..5 {
            let s = e.sweeper().sweep(&opts).await.unwrap();
            assert_eq!(s.failures, 0, "{}", backend.name());
            alerts += s.alerts;
        }
        assert_eq!(
            alerts,
            1,
            "{}: one alert across five sweeps",
            backend.name()
        );
        let (_, f_now) = e.c.store.get(&f.payment_id).await.unwrap().unwrap();
        assert_eq!(f_now.batch_attempts, 5);
        let rows = e.c.alerter.outbox().all().await.unwrap();
        assert_eq!(
            rows.iter()
                .filter(|r| r.dedup_key.ends_with("ledger_save_failed"))
                .count(),
            1
        );
        // G: exactly one copy, in completed.
        let completed: Vec<_> =
            e.c.store
                .scan(Partition::Completed, 10)
                .try_collect()
                .await
                .unwrap();
        assert_eq!(
            completed
                .iter()
                .filter(|r| r.payment_id == g.payment_id)
                .count(),
            1
        );
        assert!(e
            .c
            .store
            .scan(Partition::Realtime, 10)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .iter()
            .all(|r| r.payment_id != g.payment_id));
        // The ledger is back: F is saved and completed.
        e.sandbox.ledger.set_down(false);
        let s = e.sweeper().sweep(&opts).await.unwrap();
        assert_eq!((s.saved, s.completed), (1, 1));
        e.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sweep_at_a_time_and_a_dead_holders_lease_is_taken_over() {
    let profile = FaultProfile {
        card_latency_min_ms: 200,
        card_latency_max_ms: 200,
        ..FaultProfile::none()
    };
    let e = env(&Backend::Sqlite, profile).await;
    for i in 0..3 {
        // Sent before their gateway died: each is looked up (200 ms), so
        // the first sweep is still working when the second tries.
        let r = e.record(&format!("order-lease-{i}")).await;
        e.sent(&r).await;
    }
    let (s1, s2, opts) = (e.sweeper(), e.sweeper(), now_opts());
    let (first, second) = tokio::join!(s1.sweep(&opts), s2.sweep(&opts));
    let held = [&first, &second]
        .iter()
        .filter(|r| matches!(r, Err(BatchError::LeaseHeld { .. })))
        .count();
    let ran = [&first, &second].iter().filter(|r| r.is_ok()).count();
    assert_eq!((ran, held), (1, 1), "{first:?} / {second:?}");

    // A lease left by a killed process: taken over once expired, refused before.
    let dead = paygate_batch::lease::Lease::new(
        e.c.db.clone(),
        "batch-sweep",
        "killed-process",
        Duration::from_secs(60),
    );
    dead.acquire().await.unwrap().unwrap();
    assert!(matches!(
        e.sweeper().sweep(&now_opts()).await,
        Err(BatchError::LeaseHeld { .. })
    ));
    // The holder died long ago: its lease expired.
    if let paygate_state_store::SqlDatabase::Sqlite(db) = &e.c.db {
        let pool = &db.pool;
        sqlx::query("UPDATE batch_leases SET expires_at = 0")
            .execute(pool)
            .await
            .unwrap();
    }
    assert!(
        e.sweeper().sweep(&now_opts()).await.is_ok(),
        "the expired lease is taken over"
    );
    e.cleanup.run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_lease_mid_sweep_stops_it_cleanly() {
    // Slow lookups, one at a time: the sweep takes about a second.
    let profile = FaultProfile {
        card_latency_min_ms: 100,
        card_latency_max_ms: 100,
        ..FaultProfile::none()
    };
    let e = env(&Backend::Sqlite, profile).await;
    for i in 0..10 {
        // Each sent (its gateway died after the call): each is looked up.
        let r = e.record(&format!("order-lost-{i}")).await;
        e.sent(&r).await;
    }
    let db = e.c.db.clone();
    let thief = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let paygate_state_store::SqlDatabase::Sqlite(db) = &db {
            let pool = &db.pool;
            sqlx::query("UPDATE batch_leases SET owner = 'another-replica'")
                .execute(pool)
                .await
                .unwrap();
        }
    });
    let opts = SweepOptions {
        concurrency: 1,
        lease_ttl: Duration::from_millis(150),
        ..now_opts()
    };
    let result = e.sweeper().sweep(&opts).await;
    thief.await.unwrap();
    match result {
        Err(BatchError::LeaseLost(partial)) => {
            assert!(partial.scanned < 10, "stopped early: {partial:?}")
        }
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    e.cleanup.run().await;
}

/// Issue 13, point 1: ages count from the last transition. A record created
/// an hour ago and reopened by a merchant's retry a moment ago is in flight:
/// the batch leaves it alone (before, its old `created_at` made the batch
/// look it up, find nothing yet, and mark it UNKNOWN under a live confirm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_record_is_young_again() {
    for backend in e2e_backends() {
        let e = env(&backend, FaultProfile::none()).await;
        let hour_ago = paygate_core::time::now_ms() - 3_600_000;
        let r = PaymentRecord::new_pending(
            e.merchant.clone(),
            OrderId::parse("order-reopened-1").unwrap(),
            "pk_reopened".into(),
            5_000,
            "KRW".into(),
            "fp_reopened".into(),
            None,
            hour_ago,
        );
        e.c.store.create(&r).await.unwrap();
        let code = failure_codes::CIRCUIT_OPEN.to_owned();
        e.t(
            &r,
            Transition::MarkAborted {
                failure_code: code.clone(),
                last_error: "open".into(),
                seen_version: None,
            },
        )
        .await;
        e.t(
            &r,
            Transition::Reopen {
                failure_code: code,
                seen_version: None,
            },
        )
        .await;
        let s = e
            .sweeper()
            .sweep(&SweepOptions {
                grace: Duration::from_secs(120),
                ..SweepOptions::default()
            })
            .await
            .unwrap();
        assert_eq!(
            (s.scanned, s.settled, s.unpaid, s.alerts),
            (1, 0, 0, 0),
            "{}",
            backend.name()
        );
        assert_eq!(e.sandbox.card.stats().lookup_calls, 0, "{}", backend.name());
        let (part, now) = e.c.store.get(&r.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (part, now.card_status),
            (Partition::Realtime, paygate_core::CardStatus::Pending)
        );
        e.cleanup.run().await;
    }
}

/// Issue 13, point 8: only the confirm call's answers are evidence of a
/// decline. A record whose confirm was sent (and its answer lost) and whose
/// lookup answered 404 is not "declined": the batch looks it up again and
/// alerts, it never files it as unpaid on a lookup's 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_404_is_not_evidence_of_a_decline() {
    for backend in e2e_backends() {
        let e = env(&backend, FaultProfile::none()).await;
        let r = e.record("order-lookup-404").await;
        e.t(
            &r,
            Transition::MarkAborted {
                failure_code: "NOT_FOUND_PAYMENT".into(),
                last_error: "looked up: not found".into(),
                seen_version: None,
            },
        )
        .await;
        let log = SqlApiLog::new(e.c.db.clone());
        let rows = [
            (Kind::Request, "POST", "/v1/payments/confirm", None),
            (
                Kind::Request,
                "GET",
                "/v1/payments/orders/order-lookup-404",
                None,
            ),
            (
                Kind::Response,
                "GET",
                "/v1/payments/orders/order-lookup-404",
                Some(404),
            ),
        ];
        for (kind, method, path, status) in rows {
            log.append(LogEntry {
                payment_id: &r.payment_id,
                target: Target::CardApi,
                kind,
                attempt: 1,
                method,
                path,
                status_code: status,
                body: Some(serde_json::json!({"code": "NOT_FOUND_PAYMENT"})),
                latency_ms: None,
            })
            .await
            .unwrap();
        }
        let s = e.sweeper().sweep(&now_opts()).await.unwrap();
        assert_eq!(
            s.unpaid,
            0,
            "{}: filed as unpaid on a lookup's 404",
            backend.name()
        );
        assert_eq!(e.count(Partition::Unpaid).await, 0, "{}", backend.name());
        assert!(
            e.sandbox.card.stats().lookup_calls >= 1,
            "{}: looked up again",
            backend.name()
        );
        e.cleanup.run().await;
    }
}

/// Issue 13, point 8: a lease whose renewals keep failing (the database is
/// gone) is lost once its time to live has passed since the last renewal
/// that succeeded; before, it was never marked lost, so a sweep could go on
/// beside another that took the expired lease over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_cannot_be_renewed_within_its_ttl_is_lost() {
    let path = std::env::temp_dir().join(format!("paygate-lease-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let db = paygate_state_store::SqlDatabase::connect(&format!("sqlite://{}", path.display()), 2)
        .await
        .unwrap();
    db.migrate().await.unwrap();
    let ttl = Duration::from_millis(300);
    let lease = paygate_batch::lease::Lease::new(db.clone(), "batch-sweep", "owner-a", ttl);
    assert!(lease.acquire().await.unwrap().is_ok());
    let renewal = lease.keep_alive(ttl);
    db.close().await; // every renewal from now on fails
    let started = std::time::Instant::now();
    while !renewal.lost() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        renewal.lost(),
        "renewals failed for {:?} but the lease was not lost",
        started.elapsed()
    );
    renewal.finish().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

// ---- cancels (issue 15, point 11) ----

impl Env {
    /// An order approved at the card company and recorded in the ledger,
    /// with its record paid and saved.
    async fn approved_and_saved(&self, order: &str) -> PaymentRecord {
        let r = self.record(order).await;
        let card = self.card_api();
        card.confirm(
            &ConfirmRequest {
                payment_key: r.payment_key.clone(),
                order_id: r.order_id.to_string(),
                amount: r.amount,
            },
            r.payment_id.as_str(),
        )
        .await
        .unwrap();
        self.t(&r, paid()).await;
        let (_, now) = self.c.store.get(&r.payment_id).await.unwrap().unwrap();
        assert_eq!(
            self.c.saga.batch_save(&now).await,
            paygate_payments::SaveResult::Saved
        );
        r
    }

    async fn claim_cancel(
        &self,
        r: &PaymentRecord,
        amount: i64,
    ) -> paygate_state_store::CancelRecord {
        paygate_e2e::claim_cancel(self.c.store.as_ref(), r, amount).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_left_pending_by_a_crash_is_settled_by_the_batch() {
    for backend in e2e_backends() {
        let name = backend.name();
        let e = env(&backend, FaultProfile::none()).await;
        let r = e.approved_and_saved("order-cancel-crash").await;
        // The gateway died between the claim and the card call.
        let c = e.claim_cancel(&r, 2_000).await;
        assert_eq!(e.sandbox.card.stats().cancel_calls, 0);
        let s = e.sweeper().sweep(&now_opts()).await.unwrap();
        assert_eq!((s.settled, s.failures), (1, 0), "{name}: {s:?}");
        // Not found at the card company by lookup: sent once with its key.
        assert_eq!(e.sandbox.card.stats().cancel_calls, 1, "{name}");
        let at_card = e.sandbox.card.payment("order-cancel-crash").unwrap();
        assert_eq!(at_card.balance_amount, Some(3_000), "{name}");
        let now = e.c.store.cancels_of(&r.payment_id).await.unwrap().remove(0);
        assert_eq!(
            (now.status, now.is_saved),
            (paygate_state_store::CancelStatus::Done, true),
            "{name}"
        );
        let reversals = e.sandbox.ledger.reversals_of(r.payment_id.as_str());
        assert_eq!(reversals.len(), 1, "{name}");
        assert_eq!(reversals[0].0, c.idempotency_key_downstream());
        // Nothing left: a second sweep makes no call.
        let s = e.sweeper().sweep(&now_opts()).await.unwrap();
        assert_eq!((s.settled, s.retried), (0, 0), "{name}: {s:?}");
        assert_eq!(e.sandbox.card.stats().cancel_calls, 1, "{name}");
        e.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_left_unsaved_is_retried_by_the_batch_and_alerted_at_the_threshold() {
    for backend in e2e_backends() {
        let name = backend.name();
        let e = env(&backend, FaultProfile::none()).await;
        let r = e.approved_and_saved("order-cancel-rev").await;
        let c = e.claim_cancel(&r, 5_000).await;
        let done = paygate_state_store::CancelTransition::MarkDone {
            canceled_at: "2026-11-21T12:10:00+09:00".into(),
        };
        assert!(e
            .c
            .store
            .cancel_transition(&r.payment_id, c.n, &done)
            .await
            .unwrap());
        e.sandbox.ledger.set_down(true);
        let opts = SweepOptions {
            ledger_alert_threshold: 2,
            ..now_opts()
        };
        let s1 = e.sweeper().sweep(&opts).await.unwrap();
        let s2 = e.sweeper().sweep(&opts).await.unwrap();
        assert_eq!(
            (s1.retried, s1.saved, s1.alerts),
            (1, 0, 0),
            "{name}: {s1:?}"
        );
        assert_eq!(
            (s2.retried, s2.saved, s2.alerts),
            (1, 0, 1),
            "{name}: {s2:?}"
        );
        e.sandbox.ledger.set_down(false);
        let s3 = e.sweeper().sweep(&opts).await.unwrap();
        assert_eq!((s3.retried, s3.saved), (1, 1), "{name}: {s3:?}");
        assert_eq!(
            e.sandbox.ledger.reversals_of(r.payment_id.as_str()).len(),
            1
        );
        e.cleanup.run().await;
    }
}

/// Issue 17: a confirm that died between its payment's last transition and
/// the hold's sale or release leaves the hold `during`, holding stock for
/// nobody. The sweep ends it from the payment's stored state: sold when
/// paid, released when the payment ended unpaid (no confirm sent), left
/// alone while the payment is still open; a rerun changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_left_during_by_a_dead_confirm_are_sold_or_released_by_the_sweep() {
    use paygate_state_store::{BeginOutcome, Hold, HoldItem, HoldState, TakeOutcome};
    for backend in e2e_backends() {
        // No re-sends: the open payment stays open while the sweep runs.
        let e = env_with(&backend, FaultProfile::none(), |c| {
            c.card_confirm_window_ms = 0;
        })
        .await;
        let name = backend.name();
        let inv = e.c.inventory.clone();
        let now = paygate_core::time::now_ms();
        inv.set_stock(&e.merchant, "sku-stuck", 3, now)
            .await
            .unwrap();
        let mut records = Vec::new();
        for o in ["order-h-paid", "order-h-aborted", "order-h-open"] {
            let r = e.record(o).await;
            let h = Hold::new_pre(
                e.merchant.clone(),
                r.order_id.clone(),
                vec![HoldItem {
                    sku: "sku-stuck".into(),
                    quantity: 1,
                }],
                now + 60_000,
                format!("fp-{o}"),
                now,
            );
            assert!(
                matches!(inv.take(&h, now).await.unwrap(), TakeOutcome::Taken(_)),
                "{name}"
            );
            assert!(
                matches!(
                    inv.begin_payment(&e.merchant, &r.order_id, now)
                        .await
                        .unwrap(),
                    BeginOutcome::During(_)
                ),
                "{name}"
            );
            records.push(r);
        }
        // The confirms died here: one after its approval was marked paid
        // and saved (the sweep's completion path never touches holds), one
        // after a no-call abort; the third is still PENDING
        // with its card REQUEST row logged (its outcome is unknown).
        e.t(&records[0], paid()).await;
        e.t(&records[0], Transition::MarkSaved).await;
        e.t(
            &records[1],
            Transition::MarkAborted {
                failure_code: failure_codes::NOT_SENT.into(),
                last_error: "died before the card call".into(),
                seen_version: None,
            },
        )
        .await;
        // The aborted one was already filed unpaid by an earlier sweep whose
        // release of the hold failed: no record pass will see it again.
        assert!(e
            .c
            .store
            .move_record(
                &records[1].payment_id,
                Partition::Realtime,
                Partition::Unpaid
            )
            .await
            .unwrap());
        e.sent(&records[2]).await;
        let level = inv
            .level(&e.merchant, "sku-stuck", now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(level.available, 0, "{name}: three units held");

        // A young hold is left alone (the sweep's grace covers it).
        let young = e.sweeper().sweep(&SweepOptions::default()).await.unwrap();
        assert_eq!((young.holds_sold, young.holds_released), (0, 0), "{name}");
        // A dry run counts, changes nothing.
        let dry = e
            .sweeper()
            .sweep(&SweepOptions {
                dry_run: true,
                ..now_opts()
            })
            .await
            .unwrap();
        assert_eq!(
            (dry.holds_sold, dry.holds_released),
            (1, 1),
            "{name}: dry run"
        );
        let state = |o: &'static str| {
            let (inv, m) = (inv.clone(), e.merchant.clone());
            async move {
                inv.hold_by_order(&m, &OrderId::parse(o).unwrap())
                    .await
                    .unwrap()
                    .unwrap()
                    .state
            }
        };
        assert_eq!(
            state("order-h-aborted").await,
            HoldState::During,
            "{name}: dry run released"
        );

        let s = e.sweeper().sweep(&now_opts()).await.unwrap();
        assert_eq!((s.holds_sold, s.holds_released), (1, 1), "{name}: {s:?}");
        assert_eq!(state("order-h-paid").await, HoldState::Sold, "{name}");
        assert_eq!(
            state("order-h-aborted").await,
            HoldState::Released,
            "{name}"
        );
        // The open payment's hold waits for its settlement (the sweep looked
        // it up: the sandbox never saw it, so it stays in doubt or unpaid;
        // either way nothing is sold for it).
        assert_ne!(state("order-h-open").await, HoldState::Sold, "{name}");
        let level = inv
            .level(&e.merchant, "sku-stuck", paygate_core::time::now_ms())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(level.sold, 1, "{name}");
        let again = e.sweeper().sweep(&now_opts()).await.unwrap();
        assert_eq!(
            (again.holds_sold, again.holds_released),
            (0, 0),
            "{name}: rerun"
        );
        e.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_is_looked_up_again_only_once_its_next_check_is_due() {
    for backend in e2e_backends() {
        // No re-sends (a confirm window of 0), so every check is a lookup.
        let e = env_with(&backend, FaultProfile::none(), |c| {
            c.card_confirm_window_ms = 0;
        })
        .await;
        let name = backend.name();
        // UNKNOWN after a call the card company never received.
        let u = e.record("order-recheck-1").await;
        e.t(
            &u,
            Transition::MarkUnknown {
                last_error: "timeout".into(),
            },
        )
        .await;
        e.sent(&u).await;
        let opts = SweepOptions {
            recheck: paygate_payments::RecheckSchedule {
                first: Duration::from_millis(1_500),
                max: Duration::from_secs(60),
            },
            ..now_opts()
        };
        let first = e.sweeper().sweep(&opts).await.unwrap();
        let lookups = e.sandbox.card.stats().lookup_calls;
        // The card company answers, and has no payment for the order: a
        // confirm may still be on its way, nobody is paged yet.
        assert_eq!(
            (first.settled, first.alerts, first.deferred),
            (0, 0, 0),
            "{name}: {first:?}"
        );
        assert!(lookups > 0, "{name}: the first check looks it up");
        let (_, checked) = e.c.store.get(&u.payment_id).await.unwrap().unwrap();
        assert_eq!(checked.batch_attempts, 1, "{name}: the check is counted");
        assert_eq!(
            checked.version,
            u.version + 2,
            "{name}: MarkUnknown, then the check"
        );

        // At once again: not due, no lookup, no new alert.
        let again = e.sweeper().sweep(&opts).await.unwrap();
        assert_eq!((again.deferred, again.alerts), (1, 0), "{name}: {again:?}");
        assert_eq!(
            e.sandbox.card.stats().lookup_calls,
            lookups,
            "{name}: no second lookup yet"
        );

        // Once its wait has passed it is looked up again, and counted again.
        tokio::time::sleep(Duration::from_millis(1_600)).await;
        let later = e.sweeper().sweep(&opts).await.unwrap();
        assert_eq!(later.deferred, 0, "{name}: {later:?}");
        assert_eq!(e.sandbox.card.stats().lookup_calls, 2 * lookups, "{name}");
        let (_, twice) = e.c.store.get(&u.payment_id).await.unwrap().unwrap();
        assert_eq!(twice.batch_attempts, 2, "{name}");
        e.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_settles_an_undecided_payment_the_card_company_approved_and_nothing_else() {
    for backend in e2e_backends() {
        let e = env(&backend, FaultProfile::none()).await;
        let name = backend.name();
        let card = e.card_api();
        // D: UNKNOWN, and the card company approved it (the answer was lost).
        let d = e.record("order-janitor-d").await;
        e.t(
            &d,
            Transition::MarkUnknown {
                last_error: "timeout".into(),
            },
        )
        .await;
        e.sent(&d).await;
        card.confirm(
            &ConfirmRequest {
                payment_key: d.payment_key.clone(),
                order_id: d.order_id.to_string(),
                amount: d.amount,
            },
            d.payment_id.as_str(),
        )
        .await
        .unwrap();
        // B: paid, not saved: the sweep's work, not the janitor's.
        let b = e.record("order-janitor-b").await;
        e.t(&b, paid()).await;
        let s = e.sweeper().janitor(&now_opts()).await.unwrap();
        assert_eq!((s.scanned, s.settled, s.saved), (1, 1, 1), "{name}: {s:?}");
        let (part, settled) = e.c.store.get(&d.payment_id).await.unwrap().unwrap();
        assert!(
            settled.is_paid && settled.is_saved,
            "{name}: {settled:?} in {part:?}"
        );
        assert!(e.sandbox.ledger.record(d.payment_id.as_str()).is_some());
        assert!(
            e.sandbox.ledger.record(b.payment_id.as_str()).is_none(),
            "{name}: the janitor leaves a paid payment to the batch"
        );
        e.cleanup.run().await;
    }
}

/// A confirm that got nothing but transient errors (three 500s) and whose
/// lookups answer 404 was never seen by the card company. Inside its confirm
/// window the janitor confirms it again under its own Idempotency-Key: it
/// ends approved, saved once in the ledger, with no operator and no batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_transient_errors_then_404_lookups_end_approved_by_a_resend_inside_the_window() {
    for backend in e2e_backends() {
        let e = env(&backend, FaultProfile::none()).await;
        let name = backend.name();
        e.sandbox.card.fail_next_confirms(3);
        let input = paygate_payments::ConfirmInput {
            merchant_id: e.merchant.clone(),
            payment_key: "pk_resend_1".into(),
            order_id: OrderId::parse("order-resend-1").unwrap(),
            amount: 5_000,
            idempotency_key: None,
        };
        let outcome = e.c.saga.confirm(input.clone()).await;
        let paygate_payments::ConfirmOutcome::Unknown(r) = outcome else {
            panic!("{name}: expected 202, got {outcome:?}");
        };
        let before = e.sandbox.card.stats();
        assert_eq!((before.confirm_calls, before.approvals), (3, 0), "{name}");
        assert_eq!(e.confirm_requests(&r).await, 3, "{name}");

        let s = e.sweeper().janitor(&now_opts()).await.unwrap();
        assert_eq!((s.settled, s.saved), (1, 1), "{name}: {s:?}");
        let (_, done) = e.c.store.get(&r.payment_id).await.unwrap().unwrap();
        assert!(done.is_paid && done.is_saved, "{name}: {done:?}");
        let after = e.sandbox.card.stats();
        assert_eq!(
            (after.confirm_calls, after.approvals, after.double_charges),
            (4, 1, 0),
            "{name}: one more confirm, one approval"
        );
        assert_eq!(
            e.confirm_requests(&r).await,
            4,
            "{name}: the re-send is logged first"
        );
        assert!(
            e.sandbox.ledger.record(r.payment_id.as_str()).is_some(),
            "{name}"
        );

        // The merchant's retry answers the approval; nothing is sent again.
        let again = e.c.saga.confirm(input).await;
        assert!(
            matches!(again, paygate_payments::ConfirmOutcome::Approved(_)),
            "{name}: {again:?}"
        );
        let s = e.sweeper().janitor(&now_opts()).await.unwrap();
        assert_eq!(s.settled, 0, "{name}: {s:?}");
        assert_eq!(e.sandbox.card.stats().confirm_calls, 4, "{name}");
        e.cleanup.run().await;
    }
}

/// A confirm whose replica died after a transient error (its log holds the
/// card's 500) left a `PENDING` payment the card company never saw. Two
/// checks that judge it at once (the janitor and a batch) send one confirm
/// between them; it ends approved and saved once. One whose replica died
/// between its `REQUEST` row and the call (nothing proves the call left) is
/// not sent again inside the window: it waits, nobody paged, until the
/// window closes (then it is settled as not charged, as the next test shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_killed_after_an_answer_is_resent_once_and_one_killed_before_its_call_waits() {
    for backend in e2e_backends() {
        let e = env(&backend, FaultProfile::none()).await;
        let name = backend.name();
        let then = paygate_core::time::now_ms() - 120_000;
        let r = e.record_at("order-killed-1", then).await;
        e.sent(&r).await;
        e.answered(&r, 500).await;
        e.sent(&r).await;
        let fenced = Transition::MarkSending {
            seen_version: r.version,
        };
        e.t(&r, fenced).await;
        let (_, read) = e.c.store.get(&r.payment_id).await.unwrap().unwrap();

        let settler = || paygate_payments::Settler::new(e.c.store.clone(), e.c.saga.clone(), 3);
        let (janitor, batch) = (settler(), settler());
        let (a, b) = tokio::join!(
            janitor.settle(read.clone(), false),
            batch.settle(read.clone(), false)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let stats = e.sandbox.card.stats();
        assert_eq!(
            (stats.confirm_calls, stats.approvals),
            (1, 1),
            "{name}: one re-send between them ({a:?}, {b:?})"
        );
        assert_eq!(a.1.alerts + b.1.alerts, 0, "{name}: nobody paged");
        let (_, done) = e.c.store.get(&r.payment_id).await.unwrap().unwrap();
        assert!(done.is_paid && done.is_saved, "{name}: {done:?}");
        let entry = e.sandbox.ledger.record(r.payment_id.as_str());
        assert_eq!(entry.map(|l| l.amount), Some(r.amount), "{name}");

        // Killed between the REQUEST row (and its fence) and the call.
        let k = e.record_at("order-killed-2", then).await;
        e.sent(&k).await;
        e.t(
            &k,
            Transition::MarkSending {
                seen_version: k.version,
            },
        )
        .await;
        let s = e.sweeper().janitor(&now_opts()).await.unwrap();
        assert_eq!((s.scanned, s.settled, s.alerts), (1, 0, 0), "{name}: {s:?}");
        assert_eq!(
            e.sandbox.card.stats().confirm_calls,
            1,
            "{name}: not sent again"
        );
        let (_, waiting) = e.c.store.get(&k.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (waiting.card_status, waiting.batch_attempts),
            (paygate_core::CardStatus::Unknown, 1),
            "{name}: counted as a check"
        );
        e.cleanup.run().await;
    }
}

/// Once the card company's confirm window (and a confirm's in-flight
/// window) has closed, a payment its lookup and its transaction list both
/// do not show is settled as not charged: `PAYGATE_CONFIRM_EXPIRED`, filed
/// unpaid, nobody paged, and a merchant's retry is answered with it and
/// sends nothing. One the transaction list shows (under its paymentKey)
/// while the lookup answers 404 is put in front of an operator instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_window_a_payment_neither_source_shows_is_settled_as_not_charged() {
    for backend in e2e_backends() {
        let e = env(&backend, FaultProfile::none()).await;
        let name = backend.name();
        let then = paygate_core::time::now_ms() - 11 * 60_000;
        let gone = e.record_at("order-expired-1", then).await;
        e.sent(&gone).await;
        // The second's paymentKey was approved under another orderId: the
        // lookup by its own order answers 404, the list shows the key.
        let odd = e.record_at("order-expired-2", then).await;
        e.sent(&odd).await;
        let card = e.card_api();
        card.confirm(
            &ConfirmRequest {
                payment_key: odd.payment_key.clone(),
                order_id: "order-elsewhere".into(),
                amount: odd.amount,
            },
            "elsewhere",
        )
        .await
        .unwrap();
        let calls = e.sandbox.card.stats().confirm_calls;

        let s = e.sweeper().janitor(&now_opts()).await.unwrap();
        assert_eq!((s.unpaid, s.alerts), (1, 1), "{name}: {s:?}");
        let (part, expired) = e.c.store.get(&gone.payment_id).await.unwrap().unwrap();
        assert_eq!(part, Partition::Unpaid, "{name}");
        assert_eq!(
            expired.failure_code.as_deref(),
            Some(failure_codes::CONFIRM_EXPIRED),
            "{name}: {expired:?}"
        );
        assert!(e.sandbox.card.stats().transaction_pages >= 2, "{name}");
        let (part, disputed) = e.c.store.get(&odd.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (part, disputed.card_status),
            (Partition::Realtime, paygate_core::CardStatus::Pending),
            "{name}: the sources disagree; left to an operator"
        );
        let outbox = paygate_alert::SqlOutbox::new(e.c.db.clone());
        assert!(
            outbox
                .for_payment(gone.payment_id.as_str())
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );
        let raised = outbox.for_payment(odd.payment_id.as_str()).await.unwrap();
        assert_eq!(raised.len(), 1, "{name}: {raised:?}");
        assert_eq!(raised[0].reason, "card_mismatch", "{name}");

        let retry = e.c.saga.confirm(e.input(&gone)).await;
        let paygate_payments::ConfirmOutcome::Declined { code, .. } = retry else {
            panic!("{name}: {retry:?}");
        };
        assert_eq!(code, failure_codes::CONFIRM_EXPIRED, "{name}");
        assert_eq!(
            e.sandbox.card.stats().confirm_calls,
            calls,
            "{name}: no confirm sent"
        );
        e.cleanup.run().await;
    }
}

/// A merchant's retry of an `UNKNOWN` payment the card company never saw
/// checks it as the janitor would once it has been still for a confirm's
/// in-flight window: confirmed again under its Idempotency-Key and answered
/// approved. A retry of one that changed just now is answered 202 and
/// calls nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_s_retry_of_an_old_unknown_payment_resends_it() {
    for backend in e2e_backends() {
        let e = env(&backend, FaultProfile::none()).await;
        let name = backend.name();
        let unknown_at = |order: &str, at: i64| {
            let mut r = e.unsaved(order, at);
            r.card_status = paygate_core::CardStatus::Unknown;
            r
        };
        let now = paygate_core::time::now_ms();
        let young = unknown_at("order-retry-young", now);
        let old = unknown_at("order-retry-old", now - 120_000);
        for r in [&young, &old] {
            e.c.store.create(r).await.unwrap();
            e.sent(r).await;
            e.answered(r, 500).await;
        }
        let answer = e.c.saga.confirm(e.input(&young)).await;
        assert!(
            matches!(answer, paygate_payments::ConfirmOutcome::Unknown(_)),
            "{name}: {answer:?}"
        );
        let stats = e.sandbox.card.stats();
        assert_eq!((stats.lookup_calls, stats.confirm_calls), (0, 0), "{name}");

        let answer = e.c.saga.confirm(e.input(&old)).await;
        let paygate_payments::ConfirmOutcome::Approved(r) = answer else {
            panic!("{name}: {answer:?}");
        };
        assert!(r.is_paid && r.is_saved, "{name}: {r:?}");
        let stats = e.sandbox.card.stats();
        assert_eq!((stats.confirm_calls, stats.approvals), (1, 1), "{name}");
        assert_eq!(
            e.confirm_requests(&old).await,
            2,
            "{name}: the re-send is logged"
        );
        assert!(
            e.sandbox.ledger.record(old.payment_id.as_str()).is_some(),
            "{name}"
        );
        e.cleanup.run().await;
    }
}
