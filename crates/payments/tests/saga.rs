//! The saga against scriptable card and ledger fakes, the in-memory state
//! store and a real SQLite request log: the answers the sandbox cannot be
//! made to give on demand (a 200 whose status is not final, an approval
//! that another actor recorded first), and a merchant's retry of a PENDING
//! payment that no live confirm owns (issue 13, points 3, 5, 6 and 8).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use paygate_alert::{Alert, AlertReason, Alerter};
use paygate_api_log::{Kind, LogEntry, SqlApiLog, Target};
use paygate_card_api::{
    CancelRequest, CardApi, CardApiError, CardPayment, ConfirmRequest, Transaction,
    TransactionsQuery,
};
use paygate_core::{
    config::DownstreamPolicy, payment::failure_codes, CardStatus, MerchantId, OrderId, Partition,
    PaymentRecord,
};
use paygate_ledger_api::{LedgerApi, LedgerApiError, LedgerEntry, LedgerOutcome};
use paygate_payments::{
    saga::Downstreams, ConfirmInput, ConfirmOutcome, ConfirmTicket, EarlyAnswer, Saga,
    SagaSettings, SaveResult, Settlement, TicketState,
};
use paygate_resilience::Downstream;
use paygate_state_store::{
    CancelStore, InventoryStore, MemoryInventoryStore, MemoryStateStore, SqlDatabase, StateStore,
    Transition,
};

type Hook = Box<dyn Fn() + Send + Sync>;

/// Another actor's work, run once at a chosen point of the saga.
type AsyncHook =
    Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>;

/// A card company whose answers the test scripts, one per call.
#[derive(Default)]
struct Card {
    confirms: Mutex<VecDeque<Result<CardPayment, CardApiError>>>,
    lookups: Mutex<VecDeque<Result<Option<CardPayment>, CardApiError>>>,
    confirm_calls: Mutex<u32>,
    lookup_calls: Mutex<u32>,
    /// Runs inside the confirm call, before it answers (another actor).
    during_confirm: Mutex<Option<Hook>>,
    cancels: Mutex<VecDeque<Result<CardPayment, CardApiError>>>,
    cancel_calls: Mutex<u32>,
    /// Runs inside a cancel call, before it answers.
    during_cancel: Mutex<Option<Hook>>,
}

#[async_trait::async_trait]
impl CardApi for Card {
    async fn confirm(&self, _: &ConfirmRequest, _: &str) -> Result<CardPayment, CardApiError> {
        *self.confirm_calls.lock().unwrap() += 1;
        if let Some(hook) = self.during_confirm.lock().unwrap().as_ref() {
            hook();
        }
        self.confirms
            .lock()
            .unwrap()
            .pop_front()
            .expect("a scripted confirm")
    }
    async fn payment_by_order_id(&self, _: &str) -> Result<Option<CardPayment>, CardApiError> {
        *self.lookup_calls.lock().unwrap() += 1;
        self.lookups.lock().unwrap().pop_front().unwrap_or(Ok(None))
    }
    async fn cancel(
        &self,
        _: &str,
        _: &CancelRequest,
        _: &str,
    ) -> Result<CardPayment, CardApiError> {
        *self.cancel_calls.lock().unwrap() += 1;
        if let Some(hook) = self.during_cancel.lock().unwrap().as_ref() {
            hook();
        }
        self.cancels
            .lock()
            .unwrap()
            .pop_front()
            .expect("a scripted cancel")
    }
    async fn transactions(&self, _: &TransactionsQuery) -> Result<Vec<Transaction>, CardApiError> {
        Ok(Vec::new())
    }
}

/// A ledger that records every entry it is sent.
#[derive(Default)]
struct Ledger {
    entries: Mutex<Vec<LedgerEntry>>,
    /// Answer 503 to every call while set.
    down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl LedgerApi for Ledger {
    async fn record(&self, e: &LedgerEntry, _: &str) -> Result<LedgerOutcome, LedgerApiError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LedgerApiError::Server(503));
        }
        self.entries.lock().unwrap().push(e.clone());
        Ok(LedgerOutcome::Recorded)
    }
    async fn get(&self, _: &str) -> Result<Option<LedgerEntry>, LedgerApiError> {
        Ok(None)
    }
}

#[derive(Default)]
struct Alerts(Mutex<Vec<Alert>>);

#[async_trait::async_trait]
impl Alerter for Alerts {
    async fn raise(&self, alert: Alert) -> bool {
        self.0.lock().unwrap().push(alert);
        true
    }
}

/// The saga's request log: the real SQLite log, refusing every write
/// while `down` is set (a log outage) and the next `fail_next` writes;
/// `before_append` runs once, inside the next write, before it lands (the
/// writer stalled there while another actor acted).
struct Log {
    inner: SqlApiLog,
    down: Arc<std::sync::atomic::AtomicBool>,
    fail_next: Arc<std::sync::atomic::AtomicU32>,
    before_append: Arc<Mutex<Option<AsyncHook>>>,
}

#[async_trait::async_trait]
impl paygate_api_log::ApiLog for Log {
    async fn append(&self, entry: LogEntry<'_>) -> Result<(), paygate_state_store::StoreError> {
        let hook = self.before_append.lock().unwrap().take();
        if let Some(hook) = hook {
            hook().await;
        }
        let failing = self
            .fail_next
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if failing || self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(paygate_state_store::StoreError::Unavailable(
                "log down (test)".into(),
            ));
        }
        self.inner.append(entry).await
    }
    async fn confirm_evidence(
        &self,
        payment_id: &str,
        confirm_path: &str,
    ) -> Result<paygate_api_log::ConfirmEvidence, paygate_state_store::StoreError> {
        self.inner.confirm_evidence(payment_id, confirm_path).await
    }
}

struct World {
    saga: Arc<Saga>,
    /// Set: the saga's log refuses every write.
    log_down: Arc<std::sync::atomic::AtomicBool>,
    /// The saga's log refuses this many next writes.
    log_fail_next: Arc<std::sync::atomic::AtomicU32>,
    /// Runs once inside the saga's next log write (see [`Log`]).
    log_hook: Arc<Mutex<Option<AsyncHook>>>,
    inventory: Arc<MemoryInventoryStore>,
    db: SqlDatabase,
    store: Arc<MemoryStateStore>,
    log: SqlApiLog,
    card: Arc<Card>,
    ledger: Arc<Ledger>,
    alerts: Arc<Alerts>,
    merchant: MerchantId,
    path: std::path::PathBuf,
}

impl World {
    async fn new(name: &str) -> World {
        Self::with_settings(name, SagaSettings::default()).await
    }

    async fn with_settings(name: &str, settings: SagaSettings) -> World {
        let path = std::env::temp_dir().join(format!(
            "paygate-saga-{name}-{}-{}.db",
            std::process::id(),
            ulid_like()
        ));
        let db = SqlDatabase::connect(&format!("sqlite://{}", path.display()), 4)
            .await
            .unwrap();
        db.migrate().await.unwrap();
        let store = Arc::new(MemoryStateStore::with_system_clock());
        let (card, ledger, alerts) = (
            Arc::new(Card::default()),
            Arc::new(Ledger::default()),
            Arc::new(Alerts::default()),
        );
        let fast = DownstreamPolicy {
            retry_base_delay_ms: 1,
            retry_max_delay_ms: 2,
            ..DownstreamPolicy::card_api()
        };
        let log_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let log_fail_next = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let log_hook: Arc<Mutex<Option<AsyncHook>>> = Arc::default();
        let inventory = Arc::new(MemoryInventoryStore::new());
        let saga = Saga::new(
            store.clone(),
            Arc::new(Log {
                inner: SqlApiLog::new(db.clone()),
                down: log_down.clone(),
                fail_next: log_fail_next.clone(),
                before_append: log_hook.clone(),
            }),
            Downstreams {
                card: card.clone(),
                card_stack: Arc::new(Downstream::new("card_api", &fast)),
                list_stack: Arc::new(Downstream::new("card_api_list", &fast)),
                ledger: ledger.clone(),
                ledger_stack: Arc::new(Downstream::new(
                    "ledger_api",
                    &DownstreamPolicy::ledger_api(),
                )),
            },
            alerts.clone(),
            SagaSettings {
                lookup_delay: Duration::from_millis(1),
                settle_on_access_after: Duration::from_secs(5),
                ..settings
            },
        )
        .with_inventory(inventory.clone());
        World {
            saga: Arc::new(saga),
            log_down,
            log_fail_next,
            log_hook,
            inventory,
            db: db.clone(),
            store,
            log: SqlApiLog::new(db),
            card,
            ledger,
            alerts,
            merchant: MerchantId::generate(),
            path,
        }
    }

    fn input(&self, order: &str) -> ConfirmInput {
        ConfirmInput {
            merchant_id: self.merchant.clone(),
            payment_key: format!("pk_{order}"),
            order_id: OrderId::parse(order).unwrap(),
            amount: 5_000,
            idempotency_key: None,
        }
    }

    /// A PENDING record as a crashed confirm left it, last changed `age` ago.
    async fn left_pending(&self, order: &str, age: Duration) -> PaymentRecord {
        let input = self.input(order);
        let at = paygate_core::time::now_ms() - age.as_millis() as i64;
        let r = PaymentRecord::new_pending(
            input.merchant_id,
            input.order_id,
            input.payment_key.clone(),
            input.amount,
            "KRW".into(),
            paygate_core::crypto::fingerprint(&[&input.payment_key, order, "5000"]),
            None,
            at,
        );
        self.store.create(&r).await.unwrap();
        r
    }

    async fn stored(&self, r: &PaymentRecord) -> (Partition, PaymentRecord) {
        self.store.get(&r.payment_id).await.unwrap().unwrap()
    }

    fn cleanup(&self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

fn ulid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn payment(order: &str, status: &str, approved_at: Option<&str>) -> CardPayment {
    CardPayment {
        payment_key: format!("pk_{order}"),
        order_id: order.to_owned(),
        status: status.to_owned(),
        total_amount: 5_000,
        balance_amount: Some(5_000),
        approved_at: approved_at.map(str::to_owned),
        requested_at: None,
        method: None,
        currency: Some("KRW".into()),
        failure: None,
        cancels: None,
    }
}

const AT: &str = "2026-11-23T12:00:00+09:00";

/// Point 3: a 200 whose status is not final is looked up, never a decline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_final_200_is_looked_up_and_never_declined() {
    let w = World::new("nonfinal").await;
    let order = "order-nonfinal-1";
    w.card
        .confirms
        .lock()
        .unwrap()
        .push_back(Ok(payment(order, "IN_PROGRESS", None)));
    w.card.lookups.lock().unwrap().extend([
        Ok(Some(payment(order, "IN_PROGRESS", None))),
        Ok(Some(payment(order, "DONE", Some(AT)))),
    ]);
    match w.saga.confirm(w.input(order)).await {
        ConfirmOutcome::Approved(r) => assert!(r.is_paid && r.is_saved),
        other => panic!("expected the lookup's approval, got {other:?}"),
    }
    assert_eq!(w.ledger.entries.lock().unwrap()[0].approved_at, AT);

    // Still not final after every lookup: UNKNOWN (202), never ABORTED (402).
    let order = "order-nonfinal-2";
    w.card
        .confirms
        .lock()
        .unwrap()
        .push_back(Ok(payment(order, "WAITING_FOR_DEPOSIT", None)));
    match w.saga.confirm(w.input(order)).await {
        ConfirmOutcome::Unknown(r) => {
            let (_, stored) = w.stored(&r).await;
            assert_eq!(stored.card_status, CardStatus::Unknown);
        }
        other => panic!("expected UNKNOWN, got {other:?}"),
    }
    w.cleanup();
}

/// Point 3: a failed guard is never counted as a success. A lookup that
/// finds the payment approved cannot mark a declined record paid, so
/// settling reports a mismatch, and the ledger is never sent a record that
/// is not paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_guard_is_never_reported_as_paid_or_saved() {
    let w = World::new("guard").await;
    let r = w
        .left_pending("order-guard-9", Duration::from_secs(600))
        .await;
    let declined = Transition::MarkAborted {
        failure_code: "REJECT_CARD_PAYMENT".into(),
        last_error: "declined".into(),
        seen_version: None,
    };
    assert!(w.store.transition(&r.payment_id, &declined).await.unwrap());
    w.card
        .lookups
        .lock()
        .unwrap()
        .push_back(Ok(Some(payment("order-guard-9", "DONE", Some(AT)))));
    let (_, aborted) = w.stored(&r).await;
    match w.saga.settle_unknown(&aborted).await.unwrap() {
        Settlement::Mismatch(_) => {}
        other => panic!("a failed MarkPaid was reported as {other:?}"),
    }
    assert_eq!(w.saga.batch_save(&aborted).await, SaveResult::Refused);
    assert!(
        w.ledger.entries.lock().unwrap().is_empty(),
        "no ledger entry for an unpaid record"
    );
    w.cleanup();
}

/// Point 8: when another actor recorded the approval first, the confirm
/// goes on from the stored record: the ledger gets the stored approvedAt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_mark_paid_the_ledger_gets_the_stored_approval_time() {
    let w = World::new("markpaid").await;
    let order = "order-markpaid-1";
    let store = w.store.clone();
    let merchant = w.merchant.clone();
    // While the confirm is at the card company, the reconciliation finds the
    // approval and records it (with the card company's time as it saw it).
    *w.card.during_confirm.lock().unwrap() = Some(Box::new(move || {
        let store = store.clone();
        let merchant = merchant.clone();
        let order = OrderId::parse(order).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                let r = store
                    .get_by_order(&merchant, &order)
                    .await
                    .unwrap()
                    .unwrap();
                let t = Transition::MarkPaid {
                    approved_at: "2026-11-23T11:59:59+09:00".into(),
                };
                assert!(store.transition(&r.payment_id, &t).await.unwrap());
            });
        })
        .join()
        .unwrap();
    }));
    w.card
        .confirms
        .lock()
        .unwrap()
        .push_back(Ok(payment(order, "DONE", Some(AT))));
    match w.saga.confirm(w.input(order)).await {
        ConfirmOutcome::Approved(r) => assert!(r.is_saved, "saved from the stored record"),
        other => panic!("expected approved, got {other:?}"),
    }
    let entries = w.ledger.entries.lock().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].approved_at, "2026-11-23T11:59:59+09:00",
        "the stored time, not the confirm's memory"
    );
    drop(entries);
    assert!(
        w.alerts.0.lock().unwrap().is_empty(),
        "no false ledger_refused"
    );
    w.cleanup();
}

/// Point 5: a PENDING record whose confirm was never sent (no REQUEST row)
/// is a no-call abort: a retry reopens it and confirms at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_pending_payment_never_sent_reopens_and_confirms_it() {
    let w = World::new("notsent").await;
    let order = "order-notsent-1";
    let r = w.left_pending(order, Duration::from_secs(60)).await;
    w.card
        .confirms
        .lock()
        .unwrap()
        .push_back(Ok(payment(order, "DONE", Some(AT))));
    match w.saga.confirm(w.input(order)).await {
        ConfirmOutcome::Approved(done) => {
            assert_eq!(done.payment_id, r.payment_id, "the same payment");
            assert!(done.is_paid && done.is_saved);
        }
        other => panic!("expected the retry to confirm it, got {other:?}"),
    }
    assert_eq!(*w.card.confirm_calls.lock().unwrap(), 1);
    assert_eq!(
        *w.card.lookup_calls.lock().unwrap(),
        0,
        "nothing to look up: nothing was sent"
    );
    w.cleanup();
}

/// Point 6: a PENDING record whose confirm was sent (a gateway died after
/// the call) is settled by lookup on the retry instead of 409 until the
/// batch runs; a young one, or one a live confirm owns, is still 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_pending_payment_sent_before_a_crash_is_settled_by_lookup() {
    let w = World::new("janitor").await;
    let order = "order-janitor-1";
    let young = w
        .left_pending("order-janitor-young", Duration::from_millis(10))
        .await;
    match w.saga.confirm(w.input("order-janitor-young")).await {
        ConfirmOutcome::InFlight(r) => assert_eq!(r.payment_id, young.payment_id),
        other => panic!("a young PENDING must stay in flight, got {other:?}"),
    }
    let r = w.left_pending(order, Duration::from_secs(60)).await;
    w.log
        .append(LogEntry {
            payment_id: &r.payment_id,
            target: Target::CardApi,
            kind: Kind::Request,
            attempt: 1,
            method: "POST",
            path: paygate_card_api::CONFIRM_PATH,
            status_code: None,
            body: None,
            latency_ms: None,
        })
        .await
        .unwrap();
    w.card
        .lookups
        .lock()
        .unwrap()
        .push_back(Ok(Some(payment(order, "DONE", Some(AT)))));
    match w.saga.confirm(w.input(order)).await {
        ConfirmOutcome::Approved(done) => {
            assert_eq!(done.payment_id, r.payment_id);
            assert!(done.is_paid && done.is_saved, "{done:?}");
        }
        other => panic!("expected the lookup's approval, got {other:?}"),
    }
    assert_eq!(*w.card.confirm_calls.lock().unwrap(), 0, "never re-sent");
    assert_eq!(w.ledger.entries.lock().unwrap().len(), 1);
    let (part, stored) = w.stored(&r).await;
    assert_eq!(
        (part, stored.is_paid, stored.is_saved),
        (Partition::Realtime, true, true)
    );
    assert!(
        !w.alerts
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.reason == AlertReason::OutcomeUnknown),
        "settled: no operator needed"
    );
    w.cleanup();
}

/// Issue 13 point 4: a merchant answered 503 before the record was durable
/// gets no card call for that request (the 503 stays true), and its retry
/// reopens the no-call abort and confirms it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_given_up_before_the_card_call_means_no_call_and_a_retry_confirms() {
    let w = World::new("gaveup").await;
    let order = "order-gaveup-1";
    let ticket = ConfirmTicket::new();
    assert_eq!(ticket.give_up(), EarlyAnswer::NothingCharged);
    let outcome = w
        .saga
        .confirm_with_ticket(w.input(order), ticket.clone())
        .await;
    let pid = match outcome {
        ConfirmOutcome::Unavailable {
            payment_id: Some(pid),
            ..
        } => pid,
        other => panic!("expected a no-call abort, got {other:?}"),
    };
    assert_eq!(ticket.state(), TicketState::GaveUp, "it stays given up");
    assert_eq!(*w.card.confirm_calls.lock().unwrap(), 0, "no card call");
    assert!(
        !w.log
            .has_request(pid.as_str(), Target::CardApi)
            .await
            .unwrap(),
        "no card REQUEST row either"
    );
    let (_, stored) = w.store.get(&pid).await.unwrap().unwrap();
    assert_eq!(stored.card_status, CardStatus::Aborted);
    assert_eq!(
        stored.failure_code.as_deref(),
        Some(failure_codes::ANSWER_TIMED_OUT)
    );

    w.card
        .confirms
        .lock()
        .unwrap()
        .push_back(Ok(payment(order, "DONE", Some(AT))));
    match w.saga.confirm(w.input(order)).await {
        ConfirmOutcome::Approved(done) => assert_eq!(done.payment_id, pid, "the same payment"),
        other => panic!("expected the retry to confirm it, got {other:?}"),
    }
    assert_eq!(*w.card.confirm_calls.lock().unwrap(), 1);
    w.cleanup();
}

/// Issue 13 point 4: once the card may be called, an early answer is the
/// payment in progress (202), never "nothing was charged", and the saga
/// carries on to the approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_made_durable_answers_in_progress_and_the_saga_carries_on() {
    let w = World::new("durable").await;
    let order = "order-durable-1";
    let ticket = ConfirmTicket::new();
    let seen = Arc::new(Mutex::new(None));
    {
        let (ticket, seen) = (ticket.clone(), seen.clone());
        *w.card.during_confirm.lock().unwrap() = Some(Box::new(move || {
            *seen.lock().unwrap() = Some(ticket.give_up());
        }));
    }
    w.card
        .confirms
        .lock()
        .unwrap()
        .push_back(Ok(payment(order, "DONE", Some(AT))));
    let outcome = w.saga.confirm_with_ticket(w.input(order), ticket).await;
    let done = match outcome {
        ConfirmOutcome::Approved(done) => done,
        other => panic!("the saga carries on after an early answer, got {other:?}"),
    };
    match seen.lock().unwrap().take() {
        Some(EarlyAnswer::InProgress(r)) => {
            assert_eq!(r.payment_id, done.payment_id);
            assert_eq!(
                r.card_status,
                CardStatus::Pending,
                "answered as IN_PROGRESS"
            );
        }
        other => panic!("during the card call the answer is 202, got {other:?}"),
    }
    assert!(done.is_paid && done.is_saved);
    w.cleanup();
}

/// Point 8: a failed move of a no-call abort back from unpaid was
/// swallowed, and the retry went on to the card with the record still in
/// unpaid (where MarkPaid could never find it). Now the retry answers 503
/// and makes no card call; the next retry confirms it. The 503 carries no
/// paymentId: with the store failing, this request cannot say what the
/// payment does now (another replica's retry may be sending it), only
/// that it made no card call itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_move_back_from_unpaid_makes_no_card_call() {
    let w = World::new("moveback").await;
    let order = "order-moveback-1";
    let r = w.left_pending(order, Duration::from_secs(60)).await;
    let open = Transition::MarkAborted {
        failure_code: paygate_core::payment::failure_codes::CIRCUIT_OPEN.into(),
        last_error: "breaker open".into(),
        seen_version: None,
    };
    assert!(w.store.transition(&r.payment_id, &open).await.unwrap());
    assert!(w
        .store
        .move_record(&r.payment_id, Partition::Realtime, Partition::Unpaid)
        .await
        .unwrap());
    // The retry's create (answered from the stored payment) and then its
    // move back both fail.
    w.store
        .fail_next_writes(2, paygate_state_store::Fault::FailBefore);
    match w.saga.confirm(w.input(order)).await {
        ConfirmOutcome::Unavailable { payment_id, .. } => assert_eq!(payment_id, None),
        other => panic!("expected 503, got {other:?}"),
    }
    assert_eq!(*w.card.confirm_calls.lock().unwrap(), 0, "no card call");
    w.card
        .confirms
        .lock()
        .unwrap()
        .push_back(Ok(payment(order, "DONE", Some(AT))));
    match w.saga.confirm(w.input(order)).await {
        ConfirmOutcome::Approved(done) => assert!(done.is_paid && done.is_saved),
        other => panic!("expected the next retry to confirm, got {other:?}"),
    }
    assert_eq!(w.stored(&r).await.0, Partition::Realtime);
    w.cleanup();
}

/// Seeds 4706 and 17115: a sweep filed a payment as never sent (its
/// confirm's REQUEST row was stalled) while that confirm went on to the
/// card and its gateway died; a merchant's retry reopened it and could not
/// write its own REQUEST row. That retry made no card call, but the first
/// confirm did: it answers 409 with the paymentId, not a 503 "nothing was
/// charged", and the record stays PAYGATE_NOT_SENT so the next retry
/// (log back) confirms it under the same key and gets the approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_not_sent_payment_that_cannot_be_sent_is_never_a_503() {
    let w = World::new("notsent-logdown").await;
    let order = "order-notsent-logdown-1";
    let r = w.left_pending(order, Duration::from_secs(60)).await;
    let filed = Transition::MarkAborted {
        failure_code: failure_codes::NOT_SENT.into(),
        last_error: "no card confirm was logged for it; none was sent".into(),
        seen_version: None,
    };
    assert!(w.store.transition(&r.payment_id, &filed).await.unwrap());
    assert!(w
        .store
        .move_record(&r.payment_id, Partition::Realtime, Partition::Unpaid)
        .await
        .unwrap());
    // The first confirm's REQUEST row lands late; it reached the card.
    w.log
        .append(LogEntry {
            payment_id: &r.payment_id,
            target: Target::CardApi,
            kind: Kind::Request,
            attempt: 1,
            method: "POST",
            path: paygate_card_api::CONFIRM_PATH,
            status_code: None,
            body: None,
            latency_ms: None,
        })
        .await
        .unwrap();
    w.log_down.store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..2 {
        match w.saga.confirm(w.input(order)).await {
            ConfirmOutcome::InFlight(p) => assert_eq!(p.payment_id, r.payment_id),
            other => panic!("expected 409 with the payment, got {other:?}"),
        }
        let (_, stored) = w.stored(&r).await;
        assert_eq!(stored.card_status, CardStatus::Aborted);
        assert_eq!(
            stored.failure_code.as_deref(),
            Some(failure_codes::NOT_SENT),
            "the doubt outlives the retry"
        );
    }
    assert_eq!(*w.card.confirm_calls.lock().unwrap(), 0, "no card call");
    w.log_down.store(false, std::sync::atomic::Ordering::SeqCst);
    w.card
        .confirms
        .lock()
        .unwrap()
        .push_back(Ok(payment(order, "DONE", Some(AT))));
    match w.saga.confirm(w.input(order)).await {
        ConfirmOutcome::Approved(done) => {
            assert_eq!(
                done.payment_id, r.payment_id,
                "the same payment, the same key"
            );
            assert!(done.is_paid && done.is_saved);
        }
        other => panic!("expected the next retry to confirm, got {other:?}"),
    }
    w.cleanup();
}

/// Point 8: async ledger retries are bounded in number; past the bound
/// the payment (stored paid and unsaved) is left to the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_ledger_retries_are_bounded_in_number() {
    let w = World::with_settings(
        "bounded",
        SagaSettings {
            ledger_retry_max_pending: 2,
            ledger_retry_base_delay: Duration::from_secs(3_600),
            ledger_retry_max_delay: Duration::from_secs(3_600),
            ..SagaSettings::default()
        },
    )
    .await;
    w.ledger
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for i in 0..5 {
        let order = format!("order-bounded-{i}");
        w.card
            .confirms
            .lock()
            .unwrap()
            .push_back(Ok(payment(&order, "DONE", Some(AT))));
        match w.saga.confirm(w.input(&order)).await {
            ConfirmOutcome::Approved(r) => assert!(r.is_paid && !r.is_saved),
            other => panic!("expected approved and unsaved, got {other:?}"),
        }
    }
    assert_eq!(
        w.saga.retries().pending(),
        2,
        "at most ledger_retry_max_pending"
    );
    let unsaved = w
        .store
        .snapshot()
        .into_iter()
        .filter(|(_, r)| r.is_paid && !r.is_saved)
        .count();
    assert_eq!(
        unsaved, 5,
        "every one stored paid and unsaved, for the batch"
    );
    w.cleanup();
}

/// Sets `w`'s log hook: `hook` runs once, inside the saga's next log write.
fn on_next_log_write<F, Fut>(w: &World, hook: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    *w.log_hook.lock().unwrap() = Some(Box::new(move || Box::pin(hook())));
}

/// A paid and saved record, as an approved confirm leaves it.
async fn paid_record(w: &World, order: &str) -> PaymentRecord {
    let r = w.left_pending(order, Duration::from_secs(600)).await;
    let paid = Transition::MarkPaid {
        approved_at: AT.into(),
    };
    assert!(w.store.transition(&r.payment_id, &paid).await.unwrap());
    assert!(w
        .store
        .transition(&r.payment_id, &Transition::MarkSaved)
        .await
        .unwrap());
    w.stored(&r).await.1
}

/// The card company's payment after cancels of these amounts.
fn canceled(order: &str, amounts: &[i64]) -> CardPayment {
    let mut p = payment(order, "PARTIAL_CANCELED", Some(AT));
    p.cancels = Some(
        amounts
            .iter()
            .map(|a| paygate_card_api::Cancel {
                cancel_amount: *a,
                cancel_reason: "r".into(),
                canceled_at: AT.into(),
                transaction_key: None,
            })
            .collect(),
    );
    p
}

/// `out` is 200 with its (only) cancel `DONE`; `what` names the case.
fn assert_done(out: paygate_payments::CancelOutcome, what: &str) {
    match out {
        paygate_payments::CancelOutcome::Canceled(p) => {
            assert_eq!(p.cancels[0].status, paygate_state_store::CancelStatus::Done);
        }
        other => panic!("{what} answered {other:?}"),
    }
}

fn cancel_input(w: &World, r: &PaymentRecord, amount: i64) -> paygate_payments::CancelInput {
    paygate_payments::CancelInput {
        merchant_id: w.merchant.clone(),
        payment_id: r.payment_id.clone(),
        reason: "r".into(),
        amount: Some(amount),
        idempotency_key: Some("cancel-key-1".into()),
    }
}

/// A confirm that stalls between its record and its no-call abort (its
/// REQUEST row write hangs, then fails) cannot abort a payment that
/// another replica filed as never sent, reopened and began on since, nor
/// release that replica's hold: its abort is guarded on the version it
/// last wrote, and it releases only the hold version it moved itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_no_call_abort_leaves_a_payment_another_replica_reopened() {
    let w = World::new("stalled-abort").await;
    let order = "order-stall-1";
    let now = paygate_core::time::now_ms();
    w.inventory
        .set_stock(&w.merchant, "sku-1", 1, now)
        .await
        .unwrap();
    let hold = paygate_state_store::Hold::new_pre(
        w.merchant.clone(),
        OrderId::parse(order).unwrap(),
        vec![paygate_state_store::HoldItem {
            sku: "sku-1".into(),
            quantity: 1,
        }],
        now + 600_000,
        "fp".into(),
        now,
    );
    w.inventory.take(&hold, now).await.unwrap();
    let (store, inventory, m) = (w.store.clone(), w.inventory.clone(), w.merchant.clone());
    let log_down = w.log_down.clone();
    on_next_log_write(&w, move || async move {
        let order = OrderId::parse(order).unwrap();
        let r = store.get_by_order(&m, &order).await.unwrap().unwrap();
        let file = Transition::FileNotSent {
            seen_version: r.version,
            last_error: "no REQUEST row".into(),
        };
        assert!(store.transition(&r.payment_id, &file).await.unwrap());
        let reopen = Transition::Reopen {
            failure_code: failure_codes::NOT_SENT.into(),
            seen_version: Some(r.version + 1),
        };
        assert!(store.transition(&r.payment_id, &reopen).await.unwrap());
        let began = inventory.begin_payment(&m, &order, now).await.unwrap();
        assert!(matches!(
            began,
            paygate_state_store::BeginOutcome::During(_)
        ));
        // This confirm's REQUEST row now fails: no card call.
        log_down.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let out = w.saga.confirm(w.input(order)).await;
    assert!(
        matches!(out, ConfirmOutcome::InFlight(_)),
        "a request whose payment another replica took over answers 409, got {out:?}"
    );
    let r = w
        .store
        .get_by_order(&w.merchant, &OrderId::parse(order).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.card_status, r.failure_code.as_deref()),
        (CardStatus::Pending, None),
        "the stalled confirm aborted a payment another replica had reopened"
    );
    let held = w
        .inventory
        .hold_by_order(&w.merchant, &OrderId::parse(order).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        held.state,
        paygate_state_store::HoldState::During,
        "the stalled confirm released the hold of the replica now sending"
    );
    assert_eq!(*w.card.confirm_calls.lock().unwrap(), 0);
    w.cleanup();
}

/// A cancel whose first attempt reached the card company (its answer
/// lost) and whose retry could not be sent (no REQUEST row) is not marked
/// FAILED with its key given back ("nothing was canceled"): an attempt
/// left, so only the card company's record can say. The lookup finds the
/// refund: 200, DONE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_with_an_attempt_sent_is_never_answered_nothing_canceled() {
    let w = World::new("cancel-sent").await;
    let order = "order-cancel-sent";
    let r = paid_record(&w, order).await;
    w.card
        .cancels
        .lock()
        .unwrap()
        .push_back(Err(CardApiError::Timeout));
    // Inside the first attempt: the card applies the refund; then the
    // attempt's ERROR row and the retry's REQUEST row cannot be written.
    let fail_next = w.log_fail_next.clone();
    *w.card.during_cancel.lock().unwrap() = Some(Box::new(move || {
        fail_next.store(2, std::sync::atomic::Ordering::SeqCst);
    }));
    w.card
        .lookups
        .lock()
        .unwrap()
        .push_back(Ok(Some(canceled(order, &[1_000]))));
    let out = w.saga.cancel(cancel_input(&w, &r, 1_000)).await;
    assert_done(out, "a cancel that reached the card company");
    assert_eq!(*w.card.cancel_calls.lock().unwrap(), 1);
    w.cleanup();
}

/// A cancel request stalls before its card call; the batch finds it
/// pending past its grace, fences it and sends it (the card applies it,
/// the answer is lost); then the stalled request cannot write its REQUEST
/// row. It made no call itself, but "nothing was canceled" would be false:
/// its `MarkFailed` is guarded on the version it claimed, which the
/// batch's fence moved, so it settles by lookup (200, DONE) and the
/// merchant's retry is no new refund.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_the_batch_sent_is_not_failed_by_the_request_that_stalled() {
    let w = World::new("cancel-batch").await;
    let order = "order-cancel-batch";
    let r = paid_record(&w, order).await;
    // The batch's lookup before it sends finds no cancel; its three
    // attempts reach the card company, every answer lost.
    w.card
        .lookups
        .lock()
        .unwrap()
        .push_back(Ok(Some(payment(order, "DONE", Some(AT)))));
    w.card.cancels.lock().unwrap().extend([
        Err(CardApiError::Timeout),
        Err(CardApiError::Timeout),
        Err(CardApiError::Timeout),
    ]);
    let (saga, store, pid) = (w.saga.clone(), w.store.clone(), r.payment_id.clone());
    let fail_next = w.log_fail_next.clone();
    let card = w.card.clone();
    on_next_log_write(&w, move || async move {
        let c = store.cancels_of(&pid).await.unwrap().remove(0);
        let settled = saga.settle_cancel(&c, 5).await;
        assert_eq!(settled, paygate_payments::CancelSettlement::StillUnknown);
        // The stalled request resumes: its REQUEST row fails.
        fail_next.store(1, std::sync::atomic::Ordering::SeqCst);
        card.lookups
            .lock()
            .unwrap()
            .push_back(Ok(Some(canceled(order, &[1_000]))));
    });
    let out = w.saga.cancel(cancel_input(&w, &r, 1_000)).await;
    assert_done(out, "a cancel the batch sent");
    assert_eq!(*w.card.cancel_calls.lock().unwrap(), 3, "only the batch's");
    w.cleanup();
}

/// The claim of a cancel committed but its acknowledgement was lost: a
/// `PENDING` cancel exists that the batch will send, so the answer is 202
/// (read again), never 503 "nothing was canceled".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_claim_acknowledgement_is_answered_from_a_fresh_read() {
    let w = World::new("cancel-ack").await;
    let r = paid_record(&w, "order-cancel-ack").await;
    w.store
        .fail_next_writes(1, paygate_state_store::Fault::FailAfter);
    let out = w.saga.cancel(cancel_input(&w, &r, 1_000)).await;
    match out {
        paygate_payments::CancelOutcome::Unknown(p) => {
            assert_eq!(
                p.cancels[0].status,
                paygate_state_store::CancelStatus::Pending
            );
        }
        other => panic!("a claimed cancel whose answer was lost answered {other:?}"),
    }
    assert_eq!(*w.card.cancel_calls.lock().unwrap(), 0);
    w.cleanup();
}

/// The batch scanned a record while it was PENDING; before its lookup the
/// saga approved it and the merchant refunded part of it, so the card
/// company answers PARTIAL_CANCELED. That answer is stale, not a
/// mismatch: the alert is raised only when a fresh read still shows the
/// record the verdict was drawn from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_judged_on_a_stale_read_pages_no_one() {
    let w = World::new("stale-page").await;
    let order = "order-stale-page";
    let scanned = w.left_pending(order, Duration::from_secs(600)).await;
    let paid = Transition::MarkPaid {
        approved_at: AT.into(),
    };
    assert!(w
        .store
        .transition(&scanned.payment_id, &paid)
        .await
        .unwrap());
    w.card
        .lookups
        .lock()
        .unwrap()
        .push_back(Ok(Some(canceled(order, &[1_000]))));
    let settler = paygate_payments::Settler::new(w.store.clone(), w.saga.clone(), 5);
    let (_, tally) = settler.settle(scanned, false).await.unwrap();
    assert_eq!(tally.alerts, 0);
    assert!(
        w.alerts.0.lock().unwrap().is_empty(),
        "an operator was paged for a payment that is fine"
    );

    // But an approval the record can no longer take (an operator filed it
    // not charged since the scan) is alerted, changed record or not.
    let order = "order-stale-approved";
    let scanned = w.left_pending(order, Duration::from_secs(600)).await;
    let not_charged = Transition::MarkAborted {
        failure_code: paygate_payments::resolve::OPERATOR_NOT_CHARGED.into(),
        last_error: "resolved not charged".into(),
        seen_version: Some(scanned.version),
    };
    assert!(w
        .store
        .transition(&scanned.payment_id, &not_charged)
        .await
        .unwrap());
    w.card
        .lookups
        .lock()
        .unwrap()
        .push_back(Ok(Some(payment(order, "DONE", Some(AT)))));
    let (_, tally) = settler.settle(scanned, false).await.unwrap();
    assert_eq!(
        tally.alerts, 1,
        "an approval paygate cannot record paged no one"
    );
    w.cleanup();
}

/// An operator's "not charged" is refused while a confirm may still be at
/// the card company (the record changed less than the card stack's
/// deadline plus a clock margin ago), and when the record changed since
/// the version the operator looked at; it applies to the record it judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_charged_is_refused_for_a_record_a_confirm_may_still_hold() {
    use paygate_payments::{Decision, ResolveError, ResolveRequest, Resolver};
    // The world's in-flight window (`settle_on_access_after`) is 5 s.
    let w = World::new("resolve-young").await;
    let resolver = Resolver::new(w.store.clone(), w.saga.clone(), w.db.clone(), 5);
    let req = |r: &PaymentRecord, seen_version: Option<i64>| ResolveRequest {
        payment_id: r.payment_id.clone(),
        decision: Decision::NotCharged,
        reason: "not in the console".into(),
        operator: "op".into(),
        force: false,
        seen_version,
    };
    // Changed 2 s ago: its confirm may still be at the card company.
    let young = w
        .left_pending("order-young-1", Duration::from_secs(2))
        .await;
    match resolver.resolve(&req(&young, None)).await {
        Err(ResolveError::NotOpen(_)) => {}
        other => panic!("a record 2 s old was resolved: {other:?}"),
    }
    assert_eq!(w.stored(&young).await.1.card_status, CardStatus::Pending);
    // Old enough, but the operator looked at another version.
    let old = w
        .left_pending("order-old-1", Duration::from_secs(600))
        .await;
    match resolver.resolve(&req(&old, Some(old.version + 1))).await {
        Err(ResolveError::NotOpen(_)) => {}
        other => panic!("a decision on a version the record no longer has applied: {other:?}"),
    }
    // The version the operator saw, old enough: applied.
    let done = resolver.resolve(&req(&old, Some(old.version))).await;
    assert!(done.is_ok(), "{done:?}");
    let (part, after) = w.stored(&old).await;
    assert_eq!(
        (part, after.card_status),
        (Partition::Unpaid, CardStatus::Aborted)
    );
    w.cleanup();
}
