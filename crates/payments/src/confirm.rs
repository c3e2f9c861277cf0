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
//! With a journal (state and log in one SQL database) steps 1-2 are one
//! commit, and an approval's answer row, `MarkPaid` and the ledger
//! `REQUEST` row another (see [`paygate_api_log::journal`]).

use std::sync::{
    atomic::{AtomicBool, AtomicU32, Ordering},
    Arc,
};

use paygate_alert::AlertReason;
use paygate_api_log::Target;
use paygate_card_api::{CardApiError, CardPayment, ConfirmRequest, CONFIRM_PATH};
use paygate_core::{payment::failure_codes, CardStatus, PaymentRecord};
use paygate_resilience::{CallError, RequestKind};
use paygate_state_store::{CreateOutcome, Hold, Transition};

use crate::{
    classify::{self, card_message, AttemptError},
    logged_call::{describe_card, CallSite, Fusion, OwnedRow, Policy},
    outcome::{CardVerdict, ConfirmInput, ConfirmOutcome, ConfirmTicket, Refusal},
    Saga,
};

/// The card company's `approvedAt`, or now when an approval carried none.
pub(crate) fn approved_at_of(p: &CardPayment) -> String {
    p.approved_at
        .clone()
        .unwrap_or_else(|| paygate_core::time::rfc3339_from_ms(paygate_core::time::now_ms()))
}

/// The card confirm of `record`: its request and its logged call site.
fn card_site(record: &PaymentRecord) -> (ConfirmRequest, CallSite) {
    let req = ConfirmRequest {
        payment_key: record.payment_key.clone(),
        order_id: record.order_id.to_string(),
        amount: record.amount,
    };
    let site = CallSite {
        payment_id: record.payment_id.clone(),
        target: Target::CardApi,
        method: "POST",
        path: CONFIRM_PATH.to_owned(),
        body: serde_json::to_value(&req).ok(),
        attempt_offset: 0,
        fusion: Fusion::default(),
    };
    (req, site)
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
            paygate_core::time::now_ms(),
        );
        let span = tracing::Span::current();
        // With a journal, commit (a): the record, its claims and the first
        // card REQUEST row together (I3: the row is durable before the call).
        let (created, prewritten) = self.create_record(&record).await;
        match created {
            Ok(CreateOutcome::Created) => {
                span.record("payment_id", record.payment_id.as_str());
                // A fresh id: no one else can own it.
                let _live = self.live.claim(&record.payment_id);
                self.run_with(record, &ticket, prewritten, false).await
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
    /// call); the `bool` says the row was written. A failed commit wrote
    /// nothing; the record alone is then tried, as without a journal (a log
    /// that refuses writes then ends in DESIGN.md §4's step-2 abort: 503,
    /// no card call).
    async fn create_record(
        &self,
        record: &PaymentRecord,
    ) -> (Result<CreateOutcome, paygate_state_store::StoreError>, bool) {
        if let Some(journal) = &self.journal {
            let request = card_site(record).1.first_request();
            match journal.create_with_request(record, request.entry()).await {
                Ok(CreateOutcome::Created) => return (Ok(CreateOutcome::Created), true),
                Ok(exists) => return (Ok(exists), false),
                Err(e) => {
                    tracing::warn!(payment_id = %record.payment_id, error = %e,
                        "could not commit the record with its card REQUEST row; writing them apart");
                }
            }
        }
        (self.store.create(record).await, false)
    }

    /// Steps 2-6 for a `PENDING` record this confirm owns. The ticket is
    /// the gate before the card `REQUEST` row (see [`ConfirmTicket`]).
    pub(crate) async fn run(
        self: &Arc<Self>,
        record: PaymentRecord,
        ticket: &ConfirmTicket,
    ) -> ConfirmOutcome {
        self.run_with(record, ticket, false, false).await
    }

    /// Withdraws the first card `REQUEST` row that a journal committed with
    /// the record, when the call will not be made after all (an `ERROR` row
    /// with [`paygate_api_log::NOT_SENT`]).
    async fn withdraw_prewritten(self: &Arc<Self>, record: &PaymentRecord) {
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
        self.run_with(record, ticket, false, true).await
    }

    /// [`Saga::run`]; `prewritten`: the first card `REQUEST` row was
    /// committed with the record (a journal's commit (a)); `in_doubt`: see
    /// [`Saga::run_reopened_not_sent`].
    ///
    /// `record.version` is kept equal to the version this confirm last
    /// wrote: every guarded no-call abort compares it, so a confirm that
    /// stalled cannot abort (or un-hold) a payment another actor changed.
    async fn run_with(
        self: &Arc<Self>,
        mut record: PaymentRecord,
        ticket: &ConfirmTicket,
        prewritten: bool,
        in_doubt: bool,
    ) -> ConfirmOutcome {
        if !ticket.make_durable(&record) {
            if prewritten {
                self.withdraw_prewritten(&record).await;
            }
            let detail =
                "the merchant was answered 503 before the card call; none was made".to_owned();
            if in_doubt {
                return self
                    .not_attempted_in_doubt(record, failure_codes::ANSWER_TIMED_OUT, detail)
                    .await;
            }
            return self
                .not_attempted(record, failure_codes::ANSWER_TIMED_OUT, detail, None, None)
                .await;
        }
        // The hold this confirm moved to `during` (at the version it left
        // it): the only hold a no-call end of this confirm may release.
        let moved = match self.hold_before_card(&record).await {
            Ok(moved) => moved,
            Err(refused) => {
                // The stock is gone: no card call. A REQUEST row committed
                // with the record is withdrawn, so the log still proves
                // none was made.
                if prewritten {
                    self.withdraw_prewritten(&record).await;
                }
                return refused;
            }
        };
        if !prewritten {
            if let Some(outcome) = self
                .open_for_sending(&record, in_doubt, moved.as_ref())
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
            CardVerdict::NoCall { code, detail, .. } if in_doubt => {
                self.not_attempted_in_doubt(record, code, detail).await
            }
            CardVerdict::NoCall {
                code,
                detail,
                retry_after_s,
            } => {
                self.not_attempted(record, code, detail, retry_after_s, moved.as_ref())
                    .await
            }
            CardVerdict::Unsettled { detail } => {
                self.unknown(record, AlertReason::OutcomeUnknown, detail)
                    .await
            }
            CardVerdict::Mismatch { detail, .. } => {
                self.unknown(record, AlertReason::CardMismatch, detail)
                    .await
            }
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
        in_doubt: bool,
        moved: Option<&Hold>,
    ) -> Option<ConfirmOutcome> {
        let pid = &record.payment_id;
        let request = card_site(record).1.first_request();
        let fence = Transition::MarkSending {
            seen_version: record.version,
        };
        let mut fenced = None;
        let mut journal_failed = false;
        if let Some(journal) = &self.journal {
            match journal
                .answer_and_transition(request.entry(), &fence, None)
                .await
            {
                Ok(applied) => fenced = Some(Ok(applied)),
                // One transaction: nothing was written, or (a lost commit
                // answer) both were. Writing them apart is safe either way:
                // if the commit did land, the second fence (on the same
                // version) fails and no call is made, and both REQUEST
                // rows are withdrawn below.
                Err(e) => {
                    journal_failed = true;
                    tracing::warn!(payment_id = %pid, error = %e,
                        "could not commit the card REQUEST row with its fence; writing them apart");
                }
            }
        }
        let fenced = match fenced {
            Some(fenced) => fenced,
            None => {
                if let Err(e) = self.log.append(request.entry()).await {
                    let code = failure_codes::LOG_UNAVAILABLE;
                    let detail = e.to_string();
                    return Some(if in_doubt {
                        self.not_attempted_in_doubt(record.clone(), code, detail)
                            .await
                    } else {
                        self.not_attempted(record.clone(), code, detail, None, moved)
                            .await
                    });
                }
                self.store.transition(pid, &fence).await
            }
        };
        match fenced {
            Ok(true) => return None,
            Ok(false) => tracing::warn!(payment_id = %pid,
                "the record changed before the card call (filed as not sent, or taken over); no card call made"),
            Err(e) => tracing::warn!(payment_id = %pid, error = %e,
                "could not fence the record before the card call; no card call made"),
        }
        self.withdraw_prewritten(record).await;
        if journal_failed {
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
        let approved_at = approved_at_of(p);
        let paid = Transition::MarkPaid {
            approved_at: approved_at.clone(),
        };
        let (marked, ledger_prewritten) = self.mark_paid(&record, &paid, answer).await;
        match marked {
            Ok(true) => {
                record.is_paid = true;
                record.card_status = CardStatus::Done;
                record.approved_at = Some(approved_at);
                record.failure_code = None;
            }
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
                    record.is_paid = true;
                    record.card_status = CardStatus::Done;
                    record.approved_at = Some(approved_at);
                    record.failure_code = None;
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

    /// `MarkPaid`, guarded. With a journal and the card's deferred answer
    /// row, commit (b): that row, `MarkPaid` and, when it applied, the
    /// ledger `REQUEST` row of the synchronous try, together; the `bool` is
    /// then `true` (the try must not write its row again). A failed commit
    /// wrote nothing: the separate writes of DESIGN.md §4 follow.
    async fn mark_paid(
        &self,
        record: &PaymentRecord,
        paid: &Transition,
        answer: Option<OwnedRow>,
    ) -> (Result<bool, paygate_state_store::StoreError>, bool) {
        let pid = &record.payment_id;
        if let (Some(journal), Some(row), Transition::MarkPaid { approved_at }) =
            (&self.journal, &answer, paid)
        {
            let mut paid_record = record.clone();
            paid_record.is_paid = true;
            paid_record.approved_at = Some(approved_at.clone());
            let next = self
                .ledger_site(&paid_record)
                .map(|(_, site)| site.first_request());
            match journal
                .answer_and_transition(row.entry(), paid, next.as_ref().map(OwnedRow::entry))
                .await
            {
                Ok(applied) => return (Ok(applied), applied && next.is_some()),
                Err(e) => {
                    tracing::warn!(payment_id = %pid, error = %e,
                        "could not commit the card answer with the paid mark; writing them apart");
                }
            }
        }
        self.write_row(answer).await;
        (self.store.transition(pid, paid).await, false)
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

    /// The approval is real but the store failed: the record stays PENDING,
    /// which the batch settles by lookup; the operator hears of it now. The
    /// merchant is told the truth: approved.
    async fn approval_not_recorded(
        &self,
        mut record: PaymentRecord,
        approved_at: String,
        e: paygate_state_store::StoreError,
    ) -> ConfirmOutcome {
        self.alert(
            &record,
            AlertReason::StoreFailedAfterApproval,
            format!("mark paid failed: {e}"),
        )
        .await;
        record.is_paid = true;
        record.card_status = CardStatus::Done;
        record.approved_at = Some(approved_at);
        ConfirmOutcome::Approved(record)
    }

    /// The card company declined. The decline is its answer for this
    /// payment whoever sent it, so the abort is guarded on state alone;
    /// the hold released is only the one this confirm moved (`moved`).
    async fn declined(
        &self,
        mut record: PaymentRecord,
        code: String,
        message: String,
        moved: Option<&Hold>,
    ) -> ConfirmOutcome {
        let pid = &record.payment_id;
        let t = Transition::MarkAborted {
            failure_code: code.clone(),
            last_error: message.clone(),
            seen_version: None,
        };
        if let Err(e) = self.store.transition(pid, &t).await {
            tracing::warn!(payment_id = %pid, error = %e, "could not record the decline; the batch will settle it");
        }
        record.card_status = CardStatus::Aborted;
        record.failure_code = Some(code.clone());
        self.release_moved_hold(&record, moved).await;
        metrics::counter!("paygate_payments_total", "outcome" => "declined").increment(1);
        ConfirmOutcome::Declined {
            record,
            code,
            message,
        }
    }

    /// No card call was made by this confirm: the record is aborted with
    /// `code`, guarded on the version this confirm last wrote, and only
    /// when that applied is the hold it moved (`moved`) released and the
    /// merchant told that nothing was charged. A guard that fails means
    /// another actor changed the payment since (a retry at another
    /// replica may be sending it): this request answers 409, poll.
    async fn not_attempted(
        &self,
        record: PaymentRecord,
        code: &'static str,
        detail: String,
        retry_after_s: Option<u64>,
        moved: Option<&Hold>,
    ) -> ConfirmOutcome {
        let pid = record.payment_id.clone();
        tracing::error!(payment_id = %pid, reason = code, detail = %detail, "no card call made");
        let t = Transition::MarkAborted {
            failure_code: code.to_owned(),
            last_error: detail,
            seen_version: Some(record.version),
        };
        match self.store.transition(&pid, &t).await {
            Ok(true) => self.release_moved_hold(&record, moved).await,
            Ok(false) => {
                tracing::warn!(payment_id = %pid,
                    "the record changed since this confirm wrote it; left to the actor that changed it");
                metrics::counter!("paygate_payments_total", "outcome" => "not_attempted")
                    .increment(1);
                return ConfirmOutcome::InFlight(record);
            }
            // The record stays PENDING with its hold `during`: the batch
            // files it as never sent, and its stuck-hold pass releases the
            // hold from that state.
            Err(e) => {
                tracing::warn!(payment_id = %pid, error = %e, "could not mark the record aborted")
            }
        }
        let detail = match code {
            failure_codes::LOG_UNAVAILABLE => {
                "request log unavailable; nothing was charged, retry later"
            }
            failure_codes::CIRCUIT_OPEN => {
                "card company unavailable (circuit open); nothing was charged, retry later"
            }
            failure_codes::OVERLOADED => {
                "too many payments in flight; nothing was charged, retry later"
            }
            failure_codes::ANSWER_TIMED_OUT => {
                "no answer in time; this request made no card call and will make none, retry with the same body"
            }
            _ => "card company unavailable; nothing was charged, retry later",
        };
        metrics::counter!("paygate_payments_total", "outcome" => "not_attempted").increment(1);
        ConfirmOutcome::Unavailable {
            detail,
            payment_id: Some(pid),
            retry_after_s,
        }
    }

    /// This retry made no card call, but an earlier confirm of the same
    /// payment may have (the record had been filed `PAYGATE_NOT_SENT` by an
    /// actor that read no `REQUEST` row, which a stalled log write can
    /// still land after): the record goes back to `PAYGATE_NOT_SENT`, so the
    /// doubt outlives this retry (a next retry reopens it the same way, a
    /// late approval repairs it, the reconciliation finds it), and the
    /// merchant is answered 409 with the paymentId (poll), never a 503
    /// that would promise nothing was charged.
    async fn not_attempted_in_doubt(
        &self,
        record: PaymentRecord,
        code: &'static str,
        detail: String,
    ) -> ConfirmOutcome {
        let pid = &record.payment_id;
        tracing::warn!(payment_id = %pid, reason = code, detail = %detail,
            "no card call made by this retry of a payment filed as not sent; an earlier confirm may have been sent");
        let t = Transition::MarkAborted {
            failure_code: failure_codes::NOT_SENT.to_owned(),
            last_error: format!(
                "{code}: {detail}; an earlier confirm of this payment may have been sent"
            ),
            seen_version: Some(record.version),
        };
        if let Err(e) = self.store.transition(pid, &t).await {
            tracing::warn!(payment_id = %pid, error = %e, "could not mark the record aborted");
        }
        metrics::counter!("paygate_payments_total", "outcome" => "not_attempted").increment(1);
        ConfirmOutcome::InFlight(record)
    }

    pub(crate) async fn unknown(
        &self,
        mut record: PaymentRecord,
        reason: AlertReason,
        detail: String,
    ) -> ConfirmOutcome {
        let t = Transition::MarkUnknown {
            last_error: detail.clone(),
        };
        if let Err(e) = self.store.transition(&record.payment_id, &t).await {
            tracing::warn!(payment_id = %record.payment_id, error = %e, "could not mark the record unknown");
        }
        self.alert(&record, reason, detail).await;
        record.card_status = CardStatus::Unknown;
        metrics::counter!("paygate_payments_total", "outcome" => "unknown").increment(1);
        ConfirmOutcome::Unknown(record)
    }

    /// Confirms at the card company through its stack (5xx retried with the
    /// same idempotency key), then settles a lost answer by lookups.
    /// The first attempt's `REQUEST` row is already committed (with the
    /// record, or by [`Saga::open_for_sending`]); with a journal, an approval's `RESPONSE` row comes back
    /// with the verdict, unwritten, for [`Saga::approved`] to commit with
    /// `MarkPaid` (every other answer's row is written here).
    async fn settle_at_card(
        self: &Arc<Self>,
        record: &PaymentRecord,
    ) -> (CardVerdict, Option<OwnedRow>) {
        let (req, mut site) = card_site(record);
        site.fusion = Fusion {
            prewritten: Some(Arc::new(AtomicBool::new(true))),
            deferred: self.journal.as_ref().map(|_| Arc::default()),
        };
        let fusion = site.fusion.clone();
        let first_request = site.first_request();
        let card = self.card.clone();
        let key = record.payment_id.to_string();
        let sent = Arc::new(AtomicU32::new(0));
        let call = move || {
            let (card, req, key) = (card.clone(), req.clone(), key.clone());
            async move { card.confirm(&req, &key).await }
        };
        let policy = Policy {
            stack: self.card_stack.clone(),
            kind: RequestKind::Idempotent,
            max_attempts: None,
            classify: classify::confirm,
            attempt_timeout: paygate_resilience::ATTEMPT_TIMEOUT_NOT_RETRIED,
        };
        let res = self
            .through(policy, site, call, describe_card, sent.clone())
            .await;
        let sent = sent.load(Ordering::SeqCst);
        self.withdraw_request(&fusion, first_request).await;
        let answer = fusion.take_deferred();
        match res {
            // A 200 settles the payment only when its status is final
            // (approved, or aborted/expired); IN_PROGRESS or
            // WAITING_FOR_DEPOSIT may still turn DONE: look it up, never
            // call it a decline.
            Ok(p) => match self.verdict_of_lookup(record, p) {
                Ok(verdict @ CardVerdict::Approved(_)) => (verdict, answer),
                Ok(verdict) => {
                    self.write_row(answer).await;
                    (verdict, None)
                }
                Err(status) => {
                    self.write_row(answer).await;
                    tracing::warn!(payment_id = %record.payment_id, status = %status,
                        "card confirm answered a status that is not final; looking the payment up");
                    (self.settle_by_lookup(record).await, None)
                }
            },
            Err(e) => {
                self.write_row(answer).await;
                (self.verdict_of_error(record, e, sent).await, None)
            }
        }
    }

    /// What a confirm that ended in an error settled; `sent` is the number
    /// of attempts that actually left (0: no card call was made).
    async fn verdict_of_error(
        self: &Arc<Self>,
        record: &PaymentRecord,
        e: CallError<AttemptError<CardApiError>>,
        sent: u32,
    ) -> CardVerdict {
        match e {
            CallError::Downstream(AttemptError::Downstream(e)) if e.is_decline() => {
                CardVerdict::Declined {
                    code: e.code().to_owned(),
                    message: card_message(&e),
                }
            }
            // Refused before anything happened (an expired checkout
            // session, an invalid request): final when it answered the only
            // attempt; after an earlier attempt that may have gone through,
            // only a lookup can tell.
            CallError::Downstream(AttemptError::Downstream(e))
                if sent == 1 && e.definitely_not_approved() && !e.is_auth_failure() =>
            {
                tracing::warn!(payment_id = %record.payment_id, code = e.code(), class = ?e.class(),
                    "card company refused the confirm; nothing was approved");
                CardVerdict::Declined {
                    code: e.code().to_owned(),
                    message: card_message(&e),
                }
            }
            CallError::Downstream(AttemptError::Downstream(e))
                if e.is_auth_failure() && sent == 1 =>
            {
                CardVerdict::NoCall {
                    code: failure_codes::CARD_AUTH_FAILED,
                    detail: e.to_string(),
                    retry_after_s: None,
                }
            }
            CallError::Downstream(AttemptError::LogUnavailable(detail)) if sent == 0 => {
                CardVerdict::NoCall {
                    code: failure_codes::LOG_UNAVAILABLE,
                    detail,
                    retry_after_s: None,
                }
            }
            CallError::Downstream(AttemptError::LogUnavailable(detail)) => CardVerdict::Unsettled {
                detail: format!("request log unavailable after {sent} attempts: {detail}"),
            },
            e if e.no_call_made() && sent == 0 => {
                let (code, retry_after_s) = match &e {
                    CallError::BreakerOpen { retry_after } => (
                        failure_codes::CIRCUIT_OPEN,
                        Some(retry_after.as_secs_f64().ceil().max(1.0) as u64),
                    ),
                    _ => (failure_codes::OVERLOADED, Some(1)),
                };
                CardVerdict::NoCall {
                    code,
                    detail: e.to_string(),
                    retry_after_s,
                }
            }
            e => {
                tracing::warn!(payment_id = %record.payment_id, attempts = sent, error = %e,
                    "card confirm got no usable answer; looking the payment up");
                self.settle_by_lookup(record).await
            }
        }
    }

    /// An approval counts only when it is for this order, key and amount.
    pub(crate) fn check_match(&self, record: &PaymentRecord, p: CardPayment) -> CardVerdict {
        if p.order_id == record.order_id.as_str()
            && p.total_amount == record.amount
            && p.payment_key == record.payment_key
        {
            CardVerdict::Approved(Box::new(p))
        } else {
            CardVerdict::Mismatch {
                detail: format!(
                    "card company approved orderId={} amount={} for a payment of amount={}",
                    p.order_id, p.total_amount, record.amount
                ),
                canceled: false,
            }
        }
    }
}
