//! MongoDB claims after a creator died mid-create (issue 15): without a
//! transaction, a create writes its claims one document at a time (see the
//! `mongo` module's doc), so a crash can leave some of them. These tests
//! write what a dead creator leaves, document by document, and check that
//! no claim blocks an order or a paymentKey forever and that no record is
//! written without all its claims. (SQL takes every claim and the record in
//! one transaction; the in-memory store in one step under its lock.)
//!
//! Needs `PAYGATE_TEST_MONGODB_URI` or `PAYGATE_TEST_MONGODB_RS_URI`;
//! without either it says SKIPPED and runs nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use mongodb::bson::{doc, oid::ObjectId, Document};
use paygate_core::{MerchantId, OrderId, PaymentRecord};
use paygate_state_store::{
    mongo::record_to_doc,
    testing::{fresh_state_store, mongodb_backends, Cleanup},
    CreateOutcome, MongoOptions, MongoStateStore,
};

fn pending(m: &MerchantId, order: &str, payment_key: &str) -> PaymentRecord {
    PaymentRecord::new_pending(
        m.clone(),
        OrderId::parse(order).unwrap(),
        payment_key.to_owned(),
        10_000,
        "KRW".into(),
        format!("fp_{order}"),
        None,
        paygate_core::time::now_ms(),
    )
}

/// The claims a creator of `r` had written when it died: its order claim
/// (`final` or tentative) and the listed secondaries, all `age_ms` old.
fn left_behind(
    r: &PaymentRecord,
    final_: bool,
    secondaries: &[String],
    age_ms: i64,
) -> Vec<Document> {
    let token = ObjectId::new();
    let at = paygate_core::time::now_ms() - age_ms;
    let primary = format!("order:{}:{}", r.merchant_id, r.order_id.as_str());
    let mut docs = vec![doc! {
        "_id": &primary, "payment_id": r.payment_id.as_str(), "record": record_to_doc(r),
        "created_at": at, "final": final_, "token": token,
    }];
    for s in secondaries {
        docs.push(doc! {
            "_id": s, "payment_id": r.payment_id.as_str(), "primary": &primary,
            "token": token, "created_at": at,
        });
    }
    docs
}

fn order_claim(order: &str) -> String {
    format!("acct:default:order:{order}")
}

fn key_claim(key: &str) -> String {
    format!("acct:default:key:{key}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_left_by_a_dead_creator_never_block_forever_nor_stand_without_a_record() {
    for backend in mongodb_backends() {
        let name = backend.name();
        let (store, cleanup) = fresh_state_store(&backend).await;
        let Cleanup::MongoDatabase(db) = &cleanup else {
            panic!("{name}: a MongoDB store")
        };
        let probe = MongoStateStore::connect(
            backend.mongodb_uri().unwrap(),
            &MongoOptions {
                database: db.name().to_owned(),
                ..MongoOptions::default()
            },
        )
        .await
        .unwrap();
        let claims = probe.database().collection::<Document>("payment_claims");
        let (m, other) = (MerchantId::generate(), MerchantId::generate());

        // 1. Died before finalizing: a tentative order claim and its account
        //    orderId claim, old. The order is free again for a new payment
        //    (with another paymentKey), and the dead one has no record.
        let dead = pending(&m, "order-dead-1", "pk_dead_1");
        claims
            .insert_many(left_behind(
                &dead,
                false,
                &[order_claim("order-dead-1")],
                10_000,
            ))
            .await
            .unwrap();
        let retry = pending(&m, "order-dead-1", "pk_retry_1");
        assert_eq!(
            store.create(&retry).await.unwrap(),
            CreateOutcome::Created,
            "{name}"
        );
        assert!(
            store.get(&dead.payment_id).await.unwrap().is_none(),
            "{name}"
        );
        // Its paymentKey was never claimed: free for another order.
        assert_eq!(
            store
                .create(&pending(&m, "order-dead-1b", "pk_dead_1"))
                .await
                .unwrap(),
            CreateOutcome::Created,
            "{name}"
        );

        // 2. Died while giving its claims back: a secondary whose order claim
        //    is gone. It is stale and removed by the next create that meets it.
        let gone = pending(&m, "order-dead-2", "pk_dead_2");
        let mut docs = left_behind(&gone, false, &[key_claim("pk_dead_2")], 0);
        docs.remove(0);
        claims.insert_many(docs).await.unwrap();
        assert_eq!(
            store
                .create(&pending(&other, "order-dead-2b", "pk_dead_2"))
                .await
                .unwrap(),
            CreateOutcome::Created,
            "{name}: a stale paymentKey claim must not block"
        );

        // 3. Died after finalizing, before writing the record: every claim is
        //    there, so the order stands; its record is written by the next
        //    reader, and the account claims hold for everyone else.
        let done = pending(&m, "order-dead-3", "pk_dead_3");
        claims
            .insert_many(left_behind(
                &done,
                true,
                &[order_claim("order-dead-3"), key_claim("pk_dead_3")],
                10_000,
            ))
            .await
            .unwrap();
        assert_eq!(
            store
                .create(&pending(&other, "order-dead-3", "pk_other_3"))
                .await
                .unwrap(),
            CreateOutcome::OrderIdInUse,
            "{name}"
        );
        assert_eq!(
            store
                .create(&pending(&other, "order-dead-3c", "pk_dead_3"))
                .await
                .unwrap(),
            CreateOutcome::PaymentKeyReused,
            "{name}"
        );
        let found = store
            .get_by_order(&m, &OrderId::parse("order-dead-3").unwrap())
            .await
            .unwrap()
            .expect("the final claim's record is written");
        assert_eq!(found.payment_id, done.payment_id, "{name}");

        let _ = probe.database().drop().await;
        cleanup.run().await;
    }
}
