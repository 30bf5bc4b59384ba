//! Table copies that travel in the stream: a table added to the
//! publication after the publisher's first start reaches every cache the way
//! a slot-fed cache backfills it (`supervisor::backfill`), without a query
//! from the caches to the remote.
//!
//! ```text
//! publisher: temporary slot (exported snapshot) ─► X = its consistent point
//!            COPY the table under that snapshot ─► records of kind Copy (header, then COPY batches), bounded channel
//!            publish loop: every record committed before X, then the copy, then the rest
//! cache:     chunk 0: create a shadow table; each chunk: load into it;
//!            last chunk: swap it in, keys, indexes, guard, table state (applies from X): one local transaction
//! ```
//!
//! Why it is exact: the copy holds precisely the transactions committed
//! before `X` (PostgreSQL's tablesync relies on the same), the stream holds
//! them before the copy and caches skip the table's changes there (unknown
//! table); after the copy they apply the table's changes of transactions
//! committed at or after `X` (`KnownTable::applies_from`). A cache killed
//! while loading starts the copy again from chunk 0 (its stored position is
//! before it); one killed after the swap finds the table's copy at `X` and
//! skips the record. A copy cut off by a publisher restart is followed by
//! a later record: the cache drops what it loaded, and the publisher copies
//! the table again at a newer point.
//!
//! Memory stays bounded on both sides: the rows move in records of about
//! `max_chunk_bytes`, a few at a time; the publisher's COPY from the remote
//! waits (holding its snapshot) until the publish loop reaches `X`.

use std::collections::HashSet;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::Instance;
use crate::params::Param;
use crate::replication::apply::KnownTable;
use crate::replication::config::ReplicationConfig;
use crate::replication::error::ReplicationError;
use crate::replication::lsn::Lsn;
use crate::replication::schema::{self, ColumnSchema, TableSchema};
use crate::replication::source::{SourceConnection, quote_ident, quote_literal};
use crate::replication::table_sync::{self, Batcher};
use crate::replication::{remote_client, store};

use super::record::{Record, RecordKind};

/// The header message of a copy's chunk 0.
const HEADER_TAG: u8 = b'H';
/// The header's own version (its JSON may gain fields).
const HEADER_VERSION: u8 = 1;

/// The published tables (OIDs of what `pg_publication_tables` lists).
const PUBLISHED_SQL: &str = "SELECT c.oid FROM pg_publication_tables pt JOIN pg_namespace n ON n.nspname = pt.schemaname \
     JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename WHERE pt.pubname = $1";

/// What a cache needs to create the table: its description as the initial
/// copy has it, the DDL of the types and schemas it uses, and whether the
/// publisher's caches are read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Header {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub relkind: i8,
    pub columns: Vec<(String, String, bool, bool)>,
    pub constraints: Vec<(String, String)>,
    pub indexes: Vec<String>,
    /// Creates the schemas and types the table uses (idempotent).
    pub prepare: String,
    pub read_only: bool,
}

impl Header {
    fn new(table: &TableSchema, prepare: String, read_only: bool) -> Header {
        Header {
            oid: table.remote_oid,
            schema: table.schema.clone(),
            name: table.name.clone(),
            relkind: table.relkind,
            columns: table
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.type_name.clone(), c.not_null, c.binary_safe))
                .collect(),
            constraints: table.constraints.clone(),
            indexes: table.indexes.clone(),
            prepare,
            read_only,
        }
    }

    /// The table as the cache creates it (no row filter: the rows are
    /// filtered already).
    pub(super) fn table(&self) -> TableSchema {
        TableSchema {
            remote_oid: self.oid,
            schema: self.schema.clone(),
            name: self.name.clone(),
            relkind: self.relkind,
            columns: self
                .columns
                .iter()
                .map(|(name, type_name, not_null, binary_safe)| ColumnSchema {
                    name: name.clone(),
                    type_name: type_name.clone(),
                    not_null: *not_null,
                    binary_safe: *binary_safe,
                })
                .collect(),
            row_filter: None,
            constraints: self.constraints.clone(),
            indexes: self.indexes.clone(),
        }
    }

    pub(super) fn encode(&self) -> Bytes {
        let json = serde_json::to_vec(self).expect("a header serializes");
        let mut out = BytesMut::with_capacity(json.len() + 2);
        out.put_u8(HEADER_TAG);
        out.put_u8(HEADER_VERSION);
        out.put_slice(&json);
        out.freeze()
    }

    pub(super) fn decode(frame: &[u8]) -> Result<Header, ReplicationError> {
        match frame {
            [HEADER_TAG, HEADER_VERSION, json @ ..] => {
                serde_json::from_slice(json).map_err(|e| ReplicationError::fatal(format!("table copy header: {e}")))
            }
            [HEADER_TAG, v, ..] => Err(ReplicationError::fatal(format!(
                "table copy header version {v}; this version reads {HEADER_VERSION}: upgrade"
            ))),
            _ => Err(ReplicationError::fatal("a table copy without its header")),
        }
    }
}

/// One table being copied by the publisher, in the background: its records
/// come out of a bounded channel for the publish loop to put in place.
pub(super) struct CopyJob {
    rx: mpsc::Receiver<(u32, Record)>,
    task: JoinHandle<Result<(), ReplicationError>>,
    /// The first record, received to learn the point, not published yet.
    head: Option<Record>,
    /// The table and the copy's point, once known.
    pub(super) point: Option<(u32, Lsn)>,
    /// It failed before its first record (e.g. no free replication slot).
    pub(super) failed: bool,
}

impl Drop for CopyJob {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CopyJob {
    /// Looks for a published table not in `exclude` and copies it.
    pub(super) fn spawn(config: &ReplicationConfig, exclude: HashSet<u32>, max_chunk_bytes: usize) -> CopyJob {
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(copy_one(config.clone(), exclude, max_chunk_bytes, tx));
        CopyJob { rx, task, head: None, point: None, failed: false }
    }

    /// Waits until the copy's point is known; `None`: nothing to copy, or
    /// the copy failed before it began (nothing of it is in the stream: the
    /// publisher goes on, and tries again later; see [`Self::failed`]).
    pub(super) async fn wait_point(&mut self) -> Option<(u32, Lsn)> {
        if self.point.is_some() {
            return self.point;
        }
        match self.rx.recv().await {
            Some((oid, record)) => {
                self.point = Some((oid, record.commit_lsn));
                self.head = Some(record);
                self.point
            }
            None => {
                if let Err(e) = self.ended().await {
                    tracing::warn!(error = %e, "could not copy a table added to the publication; trying again later");
                    self.failed = true;
                }
                None
            }
        }
    }

    /// The copy's next record, in order; `None` once it is complete.
    pub(super) async fn next(&mut self) -> Result<Option<Record>, ReplicationError> {
        if let Some(record) = self.head.take() {
            return Ok(Some(record));
        }
        match self.rx.recv().await {
            Some((_, record)) => Ok(Some(record)),
            None => {
                self.ended().await?;
                Ok(None)
            }
        }
    }

    async fn ended(&mut self) -> Result<(), ReplicationError> {
        (&mut self.task).await.map_err(|e| ReplicationError::fatal(format!("table copy task failed: {e}")))?
    }
}

/// The publisher's side: copies the first published table not in
/// `exclude` at a consistent point, as records.
async fn copy_one(
    config: ReplicationConfig,
    exclude: HashSet<u32>,
    max_chunk_bytes: usize,
    tx: mpsc::Sender<(u32, Record)>,
) -> Result<(), ReplicationError> {
    let publication = config.publication.name().to_owned();
    let client = remote_client(&config.source).await?;
    let published: Vec<u32> = client.query(PUBLISHED_SQL, &[&publication]).await?.iter().map(|r| r.get(0)).collect();
    if published.iter().all(|oid| exclude.contains(oid)) {
        return Ok(());
    }
    let mut temp = SourceConnection::connect(&config.source, "pglite-cache publish copy").await?;
    let name = format!("{}_copy_{}", config.slot_name, std::process::id());
    let slot = temp.create_slot(&name, true).await?;
    let snapshot = slot.snapshot.clone().ok_or_else(|| ReplicationError::fatal("the slot exported no snapshot"))?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&snapshot)
        ))
        .await?;
    // The snapshot is imported: the temporary slot (and the WAL it keeps) can go.
    temp.finish().await?;
    let (types, tables) = schema::describe_publication(&client, &publication).await?;
    let Some(table) = tables.into_iter().find(|t| !exclude.contains(&t.remote_oid)) else {
        return Ok(()); // removed from the publication meanwhile
    };
    let x = slot.consistent_point;
    tracing::info!(table = %table.qualified(), at = %x, "copying a table into the stream (added to the publication, or copied again)");
    let prepare = schema::create_script(&types, std::slice::from_ref(&table));
    let header = Header::new(&table, prepare, config.read_only).encode();
    let mut out = Out { tx, oid: table.remote_oid, held: Record::copy(x, 0, vec![header]) };
    let stream = client.copy_out(&table.copy_out_sql()).await?;
    let mut stream = std::pin::pin!(stream);
    let mut batcher = Batcher::new(table.binary_copy(), max_chunk_bytes);
    let mut rows = 0;
    while let Some(chunk) = stream.next().await {
        if let Some((data, n)) = batcher.push(&chunk?)? {
            rows += n;
            if !out.push(data).await {
                return Ok(()); // the publish loop let go of the copy
            }
        }
    }
    if let Some((data, n)) = batcher.finish()? {
        rows += n;
        if !out.push(data).await {
            return Ok(());
        }
    }
    out.finish().await;
    client.batch_execute("COMMIT").await?;
    tracing::info!(table = %table.qualified(), rows, at = %x, "table copy read");
    Ok(())
}

/// Holds one record back, to mark the last one.
struct Out {
    tx: mpsc::Sender<(u32, Record)>,
    oid: u32,
    held: Record,
}

impl Out {
    async fn push(&mut self, data: Vec<u8>) -> bool {
        let next = Record::copy(self.held.commit_lsn, self.held.chunk + 1, vec![Bytes::from(data)]);
        let record = std::mem::replace(&mut self.held, next);
        self.tx.send((self.oid, record)).await.is_ok()
    }

    async fn finish(mut self) {
        self.held.last = true;
        self.held.end_lsn = self.held.commit_lsn;
        let _ = self.tx.send((self.oid, self.held)).await;
    }
}

impl Record {
    /// A chunk of a table copy at `x` (not the last one).
    fn copy(x: Lsn, chunk: u32, messages: Vec<Bytes>) -> Record {
        Record { kind: RecordKind::Copy, commit_lsn: x, end_lsn: Lsn::ZERO, chunk, last: false, messages }
    }
}

/// A table a cache finished loading from the stream.
pub(super) struct Copied {
    pub oid: u32,
    pub table: KnownTable,
    pub rows: u64,
}

/// The cache's side: loads copy records into a shadow table and swaps it
/// in with the last one.
#[derive(Default)]
pub(super) struct Loader {
    loading: Option<Loading>,
}

struct Loading {
    header: Header,
    table: TableSchema,
    x: Lsn,
    rows: u64,
    /// The cache holds this copy (or a newer one) already.
    skip: bool,
}

impl Loader {
    /// Feeds one copy record (in order: the sequencer saw to it); returns
    /// the table once its last record is applied.
    pub(super) async fn feed(
        &mut self,
        instance: &Instance,
        record: &Record,
    ) -> Result<Option<Copied>, ReplicationError> {
        let mut messages = record.messages.iter();
        if record.chunk == 0 {
            let header = Header::decode(messages.next().map(|m| &m[..]).unwrap_or_default())?;
            let table = header.table();
            let x = record.commit_lsn;
            let skip = copied_at(instance, header.oid).await?.is_some_and(|at| at >= x);
            if skip {
                tracing::debug!(table = %table.qualified(), at = %x, "table copy already applied; skipped");
            } else {
                let shadow = table_sync::shadow_of(&table);
                instance
                    .exec(&format!(
                        "{}DROP TABLE IF EXISTS {}; {};",
                        header.prepare,
                        shadow.qualified(),
                        shadow.create_table_sql()
                    ))
                    .await?;
                tracing::info!(table = %table.qualified(), at = %x, "loading a table copy from the stream");
            }
            self.loading = Some(Loading { header, table, x, rows: 0, skip });
        }
        let loading =
            self.loading.as_mut().ok_or_else(|| ReplicationError::fatal("a table copy's chunk without its start"))?;
        if !loading.skip {
            let shadow = table_sync::shadow_of(&loading.table);
            let sql = table_sync::shadow_copy_in_sql(&shadow);
            for data in messages {
                loading.rows += instance.copy_in(&sql, data.to_vec()).await?;
            }
        }
        if !record.last {
            return Ok(None);
        }
        let loading = self.loading.take().expect("checked above");
        let known = KnownTable {
            schema: loading.table.schema.clone(),
            name: loading.table.name.clone(),
            applies_from: loading.x,
        };
        if loading.skip {
            return Ok(None);
        }
        swap_in(instance, &loading).await?;
        tracing::info!(table = %loading.table.qualified(), rows = loading.rows, at = %loading.x, "table copied from the stream");
        Ok(Some(Copied { oid: loading.header.oid, table: known, rows: loading.rows }))
    }

    /// Forgets a copy cut off (the publisher sent something else instead);
    /// its shadow table goes.
    pub(super) async fn reset(&mut self, instance: &Instance) -> Result<(), ReplicationError> {
        if let Some(loading) = self.loading.take()
            && !loading.skip
        {
            tracing::warn!(table = %loading.table.qualified(), at = %loading.x, "table copy cut off; dropped");
            let shadow = table_sync::shadow_of(&loading.table);
            instance.exec(&format!("DROP TABLE IF EXISTS {}", shadow.qualified())).await?;
        }
        Ok(())
    }
}

/// Replaces (or creates) the table by its loaded shadow, with keys,
/// indexes, the guard and its state, in one local transaction: readers see
/// the old table or the new one.
async fn swap_in(instance: &Instance, loading: &Loading) -> Result<(), ReplicationError> {
    let table = &loading.table;
    let shadow = table_sync::shadow_of(table);
    let swap = if table_sync::local_table_exists(instance, table).await? {
        table_sync::swap_sql(&shadow, table)
    } else {
        format!(
            "ALTER TABLE {shadow} SET SCHEMA {schema}; ALTER TABLE {moved} RENAME TO {name};",
            shadow = shadow.qualified(),
            schema = quote_ident(&table.schema),
            moved = schema::qualified(&table.schema, &shadow.name),
            name = quote_ident(&table.name),
        )
    };
    let local = instance.begin().await?;
    local.exec(&swap).await?;
    table_sync::finish_table(&local, table, loading.header.read_only).await?;
    let (sql, params) =
        store::table_state_statement(&table.schema, &table.name, table.remote_oid, "ready", loading.rows, loading.x);
    local.query_params(&sql, params).await?;
    local.commit().await?;
    Ok(())
}

/// The point of the table's local copy, if the cache has one.
async fn copied_at(instance: &Instance, oid: u32) -> Result<Option<Lsn>, ReplicationError> {
    let result = instance
        .query_params(
            "SELECT coalesce(synced_lsn, '0/0')::text FROM pglite_cache.tables WHERE remote_oid = $1 AND state = 'ready'",
            vec![Param::typed(crate::oid::OID, oid.to_string())],
        )
        .await?;
    match result.rows.first() {
        Some(row) => row
            .get::<String>(0)
            .parse()
            .map(Some)
            .map_err(|e| ReplicationError::fatal(format!("stored table LSN: {e}"))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_refuses_a_newer_version() {
        let table = TableSchema {
            remote_oid: 16400,
            schema: "public".into(),
            name: "Added".into(),
            relkind: b'r' as i8,
            columns: vec![ColumnSchema {
                name: "id".into(),
                type_name: "integer".into(),
                not_null: true,
                binary_safe: true,
            }],
            row_filter: Some("id > 1".into()),
            constraints: vec![("added_pkey".into(), "PRIMARY KEY (id)".into())],
            indexes: vec![],
        };
        let header = Header::new(&table, "CREATE SCHEMA IF NOT EXISTS public;".into(), true);
        let decoded = Header::decode(&header.encode()).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(decoded.table(), TableSchema { row_filter: None, ..table });
        let mut newer = header.encode().to_vec();
        newer[1] = 9;
        assert!(Header::decode(&newer).unwrap_err().message().contains("upgrade"));
        assert!(Header::decode(b"").is_err());
    }

    #[test]
    fn copy_records_carry_their_point_and_end_on_the_last() {
        let r = Record::copy(Lsn(0x50), 3, vec![Bytes::from_static(b"1\n")]);
        assert_eq!(
            (r.kind, r.commit_lsn, r.end_lsn, r.chunk, r.last),
            (RecordKind::Copy, Lsn(0x50), Lsn::ZERO, 3, false)
        );
        assert_eq!(r.msg_id(0), "c50.3");
        let decoded = Record::decode(r.encode()).unwrap();
        assert_eq!(decoded, r);
    }
}
