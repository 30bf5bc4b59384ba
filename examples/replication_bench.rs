//! Replication benchmark: pglite-cache vs native PostgreSQL logical
//! replication, side by side in one run, on the same publisher.
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/main/target cargo run --release --example replication_bench [ROWS] [TXN_ROWS]
//! # the publisher with synchronous_commit = on (the other regime):
//! BENCH_PUB_SETTINGS=synchronous_commit=on cargo run --release --example replication_bench
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
                     payload text NOT NULL); CREATE TABLE marker (id int PRIMARY KEY); \
                     CREATE TABLE accounts (aid int PRIMARY KEY, abalance int NOT NULL); \
                     CREATE TABLE history (hid bigserial PRIMARY KEY, aid int NOT NULL, delta int NOT NULL);";

/// pgbench-style load: clients and seconds.
const LOAD_CLIENTS: usize = 4;
const LOAD_SECONDS: u64 = 10;
const ACCOUNTS: i32 = 10_000;
/// Rows of the one huge transaction.
const HUGE_TXN_ROWS: i32 = 1_000_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args: Vec<String> = std::env::args().collect();
    let rows: i32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let txn_rows: i32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);

    // Extra publisher settings, e.g. BENCH_PUB_SETTINGS="synchronous_commit=on" (the
    // test harness's default is off: the walsender then sends on the walwriter's beat).
    let pub_settings = std::env::var("BENCH_PUB_SETTINGS").unwrap_or_default();
    let mut settings = vec![("track_commit_timestamp", "on")];
    for kv in pub_settings.split(',').filter(|s| !s.is_empty()) {
        settings.push(kv.split_once('=').expect("BENCH_PUB_SETTINGS is name=value,name=value"));
    }
    println!("publisher settings: {settings:?}");
    let publisher = pg::PgCluster::start_with(&settings);
    let subscriber = pg::PgCluster::start();
    let db = publisher.create_database("bench").await;
    subscriber.create_database("bench").await;
    let remote = publisher.client(&db).await;
    remote.batch_execute(TABLE).await.unwrap();
    remote
        .batch_execute(&format!(
            "INSERT INTO bench SELECT i, i % 1000, 'label ' || (i % 97), now() - i * interval '1 second', \
             md5(i::text) || md5((i * 7)::text) FROM generate_series(1, {rows}) i; \
             INSERT INTO accounts SELECT i, 0 FROM generate_series(1, {ACCOUNTS}) i; \
             CREATE PUBLICATION pub FOR TABLE bench, marker, accounts, history;"
        ))
        .await
        .unwrap();
    remote.batch_execute("VACUUM ANALYZE bench").await.unwrap();
    let size: i64 = remote.query_one("SELECT pg_total_relation_size('bench')", &[]).await.unwrap().get(0);
    println!("publisher: {rows} rows, {:.0} MiB with indexes", size as f64 / (1 << 20) as f64);

    // Native subscriber.
    let native = subscriber.client(&db).await;
    native.batch_execute(TABLE).await.unwrap();
    // When each history row was applied (the subscriber may have extra columns).
    native
        .batch_execute(
            "ALTER TABLE history ADD COLUMN applied_at timestamptz; \
             CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN NEW.applied_at := clock_timestamp(); RETURN NEW; END $$; \
             CREATE TRIGGER stamp BEFORE INSERT ON history FOR EACH ROW EXECUTE FUNCTION stamp(); \
             ALTER TABLE history ENABLE ALWAYS TRIGGER stamp;",
        )
        .await
        .unwrap();
    let started = Instant::now();
    native
        .batch_execute(&format!("CREATE SUBSCRIPTION sub CONNECTION '{}' PUBLICATION pub", publisher.conninfo(&db)))
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
    // BENCH_DATA=DIR: a persistent instance there (each position synced to
    // disk before it is confirmed; BENCH_NO_SYNC=1 skips that).
    let data = std::env::var("BENCH_DATA").ok().filter(|d| !d.is_empty());
    let sync = std::env::var("BENCH_NO_SYNC").is_err();
    println!(
        "pglite-cache instance: {}",
        match &data {
            Some(dir) => format!("persistent in {dir}, sync before confirm: {sync}"),
            None => "in memory".into(),
        }
    );
    let mut options = match &data {
        Some(dir) => InstanceOptions::persistent(dir),
        None => InstanceOptions::in_memory(),
    };
    for kv in std::env::var("BENCH_SETTINGS").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').expect("BENCH_SETTINGS is name=value,name=value");
        options = options.setting(k, v);
    }
    let local = Instance::start(options).await.unwrap();
    let config =
        ReplicationConfig::new(publisher.conninfo(&db).parse().unwrap(), PublicationSpec::Existing("pub".into()))
            .slot_name("cache")
            .sync_before_confirm(sync);
    let started = Instant::now();
    let handle = Replication::start(local.clone(), config.clone()).unwrap();
    handle.wait_streaming().await.unwrap();
    let ours_copy = started.elapsed();
    if data.is_some() && sync {
        // What the copy costs to make durable (the first confirmation syncs it).
        let synced = Instant::now();
        local.sync_to_disk().await.unwrap();
        println!(
            "initial copy, then synced to disk: {:.2} s (sync {:.2} s)",
            (ours_copy + synced.elapsed()).as_secs_f64(),
            synced.elapsed().as_secs_f64()
        );
    }
    let local_rows: i64 = local.query("SELECT count(*) FROM bench", &[]).await.unwrap().rows[0].get(0);
    assert_eq!(local_rows, i64::from(rows));

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
        (format!("DELETE of the {txn_rows} rows"), format!("DELETE FROM bench WHERE id > {rows}")),
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
        remote.batch_execute(&format!("INSERT INTO marker VALUES ({marker})")).await.unwrap();
        let marker = marker as i32;
        loop {
            if !native.query("SELECT 1 FROM marker WHERE id = $1", &[&marker]).await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let native_time = committed.elapsed();
        native.batch_execute("ALTER SUBSCRIPTION sub DISABLE").await.unwrap();
        let restarted = Instant::now();
        let h = Replication::start(local.clone(), config.clone()).unwrap();
        loop {
            if !local.query("SELECT 1 FROM marker WHERE id = $1", &[&marker]).await.unwrap().rows.is_empty() {
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
    let handle = handle.take().unwrap();

    // pgbench-style small transactions, native alone first, then ours alone.
    let mut lag_rows = Vec::new();
    let huge;
    {
        handle.stop().await.unwrap();
        let (tps, from, to) = run_load(&publisher, &db).await;
        let done = committed_marker(&remote, 100).await;
        loop {
            if !native.query("SELECT 1 FROM marker WHERE id = 100", &[]).await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let catch_up = done.elapsed();
        // Lag per transaction: applied on the subscriber minus committed on the publisher.
        let committed: std::collections::HashMap<i64, f64> = remote
            .query(
                "SELECT hid, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM history WHERE hid BETWEEN $1 AND $2",
                &[&from, &to],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut lags: Vec<f64> = native
            .query(
                "SELECT hid, extract(epoch FROM applied_at)::float8 FROM history WHERE hid BETWEEN $1 AND $2",
                &[&from, &to],
            )
            .await
            .unwrap()
            .iter()
            .filter_map(|r| committed.get(&r.get::<_, i64>(0)).map(|c| r.get::<_, f64>(1) - c))
            .collect();
        lag_rows.push(("native subscriber", tps, percentile(&mut lags, 0.5), percentile(&mut lags, 0.99), catch_up));
    }
    {
        native.batch_execute("ALTER SUBSCRIPTION sub DISABLE").await.unwrap();
        let handle = Replication::start(local.clone(), config.clone()).unwrap();
        let lsn: pglite_cache::replication::Lsn = remote
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            .parse()
            .unwrap();
        handle.wait_for_lsn(lsn).await.unwrap();
        let mut applied = handle.subscribe();
        let collector = tokio::spawn(async move {
            let mut lags = Vec::new();
            loop {
                match applied.recv().await {
                    Ok(tx) => {
                        let now = std::time::SystemTime::now();
                        if tx.changes.iter().any(|c| c.table == "history") {
                            lags.push(now.duration_since(tx.commit_time).unwrap_or_default().as_secs_f64());
                        }
                        if tx.changes.iter().any(|c| c.table == "marker") {
                            return lags;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return lags,
                }
            }
        });
        let (tps, _, _) = run_load(&publisher, &db).await;
        let done = committed_marker(&remote, 101).await;
        let mut lags = collector.await.unwrap();
        let catch_up = done.elapsed();
        lag_rows.push(("pglite-cache", tps, percentile(&mut lags, 0.5), percentile(&mut lags, 0.99), catch_up));

        // One huge transaction: memory must not grow with it.
        let before = peak_rss_mib();
        remote
            .batch_execute(&format!(
                "INSERT INTO bench SELECT i, i % 1000, 'huge', now(), md5(i::text) FROM generate_series({}, {}) i",
                rows + 10_000_000,
                rows + 10_000_000 + HUGE_TXN_ROWS - 1
            ))
            .await
            .unwrap();
        let committed = Instant::now();
        let lsn: pglite_cache::replication::Lsn = remote
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            .parse()
            .unwrap();
        handle.wait_for_lsn(lsn).await.unwrap();
        let took = committed.elapsed();
        huge = Some((took, before, peak_rss_mib()));
        handle.stop().await.unwrap();
    }

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
    println!();
    println!(
        "| pgbench-style load, {LOAD_CLIENTS} clients, {LOAD_SECONDS} s (UPDATE + INSERT per txn) | publisher TPS | lag p50 | lag p99 | catch-up after the load |"
    );
    println!("|---|---|---|---|---|");
    for (who, tps, p50, p99, catch_up) in lag_rows {
        println!(
            "| {who} | {tps:.0} | {:.1} ms | {:.1} ms | {:.0} ms |",
            p50 * 1000.0,
            p99 * 1000.0,
            catch_up.as_secs_f64() * 1000.0
        );
    }
    if let Some((took, before, after)) = huge {
        println!();
        println!(
            "pglite-cache, one {HUGE_TXN_ROWS}-row INSERT transaction: applied {:.0} rows/s ({:.2} s from commit); \
             peak RSS of the whole process {before:.0} MiB before it, {after:.0} MiB after",
            f64::from(HUGE_TXN_ROWS) / took.as_secs_f64(),
            took.as_secs_f64()
        );
    }
}

/// Runs the load; returns the publisher's TPS and the history ids written.
async fn run_load(publisher: &pg::PgCluster, db: &str) -> (f64, i64, i64) {
    let first: i64 = publisher
        .client(db)
        .await
        .query_one("SELECT coalesce(max(hid), 0) + 1 FROM history", &[])
        .await
        .unwrap()
        .get(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(LOAD_SECONDS);
    let mut clients = Vec::new();
    for c in 0..LOAD_CLIENTS {
        let client = publisher.client(db).await;
        clients.push(tokio::spawn(async move {
            let mut seed = 12345u64 + c as u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let aid = (seed >> 33) as i32 % ACCOUNTS + 1;
                client
                    .batch_execute(&format!(
                        "BEGIN; UPDATE accounts SET abalance = abalance + 1 WHERE aid = {aid}; \
                         INSERT INTO history (aid, delta) VALUES ({aid}, 1); COMMIT;"
                    ))
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    let tps = total as f64 / started.elapsed().as_secs_f64();
    let last: i64 = publisher.client(db).await.query_one("SELECT max(hid) FROM history", &[]).await.unwrap().get(0);
    (tps, first, last)
}

/// Commits a marker row; returns when it was committed.
async fn committed_marker(remote: &tokio_postgres::Client, id: i32) -> Instant {
    remote.execute("INSERT INTO marker VALUES ($1)", &[&id]).await.unwrap();
    Instant::now()
}

/// Peak resident memory of this process so far (`VmHWM`), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() - 1) as f64 * p).round() as usize]
}
