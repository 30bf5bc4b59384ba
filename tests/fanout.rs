//! Fan-out through NATS JetStream: one publisher (one slot on a real
//! PostgreSQL) feeding many caches through a real nats-server. In-process
//! through the library here; kill -9 of each process through the binary in
//! `fanout_faults.rs`.

mod support;

use std::time::Duration;

use pglite_cache::replication::stream::{
    self, Publisher, PublisherConfig, PublisherHandle, StreamConfig, StreamReplication,
};
use pglite_cache::replication::{PublicationSpec, ReplicationConfig, ReplicationHandle};
use pglite_cache::{Instance, InstanceOptions};
use support::nats::NatsServer;
use support::pg::PgCluster;
use support::replication::{WAIT, assert_same, catch_up, remote_lsn, stream_cache_at as cache_at};

const SCHEMA: &str = r#"
CREATE TABLE items (id int PRIMARY KEY, v text, n numeric, updated timestamptz DEFAULT now());
CREATE TABLE events (writer int, n int, payload text);
CREATE TABLE outside (id serial PRIMARY KEY, v text);
INSERT INTO items SELECT i, 'item ' || i, i * 1.5 FROM generate_series(1, 2000) i;
INSERT INTO events SELECT 0, i, 'seed' FROM generate_series(1, 500) i;
CREATE PUBLICATION pub FOR TABLE items, events;
"#;

struct Fixture {
    pg: PgCluster,
    db: String,
    nats: NatsServer,
    stream: StreamConfig,
    dirs: tempfile::TempDir,
}

impl Fixture {
    async fn start(name: &str) -> Fixture {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let pg = PgCluster::start();
        let db = pg.create_database(name).await;
        pg.client(&db).await.batch_execute(SCHEMA).await.unwrap();
        let nats = NatsServer::start();
        let stream = StreamConfig::new(nats.url(), name);
        Fixture { pg, db, nats, stream, dirs: tempfile::tempdir().unwrap() }
    }

    fn publisher_config(&self) -> PublisherConfig {
        let replication = ReplicationConfig::new(
            self.pg.conninfo(&self.db).parse().unwrap(),
            PublicationSpec::Existing("pub".into()),
        )
        .slot_name("fanout")
        .status_interval(Duration::from_millis(200));
        PublisherConfig::new(replication, self.stream.clone(), self.dirs.path().join("publisher"))
    }

    async fn publisher(&self) -> PublisherHandle {
        let publisher = Publisher::start(self.publisher_config()).unwrap();
        tokio::time::timeout(WAIT, publisher.wait_streaming()).await.expect("publisher streaming in time").unwrap();
        publisher
    }

    /// A new cache: newest snapshot, then the stream.
    async fn cache(&self, name: &str) -> (Instance, ReplicationHandle) {
        let dir = self.dirs.path().join(name);
        cache_at(&self.stream, &dir).await
    }
}

/// Inserts, updates and deletes in small transactions until stopped.
fn writer(client: tokio_postgres::Client, stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut i = 0u64;
        while !*stop.borrow() {
            i += 1;
            let n = i as i32;
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO items VALUES ({id}, 'new {n}', {n}) ON CONFLICT (id) DO UPDATE SET v = 'again {n}'; \
                     UPDATE items SET v = v || '+', n = n + 1 WHERE id = {u}; DELETE FROM items WHERE id = {d}; \
                     INSERT INTO events VALUES (1, {n}, repeat('x', {n} % 50)); COMMIT",
                    id = 10_000 + n,
                    u = 1 + n % 2000,
                    d = 1 + (n * 7) % 2000,
                ))
                .await
                .unwrap();
        }
        i
    })
}

async fn local_hash(local: &Instance, table: &str) -> (String, String) {
    let sql = format!("SET TimeZone = 'UTC'; SET extra_float_digits = 1; {}{table} t", support::replication::HASH);
    let result = local.exec(&sql).await.unwrap();
    let row = &result.last().unwrap().rows[0];
    (row.get(0), row.get(1))
}

async fn slots(client: &tokio_postgres::Client) -> i64 {
    client.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_caches_from_one_slot_under_concurrent_writes() {
    let f = Fixture::start("four").await;
    let remote = f.pg.client(&f.db).await;
    let publisher = f.publisher().await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = writer(f.pg.client(&f.db).await, stopped);

    let mut caches = Vec::new();
    for i in 0..4 {
        caches.push(f.cache(&format!("cache{i}")).await);
        tokio::time::sleep(Duration::from_millis(300)).await; // more writes between cache starts
    }
    assert_eq!(slots(&remote).await, 1, "one slot on the remote, whatever the number of caches");
    stop.send_replace(true);
    let written = load.await.unwrap();
    assert!(written > 10, "the writer wrote {written} transactions");

    for (instance, handle) in &caches {
        catch_up(handle, &remote).await;
        assert_same(&remote, instance, "items").await;
        assert_same(&remote, instance, "events").await;
    }
    assert_eq!(slots(&remote).await, 1);
    for (_, handle) in &caches {
        handle.stop().await.unwrap();
    }
    publisher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_lsn_completes_for_writes_outside_the_publication() {
    let f = Fixture::start("outside").await;
    let remote = f.pg.client(&f.db).await;
    let publisher = f.publisher().await;
    let (_instance, cache) = f.cache("cache").await;
    catch_up(&cache, &remote).await;
    for i in 0..3 {
        remote.execute("INSERT INTO outside (v) VALUES ($1)", &[&format!("v{i}")]).await.unwrap();
        let lsn = remote_lsn(&remote).await;
        // Only idle progress from the publisher moves the cache there.
        tokio::time::timeout(Duration::from_secs(20), cache.wait_for_lsn(lsn))
            .await
            .unwrap_or_else(|_| panic!("not at {lsn} in time: {:?}", cache.status()))
            .unwrap();
    }
    cache.stop().await.unwrap();
    publisher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_transaction_travels_in_chunks() {
    let f = Fixture::start("big").await;
    let remote = f.pg.client(&f.db).await;
    let publisher = f.publisher().await;
    // Stores its stream position often: chances to do so while a big
    // transaction holds the instance (that once deadlocked the cache).
    let mut config = f.stream.clone();
    config.status_interval = Duration::from_millis(300);
    let (instance, cache) = cache_at(&config, &f.dirs.path().join("cache")).await;
    // ~20 MB of changes: dozens of 256 KiB records, and more than the
    // apply's 8 MiB buffer (applied in pieces inside one local transaction).
    remote
        .batch_execute(
            "BEGIN; INSERT INTO events SELECT 2, i, repeat(md5(i::text), 3) FROM generate_series(1, 200000) i; \
             UPDATE items SET v = 'big ' || id; COMMIT",
        )
        .await
        .unwrap();
    catch_up(&cache, &remote).await;
    assert_same(&remote, &instance, "events").await;
    assert_same(&remote, &instance, "items").await;
    // Big transactions back to back: each one's position is stored while
    // the next one is being applied.
    let mut big = String::new();
    for t in 0..4 {
        big += &format!(
            "BEGIN; INSERT INTO events SELECT 3, {t}, repeat(md5(i::text), 3) FROM generate_series(1, 100000) i; COMMIT; \
             INSERT INTO items VALUES (50000 + {t}, 'between'); "
        );
    }
    remote.batch_execute(&big).await.unwrap();
    catch_up(&cache, &remote).await;
    assert_same(&remote, &instance, "events").await;
    assert_same(&remote, &instance, "items").await;
    let info = async_nats::jetstream::new(async_nats::connect(f.nats.url()).await.unwrap())
        .get_stream("big")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert!(info.state.messages > 40, "{} records: the transaction was chunked", info.state.messages);
    cache.stop().await.unwrap();
    publisher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_cache_bootstraps_without_the_remote() {
    let mut f = Fixture::start("late").await;
    let remote = f.pg.client(&f.db).await;
    let publisher = f.publisher().await;
    remote
        .batch_execute(
            "UPDATE items SET v = 'changed' WHERE id <= 100; INSERT INTO events VALUES (3, 1, 'after snapshot')",
        )
        .await
        .unwrap();
    let (first, first_handle) = f.cache("first").await;
    catch_up(&first_handle, &remote).await;
    let expected = local_hash(&first, "items").await;
    let expected_events = local_hash(&first, "events").await;
    assert_same(&remote, &first, "items").await;
    publisher.stop().await.unwrap();
    drop(remote);
    // The remote is gone: a cache that can start now asked it nothing.
    f.pg.stop();
    let (late, late_handle) = f.cache("late").await;
    let target = first_handle.status().applied_lsn;
    tokio::time::timeout(WAIT, late_handle.wait_for_lsn(target)).await.expect("late cache caught up in time").unwrap();
    assert_eq!(local_hash(&late, "items").await, expected);
    assert_eq!(local_hash(&late, "events").await, expected_events);
    late_handle.stop().await.unwrap();
    first_handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_offline_past_retention_starts_again_from_a_newer_snapshot() {
    // Every await is bounded and named: this test hung once under load.
    let f = step("fixture", Fixture::start("retention")).await;
    let remote = step("remote client", f.pg.client(&f.db)).await;
    let mut config = f.publisher_config();
    config.snapshot_interval = Some(Duration::from_secs(1));
    let publisher = Publisher::start(config).unwrap();
    step("publisher streaming", publisher.wait_streaming()).await.unwrap();
    let dir = f.dirs.path().join("offline");
    let (instance, handle) = step("cache from a snapshot", cache_at(&f.stream, &dir)).await;
    step("cache caught up", catch_up(&handle, &remote)).await;
    step("cache stop", handle.stop()).await.unwrap();
    step("cache instance stop", instance.stop()).await.unwrap();

    // While the cache is away: writes, a newer snapshot, and retention drops
    // every record before it.
    step(
        "writes while away",
        remote.batch_execute(
            "UPDATE items SET v = 'while away' WHERE id % 3 = 0; INSERT INTO events VALUES (4, 1, 'away')",
        ),
    )
    .await
    .unwrap();
    let lsn = step("remote LSN", remote_lsn(&remote)).await;
    let js = async_nats::jetstream::new(step("NATS connect", async_nats::connect(f.nats.url())).await.unwrap());
    let start = std::time::Instant::now();
    let newer = loop {
        let snapshot = step("newest snapshot", stream::newest_snapshot(&js, &f.stream)).await.unwrap().unwrap();
        if snapshot.applied_lsn >= lsn {
            break snapshot;
        }
        assert!(start.elapsed() < WAIT, "no snapshot past {lsn} in time: {snapshot:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let s = step("get stream", js.get_stream("retention")).await.unwrap();
    step("purge", std::future::IntoFuture::into_future(s.purge().sequence(newer.resume_seq))).await.unwrap();

    // Started as it is, the cache halts with an error that says so.
    let instance = step("instance start", Instance::start(InstanceOptions::persistent(&dir))).await.unwrap();
    assert!(!step("still covered", stream::still_covered(&f.stream, &instance)).await.unwrap());
    let handle = StreamReplication::start(instance.clone(), f.stream.clone()).unwrap();
    let error = step("the cache halts", handle.wait_streaming()).await.unwrap_err();
    assert!(error.message().contains("no longer holds the records"), "{error}");
    let _ = step("halted cache stop", handle.stop()).await;
    step("halted instance stop", instance.stop()).await.unwrap();

    // Started again from the newer snapshot, it catches up.
    let restored = step("rebootstrap", stream::rebootstrap(&f.stream, &dir)).await.unwrap();
    assert!(restored.resume_seq >= newer.resume_seq);
    let instance = step("instance restart", Instance::start(InstanceOptions::persistent(&dir))).await.unwrap();
    let handle = StreamReplication::start(instance.clone(), f.stream.clone()).unwrap();
    step("rebootstrapped cache caught up", catch_up(&handle, &remote)).await;
    step("items equal", assert_same(&remote, &instance, "items")).await;
    step("events equal", assert_same(&remote, &instance, "events")).await;
    step("cache stop at the end", handle.stop()).await.unwrap();
    step("publisher stop", publisher.stop()).await.unwrap();
}

/// Awaits `f` for at most [`WAIT`]; a hang fails naming the step.
async fn step<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("step `{what}` did not finish within {WAIT:?}"))
}

/// The table's `synced_lsn` in a cache (its copy's point).
async fn synced(local: &Instance, table: &str) -> Option<String> {
    let sql = "SELECT synced_lsn::text FROM pglite_cache.tables WHERE table_name = $1 AND state = 'ready'";
    let r = local.query(sql, &[&table]).await.unwrap();
    r.rows.first().map(|row| row.get::<String>(0))
}

/// Polls `check` until it holds, failing after [`WAIT`].
async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The stream's records: (Nats-Msg-Id, Pglite-Cache-Recopy header) of each.
async fn records(f: &Fixture) -> Vec<(String, Option<String>)> {
    let js = async_nats::jetstream::new(async_nats::connect(f.nats.url()).await.unwrap());
    let mut stream = js.get_stream(&f.stream.name).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
        out.push((header("Nats-Msg-Id").unwrap_or_default(), header("Pglite-Cache-Recopy")));
    }
    out
}

/// Schema changes that can be followed travel through the stream
/// (`fanout_schema.rs`); one that needs a new copy of the table (a type
/// change with a `USING` expression, which rewrites the remote table without
/// sending its rows; a volatile default) makes the publisher copy the table
/// again into the stream: the cache swaps the new copy in, once, and the
/// other tables are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_needing_a_new_copy_travels_as_a_new_copy_of_the_table() {
    let f = Fixture::start("recopy").await;
    let remote = f.pg.client(&f.db).await;
    let publisher = f.publisher().await;
    let (instance, cache) = f.cache("cache").await;
    remote.batch_execute("UPDATE items SET v = 'before' WHERE id = 1").await.unwrap();
    catch_up(&cache, &remote).await;
    let (items_at, events_at) = (synced(&instance, "items").await, synced(&instance, "events").await);
    assert!(items_at.is_some() && events_at.is_some());

    remote
        .batch_execute("ALTER TABLE items ALTER COLUMN v TYPE int USING length(v); UPDATE items SET n = 0 WHERE id = 1")
        .await
        .unwrap();
    // Changes go on while the copy is taken and travels.
    remote
        .batch_execute("UPDATE items SET v = v + 1 WHERE id <= 10; INSERT INTO events VALUES (2, 1, 'x')")
        .await
        .unwrap();
    wait_for("items copied again", async || synced(&instance, "items").await.is_some_and(|at| Some(at) != items_at))
        .await;
    remote.batch_execute("UPDATE items SET v = v * 2 WHERE id <= 5; DELETE FROM items WHERE id = 7").await.unwrap();
    catch_up(&cache, &remote).await;
    assert!(matches!(cache.status().phase, pglite_cache::replication::Phase::Streaming), "{:?}", cache.status());
    assert_same(&remote, &instance, "items").await;
    assert_same(&remote, &instance, "events").await;
    assert_eq!(synced(&instance, "events").await, events_at, "the other table is not copied again");
    let sql = "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'v'";
    let types = instance.query(sql, &[]).await.unwrap();
    assert_eq!(types.rows[0].get::<String>(0), "integer");

    // A volatile default (the remote rewrote the table with values that
    // never went through replication) copies that table in turn.
    remote
        .batch_execute("ALTER TABLE events ADD COLUMN r float8 DEFAULT random(); INSERT INTO events VALUES (3, 1, 'y')")
        .await
        .unwrap();
    wait_for("events copied again", async || synced(&instance, "events").await.is_some_and(|at| Some(at) != events_at))
        .await;
    remote.batch_execute("UPDATE items SET v = 0 WHERE id = 2; INSERT INTO events VALUES (4, 1, 'z')").await.unwrap();
    catch_up(&cache, &remote).await;
    assert_same(&remote, &instance, "items").await;
    assert_same(&remote, &instance, "events").await;

    // Exactly one copy of each in the stream; the records between a mark
    // and its copy say that it is pending, and the last one none.
    let records = records(&f).await;
    let copies: Vec<&String> =
        records.iter().map(|(id, _)| id).filter(|id| id.starts_with('c') && id.ends_with(".0")).collect();
    assert_eq!(copies.len(), 2, "{records:?}");
    assert!(records.iter().any(|(_, pending)| pending.is_some()), "{records:?}");
    assert_eq!(records.last().unwrap().1, None, "{records:?}");
    cache.stop().await.unwrap();
    publisher.stop().await.unwrap();
}

/// A change needing a new copy that the publisher did not mark (here it saw
/// it as the table's first Relation message of its session, after a
/// restart, with nothing to compare it with) halts the cache instead of
/// applying into the old shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmarked_change_needing_a_new_copy_halts_a_stream_fed_cache_instead_of_diverging() {
    let f = Fixture::start("retype").await;
    let remote = f.pg.client(&f.db).await;
    let publisher = f.publisher().await;
    let (_instance, cache) = f.cache("cache").await;
    remote.batch_execute("UPDATE items SET v = 'before' WHERE id = 1").await.unwrap();
    catch_up(&cache, &remote).await;
    publisher.stop().await.unwrap();
    remote
        .batch_execute("ALTER TABLE items ALTER COLUMN v TYPE int USING length(v); UPDATE items SET n = 0 WHERE id = 1")
        .await
        .unwrap();
    let publisher = f.publisher().await;
    let mut status = cache.watch_status();
    let halted = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| matches!(s.phase, pglite_cache::replication::Phase::Halted { .. })),
    )
    .await
    .expect("the cache halts")
    .unwrap()
    .clone();
    let pglite_cache::replication::Phase::Halted { error } = halted.phase else { unreachable!() };
    assert!(error.contains("changed type upstream from text to integer"), "{error}");
    assert!(error.contains("did not put a new copy of the table in the stream"), "{error}");
    publisher.stop().await.unwrap();
}
