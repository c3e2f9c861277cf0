//! The SQL side of events (`payment_events`, `webhook_endpoints`,
//! migration 0013): relay, numbering, the merchant's catch-up list, and
//! each delivery's state. Every change of a delivery is guarded on what
//! its writer read (`next_at` for a take, `delivery = 'pending'` for an
//! outcome), so a replica that stalled and carries on cannot undo another's
//! record of a delivery.

use paygate_core::MerchantId;
use paygate_state_store::{
    bind_event,
    sql::{event_from_row, map_err, EVENT_COLUMNS, EVENT_INSERT_SQL},
    with_pool, Event, SqlDatabase, StateStore, StoreError,
};
use sqlx::Row;

/// Events numbered per [`EventStore::number`] pass, and relayed per round.
pub const BATCH: u32 = 500;

/// The advisory lock that lets one numbering transaction run at a time on
/// PostgreSQL (SQLite has one writer anyway).
const NUMBERING_LOCK: i64 = 0x7061_7967_6174_6531; // "paygate1"

/// An event with its place in the merchant's stream and its delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    /// The event.
    pub event: Event,
    /// Its number (`GET /v1/events?after=` cursor); 0 before numbering.
    pub seq: i64,
    /// `pending`, `delivered`, `failed` or `no_endpoint`.
    pub delivery: String,
    /// Delivery tries so far.
    pub attempts: i64,
    /// When a worker may take it next (epoch ms).
    pub next_at: i64,
    /// The endpoint's last HTTP status, if it answered.
    pub last_status: Option<i64>,
    /// Why the last try failed (for operators; never the endpoint's body).
    pub last_error: Option<String>,
}

const ROW_COLUMNS: &str = "seq, delivery, attempts, next_at, last_status, last_error";

fn row_from<R: Row>(row: &R) -> Result<EventRow, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(EventRow {
        event: event_from_row(row)?,
        seq: row
            .try_get::<Option<i64>, _>("seq")
            .map_err(c)?
            .unwrap_or(0),
        delivery: row.try_get("delivery").map_err(c)?,
        attempts: i64::from(row.try_get::<i32, _>("attempts").map_err(c)?),
        next_at: row.try_get("next_at").map_err(c)?,
        last_status: row
            .try_get::<Option<i32>, _>("last_status")
            .map_err(c)?
            .map(i64::from),
        last_error: row.try_get("last_error").map_err(c)?,
    })
}

/// A merchant's endpoint as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL events are posted to.
    pub url: String,
    /// The signing secret, sealed (see [`crate::secrets`]).
    pub secret_sealed: String,
}

/// `payment_events` and `webhook_endpoints` on the SQL database.
#[derive(Clone, Debug)]
pub struct EventStore {
    db: SqlDatabase,
}

impl EventStore {
    /// Over `db` (migrated to 0013).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Copies the state store's outbox events into `payment_events`
    /// (idempotently), then has the state store forget them. Returns how
    /// many were relayed. A no-op for SQL state stores.
    ///
    /// # Errors
    /// [`StoreError`]; what was inserted stays, and is forgotten later.
    pub async fn relay(&self, state: &dyn StateStore) -> Result<u64, StoreError> {
        let mut relayed = 0;
        loop {
            let events = state.pending_events(BATCH).await?;
            if events.is_empty() {
                return Ok(relayed);
            }
            with_pool!(&self.db, pool => {
                let mut tx = pool.begin().await.map_err(map_err)?;
                for e in &events {
                    bind_event!(sqlx::query(EVENT_INSERT_SQL), e)
                        .execute(&mut *tx)
                        .await
                        .map_err(map_err)?;
                }
                tx.commit().await.map_err(map_err)?;
            });
            state.forget_events(&events).await?;
            relayed += events.len() as u64;
            if events.len() < BATCH as usize {
                return Ok(relayed);
            }
        }
    }

    /// Numbers up to [`BATCH`] new events, one transaction at a time (see
    /// the migration): each gets a `seq` above every committed one, in
    /// `(version, cancel_n)` order within its payment, and its delivery
    /// becomes `pending` when its merchant has an endpoint, else
    /// `no_endpoint`. Returns how many were numbered.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn number(&self) -> Result<u64, StoreError> {
        let sql = format!(
            "WITH base AS (SELECT COALESCE(MAX(seq), 0) AS b FROM payment_events), \
             picked AS (SELECT event_id, ROW_NUMBER() OVER (ORDER BY payment_id, version, cancel_n) AS rn \
                        FROM (SELECT event_id, payment_id, version, cancel_n FROM payment_events \
                              WHERE seq IS NULL ORDER BY payment_id, version, cancel_n LIMIT {BATCH}) AS p) \
             UPDATE payment_events SET seq = (SELECT b FROM base) + picked.rn, \
                 delivery = CASE WHEN EXISTS (SELECT 1 FROM webhook_endpoints w \
                                              WHERE w.merchant_id = payment_events.merchant_id) \
                            THEN 'pending' ELSE 'no_endpoint' END \
             FROM picked WHERE payment_events.event_id = picked.event_id"
        );
        match &self.db {
            SqlDatabase::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(map_err)?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(NUMBERING_LOCK)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                let n = sqlx::query(&sql)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?
                    .rows_affected();
                tx.commit().await.map_err(map_err)?;
                Ok(n)
            }
            SqlDatabase::Sqlite(db) => sqlx::query(&sql)
                .execute(&db.pool)
                .await
                .map(|r| r.rows_affected())
                .map_err(map_err),
        }
    }

    /// Numbers everything waiting (see [`EventStore::number`]).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn number_all(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let n = self.number().await?;
            total += n;
            if n < u64::from(BATCH) {
                return Ok(total);
            }
        }
    }

    /// The merchant's numbered events after `after`, oldest first, at most
    /// `limit`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn list_after(
        &self,
        merchant_id: &MerchantId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, {ROW_COLUMNS} FROM payment_events \
             WHERE merchant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        );
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql)
                .bind(merchant_id.as_str())
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err(map_err)?;
            rows.iter().map(row_from).collect()
        })
    }

    /// Events for operators: newest first, optionally one merchant's or
    /// one delivery state's, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn list(
        &self,
        merchant_id: Option<&MerchantId>,
        delivery: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, {ROW_COLUMNS} FROM payment_events \
             WHERE ($1 IS NULL OR merchant_id = $1) AND ($2 IS NULL OR delivery = $2) \
             ORDER BY seq IS NULL DESC, seq DESC, created_at DESC LIMIT $3"
        );
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql)
                .bind(merchant_id.map(MerchantId::as_str))
                .bind(delivery)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err(map_err)?;
            rows.iter().map(row_from).collect()
        })
    }

    /// One payment's events with their delivery state, in `(version,
    /// cancel_n)` order (the console's timeline).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn for_payment(&self, payment_id: &str) -> Result<Vec<EventRow>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, {ROW_COLUMNS} FROM payment_events \
             WHERE payment_id = $1 ORDER BY version, cancel_n"
        );
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql)
                .bind(payment_id)
                .fetch_all(pool)
                .await
                .map_err(map_err)?;
            rows.iter().map(row_from).collect()
        })
    }

    /// Pending events due at `now_ms` (epoch ms), oldest first, at most
    /// `limit`: each the first undelivered event of its payment, so a
    /// payment's events go out in order.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn due(&self, now_ms: i64, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, {ROW_COLUMNS} FROM payment_events e \
             WHERE delivery = 'pending' AND seq IS NOT NULL AND next_at <= $1 \
             AND NOT EXISTS (SELECT 1 FROM payment_events b WHERE b.payment_id = e.payment_id \
                             AND b.delivery = 'pending' AND b.seq < e.seq) \
             ORDER BY seq LIMIT $2"
        );
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql)
                .bind(now_ms)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err(map_err)?;
            rows.iter().map(row_from).collect()
        })
    }

    /// Takes a due event for one try: a compare-and-set on the `next_at`
    /// read, moving it to `lease_until` (epoch ms). `Ok(false)` when
    /// another worker took it first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn take(
        &self,
        event_id: &str,
        seen_next_at: i64,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        with_pool!(&self.db, pool => sqlx::query(
            "UPDATE payment_events SET next_at = $3, attempts = attempts + 1 \
             WHERE event_id = $1 AND next_at = $2 AND delivery = 'pending'",
        )
        .bind(event_id)
        .bind(seen_next_at)
        .bind(lease_until)
        .execute(pool)
        .await
        .map(|r| r.rows_affected() == 1)
        .map_err(map_err))
    }

    /// Records a try's outcome: `delivered`, `failed` (given up) or
    /// `pending` again at `next_at`. Guarded on the lease the try's take
    /// wrote (`lease_until`): a worker that stalled past its lease, while
    /// another took the event (or an operator resent it), changes nothing,
    /// and the other's try decides. `Ok(false)` then.
    ///
    /// # Errors
    /// [`StoreError`].
    #[allow(clippy::too_many_arguments)]
    pub async fn record(
        &self,
        event_id: &str,
        lease_until: i64,
        delivery: &str,
        next_at: i64,
        status: Option<u16>,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let delivered_at = (delivery == "delivered").then_some(now_ms);
        with_pool!(&self.db, pool => sqlx::query(
            "UPDATE payment_events SET delivery = $2, next_at = $3, last_status = $4, \
             last_error = $5, delivered_at = COALESCE($6, delivered_at) \
             WHERE event_id = $1 AND delivery = 'pending' AND next_at = $7",
        )
        .bind(event_id)
        .bind(delivery)
        .bind(next_at)
        .bind(status.map(i32::from))
        .bind(error)
        .bind(delivered_at)
        .bind(lease_until)
        .execute(pool)
        .await
        .map(|r| r.rows_affected() == 1)
        .map_err(map_err))
    }

    /// Puts a numbered event back to be delivered now (an operator's
    /// resend); `Ok(false)` when there is no such numbered event.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn resend(&self, event_id: &str) -> Result<bool, StoreError> {
        with_pool!(&self.db, pool => sqlx::query(
            "UPDATE payment_events SET delivery = 'pending', next_at = 0, attempts = 0, \
             last_error = NULL WHERE event_id = $1 AND seq IS NOT NULL",
        )
        .bind(event_id)
        .execute(pool)
        .await
        .map(|r| r.rows_affected() == 1)
        .map_err(map_err))
    }

    /// Events not numbered yet and events pending delivery (for metrics).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn backlog(&self) -> Result<(i64, i64), StoreError> {
        with_pool!(&self.db, pool => {
            let row = sqlx::query(
                "SELECT (SELECT COUNT(*) FROM payment_events WHERE seq IS NULL) AS unnumbered, \
                        (SELECT COUNT(*) FROM payment_events WHERE delivery = 'pending' AND seq IS NOT NULL) AS pending",
            )
            .fetch_one(pool)
            .await
            .map_err(map_err)?;
            let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            Ok((row.try_get("unnumbered").map_err(c)?, row.try_get("pending").map_err(c)?))
        })
    }

    /// Registers (or replaces) the merchant's endpoint.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn put_endpoint(
        &self,
        merchant_id: &MerchantId,
        endpoint: &Endpoint,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        with_pool!(&self.db, pool => sqlx::query(
            "INSERT INTO webhook_endpoints (merchant_id, url, secret_sealed, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (merchant_id) DO UPDATE \
             SET url = excluded.url, secret_sealed = excluded.secret_sealed, updated_at = excluded.updated_at",
        )
        .bind(merchant_id.as_str())
        .bind(&endpoint.url)
        .bind(&endpoint.secret_sealed)
        .bind(now_ms)
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(map_err))
    }

    /// The merchant's endpoint, if any.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn endpoint(&self, merchant_id: &MerchantId) -> Result<Option<Endpoint>, StoreError> {
        with_pool!(&self.db, pool => {
            let row = sqlx::query("SELECT url, secret_sealed FROM webhook_endpoints WHERE merchant_id = $1")
                .bind(merchant_id.as_str())
                .fetch_optional(pool)
                .await
                .map_err(map_err)?;
            row.map(|r| {
                let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
                Ok(Endpoint {
                    url: r.try_get("url").map_err(c)?,
                    secret_sealed: r.try_get("secret_sealed").map_err(c)?,
                })
            })
            .transpose()
        })
    }
}
