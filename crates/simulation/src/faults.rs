//! Faults and the background actors of a history: outage windows of the
//! card API, the ledger, the state store and the request log; lost commit
//! acknowledgements; gateway crashes; batch sweeps and reconciliations on
//! their own schedules, sometimes killed mid-run. And the final phase:
//! heal everything, then run the batch and the reconciliation to completion.

use std::{sync::Arc, time::Duration};

use paygate_batch::{SweepOptions, Sweeper};
use paygate_reconcile::{ReconcileOptions, Reconciler};
use paygate_state_store::{Fault, WriteKind};

use crate::{
    gateway::Gateway,
    options::Options,
    world::{Actor, Incarnation, World},
    EPOCH_MS,
};

/// Simulated ms since the history's start.
pub(crate) fn elapsed_ms() -> u64 {
    u64::try_from(paygate_core::time::now_ms() - EPOCH_MS).unwrap_or(0)
}

fn within(window: Option<(u64, u64)>, t: u64) -> bool {
    window.is_some_and(|(start, len)| t >= start && t < start + len)
}

/// Installs the store and log fault injectors (they read the clock, so
/// their windows follow simulated time).
pub fn install(world: &World, o: &Options) {
    let (store_outage, lost_ack, rng) = (
        o.store_outage,
        o.store_lost_ack_per_mille,
        world.rng.clone(),
    );
    world.store.set_fault(Some(Arc::new(
        move |kind: WriteKind, _: &paygate_core::PaymentId| {
            if within(store_outage, elapsed_ms()) {
                return Fault::FailBefore;
            }
            if lost_ack > 0 && kind != WriteKind::Copy && rng.between(0, 999) < lost_ack {
                return Fault::FailAfter;
            }
            Fault::None
        },
    )));
    *world
        .inventory_faults
        .outage
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = o.store_outage;
    world.inventory_faults.lost_ack_per_mille.store(
        o.store_lost_ack_per_mille,
        std::sync::atomic::Ordering::SeqCst,
    );
    let log_outage = o.log_outage;
    world
        .log
        .set_fault(Some(Arc::new(move |_| within(log_outage, elapsed_ms()))));
}

impl World {
    /// Every fault off: the downstreams answer promptly and the stores write.
    pub fn heal(&self) {
        self.card.heal();
        self.ledger.heal();
        self.store.set_fault(None);
        self.inventory_faults.heal();
        self.log.set_fault(None);
    }
}

fn sweep_options(grace_ms: u64) -> SweepOptions {
    SweepOptions {
        grace: Duration::from_millis(grace_ms),
        concurrency: 4,
        lease_ttl: Duration::from_secs(30),
        scan_batch: 16,
        move_chunk: 8,
        ..SweepOptions::default()
    }
}

fn reconcile_options(stale_after_ms: u64, min_age_ms: u64) -> ReconcileOptions {
    let now = paygate_core::time::now_ms();
    ReconcileOptions {
        from_ms: EPOCH_MS - 3_600_000,
        to_ms: now + 3_600_000,
        page_size: 8,
        slices: 2,
        slice_concurrency: 2,
        lookup_chunk: 4,
        stale_after: Duration::from_millis(stale_after_ms),
        stale_concurrency: 4,
        min_age: Duration::from_millis(min_age_ms),
        dry_run: false,
        lease_ttl: Duration::from_secs(30),
        ledger_alert_threshold: 5,
        recheck: paygate_payments::RecheckSchedule::EVERY_SWEEP,
    }
}

/// One batch sweep as its own process.
async fn sweep(world: &World, grace_ms: u64) {
    let inc = Incarnation::start(world, sweeper(grace_ms));
    let sweeper = Sweeper::in_memory(inc.store.clone(), inc.saga.clone(), world.leases.clone());
    match sweeper.sweep(&sweep_options(grace_ms)).await {
        Ok(s) => tracing::info!(?s, "sim: final sweep"),
        Err(e) => tracing::warn!(error = %e, "sim: final sweep failed"),
    }
}

/// One reconciliation as its own process.
async fn reconcile(world: &World, stale_after_ms: u64, min_age_ms: u64) {
    let inc = Incarnation::start(world, Actor::Reconcile);
    let r = Reconciler::in_memory(inc.store.clone(), inc.saga.clone(), world.leases.clone());
    match r.run(&reconcile_options(stale_after_ms, min_age_ms)).await {
        Ok(s) => tracing::info!(?s, "sim: final reconciliation"),
        Err(e) => tracing::warn!(error = %e, "sim: final reconciliation failed"),
    }
}

/// A sweep starting now with this grace.
/// Which pass of the [`Sweeper`] a job runs.
#[derive(Clone, Copy)]
enum Pass {
    /// The batch's sweep.
    Sweep,
    /// `serve`'s janitor.
    Janitor,
}

/// One batch sweep or janitor pass at `grace_ms`, as a job that may be
/// killed or stalled mid-run.
async fn sweep_job(w: &Arc<World>, opts: &Options, grace_ms: u64, pass: Pass) {
    job(
        w.clone(),
        sweeper(grace_ms),
        opts.job_kill_per_mille,
        opts.job_pause_per_mille,
        move |world, inc| {
            Box::pin(async move {
                let s =
                    Sweeper::in_memory(inc.store.clone(), inc.saga.clone(), world.leases.clone());
                let opts = sweep_options(grace_ms);
                match pass {
                    Pass::Sweep => {
                        let _ = s.sweep(&opts).await;
                    }
                    Pass::Janitor => match s.janitor(&opts).await {
                        Ok(s) if s.scanned > 0 => tracing::info!(?s, "sim: janitor"),
                        Ok(_) => tracing::debug!("sim: janitor found nothing due"),
                        Err(e) => tracing::info!(error = %e, "sim: janitor stopped"),
                    },
                }
            })
        },
    )
    .await;
}

/// How often the simulated janitor runs, ms of the history's clock.
const JANITOR_EVERY_MS: u64 = 1_500;

fn sweeper(grace_ms: u64) -> Actor {
    Actor::Sweep {
        started_ms: paygate_core::time::now_ms(),
        grace_ms,
    }
}

/// A job that may be killed mid-run (its process dies: no more writes), or
/// stall mid-run for 1-8 s and carry on (`pause_per_mille`, drawn from the
/// world's `chaos` stream only when non-zero).
async fn job<F>(world: Arc<World>, actor: Actor, kill_per_mille: u64, pause_per_mille: u64, run: F)
where
    F: FnOnce(Arc<World>, Arc<Incarnation>) -> futures_util::future::LocalBoxFuture<'static, ()>,
{
    let inc = Arc::new(Incarnation::start(&world, actor));
    let kill_after =
        (world.rng.between(0, 999) < kill_per_mille).then(|| world.rng.between(0, 3_000));
    if pause_per_mille > 0 && world.chaos.between(0, 999) < pause_per_mille {
        let (after, len) = (
            world.chaos.between(0, 2_000),
            world.chaos.between(1_000, 8_000),
        );
        let inc = inc.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            inc.pause(Duration::from_millis(len));
        });
    }
    let task = tokio::task::spawn_local(run(world.clone(), inc.clone()));
    match kill_after {
        Some(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            inc.kill();
            task.abort();
            // A killed holder's lease expires by itself.
        }
        None => {
            let _ = task.await;
        }
    }
}

/// The background actors until `until_ms`: crashes, outages, batch sweeps
/// and reconciliations.
pub async fn actors(world: Arc<World>, gw: Gateway, o: Options, until_ms: u64) {
    let mut tasks = Vec::new();
    for at in o.crashes_at.clone() {
        let (world, gw) = (world.clone(), gw.clone());
        tasks.push(tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(at)).await;
            gw.crash(&world);
        }));
    }
    for (at, len) in o.pauses.clone() {
        let gw = gw.clone();
        tasks.push(tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(at)).await;
            gw.pause(Duration::from_millis(len));
        }));
    }
    for (outage, card) in [(o.card_outage, true), (o.ledger_outage, false)] {
        if let Some((start, len)) = outage {
            let world = world.clone();
            tasks.push(tokio::task::spawn_local(async move {
                tokio::time::sleep(Duration::from_millis(start)).await;
                set_down(&world, card, true);
                tokio::time::sleep(Duration::from_millis(len)).await;
                set_down(&world, card, false);
            }));
        }
    }
    let (w, opts) = (world.clone(), o.clone());
    tasks.push(tokio::task::spawn_local(async move {
        while elapsed_ms() < until_ms {
            let every = w.rng.between(opts.batch_every_ms.0, opts.batch_every_ms.1);
            tokio::time::sleep(Duration::from_millis(every)).await;
            sweep_job(&w, &opts, opts.batch_grace_ms, Pass::Sweep).await;
        }
    }));
    // `serve`'s janitor: a pass over the undecided payments unchanged for
    // the in-flight window, on a fixed cadence (one replica at a time holds
    // its lease, as the batch's), killed and stalled like the other jobs.
    // Its checks re-send a payment the card company has no record of.
    let (w, opts) = (world.clone(), o.clone());
    tasks.push(tokio::task::spawn_local(async move {
        let grace = u64::try_from(w.settle_on_access_after.as_millis()).unwrap_or(u64::MAX);
        while elapsed_ms() < until_ms {
            tokio::time::sleep(Duration::from_millis(JANITOR_EVERY_MS)).await;
            sweep_job(&w, &opts, grace, Pass::Janitor).await;
        }
    }));
    let (w, opts) = (world.clone(), o.clone());
    tasks.push(tokio::task::spawn_local(async move {
        while elapsed_ms() < until_ms {
            let every = w
                .rng
                .between(opts.reconcile_every_ms.0, opts.reconcile_every_ms.1);
            tokio::time::sleep(Duration::from_millis(every)).await;
            job(
                w.clone(),
                Actor::Reconcile,
                opts.job_kill_per_mille,
                opts.job_pause_per_mille,
                move |world, inc| {
                    Box::pin(async move {
                        let r = Reconciler::in_memory(
                            inc.store.clone(),
                            inc.saga.clone(),
                            world.leases.clone(),
                        );
                        let _ = r.run(&reconcile_options(2_000, 1_000)).await;
                    })
                },
            )
            .await;
        }
    }));
    // The card company's webhooks, as a replica's worker takes them: about
    // one receipt a second, each a claim about an order that is true now,
    // late (true of an earlier moment), delivered twice, reordered (an
    // older status after a newer one) or forged (a status the card company
    // never gave, or an order it never saw). The worker looks the order up
    // and acts on the lookup alone, so none may break an invariant.
    let w = world.clone();
    let opts = o.clone();
    tasks.push(tokio::task::spawn_local(async move {
        let mut forged = 0_u64;
        while elapsed_ms() < until_ms {
            tokio::time::sleep(Duration::from_millis(w.rng.between(200, 1_800))).await;
            let approvals = w.card.approvals();
            let claim = match (w.rng.between(0, 9), approvals.is_empty()) {
                (0..=5, false) => {
                    let a = &approvals[w.rng.between(0, approvals.len() as u64 - 1) as usize];
                    let status = [
                        "DONE",
                        "DONE",
                        "CANCELED",
                        "PARTIAL_CANCELED",
                        "ABORTED",
                        "IN_PROGRESS",
                    ][w.rng.between(0, 5) as usize];
                    (a.order_id.clone(), a.payment_key.clone(), status)
                }
                _ => {
                    forged += 1;
                    (
                        format!("order-forged-{forged}"),
                        format!("pk_forged_{forged}"),
                        "DONE",
                    )
                }
            };
            let twice = w.rng.between(0, 3) == 0;
            job(
                w.clone(),
                Actor::CardWebhook,
                opts.job_kill_per_mille,
                opts.job_pause_per_mille,
                move |_world, inc| {
                    Box::pin(async move {
                        let settler =
                            paygate_payments::Settler::new(inc.store.clone(), inc.saga.clone(), 5);
                        let (order, key, status) = claim;
                        for _ in 0..if twice { 2 } else { 1 } {
                            let _ = inc
                                .saga
                                .act_on_card_webhook(&settler, &order, &key, status)
                                .await;
                        }
                    })
                },
            )
            .await;
        }
    }));
    for t in tasks {
        let _ = t.await;
    }
}

fn set_down(world: &World, card: bool, down: bool) {
    if card {
        world.card.set_down(down);
    } else {
        world.ledger.set_down(down);
    }
}

/// After healing: let everything in flight finish (async retries, slow
/// answers, leases of killed jobs) and the card company's confirm window
/// of every payment close (a payment the card company never saw is
/// settled as not charged only then), then sweep, reconcile with no age
/// limits, and sweep again until nothing moves.
pub async fn settle(world: &World) {
    tokio::time::sleep(Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(
        paygate_core::Config::default().card_confirm_window_ms,
    ))
    .await;
    for _ in 0..3 {
        sweep(world, 0).await;
        reconcile(world, 0, 0).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    sweep(world, 0).await;
}
