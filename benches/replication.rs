//! Logical replication into a cache, side by side with native PostgreSQL
//! logical replication (a second local cluster subscribing to the same
//! publisher), in one run.
//!
//! Run: `cargo bench --bench replication` (`-- --rows N` for the initial copy
//! size, `-- --bulk N` for the bulk transactions, `-- --seconds S` for the load).
//!
//! Every "applied" time is measured the same way on both sides: from the
//! remote commit until a query on the subscriber sees the transaction's last
//! row (transactions apply atomically, so that row means all of it).

use std::time::{Duration, Instant};

use pglite_cache::local_postgres::LocalPostgres;
use tokio_postgres::{Client, NoTls};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).map_or(default, |i| args[i + 1].parse().expect("number"))
}

#[tokio::main]
async fn main() {
    let rows = arg("--rows", 1_000_000);
    let bulk = arg("--bulk", 200_000);
    let seconds = arg("--seconds", 10);
    let native = native(rows, bulk, seconds).await;
    println!("## Replication: native PostgreSQL subscriber\n");
    println!("| workload | result |\n|---|---|");
    native.print();
}

/// What one subscriber achieved.
struct Results {
    copy_rows: u64,
    copy: Duration,
    bulk_rows: u64,
    insert: Duration,
    update: Duration,
    delete: Duration,
    load_tps: f64,
    lag: Vec<Duration>,
    catch_up: Duration,
}

impl Results {
    fn print(&self) {
        let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
        println!("| initial copy, {} rows | {:.0} rows/s ({:.2} s) |", self.copy_rows, rate(self.copy_rows, self.copy), self.copy.as_secs_f64());
        for (what, d) in [("INSERT", self.insert), ("UPDATE", self.update), ("DELETE", self.delete)] {
            println!("| one {}-row {what} transaction, commit to applied | {:.0} rows/s ({:.2} s) |", self.bulk_rows, rate(self.bulk_rows, d), d.as_secs_f64());
        }
        let mut lag = self.lag.clone();
        lag.sort();
        let pct = |p: f64| lag.get(((lag.len() as f64 * p) as usize).min(lag.len().saturating_sub(1))).copied().unwrap_or_default();
        println!(
            "| small transactions at {:.0} TPS (4 clients): lag p50 / p99 ({} samples) | {:.1} ms / {:.1} ms |",
            self.load_tps,
            lag.len(),
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3
        );
        println!("| catch-up after the load stops | {:.1} ms |", self.catch_up.as_secs_f64() * 1e3);
    }
}

async fn connect(conninfo: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

const SCHEMA: &str = "
    CREATE TABLE big (id int PRIMARY KEY, a int NOT NULL, b text NOT NULL, c timestamptz NOT NULL);
    CREATE TABLE bulk (id int PRIMARY KEY, a int NOT NULL, b text NOT NULL);
    CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
    CREATE TABLE history (id bigserial PRIMARY KEY, account int NOT NULL, delta int NOT NULL, at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE markers (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());";

/// Polls `check` on the subscriber until it returns true.
async fn wait_until(sub: &Client, check: &str) -> Instant {
    loop {
        let row = sub.query_one(check, &[]).await.expect("poll subscriber");
        if row.get::<_, bool>(0) {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

async fn native(rows: u64, bulk: u64, seconds: u64) -> Results {
    let publisher = LocalPostgres::start(&[]).expect("start publisher");
    let subscriber = LocalPostgres::start(&[("max_logical_replication_workers", "8"), ("max_worker_processes", "16")])
        .expect("start subscriber");
    let pubc = connect(&publisher.conninfo("postgres")).await;
    let sub = connect(&subscriber.conninfo("postgres")).await;
    pubc.batch_execute(SCHEMA).await.unwrap();
    pubc.batch_execute(&format!(
        "INSERT INTO big SELECT g, g % 1000, 'row ' || g, now() FROM generate_series(1, {rows}) g;
         INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 1000) g;
         CREATE PUBLICATION bench FOR TABLE big, bulk, accounts, history, markers;"
    ))
    .await
    .unwrap();
    sub.batch_execute(SCHEMA).await.unwrap();

    let start = Instant::now();
    sub.batch_execute(&format!(
        "CREATE SUBSCRIPTION bench CONNECTION '{}' PUBLICATION bench",
        publisher.conninfo("postgres")
    ))
    .await
    .unwrap();
    let copied = wait_until(
        &sub,
        "SELECT count(*) = 5 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel",
    )
    .await;
    let copy = copied - start;

    let (insert, update, delete) = bulk_transactions(&pubc, bulk, |check| {
        let sub = &sub;
        async move { wait_until(sub, &check).await }
    })
    .await;
    let (load_tps, lag, catch_up) = load(&publisher, seconds, |check| {
        let sub = &sub;
        async move { wait_until(sub, &check).await }
    })
    .await;
    sub.batch_execute("DROP SUBSCRIPTION bench").await.unwrap();
    Results { copy_rows: rows, copy, bulk_rows: bulk, insert, update, delete, load_tps, lag, catch_up }
}

/// One big INSERT, UPDATE and DELETE transaction; commit-to-applied times.
async fn bulk_transactions<F, Fut>(pubc: &Client, n: u64, applied: F) -> (Duration, Duration, Duration)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Instant>,
{
    pubc.batch_execute(&format!("INSERT INTO bulk SELECT g, g, 'bulk ' || g FROM generate_series(1, {n}) g")).await.unwrap();
    let committed = Instant::now();
    let insert = applied(format!("SELECT EXISTS (SELECT 1 FROM bulk WHERE id = {n})")).await - committed;

    pubc.batch_execute("UPDATE bulk SET a = -a").await.unwrap();
    let committed = Instant::now();
    let update = applied(format!("SELECT COALESCE((SELECT a < 0 FROM bulk WHERE id = {n}), false)")).await - committed;

    pubc.batch_execute("DELETE FROM bulk").await.unwrap();
    let committed = Instant::now();
    let delete = applied(format!("SELECT NOT EXISTS (SELECT 1 FROM bulk WHERE id = {n})")).await - committed;
    (insert, update, delete)
}

/// Four clients run small transactions at full speed for `seconds`, while a
/// fifth writes a marker every 20 ms and times how long until the subscriber
/// sees it. Returns TPS, lag samples and the catch-up time of the last marker.
async fn load<F, Fut>(publisher: &LocalPostgres, seconds: u64, applied: F) -> (f64, Vec<Duration>, Duration)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Instant>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut clients = Vec::new();
    for c in 0..4 {
        let client = connect(&publisher.conninfo("postgres")).await;
        clients.push(tokio::spawn(async move {
            let mut done = 0_u64;
            let mut i = c;
            while Instant::now() < deadline {
                i = (i * 7 + 13) % 1000;
                client
                    .batch_execute(&format!(
                        "BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id = {};
                         INSERT INTO history (account, delta) VALUES ({}, 1); COMMIT",
                        i + 1,
                        i + 1
                    ))
                    .await
                    .unwrap();
                done += 1;
            }
            done
        }));
    }
    let markers = connect(&publisher.conninfo("postgres")).await;
    let mut lag = Vec::new();
    let mut id = 0;
    while Instant::now() < deadline {
        id += 1;
        markers.batch_execute(&format!("INSERT INTO markers (id) VALUES ({id})")).await.unwrap();
        let committed = Instant::now();
        lag.push(applied(format!("SELECT EXISTS (SELECT 1 FROM markers WHERE id = {id})")).await - committed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    // Catch-up: a marker written after the load ends.
    id += 1;
    markers.batch_execute(&format!("INSERT INTO markers (id) VALUES ({id})")).await.unwrap();
    let committed = Instant::now();
    let catch_up = applied(format!("SELECT EXISTS (SELECT 1 FROM markers WHERE id = {id})")).await - committed;
    (total as f64 / seconds as f64, lag, catch_up)
}
