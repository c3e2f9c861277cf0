//! The history's one source of randomness: a seeded `StdRng` shared by the
//! workload, the fault injectors and the downstream models, and installed
//! as paygate's ambient clock and randomness (`paygate_core::ambient`), so
//! one seed is one history.

use std::sync::{Arc, Mutex};

use rand::{rngs::StdRng, Rng as _, RngCore, SeedableRng};

/// The shared seeded RNG (cheap to clone).
#[derive(Clone)]
pub struct SimRng(Arc<Mutex<StdRng>>);

impl SimRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(StdRng::seed_from_u64(seed))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// True with probability `p`.
    pub fn chance(&self, p: f64) -> bool {
        self.with(|r| r.random::<f64>() < p)
    }

    /// A uniform draw from `lo..=hi`.
    pub fn between(&self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        self.with(|r| r.random_range(lo..=hi))
    }

    /// 64 random bits.
    pub fn next_u64(&self) -> u64 {
        self.with(|r| r.next_u64())
    }

    /// A uniform pick among `n` choices.
    pub fn pick(&self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        self.with(|r| r.random_range(0..n))
    }
}
