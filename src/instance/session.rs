//! Raw wire-protocol sessions, the basis of the wire server.

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};

use super::Instance;
use super::handoff::{self, Route};
use super::worker::{Claim, Command, Job, Output, RawJob, Request};
use crate::error::Result;
use crate::protocol::{TxStatus, backend};
use std::sync::Arc;

/// A client session that sends frontend protocol bytes to the engine as they
/// are and gets the backend's bytes back.
///
/// Between round trips that leave the engine idle (`ReadyForQuery` with
/// status `I`), the engine is shared with every other caller. When a round
/// trip leaves it busy (in a transaction, in `COPY`, or an extended-protocol
/// batch not yet synced), the session keeps it exclusively until it is idle
/// again; dropping the session then rolls the open transaction back.
/// [`hold`](Self::hold) takes the engine exclusively even while idle, for
/// work that must not interleave with other callers across several round trips.
#[derive(Debug)]
pub struct RawSession {
    instance: Instance,
    lease: Option<mpsc::UnboundedSender<Request>>,
    /// Keep the lease even when the engine is idle (see [`hold`](Self::hold)).
    held: bool,
    /// Whether the last round trip left the engine idle.
    idle: bool,
    /// Sent to the engine if the session is dropped while holding it.
    on_drop: Option<BytesMut>,
    /// The engine reported an error in an extended-protocol batch and skips
    /// messages until `Sync`.
    skipping_to_sync: bool,
    /// Others' side work may run inside this session's transactions.
    shareable: bool,
    /// Cuts for the next round trip (see [`cut_next`](Self::cut_next)).
    cuts: Vec<usize>,
    /// How many bytes of the last round trip ran.
    consumed: usize,
    /// A transaction begun lazily (see [`begin_lazily`](Self::begin_lazily)):
    /// runs in front of the next round trip.
    prefix: Option<Prefix>,
    /// The engine's restarts (see [`engine_restarted`](Self::engine_restarted)).
    restarts: tokio::sync::watch::Receiver<u64>,
    /// Their count when the session's first job ran: its jobs carry it. A
    /// session that has run nothing yet has nothing to lose to a restart.
    generation: Option<u64>,
}

/// Messages run on the engine in front of a session's next round trip; the
/// caller never sees their replies.
#[derive(Debug, Clone)]
struct Prefix {
    bytes: BytesMut,
    /// How many `ReadyForQuery` replies they produce.
    replies: usize,
}

impl Prefix {
    /// Removes the prefix's replies from the front of `output` (keeping
    /// notifications) and its bytes from the count of bytes that ran.
    fn strip(&self, output: &mut Output) {
        let mut seen = 0;
        let mut end = 0;
        let mut kept = Vec::new();
        for (tag, message) in backend::messages(&output.bytes) {
            if seen == self.replies {
                break;
            }
            end += message.len();
            match tag {
                b'Z' => seen += 1,
                b'A' => kept.extend_from_slice(message),
                _ => {}
            }
        }
        kept.extend_from_slice(&output.bytes[end..]);
        output.bytes = kept;
        output.consumed = output.consumed.saturating_sub(self.bytes.len());
    }
}

impl RawSession {
    pub(super) fn new(instance: Instance) -> RawSession {
        RawSession {
            restarts: instance.shared.restarts.subscribe(),
            generation: None,
            instance,
            lease: None,
            held: false,
            idle: true,
            on_drop: None,
            skipping_to_sync: false,
            shareable: false,
            cuts: Vec::new(),
            consumed: 0,
            prefix: None,
        }
    }

    /// Takes note of a plain `BEGIN` the caller answered itself, without the
    /// engine: it runs in front of the session's next round trip, so the
    /// engine is taken when the transaction's first statement comes, not
    /// while the client prepares it. The session must be idle and not hold
    /// the engine.
    pub fn begin_lazily(&mut self) {
        debug_assert!(self.idle && self.lease.is_none() && self.prefix.is_none());
        let mut bytes = BytesMut::new();
        backend::query("BEGIN", &mut bytes);
        self.prefix = Some(Prefix { bytes, replies: 1 });
    }

    /// Whether a [`begin_lazily`](Self::begin_lazily) transaction has not
    /// reached the engine yet.
    pub fn begin_pending(&self) -> bool {
        self.prefix.is_some()
    }

    /// The client was told that its first statement after a lazy `BEGIN`
    /// failed with this error before it ran (withdrawn from the queue): the
    /// transaction reaches the engine failed, as the client believes it is.
    pub fn fail_pending_begin(&mut self, code: &str, message: &str) {
        let Some(prefix) = self.prefix.as_mut() else { return };
        let sql = format!(
            "DO $pglite_cache$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = {}; END$pglite_cache$",
            postgres_protocol::escape::escape_literal(message)
        );
        backend::query(&sql, &mut prefix.bytes);
        prefix.replies += 1;
    }

    /// Puts the pending prefix (if any) in front of `bytes`, shifting the cuts.
    fn prefixed(&mut self, bytes: BytesMut) -> (BytesMut, Vec<usize>, Option<Prefix>) {
        let cuts = std::mem::take(&mut self.cuts);
        let Some(prefix) = self.prefix.take() else { return (bytes, cuts, None) };
        let mut all = BytesMut::with_capacity(prefix.bytes.len() + bytes.len());
        all.extend_from_slice(&prefix.bytes);
        all.extend_from_slice(&bytes);
        let shift = prefix.bytes.len();
        (all, cuts.into_iter().map(|cut| cut + shift).collect(), Some(prefix))
    }

    /// Sends frontend messages and returns every backend message the engine
    /// produced for them.
    pub async fn round_trip(&mut self, bytes: BytesMut) -> Result<Vec<u8>> {
        let route = match &self.lease {
            Some(lease) => Route::Lease(lease.clone()),
            None => Route::Shared(self.instance.tx.clone()),
        };
        let (bytes, cuts, prefix) = self.prefixed(bytes);
        let job = Job::Raw(self.raw_job(bytes, None, self.shareable, cuts));
        match route.call(&self.instance.shared, job).await {
            Ok(mut output) => {
                if let Some(prefix) = prefix {
                    prefix.strip(&mut output);
                }
                Ok(self.note(output))
            }
            Err(e) => {
                self.lease = None; // a failed engine ends the lease
                Err(e)
            }
        }
    }

    /// [`round_trip`](Self::round_trip) that gives up if `withdraw` completes
    /// while the bytes still wait for the engine (behind other callers):
    /// `Ok(None)` then means they were never run. Once the engine has started
    /// on them, or when this session holds the engine, they run to the end.
    pub async fn round_trip_or_withdraw(
        &mut self,
        bytes: BytesMut,
        withdraw: impl std::future::Future<Output = ()>,
    ) -> Result<Option<Vec<u8>>> {
        if self.lease.is_some() {
            return self.round_trip(bytes).await.map(Some);
        }
        let claim = Arc::new(Claim::default());
        let (bytes, cuts, prefix) = self.prefixed(bytes);
        let job = Job::Raw(self.raw_job(bytes, Some(claim.clone()), self.shareable, cuts));
        let (reply, rx) = oneshot::channel();
        self.instance.tx.send(Command::Run(Request { job, reply })).map_err(|_| self.instance.shared.closed_error())?;
        self.await_or_withdraw(rx, claim, withdraw, prefix).await
    }

    /// Runs `Parse`/`Describe`/`Close` messages ending in one `Sync` (and
    /// nothing else) while this session does not hold the engine and is not
    /// in a transaction: if another session holds the engine inside a
    /// transaction, they run there (in a savepoint, so their errors cannot
    /// affect it) instead of waiting for it to end. Like
    /// [`round_trip_or_withdraw`](Self::round_trip_or_withdraw) otherwise.
    pub async fn side_trip_or_withdraw(
        &mut self,
        bytes: BytesMut,
        withdraw: impl std::future::Future<Output = ()>,
    ) -> Result<Option<Vec<u8>>> {
        self.cuts.clear(); // side work has no Execute
        if self.lease.is_some() {
            return self.round_trip(bytes).await.map(Some);
        }
        // Inside a lazily begun transaction that has not reached the engine,
        // the work runs beside others' transactions too (the pgbench
        // deadlock above would come back otherwise: its `BEGIN` is answered
        // at once, and the `Parse` of its next statement is synchronous).
        let lazy = self.prefix.is_some();
        let shared = &self.instance.shared;
        let claim = Arc::new(Claim::default());
        let (reply, rx) = oneshot::channel();
        let job = Job::Side(self.raw_job(bytes, Some(claim.clone()), false, Vec::new()));
        let mut request = Some(Request { job, reply });
        {
            // Under the lock the worker takes to start and end leases.
            let route = shared.lease_route.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(lease) = route.as_ref().and_then(|weak| weak.upgrade())
                && let Some(r) = request.take()
                && let Err(returned) = lease.send(r)
            {
                request = Some(returned.0);
            }
            if let Some(request) = request {
                self.instance.tx.send(Command::Run(request)).map_err(|_| shared.closed_error())?;
            }
        }
        let reply = self.await_or_withdraw(rx, claim, withdraw, None).await?;
        Ok(if lazy { reply.map(|reply| self.in_lazy_transaction(reply)) } else { reply })
    }

    /// The reply to side work run for a session inside a lazily begun
    /// transaction: it says what the client's transaction is now (failed
    /// if the work failed, as a failed `Parse` inside a transaction fails
    /// it in PostgreSQL; then so does the transaction on the engine).
    fn in_lazy_transaction(&mut self, mut reply: Vec<u8>) -> Vec<u8> {
        let failed = backend::has_error(&reply);
        if failed {
            self.fail_pending_begin("25P02", "a statement of this transaction failed before it reached the engine");
        }
        if super::worker::ready_status(&reply).is_some()
            && let Some(status) = reply.last_mut()
        {
            *status = if failed { b'E' } else { b'T' };
        }
        reply
    }

    async fn await_or_withdraw(
        &mut self,
        rx: oneshot::Receiver<Result<Output>>,
        claim: Arc<Claim>,
        withdraw: impl std::future::Future<Output = ()>,
        prefix: Option<Prefix>,
    ) -> Result<Option<Vec<u8>>> {
        let shared = self.instance.shared.clone();
        let reply = handoff::reply(rx, &shared, false, Some(&claim.started));
        tokio::pin!(reply);
        let output = tokio::select! {
            output = &mut reply => output,
            () = withdraw => {
                if claim.withdraw() {
                    self.prefix = prefix; // it did not run: still pending
                    return Ok(None);
                }
                reply.await
            }
        };
        let mut output = output.map_err(|_| shared.closed_error())??;
        if let Some(prefix) = prefix {
            prefix.strip(&mut output);
        }
        Ok(Some(self.note(output)))
    }

    /// Takes note of a reply: the engine's state and the lease.
    fn note(&mut self, output: Output) -> Vec<u8> {
        self.generation.get_or_insert(output.generation);
        self.consumed = output.consumed;
        let status = super::worker::ready_status(&output.bytes);
        self.idle = status == Some(TxStatus::Idle);
        self.skipping_to_sync = match status {
            Some(_) => false,
            None => self.skipping_to_sync || backend::has_error(&output.bytes),
        };
        if output.lease.is_some() {
            self.lease = output.lease;
        } else if self.idle && !self.held {
            self.lease = None; // idle again: let the others in
        }
        output.bytes
    }

    /// Takes the engine exclusively (waiting for its turn behind earlier
    /// callers) until [`release`](Self::release), even between round trips
    /// that leave it idle. Does nothing if the session already holds it.
    pub async fn hold(&mut self) -> Result<()> {
        self.held = true;
        if self.lease.is_some() {
            return Ok(());
        }
        let shared = &self.instance.shared;
        let (reply, lease) = oneshot::channel();
        self.instance.tx.send(Command::Lease(reply)).map_err(|_| shared.closed_error())?;
        self.lease = Some(lease.await.map_err(|_| shared.closed_error())?);
        Ok(())
    }

    /// Ends a [`hold`](Self::hold): the engine is shared again as soon as it
    /// is idle (at once if it is idle now).
    pub fn release(&mut self) {
        self.held = false;
        if self.idle {
            self.lease = None;
        }
    }

    /// Whether the last round trip left the engine idle (`ReadyForQuery`
    /// status `I`); true before the first one.
    pub fn is_idle(&self) -> bool {
        self.idle
    }

    /// Frontend messages to run when the session is dropped: on its lease
    /// if it holds the engine (before the engine goes to others; the open
    /// transaction is rolled back in any case), else queued like any call.
    /// The wire server uses it to close what a client created and to reset
    /// its settings. Their reply is discarded; they must leave the engine
    /// idle (a transaction they leave open is rolled back).
    pub fn on_drop(&mut self, bytes: BytesMut) {
        self.on_drop = Some(bytes);
    }

    /// Whether the engine reported an error in an extended-protocol batch of
    /// this session and skips its messages until the next `Sync`.
    pub fn skipping_to_sync(&self) -> bool {
        self.skipping_to_sync
    }

    /// Declares whether other sessions' side work (see
    /// [`side_trip_or_withdraw`](Self::side_trip_or_withdraw)) may run inside
    /// this session's transactions: only when it has no session settings in
    /// force that could change how their statements are parsed.
    pub fn set_shareable(&mut self, shareable: bool) {
        self.shareable = shareable;
    }

    /// Makes the next round trip run its bytes in parts ending at these
    /// offsets (each right after an `Execute` with a row limit), stopping
    /// after a part that leaves its portal suspended;
    /// [`consumed`](Self::consumed) then says how many bytes ran.
    pub(crate) fn cut_next(&mut self, cuts: Vec<usize>) {
        self.cuts = cuts;
    }

    /// How many bytes of the last round trip ran (all of them unless it
    /// stopped at a cut).
    pub(crate) fn consumed(&self) -> usize {
        self.consumed
    }

    /// Completes when the engine restarts after a crash, which ends what this
    /// session held on it (its round trips then fail with SQLSTATE 57P02).
    pub async fn engine_restarted(&mut self) {
        loop {
            if let Some(generation) = self.generation
                && *self.restarts.borrow_and_update() != generation
            {
                return;
            }
            if self.restarts.changed().await.is_err() {
                std::future::pending::<()>().await; // the instance is gone: no restart
            }
        }
    }

    fn raw_job(&self, bytes: BytesMut, claim: Option<Arc<Claim>>, shareable: bool, cuts: Vec<usize>) -> RawJob {
        RawJob { bytes, claim, shareable, cuts, generation: self.generation }
    }

    /// Whether this session currently holds the engine exclusively.
    pub fn holds_engine(&self) -> bool {
        self.lease.is_some()
    }
}

impl Drop for RawSession {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            // Not holding the engine: the cleanup is queued like any call
            // (the engine is idle when it runs); its reply is discarded.
            if let Some(bytes) = self.on_drop.take() {
                let (reply, _) = oneshot::channel();
                let job = Job::Raw(self.raw_job(bytes, None, false, Vec::new()));
                let _ = self.instance.tx.send(Command::Run(Request { job, reply }));
            }
            return;
        };
        let mut bytes = BytesMut::new();
        if self.skipping_to_sync {
            // Else the engine would swallow the rollback (and the next
            // caller's messages) until a Sync. After an error, Sync ends the
            // failed implicit transaction; it commits nothing.
            postgres_protocol::message::frontend::sync(&mut bytes);
        }
        if let Some(on_drop) = self.on_drop.take() {
            bytes.extend_from_slice(&on_drop);
        }
        if !bytes.is_empty() {
            // Queued on the lease before it closes, so it runs before the
            // worker's rollback and before anybody else.
            let (reply, _) = oneshot::channel();
            let job = Job::Raw(self.raw_job(bytes, None, false, Vec::new()));
            let _ = lease.send(Request { job, reply });
        }
    }
}
