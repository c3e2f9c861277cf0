//! The card simulator's outgoing webhooks: Toss Payments'
//! `PAYMENT_STATUS_CHANGED`, posted for every change the simulator makes to
//! a payment (an approval, a decline, a cancel through the API or "in its
//! console", a non-final answer turning `DONE` later).
//!
//! As Toss sends them (Toss Payments guide, 웹훅 / webhooks): the body is
//! `{"eventType": "PAYMENT_STATUS_CHANGED", "createdAt": <local time, with
//! a fraction>, "data": <the Payment object>}`, unsigned; any answer but
//! 200 is a failure, retried up to 7 times at 1, 4, 16, 64, 256, 1024 and
//! 4096 minutes after the previous try. A test divides that schedule by a
//! compression factor (60 000 turns the first minute into 1 ms).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

/// Toss's waits before each redelivery, minutes.
pub const RETRY_MINUTES: [u64; 7] = [1, 4, 16, 64, 256, 1024, 4096];

/// Where the webhooks go.
#[derive(Clone, Debug)]
struct Target {
    url: String,
    compression: u32,
    client: reqwest::Client,
}

/// Counts of the webhooks sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WebhookStats {
    /// Events emitted (one per change).
    pub events: u64,
    /// Delivery attempts made (first tries and redeliveries).
    pub attempts: u64,
    /// Events answered 200.
    pub delivered: u64,
    /// Events given up after the last redelivery.
    pub abandoned: u64,
}

/// The sender: off until [`WebhookSender::send_to`] names a URL.
#[derive(Debug, Default)]
pub struct WebhookSender {
    target: Mutex<Option<Target>>,
    events: AtomicU64,
    attempts: AtomicU64,
    delivered: AtomicU64,
    abandoned: AtomicU64,
}

impl WebhookSender {
    /// Sends every later change to `url`, with Toss's retry schedule
    /// divided by `compression` (at least 1).
    pub fn send_to(&self, url: &str, compression: u32) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(Target {
            url: url.to_owned(),
            compression: compression.max(1),
            client,
        });
    }

    /// Counts so far.
    pub fn stats(&self) -> WebhookStats {
        WebhookStats {
            events: self.events.load(Ordering::SeqCst),
            attempts: self.attempts.load(Ordering::SeqCst),
            delivered: self.delivered.load(Ordering::SeqCst),
            abandoned: self.abandoned.load(Ordering::SeqCst),
        }
    }

    /// The body of a `PAYMENT_STATUS_CHANGED` event for `payment` (the
    /// Toss `Payment` object as JSON), created at `at_ms` (epoch ms).
    pub fn event(payment: serde_json::Value, at_ms: i64) -> serde_json::Value {
        serde_json::json!({
            "eventType": "PAYMENT_STATUS_CHANGED",
            "createdAt": created_at(at_ms),
            "data": payment,
        })
    }

    /// Emits one event for `payment` in the background (nothing when no
    /// URL is set): the first try at once, then Toss's redeliveries until
    /// one is answered 200.
    pub fn emit(self: &std::sync::Arc<Self>, payment: serde_json::Value) {
        let Some(target) = self
            .target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        self.events.fetch_add(1, Ordering::SeqCst);
        let body = Self::event(payment, paygate_core::time::now_ms());
        let me = self.clone();
        tokio::spawn(async move {
            let waits = std::iter::once(Duration::ZERO).chain(
                RETRY_MINUTES
                    .iter()
                    .map(|m| Duration::from_millis(m * 60_000 / u64::from(target.compression))),
            );
            for wait in waits {
                tokio::time::sleep(wait).await;
                me.attempts.fetch_add(1, Ordering::SeqCst);
                let answer = target.client.post(&target.url).json(&body).send().await;
                if matches!(&answer, Ok(r) if r.status().as_u16() == 200) {
                    me.delivered.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            me.abandoned.fetch_add(1, Ordering::SeqCst);
        });
    }
}

/// Toss's `createdAt` form: KST local time with a fraction
/// (`2024-02-13T12:18:14.123000`), so two changes in one second differ.
fn created_at(at_ms: i64) -> String {
    format!(
        "{}.{:03}000",
        paygate_core::time::kst_local_from_ms(at_ms),
        at_ms.rem_euclid(1000)
    )
}
