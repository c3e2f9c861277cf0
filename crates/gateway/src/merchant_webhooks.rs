//! A merchant's webhooks: `PUT /v1/webhook-endpoint` registers the one
//! endpoint paygate posts the merchant's events to (and answers its new
//! signing secret, once), `GET /v1/events?after=` lists the events in
//! order for a merchant catching up (DESIGN.md §5). Delivery itself is
//! crate `paygate-webhooks`, run by [`crate::Application::run_until`].

use axum::{
    extract::{Query, Request, State},
    response::{IntoResponse, Response},
    Json,
};
use paygate_webhooks::{
    secrets::generate_signing_secret, store::Endpoint, EndpointError, SecretsKey,
};
use serde::{Deserialize, Serialize};

use crate::{auth::AuthedMerchant, holds::authed_json, problem::Problem, AppState};

/// The body of `PUT /v1/webhook-endpoint`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointBody {
    /// Where events are posted: `https` (plain `http` only in sandbox
    /// mode), resolving to public addresses only, at most 2,048 bytes.
    #[schema(max_length = 2048)]
    pub url: String,
}

/// The answer of `PUT /v1/webhook-endpoint`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    /// The endpoint registered.
    pub url: String,
    /// The signing secret (`whsec_...`) that signs every delivery from now
    /// on: shown only in this answer; a new `PUT` makes a new one.
    pub signing_secret: String,
}

/// The query of `GET /v1/events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// The `sequence` of the last event already seen; 0 (default) from
    /// the start.
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// At most this many events, 1 to 100 (default 100).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
}

/// One page of `GET /v1/events`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventsPage {
    /// Events in `sequence` order, each as a webhook body carries it:
    /// `{eventId, type, sequence, createdAt, paymentId, version, data}`.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<serde_json::Value>,
    /// The `after` of the next page (the last `sequence` here, or the
    /// request's `after` when the page is empty).
    pub next_after: i64,
}

/// What the merchant webhook routes need.
#[derive(Clone, Debug)]
pub struct MerchantWebhooks {
    /// `payment_events` and `webhook_endpoints`.
    pub events: paygate_webhooks::EventStore,
    /// Seals the signing secrets; `None`: registration answers 503.
    pub secrets: Option<SecretsKey>,
    /// Which endpoints are accepted.
    pub policy: paygate_webhooks::EndpointPolicy,
}

impl MerchantWebhooks {
    /// From the configuration: `secrets_key`, else the development key in
    /// sandbox mode, else none (merchant webhooks off, said at startup).
    ///
    /// # Errors
    /// [`paygate_webhooks::SecretsError`] for a key that is not 32 bytes.
    pub fn from_config(
        config: &paygate_core::Config,
        db: paygate_state_store::SqlDatabase,
    ) -> Result<Self, paygate_webhooks::SecretsError> {
        let secrets = match &config.secrets_key {
            Some(k) => Some(SecretsKey::from_base64(k.expose())?),
            None if config.card_sandbox() => Some(SecretsKey::from_base64(
                paygate_webhooks::secrets::DEV_SECRETS_KEY,
            )?),
            None => {
                tracing::warn!("no secrets_key: merchant webhooks are off (PUT /v1/webhook-endpoint answers 503); GET /v1/events still lists events");
                None
            }
        };
        Ok(Self {
            events: paygate_webhooks::EventStore::new(db),
            secrets,
            policy: paygate_webhooks::EndpointPolicy {
                allow_http: config.card_sandbox(),
                allow_private: config.webhook_allow_private,
            },
        })
    }
}

fn store_down(e: &paygate_state_store::StoreError) -> Problem {
    tracing::warn!(error = %e, "event store unavailable");
    Problem::unavailable("the store is unavailable; retry shortly")
}

/// `PUT /v1/webhook-endpoint`: registers or replaces the endpoint.
#[utoipa::path(put, path = "/v1/webhook-endpoint", tag = "webhooks",
    request_body = EndpointBody,
    responses(
        (status = 200, description = "registered; the signing secret is shown only here", body = EndpointView),
        (status = 400, description = "the URL is not https, not valid, or does not resolve to public addresses only", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "merchant webhooks are not configured (no secrets_key), or the store is unavailable", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn put_endpoint(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, Problem> {
    let (AuthedMerchant(merchant), body) =
        authed_json::<EndpointBody>(&state, req, "{\"url\": string}").await?;
    let Some(key): Option<&SecretsKey> = state.webhooks.secrets.as_ref() else {
        return Err(Problem::unavailable(
            "merchant webhooks are not configured on this gateway",
        ));
    };
    let url = state
        .webhooks
        .policy
        .check(&body.url)
        .await
        .map_err(|e: EndpointError| Problem::invalid(e.to_string()))?;
    let secret = generate_signing_secret();
    let sealed = key
        .seal(merchant.merchant_id.as_str(), &secret)
        .map_err(|_| Problem::unavailable("the signing secret could not be sealed"))?;
    let endpoint = Endpoint {
        url: url.to_string(),
        secret_sealed: sealed,
    };
    state
        .webhooks
        .events
        .put_endpoint(
            &merchant.merchant_id,
            &endpoint,
            state.saga.clock().now_ms(),
        )
        .await
        .map_err(|e| store_down(&e))?;
    tracing::info!(merchant_id = %merchant.merchant_id, "webhook endpoint registered");
    Ok(Json(EndpointView {
        url: endpoint.url,
        signing_secret: secret.expose().clone(),
    })
    .into_response())
}

/// `GET /v1/events?after=&limit=`: the merchant's events in order.
#[utoipa::path(get, path = "/v1/events", tag = "webhooks",
    params(EventsQuery),
    responses(
        (status = 200, description = "the next events after `after`, oldest first", body = EventsPage),
        (status = 400, description = "bad query", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "the store is unavailable", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_events(
    State(state): State<AppState>,
    AuthedMerchant(merchant): AuthedMerchant,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) =
        query.map_err(|_| Problem::invalid("query must be after=<integer>&limit=<1-100>"))?;
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(100);
    if after < 0 || !(1..=100).contains(&limit) {
        return Err(Problem::invalid("after must be >= 0 and limit 1 to 100"));
    }
    // Only numbered events are listed: every replica's worker relays and
    // numbers new ones each `webhook_poll_ms`, so an event shows here that
    // long after its transition at most (while a worker runs). A read
    // does no writing, so polling merchants cannot load the numbering.
    let events = &state.webhooks.events;
    let rows = events
        .list_after(&merchant.merchant_id, after, limit)
        .await
        .map_err(|e| store_down(&e))?;
    let next_after = rows.last().map_or(after, |r| r.seq);
    Ok(Json(EventsPage {
        events: rows.iter().map(paygate_webhooks::event_json).collect(),
        next_after,
    })
    .into_response())
}
