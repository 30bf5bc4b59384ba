//! `pglite-cache serve`: serve one instance over the PostgreSQL wire protocol.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use pglite_cache::server::{self, Listener, ScramVerifier, ServerConfig};
use pglite_cache::{Instance, InstanceOptions};

use super::EXIT_DB_ERROR;

/// Raw `serve` flags.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Persistent data directory (created if missing); in-memory if absent.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Directory of the Unix socket `.s.PGSQL.<port>` (created owner-only if
    /// missing). Connect with `psql -h DIR -p PORT`.
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<PathBuf>,
    /// Port of the Unix socket name, and of the default TCP listener.
    #[arg(long, default_value_t = 5432)]
    port: u16,
    /// TCP address to listen on (repeatable). Default: 127.0.0.1:<port> when
    /// no --socket-dir is given.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Vec<SocketAddr>,
    /// Allow --listen on addresses other than loopback.
    #[arg(long)]
    allow_remote: bool,
    /// File whose first line is the password required on TCP (or a
    /// `SCRAM-SHA-256$...` verifier). Unix-socket connections are trusted.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Maximum concurrent client connections.
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// Largest COPY FROM STDIN accepted, in MiB (held in memory until CopyDone).
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    max_copy_mb: usize,
}

/// Validated `serve` settings.
struct Plan {
    options: InstanceOptions,
    socket_dir: Option<PathBuf>,
    port: u16,
    tcp: Vec<SocketAddr>,
    config: ServerConfig,
}

fn plan(args: ServeArgs) -> Result<Plan, String> {
    let mut tcp = args.listen;
    if tcp.is_empty() && args.socket_dir.is_none() {
        tcp.push(SocketAddr::from(([127, 0, 0, 1], args.port)));
    }
    if let Some(addr) = tcp.iter().find(|a| !a.ip().is_loopback())
        && !args.allow_remote
    {
        return Err(format!(
            "refusing to listen on non-loopback address {addr} without --allow-remote"
        ));
    }
    let mut config = ServerConfig::default()
        .with_max_connections(args.max_connections)
        .with_max_copy_size(args.max_copy_mb.saturating_mul(1 << 20));
    if let Some(file) = &args.password_file {
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
    } else if tcp.iter().any(|a| !a.ip().is_loopback()) {
        eprintln!(
            "warning: listening on a non-loopback address without --password-file: anyone who can reach it has full access"
        );
    }
    let options = args
        .data
        .map_or_else(InstanceOptions::in_memory, InstanceOptions::persistent);
    Ok(Plan {
        options,
        socket_dir: args.socket_dir,
        port: args.port,
        tcp,
        config,
    })
}

pub async fn run(args: ServeArgs) -> ExitCode {
    let plan = match plan(args) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let db = match Instance::start(plan.options).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_DB_ERROR);
        }
    };
    let mut listeners = Vec::new();
    if let Some(dir) = &plan.socket_dir {
        match Listener::bind_unix(dir, plan.port) {
            Ok(l) => listeners.push(l),
            Err(e) => return fail(&db, &format!("cannot listen in {}: {e}", dir.display())).await,
        }
    }
    for addr in &plan.tcp {
        match Listener::bind_tcp(addr).await {
            Ok(l) => listeners.push(l),
            Err(e) => return fail(&db, &format!("cannot listen on {addr}: {e}")).await,
        }
    }
    {
        let mut out = std::io::stdout().lock();
        for l in &listeners {
            let _ = writeln!(out, "listening on {l}");
        }
        if let Some(dir) = &plan.socket_dir {
            let _ = writeln!(
                out,
                "connect with: psql -h {} -p {} -U postgres",
                dir.display(),
                plan.port
            );
        }
        let _ = out.flush();
    }
    let served = server::serve(db.clone(), listeners, plan.config, stop_signal()).await;
    let stopped = db.stop().await;
    match (served, stopped) {
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
        (Err(e), _) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_DB_ERROR)
        }
        (_, Err(e)) => {
            eprintln!("error: stopping the instance: {e}");
            ExitCode::from(EXIT_DB_ERROR)
        }
    }
}

async fn fail(db: &Instance, message: &str) -> ExitCode {
    eprintln!("error: {message}");
    let _ = db.stop().await;
    ExitCode::from(EXIT_DB_ERROR)
}

/// Completes on SIGINT or SIGTERM.
async fn stop_signal() {
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
