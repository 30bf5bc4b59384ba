//! `pglite-cache sync`, `status` and `decommission` through the real binary
//! against a real PostgreSQL.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pglite_cache::local_postgres::LocalPostgres;
use support::daemon::{BIN, connect, free_port, http_get, metric};
use support::replication::HASH;
use tokio_postgres::Client;

/// A `pglite-cache sync` child process.
struct Daemon {
    child: Child,
    socket_dir: PathBuf,
    port: u16,
    metrics: u16,
    log: PathBuf,
}

impl Daemon {
    fn spawn(remote: &LocalPostgres, data: &Path, extra: &[&str]) -> Daemon {
        let socket_dir = data.with_extension("sock");
        let (port, metrics) = (free_port(), free_port());
        let log = data.with_extension(format!("log{}", Instant::now().elapsed().as_nanos()));
        let stderr = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["sync", "--source", &remote.url("postgres"), "--data"])
            .arg(data)
            .arg("--socket-dir")
            .arg(&socket_dir)
            .args(["--port", &port.to_string(), "--metrics", &format!("127.0.0.1:{metrics}"), "--status-interval", "1"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Daemon { child, socket_dir, port, metrics, log }
    }

    fn conninfo(&self) -> String {
        format!("host={} port={} user=postgres dbname=postgres", self.socket_dir.display(), self.port)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects once the cache admits clients; returns whether a 57P03
    /// ("not consistent yet") refusal was seen first.
    async fn wait_ready(&mut self) -> (Client, bool) {
        let start = Instant::now();
        let mut refused = false;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited with {status}:\n{}", self.stderr());
            }
            match connect(&self.conninfo()).await {
                Ok(client) => return (client, refused),
                Err(e) => {
                    if e.code() == Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW) {
                        let message = e.as_db_error().unwrap().message().to_owned();
                        assert!(message.contains("initial copy in progress"), "{message}");
                        refused = true;
                    }
                }
            }
            assert!(start.elapsed() < Duration::from_secs(120), "not ready in time:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {signal}");
    }

    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < limit, "daemon did not exit:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(mut self) {
        self.signal("-KILL");
        self.wait(Duration::from_secs(10));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn table_hash(client: &Client, table: &str) -> (String, String) {
    client.batch_execute("SET TimeZone = 'UTC'; SET extra_float_digits = 1").await.unwrap();
    let row = client.query_one(&format!("{HASH}{table} t"), &[]).await.unwrap();
    (row.get(0), row.get(1))
}

/// Waits until the cache has everything the remote committed, then compares
/// every table in full.
async fn assert_in_sync(remote: &Client, cache: &Client, tables: &[&str]) {
    let start = Instant::now();
    loop {
        let mut same = true;
        for table in tables {
            let r = table_hash(remote, table).await;
            let c = table_hash(cache, table).await;
            if r != c {
                same = false;
                if start.elapsed() > Duration::from_secs(60) {
                    panic!("{table} differs: remote {r:?} cache {c:?}");
                }
            }
        }
        if same {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const SCHEMA: &str = "
    CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL);
    CREATE TABLE events (id bigserial PRIMARY KEY, account int NOT NULL, kind text, payload jsonb, at timestamptz DEFAULT now());
    INSERT INTO accounts SELECT g, 'owner ' || g, 1000 FROM generate_series(1, 1000) g;
    INSERT INTO events (account, kind, payload)
        SELECT 1 + g % 1000, 'seed', jsonb_build_object('n', g, 'q', 'it''s \"x\"') FROM generate_series(1, 300000) g;";

/// Transfers between accounts (the total stays constant) plus event rows.
async fn write_load(conninfo: String, stop: tokio::sync::watch::Receiver<bool>) -> u64 {
    let client = connect(&conninfo).await.unwrap();
    let mut n = 0_u64;
    while !*stop.borrow() {
        n += 1;
        let (a, b) = (1 + n % 1000, 1 + (n * 7) % 1000);
        client
            .batch_execute(&format!(
                "BEGIN; UPDATE accounts SET balance = balance - 1 WHERE id = {a};
                 UPDATE accounts SET balance = balance + 1 WHERE id = {b};
                 INSERT INTO events (account, kind, payload) VALUES ({a}, 'transfer', '{{\"to\": {b}}}');
                 {} COMMIT",
                if n.is_multiple_of(50) { format!("DELETE FROM events WHERE id = {};", n * 3) } else { String::new() }
            ))
            .await
            .unwrap();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_serves_survives_kill9_and_stops_cleanly() {
    let remote = LocalPostgres::start(&[]).expect("start PostgreSQL");
    let admin = connect(&remote.conninfo("postgres")).await.unwrap();
    admin.batch_execute(SCHEMA).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");

    let (stop_load, load_stop) = tokio::sync::watch::channel(false);
    // The workload runs on the remote for the whole test.
    let load = tokio::spawn(write_load(remote.conninfo("postgres"), load_stop));

    // kill -9 in the middle of the initial copy: the next start copies again.
    let daemon = Daemon::spawn(&remote, &data, &["--tables", "accounts,public.events"]);
    let start = Instant::now();
    while std::fs::read_to_string(data.join("pglite-cache-status.json")).map_or(true, |s| !s.contains("\"copying\"")) {
        assert!(start.elapsed() < Duration::from_secs(60), "never saw the copy:\n{}", daemon.stderr());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon.kill9();

    // Initial copy under concurrent writes; clients are refused until consistent.
    let mut daemon = Daemon::spawn(&remote, &data, &["--tables", "accounts,public.events"]);
    let (cache, refused) = daemon.wait_ready().await;
    assert!(refused, "clients are refused with 57P03 while the copy runs");

    // Reads work through the wire while it syncs; writes to replicated tables are refused.
    let total: i64 = cache.query_one("SELECT sum(balance)::int8 FROM accounts", &[]).await.unwrap().get(0);
    assert_eq!(total, 1_000_000, "a consistent snapshot: transfers never half-applied");
    let err = cache.batch_execute("UPDATE accounts SET balance = 0").await.unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION));
    // The daemon's engine has PostgreSQL's default buffer pool, not the library's 8MB.
    let buffers: String = cache.query_one("SHOW shared_buffers", &[]).await.unwrap().get(0);
    assert_eq!(buffers, "128MB");

    // psql reads the served cache too.
    let out = Command::new("psql")
        .args(["-h", &daemon.socket_dir.display().to_string(), "-p", &daemon.port.to_string(), "-U", "postgres"])
        .args(["-At", "-c", "SELECT count(*) FROM accounts"])
        .output()
        .expect("psql must be installed (apt-get install -y postgresql-client)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1000", "{}", String::from_utf8_lossy(&out.stderr));

    // kill -9 at a few moments while streaming, restart, resume.
    drop(cache);
    for round in 0..3 {
        // Killed after it applied some of the stream (more each round).
        wait_metric_at_least(&daemon, "pglite_cache_applied_transactions_total", 1.0 + 40.0 * round as f64).await;
        daemon.kill9();
        daemon = Daemon::spawn(&remote, &data, &["--tables", "accounts,public.events"]);
        let (cache, _) = daemon.wait_ready().await;
        let total: i64 = cache.query_one("SELECT sum(balance)::int8 FROM accounts", &[]).await.unwrap().get(0);
        assert_eq!(total, 1_000_000, "round {round}: no half-applied transaction after kill -9");
    }

    let _ = stop_load.send(true);
    let written = load.await.unwrap();
    assert!(written > 50, "the workload ran ({written} transactions)");
    let (cache, _) = daemon.wait_ready().await;
    // A known number of transactions, all after this process started.
    const LAST: u64 = 25;
    for i in 0..LAST {
        admin.batch_execute(&format!("UPDATE accounts SET owner = 'last {i}' WHERE id = {}", 1 + i)).await.unwrap();
    }
    let remote_lsn: String = admin.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
    let remote_lsn = remote_lsn.parse::<pglite_cache::replication::Lsn>().unwrap().0 as f64;
    assert_in_sync(&admin, &cache, &["accounts", "events"]).await;

    // Metrics.
    let body = wait_metric_at_least(&daemon, "pglite_cache_applied_lsn", remote_lsn).await;
    assert!(body.contains("pglite_cache_phase{phase=\"streaming\"} 1"), "{body}");
    let applied = metric(&body, "pglite_cache_applied_transactions_total");
    assert!(applied >= LAST as f64, "applied {applied} of the {LAST} transactions committed since start");
    // Caught up: what is left is at most background WAL, not the workload's.
    let lag = metric(&body, "pglite_cache_lag_bytes");
    assert!(lag < (1 << 20) as f64, "lag {lag} bytes after catching up");
    let lag = metric(&body, "pglite_cache_lag_seconds");
    assert!(lag > 0.0 && lag < 60.0, "commit-to-apply lag of the last transaction: {lag} s");
    // The lag histogram counts every applied transaction.
    let observed = metric(&body, "pglite_cache_commit_lag_seconds_count");
    assert_eq!(observed, applied, "one lag observation per applied transaction");
    assert_eq!(metric(&body, "pglite_cache_commit_lag_seconds_bucket{le=\"+Inf\"}"), observed);
    assert!(metric(&body, "pglite_cache_commit_lag_seconds_sum") > 0.0);
    let p99 = metric(&body, "pglite_cache_commit_lag_recent_seconds{quantile=\"0.99\"}");
    assert!(p99 > 0.0 && p99 <= 60.0, "recent p99 {p99}");
    // What the slot keeps on the remote: reported, and within the WAL written.
    let body = wait_metric_at_least(&daemon, "pglite_cache_slot_retained_wal_bytes", 0.0).await;
    let retained = metric(&body, "pglite_cache_slot_retained_wal_bytes");
    assert!(retained <= remote_lsn, "retained {retained} bytes of a {remote_lsn}-byte WAL");
    assert!(body.contains("pglite_cache_table_rows_copied{table=\"public.accounts\"}"), "{body}");

    // Status, both ways, while running.
    let by_socket =
        status(&["--socket-dir", &daemon.socket_dir.display().to_string(), "--port", &daemon.port.to_string()]);
    assert_eq!(by_socket["phase"], "streaming");
    assert_eq!(by_socket["tables"].as_array().unwrap().len(), 2);
    let by_dir = status(&["--data", &data.display().to_string()]);
    assert_eq!(by_dir["running"], true);
    let p50 = by_dir["lag_recent_p50_seconds"].as_f64().expect("a recent lag after applying transactions");
    assert!(p50 > 0.0 && p50 <= 60.0, "{p50}");
    assert!(by_dir["slot_retained_wal_bytes"].as_u64().is_some(), "{by_dir}");
    assert_eq!(by_dir["slot"], "pglite_cache");

    // SIGTERM: graceful, exit 0.
    drop(cache);
    daemon.signal("-TERM");
    let code = daemon.wait(Duration::from_secs(30));
    assert!(code.success(), "SIGTERM exits 0: {code}\n{}", daemon.stderr());
    let stopped = status(&["--data", &data.display().to_string()]);
    assert_eq!(stopped["running"], false);
    assert_eq!(stopped["phase"], "streaming");
    assert!(stopped["applied_lsn"].as_str().unwrap().contains('/'));

    // Text status works too.
    let out = Command::new(BIN).args(["status", "--data"]).arg(&data).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("daemon:       not running"));

    // Decommission leaves no slot or owned publication behind.
    let out = Command::new(BIN)
        .args(["decommission", "--source", &remote.url("postgres"), "--data"])
        .arg(&data)
        .arg("--yes")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let slots: i64 = admin.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await.unwrap().get(0);
    let pubs: i64 = admin.query_one("SELECT count(*) FROM pg_publication", &[]).await.unwrap().get(0);
    assert_eq!((slots, pubs), (0, 0));
}

fn status(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN).arg("status").args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "status {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls the metrics page until `name` reaches `value`; returns the page.
async fn wait_metric_at_least(daemon: &Daemon, name: &str, value: f64) -> String {
    let start = Instant::now();
    loop {
        if let Ok(body) = http_get(daemon.metrics, "/metrics").await
            && body.lines().any(|l| l.starts_with(&format!("{name} ")))
            && metric(&body, name) >= value
        {
            return body;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{name} never reached {value}:\n{}", daemon.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn run_sync(args: &[&str], wait: Duration) -> (Option<i32>, String) {
    let mut child =
        Command::new(BIN).arg("sync").args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while start.elapsed() < wait {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (None, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn bad_configurations_get_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c").display().to_string();

    // Bad flags.
    let (code, err) = run_sync(&["--source", "postgres://x/db", "--data", &data], Duration::from_secs(10));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("one of --publication NAME, --tables T1,T2 or --schema NAME"), "{err}");
    let (code, _) = run_sync(&["--data", &data, "--tables", "t"], Duration::from_secs(10));
    assert_eq!(code, Some(2));
    let (code, err) = run_sync(
        &["--source", "postgres://x/db?sslmode=bogus", "--data", &data, "--tables", "t"],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(2), "{err}");

    // A remote without wal_level = logical.
    let replica_only = LocalPostgres::start(&[("wal_level", "replica")]).unwrap();
    let (code, err) = run_sync(
        &["--source", &replica_only.url("postgres"), "--data", &data, "--tables", "t"],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("wal_level = logical"), "{err}");
    // The cache opens while the remote is checked; a refused start leaves
    // no data directory behind.
    assert!(!std::path::Path::new(&data).exists(), "a refused start left {data}");
    drop(replica_only);

    let remote = LocalPostgres::start(&[]).unwrap();
    let admin = connect(&remote.conninfo("postgres")).await.unwrap();
    admin.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE ROLE plain LOGIN").await.unwrap();
    // Missing REPLICATION privilege.
    let url = format!("postgres://plain@127.0.0.1:{}/postgres", remote.port());
    let (code, err) = run_sync(&["--source", &url, "--data", &data, "--tables", "t"], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ALTER ROLE plain REPLICATION"), "{err}");
    // A publication that does not exist; a table that does not exist.
    let (code, err) = run_sync(
        &["--source", &remote.url("postgres"), "--data", &data, "--publication", "nope"],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("publication \"nope\" does not exist"), "{err}");
    let (code, err) = run_sync(
        &["--source", &remote.url("postgres"), "--data", &data, "--tables", "missing"],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("table missing does not exist"), "{err}");
    // Non-loopback listening without --allow-remote.
    let (code, err) = run_sync(
        &["--source", &remote.url("postgres"), "--data", &data, "--tables", "t", "--listen", "0.0.0.0:0"],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // An engine setting the engine refuses: its own message, and no panic.
    let (code, err) = run_sync(
        &["--source", &remote.url("postgres"), "--data", &data, "--tables", "t", "--set", "shared_buffers=lots"],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("opening the cache") && err.contains("invalid value for parameter"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // An unreachable remote is retried, not fatal (and logs can be JSON).
    let port = free_port();
    let (code, err) = run_sync(
        &[
            "--source",
            &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            "--data",
            &data,
            "--tables",
            "t",
            "--log-format",
            "json",
        ],
        Duration::from_secs(3),
    );
    assert_eq!(code, None, "still running and retrying: {err}");
    let line = err.lines().find(|l| l.contains("remote unreachable; retrying")).unwrap_or_else(|| panic!("{err}"));
    let json: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(json["level"], "WARN");
}
