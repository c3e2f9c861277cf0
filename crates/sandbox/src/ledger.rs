//! The ledger simulator (DESIGN.md §7): records by `paymentId` with
//! idempotent replay, 409 on a different body, and seeded 503s/outages;
//! reversals (cancels) by `Idempotency-Key: <paymentId>:cancel:<n>` with the
//! same replay rules, refused (422 `NOT_RECORDED`) for a payment it has not
//! recorded, as a system of record would.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Instant,
};

use axum::{
    extract::{Path, State},
    http::HeaderMap,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use paygate_ledger_api::{LedgerEntry, LedgerReversal};

use crate::{
    error_response,
    faults::{in_outage, roll, FaultProfile},
    CallObserver, ObserverSlot, SimTarget,
};

/// Call and record counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerStats {
    /// Record calls received.
    pub record_calls: u64,
    /// Distinct payments recorded.
    pub records: u64,
    /// Record calls answered 503 (faults, outages, down).
    pub failures: u64,
    /// Reversal calls received.
    pub reversal_calls: u64,
    /// Distinct reversals recorded.
    pub reversals: u64,
}

/// The ledger simulator.
pub struct LedgerSim {
    profile: FaultProfile,
    started: Instant,
    down: AtomicBool,
    records: Mutex<HashMap<String, LedgerEntry>>,
    reversals: Mutex<HashMap<String, LedgerReversal>>,
    reversal_calls: AtomicU64,
    attempts: Mutex<HashMap<String, u64>>,
    observer: ObserverSlot,
    record_calls: AtomicU64,
    failures: AtomicU64,
}

impl LedgerSim {
    /// A ledger with `profile`'s ledger faults.
    pub fn new(profile: FaultProfile) -> Self {
        Self {
            profile,
            started: Instant::now(),
            down: AtomicBool::new(false),
            records: Mutex::new(HashMap::new()),
            reversals: Mutex::new(HashMap::new()),
            reversal_calls: AtomicU64::new(0),
            attempts: Mutex::new(HashMap::new()),
            observer: ObserverSlot::default(),
            record_calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    fn records(&self) -> MutexGuard<'_, HashMap<String, LedgerEntry>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs an observer of record calls.
    pub fn set_observer(&self, observer: Arc<dyn CallObserver>) {
        self.observer.set(observer);
    }

    /// Takes the ledger down (503 to everything) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Counts so far.
    pub fn stats(&self) -> LedgerStats {
        LedgerStats {
            record_calls: self.record_calls.load(Ordering::SeqCst),
            records: self.records().len() as u64,
            failures: self.failures.load(Ordering::SeqCst),
            reversal_calls: self.reversal_calls.load(Ordering::SeqCst),
            reversals: self.reversals_map().len() as u64,
        }
    }

    fn reversals_map(&self) -> MutexGuard<'_, HashMap<String, LedgerReversal>> {
        self.reversals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reversals recorded for a payment, by idempotency key order.
    pub fn reversals_of(&self, payment_id: &str) -> Vec<(String, LedgerReversal)> {
        let mut out: Vec<_> = self
            .reversals_map()
            .iter()
            .filter(|(_, r)| r.payment_id == payment_id)
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The recorded entry of a payment.
    pub fn record(&self, payment_id: &str) -> Option<LedgerEntry> {
        self.records().get(payment_id).cloned()
    }

    fn unavailable(&self) -> bool {
        self.down.load(Ordering::SeqCst)
            || in_outage(
                &self.profile.ledger_outages,
                self.started.elapsed().as_millis() as u64,
            )
    }
}

/// `GET /sandbox/ledger` (not a ledger API): every entry and every reversal
/// recorded, `{"entries": [LedgerEntry], "reversals": [{"key": str,
/// "reversal": LedgerReversal}]}`, each sorted by key: the truth a drill
/// compares paygate's cancels with (one reversal per `DONE` cancel).
async fn everything(State(sim): State<Arc<LedgerSim>>) -> Response {
    let mut entries: Vec<LedgerEntry> = sim.records().values().cloned().collect();
    entries.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
    let mut reversals: Vec<(String, LedgerReversal)> = sim
        .reversals_map()
        .iter()
        .map(|(k, r)| (k.clone(), r.clone()))
        .collect();
    reversals.sort_by(|a, b| a.0.cmp(&b.0));
    let reversals: Vec<serde_json::Value> = reversals
        .into_iter()
        .map(|(key, reversal)| serde_json::json!({ "key": key, "reversal": reversal }))
        .collect();
    Json(serde_json::json!({ "entries": entries, "reversals": reversals })).into_response()
}

/// The ledger's HTTP routes.
pub fn router(sim: Arc<LedgerSim>) -> Router {
    Router::new()
        .route("/v1/ledger/transactions", post(record))
        .route("/v1/ledger/transactions/{payment_id}", get(fetch))
        .route("/v1/ledger/reversals", post(reverse))
        .route("/sandbox/ledger", get(everything))
        .with_state(sim)
}

async fn record(
    State(sim): State<Arc<LedgerSim>>,
    headers: HeaderMap,
    Json(entry): Json<LedgerEntry>,
) -> Response {
    sim.record_calls.fetch_add(1, Ordering::SeqCst);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    sim.observer
        .notify(SimTarget::Ledger, "record", key.clone())
        .await;
    let attempt = {
        let mut a = sim.attempts.lock().unwrap_or_else(|p| p.into_inner());
        let n = a.entry(entry.payment_id.clone()).or_insert(0);
        *n += 1;
        *n
    };
    tokio::time::sleep(sim.profile.ledger_latency(&entry.payment_id, attempt)).await;
    if sim.unavailable()
        || roll(sim.profile.seed, &entry.payment_id, "ledger", attempt)
            < sim.profile.ledger_error_rate
    {
        sim.failures.fetch_add(1, Ordering::SeqCst);
        return error_response(503, "LEDGER_UNAVAILABLE", "ledger is unavailable");
    }
    if key.as_deref() != Some(entry.payment_id.as_str()) {
        return error_response(
            400,
            "INVALID_IDEMPOTENCY_KEY",
            "Idempotency-Key must equal paymentId",
        );
    }
    let mut records = sim.records();
    match records.get(&entry.payment_id) {
        Some(existing) if *existing == entry => {
            (axum::http::StatusCode::OK, Json(entry)).into_response()
        }
        Some(_) => error_response(409, "CONFLICT", "payment recorded with a different body"),
        None => {
            records.insert(entry.payment_id.clone(), entry.clone());
            (axum::http::StatusCode::CREATED, Json(entry)).into_response()
        }
    }
}

async fn fetch(State(sim): State<Arc<LedgerSim>>, Path(payment_id): Path<String>) -> Response {
    if sim.unavailable() {
        return error_response(503, "LEDGER_UNAVAILABLE", "ledger is unavailable");
    }
    match sim.record(&payment_id) {
        Some(e) => Json(e).into_response(),
        None => error_response(404, "NOT_FOUND", "not recorded"),
    }
}

async fn reverse(
    State(sim): State<Arc<LedgerSim>>,
    headers: HeaderMap,
    Json(rev): Json<LedgerReversal>,
) -> Response {
    sim.reversal_calls.fetch_add(1, Ordering::SeqCst);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    sim.observer
        .notify(SimTarget::Ledger, "reverse", key.clone())
        .await;
    if sim.unavailable() {
        sim.failures.fetch_add(1, Ordering::SeqCst);
        return error_response(503, "LEDGER_UNAVAILABLE", "ledger is unavailable");
    }
    let Some(key) = key.filter(|k| {
        k.strip_prefix(rev.payment_id.as_str())
            .and_then(|rest| rest.strip_prefix(":cancel:"))
            .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n >= 1))
    }) else {
        return error_response(
            400,
            "INVALID_IDEMPOTENCY_KEY",
            "Idempotency-Key must be <paymentId>:cancel:<n>",
        );
    };
    if sim.record(&rev.payment_id).is_none() {
        return error_response(422, "NOT_RECORDED", "the payment is not recorded");
    }
    let mut reversals = sim.reversals_map();
    match reversals.get(&key) {
        Some(existing) if *existing == rev => {
            (axum::http::StatusCode::OK, Json(rev)).into_response()
        }
        Some(_) => error_response(409, "CONFLICT", "reversal recorded with a different body"),
        None => {
            reversals.insert(key, rev.clone());
            (axum::http::StatusCode::CREATED, Json(rev)).into_response()
        }
    }
}
