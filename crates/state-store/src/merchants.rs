//! Merchants and their API keys, in the SQL database. Only a keyed hash of a
//! key is stored (see `paygate_core::crypto`); the key is shown once.

use paygate_core::MerchantId;
use sqlx::Row;

use crate::sql::{map_err, SqlDatabase};
use crate::{with_pool, StoreError};

/// A merchant as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merchant {
    /// `mer_` + ULID.
    pub merchant_id: MerchantId,
    /// Display name.
    pub name: String,
    /// First characters of the key (`pgk_` + 8), to tell keys apart.
    pub api_key_prefix: String,
    /// Created, epoch ms.
    pub created_at: i64,
    /// Revoked, epoch ms; a revoked merchant cannot authenticate.
    pub revoked_at: Option<i64>,
}

/// Merchant storage on the SQL database.
#[derive(Clone, Debug)]
pub struct SqlMerchantStore {
    db: SqlDatabase,
}

const COLUMNS: &str = "merchant_id, name, api_key_prefix, created_at, revoked_at";

fn from_row<R: Row>(row: &R) -> Result<Merchant, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let corrupt = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(Merchant {
        merchant_id: MerchantId::from_stored(
            row.try_get::<String, _>("merchant_id").map_err(corrupt)?,
        ),
        name: row.try_get("name").map_err(corrupt)?,
        api_key_prefix: row.try_get("api_key_prefix").map_err(corrupt)?,
        created_at: row.try_get("created_at").map_err(corrupt)?,
        revoked_at: row.try_get("revoked_at").map_err(corrupt)?,
    })
}

impl SqlMerchantStore {
    /// Merchant storage on `db`.
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Stores a new merchant with the keyed hash of its key.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn create(&self, merchant: &Merchant, api_key_hash: &str) -> Result<(), StoreError> {
        let sql = "INSERT INTO merchants (merchant_id, name, api_key_prefix, api_key_hash, created_at, revoked_at) \
                   VALUES ($1, $2, $3, $4, $5, $6)";
        with_pool!(&self.db, pool => sqlx::query(sql)
            .bind(merchant.merchant_id.as_str())
            .bind(&merchant.name)
            .bind(&merchant.api_key_prefix)
            .bind(api_key_hash)
            .bind(merchant.created_at)
            .bind(merchant.revoked_at)
            .execute(pool)
            .await
            .map(|_| ())
            .map_err(map_err))
    }

    /// The unrevoked merchant whose key hashes to `api_key_hash`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn find_by_key_hash(
        &self,
        api_key_hash: &str,
    ) -> Result<Option<Merchant>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM merchants WHERE api_key_hash = $1 AND revoked_at IS NULL"
        );
        with_pool!(&self.db, pool => {
            let row = sqlx::query(&sql).bind(api_key_hash).fetch_optional(pool).await.map_err(map_err)?;
            row.as_ref().map(from_row).transpose()
        })
    }

    /// Every merchant, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn list(&self) -> Result<Vec<Merchant>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM merchants ORDER BY created_at, merchant_id");
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql).fetch_all(pool).await.map_err(map_err)?;
            rows.iter().map(from_row).collect()
        })
    }
}
