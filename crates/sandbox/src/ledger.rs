//! The ledger simulator (DESIGN.md §7): records by `paymentId` with
//! idempotent replay, 409 on a different body, and seeded 503s/outages.

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
use paygate_ledger_api::LedgerEntry;

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
}

/// The ledger simulator.
pub struct LedgerSim {
    profile: FaultProfile,
    started: Instant,
    down: AtomicBool,
    records: Mutex<HashMap<String, LedgerEntry>>,
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
        }
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

/// The ledger's HTTP routes.
pub fn router(sim: Arc<LedgerSim>) -> Router {
    Router::new()
        .route("/v1/ledger/transactions", post(record))
        .route("/v1/ledger/transactions/{payment_id}", get(fetch))
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
