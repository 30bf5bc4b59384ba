//! Schema changes upstream travel through the fan-out stream (issue 11):
//! the publisher puts the remote catalog's facts next to each Relation
//! message, and stream-fed caches follow the changes as a slot-fed cache
//! does (docs/schema-changes.md), without a query to the remote. Real
//! PostgreSQL, real nats-server, a write load running through the DDL.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pglite_cache::Instance;
use pglite_cache::replication::stream::{Publisher, PublisherConfig, StreamConfig, StreamReplication};
use pglite_cache::replication::{Phase, PublicationSpec, ReplicationConfig, ReplicationHandle};
use support::nats::NatsServer;
use support::pg::PgCluster;
use support::replication::{WAIT, assert_same, catch_up, remote_lsn, stream_cache_at as cache_at};

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE t (id bigserial PRIMARY KEY, k int, v text, n numeric, m mood);
CREATE TABLE u (id bigserial PRIMARY KEY, k int);
INSERT INTO t (k, v, n, m) SELECT i, 'v' || i, i * 1.5, 'sad' FROM generate_series(1, 200) i;
INSERT INTO u (k) SELECT i FROM generate_series(1, 100) i;
CREATE PUBLICATION pub FOR TABLE t, u;
"#;

/// Writes to `t` and to `u` (found under its next name once renamed) in
/// small transactions until stopped; counts them.
fn workload(
    client: tokio_postgres::Client,
    done: Arc<AtomicU64>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let names = ["u", "u2"];
        let mut which = 0;
        while !*stop.borrow() {
            let u = names[which];
            let sql = format!(
                "BEGIN; INSERT INTO t (k) SELECT g FROM generate_series(1, 2) g; \
                 UPDATE t SET k = k + 1 WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 2); \
                 DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 1); \
                 INSERT INTO {u} (k) VALUES (1); UPDATE {u} SET k = k + 1 WHERE id = (SELECT max(id) FROM {u}); COMMIT"
            );
            match client.batch_execute(&sql).await {
                Ok(()) => {
                    done.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                    client.batch_execute("ROLLBACK").await.unwrap();
                    which = (which + 1) % names.len();
                }
                Err(e) => panic!("workload: {e}"),
            }
        }
    })
}

/// Waits until the workload committed `n` more transactions.
async fn writes(done: &AtomicU64, n: u64) {
    let start = done.load(Ordering::SeqCst);
    let deadline = std::time::Instant::now() + WAIT;
    while done.load(Ordering::SeqCst) < start + n {
        assert!(std::time::Instant::now() < deadline, "the workload stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn publisher_config(pg: &PgCluster, db: &str, stream: &StreamConfig, dir: &std::path::Path) -> PublisherConfig {
    let replication = ReplicationConfig::new(pg.conninfo(db).parse().unwrap(), PublicationSpec::Existing("pub".into()))
        .slot_name("fanout")
        .status_interval(Duration::from_millis(200));
    PublisherConfig::new(replication, stream.clone(), dir.join("publisher"))
}

async fn remote_columns(remote: &tokio_postgres::Client, table: &str) -> Vec<String> {
    let sql = format!(
        "SELECT attname::text || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    );
    remote.query(&sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

async fn local_columns(local: &Instance, table: &str) -> Vec<String> {
    let sql = format!(
        "SELECT attname::text || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    );
    local.query(&sql, &[]).await.unwrap().rows.iter().map(|r| r.get(0)).collect()
}

/// Tables, columns and enum labels equal to the remote's; still streaming.
async fn assert_follows(remote: &tokio_postgres::Client, local: &Instance, handle: &ReplicationHandle) {
    catch_up(handle, remote).await;
    for table in ["t", "u2"] {
        assert_same(remote, local, table).await;
        assert_eq!(local_columns(local, table).await, remote_columns(remote, table).await, "columns of {table}");
    }
    let gone = local.query("SELECT to_regclass('u')::text", &[]).await.unwrap();
    assert_eq!(gone.rows[0].get::<Option<String>>(0), None, "u was renamed");
    let order = "SELECT enum_range(NULL::mood)::text";
    let r: String = remote.query_one(order, &[]).await.unwrap().get(0);
    let l: String = local.query(order, &[]).await.unwrap().rows[0].get(0);
    assert_eq!((r.as_str(), l.as_str()), ("{sad,ok,happy,ecstatic}", "{sad,ok,happy,ecstatic}"));
    let status = handle.status();
    assert_eq!(status.phase, Phase::Streaming, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schema_changes_travel_through_the_stream_in_order() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let pg = PgCluster::start();
    let db = pg.create_database("schema").await;
    let remote = pg.client(&db).await;
    remote.batch_execute(SCHEMA).await.unwrap();
    let nats = NatsServer::start();
    let stream = StreamConfig::new(nats.url(), "schema");
    let dirs = tempfile::tempdir().unwrap();
    // No snapshot after the first one: a late cache starts from before the DDL.
    let mut config = publisher_config(&pg, &db, &stream, dirs.path());
    config.snapshot_interval = None;
    let publisher = Publisher::start(config).unwrap();
    tokio::time::timeout(WAIT, publisher.wait_streaming()).await.expect("publisher streaming in time").unwrap();
    let caches = [cache_at(&stream, &dirs.path().join("a")).await, cache_at(&stream, &dirs.path().join("b")).await];

    let done = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = workload(pg.client(&db).await, done.clone(), stopped);
    writes(&done, 5).await;
    // Each step while the workload writes: the caches see the DDL between
    // the changes before and after it.
    let steps = [
        // A missing value: existing rows read 7 upstream without a change sent.
        "ALTER TABLE t ADD COLUMN a int DEFAULT 7",
        "ALTER TABLE t DROP COLUMN v",
        "ALTER TABLE t RENAME COLUMN n TO num",
        // Rewrites every row upstream (1.5 becomes 2) without sending them.
        "ALTER TABLE t ALTER COLUMN num TYPE int8",
        "ALTER TABLE u RENAME TO u2",
        // Labels added upstream send no message; the first row using one does.
        "ALTER TYPE mood ADD VALUE 'ok' BEFORE 'happy'",
        "ALTER TYPE mood ADD VALUE 'ecstatic'",
        "INSERT INTO t (k, m) VALUES (-1, 'ok'), (-2, 'ecstatic'); UPDATE t SET m = 'ok' WHERE id = 1",
    ];
    for sql in steps {
        remote.batch_execute(sql).await.unwrap();
        writes(&done, 5).await;
        // The publisher reads the catalog when the table's next change
        // comes: before the next DDL (one changing the column again first
        // cannot be followed in place; see docs/fan-out.md).
        let lsn = remote_lsn(&remote).await;
        let mut status = publisher.watch_status();
        tokio::time::timeout(WAIT, status.wait_for(|s| s.applied_lsn >= lsn)).await.unwrap().unwrap();
    }
    stop.send_replace(true);
    load.await.unwrap();

    for (local, handle) in &caches {
        assert_follows(&remote, local, handle).await;
    }
    // A cache started now, from the snapshot taken before every DDL above,
    // replays them from the stream.
    let (late, late_handle) = cache_at(&stream, &dirs.path().join("late")).await;
    assert_follows(&remote, &late, &late_handle).await;

    // After a restart a cache's view of a table starts from its own catalog;
    // the Relation messages repeated in each transaction carry the remote
    // attribute numbers (lean facts), so renaming the last column (a drop
    // and an add, without them) is still followed in place.
    let (local, handle) = &caches[0];
    handle.stop().await.unwrap();
    remote.batch_execute("INSERT INTO t (k, m) VALUES (-3, 'happy')").await.unwrap();
    let handle = StreamReplication::start(local.clone(), stream.clone()).unwrap();
    tokio::time::timeout(WAIT, handle.wait_streaming()).await.unwrap().unwrap();
    catch_up(&handle, &remote).await;
    remote
        .batch_execute("ALTER TABLE t RENAME COLUMN a TO a2; ALTER TABLE t ADD COLUMN b text DEFAULT 'bee'")
        .await
        .unwrap();
    remote.batch_execute("INSERT INTO t (k, m) VALUES (-4, 'happy')").await.unwrap();
    for (local, handle) in [(local, &handle), (&caches[1].0, &caches[1].1), (&late, &late_handle)] {
        assert_follows(&remote, local, handle).await;
    }

    handle.stop().await.unwrap();
    caches[1].1.stop().await.unwrap();
    late_handle.stop().await.unwrap();
    publisher.stop().await.unwrap();
}
