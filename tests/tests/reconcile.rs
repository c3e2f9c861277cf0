//! The reconciliation against the card simulator and a real store, on every
//! SQL backend and with the state records in each configured MongoDB
//! (`e2e_backends`): each case gets exactly its action, a rerun does nothing new,
//! paging stops at the first short page, stale records are settled, and a
//! dry run changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use paygate_alert::SqlOutbox;
use paygate_core::{
    payment::failure_codes, Config, MerchantId, OrderId, Partition, PaymentRecord, Secret,
};
use paygate_payments::Components;
use paygate_reconcile::{slices, Action, ReconcileOptions, Reconciler};
use paygate_sandbox::{FaultProfile, SandboxServers, SeedApproval};
use paygate_state_store::{
    testing::{e2e_backends, fresh_e2e, Backend, Cleanup, E2eBackend},
    Transition,
};

const SECRET: &str = "test_sk_reconcile";
const MINUTE: i64 = 60_000;

struct Env {
    sandbox: SandboxServers,
    c: Components,
    cleanup: Cleanup,
    merchant: MerchantId,
    now: i64,
}

async fn env<B: Clone + Into<E2eBackend>>(backend: &B) -> Env {
    let sandbox = SandboxServers::start(FaultProfile::none(), SECRET)
        .await
        .unwrap();
    let (stores, cleanup) = fresh_e2e(&backend.clone().into()).await;
    let config = Config {
        card_api_url: Some(sandbox.card_url.clone()),
        card_api_secret_key: Some(Secret::new(SECRET.into())),
        ledger_api_url: Some(sandbox.ledger_url.clone()),
        ..stores.config()
    };
    let c = Components::build(&config, None).await.unwrap();
    Env {
        sandbox,
        c,
        cleanup,
        merchant: MerchantId::generate(),
        now: paygate_core::time::now_ms(),
    }
}

impl Env {
    /// A `PENDING` record created `age_min` minutes ago.
    async fn record(&self, order: &str, amount: i64, age_min: i64) -> PaymentRecord {
        let r = PaymentRecord::new_pending(
            self.merchant.clone(),
            OrderId::parse(order).unwrap(),
            format!("pk_{order}"),
            amount,
            "KRW".into(),
            format!("fp_{order}"),
            None,
            self.now - age_min * MINUTE,
        );
        self.c.store.create(&r).await.unwrap();
        r
    }

    /// A paid and saved record created 30 minutes ago, approved at the
    /// card company now (through its API, so the simulator lists the
    /// approval), and refunded there once per amount of `refunds` (cancel
    /// keys `<payment_id>:cancel:1`, `:2`, ...).
    async fn approved_and_refunded(&self, order: &str, refunds: &[i64]) -> PaymentRecord {
        use paygate_card_api::{CancelRequest, CardApi, ConfirmRequest, TossCardApi};
        let card = TossCardApi::new(
            reqwest::Client::new(),
            &self.sandbox.card_url,
            Secret::new(SECRET.into()),
            Duration::from_secs(5),
        );
        let r = self.record(order, 5_000, 30).await;
        self.paid(&r).await;
        assert!(self
            .c
            .store
            .transition(&r.payment_id, &Transition::MarkSaved)
            .await
            .unwrap());
        card.confirm(
            &ConfirmRequest {
                payment_key: r.payment_key.clone(),
                order_id: order.into(),
                amount: 5_000,
            },
            r.payment_id.as_str(),
        )
        .await
        .unwrap();
        for (n, amount) in refunds.iter().enumerate() {
            card.cancel(
                &r.payment_key,
                &CancelRequest {
                    cancel_reason: "refund".into(),
                    cancel_amount: Some(*amount),
                },
                &format!("{}:cancel:{}", r.payment_id, n + 1),
            )
            .await
            .unwrap();
        }
        r
    }

    /// paygate holds one `DONE` cancel of `amount` for `r`.
    async fn done_cancel(&self, r: &PaymentRecord, amount: i64) {
        let c = paygate_e2e::claim_cancel(self.c.store.as_ref(), r, amount).await;
        let done = paygate_state_store::CancelTransition::MarkDone {
            canceled_at: "2026-11-21T12:10:00+09:00".into(),
        };
        assert!(self
            .c
            .store
            .cancel_transition(&r.payment_id, c.n, &done)
            .await
            .unwrap());
    }

    async fn paid(&self, r: &PaymentRecord) {
        let t = Transition::MarkPaid {
            approved_at: paygate_core::time::kst_rfc3339_from_ms(r.created_at),
        };
        assert!(self.c.store.transition(&r.payment_id, &t).await.unwrap());
    }

    /// The card company approved `order` for `amount`, `age_min` minutes ago
    /// (a paid record's `approvedAt` is its creation time, see `paid`).
    fn approval(&self, order: &str, amount: i64, age_min: i64) {
        self.sandbox.card.seed_approvals([SeedApproval {
            order_id: order.into(),
            payment_key: format!("pk_{order}"),
            amount,
            at_ms: self.now - age_min * MINUTE,
        }]);
    }

    fn reconciler(&self) -> Reconciler {
        Reconciler::new(self.c.store.clone(), self.c.saga.clone(), self.c.db.clone())
    }

    /// The hour up to a minute ago (so the cancels a run makes now are not in
    /// it), with the stale pass out of the way (it has its own test).
    fn opts(&self) -> ReconcileOptions {
        ReconcileOptions {
            stale_after: Duration::from_secs(86_400),
            ..ReconcileOptions::window(self.now - 60 * MINUTE, self.now - MINUTE)
        }
    }

    async fn outbox_reasons(&self) -> Vec<String> {
        let mut v: Vec<String> = SqlOutbox::new(self.c.db.clone())
            .all()
            .await
            .unwrap()
            .into_iter()
            .map(|row| row.dedup_key.split(':').nth(1).unwrap().to_owned())
            .collect();
        v.sort();
        v
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_gets_exactly_its_action_and_a_rerun_does_nothing_new() {
    for backend in e2e_backends() {
        let e = env(&backend).await;
        let name = backend.name();
        // Matched: paid and saved here, approved there.
        let m = e.record("order-matched", 5_000, 30).await;
        e.paid(&m).await;
        e.c.store
            .transition(&m.payment_id, &Transition::MarkSaved)
            .await
            .unwrap();
        e.approval("order-matched", 5_000, 30);
        // Lost response: PENDING here (the gateway died mid-call), approved there.
        let l = e.record("order-lost", 5_000, 30).await;
        e.approval("order-lost", 5_000, 30);
        // Orphan: approved there, no record here at all.
        e.approval("order-orphan", 9_000, 28);
        // Amount mismatch.
        let a = e.record("order-amount", 5_000, 30).await;
        e.paid(&a).await;
        e.approval("order-amount", 7_000, 30);
        // Paid here, never approved there.
        let p = e.record("order-notthere", 5_000, 30).await;
        e.paid(&p).await;

        let s = e.reconciler().run(&e.opts()).await.unwrap();
        assert_eq!(
            (
                s.transactions,
                s.matched,
                s.recovered,
                s.cancelled,
                s.alerts,
                s.failures
            ),
            (4, 1, 1, 1, 3, 0),
            "{name}: {s:?}"
        );
        assert_eq!(s.pages, 8, "{name}: one short page per slice");
        // Each page request is in the SQL log before it is made (I3).
        let page_rows: i64 = paygate_state_store::with_pool!(&e.c.db, pool => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM api_logs WHERE kind = 'REQUEST' AND path LIKE '/v1/transactions?%' AND payment_id LIKE 'reconcile_%'",
            )
            .fetch_one(pool)
            .await
            .unwrap()
        });
        assert_eq!(page_rows, 8, "{name}");
        let card = e.sandbox.card.stats();
        assert_eq!(
            card.lookup_calls, 3,
            "{name}: lost, orphan, not-approved each looked up once"
        );
        assert_eq!(card.cancel_calls, 1, "{name}");
        assert_eq!(e.sandbox.ledger.stats().records, 1, "{name}: the recovery");
        let (part, lost) = e.c.store.get(&l.payment_id).await.unwrap().unwrap();
        assert_eq!(part, Partition::Completed, "{name}");
        assert!(lost.is_paid && lost.is_saved, "{name}");
        let orphan = e.sandbox.card.payment("order-orphan").unwrap();
        assert_eq!(orphan.status, "CANCELED", "{name}");
        assert_eq!(
            e.outbox_reasons().await,
            ["amount_mismatch", "orphan_canceled", "paid_not_approved"],
            "{name}"
        );
        // Every card call of the run is in the SQL log, orphan included.
        let log = paygate_api_log::SqlApiLog::new(e.c.db.clone());
        let orphan_rows = log
            .for_payment(&paygate_core::PaymentId::from_stored("orphan_order-orphan"))
            .await
            .unwrap();
        let paths: Vec<(&str, &str)> = orphan_rows
            .iter()
            .map(|r| (r.kind.as_str(), r.path.as_str()))
            .collect();
        assert_eq!(
            paths,
            [
                ("REQUEST", "/v1/payments/orders/order-orphan"),
                ("RESPONSE", "/v1/payments/orders/order-orphan"),
                ("REQUEST", "/v1/payments/pk_order-orphan/cancel"),
                ("RESPONSE", "/v1/payments/pk_order-orphan/cancel"),
            ],
            "{name}"
        );

        // A second run does nothing new.
        let again = e.reconciler().run(&e.opts()).await.unwrap();
        assert_eq!(
            (
                again.recovered,
                again.cancelled,
                again.alerts,
                again.failures
            ),
            (0, 0, 0, 0),
            "{name}: {again:?}"
        );
        assert_eq!(
            again.matched, 2,
            "{name}: the recovered payment now matches"
        );
        assert_eq!(e.sandbox.card.stats().cancel_calls, 1, "{name}");
        assert_eq!(e.sandbox.ledger.stats().records, 1, "{name}");
        assert_eq!(e.outbox_reasons().await.len(), 3, "{name}");
        e.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_the_plan_and_changes_nothing() {
    for backend in e2e_backends() {
        let e = env(&backend).await;
        let name = backend.name();
        let l = e.record("order-lost", 5_000, 30).await;
        e.approval("order-lost", 5_000, 30);
        e.approval("order-orphan", 9_000, 28);
        let a = e.record("order-amount", 5_000, 30).await;
        e.paid(&a).await;
        e.approval("order-amount", 7_000, 30);
        let plan = Arc::new(Mutex::new(Vec::new()));
        let sink = plan.clone();
        let s = e
            .reconciler()
            .with_sink(Arc::new(move |a: &Action| {
                sink.lock().unwrap().push(a.to_string())
            }))
            .run(&ReconcileOptions {
                dry_run: true,
                ..e.opts()
            })
            .await
            .unwrap();
        let mut plan = plan.lock().unwrap().clone();
        plan.sort();
        assert_eq!(plan.len(), 3, "{name}: {plan:?}");
        assert!(
            plan[0].starts_with("alert amount_mismatch"),
            "{name}: {plan:?}"
        );
        assert!(plan[1].starts_with("cancel orphan approval order order-orphan"));
        assert!(plan[2].starts_with(&format!("recover {}", l.payment_id)));
        // A dry run's counts are what it would do: one recovery, one
        // cancel, two alerts (the amount mismatch and the orphan's).
        assert_eq!(
            (s.recovered, s.cancelled, s.alerts),
            (1, 1, 2),
            "{name}: {s:?}"
        );
        let card = e.sandbox.card.stats();
        assert_eq!((card.lookup_calls, card.cancel_calls), (0, 0), "{name}");
        let (part, lost) = e.c.store.get(&l.payment_id).await.unwrap().unwrap();
        assert_eq!(part, Partition::Realtime);
        assert!(!lost.is_paid, "{name}");
        assert!(e.outbox_reasons().await.is_empty(), "{name}");
        e.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_stops_at_the_first_short_page_of_each_slice() {
    let backend = Backend::Sqlite;
    let e = env(&backend).await;
    // A 400 s window in four 100 s slices, 100 transactions per page.
    let from = (e.now - 60 * MINUTE).div_euclid(100_000) * 100_000;
    let window = slices(from, from + 400_000, 4);
    assert_eq!(window.len(), 4);
    // Per slice: 300 (a multiple: 3 full pages + 1 empty), 250 (3), 0 (1), 99 (1).
    let counts = [300_usize, 250, 0, 99];
    let mut seeds = Vec::new();
    for (slice, n) in window.iter().zip(counts) {
        for k in 0..n {
            seeds.push(SeedApproval {
                order_id: format!("gen-{}-{k:04}", slice.start_ms),
                payment_key: format!("pk_gen-{}-{k:04}", slice.start_ms),
                amount: 1_000,
                at_ms: slice.start_ms + (k as i64 % 100) * 1_000,
            });
        }
    }
    e.sandbox.card.seed_approvals(seeds);
    let opts = ReconcileOptions {
        page_size: 100,
        slices: 4,
        slice_concurrency: 2,
        dry_run: true,
        ..ReconcileOptions::window(from, from + 400_000)
    };
    let s = e.reconciler().run(&opts).await.unwrap();
    let per_slice: BTreeMap<(i64, i64), u64> = e.sandbox.card.pages_per_window();
    let want: BTreeMap<(i64, i64), u64> = window
        .iter()
        .map(|s| (s.start_ms, s.end_ms))
        .zip([4, 3, 1, 1])
        .collect();
    assert_eq!(per_slice, want);
    assert_eq!((s.pages, s.transactions), (9, 649), "{s:?}");
    assert_eq!(e.sandbox.card.stats().transaction_pages, 9);

    // One slice over all of it: ceil(649 / 100) = 7 pages.
    let one = ReconcileOptions {
        slices: 1,
        ..opts.clone()
    };
    let s = e.reconciler().run(&one).await.unwrap();
    assert_eq!((s.pages, s.transactions), (7, 649), "{s:?}");
    e.cleanup.run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pending_records_are_settled_each_in_isolation() {
    for backend in e2e_backends() {
        let e = env(&backend).await;
        let name = backend.name();
        // Stale and approved at the card company (outside the window, so only
        // the stale pass can find it).
        let approved = e.record("order-stale-paid", 5_000, 200).await;
        e.approval("order-stale-paid", 5_000, 199);
        // Stale (UNKNOWN for 30 minutes: ages count from the last
        // transition), and the card company has nothing, in its lookup nor
        // in its transaction list, long after its confirm window: settled
        // as not charged, nobody paged.
        let mut unknown = PaymentRecord::new_pending(
            e.merchant.clone(),
            OrderId::parse("order-stale-unknown").unwrap(),
            "pk_order-stale-unknown".into(),
            5_000,
            "KRW".into(),
            "fp_order-stale-unknown".into(),
            None,
            e.now - 30 * MINUTE,
        );
        unknown.card_status = paygate_core::CardStatus::Unknown;
        unknown.last_error = Some("timeout".into());
        e.c.store.create(&unknown).await.unwrap();
        // Young: its saga may still run; left alone.
        let young = e.record("order-young", 5_000, 1).await;
        let opts = ReconcileOptions {
            stale_after: Duration::from_secs(600),
            ..e.opts()
        };
        let s = e.reconciler().run(&opts).await.unwrap();
        assert_eq!(
            (s.recovered, s.alerts, s.failures),
            (1, 0, 0),
            "{name}: {s:?}"
        );
        let (part, r) = e.c.store.get(&unknown.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (part, r.failure_code.as_deref()),
            (Partition::Unpaid, Some(failure_codes::CONFIRM_EXPIRED)),
            "{name}: {r:?}"
        );
        let (part, r) = e.c.store.get(&approved.payment_id).await.unwrap().unwrap();
        assert_eq!(part, Partition::Completed, "{name}");
        assert!(r.is_paid && r.is_saved);
        let (part, r) = e.c.store.get(&young.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (part, r.card_status.as_str()),
            (Partition::Realtime, "PENDING")
        );
        assert!(e.outbox_reasons().await.is_empty(), "{name}");
        e.cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stale_pass_defers_an_unknown_payment_whose_next_check_is_not_due() {
    for backend in e2e_backends() {
        let e = env(&backend).await;
        let name = backend.name();
        // Both UNKNOWN, last checked 12 minutes ago (stale past 10), the
        // card company has nothing for either: one was checked once (next
        // check 1 min after), the other three times (next 16 min after).
        let unknown = |order: &str, checks: i64| {
            let mut r = PaymentRecord::new_pending(
                e.merchant.clone(),
                OrderId::parse(order).unwrap(),
                format!("pk_{order}"),
                5_000,
                "KRW".into(),
                format!("fp_{order}"),
                None,
                e.now - 12 * MINUTE,
            );
            r.card_status = paygate_core::CardStatus::Unknown;
            r.batch_attempts = checks;
            r
        };
        let due = unknown("order-recheck-due", 1);
        let later = unknown("order-recheck-later", 3);
        e.c.store.create(&due).await.unwrap();
        e.c.store.create(&later).await.unwrap();
        let opts = ReconcileOptions {
            stale_after: Duration::from_secs(600),
            recheck: paygate_payments::RecheckSchedule::DEFAULT,
            ..e.opts()
        };
        let s = e.reconciler().run(&opts).await.unwrap();
        assert_eq!(
            (s.deferred, s.alerts, s.failures),
            (1, 0, 0),
            "{name}: {s:?}"
        );
        let (_, d) = e.c.store.get(&due.payment_id).await.unwrap().unwrap();
        let (_, l) = e.c.store.get(&later.payment_id).await.unwrap().unwrap();
        // The due one is past its confirm window with nothing at the card
        // company: settled as not charged.
        assert_eq!(
            d.failure_code.as_deref(),
            Some(failure_codes::CONFIRM_EXPIRED),
            "{name}: looked up and settled: {d:?}"
        );
        assert_eq!(
            (l.batch_attempts, l.version),
            (3, later.version),
            "{name}: not due, untouched"
        );
        e.cleanup.run().await;
    }
}

// ---- cancels (issue 15, point 11) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceled_payments_are_matched_and_a_cancel_paygate_does_not_hold_is_alerted() {
    use paygate_reconcile::check::{check, CardApproval};
    for backend in e2e_backends() {
        let e = env(&backend).await;
        let name = backend.name();
        // Refunded 2,000 at the card company; paygate's record says 30
        // minutes ago, so the not-approved pass looks it up and finds it
        // canceled. paygate holds the first order's cancel, not the
        // second's.
        let mut records = Vec::new();
        for order in ["order-canceled", "order-card-only-cancel"] {
            records.push(e.approved_and_refunded(order, &[2_000]).await);
        }
        e.done_cancel(&records[0], 2_000).await;

        let approvals = |e: &Env| -> Vec<CardApproval> {
            e.sandbox
                .card
                .approvals()
                .into_iter()
                .map(|a| CardApproval {
                    order_id: a.order_id,
                    payment_key: a.payment_key,
                    canceled_amount: a.canceled_amount,
                })
                .collect()
        };
        let outbox = SqlOutbox::new(e.c.db.clone());
        let report = check(e.c.store.as_ref(), &outbox, &approvals(&e))
            .await
            .unwrap();
        assert_eq!(
            (report.lost, report.canceled, report.cancel_mismatches),
            (0, 1, 1),
            "{name}: {report:?}"
        );
        assert_eq!(
            report.cancel_mismatch_orders,
            vec!["order-card-only-cancel".to_owned()]
        );
        assert!(!report.holds());

        // The window reaches past now: the cancel transactions are in it.
        let opts = ReconcileOptions {
            stale_after: Duration::from_secs(86_400),
            ..ReconcileOptions::window(e.now - 60 * MINUTE, paygate_core::time::now_ms() + MINUTE)
        };
        let s = e.reconciler().run(&opts).await.unwrap();
        assert_eq!((s.matched, s.alerts), (2, 1), "{name}: {s:?}");
        assert_eq!(
            e.outbox_reasons().await,
            vec!["cancel_mismatch".to_owned()],
            "{name}"
        );
        // Alerted: an operator has it; check holds now.
        let report = check(e.c.store.as_ref(), &outbox, &approvals(&e))
            .await
            .unwrap();
        assert!(report.holds(), "{name}: {report:?}");
        e.cleanup.run().await;
    }
}

/// Issue 18, point 4: a slice's paid records are read once and matched
/// from that read; an approval whose record lies outside the read (created
/// long before its approval) is matched from a fresh read by orderId; a
/// payment with a copy in two partitions (an interrupted move) is matched,
/// or looked up, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_match_from_the_slice_read_or_a_fresh_one_and_copies_count_once() {
    for backend in e2e_backends() {
        let e = env(&backend).await;
        let name = backend.name();
        let settled = |r: PaymentRecord| {
            let e = &e;
            async move {
                e.paid(&r).await;
                e.c.store
                    .transition(&r.payment_id, &Transition::MarkSaved)
                    .await
                    .unwrap();
                r
            }
        };
        // In the slice's read.
        settled(e.record("order-in-read", 5_000, 30).await).await;
        e.approval("order-in-read", 5_000, 30);
        // Created 90 minutes ago, before any slice's read reaches back.
        settled(e.record("order-early", 5_000, 90).await).await;
        e.approval("order-early", 5_000, 30);
        // Copies in realtime and completed, approved.
        let both = settled(e.record("order-two-copies", 5_000, 20).await).await;
        e.c.store
            .copy_to_partition(&both.payment_id, Partition::Realtime, Partition::Completed)
            .await
            .unwrap();
        e.approval("order-two-copies", 5_000, 20);
        // Copies in realtime and completed, never approved: one lookup, one alert.
        let gone = settled(e.record("order-two-copies-unseen", 5_000, 25).await).await;
        e.c.store
            .copy_to_partition(&gone.payment_id, Partition::Realtime, Partition::Completed)
            .await
            .unwrap();

        let s = e.reconciler().run(&e.opts()).await.unwrap();
        assert_eq!(
            (s.transactions, s.matched, s.alerts, s.failures),
            (3, 3, 1, 0),
            "{name}: {s:?}"
        );
        assert_eq!(e.sandbox.card.stats().lookup_calls, 1, "{name}");
        assert_eq!(e.outbox_reasons().await, ["paid_not_approved"], "{name}");
        e.cleanup.run().await;
    }
}

/// Two refunds at the card company for one paygate cancel (a cancel sent
/// again under a new key) is a second refund even though each card
/// cancel has an amount paygate holds: card cancels match paygate's one
/// to one, and the second is alerted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_card_refunds_for_one_paygate_cancel_are_alerted() {
    for backend in e2e_backends() {
        let e = env(&backend).await;
        let name = backend.name();
        // Two refunds of 1,000 at the card company; paygate holds one.
        let r = e
            .approved_and_refunded("order-refunded-twice", &[1_000, 1_000])
            .await;
        e.done_cancel(&r, 1_000).await;
        let opts = ReconcileOptions {
            stale_after: Duration::from_secs(86_400),
            ..ReconcileOptions::window(e.now - 60 * MINUTE, paygate_core::time::now_ms() + MINUTE)
        };
        let s = e.reconciler().run(&opts).await.unwrap();
        assert_eq!(s.alerts, 1, "{name}: {s:?}");
        assert_eq!(
            e.outbox_reasons().await,
            vec!["cancel_mismatch".to_owned()],
            "{name}"
        );
        e.cleanup.run().await;
    }
}
