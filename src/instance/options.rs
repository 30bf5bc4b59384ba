//! How an instance is started.

use std::path::PathBuf;
use std::time::Duration;

/// Where an instance keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// Throwaway: a private temporary directory, removed when the instance stops.
    Memory,
    /// A persistent data directory, created on first start and reopened later.
    Directory(PathBuf),
}

/// Reopen a crashed instance from its directory (committed data is kept;
/// sessions and uncommitted work are not), at most `max_restarts` times
/// within any window of `within` (the origin's supervisor semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed per window.
    pub max_restarts: u32,
    /// The window length.
    pub within: Duration,
}

impl Default for RestartPolicy {
    /// Three restarts per five seconds, like OTP's default supervisor intensity.
    fn default() -> Self {
        RestartPolicy { max_restarts: 3, within: Duration::from_secs(5) }
    }
}

/// PostgreSQL settings applied unless the caller sets them:
/// - small buffers, so an idle instance stays well under 64 MiB of RSS
///   (PGlite's default `shared_buffers` of 128MB costs ~180 MB per instance);
/// - new WAL segments not zero-filled: the fill only matters where WAL is
///   `fsync`ed, which the engine never does (see [`InstanceOptions::persistent`]);
///   writing a segment's 16 MiB of zeros held every client ~9 ms, and took
///   16 MiB of disk (or of an in-memory instance's temporary directory)
///   before any WAL was in it.
pub const DEFAULT_SETTINGS: &[(&str, &str)] = &[("shared_buffers", "8MB"), ("wal_init_zero", "off")];

/// Options for [`Instance::start`](crate::Instance::start).
#[derive(Debug, Clone)]
pub struct InstanceOptions {
    pub(crate) storage: Storage,
    pub(crate) name: Option<String>,
    pub(crate) settings: Vec<(String, String)>,
    pub(crate) restart: Option<RestartPolicy>,
}

impl InstanceOptions {
    /// A throwaway instance.
    pub fn in_memory() -> Self {
        Self::new(Storage::Memory)
    }

    /// A persistent instance in `dir`.
    ///
    /// The engine runs with `fsync = off` (started with `-F`), and turning
    /// it on does not help: its writes go straight to the host file
    /// (`pwrite`), its `fsync` becomes a no-op flush, and an `fsync` of a
    /// directory fails with `EISDIR`, which makes PostgreSQL panic at the
    /// next checkpoint. Commits are in the host's page cache when they
    /// return; [`Instance::sync_to_disk`](crate::Instance::sync_to_disk)
    /// puts them on stable storage.
    pub fn persistent(dir: impl Into<PathBuf>) -> Self {
        Self::new(Storage::Directory(dir.into()))
    }

    fn new(storage: Storage) -> Self {
        InstanceOptions {
            storage,
            name: None,
            settings: DEFAULT_SETTINGS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            restart: None,
        }
    }

    /// A name used in logs, errors and the worker thread's name (the
    /// [`Registry`](crate::Registry) also uses it to find the instance).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// A PostgreSQL setting (GUC) applied at startup, e.g. `("work_mem", "8MB")`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        self.settings.retain(|(k, _)| *k != name);
        self.settings.push((name, value.into()));
        self
    }

    /// Reopen the instance when its engine crashes. An in-memory instance is
    /// reopened from its private directory too, with what it had committed.
    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.restart = Some(policy);
        self
    }

    /// Where the data lives.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The label used in logs and errors: the name, else the directory, else `memory`.
    pub(crate) fn label(&self) -> String {
        match (&self.name, &self.storage) {
            (Some(name), _) => name.clone(),
            (None, Storage::Directory(dir)) => dir.display().to_string(),
            (None, Storage::Memory) => "memory".into(),
        }
    }
}
