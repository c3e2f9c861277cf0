//! Merchants, as they behave: each order is confirmed, and retried (same
//! body) after no answer, 409 or 503; some orders race two identical
//! confirms, some send another body for the same order, some carry an
//! Idempotency-Key, and some reuse an earlier order's paymentKey. Every
//! answer is recorded with its time and request number, for the checker's
//! I4.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use paygate_core::{MerchantId, OrderId};
use paygate_payments::{ConfirmInput, ConfirmOutcome, EarlyAnswer};

use crate::{
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
    /// 422.
    Reused,
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
    other_body: bool,
    start_ms: u64,
}

/// The orders of one history, drawn from the seed.
pub fn orders(rng: &SimRng, merchants: &[MerchantId], n: usize, window_ms: u64) -> Vec<Order> {
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
            other_body: rng.chance(0.05),
            start_ms: rng.between(0, window_ms),
        });
    }
    out
}

impl Order {
    fn input(&self, amount: i64) -> ConfirmInput {
        ConfirmInput {
            merchant_id: self.merchant.clone(),
            payment_key: self.payment_key.clone(),
            order_id: OrderId::from_stored(self.order_id.clone()),
            amount,
            idempotency_key: self.key.clone(),
        }
    }
}

fn kind(reply: &Reply) -> AnswerKind {
    let o = match reply {
        Reply::Saga(o) => &**o,
        Reply::Early(EarlyAnswer::InProgress(_)) => return AnswerKind::Unknown,
        Reply::Early(EarlyAnswer::NothingCharged) => return AnswerKind::GaveUp,
    };
    match o {
        ConfirmOutcome::Approved(_) => AnswerKind::Approved,
        ConfirmOutcome::Declined { .. } => AnswerKind::Declined,
        ConfirmOutcome::Unknown(_) => AnswerKind::Unknown,
        ConfirmOutcome::InFlight(_) => AnswerKind::InFlight,
        ConfirmOutcome::Reused { .. } => AnswerKind::Reused,
        ConfirmOutcome::Unavailable {
            payment_id: Some(_),
            ..
        } => AnswerKind::Unavailable,
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
    let (request, reply) = gw.confirm(order.input(amount)).await?;
    let k = kind(&reply);
    answers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Answer {
            order_id: order.order_id.clone(),
            kind: k,
            at_ms: paygate_core::time::now_ms(),
            request,
        });
    Some(k)
}

/// After everything settled: the merchant asks once more (same body); the
/// answer is recorded as final.
pub async fn final_retry(gw: &Gateway, order: &Order, answers: &Answers) {
    if let Some((request, reply)) = gw.confirm(order.input(order.amount)).await {
        answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Answer {
                order_id: order.order_id.clone(),
                kind: kind(&reply),
                at_ms: paygate_core::time::now_ms(),
                request,
            });
    }
}

/// A merchant's client for one order: confirm, retry what got no final
/// answer (at most `tries` times, pausing within `pause_ms` between two),
/// with the order's quirks.
pub async fn client(
    gw: Gateway,
    order: Order,
    rng: SimRng,
    answers: Answers,
    tries: u32,
    pause_ms: (u64, u64),
) {
    tokio::time::sleep(Duration::from_millis(order.start_ms)).await;
    if order.race {
        let (gw2, o2, a2) = (gw.clone(), order.clone(), answers.clone());
        let racer =
            tokio::task::spawn_local(async move { confirm_once(&gw2, &o2, o2.amount, &a2).await });
        let _ = confirm_once(&gw, &order, order.amount, &answers).await;
        let _ = racer.await;
    }
    for attempt in 0..tries {
        if order.other_body && attempt == 1 {
            let _ = confirm_once(&gw, &order, order.amount + 1, &answers).await;
        }
        match confirm_once(&gw, &order, order.amount, &answers).await {
            Some(AnswerKind::Approved | AnswerKind::Declined | AnswerKind::Reused) => return,
            Some(AnswerKind::Unknown) if rng.chance(0.5) => return,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(rng.between(pause_ms.0, pause_ms.1))).await;
    }
}
