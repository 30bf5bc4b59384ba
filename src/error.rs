//! Typed errors at the library boundary.
//!
//! Database errors keep every field of the server's `ErrorResponse` so that a
//! caller (or the wire server) can act on the SQLSTATE, show the hint, or pass
//! the error on unchanged.

use std::fmt;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorFields;

/// The SQLSTATE of a database error. This is `tokio-postgres`'s generated
/// type, re-exported so both sides of the wire share one vocabulary.
pub use tokio_postgres::error::SqlState;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error reported by PostgreSQL itself, with every field of its
/// `ErrorResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbError {
    /// `ERROR`, `FATAL`, `PANIC` (localized text is not used: always English).
    pub severity: String,
    /// The SQLSTATE code.
    pub code: SqlState,
    /// The primary message.
    pub message: String,
    /// Optional secondary message with more detail.
    pub detail: Option<String>,
    /// Optional suggestion what to do about it.
    pub hint: Option<String>,
    /// 1-based character position in the statement text.
    pub position: Option<u32>,
    /// Position in an internally generated statement.
    pub internal_position: Option<u32>,
    /// The internally generated statement that failed.
    pub internal_query: Option<String>,
    /// Call-stack context.
    pub where_: Option<String>,
    /// Schema of the object involved.
    pub schema: Option<String>,
    /// Table of the object involved.
    pub table: Option<String>,
    /// Column of the object involved.
    pub column: Option<String>,
    /// Data type involved.
    pub datatype: Option<String>,
    /// Constraint involved.
    pub constraint: Option<String>,
    /// Server source file that raised the error.
    pub file: Option<String>,
    /// Line in that file.
    pub line: Option<u32>,
    /// Server routine that raised the error.
    pub routine: Option<String>,
}

impl DbError {
    /// An error with these three fields and no others.
    fn new(severity: &str, code: SqlState, message: &str) -> DbError {
        DbError {
            severity: severity.into(),
            code,
            message: message.into(),
            detail: None,
            hint: None,
            position: None,
            internal_position: None,
            internal_query: None,
            where_: None,
            schema: None,
            table: None,
            column: None,
            datatype: None,
            constraint: None,
            file: None,
            line: None,
            routine: None,
        }
    }

    /// Decodes the fields of an `ErrorResponse` (or `NoticeResponse`).
    pub(crate) fn from_fields(mut fields: ErrorFields<'_>) -> std::io::Result<DbError> {
        let mut err = DbError::new("", SqlState::INTERNAL_ERROR, "");
        let mut localized_severity = None;
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'S' => localized_severity = Some(value),
                b'V' => err.severity = value,
                b'C' => err.code = SqlState::from_code(&value),
                b'M' => err.message = value,
                b'D' => err.detail = Some(value),
                b'H' => err.hint = Some(value),
                b'P' => err.position = value.parse().ok(),
                b'p' => err.internal_position = value.parse().ok(),
                b'q' => err.internal_query = Some(value),
                b'W' => err.where_ = Some(value),
                b's' => err.schema = Some(value),
                b't' => err.table = Some(value),
                b'c' => err.column = Some(value),
                b'd' => err.datatype = Some(value),
                b'n' => err.constraint = Some(value),
                b'F' => err.file = Some(value),
                b'L' => err.line = value.parse().ok(),
                b'R' => err.routine = Some(value),
                _ => {}
            }
        }
        if err.severity.is_empty() {
            err.severity = localized_severity.unwrap_or_else(|| "ERROR".into());
        }
        Ok(err)
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (SQLSTATE {})", self.severity, self.message, self.code.code())?;
        if let Some(detail) = &self.detail {
            write!(f, "\nDETAIL: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\nHINT: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DbError {}

/// Everything that can go wrong when using an instance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// PostgreSQL rejected the statement; the instance keeps serving.
    #[error(transparent)]
    Db(Box<DbError>),
    /// The instance was stopped; start a new one to continue.
    #[error("instance {0} is stopped")]
    Stopped(String),
    /// The instance's worker died (panic or WebAssembly trap). Other instances
    /// are unaffected.
    #[error("instance {name} crashed: {reason}")]
    Crashed {
        /// Instance label.
        name: String,
        /// What the worker reported when it died.
        reason: String,
    },
    /// The engine could not be started.
    #[error("instance failed to start: {0}")]
    Startup(String),
    /// Another instance (in this or another process) holds the data directory.
    #[error("data directory {0} is already in use by another instance")]
    DataDirInUse(std::path::PathBuf),
    /// A parameter could not be sent, or the count does not match.
    #[error("bad parameters: {0}")]
    Parameter(String),
    /// A value could not be converted to the requested Rust type.
    #[error("cannot convert column {column}: {reason}")]
    Conversion {
        /// Column name or index.
        column: String,
        /// Why the conversion failed.
        reason: String,
    },
    /// A column name or index that the row does not have.
    #[error("no column {0} in this row")]
    ColumnNotFound(String),
    /// The call is not allowed in the current state (e.g. a statement run
    /// outside `begin()` left a transaction open).
    #[error("{0}")]
    Usage(String),
    /// The transaction was rolled back instead of committed because one of its
    /// statements failed.
    #[error("transaction rolled back: an earlier statement in it failed")]
    RolledBack,
    /// A named-instance registry error.
    #[error("{0}")]
    Registry(String),
    /// The instance did not answer in time.
    #[error("instance {0} did not answer within {1:?}")]
    Timeout(String, std::time::Duration),
    /// The engine sent bytes this crate could not decode (a bug: please report).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// The SQLSTATE if this is a database error.
    pub fn code(&self) -> Option<&SqlState> {
        self.as_db_error().map(|e| &e.code)
    }

    /// The database error, if this is one.
    pub fn as_db_error(&self) -> Option<&DbError> {
        match self {
            Error::Db(e) => Some(e),
            _ => None,
        }
    }

    /// True when the instance can no longer serve (stopped or crashed).
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Stopped(_) | Error::Crashed { .. })
    }

    /// What a wire session from before an engine restart gets: PostgreSQL's
    /// error for the sessions it ends when a backend crashes.
    pub(crate) fn engine_restarted() -> Error {
        let mut e = DbError::new(
            "FATAL",
            SqlState::CRASH_SHUTDOWN,
            "terminating connection because the engine restarted after a crash",
        );
        e.detail = Some(
            "The session's prepared statements, cursors, temporary tables and listens were lost; \
             committed data was kept."
                .into(),
        );
        e.hint = Some("In a moment you should be able to reconnect to the database and repeat your command.".into());
        Error::Db(Box::new(e))
    }
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        Error::Db(Box::new(e))
    }
}
