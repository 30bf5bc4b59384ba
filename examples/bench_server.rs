//! Wire-server benchmark: 5,000 single-row INSERTs and 5,000 primary-key
//! SELECTs (prepared statements, one round trip each) through
//!
//! 1. this crate's server (tokio-postgres over TCP loopback, and over the Unix socket),
//! 2. `pglite_oxide::PgliteServer` (tokio-postgres over TCP loopback),
//! 3. the in-process handle (`Instance::query`),
//!
//! then the same work split over 8 connections in parallel on this crate's
//! server. Prints a table; run with
//! `cargo run --release --example bench_server [-- ROWS]`.

use std::time::{Duration, Instant};

use pglite_cache::server::{self, Listener, ServerConfig};
use pglite_cache::{Instance, InstanceOptions};
use tokio_postgres::{Client, NoTls};

/// Per-operation timings of one run.
#[derive(Clone, Copy)]
struct Timing {
    insert: Duration,
    select: Duration,
    ops: u32,
}

impl Timing {
    fn insert_us(&self) -> f64 {
        self.insert.as_secs_f64() * 1e6 / f64::from(self.ops)
    }
    fn select_us(&self) -> f64 {
        self.select.as_secs_f64() * 1e6 / f64::from(self.ops)
    }
}

async fn connect(config: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(config, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Inserts then selects `ids` on one connection.
async fn wire_workload(client: &Client, table: &str, ids: std::ops::Range<i32>) -> (Duration, Duration) {
    let insert = client.prepare(&format!("INSERT INTO {table} (id, name) VALUES ($1, $2)")).await.unwrap();
    let select = client.prepare(&format!("SELECT name FROM {table} WHERE id = $1")).await.unwrap();
    let started = Instant::now();
    for id in ids.clone() {
        client.execute(&insert, &[&id, &format!("name {id}")]).await.unwrap();
    }
    let inserted = started.elapsed();
    let started = Instant::now();
    for id in ids {
        let row = client.query_one(&select, &[&id]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("name {id}"));
    }
    (inserted, started.elapsed())
}

async fn one_connection(url: &str, rows: i32) -> Timing {
    let client = connect(url).await;
    client
        .batch_execute(
            "CREATE TABLE warm (id int PRIMARY KEY, name text); CREATE TABLE bench (id int PRIMARY KEY, name text)",
        )
        .await
        .unwrap();
    wire_workload(&client, "warm", 0..200).await; // warm-up: plans, caches
    let (insert, select) = wire_workload(&client, "bench", 0..rows).await;
    Timing { insert, select, ops: rows as u32 }
}

async fn in_process(db: &Instance, rows: i32) -> Timing {
    db.exec("CREATE TABLE warm_api (id int PRIMARY KEY, name text); CREATE TABLE api (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    for id in 0..200 {
        db.query("INSERT INTO warm_api VALUES ($1, $2)", &[&id, &format!("name {id}")]).await.unwrap();
    }
    let started = Instant::now();
    for id in 0..rows {
        db.query("INSERT INTO api VALUES ($1, $2)", &[&id, &format!("name {id}")]).await.unwrap();
    }
    let insert = started.elapsed();
    let started = Instant::now();
    for id in 0..rows {
        let r = db.query("SELECT name FROM api WHERE id = $1", &[&id]).await.unwrap();
        assert_eq!(r.rows[0].get::<String>(0), format!("name {id}"));
    }
    Timing { insert, select: started.elapsed(), ops: rows as u32 }
}

/// `rows` split over `connections` clients running at once.
async fn parallel(url: &str, rows: i32, connections: i32) -> Timing {
    let setup = connect(url).await;
    setup.batch_execute("CREATE TABLE par (id int PRIMARY KEY, name text)").await.unwrap();
    let clients: Vec<Client> = futures_util::future::join_all((0..connections).map(|_| connect(url))).await;
    let per = rows / connections;
    // Each client prepares first so that timing covers only the workload.
    let inserts =
        futures_util::future::join_all(clients.iter().map(|c| c.prepare("INSERT INTO par (id, name) VALUES ($1, $2)")))
            .await;
    let selects =
        futures_util::future::join_all(clients.iter().map(|c| c.prepare("SELECT name FROM par WHERE id = $1"))).await;
    let started = Instant::now();
    futures_util::future::join_all(clients.iter().zip(&inserts).enumerate().map(|(i, (c, s))| {
        let s = s.as_ref().unwrap();
        async move {
            for id in (i as i32 * per)..((i as i32 + 1) * per) {
                c.execute(s, &[&id, &format!("name {id}")]).await.unwrap();
            }
        }
    }))
    .await;
    let insert = started.elapsed();
    let started = Instant::now();
    futures_util::future::join_all(clients.iter().zip(&selects).enumerate().map(|(i, (c, s))| {
        let s = s.as_ref().unwrap();
        async move {
            for id in (i as i32 * per)..((i as i32 + 1) * per) {
                let row = c.query_one(s, &[&id]).await.unwrap();
                assert_eq!(row.get::<_, String>(0), format!("name {id}"));
            }
        }
    }))
    .await;
    let select = started.elapsed();
    let n: i64 = setup.query_one("SELECT count(*) FROM par", &[]).await.unwrap().get(0);
    assert_eq!(n, i64::from(per * connections), "every row of every connection is there");
    Timing { insert, select, ops: (per * connections) as u32 }
}

/// Best (lowest) per-op times over several rounds: the machine is shared,
/// so the minimum is the most repeatable figure.
fn best(timings: &[Timing]) -> Timing {
    let insert = timings.iter().map(|t| t.insert).min().unwrap();
    let select = timings.iter().map(|t| t.select).min().unwrap();
    Timing { insert, select, ops: timings[0].ops }
}

fn main() {
    let rows: i32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let rounds: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    // The clients' runtime; servers run on their own threads, as they would
    // in another process.
    let clients = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();

    let mut peer_runs = Vec::new();
    let mut tcp_runs = Vec::new();
    let mut unix_runs = Vec::new();
    let mut api_runs = Vec::new();
    let mut par_runs = Vec::new();
    for _ in 0..rounds {
        // pglite-oxide's own server, on its own thread.
        let peer = pglite_oxide::PgliteServer::temporary_tcp().expect("PgliteServer starts");
        peer_runs.push(clients.block_on(one_connection(&peer.connection_uri(), rows)));
        drop(peer);

        for run in 0..3 {
            let (db, dir, addr, stop, served) = server_rt.block_on(async {
                let db = Instance::start(InstanceOptions::in_memory()).await.unwrap();
                let dir = tempfile::tempdir().unwrap();
                let unix = Listener::bind_unix(dir.path(), 5432).unwrap();
                let tcp = Listener::bind_tcp("127.0.0.1:0").await.unwrap();
                let addr = tcp.local_addr().unwrap();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let served =
                    tokio::spawn(server::serve(db.clone(), vec![unix, tcp], ServerConfig::default(), async move {
                        let _ = stopped.await;
                    }));
                (db, dir, addr, stop, served)
            });
            let tcp_url = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", addr.port());
            let unix_url = format!("host={} port=5432 user=postgres dbname=postgres", dir.path().display());
            match run {
                0 => tcp_runs.push(clients.block_on(one_connection(&tcp_url, rows))),
                1 => unix_runs.push(clients.block_on(one_connection(&unix_url, rows))),
                _ => par_runs.push(clients.block_on(parallel(&tcp_url, rows, 8))),
            }
            let _ = stop.send(());
            server_rt.block_on(async {
                served.await.unwrap().unwrap();
                db.stop().await.unwrap();
            });
        }
        api_runs.push(server_rt.block_on(async {
            let db = Instance::start(InstanceOptions::in_memory()).await.unwrap();
            let t = in_process(&db, rows).await;
            db.stop().await.unwrap();
            t
        }));
    }
    let peer_timing = best(&peer_runs);

    let row = |name: &str, t: &Timing| {
        let ratio_i = t.insert_us() / peer_timing.insert_us();
        let ratio_s = t.select_us() / peer_timing.select_us();
        println!(
            "| {name} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} / {:.2} |",
            t.insert_us(),
            t.select_us(),
            1e6 / t.insert_us(),
            1e6 / t.select_us(),
            ratio_i,
            ratio_s
        );
    };
    println!("{rows} single-row INSERTs, then {rows} PK SELECTs (prepared statements), best of {rounds} rounds;");
    println!("time per op, ops/s, and time relative to PgliteServer (insert / select)\n");
    println!("| path | insert µs | select µs | insert/s | select/s | vs PgliteServer |");
    println!("|---|---:|---:|---:|---:|---:|");
    row("pglite-oxide `PgliteServer`, 1 conn (TCP)", &peer_timing);
    row("pglite-cache server, 1 conn (TCP)", &best(&tcp_runs));
    row("pglite-cache server, 1 conn (Unix socket)", &best(&unix_runs));
    row("in-process `Instance::query`", &best(&api_runs));
    row("pglite-cache server, 8 conns in parallel (TCP), total", &best(&par_runs));
}
