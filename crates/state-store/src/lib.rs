//! paygate-state-store: the realtime payment state records (DESIGN.md §3).
//!
//! [`StateStore`] is the one interface the gateway, the batch and the
//! reconciliation use. Every change of a record is a single conditional
//! update guarded by the state it expects ([`Transition`]), so two writers can
//! never lose each other's update and a transition applied twice is a no-op.
//!
//! Backends: [`SqlStateStore`] on SQLite or PostgreSQL ([`SqlDatabase`]);
//! `MongoStateStore` on MongoDB (feature `mongodb`, on by default);
//! `MemoryStateStore` in memory, for the deterministic simulation (feature
//! `memory`, also enabled by `testing`).
//! The cancels (refunds) of payments are part of every store
//! ([`CancelStore`], module [`cancels`]). Inventory and holds (I7) sit
//! beside it behind [`InventoryStore`], on the same backends (module
//! [`inventory`]).
//! The SQL database also holds the merchants ([`SqlMerchantStore`]) and the
//! request/response log (crate `paygate-api-log`).

// The entities, each with its rules: payment records, their cancels,
// inventory holds.
pub mod cancels;
pub mod events;
pub mod inventory;
pub mod payment;
pub mod rules;
// The backends, each with a module per entity (`mod.rs` the payments,
// then `cancels.rs` and `inventory.rs`).
#[cfg(feature = "memory")]
pub mod memory;
mod merchants;
#[cfg(feature = "mongodb")]
pub mod mongo;
pub mod sql;
#[cfg(feature = "testing")]
pub mod testing;

pub use cancels::{
    CancelClaim, CancelDraft, CancelRecord, CancelStatus, CancelStore, CancelTransition,
};
pub use events::{cancel_event, payment_event, Event, EventType};
pub use inventory::{
    BeginOutcome, Hold, HoldField, HoldItem, HoldState, HoldTransition, InventoryStore,
    SellOutcome, SetStock, StockLevel, TakeOutcome,
};
#[cfg(feature = "memory")]
pub use memory::inventory::MemoryInventoryStore;
#[cfg(feature = "memory")]
pub use memory::{Fault, FaultFn, MemoryStateStore, WriteKind};
pub use merchants::{Merchant, SqlMerchantStore};
#[cfg(feature = "mongodb")]
pub use mongo::inventory::MongoInventoryStore;
#[cfg(feature = "mongodb")]
pub use mongo::{MongoOptions, MongoStateStore};
pub use payment::{entry_guard, is_stale, may_enter, stale_guard, PaymentField, Transition};
pub use sql::inventory::SqlInventoryStore;
pub use sql::{LogRow, SchemaStep, SqlDatabase, SqlStateStore, SqliteDatabase};

use futures_util::{stream::BoxStream, TryStreamExt};
use paygate_core::{MerchantId, OrderId, Partition, PaymentId, PaymentRecord};

/// The copy of a record to believe when a move between partitions was
/// interrupted and left it in two: the one of the higher `version` (a move
/// writes its target copy one version on from the source it read, and any
/// later transition moves a copy further); on a tie, the one in
/// `realtime_payments` (transitions apply only there, so a tie is a
/// realtime record changed once while a stalled move's copy of its
/// earlier state sits elsewhere), else the later in the iteration. Never
/// by `updated_at`: that is the writer's clock, and a replica whose clock
/// runs fast would win over a later write.
pub fn newest_copy(
    copies: impl IntoIterator<Item = (Partition, PaymentRecord)>,
) -> Option<(Partition, PaymentRecord)> {
    copies.into_iter().fold(None, |best, copy| match best {
        Some(b) if !newer(&copy, &b) => Some(b),
        _ => Some(copy),
    })
}

/// Whether `a` is to be believed over `b` (see [`newest_copy`]).
fn newer(a: &(Partition, PaymentRecord), b: &(Partition, PaymentRecord)) -> bool {
    match a.1.version.cmp(&b.1.version) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => b.0 != Partition::Realtime,
    }
}

/// [`newest_copy`] for many records at once: one entry per `payment_id`,
/// the newest copy where an interrupted move left two.
pub fn newest_copies(
    copies: impl IntoIterator<Item = (Partition, PaymentRecord)>,
) -> Vec<(Partition, PaymentRecord)> {
    let mut by_id: std::collections::HashMap<String, (Partition, PaymentRecord)> =
        std::collections::HashMap::new();
    for copy in copies {
        match by_id.get(copy.1.payment_id.as_str()) {
            Some(kept) if !newer(&copy, kept) => {}
            _ => {
                by_id.insert(copy.1.payment_id.to_string(), copy);
            }
        }
    }
    by_id.into_values().collect()
}

/// What went wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (connection refused or lost, pool closed or
    /// exhausted). The caller answers 503; nothing was half-written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store refused the statement (constraint, permission, read-only).
    #[error("store refused the write: {0}")]
    Rejected(String),
    /// A stored row could not be read back.
    #[error("stored data could not be decoded: {0}")]
    Corrupt(String),
}

/// The card account every payment is claimed under: all merchants share the
/// one card API secret key of the configuration, so they share one account
/// at the card company, which keeps orderIds and paymentKeys unique per
/// account (DESIGN.md I2). Stored in every account-scoped claim
/// (`card_account_claims.card_account`, MongoDB claim ids `acct:<account>:...`),
/// so a configuration with several accounts later is a change of data, not
/// of schema (docs/DECISIONS.md, "Claims per card account").
pub const DEFAULT_CARD_ACCOUNT: &str = "default";

/// Result of [`StateStore::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The record was written and all its claims taken: `(merchant, orderId)`,
    /// `(merchant, Idempotency-Key)` when present, `(card account, orderId)`
    /// and `(card account, paymentKey)`.
    Created,
    /// The merchant's order or idempotency key was already claimed; here is
    /// the record that holds the claim (compare fingerprints before replaying).
    Exists(Box<PaymentRecord>),
    /// Another merchant on the same card account holds this orderId. Nothing
    /// was written; the holder is deliberately not returned (it belongs to
    /// another merchant).
    OrderIdInUse,
    /// The paymentKey is already claimed by another payment (another order
    /// of this merchant or of any merchant on the card account). Nothing was
    /// written; the holder is not returned.
    PaymentKeyReused,
}

/// The realtime state store.
#[async_trait::async_trait]
pub trait StateStore: CancelStore + Send + Sync + 'static {
    /// Writes a new `PENDING` record into `realtime_payments` and claims its
    /// `(merchant, orderId)`, when present `(merchant, idempotency key)`, and
    /// `(card account, orderId)` and `(card account, paymentKey)`
    /// ([`DEFAULT_CARD_ACCOUNT`]), atomically: the record is written with all
    /// its claims or not at all. The merchant's own claims are checked first
    /// ([`CreateOutcome::Exists`], so a replay stays a replay), then the
    /// account's orderId ([`CreateOutcome::OrderIdInUse`]), then the
    /// paymentKey ([`CreateOutcome::PaymentKeyReused`]).
    ///
    /// # Errors
    /// [`StoreError`]; on error nothing was written.
    async fn create(&self, record: &PaymentRecord) -> Result<CreateOutcome, StoreError>;

    /// Finds a record by id in any partition.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn get(
        &self,
        payment_id: &PaymentId,
    ) -> Result<Option<(Partition, PaymentRecord)>, StoreError>;

    /// Finds the record that claimed `(merchant, orderId)`.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn get_by_order(
        &self,
        merchant_id: &MerchantId,
        order_id: &OrderId,
    ) -> Result<Option<PaymentRecord>, StoreError>;

    /// Applies a guarded transition to a record in `realtime_payments`;
    /// `Ok(true)` when it applied, `Ok(false)` when the guard did not hold.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn transition(
        &self,
        payment_id: &PaymentId,
        transition: &Transition,
    ) -> Result<bool, StoreError>;

    /// Moves a record from one partition to another: writes it into `to`
    /// with the same `payment_id` (replacing a copy left by an interrupted
    /// move), then deletes it from `from`. Idempotent and crash-safe: rerun
    /// after a crash between the two steps, it leaves exactly one copy.
    /// Guarded: the record moves only when, at the moment of the move, it
    /// may enter `to` ([`may_enter`]); a concurrent transition either
    /// happens before the move (and the guard sees it) or finds the record
    /// gone from `from` (and reports that it did not apply).
    /// `Ok(false)` when the record is not in `from` (already moved) or the
    /// guard does not hold.
    ///
    /// # Errors
    /// [`StoreError`]; the record is then in `from`, or in both (a rerun
    /// finishes the move).
    async fn move_record(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError>;

    /// The batch's set-based move (issue 18): moves up to `limit` records of
    /// `realtime_payments` that are paid and saved and whose `updated_at`
    /// (epoch ms) is at or before `cutoff_ms` into `completed_payments`,
    /// lowest `payment_id` first, and returns how many moved. Each record
    /// moves under the guard of [`StateStore::move_record`] plus the
    /// cutoff, re-checked at the moment of the move: a record a transition
    /// changed since it was picked stays in realtime (the sweep's
    /// per-record pass sees it). A result below `limit` means no eligible
    /// record is left (or some were skipped as changed); callers loop
    /// while it equals `limit`. Crash-safe like `move_record`: SQL moves
    /// a chunk in one transaction; MongoDB copies before it deletes, and
    /// a rerun finishes an interrupted chunk.
    ///
    /// The default picks records with [`StateStore::scan`] and moves each
    /// with `move_record` (the in-memory store, whose injected faults act
    /// per record).
    ///
    /// # Errors
    /// [`StoreError`]; records moved before the error stay moved.
    async fn move_settled(&self, cutoff_ms: i64, limit: u32) -> Result<u64, StoreError> {
        let mut picked = Vec::new();
        let mut records = self.scan(Partition::Realtime, limit.max(1));
        while let Some(r) = records.try_next().await? {
            if r.is_paid && r.is_saved && r.updated_at <= cutoff_ms {
                picked.push(r.payment_id);
                if picked.len() >= limit as usize {
                    break;
                }
            }
        }
        drop(records);
        let mut moved = 0;
        for id in picked {
            if self
                .move_record(&id, Partition::Realtime, Partition::Completed)
                .await?
            {
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// The first step of [`StateStore::move_record`] alone: writes the
    /// record of `from` into `to` (replacing a copy left there; MongoDB,
    /// whose moves run without a transaction, never replaces a newer copy
    /// and answers `Ok(false)` then) and leaves the source.
    /// Exposed so the conformance suite can stage a move interrupted by a
    /// crash; the batch always calls `move_record`.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn copy_to_partition(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError>;

    /// The second step of [`StateStore::move_record`] alone, for a mover
    /// whose first step ([`StateStore::copy_to_partition`]) copied the
    /// source at `seen_version`: deletes the source only while it is still
    /// at that version (and may still enter `to`); otherwise, if the source
    /// is still there, takes back the copy that step wrote (the target at
    /// `seen_version + 1`, only if nothing changed it since). `Ok(true)`
    /// when the move is complete. Exposed so the conformance suite can
    /// stage a mover that stalled between its two steps while another
    /// actor moved the record on; MongoDB without transactions runs its
    /// moves as exactly these two steps. A store that stages no
    /// interrupted moves (the simulation's wrappers) refuses it.
    ///
    /// # Errors
    /// [`StoreError`]; [`StoreError::Rejected`] from a store that does not
    /// stage interrupted moves.
    async fn finish_move(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
        seen_version: i64,
    ) -> Result<bool, StoreError> {
        let _ = (from, to, seen_version);
        Err(StoreError::Rejected(format!(
            "this store does not stage interrupted moves ({payment_id})"
        )))
    }

    /// Streams every record of a partition in `payment_id` order (which is
    /// creation order: ids are ULIDs), fetching `batch_size` records per round
    /// trip, so memory stays bounded by the batch, not the partition.
    fn scan(
        &self,
        partition: Partition,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>>;

    /// Streams the realtime records a stale-payment pass settles: not paid,
    /// `PENDING` or `UNKNOWN` (which includes a status this build does not
    /// recognise), last updated at or before
    /// `updated_before_ms` (epoch ms), in `payment_id` order, `batch_size`
    /// per round trip. The default filters [`StateStore::scan`]; the SQL and
    /// MongoDB stores filter in the database, so a run reads the stale
    /// records rather than the whole partition.
    fn scan_stale(
        &self,
        updated_before_ms: i64,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        Box::pin(
            self.scan(Partition::Realtime, batch_size)
                .try_filter(move |r| std::future::ready(is_stale(r, updated_before_ms))),
        )
    }

    /// Finds the records of these orderIds in every partition and for every
    /// merchant (the card company knows paygate as one merchant, so its
    /// transaction list carries orderIds without paygate's merchant ids).
    /// One entry per payment (the newest copy while a move is interrupted),
    /// in no particular order. One round trip: callers bound the slice they
    /// pass (the reconciliation sends at most `lookup_chunk` ids).
    ///
    /// # Errors
    /// [`StoreError`].
    async fn find_by_order_ids(
        &self,
        order_ids: &[String],
    ) -> Result<Vec<(Partition, PaymentRecord)>, StoreError>;

    /// Streams the records of a partition with `from_ms <= created_at <
    /// to_ms` (epoch ms) in `(created_at, payment_id)` order, `batch_size`
    /// per round trip, so memory stays bounded by the batch.
    fn scan_created(
        &self,
        partition: Partition,
        from_ms: i64,
        to_ms: i64,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>>;

    /// The events of one payment this store holds, ordered by `(version,
    /// cancel_n)`. SQL: its rows of `payment_events`. MongoDB: the events
    /// still in the payment's and its cancels' documents, not yet relayed
    /// to the SQL table ([`StateStore::pending_events`]). Memory: all.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn events_of(&self, payment_id: &PaymentId) -> Result<Vec<crate::Event>, StoreError>;

    /// Up to `limit` events written into this store's own documents and
    /// not yet relayed into the SQL `payment_events` table (MongoDB's
    /// in-document outbox: an event is written in the same document update
    /// as its transition). The relay inserts them (idempotently, by
    /// `event_id`) and then calls [`StateStore::forget_events`]; a relay
    /// that dies between the two inserts them again, harmlessly. Stores
    /// that write events straight into the table (SQL) or keep them
    /// themselves (memory) have none.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn pending_events(&self, limit: u32) -> Result<Vec<crate::Event>, StoreError> {
        let _ = limit;
        Ok(Vec::new())
    }

    /// Removes relayed events from this store's documents (see
    /// [`StateStore::pending_events`]).
    ///
    /// # Errors
    /// [`StoreError`]; the events are then relayed again later.
    async fn forget_events(&self, events: &[crate::Event]) -> Result<(), StoreError> {
        let _ = events;
        Ok(())
    }

    /// Checks the store answers (for `/readyz`).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn ping(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: i64, updated_at: i64) -> PaymentRecord {
        let mut r = PaymentRecord::new_pending(
            MerchantId::from_stored("mer_1"),
            OrderId::from_stored("order-1"),
            "pk".into(),
            1,
            "KRW".into(),
            "fp".into(),
            None,
            updated_at,
        );
        r.version = version;
        r
    }

    /// The later write wins, even when a faster clock stamped the earlier.
    #[test]
    fn the_copy_of_the_higher_version_is_believed_whatever_its_clock() {
        let earlier = record(3, 2_000);
        let mut later = earlier.clone();
        (later.version, later.updated_at) = (4, 1_000);
        let (part, kept) = newest_copy([
            (Partition::Unpaid, later.clone()),
            (Partition::Realtime, earlier.clone()),
        ])
        .unwrap_or_else(|| unreachable!());
        assert_eq!((part, kept.version), (Partition::Unpaid, 4));
        let kept = newest_copies([
            (Partition::Realtime, earlier.clone()),
            (Partition::Unpaid, later),
        ]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].1.version, 4);
        // A tie: a stalled move's copy beside a realtime record changed
        // once since; realtime is the truth, whatever the order.
        let mut changed = earlier.clone();
        changed.version = 4;
        let copy = {
            let mut c = earlier;
            c.version = 4;
            c
        };
        for copies in [
            vec![
                (Partition::Realtime, changed.clone()),
                (Partition::Unpaid, copy.clone()),
            ],
            vec![
                (Partition::Unpaid, copy.clone()),
                (Partition::Realtime, changed.clone()),
            ],
        ] {
            let (part, _) = newest_copy(copies.clone()).unwrap_or_else(|| unreachable!());
            assert_eq!(part, Partition::Realtime);
            assert_eq!(newest_copies(copies)[0].0, Partition::Realtime);
        }
    }
}
