//! The invariant checker (I1, I2): compares the card company's record of
//! approvals with paygate's stores and the alert outbox, approval by
//! approval. Run as `paygate check` against the sandbox card API (whose
//! `GET /sandbox/approvals` lists every approval it gave), and called by the
//! crash and outage tests.
//!
//! Each approved order is exactly one of:
//! - **completed**: paid and saved (in the ledger);
//! - **paid-unsaved**: paid, not yet saved, in `realtime_payments` — the
//!   batch saves it;
//! - **pending**: not yet paid, `PENDING`/`UNKNOWN` in `realtime_payments` —
//!   the batch or the reconciliation settles it by lookup;
//! - **unknown-alerted**: anything else about which an operator was alerted;
//! - **lost**: none of the above (I1 broken).
//!
//! A **double charge** is an order the card company approved more than once (I2).
//!
//! Cancels (refunds): an approved order the card company has canceled (in
//! part or whole) is still one of the states above (a canceled payment was
//! approved, paid and saved); besides, the sum of paygate's `DONE` cancels
//! of it must equal what the card company canceled, unless a cancel is in
//! flight (the batch settles it) or an operator was alerted about the
//! payment; otherwise it is a **cancel mismatch** (a refund one side holds
//! and the other does not).

use std::collections::{HashMap, HashSet};

use paygate_alert::SqlOutbox;
use paygate_core::{CardStatus, Partition, PaymentRecord};
use paygate_state_store::{StateStore, StoreError};
use serde::Serialize;

/// One approval as the card company recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardApproval {
    /// The order.
    pub order_id: String,
    /// The payment key approved.
    pub payment_key: String,
    /// Canceled of it at the card company so far, minor units.
    pub canceled_amount: i64,
}

/// What the checker found. `--json` prints these keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Approvals at the card company (every one, doubles included).
    pub approvals: u64,
    /// Approved orders paid and saved.
    pub completed: u64,
    /// Approved orders paid, not saved, waiting for the batch.
    pub paid_unsaved: u64,
    /// Approved orders not yet paid in paygate, waiting for a lookup.
    pub pending: u64,
    /// Approved orders an operator was alerted about.
    pub unknown_alerted: u64,
    /// Approved orders in none of those states.
    pub lost: u64,
    /// Orders approved more than once.
    pub double_charges: u64,
    /// The lost orders (at most 20), for the operator.
    pub lost_orders: Vec<String>,
    /// Approved orders with cancels, paygate's and the card's agreeing.
    pub canceled: u64,
    /// Approved orders whose cancels differ (see the module doc).
    pub cancel_mismatches: u64,
    /// The orders with a cancel mismatch (at most 20).
    pub cancel_mismatch_orders: Vec<String>,
}

impl CheckReport {
    /// True when no approval is lost and none is doubled.
    pub fn holds(&self) -> bool {
        self.lost == 0 && self.double_charges == 0 && self.cancel_mismatches == 0
    }
}

/// Checks `approvals` against the store and the outbox.
///
/// # Errors
/// [`StoreError`] when a store cannot be read.
pub async fn check(
    store: &dyn StateStore,
    outbox: &SqlOutbox,
    approvals: &[CardApproval],
) -> Result<CheckReport, StoreError> {
    let mut report = CheckReport {
        approvals: approvals.len() as u64,
        ..CheckReport::default()
    };
    let mut per_order: HashMap<&str, Vec<&CardApproval>> = HashMap::new();
    for a in approvals {
        per_order.entry(a.order_id.as_str()).or_default().push(a);
    }
    report.double_charges = per_order.values().filter(|v| v.len() > 1).count() as u64;
    let alerted: HashSet<String> = outbox
        .all()
        .await?
        .into_iter()
        .filter_map(|row| row.dedup_key.split(':').next().map(str::to_owned))
        .collect();
    let orders: Vec<&str> = per_order.keys().copied().collect();
    for chunk in orders.chunks(500) {
        let ids: Vec<String> = chunk.iter().map(|o| (*o).to_owned()).collect();
        let mut records: HashMap<String, Vec<(Partition, PaymentRecord)>> = HashMap::new();
        for (p, r) in store.find_by_order_ids(&ids).await? {
            records
                .entry(r.order_id.to_string())
                .or_default()
                .push((p, r));
        }
        for order in chunk {
            let key = &per_order[order][0].payment_key;
            let found = records.get(*order).and_then(|rs| {
                rs.iter()
                    .find(|(_, r)| &r.payment_key == key)
                    .or_else(|| rs.first())
            });
            let pending = |r: &PaymentRecord| {
                matches!(r.card_status, CardStatus::Pending | CardStatus::Unknown)
            };
            if let Some((_, r)) = found.filter(|(_, r)| r.is_paid) {
                let card = per_order[order][0].canceled_amount;
                check_cancels(store, r, card, &alerted, &mut report).await?;
            }
            match found {
                Some((_, r)) if r.is_paid && r.is_saved => report.completed += 1,
                Some((Partition::Realtime, r)) if r.is_paid => report.paid_unsaved += 1,
                Some((_, r)) if alerted.contains(r.payment_id.as_str()) => {
                    report.unknown_alerted += 1;
                }
                Some((Partition::Realtime, r)) if pending(r) => report.pending += 1,
                None if alerted.contains(&format!("orphan_{order}")) => {
                    report.unknown_alerted += 1;
                }
                _ => {
                    report.lost += 1;
                    if report.lost_orders.len() < 20 {
                        report.lost_orders.push((*order).to_owned());
                    }
                }
            }
        }
    }
    Ok(report)
}

/// Compares paygate's done cancels of a paid record with what the card
/// company canceled of it.
async fn check_cancels(
    store: &dyn StateStore,
    r: &PaymentRecord,
    card_canceled: i64,
    alerted: &HashSet<String>,
    report: &mut CheckReport,
) -> Result<(), StoreError> {
    let cancels = store.cancels_of(&r.payment_id).await?;
    let done: i64 = cancels
        .iter()
        .filter(|c| c.status == paygate_state_store::CancelStatus::Done)
        .map(|c| c.amount)
        .sum();
    let in_flight = cancels.iter().any(|c| c.status.in_flight());
    if done == card_canceled {
        if done > 0 {
            report.canceled += 1;
        }
    } else if !in_flight && !alerted.contains(r.payment_id.as_str()) {
        report.cancel_mismatches += 1;
        if report.cancel_mismatch_orders.len() < 20 {
            report.cancel_mismatch_orders.push(r.order_id.to_string());
        }
    }
    Ok(())
}
