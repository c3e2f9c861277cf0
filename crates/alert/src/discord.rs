//! Discord webhook client (DESIGN.md §8): `POST <webhook url>?wait=true`.
//!
//! - The message is built within Discord's limits: `content` <= 2000
//!   characters, an embed with title <= 256, description <= 4096, field
//!   values <= 1024, <= 25 fields, all embed text <= 6000; mentions are off
//!   (`allowed_mentions: {"parse": []}`).
//! - 429: waits the body's `retry_after` (seconds, float) or the
//!   `Retry-After` header, then resends (a bounded number of times). A send
//!   with a deadline ([`DiscordClient::send_before`]) never waits past it:
//!   a wait that does not fit gives up with [`DiscordError::OutOfTime`], and
//!   the client remembers not to send before the wait is over.
//! - The `X-RateLimit-Remaining` / `X-RateLimit-Reset-After` headers are
//!   read, and the next send waits for the reset when the bucket is empty,
//!   rather than hard-coding Discord's limits.
//! - 404 (unknown webhook, code 10015): the URL is not used again by this
//!   process; an error is logged and alerts stay in the outbox.
//! - Any other 4xx (400 bad payload, 401 invalid webhook token, 403, 413):
//!   [`DiscordError::Rejected`], a refusal that resending will not change;
//!   the outbox parks the message.
//!
//! The webhook URL is a credential: it is held as a [`Secret`] and never logged.

use std::{sync::atomic::AtomicBool, sync::atomic::Ordering, time::Duration};

use paygate_core::Secret;
use serde_json::{json, Value};
use tokio::{sync::Mutex, time::Instant};

use crate::Alert;

/// Why a message was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscordError {
    /// 404: the webhook no longer exists; this client is disabled.
    #[error("unknown webhook (404); alerts stay in the outbox")]
    UnknownWebhook,
    /// 400, 401 or another 4xx but 404 and 429: this message was refused
    /// and resending it will not change that (the next message may pass).
    /// Holds the status and Discord's explanation (its JSON `message` and
    /// `code`, which name no secret).
    #[error("Discord refused the message: HTTP {0}: {1}")]
    Rejected(u16, String),
    /// Still rate limited after the allowed waits.
    #[error("still rate limited after {0} waits")]
    RateLimited(u32),
    /// 5xx, timeout or connection failure.
    #[error("Discord unavailable: {0}")]
    Unavailable(String),
    /// The deadline came before the message could be sent (a rate-limit wait
    /// longer than the time left, or no time left at all).
    #[error("no time left to send before the deadline")]
    OutOfTime,
}

impl DiscordError {
    /// True when no further message should be tried in this flush.
    pub fn stops_delivery(&self) -> bool {
        !self.is_permanent()
    }

    /// True when this message will never be accepted as it is: resending it
    /// is pointless, so the outbox parks it.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Rejected(..))
    }
}

/// Longest single wait honoured for a 429; a longer `retry_after` is cut to it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Longest wait for Discord's answer to one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A Discord webhook client.
pub struct DiscordClient {
    http: reqwest::Client,
    url: Secret<String>,
    disabled: AtomicBool,
    not_before: Mutex<Option<Instant>>,
    max_waits: u32,
}

impl std::fmt::Debug for DiscordClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscordClient")
            .field("url", &self.url)
            .field("disabled", &self.is_disabled())
            .finish()
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(max_chars.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// The webhook body for an alert, within Discord's limits.
pub fn message_for(a: &Alert) -> Value {
    message_with_link(a, None)
}

/// The console page of a payment: `{base}/payments/{paymentId}`, the id
/// percent-encoded (a payment id is `pay_` and a ULID, but an alert about
/// an unknown order may carry whatever the card company sent).
pub fn console_link(base: &str, payment_id: &str) -> String {
    format!(
        "{}/payments/{}",
        base.trim_end_matches('/'),
        percent(payment_id)
    )
}

/// Every byte but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `s` percent-encoded for a URL path segment or query value: `a b/c` is
/// `a%20b%2Fc`.
pub fn percent(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

/// [`message_for`], with a link to the payment's console page (`link`,
/// from [`console_link`]): the embed's title links there and a `console`
/// field carries it, so an operator goes from the alert to the payment's
/// timeline in one click.
pub fn message_with_link(a: &Alert, link: Option<&str>) -> Value {
    let content = truncate(
        &format!(
            "🚨 paygate: {} — payment `{}` (order `{}`)",
            a.reason.title(),
            a.payment_id,
            a.order_id
        ),
        2000,
    );
    let fields = [
        ("payment", a.payment_id.as_str()),
        ("merchant", a.merchant_id.as_str()),
        ("order", a.order_id.as_str()),
        ("reason", a.reason.as_str()),
    ];
    let mut fields: Vec<Value> = fields
        .iter()
        .map(|(name, value)| json!({"name": name, "value": truncate(value, 1024), "inline": true}))
        .collect();
    fields.push(
        json!({"name": "amount (minor units)", "value": a.amount.to_string(), "inline": true}),
    );
    // A link longer than a field value is left out rather than cut (a cut
    // link is a wrong link); console URLs are far shorter.
    let link = link.filter(|l| l.chars().count() <= 1024);
    if let Some(l) = link {
        fields.push(json!({"name": "console", "value": l, "inline": false}));
    }
    // Title 256 + description 1500 + six short fields stays well under 6000.
    let mut embed = json!({
        "title": truncate(a.reason.title(), 256),
        "description": truncate(&a.detail, 1500),
        "fields": fields,
    });
    if let Some(l) = link {
        embed["url"] = json!(l);
    }
    json!({
        "content": content,
        "username": "paygate",
        "embeds": [embed],
        "allowed_mentions": {"parse": []},
    })
}

impl DiscordClient {
    /// A client for `url`, resending after at most `max_waits` 429s per message.
    pub fn new(http: reqwest::Client, url: Secret<String>, max_waits: u32) -> Self {
        Self {
            http,
            url,
            disabled: AtomicBool::new(false),
            not_before: Mutex::new(None),
            max_waits,
        }
    }

    /// True once a 404 has been seen.
    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::SeqCst)
    }

    /// Sends one message, waiting out 429s (at most `max_waits` of them).
    ///
    /// # Errors
    /// [`DiscordError`].
    pub async fn send(&self, body: &Value) -> Result<(), DiscordError> {
        self.send_inner(body, None).await
    }

    /// Sends one message, giving up with [`DiscordError::OutOfTime`] rather
    /// than waiting or being answered past `deadline`.
    ///
    /// # Errors
    /// [`DiscordError`].
    pub async fn send_before(&self, body: &Value, deadline: Instant) -> Result<(), DiscordError> {
        self.send_inner(body, Some(deadline)).await
    }

    async fn send_inner(
        &self,
        body: &Value,
        deadline: Option<Instant>,
    ) -> Result<(), DiscordError> {
        if self.is_disabled() {
            return Err(DiscordError::UnknownWebhook);
        }
        let url = {
            let u = self.url.expose();
            if u.contains('?') {
                format!("{u}&wait=true")
            } else {
                format!("{u}?wait=true")
            }
        };
        let mut waits = 0;
        loop {
            let not_before = *self.not_before.lock().await;
            if let Some(t) = not_before {
                if deadline.is_some_and(|d| t >= d) {
                    return Err(DiscordError::OutOfTime);
                }
                tokio::time::sleep_until(t).await;
            }
            let timeout = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(REQUEST_TIMEOUT),
                    _ => return Err(DiscordError::OutOfTime),
                },
                None => REQUEST_TIMEOUT,
            };
            let resp = self
                .http
                .post(&url)
                .timeout(timeout)
                .json(body)
                .send()
                .await
                .map_err(|e| {
                    if e.is_timeout() && deadline.is_some_and(|d| Instant::now() >= d) {
                        DiscordError::OutOfTime
                    } else {
                        DiscordError::Unavailable(e.without_url().to_string())
                    }
                })?;
            let status = resp.status().as_u16();
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<f64>().ok())
            };
            let remaining = header("x-ratelimit-remaining");
            let reset_after = header("x-ratelimit-reset-after");
            let retry_after_header = header("retry-after");
            let paced = match (remaining, reset_after) {
                (Some(r), Some(after)) if r <= 0.0 => Some(
                    Instant::now()
                        + Duration::from_secs_f64(after.clamp(0.0, MAX_RETRY_AFTER.as_secs_f64())),
                ),
                _ => None,
            };
            *self.not_before.lock().await = paced;
            match status {
                200 | 204 => return Ok(()),
                429 => {
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    let secs = body
                        .get("retry_after")
                        .and_then(Value::as_f64)
                        .or(retry_after_header)
                        .unwrap_or(1.0);
                    let wait =
                        Duration::from_secs_f64(secs.clamp(0.0, MAX_RETRY_AFTER.as_secs_f64()));
                    // No request before the wait is over, from this send or
                    // the next one (the next flush, another task).
                    let until = Instant::now() + wait;
                    {
                        let mut nb = self.not_before.lock().await;
                        *nb = Some(nb.map_or(until, |t| t.max(until)));
                    }
                    waits += 1;
                    metrics::counter!("paygate_alert_rate_limited_total").increment(1);
                    if waits > self.max_waits {
                        return Err(DiscordError::RateLimited(self.max_waits));
                    }
                    tracing::info!(
                        wait_ms = wait.as_millis() as u64,
                        "Discord rate limit; waiting retry_after"
                    );
                    // The wait itself happens at the top of the loop, where
                    // a deadline it would pass ends the send instead.
                }
                404 => {
                    self.disabled.store(true, Ordering::SeqCst);
                    tracing::error!("Discord webhook unknown (404); not using it again, alerts stay in the outbox");
                    return Err(DiscordError::UnknownWebhook);
                }
                s if (400..500).contains(&s) => {
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    let why = format!(
                        "{} (code {})",
                        truncate(
                            body.get("message")
                                .and_then(Value::as_str)
                                .unwrap_or("no message"),
                            200
                        ),
                        body.get("code").and_then(Value::as_i64).unwrap_or(0)
                    );
                    if matches!(s, 401 | 403) {
                        tracing::error!(status = s, discord = %why, "Discord refused an alert message: check the webhook URL's token (PAYGATE_DISCORD_WEBHOOK_URL); resending it will not help");
                    } else {
                        tracing::error!(status = s, discord = %why, "Discord refused an alert message; resending it will not help");
                    }
                    return Err(DiscordError::Rejected(s, why));
                }
                s => return Err(DiscordError::Unavailable(format!("HTTP {s}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AlertReason;

    #[test]
    fn a_message_links_to_its_payment_on_the_console() {
        let a = Alert {
            reason: AlertReason::OutcomeUnknown,
            payment_id: "pay_01ABC".into(),
            merchant_id: "mer_1".into(),
            order_id: "order-1".into(),
            amount: 1000,
            detail: "lost".into(),
        };
        let link = console_link("https://console.example/", "pay_01ABC");
        assert_eq!(link, "https://console.example/payments/pay_01ABC");
        let m = message_with_link(&a, Some(&link));
        assert_eq!(m["embeds"][0]["url"], link.as_str());
        let fields = m["embeds"][0]["fields"].as_array().unwrap();
        assert!(fields
            .iter()
            .any(|f| f["name"] == "console" && f["value"] == link.as_str()));
        let plain = message_for(&a);
        assert!(plain["embeds"][0].get("url").is_none());
        assert_eq!(
            console_link("https://c", "a b/c"),
            "https://c/payments/a%20b%2Fc"
        );
    }

    #[test]
    fn messages_fit_discord_limits() {
        let a = Alert {
            reason: AlertReason::OutcomeUnknown,
            payment_id: "pay_1".into(),
            merchant_id: "mer_1".into(),
            order_id: "o".repeat(3000),
            amount: 1000,
            detail: "d".repeat(10_000),
        };
        let m = message_for(&a);
        assert!(m["content"].as_str().unwrap().chars().count() <= 2000);
        let embed = &m["embeds"][0];
        assert!(embed["description"].as_str().unwrap().chars().count() <= 4096);
        let fields = embed["fields"].as_array().unwrap();
        assert!(fields.len() <= 25);
        assert!(fields
            .iter()
            .all(|f| f["value"].as_str().unwrap().chars().count() <= 1024));
        let total: usize = embed["title"].as_str().unwrap().chars().count()
            + embed["description"].as_str().unwrap().chars().count()
            + fields
                .iter()
                .map(|f| {
                    f["name"].as_str().unwrap().len() + f["value"].as_str().unwrap().chars().count()
                })
                .sum::<usize>();
        assert!(total <= 6000);
        assert_eq!(m["allowed_mentions"]["parse"], serde_json::json!([]));
    }
}
