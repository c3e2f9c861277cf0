//! Outbound rate limit per downstream with `governor` (GCRA): a call waits
//! for a slot at most `max_wait`, then is refused with [`RateLimited`] (the
//! breaker ignores such refusals; nothing was sent).

use std::{
    future::Future,
    num::NonZeroU32,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tower::{BoxError, Layer, Service, ServiceExt};

/// No slot within the allowed wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("outbound rate limit reached")]
pub struct RateLimited;

/// A GCRA limiter with a bounded wait.
#[derive(Debug)]
pub struct Limiter {
    name: &'static str,
    limiter: DefaultDirectRateLimiter,
    max_wait: Duration,
}

impl Limiter {
    /// `per_second` calls per second with bursts of `burst`, waiting at most `max_wait`.
    pub fn new(
        name: &'static str,
        per_second: NonZeroU32,
        burst: NonZeroU32,
        max_wait: Duration,
    ) -> Self {
        Self {
            name,
            limiter: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            max_wait,
        }
    }

    /// Waits for a slot.
    ///
    /// # Errors
    /// [`RateLimited`] when none comes within `max_wait`.
    pub async fn acquire(&self) -> Result<(), RateLimited> {
        if self.limiter.check().is_ok() {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(self.max_wait, self.limiter.until_ready()).await {
            Ok(()) => {
                metrics::histogram!("paygate_rate_limit_wait_seconds", "downstream" => self.name)
                    .record(started.elapsed().as_secs_f64());
                Ok(())
            }
            Err(_) => {
                tracing::warn!(
                    downstream = self.name,
                    "outbound rate limit: no slot in time"
                );
                metrics::counter!("paygate_rate_limit_rejections_total", "downstream" => self.name)
                    .increment(1);
                Err(RateLimited)
            }
        }
    }
}

/// Tower layer applying a shared [`Limiter`].
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limiter: std::sync::Arc<Limiter>,
}

impl RateLimitLayer {
    /// A layer over `limiter`.
    pub fn new(limiter: std::sync::Arc<Limiter>) -> Self {
        Self { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`]. It readies the inner service only
/// after a slot is granted, so a waiting call holds no bulkhead permit.
#[derive(Clone, Debug)]
pub struct RateLimitService<S> {
    inner: S,
    limiter: std::sync::Arc<Limiter>,
}

impl<S, Req> Service<Req> for RateLimitService<S>
where
    S: Service<Req, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = self.inner.clone();
        let limiter = self.limiter.clone();
        Box::pin(async move {
            limiter.acquire().await?;
            inner.oneshot(req).await
        })
    }
}
