//! `COPY ... FROM STDIN` over an engine that needs the whole COPY in one call.
//!
//! The client expects `CopyInResponse` before it sends data, but the engine
//! can only run the COPY with all its data in one call (running out of input
//! inside a COPY kills the PGlite backend). So the statement is first
//! *probed*: run with a `CopyFail` right behind it, inside a savepoint when a
//! transaction is open (outside one, the failure rolls back the implicit
//! transaction), which yields the exact `CopyInResponse` and no side effects.
//! The client gets everything up to it, its data is collected, and on
//! `CopyDone`/`CopyFail` the statement is replayed with the data in one call.
//! If the probe shows it was not a COPY FROM STDIN after all, the probe was
//! the real execution and its reply is the answer.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Batch, Connection, Flow, Result};
use crate::server::backend;
use crate::server::frame::Frame;

/// Name of the savepoint that makes the probe side-effect free.
const COPY_SAVEPOINT: &str = "pglite_cache_copy_probe";

/// How a COPY was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyKind {
    /// A simple `Query`.
    Simple,
    /// `Bind`/`Execute`/`Sync` of the extended protocol.
    Extended,
}

/// A `COPY FROM STDIN` whose data is being collected.
#[derive(Debug)]
pub(super) struct CopyIn {
    /// The messages that start the COPY, then the client's `CopyData`: what
    /// is replayed (one buffer, so the data is not copied again).
    replay: BytesMut,
    /// Where the data starts in `replay`.
    data_start: usize,
    /// The data exceeded the limit: it is dropped and the COPY will fail.
    over_limit: bool,
}

/// The end of the first `CopyInResponse` in `reply` (0 if none).
fn after_copy_in_response(reply: &[u8]) -> Option<usize> {
    let mut end = 0;
    for (tag, message) in backend::messages(reply) {
        end += message.len();
        if tag == b'G' {
            return Some(end);
        }
    }
    None
}

/// Engine names of the named statements that `Parse` messages in `bytes` create.
fn parsed_statements(bytes: &[u8]) -> Vec<&[u8]> {
    backend::messages(bytes)
        .filter(|(tag, _)| *tag == b'P')
        .filter_map(|(_, m)| m[5..].split(|&b| b == 0).next())
        .filter(|name| !name.is_empty())
        .collect()
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Starts a statement that may be `COPY ... FROM STDIN`.
    ///
    /// The client expects `CopyInResponse` before it sends data, but the
    /// engine can only run the COPY with all its data in one call. So the
    /// statement is first *probed*: run with a `CopyFail` right behind it,
    /// inside a savepoint when a transaction is open (outside one, the
    /// failure rolls back the implicit transaction), which yields the exact
    /// `CopyInResponse` and no side effects. The client gets everything up to
    /// it, its data is collected, and on `CopyDone`/`CopyFail` the statement
    /// is replayed with the data in one call ([`Self::finish_copy`]).
    /// If the probe shows it was not a COPY FROM STDIN after all, the probe
    /// was the real execution and its reply is the answer.
    pub(super) async fn start_copy(&mut self, start: BytesMut, kind: CopyKind) -> Result<()> {
        if self.status == b'E' {
            // A failed transaction runs nothing: the engine answers with an error.
            let mut batch = Batch { bytes: start, boundary: true, ..Batch::default() };
            return self.send_batch(&mut batch).await;
        }
        self.begin_busy(false, None).await?;
        self.session.hold().await?;
        let in_transaction = self.status == b'T';
        if in_transaction {
            self.internal(&format!("SAVEPOINT {COPY_SAVEPOINT}")).await?;
        }
        let mut probe = start.clone();
        backend::copy_fail("probe", &mut probe);
        if kind == CopyKind::Extended {
            backend::sync(&mut probe);
        }
        let mut reply = self.session.round_trip(probe).await?;
        match after_copy_in_response(&reply) {
            Some(end) => {
                self.write_out(&reply[..end]).await?;
                let after = backend::last_ready_status(&reply);
                if in_transaction {
                    self.internal(&format!(
                        "ROLLBACK TO SAVEPOINT {COPY_SAVEPOINT}; RELEASE SAVEPOINT {COPY_SAVEPOINT}"
                    ))
                    .await?;
                } else if after != Some(b'I') {
                    self.internal("ROLLBACK").await?;
                }
                // Prepared statements are not transactional: a named one the
                // probe created would make the replay's Parse fail.
                let parsed = parsed_statements(&start);
                if !parsed.is_empty() {
                    let mut close = BytesMut::new();
                    for name in parsed {
                        backend::close(b'S', name, &mut close);
                    }
                    backend::sync(&mut close);
                    self.session.round_trip(close).await?;
                }
                self.copy = Some(CopyIn { data_start: start.len(), replay: start, over_limit: false });
            }
            None => {
                if kind == CopyKind::Extended && reply.len() >= 6 && reply[reply.len() - 6] == b'Z' {
                    reply.truncate(reply.len() - 6); // the answer to the probe's own Sync
                }
                let after = backend::last_ready_status(&reply);
                if in_transaction && after == Some(b'T') {
                    self.internal(&format!("RELEASE SAVEPOINT {COPY_SAVEPOINT}")).await?;
                }
                self.forward(&reply).await?;
            }
        }
        self.after_busy().await
    }

    /// A message while collecting COPY data.
    pub(super) async fn on_copy_frame(&mut self, frame: Frame, batch: &mut Batch) -> Result<Flow> {
        let copy = self.copy.as_mut().expect("in COPY");
        match frame.tag {
            b'd' => {
                if !copy.over_limit {
                    if copy.replay.len() - copy.data_start + frame.bytes.len() > self.config.max_copy_size {
                        copy.over_limit = true;
                        copy.replay.truncate(copy.data_start);
                        copy.replay = BytesMut::from(&copy.replay[..]); // give the memory back
                    } else {
                        copy.replay.extend_from_slice(&frame.bytes);
                    }
                }
            }
            b'c' | b'f' => {
                let end = if copy.over_limit {
                    let mut fail = BytesMut::new();
                    let limit = self.config.max_copy_size;
                    backend::copy_fail(&format!("COPY data exceeds the server's limit of {limit} bytes"), &mut fail);
                    fail
                } else {
                    frame.bytes
                };
                self.finish_copy(end).await?;
            }
            // PostgreSQL ignores Flush and Sync during COPY IN.
            b'S' | b'H' => {}
            b'X' => return Ok(Flow::Close),
            other => {
                // Any other message aborts the COPY (as in PostgreSQL), then runs.
                let mut fail = BytesMut::new();
                backend::copy_fail(&format!("unexpected message type 0x{other:02X} during COPY from stdin"), &mut fail);
                self.finish_copy(fail).await?;
                return Box::pin(self.on_frame(frame, batch)).await;
            }
        }
        Ok(Flow::Continue)
    }

    /// Replays the COPY statement with its data and end message in one call.
    async fn finish_copy(&mut self, end: BytesMut) -> Result<()> {
        let CopyIn { mut replay, .. } = self.copy.take().expect("in COPY");
        replay.extend_from_slice(&end);
        // A second COPY FROM STDIN in the same query would wait for data
        // that cannot come within this call: fail it. (Ignored otherwise.)
        backend::copy_fail("only one COPY FROM STDIN per query is supported by this server", &mut replay);
        self.begin_busy(false, None).await?;
        let reply = self.session.round_trip(replay).await?;
        // The client already has the CopyInResponse (and what came before
        // it); a second one would only announce the COPY failed above.
        let skip = after_copy_in_response(&reply).unwrap_or(0);
        let rest = &reply[skip..];
        if backend::messages(rest).any(|(tag, _)| tag == b'G') {
            let kept: Vec<u8> =
                backend::messages(rest).filter(|(tag, _)| *tag != b'G').flat_map(|(_, m)| m.iter().copied()).collect();
            self.forward(&kept).await?;
        } else {
            self.forward(rest).await?;
        }
        self.after_busy().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_copy_in_response_and_parsed_names() {
        let mut reply = BytesMut::new();
        backend::command_complete("X", &mut reply);
        let g = reply.len();
        reply.extend_from_slice(b"G\0\0\0\x07\0\0\0");
        let end = reply.len();
        backend::ready_for_query(b'I', &mut reply);
        assert_eq!(after_copy_in_response(&reply), Some(end));
        assert_eq!(after_copy_in_response(&reply[..g]), None);
        let mut batch = BytesMut::new();
        batch.extend_from_slice(b"P\0\0\0\x0bpgc1_s\0\0\0\0");
        batch.extend_from_slice(b"P\0\0\0\x09\0q\0\0\0");
        assert_eq!(parsed_statements(&batch), vec![&b"pgc1_s"[..]]);
    }
}
