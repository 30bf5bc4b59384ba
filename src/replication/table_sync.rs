//! The initial copy of one table: `COPY ... TO STDOUT` on the remote inside
//! the slot's exported snapshot, bulk-loaded locally with
//! `COPY ... FROM '/dev/blob'` in batches of a few MiB.
//!
//! Reading the remote and loading locally overlap: a reader fills batches
//! while the instance loads the previous one; at most two batches are in
//! flight, so memory stays bounded whatever the table size. Text format on
//! both sides: the remote's output functions and the local input functions
//! agree for every type, across major versions.

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::Instance;

use super::error::ReplicationError;
use super::schema::TableSchema;

/// Copies one table. `client` must be inside the snapshot transaction.
/// `progress(rows, bytes)` is called after each loaded batch with totals.
pub async fn copy_table(
    client: &tokio_postgres::Client,
    instance: &Instance,
    table: &TableSchema,
    batch_bytes: usize,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, ReplicationError> {
    let stream = client.copy_out(&table.copy_out_sql()).await?;
    let (tx, mut rx) = mpsc::channel::<(Vec<u8>, u64)>(1);
    let reader = async move {
        let mut stream = std::pin::pin!(stream);
        let mut buf = Vec::with_capacity(batch_bytes + (64 << 10));
        let mut rows = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            rows += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
            buf.extend_from_slice(&chunk);
            if buf.len() >= batch_bytes {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(batch_bytes + (64 << 10)));
                if tx.send((full, std::mem::take(&mut rows))).await.is_err() {
                    return Ok(()); // the loader failed; its error is reported
                }
            }
        }
        if !buf.is_empty() {
            let _ = tx.send((buf, rows)).await;
        }
        Ok::<_, ReplicationError>(())
    };
    let sql = table.copy_in_sql();
    let loader = async {
        let (mut total_rows, mut total_bytes) = (0u64, 0u64);
        while let Some((data, rows)) = rx.recv().await {
            let bytes = data.len() as u64;
            let loaded = instance
                .copy_in(&sql, data)
                .await
                .map_err(|e| ReplicationError::from(e).context(format!("loading {}", table.qualified())))?;
            debug_assert_eq!(loaded, rows);
            total_rows += rows;
            total_bytes += bytes;
            progress(total_rows, total_bytes);
        }
        Ok::<_, ReplicationError>(total_rows)
    };
    let ((), rows) = tokio::try_join!(reader, loader)?;
    Ok(rows)
}
