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
//!
//! Spinning is adaptive ([`Gauge`], one per thread): a side that kept
//! missing (the message came after the budget, e.g. replication applying one
//! ~100 µs transaction every millisecond) parks at once, probing again now
//! and then. Measured on `pglite-cache sync`: two missed 50 µs spins per
//! applied transaction were ~100 µs of CPU each, more than the transaction.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::worker::{Command, Job, Output, Request, Shared};
use crate::error::Result;

/// How long each side polls before parking.
pub(crate) const SPIN: Duration = Duration::from_micros(50);

/// Recent outcomes of one thread's spins: whether to spin at all.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gauge {
    /// The last 8 spins, one bit each, newest lowest: 1 = the message came
    /// within the budget.
    hits: u8,
    /// Spins decided while not spinning: every [`PROBE_EVERY`]th one probes.
    skipped: u8,
    /// At least one spin was recorded (a fresh thread starts by spinning).
    seen: bool,
}

/// While spins keep missing, one wait in this many spins anyway, to notice
/// when the traffic changes.
const PROBE_EVERY: u8 = 16;

impl Gauge {
    /// Whether the next wait should spin: yes while one of the last 8 spins
    /// paid off, otherwise only to probe.
    pub(crate) fn should_spin(&mut self) -> bool {
        if !self.seen || self.hits != 0 {
            return true;
        }
        self.skipped = self.skipped.wrapping_add(1);
        self.skipped.is_multiple_of(PROBE_EVERY)
    }

    /// Records a spin's outcome.
    pub(crate) fn record(&mut self, hit: bool) {
        self.seen = true;
        self.hits = (self.hits << 1) | u8::from(hit);
    }
}

thread_local! {
    /// The worker thread's spins for jobs (one per thread: each worker thread
    /// serves one instance).
    static WORKER_GAUGE: Cell<Gauge> = Cell::new(Gauge::default());
    /// Spins for replies, per runtime thread.
    static REPLY_GAUGE: Cell<Gauge> = Cell::new(Gauge::default());
}

fn should_spin(gauge: &'static std::thread::LocalKey<Cell<Gauge>>) -> bool {
    gauge.with(|g| {
        let mut value = g.get();
        let spin = value.should_spin();
        g.set(value);
        spin
    })
}

fn record(gauge: &'static std::thread::LocalKey<Cell<Gauge>>, hit: bool) {
    gauge.with(|g| {
        let mut value = g.get();
        value.record(hit);
        g.set(value);
    });
}

/// Receives the next message on a worker thread, spinning before parking
/// (while spinning pays off, see [`Gauge`]).
pub(crate) fn recv_blocking<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Option<T> {
    match rx.try_recv() {
        Ok(message) => return Some(message),
        Err(mpsc::error::TryRecvError::Disconnected) => return None,
        Err(mpsc::error::TryRecvError::Empty) => {}
    }
    if should_spin(&WORKER_GAUGE) {
        let start = Instant::now();
        while start.elapsed() < SPIN {
            match rx.try_recv() {
                Ok(message) => {
                    record(&WORKER_GAUGE, true);
                    return Some(message);
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => std::thread::yield_now(),
            }
        }
        record(&WORKER_GAUGE, false);
    }
    rx.blocking_recv()
}

/// Awaits a reply, first polling for it briefly when it is next: the only
/// call in flight on the instance, or a call on a lease (the worker serves
/// nothing else meanwhile, however many calls wait in its queue). The
/// answer usually comes within the budget. Each poll yields to the
/// runtime's other tasks and to the OS, so the engine's thread gets the
/// CPU. When the answer is behind other calls, polling would only burn CPU
/// the engine needs, so the task parks at once; with `started` (signalled
/// when the worker starts the job) it wakes up while the engine runs the
/// job and polls from then on, so that the thread wake-up is not added
/// to the reply's way back. With 8 pgbench TPC-B clients, every
/// transaction's first statement waits behind the others' transactions,
/// and the whole transaction waits for its reply.
pub(crate) async fn reply<T>(
    mut rx: oneshot::Receiver<T>,
    shared: &Shared,
    on_lease: bool,
    started: Option<&tokio::sync::Notify>,
) -> Result<T, oneshot::error::RecvError> {
    let alone = shared.in_flight.fetch_add(1, Ordering::AcqRel) == 0 || on_lease;
    let _in_flight = InFlight(shared);
    if alone {
        if let Some(value) = spin(&mut rx).await {
            return value;
        }
    } else if let Some(started) = started {
        tokio::select! {
            biased;
            value = &mut rx => return value,
            () = started.notified() => {}
        }
        if let Some(value) = spin(&mut rx).await {
            return value;
        }
    }
    rx.await
}

/// Polls for a reply within the budget (while spinning pays off, see
/// [`Gauge`]); `None` if it did not come.
async fn spin<T>(rx: &mut oneshot::Receiver<T>) -> Option<Result<T, oneshot::error::RecvError>> {
    if !should_spin(&REPLY_GAUGE) {
        return None;
    }
    let start = Instant::now();
    while start.elapsed() < SPIN {
        match rx.try_recv() {
            Ok(value) => {
                // The task may have moved to another thread meanwhile:
                // that thread's gauge learns, which is as good.
                record(&REPLY_GAUGE, true);
                return Some(Ok(value));
            }
            // Not a miss of the budget: the worker is gone.
            Err(oneshot::error::TryRecvError::Closed) => return None,
            Err(oneshot::error::TryRecvError::Empty) => {
                std::thread::yield_now();
                tokio::task::yield_now().await;
            }
        }
    }
    record(&REPLY_GAUGE, false);
    None
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
        reply(rx, shared, matches!(self, Route::Lease(_)), None).await.map_err(|_| shared.closed_error())?
    }
}

#[cfg(test)]
mod tests {
    use super::Gauge;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use tokio::sync::{Notify, oneshot};

    fn shared() -> super::Shared {
        super::Shared {
            label: "test".into(),
            state: std::sync::Mutex::new(super::super::worker::State::Running),
            in_flight: Default::default(),
            data_dir: None,
            lease_route: std::sync::Mutex::new(None),
            restarts: tokio::sync::watch::channel(0).0,
        }
    }

    #[tokio::test]
    async fn a_caller_behind_others_gets_its_reply_after_the_start_signal() {
        let shared = shared();
        shared.in_flight.store(1, Ordering::Release); // another call is in flight
        let started = Arc::new(Notify::new());
        let (tx, rx) = oneshot::channel();
        let worker = {
            let started = started.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(5)); // the job waits its turn
                started.notify_one();
                std::thread::sleep(std::time::Duration::from_millis(5)); // the engine runs it
                tx.send(7).unwrap();
            })
        };
        assert_eq!(super::reply(rx, &shared, false, Some(&started)).await.unwrap(), 7);
        assert_eq!(shared.in_flight.load(Ordering::Acquire), 1, "the call no longer counts as in flight");
        worker.join().unwrap();

        // The worker gone before it started the job: an error, not a hang.
        let (tx, rx) = oneshot::channel::<u8>();
        drop(tx);
        assert!(super::reply(rx, &shared, false, Some(&Notify::new())).await.is_err());
    }

    #[test]
    fn spins_while_it_pays_off_then_probes() {
        let mut g = Gauge::default();
        assert!(g.should_spin(), "a fresh thread spins");
        g.record(true);
        for _ in 0..7 {
            assert!(g.should_spin());
            g.record(false);
        }
        assert!(g.should_spin(), "one hit among the last 8");
        g.record(false);
        // Eight misses in a row: spin only every 16th wait.
        let spins = (0..64).filter(|_| g.should_spin()).count();
        assert_eq!(spins, 4);
        // A probe that hits brings spinning back.
        g.record(true);
        assert!(g.should_spin());
    }
}
