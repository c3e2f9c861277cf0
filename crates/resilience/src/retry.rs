//! [`BudgetedRetry`]: the `tower::retry` policy of every downstream.
//!
//! A failed attempt is retried only when all hold: the call is idempotent
//! (paygate's downstream calls carry `Idempotency-Key = payment_id`), the
//! error class says a retry may help (never for a breaker, bulkhead or
//! rate-limit refusal), attempts remain, and the shared retry budget
//! (`tower`'s `TpsBudget`) allows one more. The delay is exponential backoff
//! (`backon`) with full jitter, and never shorter than the downstream's
//! `Retry-After`.

use std::{pin::Pin, sync::Arc, time::Duration};

use backon::BackoffBuilder;
use tower::{
    retry::budget::{Budget, TpsBudget},
    BoxError,
};

use crate::{Attempt, ErrorClass};

/// The retry policy; one per call (its state is the attempt count).
pub struct BudgetedRetry<C> {
    name: &'static str,
    budget: Arc<TpsBudget>,
    max_attempts: u32,
    base: Duration,
    max: Duration,
    classify: Arc<C>,
}

impl<C> Clone for BudgetedRetry<C> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            budget: self.budget.clone(),
            max_attempts: self.max_attempts,
            base: self.base,
            max: self.max,
            classify: self.classify.clone(),
        }
    }
}

impl<C> BudgetedRetry<C> {
    /// A policy for `name` drawing on `budget`, at most `max_attempts`
    /// attempts, backoff from `base` doubling up to `max`.
    pub fn new(
        name: &'static str,
        budget: Arc<TpsBudget>,
        max_attempts: u32,
        base: Duration,
        max: Duration,
        classify: C,
    ) -> Self {
        Self {
            name,
            budget,
            max_attempts,
            base,
            max,
            classify: Arc::new(classify),
        }
    }
}

/// The backoff before attempt `next` (2, 3, ...): exponential from `base`,
/// capped at `max`, with full jitter (uniform in `[0, backoff]`).
pub fn full_jitter_backoff(base: Duration, max: Duration, next: u32) -> Duration {
    let exp = backon::ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(max)
        .without_max_times()
        .build()
        .nth(next.saturating_sub(2) as usize)
        .unwrap_or(max);
    let ms = exp.as_millis() as u64;
    Duration::from_millis(paygate_core::ambient::random_up_to(ms))
}

impl<C, F, Res> tower::retry::Policy<Attempt<F>, Res, BoxError> for BudgetedRetry<C>
where
    C: Fn(&BoxError) -> ErrorClass,
{
    type Future = Pin<Box<tokio::time::Sleep>>;

    fn retry(
        &mut self,
        req: &mut Attempt<F>,
        result: &mut Result<Res, BoxError>,
    ) -> Option<Self::Future> {
        let Err(e) = result else { return None };
        if !req.idempotent || req.number >= self.max_attempts {
            return None;
        }
        let class = (self.classify)(e);
        if !class.retryable {
            return None;
        }
        if !self.budget.withdraw() {
            tracing::warn!(
                downstream = self.name,
                attempt = req.number,
                "retry budget exhausted; not retrying"
            );
            metrics::counter!("paygate_retry_budget_exhausted_total", "downstream" => self.name)
                .increment(1);
            return None;
        }
        req.number += 1;
        let mut delay = full_jitter_backoff(self.base, self.max, req.number);
        if let Some(after) = class.retry_after {
            delay = delay.max(after);
        }
        tracing::info!(downstream = self.name, attempt = req.number, delay_ms = delay.as_millis() as u64, error = %e, "retrying");
        metrics::counter!("paygate_retries_total", "downstream" => self.name).increment(1);
        Some(Box::pin(tokio::time::sleep(delay)))
    }

    fn clone_request(&mut self, req: &Attempt<F>) -> Option<Attempt<F>> {
        Some(req.clone())
    }
}
