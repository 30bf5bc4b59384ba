//! A cache fed by the stream: reads records in order with an ordered
//! JetStream consumer (ephemeral, no acks: the cache's own stored position is
//! what counts), and hands their pgoutput messages to the same apply as a
//! slot-fed cache.
//!
//! Exactly once, across kill -9: each remote transaction is applied in one
//! local transaction that also stores its end LSN (the apply's own
//! bookkeeping); the stream sequence to resume from is stored afterwards
//! and may lag, so a restart re-reads a few records, and the [`Sequencer`]
//! skips those at or below the stored LSN.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{broadcast, watch};

use crate::Instance;
use crate::replication::apply::facts;
use crate::replication::apply::{Applier, KnownTable};
use crate::replication::config::ReplicationConfig;
use crate::replication::error::ReplicationError;
use crate::replication::lsn::Lsn;
use crate::replication::retry::{self, AfterFailure};
use crate::replication::{AppliedTransaction, Phase, Status, TableState, TableStatus, store};

use super::nats::{self, StreamConfig, transient};
use super::position::{self, StreamPosition};
use super::record::{Action, Record, RecordKind, Sequencer};
use super::table_copy::{Copied, Loader};

pub(super) struct Consumer {
    pub(super) instance: Instance,
    pub(super) config: StreamConfig,
    /// Apply settings (buffer size, status interval); its source is a
    /// placeholder that is never contacted.
    pub(super) apply: ReplicationConfig,
    pub(super) status: Arc<watch::Sender<Status>>,
    pub(super) changes: broadcast::Sender<Arc<AppliedTransaction>>,
    pub(super) shutdown: watch::Receiver<bool>,
}

/// The error of a cache whose next records were dropped by retention.
pub(crate) fn past_retention(resume_seq: u64, first_seq: u64) -> ReplicationError {
    ReplicationError::needs_operator(
        format!(
            "the stream no longer holds the records this cache needs (it resumes at sequence {resume_seq}, \
             the stream starts at {first_seq}): it was offline longer than the stream's retention, \
             or the publisher started over"
        ),
        "start the cache again from the newest snapshot (`pglite-cache sync --nats` does so by itself)",
    )
}

/// Whether `e` says the cache must start again from a snapshot.
pub fn needs_rebootstrap(e: &ReplicationError) -> bool {
    e.message().contains("no longer holds the records this cache needs")
}

impl Consumer {
    pub(super) async fn run(mut self) -> Result<(), ReplicationError> {
        let mut attempt = 0u32;
        let result = loop {
            if *self.shutdown.borrow() {
                break Ok(());
            }
            match self.session(&mut attempt).await {
                Ok(()) => break Ok(()),
                Err(e) => match retry::after_failure(
                    e.halt_if_closed(&self.instance),
                    &mut attempt,
                    &self.status,
                    &mut self.shutdown,
                    "stream replication",
                    false,
                )
                .await
                {
                    AfterFailure::Reconnect => {}
                    AfterFailure::Stop => break Ok(()),
                    AfterFailure::Halt(e) => return Err(e),
                },
            }
        };
        self.status.send_modify(|s| s.phase = Phase::Stopped);
        result
    }

    fn applier(&self, tables: HashMap<u32, KnownTable>, committed: Lsn) -> Applier {
        Applier::new(
            self.instance.clone(),
            tables,
            committed,
            self.apply.max_buffered_bytes,
            self.status.clone(),
            self.changes.clone(),
            self.apply.source.clone(),
        )
        .without_remote_catalog()
    }

    async fn session(&mut self, attempt: &mut u32) -> Result<(), ReplicationError> {
        store::init(&self.instance).await?;
        let state = store::load(&self.instance).await?.filter(|s| s.phase == "streaming").ok_or_else(|| {
            ReplicationError::needs_operator(
                "this cache holds no copy to continue from",
                "bootstrap it from a snapshot first (pglite_cache::replication::stream::bootstrap)",
            )
        })?;
        let saved = position::load(&self.instance).await?.ok_or_else(|| {
            ReplicationError::needs_operator(
                "this cache was not made from a fan-out snapshot (no stream position)",
                "use a new data directory for a cache fed by the stream",
            )
        })?;
        if saved.stream != self.config.name {
            return Err(ReplicationError::needs_operator(
                format!("this cache reads the stream {}, not {}", saved.stream, self.config.name),
                "use the same --stream, or a new data directory",
            ));
        }
        let js = nats::connect(&self.config, "pglite-cache sync").await?;
        let mut stream = nats::get_stream(&js, &self.config).await?;
        let info = stream.info().await.map_err(|e| transient("reading the stream's state", e))?;
        if saved.resume_seq < info.state.first_sequence {
            return Err(past_retention(saved.resume_seq, info.state.first_sequence));
        }
        let tables = stored_tables(&self.instance).await?;
        self.load_table_status().await?;
        let mut applier = self.applier(tables.clone(), state.applied_lsn);
        let mut sequencer = Sequencer::new(state.applied_lsn);
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.config.subject(),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: saved.resume_seq },
                ..Default::default()
            })
            .await
            .map_err(|e| transient("creating a stream consumer", e))?;
        let mut messages = consumer.messages().await.map_err(|e| transient("reading the stream", e))?;
        self.status.send_modify(|s| {
            s.phase = Phase::Streaming;
            s.applied_lsn = state.applied_lsn;
        });
        *attempt = 0;
        tracing::info!(stream = %self.config.name, resume_seq = saved.resume_seq, applied = %state.applied_lsn, "streaming from NATS");

        let mut progress = Positions::new(saved.resume_seq);
        let mut described: HashMap<u32, Bytes> = HashMap::new();
        let mut described_facts: HashMap<u32, Bytes> = HashMap::new();
        let mut loader = Loader::default();
        let mut stopping = *self.shutdown.borrow();
        let mut timer = tokio::time::interval(self.apply.status_interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Arms in priority order: shutdown, saving the position now and then,
        // the next record, and when none is ready, committing what was received.
        loop {
            if stopping {
                break;
            }
            tokio::select! {
                biased;
                changed = self.shutdown.changed() => stopping = changed.is_err() || *self.shutdown.borrow(),
                _ = timer.tick() => {
                    progress.due = true;
                    self.save_position(&mut progress, &applier).await?;
                }
                message = messages.next() => {
                    let message = match message {
                        None => return Err(ReplicationError::transient("the stream consumer ended")),
                        Some(m) => m.map_err(|e| transient("reading the stream", e))?,
                    };
                    let seq = message.info().map_err(|e| transient("stream message", e))?.stream_sequence;
                    let record = Record::decode(message.payload.clone()).map_err(|e| ReplicationError::fatal(format!("at stream sequence {seq}: {e}")))?;
                    let action = sequencer.next(&record).map_err(|e| ReplicationError::fatal(format!("at stream sequence {seq}: {e}")))?;
                    match action {
                        Action::Skip => {}
                        Action::Progress(lsn) => {
                            applier.flush_deferred().await?;
                            applier.note_wal_end(lsn);
                            applier.advance_idle().await?;
                        }
                        Action::Restart | Action::Feed => {
                            if action == Action::Restart {
                                tracing::warn!(commit = %record.commit_lsn, seq, "transaction sent again from its start; rolling back its first part");
                                let committed = applier.committed();
                                drop(applier);
                                applier = self.applier(stored_tables(&self.instance).await?, committed);
                                described.clear();
                                described_facts.clear();
                                loader.reset(&self.instance).await?;
                            } else if record.chunk == 0 && !record.last {
                                // A transaction in chunks: commit what waits first, so
                                // that only this one is rolled back if it is cut off.
                                applier.flush_deferred().await?;
                            }
                            if record.kind == RecordKind::Copy {
                                // Between transactions (the publisher puts it there).
                                applier.flush_deferred().await?;
                                if let Some(copied) = loader.feed(&self.instance, &record).await? {
                                    self.copied(&mut applier, copied, record.commit_lsn).await?;
                                    // Every table is described to the applier again: the
                                    // registration forgets the other tables not copied yet.
                                    described.clear();
                                    described_facts.clear();
                                }
                            }
                            for m in record.messages.iter().filter(|_| record.kind == RecordKind::Transaction) {
                                if m.first() == Some(&b'R') {
                                    let id = u32::from_be_bytes(m[1..5].try_into().expect("checked length"));
                                    if described.get(&id) == Some(m) {
                                        continue; // unchanged: no need to look at the table again
                                    }
                                    described.insert(id, m.clone());
                                    // The facts that follow are about this message.
                                    described_facts.remove(&id);
                                } else if let Some(id) = facts::frame_relation(m) {
                                    if described_facts.get(&id) == Some(m) {
                                        continue;
                                    }
                                    described_facts.insert(id, m.clone());
                                }
                                applier.handle(m).await?;
                            }
                        }
                    }
                    if record.last {
                        progress.done.push_back((seq + 1, record.end_lsn));
                    }
                    self.save_position(&mut progress, &applier).await?;
                }
                () = std::future::ready(()), if applier.has_deferred() => applier.flush_deferred().await?,
            }
        }
        // A transaction cut off by the stop rolls back with the applier; the
        // stored position is before it.
        if !sequencer.in_transaction() {
            applier.flush_deferred().await?;
        }
        progress.due = true;
        self.save_position(&mut progress, &applier).await?;
        Ok(())
    }

    /// A table copy from the stream is in place: its later changes apply,
    /// and everything before the copy's point `x` is applied.
    async fn copied(&self, applier: &mut Applier, copied: Copied, x: Lsn) -> Result<(), ReplicationError> {
        let Copied { oid, table, rows } = copied;
        let status = TableStatus {
            schema: table.schema.clone(),
            name: table.name.clone(),
            state: TableState::Ready,
            rows_copied: rows,
            bytes_copied: 0,
            inserted: 0,
            updated: 0,
            deleted: 0,
        };
        self.status.send_modify(|s| {
            s.tables.retain(|t| !(t.schema == status.schema && t.name == status.name));
            s.tables.push(status);
        });
        applier.add_tables(vec![(oid, table)]).await?;
        applier.note_wal_end(x);
        applier.advance_idle().await
    }

    /// Stores the position when due and possible: not while the applier
    /// holds the instance for a big transaction (see [`Positions::take_due`]).
    async fn save_position(&self, progress: &mut Positions, applier: &Applier) -> Result<(), ReplicationError> {
        if let Some(resume_seq) = progress.take_due(applier.committed(), !applier.between_transactions()) {
            position::save(&self.instance, &StreamPosition { stream: self.config.name.clone(), resume_seq }).await?;
        }
        Ok(())
    }

    async fn load_table_status(&self) -> Result<(), ReplicationError> {
        let result = self
            .instance
            .query("SELECT schema_name, table_name, rows_copied FROM pglite_cache.tables ORDER BY 1, 2", &[])
            .await?;
        let tables: Vec<TableStatus> = result
            .rows
            .iter()
            .map(|r| TableStatus {
                schema: r.get(0),
                name: r.get(1),
                state: TableState::Ready,
                rows_copied: r.get::<i64>(2) as u64,
                bytes_copied: 0,
                inserted: 0,
                updated: 0,
                deleted: 0,
            })
            .collect();
        self.status.send_modify(|s| s.tables = tables);
        Ok(())
    }
}

/// Stream positions of records applied (or skipped) whole, waiting for
/// their LSN to be committed locally before the position may move there.
struct Positions {
    saved: u64,
    done: VecDeque<(u64, Lsn)>,
    /// The status interval passed since the position was last stored.
    due: bool,
}

impl Positions {
    fn new(saved: u64) -> Positions {
        Positions { saved, done: VecDeque::new(), due: false }
    }

    /// The new position to store, if one is due and the applier is between
    /// transactions. Inside a big remote transaction the applier holds the
    /// instance in an interactive local transaction, and the position's
    /// `INSERT` would wait for that transaction to end: the consumer would
    /// wait for itself, forever (the stall of big transactions through the
    /// stream). So a due position waits for the transaction's end.
    fn take_due(&mut self, committed: Lsn, inside_transaction: bool) -> Option<u64> {
        if !self.due || inside_transaction {
            return None;
        }
        self.due = false;
        self.advance(committed)
    }

    /// The new position to save, if it moved.
    fn advance(&mut self, committed: Lsn) -> Option<u64> {
        let mut next = None;
        while let Some(&(seq, end)) = self.done.front() {
            if end > committed {
                break;
            }
            next = Some(seq);
            self.done.pop_front();
        }
        let next = next.filter(|&n| n > self.saved)?;
        self.saved = next;
        Some(next)
    }
}

async fn stored_tables(instance: &Instance) -> Result<HashMap<u32, KnownTable>, ReplicationError> {
    let result = instance
        .query(
            "SELECT remote_oid::int8, schema_name, table_name, coalesce(synced_lsn, '0/0')::text \
             FROM pglite_cache.tables WHERE state = 'ready'",
            &[],
        )
        .await?;
    result
        .rows
        .iter()
        .map(|r| {
            let applies_from =
                r.get::<String>(3).parse().map_err(|e| ReplicationError::fatal(format!("stored table LSN: {e}")))?;
            Ok((r.get::<i64>(0) as u32, KnownTable { schema: r.get(1), name: r.get(2), applies_from }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saved_position_never_runs_ahead_of_the_commit() {
        let mut p = Positions::new(5);
        p.done = VecDeque::from([(6, Lsn(10)), (7, Lsn(20)), (9, Lsn(30))]);
        assert_eq!(p.advance(Lsn(5)), None);
        assert_eq!(p.advance(Lsn(20)), Some(7));
        assert_eq!(p.advance(Lsn(20)), None);
        assert_eq!(p.advance(Lsn(35)), Some(9));
        assert!(p.done.is_empty());
    }

    #[test]
    fn a_due_position_waits_for_the_end_of_the_transaction_holding_the_instance() {
        let mut p = Positions::new(1);
        p.done.push_back((2, Lsn(10)));
        assert_eq!(p.take_due(Lsn(10), false), None, "not due before the status interval");
        p.due = true;
        assert_eq!(p.take_due(Lsn(10), true), None, "never while a transaction holds the instance");
        assert!(p.due, "still due");
        assert_eq!(p.take_due(Lsn(10), false), Some(2));
        assert!(!p.due);
        p.done.push_back((3, Lsn(20)));
        assert_eq!(p.take_due(Lsn(20), false), None, "stored at most once per interval");
    }

    #[test]
    fn retention_errors_ask_for_a_snapshot() {
        let e = past_retention(3, 10);
        assert!(needs_rebootstrap(&e));
        assert_eq!(e.kind(), crate::replication::ErrorKind::NeedsOperator);
    }
}
