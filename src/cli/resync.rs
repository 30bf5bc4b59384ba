//! `pglite-cache resync`: copy a cache's tables again (all of them from a
//! new slot, or the named ones from a snapshot taken now) while the old
//! copies stay readable until each new one is swapped in.
//!
//! With `pglite-cache sync` running on the directory (which holds it), the
//! request is left in a file there that the daemon picks up within a second;
//! otherwise it is recorded in the cache and the next `sync` carries it out.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use pglite_cache::replication::Replication;
use pglite_cache::{Error, Instance, InstanceOptions};

use super::sync::EXIT_CONFIG;

/// The request file a running daemon watches (one table per line; empty
/// for every table).
pub const REQUEST_FILE: &str = "pglite-cache.resync";

/// Raw `resync` flags.
#[derive(Debug, clap::Args)]
pub struct ResyncArgs {
    /// The cache's data directory.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Copy only these tables again (`schema.table` or `table`); default: every table, from a new slot.
    #[arg(long = "table", value_name = "T1,T2", value_delimiter = ',')]
    tables: Vec<String>,
}

pub async fn run(args: ResyncArgs) -> ExitCode {
    if !args.data.is_dir() {
        eprintln!("error: {} is not a cache's data directory", args.data.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    let what = if args.tables.is_empty() { "every table".to_owned() } else { args.tables.join(", ") };
    let instance = match Instance::start(InstanceOptions::persistent(&args.data)).await {
        Ok(instance) => instance,
        Err(Error::DataDirInUse(_)) => {
            return match write_request(&args.data, &args.tables) {
                Ok(()) => {
                    println!("resync of {what} requested: the running `pglite-cache sync` carries it out now");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: writing the request into {}: {e}", args.data.display());
                    ExitCode::FAILURE
                }
            };
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tables = (!args.tables.is_empty()).then_some(args.tables.as_slice());
    let code = match Replication::request_resync(&instance, tables).await {
        Ok(true) => {
            println!(
                "resync of {what} recorded: the next `pglite-cache sync --data {}` carries it out",
                args.data.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", e.message());
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
        Ok(false) => {
            eprintln!("error: no replication is recorded in this data directory");
            ExitCode::from(EXIT_CONFIG)
        }
    };
    let _ = instance.stop().await;
    code
}

fn write_request(data: &Path, tables: &[String]) -> std::io::Result<()> {
    let tmp = data.join(format!(".{REQUEST_FILE}.tmp"));
    let body: String = tables.iter().map(|t| format!("{t}\n")).collect();
    std::fs::write(&tmp, body)?;
    std::fs::rename(tmp, data.join(REQUEST_FILE))
}

/// Takes a pending request out of `data`: `Some(tables)` (empty: every
/// table).
pub fn take_request(data: &Path) -> Option<Vec<String>> {
    let path = data.join(REQUEST_FILE);
    let body = std::fs::read_to_string(&path).ok()?;
    std::fs::remove_file(&path).ok()?;
    Some(body.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
}
