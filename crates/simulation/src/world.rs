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
use paygate_ledger_api::{LedgerApi, LedgerApiError, LedgerEntry, LedgerOutcome, LedgerReversal};
use paygate_payments::{saga::Downstreams, Saga, SagaSettings};
use paygate_resilience::Downstream;
use paygate_state_store::{CreateOutcome, MemoryStateStore, StateStore, StoreError, Transition};

use crate::{
    card::SimCard,
    ledger::SimLedger,
    rng::SimRng,
    store::{SimStore, Write, Written},
};

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

/// The process that made a change: which rule its changes must keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Actor {
    /// A serving process (confirms, their async ledger retries, settle on
    /// access).
    Gateway,
    /// A batch sweep that started at `started_ms` (epoch ms) with a grace
    /// period of `grace_ms`: it may change only records whose last change
    /// was at least the grace before it started (DESIGN.md §1, §9).
    Sweep {
        /// When the sweep started, epoch ms.
        started_ms: i64,
        /// Its grace period, ms.
        grace_ms: u64,
    },
    /// A reconciliation run.
    Reconcile,
    /// An operator resolving payments by hand (`paygate payments resolve`).
    Operator,
    /// A replica's card webhook worker acting on a receipt (true, late,
    /// duplicated, reordered or forged).
    CardWebhook,
}

/// One change a process applied to a record, as the sim saw it from
/// outside the store: the record differed after the call (whatever the
/// call reported, so a write whose acknowledgement was lost counts too).
/// The checker reads ages from this journal, not from the records'
/// `updated_at`, so a store or a job that reads the wrong timestamp cannot
/// hide behind it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Change {
    /// When, epoch ms.
    pub at_ms: i64,
    /// Who.
    pub actor: Actor,
    /// Which payment.
    pub payment_id: String,
    /// What call (`create`, `transition`, `move`).
    pub what: &'static str,
    /// The event the applied transition must have left
    /// (`Transition::event_type`), for the events checker.
    pub event: Option<&'static str>,
}

/// The journal of every applied change of a history.
pub type Changes = Arc<Mutex<Vec<Change>>>;

/// The cancel each merchant request claimed: request number to
/// `(payment_id, n)`.
pub type CancelClaims = Arc<Mutex<std::collections::BTreeMap<u64, (String, i64)>>>;

/// Everything that outlives a process.
pub struct World {
    /// The realtime state records: in memory, or on a real backend
    /// ([`crate::store::StoreMode`]).
    pub store: Arc<dyn SimStore>,
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
    /// The inventory's faults, and the sales it watched
    /// ([`crate::inventory`]).
    pub inventory_faults: Arc<crate::inventory::InventoryFaults>,
    /// The seeded RNG.
    pub rng: SimRng,
    /// Every change applied to a record, by whom and when.
    pub changes: Changes,
    /// The cancel each merchant request claimed.
    pub cancel_claims: CancelClaims,
    /// Store and log round trips that stall (20-400 ms: a lock wait, a
    /// pause, a slow disk), per mille.
    pub stall_per_mille: u64,
    /// Merchant requests numbered so far (one count for every gateway of
    /// the history, so a number names one request).
    pub requests: Arc<std::sync::atomic::AtomicU64>,
    /// The gateways' settle-on-access age. One replica sees every live
    /// confirm of the history (a dead incarnation's tasks never act
    /// again), so its 5 s exercises settle-on-access often; with several,
    /// a confirm live at another replica is invisible, and the age is the
    /// production one ([`paygate_payments::in_flight_window`] of the card
    /// stack's deadline).
    pub settle_on_access_after: Duration,
    /// The stream of the draws only several replicas make (job pauses).
    pub chaos: SimRng,
    /// Round trips of a batch or reconciliation process that stall 1-6 s,
    /// per mille.
    pub job_stall_per_mille: u64,
    /// Round trips of a gateway replica that stall 1-6 s, per mille.
    pub gateway_stall_per_mille: u64,
    /// Draws each process's clock skew ([`World::with_skew`]); `None`:
    /// every process reads the history's clock.
    pub skews: Option<SimRng>,
}

impl World {
    /// A fresh world for one history whose store and log round trips
    /// stall `stall_per_mille` of the time; its state store is `store`
    /// (fresh: see [`World::memory_store`]).
    pub fn new(rng: SimRng, stall_per_mille: u64, store: Arc<dyn SimStore>) -> Self {
        Self {
            store,
            log: Arc::new(MemoryApiLog::new()),
            alerts: Arc::new(SimAlerts::default()),
            leases: Arc::new(MemoryLeases::default()),
            card: Arc::new(SimCard::new(rng.clone())),
            ledger: Arc::new(SimLedger::new(rng.clone())),
            inventory: Arc::new(paygate_state_store::MemoryInventoryStore::new()),
            inventory_faults: Arc::default(),
            rng,
            changes: Changes::default(),
            cancel_claims: CancelClaims::default(),
            requests: Arc::default(),
            stall_per_mille,
            settle_on_access_after: Duration::from_secs(5),
            chaos: SimRng::new(0),
            job_stall_per_mille: 0,
            gateway_stall_per_mille: 0,
            skews: None,
        }
    }
}

impl World {
    /// The world of a history with several replicas: job pauses drawn
    /// from `chaos`, and settle-on-access at `settle_on_access_after`.
    pub fn with_replicas(mut self, chaos: SimRng, settle_on_access_after: Duration) -> Self {
        self.chaos = chaos;
        self.settle_on_access_after = settle_on_access_after;
        self
    }

    /// The world whose processes each read a clock of their own, drawn
    /// from `skews` by [`skewed_clock`]. The stores keep the history's
    /// clock: they are the database, whose clock decides where it decides.
    pub fn with_skew(mut self, skews: SimRng) -> Self {
        self.skews = Some(skews);
        self
    }

    /// A fresh in-memory state store on the history's (simulated) clock.
    pub fn memory_store() -> Arc<MemoryStateStore> {
        let clock = paygate_core::Clock::system();
        Arc::new(MemoryStateStore::new(clock))
    }
}

/// Largest offset of a process's clock from the history's, ms: NTP keeps
/// production machines well inside it.
pub const MAX_CLOCK_SKEW_MS: u64 = 3_000;

/// A process clock: the history's clock offset by a skew drawn from
/// `skews` (up to [`MAX_CLOCK_SKEW_MS`] either way), which in a third of
/// the processes steps backwards by up to 2 s once (never past the bound),
/// at a drawn instant (an NTP step), so that the process reads an earlier
/// time than it did.
pub fn skewed_clock(skews: &SimRng) -> (paygate_core::Clock, i64) {
    let offset = skews.between(0, 2 * MAX_CLOCK_SKEW_MS) as i64 - MAX_CLOCK_SKEW_MS as i64;
    let step = skews.chance(0.3).then(|| {
        let at = paygate_core::ambient::now_ms() + skews.between(0, 20_000) as i64;
        // Never below the bound: a step lands on a clock still within it.
        let back = (skews.between(100, 2_000) as i64).min(offset + MAX_CLOCK_SKEW_MS as i64);
        (at, back)
    });
    let clock = paygate_core::Clock::from_fn(move || {
        let now = paygate_core::ambient::now_ms();
        match step {
            Some((at, back)) if now >= at => now + offset - back,
            _ => now + offset,
        }
    });
    (clock, offset)
}

/// Until when a paused process stalls (`None`: it runs). Every call of
/// the process through its handles waits for it, so its tasks stop
/// between two awaits and carry on, with what they read before, once the
/// pause ends.
#[derive(Clone, Default)]
pub struct Pause(Arc<Mutex<Option<tokio::time::Instant>>>);

impl Pause {
    /// Stalls the process for `len` from now.
    pub fn start(&self, len: Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now() + len);
    }

    /// Waits while the process is paused.
    pub(crate) async fn wait(&self) {
        loop {
            let until = *self.0.lock().unwrap_or_else(|e| e.into_inner());
            match until {
                Some(u) if tokio::time::Instant::now() < u => tokio::time::sleep_until(u).await,
                _ => return,
            }
        }
    }
}

/// One process's view of the world; dead once [`Incarnation::kill`]ed.
pub struct Incarnation {
    dead: Arc<AtomicBool>,
    pause: Pause,
    /// The saga over this process's handles.
    pub saga: Arc<Saga>,
    /// This process's handle to the state store.
    pub store: Arc<dyn StateStore>,
}

impl Incarnation {
    /// A new process over `world`, with the sim's fast resilience policies;
    /// its changes are journaled as `actor`'s.
    pub fn start(world: &World, actor: Actor) -> Self {
        let long_stall = match actor {
            Actor::Gateway | Actor::Operator => world.gateway_stall_per_mille,
            Actor::Sweep { .. } | Actor::Reconcile | Actor::CardWebhook => {
                world.job_stall_per_mille
            }
        };
        let dead = Arc::new(AtomicBool::new(false));
        let pause = Pause::default();
        let clock = match &world.skews {
            Some(skews) => {
                let (clock, offset) = skewed_clock(skews);
                tracing::debug!(
                    ?actor,
                    skew_ms = offset,
                    "a process starts on a skewed clock"
                );
                clock
            }
            None => paygate_core::Clock::system(),
        };
        let store: Arc<dyn StateStore> = Arc::new(StoreHandle {
            handle: Handle {
                inner: world.store.clone(),
                dead: dead.clone(),
                pause: pause.clone(),
                rng: Some(world.rng.clone()),
                stall_per_mille: world.stall_per_mille,
                long_stall_per_mille: long_stall,
            },
            actor,
            changes: world.changes.clone(),
            cancel_claims: world.cancel_claims.clone(),
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
                    pause: pause.clone(),
                    rng: Some(world.rng.clone()),
                    stall_per_mille: world.stall_per_mille,
                    long_stall_per_mille: long_stall,
                }),
                Downstreams {
                    card: Arc::new(Handle {
                        inner: world.card.clone(),
                        dead: dead.clone(),
                        pause: pause.clone(),
                        rng: None,
                        stall_per_mille: 0,
                        long_stall_per_mille: 0,
                    }),
                    card_stack: Arc::new(Downstream::new("card_api", &card_policy)),
                    list_stack: Arc::new(Downstream::new("card_api_list", &card_policy)),
                    ledger: Arc::new(Handle {
                        inner: world.ledger.clone(),
                        dead: dead.clone(),
                        pause: pause.clone(),
                        rng: None,
                        stall_per_mille: 0,
                        long_stall_per_mille: 0,
                    }),
                    ledger_stack: Arc::new(Downstream::new(
                        "ledger_api",
                        &DownstreamPolicy::ledger_api(),
                    )),
                },
                Arc::new(Handle {
                    inner: world.alerts.clone(),
                    dead: dead.clone(),
                    pause: pause.clone(),
                    rng: None,
                    stall_per_mille: 0,
                    long_stall_per_mille: 0,
                }),
                SagaSettings {
                    // An operator's command runs in a process of its own,
                    // which sees no replica's live confirms: it judges
                    // "still in flight" by the production window, as the
                    // CLI does.
                    settle_on_access_after: match actor {
                        Actor::Operator => paygate_payments::in_flight_window(
                            DownstreamPolicy::card_api().deadline_ms,
                        ),
                        _ => world.settle_on_access_after,
                    },
                    ..SagaSettings::default()
                },
            )
            .with_clock(clock)
            .with_inventory(Arc::new(crate::inventory::InventoryHandle {
                inner: world.inventory.clone(),
                dead: dead.clone(),
                pause: pause.clone(),
                rng: world.rng.clone(),
                faults: world.inventory_faults.clone(),
                long_stall_per_mille: long_stall,
                card: world.card.clone(),
            })),
        );
        Self {
            dead,
            pause,
            saga,
            store,
        }
    }

    /// `kill -9`: from now on nothing this process left running can write,
    /// call or alert.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }

    /// Stalls every call of this process for `len` (see [`Pause`]).
    pub fn pause(&self, len: Duration) {
        self.pause.start(len);
    }
}

/// A process's handle to one part of the world.
struct Handle<T: ?Sized> {
    inner: Arc<T>,
    dead: Arc<AtomicBool>,
    pause: Pause,
    /// Each call waits 0-3 ms (simulated), as a round trip to a database
    /// does, so that other actors can act between two awaits.
    rng: Option<SimRng>,
    /// Of those, this many per mille stall 20-400 ms, widening every
    /// window between a read and the write it decides.
    stall_per_mille: u64,
    /// And this many per mille stall 1-6 s (a job process descheduled or
    /// cut from its database between two awaits, then carrying on).
    long_stall_per_mille: u64,
}

impl<T: ?Sized> Handle<T> {
    fn alive(&self) -> bool {
        !self.dead.load(Ordering::SeqCst)
    }

    /// Waits out a pause of the process, then says whether it still lives.
    async fn go(&self) -> bool {
        self.pause.wait().await;
        self.alive()
    }

    async fn round_trip(&self) -> bool {
        self.pause.wait().await;
        if let Some(rng) = &self.rng {
            let mut ms = rng.between(0, 3);
            // Drawn only when stalls are on, so histories without them
            // replay exactly as before stalls existed.
            if self.stall_per_mille > 0 && rng.between(0, 999) < self.stall_per_mille {
                ms += rng.between(20, 400);
            }
            if self.long_stall_per_mille > 0 && rng.between(0, 999) < self.long_stall_per_mille {
                ms += rng.between(1_000, 6_000);
            }
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        self.alive()
    }
}

/// A process's handle to the state store, journaling what it changes.
struct StoreHandle {
    handle: Handle<dyn SimStore>,
    actor: Actor,
    changes: Changes,
    cancel_claims: CancelClaims,
}

impl StoreHandle {
    /// Runs one write, journaling it when the store saw it change the
    /// record ([`SimStore::write`]), at `stamped_ms` when the write carries
    /// its own time (a new record is stamped when the saga builds it, a
    /// round trip before it lands), else at the instant the write was
    /// issued: that is when a store stamps `updated_at`, which is what a
    /// sweep's age check reads. (In memory no time passes during the write;
    /// on a real backend the call takes simulated time, and stamping its
    /// end made the age rule flag sweeps that decided correctly.)
    async fn journaled(
        &self,
        payment_id: &PaymentId,
        what: &'static str,
        stamped_ms: Option<i64>,
        write: Write<'_>,
    ) -> Result<Written, StoreError> {
        let event = match &write {
            Write::Transition(_, t) => t.event_type().map(|e| e.as_str()),
            _ => None,
        };
        if !self.handle.round_trip().await {
            return Err(gone());
        }
        let issued_ms = paygate_core::time::now_ms();
        let (result, changed) = self.handle.inner.write(write).await;
        if changed {
            self.changes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Change {
                    at_ms: stamped_ms.unwrap_or(issued_ms),
                    actor: self.actor,
                    payment_id: payment_id.to_string(),
                    what,
                    event,
                });
            // The process may be descheduled right after a commit: the
            // instant between a write and what the writer does next is
            // where a decision read earlier goes stale.
            if self.handle.long_stall_per_mille > 0 {
                if let Some(rng) = &self.handle.rng {
                    if rng.between(0, 999) < 10 * self.handle.long_stall_per_mille {
                        tokio::time::sleep(Duration::from_millis(rng.between(1_000, 6_000))).await;
                    }
                }
            }
        }
        result
    }
}

/// The flag a transition, move or copy answered.
fn applied(w: Result<Written, StoreError>) -> Result<bool, StoreError> {
    match w? {
        Written::Applied(b) => Ok(b),
        Written::Created(_) => Err(StoreError::Corrupt("a write answered a create".into())),
    }
}

fn gone() -> StoreError {
    StoreError::Unavailable("process died".to_owned())
}

/// Cancels pass through with the same round trip as every store call; a
/// claim made for a merchant's request is noted with the request's number
/// ([`World::cancel_claims`]), so the checker can hold the request's answer
/// to what became of the cancel it claimed.
#[async_trait]
impl paygate_state_store::CancelStore for StoreHandle {
    async fn claim_cancel(
        &self,
        draft: &paygate_state_store::CancelDraft,
    ) -> Result<paygate_state_store::CancelClaim, StoreError> {
        if !self.handle.round_trip().await {
            return Err(gone());
        }
        let claim = self.handle.inner.claim_cancel(draft).await;
        if let (Ok(paygate_state_store::CancelClaim::Claimed(c)), Ok(request)) =
            (&claim, crate::gateway::REQUEST.try_with(|r| *r))
        {
            self.cancel_claims
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(request, (c.payment_id.to_string(), c.n));
        }
        claim
    }
    async fn cancels_of(
        &self,
        id: &PaymentId,
    ) -> Result<Vec<paygate_state_store::CancelRecord>, StoreError> {
        if !self.handle.round_trip().await {
            return Err(gone());
        }
        self.handle.inner.cancels_of(id).await
    }
    async fn cancel_transition(
        &self,
        id: &PaymentId,
        n: i64,
        t: &paygate_state_store::CancelTransition,
    ) -> Result<bool, StoreError> {
        if !self.handle.round_trip().await {
            return Err(gone());
        }
        self.handle.inner.cancel_transition(id, n, t).await
    }
    fn scan_open_cancels(
        &self,
        batch_size: u32,
    ) -> futures_util::stream::BoxStream<'_, Result<paygate_state_store::CancelRecord, StoreError>>
    {
        if !self.handle.alive() {
            return Box::pin(futures_util::stream::once(async { Err(gone()) }));
        }
        self.handle.inner.scan_open_cancels(batch_size)
    }
}

#[async_trait]
impl StateStore for StoreHandle {
    async fn create(&self, r: &PaymentRecord) -> Result<CreateOutcome, StoreError> {
        match self
            .journaled(
                &r.payment_id,
                "create",
                Some(r.updated_at),
                Write::Create(r),
            )
            .await?
        {
            Written::Created(o) => Ok(o),
            Written::Applied(_) => Err(StoreError::Corrupt("a create answered a flag".into())),
        }
    }
    async fn get(&self, id: &PaymentId) -> Result<Option<(Partition, PaymentRecord)>, StoreError> {
        if !self.handle.round_trip().await {
            return Err(gone());
        }
        self.handle.inner.get(id).await
    }
    async fn get_by_order(
        &self,
        m: &MerchantId,
        o: &OrderId,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        if !self.handle.round_trip().await {
            return Err(gone());
        }
        self.handle.inner.get_by_order(m, o).await
    }
    async fn transition(&self, id: &PaymentId, t: &Transition) -> Result<bool, StoreError> {
        applied(
            self.journaled(id, "transition", None, Write::Transition(id, t))
                .await,
        )
    }
    async fn events_of(
        &self,
        id: &PaymentId,
    ) -> Result<Vec<paygate_state_store::Event>, StoreError> {
        if !self.handle.round_trip().await {
            return Err(gone());
        }
        self.handle.inner.events_of(id).await
    }
    async fn move_record(
        &self,
        id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        applied(
            self.journaled(id, "move", None, Write::Move(id, from, to))
                .await,
        )
    }
    async fn copy_to_partition(
        &self,
        id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        applied(
            self.journaled(id, "copy", None, Write::Copy(id, from, to))
                .await,
        )
    }
    fn scan(&self, p: Partition, batch: u32) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        if !self.handle.alive() {
            return Box::pin(futures_util::stream::once(async { Err(gone()) }));
        }
        self.handle.inner.scan(p, batch)
    }
    fn scan_stale(
        &self,
        before: i64,
        batch: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        if !self.handle.alive() {
            return Box::pin(futures_util::stream::once(async { Err(gone()) }));
        }
        self.handle.inner.scan_stale(before, batch)
    }
    async fn find_by_order_ids(
        &self,
        ids: &[String],
    ) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        if !self.handle.round_trip().await {
            return Err(gone());
        }
        self.handle.inner.find_by_order_ids(ids).await
    }
    fn scan_created(
        &self,
        p: Partition,
        from: i64,
        to: i64,
        batch: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        if !self.handle.alive() {
            return Box::pin(futures_util::stream::once(async { Err(gone()) }));
        }
        self.handle.inner.scan_created(p, from, to, batch)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        if !self.handle.alive() {
            return Err(gone());
        }
        self.handle.inner.ping().await
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
        if !self.go().await {
            return Err(dead_card());
        }
        let answer = self.inner.confirm(req, key).await;
        // An answer that arrives while the process is paused is read when
        // it resumes.
        self.pause.wait().await;
        answer
    }
    async fn payment_by_order_id(&self, o: &str) -> Result<Option<CardPayment>, CardApiError> {
        if !self.go().await {
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
        if !self.go().await {
            return Err(dead_card());
        }
        self.inner.cancel(pk, req, key).await
    }
    async fn transactions(&self, q: &TransactionsQuery) -> Result<Vec<Transaction>, CardApiError> {
        if !self.go().await {
            return Err(dead_card());
        }
        self.inner.transactions(q).await
    }
}

#[async_trait]
impl LedgerApi for Handle<SimLedger> {
    async fn record(&self, e: &LedgerEntry, key: &str) -> Result<LedgerOutcome, LedgerApiError> {
        if !self.go().await {
            return Err(LedgerApiError::Connection("process died".to_owned()));
        }
        self.inner.record(e, key).await
    }
    async fn get(&self, id: &str) -> Result<Option<LedgerEntry>, LedgerApiError> {
        if !self.go().await {
            return Err(LedgerApiError::Connection("process died".to_owned()));
        }
        self.inner.get(id).await
    }
    async fn reverse(
        &self,
        r: &LedgerReversal,
        key: &str,
    ) -> Result<LedgerOutcome, LedgerApiError> {
        if !self.go().await {
            return Err(LedgerApiError::Connection("process died".to_owned()));
        }
        self.inner.reverse(r, key).await
    }
}

#[async_trait]
impl Alerter for Handle<SimAlerts> {
    async fn raise(&self, alert: Alert) -> bool {
        self.go().await && self.inner.raise(alert).await
    }
}
