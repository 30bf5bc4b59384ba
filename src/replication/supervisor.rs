//! The task behind a [`super::ReplicationHandle`]: sessions (connect, set
//! up or resume, stream), reconnecting with backoff after transient errors,
//! halting with a hint after the others.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::Instance;

use super::apply;
use super::config::{PublicationSpec, ReplicationConfig, SlotLostPolicy};
use super::error::{ReplicationError, RetryPolicy};
use super::lsn::Lsn;
use super::schema;
use super::source::{self, SourceConnection, StreamMessage, quote_ident, quote_literal};
use super::store;
use super::table_sync::copy_tables;
use super::{AppliedTransaction, Phase, Status, TableState, TableStatus, remote_client};

pub(super) struct Supervisor {
    pub(super) instance: Instance,
    pub(super) config: ReplicationConfig,
    pub(super) status: Arc<watch::Sender<Status>>,
    pub(super) changes: broadcast::Sender<Arc<AppliedTransaction>>,
    pub(super) shutdown: watch::Receiver<bool>,
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
                Err(e) => match e.retry_policy(attempt) {
                    RetryPolicy::RetryAfter(delay) => {
                        tracing::warn!(error = %e, ?delay, attempt, "replication interrupted; reconnecting");
                        attempt += 1;
                        self.status.send_modify(|s| s.phase = Phase::Reconnecting { error: e.to_string(), attempt });
                        tokio::select! {
                            biased;
                            _ = self.shutdown.changed() => break Ok(()),
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    RetryPolicy::ManualIntervention | RetryPolicy::NoRetry => {
                        tracing::error!(error = %e, "replication halted");
                        self.status.send_modify(|s| s.phase = Phase::Halted { error: e.to_string() });
                        return Err(e);
                    }
                },
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
            _ => self.initial_sync(&mut conn, &system).await?,
        };
        let tables = self.stored_tables().await?;
        conn.start_replication(&self.config.slot_name, start, self.config.publication.name())
            .await
            .map_err(|e| if e.is_slot_lost() { e.with_hint(slot_lost_hint()) } else { e })?;
        self.status.send_modify(|s| {
            s.phase = Phase::Streaming;
            s.applied_lsn = start;
        });
        *attempt = 0;
        tracing::info!(slot = %self.config.slot_name, %start, "streaming");
        let mut applier = apply::Applier::new(
            self.instance.clone(),
            tables,
            start,
            self.config.max_buffered_bytes,
            self.status.clone(),
            self.changes.clone(),
            self.config.source.clone(),
        );
        self.stream(conn, &mut applier).await
    }

    /// The apply loop. Arms in priority order: shutdown (finish the current
    /// transaction, then stop), the status timer (feedback is never starved
    /// by a busy stream), the stream itself, and last, when the stream has
    /// nothing ready, committing the transactions received so far.
    async fn stream(
        &mut self,
        mut conn: SourceConnection,
        applier: &mut apply::Applier,
    ) -> Result<Ended, ReplicationError> {
        let mut timer = tokio::time::interval(self.config.status_interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = *self.shutdown.borrow();
        // Check the publication for added tables at once, then now and then.
        self.backfill(&mut conn, applier).await?;
        loop {
            if stopping && applier.between_transactions() {
                applier.flush_deferred().await?;
                break;
            }
            tokio::select! {
                biased;
                changed = self.shutdown.changed(), if !stopping => {
                    stopping = changed.is_err() || *self.shutdown.borrow();
                }
                _ = timer.tick() => {
                    applier.advance_idle().await?;
                    conn.send_status(applier.committed(), false).await?;
                    // Tables added to the publication (and without changes yet).
                    if applier.idle() {
                        self.backfill(&mut conn, applier).await?;
                    }
                }
                message = conn.recv() => match message? {
                    None => return Err(ReplicationError::transient("the remote ended the replication stream")),
                    Some(StreamMessage::XLogData { data, wal_end, .. }) => {
                        applier.note_wal_end(wal_end);
                        applier.handle(&data).await?;
                        if applier.between_transactions() && applier.wants_backfill() {
                            applier.flush_deferred().await?;
                            self.backfill(&mut conn, applier).await?;
                        }
                    }
                    Some(StreamMessage::Keepalive { wal_end, reply_requested, .. }) => {
                        let before = applier.committed();
                        applier.note_wal_end(wal_end);
                        applier.advance_idle().await?;
                        if reply_requested || applier.committed() > before {
                            conn.send_status(applier.committed(), false).await?;
                        }
                    }
                },
                // Nothing more is waiting on the socket: commit the remote
                // transactions received so far (merged while we were behind).
                () = std::future::ready(()), if applier.has_deferred() => applier.flush_deferred().await?,
            }
        }
        applier.advance_idle().await?;
        conn.send_status(applier.committed(), false).await?;
        conn.finish().await?;
        Ok(Ended::Stopped)
    }

    /// First start (or a start after an interrupted copy): create the slot,
    /// copy every table under its snapshot. Returns the consistent point.
    async fn initial_sync(
        &mut self,
        conn: &mut SourceConnection,
        system: &source::SystemId,
    ) -> Result<Lsn, ReplicationError> {
        self.status.send_modify(|s| s.phase = Phase::Copying);
        let client = remote_client(&self.config.source).await?;
        let owns_publication = self.ensure_publication(&client).await?;
        // A slot of ours left by an interrupted copy is useless: its snapshot is gone.
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&self.config.slot_name],
            )
            .await?;
        let slot = conn.create_slot(&self.config.slot_name, false).await?;
        let snapshot = slot.snapshot.clone().ok_or_else(|| ReplicationError::fatal("the slot exported no snapshot"))?;
        tracing::info!(slot = %slot.name, consistent_point = %slot.consistent_point, "slot created");
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(&snapshot)
            ))
            .await?;
        let (types, tables) = schema::describe_publication(&client, self.config.publication.name()).await?;
        self.instance.exec(&schema::create_script(&types, &tables)).await?;
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
        let (sql, params) = store::streaming_statement();
        self.instance.query_params(&sql, params).await?;
        Ok(slot.consistent_point)
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
        let work = async {
            let client = remote_client(&self.config.source).await?;
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
                return Ok::<_, ReplicationError>(Vec::new());
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
            self.instance.exec(&schema::create_script(&types, &new)).await?;
            copy_tables(&self.instance, &self.config, &self.status, &client, &new, slot.consistent_point).await?;
            client.batch_execute("COMMIT").await?;
            temp.finish().await?; // drops the temporary slot
            Ok(new
                .into_iter()
                .map(|t| {
                    let known =
                        apply::KnownTable { schema: t.schema, name: t.name, applies_from: slot.consistent_point };
                    (t.remote_oid, known)
                })
                .collect())
        };
        let mut work = std::pin::pin!(work);
        let mut timer = tokio::time::interval(self.config.status_interval);
        let added = loop {
            tokio::select! {
                added = &mut work => break added?,
                _ = timer.tick() => conn.send_status(applier.committed(), false).await?,
            }
        };
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

fn slot_lost_hint() -> String {
    "the replication slot is gone (dropped, or invalidated after exceeding max_slot_wal_keep_size): \
     call ReplicationHandle::resync() (or decommission and start again) for a full resync, \
     or set on_slot_lost = Resync"
        .into()
}

impl ReplicationError {
    /// The slot was dropped or invalidated on the remote.
    pub fn is_slot_lost(&self) -> bool {
        let m = self.message();
        (m.contains("replication slot") && m.contains("does not exist"))
            || m.contains("can no longer get changes from replication slot")
    }
}
