//! The operators' audit (`payment_resolutions`, migration 0007): one row per
//! decision an operator made by hand about a payment (`paygate payments
//! resolve`): who, when, the record before and after, the reason, and what
//! the card company's lookup said at the time.
//!
//! Append-only: this type has no update or delete, and the database refuses
//! both (a trigger on each backend), so not even `paygate prune` can remove
//! a row.

use paygate_state_store::{sql::map_err, with_pool, SqlDatabase, StoreError};
use sqlx::Row;

/// A decision to record.
#[derive(Clone, Debug, PartialEq)]
pub struct NewResolution {
    /// The payment decided on.
    pub payment_id: String,
    /// What was decided: `approved` or `not_charged`.
    pub action: String,
    /// Who decided (`--operator`).
    pub operator: String,
    /// Why (`--reason`), as the operator wrote it.
    pub reason: String,
    /// Taken with `--force` against the card company's answer.
    pub forced: bool,
    /// What the card company's lookup said when the decision was taken.
    pub card_evidence: String,
    /// The record before (JSON).
    pub before: serde_json::Value,
    /// The record after (JSON).
    pub after: serde_json::Value,
}

/// A stored decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    /// Row id.
    pub id: i64,
    /// Written, epoch ms.
    pub created_at: i64,
    /// What was recorded.
    pub entry: NewResolution,
}

/// The audit table on the SQL database.
#[derive(Clone, Debug)]
pub struct ResolutionLog {
    db: SqlDatabase,
}

const COLUMNS: &str = "id, payment_id, action, operator, reason, forced, card_evidence, \
                       before_state, after_state, created_at";

impl ResolutionLog {
    /// The audit on `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Appends one decision durably; returns its id.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn append(&self, r: &NewResolution) -> Result<i64, StoreError> {
        let sql = "INSERT INTO payment_resolutions (payment_id, action, operator, reason, forced, \
                   card_evidence, before_state, after_state, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id";
        let now = paygate_core::time::now_ms();
        with_pool!(&self.db, pool => {
            let row = sqlx::query(sql)
                .bind(&r.payment_id)
                .bind(&r.action)
                .bind(&r.operator)
                .bind(&r.reason)
                .bind(r.forced)
                .bind(&r.card_evidence)
                .bind(r.before.to_string())
                .bind(r.after.to_string())
                .bind(now)
                .fetch_one(pool)
                .await
                .map_err(map_err)?;
            row.try_get::<i64, _>("id").map_err(|e| StoreError::Corrupt(e.to_string()))
        })
    }

    /// Every decision about `payment_id`, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn for_payment(&self, payment_id: &str) -> Result<Vec<Resolution>, StoreError> {
        let sql =
            format!("SELECT {COLUMNS} FROM payment_resolutions WHERE payment_id = $1 ORDER BY id");
        let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        let json =
            |s: String| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(e.to_string()));
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql).bind(payment_id).fetch_all(pool).await.map_err(map_err)?;
            rows.iter()
                .map(|r| {
                    Ok(Resolution {
                        id: r.try_get("id").map_err(c)?,
                        created_at: r.try_get("created_at").map_err(c)?,
                        entry: NewResolution {
                            payment_id: r.try_get("payment_id").map_err(c)?,
                            action: r.try_get("action").map_err(c)?,
                            operator: r.try_get("operator").map_err(c)?,
                            reason: r.try_get("reason").map_err(c)?,
                            forced: r.try_get("forced").map_err(c)?,
                            card_evidence: r.try_get("card_evidence").map_err(c)?,
                            before: json(r.try_get("before_state").map_err(c)?)?,
                            after: json(r.try_get("after_state").map_err(c)?)?,
                        },
                    })
                })
                .collect()
        })
    }
}
