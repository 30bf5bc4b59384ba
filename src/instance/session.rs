//! Raw wire-protocol sessions, the basis of the wire server.

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};

use super::Instance;
use super::handoff::{self, Route};
use super::worker::{Claim, Command, Job, Output, Request};
use crate::error::Result;
use crate::protocol::TxStatus;
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
}

impl RawSession {
    pub(super) fn new(instance: Instance) -> RawSession {
        RawSession { instance, lease: None, held: false, idle: true, on_drop: None, skipping_to_sync: false }
    }

    /// Sends frontend messages and returns every backend message the engine
    /// produced for them.
    pub async fn round_trip(&mut self, bytes: BytesMut) -> Result<Vec<u8>> {
        let route = match &self.lease {
            Some(lease) => Route::Lease(lease.clone()),
            None => Route::Shared(self.instance.tx.clone()),
        };
        match route.call(&self.instance.shared, Job::Raw(bytes, None)).await {
            Ok(output) => Ok(self.note(output)),
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
        let shared = self.instance.shared.clone();
        let claim = Arc::new(Claim::default());
        let (reply, rx) = oneshot::channel();
        self.instance
            .tx
            .send(Command::Run(Request { job: Job::Raw(bytes, Some(claim.clone())), reply }))
            .map_err(|_| shared.closed_error())?;
        let reply = handoff::reply(rx, &shared);
        tokio::pin!(reply);
        let output = tokio::select! {
            output = &mut reply => output,
            () = withdraw => {
                if claim.withdraw() {
                    return Ok(None);
                }
                reply.await
            }
        };
        let output = output.map_err(|_| shared.closed_error())??;
        Ok(Some(self.note(output)))
    }

    /// Takes note of a reply: the engine's state and the lease.
    fn note(&mut self, output: Output) -> Vec<u8> {
        let status = super::worker::ready_status(&output.bytes);
        self.idle = status == Some(TxStatus::Idle);
        self.skipping_to_sync = match status {
            Some(_) => false,
            None => self.skipping_to_sync || has_error(&output.bytes),
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

    /// Frontend messages to run if the session is dropped while it holds the
    /// engine (before the engine goes to others; the open transaction is
    /// rolled back in any case). The wire server uses it to reset session
    /// settings of a client that vanished mid-transaction. Their reply is
    /// discarded.
    pub fn on_drop(&mut self, bytes: BytesMut) {
        self.on_drop = Some(bytes);
    }

    /// Whether this session currently holds the engine exclusively.
    pub fn holds_engine(&self) -> bool {
        self.lease.is_some()
    }
}

impl Drop for RawSession {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else { return };
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
            let _ = lease.send(Request { job: Job::Raw(bytes, None), reply });
        }
    }
}

/// Whether backend bytes contain an `ErrorResponse`.
fn has_error(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    while rest.len() >= 5 {
        if rest[0] == b'E' {
            return true;
        }
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 || rest.len() < 1 + len as usize {
            return false;
        }
        rest = &rest[1 + len as usize..];
    }
    false
}
