//! Fleet benchmark: CACHES caches (default 8) fed by one publisher through
//! NATS JetStream (`fanout`) vs CACHES caches each with its own slot
//! (`slots`). One mode per run (so memory figures are the mode's own):
//! initial load of all caches, lag under a steady rate-limited pgbench load,
//! CPU and peak RSS of this process (the caches, and the publisher), of
//! nats-server and of the remote's walsenders, WAL retained on the remote.
//!
//! ```sh
//! cargo run --release --example fanout_fleet_bench -- fanout [SCALE] [CACHES] [SECONDS] [TPS]
//! cargo run --release --example fanout_fleet_bench -- slots  [SCALE] [CACHES] [SECONDS] [TPS]
//! ```
//!
//! Needs `nats-server`, `pgbench` and the PostgreSQL server binaries.

#[path = "../tests/support/nats.rs"]
mod nats;
#[path = "../tests/support/pg.rs"]
mod pg;

use std::time::{Duration, Instant};

use pglite_cache::replication::stream::{self, Publisher, PublisherConfig, StreamConfig, StreamReplication};
use pglite_cache::replication::{PublicationSpec, Replication, ReplicationConfig, ReplicationHandle};
use pglite_cache::{Instance, InstanceOptions};

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    let out = std::process::Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(100.0)
}

/// A `/proc/PID/status` field in MiB (VmRSS, VmHWM).
fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn walsender_pids(remote: &tokio_postgres::Client) -> Vec<u32> {
    remote
        .query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0) as u32)
        .collect()
}

async fn remote_lsn(remote: &tokio_postgres::Client) -> pglite_cache::replication::Lsn {
    let lsn: String = remote.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    lsn.parse().unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("fanout").to_owned();
    assert!(mode == "fanout" || mode == "slots", "mode: fanout or slots");
    let scale: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let caches: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let seconds: u32 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(30);
    let tps: u32 = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(100);
    let me = std::process::id();
    println!("mode {mode}, pgbench scale {scale}, {caches} caches, {seconds} s at {tps} tps; loadavg {}", uptime());

    let remote_pg = pg::PgCluster::start_with(&[("max_replication_slots", "20"), ("max_wal_senders", "20")]);
    let db = remote_pg.create_database("bench").await;
    let conninfo = remote_pg.conninfo(&db);
    let status = std::process::Command::new("pgbench")
        .args(["-i", "-q", "-s", &scale.to_string(), &conninfo])
        .output()
        .expect("pgbench (apt-get install postgresql-contrib or postgresql-client)");
    assert!(status.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&status.stderr));
    let remote = remote_pg.client(&db).await;
    remote
        .batch_execute(
            "CREATE PUBLICATION pub FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history",
        )
        .await
        .unwrap();
    let rows: i64 = remote.query_one("SELECT count(*) FROM pgbench_accounts", &[]).await.unwrap().get(0);
    let nats = nats::NatsServer::start();
    let nats_pid = nats.pid().unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let config = ReplicationConfig::new(conninfo.parse().unwrap(), PublicationSpec::Existing("pub".into()));
    let stream_config = StreamConfig::new(nats.url(), "bench");

    // Initial load of every cache (for fan-out: the publisher's copy and
    // snapshot, then every cache from the snapshot).
    let started = Instant::now();
    let mut publisher = None;
    let mut handles: Vec<(Instance, ReplicationHandle)> = Vec::new();
    if mode == "fanout" {
        let mut p =
            PublisherConfig::new(config.clone().slot_name("fanout"), stream_config.clone(), dirs.path().join("pub"));
        p.snapshot_interval = None;
        let p = Publisher::start(p).unwrap();
        p.wait_streaming().await.unwrap();
        println!("publisher copy + snapshot: {:.2} s", started.elapsed().as_secs_f64());
        publisher = Some(p);
        let mut starts = Vec::new();
        for i in 0..caches {
            let dir = dirs.path().join(format!("cache{i}"));
            let stream_config = stream_config.clone();
            starts.push(tokio::spawn(async move {
                stream::bootstrap(&stream_config, &dir).await.unwrap().unwrap();
                let instance = Instance::start(InstanceOptions::persistent(&dir)).await.unwrap();
                let handle = StreamReplication::start(instance.clone(), stream_config).unwrap();
                handle.wait_streaming().await.unwrap();
                (instance, handle)
            }));
        }
        for s in starts {
            handles.push(s.await.unwrap());
        }
    } else {
        let mut starts = Vec::new();
        for i in 0..caches {
            let dir = dirs.path().join(format!("cache{i}"));
            let config = config.clone().slot_name(format!("cache{i}"));
            starts.push(tokio::spawn(async move {
                let instance = Instance::start(InstanceOptions::persistent(&dir)).await.unwrap();
                let handle = Replication::start(instance.clone(), config).unwrap();
                handle.wait_streaming().await.unwrap();
                (instance, handle)
            }));
        }
        for s in starts {
            handles.push(s.await.unwrap());
        }
    }
    let load = started.elapsed();
    println!(
        "initial load of {caches} caches: {:.2} s, {:.0} rows/s ({} accounts rows each); loadavg {}",
        load.as_secs_f64(),
        (rows as f64 * caches as f64) / load.as_secs_f64(),
        rows,
        uptime()
    );

    // Steady load; sample every cache's lag (remote commit to local commit
    // of the last applied transaction) and the WAL the slots retain.
    let senders = walsender_pids(&remote).await;
    let cpu_before = (cpu_seconds(me), cpu_seconds(nats_pid), senders.iter().map(|p| cpu_seconds(*p)).sum::<f64>());
    let mut bench = tokio::process::Command::new("pgbench")
        .args(["-n", "-c", "4", "-j", "2", "-T", &seconds.to_string(), "-R", &tps.to_string(), &conninfo])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let load_started = Instant::now();
    let mut lags = Vec::new();
    let mut retained_max = 0i64;
    let mut last_applied = vec![0u64; handles.len()];
    while bench.try_wait().unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for (i, (_, h)) in handles.iter().enumerate() {
            let s = h.status();
            if s.applied_transactions > last_applied[i] {
                last_applied[i] = s.applied_transactions;
                lags.push(s.lag.as_secs_f64() * 1000.0);
            }
        }
        let retained: Option<i64> = remote
            .query_one(
                "SELECT sum(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn))::int8 FROM pg_replication_slots",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        retained_max = retained_max.max(retained.unwrap_or(0));
    }
    let output = bench.wait_with_output().await.unwrap();
    let tps_line =
        String::from_utf8_lossy(&output.stdout).lines().find(|l| l.starts_with("tps")).unwrap_or("tps ?").to_owned();
    let target = remote_lsn(&remote).await;
    let drain = Instant::now();
    for (_, h) in &handles {
        tokio::time::timeout(Duration::from_secs(300), h.wait_for_lsn(target)).await.unwrap().unwrap();
    }
    let drained = drain.elapsed();
    let elapsed = load_started.elapsed().as_secs_f64();
    let cpu = |before: f64, now: f64| (now - before) / elapsed * 100.0;
    let senders_now = senders.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    lags.sort_by(f64::total_cmp);
    println!("pgbench: {tps_line}; loadavg {}", uptime());
    println!(
        "lag ms (per applied transaction sample, all caches): p50 {:.0}, p99 {:.0}, max {:.0} ({} samples); \
         all caches at the remote's LSN {:.2} s after the load",
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or(0.0),
        lags.len(),
        drained.as_secs_f64()
    );
    println!(
        "CPU during the load (% of one core): this process {:.0}, nats-server {:.0}, walsenders ({}) {:.0}",
        cpu(cpu_before.0, cpu_seconds(me)),
        cpu(cpu_before.1, cpu_seconds(nats_pid)),
        senders.len(),
        cpu(cpu_before.2, senders_now)
    );
    println!(
        "memory MiB: this process RSS {:.0} (peak {:.0}), nats-server RSS {:.0}; WAL retained by the slots: max {:.1} MiB",
        memory_mib(me, "VmRSS:"),
        memory_mib(me, "VmHWM:"),
        memory_mib(nats_pid, "VmRSS:"),
        retained_max as f64 / (1 << 20) as f64
    );
    for (instance, h) in handles {
        h.stop().await.unwrap();
        instance.stop().await.unwrap();
    }
    if let Some(p) = publisher {
        p.stop().await.unwrap();
    }
}
