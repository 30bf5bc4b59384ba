//! Lifecycle, named instances, isolation, concurrency, crashes and persistence.

use std::time::Duration;

use pglite_cache::{Error, Instance, InstanceOptions, Registry, RestartPolicy, params};

async fn memory() -> Instance {
    Instance::start(InstanceOptions::in_memory()).await.expect("start in-memory instance")
}

async fn count(db: &Instance, table: &str) -> i64 {
    db.query(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().rows[0].get(0)
}

#[tokio::test]
async fn start_stop_stop_again_and_calls_after_stop() {
    let db = memory().await;
    let health = db.health_check().await.unwrap();
    assert!(health.latency < Duration::from_secs(5));
    let clone = db.clone();
    db.stop().await.unwrap();
    db.stop().await.expect("stopping twice is not an error");
    assert!(clone.is_closed());
    for err in [
        clone.query("SELECT 1", &[]).await.unwrap_err(),
        clone.exec("SELECT 1").await.unwrap_err(),
        clone.begin().await.unwrap_err(),
        clone.health_check().await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::Stopped(_)), "{err}");
        assert!(err.is_closed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_from_a_multi_thread_runtime_and_across_tasks() {
    let db = memory().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                for j in 0..25 {
                    db.query("INSERT INTO t VALUES ($1)", &[&(i * 100 + j)]).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(count(&db, "t").await, 400);
}

#[tokio::test]
async fn an_open_transaction_excludes_other_callers() {
    let db = memory().await;
    db.exec("CREATE TABLE log (seq serial, who text)").await.unwrap();
    let tx = db.begin().await.unwrap();
    tx.query("INSERT INTO log (who) VALUES ('tx-1')", &[]).await.unwrap();

    // Another caller's write waits for the transaction to end...
    let other = {
        let db = db.clone();
        tokio::spawn(async move { db.query("INSERT INTO log (who) VALUES ('other')", &[]).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!other.is_finished(), "nothing interleaves into an open transaction");
    tx.query("INSERT INTO log (who) VALUES ('tx-2')", &[]).await.unwrap();
    tx.commit().await.unwrap();
    other.await.unwrap();

    // ...so the transaction's rows are contiguous.
    let r = db.query("SELECT who FROM log ORDER BY seq", &[]).await.unwrap();
    let order: Vec<String> = r.rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(order, vec!["tx-1", "tx-2", "other"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_instances_run_concurrently_with_isolated_data() {
    let instances: Vec<Instance> =
        futures_util::future::try_join_all((0..8).map(|_| Instance::start(InstanceOptions::in_memory())))
            .await
            .unwrap();
    let work = instances.iter().enumerate().map(|(i, db)| async move {
        db.exec("CREATE TABLE items (id int PRIMARY KEY, owner int)").await?;
        for j in 0..50 {
            db.query_params("INSERT INTO items VALUES ($1, $2)", params![j, i as i32]).await?;
        }
        Ok::<_, Error>(())
    });
    futures_util::future::try_join_all(work).await.unwrap();
    for (i, db) in instances.iter().enumerate() {
        let r = db.query("SELECT DISTINCT owner FROM items", &[]).await.unwrap();
        assert_eq!(r.rows.len(), 1);
        assert_eq!(r.rows[0].get::<i32>(0), i as i32, "instance {i} sees only its own rows");
        assert_eq!(count(db, "items").await, 50);
    }
    for db in &instances {
        db.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_crash_fails_that_instance_only() {
    let victim = memory().await;
    let bystander = memory().await;
    bystander.exec("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await.unwrap();

    let err = victim.inject_crash().await.unwrap_err();
    assert!(matches!(err, Error::Crashed { .. }), "{err}");
    for err in [victim.query("SELECT 1", &[]).await.unwrap_err(), victim.health_check().await.unwrap_err()] {
        assert!(matches!(err, Error::Crashed { .. }), "{err}");
    }
    assert!(victim.is_closed());

    bystander.health_check().await.unwrap();
    assert_eq!(count(&bystander, "t").await, 1);
}

#[tokio::test]
async fn a_crashed_persistent_instance_restarts_within_its_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = RestartPolicy { max_restarts: 2, within: Duration::from_secs(60) };
    let db = Instance::start(InstanceOptions::persistent(dir.path()).restart_policy(policy)).await.unwrap();
    db.exec("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await.unwrap();

    for _ in 0..2 {
        assert!(matches!(db.inject_crash().await, Err(Error::Crashed { .. })));
        // The next call waits for the restart and sees the committed data.
        assert_eq!(count(&db, "t").await, 1);
    }
    // A third crash inside the window exceeds the policy.
    db.inject_crash().await.unwrap_err();
    let err = db.query("SELECT 1", &[]).await.unwrap_err();
    assert!(matches!(&err, Error::Crashed { reason, .. } if reason.contains("restart limit")), "{err}");
}

#[tokio::test]
async fn persistent_data_survives_stop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = Instance::start(InstanceOptions::persistent(dir.path())).await.unwrap();
    db.exec("CREATE TABLE kept (v text)").await.unwrap();
    db.query("INSERT INTO kept VALUES ($1)", &[&"still here"]).await.unwrap();
    db.stop().await.unwrap();

    let db = Instance::start(InstanceOptions::persistent(dir.path())).await.unwrap();
    let r = db.query("SELECT v FROM kept", &[]).await.unwrap();
    assert_eq!(r.rows[0].get::<String>(0), "still here");
    db.stop().await.unwrap();
}

#[tokio::test]
async fn a_second_open_of_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = Instance::start(InstanceOptions::persistent(dir.path())).await.unwrap();
    let err = Instance::start(InstanceOptions::persistent(dir.path())).await.unwrap_err();
    assert!(matches!(&err, Error::DataDirInUse(p) if p == dir.path()), "{err}");

    // Another process is refused too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pglite-cache"))
        .args(["query", "--data"])
        .arg(dir.path())
        .arg("SELECT 1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    db.health_check().await.expect("the holder is unaffected");
    db.stop().await.unwrap();
    Instance::start(InstanceOptions::persistent(dir.path())).await.expect("free after stop").stop().await.unwrap();
}

#[tokio::test]
async fn registry_names_duplicates_lookup_and_stop_all() {
    let registry = Registry::new();
    let a = registry.start("a", InstanceOptions::in_memory()).await.unwrap();
    registry.start("b", InstanceOptions::in_memory()).await.unwrap();
    assert_eq!(a.label(), "a");

    let dup = registry.start("a", InstanceOptions::in_memory()).await.unwrap_err();
    assert!(matches!(&dup, Error::Registry(m) if m.contains("already registered")), "{dup}");
    assert_eq!(registry.names(), vec!["a", "b"]);

    a.exec("CREATE TABLE only_in_a (x int)").await.unwrap();
    let found = registry.get("a").unwrap();
    assert_eq!(count(&found, "only_in_a").await, 0);
    assert!(registry.get("b").unwrap().query("SELECT * FROM only_in_a", &[]).await.is_err());
    assert!(registry.get("zzz").is_none());

    registry.stop("a").await.unwrap();
    assert!(a.is_closed());
    assert_eq!(registry.names(), vec!["b"]);
    assert!(registry.stop("a").await.is_err());

    let b = registry.get("b").unwrap();
    registry.stop_all().await.unwrap();
    assert!(b.is_closed());
    assert!(registry.names().is_empty());
    // The name is free again.
    registry.start("a", InstanceOptions::in_memory()).await.unwrap();
    registry.stop_all().await.unwrap();
}

#[tokio::test]
async fn concurrent_starts_under_one_name_register_once() {
    let registry = Registry::new();
    let (x, y) = tokio::join!(
        registry.start("same", InstanceOptions::in_memory()),
        registry.start("same", InstanceOptions::in_memory())
    );
    assert_eq!([x.is_ok(), y.is_ok()].iter().filter(|ok| **ok).count(), 1);
    registry.stop_all().await.unwrap();
}

#[tokio::test]
async fn startup_errors_are_reported() {
    let err = Instance::start(InstanceOptions::in_memory().setting("shared_buffers", "not-a-size")).await.unwrap_err();
    assert!(matches!(err, Error::Startup(_)), "{err}");
    let file = tempfile::NamedTempFile::new().unwrap();
    let err = Instance::start(InstanceOptions::persistent(file.path())).await.unwrap_err();
    assert!(matches!(err, Error::Startup(_) | Error::DataDirInUse(_)), "{err}");
}

#[test]
fn persistence_across_processes_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pglite-cache"))
            .arg("query")
            .arg("--data")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (code, _, err) = cli(&["CREATE TABLE p (id int, v text)", "INSERT INTO p VALUES (1, 'one'), (2, 'two')"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = cli(&["--json", "SELECT * FROM p ORDER BY id"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v, serde_json::json!({"columns": ["id", "v"], "rows": [[1, "one"], [2, "two"]]}));
}

#[test]
fn cli_prints_tables_errors_and_exit_codes() {
    let bin = env!("CARGO_BIN_EXE_pglite-cache");
    let out =
        std::process::Command::new(bin).args(["query", "SELECT 1 AS n, 'x' AS s", "SELECT 2 AS n"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout, " n | s\n---+---\n 1 | x\n(1 row)\n\n n\n---\n 2\n(1 row)\n\n");

    let out = std::process::Command::new(bin).args(["query", "--json", "SELECT * FROM missing"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("ERROR:  42P01: relation \"missing\" does not exist"), "{stderr}");

    let out = std::process::Command::new(bin).args(["query"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "missing SQL is a usage error");
    let out = std::process::Command::new(bin).args(["query", "--bogus", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn instances_are_shared_across_runtimes() {
    // A handle made on one runtime works from another (current-thread) runtime.
    let rt1 = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let db = rt1.block_on(memory());
    let rt2 = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let n: i32 = rt2.block_on(db.query("SELECT 41 + 1", &[])).unwrap().rows[0].get(0);
    assert_eq!(n, 42);
    rt2.block_on(db.stop()).unwrap();
}

/// This engine cannot catch an error inside a PL/pgSQL exception block:
/// every PostgreSQL error unwinds to its main loop, past the block's
/// handler, and leaves the statement's portal marked active, so the
/// session's transaction could never end again ("cannot drop active
/// portal", then "current transaction is aborted" for every later call, of
/// every caller). The instance notices it when the transaction is rolled
/// back, answers the call with its real error, and restarts (persistent,
/// with a restart policy) with the committed data; an in-memory instance
/// reports itself crashed instead of answering wrongly.
#[tokio::test]
async fn an_error_inside_a_plpgsql_exception_block_restarts_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let policy = RestartPolicy { max_restarts: 3, within: Duration::from_secs(60) };
    let db = Instance::start(InstanceOptions::persistent(dir.path()).restart_policy(policy)).await.unwrap();
    db.exec("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await.unwrap();
    db.exec(
        "CREATE FUNCTION safe_div(a int, b int) RETURNS int LANGUAGE plpgsql AS \
         $$ BEGIN RETURN a / b; EXCEPTION WHEN division_by_zero THEN RETURN NULL; END $$",
    )
    .await
    .unwrap();

    // On its own: the caller gets the real error.
    let err = db.query("SELECT safe_div(1, 0)", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&pglite_cache::SqlState::DIVISION_BY_ZERO), "{err}");
    assert_eq!(count(&db, "t").await, 1);
    db.exec("INSERT INTO t VALUES (2)").await.unwrap();

    // Inside a transaction: its end fails, the engine restarts, the
    // transaction's writes are gone and the committed ones are there.
    let tx = db.begin().await.unwrap();
    tx.exec("INSERT INTO t VALUES (3)").await.unwrap();
    tx.query("SELECT safe_div(1, 0)", &[]).await.unwrap_err();
    tx.rollback().await.unwrap_err();
    assert_eq!(count(&db, "t").await, 2);
    assert_eq!(db.query("SELECT safe_div(6, 3)", &[]).await.unwrap().rows[0].get::<i32>(0), 2);
    db.stop().await.unwrap();

    // In memory, with a restart policy: reopened from its private directory.
    let restarting = Instance::start(InstanceOptions::in_memory().restart_policy(policy)).await.unwrap();
    restarting.exec("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await.unwrap();
    restarting.exec("DO $$ BEGIN PERFORM 1 / 0; EXCEPTION WHEN OTHERS THEN NULL; END $$").await.unwrap_err();
    assert_eq!(count(&restarting, "t").await, 1);
    restarting.stop().await.unwrap();
    // Without one: crashed, saying why.
    let crashing = memory().await;
    crashing.exec("DO $$ BEGIN PERFORM 1 / 0; EXCEPTION WHEN OTHERS THEN NULL; END $$").await.unwrap_err();
    let err = crashing.query("SELECT 1", &[]).await.unwrap_err();
    assert!(matches!(&err, Error::Crashed { reason, .. } if reason.contains("PL/pgSQL")), "{err}");
}

/// A file named `name` somewhere under `dir`.
fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir()
            && let Some(found) = find_file(&path, name)
        {
            return Some(found);
        }
    }
    None
}

/// New WAL segments are not zero-filled (`wal_init_zero = off`): with the
/// engine's `fsync = off` the fill guarantees nothing, and writing 16 MiB
/// of zeros held every client of the instance ~9 ms per segment
/// (BENCHMARKS.md, issue 10, round 8). So a segment takes the disk (or, for
/// an in-memory instance, the temporary directory's RAM) only as it fills.
#[tokio::test]
async fn new_wal_segments_take_only_what_is_written() {
    use std::os::unix::fs::MetadataExt;
    const SEGMENT: i64 = 16 << 20;
    let dir = tempfile::tempdir().unwrap();
    let db = Instance::start(InstanceOptions::persistent(dir.path())).await.unwrap();
    db.exec("CREATE TABLE w (x text)").await.unwrap();
    let position =
        format!("SELECT ((pg_current_wal_lsn() - '0/0') % {SEGMENT})::bigint, pg_walfile_name(pg_current_wal_lsn())");
    let position = position.as_str();
    let first: String = db.query(position, &[]).await.unwrap().rows[0].get(1);
    // Half a MiB of WAL at a time, until 1-8 MiB into a segment the engine created.
    let (offset, segment) = loop {
        let row = db.query(position, &[]).await.unwrap().rows.remove(0);
        let (offset, segment): (i64, String) = (row.get(0), row.get(1));
        if segment != first && (1 << 20..8 << 20).contains(&offset) {
            break (offset, segment);
        }
        db.exec("INSERT INTO w SELECT repeat(md5(g::text), 30) FROM generate_series(1, 500) g").await.unwrap();
    };
    let file = find_file(dir.path(), &segment).expect("the current WAL segment's file");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len() as i64, SEGMENT, "{}", file.display());
    let allocated = meta.blocks() as i64 * 512;
    assert!(
        allocated < offset + (4 << 20),
        "segment {segment}: {allocated} bytes allocated with {offset} written (zero-filled?)"
    );
    db.stop().await.unwrap();
}

/// Fails unless `dir` holds every relation file the engine knows of, whole.
async fn assert_whole_cluster_in(db: &Instance, dir: &std::path::Path) {
    let relations = db
        .query(
            "SELECT pg_relation_filepath(oid), pg_relation_size(oid) FROM pg_class
             WHERE pg_relation_filepath(oid) IS NOT NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .rows;
    assert!(relations.len() > 200, "{} relations", relations.len());
    db.exec("CHECKPOINT").await.unwrap();
    let cluster = find_file(dir, "pg_control").expect("the cluster's pg_control");
    let cluster = cluster.parent().and_then(|global| global.parent()).unwrap();
    let mut missing = Vec::new();
    for row in &relations {
        let (path, size): (String, i64) = (row.get(0), row.get(1));
        match std::fs::metadata(cluster.join(&path)) {
            Ok(meta) if meta.len() as i64 == size => {}
            Ok(meta) => missing.push(format!("{path}: {} bytes of {size}", meta.len())),
            Err(e) => missing.push(format!("{path}: {e}")),
        }
    }
    let some = &missing[..missing.len().min(5)];
    assert!(missing.is_empty(), "{} relation files not in the directory, e.g. {some:?}", missing.len());
}

/// A persistent directory holds every file of its cluster from the start.
/// The engine's file system otherwise copies a template file into it the
/// first time the file is written, and a `kill -9` during that copy left a
/// truncated catalog behind that failed every later start ("could not read
/// blocks 0..0 in file \"base/1/6113\"").
#[tokio::test]
async fn a_persistent_directory_holds_its_whole_cluster_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = Instance::start(InstanceOptions::persistent(dir.path())).await.unwrap();
    assert_whole_cluster_in(&db, dir.path()).await;
    db.stop().await.unwrap();
}

/// A directory that an earlier version left laid over the shared template
/// (pglite-oxide's default) gets the files it lacks, and keeps its data.
#[tokio::test]
async fn a_directory_laid_over_the_template_is_completed_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = pglite_oxide::Pglite::builder().path(dir.path()).open().unwrap();
    engine
        .exec("CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept SELECT generate_series(1, 1000)", None)
        .unwrap();
    engine.close().unwrap();
    drop(engine);
    let overlay = find_file(dir.path(), ".pglite-oxide-pgdata-overlay.json");
    assert!(overlay.is_some(), "pglite-oxide laid the directory over its template");
    let db = Instance::start(InstanceOptions::persistent(dir.path())).await.unwrap();
    assert_eq!(count(&db, "kept").await, 1000);
    assert_whole_cluster_in(&db, dir.path()).await;
    db.stop().await.unwrap();
    assert!(find_file(dir.path(), ".pglite-oxide-pgdata-overlay.json").is_none(), "no longer an overlay");
}

/// pglite-oxide rewrites a small manifest of its runtime files at every
/// start (truncate, then write); a `kill -9` in between left it empty, and
/// every later start failed with "parse runtime layout manifest ... EOF".
/// The crash's leftover is reproduced directly: the window is too small to
/// hit with a real kill.
#[tokio::test]
async fn a_start_interrupted_while_the_runtime_manifest_was_rewritten_does_not_block_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let db = Instance::start(InstanceOptions::persistent(dir.path())).await.unwrap();
    db.exec("CREATE TABLE kept (id int)").await.unwrap();
    db.stop().await.unwrap();
    let manifest = find_file(dir.path(), ".pglite-oxide-runtime-layout.json").expect("the runtime manifest");
    std::fs::write(&manifest, b"").unwrap();
    let db = Instance::start(InstanceOptions::persistent(dir.path())).await.expect("starts again");
    assert_eq!(count(&db, "kept").await, 0);
    db.stop().await.unwrap();
}

/// A new directory's lock is released explicitly, not by closing its file:
/// a process spawned by another thread at that moment shares the open file
/// until it execs, and kept the lock from pglite-oxide's open right after
/// ("already in use by another instance", seen in CI beside tests that
/// start servers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_directories_open_while_other_threads_spawn_processes() {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spawner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::process::Command::new("true").status().unwrap();
            }
        })
    };
    let dirs = tempfile::tempdir().unwrap();
    let mut refused = Vec::new();
    for i in 0..8 {
        match Instance::start(InstanceOptions::persistent(dirs.path().join(i.to_string()))).await {
            Ok(db) => db.stop().await.unwrap(),
            Err(e) => refused.push(e.to_string()),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spawner.join().unwrap();
    assert!(refused.is_empty(), "{} of 8 new directories refused: {refused:?}", refused.len());
}
