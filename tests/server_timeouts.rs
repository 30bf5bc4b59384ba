//! Nobody waits for ever: a client idle in a transaction, one queued too
//! long, and one that stops reading while it holds the engine.

mod common;

use std::time::{Duration, Instant};

use common::{PATIENCE, Raw, TestServer, error_code};
use pglite_cache::server::ServerConfig;
use tokio::time::timeout;

const SHORT: Duration = Duration::from_millis(300);

fn no_limits() -> ServerConfig {
    ServerConfig::default()
        .with_idle_in_transaction_timeout(None)
        .with_queue_wait_timeout(None)
        .with_write_timeout(None)
}

async fn count(server: &TestServer, table: &str) -> i64 {
    let result = server.db.query(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap();
    result.rows[0].get::<i64>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_idle_in_a_transaction_is_disconnected_and_rolled_back() {
    let server = TestServer::start(no_limits().with_idle_in_transaction_timeout(Some(SHORT))).await;
    server.db.exec("CREATE TABLE t (id int)").await.unwrap();
    let mut idler = Raw::connect(&server).await;
    assert_eq!(error_code(&idler.query("BEGIN; INSERT INTO t VALUES (1)").await), None);

    // Another client gets through once the idler is cut off.
    let other = server.connect().await;
    let started = Instant::now();
    let n: i32 = timeout(PATIENCE, other.query_one("SELECT 7", &[])).await.unwrap().unwrap().get(0);
    assert_eq!(n, 7);
    assert!(started.elapsed() < PATIENCE);

    let goodbye = idler.read_to_eof().await;
    assert_eq!(error_code(&goodbye).as_deref(), Some("25P03"), "{goodbye:?}");
    assert_eq!(count(&server, "t").await, 0, "its transaction was rolled back");

    // A client that keeps talking inside its transaction is not cut off.
    let talker = server.connect().await;
    talker.batch_execute("BEGIN").await.unwrap();
    for i in 0..5 {
        // The client's own pace (not a wait for anything): it speaks well
        // within the limit each time, for longer than the limit in total.
        tokio::time::sleep(SHORT / 3).await;
        talker.execute("INSERT INTO t VALUES ($1)", &[&i]).await.unwrap();
    }
    talker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count(&server, "t").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_queued_too_long_gets_a_clear_error_and_the_connection_goes_on() {
    let server = TestServer::start(no_limits().with_queue_wait_timeout(Some(SHORT))).await;
    let holder = server.connect().await;
    // A transaction holds the engine from its first statement (a plain
    // BEGIN alone does not take it).
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let waiter = server.connect().await;
    let err = timeout(PATIENCE, waiter.query_one("SELECT 1", &[])).await.unwrap().unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code(), &tokio_postgres::error::SqlState::QUERY_CANCELED);
    assert!(db.message().contains("queue_wait_timeout"), "{}", db.message());
    // Pipelined statements each get the error.
    let (a, b) = tokio::join!(waiter.query_one("SELECT 1", &[]), waiter.query_one("SELECT 2", &[]));
    assert!(a.is_err() && b.is_err());

    // Inside a transaction begun with a plain BEGIN (answered without the
    // engine), the statement that timed out fails the transaction, as any
    // error inside a transaction does.
    waiter.batch_execute("BEGIN").await.unwrap();
    let err = timeout(PATIENCE, waiter.query_one("SELECT 1", &[])).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED));
    holder.batch_execute("COMMIT").await.unwrap();
    let err = waiter.batch_execute("SELECT 2").await.unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION));
    waiter.batch_execute("ROLLBACK").await.unwrap();

    let n: i32 = waiter.query_one("SELECT 3", &[]).await.unwrap().get(0);
    assert_eq!(n, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_while_holding_the_engine_is_cut_off() {
    let server = TestServer::start(no_limits().with_write_timeout(Some(SHORT))).await;
    server.db.exec("CREATE TABLE t (id int)").await.unwrap();
    let mut stalled = Raw::connect(&server).await;
    // Inside a transaction, a reply far bigger than the socket buffers, and
    // the client reads none of it.
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query(
        "BEGIN; INSERT INTO t VALUES (1); SELECT repeat('x', 1000000) FROM generate_series(1, 64)",
        &mut buf,
    )
    .unwrap();
    stalled.send(&buf).await;

    let other = server.connect().await;
    let n: i32 = timeout(PATIENCE, other.query_one("SELECT 7", &[])).await.unwrap().unwrap().get(0);
    assert_eq!(n, 7);
    assert_eq!(count(&server, "t").await, 0, "the stalled client's transaction was rolled back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_api_and_the_apply_get_the_engine_from_an_idle_transaction() {
    let server = TestServer::start(no_limits().with_idle_in_transaction_timeout(Some(SHORT))).await;
    let idler = server.connect().await;
    idler.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // The replication apply takes the engine like this.
    let tx = timeout(PATIENCE, server.db.begin()).await.expect("the apply gets the engine").unwrap();
    tx.exec("SELECT 1").await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_client_idle_in_a_transaction() {
    let mut server = TestServer::start(ServerConfig::default()).await;
    server.db.exec("CREATE TABLE t (id int)").await.unwrap();
    let idler = server.connect().await;
    idler.batch_execute("BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    let started = Instant::now();
    timeout(PATIENCE, server.begin_shutdown()).await.unwrap().unwrap().unwrap();
    assert!(started.elapsed() < ServerConfig::default().shutdown_timeout, "shutdown took {:?}", started.elapsed());
    assert!(idler.batch_execute("COMMIT").await.is_err());
    assert_eq!(count(&server, "t").await, 0);
}
