//! Guards fair load shedding (issue 15, point 4): a per-merchant cap on
//! requests in flight, under the global `inbound_max_concurrent`, so one
//! merchant holding many slow requests (slow uploads, slow card calls)
//! cannot take every slot from the others.
//!
//! A request counts against its merchant from the moment it is
//! authenticated ([`crate::auth::AuthedMerchant`] takes the slot) until its
//! handler returns its answer; a confirm's body is read after that, so a
//! slow upload counts. The slot is held by the [`hold`] middleware, not by
//! the extractor's value, because a confirm's request (and with it any
//! extension) is consumed by the body read while the request is still being
//! served. Over the cap: 429 `RATE_LIMITED` with `Retry-After` (the
//! merchant's own excess is shed; other merchants are served), counted in
//! `paygate_inbound_merchant_shed_total`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use axum::{extract::Request, middleware::Next, response::Response};

/// In-flight requests per merchant, capped. One per server; cheap to share.
#[derive(Debug)]
pub struct MerchantSlots {
    cap: usize,
    /// merchant id -> requests in flight (entries at 0 are removed, so the
    /// map holds only merchants with something in flight).
    in_flight: Mutex<HashMap<String, usize>>,
}

impl MerchantSlots {
    /// At most `cap` requests in flight per merchant (`cap >= 1`).
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // Never held across an await; a poisoned lock still holds counts.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one of `merchant`'s slots; `None` when it has `cap` in flight.
    pub fn try_acquire(self: &Arc<Self>, merchant: &str) -> Option<Slot> {
        let mut map = self.lock();
        let n = map.entry(merchant.to_owned()).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            merchant: merchant.to_owned(),
        })
    }

    /// Requests `merchant` has in flight now.
    pub fn in_flight(&self, merchant: &str) -> usize {
        self.lock().get(merchant).copied().unwrap_or(0)
    }
}

/// One request's slot; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<MerchantSlots>,
    merchant: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.slots.lock();
        if let Some(n) = map.get_mut(&self.merchant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.merchant);
            }
        }
    }
}

/// Where the authenticating extractor leaves the request's [`Slot`]; put in
/// the request's extensions by [`hold`], which drops the slot once the
/// handler has answered.
#[derive(Clone, Debug, Default)]
pub struct SlotHolder(Arc<Mutex<Option<Slot>>>);

impl SlotHolder {
    /// Keeps `slot` until the request is answered.
    pub fn keep(&self, slot: Slot) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(slot);
    }

    fn release(&self) {
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(slot);
    }
}

/// Middleware of the merchant routes: gives the request a [`SlotHolder`]
/// and releases the merchant's slot when the handler has answered (also
/// when the handler is dropped: the holder's last clone then drops it).
pub async fn hold(mut req: Request, next: Next) -> Response {
    let holder = SlotHolder::default();
    req.extensions_mut().insert(holder.clone());
    let resp = next.run(req).await;
    holder.release();
    resp
}

#[cfg(test)]
mod tests {
    use super::MerchantSlots;

    #[test]
    fn a_merchant_at_its_cap_is_refused_and_others_are_not() {
        let slots = MerchantSlots::new(2);
        let a1 = slots.try_acquire("a");
        let a2 = slots.try_acquire("a");
        assert!(a1.is_some() && a2.is_some());
        assert!(slots.try_acquire("a").is_none(), "a is at its cap");
        let b = slots.try_acquire("b");
        assert!(b.is_some(), "b has its own slots");
        drop(a1);
        assert_eq!(slots.in_flight("a"), 1);
        assert!(
            slots.try_acquire("a").is_some(),
            "a slot given back is free"
        );
        drop((a2, b));
        assert_eq!(slots.in_flight("a"), 0);
        assert!(slots.lock().is_empty(), "no entry kept for idle merchants");
    }
}
