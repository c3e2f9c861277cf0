//! The clock a process decides by, passed to what decides by time.
//!
//! The saga, the settler, the sweeper, the reconciler and the stores each
//! hold a [`Clock`] instead of reading the time themselves, so that two
//! processes in one simulation can disagree about the time as two replicas
//! on two machines do (the simulation gives each replica a clock offset by a
//! drawn skew, which may step backwards). No guard compares one process's
//! clock with another's stamp: transitions are guarded on versions; a clock
//! only measures ages and stamps what it writes.

use std::{fmt, sync::Arc};

/// "Now", epoch milliseconds (UTC). Cheap to clone.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    /// The process's own clock: the wall clock, or the simulation's thread
    /// clock where one is installed ([`crate::ambient`]).
    pub fn system() -> Self {
        Self(Arc::new(crate::ambient::now_ms))
    }

    /// A clock that reads `now` (epoch ms) on every call.
    pub fn from_fn(now: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    /// Now, epoch milliseconds (UTC).
    pub fn now_ms(&self) -> i64 {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Clock").field(&self.now_ms()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_reads_its_source_on_every_call() {
        let t = Arc::new(std::sync::atomic::AtomicI64::new(5));
        let source = t.clone();
        let clock = Clock::from_fn(move || source.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(clock.now_ms(), 5);
        t.store(3, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(clock.clone().now_ms(), 3, "a clock may step backwards");
    }
}
