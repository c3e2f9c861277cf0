//! An in-memory [`ApiLog`] for the deterministic simulation: no I/O, no
//! threads, and writes that can be made to fail, so the simulation can
//! check that no downstream call is made without its `REQUEST` row (I3).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use paygate_state_store::StoreError;

use crate::{ApiLog, ConfirmEvidence, Kind, LogEntry, Target};

/// Decides whether one append fails (`true`: it fails before it is written).
pub type AppendFault = Arc<dyn Fn(&LogEntry<'_>) -> bool + Send + Sync>;

/// One row as the memory log keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryRow {
    /// The payment (or run subject) the row is filed under.
    pub payment_id: String,
    /// The downstream.
    pub target: Target,
    /// Request, response or error.
    pub kind: Kind,
    /// HTTP method.
    pub method: String,
    /// Path (and query).
    pub path: String,
    /// HTTP status of the answer.
    pub status_code: Option<i32>,
    /// The card company's `code` in the body, when it had one.
    pub code: Option<String>,
}

/// The log in memory, append-only.
#[derive(Default)]
pub struct MemoryApiLog {
    rows: Mutex<Vec<MemoryRow>>,
    fault: Mutex<Option<AppendFault>>,
}

impl MemoryApiLog {
    /// An empty log that never fails.
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs (or with `None` removes) the fault that decides which
    /// appends fail.
    pub fn set_fault(&self, fault: Option<AppendFault>) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Every row, in append order.
    pub fn rows(&self) -> Vec<MemoryRow> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait]
impl ApiLog for MemoryApiLog {
    async fn append(&self, entry: LogEntry<'_>) -> Result<(), StoreError> {
        let fault = self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if fault.is_some_and(|f| f(&entry)) {
            return Err(StoreError::Unavailable(
                "api log write failed (injected)".into(),
            ));
        }
        let code = entry
            .body
            .as_ref()
            .and_then(|b| b.get("code"))
            .and_then(|c| c.as_str())
            .map(str::to_owned);
        self.rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(MemoryRow {
                payment_id: entry.payment_id.to_string(),
                target: entry.target,
                kind: entry.kind,
                method: entry.method.to_owned(),
                path: entry.path.to_owned(),
                status_code: entry.status_code,
                code,
            });
        Ok(())
    }

    async fn confirm_evidence(
        &self,
        payment_id: &str,
        confirm_path: &str,
    ) -> Result<ConfirmEvidence, StoreError> {
        let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let mut evidence = ConfirmEvidence::default();
        for r in rows.iter().filter(|r| {
            r.payment_id == payment_id && r.target == Target::CardApi && r.path == confirm_path
        }) {
            if r.kind == Kind::Request {
                evidence.requests += 1;
            } else if r.kind == Kind::Error && r.code.as_deref() == Some(crate::NOT_SENT) {
                evidence.requests = (evidence.requests - 1).max(0);
            } else if let Some(status) = r.status_code {
                evidence.answers.push((status, r.code.clone()));
            }
        }
        Ok(evidence)
    }
}
