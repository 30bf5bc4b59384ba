//! The status a running `sync` daemon publishes next to its data, so that
//! `pglite-cache status --data DIR` can report while the daemon holds the
//! directory's lock. Written atomically (temporary file, then rename).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use pglite_cache::replication::{Phase, ReplicationConfig, Status, TableState};
use serde::{Deserialize, Serialize};

/// File name inside the data directory.
const FILE: &str = "pglite-cache-status.json";

/// What `status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// Whether the daemon was running when this was written.
    pub running: bool,
    /// The daemon's process id.
    pub pid: u32,
    /// `starting`, `copying`, `streaming`, `reconnecting`, `halted`, `stopped`.
    pub phase: String,
    /// Why it is reconnecting or halted.
    pub error: Option<String>,
    /// The slot on the remote.
    pub slot: String,
    /// The publication.
    pub publication: String,
    /// Everything up to this LSN is applied.
    pub applied_lsn: String,
    /// Remote commit time of the last applied transaction (RFC 3339).
    pub applied_commit_time: Option<String>,
    /// WAL bytes behind the remote.
    pub lag_bytes: u64,
    /// Commit-to-applied time of the last transaction, in seconds.
    pub lag_seconds: f64,
    /// Transactions applied since the daemon started.
    pub transactions_applied: u64,
    /// Local commits that applied them (fewer when merged, see
    /// `--commit-delay`).
    #[serde(default)]
    pub local_commits: u64,
    /// Commit-to-commit lag over the last minute or two: upper bounds of
    /// the median and the 99th percentile, in seconds (none without
    /// transactions; none for p99 past the last histogram bucket).
    #[serde(default)]
    pub lag_recent_p50_seconds: Option<f64>,
    /// See `lag_recent_p50_seconds`.
    #[serde(default)]
    pub lag_recent_p99_seconds: Option<f64>,
    /// WAL the remote keeps for the slot, in bytes, as last checked.
    #[serde(default)]
    pub slot_retained_wal_bytes: Option<u64>,
    /// Per table.
    pub tables: Vec<TableReport>,
    /// When this was written (RFC 3339).
    pub updated_at: String,
}

/// One table in a [`StatusReport`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// `pending`, `copying` or `ready`.
    pub state: String,
    /// Rows copied by the initial sync.
    pub rows_copied: u64,
    /// Rows inserted, updated and deleted by streaming since start.
    pub rows_applied: u64,
}

/// The phase's name and error, as shown to people and metrics.
pub fn phase_name(phase: &Phase) -> (&'static str, Option<String>) {
    match phase {
        Phase::Starting => ("starting", None),
        Phase::Copying => ("copying", None),
        Phase::Streaming => ("streaming", None),
        Phase::Reconnecting { error, .. } => ("reconnecting", Some(error.clone())),
        Phase::Halted { error } => ("halted", Some(error.clone())),
        Phase::Stopped => ("stopped", None),
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    chrono::DateTime::from_timestamp_micros((secs * 1e6) as i64).map(|d| d.to_rfc3339()).unwrap_or_default()
}

impl StatusReport {
    /// Builds the report from the live status.
    pub fn from_status(s: &Status, config: &ReplicationConfig, running: bool) -> StatusReport {
        let (phase, error) = phase_name(&s.phase);
        StatusReport {
            running,
            pid: std::process::id(),
            phase: phase.into(),
            error,
            slot: config.slot_name.clone(),
            publication: config.publication.name().into(),
            applied_lsn: s.applied_lsn.to_string(),
            applied_commit_time: s.applied_commit_time.map(rfc3339),
            lag_bytes: s.lag_bytes,
            lag_seconds: s.lag.as_secs_f64(),
            transactions_applied: s.applied_transactions,
            local_commits: s.local_commits,
            lag_recent_p50_seconds: s.commit_lag.recent().quantile(0.5).filter(|q| q.is_finite()),
            lag_recent_p99_seconds: s.commit_lag.recent().quantile(0.99).filter(|q| q.is_finite()),
            slot_retained_wal_bytes: s.slot_retained_bytes,
            tables: s
                .tables
                .iter()
                .map(|t| TableReport {
                    table: format!("{}.{}", t.schema, t.name),
                    state: match t.state {
                        TableState::Pending => "pending",
                        TableState::Copying => "copying",
                        TableState::Ready => "ready",
                    }
                    .into(),
                    rows_copied: t.rows_copied,
                    rows_applied: t.inserted + t.updated + t.deleted,
                })
                .collect(),
            updated_at: rfc3339(SystemTime::now()),
        }
    }
}

fn path(data: &Path) -> PathBuf {
    data.join(FILE)
}

/// Writes the report (best effort: a failure is logged, never fatal).
pub fn write(data: &Path, report: &StatusReport) {
    let tmp = data.join(format!(".{FILE}.tmp"));
    let result = serde_json::to_vec_pretty(report)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path(data)));
    if let Err(e) = result {
        tracing::debug!(error = %e, "writing the status file failed");
    }
}

/// Reads the last report a daemon wrote into `data`, if any.
pub fn read(data: &Path) -> Option<StatusReport> {
    serde_json::from_slice(&std::fs::read(path(data)).ok()?).ok()
}
