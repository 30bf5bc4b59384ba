//! The initial copy of one table: `COPY ... TO STDOUT` on the remote inside
//! the slot's exported snapshot, bulk-loaded locally with
//! `COPY ... FROM '/dev/blob'` in batches of a few MiB, inside the local
//! transaction that created the table.
//!
//! Reading the remote and loading locally overlap: a reader fills batches
//! while the instance loads the previous one; at most two batches are in
//! flight, so memory stays bounded whatever the table size.
//!
//! The binary COPY format is used when every column's binary form is the
//! same on both sides (built-in types, enums, domains over them): it loads
//! about twice as fast as text. Otherwise text (arrays of user types and
//! composites embed type OIDs that differ between the remote and the cache).
//! Batches are cut at row boundaries; in binary each batch gets the file
//! header and trailer of its own.

use futures_util::StreamExt;
use tokio::sync::mpsc;

use std::sync::Arc;

use tokio::sync::watch;

use crate::{Instance, Transaction};

use super::config::ReplicationConfig;
use super::error::ReplicationError;
use super::lsn::Lsn;
use super::schema::{self, TableSchema};
use super::store;
use super::{Status, TableState, TableStatus};

/// The binary COPY signature and the rest of a header without extension.
const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
const BINARY_TRAILER: [u8; 2] = [0xff, 0xff];

/// Cuts a stream of COPY data into batches that end at row boundaries.
#[derive(Debug)]
pub struct Batcher {
    binary: bool,
    batch_bytes: usize,
    /// The batch being filled (binary: starts with the header).
    buf: Vec<u8>,
    /// Binary: how far `buf` is parsed into whole rows.
    parsed: usize,
    /// Binary: the remote's header was consumed.
    header_seen: bool,
    /// Binary: the trailer was seen.
    done: bool,
    /// Whole rows in `buf[..parsed]` (text: in `buf`).
    rows: u64,
}

impl Batcher {
    /// A batcher for the text or binary format.
    pub fn new(binary: bool, batch_bytes: usize) -> Batcher {
        let mut b = Batcher {
            binary,
            batch_bytes,
            buf: Vec::with_capacity(batch_bytes + (64 << 10)),
            parsed: 0,
            header_seen: false,
            done: false,
            rows: 0,
        };
        b.start_batch(&[]);
        b
    }

    fn start_batch(&mut self, tail: &[u8]) {
        self.buf.clear();
        if self.binary {
            self.buf.extend_from_slice(BINARY_HEADER);
        }
        self.parsed = self.buf.len();
        self.buf.extend_from_slice(tail);
        self.rows = 0;
    }

    /// Adds a chunk of COPY data; returns a full batch (and its row count)
    /// when one is ready.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Option<(Vec<u8>, u64)>, ReplicationError> {
        if !self.binary {
            self.rows += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
            self.buf.extend_from_slice(chunk);
            self.parsed = self.buf.len();
        } else {
            self.buf.extend_from_slice(chunk);
            if !self.header_seen {
                // The remote's header: signature, flags, extension length + extension.
                let h = BINARY_HEADER.len();
                if self.buf.len() < h * 2 {
                    return Ok(None);
                }
                let remote = &self.buf[h..];
                if &remote[..BINARY_SIGNATURE.len()] != BINARY_SIGNATURE {
                    return Err(ReplicationError::fatal("binary COPY data without its signature"));
                }
                let ext = u32::from_be_bytes(remote[15..19].try_into().expect("4 bytes")) as usize;
                if self.buf.len() < h * 2 + ext {
                    return Ok(None);
                }
                self.buf.drain(h..h * 2 + ext);
                self.header_seen = true;
            }
            self.parse_rows()?;
        }
        if self.parsed - self.header_len() >= self.batch_bytes {
            return Ok(Some(self.take()));
        }
        Ok(None)
    }

    fn header_len(&self) -> usize {
        if self.binary { BINARY_HEADER.len() } else { 0 }
    }

    /// Binary: advances `parsed` over every whole row in the buffer.
    fn parse_rows(&mut self) -> Result<(), ReplicationError> {
        let buf = &self.buf;
        let mut at = self.parsed;
        while !self.done && at + 2 <= buf.len() {
            let fields = i16::from_be_bytes([buf[at], buf[at + 1]]);
            if fields == -1 {
                self.done = true;
                self.buf.truncate(at); // the trailer is added per batch
                break;
            }
            let mut end = at + 2;
            let mut whole = true;
            for _ in 0..fields {
                if end + 4 > buf.len() {
                    whole = false;
                    break;
                }
                let len = i32::from_be_bytes(buf[end..end + 4].try_into().expect("4 bytes"));
                end += 4 + len.max(0) as usize;
                if end > buf.len() {
                    whole = false;
                    break;
                }
            }
            if !whole {
                break;
            }
            at = end;
            self.rows += 1;
        }
        self.parsed = at;
        Ok(())
    }

    /// The whole rows buffered so far as a batch; keeps a partial row.
    fn take(&mut self) -> (Vec<u8>, u64) {
        let tail = self.buf.split_off(self.parsed);
        let mut batch = std::mem::replace(&mut self.buf, Vec::with_capacity(self.batch_bytes + (64 << 10)));
        if self.binary {
            batch.extend_from_slice(&BINARY_TRAILER);
        }
        let rows = self.rows;
        self.start_batch(&tail);
        (batch, rows)
    }

    /// The last batch, if it has rows. Fails on a truncated stream.
    pub fn finish(mut self) -> Result<Option<(Vec<u8>, u64)>, ReplicationError> {
        if self.parsed != self.buf.len() {
            return Err(ReplicationError::fatal("COPY data ended in the middle of a row"));
        }
        if self.rows == 0 {
            return Ok(None);
        }
        Ok(Some(self.take()))
    }
}

/// Where a copy is loaded: the local transaction that created the table
/// (one commit, `COPY ... FREEZE`), or the instance itself, one batch per
/// implicit transaction so that readers are served between batches (a
/// shadow table during a resync).
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Inside the transaction that created the table.
    Transaction(&'a Transaction),
    /// Batch by batch (the table is not visible to readers yet).
    Instance(&'a Instance),
}

impl Target<'_> {
    async fn copy_in(&self, sql: &str, data: Vec<u8>) -> crate::Result<u64> {
        match self {
            Target::Transaction(tx) => tx.copy_in(sql, data).await,
            Target::Instance(instance) => instance.copy_in(sql, data).await,
        }
    }
}

/// Copies one table. `client` must be inside the snapshot transaction;
/// `local` is the local transaction that created the table (so the load can
/// use `COPY ... FREEZE`). `progress(rows, bytes)` is called after each
/// loaded batch with totals.
pub async fn copy_table(
    client: &tokio_postgres::Client,
    local: &Transaction,
    table: &TableSchema,
    batch_bytes: usize,
    progress: impl FnMut(u64, u64),
) -> Result<u64, ReplicationError> {
    copy_table_into(client, Target::Transaction(local), table, &table.copy_in_sql(), batch_bytes, progress).await
}

/// [`copy_table`] into any target with the given `COPY ... FROM` statement
/// (`table` is what is read on the remote).
pub async fn copy_table_into(
    client: &tokio_postgres::Client,
    local: Target<'_>,
    table: &TableSchema,
    sql: &str,
    batch_bytes: usize,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, ReplicationError> {
    let stream = client.copy_out(&table.copy_out_sql()).await?;
    let (tx, mut rx) = mpsc::channel::<(Vec<u8>, u64)>(1);
    let binary = table.binary_copy();
    let reader = async move {
        let mut stream = std::pin::pin!(stream);
        let mut batcher = Batcher::new(binary, batch_bytes);
        while let Some(chunk) = stream.next().await {
            if let Some(batch) = batcher.push(&chunk?)?
                && tx.send(batch).await.is_err()
            {
                return Ok(()); // the loader failed; its error is reported
            }
        }
        if let Some(batch) = batcher.finish()? {
            let _ = tx.send(batch).await;
        }
        Ok::<_, ReplicationError>(())
    };
    let loader = async {
        let (mut total_rows, mut total_bytes) = (0u64, 0u64);
        let mut busy = std::time::Duration::ZERO;
        while let Some((data, rows)) = rx.recv().await {
            let bytes = data.len() as u64;
            let started = std::time::Instant::now();
            let loaded = local
                .copy_in(sql, data)
                .await
                .map_err(|e| ReplicationError::from(e).context(format!("loading {}", table.qualified())))?;
            busy += started.elapsed();
            if loaded != rows {
                return Err(ReplicationError::fatal(format!(
                    "loading {}: {loaded} rows loaded from a batch of {rows}",
                    table.qualified()
                )));
            }
            total_rows += rows;
            total_bytes += bytes;
            progress(total_rows, total_bytes);
        }
        tracing::debug!(table = %table.qualified(), binary, rows = total_rows, bytes = total_bytes, ?busy, "loaded locally");
        Ok::<_, ReplicationError>(total_rows)
    };
    let ((), rows) = tokio::try_join!(reader, loader)?;
    Ok(rows)
}

/// Copies `tables` (already created as types/schemas, not as tables) under
/// the snapshot `client` is in. One local transaction per table: create,
/// bulk load (FREEZE: no later hint-bit writes), keys and indexes after the
/// load (faster than maintaining them row by row), the read-only guard, and
/// the table's state. A crash leaves no half-copied table behind.
pub(crate) async fn copy_tables(
    instance: &Instance,
    config: &ReplicationConfig,
    status: &Arc<watch::Sender<Status>>,
    client: &tokio_postgres::Client,
    tables: &[TableSchema],
    synced_at: Lsn,
) -> Result<(), ReplicationError> {
    let first = status.borrow().tables.len();
    status.send_modify(|s| {
        s.tables.extend(tables.iter().map(|t| TableStatus {
            schema: t.schema.clone(),
            name: t.name.clone(),
            state: TableState::Pending,
            rows_copied: 0,
            bytes_copied: 0,
            inserted: 0,
            updated: 0,
            deleted: 0,
        }))
    });
    for (n, table) in tables.iter().enumerate() {
        let i = first + n;
        status.send_modify(|s| s.tables[i].state = TableState::Copying);
        let progress = |rows, bytes| {
            status.send_modify(|s| {
                s.tables[i].rows_copied = rows;
                s.tables[i].bytes_copied = bytes;
            })
        };
        let (local, rows) = if local_table_exists(instance, table).await? {
            // A resync: readers keep the old copy until the new one is swapped in.
            let shadow = shadow_of(table);
            instance
                .exec(&format!("DROP TABLE IF EXISTS {0}; {1};", shadow.qualified(), shadow.create_table_sql()))
                .await?;
            let sql = shadow_copy_in_sql(&shadow);
            let target = Target::Instance(instance);
            let rows = copy_table_into(client, target, table, &sql, config.copy_batch_bytes, progress).await?;
            let local = instance.begin().await?;
            local.exec(&swap_sql(&shadow, table)).await?;
            (local, rows)
        } else {
            let local = instance.begin().await?;
            local.exec(&format!("{};", table.create_table_sql())).await?;
            let rows = copy_table(client, &local, table, config.copy_batch_bytes, progress).await?;
            (local, rows)
        };
        let indexing = std::time::Instant::now();
        finish_table(&local, table, config.read_only).await?;
        let (sql, params) =
            store::table_state_statement(&table.schema, &table.name, table.remote_oid, "ready", rows, synced_at);
        local.query_params(&sql, params).await?;
        local.commit().await?;
        status.send_modify(|s| s.tables[i].state = TableState::Ready);
        tracing::info!(table = %table.qualified(), rows, indexing = ?indexing.elapsed(), "table copied");
    }
    Ok(())
}

/// Keys, indexes and the read-only guard of a table just loaded (inside
/// the local transaction that creates or swaps it in).
pub(crate) async fn finish_table(
    local: &Transaction,
    table: &TableSchema,
    read_only: bool,
) -> Result<(), ReplicationError> {
    for sql in schema::constraint_statements(table) {
        local.exec(&sql).await?;
    }
    for sql in &table.indexes {
        // An index the cache cannot build (e.g. an operator class from
        // an extension) is skipped, not fatal.
        let guarded = format!("SAVEPOINT pglite_cache_index; {sql}; RELEASE SAVEPOINT pglite_cache_index");
        if let Err(e) = local.exec(&guarded).await {
            tracing::warn!(table = %table.qualified(), index = %sql, error = %e, "could not create index locally; skipped");
            local.exec("ROLLBACK TO SAVEPOINT pglite_cache_index").await?;
        }
    }
    if read_only {
        local.exec(&schema::read_only_trigger_sql(table)).await?;
    }
    Ok(())
}

/// Creates the schemas and types `tables` need, and makes room for the
/// tables that do not exist locally yet; tables that exist stay readable
/// until their new copy is swapped in.
pub(crate) async fn prepare_local(
    instance: &Instance,
    types: &[schema::TypeSchema],
    tables: &[TableSchema],
) -> Result<(), ReplicationError> {
    let mut missing = Vec::new();
    for table in tables {
        if !local_table_exists(instance, table).await? {
            missing.push(table.clone());
        }
    }
    let mut script = schema::create_script(types, &missing);
    for table in tables {
        script.push_str(&format!("CREATE SCHEMA IF NOT EXISTS {};\n", super::source::quote_ident(&table.schema)));
    }
    instance.exec(&script).await?;
    Ok(())
}

/// Whether the table exists locally (a resync replaces it).
pub(crate) async fn local_table_exists(instance: &Instance, table: &TableSchema) -> Result<bool, ReplicationError> {
    let found = instance.query("SELECT to_regclass($1) IS NOT NULL", &[&table.qualified()]).await?;
    Ok(found.rows[0].get::<bool>(0))
}

/// The table a resync loads before swapping it in: in the bookkeeping
/// schema, named after the remote OID.
pub fn shadow_of(table: &TableSchema) -> TableSchema {
    let mut shadow = table.clone();
    shadow.schema = "pglite_cache".into();
    shadow.name = format!("shadow_{}", table.remote_oid);
    shadow
}

/// Loading the shadow batch by batch: no `FREEZE` (each batch is its own
/// transaction, not the one that created the table).
pub(crate) fn shadow_copy_in_sql(shadow: &TableSchema) -> String {
    let format = if shadow.binary_copy() { " WITH (FORMAT binary)" } else { "" };
    format!("COPY {} ({}) FROM '/dev/blob'{format}", shadow.qualified(), shadow.column_list())
}

/// Replaces `table` by its loaded shadow (inside the transaction that then
/// adds keys, indexes and the guard): readers see the old table or the new
/// one, never neither.
pub(crate) fn swap_sql(shadow: &TableSchema, table: &TableSchema) -> String {
    format!(
        "DROP TABLE {table}; ALTER TABLE {shadow} SET SCHEMA {schema}; ALTER TABLE {moved} RENAME TO {name};",
        table = table.qualified(),
        shadow = shadow.qualified(),
        schema = super::source::quote_ident(&table.schema),
        moved = schema::qualified(&table.schema, &shadow.name),
        name = super::source::quote_ident(&table.name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary_row(values: &[&[u8]]) -> Vec<u8> {
        let mut out = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            out.extend((v.len() as i32).to_be_bytes());
            out.extend(*v);
        }
        out
    }

    #[test]
    fn binary_batches_end_at_row_boundaries() {
        let mut stream = BINARY_HEADER.to_vec();
        for i in 0..10u32 {
            stream.extend(binary_row(&[&i.to_be_bytes(), b"abc"]));
        }
        stream.extend(BINARY_TRAILER);
        // Feed it in awkward pieces.
        let mut b = Batcher::new(true, 40);
        let mut batches = Vec::new();
        for piece in stream.chunks(7) {
            if let Some(batch) = b.push(piece).unwrap() {
                batches.push(batch);
            }
        }
        batches.extend(b.finish().unwrap());
        assert_eq!(batches.iter().map(|(_, rows)| rows).sum::<u64>(), 10);
        for (data, rows) in &batches {
            assert!(data.starts_with(BINARY_HEADER));
            assert!(data.ends_with(&BINARY_TRAILER));
            let body = data.len() - BINARY_HEADER.len() - 2;
            assert_eq!(body as u64, rows * binary_row(&[&[0; 4], b"abc"]).len() as u64);
        }
        assert!(batches.len() > 1);
    }

    #[test]
    fn text_batches_and_truncation() {
        let mut b = Batcher::new(false, 8);
        assert!(b.push(b"1\ta\n").unwrap().is_none());
        let (data, rows) = b.push(b"2\tb\n").unwrap().unwrap();
        assert_eq!((data.as_slice(), rows), (&b"1\ta\n2\tb\n"[..], 2));
        assert!(b.finish().unwrap().is_none());

        let mut b = Batcher::new(true, 1 << 20);
        let mut stream = BINARY_HEADER.to_vec();
        stream.extend(&binary_row(&[b"x"])[..5]);
        b.push(&stream).unwrap();
        assert!(b.finish().is_err());
    }
}
