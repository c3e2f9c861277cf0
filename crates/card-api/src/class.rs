//! What a Toss Payments error code means for the payment: one table,
//! [`CODE_TABLE`], from code to [`CodeClass`].
//!
//! Toss does not say "decline" with its HTTP status: it answers a temporary
//! card-company error (`PROVIDER_ERROR`) and a refused secret key
//! (`INVALID_API_KEY`) with 400, the same status as a stopped card. So paygate
//! reads the code first and falls back on the status only for a code the
//! table does not know.
//!
//! Source: Toss Payments reference, "에러 코드" (error codes), the tables of
//! the core API v1 calls paygate makes: 결제 승인 (`POST /v1/payments/confirm`),
//! 결제 조회 (`GET /v1/payments/orders/{orderId}`), 결제 취소
//! (`POST /v1/payments/{paymentKey}/cancel`); and its idempotency guide
//! (409 `IDEMPOTENT_REQUEST_PROCESSING`).

/// What an error code says about the payment, and so what paygate does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CodeClass {
    /// The card, the account or the customer was refused (a stopped, lost or
    /// expired card, a limit reached, an issuer's no, fraud screening): the
    /// card company did not approve and will not on a retry. Final: the
    /// payment is `ABORTED` and the merchant gets 402 with the code.
    Decline,
    /// The request itself was refused (a bad parameter, an amount below the
    /// minimum, a refund the payment does not allow, the merchant's contract
    /// or setup at the card company). Nothing was processed and asking again
    /// gets the same answer; it is not the customer's decline, it is a defect
    /// or a setup problem an operator must see.
    InvalidRequest,
    /// A temporary failure at Toss or the card company (`PROVIDER_ERROR`,
    /// 5xx, 429, "repeated request, try later"). Nothing is known to have
    /// been approved: ask again with the same idempotency key, then settle it
    /// by a lookup. Never a decline.
    Transient,
    /// Toss refused paygate's own secret key or its encoding
    /// (`INVALID_API_KEY`, `UNAUTHORIZED_KEY`, `INCORRECT_BASIC_AUTH_FORMAT`,
    /// any 401): nothing was processed. Abort without charging (a no-call
    /// answer to the merchant) and alert an operator: every call will fail
    /// the same way until the key is fixed.
    OwnCredentials,
    /// The payment (or the cancel) was already processed, perhaps by an
    /// earlier attempt whose answer was lost (`ALREADY_PROCESSED_PAYMENT`,
    /// `ALREADY_CANCELED_PAYMENT`). The outcome is whatever the card company
    /// holds: settle it by a lookup.
    AlreadyProcessed,
    /// The first request with this idempotency key is still running
    /// (409 `IDEMPOTENT_REQUEST_PROCESSING`): ask again later, then look up.
    InProgress,
    /// The card company has no such payment or payment session
    /// (`NOT_FOUND_PAYMENT`, `NOT_FOUND_PAYMENT_SESSION`): nothing is
    /// approved under it. On a lookup this is "no payment yet".
    NotFound,
    /// A code the table does not know, with a 4xx status that says nothing
    /// more: the outcome is unknown, so the payment is looked up. Never a
    /// decline.
    Unknown,
}

impl CodeClass {
    /// True when, by this answer, the card company did not approve the
    /// payment and will not on a retry of the same request: [`Decline`],
    /// [`InvalidRequest`], [`OwnCredentials`] and [`NotFound`].
    ///
    /// [`Decline`]: CodeClass::Decline
    /// [`InvalidRequest`]: CodeClass::InvalidRequest
    /// [`OwnCredentials`]: CodeClass::OwnCredentials
    /// [`NotFound`]: CodeClass::NotFound
    pub fn definitely_not_approved(self) -> bool {
        matches!(
            self,
            Self::Decline | Self::InvalidRequest | Self::OwnCredentials | Self::NotFound
        )
    }

    /// True when the card company may hold an outcome paygate has not
    /// learnt: [`Transient`], [`AlreadyProcessed`], [`InProgress`] and
    /// [`Unknown`]. Such a confirm is settled by a lookup.
    ///
    /// [`Transient`]: CodeClass::Transient
    /// [`AlreadyProcessed`]: CodeClass::AlreadyProcessed
    /// [`InProgress`]: CodeClass::InProgress
    /// [`Unknown`]: CodeClass::Unknown
    pub fn outcome_unknown(self) -> bool {
        !self.definitely_not_approved()
    }
}

/// One documented Toss error code: the code, the HTTP status Toss documents
/// for it, and its class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocumentedCode {
    /// The code (`PROVIDER_ERROR`).
    pub code: &'static str,
    /// The HTTP status Toss documents it with.
    pub status: u16,
    /// What it means for the payment.
    pub class: CodeClass,
}

const fn c(code: &'static str, status: u16, class: CodeClass) -> DocumentedCode {
    DocumentedCode {
        code,
        status,
        class,
    }
}

use CodeClass::{
    AlreadyProcessed, Decline, InProgress, InvalidRequest, NotFound, OwnCredentials, Transient,
};

/// Every error code Toss documents for the calls paygate makes, with its
/// documented status and class. A code listed under several calls appears
/// once. Source: see the [module](self) documentation.
pub const CODE_TABLE: &[DocumentedCode] = &[
    // 결제 승인 (confirm), 400.
    c("ALREADY_PROCESSED_PAYMENT", 400, AlreadyProcessed),
    // "A temporary error; try again in a few minutes": sent as 400.
    c("PROVIDER_ERROR", 400, Transient),
    c("EXCEED_MAX_CARD_INSTALLMENT_PLAN", 400, Decline),
    c("INVALID_REQUEST", 400, InvalidRequest),
    c("NOT_ALLOWED_POINT_USE", 400, Decline),
    // Our secret key is wrong: sent as 400, not 401.
    c("INVALID_API_KEY", 400, OwnCredentials),
    c("INVALID_REJECT_CARD", 400, Decline),
    c("BELOW_MINIMUM_AMOUNT", 400, InvalidRequest),
    c("INVALID_CARD_EXPIRATION", 400, Decline),
    c("INVALID_STOPPED_CARD", 400, Decline),
    c("EXCEED_MAX_DAILY_PAYMENT_COUNT", 400, Decline),
    c(
        "NOT_SUPPORTED_INSTALLMENT_PLAN_CARD_OR_MERCHANT",
        400,
        Decline,
    ),
    c("INVALID_CARD_INSTALLMENT_PLAN", 400, Decline),
    c("NOT_SUPPORTED_MONTHLY_INSTALLMENT_PLAN", 400, Decline),
    c("EXCEED_MAX_PAYMENT_AMOUNT", 400, Decline),
    c("NOT_FOUND_TERMINAL_ID", 400, InvalidRequest),
    c("INVALID_AUTHORIZE_AUTH", 400, InvalidRequest),
    c("INVALID_CARD_LOST_OR_STOLEN", 400, Decline),
    c("RESTRICTED_TRANSFER_ACCOUNT", 400, Decline),
    c("INVALID_CARD_NUMBER", 400, Decline),
    c("INVALID_UNREGISTERED_SUBMALL", 400, InvalidRequest),
    c("NOT_REGISTERED_BUSINESS", 400, InvalidRequest),
    c("EXCEED_MAX_ONE_DAY_WITHDRAW_AMOUNT", 400, Decline),
    c("EXCEED_MAX_ONE_TIME_WITHDRAW_AMOUNT", 400, Decline),
    // "An error occurred at the card company": not the card's refusal.
    c("CARD_PROCESSING_ERROR", 400, Transient),
    c("EXCEED_MAX_AMOUNT", 400, Decline),
    c("INVALID_ACCOUNT_INFO_RE_REGISTER", 400, Decline),
    c("NOT_AVAILABLE_PAYMENT", 400, Decline),
    c("UNAPPROVED_ORDER_ID", 400, InvalidRequest),
    c("EXCEED_MAX_MONTHLY_PAYMENT_AMOUNT", 400, Decline),
    // 결제 승인, 401 and 403.
    c("UNAUTHORIZED_KEY", 401, OwnCredentials),
    c("REJECT_ACCOUNT_PAYMENT", 403, Decline),
    c("REJECT_CARD_PAYMENT", 403, Decline),
    c("REJECT_CARD_COMPANY", 403, Decline),
    c("FORBIDDEN_REQUEST", 403, InvalidRequest),
    c("REJECT_TOSSPAY_INVALID_ACCOUNT", 403, Decline),
    c("EXCEED_MAX_AUTH_COUNT", 403, Decline),
    c("EXCEED_MAX_ONE_DAY_AMOUNT", 403, Decline),
    c("NOT_AVAILABLE_BANK", 403, Decline),
    c("INVALID_PASSWORD", 403, Decline),
    c("INCORRECT_BASIC_AUTH_FORMAT", 403, OwnCredentials),
    c("FDS_ERROR", 403, Decline),
    // 결제 승인 and 결제 조회, 404.
    c("NOT_FOUND_PAYMENT", 404, NotFound),
    c("NOT_FOUND_PAYMENT_SESSION", 404, NotFound),
    c("NOT_FOUND", 404, NotFound),
    // Idempotency guide, 409.
    c("IDEMPOTENT_REQUEST_PROCESSING", 409, InProgress),
    // 결제 승인, 500.
    c("FAILED_PAYMENT_INTERNAL_SYSTEM_PROCESSING", 500, Transient),
    c("FAILED_INTERNAL_SYSTEM_PROCESSING", 500, Transient),
    c("UNKNOWN_PAYMENT_ERROR", 500, Transient),
    // 결제 취소 (cancel), 400.
    c("ALREADY_CANCELED_PAYMENT", 400, AlreadyProcessed),
    c("INVALID_REFUND_ACCOUNT_INFO", 400, InvalidRequest),
    c("EXCEED_CANCEL_AMOUNT_DISCOUNT_AMOUNT", 400, InvalidRequest),
    c("INVALID_REFUND_ACCOUNT_NUMBER", 400, InvalidRequest),
    c("INVALID_BANK", 400, InvalidRequest),
    c("NOT_MATCHES_REFUNDABLE_AMOUNT", 400, InvalidRequest),
    c("REFUND_REJECTED", 400, InvalidRequest),
    c("ALREADY_REFUND_PAYMENT", 400, AlreadyProcessed),
    c("FORBIDDEN_BANK_REFUND_REQUEST", 400, InvalidRequest),
    // 결제 취소, 403.
    c("NOT_CANCELABLE_AMOUNT", 403, InvalidRequest),
    // "Repeated requests are not allowed; try again later".
    c("FORBIDDEN_CONSECUTIVE_REQUEST", 403, Transient),
    c("NOT_CANCELABLE_PAYMENT", 403, InvalidRequest),
    c("EXCEED_MAX_REFUND_DUE", 403, InvalidRequest),
    c(
        "NOT_ALLOWED_PARTIAL_REFUND_WAITING_DEPOSIT",
        403,
        InvalidRequest,
    ),
    c("NOT_ALLOWED_PARTIAL_REFUND", 403, InvalidRequest),
    c(
        "NOT_CANCELABLE_PAYMENT_FOR_DORMANT_USER",
        403,
        InvalidRequest,
    ),
    // 결제 취소, 500.
    c("FAILED_REFUND_PROCESS", 500, Transient),
    c("FAILED_METHOD_HANDLING_CANCEL", 500, Transient),
    c("FAILED_PARTIAL_REFUND", 500, Transient),
    c("COMMON_ERROR", 500, Transient),
];

/// The class of a documented code; `None` for a code [`CODE_TABLE`] does
/// not list.
pub fn class_of_code(code: &str) -> Option<CodeClass> {
    CODE_TABLE.iter().find(|d| d.code == code).map(|d| d.class)
}

/// The class of an error answer: its code's class when the code is
/// documented, else what the status alone says (401 [`OwnCredentials`], 409
/// [`InProgress`], 429 and 5xx [`Transient`], any other status
/// [`Unknown`](CodeClass::Unknown)).
pub fn class_of_answer(status: u16, code: &str) -> CodeClass {
    if let Some(class) = class_of_code(code) {
        return class;
    }
    match status {
        401 => OwnCredentials,
        409 => InProgress,
        429 => Transient,
        500..=599 => Transient,
        _ => CodeClass::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for d in CODE_TABLE {
            assert!(seen.insert(d.code), "{} listed twice", d.code);
        }
    }

    #[test]
    fn the_status_decides_only_for_unknown_codes() {
        // A documented code wins over its status.
        assert_eq!(class_of_answer(400, "PROVIDER_ERROR"), Transient);
        assert_eq!(class_of_answer(500, "REJECT_CARD_PAYMENT"), Decline);
        // Unknown codes: the status.
        assert_eq!(class_of_answer(401, "SOMETHING_NEW"), OwnCredentials);
        assert_eq!(class_of_answer(409, "SOMETHING_NEW"), InProgress);
        assert_eq!(class_of_answer(429, "SOMETHING_NEW"), Transient);
        assert_eq!(class_of_answer(503, "HTTP_503"), Transient);
        assert_eq!(class_of_answer(400, "SOMETHING_NEW"), CodeClass::Unknown);
        assert_eq!(class_of_answer(403, "SOMETHING_NEW"), CodeClass::Unknown);
        assert_eq!(class_of_answer(404, "HTTP_404"), CodeClass::Unknown);
    }

    #[test]
    fn only_refusals_of_nothing_processed_are_definite() {
        for class in [Decline, InvalidRequest, OwnCredentials, NotFound] {
            assert!(class.definitely_not_approved() && !class.outcome_unknown());
        }
        for class in [Transient, AlreadyProcessed, InProgress, CodeClass::Unknown] {
            assert!(class.outcome_unknown() && !class.definitely_not_approved());
        }
    }
}
