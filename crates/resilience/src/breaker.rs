//! A circuit breaker with Resilience4j semantics, as a small state machine
//! plus a tower layer ([`CircuitBreakerLayer`]).
//!
//! States: `Closed` (calls flow, outcomes are recorded in a sliding window),
//! `Open` (calls are rejected at once, for `wait_duration_in_open`),
//! `HalfOpen` (exactly `permitted_calls_in_half_open` probes go through; their
//! failure or slow-call rate decides between `Closed` and `Open` again), and
//! two operator states: `ForcedOpen` (reject everything) and `Disabled` (let
//! everything through, record nothing).
//!
//! The window is count-based (the last N calls) or time-based (the calls of
//! the last N seconds, in one-second buckets). Once the window holds at least
//! `minimum_number_of_calls`, the breaker opens when the failure rate or the
//! slow-call rate (calls longer than `slow_call_duration`) reaches its
//! threshold. Each call is classified by the caller as a success, a failure
//! or **ignored** (a bulkhead or rate-limit rejection is not the
//! downstream's fault and must not move the rates).
//!
//! Time is tokio's clock, so tests drive it with paused time.
//!
//! Why not `tower-resilience-circuitbreaker` (0.14, evaluated): it has the
//! Resilience4j knobs, but it reads `std::time::Instant` (open-state waits and
//! time windows cannot be tested under tokio's paused clock), its classifier
//! has no "ignored" outcome (bulkhead rejections would count), and it has no
//! disabled state. This module is the part that differs; everything around
//! it (timeouts, bulkhead, retry budget, rate limit) is tower's or governor's.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;
use tower::{BoxError, Layer, Service};

/// How outcomes are windowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlidingWindow {
    /// The last `n` calls.
    Count(u32),
    /// The calls of the last `n` seconds.
    Time(u32),
}

/// Operator override of the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerMode {
    /// The automatic state machine.
    Normal,
    /// Reject every call.
    ForcedOpen,
    /// Let every call through and record nothing.
    Disabled,
}

/// Breaker settings. Rates are percentages (0-100].
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// The sliding window.
    pub window: SlidingWindow,
    /// Open when this share of calls in the window failed, percent.
    pub failure_rate_threshold: f64,
    /// Open when this share of calls in the window was slow, percent.
    pub slow_call_rate_threshold: f64,
    /// A call taking at least this long is slow.
    pub slow_call_duration: Duration,
    /// Rates are evaluated only once the window holds this many calls.
    pub minimum_number_of_calls: u32,
    /// How long the breaker stays open before probing.
    pub wait_duration_in_open: Duration,
    /// Probes let through in half-open.
    pub permitted_calls_in_half_open: u32,
    /// Operator override.
    pub mode: BreakerMode,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: SlidingWindow::Count(100),
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 100.0,
            slow_call_duration: Duration::from_secs(5),
            minimum_number_of_calls: 20,
            wait_duration_in_open: Duration::from_secs(30),
            permitted_calls_in_half_open: 5,
            mode: BreakerMode::Normal,
        }
    }
}

/// The breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow and are recorded.
    Closed,
    /// Calls are rejected.
    Open,
    /// A limited number of probes flow.
    HalfOpen,
    /// Rejecting by operator order.
    ForcedOpen,
    /// Not recording by operator order.
    Disabled,
}

impl BreakerState {
    /// Gauge value: closed 0, open 1, half-open 2, forced-open 3, disabled 4.
    pub fn as_gauge(&self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
            Self::ForcedOpen => 3.0,
            Self::Disabled => 4.0,
        }
    }

    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::ForcedOpen => "forced_open",
            Self::Disabled => "disabled",
        }
    }
}

/// How a call ended, for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// The downstream answered as it should (a card decline is a success).
    Success,
    /// Timeout, connection error, 5xx.
    Failure,
    /// Not the downstream's doing (bulkhead or rate-limit rejection).
    Ignored,
}

/// The breaker refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker open; retry after {retry_after:?}")]
pub struct BreakerOpen {
    /// When a call may be let through again.
    pub retry_after: Duration,
}

#[derive(Default, Clone, Copy)]
struct Tally {
    calls: u32,
    failures: u32,
    slow: u32,
}

impl Tally {
    fn add(&mut self, failed: bool, slow: bool) {
        self.calls += 1;
        self.failures += u32::from(failed);
        self.slow += u32::from(slow);
    }

    fn rates(&self) -> (f64, f64) {
        let n = f64::from(self.calls.max(1));
        (
            f64::from(self.failures) * 100.0 / n,
            f64::from(self.slow) * 100.0 / n,
        )
    }
}

struct Inner {
    state: BreakerState,
    /// Count window: one entry per call. Time window: one entry per second.
    window: VecDeque<(u64, Tally)>,
    opened_at: Instant,
    half_open_issued: u32,
    half_open: Tally,
    epoch: Instant,
}

/// A circuit breaker shared by every call to one downstream.
pub struct CircuitBreaker {
    name: &'static str,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.name)
            .field("state", &self.state())
            .finish()
    }
}

/// Leave to make one call; record its outcome with [`CircuitBreaker::record`].
/// Dropped unrecorded (the call was cancelled), it counts as ignored.
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<CircuitBreaker>,
    half_open: bool,
    started: Instant,
    recorded: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded && self.half_open {
            let mut inner = self.breaker.lock();
            inner.half_open_issued = inner.half_open_issued.saturating_sub(1);
        }
    }
}

impl CircuitBreaker {
    /// A breaker named after its downstream (`card_api`, `ledger_api`).
    pub fn new(name: &'static str, config: BreakerConfig) -> Arc<Self> {
        let now = Instant::now();
        let state = match config.mode {
            BreakerMode::Normal => BreakerState::Closed,
            BreakerMode::ForcedOpen => BreakerState::ForcedOpen,
            BreakerMode::Disabled => BreakerState::Disabled,
        };
        let b = Arc::new(Self {
            name,
            config,
            inner: Mutex::new(Inner {
                state,
                window: VecDeque::new(),
                opened_at: now,
                half_open_issued: 0,
                half_open: Tally::default(),
                epoch: now,
            }),
        });
        metrics::gauge!("paygate_circuit_breaker_state", "downstream" => name)
            .set(state.as_gauge());
        b
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The downstream's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The current state (an open breaker whose wait is over still reads
    /// `Open` until the next call turns it half-open).
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        let from = inner.state;
        if from == to {
            return;
        }
        inner.state = to;
        match to {
            BreakerState::Open => inner.opened_at = Instant::now(),
            BreakerState::HalfOpen => {
                inner.half_open_issued = 0;
                inner.half_open = Tally::default();
            }
            _ => {}
        }
        inner.window.clear();
        tracing::warn!(
            downstream = self.name,
            from = from.as_str(),
            to = to.as_str(),
            "circuit breaker state change"
        );
        metrics::gauge!("paygate_circuit_breaker_state", "downstream" => self.name)
            .set(to.as_gauge());
        metrics::counter!("paygate_circuit_breaker_transitions_total", "downstream" => self.name, "to" => to.as_str())
            .increment(1);
    }

    /// Operator: force the breaker open (reject all) or back to normal.
    pub fn force_open(&self, on: bool) {
        let mut inner = self.lock();
        let to = if on {
            BreakerState::ForcedOpen
        } else {
            BreakerState::Closed
        };
        self.transition(&mut inner, to);
    }

    /// Operator: disable the breaker (let all through) or back to normal.
    pub fn disable(&self, on: bool) {
        let mut inner = self.lock();
        let to = if on {
            BreakerState::Disabled
        } else {
            BreakerState::Closed
        };
        self.transition(&mut inner, to);
    }

    /// Asks to make a call.
    ///
    /// # Errors
    /// [`BreakerOpen`] with the time until a probe may go through.
    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, BreakerOpen> {
        let mut inner = self.lock();
        let now = Instant::now();
        let half_open = match inner.state {
            BreakerState::Closed | BreakerState::Disabled => false,
            BreakerState::ForcedOpen => {
                drop(inner);
                return Err(self.rejected(self.config.wait_duration_in_open));
            }
            BreakerState::Open => {
                let waited = now.duration_since(inner.opened_at);
                if waited < self.config.wait_duration_in_open {
                    drop(inner);
                    return Err(self.rejected(self.config.wait_duration_in_open - waited));
                }
                self.transition(&mut inner, BreakerState::HalfOpen);
                inner.half_open_issued = 1;
                true
            }
            BreakerState::HalfOpen => {
                if inner.half_open_issued >= self.config.permitted_calls_in_half_open {
                    drop(inner);
                    return Err(self.rejected(Duration::from_secs(1)));
                }
                inner.half_open_issued += 1;
                true
            }
        };
        Ok(Permit {
            breaker: self.clone(),
            half_open,
            started: now,
            recorded: false,
        })
    }

    fn rejected(&self, retry_after: Duration) -> BreakerOpen {
        tracing::debug!(
            downstream = self.name,
            "call rejected by the open circuit breaker"
        );
        metrics::counter!("paygate_circuit_breaker_rejections_total", "downstream" => self.name)
            .increment(1);
        BreakerOpen { retry_after }
    }

    /// Records how a permitted call ended.
    pub fn record(&self, mut permit: Permit, outcome: CallOutcome) {
        permit.recorded = true;
        let elapsed = permit.started.elapsed();
        let mut inner = self.lock();
        if matches!(
            inner.state,
            BreakerState::Disabled | BreakerState::ForcedOpen
        ) {
            return;
        }
        if outcome == CallOutcome::Ignored {
            if permit.half_open && inner.state == BreakerState::HalfOpen {
                inner.half_open_issued = inner.half_open_issued.saturating_sub(1);
            }
            return;
        }
        let failed = outcome == CallOutcome::Failure;
        let slow = elapsed >= self.config.slow_call_duration;
        let c = &self.config;
        match inner.state {
            BreakerState::HalfOpen if permit.half_open => {
                inner.half_open.add(failed, slow);
                if inner.half_open.calls >= c.permitted_calls_in_half_open {
                    let (fr, sr) = inner.half_open.rates();
                    let to = if fr >= c.failure_rate_threshold || sr >= c.slow_call_rate_threshold {
                        BreakerState::Open
                    } else {
                        BreakerState::Closed
                    };
                    self.transition(&mut inner, to);
                }
            }
            BreakerState::Closed => {
                let tally = self.push(&mut inner, failed, slow);
                let min = match c.window {
                    SlidingWindow::Count(n) => c.minimum_number_of_calls.min(n),
                    SlidingWindow::Time(_) => c.minimum_number_of_calls,
                };
                if tally.calls >= min.max(1) {
                    let (fr, sr) = tally.rates();
                    if fr >= c.failure_rate_threshold || sr >= c.slow_call_rate_threshold {
                        self.transition(&mut inner, BreakerState::Open);
                    }
                }
            }
            // A late answer from before the state changed: not counted.
            _ => {}
        }
    }

    /// Adds one call to the window and returns the window's tally.
    fn push(&self, inner: &mut Inner, failed: bool, slow: bool) -> Tally {
        match self.config.window {
            SlidingWindow::Count(n) => {
                let mut t = Tally::default();
                t.add(failed, slow);
                inner.window.push_back((0, t));
                while inner.window.len() > n.max(1) as usize {
                    inner.window.pop_front();
                }
            }
            SlidingWindow::Time(secs) => {
                let now_s = Instant::now().duration_since(inner.epoch).as_secs();
                match inner.window.back_mut() {
                    Some((s, t)) if *s == now_s => t.add(failed, slow),
                    _ => {
                        let mut t = Tally::default();
                        t.add(failed, slow);
                        inner.window.push_back((now_s, t));
                    }
                }
                while inner
                    .window
                    .front()
                    .is_some_and(|(s, _)| *s + u64::from(secs.max(1)) <= now_s)
                {
                    inner.window.pop_front();
                }
            }
        }
        inner
            .window
            .iter()
            .fold(Tally::default(), |mut acc, (_, t)| {
                acc.calls += t.calls;
                acc.failures += t.failures;
                acc.slow += t.slow;
                acc
            })
    }
}

/// Classifies a call's result for the breaker.
pub type Classifier<Res> = Arc<dyn Fn(&Result<Res, BoxError>) -> CallOutcome + Send + Sync>;

/// Tower layer putting a [`CircuitBreaker`] around a service.
pub struct CircuitBreakerLayer<Res> {
    breaker: Arc<CircuitBreaker>,
    classify: Classifier<Res>,
}

impl<Res> Clone for CircuitBreakerLayer<Res> {
    fn clone(&self) -> Self {
        Self {
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<Res> CircuitBreakerLayer<Res> {
    /// A layer over `breaker` classifying results with `classify`.
    pub fn new(breaker: Arc<CircuitBreaker>, classify: Classifier<Res>) -> Self {
        Self { breaker, classify }
    }
}

impl<S, Res> Layer<S> for CircuitBreakerLayer<Res> {
    type Service = CircuitBreakerService<S, Res>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// The service of [`CircuitBreakerLayer`].
pub struct CircuitBreakerService<S, Res> {
    inner: S,
    breaker: Arc<CircuitBreaker>,
    classify: Classifier<Res>,
}

impl<S: Clone, Res> Clone for CircuitBreakerService<S, Res> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<S, Req, Res> Service<Req> for CircuitBreakerService<S, Res>
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    Req: Send + 'static,
    Res: Send + 'static,
{
    type Response = Res;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let permit = match self.breaker.try_acquire() {
            Ok(p) => p,
            Err(open) => return Box::pin(async move { Err(BoxError::from(open)) }),
        };
        let fut = self.inner.call(req);
        let breaker = self.breaker.clone();
        let classify = self.classify.clone();
        Box::pin(async move {
            let result = fut.await;
            breaker.record(permit, classify(&result));
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(window: SlidingWindow) -> BreakerConfig {
        BreakerConfig {
            window,
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 100.0,
            slow_call_duration: Duration::from_secs(2),
            minimum_number_of_calls: 4,
            wait_duration_in_open: Duration::from_secs(10),
            permitted_calls_in_half_open: 2,
            mode: BreakerMode::Normal,
        }
    }

    fn call(b: &Arc<CircuitBreaker>, outcome: CallOutcome) -> bool {
        match b.try_acquire() {
            Ok(p) => {
                b.record(p, outcome);
                true
            }
            Err(_) => false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_exactly_the_threshold_once_the_minimum_is_reached() {
        let b = CircuitBreaker::new("t", config(SlidingWindow::Count(10)));
        // 3 failures: below the minimum of 4 calls, stays closed.
        for _ in 0..3 {
            assert!(call(&b, CallOutcome::Failure));
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // The 4th call makes 4 of 4 failed: opens.
        assert!(call(&b, CallOutcome::Failure));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!call(&b, CallOutcome::Success), "rejected while open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_rate_below_the_threshold_keeps_it_closed() {
        let b = CircuitBreaker::new("t", config(SlidingWindow::Count(10)));
        for i in 0..20 {
            // One failure in three: 33% < 50%.
            call(
                &b,
                if i % 3 == 2 {
                    CallOutcome::Failure
                } else {
                    CallOutcome::Success
                },
            );
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_outcomes_do_not_move_the_rates() {
        let b = CircuitBreaker::new("t", config(SlidingWindow::Count(10)));
        for _ in 0..50 {
            call(&b, CallOutcome::Ignored);
        }
        for _ in 0..3 {
            call(&b, CallOutcome::Failure);
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "ignored calls are not counted toward the minimum"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_exactly_the_permitted_probes_through_then_closes_on_success() {
        let b = CircuitBreaker::new("t", config(SlidingWindow::Count(10)));
        for _ in 0..4 {
            call(&b, CallOutcome::Failure);
        }
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        let err = b.try_acquire().unwrap_err();
        assert_eq!(err.retry_after, Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        let p1 = b.try_acquire().unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let p2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err(), "a third probe is refused");
        b.record(p1, CallOutcome::Success);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(p2, CallOutcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(call(&b, CallOutcome::Success));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens() {
        let b = CircuitBreaker::new("t", config(SlidingWindow::Count(10)));
        for _ in 0..4 {
            call(&b, CallOutcome::Failure);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(call(&b, CallOutcome::Failure));
        assert!(call(&b, CallOutcome::Failure));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(
            !call(&b, CallOutcome::Success),
            "open again, for a fresh wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_trip_it() {
        let mut c = config(SlidingWindow::Count(10));
        c.slow_call_rate_threshold = 50.0;
        let b = CircuitBreaker::new("t", c);
        for _ in 0..4 {
            let p = b.try_acquire().unwrap();
            tokio::time::advance(Duration::from_secs(3)).await;
            b.record(p, CallOutcome::Success);
        }
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "4 of 4 slow successes open it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_time_window_forgets_old_calls() {
        let b = CircuitBreaker::new("t", config(SlidingWindow::Time(5)));
        for _ in 0..3 {
            call(&b, CallOutcome::Failure);
        }
        tokio::time::advance(Duration::from_secs(6)).await;
        // The old failures left the window: one new failure is 1 of 1 but
        // below the minimum of 4 calls.
        call(&b, CallOutcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
        for _ in 0..3 {
            call(&b, CallOutcome::Failure);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn operator_modes() {
        let b = CircuitBreaker::new("t", config(SlidingWindow::Count(10)));
        b.force_open(true);
        assert!(!call(&b, CallOutcome::Success));
        b.force_open(false);
        b.disable(true);
        for _ in 0..20 {
            assert!(call(&b, CallOutcome::Failure));
        }
        assert_eq!(b.state(), BreakerState::Disabled);
    }
}
