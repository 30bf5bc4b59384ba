//! pgbench side by side: the wire server vs native PostgreSQL (fsync off on
//! both), Unix sockets, scale 1; select-only and TPC-B, 1 and 8 clients
//! (`-j 2` and `-j 8`), simple and prepared. Prints a Markdown table.
//!
//! ```sh
//! cargo run --release --example bench_pgbench -- [SECONDS_PER_RUN]
//! ```
//!
//! Needs `pgbench` (on PATH or in /usr/lib/postgresql/*/bin) and a local
//! PostgreSQL installation (started as an unprivileged user, as the tests do).

use std::process::Command;

use pglite_cache::local_postgres::LocalPostgres;
use pglite_cache::server::{self, Listener, ServerConfig};
use pglite_cache::{Instance, InstanceOptions};

fn pgbench() -> String {
    let candidates = std::iter::once("pgbench".to_owned()).chain(
        std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path().join("bin/pgbench").display().to_string()),
    );
    for candidate in candidates {
        if Command::new(&candidate).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return candidate;
        }
    }
    panic!("pgbench is required: install postgresql (e.g. `apt-get install postgresql`)")
}

/// Runs pgbench against `socket_dir:port`; returns its output.
fn pgbench_out(bin: &str, socket_dir: &str, port: u16, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(["-h", socket_dir, "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .expect("pgbench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.into_owned()
}

/// Runs pgbench against `socket_dir:port`; returns its TPS.
fn run(bin: &str, socket_dir: &str, port: u16, args: &[&str]) -> f64 {
    let stdout = pgbench_out(bin, socket_dir, port, args);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|rest| rest.split_whitespace().next()?.parse().ok()))
        .unwrap_or_else(|| panic!("no tps in:\n{stdout}"))
}

fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let bin = pgbench();

    let native = LocalPostgres::start(&[("fsync", "off")]).expect("native PostgreSQL starts");
    let native_dir = native.socket_dir().display().to_string();

    let dir = tempfile::tempdir().unwrap();
    let ours_dir = dir.path().display().to_string();
    // On a single-threaded runtime of its own thread, as `pglite-cache
    // serve` runs it (see `Cli::single_threaded`).
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let socket_dir = dir.path().to_path_buf();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let db = Instance::start(InstanceOptions::in_memory()).await.unwrap();
            let unix = Listener::bind_unix(&socket_dir, 5432).unwrap();
            let served = server::serve(db.clone(), vec![unix], ServerConfig::default(), async move {
                let _ = stopped.await;
            });
            let _ = ready_tx.send(());
            let _ = served.await;
            db.stop().await.unwrap();
        });
    });
    ready.recv().expect("the server starts");

    for (dir, port) in [(&native_dir, native.port()), (&ours_dir, 5432)] {
        pgbench_out(&bin, dir, port, &["-i", "-s", "1", "-q"]);
    }
    let duration = seconds.to_string();
    println!("pgbench -T {seconds}, scale 1, Unix sockets; native PostgreSQL with fsync=off; TPS");
    println!();
    println!("| workload | mode | clients / threads | ours | native | ours / native |");
    println!("|---|---|---|---|---|---|");
    for (workload, script) in [("select-only", Some("-S")), ("TPC-B", None)] {
        for mode in ["simple", "prepared"] {
            for (clients, threads) in [(1, 1), (8, 2), (8, 8)] {
                let (c, j) = (clients.to_string(), threads.to_string());
                let mut args = vec!["-n", "-T", &duration, "-M", mode, "-c", &c, "-j", &j];
                args.extend(script);
                let ours = run(&bin, &ours_dir, 5432, &args);
                let theirs = run(&bin, &native_dir, native.port(), &args);
                println!(
                    "| {workload} | {mode} | {clients} / {threads} | {ours:.0} | {theirs:.0} | {:.2} |",
                    ours / theirs
                );
            }
        }
    }
    let _ = stop.send(());
    server.join().unwrap();
}
