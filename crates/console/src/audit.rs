//! The console's audit (`console_audit`): one row for every action taken in
//! the console (resolve, recheck, cancel, resend, login, logout, operator
//! changes), for every refused one, and for every failed login, each with
//! the operator's name (for a failed login, the name typed).
//!
//! Append-only: this type has no update or delete, and the database refuses
//! both (a trigger on each backend). A resolve also writes its
//! `payment_resolutions` row (the CLI's audit of the decision itself);
//! this table records who did what through the console, and what came of it.

use paygate_core::masking::mask_text;
use paygate_state_store::{sql::map_err, with_pool, SqlDatabase, StoreError};
use sqlx::Row;

/// A stored audit row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    /// Row id (ascending in write order).
    pub id: i64,
    /// Epoch ms.
    pub created_at: i64,
    /// Who (the name typed, for a failed login).
    pub operator: String,
    /// `login`, `login_failed`, `logout`, `resolve`, `recheck`, `cancel`,
    /// `resend_alert`, `operator_create`, `operator_disable`.
    pub action: String,
    /// The payment acted on, if any.
    pub payment_id: Option<String>,
    /// `ok`, `refused` (not allowed, or the code refused it) or `failed`.
    pub outcome: String,
    /// What was asked and what came of it (masked).
    pub detail: String,
}

/// `console_audit` on the SQL database.
#[derive(Clone, Debug)]
pub struct AuditLog {
    db: SqlDatabase,
}

fn row_from<R: Row>(row: &R) -> Result<AuditRow, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(AuditRow {
        id: row.try_get("id").map_err(c)?,
        created_at: row.try_get("created_at").map_err(c)?,
        operator: row.try_get("operator").map_err(c)?,
        action: row.try_get("action").map_err(c)?,
        payment_id: row.try_get("payment_id").map_err(c)?,
        outcome: row.try_get("outcome").map_err(c)?,
        detail: row.try_get("detail").map_err(c)?,
    })
}

const COLUMNS: &str = "id, created_at, operator, action, payment_id, outcome, detail";

impl AuditLog {
    /// Over `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Appends a row; `detail` is masked first (I6) and cut to 2,000
    /// characters.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn append(
        &self,
        operator: &str,
        action: &str,
        payment_id: Option<&str>,
        outcome: &str,
        detail: &str,
    ) -> Result<i64, StoreError> {
        let detail: String = mask_text(detail).chars().take(2_000).collect();
        let operator: String = operator.chars().take(200).collect();
        let sql = "INSERT INTO console_audit (created_at, operator, action, payment_id, outcome, detail) \
                   VALUES ($1, $2, $3, $4, $5, $6) RETURNING id";
        let now = paygate_core::time::now_ms();
        with_pool!(&self.db, pool => {
            let row = sqlx::query(sql)
                .bind(now)
                .bind(&operator)
                .bind(action)
                .bind(payment_id)
                .bind(outcome)
                .bind(&detail)
                .fetch_one(pool)
                .await
                .map_err(map_err)?;
            row.try_get::<i64, _>("id").map_err(|e| StoreError::Corrupt(e.to_string()))
        })
    }

    /// The rows about one payment, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn for_payment(&self, payment_id: &str) -> Result<Vec<AuditRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM console_audit WHERE payment_id = $1 ORDER BY id");
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql).bind(payment_id).fetch_all(pool).await.map_err(map_err)?;
            rows.iter().map(row_from).collect()
        })
    }

    /// The newest `limit` rows, newest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn recent(&self, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM console_audit ORDER BY id DESC LIMIT $1");
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql).bind(i64::from(limit)).fetch_all(pool).await.map_err(map_err)?;
            rows.iter().map(row_from).collect()
        })
    }
}
