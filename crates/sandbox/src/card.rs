//! The card API simulator: Toss Payments v1 `confirm`, lookup by orderId,
//! `cancel` and the transaction list, with idempotency-key replay, Basic auth
//! and the faults of a [`FaultProfile`].

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{
    extract::{Path, Query, State},
    http::HeaderMap,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use base64::Engine;
use paygate_card_api::{
    codes, Cancel, CancelRequest, CardPayment, ConfirmRequest, Transaction, TransactionsQuery,
};

use crate::{
    error_response,
    faults::{in_outage, roll, FaultProfile},
    CallObserver, ObserverSlot, SimTarget,
};

/// One approval the simulator gave. Served (camelCase JSON) by the
/// sandbox-only `GET /sandbox/approvals`, which `paygate check` reads.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// The merchant's order id.
    pub order_id: String,
    /// The payment key confirmed.
    pub payment_key: String,
    /// Amount approved, minor units.
    pub amount: i64,
    /// The idempotency key of the confirm that got it.
    pub idempotency_key: Option<String>,
    /// `approvedAt`, RFC 3339.
    pub approved_at: String,
}

/// An approval placed in the simulator's books directly, as if it had been
/// given long ago or through another channel (see
/// [`CardSim::seed_approvals`]): a `DONE` payment and its transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedApproval {
    /// The order id.
    pub order_id: String,
    /// The payment key.
    pub payment_key: String,
    /// Amount, minor units.
    pub amount: i64,
    /// When it was approved, epoch ms (kept to the second, as Toss dates).
    pub at_ms: i64,
}

/// `n` generated approvals spread evenly over `[from_ms, to_ms)`, in time
/// order: orderIds `gen-000000000`, `gen-000000001`, ..., payment keys
/// `pk_gen-…`, amounts 1,000 to 100,000 (KRW). Deterministic, so a
/// benchmark can seed paygate's store with the matching records.
pub fn generated_approvals(
    n: usize,
    from_ms: i64,
    to_ms: i64,
) -> impl Iterator<Item = SeedApproval> {
    let span = (to_ms - from_ms).max(1);
    (0..n).map(move |i| {
        let at_ms = from_ms + (i128::from(span) * i as i128 / n.max(1) as i128) as i64;
        SeedApproval {
            order_id: format!("gen-{i:09}"),
            payment_key: format!("pk_gen-{i:09}"),
            amount: 1_000 * (1 + (i as i64 % 100)),
            at_ms,
        }
    })
}

/// Call and approval counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CardStats {
    /// Confirm calls received (including replays and refusals).
    pub confirm_calls: u64,
    /// Lookups by orderId received.
    pub lookup_calls: u64,
    /// Cancel calls received.
    pub cancel_calls: u64,
    /// Transaction-list pages served.
    pub transaction_pages: u64,
    /// Approvals given.
    pub approvals: u64,
    /// Orders with more than one approval.
    pub double_charges: u64,
    /// Most confirm calls in progress at once.
    pub max_in_flight: u64,
}

#[derive(Default)]
struct CardState {
    payments: HashMap<String, CardPayment>,
    replays: HashMap<String, (u16, serde_json::Value)>,
    approvals: Vec<Approval>,
    approvals_per_order: HashMap<String, u64>,
    attempts_per_order: HashMap<String, u64>,
    /// Sorted by `transaction_key`; keys are `tx_` + a ULID whose time part
    /// is the transaction's time, so the list is in time order as well.
    transactions: Vec<Transaction>,
    /// `transactionAt` of each transaction, epoch ms (binary-searched).
    tx_at_ms: Vec<i64>,
    tx_keys: ulid::Generator,
    /// Transaction-list pages served per `(startDate, endDate)`, epoch ms.
    pages_per_window: BTreeMap<(i64, i64), u64>,
}

impl CardState {
    /// Appends a transaction dated `at_ms` (to the second), keeping the list
    /// sorted; `make` gets the new key and the `transactionAt` text.
    fn push_tx(&mut self, at_ms: i64, make: impl FnOnce(String, String) -> Transaction) -> String {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(at_ms.max(0) as u64);
        let id = self
            .tx_keys
            .generate_from_datetime(at)
            .unwrap_or_else(|_| ulid::Ulid::from_datetime(at));
        // The key's time part is the transaction's time, even if the clock
        // stepped back and the generator kept the later time.
        let at_ms = id.timestamp_ms() as i64;
        let tx = make(
            format!("tx_{id}"),
            paygate_core::time::kst_rfc3339_from_ms(at_ms),
        );
        let pos = self
            .transactions
            .partition_point(|t| t.transaction_key <= tx.transaction_key);
        let key = tx.transaction_key.clone();
        self.transactions.insert(pos, tx);
        self.tx_at_ms.insert(pos, at_ms);
        key
    }
}

/// Now, to the second (Toss dates transactions to the second).
fn now_s_ms() -> i64 {
    paygate_core::time::now_ms().div_euclid(1000) * 1000
}

/// The card API simulator. Shared behind an `Arc`; see [`router`].
pub struct CardSim {
    profile: FaultProfile,
    auth: String,
    started: Instant,
    down: AtomicBool,
    state: Mutex<CardState>,
    observer: ObserverSlot,
    confirm_calls: AtomicU64,
    lookup_calls: AtomicU64,
    cancel_calls: AtomicU64,
    transaction_pages: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl CardSim {
    /// A simulator that accepts `secret_key` in Basic auth.
    pub fn new(profile: FaultProfile, secret_key: &str) -> Self {
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{secret_key}:"))
        );
        Self {
            profile,
            auth,
            started: Instant::now(),
            down: AtomicBool::new(false),
            state: Mutex::new(CardState::default()),
            observer: ObserverSlot::default(),
            confirm_calls: AtomicU64::new(0),
            lookup_calls: AtomicU64::new(0),
            cancel_calls: AtomicU64::new(0),
            transaction_pages: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, CardState> {
        // A poisoned lock only means another handler panicked mid-update;
        // the simulator's maps stay usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs an observer of state-changing calls.
    pub fn set_observer(&self, observer: Arc<dyn CallObserver>) {
        self.observer.set(observer);
    }

    /// Takes the simulator down (every call answers 503) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Places approvals in the books directly: each becomes a `DONE` payment
    /// (found by lookup, cancelable) and a `DONE` transaction at its time.
    /// They are not counted in [`CardStats::approvals`], which counts what
    /// confirms obtained. For `paygate sim --transactions` and tests.
    pub fn seed_approvals(&self, approvals: impl IntoIterator<Item = SeedApproval>) {
        let mut st = self.state();
        for a in approvals {
            let at_ms = a.at_ms.div_euclid(1000) * 1000;
            let at = paygate_core::time::kst_rfc3339_from_ms(at_ms);
            let payment = CardPayment {
                payment_key: a.payment_key.clone(),
                order_id: a.order_id.clone(),
                status: "DONE".to_owned(),
                total_amount: a.amount,
                balance_amount: Some(a.amount),
                approved_at: Some(at.clone()),
                requested_at: Some(at.clone()),
                method: Some("카드".to_owned()),
                currency: Some("KRW".to_owned()),
                failure: None,
                cancels: None,
            };
            st.payments.insert(a.order_id.clone(), payment);
            let id = ulid::Ulid::from_datetime(
                SystemTime::UNIX_EPOCH + Duration::from_millis(at_ms.max(0) as u64),
            );
            st.transactions.push(Transaction {
                transaction_key: format!("tx_{id}"),
                payment_key: a.payment_key,
                order_id: a.order_id,
                method: Some("카드".to_owned()),
                status: "DONE".to_owned(),
                transaction_at: at,
                currency: Some("KRW".to_owned()),
                amount: a.amount,
            });
        }
        // One sort for the whole batch (O(n log n)) rather than n inserts.
        st.transactions
            .sort_unstable_by(|x, y| x.transaction_key.cmp(&y.transaction_key));
        let times = st
            .transactions
            .iter()
            .map(|t| {
                t.transaction_key
                    .strip_prefix("tx_")
                    .and_then(|k| ulid::Ulid::from_string(k).ok())
                    .map_or(0, |u| u.timestamp_ms() as i64)
            })
            .collect();
        st.tx_at_ms = times;
    }

    /// Transaction-list pages served per `(startDate, endDate)` (epoch ms).
    pub fn pages_per_window(&self) -> BTreeMap<(i64, i64), u64> {
        self.state().pages_per_window.clone()
    }

    /// Counts so far.
    pub fn stats(&self) -> CardStats {
        let st = self.state();
        CardStats {
            confirm_calls: self.confirm_calls.load(Ordering::SeqCst),
            lookup_calls: self.lookup_calls.load(Ordering::SeqCst),
            cancel_calls: self.cancel_calls.load(Ordering::SeqCst),
            transaction_pages: self.transaction_pages.load(Ordering::SeqCst),
            approvals: st.approvals.len() as u64,
            double_charges: st.approvals_per_order.values().filter(|n| **n > 1).count() as u64,
            max_in_flight: self.max_in_flight.load(Ordering::SeqCst),
        }
    }

    /// Every approval given, in order.
    pub fn approvals(&self) -> Vec<Approval> {
        self.state().approvals.clone()
    }

    /// The simulator's payment for an order, if any.
    pub fn payment(&self, order_id: &str) -> Option<CardPayment> {
        self.state().payments.get(order_id).cloned()
    }

    fn unavailable(&self) -> bool {
        self.down.load(Ordering::SeqCst)
            || in_outage(
                &self.profile.card_outages,
                self.started.elapsed().as_millis() as u64,
            )
    }

    async fn observe(&self, operation: &'static str, headers: &HeaderMap) {
        self.observer
            .notify(SimTarget::Card, operation, idem_key(headers))
            .await;
    }

    /// The answer to a call that may not proceed: 401 for a bad key, 503
    /// during an outage; `None` when it may.
    fn refuse(&self, headers: &HeaderMap) -> Option<Response> {
        if !self.authorized(headers) {
            return Some(error_response(
                401,
                codes::UNAUTHORIZED_KEY,
                "secret key is not valid",
            ));
        }
        if self.unavailable() {
            return Some(error_response(
                503,
                codes::FAILED_INTERNAL_SYSTEM_PROCESSING,
                "card API outage",
            ));
        }
        None
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(self.auth.as_str())
    }
}

fn idem_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn json_response(status: u16, body: serde_json::Value) -> Response {
    let status = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK);
    (status, Json(body)).into_response()
}

/// The simulator's HTTP routes (Toss Payments v1 paths).
pub fn router(sim: Arc<CardSim>) -> Router {
    Router::new()
        .route("/v1/payments/confirm", post(confirm))
        .route("/v1/payments/orders/{order_id}", get(by_order))
        .route("/v1/payments/{payment_key}/cancel", post(cancel))
        .route("/v1/transactions", get(transactions))
        .route("/sandbox/approvals", get(approvals))
        .with_state(sim)
}

/// `GET /sandbox/approvals` (not a Toss API): every approval the simulator
/// gave through a confirm, in order: the truth the invariant checker
/// compares paygate's stores with.
async fn approvals(State(sim): State<Arc<CardSim>>, headers: HeaderMap) -> Response {
    if !sim.authorized(&headers) {
        return error_response(401, codes::UNAUTHORIZED_KEY, "secret key is not valid");
    }
    Json(sim.approvals()).into_response()
}

struct InFlight<'a>(&'a CardSim);

impl<'a> InFlight<'a> {
    fn enter(sim: &'a CardSim) -> Self {
        let now = sim.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        sim.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(sim)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn confirm(
    State(sim): State<Arc<CardSim>>,
    headers: HeaderMap,
    body: Json<ConfirmRequest>,
) -> Response {
    let Json(req) = body;
    sim.confirm_calls.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::enter(&sim);
    sim.observe("confirm", &headers).await;
    if !sim.authorized(&headers) {
        return error_response(401, codes::UNAUTHORIZED_KEY, "secret key is not valid");
    }
    let key = idem_key(&headers);
    if let Some(k) = &key {
        if let Some((status, body)) = sim.state().replays.get(k).cloned() {
            return json_response(status, body);
        }
    }
    if sim.unavailable() {
        return error_response(
            503,
            codes::FAILED_INTERNAL_SYSTEM_PROCESSING,
            "card API outage",
        );
    }
    let p = &sim.profile;
    let attempt = {
        let mut st = sim.state();
        let n = st
            .attempts_per_order
            .entry(req.order_id.clone())
            .or_insert(0);
        *n += 1;
        *n
    };
    tokio::time::sleep(p.card_latency(&req.order_id, attempt)).await;
    if roll(p.seed, &req.order_id, "transient", attempt) < p.transient_error_rate {
        return error_response(
            500,
            codes::PROVIDER_ERROR,
            "card network is temporarily unavailable",
        );
    }
    let declined = roll(p.seed, &req.order_id, "decline", 0) < p.decline_rate;
    let dropped = !declined && roll(p.seed, &req.order_id, "drop", 0) < p.drop_response_rate;
    let (status, body) = {
        let mut st = sim.state();
        // A concurrent request with the same key may have finished meanwhile.
        if let Some(replay) = key.as_ref().and_then(|k| st.replays.get(k).cloned()) {
            drop(st);
            return json_response(replay.0, replay.1);
        }
        let now_ms = now_s_ms();
        let now = paygate_core::time::kst_rfc3339_from_ms(now_ms);
        let (status, body) = if declined {
            let payment = CardPayment {
                payment_key: req.payment_key.clone(),
                order_id: req.order_id.clone(),
                status: "ABORTED".to_owned(),
                total_amount: req.amount,
                balance_amount: Some(0),
                approved_at: None,
                requested_at: Some(now.clone()),
                method: Some("카드".to_owned()),
                currency: Some("KRW".to_owned()),
                failure: Some(paygate_card_api::Failure {
                    code: codes::REJECT_CARD_PAYMENT.to_owned(),
                    message: "card company rejected the payment".to_owned(),
                }),
                cancels: None,
            };
            st.payments.entry(req.order_id.clone()).or_insert(payment);
            let err = serde_json::json!({"code": codes::REJECT_CARD_PAYMENT, "message": "card company rejected the payment"});
            (403u16, err)
        } else {
            let payment = CardPayment {
                payment_key: req.payment_key.clone(),
                order_id: req.order_id.clone(),
                status: "DONE".to_owned(),
                total_amount: req.amount,
                balance_amount: Some(req.amount),
                approved_at: Some(now.clone()),
                requested_at: Some(now.clone()),
                method: Some("카드".to_owned()),
                currency: Some("KRW".to_owned()),
                failure: None,
                cancels: None,
            };
            st.approvals.push(Approval {
                order_id: req.order_id.clone(),
                payment_key: req.payment_key.clone(),
                amount: req.amount,
                idempotency_key: key.clone(),
                approved_at: now.clone(),
            });
            *st.approvals_per_order
                .entry(req.order_id.clone())
                .or_insert(0) += 1;
            st.push_tx(now_ms, |transaction_key, transaction_at| Transaction {
                transaction_key,
                payment_key: req.payment_key.clone(),
                order_id: req.order_id.clone(),
                method: Some("카드".to_owned()),
                status: "DONE".to_owned(),
                transaction_at,
                currency: Some("KRW".to_owned()),
                amount: req.amount,
            });
            let body = serde_json::to_value(&payment).unwrap_or_default();
            st.payments.insert(req.order_id.clone(), payment);
            (200u16, body)
        };
        if let Some(k) = &key {
            st.replays.insert(k.clone(), (status, body.clone()));
        }
        (status, body)
    };
    if dropped {
        // The approval is made and recorded; the answer never arrives in time.
        tokio::time::sleep(std::time::Duration::from_millis(p.drop_hold_ms)).await;
    }
    json_response(status, body)
}

async fn by_order(
    State(sim): State<Arc<CardSim>>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Response {
    sim.lookup_calls.fetch_add(1, Ordering::SeqCst);
    if let Some(refused) = sim.refuse(&headers) {
        return refused;
    }
    tokio::time::sleep(sim.profile.card_latency(&order_id, 1_000_000)).await;
    match sim.payment(&order_id) {
        Some(p) => Json(p).into_response(),
        None => error_response(404, codes::NOT_FOUND_PAYMENT, "no payment for that order"),
    }
}

async fn cancel(
    State(sim): State<Arc<CardSim>>,
    headers: HeaderMap,
    Path(payment_key): Path<String>,
    Json(req): Json<CancelRequest>,
) -> Response {
    sim.cancel_calls.fetch_add(1, Ordering::SeqCst);
    sim.observe("cancel", &headers).await;
    if let Some(refused) = sim.refuse(&headers) {
        return refused;
    }
    let key = idem_key(&headers);
    let mut st = sim.state();
    if let Some((status, body)) = key
        .as_ref()
        .and_then(|k| st.replays.get(&format!("cancel:{k}")).cloned())
    {
        return json_response(status, body);
    }
    let Some(order_id) = st
        .payments
        .values()
        .find(|p| p.payment_key == payment_key)
        .map(|p| p.order_id.clone())
    else {
        return error_response(404, codes::NOT_FOUND_PAYMENT, "no payment for that key");
    };
    let Some(payment) = st.payments.get(&order_id).cloned() else {
        return error_response(404, codes::NOT_FOUND_PAYMENT, "no payment for that key");
    };
    if payment.status != "DONE" && payment.status != "PARTIAL_CANCELED" {
        return error_response(400, "ALREADY_CANCELED_PAYMENT", "payment is not cancelable");
    }
    let balance = payment.balance_amount.unwrap_or(payment.total_amount);
    let amount = req.cancel_amount.unwrap_or(balance).min(balance);
    let status = if balance - amount == 0 {
        "CANCELED"
    } else {
        "PARTIAL_CANCELED"
    };
    let now_ms = now_s_ms();
    let tx_key = st.push_tx(now_ms, |transaction_key, transaction_at| Transaction {
        transaction_key,
        payment_key: payment.payment_key.clone(),
        order_id: payment.order_id.clone(),
        method: payment.method.clone(),
        status: status.to_owned(),
        transaction_at,
        currency: payment.currency.clone(),
        amount,
    });
    let Some(payment) = st.payments.get_mut(&order_id) else {
        return error_response(404, codes::NOT_FOUND_PAYMENT, "no payment for that key");
    };
    payment.balance_amount = Some(balance - amount);
    payment.status = status.to_owned();
    payment.cancels.get_or_insert_with(Vec::new).push(Cancel {
        cancel_amount: amount,
        cancel_reason: req.cancel_reason.clone(),
        canceled_at: paygate_core::time::kst_rfc3339_from_ms(now_ms),
        transaction_key: Some(tx_key),
    });
    let body = serde_json::to_value(&*payment).unwrap_or_default();
    if let Some(k) = key {
        st.replays
            .insert(format!("cancel:{k}"), (200, body.clone()));
    }
    json_response(200, body)
}

async fn transactions(
    State(sim): State<Arc<CardSim>>,
    headers: HeaderMap,
    Query(q): Query<TransactionsQuery>,
) -> Response {
    sim.transaction_pages.fetch_add(1, Ordering::SeqCst);
    if let Some(refused) = sim.refuse(&headers) {
        return refused;
    }
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 5000 {
        return error_response(400, "INVALID_REQUEST", "limit must be 1 to 5000");
    }
    let (Some(start), Some(end)) = (parse_date(&q.start_date), parse_date(&q.end_date)) else {
        return error_response(
            400,
            "INVALID_REQUEST",
            "startDate and endDate must be ISO 8601 date-times",
        );
    };
    *sim.state()
        .pages_per_window
        .entry((start, end))
        .or_insert(0) += 1;
    tokio::time::sleep(Duration::from_millis(sim.profile.page_latency_ms)).await;
    let page: Vec<Transaction> = {
        let st = sim.state();
        // Keys and times are both sorted: the page is a slice found by
        // binary search, O(log n + limit) however long the list is.
        let after_cursor = match &q.starting_after {
            Some(after) => st
                .transactions
                .partition_point(|t| &t.transaction_key <= after),
            None => 0,
        };
        let from = after_cursor.max(st.tx_at_ms.partition_point(|&at| at < start));
        let to = st.tx_at_ms.partition_point(|&at| at <= end);
        let to = to.min(from.saturating_add(limit as usize)).max(from);
        st.transactions[from..to].to_vec()
    };
    Json(page).into_response()
}

/// Parses RFC 3339, or a local date-time without offset (taken as KST, as
/// Toss does), into epoch ms.
fn parse_date(s: &str) -> Option<i64> {
    paygate_core::time::ms_from_rfc3339_or_kst(s)
}
