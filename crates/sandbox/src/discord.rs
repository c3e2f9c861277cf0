//! The Discord webhook simulator (DESIGN.md §8): enforces the message limits
//! (400 on oversize), a per-webhook rate limit (429 with `retry_after` and
//! `X-RateLimit-*` headers past `limit` requests per `per`), can pretend the
//! webhook was deleted (404, code 10015), that its token is wrong (401,
//! code 50027) or that the rate limit never lifts (429 to every request), and
//! records every message accepted.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use serde_json::{json, Value};
use tokio::time::Instant;

/// Counts of what the simulator saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscordStats {
    /// Requests received.
    pub requests: u64,
    /// Messages accepted.
    pub delivered: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// 400 answers.
    pub rejected: u64,
    /// 404 answers.
    pub unknown: u64,
    /// 401 answers.
    pub unauthorized: u64,
}

/// The simulator.
pub struct DiscordSim {
    limit: usize,
    per: Duration,
    unknown: AtomicBool,
    invalid_token: AtomicBool,
    /// Some: every request is answered 429 with this `retry_after`.
    always_limited: Mutex<Option<Duration>>,
    window: Mutex<VecDeque<Instant>>,
    received: Mutex<Vec<Value>>,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    rejected: AtomicU64,
    unknown_answers: AtomicU64,
    unauthorized: AtomicU64,
}

impl DiscordSim {
    /// A webhook allowing `limit` requests per `per` (Discord: about 5 per 2 s).
    pub fn new(limit: usize, per: Duration) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            per,
            unknown: AtomicBool::new(false),
            invalid_token: AtomicBool::new(false),
            always_limited: Mutex::new(None),
            window: Mutex::new(VecDeque::new()),
            received: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            unknown_answers: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
        })
    }

    fn received_lock(&self) -> MutexGuard<'_, Vec<Value>> {
        self.received.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answer 404 Unknown Webhook from now on (or stop doing so).
    pub fn set_unknown(&self, unknown: bool) {
        self.unknown.store(unknown, Ordering::SeqCst);
    }

    /// Answer 401 Invalid Webhook Token (code 50027) from now on (or stop
    /// doing so), as Discord does when the URL's token is wrong.
    pub fn set_invalid_token(&self, invalid: bool) {
        self.invalid_token.store(invalid, Ordering::SeqCst);
    }

    /// With `Some(retry_after)`, answer every request 429 with that
    /// `retry_after` (a rate limit that never lifts); `None` goes back to
    /// the normal window.
    pub fn set_always_rate_limited(&self, retry_after: Option<Duration>) {
        *self
            .always_limited
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = retry_after;
    }

    /// Messages accepted, in order.
    pub fn received(&self) -> Vec<Value> {
        self.received_lock().clone()
    }

    /// Counts so far.
    pub fn stats(&self) -> DiscordStats {
        DiscordStats {
            requests: self.requests.load(Ordering::SeqCst),
            delivered: self.received_lock().len() as u64,
            rate_limited: self.rate_limited.load(Ordering::SeqCst),
            rejected: self.rejected.load(Ordering::SeqCst),
            unknown: self.unknown_answers.load(Ordering::SeqCst),
            unauthorized: self.unauthorized.load(Ordering::SeqCst),
        }
    }
}

/// Routes: `POST /api/webhooks/{id}/{token}`.
pub fn router(sim: Arc<DiscordSim>) -> Router {
    Router::new()
        .route("/api/webhooks/{id}/{token}", post(execute))
        .with_state(sim)
}

fn chars(v: &Value) -> usize {
    v.as_str().map_or(0, |s| s.chars().count())
}

/// Checks the documented limits; the error names the first one broken.
fn check_limits(body: &Value) -> Result<(), &'static str> {
    if chars(&body["content"]) > 2000 {
        return Err("content longer than 2000");
    }
    let embeds = body["embeds"].as_array().cloned().unwrap_or_default();
    if embeds.len() > 10 {
        return Err("more than 10 embeds");
    }
    let mut total = 0;
    for e in &embeds {
        if chars(&e["title"]) > 256 {
            return Err("embed title longer than 256");
        }
        if chars(&e["description"]) > 4096 {
            return Err("embed description longer than 4096");
        }
        let fields = e["fields"].as_array().cloned().unwrap_or_default();
        if fields.len() > 25 {
            return Err("more than 25 fields");
        }
        total += chars(&e["title"]) + chars(&e["description"]);
        for f in &fields {
            if chars(&f["value"]) > 1024 {
                return Err("field value longer than 1024");
            }
            if chars(&f["name"]) > 256 {
                return Err("field name longer than 256");
            }
            total += chars(&f["name"]) + chars(&f["value"]);
        }
    }
    if total > 6000 {
        return Err("embeds longer than 6000 in all");
    }
    if body["content"].is_null() && embeds.is_empty() {
        return Err("empty message");
    }
    Ok(())
}

async fn execute(
    State(sim): State<Arc<DiscordSim>>,
    Path(_): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    sim.requests.fetch_add(1, Ordering::SeqCst);
    if sim.unknown.load(Ordering::SeqCst) {
        sim.unknown_answers.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "Unknown Webhook", "code": 10015})),
        )
            .into_response();
    }
    if sim.invalid_token.load(Ordering::SeqCst) {
        sim.unauthorized.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"message": "Invalid Webhook Token", "code": 50027})),
        )
            .into_response();
    }
    let always_limited = *sim.always_limited.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(retry_after) = always_limited {
        sim.rate_limited.fetch_add(1, Ordering::SeqCst);
        let mut headers = HeaderMap::new();
        headers.insert(
            "retry-after",
            HeaderValue::from(retry_after.as_secs_f64().ceil() as u64),
        );
        let body = json!({"message": "You are being rate limited.", "retry_after": retry_after.as_secs_f64(), "global": true});
        return (StatusCode::TOO_MANY_REQUESTS, headers, Json(body)).into_response();
    }
    let now = Instant::now();
    let (allowed, remaining, reset_after) = {
        let mut w = sim.window.lock().unwrap_or_else(|p| p.into_inner());
        while w.front().is_some_and(|t| now.duration_since(*t) >= sim.per) {
            w.pop_front();
        }
        let reset_after = w
            .front()
            .map_or(sim.per, |t| sim.per.saturating_sub(now.duration_since(*t)));
        if w.len() >= sim.limit {
            (false, 0, reset_after)
        } else {
            w.push_back(now);
            (true, sim.limit - w.len(), reset_after)
        }
    };
    let mut headers = HeaderMap::new();
    headers.insert("x-ratelimit-limit", HeaderValue::from(sim.limit as u64));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(remaining as u64));
    if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", reset_after.as_secs_f64())) {
        headers.insert("x-ratelimit-reset-after", v);
    }
    if !allowed {
        sim.rate_limited.fetch_add(1, Ordering::SeqCst);
        headers.insert(
            "retry-after",
            HeaderValue::from(reset_after.as_secs_f64().ceil() as u64),
        );
        let body = json!({"message": "You are being rate limited.", "retry_after": reset_after.as_secs_f64(), "global": false});
        return (StatusCode::TOO_MANY_REQUESTS, headers, Json(body)).into_response();
    }
    if let Err(why) = check_limits(&body) {
        sim.rejected.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::BAD_REQUEST,
            headers,
            Json(json!({"message": why, "code": 50035})),
        )
            .into_response();
    }
    sim.received_lock().push(body.clone());
    (
        StatusCode::OK,
        headers,
        Json(json!({"id": ulid::Ulid::new().to_string(), "content": body["content"]})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_messages_are_refused() {
        assert!(check_limits(&json!({"content": "x".repeat(2001)})).is_err());
        assert!(
            check_limits(&json!({"content": "ok", "embeds": [{"title": "t".repeat(257)}]}))
                .is_err()
        );
        assert!(check_limits(
            &json!({"content": "ok", "embeds": [{"description": "d".repeat(4097)}]})
        )
        .is_err());
        assert!(check_limits(&json!({"content": "ok"})).is_ok());
    }
}
