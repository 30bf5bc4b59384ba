//! Command-line parsing and dispatch.

mod query;
mod serve;
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
}

/// Exit status for a database error (bad usage exits with 2, as clap does).
pub const EXIT_DB_ERROR: u8 = 1;

/// Runs the parsed command and returns the process exit status.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Query { data, json, sql } => query::run(data, json, &sql).await,
        Command::Serve(args) => serve::run(args).await,
    }
}
