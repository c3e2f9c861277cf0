//! Test support (feature `testing`): a fresh, isolated database per test on
//! every reachable backend, and the one line that says a backend was skipped.
//!
//! - Memory: always, state store tests only; a fresh [`MemoryStateStore`]
//!   on the wall clock (listed by [`state_backends`], not [`sql_backends`]).
//! - SQLite: always; a temporary file.
//! - PostgreSQL: when `PAYGATE_TEST_POSTGRES_URL` is set; a fresh schema in
//!   that database (selected through the connection's `search_path`).
//! - MongoDB standalone: when `PAYGATE_TEST_MONGODB_URI` is set; a fresh
//!   database. Without transactions (moves are copy-then-delete).
//! - MongoDB replica set: when `PAYGATE_TEST_MONGODB_RS_URI` is set; a fresh
//!   database. Moves run in multi-document transactions (checked: a URI that
//!   reaches a standalone server fails the test instead of passing as a
//!   replica set).
//!
//! The end-to-end suites (gateway, batch, reconciliation, outage, crash) loop
//! over [`e2e_backends`]: every SQL backend with the state in SQL, plus
//! SQLite for the log, merchants, outbox and leases with the state records
//! in each configured MongoDB ([`E2eBackend`]); [`fresh_e2e`] gives a test
//! its fresh stores as a [`Config`] and as `PAYGATE_*` variables.
//!
//! A skipped backend is announced once per test binary on stderr, written
//! directly so the test harness's output capture cannot hide it. A skipped
//! backend is never counted as run: the tests loop over [`sql_backends`] /
//! [`state_backends`] and only the listed ones execute.

#![allow(clippy::expect_used, clippy::panic)] // test support: fail loudly

use std::{io::Write, sync::Arc, sync::Once};

use paygate_core::{config::StateStoreKind, Config, Secret};

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
    /// MongoDB at this URI, a standalone server (no transactions).
    Mongodb(String),
    /// MongoDB at this URI, a replica set (moves in transactions).
    MongodbReplicaSet(String),
}

impl Backend {
    /// `memory`, `sqlite`, `postgres`, `mongodb` or `mongodb-rs`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::Postgres(_) => "postgres",
            Self::Mongodb(_) => "mongodb",
            Self::MongodbReplicaSet(_) => "mongodb-rs",
        }
    }

    /// The MongoDB URI of a MongoDB backend.
    pub fn mongodb_uri(&self) -> Option<&str> {
        match self {
            Self::Mongodb(uri) | Self::MongodbReplicaSet(uri) => Some(uri),
            _ => None,
        }
    }
}

static PG_SKIP: Once = Once::new();
static MONGO_SKIP: Once = Once::new();
static MONGO_RS_SKIP: Once = Once::new();

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

/// The configured MongoDB servers: a standalone one when
/// `PAYGATE_TEST_MONGODB_URI` is set, a replica set when
/// `PAYGATE_TEST_MONGODB_RS_URI` is set (each unset one is announced as
/// skipped).
pub fn mongodb_backends() -> Vec<Backend> {
    let mut v = Vec::new();
    match env("PAYGATE_TEST_MONGODB_URI") {
        Some(uri) => v.push(Backend::Mongodb(uri)),
        None => say_skipped(
            &MONGO_SKIP,
            "SKIPPED backend mongodb: PAYGATE_TEST_MONGODB_URI is not set",
        ),
    }
    match env("PAYGATE_TEST_MONGODB_RS_URI") {
        Some(uri) => v.push(Backend::MongodbReplicaSet(uri)),
        None => say_skipped(
            &MONGO_RS_SKIP,
            "SKIPPED backend mongodb-rs: PAYGATE_TEST_MONGODB_RS_URI is not set",
        ),
    }
    v
}

/// The memory backend, then [`sql_backends`], then [`mongodb_backends`].
pub fn state_backends() -> Vec<Backend> {
    let mut v = vec![Backend::Memory];
    v.extend(sql_backends());
    v.extend(mongodb_backends());
    v
}

/// Where an end-to-end test keeps its data: the SQL database (the
/// request/response log, merchants, the alert outbox, leases, and the state
/// records unless `state` is set) and, optionally, the MongoDB that keeps
/// the state records (`state_store = "mongodb"`).
#[derive(Clone, Debug)]
pub struct E2eBackend {
    /// The SQL backend (`Sqlite` or `Postgres`).
    pub sql: Backend,
    /// `Some(Mongodb | MongodbReplicaSet)`: the state records live there.
    pub state: Option<Backend>,
}

impl E2eBackend {
    /// `sqlite`, `postgres`, or `sqlite+mongodb` / `sqlite+mongodb-rs`.
    pub fn name(&self) -> String {
        match &self.state {
            None => self.sql.name().to_owned(),
            Some(state) => format!("{}+{}", self.sql.name(), state.name()),
        }
    }

    /// True when the state records live in MongoDB.
    pub fn mongodb_state(&self) -> bool {
        self.state.is_some()
    }
}

impl From<Backend> for E2eBackend {
    /// A SQL backend with the state in SQL.
    fn from(sql: Backend) -> Self {
        Self { sql, state: None }
    }
}

/// The backends of the end-to-end suites: each of [`sql_backends`] with the
/// state in SQL, then SQLite with the state in each of [`mongodb_backends`]
/// (the SQL log, merchants, outbox and leases always stay in SQL; which SQL
/// database sits beside MongoDB is orthogonal to the state store, so the
/// cheapest one is used).
pub fn e2e_backends() -> Vec<E2eBackend> {
    let mut v: Vec<E2eBackend> = sql_backends()
        .into_iter()
        .map(|sql| E2eBackend { sql, state: None })
        .collect();
    v.extend(mongodb_backends().into_iter().map(|m| E2eBackend {
        sql: Backend::Sqlite,
        state: Some(m),
    }));
    v
}

/// The fresh stores of one end-to-end test (see [`fresh_e2e`]).
#[derive(Clone, Debug)]
pub struct E2eStores {
    /// The SQL database URL (`database_url`).
    pub database_url: String,
    /// `(mongodb_uri, mongodb_database)` when the state lives in MongoDB.
    pub mongodb: Option<(String, String)>,
}

impl E2eStores {
    /// A default [`Config`] pointed at these stores; callers set the rest
    /// (`Config { card_api_url: ..., ..stores.config() }`).
    pub fn config(&self) -> Config {
        let mut config = Config {
            database_url: Secret::new(self.database_url.clone()),
            ..Config::default()
        };
        if let Some((uri, database)) = &self.mongodb {
            config.state_store = StateStoreKind::Mongodb;
            config.mongodb_uri = Some(Secret::new(uri.clone()));
            config.mongodb_database = database.clone();
        }
        config
    }

    /// The same as `PAYGATE_*` environment variables, for a child process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![("PAYGATE_DATABASE_URL", self.database_url.clone())];
        if let Some((uri, database)) = &self.mongodb {
            v.push(("PAYGATE_STATE_STORE", "mongodb".to_owned()));
            v.push(("PAYGATE_MONGODB_URI", uri.clone()));
            v.push(("PAYGATE_MONGODB_DATABASE", database.clone()));
        }
        v
    }
}

/// Fresh stores for one end-to-end test: a fresh SQL database and, when the
/// backend keeps the state in MongoDB, a fresh MongoDB database name (the
/// application creates it; the cleanup drops it).
///
/// # Panics
/// When a backend cannot be reached.
pub async fn fresh_e2e(backend: &E2eBackend) -> (E2eStores, Cleanup) {
    let (database_url, sql_cleanup) = fresh_sql_url(&backend.sql).await;
    let Some(uri) = backend.state.as_ref().and_then(Backend::mongodb_uri) else {
        return (
            E2eStores {
                database_url,
                mongodb: None,
            },
            sql_cleanup,
        );
    };
    let database = format!(
        "paygate_test_{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let mongo_cleanup = mongo_database_cleanup(uri, &database).await;
    (
        E2eStores {
            database_url,
            mongodb: Some((uri.to_owned(), database)),
        },
        Cleanup::Many(vec![sql_cleanup, mongo_cleanup]),
    )
}

#[cfg(feature = "mongodb")]
async fn mongo_database_cleanup(uri: &str, database: &str) -> Cleanup {
    let client = mongodb::Client::with_uri_str(uri)
        .await
        .expect("a valid MongoDB test URI");
    Cleanup::MongoDatabase(client.database(database))
}

#[cfg(not(feature = "mongodb"))]
async fn mongo_database_cleanup(_uri: &str, _database: &str) -> Cleanup {
    panic!("built without the mongodb feature")
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
    /// Several of the above (not nested), removed in order.
    Many(Vec<Cleanup>),
}

impl Cleanup {
    /// Removes what the test created.
    pub async fn run(self) {
        match self {
            Self::Many(all) => {
                for one in all {
                    one.run_one().await;
                }
            }
            one => one.run_one().await,
        }
    }

    async fn run_one(self) {
        match self {
            Self::Nothing | Self::Many(_) => {}
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
        Backend::Memory | Backend::Mongodb(_) | Backend::MongodbReplicaSet(_) => {
            panic!("fresh_sql_url takes a SQL backend")
        }
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
        Backend::Mongodb(uri) | Backend::MongodbReplicaSet(uri) => {
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
            assert_eq!(
                store.uses_transactions(),
                matches!(backend, Backend::MongodbReplicaSet(_)),
                "{}: PAYGATE_TEST_MONGODB_URI must reach a standalone server and \
                 PAYGATE_TEST_MONGODB_RS_URI a replica set",
                backend.name()
            );
            let db = store.database().clone();
            (Arc::new(store), Cleanup::MongoDatabase(db))
        }
        #[cfg(not(feature = "mongodb"))]
        Backend::Mongodb(_) | Backend::MongodbReplicaSet(_) => {
            panic!("built without the mongodb feature")
        }
    }
}

/// A fresh inventory store for one test (SQL stores migrated; MongoDB on a
/// fresh database).
///
/// # Panics
/// When the backend cannot be reached.
pub async fn fresh_inventory_store(backend: &Backend) -> (Arc<dyn crate::InventoryStore>, Cleanup) {
    match backend {
        Backend::Memory => (
            Arc::new(crate::MemoryInventoryStore::new()),
            Cleanup::Nothing,
        ),
        Backend::Sqlite | Backend::Postgres(_) => {
            let (url, cleanup) = fresh_sql_url(backend).await;
            let db = SqlDatabase::connect(&url, 8)
                .await
                .expect("database reachable");
            db.migrate().await.expect("migrations apply");
            (Arc::new(crate::SqlInventoryStore::new(db)), cleanup)
        }
        #[cfg(feature = "mongodb")]
        Backend::Mongodb(uri) | Backend::MongodbReplicaSet(uri) => {
            let client = mongodb::Client::with_uri_str(uri)
                .await
                .expect("a valid MongoDB test URI");
            let db = client.database(&format!(
                "paygate_test_{}",
                ulid::Ulid::new().to_string().to_lowercase()
            ));
            let store = crate::MongoInventoryStore::new(db.clone())
                .await
                .expect("MongoDB reachable");
            (Arc::new(store), Cleanup::MongoDatabase(db))
        }
        #[cfg(not(feature = "mongodb"))]
        Backend::Mongodb(_) | Backend::MongodbReplicaSet(_) => {
            panic!("built without the mongodb feature")
        }
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
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
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
                    .bind(r.version)
                    .execute(&mut *tx).await.expect("insert");
            }
            tx.commit().await.expect("commit");
        });
        i = end;
    }
    // Statistics, as autovacuum would gather them on a table this size in
    // production: without them PostgreSQL takes any list of orderIds to
    // match the whole table and plans a sequential scan (the reconciliation
    // bench measured that, not the reconciliation, when it ran before
    // autovacuum reached the fresh table).
    if let SqlDatabase::Postgres(pool) = db {
        sqlx::query("ANALYZE realtime_payments")
            .execute(pool)
            .await
            .expect("analyze");
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
