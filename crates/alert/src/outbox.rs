//! The alert outbox in the SQL database (`alert_outbox`): an alert is
//! written here before anything tries to send it, so no alert is lost to a
//! crash, a Discord outage or a missing webhook.
//!
//! A row is *pending* (unsent, to be sent by the next flush), *parked*
//! (unsent, refused for good by Discord: not sent again until an operator
//! un-parks it with [`SqlOutbox::unpark`]) or *sent*.

use paygate_state_store::{sql::map_err, with_pool, SqlDatabase, StoreError};
use serde_json::Value;
use sqlx::Row;

use crate::Alert;

/// One alert of the outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRow {
    /// Row id (send order).
    pub id: i64,
    /// `payment_id:reason`.
    pub dedup_key: String,
    /// The Discord webhook body.
    pub payload: Value,
    /// Failed sends so far.
    pub attempts: i32,
    /// Sent, epoch ms.
    pub sent_at: Option<i64>,
    /// Parked (refused for good, not sent again until un-parked), epoch ms.
    pub parked_at: Option<i64>,
    /// Why the last send failed (Discord's refusal for a parked row).
    pub last_error: Option<String>,
}

/// Which rows [`SqlOutbox::list`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// Unsent and not parked: what the next flush sends.
    Pending,
    /// Refused for good by Discord, waiting for an operator.
    Parked,
    /// Every row not delivered: pending and parked.
    Unsent,
    /// Every row.
    All,
}

impl Listing {
    fn filter(self) -> &'static str {
        match self {
            Self::Pending => "WHERE sent_at IS NULL AND parked_at IS NULL",
            Self::Parked => "WHERE sent_at IS NULL AND parked_at IS NOT NULL",
            Self::Unsent => "WHERE sent_at IS NULL",
            Self::All => "",
        }
    }
}

/// The outbox on the SQL database.
#[derive(Clone, Debug)]
pub struct SqlOutbox {
    db: SqlDatabase,
}

impl SqlOutbox {
    /// The outbox on `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Writes an alert unless one with its dedup key exists; `Ok(true)` when
    /// it is new.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn enqueue(&self, alert: &Alert, payload: &Value) -> Result<bool, StoreError> {
        let sql = "INSERT INTO alert_outbox (dedup_key, reason, payment_id, payload, created_at, attempts) \
                   VALUES ($1, $2, $3, $4, $5, 0) ON CONFLICT (dedup_key) DO NOTHING";
        with_pool!(&self.db, pool => sqlx::query(sql)
            .bind(alert.dedup_key())
            .bind(alert.reason.as_str())
            .bind(&alert.payment_id)
            .bind(payload.to_string())
            .bind(paygate_core::time::now_ms())
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
            .map_err(map_err))
    }

    /// Up to `limit` pending alerts (unsent, not parked), oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn unsent(&self, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
        self.list(Listing::Pending, limit).await
    }

    /// Up to `limit` pending alerts with an id above `after`, oldest first:
    /// a flush walks the outbox with it, so that no row is read twice in one
    /// flush whatever happens to it.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn pending_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.rows(
            "WHERE sent_at IS NULL AND parked_at IS NULL AND id > $1 ORDER BY id LIMIT $2",
            &[after, limit],
        )
        .await
    }

    /// Up to `limit` rows of `which`, oldest first (for operators: `paygate
    /// alerts list --parked` is [`Listing::Parked`]).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn list(&self, which: Listing, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
        let tail = format!("{} ORDER BY id LIMIT $1", which.filter());
        self.rows(&tail, &[limit]).await
    }

    /// Every alert, sent or not, oldest first (for tests and operators).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn all(&self) -> Result<Vec<OutboxRow>, StoreError> {
        self.rows("ORDER BY id", &[]).await
    }

    /// Rows selected by `tail`, with `binds` bound to `$1`, `$2`, ... in order.
    async fn rows(&self, tail: &str, binds: &[i64]) -> Result<Vec<OutboxRow>, StoreError> {
        let sql = format!(
            "SELECT id, dedup_key, payload, attempts, sent_at, parked_at, last_error FROM alert_outbox {tail}"
        );
        let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        with_pool!(&self.db, pool => {
            let mut q = sqlx::query(&sql);
            for b in binds {
                q = q.bind(*b);
            }
            let rows = q.fetch_all(pool).await.map_err(map_err)?;
            rows.iter()
                .map(|r| {
                    let payload: String = r.try_get("payload").map_err(c)?;
                    Ok(OutboxRow {
                        id: r.try_get("id").map_err(c)?,
                        dedup_key: r.try_get("dedup_key").map_err(c)?,
                        payload: serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        attempts: r.try_get("attempts").map_err(c)?,
                        sent_at: r.try_get("sent_at").map_err(c)?,
                        parked_at: r.try_get("parked_at").map_err(c)?,
                        last_error: r.try_get("last_error").map_err(c)?,
                    })
                })
                .collect()
        })
    }

    /// Marks an alert delivered.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn mark_sent(&self, id: i64) -> Result<(), StoreError> {
        let sql = "UPDATE alert_outbox SET sent_at = $2, last_error = NULL WHERE id = $1";
        with_pool!(&self.db, pool => sqlx::query(sql).bind(id).bind(paygate_core::time::now_ms()).execute(pool).await.map(|_| ()).map_err(map_err))
    }

    /// Counts a failed send.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn record_failure(&self, id: i64, error: &str) -> Result<(), StoreError> {
        let sql = "UPDATE alert_outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1";
        with_pool!(&self.db, pool => sqlx::query(sql).bind(id).bind(error).execute(pool).await.map(|_| ()).map_err(map_err))
    }

    /// Parks an alert Discord refused for good: it keeps `error` as its
    /// `last_error` and is not sent again until [`SqlOutbox::unpark`].
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn park(&self, id: i64, error: &str) -> Result<(), StoreError> {
        let sql =
            "UPDATE alert_outbox SET attempts = attempts + 1, last_error = $2, parked_at = $3 \
                   WHERE id = $1 AND sent_at IS NULL";
        with_pool!(&self.db, pool => sqlx::query(sql).bind(id).bind(error).bind(paygate_core::time::now_ms()).execute(pool).await.map(|_| ()).map_err(map_err))
    }

    /// Un-parks a parked alert so that the next flush sends it again (after
    /// the operator fixed the cause: the webhook's token, say). `Ok(false)`
    /// when `id` is not a parked, unsent alert. `last_error` is kept.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn unpark(&self, id: i64) -> Result<bool, StoreError> {
        let sql = "UPDATE alert_outbox SET parked_at = NULL \
                   WHERE id = $1 AND sent_at IS NULL AND parked_at IS NOT NULL";
        with_pool!(&self.db, pool => sqlx::query(sql).bind(id).execute(pool).await.map(|r| r.rows_affected() == 1).map_err(map_err))
    }

    /// Un-parks every parked alert (after a fix that concerns them all, such
    /// as a new webhook token); returns how many.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn unpark_all(&self) -> Result<u64, StoreError> {
        let sql = "UPDATE alert_outbox SET parked_at = NULL \
                   WHERE sent_at IS NULL AND parked_at IS NOT NULL";
        with_pool!(&self.db, pool => sqlx::query(sql).execute(pool).await.map(|r| r.rows_affected()).map_err(map_err))
    }

    /// Alerts waiting to be sent: unsent and not parked.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn unsent_count(&self) -> Result<i64, StoreError> {
        self.count(Listing::Pending).await
    }

    /// Alerts parked (refused for good by Discord, waiting for an operator).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn parked_count(&self) -> Result<i64, StoreError> {
        self.count(Listing::Parked).await
    }

    /// Rows of `which`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn count(&self, which: Listing) -> Result<i64, StoreError> {
        let sql = format!("SELECT COUNT(*) AS n FROM alert_outbox {}", which.filter());
        with_pool!(&self.db, pool => {
            let row = sqlx::query(&sql)
                .fetch_one(pool)
                .await
                .map_err(map_err)?;
            row.try_get::<i64, _>("n").map_err(|e| StoreError::Corrupt(e.to_string()))
        })
    }
}
