//! `pglite-cache sync --nats`: a cache fed by a fan-out stream. A new data
//! directory starts from the newest snapshot (no query to the remote); a
//! cache that was offline past the stream's retention starts again from a
//! newer one. Serving, 57P03 until consistent, status and metrics are those
//! of `sync --source`.

use std::process::ExitCode;
use std::time::Duration;

use pglite_cache::replication::error::backoff;
use pglite_cache::replication::stream::{self, StreamConfig, StreamReplication};
use pglite_cache::replication::{ErrorKind, ReplicationError};
use pglite_cache::{Error, Instance, InstanceOptions};

use super::{Plan, SyncArgs, config_error, preflight, serve_and_sync};
use crate::cli::listen::stop_signal;

pub(super) async fn run(args: SyncArgs) -> ExitCode {
    let config = StreamConfig::new(args.nats.clone().unwrap_or_default(), args.stream.clone().unwrap_or_default());
    if let Err(e) = config.validate() {
        return config_error(format!("--stream: {}", e.message()));
    }
    if args.allow_local_writes {
        return config_error("--allow-local-writes is not available with --nats (the snapshot's tables are read-only)");
    }
    if args.status_interval == 0 {
        return config_error("--status-interval must be at least 1 second");
    }
    let apply = match stream::apply_config(&config) {
        Ok(apply) => apply,
        Err(e) => return config_error(e),
    };
    let listen = match args.listen.plan(5433, Some(&args.data)) {
        Ok(listen) => listen,
        Err(e) => return config_error(e),
    };
    let plan = Plan {
        data: args.data,
        config: apply,
        schema: None,
        listen,
        metrics: args.metrics,
        status_interval: Duration::from_secs(args.status_interval),
        engine: args.engine,
    };
    // NATS away or no snapshot yet: wait for them, as `sync --source` waits for the remote.
    let mut attempt = 0;
    loop {
        let prepared = tokio::select! {
            prepared = prepare(&config, &plan.data) => prepared,
            () = stop_signal() => return ExitCode::SUCCESS,
        };
        match prepared {
            Ok(()) => break,
            Err(e) if e.kind() == ErrorKind::Transient => {
                let delay = backoff(attempt);
                attempt += 1;
                tracing::warn!(error = %e, ?delay, "cannot start the cache from the stream yet; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop_signal() => return ExitCode::SUCCESS,
                }
            }
            Err(e) => return config_error(e),
        }
    }
    let instance = match Instance::start(super::cache_options(&plan.data, &plan.engine)).await {
        Ok(instance) => instance,
        Err(e @ Error::DataDirInUse(_)) => {
            return config_error(format!("{e}; is another `pglite-cache sync` running?"));
        }
        Err(e) => {
            eprintln!("error: opening the cache: {e}");
            return ExitCode::FAILURE;
        }
    };
    let start = move |instance: Instance, _| StreamReplication::start(instance, config);
    let code = serve_and_sync(&instance, plan, preflight::Remote::default(), start).await;
    if let Err(e) = instance.stop().await {
        eprintln!("error: closing the cache: {e}");
        return ExitCode::FAILURE;
    }
    code
}

/// A new directory gets the newest snapshot; an existing cache whose next
/// records the stream no longer holds is replaced by it.
async fn prepare(config: &StreamConfig, data: &std::path::Path) -> Result<(), ReplicationError> {
    if let Some(snapshot) = stream::bootstrap(config, data).await? {
        eprintln!(
            "cache restored from snapshot {} ({} bytes, remote LSN {}, stream sequence {})",
            snapshot.name, snapshot.size, snapshot.applied_lsn, snapshot.resume_seq
        );
        return Ok(());
    }
    let instance = Instance::start(InstanceOptions::persistent(data).name("cache")).await?;
    let covered = stream::still_covered(config, &instance).await;
    instance.stop().await?;
    if !covered? {
        eprintln!(
            "the stream no longer holds what this cache needs (offline past retention); starting again from the newest snapshot"
        );
        let snapshot = stream::rebootstrap(config, data).await?;
        eprintln!("cache restored from snapshot {} (stream sequence {})", snapshot.name, snapshot.resume_seq);
    }
    Ok(())
}
