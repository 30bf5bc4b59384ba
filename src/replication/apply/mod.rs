//! The streaming apply: pgoutput messages in, local transactions out.
//!
//! Each remote transaction is applied in a local transaction that also
//! advances the stored LSN ([`super::store`]), so a crash leaves data and
//! position in agreement; on restart, transactions whose commit is below the
//! stored LSN are skipped. The LSN confirmed to the remote is the stored one:
//! it only moves after the local commit.
//!
//! Changes are grouped per table: consecutive changes of a table of the same
//! kind become one statement or one `COPY` ([`super::statements`]). Changes
//! of different tables commute (cache tables have no foreign keys, and no
//! triggers fire during the apply), so a stream of small transactions that
//! alternate between tables still makes a handful of statements.
//!
//! A small transaction is buffered and committed in one round trip
//! (`Instance::transaction`). While more of the stream is already waiting on
//! the socket, the following transactions join the same local commit (group
//! commit: each remote transaction is still all-or-nothing for readers, and
//! the stored LSN is the last one's end). While the stream is busy, they
//! also wait up to the commit delay for more (`ReplicationConfig::commit_delay`,
//! like PostgreSQL's): fewer local commits, less CPU per transaction. A transaction that outgrows
//! `max_buffered_bytes` opens an interactive local transaction
//! ([`crate::Transaction`], exclusive use of the instance) and is applied
//! piece by piece as it arrives (the next piece is decoded while the previous
//! one is applied), then committed with its LSN: memory stays bounded
//! whatever the size of the remote transaction, without spill files.
//! (Protocol v1: the remote decodes the whole transaction before sending it,
//! spilling on its side past `logical_decoding_work_mem`.) Readers of the
//! instance wait while such a transaction is being applied; they never see
//! part of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{broadcast, watch};

use crate::params::Param;
use crate::{Instance, Transaction};

use super::config::SourceConfig;
use super::error::ReplicationError;
use super::lsn::Lsn;
use super::pgoutput::{self, LogicalMessage, OldTuple, Relation, Tuple, Value};
use super::source::{pg_time, quote_ident};
use super::statements::{LocalColumn, RelationState, Step, run_steps, value_text};
use super::store;
use super::{AppliedTransaction, Change, ChangeOp, Status};

mod batch;
pub(super) mod columns;
mod commit;
pub(crate) mod facts;
mod prepared;
pub(super) mod relation;
#[cfg(test)]
mod tests;

use batch::Batch;
use commit::retry_in_order;
use prepared::Prepared;

/// Settings that make the apply statements fast and let them through the
/// read-only triggers; local to each apply transaction.
const APPLY_SETTINGS: &str = "SELECT set_config('session_replication_role', 'replica', true), \
     set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)";

/// Settings of the small transactions, whose statements are prepared
/// ([`prepared`]): generic plans, so they are planned once, not per use; and
/// the read-only triggers are passed with `pglite_cache.applying` (see
/// [`store::INIT_SQL`]) rather than `session_replication_role`, because
/// PostgreSQL resets every cached plan of the session whenever the role
/// changes (measured: 317 -> 87 µs of engine CPU per one-INSERT-one-UPDATE
/// transaction, `examples/replication_bench_engine.rs`). Cache tables carry
/// no other triggers.
///
/// They are set by the stored-LSN update, the transaction's first statement
/// (one statement less per transaction): in the `WHERE` clause of an
/// `UPDATE` of the one row of `pglite_cache.replication`, evaluated for
/// that row (volatile, so never folded away). The statement that sets
/// them is planned before they apply, so it must be cheap to plan on its
/// own ([`store::applied_statement`]). Without the row (impossible
/// while streaming) nothing is set and the read-only triggers refuse the
/// changes: an error, never a silent skip.
const PREPARED_SETTINGS: &str = "set_config('pglite_cache.applying', 'on', true) IS NOT NULL \
     AND set_config('enable_hashjoin', 'off', true) IS NOT NULL \
     AND set_config('enable_mergejoin', 'off', true) IS NOT NULL \
     AND set_config('plan_cache_mode', 'force_generic_plan', true) IS NOT NULL";

/// At most this many remote transactions are committed together.
const MAX_MERGED: usize = 10_000;

/// Remote transactions wait at most this long for a merged commit.
const MAX_MERGE_DELAY: Duration = Duration::from_millis(20);

/// A merged commit is cut once it holds this many statements: when the
/// merged transactions do not group (e.g. INSERT and UPDATE of one table
/// alternating), merging saves little engine time, and a long local
/// transaction keeps readers waiting (measured: 395 merged transactions,
/// 790 statements, held readers for 268 ms).
const MAX_MERGED_STEPS: usize = 64;

/// A merged commit is also cut once it holds this many row changes.
/// Readers wait behind a local commit, and its engine time grows with its
/// rows (~20 µs a change for a 4-column table with one index, so ~2.5 ms
/// at this cap). Cut by the byte cap alone, a burst from a publisher with
/// `synchronous_commit = off` merged ~750 changes a commit, 10-20 ms each,
/// and a reader polling the cache waited p99 129-203 ms, where it waited
/// 4-5 ms on a native subscriber (BENCHMARKS.md, round 8). Such a burst
/// costs ~10% more CPU in commits of this size; smaller ones cost more
/// (+20-40% at 32-64 changes).
const MAX_MERGED_CHANGES: usize = 128;

/// A merged commit is also cut once it holds this many bytes of changes:
/// inserts and updates of a table group apart ([`batch`]), so merged
/// transactions make few statements, and the rows decide how long readers
/// wait.
pub(crate) const MAX_MERGED_BYTES: usize = 64 << 10;

/// A remote transaction that grows past this many buffered bytes (or
/// `max_buffered_bytes` if smaller) is applied in pieces of about this size
/// while the rest of it is still arriving, instead of all at once after its
/// Commit: the local apply overlaps the remote's sending (a 20,000-row
/// INSERT was applied at 0.6x a native subscriber's speed in one piece).
/// Readers wait from the first piece on, as they would for the whole
/// apply.
const PIPELINE_BYTES: usize = 256 << 10;

/// Most changes kept per transaction for subscribers (the rest is counted).
const MAX_SUBSCRIBED_CHANGES: usize = 10_000;

/// A replicated table as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KnownTable {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// Its copy holds every transaction committed before this LSN; changes
    /// of earlier transactions are skipped for it.
    pub applies_from: Lsn,
}

/// The remote transaction being received.
struct Pending {
    /// Between Begin and Commit of a remote transaction. When false, the
    /// remote transactions in `done` wait to be committed together.
    open: bool,
    /// The remote transaction being received.
    final_lsn: Lsn,
    /// Its transaction id.
    xid: u32,
    /// Already applied before a restart: receive and drop.
    skip: bool,
    /// The statements of the local transaction being built (pure: see
    /// [`batch`]).
    batch: Batch,
    /// Open once the transaction outgrew the buffer.
    local: Option<Arc<Transaction>>,
    /// The piece being applied in the open local transaction while the
    /// next one is received (a pipeline one piece deep).
    in_flight: Option<tokio::task::JoinHandle<Result<Duration, crate::Error>>>,
    changes: Vec<Change>,
    change_count: u64,
    /// Inserted, updated, deleted rows per remote table OID.
    counts: HashMap<u32, [u64; 3]>,
    /// When Begin arrived, and time spent waiting for the instance.
    started: std::time::Instant,
    busy: Duration,
    /// Remote transactions received whole, committed with the next flush.
    done: Vec<AppliedTransaction>,
    /// End LSN and commit time of the last of them.
    last_end: Option<(Lsn, i64)>,
}

impl Pending {
    /// Waits for the piece in flight; its error is the transaction's.
    async fn settle(&mut self) -> Result<(), ReplicationError> {
        if let Some(task) = self.in_flight.take() {
            let took = task.await.map_err(|e| ReplicationError::fatal(format!("apply task failed: {e}")))??;
            self.busy += took;
        }
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // An abandoned transaction (error, disconnect) must not keep
        // applying: the task holds the lease until it ends.
        if let Some(task) = self.in_flight.take() {
            task.abort();
        }
    }
}

/// Applies one session's stream.
pub(crate) struct Applier {
    instance: Instance,
    relations: HashMap<u32, Arc<RelationState>>,
    /// Local tables by remote OID, from the store.
    tables: HashMap<u32, KnownTable>,
    /// Relation messages of tables not copied yet (added to the publication
    /// later): their changes are skipped until the backfill, whose snapshot
    /// contains them.
    unknown: HashMap<u32, Relation>,
    /// Relation messages of known tables not acted on yet (see [`relation`]).
    stashed: HashMap<u32, Relation>,
    /// Labels of the enums used by replicated columns, as known locally.
    labels: HashMap<String, std::collections::HashSet<Bytes>>,
    /// Index names of each table upstream when last looked at.
    remote_indexes: HashMap<u32, Vec<String>>,
    /// Index DDL to run after the local transaction commits: (table, SQL).
    index_ddl: Vec<(String, String)>,
    /// Everything up to here is committed locally.
    committed: Lsn,
    /// The server's latest WAL end (keepalives, XLogData).
    server_wal_end: Lsn,
    pending: Option<Pending>,
    max_buffered: usize,
    status: Arc<watch::Sender<Status>>,
    changes: broadcast::Sender<Arc<AppliedTransaction>>,
    /// For catalog lookups on the remote (added columns), opened when needed.
    source: SourceConfig,
    catalog: Option<tokio_postgres::Client>,
    /// Small local transactions run through prepared statements.
    prepared: Prepared,
    /// How long received transactions wait for others to join their local
    /// commit while the stream is busy
    /// ([`super::ReplicationConfig::commit_delay`]).
    commit_delay: Duration,
    /// When the last local commit ended.
    last_commit_end: Option<std::time::Instant>,
    /// False for a stream-fed cache (fan-out), which has no remote to ask:
    /// its catalog facts come from the stream.
    remote_catalog: bool,
    /// Stream-fed: the facts sent with each table's latest Relation message.
    stream_facts: HashMap<u32, Arc<facts::CatalogFacts>>,
    /// Stream-fed: the newest labels of each enum (by remote OID) the stream sent.
    stream_labels: HashMap<u32, Vec<String>>,
}

impl Applier {
    pub(crate) fn new(
        instance: Instance,
        tables: HashMap<u32, KnownTable>,
        committed: Lsn,
        max_buffered: usize,
        status: Arc<watch::Sender<Status>>,
        changes: broadcast::Sender<Arc<AppliedTransaction>>,
        source: SourceConfig,
    ) -> Applier {
        let prepared = Prepared::new(&instance);
        Applier {
            instance,
            relations: HashMap::new(),
            tables,
            unknown: HashMap::new(),
            stashed: HashMap::new(),
            labels: HashMap::new(),
            remote_indexes: HashMap::new(),
            index_ddl: Vec::new(),
            committed,
            server_wal_end: committed,
            pending: None,
            max_buffered,
            status,
            changes,
            source,
            catalog: None,
            prepared,
            commit_delay: Duration::ZERO,
            last_commit_end: None,
            remote_catalog: true,
            stream_facts: HashMap::new(),
            stream_labels: HashMap::new(),
        }
    }

    /// For a cache fed by a fan-out stream: no remote catalog to consult; the
    /// catalog facts come from the stream, next to each Relation message (a
    /// record without them, from an older publisher, is followed only while
    /// the table's shape is the one the cache has; a schema change then
    /// halts with a clear error).
    pub(crate) fn without_remote_catalog(mut self) -> Applier {
        self.remote_catalog = false;
        self
    }

    /// Received transactions wait up to `delay` for others to join their
    /// local commit while the stream is busy.
    pub(crate) fn with_commit_delay(mut self, delay: Duration) -> Applier {
        self.commit_delay = delay;
        self
    }

    /// The LSN to confirm: what is committed locally.
    pub(crate) fn committed(&self) -> Lsn {
        self.committed
    }

    /// No remote transaction is half received.
    pub(crate) fn idle(&self) -> bool {
        self.pending.is_none()
    }

    /// Notes the server's WAL end (for lag, and idle confirmation).
    pub(crate) fn note_wal_end(&mut self, wal_end: Lsn) {
        if wal_end > self.server_wal_end {
            self.server_wal_end = wal_end;
            let committed = self.committed;
            // Recorded without waking the status's watchers: this runs for
            // every message of the stream; the next commit (or idle
            // advance) notifies them.
            self.status.send_if_modified(|s| {
                s.server_wal_end = wal_end;
                s.lag_bytes = committed.distance_to(wal_end);
                false
            });
        }
    }

    /// When idle and the server reports WAL beyond our last commit, all of
    /// it was sent and nothing in it concerns us: record the position
    /// locally (so the confirmed LSN stays what is stored) and move on.
    pub(crate) async fn advance_idle(&mut self) -> Result<(), ReplicationError> {
        if self.pending.is_some() || self.server_wal_end <= self.committed {
            return Ok(());
        }
        let lsn = self.server_wal_end;
        tracing::trace!(%lsn, "idle: advancing to the server's position");
        store::run(&self.instance, None, &[store::applied_statement(lsn, None)]).await?;
        self.committed = lsn;
        self.status.send_modify(|s| {
            s.applied_lsn = lsn;
            s.lag_bytes = 0;
        });
        Ok(())
    }

    /// Handles one pgoutput message.
    pub(crate) async fn handle(&mut self, data: &Bytes) -> Result<(), ReplicationError> {
        if data.first() == Some(&facts::TAG) {
            return self.note_facts(data);
        }
        let message = pgoutput::decode(data, false).map_err(|e| ReplicationError::fatal(e.to_string()))?;
        tracing::trace!(?message, committed = %self.committed, "pgoutput");
        match message {
            LogicalMessage::Begin { final_lsn, commit_time, xid } => {
                let _ = commit_time; // the Commit message carries it too
                let skip = final_lsn < self.committed;
                if let Some(pending) = self.pending.as_mut() {
                    // Transactions waiting for a merged commit: this one joins them.
                    if pending.open {
                        return Err(ReplicationError::fatal("Begin inside a transaction"));
                    }
                    pending.open = true;
                    pending.final_lsn = final_lsn;
                    pending.xid = xid;
                    pending.skip = skip;
                    pending.change_count = 0;
                    pending.changes.clear();
                    return Ok(());
                }
                self.pending = Some(Pending {
                    open: true,
                    final_lsn,
                    xid,
                    skip,
                    batch: Batch::default(),
                    local: None,
                    in_flight: None,
                    changes: Vec::new(),
                    change_count: 0,
                    counts: HashMap::new(),
                    started: std::time::Instant::now(),
                    busy: Duration::ZERO,
                    done: Vec::new(),
                    last_end: None,
                });
            }
            LogicalMessage::Commit { end_lsn, commit_time, .. } => self.commit(end_lsn, commit_time).await?,
            LogicalMessage::Relation(rel) => self.relation(rel).await?,
            LogicalMessage::Insert { relation, new } => {
                self.change(relation, ChangeOp::Insert, None, Some(new)).await?
            }
            LogicalMessage::Update { relation, old, new } => {
                self.change(relation, ChangeOp::Update, old, Some(new)).await?
            }
            LogicalMessage::Delete { relation, old } => {
                self.change(relation, ChangeOp::Delete, Some(old), None).await?
            }
            LogicalMessage::Truncate { options, relations } => self.truncate(options, &relations).await?,
            LogicalMessage::Origin { .. } | LogicalMessage::Type { .. } | LogicalMessage::Message { .. } => {}
            LogicalMessage::StreamStart { .. }
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit { .. }
            | LogicalMessage::StreamAbort { .. } => {
                return Err(ReplicationError::fatal("streamed transaction message without streaming enabled"));
            }
        }
        Ok(())
    }

    /// Catalog facts from the stream, about the Relation message before
    /// them (or newer enum labels for the table's latest one).
    fn note_facts(&mut self, data: &Bytes) -> Result<(), ReplicationError> {
        if self.remote_catalog {
            return Err(ReplicationError::fatal("catalog facts in a slot's stream"));
        }
        let facts = facts::CatalogFacts::decode(data)?;
        for e in &facts.enums {
            self.stream_labels.insert(e.oid, e.labels.clone());
        }
        self.stream_facts.insert(facts.relation, Arc::new(facts));
        Ok(())
    }

    fn pending(&mut self) -> Result<&mut Pending, ReplicationError> {
        self.pending.as_mut().ok_or_else(|| ReplicationError::fatal("change outside a transaction"))
    }

    fn batch(&mut self) -> Result<&mut Batch, ReplicationError> {
        Ok(&mut self.pending()?.batch)
    }

    /// Tables whose changes arrive but that were never copied.
    pub(crate) fn wants_backfill(&self) -> bool {
        !self.unknown.is_empty()
    }

    /// Remote OIDs of the tables known (copied).
    pub(crate) fn known_tables(&self) -> impl Iterator<Item = u32> + '_ {
        self.tables.keys().copied()
    }

    /// Registers tables just backfilled; replays their Relation messages.
    pub(crate) async fn add_tables(&mut self, added: Vec<(u32, KnownTable)>) -> Result<(), ReplicationError> {
        for (oid, table) in added {
            self.tables.insert(oid, table);
            // A table copied again (a stream-fed cache may get a copy it did
            // not need) is read from the local catalog at its next message.
            self.relations.remove(&oid);
            if let Some(rel) = self.unknown.remove(&oid) {
                self.relation(rel).await?;
            }
        }
        // Relation messages of tables the backfill did not copy (removed
        // from the publication meanwhile) are dropped with them.
        self.unknown.clear();
        Ok(())
    }

    async fn change(
        &mut self,
        relation: u32,
        op: ChangeOp,
        old: Option<OldTuple>,
        new: Option<Tuple>,
    ) -> Result<(), ReplicationError> {
        if self.pending()?.skip || self.unknown.contains_key(&relation) {
            return Ok(());
        }
        let final_lsn = self.pending()?.final_lsn;
        if self.tables.get(&relation).is_some_and(|t| final_lsn < t.applies_from) {
            return Ok(()); // already in the table's copy
        }
        let Some(rel) = self.relation_for(relation).await? else {
            return Ok(()); // being copied again: the copy will contain it
        };
        if let Some(new) = &new {
            for (type_name, oid) in batch::missing_labels(&rel, new, &self.labels) {
                self.follow_labels(&type_name, oid).await?;
            }
        }
        let subscribed = self.changes.receiver_count() > 0;
        let pending = self.pending()?;
        pending.change_count += 1;
        let counter = pending.counts.entry(relation).or_default();
        counter[match op {
            ChangeOp::Insert => 0,
            ChangeOp::Update => 1,
            _ => 2,
        }] += 1;
        if subscribed && pending.changes.len() < MAX_SUBSCRIBED_CHANGES {
            pending.changes.push(describe_change(&rel, op, old.as_ref(), new.as_ref()));
        }
        pending.batch.change(relation, &rel, op, old, new)?;
        if pending.batch.buffered >= self.max_buffered.min(PIPELINE_BYTES) {
            self.send_buffered().await?;
        }
        Ok(())
    }

    async fn truncate(&mut self, options: u8, relations: &[u32]) -> Result<(), ReplicationError> {
        if self.pending()?.skip {
            return Ok(());
        }
        let mut names = Vec::new();
        let final_lsn = self.pending()?.final_lsn;
        for id in relations {
            if self.unknown.contains_key(id) {
                continue; // not copied yet; its copy will be taken later
            }
            if self.tables.get(id).is_some_and(|t| final_lsn < t.applies_from) {
                continue;
            }
            let Some(rel) = self.relation_for(*id).await? else { continue };
            names.push(rel.qualified.clone());
            let (schema, name) = (rel.schema.clone(), rel.name.clone());
            let subscribed = self.changes.receiver_count() > 0;
            let pending = self.pending()?;
            pending.change_count += 1;
            if subscribed && pending.changes.len() < MAX_SUBSCRIBED_CHANGES {
                pending.changes.push(Change { schema, table: name, op: ChangeOp::Truncate, key: vec![], new: None });
            }
        }
        let restart = if options & pgoutput::TRUNCATE_RESTART_IDENTITY != 0 { " RESTART IDENTITY" } else { "" };
        if names.is_empty() {
            return Ok(());
        }
        self.batch()?.statement(format!("TRUNCATE {}{restart}", names.join(", ")), vec![]);
        if self.batch()?.buffered >= self.max_buffered {
            self.send_buffered().await?;
        }
        Ok(())
    }
}

fn describe_change(rel: &RelationState, op: ChangeOp, old: Option<&OldTuple>, new: Option<&Tuple>) -> Change {
    let names = &rel.column_names;
    let key_source = match (old, new) {
        (Some(old), _) => Some(old.values()),
        (None, Some(new)) => Some(new),
        _ => None,
    };
    let key = match key_source {
        Some(values) if !rel.key.is_empty() => {
            rel.key.iter().map(|&i| (names[i].clone(), value_text(&values[i]))).collect()
        }
        Some(values) => names.iter().zip(values).map(|(n, v)| (n.clone(), value_text(v))).collect(),
        None => vec![],
    };
    let new = new.map(|t| {
        names
            .iter()
            .zip(t)
            .filter(|(_, v)| !matches!(v, Value::Unchanged))
            .map(|(n, v)| (n.clone(), value_text(v)))
            .collect()
    });
    Change { schema: rel.schema.clone(), table: rel.name.clone(), op, key, new }
}
