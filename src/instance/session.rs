//! Raw wire-protocol sessions, the basis of the wire server.

use bytes::BytesMut;
use tokio::sync::mpsc;

use super::Instance;
use super::handoff::Route;
use super::worker::{Job, Request};
use crate::error::Result;

/// A client session that sends frontend protocol bytes to the engine as they
/// are and gets the backend's bytes back.
///
/// Between round trips that leave the engine idle (`ReadyForQuery` with
/// status `I`), the engine is shared with every other caller. When a round
/// trip leaves it busy (in a transaction, in `COPY`, or an extended-protocol
/// batch not yet synced), the session keeps it exclusively until it is idle
/// again; dropping the session then rolls the open transaction back.
#[derive(Debug)]
pub struct RawSession {
    instance: Instance,
    lease: Option<mpsc::UnboundedSender<Request>>,
}

impl RawSession {
    pub(super) fn new(instance: Instance) -> RawSession {
        RawSession { instance, lease: None }
    }

    /// Sends frontend messages and returns every backend message the engine
    /// produced for them.
    pub async fn round_trip(&mut self, bytes: BytesMut) -> Result<Vec<u8>> {
        let route = match &self.lease {
            Some(lease) => Route::Lease(lease.clone()),
            None => Route::Shared(self.instance.tx.clone()),
        };
        let output = match route.call(&self.instance.shared, Job::Raw(bytes)).await {
            Ok(output) => output,
            Err(e) => {
                self.lease = None; // a failed engine ends the lease
                return Err(e);
            }
        };
        if output.lease.is_some() {
            self.lease = output.lease;
        } else if super::worker::ready_status(&output.bytes) == Some(crate::protocol::TxStatus::Idle) {
            self.lease = None; // idle again: let the others in
        }
        Ok(output.bytes)
    }

    /// Whether this session currently holds the engine exclusively.
    pub fn holds_engine(&self) -> bool {
        self.lease.is_some()
    }
}
