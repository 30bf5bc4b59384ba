//! A server on a fresh in-memory instance, on TCP (port 0) and a Unix socket
//! in a temporary directory.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::BytesMut;
use pglite_cache::server::{self, Listener, ServerConfig};
use pglite_cache::{Instance, InstanceOptions};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// How long a test waits for an answer that must come.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

/// The port in the Unix socket name (the directory is private to the test).
pub const SOCKET_PORT: u16 = 5432;

pub struct TestServer {
    pub db: Instance,
    pub addr: SocketAddr,
    pub socket_dir: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: ServerConfig) -> TestServer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let db = Instance::start(InstanceOptions::in_memory()).await.expect("instance starts");
        let dir = tempfile::tempdir().unwrap();
        let socket_dir = dir.path().join("sockets");
        let unix = Listener::bind_unix(&socket_dir, SOCKET_PORT).unwrap();
        let tcp = Listener::bind_tcp("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(db.clone(), vec![unix, tcp], config, async move {
            let _ = stopped.await;
        }));
        TestServer { db, addr, socket_dir, _dir: dir, stop: Some(stop), task: Some(task) }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@{}/postgres", self.addr)
    }

    pub fn tcp_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(self.addr.port()).user("postgres").dbname("postgres");
        config
    }

    pub fn unix_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.host_path(&self.socket_dir).port(SOCKET_PORT).user("postgres").dbname("postgres");
        config
    }

    /// A tokio-postgres client over TCP.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(self.tcp_config()).await.expect("connects")
    }

    /// Starts the shutdown; returns the server task to await.
    pub fn begin_shutdown(&mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("server running")
    }

    pub async fn shutdown(mut self) {
        self.begin_shutdown().await.unwrap().unwrap();
    }
}

pub async fn connect(config: tokio_postgres::Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A client that speaks the protocol by hand.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub async fn open(server: &TestServer) -> Raw {
        Raw { stream: TcpStream::connect(server.addr).await.unwrap() }
    }

    /// Connects and completes the startup.
    pub async fn connect(server: &TestServer) -> Raw {
        let mut raw = Raw::open(server).await;
        let mut buf = BytesMut::new();
        frontend::startup_message([("user", "postgres"), ("database", "postgres")], &mut buf).unwrap();
        raw.send(&buf).await;
        let messages = raw.read_until_ready().await;
        assert_eq!(messages.last().map(|m| m.0), Some(b'Z'), "startup ends with ReadyForQuery");
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    pub async fn query(&mut self, sql: &str) -> Vec<(u8, Vec<u8>)> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).unwrap();
        self.send(&buf).await;
        self.read_until_ready().await
    }

    /// Reads one message, or `None` at EOF.
    pub async fn read_message(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        timeout(PATIENCE, self.stream.read_exact(&mut header)).await.expect("server answers").ok()?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        timeout(PATIENCE, self.stream.read_exact(&mut body)).await.expect("server answers").ok()?;
        Some((header[0], body))
    }

    pub async fn read_until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut messages = Vec::new();
        while let Some(m) = self.read_message().await {
            let done = m.0 == b'Z';
            messages.push(m);
            if done {
                break;
            }
        }
        messages
    }

    pub async fn read_to_eof(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut messages = Vec::new();
        while let Some(m) = self.read_message().await {
            messages.push(m);
        }
        messages
    }
}

/// The SQLSTATE of the first ErrorResponse.
pub fn error_code(messages: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = messages.iter().find(|m| m.0 == b'E')?;
    body.split(|&b| b == 0).find_map(|f| f.strip_prefix(b"C")).map(|c| String::from_utf8_lossy(c).into_owned())
}
