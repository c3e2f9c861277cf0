//! Merchants' cancels (refunds) in the workload, and the checks that hold
//! paygate's cancels to the card company's refunds and the ledger's
//! reversals.
//!
//! After an approval, some merchants refund: one to three cancels, partial
//! or of what is left, each at a replica drawn for it, some with an
//! `Idempotency-Key` (retried with it after 202, 409 or 503), some without
//! (a retry is then a new cancel), and some raced by a second identical
//! request at another replica. The draws come from a stream of their own,
//! so the confirms of a history draw what they drew before cancels existed.
//!
//! Checked once every fault is healed and the batch and the reconciliation
//! have settled the history:
//! - per payment, the refunds at the card company are at most the approval
//!   and equal paygate's `DONE` cancels one to one (key and amount);
//! - one ledger reversal per `DONE` cancel, none for any other;
//! - no cancel is left `PENDING` or `UNKNOWN`;
//! - no 503 "nothing was canceled" to a request whose claimed cancel the
//!   card company applied;
//! - no false page: an alert that the card company contradicts a payment
//!   (`card_mismatch`, `amount_mismatch`, `paid_not_approved`,
//!   `cancel_mismatch`) is raised only for a payment whose end state the
//!   card company does contradict (the simulated card company never
//!   contradicts paygate by itself).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use paygate_alert::AlertReason;
use paygate_core::{MerchantId, Partition, PaymentId, PaymentRecord};
use paygate_payments::{CancelInput, CancelOutcome};
use paygate_state_store::{CancelRecord, CancelStatus};

use crate::{checker::Violation, gateway::Gateway, rng::SimRng, world::World};

/// What a merchant was told about a cancel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum CancelKind {
    /// 200.
    Canceled,
    /// 202 (the saga's, or the answer deadline's).
    Unknown,
    /// 404.
    NotFound,
    /// 409 `NOT_APPROVED`.
    NotApproved,
    /// 409 `CANCEL_IN_PROGRESS`.
    InProgress,
    /// 422 `CANCEL_AMOUNT_EXCEEDS_BALANCE`.
    ExceedsBalance,
    /// 422 `IDEMPOTENCY_KEY_REUSED`.
    KeyReused,
    /// 422 with the card company's code.
    Refused,
    /// 503: nothing was canceled.
    Unavailable,
}

impl CancelKind {
    fn of(outcome: Option<&CancelOutcome>) -> Self {
        match outcome {
            None | Some(CancelOutcome::Unknown(_)) => Self::Unknown,
            Some(CancelOutcome::Canceled(_)) => Self::Canceled,
            Some(CancelOutcome::NotFound) => Self::NotFound,
            Some(CancelOutcome::NotApproved) => Self::NotApproved,
            Some(CancelOutcome::InProgress) => Self::InProgress,
            Some(CancelOutcome::ExceedsBalance { .. }) => Self::ExceedsBalance,
            Some(CancelOutcome::KeyReused) => Self::KeyReused,
            Some(CancelOutcome::Refused { .. }) => Self::Refused,
            Some(CancelOutcome::Unavailable { .. }) => Self::Unavailable,
        }
    }

    /// Whether the merchant retries (same body, same key) after it.
    fn retry(self) -> bool {
        matches!(self, Self::Unknown | Self::InProgress | Self::Unavailable)
    }
}

/// One cancel answer a merchant got.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CancelAnswer {
    /// The order.
    pub order_id: String,
    /// The payment.
    pub payment_id: String,
    /// The request's number (see [`crate::gateway::REQUEST`]).
    pub request: u64,
    /// The answer.
    pub kind: CancelKind,
}

/// The cancel answers of one history.
pub type CancelAnswers = Arc<Mutex<Vec<CancelAnswer>>>;

/// An approved order a merchant may refund.
pub struct Approved<'a> {
    /// The merchant.
    pub merchant: &'a MerchantId,
    /// The order.
    pub order_id: &'a str,
    /// Its payment, as the 200 named it.
    pub payment_id: &'a PaymentId,
    /// The amount approved, minor units.
    pub amount: i64,
}

async fn cancel_once(
    gw: &Gateway,
    input: CancelInput,
    order_id: &str,
    answers: &CancelAnswers,
) -> Option<CancelKind> {
    let payment_id = input.payment_id.to_string();
    let (request, outcome, _) = gw.cancel(input).await?;
    let kind = CancelKind::of(outcome.as_ref());
    tracing::info!(order_id, request, answer = ?kind, "sim: a merchant's cancel was answered");
    answers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(CancelAnswer {
            order_id: order_id.to_owned(),
            payment_id,
            request,
            kind,
        });
    Some(kind)
}

/// A merchant's refunds of one approved order, drawn from `rng` (the
/// cancels' own stream): nothing for most orders.
pub async fn refund(gw: Gateway, paid: Approved<'_>, rng: SimRng, answers: CancelAnswers) {
    if !rng.chance(0.35) {
        return;
    }
    let n = rng.between(1, 3);
    for i in 0..n {
        tokio::time::sleep(Duration::from_millis(rng.between(0, 3_000))).await;
        let amount = if rng.chance(0.4) {
            None
        } else {
            Some(100 * rng.between(1, (paid.amount / 200).max(1) as u64) as i64)
        };
        let key = rng
            .chance(0.6)
            .then(|| format!("cancel-{}-{i}", paid.order_id));
        let input = CancelInput {
            merchant_id: paid.merchant.clone(),
            payment_id: paid.payment_id.clone(),
            reason: "customer asked".to_owned(),
            amount,
            idempotency_key: key.clone(),
        };
        let racer = rng.chance(0.2).then(|| {
            let (gw, input, order, answers) = (
                gw.clone(),
                input.clone(),
                paid.order_id.to_owned(),
                answers.clone(),
            );
            tokio::task::spawn_local(async move { cancel_once(&gw, input, &order, &answers).await })
        });
        for _ in 0..4 {
            match cancel_once(&gw, input.clone(), paid.order_id, &answers).await {
                Some(kind) if !kind.retry() => break,
                // Without a key a retry is a new cancel: a merchant that
                // sends none retries only on a 503 ("nothing was canceled").
                Some(kind) if key.is_none() && kind != CancelKind::Unavailable => break,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(rng.between(200, 4_000))).await;
        }
        if let Some(r) = racer {
            let _ = r.await;
        }
    }
}

/// The cancels of every payment in `snapshot` that has any, by payment id,
/// read from the world's store.
///
/// # Errors
/// [`paygate_state_store::StoreError`] when the store cannot be read.
pub async fn snapshot_cancels(
    world: &World,
    snapshot: &[(Partition, PaymentRecord)],
) -> Result<BTreeMap<String, Vec<CancelRecord>>, paygate_state_store::StoreError> {
    let mut out = BTreeMap::new();
    for (_, r) in snapshot {
        let cancels = world.store.cancels_of(&r.payment_id).await?;
        if !cancels.is_empty() {
            out.insert(r.payment_id.to_string(), cancels);
        }
    }
    Ok(out)
}

/// The checks of the module's doc.
pub fn check(
    world: &World,
    snapshot: &[(Partition, PaymentRecord)],
    cancels: &BTreeMap<String, Vec<CancelRecord>>,
    answers: &[CancelAnswer],
) -> Vec<Violation> {
    let v = |invariant, subject: &str, detail: String| Violation {
        invariant,
        subject: subject.to_owned(),
        detail,
    };
    let mut out = Vec::new();
    let refunds = world.card.refunds();
    // Merchants' refunds at the card company, by cancel key.
    let mut at_card: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut refunded: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &refunds {
        *refunded.entry(r.order_id.as_str()).or_default() += r.amount;
        if r.key.contains(":cancel:")
            && at_card
                .insert(r.key.clone(), (r.order_id.clone(), r.amount))
                .is_some()
        {
            out.push(v(
                "cancel",
                &r.order_id,
                format!("two refunds at the card company under one key {}", r.key),
            ));
        }
    }
    for (order, total) in &refunded {
        let approved = world.card.approved_amount(order).unwrap_or(0);
        if *total > approved {
            out.push(v(
                "cancel",
                order,
                format!("refunded {total} of an approval of {approved}"),
            ));
        }
    }
    let order_of: BTreeMap<&str, &str> = snapshot
        .iter()
        .map(|(_, r)| (r.payment_id.as_str(), r.order_id.as_str()))
        .collect();
    let reversals = world.ledger.reversals();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut troubled: BTreeSet<String> = BTreeSet::new();
    for (pid, list) in cancels {
        let order = order_of.get(pid.as_str()).copied().unwrap_or("?");
        for c in list {
            let key = c.idempotency_key_downstream();
            let card = at_card.get(&key);
            let mut bad = |what: String| {
                out.push(v("cancel", order, format!("{pid} cancel {}: {what}", c.n)));
                troubled.insert(order.to_owned());
            };
            match (c.status, card) {
                (CancelStatus::Done, Some((_, amount))) if *amount == c.amount => {}
                (CancelStatus::Done, Some((_, amount))) => bad(format!(
                    "DONE for {}, the card company refunded {amount}",
                    c.amount
                )),
                (CancelStatus::Done, None) => {
                    bad("DONE, but the card company made no such refund".into())
                }
                (status, Some((_, amount))) => bad(format!(
                    "{} ({:?}), but the card company refunded {amount}",
                    status.as_str(),
                    c.failure_code
                )),
                (CancelStatus::Pending | CancelStatus::Unknown, None) => bad(format!(
                    "left {} once everything settled (batch attempts {}, last error {:?})",
                    c.status.as_str(),
                    c.batch_attempts,
                    c.last_error
                )),
                (CancelStatus::Failed, None) => {}
            }
            if c.status == CancelStatus::Done {
                done.insert(key.clone());
                match reversals.get(&key) {
                    Some(r) if r.cancel_amount == c.amount => {}
                    Some(r) => bad(format!(
                        "reversed {} in the ledger for a cancel of {}",
                        r.cancel_amount, c.amount
                    )),
                    None => bad("DONE without its ledger reversal".into()),
                }
            }
        }
    }
    for (key, (order, amount)) in &at_card {
        let known = cancels
            .values()
            .flatten()
            .any(|c| c.idempotency_key_downstream() == *key);
        if !known {
            out.push(v(
                "cancel",
                order,
                format!("refund of {amount} at the card company ({key}) that paygate holds no cancel for"),
            ));
            troubled.insert(order.clone());
        }
    }
    for key in reversals.keys().filter(|k| !done.contains(*k)) {
        out.push(v(
            "cancel",
            key,
            "ledger reversal for a cancel that is not DONE".into(),
        ));
    }
    // No 503 "nothing was canceled" for a claimed cancel the card applied.
    let claims = world
        .cancel_claims
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for a in answers.iter().filter(|a| a.kind == CancelKind::Unavailable) {
        let Some((pid, n)) = claims.get(&a.request) else {
            continue;
        };
        let key = format!("{pid}:cancel:{n}");
        if at_card.contains_key(&key) {
            out.push(v(
                "I4",
                &a.order_id,
                format!(
                    "request {} answered 503 \"nothing was canceled\", but the card company applied its cancel {n}",
                    a.request
                ),
            ));
        }
    }
    // No false page: the card company contradicts a payment only when
    // paygate's end state is wrong, and then a violation above names it.
    let contradicting = [
        AlertReason::CardMismatch,
        AlertReason::AmountMismatch,
        AlertReason::PaidNotApproved,
        AlertReason::CancelMismatch,
    ];
    let recorded: BTreeSet<&str> = snapshot
        .iter()
        .filter(|(_, r)| r.is_paid && r.is_saved)
        .map(|(_, r)| r.order_id.as_str())
        .collect();
    for a in world.alerts.all() {
        if !contradicting.contains(&a.reason) || troubled.contains(&a.order_id) {
            continue;
        }
        if recorded.contains(a.order_id.as_str())
            && world.card.approved_amount(&a.order_id).is_some()
        {
            out.push(v(
                "false_page",
                &a.order_id,
                format!(
                    "{} alerted for {}, whose end state the card company agrees with: {}",
                    a.reason.as_str(),
                    a.payment_id,
                    a.detail
                ),
            ));
        }
    }
    out
}
