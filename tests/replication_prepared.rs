//! The apply's small transactions run through named prepared statements
//! (`src/replication/apply/prepared.rs`): they survive their disappearance
//! (an embedding program's `DEALLOCATE ALL`), the tables stay read-only to
//! everyone else, an older read-only trigger function is brought up to
//! date, and the statements are closed when replication stops.

mod support;

use std::time::{Duration, Instant};

use pglite_cache::replication::{Phase, Replication};
use support::pg::PgCluster;
use support::replication::{assert_same, catch_up, config, instance, wait_streaming};

async fn prepared_count(local: &pglite_cache::Instance) -> i64 {
    let result = local
        .query("SELECT count(*)::int8 FROM pg_prepared_statements WHERE name LIKE 'pglite_cache_apply_%'", &[])
        .await
        .unwrap();
    result.rows[0].get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_apply_statements_survive_deallocate_and_are_closed_at_stop() {
    let pg = PgCluster::start();
    let db = pg.create_database("prepared").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text, n int); INSERT INTO t VALUES (1, 'a', 1); \
             CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await
        .unwrap();
    let local = instance().await;
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    wait_streaming(&handle).await;
    for i in 2..20 {
        remote
            .batch_execute(&format!(
                "BEGIN; INSERT INTO t VALUES ({i}, 'x', {i}); UPDATE t SET n = n + 1 WHERE id = 1; COMMIT;"
            ))
            .await
            .unwrap();
    }
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    assert!(prepared_count(&local).await > 0, "small transactions use prepared statements");

    // Gone behind the apply's back: the next transaction parses them again.
    local.exec("DEALLOCATE ALL").await.unwrap();
    remote
        .batch_execute("BEGIN; INSERT INTO t VALUES (100, 'y', 0); UPDATE t SET v = 'z' WHERE id = 2; COMMIT;")
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    assert_eq!(handle.status().phase, Phase::Streaming);

    // The apply passes the read-only trigger with a local setting; nobody
    // else does.
    let err = local.exec("INSERT INTO t VALUES (1000, 'mine', 0)").await.unwrap_err();
    assert_eq!(err.code(), Some(&pglite_cache::SqlState::READ_ONLY_SQL_TRANSACTION), "{err}");
    assert_same(&remote, &local, "t").await;

    // An instance whose read-only trigger function predates the setting
    // (a cache restored from an older version's snapshot): the apply
    // brings it up to date instead of failing.
    local
        .exec(
            "CREATE OR REPLACE FUNCTION pglite_cache.refuse_write() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'read-only' USING ERRCODE = 'read_only_sql_transaction'; END $$",
        )
        .await
        .unwrap();
    remote
        .batch_execute("BEGIN; INSERT INTO t VALUES (101, 'w', 0); UPDATE t SET n = 7 WHERE id = 3; COMMIT;")
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    assert_eq!(handle.status().phase, Phase::Streaming);

    handle.stop().await.unwrap();
    let start = Instant::now();
    while prepared_count(&local).await > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "prepared statements left after stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
