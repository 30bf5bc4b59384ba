//! Every metric of `pglite-cache sync`, in one place: adding one is one
//! more declaration here (read from the replication status and the
//! counters at each scrape, or a histogram observed where its events are).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use pglite_cache::replication::Status;

use super::report::Counters;
use crate::cli::metrics::{HistogramData, Metrics};
use crate::cli::status_file::phase_name;

/// What a scrape reads.
pub struct Snapshot {
    /// The replication's status now.
    pub status: Status,
    /// Running totals since start.
    pub counters: Arc<Counters>,
}

const PHASES: [&str; 6] = ["starting", "copying", "streaming", "reconnecting", "halted", "stopped"];

fn table_name(t: &pglite_cache::replication::TableStatus) -> String {
    format!("{}.{}", t.schema, t.name)
}

/// The daemon's metrics.
pub fn declare() -> Metrics<Snapshot> {
    let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed) as f64;
    let mut m: Metrics<Snapshot> = Metrics::new();
    m.gauges("pglite_cache_phase", "1 for the replication's current phase.", &["phase"], |s| {
        let (current, _) = phase_name(&s.status.phase);
        PHASES.iter().map(|p| (vec![p.to_string()], f64::from(u8::from(*p == current)))).collect()
    })
    .gauge("pglite_cache_lag_bytes", "WAL bytes between the remote and what is applied.", |s| s.status.lag_bytes as f64)
    .gauge("pglite_cache_lag_seconds", "Remote commit to local commit of the last applied transaction.", |s| {
        s.status.lag.as_secs_f64()
    })
    .gauge("pglite_cache_applied_lsn", "Everything up to this LSN is applied.", |s| s.status.applied_lsn.0 as f64)
    .counter("pglite_cache_applied_transactions_total", "Remote transactions applied since start.", move |s| {
        s.status.applied_transactions as f64
    })
    .counter("pglite_cache_applied_rows_total", "Row changes applied since start.", |s| s.status.applied_changes as f64)
    .counter(
        "pglite_cache_local_commits_total",
        "Local transactions that applied the remote ones since start (fewer when merged).",
        |s| s.status.local_commits as f64,
    )
    .histogram_from(
        "pglite_cache_commit_lag_seconds",
        "Remote commit to local commit of applied transactions, since start.",
        |s| {
            let total = &s.status.commit_lag.total;
            HistogramData {
                buckets: total.cumulative().filter(|(le, _)| le.is_finite()).collect(),
                sum: total.sum().as_secs_f64(),
                count: total.count(),
            }
        },
    )
    .gauges(
        "pglite_cache_commit_lag_recent_seconds",
        "Upper bound of the commit-to-commit lag quantile over the last 1-2 minutes (NaN when nothing was applied).",
        &["quantile"],
        |s| {
            let recent = s.status.commit_lag.recent();
            [0.5, 0.99].iter().map(|&q| (vec![q.to_string()], recent.quantile(q).unwrap_or(f64::NAN))).collect()
        },
    )
    .gauges(
        "pglite_cache_slot_retained_wal_bytes",
        "WAL the remote keeps for the slot (restart_lsn to its current position), once known.",
        &[],
        |s| s.status.slot_retained_bytes.map(|b| (Vec::new(), b as f64)).into_iter().collect(),
    )
    .gauges("pglite_cache_table_rows_copied", "Rows copied by the initial sync, per table.", &["table"], |s| {
        s.status.tables.iter().map(|t| (vec![table_name(t)], t.rows_copied as f64)).collect()
    })
    .counters(
        "pglite_cache_table_rows_applied_total",
        "Rows applied by streaming, per table and operation.",
        &["table", "op"],
        |s| {
            let mut series = Vec::new();
            for t in &s.status.tables {
                for (op, n) in [("insert", t.inserted), ("update", t.updated), ("delete", t.deleted)] {
                    series.push((vec![table_name(t), op.to_string()], n as f64));
                }
            }
            series
        },
    )
    .counter("pglite_cache_reconnects_total", "Times the remote connection was lost and retried.", move |s| {
        load(&s.counters.reconnects)
    })
    .counters("pglite_cache_errors_total", "Replication errors by class.", &["class"], move |s| {
        vec![
            (vec!["transient".into()], load(&s.counters.reconnects)),
            (vec!["halting".into()], load(&s.counters.halts)),
        ]
    })
    .counter(
        "pglite_cache_maintenance_commands_total",
        "VACUUM and ANALYZE commands the daemon ran on the cache (the engine has no autovacuum).",
        |s| s.counters.maintenance.as_ref().map_or(0.0, |m| m.commands() as f64),
    )
    .counter(
        "pglite_cache_maintenance_seconds_total",
        "Time those commands held the engine (applying and clients waited).",
        |s| s.counters.maintenance.as_ref().map_or(0.0, |m| m.busy().as_secs_f64()),
    )
    .counter(
        "pglite_cache_maintenance_failures_total",
        "Maintenance commands the engine refused, and passes that failed.",
        |s| s.counters.maintenance.as_ref().map_or(0.0, |m| m.failed() as f64),
    );
    m
}
