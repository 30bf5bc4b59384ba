//! The private directory of an "in-memory" instance.
//!
//! The engine keeps its files in a directory either way; an in-memory
//! instance's is private and removed when the instance ends. It is owned
//! here rather than by the engine (pglite-oxide's temporary root goes away
//! with the engine) so that the engine can be reopened from it after a
//! crash, with the committed data, as a persistent instance is. Written
//! with `std` instead of the `tempfile` crate, which the library does not
//! depend on (it is one of the command line's crates).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A new owner-only directory under the system's temporary directory,
/// removed on drop.
#[derive(Debug)]
pub(super) struct MemoryDir(PathBuf);

impl MemoryDir {
    pub(super) fn create() -> std::io::Result<MemoryDir> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pglite-cache-{}-{n}-{nanos:x}", std::process::id()));
        // `create` (not `create_dir_all`) fails if the name exists.
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(MemoryDir(path))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for MemoryDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "could not remove an in-memory instance's directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MemoryDir;

    #[test]
    fn private_unique_and_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let a = MemoryDir::create().unwrap();
        let b = MemoryDir::create().unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(std::fs::metadata(a.path()).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::write(a.path().join("file"), b"x").unwrap();
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
    }
}
