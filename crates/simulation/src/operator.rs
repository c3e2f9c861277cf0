//! An operator in the history: paged by the alerts, they resolve payments
//! by hand with `paygate payments resolve --not-charged` (the same
//! [`paygate_payments::Decider`] the CLI runs, in a process of its own),
//! as a careful operator does: they look at the payment first (its
//! version, as `paygate payments show` prints it), read the console for a
//! moment, and decide "not charged" only for a payment still open; the
//! decision checks the card company itself and refuses what it
//! contradicts. An operator is a writer like any other: a decision that
//! lands on a payment a confirm is still sending is a lost approval, which
//! the checker's I1 and I7 see.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use paygate_alert::AlertReason;
use paygate_core::{CardStatus, Partition, PaymentId};
use paygate_payments::{Decider, Decision, ResolveRequest};

use crate::{
    rng::SimRng,
    world::{Actor, Incarnation, World},
};

/// Resolves open payments that were alerted, every few seconds until
/// `until_ms` of the history (drawing from `rng`, the operator's own
/// stream).
pub async fn operator(world: Arc<World>, rng: SimRng, until_ms: u64) {
    let mut tried: BTreeSet<String> = BTreeSet::new();
    while crate::faults::elapsed_ms() < until_ms {
        tokio::time::sleep(Duration::from_millis(rng.between(2_000, 10_000))).await;
        let paged: Vec<String> = world
            .alerts
            .all()
            .into_iter()
            .filter(|a| {
                matches!(
                    a.reason,
                    AlertReason::OutcomeUnknown | AlertReason::StoreFailedAfterApproval
                )
            })
            .map(|a| a.payment_id)
            .filter(|p| !tried.contains(p))
            .collect();
        for pid in paged {
            let inc = Incarnation::start(&world, Actor::Operator);
            let id = PaymentId::from_stored(pid.clone());
            // `paygate payments show`: the record as the operator sees it.
            let Ok(Some((part, r))) = inc.store.get(&id).await else {
                continue;
            };
            if part != Partition::Realtime
                || r.is_paid
                || !matches!(r.card_status, CardStatus::Pending | CardStatus::Unknown)
            {
                tried.insert(pid);
                continue;
            }
            // Reading the card company's console: an operator who sees an
            // approval there does not resolve "not charged", whatever a
            // lookup that failed says (an unverified decision is theirs).
            tokio::time::sleep(Duration::from_millis(rng.between(0, 3_000))).await;
            if world.card.approved_amount(r.order_id.as_str()).is_some() {
                continue;
            }
            let decider = Decider::new(inc.store.clone(), inc.saga.clone(), 5);
            let req = ResolveRequest {
                payment_id: id,
                decision: Decision::NotCharged,
                reason: "not in the card company's console".to_owned(),
                operator: "sim-operator".to_owned(),
                force: false,
                seen_version: Some(r.version),
            };
            match decider.decide(&req).await {
                Ok(_) => {
                    tracing::info!(payment_id = %pid, "sim: an operator resolved a payment as not charged");
                    tried.insert(pid);
                }
                Err(e) => {
                    tracing::info!(payment_id = %pid, error = %e, "sim: an operator's resolve was refused");
                }
            }
        }
    }
}
