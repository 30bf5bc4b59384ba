//! `pglite-cache sync` through the real binary: a kill -9 during the
//! initial copy keeps the finished tables, confirmed positions are on disk
//! first (seen with strace), and `pglite-cache resync` reaches a running
//! daemon or the next start.

mod support;

use std::process::Command;
use std::time::{Duration, SystemTime};

use pglite_cache::local_postgres::LocalPostgres;
use support::daemon::{BIN, Daemon, free_port, http_get, metric, wait_vacuumed_and_analyzed};
use support::replication::HASH;
use tokio_postgres::{Client, NoTls};

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Waits until the cache holds exactly the remote's rows.
async fn assert_in_sync(remote: &Client, cache: &Client, tables: &[&str]) {
    let start = std::time::Instant::now();
    for table in tables {
        loop {
            let r = remote.query_one(&format!("{HASH}{table} t"), &[]).await.unwrap();
            let c = cache.query_one(&format!("{HASH}{table} t"), &[]).await.unwrap();
            let (r, c): ((String, String), (String, String)) = ((r.get(0), r.get(1)), (c.get(0), c.get(1)));
            if r == c {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{table} differs: remote {r:?} cache {c:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The LSN each table's copy was taken at.
async fn synced_lsns(cache: &Client) -> Vec<(String, String)> {
    cache
        .query("SELECT table_name::text, synced_lsn::text FROM pglite_cache.tables ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_the_initial_copy_keeps_the_finished_tables() {
    let remote = LocalPostgres::start(&[]).expect("start PostgreSQL");
    let admin = connect(&remote.conninfo("postgres")).await;
    admin
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 1000) g; \
             CREATE TABLE b (id int PRIMARY KEY, v text); \
             INSERT INTO b SELECT g, repeat('b', 40) || g FROM generate_series(1, 1500000) g; \
             CREATE TABLE c (id int PRIMARY KEY); INSERT INTO c SELECT generate_series(1, 10);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let mut daemon = Daemon::spawn(&[], &remote.url("postgres"), &data, &["--tables", "a,b,c"]);
    daemon
        .wait_until(Duration::from_secs(120), "copying b with a done", |d| {
            d.table_state("public.a").as_deref() == Some("ready")
                && d.table_state("public.b").as_deref() == Some("copying")
        })
        .await;
    daemon.signal(daemon.child.id(), "-KILL");
    daemon.wait(Duration::from_secs(10));
    admin
        .batch_execute("INSERT INTO a VALUES (0, 'while down'); UPDATE b SET v = 'changed' WHERE id <= 5;")
        .await
        .unwrap();

    let mut daemon = Daemon::spawn(&[], &remote.url("postgres"), &data, &["--tables", "a,b,c"]);
    let cache = daemon.client().await;
    assert_in_sync(&admin, &cache, &["a", "b", "c"]).await;
    let log = daemon.stderr();
    assert!(log.contains("resuming the interrupted initial copy"), "{log}");
    // a kept the copy taken at the slot's consistent point; b and c were
    // copied later, from a newer snapshot.
    let lsns = synced_lsns(&cache).await;
    let lsn = |t: &str| lsns.iter().find(|(n, _)| n == t).unwrap().1.parse::<pglite_cache::replication::Lsn>().unwrap();
    assert!(lsn("a") < lsn("b") && lsn("b") == lsn("c"), "{lsns:?}");
    admin.batch_execute("INSERT INTO a VALUES (-1, 'streamed'); DELETE FROM c WHERE id = 3;").await.unwrap();
    assert_in_sync(&admin, &cache, &["a", "b", "c"]).await;
    daemon.signal(daemon.child.id(), "-TERM");
    assert!(daemon.wait(Duration::from_secs(30)).success(), "{}", daemon.stderr());
}

/// Counts syscalls by name in an strace output file.
fn count_calls(trace: &str, name: &str) -> usize {
    trace
        .lines()
        .filter(|l| l.split_once(' ').is_some_and(|(_, rest)| rest.trim_start().starts_with(&format!("{name}("))))
        .count()
}

/// The daemon confirms a position to the remote only after syncing the
/// cache's filesystem: strace shows the `syncfs` calls, and shows that the
/// engine itself never calls fsync(2)/fdatasync(2) (it runs with
/// `fsync = off`; its own fsync would be a no-op flush anyway), which is
/// why the host syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_positions_are_synced_to_disk_first() {
    let strace = Command::new("strace").arg("-V").output();
    assert!(strace.is_ok_and(|o| o.status.success()), "this test needs strace (apt-get install strace)");
    let remote = LocalPostgres::start(&[]).expect("start PostgreSQL");
    let admin = connect(&remote.conninfo("postgres")).await;
    admin.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let trace = dir.path().join("strace.out");
    let wrapper = ["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,syncfs", "-o", trace.to_str().unwrap()];
    let mut daemon = Daemon::spawn(&wrapper, &remote.url("postgres"), &data, &["--tables", "t"]);
    let cache = daemon.client().await;
    let before = std::fs::read_to_string(&trace).unwrap_or_default();
    for i in 0..20 {
        admin.batch_execute(&format!("INSERT INTO t VALUES ({i}, 'row {i}')")).await.unwrap();
    }
    let written: String = admin.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
    assert_in_sync(&admin, &cache, &["t"]).await;
    // Wait for the remote to hear the confirmation of those commits.
    let start = std::time::Instant::now();
    loop {
        let confirmed: bool = admin
            .query_one("SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots", &[&written])
            .await
            .unwrap()
            .get(0);
        if confirmed {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never confirmed {written}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = std::fs::read_to_string(&trace).unwrap();
    let syncs = count_calls(&after, "syncfs") - count_calls(&before, "syncfs");
    let fsyncs = count_calls(&after, "fsync") + count_calls(&after, "fdatasync");
    eprintln!("while streaming 20 transactions: {syncs} syncfs; fsync/fdatasync over the whole run: {fsyncs}");
    assert!(syncs >= 1, "confirmed without syncing the cache's filesystem:\n{after}");
    assert_eq!(fsyncs, 0, "the engine now fsyncs by itself; revisit the durability notes:\n{after}");
    // Stop the daemon (strace's child), then strace ends too.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", daemon.child.id())).unwrap();
    let pid: u32 = children.split_whitespace().next().expect("the daemon under strace").parse().unwrap();
    daemon.signal(pid, "-TERM");
    assert!(daemon.wait(Duration::from_secs(60)).success(), "{}", daemon.stderr());
}

fn resync_command(data: &std::path::Path, tables: &[&str]) -> (i32, String) {
    let mut command = Command::new(BIN);
    command.arg("resync").arg("--data").arg(data);
    for t in tables {
        command.args(["--table", t]);
    }
    let out = command.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// `pglite-cache resync` while the daemon runs (it obeys within a second,
/// clients keep reading) and while it is stopped (the next start does it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_command_reaches_the_daemon_or_the_next_start() {
    let remote = LocalPostgres::start(&[]).expect("start PostgreSQL");
    let admin = connect(&remote.conninfo("postgres")).await;
    admin
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT g, 'a' FROM generate_series(1, 1000) g; \
             CREATE TABLE b (id int PRIMARY KEY); INSERT INTO b SELECT generate_series(1, 1000);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let mut daemon = Daemon::spawn(&[], &remote.url("postgres"), &data, &["--tables", "a,b"]);
    let cache = daemon.client().await;
    assert_in_sync(&admin, &cache, &["a", "b"]).await;
    let before = synced_lsns(&cache).await;

    // Running: the request file is obeyed; only b is copied again.
    let (code, out) = resync_command(&data, &["public.b"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("requested"), "{out}");
    let start = std::time::Instant::now();
    loop {
        let now = synced_lsns(&cache).await;
        if now.len() == 2 && now[1].1 != before[1].1 {
            assert_eq!(now[0], before[0], "a is not copied again");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "b was not resynced: {now:?}\n{}", daemon.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.batch_execute("INSERT INTO b VALUES (0)").await.unwrap();
    assert_in_sync(&admin, &cache, &["a", "b"]).await;
    daemon.signal(daemon.child.id(), "-TERM");
    assert!(daemon.wait(Duration::from_secs(30)).success(), "{}", daemon.stderr());

    // Stopped: recorded in the cache, carried out by the next start.
    let (code, out) = resync_command(&data, &["nope"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not replicated"), "{out}");
    let (code, out) = resync_command(&data, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("next `pglite-cache sync"), "{out}");
    let mut daemon = Daemon::spawn(&[], &remote.url("postgres"), &data, &["--tables", "a,b"]);
    let cache = daemon.client().await;
    let start = std::time::Instant::now();
    loop {
        let now = synced_lsns(&cache).await;
        if now.len() == 2 && now.iter().zip(&before).all(|(n, b)| n.1 != b.1) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "not resynced: {now:?}\n{}", daemon.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_in_sync(&admin, &cache, &["a", "b"]).await;
}

/// A wire client's error inside a PL/pgSQL exception block (which the
/// engine cannot catch) makes the cache's engine restart when that
/// client's transaction ends; the replication takes it as an interruption,
/// reconnects and goes on: the daemon keeps serving and stays in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_restart_interrupts_the_replication_only() {
    let remote = LocalPostgres::start(&[]).expect("start PostgreSQL");
    let admin = connect(&remote.conninfo("postgres")).await;
    admin
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT g, 'a' FROM generate_series(1, 100) g",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let mut daemon = Daemon::spawn(&[], &remote.url("postgres"), &data, &["--tables", "a"]);
    let cache = daemon.client().await;
    assert_in_sync(&admin, &cache, &["a"]).await;
    // A function of the cache's own (not replicated), with an exception block.
    cache
        .batch_execute(
            "CREATE FUNCTION safe_div(a int, b int) RETURNS int LANGUAGE plpgsql AS \
             $$ BEGIN RETURN a / b; EXCEPTION WHEN division_by_zero THEN RETURN NULL; END $$",
        )
        .await
        .unwrap();
    let err = cache.query_one("SELECT safe_div(1, 0)", &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{err}");
    drop(cache);
    admin
        .batch_execute(
            "INSERT INTO a SELECT g, 'b' FROM generate_series(101, 200) g; UPDATE a SET v = 'c' WHERE id <= 10",
        )
        .await
        .unwrap();
    let cache = daemon.client().await;
    assert_in_sync(&admin, &cache, &["a"]).await;
    assert!(daemon.alive(), "{}", daemon.stderr());
    assert!(daemon.stderr().contains("instance restarted after a crash"), "{}", daemon.stderr());
}

/// A cache that only ever receives changes is vacuumed and analyzed: the
/// copied table gets column statistics for the planner, and the dead rows
/// of the remote's updates and deletes are cleaned up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_tables_are_vacuumed_and_analyzed() {
    let remote = LocalPostgres::start(&[]).expect("start PostgreSQL");
    let admin = connect(&remote.conninfo("postgres")).await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int, s text); \
             INSERT INTO t SELECT g, g, 's' || g FROM generate_series(1, 20000) g;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let args = ["--tables", "t", "--maintenance-interval", "1", "--metrics", &metrics_addr];
    let mut daemon = Daemon::spawn(&[], &remote.url("postgres"), &data, &args);
    let cache = daemon.client().await;
    assert_in_sync(&admin, &cache, &["t"]).await;
    admin.batch_execute("UPDATE t SET v = v + 1; DELETE FROM t WHERE id % 4 = 0").await.unwrap();
    assert_in_sync(&admin, &cache, &["t"]).await;
    // 20,000 updated and 5,000 deleted rows left dead versions behind.
    let changed = SystemTime::now();
    let dead = wait_vacuumed_and_analyzed(&cache, "t", changed, Duration::from_secs(60)).await;
    assert!(dead < 1000, "{dead} dead rows left after the vacuum");
    let stats: i64 = cache
        .query_one("SELECT count(*) FROM pg_stats WHERE tablename = 't' AND attname IN ('id', 'v', 's')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stats, 3, "the planner has column statistics for the replicated table");
    // The operator sees it: commands run and the time they held the engine.
    let body = http_get(metrics, "/metrics").await.unwrap();
    assert!(metric(&body, "pglite_cache_maintenance_commands_total") >= 1.0, "{body}");
    assert!(metric(&body, "pglite_cache_maintenance_seconds_total") > 0.0, "{body}");
    assert_eq!(metric(&body, "pglite_cache_maintenance_failures_total"), 0.0, "{body}");
    assert!(daemon.stderr().contains("maintenance"), "{}", daemon.stderr());
    assert!(daemon.alive(), "{}", daemon.stderr());
}
