//! Driving a `COPY ... TO STDOUT` in chunks (see `copy_out.rs`).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::chunks::{self, Next, Progress};
use super::copy_out::{self, CopyTo, Format, Source};
use super::waiting::Withdrawn;
use super::{Connection, Result};
use crate::server::backend;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Runs `copy` as a query in chunks, writing the COPY protocol to the
    /// client. `simple`: the client sent it as a simple query (it gets
    /// `ReadyForQuery`); else it stands for the client's `Execute` of the
    /// COPY's portal, inside a batch this connection holds the engine for.
    /// False if it did not run: the statement then runs as it is.
    pub(super) async fn copy_out(&mut self, copy: CopyTo, simple: bool) -> Result<bool> {
        if self.session.skipping_to_sync() || (simple && self.status == b'E') {
            return Ok(false); // the engine answers with the right error itself
        }
        if !self.session.holds_engine() {
            if !simple {
                return Ok(false);
            }
            let limit = self.config.queue_wait_timeout;
            if !self.begin_busy(false, limit).await? || !self.hold_within(limit).await? {
                let answer = self.withdrawn(1, Withdrawn::QueueTimeout(limit.unwrap_or_default()));
                self.forward(&answer).await?;
                return Ok(true);
            }
        }
        let query = match &copy.source {
            Source::Query(query) => Some(query.clone()),
            Source::Table { name, columns } => match self.catalog_columns(name).await? {
                Some(catalog) => copy_out::table_query(name, columns.as_deref(), &catalog).map(String::into_bytes),
                None => None,
            },
        };
        let Some(query) = query else {
            if simple {
                self.after_busy().await?;
            }
            return Ok(false);
        };
        let binary = copy.format == Format::Binary;
        let mut bytes = BytesMut::new();
        unnamed_select(&query, binary, &mut bytes);
        let mut progress = Progress::new(0);
        chunks::execute(b"", progress.limit(), &mut bytes);
        let mut reply = self.session.round_trip(bytes).await?;
        let mut total = 0u64;
        let mut started = false;
        loop {
            let next = progress.take(&mut reply);
            let mut out = BytesMut::with_capacity(reply.len() + reply.len() / 8);
            for (tag, message) in backend::messages(&reply) {
                match tag {
                    b'T' => {
                        let names = column_names(message);
                        copy_out::copy_out_response(copy.format, names.len(), &mut out);
                        copy_out::prologue(copy.format, &names, &mut out);
                        started = true;
                    }
                    b'D' => {
                        copy_out::row(copy.format, &data_row(message), &mut out);
                        total += 1;
                    }
                    b'C' => {
                        copy_out::epilogue(copy.format, &mut out);
                        out.extend_from_slice(b"c\0\0\0\x04"); // CopyDone
                        backend::command_complete(&format!("COPY {total}"), &mut out);
                    }
                    b'1' | b'2' | b'n' | b's' => {}
                    _ => out.extend_from_slice(message), // errors, notices
                }
            }
            drop(reply);
            self.forward(&out).await?;
            let Next::More(rows) = next else { break };
            let mut more = BytesMut::new();
            chunks::execute(b"", rows, &mut more);
            reply = self.session.round_trip(more).await?;
        }
        tracing::debug!(rows = total, started, "COPY TO STDOUT in chunks");
        if simple {
            let mut end = BytesMut::new();
            backend::close(b'P', b"", &mut end);
            backend::sync(&mut end);
            let reply = self.session.round_trip(end).await?;
            self.forward(&chunks::simple_shape(reply)).await?;
            self.after_busy().await?;
        }
        Ok(true)
    }

    /// The columns of a plain table (name, generated), read on the engine
    /// this connection holds, inside its current batch (no `Sync`); `None`
    /// if it is not a plain table or the lookup failed.
    async fn catalog_columns(&mut self, name: &str) -> Result<Option<Vec<(String, bool)>>> {
        let mut bytes = BytesMut::new();
        unnamed_select(copy_out::columns_query(name).as_bytes(), false, &mut bytes);
        chunks::execute(b"", 0, &mut bytes);
        let reply = self.session.round_trip(bytes).await?;
        let mut columns = Vec::new();
        for (tag, message) in backend::messages(&reply) {
            match tag {
                b'D' => {
                    let values = data_row(message);
                    let (Some(Some(name)), Some(Some(generated))) = (values.first(), values.get(1)) else {
                        return Ok(None);
                    };
                    columns.push((String::from_utf8_lossy(name).into_owned(), *generated == b"t"));
                }
                b'E' => return Ok(None),
                _ => {}
            }
        }
        Ok(Some(columns).filter(|c| !c.is_empty()))
    }
}

/// `Parse`, `Bind` and `Describe` of `query` on the unnamed statement and
/// portal (results in binary or text).
fn unnamed_select(query: &[u8], binary: bool, out: &mut BytesMut) {
    use bytes::BufMut;
    let start = out.len();
    out.put_u8(b'P');
    out.put_i32(0);
    out.put_u8(0);
    out.put_slice(query);
    out.put_u8(0);
    out.put_i16(0);
    let len = (out.len() - start - 1) as i32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    out.put_u8(b'B');
    out.put_i32(if binary { 4 + 2 + 6 + 2 } else { 4 + 2 + 6 });
    out.put_slice(&[0, 0]);
    out.put_i16(0);
    out.put_i16(0);
    if binary {
        out.put_i16(1);
        out.put_i16(1);
    } else {
        out.put_i16(0);
    }
    out.put_slice(b"D\0\0\0\x06P\0");
}

/// The values of a `DataRow` message.
fn data_row(message: &[u8]) -> Vec<Option<&[u8]>> {
    let mut rest = &message[5..];
    let Some((count, tail)) = rest.split_first_chunk::<2>() else { return Vec::new() };
    let count = i16::from_be_bytes(*count).max(0) as usize;
    rest = tail;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else { break };
        let len = i32::from_be_bytes(*len);
        if len < 0 {
            values.push(None);
            rest = tail;
        } else {
            let len = (len as usize).min(tail.len());
            values.push(Some(&tail[..len]));
            rest = &tail[len..];
        }
    }
    values
}

/// The column names of a `RowDescription` message.
fn column_names(message: &[u8]) -> Vec<String> {
    let mut rest = &message[5..];
    let Some((count, tail)) = rest.split_first_chunk::<2>() else { return Vec::new() };
    let count = i16::from_be_bytes(*count).max(0) as usize;
    rest = tail;
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        let Some(end) = rest.iter().position(|&b| b == 0) else { break };
        names.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = rest.get(end + 1 + 18..).unwrap_or_default();
    }
    names
}
