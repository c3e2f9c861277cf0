//! The simulation's state store: [`SimStore`], a [`StateStore`] the sim can
//! also inspect (a snapshot of every record), fail on purpose (the fault
//! closures of [`crate::faults`]) and watch (whether one write changed its
//! record, for the checker's age rule).
//!
//! Three modes ([`StoreMode`]): `memory` (the default: [`MemoryStateStore`],
//! every history replays bit for bit), `sqlite` ([`SqlStateStore`] on a
//! fresh SQLite file per history, copied from one migrated template) and
//! `mongo` ([`MongoStateStore`] on a fresh database per history, dropped
//! after it). The request log, the alert outbox, the leases and the
//! inventory stay in memory in every mode: the mode is about the state
//! store.
//!
//! **Time on a real backend.** The sim runs on a current-thread tokio
//! runtime with paused time, which advances the clock to the next timer
//! whenever the runtime would wait, including while it waits for a socket
//! or for SQLite's worker thread. Left alone, every round trip would let
//! simulated time jump to the next timer: a driver's own timeout (sqlx's
//! pool acquire, the MongoDB driver's server selection) would fire after a
//! millisecond of real waiting, and every call would fail. So every call
//! into a real backend is [`Paced`]: while it waits, the clock moves at the
//! wall clock's rate (it is held still between ticks of [`TICK`] and then
//! moved by the wall time that passed), so a round trip takes as much
//! simulated time as real time, and a timeout fires after its real
//! duration. Between calls the clock still jumps from timer to timer. The
//! order in which concurrent round trips complete comes from the backend,
//! not from the seed: histories on a real backend are not bit-for-bit
//! deterministic (same workload, same faults, same checks). The MongoDB
//! driver's heartbeat is set to an hour of simulated time so that its
//! monitor does no I/O outside a paced call (a heartbeat in flight while
//! the clock jumps would time out and clear the pool).

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use futures_util::{stream::BoxStream, Stream, StreamExt};
use paygate_core::{MerchantId, OrderId, Partition, PaymentId, PaymentRecord};
use paygate_state_store::{
    CancelClaim, CancelDraft, CancelRecord, CancelStore, CancelTransition, CreateOutcome, Fault,
    FaultFn, MemoryStateStore, MongoOptions, MongoStateStore, SqlDatabase, SqlStateStore,
    StateStore, StoreError, Transition, WriteKind,
};

/// How often a paced call lets the clock catch up with the wall clock.
pub const TICK: Duration = Duration::from_millis(1);

/// Connections of the SQLite pool of one history (WAL: one writer at a
/// time, readers beside it; the busy timeout of [`SqlDatabase::connect`]
/// orders the writers).
const SQLITE_CONNECTIONS: u32 = 4;

/// The state store behind the simulation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreMode {
    /// [`MemoryStateStore`]: deterministic, the default.
    #[default]
    Memory,
    /// [`SqlStateStore`] on a fresh SQLite file per history.
    Sqlite,
    /// [`MongoStateStore`] on a fresh database per history at this URI.
    Mongo(String),
}

impl StoreMode {
    /// `memory`, `sqlite` or `mongo`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::Mongo(_) => "mongo",
        }
    }

    /// The mode named `name` (`memory`, `sqlite`, `mongo`); `mongo` takes
    /// its URI from `mongo_uri`, else `PAYGATE_SIM_MONGODB_URI`, else
    /// `PAYGATE_TEST_MONGODB_URI` (what `.ci/run` exports).
    ///
    /// # Errors
    /// A message when the name is unknown or `mongo` has no URI.
    pub fn parse(name: &str, mongo_uri: Option<&str>) -> Result<Self, String> {
        match name {
            "memory" => Ok(Self::Memory),
            "sqlite" => Ok(Self::Sqlite),
            "mongo" | "mongodb" => mongo_uri
                .map(str::to_owned)
                .or_else(|| std::env::var("PAYGATE_SIM_MONGODB_URI").ok())
                .or_else(|| std::env::var("PAYGATE_TEST_MONGODB_URI").ok())
                .filter(|u| !u.is_empty())
                .map(Self::Mongo)
                .ok_or_else(|| {
                    "--store mongo needs --mongo-uri or PAYGATE_TEST_MONGODB_URI".to_owned()
                }),
            other => Err(format!("unknown store {other:?} (memory, sqlite or mongo)")),
        }
    }

    /// The mode `PAYGATE_SIM_STORE` names (memory when unset).
    ///
    /// # Errors
    /// As [`StoreMode::parse`].
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("PAYGATE_SIM_STORE") {
            Ok(name) if !name.is_empty() => Self::parse(&name, None),
            _ => Ok(Self::Memory),
        }
    }
}

/// One write the sim journals.
#[derive(Clone, Copy, Debug)]
pub enum Write<'a> {
    /// [`StateStore::create`].
    Create(&'a PaymentRecord),
    /// [`StateStore::transition`].
    Transition(&'a PaymentId, &'a Transition),
    /// [`StateStore::move_record`].
    Move(&'a PaymentId, Partition, Partition),
    /// [`StateStore::copy_to_partition`].
    Copy(&'a PaymentId, Partition, Partition),
}

/// What a [`Write`] returned.
#[derive(Clone, Debug)]
pub enum Written {
    /// The outcome of a create.
    Created(CreateOutcome),
    /// Whether a transition, move or copy applied.
    Applied(bool),
}

/// A [`StateStore`] the simulation can inspect, fail and watch.
#[async_trait]
pub trait SimStore: StateStore {
    /// Runs one write; returns its result and whether it changed its
    /// record (whatever the call reported: a write whose acknowledgement
    /// was lost changed it).
    async fn write(&self, write: Write<'_>) -> (Result<Written, StoreError>, bool);

    /// Every record with its partition, sorted by `payment_id` then
    /// partition in [`Partition::ALL`] order (an interrupted move shows
    /// twice).
    ///
    /// # Errors
    /// [`StoreError`] when a real backend cannot be read.
    async fn snapshot(&self) -> Result<Vec<(Partition, PaymentRecord)>, StoreError>;

    /// Installs (`Some`) or removes (`None`) the fault closure asked once
    /// per write (see [`MemoryStateStore::set_fault`]).
    fn set_fault(&self, fault: Option<FaultFn>);

    /// Ends the history's store: drops its database or file (nothing for
    /// memory).
    async fn teardown(&self) {}
}

#[async_trait]
impl SimStore for MemoryStateStore {
    async fn write(&self, write: Write<'_>) -> (Result<Written, StoreError>, bool) {
        let id = match write {
            Write::Create(r) => &r.payment_id,
            Write::Transition(id, _) | Write::Move(id, _, _) | Write::Copy(id, _, _) => id,
        };
        // No await between the two looks and the write but the write's
        // own, which has none: what differs is this write's doing.
        let before = self.copies(id);
        let result = run(self, write).await;
        let changed = self.copies(id) != before;
        (result, changed)
    }

    async fn snapshot(&self) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        Ok(MemoryStateStore::snapshot(self))
    }

    fn set_fault(&self, fault: Option<FaultFn>) {
        MemoryStateStore::set_fault(self, fault);
    }
}

async fn run<S: StateStore + ?Sized>(store: &S, write: Write<'_>) -> Result<Written, StoreError> {
    Ok(match write {
        Write::Create(r) => Written::Created(store.create(r).await?),
        Write::Transition(id, t) => Written::Applied(store.transition(id, t).await?),
        Write::Move(id, from, to) => Written::Applied(store.move_record(id, from, to).await?),
        Write::Copy(id, from, to) => Written::Applied(store.copy_to_partition(id, from, to).await?),
    })
}

/// Polls a future or a stream of a real backend so that, while it waits,
/// simulated time moves at the wall clock's rate (see the module's doc).
pub struct Paced<T> {
    inner: T,
    /// When the current wait began, or the clock last caught up with it
    /// (`None`: not waiting).
    since: Option<std::time::Instant>,
    tick: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Paced<T> {
    /// Paces `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            since: None,
            tick: None,
        }
    }

    /// `inner` answered: the wait is over.
    fn done(&mut self) {
        self.since = None;
        self.tick = None;
    }

    /// `inner` is waiting: be polled again soon, with the clock held
    /// still, or moved by the wall time that passed once that reaches a
    /// [`TICK`].
    fn wait(&mut self, cx: &mut Context<'_>) {
        let now = std::time::Instant::now();
        if let Some(tick) = &mut self.tick {
            if tick.as_mut().poll(cx).is_pending() {
                return;
            }
            self.tick = None;
            self.since = Some(now);
        }
        let since = *self.since.get_or_insert(now);
        let wall = now.saturating_duration_since(since);
        if wall >= TICK {
            let mut tick = Box::pin(tokio::time::sleep(wall));
            if tick.as_mut().poll(cx).is_pending() {
                self.tick = Some(tick);
                return;
            }
            self.since = Some(now);
        }
        // Polled again at once: the runtime polls its I/O without waiting
        // and, woken, does not advance the clock.
        std::thread::yield_now();
        cx.waker().wake_by_ref();
    }
}

impl<F: Future + Unpin> Future for Paced<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll(cx) {
            Poll::Ready(v) => {
                this.done();
                Poll::Ready(v)
            }
            Poll::Pending => {
                this.wait(cx);
                Poll::Pending
            }
        }
    }
}

impl<S: Stream + Unpin> Stream for Paced<S> {
    type Item = S::Item;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(v) => {
                this.done();
                Poll::Ready(v)
            }
            Poll::Pending => {
                this.wait(cx);
                Poll::Pending
            }
        }
    }
}

/// Awaits `f` [`Paced`].
pub async fn paced<T>(f: impl Future<Output = T>) -> T {
    Paced::new(Box::pin(f)).await
}

/// What a real backend's store leaves behind.
enum Teardown {
    File(PathBuf, SqlDatabase),
    Mongo(MongoStateStore),
}

/// A real backend as a [`SimStore`]: every call [`Paced`], faults applied
/// around the call (a `FailAfter` runs the write and then reports it
/// failed), and a write's change read from the backend's own answer before
/// any injected failure (`Created`, or `true`). A backend error of its own
/// counts as no change: the real backends fail only when the sim breaks
/// them, which it does not (its faults are injected here).
pub struct RealStore {
    inner: Arc<dyn StateStore>,
    fault: Mutex<Option<FaultFn>>,
    teardown: Teardown,
}

impl RealStore {
    /// A fresh store of `mode` for one history (none for memory).
    ///
    /// # Errors
    /// [`StoreError`] when the backend cannot be set up.
    pub async fn open(mode: &StoreMode, seed: u64) -> Result<Option<Self>, StoreError> {
        match mode {
            StoreMode::Memory => Ok(None),
            StoreMode::Sqlite => {
                let template = paced(sqlite_template()).await?;
                let path = std::env::temp_dir()
                    .join(format!("paygate-sim-{}-{seed}.db", std::process::id()));
                let _ = std::fs::remove_file(&path);
                std::fs::copy(&template, &path).map_err(|e| {
                    StoreError::Unavailable(format!("copy of the SQLite template: {e}"))
                })?;
                let url = format!("sqlite://{}", path.display());
                let db = paced(SqlDatabase::connect(&url, SQLITE_CONNECTIONS)).await?;
                Ok(Some(Self {
                    inner: Arc::new(SqlStateStore::new(db.clone())),
                    fault: Mutex::new(None),
                    teardown: Teardown::File(path, db),
                }))
            }
            StoreMode::Mongo(uri) => {
                let options = MongoOptions {
                    database: format!("paygate_sim_{}_{seed}", std::process::id()),
                    ..MongoOptions::default()
                };
                let sep = if uri.contains('?') {
                    "&"
                } else if uri
                    .split_once("://")
                    .is_some_and(|(_, rest)| rest.contains('/'))
                {
                    "?"
                } else {
                    "/?"
                };
                let uri = format!("{uri}{sep}heartbeatFrequencyMS=3600000");
                let store = paced(MongoStateStore::connect(&uri, &options)).await?;
                Ok(Some(Self {
                    inner: Arc::new(store.clone()),
                    fault: Mutex::new(None),
                    teardown: Teardown::Mongo(store),
                }))
            }
        }
    }

    fn fault(&self, kind: WriteKind, id: &PaymentId) -> Fault {
        let f = self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone();
        f.map_or(Fault::None, |f| f(kind, id))
    }

    /// Runs `call` under the fault decided for it; whether it applied by
    /// `applied`.
    async fn faulty<T: Send>(
        &self,
        kind: WriteKind,
        id: &PaymentId,
        call: impl Future<Output = Result<T, StoreError>> + Send,
        applied: impl FnOnce(&T) -> bool,
    ) -> (Result<T, StoreError>, bool) {
        let fault = self.fault(kind, id);
        let injected = || StoreError::Unavailable(format!("injected fault: {kind:?} of {id}"));
        if fault == Fault::FailBefore {
            return (Err(injected()), false);
        }
        let result = paced(call).await;
        let changed = result.as_ref().is_ok_and(applied);
        if fault == Fault::FailAfter {
            return (Err(injected()), changed);
        }
        (result, changed)
    }
}

/// A migrated SQLite database, made once per process; each history starts
/// from a copy of it.
async fn sqlite_template() -> Result<PathBuf, StoreError> {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    if let Some(p) = TEMPLATE.get() {
        return Ok(p.clone());
    }
    let path = std::env::temp_dir().join(format!("paygate-sim-template-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let db = SqlDatabase::connect(&format!("sqlite://{}", path.display()), 1).await?;
    db.migrate().await?;
    db.close().await;
    Ok(TEMPLATE.get_or_init(|| path).clone())
}

#[async_trait]
impl SimStore for RealStore {
    async fn write(&self, write: Write<'_>) -> (Result<Written, StoreError>, bool) {
        let inner = &*self.inner;
        match write {
            Write::Create(r) => {
                let (res, changed) = self
                    .faulty(WriteKind::Create, &r.payment_id, inner.create(r), |o| {
                        *o == CreateOutcome::Created
                    })
                    .await;
                (res.map(Written::Created), changed)
            }
            Write::Transition(id, t) => {
                let (res, changed) = self
                    .faulty(WriteKind::Transition, id, inner.transition(id, t), |b| *b)
                    .await;
                (res.map(Written::Applied), changed)
            }
            Write::Move(id, from, to) => {
                let (res, changed) = self
                    .faulty(WriteKind::Move, id, inner.move_record(id, from, to), |b| *b)
                    .await;
                (res.map(Written::Applied), changed)
            }
            Write::Copy(id, from, to) => {
                let (res, changed) = self
                    .faulty(
                        WriteKind::Copy,
                        id,
                        inner.copy_to_partition(id, from, to),
                        |b| *b,
                    )
                    .await;
                (res.map(Written::Applied), changed)
            }
        }
    }

    async fn snapshot(&self) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        let mut all = Vec::new();
        for (slot, p) in Partition::ALL.iter().enumerate() {
            let mut rows = Paced::new(self.inner.scan(*p, 256));
            while let Some(r) = rows.next().await {
                all.push((slot, *p, r?));
            }
        }
        all.sort_by(|a, b| (&a.2.payment_id, a.0).cmp(&(&b.2.payment_id, b.0)));
        Ok(all.into_iter().map(|(_, p, r)| (p, r)).collect())
    }

    fn set_fault(&self, fault: Option<FaultFn>) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    async fn teardown(&self) {
        match &self.teardown {
            Teardown::File(path, db) => {
                paced(db.close()).await;
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
            }
            Teardown::Mongo(store) => {
                if let Err(e) = paced(async { store.database().drop().await }).await {
                    tracing::warn!(error = %e, "sim: could not drop the history's database");
                }
            }
        }
    }
}

#[async_trait]
impl CancelStore for RealStore {
    async fn claim_cancel(&self, draft: &CancelDraft) -> Result<CancelClaim, StoreError> {
        self.faulty(
            WriteKind::Cancel,
            &draft.payment_id,
            self.inner.claim_cancel(draft),
            |_| true,
        )
        .await
        .0
    }
    async fn cancels_of(&self, id: &PaymentId) -> Result<Vec<CancelRecord>, StoreError> {
        paced(self.inner.cancels_of(id)).await
    }
    async fn cancel_transition(
        &self,
        id: &PaymentId,
        n: i64,
        t: &CancelTransition,
    ) -> Result<bool, StoreError> {
        self.faulty(
            WriteKind::Cancel,
            id,
            self.inner.cancel_transition(id, n, t),
            |b| *b,
        )
        .await
        .0
    }
    fn scan_open_cancels(
        &self,
        batch_size: u32,
    ) -> BoxStream<'_, Result<CancelRecord, StoreError>> {
        Box::pin(Paced::new(self.inner.scan_open_cancels(batch_size)))
    }
}

#[async_trait]
impl StateStore for RealStore {
    async fn create(&self, r: &PaymentRecord) -> Result<CreateOutcome, StoreError> {
        match self.write(Write::Create(r)).await.0? {
            Written::Created(o) => Ok(o),
            Written::Applied(_) => Err(StoreError::Corrupt("create answered a flag".into())),
        }
    }
    async fn get(&self, id: &PaymentId) -> Result<Option<(Partition, PaymentRecord)>, StoreError> {
        paced(self.inner.get(id)).await
    }
    async fn get_by_order(
        &self,
        m: &MerchantId,
        o: &OrderId,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        paced(self.inner.get_by_order(m, o)).await
    }
    async fn transition(&self, id: &PaymentId, t: &Transition) -> Result<bool, StoreError> {
        applied(self.write(Write::Transition(id, t)).await.0)
    }
    async fn events_of(
        &self,
        id: &PaymentId,
    ) -> Result<Vec<paygate_state_store::Event>, StoreError> {
        paced(self.inner.events_of(id)).await
    }
    async fn pending_events(
        &self,
        limit: u32,
    ) -> Result<Vec<paygate_state_store::Event>, StoreError> {
        paced(self.inner.pending_events(limit)).await
    }
    async fn forget_events(&self, events: &[paygate_state_store::Event]) -> Result<(), StoreError> {
        paced(self.inner.forget_events(events)).await
    }
    async fn move_record(
        &self,
        id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        applied(self.write(Write::Move(id, from, to)).await.0)
    }
    async fn copy_to_partition(
        &self,
        id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        applied(self.write(Write::Copy(id, from, to)).await.0)
    }
    fn scan(&self, p: Partition, batch: u32) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        Box::pin(Paced::new(self.inner.scan(p, batch)))
    }
    fn scan_stale(
        &self,
        before: i64,
        batch: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        Box::pin(Paced::new(self.inner.scan_stale(before, batch)))
    }
    async fn find_by_order_ids(
        &self,
        ids: &[String],
    ) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        paced(self.inner.find_by_order_ids(ids)).await
    }
    fn scan_created(
        &self,
        p: Partition,
        from: i64,
        to: i64,
        batch: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        Box::pin(Paced::new(self.inner.scan_created(p, from, to, batch)))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        paced(self.inner.ping()).await
    }
}

fn applied(w: Result<Written, StoreError>) -> Result<bool, StoreError> {
    match w? {
        Written::Applied(b) => Ok(b),
        Written::Created(_) => Err(StoreError::Corrupt("a flag answered a create".into())),
    }
}
