//! The frontend messages the worker sends to the engine and the decoding of
//! the engine's replies. Plain functions over byte buffers, no I/O: the engine
//! is driven through `pglite-oxide`'s raw protocol entry point.
//!
//! One call is one round trip: `Parse/Bind/Describe/Execute` for each
//! statement followed by a single `Sync`. Statements before one `Sync` run in
//! one implicit transaction, which is what makes [`crate::Instance::transaction`]
//! atomic without extra round trips.

pub(crate) mod backend;

use std::sync::Arc;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::IsNull;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use crate::error::{DbError, Error, Result};
use crate::params::Param;
use crate::rows::{Column, QueryResult, Row};

/// Transaction status reported by `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// Not in a transaction block.
    Idle,
    /// In a transaction block.
    InTransaction,
    /// In a failed transaction block (only `ROLLBACK` is accepted).
    Failed,
}

impl TxStatus {
    fn from_byte(b: u8) -> Result<TxStatus> {
        match b {
            b'I' => Ok(TxStatus::Idle),
            b'T' => Ok(TxStatus::InTransaction),
            b'E' => Ok(TxStatus::Failed),
            other => Err(Error::Protocol(format!("unknown transaction status {other:#x}"))),
        }
    }
}

fn io_err(e: std::io::Error) -> Error {
    Error::Protocol(e.to_string())
}

/// Appends `Parse/Bind/Describe/Execute` of one statement (unnamed statement
/// and portal, text format in and out). Call [`sync`] after the last one.
pub fn extended_statement(sql: &str, params: &[Param], buf: &mut BytesMut) -> Result<()> {
    if params.len() > i16::MAX as usize {
        return Err(Error::Parameter(format!("{} parameters; at most {} are allowed", params.len(), i16::MAX)));
    }
    frontend::parse("", sql, params.iter().map(Param::type_oid), buf).map_err(io_err)?;
    bind_text("", params, buf)?;
    frontend::describe(b'P', "", buf).map_err(io_err)?;
    frontend::execute("", 0, buf).map_err(io_err)?;
    Ok(())
}

/// Appends a `Bind` of `statement` to the unnamed portal, parameters and
/// results in text format.
pub(crate) fn bind_text(statement: &str, params: &[Param], buf: &mut BytesMut) -> Result<()> {
    frontend::bind(
        "",
        statement,
        Some(0), // all parameters in text format
        params,
        |p, out| match p.text() {
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        },
        Some(0), // all results in text format
        buf,
    )
    .map_err(|e| match e {
        frontend::BindError::Conversion(e) => Error::Parameter(e.to_string()),
        frontend::BindError::Serialization(e) => io_err(e),
    })
}

/// The message a `COPY ... FROM STDIN` in an API call fails with.
pub const COPY_IN_REFUSED: &str =
    "COPY FROM STDIN is not supported by the Rust API; use the wire server or COPY FROM a file";

/// Appends `CopyFail` then `Sync`, which ends the implicit transaction of the
/// batch. See [`simple_query`] for why `CopyFail` is there.
pub fn sync(buf: &mut BytesMut) {
    copy_guard(buf);
    frontend::sync(buf);
}

/// Appends a simple-protocol `Query` (several statements allowed, no
/// parameters), followed by a `CopyFail`.
///
/// The engine reads its input from the bytes of one round trip; a
/// `COPY ... FROM STDIN` that finds no data there makes it exit. A trailing
/// `CopyFail` ends such a COPY with an error, and is ignored by PostgreSQL
/// in any other state (as the protocol specifies), so it costs nothing.
pub fn simple_query(sql: &str, buf: &mut BytesMut) -> Result<()> {
    frontend::query(sql, buf).map_err(io_err)?;
    copy_guard(buf);
    Ok(())
}

fn copy_guard(buf: &mut BytesMut) {
    // Cannot fail: the message has no NUL byte.
    let _ = frontend::copy_fail(COPY_IN_REFUSED, buf);
}

/// What the engine answered to one batch.
#[derive(Debug, Default)]
pub struct Reply {
    /// One result per statement that completed, in order.
    pub results: Vec<QueryResult>,
    /// The error that stopped the batch, if any.
    pub error: Option<DbError>,
    /// Notices raised while running the batch.
    pub notices: Vec<DbError>,
    /// The status in the final `ReadyForQuery` (`None` if it was missing).
    pub status: Option<TxStatus>,
    /// The engine asked for `COPY ... FROM STDIN` data.
    pub wants_copy_in: bool,
}

impl Reply {
    /// The results, or the database error that ended the batch.
    pub fn into_results(self) -> Result<Vec<QueryResult>> {
        match self.error {
            Some(e) => Err(e.into()),
            None => Ok(self.results),
        }
    }
}

/// Decodes the backend messages of one round trip.
pub fn decode(bytes: &[u8]) -> Result<Reply> {
    let mut buf = BytesMut::from(bytes);
    let mut reply = Reply::default();
    let mut columns: Arc<[Column]> = Arc::from(Vec::new());
    let mut rows = Vec::new();
    while let Some(message) = Message::parse(&mut buf).map_err(io_err)? {
        match message {
            Message::RowDescription(body) => {
                let fields: Vec<Column> = body
                    .fields()
                    .map(|f| Ok(Column { name: f.name().to_owned(), type_oid: f.type_oid() }))
                    .collect()
                    .map_err(io_err)?;
                columns = Arc::from(fields);
            }
            Message::NoData => columns = Arc::from(Vec::new()),
            Message::DataRow(body) => {
                let raw = body.buffer();
                let values = body
                    .ranges()
                    .map(|range| Ok(range.map(|r| String::from_utf8_lossy(&raw[r]).into_owned())))
                    .collect()
                    .map_err(io_err)?;
                rows.push(Row::new(columns.clone(), values));
            }
            Message::CommandComplete(body) => {
                reply.results.push(QueryResult {
                    columns: std::mem::replace(&mut columns, Arc::from(Vec::new())),
                    rows: std::mem::take(&mut rows),
                    command: body.tag().map_err(io_err)?.to_owned(),
                });
            }
            Message::ErrorResponse(body) => {
                reply.error.get_or_insert(DbError::from_fields(body.fields()).map_err(io_err)?);
            }
            Message::NoticeResponse(body) => {
                reply.notices.push(DbError::from_fields(body.fields()).map_err(io_err)?);
            }
            Message::ReadyForQuery(body) => reply.status = Some(TxStatus::from_byte(body.status())?),
            Message::CopyInResponse(_) => reply.wants_copy_in = true,
            // Rows of COPY TO STDOUT are not collected by the Rust API: use the
            // wire server for COPY, or `COPY ... TO` a file.
            Message::CopyOutResponse(_) | Message::CopyData(_) | Message::CopyDone => {}
            // An empty statement still gets a (row-less, tag-less) result.
            Message::EmptyQueryResponse => reply.results.push(QueryResult::default()),
            // ParseComplete, BindComplete, ParameterStatus, NotificationResponse...
            _ => {}
        }
    }
    if !buf.is_empty() {
        return Err(Error::Protocol(format!("{} trailing bytes in engine reply", buf.len())));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn decodes_rows_tags_and_errors() {
        let mut bytes = msg(b'1', b""); // ParseComplete
        bytes.extend(msg(b'2', b"")); // BindComplete
        let mut desc = 1_i16.to_be_bytes().to_vec();
        desc.extend(b"n\0");
        desc.extend(0_i32.to_be_bytes()); // table oid
        desc.extend(0_i16.to_be_bytes()); // column id
        desc.extend(23_i32.to_be_bytes()); // int4
        desc.extend(4_i16.to_be_bytes());
        desc.extend((-1_i32).to_be_bytes());
        desc.extend(0_i16.to_be_bytes());
        bytes.extend(msg(b'T', &desc));
        let mut row = 1_i16.to_be_bytes().to_vec();
        row.extend(2_i32.to_be_bytes());
        row.extend(b"42");
        bytes.extend(msg(b'D', &row));
        let mut null_row = 1_i16.to_be_bytes().to_vec();
        null_row.extend((-1_i32).to_be_bytes());
        bytes.extend(msg(b'D', &null_row));
        bytes.extend(msg(b'C', b"SELECT 2\0"));
        bytes.extend(msg(b'E', b"SERROR\0VERROR\0C42P01\0Mno such table\0P15\0\0"));
        bytes.extend(msg(b'Z', b"I"));

        let reply = decode(&bytes).unwrap();
        assert_eq!(reply.results.len(), 1);
        let result = &reply.results[0];
        assert_eq!(result.command, "SELECT 2");
        assert_eq!(result.rows[0].get::<i32>("n"), 42);
        assert_eq!(result.rows[1].get::<Option<i32>>(0), None);
        let err = reply.error.as_ref().unwrap();
        assert_eq!(err.code, crate::SqlState::UNDEFINED_TABLE);
        assert_eq!(err.position, Some(15));
        assert_eq!(reply.status, Some(TxStatus::Idle));
    }

    #[test]
    fn truncated_reply_is_a_protocol_error() {
        let bytes = msg(b'C', b"SELECT 1\0");
        assert!(decode(&bytes[..bytes.len() - 2]).is_err());
    }

    #[test]
    fn encodes_one_round_trip() {
        let mut buf = BytesMut::new();
        extended_statement("SELECT $1", &[Param::Null], &mut buf).unwrap();
        sync(&mut buf);
        // Frontend messages share the backend framing (tag, length, body).
        let tags: Vec<u8> = backend::messages(&buf).map(|(tag, _)| tag).collect();
        assert_eq!(tags, b"PBDEfS");
    }
}
