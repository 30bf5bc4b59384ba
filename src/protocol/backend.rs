//! Backend messages as bytes, no I/O: the one place that walks their
//! framing (the instance's worker, the wire server and the replication
//! client all use it) and encodes the few the engine does not write itself
//! (the server's startup and errors, the worker's errors for engine
//! failures).
//!
//! postgres-protocol decodes backend messages but encodes only frontend
//! ones, and its decoder copies each message; this walker borrows. The
//! frontend messages the server adds to a client's batch use
//! postgres-protocol's encoders.

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;

/// Appends one message: tag, length, and the body `body` writes.
pub(crate) fn message(tag: u8, out: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u8(tag);
    out.put_i32(0);
    body(out);
    let len = (out.len() - start - 1) as i32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

fn cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// `ErrorResponse` with severity, SQLSTATE and message.
pub(crate) fn error_response(severity: &str, code: &str, text: &str, out: &mut BytesMut) {
    error_fields([(b'S', severity), (b'V', severity), (b'C', code), (b'M', text)], out);
}

/// `ErrorResponse` with these fields (tag, value) in order; a NUL inside a
/// value (which would end it early) is dropped.
pub(crate) fn error_fields<'a>(fields: impl IntoIterator<Item = (u8, &'a str)>, out: &mut BytesMut) {
    message(b'E', out, |out| {
        for (field, value) in fields {
            out.put_u8(field);
            out.extend(value.bytes().filter(|&b| b != 0));
            out.put_u8(0);
        }
        out.put_u8(0);
    });
}

/// `Authentication*` with its subtype and payload.
pub(crate) fn authentication(kind: i32, payload: &[u8], out: &mut BytesMut) {
    message(b'R', out, |out| {
        out.put_i32(kind);
        out.put_slice(payload);
    });
}

/// `ParameterStatus`.
pub(crate) fn parameter_status(name: &str, value: &str, out: &mut BytesMut) {
    message(b'S', out, |out| {
        cstr(out, name);
        cstr(out, value);
    });
}

/// `BackendKeyData`.
pub(crate) fn backend_key_data(pid: i32, key: i32, out: &mut BytesMut) {
    message(b'K', out, |out| {
        out.put_i32(pid);
        out.put_i32(key);
    });
}

/// `ReadyForQuery` with status `I`, `T` or `E`.
pub(crate) fn ready_for_query(status: u8, out: &mut BytesMut) {
    message(b'Z', out, |out| out.put_u8(status));
}

/// `CommandComplete`.
pub(crate) fn command_complete(tag: &str, out: &mut BytesMut) {
    message(b'C', out, |out| cstr(out, tag));
}

/// `NegotiateProtocolVersion`: the newest minor version supported and the
/// protocol options (`_pq_.*`) that were not recognized.
pub(crate) fn negotiate_protocol_version(minor: i32, unrecognized: &[String], out: &mut BytesMut) {
    message(b'v', out, |out| {
        out.put_i32(minor);
        out.put_i32(unrecognized.len() as i32);
        for option in unrecognized {
            cstr(out, option);
        }
    });
}

/// Frontend `CopyFail`: what the server sends the engine to end a COPY it
/// must not leave waiting for data.
pub(crate) fn copy_fail(reason: &str, out: &mut BytesMut) {
    // postgres-protocol refuses (half-written) a text holding a NUL; ours hold none.
    let _ = frontend::copy_fail(&reason.replace('\0', ""), out);
}

/// Frontend `Sync`.
pub(crate) fn sync(out: &mut BytesMut) {
    frontend::sync(out);
}

/// Frontend simple `Query`.
pub(crate) fn query(sql: &str, out: &mut BytesMut) {
    let _ = frontend::query(&sql.replace('\0', ""), out);
}

/// Frontend `Close` of a statement (`S`) or portal (`P`) by its engine name.
/// Written here because postgres-protocol's takes a `&str` and a client's
/// statement names are bytes in whatever encoding it uses.
pub(crate) fn close(kind: u8, engine_name: &[u8], out: &mut BytesMut) {
    message(b'C', out, |out| {
        out.put_u8(kind);
        out.put_slice(engine_name);
        out.put_u8(0);
    });
}

/// Walks the framing of backend bytes: yields `(tag, whole message)`.
/// Stops at the first incomplete message.
pub(crate) fn messages(bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.len() < 5 {
            return None;
        }
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 || rest.len() < 1 + len as usize {
            return None;
        }
        let (message, tail) = rest.split_at(1 + len as usize);
        rest = tail;
        Some((message[0], message))
    })
}

/// The status byte of the last `ReadyForQuery` in `bytes`, if any.
pub(crate) fn last_ready_status(bytes: &[u8]) -> Option<u8> {
    messages(bytes).filter(|(tag, _)| *tag == b'Z').last().map(|(_, m)| m[5])
}

/// The tag of the last message, if `bytes` is whole messages only.
pub(crate) fn last_tag_if_whole(bytes: &[u8]) -> Option<u8> {
    let mut seen = 0;
    let mut last = None;
    for (tag, message) in messages(bytes) {
        seen += message.len();
        last = Some(tag);
    }
    last.filter(|_| seen == bytes.len())
}

/// Whether `bytes` hold an `ErrorResponse`.
pub(crate) fn has_error(bytes: &[u8]) -> bool {
    messages(bytes).any(|(tag, _)| tag == b'E')
}

/// A message length field that cannot be (below 4).
#[derive(Debug)]
pub(crate) struct InvalidLength(pub(crate) i32);

/// Splits one whole message off the front of a read buffer: `None` until
/// it is all there (room for the rest is reserved).
pub(crate) fn split_frame(buf: &mut BytesMut) -> Result<Option<Bytes>, InvalidLength> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(InvalidLength(len));
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(buf.split_to(total).freeze()))
}

/// `bytes` without its first `n` `CloseComplete` messages (the answers to
/// `Close` messages the server put in front of a client's batch).
pub(crate) fn without_first_close_completes(bytes: Vec<u8>, n: usize) -> Vec<u8> {
    let mut left = n;
    let mut kept = Vec::with_capacity(bytes.len());
    for (tag, message) in messages(&bytes) {
        if tag == b'3' && left > 0 {
            left -= 1;
        } else {
            kept.extend_from_slice(message);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_backend_messages() {
        let mut out = BytesMut::new();
        command_complete("SELECT 1", &mut out);
        ready_for_query(b'T', &mut out);
        let tags: Vec<u8> = messages(&out).map(|(t, _)| t).collect();
        assert_eq!(tags, b"CZ");
        assert_eq!(last_ready_status(&out), Some(b'T'));
        assert_eq!(last_ready_status(&out[..out.len() - 1]), None);
        assert_eq!(last_tag_if_whole(&out), Some(b'Z'));
        assert_eq!(last_tag_if_whole(&out[..out.len() - 1]), None);
        assert!(!has_error(&out));
    }

    #[test]
    fn error_fields_drop_nul_and_end_with_a_terminator() {
        let mut out = BytesMut::new();
        error_response("ERROR", "XX000", "bad\0text", &mut out);
        assert!(has_error(&out));
        let body = &out[5..];
        assert_eq!(body, b"SERROR\0VERROR\0CXX000\0Mbadtext\0\0");
    }

    #[test]
    fn splits_whole_frames_only() {
        let mut buf = BytesMut::new();
        command_complete("SELECT 1", &mut buf);
        let whole = buf.len();
        buf.extend_from_slice(&[b'Z', 0, 0]);
        assert_eq!(split_frame(&mut buf).unwrap().unwrap().len(), whole);
        assert!(split_frame(&mut buf).unwrap().is_none());
        let mut bad = BytesMut::from(&[b'Z', 0, 0, 0, 3][..]);
        assert!(split_frame(&mut bad).is_err());
    }
}
