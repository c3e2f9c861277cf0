//! [`CancelStore`] on MongoDB: collection `payment_cancels` with
//! `_id = "<payment_id>:<n>"`, so the unique `_id` is the claim's
//! serialization point (an insert of a number taken since the read fails
//! with a duplicate key and the claim reads again), and each
//! [`CancelTransition`] is one `find_one_and_update` whose filter is its guard.

use futures_util::{stream::BoxStream, StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use paygate_core::{MerchantId, PaymentId};

use super::{is_duplicate, map_err, MongoStateStore};
use crate::{
    cancels::{decide_claim, ClaimDecision, CLAIM_ATTEMPTS},
    CancelClaim, CancelDraft, CancelRecord, CancelStatus, CancelStore, CancelTransition,
    StoreError,
};

/// The collection's name.
pub(super) const CANCELS: &str = "payment_cancels";

fn cancel_id(payment_id: &PaymentId, n: i64) -> String {
    format!("{payment_id}:{n}")
}

fn cancel_to_doc(c: &CancelRecord) -> Document {
    let opt = |v: &Option<String>| v.as_ref().map_or(Bson::Null, |s| Bson::String(s.clone()));
    doc! {
        "_id": cancel_id(&c.payment_id, c.n),
        "payment_id": c.payment_id.as_str(),
        "n": c.n,
        "merchant_id": c.merchant_id.as_str(),
        "amount": c.amount,
        "reason": &c.reason,
        "idempotency_key": opt(&c.idempotency_key),
        "request_fingerprint": &c.request_fingerprint,
        "status": c.status.as_str(),
        "is_saved": c.is_saved,
        "save_attempts": c.save_attempts,
        "batch_attempts": c.batch_attempts,
        "failure_code": opt(&c.failure_code),
        "last_error": opt(&c.last_error),
        "canceled_at": opt(&c.canceled_at),
        "created_at": c.created_at,
        "updated_at": c.updated_at,
        "version": c.version,
    }
}

fn cancel_from_doc(d: &Document) -> Result<CancelRecord, StoreError> {
    let c = |e: mongodb::bson::document::ValueAccessError| StoreError::Corrupt(e.to_string());
    let s = |k: &str| d.get_str(k).map(str::to_owned).map_err(c);
    let o = |k: &str| match d.get(k) {
        Some(Bson::String(v)) => Some(v.clone()),
        _ => None,
    };
    let i = |k: &str| match d.get(k) {
        Some(Bson::Int64(v)) => Ok(*v),
        Some(Bson::Int32(v)) => Ok(i64::from(*v)),
        _ => Err(StoreError::Corrupt(format!("field {k} is not an integer"))),
    };
    Ok(CancelRecord {
        payment_id: PaymentId::from_stored(s("payment_id")?),
        n: i("n")?,
        merchant_id: MerchantId::from_stored(s("merchant_id")?),
        amount: i("amount")?,
        reason: s("reason")?,
        idempotency_key: o("idempotency_key"),
        request_fingerprint: s("request_fingerprint")?,
        status: CancelStatus::from_stored(&s("status")?)?,
        is_saved: d.get_bool("is_saved").map_err(c)?,
        save_attempts: i("save_attempts")?,
        batch_attempts: i("batch_attempts")?,
        failure_code: o("failure_code"),
        last_error: o("last_error"),
        canceled_at: o("canceled_at"),
        created_at: i("created_at")?,
        updated_at: i("updated_at")?,
        version: super::version_of(d),
    })
}

/// The guard (filter) and the update of a transition, compiled from its
/// rule; every update increments `version`.
fn transition_update(t: &CancelTransition, now: i64) -> (Document, Document) {
    t.rule().to_mongo::<CancelRecord>(now)
}

impl MongoStateStore {
    /// A cancel transition that leaves an event (see `super::events`): the
    /// cancel read, its payment and its other done cancels (final: none
    /// changes while this one is in flight), one update guarded on the
    /// version read with the event pushed into the cancel's `outbox`.
    async fn cancel_transition_with_event(
        &self,
        payment_id: &PaymentId,
        n: i64,
        t: &CancelTransition,
    ) -> Result<bool, StoreError> {
        let rule = t.rule();
        for _ in 0..super::events::CAS_ATTEMPTS {
            let cancels = self.cancels_of(payment_id).await?;
            let Some(mut c) = cancels.iter().find(|c| c.n == n).cloned() else {
                return Ok(false);
            };
            let seen = c.version;
            let now = self.clock.now_ms();
            if !rule.apply_if(&mut c, now) {
                return Ok(false);
            }
            let before: i64 = cancels
                .iter()
                .filter(|o| o.n != n && o.status == crate::CancelStatus::Done)
                .map(|o| o.amount)
                .sum();
            let Some((_, payment)) = crate::StateStore::get(self, payment_id).await? else {
                return Err(StoreError::Corrupt(format!(
                    "cancel {n} of {payment_id} has no payment"
                )));
            };
            let event = crate::cancel_event(&payment, &c, before, now);
            let (mut filter, update) =
                super::events::versioned_update::<CancelRecord>(&rule, seen, event.as_ref(), now);
            filter.insert("_id", cancel_id(payment_id, n));
            let matched = self
                .coll(CANCELS)
                .update_one(filter, update)
                .await
                .map_err(map_err)?
                .matched_count;
            if matched == 1 {
                return Ok(true);
            }
        }
        Err(StoreError::Unavailable(format!(
            "cancel {n} of {payment_id} lost to other writers {} times",
            super::events::CAS_ATTEMPTS
        )))
    }
}

#[async_trait::async_trait]
impl CancelStore for MongoStateStore {
    async fn claim_cancel(&self, draft: &CancelDraft) -> Result<CancelClaim, StoreError> {
        for _ in 0..CLAIM_ATTEMPTS {
            let cancels = self.cancels_of(&draft.payment_id).await?;
            match decide_claim(draft, &cancels) {
                ClaimDecision::Answer(a) => return Ok(a),
                ClaimDecision::Insert(c) => {
                    match self.coll(CANCELS).insert_one(cancel_to_doc(&c)).await {
                        Ok(_) => return Ok(CancelClaim::Claimed(c)),
                        Err(e) if is_duplicate(&e) => {}
                        Err(e) => return Err(map_err(e)),
                    }
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "cancel of {} lost the claim race {CLAIM_ATTEMPTS} times",
            draft.payment_id
        )))
    }

    async fn cancels_of(&self, payment_id: &PaymentId) -> Result<Vec<CancelRecord>, StoreError> {
        let docs: Vec<Document> = self
            .coll(CANCELS)
            .find(doc! {"payment_id": payment_id.as_str()})
            .sort(doc! {"n": 1})
            .await
            .map_err(map_err)?
            .try_collect()
            .await
            .map_err(map_err)?;
        docs.iter().map(cancel_from_doc).collect()
    }

    async fn cancel_transition(
        &self,
        payment_id: &PaymentId,
        n: i64,
        t: &CancelTransition,
    ) -> Result<bool, StoreError> {
        if t.leaves_event() {
            return self.cancel_transition_with_event(payment_id, n, t).await;
        }
        let (mut filter, update) = transition_update(t, self.clock.now_ms());
        filter.insert("_id", cancel_id(payment_id, n));
        let updated = self
            .coll(CANCELS)
            .find_one_and_update(filter, update)
            .await
            .map_err(map_err)?;
        Ok(updated.is_some())
    }

    fn scan_open_cancels(
        &self,
        batch_size: u32,
    ) -> BoxStream<'_, Result<CancelRecord, StoreError>> {
        let coll = self.coll(CANCELS);
        let filter = crate::rules::mongo::filter::<CancelRecord>(&crate::cancels::open_guard());
        let stream = futures_util::stream::once(async move {
            coll.find(filter)
                .sort(doc! {"payment_id": 1, "n": 1})
                .batch_size(batch_size.max(1))
                .await
                .map_err(map_err)
        })
        .map_ok(|cursor| cursor.map(|d| d.map_err(map_err).and_then(|d| cancel_from_doc(&d))))
        .try_flatten();
        Box::pin(stream)
    }
}
