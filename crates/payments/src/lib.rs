//! paygate-payments: what happens to a payment, with no HTTP in it.
//!
//! The confirm saga of DESIGN.md §4 ([`Saga::confirm`]), the settle path
//! shared by the batch sweep and the reconciliation ([`Settler`],
//! [`Saga::settle_unknown`]), the ledger's synchronous try and async retries,
//! and the classification of card and ledger answers. The merchant API
//! (`paygate-gateway`), the batch (`paygate-batch`) and the reconciliation
//! (`paygate-reconcile`) are adapters around it; [`Components`] wires it from
//! a [`paygate_core::Config`] for any of them.
//!
//! One file per concept, each naming the invariant it guards:
//!
//! | module | holds | guards |
//! |---|---|---|
//! | [`saga`] | the [`Saga`] and its settings | — |
//! | [`outcome`] | [`ConfirmInput`], [`ConfirmOutcome`], [`ConfirmTicket`], [`Settlement`] | I4 |
//! | `confirm` | saga steps 1-4: record, card call, verdict | I1, I2, I3 |
//! | `holds` | the order's stock hold: during, sold, released | I7 |
//! | `replay` | a confirm for an order that already has a payment | I2 |
//! | `logged_call` | every downstream call, `REQUEST` row first | I3 |
//! | [`classify`] | an answer's retry and breaker class | I5 |
//! | `lookup` | settling a lost answer by orderId | I1 |
//! | [`cancel`] | a merchant's cancel (refund): claim, card call, verdict | I1, I2, I3 |
//! | `reversal` | a cancel's ledger reversal: sync try, async retries | I1, I4 |
//! | `card_calls` | orphan cancels and transaction-list pages | I3 |
//! | `card_webhook` | what a card company's webhook settles, from a lookup | I1, I3 |
//! | [`ledger`] | the ledger's sync try and async retries | I1, I4 |
//! | [`settle`] | lookups and saves for the batch and reconciliation | I1 |
//! | [`resolve`] | an operator's decision on an open payment, audited | I1 |
//! | [`wiring`] | building stores, stacks and the saga from config | — |

mod at_card;
pub mod cancel;
mod cancel_batch;
mod card_calls;
mod card_webhook;
pub mod classify;
mod confirm;
pub mod decide;
mod ends;
mod expiry;
mod holds;
pub mod ledger;
mod logged_call;
mod lookup;
pub mod outcome;
pub mod problems;
pub mod recheck;
mod replay;
pub mod resolve;
mod reversal;
pub mod saga;
pub mod settle;
mod steps;
pub mod wiring;

pub use cancel::{CancelInput, CancelOutcome, CanceledPayment};
pub use cancel_batch::CancelSettlement;
pub use card_calls::{orphan_subject, OrphanCancel};
pub use card_webhook::WebhookOutcome;
pub use decide::{Decided, Decider};
pub use holds::StuckHolds;
pub use ledger::{RetryTracker, SaveResult};
pub use outcome::{
    ConfirmInput, ConfirmOutcome, ConfirmTicket, EarlyAnswer, Refusal, Reuse, Settlement,
    TicketState,
};
pub use problems::{problems, Problem, MISMATCH_REASONS};
pub use recheck::RecheckSchedule;
pub use resolve::{
    record_json, CardEvidence, Decision, ResolveError, ResolveReport, ResolveRequest, Resolver,
};
pub use saga::{in_flight_window, Saga, SagaSettings, CLOCK_SKEW_MARGIN};
pub use settle::{Settler, Tally};
pub use wiring::{Components, SandboxUrls, WiringError};
