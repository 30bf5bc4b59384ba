//! Replication when things go wrong: the walsender killed, the remote
//! restarted or unreachable, the slot lost, a stop during the initial copy,
//! TLS. Each test has its own cluster, database and slot.

mod support;

use std::time::Duration;

use pglite_cache::replication::{Phase, PublicationSpec, Replication, ReplicationConfig};
use support::pg::PgCluster;
use support::replication::{WAIT, assert_same, catch_up, config, drop_slot_behind_our_back, instance, wait_streaming};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_walsender_termination_and_remote_restart() {
    let mut pg = PgCluster::start();
    let db = pg.create_database("faults").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 10) i; \
             CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await
        .unwrap();
    let local = instance().await;
    let cfg = config(&pg, &db, "pub");
    let handle = Replication::start(local.clone(), cfg.clone()).unwrap();
    wait_streaming(&handle).await;

    // The walsender is terminated: reconnect, resume.
    let walsender: i32 = remote
        .query_one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&cfg.slot_name])
        .await
        .unwrap()
        .get::<_, Option<i32>>(0)
        .expect("the slot has a walsender while streaming");
    let killed: bool = remote.query_one("SELECT pg_terminate_backend($1)", &[&walsender]).await.unwrap().get(0);
    assert!(killed, "walsender {walsender} was terminated");
    remote.batch_execute("INSERT INTO t VALUES (11, 11); UPDATE t SET v = 0 WHERE id = 1;").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    // Caught up through a new walsender: the old one is gone.
    let now: Option<i32> = remote
        .query_one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&cfg.slot_name])
        .await
        .unwrap()
        .get(0);
    assert_ne!(now, Some(walsender), "the terminated walsender still serves the slot");

    // The remote goes away: the replication reports Reconnecting (awaited
    // while the remote is down, so the phase cannot be missed)...
    let mut statuses = handle.watch_status();
    pg.stop();
    tokio::time::timeout(WAIT, statuses.wait_for(|s| matches!(s.phase, Phase::Reconnecting { .. })))
        .await
        .unwrap_or_else(|_| panic!("no Reconnecting while the remote is down: {:?}", handle.status()))
        .unwrap();
    // ...and resumes once it is back.
    pg.start_again();
    let remote = pg.client(&db).await;
    remote.batch_execute("INSERT INTO t VALUES (12, 12); DELETE FROM t WHERE id = 2;").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    tokio::time::timeout(WAIT, statuses.wait_for(|s| s.phase == Phase::Streaming))
        .await
        .unwrap_or_else(|_| panic!("not streaming again: {:?}", handle.status()))
        .unwrap();
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_dropped_behind_our_back_halts_with_a_hint() {
    let pg = PgCluster::start();
    let db = pg.create_database("slotgone").await;
    let remote = pg.client(&db).await;
    remote.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t;").await.unwrap();
    let local = instance().await;
    let cfg = config(&pg, &db, "pub");
    let handle = Replication::start(local.clone(), cfg.clone()).unwrap();
    wait_streaming(&handle).await;
    // Terminate the walsender and drop the slot before we reconnect.
    drop_slot_behind_our_back(&remote, &cfg.slot_name).await;
    let error = halted_with(&handle).await;
    assert!(error.contains("decommission"), "{error}");
    let err = handle.stop().await.unwrap_err();
    assert_eq!(err.kind(), pglite_cache::replication::ErrorKind::NeedsOperator);
    assert!(err.is_slot_lost(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_the_initial_copy_then_start_again() {
    let pg = PgCluster::start();
    let db = pg.create_database("midcopy").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE small (id int PRIMARY KEY); INSERT INTO small VALUES (1), (2); \
             CREATE TABLE big (id int PRIMARY KEY, v text); \
             INSERT INTO big SELECT i, repeat(md5(i::text), 4) FROM generate_series(1, 300000) i; \
             CREATE PUBLICATION pub FOR TABLE big, small;",
        )
        .await
        .unwrap();
    let local = instance().await;
    let mut cfg = config(&pg, &db, "pub");
    cfg.copy_batch_bytes = 256 << 10; // many batches, so there is a middle
    let handle = Replication::start(local.clone(), cfg.clone()).unwrap();
    let mut status = handle.watch_status();
    tokio::time::timeout(WAIT, status.wait_for(|s| s.tables.iter().any(|t| t.rows_copied > 0))).await.unwrap().unwrap();
    handle.stop().await.unwrap();
    assert_ne!(handle.status().tables[0].rows_copied, 300_000, "stopped too late to test a stop mid-copy");
    // Nothing half-copied is left behind.
    assert!(local.query("SELECT 1 FROM big", &[]).await.is_err());

    remote.batch_execute("INSERT INTO big VALUES (300001, 'after'); DELETE FROM small WHERE id = 1;").await.unwrap();
    let handle = Replication::start(local.clone(), cfg.clone()).unwrap();
    wait_streaming(&handle).await;
    remote.batch_execute("UPDATE big SET v = 'x' WHERE id < 100").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "big").await;
    assert_same(&remote, &local, "small").await;
    // One slot: the interrupted copy's slot was replaced.
    let slots: i64 = remote.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await.unwrap().get(0);
    assert_eq!(slots, 1);
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_lost_with_resync_policy_copies_again() {
    let pg = PgCluster::start();
    let db = pg.create_database("resync").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 100) i; \
             CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await
        .unwrap();
    let local = instance().await;
    let cfg = config(&pg, &db, "pub").on_slot_lost(pglite_cache::replication::SlotLostPolicy::Resync);
    let handle = Replication::start(local.clone(), cfg.clone()).unwrap();
    wait_streaming(&handle).await;
    drop_slot_behind_our_back(&remote, &cfg.slot_name).await;
    // Changes made while no slot existed are only in a new copy.
    remote.batch_execute("UPDATE t SET v = -v WHERE id <= 50; DELETE FROM t WHERE id > 90;").await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let slot =
            remote.query("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&cfg.slot_name]).await.unwrap();
        if !slot.is_empty() && handle.status().phase == Phase::Streaming {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no resync: {:?}", handle.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_remote_is_retried_until_stopped() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let source = format!("host=127.0.0.1 port={port} user=postgres dbname=x").parse().unwrap();
    let local = instance().await;
    let handle =
        Replication::start(local, ReplicationConfig::new(source, PublicationSpec::Existing("p".into()))).unwrap();
    let mut status = handle.watch_status();
    let reconnecting = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| matches!(s.phase, Phase::Reconnecting { attempt, .. } if attempt >= 2)),
    )
    .await
    .expect("should keep retrying")
    .unwrap()
    .clone();
    match reconnecting.phase {
        Phase::Reconnecting { error, .. } => assert!(error.contains("transient"), "{error}"),
        other => panic!("{other:?}"),
    }
    handle.stop().await.unwrap();
    assert_eq!(handle.status().phase, Phase::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_require_and_verify_full() {
    let pg = PgCluster::start_with_tls();
    let db = pg.create_database("tls").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'); \
             CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await
        .unwrap();
    let ca = pg.path().join("ca.crt");
    for (n, source) in [
        format!("host=127.0.0.1 port={} user=postgres dbname={db} sslmode=require", pg.port),
        format!(
            "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
            pg.port,
            ca.display().to_string().replace('/', "%2F")
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let local = instance().await;
        let cfg = ReplicationConfig::new(source.parse().unwrap(), PublicationSpec::Existing("pub".into()))
            .slot_name(format!("tls_{n}"))
            .status_interval(Duration::from_secs(1))
            .commit_delay(Duration::from_millis(20));
        let handle = Replication::start(local.clone(), cfg).unwrap();
        wait_streaming(&handle).await;
        remote.batch_execute(&format!("INSERT INTO t VALUES ({}, 'tls')", n + 10)).await.unwrap();
        catch_up(&handle, &remote).await;
        assert_same(&remote, &local, "t").await;
        // A busy stream, each transaction its own commit upstream: they wait
        // out the delay with the TLS socket held quiet, then are read at once.
        let before = handle.status();
        remote.batch_execute("SET synchronous_commit = on").await.unwrap();
        for i in 0..40 {
            remote.batch_execute(&format!("INSERT INTO t VALUES ({}, 'busy')", 1000 * (n + 1) + i)).await.unwrap();
        }
        catch_up(&handle, &remote).await;
        assert_same(&remote, &local, "t").await;
        let after = handle.status();
        let (transactions, commits) =
            (after.applied_transactions - before.applied_transactions, after.local_commits - before.local_commits);
        assert_eq!(transactions, 40, "{after:?}");
        assert!(commits <= 20, "{transactions} transactions in {commits} local commits");
        let encrypted: i64 = remote
            .query_one(
                "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s ON s.pid = r.pid WHERE s.ssl",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(encrypted, 1, "the walsender connection should be encrypted ({source})");
        handle.stop().await.unwrap();
    }

    // A certificate that does not chain to the given root: an operator error.
    let wrong = format!(
        "host=localhost port={} user=postgres dbname={db} sslmode=verify-full sslrootcert={}",
        pg.port,
        pg.path().join("server.crt").display()
    );
    let local = instance().await;
    let cfg =
        ReplicationConfig::new(wrong.parse().unwrap(), PublicationSpec::Existing("pub".into())).slot_name("tls_bad");
    let handle = Replication::start(local, cfg).unwrap();
    let mut status = handle.watch_status();
    let halted = tokio::time::timeout(WAIT, status.wait_for(|s| matches!(s.phase, Phase::Halted { .. })))
        .await
        .expect("an untrusted certificate should halt")
        .unwrap()
        .clone();
    match &halted.phase {
        Phase::Halted { error } => assert!(error.contains("TLS handshake"), "{error}"),
        other => panic!("{other:?}"),
    }
    let err = handle.stop().await.unwrap_err();
    assert_eq!(err.kind(), pglite_cache::replication::ErrorKind::NeedsOperator);
}

/// An instance stopped under a running replication halts it: the status
/// and `stop` say why, instead of a phase still "streaming".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_stopped_under_replication_halts_it_with_the_reason() {
    let pg = PgCluster::start();
    let db = pg.create_database("gone").await;
    let remote = pg.client(&db).await;
    remote.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t;").await.unwrap();
    let local = instance().await;
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    wait_streaming(&handle).await;
    local.stop().await.unwrap();
    let error = halted_with(&handle).await;
    assert!(error.contains("stopped"), "{error}");
    let err = handle.stop().await.unwrap_err();
    assert!(err.to_string().contains("stopped"), "{err}");
}

/// Waits until replication halts; its error.
async fn halted_with(handle: &pglite_cache::replication::ReplicationHandle) -> String {
    let mut status = handle.watch_status();
    let halted = tokio::time::timeout(WAIT, status.wait_for(|s| matches!(s.phase, Phase::Halted { .. })))
        .await
        .expect("replication should halt")
        .unwrap()
        .clone();
    match halted.phase {
        Phase::Halted { error } => error,
        other => panic!("expected Halted, got {other:?}"),
    }
}
