//! Keeping an instance in sync with a remote PostgreSQL: snapshot copy, then
//! logical replication (pgoutput) from a permanent slot.
//!
//! ```text
//!  Replication::start ──> supervisor task ──> session: connect (replication=database)
//!                               │                 ├─ first start: CREATE_REPLICATION_SLOT (exported snapshot)
//!                               │                 │     └─ table_sync: COPY every table under that snapshot
//!                               │                 └─ START_REPLICATION from the stored LSN
//!                               │                       └─ apply: one local transaction per remote one
//!                               └─ transient error: reconnect with backoff; else halt with a hint
//! ```
//!
//! - [`config`]: the source URL and what to replicate.
//! - [`source`]: the replication-protocol client (and why it is our own).
//! - [`pgoutput`]: the message decoder.
//! - [`schema`]: local tables from the remote catalog.
//! - [`table_sync`]: the initial copy.
//! - `apply`: the streaming apply.
//! - [`store`]: LSN and table bookkeeping inside the instance.
//! - [`error`]: classified errors.
//!
//! Consistency: the slot is created with an exported snapshot, every table
//! is copied in one `REPEATABLE READ` transaction that imports it, and
//! streaming starts at the slot's consistent point: nothing is missed or
//! applied twice. If the process stops during the initial copy, the next
//! start drops the slot and copies again (the copy is not resumable).
//!
//! Exactly once: each remote transaction is one local transaction that also
//! stores its end LSN; after a restart, commits below it are skipped; the
//! LSN confirmed to the remote is always one already committed locally.

pub(crate) mod apply;
pub mod config;
pub mod error;
pub mod lsn;
pub mod pgoutput;
pub mod schema;
pub mod source;
pub mod store;
pub mod table_sync;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::Instance;

pub use config::{PublicationSpec, ReplicationConfig, SlotLostPolicy, SourceConfig};
pub use error::{ErrorKind, ReplicationError, RetryPolicy};
pub use lsn::Lsn;

use source::{SourceConnection, StreamMessage, quote_ident, quote_literal};

/// Where a replication is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Connecting for the first time.
    Starting,
    /// Copying the tables (initial sync).
    Copying,
    /// Applying changes as they come.
    Streaming,
    /// Lost the remote; reconnecting after a delay.
    Reconnecting {
        /// What went wrong.
        error: String,
        /// Consecutive failed attempts.
        attempt: u32,
    },
    /// Stopped by an error that needs an operator or cannot be retried.
    Halted {
        /// The error, with its hint.
        error: String,
    },
    /// Stopped on request.
    Stopped,
}

/// Where a table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableState {
    /// Waiting for its copy.
    Pending,
    /// Being copied.
    Copying,
    /// Copied; receiving changes.
    Ready,
}

/// One replicated table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStatus {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: TableState,
    /// Rows copied by the initial sync.
    pub rows_copied: u64,
    /// Bytes (COPY text) copied by the initial sync.
    pub bytes_copied: u64,
    /// Rows inserted by streaming since start.
    pub inserted: u64,
    /// Rows updated by streaming since start.
    pub updated: u64,
    /// Rows deleted by streaming since start.
    pub deleted: u64,
}

/// A snapshot of a replication's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The phase.
    pub phase: Phase,
    /// Per table.
    pub tables: Vec<TableStatus>,
    /// Everything up to here is applied (and confirmed to the remote).
    pub applied_lsn: Lsn,
    /// Commit time of the last applied remote transaction.
    pub applied_commit_time: Option<SystemTime>,
    /// The remote's WAL end as last reported.
    pub server_wal_end: Lsn,
    /// WAL bytes between the remote's end and what is applied.
    pub lag_bytes: u64,
    /// From commit on the remote to commit locally, for the last applied
    /// transaction.
    pub lag: Duration,
}

impl Default for Status {
    fn default() -> Status {
        Status {
            phase: Phase::Starting,
            tables: Vec::new(),
            applied_lsn: Lsn::ZERO,
            applied_commit_time: None,
            server_wal_end: Lsn::ZERO,
            lag_bytes: 0,
            lag: Duration::ZERO,
        }
    }
}

/// What kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    /// INSERT.
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// TRUNCATE.
    Truncate,
}

/// One applied change, as subscribers see it (values in text format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Operation.
    pub op: ChangeOp,
    /// The key (replica identity columns; all columns for FULL identity).
    pub key: Vec<(String, Option<String>)>,
    /// The new values (INSERT, UPDATE; unchanged TOAST columns omitted).
    pub new: Option<Vec<(String, Option<String>)>>,
}

/// A remote transaction, once committed locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedTransaction {
    /// The remote commit's LSN.
    pub commit_lsn: Lsn,
    /// The end of the remote commit record (the stored position).
    pub end_lsn: Lsn,
    /// When it committed on the remote.
    pub commit_time: SystemTime,
    /// How many changes it had.
    pub change_count: u64,
    /// Only the first 10,000 changes are listed.
    pub truncated: bool,
    /// Its changes.
    pub changes: Vec<Change>,
}

/// Entry point.
#[derive(Debug)]
pub struct Replication;

/// A running replication into one instance.
#[derive(Debug)]
pub struct ReplicationHandle {
    status: watch::Receiver<Status>,
    changes: broadcast::Sender<Arc<AppliedTransaction>>,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<Result<(), ReplicationError>>>>,
    instance: Instance,
    config: ReplicationConfig,
}

impl Replication {
    /// Starts replicating into `instance` in the background: the initial
    /// copy on first start (the slot is created then), streaming after, and
    /// resuming from the stored position on later starts.
    pub fn start(instance: Instance, config: ReplicationConfig) -> Result<ReplicationHandle, ReplicationError> {
        config.validate()?;
        let (status_tx, status) = watch::channel(Status::default());
        let (changes, _) = broadcast::channel(1024);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let supervisor = Supervisor {
            instance: instance.clone(),
            config: config.clone(),
            status: Arc::new(status_tx),
            changes: changes.clone(),
            shutdown: shutdown_rx,
        };
        let task = tokio::spawn(supervisor.run());
        Ok(ReplicationHandle {
            status,
            changes,
            shutdown,
            task: Mutex::new(Some(task)),
            instance,
            config,
        })
    }

    /// Removes everything a replication left behind: the slot, the
    /// publication if this tool created it, and the local bookkeeping (the
    /// local tables stay, now writable). Stop the replication first.
    pub async fn decommission(instance: &Instance, config: &ReplicationConfig) -> Result<(), ReplicationError> {
        let client = remote_client(&config.source).await?;
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&config.slot_name],
            )
            .await?;
        let owned = match store::load(instance).await {
            Ok(Some(state)) => state.owns_publication,
            _ => matches!(config.publication, PublicationSpec::Owned { .. }),
        };
        if owned {
            client
                .batch_execute(&format!(
                    "DROP PUBLICATION IF EXISTS {}",
                    quote_ident(config.publication.name())
                ))
                .await?;
        }
        store::drop_all(instance).await
    }
}

impl ReplicationHandle {
    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Every transaction applied from now on (a slow subscriber misses the
    /// oldest ones: `RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AppliedTransaction>> {
        self.changes.subscribe()
    }

    /// Waits until everything up to `lsn` is applied locally:
    /// read-your-writes. Read `pg_current_wal_insert_lsn()` on the remote
    /// after your commit (`pg_current_wal_lsn()` is the *written* position,
    /// which lags behind commits made with `synchronous_commit = off`).
    /// Fails if replication halts or stops first.
    pub async fn wait_for_lsn(&self, lsn: Lsn) -> Result<(), ReplicationError> {
        let mut rx = self.status.clone();
        loop {
            {
                let s = rx.borrow_and_update();
                if s.applied_lsn >= lsn && matches!(s.phase, Phase::Streaming | Phase::Reconnecting { .. }) {
                    return Ok(());
                }
                match &s.phase {
                    Phase::Halted { error } => {
                        return Err(ReplicationError::fatal(format!("replication halted: {error}")));
                    }
                    Phase::Stopped => return Err(ReplicationError::fatal("replication stopped")),
                    _ => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(ReplicationError::fatal("replication ended"));
            }
        }
    }

    /// Waits until the initial copy is done and changes stream.
    pub async fn wait_streaming(&self) -> Result<(), ReplicationError> {
        self.wait_for_lsn(Lsn::ZERO).await
    }

    /// Stops gracefully: the transaction being received is finished and
    /// applied, final feedback is sent, the connection closed. Returns the
    /// error that halted replication, if one did.
    pub async fn stop(&self) -> Result<(), ReplicationError> {
        let _ = self.shutdown.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        match task {
            Some(task) => task
                .await
                .map_err(|e| ReplicationError::fatal(format!("replication task failed: {e}")))?,
            None => Ok(()),
        }
    }

    /// Stops, then decommissions (see [`Replication::decommission`]).
    pub async fn decommission(&self) -> Result<(), ReplicationError> {
        let _ = self.stop().await;
        Replication::decommission(&self.instance, &self.config).await
    }
}

impl Drop for ReplicationHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn remote_client(source: &SourceConfig) -> Result<tokio_postgres::Client, ReplicationError> {
    let (client, connection) = source.postgres_config().connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "remote connection ended");
        }
    });
    Ok(client)
}

struct Supervisor {
    instance: Instance,
    config: ReplicationConfig,
    status: Arc<watch::Sender<Status>>,
    changes: broadcast::Sender<Arc<AppliedTransaction>>,
    shutdown: watch::Receiver<bool>,
}

/// How a session ended without error.
enum Ended {
    Stopped,
}

impl Supervisor {
    async fn run(mut self) -> Result<(), ReplicationError> {
        let mut attempt = 0u32;
        let result = loop {
            if *self.shutdown.borrow() {
                break Ok(());
            }
            let outcome = self.session(&mut attempt).await;
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
                        self.status.send_modify(|s| {
                            s.phase = Phase::Reconnecting {
                                error: e.to_string(),
                                attempt,
                            }
                        });
                        tokio::select! {
                            biased;
                            _ = self.shutdown.changed() => break Ok(()),
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    RetryPolicy::ManualIntervention | RetryPolicy::NoRetry => {
                        tracing::error!(error = %e, "replication halted");
                        self.status
                            .send_modify(|s| s.phase = Phase::Halted { error: e.to_string() });
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
            .map_err(|e| {
                if e.is_slot_lost() {
                    e.with_hint(slot_lost_hint())
                } else {
                    e
                }
            })?;
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
    /// by a busy stream), then the stream itself.
    async fn stream(
        &mut self,
        mut conn: SourceConnection,
        applier: &mut apply::Applier,
    ) -> Result<Ended, ReplicationError> {
        let mut timer = tokio::time::interval(self.config.status_interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = *self.shutdown.borrow();
        loop {
            if stopping && applier.idle() {
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
                }
                message = conn.recv() => match message? {
                    None => return Err(ReplicationError::transient("the remote ended the replication stream")),
                    Some(StreamMessage::XLogData { data, wal_end, .. }) => {
                        applier.note_wal_end(wal_end);
                        applier.handle(&data).await?;
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
        let slot = conn.create_slot(&self.config.slot_name).await?;
        let snapshot = slot
            .snapshot
            .clone()
            .ok_or_else(|| ReplicationError::fatal("the slot exported no snapshot"))?;
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
        self.status.send_modify(|s| {
            s.tables = tables
                .iter()
                .map(|t| TableStatus {
                    schema: t.schema.clone(),
                    name: t.name.clone(),
                    state: TableState::Pending,
                    rows_copied: 0,
                    bytes_copied: 0,
                    inserted: 0,
                    updated: 0,
                    deleted: 0,
                })
                .collect();
        });
        let mut states = Vec::new();
        for (i, table) in tables.iter().enumerate() {
            self.status.send_modify(|s| s.tables[i].state = TableState::Copying);
            let status = self.status.clone();
            let rows = table_sync::copy_table(
                &client,
                &self.instance,
                table,
                self.config.copy_batch_bytes,
                |rows, bytes| {
                    status.send_modify(|s| {
                        s.tables[i].rows_copied = rows;
                        s.tables[i].bytes_copied = bytes;
                    })
                },
            )
            .await?;
            tracing::info!(table = %table.qualified(), rows, "table copied");
            states.push(store::table_state_statement(
                &table.schema,
                &table.name,
                table.remote_oid,
                "ready",
                rows,
                slot.consistent_point,
            ));
        }
        client.batch_execute("COMMIT").await?;
        // Keys and indexes after the load (faster), then the read-only guard.
        for table in &tables {
            for sql in schema::constraint_statements(table) {
                self.instance.exec(&sql).await?;
            }
            for sql in &table.indexes {
                if let Err(e) = self.instance.exec(sql).await {
                    tracing::warn!(table = %table.qualified(), index = %sql, error = %e, "could not create index locally; skipped");
                }
            }
            if self.config.read_only {
                self.instance.exec(&schema::read_only_trigger_sql(table)).await?;
            }
        }
        states.push(store::streaming_statement());
        self.instance.transaction(&states).await?;
        self.status.send_modify(|s| {
            for t in &mut s.tables {
                t.state = TableState::Ready;
            }
        });
        Ok(slot.consistent_point)
    }

    /// Creates the owned publication if missing. Returns whether it is owned.
    async fn ensure_publication(&self, client: &tokio_postgres::Client) -> Result<bool, ReplicationError> {
        let PublicationSpec::Owned { name, tables } = &self.config.publication else {
            return Ok(false);
        };
        let exists = !client
            .query("SELECT 1 FROM pg_publication WHERE pubname = $1", &[name])
            .await?
            .is_empty();
        if !exists {
            let list: Vec<String> = tables
                .iter()
                .map(|t| match t.split_once('.') {
                    Some((s, n)) => format!("{}.{}", quote_ident(s), quote_ident(n)),
                    None => quote_ident(t),
                })
                .collect();
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    quote_ident(name),
                    list.join(", ")
                ))
                .await?;
        }
        Ok(true)
    }

    async fn stored_tables(&self) -> Result<HashMap<u32, (String, String)>, ReplicationError> {
        let result = self
            .instance
            .query(
                "SELECT remote_oid::int8, schema_name, table_name FROM pglite_cache.tables",
                &[],
            )
            .await?;
        Ok(result
            .rows
            .iter()
            .map(|r| (r.get::<i64>(0) as u32, (r.get::<String>(1), r.get::<String>(2))))
            .collect())
    }

    async fn load_table_status(&self) -> Result<(), ReplicationError> {
        let result = self
            .instance
            .query(
                "SELECT schema_name, table_name, rows_copied FROM pglite_cache.tables ORDER BY 1, 2",
                &[],
            )
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
     decommission and start again for a full resync, or set on_slot_lost = Resync"
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
