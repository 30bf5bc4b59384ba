//! The state handles share with the worker.

use std::sync::Mutex;

use tokio::sync::{mpsc, watch};

use super::job::Request;
use crate::error::Error;

/// The lifecycle of an instance as handles see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    Running,
    Restarting,
    Stopped,
    Crashed(String),
}

/// State shared between the worker and its handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub label: String,
    pub state: Mutex<State>,
    /// Calls sent and not yet answered (see `handoff::reply`).
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// The data directory of a persistent instance.
    pub data_dir: Option<std::path::PathBuf>,
    /// The lease being served, for [`Job::Side`] work: senders of side jobs
    /// and the worker starting or ending a lease take this lock, so a side
    /// job is either queued before the lease starts (and found there) or
    /// sent to the lease.
    pub lease_route: Mutex<Option<mpsc::WeakUnboundedSender<Request>>>,
    /// How many times the engine was reopened after a crash. A wire
    /// session's prepared statements, cursors, temporary tables and
    /// listens die with the engine, so sessions from before a restart are
    /// ended, as PostgreSQL ends every session when a backend crashes.
    pub restarts: watch::Sender<u64>,
}

impl Shared {
    pub fn state(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn set_state(&self, state: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// The error for a call that found the worker gone.
    pub fn closed_error(&self) -> Error {
        match self.state() {
            State::Stopped => Error::Stopped(self.label.clone()),
            State::Crashed(reason) => Error::Crashed { name: self.label.clone(), reason },
            State::Running | State::Restarting => {
                Error::Crashed { name: self.label.clone(), reason: "the worker died while running this call".into() }
            }
        }
    }
}
