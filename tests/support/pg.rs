//! A throwaway PostgreSQL cluster for tests: `initdb` in a temp dir with
//! `wal_level=logical`, a free TCP port on 127.0.0.1 plus its own Unix
//! socket directory, trust authentication; stopped and removed on drop.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the
//! cluster runs as the unprivileged user `pgtest` (created if missing).
//! If the server binaries are missing, this panics with the install command:
//! tests fail, they never skip.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

const RUN_AS: &str = "pgtest";

pub struct PgCluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    pub port: u16,
    run_as: Option<&'static str>,
}

fn bindir() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let mut candidates: Vec<PathBuf> = from_pg_config.into_iter().collect();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect();
        versions.sort();
        versions.reverse();
        candidates.extend(versions);
    }
    candidates.into_iter().find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists()).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found via pg_config or /usr/lib/postgresql/*/bin. \
                 Install them: apt-get install -y postgresql"
        )
    })
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn ensure_user() {
    static USER: Once = Once::new();
    USER.call_once(|| {
        let exists = Command::new("id").arg(RUN_AS).output().map(|o| o.status.success()).unwrap_or(false);
        if !exists {
            let out = Command::new("useradd")
                .args(["--system", "--no-create-home", "--shell", "/bin/false", RUN_AS])
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                // Another test process may have created it in the meantime.
                _ if Command::new("id").arg(RUN_AS).output().map(|o| o.status.success()).unwrap_or(false) => {}
                other => panic!("cannot create user {RUN_AS} to run PostgreSQL (it refuses to run as root): {other:?}"),
            }
        }
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

impl PgCluster {
    /// Starts a fresh cluster.
    pub fn start() -> PgCluster {
        Self::start_with(&[])
    }

    /// Starts a fresh cluster with extra `postgresql.conf` settings.
    pub fn start_with(settings: &[(&str, &str)]) -> PgCluster {
        Self::start_with_files(settings, Path::new(""))
    }

    /// `extra` (if not empty) is a directory the server must be able to
    /// read (its key files), handed to the server's user before it starts.
    fn start_with_files(settings: &[(&str, &str)], extra: &Path) -> PgCluster {
        let bindir = bindir();
        let run_as = if is_root() {
            ensure_user();
            Some(RUN_AS)
        } else {
            None
        };
        let dir = tempfile::Builder::new().prefix("pglite-cache-pg-").tempdir().unwrap();
        let cluster = PgCluster { dir, bindir, port: free_port(), run_as };
        std::fs::create_dir_all(cluster.socket_dir()).unwrap();
        if let Some(user) = run_as {
            check("chown", Command::new("chown").args(["-R", user]).arg(cluster.dir.path()).output());
        }
        check(
            "initdb",
            cluster
                .command("initdb")
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync", "-D"])
                .arg(cluster.data_dir())
                .output(),
        );
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nwal_level = logical\n\
             max_wal_senders = 20\nmax_replication_slots = 20\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nshared_buffers = 128MB\nmax_connections = 50\nlog_min_messages = warning\n",
            cluster.port,
            cluster.socket_dir().display()
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let conf_path = cluster.data_dir().join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).unwrap();
        if !extra.as_os_str().is_empty() {
            if let Some(user) = run_as {
                check("chown", Command::new("chown").args(["-R", user]).arg(extra).output());
            }
            check("chmod", Command::new("chmod").args(["-R", "go-rwx"]).arg(extra).output());
            check("chmod", Command::new("chmod").args(["o+x"]).arg(extra).output());
        }
        cluster.pg_ctl("start");
        cluster
    }

    /// Starts a fresh cluster with TLS on: a test CA (`ca.crt` in
    /// [`PgCluster::path`]) signs the server certificate for `localhost`
    /// and `127.0.0.1`.
    pub fn start_with_tls() -> PgCluster {
        let certs = tempfile::Builder::new().prefix("pglite-cache-tls-").tempdir().unwrap().keep();
        let run = |args: &[&str]| {
            check(&format!("openssl {args:?}"), Command::new("openssl").args(args).current_dir(&certs).output())
        };
        run(&[
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
        run(&[
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
        std::fs::write(certs.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
            .unwrap();
        run(&[
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
        let cert = certs.join("server.crt");
        let key = certs.join("server.key");
        let (cert_s, key_s) = (format!("'{}'", cert.display()), format!("'{}'", key.display()));
        let cluster =
            Self::start_with_files(&[("ssl", "on"), ("ssl_cert_file", &cert_s), ("ssl_key_file", &key_s)], &certs);
        std::fs::copy(certs.join("ca.crt"), cluster.path().join("ca.crt")).unwrap();
        std::fs::copy(&cert, cluster.path().join("server.crt")).unwrap();
        let _ = std::fs::remove_dir_all(&certs);
        cluster
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn pg_ctl(&self, action: &str) {
        let log = self.dir.path().join("server.log");
        let out = self
            .command("pg_ctl")
            .args(["-w", "-t", "60", "-m", "fast", "-D"])
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .arg(action)
            .output();
        if out.as_ref().map(|o| !o.status.success()).unwrap_or(true) {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            check(&format!("pg_ctl {action} (server log:\n{log})"), out);
        }
    }

    /// Restarts the server (connections are dropped).
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// A key=value connection string over TCP.
    pub fn conninfo(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db} sslmode=disable", self.port)
    }

    /// A `postgres://` URL over the Unix socket.
    pub fn unix_url(&self, db: &str) -> String {
        format!("postgres://postgres@{}:{}/{db}", percent(self.socket_dir().to_str().unwrap()), self.port)
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
        self.dir.path()
    }
}

fn percent(s: &str) -> String {
    s.replace('/', "%2F")
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-w", "-t", "30", "-m", "immediate", "-D"])
            .arg(self.data_dir())
            .arg("stop")
            .output();
    }
}
