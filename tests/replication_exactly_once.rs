//! Exactly once, proven (issue 9, point 6): insert-only traffic into a table
//! without a primary key (REPLICA IDENTITY FULL), where a duplicated or a
//! lost remote transaction shows as a wrong count; the `pglite-cache sync`
//! daemon is killed with SIGKILL several times while it streams, on a
//! persistent data directory, then both sides are compared row by row.

mod support;

use std::time::{Duration, Instant};

use pglite_cache::local_postgres::LocalPostgres;
use support::daemon::{Daemon, connect};
use support::replication::HASH;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_streaming_neither_duplicates_nor_loses_a_transaction() {
    let remote = LocalPostgres::start(&[]).expect("start PostgreSQL");
    let admin = connect(&remote.conninfo("postgres")).await.unwrap();
    admin
        .batch_execute(
            "CREATE TABLE log (txn bigint NOT NULL, n int NOT NULL, payload text); \
             ALTER TABLE log REPLICA IDENTITY FULL; \
             INSERT INTO log SELECT 0, g, 'seed' FROM generate_series(1, 1000) g;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let mut daemon = Daemon::spawn(&[], &remote.url("postgres"), &data, &["--tables", "log"]);
    daemon.client().await;

    // Insert-only writer: transaction i inserts rows (i, 1..=k) with k = 1 + i % 5.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writer = {
        let conninfo = remote.conninfo("postgres");
        tokio::spawn(async move {
            let client = connect(&conninfo).await.unwrap();
            let mut i = 0i64;
            while !*stopped.borrow() {
                i += 1;
                client
                    .batch_execute(&format!(
                        "INSERT INTO log SELECT {i}, g, repeat('x', g) FROM generate_series(1, {}) g",
                        1 + i % 5
                    ))
                    .await
                    .unwrap();
            }
            i
        })
    };
    for round in 0..5 {
        // Let the daemon stream a while (the remote moves on meanwhile).
        let target = committed(&admin).await + 200 + round * 150;
        let deadline = Instant::now() + Duration::from_secs(60);
        while committed(&admin).await < target {
            assert!(Instant::now() < deadline, "the writer stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(daemon.alive(), "round {round}: the daemon exited:\n{}", daemon.stderr());
        daemon.kill9();
        daemon = Daemon::spawn(&[], &remote.url("postgres"), &data, &["--tables", "log"]);
        daemon.client().await;
    }
    stop.send_replace(true);
    let transactions = writer.await.unwrap();
    assert!(transactions > 100, "the writer ran ({transactions} transactions)");

    let cache = daemon.client().await;
    let want: (String, String) = {
        let r = admin.query_one(&format!("{HASH}log t"), &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = cache.query_one(&format!("{HASH}log t"), &[]).await.unwrap();
        let got: (String, String) = (r.get(0), r.get(1));
        if got == want {
            break;
        }
        // A duplicate can only grow the count: fail at once, do not wait.
        let dups: i64 = cache
            .query_one("SELECT count(*) FROM (SELECT txn, n FROM log GROUP BY 1, 2 HAVING count(*) > 1) d", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(dups, 0, "duplicated rows in the cache");
        assert!(Instant::now() < deadline, "cache {got:?} != remote {want:?}\n{}", daemon.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every transaction is there whole.
    let partial: i64 = cache
        .query_one(
            "SELECT count(*) FROM (SELECT txn FROM log WHERE txn > 0 GROUP BY txn HAVING count(*) <> 1 + txn % 5) p",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(partial, 0, "a transaction applied in part");
    let max: i64 = cache.query_one("SELECT max(txn) FROM log", &[]).await.unwrap().get(0);
    assert_eq!(max, transactions);
    assert!(daemon.alive());
}

async fn committed(admin: &tokio_postgres::Client) -> i64 {
    admin.query_one("SELECT count(*) FROM log", &[]).await.unwrap().get(0)
}
