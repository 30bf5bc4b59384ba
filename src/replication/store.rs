//! Local bookkeeping, kept inside the instance itself in the `pglite_cache`
//! schema, so that it is committed in the same local transaction as the
//! changes it describes: after a crash the data and the position agree.
//!
//! - `pglite_cache.replication`: one row: which remote (system identifier,
//!   database), slot and publication; the phase (`copying` until the
//!   initial copy is complete, then `streaming`); the applied LSN (end of
//!   the last applied remote commit, or a keepalive position reached while
//!   idle) and the last applied commit time.
//! - `pglite_cache.tables`: per table: state and rows copied.
//! - `pglite_cache.status`: a one-row view for people and `pglite-cache status`.
//! - `pglite_cache.refuse_write()`: the read-only trigger function (lets the
//!   apply through: `session_replication_role = replica`, or the local
//!   setting `pglite_cache.applying = on`).

use crate::params::Param;
use crate::{Instance, Transaction};

use super::error::ReplicationError;
use super::lsn::Lsn;

/// The bookkeeping schema, created if missing.
pub const INIT_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS pglite_cache;
CREATE TABLE IF NOT EXISTS pglite_cache.replication (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    system_identifier text NOT NULL,
    database text NOT NULL,
    slot_name text NOT NULL,
    publication text NOT NULL,
    owns_publication boolean NOT NULL,
    phase text NOT NULL,
    consistent_lsn pg_lsn,
    applied_lsn pg_lsn NOT NULL DEFAULT '0/0',
    applied_commit_time timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pglite_cache.tables (
    schema_name text NOT NULL,
    table_name text NOT NULL,
    remote_oid oid NOT NULL,
    state text NOT NULL,
    rows_copied bigint NOT NULL DEFAULT 0,
    synced_lsn pg_lsn,
    PRIMARY KEY (schema_name, table_name)
);
CREATE OR REPLACE VIEW pglite_cache.status AS
SELECT phase, slot_name, publication, applied_lsn, applied_commit_time,
       now() - applied_commit_time AS since_last_commit,
       (SELECT count(*) FROM pglite_cache.tables) AS tables,
       (SELECT count(*) FROM pglite_cache.tables WHERE state = 'ready') AS tables_ready,
       (SELECT coalesce(sum(rows_copied), 0) FROM pglite_cache.tables) AS rows_copied,
       updated_at
FROM pglite_cache.replication;
CREATE OR REPLACE FUNCTION pglite_cache.refuse_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The apply's small transactions say so with this setting rather than
    -- session_replication_role: changing the role resets every cached plan.
    IF current_setting('pglite_cache.applying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'table %.% is replicated from a remote database and is read-only here', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'read_only_sql_transaction',
              HINT = 'write to the remote database; the change arrives here through replication';
END $$;
"#;

/// What the store says about the replication into this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredState {
    /// The remote's system identifier.
    pub system_identifier: String,
    /// The remote database.
    pub database: String,
    /// The slot.
    pub slot_name: String,
    /// The publication.
    pub publication: String,
    /// Whether this tool created the publication.
    pub owns_publication: bool,
    /// `copying` or `streaming`.
    pub phase: String,
    /// Everything up to here is applied.
    pub applied_lsn: Lsn,
}

/// Creates the bookkeeping schema if missing.
pub async fn init(instance: &Instance) -> Result<(), ReplicationError> {
    instance.exec(INIT_SQL).await?;
    Ok(())
}

/// Reads the stored state, if replication was set up before.
pub async fn load(instance: &Instance) -> Result<Option<StoredState>, ReplicationError> {
    let result = instance
        .query(
            "SELECT system_identifier, database, slot_name, publication, owns_publication, phase, applied_lsn::text \
             FROM pglite_cache.replication",
            &[],
        )
        .await?;
    let Some(row) = result.rows.first() else {
        return Ok(None);
    };
    Ok(Some(StoredState {
        system_identifier: row.get(0),
        database: row.get(1),
        slot_name: row.get(2),
        publication: row.get(3),
        owns_publication: row.get(4),
        phase: row.get(5),
        applied_lsn: row
            .get::<String>(6)
            .parse()
            .map_err(|e| ReplicationError::fatal(format!("stored applied LSN: {e}")))?,
    }))
}

/// Records a fresh start: the remote, slot, publication, phase `copying`.
pub async fn begin_copy(instance: &Instance, state: &StoredState, consistent: Lsn) -> Result<(), ReplicationError> {
    instance
        .transaction(&[
            ("DELETE FROM pglite_cache.replication", vec![]),
            ("DELETE FROM pglite_cache.tables", vec![]),
            (
                "INSERT INTO pglite_cache.replication (system_identifier, database, slot_name, publication, owns_publication, \
                 phase, consistent_lsn, applied_lsn) VALUES ($1, $2, $3, $4, $5, 'copying', $6::pg_lsn, $6::pg_lsn)",
                vec![
                    Param::Untyped(state.system_identifier.clone()),
                    Param::Untyped(state.database.clone()),
                    Param::Untyped(state.slot_name.clone()),
                    Param::Untyped(state.publication.clone()),
                    Param::typed(crate::oid::BOOL, if state.owns_publication { "t" } else { "f" }),
                    Param::Untyped(consistent.to_string()),
                ],
            ),
        ])
        .await?;
    Ok(())
}

/// Records a table's state.
pub fn table_state_statement(
    schema: &str,
    table: &str,
    remote_oid: u32,
    state: &str,
    rows: u64,
    synced: Lsn,
) -> (String, Vec<Param>) {
    (
        "INSERT INTO pglite_cache.tables (schema_name, table_name, remote_oid, state, rows_copied, synced_lsn) \
         VALUES ($1, $2, $3, $4, $5, $6::pg_lsn) ON CONFLICT (schema_name, table_name) DO UPDATE \
         SET remote_oid = EXCLUDED.remote_oid, state = EXCLUDED.state, rows_copied = EXCLUDED.rows_copied, synced_lsn = EXCLUDED.synced_lsn"
            .into(),
        vec![
            Param::Untyped(schema.into()),
            Param::Untyped(table.into()),
            Param::typed(crate::oid::OID, remote_oid.to_string()),
            Param::Untyped(state.into()),
            Param::typed(crate::oid::INT8, rows.to_string()),
            Param::Untyped(synced.to_string()),
        ],
    )
}

/// Marks the initial copy complete.
pub fn streaming_statement() -> (String, Vec<Param>) {
    ("UPDATE pglite_cache.replication SET phase = 'streaming', updated_at = now()".into(), vec![])
}

/// Advances the applied position; part of every applied transaction.
/// `commit_time` is in PostgreSQL microseconds since 2000-01-01.
///
/// Keyed by the primary key although the table has one row, so that the
/// prepared statement's plan does not hang on the never-analyzed table's
/// estimate (over 1,000 rows): with only the settings in its `WHERE`, the
/// custom plan (which folds the commit-time arithmetic) can look cheaper
/// than the generic one, and PostgreSQL then plans it again at every
/// transaction. Measured in `LSN_SHAPES=1 cargo run --release --example
/// replication_bench_engine`: 122 -> 47 µs per small transaction. (The
/// daemon's own statement had got its generic plan anyway; this makes that
/// independent of the estimate.)
pub fn applied_statement(lsn: Lsn, commit_time: Option<i64>) -> (String, Vec<Param>) {
    match commit_time {
        Some(t) => (
            "UPDATE pglite_cache.replication SET applied_lsn = $1::pg_lsn, \
             applied_commit_time = timestamptz '2000-01-01 00:00:00+00' + $2 * interval '1 microsecond', updated_at = now() \
             WHERE singleton"
                .into(),
            vec![Param::Untyped(lsn.to_string()), Param::typed(crate::oid::INT8, t.to_string())],
        ),
        None => (
            "UPDATE pglite_cache.replication SET applied_lsn = $1::pg_lsn, updated_at = now() WHERE singleton".into(),
            vec![Param::Untyped(lsn.to_string())],
        ),
    }
}

/// Runs statements atomically, either inside `tx` or as one batch.
pub async fn run(
    instance: &Instance,
    tx: Option<&Transaction>,
    statements: &[(String, Vec<Param>)],
) -> Result<(), ReplicationError> {
    match tx {
        Some(tx) => tx.batch(statements).await?,
        None => instance.transaction(statements).await?,
    };
    Ok(())
}

/// Asks for a resync, carried out when replication (re)starts: of every
/// table from a new slot (`tables` = `None`), or of these tables only
/// (`schema.table`, or `table` in `public`), copied at the next start as
/// tables added to the publication are. Fails, changing nothing, on a
/// table this cache does not replicate.
pub async fn request_resync(instance: &Instance, tables: Option<&[String]>) -> Result<(), ReplicationError> {
    init(instance).await?;
    let Some(tables) = tables else {
        instance.exec("DELETE FROM pglite_cache.replication").await?;
        return Ok(());
    };
    let mut statements = Vec::new();
    for table in tables {
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        let found = instance
            .query("SELECT 1 FROM pglite_cache.tables WHERE schema_name = $1 AND table_name = $2", &[&schema, &name])
            .await?;
        if found.rows.is_empty() {
            return Err(ReplicationError::needs_operator(
                format!("table {schema}.{name} is not replicated into this cache"),
                "name a replicated table as schema.table (see `pglite-cache status`)",
            ));
        }
        statements.push((
            "DELETE FROM pglite_cache.tables WHERE schema_name = $1 AND table_name = $2".to_owned(),
            vec![Param::Untyped(schema.to_owned()), Param::Untyped(name.to_owned())],
        ));
    }
    instance.transaction(&statements).await?;
    Ok(())
}

/// Removes the bookkeeping (decommission).
pub async fn drop_all(instance: &Instance) -> Result<(), ReplicationError> {
    instance.exec("DROP SCHEMA IF EXISTS pglite_cache CASCADE").await?;
    Ok(())
}
