//! A `pglite-cache sync` child process against a test PostgreSQL, for tests
//! that kill it (`kill -9`) and start it again on the same data directory
//! (`daemon.rs` is the richer variant with status-file helpers).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pglite_cache::local_postgres::LocalPostgres;
use tokio_postgres::{Client, NoTls};

pub const BIN: &str = env!("CARGO_BIN_EXE_pglite-cache");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A running `pglite-cache sync`.
pub struct Daemon {
    child: Child,
    socket_dir: PathBuf,
    port: u16,
    log: PathBuf,
}

impl Daemon {
    pub fn spawn(remote: &LocalPostgres, data: &Path, extra: &[&str]) -> Daemon {
        let socket_dir = data.with_extension("sock");
        let port = free_port();
        let log = data
            .with_extension(format!("log{}", std::time::SystemTime::now().elapsed().unwrap_or_default().as_nanos()));
        let stderr = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["sync", "--source", &remote.url("postgres"), "--data"])
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
        Daemon { child, socket_dir, port, log }
    }

    pub fn conninfo(&self) -> String {
        format!("host={} port={} user=postgres dbname=postgres", self.socket_dir.display(), self.port)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects once the cache admits clients (the initial copy is done).
    pub async fn wait_ready(&mut self) -> Client {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited with {status}:\n{}", self.stderr());
            }
            if let Ok(client) = connect(&self.conninfo()).await {
                return client;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "not ready in time:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {signal}");
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

    pub fn kill9(mut self) {
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
