//! A throwaway local PostgreSQL server built from the machine's server
//! binaries, with `wal_level = logical`: the remote side of
//! `pglite-cache demo` and of the test suites.
//!
//! PostgreSQL refuses to run as root, so when this process is root the
//! cluster is owned by and run as the `postgres` system user (created by
//! Debian's `postgresql` package), or else `nobody`.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Why a local server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalPostgresError {
    /// No PostgreSQL server binaries on this machine.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in {searched}; install them, e.g. `apt-get install -y postgresql`, or set PGLITE_CACHE_PG_BIN to their directory"
    )]
    MissingBinaries {
        /// Where we looked.
        searched: String,
    },
    /// A command failed; its output is included.
    #[error("{command} failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr and stdout.
        output: String,
    },
    /// A file-system step failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running local PostgreSQL cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct LocalPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    run_as: Option<(u32, u32)>,
    running: bool,
}

impl LocalPostgres {
    /// Creates and starts a cluster on a free loopback port, trust auth,
    /// `wal_level = logical`, plus any `extra_settings` (`name`, `value`).
    pub fn start(extra_settings: &[(&str, &str)]) -> Result<LocalPostgres, LocalPostgresError> {
        let mut pg = LocalPostgres::create(extra_settings)?;
        pg.start_server()?;
        Ok(pg)
    }

    /// Like [`start`](Self::start) but leaves the server stopped, so that
    /// files it needs at startup (e.g. TLS keys, see
    /// [`write_file`](Self::write_file)) can be put in place first.
    pub fn create(extra_settings: &[(&str, &str)]) -> Result<LocalPostgres, LocalPostgresError> {
        let bin = find_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("pglite-cache-pg-").tempdir()?;
        let run_as = unprivileged_user()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let pg = LocalPostgres { bin, dir, port, run_as, running: false };
        pg.give_to_server(pg.dir.path())?;
        std::fs::create_dir(pg.socket_dir())?;
        pg.give_to_server(&pg.socket_dir())?;
        // `--no-locale`: C collation, so text sorts the same as in PGlite.
        pg.run(
            "initdb",
            &["-D", &pg.data_dir_str(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"],
        )?;
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 20\nmax_replication_slots = 20\n\
             fsync = off\nshared_buffers = 32MB\nmax_connections = 100\n",
            pg.port,
            pg.socket_dir().display()
        );
        for (name, value) in extra_settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        let conf_path = pg.data_dir().join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path)?;
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing)?;
        Ok(pg)
    }

    /// Writes a file the server can read (owned by its user, mode 0600) at
    /// `relative` inside the cluster's directory; returns its path.
    pub fn write_file(&self, relative: &str, contents: &[u8]) -> Result<PathBuf, LocalPostgresError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(relative);
        std::fs::write(&path, contents)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        self.give_to_server(&path)?;
        Ok(path)
    }

    fn give_to_server(&self, path: &std::path::Path) -> Result<(), LocalPostgresError> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// The cluster's directory (data, socket directory, log).
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The TCP port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn data_dir_str(&self) -> String {
        self.data_dir().display().to_string()
    }

    /// A `postgres://` URL for `database` as the `postgres` superuser over TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A key=value connection string for `database` (tokio-postgres style).
    pub fn conninfo(&self, database: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={database}", self.port)
    }

    /// Stops the server (fast shutdown), keeping its data.
    pub fn stop(&mut self) -> Result<(), LocalPostgresError> {
        if self.running {
            self.run("pg_ctl", &["stop", "-D", &self.data_dir_str(), "-m", "fast", "-w"])?;
            self.running = false;
        }
        Ok(())
    }

    /// Starts the server again after [`stop`](Self::stop).
    pub fn start_server(&mut self) -> Result<(), LocalPostgresError> {
        let log = self.dir.path().join("server.log").display().to_string();
        self.run("pg_ctl", &["start", "-D", &self.data_dir_str(), "-l", &log, "-w", "-t", "60"])?;
        self.running = true;
        Ok(())
    }

    /// Restarts the server (connections are dropped).
    pub fn restart(&mut self) -> Result<(), LocalPostgresError> {
        self.stop()?;
        self.start_server()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<Output, LocalPostgresError> {
        let mut command = Command::new(self.bin.join(program));
        command.args(args).current_dir(self.dir.path());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        let output = command.output()?;
        if !output.status.success() {
            return Err(LocalPostgresError::Command {
                command: format!("{program} {}", args.join(" ")),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stderr),
                    String::from_utf8_lossy(&output.stdout)
                ),
            });
        }
        Ok(output)
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.run("pg_ctl", &["stop", "-D", &self.data_dir_str(), "-m", "immediate", "-w"]);
        }
    }
}

/// The directory with `initdb` and `pg_ctl`: `$PGLITE_CACHE_PG_BIN`, else the
/// newest `/usr/lib/postgresql/*/bin`, else `$PATH`.
fn find_bin_dir() -> Result<PathBuf, LocalPostgresError> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("PGLITE_CACHE_PG_BIN") {
        candidates.push(PathBuf::from(dir));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev().map(|(_, p)| p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates.iter().find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()).cloned().ok_or_else(
        || LocalPostgresError::MissingBinaries {
            searched: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        },
    )
}

/// `Some((uid, gid))` of the user to run the server as when we are root.
fn unprivileged_user() -> Result<Option<(u32, u32)>, LocalPostgresError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let lookup =
        |name: &str| nix::unistd::User::from_name(name).ok().flatten().map(|u| (u.uid.as_raw(), u.gid.as_raw()));
    match lookup("postgres").or_else(|| lookup("nobody")) {
        Some(ids) => Ok(Some(ids)),
        None => Err(LocalPostgresError::Command {
            command: "looking up an unprivileged user".into(),
            output: "running as root and neither `postgres` nor `nobody` exists; create one (useradd postgres)".into(),
        }),
    }
}
