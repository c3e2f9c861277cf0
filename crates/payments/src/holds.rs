//! Guards I7 (no oversell) on the payment's path: the saga's hooks into the
//! order's stock hold (DESIGN.md §3, issue 17). Each hook is one call at one
//! point of the confirm or the settle path, and a no-op for an order without
//! a hold (or a saga without an inventory store), so a confirm without a
//! hold works exactly as before.
//!
//! - before the card call: the hold moves `pre` → `during` (or is taken
//!   again if it expired and stock allows); otherwise no card call is made
//!   and the payment ends a no-call abort (`PAYGATE_HOLD_EXPIRED`), which a
//!   retry may reopen;
//! - approval (the confirm's, or one the batch or reconciliation recovers):
//!   the hold is sold; if the units had gone to others meanwhile, an
//!   `oversold` alert names the SKUs and the order;
//! - decline or no-call abort: the hold is released.
//!
//! Every store step is a guarded transition, so a replay (a merchant retry,
//! the batch after the confirm) changes nothing twice. A hook whose store
//! call fails logs it and leaves the hold `during`, which never expires: the
//! batch's save of a paid payment sells it later; stock is then held too
//! long, never oversold.

use std::sync::Arc;

use paygate_alert::AlertReason;
use paygate_core::{payment::failure_codes, PaymentRecord};
use paygate_state_store::{BeginOutcome, HoldState, InventoryStore, SellOutcome, Transition};

use crate::{outcome::ConfirmOutcome, Saga};

impl Saga {
    /// Adds the inventory store the hooks use (without one, they do nothing).
    pub fn with_inventory(mut self, inventory: Arc<dyn InventoryStore>) -> Self {
        self.inventory = Some(inventory);
        self
    }

    /// The inventory store, when one is configured.
    pub fn inventory(&self) -> Option<&Arc<dyn InventoryStore>> {
        self.inventory.as_ref()
    }

    /// Before the card call: `None` when the call may go (no hold, or the
    /// hold is `during` now); otherwise the outcome to answer, with the
    /// record marked a no-call abort.
    pub(crate) async fn hold_before_card(
        self: &Arc<Self>,
        record: &PaymentRecord,
    ) -> Option<ConfirmOutcome> {
        let inventory = self.inventory.as_ref()?;
        let now = paygate_core::ambient::now_ms();
        let (code, detail, short) = match inventory
            .begin_payment(&record.merchant_id, &record.order_id, now)
            .await
        {
            Ok(BeginOutcome::NoHold | BeginOutcome::During(_) | BeginOutcome::Sold(_)) => {
                return None
            }
            Ok(BeginOutcome::Expired { short, .. }) => (
                failure_codes::HOLD_EXPIRED,
                format!("the stock hold expired and {} is gone", short.join(", ")),
                Some(short),
            ),
            Err(e) => (
                failure_codes::INVENTORY_UNAVAILABLE,
                format!("inventory store: {e}"),
                None,
            ),
        };
        let t = Transition::MarkAborted {
            failure_code: code.to_owned(),
            last_error: detail,
        };
        if let Err(e) = self.store.transition(&record.payment_id, &t).await {
            tracing::warn!(payment_id = %record.payment_id, error = %e, "could not mark the record aborted");
        }
        metrics::counter!("paygate_payments_total", "outcome" => "not_attempted").increment(1);
        Some(match short {
            Some(short) => ConfirmOutcome::HoldExpired {
                payment_id: record.payment_id.clone(),
                short,
            },
            None => ConfirmOutcome::Unavailable {
                detail: "inventory unavailable; nothing was charged, retry later",
                payment_id: Some(record.payment_id.clone()),
                retry_after_s: Some(1),
            },
        })
    }

    /// After an approval: sells the order's hold (idempotent) and raises an
    /// `oversold` alert when the sale broke I7.
    pub async fn hold_on_paid(&self, record: &PaymentRecord) {
        let Some(inventory) = self.inventory.as_ref() else {
            return;
        };
        let now = paygate_core::ambient::now_ms();
        match inventory
            .sell(&record.merchant_id, &record.order_id, now)
            .await
        {
            Ok(SellOutcome::Sold { oversold, .. }) if !oversold.is_empty() => {
                metrics::counter!("paygate_oversold_total").increment(1);
                let detail = format!(
                    "approved after its hold lapsed; oversold SKU(s): {} (order {})",
                    oversold.join(", "),
                    record.order_id
                );
                self.alert(record, AlertReason::Oversold, detail).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(payment_id = %record.payment_id, error = %e,
                    "could not sell the order's hold; the batch sells it with the ledger save");
            }
        }
    }

    /// After a decline or a no-call abort: releases the order's hold if a
    /// confirm had moved it to `during`.
    pub async fn hold_on_aborted(&self, record: &PaymentRecord) {
        let Some(inventory) = self.inventory.as_ref() else {
            return;
        };
        let now = paygate_core::ambient::now_ms();
        // Only `during`: an abort before the hold moved (an answer that
        // timed out first) leaves a `pre` hold to its buyer's retry.
        let from = [HoldState::During];
        if let Err(e) = inventory
            .release(&record.merchant_id, &record.order_id, &from, now)
            .await
        {
            tracing::warn!(payment_id = %record.payment_id, error = %e,
                "could not release the order's hold; it stays held until its payment is settled again");
        }
    }
}
