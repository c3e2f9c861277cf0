//! Test helpers: a real gateway on port 0 against the sandbox simulators
//! over HTTP, with its own database (a temporary SQLite file, or a fresh
//! PostgreSQL schema when `PAYGATE_TEST_POSTGRES_URL` is set) and, on the
//! MongoDB backends of `e2e_backends()`, its state records in a fresh
//! MongoDB database.

use std::{sync::Arc, time::Duration};

use paygate_core::{config::DownstreamPolicy, crypto, Config, MerchantId, Secret};
use paygate_gateway::Application;
use paygate_sandbox::{FaultProfile, SandboxServers};
use paygate_state_store::{Merchant, SqlDatabase, SqlMerchantStore};
use serde_json::Value;
use tokio::net::TcpListener;

pub const SECRET: &str = "test_sk_paygate_tests";

pub use paygate_state_store::testing::{e2e_backends as backends, Backend, E2eBackend};
use paygate_state_store::testing::{fresh_e2e, Cleanup};

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub sandbox: SandboxServers,
    pub app_db: SqlDatabase,
    pub saga: Arc<paygate_gateway::Saga>,
    pub alerts: Arc<paygate_gateway::OutboxAlerter>,
    pub key: String,
    pub config: Config,
    cleanup: Option<Cleanup>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Starts the sandbox with `profile` and the real gateway against it, on
/// `backend` (a SQL [`Backend`], or an [`E2eBackend`] that may keep the
/// state in MongoDB).
pub async fn spawn_app<B: Clone + Into<E2eBackend>>(
    backend: &B,
    profile: FaultProfile,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    let backend: E2eBackend = backend.clone().into();
    // These suites measure paygate's own I2: the sandbox approves a second
    // confirm of an order under a new key (Toss would refuse it), so an
    // attempted double charge shows up as a second approval.
    let profile = profile.with_duplicate_confirms_approved(true);
    let sandbox = SandboxServers::start(profile, SECRET)
        .await
        .expect("sandbox starts");
    let (stores, cleanup) = fresh_e2e(&backend).await;
    let mut config = Config {
        listen: "127.0.0.1:0".to_owned(),
        card_api_url: Some(sandbox.card_url.clone()),
        card_api_secret_key: Some(Secret::new(SECRET.to_owned())),
        ledger_api_url: Some(sandbox.ledger_url.clone()),
        card_api_policy: DownstreamPolicy {
            attempt_timeout_ms: 2_000,
            ..DownstreamPolicy::card_api()
        },
        ledger_retry_base_delay_ms: 20,
        ledger_retry_max_delay_ms: 100,
        ledger_retry_max_attempts: 20,
        ..stores.config()
    };
    tweak(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app = Application::build(listener, &config)
        .await
        .expect("app builds");
    let base = format!("http://{}", app.local_addr());
    let app_db = app.database();
    let saga = app.saga();
    let alerts = app.alerter();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(app.run_until(async {
        let _ = stop_rx.await;
    }));
    let (_, key) = create_merchant(&app_db, &config, "merchant-a").await;
    TestApp {
        base,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        sandbox,
        app_db,
        saga,
        alerts,
        key,
        config,
        cleanup: Some(cleanup),
        stop: Some(stop),
        served: Some(served),
    }
}

pub async fn create_merchant(
    db: &SqlDatabase,
    config: &Config,
    name: &str,
) -> (MerchantId, String) {
    let key = crypto::generate_api_key();
    let merchant = Merchant {
        merchant_id: MerchantId::generate(),
        name: name.to_owned(),
        api_key_prefix: key.expose()[..crypto::API_KEY_DISPLAY_LEN].to_owned(),
        created_at: paygate_core::time::now_ms(),
        revoked_at: None,
    };
    SqlMerchantStore::new(db.clone())
        .create(
            &merchant,
            &crypto::hash_api_key(&config.api_key_hash_key, key.expose()),
        )
        .await
        .expect("merchant created");
    (merchant.merchant_id, key.expose().clone())
}

pub fn confirm_body(order_id: &str, amount: i64) -> Value {
    serde_json::json!({"paymentKey": format!("pk_{order_id}"), "orderId": order_id, "amount": amount})
}

impl TestApp {
    pub async fn confirm_with(
        &self,
        key: &str,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}/v1/payments/confirm", self.base))
            .bearer_auth(key)
            .json(body);
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.expect("request sent")
    }

    pub async fn confirm(&self, body: &Value) -> reqwest::Response {
        self.confirm_with(&self.key, body, None).await
    }

    pub async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .expect("request sent")
    }

    pub fn log(&self) -> paygate_api_log::SqlApiLog {
        paygate_api_log::SqlApiLog::new(self.app_db.clone())
    }

    /// Sends the shutdown signal (SIGTERM in `serve`) and returns at once.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits until `run_until` has returned.
    pub async fn served(&mut self) -> std::io::Result<()> {
        match self.served.take() {
            Some(handle) => handle.await.expect("run_until does not panic"),
            None => Ok(()),
        }
    }

    /// Stops the server and removes the test's database.
    pub async fn teardown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.app_db.close().await;
        if let Some(c) = self.cleanup.take() {
            c.run().await;
        }
    }
}

/// Makes every insert into `api_logs` fail, as a read-only log table would.
pub async fn make_log_read_only(db: &SqlDatabase) {
    match db {
        SqlDatabase::Sqlite(db) => {
            let pool = &db.pool;
            sqlx::query(
                "CREATE TRIGGER api_logs_read_only BEFORE INSERT ON api_logs BEGIN SELECT RAISE(ABORT, 'api_logs is read-only'); END",
            )
            .execute(pool)
            .await
            .expect("trigger");
        }
        SqlDatabase::Postgres(pool) => {
            sqlx::query(
                "CREATE FUNCTION api_logs_refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'api_logs is read-only'; END $$ LANGUAGE plpgsql",
            )
            .execute(pool)
            .await
            .expect("function");
            sqlx::query("CREATE TRIGGER api_logs_read_only BEFORE INSERT ON api_logs FOR EACH ROW EXECUTE FUNCTION api_logs_refuse()")
                .execute(pool)
                .await
                .expect("trigger");
        }
    }
}

/// Undoes [`make_log_read_only`].
pub async fn make_log_writable(db: &SqlDatabase) {
    let sql = match db {
        SqlDatabase::Sqlite(_) => "DROP TRIGGER api_logs_read_only",
        SqlDatabase::Postgres(_) => "DROP TRIGGER api_logs_read_only ON api_logs",
    };
    paygate_state_store::with_pool!(db, pool => { sqlx::query(sql).execute(pool).await.expect("drop trigger"); });
}
