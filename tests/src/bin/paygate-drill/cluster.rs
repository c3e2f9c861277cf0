//! The processes of a drill: `paygate sim`, the `paygate serve` replicas
//! (each on one loopback port for the whole drill, so a merchant's list of
//! addresses stays valid across restarts), the one-shot commands (`migrate`,
//! `batch`, `reconcile`, `check`, `payments list`, `alerts list`), and the
//! record of when each replica was down, which the transport-error check
//! reads.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{mpsc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use paygate_e2e::KillOnDrop;

/// How long a replica may take to listen: its database open retries for up
/// to a minute (`paygate_payments::wiring::DATABASE_OPEN_WAIT`).
const START_WAIT: Duration = Duration::from_secs(90);

/// How a replica is stopped.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// SIGKILL: no drain, no flush, mid-whatever it was doing.
    Kill,
    /// SIGTERM: the graceful shutdown (drain in-flight requests).
    Term,
}

/// A span during which a replica did not serve: from the moment the signal
/// was sent to the moment its restart listened (`None`: still down).
#[derive(Clone, Copy, Debug)]
pub struct Down {
    /// The replica's index.
    pub replica: usize,
    /// When the signal was sent.
    pub from: Instant,
    /// When the restart listened.
    pub to: Option<Instant>,
}

/// The drill's processes and their environment.
pub struct Cluster {
    bin: PathBuf,
    env: Vec<(String, String)>,
    work: PathBuf,
    /// Each replica's port, fixed for the drill: read without a lock, so a
    /// merchant never waits on a replica being stopped.
    ports: Vec<u16>,
    replicas: Vec<Mutex<Option<KillOnDrop>>>,
    downs: Mutex<Vec<Down>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `bin` with no inherited `PAYGATE_*` variable (the drill sets its own).
fn clean(bin: &Path) -> Command {
    let mut c = paygate_e2e::command_at(bin);
    c.env("RUST_LOG", "info,sqlx=warn");
    c
}

fn append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Reads a child's output into `log` and says once a line containing
/// `ready` appeared.
fn drain(
    out: impl std::io::Read + Send + 'static,
    mut log: File,
    ready: &'static str,
) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "{line}");
            if line.contains(ready) {
                let _ = tx.send(());
            }
        }
    });
    rx
}

/// Starts `paygate sim` (flaky faults, duplicate confirms approved so an
/// attempted double charge would show as a second approval) on free ports;
/// returns it with its (card, ledger) URLs.
pub fn start_sim(
    bin: &Path,
    seed: u64,
    work: &Path,
) -> anyhow::Result<(KillOnDrop, String, String)> {
    let (card, ledger) = (paygate_e2e::try_free_port()?, paygate_e2e::try_free_port()?);
    let mut child = clean(bin)
        .args(["sim", "--faults", "flaky", "--approve-duplicate-confirms"])
        .args(["--seed", &seed.to_string()])
        .args(["--card-port", &card.to_string()])
        .args(["--ledger-port", &ledger.to_string()])
        .stdout(Stdio::piped())
        .stderr(append(&work.join("sim.log"))?)
        .spawn()
        .context("starting paygate sim")?;
    let out = child.stdout.take().context("sim stdout")?;
    let child = KillOnDrop(child);
    let ready = drain(out, append(&work.join("sim.log"))?, "ledger simulator:");
    ready
        .recv_timeout(Duration::from_secs(30))
        .context("paygate sim did not start (see sim.log)")?;
    Ok((
        child,
        format!("http://127.0.0.1:{card}"),
        format!("http://127.0.0.1:{ledger}"),
    ))
}

impl Cluster {
    /// `replicas` replicas of `bin serve` with `env`, not started yet; logs
    /// go to `work`.
    pub fn new(
        bin: PathBuf,
        env: Vec<(String, String)>,
        work: PathBuf,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let ports = (0..replicas)
            .map(|_| paygate_e2e::try_free_port())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            bin,
            env,
            work,
            replicas: ports.iter().map(|_| Mutex::new(None)).collect(),
            ports,
            downs: Mutex::new(Vec::new()),
        })
    }

    /// How many replicas there are.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Replica `i`'s base URL.
    pub fn base(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    /// Runs `paygate ARGS` to its end with the drill's environment; its
    /// stderr is appended to `commands.log`.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut log = append(&self.work.join("commands.log"))?;
        let out = clean(&self.bin)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .with_context(|| format!("running paygate {args:?}"))?;
        let _ = writeln!(log, "== paygate {} -> {}", args.join(" "), out.status);
        let _ = log.write_all(&out.stderr);
        Ok(out)
    }

    /// Like [`Cluster::run`], failing unless it exits 0; returns stdout.
    pub fn run_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "paygate {args:?} exited {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts replica `i` (when it is not running) and waits until it listens.
    pub fn start(&self, i: usize) -> anyhow::Result<()> {
        let mut r = lock(&self.replicas[i]);
        if r.is_some() {
            return Ok(());
        }
        let mut child = clean(&self.bin)
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("PAYGATE_LISTEN", format!("127.0.0.1:{}", self.ports[i]))
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("starting paygate serve")?;
        let err = child.stderr.take().context("serve stderr")?;
        let mut child = KillOnDrop(child);
        let ready = drain(
            err,
            append(&self.work.join(format!("replica-{i}.log")))?,
            "paygate listening",
        );
        let deadline = Instant::now() + START_WAIT;
        loop {
            match ready.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Some(status) = child.0.try_wait()? {
                        bail!(
                            "replica {i} exited before it listened ({status}; see replica-{i}.log)"
                        );
                    }
                }
                Err(_) => {
                    bail!("replica {i} did not listen within {START_WAIT:?} (see replica-{i}.log)")
                }
            }
        }
        *r = Some(child);
        let now = Instant::now();
        for d in lock(&self.downs).iter_mut() {
            if d.replica == i && d.to.is_none() {
                d.to = Some(now);
            }
        }
        Ok(())
    }

    /// Stops replica `i` (when it runs) and waits until it has exited; the
    /// down span starts before the signal is sent.
    pub fn stop(&self, i: usize, how: Stop) -> anyhow::Result<()> {
        let mut r = lock(&self.replicas[i]);
        let Some(mut child) = r.take() else {
            return Ok(());
        };
        lock(&self.downs).push(Down {
            replica: i,
            from: Instant::now(),
            to: None,
        });
        match how {
            Stop::Kill => child.0.kill()?,
            Stop::Term => {
                Command::new("kill")
                    .args(["-TERM", &child.0.id().to_string()])
                    .status()
                    .context("sending SIGTERM")?;
            }
        }
        child.0.wait()?;
        Ok(())
    }

    /// Starts every replica that is not running.
    pub fn start_all(&self) -> anyhow::Result<()> {
        (0..self.len()).try_for_each(|i| self.start(i))
    }

    /// Stops every replica gracefully.
    pub fn stop_all(&self) -> anyhow::Result<()> {
        (0..self.len()).try_for_each(|i| self.stop(i, Stop::Term))
    }

    /// Every down span so far.
    pub fn downs(&self) -> Vec<Down> {
        lock(&self.downs).clone()
    }
}
