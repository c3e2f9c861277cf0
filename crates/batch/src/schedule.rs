//! The stable interval of the sidecar jobs' `--every` (`paygate batch`,
//! `paygate reconcile`): a run starts no sooner than the interval after the
//! previous run *started*, runs never overlap, and a run that took longer
//! than the interval is followed at once by the next (no burst of missed
//! runs to catch up, and no drift from the runs' own duration).

use std::{future::Future, time::Duration};

use tokio::time::Instant;

/// Runs `job` now and then every `interval`, until `shutdown` completes.
/// A shutdown during a run lets that run finish (it may be moving money)
/// and then returns. Returns how many runs started.
pub async fn every<F, Fut, S>(interval: Duration, shutdown: S, mut job: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
    S: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let mut runs = 0;
    let mut next = Instant::now();
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return runs,
            () = tokio::time::sleep_until(next) => {}
        }
        let started = Instant::now();
        next = started + interval;
        runs += 1;
        // Awaited in place: the next run cannot begin before this one ends.
        let run = job();
        tokio::pin!(run);
        tokio::select! {
            () = &mut run => {}
            () = &mut shutdown => {
                run.await;
                return runs;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    };

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_long_run_is_followed_at_once_and_runs_never_overlap() {
        let t0 = Instant::now();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop_tx = Mutex::new(Some(stop_tx));
        // Run 1 takes 25 s, later runs 1 s, with a 10 s interval.
        let durations = [25, 1, 1, 1];
        let runs = every(
            Duration::from_secs(10),
            async {
                let _ = stop_rx.await;
            },
            || {
                let (starts, in_flight, max_in_flight) =
                    (starts.clone(), in_flight.clone(), max_in_flight.clone());
                let n = {
                    let mut s = starts.lock().unwrap();
                    s.push(t0.elapsed().as_secs());
                    s.len()
                };
                if n == durations.len() {
                    if let Some(tx) = stop_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                }
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max_in_flight.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(durations[n - 1])).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            },
        )
        .await;
        assert_eq!(runs, 4);
        // 0: first run; 25: right after the long run (no wait, no catch-up
        // burst); then every 10 s from each start.
        assert_eq!(*starts.lock().unwrap(), vec![0, 25, 35, 45]);
        assert_eq!(max_in_flight.load(Ordering::SeqCst), 1, "never two at once");
        // The shutdown came during run 4, which was allowed to finish.
        assert_eq!(in_flight.load(Ordering::SeqCst), 0);
        assert_eq!(t0.elapsed().as_secs(), 46);
    }

    #[tokio::test(start_paused = true)]
    async fn short_runs_start_on_the_interval_from_each_start() {
        let t0 = Instant::now();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let runs = every(
            Duration::from_secs(10),
            tokio::time::sleep(Duration::from_secs(35)),
            || {
                starts.lock().unwrap().push(t0.elapsed().as_secs());
                tokio::time::sleep(Duration::from_secs(3))
            },
        )
        .await;
        assert_eq!(runs, 4);
        assert_eq!(*starts.lock().unwrap(), vec![0, 10, 20, 30]);
    }
}
