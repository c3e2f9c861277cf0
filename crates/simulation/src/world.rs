//! What survives a crash: the state store, the request log, the alert
//! outbox, the leases and the downstream models. And what does not: a
//! process (a gateway, a batch run, a reconciliation run) is an
//! [`Incarnation`] whose handles to the world stop working the moment it
//! dies, so a task it left behind (an async ledger retry, a card call in
//! flight) can never write again, as after a `kill -9`.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use paygate_alert::{Alert, Alerter};
use paygate_api_log::{ApiLog, ConfirmEvidence, LogEntry, MemoryApiLog};
use paygate_batch::lease::MemoryLeases;
use paygate_card_api::{
    CancelRequest, CardApi, CardApiError, CardPayment, ConfirmRequest, Transaction,
    TransactionsQuery,
};
use paygate_core::{
    config::DownstreamPolicy, MerchantId, OrderId, Partition, PaymentId, PaymentRecord,
};
use paygate_ledger_api::{LedgerApi, LedgerApiError, LedgerEntry, LedgerOutcome};
use paygate_payments::{saga::Downstreams, Saga, SagaSettings};
use paygate_resilience::Downstream;
use paygate_state_store::{CreateOutcome, MemoryStateStore, StateStore, StoreError, Transition};

use crate::{card::SimCard, ledger::SimLedger, rng::SimRng};

/// Alerts in front of operators (deduplicated by payment and reason).
#[derive(Default)]
pub struct SimAlerts {
    alerts: Mutex<Vec<Alert>>,
    seen: Mutex<BTreeSet<String>>,
}

impl SimAlerts {
    /// Every alert raised, first of each kind only.
    pub fn all(&self) -> Vec<Alert> {
        self.alerts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl Alerter for SimAlerts {
    async fn raise(&self, alert: Alert) -> bool {
        let new = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(alert.dedup_key());
        if new {
            self.alerts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(alert);
        }
        new
    }
}

/// Everything that outlives a process.
pub struct World {
    /// The realtime state records.
    pub store: Arc<MemoryStateStore>,
    /// The request/response log.
    pub log: Arc<MemoryApiLog>,
    /// The alert outbox.
    pub alerts: Arc<SimAlerts>,
    /// Batch and reconciliation leases.
    pub leases: Arc<MemoryLeases>,
    /// The card company.
    pub card: Arc<SimCard>,
    /// The ledger.
    pub ledger: Arc<SimLedger>,
    /// Inventory and holds (issue 17).
    pub inventory: Arc<paygate_state_store::MemoryInventoryStore>,
    /// The seeded RNG.
    pub rng: SimRng,
}

impl World {
    /// A fresh world for one history.
    pub fn new(rng: SimRng) -> Self {
        let clock: paygate_state_store::memory::Clock = Arc::new(paygate_core::time::now_ms);
        Self {
            store: Arc::new(MemoryStateStore::new(clock)),
            log: Arc::new(MemoryApiLog::new()),
            alerts: Arc::new(SimAlerts::default()),
            leases: Arc::new(MemoryLeases::default()),
            card: Arc::new(SimCard::new(rng.clone())),
            ledger: Arc::new(SimLedger::new(rng.clone())),
            inventory: Arc::new(paygate_state_store::MemoryInventoryStore::new()),
            rng,
        }
    }
}

/// One process's view of the world; dead once [`Incarnation::kill`]ed.
pub struct Incarnation {
    dead: Arc<AtomicBool>,
    /// The saga over this process's handles.
    pub saga: Arc<Saga>,
    /// This process's handle to the state store.
    pub store: Arc<dyn StateStore>,
}

impl Incarnation {
    /// A new process over `world`, with the sim's fast resilience policies.
    pub fn start(world: &World) -> Self {
        let dead = Arc::new(AtomicBool::new(false));
        let store: Arc<dyn StateStore> = Arc::new(Handle {
            inner: world.store.clone(),
            dead: dead.clone(),
            rng: Some(world.rng.clone()),
        });
        // A small breaker window: the sim's few orders can open it, and an
        // open breaker makes the no-call aborts that merchant retries reopen.
        let card_policy = DownstreamPolicy {
            breaker_wait_duration_in_open_ms: 3_000,
            breaker_window_size: 10,
            breaker_minimum_number_of_calls: 4,
            ..DownstreamPolicy::card_api()
        };
        let saga = Arc::new(
            Saga::new(
                store.clone(),
                Arc::new(Handle {
                    inner: world.log.clone(),
                    dead: dead.clone(),
                    rng: Some(world.rng.clone()),
                }),
                Downstreams {
                    card: Arc::new(Handle {
                        inner: world.card.clone(),
                        dead: dead.clone(),
                        rng: None,
                    }),
                    card_stack: Arc::new(Downstream::new("card_api", &card_policy)),
                    list_stack: Arc::new(Downstream::new("card_api_list", &card_policy)),
                    ledger: Arc::new(Handle {
                        inner: world.ledger.clone(),
                        dead: dead.clone(),
                        rng: None,
                    }),
                    ledger_stack: Arc::new(Downstream::new(
                        "ledger_api",
                        &DownstreamPolicy::ledger_api(),
                    )),
                },
                Arc::new(Handle {
                    inner: world.alerts.clone(),
                    dead: dead.clone(),
                    rng: None,
                }),
                SagaSettings {
                    settle_on_access_after: Duration::from_secs(5),
                    ..SagaSettings::default()
                },
            )
            .with_inventory(world.inventory.clone()),
        );
        Self { dead, saga, store }
    }

    /// `kill -9`: from now on nothing this process left running can write,
    /// call or alert.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }
}

/// A process's handle to one part of the world.
struct Handle<T: ?Sized> {
    inner: Arc<T>,
    dead: Arc<AtomicBool>,
    /// Each call waits 0-3 ms (simulated), as a round trip to a database
    /// does, so that other actors can act between two awaits.
    rng: Option<SimRng>,
}

impl<T: ?Sized> Handle<T> {
    fn alive(&self) -> bool {
        !self.dead.load(Ordering::SeqCst)
    }

    async fn round_trip(&self) -> bool {
        if let Some(rng) = &self.rng {
            let ms = rng.between(0, 3);
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        self.alive()
    }
}

fn gone() -> StoreError {
    StoreError::Unavailable("process died".to_owned())
}

#[async_trait]
impl StateStore for Handle<MemoryStateStore> {
    async fn create(&self, r: &PaymentRecord) -> Result<CreateOutcome, StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        self.inner.create(r).await
    }
    async fn get(&self, id: &PaymentId) -> Result<Option<(Partition, PaymentRecord)>, StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        self.inner.get(id).await
    }
    async fn get_by_order(
        &self,
        m: &MerchantId,
        o: &OrderId,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        self.inner.get_by_order(m, o).await
    }
    async fn transition(&self, id: &PaymentId, t: &Transition) -> Result<bool, StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        self.inner.transition(id, t).await
    }
    async fn move_record(
        &self,
        id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        self.inner.move_record(id, from, to).await
    }
    async fn copy_to_partition(
        &self,
        id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        self.inner.copy_to_partition(id, from, to).await
    }
    fn scan(&self, p: Partition, batch: u32) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        if !self.alive() {
            return Box::pin(futures_util::stream::once(async { Err(gone()) }));
        }
        self.inner.scan(p, batch)
    }
    async fn find_by_order_ids(
        &self,
        ids: &[String],
    ) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        self.inner.find_by_order_ids(ids).await
    }
    fn scan_created(
        &self,
        p: Partition,
        from: i64,
        to: i64,
        batch: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        if !self.alive() {
            return Box::pin(futures_util::stream::once(async { Err(gone()) }));
        }
        self.inner.scan_created(p, from, to, batch)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        if !self.alive() {
            return Err(gone());
        }
        self.inner.ping().await
    }
}

#[async_trait]
impl ApiLog for Handle<MemoryApiLog> {
    async fn append(&self, entry: LogEntry<'_>) -> Result<(), StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        self.inner.append(entry).await
    }
    async fn confirm_evidence(&self, id: &str, path: &str) -> Result<ConfirmEvidence, StoreError> {
        if !self.round_trip().await {
            return Err(gone());
        }
        self.inner.confirm_evidence(id, path).await
    }
}

fn dead_card() -> CardApiError {
    CardApiError::Connection("process died".to_owned())
}

#[async_trait]
impl CardApi for Handle<SimCard> {
    async fn confirm(&self, req: &ConfirmRequest, key: &str) -> Result<CardPayment, CardApiError> {
        if !self.alive() {
            return Err(dead_card());
        }
        self.inner.confirm(req, key).await
    }
    async fn payment_by_order_id(&self, o: &str) -> Result<Option<CardPayment>, CardApiError> {
        if !self.alive() {
            return Err(dead_card());
        }
        self.inner.payment_by_order_id(o).await
    }
    async fn cancel(
        &self,
        pk: &str,
        req: &CancelRequest,
        key: &str,
    ) -> Result<CardPayment, CardApiError> {
        if !self.alive() {
            return Err(dead_card());
        }
        self.inner.cancel(pk, req, key).await
    }
    async fn transactions(&self, q: &TransactionsQuery) -> Result<Vec<Transaction>, CardApiError> {
        if !self.alive() {
            return Err(dead_card());
        }
        self.inner.transactions(q).await
    }
}

#[async_trait]
impl LedgerApi for Handle<SimLedger> {
    async fn record(&self, e: &LedgerEntry, key: &str) -> Result<LedgerOutcome, LedgerApiError> {
        if !self.alive() {
            return Err(LedgerApiError::Connection("process died".to_owned()));
        }
        self.inner.record(e, key).await
    }
    async fn get(&self, id: &str) -> Result<Option<LedgerEntry>, LedgerApiError> {
        if !self.alive() {
            return Err(LedgerApiError::Connection("process died".to_owned()));
        }
        self.inner.get(id).await
    }
}

#[async_trait]
impl Alerter for Handle<SimAlerts> {
    async fn raise(&self, alert: Alert) -> bool {
        self.alive() && self.inner.raise(alert).await
    }
}
