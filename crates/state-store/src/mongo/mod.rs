//! [`MongoStateStore`]: the realtime state in MongoDB, as the original design
//! kept it (DESIGN.md §3), on the official `mongodb` driver (3.x).
//!
//! - Collections `realtime_payments`, `completed_payments`, `unpaid_payments`
//!   with `_id = payment_id`, and `payment_claims` for the permanent
//!   `(merchant, orderId)` / `(merchant, Idempotency-Key)` claims and the
//!   `(card account, orderId)` / `(card account, paymentKey)` claims.
//! - A unique index on `(merchant_id, order_id)` in each partition.
//! - Every flag transition is one conditional `find_one_and_update` whose
//!   filter is the expected current state, so two writers never lose each
//!   other's update and a repeated transition is a no-op.
//! - Moves upsert the target with the same `_id` and then delete the source,
//!   inside a multi-document transaction when the deployment is a replica set
//!   or a sharded cluster; either way a rerun after a crash is harmless.
//! - Scans stream a cursor in `_id` order with a batch size.
//! - Cancels (refunds) live in `payment_cancels` (module `cancels`).
//! - Writes use write concern `majority` with journaling by default.
//!
//! Creating a record without a transaction (the same on every deployment):
//! the order claim `order:<merchant>:<orderId>` is inserted first, carrying
//! a snapshot of the new record and a fresh `token`, *tentative*
//! (`final: false`); then the secondary claims, each naming its order claim
//! and token: `idem:<merchant>:<key>` (when there is an Idempotency-Key),
//! `acct:<card account>:order:<orderId>` and
//! `acct:<card account>:key:<paymentKey>` (issue 15); then the order claim is
//! made *final* by an update conditional on its token and `final: false`;
//! then the record. Unique `_id`s make each claim a single-document
//! insert that a duplicate key refuses (the driver's documented E11000
//! error, never read as success). The rules that keep a record and its
//! claims together without a transaction:
//!
//! - a secondary claim holds only while its order claim exists under the
//!   same token; a claim of a given-back order is stale and the next
//!   creator that meets it removes it;
//! - a tentative order claim is given back by a delete conditional on
//!   `final: false` and its token, then its secondaries: by its creator when
//!   a secondary is held by another payment, or by a reader that waited
//!   [`CLAIM_WAIT`] in vain (the creator is gone or slow; it has made no
//!   card call, which needs `Created`). The creator's finalizing update and
//!   that delete are single-document operations on the same document:
//!   exactly one applies, so a record is only ever written under a final
//!   order claim, whose secondaries were all taken first and are never
//!   removed;
//! - a final order claim without its record (the creator died after
//!   finalizing) gets its snapshot written by the next reader.
//!
//! A duplicate key on the creator's own insert of the record (a reader that
//! waited in vain wrote it, or another payment holds the order) never means
//! `Created`: the creator answers `Exists` with the record that holds the
//! claim, and no card call is made under its request.
//!
//! Reads of one payment look in realtime, completed, unpaid in turn, which
//! is not a snapshot: a move from unpaid (or completed) back to realtime,
//! copied to realtime just after the realtime read and deleted from unpaid
//! just before the unpaid read, would be missed. `get` therefore reads a
//! miss again in the reverse order (unpaid, completed, realtime), and
//! `find_by_order_ids` always reads in both orders (one orderId may belong
//! to several merchants, so a hit does not show that nothing was missed;
//! the copies are merged by [`crate::newest_copies`]): a move is a
//! copy into the target followed by a delete from the source (or one
//! transaction), so one of the two orders reads the target after the copy
//! whenever it reads the source after the delete. Any single move
//! overlapping the two passes is found; a miss needs two moves of the same
//! record within one read (issue 13, point 8).
//!
//! Moves on a replica set run in a transaction retried as the driver
//! documents: the whole transaction again on a `TransientTransactionError`,
//! the commit again on an `UnknownTransactionCommitResult`, each at most
//! [`TXN_ATTEMPTS`] times with a short backoff; past that the move fails as
//! [`StoreError::Unavailable`] (a rerun finishes it).

mod cancels;
mod events;
pub mod inventory;

use std::time::{Duration, Instant};

use futures_util::{stream::BoxStream, StreamExt, TryStreamExt};
use mongodb::{
    bson::{doc, Bson, Document},
    error::{
        ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT,
    },
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

/// How long a reader waits for the creator of a claim to write its record
/// before it finalizes the claim and writes the snapshot itself. A creator
/// takes a few round trips; the saga settles a `PENDING` payment on access
/// only after 5 s, so a record written by a reader is never settled before
/// its creator could have written it.
pub const CLAIM_WAIT: Duration = Duration::from_secs(2);

/// Pause between two looks at a claim whose record is not written yet.
const CLAIM_POLL: Duration = Duration::from_millis(10);

/// Tries of a create that found a claim given back under it.
const CREATE_ATTEMPTS: usize = 5;

/// Tries of a move transaction (and of its commit) on transient errors.
pub const TXN_ATTEMPTS: u32 = 5;

/// The order of the second read of a payment across the partitions (see the
/// module's doc): targets of moves back to realtime first.
const REVERSE: [Partition; 3] = [Partition::Unpaid, Partition::Completed, Partition::Realtime];

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
    /// Stamps what this process writes and measures a claim's age.
    clock: paygate_core::Clock,
}

pub(crate) fn map_err(e: mongodb::error::Error) -> StoreError {
    // A transient transaction error or an unknown commit result left over
    // after the bounded retries: nothing certain was refused, a rerun may
    // well pass.
    if e.contains_label(TRANSIENT_TRANSACTION_ERROR)
        || e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
    {
        return StoreError::Unavailable(e.to_string());
    }
    match *e.kind {
        ErrorKind::Write(_)
        | ErrorKind::Command(_)
        | ErrorKind::InsertMany(_)
        | ErrorKind::BulkWrite(_) => StoreError::Rejected(e.to_string()),
        ErrorKind::BsonDeserialization(_) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

pub(crate) fn is_duplicate(e: &mongodb::error::Error) -> bool {
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
        "version": r.version,
    }
}

/// The filter that matches a document at `version`; a document written
/// before versions existed has none and reads as version 0 (a missing
/// field matches `null`).
pub(crate) fn version_is(version: i64) -> Bson {
    if version == 0 {
        Bson::Document(doc! {"$in": [0_i64, Bson::Null]})
    } else {
        Bson::Int64(version)
    }
}

/// The stored version of a document (0 when it has none).
pub(crate) fn version_of(d: &Document) -> i64 {
    match d.get("version") {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        _ => 0,
    }
}

/// `d` as the copy a move writes: one version on, stamped `now`.
fn moved_copy(mut d: Document, now: i64) -> Document {
    let next = version_of(&d) + 1;
    d.insert("updated_at", now);
    d.insert("version", next);
    d
}

/// The filter of a guarded move of `id` into `to` (see
/// [`crate::may_enter`]).
fn guarded(id: &str, to: Partition) -> Document {
    let mut filter = crate::rules::mongo::filter::<PaymentRecord>(&crate::entry_guard(to));
    filter.insert("_id", id);
    filter
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
        version: version_of(d),
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

/// A secondary claim: taken after the order claim, under its token.
#[derive(Clone, Copy, Debug)]
enum Secondary {
    /// `(merchant, Idempotency-Key)`.
    IdempotencyKey,
    /// `(card account, orderId)`.
    AccountOrder,
    /// `(card account, paymentKey)`.
    AccountPaymentKey,
}

/// The secondary claims of a record, in the order they are taken (the
/// merchant's own claim first, so a replay stays a replay).
fn secondary_claims(record: &PaymentRecord) -> Vec<(String, Secondary)> {
    let account = crate::DEFAULT_CARD_ACCOUNT;
    let mut out = Vec::with_capacity(3);
    if let Some(key) = &record.idempotency_key {
        out.push((
            key_claim_id(&record.merchant_id, key),
            Secondary::IdempotencyKey,
        ));
    }
    out.push((
        format!("acct:{account}:order:{}", record.order_id.as_str()),
        Secondary::AccountOrder,
    ));
    out.push((
        format!("acct:{account}:key:{}", record.payment_key),
        Secondary::AccountPaymentKey,
    ));
    out
}

/// A claim document: `_id`, the payment it names, the snapshot of that
/// payment's first record, when it was taken, and whether it is final (a
/// claim written before `final` existed is final).
fn claim_doc(
    id: &str,
    record: &PaymentRecord,
    snapshot: &Document,
    final_: bool,
    now: i64,
) -> Document {
    doc! {
        "_id": id,
        "payment_id": record.payment_id.as_str(),
        "record": snapshot.clone(),
        "created_at": now,
        "final": final_,
    }
}

fn claim_payment_id(claim: &Document) -> Result<PaymentId, StoreError> {
    claim
        .get_str("payment_id")
        .map(PaymentId::from_stored)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn claim_is_final(claim: &Document) -> bool {
    claim.get_bool("final").unwrap_or(true)
}

/// The claim's age at `now` (epoch ms), in ms (`i64::MAX` when unreadable).
fn claim_age_ms(claim: &Document, now: i64) -> i64 {
    let created = match claim.get("created_at") {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        _ => return i64::MAX,
    };
    now.saturating_sub(created)
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
            clock: paygate_core::Clock::system(),
        };
        store.ensure_indexes().await?;
        Ok(store)
    }

    /// The same store stamping by `clock` instead of the process clock.
    pub fn with_clock(mut self, clock: paygate_core::Clock) -> Self {
        self.clock = clock;
        self
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
        // A payment's cancels, read in `n` order by every claim.
        let index = IndexModel::builder()
            .keys(doc! {"payment_id": 1, "n": 1})
            .options(IndexOptions::builder().name("payment_n".to_owned()).build())
            .build();
        self.coll(cancels::CANCELS)
            .create_index(index)
            .await
            .map_err(map_err)?;
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

    /// The record behind an order (primary) claim; `None` when the claim
    /// was given back meanwhile (the caller starts over). While the record
    /// is not written and the claim is young, waits for its creator (up to
    /// [`CLAIM_WAIT`]). Then a *final* claim's snapshot is written, as its
    /// creator would have (every secondary claim was taken before it became
    /// final); a claim still *tentative* is rolled back ([`Self::give_back`]):
    /// its creator is gone or slow and has made no card call under it.
    async fn record_of_claim(&self, claim: Document) -> Result<Option<PaymentRecord>, StoreError> {
        let pid = claim_payment_id(&claim)?;
        let claim_id = claim
            .get_str("_id")
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
            .to_owned();
        let started = Instant::now();
        let mut claim = claim;
        loop {
            if let Some((_, r)) = self.get(&pid).await? {
                return Ok(Some(r));
            }
            let young = claim_age_ms(&claim, self.clock.now_ms()) < CLAIM_WAIT.as_millis() as i64
                && started.elapsed() < CLAIM_WAIT;
            if !young {
                break;
            }
            tokio_sleep(CLAIM_POLL).await;
            match self.claimed(&claim_id).await? {
                Some(c) if claim_payment_id(&c)? == pid => claim = c,
                _ => return Ok(None),
            }
        }
        if !claim_is_final(&claim) {
            // The creator is gone or slow: give its claims back; it will
            // see that on its own finalizing update and not call the card.
            self.give_back(&claim).await?;
            return Ok(None);
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
            Some((_, r)) => Ok(Some(r)),
            None => Err(StoreError::Corrupt(format!(
                "claim {claim_id} names {pid}, which has no record and cannot be written"
            ))),
        }
    }

    /// Gives a tentative order claim back, with the secondary claims taken
    /// under its token: the order claim first, by a delete conditional on
    /// `final: false` and its token (so it cannot race the creator's
    /// finalizing update: exactly one applies), then, only if that applied,
    /// the secondaries of that token. Returns whether the order claim was
    /// given back by this call. A crash between the two deletes leaves
    /// secondaries whose order claim is gone: [`Self::secondary_is_live`]
    /// treats them as stale and removes them.
    async fn give_back(&self, primary: &Document) -> Result<bool, StoreError> {
        let claims = self.coll(CLAIMS);
        let id = primary
            .get_str("_id")
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let pid = claim_payment_id(primary)?;
        let mut filter = doc! {"_id": id, "payment_id": pid.as_str(), "final": false};
        if let Some(token) = primary.get("token") {
            filter.insert("token", token.clone());
        }
        let deleted = claims.delete_one(filter).await.map_err(map_err)?;
        if deleted.deleted_count == 0 {
            return Ok(false);
        }
        let record = record_from_doc(
            primary
                .get_document("record")
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        )?;
        if let Some(token) = primary.get("token") {
            for (secondary, _) in secondary_claims(&record) {
                claims
                    .delete_one(
                        doc! {"_id": secondary, "payment_id": pid.as_str(), "token": token.clone()},
                    )
                    .await
                    .map_err(map_err)?;
            }
        }
        Ok(true)
    }

    /// Whether a secondary claim (idempotency key, card-account orderId or
    /// paymentKey) holds: its order claim exists under the same token and
    /// is final, or is tentative and its creator finishes it within
    /// [`CLAIM_WAIT`]. A claim of the old layout (no `primary`) holds. A
    /// stale one (its order claim given back, or given back by this wait)
    /// is removed, and `false` is returned (the caller tries again).
    async fn secondary_is_live(&self, secondary: &Document) -> Result<bool, StoreError> {
        let Ok(primary_id) = secondary.get_str("primary") else {
            return Ok(true);
        };
        let pid = claim_payment_id(secondary)?;
        let token = secondary.get("token").cloned().unwrap_or(Bson::Null);
        let started = Instant::now();
        loop {
            let primary = self.claimed(primary_id).await?;
            let same = primary.as_ref().is_some_and(|p| {
                claim_payment_id(p).ok().as_ref() == Some(&pid)
                    && p.get("token").cloned().unwrap_or(Bson::Null) == token
            });
            match primary {
                Some(p) if same => {
                    if claim_is_final(&p) {
                        return Ok(true);
                    }
                    let young = claim_age_ms(&p, self.clock.now_ms())
                        < CLAIM_WAIT.as_millis() as i64
                        && started.elapsed() < CLAIM_WAIT;
                    if young {
                        tokio_sleep(CLAIM_POLL).await;
                        continue;
                    }
                    if !self.give_back(&p).await? {
                        continue; // made final or given back meanwhile: look again
                    }
                }
                _ => {}
            }
            // Stale: its order claim is gone (or belongs to another try).
            let id = secondary
                .get_str("_id")
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            self.coll(CLAIMS)
                .delete_one(doc! {"_id": id, "payment_id": pid.as_str(), "token": token})
                .await
                .map_err(map_err)?;
            return Ok(false);
        }
    }

    /// The record of the payment that holds a secondary claim; `None` when
    /// the claim turned out stale or given back (try again).
    async fn record_of_secondary(
        &self,
        secondary: Document,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        let Ok(primary_id) = secondary.get_str("primary").map(str::to_owned) else {
            // The old layout: a final claim carrying its own snapshot.
            return self.record_of_claim(secondary).await;
        };
        if !self.secondary_is_live(&secondary).await? {
            return Ok(None);
        }
        match self.claimed(&primary_id).await? {
            Some(p) if claim_payment_id(&p)? == claim_payment_id(&secondary)? => {
                self.record_of_claim(p).await
            }
            _ => Ok(None),
        }
    }

    /// The record that holds the order's or the key's claim (the key first:
    /// it names its payment even for another order); `None` when neither is
    /// claimed any more.
    async fn existing(&self, record: &PaymentRecord) -> Result<Option<PaymentRecord>, StoreError> {
        if let Some(key) = &record.idempotency_key {
            if let Some(c) = self
                .claimed(&key_claim_id(&record.merchant_id, key))
                .await?
            {
                if let Some(r) = self.record_of_secondary(c).await? {
                    return Ok(Some(r));
                }
            }
        }
        match self
            .claimed(&order_claim_id(
                &record.merchant_id,
                record.order_id.as_str(),
            ))
            .await?
        {
            Some(c) => self.record_of_claim(c).await,
            None => Ok(None),
        }
    }

    /// One try of [`StateStore::create`]; `None` when a claim it met was
    /// given back under it (try again). See the module's doc for the order
    /// of the writes.
    async fn try_create(
        &self,
        record: &PaymentRecord,
    ) -> Result<Option<CreateOutcome>, StoreError> {
        let claims = self.coll(CLAIMS);
        let pid = record.payment_id.as_str();
        let order_claim = order_claim_id(&record.merchant_id, record.order_id.as_str());
        let snapshot = record_to_doc(record);
        let token = Bson::ObjectId(mongodb::bson::oid::ObjectId::new());
        let exists = |r: Option<PaymentRecord>| r.map(|r| CreateOutcome::Exists(Box::new(r)));
        // 1. The order: tentative until every secondary claim is taken.
        let mut primary = claim_doc(&order_claim, record, &snapshot, false, self.clock.now_ms());
        primary.insert("token", token.clone());
        match claims.insert_one(primary.clone()).await {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => return Ok(exists(self.existing(record).await?)),
            Err(e) => return Err(map_err(e)),
        }
        // 2. The secondaries: the merchant's key, the account's orderId and paymentKey.
        for (secondary, kind) in secondary_claims(record) {
            let doc = doc! {
                "_id": &secondary,
                "payment_id": pid,
                "primary": &order_claim,
                "token": token.clone(),
                "created_at": self.clock.now_ms(),
            };
            let holder = match claims.insert_one(doc).await {
                Ok(_) => continue,
                Err(e) if is_duplicate(&e) => self.claimed(&secondary).await?,
                Err(e) => return Err(map_err(e)),
            };
            let live_holder = match holder {
                // Left by an earlier try of this very payment: take it over.
                Some(h) if claim_payment_id(&h)?.as_str() == pid => {
                    let taken = claims
                        .update_one(
                            doc! {"_id": &secondary, "payment_id": pid},
                            doc! {"$set": {"token": token.clone(), "primary": &order_claim}},
                        )
                        .await
                        .map_err(map_err)?;
                    if taken.matched_count == 1 {
                        continue;
                    }
                    None
                }
                Some(h) => self.secondary_is_live(&h).await?.then_some(h),
                None => None,
            };
            self.give_back(&primary).await?;
            let Some(holder) = live_holder else {
                return Ok(None);
            };
            return match kind {
                Secondary::IdempotencyKey => Ok(exists(self.record_of_secondary(holder).await?)),
                Secondary::AccountOrder => Ok(Some(CreateOutcome::OrderIdInUse)),
                Secondary::AccountPaymentKey => Ok(Some(CreateOutcome::PaymentKeyReused)),
            };
        }
        // 3. Final: from here the claims are permanent.
        let made_final = claims
            .update_one(
                doc! {"_id": &order_claim, "payment_id": pid, "token": token.clone(), "final": false},
                doc! {"$set": {"final": true}},
            )
            .await
            .map_err(map_err)?;
        if made_final.matched_count == 0 {
            // A reader that waited in vain gave the order back (and its
            // secondaries, or a later reader removes them as stale).
            return Ok(None);
        }
        // 4. The record.
        match self
            .partition(Partition::Realtime)
            .insert_one(snapshot)
            .await
        {
            Ok(_) => Ok(Some(CreateOutcome::Created)),
            // Never `Created`: a reader wrote this claim's record after
            // waiting for us in vain (it answered with it, so this request
            // must not start a card call of its own), or another payment
            // holds the order in realtime. Answer with the claim's record.
            Err(e) if is_duplicate(&e) => match self.claimed(&order_claim).await? {
                Some(c) => Ok(exists(self.record_of_claim(c).await?)),
                None => Ok(None),
            },
            Err(e) => Err(map_err(e)),
        }
    }

    /// Reads `payment_id` in each of `order` in turn.
    async fn read_copies(
        &self,
        payment_id: &PaymentId,
        order: [Partition; 3],
    ) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        let mut copies = Vec::new();
        for p in order {
            if let Some(d) = self
                .partition(p)
                .find_one(doc! {"_id": payment_id.as_str()})
                .await
                .map_err(map_err)?
            {
                copies.push((p, record_from_doc(&d)?));
            }
        }
        Ok(copies)
    }

    /// The records of `order_ids` in each of `order` in turn.
    async fn find_orders(
        &self,
        order_ids: &[String],
        order: [Partition; 3],
    ) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        let mut copies = Vec::new();
        for p in order {
            let mut cursor = self
                .partition(p)
                .find(doc! {"order_id": {"$in": order_ids.to_vec()}})
                .await
                .map_err(map_err)?;
            while let Some(d) = cursor.try_next().await.map_err(map_err)? {
                copies.push((p, record_from_doc(&d)?));
            }
        }
        Ok(copies)
    }

    /// Writes a move's copy into `to` unless `to` already holds a newer
    /// copy of the record (a higher version): a mover that read the source
    /// and stalled while another mover moved the same version and the
    /// record moved on (a retry reopened it and it was paid since) must not
    /// put the old state back over the new, which would lose an approval
    /// and the event it left. `Ok(false)` when a newer copy is there (the
    /// filter misses and the upsert's insert meets the `_id`).
    async fn upsert_copy(
        &self,
        to: Partition,
        id: &str,
        copy: Document,
    ) -> Result<bool, StoreError> {
        let next = version_of(&copy);
        let filter = doc! {
            "_id": id,
            "$or": [{"version": {"$lte": next}}, {"version": {"$exists": false}}],
        };
        match self
            .partition(to)
            .replace_one(filter, copy)
            .upsert(true)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate(&e) => Ok(false),
            Err(e) => Err(map_err(e)),
        }
    }

    /// A transition that leaves an event: read, apply the rule in Rust,
    /// and write the effect and the event in one update guarded on the
    /// version read (module `events`).
    async fn transition_with_event(
        &self,
        payment_id: &PaymentId,
        t: &Transition,
    ) -> Result<bool, StoreError> {
        let Some(rule) = t.rule() else {
            return Ok(false);
        };
        for _ in 0..events::CAS_ATTEMPTS {
            let Some(mut r) = self.realtime_record(payment_id).await? else {
                return Ok(false);
            };
            let seen = r.version;
            let now = self.clock.now_ms();
            if !rule.apply_if(&mut r, now) {
                return Ok(false);
            }
            let event = crate::payment_event(t, &r, now);
            let (mut filter, update) =
                events::versioned_update::<PaymentRecord>(&rule, seen, event.as_ref(), now);
            filter.insert("_id", payment_id.as_str());
            let matched = self
                .partition(Partition::Realtime)
                .update_one(filter, update)
                .await
                .map_err(map_err)?
                .matched_count;
            if matched == 1 {
                return Ok(true);
            }
        }
        Err(StoreError::Unavailable(format!(
            "transition of {payment_id} lost to other writers {} times",
            events::CAS_ATTEMPTS
        )))
    }

    /// The guard (filter, without `_id`) and the update of a transition,
    /// compiled from its rule; every update increments `version`.
    fn transition_update(&self, t: &Transition) -> Option<(Document, Document)> {
        let now = self.clock.now_ms();
        Some(t.rule()?.to_mongo::<PaymentRecord>(now))
    }

    /// A guarded move in one transaction, retried as the driver documents:
    /// the whole transaction on a `TransientTransactionError` label, the
    /// commit alone on an `UnknownTransactionCommitResult` label, each at
    /// most [`TXN_ATTEMPTS`] times with a short growing backoff.
    async fn move_in_transaction(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, mongodb::error::Error> {
        let mut session = self.client.start_session().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            session.start_transaction().await?;
            let moved = match self.move_body(&mut session, payment_id, from, to).await {
                Ok(moved) => moved,
                Err(e) => {
                    // The server may have aborted it already; the abort is
                    // best effort.
                    let _ = session.abort_transaction().await;
                    if e.contains_label(TRANSIENT_TRANSACTION_ERROR) && attempt < TXN_ATTEMPTS {
                        tokio_sleep(txn_backoff(attempt)).await;
                        continue;
                    }
                    return Err(e);
                }
            };
            if !moved {
                session.abort_transaction().await?;
                return Ok(false);
            }
            match commit_with_retry(&mut session).await {
                Ok(()) => return Ok(true),
                Err(e)
                    if e.contains_label(TRANSIENT_TRANSACTION_ERROR) && attempt < TXN_ATTEMPTS =>
                {
                    tokio_sleep(txn_backoff(attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The operations of one move transaction; `Ok(false)` when the guard
    /// does not hold (nothing written).
    async fn move_body(
        &self,
        session: &mut mongodb::ClientSession,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, mongodb::error::Error> {
        let id = payment_id.as_str();
        // The read and the delete carry the guard; a transition that
        // commits after the read makes the delete a write conflict, which
        // aborts the transaction (and is retried: the retry reads again).
        let Some(d) = self
            .partition(from)
            .find_one(guarded(id, to))
            .session(&mut *session)
            .await?
        else {
            return Ok(false);
        };
        let mut seen = guarded(id, to);
        seen.insert("version", version_is(version_of(&d)));
        self.partition(to)
            .replace_one(doc! {"_id": id}, moved_copy(d, self.clock.now_ms()))
            .upsert(true)
            .session(&mut *session)
            .await?;
        let deleted = self
            .partition(from)
            .delete_one(seen)
            .session(&mut *session)
            .await?;
        Ok(deleted.deleted_count == 1)
    }
}

/// Commits, retrying the commit alone while its result is unknown (at most
/// [`TXN_ATTEMPTS`] times): committing again is safe, the server applies a
/// transaction once.
async fn commit_with_retry(
    session: &mut mongodb::ClientSession,
) -> Result<(), mongodb::error::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match session.commit_transaction().await {
            Err(e)
                if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                    && attempt < TXN_ATTEMPTS =>
            {
                tokio_sleep(txn_backoff(attempt)).await;
            }
            other => return other,
        }
    }
}

/// 20 ms, 40 ms, 80 ms, 160 ms after the 1st, 2nd, 3rd, 4th try of a transaction (or a commit).
fn txn_backoff(attempt: u32) -> Duration {
    Duration::from_millis(10u64 << attempt.min(6))
}

async fn tokio_sleep(d: Duration) {
    tokio::time::sleep(d).await;
}

#[async_trait::async_trait]
impl StateStore for MongoStateStore {
    async fn create(&self, record: &PaymentRecord) -> Result<CreateOutcome, StoreError> {
        for _ in 0..CREATE_ATTEMPTS {
            if let Some(outcome) = self.try_create(record).await? {
                return Ok(outcome);
            }
        }
        Err(StoreError::Unavailable(format!(
            "the claims of order {} kept changing under {} tries; nothing was written",
            record.order_id, CREATE_ATTEMPTS
        )))
    }

    async fn get(
        &self,
        payment_id: &PaymentId,
    ) -> Result<Option<(Partition, PaymentRecord)>, StoreError> {
        let copies = self.read_copies(payment_id, Partition::ALL).await?;
        if !copies.is_empty() {
            return Ok(crate::newest_copy(copies));
        }
        // A miss may be a record in motion: read again, targets first.
        Ok(crate::newest_copy(
            self.read_copies(payment_id, REVERSE).await?,
        ))
    }

    async fn get_by_order(
        &self,
        merchant_id: &MerchantId,
        order_id: &OrderId,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        let claim_id = order_claim_id(merchant_id, order_id.as_str());
        // A claim given back while we waited for its record: look again
        // (the order may have been claimed anew).
        for _ in 0..CREATE_ATTEMPTS {
            match self.claimed(&claim_id).await? {
                Some(c) => {
                    if let Some(r) = self.record_of_claim(c).await? {
                        return Ok(Some(r));
                    }
                }
                None => return Ok(None),
            }
        }
        Ok(None)
    }

    async fn transition(&self, payment_id: &PaymentId, t: &Transition) -> Result<bool, StoreError> {
        if t.event_type().is_some() {
            return self.transition_with_event(payment_id, t).await;
        }
        let Some((mut filter, update)) = self.transition_update(t) else {
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

    async fn events_of(&self, payment_id: &PaymentId) -> Result<Vec<crate::Event>, StoreError> {
        self.outbox_events_of(payment_id).await
    }

    async fn pending_events(&self, limit: u32) -> Result<Vec<crate::Event>, StoreError> {
        self.outbox_pending(limit).await
    }

    async fn forget_events(&self, events: &[crate::Event]) -> Result<(), StoreError> {
        self.outbox_forget(events).await
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
        // source guarded on the version that was copied. When anything
        // changed the source in between (a transition, or a merchant's
        // retry that moved a fresh copy back while this mover stalled),
        // the delete finds nothing and the copy is taken back (only our
        // own copy: the version it was written with).
        let id = payment_id.as_str();
        let Some(d) = self
            .partition(from)
            .find_one(guarded(id, to))
            .await
            .map_err(map_err)?
        else {
            return Ok(false);
        };
        let seen_version = version_of(&d);
        if !self
            .upsert_copy(to, id, moved_copy(d, self.clock.now_ms()))
            .await?
        {
            // The target already holds a newer copy: another mover moved
            // this version and the record changed since; ours is stale.
            return Ok(false);
        }
        self.finish_move(payment_id, from, to, seen_version).await
    }

    async fn finish_move(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
        seen_version: i64,
    ) -> Result<bool, StoreError> {
        let id = payment_id.as_str();
        let mut seen = guarded(id, to);
        seen.insert("version", version_is(seen_version));
        let deleted = self
            .partition(from)
            .delete_one(seen)
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
                .delete_one(doc! {"_id": id, "version": seen_version + 1})
                .await
                .map_err(map_err)?;
            return Ok(false);
        }
        // Another mover finished the same move.
        Ok(true)
    }

    async fn move_settled(&self, cutoff_ms: i64, limit: u32) -> Result<u64, StoreError> {
        // Bulk writes, copy before delete (as `move_record` without a
        // transaction): picked in one query, copied in one unordered
        // `insertMany`, deleted in one `deleteMany` guarded on each
        // document exactly as read (its `_id` and `version`), so a
        // record a transition changed since the pick stays in realtime and
        // our copy of it is taken back. A crash between the copy and the
        // delete leaves two copies; readers believe the newer (ours), and
        // a rerun replaces it and deletes the source.
        let from = self.partition(Partition::Realtime);
        let to = self.partition(Partition::Completed);
        let picked: Vec<Document> = from
            .find(doc! {"is_paid": true, "is_saved": true, "updated_at": {"$lte": cutoff_ms}})
            .sort(doc! {"_id": 1})
            .limit(i64::from(limit))
            .await
            .map_err(map_err)?
            .try_collect()
            .await
            .map_err(map_err)?;
        if picked.is_empty() {
            return Ok(0);
        }
        let stamp = self.clock.now_ms();
        let mut seen = Vec::with_capacity(picked.len());
        let mut ids = Vec::with_capacity(picked.len());
        let mut copies = Vec::with_capacity(picked.len());
        let mut ours = Vec::with_capacity(picked.len());
        for d in picked {
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            let version = version_of(&d);
            seen.push(doc! {"_id": id.clone(), "version": version_is(version)});
            ours.push(doc! {"_id": id.clone(), "version": version + 1});
            ids.push(id);
            copies.push(moved_copy(d, stamp));
        }
        if let Err(e) = to.insert_many(&copies).ordered(false).await {
            // Copies left by an interrupted move collide on `_id`: those
            // are replaced one by one; any other failure is the caller's.
            let duplicates = match e.kind.as_ref() {
                ErrorKind::InsertMany(m) if m.write_concern_error.is_none() => m
                    .write_errors
                    .as_ref()
                    .filter(|w| w.iter().all(|w| w.code == DUPLICATE_KEY))
                    .map(|w| w.iter().map(|w| w.index).collect::<Vec<_>>()),
                _ => None,
            };
            let Some(duplicates) = duplicates else {
                return Err(map_err(e));
            };
            for i in duplicates {
                let Some(d) = copies.get(i) else { continue };
                to.replace_one(doc! {"_id": d.get("_id").cloned().unwrap_or(Bson::Null)}, d)
                    .upsert(true)
                    .await
                    .map_err(map_err)?;
            }
        }
        let deleted = from
            .delete_many(doc! {"$or": seen, "is_paid": true, "is_saved": true})
            .await
            .map_err(map_err)?
            .deleted_count;
        if deleted < ids.len() as u64 {
            let remaining: Vec<Bson> = from
                .find(doc! {"_id": {"$in": ids}})
                .projection(doc! {"_id": 1})
                .await
                .map_err(map_err)?
                .map_ok(|d| d.get("_id").cloned().unwrap_or(Bson::Null))
                .try_collect()
                .await
                .map_err(map_err)?;
            if !remaining.is_empty() {
                to.delete_many(doc! {"_id": {"$in": remaining}, "$or": ours})
                    .await
                    .map_err(map_err)?;
            }
        }
        Ok(deleted)
    }

    async fn copy_to_partition(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        let id = payment_id.as_str();
        let Some(d) = self
            .partition(from)
            .find_one(doc! {"_id": id})
            .await
            .map_err(map_err)?
        else {
            return Ok(false);
        };
        self.upsert_copy(to, id, moved_copy(d, self.clock.now_ms()))
            .await
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

    fn scan_stale(
        &self,
        updated_before_ms: i64,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        // The filter runs in the server: the run reads the stale records,
        // not the whole partition; compiled from the one stale predicate.
        stream_records(
            self.partition(Partition::Realtime),
            crate::rules::mongo::filter::<PaymentRecord>(&crate::stale_guard(updated_before_ms)),
            doc! {"_id": 1},
            batch_size,
        )
    }

    async fn find_by_order_ids(
        &self,
        order_ids: &[String],
    ) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        if order_ids.is_empty() {
            return Ok(Vec::new());
        }
        // Both orders, always (see the module's doc): an orderId may be
        // found for one merchant while another merchant's record of the
        // same orderId is in motion, so "found" cannot tell what to read
        // again. Two copies of one payment are merged by `newest_copies`.
        let mut copies = self.find_orders(order_ids, Partition::ALL).await?;
        copies.extend(self.find_orders(order_ids, REVERSE).await?);
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
