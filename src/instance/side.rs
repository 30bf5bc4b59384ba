//! Side jobs: a wire client's `Parse`/`Describe`/`Close` that must not wait
//! for another client's open transaction.
//!
//! A program that drives several connections from one thread (pgbench
//! `-M prepared -j 2 -c 8`) blocks on one connection's `Parse` while another
//! of its connections holds the engine inside a transaction: waiting for the
//! engine would deadlock it. Such work is run inside the holder's
//! transaction instead, wrapped in a savepoint so that its errors cannot
//! abort the holder's transaction:
//!
//! ```text
//! Query("SAVEPOINT s") | Parse ... Sync | Query("ROLLBACK TO SAVEPOINT s; RELEASE SAVEPOINT s")
//! ```
//!
//! Prepared statements are not transactional, so the rollback keeps what the
//! `Parse` created. The client's part of the reply is cut out and its
//! `ReadyForQuery` says idle (the client itself is not in a transaction).
//! What it sees of the holder's transaction is what catalog lookups see: a
//! table the holder created but has not committed resolves.

use bytes::BytesMut;

use crate::protocol::{self, backend};

const SAVEPOINT: &str = "pglite_cache_side";

/// The engine input that runs `job` (ending in one `Sync`) inside a savepoint.
pub(crate) fn wrap(job: &[u8]) -> BytesMut {
    let mut input = BytesMut::with_capacity(job.len() + 128);
    protocol::simple_query(&format!("SAVEPOINT {SAVEPOINT}"), &mut input).expect("no NUL in the text");
    input.extend_from_slice(job);
    protocol::simple_query(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}; RELEASE SAVEPOINT {SAVEPOINT}"), &mut input)
        .expect("no NUL in the text");
    input
}

/// The client's part of the reply to [`wrap`]ped input, with its
/// `ReadyForQuery` saying idle; `Err` with a description if the savepoint
/// steps did not both succeed leaving the transaction open and healthy.
pub(crate) fn unwrap_reply(reply: &[u8]) -> Result<Vec<u8>, String> {
    let mut parts: [Vec<u8>; 3] = Default::default();
    let mut part = 0;
    for message in messages(reply) {
        if part > 2 {
            return Err("more replies than expected".into());
        }
        parts[part].extend_from_slice(message);
        if message[0] == b'Z' {
            part += 1;
        }
    }
    if part != 3 {
        return Err(format!("{part} ReadyForQuery instead of 3"));
    }
    let failed = |p: &[u8]| messages(p).any(|m| m[0] == b'E');
    let status = |p: &[u8]| p.last().copied();
    if failed(&parts[0]) || status(&parts[0]) != Some(b'T') {
        return Err("SAVEPOINT failed".into());
    }
    if failed(&parts[2]) || status(&parts[2]) != Some(b'T') {
        return Err("ROLLBACK TO SAVEPOINT failed".into());
    }
    let mut mine = std::mem::take(&mut parts[1]);
    if let Some(last) = mine.last_mut() {
        *last = b'I';
    }
    Ok(mine)
}

/// Whole backend messages in `bytes`.
fn messages(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    backend::messages(bytes).map(|(_, message)| message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn cuts_out_the_clients_part_and_marks_it_idle() {
        let z = |s: u8| message(b'Z', &[s]);
        let mut reply = [message(b'C', b"SAVEPOINT\0"), z(b'T')].concat();
        reply.extend([message(b'1', b""), message(b'E', b"Cx\0\0"), z(b'E')].concat());
        reply.extend([message(b'C', b"ROLLBACK\0"), message(b'C', b"RELEASE\0"), z(b'T')].concat());
        let mine = unwrap_reply(&reply).unwrap();
        assert_eq!(mine, [message(b'1', b""), message(b'E', b"Cx\0\0"), z(b'I')].concat());

        let broken = [message(b'E', b"Cx\0\0"), z(b'E'), z(b'E'), z(b'E')].concat();
        assert!(unwrap_reply(&broken).is_err());
        assert!(unwrap_reply(&z(b'T')).is_err());
    }
}
