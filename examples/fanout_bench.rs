//! Fan-out benchmark: a new cache of a ROWS-row database (default
//! 1,000,000) bootstrapped from a snapshot in the JetStream object store vs
//! the initial copy from the remote (`sync --source`), in one run.
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/main/target cargo run --release --example fanout_bench [ROWS]
//! ```
//!
//! Needs `nats-server` (Debian: `apt-get install nats-server`) and the
//! PostgreSQL server binaries the tests use.

#[path = "../tests/support/nats.rs"]
mod nats;
#[path = "../tests/support/pg.rs"]
mod pg;

use std::time::{Duration, Instant};

use pglite_cache::replication::stream::{self, Publisher, PublisherConfig, StreamConfig, StreamReplication};
use pglite_cache::replication::{PublicationSpec, Replication, ReplicationConfig};
use pglite_cache::{Instance, InstanceOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let rows: i64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let remote_pg = pg::PgCluster::start();
    let db = remote_pg.create_database("bench").await;
    let remote = remote_pg.client(&db).await;
    remote
        .batch_execute(&format!(
            "CREATE TABLE bench (id int PRIMARY KEY, n int NOT NULL, label text NOT NULL, at timestamptz NOT NULL, \
             payload text NOT NULL); \
             INSERT INTO bench SELECT i, i % 1000, 'label ' || (i % 97), now() - i * interval '1 second', \
             md5(i::text) || md5((i * 7)::text) FROM generate_series(1, {rows}) i; \
             CREATE PUBLICATION pub FOR TABLE bench;"
        ))
        .await
        .unwrap();
    let nats = nats::NatsServer::start();
    let dirs = tempfile::tempdir().unwrap();
    let source: pglite_cache::replication::SourceConfig = remote_pg.conninfo(&db).parse().unwrap();
    let config = ReplicationConfig::new(source, PublicationSpec::Existing("pub".into()));

    // 1. A cache with its own slot: the initial copy from the remote.
    let started = Instant::now();
    let direct = Instance::start(InstanceOptions::persistent(dirs.path().join("direct"))).await.unwrap();
    let handle = Replication::start(direct.clone(), config.clone().slot_name("direct")).unwrap();
    handle.wait_streaming().await.unwrap();
    let copy = started.elapsed();
    handle.stop().await.unwrap();
    direct.stop().await.unwrap();

    // 2. The publisher: its own copy plus the first snapshot.
    let started = Instant::now();
    let stream_config = StreamConfig::new(nats.url(), "bench");
    let mut publisher =
        PublisherConfig::new(config.slot_name("fanout"), stream_config.clone(), dirs.path().join("publisher"));
    publisher.snapshot_interval = None;
    let publisher = Publisher::start(publisher).unwrap();
    publisher.wait_streaming().await.unwrap();
    let publish = started.elapsed();

    // 3. A new cache from the snapshot: no query to the remote.
    let started = Instant::now();
    let dir = dirs.path().join("from-snapshot");
    let snapshot = stream::bootstrap(&stream_config, &dir).await.unwrap().unwrap();
    let restored = started.elapsed();
    let cache = Instance::start(InstanceOptions::persistent(&dir)).await.unwrap();
    let handle = StreamReplication::start(cache.clone(), stream_config).unwrap();
    handle.wait_streaming().await.unwrap();
    let bootstrap = started.elapsed();
    let count: i64 = cache.query("SELECT count(*) FROM bench", &[]).await.unwrap().rows[0].get(0);
    assert_eq!(count, rows);

    println!("| {rows} rows | time | rows/s |");
    println!("|---|---|---|");
    let line = |what: &str, d: Duration| {
        println!("| {what} | {:.2} s | {:.0} |", d.as_secs_f64(), rows as f64 / d.as_secs_f64())
    };
    line("initial copy from the remote (own slot)", copy);
    line("publisher: copy + first snapshot", publish);
    line("new cache from the snapshot: download + unpack", restored);
    line("new cache from the snapshot: streaming", bootstrap);
    println!("snapshot: {:.1} MiB compressed", snapshot.size as f64 / (1 << 20) as f64);
    handle.stop().await.unwrap();
    publisher.stop().await.unwrap();
}
