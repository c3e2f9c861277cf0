//! The inventory conformance suite (I7, issue 17): one set of tests on every
//! reachable backend (memory and SQLite always; PostgreSQL with
//! `PAYGATE_TEST_POSTGRES_URL`; MongoDB with `PAYGATE_TEST_MONGODB_URI` /
//! `PAYGATE_TEST_MONGODB_RS_URI`). Time is passed to the store, so expiry
//! is tested at chosen instants with no sleep and no batch.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::sync::Arc;

use paygate_core::{MerchantId, OrderId};
use paygate_state_store::{
    testing::{fresh_inventory_store, state_backends, Backend},
    BeginOutcome, Hold, HoldItem, HoldState, InventoryStore, SellOutcome, SetStock, TakeOutcome,
};

/// A fixed instant in the past (2023-11-14): stores judge a hold's expiry
/// by the earlier of the caller's clock and their own, so the tests' own
/// instants must not run ahead of the machine's.
const T0: i64 = 1_700_000_000_000;
const TTL: i64 = 600_000;

async fn on_every_backend<F, Fut>(test: F)
where
    F: Fn(Backend, Arc<dyn InventoryStore>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for backend in state_backends() {
        let (store, cleanup) = fresh_inventory_store(&backend).await;
        test(backend, store).await;
        cleanup.run().await;
    }
}

fn hold(m: &MerchantId, order: &str, items: &[(&str, i64)], now: i64) -> Hold {
    Hold::new_pre(
        m.clone(),
        OrderId::parse(order).unwrap(),
        items
            .iter()
            .map(|(sku, quantity)| HoldItem {
                sku: (*sku).to_owned(),
                quantity: *quantity,
            })
            .collect(),
        now + TTL,
        format!("fp-{order}"),
        now,
    )
}

fn order(s: &str) -> OrderId {
    OrderId::parse(s).unwrap()
}

async fn available(store: &Arc<dyn InventoryStore>, m: &MerchantId, sku: &str, now: i64) -> i64 {
    store.level(m, sku, now).await.unwrap().unwrap().available
}

/// Acceptance 1: 1,000 concurrent holds for 10 units grant exactly 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_holds_for_ten_units_grant_exactly_ten() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        store.set_stock(&m, "sku-flash", 10, T0).await.unwrap();
        let tasks: Vec<_> = (0..1_000)
            .map(|i| {
                let (store, m) = (store.clone(), m.clone());
                tokio::spawn(async move {
                    let h = hold(&m, &format!("order-{i:05}"), &[("sku-flash", 1)], T0);
                    store.take(&h, T0).await.unwrap()
                })
            })
            .collect();
        let mut granted = 0;
        for t in tasks {
            match t.await.unwrap() {
                TakeOutcome::Taken(_) => granted += 1,
                TakeOutcome::OutOfStock(short) => assert_eq!(short, vec!["sku-flash"]),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(granted, 10, "{name}: granted");
        let level = store.level(&m, "sku-flash", T0).await.unwrap().unwrap();
        assert_eq!((level.held, level.available), (10, 0), "{name}");
    })
    .await;
}

/// Multi-SKU holds taken concurrently in opposite orders neither deadlock
/// nor oversell any SKU; a short SKU is named and nothing is held for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_sku_holds_are_all_or_nothing() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        store.set_stock(&m, "sku-a", 5, T0).await.unwrap();
        store.set_stock(&m, "sku-b", 3, T0).await.unwrap();
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let (store, m) = (store.clone(), m.clone());
                tokio::spawn(async move {
                    let items: &[(&str, i64)] = if i % 2 == 0 {
                        &[("sku-a", 1), ("sku-b", 1)]
                    } else {
                        &[("sku-b", 1), ("sku-a", 1)]
                    };
                    store
                        .take(&hold(&m, &format!("order-m{i:03}"), items, T0), T0)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut granted = 0;
        for t in tasks {
            if let TakeOutcome::Taken(_) = t.await.unwrap() {
                granted += 1;
            }
        }
        assert_eq!(granted, 3, "{name}");
        assert_eq!(available(&store, &m, "sku-a", T0).await, 2, "{name}");
        assert_eq!(available(&store, &m, "sku-b", T0).await, 0, "{name}");
        // Only b is short; a is not held by the refused take.
        match store
            .take(
                &hold(&m, "order-short", &[("sku-a", 2), ("sku-b", 1)], T0),
                T0,
            )
            .await
            .unwrap()
        {
            TakeOutcome::OutOfStock(short) => assert_eq!(short, vec!["sku-b"], "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(available(&store, &m, "sku-a", T0).await, 2, "{name}");
        // A SKU never stocked is short too.
        assert!(matches!(
            store.take(&hold(&m, "order-nosku", &[("sku-none", 1)], T0), T0).await.unwrap(),
            TakeOutcome::OutOfStock(s) if s == vec!["sku-none"]
        ));
    })
    .await;
}

/// Acceptance 2: an expired hold frees its stock at once (no batch); a
/// `during` hold does not expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_frees_stock_at_once_and_during_never_expires() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        store.set_stock(&m, "sku-x", 2, T0).await.unwrap();
        let a = hold(&m, "order-a0001", &[("sku-x", 1)], T0);
        let b = hold(&m, "order-b0001", &[("sku-x", 1)], T0);
        assert!(matches!(
            store.take(&a, T0).await.unwrap(),
            TakeOutcome::Taken(_)
        ));
        assert!(matches!(
            store.take(&b, T0).await.unwrap(),
            TakeOutcome::Taken(_)
        ));
        assert_eq!(available(&store, &m, "sku-x", T0).await, 0, "{name}");
        // b's confirm goes to the card company.
        assert!(matches!(
            store.begin_payment(&m, &b.order_id, T0 + 1).await.unwrap(),
            BeginOutcome::During(h) if h.state == HoldState::During
        ));
        // One ms before expiry both still count; at expiry only `during` does.
        assert_eq!(
            available(&store, &m, "sku-x", T0 + TTL - 1).await,
            0,
            "{name}"
        );
        let at = T0 + TTL;
        assert_eq!(
            available(&store, &m, "sku-x", at).await,
            1,
            "{name}: a expired"
        );
        assert_eq!(
            available(&store, &m, "sku-x", at + 100 * TTL).await,
            1,
            "{name}: during does not expire"
        );
        let got = store.hold(&m, &a.hold_id).await.unwrap().unwrap();
        assert_eq!(got.shown_state(at), "expired");
        // The freed unit can be taken at once.
        let c = hold(&m, "order-c0001", &[("sku-x", 1)], at);
        assert!(
            matches!(store.take(&c, at).await.unwrap(), TakeOutcome::Taken(_)),
            "{name}"
        );
        // a's buyer comes back: the unit is gone, the confirm is refused.
        match store.begin_payment(&m, &a.order_id, at + 1).await.unwrap() {
            BeginOutcome::Expired { hold, short } => {
                assert_eq!(short, vec!["sku-x"], "{name}");
                assert_eq!(hold.state, HoldState::Released, "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        // c expires, a's buyer retries: taken again.
        let later = at + TTL + 1;
        assert!(
            matches!(
                store.begin_payment(&m, &a.order_id, later).await.unwrap(),
                BeginOutcome::During(_)
            ),
            "{name}"
        );
        assert_eq!(available(&store, &m, "sku-x", later).await, 0, "{name}");
    })
    .await;
}

/// Acceptance 3: decline and no-call abort release; approval sells, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sale_and_release_are_guarded_transitions() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        store.set_stock(&m, "sku-s", 3, T0).await.unwrap();
        let h = hold(&m, "order-s0001", &[("sku-s", 2)], T0);
        assert!(matches!(
            store.take(&h, T0).await.unwrap(),
            TakeOutcome::Taken(_)
        ));
        // Replay: the same hold, nothing more held.
        match store
            .take(&hold(&m, "order-s0001", &[("sku-s", 2)], T0), T0)
            .await
            .unwrap()
        {
            TakeOutcome::Exists(e) => assert_eq!(e.hold_id, h.hold_id, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(available(&store, &m, "sku-s", T0).await, 1);
        assert!(matches!(
            store.begin_payment(&m, &h.order_id, T0).await.unwrap(),
            BeginOutcome::During(_)
        ));
        // DELETE cannot release a hold whose card call is in flight.
        let kept = store
            .release(&m, &h.order_id, &[HoldState::Pre], T0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kept.state, HoldState::During, "{name}");
        // Approval: sold, once, even when replayed concurrently.
        let sells: Vec<_> = (0..8)
            .map(|_| {
                let (store, m) = (store.clone(), m.clone());
                tokio::spawn(
                    async move { store.sell(&m, &order("order-s0001"), T0 + 5).await.unwrap() },
                )
            })
            .collect();
        let mut sold = 0;
        for s in sells {
            match s.await.unwrap() {
                SellOutcome::Sold { oversold, .. } => {
                    assert!(oversold.is_empty(), "{name}");
                    sold += 1;
                }
                SellOutcome::AlreadySold => {}
                SellOutcome::NoHold => panic!("{name}: no hold"),
            }
        }
        assert_eq!(sold, 1, "{name}: sold once");
        let level = store.level(&m, "sku-s", T0 + 5).await.unwrap().unwrap();
        assert_eq!(
            (level.stock, level.sold, level.held, level.available),
            (3, 2, 0, 1),
            "{name}"
        );
        // A sold hold is never released nor begun again.
        let after = store
            .release(&m, &h.order_id, &[HoldState::Pre, HoldState::During], T0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after.state, HoldState::Sold);
        assert!(matches!(
            store.begin_payment(&m, &h.order_id, T0).await.unwrap(),
            BeginOutcome::Sold(_)
        ));

        // Decline / no-call abort: released from during; stock back.
        let d = hold(&m, "order-d0001", &[("sku-s", 1)], T0);
        assert!(matches!(
            store.take(&d, T0).await.unwrap(),
            TakeOutcome::Taken(_)
        ));
        store.begin_payment(&m, &d.order_id, T0).await.unwrap();
        assert_eq!(available(&store, &m, "sku-s", T0).await, 0);
        let r = store
            .release(&m, &d.order_id, &[HoldState::Pre, HoldState::During], T0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.state, HoldState::Released, "{name}");
        assert_eq!(available(&store, &m, "sku-s", T0).await, 1, "{name}");
        // No hold for an order: begin and sell say so.
        assert_eq!(
            store
                .begin_payment(&m, &order("order-none1"), T0)
                .await
                .unwrap(),
            BeginOutcome::NoHold
        );
        assert_eq!(
            store.sell(&m, &order("order-none1"), T0).await.unwrap(),
            SellOutcome::NoHold
        );
        // Stock cannot go below sold + held.
        assert!(
            matches!(
                store.set_stock(&m, "sku-s", 1, T0).await.unwrap(),
                SetStock::BelowCommitted(_)
            ),
            "{name}"
        );
        assert!(
            matches!(
                store.set_stock(&m, "sku-s", 2, T0).await.unwrap(),
                SetStock::Set(_)
            ),
            "{name}"
        );
    })
    .await;
}

/// An approval recovered after its hold expired and its unit was sold to
/// someone else still sells (it is a charge) and reports the oversell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_approval_sells_an_expired_hold_and_reports_oversell() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        store.set_stock(&m, "sku-late", 1, T0).await.unwrap();
        let a = hold(&m, "order-late1", &[("sku-late", 1)], T0);
        store.take(&a, T0).await.unwrap();
        let at = T0 + TTL;
        let b = hold(&m, "order-late2", &[("sku-late", 1)], at);
        assert!(matches!(
            store.take(&b, at).await.unwrap(),
            TakeOutcome::Taken(_)
        ));
        match store.sell(&m, &a.order_id, at + 1).await.unwrap() {
            SellOutcome::Sold { oversold, .. } => assert_eq!(oversold, vec!["sku-late"], "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(
            available(&store, &m, "sku-late", at + 1).await,
            -1,
            "{name}"
        );
        assert_eq!(
            store.sell(&m, &a.order_id, at + 2).await.unwrap(),
            SellOutcome::AlreadySold
        );
        // Housekeeping deletes old released/expired holds only.
        store
            .release(&m, &b.order_id, &[HoldState::Pre], at + 3)
            .await
            .unwrap();
        assert_eq!(store.purge(at + 10).await.unwrap(), 1, "{name}");
        assert!(store.hold(&m, &b.hold_id).await.unwrap().is_none());
        assert!(store.hold(&m, &a.hold_id).await.unwrap().is_some());
        // Another merchant never sees it.
        assert!(store
            .hold(&MerchantId::generate(), &a.hold_id)
            .await
            .unwrap()
            .is_none());
    })
    .await;
}

/// A hold left `during` by a confirm that died is listed for the batch and
/// released by it, unless a confirm began on it after the batch read it
/// (the fence: `begin_payment` moves a `during` hold's `updated_at`
/// strictly forward, even within the same millisecond).
#[tokio::test]
async fn a_stuck_during_hold_is_released_only_if_no_confirm_began_on_it_since() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        store.set_stock(&m, "sku-d", 2, T0).await.unwrap();
        for o in ["order-d0001", "order-d0002"] {
            let h = hold(&m, o, &[("sku-d", 1)], T0);
            assert!(
                matches!(store.take(&h, T0).await.unwrap(), TakeOutcome::Taken(_)),
                "{name}"
            );
            assert!(
                matches!(
                    store.begin_payment(&m, &order(o), T0).await.unwrap(),
                    BeginOutcome::During(_)
                ),
                "{name}"
            );
        }
        // Too young for the cutoff: not listed.
        assert!(
            store
                .stuck_during(T0 - 1, None, 10)
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );
        let stuck = store.stuck_during(T0, None, 10).await.unwrap();
        assert_eq!(stuck.len(), 2, "{name}");
        assert!(
            stuck
                .iter()
                .all(|h| h.state == HoldState::During && h.items.len() == 1),
            "{name}"
        );
        // Paged by hold id.
        let first = store.stuck_during(T0, None, 1).await.unwrap();
        let second = store
            .stuck_during(T0, Some(&first[0].hold_id), 1)
            .await
            .unwrap();
        assert_eq!(second.len(), 1, "{name}");
        assert_ne!(first[0].hold_id, second[0].hold_id, "{name}");

        let (a, b) = (&stuck[0], &stuck[1]);
        // A retry's confirm begins on `b` in the same millisecond the batch
        // read it: the batch's release of what it read must fail.
        assert!(
            matches!(
                store.begin_payment(&m, &b.order_id, T0).await.unwrap(),
                BeginOutcome::During(_)
            ),
            "{name}"
        );
        assert!(
            !store.release_stuck(b, T0 + 1).await.unwrap(),
            "{name}: released a hold a confirm just began on"
        );
        assert_eq!(
            store
                .hold_by_order(&m, &b.order_id)
                .await
                .unwrap()
                .unwrap()
                .state,
            HoldState::During,
            "{name}"
        );
        // `a` is untouched: released, its unit available again, once.
        assert_eq!(available(&store, &m, "sku-d", T0 + 1).await, 0, "{name}");
        assert!(store.release_stuck(a, T0 + 1).await.unwrap(), "{name}");
        assert!(
            !store.release_stuck(a, T0 + 2).await.unwrap(),
            "{name}: released twice"
        );
        assert_eq!(available(&store, &m, "sku-d", T0 + 2).await, 1, "{name}");
        assert_eq!(
            store
                .hold_by_order(&m, &a.order_id)
                .await
                .unwrap()
                .unwrap()
                .state,
            HoldState::Released,
            "{name}"
        );
        assert_eq!(
            store.stuck_during(T0 + 10, None, 10).await.unwrap().len(),
            1,
            "{name}"
        );
    })
    .await;
}

/// A release of a hold read `during` is guarded on the hold's version, not
/// on `updated_at`: the batch reads the hold, a writer whose clock is
/// behind releases it, and a retry begins on it again at the first clock,
/// so it is `during` with the very `updated_at` the batch read. The
/// batch's release must not take the retry's units; a confirm's begin
/// hands back the version it left, the only one it may release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_guarded_on_the_version_read_whatever_the_clocks() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        store.set_stock(&m, "sku-v", 1, T0).await.unwrap();
        let h = hold(&m, "order-version-hold", &[("sku-v", 1)], T0);
        store.take(&h, T0).await.unwrap();
        let BeginOutcome::During(seen) = store
            .begin_payment(&m, &order("order-version-hold"), T0 + 10)
            .await
            .unwrap()
        else {
            panic!("{name}: the hold did not move to during");
        };
        let read = store
            .hold_by_order(&m, &order("order-version-hold"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (read.state, read.version),
            (HoldState::During, seen.version),
            "{name}: begin hands back the version it left"
        );
        store
            .release(
                &m,
                &order("order-version-hold"),
                &[HoldState::During],
                T0 + 5,
            )
            .await
            .unwrap();
        let BeginOutcome::During(again) = store
            .begin_payment(&m, &order("order-version-hold"), T0 + 10)
            .await
            .unwrap()
        else {
            panic!("{name}: the retry could not take the hold again");
        };
        assert_eq!(
            (again.updated_at, again.state),
            (read.updated_at, HoldState::During),
            "{name}: the clocks gave the hold its old updated_at back"
        );
        assert!(again.version > read.version, "{name}");
        assert!(
            !store.release_stuck(&read, T0 + 11).await.unwrap(),
            "{name}: a release on a read two changes old took the retry's units"
        );
        assert_eq!(available(&store, &m, "sku-v", T0 + 11).await, 0, "{name}");
        assert!(
            store.release_stuck(&again, T0 + 12).await.unwrap(),
            "{name}"
        );
        assert_eq!(available(&store, &m, "sku-v", T0 + 12).await, 1, "{name}");
    })
    .await;
}

/// A replica whose clock runs 15 s fast takes stock: it must not take a
/// unit from a hold that, by the database's clock, has 10 s to run. (Judged
/// by the caller's clock, it took it, and the holder's confirm then sold
/// the unit a second time, or was refused 409 `HOLD_EXPIRED` before its
/// `expiresAt`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_clock_does_not_expire_a_hold_early() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        let now = paygate_core::time::now_ms();
        store.set_stock(&m, "sku-clock", 1, now).await.unwrap();
        let mut held = hold(&m, "order-clock-held", &[("sku-clock", 1)], now);
        held.expires_at = now + 10_000;
        assert!(matches!(
            store.take(&held, now).await.unwrap(),
            TakeOutcome::Taken(_)
        ));
        let fast = now + 15_000;
        let other = hold(&m, "order-clock-fast", &[("sku-clock", 1)], fast);
        match store.take(&other, fast).await.unwrap() {
            TakeOutcome::OutOfStock(short) => assert_eq!(short, vec!["sku-clock"], "{name}"),
            got => panic!("{name}: a replica 15 s fast took a held unit: {got:?}"),
        }
        assert_eq!(available(&store, &m, "sku-clock", fast).await, 0, "{name}");
        // The holder's confirm begins on it in time.
        assert!(
            matches!(
                store
                    .begin_payment(&m, &order("order-clock-held"), now + 1)
                    .await
                    .unwrap(),
                BeginOutcome::During(_)
            ),
            "{name}"
        );
    })
    .await;
}

/// Confirms of one order racing at several replicas each begin on the hold
/// at a version of their own: a `begin_payment` that finds the hold moved to
/// `during` by another (it read `pre`, lost the move) fences it one version
/// on before it answers, so each confirm releases only the version it left
/// and a stalled one cannot free the units of the one that is sending.
#[tokio::test]
async fn racing_begins_each_leave_a_version_of_their_own() {
    on_every_backend(|backend, store| async move {
        let name = backend.name();
        let m = MerchantId::generate();
        store.set_stock(&m, "sku-r", 1, T0).await.unwrap();
        let h = hold(&m, "order-r0001", &[("sku-r", 1)], T0);
        assert!(
            matches!(store.take(&h, T0).await.unwrap(), TakeOutcome::Taken(_)),
            "{name}"
        );
        for round in 0..5 {
            let begins = (0..4).map(|_| {
                let store = store.clone();
                let m = m.clone();
                tokio::spawn(
                    async move { store.begin_payment(&m, &order("order-r0001"), T0).await },
                )
            });
            let mut versions = Vec::new();
            for b in futures_util::future::join_all(begins).await {
                match b.unwrap().unwrap() {
                    BeginOutcome::During(h) => versions.push(h.version),
                    other => panic!("{name}: a begin answered {other:?}"),
                }
            }
            let n = versions.len();
            versions.sort_unstable();
            versions.dedup();
            assert_eq!(
                versions.len(),
                n,
                "{name}, round {round}: two begins answered the same hold version"
            );
            // Back to `pre`-like competition: release the newest, so the
            // next round's begins read a released hold and race to move it.
            let current = store
                .hold_by_order(&m, &order("order-r0001"))
                .await
                .unwrap()
                .unwrap();
            assert!(
                store.release_stuck(&current, T0 + 1).await.unwrap(),
                "{name}"
            );
        }
    })
    .await;
}
