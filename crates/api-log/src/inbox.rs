//! The card company's webhooks as received (`card_webhooks`): Toss Payments
//! `PAYMENT_STATUS_CHANGED`, posted to `POST /v1/webhooks/card`, is written
//! here before it is answered 200, so a change the card company told us of
//! is never lost to a crash between the answer and the work.
//!
//! A receipt is deduplicated by paymentKey, status, the event's own
//! `createdAt` and a digest of the body: Toss redelivers an event it got no 200 for (up to 7 times
//! over about 3 days 19 hours), and each redelivery only counts
//! (`deliveries`). Nothing in a receipt is trusted (Toss does not sign its
//! payment webhooks): the worker that takes one looks the payment up and
//! acts on the lookup. A receipt is only a reason to look.
//!
//! Taking a receipt moves its `next_at` forward by the taker's lease, as a
//! compare-and-set on the `next_at` it read (not on any clock): of two
//! replicas that read it at once, one takes it. A taker that dies leaves it
//! due again when the lease has passed; one that stalls past it and carries
//! on does the same work as the next taker, which is harmless, since the
//! work is a lookup and guarded transitions.

use paygate_core::masking::scrub_json;
use paygate_state_store::{sql::map_err, with_pool, SqlDatabase, StoreError};
use serde_json::Value;
use sqlx::Row;

/// One webhook as the card company sent it (the fields paygate reads).
#[derive(Clone, Debug, PartialEq)]
pub struct CardWebhook {
    /// `eventType` (`PAYMENT_STATUS_CHANGED`).
    pub event_type: String,
    /// `data.orderId`.
    pub order_id: String,
    /// `data.paymentKey`.
    pub payment_key: String,
    /// `data.status` (`DONE`, `CANCELED`, ...), as the sender claims it.
    pub status: String,
    /// `createdAt` of the event, as sent (RFC 3339 or Toss's local form).
    pub event_at: String,
    /// The whole body, scrubbed before it is stored.
    pub body: Value,
}

impl CardWebhook {
    /// The deduplication key: `<paymentKey>|<status>|<createdAt>|` and a
    /// digest of the body, so a redelivery (the same body again) is one
    /// receipt while two changes that share a status and a timestamp (or
    /// carry none) are two.
    pub fn dedup_key(&self) -> String {
        let digest = paygate_core::crypto::fingerprint(&[&self.body.to_string()]);
        format!(
            "{}|{}|{}|{digest}",
            self.payment_key, self.status, self.event_at
        )
    }
}

/// One stored receipt. Times epoch ms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Row id (arrival order).
    pub id: i64,
    /// The order it names.
    pub order_id: String,
    /// The paymentKey it names.
    pub payment_key: String,
    /// The status it claims.
    pub status: String,
    /// The event's `createdAt`, as sent.
    pub event_at: String,
    /// First received at.
    pub received_at: i64,
    /// How many times the card company delivered it.
    pub deliveries: i32,
    /// How many times a worker took it.
    pub attempts: i32,
    /// When a worker may take it next.
    pub next_at: i64,
    /// Finished at (the lookup settled what it could), if it is.
    pub done_at: Option<i64>,
    /// What the worker did (`settled_paid`, `nothing_to_do`, ...).
    pub outcome: Option<String>,
    /// Why the last try did not finish it.
    pub last_error: Option<String>,
}

fn receipt_from<R: Row>(r: &R) -> Result<Receipt, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    Ok(Receipt {
        id: r.try_get("id").map_err(map_err)?,
        order_id: r.try_get("order_id").map_err(map_err)?,
        payment_key: r.try_get("payment_key").map_err(map_err)?,
        status: r.try_get("status").map_err(map_err)?,
        event_at: r.try_get("event_at").map_err(map_err)?,
        received_at: r.try_get("received_at").map_err(map_err)?,
        deliveries: r.try_get("deliveries").map_err(map_err)?,
        attempts: r.try_get("attempts").map_err(map_err)?,
        next_at: r.try_get("next_at").map_err(map_err)?,
        done_at: r.try_get("done_at").map_err(map_err)?,
        outcome: r.try_get("outcome").map_err(map_err)?,
        last_error: r.try_get("last_error").map_err(map_err)?,
    })
}

const COLUMNS: &str = "id, order_id, payment_key, status, event_at, received_at, deliveries, \
                       attempts, next_at, done_at, outcome, last_error";

/// The receipts on the SQL database.
#[derive(Clone, Debug)]
pub struct SqlCardInbox {
    db: SqlDatabase,
}

impl SqlCardInbox {
    /// The inbox on `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Stores `w` durably, due at once; a redelivery of a receipt already
    /// held only counts in its `deliveries`. `Ok(true)` when it is new.
    ///
    /// # Errors
    /// [`StoreError`]: the webhook is not stored, and must not be answered
    /// 200 (the card company delivers it again).
    pub async fn receive(&self, w: &CardWebhook, now_ms: i64) -> Result<bool, StoreError> {
        let insert = "INSERT INTO card_webhooks (dedup_key, event_type, order_id, payment_key, status, \
                      event_at, body, received_at, next_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
                      ON CONFLICT (dedup_key) DO NOTHING";
        let mut body = w.body.clone();
        scrub_json(&mut body);
        let body = body.to_string();
        let key = w.dedup_key();
        let inserted = with_pool!(&self.db, pool => sqlx::query(insert)
            .bind(&key)
            .bind(&w.event_type)
            .bind(&w.order_id)
            .bind(&w.payment_key)
            .bind(&w.status)
            .bind(&w.event_at)
            .bind(&body)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
            .map_err(map_err))?;
        if !inserted {
            let again = "UPDATE card_webhooks SET deliveries = deliveries + 1 WHERE dedup_key = $1";
            with_pool!(&self.db, pool => sqlx::query(again)
                .bind(&key)
                .execute(pool)
                .await
                .map(drop)
                .map_err(map_err))?;
        }
        Ok(inserted)
    }

    /// Takes up to `limit` open receipts due at `now_ms`, oldest first:
    /// each is taken by a compare-and-set of its `next_at` to `now_ms +
    /// lease_ms` (`attempts += 1`); a receipt another worker took since the
    /// read is left to it.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn take_due(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<Receipt>, StoreError> {
        let due = format!(
            "SELECT {COLUMNS} FROM card_webhooks WHERE done_at IS NULL AND next_at <= $1 \
             ORDER BY next_at, id LIMIT $2"
        );
        let read: Vec<Receipt> = with_pool!(&self.db, pool => {
            let rows = sqlx::query(&due)
                .bind(now_ms)
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(map_err)?;
            rows.iter().map(receipt_from).collect::<Result<Vec<_>, _>>()
        })?;
        let take = "UPDATE card_webhooks SET next_at = $1, attempts = attempts + 1 \
                    WHERE id = $2 AND next_at = $3 AND done_at IS NULL";
        let mut taken = Vec::with_capacity(read.len());
        for mut r in read {
            let next = now_ms.saturating_add(lease_ms);
            let won = with_pool!(&self.db, pool => sqlx::query(take)
                .bind(next)
                .bind(r.id)
                .bind(r.next_at)
                .execute(pool)
                .await
                .map(|x| x.rows_affected() == 1)
                .map_err(map_err))?;
            if won {
                r.next_at = next;
                r.attempts += 1;
                taken.push(r);
            }
        }
        Ok(taken)
    }

    /// Marks receipt `id` finished with `outcome`.
    ///
    /// # Errors
    /// [`StoreError`]; the receipt is then taken again after its lease,
    /// and the work done again (harmless).
    pub async fn finish(&self, id: i64, outcome: &str, now_ms: i64) -> Result<(), StoreError> {
        let sql =
            "UPDATE card_webhooks SET done_at = $1, outcome = $2 WHERE id = $3 AND done_at IS NULL";
        with_pool!(&self.db, pool => sqlx::query(sql)
            .bind(now_ms)
            .bind(outcome)
            .bind(id)
            .execute(pool)
            .await
            .map(drop)
            .map_err(map_err))
    }

    /// Leaves receipt `id` open, due again at `next_at`, with why.
    ///
    /// # Errors
    /// [`StoreError`]; the receipt is then due again after its lease.
    pub async fn retry_at(&self, id: i64, next_at: i64, why: &str) -> Result<(), StoreError> {
        let sql =
            "UPDATE card_webhooks SET next_at = $1, last_error = $2 WHERE id = $3 AND done_at IS NULL";
        with_pool!(&self.db, pool => sqlx::query(sql)
            .bind(next_at)
            .bind(why)
            .bind(id)
            .execute(pool)
            .await
            .map(drop)
            .map_err(map_err))
    }

    /// The receipts naming `order_id`, in arrival order.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn for_order(&self, order_id: &str) -> Result<Vec<Receipt>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM card_webhooks WHERE order_id = $1 ORDER BY id");
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql)
                .bind(order_id)
                .fetch_all(pool)
                .await
                .map_err(map_err)?;
            rows.iter().map(receipt_from).collect()
        })
    }

    /// How many receipts are open (for the backlog gauge).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn open(&self) -> Result<i64, StoreError> {
        let sql = "SELECT COUNT(*) AS n FROM card_webhooks WHERE done_at IS NULL";
        with_pool!(&self.db, pool => sqlx::query(sql)
            .fetch_one(pool)
            .await
            .and_then(|r| r.try_get::<i64, _>("n"))
            .map_err(map_err))
    }
}
