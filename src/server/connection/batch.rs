//! Sending a batch to the engine and its reply to the client, in parts
//! when it has chunked `Execute`s (see `chunks.rs`).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::chunks::{self, Next, Progress};
use super::waiting::{Withdrawn, is_side_work, withdrawable_groups, withdrawn_answer};
use super::{Batch, Connection, Listening, Result};
use crate::server::backend;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Sends the batch (if any) and forwards the reply. A batch with
    /// chunked `Execute`s (see `chunks.rs`) goes in segments, each ending
    /// with one of them, whose rows are forwarded chunk by chunk.
    pub(super) async fn send_batch(&mut self, batch: &mut Batch) -> Result<()> {
        if batch.bytes.is_empty() {
            *batch = Batch::default();
            return Ok(());
        }
        if batch.begin_bind.is_some() && self.extended_begin(batch).await? {
            self.namer.engine_called(0, false); // its Bind never reached the engine
            *batch = Batch::default();
            return Ok(());
        }
        let may_change = batch.may_change_settings;
        let copy_candidate = batch.copy_candidate;
        let listens = std::mem::take(&mut batch.listens);
        let mut sql_names = std::mem::take(&mut batch.sql_names);
        let Batch { bytes: client_bytes, cuts, simple, .. } = std::mem::take(batch);
        // Unnamed statements/portals this connection replaced earlier are
        // closed first (their CloseComplete is not for the client). Not while
        // the engine skips to a Sync after an error: they would be skipped.
        let mut bytes = BytesMut::new();
        let closes = if self.session.skipping_to_sync() { 0 } else { self.namer.take_obsolete(&mut bytes) };
        let shift = bytes.len();
        bytes.extend_from_slice(&client_bytes);
        drop(client_bytes);
        if copy_candidate {
            // A possible COPY FROM STDIN sent without the probe (a spilled
            // batch): fail it rather than leave the engine waiting for data
            // it cannot wait for. Outside COPY, CopyFail is ignored. (Every
            // COPY FROM STDIN names STDIN in its text, so batches without a
            // candidate cannot start one.)
            backend::copy_fail("COPY FROM STDIN must be followed by Sync or Flush on this server", &mut bytes);
        }
        // Listen before the batch runs, so that its own NOTIFYs find it.
        for listen in &listens {
            if let Listening::Listen(channel) = listen {
                self.hub.listen(channel, self.id, &self.notify_tx);
            }
        }
        let groups = withdrawable_groups(&bytes);
        let mut progress: Vec<Progress> = cuts.iter().map(|cut| Progress::new(cut.wanted)).collect();
        let cut_ends: Vec<usize> = cuts.iter().map(|cut| cut.end + shift).collect();
        for (end, progress) in cut_ends.iter().zip(&progress) {
            chunks::set_limit(&mut bytes, *end, progress.limit());
        }
        // The worker runs the batch in parts ending at the cuts and stops
        // after a part that left its portal suspended (one call when every
        // result fits in its first chunk); the rest is sent after the
        // portal's other chunks.
        let mut base = 0; // where `bytes` starts in the whole batch
        let mut first = true;
        let mut failed = false;
        loop {
            let len = bytes.len();
            let local: Vec<usize> = cut_ends.iter().filter(|&&end| end > base).map(|end| end - base).collect();
            let keep = if local.is_empty() { None } else { Some(bytes.clone()) };
            let mut reply = if first {
                match self.run_batch(bytes, groups, local, may_change, &listens).await? {
                    Ok(reply) => reply,
                    Err(withdrawn) => {
                        // Nothing ran: every statement group of the batch gets the error.
                        self.namer.engine_called(0, false);
                        for listen in &listens {
                            if let Listening::Listen(channel) = listen {
                                self.hub.unlisten(channel, self.id);
                            }
                        }
                        return self.forward(&withdrawn).await;
                    }
                }
            } else {
                self.session.cut_next(local);
                self.session.round_trip(bytes).await?
            };
            let consumed = if keep.is_some() { self.session.consumed().min(len) } else { len };
            if first && closes > 0 {
                reply = backend::without_first_close_completes(reply, closes);
            }
            first = false;
            let at = base + consumed;
            if let Some(k) = cut_ends.iter().position(|&end| end == at)
                && backend::messages(&reply).last().is_some_and(|(tag, _)| tag == b's')
            {
                while let Next::More(rows) = progress[k].take(&mut reply) {
                    failed |= self.forward_part(reply, simple).await?;
                    let mut next = BytesMut::new();
                    chunks::execute(&cuts[k].portal, rows, &mut next);
                    reply = self.session.round_trip(next).await?;
                }
            }
            if consumed < len {
                failed |= self.forward_part(reply, simple).await?;
                bytes = keep.map(|mut kept| kept.split_off(consumed)).unwrap_or_default();
                base = at;
                continue;
            }
            self.namer.engine_called(closes, backend::last_ready_status(&reply) == Some(b'I'));
            failed |= backend::messages(&reply).any(|(tag, _)| tag == b'E');
            if !sql_names.is_empty() {
                self.note_sql_names(std::mem::take(&mut sql_names), failed);
            }
            tracing::trace!(bytes = reply.len(), status = ?backend::last_ready_status(&reply).map(char::from), "reply from engine");
            if listens.iter().any(|l| !matches!(l, Listening::Listen(_))) {
                self.unlisten(&listens).await?;
            }
            let reply = if simple { chunks::simple_shape(reply) } else { reply };
            self.forward(&reply).await?;
            break;
        }
        self.after_busy().await
    }

    /// Forwards part of a reply (a chunk, or the reply to a segment of a
    /// batch); true if it has an error.
    pub(super) async fn forward_part(&mut self, reply: Vec<u8>, simple: bool) -> Result<bool> {
        let failed = backend::messages(&reply).any(|(tag, _)| tag == b'E');
        let reply = if simple { chunks::simple_shape(reply) } else { reply };
        self.forward(&reply).await?;
        Ok(failed)
    }

    /// Waits for the engine and runs the batch. `Ok(Err(answer))`: the batch
    /// was withdrawn before it ran (cancelled, or it waited longer than the
    /// queue limit), and `answer` is what the client gets instead.
    /// `groups`: the statement groups of the whole batch (`bytes` may be its
    /// first segment).
    pub(super) async fn run_batch(
        &mut self,
        bytes: BytesMut,
        groups: usize,
        cuts: Vec<usize>,
        may_change: bool,
        listens: &[Listening],
    ) -> Result<std::result::Result<Vec<u8>, Vec<u8>>> {
        // After a lazy BEGIN, only a lone statement group is answered
        // without running (a later group could end the transaction).
        let groups = if self.session.begin_pending() && groups > 1 { 0 } else { groups };
        let limit = self.config.queue_wait_timeout.filter(|_| groups > 0);
        if !self.begin_busy(may_change, limit).await? {
            return Ok(Err(self.withdrawn(groups, Withdrawn::QueueTimeout(limit.unwrap_or_default()))));
        }
        if listens.iter().any(|l| !matches!(l, Listening::Listen(_))) {
            // Keep the engine until the channels others still want are
            // listened to again, so that no NOTIFY slips in between.
            if !self.hold_within(limit).await? {
                return Ok(Err(self.withdrawn(groups, Withdrawn::QueueTimeout(limit.unwrap_or_default()))));
            }
        }
        tracing::trace!(bytes = bytes.len(), holds = self.session.holds_engine(), "batch to engine");
        self.session.cut_next(cuts);
        if groups == 0 || self.session.holds_engine() {
            return Ok(Ok(self.session.round_trip(bytes).await?));
        }
        let cancel = self.cancel.clone();
        let cancelled = cancel.notified();
        tokio::pin!(cancelled);
        cancelled.as_mut().enable(); // a cancel from now on counts
        // A cancel withdraws only a batch of one statement (what a driver
        // sends for the statement the user cancels).
        let single = groups == 1;
        let why = std::sync::Mutex::new(None);
        let withdraw = async {
            let waited = async {
                match limit {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancelled, if single => *why.lock().unwrap_or_else(|e| e.into_inner()) = Some(Withdrawn::Cancelled),
                () = waited => {
                    *why.lock().unwrap_or_else(|e| e.into_inner()) = Some(Withdrawn::QueueTimeout(limit.unwrap_or_default()))
                }
            }
        };
        // Parse/Describe/Close outside a transaction need not wait for
        // another client's transaction (see `instance/side.rs`).
        // So may those of a client whose transaction was begun lazily and
        // has not reached the engine (see `lazy_begin.rs`).
        let outside = self.status == b'I' || (self.status == b'T' && self.session.begin_pending());
        let side = outside && !self.session.skipping_to_sync() && is_side_work(&bytes);
        let outcome = if side {
            self.session.side_trip_or_withdraw(bytes, withdraw).await?
        } else {
            self.session.round_trip_or_withdraw(bytes, withdraw).await?
        };
        match outcome {
            Some(reply) => Ok(Ok(reply)),
            None => {
                let why = why.lock().unwrap_or_else(|e| e.into_inner()).take();
                Ok(Err(self.withdrawn(groups, why.unwrap_or(Withdrawn::Cancelled))))
            }
        }
    }

    /// What the client gets for `groups` statement groups withdrawn before
    /// they ran. Inside a transaction begun lazily, the transaction fails:
    /// so it does on the engine, where it has not started yet.
    pub(super) fn withdrawn(&mut self, groups: usize, why: Withdrawn) -> Vec<u8> {
        let in_transaction = self.session.begin_pending();
        if in_transaction {
            let (code, text) = why.error();
            self.session.fail_pending_begin(code, &text);
        }
        withdrawn_answer(groups, why, in_transaction)
    }

    /// Takes the engine exclusively, waiting at most `limit`; false if the
    /// limit passed first.
    pub(super) async fn hold_within(&mut self, limit: Option<std::time::Duration>) -> Result<bool> {
        match limit {
            Some(limit) if !self.session.holds_engine() => {
                match tokio::time::timeout(limit, self.session.hold()).await {
                    Ok(held) => held.map(|()| true).map_err(Into::into),
                    Err(_) => {
                        self.session.release();
                        Ok(false)
                    }
                }
            }
            _ => self.session.hold().await.map(|()| true).map_err(Into::into),
        }
    }
}
