//! A process's handle to the inventory: the same death, pause and round
//! trip as its handle to the state store, and the same faults (writes that
//! fail in the store's outage window, acknowledgements lost after a write
//! applied), so a confirm, a batch or a reconciliation can die or stall
//! between its hold writes and its record writes, or be told a hold write
//! failed that applied.
//!
//! It also watches sales: an approval that sells a hold someone had
//! released means the hold was released while its payment was live (a
//! hold is `during` while its card call may be in flight and is released
//! only once a guarded decision says the payment ended), which
//! [`crate::holds::check`] reports as an I7 violation even when no other
//! buyer took the units.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use paygate_core::{MerchantId, OrderId};
use paygate_state_store::{
    BeginOutcome, Hold, HoldState, InventoryStore, MemoryInventoryStore, SellOutcome, SetStock,
    StockLevel, StoreError, TakeOutcome,
};

use crate::{rng::SimRng, world::Pause};

/// The inventory's faults, shared by every handle of a history.
#[derive(Default)]
pub struct InventoryFaults {
    /// Writes fail in this window (start and length, ms since the start).
    pub outage: Mutex<Option<(u64, u64)>>,
    /// A write applies but reports failure, per mille.
    pub lost_ack_per_mille: std::sync::atomic::AtomicU64,
    /// Orders whose approval sold a hold that had been released.
    pub sold_released: Mutex<BTreeSet<String>>,
    /// Orders whose `during` hold was released after the card company had
    /// approved the order.
    pub released_approved: Mutex<BTreeSet<String>>,
}

impl InventoryFaults {
    /// No more faults from now on.
    pub fn heal(&self) {
        *self.outage.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.lost_ack_per_mille.store(0, Ordering::SeqCst);
    }
}

/// One process's handle to the history's inventory.
pub struct InventoryHandle {
    pub(crate) inner: Arc<MemoryInventoryStore>,
    pub(crate) dead: Arc<AtomicBool>,
    pub(crate) pause: Pause,
    pub(crate) rng: SimRng,
    pub(crate) faults: Arc<InventoryFaults>,
    /// Round trips that stall 1-6 s, per mille (a job's process).
    pub(crate) long_stall_per_mille: u64,
    /// The card company, asked whether an order whose hold is released
    /// was approved.
    pub(crate) card: Arc<crate::card::SimCard>,
}

enum Fault {
    None,
    FailBefore,
    FailAfter,
}

fn gone() -> StoreError {
    StoreError::Unavailable("process died".to_owned())
}

fn injected() -> StoreError {
    StoreError::Unavailable("injected fault: inventory write".to_owned())
}

impl InventoryHandle {
    /// Waits out a pause and a round trip; whether the process still lives.
    async fn round_trip(&self) -> bool {
        self.pause.wait().await;
        let mut ms = self.rng.between(0, 3);
        if self.long_stall_per_mille > 0 && self.rng.between(0, 999) < self.long_stall_per_mille {
            ms += self.rng.between(1_000, 6_000);
        }
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        !self.dead.load(Ordering::SeqCst)
    }

    fn fault(&self) -> Fault {
        let t = u64::try_from(paygate_core::time::now_ms() - crate::EPOCH_MS).unwrap_or(0);
        let outage = *self.faults.outage.lock().unwrap_or_else(|e| e.into_inner());
        if outage.is_some_and(|(start, len)| t >= start && t < start + len) {
            return Fault::FailBefore;
        }
        let lost = self.faults.lost_ack_per_mille.load(Ordering::SeqCst);
        if lost > 0 && self.rng.between(0, 999) < lost {
            return Fault::FailAfter;
        }
        Fault::None
    }

    /// A read: the round trip, then the call.
    async fn read<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        call.await
    }

    /// Notes a `during` hold of `order` that a release just freed while
    /// the card company holds an approval of the order.
    fn watch_release(&self, before: Option<&Hold>, after: Option<&Hold>) {
        let (Some(b), Some(a)) = (before, after) else {
            return;
        };
        if b.state == HoldState::During
            && a.state == HoldState::Released
            && self.card.approved_amount(a.order_id.as_str()).is_some()
        {
            self.faults
                .released_approved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(a.order_id.to_string());
        }
    }

    /// A write: the round trip, then the call under the history's faults.
    async fn write<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        match self.fault() {
            Fault::FailBefore => Err(injected()),
            Fault::FailAfter => {
                let _ = call.await;
                Err(injected())
            }
            Fault::None => call.await,
        }
    }
}

#[async_trait]
impl InventoryStore for InventoryHandle {
    async fn set_stock(
        &self,
        merchant: &MerchantId,
        sku: &str,
        stock: i64,
        now_ms: i64,
    ) -> Result<SetStock, StoreError> {
        self.write(self.inner.set_stock(merchant, sku, stock, now_ms))
            .await
    }
    async fn level(
        &self,
        merchant: &MerchantId,
        sku: &str,
        now_ms: i64,
    ) -> Result<Option<StockLevel>, StoreError> {
        self.read(self.inner.level(merchant, sku, now_ms)).await
    }
    async fn take(&self, hold: &Hold, now_ms: i64) -> Result<TakeOutcome, StoreError> {
        self.write(self.inner.take(hold, now_ms)).await
    }
    async fn hold(&self, merchant: &MerchantId, hold_id: &str) -> Result<Option<Hold>, StoreError> {
        self.read(self.inner.hold(merchant, hold_id)).await
    }
    async fn hold_by_order(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
    ) -> Result<Option<Hold>, StoreError> {
        self.read(self.inner.hold_by_order(merchant, order)).await
    }
    async fn begin_payment(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        now_ms: i64,
    ) -> Result<BeginOutcome, StoreError> {
        self.write(self.inner.begin_payment(merchant, order, now_ms))
            .await
    }
    async fn sell(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        now_ms: i64,
    ) -> Result<SellOutcome, StoreError> {
        let inner = self.inner.clone();
        let faults = self.faults.clone();
        self.write(async move {
            // One step in memory: nothing runs between the read and the sale.
            let before = inner.hold_by_order(merchant, order).await?;
            let sold = inner.sell(merchant, order, now_ms).await?;
            if let (Some(h), SellOutcome::Sold { .. }) = (&before, &sold) {
                if h.state == HoldState::Released {
                    faults
                        .sold_released
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(order.to_string());
                }
            }
            Ok(sold)
        })
        .await
    }
    async fn release(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        from: &[HoldState],
        now_ms: i64,
    ) -> Result<Option<Hold>, StoreError> {
        self.write(async {
            // One step in memory: nothing runs between the reads and the release.
            let before = self.inner.hold_by_order(merchant, order).await?;
            let after = self.inner.release(merchant, order, from, now_ms).await?;
            self.watch_release(before.as_ref(), after.as_ref());
            Ok(after)
        })
        .await
    }
    async fn stuck_during(
        &self,
        updated_before_ms: i64,
        after_hold_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Hold>, StoreError> {
        self.read(
            self.inner
                .stuck_during(updated_before_ms, after_hold_id, limit),
        )
        .await
    }
    async fn release_stuck(&self, seen: &Hold, now_ms: i64) -> Result<bool, StoreError> {
        self.write(async {
            let before = self.inner.hold(&seen.merchant_id, &seen.hold_id).await?;
            let released = self.inner.release_stuck(seen, now_ms).await?;
            let after = self.inner.hold(&seen.merchant_id, &seen.hold_id).await?;
            self.watch_release(before.as_ref(), after.as_ref());
            Ok(released)
        })
        .await
    }
    async fn repair_lines(&self, now_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.write(self.inner.repair_lines(now_ms, limit)).await
    }
    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.write(self.inner.purge(before_ms)).await
    }
}
