//! The task behind a [`super::ReplicationHandle`]: sessions (connect, set
//! up or resume, stream), reconnecting with backoff after transient errors,
//! halting with a hint after the others.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::retry::{self, AfterFailure};
use crate::Instance;

use super::apply;
use super::commit_wait::CommitTimer;
use super::config::{PublicationSpec, ReplicationConfig, SlotLostPolicy};
use super::deadline::{DeadlineAction, ReceiveDeadline};
use super::error::{ReplicationError, classify_start_replication};
use super::lsn::Lsn;
use super::pacer::Pacer;
use super::schema;
use super::source::{self, SourceConnection, StreamMessage, quote_ident, quote_literal};
use super::store;
use super::table_sync::{copy_tables, prepare_local};
use super::{AppliedTransaction, Phase, Status, TableState, TableStatus, remote_client};

pub(super) struct Supervisor {
    pub(super) instance: Instance,
    pub(super) config: ReplicationConfig,
    pub(super) status: Arc<watch::Sender<Status>>,
    pub(super) changes: broadcast::Sender<Arc<AppliedTransaction>>,
    pub(super) shutdown: watch::Receiver<bool>,
    /// One connection for catalog queries and snapshot copies, kept open
    /// between uses (reopened when it breaks).
    pub(super) catalog: Option<tokio_postgres::Client>,
    /// Everything up to here is on stable storage locally: the most that
    /// may be confirmed to the remote.
    pub(super) durable: Lsn,
    /// A sync of the data directory running in the background, and the
    /// position committed before it started (durable once it ends).
    pub(super) syncing: Option<(Lsn, tokio::task::JoinHandle<std::io::Result<()>>)>,
    /// When to record an idle position and sync before confirming.
    pub(super) pacer: Pacer,
}

/// A timer re-armed only when its time changes (re-arming one at every
/// turn of the apply loop cost CPU).
struct Alarm {
    at: Option<Instant>,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Alarm {
    fn new() -> Alarm {
        Alarm { at: None, sleep: Box::pin(tokio::time::sleep_until(Instant::now())) }
    }

    /// Rings at `at`, or never.
    fn set(&mut self, at: Option<Instant>) {
        if at != self.at {
            self.at = at;
            if let Some(at) = at {
                self.sleep.as_mut().reset(at);
            }
        }
    }

    fn armed(&self) -> bool {
        self.at.is_some()
    }

    /// Resolves when the time set has come (poll only while armed).
    async fn rings(&mut self) {
        self.sleep.as_mut().await
    }
}

/// How a session ended without error.
enum Ended {
    Stopped,
}

impl Supervisor {
    pub(super) async fn run(mut self) -> Result<(), ReplicationError> {
        let mut attempt = 0u32;
        let result = loop {
            if *self.shutdown.borrow() {
                break Ok(());
            }
            // Streaming stops gracefully by itself (finishing the current
            // transaction); before that (connecting, copying) a stop cancels
            // the session: the local copy rolls back, and the next start
            // copies again from a new slot.
            let mut shutdown = self.shutdown.clone();
            let status = self.status.subscribe();
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
                () = cancel => Ok(Ended::Stopped),
                outcome = self.session(&mut attempt) => outcome,
            };
            match outcome {
                Ok(Ended::Stopped) => break Ok(()),
                Err(e) if e.is_slot_lost() && self.config.on_slot_lost == SlotLostPolicy::Resync => {
                    tracing::warn!(error = %e, "replication slot lost; resyncing everything");
                    if let Err(e) = self.instance.exec("DELETE FROM pglite_cache.replication").await {
                        break Err(e.into());
                    }
                }
                Err(e) => {
                    let e = e.halt_if_closed(&self.instance);
                    // A slot still held after a while: an operator can act (the hint).
                    let loud = attempt >= SLOT_IN_USE_PATIENCE && e.is_slot_in_use();
                    match retry::after_failure(e, &mut attempt, &self.status, &mut self.shutdown, "replication", loud)
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

    /// One connection's life: set up or resume, then stream until stopped
    /// or an error.
    async fn session(&mut self, attempt: &mut u32) -> Result<Ended, ReplicationError> {
        store::init(&self.instance).await?;
        let mut conn = SourceConnection::connect(&self.config.source, "pglite-cache").await?;
        let system = conn.identify_system().await?;
        let stored = store::load(&self.instance).await?;
        let start = match stored {
            Some(state) if state.phase == "streaming" => {
                if state.system_identifier != system.system_id || state.database != self.config.source.dbname() {
                    return Err(ReplicationError::needs_operator(
                        format!(
                            "this instance replicates from database {} of system {}, not {} of {}",
                            state.database,
                            state.system_identifier,
                            self.config.source.dbname(),
                            system.system_id
                        ),
                        "use another instance, or decommission this replication first",
                    ));
                }
                if state.slot_name != self.config.slot_name || state.publication != self.config.publication.name() {
                    return Err(ReplicationError::needs_operator(
                        format!(
                            "this instance replicates with slot {} and publication {}",
                            state.slot_name, state.publication
                        ),
                        "use the same slot and publication, or decommission this replication first",
                    ));
                }
                self.load_table_status().await?;
                state.applied_lsn
            }
            Some(state) if state.phase == "copying" && self.can_resume(&state, &system).await? => {
                // An interrupted copy whose slot survived: the finished tables
                // stay; the others are copied when streaming starts, as tables
                // added to the publication are (consistent with the slot).
                tracing::info!(slot = %state.slot_name, "resuming the interrupted initial copy");
                self.status.send_modify(|s| s.phase = Phase::Copying);
                self.load_table_status().await?;
                state.applied_lsn
            }
            _ => self.initial_sync(&mut conn, &system).await?,
        };
        let tables = self.stored_tables().await?;
        conn.start_replication(&self.config.slot_name, start, self.config.publication.name())
            .await
            .map_err(|e| classify_start_replication(e, slot_lost_hint))?;
        // What was read back from the instance is what its disk holds.
        self.durable = start;
        self.syncing = None;
        self.status.send_modify(|s| s.applied_lsn = start);
        *attempt = 0;
        let mut applier = apply::Applier::new(
            self.instance.clone(),
            tables,
            start,
            self.config.max_buffered_bytes,
            self.status.clone(),
            self.changes.clone(),
            self.config.source.clone(),
        )
        .with_commit_delay(self.config.commit_delay);
        self.stream(conn, &mut applier).await
    }

    /// The apply loop. Arms in priority order: shutdown (finish the current
    /// transaction, then stop), the status timer (feedback is never starved
    /// by a busy stream), the stream itself, the receive deadline (checked
    /// only when nothing is ready to read), and last, when the stream has
    /// nothing ready, committing the transactions received so far.
    async fn stream(
        &mut self,
        mut conn: SourceConnection,
        applier: &mut apply::Applier,
    ) -> Result<Ended, ReplicationError> {
        let mut timer = tokio::time::interval(self.config.status_interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = *self.shutdown.borrow();
        // Check the publication for added tables at once (this also finishes
        // an interrupted initial copy), then now and then.
        self.backfill(&mut conn, applier).await?;
        let (sql, params) = store::streaming_statement();
        self.instance.query_params(&sql, params).await?;
        self.status.send_modify(|s| s.phase = Phase::Streaming);
        tracing::info!(slot = %self.config.slot_name, start = %applier.committed(), "streaming");
        let mut next_check = Instant::now() + self.config.publication_check_interval;
        let mut deadline = ReceiveDeadline::new(self.config.receive_timeout);
        // One timer, moved on only when it fires early (messages came in
        // meanwhile): setting a new one for every message cost CPU.
        let receive_timer = tokio::time::sleep_until(deadline.next());
        tokio::pin!(receive_timer);
        // The bookkeeping's timer ([`Pacer`]) and the commit delay's.
        let mut bookkeeping = Alarm::new();
        let mut commit_delay = CommitTimer::new()?;
        loop {
            if stopping && applier.between_transactions() {
                applier.flush_deferred().await?;
                break;
            }
            // Received transactions to commit: now, or once the commit
            // delay has passed.
            let flush_due = applier.flush_due().map(Instant::from_std);
            let flush_now = flush_due.is_some_and(|at| at <= Instant::now());
            commit_delay.set(flush_due.filter(|_| !flush_now))?;
            conn.hold_wakeups(commit_delay.armed());
            bookkeeping.set(self.pacer.due());
            tokio::select! {
                biased;
                changed = self.shutdown.changed(), if !stopping => {
                    stopping = changed.is_err() || *self.shutdown.borrow();
                }
                _ = timer.tick() => {
                    applier.advance_idle().await?;
                    self.confirm(&mut conn, applier.committed(), false).await?;
                    // Tables added to the publication (and without changes yet).
                    if applier.idle() && Instant::now() >= next_check {
                        self.backfill(&mut conn, applier).await?;
                        next_check = Instant::now() + self.config.publication_check_interval;
                    }
                }
                message = conn.recv() => {
                    deadline.received();
                    let mut message = message?;
                    loop {
                        match message {
                            None => return Err(ReplicationError::transient("the remote ended the replication stream")),
                            Some(StreamMessage::XLogData { data, wal_end, .. }) => {
                                applier.note_wal_end(wal_end);
                                applier.handle(&data).await?;
                                if applier.between_transactions() && applier.wants_backfill() {
                                    applier.flush_deferred().await?;
                                    self.backfill(&mut conn, applier).await?;
                                    next_check = Instant::now() + self.config.publication_check_interval;
                                }
                            }
                            Some(StreamMessage::Keepalive { wal_end, reply_requested, .. }) => {
                                applier.note_wal_end(wal_end);
                                if reply_requested {
                                    applier.advance_idle().await?;
                                    self.confirm(&mut conn, applier.committed(), false).await?;
                                } else {
                                    // Under load one comes after nearly every
                                    // commit: bookkeeping later, once.
                                    self.pacer.keepalive(Instant::now());
                                }
                            }
                        }
                        // The messages already read whole, at once (bounded
                        // by the read buffer).
                        match conn.try_recv_buffered()? {
                            Some(next) => message = Some(next),
                            None => break,
                        }
                    }
                }
                () = &mut receive_timer => {
                    if Instant::now() >= deadline.next() {
                        match deadline.expired() {
                            DeadlineAction::Ping => self.confirm(&mut conn, applier.committed(), true).await?,
                            DeadlineAction::Reconnect => {
                                return Err(ReplicationError::transient(format!(
                                    "nothing received from the remote for {:?} (receive timeout): the connection is presumed dead",
                                    self.config.receive_timeout
                                )));
                            }
                        }
                    }
                    receive_timer.as_mut().reset(deadline.next());
                },
                // Recording an idle position, confirming (see [`Pacer`]).
                () = bookkeeping.rings(), if bookkeeping.armed() => {
                    self.pacer.fired();
                    applier.advance_idle().await?;
                    self.confirm(&mut conn, applier.committed(), false).await?;
                }
                // The background sync ended: confirm what it covered (and
                // sync what was committed meanwhile, when its time comes).
                synced = async { (&mut self.syncing.as_mut().expect("guarded").1).await }, if self.syncing.is_some() => {
                    let (lsn, _) = self.syncing.take().expect("guarded");
                    synced_or_error(synced)?;
                    tracing::trace!(%lsn, "synced to disk in the background");
                    self.durable = self.durable.max(lsn);
                    self.confirm(&mut conn, applier.committed(), false).await?;
                }
                // Nothing more is waiting on the socket: commit the remote
                // transactions received so far (merged while we were behind)...
                () = std::future::ready(()), if flush_now => applier.flush_deferred().await?,
                // ... or after the commit delay: first read what came
                // meanwhile (held back, see [`commit_wait`]). Lowering the
                // mark signals it; one yield lets the runtime see that
                // before the next turn, whose `flush_now` then commits.
                rang = commit_delay.rings(), if commit_delay.armed() => {
                    rang?;
                    conn.hold_wakeups(false);
                    tokio::task::yield_now().await;
                }
            }
        }
        applier.advance_idle().await?;
        if let Some((lsn, task)) = self.syncing.take() {
            synced_or_error(task.await)?;
            self.durable = self.durable.max(lsn);
        }
        // The last confirmation is not paced.
        self.pacer.unpace(Instant::now());
        self.confirm(&mut conn, applier.committed(), false).await?;
        if let Some((lsn, task)) = self.syncing.take() {
            synced_or_error(task.await)?;
            self.durable = self.durable.max(lsn);
            conn.send_status(self.durable, false).await?;
        }
        conn.finish().await?;
        Ok(Ended::Stopped)
    }

    /// Confirms `lsn` to the remote once it is on stable storage locally: a
    /// persistent cache syncs its data directory first (the remote never
    /// resends what was confirmed). The sync runs in the background, so the
    /// apply goes on meanwhile (a `syncfs` can take a long time on a busy
    /// disk): until it ends, the remote hears the last durable position, and
    /// [`Supervisor::stream`] confirms `lsn` when it does. Committing locally
    /// never waits for it: readers see each transaction at once. Syncs are
    /// spaced ([`Pacer`]): one refused now is scheduled for later.
    async fn confirm(
        &mut self,
        conn: &mut SourceConnection,
        lsn: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        if lsn > self.durable && self.syncing.is_none() {
            if !self.config.sync_before_confirm {
                self.durable = lsn;
            } else if self.pacer.may_sync(Instant::now()) {
                let instance = self.instance.clone();
                self.syncing = Some((lsn, tokio::spawn(async move { instance.sync_to_disk().await })));
            }
        }
        conn.send_status(self.durable, reply_requested).await
    }

    /// The catalog connection, opened if needed. Taken out while in use:
    /// [`Supervisor::put_catalog`] gives it back once it is idle again, so a
    /// connection left inside a failed transaction is never reused.
    async fn take_catalog(&mut self) -> Result<tokio_postgres::Client, ReplicationError> {
        match self.catalog.take() {
            Some(client) if !client.is_closed() => Ok(client),
            _ => remote_client(&self.config.source).await,
        }
    }

    fn put_catalog(&mut self, client: tokio_postgres::Client) {
        self.catalog = Some(client);
    }

    /// First start (or a start after an interrupted copy): create the slot,
    /// copy every table under its snapshot. Returns the consistent point.
    async fn initial_sync(
        &mut self,
        conn: &mut SourceConnection,
        system: &source::SystemId,
    ) -> Result<Lsn, ReplicationError> {
        self.status.send_modify(|s| s.phase = Phase::Copying);
        let client = self.take_catalog().await?;
        let owns_publication = self.ensure_publication(&client).await?;
        // A slot of ours left by an earlier run is replaced (a resync, or a
        // copy that cannot resume); one still held by a lingering walsender
        // is retried.
        let held = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&self.config.slot_name],
            )
            .await?;
        if let Some(row) = held {
            let pid: Option<i32> = row.get(0);
            return Err(ReplicationError::from_remote(
                tokio_postgres::error::SqlState::OBJECT_IN_USE,
                format!("replication slot {} is still active for PID {}", self.config.slot_name, pid.unwrap_or(0)),
                None,
            ));
        }
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&self.config.slot_name],
            )
            .await?;
        let slot = conn.create_slot(&self.config.slot_name, false).await.map_err(|e| {
            if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) {
                e.with_hint("logical decoding needs wal_level = logical on the remote (then restart it)")
            } else {
                e
            }
        })?;
        let snapshot = slot.snapshot.clone().ok_or_else(|| ReplicationError::fatal("the slot exported no snapshot"))?;
        tracing::info!(slot = %slot.name, consistent_point = %slot.consistent_point, "slot created");
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(&snapshot)
            ))
            .await?;
        let (types, tables) = schema::describe_publication(&client, self.config.publication.name()).await?;
        prepare_local(&self.instance, &types, &tables).await?;
        store::begin_copy(
            &self.instance,
            &store::StoredState {
                system_identifier: system.system_id.clone(),
                database: self.config.source.dbname().to_owned(),
                slot_name: self.config.slot_name.clone(),
                publication: self.config.publication.name().to_owned(),
                owns_publication,
                phase: "copying".into(),
                applied_lsn: slot.consistent_point,
            },
            slot.consistent_point,
        )
        .await?;
        self.status.send_modify(|s| s.tables.clear());
        copy_tables(&self.instance, &self.config, &self.status, &client, &tables, slot.consistent_point).await?;
        client.batch_execute("COMMIT").await?;
        self.put_catalog(client);
        Ok(slot.consistent_point)
    }

    /// Whether an interrupted initial copy can resume: same remote, slot and
    /// publication, and the slot still exists (its position is where the
    /// finished tables were copied).
    async fn can_resume(
        &mut self,
        state: &store::StoredState,
        system: &source::SystemId,
    ) -> Result<bool, ReplicationError> {
        if state.system_identifier != system.system_id
            || state.database != self.config.source.dbname()
            || state.slot_name != self.config.slot_name
            || state.publication != self.config.publication.name()
        {
            return Ok(false);
        }
        let client = self.take_catalog().await?;
        let found = client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = $2 AND NOT temporary",
                &[&state.slot_name, &state.database],
            )
            .await?;
        self.put_catalog(client);
        Ok(found.is_some())
    }

    /// Creates the owned publication if missing. Returns whether it is owned.
    async fn ensure_publication(&self, client: &tokio_postgres::Client) -> Result<bool, ReplicationError> {
        let PublicationSpec::Owned { name, tables } = &self.config.publication else {
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

    async fn stored_tables(&self) -> Result<HashMap<u32, apply::KnownTable>, ReplicationError> {
        let result = self
            .instance
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
                let applies_from = r
                    .get::<String>(3)
                    .parse()
                    .map_err(|e| ReplicationError::fatal(format!("stored table LSN: {e}")))?;
                Ok((r.get::<i64>(0) as u32, apply::KnownTable { schema: r.get(1), name: r.get(2), applies_from }))
            })
            .collect()
    }

    /// Copies tables added to the publication since they were last
    /// checked: consistently with the stream, under the snapshot of a
    /// temporary slot created now (its consistent point `X` is past
    /// everything applied so far). Changes of transactions committed before
    /// `X` are in the copy and are skipped for these tables; later ones
    /// apply. The main stream waits meanwhile; status updates keep it alive.
    async fn backfill(
        &mut self,
        conn: &mut SourceConnection,
        applier: &mut apply::Applier,
    ) -> Result<(), ReplicationError> {
        let known: std::collections::HashSet<u32> = applier.known_tables().collect();
        let publication = self.config.publication.name().to_owned();
        let client = self.take_catalog().await?;
        let confirmed = self.durable;
        let work = async {
            let published: Vec<u32> = client
                .query(
                    "SELECT c.oid FROM pg_publication_tables pt JOIN pg_namespace n ON n.nspname = pt.schemaname \
                     JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename WHERE pt.pubname = $1",
                    &[&publication],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            // What our slot costs the remote (best effort: not on a standby).
            if let Ok(Some(row)) = client
                .query_opt(
                    "SELECT pg_current_wal_lsn()::text, restart_lsn::text FROM pg_replication_slots \
                     WHERE slot_name = $1 AND restart_lsn IS NOT NULL",
                    &[&self.config.slot_name],
                )
                .await
                && let (Ok(current), Ok(restart)) = (row.get::<_, String>(0).parse(), row.get::<_, String>(1).parse())
            {
                let retained = super::lag::retained_wal(current, restart);
                self.status.send_modify(|s| s.slot_retained_bytes = Some(retained));
            }
            if published.iter().all(|oid| known.contains(oid)) {
                return Ok::<_, ReplicationError>((client, Vec::new()));
            }
            let mut temp = SourceConnection::connect(&self.config.source, "pglite-cache backfill").await?;
            let name = format!("{}_backfill_{}", self.config.slot_name, std::process::id());
            let slot = temp.create_slot(&name, true).await?;
            let snapshot = slot.snapshot.clone().ok_or_else(|| ReplicationError::fatal("no exported snapshot"))?;
            client
                .batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                    quote_literal(&snapshot)
                ))
                .await?;
            let (types, tables) = schema::describe_publication(&client, &publication).await?;
            let new: Vec<schema::TableSchema> = tables.into_iter().filter(|t| !known.contains(&t.remote_oid)).collect();
            tracing::info!(tables = ?new.iter().map(|t| t.qualified()).collect::<Vec<_>>(), at = %slot.consistent_point, "backfilling tables added to the publication");
            prepare_local(&self.instance, &types, &new).await?;
            copy_tables(&self.instance, &self.config, &self.status, &client, &new, slot.consistent_point).await?;
            client.batch_execute("COMMIT").await?;
            temp.finish().await?; // drops the temporary slot
            let added = new
                .into_iter()
                .map(|t| {
                    let known =
                        apply::KnownTable { schema: t.schema, name: t.name, applies_from: slot.consistent_point };
                    (t.remote_oid, known)
                })
                .collect();
            Ok((client, added))
        };
        let (client, added) = {
            let mut work = std::pin::pin!(work);
            let mut timer = tokio::time::interval(self.config.status_interval);
            loop {
                tokio::select! {
                    added = &mut work => break added?,
                    _ = timer.tick() => conn.send_status(confirmed, false).await?,
                }
            }
        };
        self.put_catalog(client);
        applier.add_tables(added).await
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

/// The outcome of a background sync of the data directory.
fn synced_or_error(outcome: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), ReplicationError> {
    outcome.map_err(std::io::Error::other).flatten().map_err(|e| {
        ReplicationError::fatal(format!("syncing the cache's data directory to disk: {e}"))
            .with_hint("check the disk holding the data directory (full, read-only, failing)")
    })
}

fn slot_lost_hint() -> String {
    "the replication slot is gone (dropped, or invalidated after exceeding max_slot_wal_keep_size): \
     copy everything again from a new slot: restart `pglite-cache sync` with `--on-invalid-slot resync`, \
     or run `pglite-cache resync --data DIR` before starting it again, \
     or `pglite-cache decommission` and start over \
     (library: ReplicationHandle::resync() or SlotLostPolicy::Resync)"
        .into()
}

/// Consecutive "slot in use" failures before the hint is logged as an error.
const SLOT_IN_USE_PATIENCE: u32 = 5;
