//! A throwaway PostgreSQL cluster per test: the crate's `LocalPostgres`
//! (`wal_level=logical`, free port on 127.0.0.1, own Unix socket directory,
//! trust authentication, run as an unprivileged user when the tests run as
//! root, stopped and removed on drop) with test-friendly settings, a TLS
//! variant and client helpers. If the server binaries are missing this panics
//! with the install command: tests fail, they never skip.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use pglite_cache::local_postgres::LocalPostgres;

/// Faster, quieter settings for tests (durability does not matter here).
const TEST_SETTINGS: &[(&str, &str)] = &[
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("shared_buffers", "128MB"),
    ("max_connections", "50"),
    ("log_min_messages", "warning"),
];

pub struct PgCluster {
    pg: LocalPostgres,
    pub port: u16,
}

impl PgCluster {
    /// Starts a fresh cluster.
    pub fn start() -> PgCluster {
        Self::started(Self::create(&[]))
    }

    /// Starts a fresh cluster with extra `postgresql.conf` settings.
    pub fn start_with(settings: &[(&str, &str)]) -> PgCluster {
        Self::started(Self::create(settings))
    }

    fn create(extra: &[(&str, &str)]) -> LocalPostgres {
        let settings: Vec<(&str, &str)> = TEST_SETTINGS.iter().chain(extra).copied().collect();
        LocalPostgres::create(&settings).unwrap_or_else(|e| panic!("test PostgreSQL: {e}"))
    }

    fn started(mut pg: LocalPostgres) -> PgCluster {
        if let Err(e) = pg.start_server() {
            panic!("starting test PostgreSQL: {e}\n{}", pg.log());
        }
        let port = pg.port();
        PgCluster { pg, port }
    }

    /// Starts a fresh cluster with TLS on: a test CA (`ca.crt` in
    /// [`PgCluster::path`]) signs the server certificate for `localhost`
    /// and `127.0.0.1` (`server.crt` there too).
    pub fn start_with_tls() -> PgCluster {
        let certs = tempfile::Builder::new().prefix("pglite-cache-tls-").tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(certs.path())
                .output()
                .unwrap_or_else(|e| panic!("openssl (apt-get install -y openssl): {e}"));
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pglite-cache test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            certs.path().join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ]);
        // Relative paths resolve against the data directory.
        let pg = Self::create(&[("ssl", "on"), ("ssl_cert_file", "server.crt"), ("ssl_key_file", "server.key")]);
        let read = |name: &str| std::fs::read(certs.path().join(name)).unwrap();
        pg.write_file("data/server.crt", &read("server.crt")).unwrap();
        pg.write_file("data/server.key", &read("server.key")).unwrap();
        pg.write_file("server.crt", &read("server.crt")).unwrap();
        pg.write_file("ca.crt", &read("ca.crt")).unwrap();
        Self::started(pg)
    }

    /// Restarts the server (connections are dropped).
    pub fn restart(&mut self) {
        if let Err(e) = self.pg.restart() {
            panic!("restarting test PostgreSQL: {e}\n{}", self.pg.log());
        }
    }

    /// Stops the server (it stays stopped).
    pub fn stop(&mut self) {
        if let Err(e) = self.pg.stop() {
            panic!("stopping test PostgreSQL: {e}\n{}", self.pg.log());
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.pg.data_dir()
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.pg.socket_dir()
    }

    /// A key=value connection string over TCP.
    pub fn conninfo(&self, db: &str) -> String {
        format!("{} sslmode=disable", self.pg.conninfo(db))
    }

    /// A `postgres://` URL over the Unix socket.
    pub fn unix_url(&self, db: &str) -> String {
        let dir = self.socket_dir().display().to_string().replace('/', "%2F");
        format!("postgres://postgres@{dir}:{}/{db}", self.port)
    }

    /// Connects with tokio-postgres.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(db), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to test cluster: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Creates a database and returns its name.
    pub async fn create_database(&self, name: &str) -> String {
        let admin = self.client("postgres").await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        name.to_owned()
    }

    pub fn path(&self) -> &Path {
        self.pg.path()
    }
}
