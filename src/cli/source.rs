//! `--source` / `--source-file`: the remote, resolved as libpq resolves it.

use std::path::PathBuf;

use pglite_cache::replication::SourceConfig;
use pglite_cache::replication::conninfo::{self, PasswordSource};

/// Raw source flags, shared by `sync` and `decommission`. One of them is
/// required unless `sync --nats` (`--source ''` takes everything from the
/// PG* variables).
#[derive(Debug, Clone, clap::Args)]
#[group(multiple = false)]
pub struct SourceArgs {
    /// The remote: `postgres://user@host:port/db` or `host=... dbname=...`,
    /// without the password (from PGPASSWORD or ~/.pgpass, as in libpq).
    /// PGHOST, PGPORT, PGUSER, PGDATABASE, PGSSLMODE, PGSERVICE... fill in
    /// what it leaves out (`--source ''`: all of it).
    #[arg(long, value_name = "CONNINFO", env = "PGLITE_CACHE_SOURCE", hide_env_values = true)]
    source: Option<String>,
    /// A file holding the connection string (which may include the password).
    #[arg(long, value_name = "FILE", env = "PGLITE_CACHE_SOURCE_FILE")]
    source_file: Option<PathBuf>,
}

impl SourceArgs {
    /// Resolves the source against the environment, the service file and
    /// the password file. Errors never include the password.
    pub fn resolve(&self) -> Result<SourceConfig, String> {
        let conninfo = match (&self.source, &self.source_file) {
            (Some(source), _) => source.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| format!("--source-file {}: {e}", file.display()))?
                .trim()
                .to_owned(),
            (None, None) => return Err("--source or --source-file is required".into()),
        };
        let flag = if self.source_file.is_some() { "--source-file" } else { "--source" };
        let resolved = conninfo::resolve_from_process(&conninfo).map_err(|e| format!("{flag}: {e}"))?;
        for warning in &resolved.warnings {
            tracing::warn!("{warning}");
        }
        if self.source.is_some() && resolved.password_source == PasswordSource::ConnectionString {
            tracing::warn!(
                "--source holds a password, which other users of this machine can see (ps); \
                 use PGPASSWORD, ~/.pgpass or --source-file instead"
            );
        }
        tracing::debug!(password_from = %resolved.password_source, "remote connection settings resolved");
        resolved.source_config().map_err(|e| format!("{flag}: {e}"))
    }
}
