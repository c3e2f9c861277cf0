//! The cancels (refunds) of the in-memory store: the claim and every
//! [`CancelTransition`] under the store's one mutex, with the rules of
//! [`crate::cancels`] applied to the stored copy.

use futures_util::stream::BoxStream;
use paygate_core::PaymentId;

use super::{MemoryStateStore, State, WriteKind};
use crate::{
    cancels::{apply_cancel_transition, decide_claim, ClaimDecision},
    CancelClaim, CancelDraft, CancelRecord, CancelStore, CancelTransition, StoreError,
};

impl State {
    fn cancels_of(&self, payment_id: &PaymentId) -> Vec<CancelRecord> {
        self.cancels
            .range((payment_id.clone(), i64::MIN)..=(payment_id.clone(), i64::MAX))
            .map(|(_, c)| c.clone())
            .collect()
    }
}

/// As the SQL backend; the claim reads and inserts under the one mutex.
#[async_trait::async_trait]
impl CancelStore for MemoryStateStore {
    async fn claim_cancel(&self, draft: &CancelDraft) -> Result<CancelClaim, StoreError> {
        self.write(
            WriteKind::Cancel,
            &draft.payment_id,
            |state| match decide_claim(draft, &state.cancels_of(&draft.payment_id)) {
                ClaimDecision::Answer(a) => Ok(a),
                ClaimDecision::Insert(c) => {
                    state.cancels.insert((c.payment_id.clone(), c.n), c.clone());
                    Ok(CancelClaim::Claimed(c))
                }
            },
        )
    }

    async fn cancels_of(&self, payment_id: &PaymentId) -> Result<Vec<CancelRecord>, StoreError> {
        Ok(self.lock().cancels_of(payment_id))
    }

    async fn cancel_transition(
        &self,
        payment_id: &PaymentId,
        n: i64,
        t: &CancelTransition,
    ) -> Result<bool, StoreError> {
        let now = self.clock.now_ms();
        self.write(WriteKind::Cancel, payment_id, |state| {
            let Some(c) = state.cancels.get_mut(&(payment_id.clone(), n)) else {
                return Ok(false);
            };
            if !apply_cancel_transition(c, t, now) {
                return Ok(false);
            }
            if t.leaves_event() {
                let done = c.clone();
                let before: i64 = state
                    .cancels_of(payment_id)
                    .iter()
                    .filter(|o| o.n != n && o.status == crate::CancelStatus::Done)
                    .map(|o| o.amount)
                    .sum();
                let payment =
                    crate::newest_copy(paygate_core::Partition::ALL.iter().filter_map(|p| {
                        state
                            .table(*p)
                            .rows
                            .get(payment_id)
                            .map(|r| (*p, r.clone()))
                    }));
                let Some((_, payment)) = payment else {
                    return Err(StoreError::Corrupt(format!(
                        "cancel {n} of {payment_id} has no payment"
                    )));
                };
                if let Some(e) = crate::cancel_event(&payment, &done, before, now) {
                    state.events.push(e);
                }
            }
            Ok(true)
        })
    }

    fn scan_open_cancels(
        &self,
        _batch_size: u32,
    ) -> BoxStream<'_, Result<CancelRecord, StoreError>> {
        let open: Vec<CancelRecord> = self
            .lock()
            .cancels
            .values()
            .filter(|c| {
                c.status.in_flight() || (c.status == crate::CancelStatus::Done && !c.is_saved)
            })
            .cloned()
            .collect();
        Box::pin(futures_util::stream::iter(open.into_iter().map(Ok)))
    }
}
