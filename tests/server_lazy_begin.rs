//! A plain `BEGIN` is answered by the server and reaches the engine with
//! the transaction's first statement: the engine is not held while the
//! client reads the answer and sends that statement, and the transaction
//! behaves as PostgreSQL's does.

mod common;

use common::{PATIENCE, TestServer};
use pglite_cache::server::ServerConfig;
use tokio::time::timeout;
use tokio_postgres::error::SqlState;

fn no_limits() -> ServerConfig {
    ServerConfig::default()
        .with_idle_in_transaction_timeout(None)
        .with_queue_wait_timeout(None)
        .with_write_timeout(None)
}

async fn count(server: &TestServer) -> i64 {
    server.db.query("SELECT count(*) FROM t", &[]).await.unwrap().rows[0].get::<i64>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_begin_holds_nothing_until_the_first_statement() {
    let server = TestServer::start(no_limits()).await;
    server.db.exec("CREATE TABLE t (id int)").await.unwrap();
    let client = server.connect().await;
    // Simple protocol (tokio-postgres's `transaction()` sends `BEGIN` so).
    client.batch_execute("BEGIN").await.unwrap();
    // Without any limit, the others would wait for ever if it held the engine.
    let other = server.connect().await;
    let n: i32 = timeout(PATIENCE, other.query_one("SELECT 7", &[])).await.unwrap().unwrap().get(0);
    assert_eq!(n, 7);
    timeout(PATIENCE, server.db.exec("SELECT 1")).await.expect("the Rust API is not blocked").unwrap();

    // The transaction is real once its statements run: atomic, and rolled back.
    client.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    let seen: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(seen, 1, "the transaction sees its own insert");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&server).await, 0);

    // Extended protocol: a prepared `BEGIN` (Bind, Execute, Sync), as
    // `pgbench -M prepared` and drivers with statement caches send it.
    let begin = client.prepare("BEGIN").await.unwrap();
    let start = client.prepare("START TRANSACTION").await.unwrap();
    for statement in [&begin, &start] {
        client.execute(statement, &[]).await.unwrap();
        timeout(PATIENCE, other.query_one("SELECT 1", &[])).await.unwrap().unwrap();
        client.execute("INSERT INTO t VALUES (2)", &[]).await.unwrap();
        client.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(count(&server).await, 2);

    // A transaction with nothing in it.
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    // Options are not deferred: they take effect (and could fail) at BEGIN.
    client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.unwrap();
    let level: String = client.query_one("SHOW transaction_isolation", &[]).await.unwrap().get(0);
    assert_eq!(level, "repeatable read");
    client.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_after_a_lazy_begin_fail_the_transaction_as_in_postgresql() {
    let server = TestServer::start(no_limits()).await;
    server.db.exec("CREATE TABLE t (id int)").await.unwrap();
    let client = server.connect().await;

    // An error in the first statement.
    client.batch_execute("BEGIN").await.unwrap();
    let err = client.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let err = client.batch_execute("INSERT INTO t VALUES (1)").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    client.batch_execute("ROLLBACK").await.unwrap();

    // A failed Parse, which runs beside others' transactions (see below).
    client.batch_execute("BEGIN").await.unwrap();
    let err = client.prepare("SELEC 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR));
    let err = client.batch_execute("INSERT INTO t VALUES (1)").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    // COMMIT of a failed transaction rolls back.
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count(&server).await, 0);
    let n: i32 = client.query_one("SELECT 3", &[]).await.unwrap().get(0);
    assert_eq!(n, 3);
}

/// pgbench `-M prepared -j 2` in miniature: one task drives two
/// connections; while its connection A holds the engine in a transaction,
/// connection B answers `BEGIN` and prepares its next statement, which must
/// not wait for A (the task would never get back to A).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_after_a_lazy_begin_does_not_wait_for_another_transaction() {
    let server = TestServer::start(no_limits()).await;
    server.db.exec("CREATE TABLE t (id int)").await.unwrap();
    let a = server.connect().await;
    let b = server.connect().await;
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    let insert = timeout(PATIENCE, b.prepare("INSERT INTO t VALUES ($1)")).await.expect("no deadlock").unwrap();
    let b_insert = tokio::spawn(async move {
        b.execute(&insert, &[&2i32]).await.unwrap();
        b.batch_execute("COMMIT").await.unwrap();
    });
    a.batch_execute("ROLLBACK").await.unwrap();
    timeout(PATIENCE, b_insert).await.unwrap().unwrap();
    let rows = server.db.query("SELECT id FROM t", &[]).await.unwrap().rows;
    assert_eq!(rows.iter().map(|r| r.get::<i32>(0)).collect::<Vec<_>>(), vec![2]);
}
