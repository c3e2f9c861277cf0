//! `paygate demo --flash-sale`: many buyers race for few units with stock
//! holds (issue 17, I7), through the real gateway over HTTP against the
//! sandbox simulators (flaky by default). Each buyer takes a hold for one
//! unit; some abandon it (half with `DELETE`, half by walking away and
//! letting it expire), some dawdle past their hold's time before paying,
//! the rest confirm (and retry once after a 503 or no answer). At the end
//! it reads every hold and the SKU back and compares the card simulator's
//! approvals with paygate's records, as the plain demo does.
//!
//! Prints `units`, `sold`, `oversold`, `holds_expired`, `holds_released`
//! beside `lost` and `double_charges` (and as JSON with `--json`); the exit
//! code is non-zero when anything was oversold, lost or charged twice.

use std::{collections::HashMap, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use futures_util::StreamExt;
use paygate_core::{crypto, CardStatus, Config, MerchantId, OrderId, Secret};
use paygate_gateway::Application;
use paygate_sandbox::{FaultProfile, SandboxServers};
use paygate_state_store::{Merchant, SqlMerchantStore};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;

const SECRET: &str = "test_sk_paygate_flash_sale";
const SKU: &str = "flash-sku";

/// The flash sale's knobs.
#[derive(Clone, Debug)]
pub struct FlashSale {
    /// Buyers racing.
    pub buyers: usize,
    /// Units on sale.
    pub units: i64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Fault preset of the sandbox.
    pub faults: String,
    /// Seed of the fault rolls.
    pub seed: u64,
    /// Print JSON.
    pub json: bool,
}

/// The result; `--json` prints exactly these keys.
#[derive(Debug, Default, Serialize)]
struct Summary {
    buyers: u64,
    units: i64,
    holds_granted: u64,
    out_of_stock: u64,
    hold_expired_answers: u64,
    sold: i64,
    oversold: i64,
    holds_expired: u64,
    holds_released: u64,
    holds_during: u64,
    approved: u64,
    sandbox_approvals: u64,
    lost: u64,
    double_charges: u64,
}

/// What one buyer does after getting a hold.
#[derive(Clone, Copy)]
enum Buyer {
    Pays,
    Deletes,
    WalksAway,
    Dawdles,
}

struct Api {
    client: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        match req.bearer_auth(&self.key).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or_default())
            }
            Err(_) => (0, Value::Null),
        }
    }

    async fn confirm(&self, order: &str) -> u16 {
        let body = json!({"paymentKey": format!("pk_{order}"), "orderId": order, "amount": 10_000});
        let url = format!("{}/v1/payments/confirm", self.base);
        self.send(self.client.post(url).json(&body)).await.0
    }
}

/// One buyer; returns (hold id if granted, answers seen).
async fn buyer(api: &Api, order: String, kind: Buyer) -> (Option<String>, u16, u16) {
    let ttl = match kind {
        Buyer::Pays | Buyer::Deletes => 60,
        Buyer::WalksAway | Buyer::Dawdles => 1,
    };
    let body = json!({"orderId": order, "items": [{"sku": SKU, "quantity": 1}], "ttlSeconds": ttl});
    let (status, hold) = api
        .send(
            api.client
                .post(format!("{}/v1/holds", api.base))
                .json(&body),
        )
        .await;
    if status != 201 {
        return (None, status, 0);
    }
    let id = hold["holdId"].as_str().unwrap_or_default().to_owned();
    let answer = match kind {
        Buyer::Deletes => {
            let url = format!("{}/v1/holds/{id}", api.base);
            api.send(api.client.delete(url)).await;
            0
        }
        Buyer::WalksAway => 0,
        Buyer::Dawdles | Buyer::Pays => {
            if matches!(kind, Buyer::Dawdles) {
                tokio::time::sleep(Duration::from_millis(1_500)).await;
            }
            let mut answer = api.confirm(&order).await;
            if answer == 0 || answer == 503 || answer == 409 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                answer = api.confirm(&order).await;
            }
            answer
        }
    };
    (Some(id), status, answer)
}

/// Runs the flash sale.
///
/// # Errors
/// Setup failures; invariant failures are the exit code.
pub async fn run(sale: FlashSale) -> anyhow::Result<ExitCode> {
    let mut profile = FaultProfile::preset(&sale.faults)
        .with_context(|| format!("unknown fault preset {:?}", sale.faults))?
        .with_seed(sale.seed);
    profile.drop_hold_ms = 3_000;
    profile.approve_duplicate_confirms = true;
    let sandbox = SandboxServers::start(profile, SECRET).await?;
    let run_id = ulid::Ulid::new().to_string().to_lowercase();
    let db_path = std::env::temp_dir().join(format!("paygate-flash-{run_id}.db"));
    let config = Config {
        listen: "127.0.0.1:0".to_owned(),
        database_url: Secret::new(format!("sqlite://{}", db_path.display())),
        card_api_url: Some(sandbox.card_url.clone()),
        card_api_secret_key: Some(Secret::new(SECRET.to_owned())),
        ledger_api_url: Some(sandbox.ledger_url.clone()),
        card_api_policy: paygate_core::config::DownstreamPolicy {
            attempt_timeout_ms: 1_000,
            ..paygate_core::config::DownstreamPolicy::card_api()
        },
        inbound_rate_limit_per_second: 0,
        ledger_retry_base_delay_ms: 20,
        ledger_retry_max_delay_ms: 500,
        ..Config::default()
    };
    let app = Application::build(TcpListener::bind("127.0.0.1:0").await?, &config).await?;
    let base = format!("http://{}", app.local_addr());
    let saga = app.saga();
    let db = app.database();
    let merchant_id = MerchantId::generate();
    let key = crypto::generate_api_key();
    SqlMerchantStore::new(db.clone())
        .create(
            &Merchant {
                merchant_id: merchant_id.clone(),
                name: "flash-sale".to_owned(),
                api_key_prefix: key
                    .expose()
                    .chars()
                    .take(crypto::API_KEY_DISPLAY_LEN)
                    .collect(),
                created_at: paygate_core::time::now_ms(),
                revoked_at: None,
            },
            &crypto::hash_api_key(&config.api_key_hash_key, key.expose()),
        )
        .await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stop_rx.await;
    }));
    let api = Arc::new(Api {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        base,
        key: key.expose().clone(),
    });
    let (status, _) = api
        .send(
            api.client
                .put(format!("{}/v1/inventory/{SKU}", api.base))
                .json(&json!({"stock": sale.units})),
        )
        .await;
    anyhow::ensure!(status == 200, "stocking the SKU answered {status}");

    let orders: Vec<String> = (0..sale.buyers)
        .map(|i| format!("flash-{run_id}-{i:06}"))
        .collect();
    let results: Vec<(String, Option<String>, u16, u16)> =
        futures_util::stream::iter(orders.iter().enumerate())
            .map(|(i, order)| {
                let api = api.clone();
                let order = order.clone();
                let kind = match i % 10 {
                    0 => Buyer::Deletes,
                    1 => Buyer::WalksAway,
                    2 => Buyer::Dawdles,
                    _ => Buyer::Pays,
                };
                async move {
                    let (hold, took, paid) = buyer(&api, order.clone(), kind).await;
                    (order, hold, took, paid)
                }
            })
            .buffer_unordered(sale.concurrency.max(1))
            .collect()
            .await;
    let _ = tokio::time::timeout(Duration::from_secs(60), saga.retries().wait_idle()).await;

    let mut s = Summary {
        buyers: sale.buyers as u64,
        units: sale.units,
        ..Summary::default()
    };
    for (_, hold, took, paid) in &results {
        match (hold, took) {
            (Some(id), _) => {
                s.holds_granted += 1;
                let (_, h) = api
                    .send(api.client.get(format!("{}/v1/holds/{id}", api.base)))
                    .await;
                match h["state"].as_str() {
                    Some("expired") => s.holds_expired += 1,
                    Some("released") => s.holds_released += 1,
                    Some("during") => s.holds_during += 1,
                    _ => {}
                }
            }
            (None, 409) => s.out_of_stock += 1,
            _ => {}
        }
        match paid {
            200 => s.approved += 1,
            409 => s.hold_expired_answers += 1,
            _ => {}
        }
    }
    let (_, level) = api
        .send(api.client.get(format!("{}/v1/inventory/{SKU}", api.base)))
        .await;
    s.sold = level["sold"].as_i64().unwrap_or(-1);
    let held = level["held"].as_i64().unwrap_or(0);
    s.oversold = (s.sold + held - sale.units).max(0);
    let store = saga.store().clone();
    let mut records = HashMap::new();
    for order in &orders {
        if let Some(r) = store
            .get_by_order(&merchant_id, &OrderId::parse(order)?)
            .await?
        {
            records.insert(order.clone(), r);
        }
    }
    let card = sandbox.card.stats();
    s.sandbox_approvals = card.approvals;
    s.double_charges = card.double_charges;
    s.lost = sandbox
        .card
        .approvals()
        .iter()
        .filter(|a| match records.get(&a.order_id) {
            Some(r) => !(r.is_paid || r.card_status == CardStatus::Unknown),
            None => true,
        })
        .count() as u64;
    let _ = stop_tx.send(());
    let _ = server.await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db_path.display()));
    }
    if sale.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "paygate flash sale: {} buyers for {} units, faults {:?} (seed {})",
            sale.buyers, sale.units, sale.faults, sale.seed
        );
        println!("  units                {}", s.units);
        println!("  holds granted        {}", s.holds_granted);
        println!("  out of stock (409)   {}", s.out_of_stock);
        println!("  HOLD_EXPIRED (409)   {}", s.hold_expired_answers);
        println!("  sold                 {}", s.sold);
        println!("  OVERSOLD             {}", s.oversold);
        println!("  holds_expired        {}", s.holds_expired);
        println!("  holds_released       {}", s.holds_released);
        println!(
            "  holds in payment     {}  (unknown outcomes: held until settled)",
            s.holds_during
        );
        println!("  approved             {}", s.approved);
        println!("  sandbox approvals    {}", s.sandbox_approvals);
        println!("  LOST approvals       {}", s.lost);
        println!("  DOUBLE charges       {}", s.double_charges);
    }
    let ok = s.oversold == 0 && s.sold <= s.units && s.lost == 0 && s.double_charges == 0;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
