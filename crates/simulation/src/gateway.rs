//! The serving process: confirms run in their own tasks (as the HTTP
//! handler runs them), and a crash kills the incarnation, drops every
//! confirm in flight without an answer, and starts a new one.
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

use paygate_payments::{ConfirmInput, ConfirmOutcome, ConfirmTicket, EarlyAnswer};
use tokio::task::AbortHandle;

use crate::world::{Actor, Incarnation, World};

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

/// The gateway of one history (cheap to clone).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Mutex<Inner>>,
    deadline: Option<Duration>,
    requests: Arc<AtomicU64>,
}

impl Gateway {
    /// A gateway serving over `world` that answers each confirm by
    /// `deadline` at the latest (`None`: it waits for the saga).
    pub fn start(world: &World, deadline: Option<Duration>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                current: Arc::new(Incarnation::start(world, Actor::Gateway)),
                tasks: Vec::new(),
                crashes: 0,
            })),
            deadline,
            requests: world.requests.clone(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one confirm; the request's number and the reply, or `None`
    /// when the process died before it answered.
    pub async fn confirm(&self, input: ConfirmInput) -> Option<(u64, Reply)> {
        let request = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let saga = self.inner().current.saga.clone();
        let ticket = ConfirmTicket::new();
        let saga_ticket = ticket.clone();
        let mut task = tokio::spawn(REQUEST.scope(request, async move {
            saga.confirm_with_ticket(input, saga_ticket).await
        }));
        {
            let mut inner = self.inner();
            inner.tasks.retain(|t| !t.is_finished());
            inner.tasks.push(task.abort_handle());
        }
        let reply = match self.deadline {
            None => Reply::Saga(Box::new(task.await.ok()?)),
            Some(deadline) => tokio::select! {
                biased;
                joined = &mut task => Reply::Saga(Box::new(joined.ok()?)),
                () = tokio::time::sleep(deadline) => Reply::Early(ticket.give_up()),
            },
        };
        Some((request, reply))
    }

    /// `kill -9` and restart: the old incarnation can no longer write or
    /// call, its confirms in flight are dropped unanswered.
    pub fn crash(&self, world: &World) {
        let mut inner = self.inner();
        inner.current.kill();
        for t in inner.tasks.drain(..) {
            t.abort();
        }
        inner.current = Arc::new(Incarnation::start(world, Actor::Gateway));
        inner.crashes += 1;
    }

    /// Crashes so far.
    pub fn crashes(&self) -> u32 {
        self.inner().crashes
    }
}
