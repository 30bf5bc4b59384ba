//! Command-line parsing and dispatch.

mod decommission;
mod demo;
mod engine;
mod generate;
mod listen;
pub mod logs;
mod metrics;
mod password;
mod publish;
mod query;
mod resync;
mod serve;
mod source;
mod status;
mod status_file;
mod sync;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Embedded PGlite databases, kept in sync with a remote PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "pglite-cache", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format on stderr (filter with RUST_LOG, e.g. RUST_LOG=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PGLITE_CACHE_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Cli {
    /// The log filter when `RUST_LOG` is not set: long-running commands
    /// report progress at `info`, one-shot commands only warnings.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Sync(_) | Command::Serve(_) | Command::Publish(_) => "info",
            _ => "warn",
        }
    }

    /// Whether the command runs on a single-threaded async runtime. `sync`
    /// and `serve` do: their async work (decoding the stream, the wire
    /// server's framing) is light next to the engine, which has a thread of
    /// its own, and every hop between runtime threads is a thread wake-up:
    /// with the default multi-threaded runtime a small replicated
    /// transaction crossed threads ~6 times and the runtime's threads used
    /// ~70 µs of CPU per transaction (BENCHMARKS.md, issue 10), and a pgbench
    /// TPC-B transaction cost ~30 context switches instead of ~7 (issue 8).
    pub fn single_threaded(&self) -> bool {
        matches!(self.command, Command::Sync(_) | Command::Serve(_))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run SQL against an instance (in-memory unless --data) and print the results.
    Query {
        /// Persistent data directory (created if missing).
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Print one JSON object per statement instead of tables.
        #[arg(long)]
        json: bool,
        /// SQL to run, in order; each argument may hold several statements.
        #[arg(required = true, value_name = "SQL")]
        sql: Vec<String>,
    },
    /// Serve an instance over the PostgreSQL wire protocol until SIGINT/SIGTERM.
    Serve(serve::ServeArgs),
    /// Keep a local cache of a remote database in sync and serve it.
    Sync(sync::SyncArgs),
    /// Own one slot on the remote and fan its changes out to caches through NATS JetStream.
    Publish(publish::PublishArgs),
    /// Run the whole job on a throwaway local PostgreSQL: sync, live writes, read-your-writes, checks.
    Demo,
    /// Show a cache's phase, tables, position and lag.
    Status(status::StatusArgs),
    /// Drop a cache's slot (and owned publication) on the remote and its local bookkeeping.
    Decommission(decommission::DecommissionArgs),
    /// Copy a cache's tables again (all, from a new slot, or --table T) while the old copies stay readable.
    Resync(resync::ResyncArgs),
    /// Print the shell completion script, e.g. `pglite-cache completions bash > /etc/bash_completion.d/pglite-cache`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (or write all pages with --dir), e.g. `pglite-cache man --dir /usr/local/share/man/man1`.
    Man(generate::ManArgs),
}

/// Exit status for a database error (bad usage exits with 2, as clap does).
pub const EXIT_DB_ERROR: u8 = 1;

/// Runs the parsed command and returns the process exit status.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Query { data, json, sql } => query::run(data, json, &sql).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Sync(args) => sync::run(args).await,
        Command::Publish(args) => publish::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Demo => demo::run().await,
        Command::Decommission(args) => decommission::run(args).await,
        Command::Resync(args) => resync::run(args).await,
        Command::Completions { shell } => generate::completions(shell),
        Command::Man(args) => generate::man(args),
    }
}
