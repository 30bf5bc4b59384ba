//! The worker's calls into the engine: opening it, running each kind of
//! job, rolling back, closing, and reopening it after a crash.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use bytes::BytesMut;
use pglite_oxide::{ExecProtocolOptions, Pglite};
use tokio::sync::mpsc;

use super::job::{Job, Output, RawJob, Request};
use super::memory_dir::MemoryDir;
use super::shared::State;
use super::{Failure, Holder, Worker};
use crate::error::{Error, Result};
use crate::instance::options::{InstanceOptions, Storage};
use crate::protocol::{self, TxStatus, backend};

/// Opens the engine on `options`' directory, or on `memory` for an
/// in-memory instance.
pub(super) fn open(options: &InstanceOptions, memory: Option<&MemoryDir>) -> Result<Pglite> {
    let started = Instant::now();
    let mut builder = Pglite::builder();
    builder = match (&options.storage, memory) {
        (Storage::Directory(dir), _) => {
            super::data_dir::prepare(dir)?;
            builder.path(dir)
        }
        (Storage::Memory, Some(dir)) => builder.path(dir.path()),
        (Storage::Memory, None) => builder.temporary(),
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

pub(super) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".into()
    }
}

impl Worker {
    /// Runs a job. Also returns the lease holder's state after it (for the
    /// holder's own jobs, and for a job that opens a lease), and both ends of
    /// a lease the job opened.
    #[allow(clippy::type_complexity)]
    pub(super) fn run_job(
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
                let mut output = output(out, false, consumed);
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
                Ok((output(out, false, 0), None, None))
            }
            Job::CopyIn { sql, data } => {
                let out = self.copy_in(&sql, data)?;
                let mut rolled_back_open_transaction = false;
                if !leased && ready_status(&out) != Some(TxStatus::Idle) {
                    self.rollback_after_reply();
                    rolled_back_open_transaction = true;
                }
                let after = holder.map(|h| Holder { status: ready_status(&out), ..h });
                Ok((output(out, rolled_back_open_transaction, 0), after, None))
            }
            Job::Protocol(bytes) => {
                // `protocol` ends every API batch with a CopyFail guard, so a
                // `COPY ... FROM STDIN` fails instead of starving the engine.
                let out = self.round_trip(&bytes)?;
                let mut rolled_back_open_transaction = false;
                if !leased && ready_status(&out) != Some(TxStatus::Idle) {
                    self.rollback_after_reply();
                    rolled_back_open_transaction = true;
                }
                let after = holder.map(|h| Holder { status: ready_status(&out), ..h });
                Ok((output(out, rolled_back_open_transaction, 0), after, None))
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
        let out = engine
            .exec_protocol_raw(bytes, ExecProtocolOptions::no_sync())
            .map_err(|e| Failure::Crash(format!("{e:#}")))?;
        // Cheap test first (a failed transaction's `ReadyForQuery` ends the reply).
        if out.ends_with(&[b'Z', 0, 0, 0, 5, b'E'])
            && let Some(message) = stuck_portal(&out)
        {
            return Err(Failure::Crash(format!("{UNUSABLE}: {message}")));
        }
        Ok(out)
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
        let out = self.round_trip(&crate::instance::side::wrap(bytes))?;
        // The savepoint steps cannot fail in a healthy transaction.
        Ok(crate::instance::side::unwrap_reply(&out).unwrap_or_else(|e| {
            tracing::error!(instance = %self.shared.label, error = %e, "side job inside a transaction");
            let mut out = BytesMut::new();
            let text = format!("internal error running a statement beside a transaction: {e}");
            backend::error_response("ERROR", "XX000", &text, &mut out);
            backend::ready_for_query(b'I', &mut out);
            out.to_vec()
        }))
    }

    /// Rolls back what an API call left open; if that fails, the call still
    /// gets its own reply (its real error) and the worker crashes after.
    fn rollback_after_reply(&mut self) {
        if let Err(Failure::Crash(reason)) = self.rollback() {
            self.broken = Some(reason);
        }
    }

    /// Rolls back the open transaction.
    pub(super) fn rollback(&mut self) -> Result<(), Failure> {
        let mut buf = BytesMut::new();
        let _ = protocol::simple_query("ROLLBACK", &mut buf);
        let out = self.round_trip(&buf)?;
        match protocol::decode(&out).ok().and_then(|reply| reply.error) {
            // A healthy session can always roll back.
            Some(e) => Err(Failure::Crash(format!("{UNUSABLE}: ROLLBACK failed: {}", e.message))),
            None => Ok(()),
        }
    }

    pub(super) fn close(&mut self) -> Result<()> {
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
    pub(super) fn recover(&mut self, reason: &str) -> bool {
        tracing::error!(instance = %self.shared.label, %reason, "instance crashed");
        // Dropping a broken engine may itself panic; contain it.
        if let Some(engine) = self.engine.take() {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(engine)));
        }
        let Some(policy) = self.options.restart else {
            self.shared.set_state(State::Crashed(reason.into()));
            return false;
        };
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
        match open(&self.options, self.memory.as_ref()) {
            Ok(engine) => {
                tracing::warn!(instance = %self.shared.label, "instance restarted after a crash");
                self.engine = Some(engine);
                self.shared.restarts.send_modify(|n| *n += 1);
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

/// A job's reply, without a lease; the worker stamps the restart count.
fn output(bytes: Vec<u8>, rolled_back_open_transaction: bool, consumed: usize) -> Output {
    Output { bytes, rolled_back_open_transaction, lease: None, consumed, generation: 0 }
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
/// Why a session that cannot end its transaction is treated as a crash.
const UNUSABLE: &str = "the engine's session cannot end its transaction (an error inside a PL/pgSQL \
                        exception block, which this engine cannot catch, left a portal running)";

/// The message of an error saying the session's transaction can never end:
/// the engine turns every PostgreSQL error into a trap that unwinds to its
/// main loop, past `PG_CATCH` handlers, so an error inside a subtransaction
/// of a PL/pgSQL exception block leaves the statement's portal marked
/// active, and every later `ROLLBACK` or `COMMIT` fails on it.
fn stuck_portal(bytes: &[u8]) -> Option<String> {
    let reply = protocol::decode(bytes).ok()?;
    let error = reply.error?;
    (error.code == crate::SqlState::INVALID_CURSOR_STATE && error.message.starts_with("cannot drop active portal"))
        .then_some(error.message)
}

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
