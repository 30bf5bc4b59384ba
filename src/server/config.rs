//! How a server behaves: limits, password, shutdown grace period.

use std::sync::Arc;
use std::time::Duration;

use super::scram::ScramVerifier;

/// Settings of a wire server. Build with [`ServerConfig::default`] and the
/// `with_*` methods.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Largest frontend message accepted (bigger ones close the connection
    /// with a protocol error before the body is read).
    pub max_message_size: usize,
    /// Largest `COPY ... FROM STDIN` data accepted (default 256 MiB): the
    /// engine needs the whole COPY in one call, so the data is held in memory
    /// until `CopyDone`. Bigger COPYs fail with an error; the connection
    /// survives. Measured: a 1,000 MB COPY works (14 s, 3.2 GB peak RSS), so
    /// the limit is about memory, not the engine.
    pub max_copy_size: usize,
    /// After shutdown starts, how long busy connections may go on before
    /// they are closed (their transactions roll back).
    pub shutdown_timeout: Duration,
    /// Password required on TCP connections (SCRAM-SHA-256). Unix-socket
    /// connections are trusted: their directory is owner-only.
    pub password: Option<ScramVerifier>,
    /// Decides whether a new connection is admitted (see [`Admission`]).
    pub admission: Option<Admission>,
    /// A client that holds the engine (inside a transaction, or an
    /// extended-protocol batch not yet synced) and sends nothing for this long
    /// is disconnected with `FATAL 25P03` and its transaction rolled back,
    /// like PostgreSQL's `idle_in_transaction_session_timeout`. Default 30 s:
    /// while it idles every other client and the replication apply wait, so
    /// PostgreSQL's default (off) does not fit a shared backend; 30 s leaves
    /// a person in `psql` time between the statements of a transaction and
    /// stays below the 60 s default `wal_sender_timeout` of a remote whose
    /// changes the apply must take in. `None` disables it.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// How long a statement may wait for the engine behind other clients
    /// before it is withdrawn and answered with `ERROR 57014` (like
    /// PgBouncer's `query_wait_timeout`, whose default of 120 s it shares).
    /// Applies to batches that end with `Sync` or a simple `Query` (what
    /// drivers send); `None` waits for ever.
    pub queue_wait_timeout: Option<Duration>,
    /// A client that holds the engine and takes no bytes of its reply for
    /// this long is disconnected (its transaction rolled back). Default 30 s.
    pub write_timeout: Option<Duration>,
}

/// Decides, for each new connection, whether it is admitted now. A refusal
/// carries a message and reaches the client as a `FATAL` error with SQLSTATE
/// `57P03` (cannot connect now), as PostgreSQL does while it starts up; the
/// `sync` daemon uses it until the initial copy is consistent.
#[derive(Clone)]
pub struct Admission(Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl Admission {
    /// An admission check; `Err(message)` refuses the connection.
    pub fn new(check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Admission {
        Admission(Arc::new(check))
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        (self.0)()
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admission(..)")
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            max_message_size: 1 << 30,
            max_copy_size: 256 << 20,
            shutdown_timeout: Duration::from_secs(10),
            password: None,
            admission: None,
            idle_in_transaction_timeout: Some(Duration::from_secs(30)),
            queue_wait_timeout: Some(Duration::from_secs(120)),
            write_timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl ServerConfig {
    /// Caps the number of connections served at once.
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Caps the size of one frontend message.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Caps the data of one `COPY ... FROM STDIN`.
    pub fn with_max_copy_size(mut self, bytes: usize) -> Self {
        self.max_copy_size = bytes;
        self
    }

    /// Sets the grace period of a shutdown.
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Requires this password (SCRAM-SHA-256) on TCP connections.
    pub fn with_password(mut self, password: &str) -> Self {
        self.password = Some(ScramVerifier::from_password(password));
        self
    }

    /// Admits new connections only while `admission` says so.
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = Some(admission);
        self
    }

    /// Sets (or with `None` disables) the idle-in-transaction timeout.
    pub fn with_idle_in_transaction_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_in_transaction_timeout = timeout;
        self
    }

    /// Sets (or with `None` disables) the limit on waiting for the engine.
    pub fn with_queue_wait_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.queue_wait_timeout = timeout;
        self
    }

    /// Sets (or with `None` disables) the write timeout.
    pub fn with_write_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Requires a password given by its verifier
    /// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`).
    pub fn with_password_verifier(mut self, verifier: ScramVerifier) -> Self {
        self.password = Some(verifier);
        self
    }
}
