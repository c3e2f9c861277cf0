//! The payments that need a person, as `paygate payments list --problems`
//! and the console's Problems page list them: unknown outcomes, paid but
//! unsaved, `PENDING` past an age, and unresolved alerts whose reason
//! nothing automatic will act on (mismatches, oversold, stuck cancels).
//! Free text is masked (I6) before it leaves this module.

use std::{sync::Arc, time::Duration};

use futures_util::TryStreamExt;
use paygate_alert::SqlOutbox;
use paygate_core::{masking::mask_text, CardStatus, Partition, PaymentId, PaymentRecord};
use paygate_state_store::{SqlDatabase, StateStore, StoreError};
use serde_json::{json, Value};

/// One payment (or alert) that needs a person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `unknown`, `paid_unsaved`, `stale_pending` or `alert`.
    pub kind: &'static str,
    /// Since when (epoch ms): the record's last change, or the alert's raise.
    pub since_ms: i64,
    /// The payment (an alert about an order paygate never saw may carry an
    /// order id, or nothing).
    pub payment_id: String,
    /// Its merchant (empty when the record is not found).
    pub merchant_id: String,
    /// Its orderId (empty when the record is not found).
    pub order_id: String,
    /// Its amount, minor units.
    pub amount: Option<i64>,
    /// The card status (and ` paid`), or the alert's reason and `#id`.
    pub status: String,
    /// The last error or the alert's detail, masked.
    pub detail: String,
}

impl Problem {
    fn of_record(kind: &'static str, r: &PaymentRecord) -> Self {
        Self {
            kind,
            since_ms: r.updated_at,
            payment_id: r.payment_id.to_string(),
            merchant_id: r.merchant_id.to_string(),
            order_id: r.order_id.to_string(),
            amount: Some(r.amount),
            status: format!(
                "{}{}",
                r.card_status.as_str(),
                if r.is_paid { " paid" } else { "" }
            ),
            detail: mask_text(r.last_error.as_deref().unwrap_or_default()),
        }
    }

    /// The JSON line `payments list --problems --json` prints: `{kind,
    /// since (RFC 3339), paymentId, merchantId, orderId, amount, status,
    /// detail}`.
    pub fn json(&self) -> Value {
        json!({
            "kind": self.kind,
            "since": paygate_core::time::rfc3339_from_ms(self.since_ms),
            "paymentId": self.payment_id,
            "merchantId": self.merchant_id,
            "orderId": self.order_id,
            "amount": self.amount,
            "status": self.status,
            "detail": self.detail,
        })
    }
}

/// Alert reasons that stay a problem until an operator resolves them: the
/// card company and paygate disagree, and nothing automatic will act.
pub const MISMATCH_REASONS: &[&str] = &[
    "card_mismatch",
    "amount_mismatch",
    "paid_not_approved",
    "orphan_not_canceled",
    "cancel_unknown",
    "reversal_failed",
    "cancel_mismatch",
    "oversold",
];

/// Every problem, newest first: the realtime records that are `UNKNOWN`,
/// paid but unsaved, or `PENDING` with no change for `older_than`, and the
/// unresolved alerts of [`MISMATCH_REASONS`]; only `merchant`'s when given.
/// Reads the whole realtime partition (it holds only what is not settled
/// yet; the batch moves the rest out).
///
/// # Errors
/// [`StoreError`] of the state store or the outbox.
pub async fn problems(
    db: &SqlDatabase,
    store: &Arc<dyn StateStore>,
    merchant: Option<&str>,
    older_than: Duration,
) -> Result<Vec<Problem>, StoreError> {
    let now = paygate_core::time::now_ms();
    let stale_before = now - i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
    let mut out = Vec::new();
    let mut records = store.scan(Partition::Realtime, 500);
    while let Some(r) = records.try_next().await? {
        if merchant.is_some_and(|m| r.merchant_id.as_str() != m) {
            continue;
        }
        let kind = match r.card_status {
            CardStatus::Unknown if !r.is_paid => Some("unknown"),
            _ if r.is_paid && !r.is_saved => Some("paid_unsaved"),
            CardStatus::Pending if !r.is_paid && r.updated_at <= stale_before => {
                Some("stale_pending")
            }
            _ => None,
        };
        if let Some(kind) = kind {
            out.push(Problem::of_record(kind, &r));
        }
    }
    drop(records);
    for a in SqlOutbox::new(db.clone())
        .unresolved(MISMATCH_REASONS, 10_000)
        .await?
    {
        let pid = a.payment_id.clone().unwrap_or_default();
        let record = if pid.starts_with("pay_") {
            store.get(&PaymentId::from_stored(pid.as_str())).await?
        } else {
            None
        };
        let merchant_id = record
            .as_ref()
            .map(|(_, r)| r.merchant_id.to_string())
            .unwrap_or_default();
        if merchant.is_some_and(|m| merchant_id != m) {
            continue;
        }
        out.push(Problem {
            kind: "alert",
            since_ms: a.created_at,
            payment_id: pid,
            merchant_id,
            order_id: record
                .as_ref()
                .map(|(_, r)| r.order_id.to_string())
                .unwrap_or_default(),
            amount: record.as_ref().map(|(_, r)| r.amount),
            status: format!("{} #{}", a.reason, a.id),
            detail: mask_text(&a.detail()),
        });
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.since_ms));
    Ok(out)
}
