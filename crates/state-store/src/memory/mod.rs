//! An in-memory [`StateStore`] (feature `memory`), built for the
//! deterministic simulation: the real saga, batch and reconciliation run
//! against it on a current-thread tokio runtime with paused time.
//!
//! - **Same semantics as the SQL backend** ([`crate::sql`] is the
//!   reference): the permanent `(merchant, orderId)` and
//!   `(merchant, Idempotency-Key)`, `(card account, orderId)` and
//!   `(card account, paymentKey)` claims, the guards of every
//!   [`Transition`] (the SQL `UPDATE ... WHERE` clauses), moves guarded by
//!   [`crate::may_enter`], the newest copy winning while a move is
//!   interrupted, keyset-paged scans. It passes the store conformance suite
//!   (`tests/conformance.rs` runs on it as `Backend::Memory`).
//! - **Deterministic**: no I/O, no threads, no `tokio::spawn`; every result
//!   comes out of `BTreeMap`s in a fixed order (even where the trait says "no
//!   particular order"); one `std::sync::Mutex`, never held across an await;
//!   `updated_at` is stamped from the clock given to
//!   [`MemoryStateStore::new`] (the simulation passes one driven by tokio's
//!   paused time).
//! - **Faults**: [`MemoryStateStore::set_fault`] installs a closure asked once
//!   per write; it can fail the write with [`StoreError::Unavailable`] before
//!   it applies ([`Fault::FailBefore`]), or apply it and still report
//!   `Unavailable` ([`Fault::FailAfter`], a commit whose acknowledgement was
//!   lost). Reads and `ping` never fail.
//! - [`MemoryStateStore::snapshot`] hands an invariant checker every record
//!   with its partition.
//!
//! [`inventory`] keeps inventory and holds in memory; the cancels are in
//! `cancels.rs`.

mod cancels;
pub mod inventory;

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Bound,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use futures_util::{stream::BoxStream, TryStreamExt};
use paygate_core::{
    payment::failure_codes, MerchantId, OrderId, Partition, PaymentId, PaymentRecord,
};

use crate::{CreateOutcome, StateStore, StoreError, Transition};

/// The kind of write a fault closure is asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WriteKind {
    /// [`StateStore::create`].
    Create,
    /// [`StateStore::transition`] (asked whether or not its guard holds;
    /// not asked for a `Reopen` with a code that is not a no-call code,
    /// which the SQL backend answers `false` without a statement).
    Transition,
    /// [`StateStore::move_record`].
    Move,
    /// [`StateStore::copy_to_partition`].
    Copy,
    /// A cancel's claim or transition ([`crate::CancelStore`]).
    Cancel,
}

/// What a fault closure decides for one write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The write runs normally.
    #[default]
    None,
    /// The write fails with [`StoreError::Unavailable`] and changes nothing.
    FailBefore,
    /// The write applies, then the call fails with
    /// [`StoreError::Unavailable`]: the commit happened but its
    /// acknowledgement was lost, so the caller cannot tell it applied.
    FailAfter,
}

/// A fault closure: asked once per write with its kind and the `payment_id`
/// it writes; see [`MemoryStateStore::set_fault`].
pub type FaultFn = Arc<dyn Fn(WriteKind, &PaymentId) -> Fault + Send + Sync>;

/// The clock the store stamps by (its "database's" clock); see
/// [`MemoryStateStore::new`].
pub use paygate_core::Clock;

/// One partition: the records by id, and the `(created_at, payment_id)`
/// index `scan_created` pages on (a record's `created_at` never changes).
#[derive(Default)]
struct Table {
    rows: BTreeMap<PaymentId, PaymentRecord>,
    by_created: BTreeSet<(i64, PaymentId)>,
}

impl Table {
    /// Inserts or replaces (`INSERT ... ON CONFLICT (payment_id) DO UPDATE`).
    fn put(&mut self, record: PaymentRecord) {
        let key = (record.created_at, record.payment_id.clone());
        if let Some(old) = self.rows.insert(record.payment_id.clone(), record) {
            self.by_created.remove(&(old.created_at, old.payment_id));
        }
        self.by_created.insert(key);
    }

    fn remove(&mut self, payment_id: &PaymentId) -> Option<PaymentRecord> {
        let old = self.rows.remove(payment_id)?;
        self.by_created
            .remove(&(old.created_at, old.payment_id.clone()));
        Some(old)
    }
}

/// Everything the store holds, behind one mutex.
#[derive(Default)]
struct State {
    /// `realtime_payments`, `completed_payments`, `unpaid_payments`, in
    /// [`Partition::ALL`] order (see [`slot`]).
    tables: [Table; 3],
    /// `(merchant, orderId)` -> the claiming payment. Never removed.
    order_claims: BTreeMap<(String, String), PaymentId>,
    /// `(merchant, Idempotency-Key)` -> the claiming payment. Never removed.
    key_claims: BTreeMap<(String, String), PaymentId>,
    /// `(card account, orderId)` -> the claiming payment. Never removed.
    account_order_claims: BTreeMap<(String, String), PaymentId>,
    /// `(card account, paymentKey)` -> the claiming payment. Never removed.
    account_key_claims: BTreeMap<(String, String), PaymentId>,
    /// Every claimed `payment_id` (`payment_claims.payment_id` is UNIQUE).
    claimed_ids: BTreeSet<PaymentId>,
    /// orderId (any merchant) -> the payments created for it, for
    /// `find_by_order_ids`. A record's order never changes and a record
    /// never leaves every partition, so this is only ever added to.
    by_order_id: BTreeMap<String, BTreeSet<PaymentId>>,
    /// `payment_cancels`, by `(payment_id, n)`.
    cancels: BTreeMap<(PaymentId, i64), crate::CancelRecord>,
    /// `payment_events`, in the order they were written.
    events: Vec<crate::Event>,
}

impl State {
    fn table(&self, p: Partition) -> &Table {
        &self.tables[slot(p)]
    }

    fn table_mut(&mut self, p: Partition) -> &mut Table {
        &mut self.tables[slot(p)]
    }

    /// Every copy of a record, in [`Partition::ALL`] order (the SQL
    /// backend's `UNION ALL` order, which decides a tie in [`crate::newest_copy`]).
    fn copies(&self, payment_id: &PaymentId) -> Vec<(Partition, PaymentRecord)> {
        Partition::ALL
            .iter()
            .filter_map(|p| self.table(*p).rows.get(payment_id).map(|r| (*p, r.clone())))
            .collect()
    }

    fn newest(&self, payment_id: &PaymentId) -> Option<(Partition, PaymentRecord)> {
        crate::newest_copy(self.copies(payment_id))
    }
}

fn slot(p: Partition) -> usize {
    match p {
        Partition::Realtime => 0,
        Partition::Completed => 1,
        Partition::Unpaid => 2,
    }
}

fn unavailable(what: &str, payment_id: &PaymentId) -> StoreError {
    StoreError::Unavailable(format!("injected fault: {what} of {payment_id}"))
}

/// The in-memory [`StateStore`]: see the [module docs](self). Cheap to share
/// behind an `Arc`; all methods take `&self`.
pub struct MemoryStateStore {
    state: Mutex<State>,
    clock: Clock,
    fault: Mutex<Option<FaultFn>>,
}

impl std::fmt::Debug for MemoryStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStateStore").finish_non_exhaustive()
    }
}

impl MemoryStateStore {
    /// An empty store whose transitions, moves and copies stamp `updated_at`
    /// with `clock.now_ms()` (epoch ms), read once per such call, before the write
    /// and outside the store's lock (as the SQL backend reads the time before
    /// its statement). The simulation passes a clock driven by tokio's paused
    /// time.
    pub fn new(clock: Clock) -> Self {
        Self {
            state: Mutex::new(State::default()),
            clock,
            fault: Mutex::new(None),
        }
    }

    /// An empty store on the process clock ([`Clock::system`]), as
    /// the SQL backend stamps it.
    pub fn with_system_clock() -> Self {
        Self::new(Clock::system())
    }

    /// Installs (`Some`) or removes (`None`) the fault closure. It is asked
    /// once per write call, before the write, outside the store's lock (it may
    /// read the store), with the [`WriteKind`] and the `payment_id` written;
    /// its [`Fault`] decides whether the write fails before applying, applies
    /// and reports [`StoreError::Unavailable`], or runs normally. A closure
    /// that counts, matches or draws from the simulation's seeded RNG gives
    /// "the next N writes", "writes matching a predicate" or "a probability".
    pub fn set_fault(&self, fault: Option<FaultFn>) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Makes the next `n` writes (of any kind) end with `fault`, then lets
    /// writes through again; replaces any installed fault closure.
    pub fn fail_next_writes(&self, n: u64, fault: Fault) {
        let left = AtomicU64::new(n);
        self.set_fault(Some(Arc::new(move |_, _| {
            match left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1)) {
                Ok(_) => fault,
                Err(_) => Fault::None,
            }
        })));
    }

    /// Every record with its partition, sorted by `payment_id` and then
    /// partition in [`Partition::ALL`] order (a record that an interrupted
    /// move left in two partitions appears twice, side by side).
    pub fn snapshot(&self) -> Vec<(Partition, PaymentRecord)> {
        let state = self.lock();
        let mut all: Vec<(usize, Partition, PaymentRecord)> = Partition::ALL
            .iter()
            .flat_map(|p| {
                state
                    .table(*p)
                    .rows
                    .values()
                    .map(move |r| (slot(*p), *p, r.clone()))
            })
            .collect();
        all.sort_by(|a, b| (&a.2.payment_id, a.0).cmp(&(&b.2.payment_id, b.0)));
        all.into_iter().map(|(_, p, r)| (p, r)).collect()
    }

    /// Every event written, in the order written: for the simulation's
    /// checker (every applied transition has exactly one).
    pub fn events(&self) -> Vec<crate::Event> {
        self.lock().events.clone()
    }

    /// Every copy of one record with its partition, in [`Partition::ALL`]
    /// order (two while an interrupted move left it in two). Synchronous and
    /// fault-free: for an observer (the simulation's journal) to see whether
    /// a call changed the record.
    pub fn copies(&self, payment_id: &PaymentId) -> Vec<(Partition, PaymentRecord)> {
        let state = self.lock();
        Partition::ALL
            .iter()
            .filter_map(|p| {
                state
                    .table(*p)
                    .rows
                    .get(payment_id)
                    .map(|r| (*p, r.clone()))
            })
            .collect()
    }

    /// The state. No code panics while holding the lock and every write
    /// checks before it mutates, so a poisoned lock still guards consistent
    /// data and is taken over.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the fault closure about a write.
    fn fault_for(&self, kind: WriteKind, payment_id: &PaymentId) -> Fault {
        let f = self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone();
        f.map_or(Fault::None, |f| f(kind, payment_id))
    }

    /// Runs `apply` under the fault decided for this write.
    fn write<T>(
        &self,
        kind: WriteKind,
        payment_id: &PaymentId,
        apply: impl FnOnce(&mut State) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let what = match kind {
            WriteKind::Create => "create",
            WriteKind::Transition => "transition",
            WriteKind::Move => "move",
            WriteKind::Copy => "copy",
            WriteKind::Cancel => "cancel",
        };
        let fault = self.fault_for(kind, payment_id);
        if fault == Fault::FailBefore {
            return Err(unavailable(what, payment_id));
        }
        let out = apply(&mut self.lock())?;
        if fault == Fault::FailAfter {
            return Err(unavailable(what, payment_id));
        }
        Ok(out)
    }

    /// One page of `scan`: up to `limit` records after `after`, in id order.
    fn scan_page(
        &self,
        partition: Partition,
        after: Option<&PaymentId>,
        limit: usize,
    ) -> Vec<PaymentRecord> {
        let state = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        state
            .table(partition)
            .rows
            .range::<PaymentId, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// One page of `scan_created`: up to `limit` records with
    /// `(created_at, payment_id) > after` and `created_at < to_ms`.
    fn scan_created_page(
        &self,
        partition: Partition,
        after: &(i64, PaymentId),
        to_ms: i64,
        limit: usize,
    ) -> Vec<PaymentRecord> {
        let state = self.lock();
        let table = state.table(partition);
        table
            .by_created
            .range((Bound::Excluded(after), Bound::Unbounded))
            .take_while(|(created_at, _)| *created_at < to_ms)
            .take(limit)
            .filter_map(|(_, id)| table.rows.get(id).cloned())
            .collect()
    }
}

#[async_trait::async_trait]
impl StateStore for MemoryStateStore {
    async fn create(&self, r: &PaymentRecord) -> Result<CreateOutcome, StoreError> {
        self.write(WriteKind::Create, &r.payment_id, |state| {
            let merchant = r.merchant_id.as_str().to_owned();
            let order_key = (merchant.clone(), r.order_id.as_str().to_owned());
            let idem_key = r.idempotency_key.clone().map(|k| (merchant, k));
            let account = crate::DEFAULT_CARD_ACCOUNT.to_owned();
            let account_order = (account.clone(), r.order_id.as_str().to_owned());
            let account_key = (account, r.payment_key.clone());
            let conflict = state.order_claims.contains_key(&order_key)
                || state.claimed_ids.contains(&r.payment_id)
                || idem_key
                    .as_ref()
                    .is_some_and(|k| state.key_claims.contains_key(k))
                || state.account_order_claims.contains_key(&account_order)
                || state.account_key_claims.contains_key(&account_key);
            if !conflict {
                // The table's CHECK (amount >= 1) fails the whole transaction.
                if r.amount < 1 {
                    return Err(StoreError::Rejected(format!(
                        "amount {} of {} violates CHECK (amount >= 1)",
                        r.amount, r.payment_id
                    )));
                }
                state.order_claims.insert(order_key, r.payment_id.clone());
                if let Some(k) = idem_key {
                    state.key_claims.insert(k, r.payment_id.clone());
                }
                state.claimed_ids.insert(r.payment_id.clone());
                state
                    .account_order_claims
                    .insert(account_order, r.payment_id.clone());
                state
                    .account_key_claims
                    .insert(account_key, r.payment_id.clone());
                state
                    .by_order_id
                    .entry(r.order_id.as_str().to_owned())
                    .or_default()
                    .insert(r.payment_id.clone());
                state.table_mut(Partition::Realtime).put(r.clone());
                return Ok(CreateOutcome::Created);
            }
            // Someone holds the claim: the idempotency key's owner first, then the order's.
            if let Some(id) = idem_key.and_then(|k| state.key_claims.get(&k)) {
                if let Some((_, existing)) = state.newest(id) {
                    return Ok(CreateOutcome::Exists(Box::new(existing)));
                }
            }
            if let Some(id) = state.order_claims.get(&order_key) {
                return match state.newest(id) {
                    Some((_, existing)) => Ok(CreateOutcome::Exists(Box::new(existing))),
                    None => Err(StoreError::Corrupt(format!("claim {id} has no record"))),
                };
            }
            if state.account_order_claims.contains_key(&account_order) {
                return Ok(CreateOutcome::OrderIdInUse);
            }
            if state.account_key_claims.contains_key(&account_key) {
                return Ok(CreateOutcome::PaymentKeyReused);
            }
            Err(StoreError::Corrupt(
                "claim conflict without a claim".to_owned(),
            ))
        })
    }

    async fn get(
        &self,
        payment_id: &PaymentId,
    ) -> Result<Option<(Partition, PaymentRecord)>, StoreError> {
        Ok(self.lock().newest(payment_id))
    }

    async fn get_by_order(
        &self,
        merchant_id: &MerchantId,
        order_id: &OrderId,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        let state = self.lock();
        let key = (
            merchant_id.as_str().to_owned(),
            order_id.as_str().to_owned(),
        );
        Ok(state
            .order_claims
            .get(&key)
            .and_then(|id| state.newest(id))
            .map(|(_, r)| r))
    }

    async fn transition(&self, payment_id: &PaymentId, t: &Transition) -> Result<bool, StoreError> {
        if let Transition::Reopen { failure_code, .. } = t {
            if !failure_codes::is_no_call(failure_code) {
                return Ok(false);
            }
        }
        let now = self.clock.now_ms();
        self.write(WriteKind::Transition, payment_id, |state| {
            let Some(r) = state
                .table_mut(Partition::Realtime)
                .rows
                .get_mut(payment_id)
            else {
                return Ok(false);
            };
            if !t.apply_if(r, now) {
                return Ok(false);
            }
            if let Some(e) = crate::payment_event(t, r, now) {
                state.events.push(e);
            }
            Ok(true)
        })
    }

    async fn events_of(&self, payment_id: &PaymentId) -> Result<Vec<crate::Event>, StoreError> {
        let mut events: Vec<crate::Event> = self
            .lock()
            .events
            .iter()
            .filter(|e| &e.payment_id == payment_id)
            .cloned()
            .collect();
        events.sort_by_key(|e| (e.version, e.cancel_n));
        Ok(events)
    }

    /// As the SQL backend, plus one refusal: a move within one partition is
    /// [`StoreError::Rejected`] (it has no meaning, and a copy-then-delete
    /// within one table would delete the record).
    async fn move_record(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        if from == to {
            return Err(StoreError::Rejected(format!(
                "move of {payment_id} from {} to itself",
                from.table()
            )));
        }
        let now = self.clock.now_ms();
        self.write(WriteKind::Move, payment_id, |state| {
            let may = state
                .table(from)
                .rows
                .get(payment_id)
                .is_some_and(|r| crate::may_enter(to, r));
            if !may {
                return Ok(false);
            }
            match state.table_mut(from).remove(payment_id) {
                Some(mut moved) => {
                    moved.updated_at = now;
                    moved.version += 1;
                    state.table_mut(to).put(moved);
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    async fn finish_move(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
        seen_version: i64,
    ) -> Result<bool, StoreError> {
        self.write(WriteKind::Move, payment_id, |state| {
            let source = state.table(from).rows.get(payment_id).cloned();
            match source {
                Some(r) if r.version == seen_version && crate::may_enter(to, &r) => {
                    state.table_mut(from).remove(payment_id);
                    Ok(true)
                }
                Some(_) => {
                    let ours = state
                        .table(to)
                        .rows
                        .get(payment_id)
                        .is_some_and(|c| c.version == seen_version + 1);
                    if ours {
                        state.table_mut(to).remove(payment_id);
                    }
                    Ok(false)
                }
                None => Ok(true),
            }
        })
    }

    async fn copy_to_partition(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        let now = self.clock.now_ms();
        self.write(WriteKind::Copy, payment_id, |state| {
            let Some(mut copy) = state.table(from).rows.get(payment_id).cloned() else {
                return Ok(false);
            };
            copy.updated_at = now;
            copy.version += 1;
            state.table_mut(to).put(copy);
            Ok(true)
        })
    }

    fn scan(
        &self,
        partition: Partition,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        let limit = batch_size.max(1) as usize;
        // Keyset paging as in SQL: each page takes the lock once and starts
        // after the last id of the one before, so writes between pages are
        // seen (or not) exactly as a paged SQL scan sees them.
        let pages =
            futures_util::stream::try_unfold(Some(None::<PaymentId>), move |after| async move {
                let Some(after) = after else { return Ok(None) };
                let page = self.scan_page(partition, after.as_ref(), limit);
                let next = match page.last() {
                    Some(last) if page.len() == limit => Some(Some(last.payment_id.clone())),
                    _ => None,
                };
                if page.is_empty() {
                    return Ok(None);
                }
                Ok(Some((
                    futures_util::stream::iter(page.into_iter().map(Ok)),
                    next,
                )))
            });
        Box::pin(pages.try_flatten())
    }

    async fn find_by_order_ids(
        &self,
        order_ids: &[String],
    ) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        let state = self.lock();
        let ids: BTreeSet<&PaymentId> = order_ids
            .iter()
            .filter_map(|o| state.by_order_id.get(o))
            .flatten()
            .collect();
        // In payment_id order, one entry (the newest copy) per payment.
        Ok(ids.into_iter().filter_map(|id| state.newest(id)).collect())
    }

    fn scan_created(
        &self,
        partition: Partition,
        from_ms: i64,
        to_ms: i64,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        let limit = batch_size.max(1) as usize;
        // `(created_at, payment_id) > (from_ms, '')`, as the SQL cursor starts.
        let start = Some((from_ms, PaymentId::from_stored(String::new())));
        let pages = futures_util::stream::try_unfold(start, move |after| async move {
            let Some(after) = after else { return Ok(None) };
            let page = self.scan_created_page(partition, &after, to_ms, limit);
            let next = match page.last() {
                Some(last) if page.len() == limit => {
                    Some((last.created_at, last.payment_id.clone()))
                }
                _ => None,
            };
            if page.is_empty() {
                return Ok(None);
            }
            Ok(Some((
                futures_util::stream::iter(page.into_iter().map(Ok)),
                next,
            )))
        });
        Box::pin(pages.try_flatten())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

    use std::sync::atomic::AtomicI64;

    use super::*;

    fn pending(merchant: &MerchantId, order: &str, created_at: i64) -> PaymentRecord {
        PaymentRecord::new_pending(
            merchant.clone(),
            OrderId::parse(order).unwrap(),
            format!("pk_{order}"),
            10_000,
            "KRW".into(),
            format!("fp_{order}"),
            None,
            created_at,
        )
    }

    fn paid() -> Transition {
        Transition::MarkPaid {
            approved_at: "2026-11-21T12:00:00+09:00".into(),
        }
    }

    /// A store on a clock the test sets.
    fn store_at(start: i64) -> (MemoryStateStore, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(start));
        let clock = now.clone();
        let store = MemoryStateStore::new(Clock::from_fn(move || clock.load(Ordering::SeqCst)));
        (store, now)
    }

    fn is_unavailable<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::Unavailable(_)))
    }

    #[tokio::test]
    async fn fail_before_changes_nothing_and_fail_after_applies() {
        let (store, _) = store_at(1_000);
        let m = MerchantId::generate();
        let r = pending(&m, "order-fault-1", 1_000);

        store.fail_next_writes(1, Fault::FailBefore);
        assert!(is_unavailable(store.create(&r).await));
        assert!(
            store.snapshot().is_empty(),
            "nothing written, nothing claimed"
        );
        assert_eq!(store.create(&r).await.unwrap(), CreateOutcome::Created);

        // A lost acknowledgement: the write is there, the caller was told 503.
        store.fail_next_writes(1, Fault::FailAfter);
        assert!(is_unavailable(
            store.transition(&r.payment_id, &paid()).await
        ));
        let (_, got) = store.get(&r.payment_id).await.unwrap().unwrap();
        assert!(got.is_paid);
        assert!(!store.transition(&r.payment_id, &paid()).await.unwrap());

        // A create whose acknowledgement is lost is found by the retry.
        let again = pending(&m, "order-fault-2", 1_000);
        store.fail_next_writes(1, Fault::FailAfter);
        assert!(is_unavailable(store.create(&again).await));
        match store
            .create(&pending(&m, "order-fault-2", 1_000))
            .await
            .unwrap()
        {
            CreateOutcome::Exists(existing) => assert_eq!(existing.payment_id, again.payment_id),
            other => panic!("expected Exists, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_fault_closure_sees_the_kind_and_the_payment() {
        let (store, _) = store_at(1_000);
        let m = MerchantId::generate();
        let (a, b) = (
            pending(&m, "order-pred-a", 1_000),
            pending(&m, "order-pred-b", 1_000),
        );
        for r in [&a, &b] {
            store.create(r).await.unwrap();
            store.transition(&r.payment_id, &paid()).await.unwrap();
            store
                .transition(&r.payment_id, &Transition::MarkSaved)
                .await
                .unwrap();
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, target) = (seen.clone(), a.payment_id.clone());
        store.set_fault(Some(Arc::new(move |kind, id: &PaymentId| {
            log.lock().unwrap().push(kind);
            if kind == WriteKind::Move && *id == target {
                Fault::FailBefore
            } else {
                Fault::None
            }
        })));
        let (rt, done) = (Partition::Realtime, Partition::Completed);
        assert!(is_unavailable(
            store.move_record(&a.payment_id, rt, done).await
        ));
        assert!(store.move_record(&b.payment_id, rt, done).await.unwrap());
        assert!(store
            .copy_to_partition(&a.payment_id, rt, done)
            .await
            .unwrap());
        // A Reopen with a code that is not a no-call code never reaches the store.
        let reopen = Transition::Reopen {
            seen_version: None,
            failure_code: "REJECT_CARD_PAYMENT".into(),
        };
        assert!(!store.transition(&a.payment_id, &reopen).await.unwrap());
        assert_eq!(
            *seen.lock().unwrap(),
            [WriteKind::Move, WriteKind::Move, WriteKind::Copy]
        );
        store.set_fault(None);
        assert!(store.move_record(&a.payment_id, rt, done).await.unwrap());
    }

    #[tokio::test]
    async fn writes_are_stamped_by_the_given_clock() {
        let (store, now) = store_at(1_000);
        let m = MerchantId::generate();
        let r = pending(&m, "order-clock", 500);
        store.create(&r).await.unwrap();
        let updated = |store: &MemoryStateStore| {
            store
                .snapshot()
                .into_iter()
                .map(|(p, r)| (p, r.updated_at))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            updated(&store),
            [(Partition::Realtime, 500)],
            "create keeps the record's own"
        );

        now.store(2_000, Ordering::SeqCst);
        store.transition(&r.payment_id, &paid()).await.unwrap();
        assert_eq!(updated(&store), [(Partition::Realtime, 2_000)]);
        now.store(3_000, Ordering::SeqCst);
        store
            .transition(&r.payment_id, &Transition::MarkSaved)
            .await
            .unwrap();
        now.store(4_000, Ordering::SeqCst);
        let (rt, done) = (Partition::Realtime, Partition::Completed);
        store
            .copy_to_partition(&r.payment_id, rt, done)
            .await
            .unwrap();
        assert_eq!(
            updated(&store),
            [(Partition::Realtime, 3_000), (Partition::Completed, 4_000)],
            "an interrupted move: both copies, side by side"
        );
        now.store(5_000, Ordering::SeqCst);
        assert!(store.move_record(&r.payment_id, rt, done).await.unwrap());
        assert_eq!(updated(&store), [(Partition::Completed, 5_000)]);
    }

    #[tokio::test]
    async fn results_come_out_in_a_fixed_order() {
        let (store, _) = store_at(1_000);
        let (m1, m2) = (MerchantId::generate(), MerchantId::generate());
        let mut made = Vec::new();
        for i in 0..20 {
            let m = if i % 2 == 0 { &m1 } else { &m2 };
            let r = pending(m, &format!("order-fixed-{}", i % 10), 1_000 - i);
            // Each orderId is sent twice; the second create is a duplicate.
            if store.create(&r).await.unwrap() == CreateOutcome::Created {
                made.push(r);
            }
        }
        assert_eq!(made.len(), 10);
        let mut ids: Vec<PaymentId> = made.iter().map(|r| r.payment_id.clone()).collect();
        ids.sort();
        let found: Vec<PaymentId> = store
            .find_by_order_ids(
                &(0..10)
                    .map(|i| format!("order-fixed-{i}"))
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.payment_id)
            .collect();
        assert_eq!(found, ids, "find_by_order_ids: payment_id order");
        let snap: Vec<PaymentId> = store
            .snapshot()
            .into_iter()
            .map(|(_, r)| r.payment_id)
            .collect();
        assert_eq!(snap, ids, "snapshot: payment_id order");
    }

    #[tokio::test]
    async fn refusals_write_nothing() {
        let (store, _) = store_at(1_000);
        let m = MerchantId::generate();
        let mut r = pending(&m, "order-refused", 1_000);
        r.amount = 0;
        assert!(matches!(
            store.create(&r).await,
            Err(StoreError::Rejected(_))
        ));
        r.amount = 1;
        assert_eq!(
            store.create(&r).await.unwrap(),
            CreateOutcome::Created,
            "no claim left behind"
        );
        let rt = Partition::Realtime;
        assert!(matches!(
            store.move_record(&r.payment_id, rt, rt).await,
            Err(StoreError::Rejected(_))
        ));
        assert_eq!(store.snapshot().len(), 1);
    }
}
