//! Guards I5 (bounded load on a sick downstream): what each answer of the
//! card API and the ledger means for the resilience stack — whether it
//! counts against the circuit breaker, and whether the stack may retry it
//! within the retry budget. One function per kind of call; the table test at
//! the bottom pins every case.
//!
//! A confirm is never re-sent after an answer that may have been lost (a
//! timeout or a reset): it is settled by lookup instead (DESIGN.md §4), so
//! the only retries of a confirm are answers that say nothing happened yet.

use paygate_card_api::{codes, CardApiError};
use paygate_ledger_api::LedgerApiError;
use paygate_resilience::{CallOutcome, ErrorClass};

/// One attempt's failure: the downstream's error, or the `REQUEST` row could
/// not be written, in which case this attempt made no call (invariant I3).
#[derive(Debug, thiserror::Error)]
pub enum AttemptError<E> {
    /// The downstream answered with an error, or did not answer.
    #[error(transparent)]
    Downstream(E),
    /// The `REQUEST` row could not be written: no call was made.
    #[error("request log unavailable: {0}")]
    LogUnavailable(String),
}

/// Neither a breaker failure nor retried: an attempt that made no call.
const NO_RETRY_IGNORED: ErrorClass = ErrorClass {
    outcome: CallOutcome::Ignored,
    retryable: false,
    retry_after: None,
};

/// Card confirm: 5xx, 429 and "still processing" are retried with the same
/// idempotency key; a timeout or reset is settled by lookup, not re-sent; a
/// decline is a healthy answer for the breaker.
pub fn confirm(e: &AttemptError<CardApiError>) -> ErrorClass {
    let AttemptError::Downstream(e) = e else {
        return NO_RETRY_IGNORED;
    };
    let class = |outcome, retryable| ErrorClass {
        outcome,
        retryable,
        retry_after: e.retry_after(),
    };
    if e.is_auth_failure() {
        return NO_RETRY_IGNORED;
    }
    if e.is_decline() {
        return class(CallOutcome::Success, false);
    }
    match e {
        CardApiError::Server { .. } => class(CallOutcome::Failure, true),
        CardApiError::Rejected { status: 429, .. } => class(CallOutcome::Failure, true),
        CardApiError::Rejected { code, .. } if code == codes::IDEMPOTENT_REQUEST_PROCESSING => {
            class(CallOutcome::Success, true)
        }
        // A 4xx the card API's code table calls transient (Toss sends
        // `PROVIDER_ERROR` as 400): asked again with the same key.
        CardApiError::Rejected { .. } if e.is_transient() => class(CallOutcome::Failure, true),
        CardApiError::Rejected { .. } => class(CallOutcome::Success, false),
        CardApiError::Timeout | CardApiError::Connection(_) | CardApiError::Decode(_) => {
            class(CallOutcome::Failure, false)
        }
    }
}

/// Lookups: the saga's own loop spaces them out; the stack makes one attempt.
pub fn lookup(e: &AttemptError<CardApiError>) -> ErrorClass {
    let AttemptError::Downstream(e) = e else {
        return NO_RETRY_IGNORED;
    };
    let outcome = match e {
        CardApiError::Rejected { status, .. } if *status != 429 => CallOutcome::Success,
        _ => CallOutcome::Failure,
    };
    ErrorClass {
        outcome,
        retryable: false,
        retry_after: e.retry_after(),
    }
}

/// Transaction-list pages (reads) and cancels (which carry an idempotency
/// key, so the card company replays the first answer): 5xx, 429, timeouts
/// and resets are retried within the budget; other 4xx are healthy refusals;
/// a failed `REQUEST` row is no call and no retry.
pub fn repeatable(e: &AttemptError<CardApiError>) -> ErrorClass {
    let AttemptError::Downstream(e) = e else {
        return NO_RETRY_IGNORED;
    };
    let transient = e.is_transient() || matches!(e, CardApiError::Rejected { status: 429, .. });
    ErrorClass {
        outcome: if transient {
            CallOutcome::Failure
        } else {
            CallOutcome::Success
        },
        retryable: transient,
        retry_after: e.retry_after(),
    }
}

/// Ledger: 5xx, timeouts and resets are failures and may be retried; a 409 or
/// other 4xx is a healthy refusal that no retry will change.
pub fn ledger(e: &AttemptError<LedgerApiError>) -> ErrorClass {
    let AttemptError::Downstream(e) = e else {
        return NO_RETRY_IGNORED;
    };
    let transient = e.is_transient();
    ErrorClass {
        outcome: if transient {
            CallOutcome::Failure
        } else {
            CallOutcome::Success
        },
        retryable: transient,
        retry_after: None,
    }
}

/// The card company's message of an answer, or the error's own text.
pub(crate) fn card_message(e: &CardApiError) -> String {
    match e {
        CardApiError::Rejected { message, .. } | CardApiError::Server { message, .. } => {
            message.clone()
        }
        other => other.to_string(),
    }
}

/// Whether the card company's answers to a payment's confirms, as logged
/// (`REQUEST`/`RESPONSE` rows, [`paygate_api_log::ConfirmEvidence`]),
/// prove it was declined: a 4xx decline, or, with one request only, a 4xx
/// that says nothing was approved (not an auth failure of ours). Only the
/// confirm path's answers count (lookup 404s are not evidence). The batch
/// files such a payment unpaid; [`crate::Saga::settle_stuck_holds`]
/// releases its hold.
pub fn declined(evidence: &paygate_api_log::ConfirmEvidence) -> bool {
    evidence.answers.iter().any(|(status, code)| {
        let status = u16::try_from(*status).unwrap_or(0);
        let e = CardApiError::Rejected {
            status,
            code: code.clone().unwrap_or_default(),
            message: String::new(),
            retry_after_s: None,
        };
        (400..500).contains(&status)
            && (e.is_decline()
                || (evidence.requests == 1 && e.definitely_not_approved() && !e.is_auth_failure()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(status: u16, code: &str) -> AttemptError<CardApiError> {
        AttemptError::Downstream(CardApiError::Rejected {
            status,
            code: code.to_owned(),
            message: String::new(),
            retry_after_s: None,
        })
    }

    fn server(status: u16) -> AttemptError<CardApiError> {
        AttemptError::Downstream(CardApiError::Server {
            status,
            code: format!("HTTP_{status}"),
            message: String::new(),
            retry_after_s: None,
        })
    }

    #[test]
    fn confirm_answers_are_classed_as_the_table_says() {
        use CallOutcome::*;
        let cases: Vec<(&str, AttemptError<CardApiError>, CallOutcome, bool)> = vec![
            (
                "decline",
                rejected(403, codes::REJECT_CARD_PAYMENT),
                Success,
                false,
            ),
            (
                "our key",
                rejected(401, codes::UNAUTHORIZED_KEY),
                Ignored,
                false,
            ),
            ("5xx", server(500), Failure, true),
            ("429", rejected(429, "TOO_MANY_REQUESTS"), Failure, true),
            (
                "400 provider error",
                rejected(400, codes::PROVIDER_ERROR),
                Failure,
                true,
            ),
            (
                "400 our key",
                rejected(400, codes::INVALID_API_KEY),
                Ignored,
                false,
            ),
            (
                "in progress",
                rejected(409, codes::IDEMPOTENT_REQUEST_PROCESSING),
                Success,
                true,
            ),
            // May have been approved: settled by lookup, never re-sent.
            (
                "timeout",
                AttemptError::Downstream(CardApiError::Timeout),
                Failure,
                false,
            ),
            (
                "reset",
                AttemptError::Downstream(CardApiError::Connection("reset".into())),
                Failure,
                false,
            ),
            (
                "no log row",
                AttemptError::LogUnavailable("down".into()),
                Ignored,
                false,
            ),
        ];
        for (name, e, outcome, retryable) in cases {
            let c = confirm(&e);
            assert_eq!((c.outcome, c.retryable), (outcome, retryable), "{name}");
        }
    }

    #[test]
    fn lookups_are_never_retried_by_the_stack_and_ledger_refusals_are_healthy() {
        assert!(!lookup(&server(503)).retryable);
        assert_eq!(
            lookup(&rejected(404, codes::NOT_FOUND_PAYMENT)).outcome,
            CallOutcome::Success
        );
        assert!(repeatable(&server(502)).retryable);
        assert!(!repeatable(&rejected(400, "NOT_CANCELABLE_AMOUNT")).retryable);
        let conflict = AttemptError::Downstream(LedgerApiError::Conflict);
        assert_eq!(
            (ledger(&conflict).outcome, ledger(&conflict).retryable),
            (CallOutcome::Success, false)
        );
    }
}
