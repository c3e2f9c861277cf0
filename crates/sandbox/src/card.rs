//! The card API simulator: Toss Payments v1 `confirm`, lookup by orderId,
//! `cancel` and the transaction list, answering with Toss's full objects
//! (see `wire`), with Basic auth, Toss's idempotency rules and the faults of
//! a [`FaultProfile`].
//!
//! Like Toss (Toss Payments guide, 멱등키 / idempotency key):
//! - a key's scope is the method, the path and the key: a key replays the
//!   first answer only to the same call on the same URL;
//! - a repeat of a request still in progress with the same key gets 409
//!   `IDEMPOTENT_REQUEST_PROCESSING`;
//! - a second confirm of an approved payment under a *new* key gets 400
//!   `ALREADY_PROCESSED_PAYMENT` (unless
//!   [`FaultProfile::approve_duplicate_confirms`] restores the old, permissive
//!   behaviour, which approves it again);
//! - a paymentKey presented under a second orderId is refused, 400
//!   `ALREADY_PROCESSED_PAYMENT`, when
//!   [`FaultProfile::refuse_reused_payment_keys`] is on (off by default;
//!   Toss's paymentKey names one payment);
//! - a `cancelAmount` above what is left is refused, 403
//!   `NOT_CANCELABLE_AMOUNT`;
//! - date-only `startDate`/`endDate` are read as 00:00:00 KST, and Basic
//!   auth is accepted with or without base64 padding.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
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
    codes, CancelRequest, CardPayment, ConfirmRequest, Failure, TransactionsQuery, CONFIRM_PATH,
};

use crate::{
    error_response,
    faults::{in_outage, roll, FaultProfile},
    webhooks::WebhookSender,
    wire, CallObserver, ObserverSlot, SimTarget,
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
    /// Canceled (refunded) of it so far, minor units (filled in when the
    /// approvals are read).
    #[serde(default)]
    pub canceled_amount: i64,
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
    /// Orders with more than one approval (possible only with
    /// [`FaultProfile::approve_duplicate_confirms`]).
    pub double_charges: u64,
    /// Confirms of an already approved order under a new idempotency key:
    /// each would be a second charge without the card company's own
    /// protection. Refused with `ALREADY_PROCESSED_PAYMENT` by default,
    /// approved (and counted in `double_charges`) in permissive mode.
    pub duplicate_confirms: u64,
    /// Confirms presenting a paymentKey already presented under another
    /// orderId (refused with `ALREADY_PROCESSED_PAYMENT` when
    /// [`FaultProfile::refuse_reused_payment_keys`] is on).
    pub reused_payment_keys: u64,
    /// Most confirm calls in progress at once.
    pub max_in_flight: u64,
}

/// One cancel of a payment, as the simulator keeps it.
#[derive(Clone, Debug)]
struct SimCancel {
    amount: i64,
    reason: String,
    canceled_at: String,
    transaction_key: String,
    /// Left to cancel after this one.
    refundable: i64,
}

/// One payment, as the simulator keeps it (KRW).
#[derive(Clone, Debug)]
struct SimPayment {
    payment_key: String,
    order_id: String,
    /// `DONE`, `ABORTED`, `CANCELED`, `PARTIAL_CANCELED`.
    status: &'static str,
    total: i64,
    balance: i64,
    requested_at: String,
    approved_at: Option<String>,
    failure: Option<Failure>,
    cancels: Vec<SimCancel>,
    last_transaction_key: Option<String>,
    approve_no: String,
}

impl SimPayment {
    fn approved(payment_key: String, order_id: String, amount: i64, at: String, n: u64) -> Self {
        Self {
            payment_key,
            order_id,
            status: "DONE",
            total: amount,
            balance: amount,
            requested_at: at.clone(),
            approved_at: Some(at),
            failure: None,
            cancels: Vec::new(),
            last_transaction_key: None,
            approve_no: format!("{:08}", n % 100_000_000),
        }
    }

    /// Approved by the card company at some point (cancels included).
    fn was_approved(&self) -> bool {
        self.approved_at.is_some()
    }

    /// The Toss `Payment` object.
    fn wire(&self) -> wire::Payment {
        let (supplied, vat) = wire::supplied_and_vat(self.balance);
        let approved = self.was_approved();
        let url = |what: &str| wire::Url {
            url: format!(
                "https://sandbox.paygate.invalid/{what}/{}",
                self.payment_key
            ),
        };
        wire::Payment {
            m_id: wire::MID,
            last_transaction_key: self.last_transaction_key.clone(),
            payment_key: self.payment_key.clone(),
            order_id: self.order_id.clone(),
            order_name: format!("sandbox order {}", self.order_id),
            tax_exemption_amount: 0,
            status: self.status.to_owned(),
            requested_at: self.requested_at.clone(),
            approved_at: self.approved_at.clone(),
            use_escrow: false,
            culture_expense: false,
            card: approved.then(|| wire::Card {
                amount: self.total,
                issuer_code: "61",
                acquirer_code: Some("31"),
                number: "43301234****123*",
                installment_plan_months: 0,
                approve_no: self.approve_no.clone(),
                use_card_point: false,
                card_type: "신용",
                owner_type: "개인",
                acquire_status: if self.status == "CANCELED" {
                    "CANCELED"
                } else {
                    "READY"
                },
                is_interest_free: false,
                interest_payer: None,
            }),
            virtual_account: None,
            transfer: None,
            mobile_phone: None,
            gift_certificate: None,
            cash_receipt: None,
            cash_receipts: None,
            discount: None,
            cancels: (!self.cancels.is_empty()).then(|| {
                self.cancels
                    .iter()
                    .map(|c| wire::Cancel {
                        transaction_key: c.transaction_key.clone(),
                        cancel_reason: c.reason.clone(),
                        tax_exemption_amount: 0,
                        canceled_at: c.canceled_at.clone(),
                        transfer_discount_amount: 0,
                        easy_pay_discount_amount: 0,
                        receipt_key: None,
                        cancel_amount: c.amount,
                        tax_free_amount: 0,
                        refundable_amount: c.refundable,
                        cancel_status: "DONE",
                        cancel_request_id: None,
                    })
                    .collect()
            }),
            secret: None,
            kind: "NORMAL",
            easy_pay: None,
            country: "KR",
            failure: self.failure.clone(),
            is_partial_cancelable: approved,
            receipt: approved.then(|| url("receipt")),
            checkout: Some(url("checkout")),
            currency: wire::CURRENCY,
            total_amount: self.total,
            balance_amount: self.balance,
            supplied_amount: supplied,
            vat,
            tax_free_amount: 0,
            method: wire::CARD_METHOD,
            version: wire::VERSION,
            metadata: None,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self.wire()).unwrap_or_default()
    }
}

/// One transaction, as the simulator keeps it (compact: a benchmark seeds
/// millions); served as [`wire::Transaction`].
#[derive(Clone, Debug)]
struct SimTx {
    transaction_key: String,
    payment_key: String,
    order_id: String,
    status: &'static str,
    transaction_at: String,
    amount: i64,
}

impl SimTx {
    fn wire(&self) -> wire::Transaction {
        wire::Transaction {
            m_id: wire::MID,
            transaction_key: self.transaction_key.clone(),
            payment_key: self.payment_key.clone(),
            order_id: self.order_id.clone(),
            method: wire::CARD_METHOD,
            customer_key: None,
            use_escrow: false,
            receipt_url: wire::receipt_url(&self.payment_key),
            status: self.status.to_owned(),
            transaction_at: self.transaction_at.clone(),
            currency: wire::CURRENCY,
            amount: self.amount,
        }
    }
}

#[derive(Default)]
struct CardState {
    payments: HashMap<String, SimPayment>,
    /// First answers by idempotency scope (method, path and key).
    replays: HashMap<String, (u16, serde_json::Value)>,
    /// Idempotency scopes whose first request is still being handled.
    in_progress: HashSet<String>,
    approvals: Vec<Approval>,
    approvals_per_order: HashMap<String, u64>,
    attempts_per_order: HashMap<String, u64>,
    duplicate_confirms: u64,
    /// paymentKey -> the orderId it was first confirmed under.
    key_orders: HashMap<String, String>,
    reused_payment_keys: u64,
    /// Sorted by `transaction_key`; keys are `tx_` + a ULID whose time part
    /// is the transaction's time, so the list is in time order as well.
    transactions: Vec<SimTx>,
    /// `transactionAt` of each transaction, epoch ms (binary-searched).
    tx_at_ms: Vec<i64>,
    tx_keys: ulid::Generator,
    /// Transaction-list pages served per `(startDate, endDate)`, epoch ms.
    pages_per_window: BTreeMap<(i64, i64), u64>,
}

impl CardState {
    /// Approves `amount` of `order_id` at `now_ms` (to the second): the
    /// approval counted, its `DONE` transaction listed, the payment stored;
    /// returns the payment as stored.
    fn approve(
        &mut self,
        payment_key: &str,
        order_id: &str,
        amount: i64,
        idempotency_key: Option<String>,
        now_ms: i64,
    ) -> SimPayment {
        let now = paygate_core::time::kst_rfc3339_from_ms(now_ms);
        self.approvals.push(Approval {
            order_id: order_id.to_owned(),
            payment_key: payment_key.to_owned(),
            amount,
            idempotency_key,
            approved_at: now.clone(),
            canceled_amount: 0,
        });
        *self
            .approvals_per_order
            .entry(order_id.to_owned())
            .or_insert(0) += 1;
        let tx_key = self.push_tx(now_ms, |transaction_key, transaction_at| SimTx {
            transaction_key,
            payment_key: payment_key.to_owned(),
            order_id: order_id.to_owned(),
            status: "DONE",
            transaction_at,
            amount,
        });
        let n = self.approvals.len() as u64;
        let mut payment =
            SimPayment::approved(payment_key.to_owned(), order_id.to_owned(), amount, now, n);
        payment.last_transaction_key = Some(tx_key);
        self.payments.insert(order_id.to_owned(), payment.clone());
        payment
    }

    /// Appends a transaction dated `at_ms` (to the second), keeping the list
    /// sorted; `make` gets the new key and the `transactionAt` text.
    fn push_tx(&mut self, at_ms: i64, make: impl FnOnce(String, String) -> SimTx) -> String {
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

/// The idempotency scope of a key: Toss keys idempotency by the API key, the
/// method, the URL and the `Idempotency-Key` (the simulator has one API key).
fn idem_scope(method: &str, path: &str, key: &str) -> String {
    format!("{method} {path} {key}")
}

/// What [`CardSim::begin`] found for a request's idempotency key.
enum Begin<'a> {
    /// The key's first answer, to replay.
    Replay(u16, serde_json::Value),
    /// The key's first request is still being handled.
    InProgress,
    /// This request is the key's first: it holds the key until dropped.
    Started(KeyInProgress<'a>),
}

/// Holds an idempotency scope as in progress; frees it when dropped (the
/// handler finished or was cancelled).
struct KeyInProgress<'a> {
    sim: &'a CardSim,
    scope: Option<String>,
}

impl Drop for KeyInProgress<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.scope.take() {
            self.sim.state().in_progress.remove(&s);
        }
    }
}

/// The card API simulator. Shared behind an `Arc`; see [`router`].
pub struct CardSim {
    profile: FaultProfile,
    /// `<secretKey>:`, what Basic auth must decode to.
    credentials: Vec<u8>,
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
    /// Confirm attempts still to answer 500 before processing them.
    failing_confirms: AtomicU64,
    /// Confirms still to answer `IN_PROGRESS`, approved this long (ms)
    /// later: `(count, delay_ms)`.
    late_approvals: Mutex<(u64, u64)>,
    /// The `PAYMENT_STATUS_CHANGED` webhooks it sends.
    webhooks: Arc<WebhookSender>,
}

impl CardSim {
    /// A simulator that accepts `secret_key` in Basic auth
    /// (`base64("<secretKey>:")`, padded or not).
    pub fn new(profile: FaultProfile, secret_key: &str) -> Self {
        Self {
            profile,
            credentials: format!("{secret_key}:").into_bytes(),
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
            failing_confirms: AtomicU64::new(0),
            late_approvals: Mutex::new((0, 0)),
            webhooks: Arc::new(WebhookSender::default()),
        }
    }

    /// The next `n` confirms that would be approved answer 200 with the
    /// payment `IN_PROGRESS` (not final: its lookups say so too) and are
    /// approved `after` later, with the webhook of that change: a card
    /// company that settles after it answered.
    pub fn approve_later(&self, n: u64, after: Duration) {
        *self
            .late_approvals
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (n, after.as_millis() as u64);
    }

    /// Sends a `PAYMENT_STATUS_CHANGED` webhook for every later change to
    /// `url`, with Toss's redelivery schedule divided by `compression`.
    pub fn send_webhooks_to(&self, url: &str, compression: u32) {
        self.webhooks.send_to(url, compression);
    }

    /// The webhooks sent so far.
    pub fn webhook_stats(&self) -> crate::WebhookStats {
        self.webhooks.stats()
    }

    /// Takes one late approval if any is left: its delay.
    fn take_late_approval(&self) -> Option<Duration> {
        let mut late = self
            .late_approvals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if late.0 == 0 {
            return None;
        }
        late.0 -= 1;
        Some(Duration::from_millis(late.1))
    }

    /// Approves the `IN_PROGRESS` payment of `order_id` (a late approval),
    /// and sends its webhook.
    fn approve_now(&self, order_id: &str) {
        let json = {
            let mut st = self.state();
            let Some(p) = st.payments.get(order_id).cloned() else {
                return;
            };
            if p.status != "IN_PROGRESS" {
                return;
            }
            let mut done = st.approve(&p.payment_key, &p.order_id, p.total, None, now_s_ms());
            done.requested_at = p.requested_at;
            let json = done.json();
            st.payments.insert(order_id.to_owned(), done);
            json
        };
        self.webhooks.emit(json);
    }

    /// A cancel made in the card company's own console (not through the
    /// API, no idempotency key): as `POST /v1/payments/{paymentKey}/cancel`,
    /// with its webhook. `amount` `None` cancels the balance.
    ///
    /// # Errors
    /// The Toss error answer (404 unknown key, 400 already canceled, 403
    /// over the balance).
    pub fn console_cancel(
        &self,
        payment_key: &str,
        reason: &str,
        amount: Option<i64>,
    ) -> Result<CardPayment, Box<Response>> {
        let json = {
            let mut st = self.state();
            cancel_in(&mut st, payment_key, reason, amount)?
        };
        self.webhooks.emit(json.clone());
        serde_json::from_value(json).map_err(|_| {
            Box::new(error_response(
                500,
                codes::FAILED_INTERNAL_SYSTEM_PROCESSING,
                "encoding",
            ))
        })
    }

    /// The next `n` confirm attempts (of any order) answer 500
    /// `FAILED_INTERNAL_SYSTEM_PROCESSING` before anything is processed, as
    /// a transient failure does: a test's script for "the confirm got
    /// nothing but transient errors", whatever the fault profile's rolls.
    pub fn fail_next_confirms(&self, n: u64) {
        self.failing_confirms.store(n, Ordering::SeqCst);
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
        for (n, a) in approvals.into_iter().enumerate() {
            let at_ms = a.at_ms.div_euclid(1000) * 1000;
            let at = paygate_core::time::kst_rfc3339_from_ms(at_ms);
            let id = ulid::Ulid::from_datetime(
                SystemTime::UNIX_EPOCH + Duration::from_millis(at_ms.max(0) as u64),
            );
            let tx_key = format!("tx_{id}");
            let mut payment = SimPayment::approved(
                a.payment_key.clone(),
                a.order_id.clone(),
                a.amount,
                at.clone(),
                n as u64,
            );
            payment.last_transaction_key = Some(tx_key.clone());
            st.payments.insert(a.order_id.clone(), payment);
            st.transactions.push(SimTx {
                transaction_key: tx_key,
                payment_key: a.payment_key,
                order_id: a.order_id,
                status: "DONE",
                transaction_at: at,
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
            duplicate_confirms: st.duplicate_confirms,
            reused_payment_keys: st.reused_payment_keys,
            max_in_flight: self.max_in_flight.load(Ordering::SeqCst),
        }
    }

    /// Every approval given, in order.
    pub fn approvals(&self) -> Vec<Approval> {
        let st = self.state();
        st.approvals
            .iter()
            .map(|a| {
                let mut a = a.clone();
                if let Some(p) = st.payments.get(&a.order_id) {
                    if p.payment_key == a.payment_key {
                        a.canceled_amount = p.cancels.iter().map(|c| c.amount).sum();
                    }
                }
                a
            })
            .collect()
    }

    /// The simulator's payment for an order, if any, as paygate's adapter
    /// reads the `Payment` object the simulator serves for it.
    pub fn payment(&self, order_id: &str) -> Option<CardPayment> {
        let json = self.state().payments.get(order_id).map(SimPayment::json)?;
        serde_json::from_value(json).ok()
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
            return Some(unauthorized());
        }
        if self.unavailable() {
            return Some(outage());
        }
        None
    }

    /// Basic auth with `base64("<secretKey>:")`, with or without the base64
    /// padding (Toss accepts both; some clients leave it out).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some((scheme, encoded)) = value.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let encoded = encoded.trim();
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
        ];
        engines
            .iter()
            .filter_map(|e| e.decode(encoded).ok())
            .any(|decoded| decoded == self.credentials)
    }

    /// Starts a request under an idempotency `scope`: its first answer if it
    /// has one, 409 while its first request runs, else holds it.
    fn begin(&self, scope: Option<&str>) -> Begin<'_> {
        let Some(scope) = scope else {
            return Begin::Started(KeyInProgress {
                sim: self,
                scope: None,
            });
        };
        let mut st = self.state();
        if let Some((status, body)) = st.replays.get(scope).cloned() {
            return Begin::Replay(status, body);
        }
        if !st.in_progress.insert(scope.to_owned()) {
            return Begin::InProgress;
        }
        Begin::Started(KeyInProgress {
            sim: self,
            scope: Some(scope.to_owned()),
        })
    }
}

fn unauthorized() -> Response {
    error_response(401, codes::UNAUTHORIZED_KEY, "secret key is not valid")
}

fn outage() -> Response {
    error_response(
        503,
        codes::FAILED_INTERNAL_SYSTEM_PROCESSING,
        "card API outage",
    )
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

fn error_json(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "code": code, "message": message })
}

/// The simulator's HTTP routes (Toss Payments v1 paths).
pub fn router(sim: Arc<CardSim>) -> Router {
    Router::new()
        .route(CONFIRM_PATH, post(confirm))
        .route("/v1/payments/orders/{order_id}", get(by_order))
        .route("/v1/payments/{payment_key}/cancel", post(cancel))
        .route("/v1/transactions", get(transactions))
        .route("/sandbox/approvals", get(approvals))
        .route(
            "/sandbox/console/payments/{payment_key}/cancel",
            post(console_cancel),
        )
        .with_state(sim)
}

/// `GET /sandbox/approvals` (not a Toss API): every approval the simulator
/// gave through a confirm, in order: the truth the invariant checker
/// compares paygate's stores with.
async fn approvals(State(sim): State<Arc<CardSim>>, headers: HeaderMap) -> Response {
    if !sim.authorized(&headers) {
        return unauthorized();
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

/// Toss Payments v1 `POST /v1/payments/confirm`.
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
        return unauthorized();
    }
    let key = idem_key(&headers);
    let scope = key.as_deref().map(|k| idem_scope("POST", CONFIRM_PATH, k));
    let _running = match sim.begin(scope.as_deref()) {
        Begin::Replay(status, body) => return json_response(status, body),
        Begin::InProgress => {
            return error_response(
                409,
                codes::IDEMPOTENT_REQUEST_PROCESSING,
                "the first request with this idempotency key is still being processed",
            )
        }
        Begin::Started(running) => running,
    };
    if sim.unavailable() {
        return outage();
    }
    let scripted = sim
        .failing_confirms
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if scripted {
        return error_response(
            500,
            codes::FAILED_INTERNAL_SYSTEM_PROCESSING,
            "internal processing failed; try again shortly",
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
            codes::FAILED_INTERNAL_SYSTEM_PROCESSING,
            "internal processing failed; try again shortly",
        );
    }
    if roll(p.seed, &req.order_id, "provider", attempt) < p.provider_error_rate {
        // Toss sends the card company's temporary error as 400.
        return error_response(
            400,
            codes::PROVIDER_ERROR,
            "temporary error at the card company; try again shortly",
        );
    }
    let declined = roll(p.seed, &req.order_id, "decline", 0) < p.decline_rate;
    let dropped = !declined && roll(p.seed, &req.order_id, "drop", 0) < p.drop_response_rate;
    let (status, body, changed) = {
        let mut st = sim.state();
        let now_ms = now_s_ms();
        let now = paygate_core::time::kst_rfc3339_from_ms(now_ms);
        let already = st
            .payments
            .get(&req.order_id)
            .is_some_and(SimPayment::was_approved);
        let first_order = st
            .key_orders
            .entry(req.payment_key.clone())
            .or_insert_with(|| req.order_id.clone());
        let key_reused = *first_order != req.order_id;
        if key_reused {
            st.reused_payment_keys += 1;
        }
        let (status, body) = if key_reused && p.refuse_reused_payment_keys {
            (
                400u16,
                error_json(
                    codes::ALREADY_PROCESSED_PAYMENT,
                    "this paymentKey has already been processed",
                ),
            )
        } else if already && !p.approve_duplicate_confirms {
            st.duplicate_confirms += 1;
            (
                400u16,
                error_json(
                    codes::ALREADY_PROCESSED_PAYMENT,
                    "this payment has already been processed",
                ),
            )
        } else if declined {
            let failure = Failure {
                code: codes::REJECT_CARD_PAYMENT.to_owned(),
                message: "card company rejected the payment".to_owned(),
            };
            st.payments
                .entry(req.order_id.clone())
                .or_insert_with(|| SimPayment {
                    payment_key: req.payment_key.clone(),
                    order_id: req.order_id.clone(),
                    status: "ABORTED",
                    total: req.amount,
                    balance: req.amount,
                    requested_at: now.clone(),
                    approved_at: None,
                    failure: Some(failure.clone()),
                    cancels: Vec::new(),
                    last_transaction_key: None,
                    approve_no: String::new(),
                });
            (403u16, error_json(&failure.code, &failure.message))
        } else if let Some(after) = sim.take_late_approval() {
            // Answered before it is settled: `IN_PROGRESS` now, approved
            // (with its webhook) `after` later.
            let payment = SimPayment {
                status: "IN_PROGRESS",
                approved_at: None,
                ..SimPayment::approved(
                    req.payment_key.clone(),
                    req.order_id.clone(),
                    req.amount,
                    now.clone(),
                    0,
                )
            };
            let body = payment.json();
            st.payments.insert(req.order_id.clone(), payment);
            let (sim, order) = (sim.clone(), req.order_id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                sim.approve_now(&order);
            });
            (200u16, body)
        } else {
            if already {
                st.duplicate_confirms += 1;
            }
            let payment = st.approve(
                &req.payment_key,
                &req.order_id,
                req.amount,
                key.clone(),
                now_ms,
            );
            (200u16, payment.json())
        };
        if let Some(s) = scope {
            st.replays.insert(s, (status, body.clone()));
        }
        // A change of the payment at the card company is told by webhook:
        // an approval, or a decline that created the payment.
        let changed = match status {
            200 => st.payments.get(&req.order_id).map(SimPayment::json),
            403 => st
                .payments
                .get(&req.order_id)
                .filter(|p| p.status == "ABORTED" && p.payment_key == req.payment_key)
                .map(SimPayment::json),
            _ => None,
        };
        (status, body, changed)
    };
    if let Some(changed) = changed {
        sim.webhooks.emit(changed);
    }
    if dropped && status == 200 {
        // The approval is made and recorded; the answer never arrives in time.
        tokio::time::sleep(std::time::Duration::from_millis(p.drop_hold_ms)).await;
    }
    json_response(status, body)
}

/// Toss Payments v1 `GET /v1/payments/orders/{orderId}`.
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
    let payment = sim.state().payments.get(&order_id).map(SimPayment::json);
    match payment {
        Some(p) => Json(p).into_response(),
        None => error_response(404, codes::NOT_FOUND_PAYMENT, "no payment for that order"),
    }
}

/// Toss Payments v1 `POST /v1/payments/{paymentKey}/cancel`.
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
    let path = format!("/v1/payments/{payment_key}/cancel");
    let scope = idem_key(&headers).map(|k| idem_scope("POST", &path, &k));
    // The whole cancel happens under the lock: no other request with the
    // same key can see it half done.
    let mut st = sim.state();
    if let Some((status, body)) = scope.as_ref().and_then(|s| st.replays.get(s).cloned()) {
        return json_response(status, body);
    }
    let body = match cancel_in(&mut st, &payment_key, &req.cancel_reason, req.cancel_amount) {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    if let Some(s) = scope {
        st.replays.insert(s, (200, body.clone()));
    }
    drop(st);
    sim.webhooks.emit(body.clone());
    json_response(200, body)
}

/// `POST /sandbox/console/payments/{paymentKey}/cancel` (not a Toss API):
/// a cancel made in the card company's own console, which paygate learns
/// of only from the webhook and its lookups. Body as Toss's cancel.
async fn console_cancel(
    State(sim): State<Arc<CardSim>>,
    headers: HeaderMap,
    Path(payment_key): Path<String>,
    Json(req): Json<CancelRequest>,
) -> Response {
    if !sim.authorized(&headers) {
        return unauthorized();
    }
    match sim.console_cancel(&payment_key, &req.cancel_reason, req.cancel_amount) {
        Ok(p) => Json(p).into_response(),
        Err(refused) => *refused,
    }
}

/// Cancels `amount` (the balance when `None`) of the payment of
/// `payment_key` under the simulator's lock, as Toss does: the Payment
/// object after it, or Toss's refusal.
fn cancel_in(
    st: &mut CardState,
    payment_key: &str,
    reason: &str,
    amount: Option<i64>,
) -> Result<serde_json::Value, Box<Response>> {
    let Some(order_id) = st
        .payments
        .values()
        .find(|p| p.payment_key == payment_key)
        .map(|p| p.order_id.clone())
    else {
        return Err(Box::new(error_response(
            404,
            codes::NOT_FOUND_PAYMENT,
            "no payment for that key",
        )));
    };
    let Some(payment) = st.payments.get(&order_id).cloned() else {
        return Err(Box::new(error_response(
            404,
            codes::NOT_FOUND_PAYMENT,
            "no payment for that key",
        )));
    };
    match payment.status {
        "DONE" | "PARTIAL_CANCELED" => {}
        "CANCELED" => {
            return Err(Box::new(error_response(
                400,
                codes::ALREADY_CANCELED_PAYMENT,
                "payment is already canceled",
            )))
        }
        _ => {
            return Err(Box::new(error_response(
                403,
                "NOT_CANCELABLE_PAYMENT",
                "payment is not cancelable",
            )));
        }
    }
    let balance = payment.balance;
    let amount = amount.unwrap_or(balance);
    if amount <= 0 {
        return Err(Box::new(error_response(
            400,
            "INVALID_REQUEST",
            "cancelAmount must be positive",
        )));
    }
    if amount > balance {
        // Toss refuses more than is left to cancel (its 결제 취소 table: 403).
        return Err(Box::new(error_response(
            403,
            codes::NOT_CANCELABLE_AMOUNT,
            "cancelAmount is more than the cancelable balance",
        )));
    }
    let status = if balance - amount == 0 {
        "CANCELED"
    } else {
        "PARTIAL_CANCELED"
    };
    let now_ms = now_s_ms();
    let tx_key = st.push_tx(now_ms, |transaction_key, transaction_at| SimTx {
        transaction_key,
        payment_key: payment.payment_key.clone(),
        order_id: payment.order_id.clone(),
        status,
        transaction_at,
        amount,
    });
    let Some(payment) = st.payments.get_mut(&order_id) else {
        return Err(Box::new(error_response(
            404,
            codes::NOT_FOUND_PAYMENT,
            "no payment for that key",
        )));
    };
    payment.balance = balance - amount;
    payment.status = status;
    payment.last_transaction_key = Some(tx_key.clone());
    payment.cancels.push(SimCancel {
        amount,
        reason: reason.to_owned(),
        canceled_at: paygate_core::time::kst_rfc3339_from_ms(now_ms),
        transaction_key: tx_key,
        refundable: balance - amount,
    });
    Ok(payment.json())
}

/// Toss Payments v1 `GET /v1/transactions`.
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
            "startDate and endDate must be ISO 8601 dates or date-times",
        );
    };
    *sim.state()
        .pages_per_window
        .entry((start, end))
        .or_insert(0) += 1;
    tokio::time::sleep(Duration::from_millis(sim.profile.page_latency_ms)).await;
    let page: Vec<wire::Transaction> = {
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
        st.transactions[from..to].iter().map(SimTx::wire).collect()
    };
    Json(page).into_response()
}

/// Parses RFC 3339, a local date-time without offset, or a date alone (read
/// as 00:00:00), the last two taken as KST as Toss does, into epoch ms.
fn parse_date(s: &str) -> Option<i64> {
    let date_only = s.len() == 10 && s.as_bytes().get(4) == Some(&b'-') && !s.contains('T');
    if date_only {
        return paygate_core::time::ms_from_rfc3339_or_kst(&format!("{s}T00:00:00"));
    }
    paygate_core::time::ms_from_rfc3339_or_kst(s)
}
