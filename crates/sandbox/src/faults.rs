//! Fault profiles: seeded, reproducible misbehaviour of the simulators.
//!
//! Every decision is a pure function of `(seed, what it is about, which try)`
//! (see [`roll`]), not of a shared random stream, so a run gives the same
//! faults for the same orders whatever the concurrency or the timing.

use std::time::Duration;

/// A window of time, measured from the simulator's start, during which it
/// answers 503 to everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutageWindow {
    /// Start, ms after the simulator started.
    pub start_ms: u64,
    /// End (exclusive), ms after the simulator started.
    pub end_ms: u64,
}

/// How the simulators misbehave. Rates are probabilities in `0.0..=1.0`;
/// latencies are uniform between their min and max, in ms.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultProfile {
    /// Seed of every roll.
    pub seed: u64,
    /// Card API latency lower bound, ms.
    pub card_latency_min_ms: u64,
    /// Card API latency upper bound, ms.
    pub card_latency_max_ms: u64,
    /// Share of orders the card company declines (`REJECT_CARD_PAYMENT`).
    pub decline_rate: f64,
    /// Share of confirm attempts answered 500
    /// `FAILED_INTERNAL_SYSTEM_PROCESSING` (a transient 5xx) before any
    /// approval happens.
    pub transient_error_rate: f64,
    /// Share of confirm attempts answered 400 `PROVIDER_ERROR` (the card
    /// company's temporary error, which Toss sends as 400, not 5xx) before
    /// any approval happens.
    pub provider_error_rate: f64,
    /// Share of orders approved whose answer is then held for
    /// `drop_hold_ms`, so the client times out without learning it.
    pub drop_response_rate: f64,
    /// How long a dropped answer is held, ms (longer than the client timeout).
    pub drop_hold_ms: u64,
    /// Share of ledger attempts answered 503.
    pub ledger_error_rate: f64,
    /// Ledger latency lower bound, ms.
    pub ledger_latency_min_ms: u64,
    /// Ledger latency upper bound, ms.
    pub ledger_latency_max_ms: u64,
    /// Latency of one transaction-list page, ms.
    pub page_latency_ms: u64,
    /// Card API outage windows.
    pub card_outages: Vec<OutageWindow>,
    /// The old, permissive card simulator: a confirm of an already approved
    /// order under a new idempotency key is approved again (a second charge,
    /// counted in `CardStats::double_charges`) instead of Toss's 400
    /// `ALREADY_PROCESSED_PAYMENT`. Off by default; a test that measures
    /// paygate's own protection against double charges turns it on, so that
    /// the card company's protection does not hide a failure of paygate's.
    pub approve_duplicate_confirms: bool,
    /// Refuse a confirm whose paymentKey was already presented under another
    /// orderId, as the card company does (a paymentKey is one payment at
    /// Toss): 400 `ALREADY_PROCESSED_PAYMENT`, no approval. Off by default,
    /// so a test of paygate's own `PAYMENT_KEY_REUSED` claim can see, at the
    /// simulator, that paygate made no second card call at all.
    pub refuse_reused_payment_keys: bool,
    /// Ledger outage windows.
    pub ledger_outages: Vec<OutageWindow>,
}

impl Default for FaultProfile {
    fn default() -> Self {
        Self::none()
    }
}

impl FaultProfile {
    /// Names accepted by [`FaultProfile::preset`].
    pub const PRESETS: &'static [&'static str] = &["none", "flaky"];

    /// No faults, no latency.
    pub fn none() -> Self {
        Self {
            seed: 42,
            card_latency_min_ms: 0,
            card_latency_max_ms: 0,
            decline_rate: 0.0,
            transient_error_rate: 0.0,
            provider_error_rate: 0.0,
            drop_response_rate: 0.0,
            drop_hold_ms: 30_000,
            ledger_error_rate: 0.0,
            ledger_latency_min_ms: 0,
            ledger_latency_max_ms: 0,
            page_latency_ms: 0,
            card_outages: Vec::new(),
            ledger_outages: Vec::new(),
            approve_duplicate_confirms: false,
            refuse_reused_payment_keys: false,
        }
    }

    /// A bad day at a real PG: 1-20 ms card latency, 5% declines, 5%
    /// transient errors (3% 500 `FAILED_INTERNAL_SYSTEM_PROCESSING`, 2% 400
    /// `PROVIDER_ERROR`, as Toss sends it), 2% approvals whose answer is
    /// lost, 1-10 ms ledger latency with 15% ledger errors.
    pub fn flaky() -> Self {
        Self {
            card_latency_min_ms: 1,
            card_latency_max_ms: 20,
            decline_rate: 0.05,
            transient_error_rate: 0.03,
            provider_error_rate: 0.02,
            drop_response_rate: 0.02,
            ledger_error_rate: 0.15,
            ledger_latency_min_ms: 1,
            ledger_latency_max_ms: 10,
            ..Self::none()
        }
    }

    /// A preset by name (`none`, `flaky`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Self::none()),
            "flaky" => Some(Self::flaky()),
            _ => None,
        }
    }

    /// The same profile with the old, permissive duplicate-confirm behaviour
    /// on or off (see [`FaultProfile::approve_duplicate_confirms`]).
    pub fn with_duplicate_confirms_approved(mut self, approve: bool) -> Self {
        self.approve_duplicate_confirms = approve;
        self
    }

    /// The same profile refusing reused paymentKeys or not (see
    /// [`FaultProfile::refuse_reused_payment_keys`]).
    pub fn with_reused_payment_keys_refused(mut self, refuse: bool) -> Self {
        self.refuse_reused_payment_keys = refuse;
        self
    }

    /// The same profile with another seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub(crate) fn card_latency(&self, key: &str, n: u64) -> Duration {
        latency(
            self.seed,
            key,
            n,
            self.card_latency_min_ms,
            self.card_latency_max_ms,
        )
    }

    pub(crate) fn ledger_latency(&self, key: &str, n: u64) -> Duration {
        latency(
            self.seed,
            key,
            n,
            self.ledger_latency_min_ms,
            self.ledger_latency_max_ms,
        )
    }
}

pub(crate) fn in_outage(windows: &[OutageWindow], since_start_ms: u64) -> bool {
    windows
        .iter()
        .any(|w| (w.start_ms..w.end_ms).contains(&since_start_ms))
}

fn latency(seed: u64, key: &str, n: u64, min: u64, max: u64) -> Duration {
    if max <= min {
        return Duration::from_millis(min);
    }
    let span = (max - min) as f64;
    Duration::from_millis(min + (roll(seed, key, "latency", n) * span) as u64)
}

/// A number in `[0, 1)` determined by `(seed, key, what, n)` alone:
/// FNV-1a over the inputs, finished with SplitMix64.
pub fn roll(seed: u64, key: &str, what: &str, n: u64) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in key
        .bytes()
        .chain([0xff])
        .chain(what.bytes())
        .chain(n.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolls_are_reproducible_and_spread() {
        assert_eq!(
            roll(1, "order-1", "decline", 0),
            roll(1, "order-1", "decline", 0)
        );
        assert_ne!(
            roll(1, "order-1", "decline", 0),
            roll(2, "order-1", "decline", 0)
        );
        let n = 10_000;
        let hits = (0..n)
            .filter(|i| roll(7, &format!("o{i}"), "x", 0) < 0.1)
            .count();
        assert!((800..1200).contains(&hits), "10% rate gave {hits} of {n}");
    }

    #[test]
    fn outage_windows() {
        let w = [OutageWindow {
            start_ms: 100,
            end_ms: 200,
        }];
        assert!(!in_outage(&w, 99));
        assert!(in_outage(&w, 100));
        assert!(!in_outage(&w, 200));
    }
}
