//! Guards I2 (no double charge): a confirm for an order (or idempotency key)
//! that already has a payment. The same body replays the payment's outcome;
//! another body is refused (422); a payment that was never sent to the card
//! company (a no-call abort) is reopened so this retry may try the card.

use std::sync::Arc;

use paygate_core::{payment::failure_codes, CardStatus, Partition, PaymentRecord};
use paygate_state_store::Transition;

use crate::{
    outcome::{ConfirmInput, ConfirmOutcome, Reuse},
    Saga,
};

impl Saga {
    /// Answers a confirm whose order or key is already claimed by `existing`.
    pub(crate) async fn replay(
        self: &Arc<Self>,
        existing: PaymentRecord,
        input: &ConfirmInput,
        fingerprint: &str,
    ) -> ConfirmOutcome {
        if existing.request_fingerprint != fingerprint {
            let reuse = match (&input.idempotency_key, &existing.idempotency_key) {
                (Some(a), Some(b)) if a == b => Reuse::IdempotencyKey,
                _ => Reuse::OrderId,
            };
            return ConfirmOutcome::Reused {
                payment_id: existing.payment_id,
                reuse,
            };
        }
        match existing.card_status {
            CardStatus::Pending => ConfirmOutcome::InFlight(existing),
            CardStatus::Done | CardStatus::Canceled => ConfirmOutcome::Approved(existing),
            CardStatus::Unknown => ConfirmOutcome::Unknown(existing),
            CardStatus::Aborted => {
                let code = existing.failure_code.clone().unwrap_or_default();
                if failure_codes::is_no_call(&code) {
                    return self.reopen(existing, code).await;
                }
                let message = existing.last_error.clone().unwrap_or_default();
                ConfirmOutcome::Declined {
                    record: existing,
                    code,
                    message,
                }
            }
        }
    }

    /// A no-call abort: no card call was made for it, so this retry may try
    /// again. The batch may have moved it to `unpaid_payments` already.
    async fn reopen(self: &Arc<Self>, existing: PaymentRecord, code: String) -> ConfirmOutcome {
        if let Ok(Some((Partition::Unpaid, _))) = self.store.get(&existing.payment_id).await {
            let _ = self
                .store
                .move_record(&existing.payment_id, Partition::Unpaid, Partition::Realtime)
                .await;
        }
        let reopen = Transition::Reopen { failure_code: code };
        match self.store.transition(&existing.payment_id, &reopen).await {
            Ok(true) => {
                let mut reopened = existing;
                reopened.card_status = CardStatus::Pending;
                reopened.failure_code = None;
                self.run(reopened).await
            }
            Ok(false) => ConfirmOutcome::InFlight(existing),
            Err(_) => ConfirmOutcome::Unavailable {
                detail: "payment state store unavailable; nothing was charged",
                payment_id: Some(existing.payment_id),
                retry_after_s: None,
            },
        }
    }
}
