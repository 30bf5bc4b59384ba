//! The apply groups a table's inserts and updates apart (two statements for
//! any number of merged transactions that each insert and update it,
//! applied inserts first: `src/replication/apply/batch.rs`, `beside`).
//! That order is only safe when no unique index other than the key can see
//! a transient duplicate: a table with one is applied in stream order, and
//! a unique index created locally mid-session makes the apply reconnect
//! and apply in order, never halt or lose a change.

mod support;

use pglite_cache::replication::{Phase, Replication};
use support::pg::PgCluster;
use support::replication::{assert_same, catch_up, config, instance, wait_streaming};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_and_updates_group_apart_only_when_no_other_unique_index_sees_it() {
    let pg = PgCluster::start();
    let db = pg.create_database("reorder").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE p (id int PRIMARY KEY, v text); INSERT INTO p VALUES (1, 'x'); \
             CREATE TABLE u (id int PRIMARY KEY, code int UNIQUE, v text); INSERT INTO u VALUES (1, 5, 'a'); \
             CREATE PUBLICATION pub FOR TABLE p, u;",
        )
        .await
        .unwrap();
    let local = instance().await;
    // The cache keeps the remote's unique index (made sure of here: the
    // test is about a local one).
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    wait_streaming(&handle).await;
    local.exec("CREATE UNIQUE INDEX IF NOT EXISTS u_code_local ON u (code)").await.unwrap();

    // Many transactions, each an insert and an update of `p` (its only
    // unique index is the key): grouped apart when merged.
    let mut script = String::new();
    for i in 2..200 {
        script.push_str(&format!(
            "BEGIN; INSERT INTO p VALUES ({i}, 'n{i}'); UPDATE p SET v = v || '+' WHERE id = {};",
            i / 2
        ));
        script.push_str(" COMMIT;");
    }
    remote.batch_execute(&script).await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "p").await;

    // `u` has a second unique index: inserting the freed code before the
    // update that frees it would fail, so `u` is applied in stream order.
    // (Its Relation message is acted on at its first change, now.)
    remote
        .batch_execute("BEGIN; UPDATE u SET code = NULL WHERE id = 1; INSERT INTO u VALUES (2, 5, 'b'); COMMIT;")
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "u").await;
    assert_eq!(handle.status().phase, Phase::Streaming);

    // A unique index created locally on `p` mid-session: the session still
    // groups `p` apart, the batch fails with a duplicate, and the apply
    // reconnects and applies it in order.
    local.exec("CREATE UNIQUE INDEX p_v_local ON p (v)").await.unwrap();
    remote
        .batch_execute("BEGIN; UPDATE p SET v = 'freed' WHERE id = 150; INSERT INTO p VALUES (500, 'n150'); COMMIT;")
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "p").await;
    assert_eq!(handle.status().phase, Phase::Streaming);
    handle.stop().await.unwrap();
}
