//! A persistent instance's directory holds its whole cluster.
//!
//! pglite-oxide lays a new directory over a shared, read-only template of
//! the cluster (in the user's cache) and copies a template file into the
//! directory the first time the engine opens it for writing. That copy is
//! not atomic: a `kill -9` during it left a truncated catalog that shadowed
//! the template's and failed every later start ("could not read blocks 0..0
//! in file \"base/1/6113\""). The directory also depended on a cache that
//! another user, a clean-up or an upgrade of pglite-oxide can take away.
//!
//! So before the engine opens a directory, this module makes it standalone:
//! a new directory gets the whole template at once (unpacked beside it,
//! then renamed into place), and a directory laid over the template by an
//! earlier version gets the template files it lacks, each by an atomic
//! rename, before the overlay's manifest is removed. pglite-oxide then opens
//! it as a plain cluster. A crash at any step leaves either the overlay or
//! the complete cluster, and the next start finishes the job. (pglite-oxide
//! offers no option for a full copy; its own clone, used when the overlay
//! is off, is the same unpack without the atomic promotion.)
//!
//! pglite-oxide also rewrites a small manifest of its runtime files at
//! every start (truncate, then write). One left empty by a crash failed
//! every later start ("parse runtime layout manifest"); it is removed, and
//! pglite-oxide writes it again.
//!
//! What this cannot mend: a directory that an earlier version already left
//! with a truncated copy. Such a file is not told apart from one the engine
//! has since written.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Instant;

use pglite_oxide::{PgDataTemplateManifest, PglitePaths};

use crate::error::{Error, Result};

/// pglite-oxide's marker of a directory laid over the shared template.
const OVERLAY_MANIFEST: &str = ".pglite-oxide-pgdata-overlay.json";
/// The overlay's mark of a template file the engine has deleted.
const WHITEOUT_PREFIX: &str = ".wh.";
/// pglite-oxide's manifest of the runtime files, rewritten at each start.
/// Without one it tells the layout from a marker file.
const RUNTIME_MANIFEST: &str = ".pglite-oxide-runtime-layout.json";

/// Readies the directory `root` of a persistent instance for the engine:
/// standalone, and without a torn runtime manifest; see the module's
/// documentation. Cheap when it is ready: a few `stat`s and one small read.
pub(super) fn prepare(root: &Path) -> Result<()> {
    let pgdata = PglitePaths::with_root(root).pgdata;
    let overlay = pgdata.join(OVERLAY_MANIFEST);
    let parent = pgdata.parent().expect("PGDATA has a parent");
    let staging = parent.join(".pglite-cache-template");
    let runtime_manifest = parent.join(RUNTIME_MANIFEST);
    let standalone = || !overlay.exists() && is_complete(&pgdata);
    if standalone() && !staging.exists() && !is_torn(&runtime_manifest) {
        return Ok(());
    }
    let started = Instant::now();
    fs::create_dir_all(parent).map_err(|e| startup(format!("create {}", parent.display()), e))?;
    let _lock = DirLock::take(root)?;
    if is_torn(&runtime_manifest) {
        tracing::warn!(file = %runtime_manifest.display(), "removing a runtime manifest torn by a crash");
        remove_all(&runtime_manifest).map_err(|e| startup(format!("remove {}", runtime_manifest.display()), e))?;
    }
    let remove_staging = || remove_all(&staging).map_err(|e| startup(format!("remove {}", staging.display()), e));
    if standalone() {
        return remove_staging(); // what a crash after the last step left
    }
    let template = unpack_template(&staging)?;
    let outcome = if overlay.exists() {
        if overlay_template(&overlay)? != template.archive_sha256 {
            // Another template: pglite-oxide refuses it with its own message.
            return remove_staging();
        }
        // The template's copies in the user's cache stop counting when the
        // manifest goes: what moved must be on disk first.
        merge(&staging.join("base"), &pgdata)
            .and_then(|()| sync(&pgdata))
            .and_then(|()| fs::remove_file(&overlay))
            .and_then(|()| remove_whiteouts(&pgdata))
            .and_then(|()| sync(&pgdata))
            .map(|()| "the template's missing files moved into an overlaid directory")
    } else {
        // No `syncfs` here: a new directory's files are as durable as the
        // engine's own first writes, which only the next sync makes durable
        // (`Instance::sync_to_disk`, a confirmed position); and a `syncfs`
        // waits for every dirty page of the file system (measured: 0.74 s
        // next to a publisher that had just loaded 300k rows).
        remove_all(&pgdata)
            .and_then(|()| fs::rename(staging.join("base"), &pgdata))
            .map(|()| "a new directory got the whole template")
    };
    outcome.map_err(|e| startup(format!("make {} standalone", pgdata.display()), e)).and_then(|outcome| {
        remove_staging()?;
        tracing::info!(dir = %root.display(), elapsed = ?started.elapsed(), "{outcome}");
        Ok(())
    })
}

/// The lock pglite-oxide takes when it opens the directory: nothing may run
/// on the files while they are moved.
struct DirLock(fs::File);

impl DirLock {
    fn take(root: &Path) -> Result<DirLock> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join(".pglite-oxide.lock"))
            .map_err(|e| startup(format!("open the lock in {}", root.display()), e))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock(file)),
            Err(fs::TryLockError::WouldBlock) => Err(Error::DataDirInUse(root.to_path_buf())),
            Err(fs::TryLockError::Error(e)) => Err(startup(format!("lock {}", root.display()), e)),
        }
    }
}

impl Drop for DirLock {
    /// Unlocked explicitly, not by closing the file: a child process forked
    /// meanwhile (by another thread) shares the open file until it execs,
    /// and would keep the lock from pglite-oxide's open right after
    /// (seen in CI: "already in use by another instance").
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn startup(what: String, e: io::Error) -> Error {
    Error::Startup(format!("{what}: {e}"))
}

/// A file that is there but is not JSON: cut short.
fn is_torn(manifest: &Path) -> bool {
    fs::read(manifest).is_ok_and(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).is_err())
}

/// pglite-oxide's own test of a complete cluster.
fn is_complete(pgdata: &Path) -> bool {
    pgdata.join("PG_VERSION").is_file() && pgdata.join("global/pg_control").is_file()
}

/// Unpacks the engine's cluster template into `staging/base`; returns its
/// manifest.
fn unpack_template(staging: &Path) -> Result<PgDataTemplateManifest> {
    let failed = |what: &str, e: &dyn std::fmt::Display| Error::Startup(format!("{what} the cluster template: {e}"));
    remove_all(staging).map_err(|e| failed("clear a stale copy of", &e))?;
    let exported = pglite_oxide::build_pgdata_template(staging).map_err(|e| failed("export", &format!("{e:#}")))?;
    let manifest = fs::read(&exported.manifest_path).map_err(|e| failed("read", &e))?;
    let manifest: PgDataTemplateManifest = serde_json::from_slice(&manifest).map_err(|e| failed("parse", &e))?;
    let archive = fs::File::open(&exported.archive_path).map_err(|e| failed("open", &e))?;
    let decoder = zstd::Decoder::new(archive).map_err(|e| failed("decompress", &e))?;
    let base = staging.join("base");
    unpack(decoder, &base).map_err(|e| failed("unpack", &e))?;
    fs::remove_file(&exported.archive_path).map_err(|e| failed("remove", &e))?;
    // A template's `postmaster.pid`, if it had one, pglite-oxide removes
    // when it opens the directory.
    if !is_complete(&base) {
        return Err(failed("check", &"no PG_VERSION or global/pg_control in it"));
    }
    Ok(manifest)
}

/// Unpacks a tar archive of directories and regular files into `dest`.
/// `tar`'s own `unpack` creates the files one after another, and next to a
/// database flushing its writes a creation can wait ~1 ms on the file
/// system's journal. So the files are written by a few threads. Measured
/// (ext4, right after 300 MB were written): one writer 86-941 ms for the
/// template's 970 files (2 runs of 5 over 600 ms), four 93-576 ms (1 over
/// 200 ms); on a quiet disk both ~65 ms.
fn unpack(archive: impl io::Read, dest: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut files = Vec::new();
    for entry in tar::Archive::new(archive).entries()? {
        let mut entry = entry?;
        let relative = entry.path()?.into_owned();
        if !relative.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir)) {
            return Err(io::Error::other(format!("unsafe path {} in the template", relative.display())));
        }
        let path = dest.join(&relative);
        match entry.header().entry_type() {
            tar::EntryType::Directory => fs::create_dir_all(&path)?,
            tar::EntryType::Regular => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                let mode = entry.header().mode()?;
                let mut bytes = Vec::with_capacity(entry.size() as usize);
                io::Read::read_to_end(&mut entry, &mut bytes)?;
                files.push((path, mode, bytes));
            }
            other => return Err(io::Error::other(format!("{other:?} entry {} in the template", relative.display()))),
        }
    }
    let write = |(path, mode, bytes): &(std::path::PathBuf, u32, Vec<u8>)| {
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(*mode).open(path)?;
        io::Write::write_all(&mut file, bytes)
    };
    const WRITERS: usize = 4;
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|i| {
                let files = &files;
                scope.spawn(move || files.iter().skip(i).step_by(WRITERS).try_for_each(write))
            })
            .collect();
        writers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|_| Err(io::Error::other("a writer panicked"))))
    })
}

/// The template an overlaid directory was laid over.
fn overlay_template(manifest: &Path) -> Result<String> {
    let text = fs::read(manifest).map_err(|e| startup(format!("read {}", manifest.display()), e))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::Startup(format!("parse {}: {e}", manifest.display())))?;
    Ok(value["templateArchiveSha256"].as_str().unwrap_or_default().to_owned())
}

/// Moves into `upper` each entry of `lower` that the overlay would have
/// shown: not in `upper` and not deleted there (a whiteout). Each move is a
/// rename, so a crash leaves every file whole, in one tree or the other.
fn merge(lower: &Path, upper: &Path) -> io::Result<()> {
    for entry in fs::read_dir(lower)? {
        let entry = entry?;
        let name = entry.file_name();
        let mut whiteout = std::ffi::OsString::from(WHITEOUT_PREFIX);
        whiteout.push(&name);
        if upper.join(whiteout).exists() {
            continue;
        }
        let (from, to) = (entry.path(), upper.join(&name));
        match fs::symlink_metadata(&to) {
            Ok(meta) if meta.is_dir() && entry.file_type()?.is_dir() => merge(&from, &to)?,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(&from, &to)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes the overlay's whiteouts, which mean nothing once it is gone.
fn remove_whiteouts(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().as_encoded_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
            remove_all(&entry.path())?;
        } else if entry.file_type()?.is_dir() {
            remove_whiteouts(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_all(path: &Path) -> io::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `syncfs(2)` on the file system holding `path`: the moved files are on
/// disk before the step that makes them the only copy.
fn sync(path: &Path) -> io::Result<()> {
    let dir = fs::File::open(path)?;
    rustix::fs::syncfs(&dir).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> Option<String> {
        fs::read_to_string(path).ok()
    }

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, bytes) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o600);
            // `append_data` refuses `..`; a hostile archive would not.
            header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *bytes).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn unpack_writes_every_file_and_refuses_paths_out_of_the_directory() {
        let dir = std::env::temp_dir().join(format!("pglite-cache-unpack-{}", std::process::id()));
        remove_all(&dir).unwrap();
        let files: Vec<(String, Vec<u8>)> =
            (0..50).map(|i| (format!("base/{}/{i}", i % 3), vec![i as u8; i * 100])).collect();
        let entries: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (p.as_str(), b.as_slice())).collect();
        unpack(&archive(&entries)[..], &dir).unwrap();
        for (path, bytes) in &files {
            assert_eq!(&fs::read(dir.join(path)).unwrap(), bytes, "{path}");
        }
        let err = unpack(&archive(&[("../escaped", b"x")])[..], &dir.join("other")).unwrap_err();
        assert!(err.to_string().contains("unsafe path"), "{err}");
        assert!(!dir.join("escaped").exists());
        remove_all(&dir).unwrap();
    }

    #[test]
    fn merge_keeps_the_upper_files_and_honours_whiteouts() {
        let dir = std::env::temp_dir().join(format!("pglite-cache-merge-{}", std::process::id()));
        let (lower, upper) = (dir.join("lower"), dir.join("upper"));
        remove_all(&dir).unwrap();
        write(&lower.join("global/pg_control"), "template control");
        write(&lower.join("base/1/1249"), "template attribute");
        write(&lower.join("base/1/2600"), "template deleted");
        write(&lower.join("base/5/1"), "template database");
        write(&lower.join("pg_stat/gone/x"), "template tree");
        write(&upper.join("global/pg_control"), "written control");
        write(&upper.join("base/1/.wh.2600"), "");
        write(&upper.join("pg_stat/.wh.gone"), "");
        merge(&lower, &upper).unwrap();
        remove_whiteouts(&upper).unwrap();
        assert_eq!(read(&upper.join("global/pg_control")).as_deref(), Some("written control"));
        assert_eq!(read(&upper.join("base/1/1249")).as_deref(), Some("template attribute"));
        assert_eq!(read(&upper.join("base/5/1")).as_deref(), Some("template database"));
        assert!(!upper.join("base/1/2600").exists(), "a deleted file stays deleted");
        assert!(!upper.join("pg_stat/gone").exists(), "a deleted tree stays deleted");
        assert!(!upper.join("base/1/.wh.2600").exists() && !upper.join("pg_stat/.wh.gone").exists());
        remove_all(&dir).unwrap();
    }
}
