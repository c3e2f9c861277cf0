//! `payment_events` on every SQL backend: numbering follows a payment's
//! versions and never gives a number below one already committed; a
//! payment's next event is due only after the one before it is settled;
//! a worker that stalled past its lease records nothing over the try that
//! took the event from it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use paygate_core::{MerchantId, PaymentId};
use paygate_state_store::{
    bind_event,
    sql::EVENT_INSERT_SQL,
    testing::{fresh_sql_url, sql_backends},
    with_pool, Event, EventType, SqlDatabase,
};
use paygate_webhooks::{store::Endpoint, EventStore};

fn event(payment: &str, version: i64, merchant: &MerchantId) -> Event {
    Event {
        event_id: format!("evt_{payment}_v{version}"),
        merchant_id: merchant.clone(),
        payment_id: PaymentId::from_stored(format!("pay_{payment}")),
        event_type: EventType::Approved,
        version,
        cancel_n: 0,
        payload: "{}".into(),
        created_at: 1_000 - version,
    }
}

async fn insert(db: &SqlDatabase, e: &Event) {
    with_pool!(db, pool => {
        bind_event!(sqlx::query(EVENT_INSERT_SQL), e).execute(pool).await.unwrap();
    });
}

#[tokio::test]
async fn numbering_delivery_order_and_stale_records() {
    for backend in sql_backends() {
        let name = backend.name();
        let (url, cleanup) = fresh_sql_url(&backend).await;
        let db = SqlDatabase::connect(&url, 4).await.unwrap();
        db.migrate().await.unwrap();
        let events = EventStore::new(db.clone());
        let m = MerchantId::from_stored("mer_1");
        events
            .put_endpoint(
                &m,
                &Endpoint {
                    url: "https://example.test/hook".into(),
                    secret_sealed: "v1.x.y".into(),
                },
                0,
            )
            .await
            .unwrap();
        // Written in any order, clocks backwards: numbered by version
        // within the payment.
        for e in [event("b", 3, &m), event("a", 1, &m), event("b", 1, &m)] {
            insert(&db, &e).await;
        }
        // The same event relayed twice is one row.
        insert(&db, &event("a", 1, &m)).await;
        assert_eq!(events.number_all().await.unwrap(), 3, "{name}");
        insert(&db, &event("a", 4, &m)).await;
        assert_eq!(events.number_all().await.unwrap(), 1, "{name}");
        let listed = events.list_after(&m, 0, 100).await.unwrap();
        let order: Vec<(&str, i64, i64)> = listed
            .iter()
            .map(|r| (r.event.payment_id.as_str(), r.event.version, r.seq))
            .collect();
        assert_eq!(
            order,
            [
                ("pay_a", 1, 1),
                ("pay_b", 1, 2),
                ("pay_b", 3, 3),
                ("pay_a", 4, 4)
            ],
            "{name}"
        );
        assert_eq!(
            events.list_after(&m, 2, 100).await.unwrap().len(),
            2,
            "{name}"
        );

        // Only the first pending event of each payment is due.
        let due: Vec<String> = events
            .due(10_000, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.event.event_id)
            .collect();
        assert_eq!(due, ["evt_a_v1", "evt_b_v1"], "{name}");

        // A take moves next_at to the lease; a second take of what was
        // read loses.
        let a1 = &listed[0];
        assert!(
            events.take("evt_a_v1", a1.next_at, 70_000).await.unwrap(),
            "{name}"
        );
        assert!(
            !events.take("evt_a_v1", a1.next_at, 70_000).await.unwrap(),
            "{name}"
        );
        // While it is in flight, a4 is not due.
        assert!(
            events
                .due(100_000, 100)
                .await
                .unwrap()
                .iter()
                .all(|r| r.event.event_id != "evt_a_v4"),
            "{name}"
        );
        // The lease passed; another worker takes it and delivers it.
        assert!(
            events.take("evt_a_v1", 70_000, 200_000).await.unwrap(),
            "{name}"
        );
        assert!(events
            .record(
                "evt_a_v1",
                200_000,
                "delivered",
                150_000,
                Some(200),
                None,
                150_000
            )
            .await
            .unwrap());
        // The first worker resumes and records its failure: nothing changes.
        assert!(!events
            .record(
                "evt_a_v1",
                70_000,
                "pending",
                160_000,
                Some(500),
                Some("500"),
                160_000
            )
            .await
            .unwrap());
        let a = events.list_after(&m, 0, 1).await.unwrap();
        assert_eq!(a[0].delivery, "delivered", "{name}");
        // Now a4 is due; an operator's resend makes a1 due again.
        let due: Vec<String> = events
            .due(300_000, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.event.event_id)
            .collect();
        assert_eq!(due, ["evt_b_v1", "evt_a_v4"], "{name}");
        assert!(events.resend("evt_a_v1").await.unwrap(), "{name}");
        assert!(!events.resend("evt_nope").await.unwrap(), "{name}");
        let due: Vec<String> = events
            .due(300_000, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.event.event_id)
            .collect();
        assert_eq!(due, ["evt_a_v1", "evt_b_v1"], "{name}");

        // A merchant without an endpoint gets its events numbered, never due.
        let other = MerchantId::from_stored("mer_2");
        insert(&db, &event("c", 1, &other)).await;
        events.number_all().await.unwrap();
        let c = events.list_after(&other, 0, 10).await.unwrap();
        assert_eq!(c[0].delivery, "no_endpoint", "{name}");
        db.close().await;
        cleanup.run().await;
    }
}
