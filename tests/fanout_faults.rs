//! Fan-out under faults, through the real binary: `pglite-cache publish` and
//! `pglite-cache sync --nats` as child processes, a real nats-server and a
//! real PostgreSQL. kill -9 of the publisher, of a cache and of nats-server
//! while a writer inserts; then every row is in the cache exactly once
//! (insert-only table without a primary key: a duplicate would show).

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::daemon::{Proc, free_port};
use support::nats::NatsServer;
use support::pg::PgCluster;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(120);

struct Setup {
    pg: PgCluster,
    db: String,
    nats: NatsServer,
    dir: tempfile::TempDir,
    cache_port: u16,
}

impl Setup {
    fn publisher(&self) -> Proc {
        let args = [
            "publish",
            "--source",
            &self.pg.conninfo(&self.db),
            "--nats",
            &self.nats.url(),
            "--stream",
            "faults",
            "--publication",
            "pub",
            "--data",
            &self.dir.path().join("publisher").display().to_string(),
        ]
        .map(String::from);
        Proc::spawn(&args, self.dir.path().join("publisher.log"))
    }

    fn cache(&self) -> Proc {
        let args = [
            "sync",
            "--nats",
            &self.nats.url(),
            "--stream",
            "faults",
            "--data",
            &self.cache_dir().display().to_string(),
            "--socket-dir",
            &self.dir.path().display().to_string(),
            "--port",
            &self.cache_port.to_string(),
            "--status-interval",
            "1",
        ]
        .map(String::from);
        Proc::spawn(&args, self.dir.path().join("cache.log"))
    }

    fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    async fn cache_client(&self, cache: &mut Proc) -> Client {
        let conninfo =
            format!("host={} port={} user=postgres dbname=postgres", self.dir.path().display(), self.cache_port);
        cache.client(&conninfo, "SELECT 1 FROM events LIMIT 1").await
    }
}

/// (rows, distinct rows) of `events`.
async fn counts(client: &Client) -> (i64, i64) {
    let row = client.query_one("SELECT count(*), count(DISTINCT (writer, n)) FROM events", &[]).await.unwrap();
    (row.get(0), row.get(1))
}

/// Waits until the publisher's slot confirmed everything written so far
/// (so its records are in the stream).
async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool, log: impl Fn() -> String) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT, "{what} not reached in time:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn writer(
    client: Client,
    big: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<i64>) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let (mut n, mut rows) = (0i64, 0i64);
        while !*stopped.borrow() {
            n += 1;
            // Several rows per transaction; a kill between them must not split
            // it. While `big`, every 40th is big (~6 MB, ~25 records): kills
            // also land in transactions that travel in chunks.
            let big = big.load(std::sync::atomic::Ordering::Relaxed) && n % 40 == 0;
            let (writer, count) = if big { (2, 40_000) } else { (1, 5) };
            client
                .batch_execute(&format!(
                    "INSERT INTO events SELECT {writer}, {n}::bigint * 100000 + i, repeat(md5(i::text), 3) \
                     FROM generate_series(0, {count} - 1) i"
                ))
                .await
                .unwrap();
            rows += count;
            if n % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        rows
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_publisher_cache_and_nats_loses_and_repeats_nothing() {
    let pg = PgCluster::start();
    let db = pg.create_database("faults").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE events (writer int, n bigint, payload text); \
             INSERT INTO events SELECT 0, i, 'seed' FROM generate_series(1, 1000) i; \
             CREATE PUBLICATION pub FOR TABLE events",
        )
        .await
        .unwrap();
    let setup = Setup { pg, db, nats: NatsServer::start(), dir: tempfile::tempdir().unwrap(), cache_port: free_port() };
    let mut setup = setup;
    let mut publisher = setup.publisher();
    let mut cache = setup.cache();
    let _ = setup.cache_client(&mut cache).await;
    let big = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (stop, load) = writer(setup.pg.client(&setup.db).await, big.clone());

    let js = async_nats::jetstream::new(async_nats::connect(setup.nats.url()).await.unwrap());
    // Records in the stream: proof that the publisher streams under load.
    let records = async |js: &async_nats::jetstream::Context| -> u64 {
        match js.get_stream("faults").await {
            Ok(stream) => stream.get_info().await.map(|i| i.state.last_sequence).unwrap_or(0),
            Err(_) => 0,
        }
    };
    let cache_rows = async |client: &Client| -> i64 { counts(client).await.0 };

    // kill -9 of the publisher while it publishes.
    let before = records(&js).await;
    wait_until("records before the publisher kill", async || records(&js).await > before + 50, || publisher.log())
        .await;
    publisher.kill9();
    publisher = setup.publisher();

    // kill -9 of the cache while it applies (and the new publisher publishes).
    let client = setup.cache_client(&mut cache).await;
    let before = (records(&js).await, cache_rows(&client).await);
    wait_until(
        "records and applied rows before the cache kill",
        async || records(&js).await > before.0 + 50 && cache_rows(&client).await > before.1 + 250,
        || format!("{}\n{}", publisher.log(), cache.log()),
    )
    .await;
    cache.kill9();
    cache = setup.cache();

    // kill -9 of nats-server while both run. Small transactions only from
    // here: after a nats-server restart, a cache catches up on big records
    // in bursts several seconds apart (a known issue, not a loss).
    big.store(false, std::sync::atomic::Ordering::Relaxed);
    let client = setup.cache_client(&mut cache).await;
    let before = (records(&js).await, cache_rows(&client).await);
    wait_until(
        "records and applied rows before the nats-server kill",
        async || records(&js).await > before.0 + 50 && cache_rows(&client).await > before.1 + 250,
        || format!("{}\n{}", publisher.log(), cache.log()),
    )
    .await;
    setup.nats.kill_and_restart();
    let js = async_nats::jetstream::new(async_nats::connect(setup.nats.url()).await.unwrap());
    let before = records(&js).await;
    wait_until("records after the nats-server kill", async || records(&js).await > before + 50, || publisher.log())
        .await;

    stop.send_replace(true);
    let rows = load.await.unwrap();
    let expected = counts(&remote).await;
    assert_eq!(expected.0, expected.1);
    assert_eq!(expected.0, 1000 + rows);
    assert!(rows > 40_000, "big transactions were written ({rows} rows)");

    let client = setup.cache_client(&mut cache).await;
    let start = Instant::now();
    loop {
        publisher.assert_running();
        let got = counts(&client).await;
        assert_eq!(got.0, got.1, "a row was applied twice");
        if got == expected {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "cache has {got:?} rows, the remote {expected:?}\npublisher:\n{}\ncache:\n{}",
            publisher.log(),
            cache.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(remote.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await.unwrap().get::<_, i64>(0), 1);
    // The faults hit running processes: both were started twice, and the
    // nats-server kill interrupted them.
    let (publisher_log, cache_log) = (publisher.log(), cache.log());
    if std::env::var_os("FANOUT_LOGS").is_some() {
        eprintln!("publisher:\n{publisher_log}\ncache:\n{cache_log}");
    }
    assert!(publisher_log.matches("publishing ").count() >= 2, "{publisher_log}");
    assert!(cache_log.matches("streaming from NATS").count() >= 2, "{cache_log}");
    assert!(publisher_log.contains("disconnected"), "the nats-server kill hit the publisher:\n{publisher_log}");
    assert!(cache_log.contains("disconnected"), "the nats-server kill hit the cache:\n{cache_log}");
}
