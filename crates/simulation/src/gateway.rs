//! The serving process: confirms run in their own tasks (as the HTTP
//! handler runs them), and a crash kills the incarnation, drops every
//! confirm in flight without an answer, and starts a new one.

use std::sync::{Arc, Mutex};

use paygate_payments::{ConfirmInput, ConfirmOutcome};
use tokio::task::AbortHandle;

use crate::world::{Incarnation, World};

struct Inner {
    current: Arc<Incarnation>,
    tasks: Vec<AbortHandle>,
    crashes: u32,
}

/// The gateway of one history (cheap to clone).
#[derive(Clone)]
pub struct Gateway(Arc<Mutex<Inner>>);

impl Gateway {
    /// A gateway serving over `world`.
    pub fn start(world: &World) -> Self {
        Self(Arc::new(Mutex::new(Inner {
            current: Arc::new(Incarnation::start(world)),
            tasks: Vec::new(),
            crashes: 0,
        })))
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one confirm; `None` when the process died before it answered.
    pub async fn confirm(&self, input: ConfirmInput) -> Option<ConfirmOutcome> {
        let saga = self.inner().current.saga.clone();
        let task = tokio::spawn(async move { saga.confirm(input).await });
        {
            let mut inner = self.inner();
            inner.tasks.retain(|t| !t.is_finished());
            inner.tasks.push(task.abort_handle());
        }
        task.await.ok()
    }

    /// `kill -9` and restart: the old incarnation can no longer write or
    /// call, its confirms in flight are dropped unanswered.
    pub fn crash(&self, world: &World) {
        let mut inner = self.inner();
        inner.current.kill();
        for t in inner.tasks.drain(..) {
            t.abort();
        }
        inner.current = Arc::new(Incarnation::start(world));
        inner.crashes += 1;
    }

    /// Crashes so far.
    pub fn crashes(&self) -> u32 {
        self.inner().crashes
    }
}
