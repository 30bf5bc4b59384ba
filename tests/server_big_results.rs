//! Big results in bounded memory: `pglite-cache serve` (a process of its own,
//! so that its peak RSS is a clean measurement) streams a 300 MB result to a
//! tokio-postgres client, through the simple and the extended protocol and
//! `COPY ... TO STDOUT`, and its peak RSS (`VmHWM`) grows by at most 64 MiB.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use futures_util::{StreamExt, TryStreamExt};
use tokio_postgres::SimpleQueryMessage;

const BIN: &str = env!("CARGO_BIN_EXE_pglite-cache");
/// Rows of ~1 KB: 300,000 of them are ~300 MB on the wire.
const ROWS: i64 = 300_000;
const WIDTH: i64 = 1000;
const GROWTH_LIMIT: u64 = 64 << 20;

struct Serve {
    child: Child,
    port: u16,
    _stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Serve {
    fn start() -> Serve {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--unsafe-trust-tcp"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = Vec::new();
        while let Some(Ok(line)) = lines.next() {
            let listening = line.starts_with("listening on");
            banner.push(line);
            if listening {
                break;
            }
        }
        assert!(banner.iter().any(|l| l.starts_with("listening on")), "serve did not start: {banner:?}");
        Serve { child, port, _stdout: lines }
    }

    async fn connect(&self) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(self.port).user("postgres").dbname("postgres");
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Peak resident set size of the server process so far, in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/<pid>/status");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib << 10
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn big_select() -> String {
    format!("SELECT i, repeat('x', {WIDTH}) AS pad FROM generate_series(1, {ROWS}) AS i")
}

/// Starts a server, warms it up with a small query, runs `big` and checks
/// that the server's peak RSS grew by at most 64 MiB.
async fn check_peak_growth(what: &str, big: impl AsyncFnOnce(&tokio_postgres::Client) -> u64) {
    let server = Serve::start();
    let client = server.connect().await;
    // Warm up: the engine's first queries grow its memory a little.
    let warm = client.query(&format!("SELECT i, repeat('x', {WIDTH}) FROM generate_series(1, 2000) AS i"), &[]).await;
    assert_eq!(warm.unwrap().len(), 2000);
    let before = server.peak_rss();
    let started = std::time::Instant::now();
    let bytes = big(&client).await;
    let after = server.peak_rss();
    let growth = after.saturating_sub(before);
    println!(
        "{what}: {} MB to the client in {:?}; server peak RSS {} MiB -> {} MiB (+{} MiB)",
        bytes / 1_000_000,
        started.elapsed(),
        before >> 20,
        after >> 20,
        growth >> 20
    );
    assert!(bytes >= (ROWS * WIDTH) as u64, "{what}: only {bytes} bytes arrived");
    assert!(
        growth <= GROWTH_LIMIT,
        "{what}: the server's peak RSS grew by {} MiB (from {} MiB) for a {} MB result; at most 64 MiB allowed",
        growth >> 20,
        before >> 20,
        bytes / 1_000_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_result_through_extended_protocol_in_bounded_memory() {
    check_peak_growth("extended", async |client| {
        let rows = client.query_raw(&big_select(), std::iter::empty::<i32>()).await.unwrap();
        tokio::pin!(rows);
        let (mut count, mut bytes, mut last) = (0i64, 0u64, 0i32);
        while let Some(row) = rows.try_next().await.unwrap() {
            count += 1;
            last = row.get(0);
            bytes += row.get::<_, &str>(1).len() as u64 + 4;
        }
        assert_eq!((count, i64::from(last)), (ROWS, ROWS));
        assert_eq!(rows.rows_affected(), Some(ROWS as u64), "CommandComplete counts every row");
        bytes
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_result_through_simple_protocol_in_bounded_memory() {
    check_peak_growth("simple", async |client| {
        let messages = client.simple_query_raw(&big_select()).await.unwrap();
        tokio::pin!(messages);
        let (mut count, mut bytes, mut tag) = (0i64, 0u64, None);
        while let Some(message) = messages.next().await {
            match message.unwrap() {
                SimpleQueryMessage::Row(row) => {
                    count += 1;
                    bytes += row.get(1).unwrap().len() as u64 + 4;
                    if count == ROWS {
                        assert_eq!(row.get(0), Some(ROWS.to_string().as_str()));
                    }
                }
                SimpleQueryMessage::CommandComplete(n) => tag = Some(n),
                _ => {}
            }
        }
        assert_eq!((count, tag), (ROWS, Some(ROWS as u64)));
        bytes
    })
    .await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_copy_to_stdout_in_bounded_memory() {
    check_peak_growth("COPY TO STDOUT", async |client| {
        let sql = format!("COPY ({}) TO STDOUT", big_select());
        let stream = client.copy_out(&sql).await.unwrap();
        tokio::pin!(stream);
        let (mut lines, mut bytes, mut tail) = (0i64, 0u64, Vec::new());
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            lines += chunk.iter().filter(|&&b| b == b'\n').count() as i64;
            bytes += chunk.len() as u64;
            tail = chunk.to_vec();
        }
        assert_eq!(lines, ROWS);
        let last_line = tail.strip_suffix(b"\n").unwrap().rsplit(|&b| b == b'\n').next().unwrap().to_vec();
        assert!(last_line.starts_with(format!("{ROWS}\t").as_bytes()), "the last row comes last");
        bytes
    })
    .await;
}
