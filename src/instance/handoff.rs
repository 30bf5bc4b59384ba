//! Passing jobs and replies between async callers and worker threads.
//!
//! A round trip through the engine takes ~40 µs, and on the small virtual
//! machines we measured, waking a parked thread costs about as much: a plain
//! channel ping-pong with 33 µs of work took 100 µs per op. Both sides
//! therefore spin briefly on the channel before parking; with a 50 µs budget
//! the same ping-pong took 36 µs (numbers in BENCHMARKS.md). The budget is
//! bounded, so a long query costs at most that much extra CPU; polls yield
//! to the OS and, on the async side, to the runtime's other tasks. (Through
//! the wire server: ~38 -> ~26 µs per single-row statement.)

use std::sync::atomic::Ordering;
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
            Err(mpsc::error::TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    rx.blocking_recv()
}

/// Awaits a reply, first polling for it briefly when it is next: the only
/// call in flight on the instance, or a call on a lease (the worker serves
/// nothing else meanwhile, however many calls wait in its queue). The
/// answer usually comes within the budget. Each poll yields to the
/// runtime's other tasks and to the OS, so the engine's thread gets the
/// CPU. When the answer is behind other calls, polling would only burn CPU
/// the engine needs, so the task parks at once.
pub(crate) async fn reply<T>(
    mut rx: oneshot::Receiver<T>,
    shared: &Shared,
    on_lease: bool,
) -> Result<T, oneshot::error::RecvError> {
    let alone = shared.in_flight.fetch_add(1, Ordering::AcqRel) == 0 || on_lease;
    let _in_flight = InFlight(shared);
    if alone {
        let start = Instant::now();
        while start.elapsed() < SPIN {
            match rx.try_recv() {
                Ok(value) => return Ok(value),
                Err(oneshot::error::TryRecvError::Closed) => break,
                Err(oneshot::error::TryRecvError::Empty) => {
                    std::thread::yield_now();
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    rx.await
}

/// Counts a call in flight until dropped (also when the awaiting task is
/// cancelled).
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
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
        reply(rx, shared, matches!(self, Route::Lease(_))).await.map_err(|_| shared.closed_error())?
    }
}
