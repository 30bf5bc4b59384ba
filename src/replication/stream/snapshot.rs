//! Snapshots in the JetStream object store (bucket `<stream>_snapshots`):
//! a closed cache's whole data directory as a zstd-compressed tar, named by
//! the stream position it continues from (`snapshot-<resume seq>`), with that
//! position and the applied LSN as metadata. The bookkeeping inside it
//! (`pglite_cache.replication`, `pglite_cache.stream`) carries the same
//! position, so a cache unpacked from it resumes like one that was stopped.
//!
//! Physical: the fastest way in (no SQL replay) and exact (indexes,
//! read-only triggers, bookkeeping); it loads only on the same engine
//! version, which the metadata records and a cache checks before use.

use std::path::{Path, PathBuf};

use async_nats::jetstream::{self, object_store};
use futures_util::StreamExt;

use crate::replication::error::ReplicationError;
use crate::replication::lsn::Lsn;

use super::nats::{StreamConfig, transient};

/// The archive format and engine a snapshot needs.
const FORMAT: &str = "pglite-dir.tar.zst/1";
const ENGINE: &str = "pglite-oxide-0.5";

/// Snapshots kept in the bucket (older ones are deleted).
const KEEP: usize = 2;

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Object name.
    pub name: String,
    /// The first stream sequence not in it.
    pub resume_seq: u64,
    /// Everything up to this remote LSN is in it.
    pub applied_lsn: Lsn,
    /// Compressed size.
    pub size: usize,
}

async fn bucket(
    js: &jetstream::Context,
    config: &StreamConfig,
    create: bool,
) -> Result<Option<object_store::ObjectStore>, ReplicationError> {
    match js.get_object_store(config.bucket()).await {
        Ok(store) => Ok(Some(store)),
        Err(_) if create => js
            .create_object_store(object_store::Config {
                bucket: config.bucket(),
                description: Some("pglite-cache fan-out snapshots".into()),
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map(Some)
            .map_err(|e| transient("creating the snapshot bucket", e)),
        Err(e) if e.to_string().contains("not found") || e.to_string().contains("failed to get") => Ok(None),
        Err(e) => Err(transient("opening the snapshot bucket", e)),
    }
}

/// The newest snapshot, if any.
pub async fn newest(js: &jetstream::Context, config: &StreamConfig) -> Result<Option<SnapshotInfo>, ReplicationError> {
    Ok(list(js, config).await?.pop())
}

/// Every usable snapshot, oldest first.
/// How long one listing of the snapshots may take.
const LIST_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

async fn list(js: &jetstream::Context, config: &StreamConfig) -> Result<Vec<SnapshotInfo>, ReplicationError> {
    let Some(store) = bucket(js, config, false).await? else {
        return Ok(Vec::new());
    };
    // The client's listing ends at the entry it counted as last when it
    // began; one deleted meanwhile (an older snapshot going while a new one
    // is stored) is never delivered, and the listing would wait forever.
    // So a stalled listing starts over.
    let mut attempt = 0;
    loop {
        match tokio::time::timeout(LIST_LIMIT, list_once(&store)).await {
            Ok(listed) => return listed,
            Err(_) if attempt < 3 => {
                attempt += 1;
                tracing::debug!(attempt, "listing snapshots stalled (an entry deleted meanwhile); listing again");
            }
            Err(_) => return Err(ReplicationError::transient("listing snapshots: no answer from the object store")),
        }
    }
}

async fn list_once(store: &object_store::ObjectStore) -> Result<Vec<SnapshotInfo>, ReplicationError> {
    let mut objects = store.list().await.map_err(|e| transient("listing snapshots", e))?;
    let mut found = Vec::new();
    while let Some(object) = objects.next().await {
        let object = object.map_err(|e| transient("listing snapshots", e))?;
        if object.deleted || object.metadata.get("format").map(String::as_str) != Some(FORMAT) {
            continue;
        }
        if object.metadata.get("engine").map(String::as_str) != Some(ENGINE) {
            tracing::warn!(snapshot = %object.name, engine = ?object.metadata.get("engine"), "snapshot of another engine version; ignored");
            continue;
        }
        let resume_seq = object.metadata.get("resume_seq").and_then(|s| s.parse().ok());
        let applied_lsn = object.metadata.get("applied_lsn").and_then(|s| s.parse().ok());
        if let (Some(resume_seq), Some(applied_lsn)) = (resume_seq, applied_lsn) {
            found.push(SnapshotInfo { name: object.name, resume_seq, applied_lsn, size: object.size });
        }
    }
    found.sort_by_key(|s| s.resume_seq);
    Ok(found)
}

/// Archives `data` (a closed cache) and stores it; deletes older snapshots
/// beyond the newest `KEEP` (2).
pub async fn store(
    js: &jetstream::Context,
    config: &StreamConfig,
    data: &Path,
    resume_seq: u64,
    applied_lsn: Lsn,
) -> Result<SnapshotInfo, ReplicationError> {
    let started = std::time::Instant::now();
    let dir = data.to_owned();
    let archive = tokio::task::spawn_blocking(move || pack(&dir))
        .await
        .map_err(|e| ReplicationError::fatal(format!("archiving task failed: {e}")))??;
    let store = bucket(js, config, true).await?.expect("created");
    let name = format!("snapshot-{resume_seq:020}");
    let meta = object_store::ObjectMetadata {
        name: name.clone(),
        description: Some(format!("cache at stream sequence {resume_seq}, remote LSN {applied_lsn}")),
        chunk_size: Some(256 << 10),
        metadata: [
            ("format", FORMAT.to_owned()),
            ("engine", ENGINE.to_owned()),
            ("resume_seq", resume_seq.to_string()),
            ("applied_lsn", applied_lsn.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        headers: None,
    };
    let mut file = tokio::fs::File::open(archive.path()).await?;
    let info = store.put(meta, &mut file).await.map_err(|e| transient("storing a snapshot", e))?;
    tracing::info!(snapshot = %name, bytes = info.size, elapsed = ?started.elapsed(), "snapshot stored");
    let all = list(js, config).await?;
    for old in all.iter().take(all.len().saturating_sub(KEEP)) {
        if let Err(e) = store.delete(&old.name).await {
            tracing::warn!(snapshot = %old.name, error = %e, "could not delete an old snapshot");
        }
    }
    Ok(SnapshotInfo { name, resume_seq, applied_lsn, size: info.size })
}

/// A download that receives nothing for this long is abandoned: e.g. the
/// publisher deleted that snapshot meanwhile (it keeps the newest [`KEEP`]),
/// which leaves the object's reader waiting for ever.
const READ_STALL: std::time::Duration = std::time::Duration::from_secs(20);

/// Downloads tried before giving up (each from the newest snapshot then).
const ATTEMPTS: u32 = 3;

/// Unpacks the newest snapshot into `data` (missing or empty). Fails
/// (transient: the publisher may not have stored one yet) without a snapshot.
/// A download that fails or stalls starts again from the newest snapshot (a
/// failed one leaves `data` as it was: unpacking goes through a staging
/// directory).
pub async fn restore(
    js: &jetstream::Context,
    config: &StreamConfig,
    data: &Path,
) -> Result<SnapshotInfo, ReplicationError> {
    let mut attempt = 1;
    loop {
        match restore_newest(js, config, data).await {
            Err(e) if attempt < ATTEMPTS && e.kind() == crate::replication::ErrorKind::Transient => {
                tracing::warn!(error = %e, attempt, "snapshot download failed; trying the newest snapshot again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn restore_newest(
    js: &jetstream::Context,
    config: &StreamConfig,
    data: &Path,
) -> Result<SnapshotInfo, ReplicationError> {
    let snapshot = newest(js, config).await?.ok_or_else(|| {
        ReplicationError::transient(format!("no snapshot in {} yet", config.bucket()))
            .with_hint("the publisher stores one after its initial copy")
    })?;
    let started = std::time::Instant::now();
    let store = bucket(js, config, false).await?.ok_or_else(|| ReplicationError::transient("snapshot bucket gone"))?;
    let mut object = store.get(&snapshot.name).await.map_err(|e| transient("reading a snapshot", e))?;
    // Unpacked while it downloads: a blocking thread reads what arrives.
    let (chunks, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(16);
    let target: PathBuf = data.to_owned();
    let unpacking =
        tokio::task::spawn_blocking(move || unpack(ChannelReader { rx, current: bytes::Bytes::new() }, &target));
    loop {
        let mut buf = bytes::BytesMut::with_capacity(256 << 10);
        let read = tokio::time::timeout(READ_STALL, tokio::io::AsyncReadExt::read_buf(&mut object, &mut buf)).await;
        let Ok(read) = read else {
            drop(chunks); // the unpacker stops at a truncated archive
            let _ = unpacking.await;
            return Err(ReplicationError::transient(format!(
                "downloading snapshot {} stalled for {READ_STALL:?} (deleted meanwhile?)",
                snapshot.name
            )));
        };
        match read {
            Ok(0) => break,
            Ok(_) => {
                if chunks.send(Ok(buf.freeze())).await.is_err() {
                    break; // the unpacker failed; its error says why
                }
            }
            Err(e) => {
                let _ = chunks.send(Err(std::io::Error::other(e.to_string()))).await;
                break;
            }
        }
    }
    drop(chunks);
    unpacking.await.map_err(|e| ReplicationError::fatal(format!("unpacking task failed: {e}")))??;
    tracing::info!(snapshot = %snapshot.name, bytes = snapshot.size, elapsed = ?started.elapsed(), "cache restored from a snapshot");
    Ok(snapshot)
}

fn pack(dir: &Path) -> Result<tempfile::NamedTempFile, ReplicationError> {
    let out = tempfile::NamedTempFile::new()?;
    let encoder = zstd::Encoder::new(out.reopen()?, 3)?.auto_finish();
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)?;
    tar.into_inner()?;
    Ok(out)
}

/// A blocking reader over chunks sent from async code.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

fn unpack(archive: impl std::io::Read, dir: &Path) -> Result<(), ReplicationError> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        return Err(ReplicationError::needs_operator(
            format!("{} is not empty", dir.display()),
            "restore a snapshot into a new or empty directory",
        ));
    }
    // Unpacked beside the target, then renamed: a crash leaves no half cache.
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new().prefix(".pglite-cache-restore-").tempdir_in(parent)?;
    let decoder = zstd::Decoder::new(archive)?;
    tar::Archive::new(decoder).unpack(staging.path())?;
    if dir.exists() {
        std::fs::remove_dir(dir)?;
    }
    std::fs::rename(staging.keep(), dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_keep_every_file() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("base/1")).unwrap();
        std::fs::write(src.path().join("base/1/1259"), vec![7u8; 100_000]).unwrap();
        std::fs::write(src.path().join("PG_VERSION"), "17\n").unwrap();
        let archive = pack(src.path()).unwrap();
        let parent = tempfile::tempdir().unwrap();
        let target = parent.path().join("cache");
        unpack(std::fs::File::open(archive.path()).unwrap(), &target).unwrap();
        assert_eq!(std::fs::read(target.join("base/1/1259")).unwrap(), vec![7u8; 100_000]);
        assert_eq!(std::fs::read_to_string(target.join("PG_VERSION")).unwrap(), "17\n");
        assert!(unpack(std::fs::File::open(archive.path()).unwrap(), &target).is_err(), "never over an existing cache");
    }
}
