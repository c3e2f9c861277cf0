//! The delivery worker every `serve` replica runs: relay, number, deliver.
//!
//! Each pass relays the state store's outbox ([`EventStore::relay`]),
//! numbers new events ([`EventStore::number_all`]) and takes the due ones
//! ([`EventStore::due`]). A merchant's due events are delivered by one
//! task for that merchant, in order; a merchant whose task is still
//! running (a slow endpoint: up to the 10 s timeout per try) is skipped
//! until it finishes, so no merchant's endpoint holds another's events.
//! A try takes its event with a compare-and-set that moves `next_at` on by
//! [`LEASE`]: a replica that dies mid-try leaves the event to be taken
//! again once the lease has passed (the merchant may then get it twice,
//! with the same `eventId`).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use paygate_core::{Clock, MerchantId};
use paygate_state_store::StateStore;
use tokio::sync::watch;

use crate::{
    endpoint::PublicOnlyResolver,
    secrets::SecretsKey,
    signature,
    store::{EventRow, EventStore},
};

/// How long a try holds its event before another replica may take it.
pub const LEASE: Duration = Duration::from_secs(60);

/// Time a delivery has for its whole request and response (DESIGN.md §5).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Due events taken per pass.
const PICK: u32 = 200;

/// When a failed try is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait after the first failed try, ms; each later wait is three times
    /// the one before, at most a day.
    pub first_wait_ms: u64,
    /// Tries before the event is marked `failed` (an operator can resend
    /// it; the merchant can still read it from `GET /v1/events`).
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    /// 10 s, 30 s, 90 s, ... (about 3 days over 12 tries).
    fn default() -> Self {
        Self {
            first_wait_ms: 10_000,
            max_attempts: 12,
        }
    }
}

impl RetryPolicy {
    /// The wait after failed try number `attempt` (from 1), ms.
    pub fn wait_ms(&self, attempt: i64) -> u64 {
        let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
        self.first_wait_ms
            .saturating_mul(3_u64.saturating_pow(exp))
            .min(86_400_000)
    }
}

/// What the worker needs.
#[derive(Clone)]
pub struct Delivery {
    /// The SQL side.
    pub events: EventStore,
    /// The state store (for the relay of its outbox).
    pub state: Arc<dyn StateStore>,
    /// Opens the signing secrets; `None`: nothing is delivered (events
    /// are still numbered, for `GET /v1/events`).
    pub secrets: Option<SecretsKey>,
    /// The HTTP client (see [`client`]).
    pub http: reqwest::Client,
    /// Retry schedule.
    pub retry: RetryPolicy,
    /// How often to look for due events.
    pub poll: Duration,
    /// The clock for `next_at` and the signature's `t`.
    pub clock: Clock,
}

/// The delivery client: no redirects, [`DELIVERY_TIMEOUT`], and unless
/// `allow_private` a resolver that connects to public addresses only.
///
/// # Errors
/// `reqwest`'s, when the TLS backend cannot start.
pub fn client(allow_private: bool) -> Result<reqwest::Client, reqwest::Error> {
    let b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(DELIVERY_TIMEOUT)
        .user_agent(concat!("paygate-webhooks/", env!("CARGO_PKG_VERSION")));
    if allow_private {
        b.build()
    } else {
        b.dns_resolver(Arc::new(PublicOnlyResolver)).build()
    }
}

/// Runs until `stop` turns true, then lets running deliveries finish.
pub async fn run(d: Delivery, mut stop: watch::Receiver<bool>) {
    let busy: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        if *stop.borrow() {
            break;
        }
        if let Err(e) = pass(&d, &busy, &mut tasks).await {
            tracing::warn!(error = %e, "webhook delivery pass failed; trying again");
        }
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            _ = tokio::time::sleep(d.poll) => {}
            _ = stop.changed() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// One pass: relay, number, start a task per merchant with due events.
async fn pass(
    d: &Delivery,
    busy: &Arc<Mutex<HashSet<String>>>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), paygate_state_store::StoreError> {
    d.events.relay(d.state.as_ref()).await?;
    d.events.number_all().await?;
    if let Ok((unnumbered, pending)) = d.events.backlog().await {
        metrics::gauge!("paygate_events_unnumbered").set(unnumbered as f64);
        metrics::gauge!("paygate_webhook_deliveries_pending").set(pending as f64);
    }
    let Some(key) = d.secrets.clone() else {
        return Ok(());
    };
    let due = d.events.due(d.clock.now_ms(), PICK).await?;
    let mut by_merchant: BTreeMap<String, Vec<EventRow>> = BTreeMap::new();
    for e in due {
        by_merchant
            .entry(e.event.merchant_id.as_str().to_owned())
            .or_default()
            .push(e);
    }
    for (merchant, events) in by_merchant {
        {
            let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
            if !b.insert(merchant.clone()) {
                continue;
            }
        }
        let (d, key, busy) = (d.clone(), key.clone(), busy.clone());
        tasks.spawn(async move {
            deliver_merchant(&d, &key, &merchant, events).await;
            busy.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&merchant);
        });
    }
    Ok(())
}

/// Delivers one merchant's due events in order. A payment whose event
/// failed this time has its later events left for after the retry.
async fn deliver_merchant(d: &Delivery, key: &SecretsKey, merchant: &str, events: Vec<EventRow>) {
    let merchant_id = MerchantId::from_stored(merchant);
    let endpoint = match d.events.endpoint(&merchant_id).await {
        Ok(Some(e)) => e,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(merchant_id = merchant, error = %e, "could not read the webhook endpoint");
            return;
        }
    };
    let secret = match key.open(merchant, &endpoint.secret_sealed) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(merchant_id = merchant, error = %e, "the signing secret does not open; is secrets_key the one it was sealed with?");
            return;
        }
    };
    let mut held: HashSet<String> = HashSet::new();
    for e in events {
        if held.contains(e.event.payment_id.as_str()) {
            continue;
        }
        let now = d.clock.now_ms();
        let lease = now + i64::try_from(LEASE.as_millis()).unwrap_or(60_000);
        match d.events.take(&e.event.event_id, e.next_at, lease).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(err) => {
                tracing::warn!(event_id = %e.event.event_id, error = %err, "could not take a webhook delivery");
                continue;
            }
        }
        let attempt = e.attempts + 1;
        let started = std::time::Instant::now();
        let result = post(d, &endpoint.url, secret.expose(), &e).await;
        metrics::histogram!("paygate_webhook_delivery_seconds")
            .record(started.elapsed().as_secs_f64());
        let now = d.clock.now_ms();
        let (delivery, next_at, status, error) = match result {
            Ok(s) if (200..300).contains(&s) => ("delivered", now, Some(s), None),
            other => {
                let (status, why) = match other {
                    Ok(s) => (Some(s), format!("the endpoint answered {s}")),
                    Err(why) => (None, why),
                };
                held.insert(e.event.payment_id.as_str().to_owned());
                if attempt >= i64::from(d.retry.max_attempts) {
                    tracing::warn!(event_id = %e.event.event_id, merchant_id = merchant, attempt, error = %why,
                        "gave up delivering a webhook; `paygate webhooks resend` sends it again");
                    ("failed", now, status, Some(why))
                } else {
                    let wait = i64::try_from(d.retry.wait_ms(attempt)).unwrap_or(i64::MAX / 2);
                    tracing::info!(event_id = %e.event.event_id, merchant_id = merchant, attempt, error = %why,
                        retry_in_ms = wait, "a webhook delivery failed; retrying later");
                    ("pending", now.saturating_add(wait), status, Some(why))
                }
            }
        };
        metrics::counter!("paygate_webhook_deliveries_total", "result" => delivery).increment(1);
        let recorded = d
            .events
            .record(
                &e.event.event_id,
                lease,
                delivery,
                next_at,
                status,
                error.as_deref(),
                now,
            )
            .await;
        match recorded {
            Ok(true) => {}
            // The lease passed while this try ran: another worker (or an
            // operator's resend) owns the event now, and its try decides.
            Ok(false) => {
                held.insert(e.event.payment_id.as_str().to_owned());
            }
            Err(err) => {
                // The lease passes and the event is tried again.
                tracing::warn!(event_id = %e.event.event_id, error = %err, "could not record a webhook delivery");
                held.insert(e.event.payment_id.as_str().to_owned());
            }
        }
    }
}

/// One POST; the endpoint's status, or why there was none. The body of the
/// answer is never read (a hostile endpoint cannot make us buffer it).
async fn post(d: &Delivery, url: &str, secret: &str, e: &EventRow) -> Result<u16, String> {
    let body = crate::event_json(e).to_string();
    let t = d.clock.now_ms() / 1_000;
    let sig = signature::sign(secret, t, body.as_bytes());
    let resp = d
        .http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(signature::HEADER, sig)
        .header("Paygate-Event-Id", e.event.event_id.as_str())
        .body(body)
        .send()
        .await
        .map_err(|err| {
            if err.is_timeout() {
                "timed out".to_owned()
            } else if err.is_connect() {
                "could not connect".to_owned()
            } else {
                "the request failed".to_owned()
            }
        })?;
    Ok(resp.status().as_u16())
}
