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
//!                                  (a panic too: `guarded`)
//! ```
//!
//! - [`config`]: the source URL and what to replicate.
//! - [`conninfo`]: libpq's connection settings: environment, service and password files.
//! - `source`: the replication-protocol client (and why it is our own).
//! - `pgoutput`: the message decoder.
//! - `schema`: local tables from the remote catalog.
//! - `table_sync`: the initial copy.
//! - `apply`: the streaming apply.
//! - `store`: LSN and table bookkeeping inside the instance ([`Replication::recorded`] reads it).
//! - `tls`: TLS to the remote (rustls).
//! - [`error`]: classified errors.
//! - [`stream`]: fan-out through NATS JetStream (one slot, many caches).
//! - `deadline`: the receive deadline (half-open connections).
//!
//! Consistency: the slot is created with an exported snapshot, every table
//! is copied in one `REPEATABLE READ` transaction that imports it, and
//! streaming starts at the slot's consistent point: nothing is missed or
//! applied twice. If the process stops during the initial copy, the slot
//! survives: the next start keeps the tables already copied and copies the
//! others under the snapshot of a temporary slot, as tables added to the
//! publication are (their changes apply from that slot's point).
//!
//! Durable before confirmed: a persistent instance's data directory is
//! synced to disk before a position is confirmed to the remote.
//!
//! Resync: a new copy of a table that exists locally is loaded into a
//! shadow table and swapped in by one local transaction, so readers always
//! find the old table or the new one.
//!
//! Exactly once: each remote transaction is one local transaction that also
//! stores its end LSN; after a restart, commits below it are skipped; the
//! LSN confirmed to the remote is always one already committed locally.
//! While the apply is behind, several remote transactions may share one
//! local commit (each still all-or-nothing for readers).
//!
//! Big transactions: protocol v1 (the remote decodes a transaction whole
//! before sending it). Up to `max_buffered_bytes` of a transaction is held
//! in memory; past that it is applied piece by piece inside one open local
//! transaction and committed at its end, so memory does not grow with the
//! transaction. Readers of the instance wait while such a transaction is
//! applied (PGlite has one session); they never see part of it.
//!
//! Schema changes upstream (columns added, dropped, renamed, retyped; enum
//! labels; tables renamed; indexes) are followed in WAL order by the apply;
//! one it cannot follow in place copies that table again (see
//! `docs/schema-changes.md`). Tables added to the publication are copied
//! and then streamed; a table removed from it keeps its local rows, which
//! stop changing.
//!
//! Not yet: `sslmode=verify-ca`, client certificates and SCRAM channel
//! binding; protocol v2 streaming of in-progress transactions.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use pglite_cache::replication::{PublicationSpec, Replication, ReplicationConfig};
//! use pglite_cache::{Instance, InstanceOptions};
//!
//! let cache = Instance::start(InstanceOptions::persistent("./cache")).await?;
//! let source = "postgres://replicator:secret@db.internal/shop".parse()?;
//! let config = ReplicationConfig::new(
//!     source,
//!     PublicationSpec::Owned { name: "cache_pub".into(), tables: vec!["public.orders".into()] },
//! );
//! let replication = Replication::start(cache.clone(), config)?;
//! replication.wait_streaming().await?;
//!
//! // Read your own write: wait for the remote's position after committing.
//! # let lsn = pglite_cache::replication::Lsn::ZERO;
//! replication.wait_for_lsn(lsn).await?;
//! let rows = cache.query("SELECT count(*) FROM orders", &[]).await?;
//! println!("{:?}, lag {} bytes", rows.rows[0].get::<i64>(0), replication.status().lag_bytes);
//! replication.stop().await?;
//! # Ok(()) }
//! ```

pub(crate) mod apply;
mod commit_wait;
pub mod config;
pub mod conninfo;
mod copy_binary;
mod deadline;
pub mod error;
pub mod lag;
pub mod lsn;
mod pacer;
pub(crate) mod pgoutput;
mod retry;
pub(crate) mod schema;
pub(crate) mod source;
mod statements;
pub(crate) mod store;
pub mod stream;
mod supervisor;
pub(crate) mod table_sync;
pub(crate) mod tls;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::Instance;

pub use config::{PublicationSpec, ReplicationConfig, SlotLostPolicy, SourceConfig};
pub use error::{ErrorKind, ReplicationError, RetryPolicy};
pub use lsn::Lsn;
pub use store::StoredState as Recorded;
pub use tls::TlsMode;

use source::quote_ident;
use supervisor::Supervisor;

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
    /// Column values of streamed UPDATEs that the remote sent as "unchanged
    /// TOAST" (not resent) and that kept their local value, since start.
    pub unchanged_toast_values: u64,
    /// Remote transactions applied since start.
    pub applied_transactions: u64,
    /// Row changes (and truncated tables) applied since start.
    pub applied_changes: u64,
    /// Local transactions that applied them since start: fewer than
    /// `applied_transactions` when remote transactions were merged into one
    /// local commit (see [`ReplicationConfig::commit_delay`]).
    pub local_commits: u64,
    /// Remote commit to local commit, per applied transaction: since start
    /// and over the last minute or two.
    pub commit_lag: lag::LagStats,
    /// WAL the remote keeps for our slot (`restart_lsn` to its current
    /// position), as last checked (every status interval while idle).
    pub slot_retained_bytes: Option<u64>,
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
            unchanged_toast_values: 0,
            applied_transactions: 0,
            applied_changes: 0,
            local_commits: 0,
            commit_lag: lag::LagStats::default(),
            slot_retained_bytes: None,
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
    status_tx: Arc<watch::Sender<Status>>,
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
        let status_tx = Arc::new(status_tx);
        let (changes, _) = broadcast::channel(1024);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let supervisor = Supervisor {
            instance: instance.clone(),
            config: config.clone(),
            status: status_tx.clone(),
            changes: changes.clone(),
            shutdown: shutdown_rx,
            catalog: None,
            durable: Lsn::ZERO,
            syncing: None,
            pacer: pacer::Pacer::new(tokio::time::Instant::now()),
        };
        let task = tokio::spawn(guarded(supervisor.run(), status_tx.clone()));
        Ok(ReplicationHandle { status, status_tx, changes, shutdown, task: Mutex::new(Some(task)), instance, config })
    }

    /// Asks a cache that is not replicating now to copy tables again when
    /// it next starts (`None`: every table, from a new slot; otherwise these
    /// tables from a snapshot taken then). `Ok(false)`: no replication is
    /// recorded in `instance`.
    pub async fn request_resync(instance: &Instance, tables: Option<&[String]>) -> Result<bool, ReplicationError> {
        if Self::recorded(instance).await?.is_none() {
            return Ok(false);
        }
        store::request_resync(instance, tables).await.map(|()| true)
    }

    /// The replication recorded in `instance` by an earlier start, if any.
    pub async fn recorded(instance: &Instance) -> Result<Option<Recorded>, ReplicationError> {
        let exists = instance.query("SELECT to_regclass('pglite_cache.replication') IS NOT NULL", &[]).await?;
        if !exists.rows.first().is_some_and(|row| row.get::<bool>(0)) {
            return Ok(None);
        }
        store::load(instance).await
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
                .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(config.publication.name())))
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
        self.shutdown.send_replace(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        match task {
            Some(task) => task.await.map_err(|e| ReplicationError::fatal(format!("replication task failed: {e}")))?,
            None => Ok(()),
        }
    }

    /// Copies everything again from a new slot, e.g. after the slot was
    /// lost: stops (finishing the transaction being applied), forgets the
    /// position, and starts again with the same handle. Readers keep the
    /// old tables until each new copy is swapped in (one local transaction
    /// per table).
    pub async fn resync(&self) -> Result<(), ReplicationError> {
        let _ = self.stop().await; // a halting error is what we are fixing
        store::request_resync(&self.instance, None).await?;
        self.respawn();
        Ok(())
    }

    /// Copies these tables (`schema.table`, or `table` in `public`) again
    /// from a snapshot taken now, while the others keep streaming: stops,
    /// marks them, and starts again; the old copies stay readable until the
    /// new ones are swapped in.
    pub async fn resync_tables(&self, tables: &[String]) -> Result<(), ReplicationError> {
        let _ = self.stop().await;
        let marked = store::request_resync(&self.instance, Some(tables)).await;
        self.respawn();
        marked
    }

    fn respawn(&self) {
        self.shutdown.send_replace(false);
        let supervisor = Supervisor {
            instance: self.instance.clone(),
            config: self.config.clone(),
            status: self.status_tx.clone(),
            changes: self.changes.clone(),
            shutdown: self.shutdown.subscribe(),
            catalog: None,
            durable: Lsn::ZERO,
            syncing: None,
            pacer: pacer::Pacer::new(tokio::time::Instant::now()),
        };
        self.status_tx.send_modify(|s| s.phase = Phase::Starting);
        *self.task.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(tokio::spawn(guarded(supervisor.run(), self.status_tx.clone())));
    }

    /// Stops, then decommissions (see [`Replication::decommission`]).
    pub async fn decommission(&self) -> Result<(), ReplicationError> {
        let _ = self.stop().await;
        Replication::decommission(&self.instance, &self.config).await
    }
}

impl Drop for ReplicationHandle {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// Runs the replication task so that a panic in it (a bug) becomes a halt
/// with its cause, in the status like any other halting error, instead of a
/// phase that says "streaming" while nothing is applied.
async fn guarded(
    task: impl std::future::Future<Output = Result<(), ReplicationError>>,
    status: Arc<watch::Sender<Status>>,
) -> Result<(), ReplicationError> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(task).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let cause = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let e = ReplicationError::fatal(format!("the replication task panicked: {cause}"))
                .with_hint("a bug: please report it with the log. Restarting resumes from the last applied position");
            tracing::error!(error = %e, "replication halted");
            status.send_modify(|s| s.phase = Phase::Halted { error: e.to_string() });
            Err(e)
        }
    }
}

pub(crate) async fn remote_client(source: &SourceConfig) -> Result<tokio_postgres::Client, ReplicationError> {
    // tokio-postgres bounds only the TCP connect by `connect_timeout`; a
    // remote that accepts but never completes startup must not hang us.
    let config = source.postgres_config();
    let connecting = config.connect(source.tls_connector()?);
    let (client, connection) = tokio::time::timeout(source.connect_timeout(), connecting).await.map_err(|_| {
        ReplicationError::transient(format!(
            "the remote did not complete connection startup and authentication within {:?}",
            source.connect_timeout()
        ))
    })??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "remote connection ended");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_halts_with_its_cause() {
        let (status, rx) = watch::channel(Status { phase: Phase::Streaming, ..Status::default() });
        let status = Arc::new(status);
        let seen = rx.clone();
        let task = async move {
            if seen.borrow().phase == Phase::Streaming {
                panic!("applier invariant broken");
            }
            Ok(())
        };
        let e = tokio::spawn(guarded(task, status.clone())).await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Fatal);
        assert!(e.message().contains("applier invariant broken"), "{e}");
        match &rx.borrow().phase {
            Phase::Halted { error } => assert!(error.contains("panicked"), "{error}"),
            other => panic!("{other:?}"),
        }
    }
}
