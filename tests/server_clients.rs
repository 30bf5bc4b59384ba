//! The wire server with real clients: tokio-postgres, sqlx, psql.

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::{SOCKET_PORT, TestServer};
use futures_util::{SinkExt, TryStreamExt, future::join_all};
use pglite_cache::server::ServerConfig;
use sqlx::postgres::PgPoolOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_statements_pipelining_errors_and_copy() {
    let server = TestServer::start(ServerConfig::default()).await;
    let client = server.connect().await;
    client.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)").await.unwrap();

    // Prepared statements, executed many times.
    let insert = client.prepare("INSERT INTO items VALUES ($1, $2)").await.unwrap();
    for id in 0..50 {
        client.execute(&insert, &[&id, &format!("item {id}")]).await.unwrap();
    }
    // Pipelining: tokio-postgres sends concurrent requests without waiting.
    let select = client.prepare("SELECT name FROM items WHERE id = $1").await.unwrap();
    let names = join_all((0..50).map(|id| {
        let (client, select) = (&client, &select);
        async move { client.query_one(select, &[&id]).await.unwrap().get::<_, String>(0) }
    }))
    .await;
    assert_eq!(names, (0..50).map(|id| format!("item {id}")).collect::<Vec<_>>());

    // Errors keep their fields; the connection goes on.
    let err = client.query("SELECT nope FROM items", &[]).await.unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code(), &tokio_postgres::error::SqlState::UNDEFINED_COLUMN);
    assert_eq!(db.position(), Some(&tokio_postgres::error::ErrorPosition::Original(8)));
    let err = client.execute(&insert, &[&1, &"dup"]).await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().constraint(), Some("items_pkey"));

    // COPY FROM STDIN, 10,000 rows in several chunks.
    let sink = client.copy_in("COPY items FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in 0..10 {
        let rows: String = (0..1000).map(|i| format!("{}\tcopied {}\n", 1000 + chunk * 1000 + i, i)).collect();
        sink.send(Bytes::from(rows)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 10_000);
    let count: i64 = client.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
    assert_eq!(count, 10_050);

    // COPY with bad data fails cleanly and changes nothing.
    let sink = client.copy_in("COPY items FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"not-a-number\tx\n")).await.unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INVALID_TEXT_REPRESENTATION));
    let count: i64 = client.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
    assert_eq!(count, 10_050);

    // COPY inside a transaction, then rolled back.
    client.batch_execute("BEGIN").await.unwrap();
    let sink = client.copy_in("COPY items (id, name) FROM STDIN WITH (FORMAT csv)").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"99999,in tx\n")).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
    let seen: i64 = client.query_one("SELECT count(*) FROM items WHERE id = 99999", &[]).await.unwrap().get(0);
    assert_eq!(seen, 1, "the transaction sees its own COPY");
    client.batch_execute("ROLLBACK").await.unwrap();
    let seen: i64 = client.query_one("SELECT count(*) FROM items WHERE id = 99999", &[]).await.unwrap().get(0);
    assert_eq!(seen, 0);

    // COPY TO STDOUT.
    let stream = client.copy_out("COPY (SELECT id, name FROM items WHERE id < 3 ORDER BY id) TO STDOUT").await.unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"0\titem 0\n1\titem 1\n2\titem 2\n");

    // Notices reach the connection that raised them, and only that one.
    let (raiser, mut raiser_notices) = noticing_client(&server).await;
    let (other, mut other_notices) = noticing_client(&server).await;
    raiser.batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from %', 'raiser'; END $$").await.unwrap();
    // The notice precedes the statement's reply on the wire, so it is here by now.
    let notice = raiser_notices.try_recv().expect("the raising connection got its notice");
    assert_eq!((notice.severity(), notice.message()), ("NOTICE", "hello from raiser"));
    // A round trip on the other connection delivers anything sent to it.
    other.batch_execute("SELECT 1").await.unwrap();
    assert!(other_notices.try_recv().is_err(), "another connection's notice leaked");
    raiser.batch_execute("SELECT 1").await.unwrap();
    assert!(raiser_notices.try_recv().is_err(), "the notice came once");
    server.shutdown().await;
}

/// A tokio-postgres client whose notices (NoticeResponse) are collected.
async fn noticing_client(
    server: &TestServer,
) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::error::DbError>) {
    let (client, mut connection) = server.tcp_config().connect(tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notice(n) = message {
                let _ = tx.send(n);
            }
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_statement_names_on_different_connections_stay_apart() {
    let server = TestServer::start(ServerConfig::default()).await;
    // sqlx names prepared statements sqlx_s_1, sqlx_s_2, ... on every connection.
    let a = PgPoolOptions::new().max_connections(1).connect(&server.url()).await.unwrap();
    let b = PgPoolOptions::new().max_connections(1).connect(&server.url()).await.unwrap();
    for round in 0..3 {
        let x: String =
            sqlx::query_scalar("SELECT 'a' || $1::text").bind(round.to_string()).fetch_one(&a).await.unwrap();
        let y: i32 = sqlx::query_scalar("SELECT 100 + $1::int").bind(round).fetch_one(&b).await.unwrap();
        assert_eq!((x, y), (format!("a{round}"), 100 + round));
    }
    a.close().await;
    b.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_pool_of_8_runs_concurrent_transfers_without_interleaving() {
    const ACCOUNTS: i32 = 10;
    const TASKS: i32 = 8;
    const TRANSFERS: i32 = 40;
    let server = TestServer::start(ServerConfig::default()).await;
    let pool = PgPoolOptions::new().max_connections(8).min_connections(8).connect(&server.url()).await.unwrap();
    sqlx::query("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)").execute(&pool).await.unwrap();
    sqlx::query("INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, $1) g")
        .bind(ACCOUNTS)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE transfers (task int, n int, amount bigint)").execute(&pool).await.unwrap();

    let workers = (0..TASKS).map(|task| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut done = 0;
            for n in 0..TRANSFERS {
                let from = (task + n) % ACCOUNTS + 1;
                let to = (task * 3 + n * 7 + 1) % ACCOUNTS + 1;
                if from == to {
                    continue;
                }
                let amount = i64::from(task + 1);
                let mut tx = pool.begin().await.unwrap();
                let before: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = $1")
                    .bind(from)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query("UPDATE accounts SET balance = balance - $2 WHERE id = $1")
                    .bind(from)
                    .bind(amount)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tokio::task::yield_now().await; // give the others every chance to interleave
                // Reads its own uncommitted write...
                let after: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = $1")
                    .bind(from)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                assert_eq!(after, before - amount, "a transaction sees its own write, and only its own");
                sqlx::query("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
                    .bind(to)
                    .bind(amount)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                // ...while the total inside the transaction is still constant.
                let total: i64 =
                    sqlx::query_scalar("SELECT sum(balance)::bigint FROM accounts").fetch_one(&mut *tx).await.unwrap();
                assert_eq!(total, i64::from(ACCOUNTS) * 1000);
                sqlx::query("INSERT INTO transfers VALUES ($1, $2, $3)")
                    .bind(task)
                    .bind(n)
                    .bind(amount)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                done += 1;
            }
            done
        })
    });
    // Readers outside transactions never see a half-done transfer.
    let reader = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut reads = 0;
            for _ in 0..100 {
                let total: i64 =
                    sqlx::query_scalar("SELECT sum(balance)::bigint FROM accounts").fetch_one(&pool).await.unwrap();
                assert_eq!(total, i64::from(ACCOUNTS) * 1000, "no uncommitted write of another connection is visible");
                reads += 1;
            }
            reads
        })
    };
    let mut committed = 0_i64;
    for worker in workers {
        committed += worker.await.unwrap();
    }
    assert_eq!(reader.await.unwrap(), 100);
    let total: i64 = sqlx::query_scalar("SELECT sum(balance)::bigint FROM accounts").fetch_one(&pool).await.unwrap();
    assert_eq!(total, i64::from(ACCOUNTS) * 1000);
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM transfers").fetch_one(&pool).await.unwrap();
    assert!(committed > i64::from(TASKS * TRANSFERS) / 2, "most transfers ran: {committed}");
    assert_eq!(logged, committed, "every committed transfer, and only those, is recorded");
    // Each account's balance is exactly what the log says it should be.
    let mismatches: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM accounts a WHERE a.balance <> 1000 + coalesce((SELECT sum(CASE WHEN ((t.task * 3 + t.n * 7 + 1) % $1) + 1 = a.id THEN t.amount ELSE 0 END) - sum(CASE WHEN ((t.task + t.n) % $1) + 1 = a.id THEN t.amount ELSE 0 END) FROM transfers t), 0)",
    )
    .bind(ACCOUNTS)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(mismatches, 0, "no transfer was lost or applied twice");
    pool.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_of_one_client_do_not_leak_to_others() {
    let server = TestServer::start(ServerConfig::default()).await;
    let a = server.connect().await;
    let b = server.connect().await;
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'; SET work_mem = '7MB'").await.unwrap();
    assert_eq!(show(&b, "TimeZone").await, "UTC");
    assert_eq!(show(&b, "work_mem").await, "4MB");
    assert_eq!(show(&a, "TimeZone").await, "Asia/Tokyo");
    assert_eq!(show(&a, "work_mem").await, "7MB");
    // The Rust API sees the defaults too.
    let rows = server.db.query("SELECT current_setting('TimeZone') AS tz", &[]).await.unwrap().rows;
    assert_eq!(rows[0].get::<String>("tz"), "UTC");
    // A setting made inside a transaction is kept after COMMIT, dropped on ROLLBACK.
    b.batch_execute("BEGIN; SET statement_timeout = '5s'; COMMIT").await.unwrap();
    b.batch_execute("BEGIN; SET lock_timeout = '3s'; ROLLBACK").await.unwrap();
    assert_eq!(show(&b, "statement_timeout").await, "5s");
    assert_eq!(show(&b, "lock_timeout").await, "0");
    assert_eq!(show(&a, "statement_timeout").await, "0");
    // RESET and DISCARD ALL apply to the client that runs them.
    a.batch_execute("RESET TimeZone").await.unwrap();
    assert_eq!(show(&a, "TimeZone").await, "UTC");
    assert_eq!(show(&a, "work_mem").await, "7MB");
    let stmt = b.prepare("SELECT 1").await.unwrap();
    a.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(show(&a, "work_mem").await, "4MB");
    assert_eq!(
        b.query_one(&stmt, &[]).await.unwrap().get::<_, i32>(0),
        1,
        "DISCARD ALL of one client keeps the others' statements"
    );
    assert_eq!(show(&b, "statement_timeout").await, "5s");

    // Inside a script, or through the extended protocol, they would hit every client: refused.
    let err = a.batch_execute("SELECT 1; DISCARD ALL").await.unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED), "{err}");
    let err = a.execute("DEALLOCATE ALL", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED), "{err}");
    assert_eq!(b.query_one(&stmt, &[]).await.unwrap().get::<_, i32>(0), 1);

    // Settings from the startup packet (PGOPTIONS) belong to that connection.
    let mut config = server.tcp_config();
    config.options("-c search_path=app,public -c TimeZone=America/New_York");
    let c = common::connect(config).await.unwrap();
    assert_eq!(show(&c, "search_path").await, "app,public");
    assert_eq!(show(&c, "TimeZone").await, "America/New_York");
    assert_eq!(show(&b, "search_path").await, "public");
    server.shutdown().await;
}

async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    client.query_one(&format!("SELECT current_setting('{name}')"), &[]).await.unwrap().get(0)
}

fn psql() -> &'static str {
    const PSQL: &str = "psql";
    match Command::new(PSQL).arg("--version").output() {
        Ok(out) if out.status.success() => PSQL,
        _ => panic!(
            "the psql binary is required for this test: install postgresql-client (e.g. `apt-get install postgresql-client`)"
        ),
    }
}

fn run_psql(server: &TestServer, args: &[&str], stdin: Option<&str>) -> (String, String, bool) {
    use std::io::Write;
    let dir = server.socket_dir.to_str().unwrap().to_owned();
    let mut child = Command::new(psql())
        .args([
            "-X",
            "-h",
            &dir,
            "-p",
            &SOCKET_PORT.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_meta_commands_copy_and_errors() {
    let server = TestServer::start(ServerConfig::default()).await;
    let s = &server;
    let (out, err, ok) = tokio::task::block_in_place(|| {
        run_psql(s, &["-c", "CREATE TABLE people (id int PRIMARY KEY, name text NOT NULL)", "-c", "\\d people"], None)
    });
    assert!(ok, "psql failed: {err}");
    assert!(out.contains("Table \"public.people\""), "{out}");
    assert!(out.contains("\"people_pkey\" PRIMARY KEY, btree (id)"), "{out}");

    let (out, err, ok) = tokio::task::block_in_place(|| {
        run_psql(
            s,
            &["-f", "-"],
            Some(
                "\\copy people from stdin\n1\tAda\n2\tGrace\n\\.\nSELECT count(*) AS n FROM people;\n\\copy (SELECT name FROM people ORDER BY id) to stdout\n",
            ),
        )
    });
    assert!(ok, "psql failed: {err}");
    assert!(out.contains("COPY 2"), "{out}");
    assert!(out.contains("Ada\nGrace"), "{out}");

    let (_, err, ok) = tokio::task::block_in_place(|| run_psql(s, &["-c", "SELECT * FROM missing"], None));
    assert!(!ok);
    assert!(err.contains("relation \"missing\" does not exist"), "{err}");

    let (out, _, ok) = tokio::task::block_in_place(|| run_psql(s, &["-c", "\\dt"], None));
    assert!(ok);
    assert!(out.contains("people"), "{out}");
    server.shutdown().await;
}

/// A tokio-postgres client whose notifications are collected.
async fn listening_client(
    server: &TestServer,
) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>) {
    let (client, mut connection) = server.tcp_config().connect(tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n);
            }
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_the_listening_connections_only() {
    let server = TestServer::start(ServerConfig::default()).await;
    let (a, mut a_rx) = listening_client(&server).await;
    let (b, mut b_rx) = listening_client(&server).await;
    let (c, mut c_rx) = listening_client(&server).await;
    a.batch_execute("LISTEN orders").await.unwrap();
    b.batch_execute("LISTEN orders; LISTEN \"Other\"").await.unwrap();

    c.batch_execute("NOTIFY orders, 'first'").await.unwrap();
    let wait = Duration::from_secs(10);
    let n = tokio::time::timeout(wait, a_rx.recv()).await.unwrap().unwrap();
    assert_eq!((n.channel(), n.payload()), ("orders", "first"));
    let n = tokio::time::timeout(wait, b_rx.recv()).await.unwrap().unwrap();
    assert_eq!((n.channel(), n.payload()), ("orders", "first"));

    // A's UNLISTEN does not stop B from hearing; A hears no more.
    a.batch_execute("UNLISTEN orders").await.unwrap();
    c.batch_execute("BEGIN; NOTIFY orders, 'second'; NOTIFY \"Other\", 'x'; COMMIT").await.unwrap();
    let n = tokio::time::timeout(wait, b_rx.recv()).await.unwrap().unwrap();
    assert_eq!(n.payload(), "second");
    let n = tokio::time::timeout(wait, b_rx.recv()).await.unwrap().unwrap();
    assert_eq!((n.channel(), n.payload()), ("Other", "x"));

    // A listener hears its own NOTIFY too, in the reply.
    b.batch_execute("NOTIFY orders, 'mine'").await.unwrap();
    let n = tokio::time::timeout(wait, b_rx.recv()).await.unwrap().unwrap();
    assert_eq!(n.payload(), "mine");

    // A round trip on each connection flushes anything still pending.
    a.simple_query("SELECT 1").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    assert!(a_rx.try_recv().is_err(), "A stopped listening");
    assert!(c_rx.try_recv().is_err(), "C never listened");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_pipelined_behind_a_query_with_a_named_statement() {
    use bytes::BytesMut;
    use postgres_protocol::message::frontend;
    let server = TestServer::start(ServerConfig::default()).await;
    let mut raw = common::Raw::connect(&server).await;
    raw.query("CREATE TABLE t (a int, b text)").await;

    // One write: a query, then Parse (named) / Bind / Execute / Sync of a COPY.
    let mut buf = BytesMut::new();
    frontend::query("SELECT 41 + 1", &mut buf).unwrap();
    frontend::parse("copy_stmt", "COPY t FROM STDIN", [], &mut buf).unwrap();
    frontend::bind("", "copy_stmt", [], [], |_: (), _| Ok(postgres_protocol::IsNull::No), [], &mut buf)
        .map_err(|_| ())
        .unwrap();
    frontend::execute("", 0, &mut buf).unwrap();
    frontend::sync(&mut buf);
    raw.send(&buf).await;
    let first = raw.read_until_ready().await;
    let tags: Vec<u8> = first.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"TDCZ", "the query's answer first");
    let mut tags = Vec::new();
    while tags.last() != Some(&b'G') {
        tags.push(raw.read_message().await.unwrap().0);
    }
    assert_eq!(tags, b"12G", "ParseComplete, BindComplete, CopyInResponse");

    let mut buf = BytesMut::new();
    frontend::CopyData::new(&b"1\tone\n2\ttwo\n"[..]).unwrap().write(&mut buf);
    frontend::copy_done(&mut buf);
    frontend::sync(&mut buf);
    raw.send(&buf).await;
    let done = raw.read_until_ready().await;
    let tags: Vec<u8> = done.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"CZ", "{done:?}");
    assert_eq!(done[0].1, b"COPY 2\0");

    // The named statement exists once (created by the replay, not the probe).
    let mut buf = BytesMut::new();
    frontend::bind("", "copy_stmt", [], [], |_: (), _| Ok(postgres_protocol::IsNull::No), [], &mut buf)
        .map_err(|_| ())
        .unwrap();
    frontend::execute("", 0, &mut buf).unwrap();
    frontend::sync(&mut buf);
    raw.send(&buf).await;
    assert_eq!(raw.read_message().await.unwrap().0, b'2');
    assert_eq!(raw.read_message().await.unwrap().0, b'G');
    let mut buf = BytesMut::new();
    frontend::CopyData::new(&b"3\tthree\n"[..]).unwrap().write(&mut buf);
    frontend::copy_done(&mut buf);
    frontend::sync(&mut buf);
    raw.send(&buf).await;
    let tags: Vec<u8> = raw.read_until_ready().await.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"CZ");
    let n = server.db.query("SELECT count(*)::int AS n FROM t", &[]).await.unwrap().rows[0].get::<i32>("n");
    assert_eq!(n, 3);
    server.shutdown().await;
}
