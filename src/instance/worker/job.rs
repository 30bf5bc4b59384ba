//! What handles send the worker, and what it answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};

use crate::error::Result;

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
    /// The engine's restart count when the session's first job ran (`None`
    /// before): a job of a session from before a restart is refused (see
    /// `Shared::restarts`), as what it refers to died with the engine.
    pub generation: Option<u64>,
}

/// Lets the caller withdraw a queued job: whoever moves it out of "queued"
/// first wins, so the caller knows for sure whether the job ran.
#[derive(Debug, Default)]
pub(crate) struct Claim {
    state: AtomicU8,
    /// Signalled when the worker starts the job: a caller parked behind
    /// others wakes up while the engine runs it, not after (see
    /// `handoff::reply`).
    pub(crate) started: tokio::sync::Notify,
}

const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const WITHDRAWN: u8 = 2;

impl Claim {
    /// The worker takes the job; false if it was withdrawn.
    pub(super) fn start(&self) -> bool {
        let started = self.state.compare_exchange(QUEUED, STARTED, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if started {
            self.started.notify_one();
        }
        started
    }

    /// The caller withdraws the job; false if the worker already started it.
    pub(crate) fn withdraw(&self) -> bool {
        self.state.compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire).is_ok()
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
    /// The engine's restart count when it ran.
    pub generation: u64,
}
