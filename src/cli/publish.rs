//! `pglite-cache publish`: own the one slot on the remote and fan its
//! changes out through a NATS JetStream stream to any number of caches
//! (`pglite-cache sync --nats`). See docs/fan-out.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pglite_cache::replication::stream::{Publisher, PublisherConfig, StreamConfig};
use pglite_cache::replication::{ErrorKind, Phase, PublicationSpec, ReplicationConfig, SourceConfig, Status};
use tokio::sync::watch;

use super::listen::stop_signal;
use super::status_file::phase_name;
use super::sync::preflight;

/// Exit status for configuration problems.
const EXIT_CONFIG: u8 = 2;

/// Raw `publish` flags.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    source: crate::cli::source::SourceArgs,
    /// NATS server(s) with JetStream: `nats://host:port` (comma-separated for a cluster).
    #[arg(long, value_name = "URL", env = "PGLITE_CACHE_NATS")]
    nats: String,
    /// The stream's name (letters, digits, '-', '_'); caches use the same.
    #[arg(long, value_name = "NAME", env = "PGLITE_CACHE_STREAM")]
    stream: String,
    /// The publisher's own cache (initial copy, snapshots). Default: ./<stream>-publisher.
    #[arg(long, value_name = "DIR", env = "PGLITE_CACHE_DATA")]
    data: Option<PathBuf>,
    /// Publish an existing publication.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["tables", "schema"], env = "PGLITE_CACHE_PUBLICATION")]
    publication: Option<String>,
    /// Publish these tables (`schema.table` or `table`); a publication is created and owned.
    #[arg(long, value_name = "T1,T2", value_delimiter = ',', conflicts_with = "schema", env = "PGLITE_CACHE_TABLES")]
    tables: Vec<String>,
    /// Publish every table of this schema (as it is at first start).
    #[arg(long, value_name = "SCHEMA", env = "PGLITE_CACHE_SCHEMA")]
    schema: Option<String>,
    /// The logical replication slot on the remote.
    #[arg(long, value_name = "NAME", default_value = "pglite_cache_fanout", env = "PGLITE_CACHE_SLOT")]
    slot: String,
    /// Hours the stream keeps records (0: forever). A cache offline longer starts again from a snapshot.
    #[arg(long, value_name = "HOURS", default_value_t = 168, env = "PGLITE_CACHE_RETENTION_HOURS")]
    retention_hours: u64,
    /// Minutes between snapshots of the publisher's cache (0: only the one of the initial copy).
    #[arg(long, value_name = "MINUTES", default_value_t = 10, env = "PGLITE_CACHE_SNAPSHOT_MINUTES")]
    snapshot_minutes: u64,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT", env = "PGLITE_CACHE_METRICS")]
    metrics: Option<SocketAddr>,
    /// Seconds between status lines; also how often the remote's position is
    /// asked for (idle progress for wait_for_lsn).
    #[arg(long, value_name = "SECONDS", default_value_t = 1, env = "PGLITE_CACHE_STATUS_INTERVAL")]
    status_interval: u64,
}

fn plan(args: PublishArgs) -> Result<(PublisherConfig, Option<String>, Option<SocketAddr>), String> {
    let source: SourceConfig = args.source.resolve()?;
    let owned_name = format!("{}_pub", args.slot);
    let publication = match (args.publication, args.tables.is_empty(), &args.schema) {
        (Some(name), true, None) => PublicationSpec::Existing(name),
        (None, false, None) => PublicationSpec::Owned { name: owned_name, tables: args.tables },
        (None, true, Some(_)) => PublicationSpec::Owned { name: owned_name, tables: Vec::new() },
        _ => return Err("say what to publish: one of --publication NAME, --tables T1,T2 or --schema NAME".into()),
    };
    if args.status_interval == 0 {
        return Err("--status-interval must be at least 1 second".into());
    }
    let replication = ReplicationConfig::new(source, publication)
        .slot_name(args.slot)
        .status_interval(Duration::from_secs(args.status_interval));
    let mut stream = StreamConfig::new(args.nats, args.stream);
    stream.validate().map_err(|e| format!("--stream: {}", e.message()))?;
    stream.max_age = Duration::from_secs(args.retention_hours * 3600);
    let data = args.data.unwrap_or_else(|| PathBuf::from(format!("{}-publisher", stream.name)));
    let mut config = PublisherConfig::new(replication, stream, data);
    config.snapshot_interval = (args.snapshot_minutes > 0).then(|| Duration::from_secs(args.snapshot_minutes * 60));
    Ok((config, args.schema, args.metrics))
}

fn config_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_CONFIG)
}

pub async fn run(args: PublishArgs) -> ExitCode {
    let (mut config, schema, metrics_addr) = match plan(args) {
        Ok(plan) => plan,
        Err(e) => return config_error(e),
    };
    let remote = tokio::select! {
        checked = preflight::check(&config.replication, schema.as_deref()) => checked,
        () = stop_signal() => return ExitCode::SUCCESS,
    };
    let remote = match remote {
        Ok(remote) => remote,
        Err(e) => return config_error(e),
    };
    if let Some(tables) = remote.schema_tables
        && let PublicationSpec::Owned { tables: t, .. } = &mut config.replication.publication
    {
        *t = tables;
    }
    let status_interval = config.replication.status_interval.max(Duration::from_secs(10));
    let publisher = match Publisher::start(config) {
        Ok(publisher) => publisher,
        Err(e) => return config_error(e),
    };
    let (stop_reports, reports_stopped) = watch::channel(false);
    if let Some(addr) = metrics_addr {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                eprintln!("metrics at http://{addr}/metrics");
                let status = publisher.watch_status();
                let mut stopped = reports_stopped.clone();
                let page = declare_metrics();
                let render = move || page.render(&status.borrow().clone());
                tokio::spawn(crate::cli::metrics::serve(listener, render, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                }));
            }
            Err(e) => return config_error(format!("--metrics {addr}: {e}")),
        }
    }
    let reports = tokio::spawn(report(publisher.watch_status(), reports_stopped, status_interval));
    let mut status = publisher.watch_status();
    let halted = tokio::select! {
        biased;
        () = stop_signal() => false,
        _ = status.wait_for(|s| matches!(s.phase, Phase::Halted { .. } | Phase::Stopped)) => true,
    };
    let result = publisher.stop().await;
    let _ = stop_reports.send(true);
    let _ = reports.await;
    match result {
        Ok(()) if !halted => {
            eprintln!("stopped: everything received was stored in the stream and confirmed");
            ExitCode::SUCCESS
        }
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: publisher halted: {}", e.message());
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            match e.kind() {
                ErrorKind::NeedsOperator => ExitCode::from(EXIT_CONFIG),
                ErrorKind::Transient | ErrorKind::Fatal => ExitCode::FAILURE,
            }
        }
    }
}

/// Phase changes as they happen, a status line now and then.
async fn report(mut status: watch::Receiver<Status>, mut stop: watch::Receiver<bool>, every: Duration) {
    let mut last_phase = "";
    let mut last_line = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = tick.tick() => {}
            changed = status.changed() => if changed.is_err() { return },
        }
        let s = status.borrow_and_update().clone();
        let (phase, error) = phase_name(&s.phase);
        if phase != last_phase {
            match error {
                Some(e) => tracing::warn!(phase, error = %e, "publisher phase changed"),
                None => tracing::info!(phase, "publisher phase changed"),
            }
            last_phase = phase;
        }
        if s.phase == Phase::Streaming && last_line.elapsed() >= every {
            tracing::info!(
                "publishing: stored and confirmed up to {}, remote at {}, lag {} B",
                s.applied_lsn,
                s.server_wal_end,
                s.lag_bytes
            );
            last_line = Instant::now();
        }
    }
}

fn declare_metrics() -> crate::cli::metrics::Metrics<Status> {
    let mut m: crate::cli::metrics::Metrics<Status> = crate::cli::metrics::Metrics::new();
    m.gauges("pglite_cache_publisher_phase", "1 for the publisher's current phase.", &["phase"], |s| {
        let (phase, _) = phase_name(&s.phase);
        ["starting", "copying", "streaming", "reconnecting", "halted", "stopped"]
            .iter()
            .map(|p| (vec![p.to_string()], f64::from(u8::from(*p == phase))))
            .collect()
    })
    .gauge(
        "pglite_cache_publisher_confirmed_lsn",
        "Remote LSN stored in the stream and confirmed to the remote.",
        |s| s.applied_lsn.0 as f64,
    )
    .gauge("pglite_cache_publisher_remote_wal_end", "Remote WAL end as last reported.", |s| s.server_wal_end.0 as f64)
    .gauge("pglite_cache_publisher_lag_bytes", "WAL bytes not yet stored in the stream.", |s| s.lag_bytes as f64);
    m
}
