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

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use pglite_oxide::{ExecProtocolOptions, Pglite};
use tokio::sync::{mpsc, oneshot};

use super::handoff;
use super::options::{InstanceOptions, Storage};
use crate::error::{Error, Result};
use crate::protocol::{self, TxStatus, backend};

/// What a handle asks of the worker.
pub(crate) enum Command {
    /// Run one job on the shared engine.
    Run(Request),
    /// Take the engine exclusively until the returned sender is dropped.
    Lease(oneshot::Sender<mpsc::UnboundedSender<Request>>),
    /// Shut the engine down gracefully.
    Stop(oneshot::Sender<Result<()>>),
}

/// One job and where to send its outcome.
pub(crate) struct Request {
    pub job: Job,
    pub reply: oneshot::Sender<Result<Output>>,
}

/// The work itself.
pub(crate) enum Job {
    /// Frontend messages ending in `Sync` or a simple `Query`: one round trip.
    Protocol(BytesMut),
    /// Frontend messages from a wire-protocol client, passed through as they
    /// are. If the engine is not idle afterwards (inside a transaction, a COPY,
    /// or an extended-protocol batch not yet synced), the caller gets a lease
    /// and keeps the engine until it is idle again.
    Raw(RawJob),
    /// `Parse`/`Describe`/`Close` ending in one `Sync`, from a wire client
    /// outside any transaction: work that need not wait for another
    /// client's transaction. While a shareable lease holder is idle inside an
    /// explicit transaction, it runs there, inside a savepoint (see
    /// `side.rs`); otherwise it runs on its own, in turn.
    Side(RawJob),
    /// `COPY ... FROM '/dev/blob'` (or a script containing one) with `data`
    /// as the contents of `/dev/blob`: the bulk-load path (pglite-oxide's
    /// `QueryOptions.blob`). The reply is shaped like a protocol reply: the
    /// statement's `CommandComplete` or `ErrorResponse`, then `ReadyForQuery`.
    CopyIn { sql: String, data: Vec<u8> },
    /// Test hook: make the worker panic, as a bug or trap in the engine would.
    Panic,
}

/// Protocol bytes of a wire client.
pub(crate) struct RawJob {
    pub bytes: BytesMut,
    /// With a claim, the caller may withdraw the job while it is still queued.
    pub claim: Option<Arc<Claim>>,
    /// If the job leaves the caller holding the engine inside a transaction,
    /// others' [`Job::Side`] work may run in that transaction (in a
    /// savepoint) meanwhile: the caller has no session settings in force.
    pub shareable: bool,
    /// Offsets in `bytes` right after an `Execute` sent with a row limit:
    /// the worker runs the bytes in parts ending there, and stops after a
    /// part whose reply ends in `PortalSuspended` (the caller fetches the
    /// rest of that portal, then sends what was not run).
    pub cuts: Vec<usize>,
}

/// Lets the caller withdraw a queued job: whoever moves it out of "queued"
/// first wins, so the caller knows for sure whether the job ran.
#[derive(Debug, Default)]
pub(crate) struct Claim(AtomicU8);

const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const WITHDRAWN: u8 = 2;

impl Claim {
    /// The worker takes the job; false if it was withdrawn.
    fn start(&self) -> bool {
        self.0.compare_exchange(QUEUED, STARTED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The caller withdraws the job; false if the worker already started it.
    pub(crate) fn withdraw(&self) -> bool {
        self.0.compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// The engine's reply to a job.
pub(crate) struct Output {
    /// Backend messages, ending with `ReadyForQuery`.
    pub bytes: Vec<u8>,
    /// A standalone call left a transaction open, so the worker rolled it back.
    pub rolled_back_open_transaction: bool,
    /// For [`Job::Raw`] run outside a lease that left the engine busy: the
    /// lease the caller now holds.
    pub lease: Option<mpsc::UnboundedSender<Request>>,
    /// For a [`RawJob`] with cuts: how many of its bytes ran.
    pub consumed: usize,
}

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
}

impl Shared {
    pub fn state(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_state(&self, state: State) {
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
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let worker_shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("pglite-{label}"))
        .spawn(move || {
            let engine = match open(&options) {
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

fn open(options: &InstanceOptions) -> Result<Pglite> {
    let started = Instant::now();
    let mut builder = Pglite::builder();
    builder = match &options.storage {
        Storage::Memory => builder.temporary(),
        Storage::Directory(dir) => builder.path(dir),
    };
    for (name, value) in &options.settings {
        builder = builder.postgres_config(name, value);
    }
    let opened =
        catch_unwind(AssertUnwindSafe(|| builder.open())).map_err(|panic| Error::Startup(panic_message(&panic)))?;
    let mut engine = opened.map_err(|e| {
        let text = format!("{e:#}");
        match &options.storage {
            Storage::Directory(dir) if text.contains("already in use") => Error::DataDirInUse(dir.clone()),
            _ => Error::Startup(text),
        }
    })?;
    // The handshake promises an instance that answers queries.
    let mut probe = BytesMut::new();
    protocol::simple_query("SELECT 1", &mut probe)?;
    let bytes = engine
        .exec_protocol_raw(&probe, ExecProtocolOptions::no_sync())
        .map_err(|e| Error::Startup(format!("{e:#}")))?;
    protocol::decode(&bytes)?.into_results()?;
    tracing::debug!(instance = %options.label(), elapsed = ?started.elapsed(), "engine opened");
    Ok(engine)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".into()
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
    fn lease_loop(&mut self, mut rx: mpsc::UnboundedReceiver<Request>, mut holder: Holder) -> Result<(), Failure> {
        let mut deferred = Vec::new();
        for request in std::mem::take(&mut self.side_found) {
            self.side_or_defer(request, holder, &mut deferred)?;
        }
        while let Some(request) = handoff::recv_blocking(&mut rx) {
            if let Job::Side(_) = request.job {
                self.side_or_defer(request, holder, &mut deferred)?;
            } else if let Some(after) = self.serve(request, Some(holder))? {
                holder = after;
            }
        }
        *self.shared.lease_route.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // The holder is gone: never leave its transaction open for the next
        // caller (when it left the engine idle there is nothing to undo).
        if holder.status != Some(TxStatus::Idle) {
            self.rollback()?;
        }
        // Side jobs that had to wait go first, before anything queued.
        for request in deferred.into_iter().rev() {
            self.backlog.push_front(Command::Run(request));
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
        let result = catch_unwind(AssertUnwindSafe(|| self.run_job(job, holder)))
            .unwrap_or_else(|panic| Err(Failure::Crash(panic_message(&panic))));
        match result {
            Ok((output, after, hold)) => {
                let _ = reply.send(Ok(output));
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

    /// Runs a job. Also returns the lease holder's state after it (for the
    /// holder's own jobs, and for a job that opens a lease), and both ends of
    /// a lease the job opened.
    #[allow(clippy::type_complexity)]
    fn run_job(
        &mut self,
        job: Job,
        holder: Option<Holder>,
    ) -> Result<
        (Output, Option<Holder>, Option<(mpsc::UnboundedSender<Request>, mpsc::UnboundedReceiver<Request>)>),
        Failure,
    > {
        let leased = holder.is_some();
        match job {
            Job::Panic => panic!("crash injected by a test"),
            Job::Raw(RawJob { bytes, shareable, cuts, .. }) => {
                let (out, consumed) = self.run_cut(&bytes, &cuts)?;
                let status = ready_status(&out);
                let mut output = Output { bytes: out, rolled_back_open_transaction: false, lease: None, consumed };
                let after = Holder { status, shareable };
                if !leased && status != Some(TxStatus::Idle) {
                    let (tx, rx) = mpsc::unbounded_channel();
                    output.lease = Some(tx.clone());
                    return Ok((output, Some(after), Some((tx, rx))));
                }
                Ok((output, leased.then_some(after), None))
            }
            Job::Side(RawJob { bytes, .. }) => {
                let in_transaction = holder.is_some_and(|h| h.status == Some(TxStatus::InTransaction));
                let out = self.run_side(&bytes, in_transaction)?;
                Ok((Output { bytes: out, rolled_back_open_transaction: false, lease: None, consumed: 0 }, None, None))
            }
            Job::CopyIn { sql, data } => {
                let out = self.copy_in(&sql, data)?;
                let mut rolled_back_open_transaction = false;
                if !leased && ready_status(&out) != Some(TxStatus::Idle) {
                    self.rollback()?;
                    rolled_back_open_transaction = true;
                }
                let after = holder.map(|h| Holder { status: ready_status(&out), ..h });
                Ok((Output { bytes: out, rolled_back_open_transaction, lease: None, consumed: 0 }, after, None))
            }
            Job::Protocol(bytes) => {
                // `protocol` ends every API batch with a CopyFail guard, so a
                // `COPY ... FROM STDIN` fails instead of starving the engine.
                let out = self.round_trip(&bytes)?;
                let mut rolled_back_open_transaction = false;
                if !leased && ready_status(&out) != Some(TxStatus::Idle) {
                    self.rollback()?;
                    rolled_back_open_transaction = true;
                }
                let after = holder.map(|h| Holder { status: ready_status(&out), ..h });
                Ok((Output { bytes: out, rolled_back_open_transaction, lease: None, consumed: 0 }, after, None))
            }
        }
    }

    /// Runs `bytes` in parts ending at `cuts`, stopping after a part whose
    /// reply ends in `PortalSuspended`; returns the replies and how many
    /// bytes ran. (Cutting keeps a portal suspended by its row limit open:
    /// a `Sync` in the same call would close it.)
    fn run_cut(&mut self, bytes: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, usize), Failure> {
        if cuts.is_empty() {
            return Ok((self.round_trip(bytes)?, bytes.len()));
        }
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
            if end <= start {
                continue;
            }
            let part = self.round_trip(&bytes[start..end])?;
            let suspended = cuts.contains(&end) && backend::last_tag_if_whole(&part) == Some(b's');
            if out.is_empty() {
                out = part;
            } else {
                out.extend_from_slice(&part);
            }
            start = end;
            if suspended {
                break;
            }
        }
        Ok((out, start))
    }

    fn round_trip(&mut self, bytes: &[u8]) -> Result<Vec<u8>, Failure> {
        let engine = self.engine.as_mut().ok_or_else(|| Failure::Crash("engine is not open".into()))?;
        // Database errors come back as ErrorResponse bytes; an `Err` here means
        // the engine itself failed (trap, I/O), and it cannot be trusted again.
        engine.exec_protocol_raw(bytes, ExecProtocolOptions::no_sync()).map_err(|e| Failure::Crash(format!("{e:#}")))
    }

    /// Runs `sql` through the engine's simple-query API with `data` as
    /// `/dev/blob`, and answers with protocol bytes: `CommandComplete` (or the
    /// `ErrorResponse`) followed by the engine's real `ReadyForQuery`.
    fn copy_in(&mut self, sql: &str, data: Vec<u8>) -> Result<Vec<u8>, Failure> {
        let engine = self.engine.as_mut().ok_or_else(|| Failure::Crash("engine is not open".into()))?;
        let options = pglite_oxide::QueryOptions { blob: Some(data), ..Default::default() };
        let mut out = BytesMut::new();
        match engine.exec(sql, Some(&options)) {
            Ok(results) => {
                let rows: usize = results.iter().filter_map(|r| r.affected_rows).sum();
                backend::command_complete(&format!("COPY {rows}"), &mut out);
            }
            Err(err) => match err.downcast_ref::<pglite_oxide::PgliteError>().map(|e| e.database_error()) {
                Some(db) => engine_error(db, &mut out),
                None => match err.downcast_ref::<pglite_oxide::DatabaseError>() {
                    Some(db) => engine_error(db, &mut out),
                    None => return Err(Failure::Crash(format!("{err:#}"))),
                },
            },
        }
        // A lone Sync makes the engine report its real transaction status.
        let mut sync = BytesMut::new();
        protocol::sync(&mut sync);
        out.extend_from_slice(&self.round_trip(&sync)?);
        Ok(out.to_vec())
    }

    /// A side job: inside the holder's open transaction (in a savepoint), or
    /// on its own when nobody is in a transaction.
    fn run_side(&mut self, bytes: &[u8], in_transaction: bool) -> Result<Vec<u8>, Failure> {
        if !in_transaction {
            let out = self.round_trip(bytes)?;
            if ready_status(&out) != Some(TxStatus::Idle) {
                self.rollback()?;
            }
            return Ok(out);
        }
        let out = self.round_trip(&super::side::wrap(bytes))?;
        // The savepoint steps cannot fail in a healthy transaction.
        Ok(super::side::unwrap_reply(&out).unwrap_or_else(|e| {
            tracing::error!(instance = %self.shared.label, error = %e, "side job inside a transaction");
            let mut out = BytesMut::new();
            let text = format!("internal error running a statement beside a transaction: {e}");
            backend::error_response("ERROR", "XX000", &text, &mut out);
            backend::ready_for_query(b'I', &mut out);
            out.to_vec()
        }))
    }

    /// Rolls back the open transaction.
    fn rollback(&mut self) -> Result<(), Failure> {
        let mut buf = BytesMut::new();
        let _ = protocol::simple_query("ROLLBACK", &mut buf);
        self.round_trip(&buf).map(drop)
    }

    fn close(&mut self) -> Result<()> {
        let Some(mut engine) = self.engine.take() else { return Ok(()) };
        let closed = catch_unwind(AssertUnwindSafe(|| engine.close()));
        drop(engine);
        match closed {
            Ok(result) => result.map_err(|e| Error::Protocol(format!("closing the engine: {e:#}"))),
            Err(panic) => Err(Error::Protocol(panic_message(&panic))),
        }
    }

    /// After a crash: reopen if the restart policy allows it, else record the
    /// crash. Returns whether the worker keeps serving.
    fn recover(&mut self, reason: &str) -> bool {
        tracing::error!(instance = %self.shared.label, %reason, "instance crashed");
        // Dropping a broken engine may itself panic; contain it.
        if let Some(engine) = self.engine.take() {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(engine)));
        }
        let Some(policy) = self.options.restart else {
            self.shared.set_state(State::Crashed(reason.into()));
            return false;
        };
        if self.options.storage == Storage::Memory {
            self.shared.set_state(State::Crashed(reason.into()));
            return false;
        }
        let now = Instant::now();
        self.restarts.retain(|t| now.duration_since(*t) < policy.within);
        if self.restarts.len() >= policy.max_restarts as usize {
            let reason =
                format!("{reason} (restart limit of {} within {:?} reached)", policy.max_restarts, policy.within);
            self.shared.set_state(State::Crashed(reason));
            return false;
        }
        self.restarts.push(now);
        self.shared.set_state(State::Restarting);
        match open(&self.options) {
            Ok(engine) => {
                tracing::warn!(instance = %self.shared.label, "instance restarted after a crash");
                self.engine = Some(engine);
                self.shared.set_state(State::Running);
                true
            }
            Err(e) => {
                self.shared.set_state(State::Crashed(format!("{reason}; restart failed: {e}")));
                false
            }
        }
    }
}

/// An `ErrorResponse` carrying the fields of an engine error.
fn engine_error(db: &pglite_oxide::DatabaseError, out: &mut BytesMut) {
    let severity = db.severity.as_deref().unwrap_or("ERROR");
    let fields = [
        (b'S', Some(severity)),
        (b'V', Some(severity)),
        (b'C', Some(db.code.as_deref().unwrap_or("XX000"))),
        (b'M', Some(db.message.as_str())),
        (b'D', db.detail.as_deref()),
        (b'H', db.hint.as_deref()),
        (b'P', db.position.as_deref()),
        (b'W', db.r#where.as_deref()),
        (b's', db.schema.as_deref()),
        (b't', db.table.as_deref()),
        (b'c', db.column.as_deref()),
        (b'd', db.data_type.as_deref()),
        (b'n', db.constraint.as_deref()),
    ];
    backend::error_fields(fields.into_iter().filter_map(|(tag, value)| Some((tag, value?))), out);
}

/// The status of the final `ReadyForQuery` (`Z`, length 5, status byte),
/// if `bytes` are whole messages ending with one.
pub(crate) fn ready_status(bytes: &[u8]) -> Option<TxStatus> {
    if backend::last_tag_if_whole(bytes) != Some(b'Z') {
        return None;
    }
    match bytes[bytes.len() - 1] {
        b'I' => Some(TxStatus::Idle),
        b'T' => Some(TxStatus::InTransaction),
        b'E' => Some(TxStatus::Failed),
        _ => None,
    }
}
