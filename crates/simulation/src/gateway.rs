//! The serving processes: one to three replicas over the same world, as
//! production runs three `serve` replicas on one database. Confirms run in
//! their own tasks (as the HTTP handler runs them); each request goes to a
//! replica drawn from the history's seed; a crash kills one replica's
//! incarnation, drops every confirm in flight there without an answer, and
//! starts a new one; a pause stalls every call of one replica for seconds,
//! after which its tasks carry on where they were (a process stalled by
//! the scheduler or cut from its database). With several replicas a
//! merchant's client gives up on a request after its timeout and retries
//! elsewhere, while the abandoned request runs on.
//!
//! Like the HTTP handler, the gateway may answer before the saga ends: at
//! its answer deadline it asks the confirm's [`ConfirmTicket`] what it may
//! say (202 with the payment once the card may be called, else 503
//! "nothing was charged", after which the saga must make no card call).
//! Each request's task carries its number in [`REQUEST`], so the card
//! model can say which request made each card call and the checker can
//! hold every early 503 to its promise.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use paygate_payments::{
    CancelInput, CancelOutcome, ConfirmInput, ConfirmOutcome, ConfirmTicket, EarlyAnswer,
};
use tokio::task::AbortHandle;

use crate::{
    rng::SimRng,
    world::{Actor, Incarnation, World},
};

tokio::task_local! {
    /// The merchant request a confirm task serves (numbered per history).
    pub static REQUEST: u64;
}

struct Inner {
    current: Arc<Incarnation>,
    tasks: Vec<AbortHandle>,
    crashes: u32,
}

/// What the gateway answered a request.
#[derive(Debug)]
pub enum Reply {
    /// The saga ended and this is its outcome.
    Saga(Box<ConfirmOutcome>),
    /// The answer deadline came first; the saga carries on.
    Early(EarlyAnswer),
}

/// The replicas of one history (cheap to clone).
#[derive(Clone)]
pub struct Gateway {
    replicas: Arc<Vec<Mutex<Inner>>>,
    deadline: Option<Duration>,
    requests: Arc<AtomicU64>,
    /// Draws the replica of each request, crash and pause; `None` with a
    /// single replica (whose histories then draw nothing for it).
    route: Option<SimRng>,
    /// A merchant's client gives up on a request after this long.
    client_timeout: Option<Duration>,
}

impl Gateway {
    /// One replica serving over `world` that answers each confirm by
    /// `deadline` at the latest (`None`: it waits for the saga).
    pub fn start(world: &World, deadline: Option<Duration>) -> Self {
        Self::replicas(world, deadline, 1, None)
    }

    /// `n` replicas (at least one) serving over `world`; requests, crashes
    /// and pauses go to replicas drawn from `route` (used only when `n >
    /// 1`); merchants' clients give up after `client_timeout`.
    pub fn replicas(
        world: &World,
        deadline: Option<Duration>,
        n: usize,
        chaos: Option<(SimRng, Duration)>,
    ) -> Self {
        let replicas = (0..n.max(1))
            .map(|_| {
                Mutex::new(Inner {
                    current: Arc::new(Incarnation::start(world, Actor::Gateway)),
                    tasks: Vec::new(),
                    crashes: 0,
                })
            })
            .collect::<Vec<_>>();
        let (route, client_timeout) = match chaos {
            Some((rng, timeout)) if n > 1 => (Some(rng), Some(timeout)),
            _ => (None, None),
        };
        Self {
            replicas: Arc::new(replicas),
            deadline,
            requests: world.requests.clone(),
            route,
            client_timeout,
        }
    }

    /// How many replicas serve.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Never: a gateway has at least one replica.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    fn pick(&self) -> usize {
        self.route
            .as_ref()
            .map_or(0, |r| r.pick(self.replicas.len()))
    }

    fn inner(&self, replica: usize) -> std::sync::MutexGuard<'_, Inner> {
        let i = replica.min(self.replicas.len().saturating_sub(1));
        self.replicas[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one confirm at a replica; the request's number, the reply and
    /// the reply's place in the history's causal order (taken when the
    /// saga returned or the deadline answered, [`crate::next_event`]), or
    /// `None` when the process died before it answered (or the client gave
    /// up waiting: the request runs on there).
    pub async fn confirm(&self, input: ConfirmInput) -> Option<(u64, Reply, u64)> {
        let request = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let replica = self.pick();
        let saga = self.inner(replica).current.saga.clone();
        let ticket = ConfirmTicket::new();
        let saga_ticket = ticket.clone();
        let mut task = tokio::spawn(REQUEST.scope(request, async move {
            let outcome = saga.confirm_with_ticket(input, saga_ticket).await;
            (outcome, crate::next_event())
        }));
        self.track(replica, task.abort_handle());
        let client_gives_up = self.client_gives_up();
        let saga_reply =
            |(outcome, seq): (ConfirmOutcome, u64)| (Reply::Saga(Box::new(outcome)), seq);
        let (reply, seq) = match self.deadline {
            None => tokio::select! {
                biased;
                joined = &mut task => saga_reply(joined.ok()?),
                () = client_gives_up => return None,
            },
            Some(deadline) => tokio::select! {
                biased;
                joined = &mut task => saga_reply(joined.ok()?),
                () = tokio::time::sleep(deadline) => {
                    let early = ticket.give_up();
                    (Reply::Early(early), crate::next_event())
                }
                () = client_gives_up => return None,
            },
        };
        Some((request, reply, seq))
    }

    /// Registers a request's task with its replica, so a crash drops it.
    fn track(&self, replica: usize, task: AbortHandle) {
        let mut inner = self.inner(replica);
        inner.tasks.retain(|t| !t.is_finished());
        inner.tasks.push(task);
    }

    /// Resolves when a merchant's client gives up on a request (never with
    /// one replica).
    async fn client_gives_up(&self) {
        match self.client_timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    }

    /// Runs one merchant cancel at a replica, as the HTTP handler does: in
    /// a task of its own, answered 202 ("in flight") at the answer deadline
    /// while the task carries on. The request's number, the saga's outcome
    /// (`None`: the deadline answered first) and the answer's place in the
    /// causal order; `None` as for [`Gateway::confirm`].
    pub async fn cancel(&self, input: CancelInput) -> Option<(u64, Option<CancelOutcome>, u64)> {
        let request = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let replica = self.pick();
        let saga = self.inner(replica).current.saga.clone();
        let mut task = tokio::spawn(REQUEST.scope(request, async move {
            let outcome = saga.cancel(input).await;
            (outcome, crate::next_event())
        }));
        self.track(replica, task.abort_handle());
        let client_gives_up = self.client_gives_up();
        let deadline = async {
            match self.deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let (outcome, seq) = tokio::select! {
            biased;
            joined = &mut task => {
                let (outcome, seq) = joined.ok()?;
                (Some(outcome), seq)
            }
            () = deadline => (None, crate::next_event()),
            () = client_gives_up => return None,
        };
        Some((request, outcome, seq))
    }

    /// `kill -9` and restart of one replica: the old incarnation can no
    /// longer write or call, its confirms in flight are dropped unanswered.
    pub fn crash(&self, world: &World) {
        let mut inner = self.inner(self.pick());
        inner.current.kill();
        for t in inner.tasks.drain(..) {
            t.abort();
        }
        inner.current = Arc::new(Incarnation::start(world, Actor::Gateway));
        inner.crashes += 1;
    }

    /// Stalls every call of one replica for `len`; its tasks then carry
    /// on where they were.
    pub fn pause(&self, len: Duration) {
        let replica = self.pick();
        self.inner(replica).current.pause(len);
    }

    /// Crashes so far, over every replica.
    pub fn crashes(&self) -> u32 {
        self.replicas
            .iter()
            .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).crashes)
            .sum()
    }
}
