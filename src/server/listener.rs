//! The sockets a server accepts connections on.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

/// A bound listener: TCP, or a Unix socket named the way libpq expects.
#[derive(Debug)]
pub enum Listener {
    /// TCP; connections must authenticate if a password is configured.
    Tcp(TcpListener),
    /// A Unix socket; its path is removed when the server stops.
    Unix {
        /// The listener.
        listener: UnixListener,
        /// `<dir>/.s.PGSQL.<port>`.
        path: PathBuf,
    },
}

/// Where a listener listens, for humans.
impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => write!(f, "tcp://{addr}"),
                Err(_) => write!(f, "tcp://?"),
            },
            Listener::Unix { path, .. } => write!(f, "unix://{}", path.display()),
        }
    }
}

impl Listener {
    /// Binds `<dir>/.s.PGSQL.<port>`, so that `psql -h <dir> -p <port>`
    /// connects. A missing `dir` is created with owner-only permissions
    /// (0700); the socket itself is made owner-only (0600) too. A stale socket
    /// file (nobody listening) is replaced; a live one is an error.
    pub fn bind_unix(dir: &Path, port: u16) -> io::Result<Listener> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let path = dir.join(format!(".s.PGSQL.{port}"));
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another server", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Listener::Unix { listener, path })
    }

    /// Binds a TCP address (use port 0 for any free port).
    pub async fn bind_tcp(addr: impl tokio::net::ToSocketAddrs) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// The TCP address, for TCP listeners.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix { .. } => None,
        }
    }

    /// Whether connections on this listener are trusted (no password).
    pub(crate) fn is_trusted(&self) -> bool {
        matches!(self, Listener::Unix { .. })
    }

    pub(crate) async fn accept(&self) -> io::Result<Box<dyn ClientStreamObj>> {
        match self {
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                stream.set_nodelay(true)?;
                Ok(Box::new(stream))
            }
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                Ok(Box::new(stream))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Object-safe client stream.
pub(crate) trait ClientStreamObj: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStreamObj for T {}
