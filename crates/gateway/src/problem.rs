//! RFC 9457 `application/problem+json` answers for the merchant API.
//!
//! Every error a merchant sees is a [`Problem`]: `type`, `title`, `status`,
//! `detail`, `code` (the card company's code where one exists) and, where it
//! helps, `paymentId`. Internal error text never reaches `detail`.
//!
//! The framework's own refusals (a path segment that does not decode, a
//! method a path does not serve, a body over the limit) are rewritten by
//! [`ensure_problem`], the last middleware before the wire, so that no error
//! answer leaves as `text/plain` or empty, and none carries the framework's
//! text (which names internal fields).

use axum::{
    extract::Request,
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
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

impl Problem {
    /// 413: the body is over [`crate::MAX_BODY_BYTES`].
    pub fn payload_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "Payload too large",
            format!("the body is over {} bytes", crate::MAX_BODY_BYTES),
        )
    }

    /// 415: the body is not `application/json`.
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "Unsupported media type",
            "send the body as JSON with `Content-Type: application/json`",
        )
    }

    /// The problem for an error status the framework answered on its own,
    /// with a fixed detail (never the framework's text).
    pub fn for_status(status: StatusCode) -> Self {
        match status {
            StatusCode::BAD_REQUEST => Self::invalid(
                "the request could not be read (a path segment, the query or a header is not valid)",
            ),
            StatusCode::NOT_FOUND => Self::new(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "Not found",
                "no such route",
            ),
            StatusCode::METHOD_NOT_ALLOWED => Self::new(
                status,
                "METHOD_NOT_ALLOWED",
                "Method not allowed",
                "this path does not serve this method; `Allow` lists the ones it does",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => Self::payload_too_large(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::unsupported_media_type(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Self::new(
                status,
                "REQUEST_HEADER_FIELDS_TOO_LARGE",
                "Request header fields too large",
                "the request's headers are too large",
            ),
            s if s.is_client_error() => Self::new(
                s,
                "INVALID_REQUEST",
                s.canonical_reason().unwrap_or("Invalid request"),
                "the request could not be served",
            ),
            s => Self::new(s, "INTERNAL_ERROR", "Internal error", "internal error"),
        }
    }
}

/// Middleware: an error answer that is not problem+json already (one the
/// framework made) becomes the [`Problem::for_status`] of its status; its
/// headers but the body's are kept (`Allow` of a 405, `Retry-After`).
pub async fn ensure_problem(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    if is_problem {
        return resp;
    }
    let (parts, _framework_text) = resp.into_parts();
    let mut problem = Problem::for_status(status).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE
            && name != header::CONTENT_LENGTH
            && name != header::TRANSFER_ENCODING
        {
            problem.headers_mut().insert(name.clone(), value.clone());
        }
    }
    problem
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
