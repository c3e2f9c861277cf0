//! The SQL backends: one [`SqlDatabase`] handle over SQLite or PostgreSQL,
//! the schema migrations of each, and [`SqlStateStore`].
//!
//! Both backends run the same SQL text: it sticks to what SQLite and
//! PostgreSQL share (`$n` placeholders, `ON CONFLICT`, `TRUE`/`FALSE`), and
//! [`with_pool!`](crate::with_pool) expands one body once per backend so each
//! gets sqlx's native, fully typed driver (rather than sqlx's `Any` driver,
//! which cannot decode booleans from SQLite).
//!
//! This module holds the database and the payment records; [`cancels`]
//! and [`inventory`] the other two entities on the same database;
//! [`sqlite_writer`] SQLite's group commit.

mod cancels;
pub mod inventory;
pub mod sqlite_writer;

use std::{borrow::Cow, str::FromStr, time::Duration};

use futures_util::{future::BoxFuture, stream::BoxStream, TryStreamExt};
use paygate_core::{CardStatus, MerchantId, OrderId, Partition, PaymentId, PaymentRecord};
use sqlx::{
    migrate::{Migration, MigrationSource, MigrationType, Migrator},
    postgres::{PgPool, PgPoolOptions},
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
    Row,
};

use self::sqlite_writer::SqliteWriter;
use crate::{
    rules::sql::{Bind, Binds},
    CreateOutcome, StateStore, StoreError, Transition,
};

/// What a process does to the schema when it opens the database
/// ([`SqlDatabase::open`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaStep {
    /// Apply the pending migrations (`migrate_on_start`, the default for a
    /// single process or development).
    Migrate,
    /// Only check that they are applied: a deployment applies them once,
    /// with `paygate migrate` (a Kubernetes Job or init container).
    Check,
}

/// A connection pool to the SQL database: SQLite (`sqlite://path`) or
/// PostgreSQL (`postgres://...`). Cheap to clone (the pools are shared).
#[derive(Clone, Debug)]
pub enum SqlDatabase {
    /// SQLite, in WAL mode with `synchronous = FULL` and a 5 s busy timeout;
    /// the confirm's writes go through its group-commit writer.
    Sqlite(SqliteDatabase),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the concrete pool of a [`SqlDatabase`];
/// the body is compiled once per backend.
#[macro_export]
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::sql::SqlDatabase::Sqlite(db) => {
                let $pool = &db.pool;
                $body
            }
            $crate::sql::SqlDatabase::Postgres($pool) => $body,
        }
    };
}

/// Binds a translated rule's parameters onto a query, in order.
macro_rules! bind_rule {
    ($q:expr, $binds:expr) => {{
        let mut q = $q;
        for b in $binds {
            q = match b {
                $crate::rules::sql::Bind::Text(s) => q.bind(s.as_str()),
                $crate::rules::sql::Bind::Int(i) => q.bind(*i),
            };
        }
        q
    }};
}
pub(crate) use bind_rule;

/// A SQLite database: the pool (every read, and the rare writes outside a
/// confirm's path) and, for a file database, the group-commit writer
/// ([`sqlite_writer`]) that commits the confirm's writes.
#[derive(Clone, Debug)]
pub struct SqliteDatabase {
    /// The connection pool.
    pub pool: SqlitePool,
    writer: Option<SqliteWriter>,
}

impl SqliteDatabase {
    /// The group-commit writer; `None` for an in-memory database (another
    /// connection would open another database) or when turned off with
    /// `PAYGATE_SQLITE_GROUP_COMMIT=off` (a benchmark's baseline).
    pub fn writer(&self) -> Option<&SqliteWriter> {
        self.writer.as_ref().filter(|_| !self.pool.is_closed())
    }

    /// Runs `write` through the writer when there is one (see
    /// [`SqliteWriter::write`]); otherwise in a transaction of its own on
    /// the pool. Either way the caller is answered after the commit.
    ///
    /// # Errors
    /// `write`'s error, or [`StoreError::Unavailable`] when the commit
    /// failed or the pool is closed.
    pub async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut sqlx::SqliteConnection,
            ) -> BoxFuture<'c, Result<(T, bool), StoreError>>
            + Send
            + 'static,
    {
        if self.pool.is_closed() {
            return Err(StoreError::Unavailable(
                "the SQLite pool is closed".to_owned(),
            ));
        }
        if let Some(writer) = &self.writer {
            return writer.write(write).await;
        }
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let (value, keep) = write(&mut tx).await?;
        if keep {
            tx.commit().await.map_err(map_err)?;
        } else {
            tx.rollback().await.map_err(map_err)?;
        }
        Ok(value)
    }
}

/// Maps a sqlx error to a [`StoreError`]: lost connections and pool trouble
/// are `Unavailable` (the caller answers 503), refusals are `Rejected`.
pub fn map_err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(db) => StoreError::Rejected(db.to_string()),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_) => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

#[derive(Debug)]
struct EmbeddedMigrations(&'static [(i64, &'static str, &'static str)]);

impl<'s> MigrationSource<'s> for EmbeddedMigrations {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, desc, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(desc),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "alert outbox",
        include_str!("../../../../migrations/sqlite/0002_alert_outbox.sql"),
    ),
    (
        3,
        "batch leases",
        include_str!("../../../../migrations/sqlite/0003_batch_leases.sql"),
    ),
    (
        4,
        "reconciliation indexes",
        include_str!("../../../../migrations/sqlite/0004_reconcile_indexes.sql"),
    ),
    (
        5,
        "job runs",
        include_str!("../../../../migrations/sqlite/0005_job_runs.sql"),
    ),
    (
        6,
        "alert parking",
        include_str!("../../../../migrations/sqlite/0006_alert_parking.sql"),
    ),
    (
        7,
        "operator audit",
        include_str!("../../../../migrations/sqlite/0007_operator_audit.sql"),
    ),
    (
        8,
        "card account claims",
        include_str!("../../../../migrations/sqlite/0008_card_account_claims.sql"),
    ),
    (
        9,
        "payment cancels",
        include_str!("../../../../migrations/sqlite/0009_payment_cancels.sql"),
    ),
    (
        10,
        "inventory and holds",
        include_str!("../../../../migrations/sqlite/0010_inventory_holds.sql"),
    ),
    (
        11,
        "versions",
        include_str!("../../../../migrations/sqlite/0011_versions.sql"),
    ),
    (
        12,
        "card webhooks",
        include_str!("../../../../migrations/sqlite/0012_card_webhooks.sql"),
    ),
    (
        13,
        "payment events",
        include_str!("../../../../migrations/sqlite/0013_payment_events.sql"),
    ),
    (
        14,
        "console",
        include_str!("../../../../migrations/sqlite/0014_console.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "alert outbox",
        include_str!("../../../../migrations/postgres/0002_alert_outbox.sql"),
    ),
    (
        3,
        "batch leases",
        include_str!("../../../../migrations/postgres/0003_batch_leases.sql"),
    ),
    (
        4,
        "reconciliation indexes",
        include_str!("../../../../migrations/postgres/0004_reconcile_indexes.sql"),
    ),
    (
        5,
        "job runs",
        include_str!("../../../../migrations/postgres/0005_job_runs.sql"),
    ),
    (
        6,
        "alert parking",
        include_str!("../../../../migrations/postgres/0006_alert_parking.sql"),
    ),
    (
        7,
        "operator audit",
        include_str!("../../../../migrations/postgres/0007_operator_audit.sql"),
    ),
    (
        8,
        "card account claims",
        include_str!("../../../../migrations/postgres/0008_card_account_claims.sql"),
    ),
    (
        9,
        "payment cancels",
        include_str!("../../../../migrations/postgres/0009_payment_cancels.sql"),
    ),
    (
        10,
        "inventory and holds",
        include_str!("../../../../migrations/postgres/0010_inventory_holds.sql"),
    ),
    (
        11,
        "versions",
        include_str!("../../../../migrations/postgres/0011_versions.sql"),
    ),
    (
        12,
        "card webhooks",
        include_str!("../../../../migrations/postgres/0012_card_webhooks.sql"),
    ),
    (
        13,
        "payment events",
        include_str!("../../../../migrations/postgres/0013_payment_events.sql"),
    ),
    (
        14,
        "console",
        include_str!("../../../../migrations/postgres/0014_console.sql"),
    ),
];

impl SqlDatabase {
    /// Opens a pool of at most `max_connections` to `url`. A SQLite file is
    /// created when missing.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the URL is malformed or the database
    /// cannot be reached.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let acquire = Duration::from_secs(5);
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::Unavailable(format!("bad SQLite URL: {e}")))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(acquire)
                .connect_with(opts.clone())
                .await
                .map_err(map_err)?;
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            let off = std::env::var("PAYGATE_SQLITE_GROUP_COMMIT").is_ok_and(|v| v == "off");
            let writer = if in_memory || off {
                None
            } else {
                Some(SqliteWriter::start(opts).await?)
            };
            Ok(Self::Sqlite(SqliteDatabase { pool, writer }))
        } else {
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(acquire)
                .connect(url)
                .await
                .map_err(map_err)?;
            Ok(Self::Postgres(pool))
        }
    }

    /// Applies the pending migrations (`migrations/sqlite` or
    /// `migrations/postgres`, embedded in the binary) under sqlx's migration
    /// lock; safe to run from several processes.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when a migration fails.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let err = |e: sqlx::migrate::MigrateError| {
            StoreError::Unavailable(format!("migration failed: {e}"))
        };
        let migrations = match self {
            Self::Sqlite(_) => SQLITE_MIGRATIONS,
            Self::Postgres(_) => POSTGRES_MIGRATIONS,
        };
        let migrator = Migrator::new(EmbeddedMigrations(migrations))
            .await
            .map_err(err)?;
        with_pool!(self, pool => migrator.run(pool).await.map_err(err))
    }

    /// Checks that every migration this binary embeds is applied. A schema
    /// ahead of the binary (a newer binary's migrations, which only add) is
    /// accepted, so an old replica keeps serving through a rolling update.
    ///
    /// # Errors
    /// [`StoreError::Rejected`] naming the missing migrations (apply them
    /// with `paygate migrate`); [`StoreError::Unavailable`] when the
    /// database cannot be read.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let wanted = match self {
            Self::Sqlite(_) => SQLITE_MIGRATIONS,
            Self::Postgres(_) => POSTGRES_MIGRATIONS,
        };
        let sql = "SELECT version FROM _sqlx_migrations WHERE success";
        let applied: Vec<i64> = with_pool!(self, pool => {
            match sqlx::query_scalar::<_, i64>(sql).fetch_all(pool).await {
                Ok(v) => v,
                // No migrations table ("no such table" on SQLite, "does not
                // exist" on PostgreSQL): nothing was ever applied. Any other
                // refusal (a permission, a broken table) is reported as it is.
                Err(sqlx::Error::Database(e)) if e.message().contains("_sqlx_migrations") => {
                    Vec::new()
                }
                Err(e) => return Err(map_err(e)),
            }
        });
        let missing: Vec<String> = wanted
            .iter()
            .filter(|(v, _, _)| !applied.contains(v))
            .map(|(v, desc, _)| format!("{v:04} {desc}"))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Rejected(format!(
                "the {} schema lacks migrations {}; apply them with `paygate migrate`",
                self.backend(),
                missing.join(", ")
            )))
        }
    }

    /// Connects and readies the schema: applies the migrations
    /// ([`SchemaStep::Migrate`]) or checks they are applied
    /// ([`SchemaStep::Check`]), retrying the connection and the step with
    /// exponential backoff (0.2 s to 5 s) while `wait` lasts, so a process
    /// that starts while its database restarts, a connection terminated
    /// mid-step or a migration job still running do not fail it at once.
    ///
    /// # Errors
    /// The last [`StoreError`] once `wait` has passed.
    pub async fn open(
        url: &str,
        max_connections: u32,
        step: SchemaStep,
        wait: Duration,
    ) -> Result<Self, StoreError> {
        use backon::BackoffBuilder;
        let deadline = tokio::time::Instant::now() + wait;
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .build();
        loop {
            let attempt = async {
                let db = Self::connect(url, max_connections).await?;
                let ready = match step {
                    SchemaStep::Migrate => db.migrate().await,
                    SchemaStep::Check => db.check_schema().await,
                };
                match ready {
                    Ok(()) => Ok(db),
                    Err(e) => {
                        db.close().await;
                        Err(e)
                    }
                }
            };
            let e = match attempt.await {
                Ok(db) => return Ok(db),
                Err(e) => e,
            };
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            if tokio::time::Instant::now() + delay > deadline {
                return Err(e);
            }
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                "the SQL database is not ready; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// `SELECT 1`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()).map_err(map_err))
    }

    /// Closes the pool and, on SQLite, the group-commit writer (what it had
    /// queued is committed first); later calls fail with `Unavailable`.
    pub async fn close(&self) {
        if let Self::Sqlite(db) = self {
            if let Some(writer) = &db.writer {
                writer.close().await;
            }
        }
        with_pool!(self, pool => pool.close().await)
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// One row of the SQL request/response log (`api_logs`, DESIGN.md §3) as
/// it is inserted: the body already scrubbed and rendered as JSON text.
/// Crate `paygate-api-log` builds these; they live here so a row can be
/// written in the same transaction as a state change
/// ([`SqlStateStore::create_logged`], [`SqlStateStore::transition_logged`]).
#[derive(Clone, Debug)]
pub struct LogRow<'a> {
    /// `pay_...`.
    pub payment_id: &'a str,
    /// `card_api` or `ledger_api`.
    pub target: &'a str,
    /// `REQUEST`, `RESPONSE` or `ERROR`.
    pub kind: &'a str,
    /// Attempt number, from 1.
    pub attempt: i32,
    /// HTTP method.
    pub method: &'a str,
    /// Request path.
    pub path: &'a str,
    /// HTTP status of the answer.
    pub status_code: Option<i32>,
    /// Scrubbed JSON body, as text.
    pub body: Option<String>,
    /// Time from the request to this row, ms.
    pub latency_ms: Option<i64>,
    /// Written, epoch ms.
    pub created_at: i64,
}

impl LogRow<'_> {
    /// An owned copy, for a write queued to the SQLite writer.
    pub fn to_owned_row(&self) -> OwnedLogRow {
        OwnedLogRow {
            payment_id: self.payment_id.to_owned(),
            target: self.target.to_owned(),
            kind: self.kind.to_owned(),
            attempt: self.attempt,
            method: self.method.to_owned(),
            path: self.path.to_owned(),
            status_code: self.status_code,
            body: self.body.clone(),
            latency_ms: self.latency_ms,
            created_at: self.created_at,
        }
    }
}

/// A [`LogRow`] that owns its text (see [`LogRow::to_owned_row`]).
#[derive(Clone, Debug)]
pub struct OwnedLogRow {
    payment_id: String,
    target: String,
    kind: String,
    attempt: i32,
    method: String,
    path: String,
    status_code: Option<i32>,
    body: Option<String>,
    latency_ms: Option<i64>,
    created_at: i64,
}

impl OwnedLogRow {
    /// The row, borrowed.
    pub fn row(&self) -> LogRow<'_> {
        LogRow {
            payment_id: &self.payment_id,
            target: &self.target,
            kind: &self.kind,
            attempt: self.attempt,
            method: &self.method,
            path: &self.path,
            status_code: self.status_code,
            body: self.body.clone(),
            latency_ms: self.latency_ms,
            created_at: self.created_at,
        }
    }
}

impl SqlDatabase {
    /// Appends one row to `api_logs`, durably: the commit is done when this
    /// returns (on SQLite through the group-commit writer).
    ///
    /// # Errors
    /// [`StoreError`]; the caller must then not make the call the row logs.
    pub async fn append_log_row(&self, row: &LogRow<'_>) -> Result<(), StoreError> {
        let sql = log_insert_sql(self);
        match self {
            SqlDatabase::Sqlite(db) if db.writer().is_some() => {
                let row = row.to_owned_row();
                db.write(move |c| {
                    Box::pin(async move {
                        crate::bind_log_row!(sqlx::query(sql), row.row())
                            .execute(&mut *c)
                            .await
                            .map_err(map_err)?;
                        Ok(((), true))
                    })
                })
                .await
            }
            _ => with_pool!(self, pool => crate::bind_log_row!(sqlx::query(sql), row)
                .execute(pool)
                .await
                .map(|_| ())
                .map_err(map_err)),
        }
    }
}

/// The `INSERT` of one [`LogRow`] (`$1..$10` in the field order; the body
/// is `JSONB` on PostgreSQL, `TEXT` on SQLite).
pub fn log_insert_sql(db: &SqlDatabase) -> &'static str {
    match db {
        SqlDatabase::Sqlite(_) => {
            "INSERT INTO api_logs (payment_id, target, kind, attempt, method, path, status_code, body, latency_ms, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        }
        SqlDatabase::Postgres(_) => {
            "INSERT INTO api_logs (payment_id, target, kind, attempt, method, path, status_code, body, latency_ms, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, CAST($8 AS JSONB), $9, $10)"
        }
    }
}

/// Binds a [`LogRow`] to the query of [`log_insert_sql`] (expanded once per
/// backend inside [`with_pool!`](crate::with_pool)).
#[macro_export]
macro_rules! bind_log_row {
    ($q:expr, $row:expr) => {
        $q.bind($row.payment_id)
            .bind($row.target)
            .bind($row.kind)
            .bind($row.attempt)
            .bind($row.method)
            .bind($row.path)
            .bind($row.status_code)
            .bind($row.body.as_deref())
            .bind($row.latency_ms)
            .bind($row.created_at)
    };
}

/// The `INSERT` of one [`Event`](crate::events::Event) (`$1..$8`), a
/// no-op for an event already stored (its id is derived from what it is
/// about, so a second copy is the same event).
pub const EVENT_INSERT_SQL: &str =
    "INSERT INTO payment_events (event_id, merchant_id, payment_id, type, version, cancel_n, payload, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING";

/// Binds an [`Event`](crate::events::Event) to [`EVENT_INSERT_SQL`].
#[macro_export]
macro_rules! bind_event {
    ($q:expr, $e:expr) => {
        $q.bind($e.event_id.as_str())
            .bind($e.merchant_id.as_str())
            .bind($e.payment_id.as_str())
            .bind($e.event_type.as_str())
            .bind($e.version)
            .bind($e.cancel_n)
            .bind($e.payload.as_str())
            .bind($e.created_at)
    };
}

/// Columns of `payment_events` that make an [`Event`](crate::events::Event),
/// in the order [`event_from_row`] reads.
pub const EVENT_COLUMNS: &str =
    "event_id, merchant_id, payment_id, type, version, cancel_n, payload, created_at";

/// Decodes an [`Event`](crate::events::Event) from a `payment_events` row.
///
/// # Errors
/// [`StoreError::Corrupt`] when a column is missing, of the wrong type, or
/// the type is not one this build knows.
pub fn event_from_row<R: Row>(row: &R) -> Result<crate::events::Event, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let kind: String = row.try_get("type").map_err(c)?;
    Ok(crate::events::Event {
        event_id: row.try_get("event_id").map_err(c)?,
        merchant_id: MerchantId::from_stored(row.try_get::<String, _>("merchant_id").map_err(c)?),
        payment_id: PaymentId::from_stored(row.try_get::<String, _>("payment_id").map_err(c)?),
        event_type: crate::events::EventType::from_stored(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("event type {kind}")))?,
        version: row.try_get("version").map_err(c)?,
        cancel_n: row.try_get("cancel_n").map_err(c)?,
        payload: row.try_get("payload").map_err(c)?,
        created_at: row.try_get("created_at").map_err(c)?,
    })
}

/// Applies transition `t` to `payment_id` on connection `$c` (inside the
/// caller's transaction) and, when it applied and leaves an event, writes
/// that event with it; evaluates to `Result<bool, StoreError>`.
macro_rules! apply_transition {
    ($c:expr, $pid:expr, $now:expr, $t:expr) => {{
        async {
            let Some((sql, binds)) = transition_statement($t) else {
                return Ok(false);
            };
            if $t.event_type().is_none() {
                return Ok(bind_rule!(sqlx::query(&sql).bind($pid).bind($now), &binds)
                    .execute(&mut *$c)
                    .await
                    .map_err(map_err)?
                    .rows_affected()
                    == 1);
            }
            let sql = format!("{sql} RETURNING {RECORD_COLUMNS}");
            let Some(row) = bind_rule!(sqlx::query(&sql).bind($pid).bind($now), &binds)
                .fetch_optional(&mut *$c)
                .await
                .map_err(map_err)?
            else {
                return Ok(false);
            };
            let after = record_from_row(&row)?;
            if let Some(e) = $crate::events::payment_event($t, &after, $now) {
                $crate::bind_event!(sqlx::query(EVENT_INSERT_SQL), e)
                    .execute(&mut *$c)
                    .await
                    .map_err(map_err)?;
            }
            Ok::<bool, StoreError>(true)
        }
        .await
    }};
}

/// Columns of the three partition tables, in the order [`record_from_row`] reads.
pub const RECORD_COLUMNS: &str =
    "payment_id, merchant_id, order_id, payment_key, amount, currency, is_paid, \
     is_saved, card_status, approved_at, save_attempts, batch_attempts, failure_code, last_error, \
     request_fingerprint, idempotency_key, created_at, updated_at, version";

/// Decodes a [`PaymentRecord`] from a row of any partition table.
///
/// # Errors
/// [`StoreError::Corrupt`] when a column is missing or of the wrong type.
pub fn record_from_row<R: Row>(row: &R) -> Result<PaymentRecord, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(PaymentRecord {
        payment_id: PaymentId::from_stored(row.try_get::<String, _>("payment_id").map_err(c)?),
        merchant_id: MerchantId::from_stored(row.try_get::<String, _>("merchant_id").map_err(c)?),
        order_id: OrderId::from_stored(row.try_get::<String, _>("order_id").map_err(c)?),
        payment_key: row.try_get("payment_key").map_err(c)?,
        amount: row.try_get("amount").map_err(c)?,
        currency: row.try_get("currency").map_err(c)?,
        is_paid: row.try_get("is_paid").map_err(c)?,
        is_saved: row.try_get("is_saved").map_err(c)?,
        card_status: CardStatus::from_stored(&row.try_get::<String, _>("card_status").map_err(c)?),
        approved_at: row.try_get("approved_at").map_err(c)?,
        save_attempts: row.try_get("save_attempts").map_err(c)?,
        batch_attempts: row.try_get("batch_attempts").map_err(c)?,
        failure_code: row.try_get("failure_code").map_err(c)?,
        last_error: row.try_get("last_error").map_err(c)?,
        request_fingerprint: row.try_get("request_fingerprint").map_err(c)?,
        idempotency_key: row.try_get("idempotency_key").map_err(c)?,
        created_at: row.try_get("created_at").map_err(c)?,
        updated_at: row.try_get("updated_at").map_err(c)?,
        version: row.try_get("version").map_err(c)?,
    })
}

/// Decodes `(partition, record)` rows that carry the partition's name in
/// a `part` column.
pub(crate) fn decode_rows<R: Row>(rows: &[R]) -> Result<Vec<(Partition, PaymentRecord)>, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    rows.iter()
        .map(|row| {
            let part: String = row
                .try_get("part")
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok((partition_from(&part), record_from_row(row)?))
        })
        .collect()
}

fn partition_from(name: &str) -> Partition {
    match name {
        "completed" => Partition::Completed,
        "unpaid" => Partition::Unpaid,
        _ => Partition::Realtime,
    }
}

/// [`StateStore`] on the SQL database: the three partitions are tables with
/// the same columns, `payment_claims` holds the permanent
/// `(merchant, orderId)` and `(merchant, Idempotency-Key)` claims, and
/// `card_account_claims` the permanent `(card account, orderId)` and
/// `(card account, paymentKey)` claims (migration 0008).
#[derive(Clone, Debug)]
pub struct SqlStateStore {
    db: SqlDatabase,
    /// Stamps what this process writes (`updated_at`, a move's stamp).
    pub(crate) clock: paygate_core::Clock,
}

impl SqlStateStore {
    /// A store on `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self {
            db,
            clock: paygate_core::Clock::system(),
        }
    }

    /// The same store stamping by `clock` instead of the process clock.
    pub fn with_clock(mut self, clock: paygate_core::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The underlying database.
    pub fn database(&self) -> &SqlDatabase {
        &self.db
    }

    /// Streams the rows of `table` that satisfy `condition` (which may use
    /// `$3`, bound to `param`) in `payment_id` order, `batch_size` per round
    /// trip. Keyset paging: each page starts after the last id of the one
    /// before, so a page costs an index range scan and nothing is held
    /// across pages.
    fn scan_by_id(
        &self,
        table: &str,
        condition: &str,
        param: Option<i64>,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM {table} WHERE payment_id > $1 AND ({condition}) \
             ORDER BY payment_id LIMIT $2"
        );
        let limit = i64::from(batch_size.max(1));
        let pages = futures_util::stream::try_unfold(Some(String::new()), move |after| {
            let sql = sql.clone();
            async move {
                let Some(after) = after else { return Ok(None) };
                let page: Vec<PaymentRecord> = with_pool!(&self.db, pool => {
                    let mut q = sqlx::query(&sql).bind(&after).bind(limit);
                    if let Some(p) = param {
                        q = q.bind(p);
                    }
                    let rows = q.fetch_all(pool).await.map_err(map_err)?;
                    rows.iter().map(record_from_row).collect::<Result<Vec<_>, StoreError>>()?
                });
                let next = match page.last() {
                    Some(last) if page.len() as i64 == limit => Some(last.payment_id.to_string()),
                    _ => None,
                };
                if page.is_empty() {
                    return Ok(None);
                }
                Ok(Some((
                    futures_util::stream::iter(page.into_iter().map(Ok)),
                    next,
                )))
            }
        });
        Box::pin(pages.try_flatten())
    }

    async fn claimed_payment_id(
        &self,
        merchant_id: &MerchantId,
        column: &str,
        value: &str,
    ) -> Result<Option<PaymentId>, StoreError> {
        let sql = format!(
            "SELECT payment_id FROM payment_claims WHERE merchant_id = $1 AND {column} = $2"
        );
        with_pool!(&self.db, pool => {
            let row = sqlx::query(&sql)
                .bind(merchant_id.as_str())
                .bind(value)
                .fetch_optional(pool)
                .await
                .map_err(map_err)?;
            row.map(|r| r.try_get::<String, _>("payment_id").map(PaymentId::from_stored))
                .transpose()
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        })
    }

    /// Records in `partition` (for a progress bar's total; one `COUNT(*)`).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn count(&self, partition: Partition) -> Result<i64, StoreError> {
        let sql = format!("SELECT COUNT(*) AS n FROM {}", partition.table());
        with_pool!(&self.db, pool => {
            let row = sqlx::query(&sql).fetch_one(pool).await.map_err(map_err)?;
            row.try_get::<i64, _>("n").map_err(|e| StoreError::Corrupt(e.to_string()))
        })
    }

    /// Whether `(card account, kind, value)` is claimed, by whom.
    async fn account_claim_holder(
        &self,
        kind: &str,
        value: &str,
    ) -> Result<Option<PaymentId>, StoreError> {
        let sql = "SELECT payment_id FROM card_account_claims \
                   WHERE card_account = $1 AND kind = $2 AND value = $3";
        with_pool!(&self.db, pool => {
            let row = sqlx::query(sql)
                .bind(crate::DEFAULT_CARD_ACCOUNT)
                .bind(kind)
                .bind(value)
                .fetch_optional(pool)
                .await
                .map_err(map_err)?;
            row.map(|r| r.try_get::<String, _>("payment_id").map(PaymentId::from_stored))
                .transpose()
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        })
    }

    /// Which claim made a create of `r` roll back, in the order of
    /// [`StateStore::create`]'s doc: the merchant's idempotency key, the
    /// merchant's order, the account's orderId, the account's paymentKey.
    /// Claims are never deleted, so the claim seen taken is still taken.
    async fn conflict(&self, r: &PaymentRecord) -> Result<CreateOutcome, StoreError> {
        if let Some(key) = r.idempotency_key.as_deref() {
            if let Some(id) = self
                .claimed_payment_id(&r.merchant_id, "idempotency_key", key)
                .await?
            {
                if let Some(existing) = self.get_record(&id).await? {
                    return Ok(CreateOutcome::Exists(Box::new(existing)));
                }
            }
        }
        if let Some(id) = self
            .claimed_payment_id(&r.merchant_id, "order_id", r.order_id.as_str())
            .await?
        {
            return match self.get_record(&id).await? {
                Some(existing) => Ok(CreateOutcome::Exists(Box::new(existing))),
                None => Err(StoreError::Corrupt(format!("claim {id} has no record"))),
            };
        }
        if self
            .account_claim_holder(ORDER_ID, r.order_id.as_str())
            .await?
            .is_some()
        {
            return Ok(CreateOutcome::OrderIdInUse);
        }
        if self
            .account_claim_holder(PAYMENT_KEY, &r.payment_key)
            .await?
            .is_some()
        {
            return Ok(CreateOutcome::PaymentKeyReused);
        }
        Err(StoreError::Corrupt(
            "claim conflict without a claim".to_owned(),
        ))
    }

    /// [`StateStore::create`], and with `row` the card `REQUEST` row in the
    /// same transaction (one commit; see [`SqlStateStore::create_logged`]).
    async fn create_inner(
        &self,
        r: &PaymentRecord,
        row: Option<&LogRow<'_>>,
    ) -> Result<CreateOutcome, StoreError> {
        let claim = "INSERT INTO payment_claims (merchant_id, order_id, payment_id, idempotency_key, created_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";
        let account_claim = "INSERT INTO card_account_claims \
                     (card_account, kind, value, payment_id, merchant_id, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING";
        let insert = format!(
            "INSERT INTO realtime_payments ({RECORD_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
        );
        // All claims and the record in one transaction: any claim taken
        // already rolls the whole create back, so a record never lacks a
        // claim and a claim never lacks its record.
        let log_sql = log_insert_sql(&self.db);
        // The statements, on any connection `$c` inside a transaction;
        // `true` when every claim was taken and the record written.
        macro_rules! create_body {
            ($c:expr, $r:expr, $row:expr) => {{
                let r = $r;
                let mut claimed = sqlx::query(claim)
                    .bind(r.merchant_id.as_str())
                    .bind(r.order_id.as_str())
                    .bind(r.payment_id.as_str())
                    .bind(r.idempotency_key.as_deref())
                    .bind(r.created_at)
                    .execute(&mut *$c)
                    .await
                    .map_err(map_err)?
                    .rows_affected()
                    == 1;
                for (kind, value) in [
                    (ORDER_ID, r.order_id.as_str()),
                    (PAYMENT_KEY, r.payment_key.as_str()),
                ] {
                    if !claimed {
                        break;
                    }
                    claimed = sqlx::query(account_claim)
                        .bind(crate::DEFAULT_CARD_ACCOUNT)
                        .bind(kind)
                        .bind(value)
                        .bind(r.payment_id.as_str())
                        .bind(r.merchant_id.as_str())
                        .bind(r.created_at)
                        .execute(&mut *$c)
                        .await
                        .map_err(map_err)?
                        .rows_affected()
                        == 1;
                }
                if claimed {
                    sqlx::query(&insert)
                        .bind(r.payment_id.as_str())
                        .bind(r.merchant_id.as_str())
                        .bind(r.order_id.as_str())
                        .bind(&r.payment_key)
                        .bind(r.amount)
                        .bind(&r.currency)
                        .bind(r.is_paid)
                        .bind(r.is_saved)
                        .bind(r.card_status.as_str())
                        .bind(r.approved_at.as_deref())
                        .bind(r.save_attempts)
                        .bind(r.batch_attempts)
                        .bind(r.failure_code.as_deref())
                        .bind(r.last_error.as_deref())
                        .bind(&r.request_fingerprint)
                        .bind(r.idempotency_key.as_deref())
                        .bind(r.created_at)
                        .bind(r.updated_at)
                        .bind(r.version)
                        .execute(&mut *$c)
                        .await
                        .map_err(map_err)?;
                    if let Some(row) = $row {
                        bind_log_row!(sqlx::query(log_sql), row)
                            .execute(&mut *$c)
                            .await
                            .map_err(map_err)?;
                    }
                }
                claimed
            }};
        }
        let claimed = match &self.db {
            // Group commit: the claims, the record and the row share a
            // transaction with other confirms' writes (one fsync for all);
            // a claim taken rolls back this write's savepoint alone.
            SqlDatabase::Sqlite(db) if db.writer().is_some() => {
                let r = r.clone();
                let row = row.map(LogRow::to_owned_row);
                db.write(move |c| {
                    Box::pin(async move {
                        let claimed = create_body!(c, &r, row.as_ref().map(OwnedLogRow::row));
                        Ok((claimed, claimed))
                    })
                })
                .await?
            }
            _ => with_pool!(&self.db, pool => {
                let mut tx = pool.begin().await.map_err(map_err)?;
                let claimed = create_body!(tx, r, row);
                if claimed {
                    tx.commit().await.map_err(map_err)?;
                } else {
                    tx.rollback().await.map_err(map_err)?;
                }
                claimed
            }),
        };
        if claimed {
            return Ok(CreateOutcome::Created);
        }
        self.conflict(r).await
    }

    /// [`StateStore::create`] with the card `REQUEST` row of its first
    /// attempt in the same transaction: one commit for the record, its
    /// claims and the row (I3: the row is durable before the call). On
    /// error nothing was written; when a claim exists
    /// ([`CreateOutcome::Exists`]) the row is not written either.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn create_logged(
        &self,
        r: &PaymentRecord,
        row: &LogRow<'_>,
    ) -> Result<CreateOutcome, StoreError> {
        self.create_inner(r, Some(row)).await
    }

    /// Writes `answer` (a call's `RESPONSE`/`ERROR` row), applies the
    /// guarded transition `t` and, only when it applied, writes `next` (the
    /// `REQUEST` row of the call that follows), all in one transaction: one
    /// commit. The answer row is written whether or not the guard holds.
    /// `Ok(true)` when `t` applied.
    ///
    /// # Errors
    /// [`StoreError`]; then nothing was written (a commit whose answer
    /// was lost may have applied: callers re-read, as after any write).
    pub async fn transition_logged(
        &self,
        payment_id: &PaymentId,
        answer: &LogRow<'_>,
        t: &Transition,
        next: Option<&LogRow<'_>>,
    ) -> Result<bool, StoreError> {
        let log_sql = log_insert_sql(&self.db);
        let now = self.clock.now_ms();
        macro_rules! logged_body {
            ($c:expr, $pid:expr, $answer:expr, $t:expr, $next:expr) => {{
                bind_log_row!(sqlx::query(log_sql), $answer)
                    .execute(&mut *$c)
                    .await
                    .map_err(map_err)?;
                let applied = apply_transition!($c, $pid, now, $t)?;
                if let (true, Some(next)) = (applied, $next) {
                    bind_log_row!(sqlx::query(log_sql), next)
                        .execute(&mut *$c)
                        .await
                        .map_err(map_err)?;
                }
                applied
            }};
        }
        match &self.db {
            SqlDatabase::Sqlite(db) if db.writer().is_some() => {
                let pid = payment_id.as_str().to_owned();
                let answer = answer.to_owned_row();
                let t = t.clone();
                let next = next.map(LogRow::to_owned_row);
                db.write(move |c| {
                    Box::pin(async move {
                        let applied = logged_body!(
                            c,
                            pid.as_str(),
                            answer.row(),
                            &t,
                            next.as_ref().map(OwnedLogRow::row)
                        );
                        Ok((applied, true))
                    })
                })
                .await
            }
            _ => with_pool!(&self.db, pool => {
                let mut tx = pool.begin().await.map_err(map_err)?;
                let applied = logged_body!(tx, payment_id.as_str(), answer, t, next);
                tx.commit().await.map_err(map_err)?;
                Ok(applied)
            }),
        }
    }

    async fn get_record(
        &self,
        payment_id: &PaymentId,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        Ok(self.get(payment_id).await?.map(|(_, r)| r))
    }
}

/// `card_account_claims.kind` of an orderId claim.
const ORDER_ID: &str = "order_id";
/// `card_account_claims.kind` of a paymentKey claim.
const PAYMENT_KEY: &str = "payment_key";

#[async_trait::async_trait]
impl StateStore for SqlStateStore {
    async fn create(&self, r: &PaymentRecord) -> Result<CreateOutcome, StoreError> {
        self.create_inner(r, None).await
    }

    async fn get(
        &self,
        payment_id: &PaymentId,
    ) -> Result<Option<(Partition, PaymentRecord)>, StoreError> {
        let sql = get_sql();
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql).bind(payment_id.as_str()).fetch_all(pool).await.map_err(map_err)?;
            // A move writes the target (with a fresh updated_at) before
            // deleting the source; while both copies exist the newer is the truth.
            let copies = rows
                .iter()
                .map(|row| {
                    let part: String = row.try_get("part").map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    Ok((partition_from(&part), record_from_row(row)?))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(crate::newest_copy(copies))
        })
    }

    async fn get_by_order(
        &self,
        merchant_id: &MerchantId,
        order_id: &OrderId,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        match self
            .claimed_payment_id(merchant_id, "order_id", order_id.as_str())
            .await?
        {
            Some(id) => self.get_record(&id).await,
            None => Ok(None),
        }
    }

    async fn transition(&self, payment_id: &PaymentId, t: &Transition) -> Result<bool, StoreError> {
        let now = self.clock.now_ms();
        if let SqlDatabase::Sqlite(db) = &self.db {
            if db.writer().is_some() {
                let pid = payment_id.as_str().to_owned();
                let t = t.clone();
                return db
                    .write(move |c| {
                        Box::pin(async move {
                            let applied = apply_transition!(c, pid.as_str(), now, &t)?;
                            Ok((applied, true))
                        })
                    })
                    .await;
            }
        }
        with_pool!(&self.db, pool => {
            if t.event_type().is_none() {
                // One statement, no event: no transaction around it.
                let mut c = pool.acquire().await.map_err(map_err)?;
                return apply_transition!(c, payment_id.as_str(), now, t);
            }
            let mut tx = pool.begin().await.map_err(map_err)?;
            let applied = apply_transition!(tx, payment_id.as_str(), now, t)?;
            tx.commit().await.map_err(map_err)?;
            Ok(applied)
        })
    }

    async fn events_of(&self, payment_id: &PaymentId) -> Result<Vec<crate::Event>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM payment_events WHERE payment_id = $1 ORDER BY version, cancel_n"
        );
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql).bind(payment_id.as_str()).fetch_all(pool).await.map_err(map_err)?;
            rows.iter().map(event_from_row).collect()
        })
    }

    async fn move_record(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        if from == to {
            return Err(StoreError::Rejected(format!(
                "move of {payment_id} from {} to itself",
                from.table()
            )));
        }
        let now = self.clock.now_ms();
        match &self.db {
            // One statement: the guarded DELETE locks the row (a concurrent
            // UPDATE waits, then finds it gone; an UPDATE that committed first
            // is re-checked against the guard), and the INSERT writes exactly
            // the row it deleted. Two statements under READ COMMITTED would
            // let an update committed between them be deleted with the row.
            SqlDatabase::Postgres(pool) => sqlx::query(&move_sql_postgres(from, to))
                .bind(payment_id.as_str())
                .bind(now)
                .execute(pool)
                .await
                .map(|r| r.rows_affected() == 1)
                .map_err(map_err),
            // SQLite has one writer: the INSERT ... SELECT takes the write
            // lock before it reads, so no transition can land between the
            // guarded copy and the guarded delete of the same transaction.
            SqlDatabase::Sqlite(db) => {
                let copy = copy_sql(from, to, true);
                let delete = format!(
                    "DELETE FROM {} WHERE payment_id = $1 AND {}",
                    from.table(),
                    guard_sql(to)
                );
                let pid = payment_id.as_str().to_owned();
                db.write(move |c| {
                    Box::pin(async move {
                        let copied = sqlx::query(&copy)
                            .bind(pid.as_str())
                            .bind(now)
                            .execute(&mut *c)
                            .await
                            .map_err(map_err)?
                            .rows_affected();
                        let deleted = sqlx::query(&delete)
                            .bind(pid.as_str())
                            .execute(&mut *c)
                            .await
                            .map_err(map_err)?
                            .rows_affected();
                        if copied != deleted {
                            return Err(StoreError::Rejected(format!(
                                "move of {pid}: copied {copied} rows but deleted {deleted}"
                            )));
                        }
                        Ok((copied == 1, true))
                    })
                })
                .await
            }
        }
    }

    async fn move_settled(&self, cutoff_ms: i64, limit: u32) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        let limit = i64::from(limit);
        match &self.db {
            // One statement: the picked rows are locked (`SKIP LOCKED`: a
            // row a transition holds is left for the per-record pass), the
            // DELETE re-checks the guard on the row as it is now, and the
            // INSERT writes exactly the rows deleted.
            SqlDatabase::Postgres(pool) => sqlx::query(&settled_move_sql_postgres())
                .bind(cutoff_ms)
                .bind(limit)
                .bind(now)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
                .map_err(map_err),
            // SQLite has one writer: the INSERT ... SELECT takes the write
            // lock before it reads, so the DELETE's selection, run under the
            // same lock, picks the very rows the INSERT copied.
            SqlDatabase::Sqlite(db) => {
                let (copy, delete) = settled_move_sql_sqlite();
                db.write(move |c| {
                    Box::pin(async move {
                        let copied = sqlx::query(&copy)
                            .bind(cutoff_ms)
                            .bind(now)
                            .bind(limit)
                            .execute(&mut *c)
                            .await
                            .map_err(map_err)?
                            .rows_affected();
                        let deleted = sqlx::query(&delete)
                            .bind(cutoff_ms)
                            .bind(limit)
                            .execute(&mut *c)
                            .await
                            .map_err(map_err)?
                            .rows_affected();
                        if copied != deleted {
                            return Err(StoreError::Rejected(format!(
                                "set-based move: copied {copied} rows but deleted {deleted}"
                            )));
                        }
                        Ok((copied, true))
                    })
                })
                .await
            }
        }
    }

    async fn finish_move(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
        seen_version: i64,
    ) -> Result<bool, StoreError> {
        let delete = format!(
            "DELETE FROM {} WHERE payment_id = $1 AND version = $2 AND {}",
            from.table(),
            guard_sql(to)
        );
        let still_there = format!(
            "SELECT 1 AS one FROM {} WHERE payment_id = $1",
            from.table()
        );
        let take_back = format!(
            "DELETE FROM {} WHERE payment_id = $1 AND version = $2",
            to.table()
        );
        with_pool!(&self.db, pool => {
            let mut tx = pool.begin().await.map_err(map_err)?;
            let deleted = sqlx::query(&delete)
                .bind(payment_id.as_str()).bind(seen_version)
                .execute(&mut *tx).await.map_err(map_err)?.rows_affected();
            let done = if deleted == 1 {
                true
            } else if sqlx::query(&still_there).bind(payment_id.as_str())
                .fetch_optional(&mut *tx).await.map_err(map_err)?.is_some()
            {
                sqlx::query(&take_back)
                    .bind(payment_id.as_str()).bind(seen_version + 1)
                    .execute(&mut *tx).await.map_err(map_err)?;
                false
            } else {
                true
            };
            tx.commit().await.map_err(map_err)?;
            Ok(done)
        })
    }

    async fn copy_to_partition(
        &self,
        payment_id: &PaymentId,
        from: Partition,
        to: Partition,
    ) -> Result<bool, StoreError> {
        let copy = copy_sql(from, to, false);
        let now = self.clock.now_ms();
        with_pool!(&self.db, pool => sqlx::query(&copy)
            .bind(payment_id.as_str())
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
            .map_err(map_err))
    }

    fn scan(
        &self,
        partition: Partition,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        self.scan_by_id(partition.table(), "TRUE", None, batch_size)
    }

    fn scan_stale(
        &self,
        updated_before_ms: i64,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        // The filter runs in the database: the run reads the stale records,
        // not every record of the partition. Compiled from the one stale
        // predicate; its one parameter is the cutoff, `$3` after the
        // keyset's two.
        let mut binds = Binds::from(3);
        let stale_sql = crate::rules::sql::guard::<PaymentRecord>(
            &crate::stale_guard(updated_before_ms),
            &mut binds,
        );
        self.scan_by_id(
            Partition::Realtime.table(),
            &stale_sql,
            Some(updated_before_ms),
            batch_size,
        )
    }

    async fn find_by_order_ids(
        &self,
        order_ids: &[String],
    ) -> Result<Vec<(Partition, PaymentRecord)>, StoreError> {
        if order_ids.is_empty() {
            return Ok(Vec::new());
        }
        let copies = match &self.db {
            // One array parameter: one prepared statement whatever the chunk's
            // length, and an index scan on `order_id` (a list of hundreds of
            // `$n` made a new statement per length and cost a parse each).
            SqlDatabase::Postgres(pool) => {
                let sql = format!(
                    "SELECT 'realtime' AS part, {RECORD_COLUMNS} FROM realtime_payments WHERE order_id = ANY($1) \
                     UNION ALL SELECT 'completed' AS part, {RECORD_COLUMNS} FROM completed_payments WHERE order_id = ANY($1) \
                     UNION ALL SELECT 'unpaid' AS part, {RECORD_COLUMNS} FROM unpaid_payments WHERE order_id = ANY($1)"
                );
                let rows = sqlx::query(&sql)
                    .bind(order_ids)
                    .fetch_all(pool)
                    .await
                    .map_err(map_err)?;
                decode_rows(&rows)?
            }
            SqlDatabase::Sqlite(db) => {
                let placeholders: Vec<String> =
                    (1..=order_ids.len()).map(|i| format!("${i}")).collect();
                let list = placeholders.join(", ");
                let sql = format!(
                    "SELECT 'realtime' AS part, {RECORD_COLUMNS} FROM realtime_payments WHERE order_id IN ({list}) \
                     UNION ALL SELECT 'completed' AS part, {RECORD_COLUMNS} FROM completed_payments WHERE order_id IN ({list}) \
                     UNION ALL SELECT 'unpaid' AS part, {RECORD_COLUMNS} FROM unpaid_payments WHERE order_id IN ({list})"
                );
                let mut q = sqlx::query(&sql);
                for id in order_ids {
                    q = q.bind(id);
                }
                let rows = q.fetch_all(&db.pool).await.map_err(map_err)?;
                decode_rows(&rows)?
            }
        };
        Ok(crate::newest_copies(copies))
    }

    fn scan_created(
        &self,
        partition: Partition,
        from_ms: i64,
        to_ms: i64,
        batch_size: u32,
    ) -> BoxStream<'_, Result<PaymentRecord, StoreError>> {
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM {} \
             WHERE (created_at, payment_id) > ($1, $2) AND created_at < $3 \
             ORDER BY created_at, payment_id LIMIT $4",
            partition.table()
        );
        let limit = i64::from(batch_size.max(1));
        // Keyset paging on (created_at, payment_id), the index of migration 4.
        // The row-value comparison is what lets both databases start the
        // index range at the cursor; the equivalent `a > x OR (a = x AND
        // b > y)` made PostgreSQL filter from the range's start on every page.
        let start = Some((from_ms, String::new()));
        let pages = futures_util::stream::try_unfold(start, move |after| {
            let sql = sql.clone();
            async move {
                let Some((after_ms, after_id)) = after else {
                    return Ok(None);
                };
                let page: Vec<PaymentRecord> = with_pool!(&self.db, pool => {
                    let rows = sqlx::query(&sql).bind(after_ms).bind(&after_id).bind(to_ms).bind(limit)
                        .fetch_all(pool).await.map_err(map_err)?;
                    rows.iter().map(record_from_row).collect::<Result<Vec<_>, StoreError>>()?
                });
                let next = match page.last() {
                    Some(last) if page.len() as i64 == limit => {
                        Some((last.created_at, last.payment_id.to_string()))
                    }
                    _ => None,
                };
                if page.is_empty() {
                    return Ok(None);
                }
                Ok(Some((
                    futures_util::stream::iter(page.into_iter().map(Ok)),
                    next,
                )))
            }
        });
        Box::pin(pages.try_flatten())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await
    }
}

/// The SQL form of [`crate::may_enter`]: what a record must be to enter
/// `to`, compiled from [`crate::entry_guard`] (it takes no parameters).
fn guard_sql(to: Partition) -> String {
    crate::rules::sql::guard::<PaymentRecord>(&crate::entry_guard(to), &mut Binds::from(1))
}

/// The columns of [`RECORD_COLUMNS`], the `SELECT` list that stamps
/// `updated_at` with `$2`, and the `ON CONFLICT` update of every column.
fn move_columns() -> (String, String, String) {
    let cols: Vec<&str> = RECORD_COLUMNS.split(',').map(str::trim).collect();
    let select: Vec<&str> = cols
        .iter()
        .map(|c| match *c {
            "updated_at" => "$2",
            // A move is a change of the record: the copy it writes is one
            // version on from the row it read.
            "version" => "version + 1",
            c => c,
        })
        .collect();
    let updates: Vec<String> = cols
        .iter()
        .filter(|c| **c != "payment_id")
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    (cols.join(", "), select.join(", "), updates.join(", "))
}

/// `INSERT INTO <to> SELECT ... FROM <from>` for one record, replacing a copy
/// already in `to` (left by an interrupted move). `$1` = payment_id, `$2` =
/// now (the copy's `updated_at`, which makes it the newer one). With
/// `guarded`, only a record that may enter `to` is copied.
fn copy_sql(from: Partition, to: Partition, guarded: bool) -> String {
    let (cols, select, updates) = move_columns();
    let guard = if guarded {
        guard_sql(to)
    } else {
        "TRUE".to_owned()
    };
    format!(
        "INSERT INTO {to} ({cols}) SELECT {select} FROM {from} WHERE payment_id = $1 AND {guard} \
         ON CONFLICT (payment_id) DO UPDATE SET {updates}",
        to = to.table(),
        from = from.table(),
    )
}

/// The selection of [`StateStore::move_settled`]: `$1` = cutoff (epoch
/// ms), `$limit` = the chunk size.
fn settled_pick_sql(limit: &str) -> String {
    format!(
        "SELECT payment_id FROM realtime_payments WHERE {guard} AND updated_at <= $1 \
         ORDER BY payment_id LIMIT {limit}",
        guard = guard_sql(Partition::Completed),
    )
}

/// PostgreSQL's one-statement set-based move to `completed_payments`:
/// `$1` = cutoff, `$2` = limit, `$3` = now (the copies' `updated_at`).
fn settled_move_sql_postgres() -> String {
    let (cols, select, updates) = move_columns();
    let select = select.replace("$2", "$3");
    format!(
        "WITH picked AS ({pick} FOR UPDATE SKIP LOCKED), \
         moved AS (DELETE FROM realtime_payments WHERE payment_id IN (SELECT payment_id FROM picked) \
         AND {guard} AND updated_at <= $1 RETURNING {cols}) \
         INSERT INTO completed_payments ({cols}) SELECT {select} FROM moved \
         ON CONFLICT (payment_id) DO UPDATE SET {updates}",
        pick = settled_pick_sql("$2"),
        guard = guard_sql(Partition::Completed),
    )
}

/// SQLite's set-based move, two statements for one transaction: the copy
/// (`$1` = cutoff, `$2` = now, `$3` = limit) and the delete (`$1` =
/// cutoff, `$2` = limit) of the same selection.
fn settled_move_sql_sqlite() -> (String, String) {
    let (cols, select, updates) = move_columns();
    let copy = format!(
        "INSERT INTO completed_payments ({cols}) SELECT {select} FROM realtime_payments \
         WHERE payment_id IN ({pick}) ON CONFLICT (payment_id) DO UPDATE SET {updates}",
        pick = settled_pick_sql("$3"),
    );
    let delete = format!(
        "DELETE FROM realtime_payments WHERE payment_id IN ({pick})",
        pick = settled_pick_sql("$2"),
    );
    (copy, delete)
}

/// PostgreSQL's one-statement guarded move: delete the row if it may enter
/// `to`, and insert exactly what was deleted. `$1` = payment_id, `$2` = now.
fn move_sql_postgres(from: Partition, to: Partition) -> String {
    let (cols, select, updates) = move_columns();
    format!(
        "WITH moved AS (DELETE FROM {from} WHERE payment_id = $1 AND {guard} RETURNING {cols}) \
         INSERT INTO {to} ({cols}) SELECT {select} FROM moved \
         ON CONFLICT (payment_id) DO UPDATE SET {updates}",
        to = to.table(),
        from = from.table(),
        guard = guard_sql(to),
    )
}

/// Every copy of one record (`$1` = payment_id) with its partition's name
/// in `part`; [`crate::newest_copy`] picks the one to believe.
pub(crate) fn get_sql() -> String {
    format!(
        "SELECT 'realtime' AS part, {RECORD_COLUMNS} FROM realtime_payments WHERE payment_id = $1 \
         UNION ALL SELECT 'completed' AS part, {RECORD_COLUMNS} FROM completed_payments WHERE payment_id = $1 \
         UNION ALL SELECT 'unpaid' AS part, {RECORD_COLUMNS} FROM unpaid_payments WHERE payment_id = $1"
    )
}

/// The guarded `UPDATE` of a [`Transition`], compiled from its rule, and
/// its parameters: `$1` = payment_id, `$2` = now, `$3..` = the rule's.
/// `None` when the transition can never apply (a `Reopen` of a code that
/// is not a no-call code).
fn transition_statement(t: &Transition) -> Option<(String, Vec<Bind>)> {
    let (set, guard, binds) = t.rule()?.to_sql::<PaymentRecord>("$2", 3);
    Some((
        format!("UPDATE realtime_payments SET {set} WHERE payment_id = $1 AND {guard}"),
        binds,
    ))
}
