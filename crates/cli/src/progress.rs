//! Showing a long run's [`Progress`]: on a terminal (stderr is a TTY), a
//! live `indicatif` bar with done of total (when known), rate and ETA; when
//! stderr is not a terminal (a pipe, a file, a Kubernetes log), a `progress`
//! log line every few seconds instead, which log collectors keep and a bar's
//! carriage returns would garble. stdout stays the job's summary alone.

use std::{io::IsTerminal, sync::Arc, time::Duration};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use paygate_batch::{Progress, Snapshot};
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};

/// What a run counts, for the display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Units {
    /// A sweep: records of `realtime_payments`.
    Records,
    /// A reconciliation: slices of the window (and pages, transactions).
    Slices,
}

impl Units {
    fn name(self) -> &'static str {
        match self {
            Self::Records => "records",
            Self::Slices => "slices",
        }
    }
}

/// A running display; [`Reporter::finish`] stops it.
pub struct Reporter {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Starts showing `progress`: a bar when stderr is a terminal, else a
    /// log line every `every`.
    pub fn start(progress: Arc<Progress>, units: Units, every: Duration) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = if std::io::stderr().is_terminal() {
            tokio::spawn(bar(progress, units, stopped))
        } else {
            tokio::spawn(log_lines(progress, units, every, stopped))
        };
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the display (the bar is left at its final state).
    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// `120/400 records`, or `120 records` with no total; a reconciliation adds
/// its pages and transactions.
fn counts(s: &Snapshot, units: Units) -> String {
    let done = match s.total {
        Some(t) => format!("{}/{} {}", s.done, t, units.name()),
        None => format!("{} {}", s.done, units.name()),
    };
    match units {
        Units::Records => done,
        Units::Slices => format!("{done}, {} pages, {} transactions", s.pages, s.items),
    }
}

/// Units per second since the start, and the time left at that rate.
fn rate_and_eta(s: &Snapshot, units: Units, elapsed: Duration) -> (f64, Option<Duration>) {
    let secs = elapsed.as_secs_f64().max(0.001);
    let shown = match units {
        Units::Records => s.done,
        Units::Slices => s.items,
    };
    let rate = shown as f64 / secs;
    let eta = s.total.and_then(|t| {
        (s.done > 0).then(|| {
            let left = t.saturating_sub(s.done) as f64;
            Duration::from_secs_f64(left * secs / s.done as f64)
        })
    });
    (rate, eta)
}

/// One log line's text.
pub(crate) fn line(s: &Snapshot, units: Units, elapsed: Duration) -> String {
    let (rate, eta) = rate_and_eta(s, units, elapsed);
    let per = match units {
        Units::Records => "records/s",
        Units::Slices => "transactions/s",
    };
    let eta = eta.map_or("unknown".to_owned(), |d| {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    });
    format!(
        "{} | {rate:.1} {per} | elapsed {} | eta {eta}",
        counts(s, units),
        humantime::format_duration(Duration::from_secs(elapsed.as_secs()))
    )
}

async fn log_lines(
    progress: Arc<Progress>,
    units: Units,
    every: Duration,
    mut stopped: oneshot::Receiver<()>,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval_at(started + every, every);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = tick.tick() => {
                let text = line(&progress.snapshot(), units, started.elapsed());
                tracing::info!(target: "paygate::progress", "progress: {text}");
            }
        }
    }
    let text = line(&progress.snapshot(), units, started.elapsed());
    tracing::info!(target: "paygate::progress", "progress: finished: {text}");
}

async fn bar(progress: Arc<Progress>, units: Units, mut stopped: oneshot::Receiver<()>) {
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let style = |known: bool| {
        let template = if known {
            "{spinner} {elapsed_precise} [{bar:20}] {msg} eta {eta}"
        } else {
            "{spinner} {elapsed_precise} {msg}"
        };
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .progress_chars("=> ")
    };
    pb.set_style(style(false));
    let started = Instant::now();
    let mut known = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut update = |pb: &ProgressBar| {
        let s = progress.snapshot();
        if let (Some(t), false) = (s.total, known) {
            known = true;
            pb.set_length(t);
            pb.set_style(style(true));
        }
        if let Some(t) = s.total {
            pb.set_length(t);
        }
        pb.set_position(s.done);
        let (rate, _) = rate_and_eta(&s, units, started.elapsed());
        let per = match units {
            Units::Records => "records/s",
            Units::Slices => "tx/s",
        };
        pb.set_message(format!("{} | {rate:.1} {per}", counts(&s, units)));
        pb.tick();
    };
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = tick.tick() => update(&pb),
        }
    }
    update(&pb);
    pb.abandon();
    // The summary that follows starts on a line of its own.
    eprintln!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_done_of_total_rate_and_eta() {
        let s = Snapshot {
            done: 50,
            total: Some(200),
            pages: 0,
            items: 0,
        };
        let l = line(&s, Units::Records, Duration::from_secs(10));
        assert_eq!(
            l, "50/200 records | 5.0 records/s | elapsed 10s | eta 30s",
            "{l}"
        );
        let s = Snapshot {
            done: 1,
            total: Some(4),
            pages: 3,
            items: 3000,
        };
        let l = line(&s, Units::Slices, Duration::from_secs(2));
        assert!(
            l.starts_with("1/4 slices, 3 pages, 3000 transactions | 1500.0 transactions/s"),
            "{l}"
        );
        let unknown = line(&Snapshot::default(), Units::Records, Duration::ZERO);
        assert!(unknown.ends_with("eta unknown"), "{unknown}");
    }
}
