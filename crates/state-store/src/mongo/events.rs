//! Events on MongoDB: the in-document outbox.
//!
//! A transition that leaves an event ([`crate::events`]) pushes it into an
//! `outbox` array of the document it changes, in the same single-document
//! update, so the event exists exactly when the transition applied, with
//! no transaction. The update is guarded on the version read, and the
//! event is built from that read with the rule applied in Rust (the same
//! [`Rule::apply`](crate::rules::Rule::apply) the memory store uses), so
//! its payload is the record as the update leaves it. A version that moved
//! since the read means another writer came first: read again, and apply
//! only if the guard still holds.
//!
//! Moves copy a payment's whole document, `outbox` included, so an event
//! not relayed yet travels with its record. The relay (crate
//! `paygate-webhooks`) copies `outbox` entries into the SQL
//! `payment_events` table, idempotently by `event_id`, then pulls them
//! from every collection; a relay that dies in between copies them again.

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use paygate_core::{MerchantId, Partition, PaymentId};

use super::{cancels::CANCELS, map_err, record_from_doc, MongoStateStore};
use crate::{
    events::{Event, EventType},
    rules::{Cond, Rule, Stored},
    StoreError,
};

/// How many times a versioned update reads again after losing to another
/// writer before it reports the store as contended.
pub(super) const CAS_ATTEMPTS: usize = 16;

/// The collections that hold outboxes: the three partitions and the cancels.
fn outbox_collections() -> [&'static str; 4] {
    [
        Partition::Realtime.table(),
        Partition::Completed.table(),
        Partition::Unpaid.table(),
        CANCELS,
    ]
}

/// The BSON form of an event in an `outbox`.
pub(super) fn event_to_doc(e: &Event) -> Document {
    doc! {
        "event_id": &e.event_id,
        "merchant_id": e.merchant_id.as_str(),
        "payment_id": e.payment_id.as_str(),
        "type": e.event_type.as_str(),
        "version": e.version,
        "cancel_n": e.cancel_n,
        "payload": &e.payload,
        "created_at": e.created_at,
    }
}

fn event_from_doc(d: &Document) -> Result<Event, StoreError> {
    let c = |e: mongodb::bson::document::ValueAccessError| StoreError::Corrupt(e.to_string());
    let s = |k: &str| d.get_str(k).map(str::to_owned).map_err(c);
    let i = |k: &str| match d.get(k) {
        Some(Bson::Int64(v)) => Ok(*v),
        Some(Bson::Int32(v)) => Ok(i64::from(*v)),
        _ => Err(StoreError::Corrupt(format!(
            "event field {k} is not an integer"
        ))),
    };
    let kind = s("type")?;
    Ok(Event {
        event_id: s("event_id")?,
        merchant_id: MerchantId::from_stored(s("merchant_id")?),
        payment_id: PaymentId::from_stored(s("payment_id")?),
        event_type: EventType::from_stored(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("event type {kind}")))?,
        version: i("version")?,
        cancel_n: i("cancel_n")?,
        payload: s("payload")?,
        created_at: i("created_at")?,
    })
}

/// The filter and update of `rule` guarded also on `seen` (the version
/// read), with `event` pushed into the document's `outbox`.
pub(super) fn versioned_update<E: Stored>(
    rule: &Rule<E::Field>,
    seen: i64,
    event: Option<&Event>,
    now_ms: i64,
) -> (Document, Document)
where
    E::Field: Copy + std::fmt::Debug,
{
    let mut guarded = rule.clone();
    guarded.guard.push(Cond::Version(seen));
    let (filter, mut update) = guarded.to_mongo::<E>(now_ms);
    if let Some(e) = event {
        update.insert("$push", doc! {"outbox": event_to_doc(e)});
    }
    (filter, update)
}

/// The events in the `outbox` of the documents of `filter` in `coll`.
fn outbox_of(d: &Document) -> Result<Vec<Event>, StoreError> {
    match d.get("outbox") {
        Some(Bson::Array(items)) => items
            .iter()
            .map(|b| match b {
                Bson::Document(e) => event_from_doc(e),
                _ => Err(StoreError::Corrupt(
                    "an outbox entry is not a document".into(),
                )),
            })
            .collect(),
        _ => Ok(Vec::new()),
    }
}

impl MongoStateStore {
    /// Every event still in the outboxes of `payment_id`'s documents (its
    /// copies and its cancels), one per `event_id`, by `(version, cancel_n)`.
    pub(super) async fn outbox_events_of(
        &self,
        payment_id: &PaymentId,
    ) -> Result<Vec<Event>, StoreError> {
        let mut events: Vec<Event> = Vec::new();
        for name in outbox_collections() {
            let filter = if name == CANCELS {
                doc! {"payment_id": payment_id.as_str()}
            } else {
                doc! {"_id": payment_id.as_str()}
            };
            let docs: Vec<Document> = self
                .coll(name)
                .find(filter)
                .await
                .map_err(map_err)?
                .try_collect()
                .await
                .map_err(map_err)?;
            for d in &docs {
                events.extend(outbox_of(d)?);
            }
        }
        Ok(dedup(events))
    }

    /// Up to about `limit` events from every outbox (see the module doc).
    ///
    /// A payment's events must reach the SQL table no later than any event
    /// after them, or the numbering would put a cancel before the approval
    /// it cancels. Cancels are read first, and with each cancel's events
    /// the whole outbox of its payment: a cancel is claimed only on a paid
    /// record, so its approval event was pushed before it, and is read here
    /// unless a relay already moved it to the table (which it commits
    /// before it pulls). Then the partitions.
    pub(super) async fn outbox_pending(&self, limit: u32) -> Result<Vec<Event>, StoreError> {
        let mut events: Vec<Event> = Vec::new();
        let cancel_docs: Vec<Document> = self
            .coll(CANCELS)
            .find(doc! {"outbox.0": {"$exists": true}})
            .limit(i64::from(limit.max(1)))
            .await
            .map_err(map_err)?
            .try_collect()
            .await
            .map_err(map_err)?;
        let mut payments: Vec<PaymentId> = Vec::new();
        for d in &cancel_docs {
            for e in outbox_of(d)? {
                if !payments.contains(&e.payment_id) {
                    payments.push(e.payment_id.clone());
                }
                events.push(e);
            }
        }
        for p in &payments {
            events.extend(self.outbox_events_of(p).await?);
        }
        for name in outbox_collections().into_iter().filter(|n| *n != CANCELS) {
            let docs: Vec<Document> = self
                .coll(name)
                .find(doc! {"outbox.0": {"$exists": true}})
                .limit(i64::from(limit.max(1)))
                .await
                .map_err(map_err)?
                .try_collect()
                .await
                .map_err(map_err)?;
            for d in &docs {
                events.extend(outbox_of(d)?);
            }
            if events.len() >= limit as usize {
                break;
            }
        }
        Ok(dedup(events))
    }

    /// Pulls relayed events from every outbox that holds them.
    pub(super) async fn outbox_forget(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        for name in outbox_collections() {
            self.coll(name)
                .update_many(
                    doc! {"outbox.event_id": {"$in": &ids}},
                    doc! {"$pull": {"outbox": {"event_id": {"$in": &ids}}}},
                )
                .await
                .map_err(map_err)?;
        }
        Ok(())
    }

    /// Reads `payment_id` from realtime, for a versioned transition.
    pub(super) async fn realtime_record(
        &self,
        payment_id: &PaymentId,
    ) -> Result<Option<paygate_core::PaymentRecord>, StoreError> {
        self.partition(Partition::Realtime)
            .find_one(doc! {"_id": payment_id.as_str()})
            .await
            .map_err(map_err)?
            .map(|d| record_from_doc(&d))
            .transpose()
    }
}

/// One event per `event_id` (a document copied by a move carries its
/// outbox along), ordered by payment, version and cancel number.
fn dedup(mut events: Vec<Event>) -> Vec<Event> {
    events.sort_by(|a, b| {
        (a.payment_id.as_str(), a.version, a.cancel_n, &a.event_id).cmp(&(
            b.payment_id.as_str(),
            b.version,
            b.cancel_n,
            &b.event_id,
        ))
    });
    events.dedup_by(|a, b| a.event_id == b.event_id);
    events
}
