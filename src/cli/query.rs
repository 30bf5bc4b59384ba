//! `pglite-cache query`: run SQL and print the results.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use pglite_cache::{Error, Instance, InstanceOptions};

use super::{EXIT_DB_ERROR, table};

pub async fn run(data: Option<PathBuf>, json: bool, sql: &[String]) -> ExitCode {
    let options = data.map_or_else(InstanceOptions::in_memory, InstanceOptions::persistent);
    let db = match Instance::start(options).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_DB_ERROR);
        }
    };
    let status = run_statements(&db, json, sql).await;
    if let Err(e) = db.stop().await {
        eprintln!("error: stopping the instance: {e}");
        return ExitCode::from(EXIT_DB_ERROR);
    }
    status
}

async fn run_statements(db: &Instance, json: bool, sql: &[String]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    for text in sql {
        match db.exec(text).await {
            Ok(results) => {
                for result in results.iter().filter(|r| !r.command.is_empty()) {
                    let written =
                        if json { writeln!(out, "{}", result.to_json()) } else { table::write(&mut out, result) };
                    if written.is_err() {
                        return ExitCode::SUCCESS; // stdout closed (e.g. piped into `head`)
                    }
                }
            }
            Err(e) => {
                let _ = out.flush();
                report(&e);
                return ExitCode::from(EXIT_DB_ERROR);
            }
        }
    }
    ExitCode::SUCCESS
}

/// Prints an error the way psql does: `ERROR:  42P01: relation ... does not exist`.
fn report(e: &Error) {
    match e.as_db_error() {
        Some(db) => {
            eprintln!("{}:  {}: {}", db.severity, db.code.code(), db.message);
            if let Some(detail) = &db.detail {
                eprintln!("DETAIL:  {detail}");
            }
            if let Some(hint) = &db.hint {
                eprintln!("HINT:  {hint}");
            }
        }
        None => eprintln!("error: {e}"),
    }
}
