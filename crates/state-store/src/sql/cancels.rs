//! [`CancelStore`] on the SQL database (`payment_cancels`, migration 0009):
//! the claim rule of [`crate::cancels`] with the primary key
//! `(payment_id, n)` as its serialization point, and each
//! [`CancelTransition`] as one `UPDATE ... WHERE <guard>`.

use futures_util::{stream::BoxStream, TryStreamExt};
use paygate_core::{MerchantId, PaymentId};
use sqlx::Row;

use crate::{
    cancels::{decide_claim, ClaimDecision, CLAIM_ATTEMPTS},
    sql::{bind_rule, decode_rows, get_sql, map_err, SqlStateStore, EVENT_INSERT_SQL},
    with_pool, CancelClaim, CancelDraft, CancelRecord, CancelStatus, CancelStore, CancelTransition,
    StoreError,
};

const COLUMNS: &str = "payment_id, n, merchant_id, amount, reason, idempotency_key, \
     request_fingerprint, status, is_saved, save_attempts, batch_attempts, failure_code, \
     last_error, canceled_at, created_at, updated_at, version";

fn cancel_from_row<R: Row>(row: &R) -> Result<CancelRecord, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(CancelRecord {
        payment_id: PaymentId::from_stored(row.try_get::<String, _>("payment_id").map_err(c)?),
        n: row.try_get("n").map_err(c)?,
        merchant_id: MerchantId::from_stored(row.try_get::<String, _>("merchant_id").map_err(c)?),
        amount: row.try_get("amount").map_err(c)?,
        reason: row.try_get("reason").map_err(c)?,
        idempotency_key: row.try_get("idempotency_key").map_err(c)?,
        request_fingerprint: row.try_get("request_fingerprint").map_err(c)?,
        status: CancelStatus::from_stored(&row.try_get::<String, _>("status").map_err(c)?)?,
        is_saved: row.try_get("is_saved").map_err(c)?,
        save_attempts: row.try_get("save_attempts").map_err(c)?,
        batch_attempts: row.try_get("batch_attempts").map_err(c)?,
        failure_code: row.try_get("failure_code").map_err(c)?,
        last_error: row.try_get("last_error").map_err(c)?,
        canceled_at: row.try_get("canceled_at").map_err(c)?,
        created_at: row.try_get("created_at").map_err(c)?,
        updated_at: row.try_get("updated_at").map_err(c)?,
        version: row.try_get("version").map_err(c)?,
    })
}

impl SqlStateStore {
    /// Inserts `c` unless its `(payment_id, n)` is taken; `Ok(false)` when taken.
    async fn insert_cancel(&self, c: &CancelRecord) -> Result<bool, StoreError> {
        let sql = format!(
            "INSERT INTO payment_cancels ({COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             ON CONFLICT (payment_id, n) DO NOTHING"
        );
        with_pool!(self.database(), pool => sqlx::query(&sql)
            .bind(c.payment_id.as_str())
            .bind(c.n)
            .bind(c.merchant_id.as_str())
            .bind(c.amount)
            .bind(&c.reason)
            .bind(c.idempotency_key.as_deref())
            .bind(&c.request_fingerprint)
            .bind(c.status.as_str())
            .bind(c.is_saved)
            .bind(c.save_attempts)
            .bind(c.batch_attempts)
            .bind(c.failure_code.as_deref())
            .bind(c.last_error.as_deref())
            .bind(c.canceled_at.as_deref())
            .bind(c.created_at)
            .bind(c.updated_at)
            .bind(c.version)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
            .map_err(map_err))
    }
}

#[async_trait::async_trait]
impl CancelStore for SqlStateStore {
    async fn claim_cancel(&self, draft: &CancelDraft) -> Result<CancelClaim, StoreError> {
        for _ in 0..CLAIM_ATTEMPTS {
            let cancels = self.cancels_of(&draft.payment_id).await?;
            match decide_claim(draft, &cancels) {
                ClaimDecision::Answer(a) => return Ok(a),
                ClaimDecision::Insert(c) => {
                    if self.insert_cancel(&c).await? {
                        return Ok(CancelClaim::Claimed(c));
                    }
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "cancel of {} lost the claim race {CLAIM_ATTEMPTS} times",
            draft.payment_id
        )))
    }

    async fn cancels_of(&self, payment_id: &PaymentId) -> Result<Vec<CancelRecord>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM payment_cancels WHERE payment_id = $1 ORDER BY n");
        with_pool!(self.database(), pool => {
            let rows = sqlx::query(&sql).bind(payment_id.as_str()).fetch_all(pool).await.map_err(map_err)?;
            rows.iter().map(cancel_from_row).collect()
        })
    }

    async fn cancel_transition(
        &self,
        payment_id: &PaymentId,
        n: i64,
        t: &CancelTransition,
    ) -> Result<bool, StoreError> {
        let now = self.clock.now_ms();
        // $1 = payment_id, $2 = n, $3 = now, $4.. = the rule's values.
        let (set, guard, binds) = t.rule().to_sql::<CancelRecord>("$3", 4);
        let sql = format!(
            "UPDATE payment_cancels SET {set} WHERE payment_id = $1 AND n = $2 AND {guard}"
        );
        if !t.leaves_event() {
            return with_pool!(self.database(), pool => {
                bind_rule!(sqlx::query(&sql).bind(payment_id.as_str()).bind(n).bind(now), &binds)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected() == 1)
                    .map_err(map_err)
            });
        }
        // The cancel's event is written in the same transaction, from the
        // cancel as the update left it, its payment, and the payment's other
        // done cancels (final: none changes while this one is in flight).
        let sql = format!("{sql} RETURNING {COLUMNS}");
        let payment_sql = get_sql();
        let done_sql =
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS done FROM payment_cancels \
             WHERE payment_id = $1 AND n <> $2 AND status = 'DONE'";
        with_pool!(self.database(), pool => {
            let mut tx = pool.begin().await.map_err(map_err)?;
            let Some(row) = bind_rule!(sqlx::query(&sql).bind(payment_id.as_str()).bind(n).bind(now), &binds)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?
            else {
                return Ok(false);
            };
            let done = cancel_from_row(&row)?;
            let copies = sqlx::query(&payment_sql)
                .bind(payment_id.as_str())
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err)?;
            let Some((_, payment)) = crate::newest_copy(decode_rows(&copies)?) else {
                return Err(StoreError::Corrupt(format!("cancel {n} of {payment_id} has no payment")));
            };
            let before: i64 = sqlx::query(done_sql)
                .bind(payment_id.as_str())
                .bind(n)
                .fetch_one(&mut *tx)
                .await
                .map_err(map_err)?
                .try_get("done")
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if let Some(e) = crate::events::cancel_event(&payment, &done, before, now) {
                crate::bind_event!(sqlx::query(EVENT_INSERT_SQL), e)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
            tx.commit().await.map_err(map_err)?;
            Ok(true)
        })
    }

    fn scan_open_cancels(
        &self,
        batch_size: u32,
    ) -> BoxStream<'_, Result<CancelRecord, StoreError>> {
        let open = crate::rules::sql::guard::<CancelRecord>(
            &crate::cancels::open_guard(),
            &mut crate::rules::sql::Binds::from(4),
        );
        let sql = format!(
            "SELECT {COLUMNS} FROM payment_cancels \
             WHERE {open} AND (payment_id, n) > ($1, $2) ORDER BY payment_id, n LIMIT $3"
        );
        let limit = i64::from(batch_size.max(1));
        let pages = futures_util::stream::try_unfold(Some((String::new(), 0_i64)), move |after| {
            let sql = sql.clone();
            async move {
                let Some((after_id, after_n)) = after else {
                    return Ok(None);
                };
                let page: Vec<CancelRecord> = with_pool!(self.database(), pool => {
                    let rows = sqlx::query(&sql).bind(&after_id).bind(after_n).bind(limit)
                        .fetch_all(pool).await.map_err(map_err)?;
                    rows.iter().map(cancel_from_row).collect::<Result<Vec<_>, StoreError>>()?
                });
                let next = match page.last() {
                    Some(last) if page.len() as i64 == limit => {
                        Some((last.payment_id.to_string(), last.n))
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
}
