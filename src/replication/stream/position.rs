//! Where a cache is in the stream: `pglite_cache.stream`, one row, next to
//! the slot bookkeeping of `replication::store` (whose applied LSN
//! stays the position that decides exactly once).
//!
//! The stored sequence is where to resume reading; it may lag behind what
//! is applied (it is written after the apply commits), never run ahead of
//! it, so a restart re-reads a few records and skips them by LSN.

use crate::Instance;
use crate::params::Param;
use crate::replication::error::ReplicationError;

const INIT_SQL: &str = "CREATE SCHEMA IF NOT EXISTS pglite_cache; \
    CREATE TABLE IF NOT EXISTS pglite_cache.stream ( \
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), \
        stream_name text NOT NULL, \
        resume_seq bigint NOT NULL, \
        updated_at timestamptz NOT NULL DEFAULT now())";

/// The stored stream position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    /// The stream this cache reads.
    pub stream: String,
    /// The first sequence number not known to be applied.
    pub resume_seq: u64,
}

/// Creates the table if missing.
pub async fn init(instance: &Instance) -> Result<(), ReplicationError> {
    instance.exec(INIT_SQL).await?;
    Ok(())
}

/// Reads the stored position.
pub async fn load(instance: &Instance) -> Result<Option<StreamPosition>, ReplicationError> {
    init(instance).await?;
    let result = instance.query("SELECT stream_name, resume_seq FROM pglite_cache.stream", &[]).await?;
    Ok(result.rows.first().map(|r| StreamPosition { stream: r.get(0), resume_seq: r.get::<i64>(1).max(1) as u64 }))
}

/// Stores the position.
pub async fn save(instance: &Instance, position: &StreamPosition) -> Result<(), ReplicationError> {
    init(instance).await?;
    instance
        .query_params(
            "INSERT INTO pglite_cache.stream (stream_name, resume_seq) VALUES ($1, $2) \
             ON CONFLICT (singleton) DO UPDATE SET stream_name = EXCLUDED.stream_name, \
             resume_seq = EXCLUDED.resume_seq, updated_at = now()",
            vec![
                Param::Untyped(position.stream.clone()),
                Param::typed(crate::oid::INT8, position.resume_seq.to_string()),
            ],
        )
        .await?;
    Ok(())
}
