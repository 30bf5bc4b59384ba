//! A throwaway nats-server with JetStream per test: a free loopback port, a
//! temporary store directory, killed (SIGKILL) and removed on drop. If the
//! binary is missing this panics with the install command: tests fail, they
//! never skip.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
    log: PathBuf,
    /// A configuration file (`start_with`), else command-line options.
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Starts nats-server with JetStream on a free port.
    pub fn start() -> NatsServer {
        let store = tempfile::Builder::new().prefix("pglite-cache-nats-").tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = store.path().join("nats.log");
        let mut server = NatsServer { child: None, port, store, log, config: None };
        server.spawn();
        server
    }

    /// Starts nats-server on a free port with JetStream in `domain` and
    /// `extra` configuration (e.g. a `leafnodes { ... }` block).
    pub fn start_with(name: &str, domain: &str, extra: &str) -> NatsServer {
        let store = tempfile::Builder::new().prefix("pglite-cache-nats-").tempdir().unwrap();
        let port = free_port();
        let log = store.path().join("nats.log");
        let config = store.path().join("nats.conf");
        let js = store.path().join("js");
        std::fs::write(
            &config,
            format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: {js:?}, domain: {domain} }}\n{extra}\n"
            ),
        )
        .unwrap();
        let mut server = NatsServer { child: None, port, store, log, config: Some(config) };
        server.spawn();
        server
    }

    /// The server's process id (for CPU and memory figures in benchmarks).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let binary = which_nats_server();
        let mut command = Command::new(&binary);
        match &self.config {
            Some(config) => command.arg("-c").arg(config),
            None => command
                .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
                .arg(self.store.path().join("js")),
        };
        let child = command
            .arg("-l")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        self.child = Some(child);
        // Ready when it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nats-server exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "nats-server did not listen within 30 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, then start again on the same port and store.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts it again (same port and store) after [`Self::kill`].
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn which_nats_server() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/usr/bin"]) {
        let candidate = PathBuf::from(dir).join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("nats-server not found: install it (Debian: apt-get install nats-server); the fan-out tests need it")
}
