//! The streaming apply: pgoutput messages in, local transactions out.
//!
//! Each remote transaction becomes one local transaction that also advances
//! the stored LSN ([`super::store`]), so a crash leaves data and position in
//! agreement; on restart, transactions whose commit is below the stored LSN
//! are skipped. The LSN confirmed to the remote is the stored one: it only
//! moves after the local commit.
//!
//! Changes are grouped: consecutive changes of the same table and kind
//! become one statement over `unnest` of text arrays (one array per column,
//! values in the remote's text format, cast with the local column type), so
//! a 100,000-row transaction is a handful of statements rather than 100,000.
//! Updates and deletes join on the replica identity with hash and merge
//! joins disabled for the transaction, so each row is one index probe.
//! Tables with REPLICA IDENTITY FULL (no key) are matched row by row on all
//! columns, removing or changing exactly one matching row each.
//!
//! A small transaction is buffered and sent at its commit in one round trip
//! (`Instance::transaction`). One that outgrows `max_buffered_bytes` opens an
//! interactive local transaction ([`crate::Transaction`], exclusive use of
//! the instance) and is applied piece by piece as it arrives, then committed
//! with its LSN: memory stays bounded whatever the size of the remote
//! transaction, without spill files. (Protocol v1: the remote decodes the
//! whole transaction before sending it, spilling on its side past
//! `logical_decoding_work_mem`.) Readers of the instance wait while such a
//! transaction is being applied; they never see half of it.

use std::collections::{HashMap, HashSet};
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
use super::store;
use super::{AppliedTransaction, Change, ChangeOp, Status};

/// Settings that make the apply statements fast and let them through the
/// read-only triggers; local to each apply transaction.
const APPLY_SETTINGS: &str = "SELECT set_config('session_replication_role', 'replica', true), \
     set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)";

/// Most changes kept per transaction for subscribers (the rest is counted).
const MAX_SUBSCRIBED_CHANGES: usize = 10_000;

/// Types without an equality operator: matched on their text form (FULL
/// identity only).
const NO_EQUALITY: &[&str] = &[
    "json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle",
];

/// A local column.
#[derive(Debug, Clone)]
struct LocalColumn {
    name: String,
    type_name: String,
}

/// What the apply knows about a remote table.
#[derive(Debug, Clone)]
struct RelationState {
    schema: String,
    name: String,
    qualified: String,
    /// One per column of the Relation message, in its order.
    columns: Vec<LocalColumn>,
    /// Positions of the replica identity columns.
    key: Vec<usize>,
    full_identity: bool,
    column_names: Arc<[String]>,
}

/// Kinds of grouped changes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GroupKind {
    Insert,
    /// Which columns are set (unchanged TOAST columns are not).
    Update(Vec<bool>),
    Delete,
}

/// Consecutive changes of one table and kind, not yet turned into SQL.
#[derive(Debug)]
struct Group {
    relation: u32,
    kind: GroupKind,
    /// For updates and deletes: key values first (in key order), then for
    /// updates the set columns. For inserts: all columns.
    rows: Vec<Vec<Value>>,
    keys: HashSet<Vec<Value>>,
}

/// The remote transaction being received.
struct Pending {
    final_lsn: Lsn,
    /// Already applied before a restart: receive and drop.
    skip: bool,
    group: Option<Group>,
    statements: Vec<(String, Vec<Param>)>,
    buffered: usize,
    /// Open once the transaction outgrew the buffer.
    local: Option<Transaction>,
    changes: Vec<Change>,
    change_count: u64,
    counts: HashMap<(String, String), [u64; 3]>,
}

/// Applies one session's stream.
pub(crate) struct Applier {
    instance: Instance,
    relations: HashMap<u32, RelationState>,
    /// Local tables by remote OID, from the store.
    tables: HashMap<u32, (String, String)>,
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
}

impl Applier {
    pub(crate) fn new(
        instance: Instance,
        tables: HashMap<u32, (String, String)>,
        committed: Lsn,
        max_buffered: usize,
        status: Arc<watch::Sender<Status>>,
        changes: broadcast::Sender<Arc<AppliedTransaction>>,
        source: SourceConfig,
    ) -> Applier {
        Applier {
            instance,
            relations: HashMap::new(),
            tables,
            committed,
            server_wal_end: committed,
            pending: None,
            max_buffered,
            status,
            changes,
            source,
            catalog: None,
        }
    }

    async fn catalog(&mut self) -> Result<&tokio_postgres::Client, ReplicationError> {
        if self.catalog.as_ref().is_none_or(|c| c.is_closed()) {
            self.catalog = Some(super::remote_client(&self.source).await?);
        }
        Ok(self.catalog.as_ref().expect("just connected"))
    }

    /// How existing rows see a column added upstream: `Some(value)` when the
    /// remote stored a "missing value" for it (a non-volatile default: every
    /// existing row reads it), `None` when they read NULL.
    async fn added_column_fill(
        &mut self,
        relation: u32,
        table: &str,
        column: &str,
    ) -> Result<Option<String>, ReplicationError> {
        let row = self
            .catalog()
            .await?
            .query_opt(
                "SELECT a.atthasmissing, (a.attmissingval::text::text[])[1], d.adbin IS NOT NULL \
                 FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 WHERE a.attrelid = $1 AND a.attname = $2 AND NOT a.attisdropped",
                &[&relation, &column],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let (has_missing, missing, has_default): (bool, Option<String>, bool) = (row.get(0), row.get(1), row.get(2));
        if has_missing {
            return Ok(missing);
        }
        if has_default {
            // A volatile default rewrote the table upstream (or a default was
            // set after adding the column): existing rows may hold values that
            // never went through replication.
            return Err(ReplicationError::needs_operator(
                format!("column {column} was added to {table} upstream with a default this cache cannot reproduce"),
                "decommission and start again to copy the table as it is now",
            ));
        }
        Ok(None)
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
            self.status.send_modify(|s| {
                s.server_wal_end = wal_end;
                s.lag_bytes = committed.distance_to(wal_end);
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
        let message = pgoutput::decode(data, false).map_err(|e| ReplicationError::fatal(e.to_string()))?;
        tracing::trace!(?message, committed = %self.committed, "pgoutput");
        match message {
            LogicalMessage::Begin {
                final_lsn, commit_time, ..
            } => {
                if self.pending.is_some() {
                    return Err(ReplicationError::fatal("Begin inside a transaction"));
                }
                let _ = commit_time; // the Commit message carries it too
                self.pending = Some(Pending {
                    final_lsn,
                    skip: final_lsn < self.committed,
                    group: None,
                    statements: Vec::new(),
                    buffered: 0,
                    local: None,
                    changes: Vec::new(),
                    change_count: 0,
                    counts: HashMap::new(),
                });
            }
            LogicalMessage::Commit {
                end_lsn, commit_time, ..
            } => self.commit(end_lsn, commit_time).await?,
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
                return Err(ReplicationError::fatal(
                    "streamed transaction message without streaming enabled",
                ));
            }
        }
        Ok(())
    }

    fn pending(&mut self) -> Result<&mut Pending, ReplicationError> {
        self.pending
            .as_mut()
            .ok_or_else(|| ReplicationError::fatal("change outside a transaction"))
    }

    async fn relation(&mut self, rel: Relation) -> Result<(), ReplicationError> {
        let Some((schema, name)) = self.tables.get(&rel.id).cloned() else {
            return Err(ReplicationError::needs_operator(
                format!(
                    "table {}.{} was added to the publication after the initial copy",
                    rel.namespace, rel.name
                ),
                "decommission and start again to copy it (backfill of added tables is not implemented yet)",
            ));
        };
        if (schema.as_str(), name.as_str()) != (rel.namespace.as_str(), rel.name.as_str()) {
            return Err(ReplicationError::needs_operator(
                format!(
                    "table {schema}.{name} was renamed upstream to {}.{}",
                    rel.namespace, rel.name
                ),
                "decommission and start again to copy it under its new name",
            ));
        }
        let qualified = super::schema::qualified(&schema, &name);
        // Local columns as they are now (inside the open local transaction if any).
        let sql = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid::int8, a.atttypmod \
                   FROM pg_attribute a WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";
        let params = vec![Param::Untyped(qualified.clone())];
        let pending_local = self.pending.as_ref().and_then(|p| p.local.as_ref());
        let result = match pending_local {
            Some(tx) => tx.query_params(sql, params).await?,
            None => self.instance.query_params(sql, params).await?,
        };
        let local: Vec<(String, String, u32, i32)> = result
            .rows
            .iter()
            .map(|r| {
                (
                    r.get::<String>(0),
                    r.get::<String>(1),
                    r.get::<i64>(2) as u32,
                    r.get::<i32>(3),
                )
            })
            .collect();
        let mut columns = Vec::with_capacity(rel.columns.len());
        let mut added = Vec::new();
        for col in &rel.columns {
            match local.iter().find(|l| l.0 == col.name) {
                Some((_, type_name, oid, typmod)) => {
                    // Built-in types keep their OIDs; user types differ by OID.
                    if col.type_oid < 16384 && (*oid != col.type_oid || *typmod != col.type_modifier) {
                        return Err(ReplicationError::needs_operator(
                            format!("column {} of {schema}.{name} changed type upstream", col.name),
                            "decommission and start again to copy the table with its new type",
                        ));
                    }
                    columns.push(LocalColumn {
                        name: col.name.clone(),
                        type_name: type_name.clone(),
                    });
                }
                None => {
                    if col.type_oid >= 16384 {
                        return Err(ReplicationError::needs_operator(
                            format!(
                                "column {} of user-defined type was added to {schema}.{name} upstream",
                                col.name
                            ),
                            "decommission and start again to copy the table (only built-in types are added in place)",
                        ));
                    }
                    added.push(col);
                }
            }
        }
        if let Some(gone) = local.iter().find(|l| !rel.columns.iter().any(|c| c.name == l.0)) {
            return Err(ReplicationError::needs_operator(
                format!(
                    "column {} of {schema}.{name} was dropped or renamed upstream (or left the column list)",
                    gone.0
                ),
                "decommission and start again to copy the table as it is now",
            ));
        }
        for col in added {
            let type_name = self
                .instance_query_one(
                    "SELECT format_type($1::oid, $2::int4)",
                    vec![
                        Param::typed(crate::oid::OID, col.type_oid.to_string()),
                        Param::typed(crate::oid::INT4, col.type_modifier.to_string()),
                    ],
                )
                .await?;
            let fill = self.added_column_fill(rel.id, &qualified, &col.name).await?;
            let column = quote_ident(&col.name);
            tracing::info!(table = %qualified, column = %col.name, ?fill, "column added upstream; adding it locally");
            self.flush_group()?;
            match fill {
                // Existing rows get the remote's missing value, later rows
                // carry their own.
                Some(value) => {
                    let ddl = format!(
                        "ALTER TABLE {qualified} ADD COLUMN {column} {type_name} DEFAULT {}::{type_name}",
                        super::source::quote_literal(&value)
                    );
                    self.push_statement(ddl, vec![]).await?;
                    self.push_statement(
                        format!("ALTER TABLE {qualified} ALTER COLUMN {column} DROP DEFAULT"),
                        vec![],
                    )
                    .await?;
                }
                None => {
                    self.push_statement(
                        format!("ALTER TABLE {qualified} ADD COLUMN {column} {type_name}"),
                        vec![],
                    )
                    .await?
                }
            }
            columns.push(LocalColumn {
                name: col.name.clone(),
                type_name,
            });
        }
        // Keep the Relation message's column order.
        let columns: Vec<LocalColumn> = rel
            .columns
            .iter()
            .map(|c| {
                columns
                    .iter()
                    .find(|l| l.name == c.name)
                    .cloned()
                    .expect("every column was matched or added")
            })
            .collect();
        let key: Vec<usize> = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
            .collect();
        let state = RelationState {
            column_names: columns.iter().map(|c| c.name.clone()).collect(),
            schema,
            name,
            qualified,
            columns,
            full_identity: rel.replica_identity == b'f',
            key,
        };
        // A Relation message between changes of the same table ends the group.
        if self
            .pending
            .as_ref()
            .and_then(|p| p.group.as_ref())
            .is_some_and(|g| g.relation == rel.id)
        {
            self.flush_group()?;
        }
        self.relations.insert(rel.id, state);
        Ok(())
    }

    async fn instance_query_one(&self, sql: &str, params: Vec<Param>) -> Result<String, ReplicationError> {
        let local = self.pending.as_ref().and_then(|p| p.local.as_ref());
        let result = match local {
            Some(tx) => tx.query_params(sql, params).await?,
            None => self.instance.query_params(sql, params).await?,
        };
        Ok(result.rows.first().map(|r| r.get::<String>(0)).unwrap_or_default())
    }

    async fn change(
        &mut self,
        relation: u32,
        op: ChangeOp,
        old: Option<OldTuple>,
        new: Option<Tuple>,
    ) -> Result<(), ReplicationError> {
        if self.pending()?.skip {
            return Ok(());
        }
        let rel = self
            .relations
            .get(&relation)
            .ok_or_else(|| {
                ReplicationError::fatal(format!("change for relation {relation} before its Relation message"))
            })?
            .clone();
        let subscribed = self.changes.receiver_count() > 0;
        let pending = self.pending()?;
        pending.change_count += 1;
        let counter = pending
            .counts
            .entry((rel.schema.clone(), rel.name.clone()))
            .or_default();
        counter[match op {
            ChangeOp::Insert => 0,
            ChangeOp::Update => 1,
            _ => 2,
        }] += 1;
        if subscribed && pending.changes.len() < MAX_SUBSCRIBED_CHANGES {
            pending
                .changes
                .push(describe_change(&rel, op, old.as_ref(), new.as_ref()));
        }

        if rel.full_identity && op != ChangeOp::Insert {
            let old = old
                .ok_or_else(|| ReplicationError::fatal("UPDATE/DELETE of a FULL identity table without the old row"))?;
            let (sql, params) = full_identity_statement(&rel, op, old.values(), new.as_ref());
            self.flush_group()?;
            return self.push_statement(sql, params).await;
        }

        // An update that changes the key is applied on its own: inside a
        // group, a later change of the new key would not see it.
        let isolate = op == ChangeOp::Update && old.is_some();
        let (kind, row) = match op {
            ChangeOp::Insert => {
                let new = new.ok_or_else(|| ReplicationError::fatal("INSERT without a row"))?;
                (GroupKind::Insert, new)
            }
            ChangeOp::Update => {
                let new = new.ok_or_else(|| ReplicationError::fatal("UPDATE without a new row"))?;
                let key_source = match &old {
                    Some(old) => old.values(),
                    None => &new,
                };
                let mut row: Vec<Value> = rel.key.iter().map(|&i| key_source[i].clone()).collect();
                let mask: Vec<bool> = new.iter().map(|v| !matches!(v, Value::Unchanged)).collect();
                if !mask.iter().any(|&m| m) {
                    return Ok(());
                }
                row.extend(new.into_iter().filter(|v| !matches!(v, Value::Unchanged)));
                (GroupKind::Update(mask), row)
            }
            ChangeOp::Delete => {
                let old = old.ok_or_else(|| ReplicationError::fatal("DELETE without a key"))?;
                let row: Vec<Value> = rel.key.iter().map(|&i| old.values()[i].clone()).collect();
                (GroupKind::Delete, row)
            }
            ChangeOp::Truncate => unreachable!("truncate is handled by its own message"),
        };
        if rel.key.is_empty() && kind != GroupKind::Insert {
            return Err(ReplicationError::needs_operator(
                format!("{}: UPDATE/DELETE on a table without a replica identity", rel.qualified),
                "give the remote table a primary key or REPLICA IDENTITY FULL",
            ));
        }
        let size: usize = row.iter().map(value_size).sum::<usize>() + 8;
        let pending = self.pending()?;
        let same_group = pending
            .group
            .as_ref()
            .is_some_and(|g| g.relation == relation && g.kind == kind);
        // The same key twice in one update group would be applied once:
        // start a new group instead.
        let repeated_key = same_group
            && matches!(kind, GroupKind::Update(_))
            && pending
                .group
                .as_ref()
                .is_some_and(|g| g.keys.contains(&row[..rel.key.len()]));
        if !same_group || repeated_key || isolate {
            self.flush_group()?;
            let pending = self.pending()?;
            pending.group = Some(Group {
                relation,
                kind: kind.clone(),
                rows: Vec::new(),
                keys: HashSet::new(),
            });
        }
        let pending = self.pending()?;
        let group = pending.group.as_mut().expect("group was just ensured");
        if matches!(kind, GroupKind::Update(_)) {
            group.keys.insert(row[..rel.key.len()].to_vec());
        }
        group.rows.push(row);
        pending.buffered += size;
        if isolate {
            self.flush_group()?;
        }
        let pending = self.pending()?;
        if pending.buffered >= self.max_buffered {
            self.flush_group()?;
            self.send_buffered().await?;
        }
        Ok(())
    }

    async fn truncate(&mut self, options: u8, relations: &[u32]) -> Result<(), ReplicationError> {
        if self.pending()?.skip {
            return Ok(());
        }
        let mut names = Vec::new();
        for id in relations {
            let rel = self.relations.get(id).ok_or_else(|| {
                ReplicationError::fatal(format!("TRUNCATE of relation {id} before its Relation message"))
            })?;
            names.push(rel.qualified.clone());
            let (schema, name) = (rel.schema.clone(), rel.name.clone());
            let subscribed = self.changes.receiver_count() > 0;
            let pending = self.pending()?;
            pending.change_count += 1;
            if subscribed && pending.changes.len() < MAX_SUBSCRIBED_CHANGES {
                pending.changes.push(Change {
                    schema,
                    table: name,
                    op: ChangeOp::Truncate,
                    key: vec![],
                    new: None,
                });
            }
        }
        let restart = if options & pgoutput::TRUNCATE_RESTART_IDENTITY != 0 {
            " RESTART IDENTITY"
        } else {
            ""
        };
        self.flush_group()?;
        self.push_statement(format!("TRUNCATE {}{restart}", names.join(", ")), vec![])
            .await
    }

    /// Turns the current group into a statement.
    fn flush_group(&mut self) -> Result<(), ReplicationError> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(());
        };
        let Some(group) = pending.group.take() else {
            return Ok(());
        };
        if group.rows.is_empty() {
            return Ok(());
        }
        let rel = self
            .relations
            .get(&group.relation)
            .ok_or_else(|| ReplicationError::fatal("group of unknown relation"))?;
        pending.statements.push(group_statement(rel, &group));
        Ok(())
    }

    async fn push_statement(&mut self, sql: String, params: Vec<Param>) -> Result<(), ReplicationError> {
        let max = self.max_buffered;
        let pending = self.pending()?;
        pending.buffered += sql.len() + params.iter().map(|p| p.text().map_or(0, str::len)).sum::<usize>();
        pending.statements.push((sql, params));
        if pending.buffered >= max {
            self.send_buffered().await?;
        }
        Ok(())
    }

    /// Sends the buffered statements into the open local transaction,
    /// opening it first if needed.
    async fn send_buffered(&mut self) -> Result<(), ReplicationError> {
        let instance = self.instance.clone();
        let pending = self.pending()?;
        if pending.local.is_none() {
            let tx = instance.begin().await?;
            tx.query(APPLY_SETTINGS, &[]).await?;
            pending.local = Some(tx);
        }
        let statements = std::mem::take(&mut pending.statements);
        pending.buffered = 0;
        if !statements.is_empty() {
            pending.local.as_ref().expect("opened above").batch(&statements).await?;
        }
        Ok(())
    }

    async fn commit(&mut self, end_lsn: Lsn, commit_time: i64) -> Result<(), ReplicationError> {
        self.flush_group()?;
        let mut pending = self
            .pending
            .take()
            .ok_or_else(|| ReplicationError::fatal("Commit without Begin"))?;
        if pending.skip {
            return Ok(());
        }
        let mut statements = std::mem::take(&mut pending.statements);
        statements.push(store::applied_statement(end_lsn, Some(commit_time)));
        match pending.local.take() {
            Some(tx) => {
                tx.batch(&statements).await?;
                tx.commit().await?;
            }
            None => {
                statements.insert(0, (APPLY_SETTINGS.to_owned(), vec![]));
                self.instance.transaction(&statements).await?;
            }
        }
        self.committed = end_lsn;
        if end_lsn > self.server_wal_end {
            self.server_wal_end = end_lsn;
        }
        let applied_at = SystemTime::now();
        let commit_at = pg_time(commit_time);
        let delay = applied_at.duration_since(commit_at).unwrap_or(Duration::ZERO);
        let wal_end = self.server_wal_end;
        self.status.send_modify(|s| {
            s.applied_lsn = end_lsn;
            s.applied_commit_time = Some(commit_at);
            s.lag = delay;
            s.server_wal_end = wal_end;
            s.lag_bytes = end_lsn.distance_to(wal_end);
            for ((schema, name), [i, u, d]) in &pending.counts {
                if let Some(t) = s.tables.iter_mut().find(|t| &t.schema == schema && &t.name == name) {
                    t.inserted += i;
                    t.updated += u;
                    t.deleted += d;
                }
            }
        });
        if self.changes.receiver_count() > 0 {
            let _ = self.changes.send(Arc::new(AppliedTransaction {
                commit_lsn: pending.final_lsn,
                end_lsn,
                commit_time: commit_at,
                change_count: pending.change_count,
                truncated: pending.change_count > pending.changes.len() as u64,
                changes: std::mem::take(&mut pending.changes),
            }));
        }
        Ok(())
    }
}

fn value_size(v: &Value) -> usize {
    match v {
        Value::Text(b) | Value::Binary(b) => b.len() + 3,
        _ => 4,
    }
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::Text(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Null | Value::Unchanged => None,
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
        Some(values) if !rel.key.is_empty() => rel
            .key
            .iter()
            .map(|&i| (names[i].clone(), value_text(&values[i])))
            .collect(),
        Some(values) => names
            .iter()
            .zip(values)
            .map(|(n, v)| (n.clone(), value_text(v)))
            .collect(),
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
    Change {
        schema: rel.schema.clone(),
        table: rel.name.clone(),
        op,
        key,
        new,
    }
}

/// Appends a value as an element of a text-array literal.
fn push_element(out: &mut String, v: &Value) {
    match v {
        Value::Text(b) | Value::Binary(b) => {
            out.push('"');
            for ch in String::from_utf8_lossy(b).chars() {
                if ch == '"' || ch == '\\' {
                    out.push('\\');
                }
                out.push(ch);
            }
            out.push('"');
        }
        Value::Null | Value::Unchanged => out.push_str("NULL"),
    }
}

/// One `text[]` parameter per column of `rows` (column `j` of every row).
fn column_arrays(rows: &[Vec<Value>], width: usize) -> Vec<Param> {
    (0..width)
        .map(|j| {
            let mut s = String::with_capacity(rows.len() * 8 + 2);
            s.push('{');
            for (i, row) in rows.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                push_element(&mut s, &row[j]);
            }
            s.push('}');
            Param::Untyped(s)
        })
        .collect()
}

fn unnest(width: usize, first_param: usize) -> String {
    let args: Vec<String> = (0..width).map(|j| format!("${}::text[]", first_param + j)).collect();
    let names: Vec<String> = (0..width).map(|j| format!("c{j}")).collect();
    format!("unnest({}) AS u({})", args.join(", "), names.join(", "))
}

/// The statement for a group of inserts, updates or deletes.
fn group_statement(rel: &RelationState, group: &Group) -> (String, Vec<Param>) {
    let cols = &rel.columns;
    match &group.kind {
        GroupKind::Insert => {
            let names: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
            let casts: Vec<String> = cols
                .iter()
                .enumerate()
                .map(|(j, c)| format!("u.c{j}::{}", c.type_name))
                .collect();
            let sql = format!(
                "INSERT INTO {} ({}) SELECT {} FROM {}",
                rel.qualified,
                names.join(", "),
                casts.join(", "),
                unnest(cols.len(), 1)
            );
            (sql, column_arrays(&group.rows, cols.len()))
        }
        GroupKind::Update(mask) => {
            let nkey = rel.key.len();
            let set_cols: Vec<usize> = mask.iter().enumerate().filter(|(_, m)| **m).map(|(i, _)| i).collect();
            let width = nkey + set_cols.len();
            let sets: Vec<String> = set_cols
                .iter()
                .enumerate()
                .map(|(k, &i)| {
                    format!(
                        "{} = u.c{}::{}",
                        quote_ident(&cols[i].name),
                        nkey + k,
                        cols[i].type_name
                    )
                })
                .collect();
            let conds: Vec<String> = rel
                .key
                .iter()
                .enumerate()
                .map(|(k, &i)| format!("t.{} = u.c{k}::{}", quote_ident(&cols[i].name), cols[i].type_name))
                .collect();
            let sql = format!(
                "UPDATE {} AS t SET {} FROM {} WHERE {}",
                rel.qualified,
                sets.join(", "),
                unnest(width, 1),
                conds.join(" AND ")
            );
            (sql, column_arrays(&group.rows, width))
        }
        GroupKind::Delete => {
            let nkey = rel.key.len();
            let conds: Vec<String> = rel
                .key
                .iter()
                .enumerate()
                .map(|(k, &i)| format!("t.{} = u.c{k}::{}", quote_ident(&cols[i].name), cols[i].type_name))
                .collect();
            let sql = format!(
                "DELETE FROM {} AS t USING {} WHERE {}",
                rel.qualified,
                unnest(nkey, 1),
                conds.join(" AND ")
            );
            (sql, column_arrays(&group.rows, nkey))
        }
    }
}

/// UPDATE or DELETE of exactly one row matching all of `old` (REPLICA
/// IDENTITY FULL: there may be no key, and duplicates are possible).
fn full_identity_statement(
    rel: &RelationState,
    op: ChangeOp,
    old: &Tuple,
    new: Option<&Tuple>,
) -> (String, Vec<Param>) {
    let mut params = Vec::new();
    let mut conds = Vec::new();
    for (j, c) in rel.columns.iter().enumerate() {
        let name = quote_ident(&c.name);
        match &old[j] {
            Value::Unchanged => continue,
            Value::Null => conds.push(format!("{name} IS NULL")),
            v => {
                params.push(Param::Untyped(value_text(v).unwrap_or_default()));
                let base = c.type_name.trim_end_matches("[]");
                if NO_EQUALITY.contains(&base) {
                    conds.push(format!("{name}::text = ${}::text", params.len()));
                } else {
                    conds.push(format!("{name} = ${}::{}", params.len(), c.type_name));
                }
            }
        }
    }
    let locate = format!(
        "ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)",
        rel.qualified,
        if conds.is_empty() {
            "true".into()
        } else {
            conds.join(" AND ")
        }
    );
    match (op, new) {
        (ChangeOp::Update, Some(new)) => {
            let mut sets = Vec::new();
            for (j, c) in rel.columns.iter().enumerate() {
                match &new[j] {
                    Value::Unchanged => {}
                    v => {
                        params.push(value_text(v).map_or(Param::Null, Param::Untyped));
                        sets.push(format!("{} = ${}::{}", quote_ident(&c.name), params.len(), c.type_name));
                    }
                }
            }
            (
                format!("UPDATE {} SET {} WHERE {locate}", rel.qualified, sets.join(", ")),
                params,
            )
        }
        _ => (format!("DELETE FROM {} WHERE {locate}", rel.qualified), params),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn array_literals_quote_everything() {
        let rows = vec![
            vec![text(r#"a"b\c"#)],
            vec![Value::Null],
            vec![text("{x,y}")],
            vec![text("NULL")],
        ];
        let params = column_arrays(&rows, 1);
        assert_eq!(params[0], Param::Untyped(r#"{"a\"b\\c",NULL,"{x,y}","NULL"}"#.into()));
    }

    fn rel() -> RelationState {
        RelationState {
            schema: "public".into(),
            name: "t".into(),
            qualified: "\"public\".\"t\"".into(),
            columns: vec![
                LocalColumn {
                    name: "id".into(),
                    type_name: "integer".into(),
                },
                LocalColumn {
                    name: "v".into(),
                    type_name: "text".into(),
                },
            ],
            key: vec![0],
            full_identity: false,
            column_names: Arc::from(vec!["id".to_string(), "v".to_string()]),
        }
    }

    #[test]
    fn group_statements() {
        let r = rel();
        let g = Group {
            relation: 1,
            kind: GroupKind::Insert,
            rows: vec![vec![text("1"), text("x")]],
            keys: HashSet::new(),
        };
        let (sql, params) = group_statement(&r, &g);
        assert_eq!(
            sql,
            r#"INSERT INTO "public"."t" ("id", "v") SELECT u.c0::integer, u.c1::text FROM unnest($1::text[], $2::text[]) AS u(c0, c1)"#
        );
        assert_eq!(params.len(), 2);
        let g = Group {
            relation: 1,
            kind: GroupKind::Update(vec![false, true]),
            rows: vec![vec![text("1"), text("y")]],
            keys: HashSet::new(),
        };
        let (sql, _) = group_statement(&r, &g);
        assert_eq!(
            sql,
            r#"UPDATE "public"."t" AS t SET "v" = u.c1::text FROM unnest($1::text[], $2::text[]) AS u(c0, c1) WHERE t."id" = u.c0::integer"#
        );
        let g = Group {
            relation: 1,
            kind: GroupKind::Delete,
            rows: vec![vec![text("1")]],
            keys: HashSet::new(),
        };
        let (sql, _) = group_statement(&r, &g);
        assert_eq!(
            sql,
            r#"DELETE FROM "public"."t" AS t USING unnest($1::text[]) AS u(c0) WHERE t."id" = u.c0::integer"#
        );
    }

    #[test]
    fn full_identity_matches_one_row() {
        let mut r = rel();
        r.key = vec![0, 1];
        r.full_identity = true;
        let (sql, params) = full_identity_statement(&r, ChangeOp::Delete, &vec![text("1"), Value::Null], None);
        assert_eq!(
            sql,
            r#"DELETE FROM "public"."t" WHERE ctid = (SELECT ctid FROM "public"."t" WHERE "id" = $1::integer AND "v" IS NULL LIMIT 1)"#
        );
        assert_eq!(params.len(), 1);
    }
}
