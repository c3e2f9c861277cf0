//! The internal ledger (DESIGN.md §7), modelled in memory: idempotent by
//! payment id (same body: 200, another body: 409), with faults drawn from
//! the history's seed: 5xx before recording, answers lost after recording,
//! slow answers, and outages.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use paygate_ledger_api::{LedgerApi, LedgerApiError, LedgerEntry, LedgerOutcome, LedgerReversal};

use crate::rng::SimRng;

/// The ledger of one history.
pub struct SimLedger {
    rng: SimRng,
    entries: Mutex<BTreeMap<String, LedgerEntry>>,
    reversals: Mutex<BTreeMap<String, LedgerReversal>>,
    healed: AtomicBool,
    down: AtomicBool,
}

impl SimLedger {
    /// A ledger drawing its faults from `rng`.
    pub fn new(rng: SimRng) -> Self {
        Self {
            rng,
            entries: Mutex::new(BTreeMap::new()),
            reversals: Mutex::new(BTreeMap::new()),
            healed: AtomicBool::new(false),
            down: AtomicBool::new(false),
        }
    }

    /// No more faults from now on.
    pub fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
        self.down.store(false, Ordering::SeqCst);
    }

    /// Every call fails with 503 while `down`.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Every entry, by payment id.
    pub fn entries(&self) -> BTreeMap<String, LedgerEntry> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every reversal, by its idempotency key (`<payment_id>:cancel:<n>`).
    pub fn reversals(&self) -> BTreeMap<String, LedgerReversal> {
        self.reversals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The faults of one call before it is processed: latency, outage, 5xx.
    async fn before(&self) -> Result<bool, LedgerApiError> {
        let faulty = !self.healed.load(Ordering::SeqCst);
        if faulty {
            tokio::time::sleep(Duration::from_millis(self.rng.between(0, 100))).await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(LedgerApiError::Server(503));
        }
        if faulty && self.rng.chance(0.05) {
            return Err(LedgerApiError::Server(500));
        }
        Ok(faulty)
    }

    /// The faults of a call after it was processed: an answer lost on the
    /// way back.
    async fn after(
        &self,
        faulty: bool,
        outcome: Result<LedgerOutcome, LedgerApiError>,
    ) -> Result<LedgerOutcome, LedgerApiError> {
        if faulty && outcome.is_ok() && self.rng.chance(0.04) {
            tokio::time::sleep(Duration::from_secs(4)).await;
            return Err(LedgerApiError::Timeout);
        }
        outcome
    }
}

/// Idempotent by key: the same body again is `AlreadyRecorded`, another
/// body under the key is a conflict (409).
fn once<T: Clone + PartialEq>(
    map: &Mutex<BTreeMap<String, T>>,
    key: &str,
    value: &T,
) -> Result<LedgerOutcome, LedgerApiError> {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    match map.get(key) {
        Some(existing) if existing == value => Ok(LedgerOutcome::AlreadyRecorded),
        Some(_) => Err(LedgerApiError::Conflict),
        None => {
            map.insert(key.to_owned(), value.clone());
            Ok(LedgerOutcome::Recorded)
        }
    }
}

#[async_trait]
impl LedgerApi for SimLedger {
    async fn record(&self, e: &LedgerEntry, key: &str) -> Result<LedgerOutcome, LedgerApiError> {
        let faulty = self.before().await?;
        let outcome = once(&self.entries, key, e);
        self.after(faulty, outcome).await
    }

    /// A reversal of a payment the ledger holds (else 404, as the ledger
    /// refuses a reversal of an entry it does not hold); idempotent by key
    /// like [`LedgerApi::record`].
    async fn reverse(
        &self,
        r: &LedgerReversal,
        key: &str,
    ) -> Result<LedgerOutcome, LedgerApiError> {
        let faulty = self.before().await?;
        let holds = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&r.payment_id);
        if !holds {
            return Err(LedgerApiError::Rejected(404));
        }
        let outcome = once(&self.reversals, key, r);
        self.after(faulty, outcome).await
    }

    async fn get(&self, payment_id: &str) -> Result<Option<LedgerEntry>, LedgerApiError> {
        Ok(self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(payment_id)
            .cloned())
    }
}
