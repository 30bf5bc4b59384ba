//! The command line as an operator meets it: flags from the environment,
//! help texts.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

const BIN: &str = env!("CARGO_BIN_EXE_pglite-cache");

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).envs(env.iter().copied()).stdin(Stdio::null()).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The long flags a help text lists, without `--help` and `--version`.
fn long_flags(help: &str) -> Vec<String> {
    let mut flags: Vec<String> = help
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let at = line.find("--")?;
            // Options start their line (`-h, --help` or `--data <DIR>`).
            if at > 4 {
                return None;
            }
            let name: String = line[at + 2..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            (!name.is_empty() && name != "help" && name != "version").then_some(name)
        })
        .collect();
    flags.dedup();
    flags
}

#[test]
fn every_daemon_flag_has_an_environment_variable_shown_in_help() {
    for command in ["sync", "serve"] {
        let (code, help, _) = run(&[command, "--help"], &[]);
        assert_eq!(code, Some(0));
        let flags = long_flags(&help);
        assert!(flags.len() >= 3, "{command}: {flags:?}\n{help}");
        for flag in flags {
            let var = format!("PGLITE_CACHE_{}", flag.to_uppercase().replace('-', "_"));
            assert!(help.contains(&format!("[env: {var}")), "{command} --{flag}: no {var} in\n{help}");
        }
    }
    // A connection string may hold a password: its value is never shown.
    let (_, help, _) = run(&["sync", "--help"], &[("PGLITE_CACHE_SOURCE", "postgres://u:Zebra@h/db")]);
    assert!(!help.contains("Zebra"), "{help}");
}

#[test]
fn flags_from_the_environment_are_validated_like_flags() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let env = [
        ("PGLITE_CACHE_SOURCE", "host=127.0.0.1 port=1"),
        ("PGLITE_CACHE_DATA", data.to_str().unwrap()),
        ("PGLITE_CACHE_TABLES", "a,b"),
        ("PGLITE_CACHE_STATUS_INTERVAL", "0"),
    ];
    let (code, _, stderr) = run(&["sync"], &env);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--status-interval must be at least 1 second"), "{stderr}");
    // A flag on the command line wins over the environment.
    let (code, _, stderr) = run(&["sync", "--status-interval", "0", "--tables", "x"], &[("PGLITE_CACHE_TABLES", "a")]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _, stderr) = run(&["sync"], &[("PGLITE_CACHE_ON_INVALID_SLOT", "sometimes")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("invalid value 'sometimes'"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_configured_from_the_environment_alone() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("PGLITE_CACHE_SOCKET_DIR", dir.path())
        .env("PGLITE_CACHE_PORT", &port)
        .env("PGLITE_CACHE_MAX_CONNECTIONS", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let conninfo = format!("host={} port={port} user=postgres", dir.path().display());
    let start = Instant::now();
    let client = loop {
        if let Ok((client, connection)) = tokio_postgres::connect(&conninfo, NoTls).await {
            tokio::spawn(connection);
            break client;
        }
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        assert!(start.elapsed() < Duration::from_secs(60), "serve never listened on the socket from the environment");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let mut more = Vec::new();
    for _ in 0..2 {
        let (c, connection) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
        tokio::spawn(connection);
        more.push(c);
    }
    // PGLITE_CACHE_MAX_CONNECTIONS=3: a fourth client waits (or is refused) until one leaves.
    match tokio::time::timeout(Duration::from_secs(1), tokio_postgres::connect(&conninfo, NoTls)).await {
        Err(_elapsed) => {}
        Ok(Err(e)) => assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS), "{e}"),
        Ok(Ok(_)) => panic!("a fourth connection was admitted with PGLITE_CACHE_MAX_CONNECTIONS=3"),
    }
    drop((client, more));
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(30), "serve did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn shell_completions_load_in_bash_and_cover_the_flags() {
    let (code, script, stderr) = run(&["completions", "bash"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(script.contains("--source-file") && script.contains("decommission"), "{script}");
    // The script loads in a real bash and registers itself.
    let out = Command::new("bash")
        .args(["-c", "source /dev/stdin && complete -p pglite-cache"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut bash| {
            use std::io::Write;
            bash.stdin.take().unwrap().write_all(script.as_bytes())?;
            bash.wait_with_output()
        })
        .expect("bash is needed for this test");
    let registered = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && registered.contains("pglite-cache"),
        "{registered}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let (code, script, _) = run(&["completions", shell], &[]);
        assert_eq!(code, Some(0));
        assert!(script.contains("source-file"), "{shell}: {script}");
    }
}

#[test]
fn manual_pages_for_every_command() {
    let (code, page, stderr) = run(&["man"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(page.starts_with(".ie") || page.contains(".TH pglite-cache 1"), "{page}");
    assert!(page.contains("sync") && page.contains("decommission"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    let (code, _, stderr) = run(&["man", "--dir", pages.to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    for name in ["pglite-cache.1", "pglite-cache-sync.1", "pglite-cache-serve.1", "pglite-cache-status.1"] {
        let text = std::fs::read_to_string(pages.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains(".TH"), "{name}: {text}");
    }
    let sync = std::fs::read_to_string(pages.join("pglite-cache-sync.1")).unwrap();
    assert!(sync.contains("PGLITE_CACHE_DATA"), "the page lists the environment variables: {sync}");
}

#[test]
fn resync_and_decommission_refuse_a_directory_that_is_not_a_cache() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("plain");
    std::fs::create_dir(&data).unwrap();
    let data = data.to_str().unwrap();
    // A plain database (no replication was ever recorded in it).
    let (code, _, err) = run(&["query", "--data", data, "CREATE TABLE t (id int)"], &[]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run(&["resync", "--data", data], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no replication is recorded"), "{err}");
    let (code, _, err) =
        run(&["decommission", "--yes", "--data", data, "--source", "host=127.0.0.1 port=1 dbname=x user=x"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no replication is recorded"), "{err}");
    // Neither left bookkeeping behind in it.
    let (code, out, err) =
        run(&["query", "--data", data, "SELECT count(*) FROM pg_namespace WHERE nspname = 'pglite_cache'"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.lines().any(|line| line.trim() == "0"), "{out}");
}
