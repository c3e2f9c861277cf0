//! The console's test environment: the sandbox (its answers held, so a
//! confirm ends UNKNOWN), a fresh database per backend, the components
//! over them, one payment left UNKNOWN by the real saga, three operators,
//! and the console on port 0. Plus a small cookie-keeping HTTP client.
#![allow(dead_code)] // each suite uses a part

use std::{collections::HashMap, sync::Arc, time::Duration};

use paygate_console::{operators::Role, Console, ConsoleSettings};
use paygate_core::{config::DownstreamPolicy, Config, MerchantId, OrderId, PaymentRecord, Secret};
use paygate_payments::{Components, ConfirmInput, ConfirmOutcome, Saga};
use paygate_sandbox::{FaultProfile, SandboxServers};
use paygate_state_store::{
    testing::{fresh_sql_url, Backend, Cleanup},
    SqlDatabase, StateStore,
};

pub const CARD_SECRET: &str = "test_sk_console_card_secret_9f3a";
pub const PASSWORD: &str = "correct horse battery staple";

pub struct Env {
    pub sandbox: SandboxServers,
    pub db: SqlDatabase,
    pub store: Arc<dyn StateStore>,
    pub saga: Arc<Saga>,
    pub base: String,
    pub config: Config,
    pub unknown: PaymentRecord,
    pub merchant: MerchantId,
    _cleanup: Cleanup,
}

/// The environment on `backend`; `tweak` adjusts the configuration first.
pub async fn env(backend: &Backend, tweak: impl FnOnce(&mut Config)) -> Env {
    let profile = FaultProfile {
        drop_response_rate: 1.0,
        drop_hold_ms: 3_000,
        ..FaultProfile::none()
    };
    let sandbox = SandboxServers::start(profile, CARD_SECRET).await.unwrap();
    let (url, cleanup) = fresh_sql_url(backend).await;
    let mut config = Config {
        database_url: Secret::new(url.clone()),
        card_api_url: Some(sandbox.card_url.clone()),
        card_api_secret_key: Some(Secret::new(CARD_SECRET.into())),
        ledger_api_url: Some(sandbox.ledger_url.clone()),
        card_api_policy: DownstreamPolicy {
            attempt_timeout_ms: 400,
            deadline_ms: 2_000,
            max_attempts: 2,
            ..DownstreamPolicy::card_api()
        },
        card_api_lookup_attempts: 1,
        ..Config::default()
    };
    tweak(&mut config);
    let c = Components::build(&config, None).await.unwrap();
    let (db, store, saga) = (c.db.clone(), c.store.clone(), c.saga.clone());
    let merchant = MerchantId::generate();
    // The card company approves and its answer is held; the card goes down
    // at that moment, so the retry and the lookup fail too: UNKNOWN.
    let input = ConfirmInput {
        merchant_id: merchant.clone(),
        payment_key: "pk_console_lost_1".into(),
        order_id: OrderId::parse("order-console-1").unwrap(),
        amount: 15_000,
        idempotency_key: None,
    };
    let running = saga.clone();
    let confirm = tokio::spawn(async move { running.confirm(input).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sandbox.card.stats().approvals == 0 {
        assert!(std::time::Instant::now() < deadline, "no approval");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    sandbox.card.set_down(true);
    let ConfirmOutcome::Unknown(unknown) = confirm.await.unwrap() else {
        panic!("expected an unknown outcome");
    };
    sandbox.card.set_down(false);
    let ops = paygate_console::operators::OperatorStore::new(db.clone());
    for (name, role) in [
        ("alice", Role::Operator),
        ("victor", Role::Viewer),
        ("ada", Role::Admin),
    ] {
        assert!(ops.create(name, role, PASSWORD).await.unwrap());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let console = Console::build(listener, ConsoleSettings::from_config(&config), c).unwrap();
    let base = format!("http://{}", console.local_addr());
    tokio::spawn(console.run_until(std::future::pending()));
    Env {
        sandbox,
        db,
        store,
        saga,
        base,
        config,
        unknown,
        merchant,
        _cleanup: cleanup,
    }
}

/// The value of the first `name="csrf" value="..."` in `html`.
pub fn csrf_in(html: &str) -> String {
    let marker = r#"name="csrf" value=""#;
    let at = html.find(marker).expect("a form with a CSRF token") + marker.len();
    html[at..].split('"').next().unwrap().to_owned()
}

/// An HTTP client that keeps cookies and never follows redirects.
pub struct Client {
    http: reqwest::Client,
    pub base: String,
    pub cookies: HashMap<String, String>,
}

pub struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: base.to_owned(),
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn keep(&mut self, res: reqwest::Response) -> Answer {
        for v in res.headers().get_all(reqwest::header::SET_COOKIE) {
            let v = v.to_str().unwrap();
            let pair = v.split(';').next().unwrap();
            let (k, val) = pair.split_once('=').unwrap();
            if val.is_empty() || v.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), val.to_owned());
            }
        }
        Answer {
            status: res.status().as_u16(),
            location: res
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|l| l.to_str().unwrap().to_owned()),
            body: res.text().await.unwrap(),
        }
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, self.cookie_header())
            .send()
            .await
            .unwrap();
        self.keep(res).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Answer {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.keep(res).await
    }

    /// Opens the login page and posts `name` and `password` with its token.
    pub async fn login(&mut self, name: &str, password: &str) -> Answer {
        let page = self.get("/login").await;
        assert_eq!(page.status, 200, "{}", page.body);
        let csrf = csrf_in(&page.body);
        self.post(
            "/login",
            &[("name", name), ("password", password), ("csrf", &csrf)],
        )
        .await
    }
}
