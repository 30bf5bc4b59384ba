//! The publisher: owns the one slot on the remote and writes its changes to
//! the JetStream stream, one record per remote transaction (chunks for big
//! ones), in commit order.
//!
//! ```text
//! first start: CREATE_REPLICATION_SLOT (exported snapshot) ─► copy into the publisher's own cache
//!              ─► purge the stream ─► snapshot of the cache (position: next stream sequence) ─► object store
//! every start: read the stream's last record ─► START_REPLICATION (slot's confirmed position)
//!              pgoutput ─► Chunker ─► publish (pipelined, expected last sequence, Nats-Msg-Id)
//!              JetStream ack of a transaction's last chunk ─► confirm its end LSN to the remote
//! a table added to the publication (a Relation message of a table not copied, or the periodic check):
//!              copied at a temporary slot's point X (`table_copy`) ─► published before the first record at or past X
//! a schema change caches cannot follow in place (`catalog`): its Relation message says "copy follows",
//!              the table is copied again the same way
//! ```
//!
//! Guarantees, and why:
//! - Nothing is lost: the remote keeps WAL from the confirmed LSN, and an LSN
//!   is confirmed only once JetStream acknowledged (stored) every record up to
//!   it. Acks are awaited in publish order.
//! - Order without gaps: each publish carries `Nats-Expected-Last-Sequence`;
//!   if one record is lost (a broken connection), every later publish is
//!   refused, the session ends and the next one resumes from the confirmed
//!   LSN.
//! - No duplicates: after a restart, transactions that the stream's last
//!   record shows as stored are skipped; within JetStream's duplicate window
//!   `Nats-Msg-Id` drops a repeated record as well. A transaction cut off in
//!   the middle (the publisher died between chunks) is sent again from its
//!   first chunk; caches roll back the part they had and apply it whole.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::replication::config::{PublicationSpec, ReplicationConfig};
use crate::replication::error::ReplicationError;
use crate::replication::lsn::Lsn;
use crate::replication::retry::{self, AfterFailure};
use crate::replication::source::{SourceConnection, StreamMessage, quote_ident, quote_literal};
use crate::replication::table_sync::copy_tables;
use crate::replication::{Phase, Status, remote_client, schema, store};
use crate::{Instance, InstanceOptions};

use super::catalog::CatalogReader;
use super::nats::{self, StreamConfig, transient};
use super::position::{self, StreamPosition};
use super::record::{Chunker, Record};
use super::snapshot;
use super::table_copy::CopyJob;

mod outbox;
use outbox::{AckFuture, Acked, Resume, commit_end, publish};

/// A table copy that failed before it began is tried again after this.
const COPY_RETRY: Duration = Duration::from_secs(10);

/// Everything [`Publisher::start`] needs.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The remote, what to replicate, the slot (`read_only` and
    /// `max_buffered_bytes` apply to the caches).
    pub replication: ReplicationConfig,
    /// The stream.
    pub stream: StreamConfig,
    /// The publisher's own cache: the initial copy goes there, snapshots are
    /// made of it. Closed while it is not in use.
    pub data: PathBuf,
    /// Records are at most about this big (default 256 KiB; keep it under
    /// the server's `max_payload`, 1 MiB by default).
    pub max_chunk_bytes: usize,
    /// Records published and not yet acknowledged, at most (default 1024).
    pub max_in_flight: usize,
    /// How often the publisher's cache is brought up to date from the stream
    /// and stored as a new snapshot (default 10 minutes; `None`: only the
    /// snapshot of the initial copy).
    pub snapshot_interval: Option<Duration>,
}

impl PublisherConfig {
    /// A config with defaults.
    pub fn new(replication: ReplicationConfig, stream: StreamConfig, data: impl Into<PathBuf>) -> PublisherConfig {
        PublisherConfig {
            replication,
            stream,
            data: data.into(),
            max_chunk_bytes: 256 << 10,
            max_in_flight: 1024,
            snapshot_interval: Some(Duration::from_secs(600)),
        }
    }
}

/// Entry point.
#[derive(Debug)]
pub struct Publisher;

/// A running publisher.
#[derive(Debug)]
pub struct PublisherHandle {
    status: watch::Receiver<Status>,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<Result<(), ReplicationError>>>>,
}

impl Publisher {
    /// Starts publishing in the background. The status's `applied_lsn` is
    /// the LSN confirmed to the remote (everything before it is stored in
    /// the stream).
    pub fn start(config: PublisherConfig) -> Result<PublisherHandle, ReplicationError> {
        config.replication.validate()?;
        config.stream.validate()?;
        let (status_tx, status) = watch::channel(Status::default());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let data_lock = Arc::new(tokio::sync::Mutex::new(()));
        let task = Task {
            config,
            status: Arc::new(status_tx),
            shutdown: shutdown_rx,
            data_lock,
            bootstrapped: false,
            known: HashSet::new(),
            recopy: HashSet::new(),
            again: HashSet::new(),
        };
        Ok(PublisherHandle { status, shutdown, task: Mutex::new(Some(tokio::spawn(task.run()))) })
    }
}

impl PublisherHandle {
    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Waits until changes stream into JetStream.
    pub async fn wait_streaming(&self) -> Result<(), ReplicationError> {
        let mut rx = self.status.clone();
        let s = rx
            .wait_for(|s| matches!(s.phase, Phase::Streaming | Phase::Halted { .. } | Phase::Stopped))
            .await
            .map_err(|_| ReplicationError::fatal("publisher ended"))?;
        match &s.phase {
            Phase::Streaming => Ok(()),
            Phase::Halted { error } => Err(ReplicationError::fatal(format!("publisher halted: {error}"))),
            _ => Err(ReplicationError::fatal("publisher stopped")),
        }
    }

    /// Stops gracefully: the transaction being received is published whole,
    /// every ack awaited, the final position confirmed to the remote.
    pub async fn stop(&self) -> Result<(), ReplicationError> {
        self.shutdown.send_replace(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        match task {
            Some(task) => task.await.map_err(|e| ReplicationError::fatal(format!("publisher task failed: {e}")))?,
            None => Ok(()),
        }
    }
}

impl Drop for PublisherHandle {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

struct Task {
    config: PublisherConfig,
    status: Arc<watch::Sender<Status>>,
    shutdown: watch::Receiver<bool>,
    /// The publisher's cache is used by one of bootstrap and refresher at a time.
    data_lock: Arc<tokio::sync::Mutex<()>>,
    /// The initial copy and a snapshot exist (checked once per process).
    bootstrapped: bool,
    /// Tables whose copy is in the stream (the initial copy's, and those of
    /// table copies acknowledged by JetStream): the others are copied into
    /// the stream (`table_copy`). Read from the publisher's cache at start:
    /// a copy published since its last refresh is made again then (the
    /// caches replace the table, nothing is lost or repeated).
    known: HashSet<u32>,
    /// Tables whose Relation message said "copy follows", their copy not
    /// published yet: every record lists them (header [`RECOPY_HEADER`]),
    /// so that after a restart the publisher finds them in the stream's
    /// last record and copies them (its cache may not have seen the mark).
    recopy: HashSet<u32>,
    /// Of those, the ones marked while a copy of theirs taken before the
    /// mark was in progress: that copy does not count.
    again: HashSet<u32>,
}

/// The header of every record listing [`Task::recopy`] (table OIDs, comma-separated).
const RECOPY_HEADER: &str = "Pglite-Cache-Recopy";

impl Task {
    async fn run(mut self) -> Result<(), ReplicationError> {
        let refresher = tokio::spawn(super::refresher::run(
            self.config.clone(),
            self.data_lock.clone(),
            self.status.subscribe(),
            self.shutdown.clone(),
        ));
        let result = self.publish().await;
        refresher.abort();
        let _ = refresher.await;
        result
    }

    async fn publish(&mut self) -> Result<(), ReplicationError> {
        let mut attempt = 0u32;
        let result = loop {
            if *self.shutdown.borrow() {
                break Ok(());
            }
            let mut shutdown = self.shutdown.clone();
            let status = self.status.subscribe();
            // Before streaming, a stop cancels the session (the copy is redone).
            let cancel = async move {
                loop {
                    if shutdown.changed().await.is_err() || *shutdown.borrow() {
                        if status.borrow().phase != Phase::Streaming {
                            return;
                        }
                        std::future::pending::<()>().await;
                    }
                }
            };
            let outcome = tokio::select! {
                biased;
                () = cancel => Ok(()),
                outcome = self.session(&mut attempt) => outcome,
            };
            match outcome {
                Ok(()) => break Ok(()),
                Err(e) => {
                    match retry::after_failure(e, &mut attempt, &self.status, &mut self.shutdown, "publisher", false)
                        .await
                    {
                        AfterFailure::Reconnect => {}
                        AfterFailure::Stop => break Ok(()),
                        AfterFailure::Halt(e) => return Err(e),
                    }
                }
            }
        };
        self.status.send_modify(|s| s.phase = Phase::Stopped);
        result
    }

    async fn session(&mut self, attempt: &mut u32) -> Result<(), ReplicationError> {
        let js = nats::connect(&self.config.stream, "pglite-cache publish").await?;
        let mut stream = nats::ensure_stream(&js, &self.config.stream).await?;
        let mut conn = SourceConnection::connect(&self.config.replication.source, "pglite-cache publish").await?;
        let system = conn.identify_system().await?;
        if !self.bootstrapped {
            self.bootstrap(&mut conn, &system, &js, &mut stream).await?;
            self.bootstrapped = true;
        }

        // What the stream already holds (a previous session's records).
        let info = stream.info().await.map_err(|e| transient("reading the stream's state", e))?;
        let last_seq = info.state.last_sequence;
        let tail = if info.state.messages == 0 {
            None
        } else {
            let message = stream
                .get_last_raw_message_by_subject(&self.config.stream.subject())
                .await
                .map_err(|e| transient("reading the stream's last record", e))?;
            let pending = message.headers.get(RECOPY_HEADER).map(|v| v.as_str().to_owned()).unwrap_or_default();
            for oid in pending.split(',').filter_map(|o| o.parse::<u32>().ok()) {
                self.known.remove(&oid);
                self.recopy.insert(oid);
            }
            Some(Record::decode(message.payload).map_err(|e| ReplicationError::fatal(e.to_string()))?)
        };
        self.again.clear();
        let resume = Resume::from_tail(tail.as_ref(), last_seq);
        let r = &self.config.replication;
        conn.start_replication(&r.slot_name, Lsn::ZERO, r.publication.name()).await?;
        self.status.send_modify(|s| s.phase = Phase::Streaming);
        *attempt = 0;
        tracing::info!(stream = %self.config.stream.name, last_seq, skip_below = %resume.skip_below, "publishing");
        self.stream(conn, &js, resume).await
    }

    /// The publish loop. Arms in priority order: shutdown (finish the
    /// transaction being received, then stop), the status timer (asks the
    /// remote for its position: idle progress), acks (move the confirmed
    /// LSN), the slot's messages (while fewer than `max_in_flight` records
    /// wait for their ack: a slow JetStream slows the reading, memory stays
    /// bounded).
    async fn stream(
        &mut self,
        mut conn: SourceConnection,
        js: &jetstream::Context,
        resume: Resume,
    ) -> Result<(), ReplicationError> {
        let subject = self.config.stream.subject();
        let mut chunker = Chunker::new(self.config.max_chunk_bytes);
        let mut catalog = CatalogReader::new(self.config.replication.source.clone());
        let mut in_flight: FuturesOrdered<AckFuture> = FuturesOrdered::new();
        let mut last_seq = resume.last_seq;
        let mut published_end = resume.skip_below;
        let mut confirmed = Lsn::ZERO;
        let mut skipping: Option<Lsn> = None;
        let mut stopping = *self.shutdown.borrow();
        let mut timer = tokio::time::interval(self.config.replication.status_interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Tables added to the publication: looked for at once, when a
        // Relation message names one, and every `publication_check_interval`.
        let mut copy: Option<CopyJob> = None;
        let mut copying: HashSet<u32> = HashSet::new();
        let mut look_for_tables = true;
        let mut asked: HashSet<u32> = HashSet::new();
        let mut next_look = tokio::time::Instant::now() + self.config.replication.publication_check_interval;
        loop {
            if stopping && !chunker.in_transaction() && skipping.is_none() {
                break;
            }
            tokio::select! {
                biased;
                changed = self.shutdown.changed(), if !stopping => {
                    stopping = changed.is_err() || *self.shutdown.borrow();
                }
                _ = timer.tick() => {
                    conn.send_status(confirmed, true).await?;
                    if copy.is_none() && (look_for_tables || tokio::time::Instant::now() >= next_look) {
                        look_for_tables = false;
                        next_look = tokio::time::Instant::now() + self.config.replication.publication_check_interval;
                        let exclude = self.known.union(&copying).copied().collect();
                        copy = Some(CopyJob::spawn(&self.config.replication, exclude, self.config.max_chunk_bytes));
                    }
                }
                Some(acked) = in_flight.next(), if !in_flight.is_empty() => self.acked(acked, &mut confirmed, &mut copying)?,
                point = async { copy.as_mut().expect("checked").wait_point().await }, if copy.as_ref().is_some_and(|c| c.point.is_none()) => {
                    match point {
                        Some((oid, _)) => {
                            copying.insert(oid);
                        }
                        None => {
                            if copy.take().is_some_and(|job| job.failed) {
                                next_look = next_look.min(tokio::time::Instant::now() + COPY_RETRY);
                            }
                        }
                    }
                }
                message = conn.recv(), if in_flight.len() < self.config.max_in_flight => match message? {
                    None => return Err(ReplicationError::transient("the remote ended the replication stream")),
                    Some(StreamMessage::XLogData { data, wal_end, .. }) => {
                        self.note_wal_end(wal_end);
                        if data.first() == Some(&b'B') {
                            catalog.begin(&data);
                        }
                        if data.first() == Some(&b'R')
                            && let Ok(id) = data[1..].first_chunk::<4>().map(|b| u32::from_be_bytes(*b)).ok_or(())
                            && !self.known.contains(&id)
                            && !copying.contains(&id)
                            && asked.insert(id)
                        {
                            look_for_tables = true; // changes of a table added to the publication
                        }
                        if let Some(lsn) = skipping {
                            // Already in the stream: drop it, only follow it to its end
                            // (and keep its tables' descriptions for later transactions).
                            if data.first() == Some(&b'R') {
                                chunker.push(data.clone()).map_err(|e| ReplicationError::fatal(e.to_string()))?;
                                let ((id, full, lean), _) = catalog.relation(&data, false, false).await?;
                                chunker.set_facts(id, full, lean).map_err(|e| ReplicationError::fatal(e.to_string()))?;
                            } else if data.first() == Some(&b'C') {
                                skipping = None;
                                let end = commit_end(&data)?;
                                in_flight.push_back(Box::pin(async move { (Ok(()), Some(end), None) }));
                                tracing::debug!(commit = %lsn, "already in the stream; skipped");
                            }
                            continue;
                        }
                        if data.first() == Some(&b'B') && !chunker.in_transaction() {
                            let final_lsn = Lsn(u64::from_be_bytes(data[1..9].try_into().map_err(|_| ReplicationError::fatal("short Begin"))?));
                            if final_lsn < resume.skip_below {
                                skipping = Some(final_lsn);
                                continue;
                            }
                        }
                        // Enum labels added upstream go into the stream before the change using one.
                        for (id, full, lean) in catalog.labels_for_change(&data).await? {
                            chunker.set_facts(id, full, lean).map_err(|e| ReplicationError::fatal(e.to_string()))?;
                        }
                        let relation = (data.first() == Some(&b'R')).then(|| data.clone());
                        let record = chunker.push(data).map_err(|e| ReplicationError::fatal(e.to_string()))?;
                        if let Some(relation) = relation {
                            // The catalog facts go next to the Relation message.
                            let id = relation.get(1..5).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).ok_or_else(|| ReplicationError::fatal("short Relation"))?;
                            let pending = self.recopy.contains(&id);
                            let may_copy = self.known.contains(&id) || copying.contains(&id);
                            let ((id, full, lean), copy) = catalog.relation(&relation, may_copy, pending).await?;
                            chunker.set_facts(id, full, lean).map_err(|e| ReplicationError::fatal(e.to_string()))?;
                            if let Some(reason) = copy {
                                tracing::warn!(relation = id, %reason, "schema change upstream that caches cannot follow in place; copying the table again into the stream");
                                if copying.contains(&id) {
                                    self.again.insert(id);
                                }
                                self.known.remove(&id);
                                self.recopy.insert(id);
                                look_for_tables = true;
                            }
                        }
                        if let Some(record) = record {
                            // A table copy goes before the first transaction committed at or after its point.
                            if record.chunk == 0
                                && let Some(job) = copy.as_mut()
                            {
                                match job.wait_point().await {
                                    None => {
                                        if copy.take().is_some_and(|job| job.failed) {
                                            next_look = next_look.min(tokio::time::Instant::now() + COPY_RETRY);
                                        }
                                    }
                                    Some((_, x)) if record.commit_lsn >= x => {
                                        let mut job = copy.take().expect("checked");
                                        last_seq = self.publish_copy(&mut job, &mut conn, js, &subject, last_seq, &mut in_flight, &mut confirmed, &mut copying).await?;
                                        look_for_tables = true; // another one may wait
                                    }
                                    Some(_) => {}
                                }
                            }
                            let generation = if record.commit_lsn == resume.cut_off { resume.generation } else { 0 };
                            let lsn = record.last.then_some(record.end_lsn);
                            if let Some(end) = lsn {
                                published_end = published_end.max(end);
                            }
                            let recopy = self.recopy_header();
                            last_seq = publish(js, &subject, &record, generation, last_seq, lsn, None, recopy, &mut in_flight).await?;
                        }
                    }
                    Some(StreamMessage::Keepalive { wal_end, reply_requested, .. }) => {
                        self.note_wal_end(wal_end);
                        // Idle: nothing of the publication committed before
                        // `wal_end` is missing; caches may move there.
                        if !chunker.in_transaction()
                            && skipping.is_none()
                            && let Some(job) = copy.as_mut()
                            && job.point.is_some_and(|(_, x)| wal_end >= x)
                        {
                            // Idle past the copy's point: it goes now.
                            let mut job = copy.take().expect("checked");
                            last_seq = self.publish_copy(&mut job, &mut conn, js, &subject, last_seq, &mut in_flight, &mut confirmed, &mut copying).await?;
                            look_for_tables = true; // another one may wait
                        }
                        // No progress past a copy's point before the copy (unknown yet: none).
                        let before_copy = copy.as_ref().is_none_or(|job| job.point.is_some_and(|(_, x)| wal_end < x));
                        if !chunker.in_transaction() && skipping.is_none() && wal_end > published_end && before_copy {
                            published_end = wal_end;
                            let record = Record::progress(wal_end);
                            let recopy = self.recopy_header();
                            last_seq = publish(js, &subject, &record, 0, last_seq, Some(wal_end), None, recopy, &mut in_flight).await?;
                        }
                        if reply_requested {
                            conn.send_status(confirmed, false).await?;
                        }
                    }
                },
            }
        }
        while let Some(acked) = in_flight.next().await {
            self.acked(acked, &mut confirmed, &mut copying)?;
        }
        self.status.send_modify(|s| s.applied_lsn = confirmed);
        conn.send_status(confirmed, false).await?;
        conn.finish().await?;
        Ok(())
    }

    /// A record is stored: the LSN it confirms moves on, a table copy it
    /// completes is known.
    fn acked(&mut self, acked: Acked, confirmed: &mut Lsn, copying: &mut HashSet<u32>) -> Result<(), ReplicationError> {
        let (result, lsn, copied) = acked;
        result?;
        if let Some(lsn) = lsn.filter(|l| *l > *confirmed) {
            *confirmed = lsn;
            self.status.send_modify(|s| {
                s.applied_lsn = lsn;
                s.lag_bytes = lsn.distance_to(s.server_wal_end);
            });
        }
        if let Some(oid) = copied {
            copying.remove(&oid);
            // Marked for a copy again since this one was taken: not known.
            if !self.recopy.contains(&oid) {
                self.known.insert(oid);
            }
        }
        Ok(())
    }

    /// Publishes a table copy whole (waiting for the rows as they are read
    /// from the remote), between two transactions. The walsender is kept
    /// alive with status updates meanwhile.
    #[allow(clippy::too_many_arguments)]
    async fn publish_copy(
        &mut self,
        job: &mut CopyJob,
        conn: &mut SourceConnection,
        js: &jetstream::Context,
        subject: &str,
        mut last_seq: u64,
        in_flight: &mut FuturesOrdered<AckFuture>,
        confirmed: &mut Lsn,
        copying: &mut HashSet<u32>,
    ) -> Result<u64, ReplicationError> {
        let oid = job.point.map(|(oid, _)| oid);
        let mut timer = tokio::time::interval(self.config.replication.status_interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                biased;
                _ = timer.tick() => {
                    conn.send_status(*confirmed, false).await?;
                    continue;
                }
                next = job.next() => next?,
            };
            let Some(record) = next else { break };
            let copied = if record.last { oid } else { None };
            if let Some(oid) = copied
                && !self.again.remove(&oid)
            {
                self.recopy.remove(&oid);
            }
            let recopy = self.recopy_header();
            last_seq = publish(js, subject, &record, 0, last_seq, None, copied, recopy, in_flight).await?;
            while in_flight.len() >= self.config.max_in_flight {
                let acked = in_flight.next().await.expect("not empty");
                self.acked(acked, confirmed, copying)?;
            }
        }
        Ok(last_seq)
    }

    /// The value of [`RECOPY_HEADER`], if any table is marked.
    fn recopy_header(&self) -> Option<String> {
        let mut oids: Vec<u32> = self.recopy.iter().copied().collect();
        oids.sort_unstable();
        (!oids.is_empty()).then(|| oids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
    }

    fn note_wal_end(&self, wal_end: Lsn) {
        self.status.send_if_modified(|s| {
            if wal_end <= s.server_wal_end {
                return false;
            }
            s.server_wal_end = wal_end;
            s.lag_bytes = s.applied_lsn.distance_to(wal_end);
            true
        });
    }

    /// Makes sure the publisher's cache holds the initial copy and the object
    /// store a snapshot of it: on first start (or after an interrupted copy)
    /// creates the slot and copies; when no snapshot exists, stores one.
    async fn bootstrap(
        &mut self,
        conn: &mut SourceConnection,
        system: &crate::replication::source::SystemId,
        js: &jetstream::Context,
        stream: &mut jetstream::stream::Stream,
    ) -> Result<(), ReplicationError> {
        let data_lock = self.data_lock.clone();
        let _guard = data_lock.lock().await;
        let instance = Instance::start(InstanceOptions::persistent(&self.config.data).name("publisher")).await?;
        let result = async {
            let copied = self.bootstrap_in(&instance, conn, system, stream).await?;
            let position = position::load(&instance).await?;
            let applied = store::load(&instance).await?.map(|s| s.applied_lsn);
            let known =
                instance.query("SELECT remote_oid::int8 FROM pglite_cache.tables WHERE state = 'ready'", &[]).await?;
            self.known = known.rows.iter().map(|r| r.get::<i64>(0) as u32).collect();
            Ok::<_, ReplicationError>((copied, position, applied))
        }
        .await;
        instance.stop().await?;
        let (copied, position, applied) = result?;
        let (Some(position), Some(applied)) = (position, applied) else {
            return Err(ReplicationError::fatal("the publisher's cache has no stream position"));
        };
        if copied || snapshot::newest(js, &self.config.stream).await?.is_none() {
            snapshot::store(js, &self.config.stream, &self.config.data, position.resume_seq, applied).await?;
        }
        Ok(())
    }

    /// Returns whether it copied.
    async fn bootstrap_in(
        &mut self,
        instance: &Instance,
        conn: &mut SourceConnection,
        system: &crate::replication::source::SystemId,
        stream: &mut jetstream::stream::Stream,
    ) -> Result<bool, ReplicationError> {
        store::init(instance).await?;
        let config = self.config.replication.clone();
        if let Some(state) = store::load(instance).await?
            && state.phase == "streaming"
        {
            if state.system_identifier != system.system_id || state.database != config.source.dbname() {
                return Err(ReplicationError::needs_operator(
                    format!(
                        "this publisher's cache holds database {} of system {}",
                        state.database, state.system_identifier
                    ),
                    "use another --data directory (and stream) for another remote",
                ));
            }
            return Ok(false);
        }
        self.status.send_modify(|s| s.phase = Phase::Copying);
        let client = remote_client(&config.source).await?;
        let owns_publication = ensure_publication(&config, &client).await?;
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&config.slot_name],
            )
            .await?;
        let slot = conn.create_slot(&config.slot_name, false).await?;
        let snapshot = slot.snapshot.clone().ok_or_else(|| ReplicationError::fatal("the slot exported no snapshot"))?;
        tracing::info!(slot = %slot.name, consistent_point = %slot.consistent_point, "slot created; copying");
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(&snapshot)
            ))
            .await?;
        let (types, tables) = schema::describe_publication(&client, config.publication.name()).await?;
        instance.exec(&schema::create_script(&types, &tables)).await?;
        store::begin_copy(
            instance,
            &store::StoredState {
                system_identifier: system.system_id.clone(),
                database: config.source.dbname().to_owned(),
                slot_name: config.slot_name.clone(),
                publication: config.publication.name().to_owned(),
                owns_publication,
                phase: "copying".into(),
                applied_lsn: slot.consistent_point,
            },
            slot.consistent_point,
        )
        .await?;
        self.status.send_modify(|s| s.tables.clear());
        copy_tables(instance, &config, &self.status, &client, &tables, slot.consistent_point).await?;
        client.batch_execute("COMMIT").await?;
        // Records of an earlier slot do not continue this copy.
        stream.purge().await.map_err(|e| transient("purging the stream", e))?;
        let info = stream.info().await.map_err(|e| transient("reading the stream's state", e))?;
        let position =
            StreamPosition { stream: self.config.stream.name.clone(), resume_seq: info.state.last_sequence + 1 };
        position::save(instance, &position).await?;
        let (sql, params) = store::streaming_statement();
        instance.query_params(&sql, params).await?;
        self.status.send_modify(|s| s.applied_lsn = slot.consistent_point);
        Ok(true)
    }
}

/// Creates the owned publication if missing. Returns whether it is owned.
async fn ensure_publication(
    config: &ReplicationConfig,
    client: &tokio_postgres::Client,
) -> Result<bool, ReplicationError> {
    let PublicationSpec::Owned { name, tables } = &config.publication else {
        return Ok(false);
    };
    let exists = !client.query("SELECT 1 FROM pg_publication WHERE pubname = $1", &[name]).await?.is_empty();
    if !exists {
        let list: Vec<String> = tables
            .iter()
            .map(|t| match t.split_once('.') {
                Some((s, n)) => format!("{}.{}", quote_ident(s), quote_ident(n)),
                None => quote_ident(t),
            })
            .collect();
        client
            .batch_execute(&format!("CREATE PUBLICATION {} FOR TABLE {}", quote_ident(name), list.join(", ")))
            .await?;
    }
    Ok(true)
}
