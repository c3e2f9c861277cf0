//! The events checker: the outbound side of merchant webhooks.
//!
//! Read from the sim's own journal of applied changes (which sees a write
//! whose acknowledgement was lost as applied, because the record changed)
//! and from the store's events, after the history settled:
//!
//! - every applied transition that leaves an event has exactly one, of
//!   its type, and no event exists for a transition that did not apply
//!   (per payment, the journal's count of each type equals the events').
//!   On a real backend a process killed while its write is on the wire
//!   leaves a transition the database applied and the journal never saw
//!   (in memory a write has no await inside), so there the events may
//!   only outnumber the journal, never fall short of it;
//! - every cancel done has exactly one event, `payment.canceled` when it
//!   left nothing to cancel, else `payment.partially_canceled`, and no
//!   cancel that is not done has one;
//! - a payment's events have distinct ids and strictly increasing
//!   `(version, cancel_n)`, so a delivery in that order is a true story;
//! - the last payment event agrees with the record: an approval for a paid
//!   one (and only one approval), a decline for a declined one.

use std::collections::BTreeMap;

use paygate_core::{CardStatus, Partition, PaymentRecord};
use paygate_state_store::{CancelRecord, CancelStatus, Event, EventType};

use crate::{checker::Violation, world::World};

/// Every payment's events, by `payment_id`.
///
/// # Errors
/// The store's, when it cannot be read.
pub async fn snapshot_events(
    world: &World,
    snapshot: &[(Partition, PaymentRecord)],
) -> Result<BTreeMap<String, Vec<Event>>, paygate_state_store::StoreError> {
    let mut out = BTreeMap::new();
    for (_, r) in snapshot {
        let events = world.store.events_of(&r.payment_id).await?;
        out.insert(r.payment_id.to_string(), events);
    }
    Ok(out)
}

/// The checks of the module's doc.
pub fn check(
    world: &World,
    snapshot: &[(Partition, PaymentRecord)],
    events: &BTreeMap<String, Vec<Event>>,
    cancels: &BTreeMap<String, Vec<CancelRecord>>,
    exact: bool,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut bad = |subject: &str, detail: String| {
        out.push(Violation {
            invariant: "events",
            subject: subject.to_owned(),
            detail,
        });
    };
    let mut journaled: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
    for c in world
        .changes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        if let Some(kind) = c.event {
            *journaled
                .entry(c.payment_id.clone())
                .or_default()
                .entry(kind)
                .or_default() += 1;
        }
    }
    let mut out_undecided = Vec::new();
    for (_, r) in snapshot {
        let pid = r.payment_id.as_str();
        let none = Vec::new();
        let evs = events.get(pid).unwrap_or(&none);
        // Applied transitions and their events, type by type.
        let mut found: BTreeMap<&'static str, usize> = BTreeMap::new();
        for e in evs.iter().filter(|e| e.cancel_n == 0) {
            *found.entry(e.event_type.as_str()).or_default() += 1;
        }
        let want = journaled.get(pid).cloned().unwrap_or_default();
        let short = want
            .iter()
            .any(|(kind, n)| found.get(kind).copied().unwrap_or(0) < *n);
        if (exact && found != want) || short {
            bad(
                pid,
                format!("applied transitions leave {want:?} but the events are {found:?}"),
            );
        }
        // Ids and order.
        let mut ids: Vec<&str> = evs.iter().map(|e| e.event_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != evs.len() {
            bad(pid, "two events share an id".into());
        }
        let keys: Vec<(i64, i64)> = evs.iter().map(|e| (e.version, e.cancel_n)).collect();
        if !keys.windows(2).all(|w| w[0] < w[1]) {
            bad(
                pid,
                format!("events not in strict (version, cancel) order: {keys:?}"),
            );
        }
        // Healed and settled, nothing is left undecided.
        if !r.is_paid && matches!(r.card_status, CardStatus::Unknown | CardStatus::Pending) {
            out_undecided.push((
                pid.to_owned(),
                format!(
                    "{} v{} checks={} last_error={:?}",
                    r.card_status.as_str(),
                    r.version,
                    r.batch_attempts,
                    r.last_error
                ),
            ));
        }
        // The last payment event tells the record's outcome.
        let last = evs
            .iter()
            .rev()
            .find(|e| e.cancel_n == 0)
            .map(|e| e.event_type);
        let approvals = evs
            .iter()
            .filter(|e| e.event_type == EventType::Approved)
            .count();
        if r.is_paid && (last != Some(EventType::Approved) || approvals != 1) {
            bad(
                pid,
                format!("paid, but its last payment event is {last:?} ({approvals} approvals)"),
            );
        }
        if !r.is_paid && r.card_status == CardStatus::Aborted && last != Some(EventType::Declined) {
            bad(
                pid,
                format!("declined, but its last payment event is {last:?}"),
            );
        }
        // Cancels: one event per done cancel, of the right kind.
        let mut done: Vec<&CancelRecord> = cancels
            .get(pid)
            .map(|cs| {
                cs.iter()
                    .filter(|c| c.status == CancelStatus::Done)
                    .collect()
            })
            .unwrap_or_default();
        done.sort_by_key(|c| c.n);
        let cancel_events: BTreeMap<i64, EventType> = evs
            .iter()
            .filter(|e| e.cancel_n > 0)
            .map(|e| (e.cancel_n, e.event_type))
            .collect();
        if cancel_events.len() != evs.iter().filter(|e| e.cancel_n > 0).count() {
            bad(pid, "a cancel has two events".into());
        }
        let mut canceled = 0;
        for c in &done {
            canceled += c.amount;
            let want = if canceled >= r.amount {
                EventType::Canceled
            } else {
                EventType::PartiallyCanceled
            };
            match cancel_events.get(&c.n) {
                Some(t) if *t == want => {}
                other => bad(
                    pid,
                    format!(
                        "cancel {} is done; its event is {other:?}, not {want:?}",
                        c.n
                    ),
                ),
            }
        }
        for n in cancel_events.keys() {
            if !done.iter().any(|c| c.n == *n) {
                bad(pid, format!("cancel {n} has an event but is not done"));
            }
        }
    }
    for (pid, state) in out_undecided {
        bad(
            &pid,
            format!("left undecided after every fault healed: {state}"),
        );
    }
    out
}
