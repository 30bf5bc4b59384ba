//! The publisher's snapshot refresher: now and then, brings the publisher's
//! own cache up to date from the stream (the same consumer as every cache),
//! closes it and stores a new snapshot. New caches then replay only the
//! records since, and the stream's retention only has to cover the time
//! between two snapshots (plus the longest time a cache may be offline).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};

use crate::replication::error::ReplicationError;
use crate::replication::lsn::Lsn;
use crate::replication::{Status, store};
use crate::{Instance, InstanceOptions};

use super::position;
use super::publisher::PublisherConfig;
use super::{StreamReplication, nats, snapshot};

/// Runs until `shutdown`: one refresh per `config.snapshot_interval`.
pub(super) async fn run(
    config: PublisherConfig,
    data_lock: Arc<Mutex<()>>,
    status: watch::Receiver<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(every) = config.snapshot_interval else { return };
    let mut timer = tokio::time::interval(every);
    timer.tick().await; // the first tick is immediate: the bootstrap just stored one
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            _ = timer.tick() => {}
        }
        let confirmed = status.borrow().applied_lsn;
        let refresh = refresh(&config, &data_lock, confirmed, every);
        tokio::select! {
            biased;
            // A refresh in progress is dropped: the cache closes with the
            // last position it stored, and the next refresh goes on from it.
            _ = shutdown.changed() => return,
            result = refresh => if let Err(e) = result {
                tracing::warn!(error = %e, "snapshot refresh failed; retrying at the next interval");
            },
        }
    }
}

/// Catches the publisher's cache up to `confirmed` (for at most `limit`),
/// then stores a snapshot of it if it moved since the newest one.
async fn refresh(
    config: &PublisherConfig,
    data_lock: &Mutex<()>,
    confirmed: Lsn,
    limit: Duration,
) -> Result<(), ReplicationError> {
    let _guard = data_lock.lock().await;
    let instance = Instance::start(InstanceOptions::persistent(&config.data).name("publisher")).await?;
    let caught_up = async {
        let handle = StreamReplication::start(instance.clone(), config.stream.clone())?;
        let waited = tokio::time::timeout(limit, handle.wait_for_lsn(confirmed)).await;
        handle.stop().await?;
        if let Ok(result) = waited {
            result?;
        }
        let position = position::load(&instance).await?;
        let applied = store::load(&instance).await?.map(|s| s.applied_lsn);
        Ok::<_, ReplicationError>(position.zip(applied))
    }
    .await;
    instance.stop().await?;
    let Some((position, applied)) = caught_up? else {
        return Err(ReplicationError::fatal("the publisher's cache has no stream position"));
    };
    let js = nats::connect(&config.stream, "pglite-cache publish").await?;
    let newest = snapshot::newest(&js, &config.stream).await?;
    if newest.is_some_and(|s| s.resume_seq >= position.resume_seq) {
        return Ok(());
    }
    snapshot::store(&js, &config.stream, &config.data, position.resume_seq, applied).await?;
    Ok(())
}
