//! Round trips, start time and memory of embedded instances, against
//! `pglite-oxide`'s direct API as the baseline, in one process and one run.
//!
//! Run: `cargo bench --bench instance` (add `-- --ops N` to change the count).

use std::process::Command;
use std::time::{Duration, Instant};

use pglite_cache::{DEFAULT_SETTINGS, Instance, InstanceOptions};
use pglite_oxide::Pglite;
use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rss-child") {
        let n: usize = args[i + 1].parse().expect("instance count");
        rss_child(n);
        return;
    }
    let ops: usize = args.iter().position(|a| a == "--ops").map_or(5_000, |i| args[i + 1].parse().expect("ops"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    println!("## Round trips ({ops} single-row ops, one caller, median of {ROUNDS} alternating rounds)\n");
    println!("| path | INSERT µs/op | PK SELECT µs/op | INSERT ratio | SELECT ratio |");
    println!("|---|---:|---:|---:|---:|");
    // Alternate the two paths so machine noise hits both alike; keep medians.
    let (mut direct, mut handled) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        direct.push(direct_api(ops));
        handled.push(rt.block_on(handle(ops)));
    }
    let (di, ds) = medians(direct);
    let (hi, hs) = medians(handled);
    row("pglite-oxide direct API (baseline)", di, ds, di, ds);
    row("pglite-cache `Instance` handle", hi, hs, di, ds);

    println!("\n## Start time (median of 5)\n");
    let (mem, reopen) = rt.block_on(start_times());
    println!("| start | ms |\n|---|---:|");
    println!("| in-memory | {:.0} |", ms(mem));
    println!("| persistent reopen | {:.0} |", ms(reopen));

    println!("\n## Resident memory (idle instances, `shared_buffers` = {})\n", DEFAULT_SETTINGS[0].1);
    let exe = std::env::current_exe().unwrap();
    let rss = |n: usize| -> f64 {
        let out = Command::new(&exe).args(["--rss-child", &n.to_string()]).output().expect("spawn child");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("child prints RSS in MiB")
    };
    let (r0, r1, r8) = (rss(0), rss(1), rss(8));
    println!("| process | RSS MiB |\n|---|---:|");
    println!("| runtime only, no instance | {r0:.0} |");
    println!("| 1 idle instance | {r1:.0} |");
    println!("| 8 idle instances | {r8:.0} |");
    println!("| marginal cost per instance ((8 − 1) / 7) | {:.1} |", (r8 - r1) / 7.0);
    println!("| first instance (1 − none) | {:.1} |", r1 - r0);
}

const ROUNDS: usize = 3;

fn medians(mut runs: Vec<(Duration, Duration)>) -> (Duration, Duration) {
    let mid = runs.len() / 2;
    runs.sort_by_key(|r| r.0);
    let insert = runs[mid].0;
    runs.sort_by_key(|r| r.1);
    (insert, runs[mid].1)
}

fn row(name: &str, insert: Duration, select: Duration, base_i: Duration, base_s: Duration) {
    println!(
        "| {name} | {:.1} | {:.1} | {:.2}x | {:.2}x |",
        us(insert),
        us(select),
        insert.as_secs_f64() / base_i.as_secs_f64(),
        select.as_secs_f64() / base_s.as_secs_f64()
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

const SCHEMA: &str = "CREATE TABLE bench (id int PRIMARY KEY, name text, score int)";

/// Per-op time of INSERTs, then of PK SELECTs, through the direct API.
fn direct_api(ops: usize) -> (Duration, Duration) {
    let mut builder = Pglite::builder().temporary();
    for (k, v) in DEFAULT_SETTINGS {
        builder = builder.postgres_config(*k, *v);
    }
    let mut pg = builder.open().unwrap();
    pg.exec(SCHEMA, None).unwrap();
    let t = Instant::now();
    for i in 0..ops {
        pg.query(
            "INSERT INTO bench VALUES ($1, $2, $3)",
            &[json!(i), json!(format!("name {i}")), json!(i % 100)],
            None,
        )
        .unwrap();
    }
    let insert = t.elapsed() / ops as u32;
    let t = Instant::now();
    for i in 0..ops {
        let r = pg.query("SELECT name FROM bench WHERE id = $1", &[json!(i)], None).unwrap();
        assert_eq!(r.rows.len(), 1);
    }
    let select = t.elapsed() / ops as u32;
    pg.close().unwrap();
    (insert, select)
}

async fn handle(ops: usize) -> (Duration, Duration) {
    let db = Instance::start(InstanceOptions::in_memory()).await.unwrap();
    db.exec(SCHEMA).await.unwrap();
    let t = Instant::now();
    for i in 0..ops as i32 {
        db.query("INSERT INTO bench VALUES ($1, $2, $3)", &[&i, &format!("name {i}"), &(i % 100)]).await.unwrap();
    }
    let insert = t.elapsed() / ops as u32;
    let t = Instant::now();
    for i in 0..ops as i32 {
        let r = db.query("SELECT name FROM bench WHERE id = $1", &[&i]).await.unwrap();
        assert_eq!(r.rows.len(), 1);
    }
    let select = t.elapsed() / ops as u32;
    db.stop().await.unwrap();
    (insert, select)
}

async fn start_times() -> (Duration, Duration) {
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut memory = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let db = Instance::start(InstanceOptions::in_memory()).await.unwrap();
        memory.push(t.elapsed());
        db.stop().await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    Instance::start(InstanceOptions::persistent(dir.path())).await.unwrap().stop().await.unwrap();
    let mut reopen = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let db = Instance::start(InstanceOptions::persistent(dir.path())).await.unwrap();
        reopen.push(t.elapsed());
        db.stop().await.unwrap();
    }
    (median(memory), median(reopen))
}

/// Starts `n` instances, runs one query on each, and prints the process RSS in MiB.
fn rss_child(n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let instances: Vec<Instance> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..n {
            let db = Instance::start(InstanceOptions::in_memory()).await.unwrap();
            db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000)")
                .await
                .unwrap();
            v.push(db);
        }
        v
    });
    std::thread::sleep(Duration::from_millis(300));
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    println!("{:.1}", kb / 1024.0);
    drop(instances);
}
