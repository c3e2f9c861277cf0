//! The whole stack of `Downstream::call` against a fake downstream that
//! counts calls and concurrency, under tokio's paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use paygate_core::config::DownstreamPolicy;
use paygate_resilience::{
    BreakerState, CallError, CallOutcome, Downstream, ErrorClass, RequestKind,
};

#[derive(Debug, Clone, thiserror::Error)]
enum FakeError {
    #[error("503")]
    Unavailable,
    #[error("429")]
    TooMany(Duration),
    #[error("declined")]
    Declined,
}

fn classify(e: &FakeError) -> ErrorClass {
    match e {
        FakeError::Unavailable => ErrorClass {
            outcome: CallOutcome::Failure,
            retryable: true,
            retry_after: None,
        },
        FakeError::TooMany(d) => ErrorClass {
            outcome: CallOutcome::Failure,
            retryable: true,
            retry_after: Some(*d),
        },
        FakeError::Declined => ErrorClass {
            outcome: CallOutcome::Success,
            retryable: false,
            retry_after: None,
        },
    }
}

fn policy() -> DownstreamPolicy {
    DownstreamPolicy {
        deadline_ms: 60_000,
        attempt_timeout_ms: 5_000,
        max_attempts: 3,
        retry_base_delay_ms: 10,
        retry_max_delay_ms: 100,
        retry_budget_percent: 20.0,
        retry_budget_min_per_second: 1,
        retry_budget_ttl_ms: 10_000,
        breaker_window_size: 10,
        breaker_minimum_number_of_calls: 5,
        breaker_wait_duration_in_open_ms: 10_000,
        breaker_permitted_calls_in_half_open: 2,
        bulkhead_max_concurrent: 5,
        ..DownstreamPolicy::card_api()
    }
}

#[derive(Default)]
struct Fake {
    calls: AtomicU32,
    in_flight: AtomicU32,
    max_in_flight: AtomicU32,
}

#[tokio::test(start_paused = true)]
async fn retry_after_delays_the_next_attempt() {
    let d = Downstream::new("fake", &policy());
    let fake = Arc::new(Fake::default());
    let f = fake.clone();
    let started = tokio::time::Instant::now();
    let out: Result<u32, _> = d
        .call(
            RequestKind::Idempotent,
            None,
            move |n| {
                let f = f.clone();
                async move {
                    f.calls.fetch_add(1, Ordering::SeqCst);
                    if n == 1 {
                        Err(FakeError::TooMany(Duration::from_secs(2)))
                    } else {
                        Ok(n)
                    }
                }
            },
            classify,
        )
        .await;
    assert_eq!(out.unwrap(), 2, "the second attempt succeeded");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_non_idempotent_call_is_never_retried() {
    let d = Downstream::new("fake", &policy());
    let fake = Arc::new(Fake::default());
    let f = fake.clone();
    let out: Result<(), _> = d
        .call(
            RequestKind::NonIdempotent,
            None,
            move |_| {
                let f = f.clone();
                async move {
                    f.calls.fetch_add(1, Ordering::SeqCst);
                    Err(FakeError::Unavailable)
                }
            },
            classify,
        )
        .await;
    assert!(matches!(
        out,
        Err(CallError::Downstream(FakeError::Unavailable))
    ));
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

async fn failing_call(
    d: &Downstream,
    fake: &Arc<Fake>,
    err: FakeError,
) -> Result<(), CallError<FakeError>> {
    let f = fake.clone();
    d.call(
        RequestKind::Idempotent,
        Some(1),
        move |_| {
            let f = f.clone();
            let err = err.clone();
            async move {
                f.calls.fetch_add(1, Ordering::SeqCst);
                Err(err)
            }
        },
        classify,
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_sends_nothing_and_declines_never_open_it() {
    let d = Downstream::new("fake", &policy());
    let fake = Arc::new(Fake::default());
    // 50 declines: successes for the breaker.
    for _ in 0..50 {
        let _ = failing_call(&d, &fake, FakeError::Declined).await;
    }
    assert_eq!(
        d.breaker().state(),
        BreakerState::Closed,
        "a decline never counts toward opening"
    );
    // 5 failures in a window of 10 holding 5 declines: 50% opens it.
    for _ in 0..5 {
        let _ = failing_call(&d, &fake, FakeError::Unavailable).await;
    }
    assert_eq!(d.breaker().state(), BreakerState::Open);
    let before = fake.calls.load(Ordering::SeqCst);
    for _ in 0..20 {
        let out = failing_call(&d, &fake, FakeError::Unavailable).await;
        assert!(matches!(out, Err(CallError::BreakerOpen { .. })));
    }
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        before,
        "zero calls while open"
    );
    // After the wait: the permitted probes, and no retry while open.
    tokio::time::advance(Duration::from_secs(10)).await;
    let ok = |fake: &Arc<Fake>| {
        let f = fake.clone();
        move |_| {
            let f = f.clone();
            async move {
                f.calls.fetch_add(1, Ordering::SeqCst);
                Ok::<(), FakeError>(())
            }
        }
    };
    d.call(RequestKind::Idempotent, None, ok(&fake), classify)
        .await
        .unwrap();
    d.call(RequestKind::Idempotent, None, ok(&fake), classify)
        .await
        .unwrap();
    assert_eq!(d.breaker().state(), BreakerState::Closed);
    assert_eq!(fake.calls.load(Ordering::SeqCst), before + 2);
}

#[tokio::test(start_paused = true)]
async fn the_bulkhead_caps_concurrency_and_rejects_the_excess_at_once() {
    let d = Arc::new(Downstream::new("fake", &policy()));
    let fake = Arc::new(Fake::default());
    let calls = (0..50).map(|_| {
        let d = d.clone();
        let f = fake.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let out: Result<(), CallError<FakeError>> = d
                .call(
                    RequestKind::Idempotent,
                    Some(1),
                    move |_| {
                        let f = f.clone();
                        async move {
                            let now = f.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            f.max_in_flight.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            f.in_flight.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        }
                    },
                    classify,
                )
                .await;
            (out, started.elapsed())
        })
    });
    let results = futures_join(calls).await;
    let rejected: Vec<_> = results
        .iter()
        .filter(|(r, _)| matches!(r, Err(CallError::BulkheadFull)))
        .collect();
    assert!(fake.max_in_flight.load(Ordering::SeqCst) <= 5);
    assert_eq!(
        results.len() - rejected.len(),
        5,
        "exactly the bulkhead's worth went through"
    );
    assert!(
        rejected.iter().all(|(_, t)| *t < Duration::from_millis(1)),
        "rejected at once, not queued"
    );
    assert_eq!(
        d.breaker().state(),
        BreakerState::Closed,
        "bulkhead rejections are ignored by the breaker"
    );
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn retries_stay_within_the_budget_when_everything_fails() {
    let mut p = policy();
    p.breaker_mode = "disabled".into(); // measure the budget alone
    p.retry_base_delay_ms = 1;
    p.retry_max_delay_ms = 1;
    let d = Downstream::new("fake", &p);
    let fake = Arc::new(Fake::default());
    let requests = 200u32;
    for _ in 0..requests {
        let f = fake.clone();
        let _ = d
            .call(
                RequestKind::Idempotent,
                None,
                move |_| {
                    let f = f.clone();
                    async move {
                        f.calls.fetch_add(1, Ordering::SeqCst);
                        Err::<(), _>(FakeError::Unavailable)
                    }
                },
                classify,
            )
            .await;
    }
    let calls = fake.calls.load(Ordering::SeqCst);
    let ratio = f64::from(calls) / f64::from(requests);
    // Bound: 1 + retry_budget_percent + the reserve of min_per_second * ttl.
    let bound = 1.0 + 0.20 + f64::from(p.retry_budget_min_per_second) * 10.0 / f64::from(requests);
    assert!(
        ratio <= bound,
        "calls per request {ratio:.3} exceeds the budget bound {bound:.3}"
    );
    assert!(ratio > 1.0, "some retries were allowed ({ratio:.3})");
    eprintln!(
        "retry budget: {calls} calls for {requests} requests, ratio {ratio:.3} <= bound {bound:.3}"
    );
}

/// Issue 13, point 8: the stack's own per-attempt timeout is retried for a
/// plain call, but not for a call whose answer may have been lost after the
/// downstream acted (a card confirm is settled by lookup, not re-sent).
#[tokio::test(start_paused = true)]
async fn an_attempt_timeout_is_resent_only_when_the_caller_allows_it() {
    for (class, want_attempts) in [
        (paygate_resilience::ATTEMPT_TIMEOUT_RETRYABLE, 3),
        (paygate_resilience::ATTEMPT_TIMEOUT_NOT_RETRIED, 1),
    ] {
        let d = Downstream::new("fake", &policy());
        let sent = Arc::new(AtomicU32::new(0));
        let counter = sent.clone();
        let hang = move |_n: u32| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(3_600)).await;
                Ok::<(), FakeError>(())
            }
        };
        let res = d
            .call_with_timeout_class(RequestKind::Idempotent, None, hang, classify, class)
            .await;
        assert!(matches!(res, Err(CallError::AttemptTimeout)), "{res:?}");
        assert_eq!(sent.load(Ordering::SeqCst), want_attempts);
    }
}
