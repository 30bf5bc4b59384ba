//! An edge site (docs/fan-out.md): a hub nats-server, and an edge
//! nats-server that is a leaf node of it with its own JetStream domain and
//! mirrors the stream and the snapshot bucket under the same names. Edge
//! caches talk only to the edge server: they keep serving while the link is
//! broken (the hub killed), a new one even starts from the mirrored
//! snapshot then, and they catch up once the hub is back. Real
//! nats-servers, real PostgreSQL.

mod support;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use pglite_cache::replication::stream::{Publisher, PublisherConfig, StreamConfig, StreamReplication};
use pglite_cache::replication::{Phase, PublicationSpec, ReplicationConfig, ReplicationHandle};
use pglite_cache::{Instance, InstanceOptions};
use support::nats::{NatsServer, free_port};
use support::pg::PgCluster;
use support::replication::{WAIT, assert_same, catch_up, local_count};

const SCHEMA: &str = r#"
CREATE TABLE items (id int PRIMARY KEY, v text);
INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 1000) i;
CREATE PUBLICATION pub FOR TABLE items;
"#;

/// A mirror, in the edge's domain, of stream `name` of the hub's domain.
fn mirror(name: &str) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        storage: stream::StorageType::File,
        // The object store writes its metadata with rollups.
        allow_rollup: true,
        mirror: Some(stream::Source { name: name.to_owned(), domain: Some("hub".into()), ..Default::default() }),
        ..Default::default()
    }
}

async fn edge_cache(config: &StreamConfig, dir: &std::path::Path) -> (Instance, ReplicationHandle) {
    let restored = tokio::time::timeout(WAIT, pglite_cache::replication::stream::bootstrap(config, dir))
        .await
        .expect("bootstrap in time")
        .unwrap();
    assert!(restored.is_some(), "started from the mirrored snapshot");
    let instance = Instance::start(InstanceOptions::persistent(dir)).await.unwrap();
    let handle = StreamReplication::start(instance.clone(), config.clone()).unwrap();
    tokio::time::timeout(WAIT, handle.wait_streaming()).await.expect("cache streaming in time").unwrap();
    (instance, handle)
}

async fn wait_until<F: Fn(&pglite_cache::replication::Status) -> bool>(
    status: &mut tokio::sync::watch::Receiver<pglite_cache::replication::Status>,
    what: &str,
    f: F,
) {
    tokio::time::timeout(WAIT, status.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("{what}: not in time"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_cache_reads_a_leaf_node_mirror_and_rides_out_a_broken_link() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let pg = PgCluster::start();
    let db = pg.create_database("edge").await;
    let remote = pg.client(&db).await;
    remote.batch_execute(SCHEMA).await.unwrap();

    let leaf_port = free_port();
    let mut hub = NatsServer::start_with("hub", "hub", &format!("leafnodes {{ listen: 127.0.0.1:{leaf_port} }}"));
    let edge = NatsServer::start_with(
        "edge",
        "edge",
        &format!("leafnodes {{ remotes: [ {{ url: \"nats://127.0.0.1:{leaf_port}\" }} ] }}"),
    );

    let replication =
        ReplicationConfig::new(pg.conninfo(&db).parse().unwrap(), PublicationSpec::Existing("pub".into()))
            .slot_name("edge")
            .status_interval(Duration::from_millis(200));
    let dirs = tempfile::tempdir().unwrap();
    let hub_stream = StreamConfig::new(hub.url(), "shop");
    let publisher =
        Publisher::start(PublisherConfig::new(replication, hub_stream.clone(), dirs.path().join("publisher"))).unwrap();
    tokio::time::timeout(WAIT, publisher.wait_streaming()).await.expect("publisher streaming in time").unwrap();

    // The edge mirrors the stream and the snapshot bucket (an object store
    // is the stream OBJ_<bucket>) under the same names, in its own domain.
    let edge_stream = StreamConfig::new(edge.url(), "shop");
    let js = jetstream::new(async_nats::connect(edge.url()).await.unwrap());
    for name in ["shop".to_owned(), format!("OBJ_{}", edge_stream.bucket())] {
        js.create_stream(mirror(&name)).await.unwrap();
    }
    let start = std::time::Instant::now();
    while pglite_cache::replication::stream::newest_snapshot(&js, &edge_stream).await.unwrap().is_none() {
        assert!(start.elapsed() < WAIT, "the snapshot bucket was not mirrored in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (first, first_handle) = edge_cache(&edge_stream, &dirs.path().join("edge1")).await;
    remote
        .batch_execute("UPDATE items SET v = 'linked' WHERE id <= 100; INSERT INTO items VALUES (1001, 'new')")
        .await
        .unwrap();
    catch_up(&first_handle, &remote).await;
    assert_same(&remote, &first, "items").await;

    // The link breaks: the hub is gone, the remote keeps changing.
    hub.kill();
    remote
        .batch_execute("UPDATE items SET v = 'while cut off' WHERE id % 2 = 0; INSERT INTO items VALUES (1002, 'x')")
        .await
        .unwrap();
    let mut publisher_status = publisher.watch_status();
    wait_until(&mut publisher_status, "the publisher notices the hub is gone", |s| s.phase != Phase::Streaming).await;
    // The edge cache serves what it has; a new edge cache starts from the
    // mirrored snapshot and stream, with neither hub nor remote.
    assert_eq!(local_count(&first, "items").await, 1001);
    assert_eq!(first_handle.status().phase, Phase::Streaming, "{:?}", first_handle.status());
    let (second, second_handle) = edge_cache(&edge_stream, &dirs.path().join("edge2")).await;
    let linked = first_handle.status().applied_lsn;
    tokio::time::timeout(WAIT, second_handle.wait_for_lsn(linked)).await.expect("second edge cache in time").unwrap();
    assert_eq!(local_count(&second, "items").await, 1001);

    // The link is back: the publisher, the mirrors and the edge caches catch up.
    hub.restart();
    for (local, handle) in [(&first, &first_handle), (&second, &second_handle)] {
        catch_up(handle, &remote).await;
        assert_same(&remote, local, "items").await;
    }
    first_handle.stop().await.unwrap();
    second_handle.stop().await.unwrap();
    publisher.stop().await.unwrap();
}
