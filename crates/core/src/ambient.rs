//! The process's clock, id randomness and jitter, in one place, so that a
//! deterministic simulation can replace them.
//!
//! Production code reads the wall clock ([`now_ms`]), draws randomness
//! ([`random_u64`], [`random_below`]) and makes ULIDs ([`ulid`]) through
//! these functions. By default they use the system clock and the thread's
//! OS-seeded RNG. The simulation (`crates/simulation`) runs every actor on
//! one current-thread tokio runtime and [`install`]s an [`Ambient`] on that
//! thread: a clock driven by tokio's paused time and an RNG seeded from the
//! history's seed, so one seed replays one history exactly. An override is
//! per thread and removed when its [`Installed`] guard drops; nothing in
//! the shipped binary installs one.

use std::{cell::RefCell, rc::Rc};

use rand::{Rng, RngCore};

/// A source of time and randomness for the current thread.
pub trait Ambient {
    /// Now, epoch milliseconds (UTC).
    fn now_ms(&self) -> i64;
    /// 64 random bits.
    fn next_u64(&self) -> u64;
}

thread_local! {
    static OVERRIDE: RefCell<Option<Rc<dyn Ambient>>> = const { RefCell::new(None) };
}

/// Removes the override it installed when dropped.
#[must_use = "the override is removed when this guard drops"]
pub struct Installed(());

impl Drop for Installed {
    fn drop(&mut self) {
        OVERRIDE.with(|o| *o.borrow_mut() = None);
    }
}

/// Makes `ambient` this thread's clock and randomness until the guard drops.
pub fn install(ambient: Rc<dyn Ambient>) -> Installed {
    OVERRIDE.with(|o| *o.borrow_mut() = Some(ambient));
    Installed(())
}

fn overridden() -> Option<Rc<dyn Ambient>> {
    OVERRIDE.with(|o| o.borrow().clone())
}

/// Now, epoch milliseconds (UTC): the system clock, or this thread's override.
pub fn now_ms() -> i64 {
    match overridden() {
        Some(a) => a.now_ms(),
        None => {
            let now = ::time::OffsetDateTime::now_utc();
            (now.unix_timestamp_nanos() / 1_000_000) as i64
        }
    }
}

/// 64 random bits: the thread's RNG, or this thread's override.
pub fn random_u64() -> u64 {
    match overridden() {
        Some(a) => a.next_u64(),
        None => rand::rng().next_u64(),
    }
}

/// A uniform draw from `0..=max` (used for backoff jitter).
pub fn random_up_to(max: u64) -> u64 {
    match overridden() {
        Some(a) => match max.checked_add(1) {
            Some(n) => a.next_u64() % n,
            None => a.next_u64(),
        },
        None => rand::rng().random_range(0..=max),
    }
}

/// A uniform draw from `0..n` (`0` when `n` is 0).
pub fn random_below(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    random_up_to(n - 1)
}

/// A new ULID from [`now_ms`] and [`random_u64`].
pub fn ulid() -> ulid::Ulid {
    let ms = u64::try_from(now_ms()).unwrap_or(0);
    let random = (u128::from(random_u64()) << 64) | u128::from(random_u64());
    ulid::Ulid::from_parts(ms, random)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    struct Fixed(Cell<u64>);

    impl Ambient for Fixed {
        fn now_ms(&self) -> i64 {
            1_700_000_000_000
        }
        fn next_u64(&self) -> u64 {
            self.0.set(self.0.get() + 1);
            self.0.get()
        }
    }

    #[test]
    fn an_override_replays_and_is_removed_with_its_guard() {
        let run = || {
            let _g = install(Rc::new(Fixed(Cell::new(0))));
            (now_ms(), ulid(), random_up_to(9))
        };
        assert_eq!(run(), run(), "one override, one history");
        assert_eq!(run().0, 1_700_000_000_000);
        assert!(
            now_ms() > 1_700_000_000_000 + 10_000_000,
            "the system clock is back"
        );
    }
}
