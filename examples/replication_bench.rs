//! Replication benchmark: pglite-cache vs native PostgreSQL logical
//! replication, side by side in one run, on the same publisher.
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/main/target cargo run --release --example replication_bench [ROWS] [TXN_ROWS]
//! ```
//!
//! Starts a publisher cluster and a native subscriber cluster (PostgreSQL
//! 15, started like the tests do; fsync off on both), then measures:
//! - initial copy of ROWS rows (default 1,000,000);
//! - one TXN_ROWS-row (default 200,000) INSERT transaction, then an UPDATE
//!   and a DELETE of the same rows, each from the publisher's commit to
//!   the change being visible on the subscriber (a marker row committed
//!   right after it becomes visible).

#[path = "../tests/support/pg.rs"]
mod pg;

use std::time::{Duration, Instant};

use pglite_cache::replication::{PublicationSpec, Replication, ReplicationConfig};
use pglite_cache::{Instance, InstanceOptions};

const TABLE: &str = "CREATE TABLE bench (id int PRIMARY KEY, n int NOT NULL, label text NOT NULL, at timestamptz NOT NULL, \
                     payload text NOT NULL); CREATE TABLE marker (id int PRIMARY KEY);";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().collect();
    let rows: i64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let txn_rows: i64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);

    let publisher = pg::PgCluster::start();
    let subscriber = pg::PgCluster::start();
    let db = publisher.create_database("bench").await;
    subscriber.create_database("bench").await;
    let remote = publisher.client(&db).await;
    remote.batch_execute(TABLE).await.unwrap();
    remote
        .batch_execute(&format!(
            "INSERT INTO bench SELECT i, i % 1000, 'label ' || (i % 97), now() - i * interval '1 second', \
             md5(i::text) || md5((i * 7)::text) FROM generate_series(1, {rows}) i; \
             CREATE PUBLICATION pub FOR TABLE bench, marker;"
        ))
        .await
        .unwrap();
    remote.batch_execute("VACUUM ANALYZE bench").await.unwrap();
    let size: i64 = remote
        .query_one("SELECT pg_total_relation_size('bench')", &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "publisher: {rows} rows, {:.0} MiB with indexes",
        size as f64 / (1 << 20) as f64
    );

    // Native subscriber.
    let native = subscriber.client(&db).await;
    native.batch_execute(TABLE).await.unwrap();
    let started = Instant::now();
    native
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION sub CONNECTION '{}' PUBLICATION pub",
            publisher.conninfo(&db)
        ))
        .await
        .unwrap();
    loop {
        let pending: i64 = native
            .query_one("SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'", &[])
            .await
            .unwrap()
            .get(0);
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let native_copy = started.elapsed();

    // pglite-cache.
    // Extra instance settings, e.g. BENCH_SETTINGS="wal_level=minimal,max_wal_senders=0".
    let mut options = InstanceOptions::in_memory();
    for kv in std::env::var("BENCH_SETTINGS")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv.split_once('=').expect("BENCH_SETTINGS is name=value,name=value");
        options = options.setting(k, v);
    }
    let local = Instance::start(options).await.unwrap();
    let config = ReplicationConfig::new(
        publisher.conninfo(&db).parse().unwrap(),
        PublicationSpec::Existing("pub".into()),
    )
    .slot_name("cache");
    let started = Instant::now();
    let handle = Replication::start(local.clone(), config.clone()).unwrap();
    handle.wait_streaming().await.unwrap();
    let ours_copy = started.elapsed();
    let local_rows: i64 = local.query("SELECT count(*) FROM bench", &[]).await.unwrap().rows[0].get(0);
    assert_eq!(local_rows, rows);

    let mut results = vec![("initial copy".to_string(), rows, native_copy, ours_copy)];

    let workloads = [
        (
            format!("{txn_rows}-row INSERT txn"),
            format!(
                "INSERT INTO bench SELECT i, i % 1000, 'new', now(), md5(i::text) FROM generate_series({}, {}) i",
                rows + 1,
                rows + txn_rows
            ),
        ),
        (
            format!("UPDATE of the {txn_rows} rows"),
            format!("UPDATE bench SET n = n + 1, label = 'updated' WHERE id > {rows}"),
        ),
        (
            format!("DELETE of the {txn_rows} rows"),
            format!("DELETE FROM bench WHERE id > {rows}"),
        ),
    ];
    // Each workload is measured for one subscriber at a time (they would
    // compete for the 2 cores otherwise): native first while ours is
    // stopped, then ours while the native subscription is disabled. Native
    // is timed from the publisher's commit; ours from its restart, which
    // also counts reconnecting (conservative for us).
    let mut handle = Some(handle);
    for (marker, (name, sql)) in workloads.iter().enumerate() {
        if let Some(h) = handle.take() {
            h.stop().await.unwrap();
        }
        remote.batch_execute(sql).await.unwrap();
        let committed = Instant::now();
        remote
            .batch_execute(&format!("INSERT INTO marker VALUES ({marker})"))
            .await
            .unwrap();
        let marker = marker as i32;
        loop {
            if !native
                .query("SELECT 1 FROM marker WHERE id = $1", &[&marker])
                .await
                .unwrap()
                .is_empty()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let native_time = committed.elapsed();
        native.batch_execute("ALTER SUBSCRIPTION sub DISABLE").await.unwrap();
        let restarted = Instant::now();
        let h = Replication::start(local.clone(), config.clone()).unwrap();
        loop {
            if !local
                .query("SELECT 1 FROM marker WHERE id = $1", &[&marker])
                .await
                .unwrap()
                .rows
                .is_empty()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ours_time = restarted.elapsed();
        handle = Some(h);
        native.batch_execute("ALTER SUBSCRIPTION sub ENABLE").await.unwrap();
        // Wait for the native apply worker to be back before the next workload.
        loop {
            let running: i64 = native
                .query_one("SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL", &[])
                .await
                .unwrap()
                .get(0);
            if running > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        results.push((name.clone(), txn_rows, native_time, ours_time));
    }
    handle.take().unwrap().stop().await.unwrap();

    println!();
    println!("| workload | rows | native subscriber | pglite-cache | ratio |");
    println!("|---|---|---|---|---|");
    for (name, n, native, ours) in results {
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        println!(
            "| {name} | {n} | {:.0} rows/s ({:.2} s) | {:.0} rows/s ({:.2} s) | {:.2}x |",
            rate(native),
            native.as_secs_f64(),
            rate(ours),
            ours.as_secs_f64(),
            rate(ours) / rate(native)
        );
    }
}
