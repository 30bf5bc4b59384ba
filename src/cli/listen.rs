//! Where a served instance listens: flags shared by `serve` and `sync`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pglite_cache::server::{Listener, ScramVerifier, ServerConfig};

/// Raw listening flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenArgs {
    /// Directory of the Unix socket `.s.PGSQL.<port>` (created owner-only if
    /// missing). Connect with `psql -h DIR -p PORT`.
    #[arg(long, value_name = "DIR", env = "PGLITE_CACHE_SOCKET_DIR")]
    pub socket_dir: Option<PathBuf>,
    /// Port of the Unix socket name, and of the default TCP listener
    /// (default: 5432 for `serve`, 5433 for `sync`, so a cache can run next
    /// to the PostgreSQL it copies).
    #[arg(long, env = "PGLITE_CACHE_PORT")]
    pub port: Option<u16>,
    /// TCP address to listen on (repeatable). Default: 127.0.0.1:<port> when
    /// no --socket-dir is given.
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',', env = "PGLITE_CACHE_LISTEN")]
    pub listen: Vec<SocketAddr>,
    /// Allow --listen on addresses other than loopback.
    #[arg(long, env = "PGLITE_CACHE_ALLOW_REMOTE")]
    pub allow_remote: bool,
    /// File whose first line is the password required on TCP (or a
    /// `SCRAM-SHA-256$...` verifier). Unix-socket connections are trusted.
    /// Without it, a random password is generated at first start and stored
    /// owner-only (in the data directory, else next to the Unix socket, else
    /// in the temporary directory); where is printed at start.
    #[arg(long, value_name = "FILE", env = "PGLITE_CACHE_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// UNSAFE: accept TCP clients without a password. Every local user (and,
    /// with --allow-remote, anyone who can reach the port) gets superuser
    /// access to the cache.
    #[arg(long, env = "PGLITE_CACHE_UNSAFE_TRUST_TCP")]
    pub unsafe_trust_tcp: bool,
    /// Maximum concurrent client connections.
    #[arg(long, default_value_t = 64, env = "PGLITE_CACHE_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Largest COPY FROM STDIN accepted, in MiB (held in memory until CopyDone).
    #[arg(long, default_value_t = 256, value_name = "MIB", env = "PGLITE_CACHE_MAX_COPY_MB")]
    pub max_copy_mb: usize,
    /// Disconnect (FATAL 25P03, rolled back) a client silent this long inside
    /// a transaction: meanwhile every other client waits. 0 disables.
    #[arg(long, default_value_t = 30, value_name = "SECONDS", env = "PGLITE_CACHE_IDLE_IN_TRANSACTION_TIMEOUT")]
    pub idle_in_transaction_timeout: u64,
    /// Fail (ERROR 57014) a statement that waited this long for the engine
    /// behind other clients. 0 waits for ever.
    #[arg(long, default_value_t = 120, value_name = "SECONDS", env = "PGLITE_CACHE_QUEUE_WAIT_TIMEOUT")]
    pub queue_wait_timeout: u64,
    /// Disconnect a client that holds the engine and reads none of its reply
    /// for this long. 0 disables.
    #[arg(long, default_value_t = 30, value_name = "SECONDS", env = "PGLITE_CACHE_WRITE_TIMEOUT")]
    pub write_timeout: u64,
}

/// Seconds from a flag; 0 means "no limit".
fn limit(seconds: u64) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

/// Validated listening settings.
#[derive(Debug)]
pub struct ListenPlan {
    socket_dir: Option<PathBuf>,
    port: u16,
    tcp: Vec<SocketAddr>,
    /// Where the generated TCP password is (created by `bind`).
    generated_password: Option<PathBuf>,
    /// The server settings (limits, password).
    pub config: ServerConfig,
}

impl ListenArgs {
    /// Checks the flags: loopback only unless `--allow-remote`, a readable
    /// password file (or a generated one unless `--unsafe-trust-tcp`).
    /// `data`: the data directory, where a generated password is kept.
    pub fn plan(self, default_port: u16, data: Option<&std::path::Path>) -> Result<ListenPlan, String> {
        let port = self.port.unwrap_or(default_port);
        let mut tcp = self.listen;
        if tcp.is_empty() && self.socket_dir.is_none() {
            tcp.push(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        if let Some(addr) = tcp.iter().find(|a| !a.ip().is_loopback())
            && !self.allow_remote
        {
            return Err(format!("refusing to listen on non-loopback address {addr} without --allow-remote"));
        }
        let mut generated_password = None;
        let mut config = ServerConfig::default()
            .with_max_connections(self.max_connections)
            .with_max_copy_size(self.max_copy_mb.saturating_mul(1 << 20))
            .with_idle_in_transaction_timeout(limit(self.idle_in_transaction_timeout))
            .with_queue_wait_timeout(limit(self.queue_wait_timeout))
            .with_write_timeout(limit(self.write_timeout));
        if let Some(file) = &self.password_file {
            let text = std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
            let line = text.lines().next().unwrap_or("").trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                return Err(format!("{} holds no password", file.display()));
            }
            config = if line.starts_with("SCRAM-SHA-256$") {
                config.with_password_verifier(line.parse::<ScramVerifier>().map_err(|e| e.to_string())?)
            } else {
                config.with_password(line)
            };
        } else if self.unsafe_trust_tcp {
            if !tcp.is_empty() {
                eprintln!(
                    "warning: --unsafe-trust-tcp: every local user{} can connect over TCP as superuser, without a password",
                    if tcp.iter().any(|a| !a.ip().is_loopback()) { " and anyone who can reach the port" } else { "" }
                );
            }
        } else if !tcp.is_empty() {
            generated_password = Some(super::password::location(data, self.socket_dir.as_deref(), port));
        }
        Ok(ListenPlan { socket_dir: self.socket_dir, port, tcp, generated_password, config })
    }
}

impl ListenPlan {
    /// Binds every listener and prints where it listens (on stdout); loads
    /// or creates the generated TCP password (after the data directory
    /// exists) and prints where it is.
    pub async fn bind(&mut self) -> Result<Vec<Listener>, String> {
        if let Some(path) = &self.generated_password {
            let password = super::password::load_or_create(path)?;
            self.config = self.config.clone().with_password(&password);
        }
        let mut listeners = Vec::new();
        if let Some(dir) = &self.socket_dir {
            listeners.push(
                Listener::bind_unix(dir, self.port).map_err(|e| format!("cannot listen in {}: {e}", dir.display()))?,
            );
        }
        for addr in &self.tcp {
            listeners.push(Listener::bind_tcp(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?);
        }
        let mut out = std::io::stdout().lock();
        for l in &listeners {
            let _ = writeln!(out, "listening on {l}");
        }
        if let Some(dir) = &self.socket_dir {
            let _ = writeln!(out, "connect with: psql -h {} -p {} -U postgres", dir.display(), self.port);
        }
        if let Some(path) = &self.generated_password {
            let _ = writeln!(
                out,
                "TCP clients need the password (SCRAM-SHA-256, any user name) stored in {}",
                path.display()
            );
        }
        let _ = out.flush();
        Ok(listeners)
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    eprintln!("shutting down");
}
