//! Guards I1, I2 and I3 for refunds: a merchant's cancel of an approved
//! payment (DESIGN.md §5 `POST /v1/payments/{paymentId}/cancel`, §6 Toss
//! `POST /v1/payments/{paymentKey}/cancel`).
//!
//! 1. The payment must be paid (approval never goes back, so the read is
//!    safe to act on); the cancel is claimed in the store atomically with
//!    the balance check, at most one in flight per payment
//!    ([`paygate_state_store::cancels`]).
//! 2. The card call carries `Idempotency-Key: <payment_id>:cancel:<n>`, so
//!    a retry after a lost answer (by the stack, or the batch) is the same
//!    cancel; it is a logged call (I3: no `REQUEST` row, no call, 503 and
//!    the claim is given back) through the card stack.
//! 3. The answer settles it: the card company's `cancels[]` holds it
//!    (`DONE`), a refusal (`FAILED`, 422 with the card's code), no call
//!    (`FAILED`, 503), or a lost answer: one lookup by orderId, else
//!    `UNKNOWN` and 202 (the batch looks it up). "No call" is claimed only
//!    when no attempt of this request left and the cancel is still at the
//!    version this request claimed: the batch fences a cancel before it
//!    sends it again ([`CancelTransition::MarkSending`]), so a request that
//!    stalled past the batch's grace cannot answer "nothing was canceled"
//!    for a cancel the card company applied.
//! 4. A done cancel's reversal goes to the ledger with one synchronous try
//!    and async retries ([`crate::reversal`]), after the approval's entry.

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use paygate_api_log::Target;
use paygate_card_api::{CancelRequest, CardApiError, CardPayment, CodeClass};
use paygate_core::{payment::failure_codes, MerchantId, PaymentId, PaymentRecord};
use paygate_resilience::{CallError, RequestKind};
use paygate_state_store::{CancelClaim, CancelDraft, CancelRecord, CancelStatus, CancelTransition};

use crate::{
    classify::{self, AttemptError},
    logged_call::{describe_card, CallSite, Policy},
    Saga,
};

/// A merchant's cancel request, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelInput {
    /// The authenticated merchant.
    pub merchant_id: MerchantId,
    /// The payment to cancel.
    pub payment_id: PaymentId,
    /// `cancelReason` (1-200 characters).
    pub reason: String,
    /// `cancelAmount` in minor units; `None` cancels what is left.
    pub amount: Option<i64>,
    /// The merchant's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
}

/// A payment with its cancels, as the answer shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanceledPayment {
    /// The payment record.
    pub record: PaymentRecord,
    /// Its cancels, in `n` order.
    pub cancels: Vec<CancelRecord>,
}

/// What a cancel came to (the gateway maps each to its HTTP answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// 200: the card company canceled it (now, or on an earlier request
    /// with this `Idempotency-Key`).
    Canceled(CanceledPayment),
    /// 202: the card company's answer was lost; the batch settles it.
    Unknown(CanceledPayment),
    /// 404: no such payment for this merchant.
    NotFound,
    /// 409 `NOT_APPROVED`: the payment is not approved (pending, unknown or
    /// declined).
    NotApproved,
    /// 409 `CANCEL_IN_PROGRESS`: another cancel of this payment is in flight.
    InProgress,
    /// 422 `CANCEL_AMOUNT_EXCEEDS_BALANCE`.
    ExceedsBalance {
        /// What is left to cancel, minor units.
        balance: i64,
    },
    /// 422 `IDEMPOTENCY_KEY_REUSED`: the key was used with another body.
    KeyReused,
    /// 422 with the card company's code: it refused the cancel.
    Refused {
        /// The card company's code.
        code: String,
    },
    /// 503: nothing was canceled (no log row, breaker open, store down).
    Unavailable {
        /// Safe to show the merchant.
        detail: String,
        /// `Retry-After`, seconds.
        retry_after_s: u64,
    },
}

/// The entries of the card's `cancels[]` (indices) that paygate's done
/// cancels of `done_amounts` (in number order) do not account for: each
/// done cancel takes the first entry of its amount not taken yet. The rest
/// are cancels paygate does not hold (in flight, or made in the card
/// company's console), in the card's order.
pub fn unmatched_card_cancels(p: &CardPayment, done_amounts: &[i64]) -> Vec<usize> {
    let entries = p.cancels.as_deref().unwrap_or(&[]);
    let mut taken = vec![false; entries.len()];
    for amount in done_amounts {
        if let Some(i) =
            (0..entries.len()).find(|&i| !taken[i] && entries[i].cancel_amount == *amount)
        {
            taken[i] = true;
        }
    }
    (0..entries.len()).filter(|&i| !taken[i]).collect()
}

/// The card company's `canceledAt` of cancel `c`, when `p` shows it: the
/// first entry of `c`'s amount that paygate's done cancels numbered below
/// it do not account for ([`unmatched_card_cancels`]). Matched by amount,
/// not by position: a console cancel paygate has not recorded yet may sit
/// before `c` in the card's list.
pub fn card_shows_cancel(
    p: &CardPayment,
    cancels: &[CancelRecord],
    c: &CancelRecord,
) -> Option<String> {
    let before: Vec<i64> = cancels
        .iter()
        .filter(|x| x.n < c.n && x.status == CancelStatus::Done)
        .map(|x| x.amount)
        .collect();
    let entries = p.cancels.as_deref().unwrap_or(&[]);
    unmatched_card_cancels(p, &before)
        .into_iter()
        .map(|i| &entries[i])
        .find(|e| e.cancel_amount == c.amount)
        .map(|e| e.canceled_at.clone())
}

fn unavailable(detail: &str) -> CancelOutcome {
    CancelOutcome::Unavailable {
        detail: detail.to_owned(),
        retry_after_s: 1,
    }
}

impl Saga {
    /// Cancels (refunds) a payment for a merchant; see the module doc.
    pub async fn cancel(self: &Arc<Self>, input: CancelInput) -> CancelOutcome {
        let record = match self.store.get(&input.payment_id).await {
            Ok(Some((_, r))) if r.merchant_id == input.merchant_id => r,
            Ok(_) => return CancelOutcome::NotFound,
            Err(e) => {
                tracing::error!(error = %e, "state store unavailable before a cancel");
                return unavailable("payment state store unavailable; nothing was canceled");
            }
        };
        if !record.is_paid {
            return CancelOutcome::NotApproved;
        }
        let amount = input.amount.map(|a| a.to_string()).unwrap_or_default();
        let draft = CancelDraft {
            payment_id: record.payment_id.clone(),
            merchant_id: record.merchant_id.clone(),
            total_amount: record.amount,
            amount: input.amount,
            reason: input.reason.clone(),
            idempotency_key: input.idempotency_key.clone(),
            request_fingerprint: paygate_core::crypto::fingerprint(&[
                "cancel",
                &input.reason,
                &amount,
            ]),
            now: self.clock.now_ms(),
        };
        match self.store.claim_cancel(&draft).await {
            Err(e) => {
                tracing::error!(payment_id = %record.payment_id, error = %e, "could not claim a cancel");
                self.claim_failed(record, &draft).await
            }
            Ok(CancelClaim::ExceedsBalance { balance }) => {
                CancelOutcome::ExceedsBalance { balance }
            }
            Ok(CancelClaim::InProgress(_)) => CancelOutcome::InProgress,
            Ok(CancelClaim::Existing(c)) if c.request_fingerprint != draft.request_fingerprint => {
                CancelOutcome::KeyReused
            }
            Ok(CancelClaim::Existing(c)) => self.replay_cancel(record, &c).await,
            Ok(CancelClaim::Claimed(c)) => self.run_cancel(record, c).await,
        }
    }

    /// The claim's write failed, or its acknowledgement was lost: a
    /// `PENDING` cancel may exist that the batch will send. Read again and
    /// promise that nothing was canceled only when no cancel of this
    /// payment is in flight (with a key: when none carries it).
    async fn claim_failed(
        self: &Arc<Self>,
        record: PaymentRecord,
        draft: &CancelDraft,
    ) -> CancelOutcome {
        let cancels = match self.store.cancels_of(&record.payment_id).await {
            Ok(cancels) => cancels,
            Err(e) => {
                tracing::warn!(payment_id = %record.payment_id, error = %e, "could not read the cancels after a failed claim");
                return unavailable(
                    "payment state store unavailable; the cancel may have been taken: \
                     retry with the same Idempotency-Key or GET the payment",
                );
            }
        };
        let ours = cancels.iter().find(|c| match &draft.idempotency_key {
            Some(key) => c.idempotency_key.as_deref() == Some(key.as_str()),
            None => c.status.in_flight() && c.request_fingerprint == draft.request_fingerprint,
        });
        match ours {
            Some(c) if c.request_fingerprint != draft.request_fingerprint => {
                CancelOutcome::KeyReused
            }
            Some(c) if c.status.in_flight() => {
                CancelOutcome::Unknown(CanceledPayment { record, cancels })
            }
            Some(c) => {
                let c = c.clone();
                self.replay_cancel(record, &c).await
            }
            None if cancels.iter().any(|c| c.status.in_flight()) => CancelOutcome::InProgress,
            None => unavailable("payment state store unavailable; nothing was canceled"),
        }
    }

    /// The answer to a repeated request with the same key and body.
    async fn replay_cancel(
        self: &Arc<Self>,
        record: PaymentRecord,
        c: &CancelRecord,
    ) -> CancelOutcome {
        match c.status {
            CancelStatus::Pending => CancelOutcome::InProgress,
            CancelStatus::Failed => CancelOutcome::Refused {
                code: c.failure_code.clone().unwrap_or_default(),
            },
            CancelStatus::Done => self.answer(record, CancelOutcome::Canceled).await,
            CancelStatus::Unknown => self.answer(record, CancelOutcome::Unknown).await,
        }
    }

    /// The payment and its cancels as they are now, wrapped by `wrap`.
    async fn answer(
        &self,
        record: PaymentRecord,
        wrap: fn(CanceledPayment) -> CancelOutcome,
    ) -> CancelOutcome {
        match self.store.cancels_of(&record.payment_id).await {
            Ok(cancels) => wrap(CanceledPayment { record, cancels }),
            Err(e) => {
                tracing::error!(payment_id = %record.payment_id, error = %e, "could not read the cancels back");
                CancelOutcome::Unavailable {
                    detail: "the cancel was processed but its state could not be read; \
                             retry with the same Idempotency-Key or GET the payment"
                        .to_owned(),
                    retry_after_s: 1,
                }
            }
        }
    }

    async fn run_cancel(self: &Arc<Self>, record: PaymentRecord, c: CancelRecord) -> CancelOutcome {
        let pid = record.payment_id.clone();
        let sent = Arc::new(AtomicU32::new(0));
        let res = self
            .cancel_call(&record, &c, RequestKind::Idempotent, sent.clone())
            .await;
        let sent = sent.load(Ordering::SeqCst);
        let verdict = match res {
            Ok(p) => match self.done_by(&p, &c).await {
                Some(at) => Ok(at),
                None => Err("the card company's answer does not list this cancel".to_owned()),
            },
            Err(e) => match self.classify_failure(&pid, &c, e, sent).await {
                Some(outcome) => return outcome,
                None => Err("no answer from the card company".to_owned()),
            },
        };
        let verdict = match verdict {
            Ok(at) => Ok(at),
            // A lost or unclear answer: one lookup by orderId.
            Err(why) => match self.lookup_once(&pid, record.order_id.as_str(), 100).await {
                Ok(Some(p)) => self.done_by(&p, &c).await.ok_or(why),
                _ => Err(why),
            },
        };
        match verdict {
            Ok(canceled_at) => self.finish_done(record, &c, canceled_at).await,
            Err(why) => {
                let t = CancelTransition::MarkUnknown { last_error: why };
                if let Err(e) = self.store.cancel_transition(&pid, c.n, &t).await {
                    tracing::warn!(payment_id = %pid, n = c.n, error = %e, "could not mark a cancel UNKNOWN; the batch settles it from PENDING");
                }
                metrics::counter!("paygate_cancels_total", "outcome" => "unknown").increment(1);
                self.answer(record, CancelOutcome::Unknown).await
            }
        }
    }

    /// `Some(canceledAt)` when `p` lists cancel `c` (read against the
    /// payment's other cancels in the store).
    pub(crate) async fn done_by(&self, p: &CardPayment, c: &CancelRecord) -> Option<String> {
        let cancels = self.store.cancels_of(&c.payment_id).await.ok()?;
        card_shows_cancel(p, &cancels, c)
    }

    /// A failed card call: `Some(answer)` when it settles the cancel as not
    /// done (refused, or no call), `None` when the outcome is unknown.
    /// `sent` counts the attempts of this request that left: a final
    /// "no call" error (breaker, bulkhead, rate limit, log) after one that
    /// left is no proof that nothing was canceled.
    async fn classify_failure(
        self: &Arc<Self>,
        pid: &PaymentId,
        c: &CancelRecord,
        e: CallError<AttemptError<CardApiError>>,
        sent: u32,
    ) -> Option<CancelOutcome> {
        let no_call = |code: &str, detail: &str, retry_after_s: u64| {
            (
                CancelTransition::MarkFailed {
                    failure_code: code.to_owned(),
                    last_error: detail.to_owned(),
                    release_key: true,
                    // The batch may have sent it since this request
                    // claimed it (see the module doc).
                    seen_version: Some(c.version),
                },
                CancelOutcome::Unavailable {
                    detail: format!("{detail}; nothing was canceled, retry"),
                    retry_after_s,
                },
            )
        };
        let (t, outcome) = match &e {
            _ if sent > 0 && !matches!(&e, CallError::Downstream(AttemptError::Downstream(_))) => {
                return None
            }
            CallError::BreakerOpen { retry_after } => no_call(
                failure_codes::CIRCUIT_OPEN,
                "the card API is unavailable",
                retry_after.as_secs().max(1),
            ),
            CallError::BulkheadFull | CallError::RateLimited => {
                no_call(failure_codes::OVERLOADED, "the card API is overloaded", 1)
            }
            CallError::Downstream(AttemptError::LogUnavailable(_)) => no_call(
                failure_codes::LOG_UNAVAILABLE,
                "the request log is unavailable",
                1,
            ),
            CallError::Downstream(AttemptError::Downstream(ce)) => match ce.class() {
                CodeClass::OwnCredentials if sent <= 1 => no_call(
                    failure_codes::CARD_AUTH_FAILED,
                    "the card API refused paygate's credentials",
                    30,
                ),
                // A refusal of the only attempt; after an earlier attempt
                // that may have gone through, only a lookup can tell.
                CodeClass::Decline | CodeClass::InvalidRequest | CodeClass::NotFound
                    if sent <= 1 =>
                {
                    (
                        CancelTransition::MarkFailed {
                            failure_code: ce.code().to_owned(),
                            last_error: classify::card_message(ce),
                            release_key: false,
                            seen_version: None,
                        },
                        CancelOutcome::Refused {
                            code: ce.code().to_owned(),
                        },
                    )
                }
                _ => return None,
            },
            _ => return None,
        };
        match self.store.cancel_transition(pid, c.n, &t).await {
            Ok(true) => {
                metrics::counter!("paygate_cancels_total", "outcome" => "failed").increment(1);
                Some(outcome)
            }
            // Settled by another actor meanwhile, or the store failed: the
            // answer must not claim "nothing was canceled"; the state decides.
            Ok(false) => None,
            Err(se) => {
                tracing::warn!(payment_id = %pid, n = c.n, error = %se, "could not mark a cancel FAILED");
                None
            }
        }
    }

    /// Marks cancel `c` done, tries the reversal once, answers 200.
    async fn finish_done(
        self: &Arc<Self>,
        record: PaymentRecord,
        c: &CancelRecord,
        canceled_at: String,
    ) -> CancelOutcome {
        let pid = &record.payment_id;
        let t = CancelTransition::MarkDone { canceled_at };
        match self.store.cancel_transition(pid, c.n, &t).await {
            Ok(_) => {}
            Err(e) => {
                // The card canceled it; the batch finds it by lookup.
                tracing::warn!(payment_id = %pid, n = c.n, error = %e, "card canceled but the store failed; the batch settles it");
                return self.answer(record, CancelOutcome::Unknown).await;
            }
        }
        metrics::counter!("paygate_cancels_total", "outcome" => "done").increment(1);
        self.reverse_with_retries(pid, c.n).await;
        self.answer(record, CancelOutcome::Canceled).await
    }

    /// The card cancel of `c` (Toss `POST /v1/payments/{paymentKey}/cancel`
    /// with `cancelAmount` and `Idempotency-Key: <payment_id>:cancel:<n>`),
    /// a logged call through the card stack.
    /// `sent` counts the attempts that left (see [`Saga::through`]).
    pub(crate) async fn cancel_call(
        self: &Arc<Self>,
        record: &PaymentRecord,
        c: &CancelRecord,
        kind: RequestKind,
        sent: Arc<AtomicU32>,
    ) -> Result<CardPayment, CallError<AttemptError<CardApiError>>> {
        let req = CancelRequest {
            cancel_reason: c.reason.clone(),
            cancel_amount: Some(c.amount),
        };
        let site = CallSite {
            payment_id: record.payment_id.clone(),
            target: Target::CardApi,
            method: "POST",
            path: format!("/v1/payments/{}/cancel", record.payment_key),
            body: serde_json::to_value(&req).ok(),
            attempt_offset: 0,
            fusion: crate::logged_call::Fusion::default(),
        };
        let (card, key, pk) = (
            self.card.clone(),
            c.idempotency_key_downstream(),
            record.payment_key.clone(),
        );
        let call = move || {
            let (card, req, key, pk) = (card.clone(), req.clone(), key.clone(), pk.clone());
            async move { card.cancel(&pk, &req, &key).await }
        };
        let policy = Policy {
            stack: self.card_stack.clone(),
            kind,
            max_attempts: None,
            classify: classify::repeatable,
            attempt_timeout: paygate_resilience::ATTEMPT_TIMEOUT_RETRYABLE,
        };
        self.through(policy, site, call, describe_card, sent).await
    }
}
