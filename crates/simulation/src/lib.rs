//! paygate-simulation: a deterministic simulation of every actor that can
//! touch a payment, with an invariant checker after every history.
//!
//! One seed is one history, replayed exactly: every actor runs on one
//! current-thread tokio runtime with paused time, the state store, the
//! request log, the alert outbox and the leases live in memory, the card
//! company and the ledger are in-memory models, and paygate's own clock,
//! ids and jitter come from the seed (`paygate_core::ambient`). The code
//! under test is the real code: the saga of `paygate-payments`, the batch
//! sweep of `paygate-batch` and the reconciliation of `paygate-reconcile`.
//!
//! A history: merchants confirm and retry ([`workload`]) at one to three
//! gateway replicas over the same stores ([`gateway`]), which crash and
//! restart and, with several replicas, stall for seconds and carry on
//! (a merchant then gives up and retries elsewhere); batch sweeps and
//! reconciliations run on their own schedules and are sometimes killed,
//! or with several replicas stalled, mid-run; the card
//! company and the ledger misbehave ([`card`], [`ledger`]); the store and
//! the log fail writes in windows ([`faults`]). Then every fault is healed,
//! the batch and the reconciliation run to completion, and [`checker`]
//! checks I1, I2, I4 and the partitions; [`holds`] adds stock holds to the
//! workload and checks I7 in every history.
//!
//! Layout, after TigerBeetle's VOPR: [`options`] (knobs from the seed),
//! [`workload`], [`faults`], [`world`] (what survives a crash),
//! [`checker`].

pub mod cancels;
pub mod card;
pub mod checker;
pub mod events;
pub mod faults;
pub mod gateway;
pub mod holds;
pub mod inventory;
pub mod ledger;
pub mod operator;
pub mod options;
pub mod rng;
pub mod store;
pub mod workload;
pub mod world;

use std::{rc::Rc, time::Duration};

use paygate_core::{ambient::Ambient, MerchantId};

pub use checker::Violation;
pub use options::Options;
pub use store::StoreMode;

use crate::{
    gateway::Gateway,
    rng::SimRng,
    store::{RealStore, SimStore},
    world::World,
};

/// The next number of the history's causal order of events that the
/// checker compares (a confirm arriving at the card company, an answer
/// given): in memory no simulated time passes between two awaits, so two
/// events one after the other can share a millisecond, and "at or before"
/// by the clock would call a retry that was sent after a 503 a charge
/// before it. One counter for the process: a history runs on one thread,
/// so its own events are numbered in the order they happen.
pub fn next_event() -> u64 {
    static EVENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    EVENTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
}

/// Epoch of every history: 2026-01-01T00:00:00Z, ms.
pub const EPOCH_MS: i64 = 1_767_225_600_000;

/// How long the faulty part of a history lasts, ms (simulated).
const HISTORY_MS: u64 = 45_000;

/// What one history did and broke.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The options drawn from it.
    pub options: Options,
    /// Approvals the card company gave.
    pub approvals: usize,
    /// Answers merchants got.
    pub answers: usize,
    /// Refunds the card company made (merchants' cancels and the
    /// reconciliation's cancels of orphan approvals).
    pub refunds: usize,
    /// Cancel answers merchants got.
    pub cancel_answers: usize,
    /// Gateway crashes.
    pub crashes: u32,
    /// Broken invariants (empty: the history passed).
    pub violations: Vec<Violation>,
    /// A digest of the whole final state and every answer: equal for two
    /// runs of one seed (the history replays exactly).
    pub digest: u64,
}

/// The clock of a history: the epoch plus tokio's (paused) time since the
/// start; its randomness: the history's RNG.
struct SimAmbient {
    start: tokio::time::Instant,
    rng: SimRng,
}

impl Ambient for SimAmbient {
    fn now_ms(&self) -> i64 {
        EPOCH_MS + self.start.elapsed().as_millis() as i64
    }
    fn next_u64(&self) -> u64 {
        self.rng.next_u64()
    }
}

/// Runs the history of `seed` on the in-memory store and checks it.
///
/// # Errors
/// An I/O error when the runtime cannot be built.
pub fn run_seed(seed: u64) -> std::io::Result<Report> {
    run_seed_on(seed, &StoreMode::Memory)
}

/// Runs the history of `seed` on the state store of `mode` and checks it.
/// On a real backend the history gets a fresh database of its own, dropped
/// after the check, and is not replayed bit for bit (see [`store`]).
///
/// # Errors
/// An I/O error when the runtime cannot be built or the backend cannot be
/// set up.
pub fn run_seed_on(seed: u64, mode: &StoreMode) -> std::io::Result<Report> {
    run_seed_with(seed, mode, None)
}

/// [`run_seed_on`] with the number of gateway replicas forced to
/// `replicas` (1-3; `None`: drawn from the seed).
///
/// # Errors
/// As [`run_seed_on`].
pub fn run_seed_with(
    seed: u64,
    mode: &StoreMode,
    replicas: Option<usize>,
) -> std::io::Result<Report> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    if *mode == StoreMode::Memory {
        builder.enable_time();
    } else {
        // The drivers need the I/O driver.
        builder.enable_all();
    }
    let rt = builder.start_paused(true).build()?;
    // One thread: every actor is a local task, so no future has to be Send.
    rt.block_on(tokio::task::LocalSet::new().run_until(async {
        let real = RealStore::open(mode, seed)
            .await
            .map_err(|e| std::io::Error::other(format!("{} store: {e}", mode.name())))?;
        let store: std::sync::Arc<dyn SimStore> = match real {
            Some(real) => std::sync::Arc::new(real),
            None => World::memory_store(),
        };
        let report = history(seed, store.clone(), *mode != StoreMode::Memory, replicas).await;
        store.teardown().await;
        Ok(report)
    }))
}

/// One history; `real`: the store is a real backend (the borrowed-key
/// quirk of [`workload::orders`] is on); `replicas`: forced count.
async fn history(
    seed: u64,
    store: std::sync::Arc<dyn SimStore>,
    real: bool,
    replicas: Option<usize>,
) -> Report {
    let rng = SimRng::new(seed);
    let _ambient = paygate_core::ambient::install(Rc::new(SimAmbient {
        start: tokio::time::Instant::now(),
        rng: SimRng::new(seed ^ 0x9E37_79B9_7F4A_7C15),
    }));
    let chaos = SimRng::new(seed ^ 0xA076_1D64_78BD_642F);
    let options = Options::draw(&rng)
        .draw_extra(&SimRng::new(seed ^ 0xD1B5_4A32_D192_ED03))
        .draw_replicas(&chaos, replicas);
    let mut world = World::new(rng.clone(), options.store_stall_per_mille, store);
    if options.replicas > 1 {
        world = world
            .with_replicas(
                SimRng::new(seed ^ 0xE703_7ED1_A0B4_28DB),
                paygate_payments::in_flight_window(
                    paygate_core::config::DownstreamPolicy::card_api().deadline_ms,
                ),
            )
            .with_skew(SimRng::new(seed ^ 0x5851_F42D_4C95_7F2D));
    }
    world.job_stall_per_mille = options.job_stall_per_mille;
    world.gateway_stall_per_mille = options.gateway_stall_per_mille;
    let world = std::sync::Arc::new(world);
    faults::install(&world, &options);
    let gw = Gateway::replicas(
        &world,
        options.answer_deadline_ms.map(Duration::from_millis),
        options.replicas,
        options.client_timeout_ms.map(|t| {
            (
                SimRng::new(seed ^ 0x8EBC_6AF0_9C88_C6E3),
                Duration::from_millis(t),
            )
        }),
    );
    let answers = workload::Answers::default();
    let merchants: Vec<MerchantId> = (0..options.merchants)
        .map(|i| MerchantId::from_stored(format!("mer_{i}")))
        .collect();
    let mut clients = Vec::new();
    let borrow = real.then(|| SimRng::new(seed ^ 0x94D0_49BB_1331_11EB));
    let orders = workload::orders(
        &rng,
        borrow.as_ref(),
        &merchants,
        options.orders,
        options.window_ms,
    );
    let buyers = holds::buyers(&world, &rng, &merchants, &orders);
    let (monitor, breaches) = holds::monitor(&world, HISTORY_MS);
    let cancel_answers = cancels::CancelAnswers::default();
    let refunds = SimRng::new(seed ^ 0x2545_F491_4F6C_DD1D);
    for order in orders.clone() {
        clients.push(tokio::task::spawn_local(workload::client(
            gw.clone(),
            order,
            rng.clone(),
            answers.clone(),
            options.tries,
            options.retry_pause_ms,
            Some((refunds.clone(), cancel_answers.clone())),
        )));
    }
    let operator = tokio::task::spawn_local(operator::operator(
        world.clone(),
        SimRng::new(seed ^ 0x5851_F42D_4C95_7F2D),
        HISTORY_MS,
    ));
    let jobs = tokio::task::spawn_local(faults::actors(
        world.clone(),
        gw.clone(),
        options.clone(),
        HISTORY_MS,
    ));
    tokio::time::sleep(Duration::from_millis(HISTORY_MS)).await;
    world.heal();
    let _ = jobs.await;
    let _ = operator.await;
    for b in buyers {
        let _ = b.await;
    }
    let _ = monitor.await;
    for c in clients {
        let _ = c.await;
    }
    faults::settle(&world).await;
    // Every merchant asks once more, now that nothing is in flight; what
    // that may start (a reopened no-call abort) is settled too.
    let finals = workload::Answers::default();
    let last = Gateway::start(&world, None);
    for order in &orders {
        workload::final_retry(&last, order, &finals).await;
    }
    faults::settle(&world).await;
    let answers = answers.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let finals = finals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (snapshot, unread) = match world.store.snapshot().await {
        Ok(s) => (s, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let mut violations = checker::check(&world, &snapshot, &answers, &finals);
    let cancel_answers = cancel_answers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match cancels::snapshot_cancels(&world, &snapshot).await {
        Ok(of) => {
            violations.extend(cancels::check(&world, &snapshot, &of, &cancel_answers));
            match events::snapshot_events(&world, &snapshot).await {
                Ok(evs) => violations.extend(events::check(&world, &snapshot, &evs, &of, !real)),
                Err(e) => violations.push(Violation {
                    invariant: "store",
                    subject: "events".to_owned(),
                    detail: format!("the events could not be read for the check: {e}"),
                }),
            }
        }
        Err(e) => violations.push(Violation {
            invariant: "store",
            subject: "cancels".to_owned(),
            detail: format!("the cancels could not be read for the check: {e}"),
        }),
    }
    if let Some(e) = unread {
        violations.push(Violation {
            invariant: "store",
            subject: "snapshot".to_owned(),
            detail: format!("the state store could not be read for the check: {e}"),
        });
    }
    violations.extend(holds::check(&world, &snapshot, &breaches));
    let digest = digest(&world, &snapshot, &[answers.clone(), finals].concat());
    Report {
        seed,
        options,
        approvals: world.card.approvals().len(),
        answers: answers.len(),
        refunds: world.card.refunds().len(),
        cancel_answers: cancel_answers.len(),
        crashes: gw.crashes(),
        violations,
        digest,
    }
}

/// FNV-1a over the final state, the ledger, the alerts and the answers.
fn digest(
    world: &World,
    snapshot: &[(paygate_core::Partition, paygate_core::PaymentRecord)],
    answers: &[workload::Answer],
) -> u64 {
    let text = format!(
        "{:?}|{:?}|{:?}|{:?}",
        snapshot,
        world.ledger.entries(),
        world
            .alerts
            .all()
            .iter()
            .map(|a| (a.reason.as_str(), a.payment_id.clone()))
            .collect::<Vec<_>>(),
        answers
            .iter()
            .map(|a| (a.order_id.clone(), a.kind, a.at_ms))
            .collect::<Vec<_>>()
    );
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
