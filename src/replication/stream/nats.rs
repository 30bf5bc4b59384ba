//! NATS JetStream: the connection, the stream and what it is configured
//! with. Everything here works with nats-server 2.9 (Debian's): async-nats
//! is built without its `server_2_10`+ features, and nothing relies on
//! atomic batches or multi-filter consumers.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::replication::error::ReplicationError;

/// Where the fan-out stream lives and how it is kept.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// `nats://host:port` (several, comma-separated, for a cluster).
    pub nats_url: String,
    /// The JetStream stream's name (letters, digits, `-` and `_`). Its
    /// records travel on the subject `pglite_cache.<name>`, its snapshots in
    /// the object store bucket `<name>_snapshots`.
    pub name: String,
    /// Records older than this are dropped by JetStream (0: kept forever).
    /// A cache offline longer than this starts again from a snapshot.
    pub max_age: Duration,
    /// The stream keeps at most this many bytes (-1: no limit).
    pub max_bytes: i64,
    /// How often a cache fed by the stream updates its status and stores
    /// its stream position (default 1 s).
    pub status_interval: Duration,
}

impl StreamConfig {
    /// A config with defaults: records kept 7 days, no size limit.
    pub fn new(nats_url: impl Into<String>, name: impl Into<String>) -> StreamConfig {
        StreamConfig {
            nats_url: nats_url.into(),
            name: name.into(),
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: -1,
            status_interval: Duration::from_secs(1),
        }
    }

    /// The subject the records travel on.
    pub fn subject(&self) -> String {
        format!("pglite_cache.{}", self.name)
    }

    /// The object store bucket of the snapshots.
    pub fn bucket(&self) -> String {
        format!("{}_snapshots", self.name)
    }

    /// Checks the name.
    pub fn validate(&self) -> Result<(), ReplicationError> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 200
            && self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(ReplicationError::needs_operator(
                format!("invalid stream name {:?}", self.name),
                "use letters, digits, '-' and '_'",
            ));
        }
        Ok(())
    }
}

/// A NATS error: the server may come back, so it is retried.
pub(crate) fn transient(what: &str, e: impl std::fmt::Display) -> ReplicationError {
    ReplicationError::transient(format!("{what}: {e}"))
}

/// Connects and returns a JetStream context.
pub(crate) async fn connect(config: &StreamConfig, name: &str) -> Result<jetstream::Context, ReplicationError> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .connect(config.nats_url.as_str())
        .await
        .map_err(|e| transient(&format!("connecting to NATS at {}", config.nats_url), e))?;
    let mut context = jetstream::new(client);
    context.set_timeout(Duration::from_secs(10));
    Ok(context)
}

/// Creates the stream if missing (the publisher's job): file storage, one
/// subject, a two-minute duplicate window for `Nats-Msg-Id`.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    config: &StreamConfig,
) -> Result<stream::Stream, ReplicationError> {
    js.get_or_create_stream(stream::Config {
        name: config.name.clone(),
        subjects: vec![config.subject()],
        storage: stream::StorageType::File,
        max_age: config.max_age,
        max_bytes: config.max_bytes,
        duplicate_window: Duration::from_secs(120),
        discard: stream::DiscardPolicy::Old,
        description: Some("pglite-cache fan-out: one record per remote transaction".into()),
        ..Default::default()
    })
    .await
    .map_err(|e| transient(&format!("creating the stream {}", config.name), e))
}

/// Opens the stream (a cache's view: it never creates it).
pub(crate) async fn get_stream(
    js: &jetstream::Context,
    config: &StreamConfig,
) -> Result<stream::Stream, ReplicationError> {
    js.get_stream(&config.name).await.map_err(|e| {
        if e.to_string().contains("not found") {
            ReplicationError::transient(format!("the stream {} does not exist (yet)", config.name))
                .with_hint("start `pglite-cache publish` for this stream")
        } else {
            transient(&format!("opening the stream {}", config.name), e)
        }
    })
}
