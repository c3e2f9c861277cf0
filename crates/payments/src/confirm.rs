//! Guards I2 and I3: the confirm saga of DESIGN.md §4, steps 1-4.
//!
//! Order of work for one confirm, each step durable before the next:
//! 1. the state record (`PENDING`) and its order / idempotency-key claims
//!    (an existing claim goes to `replay`) and its card-account claims on
//!    the orderId and the paymentKey (one held by another payment is a 422
//!    `ORDER_ID_IN_USE` / `PAYMENT_KEY_REUSED`, no card call);
//! 2. the card `REQUEST` row in the SQL log (no row, no call: I3); unless
//!    it was committed with the record, the fence `MarkSending` after it
//!    (see [`Saga::open_for_sending`]: an actor that files the record as
//!    never sent cannot race a confirm on its way to the card);
//! 3. the card confirm with `Idempotency-Key: <payment_id>`, retried on 5xx;
//!    after a lost answer, lookups by orderId settle it (I1, see `lookup`);
//! 4. the `RESPONSE`/`ERROR` row and the record's new state, then the
//!    ledger (see [`crate::ledger`]).
//!
//! Each write after step 1 is a [`crate::steps::Step`] (a row and a guarded
//! transition): one commit with a journal (state and log in one SQL
//! database, [`paygate_api_log::journal`]), its parts in the same order
//! without one; the saga reads one answer either way. With a journal, step
//! 1 also commits the first card `REQUEST` row ([`RequestRow::Committed`]);
//! otherwise that row goes with the fence. A confirm that reopened a
//! payment filed as never sent promises nothing when it makes no call
//! ([`NoCallPromise::InDoubt`]).

use std::sync::{atomic::AtomicBool, Arc};

use paygate_alert::AlertReason;
use paygate_card_api::CardPayment;
use paygate_core::{payment::failure_codes, CardStatus, PaymentRecord};
use paygate_state_store::{CreateOutcome, Hold, Transition};

use crate::{
    at_card::card_site,
    logged_call::{Fusion, OwnedRow},
    outcome::{CardVerdict, ConfirmInput, ConfirmOutcome, ConfirmTicket, Refusal},
    steps::{Landed, RowNeed, Step},
    Saga,
};

/// Where a confirm's first card `REQUEST` row stands when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestRow {
    /// Committed with the record (a journal's commit (a)): withdrawn if the
    /// call is not made.
    Committed,
    /// Still to be written, with the fence, before the call
    /// ([`Saga::open_for_sending`]).
    ToWrite,
}

/// What a confirm that ends without a card call may tell the merchant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoCallPromise {
    /// Nothing was charged: no earlier confirm of the payment was sent.
    NothingCharged,
    /// An earlier confirm may have been sent (this retry reopened a
    /// payment filed as never sent while that confirm's `REQUEST` row was
    /// landing): a no-call end promises nothing.
    InDoubt,
}

impl Saga {
    /// Runs the confirm saga for one request, with nobody to answer early
    /// (see [`Saga::confirm_with_ticket`]).
    pub async fn confirm(self: &Arc<Self>, input: ConfirmInput) -> ConfirmOutcome {
        self.confirm_with_ticket(input, ConfirmTicket::new()).await
    }

    /// Runs the confirm saga for one request whose merchant may be answered
    /// before it ends. The saga marks `ticket` durable once the record it
    /// acts on is written and before the card `REQUEST` row; if the caller
    /// gave up first (and answered 503), the record is aborted with
    /// [`failure_codes::ANSWER_TIMED_OUT`] and no card call is made.
    pub async fn confirm_with_ticket(
        self: &Arc<Self>,
        input: ConfirmInput,
        ticket: ConfirmTicket,
    ) -> ConfirmOutcome {
        let fingerprint = paygate_core::crypto::fingerprint(&[
            &input.payment_key,
            input.order_id.as_str(),
            &input.amount.to_string(),
        ]);
        let record = PaymentRecord::new_pending(
            input.merchant_id.clone(),
            input.order_id.clone(),
            input.payment_key.clone(),
            input.amount,
            self.settings.currency.clone(),
            fingerprint.clone(),
            input.idempotency_key.clone(),
            self.clock.now_ms(),
        );
        let span = tracing::Span::current();
        // With a journal, commit (a): the record, its claims and the first
        // card REQUEST row together (I3: the row is durable before the call).
        let (created, row) = self.create_record(&record).await;
        match created {
            Ok(CreateOutcome::Created) => {
                span.record("payment_id", record.payment_id.as_str());
                // A fresh id: no one else can own it.
                let _live = self.live.claim(&record.payment_id);
                self.run_with(record, &ticket, row, NoCallPromise::NothingCharged)
                    .await
            }
            Ok(CreateOutcome::Exists(existing)) => {
                span.record("payment_id", existing.payment_id.as_str());
                self.replay(*existing, &input, &fingerprint, &ticket).await
            }
            // Claims are permanent: a refusal never turns into a card call.
            Ok(CreateOutcome::OrderIdInUse) => ConfirmOutcome::Refused(Refusal::OrderIdInUse),
            Ok(CreateOutcome::PaymentKeyReused) => {
                ConfirmOutcome::Refused(Refusal::PaymentKeyReused)
            }
            Err(e) => {
                // The write failed; a read may still work (a write-only
                // outage). An earlier request for this order may have a
                // payment in flight: answer from it rather than from nothing.
                if let Ok(Some(existing)) = self
                    .store
                    .get_by_order(&input.merchant_id, &input.order_id)
                    .await
                {
                    span.record("payment_id", existing.payment_id.as_str());
                    return self.replay(existing, &input, &fingerprint, &ticket).await;
                }
                tracing::error!(order_id = %input.order_id, error = %e, "state store unavailable; no card call made");
                // No paymentId: paygate cannot see the order, so this answer
                // promises only that this request charged nothing.
                ConfirmOutcome::Unavailable {
                    detail: "payment state store unavailable; this request was not processed and charged nothing; poll GET /v1/payments/orders/{orderId} for the order",
                    payment_id: None,
                    retry_after_s: None,
                }
            }
        }
    }

    /// Step 1. With a journal, commit (a): the record, its claims and the
    /// first card `REQUEST` row together (I3: the row is durable before the
    /// call). A failed commit wrote nothing; the record alone is then
    /// tried, as without a journal (its row then follows with the fence;
    /// a log that refuses writes ends there in DESIGN.md §4's step-2 abort:
    /// 503, no card call).
    async fn create_record(
        &self,
        record: &PaymentRecord,
    ) -> (
        Result<CreateOutcome, paygate_state_store::StoreError>,
        RequestRow,
    ) {
        if let Some(journal) = &self.journal {
            let request = card_site(record).1.first_request();
            match journal.create_with_request(record, request.entry()).await {
                Ok(CreateOutcome::Created) => {
                    return (Ok(CreateOutcome::Created), RequestRow::Committed)
                }
                Ok(exists) => return (Ok(exists), RequestRow::ToWrite),
                Err(e) => {
                    tracing::warn!(payment_id = %record.payment_id, error = %e,
                        "could not commit the record with its card REQUEST row; writing them apart");
                }
            }
        }
        (self.store.create(record).await, RequestRow::ToWrite)
    }

    /// Steps 2-6 for a `PENDING` record this confirm owns. The ticket is
    /// the gate before the card `REQUEST` row (see [`ConfirmTicket`]).
    pub(crate) async fn run(
        self: &Arc<Self>,
        record: PaymentRecord,
        ticket: &ConfirmTicket,
    ) -> ConfirmOutcome {
        self.run_with(
            record,
            ticket,
            RequestRow::ToWrite,
            NoCallPromise::NothingCharged,
        )
        .await
    }

    /// Withdraws the first card `REQUEST` row that a journal committed with
    /// the record, when the call will not be made after all (an `ERROR` row
    /// with [`paygate_api_log::NOT_SENT`]).
    pub(crate) async fn withdraw_prewritten(self: &Arc<Self>, record: &PaymentRecord) {
        let (_, site) = card_site(record);
        let fusion = Fusion {
            prewritten: Some(Arc::new(AtomicBool::new(true))),
            deferred: None,
        };
        self.withdraw_request(&fusion, site.first_request()).await;
    }

    /// [`Saga::run`] for a record that another actor filed as never sent
    /// (`PAYGATE_NOT_SENT`) and this retry reopened: an earlier confirm may
    /// be on its way to the card (its `REQUEST` row landed after the
    /// filing), so a no-call end of this retry cannot promise that nothing
    /// was charged (see [`Saga::not_attempted_in_doubt`]).
    pub(crate) async fn run_reopened_not_sent(
        self: &Arc<Self>,
        record: PaymentRecord,
        ticket: &ConfirmTicket,
    ) -> ConfirmOutcome {
        self.run_with(record, ticket, RequestRow::ToWrite, NoCallPromise::InDoubt)
            .await
    }

    /// [`Saga::run`] from where the first card `REQUEST` row stands, and
    /// with what a no-call end may promise.
    ///
    /// `record.version` is kept equal to the version this confirm last
    /// wrote: every guarded no-call abort compares it, so a confirm that
    /// stalled cannot abort (or un-hold) a payment another actor changed.
    async fn run_with(
        self: &Arc<Self>,
        mut record: PaymentRecord,
        ticket: &ConfirmTicket,
        row: RequestRow,
        promise: NoCallPromise,
    ) -> ConfirmOutcome {
        if !ticket.make_durable(&record) {
            self.abandon_request(&record, row).await;
            let detail =
                "the merchant was answered 503 before the card call; none was made".to_owned();
            return self
                .no_call(
                    record,
                    promise,
                    failure_codes::ANSWER_TIMED_OUT,
                    detail,
                    None,
                    None,
                )
                .await;
        }
        // The hold this confirm moved to `during` (at the version it left
        // it): the only hold a no-call end of this confirm may release.
        let moved = match self.hold_before_card(&record).await {
            Ok(moved) => moved,
            Err(refused) => {
                // The stock is gone: no card call, and the log says so.
                self.abandon_request(&record, row).await;
                return refused;
            }
        };
        if row == RequestRow::ToWrite {
            if let Some(outcome) = self
                .open_for_sending(&record, promise, moved.as_ref())
                .await
            {
                return outcome;
            }
            // The fence applied: one version on.
            record.version += 1;
        }
        // The first REQUEST row is committed now, one way or the other.
        let (verdict, answer) = self.settle_at_card(&record).await;
        match verdict {
            CardVerdict::Approved(p) => self.approved(record, &p, answer).await,
            CardVerdict::Declined { code, message } => {
                self.declined(record, code, message, moved.as_ref()).await
            }
            CardVerdict::NoCall {
                code,
                detail,
                retry_after_s,
            } => {
                self.no_call(record, promise, code, detail, retry_after_s, moved.as_ref())
                    .await
            }
            CardVerdict::Unsettled { detail } | CardVerdict::Absent { detail } => {
                self.unknown(record, AlertReason::OutcomeUnknown, detail)
                    .await
            }
            CardVerdict::Mismatch {
                detail,
                canceled: true,
            } => self.canceled_at_card(record, detail).await,
            CardVerdict::Mismatch { detail, .. } => {
                self.unknown(record, AlertReason::CardMismatch, detail)
                    .await
            }
        }
    }

    /// Ends a confirm that made no card call with what it may promise:
    /// "nothing was charged" ([`Saga::not_attempted`], releasing only the
    /// hold it `moved`), or, when an earlier confirm may have been sent,
    /// a not-sent filing that promises nothing ([`Saga::not_attempted_in_doubt`]).
    async fn no_call(
        &self,
        record: PaymentRecord,
        promise: NoCallPromise,
        code: &'static str,
        detail: String,
        retry_after_s: Option<u64>,
        moved: Option<&Hold>,
    ) -> ConfirmOutcome {
        match promise {
            NoCallPromise::NothingCharged => {
                self.not_attempted(record, code, detail, retry_after_s, moved)
                    .await
            }
            NoCallPromise::InDoubt => self.not_attempted_in_doubt(record, code, detail).await,
        }
    }

    /// A confirm that will not call after all withdraws the first card
    /// `REQUEST` row when it was committed with the record.
    async fn abandon_request(self: &Arc<Self>, record: &PaymentRecord, row: RequestRow) {
        if row == RequestRow::Committed {
            self.withdraw_prewritten(record).await;
        }
    }

    /// The card `REQUEST` row of a confirm whose record was written without
    /// it (no journal, a journal commit that failed, or a reopened record),
    /// then the fence [`Transition::MarkSending`]. An actor that files a
    /// `PENDING` record without a `REQUEST` row as never sent
    /// ([`Transition::FileNotSent`], guarded on the `updated_at` it read
    /// before the log) either reads this row, or sees `updated_at` moved
    /// and changes nothing, or filed first: then the fence fails and this
    /// confirm makes no call (DESIGN.md §1). With a journal, row and fence
    /// are one commit.
    ///
    /// `None`: the row is committed and the call may go (the caller's first
    /// attempt does not write the row again). `Some`: the outcome to answer,
    /// no card call made and the row, if written, withdrawn.
    async fn open_for_sending(
        self: &Arc<Self>,
        record: &PaymentRecord,
        promise: NoCallPromise,
        moved: Option<&Hold>,
    ) -> Option<ConfirmOutcome> {
        let pid = &record.payment_id;
        let fence = Transition::MarkSending {
            seen_version: record.version,
        };
        let step = Step {
            payment_id: pid,
            row: Some(card_site(record).1.first_request()),
            need: RowNeed::BeforeTransition,
            transition: &fence,
            next: None,
        };
        let row_twice = match self.commit_step(step).await {
            Landed::Applied { .. } => return None,
            Landed::RowFailed(detail) => {
                let code = failure_codes::LOG_UNAVAILABLE;
                return Some(
                    self.no_call(record.clone(), promise, code, detail, None, moved)
                        .await,
                );
            }
            Landed::Refused { row_twice } => {
                tracing::warn!(payment_id = %pid,
                    "the record changed before the card call (filed as not sent, or taken over); no card call made");
                row_twice
            }
            Landed::StoreFailed { error, row_twice } => {
                tracing::warn!(payment_id = %pid, error = %error,
                    "could not fence the record before the card call; no card call made");
                row_twice
            }
        };
        self.withdraw_prewritten(record).await;
        if row_twice {
            // The journal's row may have landed too (the withdrawals are
            // counted down to zero, never below).
            self.withdraw_prewritten(record).await;
        }
        // Another actor may own the payment now (a retry that reopened
        // it): this request made no call, but only the record can say what
        // the payment did. Poll.
        metrics::counter!("paygate_payments_total", "outcome" => "not_attempted").increment(1);
        Some(ConfirmOutcome::InFlight(record.clone()))
    }

    /// The card approved; `answer` is its deferred `RESPONSE` row (when the
    /// saga has a journal), committed here with `MarkPaid`.
    async fn approved(
        self: &Arc<Self>,
        mut record: PaymentRecord,
        p: &CardPayment,
        answer: Option<OwnedRow>,
    ) -> ConfirmOutcome {
        let pid = record.payment_id.clone();
        let approved_at = self.approved_at_of(p);
        let paid = Transition::MarkPaid {
            approved_at: approved_at.clone(),
        };
        let (marked, ledger_prewritten) = self.mark_paid(&record, &paid, answer).await;
        match marked {
            Ok(true) => paid.apply(&mut record, self.clock.now_ms()),
            // The guard failed: another actor (the batch, the
            // reconciliation, a merchant's retry) changed the record since
            // this confirm read it. Go on from what is stored, never from
            // this confirm's memory.
            Ok(false) => match self.store.get(&pid).await {
                Ok(Some((_, current))) if current.is_paid => {
                    if current.is_saved {
                        return ConfirmOutcome::Approved(current);
                    }
                    record = current;
                }
                // Filed as a no-call abort by another actor (the batch read
                // no REQUEST row yet) while this confirm was on its way to
                // the card: the approval proves it was sent. Put it back.
                Ok(Some((part, current)))
                    if current.card_status == CardStatus::Aborted
                        && current
                            .failure_code
                            .as_deref()
                            .is_some_and(failure_codes::is_no_call)
                        && self.repair_no_call(&current, part, &paid).await =>
                {
                    tracing::warn!(payment_id = %pid, "an approved payment had been filed as not sent; put back and marked paid");
                    record = current;
                    paid.apply(&mut record, self.clock.now_ms());
                }
                Ok(current) => {
                    let state = current.map_or("gone".to_owned(), |(part, r)| {
                        format!("{} in {}", r.card_status.as_str(), part.table())
                    });
                    let detail = format!(
                        "the card company approved, but the record could not be marked paid (it is {state})"
                    );
                    return self
                        .unknown(record, AlertReason::CardMismatch, detail)
                        .await;
                }
                Err(e) => return self.approval_not_recorded(record, approved_at, e).await,
            },
            Err(e) => return self.approval_not_recorded(record, approved_at, e).await,
        }
        self.hold_on_paid(&record).await;
        record.is_saved = self
            .save_with_retries_prewritten(&record, ledger_prewritten)
            .await;
        metrics::counter!("paygate_payments_total", "outcome" => "approved").increment(1);
        ConfirmOutcome::Approved(record)
    }

    /// `MarkPaid`, guarded, as one step (see [`crate::steps`]): the card's
    /// deferred answer row, `MarkPaid` and, committed with it by a journal,
    /// the ledger `REQUEST` row of the synchronous try; the `bool` says that
    /// row was written (the try must not write it again).
    async fn mark_paid(
        &self,
        record: &PaymentRecord,
        paid: &Transition,
        answer: Option<OwnedRow>,
    ) -> (Result<bool, paygate_state_store::StoreError>, bool) {
        let next = self.journal.as_ref().and_then(|_| {
            let mut paid_record = record.clone();
            paid.apply(&mut paid_record, self.clock.now_ms());
            self.ledger_site(&paid_record)
                .map(|(_, site)| site.first_request())
        });
        let step = Step {
            payment_id: &record.payment_id,
            row: answer,
            need: RowNeed::BestEffort,
            transition: paid,
            next,
        };
        match self.commit_step(step).await {
            Landed::Applied { next_written } => (Ok(true), next_written),
            Landed::Refused { .. } => (Ok(false), false),
            Landed::StoreFailed { error, .. } => (Err(error), false),
            // Only a `BeforeTransition` row stops a step.
            Landed::RowFailed(detail) => (
                Err(paygate_state_store::StoreError::Unavailable(detail)),
                false,
            ),
        }
    }

    /// Moves a no-call abort back to realtime, reopens it and marks it paid
    /// (each step guarded); `true` when it is paid now.
    async fn repair_no_call(
        &self,
        r: &PaymentRecord,
        part: paygate_core::Partition,
        paid: &Transition,
    ) -> bool {
        let pid = &r.payment_id;
        if part == paygate_core::Partition::Unpaid
            && self
                .store
                .move_record(pid, part, paygate_core::Partition::Realtime)
                .await
                .is_err()
        {
            return false;
        }
        // An approval proves the call was sent: state alone guards this
        // repair, whatever version a move back left.
        let reopen = Transition::Reopen {
            seen_version: None,
            failure_code: r.failure_code.clone().unwrap_or_default(),
        };
        matches!(self.store.transition(pid, &reopen).await, Ok(true))
            && matches!(self.store.transition(pid, paid).await, Ok(true))
    }
}
