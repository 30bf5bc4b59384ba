//! The wire server: an instance served over the PostgreSQL protocol to many
//! clients at once (`psql`, `tokio-postgres`, `sqlx`, ORMs, GUI tools).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use pglite_cache::{Instance, InstanceOptions};
//! use pglite_cache::server::{self, Listener, ServerConfig};
//!
//! let db = Instance::start(InstanceOptions::in_memory()).await.unwrap();
//! let listeners = vec![
//!     Listener::bind_unix(std::path::Path::new("/tmp/pglite"), 5432)?,
//!     Listener::bind_tcp("127.0.0.1:0").await?,
//! ];
//! server::serve(db.clone(), listeners, ServerConfig::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```
//!
//! # How many clients share one backend
//!
//! PGlite is a single backend: one session, one transaction at a time. Each
//! client connection gets a [`RawSession`](crate::RawSession) on the instance;
//! a connection holds the engine from the start of a transaction (explicit,
//! or the implicit one of an extended-protocol batch) until the engine is
//! idle again, so an extended-protocol batch up to its `Sync` is never split
//! and transactions never interleave. Waiting connections are served in
//! arrival order; only `Parse`/`Describe`/`Close` of a connection outside a
//! transaction run beside another's open transaction (in a savepoint). A
//! connection that disconnects, breaks the protocol, idles in a transaction
//! longer than [`ServerConfig::idle_in_transaction_timeout`], stops reading
//! ([`ServerConfig::write_timeout`]) or is closed at shutdown has its
//! transaction rolled back; the others go on. A statement that waits longer
//! than [`ServerConfig::queue_wait_timeout`] fails with `57014`.
//!
//! # What is isolated between clients, and what is not
//!
//! Isolated: prepared statements and portals, named and unnamed (renamed per
//! connection, closed when it leaves; `DEALLOCATE ALL`/`DISCARD ALL` drop
//! only the client's own), session
//! settings (`SET`, `RESET`, `set_config`, `SET ROLE`, startup settings: put
//! in force only while the connection holds the engine), transactions,
//! errors, notices, COPY, and `LISTEN`/`NOTIFY` (notifications are routed to
//! the listening connections).
//!
//! Not isolated (one backend underneath): SQL-level `PREPARE` and cursor
//! names (shared by name, closed when their client leaves), temporary
//! tables, advisory locks, `pg_backend_pid()`, settings changed inside
//! functions without `SET`/`set_config` in the client's own text.
//! `SET SESSION AUTHORIZATION` is reset at the end of the client's busy period.
//!
//! `CancelRequest` withdraws a statement of that connection while it waits
//! for the engine; one the engine has started runs to the end (PGlite cannot
//! interrupt it).
//!
//! `docs/wire-server.md` has the details (COPY FROM STDIN, limits, shutdown).

mod cancel;
mod config;
mod connection;
mod frame;
mod listener;
mod names;
mod notify;
mod scram;
mod settings;
mod sql_text;
mod startup;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::future::select_all;
use rand::Rng;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use config::{Admission, ServerConfig};
pub use listener::Listener;
pub use scram::{InvalidVerifier, ScramVerifier};

use crate::Instance;
// Backend messages are encoded and walked in one place for the whole crate.
use crate::protocol::backend;
use connection::Connection;
use listener::ClientStreamObj;
use settings::SessionSettings;
use startup::{Greeting, Startup};

/// Connection ids, unique in the process (so also per instance, across
/// restarts of `serve` on the same instance): statement names and cancel keys
/// derive from them.
static NEXT_CONNECTION_ID: AtomicU32 = AtomicU32::new(1);

/// A client that does not finish its startup in this time is dropped.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Parameters reported to clients at startup (`ParameterStatus`), with the
/// engine's values.
const REPORTED: &[&str] = &[
    "server_version",
    "server_encoding",
    "client_encoding",
    "application_name",
    "default_transaction_read_only",
    "in_hot_standby",
    "is_superuser",
    "session_authorization",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "integer_datetimes",
    "standard_conforming_strings",
    "scram_iterations",
];

/// Serves `instance` on `listeners` until `shutdown` completes, then stops
/// accepting, lets busy connections finish for up to
/// [`ServerConfig::shutdown_timeout`], and closes the rest (idle ones at
/// once, with `57P01 terminating connection due to administrator command`).
///
/// The instance stays usable through its handle meanwhile and afterwards;
/// the server does not stop it. Errors: no listeners, or a failure to read
/// the engine's parameters at start.
pub async fn serve(
    instance: Instance,
    listeners: Vec<Listener>,
    config: ServerConfig,
    shutdown: impl Future,
) -> io::Result<()> {
    if listeners.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no listener to serve on"));
    }
    let parameters = Arc::new(server_parameters(&instance).await?);
    let config = Arc::new(config);
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let hub = Arc::new(notify::Hub::default());
    let cancels = Arc::new(cancel::Cancels::default());
    let mut tasks = JoinSet::new();

    let accept = async {
        loop {
            let permit = limit.clone().acquire_owned().await.expect("the semaphore is never closed");
            let accepts = listeners.iter().map(|l| Box::pin(async move { (l.accept().await, l.is_trusted()) }));
            let ((accepted, trusted), _, _) = select_all(accepts).await;
            while tasks.try_join_next().is_some() {}
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
            let client = Client {
                instance: instance.clone(),
                config: config.clone(),
                parameters: parameters.clone(),
                hub: hub.clone(),
                cancels: cancels.clone(),
                id,
                trusted,
            };
            let stop = stop_rx.clone();
            tasks.spawn(async move {
                client.serve(stream, stop).await;
                drop(permit);
            });
        }
    };
    tokio::select! {
        () = accept => {}
        _ = shutdown => {}
    }
    drop(listeners); // stop accepting; Unix socket files are removed
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(config.shutdown_timeout, drain).await.is_err() {
        tracing::warn!(connections = tasks.len(), "shutdown timeout: closing busy connections");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    Ok(())
}

/// What a connection task needs.
struct Client {
    instance: Instance,
    config: Arc<ServerConfig>,
    parameters: Arc<Vec<(String, String)>>,
    hub: Arc<notify::Hub>,
    cancels: Arc<cancel::Cancels>,
    id: u32,
    trusted: bool,
}

impl Client {
    async fn serve(self, mut stream: Box<dyn ClientStreamObj>, stop: watch::Receiver<bool>) {
        let mut key = [0u8; 4];
        rand::rng().fill_bytes(&mut key);
        let greeting = Greeting {
            password: if self.trusted { None } else { self.config.password.as_ref() },
            admission: self.config.admission.as_ref(),
            parameters: &self.parameters,
            pid: self.id as i32,
            key: i32::from_be_bytes(key),
        };
        let startup = match tokio::time::timeout(STARTUP_TIMEOUT, startup::handshake(&mut stream, &greeting)).await {
            Ok(Ok(startup)) => startup,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "startup failed");
                return;
            }
            Err(_) => {
                tracing::debug!("startup timed out");
                return;
            }
        };
        match startup {
            Startup::Session(params) => {
                tracing::debug!(id = self.id, user = %params.user, database = %params.database, "client connected");
                let settings = SessionSettings::from_startup(&params.settings, &self.parameters);
                let session = self.instance.raw_session();
                let pid = self.id as i32;
                let cancel = self.cancels.register(pid, greeting.key);
                Connection::new(stream, self.id, session, settings, self.config, self.hub, cancel).run(stop).await;
                self.cancels.unregister(pid);
                tracing::debug!(id = self.id, "client disconnected");
            }
            Startup::Cancel { pid, key } => {
                let found = self.cancels.cancel(pid, key);
                tracing::debug!(target_connection = pid, found, "cancel request");
            }
            Startup::Closed => {}
        }
    }
}

/// The engine's values of the reported parameters.
async fn server_parameters(instance: &Instance) -> io::Result<Vec<(String, String)>> {
    let columns: Vec<String> =
        REPORTED.iter().map(|name| format!("pg_catalog.current_setting('{name}', true)")).collect();
    let result = instance
        .query(&format!("SELECT {}", columns.join(", ")), &[])
        .await
        .map_err(|e| io::Error::other(format!("reading server parameters: {e}")))?;
    let row = result.rows.first().ok_or_else(|| io::Error::other("no server parameters"))?;
    Ok(REPORTED
        .iter()
        .enumerate()
        .filter_map(|(i, name)| row.get::<Option<String>>(i).map(|value| (name.to_string(), value)))
        .collect())
}
