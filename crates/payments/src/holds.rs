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
//! call fails (or a process that dies between the payment's last transition
//! and the hook) leaves the hold `during`, which never expires: stock held
//! too long, never oversold. The batch's pass [`Saga::settle_stuck_holds`]
//! then ends it from the payment's stored state: sold when paid, released
//! when the payment ended unpaid, left alone while it is still open.

use std::sync::Arc;

use paygate_alert::AlertReason;
use paygate_core::{payment::failure_codes, CardStatus, PaymentRecord};
use paygate_state_store::{
    BeginOutcome, Hold, HoldState, InventoryStore, SellOutcome, StoreError, Transition,
};

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

    /// Before the card call: `Ok` when the call may go, with the hold this
    /// confirm moved to `during` (at the version it left it) or `None` (no
    /// hold, or already sold); otherwise the outcome to answer, with the
    /// record marked a no-call abort (guarded on the version this confirm
    /// last wrote: a record another actor changed since is left to it,
    /// and the merchant is answered 409).
    pub(crate) async fn hold_before_card(
        self: &Arc<Self>,
        record: &PaymentRecord,
    ) -> Result<Option<Hold>, ConfirmOutcome> {
        let Some(inventory) = self.inventory.as_ref() else {
            return Ok(None);
        };
        let now = self.clock.now_ms();
        let (code, detail, short) = match inventory
            .begin_payment(&record.merchant_id, &record.order_id, now)
            .await
        {
            Ok(BeginOutcome::During(hold)) => return Ok(Some(hold)),
            Ok(BeginOutcome::NoHold | BeginOutcome::Sold(_)) => return Ok(None),
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
            seen_version: Some(record.version),
        };
        metrics::counter!("paygate_payments_total", "outcome" => "not_attempted").increment(1);
        match self.store.transition(&record.payment_id, &t).await {
            Ok(true) => {}
            Ok(false) => return Err(ConfirmOutcome::InFlight(record.clone())),
            Err(e) => {
                tracing::warn!(payment_id = %record.payment_id, error = %e, "could not mark the record aborted");
            }
        }
        let answer = match short {
            Some(short) => ConfirmOutcome::HoldExpired {
                payment_id: record.payment_id.clone(),
                short,
            },
            None => ConfirmOutcome::Unavailable {
                detail: "inventory unavailable; nothing was charged, retry later",
                payment_id: Some(record.payment_id.clone()),
                retry_after_s: Some(1),
            },
        };
        Err(self.nothing_charged(record.clone(), code, answer).await)
    }

    /// After an approval: sells the order's hold (idempotent) and raises an
    /// `oversold` alert when the sale broke I7. Returns whether the sale was
    /// recorded (or there is no inventory to sell from); `false` when the
    /// inventory store failed (logged; the batch sells it later).
    pub async fn hold_on_paid(&self, record: &PaymentRecord) -> bool {
        let Some(inventory) = self.inventory.as_ref() else {
            return true;
        };
        let now = self.clock.now_ms();
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
                true
            }
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(payment_id = %record.payment_id, error = %e,
                    "could not sell the order's hold; the batch sells it with the ledger save");
                false
            }
        }
    }

    /// After a confirm's own decline or no-call abort: releases `moved`,
    /// the hold that confirm moved to `during`, only if it is still at the
    /// version that confirm left it (a retry that began on it since owns
    /// it now).
    pub(crate) async fn release_moved_hold(&self, record: &PaymentRecord, moved: Option<&Hold>) {
        let (Some(inventory), Some(hold)) = (self.inventory.as_ref(), moved) else {
            return;
        };
        let now = self.clock.now_ms();
        match inventory.release_stuck(hold, now).await {
            Ok(true) => {}
            Ok(false) => tracing::info!(payment_id = %record.payment_id, hold_id = %hold.hold_id,
                "the order's hold changed since this confirm moved it; left to its new owner"),
            Err(e) => tracing::warn!(payment_id = %record.payment_id, error = %e,
                "could not release the order's hold; the batch releases it once the payment is filed"),
        }
    }

    /// Releases the order's hold when it is `during` and the payment, read
    /// after the hold, has ended unpaid (as the stuck-hold pass decides);
    /// guarded on the hold's version as read, so a merchant's retry that
    /// reopened the payment and began on the hold since keeps it. The
    /// batch calls it after it files a payment unpaid.
    ///
    /// # Errors
    /// [`StoreError`] from the inventory or state store (nothing changed,
    /// or the release happened; the stuck-hold pass finishes it).
    pub async fn release_hold_if_ended(&self, record: &PaymentRecord) -> Result<(), StoreError> {
        let Some(inventory) = self.inventory.clone() else {
            return Ok(());
        };
        let hold = inventory
            .hold_by_order(&record.merchant_id, &record.order_id)
            .await?;
        match hold {
            Some(hold) if hold.state == HoldState::During => {
                let mut tally = StuckHolds::default();
                self.settle_stuck_hold(inventory.as_ref(), &hold, false, &mut tally)
                    .await
            }
            _ => Ok(()),
        }
    }

    /// After a decline learned by lookup (the batch, the reconciliation)
    /// or an operator's resolve: releases the order's hold if a confirm had
    /// moved it to `during`. A decline is final for the payment, so any
    /// confirm of it in flight is declined too.
    pub async fn hold_on_aborted(&self, record: &PaymentRecord) {
        let Some(inventory) = self.inventory.as_ref() else {
            return;
        };
        let now = self.clock.now_ms();
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

/// What [`Saga::settle_stuck_holds`] did (or, in a dry run, would do).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StuckHolds {
    /// `during` holds whose payment is paid: sold.
    pub sold: u64,
    /// `during` holds whose payment ended unpaid: released.
    pub released: u64,
    /// `during` holds left as they are: their payment is still open (its
    /// settlement sells or releases them), has no record, or a confirm
    /// began on them since they were read.
    pub left: u64,
}

/// `during` holds read per page.
const STUCK_PAGE: u32 = 200;

impl Saga {
    /// The batch's pass over holds left `during` (see the module doc):
    /// every hold `during` since `updated_before_ms` (epoch ms; the sweep's
    /// start minus its grace) is sold if its payment is paid, released if
    /// its payment is `ABORTED` and unpaid (guarded: a confirm that began
    /// on it since it was read keeps it), and left alone otherwise.
    ///
    /// # Errors
    /// [`StoreError`] from the inventory or state store; what was done
    /// before stays done (every step is idempotent) and the next sweep
    /// goes on.
    pub async fn settle_stuck_holds(
        &self,
        updated_before_ms: i64,
        dry_run: bool,
    ) -> Result<StuckHolds, StoreError> {
        let mut tally = StuckHolds::default();
        let Some(inventory) = self.inventory.clone() else {
            return Ok(tally);
        };
        let mut after: Option<String> = None;
        loop {
            let page = inventory
                .stuck_during(updated_before_ms, after.as_deref(), STUCK_PAGE)
                .await?;
            let Some(last) = page.last() else {
                return Ok(tally);
            };
            after = Some(last.hold_id.clone());
            for hold in page {
                self.settle_stuck_hold(inventory.as_ref(), &hold, dry_run, &mut tally)
                    .await?;
            }
        }
    }

    /// Whether an `ABORTED` payment is known to have ended unpaid: it
    /// carries the card company's own decline code (from a confirm's answer
    /// or a lookup) or an operator's "not charged" (final, never reopened),
    /// no confirm was logged as sent, or its answers prove a decline (as the
    /// batch decides before filing it unpaid). Otherwise the batch settles
    /// it by lookup first, and that settlement sells or releases the hold.
    async fn ended_unpaid(&self, r: &PaymentRecord) -> Result<bool, StoreError> {
        let card_declined = r
            .failure_code
            .as_deref()
            .is_some_and(|c| !failure_codes::is_no_call(c));
        if card_declined {
            return Ok(true);
        }
        let e = self
            .log
            .confirm_evidence(r.payment_id.as_str(), paygate_card_api::CONFIRM_PATH)
            .await?;
        Ok(e.requests == 0 || crate::classify::declined(&e))
    }

    async fn settle_stuck_hold(
        &self,
        inventory: &dyn InventoryStore,
        hold: &Hold,
        dry_run: bool,
        tally: &mut StuckHolds,
    ) -> Result<(), StoreError> {
        // The hold was read first: whatever the payment did since, a confirm
        // that begins on this hold again moves its `updated_at`, and the
        // guarded release below then changes nothing.
        let record = self
            .store
            .get_by_order(&hold.merchant_id, &hold.order_id)
            .await?;
        match record {
            Some(r) if r.is_paid => {
                // Counted only when the sale was recorded: a failed sale
                // stays `during` and the next sweep tries again.
                if dry_run || self.hold_on_paid(&r).await {
                    tally.sold += 1;
                } else {
                    tally.left += 1;
                }
            }
            Some(r) if r.card_status == CardStatus::Aborted && self.ended_unpaid(&r).await? => {
                let now = self.clock.now_ms();
                if dry_run || inventory.release_stuck(hold, now).await? {
                    tracing::info!(payment_id = %r.payment_id, hold_id = %hold.hold_id,
                        "released a hold left `during` by a payment that ended unpaid");
                    tally.released += 1;
                } else {
                    tally.left += 1;
                }
            }
            _ => tally.left += 1,
        }
        Ok(())
    }
}
