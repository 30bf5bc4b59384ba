//! Big results in bounded memory.
//!
//! The engine returns everything one call produced in one buffer (its output
//! accumulates in WebAssembly memory, which never shrinks). So the server
//! never lets one call produce a whole big result: an `Execute` that may
//! return rows is sent with a row limit and the batch is cut right after it;
//! while the engine answers `PortalSuspended` to that limit, the server
//! forwards the rows and asks for the next chunk (`Execute` again, on the
//! lease it holds mid-batch), hiding the suspension the client did not ask
//! for, then sends the rest of the batch. A single-statement simple `Query`
//! that returns rows runs as the equivalent extended sequence, with the
//! simple protocol's reply shape. Pure logic here; the driving is in `mod.rs`.

use bytes::{BufMut, BytesMut};

use crate::server::backend;

/// Rows asked for in the first chunk of a result (one call for most results).
const FIRST_ROWS: u32 = 1024;
/// Later chunks are sized from the rows seen so far to about this many bytes.
const TARGET_BYTES: u64 = 2 << 20;
const MAX_ROWS: u32 = 100_000;

/// An `Execute` the server drives in chunks: the batch is cut after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cut {
    /// Where the `Execute` message ends in the batch.
    pub end: usize,
    /// The engine's name of the portal.
    pub portal: Vec<u8>,
    /// The rows the client asked for (0: all).
    pub wanted: u32,
}

impl Cut {
    /// For the `Execute` message that ends `batch` (already renamed).
    pub fn at_end_of(batch: &[u8]) -> Option<Cut> {
        let (tag, message) = backend::messages(batch).last()?;
        if tag != b'E' {
            return None;
        }
        let body = &message[5..];
        let end = body.iter().position(|&b| b == 0)?;
        let limit = body.get(end + 1..end + 5)?;
        let max_rows = i32::from_be_bytes(limit.try_into().ok()?);
        Some(Cut { end: batch.len(), portal: body[..end].to_vec(), wanted: max_rows.max(0) as u32 })
    }
}

/// Sets the row limit of the `Execute` message that ends at `end`.
pub(super) fn set_limit(bytes: &mut [u8], end: usize, rows: u32) {
    bytes[end - 4..end].copy_from_slice(&(rows as i32).to_be_bytes());
}

/// Frontend `Execute` of `portal` for at most `rows` rows.
pub(super) fn execute(portal: &[u8], rows: u32, out: &mut BytesMut) {
    out.put_u8(b'E');
    out.put_i32((4 + portal.len() + 1 + 4) as i32);
    out.put_slice(portal);
    out.put_u8(0);
    out.put_i32(rows as i32);
}

/// Where a chunked `Execute` stands.
#[derive(Debug)]
pub(super) struct Progress {
    wanted: u32,
    /// Rows forwarded in earlier chunks.
    delivered: u64,
    bytes: u64,
    /// Chunks that ended in a suspension the server hid.
    hidden: u32,
    limit: u32,
}

/// What to do after a chunk.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Forward the reply; the `Execute` is answered.
    Done,
    /// Forward the reply, then `Execute` again for this many rows.
    More(u32),
}

impl Progress {
    pub fn new(wanted: u32) -> Progress {
        let limit = if wanted == 0 { FIRST_ROWS } else { wanted.min(FIRST_ROWS) };
        Progress { wanted, delivered: 0, bytes: 0, hidden: 0, limit }
    }

    /// The limit for the first `Execute`.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Takes the reply of a call that ended with this `Execute`: hides a
    /// suspension the client did not ask for, and, once the `Execute` is
    /// answered after hidden suspensions, makes its `CommandComplete` count
    /// every row (the engine counts only the last chunk's, as PostgreSQL
    /// does for a client that fetches in chunks itself).
    pub fn take(&mut self, reply: &mut Vec<u8>) -> Next {
        // The rows of this Execute: the DataRows after the last message
        // that is not a row, notice, notification or parameter status.
        let (mut rows, mut bytes, mut last) = (0u64, 0u64, None);
        for (tag, message) in backend::messages(reply) {
            // The rows before the message that answers the Execute.
            last = Some((tag, message.len(), rows, bytes));
            match tag {
                b'D' => {
                    rows += 1;
                    bytes += message.len() as u64;
                }
                b'N' | b'A' | b'S' => {}
                _ => (rows, bytes) = (0, 0),
            }
        }
        let (last, rows, bytes) = match last {
            Some((tag, len, rows, bytes)) => (Some((tag, len)), rows, bytes),
            None => (None, 0, 0),
        };
        match last {
            Some((b's', len)) => {
                self.delivered += rows;
                self.bytes += bytes;
                if self.wanted > 0 && self.delivered >= u64::from(self.wanted) {
                    return Next::Done; // the client's own limit
                }
                reply.truncate(reply.len() - len);
                self.hidden += 1;
                let per_row = (self.bytes / self.delivered.max(1)).max(1);
                let mut limit = (TARGET_BYTES / per_row).clamp(1, u64::from(MAX_ROWS)) as u32;
                if self.wanted > 0 {
                    limit = limit.min((u64::from(self.wanted) - self.delivered) as u32);
                }
                self.limit = limit;
                Next::More(limit)
            }
            Some((b'C', len)) if self.hidden > 0 => {
                let start = reply.len() - len;
                let tag = String::from_utf8_lossy(&reply[start + 5..reply.len() - 1]).into_owned();
                if let Some(fixed) = count_in_tag(&tag, self.delivered + rows) {
                    reply.truncate(start);
                    let mut out = BytesMut::new();
                    backend::command_complete(&fixed, &mut out);
                    reply.extend_from_slice(&out);
                }
                Next::Done
            }
            _ => Next::Done,
        }
    }
}

/// A command tag with its row count replaced (`SELECT 12` → `SELECT 40`,
/// `INSERT 0 12` → `INSERT 0 40`); `None` for tags without one.
fn count_in_tag(tag: &str, rows: u64) -> Option<String> {
    let (head, count) = tag.rsplit_once(' ')?;
    count.parse::<u64>().ok()?;
    Some(format!("{head} {rows}"))
}

/// Whether a statement may return rows (then its `Execute` is chunked). Errs
/// on "yes": only statements known to return none say no.
pub(super) fn may_return_rows(sql: &[u8]) -> bool {
    const QUIET: &[&str] = &[
        "insert",
        "update",
        "delete",
        "merge",
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
        "set",
        "reset",
        "create",
        "drop",
        "alter",
        "truncate",
        "lock",
        "prepare",
        "deallocate",
        "declare",
        "close",
        "listen",
        "unlisten",
        "notify",
        "discard",
        "vacuum",
        "analyze",
        "grant",
        "revoke",
        "comment",
        "do",
        "move",
        "refresh",
        "cluster",
        "reindex",
        "checkpoint",
    ];
    let word = crate::server::sql_text::first_word(sql);
    let quiet = QUIET.iter().any(|q| word.eq_ignore_ascii_case(q.as_bytes()));
    !quiet || sql.windows(9).any(|w| w.eq_ignore_ascii_case(b"returning"))
}

/// A simple `Query` that is one row-returning statement, as the equivalent
/// extended sequence on the unnamed statement and portal (the connection
/// holds the engine until its `Sync`, so nobody else's use of them meets
/// it): `Parse`, `Bind` (text results), `Describe` portal, `Execute` (the
/// cut), then `Close` portal and `Sync`. `None` for anything else: scripts
/// of several statements (a `;` anywhere but at the end, also inside a
/// literal, counts), statements that return no rows, and text with `$n`
/// (a simple query has no parameters: the engine's error must stay that).
pub(super) fn simple_as_extended(sql: &[u8]) -> Option<(BytesMut, Cut)> {
    let trimmed = sql.trim_ascii_end();
    let body = trimmed.strip_suffix(b";").unwrap_or(trimmed);
    if body.contains(&b';') || body.contains(&0) {
        return None;
    }
    let word = crate::server::sql_text::first_word(body);
    let selects = ["select", "with", "values", "table"].iter().any(|w| word.eq_ignore_ascii_case(w.as_bytes()));
    if !selects || body.windows(2).any(|w| w[0] == b'$' && w[1].is_ascii_digit()) {
        return None;
    }
    let mut out = BytesMut::new();
    backend::message(b'P', &mut out, |out| {
        out.put_u8(0);
        out.put_slice(sql);
        out.put_u8(0);
        out.put_i16(0);
    });
    backend::message(b'B', &mut out, |out| {
        out.put_slice(&[0, 0]); // portal "", statement ""
        out.put_i16(0); // no parameter formats
        out.put_i16(0); // no parameters
        out.put_i16(0); // all results in text
    });
    backend::message(b'D', &mut out, |out| out.put_slice(b"P\0"));
    execute(b"", 0, &mut out);
    let cut = Cut { end: out.len(), portal: Vec::new(), wanted: 0 };
    backend::close(b'P', b"", &mut out);
    backend::sync(&mut out);
    Some((out, cut))
}

/// A reply to [`simple_as_extended`] as the simple protocol shapes it:
/// without `ParseComplete`, `BindComplete`, `NoData` and `CloseComplete`.
pub(super) fn simple_shape(reply: Vec<u8>) -> Vec<u8> {
    if !backend::messages(&reply).any(|(tag, _)| matches!(tag, b'1' | b'2' | b'n' | b'3')) {
        return reply;
    }
    let mut kept = Vec::with_capacity(reply.len());
    for (tag, message) in backend::messages(&reply) {
        if !matches!(tag, b'1' | b'2' | b'n' | b'3') {
            kept.extend_from_slice(message);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_rows(n: usize, width: usize, out: &mut Vec<u8>) {
        for _ in 0..n {
            let mut m = BytesMut::new();
            backend::message(b'D', &mut m, |o| {
                o.put_i16(1);
                o.put_i32(width as i32);
                o.put_slice(&vec![b'x'; width]);
            });
            out.extend_from_slice(&m);
        }
    }

    fn tags(bytes: &[u8]) -> Vec<u8> {
        backend::messages(bytes).map(|(t, _)| t).collect()
    }

    fn suspended() -> Vec<u8> {
        vec![b's', 0, 0, 0, 4]
    }

    #[test]
    fn hides_suspensions_and_counts_every_row() {
        let mut progress = Progress::new(0);
        assert_eq!(progress.limit(), FIRST_ROWS);
        let mut reply = vec![b'2', 0, 0, 0, 4];
        data_rows(FIRST_ROWS as usize, 100, &mut reply);
        reply.extend(suspended());
        let Next::More(limit) = progress.take(&mut reply) else { panic!("more rows expected") };
        assert!(limit > FIRST_ROWS && limit <= MAX_ROWS, "{limit}");
        assert_eq!(tags(&reply).last(), Some(&b'D'), "the suspension is hidden");
        let mut reply = Vec::new();
        data_rows(3, 100, &mut reply);
        let mut tail = BytesMut::new();
        backend::command_complete("SELECT 3", &mut tail);
        reply.extend_from_slice(&tail);
        assert_eq!(progress.take(&mut reply), Next::Done);
        let (_, last) = backend::messages(&reply).last().unwrap();
        assert_eq!(&last[5..], format!("SELECT {}\0", FIRST_ROWS + 3).as_bytes());
    }

    #[test]
    fn a_single_chunk_passes_unchanged_and_the_clients_own_limit_is_kept() {
        let mut progress = Progress::new(0);
        let mut reply = Vec::new();
        data_rows(2, 10, &mut reply);
        let mut tail = BytesMut::new();
        backend::command_complete("INSERT 0 2", &mut tail);
        reply.extend_from_slice(&tail);
        let before = reply.clone();
        assert_eq!(progress.take(&mut reply), Next::Done);
        assert_eq!(reply, before);

        let mut progress = Progress::new(1500);
        assert_eq!(progress.limit(), FIRST_ROWS);
        let mut reply = Vec::new();
        data_rows(FIRST_ROWS as usize, 10, &mut reply);
        reply.extend(suspended());
        assert_eq!(progress.take(&mut reply), Next::More(1500 - FIRST_ROWS));
        let mut reply = Vec::new();
        data_rows(1500 - FIRST_ROWS as usize, 10, &mut reply);
        reply.extend(suspended());
        assert_eq!(progress.take(&mut reply), Next::Done);
        assert_eq!(tags(&reply).last(), Some(&b's'), "the client asked for 1500 rows: its suspension stays");
    }

    #[test]
    fn tags_get_the_total() {
        assert_eq!(count_in_tag("SELECT 5", 9).as_deref(), Some("SELECT 9"));
        assert_eq!(count_in_tag("INSERT 0 5", 9).as_deref(), Some("INSERT 0 9"));
        assert_eq!(count_in_tag("SHOW", 9), None);
    }

    #[test]
    fn which_statements_are_chunked() {
        assert!(may_return_rows(b"  select 1"));
        assert!(may_return_rows(b"/* c */ WITH x AS (SELECT 1) SELECT * FROM x"));
        assert!(may_return_rows(b"insert into t values (1) returning id"));
        assert!(may_return_rows(b"EXPLAIN SELECT 1"));
        assert!(!may_return_rows(b"UPDATE t SET a = 1"));
        assert!(!may_return_rows(b"BEGIN"));
    }

    #[test]
    fn only_single_row_returning_simple_queries_are_converted() {
        let (bytes, cut) = simple_as_extended(b"SELECT 1;  ").unwrap();
        assert_eq!(tags(&bytes), b"PBDECS");
        assert_eq!(Cut::at_end_of(&bytes[..cut.end]), Some(cut));
        for sql in [&b"SELECT 1; SELECT 2"[..], b"SELECT ';'", b"INSERT INTO t VALUES (1)", b"SELECT $1", b"BEGIN"] {
            assert!(simple_as_extended(sql).is_none(), "{}", String::from_utf8_lossy(sql));
        }
    }

    #[test]
    fn simple_shape_drops_extended_only_messages() {
        let reply =
            [b"1\0\0\0\x04".as_slice(), b"2\0\0\0\x04", b"n\0\0\0\x04", b"3\0\0\0\x04", b"Z\0\0\0\x05I"].concat();
        assert_eq!(tags(&simple_shape(reply)), b"Z");
    }
}
