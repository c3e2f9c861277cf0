//! RFC 9457 `application/problem+json` answers for the merchant API.
//!
//! Every error a merchant sees is a [`Problem`]: `type`, `title`, `status`,
//! `detail`, `code` (the card company's code where one exists) and, where it
//! helps, `paymentId`. Internal error text never reaches `detail`.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Serialize;

/// One problem answer (boxed: it travels in `Result::Err`, which should stay small).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem(Box<ProblemDetails>);

/// The members of a problem answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ProblemDetails {
    /// `urn:paygate:problem:<code in lower case>`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Short, fixed summary of the problem class.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What happened, for a human; never internal error text.
    pub detail: String,
    /// Machine-readable code (the card company's for a decline).
    pub code: String,
    /// The payment concerned, when there is one.
    #[serde(rename = "paymentId", skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// Seconds to wait before retrying (also sent as `Retry-After`).
    #[serde(skip)]
    #[schema(ignore)]
    pub retry_after_s: Option<u64>,
}

impl Problem {
    /// A problem with the given status, code, title and detail.
    pub fn new(status: StatusCode, code: &str, title: &str, detail: impl Into<String>) -> Self {
        Self(Box::new(ProblemDetails {
            type_: format!("urn:paygate:problem:{}", code.to_ascii_lowercase()),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.to_owned(),
            payment_id: None,
            retry_after_s: None,
        }))
    }

    /// Names the payment.
    pub fn with_payment(mut self, payment_id: &str) -> Self {
        self.0.payment_id = Some(payment_id.to_owned());
        self
    }

    /// Adds `Retry-After` (seconds).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.0.retry_after_s = Some(seconds);
        self
    }

    /// 400: the request body or a parameter is invalid.
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "Invalid request",
            detail,
        )
    }

    /// 401: no or bad API key.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Unauthorized",
            "send a valid API key as `Authorization: Bearer <key>`",
        )
    }

    /// 404: no such payment for this merchant.
    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "Not found",
            "no such payment",
        )
    }

    /// 503: paygate cannot safely proceed; nothing was charged.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            "Service unavailable",
            detail,
        )
        .retry_after(1)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry = self.0.retry_after_s;
        let mut resp = (status, axum::Json(&*self.0)).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = retry {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
