//! Merchant authentication: `Authorization: Bearer <api key>`.
//!
//! The key is hashed with the server's HMAC key and looked up by hash; the
//! key itself is never stored or logged. Missing or bad key: 401. Each
//! merchant then has its own GCRA rate limit (`governor`, keyed by merchant):
//! over it, 429 with `Retry-After`; other merchants are unaffected.

use axum::{extract::FromRequestParts, http::request::Parts};
use paygate_core::crypto::{hash_api_key, API_KEY_PREFIX};
use paygate_state_store::Merchant;

use crate::{problem::Problem, AppState};

/// The merchant a request is authenticated as.
#[derive(Clone, Debug)]
pub struct AuthedMerchant(pub Merchant);

impl FromRequestParts<AppState> for AuthedMerchant {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let key = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| k.starts_with(API_KEY_PREFIX) && k.len() <= 128)
            .ok_or_else(Problem::unauthorized)?;
        let hash = hash_api_key(&state.api_key_hash_key, key);
        match state.merchants.find_by_key_hash(&hash).await {
            Ok(Some(m)) => {
                tracing::Span::current().record("merchant_id", m.merchant_id.as_str());
                if let Some(limiter) = &state.merchant_limiter {
                    if let Err(not_until) = limiter.check_key(&m.merchant_id.to_string()) {
                        use governor::clock::Clock;
                        let wait = not_until
                            .wait_time_from(governor::clock::DefaultClock::default().now());
                        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                        metrics::counter!("paygate_inbound_rate_limited_total").increment(1);
                        return Err(Problem::new(
                            axum::http::StatusCode::TOO_MANY_REQUESTS,
                            "RATE_LIMITED",
                            "Too many requests",
                            "this merchant's request rate is over its limit; retry after the given delay",
                        )
                        .retry_after(secs));
                    }
                }
                Ok(Self(m))
            }
            Ok(None) => Err(Problem::unauthorized()),
            Err(e) => {
                tracing::error!(error = %e, "merchant lookup failed");
                Err(Problem::unavailable("authentication store unavailable"))
            }
        }
    }
}
