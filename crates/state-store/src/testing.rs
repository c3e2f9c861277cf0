//! Test support (feature `testing`): a fresh, isolated database per test on
//! every reachable backend, and the one line that says a backend was skipped.
//!
//! - Memory: always, state store tests only; a fresh [`MemoryStateStore`]
//!   on the wall clock (listed by [`state_backends`], not [`sql_backends`]).
//! - SQLite: always; a temporary file.
//! - PostgreSQL: when `PAYGATE_TEST_POSTGRES_URL` is set; a fresh schema in
//!   that database (selected through the connection's `search_path`).
//! - MongoDB: when `PAYGATE_TEST_MONGODB_URI` is set; a fresh database.
//!
//! A skipped backend is announced once per test binary on stderr, written
//! directly so the test harness's output capture cannot hide it. A skipped
//! backend is never counted as run: the tests loop over [`sql_backends`] /
//! [`state_backends`] and only the listed ones execute.

#![allow(clippy::expect_used, clippy::panic)] // test support: fail loudly

use std::{io::Write, sync::Arc, sync::Once};

use crate::{MemoryStateStore, SqlDatabase, SqlStateStore, StateStore};

/// A backend the tests can run on.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The in-memory store (always; state store tests only, it has no SQL).
    Memory,
    /// SQLite (always).
    Sqlite,
    /// PostgreSQL at this URL.
    Postgres(String),
    /// MongoDB at this URI.
    Mongodb(String),
}

impl Backend {
    /// `memory`, `sqlite`, `postgres` or `mongodb`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::Postgres(_) => "postgres",
            Self::Mongodb(_) => "mongodb",
        }
    }
}

static PG_SKIP: Once = Once::new();
static MONGO_SKIP: Once = Once::new();

fn say_skipped(once: &Once, line: &str) {
    once.call_once(|| {
        let _ = writeln!(std::io::stderr(), "{line}");
    });
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// SQLite, plus PostgreSQL when `PAYGATE_TEST_POSTGRES_URL` is set.
pub fn sql_backends() -> Vec<Backend> {
    let mut v = vec![Backend::Sqlite];
    match env("PAYGATE_TEST_POSTGRES_URL") {
        Some(url) => v.push(Backend::Postgres(url)),
        None => say_skipped(
            &PG_SKIP,
            "SKIPPED backend postgres: PAYGATE_TEST_POSTGRES_URL is not set",
        ),
    }
    v
}

/// The memory backend, then [`sql_backends`], plus MongoDB when
/// `PAYGATE_TEST_MONGODB_URI` is set.
pub fn state_backends() -> Vec<Backend> {
    let mut v = vec![Backend::Memory];
    v.extend(sql_backends());
    match env("PAYGATE_TEST_MONGODB_URI") {
        Some(uri) => v.push(Backend::Mongodb(uri)),
        None => say_skipped(
            &MONGO_SKIP,
            "SKIPPED backend mongodb: PAYGATE_TEST_MONGODB_URI is not set",
        ),
    }
    v
}

/// What to remove when a test ends.
pub enum Cleanup {
    /// Nothing to remove (the memory backend).
    Nothing,
    /// A SQLite file and its WAL files.
    File(std::path::PathBuf),
    /// A PostgreSQL schema, dropped through the admin pool.
    Schema {
        /// Pool on the test database without the schema's search path.
        admin: SqlDatabase,
        /// Schema name.
        schema: String,
    },
    /// A MongoDB database.
    #[cfg(feature = "mongodb")]
    MongoDatabase(mongodb::Database),
}

impl Cleanup {
    /// Removes what the test created.
    pub async fn run(self) {
        match self {
            Self::Nothing => {}
            Self::File(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Self::Schema { admin, schema } => {
                if let SqlDatabase::Postgres(pool) = &admin {
                    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                        .execute(pool)
                        .await;
                }
                admin.close().await;
            }
            #[cfg(feature = "mongodb")]
            Self::MongoDatabase(db) => {
                let _ = db.drop().await;
            }
        }
    }
}

/// A fresh SQL database URL for one test (`Backend::Sqlite` or `Postgres`).
///
/// # Panics
/// On the memory or MongoDB backend, or when PostgreSQL cannot be reached.
pub async fn fresh_sql_url(backend: &Backend) -> (String, Cleanup) {
    let id = ulid::Ulid::new().to_string().to_lowercase();
    match backend {
        Backend::Sqlite => {
            let path = std::env::temp_dir().join(format!("paygate-test-{id}.db"));
            (format!("sqlite://{}", path.display()), Cleanup::File(path))
        }
        Backend::Postgres(url) => {
            let schema = format!("t_{id}");
            let admin = SqlDatabase::connect(url, 1)
                .await
                .expect("PAYGATE_TEST_POSTGRES_URL reachable");
            if let SqlDatabase::Postgres(pool) = &admin {
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(pool)
                    .await
                    .expect("create schema");
            }
            let sep = if url.contains('?') { '&' } else { '?' };
            let url =
                format!("{url}{sep}options=-c%20search_path%3D{schema}&application_name={schema}");
            (url, Cleanup::Schema { admin, schema })
        }
        Backend::Memory | Backend::Mongodb(_) => panic!("fresh_sql_url takes a SQL backend"),
    }
}

/// A fresh, migrated state store for one test.
///
/// # Panics
/// When the backend cannot be reached.
pub async fn fresh_state_store(backend: &Backend) -> (Arc<dyn StateStore>, Cleanup) {
    match backend {
        Backend::Memory => (
            Arc::new(MemoryStateStore::with_system_clock()),
            Cleanup::Nothing,
        ),
        Backend::Sqlite | Backend::Postgres(_) => {
            let (url, cleanup) = fresh_sql_url(backend).await;
            let db = SqlDatabase::connect(&url, 8)
                .await
                .expect("database reachable");
            db.migrate().await.expect("migrations apply");
            (Arc::new(SqlStateStore::new(db)), cleanup)
        }
        #[cfg(feature = "mongodb")]
        Backend::Mongodb(uri) => {
            let options = crate::MongoOptions {
                database: format!(
                    "paygate_test_{}",
                    ulid::Ulid::new().to_string().to_lowercase()
                ),
                ..crate::MongoOptions::default()
            };
            let store = crate::MongoStateStore::connect(uri, &options)
                .await
                .expect("MongoDB reachable");
            let db = store.database().clone();
            (Arc::new(store), Cleanup::MongoDatabase(db))
        }
        #[cfg(not(feature = "mongodb"))]
        Backend::Mongodb(_) => panic!("built without the mongodb feature"),
    }
}

/// Inserts `n` records built by `make(i)` into `realtime_payments` in
/// transactions of 5,000 rows: a fast seed for benchmarks.
///
/// # Panics
/// When an insert fails.
pub async fn seed_realtime(
    db: &SqlDatabase,
    n: usize,
    make: impl Fn(usize) -> paygate_core::PaymentRecord,
) {
    let sql = format!(
        "INSERT INTO realtime_payments ({}) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        crate::sql::RECORD_COLUMNS
    );
    let mut i = 0;
    while i < n {
        let end = (i + 5_000).min(n);
        crate::with_pool!(db, pool => {
            let mut tx = pool.begin().await.expect("begin");
            for k in i..end {
                let r = make(k);
                sqlx::query(&sql)
                    .bind(r.payment_id.as_str()).bind(r.merchant_id.as_str()).bind(r.order_id.as_str())
                    .bind(&r.payment_key).bind(r.amount).bind(&r.currency).bind(r.is_paid).bind(r.is_saved)
                    .bind(r.card_status.as_str()).bind(r.approved_at.as_deref()).bind(r.save_attempts)
                    .bind(r.batch_attempts).bind(r.failure_code.as_deref()).bind(r.last_error.as_deref())
                    .bind(&r.request_fingerprint).bind(r.idempotency_key.as_deref()).bind(r.created_at).bind(r.updated_at)
                    .execute(&mut *tx).await.expect("insert");
            }
            tx.commit().await.expect("commit");
        });
        i = end;
    }
}

/// Peak resident set size of this process, KiB (`VmHWM`; 0 where unknown).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
