//! When a payment whose card outcome is not known (`PENDING` past its
//! in-flight window, or `UNKNOWN`) is looked up again. Each lookup that
//! learns nothing is counted on the record (`batch_attempts`, by
//! [`paygate_state_store::Transition::CheckedUnknown`]) and the next one
//! waits longer, as Kill Bill's Janitor re-polls an unknown payment (5 min,
//! 1 h, 1 d): a payment the card company never saw is looked up, and its
//! "outcome unknown" line logged, once per step of the schedule, not once
//! per sweep, by whichever process (the batch, `serve`'s janitor) finds it
//! due.

use std::time::Duration;

use paygate_core::PaymentRecord;

/// The wait before each lookup of an undecided payment, by the number of
/// lookups that learned nothing so far (`batch_attempts`): none yet, at
/// once (after the caller's own grace); then `first`, four times longer at
/// each further one, at most `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecheckSchedule {
    /// The wait after the first lookup that learned nothing.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl RecheckSchedule {
    /// Every sweep looks every undecided payment up (no wait): for a pass
    /// that must settle what it can now (an operator's `payments recheck`,
    /// the simulation's sweeps, the tests).
    pub const EVERY_SWEEP: Self = Self {
        first: Duration::ZERO,
        max: Duration::ZERO,
    };

    /// `first` 1 min, `max` 1 h (1, 4, 16 and 64 → 60 min).
    pub const DEFAULT: Self = Self {
        first: Duration::from_secs(60),
        max: Duration::from_secs(3_600),
    };

    /// The wait after `checks` lookups that learned nothing.
    pub fn wait_after(&self, checks: i64) -> Duration {
        if checks <= 0 {
            return Duration::ZERO;
        }
        let factor = 4u32.saturating_pow(u32::try_from(checks - 1).unwrap_or(u32::MAX));
        self.first.saturating_mul(factor).min(self.max)
    }

    /// Whether `r`'s next lookup is due at `now_ms` (epoch ms, the caller's
    /// clock against the record's `updated_at`, which the last check
    /// stamped).
    pub fn due(&self, r: &PaymentRecord, now_ms: i64) -> bool {
        let wait = i64::try_from(self.wait_after(r.batch_attempts).as_millis()).unwrap_or(i64::MAX);
        r.updated_at.saturating_add(wait) <= now_ms
    }
}

impl Default for RecheckSchedule {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_four_times_per_check_up_to_its_bound() {
        let s = RecheckSchedule::DEFAULT;
        let mins: Vec<u64> = (0..7).map(|n| s.wait_after(n).as_secs() / 60).collect();
        assert_eq!(mins, vec![0, 1, 4, 16, 60, 60, 60]);
        assert_eq!(s.wait_after(i64::MAX), Duration::from_secs(3_600));
        assert_eq!(RecheckSchedule::EVERY_SWEEP.wait_after(9), Duration::ZERO);
    }

    #[test]
    fn a_record_is_due_once_its_wait_has_passed_since_its_last_check() {
        let mut r = PaymentRecord::new_pending(
            paygate_core::MerchantId::from_stored("mer_1"),
            paygate_core::OrderId::parse("order-1").unwrap(),
            "pk".into(),
            1_000,
            "KRW".into(),
            "fp".into(),
            None,
            10_000,
        );
        let s = RecheckSchedule::DEFAULT;
        assert!(s.due(&r, 10_000), "never checked: due at once");
        r.batch_attempts = 2;
        assert!(!s.due(&r, 10_000 + 239_999));
        assert!(s.due(&r, 10_000 + 240_000), "4 min after the second check");
    }
}
