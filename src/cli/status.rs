//! `pglite-cache status`: where a cache is, whether its daemon runs or not.

use std::path::PathBuf;
use std::process::ExitCode;

use pglite_cache::{Error, Instance, InstanceOptions};
use tokio_postgres::NoTls;

use super::status_file::{self, StatusReport, TableReport};

/// Raw `status` flags.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("where").required(true).args(["data", "socket_dir"])))]
pub struct StatusArgs {
    /// The cache's data directory (works whether the daemon runs or not).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Ask a running daemon through its Unix socket directory instead.
    #[arg(long, value_name = "DIR", requires = "port")]
    socket_dir: Option<PathBuf>,
    /// The daemon's port (with --socket-dir).
    #[arg(long)]
    port: Option<u16>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

const STATUS_SQL: &str =
    "SELECT phase, slot_name, publication, applied_lsn::text, applied_commit_time::text FROM pglite_cache.status";
const TABLES_SQL: &str =
    "SELECT schema_name || '.' || table_name, state, rows_copied::text FROM pglite_cache.tables ORDER BY 1";

pub async fn run(args: StatusArgs) -> ExitCode {
    let report = match (&args.data, &args.socket_dir) {
        (Some(data), _) => from_data_dir(data).await,
        (None, Some(dir)) => from_socket(dir, args.port.unwrap_or(5433)).await,
        (None, None) => unreachable!("clap requires one of them"),
    };
    match report {
        Ok(report) => {
            print(&report, args.json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn from_data_dir(data: &std::path::Path) -> Result<StatusReport, String> {
    if !data.exists() {
        return Err(format!("{} does not exist", data.display()));
    }
    let instance = match Instance::start(InstanceOptions::persistent(data)).await {
        Ok(instance) => instance,
        // The daemon holds the directory: report what it last published.
        Err(Error::DataDirInUse(_)) => {
            return status_file::read(data)
                .ok_or_else(|| "a daemon holds this directory but has published no status yet".into());
        }
        Err(e) => return Err(e.to_string()),
    };
    let stored = read_store(&instance).await;
    let _ = instance.stop().await;
    let (head, tables) = stored?;
    let mut report = assemble(head, tables, false);
    // Keep what only the daemon knew (lag, counts) from its last report.
    if let Some(last) = status_file::read(data) {
        report.lag_bytes = last.lag_bytes;
        report.lag_seconds = last.lag_seconds;
        report.transactions_applied = last.transactions_applied;
        report.local_commits = last.local_commits;
        report.lag_recent_p50_seconds = last.lag_recent_p50_seconds;
        report.lag_recent_p99_seconds = last.lag_recent_p99_seconds;
        report.slot_retained_wal_bytes = last.slot_retained_wal_bytes;
        for table in &mut report.tables {
            if let Some(seen) = last.tables.iter().find(|t| t.table == table.table) {
                table.rows_applied = seen.rows_applied;
            }
        }
    }
    Ok(report)
}

type Head = Vec<Option<String>>;
type TableRows = Vec<Vec<Option<String>>>;

async fn read_store(instance: &Instance) -> Result<(Head, TableRows), String> {
    let text_rows = |r: pglite_cache::QueryResult| -> TableRows {
        r.rows.iter().map(|row| (0..row.len()).map(|i| row.get_text(i).map(str::to_owned)).collect()).collect()
    };
    let head = instance.query(STATUS_SQL, &[]).await.map_err(|e| match e.code() {
        Some(c) if *c == pglite_cache::SqlState::UNDEFINED_TABLE => {
            "no replication is set up in this directory".to_string()
        }
        _ => e.to_string(),
    })?;
    let head = text_rows(head).into_iter().next().ok_or("no replication is set up in this directory")?;
    let tables = text_rows(instance.query(TABLES_SQL, &[]).await.map_err(|e| e.to_string())?);
    Ok((head, tables))
}

async fn from_socket(dir: &std::path::Path, port: u16) -> Result<StatusReport, String> {
    let conninfo = format!("host={} port={port} user=postgres dbname=postgres", dir.display());
    let (client, connection) =
        tokio_postgres::connect(&conninfo, NoTls).await.map_err(|e| format!("connecting to the daemon: {e}"))?;
    tokio::spawn(connection);
    let text = |rows: Vec<tokio_postgres::Row>| -> TableRows {
        rows.iter().map(|r| (0..r.len()).map(|i| r.get::<_, Option<String>>(i)).collect()).collect()
    };
    let head = text(client.query(STATUS_SQL, &[]).await.map_err(|e| e.to_string())?)
        .into_iter()
        .next()
        .ok_or("no replication is set up in this cache")?;
    let tables = text(client.query(TABLES_SQL, &[]).await.map_err(|e| e.to_string())?);
    Ok(assemble(head, tables, true))
}

/// A report from the stored bookkeeping (`head` = the columns of STATUS_SQL).
fn assemble(head: Head, tables: TableRows, running: bool) -> StatusReport {
    let col = |i: usize| head.get(i).cloned().flatten();
    StatusReport {
        running,
        pid: 0,
        phase: col(0).unwrap_or_default(),
        error: None,
        slot: col(1).unwrap_or_default(),
        publication: col(2).unwrap_or_default(),
        applied_lsn: col(3).unwrap_or_default(),
        applied_commit_time: col(4),
        lag_bytes: 0,
        lag_seconds: 0.0,
        transactions_applied: 0,
        local_commits: 0,
        lag_recent_p50_seconds: None,
        lag_recent_p99_seconds: None,
        slot_retained_wal_bytes: None,
        tables: tables
            .into_iter()
            .map(|t| TableReport {
                table: t[0].clone().unwrap_or_default(),
                state: t[1].clone().unwrap_or_default(),
                rows_copied: t[2].as_deref().and_then(|n| n.parse().ok()).unwrap_or(0),
                rows_applied: 0,
            })
            .collect(),
        updated_at: status_file::rfc3339(std::time::SystemTime::now()),
    }
}

fn print(report: &StatusReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(report).unwrap_or_default());
        return;
    }
    let running = if report.running { "running" } else { "not running" };
    println!("daemon:       {running}");
    println!("phase:        {}", report.phase);
    if let Some(error) = &report.error {
        println!("error:        {error}");
    }
    println!("slot:         {}", report.slot);
    println!("publication:  {}", report.publication);
    println!("applied LSN:  {}", report.applied_lsn);
    println!("last commit:  {}", report.applied_commit_time.as_deref().unwrap_or("none yet"));
    println!("lag:          {} bytes, {:.1} ms", report.lag_bytes, report.lag_seconds * 1e3);
    let ms = |q: Option<f64>| q.map_or("-".to_owned(), |s| format!("{:.1} ms", s * 1e3));
    println!(
        "recent lag:   p50 <= {}, p99 <= {} (remote commit to local commit, last 1-2 minutes)",
        ms(report.lag_recent_p50_seconds),
        ms(report.lag_recent_p99_seconds)
    );
    if let Some(bytes) = report.slot_retained_wal_bytes {
        println!("slot keeps:   {bytes} bytes of remote WAL");
    }
    println!("tables:");
    for t in &report.tables {
        println!("  {:<40} {:<8} {:>12} rows copied {:>10} applied", t.table, t.state, t.rows_copied, t.rows_applied);
    }
}
