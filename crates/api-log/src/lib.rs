//! paygate-api-log: the append-only SQL log of every downstream request and
//! response (`api_logs`, DESIGN.md §3).
//!
//! The confirm saga writes a `REQUEST` row *before* each downstream call and a
//! `RESPONSE` or `ERROR` row after it (invariant I3): if the `REQUEST` row
//! cannot be written, the call is not made. Bodies are scrubbed of card data
//! and secrets ([`paygate_core::masking::scrub_json`]) before they are stored.

pub mod memory;

pub use memory::MemoryApiLog;
pub mod audit;

pub use audit::{NewResolution, Resolution, ResolutionLog};
pub mod inbox;
pub mod journal;

pub use inbox::{CardWebhook, Receipt, SqlCardInbox};

pub use journal::{Journal, SqlJournal};

use paygate_core::{masking::scrub_json, PaymentId};
use paygate_state_store::{sql::map_err, with_pool, LogRow, SqlDatabase, StoreError};
use sqlx::Row;

/// Which downstream a row is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The card company's API.
    CardApi,
    /// The internal ledger.
    LedgerApi,
}

impl Target {
    /// Stored spelling: `card_api`, `ledger_api`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::CardApi => "card_api",
            Self::LedgerApi => "ledger_api",
        }
    }
}

/// What a row records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Written before the call.
    Request,
    /// An HTTP answer arrived (any status).
    Response,
    /// No answer: timeout, connection failure, unreadable body.
    Error,
}

impl Kind {
    /// Stored spelling: `REQUEST`, `RESPONSE`, `ERROR`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Request => "REQUEST",
            Self::Response => "RESPONSE",
            Self::Error => "ERROR",
        }
    }
}

/// The request/response log as the saga and the batch use it: append a
/// row, and read what the log proves about a payment's confirm. Production
/// uses [`SqlApiLog`]; the deterministic simulation uses [`MemoryApiLog`].
#[async_trait::async_trait]
pub trait ApiLog: Send + Sync + 'static {
    /// Appends one row (the body is scrubbed first).
    ///
    /// # Errors
    /// [`StoreError`]; a `REQUEST` row that fails means no call is made.
    async fn append(&self, entry: LogEntry<'_>) -> Result<(), StoreError>;

    /// See [`SqlApiLog::confirm_evidence`].
    ///
    /// # Errors
    /// [`StoreError`].
    async fn confirm_evidence(
        &self,
        payment_id: &str,
        confirm_path: &str,
    ) -> Result<ConfirmEvidence, StoreError>;
}

#[async_trait::async_trait]
impl ApiLog for SqlApiLog {
    async fn append(&self, entry: LogEntry<'_>) -> Result<(), StoreError> {
        SqlApiLog::append(self, entry).await
    }

    async fn confirm_evidence(
        &self,
        payment_id: &str,
        confirm_path: &str,
    ) -> Result<ConfirmEvidence, StoreError> {
        SqlApiLog::confirm_evidence(self, payment_id, confirm_path).await
    }
}

/// A row to append.
#[derive(Clone, Debug)]
pub struct LogEntry<'a> {
    /// The payment the call is for.
    pub payment_id: &'a PaymentId,
    /// The downstream.
    pub target: Target,
    /// Request, response or error.
    pub kind: Kind,
    /// Attempt number of this call, from 1.
    pub attempt: i32,
    /// HTTP method.
    pub method: &'a str,
    /// Request path (no host, no query secrets).
    pub path: &'a str,
    /// HTTP status of the answer.
    pub status_code: Option<i32>,
    /// JSON body; scrubbed before it is stored.
    pub body: Option<serde_json::Value>,
    /// Time from the request to this row, ms.
    pub latency_ms: Option<i64>,
}

impl LogEntry<'_> {
    /// The row as inserted: body scrubbed ([`scrub_json`]) and rendered,
    /// stamped now.
    pub fn to_row(&self) -> LogRow<'_> {
        LogRow {
            payment_id: self.payment_id.as_str(),
            target: self.target.as_str(),
            kind: self.kind.as_str(),
            attempt: self.attempt,
            method: self.method,
            path: self.path,
            status_code: self.status_code,
            body: self.body.clone().map(|mut b| {
                scrub_json(&mut b);
                b.to_string()
            }),
            latency_ms: self.latency_ms,
            created_at: paygate_core::time::now_ms(),
        }
    }
}

/// A stored row.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredLogEntry {
    /// Row id (insertion order).
    pub id: i64,
    /// `pay_...`.
    pub payment_id: String,
    /// `card_api` or `ledger_api`.
    pub target: String,
    /// `REQUEST`, `RESPONSE` or `ERROR`.
    pub kind: String,
    /// Attempt number, from 1.
    pub attempt: i32,
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// HTTP status, when an answer arrived.
    pub status_code: Option<i32>,
    /// Scrubbed JSON body.
    pub body: Option<serde_json::Value>,
    /// Latency, ms.
    pub latency_ms: Option<i64>,
    /// Written, epoch ms.
    pub created_at: i64,
}

/// The log on the SQL database (SQLite `TEXT` bodies, PostgreSQL `JSONB`).
#[derive(Clone, Debug)]
pub struct SqlApiLog {
    db: SqlDatabase,
}

impl SqlApiLog {
    /// The log on `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Appends one row durably (the statement commits before this returns).
    ///
    /// # Errors
    /// [`StoreError`]: the caller must then not make the downstream call.
    pub async fn append(&self, entry: LogEntry<'_>) -> Result<(), StoreError> {
        self.db.append_log_row(&entry.to_row()).await
    }

    /// Every row for a payment, in insertion order.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn for_payment(
        &self,
        payment_id: &PaymentId,
    ) -> Result<Vec<StoredLogEntry>, StoreError> {
        let body_col = match self.db {
            SqlDatabase::Sqlite(_) => "body",
            SqlDatabase::Postgres(_) => "CAST(body AS TEXT) AS body",
        };
        let sql = format!(
            "SELECT id, payment_id, target, kind, attempt, method, path, status_code, {body_col}, latency_ms, created_at \
             FROM api_logs WHERE payment_id = $1 ORDER BY id"
        );
        let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql).bind(payment_id.as_str()).fetch_all(pool).await.map_err(map_err)?;
            rows.iter()
                .map(|row| {
                    let body: Option<String> = row.try_get("body").map_err(c)?;
                    Ok(StoredLogEntry {
                        id: row.try_get("id").map_err(c)?,
                        payment_id: row.try_get("payment_id").map_err(c)?,
                        target: row.try_get("target").map_err(c)?,
                        kind: row.try_get("kind").map_err(c)?,
                        attempt: row.try_get("attempt").map_err(c)?,
                        method: row.try_get("method").map_err(c)?,
                        path: row.try_get("path").map_err(c)?,
                        status_code: row.try_get("status_code").map_err(c)?,
                        body: body.and_then(|b| serde_json::from_str(&b).ok()),
                        latency_ms: row.try_get("latency_ms").map_err(c)?,
                        created_at: row.try_get("created_at").map_err(c)?,
                    })
                })
                .collect()
        })
    }

    /// What the log shows of the card company's answers to the *confirm*
    /// of a payment (rows of `target = card_api` and `path =
    /// confirm_path`; lookups, cancels and pages are not evidence of a
    /// decline): how many confirm requests were made, and each answer's
    /// HTTP status and the card company's `code` (from the logged body).
    /// The batch uses it to tell a decline or a no-call abort (no confirm
    /// was ever sent) from an outcome it must look up. A `REQUEST` row
    /// withdrawn by a [`NOT_SENT`] `ERROR` row is not counted.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn confirm_evidence(
        &self,
        payment_id: &str,
        confirm_path: &str,
    ) -> Result<ConfirmEvidence, StoreError> {
        // `body` is JSONB on PostgreSQL and TEXT on SQLite: read it as text.
        let sql = "SELECT kind, status_code, CAST(body AS TEXT) AS body FROM api_logs \
             WHERE payment_id = $1 AND target = 'card_api' AND path = $2 ORDER BY id";
        let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        let rows: Vec<(String, Option<i32>, Option<String>)> = with_pool!(&self.db, pool => {
            let rows = sqlx::query(sql).bind(payment_id).bind(confirm_path).fetch_all(pool).await.map_err(map_err)?;
            rows.iter()
                .map(|r| Ok((r.try_get("kind").map_err(c)?, r.try_get("status_code").map_err(c)?, r.try_get("body").map_err(c)?)))
                .collect::<Result<Vec<_>, StoreError>>()?
        });
        let mut evidence = ConfirmEvidence::default();
        for (kind, status, body) in rows {
            if kind == Kind::Request.as_str() {
                evidence.requests += 1;
                continue;
            }
            let code = body
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned));
            if kind == Kind::Error.as_str() && code.as_deref() == Some(NOT_SENT) {
                evidence.requests = (evidence.requests - 1).max(0);
            } else if let Some(status) = status {
                evidence.answers.push((status, code));
            }
        }
        Ok(evidence)
    }

    /// Up to `limit` rows written before `cutoff_ms` with an id above
    /// `after`, oldest first, as `(id, payment_id)`: the candidates of
    /// `paygate prune`, which walks the log with this cursor (so rows it
    /// keeps are not read again) and deletes only the rows of payments that
    /// are completed or unpaid.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn older_than_after(
        &self,
        after: i64,
        cutoff_ms: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let sql = "SELECT id, payment_id FROM api_logs WHERE id > $1 AND created_at < $2 ORDER BY id LIMIT $3";
        let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(sql).bind(after).bind(cutoff_ms).bind(limit).fetch_all(pool).await.map_err(map_err)?;
            rows.iter()
                .map(|r| Ok((r.try_get("id").map_err(c)?, r.try_get("payment_id").map_err(c)?)))
                .collect()
        })
    }

    /// Deletes the rows `ids` (a bounded batch chosen by `paygate prune`);
    /// returns how many went. The log is append-only for every other caller.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn delete(&self, ids: &[i64]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let list: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!("DELETE FROM api_logs WHERE id IN ({})", list.join(", "));
        with_pool!(&self.db, pool => {
            let mut q = sqlx::query(&sql);
            for id in ids {
                q = q.bind(*id);
            }
            q.execute(pool).await.map(|r| r.rows_affected()).map_err(map_err)
        })
    }

    /// True when a `REQUEST` row for `payment_id` and `target` exists (used
    /// by tests and the invariant checker to prove write-ahead ordering).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn has_request(&self, payment_id: &str, target: Target) -> Result<bool, StoreError> {
        let sql = "SELECT COUNT(*) AS n FROM api_logs WHERE payment_id = $1 AND target = $2 AND kind = 'REQUEST'";
        with_pool!(&self.db, pool => {
            let row = sqlx::query(sql).bind(payment_id).bind(target.as_str()).fetch_one(pool).await.map_err(map_err)?;
            let n: i64 = row.try_get("n").map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok(n > 0)
        })
    }
}

/// The code of the `ERROR` row that withdraws a `REQUEST` row written
/// ahead of a call that never left (the record and the first `REQUEST` row
/// are one commit, before the resilience stack admits the call: an open
/// breaker, a full bulkhead or a merchant already answered 503 then stop
/// it). [`SqlApiLog::confirm_evidence`] does not count such a request.
pub const NOT_SENT: &str = paygate_core::payment::failure_codes::NOT_SENT;

/// The confirm calls of one payment as the log shows them (see
/// [`SqlApiLog::confirm_evidence`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfirmEvidence {
    /// `REQUEST` rows: confirm attempts that were sent.
    pub requests: i64,
    /// Each answer that arrived: HTTP status and the card company's code.
    pub answers: Vec<(i32, Option<String>)>,
}

/// The last run of each sidecar job (`job_runs`): the batch and the
/// reconciliation write their summary here when they finish, and the serving
/// process's `GET /metrics` exposes it (nothing scrapes a job's own process).
#[derive(Clone, Debug)]
pub struct JobRuns {
    db: SqlDatabase,
}

impl JobRuns {
    /// Job runs on `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Records `job`'s latest summary (a JSON object of counts), replacing
    /// the previous one, and appends it to the run history (the console's
    /// Reconciliation page).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn record(&self, job: &str, summary: &serde_json::Value) -> Result<(), StoreError> {
        let latest = "INSERT INTO job_runs (job, finished_at, summary) VALUES ($1, $2, $3) \
                   ON CONFLICT (job) DO UPDATE SET finished_at = excluded.finished_at, summary = excluded.summary";
        let history = "INSERT INTO job_run_history (job, finished_at, summary) VALUES ($1, $2, $3)";
        let now = paygate_core::time::now_ms();
        let text = summary.to_string();
        with_pool!(&self.db, pool => {
            let mut tx = pool.begin().await.map_err(map_err)?;
            for sql in [latest, history] {
                sqlx::query(sql).bind(job).bind(now).bind(&text).execute(&mut *tx).await.map_err(map_err)?;
            }
            tx.commit().await.map_err(map_err)?;
        });
        Ok(())
    }

    /// `job`'s last `limit` runs, newest first: `(finished_at epoch ms,
    /// summary)`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn history(
        &self,
        job: &str,
        limit: u32,
    ) -> Result<Vec<(i64, serde_json::Value)>, StoreError> {
        let sql = "SELECT finished_at, summary FROM job_run_history WHERE job = $1 \
                   ORDER BY id DESC LIMIT $2";
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(sql)
                .bind(job)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err(map_err)?;
            rows.iter()
                .map(|row| {
                    let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
                    let text: String = row.try_get("summary").map_err(c)?;
                    Ok((
                        row.try_get("finished_at").map_err(c)?,
                        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                    ))
                })
                .collect()
        })
    }

    /// Every job's latest run: `(job, finished_at epoch ms, summary)`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn latest(&self) -> Result<Vec<(String, i64, serde_json::Value)>, StoreError> {
        let sql = "SELECT job, finished_at, summary FROM job_runs ORDER BY job";
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(sql).fetch_all(pool).await.map_err(map_err)?;
            rows.iter()
                .map(|row| {
                    let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
                    let text: String = row.try_get("summary").map_err(c)?;
                    Ok((
                        row.try_get("job").map_err(c)?,
                        row.try_get("finished_at").map_err(c)?,
                        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                    ))
                })
                .collect()
        })
    }
}

/// What each `serve` replica last reported about its downstreams
/// (`replica_status`): a replica writes its snapshot every few seconds and
/// the console, another process, reads them all.
#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    db: SqlDatabase,
}

impl ReplicaStatus {
    /// Replica statuses on `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Replaces `replica`'s snapshot (a JSON object) with `snapshot`, stamped
    /// with this process's clock.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn report(
        &self,
        replica: &str,
        snapshot: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO replica_status (replica, updated_at, snapshot) VALUES ($1, $2, $3) \
                   ON CONFLICT (replica) DO UPDATE SET updated_at = excluded.updated_at, snapshot = excluded.snapshot";
        let now = paygate_core::time::now_ms();
        let text = snapshot.to_string();
        with_pool!(&self.db, pool => {
            sqlx::query(sql).bind(replica).bind(now).bind(&text).execute(pool).await.map_err(map_err)?;
        });
        Ok(())
    }

    /// Every replica's last report: `(replica, updated_at epoch ms,
    /// snapshot)`, most recent first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn all(&self) -> Result<Vec<(String, i64, serde_json::Value)>, StoreError> {
        let sql =
            "SELECT replica, updated_at, snapshot FROM replica_status ORDER BY updated_at DESC";
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(sql).fetch_all(pool).await.map_err(map_err)?;
            rows.iter()
                .map(|row| {
                    let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
                    let text: String = row.try_get("snapshot").map_err(c)?;
                    Ok((
                        row.try_get("replica").map_err(c)?,
                        row.try_get("updated_at").map_err(c)?,
                        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                    ))
                })
                .collect()
        })
    }
}
