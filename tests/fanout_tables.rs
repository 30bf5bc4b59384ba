//! Tables added to the publication after the publisher's first start reach
//! every stream-fed cache as a table copy that travels in the stream (the
//! way a slot-fed cache backfills them). Real PostgreSQL, real nats-server;
//! in-process through the library, and kill -9 through the binary.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pglite_cache::Instance;
use pglite_cache::replication::stream::{self, Publisher, PublisherConfig, StreamConfig};
use pglite_cache::replication::{PublicationSpec, ReplicationConfig, ReplicationHandle};
use support::daemon::Proc;
use support::nats::NatsServer;
use support::pg::PgCluster;
use support::replication::{WAIT, assert_same, catch_up, remote_lsn, stream_cache_at as cache_at};
use tokio_postgres::Client;

const SCHEMA: &str = r#"
CREATE TABLE items (id int PRIMARY KEY, v text);
INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 2000) i;
CREATE PUBLICATION pub FOR TABLE items;
CREATE TYPE mood AS ENUM ('calm', 'busy');
CREATE TABLE added (writer int, n int, payload text);
INSERT INTO added SELECT 0, i, repeat(md5(i::text), 2) FROM generate_series(1, 20000) i;
CREATE TABLE added_keyed (id int PRIMARY KEY, v text, tag mood);
CREATE INDEX added_keyed_v ON added_keyed (v);
INSERT INTO added_keyed SELECT i, 'seed ' || i, 'calm' FROM generate_series(1, 300) i;
CREATE TABLE quiet (id int PRIMARY KEY, v text);
INSERT INTO quiet SELECT i, 'quiet ' || i FROM generate_series(1, 100) i;
"#;

const TABLES: [&str; 4] = ["items", "added", "added_keyed", "quiet"];

/// Small transactions on the added tables and an old one, until stopped;
/// counts them in `done`.
fn writer(
    client: Client,
    done: Arc<AtomicU64>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !*stop.borrow() {
            n += 1;
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO added VALUES (1, {n}, 'w' || {n}); \
                     INSERT INTO added_keyed VALUES ({k}, 'new {n}', 'busy') ON CONFLICT (id) DO UPDATE SET v = 'again {n}', tag = 'calm'; \
                     DELETE FROM added_keyed WHERE id = {d}; UPDATE items SET v = v || '+' WHERE id = {u}; COMMIT",
                    k = 1 + n % 400,
                    d = 1 + (n * 7) % 400,
                    u = 1 + n % 2000,
                ))
                .await
                .unwrap();
            done.store(n, Ordering::Relaxed);
        }
    })
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn has_table(instance: &Instance, table: &str) -> bool {
    let r = instance
        .query("SELECT count(*)::int8 FROM pglite_cache.tables WHERE table_name = $1 AND state = 'ready'", &[&table])
        .await
        .unwrap();
    r.rows[0].get::<i64>(0) == 1
}

async fn assert_all_same(remote: &Client, caches: &[(&Instance, &ReplicationHandle)]) {
    for (instance, handle) in caches {
        catch_up(handle, remote).await;
        for table in TABLES {
            assert_same(remote, instance, table).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_added_to_the_publication_reaches_every_cache_exactly_once() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let pg = PgCluster::start();
    let db = pg.create_database("added").await;
    let remote = pg.client(&db).await;
    remote.batch_execute(SCHEMA).await.unwrap();
    let nats = NatsServer::start();
    let stream_config = StreamConfig::new(nats.url(), "added");
    let dirs = tempfile::tempdir().unwrap();
    let replication =
        ReplicationConfig::new(pg.conninfo(&db).parse().unwrap(), PublicationSpec::Existing("pub".into()))
            .slot_name("fanout")
            .status_interval(Duration::from_millis(200));
    let mut config = PublisherConfig::new(replication, stream_config.clone(), dirs.path().join("publisher"));
    config.snapshot_interval = None; // only the snapshot from before the tables were added
    config.max_chunk_bytes = 64 << 10; // the copy of `added` in several records
    let publisher = Publisher::start(config.clone()).unwrap();
    tokio::time::timeout(WAIT, publisher.wait_streaming()).await.unwrap().unwrap();
    let (a, a_handle) = cache_at(&stream_config, &dirs.path().join("a")).await;
    let (b, b_handle) = cache_at(&stream_config, &dirs.path().join("b")).await;

    // Added under a concurrent write workload on them.
    let done = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = writer(pg.client(&db).await, done.clone(), stopped);
    wait_for("writes before the tables are added", async || done.load(Ordering::Relaxed) >= 100).await;
    // `quiet` gets no writes: the publisher finds it in the publication.
    remote.batch_execute("ALTER PUBLICATION pub ADD TABLE added, added_keyed, quiet").await.unwrap();
    for cache in [&a, &b] {
        wait_for("the added tables in a cache", async || {
            has_table(cache, "added").await && has_table(cache, "added_keyed").await && has_table(cache, "quiet").await
        })
        .await;
    }
    let now = done.load(Ordering::Relaxed);
    wait_for("writes after the tables arrived", async || done.load(Ordering::Relaxed) >= now + 100).await;
    stop.send_replace(true);
    load.await.unwrap();
    assert_all_same(&remote, &[(&a, &a_handle), (&b, &b_handle)]).await;
    let slots: i64 = remote.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await.unwrap().get(0);
    assert_eq!(slots, 1, "the temporary slot of the copy is gone");
    // Indexes and the enum type came with the copy; the table is read-only.
    let index = a.query("SELECT to_regclass('added_keyed_v') IS NOT NULL", &[]).await.unwrap();
    assert!(index.rows[0].get::<bool>(0));
    assert!(a.exec("DELETE FROM added").await.is_err(), "replicated tables are read-only");

    // A cache started later from the snapshot taken before the tables were
    // added gets them from the stream.
    let (c, c_handle) = cache_at(&stream_config, &dirs.path().join("c")).await;
    assert_all_same(&remote, &[(&c, &c_handle)]).await;

    // The publisher started again, now storing snapshots: its own cache
    // follows the copies, and a cache started from a newer snapshot has the
    // tables without reading their copy.
    publisher.stop().await.unwrap();
    config.snapshot_interval = Some(Duration::from_secs(1));
    let publisher = Publisher::start(config).unwrap();
    tokio::time::timeout(WAIT, publisher.wait_streaming()).await.unwrap().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = writer(pg.client(&db).await, done.clone(), stopped);
    let now = done.load(Ordering::Relaxed);
    wait_for("writes after the restart", async || done.load(Ordering::Relaxed) >= now + 100).await;
    stop.send_replace(true);
    load.await.unwrap();
    let lsn = remote_lsn(&remote).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    wait_for("a snapshot past the writes", async || {
        stream::newest_snapshot(&js, &stream_config).await.unwrap().is_some_and(|s| s.applied_lsn >= lsn)
    })
    .await;
    let (d, d_handle) = cache_at(&stream_config, &dirs.path().join("d")).await;
    assert!(has_table(&d, "added").await, "the newer snapshot holds the added table");
    assert_all_same(&remote, &[(&a, &a_handle), (&b, &b_handle), (&c, &c_handle), (&d, &d_handle)]).await;
    for handle in [a_handle, b_handle, c_handle, d_handle] {
        handle.stop().await.unwrap();
    }
    publisher.stop().await.unwrap();
}

// ---- kill -9 through the binary ----

/// (rows, distinct rows) of an insert-only table without a key.
async fn counts(client: &Client, table: &str) -> (i64, i64) {
    let row =
        client.query_one(&format!("SELECT count(*), count(DISTINCT (writer, n)) FROM {table}"), &[]).await.unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_table_copy_travels_loses_and_repeats_nothing() {
    let pg = PgCluster::start();
    let db = pg.create_database("copykill").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE events (writer int, n bigint, payload text); \
             INSERT INTO events SELECT 0, i, 'seed' FROM generate_series(1, 1000) i; \
             CREATE PUBLICATION pub FOR TABLE events; \
             CREATE TABLE big (writer int, n bigint, payload text); \
             INSERT INTO big SELECT 0, i, repeat(md5(i::text), 2) FROM generate_series(1, 300000) i",
        )
        .await
        .unwrap();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = support::nats::free_port();
    let publisher_args: Vec<String> = [
        "publish",
        "--source",
        &pg.conninfo(&db),
        "--nats",
        &nats.url(),
        "--stream",
        "copykill",
        "--publication",
        "pub",
        "--data",
        &dir.path().join("publisher").display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let cache_args: Vec<String> = [
        "sync",
        "--nats",
        &nats.url(),
        "--stream",
        "copykill",
        "--data",
        &dir.path().join("cache").display().to_string(),
        "--socket-dir",
        &dir.path().display().to_string(),
        "--port",
        &port.to_string(),
        "--status-interval",
        "1",
    ]
    .map(String::from)
    .to_vec();
    let publisher_log = dir.path().join("publisher.log");
    let cache_log = dir.path().join("cache.log");
    let mut publisher = Proc::spawn(&publisher_args, publisher_log.clone());
    let mut cache = Proc::spawn(&cache_args, cache_log.clone());
    let conninfo = format!("host={} port={port} user=postgres dbname=postgres", dir.path().display());
    let cache_client =
        async |cache: &mut Proc| -> Client { cache.client(&conninfo, "SELECT 1 FROM events LIMIT 1").await };
    let _ = cache_client(&mut cache).await;

    // Every record, as JetStream stores it.
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let mut records = nc.subscribe("pglite_cache.copykill").await.unwrap();
    let writes = pg.client(&db).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let mut n = 0i64;
        while !*stopped.borrow() {
            n += 1;
            writes
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO events VALUES (1, {n}, 'e'); INSERT INTO big VALUES (1, {n}, 'b'); COMMIT"
                ))
                .await
                .unwrap();
        }
        n
    });
    remote.batch_execute("ALTER PUBLICATION pub ADD TABLE big").await.unwrap();

    // kill -9 of the publisher in the middle of the copy's records.
    let start = Instant::now();
    loop {
        let record = tokio::time::timeout(WAIT, records.next()).await.expect("records in time").unwrap();
        let p = &record.payload;
        // "PGCF" | format | kind | last | chunk u32
        if p.len() > 11 && p[5] == b'C' && p[6] == 0 && u32::from_be_bytes(p[7..11].try_into().unwrap()) >= 3 {
            break;
        }
        assert!(start.elapsed() < WAIT, "no table copy in the stream:\n{}", publisher.log());
    }
    publisher.kill9();
    drop(records);
    publisher = Proc::spawn(&publisher_args, publisher_log);

    // kill -9 of the cache while it loads the (new) copy.
    let started = |log: &str| log.matches("loading a table copy from the stream").count();
    wait_for("the cache loading the copy again", async || {
        cache.assert_running();
        let log = cache.log();
        started(&log) >= 2 && !log.contains("table copied from the stream")
            || log.contains("table copied from the stream")
    })
    .await;
    assert!(!cache.log().contains("table copied from the stream"), "the cache finished before it was killed");
    cache.kill9();
    let mut cache = Proc::spawn(&cache_args, cache_log);

    stop.send_replace(true);
    let n = load.await.unwrap();
    let client = cache_client(&mut cache).await;
    for (table, seeded) in [("events", 1000), ("big", 300_000)] {
        let expected = counts(&remote, table).await;
        assert_eq!(expected, (seeded + n, seeded + n));
        let start = Instant::now();
        loop {
            publisher.assert_running();
            let exists = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.unwrap();
            let got = match exists.get::<_, bool>(0) {
                true => counts(&client, table).await,
                false => (0, 0),
            };
            assert_eq!(got.0, got.1, "a row of {table} was applied twice");
            if got == expected {
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "{table}: the cache has {got:?} rows, the remote {expected:?}\npublisher:\n{}\ncache:\n{}",
                publisher.log(),
                cache.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let slots: i64 = remote.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await.unwrap().get(0);
    assert_eq!(slots, 1);
    let log = cache.log();
    assert!(log.contains("table copy cut off"), "the cut-off copy reached the cache:\n{log}");
}
