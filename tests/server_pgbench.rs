//! pgbench against the wire server: several connections driven from one
//! thread must not deadlock, and TPC-B's sums must add up.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{SOCKET_PORT, TestServer};
use pglite_cache::server::ServerConfig;

/// The pgbench binary: on PATH or in a Debian PostgreSQL install.
fn pgbench() -> String {
    let candidates = std::iter::once("pgbench".to_owned()).chain(
        std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path().join("bin/pgbench").display().to_string()),
    );
    for candidate in candidates {
        if Command::new(&candidate).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return candidate;
        }
    }
    panic!(
        "the pgbench binary is required for this test: install postgresql-contrib or postgresql (e.g. `apt-get install postgresql`)"
    )
}

/// Runs pgbench on the server's Unix socket; fails the test if it does not
/// finish within `limit` (a deadlock) or fails.
async fn run_pgbench(server: &TestServer, args: &[&str], limit: Duration) -> String {
    let mut command = tokio::process::Command::new(pgbench());
    command
        .args(["-h", server.socket_dir.to_str().unwrap(), "-p", &SOCKET_PORT.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("pgbench {args:?} did not finish within {limit:?}: deadlocked?"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "pgbench {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

async fn sum(server: &TestServer, sql: &str) -> i64 {
    server.db.query(sql, &[]).await.unwrap().rows[0].get::<Option<i64>>(0).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_8_clients_on_2_threads_completes_with_correct_sums() {
    let server = TestServer::start(ServerConfig::default()).await;
    run_pgbench(&server, &["-i", "-s", "1", "-q"], Duration::from_secs(120)).await;
    for mode in ["prepared", "extended", "simple"] {
        let out =
            run_pgbench(&server, &["-M", mode, "-c", "8", "-j", "2", "-t", "100", "-n"], Duration::from_secs(120))
                .await;
        assert!(out.contains("number of transactions actually processed: 800/800"), "{mode}:\n{out}");
    }
    // TPC-B adds the same delta to an account, a teller and a branch, and
    // logs it in history: all four sums agree.
    let accounts = sum(&server, "SELECT sum(abalance)::int8 FROM pgbench_accounts").await;
    let tellers = sum(&server, "SELECT sum(tbalance)::int8 FROM pgbench_tellers").await;
    let branches = sum(&server, "SELECT sum(bbalance)::int8 FROM pgbench_branches").await;
    let history = sum(&server, "SELECT sum(delta)::int8 FROM pgbench_history").await;
    let count = sum(&server, "SELECT count(*) FROM pgbench_history").await;
    assert_eq!(count, 2400);
    assert_eq!((accounts, tellers, branches), (history, history, history));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_parse_beside_an_open_transaction_does_not_touch_it() {
    let server = TestServer::start(ServerConfig::default()).await;
    let holder = server.connect().await;
    holder.batch_execute("CREATE TABLE t (id int); BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    // Another client prepares (a Parse outside any transaction): it does not
    // wait for the holder, and its error does not abort the holder's transaction.
    let other = server.connect().await;
    let limit = Duration::from_secs(10);
    let good = tokio::time::timeout(limit, other.prepare("SELECT $1::int + 1")).await.expect("no wait").unwrap();
    let bad = tokio::time::timeout(limit, other.prepare("SELEC oops")).await.expect("no wait").unwrap_err();
    assert_eq!(bad.code(), Some(&tokio_postgres::error::SqlState::SYNTAX_ERROR));
    let missing = tokio::time::timeout(limit, other.prepare("SELECT * FROM nowhere")).await.expect("no wait");
    assert!(missing.is_err());
    holder.batch_execute("INSERT INTO t VALUES (2); COMMIT").await.unwrap();
    let n: i64 = holder.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 2, "the holder's transaction committed whole");
    let row = other.query_one(&good, &[&41]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
}
