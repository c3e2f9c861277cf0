//! [`SqlInventoryStore`]: inventory and holds on SQLite and PostgreSQL
//! (migration 0010: `inventory`, `holds`, `hold_items`), the reference for
//! the other backends.
//!
//! A write that can make a hold count (take, begin, sell) locks the SKUs'
//! inventory rows first, in SKU order (no deadlock between two multi-SKU
//! holds): `SELECT … FOR UPDATE` on PostgreSQL; on SQLite the first
//! statement is an `UPDATE` of the row, which takes the database's write
//! lock at once (a deferred transaction that read first could not upgrade
//! its lock under contention without failing `SQLITE_BUSY`). Availability is
//! then one indexed query on `hold_items (merchant_id, sku, state,
//! expires_at)`. Every change of a hold is a [`HoldTransition`] compiled
//! into one conditional `UPDATE` (its guard decides, not the state read
//! earlier), and the hold's items take its state in the same transaction.
//! Items of a hold never change, so they are read before the transaction.

use paygate_core::{MerchantId, OrderId};
use sqlx::Row;

use crate::{
    inventory::{
        BeginOutcome, Hold, HoldItem, HoldState, HoldTransition, InventoryStore, SellOutcome,
        SetStock, StockLevel, TakeOutcome,
    },
    rules::sql::Bind,
    sql::{bind_rule, map_err, SqlDatabase},
    with_pool, StoreError,
};

/// [`InventoryStore`] on the SQL database.
#[derive(Clone, Debug)]
pub struct SqlInventoryStore {
    db: SqlDatabase,
}

const HOLD_COLUMNS: &str =
    "hold_id, merchant_id, order_id, state, expires_at, fingerprint, created_at, updated_at, version";

/// Units held by active hold lines of `($1, $2)` other than hold `$4`, a
/// `pre` line counting until its `expires_at` by the earlier of `$3` (the
/// caller's clock) and the database's own: a replica whose clock runs
/// ahead cannot take a unit from a hold in its last seconds (nor refuse
/// its holder before its `expiresAt`), and one running behind only judges
/// on the safe side. PostgreSQL's `clock_timestamp()`.
const HELD_SQL_PG: &str = "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) AS n FROM hold_items \
     WHERE merchant_id = $1 AND sku = $2 AND hold_id <> $4 \
     AND (state = 'during' OR (state = 'pre' AND expires_at > \
     LEAST($3, CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT))))";
/// [`HELD_SQL_PG`] on SQLite, whose clock is the process's (`julianday`).
const HELD_SQL_SQLITE: &str =
    "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) AS n FROM hold_items \
     WHERE merchant_id = $1 AND sku = $2 AND hold_id <> $4 \
     AND (state = 'during' OR (state = 'pre' AND expires_at > \
     MIN($3, CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER))))";

const LOCK_PG: &str =
    "SELECT stock, sold FROM inventory WHERE merchant_id = $1 AND sku = $2 FOR UPDATE";
const LOCK_SQLITE: &str = "UPDATE inventory SET stock = stock WHERE merchant_id = $1 AND sku = $2 \
     RETURNING stock, sold";

fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The conditional `UPDATE` of the hold `key` names, compiled from `t`'s
/// rule: `$1` (and `$3` when `key` has it) the key, `$2` the writer's now
/// (epoch ms); the rule's parameters follow from `first`. It returns the
/// hold as the change left it (`hold_id`, `state`, `version`,
/// `updated_at`), no row when the guard did not hold.
fn hold_update(t: &HoldTransition, key: &str, first: usize) -> (String, Vec<Bind>) {
    let (set, guard, binds) = t.rule().to_sql::<Hold>("$2", first);
    (
        format!(
            "UPDATE holds SET {set} WHERE {key} AND {guard} \
             RETURNING hold_id, state, version, updated_at"
        ),
        binds,
    )
}

/// After [`hold_update`] returned `$row`: the hold's items take its state
/// (they mirror it, for the availability query), on executor `$ex`.
/// `Some((state, version, updated_at))` when the hold moved, `None` when
/// its guard did not hold (nothing is written then).
macro_rules! mirror_items {
    ($ex:expr, $row:expr) => {{
        match $row {
            Some(row) => {
                let id: String = row.try_get("hold_id").map_err(corrupt)?;
                let state: String = row.try_get("state").map_err(corrupt)?;
                let version: i64 = row.try_get("version").map_err(corrupt)?;
                let at: i64 = row.try_get("updated_at").map_err(corrupt)?;
                sqlx::query("UPDATE hold_items SET state = $2 WHERE hold_id = $1 AND state <> $2")
                    .bind(&id)
                    .bind(&state)
                    .execute($ex)
                    .await
                    .map_err(map_err)?;
                Some((HoldState::parse(&state)?, version, at))
            }
            None => None,
        }
    }};
}

/// Locks `($merchant, $sku)`'s row; `(stock, sold)`, `(0, 0)` when missing.
macro_rules! lock_sku {
    ($tx:expr, $lock:expr, $m:expr, $sku:expr) => {{
        let row = sqlx::query($lock)
            .bind($m)
            .bind($sku)
            .fetch_optional(&mut *$tx)
            .await
            .map_err(map_err)?;
        match row {
            Some(r) => (
                r.try_get::<i64, _>("stock").map_err(corrupt)?,
                r.try_get::<i64, _>("sold").map_err(corrupt)?,
            ),
            None => (0_i64, 0_i64),
        }
    }};
}

macro_rules! held {
    ($held_sql:expr, $ex:expr, $m:expr, $sku:expr, $now:expr, $except:expr) => {{
        let row = sqlx::query($held_sql)
            .bind($m)
            .bind($sku)
            .bind($now)
            .bind($except)
            .fetch_one($ex)
            .await
            .map_err(map_err)?;
        row.try_get::<i64, _>("n").map_err(corrupt)?
    }};
}

macro_rules! hold_row {
    ($row:expr) => {{
        let r = $row;
        Hold {
            hold_id: r.try_get("hold_id").map_err(corrupt)?,
            merchant_id: MerchantId::from_stored(
                r.try_get::<String, _>("merchant_id").map_err(corrupt)?,
            ),
            order_id: OrderId::from_stored(r.try_get::<String, _>("order_id").map_err(corrupt)?),
            items: Vec::new(),
            state: HoldState::parse(&r.try_get::<String, _>("state").map_err(corrupt)?)?,
            expires_at: r.try_get("expires_at").map_err(corrupt)?,
            fingerprint: r.try_get("fingerprint").map_err(corrupt)?,
            created_at: r.try_get("created_at").map_err(corrupt)?,
            updated_at: r.try_get("updated_at").map_err(corrupt)?,
            version: r.try_get("version").map_err(corrupt)?,
        }
    }};
}

impl SqlInventoryStore {
    /// A store on `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    fn lock_sql(&self) -> &'static str {
        match self.db {
            SqlDatabase::Sqlite(_) => LOCK_SQLITE,
            SqlDatabase::Postgres(_) => LOCK_PG,
        }
    }

    fn held_sql(&self) -> &'static str {
        match self.db {
            SqlDatabase::Sqlite(_) => HELD_SQL_SQLITE,
            SqlDatabase::Postgres(_) => HELD_SQL_PG,
        }
    }

    async fn find(&self, column: &str, a: &str, b: &str) -> Result<Option<Hold>, StoreError> {
        let sql =
            format!("SELECT {HOLD_COLUMNS} FROM holds WHERE merchant_id = $1 AND {column} = $2");
        with_pool!(&self.db, pool => {
            let Some(row) = sqlx::query(&sql).bind(a).bind(b).fetch_optional(pool).await.map_err(map_err)? else {
                return Ok(None);
            };
            let mut hold = hold_row!(row);
            let items = sqlx::query("SELECT sku, quantity FROM hold_items WHERE hold_id = $1 ORDER BY sku")
                .bind(&hold.hold_id)
                .fetch_all(pool)
                .await
                .map_err(map_err)?;
            for r in items {
                hold.items.push(HoldItem {
                    sku: r.try_get("sku").map_err(corrupt)?,
                    quantity: r.try_get("quantity").map_err(corrupt)?,
                });
            }
            Ok(Some(hold))
        })
    }
}

#[async_trait::async_trait]
impl InventoryStore for SqlInventoryStore {
    async fn set_stock(
        &self,
        merchant: &MerchantId,
        sku: &str,
        stock: i64,
        now_ms: i64,
    ) -> Result<SetStock, StoreError> {
        let m = merchant.as_str();
        let lock = self.lock_sql();
        with_pool!(&self.db, pool => {
            let mut tx = pool.begin().await.map_err(map_err)?;
            sqlx::query("INSERT INTO inventory (merchant_id, sku, stock, sold, updated_at) \
                         VALUES ($1, $2, 0, 0, $3) ON CONFLICT (merchant_id, sku) DO NOTHING")
                .bind(m).bind(sku).bind(now_ms)
                .execute(&mut *tx).await.map_err(map_err)?;
            let (old, sold) = lock_sku!(tx, lock, m, sku);
            let held = held!(self.held_sql(), &mut *tx, m, sku, now_ms, "");
            if stock < sold + held {
                tx.rollback().await.map_err(map_err)?;
                return Ok(SetStock::BelowCommitted(StockLevel::new(sku, old, sold, held)));
            }
            sqlx::query("UPDATE inventory SET stock = $3, updated_at = $4 WHERE merchant_id = $1 AND sku = $2")
                .bind(m).bind(sku).bind(stock).bind(now_ms)
                .execute(&mut *tx).await.map_err(map_err)?;
            tx.commit().await.map_err(map_err)?;
            Ok(SetStock::Set(StockLevel::new(sku, stock, sold, held)))
        })
    }

    async fn level(
        &self,
        merchant: &MerchantId,
        sku: &str,
        now_ms: i64,
    ) -> Result<Option<StockLevel>, StoreError> {
        let m = merchant.as_str();
        // One statement, so one snapshot: read apart, a sale landing between
        // the two reads (its units leave `held` and join `sold`) or a
        // restock followed by a take could show sold + held above stock,
        // an oversell that never happened.
        let sql = format!(
            "SELECT stock, sold, ({}) AS held FROM inventory WHERE merchant_id = $1 AND sku = $2",
            self.held_sql()
        );
        with_pool!(&self.db, pool => {
            let Some(row) = sqlx::query(&sql)
                .bind(m).bind(sku).bind(now_ms).bind("")
                .fetch_optional(pool).await.map_err(map_err)? else {
                return Ok(None);
            };
            let stock: i64 = row.try_get("stock").map_err(corrupt)?;
            let sold: i64 = row.try_get("sold").map_err(corrupt)?;
            let held: i64 = row.try_get("held").map_err(corrupt)?;
            Ok(Some(StockLevel::new(sku, stock, sold, held)))
        })
    }

    async fn take(&self, hold: &Hold, now_ms: i64) -> Result<TakeOutcome, StoreError> {
        let m = hold.merchant_id.as_str();
        let lock = self.lock_sql();
        let taken: Option<Vec<String>> = with_pool!(&self.db, pool => {
            let mut tx = pool.begin().await.map_err(map_err)?;
            let mut short = Vec::new();
            for item in &hold.items {
                let (stock, sold) = lock_sku!(tx, lock, m, &item.sku);
                let held = held!(self.held_sql(), &mut *tx, m, &item.sku, now_ms, &hold.hold_id);
                if stock - sold - held < item.quantity {
                    short.push(item.sku.clone());
                }
            }
            if !short.is_empty() {
                tx.rollback().await.map_err(map_err)?;
                Some(short)
            } else {
                let n = sqlx::query("INSERT INTO holds (hold_id, merchant_id, order_id, state, expires_at, fingerprint, created_at, updated_at) \
                                     VALUES ($1, $2, $3, 'pre', $4, $5, $6, $6) ON CONFLICT (merchant_id, order_id) DO NOTHING")
                    .bind(&hold.hold_id).bind(m).bind(hold.order_id.as_str()).bind(hold.expires_at)
                    .bind(&hold.fingerprint).bind(hold.created_at)
                    .execute(&mut *tx).await.map_err(map_err)?
                    .rows_affected();
                if n == 0 {
                    tx.rollback().await.map_err(map_err)?;
                    None
                } else {
                    for item in &hold.items {
                        sqlx::query("INSERT INTO hold_items (hold_id, merchant_id, sku, quantity, state, expires_at) \
                                     VALUES ($1, $2, $3, $4, 'pre', $5)")
                            .bind(&hold.hold_id).bind(m).bind(&item.sku).bind(item.quantity).bind(hold.expires_at)
                            .execute(&mut *tx).await.map_err(map_err)?;
                    }
                    tx.commit().await.map_err(map_err)?;
                    Some(Vec::new())
                }
            }
        });
        match taken {
            Some(short) if short.is_empty() => Ok(TakeOutcome::Taken(hold.clone())),
            Some(short) => {
                // Out of stock, unless the order already has a hold (a
                // replay of a take that emptied the shelf).
                match self
                    .hold_by_order(&hold.merchant_id, &hold.order_id)
                    .await?
                {
                    Some(existing) => Ok(TakeOutcome::Exists(existing)),
                    None => Ok(TakeOutcome::OutOfStock(short)),
                }
            }
            None => match self
                .hold_by_order(&hold.merchant_id, &hold.order_id)
                .await?
            {
                Some(existing) => Ok(TakeOutcome::Exists(existing)),
                None => Err(StoreError::Unavailable(
                    "a hold claimed its order and vanished; retry".to_owned(),
                )),
            },
        }
    }

    async fn hold(&self, merchant: &MerchantId, hold_id: &str) -> Result<Option<Hold>, StoreError> {
        self.find("hold_id", merchant.as_str(), hold_id).await
    }

    async fn hold_by_order(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
    ) -> Result<Option<Hold>, StoreError> {
        self.find("order_id", merchant.as_str(), order.as_str())
            .await
    }

    async fn begin_payment(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        now_ms: i64,
    ) -> Result<BeginOutcome, StoreError> {
        let Some(mut hold) = self.hold_by_order(merchant, order).await? else {
            return Ok(BeginOutcome::NoHold);
        };
        match hold.state {
            HoldState::Sold => return Ok(BeginOutcome::Sold(hold)),
            HoldState::During => {
                // The fence against a stale `release_stuck` (see the trait).
                let (sql, binds) = hold_update(&HoldTransition::Refence, "hold_id = $1", 3);
                // The state does not change, so the items are not touched:
                // a mirror written apart from the update could land after a
                // sale or a release and put the items back to `during`.
                let touched: Option<(i64, i64)> = with_pool!(&self.db, pool => {
                    let row = bind_rule!(sqlx::query(&sql).bind(&hold.hold_id).bind(now_ms), &binds)
                        .fetch_optional(pool).await.map_err(map_err)?;
                    match row {
                        Some(r) => Some((
                            r.try_get::<i64, _>("version").map_err(corrupt)?,
                            r.try_get::<i64, _>("updated_at").map_err(corrupt)?,
                        )),
                        None => None,
                    }
                });
                if let Some((version, at)) = touched {
                    hold.updated_at = at;
                    hold.version = version;
                    return Ok(BeginOutcome::During(hold));
                }
                // Sold or released meanwhile: decide under the lock below.
            }
            HoldState::Pre | HoldState::Released => {}
        }
        let m = merchant.as_str();
        let lock = self.lock_sql();
        let moved = with_pool!(&self.db, pool => {
            let mut tx = pool.begin().await.map_err(map_err)?;
            let mut short = Vec::new();
            for item in &hold.items {
                let (stock, sold) = lock_sku!(tx, lock, m, &item.sku);
                let held = held!(self.held_sql(), &mut *tx, m, &item.sku, now_ms, &hold.hold_id);
                if stock - sold - held < item.quantity {
                    short.push(item.sku.clone());
                }
            }
            let to = if short.is_empty() { HoldState::During } else { HoldState::Released };
            // The hold row is not under the SKU lock: another confirm, a
            // sale or a release may have moved it since the read. The
            // guard decides; when it did not hold, a hold another confirm
            // moved to `during` is fenced one version on in this
            // transaction (so that this confirm, too, releases only the
            // version it left), and any other is read again as it stands.
            let (sql, binds) = hold_update(&HoldTransition::Begin { to, seen_version: None }, "hold_id = $1", 3);
            let row = bind_rule!(sqlx::query(&sql).bind(&hold.hold_id).bind(now_ms), &binds)
                .fetch_optional(&mut *tx).await.map_err(map_err)?;
            let row = match row {
                Some(row) => Some(row),
                None => {
                    let (sql, binds) = hold_update(&HoldTransition::Refence, "hold_id = $1", 3);
                    bind_rule!(sqlx::query(&sql).bind(&hold.hold_id).bind(now_ms), &binds)
                        .fetch_optional(&mut *tx).await.map_err(map_err)?
                }
            };
            let moved = match mirror_items!(&mut *tx, row) {
                Some((state, version, at)) => Some((state, version, at)),
                None => {
                    let row = sqlx::query("SELECT state, version, updated_at FROM holds WHERE hold_id = $1")
                        .bind(&hold.hold_id).fetch_optional(&mut *tx).await.map_err(map_err)?;
                    match row {
                        Some(r) => Some((
                            HoldState::parse(&r.try_get::<String, _>("state").map_err(corrupt)?)?,
                            r.try_get::<i64, _>("version").map_err(corrupt)?,
                            r.try_get::<i64, _>("updated_at").map_err(corrupt)?,
                        )),
                        None => None,
                    }
                }
            };
            tx.commit().await.map_err(map_err)?;
            moved.map(|m| (m, short))
        });
        // Deleted meanwhile (purged): no hold any more.
        let Some(((state, version, at), short)) = moved else {
            return Ok(BeginOutcome::NoHold);
        };
        hold.state = state;
        hold.updated_at = at;
        hold.version = version;
        Ok(match state {
            HoldState::Sold => BeginOutcome::Sold(hold),
            HoldState::During => BeginOutcome::During(hold),
            HoldState::Pre | HoldState::Released => BeginOutcome::Expired { hold, short },
        })
    }

    async fn sell(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        now_ms: i64,
    ) -> Result<SellOutcome, StoreError> {
        let Some(mut hold) = self.hold_by_order(merchant, order).await? else {
            return Ok(SellOutcome::NoHold);
        };
        if hold.state == HoldState::Sold {
            return Ok(SellOutcome::AlreadySold);
        }
        let m = merchant.as_str();
        let lock = self.lock_sql();
        let oversold: Option<Vec<String>> = with_pool!(&self.db, pool => {
            let mut tx = pool.begin().await.map_err(map_err)?;
            for item in &hold.items {
                let _ = lock_sku!(tx, lock, m, &item.sku);
            }
            let (sql, binds) = hold_update(&HoldTransition::Sell, "hold_id = $1", 3);
            let row = bind_rule!(sqlx::query(&sql).bind(&hold.hold_id).bind(now_ms), &binds)
                .fetch_optional(&mut *tx).await.map_err(map_err)?;
            if let Some((_, version, at)) = mirror_items!(&mut *tx, row) {
                hold.version = version;
                hold.updated_at = at;
                let mut over = Vec::new();
                for item in &hold.items {
                    let row = sqlx::query("INSERT INTO inventory (merchant_id, sku, stock, sold, updated_at) VALUES ($1, $2, 0, $3, $4) \
                                 ON CONFLICT (merchant_id, sku) DO UPDATE SET sold = inventory.sold + excluded.sold, updated_at = excluded.updated_at \
                                 RETURNING stock, sold")
                        .bind(m).bind(&item.sku).bind(item.quantity).bind(now_ms)
                        .fetch_one(&mut *tx).await.map_err(map_err)?;
                    let stock: i64 = row.try_get("stock").map_err(corrupt)?;
                    let sold: i64 = row.try_get("sold").map_err(corrupt)?;
                    let held = held!(self.held_sql(), &mut *tx, m, &item.sku, now_ms, "");
                    if stock - sold - held < 0 {
                        over.push(item.sku.clone());
                    }
                }
                tx.commit().await.map_err(map_err)?;
                Some(over)
            } else {
                tx.rollback().await.map_err(map_err)?;
                None
            }
        });
        match oversold {
            None => Ok(SellOutcome::AlreadySold),
            Some(oversold) => {
                hold.state = HoldState::Sold;
                Ok(SellOutcome::Sold { hold, oversold })
            }
        }
    }

    async fn release(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        from: &[HoldState],
        now_ms: i64,
    ) -> Result<Option<Hold>, StoreError> {
        let t = HoldTransition::Release {
            from: from.to_vec(),
        };
        let (sql, binds) = hold_update(&t, "merchant_id = $1 AND order_id = $3", 4);
        with_pool!(&self.db, pool => {
            let mut tx = pool.begin().await.map_err(map_err)?;
            let row = bind_rule!(
                sqlx::query(&sql).bind(merchant.as_str()).bind(now_ms).bind(order.as_str()),
                &binds
            )
            .fetch_optional(&mut *tx).await.map_err(map_err)?;
            let _ = mirror_items!(&mut *tx, row);
            tx.commit().await.map_err(map_err)?;
        });
        self.hold_by_order(merchant, order).await
    }

    async fn stuck_during(
        &self,
        updated_before_ms: i64,
        after_hold_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Hold>, StoreError> {
        let sql = format!(
            "SELECT {HOLD_COLUMNS} FROM holds WHERE state = 'during' AND updated_at <= $1 \
             AND hold_id > $2 ORDER BY hold_id LIMIT $3"
        );
        let rows = with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql)
                .bind(updated_before_ms).bind(after_hold_id.unwrap_or("")).bind(i64::from(limit))
                .fetch_all(pool).await.map_err(map_err)?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                out.push(hold_row!(row));
            }
            out
        });
        let mut holds = Vec::with_capacity(rows.len());
        for h in rows {
            // With its items (few rows: `during` holds are the in-flight ones).
            if let Some(full) = self
                .find("hold_id", h.merchant_id.as_str(), &h.hold_id)
                .await?
            {
                holds.push(full);
            }
        }
        Ok(holds)
    }

    async fn release_stuck(&self, seen: &Hold, now_ms: i64) -> Result<bool, StoreError> {
        with_pool!(&self.db, pool => {
            let mut tx = pool.begin().await.map_err(map_err)?;
            let t = HoldTransition::ReleaseStuck { seen_version: seen.version };
            let (sql, binds) = hold_update(&t, "hold_id = $1", 3);
            let row = bind_rule!(sqlx::query(&sql).bind(&seen.hold_id).bind(now_ms), &binds)
                .fetch_optional(&mut *tx).await.map_err(map_err)?;
            let released = mirror_items!(&mut *tx, row).is_some();
            tx.commit().await.map_err(map_err)?;
            Ok(released)
        })
    }

    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        with_pool!(&self.db, pool => {
            // Items first: SQLite's cascade needs foreign keys on, and the
            // explicit delete keeps both backends the same.
            let mut tx = pool.begin().await.map_err(map_err)?;
            let cond = "(state = 'released' AND updated_at < $1) OR (state = 'pre' AND expires_at < $1)";
            sqlx::query(&format!("DELETE FROM hold_items WHERE hold_id IN (SELECT hold_id FROM holds WHERE {cond})"))
                .bind(before_ms).execute(&mut *tx).await.map_err(map_err)?;
            let n = sqlx::query(&format!("DELETE FROM holds WHERE {cond}"))
                .bind(before_ms).execute(&mut *tx).await.map_err(map_err)?
                .rows_affected();
            tx.commit().await.map_err(map_err)?;
            Ok(n)
        })
    }
}
