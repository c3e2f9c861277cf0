//! Merchant authentication: `Authorization: Bearer <api key>`.
//!
//! The scheme is matched case-insensitively (RFC 9110 §11.1: `bearer` and
//! `BEARER` are `Bearer`); more than one `Authorization` header is a
//! malformed request (400), not a choice paygate makes for the client.
//!
//! The key is hashed with the server's HMAC key and looked up by hash; the
//! key itself is never stored or logged. Missing or bad key: 401. Lookups
//! are kept in a small in-process cache for `merchant_cache_ttl_ms` (5 s):
//! a confirm then costs no merchant query, and a revoked key stops working
//! on every replica within that time. Unknown keys are cached too, so a
//! client trying random keys does not reach the database with each. Each
//! merchant then has its own GCRA rate limit (`governor`, keyed by merchant):
//! over it, 429 with `Retry-After`; other merchants are unaffected. The
//! authenticated request then takes one of its merchant's in-flight slots
//! (`inbound_max_concurrent_per_merchant`, see [`crate::merchant_slots`]);
//! over that cap, 429 too.

use axum::{extract::FromRequestParts, http::request::Parts};
use paygate_core::crypto::{hash_api_key, API_KEY_PREFIX};
use paygate_state_store::Merchant;

use crate::{merchant_slots::SlotHolder, problem::Problem, AppState};

/// The token of `Bearer <token>`, the scheme in any case, the token after
/// one or more spaces; `None` for any other scheme or no token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Merchant lookups by key hash: `Some(merchant)`, or `None` for a hash
/// no unrevoked merchant has. moka (a maintained concurrent cache with
/// TinyLFU admission and per-entry expiry) also coalesces concurrent
/// lookups of one key into one query.
pub type MerchantCache = moka::future::Cache<String, Option<Merchant>>;

/// Entries the cache holds at most (far more than merchants; the rest of
/// the room absorbs unknown keys without evicting real ones first).
const MERCHANT_CACHE_CAPACITY: u64 = 10_000;

/// The cache for a time to live of `ttl_ms`; `None` when 0 (off).
pub fn merchant_cache(ttl_ms: u64) -> Option<MerchantCache> {
    (ttl_ms > 0).then(|| {
        moka::future::Cache::builder()
            .max_capacity(MERCHANT_CACHE_CAPACITY)
            .time_to_live(std::time::Duration::from_millis(ttl_ms))
            .build()
    })
}

/// The unrevoked merchant of `hash`, from the cache when it has it.
async fn find_merchant(
    state: &AppState,
    hash: String,
) -> Result<Option<Merchant>, std::sync::Arc<paygate_state_store::StoreError>> {
    match &state.merchant_cache {
        Some(cache) => {
            let merchants = state.merchants.clone();
            let key = hash.clone();
            cache
                .try_get_with(hash, async move { merchants.find_by_key_hash(&key).await })
                .await
        }
        None => state
            .merchants
            .find_by_key_hash(&hash)
            .await
            .map_err(std::sync::Arc::new),
    }
}

/// The merchant a request is authenticated as.
#[derive(Clone, Debug)]
pub struct AuthedMerchant(pub Merchant);

impl FromRequestParts<AppState> for AuthedMerchant {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let mut values = parts
            .headers
            .get_all(axum::http::header::AUTHORIZATION)
            .iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(Problem::invalid(
                "send one Authorization header, not several",
            ));
        }
        let key = first
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .filter(|k| k.starts_with(API_KEY_PREFIX) && k.len() <= 128)
            .ok_or_else(Problem::unauthorized)?;
        let hash = hash_api_key(&state.api_key_hash_key, key);
        match find_merchant(state, hash).await {
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
                take_slot(parts, state, &m)?;
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

/// Counts the request against its merchant's in-flight cap from now until
/// it is answered (see [`crate::merchant_slots`]); 429 over the cap. A
/// route without the slot middleware has no holder and is not counted.
fn take_slot(parts: &Parts, state: &AppState, m: &Merchant) -> Result<(), Problem> {
    let Some(holder) = parts.extensions.get::<SlotHolder>() else {
        return Ok(());
    };
    match state.merchant_slots.try_acquire(m.merchant_id.as_str()) {
        Some(slot) => {
            holder.keep(slot);
            Ok(())
        }
        None => {
            metrics::counter!("paygate_inbound_merchant_shed_total").increment(1);
            Err(Problem::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                "Too many requests",
                format!(
                    "this merchant already has {} requests in flight, its limit; retry after the given delay",
                    state.merchant_slots.cap()
                ),
            )
            .retry_after(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_scheme_is_case_insensitive_and_nothing_else_is_a_bearer_token() {
        for (value, token) in [
            ("Bearer pgk_a", Some("pgk_a")),
            ("bearer pgk_a", Some("pgk_a")),
            ("BEARER   pgk_a ", Some("pgk_a")),
            ("Bearer", None),
            ("Bearer ", None),
            ("Basic pgk_a", None),
            ("Bearerpgk_a", None),
            ("", None),
        ] {
            assert_eq!(bearer_token(value), token, "{value:?}");
        }
    }
}
