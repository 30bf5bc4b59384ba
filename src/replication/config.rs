//! What to replicate, and from where.
//!
//! The source is a `postgres://` URL or a libpq `key=value` string, read as
//! libpq reads it (see [`super::conninfo`], which also fills in what the
//! string leaves out from the environment, service and password files).
//!
//! TLS: `sslmode` `disable`, `prefer` (the default), `require` and
//! `verify-full` with `sslrootcert` (see `tls.rs`); authentication
//! trust, cleartext password, MD5 and SCRAM-SHA-256 (without channel
//! binding).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::Host;

use super::error::ReplicationError;
use super::tls::TlsMode;

/// The output format every remote connection uses (see [`SourceConfig::options`]).
pub const PINNED_OPTIONS: &str = "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3";

/// TCP keepalive: first probe after this much silence.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// TCP keepalive: between probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// TCP keepalive: unanswered probes before the connection is dead.
pub const KEEPALIVE_RETRIES: u32 = 3;

/// Where the remote is and how to log in.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    inner: tokio_postgres::Config,
    tls: TlsMode,
}

/// One address of the remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAddress {
    /// Host name or IP address and port.
    Tcp(String, u16),
    /// Unix socket directory and port (socket `<dir>/.s.PGSQL.<port>`).
    Unix(PathBuf, u16),
}

impl SourceConfig {
    /// The `tokio_postgres` config for ordinary (non-replication)
    /// connections: catalog queries and the snapshot copy. The output
    /// format is pinned ([`SourceConfig::options`]) and TCP keepalives
    /// detect a dead peer within about a minute.
    pub fn postgres_config(&self) -> tokio_postgres::Config {
        let mut config = self.inner.clone();
        config
            .options(self.options())
            .connect_timeout(self.connect_timeout())
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES);
        config
    }

    /// The server options of every remote connection: the output format
    /// pinned as PostgreSQL's own walreceiver does (values are parsed as
    /// ISO dates, `postgres` intervals and exact floats whatever the
    /// remote's defaults), then the source's own `options`.
    pub fn options(&self) -> String {
        match self.inner.get_options() {
            Some(own) if !own.trim().is_empty() => format!("{PINNED_OPTIONS} {own}"),
            _ => PINNED_OPTIONS.to_owned(),
        }
    }

    /// The user name (default `postgres`).
    pub fn user(&self) -> &str {
        self.inner.get_user().unwrap_or("postgres")
    }

    /// The password, if any.
    pub fn password(&self) -> Option<&[u8]> {
        self.inner.get_password()
    }

    /// The database name (default: the user name).
    pub fn dbname(&self) -> &str {
        self.inner.get_dbname().unwrap_or_else(|| self.user())
    }

    /// The addresses to try, in order.
    pub fn addresses(&self) -> Vec<SourceAddress> {
        let ports = self.inner.get_ports();
        let port_at = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let hosts = self.inner.get_hosts();
        if hosts.is_empty() {
            return vec![SourceAddress::Tcp("localhost".into(), port_at(0))];
        }
        hosts
            .iter()
            .enumerate()
            .map(|(i, host)| match host {
                Host::Tcp(name) => SourceAddress::Tcp(name.clone(), port_at(i)),
                Host::Unix(dir) => SourceAddress::Unix(dir.clone(), port_at(i)),
            })
            .collect()
    }

    /// How long to wait for a connection (default 10 s).
    pub fn connect_timeout(&self) -> Duration {
        self.inner.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10))
    }

    /// How TLS is used.
    pub fn tls(&self) -> &TlsMode {
        &self.tls
    }

    /// The TLS connector for ordinary connections (used as `sslmode` says).
    pub fn tls_connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, ReplicationError> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new((*self.tls.client_config()?).clone()))
    }

    /// Checks the options (the TLS configuration can be built).
    pub fn validate(&self) -> Result<(), ReplicationError> {
        self.tls.client_config().map(drop)
    }
}

impl FromStr for SourceConfig {
    type Err = ReplicationError;

    /// Parses the string alone; [`super::conninfo::resolve_from_process`]
    /// also consults the environment, service and password files.
    fn from_str(s: &str) -> Result<SourceConfig, ReplicationError> {
        super::conninfo::parse_source(s)
    }
}

impl SourceConfig {
    pub(crate) fn from_parts(inner: tokio_postgres::Config, tls: TlsMode) -> Result<SourceConfig, ReplicationError> {
        let config = SourceConfig { inner, tls };
        config.validate()?;
        Ok(config)
    }
}

/// What to replicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationSpec {
    /// An existing publication, managed by someone else.
    Existing(String),
    /// A publication this tool creates (if missing) and owns (drops it on
    /// decommission), over the given tables (`schema.table` or `table`).
    Owned {
        /// The publication's name.
        name: String,
        /// The tables in it.
        tables: Vec<String>,
    },
}

impl PublicationSpec {
    /// The publication's name.
    pub fn name(&self) -> &str {
        match self {
            PublicationSpec::Existing(name) | PublicationSpec::Owned { name, .. } => name,
        }
    }
}

/// What to do when the slot is gone (dropped, or invalidated by WAL
/// retention limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlotLostPolicy {
    /// Halt with an operator error (the default: a resync can be expensive).
    #[default]
    Halt,
    /// Drop the local copies and sync everything again from a new slot.
    Resync,
}

/// The default [`ReplicationConfig::commit_delay`] (measured in
/// BENCHMARKS.md, "Lag and CPU under sustained load").
pub const DEFAULT_COMMIT_DELAY: Duration = Duration::from_millis(1);

/// The longest [`ReplicationConfig::commit_delay`], as PostgreSQL's.
pub const MAX_COMMIT_DELAY: Duration = Duration::from_millis(100);

/// Everything [`crate::replication::Replication::start`] needs.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// The remote.
    pub source: SourceConfig,
    /// What to replicate.
    pub publication: PublicationSpec,
    /// The permanent logical slot (created on first start, reused after).
    pub slot_name: String,
    /// When the slot is lost.
    pub on_slot_lost: SlotLostPolicy,
    /// Replicated tables refuse local writes (default true).
    pub read_only: bool,
    /// How often to send a standby status update unasked (default 10 s; keep
    /// it well inside the remote's `wal_sender_timeout`, 60 s by default).
    pub status_interval: Duration,
    /// How many bytes of changes to buffer before a transaction is applied
    /// in pieces inside one open local transaction (default 8 MiB).
    pub max_buffered_bytes: usize,
    /// Rows per bulk-load batch size target in bytes for the initial copy
    /// (default 4 MiB).
    pub copy_batch_bytes: usize,
    /// Reconnect when nothing arrives from the remote for this long, like
    /// PostgreSQL's `wal_receiver_timeout` (default 60 s): after half of it
    /// without a message, a status update asks the remote for a reply, so
    /// an idle but healthy connection always answers in time.
    pub receive_timeout: Duration,
    /// How often to look for tables added to the publication while no
    /// change names one (default 5 min; a change to an unknown table
    /// triggers the look at once).
    pub publication_check_interval: Duration,
    /// Sync a persistent instance's data directory to disk before
    /// confirming a position to the remote (default true). Off, a power
    /// loss or kernel crash can lose transactions the remote will never
    /// send again.
    pub sync_before_confirm: bool,
    /// How long a received remote transaction may wait for others to join
    /// its local commit while the stream is busy, like PostgreSQL's
    /// `commit_delay` (default 1 ms). Busy: it arrived within one delay of
    /// the end of the previous local commit; a transaction arriving alone
    /// commits as soon as the stream has nothing more waiting. Under a
    /// steady stream of small transactions this merges several into one
    /// local commit, which costs less CPU per transaction, for at most
    /// this much more lag. Zero turns it off.
    pub commit_delay: Duration,
}

impl ReplicationConfig {
    /// A config with defaults: slot `pglite_cache`, read-only tables.
    pub fn new(source: SourceConfig, publication: PublicationSpec) -> ReplicationConfig {
        ReplicationConfig {
            source,
            publication,
            slot_name: "pglite_cache".into(),
            on_slot_lost: SlotLostPolicy::Halt,
            read_only: true,
            status_interval: Duration::from_secs(10),
            max_buffered_bytes: 8 << 20,
            copy_batch_bytes: 4 << 20,
            receive_timeout: Duration::from_secs(60),
            publication_check_interval: Duration::from_secs(300),
            sync_before_confirm: true,
            commit_delay: DEFAULT_COMMIT_DELAY,
        }
    }

    /// Sets the slot name.
    pub fn slot_name(mut self, name: impl Into<String>) -> Self {
        self.slot_name = name.into();
        self
    }

    /// Sets the slot-lost policy.
    pub fn on_slot_lost(mut self, policy: SlotLostPolicy) -> Self {
        self.on_slot_lost = policy;
        self
    }

    /// Allows local writes to replicated tables (they will be overwritten or
    /// conflict with later changes: for experiments only).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets the unasked status interval.
    pub fn status_interval(mut self, interval: Duration) -> Self {
        self.status_interval = interval;
        self
    }

    /// Sets how much of one remote transaction is buffered in memory.
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.max_buffered_bytes = bytes;
        self
    }

    /// Sets the receive deadline (the `receive_timeout` field).
    pub fn receive_timeout(mut self, timeout: Duration) -> Self {
        self.receive_timeout = timeout;
        self
    }

    /// Sets how often the publication is checked for added tables.
    pub fn publication_check_interval(mut self, interval: Duration) -> Self {
        self.publication_check_interval = interval;
        self
    }

    /// Sets whether positions are synced to disk before being confirmed.
    pub fn sync_before_confirm(mut self, sync: bool) -> Self {
        self.sync_before_confirm = sync;
        self
    }

    /// Sets the commit delay (the `commit_delay` field).
    pub fn commit_delay(mut self, delay: Duration) -> Self {
        self.commit_delay = delay;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ReplicationError> {
        self.source.validate()?;
        if self.commit_delay > MAX_COMMIT_DELAY {
            return Err(ReplicationError::needs_operator(
                format!("commit delay {:?} is too long", self.commit_delay),
                format!("use at most {MAX_COMMIT_DELAY:?} (PostgreSQL's commit_delay allows 100 ms)"),
            ));
        }
        if self.receive_timeout < Duration::from_secs(1) {
            return Err(ReplicationError::needs_operator(
                format!("receive timeout {:?} is too short", self.receive_timeout),
                "use at least 1 second (PostgreSQL's wal_receiver_timeout is 60 s)",
            ));
        }
        let ok_name = |s: &str| {
            !s.is_empty() && s.len() < 64 && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if !ok_name(&self.slot_name) {
            return Err(ReplicationError::needs_operator(
                format!("invalid slot name {:?}", self.slot_name),
                "slot names use lower-case letters, digits and underscores, at most 63 characters",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_key_value_strings() {
        let c: SourceConfig = "postgres://ada:s%40cret@db.example:6543/shop?sslmode=disable".parse().unwrap();
        assert_eq!(c.user(), "ada");
        assert_eq!(c.password(), Some(&b"s@cret"[..]));
        assert_eq!(c.dbname(), "shop");
        assert_eq!(c.addresses(), vec![SourceAddress::Tcp("db.example".into(), 6543)]);

        let c: SourceConfig = "host=/var/run/postgresql port=5433 user=app dbname=x".parse().unwrap();
        assert_eq!(c.addresses(), vec![SourceAddress::Unix("/var/run/postgresql".into(), 5433)]);

        let c: SourceConfig = "postgres://h/db?sslmode=require".parse().unwrap();
        assert_eq!(c.tls(), &TlsMode::Require);
        let c: SourceConfig = "host=h".parse().unwrap();
        assert_eq!(c.tls(), &TlsMode::Prefer);
        assert_eq!(c.options(), PINNED_OPTIONS);
        let c: SourceConfig = "host=h options='-c work_mem=8MB'".parse().unwrap();
        assert_eq!(c.options(), format!("{PINNED_OPTIONS} -c work_mem=8MB"));
        assert_eq!(c.postgres_config().get_options(), Some(c.options().as_str()));
        let e = "postgres://h/db?sslmode=verify-ca".parse::<SourceConfig>().unwrap_err();
        assert!(e.to_string().contains("sslmode"));
    }
}
