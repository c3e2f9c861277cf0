//! Group commit for SQLite (issue 18): one writer task owns one write
//! connection and commits the writes of concurrent confirms together.
//!
//! Why: SQLite has one writer at a time. With every pool connection
//! writing, concurrent confirms queue on the write lock through SQLite's
//! busy handler, which sleeps and polls (up to 100 ms a nap): the tail of
//! a confirm was that queue, not work, and each of its commits paid its
//! own `fsync`. Here the queue is a channel in FIFO order, and a batch of
//! queued writes shares one transaction, so one `fsync` (`synchronous =
//! FULL` is kept) makes all of them durable.
//!
//! How: the task takes the first queued [`write`](SqliteWriter::write),
//! then every write already queued behind it (at most [`MAX_BATCH`]),
//! opens `BEGIN IMMEDIATE`, runs each write inside a `SAVEPOINT` of its
//! own (a write that fails, or asks to roll back, is undone alone; the
//! others go on), then `COMMIT`s. Each caller is answered only after the
//! commit that made its write durable; if that commit fails, every caller
//! of the batch gets [`StoreError::Unavailable`] and nothing of the batch
//! was written (callers re-read, as after any write whose answer was
//! lost). While a batch commits, the next one queues: the batch size
//! follows the load, one write alone when the gateway is idle.
//!
//! Reads stay on the pool (WAL: readers never wait for the writer). The
//! batch's moves go through the writer too. Other writes (leases, the
//! alert outbox, inventory holds, cancels) still use the pool and wait
//! for the write lock with the busy timeout, taking it between two of this
//! task's batches: while the writer is saturated they may wait up to that
//! timeout (then fail as `Unavailable`, retried by their callers).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::{future::BoxFuture, FutureExt};
use sqlx::{sqlite::SqliteConnectOptions, ConnectOptions, Connection, Executor, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use crate::StoreError;

/// The most writes committed in one transaction.
pub const MAX_BATCH: usize = 128;

/// Writes waiting for the writer at most; a caller beyond it waits to
/// enqueue (backpressure, not an error).
const QUEUE: usize = 4_096;

/// How a write's caller learns the outcome of its batch's commit.
type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A queued write: runs on the writer's connection inside the batch's
/// transaction; returns whether to keep its changes and how to answer.
type Job =
    Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, (bool, Finish)> + Send>;

/// What the task receives: a write, or the order to close its
/// connection and stop (answered once the connection is closed).
enum Msg {
    Write(Job),
    Close(oneshot::Sender<()>),
}

/// The handle of the writer task; cheap to clone. The task stops when the
/// last handle is dropped.
#[derive(Clone, Debug)]
pub struct SqliteWriter {
    jobs: mpsc::Sender<Msg>,
    stats: Arc<Stats>,
}

/// What the writer has done since it started.
#[derive(Debug, Default)]
struct Stats {
    commits: AtomicU64,
    writes: AtomicU64,
}

impl SqliteWriter {
    /// Opens the write connection with `options` (the pool's own: WAL,
    /// `synchronous = FULL`, the busy timeout) and starts the task on the
    /// current tokio runtime.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the connection cannot be opened.
    pub async fn start(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let conn = options.connect().await.map_err(crate::sql::map_err)?;
        let (jobs, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(conn, options, rx, stats.clone()));
        Ok(Self { jobs, stats })
    }

    /// Transactions committed so far (one per batch), and the writes they
    /// carried: their ratio is the mean batch size. Benchmarks read it to
    /// report commits per confirm on SQLite.
    pub fn committed(&self) -> (u64, u64) {
        (
            self.stats.commits.load(Ordering::Relaxed),
            self.stats.writes.load(Ordering::Relaxed),
        )
    }

    /// Runs `write` on the write connection, inside a transaction shared
    /// with the other writes queued with it, and answers after the commit.
    /// `write` returns its value and whether to keep its changes (`false`
    /// rolls back its savepoint: a create whose claim was taken); an error
    /// from it rolls its savepoint back and is returned as is.
    ///
    /// # Errors
    /// `write`'s own error; [`StoreError::Unavailable`] when the batch's
    /// commit failed (nothing of the batch was written) or the writer
    /// stopped.
    pub async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<(T, bool), StoreError>>
            + Send
            + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            Box::pin(async move {
                match write(conn).await {
                    Ok((value, keep)) => {
                        let finish: Finish = Box::new(move |commit| {
                            let _ = tx.send(commit.map(|()| value));
                        });
                        (keep, finish)
                    }
                    Err(e) => {
                        let finish: Finish = Box::new(move |_| {
                            let _ = tx.send(Err(e));
                        });
                        (false, finish)
                    }
                }
            })
        });
        let stopped = || StoreError::Unavailable("the SQLite write was not committed".to_owned());
        self.jobs
            .send(Msg::Write(job))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Commits what is queued, closes the write connection (SQLite then
    /// checkpoints the WAL into the database file when it is the last
    /// connection) and stops the task; later writes fail as
    /// `Unavailable`. Returns once the connection is closed.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Msg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The task: batches queued writes until every handle is gone. A batch
/// whose transaction broke drops the connection; the next batch opens a
/// new one (a failed open fails that batch, and is tried again for the next).
async fn run(
    conn: SqliteConnection,
    options: SqliteConnectOptions,
    mut rx: mpsc::Receiver<Msg>,
    stats: Arc<Stats>,
) {
    let mut conn = Some(conn);
    let mut closing = None;
    while closing.is_none() {
        let Some(first) = rx.recv().await else { break };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        match first {
            Msg::Write(job) => batch.push(job),
            Msg::Close(ack) => {
                closing = Some(ack);
                break;
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Write(job)) => batch.push(job),
                Ok(Msg::Close(ack)) => {
                    closing = Some(ack);
                    break;
                }
                Err(_) => break,
            }
        }
        metrics::histogram!("paygate_sqlite_group_commit_writes").record(batch.len() as f64);
        if conn.is_none() {
            match options.connect().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::error!(error = %e, "the SQLite writer could not reconnect");
                    fail_all(batch, &e.to_string());
                    // Do not spin on a database that is gone.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        if !run_batch(c, batch, &stats).await {
            if let Some(c) = conn.take() {
                let _ = c.close().await;
            }
        }
    }
    rx.close();
    if let Some(c) = conn {
        let _ = c.close().await;
    }
    if let Some(ack) = closing {
        let _ = ack.send(());
    }
}

/// Runs one batch in one transaction; `false` when the connection should
/// be replaced (a statement of the batch's own bookkeeping failed).
async fn run_batch(conn: &mut SqliteConnection, batch: Vec<Job>, stats: &Stats) -> bool {
    if let Err(e) = conn.execute("BEGIN IMMEDIATE").await {
        tracing::warn!(error = %e, writes = batch.len(), "SQLite group commit: BEGIN failed");
        fail_all(batch, &e.to_string());
        return !is_connection_error(&e);
    }
    let mut answers: Vec<Finish> = Vec::with_capacity(batch.len());
    let mut jobs = batch.into_iter();
    let mut broken = None;
    for job in jobs.by_ref() {
        if let Err(e) = conn.execute("SAVEPOINT paygate_write").await {
            broken = Some((e, Some(job)));
            break;
        }
        // A panic inside a write must not take the writer down with it
        // (every later write would fail while reads stay healthy): it is
        // that write's failure, and the batch's, as a broken statement.
        let (keep, finish) = match std::panic::AssertUnwindSafe(job(conn)).catch_unwind().await {
            Ok(done) => done,
            Err(_) => {
                broken = Some((sqlx::Error::WorkerCrashed, None));
                break;
            }
        };
        answers.push(finish);
        let end = if keep {
            conn.execute("RELEASE paygate_write").await
        } else {
            match conn.execute("ROLLBACK TO paygate_write").await {
                Ok(_) => conn.execute("RELEASE paygate_write").await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = end {
            broken = Some((e, None));
            break;
        }
    }
    if let Some((e, pending)) = broken {
        tracing::error!(error = %e, "SQLite group commit: a savepoint failed; the batch is rolled back");
        let _ = conn.execute("ROLLBACK").await;
        let message = e.to_string();
        for finish in answers {
            finish(Err(unavailable(&message)));
        }
        fail_all(pending.into_iter().chain(jobs).collect(), &message);
        return false;
    }
    match conn.execute("COMMIT").await {
        Ok(_) => {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats
                .writes
                .fetch_add(answers.len() as u64, Ordering::Relaxed);
            for finish in answers {
                finish(Ok(()));
            }
            true
        }
        Err(e) => {
            tracing::error!(error = %e, writes = answers.len(), "SQLite group commit: COMMIT failed; nothing of the batch was written");
            // A COMMIT that failed may leave the transaction open; the
            // connection is replaced whatever the ROLLBACK says.
            let _ = conn.execute("ROLLBACK").await;
            let message = e.to_string();
            for finish in answers {
                finish(Err(unavailable(&message)));
            }
            false
        }
    }
}

/// Answers writes that never ran.
fn fail_all(jobs: Vec<Job>, message: &str) {
    for job in jobs {
        // Dropping the job drops its answer channel: the caller gets
        // "writer stopped", mapped to Unavailable like a failed commit.
        drop(job);
    }
    tracing::debug!(
        message,
        "SQLite group commit: writes failed before they ran"
    );
}

fn unavailable(message: &str) -> StoreError {
    StoreError::Unavailable(format!("the SQLite commit failed: {message}"))
}

fn is_connection_error(e: &sqlx::Error) -> bool {
    !matches!(e, sqlx::Error::Database(_))
}
