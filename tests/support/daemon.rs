//! A `pglite-cache` child process for daemon tests (optionally run under a
//! wrapper such as strace), and what it publishes: its status file.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

pub const BIN: &str = env!("CARGO_BIN_EXE_pglite-cache");

/// A plain client connection (its connection task spawned).
pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// `GET path` from `127.0.0.1:port` (the daemon's metrics endpoint); the body.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    Ok(out.split("\r\n\r\n").nth(1).unwrap().to_owned())
}

/// The value of the unlabelled series `name` on a Prometheus page.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing in:\n{body}"))
        .parse()
        .unwrap()
}

/// Waits until `table` in `cache` was vacuumed and analyzed after `since`
/// (the engine has no autovacuum: the daemon's maintenance runs them);
/// returns the dead rows the vacuum left.
pub async fn wait_vacuumed_and_analyzed(
    cache: &tokio_postgres::Client,
    table: &str,
    since: SystemTime,
    limit: Duration,
) -> i64 {
    let start = Instant::now();
    loop {
        let row = cache
            .query_one(
                "SELECT last_vacuum, last_analyze, n_dead_tup FROM pg_stat_user_tables WHERE relname = $1",
                &[&table],
            )
            .await
            .unwrap();
        let (vacuumed, analyzed, dead): (Option<SystemTime>, Option<SystemTime>, i64) =
            (row.get(0), row.get(1), row.get(2));
        if vacuumed.is_some_and(|t| t > since) && analyzed.is_some_and(|t| t > since) {
            return dead;
        }
        assert!(
            start.elapsed() < limit,
            "{table}: last vacuum {vacuumed:?}, last analyze {analyzed:?}, since {since:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Daemon {
    pub child: Child,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub data: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// `pglite-cache sync --source URL --data DIR` plus `extra`, run by
    /// `wrapper` (e.g. `["strace", "-f", ...]`) if not empty.
    pub fn spawn(wrapper: &[&str], source: &str, data: &Path, extra: &[&str]) -> Daemon {
        let socket_dir = data.with_extension("sock");
        let port = free_port();
        let log = data.with_extension(format!("log{}", std::time::SystemTime::now().elapsed().unwrap().as_nanos()));
        let stderr = std::fs::File::create(&log).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = command
            .args(["sync", "--source", source, "--data"])
            .arg(data)
            .arg("--socket-dir")
            .arg(&socket_dir)
            .args(["--port", &port.to_string(), "--status-interval", "1"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Daemon { child, socket_dir, port, data: data.to_owned(), log }
    }

    pub fn conninfo(&self) -> String {
        format!("host={} port={} user=postgres dbname=postgres", self.socket_dir.display(), self.port)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The status file the daemon rewrites every half second.
    pub fn status(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.data.join("pglite-cache-status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// A table's state in the status file (`pending`, `copying`, `ready`).
    pub fn table_state(&self, table: &str) -> Option<String> {
        let status = self.status()?;
        status["tables"].as_array()?.iter().find(|t| t["table"] == table).map(|t| t["state"].as_str().unwrap().into())
    }

    /// Polls `condition` every 20 ms for at most `limit`; fails with the log.
    pub async fn wait_until(&mut self, limit: Duration, what: &str, mut condition: impl FnMut(&Daemon) -> bool) {
        let start = Instant::now();
        while !condition(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited with {status} waiting for {what}:\n{}", self.stderr());
            }
            assert!(start.elapsed() < limit, "not {what} within {limit:?}:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn client(&mut self) -> tokio_postgres::Client {
        let start = Instant::now();
        loop {
            if let Ok((client, connection)) = tokio_postgres::connect(&self.conninfo(), tokio_postgres::NoTls).await {
                tokio::spawn(connection);
                return client;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited with {status}:\n{}", self.stderr());
            }
            assert!(start.elapsed() < Duration::from_secs(120), "not serving in time:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, pid: u32, signal: &str) {
        let ok = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill {signal} {pid}");
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL, then reaps the process.
    pub fn kill9(mut self) {
        self.signal(self.child.id(), "-KILL");
        self.wait(Duration::from_secs(10));
    }

    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < limit, "daemon did not exit:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `pglite-cache` child process with its stderr in `log`, killed on drop.
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[String], log: PathBuf) -> Proc {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child =
            Command::new(BIN).args(args).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(stderr).spawn().unwrap();
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("process exited with {status}:\n{}", self.log());
        }
    }

    /// A client of the cache this process serves at `conninfo`, once
    /// `probe` answers there (polled every 50 ms, failing with the log).
    pub async fn client(&mut self, conninfo: &str, probe: &str) -> tokio_postgres::Client {
        let start = Instant::now();
        loop {
            self.assert_running();
            if let Ok((client, connection)) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await {
                tokio::spawn(connection);
                if client.simple_query(probe).await.is_ok() {
                    return client;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(60), "not serving in time:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}
