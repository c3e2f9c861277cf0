//! Progress of a long run (a sweep, a reconciliation), shared between the
//! job that advances it and whoever shows it (`paygate batch --once` and
//! `paygate reconcile` draw a bar on a terminal, or log a line every few
//! seconds). Plain atomics: advancing costs nothing when nobody looks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters of one run. `done` of `total` units (records of a sweep, slices
/// of a reconciliation's window), plus the pages and items (transactions)
/// a reconciliation has fetched.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    known: AtomicBool,
    pages: AtomicU64,
    items: AtomicU64,
}

/// A reading of [`Progress`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Units done.
    pub done: u64,
    /// Units in all, when known.
    pub total: Option<u64>,
    /// Pages fetched (reconciliation).
    pub pages: u64,
    /// Items fetched (reconciliation: transactions).
    pub items: u64,
}

impl Progress {
    /// Sets how many units the run has in all.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.known.store(true, Ordering::Relaxed);
    }

    /// `n` more units done.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// One more page of `items` items fetched.
    pub fn page(&self, items: u64) {
        self.pages.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(items, Ordering::Relaxed);
    }

    /// The counters now. `total` is never below `done` (a sweep's count
    /// is read before records arrive while it runs).
    pub fn snapshot(&self) -> Snapshot {
        let done = self.done.load(Ordering::Relaxed);
        Snapshot {
            done,
            total: self
                .known
                .load(Ordering::Relaxed)
                .then(|| self.total.load(Ordering::Relaxed).max(done)),
            pages: self.pages.load(Ordering::Relaxed),
            items: self.items.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_an_unknown_total() {
        let p = Progress::default();
        p.advance(2);
        p.page(100);
        assert_eq!(
            p.snapshot(),
            Snapshot {
                done: 2,
                total: None,
                pages: 1,
                items: 100
            }
        );
        p.set_total(1);
        assert_eq!(p.snapshot().total, Some(2), "never below done");
    }
}
