//! Autovacuum's and the checkpointer's jobs, done from outside the engine.
//!
//! PGlite runs PostgreSQL as one backend in single-user mode: there is no
//! autovacuum launcher, so nothing vacuums or analyzes a long-lived
//! instance by itself. Without it, tables that see updates and deletes keep
//! their dead rows and grow, the planner never gets column statistics (a
//! table loaded by COPY is never analyzed), and old rows are never frozen,
//! which PostgreSQL needs within about two billion transactions to keep
//! them visible (transaction ID wraparound).
//!
//! [`Maintenance::start`] checks every `interval` (autovacuum's
//! `autovacuum_naptime` is one minute): it reads the tables' activity
//! counters and runs `VACUUM` and `ANALYZE` where autovacuum's default
//! thresholds say so ([`decide`], pure), and `VACUUM (FREEZE)` on the whole
//! database once its oldest unfrozen transaction ID is older than
//! `vacuum_freeze_table_age` ([`needs_freeze`]; pages already frozen are
//! skipped). Each command holds the engine while it runs, as any statement
//! does: other callers wait for it.
//!
//! It does the checkpointer's job too: single-user PostgreSQL requests a
//! checkpoint only under a postmaster, so the engine's WAL grew for as long
//! as it ran (all of it kept, and replayed after a crash). Each pass runs
//! `CHECKPOINT` when [`needs_checkpoint`] says the checkpointer would
//! (about half of `max_wal_size` written since the last one, or
//! `checkpoint_timeout` passed), then syncs a persistent instance's files
//! to disk: the engine runs with `fsync = off`, and until that sync a
//! power loss (not a killed process) could leave the checkpoint recorded
//! without the pages it wrote.
//!
//! Only the database the engine runs in can be reached. The cluster's
//! other databases were frozen when it was made and nothing writes to
//! them, so their age is harmless; past ~2 billion transactions PostgreSQL
//! warns about them all the same, and keeps the transaction status files
//! they would let it truncate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postgres_protocol::escape::escape_identifier as quote_ident;

use crate::{Error, Instance};

/// What a table needs, as autovacuum would decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `VACUUM (ANALYZE)`.
    VacuumAnalyze,
    /// `VACUUM`.
    Vacuum,
    /// `ANALYZE`.
    Analyze,
}

impl Action {
    fn command(self) -> &'static str {
        match self {
            Action::VacuumAnalyze => "VACUUM (ANALYZE)",
            Action::Vacuum => "VACUUM",
            Action::Analyze => "ANALYZE",
        }
    }
}

/// A table's activity counters (`pg_stat_user_tables`) and size estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct TableActivity {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// `pg_class.reltuples` (0 when never vacuumed or analyzed).
    pub tuples: f64,
    /// Dead rows not yet vacuumed.
    pub dead: i64,
    /// Rows changed since the last analyze.
    pub modified_since_analyze: i64,
    /// Rows inserted since the last vacuum.
    pub inserted_since_vacuum: i64,
}

/// PostgreSQL's default autovacuum thresholds and scale factors.
const VACUUM_THRESHOLD: f64 = 50.0;
const VACUUM_SCALE: f64 = 0.2;
const INSERT_THRESHOLD: f64 = 1000.0;
const INSERT_SCALE: f64 = 0.2;
const ANALYZE_THRESHOLD: f64 = 50.0;
const ANALYZE_SCALE: f64 = 0.1;

/// PostgreSQL's default `vacuum_freeze_table_age`: past it, a vacuum scans
/// every page to freeze old rows, and the database's oldest unfrozen
/// transaction ID moves on.
pub const FREEZE_AGE: i64 = 150_000_000;

/// Whether the database's oldest unfrozen transaction ID (`age` of
/// `datfrozenxid`) is old enough to freeze everything.
pub fn needs_freeze(age: i64) -> bool {
    age > FREEZE_AGE
}

/// WAL written since the last checkpoint (its redo point) that asks for
/// one without waiting for `checkpoint_timeout`.
const CHECKPOINT_IDLE_WAL: i64 = 64 << 10;

/// Whether the engine should checkpoint, as PostgreSQL's checkpointer
/// decides: `wal_since_redo` bytes of WAL since the last checkpoint's redo
/// point reached about half of `max_wal_size` (the checkpointer's target
/// with `checkpoint_completion_target = 0.9` is 1/1.9 of it), or
/// `checkpoint_timeout` has passed and something was written meanwhile.
pub fn needs_checkpoint(wal_since_redo: i64, max_wal_size: i64, since_checkpoint: Duration, timeout: Duration) -> bool {
    wal_since_redo >= max_wal_size / 2 || (since_checkpoint >= timeout && wal_since_redo > CHECKPOINT_IDLE_WAL)
}

/// What `t` needs, with autovacuum's default formulas: vacuum when dead
/// rows (or, so that index-only scans work, inserted rows) pass a threshold
/// plus a fraction of the table, analyze when changed rows do.
pub fn decide(t: &TableActivity) -> Option<Action> {
    let tuples = t.tuples.max(0.0);
    let vacuum = t.dead as f64 > VACUUM_THRESHOLD + VACUUM_SCALE * tuples
        || t.inserted_since_vacuum as f64 > INSERT_THRESHOLD + INSERT_SCALE * tuples;
    let analyze = t.modified_since_analyze as f64 > ANALYZE_THRESHOLD + ANALYZE_SCALE * tuples;
    match (vacuum, analyze) {
        (true, true) => Some(Action::VacuumAnalyze),
        (true, false) => Some(Action::Vacuum),
        (false, true) => Some(Action::Analyze),
        (false, false) => None,
    }
}

/// Running totals of the maintenance commands, for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    commands: AtomicU64,
    busy_micros: AtomicU64,
    failed: AtomicU64,
}

impl Stats {
    /// Commands run (`VACUUM`, `ANALYZE`...).
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }

    /// Time they held the engine.
    pub fn busy(&self) -> Duration {
        Duration::from_micros(self.busy_micros.load(Ordering::Relaxed))
    }

    /// Commands the engine refused and passes that failed.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Runs one maintenance pass on `instance`: the tables that need it, the
/// whole database if its transaction IDs are getting old, then a
/// checkpoint if one is due. Returns the commands run. A table dropped meanwhile is skipped.
pub async fn run_once(instance: &Instance) -> Result<Vec<String>, Error> {
    run_pass(instance, &Stats::default()).await
}

async fn run_pass(instance: &Instance, stats: &Stats) -> Result<Vec<String>, Error> {
    // Counters reach the shared statistics at most once a second; make this
    // transaction's end publish what is pending, so the next one reads it.
    instance.query("SELECT pg_stat_force_next_flush()", &[]).await?;
    let tables = instance
        .query(
            "SELECT s.schemaname::text, s.relname::text, greatest(c.reltuples, 0)::float8, s.n_dead_tup, \
             s.n_mod_since_analyze, s.n_ins_since_vacuum \
             FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
             WHERE c.relpersistence = 'p' ORDER BY s.relid",
            &[],
        )
        .await?;
    let mut done = Vec::new();
    for row in &tables.rows {
        let table = TableActivity {
            schema: row.get(0),
            name: row.get(1),
            tuples: row.get(2),
            dead: row.get(3),
            modified_since_analyze: row.get(4),
            inserted_since_vacuum: row.get(5),
        };
        let Some(action) = decide(&table) else { continue };
        let sql = format!("{} {}.{}", action.command(), quote_ident(&table.schema), quote_ident(&table.name));
        if run(instance, &sql, stats).await? {
            done.push(sql);
        }
    }
    let age: i32 = instance
        .query("SELECT age(datfrozenxid) FROM pg_database WHERE datname = current_database()", &[])
        .await?
        .rows
        .first()
        .map_or(0, |r| r.get(0));
    if needs_freeze(i64::from(age)) && run(instance, "VACUUM (FREEZE)", stats).await? {
        done.push("VACUUM (FREEZE)".into());
    }
    let wal = instance
        .query(
            "SELECT (pg_current_wal_insert_lsn() - redo_lsn)::int8, \
             extract(epoch FROM clock_timestamp() - checkpoint_time)::float8, \
             pg_size_bytes(current_setting('max_wal_size')), \
             (SELECT setting::float8 FROM pg_settings WHERE name = 'checkpoint_timeout') \
             FROM pg_control_checkpoint()",
            &[],
        )
        .await?;
    if let Some(row) = wal.rows.first() {
        let (since_redo, age, max_wal_size, timeout): (i64, f64, i64, f64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let seconds = |s: f64| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX);
        if needs_checkpoint(since_redo, max_wal_size, seconds(age), seconds(timeout))
            && run(instance, "CHECKPOINT", stats).await?
        {
            done.push("CHECKPOINT".into());
            // The engine never fsyncs: what the checkpoint wrote reaches the
            // disk now, rather than at the next confirmation's sync.
            if let Err(e) = instance.sync_to_disk().await {
                tracing::warn!(error = %e, "sync to disk after a checkpoint failed");
            }
        }
    }
    Ok(done)
}

/// Runs one maintenance command; `false` if the engine refused it (a table
/// dropped since the counters were read, say), which is logged.
async fn run(instance: &Instance, sql: &str, stats: &Stats) -> Result<bool, Error> {
    let started = Instant::now();
    let result = instance.exec(sql).await;
    let elapsed = started.elapsed();
    stats.busy_micros.fetch_add(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    match result {
        Ok(_) => {
            tracing::info!(%sql, ?elapsed, "maintenance");
            stats.commands.fetch_add(1, Ordering::Relaxed);
            Ok(true)
        }
        Err(e) if e.code().is_some() => {
            tracing::warn!(%sql, error = %e, "maintenance command failed; skipped");
            stats.failed.fetch_add(1, Ordering::Relaxed);
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The background task running [`run_once`] every interval; stopped when
/// dropped.
#[derive(Debug)]
pub struct Maintenance {
    task: tokio::task::JoinHandle<()>,
    stats: Arc<Stats>,
}

impl Maintenance {
    /// Starts checking `instance` every `interval`, the first time one
    /// interval from now. Errors are logged and the next pass tries again.
    pub fn start(instance: Instance, interval: Duration) -> Maintenance {
        let stats = Arc::new(Stats::default());
        let totals = stats.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(e) = run_pass(&instance, &totals).await {
                    tracing::warn!(error = %e, "maintenance pass failed; trying again later");
                    totals.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Maintenance { task, stats }
    }

    /// Its running totals.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(tuples: f64, dead: i64, modified: i64, inserted: i64) -> TableActivity {
        TableActivity {
            schema: "public".into(),
            name: "t".into(),
            tuples,
            dead,
            modified_since_analyze: modified,
            inserted_since_vacuum: inserted,
        }
    }

    #[test]
    fn autovacuum_thresholds() {
        // Quiet table: nothing.
        assert_eq!(decide(&table(10_000.0, 10, 10, 10)), None);
        // 20% + 50 dead rows: vacuum; 10% + 50 changed: analyze.
        assert_eq!(decide(&table(10_000.0, 2_051, 0, 0)), Some(Action::Vacuum));
        assert_eq!(decide(&table(10_000.0, 2_050, 0, 0)), None);
        assert_eq!(decide(&table(10_000.0, 0, 1_051, 0)), Some(Action::Analyze));
        assert_eq!(decide(&table(10_000.0, 3_000, 3_000, 0)), Some(Action::VacuumAnalyze));
        // A table just loaded (never analyzed, estimate 0): both.
        assert_eq!(decide(&table(0.0, 0, 300_000, 300_000)), Some(Action::VacuumAnalyze));
        // Insert-only growth: vacuum past 1000 + 20%.
        assert_eq!(decide(&table(10_000.0, 0, 0, 3_001)), Some(Action::Vacuum));
        // A negative estimate (never vacuumed, PostgreSQL 14+) counts as 0.
        assert_eq!(decide(&table(-1.0, 51, 0, 0)), Some(Action::Vacuum));
        // The database: frozen past vacuum_freeze_table_age.
        assert!(!needs_freeze(FREEZE_AGE));
        assert!(needs_freeze(FREEZE_AGE + 1));
    }

    #[test]
    fn checkpointer_triggers() {
        let gb = 1 << 30;
        let (minute, timeout) = (Duration::from_secs(60), Duration::from_secs(300));
        // Half of max_wal_size since the last checkpoint: now.
        assert!(needs_checkpoint(gb / 2, gb, minute, timeout));
        assert!(!needs_checkpoint(gb / 2 - 1, gb, minute, timeout));
        // checkpoint_timeout passed: only if something was written since.
        assert!(needs_checkpoint(1 << 20, gb, timeout, timeout));
        assert!(!needs_checkpoint(1 << 20, gb, timeout - Duration::from_secs(1), timeout));
        assert!(!needs_checkpoint(CHECKPOINT_IDLE_WAL, gb, timeout * 10, timeout));
    }
}
