//! The merchant API's inventory and hold routes (DESIGN.md §5, issue 17),
//! guarding I7 through the `InventoryStore`: `PUT`/`GET
//! /v1/inventory/{sku}`, `POST /v1/holds`, `GET`/`DELETE /v1/holds/{holdId}`.
//! Time is read once per request from the saga's [`paygate_core::Clock`].

use axum::{
    body::Bytes,
    extract::{rejection::PathRejection, FromRequest, FromRequestParts, Path, Request, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use paygate_core::{time::rfc3339_from_ms, OrderId};
use paygate_state_store::{
    Hold, HoldItem, HoldState, InventoryStore, SetStock, StockLevel, StoreError, TakeOutcome,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{auth::AuthedMerchant, problem::Problem, AppState};

/// Most lines one hold may have.
pub const MAX_HOLD_ITEMS: usize = 50;
/// Most units of one SKU a hold line, or a SKU's stock, may carry.
pub const MAX_UNITS: i64 = 1_000_000_000;

/// Body of `PUT /v1/inventory/{sku}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StockBody {
    /// Units the merchant has, 0 to 1,000,000,000; refused (409) below
    /// `sold + held`.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub stock: i64,
}

/// A SKU's numbers (units).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StockView {
    /// The SKU.
    pub sku: String,
    /// Units the merchant has.
    pub stock: i64,
    /// Units in active holds (`pre` and unexpired, or `during`).
    pub held: i64,
    /// Units sold (approved payments with a hold).
    pub sold: i64,
    /// `stock - sold - held`.
    pub available: i64,
}

impl From<StockLevel> for StockView {
    fn from(l: StockLevel) -> Self {
        Self {
            sku: l.sku,
            stock: l.stock,
            held: l.held,
            sold: l.sold,
            available: l.available,
        }
    }
}

/// One line of a hold.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldLine {
    /// 1-64 characters of `[A-Za-z0-9-_.]`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.-]+$")]
    pub sku: String,
    /// Units, 1 to 1,000,000,000.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub quantity: i64,
}

/// Body of `POST /v1/holds`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HoldBody {
    /// The order the hold is for (6-64 of `[A-Za-z0-9-_.]`); the confirm
    /// of this orderId uses it.
    #[schema(min_length = 6, max_length = 64, pattern = "^[A-Za-z0-9_.-]+$")]
    pub order_id: String,
    /// 1 to 50 lines, each SKU once.
    #[schema(min_items = 1, max_items = 50)]
    pub items: Vec<HoldLine>,
    /// Seconds the hold lasts before a confirm (default and maximum from
    /// config: `hold_default_ttl_seconds`, `hold_max_ttl_seconds`).
    #[schema(minimum = 1)]
    pub ttl_seconds: Option<u64>,
}

/// A hold as a merchant sees it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HoldView {
    /// `hold_` + ULID.
    pub hold_id: String,
    /// The order.
    pub order_id: String,
    /// `pre`, `during`, `sold`, `released`, or `expired` (a `pre` hold past
    /// `expiresAt`: its units are free again).
    pub state: String,
    /// When a `pre` hold stops holding, RFC 3339 (UTC).
    pub expires_at: String,
    /// Its lines.
    pub items: Vec<HoldLine>,
}

impl HoldView {
    fn of(h: &Hold, now: i64) -> Self {
        Self {
            hold_id: h.hold_id.clone(),
            order_id: h.order_id.to_string(),
            state: h.shown_state(now).to_owned(),
            expires_at: rfc3339_from_ms(h.expires_at),
            items: h
                .items
                .iter()
                .map(|i| HoldLine {
                    sku: i.sku.clone(),
                    quantity: i.quantity,
                })
                .collect(),
        }
    }
}

fn valid_sku(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn inventory(state: &AppState) -> Result<&std::sync::Arc<dyn InventoryStore>, Problem> {
    state
        .saga
        .inventory()
        .ok_or_else(|| Problem::unavailable("inventory is not configured"))
}

fn store_down(e: &StoreError) -> Problem {
    tracing::error!(error = %e, "inventory store unavailable");
    Problem::unavailable("inventory store unavailable")
}

fn no_hold() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "Not found",
        "no such hold",
    )
}

fn sku_param(p: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    let Path(sku) =
        p.map_err(|_| Problem::invalid("a path segment is not valid percent-encoded UTF-8"))?;
    if !valid_sku(&sku) {
        return Err(Problem::invalid("sku must be 1-64 of [A-Za-z0-9-_.]"));
    }
    Ok(sku)
}

/// The merchant and the JSON body of a request (`Content-Type:
/// application/json`, no unknown member).
pub(crate) async fn authed_json<T: DeserializeOwned>(
    state: &AppState,
    req: Request,
    shape: &str,
) -> Result<(AuthedMerchant, T), Problem> {
    let (mut parts, body) = req.into_parts();
    let merchant = AuthedMerchant::from_request_parts(&mut parts, state).await?;
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|e| e.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(Problem::unsupported_media_type());
    }
    let body = Bytes::from_request(Request::from_parts(parts, body), state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::payload_too_large()
            } else {
                Problem::invalid("the body could not be read")
            }
        })?;
    let body = serde_json::from_slice(&body)
        .map_err(|_| Problem::invalid(format!("body must be JSON {shape} and nothing else")))?;
    Ok((merchant, body))
}

/// `PUT /v1/inventory/{sku}`: sets the SKU's stock.
#[utoipa::path(put, path = "/v1/inventory/{sku}", tag = "inventory",
    params(("sku" = String, Path, description = "1-64 of [A-Za-z0-9-_.]")),
    request_body = StockBody,
    responses(
        (status = 200, description = "the SKU after the change", body = StockView),
        (status = 400, description = "invalid SKU or body", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 405, description = "another method on this path", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "OUT_OF_STOCK: the stock asked is below sold + held", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 413, description = "body over 16 KiB", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "rate limited (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "store unavailable, or too many requests in flight (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn put_inventory(
    State(state): State<AppState>,
    sku: Result<Path<String>, PathRejection>,
    req: Request,
) -> Result<Response, Problem> {
    let (AuthedMerchant(merchant), body) =
        authed_json::<StockBody>(&state, req, "{\"stock\": integer >= 0}").await?;
    let sku = sku_param(sku)?;
    if !(0..=MAX_UNITS).contains(&body.stock) {
        return Err(Problem::invalid("stock must be 0 to 1000000000"));
    }
    let now = state.saga.clock().now_ms();
    match inventory(&state)?
        .set_stock(&merchant.merchant_id, &sku, body.stock, now)
        .await
    {
        Ok(SetStock::Set(level)) => Ok(Json(StockView::from(level)).into_response()),
        Ok(SetStock::BelowCommitted(level)) => Err(Problem::new(
            StatusCode::CONFLICT,
            "OUT_OF_STOCK",
            "Stock below what is committed",
            format!(
                "stock cannot go below sold + held ({} + {}) for {}",
                level.sold, level.held, level.sku
            ),
        )),
        Err(e) => Err(store_down(&e)),
    }
}

/// `GET /v1/inventory/{sku}`.
#[utoipa::path(get, path = "/v1/inventory/{sku}", tag = "inventory",
    params(("sku" = String, Path, description = "1-64 of [A-Za-z0-9-_.]")),
    responses(
        (status = 200, description = "the SKU's numbers now", body = StockView),
        (status = 400, description = "invalid SKU", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "SKU never stocked by this merchant", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 405, description = "another method on this path", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "rate limited (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "store unavailable (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_inventory(
    State(state): State<AppState>,
    AuthedMerchant(merchant): AuthedMerchant,
    sku: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let sku = sku_param(sku)?;
    let now = state.saga.clock().now_ms();
    match inventory(&state)?
        .level(&merchant.merchant_id, &sku, now)
        .await
    {
        Ok(Some(level)) => Ok(Json(StockView::from(level)).into_response()),
        Ok(None) => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "Not found",
            "no such SKU",
        )),
        Err(e) => Err(store_down(&e)),
    }
}

/// Validates a hold body into a `pre` hold at `now`.
fn hold_of(
    state: &AppState,
    merchant: &AuthedMerchant,
    body: HoldBody,
    now: i64,
) -> Result<Hold, Problem> {
    let order_id = OrderId::parse(&body.order_id).map_err(|e| Problem::invalid(e.to_string()))?;
    if body.items.is_empty() || body.items.len() > MAX_HOLD_ITEMS {
        return Err(Problem::invalid("items must have 1 to 50 lines"));
    }
    let mut skus = std::collections::BTreeSet::new();
    for i in &body.items {
        if !valid_sku(&i.sku) {
            return Err(Problem::invalid("sku must be 1-64 of [A-Za-z0-9-_.]"));
        }
        if !(1..=MAX_UNITS).contains(&i.quantity) {
            return Err(Problem::invalid("quantity must be 1 to 1000000000"));
        }
        if !skus.insert(i.sku.as_str()) {
            return Err(Problem::invalid("each sku may appear once in items"));
        }
    }
    let ttl = body.ttl_seconds.unwrap_or(state.hold_default_ttl_s);
    if ttl == 0 || ttl > state.hold_max_ttl_s {
        return Err(Problem::invalid(format!(
            "ttlSeconds must be 1 to {}",
            state.hold_max_ttl_s
        )));
    }
    let mut lines: Vec<(&str, i64)> = body
        .items
        .iter()
        .map(|i| (i.sku.as_str(), i.quantity))
        .collect();
    lines.sort_unstable();
    let mut parts: Vec<String> = vec![order_id.to_string(), ttl.to_string()];
    parts.extend(lines.iter().map(|(s, q)| format!("{s}={q}")));
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let fingerprint = paygate_core::crypto::fingerprint(&refs);
    let ttl_ms = i64::try_from(ttl).unwrap_or(i64::MAX).saturating_mul(1_000);
    let items = body
        .items
        .into_iter()
        .map(|i| HoldItem {
            sku: i.sku,
            quantity: i.quantity,
        })
        .collect();
    Ok(Hold::new_pre(
        merchant.0.merchant_id.clone(),
        order_id,
        items,
        now.saturating_add(ttl_ms),
        fingerprint,
        now,
    ))
}

/// `POST /v1/holds`: holds stock for an order.
#[utoipa::path(post, path = "/v1/holds", tag = "inventory",
    request_body = HoldBody,
    responses(
        (status = 201, description = "held (state pre)", body = HoldView),
        (status = 200, description = "a replay: the order's hold, as it stands", body = HoldView),
        (status = 400, description = "invalid body (order id, SKU, quantity, ttlSeconds out of range, a SKU twice)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 405, description = "another method on this path", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "OUT_OF_STOCK: the detail names the short SKUs; nothing was held", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 413, description = "body over 16 KiB", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 422, description = "ORDER_ID_REUSED: the order has a hold with another body", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "rate limited (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "store unavailable, or too many requests in flight (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn post_hold(State(state): State<AppState>, req: Request) -> Result<Response, Problem> {
    let (merchant, body) = authed_json::<HoldBody>(
        &state,
        req,
        "{\"orderId\": string, \"items\": [{\"sku\": string, \"quantity\": integer}], \"ttlSeconds\"?: integer}",
    )
    .await?;
    let now = state.saga.clock().now_ms();
    let hold = hold_of(&state, &merchant, body, now)?;
    match inventory(&state)?.take(&hold, now).await {
        Ok(TakeOutcome::Taken(h)) => {
            Ok((StatusCode::CREATED, Json(HoldView::of(&h, now))).into_response())
        }
        Ok(TakeOutcome::Exists(h)) if h.fingerprint == hold.fingerprint => {
            Ok((StatusCode::OK, Json(HoldView::of(&h, now))).into_response())
        }
        Ok(TakeOutcome::Exists(_)) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ORDER_ID_REUSED",
            "Conflicting reuse",
            "this orderId has a hold with a different body",
        )),
        Ok(TakeOutcome::OutOfStock(short)) => Err(Problem::new(
            StatusCode::CONFLICT,
            "OUT_OF_STOCK",
            "Out of stock",
            format!("not enough available for: {}", short.join(", ")),
        )),
        Err(e) => Err(store_down(&e)),
    }
}

fn hold_id_param(p: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    let Path(id) =
        p.map_err(|_| Problem::invalid("a path segment is not valid percent-encoded UTF-8"))?;
    if !id.starts_with("hold_") || id.len() > 64 {
        return Err(no_hold());
    }
    Ok(id)
}

/// `GET /v1/holds/{holdId}`.
#[utoipa::path(get, path = "/v1/holds/{hold_id}", tag = "inventory",
    params(("hold_id" = String, Path, description = "hold_ + ULID")),
    responses(
        (status = 200, description = "the hold", body = HoldView),
        (status = 400, description = "a path segment that is not valid percent-encoded UTF-8", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "no such hold for this merchant", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 405, description = "another method on this path", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "rate limited (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "store unavailable (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_hold(
    State(state): State<AppState>,
    AuthedMerchant(merchant): AuthedMerchant,
    hold_id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = hold_id_param(hold_id)?;
    let now = state.saga.clock().now_ms();
    match inventory(&state)?.hold(&merchant.merchant_id, &id).await {
        Ok(Some(h)) => Ok(Json(HoldView::of(&h, now)).into_response()),
        Ok(None) => Err(no_hold()),
        Err(e) => Err(store_down(&e)),
    }
}

/// `DELETE /v1/holds/{holdId}`: releases a `pre` hold (the buyer left).
/// A hold whose confirm is at the card company (`during`) or sold stays as
/// it is; the answer shows its state.
#[utoipa::path(delete, path = "/v1/holds/{hold_id}", tag = "inventory",
    params(("hold_id" = String, Path, description = "hold_ + ULID")),
    responses(
        (status = 200, description = "the hold after the release (released, or during/sold when a payment has it)", body = HoldView),
        (status = 400, description = "a path segment that is not valid percent-encoded UTF-8", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "missing or bad API key", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "no such hold for this merchant", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 405, description = "another method on this path", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "rate limited (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "store unavailable (Retry-After)", body = crate::problem::ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_hold(
    State(state): State<AppState>,
    AuthedMerchant(merchant): AuthedMerchant,
    hold_id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = hold_id_param(hold_id)?;
    let inv = inventory(&state)?;
    let now = state.saga.clock().now_ms();
    let hold = match inv.hold(&merchant.merchant_id, &id).await {
        Ok(Some(h)) => h,
        Ok(None) => return Err(no_hold()),
        Err(e) => return Err(store_down(&e)),
    };
    match inv
        .release(
            &merchant.merchant_id,
            &hold.order_id,
            &[HoldState::Pre],
            now,
        )
        .await
    {
        Ok(Some(h)) => Ok(Json(HoldView::of(&h, now)).into_response()),
        Ok(None) => Err(no_hold()),
        Err(e) => Err(store_down(&e)),
    }
}
