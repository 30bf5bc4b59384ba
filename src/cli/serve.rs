//! `pglite-cache serve`: serve one instance over the PostgreSQL wire protocol.

use std::path::PathBuf;
use std::process::ExitCode;

use pglite_cache::server;
use pglite_cache::{Instance, InstanceOptions, RestartPolicy};

use super::EXIT_DB_ERROR;
use super::listen::{ListenArgs, stop_signal};

/// Raw `serve` flags.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Persistent data directory (created if missing); in-memory if absent.
    #[arg(long, value_name = "DIR", env = "PGLITE_CACHE_DATA")]
    data: Option<PathBuf>,
    #[command(flatten)]
    listen: ListenArgs,
    #[command(flatten)]
    engine: super::engine::EngineArgs,
}

pub async fn run(args: ServeArgs) -> ExitCode {
    let mut plan = match args.listen.plan(5432, args.data.as_deref()) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Reopened after an engine crash, with what was committed.
    let options = args
        .data
        .map_or_else(InstanceOptions::in_memory, InstanceOptions::persistent)
        .restart_policy(RestartPolicy::default());
    let options = args.engine.apply(&[], options);
    let db = match Instance::start(options).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_DB_ERROR);
        }
    };
    let listeners = match plan.bind().await {
        Ok(listeners) => listeners,
        Err(e) => {
            eprintln!("error: {e}");
            let _ = db.stop().await;
            return ExitCode::from(EXIT_DB_ERROR);
        }
    };
    let maintenance = args.engine.maintain(&db);
    let served = server::serve(db.clone(), listeners, plan.config, stop_signal()).await;
    drop(maintenance);
    let stopped = db.stop().await;
    match (served, stopped) {
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
        (Err(e), _) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_DB_ERROR)
        }
        (_, Err(e)) => {
            eprintln!("error: stopping the instance: {e}");
            ExitCode::from(EXIT_DB_ERROR)
        }
    }
}
