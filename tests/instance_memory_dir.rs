//! An in-memory instance keeps its files in a private directory of its own
//! (so that it can be reopened after a crash) and removes it when it ends.
//! Alone in its test binary: the directories are counted per process.

use pglite_cache::{Instance, InstanceOptions, RestartPolicy};

/// In-memory instances' private directories of this process.
fn memory_dirs() -> Vec<std::path::PathBuf> {
    let prefix = format!("pglite-cache-{}-", std::process::id());
    let mut dirs: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

#[tokio::test]
async fn an_in_memory_instance_leaves_no_directory_behind() {
    assert!(memory_dirs().is_empty());
    let db = Instance::start(InstanceOptions::in_memory().restart_policy(RestartPolicy::default())).await.unwrap();
    db.exec("CREATE TABLE t (id int)").await.unwrap();
    let dirs = memory_dirs();
    assert_eq!(dirs.len(), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&dirs[0]).unwrap().permissions().mode() & 0o777, 0o700);
    // Reopened after a crash from the same directory, then removed on stop.
    db.inject_crash().await.unwrap_err();
    assert_eq!(db.query("SELECT count(*) FROM t", &[]).await.unwrap().rows[0].get::<i64>(0), 0);
    assert_eq!(memory_dirs(), dirs);
    db.stop().await.unwrap();
    assert!(memory_dirs().is_empty());
    // Dropping the last handle ends it too.
    let db = Instance::start(InstanceOptions::in_memory()).await.unwrap();
    db.exec("SELECT 1").await.unwrap();
    assert_eq!(memory_dirs().len(), 1);
    drop(db);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !memory_dirs().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the directory outlived its instance");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
