//! Fan-out: one replication slot feeds many caches through a NATS
//! JetStream stream.
//!
//! ```text
//! remote ──1 slot── Publisher ──► JetStream stream `pglite_cache.<name>` (1 record per remote txn, chunked)
//!                      └─ its own cache (initial copy) ──► object store `<name>_snapshots`: snapshot + position
//! cache: bootstrap (newest snapshot, no query to the remote) ─► StreamReplication: apply txn + position in 1 local txn
//! ```
//!
//! - `record`: the record format (framed pgoutput), the publisher's
//!   chunker and the consumer's sequencer (pure).
//! - `publisher`: the slot side ([`Publisher`]).
//! - `consumer`: the cache side, reusing the slot path's apply.
//! - `snapshot`: snapshots in the object store.
//! - `position`: where a cache is in the stream.
//!
//! A cache fed by the stream offers the same [`ReplicationHandle`] as one
//! fed by a slot: status, `wait_for_lsn` (also for remote writes outside the
//! publication: the publisher publishes the remote's position while idle),
//! subscribe, stop. Not for stream-fed handles: `resync` and `decommission`
//! (they talk to a remote; a stream-fed cache is replaced by a new one made
//! from a snapshot instead).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use pglite_cache::replication::stream::{self, StreamConfig, StreamReplication};
//! use pglite_cache::{Instance, InstanceOptions};
//!
//! let config = StreamConfig::new("nats://127.0.0.1:4222", "shop");
//! stream::bootstrap(&config, "./shop-cache".as_ref()).await?; // newest snapshot, if the directory is new
//! let cache = Instance::start(InstanceOptions::persistent("./shop-cache")).await?;
//! let replication = StreamReplication::start(cache.clone(), config)?;
//! replication.wait_streaming().await?;
//! # Ok(()) }
//! ```

mod catalog;
mod consumer;
mod nats;
mod position;
mod publisher;
mod record;
mod refresher;
mod snapshot;
mod table_copy;

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use crate::Instance;

use super::config::{PublicationSpec, ReplicationConfig};
use super::error::ReplicationError;
use super::{ReplicationHandle, Status};

pub use consumer::needs_rebootstrap;
pub use nats::StreamConfig;
pub use publisher::{Publisher, PublisherConfig, PublisherHandle};
pub use snapshot::{SnapshotInfo, newest as newest_snapshot};

/// Entry point of a stream-fed cache.
#[derive(Debug)]
pub struct StreamReplication;

impl StreamReplication {
    /// Starts applying the stream into `instance` (made from a snapshot:
    /// see [`bootstrap`]) in the background.
    pub fn start(instance: Instance, config: StreamConfig) -> Result<ReplicationHandle, ReplicationError> {
        config.validate()?;
        let apply = apply_config(&config)?;
        let (status_tx, status) = watch::channel(Status::default());
        let status_tx = Arc::new(status_tx);
        let (changes, _) = broadcast::channel(1024);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let consumer = consumer::Consumer {
            instance: instance.clone(),
            config,
            apply: apply.clone(),
            status: status_tx.clone(),
            changes: changes.clone(),
            shutdown: shutdown_rx,
        };
        let task = tokio::spawn(consumer.run());
        Ok(ReplicationHandle {
            status,
            status_tx,
            changes,
            shutdown,
            task: Mutex::new(Some(task)),
            instance,
            config: apply,
        })
    }
}

/// The apply's settings for a stream-fed cache. Its source names the stream
/// and is never contacted: a stream-fed cache sends no query to the remote.
pub fn apply_config(config: &StreamConfig) -> Result<ReplicationConfig, ReplicationError> {
    let source = format!("postgres://fanout@stream.invalid/{}", config.name)
        .parse()
        .map_err(|e| ReplicationError::fatal(format!("stream placeholder source: {e}")))?;
    Ok(ReplicationConfig::new(source, PublicationSpec::Existing(config.name.clone()))
        .slot_name(config.name.clone())
        .status_interval(config.status_interval))
}

/// Makes `data` a cache to feed from the stream: when it is missing or
/// empty, unpacks the newest snapshot into it (no query to the remote) and
/// returns it; a directory that already holds a cache is left alone.
pub async fn bootstrap(config: &StreamConfig, data: &Path) -> Result<Option<SnapshotInfo>, ReplicationError> {
    config.validate()?;
    if data.exists() && std::fs::read_dir(data)?.next().is_some() {
        return Ok(None);
    }
    let js = nats::connect(config, "pglite-cache bootstrap").await?;
    snapshot::restore(&js, config, data).await.map(Some)
}

/// Replaces the cache in `data` (closed) by the newest snapshot: for a cache
/// that was offline past the stream's retention ([`needs_rebootstrap`]).
pub async fn rebootstrap(config: &StreamConfig, data: &Path) -> Result<SnapshotInfo, ReplicationError> {
    let js = nats::connect(config, "pglite-cache bootstrap").await?;
    // The newest snapshot must exist before the old cache goes.
    snapshot::newest(&js, config).await?.ok_or_else(|| ReplicationError::transient("no snapshot to start from"))?;
    let old = data.with_extension("replaced");
    let _ = std::fs::remove_dir_all(&old);
    std::fs::rename(data, &old)?;
    let restored = snapshot::restore(&js, config, data).await?;
    std::fs::remove_dir_all(&old)?;
    Ok(restored)
}

/// Whether the stream still holds every record the cache in `instance`
/// needs (false: it was offline past the stream's retention, or the
/// publisher started over; [`rebootstrap`] it).
pub async fn still_covered(config: &StreamConfig, instance: &Instance) -> Result<bool, ReplicationError> {
    let Some(saved) = position::load(instance).await? else {
        return Ok(true); // not a stream-fed cache: the consumer says so
    };
    let js = nats::connect(config, "pglite-cache sync").await?;
    let mut stream = nats::get_stream(&js, config).await?;
    let info = stream.info().await.map_err(|e| nats::transient("reading the stream's state", e))?;
    Ok(saved.resume_seq >= info.state.first_sequence)
}
