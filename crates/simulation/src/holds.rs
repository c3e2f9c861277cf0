//! Stock holds in the simulation (issue 17, I7): each merchant stocks one
//! SKU with fewer units than it has orders; most buyers take a hold (for a
//! TTL drawn from the seed, so many expire in simulated time before or
//! while their confirm runs), some abandon it (`DELETE`), and every order
//! is confirmed as before. A monitor reads every SKU's level every 50 ms of
//! simulated time; [`check`] then requires:
//!
//! - **I7, strictly:** `sold + active holds <= stock` at every instant
//!   sampled. An `oversold` alert is no excuse: a hold is `during` while
//!   its card call may be in flight and is released only by a guarded
//!   decision that the payment ended, so an approval after a release means
//!   a hold was released while its payment was live (the alert stays as
//!   the production safety net and is named in the violation);
//! - **sold = approved:** at the end, a hold is `sold` exactly when its order
//!   was approved by the card company, and every SKU's `sold` is the sum of
//!   its sold holds (no sale counted twice, none lost);
//! - **no hold left `during`** once its payment has ended (paid, or
//!   `ABORTED` unpaid): a confirm that died before selling or releasing it
//!   is made good by the batch's pass over stuck holds; only a payment
//!   still open (in front of an operator) may keep its hold.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use paygate_alert::AlertReason;
use paygate_core::{CardStatus, MerchantId, OrderId};
use paygate_state_store::{Hold, HoldItem, HoldState, InventoryStore};

use crate::{checker::Violation, rng::SimRng, workload::Order, world::World};

/// The SKU every merchant sells.
pub const SKU: &str = "sku-sim";

/// I7 breaches the monitor saw: (merchant, sku) -> first instant, ms.
pub type Breaches = Rc<RefCell<BTreeMap<(String, String), i64>>>;

/// Stocks each merchant's SKU (about a third of the orders, so buyers
/// compete), then takes, and sometimes abandons, a hold for most orders
/// before their confirm starts. Returns the tasks.
pub fn buyers(
    world: &Arc<World>,
    rng: &SimRng,
    merchants: &[MerchantId],
    orders: &[Order],
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let inventory = world.inventory.clone();
    let units = (orders.len() / (3 * merchants.len().max(1))).max(1) as i64;
    let stock: Vec<MerchantId> = merchants.to_vec();
    let inv = inventory.clone();
    // Stocked at time 0, before any hold.
    let now = paygate_core::ambient::now_ms();
    for m in &stock {
        let inv = inv.clone();
        let m = m.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let _ = inv.set_stock(&m, SKU, units, now).await;
        }));
    }
    for order in orders {
        if !rng.chance(0.7) {
            continue;
        }
        let inventory = inventory.clone();
        let (merchant, order_id) = (order.merchant().clone(), order.order_id().to_owned());
        let before = rng.between(0, order.start_ms().min(5_000));
        let at = order.start_ms().saturating_sub(before);
        let ttl_ms = rng.between(200, 20_000) as i64;
        let quantity = rng.between(1, 2) as i64;
        let abandon = rng.chance(0.15).then(|| rng.between(0, 3_000));
        tasks.push(tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(at)).await;
            let now = paygate_core::ambient::now_ms();
            let Ok(order_id) = OrderId::parse(&order_id) else {
                return;
            };
            let hold = Hold::new_pre(
                merchant.clone(),
                order_id.clone(),
                vec![HoldItem {
                    sku: SKU.to_owned(),
                    quantity,
                }],
                now + ttl_ms,
                format!("fp-{order_id}"),
                now,
            );
            let _ = inventory.take(&hold, now).await;
            if let Some(after) = abandon {
                tokio::time::sleep(Duration::from_millis(after)).await;
                let now = paygate_core::ambient::now_ms();
                let _ = inventory
                    .release(&merchant, &order_id, &[HoldState::Pre], now)
                    .await;
            }
        }));
    }
    tasks
}

/// Samples every SKU's level every 50 ms (simulated) until `until_ms`
/// after the start, recording the first instant each breaks I7.
pub fn monitor(world: &Arc<World>, until_ms: u64) -> (tokio::task::JoinHandle<()>, Breaches) {
    let breaches: Breaches = Rc::default();
    let seen = breaches.clone();
    let inventory = world.inventory.clone();
    let task = tokio::task::spawn_local(async move {
        let mut t = 0;
        while t <= until_ms {
            let now = paygate_core::ambient::now_ms();
            for (m, level) in inventory.levels(now) {
                if level.available < 0 {
                    seen.borrow_mut()
                        .entry((m.to_string(), level.sku.clone()))
                        .or_insert(now);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            t += 50;
        }
    });
    (task, breaches)
}

/// The hold checks of a settled history (see the module's doc).
pub fn check(
    world: &World,
    snapshot: &[(paygate_core::Partition, paygate_core::PaymentRecord)],
    breaches: &Breaches,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let oversold: BTreeSet<String> = world
        .alerts
        .all()
        .iter()
        .filter(|a| a.reason == AlertReason::Oversold)
        .map(|a| a.merchant_id.clone())
        .collect();
    let now = paygate_core::ambient::now_ms();
    let mut final_breach = breaches.borrow().clone();
    for (m, level) in world.inventory.levels(now) {
        if level.available < 0 {
            final_breach
                .entry((m.to_string(), level.sku.clone()))
                .or_insert(now);
        }
    }
    for ((m, sku), at) in final_breach {
        let alerted = if oversold.contains(&m) {
            "an oversold alert was raised, but no hold may be released while its payment is live"
        } else {
            "no oversold alert"
        };
        out.push(Violation {
            invariant: "I7",
            subject: format!("{m}/{sku}"),
            detail: format!("sold + active holds > stock at {at}: {alerted}"),
        });
    }
    let f = &world.inventory_faults;
    for (seen, what) in [
        (
            &f.sold_released,
            "an approval sold a hold that had been released: it was released while its payment was live",
        ),
        (
            &f.released_approved,
            "a during hold was released after the card company had approved its order",
        ),
    ] {
        for order in seen.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            out.push(Violation {
                invariant: "I7",
                subject: order.clone(),
                detail: what.into(),
            });
        }
    }
    let approved: BTreeSet<String> = world
        .card
        .approvals()
        .iter()
        .map(|a| a.order_id.clone())
        .collect();
    let canceled = world.card.canceled();
    let records: Vec<&paygate_core::PaymentRecord> = snapshot.iter().map(|(_, r)| r).collect();
    let mut sold_by: BTreeMap<String, i64> = BTreeMap::new();
    for h in world.inventory.holds() {
        let order = h.order_id.to_string();
        let sold = h.state == HoldState::Sold;
        if sold {
            *sold_by.entry(h.merchant_id.to_string()).or_default() +=
                h.items.iter().map(|i| i.quantity).sum::<i64>();
        }
        if sold != approved.contains(&order) && !canceled.contains(&order) {
            out.push(Violation {
                invariant: "I7",
                subject: order.clone(),
                detail: format!(
                    "hold is {} but the order was {}approved",
                    h.state.as_str(),
                    if approved.contains(&order) {
                        ""
                    } else {
                        "not "
                    }
                ),
            });
        }
        if h.state == HoldState::During {
            let ended = records
                .iter()
                .filter(|r| r.merchant_id == h.merchant_id && r.order_id == h.order_id)
                .find_map(|r| {
                    (r.is_paid || r.card_status == CardStatus::Aborted).then(|| {
                        format!(
                            "{} {} {}",
                            r.payment_id,
                            r.card_status.as_str(),
                            r.failure_code.as_deref().unwrap_or("-")
                        )
                    })
                });
            if let Some(status) = ended {
                out.push(Violation {
                    invariant: "I7",
                    subject: order.clone(),
                    detail: format!(
                        "hold left `during` (version {}) although its payment ended ({status}): stock held for nobody",
                        h.version
                    ),
                });
            }
        }
    }
    for (m, level) in world.inventory.levels(now) {
        let want = sold_by.get(m.as_str()).copied().unwrap_or(0);
        if level.sold != want {
            out.push(Violation {
                invariant: "I7",
                subject: format!("{m}/{}", level.sku),
                detail: format!("sold {} but sold holds add up to {want}", level.sold),
            });
        }
    }
    out
}
