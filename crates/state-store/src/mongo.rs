//! [`MongoStateStore`]: the realtime state in MongoDB, as the original design
//! kept it (DESIGN.md §3), on the official `mongodb` driver (3.x).
//!
//! - Collections `realtime_payments`, `completed_payments`, `unpaid_payments`
//!   with `_id = payment_id`, and `payment_claims` for the permanent
//!   `(merchant, orderId)` / `(merchant, Idempotency-Key)` claims.
//! - A unique index on `(merchant_id, order_id)` in each partition.
//! - Every flag transition is one conditional `find_one_and_update` whose
//!   filter is the expected current state, so two writers never lose each
//!   other's update and a repeated transition is a no-op.
//! - Moves upsert the target with the same `_id` and then delete the source,
//!   inside a multi-document transaction when the deployment is a replica set
//!   or a sharded cluster; either way a rerun after a crash is harmless.
//! - Scans stream a cursor in `_id` order with a batch size.
//! - Writes use write concern `majority` with journaling by default.
//!
//! Creating a record without a transaction: the order claim is inserted first
//! and carries a snapshot of the new record. Should the process die before the
//! record itself is written, the next request for that order finds the claim
//! without a record and writes the snapshot (no card call was ever made for
//! it, so the record is a plain `PENDING` one the saga or the batch settles).

use futures_util::{stream::BoxStream, StreamExt, TryStreamExt};
use mongodb::{
    bson::{doc, Bson, Document},
    error::{ErrorKind, WriteFailure},
    options::{
        Acknowledgment, ClientOptions, CollectionOptions, IndexOptions, ReturnDocument,
        WriteConcern,
    },
    Client, Collection, Database, IndexModel,
};
use paygate_core::{CardStatus, MerchantId, OrderId, Partition, PaymentId, PaymentRecord};

use crate::{CreateOutcome, StateStore, StoreError, Transition};

const CLAIMS: &str = "payment_claims";
const DUPLICATE_KEY: i32 = 11000;

/// How [`MongoStateStore`] connects and writes.
#[derive(Clone, Debug)]
pub struct MongoOptions {
    /// Database name.
    pub database: String,
    /// Maximum connections per server in the driver's pool.
    pub max_pool_size: u32,
    /// Write concern `w`: `majority` (default) or a number of nodes.
    pub write_concern_w: String,
    /// Require the journal before acknowledging (default true).
    pub journal: bool,
}

impl Default for MongoOptions {
    fn default() -> Self {
        Self {
            database: "paygate".to_owned(),
            max_pool_size: 20,
            write_concern_w: "majority".to_owned(),
            journal: true,
        }
    }
}

/// The state store on MongoDB.
#[derive(Clone, Debug)]
pub struct MongoStateStore {
    client: Client,
    db: Database,
    transactions: bool,
}

fn map_err(e: mongodb::error::Error) -> StoreError {
    match *e.kind {
        ErrorKind::Write(_)
        | ErrorKind::Command(_)
        | ErrorKind::InsertMany(_)
        | ErrorKind::BulkWrite(_) => StoreError::Rejected(e.to_string()),
        ErrorKind::BsonDeserialization(_) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// The BSON document of a record (`_id` = payment id).
pub fn record_to_doc(r: &PaymentRecord) -> Document {
    let opt = |v: &Option<String>| v.as_ref().map_or(Bson::Null, |s| Bson::String(s.clone()));
    doc! {
        "_id": r.payment_id.as_str(),
        "merchant_id": r.merchant_id.as_str(),
        "order_id": r.order_id.as_str(),
        "payment_key": &r.payment_key,
        "amount": r.amount,
        "currency": &r.currency,
        "is_paid": r.is_paid,
        "is_saved": r.is_saved,
        "card_status": r.card_status.as_str(),
        "approved_at": opt(&r.approved_at),
        "save_attempts": r.save_attempts,
        "batch_attempts": r.batch_attempts,
        "failure_code": opt(&r.failure_code),
        "last_error": opt(&r.last_error),
        "request_fingerprint": &r.request_fingerprint,
        "idempotency_key": opt(&r.idempotency_key),
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    }
}

/// The filter of a guarded move of `id` into `to` (see
/// [`crate::may_enter`]).
fn guarded(id: &str, to: Partition) -> Document {
    match to {
        Partition::Completed => doc! {"_id": id, "is_paid": true, "is_saved": true},
        Partition::Unpaid => doc! {"_id": id, "is_paid": false, "card_status": "ABORTED"},
        Partition::Realtime => doc! {"_id": id},
    }
}

/// Reads a record from its BSON document.
///
/// # Errors
/// [`StoreError::Corrupt`] when a field is missing or of the wrong type.
pub fn record_from_doc(d: &Document) -> Result<PaymentRecord, StoreError> {
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
    Ok(PaymentRecord {
        payment_id: PaymentId::from_stored(s("_id")?),
        merchant_id: MerchantId::from_stored(s("merchant_id")?),
        order_id: OrderId::from_stored(s("order_id")?),
        payment_key: s("payment_key")?,
        amount: i("amount")?,
        currency: s("currency")?,
        is_paid: d.get_bool("is_paid").map_err(c)?,
        is_saved: d.get_bool("is_saved").map_err(c)?,
        card_status: CardStatus::from_stored(&s("card_status")?),
        approved_at: o("approved_at"),
        save_attempts: i("save_attempts")?,
        batch_attempts: i("batch_attempts")?,
        failure_code: o("failure_code"),
        last_error: o("last_error"),
        request_fingerprint: s("request_fingerprint")?,
        idempotency_key: o("idempotency_key"),
        created_at: i("created_at")?,
        updated_at: i("updated_at")?,
    })
}

/// The records matching `filter` in `sort` order, streamed from one cursor
/// `batch_size` documents per round trip.
fn stream_records(
    coll: Collection<Document>,
    filter: Document,
    sort: Document,
    batch_size: u32,
) -> BoxStream<'static, Result<PaymentRecord, StoreError>> {
    let stream = futures_util::stream::once(async move {
        coll.find(filter)
            .sort(sort)
            .batch_size(batch_size.max(1))
            .await
            .map_err(map_err)
    })
    .map_ok(|cursor| cursor.map(|d| d.map_err(map_err).and_then(|d| record_from_doc(&d))))
    .try_flatten();
    Box::pin(stream)
}

fn order_claim_id(merchant: &MerchantId, order: &str) -> String {
    format!("order:{merchant}:{order}")
}

fn key_claim_id(merchant: &MerchantId, key: &str) -> String {
    format!("idem:{merchant}:{key}")
}

impl MongoStateStore {
    /// Connects to `uri`, checks the server answers, and creates the indexes.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the URI is malformed or the server
    /// cannot be reached; [`StoreError::Rejected`] when an index cannot be built.
    pub async fn connect(uri: &str, options: &MongoOptions) -> Result<Self, StoreError> {
        // The parse error may quote the URI, which can hold a password (I6):
        // report that it failed, not what it read.
        let mut client_options = ClientOptions::parse(uri).await.map_err(|_| {
            StoreError::Unavailable("invalid MongoDB connection string (mongodb_uri)".to_owned())
        })?;
        client_options.app_name = Some("paygate".to_owned());
        // Fail a startup or a readiness check within 10 s unless the URI's
        // serverSelectionTimeoutMS says otherwise (the driver's default is 30 s).
        if client_options.server_selection_timeout.is_none() {
            client_options.server_selection_timeout = Some(std::time::Duration::from_secs(10));
        }
        client_options.max_pool_size = Some(options.max_pool_size);
        let mut wc = match options.write_concern_w.parse::<u32>() {
            Ok(n) => WriteConcern::nodes(n),
            Err(_) if options.write_concern_w == "majority" => WriteConcern::majority(),
            Err(_) => Acknowledgment::Custom(options.write_concern_w.clone()).into(),
        };
        wc.journal = Some(options.journal);
        client_options.write_concern = Some(wc);
        let client = Client::with_options(client_options).map_err(map_err)?;
        let db = client.database(&options.database);
        let hello = db.run_command(doc! {"hello": 1}).await.map_err(map_err)?;
        let transactions =
            hello.contains_key("setName") || hello.get_str("msg").ok() == Some("isdbgrid");
        let store = Self {
            client,
            db,
            transactions,
        };
        store.ensure_indexes().await?;
        Ok(store)
    }

    /// True when moves run inside multi-document transactions.
    pub fn uses_transactions(&self) -> bool {
        self.transactions
    }

    /// The database (for tests and tooling).
    pub fn database(&self) -> &Database {
        &self.db
    }

    fn coll(&self, name: &str) -> Collection<Document> {
        self.db
            .collection_with_options(name, CollectionOptions::builder().build())
    }

    fn partition(&self, p: Partition) -> Collection<Document> {
        self.coll(p.table())
    }

    async fn ensure_indexes(&self) -> Result<(), StoreError> {
        for p in Partition::ALL {
            let index = IndexModel::builder()
                .keys(doc! {"merchant_id": 1, "order_id": 1})
                .options(
                    IndexOptions::builder()
                        .unique(true)
                        .name("merchant_order_unique".to_owned())
                        .build(),
                )
                .build();
            self.partition(p)
                .create_index(index)
                .await
                .map_err(map_err)?;
            // The reconciliation's lookups: by orderId across merchants, and
            // paid records by creation time.
            for (keys, name) in [
                (doc! {"order_id": 1}, "order_id"),
                (doc! {"created_at": 1, "_id": 1}, "created_at"),
            ] {
                let index = IndexModel::builder()
                    .keys(keys)
                    .options(IndexOptions::builder().name(name.to_owned()).build())
                    .build();
                self.partition(p)
                    .create_index(index)
                    .await
                    .map_err(map_err)?;
            }
        }
        Ok(())
    }

    async fn claimed(&self, claim_id: &str) -> Result<Option<Document>, StoreError> {
        self.coll(CLAIMS)
            .find_one(doc! {"_id": claim_id})
            .await
            .map_err(map_err)
    }

    /// The record behind a claim, writing the claim's snapshot when its
    /// owner died before writing the record itself.
    async fn record_of_claim(&self, claim: &Document) -> Result<PaymentRecord, StoreError> {
        let pid = PaymentId::from_stored(
            claim
                .get_str("payment_id")
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        );
        if let Some((_, r)) = self.get(&pid).await? {
            return Ok(r);
        }
        let snapshot = claim
            .get_document("record")
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        match self
            .partition(Partition::Realtime)
            .insert_one(snapshot.clone())
            .await
        {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => {}
            Err(e) => return Err(map_err(e)),
        }
        match self.get(&pid).await? {
            Some((_, r)) => Ok(r),
            None => Err(StoreError::Corrupt(format!("claim {pid} has no record"))),
        }
    }

    fn transition_update(t: &Transition) -> Option<(Document, Document)> {
        let now = paygate_core::time::now_ms();
        Some(match t {
            Transition::MarkPaid { approved_at } => (
                doc! {"is_paid": false, "card_status": {"$in": ["PENDING", "UNKNOWN"]}},
                doc! {"$set": {"is_paid": true, "card_status": "DONE", "approved_at": approved_at, "failure_code": Bson::Null, "updated_at": now}},
            ),
            Transition::MarkAborted {
                failure_code,
                last_error,
            } => (
                doc! {"is_paid": false, "card_status": {"$in": ["PENDING", "UNKNOWN"]}},
                doc! {"$set": {"card_status": "ABORTED", "failure_code": failure_code, "last_error": last_error, "updated_at": now}},
            ),
            Transition::MarkUnknown { last_error } => (
                doc! {"card_status": "PENDING"},
                doc! {"$set": {"card_status": "UNKNOWN", "last_error": last_error, "updated_at": now}},
            ),
            Transition::MarkSaved => (
                doc! {"is_paid": true, "is_saved": false},
                doc! {"$set": {"is_saved": true, "last_error": Bson::Null, "updated_at": now}, "$inc": {"save_attempts": 1_i64}},
            ),
            Transition::SaveFailed { last_error } => (
                doc! {"is_paid": true, "is_saved": false},
                doc! {"$set": {"last_error": last_error, "updated_at": now}, "$inc": {"save_attempts": 1_i64}},
            ),
            Transition::BatchSaveFailed { last_error } => (
                doc! {"is_paid": true, "is_saved": false},
                doc! {"$set": {"last_error": last_error, "updated_at": now}, "$inc": {"batch_attempts": 1_i64}},
            ),
            Transition::Reopen { failure_code } => {
                if !paygate_core::payment::failure_codes::is_no_call(failure_code) {
                    return None;
                }
                (
                    doc! {"card_status": "ABORTED", "failure_code": failure_code},
                    doc! {"$set": {"card_status": "PENDING", "failure_code": Bson::Null, "updated_at": now}},
                )
            }
        })
    }

    async fn move_in_transaction(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, mongodb::error::Error> {
        let mut session = self.client.start_session().await?;
        session.start_transaction().await?;
        let id = payment_id.as_str();
        // The read and the delete carry the guard; a transition that
        // commits after the read makes the delete a write conflict, which
        // aborts the transaction.
        let Some(mut d) = self
            .partition(from)
            .find_one(guarded(id, to))
            .session(&mut session)
            .await?
        else {
            session.abort_transaction().await?;
            return Ok(false);
        };
        d.insert("updated_at", paygate_core::time::now_ms());
        self.partition(to)
            .replace_one(doc! {"_id": id}, d)
            .upsert(true)
            .session(&mut session)
            .await?;
        self.partition(from)
            .delete_one(guarded(id, to))
            .session(&mut session)
            .await?;
        session.commit_transaction().await?;
        Ok(true)
    }
}

#[async_trait::async_trait]
impl StateStore for MongoStateStore {
    async fn create(&self, record: &PaymentRecord) -> Result<CreateOutcome, StoreError> {
        let claims = self.coll(CLAIMS);
        let now = paygate_core::time::now_ms();
        let order_claim = order_claim_id(&record.merchant_id, record.order_id.as_str());
        let snapshot = record_to_doc(record);
        let claim = doc! {"_id": &order_claim, "payment_id": record.payment_id.as_str(), "record": snapshot.clone(), "created_at": now};
        match claims.insert_one(claim).await {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => {
                // The order is taken; the key (if any) may name another payment.
                if let Some(key) = &record.idempotency_key {
                    if let Some(c) = self
                        .claimed(&key_claim_id(&record.merchant_id, key))
                        .await?
                    {
                        return Ok(CreateOutcome::Exists(Box::new(
                            self.record_of_claim(&c).await?,
                        )));
                    }
                }
                let c = self
                    .claimed(&order_claim)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt("claim vanished".into()))?;
                return Ok(CreateOutcome::Exists(Box::new(
                    self.record_of_claim(&c).await?,
                )));
            }
            Err(e) => return Err(map_err(e)),
        }
        if let Some(key) = &record.idempotency_key {
            let key_claim = key_claim_id(&record.merchant_id, key);
            let claim = doc! {"_id": &key_claim, "payment_id": record.payment_id.as_str(), "record": snapshot.clone(), "created_at": now};
            match claims.insert_one(claim).await {
                Ok(_) => {}
                Err(e) if is_duplicate(&e) => {
                    // The key belongs to another order: give our order claim back.
                    claims
                        .delete_one(
                            doc! {"_id": &order_claim, "payment_id": record.payment_id.as_str()},
                        )
                        .await
                        .map_err(map_err)?;
                    let c = self
                        .claimed(&key_claim)
                        .await?
                        .ok_or_else(|| StoreError::Corrupt("claim vanished".into()))?;
                    return Ok(CreateOutcome::Exists(Box::new(
                        self.record_of_claim(&c).await?,
                    )));
                }
                Err(e) => return Err(map_err(e)),
            }
        }
        match self
            .partition(Partition::Realtime)
            .insert_one(snapshot)
            .await
        {
            Ok(_) => Ok(CreateOutcome::Created),
            // A concurrent request repaired our claim with this same snapshot.
            Err(e) if is_duplicate(&e) => Ok(CreateOutcome::Created),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn get(
        &self,
        payment_id: &PaymentId,
    ) -> Result<Option<(Partition, PaymentRecord)>, StoreError> {
        let mut copies = Vec::new();
        for p in Partition::ALL {
            if let Some(d) = self
                .partition(p)
                .find_one(doc! {"_id": payment_id.as_str()})
                .await
                .map_err(map_err)?
            {
                copies.push((p, record_from_doc(&d)?));
            }
        }
        Ok(crate::newest_copy(copies))
    }

    async fn get_by_order(
        &self,
        merchant_id: &MerchantId,
        order_id: &OrderId,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        match self
            .claimed(&order_claim_id(merchant_id, order_id.as_str()))
            .await?
        {
            Some(c) => self.record_of_claim(&c).await.map(Some),
            None => Ok(None),
        }
    }

    async fn transition(&self, payment_id: &PaymentId, t: &Transition) -> Result<bool, StoreError> {
        let Some((mut filter, update)) = Self::transition_update(t) else {
            return Ok(false);
        };
        filter.insert("_id", payment_id.as_str());
        let updated = self
            .partition(Partition::Realtime)
            .find_one_and_update(filter, update)
            .return_document(ReturnDocument::After)
            .await
            .map_err(map_err)?;
        Ok(updated.is_some())
    }

    async fn move_record(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        if self.transactions {
            return self
                .move_in_transaction(payment_id, from, to)
                .await
                .map_err(map_err);
        }
        // Without transactions: copy what may enter `to`, then delete the
        // source under the same guard. When a transition changed the source
        // in between, the delete finds nothing and the copy is taken back
        // (only our own copy: it still carries our move's stamp).
        let id = payment_id.as_str();
        let Some(mut d) = self
            .partition(from)
            .find_one(guarded(id, to))
            .await
            .map_err(map_err)?
        else {
            return Ok(false);
        };
        let stamp = paygate_core::time::now_ms();
        d.insert("updated_at", stamp);
        self.partition(to)
            .replace_one(doc! {"_id": id}, d)
            .upsert(true)
            .await
            .map_err(map_err)?;
        let deleted = self
            .partition(from)
            .delete_one(guarded(id, to))
            .await
            .map_err(map_err)?
            .deleted_count;
        if deleted == 1 {
            return Ok(true);
        }
        let still_there = self
            .partition(from)
            .find_one(doc! {"_id": id})
            .await
            .map_err(map_err)?
            .is_some();
        if still_there {
            self.partition(to)
                .delete_one(doc! {"_id": id, "updated_at": stamp})
                .await
                .map_err(map_err)?;
            return Ok(false);
        }
        // Another mover finished the same move.
        Ok(true)
    }

    async fn copy_to_partition(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        let id = payment_id.as_str();
        let Some(mut d) = self
            .partition(from)
            .find_one(doc! {"_id": id})
            .await
            .map_err(map_err)?
        else {
            return Ok(false);
        };
        d.insert("updated_at", paygate_core::time::now_ms());
        self.partition(to)
            .replace_one(doc! {"_id": id}, d)
            .upsert(true)
            .await
            .map_err(map_err)?;
        Ok(true)
    }

    fn scan(
        &self,
        partition: Partition,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        stream_records(
            self.partition(partition),
            doc! {},
            doc! {"_id": 1},
            batch_size,
        )
    }

    async fn find_by_order_ids(
        &self,
        order_ids: &[String],
    ) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        let mut copies = Vec::new();
        if order_ids.is_empty() {
            return Ok(copies);
        }
        for p in Partition::ALL {
            let mut cursor = self
                .partition(p)
                .find(doc! {"order_id": {"$in": order_ids.to_vec()}})
                .await
                .map_err(map_err)?;
            while let Some(d) = cursor.try_next().await.map_err(map_err)? {
                copies.push((p, record_from_doc(&d)?));
            }
        }
        Ok(crate::newest_copies(copies))
    }

    fn scan_created(
        &self,
        partition: Partition,
        from_ms: i64,
        to_ms: i64,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        stream_records(
            self.partition(partition),
            doc! {"created_at": {"$gte": from_ms, "$lt": to_ms}},
            doc! {"created_at": 1, "_id": 1},
            batch_size,
        )
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .run_command(doc! {"ping": 1})
            .await
            .map(|_| ())
            .map_err(map_err)
    }
}
