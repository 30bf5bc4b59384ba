//! Schema changes upstream while streaming (issue 9, point 1): each DDL is
//! made under a concurrent write workload on the altered table; afterwards
//! the full-table hashes are equal and replication is still streaming.
//! See docs/schema-changes.md for what is exact and what is best effort.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pglite_cache::Instance;
use pglite_cache::replication::{Phase, Replication, ReplicationHandle};
use support::pg::PgCluster;
use support::replication::{WAIT, assert_same, catch_up, config, instance, wait_streaming};
use tokio::sync::watch;

/// Writes to the table under test until stopped: inserts, updates and
/// deletes through its one stable column `k` (every other column is
/// altered by the test). A table renamed meanwhile is found under its next
/// name in `names`.
struct Workload {
    stop: watch::Sender<bool>,
    /// Held by the writer around each transaction, by the test to pause it.
    turn: Arc<tokio::sync::Mutex<()>>,
    task: tokio::task::JoinHandle<u64>,
}

impl Workload {
    async fn start(pg: &PgCluster, db: &str, names: &[&str]) -> Workload {
        let client = pg.client(db).await;
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let (stop, rx) = watch::channel(false);
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        let writer_turn = turn.clone();
        let task = tokio::spawn(async move {
            let (mut n, mut which) = (0u64, 0usize);
            while !*rx.borrow() {
                let _turn = writer_turn.lock().await;
                let t = &names[which];
                let sql = format!(
                    "BEGIN; INSERT INTO {t} (k) SELECT g FROM generate_series(1, 3) g; \
                     UPDATE {t} SET k = k + 1 WHERE id IN (SELECT id FROM {t} ORDER BY random() LIMIT 2); \
                     DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY random() LIMIT 1); COMMIT"
                );
                match client.batch_execute(&sql).await {
                    Ok(()) => n += 1,
                    Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                        client.batch_execute("ROLLBACK").await.unwrap();
                        which = (which + 1) % names.len();
                    }
                    Err(e) => panic!("workload: {e}"),
                }
            }
            n
        });
        Workload { stop, turn, task }
    }

    /// Pauses the writer (between two of its transactions) while the
    /// returned guard lives.
    async fn pause(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turn.lock().await
    }

    async fn finish(self) -> u64 {
        self.stop.send_replace(true);
        let n = self.task.await.unwrap();
        assert!(n > 0, "the workload ran");
        n
    }
}

/// Waits until the workload committed `n` more transactions (so DDL lands
/// between writes).
async fn writes(remote: &tokio_postgres::Client, seq: &str, n: i64) {
    let start: i64 = remote.query_one(&format!("SELECT last_value FROM {seq}"), &[]).await.unwrap().get(0);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now: i64 = remote.query_one(&format!("SELECT last_value FROM {seq}"), &[]).await.unwrap().get(0);
        if now >= start + 3 * n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the workload stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The table was followed in place, never copied again (a new copy
/// would report the rows it copied, more than the initial ones).
fn assert_not_copied_again(handle: &ReplicationHandle, initial_rows: u64) {
    let status = handle.status();
    assert_eq!(status.tables.len(), 1, "{status:?}");
    assert_eq!(status.tables[0].rows_copied, initial_rows, "{status:?}");
}

/// Prints the rows that differ (to name the step that went wrong).
async fn show_differences(remote: &tokio_postgres::Client, local: &Instance, table: &str, step: &str) {
    let sql = format!("SELECT t::text FROM {table} t");
    let r: std::collections::BTreeSet<String> =
        remote.query(&sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let l: std::collections::BTreeSet<String> =
        local.query(&sql, &[]).await.unwrap().rows.iter().map(|r| r.get(0)).collect();
    let only_remote: Vec<_> = r.difference(&l).take(5).collect();
    let only_local: Vec<_> = l.difference(&r).take(5).collect();
    if !only_remote.is_empty() || !only_local.is_empty() {
        eprintln!("after {step:?}: only remote {only_remote:?}, only local {only_local:?}");
    }
}

fn assert_streaming(handle: &ReplicationHandle) {
    let status = handle.status();
    assert_eq!(status.phase, Phase::Streaming, "{status:?}");
}

async fn setup(
    pg: &PgCluster,
    name: &str,
    schema: &str,
) -> (String, tokio_postgres::Client, Instance, ReplicationHandle) {
    let db = pg.create_database(name).await;
    let remote = pg.client(&db).await;
    remote.batch_execute(schema).await.unwrap();
    let local = instance().await;
    let handle = Replication::start(local.clone(), config(pg, &db, "pub")).unwrap();
    wait_streaming(&handle).await;
    (db, remote, local, handle)
}

async fn local_columns(local: &Instance, table: &str) -> Vec<String> {
    let result = local
        .query(
            &format!(
                "SELECT attname::text || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
            ),
            &[],
        )
        .await
        .unwrap();
    result.rows.iter().map(|r| r.get::<String>(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_columns_in_one_transaction_and_in_merged_transactions() {
    let pg = PgCluster::start();
    let (db, remote, local, handle) = setup(
        &pg,
        "addcols",
        "CREATE TABLE t (id bigserial PRIMARY KEY, k int, v text); INSERT INTO t (k, v) VALUES (1, 'a'), (2, 'b'); \
         CREATE PUBLICATION pub FOR TABLE t;",
    )
    .await;
    let load = Workload::start(&pg, &db, &["t"]).await;
    writes(&remote, "t_id_seq", 5).await;
    // Two columns added in one remote transaction, each followed by rows.
    remote
        .batch_execute(
            "BEGIN; ALTER TABLE t ADD COLUMN a int; INSERT INTO t (k, a) VALUES (10, 10); \
             ALTER TABLE t ADD COLUMN b text NOT NULL DEFAULT 'dflt'; INSERT INTO t (k, a, b) VALUES (11, 11, 'x'); COMMIT",
        )
        .await
        .unwrap();
    writes(&remote, "t_id_seq", 5).await;
    {
        let _paused = load.pause().await;
        catch_up(&handle, &remote).await;
        assert_same(&remote, &local, "t").await;
        assert_streaming(&handle);
    }

    // Two such transactions merged into one local commit while catching up.
    handle.stop().await.unwrap();
    remote
        .batch_execute("ALTER TABLE t ADD COLUMN c date; INSERT INTO t (k, c) VALUES (20, '2024-01-01')")
        .await
        .unwrap();
    remote
        .batch_execute("ALTER TABLE t ADD COLUMN d numeric DEFAULT 1.5; UPDATE t SET d = 2 WHERE k = 20")
        .await
        .unwrap();
    writes(&remote, "t_id_seq", 5).await;
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    catch_up(&handle, &remote).await;
    writes(&remote, "t_id_seq", 5).await;
    load.finish().await;
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    assert_streaming(&handle);
    assert_eq!(
        local_columns(&local, "t").await,
        ["id bigint", "k integer", "v text", "a integer", "b text", "c date", "d numeric"]
    );
    assert_not_copied_again(&handle, 2);
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_renamed_and_retyped_columns_follow_in_place() {
    let pg = PgCluster::start();
    let (db, remote, local, handle) = setup(
        &pg,
        "alter",
        "CREATE TABLE t (id bigserial PRIMARY KEY, k int, gone text, n int, s varchar(10), num numeric(10,2), \
                         r numeric(10,4), last text); \
         INSERT INTO t (k, gone, n, s, num, r, last) \
           SELECT g, 'g' || g, g, 's' || g, g / 3.0, g / 7.0, 'l' || g FROM generate_series(1, 200) g; \
         CREATE PUBLICATION pub FOR TABLE t;",
    )
    .await;
    let load = Workload::start(&pg, &db, &["t"]).await;
    let steps = [
        "ALTER TABLE t DROP COLUMN gone",
        "ALTER TABLE t RENAME COLUMN n TO n2",
        // The last column: a rename and not a drop + add (attribute numbers).
        "ALTER TABLE t RENAME COLUMN last TO final",
        "ALTER TABLE t ALTER COLUMN n2 TYPE bigint",
        "ALTER TABLE t ALTER COLUMN s TYPE text",
        "ALTER TABLE t ALTER COLUMN num TYPE numeric(12,4)",
        "ALTER TABLE t ALTER COLUMN r TYPE numeric(10,1)",
        // Dropped and added again under the same name: old values are gone.
        "BEGIN; ALTER TABLE t DROP COLUMN final; ALTER TABLE t ADD COLUMN final text; COMMIT",
        // Renamed and retyped in one transaction, with a swap of names.
        "BEGIN; ALTER TABLE t RENAME COLUMN s TO tmp; ALTER TABLE t RENAME COLUMN n2 TO s; \
         ALTER TABLE t RENAME COLUMN tmp TO n2; ALTER TABLE t ALTER COLUMN s TYPE numeric; COMMIT",
    ];
    for ddl in steps {
        writes(&remote, "t_id_seq", 3).await;
        remote.batch_execute(ddl).await.unwrap();
        remote.batch_execute("UPDATE t SET k = k + 1 WHERE id % 10 = 0").await.unwrap();
        writes(&remote, "t_id_seq", 3).await;
        let _paused = load.pause().await;
        catch_up(&handle, &remote).await;
        show_differences(&remote, &local, "t", ddl).await;
        assert_same(&remote, &local, "t").await;
        assert_streaming(&handle);
    }
    load.finish().await;
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    assert_eq!(
        local_columns(&local, "t").await,
        ["id bigint", "k integer", "s numeric", "n2 text", "num numeric(12,4)", "r numeric(10,1)", "final text"]
    );
    assert_streaming(&handle);
    assert_not_copied_again(&handle, 200);
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_cannot_apply_in_place_copy_that_table_only() {
    let pg = PgCluster::start();
    let (db, remote, local, handle) = setup(
        &pg,
        "recopy",
        "CREATE TABLE t (id bigserial PRIMARY KEY, k int, code text); \
         INSERT INTO t (k, code) SELECT g, g::text FROM generate_series(1, 500) g; \
         CREATE TABLE other (id int PRIMARY KEY, v text); INSERT INTO other SELECT g, 'o' FROM generate_series(1, 100) g; \
         CREATE PUBLICATION pub FOR TABLE t, other;",
    )
    .await;
    let copied_before = handle.status().tables.iter().find(|t| t.name == "other").unwrap().rows_copied;
    let load = Workload::start(&pg, &db, &["t"]).await;
    // Readers never miss the table while it is copied again.
    let (stop_reader, reader_stopped) = watch::channel(false);
    let reader = {
        let local = local.clone();
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !*reader_stopped.borrow() {
                local.query("SELECT count(*) FROM t", &[]).await.expect("t stays readable");
                reads += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reads
        })
    };
    for ddl in [
        // A conversion that needs an expression upstream.
        "ALTER TABLE t ALTER COLUMN code TYPE int USING code::int * 2",
        // A volatile default: the remote rewrote every row.
        "ALTER TABLE t ADD COLUMN rnd float8 DEFAULT random()",
    ] {
        writes(&remote, "t_id_seq", 3).await;
        remote.batch_execute(ddl).await.unwrap();
        writes(&remote, "t_id_seq", 3).await;
        let _paused = load.pause().await;
        catch_up(&handle, &remote).await;
        show_differences(&remote, &local, "t", ddl).await;
        assert_same(&remote, &local, "t").await;
        assert_streaming(&handle);
    }
    load.finish().await;
    remote.batch_execute("UPDATE other SET v = 'after'").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    assert_same(&remote, &local, "other").await;
    stop_reader.send_replace(true);
    assert!(reader.await.unwrap() > 0);
    // The other table was not copied again.
    let status = handle.status();
    assert_eq!(status.tables.iter().find(|t| t.name == "other").unwrap().rows_copied, copied_before);
    assert_eq!(status.tables.iter().filter(|t| t.name == "t").count(), 1, "{status:?}");
    // Its bookkeeping is ready again (a restart streams it, not copies it).
    let state: String =
        local.query("SELECT state FROM pglite_cache.tables WHERE table_name = 't'", &[]).await.unwrap().rows[0].get(0);
    assert_eq!(state, "ready");
    assert_streaming(&handle);
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enum_labels_and_new_user_types_follow() {
    let pg = PgCluster::start();
    let (db, remote, local, handle) = setup(
        &pg,
        "types",
        "CREATE TYPE mood AS ENUM ('sad', 'happy'); \
         CREATE TABLE t (id bigserial PRIMARY KEY, k int, m mood); INSERT INTO t (k, m) VALUES (1, 'sad'), (2, 'happy'); \
         CREATE PUBLICATION pub FOR TABLE t;",
    )
    .await;
    let load = Workload::start(&pg, &db, &["t"]).await;
    writes(&remote, "t_id_seq", 3).await;
    // Labels added upstream send no message; the first row using one does.
    remote.batch_execute("ALTER TYPE mood ADD VALUE 'ok' BEFORE 'happy'").await.unwrap();
    remote.batch_execute("ALTER TYPE mood ADD VALUE 'ecstatic'").await.unwrap();
    remote
        .batch_execute("INSERT INTO t (k, m) VALUES (3, 'ok'), (4, 'ecstatic'); UPDATE t SET m = 'ok' WHERE k = 1")
        .await
        .unwrap();
    writes(&remote, "t_id_seq", 3).await;
    // A column of a type that does not exist locally yet.
    remote
        .batch_execute(
            "CREATE TYPE color AS ENUM ('red', 'green'); ALTER TABLE t ADD COLUMN c color; \
             INSERT INTO t (k, c) VALUES (5, 'green')",
        )
        .await
        .unwrap();
    writes(&remote, "t_id_seq", 3).await;
    load.finish().await;
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    // Labels keep the remote's order (ORDER BY sorts alike).
    let order = "SELECT enum_range(NULL::mood)::text";
    let r: String = remote.query_one(order, &[]).await.unwrap().get(0);
    let l: String = local.query(order, &[]).await.unwrap().rows[0].get(0);
    assert_eq!((r.as_str(), l.as_str()), ("{sad,ok,happy,ecstatic}", "{sad,ok,happy,ecstatic}"));
    assert_streaming(&handle);
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_tables_and_indexes_follow() {
    let pg = PgCluster::start();
    let (db, remote, local, handle) = setup(
        &pg,
        "rename",
        "CREATE TABLE t (id bigserial PRIMARY KEY, k int, v text); CREATE INDEX t_v ON t (v); \
         INSERT INTO t (k, v) SELECT g, 'v' || g FROM generate_series(1, 100) g; \
         CREATE PUBLICATION pub FOR TABLE t;",
    )
    .await;
    let load = Workload::start(&pg, &db, &["t", "t2", "other.t3"]).await;
    writes(&remote, "t_id_seq", 3).await;
    // The session has seen the table (an index is dropped locally only if
    // it was seen upstream before).
    catch_up(&handle, &remote).await;
    // An index of the cache's own stays.
    local.exec("CREATE INDEX mine ON t (v, k)").await.unwrap();
    remote.batch_execute("CREATE INDEX t_k ON t (k); DROP INDEX t_v").await.unwrap();
    writes(&remote, "t_id_seq", 3).await;
    catch_up(&handle, &remote).await;
    let indexes = |table: &'static str| {
        let local = local.clone();
        async move {
            let r = local
                .query(
                    &format!("SELECT string_agg(indexname::text, ',' ORDER BY indexname) FROM pg_indexes WHERE tablename = '{table}'"),
                    &[],
                )
                .await
                .unwrap();
            r.rows[0].get::<Option<String>>(0).unwrap_or_default()
        }
    };
    assert_eq!(indexes("t").await, "mine,t_k,t_pkey");
    remote.batch_execute("ALTER TABLE t RENAME TO t2").await.unwrap();
    writes(&remote, "t_id_seq", 3).await;
    remote
        .batch_execute("CREATE SCHEMA other; ALTER TABLE t2 SET SCHEMA other; ALTER TABLE other.t2 RENAME TO t3")
        .await
        .unwrap();
    writes(&remote, "other.t_id_seq", 3).await;
    load.finish().await;
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "other.t3").await;
    assert_eq!(indexes("t3").await, "mine,t_k,t_pkey");
    let status = handle.status();
    assert_eq!(status.tables.iter().map(|t| format!("{}.{}", t.schema, t.name)).collect::<Vec<_>>(), ["other.t3"]);
    let stored: String =
        local.query("SELECT schema_name || '.' || table_name FROM pglite_cache.tables", &[]).await.unwrap().rows[0]
            .get(0);
    assert_eq!(stored, "other.t3");
    assert_streaming(&handle);
    assert_not_copied_again(&handle, 100);
    // A restart streams on under the new name.
    handle.stop().await.unwrap();
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    remote.batch_execute("INSERT INTO other.t3 (k, v) VALUES (-1, 'after restart')").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "other.t3").await;
    handle.stop().await.unwrap();
}

/// A table renamed upstream and then described again under its new name
/// in the same local transaction (any invalidation of the table upstream,
/// here an index and a storage option, makes the publisher send its
/// Relation message again) while the local rename still waits, unrun: the
/// later messages must not look the new name up in the local catalog.
/// This halted replication ("relation does not exist") when the rename and
/// the next invalidation were in one remote transaction, and at random
/// under load when merged commits put them in one local transaction. The
/// cache is stopped while the remote writes, so that everything arrives at
/// once on restart and is merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_described_again_after_a_rename_waiting_in_the_same_local_transaction() {
    let pg = PgCluster::start();
    let (db, remote, local, handle) = setup(
        &pg,
        "rename_merged",
        "CREATE TABLE t (id bigserial PRIMARY KEY, k int); \
         INSERT INTO t (k) SELECT g FROM generate_series(1, 10) g; \
         CREATE PUBLICATION pub FOR TABLE t;",
    )
    .await;
    remote.batch_execute("INSERT INTO t (k) VALUES (11)").await.unwrap();
    catch_up(&handle, &remote).await;
    handle.stop().await.unwrap();
    // In one remote transaction, then in several.
    remote
        .batch_execute(
            "BEGIN; ALTER TABLE t RENAME TO t2; INSERT INTO t2 (k) VALUES (100); CREATE INDEX t2_k ON t2 (k); \
             INSERT INTO t2 (k) VALUES (101); ALTER TABLE t2 SET (fillfactor = 90); UPDATE t2 SET k = k + 1 WHERE k = 101; COMMIT",
        )
        .await
        .unwrap();
    for sql in [
        "ALTER TABLE t2 RENAME TO t3",
        "INSERT INTO t3 (k) VALUES (200)",
        "CREATE INDEX t3_k2 ON t3 (k, id)",
        "INSERT INTO t3 (k) VALUES (201)",
        "ALTER TABLE t3 SET (fillfactor = 80)",
        "UPDATE t3 SET k = k + 1 WHERE k = 201",
    ] {
        remote.batch_execute(sql).await.unwrap();
    }
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t3").await;
    assert_eq!(index_names(&local, "t3").await, "t2_k,t3_k2,t_pkey");
    // An index the cache cannot build (a function it does not have) is
    // skipped with a warning; the apply goes on and the engine stays usable.
    remote
        .batch_execute(
            "CREATE FUNCTION plus1(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1 + 1'; \
             CREATE INDEX t3_f ON t3 (plus1(k)); INSERT INTO t3 (k) VALUES (300)",
        )
        .await
        .unwrap();
    remote.batch_execute("INSERT INTO t3 (k) VALUES (301)").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t3").await;
    assert_eq!(index_names(&local, "t3").await, "t2_k,t3_k2,t_pkey");
    assert_streaming(&handle);
    handle.stop().await.unwrap();
}

async fn index_names(local: &Instance, table: &str) -> String {
    let sql = format!(
        "SELECT string_agg(indexname::text, ',' ORDER BY indexname) FROM pg_indexes WHERE tablename = '{table}'"
    );
    local.query(&sql, &[]).await.unwrap().rows[0].get::<Option<String>>(0).unwrap_or_default()
}
