//! paygate-batch: the batch sweep of DESIGN.md §9, run as a sidecar job
//! (`paygate batch`), daily in production and by hand or at short intervals
//! in staging.
//!
//! For each record in `realtime_payments` whose last transition is older
//! than the grace period (ages count from `updated_at`, not from creation: a
//! record reopened by a merchant retry is young again):
//! - paid and saved: move to `completed_payments`;
//! - paid, not saved: try the ledger again (`batch_attempts += 1` on
//!   failure); at the threshold (default 5) alert "ledger save failed" once;
//!   once saved, move to `completed_payments`;
//! - not paid, and the SQL log shows a decline answer or no card call at
//!   all: move to `unpaid_payments`;
//! - not paid, outcome unknown: look it up at the card company by orderId
//!   and settle it (paid: then save and complete; declined: unpaid); still
//!   unknown: alert "payment needs checking".
//!
//! Then the cancels (refunds) that need work, past the same grace:
//! - in flight (`PENDING`: a crash between the claim and the card call, or
//!   `UNKNOWN`: a lost answer): looked up at the card company by orderId
//!   and settled from its `cancels[]`, else sent again with the same
//!   `Idempotency-Key`; still unknown: `batch_attempts += 1` and, at the
//!   threshold, an alert "cancel needs checking";
//! - done, reversal not in the ledger: the reversal is tried again (after
//!   the approval's entry); at the threshold an alert "reversal failed".
//!
//! Their counts join the records' (`settled`, `retried`, `saved`, `alerts`).
//!
//! Then the stock holds left `during` past the same grace (a confirm died
//! between its payment's last transition and the hold's sale or release):
//! sold when the payment is paid, released when it ended unpaid (guarded:
//! a retry that began on the hold since keeps it), else left to the
//! payment's own settlement (`holds_sold`, `holds_released`).
//!
//! Records are streamed (bounded memory), handled with bounded concurrency,
//! and one record's failure is counted and logged without stopping the
//! others. A [`lease::Lease`] keeps sweeps from overlapping across replicas.

pub mod lease;
pub mod progress;
pub mod schedule;

pub use progress::{Progress, Snapshot};

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_util::{StreamExt, TryStreamExt};
use paygate_api_log::{ApiLog, SqlApiLog};
use paygate_core::{CardStatus, Partition, PaymentRecord};
use paygate_payments::{RecheckSchedule, Saga, Settler, Tally};
use paygate_state_store::{SqlDatabase, StateStore, StoreError, Transition};
use serde::Serialize;

/// How long released and expired holds are kept before the sweep deletes
/// them: 7 days, long past any approval the batch or the reconciliation
/// could still recover for them (a recovered approval of a deleted hold
/// sells nothing, so keep this above the reconciliation window).
pub const HOLD_RETENTION: Duration = Duration::from_secs(7 * 24 * 3_600);
/// SKU documents [`paygate_state_store::InventoryStore::repair_lines`]
/// looks at per sweep (orphaned lines are rare: a writer died mid-change).
pub const REPAIR_SKUS: u32 = 1_000;

/// How a sweep runs.
#[derive(Clone, Debug)]
pub struct SweepOptions {
    /// Records whose last transition is younger than this are left alone
    /// (their saga may be running). Judged by this process's clock against
    /// `updated_at` stamps other processes wrote, so it must exceed a
    /// confirm's in-flight window plus the clocks' disagreement
    /// ([`paygate_payments::in_flight_window`], 36 s with the defaults);
    /// the default, 120 s, does by far.
    pub grace: Duration,
    /// Classify and count, change nothing, call nothing.
    pub dry_run: bool,
    /// Records handled at once.
    pub concurrency: usize,
    /// `batch_attempts` at which "ledger save failed" is raised.
    pub ledger_alert_threshold: i64,
    /// Lease time to live (renewed every third of it).
    pub lease_ttl: Duration,
    /// Records per scan round trip.
    pub scan_batch: u32,
    /// Paid and saved records moved to `completed_payments` per set-based
    /// move ([`StateStore::move_settled`]: one transaction per chunk on
    /// SQL, bulk writes on MongoDB) before the per-record pass; 0 turns
    /// the set-based pass off (every record then moves on its own).
    pub move_chunk: u32,
    /// When an undecided payment (`PENDING`, `UNKNOWN`) is looked up
    /// again after lookups that learned nothing; one not due yet is
    /// counted in [`Summary::deferred`] and left. The default,
    /// [`RecheckSchedule::EVERY_SWEEP`], looks every one up; `paygate
    /// batch` and `serve`'s janitor pass the configured schedule.
    pub recheck: RecheckSchedule,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(120),
            dry_run: false,
            concurrency: 8,
            ledger_alert_threshold: 5,
            lease_ttl: Duration::from_secs(60),
            scan_batch: 500,
            move_chunk: 1_000,
            recheck: RecheckSchedule::EVERY_SWEEP,
        }
    }
}

/// What a sweep did. `--json` prints exactly these keys. In a dry run the
/// counts are what it would do (`settled` = records it would look up).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Records read from `realtime_payments`.
    pub scanned: u64,
    /// Moved to `completed_payments`.
    pub completed: u64,
    /// Moved to `unpaid_payments`.
    pub unpaid: u64,
    /// Unknown outcomes settled by a lookup.
    pub settled: u64,
    /// Ledger tries made.
    pub retried: u64,
    /// Ledger tries that saved the payment.
    pub saved: u64,
    /// New alerts raised.
    pub alerts: u64,
    /// Records whose handling failed (counted, logged, skipped).
    pub failures: u64,
    /// Holds left `during` by a confirm that died, sold now (their
    /// payment is paid).
    pub holds_sold: u64,
    /// Holds left `during` by a confirm that died, released now (their
    /// payment ended unpaid).
    pub holds_released: u64,
    /// Undecided payments not looked up this time: their next check is not
    /// due ([`SweepOptions::recheck`]).
    pub deferred: u64,
    /// Wall time, ms.
    pub duration_ms: u64,
}

/// What [`Sweeper::recheck`] did to one record.
#[derive(Clone, Debug)]
pub struct Recheck {
    /// The record before, and its partition.
    pub before: (Partition, PaymentRecord),
    /// The record after (`None` if it vanished), and its partition.
    pub after: Option<(Partition, PaymentRecord)>,
    /// What was done, in the sweep's units.
    pub summary: Summary,
}

/// Why a sweep could not run.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Another sweep holds the lease.
    #[error("lease held by {owner} for {expires_in_ms} ms more")]
    LeaseHeld {
        /// The holder.
        owner: String,
        /// Until its expiry, ms.
        expires_in_ms: i64,
    },
    /// The lease was lost mid-sweep (another process took it over); the
    /// sweep stopped cleanly. The partial summary is attached.
    #[error("lease lost mid-sweep; stopped after {} records", .0.scanned)]
    LeaseLost(Summary),
    /// The store could not be read.
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
}

#[derive(Default)]
struct Counters {
    scanned: AtomicU64,
    completed: AtomicU64,
    unpaid: AtomicU64,
    settled: AtomicU64,
    retried: AtomicU64,
    saved: AtomicU64,
    alerts: AtomicU64,
    failures: AtomicU64,
    holds_sold: AtomicU64,
    holds_released: AtomicU64,
    deferred: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn add(&self, t: Tally) {
        let add = |c: &AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
        add(&self.completed, t.completed);
        add(&self.unpaid, t.unpaid);
        add(&self.settled, t.settled);
        add(&self.retried, t.retried);
        add(&self.saved, t.saved);
        add(&self.alerts, t.alerts);
    }

    fn summary(&self, started: Instant) -> Summary {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Summary {
            scanned: g(&self.scanned),
            completed: g(&self.completed),
            unpaid: g(&self.unpaid),
            settled: g(&self.settled),
            retried: g(&self.retried),
            saved: g(&self.saved),
            alerts: g(&self.alerts),
            failures: g(&self.failures),
            holds_sold: g(&self.holds_sold),
            holds_released: g(&self.holds_released),
            deferred: g(&self.deferred),
            duration_ms: started.elapsed().as_millis() as u64,
        }
    }
}

/// Writes a job's summary to `job_runs` (for `/metrics` of `serve`); a
/// failure is logged, never fatal to the job.
pub async fn record_run(db: &SqlDatabase, job: &str, summary: &impl Serialize) {
    let Ok(value) = serde_json::to_value(summary) else {
        return;
    };
    if let Err(e) = paygate_api_log::JobRuns::new(db.clone())
        .record(job, &value)
        .await
    {
        tracing::warn!(job, error = %e, "could not record the run summary");
    }
}

/// The sweep over its dependencies.
pub struct Sweeper {
    store: Arc<dyn StateStore>,
    saga: Arc<Saga>,
    log: Arc<dyn ApiLog>,
    leases: Leases,
    progress: Option<Arc<Progress>>,
}

/// Where the sweep keeps its lease and its run summaries.
enum Leases {
    /// The SQL database (`batch_leases`, `job_runs`).
    Sql(SqlDatabase),
    /// In memory (the simulation); no run summaries.
    Memory(Arc<lease::MemoryLeases>),
}

impl Sweeper {
    /// A sweeper over the store, the saga (card lookups and ledger saves go
    /// through its resilience stacks and SQL log) and the SQL database (lease).
    pub fn new(store: Arc<dyn StateStore>, saga: Arc<Saga>, db: SqlDatabase) -> Self {
        Self {
            store,
            saga,
            log: Arc::new(SqlApiLog::new(db.clone())),
            leases: Leases::Sql(db),
            progress: None,
        }
    }

    /// A sweeper whose lease is kept in `leases` and which reads the saga's
    /// own log (the deterministic simulation: no SQL at all).
    pub fn in_memory(
        store: Arc<dyn StateStore>,
        saga: Arc<Saga>,
        leases: Arc<lease::MemoryLeases>,
    ) -> Self {
        Self {
            store,
            log: saga.log().clone(),
            saga,
            leases: Leases::Memory(leases),
            progress: None,
        }
    }

    /// Counts every record a sweep has handled in `progress` (the CLI shows
    /// it as a bar or log lines).
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = Some(progress);
        self
    }
    /// Takes the lease `name` for this process (renewed every third of
    /// `ttl` until the returned renewal is finished).
    ///
    /// # Errors
    /// [`BatchError::LeaseHeld`] when another process holds it;
    /// [`BatchError::Store`] when the lease cannot be read or written.
    async fn take_lease(&self, name: &str, ttl: Duration) -> Result<lease::Renewal, BatchError> {
        let owner = format!("{}-{}", std::process::id(), paygate_core::ambient::ulid());
        let lease = match &self.leases {
            Leases::Sql(db) => lease::Lease::new(db.clone(), name, &owner, ttl),
            Leases::Memory(m) => lease::Lease::in_memory(m.clone(), name, &owner, ttl),
        }
        .with_clock(self.saga.clock().clone());
        if let Err(held) = lease.acquire().await? {
            return Err(BatchError::LeaseHeld {
                owner: held.owner,
                expires_in_ms: held.expires_at - self.saga.clock().now_ms(),
            });
        }
        Ok(lease.keep_alive(ttl))
    }

    /// Runs one sweep under the lease `batch-sweep`.
    ///
    /// # Errors
    /// [`BatchError::LeaseHeld`] when another sweep runs;
    /// [`BatchError::LeaseLost`] when the lease was taken mid-sweep;
    /// [`BatchError::Store`] when the store cannot be read.
    pub async fn sweep(&self, opts: &SweepOptions) -> Result<Summary, BatchError> {
        let renewal = self.take_lease("batch-sweep", opts.lease_ttl).await?;
        let result = self.sweep_records(opts, &renewal.lost_flag()).await;
        if !opts.dry_run {
            self.purge_holds().await;
        }
        renewal.finish().await;
        if let (Ok(summary), false, Leases::Sql(db)) = (&result, opts.dry_run, &self.leases) {
            record_run(db, "batch", summary).await;
        }
        result
    }

    /// The janitor's pass, which `serve` runs every few seconds under the
    /// lease `janitor` (one replica at a time; a pass that finds the lease
    /// held does nothing): every undecided payment (not paid, `PENDING` or
    /// `UNKNOWN`) unchanged for `opts.grace` whose next check is due by
    /// `opts.recheck` is handled exactly as the sweep handles it (filed
    /// unpaid when no card call was logged for it, else looked up and
    /// settled: paid, then saved in the ledger; declined; still unknown,
    /// counted, and an operator alerted). So a payment answered 202 settles
    /// within minutes of the card company knowing its outcome, not at the
    /// next daily sweep. Nothing else of the sweep runs here (moves,
    /// cancels, holds).
    ///
    /// # Errors
    /// [`BatchError::LeaseHeld`], [`BatchError::LeaseLost`],
    /// [`BatchError::Store`] as [`Sweeper::sweep`].
    pub async fn janitor(&self, opts: &SweepOptions) -> Result<Summary, BatchError> {
        let renewal = self.take_lease("janitor", opts.lease_ttl).await?;
        let lost = renewal.lost_flag();
        let started = Instant::now();
        let counters = Counters::default();
        let cutoff = self.saga.clock().now_ms() - opts.grace.as_millis() as i64;
        let outcome = self
            .store
            .scan_stale(cutoff, opts.scan_batch)
            .map_err(BatchError::Store)
            .try_for_each_concurrent(opts.concurrency.max(1), |record| {
                let counters = &counters;
                let lost = &lost;
                async move {
                    if lost.load(Ordering::SeqCst) {
                        return Err(BatchError::LeaseLost(Summary::default()));
                    }
                    bump(&counters.scanned);
                    let pid = record.payment_id.clone();
                    if let Err(e) = self.handle(record, opts, counters).await {
                        bump(&counters.failures);
                        tracing::error!(payment_id = %pid, error = %e, "janitor: payment failed; continuing");
                    }
                    Ok(())
                }
            })
            .await;
        renewal.finish().await;
        let summary = counters.summary(started);
        metrics::counter!("paygate_janitor_runs_total").increment(1);
        match outcome {
            Ok(()) => Ok(summary),
            Err(BatchError::LeaseLost(_)) => Err(BatchError::LeaseLost(summary)),
            Err(e) => Err(e),
        }
    }

    /// The pass over holds left `during` (issue 17,
    /// [`Saga::settle_stuck_holds`]): those unchanged since the sweep's
    /// cutoff are sold or released from their payment's stored state. A
    /// failure is logged and counted; the next sweep goes on from scratch.
    async fn settle_stuck_holds(&self, opts: &SweepOptions, cutoff: i64, c: &Counters) {
        match self.saga.settle_stuck_holds(cutoff, opts.dry_run).await {
            Ok(t) => {
                c.holds_sold.fetch_add(t.sold, Ordering::Relaxed);
                c.holds_released.fetch_add(t.released, Ordering::Relaxed);
            }
            Err(e) => {
                bump(&c.failures);
                tracing::error!(error = %e, "batch: the pass over holds left `during` failed; the next sweep retries");
            }
        }
    }

    /// Housekeeping (issue 17): deletes holds released, or expired, more
    /// than [`HOLD_RETENTION`] ago. Availability never waits for it (the
    /// timestamp rule already ignores them); a failure is logged and left
    /// for the next sweep.
    async fn purge_holds(&self) {
        let Some(inventory) = self.saga.inventory() else {
            return;
        };
        // Units held by lines of a hold that is not `during` (a writer died
        // between its steps on a store without cross-document transactions)
        // are freed first; the SQL and memory stores have none.
        match inventory
            .repair_lines(self.saga.clock().now_ms(), REPAIR_SKUS)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                lines_freed = n,
                "freed units held for holds that are not during"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not repair hold lines; the next sweep retries")
            }
        }
        let retention = i64::try_from(HOLD_RETENTION.as_millis()).unwrap_or(i64::MAX);
        let before = self.saga.clock().now_ms().saturating_sub(retention);
        match inventory.purge(before).await {
            Ok(n) => tracing::info!(holds_purged = n, "old released and expired holds deleted"),
            Err(e) => {
                tracing::warn!(error = %e, "could not delete old holds; the next sweep retries")
            }
        }
    }

    /// Handles one record now, exactly as a sweep would (the same
    /// classification and the same [`Settler`]), whatever its age: for an
    /// operator who does not want to wait for the next sweep (`paygate
    /// payments recheck`). No lease is taken: every change is a guarded
    /// transition or move, safe beside a running sweep. Returns the record
    /// before and after (`None` when there is no record), and what was done.
    /// A record outside `realtime_payments` is settled already: nothing is
    /// done to it.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn recheck(
        &self,
        payment_id: &paygate_core::PaymentId,
        opts: &SweepOptions,
    ) -> Result<Option<Recheck>, StoreError> {
        let Some(before) = self.store.get(payment_id).await? else {
            return Ok(None);
        };
        let counters = Counters::default();
        if before.0 == Partition::Realtime {
            bump(&counters.scanned);
            self.handle(before.1.clone(), opts, &counters).await?;
        }
        let after = self.store.get(payment_id).await?;
        Ok(Some(Recheck {
            before,
            after,
            summary: counters.summary(Instant::now()),
        }))
    }

    async fn sweep_records(
        &self,
        opts: &SweepOptions,
        lost: &AtomicBool,
    ) -> Result<Summary, BatchError> {
        let started = Instant::now();
        let counters = Counters::default();
        // This process's clock against stamps other processes wrote: the
        // grace is only as exact as the clocks (see `SweepOptions::grace`).
        let cutoff = self.saga.clock().now_ms() - opts.grace.as_millis() as i64;
        let moved = self.move_settled(opts, lost, cutoff, &counters).await;
        let records = match moved {
            // The lease was lost in the set-based pass: read nothing more.
            Err(_) => futures_util::stream::empty().boxed(),
            Ok(()) => self.store.scan(Partition::Realtime, opts.scan_batch),
        };
        let scanned = records
            .map_err(BatchError::Store)
            .try_for_each_concurrent(opts.concurrency.max(1), |record| {
                let counters = &counters;
                async move {
                    if lost.load(Ordering::SeqCst) {
                        return Err(BatchError::LeaseLost(Summary::default()));
                    }
                    bump(&counters.scanned);
                    if record.updated_at <= cutoff {
                        let pid = record.payment_id.clone();
                        if let Err(e) = self.handle(record, opts, counters).await {
                            bump(&counters.failures);
                            tracing::error!(payment_id = %pid, error = %e, "batch: record failed; continuing");
                        }
                    }
                    if let Some(p) = &self.progress {
                        p.advance(1);
                    }
                    Ok(())
                }
            })
            .await;
        let outcome = match moved.and(scanned) {
            Ok(()) => self.sweep_cancels(opts, lost, cutoff, &counters).await,
            Err(e) => Err(e),
        };
        if outcome.is_ok() {
            self.settle_stuck_holds(opts, cutoff, &counters).await;
        }
        let summary = counters.summary(started);
        metrics::counter!("paygate_batch_runs_total").increment(1);
        metrics::gauge!("paygate_batch_last_scanned").set(summary.scanned as f64);
        metrics::gauge!("paygate_batch_last_failures").set(summary.failures as f64);
        match outcome {
            Ok(()) => Ok(summary),
            Err(BatchError::LeaseLost(_)) => Err(BatchError::LeaseLost(summary)),
            Err(e) => Err(e),
        }
    }

    /// The set-based pass (issue 18): paid and saved records past the
    /// cutoff, the bulk of any sweep, move to `completed_payments` a chunk
    /// at a time, each counted as scanned and completed. A failed chunk is
    /// logged and counted, and the per-record pass that follows moves what
    /// is left, one record at a time. A dry run skips it (the per-record
    /// pass counts what it would move).
    async fn move_settled(
        &self,
        opts: &SweepOptions,
        lost: &AtomicBool,
        cutoff: i64,
        counters: &Counters,
    ) -> Result<(), BatchError> {
        if opts.dry_run || opts.move_chunk == 0 {
            return Ok(());
        }
        loop {
            if lost.load(Ordering::SeqCst) {
                return Err(BatchError::LeaseLost(Summary::default()));
            }
            match self.store.move_settled(cutoff, opts.move_chunk).await {
                Ok(moved) => {
                    counters.scanned.fetch_add(moved, Ordering::Relaxed);
                    counters.completed.fetch_add(moved, Ordering::Relaxed);
                    if let Some(p) = &self.progress {
                        p.advance(moved);
                    }
                    if moved < u64::from(opts.move_chunk) {
                        return Ok(());
                    }
                }
                Err(e) => {
                    bump(&counters.failures);
                    tracing::error!(error = %e, "batch: a set-based move failed; the per-record pass moves what is left");
                    return Ok(());
                }
            }
        }
    }

    async fn handle(
        &self,
        r: PaymentRecord,
        opts: &SweepOptions,
        c: &Counters,
    ) -> Result<(), StoreError> {
        let settler = Settler::new(
            self.store.clone(),
            self.saga.clone(),
            opts.ledger_alert_threshold,
        );
        if r.is_paid && r.is_saved {
            if self.file(&r, Partition::Completed, opts.dry_run).await? {
                bump(&c.completed);
            }
            return Ok(());
        }
        if r.is_paid {
            c.add(settler.save(r, opts.dry_run).await?);
            return Ok(());
        }
        let evidence = self
            .log
            .confirm_evidence(r.payment_id.as_str(), paygate_card_api::CONFIRM_PATH)
            .await?;
        match r.card_status {
            // Declined, never sent, or settled as not charged once its
            // confirm window closed (the card company has nothing to add).
            CardStatus::Aborted
                if evidence.requests == 0
                    || paygate_payments::classify::declined(&evidence)
                    || r.failure_code.as_deref()
                        == Some(paygate_core::payment::failure_codes::CONFIRM_EXPIRED) =>
            {
                if !opts.dry_run {
                    // Its confirm may have died between the abort and the
                    // release of its hold: release it, read hold first and
                    // payment after, guarded on the hold's version (a
                    // merchant's retry may have reopened the payment and
                    // begun on the hold since the scan).
                    self.saga.release_hold_if_ended(&r).await?;
                }
                if self.file(&r, Partition::Unpaid, opts.dry_run).await? {
                    bump(&c.unpaid);
                }
            }
            // By I3 no confirm was sent without its REQUEST row: a record
            // left PENDING (or UNKNOWN) with none is a no-call abort (a crash
            // between the record and the log write). A merchant's retry
            // reopens it; nothing to look up, no operator needed.
            CardStatus::Pending | CardStatus::Unknown if evidence.requests == 0 => {
                if opts.dry_run {
                    bump(&c.unpaid);
                    return Ok(());
                }
                // Guarded on the version read before the log: a confirm
                // that wrote its REQUEST row since then has moved it (its
                // fence), and this filing changes nothing.
                let t = Transition::FileNotSent {
                    seen_version: r.version,
                    last_error: "no card confirm was logged for it; none was sent".to_owned(),
                };
                let aborted = self.store.transition(&r.payment_id, &t).await?;
                if aborted {
                    // Its confirm may have moved the order's hold to
                    // `during` before it died: give the stock back, unless
                    // a retry has reopened the payment since.
                    self.saga.release_hold_if_ended(&r).await?;
                }
                if aborted
                    && self
                        .store
                        .move_record(&r.payment_id, Partition::Realtime, Partition::Unpaid)
                        .await?
                {
                    bump(&c.unpaid);
                }
            }
            CardStatus::Pending | CardStatus::Unknown
                if !opts.recheck.due(&r, self.saga.clock().now_ms()) =>
            {
                bump(&c.deferred);
            }
            CardStatus::Aborted | CardStatus::Pending | CardStatus::Unknown => {
                c.add(settler.settle(r, opts.dry_run).await?.1);
            }
            // Paid-state statuses on an unpaid record do not occur; leave them.
            CardStatus::Done | CardStatus::Canceled => {}
        }
        Ok(())
    }

    /// The pass over cancels that need work (see the module doc).
    async fn sweep_cancels(
        &self,
        opts: &SweepOptions,
        lost: &AtomicBool,
        cutoff: i64,
        counters: &Counters,
    ) -> Result<(), BatchError> {
        self.store
            .scan_open_cancels(opts.scan_batch)
            .map_err(BatchError::Store)
            .try_for_each_concurrent(opts.concurrency.max(1), |c| async move {
                if lost.load(Ordering::SeqCst) {
                    return Err(BatchError::LeaseLost(Summary::default()));
                }
                if c.updated_at <= cutoff {
                    self.handle_cancel(&c, opts, counters).await;
                }
                Ok(())
            })
            .await
    }

    async fn handle_cancel(
        &self,
        c: &paygate_state_store::CancelRecord,
        opts: &SweepOptions,
        counters: &Counters,
    ) {
        use paygate_payments::{CancelSettlement, SaveResult};
        let threshold = opts.ledger_alert_threshold;
        if c.status.in_flight() {
            bump(&counters.settled);
            if opts.dry_run {
                return;
            }
            match self.saga.settle_cancel(c, threshold).await {
                CancelSettlement::StillUnknown if c.batch_attempts + 1 >= threshold => {
                    bump(&counters.alerts);
                }
                CancelSettlement::Skipped => bump(&counters.failures),
                _ => {}
            }
            return;
        }
        bump(&counters.retried);
        if opts.dry_run {
            return;
        }
        match self.saga.batch_reverse(&c.payment_id, c.n).await {
            SaveResult::Saved => bump(&counters.saved),
            SaveResult::Retry if c.batch_attempts + 1 >= threshold => {
                let alerted = match self.store.get(&c.payment_id).await {
                    Ok(Some((_, record))) if record.is_saved => {
                        self.saga
                            .alert(
                                &record,
                                paygate_alert::AlertReason::ReversalFailed,
                                format!(
                                    "cancel {}: the ledger reversal failed {} times in the batch",
                                    c.n,
                                    c.batch_attempts + 1
                                ),
                            )
                            .await
                    }
                    _ => false,
                };
                if alerted {
                    bump(&counters.alerts);
                }
            }
            SaveResult::Retry | SaveResult::Refused => {}
        }
    }

    /// Moves a record out of realtime into `to` (a dry run only counts it);
    /// `true` when it moved. The move is guarded in the store: a record
    /// changed since the scan read it stays where it is.
    async fn file(
        &self,
        r: &PaymentRecord,
        to: Partition,
        dry_run: bool,
    ) -> Result<bool, StoreError> {
        if dry_run {
            return Ok(true);
        }
        self.store
            .move_record(&r.payment_id, Partition::Realtime, to)
            .await
    }
}
