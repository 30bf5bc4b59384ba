//! A server on a fresh in-memory instance, on TCP (port 0) and a Unix socket
//! in a temporary directory.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use pglite_cache::server::{self, Listener, ServerConfig};
use pglite_cache::{Instance, InstanceOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
        let db = Instance::start(InstanceOptions::in_memory())
            .await
            .expect("instance starts");
        let dir = tempfile::tempdir().unwrap();
        let socket_dir = dir.path().join("sockets");
        let unix = Listener::bind_unix(&socket_dir, SOCKET_PORT).unwrap();
        let tcp = Listener::bind_tcp("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(db.clone(), vec![unix, tcp], config, async move {
            let _ = stopped.await;
        }));
        TestServer {
            db,
            addr,
            socket_dir,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@{}/postgres", self.addr)
    }

    pub fn tcp_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.addr.port())
            .user("postgres")
            .dbname("postgres");
        config
    }

    pub fn unix_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .port(SOCKET_PORT)
            .user("postgres")
            .dbname("postgres");
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
