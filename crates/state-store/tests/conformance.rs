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
        // Same order id for another merchant on the same card account: refused
        // (issue 15, point 3), and nothing of it is written.
        let foreign = pending(&other, "order-0001", None);
        assert_eq!(
            store.create(&foreign).await.unwrap(),
            CreateOutcome::OrderIdInUse,
            "{}",
            backend.name()
        );
        assert!(store.get(&foreign.payment_id).await.unwrap().is_none());
        assert!(store
            .get_by_order(&other, &foreign.order_id)
            .await
            .unwrap()
            .is_none());

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
            seen_version: None,
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
        // A check that learned nothing is counted, on the version it read.
        let checked = |seen_version: i64| Transition::CheckedUnknown {
            last_error: "no payment yet".into(),
            seen_version,
        };
        assert!(
            !store.transition(&u.payment_id, &checked(0)).await.unwrap(),
            "{name}: CheckedUnknown on a version moved on"
        );
        assert!(store.transition(&u.payment_id, &checked(1)).await.unwrap());
        let (_, got) = store.get(&u.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (got.card_status, got.batch_attempts, got.version),
            (CardStatus::Unknown, 1, 2),
            "{name}"
        );
        assert_eq!(got.last_error.as_deref(), Some("no payment yet"));
        // A re-send is fenced on the version its lookup was judged from:
        // the status stays, the version and `updated_at` move on.
        let resend = |seen_version: i64| Transition::MarkResending { seen_version };
        assert!(
            !store.transition(&u.payment_id, &resend(1)).await.unwrap(),
            "{name}: MarkResending on a version moved on"
        );
        assert!(store.transition(&u.payment_id, &resend(2)).await.unwrap());
        let (_, resent) = store.get(&u.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (resent.card_status, resent.batch_attempts, resent.version),
            (CardStatus::Unknown, 1, 3),
            "{name}"
        );
        assert!(
            resent.updated_at >= got.updated_at,
            "{name}: never stamped back"
        );
        assert!(store.transition(&u.payment_id, &paid()).await.unwrap());
        assert!(
            !store.transition(&u.payment_id, &resend(4)).await.unwrap(),
            "{name}: a paid payment is not re-sent"
        );
        assert!(
            !store.transition(&u.payment_id, &checked(4)).await.unwrap(),
            "{name}: a paid payment is not checked"
        );

        // A decline is final; only a no-call abort reopens.
        let d = pending(&m, "order-declined", None);
        store.create(&d).await.unwrap();
        assert!(store.transition(&d.payment_id, &abort).await.unwrap());
        let reopen = |code: &str| Transition::Reopen {
            seen_version: None,
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
            seen_version: None,
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

/// Filing a `PENDING` record with no `REQUEST` row as never sent races a
/// confirm whose row is landing. The filing is guarded on the version it
/// read before the log, and the confirm fences its record after its row:
/// one of the two always fails, whatever the order and whatever the
/// writers' clocks say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filing_as_not_sent_and_the_send_fence_exclude_each_other() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let file = |seen: i64| Transition::FileNotSent {
            seen_version: seen,
            last_error: "no REQUEST row".into(),
        };

        // The fence first: a filing that read the record before it fails.
        let a = pending(&m, "order-fence-first", None);
        store.create(&a).await.unwrap();
        let (_, read) = store.get(&a.payment_id).await.unwrap().unwrap();
        let fence = |v: i64| Transition::MarkSending { seen_version: v };
        assert!(store
            .transition(&a.payment_id, &fence(read.version))
            .await
            .unwrap());
        let (_, fenced) = store.get(&a.payment_id).await.unwrap().unwrap();
        assert_eq!(
            fenced.version,
            read.version + 1,
            "{name}: the fence moves the version on"
        );
        assert!(fenced.updated_at >= read.updated_at, "{name}");
        assert_eq!(fenced.card_status, CardStatus::Pending, "{name}");
        assert!(
            !store
                .transition(&a.payment_id, &file(read.version))
                .await
                .unwrap(),
            "{name}: a filing guarded on a stale version applied"
        );
        // A fence on a version the record no longer has fails (a confirm
        // that stalled before its fence while another actor changed the
        // record); one on the version it has moves it on again.
        assert!(
            !store
                .transition(&a.payment_id, &fence(read.version))
                .await
                .unwrap(),
            "{name}: a fence on a stale version applied"
        );
        assert!(store
            .transition(&a.payment_id, &fence(fenced.version))
            .await
            .unwrap());
        let (_, again) = store.get(&a.payment_id).await.unwrap().unwrap();
        assert_eq!(again.version, fenced.version + 1, "{name}");

        // The filing first: the fence then fails, so no call is made.
        let b = pending(&m, "order-file-first", None);
        store.create(&b).await.unwrap();
        let (_, read) = store.get(&b.payment_id).await.unwrap().unwrap();
        assert!(store
            .transition(&b.payment_id, &file(read.version))
            .await
            .unwrap());
        let (_, filed) = store.get(&b.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (filed.card_status, filed.failure_code.as_deref()),
            (CardStatus::Aborted, Some(failure_codes::NOT_SENT)),
            "{name}"
        );
        assert!(
            !store
                .transition(
                    &b.payment_id,
                    &Transition::MarkSending {
                        seen_version: read.version
                    }
                )
                .await
                .unwrap(),
            "{name}: a confirm fenced a record already filed as not sent"
        );

        // Neither applies to a paid record.
        let c = pending(&m, "order-paid", None);
        store.create(&c).await.unwrap();
        assert!(store.transition(&c.payment_id, &paid()).await.unwrap());
        let (_, read) = store.get(&c.payment_id).await.unwrap().unwrap();
        assert!(!store
            .transition(
                &c.payment_id,
                &Transition::MarkSending {
                    seen_version: read.version
                }
            )
            .await
            .unwrap());
        assert!(!store
            .transition(&c.payment_id, &file(read.version))
            .await
            .unwrap());
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
async fn set_based_moves_take_only_settled_records_past_the_cutoff_a_chunk_at_a_time() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let mut settled = Vec::new();
        for i in 0..5 {
            let r = pending(&m, &format!("order-settled-{i}"), None);
            store.create(&r).await.unwrap();
            store.transition(&r.payment_id, &paid()).await.unwrap();
            store
                .transition(&r.payment_id, &Transition::MarkSaved)
                .await
                .unwrap();
            settled.push(r);
        }
        // A move of one of them died after writing its target copy.
        assert!(store
            .copy_to_partition(
                &settled[2].payment_id,
                Partition::Realtime,
                Partition::Completed
            )
            .await
            .unwrap());
        let unsaved = pending(&m, "order-unsaved", None);
        store.create(&unsaved).await.unwrap();
        store
            .transition(&unsaved.payment_id, &paid())
            .await
            .unwrap();
        let aborted = pending(&m, "order-aborted", None);
        store.create(&aborted).await.unwrap();
        store
            .transition(
                &aborted.payment_id,
                &Transition::MarkAborted {
                    failure_code: "REJECT_CARD_COMPANY".into(),
                    last_error: "declined".into(),
                    seen_version: None,
                },
            )
            .await
            .unwrap();
        let open = pending(&m, "order-open", None);
        store.create(&open).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let cutoff = paygate_core::time::now_ms();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        // Paid and saved, but younger than the cutoff: its saga may run.
        let young = pending(&m, "order-young", None);
        store.create(&young).await.unwrap();
        store.transition(&young.payment_id, &paid()).await.unwrap();
        store
            .transition(&young.payment_id, &Transition::MarkSaved)
            .await
            .unwrap();

        let mut chunks = Vec::new();
        loop {
            let moved = store.move_settled(cutoff, 2).await.unwrap();
            chunks.push(moved);
            if moved < 2 {
                break;
            }
        }
        assert_eq!(chunks, vec![2, 2, 1], "{name}: chunks of at most 2");
        assert_eq!(
            store.move_settled(cutoff, 2).await.unwrap(),
            0,
            "{name}: a rerun moves nothing"
        );

        let ids = |v: Vec<PaymentRecord>| {
            let mut ids: Vec<String> = v.into_iter().map(|r| r.payment_id.to_string()).collect();
            ids.sort();
            ids
        };
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
        assert!(completed.iter().all(|r| r.is_paid && r.is_saved), "{name}");
        let mut want_completed: Vec<String> =
            settled.iter().map(|r| r.payment_id.to_string()).collect();
        want_completed.sort();
        assert_eq!(
            ids(completed),
            want_completed,
            "{name}: each settled record once, the interrupted one too"
        );
        let mut want_realtime: Vec<String> = [&unsaved, &aborted, &open, &young]
            .iter()
            .map(|r| r.payment_id.to_string())
            .collect();
        want_realtime.sort();
        assert_eq!(
            ids(realtime),
            want_realtime,
            "{name}: the rest stay in realtime"
        );
        // The claims still answer for moved orders.
        let (part, got) = store.get(&settled[0].payment_id).await.unwrap().unwrap();
        assert_eq!(
            (part, got.payment_id),
            (Partition::Completed, settled[0].payment_id.clone())
        );
        match store
            .create(&pending(&m, "order-settled-0", None))
            .await
            .unwrap()
        {
            CreateOutcome::Exists(existing) => {
                assert_eq!(existing.payment_id, settled[0].payment_id)
            }
            other => panic!("{name}: expected Exists, got {other:?}"),
        }
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
        // Since issue 15 one orderId has one payment on the card account
        // (another merchant's create of it is refused); records of several
        // merchants are found in one lookup all the same.
        let b = pending(&m2, "order-shared-2", None);
        let c = pending(&m1, "order-moved", None);
        let d = pending(&m1, "order-other", None);
        for r in [&a, &b, &c, &d] {
            assert_eq!(store.create(r).await.unwrap(), CreateOutcome::Created);
        }
        assert_eq!(
            store
                .create(&pending(&m2, "order-shared", None))
                .await
                .unwrap(),
            CreateOutcome::OrderIdInUse,
            "{name}"
        );
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
        let ids = [
            "order-shared",
            "order-shared-2",
            "order-moved",
            "order-missing",
        ]
        .map(String::from);
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

/// Issue 18, point 4: the reconciliation's stale pass reads only the
/// records it settles (not paid, `PENDING` or `UNKNOWN`, last updated at or
/// before the cutoff), in `payment_id` order, the same on every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_stale_streams_only_unsettled_records_past_the_cutoff() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let base = 1_700_000_000_000_i64;
        let cutoff = base + 1_000;
        let make = |order: &str, status: CardStatus, updated_at: i64| {
            let mut r = pending(&m, order, None);
            r.card_status = status;
            r.created_at = base;
            r.updated_at = updated_at;
            r
        };
        let mut want = Vec::new();
        // Five stale PENDING (more than a page of 2) and one stale UNKNOWN,
        // created between records that are not stale, so that every page
        // holds some of both: updated after the cutoff, declined, paid
        // since, and paid with a status left `UNKNOWN` (only `is_paid`
        // excludes that one).
        let mut paid_since = Vec::new();
        for i in 0..5 {
            let r = make(&format!("order-stale-{i}"), CardStatus::Pending, base + i);
            store.create(&r).await.unwrap();
            want.push(r.payment_id.clone());
            let other = match i {
                0 => make("order-young", CardStatus::Pending, cutoff + 1),
                1 => make("order-declined", CardStatus::Aborted, base),
                2 => {
                    let mut r = make("order-paid-flag", CardStatus::Unknown, base);
                    r.is_paid = true;
                    r
                }
                _ => {
                    let r = make(&format!("order-paid-{i}"), CardStatus::Pending, base);
                    paid_since.push(r.payment_id.clone());
                    r
                }
            };
            store.create(&other).await.unwrap();
        }
        let unknown = make("order-stale-unknown", CardStatus::Unknown, cutoff);
        store.create(&unknown).await.unwrap();
        want.push(unknown.payment_id.clone());
        for id in &paid_since {
            store.transition(id, &paid()).await.unwrap();
        }
        want.sort();
        let got: Vec<_> = store
            .scan_stale(cutoff, 2)
            .map_ok(|r| r.payment_id)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got, want, "{name}");
        // The same as filtering a full scan with the shared predicate.
        let filtered: Vec<_> = store
            .scan(Partition::Realtime, 100)
            .try_filter(|r| std::future::ready(paygate_state_store::is_stale(r, cutoff)))
            .map_ok(|r| r.payment_id)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(filtered, want, "{name}");
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
            seen_version: None,
        };
        assert!(store.transition(pid, &aborted).await.unwrap());
        // ... a merchant retry reopens it before the batch's move lands.
        let reopen = Transition::Reopen {
            seen_version: None,
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

/// Issue 13, point 2: however creates of one order race, the order ends with
/// one payment id. Creates whose Idempotency-Key belongs to another order
/// take the order's claim and must give it up (they answer with the key's
/// payment) while plain creates of the same order run at the same time; no
/// answer may name a payment that is not the order's, and the order's
/// record must exist (on the old MongoDB create, a concurrent reader wrote
/// a given-back claim's record into realtime and a later create took the
/// duplicate key on its own insert as `Created`: two ids, one without a
/// record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creates_of_one_order_name_one_payment() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let owner = pending(&m, "order-key-owner", Some("key-taken"));
        assert_eq!(store.create(&owner).await.unwrap(), CreateOutcome::Created);
        for round in 0..12 {
            let order = format!("order-race2-{round:03}");
            let mut tasks = Vec::new();
            for i in 0..12 {
                let store = store.clone();
                let key = (i % 2 == 0).then_some("key-taken");
                let r = pending(&m, &order, key);
                tasks.push(tokio::spawn(async move {
                    let outcome = store.create(&r).await.unwrap();
                    (r, outcome)
                }));
            }
            let mut named = std::collections::BTreeSet::new();
            for t in tasks {
                let (r, outcome) = t.await.unwrap();
                let id = match outcome {
                    CreateOutcome::Created => r.payment_id.clone(),
                    CreateOutcome::Exists(e) => e.payment_id.clone(),
                    other => panic!("{name}: {order}: {other:?}"),
                };
                if id == owner.payment_id {
                    // The key's payment answers for the taken key.
                    assert!(r.idempotency_key.is_some(), "{name}: {order}");
                    continue;
                }
                named.insert(id);
            }
            // A late create of the order, once every racer has answered.
            match store.create(&pending(&m, &order, None)).await.unwrap() {
                CreateOutcome::Exists(e) => {
                    named.insert(e.payment_id.clone());
                }
                other => panic!("{name}: {order} was free again after its creates: {other:?}"),
            }
            assert_eq!(named.len(), 1, "{name}: {order} has payments {named:?}");
            let id = named.into_iter().next().unwrap();
            let (part, rec) = store
                .get(&id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{name}: {order}'s payment {id} has no record"));
            assert_eq!(
                (part, rec.order_id.as_str()),
                (Partition::Realtime, order.as_str())
            );
            assert_eq!(
                store
                    .get_by_order(&m, &OrderId::parse(&order).unwrap())
                    .await
                    .unwrap()
                    .map(|r| r.payment_id),
                Some(id),
                "{name}"
            );
        }
        // Exactly one record per order (and the key owner's).
        let realtime: Vec<_> = store
            .scan(Partition::Realtime, 100)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(realtime.len(), 13, "{name}: one record per order");
    })
    .await;
}

/// Issue 13, point 8: a read of one payment finds it while it moves between
/// partitions (a no-call abort moved to `unpaid_payments` and back to
/// realtime by a merchant's retry, again and again). Every read overlaps at
/// most one move; the old MongoDB read (realtime, completed, unpaid, one
/// after the other, no snapshot) missed a record moving from unpaid back to
/// realtime, which the reconciliation could take for an orphan approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_moving_between_partitions_is_never_missed_by_a_read() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let r = pending(&m, "order-in-motion", None);
        store.create(&r).await.unwrap();
        let aborted = Transition::MarkAborted {
            failure_code: failure_codes::CIRCUIT_OPEN.into(),
            last_error: "open".into(),
            seen_version: None,
        };
        assert!(store.transition(&r.payment_id, &aborted).await.unwrap());

        let reads = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (store, reads, stop) = (store.clone(), reads.clone(), stop.clone());
            let (pid, order) = (r.payment_id.clone(), r.order_id.to_string());
            tokio::spawn(async move {
                let mut misses = Vec::new();
                // Each read is bounded: once (CI, PostgreSQL) one read never
                // returned while the server sat idle in ClientRead, and the
                // mover waited for it forever. A read that times out is
                // dropped and counted, not taken as a miss (it answered
                // nothing); the check is that no answer is wrong.
                let bound = std::time::Duration::from_secs(10);
                let mut stuck = 0_usize;
                while !stop.load(Ordering::SeqCst) {
                    let n = reads.load(Ordering::SeqCst);
                    if n % 2 == 0 {
                        match tokio::time::timeout(bound, store.get(&pid)).await {
                            Ok(found) => {
                                if found.unwrap().is_none() {
                                    misses.push(format!("get #{n}"));
                                }
                            }
                            Err(_) => stuck += 1,
                        }
                    } else {
                        let find = store.find_by_order_ids(std::slice::from_ref(&order));
                        match tokio::time::timeout(bound, find).await {
                            Ok(found) => {
                                if found.unwrap().is_empty() {
                                    misses.push(format!("find_by_order_ids #{n}"));
                                }
                            }
                            Err(_) => stuck += 1,
                        }
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                }
                if stuck > 0 {
                    eprintln!("{stuck} read(s) took over {bound:?} and were dropped");
                }
                // Reads that answered: the check means nothing without them.
                let answered = reads.load(Ordering::SeqCst).saturating_sub(stuck);
                assert!(
                    answered >= 60,
                    "only {answered} reads answered ({stuck} dropped)"
                );
                misses
            })
        };
        // Waits until a read that started after the last move has ended, so
        // no read overlaps two moves.
        let settle = || async {
            let seen = reads.load(Ordering::SeqCst);
            while reads.load(Ordering::SeqCst) < seen + 2 {
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
        };
        for _ in 0..30 {
            for (from, to) in [
                (Partition::Realtime, Partition::Unpaid),
                (Partition::Unpaid, Partition::Realtime),
            ] {
                assert!(
                    store.move_record(&r.payment_id, from, to).await.unwrap(),
                    "{name}: {from:?} -> {to:?}"
                );
                settle().await;
            }
        }
        stop.store(true, Ordering::SeqCst);
        let misses = reader.await.unwrap();
        assert!(
            misses.is_empty(),
            "{name}: reads missed a record in motion: {misses:?} of {} reads",
            reads.load(Ordering::SeqCst)
        );
    })
    .await;
}

/// A record with another paymentKey for `order`.
fn pending_with_key(merchant: &MerchantId, order: &str, payment_key: &str) -> PaymentRecord {
    let mut r = pending(merchant, order, None);
    r.payment_key = payment_key.to_owned();
    r
}

/// Issue 15, point 2: a paymentKey pays one order, for any merchant on the
/// card account. A create refused on the paymentKey writes nothing and
/// takes none of its other claims: its order, its idempotency key and its
/// account orderId stay free, so the merchant can confirm that order with
/// its own paymentKey (a claim never blocks without a record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_key_is_claimed_once_per_card_account() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let other = MerchantId::generate();
        let first = pending_with_key(&m, "order-pk-a", "pk_shared");
        assert_eq!(store.create(&first).await.unwrap(), CreateOutcome::Created);

        for (who, order, key) in [
            (&m, "order-pk-b", Some("key-b")),
            (&other, "order-pk-c", Some("key-c")),
        ] {
            let mut reused = pending_with_key(who, order, "pk_shared");
            reused.idempotency_key = key.map(str::to_owned);
            assert_eq!(
                store.create(&reused).await.unwrap(),
                CreateOutcome::PaymentKeyReused,
                "{name}: {order}"
            );
            assert!(
                store.get(&reused.payment_id).await.unwrap().is_none(),
                "{name}"
            );
            assert!(store
                .get_by_order(who, &reused.order_id)
                .await
                .unwrap()
                .is_none());
            // Every other claim it tried is free: the order, the key, the
            // account orderId.
            let mut own = pending_with_key(who, order, &format!("pk_own_{order}"));
            own.idempotency_key = key.map(str::to_owned);
            assert_eq!(
                store.create(&own).await.unwrap(),
                CreateOutcome::Created,
                "{name}: {order} blocked by a refused create"
            );
        }
        // The first order still replays as itself, whatever its body.
        match store
            .create(&pending_with_key(&m, "order-pk-a", "pk_shared"))
            .await
            .unwrap()
        {
            CreateOutcome::Exists(e) => assert_eq!(e.payment_id, first.payment_id),
            other => panic!("{name}: expected Exists, got {other:?}"),
        }
        let realtime: Vec<_> = store
            .scan(Partition::Realtime, 100)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(realtime.len(), 3, "{name}: one record per created order");
    })
    .await;
}

/// Issue 15, point 3: creates of one orderId by many merchants at once (and
/// of many orders with one paymentKey) end with exactly one claimant and one
/// record; every other create is refused, writes nothing and leaves no
/// claim behind (its merchant's order is free for another orderId use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_merchants_on_one_order_id_leave_one_payment() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let merchants: Vec<MerchantId> = (0..8).map(|_| MerchantId::generate()).collect();
        for round in 0..6 {
            let order = format!("order-shared-{round:03}");
            let mut tasks = Vec::new();
            for (i, m) in merchants.iter().enumerate() {
                let store = store.clone();
                // Half share the order's key, half bring their own: both
                // refusals race.
                let key = if i % 2 == 0 {
                    format!("pk_{order}")
                } else {
                    format!("pk_{order}_{i}")
                };
                let r = pending_with_key(m, &order, &key);
                tasks.push(tokio::spawn(async move {
                    let outcome = store.create(&r).await.unwrap();
                    (r, outcome)
                }));
            }
            let mut created = Vec::new();
            for t in tasks {
                let (r, outcome) = t.await.unwrap();
                match outcome {
                    CreateOutcome::Created => created.push(r),
                    CreateOutcome::OrderIdInUse | CreateOutcome::PaymentKeyReused => {
                        assert!(store.get(&r.payment_id).await.unwrap().is_none(), "{name}");
                    }
                    other => panic!("{name}: {order}: {other:?}"),
                }
            }
            assert_eq!(
                created.len(),
                1,
                "{name}: {order} created {}",
                created.len()
            );
            let winner = &created[0];
            for m in &merchants {
                let got = store
                    .get_by_order(m, &OrderId::parse(&order).unwrap())
                    .await
                    .unwrap()
                    .map(|r| r.payment_id);
                if *m == winner.merchant_id {
                    assert_eq!(got, Some(winner.payment_id.clone()), "{name}");
                } else {
                    assert_eq!(got, None, "{name}: a loser holds {order}");
                    // A loser's create with a fresh orderId and key is free.
                    let fresh =
                        pending_with_key(m, &format!("{order}-{m}"), &format!("pk_{m}_{round}"));
                    assert_eq!(
                        store.create(&fresh).await.unwrap(),
                        CreateOutcome::Created,
                        "{name}"
                    );
                }
            }
        }
    })
    .await;
}

// ---- cancels (issue 15, point 11) ----

fn cancel_draft(
    r: &PaymentRecord,
    amount: Option<i64>,
    key: Option<&str>,
) -> paygate_state_store::CancelDraft {
    paygate_state_store::CancelDraft {
        payment_id: r.payment_id.clone(),
        merchant_id: r.merchant_id.clone(),
        total_amount: r.amount,
        amount,
        reason: "customer asked".into(),
        idempotency_key: key.map(str::to_owned),
        request_fingerprint: format!("fp-{amount:?}"),
        now: paygate_core::time::now_ms(),
    }
}

fn claimed(c: paygate_state_store::CancelClaim) -> paygate_state_store::CancelRecord {
    match c {
        paygate_state_store::CancelClaim::Claimed(c) => c,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

fn done() -> paygate_state_store::CancelTransition {
    paygate_state_store::CancelTransition::MarkDone {
        canceled_at: "2026-11-21T12:05:00+09:00".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_are_claimed_against_the_balance_and_replayed_by_key() {
    use paygate_state_store::{CancelClaim, CancelStatus, CancelTransition};
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let r = pending(&m, "order-cancel", None);
        store.create(&r).await.unwrap();
        let id = &r.payment_id;

        let first = claimed(
            store
                .claim_cancel(&cancel_draft(&r, Some(6_000), Some("k1")))
                .await
                .unwrap(),
        );
        assert_eq!(
            (first.n, first.amount, first.status),
            (1, 6_000, CancelStatus::Pending),
            "{name}"
        );
        assert_eq!(first.idempotency_key_downstream(), format!("{id}:cancel:1"));
        // One in flight: another cancel waits, the same key finds the first.
        assert!(
            matches!(
                store.claim_cancel(&cancel_draft(&r, Some(1), None)).await.unwrap(),
                CancelClaim::InProgress(c) if c.n == 1
            ),
            "{name}"
        );
        assert!(
            matches!(
                store.claim_cancel(&cancel_draft(&r, Some(1), Some("k1"))).await.unwrap(),
                CancelClaim::Existing(c) if c.n == 1
            ),
            "{name}"
        );
        assert!(store
            .cancel_transition(
                id,
                1,
                &CancelTransition::MarkUnknown {
                    last_error: "lost".into()
                }
            )
            .await
            .unwrap());
        assert!(store.cancel_transition(id, 1, &done()).await.unwrap());
        // 4,000 left: more is refused and claims nothing.
        assert_eq!(
            store
                .claim_cancel(&cancel_draft(&r, Some(4_001), None))
                .await
                .unwrap(),
            CancelClaim::ExceedsBalance { balance: 4_000 },
            "{name}"
        );
        let second = claimed(
            store
                .claim_cancel(&cancel_draft(&r, None, Some("k2")))
                .await
                .unwrap(),
        );
        assert_eq!((second.n, second.amount), (2, 4_000), "{name}");
        // No call was made: the amount and the key are given back.
        assert!(store
            .cancel_transition(
                id,
                2,
                &CancelTransition::MarkFailed {
                    failure_code: "NOT_SENT".into(),
                    last_error: "no log row".into(),
                    release_key: true,
                    seen_version: None,
                }
            )
            .await
            .unwrap());
        let third = claimed(
            store
                .claim_cancel(&cancel_draft(&r, None, Some("k2")))
                .await
                .unwrap(),
        );
        assert_eq!((third.n, third.amount), (3, 4_000), "{name}");
        assert!(store.cancel_transition(id, 3, &done()).await.unwrap());
        assert_eq!(
            store
                .claim_cancel(&cancel_draft(&r, None, None))
                .await
                .unwrap(),
            CancelClaim::ExceedsBalance { balance: 0 },
            "{name}"
        );
        let all = store.cancels_of(id).await.unwrap();
        let summary: Vec<_> = all
            .iter()
            .map(|c| (c.n, c.amount, c.status, c.idempotency_key.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, 6_000, CancelStatus::Done, Some("k1".to_owned())),
                (2, 4_000, CancelStatus::Failed, None),
                (3, 4_000, CancelStatus::Done, Some("k2".to_owned())),
            ],
            "{name}"
        );
        assert_eq!(
            all[0].canceled_at.as_deref(),
            Some("2026-11-21T12:05:00+09:00")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cancel_transition_applies_only_under_its_guard() {
    use paygate_state_store::{CancelStatus, CancelTransition as T};
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let r = pending(&m, "order-cguard", None);
        store.create(&r).await.unwrap();
        let id = &r.payment_id;
        let err = || "e".to_owned();
        claimed(
            store
                .claim_cancel(&cancel_draft(&r, Some(100), None))
                .await
                .unwrap(),
        );
        // Not done: no reversal bookkeeping applies.
        for t in [
            T::MarkSaved,
            T::SaveFailed { last_error: err() },
            T::BatchSaveFailed { last_error: err() },
        ] {
            assert!(
                !store.cancel_transition(id, 1, &t).await.unwrap(),
                "{name}: {t:?}"
            );
        }
        // No such cancel.
        assert!(
            !store.cancel_transition(id, 9, &done()).await.unwrap(),
            "{name}"
        );
        assert!(store
            .cancel_transition(id, 1, &T::LookupFailed { last_error: err() })
            .await
            .unwrap());
        // UNKNOWN is not PENDING.
        assert!(!store
            .cancel_transition(id, 1, &T::MarkUnknown { last_error: err() })
            .await
            .unwrap());
        assert!(store.cancel_transition(id, 1, &done()).await.unwrap());
        // Final: neither done again nor failed.
        assert!(
            !store.cancel_transition(id, 1, &done()).await.unwrap(),
            "{name}"
        );
        assert!(!store
            .cancel_transition(
                id,
                1,
                &T::MarkFailed {
                    failure_code: "X".into(),
                    last_error: err(),
                    release_key: false,
                    seen_version: None,
                }
            )
            .await
            .unwrap());
        assert!(!store
            .cancel_transition(id, 1, &T::LookupFailed { last_error: err() })
            .await
            .unwrap());
        assert!(store
            .cancel_transition(id, 1, &T::SaveFailed { last_error: err() })
            .await
            .unwrap());
        assert!(store
            .cancel_transition(id, 1, &T::BatchSaveFailed { last_error: err() })
            .await
            .unwrap());
        assert!(store.cancel_transition(id, 1, &T::MarkSaved).await.unwrap());
        assert!(
            !store.cancel_transition(id, 1, &T::MarkSaved).await.unwrap(),
            "{name}"
        );
        let c = store.cancels_of(id).await.unwrap().remove(0);
        assert_eq!(
            (
                c.status,
                c.is_saved,
                c.save_attempts,
                c.batch_attempts,
                c.last_error
            ),
            (CancelStatus::Done, true, 2, 2, None),
            "{name}"
        );
        // A failed cancel stays failed.
        claimed(
            store
                .claim_cancel(&cancel_draft(&r, Some(100), None))
                .await
                .unwrap(),
        );
        assert!(store
            .cancel_transition(
                id,
                2,
                &T::MarkFailed {
                    failure_code: "X".into(),
                    last_error: err(),
                    release_key: false,
                    seen_version: None,
                }
            )
            .await
            .unwrap());
        assert!(
            !store.cancel_transition(id, 2, &done()).await.unwrap(),
            "{name}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_cancels_never_reserve_more_than_the_amount() {
    use paygate_state_store::CancelClaim;
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let r = pending(&m, "order-crace", None);
        store.create(&r).await.unwrap();
        // Rounds of 16 racing claims of 3,000 each on 10,000: exactly one
        // wins a round while a cancel is in flight; three rounds fit.
        let mut won = 0;
        for _round in 0..5 {
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let (store, d) = (store.clone(), cancel_draft(&r, Some(3_000), None));
                    tokio::spawn(async move { store.claim_cancel(&d).await.unwrap() })
                })
                .collect();
            let mut claims = Vec::new();
            for t in tasks {
                if let CancelClaim::Claimed(c) = t.await.unwrap() {
                    claims.push(c);
                }
            }
            assert!(
                claims.len() <= 1,
                "{name}: {} claims in one round",
                claims.len()
            );
            for c in claims {
                won += 1;
                assert!(store
                    .cancel_transition(&r.payment_id, c.n, &done())
                    .await
                    .unwrap());
            }
        }
        let total: i64 = store
            .cancels_of(&r.payment_id)
            .await
            .unwrap()
            .iter()
            .map(|c| c.amount)
            .sum();
        assert_eq!((won, total), (3, 9_000), "{name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_cancels_are_the_ones_in_flight_or_not_yet_reversed() {
    use paygate_state_store::CancelTransition as T;
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let mut expected = Vec::new();
        for i in 0..4 {
            let r = pending(&m, &format!("order-open-{i}"), None);
            store.create(&r).await.unwrap();
            claimed(
                store
                    .claim_cancel(&cancel_draft(&r, Some(10), None))
                    .await
                    .unwrap(),
            );
            let id = &r.payment_id;
            match i {
                0 => expected.push(r.payment_id.clone()), // pending
                1 => {
                    assert!(store.cancel_transition(id, 1, &done()).await.unwrap());
                    expected.push(r.payment_id.clone()); // done, not reversed
                }
                2 => {
                    assert!(store.cancel_transition(id, 1, &done()).await.unwrap());
                    assert!(store.cancel_transition(id, 1, &T::MarkSaved).await.unwrap());
                }
                _ => assert!(store
                    .cancel_transition(
                        id,
                        1,
                        &T::MarkFailed {
                            failure_code: "X".into(),
                            last_error: "e".into(),
                            release_key: false,
                            seen_version: None,
                        }
                    )
                    .await
                    .unwrap()),
            }
        }
        expected.sort();
        let open: Vec<_> = store
            .scan_open_cancels(1)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.payment_id)
            .collect();
        assert_eq!(open, expected, "{name}");
    })
    .await;
}

/// Every applied change of a record moves its version on by one (moves
/// included); a refused one leaves it: the value every guard that depends
/// on an earlier read compares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_applied_change_moves_the_version_on() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let r = pending(&m, "order-version-1", None);
        store.create(&r).await.unwrap();
        let id = &r.payment_id;
        let version = |store: Arc<dyn StateStore>| {
            let id = id.clone();
            async move { store.get(&id).await.unwrap().unwrap() }
        };
        assert_eq!(version(store.clone()).await.1.version, 0, "{name}");
        assert!(!store.transition(id, &Transition::MarkSaved).await.unwrap());
        assert_eq!(
            version(store.clone()).await.1.version,
            0,
            "{name}: a refused transition moved the version"
        );
        for (n, t) in [
            Transition::MarkSending { seen_version: 0 },
            paid(),
            Transition::MarkSaved,
        ]
        .iter()
        .enumerate()
        {
            assert!(store.transition(id, t).await.unwrap(), "{name}: {t:?}");
            assert_eq!(
                version(store.clone()).await.1.version,
                n as i64 + 1,
                "{name}: {t:?}"
            );
        }
        assert!(store
            .move_record(id, Partition::Realtime, Partition::Completed)
            .await
            .unwrap());
        let (part, moved) = version(store.clone()).await;
        assert_eq!(
            (part, moved.version),
            (Partition::Completed, 4),
            "{name}: a move is a change"
        );
    })
    .await;
}

/// A mover (the batch) copied a no-call abort to `unpaid_payments` and
/// stalled; meanwhile a merchant's retry moved the record back to
/// realtime. When the mover resumes, its delete of the source is guarded
/// on the version it copied, so it cannot delete the fresh copy and lose
/// the record from every partition (MongoDB without transactions moves in
/// exactly these two steps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_move_cannot_delete_a_copy_moved_back_since() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let r = pending(&m, "order-stalled-move", None);
        store.create(&r).await.unwrap();
        let id = &r.payment_id;
        let no_call = Transition::MarkAborted {
            failure_code: failure_codes::LOG_UNAVAILABLE.into(),
            last_error: "log".into(),
            seen_version: None,
        };
        assert!(store.transition(id, &no_call).await.unwrap());
        let (_, copied) = store.get(id).await.unwrap().unwrap();
        // The mover's first step, then it stalls.
        assert!(store
            .copy_to_partition(id, Partition::Realtime, Partition::Unpaid)
            .await
            .unwrap());
        // The retry reads the newest copy (the mover's) and moves it back.
        let (part, newest) = store.get(id).await.unwrap().unwrap();
        assert_eq!(
            (part, newest.version),
            (Partition::Unpaid, copied.version + 1),
            "{name}"
        );
        assert!(store
            .move_record(id, Partition::Unpaid, Partition::Realtime)
            .await
            .unwrap());
        // The mover resumes with the version it copied.
        assert!(
            !store
                .finish_move(id, Partition::Realtime, Partition::Unpaid, copied.version)
                .await
                .unwrap(),
            "{name}: a stalled move completed over a record moved back since"
        );
        let (part, now) = store
            .get(id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: the record was lost from every partition"));
        assert_eq!(
            (part, now.card_status, now.version),
            (Partition::Realtime, CardStatus::Aborted, copied.version + 2),
            "{name}"
        );
        // A move that nothing raced completes.
        assert!(store
            .copy_to_partition(id, Partition::Realtime, Partition::Unpaid)
            .await
            .unwrap());
        assert!(store
            .finish_move(id, Partition::Realtime, Partition::Unpaid, now.version)
            .await
            .unwrap());
        let (part, _) = store.get(id).await.unwrap().unwrap();
        assert_eq!(part, Partition::Unpaid, "{name}");
    })
    .await;
}

/// This thread's clock for [`guards_hold_when_a_writers_clock_steps_back`]:
/// set by the test; ids from a SplitMix64 sequence.
struct SteppedClock {
    now: std::sync::atomic::AtomicI64,
    ids: std::sync::atomic::AtomicU64,
}

impl paygate_core::ambient::Ambient for SteppedClock {
    fn now_ms(&self) -> i64 {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn next_u64(&self) -> u64 {
        let mut z = self
            .ids
            .fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::SeqCst);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Replicas' clocks differ and step back, so two writes can stamp one
/// `updated_at`: a batch reads a PENDING record, a writer whose clock is
/// 5 s behind aborts it as a no-call, and a retry at the first clock
/// reopens it, leaving it PENDING with the very `updated_at` the batch
/// read. Filing it as never sent on that read must fail: the guard is
/// the version, which both writes moved on.
#[tokio::test]
async fn guards_hold_when_a_writers_clock_steps_back() {
    let start = paygate_core::time::now_ms();
    let clock = std::rc::Rc::new(SteppedClock {
        now: std::sync::atomic::AtomicI64::new(start),
        ids: std::sync::atomic::AtomicU64::new(start as u64),
    });
    let _installed = paygate_core::ambient::install(clock.clone());
    let set = |ms: i64| clock.now.store(ms, std::sync::atomic::Ordering::SeqCst);
    for backend in state_backends() {
        let name = backend.name();
        set(start);
        let (store, cleanup) = fresh_state_store(&backend).await;
        let m = MerchantId::generate();
        let r = pending(&m, "order-clock-back", None);
        store.create(&r).await.unwrap();
        let id = &r.payment_id;
        let (_, read) = store.get(id).await.unwrap().unwrap();
        set(read.updated_at - 5_000);
        let no_call = Transition::MarkAborted {
            failure_code: failure_codes::LOG_UNAVAILABLE.into(),
            last_error: "log".into(),
            seen_version: None,
        };
        assert!(store.transition(id, &no_call).await.unwrap(), "{name}");
        set(read.updated_at);
        let reopen = Transition::Reopen {
            failure_code: failure_codes::LOG_UNAVAILABLE.into(),
            seen_version: None,
        };
        assert!(store.transition(id, &reopen).await.unwrap(), "{name}");
        let (_, now) = store.get(id).await.unwrap().unwrap();
        assert_eq!(
            (now.card_status, now.updated_at),
            (CardStatus::Pending, read.updated_at),
            "{name}: the clocks gave the record its old updated_at back"
        );
        let file = Transition::FileNotSent {
            seen_version: read.version,
            last_error: "no REQUEST row".into(),
        };
        assert!(
            !store.transition(id, &file).await.unwrap(),
            "{name}: filed as never sent on a read two writes old"
        );
        cleanup.run().await;
    }
}

/// Every applied transition that leaves an event has exactly one, written
/// with it; a transition that did not apply (or leaves none) has none; a
/// cancel's event follows the approval it cancels and says what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_written_with_its_transition_and_only_then() {
    use paygate_state_store::{EventType, Transition};
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let r = pending(&m, "order-events", None);
        store.create(&r).await.unwrap();
        let id = &r.payment_id;
        assert!(store.events_of(id).await.unwrap().is_empty(), "{name}");

        let unknown = Transition::MarkUnknown {
            last_error: "timeout".into(),
        };
        assert!(store.transition(id, &unknown).await.unwrap(), "{name}");
        // Not applied (already UNKNOWN): no second event.
        assert!(!store.transition(id, &unknown).await.unwrap(), "{name}");
        // Applied but tells a merchant nothing: no event.
        let checked = Transition::CheckedUnknown {
            last_error: "lookup 404".into(),
            seen_version: 1,
        };
        assert!(store.transition(id, &checked).await.unwrap(), "{name}");
        assert!(store.transition(id, &paid()).await.unwrap(), "{name}");
        assert!(!store.transition(id, &paid()).await.unwrap(), "{name}");
        let declined = Transition::MarkAborted {
            failure_code: "REJECT_CARD_COMPANY".into(),
            last_error: "late".into(),
            seen_version: None,
        };
        assert!(!store.transition(id, &declined).await.unwrap(), "{name}");
        assert!(
            store.transition(id, &Transition::MarkSaved).await.unwrap(),
            "{name}"
        );

        let c1 = claimed(
            store
                .claim_cancel(&cancel_draft(&r, Some(4_000), None))
                .await
                .unwrap(),
        );
        assert!(
            store.cancel_transition(id, c1.n, &done()).await.unwrap(),
            "{name}"
        );
        assert!(
            !store.cancel_transition(id, c1.n, &done()).await.unwrap(),
            "{name}"
        );
        let c2 = claimed(
            store
                .claim_cancel(&cancel_draft(&r, None, None))
                .await
                .unwrap(),
        );
        assert!(
            store.cancel_transition(id, c2.n, &done()).await.unwrap(),
            "{name}"
        );

        let events = store.events_of(id).await.unwrap();
        let kinds: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
        assert_eq!(
            kinds,
            [
                EventType::Unknown,
                EventType::Approved,
                EventType::PartiallyCanceled,
                EventType::Canceled
            ],
            "{name}"
        );
        let versions: Vec<(i64, i64)> = events.iter().map(|e| (e.version, e.cancel_n)).collect();
        assert_eq!(versions, [(1, 0), (3, 0), (4, 1), (4, 2)], "{name}");
        let approval: serde_json::Value = serde_json::from_str(&events[1].payload).unwrap();
        assert_eq!(approval["status"], "DONE", "{name}");
        assert_eq!(
            approval["approvedAt"], "2026-11-21T12:00:00+09:00",
            "{name}"
        );
        let partial: serde_json::Value = serde_json::from_str(&events[2].payload).unwrap();
        assert_eq!(partial["balanceAmount"], 6_000, "{name}");
        assert_eq!(partial["cancel"]["cancelAmount"], 4_000, "{name}");
        let ids: std::collections::BTreeSet<&str> =
            events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids.len(), 4, "{name}: event ids are distinct");
        assert!(events.iter().all(|e| e.merchant_id == m), "{name}");
    })
    .await;
}
