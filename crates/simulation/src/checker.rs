//! The invariants, checked after every history once every fault is healed
//! and the batch and the reconciliation have run to completion:
//!
//! - **I1, no lost approval:** every approval the card company gave is paid
//!   and saved in exactly one ledger entry. The design allows "or in front
//!   of an operator", but the simulated card company never contradicts
//!   paygate and every fault is healed before the check, so here no
//!   approval may need a human (a canceled orphan must be alerted);
//! - **I2, no double charge:** at most one approval per orderId and per
//!   paymentKey, at most one payment id (idempotency key) ever sent to
//!   the card company for one order, and one payment record per order in
//!   the store (its claim names one payment);
//! - **partitions:** nothing in `completed_payments` unless paid and saved,
//!   nothing paid in `unpaid_payments`, no record in two partitions;
//! - **ledger:** every entry is for an order the card company approved;
//! - **I4, true answers:** a 200 only for an order already approved; a 402
//!   or a 503 ("nothing was charged") never for an order approved by a
//!   request made before that answer; and a 503 given at the answer
//!   deadline ("nothing was charged, and this request never will") never
//!   for a request whose confirm then called the card;
//! - **liveness:** once every fault is healed, a merchant's last retry
//!   gets a final answer: never 409 with nothing in flight, never 503;
//! - **events:** see `crate::events` (one event per applied transition);
//! - **ages:** a batch sweep changes a record only when the record's last
//!   change (by anyone) was at least the sweep's grace before the sweep
//!   started (DESIGN.md §1: ages count from the last transition, not from
//!   creation), less the disagreement of two clocks when they are skewed. Read from the sim's own journal of applied changes, not
//!   from the records' `updated_at`, so a wrong timestamp cannot hide it.

use std::collections::{BTreeMap, BTreeSet};

use paygate_core::{Partition, PaymentRecord};

use crate::{
    workload::{Answer, AnswerKind},
    world::{Actor, World},
};

/// One broken invariant, named and located.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// Which invariant (`I1`, `I2`, `I4`, `partition`, `ledger`,
    /// `liveness`, `age`).
    pub invariant: &'static str,
    /// The order (or payment) it is about.
    pub subject: String,
    /// What was seen.
    pub detail: String,
}

fn v(invariant: &'static str, subject: &str, detail: String) -> Violation {
    Violation {
        invariant,
        subject: subject.to_owned(),
        detail,
    }
}

/// Checks the world after a healed, settled history, whose state store
/// holds `snapshot` ([`crate::store::SimStore::snapshot`]); `finals` are
/// the answers to one more retry of every order once nothing was in flight.
pub fn check(
    world: &World,
    snapshot: &[(Partition, PaymentRecord)],
    answers: &[Answer],
    finals: &[Answer],
) -> Vec<Violation> {
    let mut out = Vec::new();
    let approvals = world.card.approvals();
    let ledger = world.ledger.entries();
    let alerts = world.alerts.all();
    let canceled = world.card.canceled();

    // Partitions.
    let mut seen = BTreeSet::new();
    for (part, r) in snapshot {
        if !seen.insert(r.payment_id.to_string()) {
            out.push(v(
                "partition",
                r.payment_id.as_str(),
                "record in two partitions".into(),
            ));
        }
        let ok = paygate_state_store::may_enter(*part, r);
        if !ok {
            out.push(v(
                "partition",
                r.payment_id.as_str(),
                format!(
                    "{} with is_paid={} is_saved={} ({})",
                    part.table(),
                    r.is_paid,
                    r.is_saved,
                    r.card_status.as_str()
                ),
            ));
        }
    }

    // I2 in the store: an order's claim names one payment, so one order
    // has one payment record (DESIGN.md I2, `GET /v1/payments/orders/{orderId}`).
    let mut payments_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (_, r) in snapshot {
        payments_of
            .entry(r.order_id.as_str())
            .or_default()
            .insert(r.payment_id.as_str());
    }
    for (order, pids) in &payments_of {
        if pids.len() > 1 {
            out.push(v(
                "I2",
                order,
                format!("{} payment records for one order: {pids:?}", pids.len()),
            ));
        }
    }

    // I2 at the card company.
    let mut per_order: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &approvals {
        *per_order.entry(&a.order_id).or_default() += 1;
        *per_key.entry(&a.payment_key).or_default() += 1;
    }
    for (order, n) in per_order.iter().filter(|(_, n)| **n > 1) {
        out.push(v("I2", order, format!("{n} approvals for one orderId")));
    }
    for (key, n) in per_key.iter().filter(|(_, n)| **n > 1) {
        out.push(v("I2", key, format!("{n} approvals for one paymentKey")));
    }
    for order in world.card.second_keys() {
        out.push(v(
            "I2",
            &order,
            "a second payment id was sent to the card company for one order".into(),
        ));
    }

    // I1: every approval ends recorded, or in front of an operator.
    let alerted = |pid: Option<&str>, order: &str| {
        alerts
            .iter()
            .any(|a| a.order_id == order || pid.is_some_and(|p| a.payment_id == p))
    };
    for a in &approvals {
        let records: Vec<_> = snapshot
            .iter()
            .filter(|(_, r)| r.order_id.as_str() == a.order_id)
            .collect();
        if canceled.contains(&a.order_id) {
            if !alerted(None, &a.order_id) {
                out.push(v(
                    "I1",
                    &a.order_id,
                    "approval canceled with no operator alert".into(),
                ));
            }
            continue;
        }
        let recorded = records.iter().any(|(_, r)| {
            r.is_paid
                && r.is_saved
                && ledger
                    .get(r.payment_id.as_str())
                    .is_some_and(|e| e.order_id == a.order_id)
        });
        // Strict: the simulated card company never contradicts paygate
        // (amounts match, paymentKeys are not shared, every fault is healed
        // before the check), so no approval here needs a human: each must
        // end recorded. An alert does not excuse it.
        if !recorded {
            let state = records
                .first()
                .map(|(p, r)| {
                    format!(
                        "{} {} in {} paid={} saved={}",
                        r.payment_id,
                        r.card_status.as_str(),
                        p.table(),
                        r.is_paid,
                        r.is_saved
                    )
                })
                .unwrap_or_else(|| "no record".into());
            out.push(v(
                "I1",
                &a.order_id,
                format!("approval neither recorded nor alerted: {state}"),
            ));
        }
    }

    // Ledger: every entry for an approved order, at most one per order.
    let approved: BTreeSet<&str> = approvals.iter().map(|a| a.order_id.as_str()).collect();
    let mut entries_per_order: BTreeMap<&str, usize> = BTreeMap::new();
    for e in ledger.values() {
        *entries_per_order.entry(&e.order_id).or_default() += 1;
        if !approved.contains(e.order_id.as_str()) {
            out.push(v(
                "ledger",
                &e.order_id,
                format!("ledger entry {} for an order never approved", e.payment_id),
            ));
        }
    }
    for (order, n) in entries_per_order.iter().filter(|(_, n)| **n > 1) {
        out.push(v(
            "ledger",
            order,
            format!("{n} ledger entries for one order"),
        ));
    }

    // Liveness: once nothing is in flight, a retry gets a final answer: no
    // 409, no UNKNOWN for an order the card company never received, and a
    // charged order is answered as charged (or is in front of an operator).
    // Sent, by the log (I3: no REQUEST row, no call).
    let requested: BTreeSet<String> = world
        .log
        .rows()
        .into_iter()
        .filter(|r| {
            r.kind == paygate_api_log::Kind::Request && r.path == paygate_card_api::CONFIRM_PATH
        })
        .map(|r| r.payment_id)
        .collect();
    let sent: BTreeSet<String> = snapshot
        .iter()
        .filter(|(_, r)| requested.contains(r.payment_id.as_str()))
        .map(|(_, r)| r.order_id.to_string())
        .collect();
    // I2: a card-account refusal (422 PAYMENT_KEY_REUSED / ORDER_ID_IN_USE)
    // comes before any record of the order, so the order was never sent.
    for ans in answers.iter().chain(finals) {
        if ans.kind == AnswerKind::Refused && sent.contains(&ans.order_id) {
            out.push(v(
                "I2",
                &ans.order_id,
                "refused by a card-account claim, yet its confirm was sent".to_owned(),
            ));
        }
    }
    for ans in finals {
        let charged = approvals.iter().any(|a| a.order_id == ans.order_id)
            && !canceled.contains(&ans.order_id);
        let stuck = match ans.kind {
            AnswerKind::InFlight => Some("409 although nothing is in flight"),
            AnswerKind::Unknown if !sent.contains(&ans.order_id) => {
                Some("UNKNOWN although no confirm was ever sent")
            }
            AnswerKind::Approved | AnswerKind::Reused | AnswerKind::Refused => None,
            // Every fault is healed: a store that cannot answer for the
            // order is a record the store itself cannot read or write (a
            // claim without its record), and the order can never be paid.
            AnswerKind::NotProcessed | AnswerKind::GaveUp => {
                Some("503 although every fault is healed")
            }
            _ if charged && !alerted(None, &ans.order_id) => {
                Some("charged, but a retry is not told so and no operator was alerted")
            }
            _ => None,
        };
        if let Some(what) = stuck {
            out.push(v(
                "liveness",
                &ans.order_id,
                format!("final retry answered {:?}: {what}", ans.kind),
            ));
        }
    }

    // Ages: a sweep acts only on records that were left alone for its grace.
    let skew_slack = if world.skews.is_some() {
        2 * crate::world::MAX_CLOCK_SKEW_MS as i64
    } else {
        0
    };
    let changes = world
        .changes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for c in &changes {
        let Actor::Sweep {
            started_ms,
            grace_ms,
        } = c.actor
        else {
            continue;
        };
        // With skewed clocks the sweep judges the grace by its own clock
        // against stamps from others (a create's from its replica's
        // clock): exact only to the two clocks' disagreement.
        let cutoff = started_ms - i64::try_from(grace_ms).unwrap_or(i64::MAX) + skew_slack;
        if let Some(young) = changes
            .iter()
            .find(|o| o.payment_id == c.payment_id && o.at_ms > cutoff && o.at_ms < started_ms)
        {
            out.push(v(
                "age",
                &c.payment_id,
                format!(
                    "a sweep started at {started_ms} ms with a grace of {grace_ms} ms made a {} at {} ms, but the record had a {} by {:?} at {} ms",
                    c.what, c.at_ms, young.what, young.actor, young.at_ms
                ),
            ));
        }
    }

    // I4: every answer was true when given.
    let calling = world.card.calling_requests();
    for ans in answers.iter().chain(finals) {
        let approved_before = approvals
            .iter()
            .any(|a| a.order_id == ans.order_id && a.request_seq < ans.seq);
        let lie = match ans.kind {
            AnswerKind::Approved => !approved_before,
            // A card-account refusal says this order was not charged: its
            // claims are permanent, so nothing can charge it later either.
            AnswerKind::Declined | AnswerKind::Unavailable | AnswerKind::Refused => approved_before,
            AnswerKind::GaveUp => calling.contains(&ans.request),
            _ => false,
        };
        if lie {
            let of_order: Vec<String> = approvals
                .iter()
                .filter(|a| a.order_id == ans.order_id)
                .map(|a| format!("{} (confirm arrived at {} ms)", a.key, a.request_at))
                .collect();
            out.push(v(
                "I4",
                &ans.order_id,
                format!(
                    "answered {:?} to request {} at {} ms; approvals: [{}]",
                    ans.kind,
                    ans.request,
                    ans.at_ms,
                    of_order.join(", ")
                ),
            ));
        }
    }
    out
}
