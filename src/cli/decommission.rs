//! `pglite-cache decommission`: remove what a cache left on the remote (its
//! slot, and the publication it created) and its local bookkeeping.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use pglite_cache::replication::{PublicationSpec, Replication, ReplicationConfig, SourceConfig};
use pglite_cache::{Error, Instance, InstanceOptions};

use super::sync::EXIT_CONFIG;

/// Raw `decommission` flags.
#[derive(Debug, clap::Args)]
pub struct DecommissionArgs {
    #[command(flatten)]
    source: super::source::SourceArgs,
    /// The cache's data directory.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

pub async fn run(args: DecommissionArgs) -> ExitCode {
    let source: SourceConfig = match args.source.resolve() {
        Ok(source) => source,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let instance = match Instance::start(InstanceOptions::persistent(&args.data)).await {
        Ok(instance) => instance,
        Err(e @ Error::DataDirInUse(_)) => {
            eprintln!("error: {e}; stop the `pglite-cache sync` daemon first");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = decommission(&instance, source, args.yes).await;
    let _ = instance.stop().await;
    code
}

async fn decommission(instance: &Instance, source: SourceConfig, yes: bool) -> ExitCode {
    let stored = match Replication::recorded(instance).await {
        Ok(Some(stored)) => stored,
        Ok(None) | Err(_) => {
            eprintln!("error: no replication is recorded in this data directory");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let publication = if stored.owns_publication {
        PublicationSpec::Owned { name: stored.publication.clone(), tables: Vec::new() }
    } else {
        PublicationSpec::Existing(stored.publication.clone())
    };
    let drops = if stored.owns_publication {
        format!("replication slot {:?} and publication {:?}", stored.slot_name, stored.publication)
    } else {
        format!("replication slot {:?}", stored.slot_name)
    };
    if !yes
        && !confirm(&format!("Drop {drops} on the remote and this cache's bookkeeping? The copied tables stay. [y/N] "))
    {
        eprintln!("aborted");
        return ExitCode::FAILURE;
    }
    let config = ReplicationConfig::new(source, publication).slot_name(stored.slot_name);
    match Replication::decommission(instance, &config).await {
        Ok(()) => {
            println!("dropped {drops}; local bookkeeping removed (tables kept, now writable)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", e.message());
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

fn confirm(question: &str) -> bool {
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).is_ok() && matches!(answer.trim(), "y" | "Y" | "yes")
}
