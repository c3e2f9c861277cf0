//! The card company, modelled in memory with Toss Payments v1 semantics
//! (DESIGN.md §6) and faults drawn from the history's seed.
//!
//! What it does that matters to paygate's invariants:
//! - an idempotency key is scoped to its call (`confirm`, or the cancel of
//!   one paymentKey); a repeat while the first is processing gets 409
//!   `IDEMPOTENT_REQUEST_PROCESSING`, a repeat after it replays the answer;
//! - a paymentKey belongs to the order it was first presented with (its
//!   checkout session); another order gets 404 `NOT_FOUND_PAYMENT_SESSION`;
//! - a new key for an order that already has a payment gets 400
//!   `ALREADY_PROCESSED_PAYMENT` *and is recorded as a second payment id
//!   for one order*: the checker counts it, because only a paygate bug sends
//!   two keys for one order (its key is the payment id);
//! - faults: 5xx and 400 `PROVIDER_ERROR` before processing, 429, requests
//!   lost before processing, answers lost after an approval, slow answers,
//!   a 200 `IN_PROGRESS` that turns `DONE` later, lookups that 404 for a
//!   while after an approval, and whole outages (every call 503).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use paygate_card_api::{
    codes, Cancel, CancelRequest, CardApi, CardApiError, CardPayment, ConfirmRequest, Failure,
    Transaction, TransactionsQuery,
};
use paygate_core::time::{kst_rfc3339_from_ms, ms_from_rfc3339_or_kst, now_ms};

use crate::rng::SimRng;

/// One approval the card company gave (the checker's ground truth).
#[derive(Clone, Debug)]
pub struct Approval {
    /// The order.
    pub order_id: String,
    /// The payment key.
    pub payment_key: String,
    /// Amount, minor units.
    pub amount: i64,
    /// The idempotency key of the confirm that approved it.
    pub key: String,
    /// When the confirm that approved it arrived, epoch ms.
    pub request_at: i64,
    /// Its place in the history's causal order ([`crate::next_event`]).
    pub request_seq: u64,
}

#[derive(Clone, Debug)]
struct Pay {
    payment_key: String,
    amount: i64,
    status: &'static str,
    approved_at: Option<i64>,
    /// `IN_PROGRESS` until this time, then `DONE`.
    done_at: Option<i64>,
    /// Lookups answer 404 until this time.
    visible_from: i64,
    tx_key: String,
    failure: Option<Failure>,
    /// Cancels (refunds) applied, in order.
    cancels: Vec<Cancel>,
}

impl Pay {
    /// What is left to cancel, minor units.
    fn balance(&self) -> i64 {
        self.amount - self.cancels.iter().map(|c| c.cancel_amount).sum::<i64>()
    }
}

/// One refund the card company made (the checker's ground truth for
/// cancels).
#[derive(Clone, Debug)]
pub struct Refund {
    /// The order.
    pub order_id: String,
    /// The cancel's idempotency key (`<payment_id>:cancel:<n>` for a
    /// merchant's cancel through paygate).
    pub key: String,
    /// Amount, minor units.
    pub amount: i64,
    /// The merchant request whose task made the call that applied it, if
    /// any (see [`crate::gateway::REQUEST`]).
    pub request: Option<u64>,
}

#[derive(Clone)]
enum KeyState {
    Processing,
    Done(Box<Result<CardPayment, CardApiError>>),
}

#[derive(Default)]
struct State {
    pays: BTreeMap<String, Pay>,
    keys: BTreeMap<(String, String), KeyState>,
    key_orders: BTreeMap<String, String>,
    approvals: Vec<Approval>,
    /// Orders for which a confirm arrived under a second idempotency key.
    second_keys: BTreeSet<String>,
    order_keys: BTreeMap<String, BTreeSet<String>>,
    refunds: Vec<Refund>,
    next_tx: u64,
    /// The merchant requests (see [`crate::gateway::REQUEST`]) whose
    /// confirm tasks called the card's confirm.
    calling_requests: BTreeSet<u64>,
}

/// The card company of one history.
pub struct SimCard {
    rng: SimRng,
    st: Mutex<State>,
    healed: AtomicBool,
    down: AtomicBool,
}

fn err(status: u16, code: &str) -> CardApiError {
    let e = ErrorParts { status, code };
    e.into()
}

struct ErrorParts<'a> {
    status: u16,
    code: &'a str,
}

impl From<ErrorParts<'_>> for CardApiError {
    fn from(p: ErrorParts<'_>) -> Self {
        if p.status >= 500 {
            CardApiError::Server {
                status: p.status,
                code: p.code.to_owned(),
                message: "simulated".to_owned(),
                retry_after_s: None,
            }
        } else {
            CardApiError::Rejected {
                status: p.status,
                code: p.code.to_owned(),
                message: "simulated".to_owned(),
                retry_after_s: (p.status == 429).then_some(1),
            }
        }
    }
}

impl SimCard {
    /// A card company drawing its faults from `rng`.
    pub fn new(rng: SimRng) -> Self {
        Self {
            rng,
            st: Mutex::new(State::default()),
            healed: AtomicBool::new(false),
            down: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// No more faults, latency or lag from now on (the checker's final phase).
    pub fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
        self.down.store(false, Ordering::SeqCst);
    }

    /// Every call answers 503 while `down`.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn faulty(&self) -> bool {
        !self.healed.load(Ordering::SeqCst)
    }

    /// Every approval given, in order.
    pub fn approvals(&self) -> Vec<Approval> {
        self.state().approvals.clone()
    }

    /// Orders that got a confirm under a second idempotency key.
    pub fn second_keys(&self) -> BTreeSet<String> {
        self.state().second_keys.clone()
    }

    /// The merchant requests whose confirm tasks called the card's confirm.
    pub fn calling_requests(&self) -> BTreeSet<u64> {
        self.state().calling_requests.clone()
    }

    /// Orders whose approval the card company canceled on a request that
    /// was not a merchant's cancel through paygate (the reconciliation's
    /// cancel of an orphan approval).
    pub fn canceled(&self) -> BTreeSet<String> {
        self.state()
            .refunds
            .iter()
            .filter(|r| !r.key.contains(":cancel:"))
            .map(|r| r.order_id.clone())
            .collect()
    }

    /// Every refund made, in order.
    pub fn refunds(&self) -> Vec<Refund> {
        self.state().refunds.clone()
    }

    /// The amount the card company approved for `order`, if it did.
    pub fn approved_amount(&self, order: &str) -> Option<i64> {
        self.state()
            .pays
            .get(order)
            .filter(|p| p.approved_at.is_some())
            .map(|p| p.amount)
    }

    async fn latency(&self, max_ms: u64) {
        if self.faulty() {
            let ms = self.rng.between(0, max_ms);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    fn view(order_id: &str, p: &Pay, now: i64) -> CardPayment {
        let status = match p.done_at {
            Some(at) if p.status == "IN_PROGRESS" && now >= at => "DONE",
            _ => p.status,
        };
        let status = match (status, p.cancels.is_empty(), p.balance()) {
            (_, true, _) => status,
            (_, false, 0) => "CANCELED",
            (_, false, _) => "PARTIAL_CANCELED",
        };
        CardPayment {
            payment_key: p.payment_key.clone(),
            order_id: order_id.to_owned(),
            status: status.to_owned(),
            total_amount: p.amount,
            balance_amount: Some(p.balance()),
            approved_at: p.approved_at.map(kst_rfc3339_from_ms),
            requested_at: None,
            method: Some("카드".to_owned()),
            currency: Some("KRW".to_owned()),
            failure: p.failure.clone(),
            cancels: (!p.cancels.is_empty()).then(|| p.cancels.clone()),
        }
    }

    /// Processes a confirm that arrived at `at` (the key is marked processing).
    fn process(
        &self,
        req: &ConfirmRequest,
        key: &str,
        (at, seq): (i64, u64),
    ) -> Result<CardPayment, CardApiError> {
        let faulty = self.faulty();
        let decline = self.rng.chance(0.1);
        let non_final = faulty && self.rng.chance(0.05);
        let lag = if faulty && self.rng.chance(0.15) {
            self.rng.between(100, 4_000) as i64
        } else {
            0
        };
        let done_in = self.rng.between(500, 8_000) as i64;
        let mut st = self.state();
        let order = req.order_id.clone();
        let keys = st.order_keys.entry(order.clone()).or_default();
        keys.insert(key.to_owned());
        if keys.len() > 1 {
            st.second_keys.insert(order.clone());
        }
        match st.key_orders.get(&req.payment_key) {
            Some(o) if *o != order => return Err(err(404, codes::NOT_FOUND_PAYMENT_SESSION)),
            Some(_) => {}
            None => {
                st.key_orders.insert(req.payment_key.clone(), order.clone());
            }
        }
        if let Some(p) = st.pays.get(&order) {
            if p.status != "ABORTED" {
                return Err(err(400, codes::ALREADY_PROCESSED_PAYMENT));
            }
        }
        st.next_tx += 1;
        let tx_key = format!("tx{:012}", st.next_tx);
        let pay = if decline {
            Pay {
                payment_key: req.payment_key.clone(),
                amount: req.amount,
                status: "ABORTED",
                approved_at: None,
                done_at: None,
                visible_from: at,
                tx_key,
                failure: Some(Failure {
                    code: codes::REJECT_CARD_PAYMENT.to_owned(),
                    message: "declined".to_owned(),
                }),
                cancels: Vec::new(),
            }
        } else {
            st.approvals.push(Approval {
                order_id: order.clone(),
                payment_key: req.payment_key.clone(),
                amount: req.amount,
                key: key.to_owned(),
                request_at: at,
                request_seq: seq,
            });
            Pay {
                payment_key: req.payment_key.clone(),
                amount: req.amount,
                status: if non_final { "IN_PROGRESS" } else { "DONE" },
                approved_at: Some(now_ms()),
                done_at: non_final.then(|| now_ms() + done_in),
                visible_from: now_ms() + lag,
                tx_key,
                failure: None,
                cancels: Vec::new(),
            }
        };
        let answer = if decline {
            Err(err(403, codes::REJECT_CARD_PAYMENT))
        } else {
            Ok(Self::view(&order, &pay, now_ms()))
        };
        st.pays.insert(order, pay);
        answer
    }
    /// Applies a cancel the card company received (see [`SimCard::cancel`])
    /// and records its answer under its idempotency scope.
    fn apply_cancel(
        &self,
        scope: &(String, String),
        payment_key: &str,
        req: &CancelRequest,
        key: &str,
        request: Option<u64>,
    ) -> Result<CardPayment, CardApiError> {
        let now = now_ms();
        let answer = {
            let mut st = self.state();
            let order = st.key_orders.get(payment_key).cloned();
            let pay = order
                .as_ref()
                .and_then(|o| st.pays.get(o).map(|p| (o.clone(), p.clone())));
            match pay {
                Some((order, p)) if p.approved_at.is_some() => {
                    let view = Self::view(&order, &p, now);
                    let amount = req.cancel_amount.unwrap_or(p.balance());
                    if view.status == "IN_PROGRESS" || p.balance() == 0 {
                        Err(err(400, codes::ALREADY_CANCELED_PAYMENT))
                    } else if amount <= 0 || amount > p.balance() {
                        Err(err(400, codes::NOT_CANCELABLE_AMOUNT))
                    } else {
                        st.next_tx += 1;
                        let tx = format!("ctx{:012}", st.next_tx);
                        st.refunds.push(Refund {
                            order_id: order.clone(),
                            key: key.to_owned(),
                            amount,
                            request,
                        });
                        let p = st.pays.get_mut(&order).map(|p| {
                            p.cancels.push(Cancel {
                                cancel_amount: amount,
                                cancel_reason: req.cancel_reason.clone(),
                                canceled_at: kst_rfc3339_from_ms(now),
                                transaction_key: Some(tx),
                            });
                            p.clone()
                        });
                        match p {
                            Some(p) => Ok(Self::view(&order, &p, now)),
                            None => Err(err(404, codes::NOT_FOUND_PAYMENT)),
                        }
                    }
                }
                _ => Err(err(404, codes::NOT_FOUND_PAYMENT)),
            }
        };
        self.state()
            .keys
            .insert(scope.clone(), KeyState::Done(Box::new(answer.clone())));
        answer
    }
}

/// A cancel the card company has received: finished when its call
/// returns, or when the call is dropped before (see [`SimCard::cancel`]).
struct PendingCancel<'a> {
    card: &'a SimCard,
    scope: (String, String),
    payment_key: &'a str,
    req: &'a CancelRequest,
    key: &'a str,
    request: Option<u64>,
    done: bool,
}

impl PendingCancel<'_> {
    fn finish(&mut self) -> Result<CardPayment, CardApiError> {
        self.done = true;
        self.card.apply_cancel(
            &self.scope,
            self.payment_key,
            self.req,
            self.key,
            self.request,
        )
    }
}

impl Drop for PendingCancel<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.finish();
        }
    }
}

/// A confirm the card company has received: processed when its call
/// returns, or when the call is dropped before (see [`SimCard::confirm`]).
struct PendingConfirm<'a> {
    card: &'a SimCard,
    scope: (String, String),
    req: &'a ConfirmRequest,
    key: &'a str,
    at: (i64, u64),
    done: bool,
}

impl PendingConfirm<'_> {
    fn finish(&mut self) -> Result<CardPayment, CardApiError> {
        self.done = true;
        let answer = self.card.process(self.req, self.key, self.at);
        self.card
            .state()
            .keys
            .insert(self.scope.clone(), KeyState::Done(Box::new(answer.clone())));
        answer
    }
}

impl Drop for PendingConfirm<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.finish();
        }
    }
}

#[async_trait]
impl CardApi for SimCard {
    async fn confirm(&self, req: &ConfirmRequest, key: &str) -> Result<CardPayment, CardApiError> {
        let at = (now_ms(), crate::next_event());
        if let Ok(request) = crate::gateway::REQUEST.try_with(|r| *r) {
            self.state().calling_requests.insert(request);
        }
        self.latency(50).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(err(503, "SIM_OUTAGE"));
        }
        let scope = ("confirm".to_owned(), key.to_owned());
        match self.state().keys.get(&scope).cloned() {
            Some(KeyState::Processing) => {
                return Err(err(409, codes::IDEMPOTENT_REQUEST_PROCESSING))
            }
            Some(KeyState::Done(answer)) => return *answer,
            None => {}
        }
        if self.faulty() {
            let roll = self.rng.between(0, 999);
            match roll {
                0..=39 => return Err(err(500, codes::FAILED_INTERNAL_SYSTEM_PROCESSING)),
                40..=69 => return Err(err(400, codes::PROVIDER_ERROR)),
                70..=89 => return Err(err(429, "TOO_MANY_REQUESTS")),
                90..=109 => {
                    // Lost on the way in: nothing happened.
                    tokio::time::sleep(Duration::from_secs(12)).await;
                    return Err(CardApiError::Timeout);
                }
                _ => {}
            }
        }
        self.state()
            .keys
            .insert(scope.clone(), KeyState::Processing);
        // Received: processed even if the caller stops waiting (an attempt
        // timeout drops this future), as a card company's server does.
        let mut pending = PendingConfirm {
            card: self,
            scope,
            req,
            key,
            at,
            done: false,
        };
        self.latency(400).await;
        let answer = pending.finish();
        if self.faulty() && answer.is_ok() {
            let roll = self.rng.between(0, 999);
            if roll < 60 {
                // Approved, and the answer is lost on the way back.
                tokio::time::sleep(Duration::from_secs(12)).await;
                return Err(CardApiError::Timeout);
            }
            if roll < 100 {
                // Approved, and the answer is slow (past the attempt timeout).
                tokio::time::sleep(Duration::from_millis(self.rng.between(2_000, 15_000))).await;
            }
        }
        answer
    }

    async fn payment_by_order_id(
        &self,
        order_id: &str,
    ) -> Result<Option<CardPayment>, CardApiError> {
        self.latency(50).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(err(503, "SIM_OUTAGE"));
        }
        if self.faulty() && self.rng.chance(0.03) {
            return Err(err(500, codes::FAILED_INTERNAL_SYSTEM_PROCESSING));
        }
        let now = now_ms();
        let st = self.state();
        Ok(st
            .pays
            .get(order_id)
            .filter(|p| now >= p.visible_from)
            .map(|p| Self::view(order_id, p, now)))
    }

    async fn cancel(
        &self,
        payment_key: &str,
        req: &CancelRequest,
        key: &str,
    ) -> Result<CardPayment, CardApiError> {
        let request = crate::gateway::REQUEST.try_with(|r| *r).ok();
        self.latency(50).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(err(503, "SIM_OUTAGE"));
        }
        let scope = (format!("cancel:{payment_key}"), key.to_owned());
        match self.state().keys.get(&scope).cloned() {
            Some(KeyState::Processing) => {
                return Err(err(409, codes::IDEMPOTENT_REQUEST_PROCESSING))
            }
            Some(KeyState::Done(answer)) => return *answer,
            None => {}
        }
        if self.faulty() {
            match self.rng.between(0, 999) {
                0..=39 => return Err(err(500, codes::FAILED_INTERNAL_SYSTEM_PROCESSING)),
                40..=59 => return Err(err(429, "TOO_MANY_REQUESTS")),
                60..=79 => {
                    // Lost on the way in: nothing happened.
                    tokio::time::sleep(Duration::from_secs(12)).await;
                    return Err(CardApiError::Timeout);
                }
                _ => {}
            }
        }
        self.state()
            .keys
            .insert(scope.clone(), KeyState::Processing);
        // The card company processes a cancel it received even when its
        // caller goes away (a crashed replica's task is dropped here).
        let mut pending = PendingCancel {
            card: self,
            scope,
            payment_key,
            req,
            key,
            request,
            done: false,
        };
        self.latency(300).await;
        let answer = pending.finish();
        if self.faulty() && answer.is_ok() {
            // More often than a confirm's: a lost answer of an applied
            // cancel is what the cancel path's "nothing was canceled" must
            // never be said after.
            let roll = self.rng.between(0, 999);
            if roll < 150 {
                // Canceled, and the answer is lost on the way back.
                tokio::time::sleep(Duration::from_secs(12)).await;
                return Err(CardApiError::Timeout);
            }
            if roll < 250 {
                tokio::time::sleep(Duration::from_millis(self.rng.between(2_000, 15_000))).await;
            }
        }
        answer
    }

    async fn transactions(&self, q: &TransactionsQuery) -> Result<Vec<Transaction>, CardApiError> {
        self.latency(50).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(err(503, "SIM_OUTAGE"));
        }
        let from = ms_from_rfc3339_or_kst(&q.start_date).unwrap_or(i64::MIN);
        let to = ms_from_rfc3339_or_kst(&q.end_date).map_or(i64::MAX, |t| t + 999);
        let now = now_ms();
        let st = self.state();
        // As Toss lists them: the approval (`DONE`, its status when it was
        // made) and each cancel as a transaction of its own, with its
        // amount and the payment's status after it.
        let mut list: Vec<(i64, String, Transaction)> = Vec::new();
        for (order, p) in &st.pays {
            let Some(approved) = p.approved_at else {
                continue;
            };
            let first = Self::view(
                order,
                &Pay {
                    cancels: Vec::new(),
                    ..p.clone()
                },
                now,
            );
            if first.status == "IN_PROGRESS" {
                continue;
            }
            let row = |key: &str, status: &str, at: i64, amount: i64| Transaction {
                transaction_key: key.to_owned(),
                payment_key: p.payment_key.clone(),
                order_id: order.clone(),
                method: Some("카드".to_owned()),
                status: status.to_owned(),
                transaction_at: kst_rfc3339_from_ms(at),
                currency: Some("KRW".to_owned()),
                amount,
            };
            list.push((
                approved,
                p.tx_key.clone(),
                row(&p.tx_key, "DONE", approved, p.amount),
            ));
            let mut left = p.amount;
            for c in &p.cancels {
                left -= c.cancel_amount;
                let at = ms_from_rfc3339_or_kst(&c.canceled_at).unwrap_or(approved);
                let key = c.transaction_key.clone().unwrap_or_default();
                let status = if left == 0 {
                    "CANCELED"
                } else {
                    "PARTIAL_CANCELED"
                };
                list.push((at, key.clone(), row(&key, status, at, c.cancel_amount)));
            }
        }
        list.retain(|(at, _, _)| *at >= from && *at <= to);
        list.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let start = match &q.starting_after {
            Some(after) => list
                .iter()
                .position(|(_, k, _)| k == after)
                .map_or(list.len(), |i| i + 1),
            None => 0,
        };
        let limit = q.limit.unwrap_or(100) as usize;
        Ok(list
            .into_iter()
            .skip(start)
            .take(limit)
            .map(|(_, _, t)| t)
            .collect())
    }
}
