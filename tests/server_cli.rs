//! `pglite-cache serve` as a user runs it: TCP needs a password by default,
//! and SIGTERM does not wait for a client idle in a transaction.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::daemon::{BIN, wait_vacuumed_and_analyzed};

const PATIENCE: Duration = Duration::from_secs(30);

struct Serve {
    child: Child,
    port: u16,
    /// Lines the server printed on stdout before it listened.
    banner: Vec<String>,
    _stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Serve {
    /// A persistent instance in `dir` whose maintenance checks every second.
    fn maintained(dir: &std::path::Path, extra: &[&str]) -> Serve {
        let dir = dir.to_str().unwrap();
        let mut args = vec!["--unsafe-trust-tcp", "--data", dir, "--maintenance-interval", "1"];
        args.extend_from_slice(extra);
        Serve::start(&args)
    }

    fn start(args: &[&str]) -> Serve {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut banner = Vec::new();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // `bind` prints the listeners, then where the password is, once listening.
        let expect_password = !args.contains(&"--unsafe-trust-tcp");
        while let Some(Ok(line)) = lines.next() {
            banner.push(line);
            let listening = banner.iter().any(|l| l.starts_with("listening on"));
            let password = banner.iter().any(|l| l.contains("password"));
            if listening && (password || !expect_password) {
                break;
            }
        }
        assert!(banner.iter().any(|l| l.starts_with("listening on")), "serve did not start: {banner:?}");
        Serve { child, port, banner, _stdout: lines }
    }

    fn config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(self.port).user("postgres").dbname("postgres");
        config
    }

    fn terminate(&mut self) -> Duration {
        let started = Instant::now();
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "serve exited with {status}");
                return started.elapsed();
            }
            assert!(started.elapsed() < PATIENCE, "serve did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_the_generated_password_and_sigterm_does_not_wait_for_idle_transactions() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("db");
    let mut serve = Serve::start(&["--data", data_dir.to_str().unwrap()]);
    let password_file = data_dir.join("wire-password");
    assert!(
        serve.banner.iter().any(|l| l.contains(password_file.to_str().unwrap())),
        "says where the password is: {:?}",
        serve.banner
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&password_file).unwrap().mode() & 0o777, 0o600);

    // No password: refused.
    let Err(err) = connect(&serve.config()).await else { panic!("TCP without a password is refused") };
    assert!(format!("{err:?}").contains("password"), "{err:?}");
    // The generated one: admitted.
    let password = std::fs::read_to_string(&password_file).unwrap().trim().to_owned();
    let mut config = serve.config();
    config.password(password.as_str());
    let client = connect(&config).await.unwrap();
    client.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    // Idle inside a transaction while the server is told to stop.
    client.batch_execute("BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    let took = tokio::task::spawn_blocking(move || {
        let took = serve.terminate();
        (took, serve)
    })
    .await
    .unwrap();
    assert!(took.0 < Duration::from_secs(5), "SIGTERM took {:?}", took.0);
    drop(took.1);

    // The same password again on the next start; the transaction was rolled back.
    let serve = Serve::start(&["--data", data_dir.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&password_file).unwrap().trim(), password);
    let mut config = serve.config();
    config.password(password.as_str());
    let client = connect(&config).await.unwrap();
    let n: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_trust_tcp_is_the_explicit_opt_out() {
    let serve = Serve::start(&["--unsafe-trust-tcp"]);
    let client = connect(&serve.config()).await.unwrap();
    let n: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
}

/// The engine has no autovacuum; `serve` does its job: a table written by
/// clients is vacuumed and analyzed without anyone asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_tables_are_vacuumed_and_analyzed() {
    let data_dir = tempfile::tempdir().unwrap();
    let serve = Serve::maintained(data_dir.path(), &[]);
    let client = connect(&serve.config()).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT g, g FROM generate_series(1, 10000) g; \
             UPDATE t SET v = v + 1; DELETE FROM t WHERE id % 2 = 0",
        )
        .await
        .unwrap();
    let written = std::time::SystemTime::now();
    let dead = wait_vacuumed_and_analyzed(&client, "t", written, PATIENCE * 2).await;
    assert!(dead < 500, "{dead} dead rows left after the vacuum");
}

/// The engine is single-user PostgreSQL: it never checkpoints by itself
/// (a checkpoint is requested only under a postmaster), so its WAL grew
/// for as long as it ran (measured: 130 MB since the last checkpoint with
/// `max_wal_size = 32MB`), and a crash replayed all of it. Maintenance
/// checkpoints once the WAL since the last one passes half of
/// `max_wal_size`, as PostgreSQL's checkpointer would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_checkpoints_so_its_wal_stays_bounded() {
    let data_dir = tempfile::tempdir().unwrap();
    let serve = Serve::maintained(data_dir.path(), &["--set", "max_wal_size=32MB"]);
    let client = connect(&serve.config()).await.unwrap();
    let since_checkpoint = || async {
        let row = client
            .query_one("SELECT (pg_current_wal_insert_lsn() - redo_lsn)::int8 FROM pg_control_checkpoint()", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    let wal_position = || async {
        let row = client.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8", &[]).await.unwrap();
        row.get::<_, i64>(0)
    };
    client.batch_execute("CREATE TABLE w (id int PRIMARY KEY, v text)").await.unwrap();
    let before = wal_position().await;
    for part in 0..4 {
        client
            .batch_execute(&format!(
                "INSERT INTO w SELECT g, repeat('x', 100) FROM generate_series({} + 1, {} + 100000) g",
                part * 100_000,
                part * 100_000
            ))
            .await
            .unwrap();
    }
    // Measured from positions: maintenance may checkpoint during the load.
    let written = wal_position().await - before;
    assert!(written > 32 << 20, "the load wrote only {written} bytes of WAL");
    let start = Instant::now();
    loop {
        let now = since_checkpoint().await;
        if now < 16 << 20 {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "still {now} bytes of WAL since the last checkpoint");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_settings_are_given_like_postgres_dash_c() {
    let serve = Serve::start(&["--unsafe-trust-tcp", "--set", "work_mem=7MB", "--set", "shared_buffers=16MB"]);
    let client = connect(&serve.config()).await.unwrap();
    for (name, value) in [("work_mem", "7MB"), ("shared_buffers", "16MB")] {
        let shown: String = client.query_one(&format!("SHOW {name}"), &[]).await.unwrap().get(0);
        assert_eq!(shown, value, "{name}");
    }
    // A value the engine refuses stops the start with its own words.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--unsafe-trust-tcp", "--set", "shared_buffers=lots"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("invalid value for parameter \"shared_buffers\""), "{err}");
}

/// `serve --data` with a table `t` of one row and `safe_div`, a function
/// whose PL/pgSQL exception block this engine cannot run (see
/// `an_error_inside_a_plpgsql_exception_block_restarts_the_engine` in
/// tests/instance_lifecycle.rs).
async fn serve_with_safe_div() -> (Serve, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("db");
    let serve = Serve::start(&["--unsafe-trust-tcp", "--data", data_dir.to_str().unwrap()]);
    let setup = connect(&serve.config()).await.unwrap();
    setup
        .batch_execute(
            "CREATE TABLE t (id int); INSERT INTO t VALUES (1); \
             CREATE FUNCTION safe_div(a int, b int) RETURNS int LANGUAGE plpgsql AS \
             $$ BEGIN RETURN a / b; EXCEPTION WHEN division_by_zero THEN RETURN NULL; END $$",
        )
        .await
        .unwrap();
    drop(setup);
    (serve, data)
}

/// When the engine restarts after a crash, every client connected before
/// loses what its session held on the engine (prepared statements, cursors,
/// temporary tables, listens). It used to stay connected and find its
/// prepared statements gone ("prepared statement ... does not exist"), for
/// as long as the driver cached them. Now each is ended as PostgreSQL ends
/// every session when a backend crashes (FATAL 57P02), so a pool connects
/// again; idle ones at once, without sending anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connected_before_an_engine_restart_are_ended_like_postgres_does() {
    let (serve, _data) = serve_with_safe_div().await;
    // A client with a prepared statement, and its connection's outcome.
    let (prepared, connection) = serve.config().connect(tokio_postgres::NoTls).await.unwrap();
    let ended = tokio::spawn(connection);
    let statement = prepared.prepare("SELECT count(*) FROM t").await.unwrap();
    assert_eq!(prepared.query_one(&statement, &[]).await.unwrap().get::<_, i64>(0), 1);

    // Another client's uncatchable error: the engine restarts at its ROLLBACK.
    let a = connect(&serve.config()).await.unwrap();
    a.query_one("SELECT safe_div(1, 0)", &[]).await.unwrap_err();
    a.batch_execute("ROLLBACK").await.unwrap_err();

    let outcome = match tokio::time::timeout(PATIENCE, ended).await {
        Ok(outcome) => outcome.unwrap(),
        Err(_) => panic!(
            "a client connected before the engine restarted stays connected, and its statement: {:?}",
            prepared.query_one(&statement, &[]).await.map(|row| row.get::<_, i64>(0))
        ),
    };
    let err = outcome.expect_err("ended by the server");
    assert_eq!(err.code().map(|c| c.code()), Some("57P02"), "{err}");
    assert!(prepared.is_closed());
    // A new connection has its own statements again.
    let again = connect(&serve.config()).await.unwrap();
    let statement = again.prepare("SELECT count(*) FROM t").await.unwrap();
    assert_eq!(again.query_one(&statement, &[]).await.unwrap().get::<_, i64>(0), 1);
}

/// A client's error inside a PL/pgSQL exception block (which this engine
/// cannot catch: see `an_error_inside_a_plpgsql_exception_block_restarts_the_engine`
/// in tests/instance_lifecycle.rs) used to leave the one backend unable to
/// end any transaction: every client got "current transaction is aborted"
/// for ever. `serve --data` now restarts the engine when that client's
/// transaction ends (its ROLLBACK, or its disconnect), and the other
/// clients go on with the committed data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncatchable_plpgsql_error_costs_one_engine_restart_not_the_server() {
    let (serve, _data) = serve_with_safe_div().await;
    let sqlstate = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_owned());

    // The client ends its transaction itself.
    let a = connect(&serve.config()).await.unwrap();
    let err = a.query_one("SELECT safe_div(1, 0)", &[]).await.unwrap_err();
    assert_eq!(sqlstate(err).as_deref(), Some("22012"));
    a.batch_execute("ROLLBACK").await.unwrap_err();
    let b = connect(&serve.config()).await.unwrap();
    let n: i64 =
        tokio::time::timeout(PATIENCE, b.query_one("SELECT count(*) FROM t", &[])).await.unwrap().unwrap().get(0);
    assert_eq!(n, 1);

    // The client goes away without ending it.
    let c = connect(&serve.config()).await.unwrap();
    c.query_one("SELECT safe_div(1, 0)", &[]).await.unwrap_err();
    drop(c);
    let d = connect(&serve.config()).await.unwrap();
    let n: i64 =
        tokio::time::timeout(PATIENCE, d.query_one("SELECT count(*) FROM t", &[])).await.unwrap().unwrap().get(0);
    assert_eq!(n, 1);
    let v: i32 = d.query_one("SELECT safe_div(6, 3)", &[]).await.unwrap().get(0);
    assert_eq!(v, 2);
}
