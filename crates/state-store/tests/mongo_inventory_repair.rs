//! MongoDB holds after a writer died between its two steps: without a
//! transaction, `begin_payment` writes its `during` lines into the SKU
//! documents and then moves the hold document, so a confirm that dies in
//! between leaves lines that hold units for a hold still `pre`. `during`
//! lines never expire; only [`InventoryStore::repair_lines`] (the batch
//! runs it) frees them. These tests write what the dead confirm left, line
//! by line, and check that the units come back and that a live `during`
//! hold keeps its own. (SQL and the in-memory store change a hold and its
//! lines in one step and have nothing to repair.)
//!
//! Needs `PAYGATE_TEST_MONGODB_URI` or `PAYGATE_TEST_MONGODB_RS_URI`;
//! without either it says SKIPPED and runs nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use mongodb::bson::{doc, Bson, Document};
use paygate_core::{MerchantId, OrderId};
use paygate_state_store::{
    testing::{mongodb_backends, Backend, Cleanup},
    BeginOutcome, Hold, HoldItem, InventoryStore, MongoInventoryStore, TakeOutcome,
};

/// A fixed instant in the past: the store judges expiry by the earlier of
/// the caller's clock and its own.
const T0: i64 = 1_700_000_000_000;
const TTL: i64 = 600_000;

fn hold(m: &MerchantId, order: &str, sku: &str, now: i64) -> Hold {
    Hold::new_pre(
        m.clone(),
        OrderId::parse(order).unwrap(),
        vec![HoldItem {
            sku: sku.to_owned(),
            quantity: 1,
        }],
        now + TTL,
        format!("fp-{order}"),
        now,
    )
}

/// A fresh database on `backend`'s server and the store over it.
async fn fresh(backend: &Backend) -> (mongodb::Database, MongoInventoryStore) {
    let uri = backend.mongodb_uri().unwrap();
    let client = mongodb::Client::with_uri_str(uri).await.unwrap();
    let db = client.database(&format!(
        "paygate_test_{}",
        ulid::Ulid::new().to_string().to_lowercase()
    ));
    let store = MongoInventoryStore::new(db.clone()).await.unwrap();
    (db, store)
}

async fn available(store: &MongoInventoryStore, m: &MerchantId, sku: &str, now: i64) -> i64 {
    store.level(m, sku, now).await.unwrap().unwrap().available
}

/// Rewrites `hold`'s line in the SKU document of `(m, sku)` to what
/// `begin_payment` writes before it moves the hold: state `during`, for
/// the hold version it read.
async fn leave_during_line(db: &mongodb::Database, m: &MerchantId, sku: &str, hold: &Hold) {
    let coll = db.collection::<Document>("inventory");
    let id = format!("{}|{sku}", m.as_str());
    let mut d = coll.find_one(doc! {"_id": &id}).await.unwrap().unwrap();
    let lines = d.get_array_mut("lines").unwrap();
    let mut found = false;
    for l in lines.iter_mut() {
        let Bson::Document(l) = l else { continue };
        if l.get_str("h").unwrap() == hold.hold_id {
            l.insert("s", "during");
            l.insert("hv", hold.version);
            found = true;
        }
    }
    assert!(found, "the take wrote a line for {}", hold.hold_id);
    let r = coll.replace_one(doc! {"_id": &id}, d).await.unwrap();
    assert_eq!(r.modified_count, 1);
}

/// A confirm died after writing its `during` line and before moving its
/// hold: once the hold's `expiresAt` has passed, the unit is still held by
/// nobody and a new buyer is refused, until `repair_lines` frees it. A live
/// `during` hold on another SKU keeps its unit through the repair.
#[tokio::test]
async fn an_interrupted_begin_payment_leaves_no_unit_held_by_nobody() {
    for backend in mongodb_backends() {
        let name = backend.name();
        let (db, store) = fresh(&backend).await;
        let m = MerchantId::generate();
        store.set_stock(&m, "sku-a", 1, T0).await.unwrap();
        store.set_stock(&m, "sku-live", 1, T0).await.unwrap();

        // Hold A: taken, then its confirm wrote the during line and died.
        let a = hold(&m, "order-a", "sku-a", T0);
        let TakeOutcome::Taken(a) = store.take(&a, T0).await.unwrap() else {
            panic!("{name}: hold A taken");
        };
        leave_during_line(&db, &m, "sku-a", &a).await;

        // Hold L: a confirm that is live (begin_payment completed).
        let l = hold(&m, "order-live", "sku-live", T0);
        assert!(matches!(
            store.take(&l, T0).await.unwrap(),
            TakeOutcome::Taken(_)
        ));
        let begun = store
            .begin_payment(&m, &OrderId::parse("order-live").unwrap(), T0 + 1)
            .await
            .unwrap();
        assert!(
            matches!(begun, BeginOutcome::During(_)),
            "{name}: {begun:?}"
        );

        // Past A's expiry, its unit is still held by the orphaned line.
        let later = T0 + TTL + 1;
        assert_eq!(available(&store, &m, "sku-a", later).await, 0, "{name}");
        let b = hold(&m, "order-b", "sku-a", later);
        assert!(
            matches!(
                store.take(&b, later).await.unwrap(),
                TakeOutcome::OutOfStock(_)
            ),
            "{name}: B refused while the orphaned line holds the unit"
        );

        let freed = store.repair_lines(later, 1_000).await.unwrap();
        assert!(freed >= 1, "{name}: repair_lines freed {freed}");
        assert_eq!(available(&store, &m, "sku-a", later).await, 1, "{name}");
        let b = hold(&m, "order-b2", "sku-a", later);
        assert!(
            matches!(store.take(&b, later).await.unwrap(), TakeOutcome::Taken(_)),
            "{name}: B taken after the repair"
        );
        assert_eq!(
            available(&store, &m, "sku-live", later).await,
            0,
            "{name}: the live during hold keeps its unit"
        );
        // A second run finds nothing more to free.
        assert_eq!(store.repair_lines(later, 1_000).await.unwrap(), 0, "{name}");
        Cleanup::MongoDatabase(db).run().await;
    }
}

/// A confirm whose `begin_payment` is between its two steps when the
/// repair runs loses its guarded move (the repair fenced the hold) and
/// starts over: its retry reserves again and ends `during` with the unit
/// counted once.
#[tokio::test]
async fn a_begin_payment_after_the_repair_reserves_again() {
    for backend in mongodb_backends() {
        let name = backend.name();
        let (db, store) = fresh(&backend).await;
        let m = MerchantId::generate();
        store.set_stock(&m, "sku-a", 1, T0).await.unwrap();
        let a = hold(&m, "order-a", "sku-a", T0);
        let TakeOutcome::Taken(a) = store.take(&a, T0).await.unwrap() else {
            panic!("{name}: hold A taken");
        };
        leave_during_line(&db, &m, "sku-a", &a).await;
        assert!(store.repair_lines(T0 + 1, 1_000).await.unwrap() >= 1);
        // The hold is still pre and in time: the confirm begins on it.
        let begun = store
            .begin_payment(&m, &OrderId::parse("order-a").unwrap(), T0 + 2)
            .await
            .unwrap();
        let BeginOutcome::During(h) = begun else {
            panic!("{name}: {begun:?}");
        };
        assert!(h.version > a.version + 1, "{name}: moved past the fence");
        assert_eq!(available(&store, &m, "sku-a", T0 + 3).await, 0, "{name}");
        assert_eq!(store.repair_lines(T0 + 3, 1_000).await.unwrap(), 0);
        assert_eq!(available(&store, &m, "sku-a", T0 + 3).await, 0, "{name}");
        Cleanup::MongoDatabase(db).run().await;
    }
}
