//! paygate-resilience: one tower stack per downstream (card API, ledger,
//! Discord), keeping load on a sick downstream bounded (invariant I5).
//!
//! Layer order, outermost first (the Resilience4j order of the original
//! design: retry around circuit breaker around bulkhead):
//!
//! ```text
//! overall deadline -> retry (budgeted) -> circuit breaker -> rate limit
//!   -> per-attempt timeout -> bulkhead (concurrency limit + load shed) -> call
//! ```
//!
//! - **Deadline**: `tokio::time::timeout` around the whole call.
//! - **Retry**: `tower::retry` with [`retry::BudgetedRetry`]: only idempotent
//!   calls, exponential backoff with full jitter, `Retry-After` honoured, a
//!   `tower` [`TpsBudget`](tower::retry::budget::TpsBudget) shared by every call
//!   to the downstream, and never when the breaker is open.
//! - **Circuit breaker**: [`breaker`] (our own; the module says why).
//! - **Rate limit**: `governor` (GCRA), waiting at most `max_wait` for a slot.
//! - **Per-attempt timeout**: `tower::timeout`.
//! - **Bulkhead**: `tower`'s `GlobalConcurrencyLimit` behind `LoadShed`, so a
//!   full bulkhead rejects at once instead of queueing.
//!
//! Use [`Downstream::call`] for every downstream call. The closure it takes
//! makes one attempt (it receives the attempt number, from 1), so per-attempt
//! work such as the write-ahead `REQUEST` row runs inside the stack.

pub mod breaker;
pub mod ratelimit;
pub mod retry;

use std::{future::Future, num::NonZeroU32, pin::Pin, sync::Arc, time::Duration};

use paygate_core::config::DownstreamPolicy;
use tokio::sync::Semaphore;
use tower::{
    limit::GlobalConcurrencyLimitLayer, load_shed::LoadShedLayer, retry::budget::TpsBudget,
    timeout::TimeoutLayer, BoxError, ServiceBuilder, ServiceExt,
};

pub use breaker::{
    BreakerConfig, BreakerMode, BreakerOpen, BreakerState, CallOutcome, CircuitBreaker,
    SlidingWindow,
};

/// Added to the per-attempt timeout layer. The downstream's HTTP client is
/// given the policy's `attempt_timeout_ms` itself, so it normally times out
/// first and the attempt writes its `ERROR` row; the layer is the backstop for
/// a call that ignores its own timeout.
pub const ATTEMPT_TIMEOUT_GRACE: Duration = Duration::from_millis(250);

/// What kind of request a call is, for retries and the retry budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// A new request that carries an idempotency key: it deposits into the
    /// retry budget and may be retried within it.
    Idempotent,
    /// A new request without an idempotency key: never retried.
    NonIdempotent,
    /// A retry the caller schedules itself (paygate's async ledger retries),
    /// which has already withdrawn from the budget: it deposits nothing and
    /// gets no further retries from the stack.
    CallerRetry,
}

/// How the stack should treat one kind of error of the downstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorClass {
    /// What the breaker records.
    pub outcome: CallOutcome,
    /// Whether a retry (same idempotency key) may help.
    pub retryable: bool,
    /// The downstream's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

/// Why a call through the stack failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The downstream's own error (after retries, if any).
    #[error(transparent)]
    Downstream(E),
    /// The circuit breaker is open: no call was made.
    #[error("circuit breaker open")]
    BreakerOpen {
        /// When to try again.
        retry_after: Duration,
    },
    /// The bulkhead is full: no call was made.
    #[error("bulkhead full")]
    BulkheadFull,
    /// No rate-limit slot within the allowed wait: no call was made.
    #[error("outbound rate limit")]
    RateLimited,
    /// An attempt exceeded the per-attempt timeout (the call may have reached
    /// the downstream).
    #[error("attempt timed out")]
    AttemptTimeout,
    /// The whole call, retries included, exceeded its deadline.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// An error from the stack that is none of the above.
    #[error("resilience stack: {0}")]
    Other(String),
}

impl<E> CallError<E> {
    /// True when the stack refused before any request left (breaker,
    /// bulkhead, rate limit): the downstream certainly did not act.
    pub fn no_call_made(&self) -> bool {
        matches!(
            self,
            Self::BreakerOpen { .. } | Self::BulkheadFull | Self::RateLimited
        )
    }
}

/// One downstream's shared resilience state: breaker, bulkhead, rate limiter
/// and retry budget, shared by every call to it.
pub struct Downstream {
    name: &'static str,
    policy: DownstreamPolicy,
    breaker: Arc<CircuitBreaker>,
    bulkhead: Arc<Semaphore>,
    limiter: Option<Arc<ratelimit::Limiter>>,
    budget: Arc<TpsBudget>,
}

impl std::fmt::Debug for Downstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downstream")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .finish()
    }
}

/// A request travelling down the stack: the attempt number and the closure
/// that makes an attempt.
pub struct Attempt<F> {
    pub(crate) number: u32,
    pub(crate) idempotent: bool,
    make: Arc<F>,
}

impl<F> Clone for Attempt<F> {
    fn clone(&self) -> Self {
        Self {
            number: self.number,
            idempotent: self.idempotent,
            make: self.make.clone(),
        }
    }
}

impl Downstream {
    /// The stack state for one downstream, from its policy.
    pub fn new(name: &'static str, policy: &DownstreamPolicy) -> Self {
        let breaker = CircuitBreaker::new(name, breaker_config(policy));
        let limiter = NonZeroU32::new(policy.rate_limit_per_second).map(|rate| {
            let burst = NonZeroU32::new(policy.rate_limit_burst).unwrap_or(rate);
            Arc::new(ratelimit::Limiter::new(
                name,
                rate,
                burst,
                Duration::from_millis(policy.rate_limit_max_wait_ms),
            ))
        });
        let budget = Arc::new(TpsBudget::new(
            Duration::from_millis(policy.retry_budget_ttl_ms),
            policy.retry_budget_min_per_second,
            policy.retry_budget_percent / 100.0,
        ));
        Self {
            name,
            policy: policy.clone(),
            breaker,
            bulkhead: Arc::new(Semaphore::new(policy.bulkhead_max_concurrent as usize)),
            limiter,
            budget,
        }
    }

    /// The downstream's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The circuit breaker (for operators and tests).
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.breaker
    }

    /// Calls holding a bulkhead permit now, and the bulkhead's size (the
    /// policy's `bulkhead_max_concurrent`): `(in use, max)`.
    pub fn bulkhead_use(&self) -> (u32, u32) {
        let max = self.policy.bulkhead_max_concurrent;
        let free = u32::try_from(self.bulkhead.available_permits()).unwrap_or(max);
        (max.saturating_sub(free), max)
    }

    /// The retry budget (shared with callers that retry on their own, such
    /// as paygate's async ledger retries).
    pub fn budget(&self) -> &Arc<TpsBudget> {
        &self.budget
    }

    /// The policy.
    pub fn policy(&self) -> &DownstreamPolicy {
        &self.policy
    }

    /// Makes one call through the stack, retrying an idempotent request when
    /// the error class allows, up to `max_attempts` (`None`: the policy's).
    /// `attempt(n)` makes attempt `n` (from 1); `classify` tells the stack how
    /// to treat each downstream error.
    ///
    /// # Errors
    /// [`CallError`]: the downstream's error, or the stack's refusal.
    ///
    /// The future is boxed as `Send` here, where its types are concrete: left
    /// to callers, tower's `Into<BoxError>` bounds trip a rustc limitation
    /// on higher-ranked lifetimes when the call is spawned.
    pub fn call<T, E, F, Fut>(
        &self,
        kind: RequestKind,
        max_attempts: Option<u32>,
        attempt: F,
        classify: fn(&E) -> ErrorClass,
    ) -> Pin<Box<dyn Future<Output = Result<T, CallError<E>>> + Send + '_>>
    where
        T: Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
        F: Fn(u32) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.call_with_timeout_class(
            kind,
            max_attempts,
            attempt,
            classify,
            ATTEMPT_TIMEOUT_RETRYABLE,
        )
    }

    /// [`Downstream::call`], with the class of the stack's own per-attempt
    /// timeout given by the caller instead of "a retryable failure". A call
    /// whose answer may have been lost with a timeout and must not be sent
    /// again (a card confirm: DESIGN.md §4 settles it by lookup) passes
    /// [`ATTEMPT_TIMEOUT_NOT_RETRIED`].
    ///
    /// # Errors
    /// [`CallError`], as [`Downstream::call`].
    pub fn call_with_timeout_class<T, E, F, Fut>(
        &self,
        kind: RequestKind,
        max_attempts: Option<u32>,
        attempt: F,
        classify: fn(&E) -> ErrorClass,
        on_attempt_timeout: ErrorClass,
    ) -> Pin<Box<dyn Future<Output = Result<T, CallError<E>>> + Send + '_>>
    where
        T: Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
        F: Fn(u32) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let classes = Classes {
            error: classify,
            attempt_timeout: on_attempt_timeout,
        };
        Box::pin(self.call_inner(kind, max_attempts, attempt, classes))
    }

    async fn call_inner<T, E, F, Fut>(
        &self,
        kind: RequestKind,
        max_attempts: Option<u32>,
        attempt: F,
        classify: Classes<E>,
    ) -> Result<T, CallError<E>>
    where
        T: Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
        F: Fn(u32) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let idempotent = kind == RequestKind::Idempotent;
        let max_attempts = if idempotent {
            max_attempts.unwrap_or(self.policy.max_attempts).max(1)
        } else {
            1
        };
        if idempotent {
            tower::retry::budget::Budget::deposit(&*self.budget);
        }
        let service = self.stack::<T, E, F, Fut>(max_attempts, classify);
        let req = Attempt {
            number: 1,
            idempotent,
            make: Arc::new(attempt),
        };
        let deadline = Duration::from_millis(self.policy.deadline_ms);
        let started = tokio::time::Instant::now();
        let result = match tokio::time::timeout(deadline, service.oneshot(req)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unbox::<E>(e)),
            Err(_) => Err(CallError::DeadlineExceeded),
        };
        self.observe(&result, started.elapsed());
        result
    }

    /// Builds the layers around the attempt, erased to a `BoxService` (built
    /// outside any async body, so the call's future only holds a boxed `Send`
    /// future).
    fn stack<T, E, F, Fut>(
        &self,
        max_attempts: u32,
        classify: Classes<E>,
    ) -> tower::util::BoxService<Attempt<F>, T, BoxError>
    where
        T: Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
        F: Fn(u32) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let retry = retry::BudgetedRetry::new(
            self.name,
            self.budget.clone(),
            max_attempts,
            Duration::from_millis(self.policy.retry_base_delay_ms),
            Duration::from_millis(self.policy.retry_max_delay_ms),
            retry_classifier::<E>(classify),
        );
        let service = ServiceBuilder::new()
            .retry(retry)
            .layer(breaker::CircuitBreakerLayer::new(
                self.breaker.clone(),
                breaker_classifier::<T, E>(classify),
            ))
            .option_layer(self.limiter.clone().map(ratelimit::RateLimitLayer::new))
            .layer(TimeoutLayer::new(
                Duration::from_millis(self.policy.attempt_timeout_ms) + ATTEMPT_TIMEOUT_GRACE,
            ))
            .layer(LoadShedLayer::new())
            .layer(GlobalConcurrencyLimitLayer::with_semaphore(
                self.bulkhead.clone(),
            ))
            .service_fn(|req: Attempt<F>| {
                let fut = (req.make)(req.number);
                async move { fut.await.map_err(|e| -> BoxError { Box::new(e) }) }
            });
        tower::util::BoxService::new(service)
    }

    /// Counts every call by outcome (`paygate_downstream_calls_total`) with
    /// its latency, and logs bulkhead rejections.
    fn observe<T, E>(&self, result: &Result<T, CallError<E>>, elapsed: Duration) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(CallError::Downstream(_)) => "downstream_error",
            Err(CallError::BreakerOpen { .. }) => "breaker_open",
            Err(CallError::BulkheadFull) => "bulkhead_full",
            Err(CallError::RateLimited) => "rate_limited",
            Err(CallError::AttemptTimeout) => "attempt_timeout",
            Err(CallError::DeadlineExceeded) => "deadline_exceeded",
            Err(CallError::Other(_)) => "other",
        };
        if matches!(result, Err(CallError::BulkheadFull)) {
            tracing::warn!(downstream = self.name, "bulkhead full; call rejected");
            metrics::counter!("paygate_bulkhead_rejections_total", "downstream" => self.name)
                .increment(1);
        }
        metrics::counter!("paygate_downstream_calls_total", "downstream" => self.name, "outcome" => outcome)
            .increment(1);
        metrics::histogram!("paygate_downstream_call_duration_seconds", "downstream" => self.name)
            .record(elapsed.as_secs_f64());
    }
}

/// How one call's errors are classed: the downstream's own errors, and the
/// stack's per-attempt timeout.
struct Classes<E> {
    error: fn(&E) -> ErrorClass,
    attempt_timeout: ErrorClass,
}

impl<E> Clone for Classes<E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for Classes<E> {}

/// The stack's per-attempt timeout as [`Downstream::call`] classes it: the
/// downstream is slow or gone; a failure for the breaker, retried.
pub const ATTEMPT_TIMEOUT_RETRYABLE: ErrorClass = ErrorClass {
    outcome: CallOutcome::Failure,
    retryable: true,
    retry_after: None,
};

/// A per-attempt timeout that must not be retried (the answer may have been
/// lost after the downstream acted): still a failure for the breaker.
pub const ATTEMPT_TIMEOUT_NOT_RETRIED: ErrorClass = ErrorClass {
    outcome: CallOutcome::Failure,
    retryable: false,
    retry_after: None,
};

fn retry_classifier<E: std::error::Error + 'static>(
    classify: Classes<E>,
) -> impl Fn(&BoxError) -> ErrorClass + Send + Sync + 'static {
    move |e: &BoxError| classify_box::<E>(e, classify)
}

fn breaker_classifier<T, E: std::error::Error + 'static>(
    classify: Classes<E>,
) -> breaker::Classifier<T> {
    fn outcome<T, E: std::error::Error + 'static>(
        r: &Result<T, BoxError>,
        classify: Classes<E>,
    ) -> CallOutcome {
        match r {
            Ok(_) => CallOutcome::Success,
            Err(e) => classify_box::<E>(e, classify).outcome,
        }
    }
    Arc::new(move |r: &Result<T, BoxError>| outcome::<T, E>(r, classify))
}

fn classify_box<E: std::error::Error + 'static>(e: &BoxError, classify: Classes<E>) -> ErrorClass {
    if let Some(inner) = e.downcast_ref::<E>() {
        return (classify.error)(inner);
    }
    let stack_refusal = e.is::<tower::load_shed::error::Overloaded>()
        || e.is::<ratelimit::RateLimited>()
        || e.is::<BreakerOpen>();
    if stack_refusal {
        // Not the downstream's doing; no retry (the stack is protecting it).
        return ErrorClass {
            outcome: CallOutcome::Ignored,
            retryable: false,
            retry_after: None,
        };
    }
    // A per-attempt timeout: the downstream is slow or gone.
    classify.attempt_timeout
}

fn unbox<E: std::error::Error + Send + Sync + 'static>(e: BoxError) -> CallError<E> {
    let e = match e.downcast::<E>() {
        Ok(inner) => return CallError::Downstream(*inner),
        Err(e) => e,
    };
    if let Some(open) = e.downcast_ref::<BreakerOpen>() {
        return CallError::BreakerOpen {
            retry_after: open.retry_after,
        };
    }
    if e.is::<tower::load_shed::error::Overloaded>() {
        return CallError::BulkheadFull;
    }
    if e.is::<ratelimit::RateLimited>() {
        return CallError::RateLimited;
    }
    if e.is::<tower::timeout::error::Elapsed>() {
        return CallError::AttemptTimeout;
    }
    CallError::Other(e.to_string())
}

/// The breaker settings of a policy.
pub fn breaker_config(p: &DownstreamPolicy) -> BreakerConfig {
    BreakerConfig {
        window: if p.breaker_window_type == "time" {
            SlidingWindow::Time(p.breaker_window_size)
        } else {
            SlidingWindow::Count(p.breaker_window_size)
        },
        failure_rate_threshold: p.breaker_failure_rate_threshold,
        slow_call_rate_threshold: p.breaker_slow_call_rate_threshold,
        slow_call_duration: Duration::from_millis(p.breaker_slow_call_duration_ms),
        minimum_number_of_calls: p.breaker_minimum_number_of_calls,
        wait_duration_in_open: Duration::from_millis(p.breaker_wait_duration_in_open_ms),
        permitted_calls_in_half_open: p.breaker_permitted_calls_in_half_open,
        mode: match p.breaker_mode.as_str() {
            "forced_open" => BreakerMode::ForcedOpen,
            "disabled" => BreakerMode::Disabled,
            _ => BreakerMode::Normal,
        },
    }
}
