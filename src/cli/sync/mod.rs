//! `pglite-cache sync`: keep a local cache of a remote database and serve it.
//!
//! Order of work: check the flags (exit 2), check the remote (exit 2 for
//! what an operator must fix; retry with backoff while it is unreachable),
//! open the cache, start replication, serve clients (refused with 57P03
//! until the initial copy is consistent), report progress, and on
//! SIGINT/SIGTERM finish the transaction being applied, send final
//! feedback, close clients and exit 0.

mod metrics;
mod nats;
pub(crate) mod preflight;
pub mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use pglite_cache::replication::{
    ErrorKind, Phase, PublicationSpec, Replication, ReplicationConfig, ReplicationError, ReplicationHandle,
    SlotLostPolicy, SourceConfig, Status,
};
use pglite_cache::server::{self, Admission};
use pglite_cache::{Error, Instance, InstanceOptions, RestartPolicy};
use tokio::sync::watch;

use super::listen::{ListenArgs, stop_signal};
use crate::cli::status_file;

/// Exit status for configuration problems (bad flags, remote prerequisites).
pub const EXIT_CONFIG: u8 = 2;

/// Raw `sync` flags.
#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    #[command(flatten)]
    source: crate::cli::source::SourceArgs,
    /// Feed the cache from a fan-out stream (`pglite-cache publish`) instead
    /// of a slot of its own: `nats://host:port`. Needs --stream.
    #[arg(
        long,
        value_name = "URL",
        requires = "stream",
        conflicts_with_all = ["source", "source_file", "publication", "tables", "schema"],
        env = "PGLITE_CACHE_NATS"
    )]
    nats: Option<String>,
    /// The fan-out stream's name (with --nats).
    #[arg(long, value_name = "NAME", requires = "nats", env = "PGLITE_CACHE_STREAM")]
    stream: Option<String>,
    /// The cache's data directory (created on first start, resumed later).
    #[arg(long, value_name = "DIR", env = "PGLITE_CACHE_DATA")]
    data: PathBuf,
    /// Replicate an existing publication.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["tables", "schema"], env = "PGLITE_CACHE_PUBLICATION")]
    publication: Option<String>,
    /// Replicate these tables (`schema.table` or `table`); a publication is created and owned.
    #[arg(long, value_name = "T1,T2", value_delimiter = ',', conflicts_with = "schema", env = "PGLITE_CACHE_TABLES")]
    tables: Vec<String>,
    /// Replicate every table of this schema (as it is at first start); a publication is created and owned.
    #[arg(long, value_name = "SCHEMA", env = "PGLITE_CACHE_SCHEMA")]
    schema: Option<String>,
    /// The logical replication slot on the remote.
    #[arg(long, value_name = "NAME", default_value = "pglite_cache", env = "PGLITE_CACHE_SLOT")]
    slot: String,
    #[command(flatten)]
    listen: ListenArgs,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT", env = "PGLITE_CACHE_METRICS")]
    metrics: Option<SocketAddr>,
    /// When the slot is missing or invalidated: stop with an error, or copy everything again.
    #[arg(long, value_enum, default_value_t = OnInvalidSlot::Error, env = "PGLITE_CACHE_ON_INVALID_SLOT")]
    on_invalid_slot: OnInvalidSlot,
    /// Let clients write to replicated tables (by default they are read-only;
    /// local writes conflict with later changes from the remote).
    #[arg(long, env = "PGLITE_CACHE_ALLOW_LOCAL_WRITES")]
    allow_local_writes: bool,
    /// Microseconds a received transaction may wait for others to join its
    /// local commit while the stream is busy, like PostgreSQL's
    /// commit_delay (0 to 100000): under a steady stream of small
    /// transactions, less CPU per transaction for at most this much more
    /// lag. A transaction arriving alone is not held back.
    #[arg(
        long,
        value_name = "MICROSECONDS",
        default_value_t = 1000,
        conflicts_with = "nats",
        env = "PGLITE_CACHE_COMMIT_DELAY"
    )]
    commit_delay: u64,
    /// Seconds between status lines while streaming.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, env = "PGLITE_CACHE_STATUS_INTERVAL")]
    status_interval: u64,
    #[command(flatten)]
    engine: crate::cli::engine::EngineArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnInvalidSlot {
    Error,
    Resync,
}

/// What the flags ask for, checked.
struct Plan {
    data: PathBuf,
    config: ReplicationConfig,
    schema: Option<String>,
    listen: super::listen::ListenPlan,
    metrics: Option<SocketAddr>,
    status_interval: std::time::Duration,
    engine: crate::cli::engine::EngineArgs,
}

fn plan(args: SyncArgs) -> Result<Plan, String> {
    let source: SourceConfig = args.source.resolve()?;
    let owned_name = format!("{}_pub", args.slot);
    let publication = match (args.publication, args.tables.is_empty(), &args.schema) {
        (Some(name), true, None) => PublicationSpec::Existing(name),
        (None, false, None) => PublicationSpec::Owned { name: owned_name, tables: args.tables },
        // Resolved to its tables once the remote is reachable.
        (None, true, Some(_)) => PublicationSpec::Owned { name: owned_name, tables: Vec::new() },
        _ => return Err("say what to replicate: one of --publication NAME, --tables T1,T2 or --schema NAME".into()),
    };
    let on_slot_lost = match args.on_invalid_slot {
        OnInvalidSlot::Error => SlotLostPolicy::Halt,
        OnInvalidSlot::Resync => SlotLostPolicy::Resync,
    };
    let config = ReplicationConfig::new(source, publication)
        .slot_name(args.slot)
        .on_slot_lost(on_slot_lost)
        .read_only(!args.allow_local_writes)
        .commit_delay(std::time::Duration::from_micros(args.commit_delay));
    if args.status_interval == 0 {
        return Err("--status-interval must be at least 1 second".into());
    }
    let listen = args.listen.plan(5433, Some(&args.data))?;
    Ok(Plan {
        data: args.data,
        config,
        schema: args.schema,
        listen,
        metrics: args.metrics,
        status_interval: std::time::Duration::from_secs(args.status_interval),
        engine: args.engine,
    })
}

/// The cache engine's settings unless `--set` says otherwise: PostgreSQL's
/// own default buffer pool, not the library's small one, because the
/// daemon runs one instance and replays changes on it (measured with a
/// 40 MB working set, publisher `synchronous_commit = off`: 21 µs of the
/// engine's CPU per applied transaction with 8MB, 14 µs with 128MB; see
/// BENCHMARKS.md).
const CACHE_SETTINGS: &[(&str, &str)] = &[("shared_buffers", "128MB")];

/// The cache's instance: reopened after an engine crash (the committed data
/// and the applied position are on disk; the replication reconnects).
fn cache_options(data: &std::path::Path, engine: &crate::cli::engine::EngineArgs) -> InstanceOptions {
    let options = InstanceOptions::persistent(data).name("cache").restart_policy(RestartPolicy::default());
    engine.apply(CACHE_SETTINGS, options)
}

fn config_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_CONFIG)
}

pub async fn run(args: SyncArgs) -> ExitCode {
    if args.nats.is_some() {
        return nats::run(args).await;
    }
    let mut plan = match plan(args) {
        Ok(plan) => plan,
        Err(e) => return config_error(e),
    };
    // The engine opens (~0.3 s, most of a small cache's start) while the
    // remote is checked; a directory created for nothing is removed below.
    let fresh = !plan.data.exists();
    let opening = Instance::start(cache_options(&plan.data, &plan.engine));
    let (remote, instance) = tokio::select! {
        both = async { tokio::join!(preflight::check(&plan.config, plan.schema.as_deref()), opening) } => both,
        () = stop_signal() => return ExitCode::SUCCESS,
    };
    let instance = match instance {
        Ok(instance) => instance,
        Err(e @ Error::DataDirInUse(_)) => {
            return config_error(format!("{e}; is another `pglite-cache sync` running?"));
        }
        Err(e) => {
            eprintln!("error: opening the cache: {e}");
            return ExitCode::FAILURE;
        }
    };
    let remote = match remote {
        Ok(remote) => remote,
        Err(e) => {
            let _ = instance.stop().await;
            if fresh {
                let _ = std::fs::remove_dir_all(&plan.data);
            }
            return config_error(e);
        }
    };
    if let Some(tables) = remote.schema_tables.clone()
        && let PublicationSpec::Owned { tables: t, .. } = &mut plan.config.publication
    {
        *t = tables;
    }

    let start = |instance: Instance, config: ReplicationConfig| Replication::start(instance, config);
    let code = serve_and_sync(&instance, plan, remote, start).await;
    if let Err(e) = instance.stop().await {
        eprintln!("error: closing the cache: {e}");
        return ExitCode::FAILURE;
    }
    code
}

async fn serve_and_sync(
    instance: &Instance,
    mut plan: Plan,
    remote: preflight::Remote,
    start: impl FnOnce(Instance, ReplicationConfig) -> Result<ReplicationHandle, ReplicationError>,
) -> ExitCode {
    // A cache that finished its initial copy before serves at once, also
    // while the remote is away.
    let consistent_at_start = matches!(Replication::recorded(instance).await, Ok(Some(s)) if s.phase == "streaming");
    let replication = match start(instance.clone(), plan.config.clone()) {
        Ok(handle) => Arc::new(handle),
        Err(e) => return config_error(e),
    };
    let status = replication.watch_status();
    let maintenance = plan.engine.maintain(instance);

    let listeners = match plan.listen.bind().await {
        Ok(listeners) => listeners,
        Err(e) => {
            let _ = replication.stop().await;
            return config_error(e);
        }
    };
    let server_config = plan.listen.config.clone().with_admission(admission(status.clone(), consistent_at_start));
    let (stop_server, server_stopped) = watch::channel(false);
    let server = tokio::spawn(server::serve(instance.clone(), listeners, server_config, async move {
        let mut stopped = server_stopped;
        let _ = stopped.wait_for(|s| *s).await;
    }));

    let counters = report::Counters::start(maintenance.as_ref().map(|m| m.stats()));
    let reporter = report::Reporter::new(&plan, &remote, counters.clone());
    let (stop_reports, reports_stopped) = watch::channel(false);
    let reports = tokio::spawn(reporter.run(status.clone(), reports_stopped));

    let halted = {
        let stop = stop_signal();
        let mut stop = std::pin::pin!(stop);
        // `pglite-cache resync` leaves its request in the data directory.
        let mut requests = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                () = &mut stop => break false,
                () = wait_halted(status.clone()) => break true,
                _ = requests.tick() => {
                    if let Some(tables) = crate::cli::resync::take_request(&plan.data) {
                        let done = if tables.is_empty() {
                            tracing::warn!("resync of every table requested");
                            replication.resync().await
                        } else {
                            tracing::warn!(?tables, "resync requested");
                            replication.resync_tables(&tables).await
                        };
                        if let Err(e) = done {
                            tracing::error!(error = %e, "resync request refused");
                        }
                    }
                }
            }
        }
    };
    // The server first: it closes clients idle in a transaction at once, so
    // the apply gets the engine to finish its last transaction.
    let _ = stop_server.send(true);
    let result = replication.stop().await;
    let _ = stop_reports.send(true);
    let _ = server.await;
    let _ = reports.await;
    status_file::write(&plan.data, &status_file::StatusReport::from_status(&status.borrow(), &plan.config, false));
    match result {
        Ok(()) if !halted => {
            eprintln!("stopped: everything received was applied and confirmed");
            ExitCode::SUCCESS
        }
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: replication halted: {}", e.message());
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

/// Admits clients once the cache is consistent; before that, says how far
/// the copy is.
fn admission(status: watch::Receiver<Status>, consistent_at_start: bool) -> Admission {
    let seen_streaming = Arc::new(std::sync::atomic::AtomicBool::new(consistent_at_start));
    Admission::new(move || {
        use std::sync::atomic::Ordering;
        let s = status.borrow();
        if seen_streaming.load(Ordering::Relaxed) || s.phase == Phase::Streaming {
            seen_streaming.store(true, Ordering::Relaxed);
            return Ok(());
        }
        let done = s.tables.iter().filter(|t| t.state == pglite_cache::replication::TableState::Ready).count();
        let rows: u64 = s.tables.iter().map(|t| t.rows_copied).sum();
        Err(format!(
            "the cache is not consistent yet: initial copy in progress ({done} of {} tables done, {rows} rows copied)",
            s.tables.len()
        ))
    })
}

/// Returns once replication halted or stopped. Polled (every
/// [`report::PHASE_POLL`]) rather than woken by each status change, which
/// comes with every applied transaction.
async fn wait_halted(status: watch::Receiver<Status>) {
    let mut tick = tokio::time::interval(report::PHASE_POLL);
    loop {
        tick.tick().await;
        if matches!(status.borrow().phase, Phase::Halted { .. } | Phase::Stopped) || status.has_changed().is_err() {
            return;
        }
    }
}
