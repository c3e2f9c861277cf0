//! Moves inside MongoDB transactions under transient errors (issue 13,
//! point 8; issue 16): the driver documents that a `TransientTransactionError`
//! label means "run the whole transaction again" and an
//! `UnknownTransactionCommitResult` label "commit again". The errors are
//! injected with MongoDB's `failCommand` fail point (`configureFailPoint`,
//! the server's documented test facility), scoped to the test's own
//! collection where the command has one.
//!
//! Needs a replica set (`PAYGATE_TEST_MONGODB_RS_URI`); without one it says
//! SKIPPED and runs nothing. One test function: the commit fail point is
//! server-wide, so nothing else in this binary may commit meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use paygate_core::{MerchantId, OrderId, Partition, PaymentRecord};
use paygate_state_store::{
    mongo::TXN_ATTEMPTS,
    testing::{fresh_state_store, mongodb_backends, Backend},
    MongoOptions, MongoStateStore, StoreError, Transition,
};

fn paid_and_saved_record(m: &MerchantId, order: &str) -> PaymentRecord {
    PaymentRecord::new_pending(
        m.clone(),
        OrderId::parse(order).unwrap(),
        format!("pk_{order}"),
        10_000,
        "KRW".into(),
        format!("fp_{order}"),
        None,
        paygate_core::time::now_ms(),
    )
}

async fn fail_point(
    admin: &mongodb::Database,
    mode: mongodb::bson::Bson,
    data: mongodb::bson::Document,
) {
    admin
        .run_command(mongodb::bson::doc! {
            "configureFailPoint": "failCommand",
            "mode": mode,
            "data": data,
        })
        .await
        .expect("the server takes the failCommand fail point");
}

async fn off(admin: &mongodb::Database) {
    admin
        .run_command(mongodb::bson::doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .await
        .expect("fail point off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_retry_transient_transaction_errors_within_a_bound() {
    let Some(backend) = mongodb_backends()
        .into_iter()
        .find(|b| matches!(b, Backend::MongodbReplicaSet(_)))
    else {
        return;
    };
    let (store, cleanup) = fresh_state_store(&backend).await;
    // A second handle on the same database, to see its name and reach admin.
    let uri = backend.mongodb_uri().unwrap().to_owned();
    let probe = MongoStateStore::connect(
        &uri,
        &MongoOptions {
            database: "paygate_failpoints".into(),
            ..MongoOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(probe.uses_transactions());
    let admin = probe.database().client().database("admin");
    let m = MerchantId::generate();
    let ready = |order: &'static str| {
        let store = store.clone();
        let m = m.clone();
        async move {
            let r = paid_and_saved_record(&m, order);
            store.create(&r).await.unwrap();
            let paid = Transition::MarkPaid {
                approved_at: "2026-11-21T12:00:00+09:00".into(),
            };
            assert!(store.transition(&r.payment_id, &paid).await.unwrap());
            assert!(store
                .transition(&r.payment_id, &Transition::MarkSaved)
                .await
                .unwrap());
            r
        }
    };
    let where_is = |r: PaymentRecord| {
        let store = store.clone();
        async move { store.get(&r.payment_id).await.unwrap().map(|(p, _)| p) }
    };
    let db_name = cleanup_db_name(&cleanup);
    let realtime_ns = format!("{db_name}.realtime_payments");

    // 1. The delete inside the transaction fails twice with a transient
    //    transaction error: the whole transaction runs again and the move lands.
    let a = ready("order-txn-transient").await;
    fail_point(
        &admin,
        mongodb::bson::Bson::Document(mongodb::bson::doc! {"times": 2}),
        mongodb::bson::doc! {
            "failCommands": ["delete"],
            "namespace": &realtime_ns,
            "errorCode": 112,
            "errorLabels": ["TransientTransactionError"],
        },
    )
    .await;
    let moved = store
        .move_record(&a.payment_id, Partition::Realtime, Partition::Completed)
        .await;
    off(&admin).await;
    assert!(
        matches!(moved, Ok(true)),
        "a transient transaction error is retried, got {moved:?}"
    );
    assert_eq!(where_is(a.clone()).await, Some(Partition::Completed));

    // 2. The commit's result is unknown three times in a row (the driver
    //    retries a commit once by itself): the commit is retried and the
    //    move lands exactly once.
    let b = ready("order-txn-commit").await;
    fail_point(
        &admin,
        mongodb::bson::Bson::Document(mongodb::bson::doc! {"times": 3}),
        mongodb::bson::doc! {
            "failCommands": ["commitTransaction"],
            "errorCode": 91,
            "errorLabels": ["UnknownTransactionCommitResult"],
        },
    )
    .await;
    let moved = store
        .move_record(&b.payment_id, Partition::Realtime, Partition::Completed)
        .await;
    off(&admin).await;
    assert!(
        matches!(moved, Ok(true)),
        "an unknown commit result is committed again, got {moved:?}"
    );
    assert_eq!(where_is(b.clone()).await, Some(Partition::Completed));

    // 3. A transient error that does not go away: the retries stop at the
    //    bound, the move fails as Unavailable (not Rejected) with nothing
    //    half-written, and a rerun after the fault finishes it.
    let c = ready("order-txn-stuck").await;
    fail_point(
        &admin,
        mongodb::bson::Bson::Document(mongodb::bson::doc! {"times": 10 * TXN_ATTEMPTS}),
        mongodb::bson::doc! {
            "failCommands": ["delete"],
            "namespace": &realtime_ns,
            "errorCode": 112,
            "errorLabels": ["TransientTransactionError"],
        },
    )
    .await;
    let started = std::time::Instant::now();
    let moved = store
        .move_record(&c.payment_id, Partition::Realtime, Partition::Completed)
        .await;
    off(&admin).await;
    assert!(
        matches!(moved, Err(StoreError::Unavailable(_))),
        "a persistent transient error ends as Unavailable, got {moved:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the retries are bounded"
    );
    assert_eq!(where_is(c.clone()).await, Some(Partition::Realtime));
    assert!(store
        .move_record(&c.payment_id, Partition::Realtime, Partition::Completed)
        .await
        .unwrap());
    assert_eq!(where_is(c).await, Some(Partition::Completed));

    let _ = probe.database().drop().await;
    cleanup.run().await;
}

/// The name of the MongoDB database a fresh store was given.
fn cleanup_db_name(cleanup: &paygate_state_store::testing::Cleanup) -> String {
    match cleanup {
        paygate_state_store::testing::Cleanup::MongoDatabase(db) => db.name().to_owned(),
        _ => panic!("a MongoDB store"),
    }
}
