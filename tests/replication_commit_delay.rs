//! The commit delay (`ReplicationConfig::commit_delay`, `sync
//! --commit-delay`): while the stream is busy, received transactions wait
//! for others to join their local commit, and commit once the delay has
//! passed even when nothing more comes.

mod support;

use std::time::Duration;

use pglite_cache::replication::{Phase, Replication};
use support::pg::PgCluster;
use support::replication::{assert_same, catch_up, config, instance, wait_streaming};

/// A remote table `t` in publication `pub` of a new database `name`, and a
/// cache streaming it with a 100 ms commit delay.
async fn streaming_with_delay(
    name: &str,
) -> (PgCluster, String, tokio_postgres::Client, pglite_cache::Instance, pglite_cache::replication::ReplicationHandle) {
    let pg = PgCluster::start();
    let db = pg.create_database(name).await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t;")
        .await
        .unwrap();
    let local = instance().await;
    let delay = Duration::from_millis(100);
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub").commit_delay(delay)).unwrap();
    wait_streaming(&handle).await;
    (pg, db, remote, local, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_stream_merges_into_fewer_local_commits_and_the_last_one_is_not_held() {
    let (pg, db, remote, local, handle) = streaming_with_delay("delay").await;
    remote.batch_execute("INSERT INTO t VALUES (0, 'first')").await.unwrap();
    catch_up(&handle, &remote).await;

    // 40 remote transactions, each its own commit upstream, 5 ms apart: a
    // steady stream that the apply keeps up with, so without a delay each
    // would be a local commit of its own. (The sleep paces the workload.)
    const TRANSACTIONS: u64 = 40;
    // Sent as they commit (the test cluster defaults to asynchronous commit,
    // whose WAL reaches the stream in bursts).
    remote.batch_execute("SET synchronous_commit = on").await.unwrap();
    let before = handle.status();
    for i in 1..=TRANSACTIONS {
        remote.batch_execute(&format!("INSERT INTO t VALUES ({i}, 'x')")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Nothing more comes: the last ones still commit once their delay passed.
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    let after = handle.status();
    let transactions = after.applied_transactions - before.applied_transactions;
    let commits = after.local_commits - before.local_commits;
    assert_eq!(transactions, TRANSACTIONS, "{after:?}");
    assert!(commits <= TRANSACTIONS / 4, "{transactions} remote transactions in {commits} local commits");
    assert_eq!(handle.status().phase, Phase::Streaming);
    handle.stop().await.unwrap();

    // Longer than PostgreSQL's own limit: refused with a hint.
    let Err(err) = Replication::start(local.clone(), config(&pg, &db, "pub").commit_delay(Duration::from_secs(1)))
    else {
        panic!("a 1 s commit delay is refused");
    };
    assert!(err.to_string().contains("commit delay"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_while_transactions_wait_for_the_delay_is_prompt() {
    let (pg, db, _remote, _local, handle) = streaming_with_delay("delay_stop").await;
    // A steady stream (each its own commit upstream), so that the apply is
    // always waiting out the delay, with the socket held quiet, when the
    // stop comes.
    let writer = pg.client(&db).await;
    let (stop_writing, mut stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        writer.batch_execute("SET synchronous_commit = on").await.unwrap();
        let mut i = 0;
        while !*stopped.borrow_and_update() {
            i += 1;
            writer.batch_execute(&format!("INSERT INTO t VALUES ({i}, 'x')")).await.unwrap();
            // Paces the workload.
            let _ = tokio::time::timeout(Duration::from_millis(3), stopped.changed()).await;
        }
        i
    });
    let mut status = handle.watch_status();
    status.wait_for(|s| s.applied_transactions >= 20).await.unwrap();
    // The end of the stream (CopyDone, then the server's answer) must be
    // read at once, not after the 5 s that `finish` allows a silent server.
    let started = std::time::Instant::now();
    handle.stop().await.unwrap();
    let took = started.elapsed();
    let _ = stop_writing.send(true);
    let written = load.await.unwrap();
    assert!(took < Duration::from_secs(2), "stopping took {took:?} ({written} transactions written)");
}

/// A backlog of small transactions (a cache catching up after a restart, or
/// a publisher with asynchronous commit, whose WAL comes in bursts) is
/// merged into local commits of at most 128 row changes. Readers wait
/// behind one local commit at a time, and its engine time grows with its
/// rows: merged up to the 64 KiB cap alone, ~750 changes a commit held
/// readers 10-20 ms each (BENCHMARKS.md, round 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_applied_in_local_commits_small_enough_for_readers() {
    let (pg, db, remote, local, handle) = streaming_with_delay("backlog").await;
    handle.stop().await.unwrap();
    const TRANSACTIONS: u64 = 2000;
    remote
        .batch_execute(&format!(
            "DO $$ BEGIN FOR i IN 1..{TRANSACTIONS} LOOP INSERT INTO t VALUES (i, 'x'); COMMIT; END LOOP; END $$"
        ))
        .await
        .unwrap();
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    let status = handle.status();
    assert_eq!(status.applied_transactions, TRANSACTIONS, "{status:?}");
    assert!(
        status.local_commits >= TRANSACTIONS / 128,
        "{} changes in {} local commits",
        status.applied_changes,
        status.local_commits
    );
    handle.stop().await.unwrap();
}
