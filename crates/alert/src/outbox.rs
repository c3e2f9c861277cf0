//! The alert outbox in the SQL database (`alert_outbox`): an alert is
//! written here before anything tries to send it, so no alert is lost to a
//! crash, a Discord outage or a missing webhook.
//!
//! A row is *pending* (unsent, to be sent by the next flush), *parked*
//! (unsent, refused for good by Discord: not sent again until an operator
//! un-parks it with [`SqlOutbox::unpark`]) or *sent*. Independently, an
//! operator may mark it *resolved* ([`SqlOutbox::resolve_for_payment`],
//! migration 0007): a resolved alert that was not delivered yet is no longer
//! sent (nobody needs to act on it any more), and the operator tools stop
//! listing it as a problem.

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
    /// The alert's reason (`outcome_unknown`, `card_mismatch`, ...).
    pub reason: String,
    /// The payment it is about (`pay_...`, or `orphan_<orderId>`).
    pub payment_id: Option<String>,
    /// Raised, epoch ms.
    pub created_at: i64,
    /// Marked resolved by an operator, epoch ms.
    pub resolved_at: Option<i64>,
    /// The `payment_resolutions` row that resolved it, if a resolution did.
    pub resolution_id: Option<i64>,
}

impl OutboxRow {
    /// The alert's detail as it was sent (the embed's description, else the
    /// message's content): the text an operator reads in Discord.
    pub fn detail(&self) -> String {
        let embed = self
            .payload
            .get("embeds")
            .and_then(|e| e.get(0))
            .and_then(|e| e.get("description"))
            .and_then(Value::as_str);
        let content = self.payload.get("content").and_then(Value::as_str);
        embed.or(content).unwrap_or_default().to_owned()
    }

    /// `sent`, `parked`, `pending` or `resolved` (resolved before it was
    /// sent); a delivered alert stays `sent` once resolved (see
    /// [`OutboxRow::resolved_at`]).
    pub fn state(&self) -> &'static str {
        match (self.sent_at, self.parked_at, self.resolved_at) {
            (Some(_), _, _) => "sent",
            (None, _, Some(_)) => "resolved",
            (None, Some(_), None) => "parked",
            (None, None, None) => "pending",
        }
    }
}

/// Decodes an [`OutboxRow`] from a row of either backend.
fn row_from<R: Row>(
    r: &R,
    c: impl Fn(sqlx::Error) -> StoreError + Copy,
) -> Result<OutboxRow, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let payload: String = r.try_get("payload").map_err(c)?;
    Ok(OutboxRow {
        id: r.try_get("id").map_err(c)?,
        dedup_key: r.try_get("dedup_key").map_err(c)?,
        payload: serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        attempts: r.try_get("attempts").map_err(c)?,
        sent_at: r.try_get("sent_at").map_err(c)?,
        parked_at: r.try_get("parked_at").map_err(c)?,
        last_error: r.try_get("last_error").map_err(c)?,
        reason: r.try_get("reason").map_err(c)?,
        payment_id: r.try_get("payment_id").map_err(c)?,
        created_at: r.try_get("created_at").map_err(c)?,
        resolved_at: r.try_get("resolved_at").map_err(c)?,
        resolution_id: r.try_get("resolution_id").map_err(c)?,
    })
}

/// Which rows [`SqlOutbox::list`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// Unsent, not parked and not resolved: what the next flush sends.
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
            Self::Pending => "WHERE sent_at IS NULL AND parked_at IS NULL AND resolved_at IS NULL",
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
            "WHERE sent_at IS NULL AND parked_at IS NULL AND resolved_at IS NULL AND id > $1 \
             ORDER BY id LIMIT $2",
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

    /// Up to `limit` rows of `which`, newest first (`paygate alerts list`).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn list_newest(
        &self,
        which: Listing,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let tail = format!("{} ORDER BY id DESC LIMIT $1", which.filter());
        self.rows(&tail, &[limit]).await
    }

    /// One alert by id.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn get(&self, id: i64) -> Result<Option<OutboxRow>, StoreError> {
        Ok(self.rows("WHERE id = $1", &[id]).await?.pop())
    }

    /// Every alert about `payment_id`, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn for_payment(&self, payment_id: &str) -> Result<Vec<OutboxRow>, StoreError> {
        self.rows_for("WHERE payment_id = $1 ORDER BY id", payment_id)
            .await
    }

    /// Unresolved alerts with one of `reasons`, newest first, at most
    /// `limit` (the mismatches of `paygate payments list --problems`).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn unresolved(
        &self,
        reasons: &[&str],
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        if reasons.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<String> = (2..reasons.len() + 2).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT id, dedup_key, payload, attempts, sent_at, parked_at, last_error, reason, payment_id, \
             created_at, resolved_at, resolution_id FROM alert_outbox \
             WHERE resolved_at IS NULL AND reason IN ({}) ORDER BY id DESC LIMIT $1",
            list.join(", ")
        );
        let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        with_pool!(&self.db, pool => {
            let mut q = sqlx::query(&sql).bind(limit);
            for r in reasons {
                q = q.bind(*r);
            }
            let rows = q.fetch_all(pool).await.map_err(map_err)?;
            rows.iter().map(|r| row_from(r, c)).collect()
        })
    }

    /// Marks the unresolved alerts about `payment_id` with an id up to
    /// `up_to_id` resolved (by the `payment_resolutions` row
    /// `resolution_id`, when one did); returns how many. An unsent one is
    /// no longer sent. The bound keeps an alert raised while the decision
    /// was carried out (the ledger refusing it, say) in front of operators.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn resolve_for_payment(
        &self,
        payment_id: &str,
        up_to_id: i64,
        resolution_id: Option<i64>,
    ) -> Result<u64, StoreError> {
        let sql = "UPDATE alert_outbox SET resolved_at = $2, resolution_id = $3 \
                   WHERE payment_id = $1 AND resolved_at IS NULL AND id <= $4";
        with_pool!(&self.db, pool => sqlx::query(sql)
            .bind(payment_id)
            .bind(paygate_core::time::now_ms())
            .bind(resolution_id)
            .bind(up_to_id)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(map_err))
    }

    /// Queues one alert to be sent again by the next flush, whatever its
    /// state: a parked one is un-parked, a sent one is marked unsent, a
    /// resolved one is reopened (`paygate alerts resend`). `Ok(false)` when
    /// there is no alert `id`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn requeue(&self, id: i64) -> Result<bool, StoreError> {
        let sql = "UPDATE alert_outbox SET parked_at = NULL, sent_at = NULL, resolved_at = NULL, \
                   resolution_id = NULL WHERE id = $1";
        with_pool!(&self.db, pool => sqlx::query(sql).bind(id).execute(pool).await.map(|r| r.rows_affected() == 1).map_err(map_err))
    }

    /// Up to `limit` alerts raised before `cutoff_ms` with an id above
    /// `after`, oldest first, that are done with (delivered, or resolved by
    /// an operator): the candidates of `paygate prune`, which deletes only
    /// those whose payment is completed or unpaid.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn prunable_after(
        &self,
        after: i64,
        cutoff_ms: i64,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.rows(
            "WHERE id > $1 AND created_at < $2 AND (sent_at IS NOT NULL OR resolved_at IS NOT NULL) \
             ORDER BY id LIMIT $3",
            &[after, cutoff_ms, limit],
        )
        .await
    }

    /// Deletes the alerts `ids` (a bounded batch chosen by `paygate prune`)
    /// that are still done with; returns how many went.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn delete(&self, ids: &[i64]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let list: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "DELETE FROM alert_outbox WHERE id IN ({}) AND (sent_at IS NOT NULL OR resolved_at IS NOT NULL)",
            list.join(", ")
        );
        with_pool!(&self.db, pool => {
            let mut q = sqlx::query(&sql);
            for id in ids {
                q = q.bind(*id);
            }
            q.execute(pool).await.map(|r| r.rows_affected()).map_err(map_err)
        })
    }

    async fn rows_for(&self, tail: &str, text: &str) -> Result<Vec<OutboxRow>, StoreError> {
        let sql = format!(
            "SELECT id, dedup_key, payload, attempts, sent_at, parked_at, last_error, reason, payment_id, \
             created_at, resolved_at, resolution_id FROM alert_outbox {tail}"
        );
        let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql).bind(text).fetch_all(pool).await.map_err(map_err)?;
            rows.iter().map(|r| row_from(r, c)).collect()
        })
    }

    /// Rows selected by `tail`, with `binds` bound to `$1`, `$2`, ... in order.
    async fn rows(&self, tail: &str, binds: &[i64]) -> Result<Vec<OutboxRow>, StoreError> {
        let sql = format!(
            "SELECT id, dedup_key, payload, attempts, sent_at, parked_at, last_error, reason, payment_id, \
             created_at, resolved_at, resolution_id FROM alert_outbox {tail}"
        );
        let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        with_pool!(&self.db, pool => {
            let mut q = sqlx::query(&sql);
            for b in binds {
                q = q.bind(*b);
            }
            let rows = q.fetch_all(pool).await.map_err(map_err)?;
            rows.iter().map(|r| row_from(r, c)).collect()
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
