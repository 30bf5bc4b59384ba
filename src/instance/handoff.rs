//! Passing jobs and replies between async callers and worker threads.
//!
//! A round trip through the engine takes ~40 µs, and on the small virtual
//! machines we measured, waking a parked thread costs about as much: a plain
//! channel ping-pong with 33 µs of work took 100 µs per op. Both sides
//! therefore spin briefly on the channel before parking; with a 50 µs budget
//! the same ping-pong took 36 µs (numbers in BENCHMARKS.md). The budget is
//! bounded, so a long query costs at most that much extra CPU, and an async
//! caller blocks its runtime thread for at most that long per call.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::worker::{Command, Job, Output, Request, Shared};
use crate::error::Result;

/// How long each side polls before parking.
pub(crate) const SPIN: Duration = Duration::from_micros(50);

/// Receives the next message on a worker thread, spinning before parking.
pub(crate) fn recv_blocking<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < SPIN {
        match rx.try_recv() {
            Ok(message) => return Some(message),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
    rx.blocking_recv()
}

/// Awaits a reply, spinning briefly first because replies usually arrive
/// within the budget.
async fn reply<T>(mut rx: oneshot::Receiver<T>) -> Result<T, oneshot::error::RecvError> {
    let start = Instant::now();
    while start.elapsed() < SPIN {
        match rx.try_recv() {
            Ok(value) => return Ok(value),
            Err(oneshot::error::TryRecvError::Closed) => break,
            Err(oneshot::error::TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
    rx.await
}

/// Where a handle sends its jobs: the shared queue, or a lease it holds.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    Shared(mpsc::UnboundedSender<Command>),
    Lease(mpsc::UnboundedSender<Request>),
}

impl Route {
    /// Sends a job and waits for its outcome; a vanished worker becomes the
    /// instance's stopped/crashed error.
    pub(crate) async fn call(&self, shared: &Shared, job: Job) -> Result<Output> {
        let (tx, rx) = oneshot::channel();
        let request = Request { job, reply: tx };
        let sent = match self {
            Route::Shared(queue) => queue.send(Command::Run(request)).is_ok(),
            Route::Lease(lease) => lease.send(request).is_ok(),
        };
        if !sent {
            return Err(shared.closed_error());
        }
        reply(rx).await.map_err(|_| shared.closed_error())?
    }
}
