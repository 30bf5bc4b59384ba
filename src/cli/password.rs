//! The generated TCP password: created owner-only at first start, reused
//! afterwards.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::Rng;

/// Where the generated password lives: in the data directory when there is
/// one, else next to the Unix socket, else in the temporary directory.
pub fn location(data: Option<&Path>, socket_dir: Option<&Path>, port: u16) -> PathBuf {
    match (data, socket_dir) {
        (Some(dir), _) => dir.join("wire-password"),
        (None, Some(dir)) => dir.join(format!(".s.PGSQL.{port}.password")),
        (None, None) => std::env::temp_dir().join(format!("pglite-cache-{port}.password")),
    }
}

/// Reads the password stored at `path`, or creates one there (mode 0600,
/// never through an existing file or symlink). A stored file that others
/// may read is refused.
pub fn load_or_create(path: &Path) -> Result<String, String> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.is_file() || meta.mode() & 0o077 != 0 {
                return Err(format!("{shown} must be a regular file readable by its owner only (chmod 600)"));
            }
            let text = std::fs::read_to_string(path).map_err(|e| format!("reading {shown}: {e}"))?;
            let password = text.lines().next().unwrap_or("").to_owned();
            if password.is_empty() {
                return Err(format!("{shown} holds no password"));
            }
            Ok(password)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            let mut bytes = [0u8; 24];
            rand::rng().fill_bytes(&mut bytes);
            let password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("creating {shown}: {e}"))?;
            writeln!(file, "{password}").map_err(|e| format!("writing {shown}: {e}"))?;
            Ok(password)
        }
        Err(e) => Err(format!("reading {shown}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_owner_only_then_reuses_and_refuses_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = location(Some(dir.path()), None, 5432);
        let first = load_or_create(&path).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), first);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert!(load_or_create(&path).unwrap_err().contains("chmod 600"));
    }
}
