//! paygate-reconcile: reconciliation of paygate's records against the card
//! company's transaction list (DESIGN.md §10), run as `paygate reconcile`,
//! once or on a stable interval.
//!
//! A run over a window `[from, to)`:
//! 1. **Stale pending.** Records in `realtime_payments` that are not paid,
//!    `PENDING` or `UNKNOWN`, and older than `stale_after` (default 10 min)
//!    are read with a filtered scan ([`StateStore::scan_stale`]), looked up
//!    by orderId, `stale_concurrency` at a time, each in isolation, and
//!    filed by the batch's own [`paygate_payments::Settler`].
//! 2. **The list.** The window is cut into `slices` (whole seconds, as Toss
//!    dates transactions) fetched `slice_concurrency` at a time; each slice
//!    is paged in order with `startingAfter`, stopping at the first short
//!    page, up to eight pages ahead of the matching.
//! 3. **Match.** A slice's paid records (created from [`APPROVAL_LAG_MS`]
//!    before it to its end) are read once, while its first pages are
//!    fetched. An approval (`DONE`) with a paid record of the same
//!    paymentKey and amount there is *matched* without another read. Every
//!    other approval is read by orderId (chunks of at most `lookup_chunk`,
//!    joined with a hash map, O(n + m)) and then:
//!    - paid in paygate, same amount → *matched*;
//!    - not paid (`PENDING`/`UNKNOWN`, older than `min_age`) → *recover*:
//!      settled as the batch settles it (lookup, mark paid, ledger);
//!    - amounts differ → alert `amount_mismatch`, no action;
//!    - no paygate record at all → *orphan*: after a lookup shows it still
//!      approved, cancel it at the card company with the idempotency key
//!      `reconcile-cancel-<paymentKey>` and alert `orphan_canceled`;
//!    - recorded by paygate as declined, or under another paymentKey →
//!      alert `card_mismatch` (contradicting evidence is for a human).
//! 4. **Cancels.** The cancel transactions (`CANCELED`,
//!    `PARTIAL_CANCELED`) of an order paygate holds match its cancels one
//!    to one: the k-th distinct card cancel of an amount in the window
//!    needs k of paygate's cancels of that amount (done or in flight);
//!    otherwise alert `cancel_mismatch` (two refunds at the card company
//!    for one paygate cancel is a second refund, whatever the amounts). An approval later canceled stays an approval: its
//!    `DONE` transaction is matched as above, and a lookup that shows it
//!    `CANCELED`/`PARTIAL_CANCELED` is not "paid but not approved".
//! 5. **Paid but not approved.** Paid records of the slice's read,
//!    approved in the slice, whose order the slice's list did not show are
//!    read again and looked up (an approval just across a slice edge is
//!    found this way) and, if the card company has no approval, alerted as
//!    `paid_not_approved`.
//!
//! A paid record is read once per run on the path that matches: by the
//! slice its approval falls in, and again by each later slice that starts
//! less than [`APPROVAL_LAG_MS`] after its creation (with slices longer
//! than 15 minutes, only records created in the last 15 minutes before a
//! slice, by one more). Only approvals that do not match, and candidates
//! of step 5, are read again, fresh, before anything is done about them.
//! Memory is bounded by the slice (its paid records, a few hundred bytes
//! each, and at most ten pages: eight queued, one being queued, one being
//! matched)
//! times the slice concurrency, not by the window: choose `slices` so that
//! a slice holds at most a few hundred thousand payments.
//!
//! Every card call, pages included, goes through the saga's logged calls,
//! so it is in the SQL log (I3); an order with no paygate record is logged under `orphan_<orderId>`,
//! and the run's page requests under `reconcile_<ULID>`.
//! All card calls share the card API's resilience stack and rate limit.
//! A lease (`reconcile`) keeps two runs from overlapping across replicas.

pub mod check;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_util::{StreamExt, TryStreamExt};
use paygate_alert::AlertReason;
use paygate_batch::lease::Lease;
use paygate_card_api::{Transaction, TransactionsQuery};
use paygate_core::{CardStatus, Partition, PaymentId, PaymentRecord};
use paygate_payments::{Saga, Settlement, Settler};
use paygate_state_store::{SqlDatabase, StateStore, StoreError};
use serde::Serialize;

/// How long after its record's creation an approval may be dated: the
/// not-approved check of a slice reads records created up to this long
/// before the slice (the card deadline is 30 s by default; a lookup-settled
/// payment carries the card company's own `approvedAt`).
pub const APPROVAL_LAG_MS: i64 = 15 * 60_000;

/// How a run goes. Times are epoch ms; durations are wall clock.
#[derive(Clone, Debug)]
pub struct ReconcileOptions {
    /// Window start (inclusive), epoch ms. Floored to the second.
    pub from_ms: i64,
    /// Window end (exclusive), epoch ms. Rounded up to the second.
    pub to_ms: i64,
    /// Transactions per page (`limit`, 1-5000).
    pub page_size: u32,
    /// Slices the window is cut into (at most one per second of window).
    pub slices: u32,
    /// Slices fetched at once.
    pub slice_concurrency: usize,
    /// Most orderIds per store query.
    pub lookup_chunk: usize,
    /// Not-paid records older than this are settled by lookup.
    pub stale_after: Duration,
    /// Stale lookups (and not-approved checks) at once.
    pub stale_concurrency: usize,
    /// A not-paid record younger than this may still be in its saga: it is
    /// not recovered from the list (the next run or the stale pass will).
    pub min_age: Duration,
    /// Print the plan, change nothing, make no call but the list's pages.
    pub dry_run: bool,
    /// Lease time to live (renewed every third of it).
    pub lease_ttl: Duration,
    /// "ledger save failed" threshold of the shared batch save.
    pub ledger_alert_threshold: i64,
    /// When the stale pass looks an undecided payment up again after
    /// lookups that learned nothing (the batch's schedule); one not due is
    /// counted in [`Summary::deferred`] and left. An approval the list
    /// shows is recovered whatever the schedule.
    pub recheck: paygate_payments::RecheckSchedule,
}

impl ReconcileOptions {
    /// Defaults for the window `[from_ms, to_ms)`.
    pub fn window(from_ms: i64, to_ms: i64) -> Self {
        Self {
            from_ms,
            to_ms,
            page_size: 1_000,
            slices: 8,
            slice_concurrency: 4,
            lookup_chunk: 500,
            stale_after: Duration::from_secs(600),
            stale_concurrency: 10,
            min_age: Duration::from_secs(120),
            dry_run: false,
            lease_ttl: Duration::from_secs(60),
            ledger_alert_threshold: 5,
            recheck: paygate_payments::RecheckSchedule::EVERY_SWEEP,
        }
    }

    /// Checks the options; the message names the bad one.
    ///
    /// # Errors
    /// [`ReconcileError::Invalid`].
    pub fn validate(&self) -> Result<(), ReconcileError> {
        let bad = |m: &str| Err(ReconcileError::Invalid(m.to_owned()));
        if self.to_ms <= self.from_ms {
            return bad("--to must be after --from");
        }
        if self.page_size == 0 || self.page_size > 5_000 {
            return bad("page size must be 1 to 5000 (the card API's limit)");
        }
        if self.slices == 0 || self.slice_concurrency == 0 {
            return bad("slices and slice concurrency must be at least 1");
        }
        if self.lookup_chunk == 0 || self.stale_concurrency == 0 {
            return bad("lookup chunk and stale concurrency must be at least 1");
        }
        Ok(())
    }
}

/// What a run did. `--json` prints exactly these keys. In a dry run the
/// counts are what it would do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Transactions read from the card company's list.
    pub transactions: u64,
    /// Pages fetched.
    pub pages: u64,
    /// Approvals that match a paid paygate record.
    pub matched: u64,
    /// Approvals recovered: a not-paid record now paid (and saved if the
    /// ledger took it), from the list or the stale pass.
    pub recovered: u64,
    /// Orphan approvals canceled at the card company.
    pub cancelled: u64,
    /// New alerts raised (repeats of an open alert are not counted).
    pub alerts: u64,
    /// Records, orders or slices whose handling failed (logged; the next
    /// run tries again).
    pub failures: u64,
    /// Wall time, ms.
    pub duration_ms: u64,
    /// Slices whose pages could not all be fetched (or whose task was
    /// cancelled): the window was not fully reconciled (not in the JSON keys; the CLI exits 1).
    #[serde(skip)]
    pub incomplete_slices: u64,
    /// Stale payments not looked up this run: their next check is not due
    /// ([`ReconcileOptions::recheck`]).
    pub deferred: u64,
}

/// One planned or taken action, for the dry run's plan and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A not-paid record older than the stale threshold: look it up, settle it.
    SettleStale {
        /// The payment.
        payment_id: String,
        /// Its order.
        order_id: String,
    },
    /// Approved at the card company, not paid in paygate: settle (recover) it.
    Recover {
        /// The payment.
        payment_id: String,
        /// Its order.
        order_id: String,
    },
    /// Approved at the card company with no paygate record: cancel it.
    CancelOrphan {
        /// The order.
        order_id: String,
        /// The card company's payment key.
        payment_key: String,
        /// Amount, minor units.
        amount: i64,
    },
    /// An alert to raise.
    Alert {
        /// Why.
        reason: AlertReason,
        /// The payment (or `orphan_<orderId>`).
        payment_id: String,
        /// What was seen.
        detail: String,
    },
    /// Paid in paygate, not in the list: look it up; alert if not approved.
    CheckNotApproved {
        /// The payment.
        payment_id: String,
        /// Its order.
        order_id: String,
    },
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SettleStale {
                payment_id,
                order_id,
            } => write!(f, "settle stale {payment_id} (order {order_id}) by lookup"),
            Self::Recover {
                payment_id,
                order_id,
            } => write!(
                f,
                "recover {payment_id} (order {order_id}): approved at the card company, not paid here"
            ),
            Self::CancelOrphan {
                order_id,
                payment_key,
                amount,
            } => write!(
                f,
                "cancel orphan approval order {order_id} paymentKey {payment_key} amount {amount}"
            ),
            Self::Alert {
                reason,
                payment_id,
                detail,
            } => write!(f, "alert {} for {payment_id}: {detail}", reason.as_str()),
            Self::CheckNotApproved {
                payment_id,
                order_id,
            } => write!(
                f,
                "look up {payment_id} (order {order_id}): paid here, not in the card company's list"
            ),
        }
    }
}

/// Receives each action as it is planned (dry run) or taken.
pub type ActionSink = Arc<dyn Fn(&Action) + Send + Sync>;

/// Why a run could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The options are not usable.
    #[error("invalid options: {0}")]
    Invalid(String),
    /// Another run holds the lease.
    #[error("lease held by {owner} for {expires_in_ms} ms more")]
    LeaseHeld {
        /// The holder.
        owner: String,
        /// Until its expiry, ms.
        expires_in_ms: i64,
    },
    /// The lease was lost mid-run (another process took it over); the run
    /// stopped. The partial summary is attached.
    #[error("lease lost mid-run")]
    LeaseLost(Summary),
    /// The store could not be read.
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
}

#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    pages: AtomicU64,
    matched: AtomicU64,
    recovered: AtomicU64,
    cancelled: AtomicU64,
    alerts: AtomicU64,
    failures: AtomicU64,
    incomplete_slices: AtomicU64,
    deferred: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn summary(&self, started: Instant) -> Summary {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Summary {
            transactions: g(&self.transactions),
            pages: g(&self.pages),
            matched: g(&self.matched),
            recovered: g(&self.recovered),
            cancelled: g(&self.cancelled),
            alerts: g(&self.alerts),
            failures: g(&self.failures),
            duration_ms: started.elapsed().as_millis() as u64,
            incomplete_slices: g(&self.incomplete_slices),
            deferred: g(&self.deferred),
        }
    }
}

/// One slice of the window: `[start_ms, end_ms]`, whole seconds, inclusive
/// (the card API's `endDate` is inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    /// First second, epoch ms.
    pub start_ms: i64,
    /// Last second, epoch ms (inclusive).
    pub end_ms: i64,
}

/// Cuts `[from_ms, to_ms)` into at most `n` slices of whole seconds that
/// cover it without overlap.
pub fn slices(from_ms: i64, to_ms: i64, n: u32) -> Vec<Slice> {
    let first = from_ms.div_euclid(1000);
    let end = (to_ms + 999).div_euclid(1000); // exclusive, in seconds
    let secs = (end - first).max(0);
    let n = i64::from(n.max(1)).min(secs);
    (0..n)
        .map(|i| Slice {
            start_ms: (first + secs * i / n) * 1000,
            end_ms: (first + secs * (i + 1) / n - 1) * 1000,
        })
        .collect()
}

/// Pages of one slice fetched ahead of its matching (the matching waits for
/// the slice's index first; the fetching does not wait for it).
const PAGE_BUFFER: usize = 8;

/// A paid record of a slice's index: what matching an approval and the
/// not-approved check need of it.
struct PaidCopy {
    payment_id: PaymentId,
    payment_key: String,
    /// Minor units.
    amount: i64,
    /// The record's `approvedAt`, epoch ms (its creation when absent).
    approved_ms: i64,
}

/// The paid records of one orderId in a slice's index, and whether the
/// slice's list has shown the order approved.
#[derive(Default)]
struct IndexedOrder {
    seen: bool,
    paid: Vec<PaidCopy>,
}

/// A slice's paid records, read once per run ([`Reconciler::slice_index`]):
/// the join matches the slice's approvals against it, and what the list did
/// not show is the not-approved check's input. Only paid records are kept:
/// `is_paid` never turns back, so a match made on this read holds when the
/// page comes; anything else is read again by orderId before it is acted on.
/// Its size is the slice's paid records (a few hundred bytes each).
#[derive(Default)]
struct SliceIndex {
    by_order: HashMap<String, IndexedOrder>,
}

impl SliceIndex {
    /// Adds a record if it is paid (a copy of a payment already held, from
    /// a move interrupted between partitions, is not added twice).
    fn insert(&mut self, r: PaymentRecord) {
        if !r.is_paid {
            return;
        }
        let approved_ms = r
            .approved_at
            .as_deref()
            .and_then(paygate_core::time::ms_from_rfc3339_or_kst)
            .unwrap_or(r.created_at);
        let order = self.by_order.entry(r.order_id.to_string()).or_default();
        if order.paid.iter().all(|c| c.payment_id != r.payment_id) {
            order.paid.push(PaidCopy {
                payment_id: r.payment_id,
                payment_key: r.payment_key,
                amount: r.amount,
                approved_ms,
            });
        }
    }

    /// Marks the approval's order seen; `true` when a paid record of the
    /// same paymentKey and amount matches it.
    fn matches(&mut self, tx: &Transaction) -> bool {
        let Some(order) = self.by_order.get_mut(tx.order_id.as_str()) else {
            return false;
        };
        order.seen = true;
        order
            .paid
            .iter()
            .any(|c| c.payment_key == tx.payment_key && c.amount == tx.amount)
    }

    /// The paid records approved within `slice` whose order the slice's
    /// list did not show, as `(payment_id, order_id)`.
    fn unseen_approved_in(self, slice: Slice) -> impl Iterator<Item = (PaymentId, String)> {
        let (from, to) = (slice.start_ms, slice.end_ms + 1000);
        self.by_order
            .into_iter()
            .filter(|(_, o)| !o.seen)
            .flat_map(move |(order_id, o)| {
                o.paid
                    .into_iter()
                    .filter(move |c| c.approved_ms >= from && c.approved_ms < to)
                    .map(move |c| (c.payment_id, order_id.clone()))
            })
    }
}

/// The reconciliation over its dependencies (cheap to clone: it shares
/// them).
#[derive(Clone)]
pub struct Reconciler {
    store: Arc<dyn StateStore>,
    saga: Arc<Saga>,
    db: Option<SqlDatabase>,
    leases: Option<Arc<paygate_batch::lease::MemoryLeases>>,
    sink: Option<ActionSink>,
    progress: Option<Arc<paygate_batch::Progress>>,
}

/// What one run shares between its tasks.
struct Run {
    opts: ReconcileOptions,
    counters: Counters,
    settler: Settler,
    lost: Arc<AtomicBool>,
    now_ms: i64,
    /// The SQL log subject of this run's page requests: `reconcile_<ULID>`.
    log_subject: PaymentId,
    /// The distinct card cancel transactions seen so far, per payment and
    /// amount (minor units): matched one to one with paygate's cancels.
    card_cancels: std::sync::Mutex<HashMap<(String, i64), std::collections::HashSet<String>>>,
}

impl Run {
    /// Records last changed at or before this (epoch ms, this process's
    /// clock) are the stale pass's: `stale_after` widened by the skew
    /// margin, since other processes stamped them. (The list pass's
    /// `min_age` is not widened: it recovers only what the card company
    /// approved, and its writes are guarded on the version read.)
    fn stale_cutoff(&self) -> i64 {
        self.now_ms
            - (self.opts.stale_after + paygate_payments::CLOCK_SKEW_MARGIN).as_millis() as i64
    }
}

impl Reconciler {
    /// A reconciler over the store, the saga (its card stack, logged calls
    /// and alerter) and the SQL database (lease).
    pub fn new(store: Arc<dyn StateStore>, saga: Arc<Saga>, db: SqlDatabase) -> Self {
        Self {
            store,
            saga,
            db: Some(db),
            leases: None,
            sink: None,
            progress: None,
        }
    }

    /// A reconciler whose lease is kept in `leases` and which records no
    /// run summary (the deterministic simulation: no SQL at all).
    pub fn in_memory(
        store: Arc<dyn StateStore>,
        saga: Arc<Saga>,
        leases: Arc<paygate_batch::lease::MemoryLeases>,
    ) -> Self {
        Self {
            store,
            saga,
            db: None,
            leases: Some(leases),
            sink: None,
            progress: None,
        }
    }

    /// Counts the run's slices (done of all), pages and transactions in
    /// `progress` (the CLI shows it as a bar or log lines).
    pub fn with_progress(mut self, progress: Arc<paygate_batch::Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Sends every planned or taken action to `sink` (the CLI prints a dry
    /// run's plan this way).
    pub fn with_sink(mut self, sink: ActionSink) -> Self {
        self.sink = Some(sink);
        self
    }

    fn emit(&self, action: Action) {
        tracing::info!(action = %action, "reconcile");
        if let Some(sink) = &self.sink {
            sink(&action);
        }
    }

    /// Runs one reconciliation under the lease `reconcile`.
    ///
    /// # Errors
    /// [`ReconcileError::Invalid`] for bad options; [`ReconcileError::LeaseHeld`]
    /// when another run is going; [`ReconcileError::LeaseLost`] when the lease
    /// was taken mid-run; [`ReconcileError::Store`] when the store cannot be read.
    pub async fn run(&self, opts: &ReconcileOptions) -> Result<Summary, ReconcileError> {
        opts.validate()?;
        let owner = format!("{}-{}", std::process::id(), paygate_core::ambient::ulid());
        let lease = match (&self.db, &self.leases) {
            (_, Some(m)) => Lease::in_memory(m.clone(), "reconcile", &owner, opts.lease_ttl),
            (Some(db), None) => Lease::new(db.clone(), "reconcile", &owner, opts.lease_ttl),
            (None, None) => {
                return Err(ReconcileError::Invalid(
                    "a reconciler needs a lease store".to_owned(),
                ))
            }
        }
        .with_clock(self.saga.clock().clone());
        if let Err(held) = lease.acquire().await? {
            return Err(ReconcileError::LeaseHeld {
                owner: held.owner,
                expires_in_ms: held.expires_at - self.saga.clock().now_ms(),
            });
        }
        let renewal = lease.keep_alive(opts.lease_ttl);
        let run = Arc::new(Run {
            opts: opts.clone(),
            counters: Counters::default(),
            settler: Settler::new(
                self.store.clone(),
                self.saga.clone(),
                opts.ledger_alert_threshold,
            ),
            lost: renewal.lost_flag(),
            now_ms: self.saga.clock().now_ms(),
            log_subject: PaymentId::from_stored(format!(
                "reconcile_{}",
                paygate_core::ambient::ulid()
            )),
            card_cancels: Default::default(),
        });
        let started = Instant::now();
        let result = self.run_under_lease(&run).await;
        renewal.finish().await;
        let summary = run.counters.summary(started);
        if let (false, true, Some(db)) = (opts.dry_run, result.is_ok(), &self.db) {
            paygate_batch::record_run(db, "reconcile", &summary).await;
        }
        metrics::counter!("paygate_reconcile_runs_total").increment(1);
        for (name, v) in [
            ("paygate_reconcile_last_transactions", summary.transactions),
            ("paygate_reconcile_last_recovered", summary.recovered),
            ("paygate_reconcile_last_cancelled", summary.cancelled),
            ("paygate_reconcile_last_failures", summary.failures),
        ] {
            metrics::gauge!(name).set(v as f64);
        }
        match result {
            Ok(()) if run.lost.load(Ordering::SeqCst) => Err(ReconcileError::LeaseLost(summary)),
            Ok(()) => Ok(summary),
            Err(e) => Err(e),
        }
    }

    async fn run_under_lease(&self, run: &Arc<Run>) -> Result<(), ReconcileError> {
        // The stale pass owns not-paid records older than `stale_after`; the
        // list owns younger ones: they never act on the same record, so they
        // run side by side.
        let slices = slices(run.opts.from_ms, run.opts.to_ms, run.opts.slices);
        if let Some(p) = &self.progress {
            p.set_total(slices.len() as u64);
        }
        let list = async {
            // Each slice is a task of its own, so slices are read, parsed and
            // matched on every core (one task polls all it holds on one
            // thread). The set aborts them if this run is dropped; the
            // semaphore lets `slice_concurrency` of them run at once.
            let permits = Arc::new(tokio::sync::Semaphore::new(run.opts.slice_concurrency));
            let mut tasks = tokio::task::JoinSet::new();
            for slice in slices {
                let (me, run, permits) = (self.clone(), run.clone(), permits.clone());
                tasks.spawn(async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    if run.lost.load(Ordering::SeqCst) {
                        return;
                    }
                    me.slice(&run, slice).await;
                    if let Some(p) = &me.progress {
                        p.advance(1);
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                if let Err(e) = done {
                    if e.is_panic() {
                        // A bug: it fails the run loudly, as it did when the
                        // slices ran in this task (the set aborts the rest).
                        std::panic::resume_unwind(e.into_panic());
                    }
                    // Cancelled: only this run aborts its tasks, by dropping
                    // the set, so this is not reached; counted all the same.
                    add(&run.counters.failures, 1);
                    add(&run.counters.incomplete_slices, 1);
                }
            }
        };
        let (stale, ()) = tokio::join!(self.stale_pass(run), list);
        stale
    }

    /// Step 1: not-paid records past `stale_after`, settled as the batch does.
    async fn stale_pass(&self, run: &Run) -> Result<(), ReconcileError> {
        let cutoff = run.stale_cutoff();
        self.store
            .scan_stale(cutoff, 500)
            .map_err(ReconcileError::Store)
            .try_for_each_concurrent(run.opts.stale_concurrency, |r| async move {
                if run.lost.load(Ordering::SeqCst) {
                    return Ok(());
                }
                if !run.opts.recheck.due(&r, run.now_ms) {
                    add(&run.counters.deferred, 1);
                    return Ok(());
                }
                self.emit(Action::SettleStale {
                    payment_id: r.payment_id.to_string(),
                    order_id: r.order_id.to_string(),
                });
                self.settle(run, r).await;
                Ok(())
            })
            .await
    }

    /// Settles one record through the batch's code; each in isolation.
    async fn settle(&self, run: &Run, r: PaymentRecord) {
        let pid = r.payment_id.clone();
        match run.settler.settle(r, run.opts.dry_run).await {
            Ok((settlement, tally)) => {
                add(&run.counters.alerts, tally.alerts);
                if settlement == Some(Settlement::Paid) {
                    add(&run.counters.recovered, 1);
                }
            }
            Err(e) => {
                add(&run.counters.failures, 1);
                tracing::error!(payment_id = %pid, error = %e, "reconcile: settling failed; continuing");
            }
        }
    }

    /// Steps 2-5 for one slice. The slice's paid records are read once
    /// ([`SliceIndex`]) while its pages are fetched; each page is matched
    /// against them, and what the complete list did not show is checked.
    async fn slice(&self, run: &Run, slice: Slice) {
        let (pages, mut received) = tokio::sync::mpsc::channel::<Vec<Transaction>>(PAGE_BUFFER);
        let matching = async {
            let mut index = match self.slice_index(run, slice).await {
                Ok(index) => Some(index),
                Err(e) => {
                    // Every approval is then read by orderId, as it comes;
                    // only the not-approved check of this slice is lost.
                    tracing::error!(error = %e, "reconcile: could not read the paid records of a slice");
                    add(&run.counters.failures, 1);
                    None
                }
            };
            while let Some(txs) = received.recv().await {
                self.match_page(run, &txs, index.as_mut()).await;
            }
            index
        };
        let (complete, index) = tokio::join!(self.fetch_pages(run, slice, pages), matching);
        if !complete {
            add(&run.counters.failures, 1);
            add(&run.counters.incomplete_slices, 1);
            return;
        }
        if let (Some(index), false) = (index, run.lost.load(Ordering::SeqCst)) {
            self.check_not_approved(run, index.unseen_approved_in(slice))
                .await;
        }
    }

    /// Step 2: pages the slice in order into `pages` (at most
    /// [`PAGE_BUFFER`] ahead of the matching). `false` when a page could
    /// not be fetched.
    async fn fetch_pages(
        &self,
        run: &Run,
        slice: Slice,
        pages: tokio::sync::mpsc::Sender<Vec<Transaction>>,
    ) -> bool {
        let limit = run.opts.page_size;
        let mut after: Option<String> = None;
        loop {
            let query = TransactionsQuery {
                start_date: paygate_core::time::kst_local_from_ms(slice.start_ms),
                end_date: paygate_core::time::kst_local_from_ms(slice.end_ms),
                starting_after: after.take(),
                limit: Some(limit),
            };
            let txs = match self.saga.transactions_page(&run.log_subject, query).await {
                Ok(txs) => txs,
                Err(e) => {
                    tracing::error!(start = slice.start_ms, end = slice.end_ms, error = %e,
                        "reconcile: a page of the transaction list could not be fetched; slice left unreconciled");
                    return false;
                }
            };
            add(&run.counters.pages, 1);
            add(&run.counters.transactions, txs.len() as u64);
            if let Some(p) = &self.progress {
                p.page(txs.len() as u64);
            }
            // A short page is the last: no request for an empty page after it.
            let last = txs.len() < limit as usize || run.lost.load(Ordering::SeqCst);
            after = (!last)
                .then(|| txs.last().map(|t| t.transaction_key.clone()))
                .flatten();
            if pages.send(txs).await.is_err() {
                // The matching side has ended: nothing would read more pages.
                return false;
            }
            if after.is_none() {
                return true;
            }
        }
    }

    /// Step 3: one page's approvals against paygate's records. An approval
    /// with a paid record of the same paymentKey and amount in the slice's
    /// index is matched without a read; every other one (and every one when
    /// there is no index) is read by orderId and handled by `match_one`.
    async fn match_page(&self, run: &Run, txs: &[Transaction], mut index: Option<&mut SliceIndex>) {
        if run.lost.load(Ordering::SeqCst) {
            // Another run holds the lease now: it acts, this one does not.
            return;
        }
        let mut unmatched: Vec<&Transaction> = Vec::new();
        let mut matched = 0;
        for tx in txs.iter().filter(|t| t.status == "DONE") {
            if index.as_deref_mut().is_some_and(|i| i.matches(tx)) {
                matched += 1;
            } else {
                unmatched.push(tx);
            }
        }
        add(&run.counters.matched, matched);
        for chunk in unmatched.chunks(run.opts.lookup_chunk) {
            let ids: Vec<String> = chunk
                .iter()
                .map(|t| t.order_id.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let records = match self.store.find_by_order_ids(&ids).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, orders = ids.len(), "reconcile: could not read records; these orders are left for the next run");
                    add(&run.counters.failures, 1);
                    continue;
                }
            };
            let mut by_order: HashMap<&str, Vec<&(Partition, PaymentRecord)>> = HashMap::new();
            for rec in &records {
                by_order
                    .entry(rec.1.order_id.as_str())
                    .or_default()
                    .push(rec);
            }
            // Collected first: a lazy map here makes the future unprovably
            // `Send` (rust-lang/rust#102211), and slices run as tasks.
            let work: Vec<_> = chunk
                .iter()
                .map(|tx| {
                    let found = by_order
                        .get(tx.order_id.as_str())
                        .cloned()
                        .unwrap_or_default();
                    self.match_one(run, tx, found)
                })
                .collect();
            futures_util::stream::iter(work)
                .buffer_unordered(run.opts.stale_concurrency)
                .collect::<Vec<()>>()
                .await;
        }
        let cancels: Vec<_> = txs
            .iter()
            .filter(|t| matches!(t.status.as_str(), "CANCELED" | "PARTIAL_CANCELED"))
            .map(|tx| self.match_cancel(run, tx))
            .collect();
        futures_util::stream::iter(cancels)
            .buffer_unordered(run.opts.stale_concurrency)
            .collect::<Vec<()>>()
            .await;
    }

    /// A cancel transaction: paygate must hold one cancel of that amount
    /// (done, or in flight: the batch settles it) for each distinct card
    /// cancel of that amount (see the module doc). An order paygate has no
    /// record of is an orphan, canceled by this job itself: nothing to
    /// match.
    async fn match_cancel(&self, run: &Run, tx: &Transaction) {
        let found = match self
            .store
            .find_by_order_ids(std::slice::from_ref(&tx.order_id))
            .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, order_id = %tx.order_id, "reconcile: could not read a canceled order; next run");
                add(&run.counters.failures, 1);
                return;
            }
        };
        let Some((_, r)) = found.iter().find(|(_, r)| r.payment_key == tx.payment_key) else {
            return;
        };
        match self.store.cancels_of(&r.payment_id).await {
            Ok(cancels) => {
                let held = cancels
                    .iter()
                    .filter(|c| {
                        c.amount == tx.amount
                            && c.status != paygate_state_store::CancelStatus::Failed
                    })
                    .count();
                let seen = {
                    let mut seen = run.card_cancels.lock().unwrap_or_else(|e| e.into_inner());
                    let keys = seen
                        .entry((r.payment_id.to_string(), tx.amount))
                        .or_default();
                    keys.insert(tx.transaction_key.clone());
                    keys.len()
                };
                if seen <= held {
                    return;
                }
                let detail = format!(
                    "the card company shows {seen} cancels of {} for order {} (the latest: transaction {}) \
                     but paygate holds {held}",
                    tx.amount, tx.order_id, tx.transaction_key
                );
                self.alert(run, r, AlertReason::CancelMismatch, detail)
                    .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, payment_id = %r.payment_id, "reconcile: could not read cancels; next run");
                add(&run.counters.failures, 1);
            }
        }
    }

    async fn match_one(
        &self,
        run: &Run,
        tx: &Transaction,
        found: Vec<&(Partition, PaymentRecord)>,
    ) {
        if found.is_empty() {
            return self.orphan(run, tx).await;
        }
        let Some((partition, r)) = found.iter().find(|(_, r)| r.payment_key == tx.payment_key)
        else {
            let r = &found[0].1;
            let detail = format!(
                "order {} is approved at the card company under another paymentKey",
                tx.order_id
            );
            return self.alert(run, r, AlertReason::CardMismatch, detail).await;
        };
        if r.amount != tx.amount {
            let detail = format!(
                "card company approved amount={} for order {}; paygate has amount={}",
                tx.amount, tx.order_id, r.amount
            );
            return self
                .alert(run, r, AlertReason::AmountMismatch, detail)
                .await;
        }
        if r.is_paid {
            add(&run.counters.matched, 1);
            return;
        }
        let pending = matches!(r.card_status, CardStatus::Pending | CardStatus::Unknown);
        if *partition == Partition::Realtime && pending {
            if r.updated_at > run.now_ms - run.opts.min_age.as_millis() as i64 {
                // Its saga may be finishing right now; leave it to the saga.
                return;
            }
            if r.updated_at <= run.stale_cutoff() {
                // The stale pass of this run owns it.
                return;
            }
            self.emit(Action::Recover {
                payment_id: r.payment_id.to_string(),
                order_id: r.order_id.to_string(),
            });
            if run.opts.dry_run {
                // The card company's list proves the approval: a real run
                // settles it paid. A dry run counts what it would do.
                add(&run.counters.recovered, 1);
                return;
            }
            return self.settle(run, r.clone()).await;
        }
        let detail = format!(
            "card company approved order {} but paygate recorded it as {} ({})",
            tx.order_id,
            r.card_status.as_str(),
            r.failure_code.clone().unwrap_or_default()
        );
        self.alert(run, r, AlertReason::CardMismatch, detail).await;
    }

    async fn alert(&self, run: &Run, r: &PaymentRecord, reason: AlertReason, detail: String) {
        self.emit(Action::Alert {
            reason,
            payment_id: r.payment_id.to_string(),
            detail: detail.clone(),
        });
        // A dry run counts the alert it would raise (it cannot tell a repeat
        // of an open alert without raising it).
        if run.opts.dry_run || self.saga.alert(r, reason, detail).await {
            add(&run.counters.alerts, 1);
        }
    }

    /// An approval paygate has no record of: cancel it, then alert.
    async fn orphan(&self, run: &Run, tx: &Transaction) {
        self.emit(Action::CancelOrphan {
            order_id: tx.order_id.clone(),
            payment_key: tx.payment_key.clone(),
            amount: tx.amount,
        });
        if run.opts.dry_run {
            // A real run cancels it and raises an alert naming it.
            add(&run.counters.cancelled, 1);
            add(&run.counters.alerts, 1);
            return;
        }
        let subject = paygate_payments::orphan_subject(&tx.order_id);
        // The list is history; the lookup tells whether it is still charged
        // (a rerun finds it canceled and does nothing).
        match self.saga.lookup_order(&subject, &tx.order_id).await {
            Ok(Some(p))
                if p.payment_key == tx.payment_key
                    && (p.status == "DONE" || p.status == "PARTIAL_CANCELED") => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(order_id = %tx.order_id, error = %e, "reconcile: orphan lookup failed; next run");
                add(&run.counters.failures, 1);
                return;
            }
        }
        let (canceled, raised) = match self
            .saga
            .cancel_orphan(&subject, &tx.order_id, &tx.payment_key, tx.amount)
            .await
        {
            paygate_payments::OrphanCancel::Canceled { alerted } => (true, alerted),
            paygate_payments::OrphanCancel::Failed { alerted } => (false, alerted),
        };
        add(
            if canceled {
                &run.counters.cancelled
            } else {
                &run.counters.failures
            },
            1,
        );
        if raised {
            add(&run.counters.alerts, 1);
        }
    }

    /// Step 5, first half, and the join's one read: the paid records
    /// created from [`APPROVAL_LAG_MS`] before the slice to its end (an
    /// approval is dated after its record's creation, by at most that lag),
    /// in both partitions that hold paid records.
    async fn slice_index(&self, run: &Run, slice: Slice) -> Result<SliceIndex, StoreError> {
        let (from, to) = (slice.start_ms - APPROVAL_LAG_MS, slice.end_ms + 1000);
        let mut index = SliceIndex::default();
        for p in [Partition::Realtime, Partition::Completed] {
            let mut records = self.store.scan_created(p, from, to, 500);
            while let Some(r) = records.try_next().await? {
                if run.lost.load(Ordering::SeqCst) {
                    return Ok(SliceIndex::default());
                }
                index.insert(r);
            }
        }
        Ok(index)
    }

    /// Step 5, second half: each paid record the complete list did not show
    /// is looked up; no approval at the card company → alert.
    async fn check_not_approved(
        &self,
        run: &Run,
        unseen: impl Iterator<Item = (PaymentId, String)>,
    ) {
        futures_util::stream::iter(unseen)
            .for_each_concurrent(run.opts.stale_concurrency, |(pid, order_id)| async move {
                self.emit(Action::CheckNotApproved {
                    payment_id: pid.to_string(),
                    order_id: order_id.clone(),
                });
                if run.opts.dry_run {
                    return;
                }
                let r = match self.store.get(&pid).await {
                    Ok(Some((_, r))) => r,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(payment_id = %pid, error = %e, "reconcile: record unreadable; next run");
                        add(&run.counters.failures, 1);
                        return;
                    }
                };
                match self.saga.lookup_order(&pid, &order_id).await {
                    // Approved, then perhaps canceled in part or whole:
                    // still an approval (its cancels are matched apart).
                    Ok(Some(p))
                        if matches!(p.status.as_str(), "DONE" | "PARTIAL_CANCELED" | "CANCELED")
                            && p.payment_key == r.payment_key =>
                    {
                        // Approved, its transaction dated outside the slice
                        // (the slice that holds it counted it).
                    }
                    Ok(found) => {
                        let seen = found.map_or_else(
                            || "no payment".to_owned(),
                            |p| format!("status {}", p.status),
                        );
                        let detail = format!(
                            "paid in paygate, but the card company shows {seen} for order {order_id}"
                        );
                        self.alert(run, &r, AlertReason::PaidNotApproved, detail)
                            .await;
                    }
                    Err(e) => {
                        tracing::warn!(payment_id = %pid, error = %e, "reconcile: lookup failed; next run");
                        add(&run.counters.failures, 1);
                    }
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paygate_core::{MerchantId, OrderId};

    fn record(order: &str, key: &str, amount: i64, paid: bool, approved_ms: i64) -> PaymentRecord {
        let mut r = PaymentRecord::new_pending(
            MerchantId::generate(),
            OrderId::parse(order).unwrap(),
            key.to_owned(),
            amount,
            "KRW".into(),
            "fp".into(),
            None,
            approved_ms - 1_000,
        );
        r.is_paid = paid;
        r.card_status = if paid {
            CardStatus::Done
        } else {
            CardStatus::Pending
        };
        r.approved_at = paid.then(|| paygate_core::time::kst_rfc3339_from_ms(approved_ms));
        r
    }

    fn approval(order: &str, key: &str, amount: i64) -> Transaction {
        Transaction {
            transaction_key: format!("tx_{order}"),
            payment_key: key.to_owned(),
            order_id: order.to_owned(),
            method: None,
            status: "DONE".into(),
            transaction_at: "2026-11-23T12:00:00+09:00".into(),
            currency: Some("KRW".into()),
            amount,
        }
    }

    /// The slice's one read: only a paid record of the same paymentKey and
    /// amount matches; the rest go to a fresh read; what the list did not
    /// show, approved in the slice, is a candidate once per payment.
    #[test]
    fn a_slice_index_matches_only_paid_records_of_the_same_key_and_amount() {
        let slice = Slice {
            start_ms: 1_700_000_000_000,
            end_ms: 1_700_000_059_000,
        };
        let at = slice.start_ms + 10_000;
        let mut index = SliceIndex::default();
        index.insert(record("order-match", "pk_1", 5_000, true, at));
        index.insert(record("order-amount", "pk_2", 5_000, true, at));
        index.insert(record("order-key", "pk_3", 5_000, true, at));
        index.insert(record("order-unpaid", "pk_4", 5_000, false, at));
        let unseen = record("order-unseen", "pk_5", 5_000, true, at);
        index.insert(unseen.clone());
        index.insert(unseen.clone()); // a second copy of one payment
        index.insert(record(
            "order-before",
            "pk_6",
            5_000,
            true,
            slice.start_ms - 1,
        ));
        assert!(index.matches(&approval("order-match", "pk_1", 5_000)));
        assert!(!index.matches(&approval("order-amount", "pk_2", 7_000)));
        assert!(!index.matches(&approval("order-key", "pk_other", 5_000)));
        assert!(!index.matches(&approval("order-unpaid", "pk_4", 5_000)));
        assert!(!index.matches(&approval("order-absent", "pk_7", 5_000)));
        // Seen orders are not candidates, nor is an approval dated before
        // the slice; the unseen one is, once.
        let candidates: Vec<_> = index.unseen_approved_in(slice).collect();
        assert_eq!(
            candidates,
            vec![(unseen.payment_id.clone(), "order-unseen".to_owned())]
        );
    }

    #[test]
    fn slices_cover_the_window_in_whole_seconds_without_overlap() {
        let s = slices(10_500, 20_000, 3);
        // Seconds 10..=19 (20 is exclusive), cut in three.
        assert_eq!(
            s,
            vec![
                Slice {
                    start_ms: 10_000,
                    end_ms: 12_000
                },
                Slice {
                    start_ms: 13_000,
                    end_ms: 15_000
                },
                Slice {
                    start_ms: 16_000,
                    end_ms: 19_000
                },
            ]
        );
        // Never more slices than seconds.
        assert_eq!(slices(0, 2_000, 8).len(), 2);
        assert!(slices(5_000, 5_000, 4).is_empty());
    }
}
