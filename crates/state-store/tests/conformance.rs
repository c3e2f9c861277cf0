//! The store conformance suite: one set of tests, run against every
//! reachable backend (the in-memory store and SQLite always; PostgreSQL with
//! `PAYGATE_TEST_POSTGRES_URL`; MongoDB with `PAYGATE_TEST_MONGODB_URI`).
//! Each test gets its own store (database/schema) and removes it at the end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::sync::Arc;

use futures_util::TryStreamExt;
use paygate_core::{
    payment::failure_codes, CardStatus, MerchantId, OrderId, Partition, PaymentRecord,
};
use paygate_state_store::{
    testing::{fresh_state_store, state_backends, Backend},
    CreateOutcome, StateStore, Transition,
};

fn pending(merchant: &MerchantId, order: &str, key: Option<&str>) -> PaymentRecord {
    PaymentRecord::new_pending(
        merchant.clone(),
        OrderId::parse(order).unwrap(),
        format!("pk_{order}"),
        10_000,
        "KRW".into(),
        format!("fp_{order}"),
        key.map(str::to_owned),
        paygate_core::time::now_ms(),
    )
}

fn paid() -> Transition {
    Transition::MarkPaid {
        approved_at: "2026-11-21T12:00:00+09:00".into(),
    }
}

/// Runs `test` once per reachable backend, each on a fresh store.
async fn on_every_backend<F, Fut>(test: F)
where
    F: Fn(Backend, Arc<dyn StateStore>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for backend in state_backends() {
        let (store, cleanup) = fresh_state_store(&backend).await;
        test(backend, store).await;
        cleanup.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_claims_order_and_idempotency_key_uniquely() {
    on_every_backend(|backend, store| async move {
        let m = MerchantId::generate();
        let other = MerchantId::generate();
        let r1 = pending(&m, "order-0001", Some("key-1"));
        assert_eq!(
            store.create(&r1).await.unwrap(),
            CreateOutcome::Created,
            "{}",
            backend.name()
        );

        // Same order, another payment: the first one holds the claim.
        let dup = pending(&m, "order-0001", None);
        match store.create(&dup).await.unwrap() {
            CreateOutcome::Exists(existing) => assert_eq!(existing.payment_id, r1.payment_id),
            other => panic!("{}: expected Exists, got {other:?}", backend.name()),
        }
        // Same order id for another merchant is another order.
        assert_eq!(
            store
                .create(&pending(&other, "order-0001", None))
                .await
                .unwrap(),
            CreateOutcome::Created
        );

        // The key names its payment even for another order; that order stays free.
        match store
            .create(&pending(&m, "order-0002", Some("key-1")))
            .await
            .unwrap()
        {
            CreateOutcome::Exists(existing) => assert_eq!(existing.payment_id, r1.payment_id),
            other => panic!("{}: expected Exists, got {other:?}", backend.name()),
        }
        assert_eq!(
            store
                .create(&pending(&m, "order-0002", None))
                .await
                .unwrap(),
            CreateOutcome::Created
        );

        let (part, got) = store.get(&r1.payment_id).await.unwrap().unwrap();
        assert_eq!((part, &got), (Partition::Realtime, &r1));
        let by_order = store.get_by_order(&m, &r1.order_id).await.unwrap().unwrap();
        assert_eq!(by_order.payment_id, r1.payment_id);
        assert!(store
            .get_by_order(&m, &OrderId::parse("order-none").unwrap())
            .await
            .unwrap()
            .is_none());
        store.ping().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_applies_only_under_its_guard() {
    on_every_backend(|backend, store| async move {
        let m = MerchantId::generate();
        let name = backend.name();
        let r = pending(&m, "order-flags", None);
        store.create(&r).await.unwrap();
        let id = &r.payment_id;

        // Not paid yet: saving is refused.
        assert!(
            !store.transition(id, &Transition::MarkSaved).await.unwrap(),
            "{name}"
        );
        assert!(!store
            .transition(
                id,
                &Transition::SaveFailed {
                    last_error: "x".into()
                }
            )
            .await
            .unwrap());
        // PENDING -> DONE once.
        assert!(store.transition(id, &paid()).await.unwrap());
        assert!(
            !store.transition(id, &paid()).await.unwrap(),
            "{name}: MarkPaid twice"
        );
        // A paid record can be neither aborted nor made unknown.
        let abort = Transition::MarkAborted {
            failure_code: "REJECT_CARD_PAYMENT".into(),
            last_error: "no".into(),
        };
        assert!(!store.transition(id, &abort).await.unwrap());
        assert!(!store
            .transition(
                id,
                &Transition::MarkUnknown {
                    last_error: "x".into()
                }
            )
            .await
            .unwrap());
        // Ledger tries are counted.
        assert!(store
            .transition(
                id,
                &Transition::SaveFailed {
                    last_error: "503".into()
                }
            )
            .await
            .unwrap());
        assert!(store
            .transition(
                id,
                &Transition::BatchSaveFailed {
                    last_error: "503".into()
                }
            )
            .await
            .unwrap());
        assert!(store.transition(id, &Transition::MarkSaved).await.unwrap());
        assert!(
            !store.transition(id, &Transition::MarkSaved).await.unwrap(),
            "{name}: MarkSaved twice"
        );
        let (_, got) = store.get(id).await.unwrap().unwrap();
        assert!(got.is_paid && got.is_saved);
        assert_eq!(got.card_status, CardStatus::Done);
        assert_eq!(
            got.approved_at.as_deref(),
            Some("2026-11-21T12:00:00+09:00")
        );
        assert_eq!((got.save_attempts, got.batch_attempts), (2, 1));
        assert_eq!(got.last_error, None);

        // PENDING -> UNKNOWN -> DONE (settled later by a lookup).
        let u = pending(&m, "order-unknown", None);
        store.create(&u).await.unwrap();
        assert!(store
            .transition(
                &u.payment_id,
                &Transition::MarkUnknown {
                    last_error: "timeout".into()
                }
            )
            .await
            .unwrap());
        assert!(!store
            .transition(
                &u.payment_id,
                &Transition::MarkUnknown {
                    last_error: "again".into()
                }
            )
            .await
            .unwrap());
        assert!(store.transition(&u.payment_id, &paid()).await.unwrap());

        // A decline is final; only a no-call abort reopens.
        let d = pending(&m, "order-declined", None);
        store.create(&d).await.unwrap();
        assert!(store.transition(&d.payment_id, &abort).await.unwrap());
        let reopen = |code: &str| Transition::Reopen {
            failure_code: code.into(),
        };
        assert!(!store
            .transition(&d.payment_id, &reopen("REJECT_CARD_PAYMENT"))
            .await
            .unwrap());
        assert!(!store
            .transition(&d.payment_id, &reopen(failure_codes::LOG_UNAVAILABLE))
            .await
            .unwrap());
        assert!(
            !store.transition(&d.payment_id, &paid()).await.unwrap(),
            "{name}: a declined payment cannot become paid by transition"
        );

        let n = pending(&m, "order-nocall", None);
        store.create(&n).await.unwrap();
        let no_call = Transition::MarkAborted {
            failure_code: failure_codes::LOG_UNAVAILABLE.into(),
            last_error: "log".into(),
        };
        assert!(store.transition(&n.payment_id, &no_call).await.unwrap());
        assert!(store
            .transition(&n.payment_id, &reopen(failure_codes::LOG_UNAVAILABLE))
            .await
            .unwrap());
        assert!(!store
            .transition(&n.payment_id, &reopen(failure_codes::LOG_UNAVAILABLE))
            .await
            .unwrap());
        let (_, got) = store.get(&n.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (got.card_status, got.failure_code),
            (CardStatus::Pending, None)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_writers_lose_no_update() {
    on_every_backend(|backend, store| async move {
        let m = MerchantId::generate();
        let r = pending(&m, "order-race", None);
        store.create(&r).await.unwrap();

        // 32 writers race to mark it paid: exactly one wins.
        let wins = futures_util::future::join_all((0..32).map(|_| {
            let store = store.clone();
            let id = r.payment_id.clone();
            tokio::spawn(async move { store.transition(&id, &paid()).await.unwrap() })
        }))
        .await
        .into_iter()
        .filter(|w| *w.as_ref().unwrap())
        .count();
        assert_eq!(wins, 1, "{}", backend.name());

        // 32 writers each count a failed ledger try: all 32 are counted.
        let applied = futures_util::future::join_all((0..32).map(|i| {
            let store = store.clone();
            let id = r.payment_id.clone();
            tokio::spawn(async move {
                store
                    .transition(
                        &id,
                        &Transition::SaveFailed {
                            last_error: format!("try {i}"),
                        },
                    )
                    .await
                    .unwrap()
            })
        }))
        .await
        .into_iter()
        .filter(|w| *w.as_ref().unwrap())
        .count();
        assert_eq!(applied, 32);
        let (_, got) = store.get(&r.payment_id).await.unwrap().unwrap();
        assert_eq!(
            got.save_attempts,
            32,
            "{}: no lost increment",
            backend.name()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_interrupted_after_the_target_write_is_finished_by_a_rerun() {
    on_every_backend(|backend, store| async move {
        let m = MerchantId::generate();
        let r = pending(&m, "order-move", None);
        store.create(&r).await.unwrap();
        store.transition(&r.payment_id, &paid()).await.unwrap();
        store
            .transition(&r.payment_id, &Transition::MarkSaved)
            .await
            .unwrap();

        // The crash: the target was written, the source not yet deleted.
        assert!(store
            .copy_to_partition(&r.payment_id, Partition::Realtime, Partition::Completed)
            .await
            .unwrap());
        let (part, got) = store.get(&r.payment_id).await.unwrap().unwrap();
        assert_eq!(
            part,
            Partition::Completed,
            "{}: the newer copy is the truth",
            backend.name()
        );
        assert!(got.is_saved);

        // The rerun finishes the move; a second rerun is a no-op.
        assert!(store
            .move_record(&r.payment_id, Partition::Realtime, Partition::Completed)
            .await
            .unwrap());
        assert!(!store
            .move_record(&r.payment_id, Partition::Realtime, Partition::Completed)
            .await
            .unwrap());

        let realtime: Vec<_> = store
            .scan(Partition::Realtime, 10)
            .try_collect()
            .await
            .unwrap();
        let completed: Vec<_> = store
            .scan(Partition::Completed, 10)
            .try_collect()
            .await
            .unwrap();
        assert!(
            realtime.is_empty(),
            "{}: nothing left behind",
            backend.name()
        );
        assert_eq!(completed.len(), 1, "{}: no duplicate", backend.name());
        assert_eq!(completed[0].payment_id, r.payment_id);
        // The claim still answers for the order, so a late retry cannot start a second payment.
        match store
            .create(&pending(&m, "order-move", None))
            .await
            .unwrap()
        {
            CreateOutcome::Exists(existing) => assert_eq!(existing.payment_id, r.payment_id),
            other => panic!("{}: expected Exists, got {other:?}", backend.name()),
        }
        assert_eq!(
            store
                .get_by_order(&m, &r.order_id)
                .await
                .unwrap()
                .unwrap()
                .payment_id,
            r.payment_id
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_streams_every_record_in_id_order() {
    on_every_backend(|backend, store| async move {
        let m = MerchantId::generate();
        let n = 1_050;
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let r = pending(&m, &format!("order-scan-{i:05}"), None);
            ids.push(r.payment_id.clone());
            store.create(&r).await.unwrap();
        }
        ids.sort();
        // A batch size that does not divide the count exercises the last short page.
        let scanned: Vec<_> = store
            .scan(Partition::Realtime, 100)
            .map_ok(|r| r.payment_id)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(scanned, ids, "{}", backend.name());
        let empty: Vec<_> = store
            .scan(Partition::Unpaid, 100)
            .try_collect()
            .await
            .unwrap();
        assert!(empty.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_ids_are_found_across_merchants_and_partitions() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let (m1, m2) = (MerchantId::generate(), MerchantId::generate());
        let a = pending(&m1, "order-shared", None);
        let b = pending(&m2, "order-shared", None);
        let c = pending(&m1, "order-moved", None);
        let d = pending(&m1, "order-other", None);
        for r in [&a, &b, &c, &d] {
            store.create(r).await.unwrap();
        }
        store.transition(&c.payment_id, &paid()).await.unwrap();
        // Only a paid and saved record may enter completed_payments.
        store
            .transition(&c.payment_id, &Transition::MarkSaved)
            .await
            .unwrap();
        assert!(store
            .move_record(&c.payment_id, Partition::Realtime, Partition::Completed)
            .await
            .unwrap());
        // An interrupted move of `a`: a copy in both partitions, one answer.
        store
            .copy_to_partition(&a.payment_id, Partition::Realtime, Partition::Unpaid)
            .await
            .unwrap();
        let ids = ["order-shared", "order-moved", "order-missing"].map(String::from);
        let mut found = store.find_by_order_ids(&ids).await.unwrap();
        found.sort_by(|x, y| x.1.payment_id.as_str().cmp(y.1.payment_id.as_str()));
        let mut want = vec![
            (Partition::Unpaid, a.payment_id.clone()),
            (Partition::Realtime, b.payment_id.clone()),
            (Partition::Completed, c.payment_id.clone()),
        ];
        want.sort_by(|x, y| x.1.as_str().cmp(y.1.as_str()));
        let got: Vec<_> = found
            .iter()
            .map(|(p, r)| (*p, r.payment_id.clone()))
            .collect();
        assert_eq!(got, want, "{name}");
        assert!(store.find_by_order_ids(&[]).await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_created_streams_a_time_range_in_order() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let base = 1_700_000_000_000_i64;
        // 25 records, five per millisecond, from base to base + 4.
        let mut made = Vec::new();
        for i in 0..25_i64 {
            let mut r = pending(&m, &format!("order-range-{i:03}"), None);
            r.created_at = base + i / 5;
            r.updated_at = r.created_at;
            store.create(&r).await.unwrap();
            made.push(r);
        }
        // [base + 1, base + 4): 15 records, over pages of 4.
        let got: Vec<PaymentRecord> = store
            .scan_created(Partition::Realtime, base + 1, base + 4, 4)
            .try_collect()
            .await
            .unwrap();
        let mut want: Vec<&PaymentRecord> = made
            .iter()
            .filter(|r| r.created_at > base && r.created_at < base + 4)
            .collect();
        want.sort_by(|x, y| {
            (x.created_at, x.payment_id.as_str()).cmp(&(y.created_at, y.payment_id.as_str()))
        });
        let got_ids: Vec<_> = got.iter().map(|r| r.payment_id.clone()).collect();
        let want_ids: Vec<_> = want.iter().map(|r| r.payment_id.clone()).collect();
        assert_eq!(got_ids.len(), 15, "{name}");
        assert_eq!(got_ids, want_ids, "{name}");
    })
    .await;
}

/// Issue 13, point 1: a move decided on a stale read does not apply. The
/// batch read a no-call abort; the merchant's retry reopened it to PENDING;
/// the batch's move to `unpaid_payments` must now leave it in realtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_applies_only_while_the_record_may_enter_the_target() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let r = pending(&m, "order-guard-1", None);
        store.create(&r).await.unwrap();
        let pid = &r.payment_id;

        // PENDING may enter neither completed nor unpaid.
        for to in [Partition::Completed, Partition::Unpaid] {
            assert!(
                !store
                    .move_record(pid, Partition::Realtime, to)
                    .await
                    .unwrap(),
                "{name}: a PENDING record moved to {to:?}"
            );
        }

        // The batch reads a no-call abort ...
        let aborted = Transition::MarkAborted {
            failure_code: failure_codes::CIRCUIT_OPEN.into(),
            last_error: "open".into(),
        };
        assert!(store.transition(pid, &aborted).await.unwrap());
        // ... a merchant retry reopens it before the batch's move lands.
        let reopen = Transition::Reopen {
            failure_code: failure_codes::CIRCUIT_OPEN.into(),
        };
        assert!(store.transition(pid, &reopen).await.unwrap());
        assert!(
            !store
                .move_record(pid, Partition::Realtime, Partition::Unpaid)
                .await
                .unwrap(),
            "{name}: the reopened PENDING record was moved to unpaid"
        );
        let (part, now) = store.get(pid).await.unwrap().unwrap();
        assert_eq!(
            (part, now.card_status),
            (Partition::Realtime, CardStatus::Pending),
            "{name}"
        );
        // The card approves; MarkPaid finds it where it belongs.
        assert!(store.transition(pid, &paid()).await.unwrap(), "{name}");
        // Paid but not saved may not complete yet, nor ever be unpaid.
        for to in [Partition::Completed, Partition::Unpaid] {
            assert!(
                !store
                    .move_record(pid, Partition::Realtime, to)
                    .await
                    .unwrap(),
                "{name}: a paid, unsaved record moved to {to:?}"
            );
        }
        assert!(store.transition(pid, &Transition::MarkSaved).await.unwrap());
        assert!(store
            .move_record(pid, Partition::Realtime, Partition::Completed)
            .await
            .unwrap());
        let (part, done) = store.get(pid).await.unwrap().unwrap();
        assert_eq!(
            (part, done.is_paid, done.is_saved),
            (Partition::Completed, true, true),
            "{name}"
        );
    })
    .await;
}
