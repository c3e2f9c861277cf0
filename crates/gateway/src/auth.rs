//! Merchant authentication: `Authorization: Bearer <api key>`.
//!
//! The key is hashed with the server's HMAC key and looked up by hash; the
//! key itself is never stored or logged. Missing or bad key: 401.

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
