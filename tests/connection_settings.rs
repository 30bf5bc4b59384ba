//! The remote's password from each libpq source, through the real binary
//! against a PostgreSQL that demands SCRAM over TCP; the password never
//! shows in logs, `status` or metrics.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pglite_cache::local_postgres::LocalPostgres;
use tokio_postgres::NoTls;

const BIN: &str = env!("CARGO_BIN_EXE_pglite-cache");
/// The password: a `:` and a `\` exercise the password file's escapes.
const PASSWORD: &str = "Zebra:7\\hunter2";
/// Strings that would reveal it (as given, percent-encoded, escaped for .pgpass).
const LEAKS: &[&str] = &["Zebra", "hunter2"];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A remote whose TCP connections (ordinary and replication) need the password.
async fn remote_with_password() -> LocalPostgres {
    let remote = LocalPostgres::start(&[]).expect("start PostgreSQL");
    let socket = format!("host={} port={} user=postgres dbname=postgres", remote.socket_dir().display(), remote.port());
    let (admin, connection) = tokio_postgres::connect(&socket, NoTls).await.unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256';
             ALTER ROLE postgres PASSWORD '{}';
             CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g;",
            PASSWORD.replace('\'', "''")
        ))
        .await
        .unwrap();
    remote
        .write_file(
            "data/pg_hba.conf",
            b"local all all trust\nlocal replication all trust\n\
              host all all 127.0.0.1/32 scram-sha-256\nhost replication all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    // Only the password gets in now.
    let tcp = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", remote.port());
    assert!(tokio_postgres::connect(&tcp, NoTls).await.is_err(), "TCP needs the password now");
    remote
}

/// Runs `pglite-cache sync` with `args` and `env` until it serves, scrapes
/// its metrics and `status`, stops it, and returns everything it printed.
async fn sync_and_collect(home: &Path, args: &[String], env: &[(&str, String)]) -> String {
    let data = home.join(format!("cache-{}", free_port()));
    let socket_dir = home.join(format!("sock-{}", free_port()));
    let (port, metrics) = (free_port(), free_port());
    let log = data.with_extension("log");
    let mut child: Child = Command::new(BIN)
        .arg("sync")
        .args(args)
        .arg("--data")
        .arg(&data)
        .arg("--socket-dir")
        .arg(&socket_dir)
        .args(["--port", &port.to_string(), "--metrics", &format!("127.0.0.1:{metrics}"), "--tables", "t"])
        .args(["--slot", &format!("s{port}")])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("RUST_LOG", "debug")
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdout(std::fs::File::create(data.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let printed = || {
        let out = std::fs::read_to_string(data.with_extension("out")).unwrap_or_default();
        format!("{out}{}", std::fs::read_to_string(&log).unwrap_or_default())
    };

    // Serving means the password worked: the initial copy is done.
    let conninfo = format!("host={} port={port} user=postgres dbname=postgres", socket_dir.display());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("daemon exited with {status}:\n{}", printed());
        }
        if let Ok((client, connection)) = tokio_postgres::connect(&conninfo, NoTls).await {
            tokio::spawn(connection);
            let n: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
            assert_eq!(n, 100);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never served:\n{}", printed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = scrape(metrics).await;
    check_metrics(&page);
    // `status` reads what the daemon last published (every half second).
    let start = Instant::now();
    let status = loop {
        let out = Command::new(BIN).args(["status", "--json", "--data"]).arg(&data).output().unwrap();
        let status = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if status.contains("\"streaming\"") {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "status never said streaming: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(30), "daemon did not stop:\n{}", printed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status_file = std::fs::read_to_string(data.join("pglite-cache-status.json")).unwrap_or_default();
    format!("{}\n{page}\n{status}\n{status_file}", printed())
}

/// Every metric the daemon has exported since 0.1, and the process metrics.
const METRICS: &[&str] = &[
    "pglite_cache_phase",
    "pglite_cache_lag_bytes",
    "pglite_cache_lag_seconds",
    "pglite_cache_applied_lsn",
    "pglite_cache_applied_transactions_total",
    "pglite_cache_applied_rows_total",
    "pglite_cache_table_rows_copied",
    "pglite_cache_table_rows_applied_total",
    "pglite_cache_reconnects_total",
    "pglite_cache_errors_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
];

/// Parses the page with a Prometheus text parser and checks what it says.
fn check_metrics(response: &str) {
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.to_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("valid text format");
    for name in METRICS {
        assert!(scrape.samples.iter().any(|s| s.metric == *name), "no {name} in\n{body}");
        assert!(scrape.docs.contains_key(*name), "no HELP for {name}");
    }
    let value = |name: &str, label: Option<(&str, &str)>| {
        let sample =
            scrape.samples.iter().find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)));
        match sample.map(|s| &s.value) {
            Some(
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v),
            ) => *v,
            other => panic!("{name}: {other:?}"),
        }
    };
    assert_eq!(value("pglite_cache_phase", Some(("phase", "streaming"))), 1.0, "{body}");
    assert_eq!(value("pglite_cache_phase", Some(("phase", "copying"))), 0.0, "{body}");
    assert_eq!(value("pglite_cache_table_rows_copied", Some(("table", "public.t"))), 100.0, "{body}");
    assert!(value("process_resident_memory_bytes", None) > 0.0);
}

async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).await.unwrap();
    page
}

fn assert_no_password(source: &str, output: &str) {
    for leak in LEAKS {
        assert!(!output.contains(leak), "{source}: the password shows in the output:\n{output}");
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_from_every_source_and_never_in_any_output() {
    let remote = remote_with_password().await;
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let port = remote.port().to_string();
    let no_password = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
    let source = |s: &str| vec!["--source".to_string(), s.to_string()];
    let encoded = PASSWORD.replace('\\', "%5C").replace(':', "%3A");

    // 1. In --source itself (discouraged: a warning says why).
    let with_password = format!("postgres://postgres:{encoded}@127.0.0.1:{port}/postgres?sslmode=disable");
    let out = sync_and_collect(home, &source(&with_password), &[]).await;
    assert!(out.contains("other users of this machine can see"), "{out}");
    assert_no_password("--source", &out);

    // 2. --source-file holding the whole connection string.
    let file = home.join("source.conninfo");
    write_private(&file, &format!("{with_password}\n"));
    let args = vec!["--source-file".to_string(), file.display().to_string()];
    assert_no_password("--source-file", &sync_and_collect(home, &args, &[]).await);

    // 3. PGPASSWORD.
    let env = [("PGPASSWORD", PASSWORD.to_string())];
    assert_no_password("PGPASSWORD", &sync_and_collect(home, &source(&no_password), &env).await);

    // 4. ~/.pgpass (escaped as libpq wants), with everything else from PG* variables.
    let escaped = PASSWORD.replace('\\', "\\\\").replace(':', "\\:");
    write_private(&home.join(".pgpass"), &format!("# cache\n127.0.0.1:{port}:postgres:postgres:{escaped}\n"));
    let env = [
        ("PGHOST", "127.0.0.1".to_string()),
        ("PGPORT", port.clone()),
        ("PGUSER", "postgres".to_string()),
        ("PGDATABASE", "postgres".to_string()),
        ("PGSSLMODE", "disable".to_string()),
    ];
    assert_no_password(".pgpass", &sync_and_collect(home, &source(""), &env).await);

    // 5. A service in PGSERVICEFILE (the password file is moved away first).
    std::fs::remove_file(home.join(".pgpass")).unwrap();
    let services = home.join("services.conf");
    write_private(
        &services,
        &format!(
            "[cache]\nhost=127.0.0.1\nport={port}\nuser=postgres\ndbname=postgres\nsslmode=disable\npassword={PASSWORD}\n"
        ),
    );
    let env = [("PGSERVICEFILE", services.display().to_string()), ("PGSERVICE", "cache".to_string())];
    assert_no_password("service", &sync_and_collect(home, &source(""), &env).await);

    // No password anywhere: a clear error at once (exit 2), no endless retries.
    let out = Command::new(BIN)
        .args(["sync", "--source", &no_password, "--tables", "t", "--data"])
        .arg(home.join("never"))
        .env("HOME", home)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{printed}");
    assert!(printed.contains("asks for a password and none was given"), "{printed}");

    // A wrong password: a clear error, and still not echoed.
    let wrong = format!("postgres://postgres:Zebra-wrong@127.0.0.1:{port}/postgres?sslmode=disable");
    let out = Command::new(BIN)
        .args(["sync", "--source", &wrong, "--tables", "t", "--data"])
        .arg(home.join("never"))
        .env("RUST_LOG", "debug")
        .env("HOME", home)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{printed}");
    assert!(printed.contains("password authentication failed"), "{printed}");
    assert_no_password("wrong password", &printed);
}

#[test]
fn an_open_password_file_is_ignored_with_libpqs_warning() {
    let home = tempfile::tempdir().unwrap();
    let pgpass = home.path().join(".pgpass");
    std::fs::write(&pgpass, "*:*:*:*:Zebra\n").unwrap();
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // The source is resolved before the other flags are checked (no --tables: exit 2).
    let out = Command::new(BIN)
        .args(["sync", "--source", "host=127.0.0.1 port=1 sslmode=disable", "--data"])
        .arg(home.path().join("missing"))
        .env("HOME", home.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has group or world access; permissions should be u=rw (0600) or less"), "{stderr}");
    assert!(!stderr.contains("Zebra"), "{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
}
