//! Per-connection state on the shared backend: the unnamed statement and
//! portal, SQL-level names next to protocol names, and cleanup when a client
//! leaves.

mod common;

use bytes::BytesMut;
use common::{Raw, TestServer, error_code};
use pglite_cache::server::ServerConfig;
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;
use sqlx::postgres::PgPoolOptions;

fn parse(name: &str, sql: &str, buf: &mut BytesMut) {
    frontend::parse(name, sql, [tokio_postgres::types::Type::INT4.oid()], buf).unwrap();
}

fn bind_int(portal: &str, statement: &str, value: i32, buf: &mut BytesMut) {
    let text = value.to_string();
    frontend::bind(
        portal,
        statement,
        [0],
        [text.as_str()],
        |v, out| {
            out.extend_from_slice(v.as_bytes());
            Ok(IsNull::No)
        },
        [0],
        buf,
    )
    .map_err(|_| "bind")
    .unwrap();
}

/// The text of the first column of every DataRow.
fn first_values(messages: &[(u8, Vec<u8>)]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.0 == b'D')
        .map(|(_, body)| {
            let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
            String::from_utf8(body[6..6 + len].to_vec()).unwrap()
        })
        .collect()
}

async fn sync_only(raw: &mut Raw, mut buf: BytesMut) -> Vec<(u8, Vec<u8>)> {
    frontend::sync(&mut buf);
    raw.send(&buf).await;
    raw.read_until_ready().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statements_and_portals_are_private_across_round_trips() {
    let server = TestServer::start(ServerConfig::default()).await;
    let mut a = Raw::connect(&server).await;
    let mut b = Raw::connect(&server).await;
    for i in 0..50 {
        // A and B each prepare the unnamed statement, then execute it later,
        // interleaved: each must run its own SQL.
        let mut buf = BytesMut::new();
        parse("", "SELECT $1::int + 1", &mut buf);
        let reply = sync_only(&mut a, buf).await;
        assert_eq!(reply.iter().map(|m| m.0).collect::<Vec<_>>(), b"1Z", "A's Parse: {reply:?}");
        let mut buf = BytesMut::new();
        parse("", "SELECT $1::int * 100", &mut buf);
        sync_only(&mut b, buf).await;

        let mut buf = BytesMut::new();
        bind_int("", "", i, &mut buf);
        frontend::execute("", 0, &mut buf).unwrap();
        let reply = sync_only(&mut a, buf).await;
        assert_eq!(first_values(&reply), vec![(i + 1).to_string()], "A got {reply:?}");

        let mut buf = BytesMut::new();
        bind_int("", "", i, &mut buf);
        frontend::execute("", 0, &mut buf).unwrap();
        let reply = sync_only(&mut b, buf).await;
        assert_eq!(first_values(&reply), vec![(i * 100).to_string()], "B got {reply:?}");
        assert_eq!(reply.iter().filter(|m| m.0 == b'3').count(), 0, "no stray CloseComplete: {reply:?}");
    }
    // A simple query in between does not disturb the next unnamed Parse.
    let reply = a.query("SELECT 1").await;
    assert_eq!(first_values(&reply), vec!["1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_pools_with_unnamed_statements_each_get_their_own_results() {
    let server = TestServer::start(ServerConfig::default()).await;
    let plus = PgPoolOptions::new().max_connections(4).connect(&server.url()).await.unwrap();
    let times = PgPoolOptions::new().max_connections(4).connect(&server.url()).await.unwrap();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (pool, add) = if worker % 2 == 0 { (plus.clone(), true) } else { (times.clone(), false) };
        tasks.push(tokio::spawn(async move {
            for i in 0..200i32 {
                let sql = if add { "SELECT $1::int4 + 1" } else { "SELECT $1::int4 * 100" };
                let got: i32 = sqlx::query_scalar(sql).bind(i).persistent(false).fetch_one(&pool).await.unwrap();
                let expected = if add { i + 1 } else { i * 100 };
                assert_eq!(got, expected, "{sql} with {i}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unnamed_parse_leaves_the_next_batch_intact() {
    let server = TestServer::start(ServerConfig::default()).await;
    let mut a = Raw::connect(&server).await;
    let mut buf = BytesMut::new();
    parse("", "SELECT $1::int + 1", &mut buf);
    sync_only(&mut a, buf).await;
    // Replaces the unnamed statement, then fails; the close of the old one
    // must not eat the client's own answers.
    let mut buf = BytesMut::new();
    parse("", "SELECT $1::int + 2", &mut buf);
    frontend::flush(&mut buf);
    a.send(&buf).await;
    assert_eq!(a.read_message().await.unwrap().0, b'1');
    let mut buf = BytesMut::new();
    parse("", "SELEC nonsense", &mut buf);
    let reply = sync_only(&mut a, buf).await;
    assert_eq!(error_code(&reply).as_deref(), Some("42601"));
    let mut buf = BytesMut::new();
    parse("", "SELECT $1::int + 3", &mut buf);
    frontend::close(b'S', "", &mut buf).unwrap();
    parse("", "SELECT $1::int + 4", &mut buf);
    bind_int("", "", 1, &mut buf);
    frontend::execute("", 0, &mut buf).unwrap();
    let reply = sync_only(&mut a, buf).await;
    let tags: Vec<u8> = reply.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"1312DCZ", "{reply:?}");
    assert_eq!(first_values(&reply), vec!["5"]);
}

async fn prepared_count(server: &TestServer) -> i64 {
    let result = server.db.query("SELECT count(*) FROM pg_prepared_statements", &[]).await.unwrap();
    result.rows[0].get::<i64>(0)
}

async fn cursor_count(server: &TestServer) -> i64 {
    let result = server.db.query("SELECT count(*) FROM pg_cursors WHERE name <> ''", &[]).await.unwrap();
    result.rows[0].get::<i64>(0)
}

/// Waits until `probe` returns `expected` (the cleanup of a client runs after
/// its socket closed), failing after the deadline.
async fn await_count<F, Fut>(what: &str, expected: i64, probe: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        let now = probe().await;
        if now == expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {now}, expected {expected}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_leave_no_statements_or_cursors_behind() {
    let server = TestServer::start(ServerConfig::default()).await;
    let before = prepared_count(&server).await;
    for i in 0..1000 {
        let client = server.connect().await;
        let statement = client.prepare("SELECT $1::int").await.unwrap();
        let row = client.query_one(&statement, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
        if i % 10 == 0 {
            client
                .batch_execute(&format!(
                    "PREPARE mine_{i} AS SELECT 1; BEGIN; DECLARE held_{i} CURSOR WITH HOLD FOR SELECT 1; COMMIT"
                ))
                .await
                .unwrap();
            client.query_typed("SELECT $1::text", &[(&"unnamed", tokio_postgres::types::Type::TEXT)]).await.unwrap();
        }
        drop(client);
    }
    await_count("prepared statements", before, || prepared_count(&server)).await;
    await_count("cursors", 0, || cursor_count(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_level_names_work_next_to_protocol_names() {
    let server = TestServer::start(ServerConfig::default()).await;
    let mut raw = Raw::connect(&server).await;
    // SQL PREPARE and a protocol statement of the same name.
    let reply = raw.query("PREPARE same (int) AS SELECT $1 * 2").await;
    assert_eq!(error_code(&reply), None, "{reply:?}");
    let mut buf = BytesMut::new();
    parse("same", "SELECT $1::int * 3", &mut buf);
    bind_int("", "same", 5, &mut buf);
    frontend::execute("", 0, &mut buf).unwrap();
    let reply = sync_only(&mut raw, buf).await;
    assert_eq!(first_values(&reply), vec!["15"]);
    assert_eq!(first_values(&raw.query("EXECUTE same(5)").await), vec!["10"]);

    // psycopg's named cursor: DECLARE in SQL, Describe the portal through the
    // protocol, FETCH in SQL, CLOSE; next to a protocol portal of the same name.
    assert_eq!(error_code(&raw.query("BEGIN").await), None);
    let reply = raw.query("DECLARE \"big\" CURSOR FOR SELECT g, g * 2 AS twice FROM generate_series(1, 10) g").await;
    assert_eq!(error_code(&reply), None, "{reply:?}");
    let mut buf = BytesMut::new();
    frontend::describe(b'P', "big", &mut buf).unwrap();
    let reply = sync_only(&mut raw, buf).await;
    assert!(reply.iter().any(|m| m.0 == b'T'), "the cursor's RowDescription: {reply:?}");
    assert_eq!(first_values(&raw.query("FETCH FORWARD 3 FROM \"big\"").await), vec!["1", "2", "3"]);
    // A protocol portal named like the cursor.
    let mut buf = BytesMut::new();
    bind_int("big", "same", 7, &mut buf);
    frontend::execute("big", 0, &mut buf).unwrap();
    let reply = sync_only(&mut raw, buf).await;
    assert_eq!(first_values(&reply), vec!["21"]);
    assert_eq!(first_values(&raw.query("FETCH FORWARD 2 FROM big").await), vec!["4", "5"]);
    assert_eq!(error_code(&raw.query("CLOSE big; COMMIT").await), None);

    // DISCARD ALL of another connection leaves this one's statements alone.
    let other = server.connect().await;
    other.prepare("SELECT 1").await.unwrap();
    other.batch_execute("PREPARE theirs AS SELECT 2").await.unwrap();
    other.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(first_values(&raw.query("EXECUTE same(1)").await), vec!["2"]);
    let mut buf = BytesMut::new();
    bind_int("", "same", 1, &mut buf);
    frontend::execute("", 0, &mut buf).unwrap();
    assert_eq!(first_values(&sync_only(&mut raw, buf).await), vec!["3"]);
    let theirs = other.simple_query("EXECUTE theirs").await.unwrap_err();
    assert_eq!(theirs.code(), Some(&tokio_postgres::error::SqlState::UNDEFINED_PSTATEMENT));
}
