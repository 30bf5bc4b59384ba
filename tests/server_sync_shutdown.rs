//! `pglite-cache sync` stops promptly on SIGTERM even while a client of its
//! server idles inside a transaction (the replication apply needs the engine
//! to finish).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pglite_cache::local_postgres::LocalPostgres;
use tokio_postgres::NoTls;

const BIN: &str = env!("CARGO_BIN_EXE_pglite-cache");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_prompt_with_a_client_idle_in_a_transaction() {
    let remote = LocalPostgres::start(&[]).expect("a local PostgreSQL (install postgresql)");
    let (source, connection) = tokio_postgres::connect(&remote.conninfo("postgres"), NoTls).await.unwrap();
    tokio::spawn(connection);
    source.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let socket_dir = dir.path().join("sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(BIN)
        .args(["sync", "--source", &remote.url("postgres"), "--tables", "t", "--data"])
        .arg(dir.path().join("cache"))
        .arg("--socket-dir")
        .arg(&socket_dir)
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
    let conninfo = format!("host={} port={port} user=postgres dbname=postgres", socket_dir.display());

    // Wait until the cache serves the copied row.
    let started = Instant::now();
    let client = loop {
        assert!(child.try_wait().unwrap().is_none(), "sync exited:\n{}", stderr());
        if let Ok((client, connection)) = tokio_postgres::connect(&conninfo, NoTls).await {
            tokio::spawn(connection);
            if client.query_one("SELECT count(*) FROM t", &[]).await.is_ok_and(|r| r.get::<_, i64>(0) == 1) {
                break client;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "cache not ready:\n{}", stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // A client idles inside a transaction while a change arrives, then SIGTERM.
    client.batch_execute("BEGIN; SELECT * FROM t").await.unwrap();
    source.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    let stopping = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(stopping.elapsed() < Duration::from_secs(20), "sync did not stop:\n{}", stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "sync exited with {status}:\n{}", stderr());
    assert!(stopping.elapsed() < Duration::from_secs(5), "SIGTERM took {:?}:\n{}", stopping.elapsed(), stderr());
}
