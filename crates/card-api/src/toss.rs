//! [`TossCardApi`]: the Toss Payments v1 adapter over `reqwest`.

use std::time::Duration;

use paygate_core::Secret;
use reqwest::{Client, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

use crate::{
    codes, CancelRequest, CardApi, CardApiError, CardPayment, ConfirmRequest, ErrorBody,
    Transaction, TransactionsQuery, CONFIRM_PATH,
};

/// Default per-attempt timeout of the transaction list (Toss Payments v1
/// `GET /v1/transactions`): 60 s, the least Toss asks clients to allow for
/// it.
pub const DEFAULT_LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// Toss Payments v1 client. Authenticates with
/// `Authorization: Basic base64("<secretKey>:")` and sends `Idempotency-Key`
/// on every state-changing call. Each attempt has its own timeout, so a hung
/// card company never holds a merchant request for longer: `timeout` for
/// confirm, lookup and cancel; the list's own (see
/// [`TossCardApi::with_list_timeout`]) for `GET /v1/transactions`, which Toss
/// asks clients to give at least 60 s.
#[derive(Clone)]
pub struct TossCardApi {
    client: Client,
    base_url: String,
    secret_key: Secret<String>,
    timeout: Duration,
    list_timeout: Duration,
}

impl std::fmt::Debug for TossCardApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TossCardApi")
            .field("base_url", &self.base_url)
            .field("secret_key", &self.secret_key)
            .field("timeout", &self.timeout)
            .field("list_timeout", &self.list_timeout)
            .finish()
    }
}

impl TossCardApi {
    /// A client for `base_url` (e.g. `https://api.tosspayments.com`, no
    /// trailing slash needed) with a per-attempt `timeout` for confirm,
    /// lookup and cancel; the transaction list gets [`DEFAULT_LIST_TIMEOUT`]
    /// unless [`TossCardApi::with_list_timeout`] says otherwise.
    pub fn new(
        client: Client,
        base_url: &str,
        secret_key: Secret<String>,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            secret_key,
            timeout,
            list_timeout: DEFAULT_LIST_TIMEOUT,
        }
    }

    /// The same client with `list_timeout` as the per-attempt timeout of
    /// Toss Payments v1 `GET /v1/transactions` (one page). Toss asks for at
    /// least 60 s; paygate's `card_api_list_attempt_timeout_ms` sets it.
    #[must_use]
    pub fn with_list_timeout(mut self, list_timeout: Duration) -> Self {
        self.list_timeout = list_timeout;
        self
    }

    /// The per-attempt timeout of confirm, lookup and cancel.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The per-attempt timeout of one transaction-list page.
    pub fn list_timeout(&self) -> Duration {
        self.list_timeout
    }

    async fn send<T: DeserializeOwned>(
        &self,
        builder: RequestBuilder,
        timeout: Duration,
    ) -> Result<T, CardApiError> {
        let resp = builder
            .basic_auth(self.secret_key.expose(), Some(""))
            .timeout(timeout)
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status();
        // Retry-After in delta-seconds; an HTTP-date form is not used by the
        // card company and is ignored (the backoff applies instead).
        let retry_after_s = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = resp.bytes().await.map_err(transport_error)?;
        if status.is_success() {
            return decode_ok(&bytes);
        }
        Err(error_from(status, &bytes, retry_after_s))
    }
}

/// Reads a 2xx body (a Payment, or the transaction list).
pub(crate) fn decode_ok<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CardApiError> {
    serde_json::from_slice(bytes).map_err(|e| CardApiError::Decode(e.to_string()))
}

fn transport_error(e: reqwest::Error) -> CardApiError {
    if e.is_timeout() {
        CardApiError::Timeout
    } else {
        // Strip the URL: it may carry an order id, never a key, but errors
        // travel to logs and we keep them short.
        CardApiError::Connection(e.without_url().to_string())
    }
}

pub(crate) fn error_from(
    status: StatusCode,
    bytes: &[u8],
    retry_after_s: Option<u64>,
) -> CardApiError {
    let body: Option<ErrorBody> = serde_json::from_slice(bytes).ok();
    let (code, message) = match body {
        Some(b) => (b.code, b.message),
        None => (format!("HTTP_{}", status.as_u16()), String::new()),
    };
    if status.is_server_error() {
        CardApiError::Server {
            status: status.as_u16(),
            code,
            message,
            retry_after_s,
        }
    } else {
        CardApiError::Rejected {
            status: status.as_u16(),
            code,
            message,
            retry_after_s,
        }
    }
}

#[async_trait::async_trait]
impl CardApi for TossCardApi {
    async fn confirm(
        &self,
        req: &ConfirmRequest,
        idempotency_key: &str,
    ) -> Result<CardPayment, CardApiError> {
        let url = format!("{}{CONFIRM_PATH}", self.base_url);
        self.send(
            self.client
                .post(url)
                .header("Idempotency-Key", idempotency_key)
                .json(req),
            self.timeout,
        )
        .await
    }

    async fn payment_by_order_id(
        &self,
        order_id: &str,
    ) -> Result<Option<CardPayment>, CardApiError> {
        let url = format!("{}/v1/payments/orders/{order_id}", self.base_url);
        match self.send(self.client.get(url), self.timeout).await {
            Ok(p) => Ok(Some(p)),
            Err(CardApiError::Rejected {
                status: 404, code, ..
            }) if code == codes::NOT_FOUND_PAYMENT => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn cancel(
        &self,
        payment_key: &str,
        req: &CancelRequest,
        idempotency_key: &str,
    ) -> Result<CardPayment, CardApiError> {
        let url = format!("{}/v1/payments/{payment_key}/cancel", self.base_url);
        self.send(
            self.client
                .post(url)
                .header("Idempotency-Key", idempotency_key)
                .json(req),
            self.timeout,
        )
        .await
    }

    async fn transactions(
        &self,
        query: &TransactionsQuery,
    ) -> Result<Vec<Transaction>, CardApiError> {
        let url = format!("{}/v1/transactions", self.base_url);
        self.send(self.client.get(url).query(query), self.list_timeout)
            .await
    }
}
