//! paygate-card-api: the [`CardApi`] trait and its production adapter,
//! [`TossCardApi`], which speaks the Toss Payments core API v1.
//!
//! Use [`CardApi`] wherever paygate needs the card company: the confirm saga,
//! the batch lookups and the reconciliation. The wire types ([`CardPayment`],
//! [`ConfirmRequest`], [`Transaction`], [`ErrorBody`]) are shared with the
//! sandbox simulator so both sides speak one shape.
//!
//! Source: Toss Payments v1 — `POST /v1/payments/confirm`,
//! `GET /v1/payments/orders/{orderId}`, `POST /v1/payments/{paymentKey}/cancel`,
//! `GET /v1/transactions`.

mod amount;
mod class;
#[cfg(test)]
mod fixtures;
mod toss;
mod types;

pub use amount::{minor_unit_exponent, AmountError};
pub use class::{class_of_answer, class_of_code, CodeClass, DocumentedCode, CODE_TABLE};
pub use toss::{TossCardApi, DEFAULT_LIST_TIMEOUT};
pub use types::*;

/// What went wrong with a card API call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardApiError {
    /// A non-5xx error answer with the card company's `{code, message}`
    /// (a decline, a refused request, our key refused, a temporary error sent
    /// as 400, ...): see [`CardApiError::class`] for what it means.
    #[error("card API refused the request: {status} {code}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The card company's error code (an open set).
        code: String,
        /// The card company's message (may be shown to operators, not logged
        /// with card data: it carries none).
        message: String,
        /// `Retry-After` of the answer, in seconds (429).
        retry_after_s: Option<u64>,
    },
    /// A 5xx answer. The card company may or may not have acted.
    #[error("card API server error: {status} {code}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The card company's error code, or `HTTP_<status>` when the body
        /// had none.
        code: String,
        /// The card company's message.
        message: String,
        /// `Retry-After` of the answer, in seconds (503).
        retry_after_s: Option<u64>,
    },
    /// No answer within the per-attempt timeout.
    #[error("card API call timed out")]
    Timeout,
    /// The connection failed or was reset.
    #[error("card API connection failed: {0}")]
    Connection(String),
    /// A 2xx answer whose body could not be read.
    #[error("card API answer could not be decoded: {0}")]
    Decode(String),
}

impl CardApiError {
    /// The HTTP status, when an answer arrived.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Rejected { status, .. } | Self::Server { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The answer's `Retry-After`, when it had one.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Rejected { retry_after_s, .. } | Self::Server { retry_after_s, .. } => {
                retry_after_s.map(std::time::Duration::from_secs)
            }
            _ => None,
        }
    }

    /// The card company's code, when an answer carried one; paygate's own
    /// code (`TIMEOUT`, `CONNECTION`, `DECODE`) otherwise.
    pub fn code(&self) -> &str {
        match self {
            Self::Rejected { code, .. } | Self::Server { code, .. } => code,
            Self::Timeout => "TIMEOUT",
            Self::Connection(_) => "CONNECTION",
            Self::Decode(_) => "DECODE",
        }
    }

    /// What the answer means for the payment, from the code table
    /// ([`CODE_TABLE`]); a code it does not know is read by its status (see
    /// [`class_of_answer`]). A timeout or a reset is [`CodeClass::Transient`];
    /// an unreadable 2xx is [`CodeClass::Unknown`].
    pub fn class(&self) -> CodeClass {
        match self {
            Self::Rejected { status, code, .. } | Self::Server { status, code, .. } => {
                class_of_answer(*status, code)
            }
            Self::Timeout | Self::Connection(_) => CodeClass::Transient,
            Self::Decode(_) => CodeClass::Unknown,
        }
    }

    /// True when the card company may have acted without us learning the
    /// outcome: a timeout, a reset, an unreadable 2xx, or an answer of class
    /// [`CodeClass::Transient`], [`CodeClass::AlreadyProcessed`],
    /// [`CodeClass::InProgress`] or [`CodeClass::Unknown`] (a 4xx code Toss
    /// does not document). Such a confirm must be settled by a lookup, never
    /// assumed declined.
    pub fn outcome_unknown(&self) -> bool {
        self.class().outcome_unknown()
    }

    /// True when asking again with the same idempotency key may succeed:
    /// [`CodeClass::Transient`] (`PROVIDER_ERROR` even as 400, 5xx, 429,
    /// timeouts and resets) and [`CodeClass::InProgress`] (409
    /// `IDEMPOTENT_REQUEST_PROCESSING`).
    pub fn is_transient(&self) -> bool {
        matches!(self.class(), CodeClass::Transient | CodeClass::InProgress)
    }

    /// True when the card company refused paygate's own secret key
    /// ([`CodeClass::OwnCredentials`]: 400 `INVALID_API_KEY`, 401
    /// `UNAUTHORIZED_KEY`, 403 `INCORRECT_BASIC_AUTH_FORMAT`, any 401):
    /// nothing was processed, and it is not the customer's decline.
    pub fn is_auth_failure(&self) -> bool {
        self.class() == CodeClass::OwnCredentials
    }

    /// True only for [`CodeClass::Decline`]: the card or the customer was
    /// refused (`REJECT_CARD_PAYMENT`, `INVALID_STOPPED_CARD`, ...). Not for
    /// a temporary error (`PROVIDER_ERROR`), our own key, a refused request
    /// ([`CodeClass::InvalidRequest`]) or a code Toss does not document.
    pub fn is_decline(&self) -> bool {
        self.class() == CodeClass::Decline
    }

    /// True when, by this answer, the card company did not approve and will
    /// not on a retry of the same request (see
    /// [`CodeClass::definitely_not_approved`]).
    pub fn definitely_not_approved(&self) -> bool {
        self.class().definitely_not_approved()
    }
}

/// Card company error codes paygate acts on (the set is open; others pass
/// through to the merchant as they are).
pub mod codes {
    /// The payment was already confirmed (by an earlier attempt).
    pub const ALREADY_PROCESSED_PAYMENT: &str = "ALREADY_PROCESSED_PAYMENT";
    /// The first request with this idempotency key is still running: ask again.
    pub const IDEMPOTENT_REQUEST_PROCESSING: &str = "IDEMPOTENT_REQUEST_PROCESSING";
    /// No payment for that key or order.
    pub const NOT_FOUND_PAYMENT: &str = "NOT_FOUND_PAYMENT";
    /// The card was rejected.
    pub const REJECT_CARD_PAYMENT: &str = "REJECT_CARD_PAYMENT";
    /// Temporary error at the card company; Toss sends it as HTTP 400.
    pub const PROVIDER_ERROR: &str = "PROVIDER_ERROR";
    /// Internal failure at the card company.
    pub const FAILED_INTERNAL_SYSTEM_PROCESSING: &str = "FAILED_INTERNAL_SYSTEM_PROCESSING";
    /// The secret key was refused (401).
    pub const UNAUTHORIZED_KEY: &str = "UNAUTHORIZED_KEY";
    /// The secret key is wrong (Toss sends it as 400).
    pub const INVALID_API_KEY: &str = "INVALID_API_KEY";
    /// A cancel amount above what is left to cancel (403).
    pub const NOT_CANCELABLE_AMOUNT: &str = "NOT_CANCELABLE_AMOUNT";
    /// The payment was already cancelled (400).
    pub const ALREADY_CANCELED_PAYMENT: &str = "ALREADY_CANCELED_PAYMENT";
    /// The payment session expired before the confirm (404).
    pub const NOT_FOUND_PAYMENT_SESSION: &str = "NOT_FOUND_PAYMENT_SESSION";
}

/// The card company, as paygate uses it. Every method that changes state
/// takes the idempotency key to send (paygate passes the `payment_id`).
#[async_trait::async_trait]
pub trait CardApi: Send + Sync + 'static {
    /// Confirms (approves) a payment: Toss `POST /v1/payments/confirm`.
    ///
    /// # Errors
    /// [`CardApiError`]; see [`CardApiError::is_decline`] and
    /// [`CardApiError::outcome_unknown`] for what each means for the payment.
    async fn confirm(
        &self,
        req: &ConfirmRequest,
        idempotency_key: &str,
    ) -> Result<CardPayment, CardApiError>;

    /// Looks a payment up by the merchant's order id: Toss
    /// `GET /v1/payments/orders/{orderId}`. `Ok(None)` on 404 `NOT_FOUND_PAYMENT`.
    ///
    /// # Errors
    /// [`CardApiError`] for any other failure.
    async fn payment_by_order_id(
        &self,
        order_id: &str,
    ) -> Result<Option<CardPayment>, CardApiError>;

    /// Cancels (refunds) an approved payment: Toss
    /// `POST /v1/payments/{paymentKey}/cancel`.
    ///
    /// # Errors
    /// [`CardApiError`].
    async fn cancel(
        &self,
        payment_key: &str,
        req: &CancelRequest,
        idempotency_key: &str,
    ) -> Result<CardPayment, CardApiError>;

    /// One page of the transaction list: Toss `GET /v1/transactions`.
    ///
    /// # Errors
    /// [`CardApiError`].
    async fn transactions(
        &self,
        query: &TransactionsQuery,
    ) -> Result<Vec<Transaction>, CardApiError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(status: u16, code: &str) -> CardApiError {
        CardApiError::Rejected {
            status,
            code: code.to_owned(),
            message: String::new(),
            retry_after_s: None,
        }
    }

    #[test]
    fn classification_of_card_answers() {
        // Toss answers a card rejection with 403: a decline, not our auth.
        assert!(rejected(403, codes::REJECT_CARD_PAYMENT).is_decline());
        assert!(!rejected(403, codes::REJECT_CARD_PAYMENT).is_auth_failure());
        assert!(rejected(401, codes::UNAUTHORIZED_KEY).is_auth_failure());
        assert!(!rejected(401, codes::UNAUTHORIZED_KEY).is_decline());
        // "Already processed" and "still processing" are not declines.
        assert!(!rejected(400, codes::ALREADY_PROCESSED_PAYMENT).is_decline());
        assert!(rejected(400, codes::ALREADY_PROCESSED_PAYMENT).outcome_unknown());
        assert!(rejected(409, codes::IDEMPOTENT_REQUEST_PROCESSING).is_transient());
        assert!(CardApiError::Timeout.outcome_unknown());
        let server = CardApiError::Server {
            status: 500,
            code: codes::PROVIDER_ERROR.to_owned(),
            message: String::new(),
            retry_after_s: Some(2),
        };
        assert_eq!(
            server.retry_after(),
            Some(std::time::Duration::from_secs(2))
        );
        assert!(server.outcome_unknown() && server.is_transient() && !server.is_decline());
    }
}
