//! Merchants, as they behave: each order is confirmed, and retried (same
//! body) after no answer, 409 or 503; some orders race two identical
//! confirms, some send another body for the same order, some carry an
//! Idempotency-Key, and some reuse an earlier order's paymentKey (refused
//! with 422 `PAYMENT_KEY_REUSED` since issue 15). On a real backend, a
//! fifth of the orders are also sent by a buggy client: a racing confirm
//! that carries an earlier order's Idempotency-Key (422
//! `IDEMPOTENCY_KEY_REUSED`), racing the order's own confirm through the
//! store's create (issue 13, point 2: on MongoDB the create is several
//! writes, and this is the race its claim protocol must survive).
//! Every answer is recorded with its time and request number, for the
//! checker's I4.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use paygate_core::{MerchantId, OrderId, PaymentId};
use paygate_payments::{ConfirmInput, ConfirmOutcome, EarlyAnswer};

use crate::{
    cancels::CancelAnswers,
    gateway::{Gateway, Reply},
    rng::SimRng,
};

/// What a merchant was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum AnswerKind {
    /// 200.
    Approved,
    /// 402.
    Declined,
    /// 202.
    Unknown,
    /// 409.
    InFlight,
    /// 422 `ORDER_ID_REUSED` / `IDEMPOTENCY_KEY_REUSED`.
    Reused,
    /// 422 `PAYMENT_KEY_REUSED` / `ORDER_ID_IN_USE`: refused by a card-account
    /// claim before any card call (nothing written for this request).
    Refused,
    /// 503 with a paymentId: nothing was charged for the order's payment.
    Unavailable,
    /// 503 without a paymentId: the store could not be read; only this
    /// request is promised to have charged nothing.
    NotProcessed,
    /// 503 at the gateway's answer deadline, before the record was durable:
    /// this request charged nothing and never will (its saga makes no card
    /// call).
    GaveUp,
}

/// One answer a merchant got.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Answer {
    /// The order.
    pub order_id: String,
    /// The answer.
    pub kind: AnswerKind,
    /// When it was given, epoch ms.
    pub at_ms: i64,
    /// The request's number (see [`crate::gateway::REQUEST`]).
    pub request: u64,
    /// Its place in the history's causal order ([`crate::next_event`]).
    pub seq: u64,
}

/// The answers of one history.
pub type Answers = Arc<Mutex<Vec<Answer>>>;

/// One order a merchant will confirm.
#[derive(Clone, Debug)]
pub struct Order {
    merchant: MerchantId,
    order_id: String,
    payment_key: String,
    amount: i64,
    key: Option<String>,
    race: bool,
    /// The racer of a racing pair sends this key, another order's.
    borrowed_key: Option<String>,
    other_body: bool,
    start_ms: u64,
}

/// The orders of one history, drawn from the seed. `borrow`: the RNG of
/// the borrowed-key quirk, drawn only on a real backend (a stream apart,
/// so the in-memory histories, pinned seeds included, draw what they
/// always drew).
pub fn orders(
    rng: &SimRng,
    borrow: Option<&SimRng>,
    merchants: &[MerchantId],
    n: usize,
    window_ms: u64,
) -> Vec<Order> {
    let mut out: Vec<Order> = Vec::with_capacity(n);
    for i in 0..n {
        let order_id = format!("order-{i:04}");
        let payment_key = if i > 0 && rng.chance(0.05) {
            out[rng.pick(out.len())].payment_key.clone()
        } else {
            format!("pk_{i:04}")
        };
        out.push(Order {
            merchant: merchants[rng.pick(merchants.len())].clone(),
            order_id: order_id.clone(),
            payment_key,
            amount: 1_000 + rng.between(0, 99) as i64 * 100,
            key: rng.chance(0.3).then(|| format!("key-{order_id}")),
            race: rng.chance(0.1),
            borrowed_key: None,
            other_body: rng.chance(0.05),
            start_ms: rng.between(0, window_ms),
        });
    }
    if let Some(b) = borrow {
        // The key of an order of the same merchant (a key is the
        // merchant's) that started earlier, so that it is likely taken.
        for i in 0..out.len() {
            if !b.chance(0.2) {
                continue;
            }
            let earlier: Vec<usize> = (0..out.len())
                .filter(|&j| {
                    j != i
                        && out[j].merchant == out[i].merchant
                        && out[j].key.is_some()
                        && out[j].start_ms < out[i].start_ms
                })
                .collect();
            if earlier.is_empty() {
                continue;
            }
            let j = earlier[b.pick(earlier.len())];
            out[i].race = true;
            out[i].borrowed_key = out[j].key.clone();
        }
    }
    out
}

impl Order {
    /// The merchant.
    pub fn merchant(&self) -> &MerchantId {
        &self.merchant
    }

    /// The order id.
    pub fn order_id(&self) -> &str {
        &self.order_id
    }

    /// When its first confirm starts, ms after the history's start.
    pub fn start_ms(&self) -> u64 {
        self.start_ms
    }

    fn input(&self, amount: i64) -> ConfirmInput {
        ConfirmInput {
            merchant_id: self.merchant.clone(),
            payment_key: self.payment_key.clone(),
            order_id: OrderId::from_stored(self.order_id.clone()),
            amount,
            idempotency_key: self.key.clone(),
        }
    }

    /// This order as the racer sends it: with the borrowed key, if any.
    fn racer(&self) -> Order {
        Order {
            key: self.borrowed_key.clone().or_else(|| self.key.clone()),
            ..self.clone()
        }
    }
}

fn kind(reply: &Reply) -> AnswerKind {
    let o = match reply {
        Reply::Saga(o) => o.as_ref(),
        Reply::Early(EarlyAnswer::InProgress(_)) => return AnswerKind::Unknown,
        Reply::Early(EarlyAnswer::NothingCharged) => return AnswerKind::GaveUp,
    };
    match o {
        ConfirmOutcome::Approved(_) => AnswerKind::Approved,
        ConfirmOutcome::Declined { .. } => AnswerKind::Declined,
        ConfirmOutcome::Unknown(_) => AnswerKind::Unknown,
        ConfirmOutcome::InFlight(_) => AnswerKind::InFlight,
        ConfirmOutcome::Reused { .. } => AnswerKind::Reused,
        ConfirmOutcome::Refused(_) => AnswerKind::Refused,
        ConfirmOutcome::Unavailable {
            payment_id: Some(_),
            ..
        }
        | ConfirmOutcome::HoldExpired { .. } => AnswerKind::Unavailable,
        ConfirmOutcome::Unavailable {
            payment_id: None, ..
        } => AnswerKind::NotProcessed,
    }
}

/// One confirm through the current gateway; `None` when the gateway died
/// before answering (the connection dropped).
async fn confirm_once(
    gw: &Gateway,
    order: &Order,
    amount: i64,
    answers: &Answers,
) -> Option<AnswerKind> {
    confirm_once_paid(gw, order, amount, answers)
        .await
        .map(|(k, _)| k)
}

/// [`confirm_once`], with the payment a 200 named.
async fn confirm_once_paid(
    gw: &Gateway,
    order: &Order,
    amount: i64,
    answers: &Answers,
) -> Option<(AnswerKind, Option<PaymentId>)> {
    let (request, reply, seq) = gw.confirm(order.input(amount)).await?;
    let k = kind(&reply);
    let paid = match &reply {
        Reply::Saga(o) => match o.as_ref() {
            ConfirmOutcome::Approved(r) => Some(r.payment_id.clone()),
            _ => None,
        },
        Reply::Early(_) => None,
    };
    tracing::info!(order_id = %order.order_id, key = ?order.key, request, answer = ?k,
        "sim: a merchant was answered");
    answers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Answer {
            order_id: order.order_id.clone(),
            kind: k,
            at_ms: paygate_core::time::now_ms(),
            request,
            seq,
        });
    Some((k, paid))
}

/// After everything settled: the merchant asks once more (same body); the
/// answer is recorded as final.
pub async fn final_retry(gw: &Gateway, order: &Order, answers: &Answers) {
    if let Some((request, reply, seq)) = gw.confirm(order.input(order.amount)).await {
        tracing::info!(order_id = %order.order_id, request, answer = ?kind(&reply),
            "sim: a merchant's final retry was answered");
        answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Answer {
                order_id: order.order_id.clone(),
                kind: kind(&reply),
                at_ms: paygate_core::time::now_ms(),
                request,
                seq,
            });
    }
}

/// A merchant's client for one order: confirm, retry what got no final
/// answer (at most `tries` times, pausing within `pause_ms` between two),
/// with the order's quirks; once approved, the merchant may refund it
/// ([`crate::cancels::refund`], drawing from `refunds`' stream).
pub async fn client(
    gw: Gateway,
    order: Order,
    rng: SimRng,
    answers: Answers,
    tries: u32,
    pause_ms: (u64, u64),
    refunds: Option<(SimRng, CancelAnswers)>,
) {
    tokio::time::sleep(Duration::from_millis(order.start_ms)).await;
    if order.race {
        if let Some(key) = &order.borrowed_key {
            tracing::info!(order_id = %order.order_id, key = %key,
                "sim: a racing confirm carries another order's Idempotency-Key");
        }
        let (gw2, o2, a2) = (gw.clone(), order.racer(), answers.clone());
        let racer =
            tokio::task::spawn_local(async move { confirm_once(&gw2, &o2, o2.amount, &a2).await });
        let _ = confirm_once(&gw, &order, order.amount, &answers).await;
        let _ = racer.await;
    }
    for attempt in 0..tries {
        if order.other_body && attempt == 1 {
            let _ = confirm_once(&gw, &order, order.amount + 1, &answers).await;
        }
        match confirm_once_paid(&gw, &order, order.amount, &answers).await {
            Some((AnswerKind::Approved, paid)) => {
                if let (Some(pid), Some((rng, cancel_answers))) = (paid, refunds) {
                    let paid = crate::cancels::Approved {
                        merchant: &order.merchant,
                        order_id: &order.order_id,
                        payment_id: &pid,
                        amount: order.amount,
                    };
                    crate::cancels::refund(gw.clone(), paid, rng, cancel_answers).await;
                }
                return;
            }
            Some((AnswerKind::Declined | AnswerKind::Reused | AnswerKind::Refused, _)) => return,
            Some((AnswerKind::Unknown, _)) if rng.chance(0.5) => return,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(rng.between(pause_ms.0, pause_ms.1))).await;
    }
}
