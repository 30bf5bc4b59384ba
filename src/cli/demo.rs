//! `pglite-cache demo`: the whole job on a throwaway remote, in one command.
//!
//! Starts a local PostgreSQL from the machine's server binaries, fills a small
//! shop schema, syncs it into a temporary cache (served over the wire
//! protocol too), streams live writes while showing the cache catching up,
//! shows a read-your-writes wait, checks remote and cache row by row, and
//! cleans everything up.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use pglite_cache::local_postgres::LocalPostgres;
use pglite_cache::replication::{Lsn, Phase, PublicationSpec, Replication, ReplicationConfig, ReplicationHandle};
use pglite_cache::server::{self, Listener, ServerConfig};
use pglite_cache::{Instance, InstanceOptions};
use tokio_postgres::{Client, NoTls};

use super::sync::EXIT_CONFIG;

const TABLES: [&str; 3] = ["public.customers", "public.products", "public.orders"];

const SCHEMA: &str = r#"
CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE products (
    id serial PRIMARY KEY,
    name text NOT NULL,
    price numeric(10, 2) NOT NULL,
    stock int NOT NULL,
    tags text[] NOT NULL DEFAULT '{}'
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers,
    product_id int NOT NULL REFERENCES products,
    quantity int NOT NULL,
    status order_status NOT NULL DEFAULT 'new',
    details jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer ON orders (customer_id);
INSERT INTO customers (name, email)
    SELECT 'Customer ' || g, 'customer' || g || '@example.com' FROM generate_series(1, 2000) g;
INSERT INTO products (name, price, stock, tags)
    SELECT 'Product ' || g, (g % 97) + 0.99, 1000, ARRAY['tag' || (g % 5), 'demo'] FROM generate_series(1, 300) g;
INSERT INTO orders (customer_id, product_id, quantity, status, details)
    SELECT 1 + g % 2000, 1 + g % 300, 1 + g % 4, (ARRAY['new','paid','shipped']::order_status[])[1 + g % 3],
           jsonb_build_object('channel', CASE WHEN g % 2 = 0 THEN 'web' ELSE 'store' END, 'note', 'it''s order ' || g)
    FROM generate_series(1, 100000) g;
"#;

fn step(text: &str) {
    println!("\n==> {text}");
}

pub async fn run() -> ExitCode {
    step("starting a throwaway PostgreSQL (the remote) with wal_level=logical");
    let remote = match tokio::task::spawn_blocking(|| LocalPostgres::start(&[])).await {
        Ok(Ok(remote)) => remote,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("    remote: {}", remote.url("postgres"));
    let cache_dir = match tempfile::Builder::new().prefix("pglite-cache-demo-").tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = demo(&remote, cache_dir.path()).await;
    step("cleaning up: remote stopped, temporary directories removed");
    drop(remote);
    match result {
        Ok(()) => {
            println!("\ndemo finished: the cache stayed in sync with the remote");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(conninfo: &str) -> Result<Client, String> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(client)
}

async fn demo(remote: &LocalPostgres, cache_dir: &std::path::Path) -> Result<(), String> {
    let client = connect(&remote.conninfo("postgres")).await?;
    step("creating a shop schema on the remote: 2,000 customers, 300 products, 100,000 orders");
    client.batch_execute(SCHEMA).await.map_err(|e| e.to_string())?;

    step(&format!("syncing into a new cache at {}", cache_dir.display()));
    let cache =
        Instance::start(InstanceOptions::persistent(cache_dir).name("demo-cache")).await.map_err(|e| e.to_string())?;
    let source = remote.url("postgres").parse().map_err(|e| format!("{e}"))?;
    let spec =
        PublicationSpec::Owned { name: "demo_pub".into(), tables: TABLES.iter().map(|t| t.to_string()).collect() };
    let config = ReplicationConfig::new(source, spec).slot_name("demo_slot");
    let replication = Replication::start(cache.clone(), config).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut status = replication.watch_status();
    loop {
        let s = status.borrow_and_update().clone();
        let rows: u64 = s.tables.iter().map(|t| t.rows_copied).sum();
        match s.phase {
            Phase::Streaming => {
                println!(
                    "    initial copy done: {rows} rows in {:.2} s; now streaming",
                    started.elapsed().as_secs_f64()
                );
                break;
            }
            Phase::Halted { error } => return Err(format!("replication halted: {error}")),
            _ => {}
        }
        if tokio::time::timeout(Duration::from_millis(500), status.changed()).await.is_ok_and(|r| r.is_err()) {
            return Err("replication ended".into());
        }
    }

    // Serve the cache so any client can read it while it syncs.
    let listener = Listener::bind_tcp("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(cache.clone(), vec![listener], ServerConfig::default(), server_stopped));
    println!("    the cache is served too: psql -h 127.0.0.1 -p {port} -U postgres");

    step("live writes on the remote for 6 seconds (new orders, stock and status updates, deletes)");
    let writer = tokio::spawn(write_load(connect(&remote.conninfo("postgres")).await?, Duration::from_secs(6)));
    let wire = connect(&format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")).await?;
    let mut transactions = replication.subscribe();
    let mut applied = 0_u64;
    let tick = Instant::now();
    while !writer.is_finished() {
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Ok(Ok(_)) = tokio::time::timeout_at(deadline.into(), transactions.recv()).await {
            applied += 1;
        }
        // The cache first: then it can only be behind the remote, never ahead.
        let cache_orders: i64 =
            wire.query_one("SELECT count(*) FROM orders", &[]).await.map_err(|e| e.to_string())?.get(0);
        let remote_orders: i64 =
            client.query_one("SELECT count(*) FROM orders", &[]).await.map_err(|e| e.to_string())?.get(0);
        let s = replication.status();
        println!(
            "    t={:>4.1}s  orders: remote {remote_orders:>6}  cache {cache_orders:>6}  | applied {applied:>4} txns, lag {} B / {:.1} ms",
            tick.elapsed().as_secs_f64(),
            s.lag_bytes,
            s.lag.as_secs_f64() * 1e3
        );
    }
    let written = writer.await.map_err(|e| e.to_string())??;
    println!("    the remote committed {written} transactions");

    step("read-your-writes: write on the remote, wait for that LSN, read it from the cache");
    read_your_writes(&client, &replication, &cache).await?;

    step("comparing remote and cache row by row");
    let lsn = current_lsn(&client).await?;
    replication.wait_for_lsn(lsn).await.map_err(|e| e.to_string())?;
    for table in TABLES {
        let (n, remote_hash) = table_hash_remote(&client, table).await?;
        let (m, cache_hash) = table_hash_cache(&cache, table).await?;
        let same = n == m && remote_hash == cache_hash;
        println!(
            "    {table:<18} remote {n:>7} rows  cache {m:>7} rows  {}",
            if same { "identical" } else { "DIFFERENT" }
        );
        if !same {
            return Err(format!("{table} differs between remote and cache"));
        }
    }
    let write = cache.query("INSERT INTO customers (name, email) VALUES ('x', 'x@example.com')", &[]).await;
    if let Err(e) = write {
        println!("    a local write to a replicated table is refused: {e}");
    }

    step("stopping: finish the current transaction, confirm it, drop the demo slot and publication");
    drop(wire);
    let _ = stop_server.send(());
    let _ = server.await;
    replication.decommission().await.map_err(|e| e.to_string())?;
    cache.stop().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Small transactions as fast as one connection goes, for `duration`.
async fn write_load(client: Client, duration: Duration) -> Result<u64, String> {
    let end = Instant::now() + duration;
    let mut n = 0_u64;
    while Instant::now() < end {
        n += 1;
        let sql = match n % 10 {
            0 => format!("UPDATE orders SET status = 'shipped' WHERE id = {}", 1 + n * 7 % 100_000),
            1 => format!("DELETE FROM orders WHERE id = {}", 1 + n * 13 % 100_000),
            _ => format!(
                "BEGIN;
                 INSERT INTO orders (customer_id, product_id, quantity, details)
                     VALUES ({c}, {p}, 1, '{{\"channel\": \"live\", \"n\": {n}}}');
                 UPDATE products SET stock = stock - 1 WHERE id = {p};
                 COMMIT",
                c = 1 + n % 2000,
                p = 1 + n % 300
            ),
        };
        client.batch_execute(&sql).await.map_err(|e| e.to_string())?;
        // About 200 transactions a second: a busy but ordinary shop.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(n)
}

async fn current_lsn(client: &Client) -> Result<Lsn, String> {
    let text: String =
        client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.map_err(|e| e.to_string())?.get(0);
    text.parse().map_err(|e| format!("{e}"))
}

async fn read_your_writes(client: &Client, replication: &ReplicationHandle, cache: &Instance) -> Result<(), String> {
    let committed = Instant::now();
    let id: i32 = client
        .query_one("INSERT INTO customers (name, email) VALUES ('Ada Lovelace', 'ada@example.com') RETURNING id", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let lsn = current_lsn(client).await?;
    replication.wait_for_lsn(lsn).await.map_err(|e| e.to_string())?;
    let waited = committed.elapsed();
    let row = cache.query("SELECT name FROM customers WHERE id = $1", &[&id]).await.map_err(|e| e.to_string())?;
    let name: String = row.rows.first().ok_or("the write is not in the cache")?.get(0);
    println!(
        "    inserted customer {id} on the remote; readable in the cache {:.1} ms after the INSERT was sent (wait_for_lsn({lsn})); the cache says: {name}",
        waited.as_secs_f64() * 1e3
    );
    Ok(())
}

const HASH: &str =
    "SELECT count(*)::text, md5(coalesce(string_agg(ROW(t.*)::text, E'\\n' ORDER BY ROW(t.*)::text), '')) FROM ";

async fn table_hash_remote(client: &Client, table: &str) -> Result<(i64, String), String> {
    client.batch_execute("SET TimeZone = 'UTC'").await.map_err(|e| e.to_string())?;
    let row = client.query_one(&format!("{HASH}{table} t"), &[]).await.map_err(|e| e.to_string())?;
    Ok((row.get::<_, String>(0).parse().unwrap_or(-1), row.get(1)))
}

async fn table_hash_cache(cache: &Instance, table: &str) -> Result<(i64, String), String> {
    let tx = cache.begin().await.map_err(|e| e.to_string())?;
    tx.exec("SET LOCAL TimeZone = 'UTC'").await.map_err(|e| e.to_string())?;
    let r = tx.query(&format!("{HASH}{table} t"), &[]).await.map_err(|e| e.to_string())?;
    tx.rollback().await.map_err(|e| e.to_string())?;
    let row = r.rows.first().ok_or("no hash")?;
    Ok((row.get::<String>(0).parse().unwrap_or(-1), row.get(1)))
}
