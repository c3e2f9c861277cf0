//! The knobs of one history, all drawn from its seed (TigerBeetle's VOPR
//! style: the seed is the whole bug report).

use crate::rng::SimRng;

/// What one history does.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Options {
    /// Orders confirmed.
    pub orders: usize,
    /// Merchants sharing them.
    pub merchants: usize,
    /// Orders start within this window, ms.
    pub window_ms: u64,
    /// Confirms per order at most (first try included).
    pub tries: u32,
    /// Gateway crashes (kill -9 and restart), at these times, ms.
    pub crashes_at: Vec<u64>,
    /// Card API outage (every call 503): start and length, ms.
    pub card_outage: Option<(u64, u64)>,
    /// Ledger outage: start and length, ms.
    pub ledger_outage: Option<(u64, u64)>,
    /// State store write failures: start and length, ms.
    pub store_outage: Option<(u64, u64)>,
    /// A state store write applies but reports failure, per mille.
    pub store_lost_ack_per_mille: u64,
    /// Request log write failures: start and length, ms.
    pub log_outage: Option<(u64, u64)>,
    /// Batch sweeps start this often, ms (range).
    pub batch_every_ms: (u64, u64),
    /// Grace period of the batch during the history, ms.
    pub batch_grace_ms: u64,
    /// Reconciliations start this often, ms (range).
    pub reconcile_every_ms: (u64, u64),
    /// A batch or reconciliation run is killed mid-run, per mille.
    pub job_kill_per_mille: u64,
    /// The gateway answers each confirm by this deadline at the latest, ms
    /// (the HTTP request deadline; `None`: it waits for the saga).
    pub answer_deadline_ms: Option<u64>,
    /// Store and log round trips that stall 20-400 ms, per mille.
    pub store_stall_per_mille: u64,
    /// A merchant waits this long before a retry, ms (range).
    pub retry_pause_ms: (u64, u64),
    /// Gateway replicas serving at once over the same stores (1-3).
    pub replicas: usize,
    /// Pauses of a replica drawn at the time: start and length, ms.
    pub pauses: Vec<(u64, u64)>,
    /// A batch or reconciliation run stalls for 1-8 s mid-run and then
    /// carries on, per mille.
    pub job_pause_per_mille: u64,
    /// A merchant's client gives up on a request after this long and
    /// retries (at another replica), ms.
    pub client_timeout_ms: Option<u64>,
    /// A store, log or inventory round trip of a batch or reconciliation
    /// run stalls 1-6 s and carries on, per mille (with several replicas).
    pub job_stall_per_mille: u64,
    /// The same for a gateway replica's round trips (one request stalls
    /// between two of its writes while the others go on).
    pub gateway_stall_per_mille: u64,
}

impl Options {
    /// The options of the history `rng` was seeded for.
    pub fn draw(rng: &SimRng) -> Self {
        let window_ms = rng.between(5_000, 30_000);
        let window = |p: f64| {
            rng.chance(p)
                .then(|| (rng.between(0, window_ms), rng.between(500, 10_000)))
        };
        let crashes = rng.between(0, 2) as usize;
        Self {
            orders: rng.between(4, 24) as usize,
            merchants: rng.between(1, 3) as usize,
            window_ms,
            tries: rng.between(1, 5) as u32,
            crashes_at: (0..crashes)
                .map(|_| rng.between(0, window_ms + 10_000))
                .collect(),
            card_outage: window(0.25),
            ledger_outage: window(0.35),
            store_outage: window(0.2),
            store_lost_ack_per_mille: if rng.chance(0.3) {
                rng.between(5, 50)
            } else {
                0
            },
            log_outage: window(0.2),
            batch_every_ms: (500, 6_000),
            batch_grace_ms: [0, 0, 1_000, 5_000][rng.pick(4)],
            reconcile_every_ms: (4_000, 20_000),
            job_kill_per_mille: rng.between(0, 200),
            answer_deadline_ms: None,
            store_stall_per_mille: 0,
            retry_pause_ms: (500, 8_000),
            replicas: 1,
            pauses: Vec::new(),
            job_pause_per_mille: 0,
            client_timeout_ms: None,
            job_stall_per_mille: 0,
            gateway_stall_per_mille: 0,
        }
    }

    /// Draws the replicas of the history and what only several replicas
    /// bring (pauses of replicas and jobs, clients that give up and retry
    /// elsewhere) from their own stream (`chaos`), so a one-replica
    /// history is exactly the history of the same seed before replicas
    /// existed. `forced` overrides the drawn count (`--replicas`).
    pub fn draw_replicas(mut self, chaos: &SimRng, forced: Option<usize>) -> Self {
        let drawn = 1 + chaos.pick(3);
        self.replicas = forced.unwrap_or(drawn).clamp(1, 3);
        if self.replicas > 1 {
            let horizon = self.window_ms + 10_000;
            self.pauses = (0..chaos.between(1, 8))
                .map(|_| (chaos.between(0, horizon), chaos.between(500, 8_000)))
                .collect();
            self.job_pause_per_mille = chaos.between(0, 300);
            self.client_timeout_ms = Some(chaos.between(1_000, 8_000));
            self.job_stall_per_mille = if chaos.chance(0.5) {
                chaos.between(5, 40)
            } else {
                0
            };
            self.gateway_stall_per_mille = if chaos.chance(0.5) {
                chaos.between(5, 30)
            } else {
                0
            };
        }
        self
    }

    /// Draws the knobs added after the first ones from their own stream
    /// (`extra`), so the histories of seeds that draw none of them stay
    /// exactly as they were.
    pub fn draw_extra(mut self, extra: &SimRng) -> Self {
        // Deadlines of a few ms catch confirms before their record is
        // durable (503); longer ones catch card calls in flight (202).
        self.answer_deadline_ms = extra
            .chance(0.4)
            .then(|| [1, 2, 3, 5, 8, 60, 1_000, 4_000][extra.pick(8)]);
        self.store_stall_per_mille = if extra.chance(0.5) {
            extra.between(20, 150)
        } else {
            0
        };
        // Impatient merchants and a busy batch: more retries land while a
        // sweep holds a snapshot of the same record.
        if extra.chance(0.3) {
            self.retry_pause_ms = (20, 600);
        }
        if extra.chance(0.3) {
            self.batch_every_ms = (100, 1_500);
        }
        self
    }
}
