//! paygate-ledger-api: the internal ledger (the system of record used for
//! merchant settlement), as the [`LedgerApi`] trait and its HTTP client
//! [`HttpLedgerApi`] (DESIGN.md §7).
//!
//! Use it to record an approved payment and the reversal of each cancel
//! (refund) of it. Every record call carries `Idempotency-Key: <payment_id>`
//! and every reversal `Idempotency-Key: <payment_id>:cancel:<n>`, so any
//! number of retries records each once.

use std::time::Duration;

use reqwest::Client;
use serde::{Deserialize, Serialize};

/// Path of the record call.
pub const RECORD_PATH: &str = "/v1/ledger/transactions";

/// Body of `POST /v1/ledger/transactions`. `amount` is in minor units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    /// paygate's payment id (also the idempotency key).
    pub payment_id: String,
    /// The merchant.
    pub merchant_id: String,
    /// The merchant's order id.
    pub order_id: String,
    /// The card company's key.
    pub payment_key: String,
    /// Amount, minor units.
    pub amount: i64,
    /// ISO 4217 currency.
    pub currency: String,
    /// The card company's `approvedAt`, RFC 3339.
    pub approved_at: String,
}

/// Path of the reversal call (a cancel, DESIGN.md §7).
pub const REVERSAL_PATH: &str = "/v1/ledger/reversals";

/// Body of `POST /v1/ledger/reversals`: one cancel (refund) of a recorded
/// payment. `cancel_amount` is in minor units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerReversal {
    /// paygate's payment id (recorded before any reversal of it).
    pub payment_id: String,
    /// Amount refunded, minor units.
    pub cancel_amount: i64,
    /// ISO 4217 currency.
    pub currency: String,
    /// The card company's `canceledAt`, RFC 3339.
    pub canceled_at: String,
    /// The merchant's `cancelReason`.
    pub reason: String,
}

/// What a successful record call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerOutcome {
    /// 201: recorded now.
    Recorded,
    /// 200: it was already recorded with the same body.
    AlreadyRecorded,
}

/// What went wrong with a ledger call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerApiError {
    /// 409: the payment id is recorded with a different body. Never retried;
    /// an operator must look.
    #[error("ledger holds this payment with a different body")]
    Conflict,
    /// Any other 4xx: our request is wrong. Never retried.
    #[error("ledger refused the request: {0}")]
    Rejected(u16),
    /// 5xx: transient, retry.
    #[error("ledger server error: {0}")]
    Server(u16),
    /// No answer in time: transient, retry (idempotent).
    #[error("ledger call timed out")]
    Timeout,
    /// Connection failed or was reset: transient, retry.
    #[error("ledger connection failed: {0}")]
    Connection(String),
    /// An answer that could not be read.
    #[error("ledger answer could not be decoded: {0}")]
    Decode(String),
}

impl LedgerApiError {
    /// True when a retry (same idempotency key) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Server(_) | Self::Timeout | Self::Connection(_) | Self::Decode(_)
        )
    }

    /// The HTTP status, when an answer arrived.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Conflict => Some(409),
            Self::Rejected(s) | Self::Server(s) => Some(*s),
            _ => None,
        }
    }
}

/// The ledger, as paygate uses it.
#[async_trait::async_trait]
pub trait LedgerApi: Send + Sync + 'static {
    /// Records an approved payment with `Idempotency-Key: <idempotency_key>`.
    ///
    /// # Errors
    /// [`LedgerApiError`]; [`LedgerApiError::is_transient`] says whether to retry.
    async fn record(
        &self,
        entry: &LedgerEntry,
        idempotency_key: &str,
    ) -> Result<LedgerOutcome, LedgerApiError>;

    /// Reads a recorded payment; `Ok(None)` on 404.
    ///
    /// # Errors
    /// [`LedgerApiError`].
    async fn get(&self, payment_id: &str) -> Result<Option<LedgerEntry>, LedgerApiError>;

    /// Records the reversal of one cancel with `Idempotency-Key:
    /// <payment_id>:cancel:<n>`: 201 recorded, 200 already recorded with the
    /// same body, 409 that key with another body. A ledger that keeps no
    /// reversals keeps this default and refuses with
    /// [`LedgerApiError::Rejected`] 501.
    ///
    /// # Errors
    /// [`LedgerApiError`]; [`LedgerApiError::is_transient`] says whether to retry.
    async fn reverse(
        &self,
        reversal: &LedgerReversal,
        idempotency_key: &str,
    ) -> Result<LedgerOutcome, LedgerApiError> {
        let _ = (reversal, idempotency_key);
        Err(LedgerApiError::Rejected(501))
    }
}

/// HTTP client of the ledger API, with a per-call timeout.
#[derive(Clone, Debug)]
pub struct HttpLedgerApi {
    client: Client,
    base_url: String,
    timeout: Duration,
}

impl HttpLedgerApi {
    /// A client for `base_url` with a per-call `timeout`.
    pub fn new(client: Client, base_url: &str, timeout: Duration) -> Self {
        Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            timeout,
        }
    }
}

fn transport_error(e: reqwest::Error) -> LedgerApiError {
    if e.is_timeout() {
        LedgerApiError::Timeout
    } else {
        LedgerApiError::Connection(e.without_url().to_string())
    }
}

/// The outcome of a record or reversal call by its status.
fn write_outcome(status: u16) -> Result<LedgerOutcome, LedgerApiError> {
    match status {
        201 => Ok(LedgerOutcome::Recorded),
        200 => Ok(LedgerOutcome::AlreadyRecorded),
        409 => Err(LedgerApiError::Conflict),
        s if s >= 500 => Err(LedgerApiError::Server(s)),
        s => Err(LedgerApiError::Rejected(s)),
    }
}

#[async_trait::async_trait]
impl LedgerApi for HttpLedgerApi {
    async fn record(
        &self,
        entry: &LedgerEntry,
        idempotency_key: &str,
    ) -> Result<LedgerOutcome, LedgerApiError> {
        let resp = self
            .client
            .post(format!("{}{RECORD_PATH}", self.base_url))
            .header("Idempotency-Key", idempotency_key)
            .timeout(self.timeout)
            .json(entry)
            .send()
            .await
            .map_err(transport_error)?;
        write_outcome(resp.status().as_u16())
    }

    async fn reverse(
        &self,
        reversal: &LedgerReversal,
        idempotency_key: &str,
    ) -> Result<LedgerOutcome, LedgerApiError> {
        let resp = self
            .client
            .post(format!("{}{REVERSAL_PATH}", self.base_url))
            .header("Idempotency-Key", idempotency_key)
            .timeout(self.timeout)
            .json(reversal)
            .send()
            .await
            .map_err(transport_error)?;
        write_outcome(resp.status().as_u16())
    }

    async fn get(&self, payment_id: &str) -> Result<Option<LedgerEntry>, LedgerApiError> {
        let resp = self
            .client
            .get(format!("{}{RECORD_PATH}/{payment_id}", self.base_url))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(transport_error)?;
        match resp.status().as_u16() {
            200 => resp
                .json()
                .await
                .map(Some)
                .map_err(|e| LedgerApiError::Decode(e.to_string())),
            404 => Ok(None),
            s if s >= 500 => Err(LedgerApiError::Server(s)),
            s => Err(LedgerApiError::Rejected(s)),
        }
    }
}
