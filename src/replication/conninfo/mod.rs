//! Connection settings the way libpq resolves them.
//!
//! For each keyword the first of these that has it wins (libpq's order):
//! 1. the connection string (a URL or `key=value` list);
//! 2. the service named by `service=` or `PGSERVICE`, from `PGSERVICEFILE`
//!    (default `~/.pg_service.conf`), else from `PGSYSCONFDIR/pg_service.conf`;
//! 3. the environment: `PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
//!    `PGPASSFILE`, `PGDATABASE`, `PGOPTIONS`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`,
//!    `PGSSLMODE`, `PGSSLROOTCERT`, `PGTARGETSESSIONATTRS`, `PGCHANNELBINDING`;
//! 4. defaults: the user is the operating-system user.
//!
//! A password still missing (or empty) then comes from the password file
//! (`passfile=`, `PGPASSFILE`, default `~/.pgpass`), matched on the first
//! host, the port, the database and the user; a file that group or others
//! can read is ignored with a warning, as libpq does.
//!
//! [`resolve`] is the pure core: the environment and files come in through
//! [`System`]. [`resolve_from_process`] is the thin shell over the real ones.
//! Nothing here puts a password into an error or a warning.

mod parse;
mod pgpass;
mod service;

use std::path::{Path, PathBuf};

pub use parse::Params;

use super::config::SourceConfig;
use super::error::ReplicationError;
use super::tls::TlsMode;

/// Keyword → the environment variable libpq reads for it.
const ENV: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("passfile", "PGPASSFILE"),
    ("dbname", "PGDATABASE"),
    ("options", "PGOPTIONS"),
    ("application_name", "PGAPPNAME"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("channel_binding", "PGCHANNELBINDING"),
];

/// libpq's system configuration directory when `PGSYSCONFDIR` is unset
/// (Debian's and Ubuntu's build of libpq; others use `/etc` or their prefix).
const DEFAULT_SYSCONFDIR: &str = "/etc/postgresql-common";

/// A file as the resolution needs it.
#[derive(Debug, Clone)]
pub struct FileText {
    /// The contents.
    pub text: String,
    /// Whether it is a regular file.
    pub is_file: bool,
    /// Permission bits (`st_mode & 0o777`).
    pub mode: u32,
}

/// What the resolution reads from outside: the environment, files and the
/// operating-system user. Tests pass maps; [`resolve_from_process`] passes
/// the real ones.
pub struct System<'a> {
    /// An environment variable, if set.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// A file, `None` if it cannot be read.
    pub file: &'a dyn Fn(&Path) -> Option<FileText>,
    /// The operating-system user name (libpq's default user).
    pub os_user: Option<String>,
}

/// Where the password came from (never the password itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// No password: the remote must not ask for one (trust, peer, cert).
    None,
    /// The connection string (`--source` or `--source-file`).
    ConnectionString,
    /// The service file.
    Service,
    /// `PGPASSWORD`.
    Environment,
    /// This password file.
    PasswordFile(PathBuf),
}

impl std::fmt::Display for PasswordSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PasswordSource::None => f.write_str("none"),
            PasswordSource::ConnectionString => f.write_str("the connection string"),
            PasswordSource::Service => f.write_str("the service file"),
            PasswordSource::Environment => f.write_str("PGPASSWORD"),
            PasswordSource::PasswordFile(path) => write!(f, "the password file {}", path.display()),
        }
    }
}

/// The settings once every source has been consulted.
#[derive(Clone)]
pub struct Resolved {
    params: Params,
    /// Where the password came from.
    pub password_source: PasswordSource,
    /// What libpq would warn about (an ignored password file); no secrets.
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Params = self
            .params
            .iter()
            .map(|(k, v)| (k.clone(), if k == "password" { "_".into() } else { v.clone() }))
            .collect();
        f.debug_struct("Resolved")
            .field("params", &shown)
            .field("password_source", &self.password_source)
            .field("warnings", &self.warnings)
            .finish()
    }
}

impl Resolved {
    /// The value of a keyword, if set (non-empty).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// The source config for these settings.
    pub fn source_config(&self) -> Result<SourceConfig, ReplicationError> {
        source_config(&self.params)
    }
}

/// Resolves `conninfo` against the service file, the environment, the
/// defaults and the password file (see the module docs for the order).
pub fn resolve(conninfo: &str, sys: &System) -> Result<Resolved, ReplicationError> {
    let mut params = parse::parse(conninfo).map_err(invalid)?;
    let mut password_source = PasswordSource::None;
    if params.contains_key("password") {
        password_source = PasswordSource::ConnectionString;
    }
    if apply_service(&mut params, sys)? && password_source == PasswordSource::None && params.contains_key("password") {
        password_source = PasswordSource::Service;
    }
    for (key, var) in ENV {
        if !params.contains_key(*key)
            && let Some(value) = (sys.env)(var)
        {
            params.insert((*key).into(), value);
            if *key == "password" {
                password_source = PasswordSource::Environment;
            }
        }
    }
    if !params.contains_key("user")
        && let Some(user) = &sys.os_user
    {
        params.insert("user".into(), user.clone());
    }
    let mut warnings = Vec::new();
    if params.get("password").is_none_or(String::is_empty) {
        password_source = PasswordSource::None;
        if let Some((path, password)) = password_from_file(&params, sys, &mut warnings) {
            params.insert("password".into(), password);
            password_source = PasswordSource::PasswordFile(path);
        }
    }
    Ok(Resolved { params, password_source, warnings })
}

/// Fills unset keywords from the service, if one is named. Returns whether
/// one was applied.
fn apply_service(params: &mut Params, sys: &System) -> Result<bool, ReplicationError> {
    let Some(name) = params.get("service").cloned().or_else(|| (sys.env)("PGSERVICE")) else {
        return Ok(false);
    };
    let user_file =
        (sys.env)("PGSERVICEFILE").map(PathBuf::from).or_else(|| home(sys).map(|h| h.join(".pg_service.conf")));
    let system_file =
        PathBuf::from((sys.env)("PGSYSCONFDIR").unwrap_or_else(|| DEFAULT_SYSCONFDIR.into())).join("pg_service.conf");
    for path in user_file.into_iter().chain([system_file]) {
        let Some(file) = (sys.file)(&path) else { continue };
        if let Some(found) = service::lookup(&file.text, &name, &path.display().to_string()).map_err(invalid)? {
            for (key, value) in found {
                params.entry(key).or_insert(value);
            }
            return Ok(true);
        }
    }
    Err(ReplicationError::needs_operator(
        format!("definition of service \"{name}\" not found"),
        "define it in ~/.pg_service.conf (or the file PGSERVICEFILE names) or PGSYSCONFDIR/pg_service.conf",
    ))
}

fn password_from_file(params: &Params, sys: &System, warnings: &mut Vec<String>) -> Option<(PathBuf, String)> {
    let path = match params.get("passfile").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => home(sys)?.join(".pgpass"),
    };
    let file = (sys.file)(&path)?;
    if let Err(refusal) = pgpass::check(file.is_file, file.mode) {
        warnings.push(match refusal {
            pgpass::Refusal::NotAFile => format!("password file \"{}\" is not a plain file", path.display()),
            pgpass::Refusal::TooOpen => format!(
                "password file \"{}\" has group or world access; permissions should be u=rw (0600) or less",
                path.display()
            ),
        });
        return None;
    }
    let first = |key: &str| params.get(key).and_then(|v| v.split(',').next()).filter(|v| !v.is_empty());
    let user = params.get("user").map_or("", String::as_str);
    let host = match first("host").or_else(|| first("hostaddr")) {
        // libpq matches the default socket directory as `localhost`.
        None | Some("/tmp" | "/var/run/postgresql" | "/run/postgresql") => "localhost",
        Some(host) => host,
    };
    let target = pgpass::Target {
        host,
        port: first("port").unwrap_or("5432"),
        dbname: params.get("dbname").filter(|d| !d.is_empty()).map_or(user, String::as_str),
        user,
    };
    Some((path, pgpass::lookup(&file.text, &target)?))
}

fn home(sys: &System) -> Option<PathBuf> {
    (sys.env)("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

fn invalid(message: String) -> ReplicationError {
    ReplicationError::needs_operator(
        format!("invalid source: {message}"),
        "give a postgres://user@host:port/dbname URL or a key=value connection string, \
         with the password in PGPASSWORD, ~/.pgpass or a --source-file",
    )
}

/// Parses a connection string alone (no service file, environment or
/// password file): what `SourceConfig::from_str` does.
pub(crate) fn parse_source(s: &str) -> Result<SourceConfig, ReplicationError> {
    source_config(&parse::parse(s).map_err(invalid)?)
}

/// The source config: TLS settings taken out, everything else handed to
/// `tokio_postgres::Config`.
fn source_config(params: &Params) -> Result<SourceConfig, ReplicationError> {
    let value = |key: &str| params.get(key).map(String::as_str).filter(|v| !v.is_empty());
    let tls = match value("sslmode") {
        None | Some("prefer" | "allow") => TlsMode::Prefer,
        Some("disable") => TlsMode::Disable,
        Some("require") => TlsMode::Require,
        Some("verify-full") => match value("sslrootcert") {
            Some(root) => TlsMode::VerifyFull(root.into()),
            None => {
                return Err(ReplicationError::needs_operator(
                    "sslmode=verify-full needs sslrootcert",
                    "add sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate)",
                ));
            }
        },
        Some(other) => {
            return Err(ReplicationError::needs_operator(
                format!("sslmode={other} is not supported"),
                "use sslmode=verify-full with sslrootcert, require, prefer or disable",
            ));
        }
    };
    // Ours, not the driver's: TLS is set up here; service and passfile are resolved.
    let driver =
        params.iter().filter(|(k, _)| !matches!(k.as_str(), "sslmode" | "sslrootcert" | "service" | "passfile"));
    let mut text = parse::render(driver);
    if tls.required() {
        text.push_str(" sslmode=require");
    } else if tls == TlsMode::Disable {
        text.push_str(" sslmode=disable");
    }
    let inner = text.parse::<tokio_postgres::Config>().map_err(|e| invalid(e.to_string()))?;
    SourceConfig::from_parts(inner, tls)
}

/// [`resolve`] against this process's environment, files and user.
pub fn resolve_from_process(conninfo: &str) -> Result<Resolved, ReplicationError> {
    let env = |name: &str| std::env::var(name).ok();
    let file = |path: &Path| {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).ok()?;
        let text = if meta.is_file() { std::fs::read_to_string(path).ok()? } else { String::new() };
        Some(FileText { text, is_file: meta.is_file(), mode: meta.permissions().mode() & 0o777 })
    };
    let os_user = nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten().map(|u| u.name);
    resolve(conninfo, &System { env: &env, file: &file, os_user })
}

#[cfg(test)]
mod tests;
