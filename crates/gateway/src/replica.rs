//! The replica's status report: every [`REPORT_EVERY`] a `serve` process
//! writes what it alone knows — each downstream's circuit breaker state and
//! bulkhead use — into `replica_status`, so the operator console, another
//! process, can show every replica's view on its Health page. A replica that
//! stopped reporting is shown with the age of its last report.

use std::{sync::Arc, time::Duration};

use paygate_api_log::ReplicaStatus;
use paygate_payments::Saga;
use paygate_resilience::Downstream;
use serde_json::{json, Value};

/// How often a replica reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// The replica's name in reports: `$HOSTNAME` (a pod's name) or the host's
/// name, and the address it serves on.
pub fn replica_name(listen: std::net::SocketAddr) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", listen.port())
}

fn downstream(d: &Downstream) -> Value {
    let (in_use, max) = d.bulkhead_use();
    json!({
        "name": d.name(),
        "breaker": d.breaker().state().as_str(),
        "bulkheadInUse": in_use,
        "bulkheadMax": max,
    })
}

/// The snapshot a replica reports: `{"pid", "downstreams": [{name, breaker,
/// bulkheadInUse, bulkheadMax}], "ledgerRetriesPending"}`.
pub fn snapshot(saga: &Saga) -> Value {
    json!({
        "pid": std::process::id(),
        "downstreams": [
            downstream(saga.card_stack()),
            downstream(saga.list_stack()),
            downstream(saga.ledger_stack()),
        ],
        "ledgerRetriesPending": saga.retries().pending(),
    })
}

/// Reports every [`REPORT_EVERY`] until `stop` turns true. A failed write
/// is logged and tried again at the next tick: the report is advisory.
pub async fn run(
    saga: Arc<Saga>,
    status: ReplicaStatus,
    name: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = status.report(&name, &snapshot(&saga)).await {
            tracing::warn!(error = %e, "replica status not written; trying again");
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(REPORT_EVERY) => {}
        }
    }
}
