//! Replication from a real PostgreSQL (started by `support::pg`) into
//! embedded instances: the data path (copy, every operation and type,
//! restarts, big transactions, schema and publication changes). Each test
//! has its own cluster, database and slot; after each scenario the remote and
//! local contents are compared in full. Failures are in `replication_faults.rs`.

mod support;

use std::time::Duration;

use pglite_cache::replication::{ChangeOp, Lsn, Phase, PublicationSpec, Replication, ReplicationConfig};
use support::pg::PgCluster;
use support::replication::{WAIT, assert_same, catch_up, config, instance, local_count, wait_streaming};

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE items (
    id int PRIMARY KEY, n numeric(12,3), t text, b bytea, j jsonb, a int[], ts timestamptz,
    u uuid, m mood, f float8, tags text[], d date, p posint, moods mood[]
);
CREATE INDEX items_t ON items (t);
CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE logs (msg text, n int);
ALTER TABLE logs REPLICA IDENTITY FULL;
CREATE TABLE docs (id int PRIMARY KEY, body text, rev int);
CREATE PUBLICATION pub FOR ALL TABLES;
"#;

const ITEM_ROWS: &str = r#"
INSERT INTO items VALUES
 (1, 12.5, 'plain', '\x00ff10', '{"a": [1, "two", null]}', '{1,2,3}', '2024-02-29 12:34:56.789+01', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', 1.5e300, '{"x,y","q\"uote",NULL}', '2020-01-01', 7, '{sad,ok}'),
 (2, NULL, E'quote '' and backslash \\ and tab\t and newline\n and unicode ✓ 日本', NULL, 'null', '{}', NULL, NULL, NULL, 'NaN', '{}', NULL, NULL, NULL),
 (3, -0.001, '', '\x', '"s"', '{NULL,4}', 'infinity', gen_random_uuid(), 'sad', -0.0, '{""}', '-infinity', 1, '{}');
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_then_streams_every_operation_and_type() {
    let pg = PgCluster::start();
    let db = pg.create_database("ops").await;
    let remote = pg.client(&db).await;
    remote.batch_execute(SCHEMA).await.unwrap();
    remote.batch_execute(ITEM_ROWS).await.unwrap();
    remote
        .batch_execute(
            "INSERT INTO pairs SELECT i, 'k' || i, 'v' FROM generate_series(1, 100) i; \
             INSERT INTO logs VALUES ('a', 1), ('a', 1), ('b', NULL); \
             INSERT INTO docs SELECT i, (SELECT string_agg(md5(random()::text || i || g), '') \
                 FROM generate_series(1, 250) g), 0 FROM generate_series(1, 5) i;",
        )
        .await
        .unwrap();

    // docs.body: 8,000 random hex digits, which do not compress, so they are
    // stored out of line (TOAST) and an UPDATE of another column does not
    // resend them.
    let out_of_line: bool = remote
        .query_one(
            "SELECT pg_relation_size(reltoastrelid) > 0 AND (SELECT bool_and(pg_column_compression(body) IS NULL \
             AND octet_length(body) = 8000) FROM docs) FROM pg_class WHERE oid = 'docs'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(out_of_line, "docs.body should be stored out of line, uncompressed");

    let local = instance().await;
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    wait_streaming(&handle).await;
    for t in ["items", "pairs", "logs", "docs"] {
        assert_same(&remote, &local, t).await;
    }
    let status = handle.status();
    assert_eq!(status.phase, Phase::Streaming);
    assert_eq!(status.tables.iter().find(|t| t.name == "pairs").unwrap().rows_copied, 100);

    let mut changes = handle.subscribe();
    remote
        .batch_execute(
            r#"
            INSERT INTO items VALUES (4, 1e-3, E'new \\ "row"', '\xdeadbeef', '{"k": {"n": 1}}', '{{1,2},{3,4}}', now(), gen_random_uuid(), 'ok', 3.25, '{a,b}', now(), 3, '{happy}');
            UPDATE items SET t = 'changed', m = 'ok', j = '[1,2]' WHERE id = 1;
            UPDATE items SET id = 20 WHERE id = 2;
            UPDATE items SET n = NULL, b = NULL WHERE id = 3;
            DELETE FROM items WHERE id = 4;
            UPDATE pairs SET v = 'w' WHERE a % 3 = 0;
            UPDATE pairs SET b = 'renamed' WHERE a = 5;
            DELETE FROM pairs WHERE a > 90;
            UPDATE logs SET n = 2 WHERE msg = 'a' AND n = 1 AND ctid = (SELECT min(ctid) FROM logs WHERE msg = 'a');
            DELETE FROM logs WHERE msg = 'b';
            INSERT INTO logs VALUES (NULL, NULL), ('c', 3);
            UPDATE docs SET rev = rev + 1 WHERE id <= 3;
            UPDATE docs SET body = body || 'x' WHERE id = 4;
            "#,
        )
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    for t in ["items", "pairs", "logs", "docs"] {
        assert_same(&remote, &local, t).await;
    }
    // The three `rev` updates came with docs.body as "unchanged TOAST": the
    // apply kept the local values (compared in full just above).
    assert_eq!(handle.status().unchanged_toast_values, 3, "{:?}", handle.status());
    let kept = local.query("SELECT count(*) FROM docs WHERE id <= 3 AND rev = 1 AND length(body) = 8000", &[]).await;
    assert_eq!(kept.unwrap().rows[0].get::<i64>(0), 3);

    // Subscribers see committed transactions with their changes.
    let mut seen = Vec::new();
    while let Ok(tx) = changes.try_recv() {
        seen.extend(tx.changes.iter().map(|c| (c.table.clone(), c.op)));
    }
    assert!(seen.contains(&("items".into(), ChangeOp::Insert)), "{seen:?}");
    assert!(seen.contains(&("pairs".into(), ChangeOp::Delete)), "{seen:?}");

    // TRUNCATE of several tables at once, then new rows.
    remote
        .batch_execute(
            "TRUNCATE pairs, logs; INSERT INTO pairs VALUES (1, 'again', 'v'); INSERT INTO logs VALUES ('after', 1);",
        )
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    for t in ["items", "pairs", "logs", "docs"] {
        assert_same(&remote, &local, t).await;
    }
    assert_eq!(local_count(&local, "pairs").await, 1);

    // Replicated tables are read-only locally.
    let err = local.query("INSERT INTO pairs VALUES (2, 'x', 'y')", &[]).await.unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    // Secondary indexes came along.
    let idx = local.query("SELECT count(*) FROM pg_indexes WHERE indexname = 'items_t'", &[]).await.unwrap();
    assert_eq!(idx.rows[0].get::<i64>(0), 1);

    handle.stop().await.unwrap();
    assert_eq!(handle.status().phase, Phase::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_copy_under_concurrent_writes_loses_nothing() {
    let pg = PgCluster::start();
    let db = pg.create_database("concurrent").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE events (id bigserial PRIMARY KEY, v int NOT NULL, note text); \
             INSERT INTO events (v, note) SELECT i, md5(i::text) FROM generate_series(1, 50000) i; \
             CREATE PUBLICATION pub FOR TABLE events;",
        )
        .await
        .unwrap();
    // A writer that inserts, updates and deletes all through the copy.
    let writer_client = pg.client(&db).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (stop_writer, written_by_writer) = (stop.clone(), written.clone());
    let writer = tokio::spawn(async move {
        let mut i = 0;
        while !stop_writer.load(std::sync::atomic::Ordering::Relaxed) {
            i += 1;
            writer_client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO events (v, note) VALUES ({i}, 'live'); UPDATE events SET v = v + 1 WHERE id = {}; \
                     DELETE FROM events WHERE id = {}; COMMIT;",
                    (i * 7) % 50000 + 1,
                    (i * 13) % 50000 + 1
                ))
                .await
                .unwrap();
            written_by_writer.store(i, std::sync::atomic::Ordering::Relaxed);
        }
        i
    });
    // Waits until the writer has committed `n` more transactions.
    let writes_more = |n: u64| {
        let written = written.clone();
        async move {
            let target = written.load(std::sync::atomic::Ordering::Relaxed) + n;
            let deadline = std::time::Instant::now() + WAIT;
            while written.load(std::sync::atomic::Ordering::Relaxed) < target {
                assert!(std::time::Instant::now() < deadline, "the writer stalled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    writes_more(20).await;
    let local = instance().await;
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    wait_streaming(&handle).await;
    // Some writes also land after the copy, while streaming.
    writes_more(20).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 10, "the writer should have run during the copy ({writes} transactions)");
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "events").await;
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_exactly_and_transactions_are_atomic() {
    let pg = PgCluster::start();
    let db = pg.create_database("resume").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL); \
             INSERT INTO accounts SELECT i, 100 FROM generate_series(1, 100) i; \
             CREATE PUBLICATION pub FOR TABLE accounts;",
        )
        .await
        .unwrap();
    let local = instance().await;
    let cfg = config(&pg, &db, "pub");
    let handle = Replication::start(local.clone(), cfg.clone()).unwrap();
    wait_streaming(&handle).await;

    // Transfers keep the total constant: a reader that saw half of one
    // would see another total.
    let reader_local = local.clone();
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reading2 = reading.clone();
    let reader = tokio::spawn(async move {
        let mut checks = 0;
        while reading2.load(std::sync::atomic::Ordering::Relaxed) {
            let r = reader_local.query("SELECT sum(balance)::int8 FROM accounts", &[]).await.unwrap();
            assert_eq!(r.rows[0].get::<i64>(0), 10_000, "a reader saw half of a transaction");
            checks += 1;
        }
        checks
    });
    for i in 0..50 {
        let (a, b) = (i % 100 + 1, (i * 37) % 100 + 1);
        if a == b {
            continue;
        }
        remote
            .batch_execute(&format!(
                "BEGIN; UPDATE accounts SET balance = balance - 5 WHERE id = {a}; \
                 UPDATE accounts SET balance = balance + 5 WHERE id = {b}; COMMIT;"
            ))
            .await
            .unwrap();
    }
    catch_up(&handle, &remote).await;
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.await.unwrap() > 0);
    assert_same(&remote, &local, "accounts").await;

    // Stop, write more on the remote, start again: exactly the missing
    // transactions are applied.
    handle.stop().await.unwrap();
    let stopped_at = handle.status().applied_lsn;
    remote
        .batch_execute(
            "INSERT INTO accounts VALUES (1000, 0); UPDATE accounts SET balance = balance + 1 WHERE id <= 10; \
             UPDATE accounts SET balance = balance - 10 WHERE id = 1000; DELETE FROM accounts WHERE id = 1000;",
        )
        .await
        .unwrap();
    let handle = Replication::start(local.clone(), cfg.clone()).unwrap();
    catch_up(&handle, &remote).await;
    assert!(handle.status().applied_lsn > stopped_at, "{:?} vs stopped at {stopped_at}", handle.status());
    assert_same(&remote, &local, "accounts").await;
    let stored = local.query("SELECT applied_lsn::text FROM pglite_cache.replication", &[]).await.unwrap();
    let stored: Lsn = stored.rows[0].get::<String>(0).parse().unwrap();
    assert_eq!(stored, handle.status().applied_lsn);

    // The slot's confirmed position never runs ahead of what is stored.
    handle.stop().await.unwrap();
    let confirmed = remote
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&cfg.slot_name])
        .await
        .unwrap();
    let confirmed: Lsn = confirmed.get::<_, String>(0).parse().unwrap();
    assert!(confirmed <= stored, "confirmed {confirmed} ahead of stored {stored}");

    // Decommission drops the slot and the bookkeeping.
    handle.decommission().await.unwrap();
    let slots = remote.query("SELECT 1 FROM pg_replication_slots", &[]).await.unwrap();
    assert!(slots.is_empty());
    assert!(local.query("SELECT 1 FROM pglite_cache.replication", &[]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transactions_apply_in_pieces_and_atomically() {
    let pg = PgCluster::start();
    let db = pg.create_database("large").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE big (id int PRIMARY KEY, v text NOT NULL, n int); \
             CREATE PUBLICATION pub FOR TABLE big;",
        )
        .await
        .unwrap();
    let local = instance().await;
    // A small buffer forces the piecewise path (an open local transaction).
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub").max_buffered_bytes(256 << 10)).unwrap();
    wait_streaming(&handle).await;

    let reader_local = local.clone();
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reading2 = reading.clone();
    let reader = tokio::spawn(async move {
        let mut seen = std::collections::BTreeSet::new();
        while reading2.load(std::sync::atomic::Ordering::Relaxed) {
            let r = reader_local.query("SELECT count(*), coalesce(sum(n), 0)::int8 FROM big", &[]).await.unwrap();
            seen.insert((r.rows[0].get::<i64>(0), r.rows[0].get::<i64>(1)));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    });
    const N: i64 = 100_000;
    remote
        .batch_execute(&format!("INSERT INTO big SELECT i, md5(i::text), 1 FROM generate_series(1, {N}) i"))
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "big").await;
    remote.batch_execute("UPDATE big SET n = 2").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "big").await;
    remote.batch_execute("DELETE FROM big WHERE id % 2 = 0").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "big").await;
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.await.unwrap();
    // Only states between whole transactions were visible.
    let allowed = [(0, 0), (N, N), (N, 2 * N), (N / 2, N)];
    assert!(seen.iter().all(|s| allowed.contains(s)), "a reader saw a partial transaction: {seen:?}");
    let status = handle.status();
    let t = &status.tables[0];
    assert_eq!((t.inserted, t.updated, t.deleted), (N as u64, N as u64, N as u64 / 2));
    handle.stop().await.unwrap();
}

/// Big groups of inserts and of whole-row updates are bulk-loaded with
/// COPY, in the binary format when every column's type allows it (values
/// converted from the remote's text output). Each such type with its edge
/// values, from a remote whose time zone is east of UTC and was once offset
/// by seconds (local mean time before 1920), must arrive unchanged; so must
/// a transaction with a value the conversion does not read (a BC date: that
/// step goes in text) and a table with a type it does not cover (interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_changes_of_every_binary_copy_type_arrive_unchanged() {
    let pg = PgCluster::start();
    let db = pg.create_database("bulk_types").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET timezone TO 'Asia/Kathmandu'; \
             CREATE TABLE typed (id bigint PRIMARY KEY, b boolean, s smallint, i integer, r real, \
                 f double precision, txt text, vc varchar(12), c char(3), j json, jb jsonb, by bytea, u uuid, \
                 d date, ts timestamp, tz timestamptz, tz3 timestamptz(3), n numeric, m numeric(12,3)); \
             CREATE TABLE priced (id int PRIMARY KEY, price numeric(12,3), at timestamptz, span interval); \
             CREATE PUBLICATION pub FOR TABLE typed, priced;"
        ))
        .await
        .unwrap();
    let local = instance().await;
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    wait_streaming(&handle).await;

    // Row g of a bulk insert: every column, NULL now and then, and the
    // special values of each type in the first rows.
    let rows = |from: i64, to: i64| {
        format!(
            r#"INSERT INTO typed SELECT g,
                 CASE WHEN g % 7 = 0 THEN NULL ELSE g % 3 = 0 END,
                 (g % 65535 - 32767)::smallint,
                 CASE g WHEN 1 THEN 2147483647 WHEN 2 THEN -2147483648 ELSE g * 1000 - 1000000 END,
                 CASE g WHEN 1 THEN 'NaN'::real WHEN 2 THEN '-Infinity'::real WHEN 3 THEN '-0'::real
                     ELSE (g / 7.0)::real END,
                 CASE g WHEN 1 THEN 'Infinity'::float8 WHEN 2 THEN 1e-300 WHEN 3 THEN -1.5e300
                     ELSE g * 1.1e-5 END,
                 CASE g % 5 WHEN 0 THEN '' WHEN 1 THEN E'tab\t newline\n backslash \\ quote '' ✓ 日本'
                     ELSE md5(g::text) END,
                 left(md5(g::text), 12), (g % 100)::text,
                 json_build_object('g', g, 's', E'x\ny'), jsonb_build_object('g', g, 'a', ARRAY[g, -g]),
                 CASE WHEN g % 11 = 0 THEN '\x'::bytea ELSE decode(md5(g::text), 'hex') END,
                 md5(g::text)::uuid,
                 CASE g WHEN 1 THEN 'infinity'::date WHEN 2 THEN '-infinity'::date WHEN 3 THEN '10000-01-01'
                     WHEN 4 THEN '0001-01-02' WHEN 2600 THEN '0044-03-15 BC' ELSE date '1890-01-01' + g * 37 END,
                 CASE g WHEN 1 THEN 'infinity'::timestamp
                     ELSE timestamp '1890-01-01' + g * interval '12345 minutes 6.789012 seconds' END,
                 CASE g WHEN 1 THEN '-infinity'::timestamptz
                     ELSE timestamptz '1890-01-01 00:00:00+00' + g * interval '1 day 0.000001 seconds' END,
                 now() + g * interval '1.2345 seconds',
                 CASE g WHEN 1 THEN 'NaN'::numeric WHEN 2 THEN 'Infinity' WHEN 3 THEN '-Infinity' WHEN 4 THEN 0
                     WHEN 5 THEN 1e20 + 0.000001 ELSE (g - 1000) * 1.125 / 10 ^ (g % 9) END,
                 CASE WHEN g % 13 = 0 THEN NULL ELSE (g - 1000) * 1.0005 END
               FROM generate_series({from}, {to}) g"#
        )
    };
    remote.batch_execute(&rows(1, 2000)).await.unwrap();
    remote
        .batch_execute(
            "INSERT INTO priced SELECT g, g * 1.125, timestamptz '2024-03-10 12:00:00+00' + g * interval '1 hour', \
             g * interval '1 minute' FROM generate_series(1, 1000) g",
        )
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "typed").await;
    assert_same(&remote, &local, "priced").await;

    // Whole-row updates (delete + COPY locally), then inserts with a BC date
    // among them.
    remote
        .batch_execute(
            "UPDATE typed SET b = NOT b, i = i / 2, txt = txt || 'x', tz = tz + interval '1 year 0.5 seconds', \
             d = CASE WHEN d = 'infinity' THEN d ELSE d - 1 END, n = -n; \
             UPDATE priced SET price = -price",
        )
        .await
        .unwrap();
    remote.batch_execute(&rows(2001, 3000)).await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "typed").await;
    assert_same(&remote, &local, "priced").await;
    let bc = local.query("SELECT d::text FROM typed WHERE id = 2600", &[]).await.unwrap();
    assert_eq!(bc.rows[0].get::<String>(0), "0044-03-15 BC");
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_upstream_are_added_locally() {
    let pg = PgCluster::start();
    let db = pg.create_database("addcol").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b'); \
             CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await
        .unwrap();
    let local = instance().await;
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    wait_streaming(&handle).await;
    remote
        .batch_execute(
            "ALTER TABLE t ADD COLUMN plain int; ALTER TABLE t ADD COLUMN with_default text NOT NULL DEFAULT 'd'; \
             INSERT INTO t VALUES (3, 'c', 3, 'x'); UPDATE t SET plain = 1 WHERE id = 1;",
        )
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;

    // A dropped column is dropped locally too (schema changes in general:
    // tests/replication_schema.rs).
    remote.batch_execute("ALTER TABLE t DROP COLUMN plain; UPDATE t SET v = 'after drop' WHERE id = 2;").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    assert_eq!(handle.status().phase, Phase::Streaming);
    remote.batch_execute("INSERT INTO t VALUES (4, 'd', 'y')").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "t").await;
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_publication_over_a_unix_socket_and_decommission() {
    let pg = PgCluster::start();
    let db = pg.create_database("owned").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE SCHEMA shop; CREATE TABLE shop.orders (id int PRIMARY KEY, total numeric); \
             CREATE TABLE other (id int PRIMARY KEY); \
             INSERT INTO shop.orders VALUES (1, 9.99); INSERT INTO other VALUES (1);",
        )
        .await
        .unwrap();
    let local = instance().await;
    let cfg = ReplicationConfig::new(
        pg.unix_url(&db).parse().unwrap(),
        PublicationSpec::Owned { name: "cache_pub".into(), tables: vec!["shop.orders".into()] },
    )
    .slot_name("owned_slot");
    let handle = Replication::start(local.clone(), cfg.clone()).unwrap();
    wait_streaming(&handle).await;
    remote.batch_execute("INSERT INTO shop.orders VALUES (2, 1.5); INSERT INTO other VALUES (2);").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "shop.orders").await;
    assert!(local.query("SELECT 1 FROM other", &[]).await.is_err(), "unpublished tables are not copied");
    handle.decommission().await.unwrap();
    let pubs = remote.query("SELECT 1 FROM pg_publication WHERE pubname = 'cache_pub'", &[]).await.unwrap();
    assert!(pubs.is_empty());
    // The local copy stays, now writable.
    local.query("INSERT INTO shop.orders VALUES (3, 0)", &[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_added_to_the_publication_are_backfilled() {
    let pg = PgCluster::start();
    let db = pg.create_database("added").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a VALUES (1); \
             CREATE TABLE b (id int PRIMARY KEY, v text); INSERT INTO b SELECT i, 'old' FROM generate_series(1, 1000) i; \
             CREATE TABLE c (id int PRIMARY KEY); INSERT INTO c SELECT generate_series(1, 10); \
             CREATE PUBLICATION pub FOR TABLE a;",
        )
        .await
        .unwrap();
    let local = instance().await;
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    wait_streaming(&handle).await;

    // Added, then changed right away: copied at a point consistent with the stream.
    remote
        .batch_execute(
            "ALTER PUBLICATION pub ADD TABLE b; \
             BEGIN; UPDATE b SET v = 'new' WHERE id <= 10; INSERT INTO a VALUES (2); COMMIT; \
             DELETE FROM b WHERE id > 990; INSERT INTO b VALUES (5000, 'x');",
        )
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    // The backfill happens right after the transaction that revealed it.
    let deadline = std::time::Instant::now() + WAIT;
    while local.query("SELECT 1 FROM pglite_cache.tables WHERE table_name = 'b'", &[]).await.unwrap().rows.is_empty() {
        assert!(std::time::Instant::now() < deadline, "b was not backfilled: {:?}", handle.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "a").await;
    assert_same(&remote, &local, "b").await;

    // Added without any change: found by the periodic publication check.
    remote.batch_execute("ALTER PUBLICATION pub ADD TABLE c").await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while local.query("SELECT 1 FROM pglite_cache.tables WHERE table_name = 'c'", &[]).await.unwrap().rows.is_empty() {
        assert!(std::time::Instant::now() < deadline, "c was not backfilled: {:?}", handle.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    remote.batch_execute("INSERT INTO c VALUES (11); DELETE FROM c WHERE id = 1;").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "c").await;
    assert_eq!(handle.status().tables.len(), 3);

    // Survives a restart (the tables and their LSNs are stored).
    handle.stop().await.unwrap();
    remote.batch_execute("INSERT INTO b VALUES (6000, 'y'); INSERT INTO c VALUES (12);").await.unwrap();
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub")).unwrap();
    catch_up(&handle, &remote).await;
    assert_same(&remote, &local, "b").await;
    assert_same(&remote, &local, "c").await;

    // A table removed from the publication stops receiving changes; its
    // local rows stay as they were.
    remote.batch_execute("ALTER PUBLICATION pub DROP TABLE c; INSERT INTO c VALUES (13);").await.unwrap();
    catch_up(&handle, &remote).await;
    assert_eq!(local_count(&local, "c").await, 11);
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_row_filters_column_lists_and_writable_opt_out() {
    let pg = PgCluster::start();
    let db = pg.create_database("pg15").await;
    let remote = pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE TABLE measures (id int, at date NOT NULL, v numeric, PRIMARY KEY (id, at)) PARTITION BY RANGE (at); \
             CREATE TABLE measures_2023 PARTITION OF measures FOR VALUES FROM ('2023-01-01') TO ('2024-01-01'); \
             CREATE TABLE measures_2024 PARTITION OF measures FOR VALUES FROM ('2024-01-01') TO ('2025-01-01'); \
             CREATE INDEX measures_v ON measures (v); \
             INSERT INTO measures VALUES (1, '2023-05-01', 1.5), (2, '2024-05-01', 2.5); \
             CREATE TABLE users (id int PRIMARY KEY, email text, secret text, active boolean NOT NULL); \
             INSERT INTO users VALUES (1, 'a@x', 's1', true), (2, 'b@x', 's2', false); \
             CREATE PUBLICATION pub FOR TABLE measures, users (id, email, active) WHERE (id >= 2) \
               WITH (publish_via_partition_root = true);",
        )
        .await
        .unwrap();
    let local = instance().await;
    let handle = Replication::start(local.clone(), config(&pg, &db, "pub").read_only(false)).unwrap();
    wait_streaming(&handle).await;
    remote
        .batch_execute(
            "INSERT INTO measures VALUES (3, '2024-06-01', 3.5); UPDATE measures SET v = 0 WHERE id = 1; \
             UPDATE measures SET at = '2024-01-02' WHERE id = 1; \
             INSERT INTO users VALUES (3, 'c@x', 's3', true), (4, 'd@x', 's4', false); \
             UPDATE users SET email = 'z@x' WHERE id = 1; UPDATE users SET email = 'y@x', active = true WHERE id = 2;",
        )
        .await
        .unwrap();
    catch_up(&handle, &remote).await;
    // The partitioned table replicates as one local table.
    assert_same(&remote, &local, "measures").await;
    // Only published columns, only rows matching the filter.
    let users = local.query("SELECT id, email, active FROM users ORDER BY id", &[]).await.unwrap();
    let rows: Vec<(i32, String, bool)> = users.rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(rows, vec![(2, "y@x".into(), true), (3, "c@x".into(), true), (4, "d@x".into(), false)]);
    assert!(local.query("SELECT secret FROM users", &[]).await.is_err());
    // read_only(false): local writes are allowed.
    local.query("INSERT INTO users VALUES (100, 'local', true)", &[]).await.unwrap();
    handle.stop().await.unwrap();
}
