//! [`MemoryInventoryStore`]: inventory and holds in memory (feature
//! `memory`), for the deterministic simulation and the conformance suite.
//! Same semantics as the SQL backend (the reference); one mutex, never held
//! across an await, stands for the SKUs' locks; `BTreeMap`s keep every
//! answer in a fixed order.

use std::{collections::BTreeMap, sync::Mutex};

use paygate_core::{MerchantId, OrderId};

use crate::{
    inventory::{
        BeginOutcome, Hold, HoldState, HoldTransition, InventoryStore, SellOutcome, SetStock,
        StockLevel, TakeOutcome,
    },
    StoreError,
};

#[derive(Default, Debug)]
struct Inner {
    /// (merchant, sku) -> (stock, sold).
    skus: BTreeMap<(String, String), (i64, i64)>,
    /// hold_id -> hold.
    holds: BTreeMap<String, Hold>,
    /// (merchant, order) -> hold_id.
    by_order: BTreeMap<(String, String), String>,
}

impl Inner {
    /// A `pre` hold counts until its `expires_at` at `now`, the judged time
    /// ([`MemoryInventoryStore::judged_now`]).
    fn held(&self, merchant: &str, sku: &str, now: i64, except: Option<&str>) -> i64 {
        self.holds
            .values()
            .filter(|h| h.merchant_id.as_str() == merchant && h.is_active(now))
            .filter(|h| Some(h.hold_id.as_str()) != except)
            .flat_map(|h| h.items.iter())
            .filter(|i| i.sku == sku)
            .map(|i| i.quantity)
            .sum()
    }

    fn level(&self, merchant: &str, sku: &str, now: i64) -> Option<StockLevel> {
        let (stock, sold) = *self.skus.get(&(merchant.to_owned(), sku.to_owned()))?;
        Some(StockLevel::new(
            sku,
            stock,
            sold,
            self.held(merchant, sku, now, None),
        ))
    }

    /// The SKUs of `hold` whose quantity is not available without it.
    fn short(&self, hold: &Hold, now: i64) -> Vec<String> {
        let m = hold.merchant_id.as_str();
        hold.items
            .iter()
            .filter(|i| {
                let (stock, sold) = self
                    .skus
                    .get(&(m.to_owned(), i.sku.clone()))
                    .copied()
                    .unwrap_or((0, 0));
                stock - sold - self.held(m, &i.sku, now, Some(&hold.hold_id)) < i.quantity
            })
            .map(|i| i.sku.clone())
            .collect()
    }

    fn by_order(&self, merchant: &MerchantId, order: &OrderId) -> Option<&Hold> {
        let id = self
            .by_order
            .get(&(merchant.as_str().to_owned(), order.as_str().to_owned()))?;
        self.holds.get(id)
    }

    fn by_order_mut(&mut self, merchant: &MerchantId, order: &OrderId) -> Option<&mut Hold> {
        let id = self
            .by_order
            .get(&(merchant.as_str().to_owned(), order.as_str().to_owned()))?
            .clone();
        self.holds.get_mut(&id)
    }
}

/// Inventory and holds in memory. Cheap to share behind an `Arc`.
#[derive(Default, Debug)]
pub struct MemoryInventoryStore {
    inner: Mutex<Inner>,
    /// The store's own clock (its "database's"); see [`Self::judged_now`].
    clock: paygate_core::Clock,
}

impl MemoryInventoryStore {
    /// An empty store on the process clock (in the simulation, the
    /// history's unskewed clock: the database's).
    pub fn new() -> Self {
        Self::default()
    }

    /// As the SQL stores: a caller's `now` judged against the store's own
    /// clock, the earlier of the two, so that a caller whose clock runs
    /// ahead never finds a `pre` hold expired before the store does (and
    /// gives its units to another buyer while the holder may still pay).
    fn judged_now(&self, caller_ms: i64) -> i64 {
        caller_ms.min(self.clock.now_ms())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every SKU's level at `now_ms`, `(merchant, level)`, for invariant
    /// checkers (I7: `available >= 0` everywhere).
    pub fn levels(&self, now_ms: i64) -> Vec<(MerchantId, StockLevel)> {
        let g = self.lock();
        g.skus
            .keys()
            .filter_map(|(m, sku)| {
                g.level(m, sku, now_ms)
                    .map(|l| (MerchantId::from_stored(m.clone()), l))
            })
            .collect()
    }

    /// Every hold, in id order (for checkers and demos).
    pub fn holds(&self) -> Vec<Hold> {
        self.lock().holds.values().cloned().collect()
    }
}

#[async_trait::async_trait]
impl InventoryStore for MemoryInventoryStore {
    async fn set_stock(
        &self,
        merchant: &MerchantId,
        sku: &str,
        stock: i64,
        now_ms: i64,
    ) -> Result<SetStock, StoreError> {
        let now_ms = self.judged_now(now_ms);
        let mut g = self.lock();
        let key = (merchant.as_str().to_owned(), sku.to_owned());
        let sold = g.skus.get(&key).map_or(0, |s| s.1);
        let held = g.held(merchant.as_str(), sku, now_ms, None);
        if stock < sold + held {
            return Ok(SetStock::BelowCommitted(StockLevel::new(
                sku,
                g.skus.get(&key).map_or(0, |s| s.0),
                sold,
                held,
            )));
        }
        g.skus.insert(key, (stock, sold));
        Ok(SetStock::Set(StockLevel::new(sku, stock, sold, held)))
    }

    async fn level(
        &self,
        merchant: &MerchantId,
        sku: &str,
        now_ms: i64,
    ) -> Result<Option<StockLevel>, StoreError> {
        let now_ms = self.judged_now(now_ms);
        Ok(self.lock().level(merchant.as_str(), sku, now_ms))
    }

    async fn take(&self, hold: &Hold, now_ms: i64) -> Result<TakeOutcome, StoreError> {
        let now_ms = self.judged_now(now_ms);
        let mut g = self.lock();
        if let Some(existing) = g.by_order(&hold.merchant_id, &hold.order_id) {
            return Ok(TakeOutcome::Exists(existing.clone()));
        }
        let short = g.short(hold, now_ms);
        if !short.is_empty() {
            return Ok(TakeOutcome::OutOfStock(short));
        }
        g.by_order.insert(
            (
                hold.merchant_id.as_str().to_owned(),
                hold.order_id.as_str().to_owned(),
            ),
            hold.hold_id.clone(),
        );
        g.holds.insert(hold.hold_id.clone(), hold.clone());
        Ok(TakeOutcome::Taken(hold.clone()))
    }

    async fn hold(&self, merchant: &MerchantId, hold_id: &str) -> Result<Option<Hold>, StoreError> {
        Ok(self
            .lock()
            .holds
            .get(hold_id)
            .filter(|h| &h.merchant_id == merchant)
            .cloned())
    }

    async fn hold_by_order(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
    ) -> Result<Option<Hold>, StoreError> {
        Ok(self.lock().by_order(merchant, order).cloned())
    }

    async fn begin_payment(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        now_ms: i64,
    ) -> Result<BeginOutcome, StoreError> {
        let now_ms = self.judged_now(now_ms);
        let mut g = self.lock();
        let Some(hold) = g.by_order(merchant, order).cloned() else {
            return Ok(BeginOutcome::NoHold);
        };
        match hold.state {
            HoldState::Sold => return Ok(BeginOutcome::Sold(hold)),
            HoldState::During => {
                let Some(h) = g.by_order_mut(merchant, order) else {
                    return Ok(BeginOutcome::NoHold);
                };
                // The fence: one version on (under the lock, it applies).
                HoldTransition::Refence.apply_if(h, now_ms);
                return Ok(BeginOutcome::During(h.clone()));
            }
            HoldState::Pre | HoldState::Released => {}
        }
        let short = g.short(&hold, now_ms);
        let Some(h) = g.by_order_mut(merchant, order) else {
            return Ok(BeginOutcome::NoHold);
        };
        let to = if short.is_empty() {
            HoldState::During
        } else {
            HoldState::Released
        };
        HoldTransition::Begin {
            to,
            seen_version: None,
        }
        .apply_if(h, now_ms);
        if short.is_empty() {
            Ok(BeginOutcome::During(h.clone()))
        } else {
            Ok(BeginOutcome::Expired {
                hold: h.clone(),
                short,
            })
        }
    }

    async fn sell(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        now_ms: i64,
    ) -> Result<SellOutcome, StoreError> {
        let now_ms = self.judged_now(now_ms);
        let mut g = self.lock();
        let Some(h) = g.by_order_mut(merchant, order) else {
            return Ok(SellOutcome::NoHold);
        };
        if !HoldTransition::Sell.apply_if(h, now_ms) {
            return Ok(SellOutcome::AlreadySold);
        }
        let hold = h.clone();
        for i in &hold.items {
            let e = g
                .skus
                .entry((merchant.as_str().to_owned(), i.sku.clone()))
                .or_insert((0, 0));
            e.1 += i.quantity;
        }
        let oversold = hold
            .items
            .iter()
            .filter(|i| {
                g.level(merchant.as_str(), &i.sku, now_ms)
                    .is_some_and(|l| l.available < 0)
            })
            .map(|i| i.sku.clone())
            .collect();
        Ok(SellOutcome::Sold { hold, oversold })
    }

    async fn release(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        from: &[HoldState],
        now_ms: i64,
    ) -> Result<Option<Hold>, StoreError> {
        let now_ms = self.judged_now(now_ms);
        let mut g = self.lock();
        let Some(h) = g.by_order_mut(merchant, order) else {
            return Ok(None);
        };
        HoldTransition::Release {
            from: from.to_vec(),
        }
        .apply_if(h, now_ms);
        Ok(Some(h.clone()))
    }

    async fn stuck_during(
        &self,
        updated_before_ms: i64,
        after_hold_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Hold>, StoreError> {
        let g = self.lock();
        Ok(g.holds
            .values()
            .filter(|h| after_hold_id.is_none_or(|a| h.hold_id.as_str() > a))
            .filter(|h| h.state == HoldState::During && h.updated_at <= updated_before_ms)
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn release_stuck(&self, seen: &Hold, now_ms: i64) -> Result<bool, StoreError> {
        let now_ms = self.judged_now(now_ms);
        let mut g = self.lock();
        let rule = HoldTransition::ReleaseStuck {
            seen_version: seen.version,
        };
        Ok(g.holds
            .get_mut(&seen.hold_id)
            .is_some_and(|h| rule.apply_if(h, now_ms)))
    }

    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut g = self.lock();
        let gone: Vec<Hold> = g
            .holds
            .values()
            .filter(|h| purgeable(h, before_ms))
            .cloned()
            .collect();
        for h in &gone {
            g.holds.remove(&h.hold_id);
            g.by_order.remove(&(
                h.merchant_id.as_str().to_owned(),
                h.order_id.as_str().to_owned(),
            ));
        }
        Ok(gone.len() as u64)
    }
}

/// Whether housekeeping may delete `h`: released before `before_ms`, or
/// `pre` and expired before it.
pub(crate) fn purgeable(h: &Hold, before_ms: i64) -> bool {
    match h.state {
        HoldState::Released => h.updated_at < before_ms,
        HoldState::Pre => h.expires_at < before_ms,
        HoldState::During | HoldState::Sold => false,
    }
}
