//! Replication on an ordinary working day: a remote whose output settings
//! differ, a half-open connection (the walsender stopped with SIGSTOP, the
//! slot then still held: 55006), and resyncs while clients read.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pglite_cache::replication::{Phase, Replication, SlotLostPolicy};
use support::pg::PgCluster;
use support::replication::{WAIT, assert_same, catch_up, config, drop_slot_behind_our_back, instance, wait_streaming};

/// The remote's database defaults change how values are printed; the
/// pinned session settings (as the walreceiver pins them) keep every value
/// exact, in the copy (text format here, forced by an enum array) and in
/// the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_do_not_depend_on_the_remote_output_settings() {
    let pg = PgCluster::start();
    let db = pg.create_database("styles").await;
    let admin = pg.client("postgres").await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET DateStyle = 'SQL, DMY'; ALTER DATABASE {db} SET extra_float_digits = 0; \
             ALTER DATABASE {db} SET IntervalStyle = 'sql_standard'"
        ))
        .await
        .unwrap();
    let remote = pg.client(&db).await;
    let shown = remote.query_one("SHOW DateStyle", &[]).await.unwrap().get::<_, String>(0);
    assert_eq!(shown, "SQL, DMY", "the database default applies to plain connections");
    let rows = "INSERT INTO t (d, ts, tstz, i, f4, f8, moods) VALUES \
        ('2024-03-04', '2024-03-04 05:06:07.891234', '2024-03-04 05:06:07.5+02', '1 year 2 mons 3 days 04:05:06.7', \
         0.1, 0.1::float8 + 0.2::float8, '{happy,sad}'), \
        ('1999-12-31', '1999-12-31 23:59:59', '1999-12-31 23:59:59-08', '-1 day +02:00:00', 3.4028235e38, \
         1.0 / 3.0, '{sad}'), \
        ('2000-01-13', '2000-01-13 00:00:00', '2000-01-13 00:00:00+00', '37 seconds', 1e-30, 2.718281828459045, NULL)";
    remote
        .batch_execute(&format!(
            "CREATE TYPE mood AS ENUM ('happy', 'sad'); \
             CREATE TABLE t (id serial PRIMARY KEY, d date, ts timestamp, tstz timestamptz, i interval, \
                             f4 real, f8 double precision, moods mood[]); \
             {rows}; CREATE PUBLICATION pub FOR TABLE t;"
        ))
        .await
        .unwrap();
    let local = instance().await;
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    wait_streaming(&handle).await;
    // The same rows again, now through the stream, plus an update.
    remote.batch_execute(&format!("{rows}; UPDATE t SET f8 = f8 * 3, i = i * 2 WHERE id = 2")).await.unwrap();
    catch_up(&handle, &remote).await;
    // Compare in one output format on both sides.
    remote.batch_execute("SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'").await.unwrap();
    assert_same(&remote, &local, "t").await;
    let exact = local.query("SELECT f8::text FROM t WHERE id = 4", &[]).await.unwrap();
    assert_eq!(exact.rows[0].get::<String>(0), "0.30000000000000004", "floats arrive with every digit");
    let date = local.query("SELECT d::text FROM t WHERE id = 4", &[]).await.unwrap();
    assert_eq!(date.rows[0].get::<String>(0), "2024-03-04", "day and month are not swapped");
    handle.stop().await.unwrap();
}

fn signal(pid: i32, signal: &str) {
    let ok = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {signal} {pid}");
}

/// A walsender that stops answering (SIGSTOP: the TCP connection stays up,
/// nothing arrives) is given up after the receive timeout; the reconnect
/// then finds the slot still held by it (55006) and retries instead of
/// halting, until the old walsender is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_remote_is_detected_within_the_receive_timeout() {
    let pg = PgCluster::start();
    let db = pg.create_database("halfopen").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 10) i; \
             CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await
        .unwrap();
    let local = instance().await;
    let timeout = Duration::from_secs(4);
    let cfg = config(&pg, &db, "pub").receive_timeout(timeout);
    let handle = Replication::start(local.clone(), cfg.clone()).unwrap();
    wait_streaming(&handle).await;
    let pid: i32 = remote
        .query_one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&cfg.slot_name])
        .await
        .unwrap()
        .get(0);

    signal(pid, "-STOP");
    let stopped = Instant::now();
    let mut status = handle.watch_status();
    let detected =
        tokio::time::timeout(timeout * 3, status.wait_for(|s| matches!(s.phase, Phase::Reconnecting { .. })))
            .await
            .unwrap_or_else(|_| {
                signal(pid, "-CONT");
                panic!("a silent remote went unnoticed for {:?}: {:?}", timeout * 3, handle.status())
            })
            .unwrap()
            .clone();
    let after = stopped.elapsed();
    assert!(after >= timeout / 2, "gave up after {after:?}, before the deadline");
    match &detected.phase {
        Phase::Reconnecting { error, .. } => assert!(error.contains("receive timeout"), "{error}"),
        other => panic!("{other:?}"),
    }

    // Reconnecting while the stopped walsender still holds the slot: 55006,
    // retried (never halted), with the hint naming what an operator can do.
    let held = tokio::time::timeout(
        WAIT,
        status.wait_for(
            |s| matches!(&s.phase, Phase::Reconnecting { error, .. } if error.contains("pg_terminate_backend")),
        ),
    )
    .await;
    let halted = matches!(handle.status().phase, Phase::Halted { .. });
    signal(pid, "-CONT");
    held.unwrap_or_else(|_| panic!("no 'slot in use' retry seen: {:?}", handle.status())).unwrap();
    assert!(!halted, "halted on a slot still in use: {:?}", handle.status());

    // Once the old walsender notices its client is gone, streaming resumes.
    remote.batch_execute("INSERT INTO t VALUES (11, 11); UPDATE t SET v = 0 WHERE id = 1;").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    assert_eq!(handle.status().phase, Phase::Streaming);
    handle.stop().await.unwrap();
}

/// Reads every table over and over and counts the failures (a missing or
/// half-copied table would be one).
fn spawn_readers(
    local: pglite_cache::Instance,
    tables: &'static [&'static str],
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<Vec<String>>, Arc<AtomicU64>) {
    let reads = Arc::new(AtomicU64::new(0));
    let counter = reads.clone();
    let task = tokio::spawn(async move {
        let mut failures = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            for table in tables {
                match local.query(&format!("SELECT count(*) FROM {table}"), &[]).await {
                    Ok(r) if r.rows[0].get::<i64>(0) > 0 => {}
                    Ok(_) => failures.push(format!("{table} was empty")),
                    Err(e) => failures.push(format!("{table}: {e}")),
                }
                counter.fetch_add(1, Ordering::Relaxed);
            }
            tokio::task::yield_now().await;
        }
        failures
    });
    (task, reads)
}

/// A lost slot with the resync policy, then resyncs asked for (every table,
/// one table): clients read throughout and never miss a table; afterwards
/// the contents equal the remote's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resyncs_keep_serving_the_old_tables_until_the_new_ones_are_in() {
    let pg = PgCluster::start();
    let db = pg.create_database("resync").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT i, repeat('x', 100) FROM generate_series(1, 50000) i; \
             CREATE TABLE b (id int PRIMARY KEY, v int); CREATE INDEX b_v ON b (v); INSERT INTO b SELECT i, i FROM generate_series(1, 20000) i; \
             CREATE PUBLICATION pub FOR TABLE a, b;",
        )
        .await
        .unwrap();
    let local = instance().await;
    let cfg = config(&pg, &db, "pub").on_slot_lost(SlotLostPolicy::Resync);
    let handle = Replication::start(local.clone(), cfg.clone()).unwrap();
    wait_streaming(&handle).await;
    let oid = |t: &'static str| {
        let local = local.clone();
        async move { local.query(&format!("SELECT '{t}'::regclass::oid::int8"), &[]).await.unwrap().rows[0].get::<i64>(0) }
    };
    let (a0, b0) = (oid("a").await, oid("b").await);

    let stop = Arc::new(AtomicBool::new(false));
    let (readers, reads) = spawn_readers(local.clone(), &["a", "b"], stop.clone());

    // The slot is lost: everything is copied again from a new slot.
    drop_slot_behind_our_back(&remote, &cfg.slot_name).await;
    remote.batch_execute("INSERT INTO a VALUES (0, 'after the loss'); DELETE FROM b WHERE id <= 10;").await.unwrap();
    let deadline = Instant::now() + WAIT;
    while oid("a").await == a0 || oid("b").await == b0 {
        assert!(Instant::now() < deadline, "not resynced: {:?}", handle.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "a").await;
    assert_same(&remote, &local, "b").await;

    // Asked for: every table, then one table, while writes go on.
    let (a1, b1) = (oid("a").await, oid("b").await);
    handle.resync().await.unwrap();
    remote.batch_execute("UPDATE a SET v = 'during' WHERE id < 100").await.unwrap();
    wait_streaming(&handle).await;
    catch_up(&handle, &remote).await;
    assert!(oid("a").await != a1 && oid("b").await != b1, "every table is copied again");
    let (a2, b2) = (oid("a").await, oid("b").await);
    handle.resync_tables(&["public.b".into()]).await.unwrap();
    remote.batch_execute("UPDATE b SET v = -v WHERE id < 100; INSERT INTO a VALUES (-1, 'x')").await.unwrap();
    let deadline = Instant::now() + WAIT;
    while oid("b").await == b2 {
        assert!(Instant::now() < deadline, "b not resynced: {:?}", handle.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(oid("a").await, a2, "only b is copied again");
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "a").await;
    assert_same(&remote, &local, "b").await;
    let indexed = local.query("SELECT count(*) FROM pg_indexes WHERE tablename = 'b'", &[]).await.unwrap();
    assert_eq!(indexed.rows[0].get::<i64>(0), 2, "keys and indexes come with the new copy");
    let err = handle.resync_tables(&["nope".into()]).await.unwrap_err();
    assert!(err.message().contains("not replicated"), "{err}");
    wait_streaming(&handle).await;

    stop.store(true, Ordering::Relaxed);
    let failures = readers.await.unwrap();
    assert!(failures.is_empty(), "readers saw a hole: {failures:?}");
    assert!(reads.load(Ordering::Relaxed) > 10, "the readers ran");
    handle.stop().await.unwrap();
}

/// A remote that accepts the TCP connection but never answers the startup
/// (a hung server, a proxy with nothing behind it) is retried after the
/// connect timeout instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_never_answers_the_startup_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept and hold every connection, never writing a byte.
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let source = format!("host=127.0.0.1 port={port} user=postgres dbname=x connect_timeout=2 sslmode=disable");
    let cfg = pglite_cache::replication::ReplicationConfig::new(
        source.parse().unwrap(),
        pglite_cache::replication::PublicationSpec::Existing("pub".into()),
    );
    let local = instance().await;
    let handle = Replication::start(local, cfg).unwrap();
    let mut status = handle.watch_status();
    let started = Instant::now();
    let reconnecting = tokio::time::timeout(WAIT, status.wait_for(|s| matches!(s.phase, Phase::Reconnecting { .. })))
        .await
        .expect("a silent remote hung the startup")
        .unwrap()
        .clone();
    assert!(started.elapsed() >= Duration::from_secs(2), "gave up before the timeout");
    match reconnecting.phase {
        Phase::Reconnecting { error, .. } => assert!(error.contains("did not complete startup"), "{error}"),
        other => panic!("{other:?}"),
    }
    handle.stop().await.unwrap();
    held.abort();
}
