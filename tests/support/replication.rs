//! Helpers shared by the replication test files: an instance, a config,
//! waiting for the remote's position, and full-table comparisons.

#![allow(dead_code)]

use std::time::Duration;

use pglite_cache::replication::{Lsn, PublicationSpec, ReplicationConfig, ReplicationHandle};
use pglite_cache::{Instance, InstanceOptions};

use super::pg::PgCluster;

pub const WAIT: Duration = Duration::from_secs(60);

pub async fn instance() -> Instance {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Instance::start(InstanceOptions::in_memory()).await.unwrap()
}

pub fn config(pg: &PgCluster, db: &str, publication: &str) -> ReplicationConfig {
    ReplicationConfig::new(pg.conninfo(db).parse().unwrap(), PublicationSpec::Existing(publication.into()))
        .slot_name(format!("slot_{db}"))
        .status_interval(Duration::from_secs(1))
        .publication_check_interval(Duration::from_secs(2))
}

pub async fn remote_lsn(client: &tokio_postgres::Client) -> Lsn {
    let row = client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap();
    row.get::<_, String>(0).parse().unwrap()
}

/// Waits until everything written on the remote so far is applied.
pub async fn catch_up(handle: &ReplicationHandle, client: &tokio_postgres::Client) {
    let lsn = remote_lsn(client).await;
    tokio::time::timeout(WAIT, handle.wait_for_lsn(lsn))
        .await
        .unwrap_or_else(|_| panic!("not caught up with {lsn} within {WAIT:?}: {:?}", handle.status()))
        .unwrap();
}

/// Every row's text form, hashed in order. `ROW(t.*)`, not `t`: in a
/// table with a column named `t`, `t` would be that column.
pub const HASH: &str =
    "SELECT count(*)::text, md5(coalesce(string_agg(ROW(t.*)::text, E'\\n' ORDER BY ROW(t.*)::text), '')) FROM ";

/// Compares a table's full contents on both sides (row count and an ordered
/// hash of every row's text form).
pub async fn assert_same(client: &tokio_postgres::Client, local: &Instance, table: &str) {
    client.batch_execute("SET TimeZone = 'UTC'; SET extra_float_digits = 1").await.unwrap();
    let remote = client.query_one(&format!("{HASH}{table} t"), &[]).await.unwrap();
    let remote: (String, String) = (remote.get(0), remote.get(1));
    let result =
        local.exec(&format!("SET TimeZone = 'UTC'; SET extra_float_digits = 1; {HASH}{table} t")).await.unwrap();
    let row = &result.last().unwrap().rows[0];
    let local_pair: (String, String) = (row.get(0), row.get(1));
    if remote != local_pair {
        let r: Vec<String> = client
            .query(&format!("SELECT ROW(t.*)::text FROM {table} t ORDER BY 1 LIMIT 20"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let l = local.query(&format!("SELECT ROW(t.*)::text FROM {table} t ORDER BY 1 LIMIT 20"), &[]).await.unwrap();
        let l: Vec<String> = l.rows.iter().map(|r| r.get(0)).collect();
        panic!("{table} differs: remote {remote:?} local {local_pair:?}\nremote rows: {r:#?}\nlocal rows: {l:#?}");
    }
}

pub async fn local_count(local: &Instance, table: &str) -> i64 {
    local.query(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().rows[0].get(0)
}

/// Waits (at most [`WAIT`]) until the initial copy is done and changes stream.
pub async fn wait_streaming(handle: &ReplicationHandle) {
    tokio::time::timeout(WAIT, handle.wait_streaming()).await.unwrap().unwrap();
}

/// Drops a slot behind the replication's back: terminates its walsender
/// (which reconnects) until the slot is free, then drops it.
pub async fn drop_slot_behind_our_back(remote: &tokio_postgres::Client, slot: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        remote
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await
            .unwrap();
        if remote.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.is_ok() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "could not drop the slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A new stream-fed cache in `dir`, bootstrapped from the newest snapshot
/// and streaming.
pub async fn stream_cache_at(
    config: &pglite_cache::replication::stream::StreamConfig,
    dir: &std::path::Path,
) -> (Instance, ReplicationHandle) {
    use pglite_cache::replication::stream::{self, StreamReplication};
    let restored = tokio::time::timeout(WAIT, stream::bootstrap(config, dir)).await.unwrap().unwrap();
    assert!(restored.is_some(), "a new directory starts from a snapshot");
    let instance = Instance::start(InstanceOptions::persistent(dir)).await.unwrap();
    let handle = StreamReplication::start(instance.clone(), config.clone()).unwrap();
    tokio::time::timeout(WAIT, handle.wait_streaming()).await.expect("cache streaming in time").unwrap();
    (instance, handle)
}
