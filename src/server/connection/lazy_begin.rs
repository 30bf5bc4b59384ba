//! A plain `BEGIN` is answered by the server and sent to the engine in
//! front of the transaction's first statement (`RawSession::begin_lazily`).
//!
//! Why: a transaction holds the engine from its start to its end, and every
//! other client waits meanwhile. Run on its own, `BEGIN` would take the
//! engine one client round trip early, while the client only reads the
//! answer and sends its first statement: with pgbench's TPC-B (seven round
//! trips per transaction) that was one of seven idle gaps the others waited
//! through. The engine starts the transaction when it gets the first
//! statement instead, which PostgreSQL's snapshots do as well (a snapshot is
//! taken by the first statement, not by `BEGIN`); what differs is
//! `now()`/`transaction_timestamp()`, which becomes the time the first
//! statement reached the engine. Only the plain forms (no isolation level,
//! no `READ ONLY`: those can fail or matter at `BEGIN`) of a connection
//! without session settings (applying them must not run inside the
//! transaction) are deferred.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Batch, Connection, Result};
use crate::server::backend;
use crate::server::sql_text;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Whether a plain `BEGIN` may be answered without the engine now.
    fn may_begin_lazily(&self) -> bool {
        self.status == b'I'
            && self.copy.is_none()
            && !self.session.holds_engine()
            && !self.session.skipping_to_sync()
            && !self.session.begin_pending()
            && !self.settings.needs_hold(false)
    }

    /// A simple `Query` that is a plain `BEGIN`, arriving with nothing
    /// queued before it: answered here. False if it must run as usual.
    pub(super) async fn simple_begin(&mut self, sql: &[u8], batch: &Batch) -> Result<bool> {
        let Some(tag) = sql_text::plain_begin(sql) else { return Ok(false) };
        if !batch.bytes.is_empty() || !self.may_begin_lazily() {
            return Ok(false);
        }
        let mut reply = BytesMut::new();
        backend::command_complete(tag, &mut reply);
        backend::ready_for_query(b'T', &mut reply);
        self.session.begin_lazily();
        self.forward(&reply).await?;
        Ok(true)
    }

    /// A batch that is `Bind` (unnamed portal, of a statement that is a
    /// plain `BEGIN`, no parameters), optionally `Describe` of that portal,
    /// `Execute` of it and `Sync` (how libpq runs a prepared `BEGIN`):
    /// answered here. False if it must run as usual.
    pub(super) async fn extended_begin(&mut self, batch: &Batch) -> Result<bool> {
        let Some(tag) = batch.begin_bind else { return Ok(false) };
        if !self.may_begin_lazily() {
            return Ok(false);
        }
        let Some(described) = bind_execute_sync(&batch.bytes) else { return Ok(false) };
        let mut reply = BytesMut::new();
        backend::message(b'2', &mut reply, |_| {});
        if described {
            backend::message(b'n', &mut reply, |_| {});
        }
        backend::command_complete(tag, &mut reply);
        backend::ready_for_query(b'T', &mut reply);
        self.session.begin_lazily();
        self.forward(&reply).await?;
        Ok(true)
    }
}

/// If `batch` is exactly `Bind`, optionally `Describe` of its portal,
/// `Execute` of its portal (any row limit) and `Sync`: whether it has the
/// `Describe`.
fn bind_execute_sync(batch: &[u8]) -> Option<bool> {
    let messages: Vec<(u8, &[u8])> = backend::messages(batch).collect();
    if messages.iter().map(|(_, m)| m.len()).sum::<usize>() != batch.len() {
        return None;
    }
    match messages.as_slice() {
        [(b'B', b), (b'E', e), (b'S', _)] => (portal(e)? == portal(b)?).then_some(false),
        [(b'B', b), (b'D', d), (b'E', e), (b'S', _)] => {
            let p = portal(b)?;
            (d.get(5) == Some(&b'P') && cstr(&d[6..])? == p && portal(e)? == p).then_some(true)
        }
        _ => None,
    }
}

/// The portal name an `Execute` or `Bind` starts with.
fn portal(message: &[u8]) -> Option<&[u8]> {
    cstr(&message[5..])
}

fn cstr(body: &[u8]) -> Option<&[u8]> {
    body.iter().position(|&b| b == 0).map(|end| &body[..end])
}

/// The number of parameter values in the rest of a `Bind` body (after the
/// portal and statement names).
pub(super) fn bind_parameters(rest: &[u8]) -> Option<u16> {
    let formats = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    let at = 2 + 2 * formats;
    Some(u16::from_be_bytes([*rest.get(at)?, *rest.get(at + 1)?]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    fn bind(portal: &str, params: usize) -> BytesMut {
        let mut out = BytesMut::new();
        let values: Vec<Option<&[u8]>> = vec![Some(b"1"); params];
        frontend::bind(
            portal,
            "s",
            [0i16],
            values,
            |v, buf| match v {
                Some(v) => {
                    buf.extend_from_slice(v);
                    Ok(postgres_protocol::IsNull::No)
                }
                None => Ok(postgres_protocol::IsNull::Yes),
            },
            [0i16],
            &mut out,
        )
        .map_err(|_| ())
        .unwrap();
        out
    }

    #[test]
    fn recognises_bind_describe_execute_sync_of_one_portal() {
        let mut b = bind("p", 0);
        frontend::describe(b'P', "p", &mut b).unwrap();
        frontend::execute("p", 0, &mut b).unwrap();
        frontend::sync(&mut b);
        assert_eq!(bind_execute_sync(&b), Some(true));

        let mut b = bind("", 0);
        frontend::execute("", 1, &mut b).unwrap();
        frontend::sync(&mut b);
        assert_eq!(bind_execute_sync(&b), Some(false));

        let mut other = bind("p", 0);
        frontend::execute("q", 0, &mut other).unwrap();
        frontend::sync(&mut other);
        assert_eq!(bind_execute_sync(&other), None, "another portal");

        let mut two = b.clone();
        two.extend_from_slice(&b);
        assert_eq!(bind_execute_sync(&two), None, "two groups");

        let mut flush = bind("", 0);
        frontend::execute("", 0, &mut flush).unwrap();
        frontend::flush(&mut flush);
        assert_eq!(bind_execute_sync(&flush), None, "no Sync");
    }

    #[test]
    fn counts_bind_parameters() {
        for params in [0, 1, 3] {
            let b = bind("p", params);
            let body = &b[5..];
            let after_portal = &body[body.iter().position(|&c| c == 0).unwrap() + 1..];
            let rest = &after_portal[after_portal.iter().position(|&c| c == 0).unwrap() + 1..];
            assert_eq!(bind_parameters(rest), Some(params as u16));
        }
    }
}
