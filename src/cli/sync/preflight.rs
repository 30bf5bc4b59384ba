//! Checks of the remote before anything starts, so that a misconfiguration
//! gets one clear message (and exit status 2) instead of a retry loop.
//! An unreachable remote is not a misconfiguration: it is retried with
//! backoff until it answers or the daemon is stopped.

use std::collections::HashMap;
use std::time::Duration;

use pglite_cache::replication::{PublicationSpec, ReplicationConfig, error::backoff};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// What we learned about the remote.
#[derive(Debug, Clone, Default)]
pub struct Remote {
    /// The tables of `--schema`, resolved.
    pub schema_tables: Option<Vec<String>>,
    /// Estimated rows per table (`schema.table`), for progress bars.
    pub estimates: HashMap<String, u64>,
}

/// Connects (retrying while unreachable) and checks the prerequisites.
pub async fn check(config: &ReplicationConfig, schema: Option<&str>) -> Result<Remote, String> {
    let client = connect(config).await?;
    let wal_level: String = query_one(&client, "SHOW wal_level").await?;
    if wal_level != "logical" {
        return Err(format!(
            "the remote has wal_level = {wal_level}; logical replication needs wal_level = logical \
             (set it in postgresql.conf or with ALTER SYSTEM SET wal_level = logical, then restart the remote)"
        ));
    }
    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| format!("checking the role: {e}"))?;
    let (user, can_replicate): (String, bool) = (row.get(0), row.get(1));
    if !can_replicate {
        return Err(format!(
            "role {user} may not replicate; grant it with ALTER ROLE {user} REPLICATION (or use a role that has it)"
        ));
    }
    let mut remote = Remote::default();
    let tables: Vec<String> = match (&config.publication, schema) {
        (PublicationSpec::Existing(name), _) => {
            let rows = client
                .query("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1", &[name])
                .await
                .map_err(|e| format!("reading publication {name}: {e}"))?;
            let exists = client
                .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[name])
                .await
                .map_err(|e| format!("reading publication {name}: {e}"))?
                .is_some();
            if !exists {
                return Err(format!(
                    "publication {name:?} does not exist on the remote; create it (CREATE PUBLICATION {name} FOR TABLE ...) \
                     or pass --tables/--schema to let pglite-cache create one"
                ));
            }
            rows.iter().map(|r| r.get(0)).collect()
        }
        (PublicationSpec::Owned { .. }, Some(schema)) => {
            let rows = client
                .query(
                    "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables \
                     WHERE schemaname = $1 ORDER BY tablename",
                    &[&schema],
                )
                .await
                .map_err(|e| format!("listing schema {schema}: {e}"))?;
            if rows.is_empty() {
                return Err(format!("schema {schema:?} has no tables on the remote"));
            }
            let tables: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            remote.schema_tables = Some(tables.clone());
            tables
        }
        (PublicationSpec::Owned { tables, .. }, None) => {
            for table in tables {
                let found: Option<String> = client
                    .query_one("SELECT to_regclass($1)::text", &[table])
                    .await
                    .map_err(|e| format!("checking table {table}: {e}"))?
                    .get(0);
                if found.is_none() {
                    return Err(format!("table {table} does not exist on the remote"));
                }
            }
            tables.clone()
        }
    };
    // Keyed `schema.table` as the replication status names tables.
    for table in &tables {
        let row = client
            .query_opt(
                "SELECT n.nspname::text || '.' || c.relname::text, c.reltuples FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
                &[table],
            )
            .await
            .ok()
            .flatten();
        if let Some(row) = row {
            let (name, estimate): (String, f32) = (row.get(0), row.get(1));
            if estimate > 0.0 {
                remote.estimates.insert(name, estimate as u64);
            }
        }
    }
    Ok(remote)
}

async fn query_one(client: &Client, sql: &str) -> Result<String, String> {
    let rows = client.simple_query(sql).await.map_err(|e| format!("{sql}: {e}"))?;
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| format!("{sql}: no answer"))
}

/// Connects to the remote; retries with backoff while it is unreachable,
/// fails at once on what retrying cannot fix (authentication, no such
/// database).
async fn connect(config: &ReplicationConfig) -> Result<Client, String> {
    let mut attempt = 0;
    loop {
        let tls = config.source.tls_connector().map_err(|e| e.to_string())?;
        let pg_config = config.source.postgres_config();
        let connecting = pg_config.connect(tls);
        let Ok(connected) = tokio::time::timeout(config.source.connect_timeout(), connecting).await else {
            attempt += 1;
            let delay = backoff(attempt).min(Duration::from_secs(30));
            tracing::warn!(attempt, retry_in = ?delay, "remote accepted the connection but did not answer; retrying");
            tokio::time::sleep(delay).await;
            continue;
        };
        match connected {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return Ok(client);
            }
            Err(e) => {
                let permanent = e.code().is_some_and(|c| {
                    [
                        SqlState::INVALID_PASSWORD,
                        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                        SqlState::INVALID_CATALOG_NAME,
                        SqlState::INSUFFICIENT_PRIVILEGE,
                    ]
                    .contains(c)
                });
                if permanent {
                    return Err(format!("connecting to the remote: {}", db_message(&e)));
                }
                // The remote asked for a password and none was found: waiting will not bring one.
                if e.as_db_error().is_none() && db_message(&e).contains("password missing") {
                    return Err("connecting to the remote: it asks for a password and none was given; \
                         set PGPASSWORD, add it to ~/.pgpass (or PGPASSFILE), or use --source-file"
                        .into());
                }
                attempt += 1;
                let delay = backoff(attempt).min(Duration::from_secs(30));
                tracing::warn!(error = %db_message(&e), attempt, retry_in = ?delay, "remote unreachable; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            text
        }
    }
}
