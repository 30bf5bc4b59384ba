//! Embedded PGlite instances: a cloneable async handle in front of a worker
//! thread that owns the engine.

mod handoff;
mod options;
mod registry;
mod session;
mod side;
mod transaction;
mod worker;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};

pub use options::{DEFAULT_SETTINGS, InstanceOptions, RestartPolicy, Storage};
pub use registry::Registry;
pub use session::RawSession;
pub use transaction::Transaction;

use crate::error::{Error, Result};
use crate::params::{Param, ToParam};
use crate::protocol;
use crate::rows::QueryResult;
use worker::{Command, Job, Output, Shared, State};

/// How long [`Instance::health_check`] waits for an answer.
pub const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle to a running instance. Cheap to clone; every clone talks to the
/// same engine. Calls from many tasks are served one at a time in arrival
/// order; separate instances run in parallel on their own threads.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), pglite_cache::Error> {
/// use pglite_cache::{Instance, InstanceOptions};
///
/// let db = Instance::start(InstanceOptions::in_memory()).await?;
/// db.exec("CREATE TABLE users (id int PRIMARY KEY, name text)").await?;
/// db.query("INSERT INTO users VALUES ($1, $2)", &[&1, &"Ada"]).await?;
/// let rows = db.query("SELECT name FROM users WHERE id = $1", &[&1]).await?.rows;
/// assert_eq!(rows[0].get::<String>("name"), "Ada");
/// db.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Instance {
    tx: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

/// The answer of a successful [`Instance::health_check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// How long `SELECT 1` took, queueing included.
    pub latency: Duration,
}

// Handles are shared across tasks and threads (checked at compile time).
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Instance>();
    assert_send_sync::<Transaction>();
};

impl Instance {
    /// Starts an instance and returns once it answers queries, or with the
    /// startup error ([`Error::DataDirInUse`] when another instance holds
    /// the directory).
    pub async fn start(options: InstanceOptions) -> Result<Instance> {
        let (tx, shared) = worker::spawn(options).await?;
        Ok(Instance { tx, shared })
    }

    /// The instance's name, or its directory, or `memory`.
    pub fn label(&self) -> &str {
        &self.shared.label
    }

    /// Runs one statement with positional parameters (`$1`, `$2`, ...).
    pub async fn query(&self, sql: &str, params: &[&(dyn ToParam + Sync)]) -> Result<QueryResult> {
        self.query_params(sql, params.iter().map(|p| p.to_param()).collect()).await
    }

    /// [`query`](Self::query) with owned parameters, e.g. from [`crate::params!`].
    pub async fn query_params(&self, sql: &str, params: Vec<Param>) -> Result<QueryResult> {
        let bytes = encode_batch(&[(sql, params.as_slice())])?;
        single(self.call(Job::Protocol(bytes)).await?)
    }

    /// Runs a script of one or more statements without parameters, returning
    /// each statement's result. The statements run in one implicit
    /// transaction unless the script manages its own.
    pub async fn exec(&self, sql: &str) -> Result<Vec<QueryResult>> {
        let mut bytes = BytesMut::new();
        protocol::simple_query(sql, &mut bytes)?;
        results(self.call(Job::Protocol(bytes)).await?)
    }

    /// Runs statements atomically: all of them commit, or none does and the
    /// first error is returned. One round trip to the engine.
    pub async fn transaction<S: AsRef<str>>(&self, statements: &[(S, Vec<Param>)]) -> Result<Vec<QueryResult>> {
        let statements: Vec<(&str, &[Param])> =
            statements.iter().map(|(sql, params)| (sql.as_ref(), params.as_slice())).collect();
        let bytes = encode_batch(&statements)?;
        results(self.call(Job::Protocol(bytes)).await?)
    }

    /// Bulk load: runs `sql`, a `COPY ... FROM '/dev/blob'` statement (or a
    /// script containing one), with `data` as the contents of `/dev/blob`.
    /// `data` is in the format the `COPY` names (text by default). Returns
    /// the number of rows copied.
    pub async fn copy_in(&self, sql: &str, data: Vec<u8>) -> Result<u64> {
        let output = self.call(Job::CopyIn { sql: sql.to_owned(), data }).await?;
        Ok(results(output)?.iter().map(QueryResult::rows_affected).sum())
    }

    /// Opens an interactive transaction. Until it commits, rolls back or is
    /// dropped (which rolls back), it has the instance to itself: other callers
    /// wait, nothing interleaves. Don't await other calls on this same
    /// instance while holding it: they would wait for it.
    pub async fn begin(&self) -> Result<Transaction> {
        let (reply, lease) = oneshot::channel();
        self.tx.send(Command::Lease(reply)).map_err(|_| self.shared.closed_error())?;
        let lease = lease.await.map_err(|_| self.shared.closed_error())?;
        Transaction::begin(lease, self.shared.clone()).await
    }

    /// Answers quickly whether the instance serves queries: immediately when
    /// it is stopped or crashed, within [`HEALTH_CHECK_TIMEOUT`] otherwise.
    pub async fn health_check(&self) -> Result<Health> {
        match self.shared.state() {
            State::Running => {}
            State::Restarting => {
                return Err(Error::Usage(format!("instance {} is restarting after a crash", self.label())));
            }
            State::Stopped | State::Crashed(_) => return Err(self.shared.closed_error()),
        }
        let started = Instant::now();
        match tokio::time::timeout(HEALTH_CHECK_TIMEOUT, self.query("SELECT 1", &[])).await {
            Ok(result) => result.map(|_| Health { latency: started.elapsed() }),
            Err(_) => Err(Error::Timeout(self.label().into(), HEALTH_CHECK_TIMEOUT)),
        }
    }

    /// Stops the instance gracefully: waits for queued calls, shuts the engine
    /// down (persistent data is flushed, the directory unlocked). Later calls
    /// get [`Error::Stopped`]. Stopping twice is not an error.
    pub async fn stop(&self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Command::Stop(reply)).is_err() {
            return match self.shared.state() {
                State::Crashed(_) => Err(self.shared.closed_error()),
                _ => Ok(()),
            };
        }
        // A dropped reply means another `stop` (or a crash) won the race.
        done.await.unwrap_or(Ok(()))
    }

    /// A raw wire-protocol session on this instance (what the wire server
    /// uses for each client connection).
    pub fn raw_session(&self) -> RawSession {
        RawSession::new(self.clone())
    }

    /// The data directory of a persistent instance.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.shared.data_dir.as_deref()
    }

    /// Makes everything committed so far durable: `syncfs(2)` on the data
    /// directory's filesystem. The engine writes each commit's WAL to the
    /// host file before the commit returns, but never `fsync`s it (see
    /// [`InstanceOptions::persistent`]). A no-op for in-memory instances.
    pub async fn sync_to_disk(&self) -> std::io::Result<()> {
        let Some(dir) = self.shared.data_dir.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            let dir = std::fs::File::open(&dir)?;
            rustix::fs::syncfs(&dir).map_err(std::io::Error::from)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// True once the instance is stopped or crashed for good.
    pub fn is_closed(&self) -> bool {
        matches!(self.shared.state(), State::Stopped | State::Crashed(_))
    }

    /// Test hook: makes the worker panic, as a bug or a WebAssembly trap in the
    /// engine would, to exercise crash isolation and restarts.
    #[doc(hidden)]
    pub async fn inject_crash(&self) -> Result<()> {
        self.call(Job::Panic).await.map(drop)
    }

    async fn call(&self, job: Job) -> Result<Output> {
        handoff::Route::Shared(self.tx.clone()).call(&self.shared, job).await
    }
}

/// Encodes statements as one extended-protocol batch ending in a single `Sync`.
fn encode_batch(statements: &[(&str, &[Param])]) -> Result<BytesMut> {
    let mut bytes = BytesMut::new();
    for (sql, params) in statements {
        protocol::extended_statement(sql, params, &mut bytes)?;
    }
    protocol::sync(&mut bytes);
    Ok(bytes)
}

/// Decodes a reply into per-statement results, or its error.
fn results(output: Output) -> Result<Vec<QueryResult>> {
    let results = protocol::decode(&output.bytes)?.into_results()?;
    if output.rolled_back_open_transaction {
        return Err(Error::Usage(
            "the statement left a transaction open, so it was rolled back; use Instance::begin() for interactive transactions".into(),
        ));
    }
    Ok(results)
}

fn single(output: Output) -> Result<QueryResult> {
    results(output)?.pop().ok_or_else(|| Error::Protocol("no result for the statement".into()))
}
