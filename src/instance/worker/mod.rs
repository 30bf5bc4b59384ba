//! The worker thread that owns one engine.
//!
//! `pglite_oxide::Pglite` is not `Send`, so it is opened on the worker thread
//! and never leaves it. Handles talk to the worker over a channel; each call
//! carries a oneshot for its reply (the sqlx-sqlite worker pattern). Opening is
//! a handshake: `spawn` returns once the engine answers queries, or with the
//! open error.
//!
//! A *lease* gives one caller the engine exclusively: while it is held the
//! worker serves only the lease's channel, so nothing interleaves into an
//! interactive transaction (or, later, a wire-protocol session). When the lease
//! is dropped with a transaction still open, the worker rolls it back.
//!
//! This module schedules jobs and leases; `job` holds the messages between
//! handles and the worker, `shared` the state they share, and `engine` the
//! calls into the engine (opening, each kind of job, crash recovery).

mod data_dir;
mod engine;
mod job;
mod memory_dir;
mod shared;

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pglite_oxide::Pglite;
use tokio::sync::{mpsc, oneshot};

use super::handoff;
use super::options::InstanceOptions;
use crate::error::{Error, Result};
use crate::protocol::TxStatus;
pub(crate) use engine::ready_status;
use engine::{open, panic_message};
pub(crate) use job::{Claim, Command, Job, Output, RawJob, Request};
use memory_dir::MemoryDir;
pub(crate) use shared::{Shared, State};

/// Starts a worker thread and waits until its engine answers queries.
pub(crate) async fn spawn(options: InstanceOptions) -> Result<(mpsc::UnboundedSender<Command>, Arc<Shared>)> {
    let label = options.label();
    let shared = Arc::new(Shared {
        label: label.clone(),
        state: Mutex::new(State::Running),
        in_flight: Default::default(),
        data_dir: match options.storage() {
            crate::instance::options::Storage::Directory(dir) => Some(dir.clone()),
            crate::instance::options::Storage::Memory => None,
        },
        lease_route: Mutex::new(None),
        restarts: tokio::sync::watch::channel(0).0,
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let worker_shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("pglite-{label}"))
        .spawn(move || {
            let memory = match options.storage() {
                crate::instance::options::Storage::Memory => match MemoryDir::create() {
                    Ok(dir) => Some(dir),
                    Err(e) => {
                        let text = format!("cannot create the in-memory instance's directory: {e}");
                        let _ = ready_tx.send(Err(Error::Startup(text)));
                        return;
                    }
                },
                crate::instance::options::Storage::Directory(_) => None,
            };
            let engine = match open(&options, memory.as_ref()) {
                Ok(engine) => engine,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            Worker {
                engine: Some(engine),
                options,
                shared: worker_shared,
                restarts: Vec::new(),
                queue: rx,
                backlog: VecDeque::new(),
                side_found: Vec::new(),
                broken: None,
                memory,
            }
            .run();
        })
        .map_err(|e| Error::Startup(format!("cannot spawn worker thread: {e}")))?;
    match ready_rx.await {
        Ok(Ok(())) => Ok((tx, shared)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Startup("worker thread panicked while opening the engine".into())),
    }
}

/// Why a job could not complete.
enum Failure {
    /// The engine is unusable (panic or trap): the worker must crash.
    Crash(String),
}

struct Worker {
    engine: Option<Pglite>,
    options: InstanceOptions,
    shared: Arc<Shared>,
    /// When recent restarts happened, for the restart policy's window.
    restarts: Vec<Instant>,
    queue: mpsc::UnboundedReceiver<Command>,
    /// Commands taken off the queue at the start of a lease (to find the
    /// side jobs among them), served in order before the queue.
    backlog: VecDeque<Command>,
    /// Side jobs found in the queue when the current lease started.
    side_found: Vec<Request>,
    /// An in-memory instance's directory (reopened after a crash; removed
    /// when the worker ends, after the engine is closed).
    memory: Option<MemoryDir>,
    /// The engine failed after a job's reply was ready (the rollback
    /// behind an API call): it is answered, then the worker crashes.
    broken: Option<String>,
}

/// What the worker knows of the lease holder's session.
#[derive(Debug, Clone, Copy)]
struct Holder {
    /// Status after its last job (`None`: mid-batch or in COPY).
    status: Option<TxStatus>,
    shareable: bool,
}

impl Worker {
    fn next_command(&mut self) -> Option<Command> {
        match self.backlog.pop_front() {
            Some(command) => Some(command),
            None => handoff::recv_blocking(&mut self.queue),
        }
    }

    fn run(mut self) {
        while let Some(command) = self.next_command() {
            let outcome = match command {
                Command::Run(request) => self.serve(request, None).map(drop),
                Command::Lease(reply) => self.serve_lease(reply),
                Command::Stop(reply) => {
                    let result = self.close();
                    self.memory = None; // removed before `stop()` returns
                    self.shared.set_state(State::Stopped);
                    let _ = reply.send(result);
                    return;
                }
            };
            if let Err(Failure::Crash(reason)) = outcome
                && !self.recover(&reason)
            {
                return;
            }
        }
        // Every handle is gone: shut down as `stop()` would.
        if let Err(e) = self.close() {
            tracing::warn!(instance = %self.shared.label, error = %e, "closing engine failed");
        }
        self.shared.set_state(State::Stopped);
    }

    fn serve_lease(&mut self, reply: oneshot::Sender<mpsc::UnboundedSender<Request>>) -> Result<(), Failure> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.publish_lease(&tx);
        if reply.send(tx).is_err() {
            *self.shared.lease_route.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(()); // the caller gave up waiting
        }
        // A Rust API transaction: its settings are unknown, so it is not shared.
        self.lease_loop(rx, Holder { status: Some(TxStatus::Idle), shareable: false })
    }

    /// Makes the lease the target of side jobs, and takes the side jobs
    /// already queued (the rest of the queue waits in the backlog, in order).
    fn publish_lease(&mut self, tx: &mpsc::UnboundedSender<Request>) {
        let mut route = self.shared.lease_route.lock().unwrap_or_else(|e| e.into_inner());
        *route = Some(tx.downgrade());
        while let Ok(command) = self.queue.try_recv() {
            match command {
                Command::Run(request @ Request { job: Job::Side(_), .. }) => self.side_found.push(request),
                other => self.backlog.push_back(other),
            }
        }
    }

    /// Serves only the lease holder (and side jobs) until it drops its sender.
    fn lease_loop(&mut self, rx: mpsc::UnboundedReceiver<Request>, holder: Holder) -> Result<(), Failure> {
        let mut deferred = Vec::new();
        let result = self.lease_turns(rx, holder, &mut deferred);
        *self.shared.lease_route.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Side jobs that had to wait go first, before anything queued (also
        // after a crash: they run on the restarted engine).
        for request in deferred.into_iter().rev() {
            self.backlog.push_front(Command::Run(request));
        }
        result
    }

    fn lease_turns(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<Request>,
        mut holder: Holder,
        deferred: &mut Vec<Request>,
    ) -> Result<(), Failure> {
        for request in std::mem::take(&mut self.side_found) {
            self.side_or_defer(request, holder, deferred)?;
        }
        while let Some(request) = handoff::recv_blocking(&mut rx) {
            if let Job::Side(_) = request.job {
                self.side_or_defer(request, holder, deferred)?;
            } else if let Some(after) = self.serve(request, Some(holder))? {
                holder = after;
            }
        }
        // The holder is gone: never leave its transaction open for the next
        // caller (when it left the engine idle there is nothing to undo).
        if holder.status != Some(TxStatus::Idle) {
            self.rollback()?;
        }
        Ok(())
    }

    /// Runs a side job inside the holder's transaction if that is safe now,
    /// else keeps it for when the lease ends.
    fn side_or_defer(&mut self, request: Request, holder: Holder, deferred: &mut Vec<Request>) -> Result<(), Failure> {
        let ready = holder.shareable && matches!(holder.status, Some(TxStatus::InTransaction | TxStatus::Idle));
        if !ready {
            deferred.push(request);
            return Ok(());
        }
        self.serve(request, Some(holder)).map(drop)
    }

    /// Runs one job; the reply is sent here, also when the engine fails.
    /// `holder`: the lease this job runs under, if any; returns the holder's
    /// state after it (for jobs of the holder).
    fn serve(&mut self, request: Request, holder: Option<Holder>) -> Result<Option<Holder>, Failure> {
        let Request { job, reply } = request;
        if let Job::Raw(RawJob { claim: Some(claim), .. }) | Job::Side(RawJob { claim: Some(claim), .. }) = &job
            && !claim.start()
        {
            return Ok(None); // withdrawn while queued: it never runs
        }
        let generation = *self.shared.restarts.borrow();
        if let Job::Raw(RawJob { generation: Some(session), .. }) | Job::Side(RawJob { generation: Some(session), .. }) =
            &job
            && *session != generation
        {
            let _ = reply.send(Err(Error::engine_restarted()));
            return Ok(None);
        }
        let result = catch_unwind(AssertUnwindSafe(|| self.run_job(job, holder)))
            .unwrap_or_else(|panic| Err(Failure::Crash(panic_message(&panic))));
        match result {
            Ok((mut output, after, hold)) => {
                output.generation = generation;
                let _ = reply.send(Ok(output));
                if let Some(reason) = self.broken.take() {
                    return Err(Failure::Crash(reason));
                }
                match hold {
                    Some((tx, rx)) => {
                        self.publish_lease(&tx);
                        drop(tx); // the caller has its clone (or gave up: then the lease ends at once)
                        self.lease_loop(rx, after.expect("a job that opens a lease reports its state"))?;
                        Ok(None)
                    }
                    None => Ok(after),
                }
            }
            Err(Failure::Crash(reason)) => {
                let _ = reply.send(Err(Error::Crashed { name: self.shared.label.clone(), reason: reason.clone() }));
                Err(Failure::Crash(reason))
            }
        }
    }
}
