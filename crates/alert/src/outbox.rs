//! The alert outbox in the SQL database (`alert_outbox`): an alert is
//! written here before anything tries to send it, so no alert is lost to a
//! crash, a Discord outage or a missing webhook.

use paygate_state_store::{sql::map_err, with_pool, SqlDatabase, StoreError};
use serde_json::Value;
use sqlx::Row;

use crate::Alert;

/// One unsent alert.
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

    /// Up to `limit` unsent alerts, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn unsent(&self, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
        self.rows("WHERE sent_at IS NULL ORDER BY id LIMIT $1", Some(limit))
            .await
    }

    /// Every alert, sent or not, oldest first (for tests and operators).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn all(&self) -> Result<Vec<OutboxRow>, StoreError> {
        self.rows("ORDER BY id", None).await
    }

    async fn rows(&self, tail: &str, limit: Option<i64>) -> Result<Vec<OutboxRow>, StoreError> {
        let sql =
            format!("SELECT id, dedup_key, payload, attempts, sent_at FROM alert_outbox {tail}");
        let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        with_pool!(&self.db, pool => {
            let mut q = sqlx::query(&sql);
            if let Some(l) = limit {
                q = q.bind(l);
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

    /// Alerts not yet delivered.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn unsent_count(&self) -> Result<i64, StoreError> {
        with_pool!(&self.db, pool => {
            let row = sqlx::query("SELECT COUNT(*) AS n FROM alert_outbox WHERE sent_at IS NULL")
                .fetch_one(pool)
                .await
                .map_err(map_err)?;
            row.try_get::<i64, _>("n").map_err(|e| StoreError::Corrupt(e.to_string()))
        })
    }
}
